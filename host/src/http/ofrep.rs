//! OFREP: single and bulk flag evaluation
//! (../shared/reference/ofrep/openapi.yaml).

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::error::ValidPath;
use super::{ApiError, AppState};
use crate::cache::Snapshot;
use crate::evaluation::{
    self, ErrorCode, EvaluationContext, EvaluationError, Reason, Resolution, Verdict,
};
use crate::flags::{FastMap as HashMap, Flag, FlagSet, FlagState, Metadata, Value};
use crate::plugins::Budget;

/// Path parameters of both route families.
#[derive(Deserialize)]
pub struct FlagPath {
    environment: Option<String>,
    key: Option<String>,
}

/// `POST .../ofrep/v1/evaluate/flags/{key}`.
pub async fn evaluate_one(
    State(state): State<AppState>,
    ValidPath(path): ValidPath<FlagPath>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let key = path.key.unwrap_or_default();
    let context = parse_request(body, Some(&key))?;
    let served = flag_set(&state, path.environment.as_deref(), Some(&key)).await?;
    let set = &served.set;
    let flag = set.flags.get(&key);
    let lane = flag
        .filter(|flag| flag.state == FlagState::Enabled)
        .and_then(Flag::lane);
    let answer = match (flag, lane) {
        // NB: guest code runs on the plugin pool, never on this worker.
        (Some(flag), Some(lane)) => {
            let keys = vec![key.clone()];
            let budget = Budget::new(state.plugin_budget);
            let mut verdicts = on_plugin_pool(&state, lane, &served, keys, context, budget).await;
            match verdicts.pop() {
                Some(Ok(verdict)) => Ok(verdict.resolve(flag)),
                Some(Err(error)) => Err(EvaluationError {
                    metadata: Some(flag.metadata.clone()),
                    ..error
                }),
                None => unreachable!("one verdict per key"),
            }
        }
        (Some(flag), None) => evaluation::evaluate_flag(flag, &context, None),
        (None, _) => evaluation::evaluate(set, &key, &context, None),
    };
    match answer {
        Ok(resolution) => Ok(json_response(
            StatusCode::OK,
            &success(&key, &resolution, served.stale),
        )),
        Err(error) => Err(ApiError::Evaluation { key, error }),
    }
}

/// Evaluates flags `keys` of `served`, all in `lane`, on the
/// plugin pool under the request's plugin `budget`. A refusal of the pool
/// (the plugin's queue is full) answers every key.
async fn on_plugin_pool(
    state: &AppState,
    lane: &str,
    served: &Snapshot,
    keys: Vec<String>,
    context: EvaluationContext,
    budget: Budget,
) -> Vec<Result<Verdict, EvaluationError>> {
    let set = served.set.clone();
    let count = keys.len();
    let job = move || {
        budget.run(|| {
            keys.iter()
                .map(|key| evaluation::evaluate(&set, key, &context, None).map(|r| r.verdict()))
                .collect::<Vec<_>>()
        })
    };
    match state.plugin_pool.run(lane, job).await {
        Ok(verdicts) => verdicts,
        Err(refused) => (0..count)
            .map(|_| {
                Err(EvaluationError {
                    code: ErrorCode::General,
                    details: refused.to_string(),
                    metadata: None,
                })
            })
            .collect(),
    }
}

/// `POST .../ofrep/v1/evaluate/flags`: every enabled flag, each a success or
/// a failure, with an `ETag` over the answer so an unchanged answer is a 304.
pub async fn evaluate_all(
    State(state): State<AppState>,
    ValidPath(path): ValidPath<FlagPath>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let context = parse_request(body, None)?;
    let served = flag_set(&state, path.environment.as_deref(), None).await?;
    let body = bulk(&state, &served, context).await;
    // NB: the ETag hashes the answer itself, so it changes whenever the answer
    // for this context would (a flag file change, a different context), and a
    // 304 can never stand for another context's answer.
    //
    // A 128-bit xxh3 is enough for that (an ETag guards against nothing but
    // chance collisions, and the answer is the caller's own), is the same in
    // every instance, and costs a tenth of SHA-256 over a large answer.
    let etag = format!("\"{:032x}\"", xxhash_rust::xxh3::xxh3_128(&body));
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let etag_value = HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"\""));
    if matches {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag_value)]).into_response());
    }
    let mut response = raw_json_response(StatusCode::OK, body);
    response.headers_mut().insert(header::ETAG, etag_value);
    Ok(response)
}

/// The request body: `{"context": {...}}`; a missing or null context is empty.
fn parse_request(
    body: Result<Bytes, BytesRejection>,
    key: Option<&str>,
) -> Result<EvaluationContext, ApiError> {
    let bad = |details: String| ApiError::BadRequest {
        key: key.map(str::to_owned),
        details,
    };
    let body = body.map_err(|rejection| match rejection {
        BytesRejection::FailedToBufferBody(_)
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE =>
        {
            ApiError::TooLarge {
                key: key.map(str::to_owned),
                details: "the request body is over the size limit".into(),
            }
        }
        other => bad(format!("cannot read the request body: {other}")),
    })?;
    if body.is_empty() {
        return Ok(EvaluationContext::default());
    }
    let request: Json = serde_json::from_slice(&body)
        .map_err(|e| bad(format!("the request body is not valid JSON: {e}")))?;
    let Json::Object(mut request) = request else {
        return Err(bad(
            "the request body must be a JSON object: {\"context\": {...}}".into(),
        ));
    };
    match request.remove("context") {
        None | Some(Json::Null) => Ok(EvaluationContext::default()),
        Some(Json::Object(attributes)) => {
            EvaluationContext::from_attributes(attributes).map_err(|e| bad(e.to_string()))
        }
        Some(other) => Err(bad(format!(
            "\"context\" must be a JSON object, not {}",
            json_kind(&other)
        ))),
    }
}

