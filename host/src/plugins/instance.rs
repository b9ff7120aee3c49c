//! Running a plugin call: which instance it runs on, under which limits, and
//! what a failure becomes.
//!
//! In [`Isolation::Fresh`] (the default) every evaluation instantiates the
//! component from its `InstancePre` and creates the flag's rule in it, and
//! the store is dropped after the call: nothing one caller's evaluation left
//! in the guest's memory reaches another caller or another flag. The pooling
//! allocator makes that cheap (see `runtime::pooling`).
//!
//! In [`Isolation::Reuse`] (opt-in, per plugin) each thread keeps one warm
//! instance per plugin, in a thread-local, so evaluations on different
//! plugin threads never share an instance and never take a lock. A warm
//! instance also keeps each rule's parsed configuration (a `targeting`
//! resource) so it is parsed once. An instance whose call trapped is
//! dropped.

use std::cell::RefCell;
use std::sync::{Arc, Weak};
use std::time::Duration;

use wasmtime::component::ResourceAny;
use wasmtime::{Store, Trap};

use super::bindings::v0_1::TargetingRule as Bindings;
use super::limits::HostState;
use super::slots::Slot;
use super::{EPOCH_TICK, Isolation, Plugin, PluginError, PluginRule};
use crate::flags::FastMap as HashMap;
use crate::rules::EvaluationContext;

/// A warm instance drops its rules and starts over past this many: rules of
/// flag sets that were replaced would otherwise accumulate in it.
const MAX_RULES_PER_INSTANCE: usize = 1024;

struct Warm {
    /// The plugin this instance belongs to; dead once the plugin is replaced.
    plugin: Weak<Plugin>,
    store: Store<HostState>,
    bindings: Bindings,
    /// Rule id to the guest's parsed configuration.
    rules: HashMap<u64, ResourceAny>,
}

thread_local! {
    /// This thread's warm instances, by plugin id.
    static WARM: RefCell<HashMap<u64, Warm>> = RefCell::new(HashMap::default());
}

/// How long each guest call of an evaluation may run: its deadline, or less
/// when the request's plugin budget has less left.
#[derive(Debug, Clone, Copy)]
pub(super) struct CallLimit {
    ticks: u64,
    /// The deadline these ticks enforce, for the error when it is reached.
    deadline: Duration,
    /// The request's budget, when it (not the deadline) bounds the call: an
    /// interrupt is then the budget running out, not the plugin's fault.
    budget: Option<Duration>,
}

impl CallLimit {
    /// The plugin's own deadline.
    pub(super) fn deadline(plugin: &Plugin) -> Self {
        Self {
            ticks: ticks(plugin.limits.deadline),
            deadline: plugin.limits.deadline,
            budget: None,
        }
    }

    /// The deadline, or `left` of a request budget of `total` if shorter.
    pub(super) fn within(plugin: &Plugin, left: Duration, total: Duration) -> Self {
        if left >= plugin.limits.deadline {
            return Self::deadline(plugin);
        }
        Self {
            ticks: ticks(left),
            deadline: plugin.limits.deadline,
            budget: Some(total),
        }
    }

    /// The start-up deadline (`Limits::init_deadline`): instantiating and
    /// creating a rule, whatever the request's budget has left, so a runtime
    /// that starts slowly never fails its first evaluation by chance.
    fn start_up(plugin: &Plugin) -> Self {
        Self {
            ticks: ticks(plugin.limits.init_deadline),
            deadline: plugin.limits.init_deadline,
            budget: None,
        }
    }
}

/// What an evaluation cost: its time starting up (instantiating, creating
/// the rule), kept apart from its evaluation's.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Cost {
    /// Time spent instantiating and creating the rule.
    pub start_up: Duration,
}

