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
use flaghost::environments::{Environments, Timing};
use flaghost::http::{AppState, app};
use flaghost::plugins::{Isolation, Limits};
use flaghost::store::{DirStore, FlagStore};
use flaghost_tests::root;
use tower::ServiceExt;

/// The OFREP router over the example flags, plugins loaded under `limits`.
/// Keep the runtime alive as long as the router is used.
fn router(
    rt: &tokio::runtime::Runtime,
    limits: Limits,
) -> (Arc<flaghost::plugins::PluginRuntime>, axum::Router) {
    let (runtime, _set) = flaghost_benches::example_flags(limits);
    let (plugins, _) = runtime
        .load_dir(&root().join("target/plugins"))
        .expect("plugins");
    let store: Arc<dyn FlagStore> = Arc::new(DirStore::new(root().join("examples/flags"), plugins));
    let environments = Arc::new(Environments::new(store, None, Timing::default()));
    rt.block_on(environments.refresh("production"))
        .expect("loads");
    let router = app(
        AppState {
            environments,
            default_environment: "production".into(),
            admin: None,
            plugins: Default::default(),
            plugin_changes: None,
            plugin_pool: runtime.pool().clone(),
            plugin_budget: runtime.limits().request_budget(),
        },
        &flaghost::http::HttpOptions::default(),
    );
    (runtime, router)
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
