//! The read path: an environment's current flag set.
//!
//! Evaluations read the in-process [`Snapshots`] only: no lock, no round
//! trip. When a snapshot falls due (its TTL, an invalidation), requests keep
//! getting it while one background refresh per environment runs (single
//! flight); only an environment's first load is waited for. A refresh:
//!
//! 1. the shared cache (Redis) is read, unless it is unreachable;
//! 2. the flag store is read (one small file; parsed again only when its
//!    bytes changed). A valid local file always wins: if the shared cache
//!    holds another version, the conflict is logged and the local one is
//!    served. On a miss the local set is written to the shared cache;
//! 3. if the store fails, the last good set is served, or else the shared
//!    cache's; either is marked stale (reason STALE) once nothing has
//!    confirmed it for a TTL. Only with neither is the environment
//!    unavailable.
//!
//! Off the request path, [`Environments::maintain`] reloads changed flag
//! files, writes back sets the shared cache lost, and acts on other
//! instances' invalidations.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::broadcast::error::RecvError;
use tracing::{debug, info, warn};

use crate::cache::{CacheEvent, Clock, FlagCache, LinkStatus, Snapshot, Snapshots, SystemClock};
use crate::flags::FlagSet;
use crate::store::{FlagStore, StoreError, valid_environment_name};

/// Why an environment has no flag set to evaluate.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LookupError {
    /// The name is not a valid environment name.
    #[error("invalid environment name {0:?}: use letters, digits, '_', '.' and '-'")]
    InvalidName(String),
    /// No such environment.
    #[error("environment {0:?} was not found")]
    NotFound(String),
    /// The store failed and there is no earlier good set to serve.
    #[error("environment {environment:?} is unavailable: {reason}")]
    Unavailable {
        /// The environment.
        environment: String,
        /// Why.
        reason: String,
    },
}

/// How often the read path refreshes and checks.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a flag set is served before it is refreshed.
    pub ttl: Duration,
    /// How soon a refresh that failed is tried again, and how often the
    /// shared cache is checked for lost flag sets.
    pub check_interval: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            ttl: crate::cache::DEFAULT_TTL,
            check_interval: Duration::from_secs(1),
        }
    }
}

/// How long a request waits for the refresh of an invalidated snapshot
/// before it is served the invalidated set (a refresh is a file `stat`, and
/// with Redis a round trip or two: milliseconds, unless something is wrong).
const INVALIDATION_WAIT: Duration = Duration::from_secs(2);

/// Which cache serves, for `/readyz` and `/healthz`.
#[derive(Debug, Clone, Serialize)]
pub struct CacheStatus {
    /// `redis` (Redis configured and answering), `memory-fallback` (Redis
    /// configured, unreachable: serving from memory) or `memory-only` (no
    /// Redis configured).
    pub backend: &'static str,
    /// The Redis connection, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis: Option<LinkStatus>,
}

/// What an invalidation did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Invalidation {
    /// The environment, or none for all.
    pub environment: Option<String>,
    /// Shared-cache keys deleted; none if there is no shared cache or it
    /// failed.
    pub keys_deleted: Option<u64>,
    /// Why the shared cache was not invalidated, if it was not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_cache_error: Option<String>,
}

/// A set the flag store gave, and when it last confirmed it.
#[derive(Clone)]
struct Good {
    set: Arc<FlagSet>,
    confirmed_at: Instant,
}

/// Resolves environments to flag sets.
pub struct Environments {
    snapshots: Snapshots,
    shared: Option<Arc<dyn FlagCache>>,
    store: Arc<dyn FlagStore>,
    timing: Timing,
    /// The last set the store gave per environment: served when the store
    /// fails (a file broken on disk, a read error).
    last_good: RwLock<HashMap<String, Good>>,
    /// Flag files put in force and refused.
    reloads: crate::metrics::Reloads,
    /// Refused versions already counted, as `environment\nreason`.
    refusals: Mutex<HashSet<String>>,
    /// One refresh at a time per environment.
    gates: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Problems already logged (store failures, refused files, conflicts),
    /// so that each is logged when it starts, not on every retry.
    logged: Mutex<HashSet<String>>,
}

