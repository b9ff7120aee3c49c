//! How the evaluation context should cross into a guest: three candidates,
//! each making the same decision from three of nine attributes, on one reused
//! instance. The result picked the contract's design (see wit/rules.wit).
//!
//! - `typed`: the whole context as `list<record {key, value}>`;
//! - `json`: the whole context as one JSON text, parsed in the guest;
//! - `import`: nothing passed; the guest calls `get(key)` three times.
//!
//! The host-side preparation of `typed` and `json` (building the records,
//! serialising the JSON) is done once outside the timed loop, which favours
//! them: in flaghost it would be paid per call.
//!
//! `cargo bench -p flaghost-benches --bench context_crossing`

// criterion_group!/criterion_main! generate undocumented items.
#![allow(missing_docs)]

use ::flaghost::evaluation::EvaluationContext;
use criterion::{Criterion, criterion_group, criterion_main};
use flaghost_benches::typical_context;
use flaghost_tests::fixture;
use serde_json::Value as Json;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, Store};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../plugins/fixtures/context-crossing/wit",
        world: "crossing",
    });
}

use bindings::Crossing;
use bindings::exports::flaghost::crossing_bench::candidates::Attribute;
use bindings::flaghost::crossing_bench::context::{self as wit_context, Host, Value};

struct State {
    context: EvaluationContext,
}

fn to_value(v: &Json) -> Value {
    match v {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Boolean(*b),
        Json::Number(n) => n
            .as_i64()
            .map(Value::Integer)
            .unwrap_or(Value::Float(n.as_f64().unwrap_or(0.0))),
        Json::String(s) => Value::Text(s.clone()),
        other => Value::Json(other.to_string()),
    }
}

impl Host for State {
    fn get(&mut self, path: String) -> Option<Value> {
        self.context.get(&path).map(to_value)
    }
}

fn crossing(c: &mut Criterion) {
    let mut config = Config::new();
    config.epoch_interruption(true).concurrency_support(false);
    let engine = Engine::new(&config).expect("engine");
    let bytes = std::fs::read(fixture("context-crossing")).expect("fixture");
    let component = Component::from_binary(&engine, &bytes).expect("compiles");
    let mut linker: Linker<State> = Linker::new(&engine);
    wit_context::add_to_linker::<_, HasSelf<State>>(&mut linker, |s| s).expect("link");
    linker
        .define_unknown_imports_as_traps(&component)
        .expect("stubs");
    let context = typical_context();
    let mut store = Store::new(
        &engine,
        State {
            context: context.clone(),
        },
    );
    store.set_epoch_deadline(u64::MAX / 2);
    let bindings = Crossing::instantiate(&mut store, &component, &linker).expect("instantiates");
    let candidates = bindings.flaghost_crossing_bench_candidates();

    let attributes: Vec<Attribute> = context
        .attributes()
        .iter()
        .map(|(k, v)| Attribute {
            key: k.clone(),
            value: to_value(v),
        })
        .collect();
    let json = serde_json::to_string(context.attributes()).expect("json");
    let expected = Some("match".to_owned());
    assert_eq!(
        candidates
            .call_typed(&mut store, &attributes)
            .expect("call"),
        expected
    );
    assert_eq!(
        candidates.call_json(&mut store, &json).expect("call"),
        expected
    );
    assert_eq!(
        candidates.call_imported(&mut store).expect("call"),
        expected
    );

    let mut group = c.benchmark_group("context_crossing");
    group.bench_function("typed", |b| {
        b.iter(|| {
            candidates
                .call_typed(&mut store, &attributes)
                .expect("call")
        })
    });
    group.bench_function("json", |b| {
        b.iter(|| candidates.call_json(&mut store, &json).expect("call"))
    });
    group.bench_function("import", |b| {
        b.iter(|| candidates.call_imported(&mut store).expect("call"))
    });
    group.finish();
}

criterion_group!(benches, crossing);
criterion_main!(benches);
