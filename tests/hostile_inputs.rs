//! Hostile inputs: flag files written to hurt flaghost (nesting that
//! overflowed a thread's stack once `$ref`s were followed, `$ref`s that
//! expand by 2^n) are refused with file, flag and reason, while the last
//! good set and the process keep serving (flag files and Redis entries go
//! through the same parser); connections that never finish their request
//! are closed, and others get through.

use std::time::Duration;

use flaghost_tests::{Dirs, Flaghost, answer_limits, deep_ref_evaluators, eventually};
use serde_json::{Map, Value, json};

fn static_flag() -> Value {
    json!({"state": "ENABLED", "variants": {"a": "A", "b": "B"}, "defaultVariant": "a"})
}

/// flaghost serving one static flag (`ok`, in `prod`) as `edit` configures
/// it: its flag directory (keep it while flaghost runs), flaghost, and the
/// address to connect to.
async fn serve_ok(
    edit: impl FnOnce(&mut flaghost::config::ServeConfig),
) -> (Dirs, Flaghost, String) {
    let dirs = Dirs::new().flag_file("prod", &json!({"flags": {"ok": static_flag()}}));
    let mut config = dirs.config("prod", answer_limits());
    edit(&mut config);
    let fh = Flaghost::start(&config).await.expect("starts");
    let address = fh.base.trim_start_matches("http://").to_owned();
    (dirs, fh, address)
}

fn rule_flag(rule: Value) -> Value {
    json!({"state": "ENABLED", "variants": {"on": true, "off": false},
           "defaultVariant": "off", "targeting": rule})
}

/// A static flag serving `variant`.
fn static_serving(variant: &str) -> Value {
    json!({"state": "ENABLED", "variants": {"a": "A", "b": "B"}, "defaultVariant": variant})
}

/// The file that killed a running flaghost when hot-reloaded (33 chained
/// evaluators of 62 `!!` levels: about 4,000 levels once resolved), and an
/// expansion bomb (evaluators that each use the next twice, 26 deep). Each
/// also changes flag `ok` to serve "B", to show whether it was taken.
fn hostile_files(dirs: Dirs) -> Dirs {
    let deep = deep_ref_evaluators();
    let mut bomb = Map::new();
    for i in 0..26 {
        let next = json!({"$ref": format!("b{}", i + 1)});
        bomb.insert(format!("b{i}"), json!({"or": [next, next]}));
    }
    bomb.insert("b26".into(), json!({"==": [{"var": "country"}, "NL"]}));
    dirs.flag_file(
        "prod",
        &json!({"$evaluators": deep, "flags": {
            "ok": static_serving("b"), "hostile": rule_flag(json!({"$ref": "e0"}))}}),
    )
    .flag_file(
        "bombed",
        &json!({"$evaluators": bomb, "flags": {
            "ok": static_serving("b"), "hostile": rule_flag(json!({"$ref": "b0"}))}}),
    )
}

