//! [`PluginRuntime`]: the engine, built once, that compiles components into
//! [`Plugin`]s checked against the contract.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::artifacts::{self, Origin};
use super::bindings::v0_1;
use super::compiler::{self, Compiler};
use super::limits::{
    CONFIG_CHECK_INSTANCES, HostState, Limits, MAX_CORE_INSTANCES_PER_COMPONENT,
    MAX_MEMORIES_PER_COMPONENT, MAX_TABLES_PER_COMPONENT,
};
use super::pool::{PluginPool, PoolSize};
use super::registry::PluginSet;
use super::slots::{Gate, Slot, Slots};
use super::stats::{self, StatsSnapshot};
use super::{CONTRACT_VERSIONS, PluginError, epoch, guard, instance};

/// Builds engines and compiles plugins. One per process.
pub struct PluginRuntime {
    engine: Engine,
    /// Advances the engine's epoch while guest code runs.
    ticker: Arc<epoch::Ticker>,
    /// The contract's imports (`context`), shared by every plugin's linker.
    linker: Linker<HostState>,
    limits: Arc<Limits>,
    /// Where compiled components are cached, if anywhere.
    artifacts: Option<artifacts::Artifacts>,
    /// Where components are compiled, and under what bound.
    compiler: Compiler,
    /// Compiles running at once (each a process with its own bound).
    compiles: Gate,
    /// The threads plugin evaluations run on.
    pool: PluginPool,
    /// Plugins alive now (loaded, or replaced but still bound to flag sets).
    live: Arc<Slots>,
}

