//! The HTTP layer's cost: an OFREP single-flag evaluation through the router
//! in-process (`tower::ServiceExt::oneshot`, no socket), beside the same
//! evaluation without HTTP in the `evaluation` bench.
//!
//! `cargo bench -p flaghost-benches --bench http`

// criterion_group!/criterion_main! generate undocumented items.
#![allow(missing_docs)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use criterion::{Criterion, criterion_group, criterion_main};
use flaghost::plugins::{Isolation, Limits};
use flaghost_tests::root;
use tower::ServiceExt;

/// The OFREP router over the example flags, plugins loaded under `limits`.
fn router(
    rt: &tokio::runtime::Runtime,
    limits: Limits,
) -> (Arc<flaghost::plugins::PluginRuntime>, axum::Router) {
    flaghost_benches::ofrep_router(
        rt,
        &root().join("examples/flags"),
        "production",
        limits,
        &flaghost::http::HttpOptions::default(),
    )
}

/// A static flag, and the allow-list plugin flag with the default isolation
/// (`fresh`) and with `reuse`, side by side.
fn ofrep(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let body = r#"{"context":{"targetingKey":"user-4242","country":"NL","plan":"pro","age":34}}"#;
    let (_fresh, fresh) = router(&rt, Limits::default());
    let (_reuse, reuse) = router(
        &rt,
        Limits {
            isolation: Isolation::Reuse,
            ..Limits::default()
        },
    );

    let mut group = c.benchmark_group("http/ofrep");
    for (name, flag, router) in [
        ("items-per-page (static)", "items-per-page", &fresh),
        (
            "eu-pricing-banner (plugin, fresh)",
            "eu-pricing-banner",
            &fresh,
        ),
        (
            "eu-pricing-banner (plugin, reuse)",
            "eu-pricing-banner",
            &reuse,
        ),
    ] {
        let uri = format!("/ofrep/v1/evaluate/flags/{flag}");
        group.bench_function(name, |b| {
            b.to_async(&rt).iter(|| {
                let request = Request::post(&uri)
                    .header("content-type", "application/json")
                    .body(Body::from(body))
                    .expect("request");
                let router = router.clone();
                async move {
                    let response = router.oneshot(request).await.expect("infallible");
                    assert_eq!(response.status(), 200);
                    response
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, ofrep);
criterion_main!(benches);