/// Evaluates `rule` for `context` under the plugin's limits.
pub(super) fn evaluate(
    rule: &PluginRule,
    context: &EvaluationContext,
    limit: CallLimit,
    cost: &mut Cost,
) -> Result<Option<String>, PluginError> {
    let plugin = &rule.plugin;
    // NB: deadlines fire only while the ticker ticks.
    let _ticking = plugin.ticker.hold();
    match plugin.isolation {
        Isolation::Fresh => {
            let started = std::time::Instant::now();
            let (mut store, bindings) = instantiate(plugin)?;
            begin(&store, rule, context);
            store.data_mut().context = Some(context.clone());
            // NB: each guest call gets the whole deadline; instantiating and
            // parsing the configuration must not eat into the evaluation's.
            let result = create(plugin, &mut store, &bindings, rule).and_then(|handle| {
                cost.start_up = started.elapsed();
                store.set_epoch_deadline(limit.ticks);
                call(plugin, &mut store, &bindings, handle, limit)
            });
            finish(plugin, &rule.flag_key, &store, result)
        }
        Isolation::Reuse => WARM.with(|warm| {
            let mut warm = ForgetOnUnwind(warm.borrow_mut(), plugin.id);
            let result = evaluate_warm(&mut warm.0, rule, context, limit, cost);
            if let Err(e) = &result
                && !matches!(e, PluginError::Guest { .. })
            {
                // NB: a trapped instance is never used again.
                warm.0.remove(&plugin.id);
            }
            result
        }),
    }
}

/// This thread's warm instances, borrowed for a call into plugin `.1`: if
/// the call panics (a flaghost bug; the pool catches it and the thread lives
/// on), that plugin's instance is dropped, since its store may be mid-call.
struct ForgetOnUnwind<'a>(std::cell::RefMut<'a, HashMap<u64, Warm>>, u64);

impl Drop for ForgetOnUnwind<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.remove(&self.1);
        }
    }
}

fn evaluate_warm(
    warm: &mut HashMap<u64, Warm>,
    rule: &PluginRule,
    context: &EvaluationContext,
    limit: CallLimit,
    cost: &mut Cost,
) -> Result<Option<String>, PluginError> {
    let plugin = &rule.plugin;
    let started = std::time::Instant::now();
    let reusable = warm
        .get(&plugin.id)
        .is_some_and(|w| w.rules.len() < MAX_RULES_PER_INSTANCE);
    if !reusable {
        // A new instance is rare (first call on a thread, after a trap, after
        // a reload): the moment to drop instances of plugins that are gone,
        // before taking a slot, so a reload never needs twice the pool.
        sweep(warm);
        warm.remove(&plugin.id);
        let (store, bindings) = instantiate(plugin)?;
        warm.insert(
            plugin.id,
            Warm {
                plugin: Arc::downgrade(plugin),
                store,
                bindings,
                rules: HashMap::default(),
            },
        );
    }
    let Some(slot) = warm.get_mut(&plugin.id) else {
        unreachable!("the instance was found or inserted just above");
    };
    begin(&slot.store, rule, context);
    slot.store.data_mut().context = Some(context.clone());
    let handle = match slot.rules.get(&rule.id) {
        Some(handle) => Ok(*handle),
        None => create(plugin, &mut slot.store, &slot.bindings, rule).inspect(|handle| {
            slot.rules.insert(rule.id, *handle);
        }),
    };
    cost.start_up = started.elapsed();
    let result = handle.and_then(|handle| {
        slot.store.set_epoch_deadline(limit.ticks);
        call(plugin, &mut slot.store, &slot.bindings, handle, limit)
    });
    slot.store.data_mut().context = None;
    finish(plugin, &rule.flag_key, &slot.store, result)
}

/// Sets what the guest's WASI answers in an evaluation of `rule` for
/// `context`: random bytes from the rule's seed, the evaluation's time.
fn begin(store: &Store<HostState>, rule: &PluginRule, context: &EvaluationContext) {
    let now = u64::try_from(context.timestamp()).unwrap_or(0);
    store.data().wasi.begin(rule.seed, now);
}

/// `result` of a call on `store`, with what the guest wrote during it: kept
/// in a trap's error (an uncaught exception prints its traceback, then
/// traps), logged otherwise, under the plugin's name.
fn finish<T>(
    plugin: &Plugin,
    flag_key: &str,
    store: &Store<HostState>,
    result: Result<T, PluginError>,
) -> Result<T, PluginError> {
    plugin.stats.instance_bytes(store.data().used_bytes());
    let Some(written) = store.data().wasi.take_output() else {
        return result;
    };
    match result {
        Err(PluginError::Trap {
            plugin,
            reason,
            code,
            output: None,
        }) => Err(PluginError::Trap {
            plugin,
            reason,
            code,
            output: Some(written),
        }),
        result => {
            if plugin.stats.may_log() {
                // NB: `?`: the plugin's text escaped, so its newlines cannot
                // forge log lines of their own.
                tracing::info!(plugin = %plugin.name, flag = %flag_key, output = ?written,
                               "plugin wrote to stdout or stderr");
            }
            result
        }
    }
}

