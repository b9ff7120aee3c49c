//! The plugin runtime: targeting rules as sandboxed WebAssembly components.
//!
//! - [`PluginRuntime`] owns the wasmtime engine (built once: component model,
//!   epoch interruption, `concurrency_support(false)`) and the ticker that
//!   advances its epoch, and compiles components into [`Plugin`]s.
//! - A [`Plugin`] is one compiled component checked against the contract, with
//!   an `InstancePre` ready to instantiate.
//! - A [`PluginSet`] is the plugins of one plugin directory; it binds flags'
//!   `{"plugin": [name, config]}` rules to plugins ([`crate::flags::RuleBinder`]).
//! - A [`PluginRule`] is one flag's bound rule; evaluating it runs the plugin
//!   under the limits ([`limits`]), on an instance reused per worker thread or
//!   fresh per call ([`Isolation`]).
//!
//! Every failure of a plugin call becomes a [`PluginError`] at this boundary;
//! the evaluator turns it into an ERROR resolution. A call never panics the
//! process and never outlives its deadline.

mod artifacts;
mod bindings;
mod guard;
mod host;
mod instance;
pub mod limits;
mod stats;

pub use artifacts::Origin;
pub use limits::{Isolation, Limits};
pub use stats::{ErrorCounts, Percentiles, StatsSnapshot};

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value as Json;
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::evaluation::{EvaluationContext, RuleError, TargetingRule};
use crate::flags::RuleBinder;
use bindings::v0_1;
use limits::HostState;

/// The contract versions this host serves, newest first.
pub const CONTRACT_VERSIONS: &[&str] = &["0.1.0"];

/// How often the engine's epoch advances: the granularity of deadlines.
const EPOCH_TICK: Duration = Duration::from_millis(1);

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
    #[error("plugin {plugin} trapped: {reason}")]
    Trap {
        /// The plugin.
        plugin: String,
        /// The trap, as wasmtime describes it.
        reason: String,
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
    /// The plugin is quarantined after repeated deadlines; not run.
    #[error(
        "plugin {plugin} is quarantined after repeated deadlines; tried again in {remaining:?}"
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
    /// The guest answered an error of its own.
    #[error("plugin {plugin} failed: {message}")]
    Guest {
        /// The plugin.
        plugin: String,
        /// The guest's message.
        message: String,
    },
}

/// Whether `name` can name a plugin: it is the stem of its file, so up to
/// 64 letters, digits, `_`, `-` and `.`, not starting with `.`.
pub fn valid_plugin_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Builds engines and compiles plugins. One per process.
pub struct PluginRuntime {
    engine: Engine,
    /// The contract's imports (`context`), shared by every plugin's linker.
    linker: Linker<HostState>,
    limits: Arc<Limits>,
    /// Where compiled components are cached, if anywhere.
    artifacts: Option<artifacts::Artifacts>,
}

