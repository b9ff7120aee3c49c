//! JsonLogic targeting, flagd-style, on a compiled flag set: each case beside
//! the same rule run directly through datalogic-rs compiled (what flaghost
//! adds: context enrichment, variant resolution), and bulk evaluation of a
//! 50-flag set through the router in-process.
//!
//! `cargo bench -p flaghost-benches --bench targeting`

// criterion_group!/criterion_main! generate undocumented items.
#![allow(missing_docs)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use criterion::{Criterion, criterion_group, criterion_main};
use datalogic_rs::bumpalo::Bump;
use flaghost::evaluation::{EvaluationContext, evaluate};
use flaghost::flags::parse_flag_file;
use flaghost::http::HttpOptions;
use flaghost::plugins::{Compiler, Limits, PluginRuntime};
use flaghost_tests::{build_plugins, root};
use serde_json::{Value as Json, json};
use std::hint::black_box;
use tower::ServiceExt;

/// The rules measured, by bench name.
fn rules() -> Vec<(&'static str, Json)> {
    vec![
        (
            "if_in",
            json!({"if": [{"in": [{"var": "country"}, ["NL", "DE", "FR"]]}, "on", "off"]}),
        ),
        (
            "fractional",
            json!({"fractional": [["a", 25], ["b", 25], ["c", 25], ["d", 25]]}),
        ),
        (
            "sem_ver",
            json!({"if": [{"sem_ver": [{"var": "appVersion"}, ">=", "5.0.0"]}, "on", "off"]}),
        ),
    ]
}

fn flag_file() -> Json {
    let mut flags = serde_json::Map::new();
    flags.insert(
        "static".into(),
        json!({"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "on"}),
    );
    for (name, rule) in rules() {
        let variants = if name == "fractional" {
            json!({"a": "A", "b": "B", "c": "C", "d": "D", "off": "off"})
        } else {
            json!({"on": "on", "off": "off"})
        };
        flags.insert(name.into(), json!({"state": "ENABLED", "variants": variants, "defaultVariant": "off", "targeting": rule}));
    }
    flags.insert(
        "ref".into(),
        json!({"state": "ENABLED", "variants": {"on": "on", "off": "off"}, "defaultVariant": "off",
        "targeting": {"if": [{"$ref": "in_eu"}, "on", "off"]}}),
    );
    flags.insert("plugin_in_jsonlogic".into(), json!({"state": "ENABLED", "variants": {"on": "on", "off": "off"}, "defaultVariant": "off",
        "targeting": {"if": [{"plugin": ["allow-list", {"attribute": "country", "values": ["NL"], "variant": "on"}]}, "on", "off"]}}));
    json!({"$evaluators": {"in_eu": {"in": [{"var": "country"}, ["NL", "DE", "FR"]]}}, "flags": flags})
}

/// A context as a request's body parses into one.
fn context() -> EvaluationContext {
    let body = r#"{"context":{"targetingKey":"user-4242","country":"NL","plan":"pro","age":34,
        "email":"someone@example.com","appVersion":"5.2.1","beta":false,"account":{"tier":"beta"}}}"#;
    let Json::Object(mut request) = serde_json::from_str(body).expect("json") else {
        unreachable!()
    };
    let Some(Json::Object(attributes)) = request.remove("context") else {
        unreachable!()
    };
    EvaluationContext::from_attributes(attributes).expect("context")
}

fn targeting(c: &mut Criterion) {
    build_plugins();
    let runtime = PluginRuntime::new(Limits::default(), Compiler::InProcess).expect("engine");
    let (plugins, errors) = runtime
        .load_dir(&root().join("target/plugins"))
        .expect("plugins");
    assert!(errors.is_empty());
    let file = flag_file().to_string();
    let set = parse_flag_file(
        "bench.json",
        "bench",
        file.as_bytes(),
        &plugins,
        &Default::default(),
    )
    .expect("valid");
    assert!(set.warnings.is_empty(), "{:?}", set.warnings);
    let ctx = context();

    let mut group = c.benchmark_group("evaluate");
    for flag in [
        "static",
        "if_in",
        "fractional",
        "sem_ver",
        "ref",
        "plugin_in_jsonlogic",
    ] {
        let r = evaluate(&set, flag, &ctx, None).expect("evaluates");
        assert!(r.variant.is_some(), "{flag}");
        group.bench_function(flag, |b| {
            b.iter(|| evaluate(black_box(&set), black_box(flag), &ctx, None))
        });
    }
    group.finish();

    // The same rules straight through datalogic-rs, compiled once, on the
    // same data flaghost hands it (context + $flagd), built outside the loop.
    let engine = datalogic_rs::Engine::new();
    let mut data = ctx.attributes().clone();
    data.insert(
        "$flagd".into(),
        json!({"flagKey": "fractional", "timestamp": 1_790_000_000}),
    );
    let data = Json::Object(data);
    let mut group = c.benchmark_group("datalogic_direct");
    for (name, rule) in rules() {
        let logic = engine.compile(&rule).expect("compiles");
        let mut arena = Bump::new();
        group.bench_function(name, |b| {
            b.iter(|| {
                let answer = engine
                    .evaluate(&logic, black_box(&data), &arena)
                    .map(|v| v.as_str().map(str::len));
                arena.reset();
                answer
            })
        });
    }
    group.finish();
}

