//! Traces over OTLP/HTTP (protobuf): the `flaghost` binary exports to a
//! small OTLP receiver of the test's own, which decodes what it gets with
//! `opentelemetry-proto`. A request carrying a W3C `traceparent` is a child
//! of the caller's span; its evaluation and its plugin call are children of
//! it; a request without one starts a trace. Every log line of a request
//! names its request id, which the answer carries back.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use flaghost_tests::{build_plugins, eventually, fixture, flaghost_binary, root};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;

/// What the receiver got.
type Received = Arc<Mutex<Vec<Span>>>;

/// An OTLP/HTTP receiver on a free port: its address and what it received.
async fn receiver() -> (String, Received) {
    let received: Received = Arc::default();
    let kept = received.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let kept = kept.clone();
            async move {
                let request =
                    ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf export");
                let mut kept = kept.lock().expect("lock");
                for resource in request.resource_spans {
                    for scope in resource.scope_spans {
                        kept.extend(scope.spans);
                    }
                }
                // An empty ExportTraceServiceResponse.
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (address, received)
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            Value::StringValue(s) => s.clone(),
            Value::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
}

const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CALLER_SPAN: &str = "b7ad6b7169203331";

/// flaghost on the example flags and plugins, exporting to `collector`,
/// with `extra` options: the process, its base URL and its log.
async fn start(collector: &str, extra: &[&str]) -> (Killed, String, tempfile::NamedTempFile) {
    build_plugins();
    launch(
        &root().join("examples/flags"),
        &root().join("target/plugins"),
        extra,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector),
            // Batches sent every 100 ms, not every 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await
}

/// flaghost serving `flags` and `plugins` with `extra` options and `env`
/// (logging at debug, no traces unless `env` says where), once ready: the
/// process, its base URL and its log.
async fn launch(
    flags: &std::path::Path,
    plugins: &std::path::Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Killed, String, tempfile::NamedTempFile) {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let log = tempfile::NamedTempFile::new().expect("log file");
    let flaghost = Killed(
        Command::new(flaghost_binary())
            .arg("serve")
            .arg("--flags")
            .arg(flags)
            .arg("--plugins")
            .arg(plugins)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(extra)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env("RUST_LOG", "flaghost=debug")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log.reopen().expect("log"))
            .spawn()
            .expect("flaghost starts"),
    );
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let ready = eventually(Duration::from_secs(30), || async {
        client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await;
    assert!(ready, "flaghost is ready");
    (flaghost, base, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_receiver_as_children_of_the_callers_trace() {
    let (collector, received) = receiver().await;
    let (flaghost, base, log) = start(&collector, &[]).await;
    let client = reqwest::Client::new();

    // A plugin flag, from a caller in a trace of its own.
    let answer = client
        .post(format!("{base}/ofrep/v1/evaluate/flags/beta-search"))
        .header("traceparent", format!("00-{TRACE}-{CALLER_SPAN}-01"))
        .header("x-request-id", "caller-request-7")
        .body(r#"{"context": {"targetingKey": "u", "account": {"tier": "beta"}}}"#)
        .send()
        .await
        .expect("answer");
    assert_eq!(answer.status().as_u16(), 200);
    assert_eq!(
        answer
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("caller-request-7"),
        "the caller's request id comes back"
    );
    // A bulk request without a trace, and a refused one (logged at debug).
    let bulk = client
        .post(format!("{base}/ofrep/v1/evaluate/flags"))
        .body(r#"{"context": {"targetingKey": "u", "account": {"tier": "beta"}}}"#)
        .send()
        .await
        .expect("answer");
    assert_eq!(bulk.status().as_u16(), 200);
    assert!(
        bulk.headers().get("x-request-id").is_none(),
        "an id flaghost made is in its logs and spans, not answered"
    );
    let refused = client
        .post(format!("{base}/ofrep/v1/evaluate/flags/no-such-flag"))
        .header("x-request-id", "refused-request-9")
        .body("{}")
        .send()
        .await
        .expect("answer");
    assert_eq!(refused.status().as_u16(), 404);

    let complete = eventually(Duration::from_secs(10), || async {
        let spans = received.lock().expect("lock");
        let plugin_calls = spans.iter().filter(|s| s.name == "plugin call").count();
        let requests = spans.iter().filter(|s| s.name == "request").count();
        // The traced call's one, and the bulk answer's (4 plugin flags).
        plugin_calls >= 5 && requests >= 3
    })
    .await;
    let spans = received.lock().expect("lock").clone();
    assert!(
        complete,
        "spans received: {:#?}",
        spans.iter().map(|s| &s.name).collect::<Vec<_>>()
    );

    let in_trace: Vec<&Span> = spans.iter().filter(|s| hex(&s.trace_id) == TRACE).collect();
    let request = in_trace
        .iter()
        .find(|s| s.name == "request")
        .expect("the request span is in the caller's trace");
    assert_eq!(
        hex(&request.parent_span_id),
        CALLER_SPAN,
        "child of the caller's span"
    );
    assert_eq!(
        attribute(request, "request_id").as_deref(),
        Some("caller-request-7")
    );
    assert_eq!(
        attribute(request, "http.response.status_code").as_deref(),
        Some("200")
    );
    let evaluate = in_trace
        .iter()
        .find(|s| s.name == "evaluate")
        .expect("the evaluation has a span");
    assert_eq!(
        evaluate.parent_span_id, request.span_id,
        "evaluation under the request"
    );
    assert_eq!(attribute(evaluate, "flag").as_deref(), Some("beta-search"));
    let call = in_trace
        .iter()
        .find(|s| s.name == "plugin call")
        .expect("the plugin call has a span");
    assert_eq!(
        call.parent_span_id, evaluate.span_id,
        "plugin call under the evaluation"
    );
    assert_eq!(attribute(call, "plugin").as_deref(), Some("allow-list"));

    // The bulk request: a trace of its own, its plugin calls under it.
    let bulk_request = spans
        .iter()
        .find(|s| {
            s.name == "request"
                && attribute(s, "route").as_deref() == Some("/ofrep/v1/evaluate/flags")
        })
        .expect("the bulk request's span");
    let made = attribute(bulk_request, "request_id").expect("an id");
    assert!(
        made.split_once('-')
            .is_some_and(|(process, n)| process.len() == 8
                && [process, n]
                    .iter()
                    .all(|p| p.bytes().all(|b| b.is_ascii_hexdigit()))),
        "an id of flaghost's own: {made}"
    );
    assert!(
        bulk_request.parent_span_id.is_empty(),
        "a root: no trace came with it"
    );
    assert_ne!(hex(&bulk_request.trace_id), TRACE);
    let bulk_calls = spans
        .iter()
        .filter(|s| s.name == "plugin call" && s.trace_id == bulk_request.trace_id)
        .count();
    assert!(
        bulk_calls >= 4,
        "one span per plugin call of the bulk answer: {bulk_calls}"
    );
    assert!(
        spans
            .iter()
            .filter(|s| s.trace_id == bulk_request.trace_id)
            .all(|s| s.name != "evaluate"),
        "no evaluation spans in a bulk answer"
    );

    // Every log line of the refused request names its request id.
    drop(flaghost);
    let logged = std::fs::read_to_string(log.path()).expect("log");
    let lines: Vec<&str> = logged
        .lines()
        .filter(|l| l.contains("no-such-flag"))
        .collect();
    assert!(!lines.is_empty(), "the refusal is logged:\n{logged}");
    for line in lines {
        assert!(line.contains("refused-request-9"), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_api_keys_only_a_caller_with_a_key_joins_its_trace() {
    const KEY: &str = "trace-test-key-0123456789";
    const KEYED_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    let keys = tempfile::NamedTempFile::new().expect("key file");
    std::fs::write(keys.path(), format!(r#"{{"production": ["{KEY}"]}}"#)).expect("write keys");
    let (collector, received) = receiver().await;
    let key_file = keys.path().to_str().expect("utf-8 path");
    let (_flaghost, base, _log) = start(&collector, &["--api-keys-file", key_file]).await;
    let client = reqwest::Client::new();
    let ask = |trace: &str, key: Option<&str>, id: &str| {
        let mut request = client
            .post(format!("{base}/ofrep/v1/evaluate/flags/beta-search"))
            .header("traceparent", format!("00-{trace}-{CALLER_SPAN}-01"))
            .header("x-request-id", id)
            .body(r#"{"context": {"targetingKey": "u"}}"#);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        request.send()
    };
    let unkeyed = ask(TRACE, None, "unkeyed-1").await.expect("answer");
    assert_eq!(unkeyed.status().as_u16(), 401);
    let wrong = ask(TRACE, Some("not-a-key-of-this-file-42"), "wrong-key-2")
        .await
        .expect("answer");
    assert_eq!(wrong.status().as_u16(), 401);
    let keyed = ask(KEYED_TRACE, Some(KEY), "keyed-3")
        .await
        .expect("answer");
    assert_eq!(keyed.status().as_u16(), 200);

    let request_span = |id: &str| {
        received
            .lock()
            .expect("lock")
            .iter()
            .find(|s| s.name == "request" && attribute(s, "request_id").as_deref() == Some(id))
            .cloned()
    };
    let all_in = eventually(Duration::from_secs(10), || async {
        ["unkeyed-1", "wrong-key-2", "keyed-3"]
            .iter()
            .all(|id| request_span(id).is_some())
    })
    .await;
    assert!(all_in, "a request span for each request");
    for id in ["unkeyed-1", "wrong-key-2"] {
        let span = request_span(id).expect("span");
        assert!(
            span.parent_span_id.is_empty() && hex(&span.trace_id) != TRACE,
            "{id}: a caller without a key starts a trace of flaghost's own"
        );
        assert_eq!(
            attribute(&span, "http.response.status_code").as_deref(),
            Some("401")
        );
    }
    let span = request_span("keyed-3").expect("span");
    assert_eq!(hex(&span.trace_id), KEYED_TRACE, "a keyed caller's trace");
    assert_eq!(hex(&span.parent_span_id), CALLER_SPAN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_traces_off_every_log_line_of_a_request_names_its_id_text_or_json() {
    build_plugins();
    let flags = tempfile::tempdir().expect("flags");
    let plugins = tempfile::tempdir().expect("plugins");
    std::fs::copy(fixture("trap"), plugins.path().join("trap.wasm")).expect("plugin");
    std::fs::write(
        flags.path().join("production.json"),
        serde_json::json!({"flags": {"trapping": {
            "state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
            "targeting": {"plugin": ["trap", {}]}
        }}})
        .to_string(),
    )
    .expect("flag file");
    for format in ["text", "json"] {
        let (flaghost, base, log) =
            launch(flags.path(), plugins.path(), &["--log-format", format], &[]).await;
        let client = reqwest::Client::new();
        for (flag, id) in [
            ("no-such-flag", "off-request-4"),
            ("trapping", "off-request-5"),
        ] {
            let answer = client
                .post(format!("{base}/ofrep/v1/evaluate/flags/{flag}"))
                .header("x-request-id", id)
                .body("{}")
                .send()
                .await
                .expect("answer");
            assert_eq!(
                answer.headers().get("x-request-id").map(|v| v.as_bytes()),
                Some(id.as_bytes())
            );
        }
        drop(flaghost);
        let logged = std::fs::read_to_string(log.path()).expect("log");
        // The refusal (an HTTP worker's line) and the trap (a plugin
        // thread's) are each logged naming their request.
        for (says, id) in [
            ("no-such-flag", "off-request-4"),
            ("plugin evaluation failed", "off-request-5"),
        ] {
            let lines: Vec<&str> = logged.lines().filter(|l| l.contains(says)).collect();
            assert!(!lines.is_empty(), "{format}: {says:?} is logged:\n{logged}");
            for line in lines {
                match format {
                    "json" => {
                        let line: serde_json::Value =
                            serde_json::from_str(line).expect("a JSON log line");
                        assert_eq!(line["request_id"], id, "{line}");
                    }
                    _ => assert!(line.ends_with(&format!(" request_id={id}")), "{line}"),
                }
            }
        }
        // Lines outside any request name none.
        let started = logged
            .lines()
            .find(|l| l.contains("listening"))
            .expect("the listening line");
        assert!(!started.contains("request_id"), "{started}");
    }
}
