//! Evaluation semantics: every reason and every error code, with fake rules
//! (the plugin runtime has its own tests, with real components).

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::json;

use super::*;
use crate::flags::{BindError, RuleBinder, parse_flag_file};

/// A rule that answers whatever it was built with.
struct Fixed(Result<Option<String>, RuleError>);

impl TargetingRule for Fixed {
    fn evaluate(&self, _: &EvaluationContext) -> Result<Option<&str>, RuleError> {
        self.0.as_ref().map(Option::as_deref).map_err(Clone::clone)
    }
    fn describe(&self) -> String {
        "fixed rule".into()
    }
}

/// Binds `{"plugin": ["fixed", <answer>]}`: a string answers that variant,
/// null answers none, `{"error": msg}` fails.
struct FixedBinder;

impl RuleBinder for FixedBinder {
    fn bind(
        &self,
        _flag: &str,
        _variants: &[String],
        plugin: &str,
        config: &serde_json::Value,
    ) -> Result<Arc<dyn TargetingRule>, BindError> {
        if plugin != "fixed" {
            return Err(BindError::NotLoaded {
                plugin: plugin.to_owned(),
                loaded: vec!["fixed".into()],
            });
        }
        let answer = match config {
            serde_json::Value::String(v) => Ok(Some(v.clone())),
            serde_json::Value::Null => Ok(None),
            other => Err(RuleError(other["error"].as_str().unwrap_or("?").to_owned())),
        };
        Ok(Arc::new(Fixed(answer)))
    }
}

fn flag_set() -> FlagSet {
    let file = json!({
        "metadata": {"team": "core", "version": "1"},
        "flags": {
            "static-bool": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "on",
                            "metadata": {"team": "web"}},
            "disabled": {"state": "DISABLED", "variants": {"on": true}, "defaultVariant": "on"},
            "no-default": {"state": "ENABLED", "variants": {"a": "A"}, "defaultVariant": null},
            "matched": {"state": "ENABLED", "variants": {"a": 1, "b": 2}, "defaultVariant": "a",
                        "targeting": {"plugin": ["fixed", "b"]}},
            "rule-default": {"state": "ENABLED", "variants": {"a": 1.5, "b": 2.5}, "defaultVariant": "a",
                             "targeting": {"plugin": ["fixed", null]}},
            "rule-default-none": {"state": "ENABLED", "variants": {"a": "x"}, "defaultVariant": null,
                                  "targeting": {"plugin": ["fixed", null]}},
            "unknown-variant": {"state": "ENABLED", "variants": {"a": "x"}, "defaultVariant": "a",
                                "targeting": {"plugin": ["fixed", "zzz"]}},
            "rule-fails": {"state": "ENABLED", "variants": {"a": "x"}, "defaultVariant": "a",
                           "targeting": {"plugin": ["fixed", {"error": "plugin x trapped"}]}},
            "unparsable": {"state": "ENABLED", "variants": {"a": "x"}, "defaultVariant": "a",
                           "targeting": {"if": [{"$ref": "missing"}, "a", null]}},
            "plugin-in-logic": {"state": "ENABLED", "variants": {"a": "x", "b": "y"}, "defaultVariant": "a",
                                "targeting": {"if": [{"==": [{"plugin": ["fixed", "b"]}, "b"]},
                                                     {"plugin": ["fixed", "b"]}, null]}},
            "plugin-fails-in-logic": {"state": "ENABLED", "variants": {"a": "x"}, "defaultVariant": "a",
                                      "targeting": {"or": [{"plugin": ["fixed", {"error": "plugin y trapped"}]}, "a"]}},
            "json-logic": {"state": "ENABLED", "variants": {"a": "x", "b": "y"}, "defaultVariant": "a",
                           "targeting": {"if": [{"==": [{"var": "tier"}, "gold"]}, "b", null]}},
            "object": {"state": "ENABLED", "variants": {"o": {"k": [1, 2]}}, "defaultVariant": "o"}
        }
    });
    parse_flag_file(
        "test.json",
        "test",
        file.to_string().as_bytes(),
        &FixedBinder,
        &crate::flags::DocumentLimits::default(),
    )
    .expect("the test file is valid")
}

/// A resolution, owned, so a test can hold it past its flag set.
#[derive(Debug)]
struct Answer {
    value: Option<Value>,
    variant: Option<String>,
    reason: Reason,
    metadata: Metadata,
}

fn eval(key: &str) -> Result<Answer, EvaluationError> {
    let set = flag_set();
    evaluate(&set, key, &EvaluationContext::default(), None).map(|r| Answer {
        value: r.value.cloned(),
        variant: r.variant.map(str::to_owned),
        reason: r.reason,
        metadata: r.metadata.clone(),
    })
}

#[test]
fn a_flag_without_a_rule_is_static() {
    let r = eval("static-bool").expect("resolves");
    assert_eq!(r.reason, Reason::Static);
    assert_eq!(r.value, Some(Value::Bool(true)));
    assert_eq!(r.variant.as_deref(), Some("on"));
}

#[test]
fn flag_metadata_is_laid_over_the_set_metadata() {
    let r = eval("static-bool").expect("resolves");
    assert_eq!(r.metadata.get("team"), Some(&json!("web")));
    assert_eq!(r.metadata.get("version"), Some(&json!("1")));
}

