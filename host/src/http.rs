//! The HTTP edge: the OFREP endpoints, per environment, and health.
//!
//! `/ofrep/v1/...` evaluates in the default environment and
//! `/environments/{env}/ofrep/v1/...` in `{env}`, so an OpenFeature client
//! picks its environment with its base URL alone.

mod admin;
mod body_deadline;
pub mod connections;
mod error;
mod header_timer;
mod health;
mod metrics;
mod ofrep;

pub use admin::BearerToken;
pub use connections::ConnectionLimits;
pub use error::ApiError;
pub use ofrep::answer_json;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::routing::{get, post, put};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::access::ApiKeys;
use crate::environments::Environments;
use crate::metrics::Metrics;
use crate::plugin_changes::PluginChanges;
use crate::plugins::{PluginPool, PluginRegistry};

/// Default limit on a request body.
pub const DEFAULT_BODY_LIMIT: usize = 1 << 20;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// Where flag sets come from.
    pub environments: Arc<Environments>,
    /// The environment `/ofrep/v1/...` evaluates in.
    pub default_environment: Arc<str>,
    /// The admin API's token; `None`: the admin API is off.
    pub admin: Option<BearerToken>,
    /// A token that reads `/metrics` only (and the admin token does too).
    pub metrics_token: Option<BearerToken>,
    /// The plugins in force, for the admin listing.
    pub plugins: PluginRegistry,
    /// Uploads and deletions of plugins; `None` without a plugin directory.
    pub plugin_changes: Option<Arc<PluginChanges>>,
    /// The threads plugin evaluations run on, and each request's budget on
    /// them.
    pub plugin_pool: PluginPool,
    /// Wall-clock budget of one request's plugin calls.
    pub plugin_budget: std::time::Duration,
    /// Callers' API keys; `None`: evaluation is open to any caller.
    pub api_keys: Option<Arc<ApiKeys>>,
    /// What `/metrics` exposes; evaluations and requests are counted in it.
    pub metrics: Arc<Metrics>,
}

/// Which browser origins may call flaghost (CORS).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Cors {
    /// No CORS headers: browsers refuse cross-origin calls.
    #[default]
    Off,
    /// Any origin (`*`).
    Any,
    /// These origins (`https://app.example.com`).
    Origins(Vec<HeaderValue>),
}

/// How the HTTP edge behaves.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Largest request body accepted; larger is a 413.
    pub body_limit: usize,
    /// Time a client has to send a request's body.
    pub body_timeout: std::time::Duration,
    /// Browser origins allowed to call.
    pub cors: Cors,
    /// Bounds on client connections.
    pub connections: ConnectionLimits,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            body_limit: DEFAULT_BODY_LIMIT,
            body_timeout: connections::DEFAULT_BODY_TIMEOUT,
            cors: Cors::Off,
            connections: ConnectionLimits::default(),
        }
    }
}

/// The CORS layer for `cors`: what OpenFeature's web SDKs send (a JSON POST,
/// `If-None-Match` on bulk polls, an API key or bearer token) is allowed, and
/// `ETag` is exposed so a browser client can read it.
fn cors_layer(cors: &Cors) -> Option<CorsLayer> {
    let origins = match cors {
        Cors::Off => return None,
        Cors::Any => AllowOrigin::any(),
        Cors::Origins(list) => AllowOrigin::list(list.clone()),
    };
    Some(
        CorsLayer::new()
            .allow_origin(origins)
            .allow_methods([Method::POST, Method::GET, Method::OPTIONS])
            .allow_headers([
                header::CONTENT_TYPE,
                header::IF_NONE_MATCH,
                header::AUTHORIZATION,
                HeaderName::from_static("x-api-key"),
            ])
            .expose_headers([header::ETAG])
            .max_age(std::time::Duration::from_secs(3600)),
    )
}

/// The router of `--metrics-listen`: `GET /metrics`, open (the operator
/// chose who can reach that address).
pub fn metrics_app(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics::open))
        .fallback(error::not_found)
        .with_state(Arc::new(state))
}

/// The router, without a socket: tests and benches call it with `oneshot`.
pub fn app(state: AppState, options: &HttpOptions) -> Router {
    // NB: shared, not cloned field by field: axum hands every request
    // its own copy of the state, and cloning (then dropping) each of its
    // `Arc`s was about 3% of a single-flag request's CPU.
    let state = Arc::new(state);
    // NB: every route at its full path, merged rather than nested: a nested
    // router wraps each of its routes in a layer that strips the prefix (a
    // new URI per request) and one that records the nested path: measured
    // (perf stat, wrk -c64), about 2 µs of a single-flag request's 16.
    let mut ofrep = Router::new();
    for prefix in ["/ofrep/v1", "/environments/{environment}/ofrep/v1"] {
        ofrep = ofrep
            .route(
                &format!("{prefix}/evaluate/flags"),
                post(ofrep::evaluate_all),
            )
            .route(
                &format!("{prefix}/evaluate/flags/{{key}}"),
                post(ofrep::evaluate_one),
            );
    }
    if state.api_keys.is_some() {
        // NB: a layer on the matched routes, so a caller without a key is
        // turned away before its body is read; without keys there is no
        // layer at all (nothing on the open path's requests).
        ofrep = ofrep.route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            ofrep::admit,
        ));
    }
    let router = Router::new()
        .merge(ofrep)
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(metrics::behind_token))
        .route("/admin/v1/cache/invalidate", post(admin::invalidate))
        .route("/admin/v1/plugins", get(admin::plugins))
        .route(
            "/admin/v1/plugins/{name}",
            put(admin::put_plugin).delete(admin::delete_plugin),
        )
        // NB: on the matched routes, where the route's pattern is known (a
        // path's flag key or environment never becomes a label); requests
        // no route matches are counted by the fallbacks.
        .route_layer(metrics::Track(state.clone()))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(options.body_limit))
        // NB: a body that trickles in is cut off (slowloris on the body);
        // the headers are bounded by the connection (see `connections`).
        .layer(body_deadline::layer(options.body_timeout))
        .with_state(state);
    match cors_layer(&options.cors) {
        Some(cors) => router.layer(cors),
        None => router,
    }
}
