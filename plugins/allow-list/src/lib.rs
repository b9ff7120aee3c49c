//! Attribute allow-list: serves `variant` when a context attribute is one of
//! the configured values, and `otherwise` (or the flag's default) when not.
//!
//! Configuration: `{"attribute": "country", "values": ["NL", "DE"], "variant": "on", "otherwise": "off"}`.
//! `attribute` may be a dotted path into nested objects (`user.address.country`);
//! `values` may hold strings, numbers and booleans, compared by type (`1` does
//! not match `"1"`). `otherwise` is optional.

use flaghost_rule::Rule;
use flaghost_rule::context::{self, Value};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    attribute: String,
    values: Vec<serde_json::Value>,
    variant: String,
    otherwise: Option<String>,
}

/// One allowed value, in the shape the context import answers.
#[derive(PartialEq)]
enum Allowed {
    Text(String),
    Integer(i64),
    Float(f64),
    Boolean(bool),
}

struct AllowList {
    attribute: String,
    values: Vec<Allowed>,
    variant: String,
    otherwise: Option<String>,
}

fn parse(variants: &[String], config: &str) -> Result<AllowList, String> {
    let config: Config =
        serde_json::from_str(config).map_err(|e| format!("invalid configuration: {e}"))?;
    if config.attribute.is_empty() {
        return Err("attribute must not be empty".into());
    }
    for name in std::iter::once(&config.variant).chain(config.otherwise.as_ref()) {
        if !variants.contains(name) {
            return Err(format!(
                "variant {name:?} is not one of the flag's variants {variants:?}"
            ));
        }
    }
    let values = config
        .values
        .into_iter()
        .map(|v| match v {
            serde_json::Value::String(s) => Ok(Allowed::Text(s)),
            serde_json::Value::Bool(b) => Ok(Allowed::Boolean(b)),
            serde_json::Value::Number(n) => Ok(n
                .as_i64()
                .map(Allowed::Integer)
                .unwrap_or_else(|| Allowed::Float(n.as_f64().unwrap_or(f64::NAN)))),
            other => Err(format!(
                "values may hold strings, numbers and booleans, not {other}"
            )),
        })
        .collect::<Result<_, _>>()?;
    Ok(AllowList {
        attribute: config.attribute,
        values,
        variant: config.variant,
        otherwise: config.otherwise,
    })
}

impl AllowList {
    fn allows(&self, value: Value) -> bool {
        let value = match value {
            Value::Text(s) => Allowed::Text(s),
            Value::Integer(i) => Allowed::Integer(i),
            Value::Float(f) => Allowed::Float(f),
            Value::Boolean(b) => Allowed::Boolean(b),
            Value::Null | Value::Json(_) => return false,
        };
        self.values.contains(&value)
    }
}

impl Rule for AllowList {
    fn parse(_flag_key: &str, variants: &[String], config: &str) -> Result<Self, String> {
        parse(variants, config)
    }

    fn evaluate(&self) -> Result<Option<String>, String> {
        let allowed = context::get(&self.attribute).is_some_and(|v| self.allows(v));
        if allowed {
            Ok(Some(self.variant.clone()))
        } else {
            Ok(self.otherwise.clone())
        }
    }
}

flaghost_rule::export_rule!(AllowList);
