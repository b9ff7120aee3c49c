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
//! `cargo bench -p flaghost-benches --bench sandbox`

// criterion_group!/criterion_main! generate undocumented items.
#![allow(missing_docs)]

use std::hint::black_box;

use ::flaghost::evaluation::EvaluationContext;
use criterion::{Criterion, criterion_group, criterion_main};
use flaghost::flags::RuleBinder;
use flaghost::plugins::{Compiler, Limits, PluginRuntime};
use flaghost_benches::typical_context;
use flaghost_tests::plugin;
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

/// A warm instance of the rule on an engine configured by `epoch`, with
/// its configuration parsed.
fn unlimited(epoch: bool) -> (Store<State>, TargetingRule, ResourceAny) {
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .epoch_interruption(epoch)
        .concurrency_support(false);
    let engine = Engine::new(&config).expect("engine");
    let bytes = std::fs::read(plugin("allow-list")).expect("plugin");
    let component = Component::from_binary(&engine, &bytes).expect("compiles");
    let mut linker: Linker<State> = Linker::new(&engine);
    wit_context::add_to_linker::<_, HasSelf<State>>(&mut linker, |s| s).expect("link");
    linker
        .define_unknown_imports_as_traps(&component)
        .expect("stubs");
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
    assert_eq!(rule.evaluate(&context), Ok(Some("eu".into())));
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
                let job =
                    move || flaghost::plugins::Budget::new(budget).run(|| rule.evaluate(&context));
                black_box(pool.run("allow-list", job).await.expect("runs"))
            }
        })
    });
    group.finish();
}

criterion_group!(benches, sandbox);
criterion_main!(benches);
