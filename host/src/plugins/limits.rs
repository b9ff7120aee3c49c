//! The sandbox's limits and the per-store state that enforces them.

use std::time::Duration;

use wasmtime::ResourceLimiter;

use crate::rules::EvaluationContext;

/// Default evaluation deadline.
pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(10);
/// Default deadline of a plugin's start-up (instantiation, configuration
/// check, creating a rule). Measured (`sandbox` bench, `languages`,
/// 2026-12-03): the Python allow-list starts in 2.0 ms at the median and
/// 8.1 ms at p99, JavaScript 0.54 / 4.1 ms, Rust 18 / 200 µs; 250 ms is 30
/// times Python's p99, room for a loaded machine and a debug build.
pub const DEFAULT_INIT_DEADLINE: Duration = Duration::from_millis(250);
/// Default cap on a plugin instance's linear memory.
pub const DEFAULT_MEMORY_BYTES: usize = 32 << 20;
/// Default cap on the wasm stack of a call.
pub const DEFAULT_WASM_STACK_BYTES: usize = 512 << 10;
/// Largest component file flaghost will compile.
pub const DEFAULT_MAX_COMPONENT_BYTES: usize = 32 << 20;
/// Default number of plugins loaded at once.
pub const DEFAULT_MAX_PLUGINS: usize = 64;

/// Core wasm instances one component may declare. A `wasm32-wasip2` Rust
/// component has about 4 (the rule, the WASI adapter, two shims); a Python
/// one (componentize-py) one per linked library, a dozen or two.
pub const MAX_CORE_INSTANCES_PER_COMPONENT: u32 = 48;
/// Linear memories one component may declare (they usually share one).
pub const MAX_MEMORIES_PER_COMPONENT: u32 = 4;
/// Tables one component may declare (shims declare one each).
pub const MAX_TABLES_PER_COMPONENT: u32 = 48;
/// Instances of one plugin that may exist for configuration checks at once,
/// beside one per plugin thread: checks wait for one of these.
pub const CONFIG_CHECK_INSTANCES: usize = 2;
/// Memory slots the instance pool may hold: each reserves about 4 GiB of
/// address space (wasmtime's default reservation, which lets compiled code
/// skip bounds checks), so 16,384 is 64 TiB of the 128 TiB a process has.
pub const MAX_POOL_MEMORIES: u64 = 16_384;
/// Bytes a table element counts toward the memory cap (a pointer).
pub const TABLE_ELEMENT_BYTES: usize = 8;
/// Default number of strikes close together that quarantine a plugin.
pub const DEFAULT_QUARANTINE_AFTER: u32 = 3;
/// Default length of a quarantine.
pub const DEFAULT_QUARANTINE_FOR: Duration = Duration::from_secs(5);

/// Default share of a call's deadline past which the call is a strike toward
/// quarantine, as a deadline is: a plugin spinning just under its deadline
/// is stopped as one running past it is.
pub const DEFAULT_STRIKE_FRACTION: f64 = 0.5;

/// Default threads of the plugin pool: the cores, at least two (so one
/// plugin's share always leaves a thread to the others) and at most 16 (the
/// pool of instances grows with them: see [`Limits::pool_component_instances`]).
pub fn default_pool_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(2, 16)
}

/// Default calls of one plugin at once: half the pool's threads, so a
/// plugin that spins holds at most half of the plugin capacity.
pub fn default_max_concurrency() -> usize {
    (default_pool_threads() / 2).max(1)
}

/// Default `nice` of the plugin threads (see [`Limits::pool_nice`]): 0.
/// Measured (`noisy_neighbour`, 2026-12-02): with a plugin spinning or
/// looping at its share, a static flag's p99 was the same at nice 10 and 0
/// (2.3 vs 2.3 ms, 1.8 vs 2.1 ms), since the share already leaves a core to
/// the HTTP workers; but niced threads turned CPU contention (a build
/// beside the tests) into wall-clock deadlines of well-behaved plugins.
pub const DEFAULT_POOL_NICE: i32 = 0;

/// Default bound of one plugin's queue of evaluations waiting for a thread.
pub const DEFAULT_QUEUE: usize = 64;

/// Default cap on the context bytes one call reads (Shopify Functions allows
/// 128 KB of input per run).
pub const DEFAULT_MAX_CONTEXT_BYTES: usize = 128 << 10;

/// Default cap on an answer's size: a variant name or an error message
/// (Shopify Functions allows 20 KB of output per run).
pub const DEFAULT_MAX_ANSWER_BYTES: usize = 16 << 10;

