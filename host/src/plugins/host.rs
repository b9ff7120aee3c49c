//! The host side of the contract: the `context` interface a rule imports.

use serde_json::Value as Json;

use super::bindings::v0_1::flaghost::rules::context::{Host, Value};
use super::limits::HostState;

impl Host for HostState {
    fn targeting_key(&mut self) -> Option<String> {
        let key = self.context.as_ref()?.targeting_key()?.to_owned();
        self.charge(key.len()).then_some(key)
    }

    fn get(&mut self, path: String) -> Option<Value> {
        let value = self.context.as_ref()?.get(&path).map(to_wit)?;
        let bytes = match &value {
            Value::Text(s) | Value::Json(s) => s.len(),
            _ => 8,
        };
        self.charge(bytes).then_some(value)
    }
}

/// A context value as the contract carries it: objects and arrays as JSON text.
fn to_wit(value: &Json) -> Value {
    match value {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Boolean(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::Text(s.clone()),
        Json::Array(_) | Json::Object(_) => Value::Json(value.to_string()),
    }
}
