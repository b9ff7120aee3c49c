//! Load run: a static flag's latency, open loop at a fixed rate, while
//! another flag's plugin is attacked by 64 connections.
//!
//! flaghost serves in this process; the load runs in a child process (this
//! same binary, re-run with `--generate`) so the generator does not share
//! this process's runtime. The static flag is sent `RATE` requests a second
//! on a fixed schedule, each on its own task (open loop: a slow answer does
//! not delay the next request), timed from when it was due, so a stall
//! shows in full. Meanwhile `ATTACKERS` connections send the attacked flag
//! back to back. Scenarios: quiet; a plugin spinning just under its
//! deadline (defaults: quarantined after three strikes); the same with the
//! quarantine off (the pool's share is all that holds it); a plugin
//! looping to its deadline; the no-quarantine runs again with the plugin
//! threads niced; a flood of a static flag by the same connections, the
//! floor of any attack answered at once. Goal: static p99 under attack at most 2x quiet.
//!
//! `cargo bench -p flaghost-benches --bench noisy_neighbour`

#![allow(missing_docs)]
#![allow(clippy::print_stdout)] // a load run reports on stdout

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use flaghost::plugins::Limits;
use flaghost_benches::{open_loop, percentile, run_generator};
use flaghost_tests::{Dirs, Flaghost, fixture, plugin, spin_iterations};
use serde_json::json;

const RATE: u64 = 1000;
const ATTACKERS: usize = 64;
const RUN: Duration = Duration::from_secs(5);

fn dirs(spin: u64) -> Dirs {
    let plugin_flag = |name: &str, config: serde_json::Value| {
        json!({"state": "ENABLED", "variants": {"on": true, "off": false},
               "defaultVariant": "off", "targeting": {"plugin": [name, config]}})
    };
    Dirs::new()
        .plugin("allow-list", &plugin("allow-list"))
        .plugin("spin", &fixture("spin"))
        .plugin("endless-loop", &fixture("endless-loop"))
        .flag_file(
            "prod",
            &json!({"flags": {
                "static": {"state": "ENABLED", "variants": {"a": "A", "b": "B"},
                           "defaultVariant": "a"},
                "static2": {"state": "ENABLED", "variants": {"a": "A", "b": "B"},
                            "defaultVariant": "b"},
                "good": plugin_flag("allow-list",
                    json!({"attribute": "country", "values": ["NL"], "variant": "on"})),
                "spinner": plugin_flag("spin", json!({ "iterations": spin })),
                "looper": plugin_flag("endless-loop", json!({})),
            }}),
        )
}

/// The child: loads `base`, the attack on `attacked` beside a static flag
/// at `RATE` and the neighbour plugin flag at a tenth of it; prints
/// `static-p50 static-p99 static-sent static-failed good-p50 good-p99
/// good-sent good-failed attacks`.
async fn generate(base: String, attacked: Option<String>) {
    let stop = Arc::new(AtomicBool::new(false));
    let attacks = Arc::new(AtomicU64::new(0));
    let mut attackers = Vec::new();
    for _ in 0..attacked.as_ref().map_or(0, |_| ATTACKERS) {
        let url = format!(
            "{base}/ofrep/v1/evaluate/flags/{}",
            attacked.as_deref().unwrap_or("")
        );
        let (stop, attacks) = (stop.clone(), attacks.clone());
        attackers.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(r) = client.post(&url).body(r#"{"context":{}}"#).send().await {
                    let _ = r.bytes().await;
                    attacks.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let flag = |key: &str| format!("{base}/ofrep/v1/evaluate/flags/{key}");
    let ((statics, static_failed), (goods, good_failed)) = tokio::join!(
        open_loop(flag("static"), r#"{"context":{}}"#, RATE, RUN),
        open_loop(
            flag("good"),
            r#"{"context":{"country":"NL"}}"#,
            RATE / 10,
            RUN
        ),
    );
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        let _ = a.await;
    }
    println!(
        "{} {} {} {} {} {} {} {} {}",
        percentile(&statics, 0.50),
        percentile(&statics, 0.99),
        statics.len(),
        static_failed,
        percentile(&goods, 0.50),
        percentile(&goods, 0.99),
        goods.len(),
        good_failed,
        attacks.load(Ordering::Relaxed)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if let Some(at) = args.iter().position(|a| a == "--generate") {
        let base = args[at + 1].clone();
        let attacked = args.get(at + 2).filter(|a| *a != "-").cloned();
        rt.block_on(generate(base, attacked));
        return;
    }
    // `cargo bench` passes --bench; a plain `cargo test` of benches passes nothing.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let deadline = Limits::default().deadline;
    let spin = spin_iterations(deadline, 0.8);
    let dirs = dirs(spin);
    let no_quarantine = Limits {
        quarantine_after: u32::MAX,
        ..Limits::default()
    };
    // The plugin threads' priority, side by side: as the HTTP workers (the
    // default) and niced below them.
    let niced = |limits: &Limits| Limits {
        pool_nice: 10,
        ..limits.clone()
    };
    let scenarios = [
        ("quiet", "-", Limits::default()),
        // The same 64 connections on a static flag: what any flood of cheap
        // answers costs here (the generator shares the two cores), the
        // floor for attacks answered at once (a quarantined plugin).
        (
            "64 connections on a static flag",
            "static2",
            Limits::default(),
        ),
        (
            "spinning at 80% of its deadline",
            "spinner",
            Limits::default(),
        ),
        (
            "spinning at 80%, no quarantine",
            "spinner",
            no_quarantine.clone(),
        ),
        (
            "spinning at 80%, no quarantine, nice 10",
            "spinner",
            niced(&no_quarantine),
        ),
        ("looping to its deadline", "looper", Limits::default()),
        ("looping, no quarantine", "looper", no_quarantine.clone()),
        (
            "looping, no quarantine, nice 10",
            "looper",
            niced(&no_quarantine),
        ),
        // The first run also warms up: quiet again, to bracket the rest.
        ("quiet (again)", "-", Limits::default()),
    ];
    for (name, attacked, limits) in scenarios {
        let mut config = dirs.config("prod", limits);
        // NB: `cargo bench` builds no flaghost binary to compile in.
        config.compiler = flaghost::plugins::Compiler::InProcess;
        let fh = rt.block_on(Flaghost::start(&config)).expect("starts");
        let (figures, line) = run_generator(&[&fh.base, attacked]);
        let [
            p50,
            p99,
            sent,
            failed,
            g50,
            g99,
            good_sent,
            good_failed,
            attacks,
        ] = figures[..]
        else {
            panic!("generator said {line:?}");
        };
        println!(
            "noisy_neighbour/{name}: static p50 {p50} µs, p99 {p99} µs ({sent} at {RATE}/s, {failed} failed); \
             neighbour plugin flag p50 {g50} µs, p99 {g99} µs ({good_sent}, {good_failed} failed); \
             {attacks} attacking requests from {ATTACKERS} connections; deadline {deadline:?}"
        );
        rt.block_on(fh.stop()).expect("stops");
    }
}
