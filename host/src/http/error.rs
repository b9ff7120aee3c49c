//! [`ApiError`]: the one place an error becomes a status and a JSON body.
//!
//! Bodies follow OFREP's failure shapes (`key`, `errorCode`, `errorDetails`),
//! which OpenFeature providers need to fall back to the caller's default.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tracing::{debug, error};

use crate::environments::LookupError;
use crate::evaluation::{ErrorCode, EvaluationError};
use crate::flags::Metadata;
use crate::plugin_changes::ChangeError;

/// An error answered to an HTTP caller.
#[derive(Debug)]
pub enum ApiError {
    /// The request was malformed: body, JSON or context shape.
    BadRequest {
        /// The flag asked for, on single-flag requests.
        key: Option<String>,
        /// What to fix.
        details: String,
    },
    /// The body was over the limit.
    TooLarge {
        /// The flag asked for, on single-flag requests.
        key: Option<String>,
        /// The limit.
        details: String,
    },
    /// The body did not arrive within its deadline (see `body_deadline`).
    TooSlow {
        /// The flag asked for, on single-flag requests.
        key: Option<String>,
        /// The deadline.
        details: String,
    },
    /// An environment that cannot be found or is unavailable.
    Environment {
        /// The flag asked for, on single-flag requests.
        key: Option<String>,
        /// Why.
        error: LookupError,
    },
    /// A flag's evaluation failed.
    Evaluation {
        /// The flag.
        key: String,
        /// How.
        error: EvaluationError,
    },
    /// No route.
    NoRoute(String),
    /// The path does not parse (not UTF-8 once decoded, say).
    BadPath {
        /// Why the path does not parse.
        why: String,
        /// The flag key as sent, decoded lossily, on a single-flag path:
        /// OFREP's 400 names the key.
        key: Option<String>,
    },
    /// A route that takes another method.
    WrongMethod(String),
    /// The admin API was called but no admin token is configured.
    AdminOff,
    /// The admin API, or an environment with API keys, was called without
    /// a valid token or key.
    Unauthorized(String),
    /// A valid API key, for another environment.
    Forbidden(String),
    /// A key over its rate limit.
    TooManyRequests {
        /// Why.
        why: String,
        /// When it may try again.
        retry_after: std::time::Duration,
    },
    /// A plugin change through the admin API was refused.
    Plugin(ChangeError),
    /// The request cannot be served in this configuration.
    Conflict(String),
    /// flaghost failed; not the caller's fault.
    Internal(String),
}

impl From<crate::access::Denied> for ApiError {
    fn from(denied: crate::access::Denied) -> Self {
        match denied {
            crate::access::Denied::OtherEnvironment(_) => ApiError::Forbidden(denied.to_string()),
            crate::access::Denied::RateLimited { retry_after, .. } => ApiError::TooManyRequests {
                why: denied.to_string(),
                retry_after,
            },
            _ => ApiError::Unauthorized(denied.to_string()),
        }
    }
}

