//! The admin API, behind a bearer token (`FLAGHOST_ADMIN_TOKEN`). Without a
//! configured token it is off (404), never open.

use std::sync::Arc;

use axum::Json;
use axum::body::{Body, BodyDataStream};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::ValidPath;
use super::{ApiError, AppState};
use crate::environments::{Invalidation, LookupError};
use crate::plugin_changes::{PluginChanges, Upload};
use crate::plugins::{CONTRACT_VERSIONS, Origin, Plugin, ReloadReport, StatsSnapshot};
use crate::store::valid_environment_name;

/// A bearer token (the admin token, or the metrics token), kept as its
/// digest: comparing digests takes the same time whatever the guess, so the
/// token cannot be found byte by byte.
#[derive(Clone)]
pub struct BearerToken([u8; 32]);

impl BearerToken {
    /// The token `token`.
    pub fn new(token: &str) -> Self {
        Self(Sha256::digest(token.as_bytes()).into())
    }

    fn matches(&self, presented: &str) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented.trim().as_bytes()).into();
        digest == self.0
    }

    fn admits(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let presented = bearer(headers).ok_or_else(|| {
            ApiError::Unauthorized(
                "send the admin token as \"Authorization: Bearer <token>\"".into(),
            )
        })?;
        if self.matches(presented) {
            Ok(())
        } else {
            Err(ApiError::Unauthorized("wrong admin token".into()))
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(***)")
    }
}

pub(super) fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    match &state.admin {
        None => Err(ApiError::AdminOff),
        Some(token) => token.admits(headers),
    }
}

