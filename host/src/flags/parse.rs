//! The flagd flag-definition format (`flags`, `$evaluators`, `metadata`),
//! parsed and validated into a [`FlagSet`].
//!
//! Parsing collects every problem in a file rather than stopping at the first,
//! so `flaghost validate` can list them all; a file with any problem is refused
//! whole. The checks follow flagd's schema (schema/flags.json): `state` and
//! `variants` required, variants all of one type, metadata values strings,
//! numbers or booleans, and a `defaultVariant` that names a variant.

use std::fmt;
use std::sync::Arc;

use serde_json::value::RawValue;
use serde_json::{Map, Value as Json};

use super::targeting::{
    Evaluators, JsonLogicRule, ResolveError, bind_plugins, plugin_args, resolve_refs,
};
use super::{
    DocumentLimits, Flag, FlagSet, FlagState, Metadata, Targeting, Value, ValueType, Variant,
    Variants,
};
use crate::rules::{BindError, RuleBinder};

/// Why a flag's `targeting` refuses the file.
#[derive(Debug, thiserror::Error)]
pub(super) enum TargetingError {
    /// The rule is malformed.
    #[error("{0}")]
    Invalid(String),
    /// A `plugin` in it could not be bound.
    #[error(transparent)]
    Bind(#[from] BindError),
}

/// One thing wrong in a flag file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The flag it concerns; `None` for the file as a whole.
    pub flag: Option<String>,
    /// What is wrong, in words that say what to fix.
    pub reason: String,
    /// The plugin the flag uses that is not loaded, when that is the
    /// problem: how a plugin change tells that flags still need a plugin.
    pub missing_plugin: Option<String>,
}

impl Problem {
    /// A problem of `flag` (`None`: the file as a whole).
    pub fn new(flag: Option<&str>, reason: String) -> Self {
        Self {
            flag: flag.map(str::to_owned),
            reason,
            missing_plugin: None,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.flag {
            Some(flag) => write!(f, "flag {flag:?}: {}", self.reason),
            None => f.write_str(&self.reason),
        }
    }
}

/// A flag file that was refused, with every problem found in it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}: {}", problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct FlagFileError {
    /// The file, as given to the parser.
    pub file: String,
    /// Everything wrong with it; never empty.
    pub problems: Vec<Problem>,
}

/// Parses and validates one flag file for `environment`.
///
/// `file` names the file in error messages. Rules that use a plugin are bound
/// through `binder`; `$ref`s are resolved within `limits`. (The file's size
/// is bounded where it is read.)
pub fn parse_flag_file(
    file: &str,
    environment: &str,
    bytes: &[u8],
    binder: &dyn RuleBinder,
    limits: &DocumentLimits,
) -> Result<FlagSet, FlagFileError> {
    let refuse = |problems: Vec<Problem>| FlagFileError {
        file: file.to_owned(),
        problems,
    };
    let whole = |reason: String| Problem::new(None, reason);

    let doc: Json = serde_json::from_slice(bytes)
        .map_err(|e| refuse(vec![whole(format!("not valid JSON: {e}"))]))?;
    let lints = super::lint::lint(bytes, &doc);
    let Json::Object(mut doc) = doc else {
        return Err(refuse(vec![whole(
            "the file must hold a JSON object with a \"flags\" object".into(),
        )]));
    };

    let mut problems = Vec::new();
    let set_metadata = match doc.remove("metadata") {
        None => Map::new(),
        Some(m) => parse_metadata(m).unwrap_or_else(|reason| {
            problems.push(whole(format!("metadata: {reason}")));
            Map::new()
        }),
    };
    let raw_flags = match doc.remove("flags") {
        Some(Json::Object(flags)) => flags,
        Some(_) => {
            problems.push(whole(
                "\"flags\" must be an object mapping flag keys to flags".into(),
            ));
            Default::default()
        }
        None => {
            problems.push(whole("missing \"flags\"".into()));
            Default::default()
        }
    };
    let evaluators = Evaluators::new(
        match doc.remove("$evaluators") {
            None => Map::new(),
            Some(Json::Object(evaluators)) => evaluators,
            Some(_) => {
                problems.push(whole(
                    "\"$evaluators\" must be an object mapping names to rules".into(),
                ));
                Map::new()
            }
        },
        limits,
    );

    let set_metadata = Arc::new(Metadata::new(set_metadata));
    let mut flags = Vec::with_capacity(raw_flags.len());
    let mut warnings = Vec::new();
    for (key, raw) in raw_flags {
        match parse_flag(&key, raw, &set_metadata, &evaluators, binder) {
            Ok(flag) => {
                if let Targeting::Unparsable(reason) = &flag.targeting {
                    warnings.push(Problem::new(Some(&key), reason.clone()));
                }
                flags.push(flag);
            }
            Err(flag_problems) => problems.extend(flag_problems),
        }
    }
    if !problems.is_empty() {
        return Err(refuse(problems));
    }
    warnings.sort_by(|a, b| a.flag.cmp(&b.flag));
    Ok(FlagSet {
        environment: environment.to_owned(),
        flags: flags.into_iter().collect(),
        metadata: set_metadata,
        digest: crate::sha256_hex(bytes),
        warnings,
        lints,
        counters: Default::default(),
    })
}

