//! Liveness and readiness.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::AppState;

/// `GET /healthz`: the process is up and serving, and which cache serves.
pub async fn healthz(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"status": "ok", "cache": state.environments.cache_status()}))
}

/// `GET /readyz`: ready to evaluate. Redis being down does not make
/// flaghost unready (it serves from memory); the answer says which cache
/// backend serves (`redis`, `memory-fallback`, `memory-only`) and the Redis
/// connection's state.
pub async fn readyz(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"status": "ready", "cache": state.environments.cache_status()}))
}
