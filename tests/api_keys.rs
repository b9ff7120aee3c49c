//! Callers' API keys per environment (`--api-keys-file`), over real HTTP:
//! 401 without a valid key, 403 for another environment's key, 200 with
//! the environment's own, both ways OFREP sends one; the gate comes before
//! the body is read; rotation without a restart, and a broken or deleted
//! key file keeps the keys in force.

use std::path::Path;
use std::time::Duration;

use flaghost::http::Cors;
use flaghost_tests::{Dirs, Flaghost, answer_limits, eventually};
use serde_json::{Value, json};

const PROD_KEY: &str = "prod-key-7c1e0f9a4b2d";
const STAGING_KEY: &str = "staging-key-5d8a3c61e0f4";
const ROTATED_KEY: &str = "prod-key-rotated-91b3f2aa";

fn flags() -> Value {
    json!({ "flags": { "banner": {
        "state": "ENABLED",
        "variants": { "on": true, "off": false },
        "defaultVariant": "on"
    } } })
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest as _;
    format!("{:x}", sha2::Sha256::digest(text.as_bytes()))
}

fn write_keys(file: &Path, production: &str) {
    let text = json!({
        "production": [production],
        // Hashed: the file need not hold the key itself.
        "staging": [format!("sha256:{}", sha256_hex(STAGING_KEY))],
    });
    // NB: written whole under another name and renamed over, as an operator's
    // tooling would; a half-written file is refused, never half-read.
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, text.to_string()).expect("write keys");
    std::fs::rename(&tmp, file).expect("rename keys");
}

/// `POST path` with `headers`: the status, the body and whether a
/// `WWW-Authenticate` header came back.
async fn post(
    fh: &Flaghost,
    path: &str,
    headers: &[(&str, &str)],
    body: String,
) -> (u16, Value, bool) {
    let mut request = fh
        .client
        .post(format!("{}{path}", fh.base))
        .header("content-type", "application/json")
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("request reaches flaghost");
    let status = response.status().as_u16();
    let challenged = response.headers().contains_key("www-authenticate");
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body, challenged)
}

const CONTEXT: &str = r#"{"context": {"targetingKey": "user-1"}}"#;

async fn single(
    fh: &Flaghost,
    environment: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, Value, bool) {
    let prefix = environment
        .map(|e| format!("/environments/{e}"))
        .unwrap_or_default();
    post(
        fh,
        &format!("{prefix}/ofrep/v1/evaluate/flags/banner"),
        headers,
        CONTEXT.into(),
    )
    .await
}

async fn bulk(fh: &Flaghost, environment: Option<&str>, headers: &[(&str, &str)]) -> u16 {
    let prefix = environment
        .map(|e| format!("/environments/{e}"))
        .unwrap_or_default();
    post(
        fh,
        &format!("{prefix}/ofrep/v1/evaluate/flags"),
        headers,
        CONTEXT.into(),
    )
    .await
    .0
}

