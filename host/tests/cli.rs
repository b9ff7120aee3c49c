//! The `flaghost` binary itself: `validate` exit codes and listings, and
//! `serve` answering, then stopping cleanly on SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

/// The example plugins, built by plugins/build.sh.
fn plugins() -> PathBuf {
    let status = Command::new("bash")
        .arg(root().join("plugins/build.sh"))
        .status()
        .expect("run plugins/build.sh");
    assert!(status.success());
    root().join("target/plugins")
}

fn flaghost() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flaghost"));
    cmd.env_remove("RUST_LOG").env("NO_COLOR", "1");
    cmd
}

/// `flaghost validate --flags <flags> <extra>`.
fn validate(flags: &Path, extra: &[&str]) -> std::process::Output {
    flaghost()
        .args(["validate", "--flags"])
        .arg(flags)
        .args(extra)
        .output()
        .expect("runs")
}

#[test]
fn validate_accepts_the_examples() {
    let out = flaghost()
        .args(["validate", "--flags"])
        .arg(root().join("examples/flags"))
        .arg("--plugins")
        .arg(plugins())
        .output()
        .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn validate_lists_every_problem_and_exits_1() {
    let dir = tempfile::tempdir().expect("tmp");
    let flags = dir.path().join("flags");
    std::fs::create_dir(&flags).expect("mkdir");
    std::fs::write(
        flags.join("a.json"),
        r#"{"flags": {"x": {"state": "ON", "variants": {"v": 1}},
        "y": {"state": "ENABLED", "variants": {"v": 1}, "targeting": {"plugin": ["ghost", {}]}}}}"#,
    )
    .expect("write");
    std::fs::write(flags.join("b.json"), "{not json").expect("write");
    let bad_plugins = dir.path().join("plugins");
    std::fs::create_dir(&bad_plugins).expect("mkdir");
    std::fs::write(bad_plugins.join("broken.wasm"), b"garbage!").expect("write");

    let out = flaghost()
        .args(["validate", "--flags"])
        .arg(&flags)
        .arg("--plugins")
        .arg(&bad_plugins)
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "plugin broken: not a WebAssembly file",
        "a.json: flag \"x\": \"state\" must be",
        "a.json: flag \"y\": plugin \"ghost\" is not loaded",
        "b.json: not valid JSON",
        "4 problem(s)",
    ] {
        assert!(said.contains(expected), "missing {expected:?} in:\n{said}");
    }
}

