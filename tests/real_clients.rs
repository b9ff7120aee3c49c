//! flaghost driven by the real OpenFeature clients: the Python SDK with its
//! OFREP provider and the JavaScript server SDK with its OFREP provider
//! (installed by tests/clients/install.sh into target/clients/). Each client
//! runs its checks (tests/clients/check.py, check.mjs) against the examples:
//! every value type, details, a missing flag, a disabled flag, a type
//! mismatch, targeting by attribute and by targeting key, and an environment
//! picked by base URL; and, from a second flaghost serving a copy of the
//! examples past its TTL with the flag file broken, reason STALE; and, from a
//! third flaghost that requires API keys, each key sent through the
//! clients' header options (401 and 403 reach the caller as its default).

use std::process::{Command, Output};

use std::time::Duration;

use flaghost_tests::{
    Dirs, Flaghost, answer_limits, eventually, examples_config, install_clients, root,
};

/// Runs `command` off the async workers (flaghost serves on them meanwhile)
/// and fails the test with the client's own output if any check failed.
async fn run_checks(client: &str, mut command: Command) {
    let output: Output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .unwrap_or_else(|e| panic!("cannot run the {client} client: {e}"));
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{said}");
    assert!(
        output.status.success(),
        "{client} client checks failed:\n{said}"
    );
    assert!(
        said.contains(": 0 failed"),
        "{client} client ran no checks:\n{said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_javascript_openfeature_clients_get_correct_answers() {
    install_clients();
    let fh = Flaghost::start(&examples_config(answer_limits()))
        .await
        .expect("flaghost starts");
    let clients = root().join("target/clients");

    // A copy of the examples, served until its TTL runs out with the file
    // broken: its answers are STALE.
    let copy = Dirs::new().with_example_flags();
    let mut stale_config = examples_config(answer_limits());
    stale_config.flags = copy.flags();
    stale_config.cache_ttl = Duration::from_secs(1);
    stale_config.check_interval = Duration::from_millis(200);
    let stale = Flaghost::start(&stale_config)
        .await
        .expect("flaghost starts");
    std::fs::write(copy.flags().join("production.json"), "{\"flags\": ").expect("break the file");
    let is_stale = eventually(Duration::from_secs(5), || async {
        stale
            .evaluate("items-per-page", serde_json::json!({}))
            .await
            .1["reason"]
            == "STALE"
    })
    .await;
    assert!(is_stale, "the copy is served STALE");

    // A third serves the examples behind API keys.
    let keys_dir = tempfile::tempdir().expect("tmp");
    let keys_file = keys_dir.path().join("api-keys.json");
    std::fs::write(
        &keys_file,
        serde_json::json!({ "production": [PROD_KEY], "staging": [STAGING_KEY] }).to_string(),
    )
    .expect("write keys");
    let mut keyed_config = examples_config(answer_limits());
    keyed_config.api_keys_file = Some(keys_file);
    let keyed = Flaghost::start(&keyed_config)
        .await
        .expect("flaghost starts");
    let keyed_env = [
        ("FLAGHOST_KEYED_BASE", keyed.base.clone()),
        ("FLAGHOST_PROD_KEY", PROD_KEY.to_owned()),
        ("FLAGHOST_STAGING_KEY", STAGING_KEY.to_owned()),
    ];

    let mut python = Command::new("python3");
    python
        .arg(root().join("tests/clients/check.py"))
        .arg(&fh.base)
        .arg(&stale.base)
        .env("PYTHONPATH", clients.join("python"))
        .envs(keyed_env.clone());
    run_checks("python", python).await;

    // Node resolves ES module imports from the script's own folder, so the
    // script runs from beside its node_modules.
    let script = clients.join("js/check.mjs");
    std::fs::copy(root().join("tests/clients/check.mjs"), &script).expect("copy check.mjs");
    let mut node = Command::new("node");
    node.arg(&script)
        .arg(&fh.base)
        .arg(&stale.base)
        .envs(keyed_env);
    run_checks("javascript", node).await;

    fh.stop().await.expect("clean stop");
    stale.stop().await.expect("clean stop");
    keyed.stop().await.expect("clean stop");
}

const PROD_KEY: &str = "production-client-key-4f1c9e";
const STAGING_KEY: &str = "staging-client-key-b83d20";
