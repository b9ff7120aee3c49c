//! The connection to Redis, behind a breaker.
//!
//! Requests share one [`ConnectionManager`] (cloned per call: it multiplexes,
//! so there is no connection and no lock per request) and only while the
//! breaker is closed. The first failure that says Redis is gone (refused,
//! dropped, `LOADING`, or no answer within the response timeout to a request
//! and then to a confirming `PING`) opens it:
//! from then on requests skip Redis at once and are served from memory,
//! while one supervisor task probes with `PING` at an exponential backoff
//! (100 ms doubling to 2 s, with jitter), logging each attempt. The probe
//! that succeeds closes the breaker and announces [`CacheEvent::Reconnected`].
//! A probe must connect within the connect timeout and then answer within the
//! response timeout, so a Redis too slow for requests stays behind the
//! breaker instead of flapping; a link that falls again soon after coming
//! up keeps its backoff. A probe that gets no answer replaces the connection
//! (a half-open socket never answers), and TCP keepalive and a user timeout
//! make a silently dead peer an error within seconds, not the kernel's
//! fifteen minutes.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rand::Rng;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{RedisError, RedisResult};
use tokio::sync::{Notify, broadcast, watch};
use tracing::{info, warn};

use crate::cache::{CacheError, CacheEvent, LinkStatus};

/// First delay between connection attempts.
pub const BACKOFF_START: Duration = Duration::from_millis(100);
/// Longest delay between connection attempts.
pub const BACKOFF_CAP: Duration = Duration::from_secs(2);
/// How long a link must stay up before a new outage starts its backoff over.
const STABLE: Duration = Duration::from_secs(5);

/// The delay before attempt `attempt` (1-based; the first is immediate):
/// 100 ms doubling per attempt up to 2 s, then jittered into its upper half
/// so that instances cut off together do not reconnect in step.
pub fn backoff(attempt: u32) -> Duration {
    if attempt <= 1 {
        return Duration::ZERO;
    }
    let doubling = 1u32 << (attempt - 2).min(8);
    let full = (BACKOFF_START * doubling).min(BACKOFF_CAP);
    let half = full / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
}

#[derive(Debug, Clone)]
enum State {
    Connecting,
    Connected,
    Disconnected(String),
}

/// The shared connection and its breaker.
pub struct Link {
    client: redis::Client,
    config: ConnectionManagerConfig,
    /// Replaced after a probe gets no answer.
    manager: ArcSwap<ConnectionManager>,
    /// Open: requests do not touch Redis. Read on every cache call.
    open: AtomicBool,
    /// The same, for tasks that wait for a change.
    up: watch::Sender<bool>,
    /// The state for `/readyz`; its lock also serialises opening and
    /// closing, so `open` and `up` never disagree.
    state: Mutex<(State, Instant)>,
    /// Whether the last write failed on a connected Redis (OOM, read-only
    /// replica): logged when it changes, not per write.
    writes_failing: AtomicBool,
    /// A confirming `PING` is under way (see [`Link::gone_after_timeout`]).
    confirming: AtomicBool,
    /// Requests that timed out while Redis still answered a `PING`.
    late_answers: AtomicU64,
    /// Times the breaker opened, and closed again.
    breaker_opened: AtomicU64,
    breaker_closed: AtomicU64,
    wake: Notify,
    events: broadcast::Sender<CacheEvent>,
    url: String,
    response_timeout: Duration,
    connect_timeout: Duration,
}

impl Link {
    /// A link to `client`, not yet connected: the supervisor connects it.
    pub fn new(
        client: redis::Client,
        url: String,
        response_timeout: Duration,
        connect_timeout: Duration,
        events: broadcast::Sender<CacheEvent>,
    ) -> RedisResult<Self> {
        // NB: the manager's own retries are off (our supervisor retries, and
        // logs each attempt); its timeouts match ours.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(response_timeout))
            .set_number_of_retries(0);
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?;
        Ok(Self {
            client,
            config,
            manager: ArcSwap::from_pointee(manager),
            open: AtomicBool::new(true),
            up: watch::Sender::new(false),
            state: Mutex::new((State::Connecting, Instant::now())),
            writes_failing: AtomicBool::new(false),
            confirming: AtomicBool::new(false),
            late_answers: AtomicU64::new(0),
            breaker_opened: AtomicU64::new(0),
            breaker_closed: AtomicU64::new(0),
            wake: Notify::new(),
            events,
            url,
            response_timeout,
            connect_timeout,
        })
    }

