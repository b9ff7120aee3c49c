//! `GET /metrics`, scraped and parsed with the Prometheus project's own
//! text parser (its Python client's, installed by tests/clients/install.sh)
//! after a known sequence of requests over
//! real HTTP: evaluation counts by flag, variant and reason exact, errors by
//! code, HTTP request counts by route and status, plugin calls, reloads
//! accepted and refused, the cache's state; open on `--metrics-listen`,
//! behind the admin token on the public port.

use std::collections::BTreeMap;
use std::time::Duration;

use std::io::Write as _;
use std::process::{Command, Stdio};

use flaghost_tests::{
    Dirs, Flaghost, answer_limits, eventually, examples_config, install_clients, root,
};
use serde_json::json;

/// One sample as the parser read it.
#[derive(Debug, serde::Deserialize)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A scrape: every sample.
struct Scrape {
    samples: Vec<Sample>,
}

/// `text` parsed by the Prometheus client's parser; fails the test if it
/// does not parse.
fn parse(text: &str) -> Scrape {
    let mut child = Command::new("python3")
        .arg(root().join("tests/clients/parse_metrics.py"))
        .env("PYTHONPATH", root().join("target/clients/python"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let output = child.wait_with_output().expect("parser runs");
    assert!(
        output.status.success(),
        "the Prometheus parser refused /metrics: {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    Scrape {
        samples: String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("a sample"))
            .collect(),
    }
}

const TOKEN: &str = "metrics-admin-token-0123";

/// The scrape at `url` (with the admin token when given), parsed.
async fn scrape(fh: &Flaghost, url: &str, token: Option<&str>) -> (u16, Option<Scrape>) {
    let mut request = fh.client.get(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("reaches flaghost");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let text = response.text().await.expect("body");
    if status != 200 {
        return (status, None);
    }
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    (status, Some(parse(&text)))
}

/// The value of `metric` with exactly the labels `labels` (0 when absent).
fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let want: BTreeMap<&str, &str> = labels.iter().copied().collect();
    let found: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| s.name == metric)
        .filter(|s| {
            let have: BTreeMap<&str, &str> = s
                .labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            have == want
        })
        .map(|s| s.value)
        .collect();
    assert!(found.len() <= 1, "{metric} {labels:?}: {found:?}");
    found.first().copied().unwrap_or(0.0)
}

