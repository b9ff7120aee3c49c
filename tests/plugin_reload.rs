//! Hot reload of the plugin directory: a replaced component takes effect
//! without a restart; one that fails to load, or that the flag files'
//! configurations fail, is refused and the previous version keeps serving;
//! a new one is picked up; a removed one that flags use stays loaded, one
//! that nothing uses goes, and a kept one goes once no flag uses it.

use std::time::Duration;

use flaghost_tests::{Dirs, Flaghost, answer_limits, eventually, fixture, plugin};
use serde_json::{Value, json};

const TOKEN: &str = "reload-admin-token-0123456789";

async fn listing(fh: &Flaghost) -> Vec<(String, String)> {
    fh.loaded_plugins(TOKEN).await
}

/// Waits (compiling is slow in a debug build) until the watcher reports
/// `digest` refused.
async fn refused(fh: &Flaghost, digest: &str) -> bool {
    eventually(Duration::from_secs(30), || async {
        admin(fh).await["reload"]["refused"]
            .as_array()
            .is_some_and(|r| r.iter().any(|f| f["digest"] == digest))
    })
    .await
}

async fn admin(fh: &Flaghost) -> Value {
    fh.plugin_listing(TOKEN).await
}

fn sha256(path: &std::path::Path) -> String {
    use sha2::Digest;
    format!(
        "{:x}",
        sha2::Sha256::digest(std::fs::read(path).expect("read"))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_changes_take_effect_without_a_restart_and_bad_ones_are_refused() {
    let dirs = Dirs::new().plugin("gate", &plugin("allow-list")).flag_file(
        "prod",
        &json!({"flags": {"gated": {
            "state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
            "targeting": {"plugin": ["gate", {"attribute": "country", "values": ["NL"], "variant": "on"}]}
        }}}),
    );
    let mut config = dirs.config("prod", answer_limits());
    config.watch_interval = Some(Duration::from_millis(200));
    config.admin_token = Some(TOKEN.into());
    let fh = Flaghost::start(&config).await.expect("starts");
    let gated = || async { fh.evaluate("gated", json!({"country": "NL"})).await };
    let allow_list = sha256(&plugin("allow-list"));
    assert_eq!(listing(&fh).await, [("gate".into(), allow_list.clone())]);
    assert_eq!(gated().await.1["value"], true);
    let gate = dirs.plugins().join("gate.wasm");

    // Bytes that are no component: refused, the loaded version keeps serving.
    std::fs::write(&gate, b"\0asm garbage").expect("write");
    assert!(refused(&fh, &sha256(&gate)).await, "reported refused");
    assert_eq!(gated().await.1["value"], true);
    assert_eq!(listing(&fh).await, [("gate".into(), allow_list.clone())]);

    // A component whose configuration check refuses the flag's: refused.
    std::fs::copy(fixture("picky-config"), &gate).expect("copy");
    assert!(refused(&fh, &sha256(&gate)).await, "reported refused");
    assert_eq!(gated().await.1["value"], true);
    assert_eq!(listing(&fh).await, [("gate".into(), allow_list.clone())]);

    // A component that accepts it: swapped in (this one traps when run).
    std::fs::copy(fixture("trap"), &gate).expect("copy");
    let swapped = eventually(Duration::from_secs(30), || async {
        let (_, body) = gated().await;
        body["errorDetails"]
            .as_str()
            .unwrap_or_default()
            .contains("trapped")
    })
    .await;
    assert!(swapped, "the new version serves");
    assert_eq!(
        listing(&fh).await,
        [("gate".into(), sha256(&fixture("trap")))]
    );

    // Back to the allow-list, and a new plugin beside it.
    std::fs::copy(plugin("allow-list"), &gate).expect("copy");
    std::fs::copy(
        plugin("percentage-rollout"),
        dirs.plugins().join("extra.wasm"),
    )
    .expect("copy");
    let back = eventually(Duration::from_secs(30), || async {
        gated().await.1["value"] == true && listing(&fh).await.len() == 2
    })
    .await;
    assert!(
        back,
        "replaced again, and the new plugin is loaded: {:?} {}",
        listing(&fh).await,
        gated().await.1
    );

    // Once a file has stood a while, a look goes by its stamp and does not
    // read it again; a rewrite in place, of the same length, with its
    // modification time put back, is still seen (its change time moved).
    // NB: over 2 s by the clock's seconds, and then a look or two.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let mtime = std::fs::metadata(&gate)
        .and_then(|m| m.modified())
        .expect("mtime");
    let mut same_length = std::fs::read(&gate).expect("read");
    same_length[..8].copy_from_slice(b"\0asm bad");
    std::fs::write(&gate, &same_length).expect("write");
    std::fs::File::options()
        .write(true)
        .open(&gate)
        .and_then(|f| f.set_modified(mtime))
        .expect("set mtime");
    assert!(refused(&fh, &sha256(&gate)).await, "the rewrite is seen");
    std::fs::copy(plugin("allow-list"), &gate).expect("copy");

    // Removing a plugin nothing uses drops it; one the flags use stays.
    std::fs::remove_file(dirs.plugins().join("extra.wasm")).expect("remove");
    std::fs::remove_file(&gate).expect("remove");
    let settled = eventually(Duration::from_secs(30), || async {
        listing(&fh).await == [("gate".to_owned(), allow_list.clone())]
            && admin(&fh).await["reload"]["keptAfterRemoval"] == json!(["gate"])
    })
    .await;
    assert!(
        settled,
        "extra dropped, gate kept: {:?}",
        listing(&fh).await
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        gated().await.1["value"],
        true,
        "the loaded copy keeps serving"
    );

    // Once no flag uses it any more, the kept copy is unloaded.
    std::fs::write(
        dirs.flags().join("prod.json"),
        json!({"flags": {"gated": {
            "state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off"
        }}})
        .to_string(),
    )
    .expect("write");
    let unloaded = eventually(Duration::from_secs(30), || async {
        listing(&fh).await.is_empty() && admin(&fh).await["reload"]["keptAfterRemoval"] == json!([])
    })
    .await;
    assert!(unloaded, "gate unloaded: {}", admin(&fh).await);
    assert_eq!(gated().await.1["value"], false);
    fh.stop().await.expect("stops");
}
