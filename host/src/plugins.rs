//! The plugin runtime: targeting rules as sandboxed WebAssembly components.
//!
//! - [`PluginRuntime`] owns the wasmtime engine (built once: component model,
//!   epoch interruption, `concurrency_support(false)`) and the ticker that
//!   advances its epoch, and turns components into [`Plugin`]s. The
//!   compiling itself is done by a [`Compiler`]: a child process of
//!   flaghost with CPU-time and memory bounds ([`compiler`]).
//! - A [`Plugin`] is one compiled component checked against the contract, with
//!   an `InstancePre` ready to instantiate.
//! - A [`PluginSet`] is the plugins of one plugin directory; it binds flags'
//!   `{"plugin": [name, config]}` rules to plugins ([`crate::flags::RuleBinder`]).
//! - A [`PluginRule`] is one flag's bound rule; evaluating it runs the plugin
//!   under the limits ([`limits`]), on the plugin pool ([`PluginPool`]: never an
//!   HTTP worker), on an instance reused per plugin thread or
//!   fresh per call ([`Isolation`]).
//!
//! Every failure of a plugin call becomes a [`PluginError`] at this boundary;
//! the evaluator turns it into an ERROR resolution. A call never panics the
//! process and never outlives its deadline.

mod artifacts;
mod bindings;
pub mod compiler;
mod epoch;
mod error;
mod guard;
mod host;
mod instance;
pub mod limits;
mod pool;
mod registry;
mod rule;
mod runtime;
mod slots;
mod stats;
pub mod wasi;

pub use artifacts::Origin;
pub use compiler::Compiler;
pub use error::PluginError;
pub use limits::{Isolation, Limits};
pub use pool::{PluginPool, PoolError, PoolSize};
pub use registry::{PluginRegistry, PluginSet, RefusedFile, ReloadReport, valid_plugin_name};
pub use rule::{Budget, PluginRule};
pub use runtime::{Plugin, PluginRuntime, pagemap_reset};
pub use stats::{ErrorCounts, Percentiles, RECENT_ERRORS, RecentError, StatsSnapshot};

use std::time::Duration;

/// The contract versions this host serves, newest first.
pub const CONTRACT_VERSIONS: &[&str] = &["0.1.0"];

/// How often the engine's epoch advances: the granularity of deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(1);

/// `text` cut to at most `max` bytes on a character boundary, saying how
/// long it was: how a plugin's (or its compiler's) text is kept for logs and
/// listings.
pub(crate) fn cut(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    format!(
        "{}… ({} bytes in all)",
        &text[..text.floor_char_boundary(max)],
        text.len()
    )
}

/// A process-unique id: keys plugins' per-thread instances and rules'
/// parsed configurations in them.
fn next_id() -> u64 {
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}
