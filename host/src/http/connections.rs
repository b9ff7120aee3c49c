//! The accept loop: HTTP/1.1 connections served by hyper with the bounds a
//! public port needs, which `axum::serve` does not set ("use hyper or
//! hyper-util if you need configuration", its docs say).
//!
//! - A connection must send a request's headers within
//!   [`ConnectionLimits::header_timeout`] of starting to read them, an idle
//!   keep-alive connection included; else it is closed. Without this, a
//!   client holding about 20,000 connections that never finished their
//!   headers made flaghost unreachable and out of file descriptors. (Each
//!   connection's timeouts share one timer: `super::header_timer`.)
//! - At most [`ConnectionLimits::max_connections`] are open at once; one past
//!   that is closed at once, so the descriptors flaghost needs for its flag
//!   and plugin directories, Redis and child compilers stay free.
//! - One client (an IPv4 address, or an IPv6 /64, which one host commonly
//!   holds whole) has at most [`ConnectionLimits::max_per_client`] of them,
//!   so a single client cannot take every slot from the others.
//! - The whole of a request body must arrive within the body timeout, not
//!   each piece of it (a router layer, see `super::body_deadline`).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt as _;
use tracing::{debug, warn};

use super::header_timer::ConnectionTimer;

/// Default time a client has to send a request's headers.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Default time a client has to send a request's body.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Descriptors kept for flaghost's own files, Redis and child processes
/// when the connection bound is derived from the process's limit.
const RESERVED_DESCRIPTORS: u64 = 256;

/// The bounds on client connections.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Time to send a request's headers (from the first byte read, or from
    /// the end of the previous request on a keep-alive connection).
    pub header_timeout: Duration,
    /// Client connections open at once.
    pub max_connections: usize,
    /// Connections open at once from one client address (IPv6: one /64).
    pub max_per_client: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        let max_connections = default_max_connections();
        Self {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            max_connections,
            max_per_client: default_max_per_client(max_connections),
        }
    }
}

/// Half of `max_connections`: whoever holds the most connections, as many
/// are left for everyone else. (Behind a proxy every connection comes from
/// the proxy's address: raise it to `max_connections` there.)
pub fn default_max_per_client(max_connections: usize) -> usize {
    (max_connections / 2).max(1)
}

/// The process's open-file limit less [`RESERVED_DESCRIPTORS`], at most
/// 10,000 and at least 64. The hard limit: [`serve`] raises the soft one to
/// it (and lowers the bound again if it cannot).
pub fn default_max_connections() -> usize {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .maximum
        .unwrap_or(u64::MAX);
    usize::try_from(limit.saturating_sub(RESERVED_DESCRIPTORS).clamp(64, 10_000)).unwrap_or(10_000)
}

/// `wanted` connections, or fewer if the process's open-file limit (its
/// soft limit raised to the hard one first) would not leave
/// [`RESERVED_DESCRIPTORS`] beside them: running out of descriptors must
/// never stop flag and plugin reloads, Redis or plugin compiles.
fn within_descriptors(wanted: usize) -> usize {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            debug!(error = %e, "cannot raise the open-file limit to its hard limit");
        }
    }
    let Some(soft) = getrlimit(Resource::Nofile).current else {
        return wanted;
    };
    let room = usize::try_from(soft.saturating_sub(RESERVED_DESCRIPTORS))
        .unwrap_or(usize::MAX)
        .max(1);
    if wanted > room {
        warn!(
            wanted,
            allowed = room,
            open_file_limit = soft,
            "--max-connections is more than the open-file limit leaves beside the {RESERVED_DESCRIPTORS} descriptors kept for flag files, plugins and Redis: using {room}"
        );
        return room;
    }
    wanted
}

/// Serves `router` on `listener` until `shutdown` completes, then waits for
/// the connections' in-flight requests to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let max_connections = within_descriptors(limits.max_connections);
    let open = Arc::new(Semaphore::new(max_connections));
    let clients = Clients::new(limits.max_per_client.min(max_connections));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // NB: out of descriptors (EMFILE) or a connection reset
                    // before it was accepted: wait a moment rather than spin.
                    warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            debug!(
                max = max_connections,
                "connection refused: as many are open as may be"
            );
            drop(stream);
            continue;
        };
        let Some(client_permit) = clients.admit(peer.ip()) else {
            debug!(
                client = %peer.ip(),
                max = clients.max,
                "connection refused: this client has as many open as one may"
            );
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(
            router
                .clone()
                .map_request(|request: axum::http::Request<Incoming>| request.map(Body::new)),
        );
        // NB: a timer of the connection's own, so its header timeouts share
        // one tokio timer instead of registering one per request.
        let mut connection_builder = builder.clone();
        connection_builder.timer(ConnectionTimer::default());
        let connection =
            graceful.watch(connection_builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            // A client that goes away or times out ends its connection: not
            // flaghost's error.
            if let Err(e) = connection.await {
                debug!(error = %e, "connection ended");
            }
            drop(client_permit);
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Open connections per client, for [`ConnectionLimits::max_per_client`].
#[derive(Clone)]
struct Clients {
    open: Arc<Mutex<HashMap<ClientKey, usize>>>,
    max: usize,
}

/// A client as connections are counted: an IPv4 address, or the /64 an
/// IPv6 address is in (an IPv4-mapped IPv6 address counts as IPv4).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum ClientKey {
    V4(Ipv4Addr),
    V6(u64),
}

impl ClientKey {
    fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::V4(v4),
                None => Self::V6((v6.to_bits() >> 64) as u64),
            },
        }
    }
}

/// One connection of one client; counted down when dropped.
struct ClientPermit {
    clients: Clients,
    key: ClientKey,
}

impl Clients {
    fn new(max: usize) -> Self {
        Self {
            open: Arc::default(),
            max,
        }
    }

    /// Counts a connection from `ip`; `None` when it already has the most.
    fn admit(&self, ip: IpAddr) -> Option<ClientPermit> {
        let key = ClientKey::of(ip);
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(key).or_default();
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(ClientPermit {
            clients: self.clone(),
            key,
        })
    }
}

impl Drop for ClientPermit {
    fn drop(&mut self) {
        let mut open = self
            .clients
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_its_share_and_no_more_and_gets_it_back() {
        let clients = Clients::new(2);
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let a_mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let first = clients.admit(a).expect("first");
        let _second = clients.admit(a_mapped).expect("the same client, mapped");
        assert!(clients.admit(a).is_none(), "a third is refused");
        assert!(clients.admit(b).is_some(), "another client is not");
        drop(first);
        assert!(clients.admit(a).is_some(), "a closed one frees its slot");
    }

    #[test]
    fn an_ipv6_client_is_its_64_prefix() {
        let clients = Clients::new(1);
        let one: IpAddr = "2001:db8:1:2::1".parse().expect("ip");
        let same_64: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
        let other_64: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        let _held = clients.admit(one).expect("first");
        assert!(clients.admit(same_64).is_none(), "the same /64");
        assert!(clients.admit(other_64).is_some(), "another /64");
    }
}
