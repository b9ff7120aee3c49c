//! Load run: a well-behaved plugin flag at high concurrency, quiet, and with
//! 10% of the requests going to a plugin that loops to its deadline; the
//! well-behaved flag's p50/p99 are printed for each (target: p99 at most 2x
//! its quiet value). A third run turns the quarantine off, to show what it
//! buys. Not a criterion bench: it measures latencies under concurrency.
//!
//! `cargo bench -p flaghost-benches --bench noisy_neighbour`

#![allow(missing_docs)]
#![allow(clippy::print_stdout)] // a load run reports on stdout

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flaghost::plugins::Limits;
use flaghost_tests::{Dirs, Flaghost, fixture, plugin};
use serde_json::json;

const CONNECTIONS: usize = 32;
const RUN: Duration = Duration::from_secs(5);

fn dirs() -> Dirs {
    Dirs::new()
        .plugin("allow-list", &plugin("allow-list"))
        .plugin("endless-loop", &fixture("endless-loop"))
        .flag_file(
            "prod",
            &json!({"flags": {
                "good": {"state": "ENABLED", "variants": {"on": true, "off": false},
                         "defaultVariant": "off",
                         "targeting": {"plugin": ["allow-list",
                             {"attribute": "country", "values": ["NL"], "variant": "on"}]}},
                "bad": {"state": "ENABLED", "variants": {"on": true, "off": false},
                        "defaultVariant": "off",
                        "targeting": {"plugin": ["endless-loop", {}]}}
            }}),
        )
}

/// Runs the load; the good flag's latencies in microseconds, sorted.
async fn run(fh: &Flaghost, bad_share: u64) -> Vec<u64> {
    let stop = Instant::now() + RUN;
    let counter = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .build()
            .expect("client");
        let base = fh.base.clone();
        let counter = counter.clone();
        tasks.push(tokio::spawn(async move {
            let mut good = Vec::new();
            while Instant::now() < stop {
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let flag = if n % 100 < bad_share { "bad" } else { "good" };
                let started = Instant::now();
                let response = client
                    .post(format!("{base}/ofrep/v1/evaluate/flags/{flag}"))
                    .body(r#"{"context":{"targetingKey":"u","country":"NL"}}"#)
                    .send()
                    .await
                    .expect("answers");
                let ok = response.status().is_success();
                let _ = response.bytes().await;
                if flag == "good" {
                    assert!(ok, "the good flag answers");
                    good.push(started.elapsed().as_micros() as u64);
                }
            }
            good
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    all.sort_unstable();
    all
}

fn percentile(sorted: &[u64], q: f64) -> u64 {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

fn main() {
    // `cargo bench` passes --bench; a plain `cargo test` of benches passes nothing.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let dirs = dirs();
        let scenarios = [
            ("quiet", 0, Limits::default()),
            ("10% bad neighbour", 10, Limits::default()),
            (
                "10% bad neighbour, no quarantine",
                10,
                Limits {
                    quarantine_after: u32::MAX,
                    ..Limits::default()
                },
            ),
        ];
        for (name, bad_share, limits) in scenarios {
            let fh = Flaghost::start(&dirs.config("prod", limits)).await.expect("starts");
            let good = run(&fh, bad_share).await;
            println!(
                "noisy_neighbour/{name}: good flag p50 {} µs, p99 {} µs ({} requests, {} connections, deadline 10 ms)",
                percentile(&good, 0.50),
                percentile(&good, 0.99),
                good.len(),
                CONNECTIONS
            );
            fh.stop().await.expect("stops");
        }
    });
}
