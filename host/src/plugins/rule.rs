//! [`PluginRule`]: one flag's rule bound to a plugin, and what running it
//! goes through (the guard, the counters).

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::instance::{self, CallLimit};
use super::stats::RecentError;
use super::{Plugin, PluginError};
use crate::rules::{EvaluationContext, RuleError, TargetingRule};

/// The budget of the plugin calls one request makes: the time they may
/// spend running, together. Clones share it, so the jobs a bulk request
/// hands to several plugins' lanes draw on one budget (calls running at the
/// same moment on different threads each get what was left when they
/// started). Time a request waits for a plugin thread is not counted (queues
/// are bounded), so a single call always gets its whole deadline, and a
/// deadline is the plugin's fault, not the request's.
#[derive(Debug, Clone)]
pub struct Budget {
    /// Nanoseconds left.
    left: Arc<AtomicU64>,
    total: Duration,
    /// This thread's CPU time when the job running under the budget began
    /// (set by [`Budget::run`]).
    cpu_at_start: Duration,
}

impl Budget {
    /// A budget of `total`.
    pub fn new(total: Duration) -> Self {
        let nanos = u64::try_from(total.as_nanos()).unwrap_or(u64::MAX);
        Self {
            left: Arc::new(AtomicU64::new(nanos)),
            total,
            cpu_at_start: Duration::ZERO,
        }
    }

    fn left(&self) -> Duration {
        Duration::from_nanos(self.left.load(Ordering::Acquire))
    }

    fn spend(&self, spent: Duration) {
        let spent = u64::try_from(spent.as_nanos()).unwrap_or(u64::MAX);
        // NB: never fails: the closure always answers.
        let _ = self
            .left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                Some(left.saturating_sub(spent))
            });
    }

    /// Runs `f` with every plugin call in it bounded by this budget (on this
    /// thread): a call gets what is left of it when less than its deadline,
    /// and none once it is spent.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> T {
        struct Restore(Option<Budget>);
        impl Drop for Restore {
            fn drop(&mut self) {
                BUDGET.with_borrow_mut(|b| *b = self.0.take());
            }
        }
        let this = Budget {
            cpu_at_start: thread_cpu_time(),
            ..self.clone()
        };
        let _restore = Restore(BUDGET.with_borrow_mut(|b| b.replace(this)));
        f()
    }
}

thread_local! {
    /// The budget of the request whose evaluations run on this thread now.
    static BUDGET: RefCell<Option<Budget>> = const { RefCell::new(None) };
}

/// One flag's rule, bound to a plugin with its configuration.
pub struct PluginRule {
    /// Process-unique: keys the guest's parsed configuration in each instance.
    pub(super) id: u64,
    /// What the guest's random bytes are drawn from in each evaluation
    /// ([`Plugin::seed_for`] the flag).
    pub(super) seed: [u8; 32],
    pub(super) plugin: Arc<Plugin>,
    pub(super) flag_key: String,
    pub(super) variants: Vec<String>,
    /// The configuration as JSON text, serialised once at bind time.
    pub(super) config: String,
}

impl PluginRule {
    /// Runs the rule for `context`.
    pub fn run(&self, context: &EvaluationContext) -> Result<Option<String>, PluginError> {
        let plugin = &self.plugin;
        // NB: only with traces exported: no span otherwise.
        let _span = crate::telemetry::traces_on().then(|| {
            tracing::info_span!("plugin call", plugin = %plugin.name, otel.kind = "internal")
                .entered()
        });
        let budget = BUDGET.with_borrow(Clone::clone);
        let limit = match &budget {
            None => CallLimit::deadline(plugin),
            Some(budget) if budget.left().is_zero() => {
                plugin.stats.refused();
                return Err(PluginError::NotReached {
                    plugin: plugin.name.clone(),
                    budget: budget.total,
                });
            }
            Some(budget) => CallLimit::within(plugin, budget.left(), budget.total),
        };
        let permit = match plugin.guard.enter(&plugin.name) {
            Ok(permit) => permit,
            Err(refused) => {
                plugin.stats.refused();
                return Err(refused);
            }
        };
        let started = std::time::Instant::now();
        let mut cost = instance::Cost::default();
        let result = instance::evaluate(self, context, limit, &mut cost);
        drop(permit);
        let elapsed = started.elapsed();
        // NB: start-up has its own deadline and is not the request's to pay
        // (see `Limits::init_deadline`): only the evaluation is charged.
        let evaluating = elapsed.saturating_sub(cost.start_up);
        if let Some(budget) = &budget {
            budget.spend(evaluating);
        }
        plugin.stats.record(elapsed, &result);
        // NB: a call slow on the wall clock is judged on CPU: a call the
        // machine starved (preempted by busy HTTP workers, a build beside
        // it) is slow through no fault of the plugin's. The CPU its job has
        // used on this thread bounds the call's own, and costs one clock
        // read per job, and one more per slow call only.
        let judged = match budget {
            Some(budget) if evaluating > plugin.guard.strike_after() => {
                evaluating.min(thread_cpu_time().saturating_sub(budget.cpu_at_start))
            }
            _ => evaluating,
        };
        // A start-up is judged against its own deadline: one past its strike
        // share of the start-up deadline is a strike as a slow evaluation is
        // (so a rule cannot spin in `create`, which fresh isolation runs for
        // every evaluation, just under the start-up deadline).
        let start_up = cost.start_up.mul_f64(
            plugin.limits.deadline.as_secs_f64()
                / plugin.limits.init_deadline.as_secs_f64().max(1e-9),
        );
        if plugin
            .guard
            .record(&plugin.name, &result, judged.max(start_up))
        {
            plugin.stats.quarantined();
        }
        result
    }
}

