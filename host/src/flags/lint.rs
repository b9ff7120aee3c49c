//! What a flag file says that flaghost (like flagd) loads but does not serve
//! as written: duplicate keys (JSON parsers keep the last one), numbers that
//! cannot be represented exactly, and `fractional` weights that are not
//! non-negative integers. `serve` logs them at load; `validate` exits 1 on
//! them (unless `--allow-warnings`).
//!
//! Duplicate keys and inexact integers are gone once the file is a
//! `serde_json::Value`, so they are found by a second, streaming pass over
//! the bytes; weights are checked on the parsed document.

use std::collections::HashSet;
use std::fmt;

use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::Value as Json;

use super::Problem;

/// Integers above this (2^53) are not all representable as `f64`.
const EXACT_INTEGERS: f64 = 9_007_199_254_740_992.0;

/// Everything in `bytes` (a flag file that parsed) loaded otherwise than
/// written, each with its flag when it is inside one.
pub fn lint(bytes: &[u8], doc: &Json) -> Vec<Problem> {
    let mut found = Found::default();
    let mut path = Vec::new();
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    // NB: the file already parsed; an error here (none expected) only ends
    // the pass early.
    let _ = Walk {
        found: &mut found,
        path: &mut path,
    }
    .deserialize(&mut deserializer);
    weights(doc, &mut path, &mut found);
    let Found { mut problems, more } = found;
    if more > 0 {
        problems.push(Problem::new(
            None,
            format!("and {more} more of the same kinds"),
        ));
    }
    problems
}

/// Warnings listed per file; past them, a count.
const MAX_LINTS: usize = 100;

/// The warnings so far: the first [`MAX_LINTS`], and how many more.
///
/// NB: past the cap a warning is only counted, never formatted, so a file
/// of nothing but duplicate keys costs no memory per key.
#[derive(Default)]
struct Found {
    problems: Vec<Problem>,
    more: usize,
}

impl Found {
    /// Adds the warning at `path` (and `key` in it), `reason` made only if
    /// it is kept.
    fn add(&mut self, path: &[String], key: Option<&str>, reason: impl FnOnce() -> String) {
        if self.problems.len() >= MAX_LINTS {
            self.more += 1;
            return;
        }
        let (flag, place) = locate(path, key);
        self.problems.push(Problem::new(
            flag.as_deref(),
            format!("{place}: {}", reason()),
        ));
    }
}

/// The flag `path` is inside, and where in the file it is.
fn locate(path: &[String], key: Option<&str>) -> (Option<String>, String) {
    let mut at: Vec<&str> = path.iter().map(String::as_str).collect();
    at.extend(key);
    let flag = match at.as_slice() {
        ["flags", flag, ..] => Some((*flag).to_owned()),
        _ => None,
    };
    let place = match at.as_slice() {
        ["flags", _, rest @ ..] if !rest.is_empty() => rest.join("."),
        ["flags", _] => "the flag key".to_owned(),
        _ => at.join("."),
    };
    (flag, place)
}

/// A streaming pass over one JSON value, `path` the keys leading to it.
struct Walk<'a> {
    found: &'a mut Found,
    path: &'a mut Vec<String>,
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Walk { found, path } = self;
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                found.add(path, Some(&key), || {
                    "the key appears more than once; only the last one counts".into()
                });
            }
            path.push(key);
            map.next_value_seed(Walk {
                found: &mut *found,
                path: &mut *path,
            })?;
            path.pop();
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Walk { found, path } = self;
        let mut i = 0usize;
        loop {
            path.push(i.to_string());
            let more = seq.next_element_seed(Walk {
                found: &mut *found,
                path: &mut *path,
            })?;
            path.pop();
            if more.is_none() {
                return Ok(());
            }
            i += 1;
        }
    }

    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        // NB: serde_json hands integers past i64/u64 over as f64 too.
        if v.fract() == 0.0 && v.abs() > EXACT_INTEGERS {
            self.found.add(self.path, None, || {
                format!(
                    "the number is past ±2^53 and is not represented exactly: it is served as {}",
                    Json::from(v)
                )
            });
        }
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

