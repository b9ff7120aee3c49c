//! Keeps one plugin from hurting the others: a bound on its calls in flight,
//! and a quarantine after repeated slow calls.
//!
//! A *strike* is a call that cost more than `strike_after` (by default half
//! the deadline: a plugin spinning just under its deadline is as costly as
//! one running past it, and one stopped at its deadline used about all of
//! it). The cost is CPU time where the call ran under a request budget (on
//! the plugin pool), else wall time. Strikes fill a leaky
//! bucket that drains one strike every [`STRIKE_LEAK`]; when it holds
//! `quarantine_after`, the plugin is quarantined for `quarantine_for`: its
//! evaluations answer an error at once, without running. Quick answers in
//! between do not empty the bucket, so a plugin cannot dodge by answering
//! quickly every other call (strikes "in a row" could be dodged so). The
//! first call after the cool-down runs; another strike quarantines it again
//! at once, a quick answer ends it and empties the bucket. A call cut short
//! by its request's budget before it was slow says nothing about the
//! plugin. The bound on calls in flight backs the plugin pool's
//! share for calls made outside the plugin's own lane (a JsonLogic rule
//! calling a second plugin).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::PluginError;

/// How often the strike bucket drains one strike: three strikes within about
/// a second quarantine, and so does a steady two or more a second.
pub const STRIKE_LEAK: Duration = Duration::from_millis(500);

/// The strike bucket: strikes held, and when it last drained (nanoseconds
/// after the guard's epoch).
#[derive(Debug, Default)]
struct Bucket {
    strikes: u32,
    drained_at: u64,
}

/// How long a call waits for its plugin to drop below its cap before it
/// is refused: many times an ordinary call (tens of microseconds), a small
/// part of a deadline.
const BUSY_WAIT: Duration = Duration::from_millis(2);

/// One plugin's guard.
#[derive(Debug)]
pub struct Guard {
    in_flight: AtomicUsize,
    max_in_flight: usize,
    /// Touched only by slow calls and by the end of a quarantine: a healthy
    /// plugin's calls take no lock.
    bucket: Mutex<Bucket>,
    strike_after: Duration,
    quarantine_after: u32,
    quarantine_for: Duration,
    /// Nanoseconds after `epoch` until which the plugin is quarantined; 0:
    /// not quarantined.
    quarantined_until: AtomicU64,
    epoch: Instant,
}