impl Environments {
    /// A read path over `store`, with `shared` as the shared cache if any.
    pub fn new(
        store: Arc<dyn FlagStore>,
        shared: Option<Arc<dyn FlagCache>>,
        timing: Timing,
    ) -> Self {
        Self::with_clock(store, shared, timing, Arc::new(SystemClock))
    }

    /// The same, on `clock`.
    pub fn with_clock(
        store: Arc<dyn FlagStore>,
        shared: Option<Arc<dyn FlagCache>>,
        timing: Timing,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            snapshots: Snapshots::new(clock),
            shared,
            store,
            timing,
            last_good: RwLock::new(HashMap::new()),
            reloads: Default::default(),
            refusals: Mutex::new(HashSet::new()),
            gates: Mutex::new(HashMap::new()),
            logged: Mutex::new(HashSet::new()),
        }
    }

    /// The flag store.
    pub fn store(&self) -> &Arc<dyn FlagStore> {
        &self.store
    }

    /// The shared cache, if one is configured.
    pub fn shared(&self) -> Option<&Arc<dyn FlagCache>> {
        self.shared.as_ref()
    }

    /// `environment`'s current flag set.
    pub async fn get(self: &Arc<Self>, environment: &str) -> Result<Snapshot, LookupError> {
        if let Some(snapshot) = self.snapshots.fresh(environment) {
            return Ok(snapshot);
        }
        if !valid_environment_name(environment) {
            return Err(LookupError::InvalidName(environment.to_owned()));
        }
        // NB: a due snapshot keeps serving while one refresh runs beside
        // the requests: a slow Redis or a large file never holds a request.
        // Its STALE marking is the refresh's to decide, as before.
        if let Some(served) = self.snapshots.servable(environment) {
            self.refresh_in_background(environment);
            return Ok(served);
        }
        if let Some(invalidated) = self.snapshots.any(environment) {
            return Ok(self.after_invalidation(environment, invalidated).await);
        }
        let gate = self.gate(environment);
        let _turn = gate.lock().await;
        // Another request may have refreshed it while this one waited.
        if let Some(snapshot) = self.snapshots.fresh(environment) {
            return Ok(snapshot);
        }
        self.resolve_or_forget_gate(environment).await
    }

    /// An invalidated snapshot is not served while its refresh runs: the
    /// request waits for the refresh (a kill switch takes effect on the
    /// next answer), at most [`INVALIDATION_WAIT`], then gets what there is.
    /// The refresh runs in a task of its own, so a caller that goes away
    /// cannot cancel it; a second one runs if the first raced a newer
    /// invalidation.
    async fn after_invalidation(
        self: &Arc<Self>,
        environment: &str,
        invalidated: Snapshot,
    ) -> Snapshot {
        let waited = tokio::time::timeout(INVALIDATION_WAIT, async {
            for _ in 0..2 {
                self.refresh_in_background(environment);
                let gate = self.gate(environment);
                drop(gate.lock().await);
                if let Some(served) = self.snapshots.servable(environment) {
                    return Some(served);
                }
            }
            None
        })
        .await;
        waited
            .ok()
            .flatten()
            .or_else(|| self.snapshots.any(environment))
            .unwrap_or(invalidated)
    }

    /// Starts a refresh of `environment` unless one is running (its gate is
    /// held).
    fn refresh_in_background(self: &Arc<Self>, environment: &str) {
        let Ok(turn) = self.gate(environment).try_lock_owned() else {
            return;
        };
        let (me, environment) = (self.clone(), environment.to_owned());
        tokio::spawn(async move {
            let _turn = turn;
            // Another refresh may have finished since this one was asked for.
            if me.snapshots.fresh(&environment).is_none()
                && let Err(e) = me.resolve_or_forget_gate(&environment).await
            {
                debug!(environment = %environment, error = %e, "background refresh failed");
            }
        });
    }

    /// Resolves; on failure drops the environment's gate, so that names
    /// from requests that resolve to nothing leave nothing behind.
    async fn resolve_or_forget_gate(&self, environment: &str) -> Result<Snapshot, LookupError> {
        let resolved = self.resolve(environment).await;
        if resolved.is_err() {
            self.gates
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(environment);
        }
        resolved
    }

    /// Loads `environment` now, whether or not its snapshot is due.
    pub async fn refresh(&self, environment: &str) -> Result<Snapshot, LookupError> {
        if !valid_environment_name(environment) {
            return Err(LookupError::InvalidName(environment.to_owned()));
        }
        let gate = self.gate(environment);
        let _turn = gate.lock().await;
        self.resolve_or_forget_gate(environment).await
    }

    fn gate(&self, environment: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.gates
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(environment.to_owned())
            .or_default()
            .clone()
    }

    /// Steps 1–3 of the module documentation.
    async fn resolve(&self, environment: &str) -> Result<Snapshot, LookupError> {
        let generation = self.snapshots.generation();
        let cached = match &self.shared {
            Some(shared) => shared.get(environment).await.unwrap_or_else(|e| {
                debug!(environment, error = %e, "shared cache skipped");
                None
            }),
            None => None,
        };
        match self.store.load(environment).await {
            Ok(local) => {
                match &cached {
                    Some(remote) if remote.digest != local.digest => {
                        self.log_once(
                            format!("conflict {environment} {} {}", local.digest, remote.digest),
                            || {
                                warn!(environment, local_digest = %local.digest, redis_digest = %remote.digest,
                                      "the shared cache holds another version of this environment's flag file; \
                                       serving the local file");
                            },
                        );
                    }
                    Some(_) => {}
                    None => self.write_shared(&local).await,
                }
                self.recovered(environment);
                Ok(self.confirm(local, generation))
            }
            Err(StoreError::NotFound(_)) => {
                debug!(environment, "unknown environment");
                self.forget(environment);
                Err(LookupError::NotFound(environment.to_owned()))
            }
            Err(StoreError::InvalidEnvironment(name)) => Err(LookupError::InvalidName(name)),
            Err(e) => self.serve_without_store(environment, cached, &e, generation),
        }
    }

    /// The store failed: the last good set, else the shared cache's, else
    /// the snapshot already served (a set read from the shared cache alone
    /// keeps serving when the shared cache loses it too).
    ///
    /// NB: the shared cache stands in only for a file that cannot be read
    /// (a missing or unreadable directory). A file that was read and
    /// refused is the operator's word: what Redis holds (which anyone who
    /// can write to Redis could have planted) never replaces it, so with
    /// no last good set of its own the environment is unavailable.
    fn serve_without_store(
        &self,
        environment: &str,
        cached: Option<Arc<FlagSet>>,
        error: &StoreError,
        generation: u64,
    ) -> Result<Snapshot, LookupError> {
        let good = self
            .last_good
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(environment)
            .cloned();
        let refused = matches!(error, StoreError::Invalid(_));
        let cached = cached.filter(|_| !refused);
        let snapshot = match (good, cached) {
            (Some(good), _) => {
                let age = self
                    .snapshots
                    .now()
                    .saturating_duration_since(good.confirmed_at);
                Snapshot {
                    set: good.set,
                    stale: age >= self.timing.ttl,
                }
            }
            (None, Some(remote)) => Snapshot {
                set: remote,
                stale: true,
            },
            (None, None) => match self.snapshots.any(environment).filter(|_| !refused) {
                Some(served) => Snapshot {
                    set: served.set,
                    stale: true,
                },
                None => {
                    // NB: a set served from Redis alone stops serving once
                    // the file is readable and refused: requests, which get
                    // what is served while a refresh runs, must not keep it.
                    if refused {
                        self.snapshots.remove(environment);
                    }
                    // NB: one key for every environment: names come from
                    // requests, and must not grow the table of what was logged.
                    self.log_once("unavailable".into(), || {
                        warn!(environment, error = %error,
                              "environment unavailable: its flag file cannot be read or is refused, and no earlier set was good");
                    });
                    return Err(LookupError::Unavailable {
                        environment: environment.to_owned(),
                        reason: error.to_string(),
                    });
                }
            },
        };
        self.refused(environment, error);
        self.log_once(format!("store {environment}"), || {
            warn!(environment, error = %error, digest = %snapshot.set.digest,
                  "flag store failed; serving the last good flag set (marked STALE once older than the TTL)");
        });
        // NB: retried at the check interval, not per request.
        self.snapshots
            .insert_since(snapshot.clone(), self.timing.check_interval, generation);
        Ok(snapshot)
    }

    /// Installs a set the store just gave (read after `generation`).
    fn confirm(&self, set: Arc<FlagSet>, generation: u64) -> Snapshot {
        let snapshot = Snapshot { set, stale: false };
        let previous = self
            .last_good
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                snapshot.set.environment.clone(),
                Good {
                    set: snapshot.set.clone(),
                    confirmed_at: self.snapshots.now(),
                },
            );
        // NB: counted here, where every new version is put in force (the
        // watcher, a refresh at the TTL, a reload after a plugin change).
        if previous.is_some_and(|p| p.set.digest != snapshot.set.digest) {
            self.reloads.accepted();
        }
        self.snapshots
            .insert_since(snapshot.clone(), self.timing.ttl, generation);
        snapshot
    }

    /// Counts a refused version of `environment`'s file once (a version is
    /// known by why it is refused), however often it is tried.
    fn refused(&self, environment: &str, error: &StoreError) {
        if self
            .refusals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(format!("{environment}\n{error}"))
        {
            self.reloads.refused();
        }
    }

    fn forget(&self, environment: &str) {
        // NB: names come from requests, so nothing is kept per unknown name.
        self.gates
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(environment);
        self.snapshots.remove(environment);
        self.last_good
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(environment);
    }

    fn last_good_digest(&self, environment: &str) -> Option<String> {
        self.last_good
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(environment)
            .map(|g| g.set.digest.clone())
    }

    async fn write_shared(&self, set: &FlagSet) {
        if let Some(shared) = &self.shared
            && let Err(e) = shared.put(set).await
        {
            // NB: the cache logs state changes; a write skipped while it is
            // unreachable is no news.
            debug!(environment = %set.environment, error = %e, "flag set not written to the shared cache");
        }
    }

    fn log_once(&self, what: String, log: impl FnOnce()) {
        if self
            .logged
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(what)
        {
            log();
        }
    }

    /// The store serves `environment` again: its failures may be logged anew.
    fn recovered(&self, environment: &str) {
        let prefix = format!("{environment}\n");
        self.refusals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|r| !r.starts_with(&prefix));
        let key = format!("store {environment}");
        let mut logged = self.logged.lock().unwrap_or_else(PoisonError::into_inner);
        logged.remove("unavailable");
        let was_failing = logged.remove(&key);
        drop(logged);
        if was_failing {
            info!(environment, "flag store serves this environment again");
        }
    }

    /// Drops one environment's cached flag set (or every one): in this
    /// instance, in the shared cache, and in every other instance.
    pub async fn invalidate(&self, environment: Option<&str>) -> Invalidation {
        self.snapshots.invalidate(environment);
        let mut report = Invalidation {
            environment: environment.map(str::to_owned),
            keys_deleted: None,
            shared_cache_error: None,
        };
        if let Some(shared) = &self.shared {
            match shared.invalidate(environment).await {
                Ok(keys) => report.keys_deleted = Some(keys),
                Err(e) => {
                    warn!(environment = environment.unwrap_or("*"), error = %e,
                          "shared cache not invalidated; this instance's snapshot was dropped");
                    report.shared_cache_error = Some(e.to_string());
                }
            }
        }
        report
    }

    /// How many environments have a flag set to serve.
    pub fn served_count(&self) -> usize {
        self.last_good
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether `environment` is one flaghost serves or has a flag file for.
    pub async fn exists(&self, environment: &str) -> bool {
        let served = self
            .last_good
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(environment);
        served
            || self
                .store
                .environments()
                .await
                .is_ok_and(|listed| listed.iter().any(|e| e == environment))
    }

    /// Flag-file reloads put in force and refused.
    pub fn reloads(&self) -> &crate::metrics::Reloads {
        &self.reloads
    }

    /// Every flag set loaded or served now (the last good set of each
    /// environment, and what the snapshots serve).
    pub fn loaded_sets(&self) -> Vec<Arc<FlagSet>> {
        let mut sets: Vec<Arc<FlagSet>> = self
            .last_good
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|good| good.set.clone())
            .collect();
        for snapshot in self.snapshots.all() {
            if !sets.iter().any(|s| Arc::ptr_eq(s, &snapshot.set)) {
                sets.push(snapshot.set);
            }
        }
        sets
    }

    /// Which cache serves.
    pub fn cache_status(&self) -> CacheStatus {
        match &self.shared {
            None => CacheStatus {
                backend: "memory-only",
                redis: None,
            },
            Some(shared) => {
                let link = shared.status();
                CacheStatus {
                    backend: if link.connected() {
                        "redis"
                    } else {
                        "memory-fallback"
                    },
                    redis: Some(link),
                }
            }
        }
    }

    /// Runs the background work until aborted: every `watch_interval` (if
    /// any) calls `on_watch` (which starts the plugin directory's look) and
    /// reloads changed flag files; every check interval writes back flag
    /// sets the shared cache lost; and acts on the shared cache's events as
    /// they come.
    ///
    /// NB: one timer when the two intervals are equal (the default): an
    /// idle flaghost wakes once a second for all of it, not once per timer
    /// (the plugin watch had a timer of its own).
    pub async fn maintain(
        self: Arc<Self>,
        watch_interval: Option<Duration>,
        mut on_watch: impl FnMut(),
    ) {
        use tokio::time::{MissedTickBehavior, interval};
        let mut events = self.shared.as_ref().map(|s| s.events());
        let every = |period| {
            let mut timer = interval(period);
            timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
            timer
        };
        let mut watch = every(watch_interval.unwrap_or(Duration::from_secs(3600)));
        let mut check = every(self.timing.check_interval);
        let shared = self.shared.is_some();
        let together = shared && watch_interval == Some(self.timing.check_interval);
        loop {
            tokio::select! {
                _ = watch.tick(), if watch_interval.is_some() => {
                    on_watch();
                    self.poll_store().await;
                    if together {
                        self.keep_shared_warm().await;
                    }
                }
                _ = check.tick(), if shared && !together => self.keep_shared_warm().await,
                event = next_event(&mut events) => match event {
                    Ok(CacheEvent::Invalidated(environment)) => {
                        debug!(environment = ?environment, "dropping the snapshot: invalidated by another instance");
                        self.snapshots.invalidate(environment.as_deref());
                    }
                    Ok(CacheEvent::Reconnected) | Err(RecvError::Lagged(_)) => {
                        self.snapshots.expire(None);
                        self.write_back_all().await;
                    }
                    Err(RecvError::Closed) => events = None,
                },
            }
        }
    }

    /// Reloads every flag file whose bytes changed, picks up new ones and
    /// drops removed ones; each change invalidates the environment
    /// everywhere. A file that fails validation is refused (logged once)
    /// and the last good version keeps serving.
    pub async fn poll_store(&self) {
        let listed = match self.store.environments().await {
            Ok(listed) => listed,
            Err(e) => {
                self.log_once(format!("list {e}"), || {
                    warn!(store = %self.store.describe(), error = %e,
                          "cannot list the flag store; serving what is loaded");
                });
                return;
            }
        };
        let mut names: Vec<String> = listed;
        names.extend(
            self.last_good
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .keys()
                .cloned(),
        );
        names.sort();
        names.dedup();
        // NB: the shared cache is told after the gates are released: an
        // invalidation SCANs the shared keyspace, and requests must not wait
        // for that.
        let mut changed = Vec::new();
        let mut removed = Vec::new();
        let unchanged = self.store.unchanged(&names).await;
        for (environment, unchanged) in names.into_iter().zip(unchanged) {
            let gate = self.gate(&environment);
            let _turn = gate.lock().await;
            let generation = self.snapshots.generation();
            let before = self.last_good_digest(&environment);
            if unchanged.is_some() && unchanged == before {
                self.recovered(&environment);
                continue;
            }
            match self.store.load(&environment).await {
                Ok(set) if before.as_deref() == Some(set.digest.as_str()) => {
                    self.recovered(&environment);
                }
                Ok(set) => {
                    info!(environment = %environment, digest = %set.digest, previous = ?before,
                          flags = set.flags.len(), "flag file loaded");
                    for w in &set.warnings {
                        warn!(environment = %environment, problem = %w, "flag loaded with a rule it cannot evaluate");
                    }
                    for w in &set.lints {
                        warn!(environment = %environment, problem = %w, "flag file loaded otherwise than written");
                    }
                    self.recovered(&environment);
                    self.confirm(set.clone(), generation);
                    changed.push(set);
                }
                Err(StoreError::NotFound(_)) => {
                    if before.is_some() {
                        info!(environment = %environment, "flag file removed; the environment is no longer served");
                        self.forget(&environment);
                        removed.push(environment);
                    }
                }
                Err(e) => {
                    self.refused(&environment, &e);
                    self.log_once(format!("store {environment}"), || {
                        warn!(environment = %environment, error = %e,
                              "flag file refused; the last good version keeps serving");
                    });
                }
            }
        }
        let Some(shared) = &self.shared else { return };
        for environment in removed {
            if let Err(e) = shared.invalidate(Some(&environment)).await {
                debug!(environment = %environment, error = %e, "shared cache not invalidated");
            }
        }
        for set in changed {
            // Delete first: keys of flags the new file no longer has go too.
            if let Err(e) = shared.invalidate(Some(&set.environment)).await {
                debug!(environment = %set.environment, error = %e, "shared cache not invalidated");
            }
            self.write_shared(&set).await;
        }
    }

    /// Reloads every environment served (the plugins changed: rules are
    /// bound again).
    pub async fn reload_all(&self) {
        let names: Vec<String> = self
            .last_good
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        for environment in names {
            if let Err(e) = self.refresh(&environment).await {
                warn!(environment = %environment, error = %e, "reload after a plugin change failed");
            }
        }
    }

    /// Writes back the flag sets the shared cache no longer holds whole (it
    /// restarted empty, was flushed, evicted or lost some keys) or that
    /// expire soon.
    pub async fn keep_shared_warm(&self) {
        let Some(shared) = &self.shared else { return };
        if !shared.status().connected() {
            return;
        }
        // NB: a set whose entry Redis holds in another version (another
        // instance wrote a newer file first) is not renewed: see `due`.
        let served: Vec<Snapshot> = self
            .snapshots
            .all()
            .into_iter()
            .filter(|s| !s.stale)
            .collect();
        let sets: Vec<Arc<FlagSet>> = served.iter().map(|s| s.set.clone()).collect();
        let missing = match shared.due(&sets).await {
            Ok(missing) => missing,
            Err(e) => {
                debug!(error = %e, "shared cache check skipped");
                return;
            }
        };
        for snapshot in served
            .iter()
            .filter(|s| missing.contains(&s.set.environment))
        {
            debug!(environment = %snapshot.set.environment, digest = %snapshot.set.digest,
                  "the shared cache lost this flag set's entries, or they expire soon; writing them again");
            self.write_shared(&snapshot.set).await;
        }
    }

    async fn write_back_all(&self) {
        for snapshot in self.snapshots.all().into_iter().filter(|s| !s.stale) {
            self.write_shared(&snapshot.set).await;
        }
    }
}

