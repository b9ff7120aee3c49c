//! The HTTP edge: the OFREP endpoints, per environment, and health.
//!
//! `/ofrep/v1/...` evaluates in the default environment and
//! `/environments/{env}/ofrep/v1/...` in `{env}`, so an OpenFeature client
//! picks its environment with its base URL alone.

mod error;
mod health;
mod ofrep;

pub use error::ApiError;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};

use crate::environments::Environments;

/// Default limit on a request body.
pub const DEFAULT_BODY_LIMIT: usize = 1 << 20;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// Where flag sets come from.
    pub environments: Arc<Environments>,
    /// The environment `/ofrep/v1/...` evaluates in.
    pub default_environment: Arc<str>,
}

/// The router, without a socket: tests and benches call it with `oneshot`.
pub fn app(state: AppState, body_limit: usize) -> Router {
    let ofrep = Router::new()
        .route("/evaluate/flags", post(ofrep::evaluate_all))
        .route("/evaluate/flags/{key}", post(ofrep::evaluate_one));
    Router::new()
        .nest("/ofrep/v1", ofrep.clone())
        .nest("/environments/{environment}/ofrep/v1", ofrep)
        .route("/healthz", get(health::healthz))
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}