impl PluginRuntime {
    /// An engine configured for `limits`, with its epoch ticker running.
    pub fn new(limits: Limits) -> anyhow::Result<Self> {
        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            // NB: flaghost calls plugins synchronously; without this, every call
            // pays for the component-model-async bookkeeping (~0.3 µs measured).
            .concurrency_support(false)
            .max_wasm_stack(limits.wasm_stack_bytes)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pooling(&limits)));
        let engine = Engine::new(&config)?;
        spawn_epoch_ticker(&engine);
        let mut linker = Linker::new(&engine);
        v0_1::flaghost::rules::context::add_to_linker::<_, wasmtime::component::HasSelf<HostState>>(
            &mut linker,
            |state| state,
        )?;
        Ok(Self {
            engine,
            linker,
            limits: Arc::new(limits),
            artifacts: None,
        })
    }

    /// Caches compiled components in `dir`, so later starts load them without
    /// compiling. The directory must be writable by flaghost only: its files
    /// are loaded as machine code.
    pub fn cache_compiled_in(mut self, dir: &Path) -> std::io::Result<Self> {
        self.artifacts = Some(artifacts::Artifacts::new(dir, &self.engine)?);
        Ok(self)
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
        let digest = crate::sha256_hex(bytes);
        let (component, origin) = match &self.artifacts {
            Some(artifacts) => artifacts.component(&self.engine, &digest, bytes),
            None => Component::from_binary(&self.engine, bytes).map(|c| (c, Origin::Compiled)),
        }
        .map_err(|e| invalid(format!("not a valid component: {e:#}")))?;

        // NB: anything the component imports beyond the contract (a
        // wasm32-wasip2 build imports WASI) is linked to a function that traps:
        // the sandbox gives no capability, and a rule that never calls them runs.
        let mut linker = self.linker.clone();
        linker
            .define_unknown_imports_as_traps(&component)
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
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            name: name.to_owned(),
            digest,
            size: bytes.len(),
            origin,
            load_time: started.elapsed(),
            loaded_at: std::time::SystemTime::now(),
            stats: stats::Stats::default(),
            guard: guard::Guard::new(
                self.limits.max_concurrency,
                self.limits.quarantine_after,
                self.limits.quarantine_for,
            ),
            contract_version: version,
            trapped_imports,
            pre,
            limits: self.limits.clone(),
            engine: self.engine.clone(),
        }))
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

    /// Loads every `*.wasm` file in `dir` (plugin name = file stem). Returns
    /// the plugins that loaded and the errors of those that did not.
    pub fn load_dir(&self, dir: &Path) -> Result<(PluginSet, Vec<PluginError>), std::io::Error> {
        let mut paths: Vec<_> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "wasm"))
            .collect();
        paths.sort();
        let mut plugins = HashMap::new();
        let mut errors = Vec::new();
        for path in paths {
            let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            let loaded = self
                .read_component(name, &path)
                .and_then(|bytes| self.load(name, &bytes));
            match loaded {
                Ok(plugin) => {
                    plugins.insert(name.to_owned(), plugin);
                }
                Err(e) => errors.push(e),
            }
        }
        Ok((PluginSet { plugins }, errors))
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The pooling allocator's sizes: slots reserved up front, so instantiation is
/// a few microseconds (it matters for [`Isolation::Fresh`], which instantiates
/// per call). A `wasm32-wasip2` component holds a handful of core instances and
/// two memories; the ratios leave room for that.
fn pooling(limits: &Limits) -> PoolingAllocationConfig {
    let components = limits.max_instances;
    let mut pooling = PoolingAllocationConfig::default();
    pooling
        .total_component_instances(components)
        .total_core_instances(components.saturating_mul(8))
        .total_memories(components.saturating_mul(2))
        .total_tables(components.saturating_mul(4))
        .max_memory_size(limits.memory_bytes);
    pooling
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until the engine is dropped.
fn spawn_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    let spawned = std::thread::Builder::new()
        .name("flaghost-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        });
    if let Err(e) = spawned {
        // Without the ticker no deadline fires; refuse to run plugins rather
        // than run them unbounded.
        panic!("cannot start the epoch ticker thread: {e}");
    }
}

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

/// The component's imports that are not part of the contract: they trap.
fn foreign_imports(engine: &Engine, component: &Component) -> Vec<String> {
    component
        .component_type()
        .imports(engine)
        .map(|(name, _)| name.to_owned())
        .filter(|name| !name.starts_with("flaghost:rules/context@"))
        .collect()
}

/// One compiled plugin, checked against the contract.
pub struct Plugin {
    /// Process-unique: keys the per-thread instances of this plugin.
    id: u64,
    name: String,
    digest: String,
    size: usize,
    origin: Origin,
    load_time: Duration,
    loaded_at: std::time::SystemTime,
    stats: stats::Stats,
    guard: guard::Guard,
    contract_version: &'static str,
    trapped_imports: Vec<String>,
    pre: v0_1::TargetingRulePre<HostState>,
    limits: Arc<Limits>,
    engine: Engine,
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

    /// The contract version the component implements.
    pub fn contract_version(&self) -> &str {
        self.contract_version
    }

    /// Imports outside the contract, each linked to a trap.
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

/// The plugins of one plugin directory, by name.
#[derive(Default, Clone)]
pub struct PluginSet {
    plugins: HashMap<String, Arc<Plugin>>,
}

impl PluginSet {
    /// The plugin called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Plugin>> {
        self.plugins.get(name)
    }

    /// Every plugin, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Plugin>> {
        let mut all: Vec<_> = self.plugins.values().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all.into_iter()
    }

    /// How many plugins there are.
    pub fn len(&self) -> usize {
        self.plugins.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }

    /// Adds (or replaces) a plugin.
    pub fn insert(&mut self, plugin: Arc<Plugin>) {
        self.plugins.insert(plugin.name.clone(), plugin);
    }

    /// Removes a plugin.
    pub fn remove(&mut self, name: &str) -> Option<Arc<Plugin>> {
        self.plugins.remove(name)
    }
}