/// Flag `ok`'s value in `env`.
async fn ok_in(fh: &Flaghost, env: &str) -> Value {
    let (status, body) = fh.evaluate_in(Some(env), "ok", json!({})).await;
    assert_eq!(status, 200, "{body}");
    body["value"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_or_exploding_rules_hot_reloaded_are_refused_and_the_last_good_set_serves() {
    let good = json!({"flags": {"ok": static_serving("a")}});
    let dirs = Dirs::new()
        .flag_file("prod", &good)
        .flag_file("bombed", &good);
    let fh = Flaghost::start(&dirs.config("prod", answer_limits()))
        .await
        .expect("starts");
    let started = std::time::Instant::now();
    let dirs = hostile_files(dirs);
    // Several reload checks (1 s apart) go by: each refuses the files, the
    // process lives, and the last good sets serve.
    while started.elapsed() < Duration::from_secs(4) {
        for env in ["prod", "bombed"] {
            assert_eq!(
                ok_in(&fh, env).await,
                json!("A"),
                "{env}: the last good set"
            );
            let (status, body) = fh.evaluate_in(Some(env), "hostile", json!({})).await;
            assert_eq!(
                (status, &body["errorCode"]),
                (404, &json!("FLAG_NOT_FOUND")),
                "{body}"
            );
        }
        assert_eq!(fh.get("/healthz").await.0, 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A good file after them is taken: reloading goes on.
    let dirs = dirs
        .flag_file("prod", &json!({"flags": {"ok": static_serving("b")}}))
        .flag_file("bombed", &json!({"flags": {"ok": static_serving("b")}}));
    for env in ["prod", "bombed"] {
        assert!(
            eventually(Duration::from_secs(30), || async {
                ok_in(&fh, env).await == json!("B")
            })
            .await,
            "{env}: a good file is reloaded after the refused one"
        );
    }
    drop(dirs);
    fh.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_or_exploding_rules_at_start_up_are_refused_naming_file_flag_and_reason() {
    for (env, says) in [("prod", "128 levels"), ("bombed", "16 MiB")] {
        let dirs = hostile_files(Dirs::new());
        let started = std::time::Instant::now();
        let err = Flaghost::start(&dirs.config(env, answer_limits()))
            .await
            .err()
            .expect("refused");
        let message = format!("{err:#}");
        assert!(
            message.contains(&format!("{env}.json"))
                && message.contains("hostile")
                && message.contains(says),
            "names the file, the flag and the reason: {message}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{:?}",
            started.elapsed()
        );
    }
}

/// A connection to `address` whose reads give up after 5 s. Blocking.
fn keep_alive_connection(address: &str) -> std::net::TcpStream {
    let stream = std::net::TcpStream::connect(address).expect("connects");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream
}

/// Asks `/healthz` on `stream`, keeping it open: whether a 200 came back.
fn healthz_on(stream: &mut std::net::TcpStream) -> bool {
    use std::io::{Read as _, Write as _};
    let mut buf = [0u8; 4096];
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        .is_ok()
        && stream
            .read(&mut buf)
            .is_ok_and(|n| buf[..n].starts_with(b"HTTP/1.1 200"))
}

/// Reads from `stream` until the server closes it (or `within` passes):
/// whether it did. Blocking: run off the async workers.
fn closed_by_server(stream: &mut std::net::TcpStream, within: Duration) -> bool {
    use std::io::Read as _;
    let deadline = std::time::Instant::now() + within;
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return false;
        }
        match stream.read(&mut buf) {
            Ok(0) => return true,
            // An answer (a 408 or 400) before the close.
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_finish_their_request_are_closed_and_others_get_through() {
    use std::io::Write as _;
    let (_dirs, fh, address) = serve_ok(|config| {
        config.http.connections.header_timeout = Duration::from_millis(500);
        config.http.connections.max_connections = 64;
        config.http.body_timeout = Duration::from_millis(500);
    })
    .await;

    // Slowloris: 200 connections that send half their headers and wait;
    // and 10 that send headers and half a body.
    let mut held = Vec::new();
    for i in 0..210 {
        let mut stream = std::net::TcpStream::connect(&address).expect("connects");
        let part: &[u8] = if i < 200 {
            b"POST /ofrep/v1/evaluate/flags/ok HTTP/1.1\r\nHost: x\r\n"
        } else {
            b"POST /ofrep/v1/evaluate/flags/ok HTTP/1.1\r\nHost: x\r\n\
              Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"context\""
        };
        let _ = stream.write_all(part);
        held.push(stream);
    }

    // A well-behaved client gets through once the timeouts free the slots.
    assert!(
        eventually(Duration::from_secs(10), || async {
            // NB: a connection of its own each time; one refused at the
            // bound is an error here, not a panic.
            let answer = reqwest::Client::new()
                .post(format!("{}/ofrep/v1/evaluate/flags/ok", fh.base))
                .json(&json!({"context": {}}))
                .send()
                .await;
            match answer {
                Ok(response) if response.status() == 200 => response
                    .json::<Value>()
                    .await
                    .is_ok_and(|body| body["value"] == "A"),
                _ => false,
            }
        })
        .await,
        "a normal request is answered while the slow clients hold on"
    );
    // Every slow connection was closed by flaghost, not left open.
    let all_closed = tokio::task::spawn_blocking(move || {
        held.iter_mut()
            .all(|stream| closed_by_server(stream, Duration::from_secs(5)))
    })
    .await
    .expect("checked");
    assert!(
        all_closed,
        "every connection that never finished its request is closed"
    );
    fh.stop().await.expect("clean stop");
}

/// A body sent a byte at a time, each byte well within the body timeout of
/// the one before, is still cut off when the timeout has passed: the
/// deadline is the whole body's (a timer started again at every byte
/// never fired, and held the request for as long as the client liked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_trickled_a_byte_at_a_time_is_cut_off_at_the_body_timeout() {
    use std::io::{Read as _, Write as _};
    let (_dirs, fh, address) = serve_ok(|config| {
        config.http.body_timeout = Duration::from_millis(500);
    })
    .await;

    let (answer, took) = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(&address).expect("connects");
        stream
            .set_read_timeout(Some(Duration::from_millis(1)))
            .expect("read timeout");
        let started = std::time::Instant::now();
        let _ = stream.write_all(
            b"POST /ofrep/v1/evaluate/flags/ok HTTP/1.1\r\nHost: x\r\n\
              Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n",
        );
        // A byte every 100 ms: the 1,000 would take 100 s.
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while started.elapsed() < Duration::from_secs(30) {
            if stream.write_all(b" ").is_err() {
                break;
            }
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    answer.extend_from_slice(&buf[..n]);
                    if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                        // The rest of a short answer comes with its head.
                        std::thread::sleep(Duration::from_millis(50));
                        if let Ok(n) = stream.read(&mut buf) {
                            answer.extend_from_slice(&buf[..n]);
                        }
                        break;
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        (
            String::from_utf8_lossy(&answer).into_owned(),
            started.elapsed(),
        )
    })
    .await
    .expect("trickled");
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "a trickled body is answered 408: {answer:?} after {took:?}"
    );
    assert!(
        answer.contains("did not arrive in time") && answer.contains("--body-timeout-ms"),
        "the answer says what happened and what to change: {answer}"
    );
    // NB: generous for a loaded machine; the trickle itself takes 100 s.
    assert!(
        took < Duration::from_secs(15),
        "cut off at the body timeout, not when the body ends: {took:?}"
    );
    fh.stop().await.expect("clean stop");
}

/// The admin API checks the token before it reads a body: a caller without
/// one is refused at once, not after flaghost has waited for (and held)
/// what it sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_call_without_the_token_is_refused_before_its_body_is_read() {
    use std::io::{Read as _, Write as _};
    let (_dirs, fh, address) = serve_ok(|config| {
        config.admin_token = Some("the-admin-token".into());
    })
    .await;
    let answer = tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(&address).expect("connects");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        // Headers promising a body that never comes.
        stream
            .write_all(
                b"POST /admin/v1/cache/invalidate HTTP/1.1\r\nHost: x\r\n\
                  Content-Type: application/json\r\nContent-Length: 4000\r\n\r\n",
            )
            .expect("sends");
        let mut buf = [0u8; 4096];
        let n = stream.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(&buf[..n]).into_owned()
    })
    .await
    .expect("asked");
    assert!(
        answer.starts_with("HTTP/1.1 401"),
        "refused without waiting for the body: {answer:?}"
    );
    fh.stop().await.expect("clean stop");
}

