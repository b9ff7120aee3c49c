//! The evaluation context a caller sends: a targeting key and attributes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Map, Value as Json};

/// An evaluation context, cheap to clone (shared by `Arc`), so a plugin call
/// can hold it for the duration of a call without copying it.
#[derive(Debug, Clone)]
pub struct EvaluationContext(Arc<Inner>);

impl Default for EvaluationContext {
    /// An empty context, with an id of its own like any other (a shared id
    /// would let a thread's conversion of one outlive its request).
    fn default() -> Self {
        Self::new(None, Map::new())
    }
}

#[derive(Debug)]
struct Inner {
    /// Unique among the contexts of this process, so a conversion of it can
    /// be kept for the rest of its request (see `flags::targeting`) and
    /// never mistaken for another caller's.
    id: u64,
    targeting_key: Option<String>,
    /// Every attribute the caller sent, `targetingKey` included.
    attributes: Map<String, Json>,
    /// Unix seconds of the evaluation, read the first time it is asked.
    timestamp: std::sync::OnceLock<i64>,
}

/// A context of the wrong shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    /// `targetingKey` was present but not a string.
    #[error("\"targetingKey\" must be a string, not {0}")]
    TargetingKeyNotString(String),
}

impl EvaluationContext {
    /// A context from the attributes a caller sent (OFREP's `context` object).
    pub fn from_attributes(attributes: Map<String, Json>) -> Result<Self, ContextError> {
        let targeting_key = match attributes.get("targetingKey") {
            None | Some(Json::Null) => None,
            Some(Json::String(key)) => Some(key.clone()),
            Some(other) => return Err(ContextError::TargetingKeyNotString(other.to_string())),
        };
        Ok(Self::new(targeting_key, attributes))
    }

    fn new(targeting_key: Option<String>, attributes: Map<String, Json>) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Self(Arc::new(Inner {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            targeting_key,
            attributes,
            timestamp: std::sync::OnceLock::new(),
        }))
    }

    /// The evaluation's time in Unix seconds (`$flagd.timestamp`, and a
    /// plugin's wall clock): read once, the first time it is asked, so every
    /// flag and plugin of a request sees the same time.
    pub fn timestamp(&self) -> i64 {
        *self.0.timestamp.get_or_init(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
                .unwrap_or(0)
        })
    }

    /// This context's id: the same for its clones, another for any other
    /// context made in this process.
    pub fn id(&self) -> u64 {
        self.0.id
    }

    /// The targeting key, if the caller sent one.
    pub fn targeting_key(&self) -> Option<&str> {
        self.0.targeting_key.as_deref()
    }

    /// All attributes, `targetingKey` included.
    pub fn attributes(&self) -> &Map<String, Json> {
        &self.0.attributes
    }

    /// The attribute at `path`: a top-level key first, then a dotted path into
    /// nested objects (`user.address.country`).
    pub fn get(&self, path: &str) -> Option<&Json> {
        if let Some(v) = self.0.attributes.get(path) {
            return Some(v);
        }
        let mut parts = path.split('.');
        let mut current = self.0.attributes.get(parts.next()?)?;
        for part in parts {
            current = match current {
                Json::Object(map) => map.get(part)?,
                Json::Array(items) => items.get(part.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx(v: Json) -> EvaluationContext {
        let Json::Object(map) = v else {
            panic!("test context must be an object")
        };
        EvaluationContext::from_attributes(map).expect("valid test context")
    }

    #[test]
    fn reads_top_level_and_nested_attributes() {
        let c = ctx(json!({"targetingKey": "u1", "country": "NL",
                            "user": {"address": {"city": "Delft"}, "tags": ["a", "b"]},
                            "dotted.key": 1}));
        assert_eq!(c.targeting_key(), Some("u1"));
        assert_eq!(c.get("country"), Some(&json!("NL")));
        assert_eq!(c.get("user.address.city"), Some(&json!("Delft")));
        assert_eq!(c.get("user.tags.1"), Some(&json!("b")));
        assert_eq!(c.get("dotted.key"), Some(&json!(1)));
        assert_eq!(c.get("user.missing"), None);
        assert_eq!(c.get("country.x"), None);
    }

    #[test]
    fn refuses_a_targeting_key_that_is_not_a_string() {
        let Json::Object(map) = json!({"targetingKey": 42}) else {
            unreachable!()
        };
        assert!(matches!(
            EvaluationContext::from_attributes(map),
            Err(ContextError::TargetingKeyNotString(_))
        ));
    }
}
