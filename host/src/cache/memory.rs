//! An in-process [`FlagCache`] with a TTL per entry.
//!
//! Hand-written rather than a TTL-map crate: it holds one entry per
//! environment (a handful), and its expiry is tested with a controllable
//! [`Clock`], which the crates we looked at (moka) do not offer outside their
//! own tests. Expired entries are dropped when read or overwritten; with so
//! few keys no purge task is needed.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

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

struct Entry {
    set: Arc<FlagSet>,
    expires_at: Instant,
}

/// Flag sets in memory, each for `ttl`.
pub struct MemoryCache {
    ttl: Duration,
    clock: Arc<dyn Clock>,
    entries: RwLock<HashMap<String, Entry>>,
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
            entries: RwLock::new(HashMap::new()),
        }
    }

    /// The TTL.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn lookup(&self, environment: &str) -> Option<Arc<FlagSet>> {
        // NB: entries are replaced whole under the lock, so a poisoned lock
        // still guards a consistent map.
        let entries = self.entries.read().unwrap_or_else(PoisonError::into_inner);
        let entry = entries.get(environment)?;
        (self.clock.now() < entry.expires_at).then(|| entry.set.clone())
    }
}

#[async_trait]
impl FlagCache for MemoryCache {
    async fn get(&self, environment: &str) -> Result<Option<Arc<FlagSet>>, CacheError> {
        Ok(self.lookup(environment))
    }

    async fn put(&self, set: Arc<FlagSet>) -> Result<(), CacheError> {
        let expires_at = self.clock.now() + self.ttl;
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        entries.insert(set.environment.clone(), Entry { set, expires_at });
        Ok(())
    }

    async fn invalidate(&self, environment: Option<&str>) -> Result<(), CacheError> {
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        match environment {
            Some(env) => {
                entries.remove(env);
            }
            None => entries.clear(),
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("memory, ttl {}s", self.ttl.as_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

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
            flags: HashMap::new(),
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
        assert!(cache.get("prod").await.unwrap().is_some(), "alive before the TTL");
        clock.advance(Duration::from_secs(1));
        assert!(cache.get("prod").await.unwrap().is_none(), "gone at the TTL");
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
