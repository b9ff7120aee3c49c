//! Hostile inputs: flag files written to hurt flaghost (nesting that
//! overflowed a thread's stack once `$ref`s were followed, `$ref`s that
//! expand by 2^n) are refused flag by flag, with the reason, while the
//! rest of the file and the process keep serving. Flag files and Redis
//! entries go through the same parser, so this holds for both.

use std::time::Duration;

use flaghost_tests::{Dirs, Flaghost, answer_limits, eventually};
use serde_json::{Map, Value, json};

/// `{"!!": [{"!!": [ ... inner ... ]}]}`, `levels` deep (two JSON levels
/// each).
fn nested(levels: usize, inner: Value) -> Value {
    (0..levels).fold(inner, |rule, _| json!({"!!": [rule]}))
}

fn static_flag() -> Value {
    json!({"state": "ENABLED", "variants": {"a": "A", "b": "B"}, "defaultVariant": "a"})
}

fn rule_flag(rule: Value) -> Value {
    json!({"state": "ENABLED", "variants": {"on": true, "off": false},
           "defaultVariant": "off", "targeting": rule})
}

/// The file that killed a running flaghost when hot-reloaded (33 chained
/// evaluators of 62 `!!` levels: about 4,000 levels once resolved), and an
/// expansion bomb (evaluators that each use the next twice, 26 deep).
fn hostile_files(dirs: Dirs) -> Dirs {
    let mut deep = Map::new();
    for i in 0..33 {
        let next = if i == 32 {
            json!(true)
        } else {
            json!({"$ref": format!("e{}", i + 1)})
        };
        deep.insert(format!("e{i}"), nested(62, next));
    }
    let mut bomb = Map::new();
    for i in 0..26 {
        let next = json!({"$ref": format!("b{}", i + 1)});
        bomb.insert(format!("b{i}"), json!({"or": [next, next]}));
    }
    bomb.insert("b26".into(), json!({"==": [{"var": "country"}, "NL"]}));
    dirs.flag_file(
        "prod",
        &json!({"$evaluators": deep, "flags": {
            "ok": static_flag(), "deep": rule_flag(json!({"$ref": "e0"}))}}),
    )
    .flag_file(
        "bombed",
        &json!({"$evaluators": bomb, "flags": {
            "ok": static_flag(), "bomb": rule_flag(json!({"$ref": "b0"}))}}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_or_exploding_rules_hot_reloaded_are_refused_and_flaghost_serves_on() {
    let dirs = Dirs::new()
        .flag_file("prod", &json!({"flags": {"ok": static_flag()}}))
        .flag_file("bombed", &json!({"flags": {"ok": static_flag()}}));
    let fh = Flaghost::start(&dirs.config("prod", answer_limits()))
        .await
        .expect("starts");
    let dirs = hostile_files(dirs);

    let parse_error = |env: &'static str, key: &'static str, says: &'static str| {
        let fh = &fh;
        async move {
            let (status, body) = fh
                .evaluate_in(Some(env), key, json!({"country": "NL"}))
                .await;
            status == 400
                && body["errorCode"] == "PARSE_ERROR"
                && body["errorDetails"]
                    .as_str()
                    .is_some_and(|d| d.contains(says))
        }
    };
    assert!(
        eventually(Duration::from_secs(30), || parse_error(
            "prod",
            "deep",
            "128 levels"
        ))
        .await,
        "the deep rule is reloaded and answers PARSE_ERROR with the reason"
    );
    assert!(
        eventually(Duration::from_secs(30), || parse_error(
            "bombed", "bomb", "MiB"
        ))
        .await,
        "the bomb is reloaded and answers PARSE_ERROR with the reason"
    );
    for env in ["prod", "bombed"] {
        let (status, body) = fh.evaluate_in(Some(env), "ok", json!({})).await;
        assert_eq!((status, &body["value"]), (200, &json!("A")), "{body}");
    }
    assert_eq!(fh.get("/healthz").await.0, 200);
    drop(dirs);
    fh.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_or_exploding_rules_at_start_up_answer_parse_error_with_the_reason() {
    let dirs = hostile_files(Dirs::new());
    let fh = Flaghost::start(&dirs.config("prod", answer_limits()))
        .await
        .expect("starts: the rest of each file serves");
    let (status, body) = fh.evaluate_in(Some("prod"), "deep", json!({})).await;
    assert_eq!(
        (status, &body["errorCode"]),
        (400, &json!("PARSE_ERROR")),
        "{body}"
    );
    let (status, body) = fh.evaluate_in(Some("bombed"), "bomb", json!({})).await;
    assert_eq!(
        (status, &body["errorCode"]),
        (400, &json!("PARSE_ERROR")),
        "{body}"
    );
    let (status, _) = fh.evaluate_in(Some("bombed"), "ok", json!({})).await;
    assert_eq!(status, 200);
    fh.stop().await.expect("clean stop");
}
