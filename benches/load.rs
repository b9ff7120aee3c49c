//! The load harness: flaghost beside a bare axum OFREP "floor", under the
//! same HTTP load, in CPU per request, requests a second and latency.
//!
//! Three servers run at once, each a process of its own built with the
//! release profile: the floor (this binary re-run with `--floor`: an axum
//! handler that parses an OFREP body and answers a fixed OFREP JSON, the
//! least any OFREP server must do; for a bulk request, the very bytes
//! flaghost answers, taken from it before the run, so the floor pays what
//! sending that answer costs), flaghost from memory, and flaghost with
//! `REDIS_URL` (a `redis-server` of the harness's own). Debian's `wrk`
//! (`apt-get install wrk`) drives one at a time, `LOAD_CONNECTIONS` (64)
//! connections on 2 threads for `LOAD_SECS` (3) each, interleaved: every
//! round runs every scenario on every server, so all meet the machine's
//! slow spells alike. Over `LOAD_ROUNDS` (5) rounds it prints medians of the
//! server's CPU per request (its utime + stime over the requests wrk
//! counted), requests a second, and wrk's p50/p99, with flaghost's CPU as a
//! ratio to the floor's. Then the most any thread of each flaghost woke in
//! a second while idle, and the resident memory of a flaghost serving
//! 1,000 flags and the 4 plugins after a bulk load, its plugins compiled at
//! start-up and then precompiled.
//!
//! Scenarios: one flag, static / JsonLogic (`if`/`in`) / `fractional` /
//! plugin (the allow-list rule, default isolation); bulk of 50 mixed flags
//! (20 static, 25 JsonLogic, 5 plugin) and of 1,000 (20 times that mix),
//! and both without their plugin flags (45 and 900), so the plugin flags'
//! share is the difference.
//! flaghost loads the `startup` bench's 4 plugins (allow-list,
//! percentage-rollout, trap, picky-config). `LOAD_ONLY` (a substring of a
//! scenario's name) runs fewer; `LOAD_FLAGHOST_ARGS` adds options to both
//! flaghosts (`--plugin-isolation reuse` parts a plugin flag's own cost
//! from the rest). `LOAD_VARIANTS=name=path,name=path` runs those flaghost
//! binaries (paths from the repository root) side by side from memory
//! instead of flaghost with and without Redis: how the allocator was
//! chosen (README, Performance).
//!
//! `cargo bench -p flaghost-benches --bench load`

#![allow(missing_docs)]
#![allow(clippy::print_stdout)] // a load run reports on stdout

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flaghost_tests::{
    Dirs, RedisServer, build_plugins, busiest_idle_thread, fixture, plugin, root,
};
use serde_json::{Map, Value as Json, json};

/// What each request sends: a typical caller's context.
const BODY: &str = r#"{"context":{"targetingKey":"user-4242","country":"NL","plan":"pro","age":34,"appVersion":"5.2.1"}}"#;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One load: a name and the path it posts to.
struct Scenario {
    name: &'static str,
    path: &'static str,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "single static",
        path: "/ofrep/v1/evaluate/flags/static",
    },
    Scenario {
        name: "single JsonLogic",
        path: "/ofrep/v1/evaluate/flags/logic",
    },
    Scenario {
        name: "single fractional",
        path: "/ofrep/v1/evaluate/flags/fractional",
    },
    Scenario {
        name: "single plugin",
        path: "/ofrep/v1/evaluate/flags/plugin",
    },
    Scenario {
        name: "bulk 50 mixed",
        path: "/environments/bulk50/ofrep/v1/evaluate/flags",
    },
    Scenario {
        name: "bulk 1000 mixed",
        path: "/environments/bulk1000/ofrep/v1/evaluate/flags",
    },
    // The same two without their plugin flags: what the rest costs.
    Scenario {
        name: "bulk 45 no plugin",
        path: "/environments/bulk50-static-logic/ofrep/v1/evaluate/flags",
    },
    Scenario {
        name: "bulk 900 no plugin",
        path: "/environments/bulk1000-static-logic/ofrep/v1/evaluate/flags",
    },
];