#[test]
fn a_disabled_flag_answers_disabled_without_a_value() {
    let r = eval("disabled").expect("resolves");
    assert_eq!(r.reason, Reason::Disabled);
    assert_eq!(r.value, None);
    assert_eq!(r.variant, None);
}

#[test]
fn a_null_default_variant_leaves_the_code_default() {
    let r = eval("no-default").expect("resolves");
    assert_eq!(r.reason, Reason::Default);
    assert_eq!((r.value, r.variant), (None, None));
}

#[test]
fn a_rule_answer_is_a_targeting_match() {
    let r = eval("matched").expect("resolves");
    assert_eq!(r.reason, Reason::TargetingMatch);
    assert_eq!(r.value, Some(Value::Integer(2)));
    assert_eq!(r.variant.as_deref(), Some("b"));
}

#[test]
fn a_rule_answering_none_serves_the_default() {
    let r = eval("rule-default").expect("resolves");
    assert_eq!(r.reason, Reason::Default);
    assert_eq!(r.value, Some(Value::Float(1.5)));
    let r = eval("rule-default-none").expect("resolves");
    assert_eq!(r.reason, Reason::Default);
    assert_eq!(r.value, None);
}

#[test]
fn an_unknown_flag_is_flag_not_found() {
    let e = eval("missing").expect_err("fails");
    assert_eq!(e.code, ErrorCode::FlagNotFound);
    assert!(e.details.contains("missing"), "{}", e.details);
}

#[test]
fn a_rule_answering_an_unknown_variant_is_general() {
    let e = eval("unknown-variant").expect_err("fails");
    assert_eq!(e.code, ErrorCode::General);
    assert!(e.details.contains("zzz"), "{}", e.details);
}

#[test]
fn a_failing_rule_is_general_with_its_message() {
    let e = eval("rule-fails").expect_err("fails");
    assert_eq!(e.code, ErrorCode::General);
    assert_eq!(e.details, "plugin x trapped");
    assert!(
        e.metadata.is_some(),
        "an existing flag's metadata comes with its error"
    );
}

#[test]
fn an_unparsable_rule_is_parse_error() {
    let e = eval("unparsable").expect_err("fails");
    assert_eq!(e.code, ErrorCode::ParseError);
    assert_eq!(flag_set().warnings.len(), 1, "and it is reported at load");
}

#[test]
fn a_json_logic_rule_targets_by_context() {
    let set = flag_set();
    let gold = {
        let serde_json::Value::Object(m) = json!({"tier": "gold"}) else {
            unreachable!()
        };
        EvaluationContext::from_attributes(m).expect("valid")
    };
    let r = evaluate(&set, "json-logic", &gold, None).expect("resolves");
    assert_eq!((r.variant, r.reason), (Some("b"), Reason::TargetingMatch));
    let r = evaluate(&set, "json-logic", &EvaluationContext::default(), None).expect("resolves");
    assert_eq!((r.variant, r.reason), (Some("a"), Reason::Default));
}

#[test]
fn a_plugin_is_one_operator_among_the_others() {
    let (value, variant, reason) = {
        let a = eval("plugin-in-logic").expect("resolves");
        (a.value, a.variant, a.reason)
    };
    assert_eq!(
        (value, variant.as_deref(), reason),
        (
            Some(Value::String("y".into())),
            Some("b"),
            Reason::TargetingMatch
        )
    );
    let e = eval("plugin-fails-in-logic").expect_err("fails");
    assert_eq!(
        (e.code, e.details.as_str()),
        (ErrorCode::General, "plugin y trapped")
    );
}

#[test]
fn asking_for_another_type_is_type_mismatch() {
    let set = flag_set();
    let ctx = EvaluationContext::default();
    let e = evaluate(&set, "static-bool", &ctx, Some(ValueType::String)).expect_err("fails");
    assert_eq!(e.code, ErrorCode::TypeMismatch);
    assert!(evaluate(&set, "static-bool", &ctx, Some(ValueType::Bool)).is_ok());
    assert!(evaluate(&set, "rule-default", &ctx, Some(ValueType::Number)).is_ok());
}

#[test]
fn objects_and_numbers_keep_their_types() {
    let r = eval("object").expect("resolves");
    let Some(Value::Object(o)) = r.value else {
        panic!("an object")
    };
    assert_eq!(o.get("k"), Some(&json!([1, 2])));
    let set = flag_set();
    let types: HashMap<&str, Option<ValueType>> = set
        .flags
        .iter()
        .map(|(k, f)| (k.as_str(), f.value_type()))
        .collect();
    assert_eq!(types["matched"], Some(ValueType::Number));
}

#[test]
fn reason_and_code_names_are_openfeature_names() {
    let reasons = [
        Reason::Static,
        Reason::TargetingMatch,
        Reason::Default,
        Reason::Disabled,
        Reason::Error,
    ];
    let names: Vec<_> = reasons.iter().map(|r| r.as_str()).collect();
    assert_eq!(
        names,
        ["STATIC", "TARGETING_MATCH", "DEFAULT", "DISABLED", "ERROR"]
    );
    let codes = [
        ErrorCode::FlagNotFound,
        ErrorCode::ParseError,
        ErrorCode::TypeMismatch,
        ErrorCode::General,
    ];
    let names: Vec<_> = codes.iter().map(|c| c.as_str()).collect();
    assert_eq!(
        names,
        ["FLAG_NOT_FOUND", "PARSE_ERROR", "TYPE_MISMATCH", "GENERAL"]
    );
}
