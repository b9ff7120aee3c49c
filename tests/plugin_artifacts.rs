//! Compiled plugins cached on disk (`--plugin-cache-dir`): the first start
//! compiles and writes artifacts, the next loads them precompiled and answers
//! the same; an artifact that does not load is discarded and rewritten.

use std::path::Path;

use flaghost::plugins::{Origin, PluginRuntime, PluginSet};
use flaghost_tests::{Dirs, Flaghost, answer_limits, compiler, examples_config, plugin};
use serde_json::json;

fn load(cache: &Path, plugins: &Path) -> PluginSet {
    let runtime = PluginRuntime::new(answer_limits(), compiler())
        .expect("engine")
        .cache_compiled_in(cache)
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
    let cache = tempfile::tempdir().expect("temp dir");
    let dirs = Dirs::new()
        .plugin("allow-list", &plugin("allow-list"))
        .plugin("percentage-rollout", &plugin("percentage-rollout"));

    let first = load(cache.path(), &dirs.plugins());
    assert_eq!(
        origins(&first),
        [
            ("allow-list".to_owned(), Origin::Compiled),
            ("percentage-rollout".to_owned(), Origin::Compiled)
        ]
    );
    let written = artifacts(cache.path());
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

    let second = load(cache.path(), &dirs.plugins());
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
        std::fs::write(cache.path().join(name), b"not machine code").expect("corrupt");
    }
    let third = load(cache.path(), &dirs.plugins());
    assert!(
        origins(&third).iter().all(|(_, o)| *o == Origin::Compiled),
        "corrupt artifacts are recompiled: {:?}",
        origins(&third)
    );
    for name in artifacts(cache.path()) {
        let size = std::fs::metadata(cache.path().join(&name))
            .expect("artifact")
            .len();
        assert!(size > 1000, "{name} was rewritten ({size} bytes)");
    }
    assert_eq!(
        load(cache.path(), &dirs.plugins())
            .iter()
            .filter(|p| p.origin() == Origin::Precompiled)
            .count(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaghost_answers_the_same_from_precompiled_plugins() {
    let cache = tempfile::tempdir().expect("temp dir");
    let mut config = examples_config(answer_limits());
    config.plugin_cache_dir = Some(cache.path().to_path_buf());
    let mut answers = Vec::new();
    for _start in 0..2 {
        let fh = Flaghost::start(&config).await.expect("starts");
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
    assert!(!artifacts(cache.path()).is_empty());
}