impl PluginRuntime {
    /// An engine configured for `limits`, with its epoch ticker running,
    /// compiling with `compiler`.
    pub fn new(limits: Limits, compiler: Compiler) -> anyhow::Result<Self> {
        let mut config = engine_config(limits.wasm_stack_bytes);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling(&limits)));
        let engine = Engine::new(&config)?;
        let ticker = epoch::Ticker::start(&engine);
        let mut linker = Linker::new(&engine);
        v0_1::flaghost::rules::context::add_to_linker::<_, wasmtime::component::HasSelf<HostState>>(
            &mut linker,
            |state| state,
        )?;
        super::wasi::add_to_linker(&mut linker)?;
        let pool = PluginPool::new(PoolSize {
            threads: limits.pool_threads,
            share: limits.max_concurrency,
            queue: limits.queue,
            nice: limits.pool_nice,
        })?;
        Ok(Self {
            engine,
            ticker,
            linker,
            limits: Arc::new(limits),
            artifacts: None,
            compiler,
            compiles: Gate::new(COMPILE_JOBS),
            pool,
            live: Arc::default(),
        })
    }

    /// Caches compiled components in `dir`, each authenticated with `key`,
    /// so later starts load them without compiling. The directory must be
    /// flaghost's own and writable by no one else (refused otherwise): its
    /// files are loaded as machine code.
    pub fn cache_compiled_in(
        mut self,
        dir: &Path,
        key: crate::signing::SigningKey,
    ) -> std::io::Result<Self> {
        self.artifacts = Some(artifacts::Artifacts::new(dir, &self.engine, key)?);
        Ok(self)
    }

    /// The threads plugin evaluations run on (never the HTTP workers).
    pub fn pool(&self) -> &PluginPool {
        &self.pool
    }

    /// The limits plugin calls run under.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Compiles `bytes` as plugin `name` and checks it against the contract.
    pub fn load(&self, name: &str, bytes: &[u8]) -> Result<Arc<Plugin>, PluginError> {
        let started = std::time::Instant::now();
        let invalid = |reason: String| PluginError::Invalid {
            plugin: name.to_owned(),
            reason,
        };
        check_header(bytes, self.limits.max_component_bytes).map_err(invalid)?;
        let max_live = self.limits.max_live_plugins();
        let live = self.live.take(max_live).ok_or_else(|| PluginError::Slots {
            plugin: name.to_owned(),
            reason: format!(
                "flaghost already holds {max_live} plugins (those loaded, and versions they replaced that flag sets still use), \
                 twice --plugin-max-plugins; remove plugins, or raise it"
            ),
        })?;
        let digest = crate::sha256_hex(bytes);
        let (component, origin) = self.component(name, &digest, bytes)?;

        // NB: anything the component imports beyond the contract and the
        // deterministic WASI (`wasi`) is linked to a function that traps: the
        // sandbox gives no capability, and a rule that never calls them runs.
        let mut linker = self.linker.clone();
        super::wasi::stub_the_rest(&mut linker, &self.engine, &component)
            .map_err(|e| invalid(format!("cannot link: {e:#}")))?;
        let trapped_imports = foreign_imports(&self.engine, &component);
        let contract = |e: wasmtime::Error| PluginError::Contract {
            plugin: name.to_owned(),
            reason: format!("{e:#}"),
        };
        let version =
            contract_version(&self.engine, &component).map_err(|reason| PluginError::Contract {
                plugin: name.to_owned(),
                reason,
            })?;
        let pre = linker.instantiate_pre(&component).map_err(contract)?;
        // NB: the one dispatch point on the contract version. A breaking
        // version adds bindings beside `v0_1` (see `bindings`), an arm here,
        // and a variant where calls are made; plugins built for older
        // versions keep loading through their own arm.
        let pre = match version {
            "0.1.0" => v0_1::TargetingRulePre::new(pre).map_err(contract)?,
            other => {
                return Err(PluginError::Contract {
                    plugin: name.to_owned(),
                    reason: format!("contract {other} is listed as served but has no bindings"),
                });
            }
        };

        Ok(Arc::new(Plugin {
            id: super::next_id(),
            name: name.to_owned(),
            digest,
            size: bytes.len(),
            origin,
            load_time: started.elapsed(),
            loaded_at: std::time::SystemTime::now(),
            stats: stats::Stats::default(),
            guard: guard::Guard::new(
                self.limits.max_concurrency,
                self.limits.strike_after(),
                self.limits.quarantine_after,
                self.limits.quarantine_for,
            ),
            contract_version: version,
            trapped_imports,
            pre,
            isolation: self.limits.isolation_of(name),
            limits: self.limits.clone(),
            engine: self.engine.clone(),
            ticker: self.ticker.clone(),
            instances: Arc::default(),
            checks: Gate::new(CONFIG_CHECK_INSTANCES),
            _live: live,
        }))
    }

    /// `bytes` (whose hex SHA-256 is `digest`) compiled: from its cached
    /// artifact if there is a usable one, else by the compiler, under its
    /// bound (and cached for the next start).
    fn component(
        &self,
        name: &str,
        digest: &str,
        bytes: &[u8],
    ) -> Result<(Component, Origin), PluginError> {
        if let Some(component) = self
            .artifacts
            .as_ref()
            .and_then(|a| a.load(&self.engine, digest))
        {
            return Ok((component, Origin::Precompiled));
        }
        let settings = compiler::Settings {
            wasm_stack_bytes: self.limits.wasm_stack_bytes,
            cpu: self.limits.compile_cpu,
            memory_bytes: self.limits.compile_memory_bytes,
        };
        let artifact = {
            let _turn = self.compiles.enter();
            self.compiler.compile(&self.engine, &settings, bytes)
        }
        .map_err(|e| match e {
            compiler::CompileError::Refused(_) => PluginError::Invalid {
                plugin: name.to_owned(),
                reason: e.to_string(),
            },
            // Not the component's fault: flaghost could not run a compile,
            // or a busy machine held it past its wall-clock bound.
            compiler::CompileError::Process(_) | compiler::CompileError::Wall(_) => {
                PluginError::Compiler {
                    plugin: name.to_owned(),
                    reason: e.to_string(),
                }
            }
            other => PluginError::Compile {
                plugin: name.to_owned(),
                reason: other.to_string(),
            },
        })?;
        // NB: the per-component limits of the pooling allocator are checked
        // here, as the artifact becomes a component of this engine.
        let component =
            compiler::component(&self.engine, &artifact).map_err(|e| PluginError::Invalid {
                plugin: name.to_owned(),
                reason: format!("not a valid component: {e:#}"),
            })?;
        if let Some(artifacts) = &self.artifacts {
            artifacts.store(digest, &artifact);
        }
        Ok((component, Origin::Compiled))
    }

    /// Reads a component file, refusing one over the size limit before
    /// reading it (a 50 MB file is not read into memory to be refused).
    pub fn read_component(&self, name: &str, path: &Path) -> Result<Vec<u8>, PluginError> {
        let read_error = |e: std::io::Error| PluginError::Read {
            plugin: name.to_owned(),
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let size = std::fs::metadata(path).map_err(read_error)?.len();
        let max = self.limits.max_component_bytes;
        if size > max as u64 {
            return Err(PluginError::Invalid {
                plugin: name.to_owned(),
                reason: format!("the file is {size} bytes, over the limit of {max}"),
            });
        }
        std::fs::read(path).map_err(read_error)
    }

    /// Loads every `*.wasm` file in `dir` (plugin name = file stem), the
    /// compiles side by side (up to `COMPILE_JOBS` at once). Returns the
    /// plugins that loaded and the errors of those that did not.
    pub fn load_dir(&self, dir: &Path) -> Result<(PluginSet, Vec<PluginError>), std::io::Error> {
        let mut paths: Vec<_> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "wasm"))
            .collect();
        paths.sort();
        // NB: [`COMPILE_JOBS`] workers take the files in turn: a directory of
        // many files starts no more threads than compiles may run.
        let next = std::sync::Mutex::new(paths.iter().enumerate());
        let work = || {
            let mut done = Vec::new();
            loop {
                let path = match next.lock() {
                    Ok(mut paths) => paths.next(),
                    Err(_) => None,
                };
                let Some((index, path)) = path else {
                    break done;
                };
                let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
                    continue;
                };
                let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.read_component(name, path)
                        .and_then(|bytes| self.load(name, &bytes))
                }))
                .unwrap_or_else(|_| {
                    Err(PluginError::Compiler {
                        plugin: name.to_owned(),
                        reason: "loading it panicked; see the logs".into(),
                    })
                });
                done.push((index, loaded));
            }
        };
        let mut loaded: Vec<(usize, Result<Arc<Plugin>, PluginError>)> =
            std::thread::scope(|scope| {
                let workers: Vec<_> = (1..COMPILE_JOBS.min(paths.len()))
                    .filter_map(|_| {
                        std::thread::Builder::new()
                            .name("flaghost-load".into())
                            .spawn_scoped(scope, work)
                            .ok()
                    })
                    .collect();
                // This thread works too, so a failure to start others only
                // makes loading slower.
                let mut loaded = work();
                for worker in workers {
                    loaded.extend(worker.join().unwrap_or_default());
                }
                loaded
            });
        // Errors in file order, whichever worker met them: what `validate`
        // prints and the logs say does not change from run to run.
        loaded.sort_by_key(|(index, _)| *index);
        let mut plugins = HashMap::new();
        let mut errors = Vec::new();
        for (_, result) in loaded {
            match result {
                Ok(plugin) => {
                    plugins.insert(plugin.name().to_owned(), plugin);
                }
                Err(e) => errors.push(e),
            }
        }
        Ok((PluginSet { plugins }, errors))
    }
}

