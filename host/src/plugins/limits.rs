//! The sandbox's limits and the per-store state that enforces them.

use std::time::Duration;

use wasmtime::ResourceLimiter;

use crate::rules::EvaluationContext;

/// Default evaluation deadline.
pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(10);
/// Default cap on a plugin instance's linear memory.
pub const DEFAULT_MEMORY_BYTES: usize = 32 << 20;
/// Default cap on the wasm stack of a call.
pub const DEFAULT_WASM_STACK_BYTES: usize = 512 << 10;
/// Largest component file flaghost will compile.
pub const DEFAULT_MAX_COMPONENT_BYTES: usize = 32 << 20;
/// Default number of plugin instances that can exist at once.
pub const DEFAULT_MAX_INSTANCES: u32 = 1000;
/// Default number of deadlines in a row that quarantine a plugin.
pub const DEFAULT_QUARANTINE_AFTER: u32 = 3;
/// Default length of a quarantine.
pub const DEFAULT_QUARANTINE_FOR: Duration = Duration::from_secs(5);

/// Default calls of one plugin at once: the cores. Calls run on the worker
/// threads (one per core), so this refuses nothing a well-behaved plugin
/// does; set it lower to keep a plugin that runs to its deadline from holding
/// every worker at once (its refused calls answer an error at once). The
/// quarantine is what stops such a plugin by default.
pub fn default_max_concurrency() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Default cap on the context bytes one call reads (Shopify Functions allows
/// 128 KB of input per run).
pub const DEFAULT_MAX_CONTEXT_BYTES: usize = 128 << 10;

/// Default cap on an answer's size: a variant name or an error message
/// (Shopify Functions allows 20 KB of output per run).
pub const DEFAULT_MAX_ANSWER_BYTES: usize = 16 << 10;

/// How evaluations are isolated from one another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Isolation {
    /// Each worker thread keeps one instance per plugin and reuses it; an
    /// instance that traps is thrown away. A rule may keep state between
    /// evaluations on the same thread (it cannot see other plugins', nor
    /// anything outside its sandbox). The fast default.
    #[default]
    Reuse,
    /// A fresh instance for every evaluation: nothing survives a call.
    /// Costs an instantiation (microseconds) per evaluation.
    Fresh,
}

/// The limits every plugin call runs under.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Wall-clock budget of one call (epoch interruption).
    pub deadline: Duration,
    /// Cap on an instance's linear memory, in bytes.
    pub memory_bytes: usize,
    /// Cap on the wasm stack, in bytes.
    pub wasm_stack_bytes: usize,
    /// Largest component file accepted.
    pub max_component_bytes: usize,
    /// Largest answer (variant name or error message) a call may return, in
    /// bytes; a larger one is refused as an error.
    pub max_answer_bytes: usize,
    /// Context bytes one call may read through the `context` import; past
    /// it, reads answer nothing and the evaluation is refused as an error.
    pub max_context_bytes: usize,
    /// How evaluations are isolated.
    pub isolation: Isolation,
    /// Calls of one plugin that may run at once (each holds a worker thread
    /// while it runs); more are refused at once.
    pub max_concurrency: usize,
    /// Deadlines in a row after which a plugin is quarantined.
    pub quarantine_after: u32,
    /// How long a quarantine lasts before the plugin is tried again.
    pub quarantine_for: Duration,
    /// Plugin instances that can exist at once, across all plugins and
    /// threads (the pooling allocator's size). With [`Isolation::Reuse`] each
    /// worker thread holds one per plugin; with [`Isolation::Fresh`] one per
    /// evaluation in flight.
    pub max_instances: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            deadline: DEFAULT_DEADLINE,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            wasm_stack_bytes: DEFAULT_WASM_STACK_BYTES,
            max_component_bytes: DEFAULT_MAX_COMPONENT_BYTES,
            max_answer_bytes: DEFAULT_MAX_ANSWER_BYTES,
            max_context_bytes: DEFAULT_MAX_CONTEXT_BYTES,
            max_concurrency: default_max_concurrency(),
            quarantine_after: DEFAULT_QUARANTINE_AFTER,
            quarantine_for: DEFAULT_QUARANTINE_FOR,
            isolation: Isolation::default(),
            max_instances: DEFAULT_MAX_INSTANCES,
        }
    }
}

/// Tables may hold this many elements: generous for any rule, small enough
/// that a table cannot stand in for unbounded memory.
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// What a plugin's `Store` holds.
pub(super) struct HostState {
    /// The context of the evaluation in progress; `None` between calls.
    pub context: Option<EvaluationContext>,
    memory_bytes: usize,
    /// Set when the guest asked for more memory than the cap, so the trap that
    /// follows is reported as a memory overrun rather than a bare trap.
    pub memory_exceeded: bool,
    /// Context bytes the call in progress has read.
    pub context_read: usize,
    max_context_bytes: usize,
    /// Set when the call in progress read past the context cap.
    pub context_exceeded: bool,
}

impl HostState {
    pub fn new(limits: &Limits) -> Self {
        Self {
            context: None,
            memory_bytes: limits.memory_bytes,
            memory_exceeded: false,
            context_read: 0,
            max_context_bytes: limits.max_context_bytes,
            context_exceeded: false,
        }
    }

    /// Starts a call's context budget over.
    pub fn begin_call(&mut self) {
        self.context_read = 0;
        self.context_exceeded = false;
    }

    /// Counts `bytes` read from the context; whether they fit the cap.
    pub fn charge(&mut self, bytes: usize) -> bool {
        self.context_read = self.context_read.saturating_add(bytes);
        if self.context_read > self.max_context_bytes {
            self.context_exceeded = true;
        }
        !self.context_exceeded
    }
}

impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            self.memory_exceeded = true;
            wasmtime::bail!(
                "memory cap exceeded: asked for {desired} bytes, the cap is {}",
                self.memory_bytes
            );
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}