/// The `i`th flag of the bulk mix: of each 50, 20 static, 25 JsonLogic
/// (`if`/`in`, `fractional`, `starts_with`, `sem_ver`, a nested `==` in
/// turn), 5 plugin.
fn mixed_flag(i: usize) -> Json {
    let boolean = |targeting: Json| {
        json!({"state": "ENABLED", "variants": {"on": true, "off": false},
               "defaultVariant": "off", "targeting": targeting})
    };
    match i % 50 {
        0..20 => json!({"state": "ENABLED", "variants": {"a": "A", "b": "B"},
                        "defaultVariant": "a", "metadata": {"team": "web", "ticket": i}}),
        n @ 20..45 => boolean(match n % 5 {
            0 => {
                json!({"if": [{"in": [{"var": "country"}, ["NL", "BE", format!("X{i}")]]}, "on", "off"]})
            }
            1 => {
                json!({"fractional": [{"cat": [{"var": "$flagd.flagKey"}, {"var": "targetingKey"}]},
                                       ["on", 50], ["off", 50]]})
            }
            2 => json!({"if": [{"starts_with": [{"var": "targetingKey"}, "user-4"]}, "on", "off"]}),
            3 => json!({"if": [{"sem_ver": [{"var": "appVersion"}, ">=", "5.0.0"]}, "on", "off"]}),
            _ => {
                json!({"if": [{"and": [{"==": [{"var": "plan"}, "pro"]}, {">": [{"var": "age"}, 18]}]}, "on", "off"]})
            }
        }),
        _ => boolean(json!({"plugin": ["allow-list",
            {"attribute": "country", "values": ["NL", "DE", format!("X{i}")], "variant": "on"}]})),
    }
}

/// A flag file of `count` flags of the bulk mix, without its plugin flags
/// unless `plugins`.
fn bulk_file(count: usize, plugins: bool) -> Json {
    let flags: Map<String, Json> = (0..count)
        .filter(|i| plugins || i % 50 < 45)
        .map(|i| (format!("flag-{i:04}"), mixed_flag(i)))
        .collect();
    json!({"metadata": {"owner": "load"}, "flags": flags})
}

/// The flag and plugin directories every flaghost serves.
fn dirs() -> Dirs {
    build_plugins();
    let single = json!({"flags": {
        "static": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "on"},
        "logic": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
                  "targeting": {"if": [{"in": [{"var": "country"}, ["NL", "BE", "LU"]]}, "on", "off"]}},
        "fractional": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
                       "targeting": {"fractional": [["on", 50], ["off", 50]]}},
        "plugin": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
                   "targeting": {"plugin": ["allow-list",
                       {"attribute": "country", "values": ["NL", "BE", "LU"], "variant": "on"}]}},
    }});
    let dirs = Dirs::new()
        .flag_file("production", &single)
        .flag_file("bulk50", &bulk_file(50, true))
        .flag_file("bulk1000", &bulk_file(1000, true))
        .flag_file("bulk50-static-logic", &bulk_file(50, false))
        .flag_file("bulk1000-static-logic", &bulk_file(1000, false));
    with_four_plugins(dirs)
}

/// `dirs` with the `startup` bench's 4 plugins.
fn with_four_plugins(dirs: Dirs) -> Dirs {
    dirs.plugin("allow-list", &plugin("allow-list"))
        .plugin("percentage-rollout", &plugin("percentage-rollout"))
        .plugin("trap", &fixture("trap"))
        .plugin("picky-config", &fixture("picky-config"))
}

/// `flaghost serve` of `binary` over `dirs` on `port`, with `extra_args`,
/// never on the machine's Redis.
fn serve(binary: &Path, dirs: &Dirs, port: u16, extra_args: &str) -> Command {
    let mut command = Command::new(binary);
    command
        .arg("serve")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--flags")
        .arg(dirs.flags())
        .arg("--plugins")
        .arg(dirs.plugins())
        .args(extra_args.split_whitespace())
        .env("RUST_LOG", "warn")
        .env_remove("REDIS_URL");
    command
}

/// `target/release/flaghost`, built first (the harness measures what the
/// README's first command runs).
fn release_flaghost() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    // NB: `cargo bench` runs this binary with its own package's CARGO_PKG_*
    // and CARGO_MANIFEST_* set; build scripts that watch those (ring's)
    // would see them changed and rebuild flaghost's TLS stack on every run.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_MANIFEST_")
            || name.starts_with("CARGO_CRATE_")
            || name.starts_with("CARGO_BIN_")
        {
            command.env_remove(name.as_ref());
        }
    }
    let status = command
        .args(["build", "--release", "-p", "flaghost", "--bin", "flaghost"])
        .current_dir(root())
        .status()
        .expect("cargo runs");
    assert!(status.success(), "cargo build --release -p flaghost failed");
    root().join("target/release/flaghost")
}