/// One flag; every problem with it, or the flag.
fn parse_flag(
    key: &str,
    raw: Json,
    set_metadata: &Arc<Metadata>,
    evaluators: &Evaluators,
    binder: &dyn RuleBinder,
) -> Result<Flag, Vec<Problem>> {
    let refuse = |reasons: Vec<String>| -> Vec<Problem> {
        reasons
            .into_iter()
            .map(|reason| Problem::new(Some(key), reason))
            .collect()
    };
    let Json::Object(mut raw) = raw else {
        return Err(refuse(vec!["a flag must be a JSON object".into()]));
    };
    if key.is_empty() {
        return Err(refuse(vec!["a flag key must not be empty".into()]));
    }
    let mut problems = Vec::new();

    let state = match raw.remove("state") {
        Some(Json::String(s)) if s == "ENABLED" => FlagState::Enabled,
        Some(Json::String(s)) if s == "DISABLED" => FlagState::Disabled,
        Some(other) => {
            problems.push(format!(
                "\"state\" must be \"ENABLED\" or \"DISABLED\", not {other}"
            ));
            FlagState::Disabled
        }
        None => {
            problems.push("missing \"state\" (\"ENABLED\" or \"DISABLED\")".into());
            FlagState::Disabled
        }
    };

    let variants = match raw.remove("variants") {
        Some(v) => parse_variants(v).unwrap_or_else(|reason| {
            problems.push(reason);
            Variants::default()
        }),
        None => {
            problems.push("missing \"variants\"".into());
            Variants::default()
        }
    };

    let default_variant = match raw.remove("defaultVariant") {
        None | Some(Json::Null) => None,
        Some(Json::String(name)) => {
            if !variants.is_empty() && !variants.contains_key(&name) {
                problems.push(format!(
                    "\"defaultVariant\" {name:?} is not one of the variants ({})",
                    names(&variants).join(", ")
                ));
            }
            Some(name)
        }
        Some(other) => {
            problems.push(format!(
                "\"defaultVariant\" must be a variant name or null, not {other}"
            ));
            None
        }
    };

    // NB: a flag without metadata of its own shares the set's (one map for
    // all of them, not one per flag).
    let metadata = match raw.remove("metadata").map(parse_metadata) {
        None => Some(Arc::clone(set_metadata)),
        Some(Ok(own)) => {
            let mut metadata = set_metadata.entries().clone();
            metadata.extend(own);
            Some(Arc::new(Metadata::new(metadata)))
        }
        Some(Err(reason)) => {
            problems.push(format!("metadata: {reason}"));
            None
        }
    };

    // The rule is bound only once the rest is sound: a plugin's configuration
    // check is given the variant names, which must be right first.
    let metadata = match metadata {
        Some(metadata) if problems.is_empty() => metadata,
        _ => return Err(refuse(problems)),
    };
    let (targeting, resolved_rule) = match raw.remove("targeting") {
        None => (Targeting::None, None),
        Some(rule) => {
            parse_targeting(key, &names(&variants), rule, evaluators, binder).map_err(|e| {
                let mut problem = Problem::new(Some(key), e.to_string());
                if let TargetingError::Bind(BindError::NotLoaded { plugin, .. }) = e {
                    problem.missing_plugin = Some(plugin);
                }
                vec![problem]
            })?
        }
    };
    let definition = definition(
        state,
        &variants,
        default_variant.as_deref(),
        resolved_rule,
        &metadata,
    );
    let lane = match &targeting {
        Targeting::Rule(rule) => rule.lane().map(Into::into),
        Targeting::None | Targeting::Unparsable(_) => None,
    };
    Ok(Flag {
        lane,
        key: key.to_owned(),
        state,
        variants,
        default_variant,
        targeting,
        metadata,
        definition,
        key_json: super::json_text(&key),
        position: 0,
    })
}

/// The flag as flaghost evaluates it, in the flagd format: `$ref`s resolved
/// and metadata merged, so it parses alone (no `$evaluators`) into the same
/// flag. This is what the shared cache stores.
///
/// NB: kept as JSON text, not a tree: the tree took about 3 KB per flag
/// (a map node per object), a third of a 1,000-flag set's memory, for a
/// value only written to the shared cache.
fn definition(
    state: FlagState,
    variants: &Variants,
    default_variant: Option<&str>,
    rule: Option<Json>,
    metadata: &Map<String, Json>,
) -> Arc<RawValue> {
    let mut out = Map::new();
    let state = match state {
        FlagState::Enabled => "ENABLED",
        FlagState::Disabled => "DISABLED",
    };
    out.insert("state".into(), state.into());
    let variants: Map<String, Json> = variants
        .iter()
        .map(|(name, variant)| (name.clone(), variant.value.to_json()))
        .collect();
    out.insert("variants".into(), variants.into());
    out.insert(
        "defaultVariant".into(),
        default_variant.map_or(Json::Null, Json::from),
    );
    if let Some(rule) = rule {
        out.insert("targeting".into(), rule);
    }
    if !metadata.is_empty() {
        out.insert("metadata".into(), Json::Object(metadata.clone()));
    }
    // NB: a map of JSON values always serialises (string keys).
    serde_json::value::to_raw_value(&out)
        .unwrap_or_default()
        .into()
}

