//! The flagd-format parser: what it accepts, and that every refusal names the
//! flag and says what to fix.

use serde_json::json;

use super::*;
use crate::plugins::PluginSet;

fn parse(doc: Json) -> Result<FlagSet, FlagFileError> {
    parse_flag_file(
        "env.json",
        "env",
        doc.to_string().as_bytes(),
        &PluginSet::default(),
        &DocumentLimits::default(),
    )
}

fn problems(doc: Json) -> Vec<String> {
    parse(doc)
        .expect_err("refused")
        .problems
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn parses_every_value_type_and_keeps_integers_and_floats_apart() {
    let set = parse(json!({"flags": {
        "b": {"state": "ENABLED", "variants": {"on": true}, "defaultVariant": "on"},
        "s": {"state": "ENABLED", "variants": {"x": "y"}, "defaultVariant": "x"},
        "i": {"state": "ENABLED", "variants": {"one": 1}, "defaultVariant": "one"},
        "f": {"state": "ENABLED", "variants": {"zero": 0.0, "half": 0.5}, "defaultVariant": "zero"},
        "o": {"state": "DISABLED", "variants": {"o": {"a": 1}}, "defaultVariant": "o"},
        "n": {"state": "ENABLED", "variants": {"a": 1, "b": 2.5}, "defaultVariant": null},
        "t": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "a", "targeting": {}}
    }}))
    .expect("valid");
    assert_eq!(set.flags["i"].variants["one"].value, Value::Integer(1));
    assert_eq!(set.flags["f"].variants["zero"].value, Value::Float(0.0));
    assert_eq!(set.flags["o"].state, FlagState::Disabled);
    assert_eq!(set.flags["n"].default_variant, None);
    assert!(
        matches!(set.flags["t"].targeting, Targeting::None),
        "{{}} is no rule"
    );
    assert_eq!(set.digest.len(), 64);
}

#[test]
fn refuses_what_is_not_json_with_the_position() {
    let err = parse_flag_file(
        "bad.json",
        "e",
        b"{\"flags\": ",
        &PluginSet::default(),
        &DocumentLimits::default(),
    )
    .expect_err("refused");
    assert_eq!(err.file, "bad.json");
    assert!(err.to_string().contains("not valid JSON"), "{err}");
    assert!(err.to_string().contains("line 1"), "{err}");
}

#[test]
fn refuses_a_file_without_flags() {
    assert_eq!(problems(json!({"flag": {}})), ["missing \"flags\""]);
    assert!(problems(json!([])).len() == 1);
}

#[test]
fn lists_every_problem_each_with_its_flag() {
    let found = problems(json!({"flags": {
        "no-state": {"variants": {"a": 1}},
        "bad-state": {"state": "ON", "variants": {"a": 1}},
        "no-variants": {"state": "ENABLED"},
        "empty-variants": {"state": "ENABLED", "variants": {}},
        "mixed": {"state": "ENABLED", "variants": {"a": 1, "b": "x"}},
        "null-variant": {"state": "ENABLED", "variants": {"a": null}},
        "bad-default": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "b"},
        "bad-metadata": {"state": "ENABLED", "variants": {"a": 1}, "metadata": {"x": [1]}},
        "bad-targeting": {"state": "ENABLED", "variants": {"a": 1}, "targeting": "a"},
        "missing-plugin": {"state": "ENABLED", "variants": {"a": 1}, "targeting": {"plugin": ["nope", {}]}},
        "bad-plugin-args": {"state": "ENABLED", "variants": {"a": 1}, "targeting": {"plugin": "nope"}}
    }}));
    let expect = [
        ("no-state", "missing \"state\""),
        ("bad-state", "\"state\" must be"),
        ("no-variants", "missing \"variants\""),
        ("empty-variants", "at least one variant"),
        ("mixed", "share one type"),
        ("null-variant", "not a boolean, string, number or object"),
        ("bad-default", "\"b\" is not one of the variants"),
        ("bad-metadata", "metadata"),
        ("bad-targeting", "must be an object"),
        ("missing-plugin", "plugin \"nope\" is not loaded"),
        ("bad-plugin-args", "takes two arguments"),
    ];
    for (flag, what) in expect {
        assert!(
            found
                .iter()
                .any(|p| p.starts_with(&format!("flag {flag:?}")) && p.contains(what)),
            "no problem for {flag} containing {what:?} in {found:#?}"
        );
    }
    assert_eq!(found.len(), expect.len(), "{found:#?}");
}

#[test]
fn a_rule_it_cannot_evaluate_loads_with_a_warning() {
    let set = parse(json!({"flags": {
        "f": {"state": "ENABLED", "variants": {"a": 1}, "defaultVariant": "a",
              "targeting": {"if": [{"$ref": "not-defined"}, "a", null]}}
    }}))
    .expect("loads");
    assert!(matches!(set.flags["f"].targeting, Targeting::Unparsable(_)));
    assert_eq!(set.warnings.len(), 1);
    assert_eq!(set.warnings[0].flag.as_deref(), Some("f"));
}

#[test]
fn a_set_written_as_its_document_parses_back_into_the_same_flags() {
    let set = parse(json!({
        "metadata": {"team": "growth", "version": 3},
        "$evaluators": {"is_nl": {"==": [{"var": "country"}, "NL"]}},
        "flags": {
            "ratio": {"state": "ENABLED", "variants": {"one": 1.0, "half": 0.5}, "defaultVariant": "one"},
            "count": {"state": "DISABLED", "variants": {"ten": 10}, "defaultVariant": null,
                      "metadata": {"team": "search"}},
            "banner": {"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
                       "targeting": {"if": [{"$ref": "is_nl"}, "on", "off"]}},
            "broken": {"state": "ENABLED", "variants": {"a": "a"}, "defaultVariant": "a",
                       "targeting": {"if": [{"$ref": "missing"}, "a", null]}}
        }
    }))
    .expect("parses");
    let document: Json = serde_json::from_str(&set.document()).expect("JSON");
    assert_eq!(
        document["flags"]["banner"]["targeting"],
        json!({"if": [{"==": [{"var": "country"}, "NL"]}, "on", "off"]}),
        "$refs resolved"
    );
    assert_eq!(
        document["flags"]["count"]["metadata"],
        json!({"team": "search", "version": 3})
    );
    let back = parse(document).expect("parses back");
    assert_eq!(back.flags.len(), set.flags.len());
    for (key, flag) in &set.flags {
        let twin = &back.flags[key];
        assert_eq!(twin.definition.get(), flag.definition.get(), "{key}");
        assert_eq!(twin.variants, flag.variants, "{key}: 1.0 stays a float");
        assert_eq!(twin.default_variant, flag.default_variant, "{key}");
        assert_eq!(twin.state, flag.state, "{key}");
        assert_eq!(twin.metadata, flag.metadata, "{key}");
    }
    assert_eq!(
        back.warnings, set.warnings,
        "a rule that cannot evaluate stays so"
    );
}
