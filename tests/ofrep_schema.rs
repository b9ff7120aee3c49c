//! schemathesis against flaghost's OFREP API, checked against the OFREP
//! OpenAPI file: `tests/schemathesis/run.sh` (which installs schemathesis,
//! pinned, into `target/schemathesis-venv`, serves the flags in
//! `tests/schemathesis/flags/` and runs about 2,500 generated requests with
//! a fixed seed). Here so that the README's one test command runs it too.

use std::process::Command;

use flaghost_tests::{flaghost_binary, root};

#[test]
fn every_ofrep_answer_is_documented_and_none_is_a_5xx() {
    let output = Command::new("bash")
        .arg(root().join("tests/schemathesis/run.sh"))
        .env("FLAGHOST_BIN", flaghost_binary())
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "schemathesis failed (reports in target/schemathesis-run/):\n{stdout}\n{stderr}"
    );
    // The run reports its case counts: a run that generated next to
    // nothing passes vacuously, so it fails here.
    let done = stdout
        .lines()
        .find(|l| l.contains("==> schemathesis: done"))
        .unwrap_or_else(|| panic!("no summary line:\n{stdout}"));
    let words: Vec<&str> = done.split_whitespace().collect();
    let counts: Vec<u64> = words
        .windows(2)
        .filter(|w| w[1] == "cases")
        .filter_map(|w| w[0].parse().ok())
        .collect();
    assert!(
        matches!(counts[..], [main, stale] if main >= 1000 && stale >= 200),
        "too few cases generated: {done}"
    );
}
