//! What the sandbox costs: one warm call of the same rule (`allow-list`,
//! reading one attribute through the `context` import), three ways side by
//! side.
//!
//! - `bare`: plain wasmtime, no limit at all: no epoch interruption, the
//!   default (on-demand) allocator, no resource limiter, no context or
//!   answer cap, no guard, no counters. The host import does what
//!   flaghost's does, and the context is put in the store per call as
//!   flaghost does, so only the sandbox differs.
//! - `epoch`: `bare` plus epoch interruption, the instrumentation that
//!   makes the deadline possible.
//! - `flaghost`: the rule as flaghost runs it (`PluginRule` under the
//!   default `Limits`): epoch deadline, pooling allocator with the memory
//!   cap, resource limiter, context and answer caps, concurrency guard and
//!   quarantine, counters and latency histogram.
//!
//!
//! `languages/allow-list`: the same rule written in Rust, Python
//! (componentize-py) and JavaScript (componentize-js), evaluated warm as
//! flaghost runs it, in each isolation mode; printed beside it, each one's
//! size, first-load (compile) and precompiled load time, start-up (an
//! instance and a configuration check) and memory per instance. The Python
//! and JavaScript rules need `plugins/toolchains.sh`; without it they are
//! skipped, saying so.
//!
//! `cargo bench -p flaghost-benches --bench sandbox`

// criterion_group!/criterion_main! generate undocumented items.
#![allow(missing_docs)]

use std::hint::black_box;

use ::flaghost::evaluation::EvaluationContext;
use criterion::{Criterion, criterion_group, criterion_main};
use flaghost::flags::RuleBinder;
use flaghost::plugins::{Compiler, Limits, PluginRuntime};
use flaghost_benches::typical_context;
use flaghost_tests::{language_plugin, plugin};
use serde_json::{Value as Json, json};
use wasmtime::component::{Component, HasSelf, Linker, ResourceAny};
use wasmtime::{Config, Engine, Store};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "flaghost:rules/targeting-rule@0.1.0",
    });
}

use bindings::TargetingRule;
use bindings::flaghost::rules::context::{self as wit_context, Host, Value};

const FLAG: &str = "eu-pricing-banner";

fn variants() -> Vec<String> {
    vec!["eu".into(), "none".into()]
}

fn rule_config() -> Json {
    json!({"attribute": "country", "values": ["NL", "DE", "FR", "BE"], "variant": "eu"})
}

/// The host side of `context`, as flaghost's (without the context cap).
struct State {
    context: Option<EvaluationContext>,
}

fn to_value(v: &Json) -> Value {
    match v {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Boolean(*b),
        Json::Number(n) => n
            .as_i64()
            .map(Value::Integer)
            .unwrap_or(Value::Float(n.as_f64().unwrap_or(f64::NAN))),
        Json::String(s) => Value::Text(s.clone()),
        other => Value::Json(other.to_string()),
    }
}

impl Host for State {
    fn targeting_key(&mut self) -> Option<String> {
        Some(self.context.as_ref()?.targeting_key()?.to_owned())
    }

    fn get(&mut self, path: String) -> Option<Value> {
        self.context.as_ref()?.get(&path).map(to_value)
    }
}

/// The allow-list compiled on `engine`, and a linker with flaghost's
/// `context` import and every other import trapping, as flaghost links it.
fn linked(engine: &Engine) -> (Component, Linker<State>) {
    let bytes = std::fs::read(plugin("allow-list")).expect("plugin");
    let component = Component::from_binary(engine, &bytes).expect("compiles");
    let mut linker: Linker<State> = Linker::new(engine);
    wit_context::add_to_linker::<_, HasSelf<State>>(&mut linker, |s| s).expect("link");
    linker
        .define_unknown_imports_as_traps(&component)
        .expect("stubs");
    (component, linker)
}

/// A warm instance of the rule on an engine configured by `epoch`, with
/// its configuration parsed.
fn unlimited(epoch: bool) -> (Store<State>, TargetingRule, ResourceAny) {
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(epoch)
        .concurrency_support(false);
    let engine = Engine::new(&config).expect("engine");
    let (component, linker) = linked(&engine);
    let mut store = Store::new(&engine, State { context: None });
    if epoch {
        store.set_epoch_deadline(u64::MAX / 2);
    }
    let rule = TargetingRule::instantiate(&mut store, &component, &linker).expect("instantiates");
    let config = rule_config().to_string();
    let handle = rule
        .flaghost_rules_rule()
        .targeting()
        .call_create(&mut store, FLAG, &variants(), &config)
        .expect("runs")
        .expect("accepts its configuration");
    (store, rule, handle)
}

