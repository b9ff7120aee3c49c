//! `GET /metrics` (Prometheus text), and what every matched request gets:
//! a request id (in a `request` span with traces on), and its metrics.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures_util::future::{BoxFuture, Either};

use super::{ApiError, AppState};
use crate::metrics::Route;
use crate::telemetry::RequestId;

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

/// Gives each request to a matched route its request id (the caller's
/// `X-Request-Id` if it sent a usable one, answered back in `X-Request-Id`,
/// else a new one) for its log lines: with traces on, in a `request` span
/// whose parent is the caller's trace context. Counts it: route, method,
/// status and time to the response's headers.
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
        let given = match &id {
            RequestId::Given(value) => Some(value.clone()),
            RequestId::Own(..) => None,
        };
        // NB: with traces off, no span: the id is carried for log lines
        // alone (see `telemetry::in_request`).
        let answer = if crate::telemetry::traces_on() {
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
            let answer = self.inner.call(request).instrument(span.clone());
            Either::Left(async move {
                let answer = answer.await;
                if let Ok(response) = &answer {
                    span.record("http.response.status_code", response.status().as_u16());
                }
                answer
            })
        } else {
            Either::Right(crate::telemetry::in_request(id, self.inner.call(request)))
        };
        let state = self.state.clone();
        Box::pin(async move {
            let Ok(mut response) = answer.await;
            let status = response.status().as_u16();
            state
                .metrics
                .request(route, &method, status, started.elapsed());
            if let Some(value) = given {
                response
                    .headers_mut()
                    .insert(crate::telemetry::REQUEST_ID_HEADER, value);
            }
            Ok(response)
        })
    }
}