/// A server under load: its process, where it answers, and its name.
struct Server {
    name: String,
    base: String,
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn start(name: &str, command: &mut Command, port: u16) -> Self {
        Self::start_at(name, command, port, "/ofrep/v1/evaluate/flags/static")
    }

    /// Starts `command`, ready once `ready_path` answers 200.
    fn start_at(name: &str, command: &mut Command, port: u16, ready_path: &str) -> Self {
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        let server = Self {
            name: name.to_owned(),
            base: format!("http://127.0.0.1:{port}"),
            child,
        };
        server.wait_ready(ready_path);
        server
    }

    /// Waits until `path` answers 200.
    fn wait_ready(&self, path: &str) {
        let started = Instant::now();
        let url = format!("{}{path}", self.base);
        let client = reqwest::blocking::Client::new();
        loop {
            if client
                .post(&url)
                .body(BODY)
                .send()
                .is_ok_and(|r| r.status().is_success())
            {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "{} did not answer",
                self.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// The process's CPU time so far (user + system), in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proc stat");
    // NB: after the command name's closing parenthesis, utime and stime are
    // the 12th and 13th fields.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..]
        .split(' ')
        .collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

fn clock_ticks_per_second() -> u64 {
    let out = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .expect("getconf");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(100)
}

/// The process's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// One wrk run's figures.
#[derive(Debug, Clone, Copy)]
struct Run {
    cpu_us_per_request: f64,
    requests_per_second: f64,
    p50_us: f64,
    p99_us: f64,
}

/// A wrk latency (`812.00us`, `1.23ms`, `2.00s`) in µs.
fn micros(text: &str) -> f64 {
    let (number, scale) = if let Some(n) = text.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1e6)
    } else {
        (text, 1.0)
    };
    number.parse::<f64>().unwrap_or(f64::NAN) * scale
}

fn wrk(server: &Server, path: &str, script: &Path, secs: u64, connections: u64) -> Run {
    let ticks = clock_ticks_per_second() as f64;
    let cpu_before = cpu_ticks(server.pid());
    let output = Command::new("wrk")
        .args(["-t2", &format!("-c{connections}"), &format!("-d{secs}s")])
        .args(["--latency", "-s"])
        .arg(script)
        .arg(format!("{}{path}", server.base))
        .output()
        .expect("wrk runs (apt-get install wrk)");
    let cpu = (cpu_ticks(server.pid()) - cpu_before) as f64 / ticks;
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "wrk failed: {text}");
    assert!(
        !text.contains("Non-2xx") && !text.contains("Socket errors"),
        "{} answered errors on {path}:\n{text}",
        server.name
    );
    let mut run = Run {
        cpu_us_per_request: f64::NAN,
        requests_per_second: f64::NAN,
        p50_us: f64::NAN,
        p99_us: f64::NAN,
    };
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", v] => run.p50_us = micros(v),
            ["99%", v] => run.p99_us = micros(v),
            ["Requests/sec:", v] => run.requests_per_second = v.parse().unwrap_or(f64::NAN),
            [n, "requests", "in", ..] => {
                let requests: f64 = n.parse().unwrap_or(f64::NAN);
                run.cpu_us_per_request = cpu * 1e6 / requests;
            }
            _ => {}
        }
    }
    run
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// `--floor PORT [--bulk DIR]`: the bare OFREP server. A bulk request for
/// environment `e` is answered with the bytes of `DIR/e.json`: the answer
/// flaghost gives, so the floor's cost is what sending it costs.
async fn floor(port: u16, bulk: Option<PathBuf>) {
    use std::collections::HashMap;
    use std::sync::Arc;

    use axum::Router;
    use axum::body::Bytes;
    use axum::extract::{Path as UrlPath, State};
    use axum::http::{StatusCode, header};
    use axum::response::{IntoResponse, Response};
    use axum::routing::post;

    /// The least an OFREP server does: parse the request's context.
    fn parse(body: &[u8]) -> Option<Json> {
        let Ok(Json::Object(mut request)) = serde_json::from_slice::<Json>(body) else {
            return None;
        };
        request.remove("context")
    }

    fn answer(body: Vec<u8>) -> Response {
        ([(header::CONTENT_TYPE, "application/json")], body).into_response()
    }

    async fn evaluate(UrlPath(key): UrlPath<String>, body: Bytes) -> Response {
        if parse(&body).is_none() {
            return StatusCode::BAD_REQUEST.into_response();
        }
        let answer_json = json!({"key": key, "value": true, "reason": "STATIC",
                                 "variant": "on", "metadata": {}});
        answer(serde_json::to_vec(&answer_json).unwrap_or_default())
    }

    async fn evaluate_all(
        State(answers): State<Arc<HashMap<String, Bytes>>>,
        UrlPath(environment): UrlPath<String>,
        body: Bytes,
    ) -> Response {
        match (parse(&body), answers.get(&environment)) {
            (Some(_), Some(answer)) => {
                ([(header::CONTENT_TYPE, "application/json")], answer.clone()).into_response()
            }
            _ => StatusCode::BAD_REQUEST.into_response(),
        }
    }

    let mut answers = HashMap::new();
    for entry in bulk
        .iter()
        .flat_map(|dir| std::fs::read_dir(dir).expect("bulk dir"))
    {
        let path = entry.expect("entry").path();
        let environment = path
            .file_stem()
            .expect("stem")
            .to_string_lossy()
            .into_owned();
        answers.insert(
            environment,
            Bytes::from(std::fs::read(&path).expect("read")),
        );
    }
    let app = Router::new()
        .route("/ofrep/v1/evaluate/flags/{key}", post(evaluate))
        .route(
            "/environments/{environment}/ofrep/v1/evaluate/flags",
            post(evaluate_all),
        )
        .with_state(Arc::new(answers));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind");
    axum::serve(listener, app).await.expect("serve");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--floor") {
        let port = args[at + 1].parse().expect("a port");
        let bulk = args
            .iter()
            .position(|a| a == "--bulk")
            .map(|at| PathBuf::from(&args[at + 1]));
        tokio::runtime::Runtime::new()
            .expect("runtime")
            .block_on(floor(port, bulk));
        return;
    }
    // NB: `cargo bench` passes `--bench`; a filter is a scenario name part.
    let only = std::env::var("LOAD_ONLY").unwrap_or_default();
    let rounds = env_or("LOAD_ROUNDS", 5);
    let secs = env_or("LOAD_SECS", 3);
    let connections = env_or("LOAD_CONNECTIONS", 64);
    let extra_args = std::env::var("LOAD_FLAGHOST_ARGS").unwrap_or_default();

    // NB: `LOAD_VARIANTS` (`name=path,...`) compares flaghost binaries built
    // otherwise (another allocator, another profile) side by side, from
    // memory, instead of flaghost with and without Redis.
    let variants: Vec<(String, PathBuf)> = std::env::var("LOAD_VARIANTS")
        .unwrap_or_default()
        .split(',')
        .filter_map(|v| v.split_once('='))
        .map(|(name, path)| (name.to_owned(), root().join(path)))
        .collect();
    let binary = release_flaghost();
    let dirs = dirs();
    let redis = RedisServer::start();
    let specs: Vec<(String, PathBuf, Option<String>)> = if variants.is_empty() {
        vec![
            ("flaghost".into(), binary.clone(), None),
            ("flaghost+redis".into(), binary.clone(), Some(redis.url())),
        ]
    } else {
        variants.into_iter().map(|(n, p)| (n, p, None)).collect()
    };
    let flaghosts: Vec<Server> = specs
        .iter()
        .map(|(name, binary, redis_url)| {
            let port = RedisServer::reserve_port();
            let mut command = serve(binary, &dirs, port, &extra_args);
            if let Some(url) = redis_url {
                command.env("REDIS_URL", url);
            }
            Server::start(name, &mut command, port)
        })
        .collect();
    // Every environment loaded (and with Redis, written there) before the
    // first measured request; the first flaghost's bulk answers are what
    // the floor sends.
    let client = reqwest::blocking::Client::new();
    let bulk_answers = tempfile::tempdir().expect("bulk answers dir");
    for server in &flaghosts {
        for scenario in SCENARIOS {
            let answer = client
                .post(format!("{}{}", server.base, scenario.path))
                .body(BODY)
                .send()
                .and_then(|a| a.bytes())
                .expect("flaghost answers");
            if let Some(environment) = scenario
                .path
                .strip_prefix("/environments/")
                .and_then(|p| p.split('/').next())
            {
                let file = bulk_answers.path().join(format!("{environment}.json"));
                if !file.exists() {
                    std::fs::write(file, answer).expect("write answer");
                }
            }
        }
    }
    let floor_port = RedisServer::reserve_port();
    let floor = Server::start(
        "floor",
        Command::new(std::env::current_exe().expect("this binary"))
            .args(["--floor", &floor_port.to_string(), "--bulk"])
            .arg(bulk_answers.path()),
        floor_port,
    );

    let script = tempfile::NamedTempFile::new().expect("script");
    std::fs::write(
        script.path(),
        format!(
            "wrk.method = \"POST\"\nwrk.body = '{BODY}'\nwrk.headers[\"Content-Type\"] = \"application/json\"\n"
        ),
    )
    .expect("write script");

    let scenarios: Vec<&Scenario> = SCENARIOS
        .iter()
        .filter(|s| s.name.contains(only.as_str()))
        .collect();
    let mut runs: BTreeMap<(usize, &str), Vec<Run>> = BTreeMap::new();
    let everyone: Vec<&Server> = std::iter::once(&floor).chain(&flaghosts).collect();
    for round in 1..=rounds {
        eprintln!("round {round} of {rounds}");
        for (at, scenario) in scenarios.iter().enumerate() {
            for server in &everyone {
                let run = wrk(server, scenario.path, script.path(), secs, connections);
                runs.entry((at, server.name.as_str()))
                    .or_default()
                    .push(run);
            }
        }
    }

    println!(
        "\nmedians of {rounds} rounds of {secs} s, wrk -t2 -c{connections}; CPU = the server's user+system time per request"
    );
    println!(
        "{:<18} {:<15} {:>10} {:>9} {:>10} {:>10} {:>9}",
        "scenario", "server", "CPU µs/req", "vs floor", "req/s", "p50 µs", "p99 µs"
    );
    for (at, scenario) in scenarios.iter().enumerate() {
        let floor_cpu = runs
            .get(&(at, "floor"))
            .map(|r| median(r.iter().map(|r| r.cpu_us_per_request).collect()));
        for server in &everyone {
            let name = server.name.as_str();
            let Some(r) = runs.get(&(at, name)) else {
                continue;
            };
            let cpu = median(r.iter().map(|r| r.cpu_us_per_request).collect());
            let ratio = floor_cpu.map_or(String::from("—"), |f| format!("{:.2}×", cpu / f));
            println!(
                "{:<18} {:<15} {:>10.2} {:>9} {:>10.0} {:>10.0} {:>9.0}",
                scenario.name,
                name,
                cpu,
                ratio,
                median(r.iter().map(|r| r.requests_per_second).collect()),
                median(r.iter().map(|r| r.p50_us).collect()),
                median(r.iter().map(|r| r.p99_us).collect()),
            );
        }
    }
    println!();
    drop(everyone);
    for server in &flaghosts {
        std::thread::sleep(Duration::from_secs(1));
        let (thread, per_second) = busiest_idle_thread(server.pid(), Duration::from_secs(3));
        println!(
            "{:<15} idle after the load: its busiest thread ({thread}) woke {per_second:.1} times a second",
            server.name,
        );
    }
    let binaries: Vec<(String, PathBuf)> = specs
        .iter()
        .filter(|(_, _, redis_url)| redis_url.is_none())
        .map(|(name, binary, _)| (name.clone(), binary.clone()))
        .collect();
    drop((floor, flaghosts));

    // Resident memory as the goal sets it: 1,000 flags and the 4 plugins,
    // after a bulk load at c64, the plugins compiled at start-up (in a
    // child process) and then loaded precompiled from a cache directory.
    let memory_dirs =
        with_four_plugins(Dirs::new().flag_file("production", &bulk_file(1000, true)));
    for (name, binary) in &binaries {
        let cache = tempfile::tempdir().expect("cache dir");
        for how in ["compiled at start", "precompiled"] {
            let port = RedisServer::reserve_port();
            let mut command = serve(binary, &memory_dirs, port, &extra_args);
            command.arg("--plugin-cache-dir").arg(cache.path());
            let server = Server::start_at(name, &mut command, port, "/ofrep/v1/evaluate/flags");
            wrk(
                &server,
                "/ofrep/v1/evaluate/flags",
                script.path(),
                secs,
                connections,
            );
            println!(
                "{name}: 1,000 flags + 4 plugins {how}: RSS after a bulk load at c{connections} {:.1} MiB",
                rss_kib(server.pid()) as f64 / 1024.0
            );
        }
    }
}
