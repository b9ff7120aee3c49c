//! Start-up with 4 plugins, compiled vs precompiled, side by side.
//!
//! - `plugins/*`: an engine made and the plugin directory loaded, as
//!   start-up does: compiled (no cache dir), precompiled-cold (an empty cache
//!   dir: compiled, then written to it) and precompiled-warm (every artifact
//!   in the cache dir: deserialized).
//! - `ready/*`: all of `flaghost::server::build` (engine, plugins, the
//!   example flag files parsed and bound, their plugin configurations
//!   checked), to the point where it would serve: the issue's "flags and
//!   plugins loaded and ready" (target: warm ≤ 300 ms).
//!
//! `cargo bench -p flaghost-benches --bench startup`

// criterion_group!/criterion_main! generate undocumented items.
#![allow(missing_docs)]

use std::path::Path;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use flaghost::plugins::{Compiler, Limits, PluginRuntime};
use flaghost_tests::{config_for, fixture, plugin, root};

/// A plugin directory of 4 distinct components (the example flags use the
/// first two).
fn four_plugins() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, path) in [
        ("allow-list", plugin("allow-list")),
        ("percentage-rollout", plugin("percentage-rollout")),
        ("trap", fixture("trap")),
        ("picky-config", fixture("picky-config")),
    ] {
        std::fs::copy(&path, dir.path().join(format!("{name}.wasm"))).expect("copy");
    }
    dir
}

fn load(plugins: &Path, cache: Option<&Path>) {
    let mut runtime = PluginRuntime::new(Limits::default(), Compiler::InProcess).expect("engine");
    if let Some(cache) = cache {
        let key = flaghost::signing::SigningKey::load_or_create(&cache.with_extension("key"))
            .expect("key");
        runtime = runtime.cache_compiled_in(cache, key).expect("cache dir");
    }
    let (set, errors) = runtime.load_dir(plugins).expect("plugin dir");
    assert!(errors.is_empty() && set.len() == 4, "{errors:?}");
}

fn startup(c: &mut Criterion) {
    let plugins = four_plugins();
    // NB: the key file goes beside the cache directory (flaghost's
    // default), inside a temporary directory of its own.
    let tmp = tempfile::tempdir().expect("temp dir");
    let warm = tmp.path().join("cache");
    load(plugins.path(), Some(warm.as_path()));

    let mut group = c.benchmark_group("startup/plugins");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    group.bench_function("compiled", |b| b.iter(|| load(plugins.path(), None)));
    group.bench_function("precompiled-cold", |b| {
        b.iter_batched(
            || tempfile::tempdir().expect("cache dir"),
            |cold| load(plugins.path(), Some(cold.path())),
            BatchSize::PerIteration,
        )
    });
    group.bench_function("precompiled-warm", |b| {
        b.iter(|| load(plugins.path(), Some(warm.as_path())))
    });
    group.finish();

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut group = c.benchmark_group("startup/ready");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    for (name, cache) in [
        ("compiled", None),
        ("precompiled-warm", Some(warm.as_path())),
    ] {
        let mut config = config_for(
            root().join("examples/flags"),
            Some(plugins.path().to_path_buf()),
            "production",
            Limits::default(),
        );
        config.plugin_cache_dir = cache.map(Path::to_path_buf);
        config.watch_interval = None;
        // NB: in process: `cargo bench` builds no flaghost binary to run as
        // the child compiler; a child adds its start (a few ms) per plugin.
        config.compiler = Compiler::InProcess;
        group.bench_function(name, |b| {
            b.iter(|| {
                let service = rt
                    .block_on(flaghost::server::build(&config))
                    .expect("builds");
                drop(service);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, startup);
criterion_main!(benches);
