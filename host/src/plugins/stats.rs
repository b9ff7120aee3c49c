//! Per-plugin counters: evaluations, errors by kind, a latency histogram,
//! and the last few failures with their full text, for the admin listing.
//!
//! Hand-written rather than a histogram crate: the hot path records with two
//! relaxed atomic adds and no lock (hdrhistogram needs `&mut` to record, so a
//! lock per evaluation), and percentiles to a factor of two are what an
//! operator needs to see a plugin slowing down.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;

use super::PluginError;

/// Upper bound of the first latency bucket; each next bucket doubles it.
const FIRST_BUCKET_NS: u64 = 256;
/// Buckets: 256 ns up to 2^27 * 256 ns (about 34 s), then overflow.
const BUCKETS: usize = 28;

/// One plugin's counters.
#[derive(Debug, Default)]
pub struct Stats {
    evaluations: AtomicU64,
    deadline: AtomicU64,
    memory: AtomicU64,
    trap: AtomicU64,
    output: AtomicU64,
    guest: AtomicU64,
    refused: AtomicU64,
    latency: [AtomicU64; BUCKETS + 1],
    /// Nanoseconds of all calls together (a histogram's sum).
    latency_sum_ns: AtomicU64,
    /// Times the plugin was quarantined.
    quarantines: AtomicU64,
    /// The most memory (linear memories and tables) an instance has held.
    peak_instance_bytes: AtomicU64,
    /// The last [`RECENT_ERRORS`] failures, newest last.
    recent: Mutex<VecDeque<RecentError>>,
    /// Failures logged in the current second, and which second (Unix): at
    /// most [`LOGGED_PER_SECOND`] lines a second per plugin.
    logged: Mutex<(u64, u32)>,
}

/// Failures the admin listing keeps per plugin.
pub const RECENT_ERRORS: usize = 8;

/// Failure log lines per plugin per second; past them a plugin failing on
/// every call (a flood of them) is counted and kept in the listing, but
/// not logged.
const LOGGED_PER_SECOND: u32 = 20;

/// One failure as the admin listing shows it: the full text (capped by the
/// answer cap), which callers never see.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RecentError {
    /// The id the caller was given.
    pub id: String,
    /// Unix milliseconds.
    pub at: u64,
    /// The flag evaluated.
    pub flag: String,
    /// `trap`, `deadline`, `memory`, `guest error`, `unknown variant`...
    pub kind: &'static str,
    /// What happened, in full.
    pub message: String,
}

/// Counters as read at one moment.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatsSnapshot {
    /// Evaluations run.
    pub evaluations: u64,
    /// Evaluations stopped at the deadline (timeouts).
    pub timeouts: u64,
    /// Evaluations not run: quarantined, or too many calls at once.
    pub refused: u64,
    /// Failed evaluations, by kind.
    pub errors: ErrorCounts,
    /// Times it was quarantined.
    pub quarantines: u64,
    /// The latency histogram: each bucket's upper bound (`None`: past the
    /// last) and its count (not cumulative), for `/metrics`.
    #[serde(skip)]
    pub latency_buckets: Vec<(Option<Duration>, u64)>,
    /// All calls' time together.
    #[serde(skip)]
    pub latency_sum: Duration,
    /// Latency percentiles in microseconds (upper bounds of power-of-two
    /// buckets); absent before the first evaluation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<Percentiles>,
    /// The most memory (linear memories and tables) one of its instances
    /// has held, in bytes: what an instance costs (a Rust rule about 1 MiB,
    /// a Python or JavaScript runtime 10 or more).
    pub peak_instance_bytes: u64,
    /// The last failures, newest last, with their full text.
    pub recent_errors: Vec<RecentError>,
}

/// Failed evaluations by kind.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorCounts {
    /// Ran past the deadline.
    pub deadline: u64,
    /// Hit the memory cap.
    pub memory: u64,
    /// Trapped (panic, `unreachable`, stack overflow, a capability it lacks).
    pub trap: u64,
    /// Read more than the context cap, or answered more than the answer cap.
    pub output: u64,
    /// Answered an error of its own.
    pub guest: u64,
}

/// Latency percentiles, microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
}

fn bucket(elapsed: Duration) -> usize {
    let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
    let mut bound = FIRST_BUCKET_NS;
    for i in 0..BUCKETS {
        if ns <= bound {
            return i;
        }
        bound = bound.saturating_mul(2);
    }
    BUCKETS
}