/// Drops warm instances of plugins that no longer exist (replaced or removed).
fn sweep(warm: &mut HashMap<u64, Warm>) {
    warm.retain(|_, w| w.plugin.strong_count() > 0);
}

/// Drops this thread's warm instances of plugins that no longer exist: an
/// idle pool thread gives their pool slots back. Whether any is left.
pub(super) fn sweep_this_thread() -> bool {
    WARM.with(|warm| {
        let mut warm = warm.borrow_mut();
        sweep(&mut warm);
        !warm.is_empty()
    })
}

/// Runs the plugin's configuration check on a fresh instance.
pub(super) fn check_config(
    plugin: &Plugin,
    flag_key: &str,
    variants: &[String],
    config: &str,
) -> Result<(), PluginError> {
    // NB: a check that ran out of wall-clock time having used little CPU
    // was starved by the machine (a build beside it, busy workers), not
    // slow of itself: refusing the flag file for it would make an
    // environment unavailable by chance. It runs again, a few times at
    // most; a check that spins is refused at the first deadline.
    const STARVED_RETRIES: u32 = 3;
    let mut attempt = 0;
    loop {
        let (result, cpu) = check_config_once(plugin, flag_key, variants, config);
        let starved = matches!(result, Err(PluginError::Deadline { .. }))
            && cpu < plugin.limits.init_deadline / 2;
        if !starved || attempt == STARVED_RETRIES {
            return result;
        }
        attempt += 1;
        tracing::info!(
            plugin = %plugin.name,
            flag = flag_key,
            cpu_ms = cpu.as_secs_f64() * 1e3,
            "configuration check ran out of time without using it (the machine is busy); checking again"
        );
    }
}

/// One configuration check, and the CPU time it used (instantiating and
/// the guest call, which may run on another thread: see [`off_runtime`]).
fn check_config_once(
    plugin: &Plugin,
    flag_key: &str,
    variants: &[String],
    config: &str,
) -> (Result<(), PluginError>, Duration) {
    // NB: a check is the plugin's first call: it runs under the start-up
    // deadline, as instantiating does.
    let limit = CallLimit::start_up(plugin);
    // NB: checks wait for a turn rather than fail: see `Gate`.
    let _turn = plugin.checks.enter();
    let _ticking = plugin.ticker.hold();
    let cpu_at_start = super::rule::thread_cpu_time();
    let instance = instantiate_with(plugin, None);
    let instantiating = super::rule::thread_cpu_time().saturating_sub(cpu_at_start);
    let (mut store, bindings) = match instance {
        Ok(instance) => instance,
        Err(e) => return (Err(e), instantiating),
    };
    store.set_epoch_deadline(limit.ticks);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    store.data().wasi.begin(plugin.seed_for(flag_key), now);
    let (answer, cpu) = off_runtime(|| {
        let cpu_at_start = super::rule::thread_cpu_time();
        let answer = bindings
            .flaghost_rules_rule()
            .call_check_config(&mut store, flag_key, variants, config);
        (
            answer,
            super::rule::thread_cpu_time().saturating_sub(cpu_at_start),
        )
    });
    let answer = answer
        .map_err(|e| classify(plugin, &store, e, limit))
        .and_then(|answer| answer.map_err(|message| guest_error(plugin, message, "")));
    (
        finish(plugin, flag_key, &store, answer),
        instantiating + cpu,
    )
}

/// Runs `f`, a guest call, off any tokio runtime: `wasmtime-wasi`'s
/// synchronous streams block on a runtime, which panics on one of its
/// workers. Evaluations run on the plugin pool (plain threads); a
/// configuration check may run wherever a flag file is loaded, so there it
/// gets a thread of its own when a runtime is current.
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("flaghost-check".into())
            .spawn_scoped(scope, f)
            .map(|thread| thread.join())
    })
    .unwrap_or_else(|e| panic!("cannot start a thread for a configuration check: {e}"))
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// `d` in epoch ticks, at least one.
fn ticks(d: Duration) -> u64 {
    let ticks = d.as_micros() / EPOCH_TICK.as_micros().max(1);
    u64::try_from(ticks).unwrap_or(u64::MAX).max(1)
}