    /// Runs one request on the shared connection, unless the breaker is
    /// open; a failure that means Redis is unreachable opens it.
    pub async fn run<T, F, Fut>(&self, what: &'static str, request: F) -> Result<T, CacheError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if self.open.load(Ordering::Acquire) {
            return Err(error(format!(
                "{what}: redis is unreachable; serving from memory"
            )));
        }
        let connection = ConnectionManager::clone(&self.manager.load());
        // NB: the connection manager has the same response timeout as this
        // one; whichever fires first, a late answer is handled alike.
        match tokio::time::timeout(self.response_timeout, request(connection)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) if e.is_timeout() => Err(self.late(what).await),
            Ok(Err(e)) if unreachable(&e) => {
                self.trip(format!("{what}: {e}"));
                Err(error(format!("{what}: {e}")))
            }
            Ok(Err(e)) => Err(error(format!("{what}: {e}"))),
            Err(_) => Err(self.late(what).await),
        }
    }

    /// A request got no answer within the response timeout: the breaker
    /// opens only if Redis is gone (see [`Link::gone_after_timeout`]).
    async fn late(&self, what: &str) -> CacheError {
        let why = format!(
            "{what}: no answer within {} ms",
            self.response_timeout.as_millis()
        );
        if self.gone_after_timeout().await {
            self.trip(why.clone());
        }
        error(why)
    }

    /// After a request got no answer in time: whether Redis is gone, or was
    /// only late once. A `PING` on the same connection must answer within
    /// the response timeout; if it does, the breaker stays closed.
    ///
    /// NB: why not trip at once. Measured on a 2-core machine with both
    /// cores saturated by a build, `PING` round trips stayed at most 10 ms
    /// (`redis-cli --latency-history`), yet one `EXISTS` over 250 ms once
    /// opened the breaker for a Redis that was fine. Redis that is really
    /// gone refuses or drops the connection, which still trips at once; a
    /// stalled one (paused, partitioned) trips after the confirming `PING`,
    /// at twice the response timeout. One confirmation runs at a time:
    /// requests timing out meanwhile leave the decision to it.
    async fn gone_after_timeout(&self) -> bool {
        /// Ends the confirmation however its future ends: a request's
        /// future is dropped mid-`await` when its caller goes away, and a
        /// flag left set would stop every later timeout from tripping.
        struct Confirming<'a>(&'a AtomicBool);
        impl Drop for Confirming<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        if self.confirming.swap(true, Ordering::AcqRel) {
            return false;
        }
        let _confirming = Confirming(&self.confirming);
        let mut connection = ConnectionManager::clone(&self.manager.load());
        let command = redis::cmd("PING");
        let ping = command.query_async::<String>(&mut connection);
        let answered = matches!(
            tokio::time::timeout(self.response_timeout, ping).await,
            Ok(Ok(_))
        );
        if answered {
            self.late_answers.fetch_add(1, Ordering::Relaxed);
            warn!(redis = %self.url, "a redis answer came later than the response timeout, but redis answers: staying on redis");
        }
        !answered
    }

    /// Requests that got no answer in time while Redis still answered a
    /// confirming `PING`.
    fn late_answers(&self) -> u64 {
        self.late_answers.load(Ordering::Relaxed)
    }

    /// Notes how a write went, logging only when that changes.
    pub fn note_write(&self, result: &Result<(), CacheError>) {
        let failing = result.is_err();
        if self.writes_failing.swap(failing, Ordering::AcqRel) != failing {
            match result {
                Err(e) => {
                    warn!(error = %e, "redis refuses writes; flag sets are served from memory and written again when it accepts them")
                }
                Ok(()) => info!("redis accepts writes again"),
            }
        }
    }

    /// Opens the breaker: logs once, and wakes the supervisor.
    fn trip(&self, why: String) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if self.open.swap(true, Ordering::AcqRel) {
            return;
        }
        self.breaker_opened.fetch_add(1, Ordering::Relaxed);
        warn!(redis = %self.url, error = %why,
              "redis unreachable: serving from memory until it answers again");
        *state = (State::Disconnected(why), Instant::now());
        self.up.send_replace(false);
        drop(state);
        self.wake.notify_one();
    }

    /// Closes the breaker: requests go to Redis again.
    fn close(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        // NB: only a breaker that tripped closes again: the first
        // connection is none, even after failed attempts (Redis down at
        // start), so `closed` never runs ahead of `opened`. Both change
        // under this lock.
        if self.breaker_opened.load(Ordering::Relaxed) > self.breaker_closed.load(Ordering::Relaxed)
        {
            self.breaker_closed.fetch_add(1, Ordering::Relaxed);
        }
        *state = (State::Connected, Instant::now());
        self.open.store(false, Ordering::Release);
        self.up.send_replace(true);
    }

    fn set_state(&self, state: State) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = (state, Instant::now());
    }

    /// Whether requests go to Redis.
    pub fn is_up(&self) -> bool {
        !self.open.load(Ordering::Acquire)
    }

    /// Waits until the link is down.
    pub async fn until_down(&self) {
        let mut up = self.up.subscribe();
        // NB: an error means the sender is gone, and the link with it.
        let _ = up.wait_for(|up| !*up).await;
    }

    /// Waits until the link is up.
    pub async fn until_up(&self) {
        let mut up = self.up.subscribe();
        // NB: an error means the sender is gone, and the link with it.
        let _ = up.wait_for(|up| *up).await;
    }

    /// The link's state, for `/readyz`.
    pub fn status(&self) -> LinkStatus {
        let (state, since) = self
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let (name, last_error) = match state {
            State::Connecting => ("connecting", None),
            State::Connected => ("connected", None),
            State::Disconnected(why) => ("disconnected", Some(why)),
        };
        LinkStatus {
            state: name,
            url: self.url.clone(),
            since_seconds: since.elapsed().as_secs(),
            last_error,
            late_answers: self.late_answers(),
            breaker_opened: self.breaker_opened.load(Ordering::Relaxed),
            breaker_closed: self.breaker_closed.load(Ordering::Relaxed),
        }
    }

    /// Keeps the link up: whenever the breaker is open, probes at the
    /// backoff until Redis answers. Runs until the task is aborted.
    pub async fn supervise(self: Arc<Self>) {
        let mut attempt = 0u32;
        let mut up_since: Option<Instant> = None;
        loop {
            if self.is_up() {
                self.wake.notified().await;
                continue;
            }
            if up_since.is_none_or(|since| since.elapsed() >= STABLE) {
                attempt = 0;
            }
            loop {
                attempt = attempt.saturating_add(1);
                let delay = backoff(attempt);
                info!(redis = %self.url, attempt, delay_ms = delay.as_millis() as u64,
                      "connecting to redis");
                tokio::time::sleep(delay).await;
                match self.probe().await {
                    Ok(()) => break,
                    Err(why) => {
                        warn!(redis = %self.url, attempt, error = %why, "redis connection attempt failed");
                        self.set_state(State::Disconnected(why));
                    }
                }
            }
            info!(redis = %self.url, attempts = attempt, "redis connected");
            up_since = Some(Instant::now());
            self.close();
            let _ = self.events.send(CacheEvent::Reconnected);
        }
    }

    /// Connects (within the connect timeout), then needs an answer within
    /// the response timeout: what a request will need.
    async fn probe(&self) -> Result<(), String> {
        for (limit, what) in [
            (self.connect_timeout, "connect"),
            (self.response_timeout, "answer"),
        ] {
            let mut conn = ConnectionManager::clone(&self.manager.load());
            let command = redis::cmd("PING");
            let ping = command.query_async::<String>(&mut conn);
            match tokio::time::timeout(limit, ping).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    // NB: a connection whose set-up was refused (AUTH before
                    // the password was set, a LOADING server) keeps
                    // answering that refusal; the next probe starts anew.
                    self.renew();
                    return Err(e.to_string());
                }
                Err(_) => {
                    // NB: a connection that swallowed a request may be
                    // half-open; the next probe starts on a new one.
                    self.renew();
                    return Err(format!("no {what} within {} ms", limit.as_millis()));
                }
            }
        }
        Ok(())
    }

    fn renew(&self) {
        match ConnectionManager::new_lazy_with_config(self.client.clone(), self.config.clone()) {
            Ok(manager) => self.manager.store(Arc::new(manager)),
            Err(e) => warn!(redis = %self.url, error = %e, "cannot renew the redis connection"),
        }
    }
}