/// How evaluations are isolated from one another.
///
/// What each gives and costs (`sandbox` bench, `isolation/allow-list`, the
/// Rust allow-list rule on this project's 2-core machine, 2026-12-02):
///
/// | mode | what a rule can keep between evaluations | cost per evaluation |
/// | --- | --- | --- |
/// | `fresh` (default) | nothing: each evaluation instantiates the component and parses the rule's configuration anew | 16 µs |
/// | `reuse` | anything, on the same plugin thread: one caller's context, and what it computed, can reach a later caller and another flag of the same plugin | 1 µs |
///
/// Neither mode lets a rule see another plugin, the host, or anything
/// outside its sandbox, and an instance that traps is never used again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Isolation {
    /// A fresh instance for every evaluation: nothing survives a call, so an
    /// evaluation is a pure function of the flag, the rule's configuration
    /// and the context, as the contract promises. The default.
    #[default]
    Fresh,
    /// Each plugin thread keeps one instance per plugin and reuses it, with
    /// each flag's rule created once. A rule may keep state between
    /// evaluations on that thread, across callers and across the flags that
    /// use it: choose it only for a plugin trusted not to, where
    /// instantiating is too dear (a Python or JavaScript runtime).
    Reuse,
}

impl std::fmt::Display for Isolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Isolation::Fresh => "fresh",
            Isolation::Reuse => "reuse",
        })
    }
}

/// The limits every plugin call runs under.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Wall-clock budget of one call (epoch interruption).
    pub deadline: Duration,
    /// Wall-clock budget of each start-up call: instantiation, the
    /// configuration check, creating a rule. Not cut by the request budget,
    /// and not charged to it.
    pub init_deadline: Duration,
    /// Cap on an instance's linear memories and tables together, in bytes
    /// (a table element counts [`TABLE_ELEMENT_BYTES`]).
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
    /// How evaluations are isolated, unless `isolation_for` names the plugin.
    pub isolation: Isolation,
    /// Plugins isolated otherwise than `isolation`, by name.
    pub isolation_for: std::collections::BTreeMap<String, Isolation>,
    /// Calls of one plugin that may run at once: threads of the plugin
    /// pool it may hold (its share); more wait in its queue.
    pub max_concurrency: usize,
    /// Threads of the plugin pool, the only threads guest code runs on.
    pub pool_threads: usize,
    /// Evaluations of one plugin that may wait for a pool thread; more are
    /// refused at once.
    pub queue: usize,
    /// The plugin threads' `nice` value: above 0 they yield the CPU to the
    /// HTTP workers. NB: deadlines are wall-clock, so a high value turns CPU
    /// contention into plugin deadlines.
    pub pool_nice: i32,
    /// Running time all the plugin calls of one request may spend together
    /// (a bulk request makes one per plugin flag); time waiting for a
    /// plugin thread is not counted. Flags it does not reach
    /// answer an error saying so. `None`: one deadline (see
    /// [`Limits::request_budget`]).
    pub request_budget: Option<Duration>,
    /// A call that takes longer than this share of the deadline is a strike
    /// toward quarantine, as a deadline is.
    pub strike_fraction: f64,
    /// Strikes (deadlines, or calls past the strike fraction) its bucket
    /// holds when a plugin is quarantined (the bucket drains one strike
    /// every `guard::STRIKE_LEAK`).
    pub quarantine_after: u32,
    /// How long a quarantine lasts before the plugin is tried again.
    pub quarantine_for: Duration,
    /// Plugins that can be loaded at once (the pooling allocator is sized
    /// for them: see [`Limits::instances_per_plugin`]).
    pub max_plugins: usize,
    /// CPU time one compile may use (`RLIMIT_CPU` of the child compiler);
    /// a component that needs more is refused.
    pub compile_cpu: Duration,
    /// Address space one compile may use (`RLIMIT_AS` of the child
    /// compiler), in bytes.
    pub compile_memory_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            deadline: DEFAULT_DEADLINE,
            init_deadline: DEFAULT_INIT_DEADLINE,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            wasm_stack_bytes: DEFAULT_WASM_STACK_BYTES,
            max_component_bytes: DEFAULT_MAX_COMPONENT_BYTES,
            max_answer_bytes: DEFAULT_MAX_ANSWER_BYTES,
            max_context_bytes: DEFAULT_MAX_CONTEXT_BYTES,
            max_concurrency: default_max_concurrency(),
            pool_threads: default_pool_threads(),
            queue: DEFAULT_QUEUE,
            pool_nice: DEFAULT_POOL_NICE,
            request_budget: None,
            strike_fraction: DEFAULT_STRIKE_FRACTION,
            quarantine_after: DEFAULT_QUARANTINE_AFTER,
            quarantine_for: DEFAULT_QUARANTINE_FOR,
            isolation: Isolation::default(),
            isolation_for: std::collections::BTreeMap::new(),
            max_plugins: DEFAULT_MAX_PLUGINS,
            compile_cpu: super::compiler::DEFAULT_CPU,
            compile_memory_bytes: super::compiler::DEFAULT_MEMORY_BYTES,
        }
    }
}

impl Limits {
    /// The budget of one request's plugin calls.
    pub fn request_budget(&self) -> Duration {
        self.request_budget.unwrap_or(self.deadline)
    }

