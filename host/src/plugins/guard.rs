//! Keeps one plugin from hurting the others: a bound on its calls in flight,
//! and a quarantine after repeated slow calls.
//!
//! A *strike* is a call that ran into its deadline, or that took longer than
//! `strike_after` (by default half the deadline: a plugin spinning just under
//! its deadline is as costly as one running past it). After
//! `quarantine_after` strikes in a row the plugin is quarantined for
//! `quarantine_for`: its evaluations answer an error at once, without
//! running. The first call after the cool-down runs; another strike
//! quarantines it again at once, a quick answer ends it. A call cut short by
//! its request's budget says nothing about the plugin: neither a strike nor
//! a quick answer. The bound on calls in flight backs the plugin pool's
//! share for calls made outside the plugin's own lane (a JsonLogic rule
//! calling a second plugin).

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::PluginError;

/// One plugin's guard.
#[derive(Debug)]
pub struct Guard {
    in_flight: AtomicUsize,
    max_in_flight: usize,
    deadlines_in_a_row: AtomicU32,
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
    /// `quarantine_for` after `quarantine_after` strikes in a row (deadlines,
    /// or calls longer than `strike_after`).
    pub fn new(
        max_in_flight: usize,
        strike_after: Duration,
        quarantine_after: u32,
        quarantine_for: Duration,
    ) -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            max_in_flight: max_in_flight.max(1),
            deadlines_in_a_row: AtomicU32::new(0),
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
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= self.max_in_flight {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(PluginError::Busy {
                plugin: plugin.to_owned(),
                max: self.max_in_flight,
            });
        }
        Ok(Permit(self))
    }

    /// Notes how a call that took `elapsed` ended.
    pub fn record<T>(&self, plugin: &str, result: &Result<T, PluginError>, elapsed: Duration) {
        let slow = elapsed > self.strike_after;
        let strike = match result {
            Err(PluginError::Deadline { .. }) => true,
            // Cut short by its request's budget: a strike only if it had run
            // long already; else it says nothing about the plugin.
            Err(PluginError::BudgetSpent { .. }) if !slow => return,
            Err(PluginError::NotReached { .. }) => return,
            _ => slow,
        };
        if strike {
            let in_a_row = self.deadlines_in_a_row.fetch_add(1, Ordering::AcqRel) + 1;
            if in_a_row >= self.quarantine_after {
                let until = self.now().saturating_add(
                    u64::try_from(self.quarantine_for.as_nanos()).unwrap_or(u64::MAX),
                );
                let previous = self.quarantined_until.swap(until, Ordering::AcqRel);
                if previous == 0 {
                    warn!(
                        plugin,
                        strikes_in_a_row = in_a_row,
                        quarantine_ms = self.quarantine_for.as_millis() as u64,
                        last_call_us = elapsed.as_micros() as u64,
                        "plugin quarantined after repeated slow calls: its evaluations answer an error without running until the cool-down ends"
                    );
                }
            }
        } else {
            // NB: each loaded first, so a healthy plugin's calls do not all
            // write to these shared cache lines. The quarantine is cleared on
            // its own value, not the count's: a success racing the deadline
            // that quarantines may reset the count before the quarantine is
            // set, and the next success must still end it.
            if self.deadlines_in_a_row.load(Ordering::Relaxed) > 0 {
                self.deadlines_in_a_row.store(0, Ordering::Release);
            }
            if self.quarantined_until.load(Ordering::Relaxed) != 0
                && self.quarantined_until.swap(0, Ordering::AcqRel) != 0
            {
                info!(
                    plugin,
                    "plugin answers within its deadline again: quarantine over"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QUICK: Duration = Duration::from_micros(1);

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
            guard.record("p", &deadline(), QUICK);
        }
        guard.record("p", &deadline(), QUICK);
        let Err(PluginError::Quarantined { remaining, .. }) = guard.enter("p") else {
            panic!("quarantined after 3 deadlines in a row");
        };
        assert!(remaining <= Duration::from_millis(50));
        std::thread::sleep(Duration::from_millis(60));
        let trial = guard.enter("p").expect("retried after the cool-down");
        assert!(guard.enter("p").is_err(), "one trial at a time");
        drop(trial);
        guard.record("p", &deadline(), QUICK);
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
}
