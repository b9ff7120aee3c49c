//! The accept loop: HTTP/1.1 connections served by hyper with the bounds a
//! public port needs, which `axum::serve` does not set ("use hyper or
//! hyper-util if you need configuration", its docs say).
//!
//! - A connection must send a request's headers within
//!   [`ConnectionLimits::header_timeout`] of starting to read them, an idle
//!   keep-alive connection included; else it is closed. Without this, a
//!   client holding about 20,000 connections that never finished their
//!   headers made flaghost unreachable and out of file descriptors.
//! - At most [`ConnectionLimits::max_connections`] are open at once; one past
//!   that is closed at once, so the descriptors flaghost needs for its flag
//!   and plugin directories, Redis and child compilers stay free.
//! - A request body must arrive within the body timeout (a router layer,
//!   see [`super::app`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt as _;
use tracing::{debug, warn};

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
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            max_connections: default_max_connections(),
        }
    }
}

/// The process's open-file limit less [`RESERVED_DESCRIPTORS`], at most
/// 10,000 and at least 64.
pub fn default_max_connections() -> usize {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    usize::try_from(limit.saturating_sub(RESERVED_DESCRIPTORS).clamp(64, 10_000)).unwrap_or(10_000)
}

/// Serves `router` on `listener` until `shutdown` completes, then waits for
/// the connections' in-flight requests to finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
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
                max = limits.max_connections,
                "connection refused: as many are open as may be"
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
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            // A client that goes away or times out ends its connection: not
            // flaghost's error.
            if let Err(e) = connection.await {
                debug!(error = %e, "connection ended");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
