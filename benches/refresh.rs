//! Load run: does a request wait while its flag set refreshes?
//!
//! Two flaghosts side by side over the same 1,000-flag file: one whose set
//! stays warm (TTL an hour), one whose TTL is 20 ms, so its set falls due
//! about 50 times a second and a refresh (re-reading and hashing the file;
//! with Redis, a round trip and a check of what it holds) runs throughout.
//! Each is sent a static flag and a JsonLogic flag at `RATE` requests a
//! second, open loop, from a child process (this binary, re-run with
//! `--generate`). The two run interleaved, 5 times, with and without
//! Redis; the medians of each round's p50 and p99 are printed with the
//! refreshing/warm ratio. Goal: the refreshing p99 within 10% of warm.
//!
//! `cargo bench -p flaghost-benches --bench refresh`

#![allow(missing_docs)]
#![allow(clippy::print_stdout)] // a load run reports on stdout

use std::process::Command;
use std::time::Duration;

use flaghost::cache::RedisOptions;
use flaghost::config::ServeConfig;
use flaghost::plugins::Limits;
use flaghost_benches::{open_loop, percentile};
use flaghost_tests::{Dirs, Flaghost, RedisServer};
use serde_json::{Map, json};

const RATE: u64 = 1000;
/// Each run's length and the number of rounds: `REFRESH_RUN_SECS` (4) and
/// `REFRESH_ROUNDS` (5). p99s on this 2-core machine, with the generator
/// beside the server, vary 2-5x from run to run: more rounds, steadier
/// medians.
fn run() -> Duration {
    Duration::from_secs(env_or("REFRESH_RUN_SECS", 4))
}
fn rounds() -> usize {
    usize::try_from(env_or("REFRESH_ROUNDS", 5)).unwrap_or(5)
}
fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
const REFRESHING_TTL: Duration = Duration::from_millis(20);

/// 1,000 flags: a third static, two thirds JsonLogic; `static` and `rule`
/// among them.
fn dirs() -> Dirs {
    let mut flags = Map::new();
    for i in 0..1000 {
        let flag = if i % 3 == 0 {
            json!({"state": "ENABLED", "variants": {"a": "A", "b": "B"}, "defaultVariant": "a"})
        } else {
            json!({"state": "ENABLED", "variants": {"on": true, "off": false},
                   "defaultVariant": "off",
                   "targeting": {"if": [{"in": [{"var": "country"}, ["NL", "BE", format!("X{i}")]]},
                                        "on", "off"]}})
        };
        flags.insert(format!("flag-{i}"), flag);
    }
    flags.insert("static".into(), flags["flag-0"].clone());
    flags.insert("rule".into(), flags["flag-1"].clone());
    Dirs::new().flag_file("prod", &json!({ "flags": flags }))
}

fn config(dirs: &Dirs, ttl: Duration, redis: Option<&RedisServer>) -> ServeConfig {
    let mut config = dirs.config("prod", Limits::default());
    // NB: `cargo bench` builds no flaghost binary to compile in.
    config.compiler = flaghost::plugins::Compiler::InProcess;
    config.cache_ttl = ttl;
    config.redis = redis.map(|r| RedisOptions {
        url: r.url(),
        ttl,
        response_timeout: flaghost::cache::DEFAULT_RESPONSE_TIMEOUT,
        signing_key: None,
        max_entry_bytes: flaghost::cache::DEFAULT_MAX_ENTRY_BYTES,
        documents: Default::default(),
    });
    config
}

/// The child: the static and the JsonLogic flag of `base`, each at `RATE`;
/// prints `p50 p99 sent failed` of both together.
async fn generate(base: String) {
    let flag = |key: &str| format!("{base}/ofrep/v1/evaluate/flags/{key}");
    let ((mut statics, a), (rules, b)) = tokio::join!(
        open_loop(flag("static"), r#"{"context":{}}"#, RATE, run()),
        open_loop(flag("rule"), r#"{"context":{"country":"NL"}}"#, RATE, run()),
    );
    statics.extend(rules);
    statics.sort_unstable();
    println!(
        "{} {} {} {}",
        percentile(&statics, 0.50),
        percentile(&statics, 0.99),
        statics.len(),
        a + b
    );
}

fn median(mut values: Vec<u64>) -> u64 {
    values.sort_unstable();
    values[values.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if let Some(at) = args.iter().position(|a| a == "--generate") {
        rt.block_on(generate(args[at + 1].clone()));
        return;
    }
    // `cargo bench` passes --bench; a plain `cargo test` of benches passes nothing.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let dirs = dirs();
    let redis = RedisServer::start();
    for with_redis in [None, Some(&redis)] {
        let backend = if with_redis.is_some() {
            "redis"
        } else {
            "memory"
        };
        let mut p50s = [Vec::new(), Vec::new()];
        let mut p99s = [Vec::new(), Vec::new()];
        for round in 0..rounds() {
            for (which, ttl) in [Duration::from_secs(3600), REFRESHING_TTL]
                .into_iter()
                .enumerate()
            {
                let fh = rt
                    .block_on(Flaghost::start(&config(&dirs, ttl, with_redis)))
                    .expect("starts");
                let output = Command::new(std::env::current_exe().expect("this binary"))
                    .args(["--generate", &fh.base])
                    .output()
                    .expect("the generator runs");
                assert!(
                    output.status.success(),
                    "{}",
                    String::from_utf8_lossy(&output.stderr)
                );
                let line = String::from_utf8_lossy(&output.stdout);
                let figures: Vec<u64> = line
                    .split_whitespace()
                    .filter_map(|f| f.parse().ok())
                    .collect();
                let [p50, p99, sent, failed] = figures[..] else {
                    panic!("generator said {line:?}");
                };
                assert_eq!(failed, 0, "{sent} sent, {failed} failed");
                let name = ["warm", "refreshing"][which];
                println!(
                    "refresh/{backend}/{name} round {round}: p50 {p50} µs, p99 {p99} µs ({sent} requests)"
                );
                p50s[which].push(p50);
                p99s[which].push(p99);
                rt.block_on(fh.stop()).expect("stops");
            }
        }
        let (warm50, warm99) = (median(p50s[0].clone()), median(p99s[0].clone()));
        let (hot50, hot99) = (median(p50s[1].clone()), median(p99s[1].clone()));
        // NB: each round's two runs are side by side in time; the median of
        // their ratios discounts the machine's slow spells, which move a
        // whole round.
        let paired: Vec<u64> = p99s[0]
            .iter()
            .zip(&p99s[1])
            .map(|(warm, hot)| hot * 1000 / (*warm).max(1))
            .collect();
        println!(
            "refresh/{backend}: warm p50 {warm50} µs, p99 {warm99} µs; refreshing every {REFRESHING_TTL:?}: \
             p50 {hot50} µs, p99 {hot99} µs; ratio of the p99 medians {:.2}, median of the rounds' p99 ratios {:.2} \
             ({} rounds of {:?})",
            hot99 as f64 / warm99 as f64,
            median(paired) as f64 / 1000.0,
            rounds(),
            run()
        );
    }
}
