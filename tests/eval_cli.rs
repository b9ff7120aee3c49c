//! `flaghost eval`, the real binary: every example flag evaluated without a
//! server answers as flaghost serving the same files over HTTP does, with an
//! explanation, and exit codes that tell success, an evaluation error and a
//! load error apart.

use std::process::{Command, Output};

use flaghost_tests::{
    Flaghost, answer_limits, build_plugins, examples_config, flaghost_binary, root,
};
use serde_json::{Value, json};

/// `flaghost eval` over the examples with `args`.
fn eval(args: &[&str]) -> Output {
    build_plugins();
    Command::new(flaghost_binary())
        .arg("eval")
        .arg("--flags")
        .arg(root().join("examples/flags"))
        .arg("--plugins")
        .arg(root().join("target/plugins"))
        .args(["--plugin-deadline-ms", "2000"])
        .args(args)
        .output()
        .expect("flaghost eval runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The contexts every example flag is evaluated with.
fn contexts() -> Vec<Value> {
    vec![
        json!({"targetingKey": "user-1", "country": "NL", "account": {"tier": "beta"}, "appVersion": "5.2.0"}),
        json!({"targetingKey": "user-2", "country": "US", "account": {"tier": "free"}, "appVersion": "4.9.9"}),
        json!({"targetingKey": "user-3", "country": "BE", "email": "x@example.com"}),
        json!({}),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_flag_answers_as_over_http() {
    let served = Flaghost::start(&examples_config(answer_limits()))
        .await
        .expect("flaghost serves the examples");
    for environment in ["production", "staging"] {
        for context in contexts() {
            let output = eval(&[
                "--environment",
                environment,
                "--all",
                "--context",
                &context.to_string(),
            ]);
            let stdout = text(&output.stdout);
            let stderr = text(&output.stderr);
            assert_eq!(
                output.status.code(),
                Some(0),
                "{environment} {context}: {stdout}{stderr}"
            );
            let answers: Vec<Value> = stdout
                .lines()
                .map(|l| serde_json::from_str(l).expect("one JSON answer per line"))
                .collect();
            let file: Value = serde_json::from_slice(
                &std::fs::read(root().join(format!("examples/flags/{environment}.json")))
                    .expect("the example file"),
            )
            .expect("JSON");
            let keys = file["flags"].as_object().expect("flags").len();
            assert_eq!(answers.len(), keys, "every flag of {environment}: {stdout}");
            for answer in answers {
                let key = answer["key"].as_str().expect("key");
                let (_, http) = served
                    .evaluate_in(Some(environment), key, context.clone())
                    .await;
                for field in ["value", "variant", "reason", "errorCode", "metadata"] {
                    assert_eq!(
                        answer.get(field),
                        http.get(field),
                        "{environment} {key} {context} {field}: eval {answer} vs HTTP {http}"
                    );
                }
                assert!(
                    stderr.contains(&format!("{key}:")),
                    "explains {key}: {stderr}"
                );
            }
        }
    }
    served.stop().await.expect("stops");
}

#[test]
fn a_json_logic_flag_is_explained_step_by_step() {
    let context = json!({"targetingKey": "user-1", "appVersion": "5.2.0"});
    let output = eval(&["new-app-ui", "--context", &context.to_string()]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let answer: Value = serde_json::from_slice(&output.stdout).expect("the answer");
    assert_eq!(answer["reason"], "TARGETING_MATCH", "{answer}");
    // The `if` condition held (version 5.2.0 >= 5.0.0), so fractional decided.
    assert!(
        stderr.contains("the targeting rule answered variant"),
        "{stderr}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l
                .contains("{\"sem_ver\": [{\"var\": \"appVersion\"}, \">=\", \"5.0.0\"]} => true")),
        "{stderr}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("{\"fractional\":")
                && l.ends_with(&format!("=> {}", answer["variant"]))),
        "{stderr}"
    );

    // Below 5.0.0 the condition is false and nothing is served.
    let output = eval(&[
        "new-app-ui",
        "--context",
        r#"{"targetingKey": "u", "appVersion": "4.0.0"}"#,
    ]);
    let stderr = text(&output.stderr);
    assert!(stderr.contains("=> false"), "{stderr}");
    assert!(
        stderr.contains("no variant: the default \"v1\" is served"),
        "{stderr}"
    );
}

#[test]
fn a_plugin_flag_says_which_plugin_answered_what_at_what_cost() {
    let output = eval(&["new-checkout", "--context", r#"{"targetingKey": "user-1"}"#]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let answer: Value = serde_json::from_slice(&output.stdout).expect("the answer");
    let line = stderr
        .lines()
        .find(|l| l.contains("plugin percentage-rollout answered"))
        .unwrap_or_else(|| panic!("names the plugin: {stderr}"));
    assert!(line.contains(&format!("{}", answer["variant"])), "{line}");
    assert!(line.contains(" µs"), "its cost: {line}");

    // A plugin inside a JsonLogic rule is a step of its own.
    let output = eval(&[
        "eu-express-delivery",
        "--context",
        r#"{"targetingKey": "u", "country": "NL"}"#,
    ]);
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("{\"plugin\": \"allow-list\"} => \"on\""),
        "{stderr}"
    );
}

#[test]
fn exit_codes_tell_an_evaluation_error_from_a_load_error() {
    let output = eval(&["no-such-flag"]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    let answer: Value = serde_json::from_slice(&output.stdout).expect("the answer");
    assert_eq!(answer["errorCode"], "FLAG_NOT_FOUND");

    let output = eval(&["new-checkout", "--context", "[1, 2]"]);
    assert_eq!(output.status.code(), Some(3));
    assert!(
        text(&output.stderr).contains("JSON object"),
        "{}",
        text(&output.stderr)
    );

    let output = eval(&["new-checkout", "--environment", "nowhere"]);
    assert_eq!(output.status.code(), Some(3));
    assert!(
        text(&output.stderr).contains("nowhere"),
        "{}",
        text(&output.stderr)
    );

    let bad = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        bad.path().join("production.json"),
        "{\"flags\": {\"x\": 1}}",
    )
    .expect("write");
    let output = Command::new(flaghost_binary())
        .args(["eval", "x", "--flags"])
        .arg(bad.path())
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(3), "{}", text(&output.stderr));
    assert!(
        text(&output.stderr).contains("production.json"),
        "{}",
        text(&output.stderr)
    );
}