/// Production and staging with one flag each, and a key file (the path
/// returned) beside them, configured.
fn keyed() -> (Dirs, std::path::PathBuf, flaghost::config::ServeConfig) {
    let dirs = Dirs::new()
        .flag_file("production", &flags())
        .flag_file("staging", &flags());
    let keys = dirs.flags().parent().expect("tmp").join("api-keys.json");
    write_keys(&keys, PROD_KEY);
    let mut config = dirs.config("production", answer_limits());
    config.api_keys_file = Some(keys.clone());
    (dirs, keys, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_environments_answer_401_403_and_200_as_ofrep_says() {
    let (_dirs, keys, mut config) = keyed();
    config.watch_interval = Some(Duration::from_millis(100));
    config.http.cors = Cors::Any;
    config.http.body_limit = 4 << 10;
    let fh = Flaghost::start(&config).await.expect("flaghost starts");

    let bearer = format!("Bearer {PROD_KEY}");
    let staging_bearer = format!("Bearer {STAGING_KEY}");

    // No key, an unknown key, a key sent with another scheme: 401, with a
    // challenge and an OFREP error body saying what to send.
    for headers in [
        vec![],
        vec![("x-api-key", "not-a-key-of-anyone-at-all")],
        vec![("authorization", "Bearer not-a-key-of-anyone-at-all")],
        vec![("authorization", PROD_KEY)],
    ] {
        let (status, body, challenged) = single(&fh, None, &headers).await;
        assert_eq!(status, 401, "{headers:?}: {body}");
        assert!(challenged, "401 carries WWW-Authenticate");
        assert_eq!(body["errorCode"], "GENERAL", "{body}");
        assert_eq!(bulk(&fh, None, &headers).await, 401, "{headers:?}");
    }
    let (_, body, _) = single(&fh, None, &[]).await;
    assert!(
        body["errorDetails"]
            .as_str()
            .unwrap_or_default()
            .contains("X-API-Key"),
        "{body}"
    );

    // The environment's own key, either way: 200, single and bulk.
    for headers in [
        vec![("authorization", bearer.as_str())],
        vec![("x-api-key", PROD_KEY)],
    ] {
        let (status, body, _) = single(&fh, None, &headers).await;
        assert_eq!((status, &body["value"]), (200, &json!(true)), "{body}");
        assert_eq!(bulk(&fh, None, &headers).await, 200);
        assert_eq!(
            single(&fh, Some("production"), &headers).await.0,
            200,
            "the default environment by name"
        );
    }
    // A hashed entry admits the key it hashes.
    assert_eq!(
        single(&fh, Some("staging"), &[("x-api-key", STAGING_KEY)])
            .await
            .0,
        200
    );

    // Another environment's key: 403 both ways round, single and bulk; an
    // environment that does not exist is no different (its existence is
    // not told to a caller without its key).
    for (environment, key) in [
        (Some("staging"), bearer.as_str()),
        (None, staging_bearer.as_str()),
        (Some("nowhere"), bearer.as_str()),
    ] {
        let headers = [("authorization", key)];
        let (status, body, _) = single(&fh, environment, &headers).await;
        assert_eq!(status, 403, "{environment:?}: {body}");
        assert_eq!(bulk(&fh, environment, &headers).await, 403);
    }

    // The gate comes before the body: a caller without a key cannot make
    // flaghost read (or refuse) a body. (A body over the limit that still
    // fits the socket's buffers, so the client sees the answer, not a reset.)
    let (status, _, _) = post(
        &fh,
        "/ofrep/v1/evaluate/flags/banner",
        &[],
        "x".repeat(16 << 10),
    )
    .await;
    assert_eq!(status, 401, "no key: 401 before the body's 413");
    let (status, _, _) = post(
        &fh,
        "/ofrep/v1/evaluate/flags/banner",
        &[("x-api-key", PROD_KEY)],
        "x".repeat(16 << 10),
    )
    .await;
    assert_eq!(
        status, 413,
        "with its key, the body is read, and is too large"
    );

    // Health stays open, and a browser's preflight needs no key.
    assert_eq!(fh.get("/healthz").await.0, 200);
    assert_eq!(fh.get("/readyz").await.0, 200);
    let preflight = fh
        .client
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/ofrep/v1/evaluate/flags", fh.base),
        )
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "x-api-key,content-type")
        .send()
        .await
        .expect("preflight");
    assert_eq!(preflight.status().as_u16(), 200);
    assert!(
        preflight
            .headers()
            .get("access-control-allow-headers")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("x-api-key")),
        "{:?}",
        preflight.headers()
    );

    // Rotation without a restart: the old key stops, the new one works.
    write_keys(&keys, ROTATED_KEY);
    let rotated = eventually(Duration::from_secs(5), || async {
        single(&fh, None, &[("x-api-key", ROTATED_KEY)]).await.0 == 200
    })
    .await;
    assert!(rotated, "the rotated key is accepted");
    assert_eq!(single(&fh, None, &[("x-api-key", PROD_KEY)]).await.0, 401);

    // A broken key file is refused and a deleted one ignored: the keys in
    // force stay, nothing opens.
    std::fs::write(&keys, "{\"production\": [").expect("break");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        single(&fh, None, &[("x-api-key", ROTATED_KEY)]).await.0,
        200
    );
    assert_eq!(single(&fh, None, &[]).await.0, 401);
    std::fs::remove_file(&keys).expect("delete");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        single(&fh, None, &[("x-api-key", ROTATED_KEY)]).await.0,
        200
    );
    assert_eq!(single(&fh, None, &[]).await.0, 401);

    fh.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_past_its_rate_gets_429_with_retry_after_and_other_keys_do_not() {
    let (_dirs, _keys, mut config) = keyed();
    config.api_key_rate_limit = Some(flaghost::access::RateLimit { per_second: 4 });
    let fh = Flaghost::start(&config).await.expect("flaghost starts");
    let prod = [("x-api-key", PROD_KEY)];
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(single(&fh, None, &prod).await.0);
    }
    assert_eq!(
        &statuses[..4],
        &[200; 4],
        "a burst of the rate: {statuses:?}"
    );
    assert!(statuses[4..].contains(&429), "then 429: {statuses:?}");
    let response = fh
        .client
        .post(format!("{}/ofrep/v1/evaluate/flags/banner", fh.base))
        .header("x-api-key", PROD_KEY)
        .body(CONTEXT)
        .send()
        .await
        .expect("answer");
    assert_eq!(response.status().as_u16(), 429);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1"),
        "whole seconds, rounded up"
    );
    let body: Value = response.json().await.expect("an OFREP error body");
    assert_eq!(body["errorCode"], "GENERAL", "{body}");
    // Another key, and a caller without one, are unaffected.
    assert_eq!(
        single(&fh, Some("staging"), &[("x-api-key", STAGING_KEY)])
            .await
            .0,
        200
    );
    assert_eq!(single(&fh, None, &[]).await.0, 401);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(single(&fh, None, &prod).await.0, 200, "allowed again");
    fh.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_bad_key_file_stops_start_up_naming_the_option_and_the_entry() {
    let dirs = Dirs::new().flag_file("production", &flags());
    let keys = dirs.flags().parent().expect("tmp").join("api-keys.json");
    let mut config = dirs.config("production", answer_limits());
    config.api_keys_file = Some(keys.clone());
    let error = Flaghost::start(&config).await.err().expect("refused");
    assert!(
        format!("{error:#}").contains("--api-keys-file (FLAGHOST_API_KEYS_FILE)"),
        "{error:#}"
    );
    std::fs::write(&keys, r#"{"production": ["short"]}"#).expect("write");
    let error = format!(
        "{:#}",
        Flaghost::start(&config).await.err().expect("refused")
    );
    assert!(
        error.contains("api-keys.json") && error.contains("\"production\", key #1"),
        "{error}"
    );
}
