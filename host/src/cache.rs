//! The cache of resolved flag sets, one entry per environment.
//!
//! [`FlagCache`] is the port: async and fallible, so a networked backend
//! (Redis) fits behind it; [`MemoryCache`] is the in-process backend with a
//! TTL. Which backend runs is decided in [`crate::config`] at start-up.

mod memory;

pub use memory::{Clock, MemoryCache, SystemClock};

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::flags::FlagSet;

/// Default time a cached flag set lives.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);

/// A cache backend failed. Callers fall back to the flag store; an error here
/// never reaches an evaluation's caller.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{backend} cache: {reason}")]
pub struct CacheError {
    /// Which backend (`memory`, `redis`).
    pub backend: &'static str,
    /// What went wrong.
    pub reason: String,
}

/// A cache of resolved flag sets by environment, each with a TTL.
#[async_trait]
pub trait FlagCache: Send + Sync {
    /// The environment's flag set, if cached and not expired.
    async fn get(&self, environment: &str) -> Result<Option<Arc<FlagSet>>, CacheError>;

    /// Caches `set` for its environment for the cache's TTL.
    async fn put(&self, set: Arc<FlagSet>) -> Result<(), CacheError>;

    /// Drops one environment's entry, or every entry when `None`.
    async fn invalidate(&self, environment: Option<&str>) -> Result<(), CacheError>;

    /// What the backend is, for logs (`memory, ttl 300s`); no secrets.
    fn describe(&self) -> String;
}