/// An idle keep-alive connection is closed a header timeout after its last
/// request, however busy it was before. Its requests share one timer (see
/// `header_timer`): one sent after an earlier request's deadline has passed
/// is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_a_header_timeout_after_its_last_request() {
    let (_dirs, fh, address) = serve_ok(|config| {
        config.http.connections.header_timeout = Duration::from_millis(400);
    })
    .await;

    let (answered, closed_after) = tokio::task::spawn_blocking(move || {
        let mut stream = keep_alive_connection(&address);
        let started = std::time::Instant::now();
        let mut answered = 0;
        let mut last_answer = started;
        // A request every 100 ms for 1.2 s: three timeouts' worth.
        while started.elapsed() < Duration::from_millis(1_200) && healthz_on(&mut stream) {
            answered += 1;
            last_answer = std::time::Instant::now();
            std::thread::sleep(Duration::from_millis(100));
        }
        let closed = closed_by_server(&mut stream, Duration::from_secs(5));
        (answered, closed.then(|| last_answer.elapsed()))
    })
    .await
    .expect("ran");
    assert!(
        answered >= 8,
        "every request was answered while the connection was busy: {answered}"
    );
    let closed_after = closed_after.expect("closed once idle");
    assert!(
        closed_after >= Duration::from_millis(250) && closed_after < Duration::from_secs(3),
        "closed about a header timeout (400 ms) after its last answer: {closed_after:?}"
    );
    fh.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_holding_its_share_of_connections_leaves_room_for_others() {
    use std::io::Write as _;
    let (_dirs, fh, address) = serve_ok(|config| {
        // NB: the slow connections outlive the test's checks.
        config.http.connections.header_timeout = Duration::from_secs(30);
        config.http.connections.max_connections = 64;
        config.http.connections.max_per_client = 16;
    })
    .await;

    // Client 127.0.0.1 opens every slot there is, sending half its headers.
    let mut held = Vec::new();
    for _ in 0..64 {
        let mut stream = std::net::TcpStream::connect(&address).expect("connects");
        let _ = stream.write_all(b"POST /ofrep/v1/evaluate/flags/ok HTTP/1.1\r\nHost: x\r\n");
        held.push(stream);
    }
    // Past its 16, flaghost closed them at once.
    let (kept, closed) = tokio::task::spawn_blocking(move || {
        let closed = held
            .iter_mut()
            .map(|stream| closed_by_server(stream, Duration::from_millis(300)))
            .filter(|closed| *closed)
            .count();
        (held, closed)
    })
    .await
    .expect("checked");
    assert_eq!(closed, 64 - 16, "one client keeps 16 connections");

    // Another client (127.0.0.2 is loopback too) gets through meanwhile.
    let other = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from([127, 0, 0, 2]))
        .build()
        .expect("client");
    let response = other
        .post(format!("{}/ofrep/v1/evaluate/flags/ok", fh.base))
        .json(&json!({"context": {}}))
        .send()
        .await
        .expect("another client is answered");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["value"], "A");
    drop(kept);
    fh.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1mb_context_against_1000_rules_is_answered_whole_and_right_while_others_are_served() {
    // 1,000 flags: a third static, a third reading `country`, a third
    // reading the whole data (`{"var": ""}`), the rules that made one
    // conversion per flag cost most.
    let mut flags = Map::new();
    for i in 0..1000 {
        let flag = match i % 3 {
            0 => static_flag(),
            1 => rule_flag(
                json!({"if": [{"in": [{"var": "country"}, ["NL", format!("X{i}")]]}, "on", "off"]}),
            ),
            _ => rule_flag(json!({"if": [
                {"and": [{"var": ""}, {"==": [{"var": "$flagd.flagKey"}, format!("f{i}")]}]},
                "on", "off"]})),
        };
        flags.insert(format!("f{i}"), flag);
    }
    let dirs = Dirs::new().flag_file("prod", &json!({ "flags": flags }));
    let mut config = dirs.config("prod", answer_limits());
    config.http.body_limit = 2 << 20;
    let fh = Flaghost::start(&config).await.expect("starts");

    let mut context = Map::new();
    context.insert("targetingKey".into(), json!("user-1"));
    context.insert("country".into(), json!("NL"));
    for i in 0..62_000 {
        context.insert(format!("attribute-{i:05}"), json!(i));
    }
    let body = json!({ "context": context }).to_string();
    assert!(body.len() > 1_000_000, "{} bytes", body.len());

    let bulk = || {
        let (client, url, body) = (
            fh.client.clone(),
            format!("{}/ofrep/v1/evaluate/flags", fh.base),
            body.clone(),
        );
        async move {
            let response = client
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("answered");
            assert_eq!(response.status(), 200);
            response.json::<Value>().await.expect("json")
        }
    };
    // Two such clients at once, and a static flag served meanwhile.
    let (a, b, small) = tokio::join!(
        bulk(),
        bulk(),
        fh.evaluate_in(Some("prod"), "f0", json!({}))
    );
    assert_eq!(small.0, 200, "{}", small.1);
    for answer in [a, b] {
        let flags = answer["flags"].as_array().expect("flags");
        assert_eq!(flags.len(), 1000);
        for item in flags {
            let key = item["key"].as_str().expect("key");
            let i: usize = key[1..].parse().expect("f<n>");
            let expected = match i % 3 {
                0 => json!("A"),
                // Both rule kinds match: country NL, and each rule sees its
                // own flag key in $flagd.
                _ => json!(true),
            };
            assert_eq!(item["value"], expected, "{item}");
        }
    }
    fh.stop().await.expect("clean stop");
}
