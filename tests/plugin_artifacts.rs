//! Compiled plugins cached on disk (`--plugin-cache-dir`): the first start
//! compiles and writes artifacts, the next loads them precompiled and answers
//! the same; an artifact that does not load, or fails authentication (a
//! byte changed, another component's artifact under its name), is discarded
//! and rewritten; a directory others may write is refused.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use flaghost::plugins::{Origin, PluginRuntime, PluginSet};
use flaghost::signing::SigningKey;
use flaghost_tests::{Dirs, Flaghost, answer_limits, compiler, examples_config, plugin};
use serde_json::json;

/// Loads `plugins` with artifacts in `cache`, signed with the key file
/// beside it (the default, as `flaghost serve` picks it).
fn load(cache: &Path, plugins: &Path) -> PluginSet {
    let key = SigningKey::load_or_create(&cache.with_extension("key")).expect("key");
    let runtime = PluginRuntime::new(answer_limits(), compiler())
        .expect("engine")
        .cache_compiled_in(cache, key)
        .expect("cache dir");
    let (set, errors) = runtime.load_dir(plugins).expect("plugin dir");
    assert!(errors.is_empty(), "{errors:?}");
    set
}

fn origins(set: &PluginSet) -> Vec<(String, Origin)> {
    let mut all: Vec<(String, Origin)> = set
        .iter()
        .map(|p| (p.name().to_owned(), p.origin()))
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

fn artifacts(cache: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(cache)
        .expect("cache dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

#[test]
fn the_next_start_loads_plugins_precompiled_and_bad_artifacts_are_recompiled() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let cache = tmp.path().join("cache");
    let cache = &cache;
    let dirs = Dirs::new()
        .plugin("allow-list", &plugin("allow-list"))
        .plugin("percentage-rollout", &plugin("percentage-rollout"));

    let first = load(cache, &dirs.plugins());
    assert_eq!(
        origins(&first),
        [
            ("allow-list".to_owned(), Origin::Compiled),
            ("percentage-rollout".to_owned(), Origin::Compiled)
        ]
    );
    let written = artifacts(cache);
    assert_eq!(written.len(), 2, "{written:?}");
    for p in first.iter() {
        assert!(
            written
                .iter()
                .any(|a| a.starts_with(p.digest()) && a.ends_with(".cwasm")),
            "{} has an artifact named by its digest: {written:?}",
            p.name()
        );
    }

    let second = load(cache, &dirs.plugins());
    assert!(
        origins(&second)
            .iter()
            .all(|(_, o)| *o == Origin::Precompiled),
        "{:?}",
        origins(&second)
    );
    let rollout = second.get("percentage-rollout").expect("loaded");
    rollout
        .check_config(
            "f",
            &["off".into(), "on".into()],
            r#"{"percentage": 50, "variant": "on", "otherwise": "off"}"#,
        )
        .expect("the precompiled plugin runs");

    for name in &written {
        std::fs::write(cache.join(name), b"not machine code").expect("corrupt");
    }
    let third = load(cache, &dirs.plugins());
    assert!(
        origins(&third).iter().all(|(_, o)| *o == Origin::Compiled),
        "corrupt artifacts are recompiled: {:?}",
        origins(&third)
    );
    for name in artifacts(cache) {
        let size = std::fs::metadata(cache.join(&name))
            .expect("artifact")
            .len();
        assert!(size > 1000, "{name} was rewritten ({size} bytes)");
    }
    assert_eq!(
        load(cache, &dirs.plugins())
            .iter()
            .filter(|p| p.origin() == Origin::Precompiled)
            .count(),
        2
    );
}

/// The origin of each plugin flaghost serves, from its admin listing.
async fn served_origins(fh: &Flaghost) -> Vec<String> {
    fh.plugin_listing(TOKEN).await["plugins"]
        .as_array()
        .expect("plugins")
        .iter()
        .map(|p| p["origin"].as_str().unwrap_or_default().to_owned())
        .collect()
}

const TOKEN: &str = "artifacts-admin-token-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaghost_answers_the_same_from_precompiled_plugins() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let cache = tmp.path().join("cache");
    let mut config = examples_config(answer_limits());
    config.plugin_cache_dir = Some(cache.clone());
    config.admin_token = Some(TOKEN.into());
    let mut answers = Vec::new();
    let mut origins = Vec::new();
    for _start in 0..2 {
        let fh = Flaghost::start(&config).await.expect("starts");
        origins.push(served_origins(&fh).await);
        let mut these = Vec::new();
        for user in ["user-1", "user-2", "user-3", "user-4"] {
            let (status, body) = fh
                .evaluate("new-checkout", json!({"targetingKey": user}))
                .await;
            assert_eq!(status, 200, "{body}");
            these.push(body["value"].clone());
            let (status, body) = fh
                .evaluate(
                    "eu-express-delivery",
                    json!({"targetingKey": user, "country": "NL"}),
                )
                .await;
            assert_eq!(status, 200, "{body}");
            these.push(body["value"].clone());
        }
        answers.push(these);
        fh.stop().await.expect("stops");
    }
    assert_eq!(answers[0], answers[1]);
    assert!(!artifacts(&cache).is_empty());
    // The key was created beside the directory, flaghost's alone, and the
    // restart started from the artifacts it authenticated.
    let key = tmp.path().join("cache.key");
    let mode = std::fs::metadata(&key)
        .expect("key file")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    assert!(origins[0].iter().all(|o| o == "compiled"), "{origins:?}");
    assert!(origins[1].iter().all(|o| o == "precompiled"), "{origins:?}");
}

#[test]
fn an_artifact_changed_by_one_byte_or_moved_to_another_name_is_refused_and_recompiled() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let cache = tmp.path().join("cache");
    let dirs = Dirs::new()
        .plugin("allow-list", &plugin("allow-list"))
        .plugin("percentage-rollout", &plugin("percentage-rollout"));
    let first = load(&cache, &dirs.plugins());
    let written = artifacts(&cache);
    let name_of = |plugin: &str| {
        let digest = first.get(plugin).expect("loaded").digest().to_owned();
        written
            .iter()
            .find(|a| a.starts_with(&digest))
            .expect("an artifact")
            .clone()
    };
    let (allow, rollout) = (name_of("allow-list"), name_of("percentage-rollout"));

    // One byte of allow-list's artifact flipped (in its code, past the tag
    // and header); percentage-rollout's replaced by allow-list's, whole and
    // validly tagged, but for another component.
    let path = cache.join(&allow);
    let original = std::fs::read(&path).expect("artifact");
    let mut changed = original.clone();
    let at = changed.len() / 2;
    changed[at] ^= 0x01;
    std::fs::write(&path, &changed).expect("tamper");
    std::fs::write(cache.join(&rollout), &original).expect("swap");

    let second = load(&cache, &dirs.plugins());
    assert_eq!(
        origins(&second),
        [
            ("allow-list".to_owned(), Origin::Compiled),
            ("percentage-rollout".to_owned(), Origin::Compiled)
        ],
        "neither is trusted"
    );
    // Both rewritten, and trusted again at the next start.
    assert_eq!(
        std::fs::read(cache.join(&allow)).expect("rewritten"),
        original
    );
    assert!(
        load(&cache, &dirs.plugins())
            .iter()
            .all(|p| p.origin() == Origin::Precompiled)
    );

    // Under another key, nothing is trusted.
    let other_key = SigningKey::load_or_create(&tmp.path().join("other.key")).expect("key");
    let runtime = PluginRuntime::new(answer_limits(), compiler())
        .expect("engine")
        .cache_compiled_in(&cache, other_key)
        .expect("cache dir");
    let (set, errors) = runtime.load_dir(&dirs.plugins()).expect("plugin dir");
    assert!(errors.is_empty(), "{errors:?}");
    assert!(set.iter().all(|p| p.origin() == Origin::Compiled));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_directory_others_may_write_or_a_key_others_may_read_is_refused_at_start_up() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let cache = tmp.path().join("cache");
    std::fs::create_dir(&cache).expect("cache dir");
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let mut config = examples_config(answer_limits());
    config.plugin_cache_dir = Some(cache.clone());
    let err = Flaghost::start(&config)
        .await
        .err()
        .expect("refused: anyone could plant machine code there");
    let message = format!("{err:#}");
    assert!(
        message.contains("--plugin-cache-dir") && message.contains("mode 0777"),
        "{message}"
    );

    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let key = tmp.path().join("cache.key");
    std::fs::write(&key, [0u8; 32]).expect("key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let err = Flaghost::start(&config)
        .await
        .err()
        .expect("refused: anyone could forge artifacts with it");
    let message = format!("{err:#}");
    assert!(
        message.contains("--plugin-cache-key") && message.contains("mode 0644"),
        "{message}"
    );
    // Made private, it is used.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let fh = Flaghost::start(&config).await.expect("starts");
    fh.stop().await.expect("stops");
}