impl ApiError {
    /// A request body that could not be read, for `error`: a 408 if it did
    /// not arrive in time, else a 400 saying why.
    pub fn unreadable_body(key: Option<&str>, error: &(dyn std::error::Error + 'static)) -> Self {
        let key = key.map(str::to_owned);
        match super::body_deadline::timed_out(error) {
            Some(timeout) => ApiError::TooSlow {
                key,
                details: timeout.to_string(),
            },
            None => ApiError::BadRequest {
                key,
                details: format!("cannot read the request body: {error}"),
            },
        }
    }
}

impl From<ChangeError> for ApiError {
    fn from(e: ChangeError) -> Self {
        ApiError::Plugin(e)
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    error_code: &'static str,
    error_details: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<&'a Metadata>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, key, code, details, metadata) = match &self {
            ApiError::BadRequest { key, details } => (
                StatusCode::BAD_REQUEST,
                key.as_deref(),
                "INVALID_CONTEXT",
                details.clone(),
                None,
            ),
            ApiError::TooLarge { key, details } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                key.as_deref(),
                "INVALID_CONTEXT",
                details.clone(),
                None,
            ),
            ApiError::TooSlow { key, details } => (
                StatusCode::REQUEST_TIMEOUT,
                key.as_deref(),
                "GENERAL",
                details.clone(),
                None,
            ),
            ApiError::Environment { key, error } => {
                let status = match error {
                    LookupError::NotFound(_) => StatusCode::NOT_FOUND,
                    LookupError::InvalidName(_) => StatusCode::BAD_REQUEST,
                    LookupError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
                };
                let code = match error {
                    LookupError::NotFound(_) => ErrorCode::FlagNotFound,
                    _ => ErrorCode::General,
                };
                // NB: why a flag file is refused names its path on the
                // server; that is for flaghost's log, not for callers.
                let details = match error {
                    LookupError::Unavailable { environment, .. } => format!(
                        "environment {environment:?} is unavailable: its flag file cannot be read or was refused, and there is no earlier good set (flaghost's log says why)"
                    ),
                    other => other.to_string(),
                };
                (status, key.as_deref(), code.as_str(), details, None)
            }
            ApiError::Evaluation { key, error } => {
                let status = match error.code {
                    ErrorCode::FlagNotFound => StatusCode::NOT_FOUND,
                    _ => StatusCode::BAD_REQUEST,
                };
                (
                    status,
                    Some(key.as_str()),
                    error.code.as_str(),
                    error.details.clone(),
                    error.metadata.as_deref(),
                )
            }
            ApiError::NoRoute(path) => (
                StatusCode::NOT_FOUND,
                None,
                "GENERAL",
                format!(
                    "no endpoint at {path}; OFREP lives under /ofrep/v1/ and /environments/{{environment}}/ofrep/v1/"
                ),
                None,
            ),
            ApiError::BadPath { why, key } => (
                StatusCode::BAD_REQUEST,
                key.as_deref(),
                "GENERAL",
                format!(
                    "the request path is not valid ({why}): flag keys, environments and plugin names are UTF-8 text"
                ),
                None,
            ),
            ApiError::WrongMethod(path) => (
                StatusCode::METHOD_NOT_ALLOWED,
                None,
                "GENERAL",
                if path.starts_with("/admin/") {
                    format!("{path} does not take this method; see the README's admin API")
                } else {
                    format!("{path} takes POST with a JSON body {{\"context\": {{...}}}}")
                },
                None,
            ),
            ApiError::AdminOff => (
                StatusCode::NOT_FOUND,
                None,
                "GENERAL",
                "the admin API is off: start flaghost with FLAGHOST_ADMIN_TOKEN (--admin-token) set".into(),
                None,
            ),
            ApiError::Unauthorized(why) => (
                StatusCode::UNAUTHORIZED,
                None,
                "GENERAL",
                why.clone(),
                None,
            ),
            ApiError::Forbidden(why) => {
                (StatusCode::FORBIDDEN, None, "GENERAL", why.clone(), None)
            }
            ApiError::TooManyRequests { why, .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                None,
                "GENERAL",
                why.clone(),
                None,
            ),
            ApiError::Plugin(e) => {
                let status = match e {
                    ChangeError::InvalidName(_) => StatusCode::BAD_REQUEST,
                    ChangeError::NotFound(_) => StatusCode::NOT_FOUND,
                    ChangeError::Refused(_) => StatusCode::UNPROCESSABLE_ENTITY,
                    ChangeError::FlagsRefuse { .. } | ChangeError::InUse { .. } => {
                        StatusCode::CONFLICT
                    }
                    ChangeError::Io { .. } | ChangeError::Internal(_) => {
                        StatusCode::INTERNAL_SERVER_ERROR
                    }
                };
                (status, None, "GENERAL", e.to_string(), None)
            }
            ApiError::Conflict(why) => (StatusCode::CONFLICT, None, "GENERAL", why.clone(), None),
            ApiError::Internal(why) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                None,
                "GENERAL",
                why.clone(),
                None,
            ),
        };
        if status.is_server_error() {
            error!(status = status.as_u16(), error_code = code, details = %details, "request failed");
        } else {
            debug!(status = status.as_u16(), error_code = code, details = %details, "request refused");
        }
        let body = Body {
            key,
            error_code: code,
            error_details: &details,
            metadata,
        };
        let mut response = (status, Json(body)).into_response();
        if let ApiError::TooManyRequests { retry_after, .. } = &self {
            // NB: whole seconds, rounded up (RFC 9110 §10.2.3).
            let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(seconds.max(1)),
            );
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// The fallback for unknown paths: a JSON 404, like every other error.
pub async fn not_found(
    axum::extract::State(state): axum::extract::State<std::sync::Arc<super::AppState>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> ApiError {
    state.metrics.request(
        crate::metrics::Route::UNMATCHED,
        &method,
        404,
        std::time::Duration::ZERO,
    );
    ApiError::NoRoute(uri.path().to_owned())
}

/// The fallback for a known path with the wrong method.
pub async fn method_not_allowed(
    axum::extract::State(state): axum::extract::State<std::sync::Arc<super::AppState>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> ApiError {
    state.metrics.request(
        crate::metrics::Route::UNMATCHED,
        &method,
        405,
        std::time::Duration::ZERO,
    );
    ApiError::WrongMethod(uri.path().to_owned())
}

/// axum's `Path`, refusing a path that does not parse with an OFREP JSON
/// error (axum's own rejection is plain text, which OFREP clients cannot
/// read).
pub struct ValidPath<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for ValidPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::BadPath {
                why: rejection.body_text(),
                key: parts
                    .uri
                    .path()
                    .rsplit_once("/evaluate/flags/")
                    .map(|(_, key)| percent_decoded_lossy(key)),
            }),
        }
    }
}

/// `text` with its `%XX` escapes decoded, and what is not UTF-8 then
/// replaced by U+FFFD: a key that does not decode can still be named.
fn percent_decoded_lossy(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
