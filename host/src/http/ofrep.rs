//! OFREP: single and bulk flag evaluation
//! (../shared/reference/ofrep/openapi.yaml).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use tracing::Instrument as _;

use super::error::ValidPath;
use super::{ApiError, AppState};
use crate::cache::Snapshot;
use crate::evaluation::{self, ErrorCode, EvaluationContext, EvaluationError, Resolution, Verdict};
use crate::flags::{FastMap as HashMap, Flag, FlagSet, FlagState, Metadata, json_text};
use crate::plugins::{Budget, PoolError};

/// Path parameters of both route families.
#[derive(Deserialize)]
pub struct FlagPath {
    environment: Option<String>,
    key: Option<String>,
}

/// The OFREP routes' gate when API keys are configured: the caller's key
/// must be one of the environment's (401 without a valid key, 403 for a key
/// of another environment, as OFREP specifies).
pub async fn admit(
    State(state): State<Arc<AppState>>,
    ValidPath(path): ValidPath<FlagPath>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Result<Response, ApiError> {
    if let Some(keys) = &state.api_keys {
        let environment = path
            .environment
            .as_deref()
            .unwrap_or(&state.default_environment);
        keys.admit(environment, request.headers())?;
    }
    Ok(next.run(request).await)
}

/// `POST .../ofrep/v1/evaluate/flags/{key}`.
pub async fn evaluate_one(
    State(state): State<Arc<AppState>>,
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
    // NB: a span for the evaluation only with traces exported.
    let span = match (crate::telemetry::traces_on(), flag) {
        (false, _) => tracing::Span::none(),
        (true, Some(flag)) => {
            tracing::info_span!("evaluate", flag = %flag.key, environment = %set.environment)
        }
        // NB: `?`: a key no flag has is the caller's alone, and a newline
        // in it must not start a line of its own in a log.
        (true, None) => {
            tracing::info_span!("evaluate", flag = ?key, environment = %set.environment)
        }
    };
    let answer = async {
        match (flag, lane) {
            // NB: guest code runs on the plugin pool, never on this worker.
            (Some(flag), Some(lane)) => {
                let keys = vec![key.clone()];
                let budget = Budget::new(state.plugin_budget);
                let mut verdicts =
                    on_plugin_pool(&state, lane, &served, keys, context, budget).await;
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
        }
    }
    .instrument(span)
    .await;
    let counter = state.metrics.evaluations().counter(set);
    match (flag, &answer) {
        (Some(flag), Ok(r)) => {
            counter.served(
                flag,
                r.served.map(|v| v.ordinal),
                r.reason_sent(served.stale),
            );
        }
        (Some(flag), Err(e)) => counter.failed(flag, e.code),
        (None, _) => counter.not_found(),
    }
    match answer {
        Ok(resolution) => {
            let mut body = Vec::with_capacity(256);
            match flag {
                Some(flag) => write_success(&mut body, &flag.key_json, &resolution, served.stale),
                None => write_success(&mut body, &json_text(&key), &resolution, served.stale),
            }
            Ok(raw_json_response(StatusCode::OK, body))
        }
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
    // NB: the plugin calls' spans are children of this request's (traces
    // on only: entering a span on another thread is not free).
    let parent = crate::telemetry::traces_on().then(tracing::Span::current);
    // With traces off, the request id goes along for the plugin's log lines.
    let request = crate::telemetry::current_request();
    let job = move || {
        let _parent = parent.as_ref().map(tracing::Span::enter);
        crate::telemetry::with_request(request, || {
            budget.run(|| {
                keys.iter()
                    .map(|key| evaluation::evaluate(&set, key, &context, None).map(|r| r.verdict()))
                    .collect::<Vec<_>>()
            })
        })
    };
    match state.plugin_pool.run(lane, job).await {
        Ok(verdicts) => verdicts,
        Err(refused) => {
            if let PoolError::Full { .. } = refused {
                // NB: counted as each plugin of the lane refusing each flag,
                // as a quarantined plugin's refusals are: the admin listing
                // and `flaghost_plugin_refused_total` show a full queue.
                let plugins = state.plugins.current();
                for plugin in lane.split('/').filter_map(|name| plugins.get(name)) {
                    plugin.count_refused(count);
                }
            }
            refused_all(count, &refused)
        }
    }
}

/// `count` evaluations the plugin pool turned away.
fn refused_all(count: usize, refused: &PoolError) -> Vec<Result<Verdict, EvaluationError>> {
    (0..count)
        .map(|_| {
            Err(EvaluationError {
                code: ErrorCode::General,
                details: refused.to_string(),
                metadata: None,
            })
        })
        .collect()
}

/// `POST .../ofrep/v1/evaluate/flags`: every enabled flag, each a success or
/// a failure, with an `ETag` over the answer so an unchanged answer is a 304.
pub async fn evaluate_all(
    State(state): State<Arc<AppState>>,
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
    let etag = etag(&body);
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().as_bytes() == etag || t.trim() == "*")
        });
    let etag_value = HeaderValue::from_bytes(&etag).unwrap_or(HeaderValue::from_static("\"\""));
    if matches {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag_value)]).into_response());
    }
    let mut response = raw_json_response(StatusCode::OK, body);
    response.headers_mut().insert(header::ETAG, etag_value);
    Ok(response)
}

