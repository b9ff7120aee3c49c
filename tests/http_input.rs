//! Bad HTTP input gets a 4xx with a JSON body that says what to fix, never a
//! 500; the service keeps answering.

use flaghost::plugins::Limits;
use flaghost_tests::{Dirs, Flaghost, answer_limits, examples_config};
use serde_json::json;

/// flaghost on one flag; keep the directories alive as long as it serves.
async fn start(body_limit: usize) -> (Flaghost, Dirs) {
    let dirs = Dirs::new().flag_file("prod", &json!({"flags": {
        "f": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "on"}
    }}));
    let mut config = dirs.config("prod", Limits::default());
    config.http.body_limit = body_limit;
    (Flaghost::start(&config).await.expect("starts"), dirs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_is_a_400_naming_the_problem() {
    let (fh, _dirs) = start(1 << 20).await;
    let (status, body) = fh
        .post_raw("/ofrep/v1/evaluate/flags/f", "{\"context\": ")
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["key"], "f");
    assert_eq!(body["errorCode"], "INVALID_CONTEXT");
    assert!(
        body["errorDetails"]
            .as_str()
            .expect("details")
            .contains("not valid JSON"),
        "{body}"
    );
    let (status, body) = fh.post_raw("/ofrep/v1/evaluate/flags", "nope").await;
    assert_eq!(status, 400, "{body}");
    assert!(body["errorCode"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_of_the_wrong_shape_is_a_400() {
    let (fh, _dirs) = start(1 << 20).await;
    for (body, says) in [
        (json!({"context": [1, 2]}), "must be a JSON object"),
        (json!({"context": "user"}), "must be a JSON object"),
        (json!({"context": {"targetingKey": 7}}), "targetingKey"),
        (json!([1]), "must be a JSON object"),
    ] {
        let (status, answer) = fh
            .post_raw("/ofrep/v1/evaluate/flags/f", body.to_string())
            .await;
        assert_eq!(status, 400, "{body} -> {answer}");
        assert_eq!(answer["errorCode"], "INVALID_CONTEXT");
        assert!(
            answer["errorDetails"]
                .as_str()
                .expect("details")
                .contains(says),
            "{answer}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_flag_is_a_404_flag_not_found() {
    let (fh, _dirs) = start(1 << 20).await;
    let (status, body) = fh.evaluate("nope", json!({})).await;
    assert_eq!(status, 404);
    assert_eq!(
        body,
        json!({"key": "nope", "errorCode": "FLAG_NOT_FOUND",
                            "errorDetails": "flag \"nope\" was not found in environment \"prod\""})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_environment_is_a_404_that_names_it() {
    let (fh, _dirs) = start(1 << 20).await;
    let (status, body) = fh.evaluate_in(Some("mars"), "f", json!({})).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["errorCode"], "FLAG_NOT_FOUND");
    assert!(
        body["errorDetails"]
            .as_str()
            .expect("details")
            .contains("\"mars\""),
        "{body}"
    );
    let (status, body) = fh
        .post_raw("/environments/a..b%2F/ofrep/v1/evaluate/flags", "{}")
        .await;
    assert_eq!(
        status, 400,
        "an invalid name is refused before any file is touched: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_is_a_413() {
    let (fh, _dirs) = start(1024).await;
    let big = json!({"context": {"targetingKey": "u", "blob": "x".repeat(4096)}}).to_string();
    let (status, body) = fh.post_raw("/ofrep/v1/evaluate/flags/f", big).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["key"], "f");
    let (status, _) = fh.evaluate("f", json!({"targetingKey": "u"})).await;
    assert_eq!(status, 200, "still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_methods_and_paths_answer_json() {
    let (fh, _dirs) = start(1 << 20).await;
    let (status, body) = fh.get("/ofrep/v1/evaluate/flags/f").await;
    assert_eq!(status, 405);
    assert!(
        body["errorDetails"]
            .as_str()
            .expect("details")
            .contains("POST")
    );
    let (status, body) = fh.post_raw("/nowhere", "{}").await;
    assert_eq!(status, 404);
    assert!(body["errorDetails"].is_string());
    let health = fh
        .client
        .get(format!("{}/healthz", fh.base))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_from_allowed_origins_may_call_and_read_the_etag() {
    let dirs = Dirs::new().flag_file(
        "prod",
        &json!({"flags": {
            "f": {"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on"}
        }}),
    );
    let mut config = dirs.config("prod", Limits::default());
    config.http.cors =
        flaghost::http::Cors::Origins(vec!["https://app.example".parse().expect("origin")]);
    let fh = Flaghost::start(&config).await.expect("starts");
    let url = format!("{}/ofrep/v1/evaluate/flags", fh.base);

    let preflight = |origin: &'static str| {
        fh.client
            .request(reqwest::Method::OPTIONS, &url)
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "content-type,if-none-match",
            )
            .send()
    };
    let allowed = preflight("https://app.example").await.expect("preflight");
    assert!(allowed.status().is_success(), "{}", allowed.status());
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let methods = allowed.headers()["access-control-allow-methods"]
        .to_str()
        .expect("methods");
    assert!(methods.contains("POST"), "{methods}");

    let other = preflight("https://evil.example").await.expect("preflight");
    assert!(
        other.headers().get("access-control-allow-origin").is_none(),
        "other origins get no grant"
    );

    let response = fh
        .client
        .post(&url)
        .header("origin", "https://app.example")
        .body(json!({"context": {}}).to_string())
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let exposed = response.headers()["access-control-expose-headers"]
        .to_str()
        .expect("expose");
    assert!(exposed.to_ascii_lowercase().contains("etag"), "{exposed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_that_is_not_utf8_is_an_ofrep_json_error() {
    let fh = Flaghost::start(&examples_config(answer_limits()))
        .await
        .expect("starts");
    for path in [
        "/ofrep/v1/evaluate/flags/%ff%fe",
        "/environments/%ff/ofrep/v1/evaluate/flags",
    ] {
        let (status, body) = fh.post_raw(path, "{\"context\": {}}").await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["errorCode"], "GENERAL", "{path}: {body}");
        assert!(
            body["errorDetails"]
                .as_str()
                .is_some_and(|d| d.contains("UTF-8")),
            "{path}: says what to fix: {body}"
        );
        // OFREP's 400 on the single-flag path names the key, as sent.
        if path.contains("/flags/") {
            assert_eq!(body["key"], "\u{fffd}\u{fffd}", "{path}: {body}");
        }
    }
    fh.stop().await.expect("clean stop");
}
