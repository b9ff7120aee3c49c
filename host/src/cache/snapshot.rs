//! The in-process snapshot: each environment's flag set as this instance
//! serves it, until it is due for a refresh.
//!
//! Hand-written rather than a TTL-map crate: it holds one entry per
//! environment (a handful), its expiry is tested with a controllable
//! [`Clock`] (moka offers none outside its own tests), and an entry is not
//! evicted when it expires: an expired snapshot is still what the read path
//! serves from when nothing can refresh it.
//!
//! Reads take no lock: the map is an immutable snapshot behind an
//! [`ArcSwap`], replaced whole on a write (writes are rare: one per
//! environment per TTL).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::flags::FlagSet;

/// A source of the current time, so expiry can be tested without sleeping.
pub trait Clock: Send + Sync {
    /// Now.
    fn now(&self) -> Instant;
}

/// The real clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A flag set as served.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The flags.
    pub set: Arc<FlagSet>,
    /// Served past its TTL (or from the shared cache alone) because nothing
    /// could refresh it: evaluations answer reason STALE.
    pub stale: bool,
}

#[derive(Clone)]
struct Entry {
    snapshot: Snapshot,
    refresh_at: Instant,
    /// Dropped by an invalidation: kept only as the last resort of a
    /// refresh that fails, never served while one runs.
    invalidated: bool,
}

type Entries = HashMap<String, Entry>;

/// One [`Snapshot`] per environment, each due for a refresh at a set time.
pub struct Snapshots {
    clock: Arc<dyn Clock>,
    /// The current entries; read without locking.
    entries: ArcSwap<Entries>,
    /// Serialises writers so that two concurrent updates cannot lose one.
    write: Mutex<()>,
    /// Counts [`Snapshots::expire`] calls: a refresh that began before one
    /// may hold data the expiry meant to drop.
    generation: AtomicU64,
}