fn sandbox(c: &mut Criterion) {
    let context = typical_context();
    let mut group = c.benchmark_group("sandbox/allow-list");

    for (name, epoch) in [("bare", false), ("epoch", true)] {
        let (mut store, rule, handle) = unlimited(epoch);
        let targeting = rule.flaghost_rules_rule().targeting();
        group.bench_function(name, |b| {
            b.iter(|| {
                store.data_mut().context = Some(context.clone());
                let answer = targeting.call_evaluate(&mut store, handle).expect("runs");
                store.data_mut().context = None;
                assert_eq!(answer.as_ref().map(Option::as_deref), Ok(Some("eu")));
                black_box(answer)
            })
        });
    }

    let runtime = PluginRuntime::new(Limits::default(), Compiler::InProcess).expect("engine");
    let bytes = std::fs::read(plugin("allow-list")).expect("plugin");
    let mut plugins = flaghost::plugins::PluginSet::default();
    plugins.insert(runtime.load("allow-list", &bytes).expect("loads"));
    let rule = plugins
        .bind(FLAG, &variants(), "allow-list", &rule_config())
        .expect("binds");
    assert_eq!(rule.evaluate(&context), Ok(Some("eu")));
    group.bench_function("flaghost", |b| {
        b.iter(|| black_box(rule.evaluate(black_box(&context))))
    });
    // The same call as an HTTP handler makes it: handed to the plugin pool
    // in the plugin's lane, under a request budget, and awaited. The
    // difference to `flaghost` is what keeping guest code off the HTTP
    // workers costs per evaluation.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let pool = runtime.pool().clone();
    let budget = runtime.limits().request_budget();
    let rule = std::sync::Arc::new(rule);
    group.bench_function("flaghost via the plugin pool", |b| {
        b.to_async(&rt).iter(|| {
            let (rule, context) = (rule.clone(), context.clone());
            let pool = pool.clone();
            async move {
                // NB: the answer crosses back as the server's does, without
                // borrows.
                let job = move || {
                    flaghost::plugins::Budget::new(budget)
                        .run(|| rule.evaluate(&context).map(|v| v.map(str::to_owned)))
                };
                black_box(pool.run("allow-list", job).await.expect("runs"))
            }
        })
    });
    group.finish();
}

/// How a raw engine for the isolation candidates allocates instances.
#[derive(Clone, Copy)]
enum Alloc {
    /// wasmtime's default: `mmap` per instance.
    OnDemand,
    /// The pooling allocator as flaghost sizes it, with `keep` bytes of each
    /// memory (and table) kept resident and reset with `memset` instead of
    /// `madvise`, and `PAGEMAP_SCAN` to find the dirty pages if `scan`.
    Pooling { keep: usize, scan: bool },
}

/// An engine configured as flaghost's (component model, epoch interruption,
/// no async support, 512 KiB wasm stack) with `alloc`, and the allow-list's
/// `InstancePre` on it.
fn candidate(alloc: Alloc) -> (Engine, bindings::TargetingRulePre<State>) {
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(true)
        .concurrency_support(false)
        .max_wasm_stack(512 << 10);
    if let Alloc::Pooling { keep, scan } = alloc {
        let mut pooling = wasmtime::PoolingAllocationConfig::default();
        pooling
            .total_component_instances(64)
            .total_core_instances(64 * 48)
            .total_memories(64 * 4)
            .total_tables(64 * 48)
            .max_core_instances_per_component(48)
            .max_memories_per_component(4)
            .max_tables_per_component(48)
            .max_memories_per_module(4)
            .max_tables_per_module(48)
            .max_memory_size(32 << 20)
            .linear_memory_keep_resident(keep)
            .table_keep_resident(keep.min(64 << 10))
            .pagemap_scan(if scan {
                wasmtime::Enabled::Yes
            } else {
                wasmtime::Enabled::No
            });
        config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pooling));
    }
    let engine = Engine::new(&config).expect("engine");
    let (component, linker) = linked(&engine);
    let pre = linker.instantiate_pre(&component).expect("pre");
    (
        engine,
        bindings::TargetingRulePre::new(pre).expect("the contract"),
    )
}

/// One plugin evaluation on a fresh instance: instantiate, parse the rule's
/// configuration (`create`), evaluate, drop the store (which gives the slot
/// back and resets its memory).
fn fresh_evaluation(
    engine: &Engine,
    pre: &bindings::TargetingRulePre<State>,
    context: &EvaluationContext,
    config: &str,
) -> Option<String> {
    let mut store = Store::new(engine, State { context: None });
    store.set_epoch_deadline(u64::MAX / 2);
    let rule = pre.instantiate(&mut store).expect("instantiates");
    let targeting = rule.flaghost_rules_rule().targeting();
    let handle = targeting
        .call_create(&mut store, FLAG, &variants(), config)
        .expect("runs")
        .expect("accepts its configuration");
    store.data_mut().context = Some(context.clone());
    targeting
        .call_evaluate(&mut store, handle)
        .expect("runs")
        .expect("answers")
}