impl Stats {
    /// Records one evaluation.
    pub fn record<T>(&self, elapsed: Duration, result: &Result<T, PluginError>) {
        self.evaluations.fetch_add(1, Ordering::Relaxed);
        self.latency[bucket(elapsed)].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_ns.fetch_add(
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        let kind = match result {
            Ok(_) => return,
            Err(PluginError::Deadline { .. } | PluginError::BudgetSpent { .. }) => &self.deadline,
            Err(PluginError::Memory { .. }) => &self.memory,
            Err(PluginError::Guest { .. }) => &self.guest,
            Err(PluginError::Output { .. } | PluginError::Input { .. }) => &self.output,
            Err(_) => &self.trap,
        };
        kind.fetch_add(1, Ordering::Relaxed);
    }

    /// Keeps `error` among the recent ones; whether to log it too (at most
    /// [`LOGGED_PER_SECOND`] a second).
    pub fn failed(&self, error: RecentError) -> bool {
        let second = error.at / 1000;
        {
            let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
            if recent.len() == RECENT_ERRORS {
                recent.pop_front();
            }
            recent.push_back(error);
        }
        self.may_log_at(second)
    }

    /// Whether a line about this plugin may be logged now: at most
    /// [`LOGGED_PER_SECOND`] a second, failures and output together.
    pub fn may_log(&self) -> bool {
        let second = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.may_log_at(second)
    }

    fn may_log_at(&self, second: u64) -> bool {
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        if logged.0 != second {
            *logged = (second, 0);
        }
        logged.1 += 1;
        logged.1 <= LOGGED_PER_SECOND
    }

    /// Records that an instance holds `bytes` of memory and tables.
    pub fn instance_bytes(&self, bytes: usize) {
        let bytes = u64::try_from(bytes).unwrap_or(u64::MAX);
        self.peak_instance_bytes.fetch_max(bytes, Ordering::Relaxed);
    }

    /// Records a quarantine.
    pub fn quarantined(&self) {
        self.quarantines.fetch_add(1, Ordering::Relaxed);
    }

    /// Records an evaluation refused without running.
    pub fn refused(&self) {
        self.refused_by(1);
    }

    /// Records `evaluations` refused without running.
    pub fn refused_by(&self, evaluations: u64) {
        self.refused.fetch_add(evaluations, Ordering::Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let counts: Vec<u64> = self
            .latency
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        let percentile = |q: f64| {
            let rank = ((total as f64) * q).ceil().max(1.0) as u64;
            let mut seen = 0;
            let mut bound = FIRST_BUCKET_NS;
            for count in &counts {
                seen += count;
                if seen >= rank {
                    break;
                }
                bound = bound.saturating_mul(2);
            }
            bound as f64 / 1000.0
        };
        let deadline = self.deadline.load(Ordering::Relaxed);
        let mut bound = FIRST_BUCKET_NS;
        let latency_buckets = counts
            .iter()
            .enumerate()
            .map(|(i, &count)| {
                let upper = (i < BUCKETS).then(|| Duration::from_nanos(bound));
                bound = bound.saturating_mul(2);
                (upper, count)
            })
            .collect();
        StatsSnapshot {
            quarantines: self.quarantines.load(Ordering::Relaxed),
            latency_buckets,
            latency_sum: Duration::from_nanos(self.latency_sum_ns.load(Ordering::Relaxed)),
            evaluations: self.evaluations.load(Ordering::Relaxed),
            timeouts: deadline,
            refused: self.refused.load(Ordering::Relaxed),
            peak_instance_bytes: self.peak_instance_bytes.load(Ordering::Relaxed),
            errors: ErrorCounts {
                deadline,
                memory: self.memory.load(Ordering::Relaxed),
                trap: self.trap.load(Ordering::Relaxed),
                output: self.output.load(Ordering::Relaxed),
                guest: self.guest.load(Ordering::Relaxed),
            },
            latency_us: (total > 0).then(|| Percentiles {
                p50: percentile(0.50),
                p90: percentile(0.90),
                p99: percentile(0.99),
            }),
            recent_errors: self
                .recent
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned()
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_errors_by_kind_and_estimates_percentiles() {
        let stats = Stats::default();
        for _ in 0..98 {
            stats.record::<()>(Duration::from_micros(1), &Ok(()));
        }
        stats.record::<()>(
            Duration::from_millis(10),
            &Err(PluginError::Deadline {
                plugin: "p".into(),
                deadline: Duration::from_millis(10),
            }),
        );
        stats.record::<()>(
            Duration::from_micros(3),
            &Err(PluginError::Guest {
                plugin: "p".into(),
                message: "no".into(),
            }),
        );
        let s = stats.snapshot();
        assert_eq!(
            (s.evaluations, s.timeouts, s.errors.guest, s.errors.trap),
            (100, 1, 1, 0)
        );
        let p = s.latency_us.expect("percentiles");
        assert_eq!(p.p50, 1.024, "1 µs falls in the (512 ns, 1024 ns] bucket");
        assert!(p.p99 >= 3.0 && p.p99 <= 4.096, "{p:?}");
        assert!(bucket(Duration::from_secs(3600)) == BUCKETS);
    }
}
