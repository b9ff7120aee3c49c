//! Plugin management through the admin API: `PUT /admin/v1/plugins/{name}`
//! uploads a component (compiled and checked, with every flag file, before
//! it is written and put in force; size-limited) and `DELETE` removes one
//! (refused while flags use it). Over real HTTP, with real components.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use flaghost_tests::{Dirs, Flaghost, answer_limits, fixture, plugin, put_plugin};
use serde_json::{Value, json};

const TOKEN: &str = "plugin-admin-token-0123456789";

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(bytes))
}

fn read(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

async fn put(fh: &Flaghost, name: &str, bytes: Vec<u8>) -> (u16, Value) {
    put_plugin(&fh.client, &fh.base, TOKEN, name, bytes).await
}

async fn delete(fh: &Flaghost, name: &str) -> (u16, Value) {
    let response = fh
        .client
        .delete(format!("{}/admin/v1/plugins/{name}", fh.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("answers");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON"))
}

/// `PUT` of `total` zero bytes in 64 KiB chunks, with no Content-Length,
/// over a raw connection; the answer as text.
async fn put_chunked(fh: &Flaghost, name: &str, total: usize) -> String {
    let address = fh.base.trim_start_matches("http://").to_owned();
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&address).expect("connects");
        let head = format!(
            "PUT /admin/v1/plugins/{name} HTTP/1.1\r\nHost: {address}\r\n\
             Authorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\n\
             Connection: close\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).expect("head");
        let chunk = vec![0u8; 64 << 10];
        let mut sent = 0;
        while sent < total {
            let mut frame = format!("{:x}\r\n", chunk.len()).into_bytes();
            frame.extend_from_slice(&chunk);
            frame.extend_from_slice(b"\r\n");
            stream.write_all(&frame).expect("chunk");
            sent += chunk.len();
        }
        stream.write_all(b"0\r\n\r\n").expect("end");
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).expect("answer");
        String::from_utf8_lossy(&answer).into_owned()
    })
    .await
    .expect("the client ran")
}

/// The head of the first answer to a `PUT` of 1 MiB with `Expect:
/// 100-continue` and `token`, whose body is never sent.
async fn put_expecting_continue(fh: &Flaghost, name: &str, token: &str) -> String {
    let address = fh.base.trim_start_matches("http://").to_owned();
    let (name, token) = (name.to_owned(), token.to_owned());
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&address).expect("connects");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let head = format!(
            "PUT /admin/v1/plugins/{name} HTTP/1.1\r\nHost: {address}\r\n\
             Authorization: Bearer {token}\r\nContent-Length: {}\r\n\
             Expect: 100-continue\r\n\r\n",
            1 << 20
        );
        stream.write_all(head.as_bytes()).expect("head");
        let mut answer = Vec::new();
        let mut byte = [0u8; 1];
        while !answer.ends_with(b"\r\n\r\n") && stream.read(&mut byte).expect("answer") == 1 {
            answer.push(byte[0]);
        }
        String::from_utf8_lossy(&answer).into_owned()
    })
    .await
    .expect("the client ran")
}

/// When each loaded plugin was loaded.
async fn load_times(fh: &Flaghost) -> Vec<Value> {
    let listing = fh.plugin_listing(TOKEN).await;
    let plugins = listing["plugins"].as_array().expect("plugins");
    plugins.iter().map(|p| p["loadedAt"].clone()).collect()
}

