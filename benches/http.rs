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
use flaghost::plugins::Limits;
use flaghost::store::{DirStore, FlagStore};
use flaghost_tests::root;
use tower::ServiceExt;

fn ofrep(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (runtime, _set) = flaghost_benches::example_flags(Limits::default());
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
    let body = r#"{"context":{"targetingKey":"user-4242","country":"NL","plan":"pro","age":34}}"#;

    let mut group = c.benchmark_group("http/ofrep");
    for flag in ["items-per-page", "eu-pricing-banner"] {
        let uri = format!("/ofrep/v1/evaluate/flags/{flag}");
        group.bench_function(flag, |b| {
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