/// Whether `e` means Redis cannot serve at all now (as opposed to refusing
/// one command, as `OOM` or `READONLY` refuse writes while reads still work).
fn unreachable(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_refusal()
        || e.is_connection_dropped()
        || matches!(
            e.code(),
            Some("LOADING" | "BUSY" | "MASTERDOWN" | "TRYAGAIN" | "CLUSTERDOWN")
        )
}

fn error(reason: String) -> CacheError {
    CacheError {
        backend: "redis",
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(link: &Link) -> (u64, u64) {
        let status = link.status();
        (status.breaker_opened, status.breaker_closed)
    }

    #[tokio::test]
    async fn the_breaker_counts_a_close_only_after_it_opened() {
        // NB: nothing listens on port 1; the link is lazy and never dials.
        let client = redis::Client::open("redis://127.0.0.1:1").expect("url");
        let (events, _) = broadcast::channel(4);
        let link = Link::new(
            client,
            "redis://127.0.0.1:1".into(),
            Duration::from_millis(50),
            Duration::from_millis(50),
            events,
        )
        .expect("link");
        // Redis down at start: attempts fail, then it answers.
        link.set_state(State::Disconnected("refused".into()));
        link.close();
        assert_eq!(
            counts(&link),
            (0, 0),
            "the first connection is no transition"
        );
        link.trip("gone".into());
        link.trip("still gone".into());
        assert_eq!(counts(&link), (1, 0));
        link.set_state(State::Disconnected("refused again".into()));
        link.close();
        link.close();
        assert_eq!(counts(&link), (1, 1));
    }

    #[test]
    fn backoff_doubles_from_100ms_to_a_2s_cap_with_jitter() {
        assert_eq!(backoff(1), Duration::ZERO, "the first attempt is immediate");
        for _ in 0..50 {
            let second = backoff(2);
            assert!(second >= Duration::from_millis(50) && second <= BACKOFF_START);
            let third = backoff(3);
            assert!(third >= Duration::from_millis(100) && third <= Duration::from_millis(200));
            for late in [7, 12, 40] {
                let d = backoff(late);
                assert!(d >= BACKOFF_CAP / 2 && d <= BACKOFF_CAP, "{late}: {d:?}");
            }
        }
    }
}