/// Compiles running at once. Each is a child process with its own CPU and
/// memory bound, so this bounds what compiles take of the machine together
/// (4 × `--plugin-compile-memory-mib` at most) while an expensive compile
/// still leaves room for others: compiles of different plugins do not wait
/// for each other until four run.
const COMPILE_JOBS: usize = 4;

/// The engine settings that decide how components compile, shared by the
/// service's engine and the child compiler's (`compiler::worker`): an
/// artifact made with other settings does not deserialize.
pub(super) fn engine_config(wasm_stack_bytes: usize) -> Config {
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        // NB: flaghost calls plugins synchronously; without this, every call
        // pays for the component-model-async bookkeeping (~0.3 µs measured).
        .concurrency_support(false)
        .max_wasm_stack(wasm_stack_bytes);
    config
}

/// The pooling allocator's sizes: slots reserved up front, so instantiation is
/// a few microseconds (it matters for [`super::Isolation::Fresh`], the
/// default, which instantiates per call).
///
/// No plugin can take another's slots:
///
/// ```text
/// component instances = live plugins (≤ 2 × max plugins: loaded ones and the
///                       versions they replace, see `Limits::max_live_plugins`)
///                     × instances per plugin (plugin threads + config checks)
/// core instances      = component instances × MAX_CORE_INSTANCES_PER_COMPONENT
/// memories            = component instances × MAX_MEMORIES_PER_COMPONENT
/// tables              = component instances × MAX_TABLES_PER_COMPONENT
/// ```
///
/// A component declaring more than the per-component maxima is refused when
/// it is compiled; a plugin past its instances, or a load past the live
/// plugins, is refused naming the plugin ([`PluginError::Slots`]).
fn pooling(limits: &Limits) -> PoolingAllocationConfig {
    let components = limits.pool_component_instances();
    let mut pooling = PoolingAllocationConfig::default();
    pooling
        .total_component_instances(components)
        .total_core_instances(components.saturating_mul(MAX_CORE_INSTANCES_PER_COMPONENT))
        .total_memories(components.saturating_mul(MAX_MEMORIES_PER_COMPONENT))
        .total_tables(components.saturating_mul(MAX_TABLES_PER_COMPONENT))
        .max_core_instances_per_component(MAX_CORE_INSTANCES_PER_COMPONENT)
        .max_memories_per_component(MAX_MEMORIES_PER_COMPONENT)
        .max_tables_per_component(MAX_TABLES_PER_COMPONENT)
        .max_memories_per_module(MAX_MEMORIES_PER_COMPONENT)
        .max_tables_per_module(MAX_TABLES_PER_COMPONENT)
        .max_memory_size(limits.memory_bytes)
        // NB: what makes a fresh instance per evaluation cheap. When a store
        // is dropped, wasmtime finds the pages the guest wrote with the
        // `PAGEMAP_SCAN` ioctl (Linux 6.7+; `Auto` falls back to `madvise`
        // elsewhere) and copies them back from the memory image, up to
        // `KEEP_RESIDENT` bytes, instead of dropping them all and taking a page
        // fault per page on the next instantiation. Measured on the allow-list
        // (`sandbox` bench, `isolation/allow-list`, 2026-12-02): a fresh
        // evaluation 36 µs with the default pooling, 33 µs keeping 4 MiB
        // resident with `memset`, 13 µs with the scan (1, 4 or 32 MiB alike).
        .linear_memory_keep_resident(KEEP_RESIDENT)
        .table_keep_resident(KEEP_RESIDENT)
        .pagemap_scan(if swap_possible() {
            Enabled::No
        } else {
            Enabled::Auto
        });
    pooling
}