/// The plugins in force, shared by the flag store, the shared cache and the
/// admin API, and replaced whole when the plugin directory changes. A flag
/// set already built keeps the plugins it was bound to: evaluations in
/// flight finish on the version they started with.
#[derive(Clone, Default)]
pub struct PluginRegistry {
    current: Arc<arc_swap::ArcSwap<PluginSet>>,
    generation: Arc<AtomicU64>,
    report: Arc<std::sync::Mutex<ReloadReport>>,
}

/// What the last looks at the plugin directory could not apply, for the
/// admin listing.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReloadReport {
    /// Files refused (they do not load, or flag files would not load with
    /// them), with why; the previous version keeps serving.
    pub refused: Vec<RefusedFile>,
    /// Plugins whose file was removed while flags use them: the loaded copy
    /// keeps serving.
    pub kept_after_removal: Vec<String>,
}

/// A plugin file that was refused.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RefusedFile {
    /// The plugin.
    pub name: String,
    /// The file's SHA-256.
    pub digest: String,
    /// Why.
    pub reason: String,
}

impl PluginRegistry {
    /// A registry holding `set`.
    pub fn new(set: PluginSet) -> Self {
        Self {
            current: Arc::new(arc_swap::ArcSwap::from_pointee(set)),
            generation: Arc::new(AtomicU64::new(0)),
            report: Arc::default(),
        }
    }

    /// What the directory watcher could not apply.
    pub fn report(&self) -> ReloadReport {
        self.report
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the watcher's report.
    pub fn set_report(&self, report: ReloadReport) {
        *self
            .report
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = report;
    }

    /// The plugins now.
    pub fn current(&self) -> Arc<PluginSet> {
        self.current.load_full()
    }

    /// Counts replacements: flag files parsed under another generation are
    /// parsed (and their plugin configurations checked) again.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Puts `set` in force.
    pub fn replace(&self, set: PluginSet) {
        self.current.store(Arc::new(set));
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

impl From<PluginSet> for PluginRegistry {
    fn from(set: PluginSet) -> Self {
        Self::new(set)
    }
}

impl RuleBinder for PluginRegistry {
    fn bind(
        &self,
        flag_key: &str,
        variants: &[String],
        plugin: &str,
        config: &Json,
    ) -> Result<Arc<dyn TargetingRule>, String> {
        self.current.load().bind(flag_key, variants, plugin, config)
    }
}

impl RuleBinder for PluginSet {
    fn bind(
        &self,
        flag_key: &str,
        variants: &[String],
        plugin: &str,
        config: &Json,
    ) -> Result<Arc<dyn TargetingRule>, String> {
        let Some(plugin) = self.plugins.get(plugin) else {
            let mut loaded: Vec<&str> = self.plugins.keys().map(String::as_str).collect();
            loaded.sort();
            return Err(format!(
                "plugin {plugin:?} is not loaded (loaded: {})",
                if loaded.is_empty() {
                    "none".into()
                } else {
                    loaded.join(", ")
                }
            ));
        };
        let config = config.to_string();
        plugin
            .check_config(flag_key, variants, &config)
            .map_err(|e| match e {
                PluginError::Guest { plugin, message } => {
                    format!("plugin {plugin} refused the configuration: {message}")
                }
                other => other.to_string(),
            })?;
        Ok(Arc::new(PluginRule {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            plugin: plugin.clone(),
            flag_key: flag_key.to_owned(),
            variants: variants.to_vec(),
            config,
        }))
    }
}

/// One flag's rule, bound to a plugin with its configuration.
pub struct PluginRule {
    /// Process-unique: keys the guest's parsed configuration in each instance.
    id: u64,
    plugin: Arc<Plugin>,
    flag_key: String,
    variants: Vec<String>,
    /// The configuration as JSON text, serialised once at bind time.
    config: String,
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