/// A call in flight; its slot is given back when dropped.
pub struct Permit<'a>(&'a Guard);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Guard {
    /// A guard allowing `max_in_flight` calls at once, quarantining for
    /// `quarantine_for` once its bucket holds `quarantine_after` strikes
    /// (deadlines, or calls longer than `strike_after`).
    pub fn new(
        max_in_flight: usize,
        strike_after: Duration,
        quarantine_after: u32,
        quarantine_for: Duration,
    ) -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            max_in_flight: max_in_flight.max(1),
            bucket: Mutex::default(),
            strike_after,
            quarantine_after: quarantine_after.max(1),
            quarantine_for,
            quarantined_until: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Lets a call run, or says why not.
    ///
    /// NB: runs on a plugin pool thread (never an HTTP worker), so the brief
    /// wait at the cap holds no request-serving thread.
    pub fn enter(&self, plugin: &str) -> Result<Permit<'_>, PluginError> {
        let until = self.quarantined_until.load(Ordering::Acquire);
        // NB: the clock is read only around a quarantine: a healthy plugin's
        // call pays for no clock read here (5% of a call, measured).
        let now = if until == 0 { 0 } else { self.now() };
        if until > now {
            return Err(PluginError::Quarantined {
                plugin: plugin.to_owned(),
                remaining: Duration::from_nanos(until - now),
            });
        }
        if until != 0 {
            // The cool-down is over: one caller (the one that moves the end
            // forward) runs as the trial; the others stay refused meanwhile.
            let next = now
                .saturating_add(u64::try_from(self.quarantine_for.as_nanos()).unwrap_or(u64::MAX));
            if self
                .quarantined_until
                .compare_exchange(until, next, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                return Err(PluginError::Quarantined {
                    plugin: plugin.to_owned(),
                    remaining: self.quarantine_for,
                });
            }
        }
        // NB: a plugin at its cap is waited for a moment before the call is
        // refused. A plugin can be at its cap for an instant in the ordinary
        // way: a rule of another lane (one naming it beside a second plugin)
        // is between the two calls of its evaluation. Refusing at once made
        // the neighbour's own flags fail while a hijacking rule ran. A normal
        // call takes microseconds; one that holds its slot for `BUSY_WAIT`
        // is doing what the cap is for, and is refused.
        let mut waited: Option<Instant> = None;
        loop {
            if self.in_flight.fetch_add(1, Ordering::AcqRel) < self.max_in_flight {
                return Ok(Permit(self));
            }
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            let since = *waited.get_or_insert_with(Instant::now);
            if since.elapsed() >= BUSY_WAIT {
                return Err(PluginError::Busy {
                    plugin: plugin.to_owned(),
                    max: self.max_in_flight,
                });
            }
            std::thread::yield_now();
        }
    }

    /// How long a call may cost before it is a strike.
    pub fn strike_after(&self) -> Duration {
        self.strike_after
    }

    /// Notes how a call that cost `cpu` ended: its CPU time, or its wall
    /// time where CPU time is not known (see `PluginRule::run`).
    ///
    /// NB: cost, not wall time alone, decides a strike, a deadline
    /// included: a call stopped at its (wall-clock) deadline after little
    /// CPU was starved by the machine, not slow by itself.
    /// Whether the plugin was quarantined by this call.
    pub fn record<T>(&self, plugin: &str, result: &Result<T, PluginError>, cpu: Duration) -> bool {
        let slow = cpu > self.strike_after;
        let mut quarantined = false;
        let strike = match result {
            // Stopped, by its deadline or its request's budget: a strike if
            // it had run long already; else it says nothing about the plugin.
            Err(
                PluginError::Deadline { .. }
                | PluginError::BudgetSpent { .. }
                | PluginError::NotReached { .. },
            ) if !slow => return false,
            _ => slow,
        };
        if strike {
            let held = self.strike();
            if held >= self.quarantine_after {
                let until = self.now().saturating_add(
                    u64::try_from(self.quarantine_for.as_nanos()).unwrap_or(u64::MAX),
                );
                let previous = self.quarantined_until.swap(until, Ordering::AcqRel);
                if previous == 0 {
                    quarantined = true;
                    warn!(
                        plugin,
                        strikes = held,
                        quarantine_ms = self.quarantine_for.as_millis() as u64,
                        last_call_cpu_us = cpu.as_micros() as u64,
                        "plugin quarantined after repeated slow calls: its evaluations answer an error without running until the cool-down ends"
                    );
                }
            }
        } else if self.quarantined_until.load(Ordering::Relaxed) != 0
            && self.quarantined_until.swap(0, Ordering::AcqRel) != 0
        {
            // NB: loaded first, so a healthy plugin's calls do not all write
            // to this shared cache line. The trial after a cool-down answered
            // quickly: the quarantine and the bucket are over.
            *self.bucket() = Bucket::default();
            info!(
                plugin,
                "plugin answers within its deadline again: quarantine over"
            );
        }
        quarantined
    }

    /// Adds a strike to the bucket (drained for the time since it last
    /// was); the strikes it holds now.
    fn strike(&self) -> u32 {
        self.strike_at(self.now())
    }

    /// [`Guard::strike`] at `now` (nanoseconds after the epoch).
    fn strike_at(&self, now: u64) -> u32 {
        let leak = u64::try_from(STRIKE_LEAK.as_nanos()).unwrap_or(u64::MAX);
        let mut bucket = self.bucket();
        let drained = now.saturating_sub(bucket.drained_at) / leak;
        if drained > 0 {
            bucket.strikes = bucket
                .strikes
                .saturating_sub(u32::try_from(drained).unwrap_or(u32::MAX));
            bucket.drained_at = if bucket.strikes == 0 {
                now
            } else {
                bucket.drained_at + drained * leak
            };
        }
        bucket.strikes = bucket.strikes.saturating_add(1);
        bucket.strikes
    }

    fn bucket(&self) -> std::sync::MutexGuard<'_, Bucket> {
        // A bucket is two integers changed together: a panic cannot tear it.
        self.bucket.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUICK: Duration = Duration::from_micros(1);
    /// The CPU a call stopped at its 10 ms deadline used.
    const SPENT: Duration = Duration::from_millis(10);

    fn deadline() -> Result<(), PluginError> {
        Err(PluginError::Deadline {
            plugin: "p".into(),
            deadline: Duration::from_millis(10),
        })
    }

    #[test]
    fn repeated_deadlines_quarantine_then_a_success_ends_it() {
        let guard = Guard::new(4, Duration::from_millis(5), 3, Duration::from_millis(50));
        for _ in 0..2 {
            let _permit = guard.enter("p").expect("runs");
            guard.record("p", &deadline(), SPENT);
        }
        guard.record("p", &deadline(), SPENT);
        let Err(PluginError::Quarantined { remaining, .. }) = guard.enter("p") else {
            panic!("quarantined after 3 deadlines in a row");
        };
        assert!(remaining <= Duration::from_millis(50));
        std::thread::sleep(Duration::from_millis(60));
        let trial = guard.enter("p").expect("retried after the cool-down");
        assert!(guard.enter("p").is_err(), "one trial at a time");
        drop(trial);
        guard.record("p", &deadline(), SPENT);
        assert!(
            guard.enter("p").is_err(),
            "another deadline: quarantined at once"
        );
        std::thread::sleep(Duration::from_millis(60));
        let trial = guard.enter("p").expect("the next trial");
        drop(trial);
        guard.record("p", &Ok::<(), PluginError>(()), QUICK);
        assert!(guard.enter("p").is_ok(), "a success ends it");
        assert!(guard.enter("p").is_ok(), "for every caller");
    }

    #[test]
    fn calls_in_flight_are_bounded() {
        let guard = Guard::new(2, Duration::from_millis(5), 3, Duration::from_secs(1));
        let a = guard.enter("p").expect("first");
        let _b = guard.enter("p").expect("second");
        assert!(matches!(
            guard.enter("p"),
            Err(PluginError::Busy { max: 2, .. })
        ));
        drop(a);
        guard.enter("p").expect("a slot came back");
    }

    #[test]
    fn slow_answers_are_strikes_and_quick_budget_cuts_are_neither() {
        let guard = Guard::new(4, Duration::from_millis(5), 3, Duration::from_secs(1));
        let slow = Duration::from_millis(8);
        let budget = Err::<(), _>(PluginError::BudgetSpent {
            plugin: "p".into(),
            budget: Duration::from_millis(10),
        });
        guard.record("p", &Ok::<(), PluginError>(()), slow);
        guard.record("p", &budget, QUICK);
        guard.record("p", &Ok::<(), PluginError>(()), slow);
        assert!(guard.enter("p").is_ok(), "two strikes: not yet");
        guard.record("p", &Ok::<(), PluginError>(()), slow);
        assert!(
            matches!(guard.enter("p"), Err(PluginError::Quarantined { .. })),
            "three answers over the strike share in a row quarantine"
        );
    }

    #[test]
    fn quick_answers_between_slow_ones_do_not_dodge_the_quarantine() {
        let guard = Guard::new(4, Duration::from_millis(5), 3, Duration::from_secs(1));
        let slow = Duration::from_millis(8);
        for _ in 0..3 {
            assert!(guard.enter("p").is_ok(), "not quarantined yet");
            guard.record("p", &Ok::<(), PluginError>(()), QUICK);
            guard.record("p", &Ok::<(), PluginError>(()), QUICK);
            guard.record("p", &Ok::<(), PluginError>(()), slow);
        }
        assert!(
            matches!(guard.enter("p"), Err(PluginError::Quarantined { .. })),
            "three slow calls close together quarantine, quick ones between or not"
        );
    }

    #[test]
    fn the_strike_bucket_drains_one_strike_each_leak() {
        let guard = Guard::new(4, Duration::from_millis(5), 3, Duration::from_secs(1));
        let leak = u64::try_from(STRIKE_LEAK.as_nanos()).expect("fits");
        // One strike a leak: the bucket never holds more than one.
        for n in 1..10 {
            assert_eq!(guard.strike_at(n * leak), 1);
        }
        // Three within one leak: three.
        let t = 20 * leak;
        assert_eq!(guard.strike_at(t), 1);
        assert_eq!(guard.strike_at(t + leak / 3), 2);
        assert_eq!(guard.strike_at(t + leak / 2), 3);
        // Two leaks later, two have drained.
        assert_eq!(guard.strike_at(t + 2 * leak + leak / 2), 2);
    }

    #[test]
    fn a_deadline_reached_with_little_cpu_is_not_the_plugins_fault() {
        let guard = Guard::new(4, Duration::from_millis(5), 3, Duration::from_secs(1));
        for _ in 0..10 {
            // Starved: 10 ms of wall clock, 1 µs of CPU.
            guard.record("p", &deadline(), QUICK);
        }
        assert!(guard.enter("p").is_ok(), "not quarantined");
    }
}
