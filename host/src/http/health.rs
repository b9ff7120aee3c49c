//! Liveness and readiness.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::AppState;

/// `GET /healthz`: the process is up and serving, and which cache serves.
pub async fn healthz(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"status": "ok", "cache": state.environments.cache_status()}))
}

/// `GET /readyz`: ready to evaluate. Redis being down does not make
/// flaghost unready (it serves from memory); the answer says which cache
/// backend serves (`redis`, `memory-fallback`, `memory-only`) and the Redis
/// connection's state. With no environment to serve (no flag file loaded
/// yet), 503: a load balancer must not send callers here.
pub async fn readyz(State(state): State<Arc<AppState>>) -> (StatusCode, Json<Value>) {
    let cache = state.environments.cache_status();
    if state.environments.served_count() == 0 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "status": "unready",
                "reason": "no environment has a flag file loaded: add one to the flag directory (see the log for refused files)",
                "cache": cache,
            })),
        );
    }
    (
        StatusCode::OK,
        Json(json!({"status": "ready", "cache": cache})),
    )
}