/// A new instance of `plugin` for evaluations: one of its slots, up to one
/// per plugin thread.
fn instantiate(plugin: &Plugin) -> Result<(Store<HostState>, Bindings), PluginError> {
    let max = plugin.limits.pool_threads;
    let slot = plugin
        .instances
        .take(max)
        .ok_or_else(|| PluginError::Slots {
            plugin: plugin.name.clone(),
            reason: format!(
                "all {max} of its instances for evaluations are in use (one per plugin thread)"
            ),
        })?;
    instantiate_with(plugin, Some(slot))
}

/// A new instance holding `slot` (evaluations), or none: a configuration
/// check, whose instances the plugin's check gate bounds.
fn instantiate_with(
    plugin: &Plugin,
    slot: Option<Slot>,
) -> Result<(Store<HostState>, Bindings), PluginError> {
    let limit = CallLimit::start_up(plugin);
    let mut state = HostState::new(&plugin.limits, plugin.insecure_seed());
    state.slot = slot;
    let mut store = Store::new(&plugin.engine, state);
    store.limiter(|state| state);
    store.set_epoch_deadline(limit.ticks);
    let bindings = plugin
        .pre
        .instantiate(&mut store)
        .map_err(|e| classify(plugin, &store, e, limit))?;
    Ok((store, bindings))
}

/// Creates the guest's `targeting` resource for `rule` (parses its
/// configuration), under the start-up deadline.
fn create(
    plugin: &Plugin,
    store: &mut Store<HostState>,
    bindings: &Bindings,
    rule: &PluginRule,
) -> Result<ResourceAny, PluginError> {
    let limit = CallLimit::start_up(plugin);
    store.set_epoch_deadline(limit.ticks);
    let answer = bindings
        .flaghost_rules_rule()
        .targeting()
        .call_create(&mut *store, &rule.flag_key, &rule.variants, &rule.config)
        .map_err(|e| classify(plugin, store, e, limit))?;
    answer.map_err(|message| guest_error(plugin, message, "refused its configuration: "))
}

/// Calls `evaluate` on a rule resource.
fn call(
    plugin: &Plugin,
    store: &mut Store<HostState>,
    bindings: &Bindings,
    handle: ResourceAny,
    limit: CallLimit,
) -> Result<Option<String>, PluginError> {
    store.data_mut().begin_call();
    let answer = bindings
        .flaghost_rules_rule()
        .targeting()
        .call_evaluate(&mut *store, handle)
        .map_err(|e| classify(plugin, store, e, limit))?;
    if store.data().context_exceeded {
        return Err(PluginError::Input {
            plugin: plugin.name.clone(),
            cap: plugin.limits.max_context_bytes,
        });
    }
    match answer {
        Ok(Some(variant)) if variant.len() > plugin.limits.max_answer_bytes => {
            Err(PluginError::Output {
                plugin: plugin.name.clone(),
                bytes: variant.len(),
                cap: plugin.limits.max_answer_bytes,
            })
        }
        Ok(variant) => Ok(variant),
        Err(message) => Err(guest_error(plugin, message, "")),
    }
}

/// The guest's own error, `context` before its message, or an answer-cap
/// error when the message is over the cap: the cap holds for every text a
/// plugin returns (`create`, `check-config`, `evaluate`), wherever it goes.
fn guest_error(plugin: &Plugin, message: String, context: &str) -> PluginError {
    let cap = plugin.limits.max_answer_bytes;
    if message.len() > cap {
        return PluginError::Output {
            plugin: plugin.name.clone(),
            bytes: message.len(),
            cap,
        };
    }
    PluginError::Guest {
        plugin: plugin.name.clone(),
        message: format!("{context}{message}"),
    }
}

/// What a failed call means, from the error and what the store saw.
fn classify(
    plugin: &Plugin,
    store: &Store<HostState>,
    err: wasmtime::Error,
    limit: CallLimit,
) -> PluginError {
    let name = plugin.name.clone();
    if store.data().memory_exceeded {
        return PluginError::Memory {
            plugin: name,
            cap: plugin.limits.memory_bytes,
        };
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => match limit.budget {
            Some(budget) => PluginError::BudgetSpent {
                plugin: name,
                budget,
            },
            None => PluginError::Deadline {
                plugin: name,
                deadline: limit.deadline,
            },
        },
        Some(trap) => PluginError::Trap {
            plugin: name,
            reason: trap.to_string(),
            code: Some(*trap),
            output: None,
        },
        // Not a wasm trap: a trapping import stub, a failed instantiation.
        None => PluginError::Trap {
            plugin: name,
            reason: err.root_cause().to_string(),
            code: None,
            output: None,
        },
    }
}