#[test]
fn validate_fails_on_rules_that_can_never_be_evaluated_unless_allowed() {
    let dir = tempfile::tempdir().expect("tmp");
    let flags = dir.path().join("flags");
    std::fs::create_dir(&flags).expect("mkdir");
    std::fs::write(
        flags.join("prod.json"),
        r#"{"$evaluators": {"a": {"!": {"$ref": "b"}}, "b": {"$ref": "a"}},
            "flags": {
              "cycle": {"state": "ENABLED", "variants": {"on": true, "off": false},
                        "defaultVariant": "off", "targeting": {"if": [{"$ref": "a"}, "on", "off"]}},
              "missing": {"state": "ENABLED", "variants": {"on": true, "off": false},
                          "defaultVariant": "off", "targeting": {"if": [{"$ref": "nope"}, "on", "off"]}}}}"#,
    )
    .expect("write");
    let run = |extra: &[&str]| validate(&flags, extra);
    let out = run(&[]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    for expected in [
        "prod.json: flag \"cycle\": $ref cycle: a -> b -> a",
        "prod.json: flag \"missing\": $ref to evaluator \"nope\"",
        "2 rule(s) that can never be evaluated",
    ] {
        assert!(said.contains(expected), "missing {expected:?} in:\n{said}");
    }
    // flagd loads such files; so may a pipeline that says so.
    let out = run(&["--allow-parse-errors"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.contains("$ref cycle: a -> b -> a"),
        "still listed: {said}"
    );
}

#[test]
fn validate_fails_on_what_loads_otherwise_than_written_unless_allowed() {
    let dir = tempfile::tempdir().expect("tmp");
    let flags = dir.path().join("flags");
    std::fs::create_dir(&flags).expect("mkdir");
    std::fs::write(
        flags.join("prod.json"),
        r#"{"flags": {
          "twice": {"state": "ENABLED", "variants": {"a": 1, "b": 2}, "defaultVariant": "a"},
          "twice": {"state": "ENABLED", "variants": {"a": 3, "a": 4}, "defaultVariant": "a"},
          "huge": {"state": "ENABLED", "variants": {"n": 123456789012345678901234567890},
                   "defaultVariant": "n"},
          "split": {"state": "ENABLED", "variants": {"x": 1, "y": 2}, "defaultVariant": "x",
                    "targeting": {"fractional": [["x", 0.5], ["y", "50"]]}}}}"#,
    )
    .expect("write");
    let run = |extra: &[&str]| validate(&flags, extra);
    let out = run(&[]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    for expected in [
        "prod.json: flag \"twice\": the flag key: the key appears more than once",
        "prod.json: flag \"twice\": variants.a: the key appears more than once",
        "prod.json: flag \"huge\": variants.n: the number is past ±2^53",
        "prod.json: flag \"split\": targeting.fractional.0: the weight 0.5 of \"x\"",
        "prod.json: flag \"split\": targeting.fractional.1: the weight \"50\" of \"y\"",
        "5 warning(s)",
    ] {
        assert!(said.contains(expected), "missing {expected:?} in:\n{said}");
    }
    let out = run(&["--allow-warnings"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(said.contains("(allowed by --allow-warnings)"), "{said}");
}

#[test]
fn document_bounds_are_options_and_name_themselves_when_they_refuse() {
    let dir = tempfile::tempdir().expect("tmp");
    let flags = dir.path().join("flags");
    std::fs::create_dir(&flags).expect("mkdir");
    // Three $refs chained, 300 bytes of file.
    std::fs::write(
        flags.join("a.json"),
        r#"{"$evaluators": {"a": {"$ref": "b"}, "b": {"$ref": "c"},
                           "c": {"==": [{"var": "country"}, "NL"]}},
            "flags": {"x": {"state": "ENABLED", "variants": {"on": true, "off": false},
                            "defaultVariant": "off", "targeting": {"if": [{"$ref": "a"}, "on"]}}}}"#,
    )
    .expect("write");
    let out = validate(&flags, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (options, says) in [
        (&["--max-ref-chain", "2"][..], "--max-ref-chain"),
        (&["--max-rule-depth", "2"][..], "--max-rule-depth"),
        (&["--max-flag-file-mib", "1"][..], ""),
    ] {
        let out = validate(&flags, options);
        let text = String::from_utf8_lossy(&out.stderr);
        if says.is_empty() {
            assert!(out.status.success(), "{options:?} is within bounds: {text}");
            continue;
        }
        assert_eq!(out.status.code(), Some(1), "{options:?}: {text}");
        assert!(
            text.contains("a.json") && text.contains("\"x\"") && text.contains(says),
            "{options:?} names file, flag and bound: {text}"
        );
    }
    // Out of range: refused before anything is read, naming the option.
    let out = validate(&flags, &["--max-rule-depth", "500"]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("--max-rule-depth") && text.contains("1 to 128"),
        "{text}"
    );
}

#[test]
fn serve_answers_then_stops_cleanly_on_sigterm() {
    let mut child = flaghost()
        // A deadline for a debug build on a loaded machine: this test checks
        // answers, not timings.
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--plugin-deadline-ms",
            "2000",
            "--flags",
        ])
        .arg(root().join("examples/flags"))
        .arg("--plugins")
        .arg(plugins())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let deadline = Instant::now() + Duration::from_secs(120);
    let address = loop {
        let line = lines
            .next()
            .expect("flaghost logs until it listens")
            .expect("utf-8");
        if let Some(rest) = line.split("address=").nth(1) {
            break rest.trim().to_owned();
        }
        assert!(Instant::now() < deadline, "never listened");
    };

    let answer = Command::new("curl")
        .args([
            "-sS",
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-d",
        ])
        .arg(r#"{"context":{"country":"DE"}}"#)
        .arg(format!(
            "http://{address}/ofrep/v1/evaluate/flags/eu-pricing-banner"
        ))
        .output()
        .expect("curl");
    let body: serde_json::Value = serde_json::from_slice(&answer.stdout).expect("json answer");
    assert_eq!(body["variant"], "eu", "{body}");

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let exit = child.wait().expect("exits");
    assert!(exit.success(), "SIGTERM is a clean stop: {exit}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(rest.iter().any(|l| l.contains("SIGTERM")), "{rest:#?}");
}
