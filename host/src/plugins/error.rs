//! [`PluginError`]: every way a plugin can fail to load or to answer.

use std::time::Duration;

use super::CONTRACT_VERSIONS;

/// Why a plugin could not be loaded or could not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PluginError {
    /// The plugin file could not be read.
    #[error("plugin {plugin}: cannot read {path}: {reason}")]
    Read {
        /// The plugin.
        plugin: String,
        /// Its file.
        path: String,
        /// The I/O error.
        reason: String,
    },
    /// The file is not a component flaghost can run.
    #[error("plugin {plugin}: {reason}")]
    Invalid {
        /// The plugin.
        plugin: String,
        /// What is wrong with the file.
        reason: String,
    },
    /// The component could not be compiled within the compile bound (or the
    /// compiler failed).
    #[error("plugin {plugin} was not compiled: {reason}")]
    Compile {
        /// The plugin.
        plugin: String,
        /// The bound it reached, or how the compiler failed.
        reason: String,
    },
    /// flaghost could not run its compiler (not the component's fault).
    #[error("flaghost could not compile plugin {plugin}: {reason}")]
    Compiler {
        /// The plugin.
        plugin: String,
        /// What failed.
        reason: String,
    },
    /// The component does not implement the contract.
    #[error("plugin {plugin} does not implement flaghost:rules (served: {}): {reason}", CONTRACT_VERSIONS.join(", "))]
    Contract {
        /// The plugin.
        plugin: String,
        /// What is missing or mistyped.
        reason: String,
    },
    /// The call ran past its deadline and was stopped.
    #[error("plugin {plugin} exceeded its deadline of {deadline:?} and was stopped")]
    Deadline {
        /// The plugin.
        plugin: String,
        /// The deadline it ran into.
        deadline: Duration,
    },
    /// The guest asked for more memory than the cap.
    #[error("plugin {plugin} exceeded its memory cap of {cap} bytes")]
    Memory {
        /// The plugin.
        plugin: String,
        /// The cap.
        cap: usize,
    },
    /// The guest trapped (a panic, `unreachable`, a stack overflow, a call to
    /// a capability it does not have...).
    #[error("plugin {plugin} trapped: {reason}{}", written(output))]
    Trap {
        /// The plugin.
        plugin: String,
        /// The trap, as wasmtime describes it.
        reason: String,
        /// The wasm trap, if it was one (not a trapping import or a failed
        /// instantiation): wasmtime's own words, which no plugin chose.
        code: Option<wasmtime::Trap>,
        /// What the guest wrote to stdout and stderr during the call (its
        /// last bytes, see `wasi::OUTPUT_CAP`): an uncaught exception's
        /// message and traceback, where the language runtime prints one.
        output: Option<String>,
    },
    /// The guest read more of the context than the context cap.
    #[error("plugin {plugin} read more than the context cap of {cap} bytes")]
    Input {
        /// The plugin.
        plugin: String,
        /// The cap.
        cap: usize,
    },
    /// The guest's answer was over the answer cap.
    #[error("plugin {plugin} answered {bytes} bytes, over the answer cap of {cap}")]
    Output {
        /// The plugin.
        plugin: String,
        /// The answer's size.
        bytes: usize,
        /// The cap.
        cap: usize,
    },
    /// The call was stopped when the request's plugin budget ran out,
    /// before its own deadline.
    #[error("plugin {plugin} was stopped: the request's plugin budget of {budget:?} ran out")]
    BudgetSpent {
        /// The plugin.
        plugin: String,
        /// The request's budget.
        budget: Duration,
    },
    /// Not run: the request's plugin budget was spent before its turn.
    #[error(
        "plugin {plugin} was not run: the request's plugin budget of {budget:?} was spent before this flag's turn"
    )]
    NotReached {
        /// The plugin.
        plugin: String,
        /// The request's budget.
        budget: Duration,
    },
    /// The plugin is quarantined after repeated deadlines or slow calls;
    /// not run.
    #[error(
        "plugin {plugin} is quarantined after repeated slow calls (deadlines, or over its strike share of the deadline); tried again in {remaining:?}"
    )]
    Quarantined {
        /// The plugin.
        plugin: String,
        /// Until it is tried again.
        remaining: Duration,
    },
    /// As many calls of the plugin as allowed are running; not run.
    #[error("plugin {plugin} already runs {max} calls, its limit; try again")]
    Busy {
        /// The plugin.
        plugin: String,
        /// The limit.
        max: usize,
    },
    /// No slot of the pooling allocator is left for it: the plugin already
    /// has all its instances, or flaghost holds as many plugins as it may.
    #[error("plugin {plugin}: {reason}")]
    Slots {
        /// The plugin refused.
        plugin: String,
        /// Which bound it reached.
        reason: String,
    },
    /// The guest answered an error of its own.
    #[error("plugin {plugin} failed: {message}")]
    Guest {
        /// The plugin.
        plugin: String,
        /// The guest's message.
        message: String,
    },
}

/// A trap's output, as its message shows it.
fn written(output: &Option<String>) -> String {
    match output {
        Some(text) => format!("; it wrote: {text}"),
        None => String::new(),
    }
}
