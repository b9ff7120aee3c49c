//! An in-process [`FlagCache`] with a TTL per entry.
//!
//! Hand-written rather than a TTL-map crate: it holds one entry per
//! environment (a handful), and its expiry is tested with a controllable
//! [`Clock`], which the crates we looked at (moka) do not offer outside their
//! own tests. Expired entries are dropped when overwritten; with so few keys
//! no purge task is needed.
//!
//! Reads take no lock: the map is an immutable snapshot behind an
//! [`ArcSwap`], replaced whole on a write (writes are rare: one per
//! environment per TTL).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;

use super::{CacheError, FlagCache};
use crate::flags::FlagSet;

/// A source of the current time, so TTL logic can be tested without sleeping.
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

#[derive(Clone)]
struct Entry {
    set: Arc<FlagSet>,
    expires_at: Instant,
}

type Entries = HashMap<String, Entry>;

/// Flag sets in memory, each for `ttl`.
pub struct MemoryCache {
    ttl: Duration,
    clock: Arc<dyn Clock>,
    /// The current entries; read without locking.
    entries: ArcSwap<Entries>,
    /// Serialises writers so that two concurrent updates cannot lose one.
    write: Mutex<()>,
}

impl MemoryCache {
    /// A cache whose entries live `ttl`, on the system clock.
    pub fn new(ttl: Duration) -> Self {
        Self::with_clock(ttl, Arc::new(SystemClock))
    }

    /// A cache on `clock`.
    pub fn with_clock(ttl: Duration, clock: Arc<dyn Clock>) -> Self {
        Self {
            ttl,
            clock,
            entries: ArcSwap::from_pointee(HashMap::new()),
            write: Mutex::new(()),
        }
    }

    /// The TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn lookup(&self, environment: &str) -> Option<Arc<FlagSet>> {
        let entries = self.entries.load();
        let entry = entries.get(environment)?;
        (self.clock.now() < entry.expires_at).then(|| entry.set.clone())
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

#[async_trait]
impl FlagCache for MemoryCache {
    async fn get(&self, environment: &str) -> Result<Option<Arc<FlagSet>>, CacheError> {
        Ok(self.lookup(environment))
    }

    async fn put(&self, set: Arc<FlagSet>) -> Result<(), CacheError> {
        let now = self.clock.now();
        let expires_at = now + self.ttl;
        self.update(|entries| {
            entries.retain(|_, e| e.expires_at > now);
            entries.insert(set.environment.clone(), Entry { set, expires_at });
        });
        Ok(())
    }

    async fn invalidate(&self, environment: Option<&str>) -> Result<(), CacheError> {
        self.update(|entries| match environment {
            Some(env) => {
                entries.remove(env);
            }
            None => entries.clear(),
        });
        Ok(())
    }

    fn describe(&self) -> String {
        format!("memory, ttl {}s", self.ttl.as_secs())
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

    fn set(env: &str) -> Arc<FlagSet> {
        Arc::new(FlagSet {
            environment: env.into(),
            flags: Default::default(),
            metadata: Default::default(),
            digest: "d".into(),
            warnings: vec![],
        })
    }

    #[tokio::test]
    async fn entries_expire_after_the_ttl() {
        let clock = Arc::new(ManualClock(Mutex::new(Instant::now())));
        let cache = MemoryCache::with_clock(Duration::from_secs(300), clock.clone());
        cache.put(set("prod")).await.unwrap();
        clock.advance(Duration::from_secs(299));
        assert!(
            cache.get("prod").await.unwrap().is_some(),
            "alive before the TTL"
        );
        clock.advance(Duration::from_secs(1));
        assert!(
            cache.get("prod").await.unwrap().is_none(),
            "gone at the TTL"
        );
    }

    #[tokio::test]
    async fn invalidate_drops_one_or_all() {
        let cache = MemoryCache::new(Duration::from_secs(60));
        for env in ["a", "b", "c"] {
            cache.put(set(env)).await.unwrap();
        }
        cache.invalidate(Some("a")).await.unwrap();
        assert!(cache.get("a").await.unwrap().is_none());
        assert!(cache.get("b").await.unwrap().is_some());
        cache.invalidate(None).await.unwrap();
        assert!(cache.get("b").await.unwrap().is_none());
        assert!(cache.get("c").await.unwrap().is_none());
    }
}
