//! flagd's evaluator conformance suite (flagd-testbed, Gherkin) run against
//! flaghost's evaluation engine.
//!
//! The suite lives outside the repository: its path comes from
//! `FLAGD_TESTBED` (default `../shared/reference/flagd-testbed-evaluator`
//! beside the repository). When it is absent the test fails, saying so,
//! rather than passing with nothing run. All features run; of the
//! `fractional` examples only `@fractional-v2` (flagd's current hashing), not
//! `@fractional-v1`/`@fractional-v3`.
//!
//! The testbed uses no plugins: flags bind against an empty plugin set.
//!
//! The runner plays an OpenFeature SDK: an evaluation without a value (an
//! error, a disabled flag, no default variant) resolves to the caller's
//! fallback; an error's reason is ERROR.

use std::path::PathBuf;

use flaghost::evaluation::{EvaluationContext, Reason, evaluate};
use flaghost::flags::{FlagSet, ValueType, parse_flag_file};
use flaghost::plugins::PluginSet;
use flaghost_tests::root;
use serde_json::{Map, Value as Json, json};

fn testbed_dir() -> PathBuf {
    match std::env::var_os("FLAGD_TESTBED") {
        Some(dir) => PathBuf::from(dir),
        None => root().join("../shared/reference/flagd-testbed-evaluator"),
    }
}

/// One scenario (an Examples row of an outline, or a plain scenario).
struct Scenario {
    name: String,
    steps: Vec<(String, Vec<Vec<String>>)>,
}

/// Parses a feature into runnable scenarios, examples expanded, skipped tags
/// left out.
fn scenarios(feature: &str) -> Vec<Scenario> {
    let skip = |tags: &[String]| {
        tags.iter()
            .any(|t| t == "@fractional-v1" || t == "@fractional-v3")
    };
    let mut out = Vec::new();
    let mut background: Vec<(String, Vec<Vec<String>>)> = Vec::new();
    let mut tags: Vec<String> = Vec::new();
    let mut name = String::new();
    let mut steps: Vec<(String, Vec<Vec<String>>)> = Vec::new();
    let mut in_background = false;
    let mut outline = false;
    let mut scenario_skipped = false;
    let mut examples_skipped = false;
    let mut header: Option<Vec<String>> = None;
    let mut in_examples = false;

    let flush_plain = |out: &mut Vec<Scenario>,
                       name: &str,
                       steps: &[(String, Vec<Vec<String>>)],
                       background: &[(String, Vec<Vec<String>>)]| {
        let mut all = background.to_vec();
        all.extend(steps.iter().cloned());
        out.push(Scenario {
            name: name.to_owned(),
            steps: all,
        });
    };

    for raw in feature.lines().chain(std::iter::once("Scenario: <end>")) {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('@') {
            tags.extend(line.split_whitespace().map(str::to_owned));
            continue;
        }
        if line.starts_with("Feature:") {
            tags.clear();
            continue;
        }
        if line.starts_with("Background:") {
            in_background = true;
            continue;
        }
        let is_scenario = line.starts_with("Scenario:") || line.starts_with("Scenario Outline:");
        if is_scenario {
            if !name.is_empty() && !outline && !scenario_skipped {
                flush_plain(&mut out, &name, &steps, &background);
            }
            in_background = false;
            in_examples = false;
            outline = line.starts_with("Scenario Outline:");
            name = line
                .split_once(':')
                .map(|x| x.1.trim().to_owned())
                .unwrap_or_default();
            steps.clear();
            scenario_skipped = skip(&tags);
            tags.clear();
            continue;
        }
        if line.starts_with("Examples") {
            in_examples = true;
            header = None;
            examples_skipped = scenario_skipped || skip(&tags);
            tags.clear();
            continue;
        }
        if let Some(row) = line.strip_prefix('|') {
            let cells: Vec<String> = row
                .trim_end_matches('|')
                .split('|')
                .map(|c| c.trim().replace("\\\"", "\""))
                .collect();
            if in_examples {
                match &header {
                    None => header = Some(cells),
                    Some(h) if !examples_skipped => {
                        let subst = |s: &str| {
                            h.iter().zip(&cells).fold(s.to_owned(), |acc, (k, v)| {
                                acc.replace(&format!("<{k}>"), v)
                            })
                        };
                        let mut all = background.clone();
                        all.extend(steps.iter().map(|(s, t)| (subst(s), t.clone())));
                        out.push(Scenario {
                            name: format!("{} [{}]", name, cells.join(", ")),
                            steps: all,
                        });
                    }
                    Some(_) => {}
                }
            } else {
                let target = if in_background {
                    &mut background
                } else {
                    &mut steps
                };
                if let Some(last) = target.last_mut() {
                    last.1.push(cells);
                }
            }
            continue;
        }
        let step = ["Given ", "When ", "Then ", "And ", "But "]
            .iter()
            .find_map(|k| line.strip_prefix(k))
            .unwrap_or(line)
            .to_owned();
        if in_background {
            background.push((step, Vec::new()));
        } else {
            steps.push((step, Vec::new()));
        }
    }
    out
}

