//! The Redis cache against a real `redis-server` of each test's own (started
//! on a free port, stopped, restarted, paused and flushed by the test): key
//! layout and TTLs, invalidation, fallback to memory through every kind of
//! outage, self-healing, staleness, and two instances on one Redis.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use flaghost::cache::{FlagCache, RedisCache, RedisOptions};
use flaghost::config::ServeConfig;
use flaghost::plugins::PluginSet;
use flaghost::store::DirStore;
use flaghost_tests::{Dirs, Flaghost, RedisServer, answer_limits, eventually};
use serde_json::{Value, json};

const TOKEN: &str = "test-admin-token-0123456789";

fn flags(greeting: &str) -> Value {
    json!({
        "metadata": {"team": "growth"},
        "$evaluators": {"is_beta": {"==": [{"var": "tier"}, "beta"]}},
        "flags": {
            "greeting": {
                "state": "ENABLED",
                "variants": {"hello": greeting, "bye": "bye"},
                "defaultVariant": "hello"
            },
            "beta-banner": {
                "state": "ENABLED",
                "variants": {"on": true, "off": false},
                "defaultVariant": "off",
                "targeting": {"if": [{"$ref": "is_beta"}, "on", "off"]}
            },
            "ratio": {
                "state": "ENABLED",
                "variants": {"small": 0.25, "big": 2.0},
                "defaultVariant": "big"
            }
        }
    })
}

/// A config over `dirs` using `redis`, with a short TTL and check interval
/// so the tests see refreshes happen.
fn config(dirs: &Dirs, redis: Option<&RedisServer>, ttl: Duration) -> ServeConfig {
    let mut config = dirs.config("production", answer_limits());
    config.cache_ttl = ttl;
    config.check_interval = Duration::from_millis(200);
    config.admin_token = Some(TOKEN.into());
    config.redis = redis.map(|r| RedisOptions {
        url: r.url(),
        ttl,
        response_timeout: Duration::from_millis(200),
        signing_key: None,
        max_entry_bytes: flaghost::cache::DEFAULT_MAX_ENTRY_BYTES,
        documents: Default::default(),
        tls: Default::default(),
    });
    config
}

/// Waits until two instances listen for invalidations on `redis`.
async fn both_subscribed(redis: &RedisServer) {
    let subscribed = eventually(Duration::from_secs(10), || async {
        let counts: Vec<redis::Value> =
            redis.query(&["PUBSUB", "NUMSUB", "feature_flags:invalidations"]);
        counts.get(1) == Some(&redis::Value::Int(2))
    })
    .await;
    assert!(subscribed, "both instances listen for invalidations");
}

async fn greeting(fh: &Flaghost) -> (u16, Value) {
    fh.evaluate("greeting", json!({})).await
}