impl Snapshots {
    /// An empty table on `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            entries: ArcSwap::from_pointee(HashMap::new()),
            write: Mutex::new(()),
            generation: AtomicU64::new(0),
        }
    }

    /// Now, on this table's clock.
    pub fn now(&self) -> Instant {
        self.clock.now()
    }

    /// The environment's snapshot if it is not yet due for a refresh: the
    /// warm path, with no lock and no allocation.
    pub fn fresh(&self, environment: &str) -> Option<Snapshot> {
        let entries = self.entries.load();
        let entry = entries.get(environment)?;
        (self.clock.now() < entry.refresh_at).then(|| entry.snapshot.clone())
    }

    /// The environment's snapshot, due or not.
    pub fn any(&self, environment: &str) -> Option<Snapshot> {
        self.entries
            .load()
            .get(environment)
            .map(|e| e.snapshot.clone())
    }

    /// The environment's snapshot, due or not, unless it was invalidated:
    /// what requests may be served while a refresh runs beside them.
    pub fn servable(&self, environment: &str) -> Option<Snapshot> {
        self.entries
            .load()
            .get(environment)
            .filter(|e| !e.invalidated)
            .map(|e| e.snapshot.clone())
    }

    /// The expiry count now: pass it to [`Snapshots::insert_since`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Serves `snapshot` until `lifetime` from now, unless an expiry came
    /// after `generation` was read: then it is due at once, and if that was
    /// an invalidation it stays unservable, so an invalidation racing a
    /// refresh is never lost (the refresh may have read the old file).
    pub fn insert_since(&self, snapshot: Snapshot, lifetime: Duration, generation: u64) {
        let raced = self.generation() != generation;
        let lifetime = if raced { Duration::ZERO } else { lifetime };
        self.put(snapshot, lifetime, raced);
    }

    /// Every environment's servable snapshot, due or not (an invalidated
    /// one is not written back anywhere).
    pub fn all(&self) -> Vec<Snapshot> {
        self.entries
            .load()
            .values()
            .filter(|e| !e.invalidated)
            .map(|e| e.snapshot.clone())
            .collect()
    }

    /// Serves `snapshot` until `lifetime` from now.
    pub fn insert(&self, snapshot: Snapshot, lifetime: Duration) {
        self.put(snapshot, lifetime, false);
    }

    /// `keep_invalidated`: an invalidated entry this replaces stays so.
    fn put(&self, snapshot: Snapshot, lifetime: Duration, keep_invalidated: bool) {
        let refresh_at = self.clock.now() + lifetime;
        self.update(|entries| {
            let environment = snapshot.set.environment.clone();
            let invalidated =
                keep_invalidated && entries.get(&environment).is_some_and(|e| e.invalidated);
            entries.insert(
                environment,
                Entry {
                    snapshot,
                    refresh_at,
                    invalidated,
                },
            );
        });
    }

    /// Makes one environment's snapshot (or every one) due for a refresh
    /// now, keeping it to serve from if the refresh fails.
    pub fn expire(&self, environment: Option<&str>) {
        self.mark(environment, false);
    }

    /// The same, and the snapshot is no longer served while the refresh
    /// runs ([`Snapshots::servable`]): after an invalidation (a kill
    /// switch, a peer's new file) the next answer reflects it, the refresh
    /// waited for, unless the refresh fails.
    pub fn invalidate(&self, environment: Option<&str>) {
        self.mark(environment, true);
    }

    fn mark(&self, environment: Option<&str>, invalidated: bool) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let now = self.clock.now();
        self.update(|entries| {
            for (env, entry) in entries.iter_mut() {
                if environment.is_none_or(|e| e == env) {
                    entry.refresh_at = now;
                    entry.invalidated |= invalidated;
                }
            }
        });
    }

    /// Forgets an environment (its flag file is gone).
    pub fn remove(&self, environment: &str) {
        self.update(|entries| {
            entries.remove(environment);
        });
    }

    /// Replaces the map with `change` applied to a copy of it.
    fn update(&self, change: impl FnOnce(&mut Entries)) {
        // NB: the guard protects no data, only the order of writers, so a
        // poisoned lock is still good to take.
        let _writer = self.write.lock().unwrap_or_else(PoisonError::into_inner);
        let mut entries = Entries::clone(&self.entries.load());
        change(&mut entries);
        self.entries.store(Arc::new(entries));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock that moves only when told to.
    struct ManualClock(Mutex<Instant>);

    impl ManualClock {
        fn advance(&self, by: Duration) {
            *self.0.lock().unwrap_or_else(PoisonError::into_inner) += by;
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> Instant {
            *self.0.lock().unwrap_or_else(PoisonError::into_inner)
        }
    }

    fn snapshot(env: &str) -> Snapshot {
        Snapshot {
            set: Arc::new(FlagSet {
                environment: env.into(),
                flags: Default::default(),
                metadata: Default::default(),
                digest: "d".into(),
                warnings: vec![],
                lints: vec![],
                counters: Default::default(),
            }),
            stale: false,
        }
    }

    #[test]
    fn snapshots_fall_due_after_their_lifetime_and_are_kept() {
        let clock = Arc::new(ManualClock(Mutex::new(Instant::now())));
        let table = Snapshots::new(clock.clone());
        table.insert(snapshot("prod"), Duration::from_secs(300));
        clock.advance(Duration::from_secs(299));
        assert!(table.fresh("prod").is_some(), "fresh before its lifetime");
        clock.advance(Duration::from_secs(1));
        assert!(table.fresh("prod").is_none(), "due at its lifetime");
        assert_eq!(table.all().len(), 1, "kept to serve from");
    }

    #[test]
    fn expire_makes_one_or_all_due() {
        let table = Snapshots::new(Arc::new(SystemClock));
        for env in ["a", "b", "c"] {
            table.insert(snapshot(env), Duration::from_secs(60));
        }
        table.expire(Some("a"));
        assert!(table.fresh("a").is_none());
        assert!(table.fresh("b").is_some());
        table.expire(None);
        assert!(table.fresh("b").is_none() && table.fresh("c").is_none());
        table.remove("c");
        assert_eq!(table.all().len(), 2);
    }

    #[test]
    fn a_refresh_that_raced_an_expiry_is_installed_due() {
        let table = Snapshots::new(Arc::new(SystemClock));
        let before = table.generation();
        table.expire(Some("prod"));
        table.insert_since(snapshot("prod"), Duration::from_secs(60), before);
        assert!(
            table.fresh("prod").is_none(),
            "due: it may predate the expiry"
        );
        assert!(table.any("prod").is_some(), "but kept to serve from");
        table.insert_since(
            snapshot("prod"),
            Duration::from_secs(60),
            table.generation(),
        );
        assert!(table.fresh("prod").is_some());
    }

    #[test]
    fn a_refresh_that_raced_an_invalidation_leaves_it_unservable() {
        let table = Snapshots::new(Arc::new(SystemClock));
        table.insert(snapshot("prod"), Duration::from_secs(60));
        let before = table.generation();
        table.invalidate(Some("prod"));
        assert!(table.servable("prod").is_none(), "invalidated");
        assert!(table.all().is_empty(), "and not written back anywhere");
        // A refresh that began before the invalidation may hold the old file.
        table.insert_since(snapshot("prod"), Duration::from_secs(60), before);
        assert!(table.servable("prod").is_none(), "still invalidated");
        assert!(table.any("prod").is_some(), "kept as the last resort");
        table.insert_since(
            snapshot("prod"),
            Duration::from_secs(60),
            table.generation(),
        );
        assert!(table.servable("prod").is_some() && table.fresh("prod").is_some());
        // An expiry alone keeps the snapshot servable.
        table.expire(Some("prod"));
        assert!(table.servable("prod").is_some());
    }
}