/// What each way of keeping callers apart costs per plugin evaluation, on
/// the allow-list rule, side by side. flaghost's own modes are measured
/// through `PluginRule::evaluate` (limits, guard, counters included); the
/// mechanisms behind them, with plain wasmtime on flaghost's engine
/// settings, so the allocator's share shows.
fn isolation(c: &mut Criterion) {
    let context = typical_context();
    let config = rule_config().to_string();
    let mut group = c.benchmark_group("isolation/allow-list");

    // NB: SANDBOX_GUESTS (comma-separated component paths) adds other
    // builds of the same rule (`attribute`/`values`/`variant`), e.g. a
    // componentize-py or componentize-js one, measured the same two ways.
    let guests = std::env::var("SANDBOX_GUESTS").unwrap_or_default();
    let mut components = vec![plugin("allow-list")];
    components.extend(
        guests
            .split(',')
            .filter(|p| !p.is_empty())
            .map(std::path::PathBuf::from),
    );
    for path in components {
        let bytes = std::fs::read(&path).expect("component");
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("guest");
        for isolation in [
            flaghost::plugins::Isolation::Reuse,
            flaghost::plugins::Isolation::Fresh,
        ] {
            // NB: a JavaScript runtime's memory is past the 32 MiB default cap.
            let memory_bytes = if stem == "allow-list" {
                Limits::default().memory_bytes
            } else {
                256 << 20
            };
            let limits = Limits {
                isolation,
                memory_bytes,
                ..Limits::default()
            };
            let runtime = PluginRuntime::new(limits, Compiler::InProcess).expect("engine");
            let mut plugins = flaghost::plugins::PluginSet::default();
            plugins.insert(runtime.load("rule", &bytes).expect("loads"));
            let rule = plugins
                .bind(FLAG, &variants(), "rule", &rule_config())
                .expect("binds");
            assert_eq!(rule.evaluate(&context), Ok(Some("eu")));
            let name = match stem {
                "allow-list" => format!("flaghost {isolation}"),
                other => format!("flaghost {isolation}, {other}"),
            };
            group.bench_function(name, |b| {
                b.iter(|| {
                    let answer = rule.evaluate(black_box(&context));
                    // NB: a failed call (a deadline, a quarantine) is fast:
                    // timing one would flatter the mode.
                    assert_eq!(answer.as_ref().map(Option::as_deref), Ok(Some("eu")));
                    black_box(answer)
                })
            });
        }
    }

    // Reuse: one warm instance, the rule created once.
    {
        let (engine, pre) = candidate(Alloc::Pooling {
            keep: 0,
            scan: false,
        });
        let mut store = Store::new(&engine, State { context: None });
        store.set_epoch_deadline(u64::MAX / 2);
        let rule = pre.instantiate(&mut store).expect("instantiates");
        let targeting = rule.flaghost_rules_rule().targeting();
        let handle = targeting
            .call_create(&mut store, FLAG, &variants(), &config)
            .expect("runs")
            .expect("accepts");
        group.bench_function("wasmtime reuse", |b| {
            b.iter(|| {
                store.data_mut().context = Some(context.clone());
                let answer = targeting.call_evaluate(&mut store, handle).expect("runs");
                store.data_mut().context = None;
                black_box(answer)
            })
        });
    }

    let allocators = [
        ("on-demand", Alloc::OnDemand),
        (
            "pooling",
            Alloc::Pooling {
                keep: 0,
                scan: false,
            },
        ),
        (
            "pooling keep 1 MiB",
            Alloc::Pooling {
                keep: 1 << 20,
                scan: false,
            },
        ),
        (
            "pooling keep 4 MiB",
            Alloc::Pooling {
                keep: 4 << 20,
                scan: false,
            },
        ),
        (
            "pooling keep 1 MiB pagemap",
            Alloc::Pooling {
                keep: 1 << 20,
                scan: true,
            },
        ),
        (
            "pooling keep 32 MiB pagemap",
            Alloc::Pooling {
                keep: 32 << 20,
                scan: true,
            },
        ),
        (
            "pooling keep 4 MiB pagemap",
            Alloc::Pooling {
                keep: 4 << 20,
                scan: true,
            },
        ),
    ];
    for (name, alloc) in allocators {
        let (engine, pre) = candidate(alloc);
        assert_eq!(
            fresh_evaluation(&engine, &pre, &context, &config).as_deref(),
            Some("eu")
        );
        group.bench_function(format!("wasmtime fresh, {name}"), |b| {
            b.iter(|| black_box(fresh_evaluation(&engine, &pre, &context, &config)))
        });
    }

    // What a snapshot taken after `create` (wizer) could save at most: the
    // instance without the configuration parsed, against the whole fresh
    // evaluation above.
    let (engine, pre) = candidate(Alloc::Pooling {
        keep: 4 << 20,
        scan: true,
    });
    group.bench_function(
        "wasmtime instantiate only, pooling keep 4 MiB pagemap",
        |b| {
            b.iter(|| {
                let mut store = Store::new(&engine, State { context: None });
                store.set_epoch_deadline(u64::MAX / 2);
                black_box(pre.instantiate(&mut store).expect("instantiates"));
            })
        },
    );

    // One instance per request, shared by its plugin flags (5, as the bulk
    // mix has): the per-request figure divided by 5 is the per-evaluation cost.
    group.bench_function(
        "wasmtime per request of 5 flags, pooling keep 4 MiB pagemap",
        |b| {
            b.iter(|| {
                let mut store = Store::new(&engine, State { context: None });
                store.set_epoch_deadline(u64::MAX / 2);
                let rule = pre.instantiate(&mut store).expect("instantiates");
                let targeting = rule.flaghost_rules_rule().targeting();
                store.data_mut().context = Some(context.clone());
                for _ in 0..5 {
                    let handle = targeting
                        .call_create(&mut store, FLAG, &variants(), &config)
                        .expect("runs")
                        .expect("accepts");
                    let answer = targeting.call_evaluate(&mut store, handle).expect("runs");
                    assert_eq!(answer.as_ref().map(Option::as_deref), Ok(Some("eu")));
                }
            })
        },
    );
    group.finish();
}

