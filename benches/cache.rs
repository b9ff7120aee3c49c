//! The cache's costs, side by side in one run (a real `redis-server` of the
//! bench's own on a free port):
//!
//! - `cache/warm`: a warm evaluation (snapshot lookup + a static flag) with
//!   no Redis configured, and with Redis configured and up. Target: the same
//!   within noise (the warm path never touches Redis).
//! - `cache/refresh`: one refresh of a due snapshot: a Redis hit (GET, entry
//!   checked, local file confirmed), the memory fallback (Redis configured
//!   but down: breaker open, flag store only), and no Redis at all.
//! - `cache/write`: one full flag-set write of 1,000 flags (encode + one
//!   MULTI pipeline of 1,001 SET EX).
//!
//! `cargo bench -p flaghost-benches --bench cache`

// criterion_group!/criterion_main! generate undocumented items.
#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use flaghost::cache::{FlagCache, RedisCache, RedisOptions};
use flaghost::environments::{Environments, Timing};
use flaghost::evaluation::{self, EvaluationContext};
use flaghost::plugins::PluginSet;
use flaghost::store::{DirStore, FlagStore};
use flaghost_tests::{RedisServer, root};
use serde_json::json;

fn options(url: String) -> RedisOptions {
    RedisOptions {
        url,
        ttl: Duration::from_secs(300),
        response_timeout: Duration::from_millis(250),
        signing_key: None,
        max_entry_bytes: flaghost::cache::DEFAULT_MAX_ENTRY_BYTES,
        documents: Default::default(),
        tls: Default::default(),
    }
}

fn read_path(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    redis: Option<&RedisServer>,
    redis_down_url: Option<String>,
) -> Arc<Environments> {
    let store: Arc<dyn FlagStore> = Arc::new(DirStore::new(dir, PluginSet::default()));
    let url = redis.map(RedisServer::url).or(redis_down_url);
    let shared: Option<Arc<dyn FlagCache>> = url.map(|url| {
        let _guard = rt.enter();
        let cache = RedisCache::connect(&options(url), Arc::new(PluginSet::default()))
            .expect("redis cache");
        rt.block_on(cache.wait_connected(Duration::from_millis(500)));
        Arc::new(cache) as Arc<dyn FlagCache>
    });
    let environments = Arc::new(Environments::new(store, shared, Timing::default()));
    rt.block_on(environments.refresh("production"))
        .expect("loads");
    environments
}

fn cache(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let redis = RedisServer::start();
    // The examples without plugins: the cost measured is the cache's.
    let dir = tempfile::tempdir().expect("temp dir");
    let mut doc: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root().join("examples/flags/production.json")).expect("examples"),
    )
    .expect("json");
    let flags = doc["flags"].as_object_mut().expect("flags");
    flags.retain(|_, f| !f.to_string().contains("\"plugin\""));
    std::fs::write(dir.path().join("production.json"), doc.to_string()).expect("write");

    let memory_only = read_path(&rt, dir.path(), None, None);
    let with_redis = read_path(&rt, dir.path(), Some(&redis), None);
    let down_url = format!("redis://127.0.0.1:{}", RedisServer::reserve_port());
    let redis_down = read_path(&rt, dir.path(), None, Some(down_url));
    assert_eq!(with_redis.cache_status().backend, "redis");
    assert_eq!(redis_down.cache_status().backend, "memory-fallback");

    let context = EvaluationContext::default();
    let mut warm = c.benchmark_group("cache/warm");
    for (name, environments) in [
        ("memory_only", &memory_only),
        ("redis_configured", &with_redis),
    ] {
        warm.bench_function(name, |b| {
            b.to_async(&rt).iter(|| async {
                let snapshot = environments.get("production").await.expect("served");
                let r = evaluation::evaluate(&snapshot.set, "items-per-page", &context, None)
                    .expect("evaluates");
                black_box(r.value.is_some())
            })
        });
    }
    warm.finish();

    let mut refresh = c.benchmark_group("cache/refresh");
    for (name, environments) in [
        ("redis_hit", &with_redis),
        ("memory_fallback", &redis_down),
        ("memory_only", &memory_only),
    ] {
        refresh.bench_function(name, |b| {
            b.to_async(&rt).iter(|| async {
                black_box(environments.refresh("production").await.expect("refreshes"))
            })
        });
    }
    // For scale: the Redis round trip alone (GET of the same entry).
    let raw = rt
        .block_on(redis.client().get_multiplexed_async_connection())
        .expect("connects");
    refresh.bench_function("redis_get_alone", |b| {
        b.to_async(&rt).iter(|| {
            let mut raw = raw.clone();
            async move {
                let bytes: Vec<u8> = redis::cmd("GET")
                    .arg("feature_flags:production")
                    .query_async(&mut raw)
                    .await
                    .expect("GET");
                black_box(bytes.len())
            }
        })
    });
    refresh.finish();

    let mut big = serde_json::Map::new();
    for i in 0..1000 {
        big.insert(
            format!("flag-{i:04}"),
            json!({"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
                   "targeting": {"if": [{"in": [{"var": "country"}, ["NL", "BE", "DE"]]}, "on", "off"]},
                   "metadata": {"team": "growth"}}),
        );
    }
    std::fs::write(
        dir.path().join("big.json"),
        json!({"flags": big}).to_string(),
    )
    .expect("write");
    let store = DirStore::new(dir.path(), PluginSet::default());
    let set = store.load_sync("big").expect("1,000 flags load");
    let cache = {
        let _guard = rt.enter();
        RedisCache::connect(&options(redis.url()), Arc::new(PluginSet::default())).expect("cache")
    };
    assert!(rt.block_on(cache.wait_connected(Duration::from_secs(2))));
    let mut write = c.benchmark_group("cache/write");
    write.sample_size(20);
    write.bench_function("flag_set_1000_flags", |b| {
        b.to_async(&rt)
            .iter(|| async { cache.put(&set).await.expect("written") })
    });
    write.finish();
}

criterion_group!(benches, cache);
criterion_main!(benches);
