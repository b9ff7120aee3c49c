//! What a targeting rule is, apart from any one kind of rule: the leaf that
//! [`crate::flags`] (which parses and binds rules), [`crate::evaluation`]
//! (which runs them) and [`crate::plugins`] (which implements them in wasm)
//! all build on, so none of them imports another for these.

mod context;

pub use context::{ContextError, EvaluationContext};

use std::sync::Arc;

use serde_json::Value as Json;

/// A rule that picks a flag's variant for a context.
pub trait TargetingRule: Send + Sync {
    /// The variant that applies, `None` for the flag's default, or why the
    /// rule could not answer.
    ///
    /// The name is the rule's own copy of one of the variant names it was
    /// bound or compiled with: an answer costs no allocation, and a name
    /// the flag lacks is the rule's to report (a plugin's without echoing
    /// it; see [`crate::plugins`]).
    fn evaluate(&self, context: &EvaluationContext) -> Result<Option<&str>, RuleError>;

    /// What the rule is, for logs (`plugin percentage-rollout`).
    fn describe(&self) -> String;

    /// Why the rule answers what it does for `context`, a line per step,
    /// for `flaghost eval`: it evaluates the rule again, plugins included.
    /// Empty where the rule has no steps to show (a plugin's answer is
    /// shown by the caller).
    fn explain(&self, _context: &EvaluationContext) -> Vec<String> {
        Vec::new()
    }

    /// The lane of the plugin pool this rule's evaluations wait in, if it
    /// runs guest code: the plugin's name, or for a rule that runs several,
    /// their names joined by `/` (a lane of its own: see [`lane_of`]). NB: a
    /// rule that answers `None` here runs no guest code and is evaluated on
    /// the HTTP workers; any other, on the plugin pool.
    fn lane(&self) -> Option<&str> {
        None
    }
}

/// The lane of a rule that runs `plugins`: its one plugin's, or, for
/// several, a lane of their own named by them all (sorted, joined by `/`,
/// which no plugin name holds: names are file stems). Why not the first plugin's: a rule naming a
/// neighbour's plugin first, then a slow one of its own, would take the
/// neighbour's place in the pool. Each plugin's calls at once stay bounded
/// by its own share across lanes (its guard).
pub fn lane_of<'a>(plugins: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let mut names: Vec<&str> = plugins.into_iter().collect();
    names.sort_unstable();
    names.dedup();
    (!names.is_empty()).then(|| names.join("/"))
}

/// A rule failed to answer; the evaluation is an ERROR with reason GENERAL.
/// The message names the rule (`plugin x exceeded its deadline...`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RuleError(pub String);

/// Turns a `{"plugin": [name, config]}` rule into something that evaluates.
///
/// Implemented by the plugin registry; a flag file is parsed against the
/// plugins that are loaded, so a reference to a missing plugin or a
/// configuration the plugin refuses is a load error.
pub trait RuleBinder {
    /// Binds `flag_key`'s rule to plugin `plugin` with `config`, or says why not.
    fn bind(
        &self,
        flag_key: &str,
        variants: &[String],
        plugin: &str,
        config: &Json,
    ) -> Result<Arc<dyn TargetingRule>, BindError>;
}

/// Why a `plugin` rule could not be bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    /// No plugin of that name is loaded.
    #[error("plugin {plugin:?} is not loaded (loaded: {})", if loaded.is_empty() { "none".to_owned() } else { loaded.join(", ") })]
    NotLoaded {
        /// The plugin the rule names.
        plugin: String,
        /// The plugins that are loaded, sorted.
        loaded: Vec<String>,
    },
    /// The plugin refused the configuration, or failed checking it.
    #[error("{0}")]
    Refused(String),
}

#[cfg(test)]
mod lane_tests {
    use super::lane_of;

    #[test]
    fn a_rule_with_several_plugins_has_a_lane_of_its_own() {
        assert_eq!(lane_of([]), None);
        assert_eq!(lane_of(["spin"]).as_deref(), Some("spin"));
        // Named by all, whatever their order or repetition: the same set is
        // the same lane, and never one plugin's own.
        assert_eq!(
            lane_of(["spin", "allow-list", "spin"]).as_deref(),
            Some("allow-list/spin")
        );
        assert_eq!(
            lane_of(["allow-list", "spin"]),
            lane_of(["spin", "allow-list"])
        );
    }
}
