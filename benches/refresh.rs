//! Load run: does a request wait while its flag set refreshes?
//!
//! Two flaghosts up at once over the same 1,000-flag file: one whose set
//! stays warm (TTL an hour), one whose TTL is 20 ms (with Redis 1 s, the
//! least `--cache-ttl` allows: see [`refreshing_ttl`]), so its set falls due
//! again and again and a refresh (a `stat` of the file, a read and a hash
//! when it changed; with Redis, a round trip and rewriting the entries that
//! expired meanwhile) runs throughout. A child process (this binary,
//! re-run with `--generate`) sends a static flag and a JsonLogic flag at
//! `RATE` requests a second each, open loop, to one flaghost and then the
//! other in alternating slices of 500 ms, so both meet the machine's slow
//! spells alike. Rounds (`REFRESH_ROUNDS`, 5) of `REFRESH_RUN_SECS` (4) per
//! flaghost, with and without Redis; printed: the medians of the rounds'
//! p50 and p99, and the median of the rounds' refreshing/warm p99 ratios.
//! Goal: the refreshing p99 within 10% of warm.
//!
//! `cargo bench -p flaghost-benches --bench refresh`

#![allow(missing_docs)]
#![allow(clippy::print_stdout)] // a load run reports on stdout

use std::time::Duration;

use flaghost::cache::RedisOptions;
use flaghost::config::ServeConfig;
use flaghost::plugins::Limits;
use flaghost_benches::{open_loop, percentile, run_generator};
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
/// The refreshing flaghost's TTL: 20 ms from memory. With Redis the keys
/// live as long, so at 20 ms every refresh finds them expired and rewrites
/// 1,001 entries; `REFRESH_REDIS_TTL_MS` (default 1,000, the least
/// `--cache-ttl` allows) sets it there.
fn refreshing_ttl(redis: bool) -> Duration {
    if redis {
        Duration::from_millis(env_or("REFRESH_REDIS_TTL_MS", 1000))
    } else {
        Duration::from_millis(20)
    }
}

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
        tls: Default::default(),
    });
    config
}

/// How long the load stays on one of the two flaghosts before it moves to
/// the other: both see the machine's slow spells alike.
const SLICE: Duration = Duration::from_millis(500);

/// The child: the static and the JsonLogic flag of `warm` and of
/// `refreshing`, each at `RATE`, in alternating slices of [`SLICE`] until
/// each had `run()`; prints `p50 p99 sent failed` of each.
async fn generate(warm: String, refreshing: String) {
    let flag = |base: &str, key: &str| format!("{base}/ofrep/v1/evaluate/flags/{key}");
    let mut latencies = [Vec::new(), Vec::new()];
    let mut failed = [0, 0];
    let slices = (run().as_millis() / SLICE.as_millis()).max(1);
    for _ in 0..slices {
        for (which, base) in [&warm, &refreshing].into_iter().enumerate() {
            let ((statics, a), (rules, b)) = tokio::join!(
                open_loop(flag(base, "static"), r#"{"context":{}}"#, RATE, SLICE),
                open_loop(
                    flag(base, "rule"),
                    r#"{"context":{"country":"NL"}}"#,
                    RATE,
                    SLICE
                ),
            );
            latencies[which].extend(statics);
            latencies[which].extend(rules);
            failed[which] += a + b;
        }
    }
    for (which, mut all) in latencies.into_iter().enumerate() {
        all.sort_unstable();
        print!(
            "{} {} {} {} ",
            percentile(&all, 0.50),
            percentile(&all, 0.99),
            all.len(),
            failed[which]
        );
    }
    println!();
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
        rt.block_on(generate(args[at + 1].clone(), args[at + 2].clone()));
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
            let warm = rt
                .block_on(Flaghost::start(&config(
                    &dirs,
                    Duration::from_secs(3600),
                    with_redis,
                )))
                .expect("starts");
            let refreshing = rt
                .block_on(Flaghost::start(&config(
                    &dirs,
                    refreshing_ttl(with_redis.is_some()),
                    with_redis,
                )))
                .expect("starts");
            let (figures, line) = run_generator(&[&warm.base, &refreshing.base]);
            let [w50, w99, w_sent, w_failed, r50, r99, r_sent, r_failed] = figures[..] else {
                panic!("generator said {line:?}");
            };
            assert_eq!(w_failed + r_failed, 0, "{line}");
            println!(
                "refresh/{backend} round {round}: warm p50 {w50} µs, p99 {w99} µs ({w_sent}); \
                 refreshing p50 {r50} µs, p99 {r99} µs ({r_sent})"
            );
            p50s[0].push(w50);
            p99s[0].push(w99);
            p50s[1].push(r50);
            p99s[1].push(r99);
            rt.block_on(warm.stop()).expect("stops");
            rt.block_on(refreshing.stop()).expect("stops");
        }
        let (warm50, warm99) = (median(p50s[0].clone()), median(p99s[0].clone()));
        let (hot50, hot99) = (median(p50s[1].clone()), median(p99s[1].clone()));
        // NB: each round's two are interleaved in time; the median of their
        // ratios discounts what differs between rounds.
        let paired: Vec<u64> = p99s[0]
            .iter()
            .zip(&p99s[1])
            .map(|(warm, hot)| hot * 1000 / (*warm).max(1))
            .collect();
        println!(
            "refresh/{backend}: warm p50 {warm50} µs, p99 {warm99} µs; refreshing every {:?}: \
             p50 {hot50} µs, p99 {hot99} µs; ratio of the p99 medians {:.2}, median of the rounds' p99 ratios {:.2} \
             ({} rounds of {:?})",
            refreshing_ttl(with_redis.is_some()),
            hot99 as f64 / warm99 as f64,
            median(paired) as f64 / 1000.0,
            rounds(),
            run()
        );
    }
}