/// Whether this process's memory can be swapped out: a swap device is on
/// (`/proc/swaps` lists one) and the cgroup does not forbid swap
/// (`memory.swap.max` is not 0).
///
/// NB: wasmtime 48's pagemap reset matches pages that are written *and
/// present*; a written page the kernel swapped out is neither reset nor
/// dropped, so the next instance in that slot would read the previous
/// caller's data (bytecodealliance/wasmtime#14357, open). Where swap is
/// possible the scan is off: a fresh instance then costs about 36 µs
/// instead of 13, and nothing crosses callers. (Swap turned on after
/// flaghost started is not seen: restart it.)
fn swap_possible() -> bool {
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    if swaps.lines().skip(1).all(|l| l.trim().is_empty()) {
        return false;
    }
    let cgroup_forbids = std::fs::read_to_string("/sys/fs/cgroup/memory.swap.max")
        .is_ok_and(|max| max.trim() == "0");
    !cgroup_forbids
}

/// Whether plugin memories are reset with the pagemap scan (false: where
/// swap is possible, see [`swap_possible`]), for the start-up log.
pub fn pagemap_reset() -> bool {
    !swap_possible()
}

/// Bytes of each memory and table of a dropped instance reset in place
/// (dirty pages only, with the pagemap scan) rather than given back to the
/// kernel; above it, pages are given back. Bounds what an idle slot keeps
/// resident: a Rust rule dirties a few hundred KiB, a Python or JavaScript
/// runtime more.
const KEEP_RESIDENT: usize = 4 << 20;

/// Refuses what is not a component before handing it to the compiler, with a
/// message that says what it is instead.
fn check_header(bytes: &[u8], max_bytes: usize) -> Result<(), String> {
    if bytes.is_empty() {
        return Err("the file is empty".into());
    }
    if bytes.len() > max_bytes {
        return Err(format!(
            "the file is {} bytes, over the limit of {max_bytes}",
            bytes.len()
        ));
    }
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err("not a WebAssembly file (no \\0asm header)".into());
    }
    // Bytes 4..8: version and layer; layer 0 is a core module, 1 a component.
    if bytes[6..8] == [0, 0] {
        return Err(
            "this is a core WebAssembly module, not a component: build it for \
                    wasm32-wasip2, or wrap it with `wasm-tools component new`"
                .into(),
        );
    }
    Ok(())
}

