//! Shared set-up for the benches: the example flag sets, loaded as flaghost
//! serves them.

use std::path::Path;
use std::sync::Arc;

use flaghost::environments::{Environments, Timing};
use flaghost::evaluation::EvaluationContext;
use flaghost::flags::FlagSet;
use flaghost::http::{AppState, HttpOptions, app};
use flaghost::plugins::{Compiler, Limits, PluginRuntime};
use flaghost::store::{DirStore, FlagStore};
use flaghost_tests::{build_plugins, root};

/// The example `production` flag set, its plugins loaded under `limits`.
/// Keep the runtime alive as long as the set is used.
pub fn example_flags(limits: Limits) -> (Arc<PluginRuntime>, Arc<FlagSet>) {
    build_plugins();
    let runtime = Arc::new(PluginRuntime::new(limits, Compiler::InProcess).expect("engine"));
    let (plugins, errors) = runtime
        .load_dir(&root().join("target/plugins"))
        .expect("plugin dir");
    assert!(errors.is_empty(), "{errors:?}");
    let store = DirStore::new(root().join("examples/flags"), plugins);
    let set = store.load_sync("production").expect("examples load");
    (runtime, set)
}

/// A context of a targeting key and 9 attributes, like a typical caller's.
pub fn typical_context() -> EvaluationContext {
    let serde_json::Value::Object(attributes) = serde_json::json!({
        "targetingKey": "user-4242",
        "country": "NL",
        "plan": "pro",
        "age": 34,
        "email": "someone@example.com",
        "locale": "nl-NL",
        "appVersion": "5.2.1",
        "beta": false,
        "account": {"tier": "beta", "seats": 12},
        "score": 0.75
    }) else {
        unreachable!("a JSON object literal")
    };
    EvaluationContext::from_attributes(attributes).expect("valid context")
}

/// The OFREP router over the flag files in `flags` (`env` the default
/// environment, loaded before it returns), with the example plugins loaded
/// under `limits`, answering under `options`. Keep the runtime alive as
/// long as the router is used.
pub fn ofrep_router(
    rt: &tokio::runtime::Runtime,
    flags: &Path,
    env: &str,
    limits: Limits,
    options: &HttpOptions,
) -> (Arc<PluginRuntime>, axum::Router) {
    build_plugins();
    let runtime = Arc::new(PluginRuntime::new(limits, Compiler::InProcess).expect("engine"));
    let (plugins, errors) = runtime
        .load_dir(&root().join("target/plugins"))
        .expect("plugin dir");
    assert!(errors.is_empty(), "{errors:?}");
    let store: Arc<dyn FlagStore> = Arc::new(DirStore::new(flags, plugins));
    let environments = Arc::new(Environments::new(store, None, Timing::default()));
    rt.block_on(environments.refresh(env)).expect("loads");
    let metrics_environments = environments.clone();
    let router = app(
        AppState {
            environments,
            default_environment: env.into(),
            admin: None,
            metrics_token: None,
            plugins: Default::default(),
            plugin_changes: None,
            plugin_pool: runtime.pool().clone(),
            plugin_budget: runtime.limits().request_budget(),
            api_keys: None,
            metrics: std::sync::Arc::new(flaghost::metrics::Metrics::of_environments(
                metrics_environments,
            )),
        },
        options,
    );
    (runtime, router)
}

/// The `q` quantile of `sorted` (ascending).
pub fn percentile(sorted: &[u64], q: f64) -> u64 {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

/// Sends `body` to `url` at `rate` a second for `run`, open loop (each
/// request on its own task, so a slow answer delays no other request); each
/// latency in µs from when the request was sent, sorted, and how many did
/// not answer 200. (Timed from the send, not from the tick: tokio's timer
/// has a millisecond grain that would otherwise show as server latency.)
pub async fn open_loop(
    url: String,
    body: &'static str,
    rate: u64,
    run: std::time::Duration,
) -> (Vec<u64>, u64) {
    use std::time::{Duration, Instant};
    let client = reqwest::Client::new();
    let period = Duration::from_micros(1_000_000 / rate);
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut sent = Vec::new();
    while started.elapsed() < run {
        ticks.tick().await;
        let (client, url) = (client.clone(), url.clone());
        sent.push(tokio::spawn(async move {
            let sent_at = Instant::now();
            let response = client.post(&url).body(body).send().await;
            let ok = matches!(&response, Ok(r) if r.status().is_success());
            if let Ok(r) = response {
                let _ = r.bytes().await;
            }
            (sent_at.elapsed().as_micros() as u64, ok)
        }));
    }
    let (mut latencies, mut failed) = (Vec::with_capacity(sent.len()), 0);
    for s in sent {
        let (latency, ok) = s.await.expect("request task");
        latencies.push(latency);
        failed += u64::from(!ok);
    }
    latencies.sort_unstable();
    (latencies, failed)
}

/// Runs this bench binary again as a load generator (`--generate` then
/// `args`), which prints whitespace-separated figures on one line; returns
/// the figures and the line.
pub fn run_generator(args: &[&str]) -> (Vec<u64>, String) {
    let output = std::process::Command::new(std::env::current_exe().expect("this binary"))
        .arg("--generate")
        .args(args)
        .output()
        .expect("the generator runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = String::from_utf8_lossy(&output.stdout).into_owned();
    let figures = line
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    (figures, line)
}
