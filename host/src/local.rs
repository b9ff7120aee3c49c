//! `flaghost eval`: flags evaluated on this machine, without a server, with
//! why each answers what it does. How a team tries a rule before shipping it.
//!
//! Exit codes: [`SUCCESS`] when every flag evaluated, [`EVALUATION_ERROR`]
//! when one answered an error (unknown flag, type, a failing rule),
//! [`LOAD_ERROR`] when the flags, plugins or context could not be loaded.

use std::io::Write as _;
use std::time::Instant;

use serde_json::Value as Json;

use crate::config::EvalArgs;
use crate::evaluation::{self, EvaluationContext};
use crate::flags::{FlagSet, FlagState, Targeting};

/// Every flag evaluated.
pub const SUCCESS: u8 = 0;
/// A flag answered an error.
pub const EVALUATION_ERROR: u8 = 1;
/// The flags, plugins or context could not be loaded (clap's usage errors
/// are 2).
pub const LOAD_ERROR: u8 = 3;

/// Runs `flaghost eval`: answers on stdout (one OFREP JSON answer per
/// line), explanations on stderr; the exit code.
pub fn run(args: &EvalArgs) -> u8 {
    let loaded = context_of(args).and_then(|context| {
        crate::server::load_locally(&args.source, &args.isolation, args.environment.as_deref())
            .map(|set| (set, context))
    });
    let (set, context) = match loaded {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("flaghost eval: {e:#}");
            return LOAD_ERROR;
        }
    };
    let keys: Vec<String> = if args.all {
        let mut keys: Vec<String> = set.flags.keys().cloned().collect();
        keys.sort();
        keys
    } else {
        args.flag.iter().cloned().collect()
    };
    let mut code = SUCCESS;
    let mut out = std::io::stdout().lock();
    for key in keys {
        let (answer, why) = evaluate(&set, &key, &context);
        if answer.get("errorCode").is_some() {
            code = EVALUATION_ERROR;
        }
        let _ = writeln!(out, "{answer}");
        let _ = out.flush();
        eprintln!("{key}:");
        for line in why {
            eprintln!("  {line}");
        }
    }
    code
}

/// The context from `--context` or `--context-file` (empty without).
fn context_of(args: &EvalArgs) -> anyhow::Result<EvaluationContext> {
    let text = match (&args.context, &args.context_file) {
        (Some(text), _) => text.clone(),
        (None, Some(file)) => std::fs::read_to_string(file)
            .map_err(|e| anyhow::anyhow!("--context-file {}: {e}", file.display()))?,
        (None, None) => return Ok(EvaluationContext::default()),
    };
    let Json::Object(attributes) = serde_json::from_str::<Json>(&text)
        .map_err(|e| anyhow::anyhow!("the context is not JSON: {e}"))?
    else {
        anyhow::bail!("the context must be a JSON object of attributes");
    };
    Ok(EvaluationContext::from_attributes(attributes)?)
}

/// Flag `key`'s OFREP answer for `context`, and why: the rule's steps, and
/// what it answered at what cost.
fn evaluate(set: &FlagSet, key: &str, context: &EvaluationContext) -> (Json, Vec<String>) {
    let started = Instant::now();
    let answer = evaluation::evaluate(set, key, context, None);
    let cost = started.elapsed();
    let json = crate::http::answer_json(key, &answer);
    let mut why = Vec::new();
    let Some(flag) = set.flags.get(key) else {
        why.push(format!(
            "no flag {key:?} in environment {:?}",
            set.environment
        ));
        return (json, why);
    };
    if flag.state == FlagState::Disabled {
        why.push("the flag is DISABLED: it serves no variant".into());
        return (json, why);
    }
    match &flag.targeting {
        Targeting::None => why.push(format!(
            "no targeting rule: the default variant {:?} is served",
            flag.default_variant.as_deref().unwrap_or("(none)")
        )),
        Targeting::Unparsable(reason) => {
            why.push(format!("its rule could not be parsed: {reason}"));
        }
        Targeting::Rule(rule) => {
            let answered = match &answer {
                Ok(r) if r.reason == evaluation::Reason::TargetingMatch => {
                    format!("variant {:?}", r.variant.unwrap_or_default())
                }
                Ok(_) => format!(
                    "no variant: the default {:?} is served",
                    flag.default_variant.as_deref().unwrap_or("(none)")
                ),
                Err(e) => format!("an error: {}", e.details),
            };
            why.push(format!(
                "{} answered {answered} in {:.1} µs",
                rule.describe(),
                cost.as_secs_f64() * 1e6
            ));
            if rule.lane().is_some() && !rule.describe().starts_with("plugin") {
                why.push(format!(
                    "it calls the plugin(s) {}",
                    rule.lane().unwrap_or_default()
                ));
            }
            let steps = rule.explain(context);
            if !steps.is_empty() {
                why.push("its steps, in order (operator => what it answered):".into());
                why.extend(steps.into_iter().map(|s| format!("  {s}")));
            }
        }
    }
    (json, why)
}
