//! The admin API, behind a bearer token (`FLAGHOST_ADMIN_TOKEN`). Without a
//! configured token it is off (404), never open.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, header};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{ApiError, AppState};
use crate::environments::Invalidation;
use crate::plugins::{CONTRACT_VERSIONS, Origin, ReloadReport, StatsSnapshot};
use crate::store::valid_environment_name;

/// The admin token, kept as its digest: comparing digests takes the same
/// time whatever the guess, so the token cannot be found byte by byte.
#[derive(Clone)]
pub struct AdminToken([u8; 32]);

impl AdminToken {
    /// The token `token`.
    pub fn new(token: &str) -> Self {
        Self(Sha256::digest(token.as_bytes()).into())
    }

    fn admits(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ApiError::Unauthorized(
                    "send the admin token as \"Authorization: Bearer <token>\"".into(),
                )
            })?;
        let digest: [u8; 32] = Sha256::digest(presented.trim().as_bytes()).into();
        if digest == self.0 {
            Ok(())
        } else {
            Err(ApiError::Unauthorized("wrong admin token".into()))
        }
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(***)")
    }
}

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    match &state.admin {
        None => Err(ApiError::AdminOff),
        Some(token) => token.admits(headers),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InvalidateRequest {
    environment: Option<String>,
}

/// `POST /admin/v1/cache/invalidate` with `{"environment": "<env>"}` (or no
/// environment, or no body, for every one): drops the cached flag sets here,
/// in Redis and in every other instance.
pub async fn invalidate(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Invalidation>, ApiError> {
    authorize(&state, &headers)?;
    let bad = |details: String| ApiError::BadRequest { key: None, details };
    let body = body.map_err(|e| bad(format!("cannot read the request body: {e}")))?;
    let request = if body.iter().all(u8::is_ascii_whitespace) {
        InvalidateRequest { environment: None }
    } else {
        serde_json::from_slice::<InvalidateRequest>(&body).map_err(|e| {
            bad(format!(
                "the body must be {{\"environment\": \"<name>\"}} or empty: {e}"
            ))
        })?
    };
    if let Some(env) = &request.environment
        && !valid_environment_name(env)
    {
        return Err(bad(format!(
            "invalid environment name {env:?}: use letters, digits, '_', '.' and '-'"
        )));
    }
    let report = state
        .environments
        .invalidate(request.environment.as_deref())
        .await;
    Ok(Json(report))
}

/// One plugin in the admin listing.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginInfo {
    name: String,
    digest: String,
    size: usize,
    contract_version: String,
    /// `compiled` or `precompiled` (loaded from `--plugin-cache-dir`).
    origin: &'static str,
    load_time_ms: f64,
    /// Unix milliseconds.
    loaded_at: u64,
    /// Imports outside the contract; calling them traps.
    trapped_imports: Vec<String>,
    #[serde(flatten)]
    stats: StatsSnapshot,
}

/// The admin listing of plugins.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginListing {
    contract_versions: &'static [&'static str],
    plugins: Vec<PluginInfo>,
    /// Plugin files refused by the directory watcher, and plugins kept
    /// loaded after their file was removed.
    reload: ReloadReport,
}

/// `GET /admin/v1/plugins`: every loaded plugin with its digest, size,
/// contract version, load time, and its evaluation, error and timeout counts
/// and latency percentiles.
pub async fn plugins(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<PluginListing>, ApiError> {
    authorize(&state, &headers)?;
    let plugins = state
        .plugins
        .current()
        .iter()
        .map(|p| PluginInfo {
            name: p.name().to_owned(),
            digest: p.digest().to_owned(),
            size: p.size(),
            contract_version: p.contract_version().to_owned(),
            origin: match p.origin() {
                Origin::Compiled => "compiled",
                Origin::Precompiled => "precompiled",
            },
            load_time_ms: p.load_time().as_secs_f64() * 1000.0,
            loaded_at: p
                .loaded_at()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            trapped_imports: p.trapped_imports().to_vec(),
            stats: p.stats(),
        })
        .collect();
    Ok(Json(PluginListing {
        contract_versions: CONTRACT_VERSIONS,
        plugins,
        reload: state.plugins.report(),
    }))
}
