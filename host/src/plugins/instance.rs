//! Running a plugin call: which instance it runs on, under which limits, and
//! what a failure becomes.
//!
//! In [`Isolation::Reuse`] each thread keeps one warm instance per plugin, in a
//! thread-local, so evaluations on different tokio workers never share an
//! instance and never take a lock. A warm instance also keeps each rule's
//! parsed configuration (a `targeting` resource) so it is parsed once. An
//! instance whose call trapped is dropped: its state cannot leak into a later
//! evaluation. In [`Isolation::Fresh`] every call gets a new instance.

use std::cell::RefCell;
use std::sync::{Arc, Weak};

use wasmtime::component::ResourceAny;
use wasmtime::{Store, Trap};

use super::bindings::v0_1::TargetingRule as Bindings;
use super::limits::HostState;
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

/// Evaluates `rule` for `context` under the plugin's limits.
pub(super) fn evaluate(
    rule: &PluginRule,
    context: &EvaluationContext,
) -> Result<Option<String>, PluginError> {
    let plugin = &rule.plugin;
    match plugin.limits.isolation {
        Isolation::Fresh => {
            let (mut store, bindings) = instantiate(plugin)?;
            store.data_mut().context = Some(context.clone());
            // NB: each guest call gets the whole deadline; instantiating and
            // parsing the configuration must not eat into the evaluation's.
            store.set_epoch_deadline(deadline_ticks(plugin));
            let handle = create(plugin, &mut store, &bindings, rule)?;
            store.set_epoch_deadline(deadline_ticks(plugin));
            call(plugin, &mut store, &bindings, handle)
        }
        Isolation::Reuse => WARM.with(|warm| {
            let mut warm = warm.borrow_mut();
            let result = evaluate_warm(&mut warm, rule, context);
            if let Err(e) = &result
                && !matches!(e, PluginError::Guest { .. })
            {
                // NB: a trapped instance is never used again.
                warm.remove(&plugin.id);
            }
            result
        }),
    }
}

fn evaluate_warm(
    warm: &mut HashMap<u64, Warm>,
    rule: &PluginRule,
    context: &EvaluationContext,
) -> Result<Option<String>, PluginError> {
    let plugin = &rule.plugin;
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
    slot.store.set_epoch_deadline(deadline_ticks(plugin));
    slot.store.data_mut().context = Some(context.clone());
    let handle = match slot.rules.get(&rule.id) {
        Some(handle) => *handle,
        None => {
            let handle = create(plugin, &mut slot.store, &slot.bindings, rule)?;
            slot.rules.insert(rule.id, handle);
            slot.store.set_epoch_deadline(deadline_ticks(plugin));
            handle
        }
    };
    let result = call(plugin, &mut slot.store, &slot.bindings, handle);
    slot.store.data_mut().context = None;
    result
}

/// Drops warm instances of plugins that no longer exist (replaced or removed).
fn sweep(warm: &mut HashMap<u64, Warm>) {
    warm.retain(|_, w| w.plugin.strong_count() > 0);
}

/// Runs the plugin's configuration check on a fresh instance.
pub(super) fn check_config(
    plugin: &Plugin,
    flag_key: &str,
    variants: &[String],
    config: &str,
) -> Result<(), PluginError> {
    let (mut store, bindings) = instantiate(plugin)?;
    let answer = bindings
        .flaghost_rules_rule()
        .call_check_config(&mut store, flag_key, variants, config)
        .map_err(|e| classify(plugin, &store, e))?;
    answer.map_err(|message| PluginError::Guest {
        plugin: plugin.name.clone(),
        message,
    })
}

fn deadline_ticks(plugin: &Plugin) -> u64 {
    let ticks = plugin.limits.deadline.as_micros() / EPOCH_TICK.as_micros().max(1);
    u64::try_from(ticks).unwrap_or(u64::MAX).max(1)
}

fn instantiate(plugin: &Plugin) -> Result<(Store<HostState>, Bindings), PluginError> {
    let mut store = Store::new(&plugin.engine, HostState::new(&plugin.limits));
    store.limiter(|state| state);
    store.set_epoch_deadline(deadline_ticks(plugin));
    let bindings = plugin
        .pre
        .instantiate(&mut store)
        .map_err(|e| classify(plugin, &store, e))?;
    Ok((store, bindings))
}

/// Creates the guest's `targeting` resource for `rule` (parses its configuration).
fn create(
    plugin: &Plugin,
    store: &mut Store<HostState>,
    bindings: &Bindings,
    rule: &PluginRule,
) -> Result<ResourceAny, PluginError> {
    let answer = bindings
        .flaghost_rules_rule()
        .targeting()
        .call_create(&mut *store, &rule.flag_key, &rule.variants, &rule.config)
        .map_err(|e| classify(plugin, store, e))?;
    answer.map_err(|message| PluginError::Guest {
        plugin: plugin.name.clone(),
        message: format!("refused its configuration: {message}"),
    })
}

/// Calls `evaluate` on a rule resource.
fn call(
    plugin: &Plugin,
    store: &mut Store<HostState>,
    bindings: &Bindings,
    handle: ResourceAny,
) -> Result<Option<String>, PluginError> {
    store.data_mut().begin_call();
    let answer = bindings
        .flaghost_rules_rule()
        .targeting()
        .call_evaluate(&mut *store, handle)
        .map_err(|e| classify(plugin, store, e))?;
    if store.data().context_exceeded {
        return Err(PluginError::Input {
            plugin: plugin.name.clone(),
            cap: plugin.limits.max_context_bytes,
        });
    }
    let bytes = match &answer {
        Ok(variant) => variant.as_ref().map_or(0, String::len),
        Err(message) => message.len(),
    };
    if bytes > plugin.limits.max_answer_bytes {
        return Err(PluginError::Output {
            plugin: plugin.name.clone(),
            bytes,
            cap: plugin.limits.max_answer_bytes,
        });
    }
    answer.map_err(|message| PluginError::Guest {
        plugin: plugin.name.clone(),
        message,
    })
}

/// What a failed call means, from the error and what the store saw.
fn classify(plugin: &Plugin, store: &Store<HostState>, err: wasmtime::Error) -> PluginError {
    let name = plugin.name.clone();
    if store.data().memory_exceeded {
        return PluginError::Memory {
            plugin: name,
            cap: plugin.limits.memory_bytes,
        };
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => PluginError::Deadline {
            plugin: name,
            deadline: plugin.limits.deadline,
        },
        Some(trap) => PluginError::Trap {
            plugin: name,
            reason: trap.to_string(),
        },
        // Not a wasm trap: a trapping import stub, a failed instantiation.
        None => PluginError::Trap {
            plugin: name,
            reason: err.root_cause().to_string(),
        },
    }
}