    /// How plugin `name`'s evaluations are isolated.
    pub fn isolation_of(&self, name: &str) -> Isolation {
        self.isolation_for
            .get(name)
            .copied()
            .unwrap_or(self.isolation)
    }

    /// How long a call may take before it is a strike toward quarantine.
    pub fn strike_after(&self) -> Duration {
        self.deadline.mul_f64(self.strike_fraction.clamp(0.0, 1.0))
    }

    /// Instances one plugin may have at once: one per plugin thread (the
    /// call in flight with [`Isolation::Fresh`], a warm one with
    /// [`Isolation::Reuse`]) and [`CONFIG_CHECK_INSTANCES`] for checks.
    pub fn instances_per_plugin(&self) -> usize {
        self.pool_threads + CONFIG_CHECK_INSTANCES
    }

    /// Plugins that may be alive at once: those loaded, and the versions
    /// they replaced while flag sets bound to them still finish evaluations.
    pub fn max_live_plugins(&self) -> usize {
        self.max_plugins.saturating_mul(2)
    }

    /// Component instances the pooling allocator holds: every live plugin
    /// can have all its instances at once, so none can take another's slot.
    /// NB: each also takes up to the per-component maxima of core
    /// instances, memories and tables, and the pool holds that many of each
    /// per component instance.
    pub fn pool_component_instances(&self) -> u32 {
        let slots = self
            .max_live_plugins()
            .saturating_mul(self.instances_per_plugin());
        u32::try_from(slots).unwrap_or(u32::MAX)
    }
}

/// What a plugin's `Store` holds.
pub(super) struct HostState {
    /// The context of the evaluation in progress; `None` between calls.
    pub context: Option<EvaluationContext>,
    /// The cap on the instance's memories and tables together, in bytes.
    memory_bytes: usize,
    /// Bytes of every memory and table of the instance so far.
    used_bytes: usize,
    /// Set when the guest asked for more memory than the cap, so the trap that
    /// follows is reported as a memory overrun rather than a bare trap.
    pub memory_exceeded: bool,
    /// Context bytes the call in progress has read.
    pub context_read: usize,
    max_context_bytes: usize,
    /// Set when the call in progress read past the context cap.
    pub context_exceeded: bool,
    /// The plugin's instance slot this store holds, given back with it.
    pub slot: Option<super::slots::Slot>,
    /// The WASI the guest's runtime may call (see `wasi`).
    pub wasi: super::wasi::Guest,
}

impl HostState {
    /// A store's state under `limits`, its WASI's insecure seed `insecure_seed`.
    pub fn new(limits: &Limits, insecure_seed: u128) -> Self {
        Self {
            context: None,
            memory_bytes: limits.memory_bytes,
            used_bytes: 0,
            memory_exceeded: false,
            context_read: 0,
            max_context_bytes: limits.max_context_bytes,
            context_exceeded: false,
            slot: None,
            wasi: super::wasi::Guest::new(insecure_seed),
        }
    }

    /// Starts a call's context budget over, and forgets a refused growth a
    /// guest went on from.
    pub fn begin_call(&mut self) {
        self.context_read = 0;
        self.context_exceeded = false;
        self.memory_exceeded = false;
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

impl HostState {
    /// Bytes of every memory and table of the instance now.
    pub fn used_bytes(&self) -> usize {
        self.used_bytes
    }

    /// Counts `more` bytes of memory or table toward the instance's cap:
    /// whether they fit.
    ///
    /// NB: a growth past the cap is refused (`memory.grow` answers -1, as
    /// the wasm spec has it when memory runs out), not trapped: a runtime
    /// with a garbage collector (JavaScript's) collects and goes on, where a
    /// trap failed an evaluation of a warm instance whose heap had grown to
    /// the cap. A guest that cannot go on traps, and the trap is reported as
    /// a memory overrun (`memory_exceeded`). An instance whose initial
    /// memories and tables do not fit is refused at instantiation.
    fn grow(&mut self, more: usize) -> bool {
        let after = self.used_bytes.saturating_add(more);
        if after > self.memory_bytes {
            self.memory_exceeded = true;
            return false;
        }
        self.used_bytes = after;
        true
    }
}

/// NB: wasmtime asks here for every memory and table an instance creates
/// (`current` 0) and for every growth, so `used_bytes` is the instance's
/// whole footprint: many small memories cannot add up past the cap.
impl ResourceLimiter for HostState {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(self.grow(desired.saturating_sub(current)))
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let elements = desired.saturating_sub(current);
        Ok(self.grow(elements.saturating_mul(TABLE_ELEMENT_BYTES)))
    }

    fn instances(&self) -> usize {
        MAX_CORE_INSTANCES_PER_COMPONENT as usize
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES_PER_COMPONENT as usize
    }

    fn tables(&self) -> usize {
        MAX_TABLES_PER_COMPONENT as usize
    }
}