/// The ETag of a bulk answer: the 128-bit xxh3 of `body` as 32 lower-case
/// hex digits, quoted.
///
/// NB: not `format!("{:032x}")`: formatting a `u128` through `fmt` (and
/// growing the string it writes into) was about 1% of a 45-flag answer.
fn etag(body: &[u8]) -> [u8; 34] {
    let mut tag = [b'"'; 34];
    // NB: 16 bytes are exactly 32 hex digits: this cannot fail.
    let _ = hex::encode_to_slice(
        xxhash_rust::xxh3::xxh3_128(body).to_be_bytes(),
        &mut tag[1..33],
    );
    tag
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
        other => ApiError::unreadable_body(key, &other),
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

/// Writes a successful evaluation as OFREP sends it, from JSON made at load
/// (the flag's key as `key_json`, its variants', its metadata):
/// `{"key":…,"value":…,"reason":…,"variant":…,"metadata":{…}}`, the bytes
/// serde_json would write for those fields, without serialising anything.
///
/// `value` is absent when the caller's code default applies (ADR-0006).
/// `variant` is always present (the Python provider fails on a success
/// without it), empty when no variant was served, as flagd sends it.
/// `stale`: the flag set is served past its TTL because nothing could
/// refresh it; a value it gives says so with OpenFeature's reason STALE
/// (DISABLED and errors keep theirs: they carry no value to doubt).
fn write_success(out: &mut Vec<u8>, key_json: &str, r: &Resolution<'_>, stale: bool) {
    let reason = r.reason_sent(stale);
    out.extend_from_slice(b"{\"key\":");
    out.extend_from_slice(key_json.as_bytes());
    if let Some(variant) = r.served {
        out.extend_from_slice(b",\"value\":");
        out.extend_from_slice(variant.value_json.as_bytes());
    }
    out.extend_from_slice(b",\"reason\":\"");
    out.extend_from_slice(reason.as_str().as_bytes());
    out.extend_from_slice(b"\",\"variant\":");
    match r.served {
        Some(variant) => out.extend_from_slice(variant.name_json.as_bytes()),
        None => out.extend_from_slice(b"\"\""),
    }
    out.extend_from_slice(b",\"metadata\":");
    out.extend_from_slice(r.metadata.json().as_bytes());
    out.push(b'}');
}

/// One flag's answer as OFREP's single-flag evaluation sends it (a failure
/// as a bulk entry: key, errorCode, errorDetails), for `flaghost eval`.
pub fn answer_json(key: &str, answer: &Result<Resolution<'_>, EvaluationError>) -> Json {
    let value = match answer {
        Ok(resolution) => {
            let mut out = Vec::new();
            write_success(&mut out, &json_text(key), resolution, false);
            serde_json::from_slice(&out)
        }
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
    let mut results: Vec<(&Flag, Result<Resolution<'_>, EvaluationError>)> =
        Vec::with_capacity(set.flags.len());
    let mut by_lane: HashMap<&str, Vec<usize>> = HashMap::default();
    for flag in set.flags.values().filter(|f| f.state == FlagState::Enabled) {
        let result = match flag.lane() {
            Some(lane) => {
                by_lane.entry(lane).or_default().push(results.len());
                Err(not_evaluated())
            }
            None => evaluation::evaluate_flag(flag, &context, None),
        };
        results.push((flag, result));
    }
    if !by_lane.is_empty() {
        let budget = Budget::new(state.plugin_budget);
        let jobs = by_lane.iter().map(|(lane, at)| {
            let keys = at.iter().map(|&i| results[i].0.key.clone()).collect();
            on_plugin_pool(state, lane, served, keys, context.clone(), budget.clone())
        });
        let answers = futures_util::future::join_all(jobs).await;
        for (at, verdicts) in by_lane.values().zip(answers) {
            for (&i, verdict) in at.iter().zip(verdicts) {
                let (flag, result) = &mut results[i];
                *result = verdict
                    .map(|v| v.resolve(flag))
                    .map_err(|e| EvaluationError {
                        metadata: Some(flag.metadata.clone()),
                        ..e
                    });
            }
        }
    }
    // NB: about 100 bytes a flag; sized so a large answer is not copied as
    // it grows.
    let mut body = Vec::with_capacity(128 + 128 * results.len());
    body.extend_from_slice(b"{\"flags\":[");
    // NB: counted in a loop of their own, before the answer is written:
    // each count is an add to a counter not in the core's nearest cache,
    // and with nothing else in the loop the core has several under way at
    // once. (Perf of a 900-flag answer, with the counters' names also moved
    // out of their way: counting fell from about 3.7% to 2.1% of samples.)
    let counter = state.metrics.evaluations().counter(set);
    for (flag, result) in &results {
        match result {
            Ok(r) => counter.served(
                flag,
                r.served.map(|v| v.ordinal),
                r.reason_sent(served.stale),
            ),
            Err(e) => counter.failed(flag, e.code),
        }
    }
    for (at, (flag, result)) in results.iter().enumerate() {
        if at > 0 {
            body.push(b',');
        }
        match result {
            Ok(r) => write_success(&mut body, &flag.key_json, r, served.stale),
            // NB: a failure's fields always serialise (strings).
            Err(e) => {
                let _ = serde_json::to_writer(&mut body, &failure(&flag.key, e));
            }
        }
    }
    body.extend_from_slice(b"],\"metadata\":");
    body.extend_from_slice(set.metadata.json().as_bytes());
    body.push(b'}');
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::flags::{DocumentLimits, parse_flag_file};
    use crate::plugins::PluginSet;

    /// The ETag is the answer's 128-bit xxh3 as 32 zero-padded hex digits,
    /// quoted: the same in every instance and every version, so a cached
    /// answer stays valid across a rolling upgrade.
    #[test]
    fn the_etag_is_the_answer_s_xxh3_in_hex() {
        for body in [&b""[..], b"{}", b"{\"flags\":[]}", &[0xff; 4096]] {
            let expected = format!("\"{:032x}\"", xxhash_rust::xxh3::xxh3_128(body));
            assert_eq!(std::str::from_utf8(&etag(body)), Ok(expected.as_str()));
        }
        assert_eq!(&etag(b""), b"\"99aa06d3014798d86001c324468d497f\"");
    }

    /// The answers written from JSON made at load are what serialising each
    /// field would give, escapes, numbers and empty cases included.
    #[test]
    fn a_written_answer_is_the_json_of_its_fields() {
        let file = json!({
            "metadata": {"team": "wé \"quoted\"", "n": 1.5},
            "flags": {
                "k\"ey\n\u{1F600}": {"state": "ENABLED", "variants": {"v\\1": "va\"lue\u{7}", "b": "x"},
                                     "defaultVariant": "v\\1", "metadata": {"own": true}},
                "float": {"state": "ENABLED", "variants": {"f": 1.0, "g": -2.5e-300}, "defaultVariant": "g"},
                "object": {"state": "ENABLED", "variants": {"o": {"a": [1, null, "ü"]}}, "defaultVariant": "o"},
                "no-default": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": null},
                "off": {"state": "DISABLED", "variants": {"a": 1}, "defaultVariant": "a"}
            }
        });
        let set = parse_flag_file(
            "t.json",
            "t",
            file.to_string().as_bytes(),
            &PluginSet::default(),
            &DocumentLimits::default(),
        )
        .expect("valid");
        let context = EvaluationContext::default();
        for (key, flag) in &set.flags {
            let answer = evaluation::evaluate_flag(flag, &context, None).expect("evaluates");
            for stale in [false, true] {
                let mut written = Vec::new();
                write_success(&mut written, &flag.key_json, &answer, stale);
                let written: Json = serde_json::from_slice(&written).expect("valid JSON");
                let mut expected = json!({
                    "key": key,
                    "reason": if stale && answer.value.is_some() { "STALE" } else { answer.reason.as_str() },
                    "variant": answer.variant.unwrap_or(""),
                    "metadata": answer.metadata.entries(),
                });
                if let Some(value) = answer.value {
                    expected["value"] = value.to_json();
                }
                assert_eq!(written, expected, "flag {key:?}");
            }
        }
    }
}
