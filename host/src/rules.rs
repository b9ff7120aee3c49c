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
    fn evaluate(&self, context: &EvaluationContext) -> Result<Option<String>, RuleError>;

    /// What the rule is, for logs (`plugin percentage-rollout`).
    fn describe(&self) -> String;

    /// The plugin this rule runs first, if it runs any. NB: a rule that runs
    /// a plugin is evaluated on the plugin pool (in that plugin's lane), never
    /// on the HTTP workers; one that answers `None` here runs no guest code.
    fn plugin(&self) -> Option<&str> {
        None
    }
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