/// An OFREP router serving `flags` as environment `env`, bodies up to
/// `body_limit`. Keep the runtime alive as long as the router is used.
fn router_for(
    rt: &tokio::runtime::Runtime,
    env: &str,
    flags: serde_json::Map<String, Json>,
    body_limit: usize,
) -> (Arc<PluginRuntime>, axum::Router) {
    let dir = tempfile_dir();
    std::fs::write(
        dir.join(format!("{env}.json")),
        json!({"flags": flags}).to_string(),
    )
    .expect("write");
    let options = HttpOptions {
        body_limit,
        ..HttpOptions::default()
    };
    flaghost_benches::ofrep_router(rt, &dir, env, Limits::default(), &options)
}

/// `count` flags: a third static, a third `if`/`in` on `country`, a third
/// `fractional`; `whole` adds to each rule a branch that reads the whole
/// data (`{"var": ""}`), so every attribute is converted for it.
fn mixed_flags(count: usize, whole: bool) -> serde_json::Map<String, Json> {
    let mut flags = serde_json::Map::new();
    for i in 0..count {
        let mut targeting = match i % 3 {
            0 => json!({}),
            1 => json!({"if": [{"in": [{"var": "country"}, ["NL", "DE"]]}, "on", "off"]}),
            _ => json!({"fractional": [["on", 50], ["off", 50]]}),
        };
        if whole && i % 3 != 0 {
            targeting = json!({"if": [{"==": [{"var": "country"}, "XX"]}, {"if": [{"var": ""}, "on", "off"]}, targeting]});
        }
        flags.insert(
            format!("flag-{i:04}"),
            json!({"state": "ENABLED", "variants": {"on": true, "off": false},
            "defaultVariant": "off", "targeting": targeting}),
        );
    }
    flags
}

fn post_bulk(
    b: &mut criterion::Bencher<'_>,
    rt: &tokio::runtime::Runtime,
    router: &axum::Router,
    body: &str,
) {
    b.to_async(rt).iter(|| {
        let request = Request::post("/ofrep/v1/evaluate/flags")
            .header("content-type", "application/json")
            .body(Body::from(body.to_owned()))
            .expect("request");
        let router = router.clone();
        async move {
            let response = router.oneshot(request).await.expect("infallible");
            assert_eq!(response.status(), 200);
            response
        }
    })
}

/// 50 flags (static, if/in and fractional, in turn) in one bulk answer.
fn bulk(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (_runtime, router) = router_for(&rt, "bulk", mixed_flags(50, false), 100 << 10);
    let body = r#"{"context":{"targetingKey":"user-4242","country":"NL","plan":"pro"}}"#;
    c.bench_function("http/bulk_50_flags", |b| post_bulk(b, &rt, &router, body));
}

/// The hostile-inputs issue's case: 1,000 flags (two thirds JsonLogic)
/// with a context of about 1 MB (62,000 keys), beside the same flags whose
/// rules read the whole data (every attribute converted for each flag).
fn bulk_big_context(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut context = serde_json::Map::new();
    context.insert("targetingKey".into(), json!("user-4242"));
    context.insert("country".into(), json!("NL"));
    for i in 0..62_000 {
        context.insert(format!("attribute-{i:05}"), json!(i));
    }
    let body = json!({"context": context}).to_string();
    assert!(body.len() > 1_000_000, "{} bytes", body.len());
    let mut group = c.benchmark_group("http/bulk_1000_flags_1mb_context");
    group.sample_size(10);
    for (name, whole) in [
        ("rules read what they name", false),
        ("rules read the whole data", true),
    ] {
        let (_runtime, router) = router_for(&rt, "big", mixed_flags(1000, whole), 2 << 20);
        group.bench_function(name, |b| post_bulk(b, &rt, &router, &body));
    }
    group.finish();
}

/// A fresh directory under target/ for the bench's flag file.
fn tempfile_dir() -> std::path::PathBuf {
    let dir = root().join("target/bench-flags");
    std::fs::create_dir_all(&dir).expect("mkdir");
    dir
}

criterion_group!(benches, targeting, bulk, bulk_big_context);
criterion_main!(benches);