/// The allow-list in three languages: see the module's documentation.
fn languages(c: &mut Criterion) {
    use flaghost::plugins::Isolation;
    use std::time::{Duration, Instant};

    let context = typical_context();
    let mut group = c.benchmark_group("languages/allow-list");
    for (language, path) in [
        ("rust", plugin("allow-list")),
        ("python", language_plugin("allow-list-py")),
        ("javascript", language_plugin("allow-list-js")),
    ] {
        if !path.exists() {
            eprintln!(
                "languages/allow-list/{language}: skipped, not built (run plugins/toolchains.sh)"
            );
            continue;
        }
        let bytes = std::fs::read(&path).expect("plugin");
        let cache = tempfile::tempdir().expect("cache dir");
        let key =
            flaghost::signing::SigningKey::load_or_create(&cache.path().join("key")).expect("key");
        let limits = |isolation| Limits {
            isolation,
            deadline: Duration::from_secs(1),
            ..Limits::default()
        };
        let runtime = |isolation| {
            PluginRuntime::new(limits(isolation), Compiler::InProcess)
                .expect("engine")
                .cache_compiled_in(&cache.path().join("compiled"), key.clone())
                .expect("cache")
        };
        let started = Instant::now();
        let compiled = runtime(Isolation::Reuse)
            .load("rule", &bytes)
            .expect("compiles");
        let compile = started.elapsed();
        drop(compiled);
        // Start-up: a fresh instance and a configuration check, as every
        // flag that uses the plugin gets at load.
        let mut start_ups = Vec::new();
        let mut precompiled = Duration::ZERO;
        for isolation in [Isolation::Reuse, Isolation::Fresh] {
            let started = Instant::now();
            let loaded = runtime(isolation).load("rule", &bytes).expect("loads");
            precompiled = started.elapsed();
            for _ in 0..40 {
                let started = Instant::now();
                loaded
                    .check_config(FLAG, &variants(), &rule_config().to_string())
                    .expect("accepts");
                start_ups.push(started.elapsed());
            }
            let mut plugins = flaghost::plugins::PluginSet::default();
            plugins.insert(loaded.clone());
            let rule = plugins
                .bind(FLAG, &variants(), "rule", &rule_config())
                .expect("binds");
            assert_eq!(rule.evaluate(&context), Ok(Some("eu")), "{language}");
            group.bench_function(format!("{language}, {isolation}"), |b| {
                b.iter(|| black_box(rule.evaluate(black_box(&context))))
            });
            eprintln!(
                "languages/allow-list/{language}: {} bytes; memory per instance {:.1} MiB",
                bytes.len(),
                loaded.stats().peak_instance_bytes as f64 / (1 << 20) as f64
            );
        }
        start_ups.sort();
        let at = |q: f64| start_ups[((start_ups.len() - 1) as f64 * q) as usize];
        eprintln!(
            "languages/allow-list/{language}: first load (compile) {compile:.2?}, precompiled load {precompiled:.2?}; \
             start-up (instance + configuration check) p50 {:.2?}, p99 {:.2?}",
            at(0.5),
            at(0.99)
        );
    }
    group.finish();
}

criterion_group!(benches, sandbox, isolation, languages);
criterion_main!(benches);
