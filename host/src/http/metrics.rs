//! `GET /metrics` (Prometheus text), and what every matched request gets:
//! a request id, a `request` span, and its metrics.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;

use super::{ApiError, AppState};
use crate::metrics::Route;

/// `GET /metrics` on the public port: behind the metrics token or the
/// admin token.
pub async fn behind_token(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    super::admin::authorize_metrics(&state, &headers)?;
    Ok(exposition(&state))
}

/// `GET /metrics` on `--metrics-listen`: open.
pub async fn open(State(state): State<Arc<AppState>>) -> Response {
    exposition(&state)
}

fn exposition(state: &AppState) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
        )],
        state.metrics.encode(),
    )
        .into_response()
}

/// Runs each request to a matched route in a `request` span carrying its
/// request id (the caller's `X-Request-Id` if it sent a usable one, else a
/// new one; answered in `X-Request-Id`), its parent the caller's trace
/// context when traces are on; and counts it: route, method, status and
/// time to the response's headers.
///
/// NB: a service of its own, not `axum::middleware::from_fn`: that clones
/// the route's boxed service and boxes it again for every request, which
/// a single-flag request paid for in CPU (perf, side by side).
#[derive(Clone)]
pub struct Track(pub Arc<AppState>);

impl<S> tower::Layer<S> for Track {
    type Service = Tracked<S>;

    fn layer(&self, inner: S) -> Tracked<S> {
        Tracked {
            inner,
            state: self.0.clone(),
        }
    }
}

/// A route's service, tracked (see [`Track`]).
#[derive(Clone)]
pub struct Tracked<S> {
    inner: S,
    state: Arc<AppState>,
}

impl<S> tower::Service<Request> for Tracked<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        use tracing::Instrument as _;
        let started = Instant::now();
        let method = request.method().clone();
        // NB: the route's number, not a clone of the matched path: an
        // `Arc` every request on every core would write the count of.
        let route = Route::of(
            request
                .extensions()
                .get::<MatchedPath>()
                .map(MatchedPath::as_str),
        );
        let id = RequestId::of(request.headers());
        // NB: with traces off, the span carries the request id alone: at
        // the default level the log layer formats every field into a
        // string for each request, whether or not a line is then logged.
        let span = if crate::telemetry::traces_on() {
            let span = tracing::info_span!(
                "request",
                request_id = %id,
                method = %method,
                route = route.as_str(),
                otel.kind = "server",
                http.response.status_code = tracing::field::Empty,
            );
            // NB: with API keys, only a caller with a key joins its trace
            // to ours: a `traceparent` marked sampled would otherwise let
            // anyone who reaches the port have flaghost export its spans.
            if (self.state.api_keys.as_ref()).is_none_or(|keys| keys.recognises(request.headers()))
            {
                crate::telemetry::adopt_caller_context(&span, request.headers());
            }
            span
        } else {
            tracing::info_span!("request", request_id = %id)
        };
        let answer = self.inner.call(request).instrument(span.clone());
        let state = self.state.clone();
        Box::pin(async move {
            let Ok(mut response) = answer.await;
            let status = response.status().as_u16();
            span.record("http.response.status_code", status);
            state
                .metrics
                .request(route, &method, status, started.elapsed());
            if let RequestId::Given(value) = id {
                response.headers_mut().insert(REQUEST_ID, value);
            }
            Ok(response)
        })
    }
}

const REQUEST_ID: header::HeaderName = header::HeaderName::from_static("x-request-id");

/// A request's id: the caller's `X-Request-Id` if it is one a log line can
/// carry as it is (1 to 64 letters, digits, `.`, `_`, `:` or `-`; answered
/// back), else a number of this process's.
///
/// NB: a number, not text, until a log line or a span prints it: making a
/// string for every request cost 1% of a single-flag request (perf).
enum RequestId {
    Given(HeaderValue),
    Own(u32, u64),
}

impl RequestId {
    fn of(headers: &HeaderMap) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        static PROCESS: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
        if let Some(given) = headers.get(REQUEST_ID)
            && (1..=64).contains(&given.len())
            && given
                .as_bytes()
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
        {
            return RequestId::Given(given.clone());
        }
        // NB: numbered per thread (a thread's number in the high bits): one
        // counter shared by every core is a cache line they take in turn.
        thread_local! {
            static OWN: std::cell::Cell<u64> =
                std::cell::Cell::new(NEXT.fetch_add(1, Ordering::Relaxed) << 40);
        }
        RequestId::Own(
            *PROCESS.get_or_init(rand::random::<u32>),
            OWN.with(|n| {
                let id = n.get();
                n.set(id + 1);
                id
            }),
        )
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // (Checked above: ASCII.)
            RequestId::Given(value) => f.write_str(value.to_str().unwrap_or_default()),
            RequestId::Own(process, n) => write!(f, "{process:08x}-{n:x}"),
        }
    }
}
