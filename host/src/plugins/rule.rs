//! [`PluginRule`]: one flag's rule bound to a plugin, and what running it
//! goes through (the guard, the counters).

use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use super::instance::{self, CallLimit};
use super::{Plugin, PluginError};
use crate::rules::{EvaluationContext, RuleError, TargetingRule};

/// The budget of the plugin calls one request makes: the time they may
/// spend running, together. Time a request waits for a plugin thread is not
/// counted (its queue is bounded), so a single call always gets its whole
/// deadline, and a deadline is the plugin's fault, not the request's.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    left: Duration,
    total: Duration,
}

impl Budget {
    /// A budget of `total`.
    pub fn new(total: Duration) -> Self {
        Self { left: total, total }
    }

    /// Runs `f` with every plugin call in it bounded by this budget (on this
    /// thread): a call gets what is left of it when less than its deadline,
    /// and none once it is spent.
    pub fn run<T>(self, f: impl FnOnce() -> T) -> T {
        struct Restore(Option<Budget>);
        impl Drop for Restore {
            fn drop(&mut self) {
                BUDGET.set(self.0);
            }
        }
        let _restore = Restore(BUDGET.replace(Some(self)));
        f()
    }
}

thread_local! {
    /// The budget of the request whose evaluations run on this thread now.
    static BUDGET: Cell<Option<Budget>> = const { Cell::new(None) };
}

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
        let budget = BUDGET.get();
        let limit = match budget {
            None => CallLimit::deadline(plugin),
            Some(Budget { left, total }) if left.is_zero() => {
                plugin.stats.refused();
                return Err(PluginError::NotReached {
                    plugin: plugin.name.clone(),
                    budget: total,
                });
            }
            Some(Budget { left, total }) => CallLimit::within(plugin, left, total),
        };
        let permit = match plugin.guard.enter(&plugin.name) {
            Ok(permit) => permit,
            Err(refused) => {
                plugin.stats.refused();
                return Err(refused);
            }
        };
        let started = std::time::Instant::now();
        let result = instance::evaluate(self, context, limit);
        drop(permit);
        let elapsed = started.elapsed();
        if let Some(budget) = budget {
            BUDGET.set(Some(Budget {
                left: budget.left.saturating_sub(elapsed),
                ..budget
            }));
        }
        plugin.stats.record(elapsed, &result);
        plugin.guard.record(&plugin.name, &result, elapsed);
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

    fn plugin(&self) -> Option<&str> {
        Some(&self.plugin.name)
    }
}
