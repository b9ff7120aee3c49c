//! An idle flaghost costs nothing: with no traffic, no thread of it wakes
//! more than 10 times a second, after plugins have run (the epoch ticker,
//! plugin threads and the WASI runtime all started) and with Redis linked.
//!
//! Its own test binary, with one test: it watches a flaghost process it
//! starts, whose threads nothing else in the binary shares.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flaghost_tests::{RedisServer, build_plugins, flaghost_binary, root, thread_switches};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn an_idle_flaghost_wakes_no_thread_more_than_ten_times_a_second() {
    build_plugins();
    let redis = RedisServer::start();
    let port = RedisServer::reserve_port();
    let child = Command::new(flaghost_binary())
        .arg("serve")
        .arg("--flags")
        .arg(root().join("examples/flags"))
        .arg("--plugins")
        .arg(root().join("target/plugins"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("REDIS_URL", redis.url())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("flaghost starts");
    let flaghost = Killed(child);
    let base = format!("http://127.0.0.1:{port}");

    // Plugins run in both isolation paths' callers: a single plugin flag
    // and a bulk answer with every example flag.
    let client = reqwest::Client::new();
    let body = r#"{"context":{"targetingKey":"user-1","country":"NL","account":{"tier":"beta"}}}"#;
    let started = Instant::now();
    loop {
        let answer = client
            .post(format!("{base}/ofrep/v1/evaluate/flags/eu-pricing-banner"))
            .body(body)
            .send()
            .await;
        if answer.is_ok_and(|a| a.status().is_success()) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "flaghost never answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..20 {
        let bulk = client
            .post(format!("{base}/ofrep/v1/evaluate/flags"))
            .body(body)
            .send()
            .await
            .expect("bulk answers");
        assert_eq!(bulk.status(), 200);
    }
    // NB: the client's keep-alive connections closed, so nothing of them
    // is left to wake flaghost.
    drop(client);
    // NB: a plugin thread sweeps once, a second after its last job.
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let pid = flaghost.0.id();
    let over = Duration::from_secs(3);
    let before = thread_switches(pid);
    tokio::time::sleep(over).await;
    let after = thread_switches(pid);
    assert!(after.len() > 3, "flaghost's threads were read: {after:?}");
    let woke: Vec<(String, u64)> = after
        .iter()
        .map(|(thread, n)| {
            (
                thread.clone(),
                n.saturating_sub(before.get(thread).copied().unwrap_or(0)),
            )
        })
        .collect();
    let most = over.as_secs() * 10;
    assert!(
        woke.iter().all(|(_, n)| *n <= most),
        "threads that woke more than 10 times a second over {over:?}: {:?}",
        woke.iter().filter(|(_, n)| *n > most).collect::<Vec<_>>()
    );
    // The plugin threads and the epoch ticker do not wake at all: nothing
    // is warm to sweep under the default isolation, and no guest call holds
    // the ticker.
    let plugin_threads: Vec<&(String, u64)> = woke
        .iter()
        .filter(|(thread, _)| {
            thread.starts_with("flaghost-plugin") || thread.starts_with("flaghost-epoch")
        })
        .collect();
    assert!(
        !plugin_threads.is_empty(),
        "plugin threads were read: {woke:?}"
    );
    assert!(
        plugin_threads.iter().all(|(_, n)| *n == 0),
        "plugin threads woke while idle: {plugin_threads:?}"
    );
}