/// The CPU time this thread has used.
pub(super) fn thread_cpu_time() -> Duration {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(now.tv_sec).unwrap_or(0),
        u32::try_from(now.tv_nsec).unwrap_or(0),
    )
}

impl PluginRule {
    /// What a caller is told of a failure: never the plugin's own text (an
    /// error message, a trap's, a variant name), which may carry another
    /// caller's data the plugin kept. A failure of the plugin gets an id;
    /// its full text goes to the admin listing and (at most 20 a second)
    /// the log, under that id. flaghost's own refusals (quarantine, busy,
    /// budget) name no plugin text and are told as they are.
    fn told(&self, failure: Failure) -> RuleError {
        let (kind, shown, full) = match failure {
            Failure::UnknownVariant(variant) => (
                "unknown variant",
                format!(
                    "plugin {} answered a variant flag {:?} does not have",
                    self.plugin.name, self.flag_key
                ),
                format!("answered variant {:?}", capped(&variant, &self.plugin)),
            ),
            Failure::Plugin(e) => {
                let kind = match &e {
                    PluginError::Guest { .. } => "guest error",
                    PluginError::Trap { .. } => "trap",
                    PluginError::Deadline { .. } => "deadline",
                    PluginError::Memory { .. } => "memory",
                    PluginError::Input { .. } | PluginError::Output { .. } => "input or output cap",
                    _ => return RuleError(e.to_string()),
                };
                let shown = match &e {
                    PluginError::Guest { .. } => {
                        format!("plugin {} answered an error", self.plugin.name)
                    }
                    // NB: a wasm trap is told in wasmtime's words (its
                    // code's), and a trapping import by its name: one of
                    // the component's own imports, listed at load. Neither
                    // is text made at run time.
                    PluginError::Trap {
                        code: Some(code), ..
                    } => format!("plugin {} trapped: {code}", self.plugin.name),
                    PluginError::Trap { reason, .. } => {
                        match self
                            .plugin
                            .trapped_imports
                            .iter()
                            .find(|i| reason.contains(*i))
                        {
                            Some(import) => format!(
                                "plugin {} trapped: it called {import}, which flaghost does not provide",
                                self.plugin.name
                            ),
                            None => format!("plugin {} trapped", self.plugin.name),
                        }
                    }
                    // flaghost's text, no plugin's: told whole.
                    other => other.to_string(),
                };
                (kind, shown, capped(&e.to_string(), &self.plugin))
            }
        };
        let id = format!("{:016x}", rand::random::<u64>());
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let log = self.plugin.stats.failed(RecentError {
            id: id.clone(),
            at,
            flag: self.flag_key.clone(),
            kind,
            message: full.clone(),
        });
        if log {
            // NB: `?`: the plugin's text escaped, so its newlines cannot
            // forge log lines of their own.
            tracing::warn!(plugin = %self.plugin.name, flag = %self.flag_key, error_id = %id,
                           kind, error = ?full, "plugin evaluation failed");
        }
        RuleError(format!(
            "{shown} (error id {id}: its details are in flaghost's log and admin listing)"
        ))
    }
}

/// A failed evaluation of a plugin rule.
enum Failure {
    /// The plugin's call failed.
    Plugin(PluginError),
    /// It answered a variant the flag does not have.
    UnknownVariant(String),
}

/// `text` cut to the plugin's answer cap.
fn capped(text: &str, plugin: &Plugin) -> String {
    super::cut(text, plugin.limits.max_answer_bytes)
}

impl TargetingRule for PluginRule {
    fn evaluate(&self, context: &EvaluationContext) -> Result<Option<&str>, RuleError> {
        match self.run(context) {
            Ok(None) => Ok(None),
            // NB: checked here, not only by the evaluator, so that no
            // variant name a plugin made up reaches a caller, whether the
            // rule is the flag's or an operator inside a JsonLogic rule.
            Ok(Some(variant)) => match self.variants.iter().find(|v| **v == variant) {
                Some(known) => Ok(Some(known)),
                None => Err(self.told(Failure::UnknownVariant(variant))),
            },
            Err(e) => Err(self.told(Failure::Plugin(e))),
        }
    }

    fn describe(&self) -> String {
        format!("plugin {}", self.plugin.name)
    }

    fn lane(&self) -> Option<&str> {
        Some(&self.plugin.name)
    }
}