fn json_kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

async fn flag_set(
    state: &AppState,
    environment: Option<&str>,
    key: Option<&str>,
) -> Result<Snapshot, ApiError> {
    let environment = environment.unwrap_or(&state.default_environment);
    state
        .environments
        .get(environment)
        .await
        .map_err(|error| ApiError::Environment {
            key: key.map(str::to_owned),
            error,
        })
}

/// A successful evaluation as OFREP sends it.
#[derive(Serialize)]
struct Success<'a> {
    key: &'a str,
    /// Absent when the caller's code default applies (ADR-0006).
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'a Value>,
    reason: &'static str,
    /// Always present: the Python provider fails on a success without it.
    /// Empty when no variant was served, as flagd sends it.
    variant: &'a str,
    metadata: &'a Metadata,
}

/// A failed evaluation inside a bulk answer.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Failure<'a> {
    key: &'a str,
    error_code: &'static str,
    error_details: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<&'a Metadata>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Entry<'a> {
    Success(Success<'a>),
    Failure(Failure<'a>),
}

#[derive(Serialize)]
struct Bulk<'a> {
    flags: Vec<Entry<'a>>,
    metadata: &'a Metadata,
}

/// `stale`: the flag set is served past its TTL because nothing could
/// refresh it; a value it gives says so with OpenFeature's reason STALE
/// (DISABLED and errors keep theirs: they carry no value to doubt).
fn success<'a>(key: &'a str, r: &Resolution<'a>, stale: bool) -> Success<'a> {
    let reason = if stale && r.value.is_some() {
        Reason::Stale
    } else {
        r.reason
    };
    Success {
        key,
        value: r.value,
        reason: reason.as_str(),
        variant: r.variant.unwrap_or(""),
        metadata: r.metadata,
    }
}

/// One flag's answer as OFREP's single-flag evaluation sends it (a failure
/// as a bulk entry: key, errorCode, errorDetails), for `flaghost eval`.
pub fn answer_json(key: &str, answer: &Result<Resolution<'_>, EvaluationError>) -> Json {
    let value = match answer {
        Ok(resolution) => serde_json::to_value(success(key, resolution, false)),
        Err(e) => serde_json::to_value(failure(key, e)),
    };
    value.unwrap_or(Json::Null)
}

fn failure<'a>(key: &'a str, e: &'a EvaluationError) -> Failure<'a> {
    Failure {
        key,
        error_code: e.code.as_str(),
        error_details: &e.details,
        metadata: e.metadata.as_deref(),
    }
}

/// Evaluates every enabled flag (disabled flags are left out, as flagd does),
/// sorted by key so equal answers serialise to equal bytes.
///
/// Flags that run no plugin are evaluated here; those that do go to the
/// plugin pool, one job per plugin (so each waits in its own plugin's
/// lane), all drawing on one request budget.
async fn bulk(state: &AppState, served: &Snapshot, context: EvaluationContext) -> Vec<u8> {
    let set: &FlagSet = &served.set;
    // NB: `Flags` walks in key order: no sort per request.
    let flags: Vec<&Flag> = set
        .flags
        .values()
        .filter(|f| f.state == FlagState::Enabled)
        .collect();
    let mut results: Vec<Result<Resolution<'_>, EvaluationError>> = Vec::with_capacity(flags.len());
    let mut by_lane: HashMap<&str, Vec<usize>> = HashMap::default();
    for (at, flag) in flags.iter().enumerate() {
        let result = match flag.lane() {
            Some(lane) => {
                by_lane.entry(lane).or_default().push(at);
                Err(not_evaluated())
            }
            None => evaluation::evaluate_flag(flag, &context, None),
        };
        results.push(result);
    }
    if !by_lane.is_empty() {
        let budget = Budget::new(state.plugin_budget);
        let jobs = by_lane.iter().map(|(lane, at)| {
            let keys = at.iter().map(|&i| flags[i].key.clone()).collect();
            on_plugin_pool(state, lane, served, keys, context.clone(), budget.clone())
        });
        let answers = futures_util::future::join_all(jobs).await;
        for (at, verdicts) in by_lane.values().zip(answers) {
            for (&i, verdict) in at.iter().zip(verdicts) {
                let flag = flags[i];
                results[i] = verdict
                    .map(|v| v.resolve(flag))
                    .map_err(|e| EvaluationError {
                        metadata: Some(flag.metadata.clone()),
                        ..e
                    });
            }
        }
    }
    let entries = flags
        .iter()
        .zip(&results)
        .map(|(flag, r)| match r {
            Ok(r) => Entry::Success(success(&flag.key, r, served.stale)),
            Err(e) => Entry::Failure(failure(&flag.key, e)),
        })
        .collect();
    // NB: about 100 bytes a flag; sized so a large answer is not copied as
    // it grows.
    let mut body = Vec::with_capacity(128 + 128 * flags.len());
    // NB: serialising these types cannot fail: string keys, finite values.
    let bulk = Bulk {
        flags: entries,
        metadata: &set.metadata,
    };
    if serde_json::to_writer(&mut body, &bulk).is_err() {
        body.clear();
    }
    body
}

/// A placeholder for a flag evaluated elsewhere; replaced before use.
fn not_evaluated() -> EvaluationError {
    EvaluationError {
        code: ErrorCode::General,
        details: String::new(),
        metadata: None,
    }
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response {
    raw_json_response(status, serde_json::to_vec(body).unwrap_or_default())
}

fn raw_json_response(status: StatusCode, body: Vec<u8>) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}