fn gated_flags() -> Value {
    json!({"flags": {"gated": {
        "state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
        "targeting": {"plugin": ["gate", {"attribute": "country", "values": ["NL"], "variant": "on"}]}
    }}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_and_deletions_are_checked_before_they_take_effect() {
    let dirs = Dirs::new()
        .plugin("gate", &plugin("allow-list"))
        .flag_file("prod", &gated_flags());
    let mut config = dirs.config("prod", answer_limits());
    // The watcher runs too: it must agree with what the API did.
    config.watch_interval = Some(Duration::from_millis(100));
    config.admin_token = Some(TOKEN.into());
    config.limits.max_component_bytes = 1 << 20;
    // Uploads are bounded by the component limit, not the OFREP body limit
    // (smaller than any component here).
    config.http.body_limit = 16 << 10;
    let fh = Arc::new(Flaghost::start(&config).await.expect("starts"));
    let allow_list = read(&plugin("allow-list"));
    let gate_file = dirs.plugins().join("gate.wasm");
    let gated = || async { fh.evaluate("gated", json!({"country": "NL"})).await };

    // Evaluations run throughout: every answer is the old or the new
    // version's, never a failure of flaghost.
    let stop = Arc::new(AtomicBool::new(false));
    let background = {
        let (fh, stop) = (fh.clone(), stop.clone());
        tokio::spawn(async move {
            let mut answers = 0;
            while !stop.load(Ordering::Relaxed) {
                let (status, body) = fh.evaluate("gated", json!({"country": "NL"})).await;
                let details = body["errorDetails"].as_str().unwrap_or_default();
                assert!(
                    (status == 200 && body["value"] == true)
                        || details.contains("trapped")
                        || details.contains("Boom"),
                    "unexpected answer during changes: {status} {body}"
                );
                answers += 1;
            }
            answers
        })
    };

    // Not an admin: nothing happens.
    let anonymous = fh
        .client
        .put(format!("{}/admin/v1/plugins/gate", fh.base))
        .body(read(&fixture("trap")))
        .send()
        .await
        .expect("answers");
    assert_eq!(anonymous.status(), 401);

    // A caller that waits for "100 Continue" before sending is answered at
    // once: it is never asked for the body it may not send.
    let answer = put_expecting_continue(&fh, "gate", "wrong-token").await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");

    // Not a component: 422 saying why; the loaded version keeps serving.
    let (status, body) = put(&fh, "gate", b"\0asm garbage".to_vec()).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["errorDetails"]
            .as_str()
            .unwrap()
            .contains("not a valid component"),
        "{body}"
    );
    let (status, body) = put(&fh, "gate", Vec::new()).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["errorDetails"].as_str().unwrap().contains("empty"),
        "{body}"
    );

    // Over the size limit: 413 naming the limit and the option.
    let (status, body) = put(&fh, "gate", vec![0u8; 2 << 20]).await;
    assert_eq!(status, 413, "{body}");
    assert!(
        body["errorDetails"]
            .as_str()
            .unwrap()
            .contains("--plugin-max-file-mib"),
        "{body}"
    );

    // The same without a declared length (chunked): read until the limit,
    // the rest dropped, the same 413, and the connection still answers.
    let answer = put_chunked(&fh, "gate", 2 << 20).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("--plugin-max-file-mib"), "{answer}");

    // A component whose configuration check refuses the flag's: 409
    // naming the flag file and the flag.
    let (status, body) = put(&fh, "gate", read(&fixture("picky-config"))).await;
    assert_eq!(status, 409, "{body}");
    let details = body["errorDetails"].as_str().unwrap();
    assert!(
        details.contains("prod.json") && details.contains("gated"),
        "{body}"
    );
    assert_eq!(
        read(&gate_file),
        allow_list,
        "the file on disk is untouched"
    );
    assert_eq!(
        fh.loaded_plugins(TOKEN).await,
        [("gate".into(), sha256(&allow_list))]
    );
    assert_eq!(gated().await.1["value"], true);

    // A bad name never reaches the file system.
    for name in ["..%2Fevil", ".hidden", "a%20b"] {
        let (status, body) = put(&fh, name, read(&fixture("trap"))).await;
        assert_eq!(status, 400, "{name}: {body}");
    }
    let files = |dir: &std::path::Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(files(&dirs.plugins()), ["gate.wasm"]);
    assert!(!dirs.plugins().parent().unwrap().join("evil.wasm").exists());

    // A good new version: in force when the answer comes, and on disk.
    let trap = read(&fixture("trap"));
    let (status, body) = put(&fh, "gate", trap.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["change"], "replaced");
    assert_eq!(body["plugin"]["digest"], sha256(&trap));
    assert!(
        gated().await.1["errorDetails"]
            .as_str()
            .unwrap_or_default()
            .contains("trapped")
    );
    assert_eq!(read(&gate_file), trap);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&gate_file).expect("stat").permissions(),
    );
    assert_eq!(mode & 0o777, 0o644, "readable by other instances");
    let (status, body) = put(&fh, "gate", trap.clone()).await;
    assert_eq!((status, &body["change"]), (200, &json!("unchanged")));

    // A flag file already refused (it uses a plugin not loaded; its error
    // lists the plugins loaded, which an upload changes) does not get a good
    // upload refused.
    std::fs::write(
        dirs.flags().join("staging.json"),
        json!({"flags": {"later": {
            "state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
            "targeting": {"plugin": ["not-yet-uploaded", {}]}
        }}})
        .to_string(),
    )
    .expect("write");

    // Back, and a new plugin beside it.
    let (status, body) = put(&fh, "gate", allow_list.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(gated().await.1["value"], true);
    let rollout = read(&plugin("percentage-rollout"));
    let (status, body) = put(&fh, "rollout", rollout.clone()).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["change"], "added");
    assert_eq!(body["plugin"]["contractVersion"], "0.1.0");
    assert!(dirs.plugins().join("rollout.wasm").exists());

    // The watcher sees the files the API wrote and changes nothing: not
    // even a reload of the same bytes.
    let before = load_times(&fh).await;
    assert_eq!(
        fh.loaded_plugins(TOKEN).await,
        [
            ("gate".into(), sha256(&allow_list)),
            ("rollout".into(), sha256(&rollout))
        ]
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(load_times(&fh).await, before);

    // Deleting a plugin flags use: 409 naming them; nothing changes.
    let (status, body) = delete(&fh, "gate").await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["errorDetails"].as_str().unwrap().contains("gated"),
        "{body}"
    );
    assert!(gate_file.exists());
    assert_eq!(gated().await.1["value"], true);

    // Deleting one nothing uses: unloaded, file gone; again: 404.
    let (status, body) = delete(&fh, "rollout").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["plugin"]["digest"], sha256(&rollout));
    assert!(!dirs.plugins().join("rollout.wasm").exists());
    assert_eq!(
        fh.loaded_plugins(TOKEN).await,
        [("gate".into(), sha256(&allow_list))]
    );
    let (status, body) = delete(&fh, "rollout").await;
    assert_eq!(status, 404, "{body}");

    stop.store(true, Ordering::Relaxed);
    let answers = background.await.expect("every answer was right");
    assert!(answers > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_plugin_directory_uploads_say_how_to_enable_them() {
    let dirs = Dirs::new().flag_file(
        "prod",
        &json!({"flags": {"plain": {"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on"}}}),
    );
    let mut config = dirs.config("prod", answer_limits());
    config.plugins = None;
    config.admin_token = Some(TOKEN.into());
    let fh = Flaghost::start(&config).await.expect("starts");
    let (status, body) = put(&fh, "gate", read(&plugin("allow-list"))).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["errorDetails"].as_str().unwrap().contains("--plugins"),
        "{body}"
    );
    let (status, _) = delete(&fh, "gate").await;
    assert_eq!(status, 409);
}