/// The contract version `component` implements, from the `rule` interface
/// it exports (`flaghost:rules/rule@<version>`), if this host serves it.
fn contract_version(engine: &Engine, component: &Component) -> Result<&'static str, String> {
    const RULE: &str = "flaghost:rules/rule@";
    let exported: Vec<String> = component
        .component_type()
        .exports(engine)
        .filter_map(|(name, _)| name.strip_prefix(RULE).map(str::to_owned))
        .collect();
    if exported.is_empty() {
        return Err(format!(
            "it exports no {RULE}<version> interface (expected {RULE}{})",
            CONTRACT_VERSIONS[0]
        ));
    }
    // Newest served first: a component exporting several versions runs on
    // the newest this host knows.
    CONTRACT_VERSIONS
        .iter()
        .find(|served| exported.iter().any(|v| v == *served))
        .copied()
        .ok_or_else(|| {
            format!(
                "it was built for contract version {}; this flaghost serves {}: rebuild it against wit/rules.wit",
                exported.join(", "),
                CONTRACT_VERSIONS.join(", ")
            )
        })
}

/// The component's imports that neither the contract nor flaghost's WASI
/// answers: they trap.
fn foreign_imports(engine: &Engine, component: &Component) -> Vec<String> {
    component
        .component_type()
        .imports(engine)
        .map(|(name, _)| name.to_owned())
        .filter(|name| !name.starts_with("flaghost:rules/context@") && !super::wasi::provides(name))
        .collect()
}

/// One compiled plugin, checked against the contract.
pub struct Plugin {
    /// Process-unique: keys the per-thread instances of this plugin.
    pub(super) id: u64,
    pub(super) name: String,
    pub(super) digest: String,
    pub(super) size: usize,
    pub(super) origin: Origin,
    pub(super) load_time: Duration,
    pub(super) loaded_at: std::time::SystemTime,
    pub(super) stats: stats::Stats,
    pub(super) guard: guard::Guard,
    pub(super) contract_version: &'static str,
    pub(super) trapped_imports: Vec<String>,
    pub(super) pre: v0_1::TargetingRulePre<HostState>,
    /// How its evaluations are isolated (`Limits::isolation_of` its name).
    pub(super) isolation: super::Isolation,
    pub(super) limits: Arc<Limits>,
    pub(super) engine: Engine,
    /// Held around its guest calls, so their deadlines fire.
    pub(super) ticker: Arc<epoch::Ticker>,
    /// Its instances for evaluations now: at most one per plugin thread.
    pub(super) instances: Arc<Slots>,
    /// Its configuration checks at once (each holds an instance): at most
    /// [`CONFIG_CHECK_INSTANCES`]; more wait their turn.
    pub(super) checks: Gate,
    /// Its place among the live plugins, given back when it goes.
    pub(super) _live: Slot,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.name)
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

impl Plugin {
    /// The plugin's name (its file stem).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Hex SHA-256 of the component file.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Size of the component file in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Whether the component was compiled now or loaded precompiled.
    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// How long compiling (or deserializing) and checking it took.
    pub fn load_time(&self) -> Duration {
        self.load_time
    }

    /// When it was loaded.
    pub fn loaded_at(&self) -> std::time::SystemTime {
        self.loaded_at
    }

    /// Its evaluation counters now.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Counts `evaluations` turned away before they reached the plugin
    /// (its lane's queue in the plugin pool was full).
    pub fn count_refused(&self, evaluations: usize) {
        self.stats.refused_by(evaluations as u64);
    }

    /// The contract version the component implements.
    pub fn contract_version(&self) -> &str {
        self.contract_version
    }

    /// How its evaluations are isolated from one another.
    pub fn isolation(&self) -> super::Isolation {
        self.isolation
    }

    /// What a guest's random bytes are drawn from in evaluations of flag
    /// `flag_key`: the same for the same plugin file and flag, so a rule that
    /// draws random bytes answers the same for the same inputs.
    pub(super) fn seed_for(&self, flag_key: &str) -> [u8; 32] {
        use sha2::Digest as _;
        let mut hash = sha2::Sha256::new();
        hash.update(self.digest.as_bytes());
        hash.update([0]);
        hash.update(flag_key.as_bytes());
        hash.finalize().into()
    }

    /// The seed a guest's `wasi:random/insecure-seed` answers: from the
    /// plugin's digest, the same in every instance of it.
    pub(super) fn insecure_seed(&self) -> u128 {
        u128::from_str_radix(self.digest.get(..32).unwrap_or_default(), 16).unwrap_or_default()
    }

    /// Imports outside the contract and flaghost's WASI, each linked to a trap.
    pub fn trapped_imports(&self) -> &[String] {
        &self.trapped_imports
    }

    /// Runs the plugin's configuration check for a flag.
    pub fn check_config(
        &self,
        flag_key: &str,
        variants: &[String],
        config: &str,
    ) -> Result<(), PluginError> {
        instance::check_config(self, flag_key, variants, config)
    }
}