/// `fractional` buckets whose weight is not a non-negative integer.
fn weights(value: &Json, path: &mut Vec<String>, found: &mut Found) {
    match value {
        Json::Object(map) => {
            if let Some(Json::Array(args)) = map.get("fractional") {
                for (i, bucket) in args.iter().enumerate() {
                    let Json::Array(bucket) = bucket else {
                        continue;
                    };
                    let (Some(Json::String(variant)), Some(weight)) =
                        (bucket.first(), bucket.get(1))
                    else {
                        continue;
                    };
                    let whole = weight
                        .as_f64()
                        .is_some_and(|w| w >= 0.0 && w.fract() == 0.0 && w <= i64::MAX as f64);
                    if !whole {
                        path.extend(["fractional".to_owned(), i.to_string()]);
                        found.add(path, None, || {
                            format!(
                                "the weight {weight} of {variant:?} is not a non-negative integer"
                            )
                        });
                        path.truncate(path.len() - 2);
                    }
                }
            }
            for (key, inner) in map {
                path.push(key.clone());
                weights(inner, path, found);
                path.pop();
            }
        }
        Json::Array(items) => {
            for (i, inner) in items.iter().enumerate() {
                path.push(i.to_string());
                weights(inner, path, found);
                path.pop();
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lint_text(text: &str) -> Vec<String> {
        let doc: Json = serde_json::from_str(text).expect("JSON");
        lint(text.as_bytes(), &doc)
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn duplicate_flag_keys_and_variant_names_are_named() {
        let found = lint_text(
            r#"{"flags": {
                "a": {"state": "ENABLED", "variants": {"on": 1, "on": 2}, "defaultVariant": "on"},
                "a": {"state": "ENABLED", "variants": {"x": 1}, "defaultVariant": "x"}}}"#,
        );
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found
                .iter()
                .any(|p| p.contains("variants.on") && p.contains("more than once")),
            "{found:?}"
        );
        assert!(
            found
                .iter()
                .any(|p| p.contains("the flag key") && p.contains("\"a\"")),
            "{found:?}"
        );
    }

    #[test]
    fn integers_that_lose_precision_are_named_and_exact_ones_are_not() {
        let found = lint_text(
            r#"{"flags": {"big": {"state": "ENABLED", "defaultVariant": "a",
                "variants": {"a": 123456789012345678901234567890, "b": 9007199254740992,
                             "c": 18446744073709551615, "d": 0.5, "e": -42}}}}"#,
        );
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].contains("variants.a") && found[0].contains("2^53"),
            "{found:?}"
        );
    }

    #[test]
    fn a_file_of_many_warnings_lists_the_first_hundred_and_a_count() {
        let text = format!(
            "{{\"flags\": {{}}, \"x\": {{{}}}}}",
            (0..1000).map(|_| "\"k\": 1").collect::<Vec<_>>().join(",")
        );
        let found = lint_text(&text);
        assert_eq!(found.len(), MAX_LINTS + 1);
        assert!(
            found[MAX_LINTS].contains("899 more"),
            "{}",
            found[MAX_LINTS]
        );
    }

    #[test]
    fn fractional_weights_that_are_not_non_negative_integers_are_named() {
        let found = lint_text(
            r#"{"$evaluators": {"split": {"fractional": [["x", 1e300], ["y", 50]]}},
                "flags": {"f": {"state": "ENABLED", "variants": {"x": 1, "y": 2}, "defaultVariant": "x",
                "targeting": {"fractional": [{"var": "k"}, ["x", 0.5], ["y", "50"], ["z", -1], ["w", 10], ["v"]]}}}}"#,
        );
        let weights: Vec<&String> = found.iter().filter(|p| p.contains("weight")).collect();
        assert_eq!(weights.len(), 4, "{found:?}");
        assert!(
            weights.iter().any(|p| p.contains("$evaluators.split")),
            "{found:?}"
        );
        assert!(weights.iter().any(|p| p.contains("\"50\"")), "{found:?}");
    }
}
