//! [`PluginRule`]: one flag's rule bound to a plugin, and what running it
//! goes through (the guard, the counters).

use std::sync::Arc;

use super::{Plugin, PluginError, instance};
use crate::rules::{EvaluationContext, RuleError, TargetingRule};

/// One flag's rule, bound to a plugin with its configuration.
pub struct PluginRule {
    /// Process-unique: keys the guest's parsed configuration in each instance.
    pub(super) id: u64,
    pub(super) plugin: Arc<Plugin>,
    pub(super) flag_key: String,
    pub(super) variants: Vec<String>,
    /// The configuration as JSON text, serialised once at bind time.
    pub(super) config: String,
}

impl PluginRule {
    /// Runs the rule for `context`.
    pub fn run(&self, context: &EvaluationContext) -> Result<Option<String>, PluginError> {
        let plugin = &self.plugin;
        let permit = match plugin.guard.enter(&plugin.name) {
            Ok(permit) => permit,
            Err(refused) => {
                plugin.stats.refused();
                return Err(refused);
            }
        };
        let started = std::time::Instant::now();
        let result = instance::evaluate(self, context);
        drop(permit);
        plugin.stats.record(started.elapsed(), &result);
        plugin.guard.record(&plugin.name, &result);
        result
    }
}

impl TargetingRule for PluginRule {
    fn evaluate(&self, context: &EvaluationContext) -> Result<Option<String>, RuleError> {
        self.run(context).map_err(|e| RuleError(e.to_string()))
    }

    fn describe(&self) -> String {
        format!("plugin {}", self.plugin.name)
    }
}