async fn invalidate(fh: &Flaghost, body: &str) -> (u16, Value) {
    let response = fh
        .client
        .post(format!("{}/admin/v1/cache/invalidate", fh.base))
        .bearer_auth(TOKEN)
        .body(body.to_owned())
        .send()
        .await
        .expect("reaches flaghost");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// No plugins: these flags use none.
fn plugins() -> PluginSet {
    PluginSet::default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_port_writes_reads_and_deletes_with_the_key_layout_and_ttl() {
    let redis = RedisServer::start();
    let dirs = Dirs::new().flag_file("production", &flags("hello"));
    let store = DirStore::new(dirs.flags(), plugins());
    let set = store.load_sync("production").expect("loads");
    let cache = RedisCache::connect(
        &RedisOptions {
            url: redis.url(),
            ttl: Duration::from_secs(120),
            response_timeout: Duration::from_millis(500),
            signing_key: None,
            max_entry_bytes: flaghost::cache::DEFAULT_MAX_ENTRY_BYTES,
            documents: Default::default(),
            tls: Default::default(),
        },
        Arc::new(plugins()),
    )
    .expect("connects");
    assert!(
        cache.wait_connected(Duration::from_secs(5)).await,
        "connected"
    );
    assert!(
        cache.get("production").await.expect("reads").is_none(),
        "a miss first"
    );

    cache.put(&set).await.expect("writes");
    assert_eq!(
        redis.keys(),
        [
            "feature_flags:production",
            "feature_flags:production:beta-banner",
            "feature_flags:production:greeting",
            "feature_flags:production:ratio",
        ]
    );
    for key in redis.keys() {
        let ttl: i64 = redis.query(&["TTL", &key]);
        assert!(ttl > 0 && ttl <= 120, "{key}: TTL {ttl}");
    }
    let entry: String = redis.query(&["GET", "feature_flags:production"]);
    let entry: Value = serde_json::from_str(&entry).expect("JSON");
    assert_eq!(entry["format"], "flaghost.flag-set/1");
    assert_eq!(entry["digest"], set.digest.as_str());
    assert!(entry["expiresAt"].as_u64() > entry["writtenAt"].as_u64());
    assert_eq!(
        entry["flagSet"]["flags"]["beta-banner"]["targeting"],
        json!({"if": [{"==": [{"var": "tier"}, "beta"]}, "on", "off"]}),
        "stored with $refs resolved"
    );
    let one: String = redis.query(&["GET", "feature_flags:production:ratio"]);
    let one: Value = serde_json::from_str(&one).expect("JSON");
    assert_eq!(one["flag"]["variants"], json!({"small": 0.25, "big": 2.0}));
    assert_eq!(one["flag"]["metadata"], json!({"team": "growth"}));

    let back = cache
        .get("production")
        .await
        .expect("reads")
        .expect("a hit");
    assert_eq!(back.digest, set.digest);
    let mut keys: Vec<&String> = back.flags.keys().collect();
    keys.sort();
    assert_eq!(keys, ["beta-banner", "greeting", "ratio"]);
    for (key, flag) in &set.flags {
        assert_eq!(
            back.flags[key].definition.get(),
            flag.definition.get(),
            "{key} reads back the same"
        );
    }

    assert_eq!(
        cache.invalidate(Some("production")).await.expect("deletes"),
        4
    );
    assert!(redis.keys().is_empty());
    assert!(cache.get("production").await.expect("reads").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidating_everything_scans_past_one_page_and_spares_other_keys() {
    let redis = RedisServer::start();
    let dirs = Dirs::new()
        .flag_file("production", &flags("hello"))
        .flag_file("staging", &flags("hi"));
    // NB: no background check during the test: it would write back the
    // sets this test deletes.
    let mut cfg = config(&dirs, Some(&redis), Duration::from_secs(60));
    cfg.check_interval = Duration::from_secs(600);
    let fh = Flaghost::start(&cfg).await.expect("starts");
    // Many keys: the SCAN takes several pages (500 keys a step).
    let mut conn = redis.client().get_connection().expect("connect");
    let mut pipe = redis::pipe();
    for i in 0..1800 {
        pipe.cmd("SET")
            .arg(format!("feature_flags:old-env:flag-{i}"))
            .arg("x")
            .ignore();
    }
    pipe.cmd("SET")
        .arg("someone-else:key")
        .arg("keep me")
        .ignore();
    pipe.query::<()>(&mut conn).expect("seed");
    assert_eq!(redis.keys().len(), 1800 + 1 + 2 * 4);

    let (status, body) = invalidate(&fh, r#"{"environment": "staging"}"#).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["keysDeleted"], 4, "{body}");
    assert!(
        !redis
            .keys()
            .iter()
            .any(|k| k.starts_with("feature_flags:staging"))
    );

    let (status, body) = invalidate(&fh, "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["keysDeleted"], 1800 + 4, "{body}");
    // NB: the instance's check rewrites the sets it serves soon after.
    let left: Vec<String> = redis
        .keys()
        .into_iter()
        .filter(|k| {
            !k.starts_with("feature_flags:production") && !k.starts_with("feature_flags:staging")
        })
        .collect();
    assert_eq!(left, ["someone-else:key"]);
    fh.stop().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_is_off_without_a_token_and_refuses_wrong_ones() {
    let dirs = Dirs::new().flag_file("production", &flags("hello"));
    let mut off = config(&dirs, None, Duration::from_secs(60));
    off.admin_token = None;
    let fh = Flaghost::start(&off).await.expect("starts");
    let (status, body) = invalidate(&fh, "").await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["errorDetails"]
            .as_str()
            .unwrap_or_default()
            .contains("FLAGHOST_ADMIN_TOKEN")
    );
    fh.stop().await.expect("stops");

    let fh = Flaghost::start(&config(&dirs, None, Duration::from_secs(60)))
        .await
        .expect("starts");
    let url = format!("{}/admin/v1/cache/invalidate", fh.base);
    let anonymous = fh.client.post(&url).send().await.expect("answers");
    assert_eq!(anonymous.status().as_u16(), 401);
    assert_eq!(anonymous.headers()["www-authenticate"], "Bearer");
    let wrong = fh
        .client
        .post(&url)
        .bearer_auth("guess")
        .send()
        .await
        .expect("answers");
    assert_eq!(wrong.status().as_u16(), 401);
    let (status, body) = invalidate(&fh, r#"{"environment": "../etc"}"#).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = invalidate(&fh, r#"{"env": "production"}"#).await;
    assert_eq!(status, 400, "{body}");
    // A body past what a name needs is refused, not read whole.
    let long = format!(r#"{{"environment": "{}"}}"#, "x".repeat(5000));
    let (status, body) = invalidate(&fh, &long).await;
    assert_eq!(status, 413, "{body}");
    assert!(body.to_string().contains("4096 bytes"), "{body}");
    // A name no flag file has is a mistake, not a kill switch pulled.
    let (status, body) = invalidate(&fh, r#"{"environment": "prodution"}"#).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.to_string().contains("prodution"), "{body}");
    let (status, body) = invalidate(&fh, r#"{"environment": "production"}"#).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["keysDeleted"], Value::Null, "no Redis here: {body}");
    assert_eq!(greeting(&fh).await.1["value"], "hello");
    fh.stop().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_unready_until_an_environment_is_loaded() {
    // No flag file at all: up (healthz), not ready; ready once one lands.
    let dirs = Dirs::new();
    std::fs::create_dir_all(dirs.flags()).expect("flag dir");
    let mut config = config(&dirs, None, Duration::from_secs(60));
    config.watch_interval = Some(Duration::from_millis(100));
    let fh = Flaghost::start(&config).await.expect("starts");
    let (status, body) = fh.get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["reason"]
            .as_str()
            .is_some_and(|r| r.contains("flag file")),
        "{body}"
    );
    assert_eq!(fh.get("/healthz").await.0, 200);
    std::fs::write(
        dirs.flags().join("production.json"),
        flags("hello").to_string(),
    )
    .expect("write");
    let ready = flaghost_tests::eventually(Duration::from_secs(30), || async {
        fh.get("/readyz").await.0 == 200
    })
    .await;
    assert!(ready, "ready once a flag file is loaded");
    fh.stop().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_url_the_cache_is_memory_only() {
    let dirs = Dirs::new().flag_file("production", &flags("hello"));
    let fh = Flaghost::start(&config(&dirs, None, Duration::from_secs(60)))
        .await
        .expect("starts");
    assert_eq!(fh.cache_backend().await, "memory-only");
    let (_, health) = fh.get("/healthz").await;
    assert_eq!(health["cache"]["backend"], "memory-only");
    assert_eq!(greeting(&fh).await.1["value"], "hello");
    fh.stop().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_under_a_key_is_a_miss_and_is_overwritten() {
    let redis = RedisServer::start();
    for garbage in [
        "not json",
        r#"{"format":"flaghost.flag-set/99"}"#,
        r#"{"format":"flaghost.flag-set/1","environment":"production","digest":"x","writtenAt":1,"expiresAt":2,"flagSet":{"flags":{"greeting":{"state":"ON"}}}}"#,
    ] {
        redis.query::<()>(&["SET", "feature_flags:production", garbage]);
        let dirs = Dirs::new().flag_file("production", &flags("hello"));
        let fh = Flaghost::start(&config(&dirs, Some(&redis), Duration::from_secs(60)))
            .await
            .expect("starts");
        let (status, body) = greeting(&fh).await;
        assert_eq!(
            (status, &body["value"]),
            (200, &json!("hello")),
            "{garbage}: {body}"
        );
        let entry: String = redis.query(&["GET", "feature_flags:production"]);
        let entry: Value = serde_json::from_str(&entry).expect("overwritten with an entry");
        assert_eq!(entry["format"], "flaghost.flag-set/1");
        fh.stop().await.expect("stops");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_start_up_then_started_moves_flaghost_onto_it() {
    let port = RedisServer::reserve_port();
    let dirs = Dirs::new().flag_file("production", &flags("hello"));
    let mut cfg = config(&dirs, None, Duration::from_secs(60));
    cfg.redis = Some(RedisOptions {
        url: format!("redis://:secret-password@127.0.0.1:{port}"),
        ttl: Duration::from_secs(60),
        response_timeout: Duration::from_millis(200),
        signing_key: None,
        max_entry_bytes: flaghost::cache::DEFAULT_MAX_ENTRY_BYTES,
        documents: Default::default(),
        tls: Default::default(),
    });
    let fh = Flaghost::start(&cfg).await.expect("starts without redis");
    assert_eq!(fh.cache_backend().await, "memory-fallback");
    let (_, ready) = fh.get("/readyz").await;
    let url = ready["cache"]["redis"]["url"]
        .as_str()
        .expect("url")
        .to_owned();
    assert!(
        !url.contains("secret-password") && url.contains("***"),
        "{url}"
    );
    assert_eq!(greeting(&fh).await.1["value"], "hello");

    let redis = RedisServer::start_on(port);
    // NB: flaghost's attempts meanwhile are refused (its AUTH finds no
    // password set): a refusal must not leave it stuck on that connection.
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.query::<()>(&["CONFIG", "SET", "requirepass", "secret-password"]);
    assert!(
        eventually(Duration::from_secs(10), || async {
            fh.cache_backend().await == "redis"
        })
        .await,
        "flaghost moved onto redis"
    );
    let mut conn = redis::Client::open(format!("redis://:secret-password@127.0.0.1:{port}"))
        .expect("url")
        .get_connection()
        .expect("connect");
    let written = eventually(Duration::from_secs(5), || {
        let held: bool = redis::cmd("EXISTS")
            .arg("feature_flags:production")
            .query(&mut conn)
            .unwrap_or(false);
        async move { held }
    })
    .await;
    assert!(
        written,
        "the current flag set was written once redis answered"
    );
    fh.stop().await.expect("stops");
}

/// Evaluates `greeting` from `connections` clients at once, `total` times in
/// all, while `disturb` runs; every answer must be right.
async fn evaluate_through(
    fh: &Flaghost,
    connections: usize,
    total: usize,
    pace: Duration,
    disturb: impl std::future::Future<Output = ()>,
) {
    let done = Arc::new(AtomicUsize::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..connections {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .build()
            .expect("client");
        let url = format!("{}/ofrep/v1/evaluate/flags/greeting", fh.base);
        let (done, next) = (done.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut wrong = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let started = Instant::now();
                let answer = client.post(&url).body(r#"{"context":{}}"#).send().await;
                let elapsed = started.elapsed();
                match answer {
                    Ok(r) if r.status() == 200 => {
                        let body: Value = r.json().await.unwrap_or(Value::Null);
                        if body["value"] != "hello" {
                            wrong.push(format!("{body}"));
                        }
                    }
                    Ok(r) => wrong.push(format!("status {}", r.status())),
                    Err(e) => wrong.push(e.to_string()),
                }
                if elapsed > Duration::from_secs(2) {
                    wrong.push(format!("took {elapsed:?}"));
                }
                done.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(pace).await;
            }
            wrong
        }));
    }
    disturb.await;
    let mut wrong = Vec::new();
    for w in workers {
        wrong.extend(w.await.expect("worker"));
    }
    assert_eq!(done.load(Ordering::Relaxed), total);
    assert!(
        wrong.is_empty(),
        "{} wrong answers, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_during_concurrent_evaluations_costs_no_answer() {
    let mut redis = RedisServer::start();
    let dirs = Dirs::new().flag_file("production", &flags("hello"));
    // A 1 s TTL: refreshes keep going to Redis while it dies.
    let fh = Flaghost::start(&config(&dirs, Some(&redis), Duration::from_secs(1)))
        .await
        .expect("starts");
    assert_eq!(fh.cache_backend().await, "redis");
    let kill = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        redis.stop();
    };
    evaluate_through(&fh, 64, 2000, Duration::from_millis(50), kill).await;
    assert_eq!(fh.cache_backend().await, "memory-fallback");
    fh.stop().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_redis_is_repopulated_and_no_empty_set_is_ever_served() {
    let mut redis = RedisServer::start();
    let dirs = Dirs::new().flag_file("production", &flags("hello"));
    let fh = Flaghost::start(&config(&dirs, Some(&redis), Duration::from_secs(300)))
        .await
        .expect("starts");
    let held = |redis: &RedisServer| redis.query::<bool>(&["EXISTS", "feature_flags:production"]);
    assert!(held(&redis));

    // The LaunchDarkly relay's failure: after a Redis restart its flags read
    // as missing. Here, every evaluation meanwhile answers right, and the
    // set is back in Redis within the check interval.
    let restart = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        redis.stop();
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Restarted empty (it keeps nothing on disk).
        redis.start_again();
        let back = eventually(Duration::from_secs(5), || async { held(&redis) }).await;
        assert!(back, "repopulated after the restart");
        redis.query::<()>(&["FLUSHALL"]);
        let back = eventually(Duration::from_secs(2), || async { held(&redis) }).await;
        assert!(back, "repopulated after FLUSHALL");
    };
    evaluate_through(&fh, 8, 400, Duration::from_millis(10), restart).await;
    fh.stop().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_is_skipped_within_the_response_timeout() {
    let redis = RedisServer::start();
    let dirs = Dirs::new().flag_file("production", &flags("hello"));
    // NB: no background check: only requests' refreshes meet the pause.
    let mut cfg = config(&dirs, Some(&redis), Duration::from_secs(1));
    cfg.check_interval = Duration::from_secs(600);
    let fh = Flaghost::start(&cfg).await.expect("starts");
    assert_eq!(fh.cache_backend().await, "redis");
    redis.query::<()>(&["CLIENT", "PAUSE", "4000", "ALL"]);
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    while started.elapsed() < Duration::from_millis(2500) {
        let t = Instant::now();
        let (status, body) = greeting(&fh).await;
        slowest = slowest.max(t.elapsed());
        assert_eq!((status, &body["value"]), (200, &json!("hello")), "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // NB: a request waits at most the response timeout (200 ms) once, then
    // skips Redis; the pause lasts 4 s.
    assert!(
        slowest < Duration::from_millis(1500),
        "slowest answer {slowest:?}"
    );
    assert_eq!(fh.cache_backend().await, "memory-fallback");
    assert!(
        eventually(Duration::from_secs(8), || async {
            fh.cache_backend().await == "redis"
        })
        .await,
        "back on redis after the pause"
    );
    fh.stop().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_answers_under_cpu_load_keep_redis_and_a_dead_redis_still_trips_at_once() {
    let mut redis = RedisServer::start();
    let dirs = Dirs::new().flag_file("production", &flags("hello"));
    // NB: the background check talks to Redis every 50 ms, so each pause
    // below meets a request in flight.
    let mut cfg = config(&dirs, Some(&redis), Duration::from_secs(300));
    cfg.check_interval = Duration::from_millis(50);
    let fh = Flaghost::start(&cfg).await.expect("starts");
    assert_eq!(fh.cache_backend().await, "redis");

    // Both cores busy, as under a build, for the whole test.
    let busy = Arc::new(AtomicBool::new(true));
    let burners: Vec<_> = (0..2)
        .map(|_| {
            let busy = busy.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while busy.load(Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
            })
        })
        .collect();

    // Redis answers 150 ms past the 200 ms response timeout, five times:
    // the request in flight times out, the confirming PING is answered.
    for _ in 0..5 {
        redis.query::<()>(&["CLIENT", "PAUSE", "350", "ALL"]);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(
            fh.cache_backend().await,
            "redis",
            "a late answer kept redis"
        );
        let (status, body) = greeting(&fh).await;
        assert_eq!((status, &body["value"]), (200, &json!("hello")), "{body}");
    }
    let (_, ready) = fh.get("/readyz").await;
    let late = ready["cache"]["redis"]["lateAnswers"]
        .as_u64()
        .expect("counted");
    assert!(late >= 1, "the pauses met requests: {ready}");

    // Killed: the next request is refused and the breaker opens at once,
    // well within the response timeout after the check that meets it.
    redis.stop();
    let stopped = Instant::now();
    let tripped = eventually(Duration::from_secs(2), || async {
        fh.cache_backend().await == "memory-fallback"
    })
    .await;
    let after = stopped.elapsed();
    busy.store(false, Ordering::Relaxed);
    for burner in burners {
        burner.join().expect("burner");
    }
    assert!(tripped, "a dead redis opened the breaker");
    assert!(
        after < cfg.check_interval + Duration::from_millis(200) + Duration::from_millis(250),
        "opened {after:?} after the kill"
    );
    let (status, body) = greeting(&fh).await;
    assert_eq!((status, &body["value"]), (200, &json!("hello")), "{body}");
    fh.stop().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_signing_key_only_signed_fresh_invalidations_are_taken() {
    let redis = RedisServer::start();
    let key = Arc::new(flaghost::signing::SigningKey::from_secret(
        "a secret shared by both instances",
    ));
    let signed = |dirs: &Dirs, watch: bool| {
        let mut cfg = config(dirs, Some(&redis), Duration::from_secs(300));
        if let Some(options) = cfg.redis.as_mut() {
            options.signing_key = Some(key.clone());
        }
        if !watch {
            cfg.watch_interval = None;
        }
        cfg
    };
    let a_dirs = Dirs::new().flag_file("production", &flags("hello"));
    let b_dirs = Dirs::new().flag_file("production", &flags("hello"));
    let a = Flaghost::start(&signed(&a_dirs, true))
        .await
        .expect("a starts");
    // B does not watch its files: it learns of changes only by invalidations.
    let b = Flaghost::start(&signed(&b_dirs, false))
        .await
        .expect("b starts");
    assert_eq!(greeting(&b).await.1["value"], "hello");
    both_subscribed(&redis).await;
    std::fs::write(
        b_dirs.flags().join("production.json"),
        flags("bonjour").to_string(),
    )
    .expect("write");

    // Planted: unsigned, forged, and a signed one sent long ago.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let old = now_ms - 3_600_000;
    let old_tag = key.tag_hex(&[
        b"flaghost.invalidation/1",
        b"production",
        b"intruder",
        old.to_string().as_bytes(),
    ]);
    for planted in [
        json!({"environment": "production", "origin": "intruder", "sentAt": now_ms}),
        json!({"environment": "production", "origin": "intruder", "sentAt": now_ms,
               "signature": "00".repeat(32)}),
        json!({"environment": "production", "origin": "intruder", "sentAt": old,
               "signature": old_tag}),
    ] {
        redis.query::<i64>(&[
            "PUBLISH",
            "feature_flags:invalidations",
            &planted.to_string(),
        ]);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        greeting(&b).await.1["value"],
        "hello",
        "no planted invalidation was taken"
    );

    // A's own, signed with the shared key, is.
    let (status, body) = invalidate(&a, r#"{"environment": "production"}"#).await;
    assert_eq!(status, 200, "{body}");
    let seen = eventually(Duration::from_secs(2), || async {
        greeting(&b).await.1["value"] == "bonjour"
    })
    .await;
    assert!(seen, "B took A's signed invalidation");
    a.stop().await.expect("a stops");
    b.stop().await.expect("b stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_see_each_others_reloads_and_invalidations() {
    let redis = RedisServer::start();
    let a_dirs = Dirs::new().flag_file("production", &flags("hello"));
    let b_dirs = Dirs::new().flag_file("production", &flags("hello"));
    let a = Flaghost::start(&config(&a_dirs, Some(&redis), Duration::from_secs(300)))
        .await
        .expect("a starts");
    // B does not watch its files: it learns of changes only from A.
    let mut b_config = config(&b_dirs, Some(&redis), Duration::from_secs(300));
    b_config.watch_interval = None;
    let b = Flaghost::start(&b_config).await.expect("b starts");
    assert_eq!(greeting(&b).await.1["value"], "hello");
    both_subscribed(&redis).await;

    // An invalidation on A reaches B, which reads its own changed file.
    std::fs::write(
        b_dirs.flags().join("production.json"),
        flags("bonjour").to_string(),
    )
    .expect("write");
    assert_eq!(
        greeting(&b).await.1["value"],
        "hello",
        "B has not looked yet"
    );
    let (status, body) = invalidate(&a, r#"{"environment": "production"}"#).await;
    assert_eq!(status, 200, "{body}");
    let seen = eventually(Duration::from_secs(1), || async {
        greeting(&b).await.1["value"] == "bonjour"
    })
    .await;
    assert!(
        seen,
        "B dropped its snapshot within 1 s of A's invalidation"
    );

    // A file change A reloads reaches B the same way.
    std::fs::write(
        b_dirs.flags().join("production.json"),
        flags("hola").to_string(),
    )
    .expect("write");
    std::fs::write(
        a_dirs.flags().join("production.json"),
        flags("hola").to_string(),
    )
    .expect("write");
    let seen = eventually(Duration::from_secs(3), || async {
        greeting(&b).await.1["value"] == "hola"
    })
    .await;
    assert!(seen, "A's reload reached B");
    assert_eq!(greeting(&a).await.1["value"], "hola");
    a.stop().await.expect("stops");
    b.stop().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_file_keeps_the_last_good_set_then_it_is_marked_stale() {
    let dirs = Dirs::new().flag_file("production", &flags("hello"));
    let fh = Flaghost::start(&config(&dirs, None, Duration::from_secs(1)))
        .await
        .expect("starts");
    let (_, body) = greeting(&fh).await;
    assert_eq!(
        (&body["value"], &body["reason"]),
        (&json!("hello"), &json!("STATIC"))
    );

    std::fs::write(
        dirs.flags().join("production.json"),
        b"{\"flags\": {\"greeting\": ",
    )
    .expect("break");
    let stale = eventually(Duration::from_secs(4), || async {
        greeting(&fh).await.1["reason"] == "STALE"
    })
    .await;
    assert!(stale, "marked STALE once older than the TTL");
    let (status, body) = greeting(&fh).await;
    assert_eq!(
        (status, &body["value"], &body["variant"]),
        (200, &json!("hello"), &json!("hello")),
        "{body}"
    );
    let (status, body) = fh.post_raw("/ofrep/v1/evaluate/flags", "{}").await;
    assert_eq!(status, 200);
    assert!(
        body["flags"]
            .as_array()
            .expect("flags")
            .iter()
            .all(|f| f["reason"] == "STALE"),
        "{body}"
    );

    std::fs::write(
        dirs.flags().join("production.json"),
        flags("hello again").to_string(),
    )
    .expect("fix");
    let fixed = eventually(Duration::from_secs(4), || async {
        let (_, body) = greeting(&fh).await;
        body["value"] == "hello again" && body["reason"] == "STATIC"
    })
    .await;
    assert!(fixed, "the repaired file serves, fresh");
    fh.stop().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_flag_directory_serves_what_redis_holds_marked_stale() {
    let redis = RedisServer::start();
    let dirs = Dirs::new().flag_file("production", &flags("from redis"));
    let writer = Flaghost::start(&config(&dirs, Some(&redis), Duration::from_secs(300)))
        .await
        .expect("writer starts");
    writer.stop().await.expect("stops");

    let empty = Dirs::new();
    let mut cfg = config(&empty, Some(&redis), Duration::from_secs(1));
    cfg.flags = empty.flags().join("missing");
    let fh = Flaghost::start(&cfg).await.expect("starts on redis's sets");
    let (status, body) = greeting(&fh).await;
    assert_eq!(
        (status, &body["value"], &body["reason"]),
        (200, &json!("from redis"), &json!("STALE")),
        "{body}"
    );
    // Redis then loses them too: what is served keeps serving, still STALE.
    redis.query::<()>(&["FLUSHALL"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for _ in 0..3 {
        let (status, body) = greeting(&fh).await;
        assert_eq!(
            (status, &body["value"], &body["reason"]),
            (200, &json!("from redis"), &json!("STALE")),
            "{body}"
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    fh.stop().await.expect("stops");

    // Without Redis holding anything, an unreadable directory is still fatal.
    let mut cfg = config(&empty, None, Duration::from_secs(300));
    cfg.flags = empty.flags().join("missing");
    let err = Flaghost::start(&cfg).await.err().expect("refused");
    assert!(
        err.to_string().contains("cannot read the flag directory"),
        "{err:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_version_in_redis_loses_to_the_local_file() {
    let redis = RedisServer::start();
    let a_dirs = Dirs::new().flag_file("production", &flags("from a"));
    let a = Flaghost::start(&config(&a_dirs, Some(&redis), Duration::from_secs(300)))
        .await
        .expect("a starts");
    let b_dirs = Dirs::new().flag_file("production", &flags("from b"));
    let b = Flaghost::start(&config(&b_dirs, Some(&redis), Duration::from_secs(300)))
        .await
        .expect("b starts");
    assert_eq!(greeting(&a).await.1["value"], "from a");
    assert_eq!(
        greeting(&b).await.1["value"],
        "from b",
        "a valid local file wins"
    );
    a.stop().await.expect("stops");
    b.stop().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_refuses_writes_costs_no_answer() {
    let redis = RedisServer::start();
    let dirs = Dirs::new()
        .flag_file("production", &flags("hello"))
        .flag_file("staging", &flags("hi"));
    let fh = Flaghost::start(&config(&dirs, Some(&redis), Duration::from_secs(1)))
        .await
        .expect("starts");
    // OOM: every write is refused; then a read-only replica (READONLY).
    redis.query::<()>(&["FLUSHALL"]);
    redis.query::<()>(&["CONFIG", "SET", "maxmemory", "1"]);
    redis.query::<()>(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    for _ in 0..10 {
        assert_eq!(greeting(&fh).await.1["value"], "hello");
        assert_eq!(
            fh.evaluate_in(Some("staging"), "greeting", json!({}))
                .await
                .1["value"],
            "hi"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        !redis.query::<bool>(&["EXISTS", "feature_flags:production"]),
        "writes refused"
    );
    assert_eq!(
        fh.cache_backend().await,
        "redis",
        "reads still work: no fallback"
    );
    redis.query::<()>(&["CONFIG", "SET", "maxmemory", "0"]);
    let reserved = RedisServer::reserve_port().to_string();
    redis.query::<()>(&["REPLICAOF", "127.0.0.1", &reserved]);
    for _ in 0..10 {
        assert_eq!(greeting(&fh).await.1["value"], "hello");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    redis.query::<()>(&["REPLICAOF", "NO", "ONE"]);
    let healed = eventually(Duration::from_secs(5), || async {
        redis.query::<bool>(&["EXISTS", "feature_flags:production"])
    })
    .await;
    assert!(healed, "written once redis accepts writes again");
    fh.stop().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_readable_flag_file_that_is_refused_is_never_replaced_by_what_redis_holds() {
    let redis = RedisServer::start();
    let dirs = Dirs::new().flag_file("production", &flags("hello"));
    // A first instance puts its set in Redis.
    let fh = Flaghost::start(&config(&dirs, Some(&redis), Duration::from_secs(300)))
        .await
        .expect("starts");
    assert_eq!(greeting(&fh).await.1["value"], json!("hello"));
    fh.stop().await.expect("stops");
    assert!(
        redis.keys().iter().any(|k| k == "feature_flags:production"),
        "the set is in redis: {:?}",
        redis.keys()
    );

    // The local file is then truncated: readable, and refused. What Redis
    // holds (anyone who can write to Redis could have planted it) does not
    // stand in for it: start-up is refused, naming the file.
    std::fs::write(
        dirs.flags().join("production.json"),
        b"{\"flags\": {\"greeting\": ",
    )
    .expect("truncate");
    let err = Flaghost::start(&config(&dirs, Some(&redis), Duration::from_secs(300)))
        .await
        .err()
        .expect("refused");
    let message = format!("{err:#}");
    assert!(message.contains("production.json"), "{message}");
}

/// A cache on `redis` signing with `secret` (none: unsigned), entries capped
/// at `max_entry_bytes`, entries living `ttl`.
async fn port(
    redis: &RedisServer,
    secret: Option<&str>,
    max_entry_bytes: usize,
    ttl: Duration,
) -> RedisCache {
    let cache = RedisCache::connect(
        &RedisOptions {
            url: redis.url(),
            ttl,
            response_timeout: Duration::from_millis(500),
            signing_key: secret.map(|s| Arc::new(flaghost::signing::SigningKey::from_secret(s))),
            max_entry_bytes,
            documents: Default::default(),
            tls: Default::default(),
        },
        Arc::new(plugins()),
    )
    .expect("connects");
    assert!(cache.wait_connected(Duration::from_secs(5)).await);
    cache
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_signing_key_unsigned_forged_foreign_or_expired_entries_are_misses() {
    const SECRET: &str = "shared-secret-of-the-fleet-0123";
    let redis = RedisServer::start();
    let dirs = Dirs::new().flag_file("production", &flags("hello"));
    let set = DirStore::new(dirs.flags(), plugins())
        .load_sync("production")
        .expect("loads");
    let big = flaghost::cache::DEFAULT_MAX_ENTRY_BYTES;
    let ttl = Duration::from_secs(120);
    let signed = port(&redis, Some(SECRET), big, ttl).await;

    // Signed entries, the set's and each flag's, read back.
    signed.put(&set).await.expect("writes");
    for key in redis.keys() {
        let entry: Value =
            serde_json::from_str(&redis.query::<String>(&["GET", &key])).expect("JSON");
        let signature = entry["signature"].as_str().unwrap_or_default();
        assert_eq!(signature.len(), 64, "{key} is signed: {entry}");
    }
    let back = signed.get("production").await.expect("reads");
    assert_eq!(back.map(|s| s.digest.clone()), Some(set.digest.clone()));

    // The same entry with one flag's value changed, its signature kept.
    let entry: String = redis.query(&["GET", "feature_flags:production"]);
    let forged = entry.replacen("\"hello\"", "\"INJECTED\"", 1);
    assert_ne!(forged, entry);
    redis.query::<()>(&["SET", "feature_flags:production", &forged]);
    let fresh_reader = port(&redis, Some(SECRET), big, ttl).await;
    for cache in [&signed, &fresh_reader] {
        assert!(
            cache.get("production").await.expect("reads").is_none(),
            "a forged entry is a miss"
        );
    }

    // Unsigned (written without the key), and signed with another key.
    for other in [None, Some("another-fleet-secret-0123456")] {
        port(&redis, other, big, ttl)
            .await
            .put(&set)
            .await
            .expect("writes");
        assert!(
            fresh_reader
                .get("production")
                .await
                .expect("reads")
                .is_none(),
            "{other:?}: not ours"
        );
    }

    // Signed, but past its expiry: an old entry planted again is a miss.
    port(&redis, Some(SECRET), big, Duration::ZERO)
        .await
        .put(&set)
        .await
        .expect("writes");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        port(&redis, Some(SECRET), big, ttl)
            .await
            .get("production")
            .await
            .expect("reads")
            .is_none(),
        "an expired entry is a miss"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_over_the_size_cap_is_a_miss_and_none_is_written_over_it() {
    let redis = RedisServer::start();
    let small = port(&redis, None, 64 << 10, Duration::from_secs(60)).await;
    let big = port(
        &redis,
        None,
        flaghost::cache::DEFAULT_MAX_ENTRY_BYTES,
        Duration::from_secs(60),
    )
    .await;
    let mut many = serde_json::Map::new();
    for i in 0..2000 {
        many.insert(
            format!("flag-{i}"),
            json!({"state": "ENABLED",
            "variants": {"on": true, "off": false}, "defaultVariant": "off"}),
        );
    }
    let dirs = Dirs::new().flag_file("big", &json!({"flags": many}));
    let set = DirStore::new(dirs.flags(), plugins())
        .load_sync("big")
        .expect("loads");

    // A valid entry over the small cap: read whole, it is a hit; capped, a miss.
    big.put(&set).await.expect("writes under the big cap");
    let entry: String = redis.query(&["GET", "feature_flags:big"]);
    assert!(entry.len() > 64 << 10, "{} bytes", entry.len());
    assert!(big.get("big").await.expect("reads").is_some());
    assert!(small.get("big").await.expect("reads").is_none());

    // A set whose entry is over the cap is not written.
    redis.query::<()>(&["FLUSHALL"]);
    let err = small.put(&set).await.expect_err("over the cap");
    assert!(err.to_string().contains("over the cap"), "{err}");
    assert!(redis.keys().is_empty(), "{:?}", redis.keys());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_flag_keys_come_back_and_entries_never_expire_while_served() {
    let redis = RedisServer::start();
    let dirs = Dirs::new().flag_file("production", &flags("hello"));
    // A TTL of 3 s, and nothing evaluated: the entries must outlive it.
    let fh = Flaghost::start(&config(&dirs, Some(&redis), Duration::from_secs(3)))
        .await
        .expect("starts");
    assert_eq!(greeting(&fh).await.1["value"], json!("hello"));
    redis.query::<()>(&["DEL", "feature_flags:production:ratio"]);
    assert!(
        eventually(Duration::from_secs(5), || async {
            redis
                .keys()
                .iter()
                .any(|k| k == "feature_flags:production:ratio")
        })
        .await,
        "the lost flag key is written again"
    );
    let until = Instant::now() + Duration::from_secs(7);
    while Instant::now() < until {
        assert_eq!(redis.keys().len(), 4, "{:?}", redis.keys());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    fh.stop().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_entry_too_deep_to_evaluate_is_a_miss_and_the_process_serves_on() {
    // The document that crashed every instance reading it: 33 chained
    // evaluators of 62 `!!` levels, as a format-valid entry with a new digest.
    let redis = RedisServer::start();
    let dirs = Dirs::new().flag_file("production", &flags("hello"));
    let fh = Flaghost::start(&config(&dirs, Some(&redis), Duration::from_secs(1)))
        .await
        .expect("starts");
    let evaluators = flaghost_tests::deep_ref_evaluators();
    let document = json!({"$evaluators": evaluators, "flags": {
        "greeting": {"state": "ENABLED", "variants": {"hello": "PLANTED", "bye": "bye"},
            "defaultVariant": "hello", "targeting": {"$ref": "e0"}}}});
    let entry = json!({"format": "flaghost.flag-set/1", "environment": "production",
        "digest": "0".repeat(64), "writtenAt": 1, "expiresAt": u64::MAX / 2,
        "flagSet": document});
    redis.query::<()>(&["SET", "feature_flags:production", &entry.to_string()]);
    // Refreshes (TTL 1 s) read it for 3 s: refused each time, overwritten.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let (status, body) = greeting(&fh).await;
        assert_eq!((status, &body["value"]), (200, &json!("hello")), "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let held: String = redis.query(&["GET", "feature_flags:production"]);
    assert!(!held.contains("PLANTED"), "overwritten by the local set");
    fh.stop().await.expect("stops");
}