fn evaluations(scrape: &Scrape, flag: &str, variant: &str, reason: &str) -> f64 {
    value(
        scrape,
        "flaghost_evaluations_total",
        &[
            ("environment", "production"),
            ("flag", flag),
            ("variant", variant),
            ("reason", reason),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_known_sequence_exactly() {
    install_clients();
    // A copy of the examples, so a file can be broken and mended.
    let dirs = Dirs::new().with_example_flags();
    let mut config = examples_config(answer_limits());
    config.flags = dirs.flags();
    config.admin_token = Some(TOKEN.into());
    config.metrics_listen = Some("127.0.0.1:0".parse().expect("address"));
    config.watch_interval = Some(Duration::from_millis(100));
    let fh = Flaghost::start(&config).await.expect("flaghost starts");
    let open = format!(
        "{}/metrics",
        fh.metrics_base.as_deref().expect("metrics listener")
    );
    let public = format!("{}/metrics", fh.base);

    // What each answer said, counted as the metrics should count it:
    // (flag, variant, reason) -> answers.
    let mut expected: BTreeMap<(String, String, String), f64> = BTreeMap::new();
    let mut note = |answer: &serde_json::Value| {
        let reason = answer["reason"].as_str().expect("a success").to_owned();
        let variant = answer["variant"].as_str().unwrap_or_default().to_owned();
        let key = answer["key"].as_str().expect("key").to_owned();
        *expected.entry((key, variant, reason)).or_default() += 1.0;
    };
    for (flag, context) in [
        ("items-per-page", json!({})),
        ("items-per-page", json!({})),
        ("items-per-page", json!({})),
        ("new-checkout", json!({"targetingKey": "user-1"})),
        ("new-checkout", json!({"targetingKey": "user-2"})),
        ("legacy-reports", json!({})),
        // A plugin flag, answered by the allow-list plugin.
        (
            "beta-search",
            json!({"targetingKey": "u", "account": {"tier": "beta"}}),
        ),
    ] {
        let (status, answer) = fh.evaluate(flag, context).await;
        assert_eq!(status, 200, "{answer}");
        note(&answer);
    }
    for _ in 0..2 {
        assert_eq!(fh.evaluate("no-such-flag", json!({})).await.0, 404);
    }
    // The staging environment by path, and a bulk evaluation of production.
    assert_eq!(
        fh.evaluate_in(Some("staging"), "new-checkout", json!({}))
            .await
            .0,
        200
    );
    let (status, bulk) = fh
        .post_raw("/ofrep/v1/evaluate/flags", "{\"context\": {}}")
        .await;
    assert_eq!(status, 200, "{bulk}");
    for answer in bulk["flags"].as_array().expect("flags") {
        note(answer);
    }
    // A bad request: no evaluation, but an HTTP 400.
    assert_eq!(
        fh.post_raw("/ofrep/v1/evaluate/flags/theme", "[").await.0,
        400
    );

    let (status, scraped) = scrape(&fh, &open, None).await;
    assert_eq!(status, 200);
    let s = scraped.expect("parsed");

    // Every answer counted under its flag, variant and reason, exactly,
    // and nothing else in production.
    assert_eq!(
        expected[&("items-per-page".into(), "small".into(), "STATIC".into())],
        4.0
    );
    assert_eq!(
        expected[&("legacy-reports".into(), String::new(), "DISABLED".into())],
        1.0,
        "single only: the bulk answer leaves disabled flags out"
    );
    for ((flag, variant, reason), count) in &expected {
        assert_eq!(
            evaluations(&s, flag, variant, reason),
            *count,
            "{flag} {variant:?} {reason}"
        );
    }
    let counted: f64 = s
        .samples
        .iter()
        .filter(|x| {
            x.name == "flaghost_evaluations_total"
                && x.labels.get("environment").map(String::as_str) == Some("production")
        })
        .map(|x| x.value)
        .sum();
    assert_eq!(counted, expected.values().sum::<f64>());
    assert_eq!(
        value(
            &s,
            "flaghost_evaluations_total",
            &[
                ("environment", "staging"),
                ("flag", "new-checkout"),
                ("variant", "on"),
                ("reason", "STATIC")
            ]
        ),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "flaghost_evaluation_errors_total",
            &[
                ("environment", "production"),
                ("flag", ""),
                ("code", "FLAG_NOT_FOUND")
            ]
        ),
        2.0
    );
    // Nothing counted under a name a caller made up.
    assert!(
        !s.samples
            .iter()
            .any(|x| x.labels.get("flag").map(String::as_str) == Some("no-such-flag")),
        "a caller's flag key never becomes a label"
    );

    // HTTP requests by route pattern and status.
    let requests = |route: &str, status: &str| {
        value(
            &s,
            "flaghost_http_request_duration_seconds_count",
            &[("route", route), ("method", "POST"), ("status", status)],
        )
    };
    assert_eq!(requests("/ofrep/v1/evaluate/flags/{key}", "200"), 7.0);
    assert_eq!(requests("/ofrep/v1/evaluate/flags/{key}", "404"), 2.0);
    assert_eq!(requests("/ofrep/v1/evaluate/flags/{key}", "400"), 1.0);
    assert_eq!(requests("/ofrep/v1/evaluate/flags", "200"), 1.0);
    assert_eq!(
        requests(
            "/environments/{environment}/ofrep/v1/evaluate/flags/{key}",
            "200"
        ),
        1.0
    );

    // Plugins: the beta-search call and the bulk answer's plugin flags.
    assert!(
        value(
            &s,
            "flaghost_plugin_calls_total",
            &[("plugin", "allow-list")]
        ) >= 2.0
    );
    assert!(
        value(
            &s,
            "flaghost_plugin_call_duration_seconds_count",
            &[("plugin", "allow-list")]
        ) >= 2.0
    );

    // The cache, and the flags loaded.
    assert_eq!(
        value(&s, "flaghost_cache_backend", &[("backend", "memory-only")]),
        1.0
    );
    assert_eq!(
        value(&s, "flaghost_flags", &[("environment", "production")]),
        9.0
    );

    // Reloads: a broken file is refused (the last good keeps serving), the
    // mended one accepted.
    let reloads = |s: &Scrape, outcome: &str| {
        value(
            s,
            "flaghost_reloads_total",
            &[("what", "flags"), ("outcome", outcome)],
        )
    };
    assert_eq!(
        (reloads(&s, "accepted"), reloads(&s, "refused")),
        (0.0, 0.0)
    );
    let staging = dirs.flags().join("staging.json");
    let good = std::fs::read_to_string(&staging).expect("read");
    std::fs::write(&staging, "{\"flags\": ").expect("break");
    let refused = eventually(Duration::from_secs(5), || async {
        reloads(
            &scrape(&fh, &open, None).await.1.expect("parsed"),
            "refused",
        ) == 1.0
    })
    .await;
    assert!(refused, "the broken file is counted refused");
    std::fs::write(
        &staging,
        good.replace("\"version\": \"staging\"", "\"version\": \"staging-2\""),
    )
    .expect("mend");
    let accepted = eventually(Duration::from_secs(5), || async {
        reloads(
            &scrape(&fh, &open, None).await.1.expect("parsed"),
            "accepted",
        ) == 1.0
    })
    .await;
    assert!(accepted, "the mended file is counted accepted");

    // The public port: behind the admin token.
    assert_eq!(scrape(&fh, &public, None).await.0, 401);
    assert_eq!(
        scrape(&fh, &public, Some("wrong-token-0123456")).await.0,
        401
    );
    // Every route is one the table knows: none is counted as `other`.
    for path in ["/healthz", "/readyz"] {
        assert_eq!(fh.get(path).await.0, 200, "{path}");
    }
    assert!(fh.plugin_listing(TOKEN).await["plugins"].is_array());
    let (status, behind) = scrape(&fh, &public, Some(TOKEN)).await;
    assert_eq!(status, 200);
    let behind = behind.expect("parsed");
    let routes: std::collections::BTreeSet<&str> = behind
        .samples
        .iter()
        .filter_map(|x| x.labels.get("route").map(String::as_str))
        .collect();
    for route in ["/healthz", "/readyz", "/admin/v1/plugins", "/metrics"] {
        assert!(routes.contains(route), "{route} counted: {routes:?}");
    }
    assert!(
        !routes.contains("other"),
        "a route missing from the table: {routes:?}"
    );
    assert_eq!(
        evaluations(&behind, "items-per-page", "small", "STATIC"),
        4.0,
        "the same counters on both addresses"
    );
    // The metrics listener serves nothing else.
    let (status, _) = scrape(
        &fh,
        &format!(
            "{}/ofrep/v1/evaluate/flags",
            fh.metrics_base.as_deref().unwrap_or_default()
        ),
        None,
    )
    .await;
    assert_eq!(status, 404);
    fh.stop().await.expect("clean stop");
}

#[tokio::test]
async fn without_an_admin_token_or_a_metrics_address_metrics_are_off() {
    let dirs = Dirs::new().flag_file(
        "production",
        &json!({"flags": {"f": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "a"}}}),
    );
    let fh = Flaghost::start(&dirs.config("production", answer_limits()))
        .await
        .expect("starts");
    assert!(fh.metrics_base.is_none());
    let (status, body) = fh.get("/metrics").await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["errorDetails"]
            .as_str()
            .unwrap_or_default()
            .contains("FLAGHOST_ADMIN_TOKEN"),
        "{body}"
    );
    fh.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_metrics_token_reads_metrics_and_opens_nothing_else() {
    const METRICS_TOKEN: &str = "scraper-token-0123456789";
    let dirs = Dirs::new().flag_file(
        "production",
        &json!({"flags": {"f": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "a"}}}),
    );
    let status_of = |response: reqwest::Response| response.status().as_u16();
    for admin in [Some(TOKEN), None] {
        let mut config = dirs.config("production", answer_limits());
        config.admin_token = admin.map(Into::into);
        config.metrics_token = Some(METRICS_TOKEN.into());
        let fh = Flaghost::start(&config).await.expect("starts");
        let public = format!("{}/metrics", fh.base);
        assert_eq!(scrape(&fh, &public, Some(METRICS_TOKEN)).await.0, 200);
        assert_eq!(scrape(&fh, &public, None).await.0, 401);
        assert_eq!(
            scrape(&fh, &public, Some("wrong-token-0123456789")).await.0,
            401
        );
        let admin_with_metrics_token = fh
            .client
            .get(format!("{}/admin/v1/plugins", fh.base))
            .bearer_auth(METRICS_TOKEN)
            .send()
            .await
            .expect("reaches flaghost");
        match admin {
            Some(token) => {
                assert_eq!(status_of(admin_with_metrics_token), 401);
                assert_eq!(
                    scrape(&fh, &public, Some(token)).await.0,
                    200,
                    "the admin token reads it too"
                );
            }
            None => assert_eq!(status_of(admin_with_metrics_token), 404, "admin API off"),
        }
        fh.stop().await.expect("clean stop");
    }
}
