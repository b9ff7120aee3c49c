//! Caching resolved flag sets: an in-process snapshot per environment
//! ([`Snapshots`], read on every evaluation without a lock or a round trip),
//! and an optional shared tier ([`FlagCache`]; [`RedisCache`]) that many
//! flaghost instances keep warm together.
//!
//! Which shared tier runs (Redis or none) is decided in [`crate::server`];
//! how the tiers and the flag store combine is [`crate::environments`].

mod redis;
mod snapshot;

pub use redis::{
    CONNECT_TIMEOUT, DEFAULT_MAX_ENTRY_BYTES, DEFAULT_RESPONSE_TIMEOUT, EntryReader, RedisCache,
    RedisOptions, RedisTls, encode, redact_url,
};
pub use snapshot::{Clock, Snapshot, Snapshots, SystemClock};

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::flags::FlagSet;

/// Default time a cached flag set lives.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);

/// A shared-cache operation failed. The read path falls back to memory and
/// the flag store; an error here never reaches an evaluation's caller.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{backend} cache: {reason}")]
pub struct CacheError {
    /// Which backend (`redis`).
    pub backend: &'static str,
    /// What went wrong.
    pub reason: String,
}

/// Something the shared tier learned that the read path must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheEvent {
    /// Another instance invalidated (or reloaded) one environment, or all
    /// when `None`: drop the in-process snapshot.
    Invalidated(Option<String>),
    /// The shared cache answers again after an outage: write the current
    /// flag sets back (it may have lost them), and drop snapshots, since
    /// invalidations sent meanwhile were missed.
    Reconnected,
}

/// The shared tier's connection, for `/readyz`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkStatus {
    /// `connected`, `connecting` (never connected yet) or `disconnected`.
    pub state: &'static str,
    /// The server, password redacted.
    pub url: String,
    /// Seconds in this state.
    pub since_seconds: u64,
    /// The last failure, while not connected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Requests that got no answer within the response timeout while Redis
    /// still answered the confirming `PING` (so the link stayed up).
    pub late_answers: u64,
    /// Times the breaker opened (Redis unreachable), and closed again.
    pub breaker_opened: u64,
    /// See `breaker_opened`.
    pub breaker_closed: u64,
}

impl LinkStatus {
    /// Whether requests go to the shared cache.
    pub fn connected(&self) -> bool {
        self.state == "connected"
    }
}

/// A cache of resolved flag sets shared by flaghost instances, each set under
/// its environment with a TTL.
#[async_trait]
pub trait FlagCache: Send + Sync {
    /// The environment's flag set, if cached, not expired and readable here
    /// (anything unreadable is a miss, and is overwritten).
    async fn get(&self, environment: &str) -> Result<Option<Arc<FlagSet>>, CacheError>;

    /// Caches `set` for its environment for the cache's TTL.
    async fn put(&self, set: &FlagSet) -> Result<(), CacheError>;

    /// Deletes one environment's entries, or every entry when `None`, and
    /// tells the other instances; returns how many keys went.
    async fn invalidate(&self, environment: Option<&str>) -> Result<u64, CacheError>;

    /// Which of `sets`' environments must be written again: the cache lost
    /// the set or any of its flags' entries, or they expire soon.
    async fn due(&self, sets: &[Arc<FlagSet>]) -> Result<Vec<String>, CacheError>;

    /// Every environment the cache holds a flag set for.
    async fn environments(&self) -> Result<Vec<String>, CacheError>;

    /// Waits up to `timeout` for the first connection; whether it is up.
    async fn wait_connected(&self, timeout: Duration) -> bool;

    /// Events for the read path (invalidations from other instances,
    /// reconnections).
    fn events(&self) -> broadcast::Receiver<CacheEvent>;

    /// The connection's state.
    fn status(&self) -> LinkStatus;

    /// What the backend is, for logs (`redis redis://:***@cache:6379, ttl
    /// 300s`); never a secret.
    fn describe(&self) -> String;
}