/// The quoted strings in a step, in order.
fn quoted(step: &str) -> Vec<String> {
    step.split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// A value typed as the step's type names it.
fn typed(kind: &str, text: &str) -> Json {
    match kind {
        "Boolean" => json!(text == "true"),
        "Integer" => text.parse::<i64>().map(Json::from).unwrap_or(Json::Null),
        "Float" => text.parse::<f64>().map(Json::from).unwrap_or(Json::Null),
        "Object" => serde_json::from_str(text).unwrap_or(Json::Null),
        _ => Json::String(text.to_owned()),
    }
}

#[derive(Default)]
struct World {
    kind: String,
    key: String,
    fallback: Json,
    context: Map<String, Json>,
    value: Json,
    reason: String,
    error_code: String,
    metadata: Map<String, Json>,
}

fn run(set: &FlagSet, scenario: &Scenario) -> Result<(), String> {
    let mut w = World::default();
    for (step, table) in &scenario.steps {
        let q = quoted(step);
        if step == "an evaluator" {
        } else if step.contains("-flag with key") {
            w.kind = step
                .split_whitespace()
                .nth(1)
                .unwrap_or("")
                .trim_end_matches("-flag")
                .to_owned();
            w.key = q[0].clone();
            w.fallback = typed(&w.kind, &q[1]);
        } else if step.starts_with("a context containing a key") {
            w.context.insert(q[0].clone(), typed(&q[1], &q[2]));
        } else if step.starts_with("a context containing a targeting key") {
            w.context.insert("targetingKey".into(), json!(q[0]));
        } else if step.starts_with("a context containing a nested property") {
            let outer = w.context.entry(q[0].clone()).or_insert_with(|| json!({}));
            outer[&q[1]] = json!(q[2]);
        } else if step == "the flag was evaluated with details" {
            let expected = match w.kind.as_str() {
                "Boolean" => ValueType::Bool,
                "String" => ValueType::String,
                "Integer" | "Float" => ValueType::Number,
                _ => ValueType::Object,
            };
            let context =
                EvaluationContext::from_attributes(w.context.clone()).map_err(|e| e.to_string())?;
            match evaluate(set, &w.key, &context, Some(expected)) {
                Ok(r) => {
                    w.value = r
                        .value
                        .map(|v| serde_json::to_value(v).unwrap_or(Json::Null))
                        .unwrap_or_else(|| w.fallback.clone());
                    w.reason = r.reason.as_str().to_owned();
                    w.metadata = r.metadata.entries().clone();
                }
                Err(e) => {
                    w.value = w.fallback.clone();
                    w.reason = Reason::Error.as_str().to_owned();
                    w.error_code = e.code.as_str().to_owned();
                }
            }
        } else if step.starts_with("the resolved details value should be") {
            // The expected value may itself hold quotes (an object): take
            // everything between the first and the last quote.
            let text = step
                .split_once('"')
                .and_then(|(_, r)| r.rsplit_once('"'))
                .map(|(v, _)| v)
                .unwrap_or("");
            let want = typed(&w.kind, text);
            let same = match (&w.value, &want) {
                (Json::Number(a), Json::Number(b)) => a.as_f64() == b.as_f64(),
                (a, b) => a == b,
            };
            if !same {
                return Err(format!(
                    "value {} != expected {want} (reason {}, error {})",
                    w.value, w.reason, w.error_code
                ));
            }
        } else if step.starts_with("the reason should be") {
            if w.reason != q[0] {
                return Err(format!(
                    "reason {} != expected {} (error {})",
                    w.reason, q[0], w.error_code
                ));
            }
        } else if step.starts_with("the error-code should be") {
            if w.error_code != q[0] {
                return Err(format!(
                    "error code {:?} != expected {:?}",
                    w.error_code, q[0]
                ));
            }
        } else if step == "the resolved metadata should contain" {
            for row in table.iter().skip(1) {
                let want = typed(&row[1], &row[2]);
                let got = w.metadata.get(&row[0]).cloned().unwrap_or(Json::Null);
                let same = match (&got, &want) {
                    (Json::Number(a), Json::Number(b)) => a.as_f64() == b.as_f64(),
                    (a, b) => a == b,
                };
                if !same {
                    return Err(format!("metadata {}: {got} != expected {want}", row[0]));
                }
            }
        } else if step == "the resolved metadata is empty" {
            if !w.metadata.is_empty() {
                return Err(format!("metadata is not empty: {:?}", w.metadata));
            }
        } else {
            return Err(format!("unknown step: {step}"));
        }
    }
    Ok(())
}

/// Every scenario of every feature file, each a test of its own; and one
/// that the suite is there and whole (a missing or truncated suite fails
/// rather than passing with nothing run).
fn main() -> std::process::ExitCode {
    let args = libtest_mimic::Arguments::from_args();
    let dir = testbed_dir();
    let found = dir.join("gherkin").is_dir();
    let mut trials = Vec::new();
    let mut count = 0usize;
    if found {
        let flags_file = dir.join("flags/testkit-flags.json");
        let bytes = std::fs::read(&flags_file).expect("read testkit-flags.json");
        let set = std::sync::Arc::new(
            parse_flag_file(
                &flags_file.display().to_string(),
                "testbed",
                &bytes,
                &PluginSet::default(),
                &Default::default(),
            )
            .unwrap_or_else(|e| panic!("the testbed's flags must load: {e}")),
        );
        let mut features: Vec<PathBuf> = std::fs::read_dir(dir.join("gherkin"))
            .expect("gherkin dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "feature"))
            .collect();
        features.sort();
        for feature in &features {
            let text = std::fs::read_to_string(feature).expect("read feature");
            let file = feature
                .file_stem()
                .and_then(|n| n.to_str())
                .unwrap_or("?")
                .to_owned();
            for (at, scenario) in scenarios(&text).into_iter().enumerate() {
                count += 1;
                let set = set.clone();
                // NB: numbered: an outline's rows share the scenario's name.
                let name = format!("{file}::{at:03} {}", scenario.name);
                trials.push(libtest_mimic::Trial::test(name, move || {
                    run(&set, &scenario).map_err(Into::into)
                }));
            }
        }
    }
    trials.push(libtest_mimic::Trial::test(
        "the flagd-testbed suite is present and whole",
        move || {
            if !found {
                return Err(format!(
                    "flagd-testbed not found at {}: set FLAGD_TESTBED to the \
                     flagd-testbed-evaluator folder (CI uses ../shared/reference/flagd-testbed-evaluator)",
                    dir.display()
                )
                .into());
            }
            if count <= 100 {
                return Err(format!("too few scenarios ({count}): is the suite complete?").into());
            }
            Ok(())
        },
    ));
    libtest_mimic::run(&args, trials).exit_code()
}