/// `/metrics` on the main address: the metrics token reads it, and so does
/// the admin token; without a metrics token, as the admin API.
pub(super) fn authorize_metrics(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(metrics) = &state.metrics_token else {
        return authorize(state, headers);
    };
    let presented = bearer(headers).ok_or_else(|| {
        ApiError::Unauthorized(
            "send the metrics token (or the admin token) as \"Authorization: Bearer <token>\""
                .into(),
        )
    })?;
    let admin = state.admin.as_ref().is_some_and(|a| a.matches(presented));
    if metrics.matches(presented) || admin {
        Ok(())
    } else {
        Err(ApiError::Unauthorized(
            "wrong token: /metrics takes the metrics token or the admin token".into(),
        ))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InvalidateRequest {
    environment: Option<String>,
}

/// Largest body `invalidate` reads: `{"environment": "<name>"}` with room.
const MAX_INVALIDATE_BYTES: usize = 4096;

/// `POST /admin/v1/cache/invalidate` with `{"environment": "<env>"}` (or no
/// environment, or no body, for every one): drops the cached flag sets here,
/// in Redis and in every other instance.
pub async fn invalidate(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Invalidation>, ApiError> {
    // NB: the token before the body: without it, nobody gets flaghost to
    // read and hold one.
    authorize(&state, &headers)?;
    let bad = |details: String| ApiError::BadRequest { key: None, details };
    let body = axum::body::to_bytes(body, MAX_INVALIDATE_BYTES)
        .await
        .map_err(|e| match std::error::Error::source(&e) {
            Some(limit) if limit.is::<http_body_util::LengthLimitError>() => ApiError::TooLarge {
                key: None,
                details: format!(
                    "the body is over {MAX_INVALIDATE_BYTES} bytes: send {{\"environment\": \"<name>\"}} or nothing"
                ),
            },
            _ => ApiError::unreadable_body(None, &e),
        })?;
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
    // NB: a name no flag file has is a mistake to report (a typo would
    // otherwise look like a successful kill switch).
    if let Some(env) = &request.environment
        && !state.environments.exists(env).await
    {
        return Err(ApiError::Environment {
            key: None,
            error: LookupError::NotFound(env.clone()),
        });
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
    /// `fresh` (nothing survives an evaluation) or `reuse` (state may cross
    /// callers and flags on a plugin thread): `--plugin-isolation[-for]`.
    isolation: String,
    /// Unix milliseconds.
    loaded_at: u64,
    /// Imports outside the contract; calling them traps.
    trapped_imports: Vec<String>,
    #[serde(flatten)]
    stats: StatsSnapshot,
}

fn info(p: &Plugin) -> PluginInfo {
    PluginInfo {
        name: p.name().to_owned(),
        digest: p.digest().to_owned(),
        size: p.size(),
        contract_version: p.contract_version().to_owned(),
        origin: match p.origin() {
            Origin::Compiled => "compiled",
            Origin::Precompiled => "precompiled",
        },
        load_time_ms: p.load_time().as_secs_f64() * 1000.0,
        isolation: p.isolation().to_string(),
        loaded_at: p
            .loaded_at()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        trapped_imports: p.trapped_imports().to_vec(),
        stats: p.stats(),
    }
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
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<PluginListing>, ApiError> {
    authorize(&state, &headers)?;
    let plugins = state.plugins.current().iter().map(|p| info(p)).collect();
    Ok(Json(PluginListing {
        contract_versions: CONTRACT_VERSIONS,
        plugins,
        reload: state.plugins.report(),
    }))
}

/// The plugin changes, if flaghost has a plugin directory to change.
fn changes(state: &AppState) -> Result<Arc<PluginChanges>, ApiError> {
    state.plugin_changes.clone().ok_or_else(|| {
        ApiError::Conflict(
            "flaghost runs without a plugin directory: start it with --plugins DIR \
             (FLAGHOST_PLUGINS) to upload plugins"
                .into(),
        )
    })
}

/// The answer to an upload.
#[derive(Serialize)]
pub struct Uploaded {
    change: Upload,
    plugin: PluginInfo,
}

/// `PUT /admin/v1/plugins/{name}` with the component's bytes as the body:
/// compiled and checked, and every flag file checked against it, before it
/// is written to the plugin directory and put in force. 201 when the plugin
/// is new, 200 when it replaced (or already was) the loaded version.
pub async fn put_plugin(
    State(state): State<Arc<AppState>>,
    ValidPath(name): ValidPath<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Uploaded>), ApiError> {
    // NB: the token is checked before the body is buffered: without it,
    // nobody gets flaghost to hold a component-sized body. A refused body is
    // still read (and dropped, never held) so the caller reads the answer
    // rather than a connection reset in the middle of its upload.
    let mut body = body.into_data_stream();
    let changes = match authorize(&state, &headers).and_then(|()| changes(&state)) {
        Ok(changes) => changes,
        Err(e) => {
            discard(&headers, &mut body, 0).await;
            return Err(e);
        }
    };
    let limit = changes.max_file_bytes();
    let too_large = || ApiError::TooLarge {
        key: None,
        details: format!(
            "the component is over the upload limit of {limit} bytes \
             (--plugin-max-file-mib, FLAGHOST_PLUGIN_MAX_FILE_MIB)"
        ),
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        discard(&headers, &mut body, 0).await;
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ApiError::unreadable_body(None, &e))?;
        if bytes.len() + chunk.len() > limit {
            discard(&headers, &mut body, bytes.len() + chunk.len()).await;
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
    // NB: run to its end even if the caller goes away: a change stopped
    // between writing the file and swapping the set would leave them apart.
    let bytes: Arc<[u8]> = bytes.into();
    let (upload, plugin) = tokio::spawn(async move { changes.put(&name, bytes).await })
        .await
        .map_err(|e| ApiError::Internal(format!("the upload failed: {e}")))??;
    let status = match upload {
        Upload::Added => StatusCode::CREATED,
        Upload::Replaced | Upload::Unchanged => StatusCode::OK,
    };
    Ok((
        status,
        Json(Uploaded {
            change: upload,
            plugin: info(&plugin),
        }),
    ))
}

/// How much of a refused upload is read (and dropped) before answering:
/// past it, the connection is closed on the caller.
const DISCARD_LIMIT: usize = 64 << 20;

/// How long a refused upload is read before answering anyway: a caller
/// sending a byte at a time does not hold the handler.
const DISCARD_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads and drops the rest of `body`, `read` bytes of which are already
/// read, up to [`DISCARD_LIMIT`] and [`DISCARD_TIME`]. Not when the caller
/// waits for `100 Continue` before sending (answering at once spares it the
/// upload), nor when it declares more than the limit.
async fn discard(headers: &HeaderMap, body: &mut BodyDataStream, mut read: usize) {
    let expects_continue = headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let declared_over = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .is_some_and(|n| n > DISCARD_LIMIT as u64);
    if expects_continue || declared_over {
        return;
    }
    let drain = async {
        while read <= DISCARD_LIMIT {
            match body.next().await {
                Some(Ok(chunk)) => read += chunk.len(),
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(DISCARD_TIME, drain).await;
}

/// The answer to a deletion.
#[derive(Serialize)]
pub struct Deleted {
    deleted: String,
    /// The plugin as it was when unloaded; `None` if only a refused file
    /// was deleted.
    plugin: Option<PluginInfo>,
}

/// `DELETE /admin/v1/plugins/{name}`: unloads the plugin and deletes its
/// file; refused (409) while flags use it.
pub async fn delete_plugin(
    State(state): State<Arc<AppState>>,
    ValidPath(name): ValidPath<String>,
    headers: HeaderMap,
) -> Result<Json<Deleted>, ApiError> {
    authorize(&state, &headers)?;
    let changes = changes(&state)?;
    let deleted = name.clone();
    let unloaded = tokio::spawn(async move { changes.delete(&name).await })
        .await
        .map_err(|e| ApiError::Internal(format!("the deletion failed: {e}")))??;
    Ok(Json(Deleted {
        deleted,
        plugin: unloaded.as_deref().map(info),
    }))
}
