//! Shared set-up for the benches: the example flag sets, loaded as flaghost
//! serves them.

use std::sync::Arc;

use flaghost::evaluation::EvaluationContext;
use flaghost::flags::FlagSet;
use flaghost::plugins::{Compiler, Limits, PluginRuntime};
use flaghost::store::DirStore;
use flaghost_tests::{build_plugins, root};

/// The example `production` flag set, its plugins loaded under `limits`.
/// Keep the runtime alive as long as the set is used.
pub fn example_flags(limits: Limits) -> (Arc<PluginRuntime>, Arc<FlagSet>) {
    build_plugins();
    let runtime = Arc::new(PluginRuntime::new(limits, Compiler::InProcess).expect("engine"));
    let (plugins, errors) = runtime
        .load_dir(&root().join("target/plugins"))
        .expect("plugin dir");
    assert!(errors.is_empty(), "{errors:?}");
    let store = DirStore::new(root().join("examples/flags"), plugins);
    let set = store.load_sync("production").expect("examples load");
    (runtime, set)
}

/// A context of a targeting key and 9 attributes, like a typical caller's.
pub fn typical_context() -> EvaluationContext {
    let serde_json::Value::Object(attributes) = serde_json::json!({
        "targetingKey": "user-4242",
        "country": "NL",
        "plan": "pro",
        "age": 34,
        "email": "someone@example.com",
        "locale": "nl-NL",
        "appVersion": "5.2.1",
        "beta": false,
        "account": {"tier": "beta", "seats": 12},
        "score": 0.75
    }) else {
        unreachable!("a JSON object literal")
    };
    EvaluationContext::from_attributes(attributes).expect("valid context")
}