/// Variants: a non-empty object whose values share one type.
fn parse_variants(raw: Json) -> Result<Variants, String> {
    let Json::Object(raw) = raw else {
        return Err("\"variants\" must be an object mapping variant names to values".into());
    };
    if raw.is_empty() {
        return Err("\"variants\" must hold at least one variant".into());
    }
    let mut variants = Vec::with_capacity(raw.len());
    let mut first: Option<(String, ValueType)> = None;
    for (name, raw_value) in raw {
        if name.is_empty() {
            return Err("a variant name must not be empty".into());
        }
        let value =
            match raw_value {
                Json::Bool(b) => Value::Bool(b),
                Json::String(s) => Value::String(s),
                Json::Number(n) => match n.as_i64() {
                    Some(i) => Value::Integer(i),
                    None => Value::Float(n.as_f64().ok_or_else(|| {
                        format!("variant {name:?}: the number {n} is out of range")
                    })?),
                },
                Json::Object(o) => Value::Object(o),
                other => {
                    return Err(format!(
                        "variant {name:?}: {other} is not a boolean, string, number or object"
                    ));
                }
            };
        match &first {
            None => first = Some((name.clone(), value.value_type())),
            Some((first_name, ty)) if *ty != value.value_type() => {
                return Err(format!(
                    "variants must share one type: {first_name:?} is a {ty}, {name:?} is a {}",
                    value.value_type()
                ));
            }
            Some(_) => {}
        }
        let variant = Variant::new(&name, value);
        variants.push((name, variant));
    }
    Ok(variants.into_iter().collect())
}

/// Metadata: an object of strings, numbers and booleans.
fn parse_metadata(raw: Json) -> Result<Map<String, Json>, String> {
    let Json::Object(map) = raw else {
        return Err("must be an object".into());
    };
    for (k, v) in &map {
        if !(v.is_string() || v.is_number() || v.is_boolean()) {
            return Err(format!(
                "{k:?} is {v}; values must be strings, numbers or booleans"
            ));
        }
    }
    Ok(map)
}

/// A flag's `targeting`.
///
/// `{}` is no rule (flagd treats it so). `{"plugin": [name, config]}` binds a
/// plugin, and any problem with it refuses the file. Any other rule is
/// JsonLogic: `$ref`s are resolved and the rule compiled; a rule flagd would
/// also fail to evaluate (a `$ref` to a missing evaluator, invalid JsonLogic)
/// loads and answers PARSE_ERROR, as flagd does.
///
/// Returns the rule with its `$ref`s resolved beside it (the original rule
/// when they cannot be), for [`Flag::definition`].
fn parse_targeting(
    flag_key: &str,
    variants: &[String],
    rule: Json,
    evaluators: &Evaluators,
    binder: &dyn RuleBinder,
) -> Result<(Targeting, Option<Json>), TargetingError> {
    let Json::Object(rule) = rule else {
        return Err(TargetingError::Invalid(format!(
            "\"targeting\" must be an object, not {rule}"
        )));
    };
    if rule.is_empty() {
        return Ok((Targeting::None, None));
    }
    if let (Some(args), 1) = (rule.get("plugin"), rule.len()) {
        // The whole rule is one plugin: run it directly, no JsonLogic.
        let (name, config) = plugin_args(args).map_err(TargetingError::Invalid)?;
        let bound = binder.bind(flag_key, variants, name, config)?;
        return Ok((Targeting::Rule(bound), Some(Json::Object(rule))));
    }
    let rule = Json::Object(rule);
    let resolved = match resolve_refs(&rule, evaluators) {
        Ok(resolved) => resolved,
        // NB: past a bound the file is refused (the last good set keeps
        // serving); a rule that merely cannot be evaluated loads and
        // answers PARSE_ERROR, as flagd does.
        Err(ResolveError::TooLarge(reason)) => return Err(TargetingError::Invalid(reason)),
        Err(ResolveError::Unresolvable(reason)) => {
            return Ok((Targeting::Unparsable(reason), Some(rule)));
        }
    };
    let mut bound = resolved.clone();
    let mut plugins = Vec::new();
    bind_plugins(
        &mut bound,
        &mut |name, config| Ok(binder.bind(flag_key, variants, name, config)?),
        &mut plugins,
    )?;
    let targeting = match JsonLogicRule::compile(flag_key, variants, &bound, plugins) {
        Ok(compiled) => Targeting::Rule(Arc::new(compiled)),
        Err(reason) => Targeting::Unparsable(reason),
    };
    Ok((targeting, Some(resolved)))
}

/// The variants' names, in order (sorted).
fn names(variants: &Variants) -> Vec<String> {
    variants.keys().cloned().collect()
}

#[cfg(test)]
mod tests;