async fn next_event(
    events: &mut Option<tokio::sync::broadcast::Receiver<CacheEvent>>,
) -> Result<CacheEvent, RecvError> {
    match events {
        Some(events) => events.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::PluginSet;
    use crate::store::DirStore;

    /// A flag directory whose loads after the first are held until released:
    /// a refresh that takes as long as the test wants.
    struct HeldStore {
        dir: DirStore,
        loads: std::sync::atomic::AtomicUsize,
        release: tokio::sync::Semaphore,
    }

    #[async_trait::async_trait]
    impl FlagStore for HeldStore {
        async fn load(&self, environment: &str) -> Result<Arc<FlagSet>, StoreError> {
            if self.loads.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 0 {
                let _permit = self.release.acquire().await;
            }
            self.dir.load(environment).await
        }

        async fn environments(&self) -> Result<Vec<String>, StoreError> {
            self.dir.environments().await
        }

        fn describe(&self) -> String {
            "held".into()
        }
    }

    /// A store over `dir` whose loads after the first wait for a permit.
    fn held(dir: &std::path::Path) -> Arc<HeldStore> {
        Arc::new(HeldStore {
            dir: DirStore::new(dir, PluginSet::default()),
            loads: Default::default(),
            release: tokio::sync::Semaphore::new(0),
        })
    }

    fn write(dir: &std::path::Path, greeting: &str) {
        let doc = serde_json::json!({"flags": {"greeting": {"state": "ENABLED",
            "variants": {"v": greeting}, "defaultVariant": "v"}}});
        std::fs::write(dir.join("prod.json"), doc.to_string()).expect("write");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_due_snapshot_keeps_serving_while_one_refresh_runs() {
        let tmp = tempfile::tempdir().expect("tmp");
        write(tmp.path(), "old");
        let store = held(tmp.path());
        let timing = Timing {
            ttl: Duration::from_millis(50),
            check_interval: Duration::from_millis(50),
        };
        let environments = Arc::new(Environments::new(store.clone(), None, timing));
        let first = environments.get("prod").await.expect("loads");
        write(tmp.path(), "new");
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Due, and its refresh is held: requests get the set they had, and
        // start no second refresh.
        for _ in 0..20 {
            let served = tokio::time::timeout(Duration::from_secs(5), environments.get("prod"))
                .await
                .expect("answered without waiting for the held refresh")
                .expect("served");
            assert_eq!(served.set.digest, first.set.digest);
            assert!(!served.stale);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            store.loads.load(std::sync::atomic::Ordering::SeqCst),
            2,
            "one refresh for all those requests"
        );
        store.release.add_permits(1);
        let mut refreshed = false;
        for _ in 0..100 {
            if environments.get("prod").await.expect("served").set.digest != first.set.digest {
                refreshed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(refreshed, "the refresh's set serves once it is done");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_an_invalidation_the_next_answer_waits_for_the_new_set() {
        let tmp = tempfile::tempdir().expect("tmp");
        write(tmp.path(), "old");
        let store = held(tmp.path());
        let environments = Arc::new(Environments::new(store.clone(), None, Timing::default()));
        let first = environments.get("prod").await.expect("loads");
        write(tmp.path(), "new");
        environments.invalidate(Some("prod")).await;
        // The refresh is held: a request waits for it rather than being
        // given the invalidated set.
        let waiting = {
            let environments = environments.clone();
            tokio::spawn(async move { environments.get("prod").await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !waiting.is_finished(),
            "not answered with the invalidated set"
        );
        store.release.add_permits(1);
        let served = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("answered once the refresh is done")
            .expect("joined")
            .expect("served");
        assert_ne!(served.set.digest, first.set.digest, "the new set");
    }
}
