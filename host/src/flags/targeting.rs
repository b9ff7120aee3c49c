//! JsonLogic targeting as flagd evaluates it, compiled once per flag with
//! datalogic-rs (its `flagd` feature brings `sem_ver`).
//!
//! Three operators are ours, each because the conformance suite showed
//! datalogic's differing from flagd's:
//! - `starts_with` / `ends_with`: datalogic's `ext-string` versions answer
//!   `false` for a non-string or a wrong argument count; flagd answers null.
//! - `fractional`: datalogic's takes only string variant names; flagd's
//!   buckets may name any value (`[[false, 0], [true, 100]]` as a condition).
//!   Built-in names win over custom ones in datalogic, so a rule's
//!   `fractional` is renamed to [`FRACTIONAL`] before it is compiled.
//!
//! And one is flaghost's alone: `{"plugin": [name, config]}` runs a wasm
//! plugin as an operator whose answer (a variant name, or null) feeds `if`,
//! `and`, `fractional` and the rest. Each occurrence is bound (its
//! configuration checked by the plugin) at load and compiled as
//! `{"flaghost_plugin": [index]}` into the rule's list of bound plugins.
//!
//! A rule is resolved (`$ref`s to `$evaluators` substituted) and compiled
//! when its flag file loads; evaluation runs the compiled form against the
//! context enriched as flagd does (`$flagd.flagKey`, `$flagd.timestamp`,
//! `targetingKey`).

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};

use datalogic_rs::bumpalo::Bump;
use datalogic_rs::datavalue::NumberValue;
use datalogic_rs::operator::EvalContext;
use datalogic_rs::{CustomOperator, DataValue, Engine, Logic};
use serde_json::{Map, Value as Json, json};

use super::DocumentLimits;
use super::parse::TargetingError;
use crate::rules::{EvaluationContext, RuleError, TargetingRule};

/// The name flaghost's `fractional` is registered under (see the module docs).
const FRACTIONAL: &str = "flaghost_fractional";

/// The name the bound `plugin` operator is compiled under.
const PLUGIN: &str = "flaghost_plugin";

/// Default of how many `$ref`s may chain (`DocumentLimits::max_ref_chain`).
pub const DEFAULT_MAX_REF_CHAIN: usize = 32;

/// How deep a rule may nest (objects and arrays) once its `$ref`s are
/// resolved: as deep as `serde_json` lets a file nest, and the most
/// `DocumentLimits::max_rule_depth` may be. Every later step (binding
/// plugins, compiling, evaluating, serialising) recurses over the rule, and
/// the threads that do it are sized for this depth; `$ref`s chained through
/// `$evaluators` made a 21 KB file nest 2,000 levels, which overflowed a
/// thread's stack and killed the process.
pub const MAX_RULE_DEPTH: usize = 128;

/// What `$ref`s may add to one flag file's rules, in bytes of memory (see
/// [`memory_of`]). Rules written out are bounded by the file's size; a
/// `$ref` copies its evaluator, and evaluators that each use the next twice
/// grow by 2^n: a 1.3 KB file took 9.5 GB. 16 MiB is a list of 4,000
/// e-mail addresses used by 50 flags. (The default of
/// `DocumentLimits::max_expansion_bytes`.)
pub const DEFAULT_MAX_EXPANSION_BYTES: usize = 16 << 20;

/// Why a rule's `$ref`s could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// Past a bound on depth or expansion: the document is refused (a rule
    /// this size is an attack or a mistake, and would cost every load).
    #[error("{0}")]
    TooLarge(String),
    /// A `$ref` to a missing evaluator, or a cycle: the rule cannot be
    /// evaluated (PARSE_ERROR, as flagd answers).
    #[error("{0}")]
    Unresolvable(String),
}

/// A flag file's `$evaluators`, and what their `$ref`s may still add to its
/// rules (shared by all its flags: see [`DEFAULT_MAX_EXPANSION_BYTES`]),
/// under the bounds of its document.
pub struct Evaluators {
    map: Map<String, Json>,
    limits: DocumentLimits,
    left: std::cell::Cell<usize>,
}

impl Evaluators {
    /// The `$evaluators` of one flag file, resolved within `limits`.
    pub fn new(map: Map<String, Json>, limits: &DocumentLimits) -> Self {
        Self {
            map,
            limits: *limits,
            left: std::cell::Cell::new(limits.max_expansion_bytes),
        }
    }

    /// Charges `bytes` of expansion; `Err` once the file's allowance is spent.
    fn charge(&self, bytes: usize) -> Result<(), ResolveError> {
        match self.left.get().checked_sub(bytes) {
            Some(left) => {
                self.left.set(left);
                Ok(())
            }
            None => {
                self.left.set(0);
                Err(ResolveError::TooLarge(format!(
                    "the flag file's $refs expand its rules past {} (evaluators that use each other many times over?; --max-rule-expansion-mib)",
                    super::in_words(self.limits.max_expansion_bytes)
                )))
            }
        }
    }
}

/// The JsonLogic engine, built once: it holds no per-rule state.
fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        Engine::builder()
            .add_operator("starts_with", Affix::Start)
            .add_operator("ends_with", Affix::End)
            .add_operator(FRACTIONAL, Fractional)
            .add_operator(PLUGIN, PluginOperator)
            .build()
    })
}

/// flagd's `starts_with` / `ends_with`: `[string, affix]` answers a boolean;
/// anything else (a non-string, another argument count) answers null.
enum Affix {
    Start,
    End,
}

impl CustomOperator for Affix {
    fn evaluate<'a>(
        &self,
        args: &[&'a DataValue<'a>],
        _ctx: &mut EvalContext<'_, 'a>,
        arena: &'a Bump,
    ) -> datalogic_rs::Result<&'a DataValue<'a>> {
        let answer = match args {
            [DataValue::String(text), DataValue::String(affix)] => DataValue::Bool(match self {
                Affix::Start => text.starts_with(affix),
                Affix::End => text.ends_with(affix),
            }),
            _ => DataValue::Null,
        };
        Ok(arena.alloc(answer))
    }
}

thread_local! {
    /// Scratch memory for evaluations on this thread, reset after each.
    static ARENA: RefCell<Bump> = RefCell::new(Bump::new());

    /// The plugins and context of the rule evaluating on this thread, for
    /// [`PluginOperator`]: datalogic's operators see only the JSON data.
    static PLUGIN_CALL: RefCell<Option<PluginCall>> = const { RefCell::new(None) };
}

/// What a rule with plugins hands its plugin operators for one evaluation.
struct PluginCall {
    plugins: Arc<[Arc<dyn TargetingRule>]>,
    context: EvaluationContext,
    /// The first plugin failure: the whole evaluation fails with it.
    error: Option<RuleError>,
}

/// The bound `plugin` operator: `[index]` into the evaluating rule's plugins.
/// A failing plugin answers null here and fails the evaluation afterwards
/// with the plugin's own message.
struct PluginOperator;

impl CustomOperator for PluginOperator {
    fn evaluate<'a>(
        &self,
        args: &[&'a DataValue<'a>],
        _ctx: &mut EvalContext<'_, 'a>,
        arena: &'a Bump,
    ) -> datalogic_rs::Result<&'a DataValue<'a>> {
        let index = args.first().and_then(|a| a.as_i64()).unwrap_or(-1);
        let call = PLUGIN_CALL.with(|c| {
            let c = c.borrow();
            let call = c.as_ref()?;
            let plugin = call.plugins.get(usize::try_from(index).ok()?)?.clone();
            Some((plugin, call.context.clone()))
        });
        // NB: the plugin runs with no borrow of PLUGIN_CALL held.
        let answer = match &call {
            Some((plugin, context)) => plugin
                .evaluate(context)
                .map(|variant| variant.map(|v| DataValue::String(arena.alloc_str(v)))),
            None => Err(RuleError(format!("plugin operator {index} is not bound"))),
        };
        let value = match answer {
            Ok(Some(variant)) => variant,
            Ok(None) => DataValue::Null,
            Err(e) => {
                PLUGIN_CALL.with(|c| {
                    if let Some(call) = c.borrow_mut().as_mut() {
                        call.error.get_or_insert(e);
                    }
                });
                DataValue::Null
            }
        };
        Ok(arena.alloc(value))
    }
}

/// Binds one plugin use, `(name, config)`, to a rule that runs it.
pub type BindFn<'a> = dyn FnMut(&str, &Json) -> Result<Arc<dyn TargetingRule>, TargetingError> + 'a;

/// Binds every `{"plugin": [name, config]}` in `rule` with `bind`, replacing
/// it with `{"flaghost_plugin": [index]}`; the bound plugins are returned in
/// index order. A malformed or unbindable `plugin` is an error: it is
/// flaghost's operator, so the file is refused.
pub fn bind_plugins(
    rule: &mut Json,
    bind: &mut BindFn<'_>,
    bound: &mut Vec<Arc<dyn TargetingRule>>,
) -> Result<(), TargetingError> {
    match rule {
        Json::Object(map) => {
            if map.len() == 1
                && let Some(args) = map.get("plugin")
            {
                let (name, config) = plugin_args(args).map_err(TargetingError::Invalid)?;
                bound.push(bind(name, config)?);
                *rule = json!({ PLUGIN: [bound.len() - 1] });
                return Ok(());
            }
            map.values_mut()
                .try_for_each(|v| bind_plugins(v, bind, bound))
        }
        Json::Array(items) => items
            .iter_mut()
            .try_for_each(|v| bind_plugins(v, bind, bound)),
        _ => Ok(()),
    }
}

/// `[name, config]`, the arguments of `plugin`.
pub fn plugin_args(args: &Json) -> Result<(&str, &Json), String> {
    match args {
        Json::Array(a) if a.len() == 2 => match &a[0] {
            Json::String(name) => Ok((name, &a[1])),
            other => Err(format!(
                "\"plugin\" names its plugin first, as a string, not {other}"
            )),
        },
        _ => Err("\"plugin\" takes two arguments: [\"<plugin name>\", <configuration>]".into()),
    }
}

/// flagd's `fractional`, v2 hashing: the bucketing value is the first
/// argument if it is a string, else `$flagd.flagKey` + `targetingKey`;
/// `bucket = (murmur3_x86_32(value, 0) as u64 * total_weight) >> 32`; the
/// first bucket whose cumulative weight exceeds it wins. Weights default to 1,
/// negatives count 0; no buckets, a total of 0 or no targeting key answer null.
struct Fractional;

impl CustomOperator for Fractional {
    fn evaluate<'a>(
        &self,
        args: &[&'a DataValue<'a>],
        ctx: &mut EvalContext<'_, 'a>,
        arena: &'a Bump,
    ) -> datalogic_rs::Result<&'a DataValue<'a>> {
        let null = || Ok(&*arena.alloc(DataValue::Null));
        let Some(first) = args.first() else {
            return null();
        };
        let (key, buckets): (&str, &[&DataValue<'a>]) = match first {
            DataValue::String(explicit) => (explicit, &args[1..]),
            _ => {
                let root = ctx.root_input();
                let field = |obj: &'a DataValue<'a>, name: &str| {
                    obj.as_object()?
                        .iter()
                        .find(|(k, _)| *k == name)
                        .map(|(_, v)| v)
                };
                let targeting_key = match field(root, "targetingKey") {
                    Some(DataValue::String(k)) if !k.is_empty() => *k,
                    _ => return null(),
                };
                let flag_key = field(root, "$flagd")
                    .and_then(|f| field(f, "flagKey"))
                    .and_then(|k| k.as_str())
                    .unwrap_or("");
                let mut key = datalogic_rs::bumpalo::collections::String::with_capacity_in(
                    flag_key.len() + targeting_key.len(),
                    arena,
                );
                key.push_str(flag_key);
                key.push_str(targeting_key);
                let key = key.into_bump_str();
                let rest = if first.is_null() { &args[1..] } else { args };
                (key, rest)
            }
        };
        let mut weighted =
            datalogic_rs::bumpalo::collections::Vec::with_capacity_in(buckets.len(), arena);
        for bucket in buckets {
            let Some(entry) = bucket.as_array().filter(|a| !a.is_empty()) else {
                return null();
            };
            let weight = entry.get(1).map_or(1, |w| w.as_i64().unwrap_or(1).max(0));
            weighted.push((&entry[0], weight.unsigned_abs()));
        }
        // NB: weights come from flag files: sum and scale in u128 so that
        // absurd weights cannot overflow (a panic in debug builds).
        let total: u128 = weighted.iter().map(|(_, w)| u128::from(*w)).sum();
        if total == 0 {
            return null();
        }
        // NB: hashing an in-memory cursor cannot fail.
        let hash = murmur3::murmur3_32(&mut std::io::Cursor::new(key.as_bytes()), 0).unwrap_or(0);
        let bucket = (u128::from(hash) * total) >> 32;
        let mut cumulative: u128 = 0;
        for (variant, weight) in weighted {
            cumulative += u128::from(weight);
            if bucket < cumulative {
                return Ok(variant);
            }
        }
        null()
    }
}

/// Renames `fractional` operators to [`FRACTIONAL`] throughout `rule`.
fn use_our_fractional(rule: &mut Json) {
    match rule {
        Json::Object(map) => {
            if map.len() == 1
                && let Some(args) = map.remove("fractional")
            {
                map.insert(FRACTIONAL.into(), args);
            }
            map.values_mut().for_each(use_our_fractional);
        }
        Json::Array(items) => items.iter_mut().for_each(use_our_fractional),
        _ => {}
    }
}

/// What one copy of `value` costs in memory, not counting its children's
/// own costs, as `serde_json` lays it out: its 32-byte slot; a string's
/// bytes and their allocation; an array's allocation; an object's
/// `BTreeMap` nodes (a node holds up to 11 entries and takes about 640
/// bytes however few it holds) and its keys' allocations.
///
/// NB: an earlier count of 32 bytes a value plus its text let the 20-level
/// expansion bomb grow 124 MB of resident memory before its 16 MiB bound
/// refused it: a one-entry object (`{"or": [...]}`) costs a whole node.
fn memory_of(value: &Json) -> usize {
    const SLOT: usize = 32;
    const ALLOCATION: usize = 16;
    const NODE: usize = 640;
    SLOT + match value {
        Json::String(s) => s.len() + ALLOCATION,
        Json::Array(_) => ALLOCATION,
        Json::Object(map) => {
            NODE * map.len().div_ceil(11).max(1)
                + map.keys().map(|k| k.len() + ALLOCATION).sum::<usize>()
        }
        _ => 0,
    }
}

/// Substitutes every `{"$ref": "name"}` in `rule` with the evaluator `name`.
/// Parsed JSON makes this insensitive to the whitespace in the file, which
/// flagd's text substitution has to handle separately.
///
/// Bounded by the evaluators' [`DocumentLimits`]: nesting once resolved,
/// `$ref` chains, and what the `$ref`s of one file add (checked as it is
/// built, so a bomb stops at the bound, not after).
pub fn resolve_refs(rule: &Json, evaluators: &Evaluators) -> Result<Json, ResolveError> {
    resolve(rule, evaluators, &mut Vec::new(), 0)
}

/// `refs`: the evaluators followed to get here, in order (empty: the
/// flag's own text); `depth`: levels of objects and arrays above `rule`.
fn resolve<'a>(
    rule: &'a Json,
    evaluators: &'a Evaluators,
    refs: &mut Vec<&'a str>,
    depth: usize,
) -> Result<Json, ResolveError> {
    let limits = &evaluators.limits;
    if refs.len() > limits.max_ref_chain {
        return Err(ResolveError::TooLarge(format!(
            "$refs chained more than {} deep (--max-ref-chain): {}…",
            limits.max_ref_chain,
            refs[..refs.len().min(4)].join(" -> ")
        )));
    }
    if depth > limits.max_rule_depth {
        return Err(ResolveError::TooLarge(format!(
            "the rule nests more than {} levels deep once its $refs are resolved (--max-rule-depth)",
            limits.max_rule_depth
        )));
    }
    if !refs.is_empty() {
        evaluators.charge(memory_of(rule))?;
    }
    match rule {
        Json::Object(map) if map.len() == 1 && map.contains_key("$ref") => {
            let name = map["$ref"].as_str().ok_or_else(|| {
                ResolveError::Unresolvable(format!(
                    "$ref must name an evaluator, not {}",
                    map["$ref"]
                ))
            })?;
            let (name, target) = evaluators.map.get_key_value(name).ok_or_else(|| {
                ResolveError::Unresolvable(format!(
                    "$ref to evaluator {name:?}, which $evaluators does not define"
                ))
            })?;
            if refs.contains(&name.as_str()) {
                return Err(ResolveError::Unresolvable(format!(
                    "$ref cycle: {} -> {name}",
                    refs.join(" -> ")
                )));
            }
            refs.push(name);
            let resolved = resolve(target, evaluators, refs, depth);
            refs.pop();
            resolved
        }
        Json::Object(map) => map
            .iter()
            .map(|(k, v)| Ok((k.clone(), resolve(v, evaluators, refs, depth + 1)?)))
            .collect::<Result<Map<_, _>, ResolveError>>()
            .map(Json::Object),
        Json::Array(items) => items
            .iter()
            .map(|v| resolve(v, evaluators, refs, depth + 1))
            .collect::<Result<Vec<_>, _>>()
            .map(Json::Array),
        other => Ok(other.clone()),
    }
}

/// One flag's JsonLogic rule, compiled.
pub struct JsonLogicRule {
    flag_key: String,
    logic: Logic,
    /// The plugins its `plugin` operators call, by index (see [`bind_plugins`]).
    plugins: Arc<[Arc<dyn TargetingRule>]>,
    /// Its lane of the plugin pool ([`crate::rules::lane_of`] its plugins).
    lane: Option<String>,
    /// The context attributes it can read ([`reads`]); `None`: any.
    reads: Option<Box<[String]>>,
    /// The flag's variant names, sorted: what an answer is looked up in.
    variants: Box<[String]>,
}

/// The context attributes `rule` can read, when that is known from its
/// text: every prefix of each literal `var` path (`a`, `a.b` for `a.b`),
/// the names `missing` and `missing_some` test, and `targetingKey` for
/// `fractional`. `None` when it may read any: a computed or empty path (the
/// whole data), or an operator that reads data by other means.
///
/// Why: converting the whole context into JsonLogic data for every flag made
/// a bulk request with a 1 MB context cost 1.5 s (hostile-inputs issue); a
/// rule reads a few attributes, and only those need converting. Reading
/// more than needed is harmless (map/filter's item-relative paths are
/// added too); reading fewer would be wrong, hence `None` when unsure.
fn reads(rule: &Json) -> Option<Box<[String]>> {
    let mut keys = std::collections::BTreeSet::new();
    collect_reads(rule, &mut keys).then(|| keys.into_iter().collect())
}

fn collect_reads(rule: &Json, keys: &mut std::collections::BTreeSet<String>) -> bool {
    let literal_names = |names: &[Json], keys: &mut std::collections::BTreeSet<String>| {
        names.iter().all(|name| match name {
            Json::String(name) => add_path(name, keys),
            _ => false,
        })
    };
    match rule {
        Json::Object(map) => map.iter().all(|(op, args)| {
            let read = match op.as_str() {
                // NB: a number is a path as datalogic prints it; only a
                // plain integer is printed as serde_json prints it.
                "var" => match args {
                    Json::String(path) => add_path(path, keys),
                    Json::Number(n) if n.is_i64() => add_path(&n.to_string(), keys),
                    Json::Array(items) => match items.first() {
                        Some(Json::String(path)) => add_path(path, keys),
                        Some(Json::Number(n)) if n.is_i64() => add_path(&n.to_string(), keys),
                        _ => false,
                    },
                    _ => false,
                },
                "missing" => match args {
                    Json::Array(names) => literal_names(names, keys),
                    Json::String(name) => add_path(name, keys),
                    _ => false,
                },
                "missing_some" => match args.as_array().map(Vec::as_slice) {
                    Some([_, Json::Array(names)]) => literal_names(names, keys),
                    _ => false,
                },
                // NB: flaghost's fractional reads `targetingKey` and `$flagd`
                // from the data itself when it has no bucketing expression.
                FRACTIONAL | "fractional" => {
                    keys.insert("targetingKey".to_owned());
                    true
                }
                // Operators that read the data by a path of their own
                // syntax: not worth knowing; convert the whole context.
                "val" | "exists" => false,
                _ => true,
            };
            read && collect_reads(args, keys)
        }),
        Json::Array(items) => items.iter().all(|item| collect_reads(item, keys)),
        _ => true,
    }
}

/// Adds every prefix of the dotted `path`; false for the empty path (the
/// whole data).
fn add_path(path: &str, keys: &mut std::collections::BTreeSet<String>) -> bool {
    if path.is_empty() {
        return false;
    }
    for (at, _) in path.match_indices('.') {
        keys.insert(path[..at].to_owned());
    }
    keys.insert(path.to_owned());
    true
}

impl JsonLogicRule {
    /// Compiles `rule` (with `$ref`s resolved and plugins bound) for
    /// `flag_key`, whose variants are named `variants`.
    pub fn compile(
        flag_key: &str,
        variants: &[String],
        rule: &Json,
        plugins: Vec<Arc<dyn TargetingRule>>,
    ) -> Result<Self, String> {
        let mut rule = rule.clone();
        use_our_fractional(&mut rule);
        let logic = engine()
            .compile(&rule)
            .map_err(|e| format!("invalid JsonLogic: {e}"))?;
        let lane = crate::rules::lane_of(plugins.iter().filter_map(|p| p.lane()));
        Ok(Self {
            flag_key: flag_key.to_owned(),
            logic,
            plugins: plugins.into(),
            lane,
            reads: reads(&rule),
            variants: {
                let mut variants = variants.to_vec();
                variants.sort_unstable();
                variants.dedup();
                variants.into()
            },
        })
    }
}

/// The caller's context as JsonLogic data, converted at most once per
/// request on each thread that evaluates it: a bulk request's flags share
/// one conversion instead of each converting what it reads. Attributes are
/// converted when a rule first reads them; a rule that may read any gets
/// every attribute, converted once, in one slice whose last entry is its
/// `$flagd`, rewritten in place for each flag.
#[derive(Default)]
struct Converted<'a> {
    /// `$flagd.timestamp`: read once per request, so every flag of a bulk
    /// request sees the same time.
    timestamp: i64,
    /// The attributes converted so far.
    values: crate::flags::FastMap<&'a str, Option<DataValue<'a>>>,
    /// Every attribute, then `$flagd`.
    all: Option<&'a mut [(&'a str, DataValue<'a>)]>,
}

self_cell::self_cell!(
    /// [`Converted`] data in the arena it lives in.
    struct RequestData {
        owner: Bump,
        #[not_covariant]
        dependent: Converted,
    }
);

thread_local! {
    /// The context last evaluated on this thread, by its id, converted.
    /// NB: kept until another context is evaluated here: at most one
    /// request's conversion per thread.
    static REQUEST: RefCell<Option<(u64, RequestData)>> = const { RefCell::new(None) };
}

impl<'a> Converted<'a> {
    fn new(context: &EvaluationContext) -> Self {
        Self {
            timestamp: context.timestamp(),
            // NB: room for a typical context's attributes, so that a bulk
            // request's first flags do not grow it in steps.
            values: crate::flags::FastMap::with_capacity_and_hasher(16, Default::default()),
            all: None,
        }
    }

    /// `$flagd` for `flag_key`, in `arena`.
    fn flagd<'s>(&self, flag_key: &'s str, arena: &'s Bump) -> DataValue<'s> {
        DataValue::Object(arena.alloc_slice_copy(&[
            ("flagKey", DataValue::String(flag_key)),
            (
                "timestamp",
                DataValue::Number(NumberValue::from_i64(self.timestamp)),
            ),
        ]))
    }

    /// Attribute `key` of `context` with its key, both converted into
    /// `arena` the first time.
    fn value(
        &mut self,
        key: &str,
        context: &EvaluationContext,
        arena: &'a Bump,
    ) -> Option<(&'a str, DataValue<'a>)> {
        if let Some((&key, value)) = self.values.get_key_value(key) {
            return value.map(|value| (key, value));
        }
        // NB: `$flagd` is flaghost's to give, as in flagd, whatever the
        // caller sent under that name.
        let value = context
            .attributes()
            .get(key)
            .filter(|_| key != "$flagd")
            .map(|v| DataValue::from_serde_value_in(v, arena));
        let key: &'a str = arena.alloc_str(key);
        self.values.insert(key, value);
        value.map(|value| (key, value))
    }
}

/// Runs `evaluate` on the data a rule of flag `flag_key` sees for
/// `context`: the attributes it `reads` (all when `None`) plus flagd's
/// `$flagd` (`flagKey`, `timestamp`), built from this thread's conversion of
/// `context` (see [`Converted`]) and, per flag, in `scratch`.
fn with_flagd_data<T>(
    flag_key: &str,
    context: &EvaluationContext,
    reads: Option<&[String]>,
    scratch: &Bump,
    evaluate: impl for<'d> FnOnce(&'d DataValue<'d>) -> T,
) -> T {
    REQUEST.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().is_some_and(|(id, _)| *id != context.id()) {
            *cell = None;
        }
        let (_, request) = cell.get_or_insert_with(|| {
            (
                context.id(),
                RequestData::new(Bump::new(), |_| Converted::new(context)),
            )
        });
        request.with_dependent_mut(|arena, converted| match reads {
            Some(reads) => {
                let mut entries = datalogic_rs::bumpalo::collections::Vec::with_capacity_in(
                    reads.len() + 1,
                    scratch,
                );
                for key in reads {
                    if let Some((_, value)) = converted.value(key, context, arena) {
                        entries.push((key.as_str(), value));
                    }
                }
                entries.push(("$flagd", converted.flagd(flag_key, scratch)));
                evaluate(scratch.alloc(DataValue::Object(entries.into_bump_slice())))
            }
            None => {
                let flagd = converted.flagd(arena.alloc_str(flag_key), arena);
                let all = match converted.all.take() {
                    Some(all) => all,
                    None => {
                        let attributes = context.attributes();
                        let mut all = datalogic_rs::bumpalo::collections::Vec::with_capacity_in(
                            attributes.len() + 1,
                            arena,
                        );
                        for key in attributes.keys() {
                            all.extend(converted.value(key, context, arena));
                        }
                        all.push(("$flagd", DataValue::Null));
                        all.into_bump_slice_mut()
                    }
                };
                if let Some(last) = all.last_mut() {
                    last.1 = flagd;
                }
                let answer = evaluate(&DataValue::Object(&*all));
                converted.all = Some(all);
                answer
            }
        })
    })
}

impl JsonLogicRule {
    /// Runs the rule for `context` and gives its answer to `read`, which
    /// must take what it needs: the answer lives in scratch memory, reset
    /// once `read` returns.
    fn run<T>(
        &self,
        context: &EvaluationContext,
        read: impl FnOnce(&DataValue<'_>) -> Result<T, RuleError>,
    ) -> Result<T, RuleError> {
        if !self.plugins.is_empty() {
            PLUGIN_CALL.with(|c| {
                *c.borrow_mut() = Some(PluginCall {
                    plugins: self.plugins.clone(),
                    context: context.clone(),
                    error: None,
                });
            });
        }
        let answer = ARENA.with(|arena| {
            let mut arena = arena.borrow_mut();
            let scratch: &Bump = &arena;
            let answer = with_flagd_data(
                &self.flag_key,
                context,
                self.reads.as_deref(),
                scratch,
                |data| {
                    engine()
                        .evaluate(&self.logic, data, scratch)
                        .map_err(|e| RuleError(format!("the targeting rule failed: {e}")))
                        .and_then(read)
                },
            );
            arena.reset();
            answer
        });
        if self.plugins.is_empty() {
            return answer;
        }
        match PLUGIN_CALL
            .with(|c| c.borrow_mut().take())
            .and_then(|call| call.error)
        {
            Some(plugin_failure) => Err(plugin_failure),
            None => answer,
        }
    }

    /// What the rule's `answer` means: a variant name, `true`/`false`
    /// naming the variants `"true"`/`"false"` (flagd's boolean shorthand),
    /// or null for the default; as the rule's copy of the name.
    fn variant(&self, answer: &DataValue<'_>) -> Result<Option<&str>, RuleError> {
        let name = match answer {
            DataValue::Null => return Ok(None),
            DataValue::Bool(true) => "true",
            DataValue::Bool(false) => "false",
            _ => answer.as_str().ok_or_else(|| {
                RuleError(format!(
                    "the targeting rule answered {answer}, which is not a variant name"
                ))
            })?,
        };
        match self.variants.binary_search_by(|v| v.as_str().cmp(name)) {
            Ok(at) => Ok(Some(&self.variants[at])),
            // NB: a rule that runs plugins may have made the name from a
            // plugin's answer (which may carry another caller's data): it
            // is not echoed. Without plugins, the name is the flag file's.
            Err(_) if self.lane.is_some() => Err(RuleError(format!(
                "the targeting rule answered a variant flag {:?} does not have",
                self.flag_key
            ))),
            Err(_) => Err(RuleError(format!(
                "the targeting rule answered variant {name:?}, which flag {:?} does not have",
                self.flag_key
            ))),
        }
    }
}

impl TargetingRule for JsonLogicRule {
    fn evaluate(&self, context: &EvaluationContext) -> Result<Option<&str>, RuleError> {
        self.run(context, |answer| self.variant(answer))
    }

    fn describe(&self) -> String {
        "the targeting rule".into()
    }

    fn lane(&self) -> Option<&str> {
        self.lane.as_deref()
    }

    /// Each operator the rule ran, in order, with what it answered (from
    /// datalogic's trace): an `if` shows which condition held, so which
    /// branch decided. Slow (it keeps every step); only `flaghost eval`
    /// asks.
    fn explain(&self, context: &EvaluationContext) -> Vec<String> {
        let mut data = context.attributes().clone();
        data.insert(
            "$flagd".into(),
            serde_json::json!({"flagKey": self.flag_key, "timestamp": context.timestamp()}),
        );
        let data = Json::Object(data);
        if !self.plugins.is_empty() {
            PLUGIN_CALL.with(|c| {
                *c.borrow_mut() = Some(PluginCall {
                    plugins: self.plugins.clone(),
                    context: context.clone(),
                    error: None,
                });
            });
        }
        let run = engine().trace().eval(&self.logic, &data);
        PLUGIN_CALL.with(|c| c.borrow_mut().take());
        let mut expressions = std::collections::HashMap::new();
        let mut nodes = vec![&run.expression_tree];
        while let Some(node) = nodes.pop() {
            expressions.insert(node.id, node.expression.as_str());
            nodes.extend(&node.children);
        }
        let mut lines: Vec<String> = run
            .steps
            .iter()
            .filter(|step| step.iteration_index.is_none())
            .map(|step| {
                let expression = expressions.get(&step.node_id).copied().unwrap_or("?");
                let answer = match (&step.result, &step.error) {
                    (Some(result), _) => result.to_string(),
                    (None, Some(error)) => format!("error: {error}"),
                    (None, None) => "nothing".into(),
                };
                format!(
                    "{} => {answer}",
                    crate::plugins::cut(&self.as_written(expression), 160)
                )
            })
            .collect();
        if lines.len() > MAX_EXPLAINED_STEPS {
            let more = lines.len() - MAX_EXPLAINED_STEPS;
            lines.truncate(MAX_EXPLAINED_STEPS);
            lines.push(format!("... and {more} more steps"));
        }
        lines
    }
}

impl JsonLogicRule {
    /// A compiled sub-expression in the flag file's words: the bound
    /// operators by their names there, a plugin by its name.
    fn as_written(&self, expression: &str) -> String {
        let mut text = expression.replace(&format!("\"{FRACTIONAL}\""), "\"fractional\"");
        for (index, plugin) in self.plugins.iter().enumerate() {
            text = text.replace(
                &format!("{{\"{PLUGIN}\": {index}}}"),
                &format!("{{\"plugin\": {:?}}}", plugin.lane().unwrap_or("?")),
            );
        }
        text
    }
}

/// Steps of a rule `flaghost eval` shows; the rest are counted.
const MAX_EXPLAINED_STEPS: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(v: Json) -> EvaluationContext {
        let Json::Object(m) = v else {
            panic!("an object")
        };
        EvaluationContext::from_attributes(m).expect("valid")
    }

    /// A rule of flag `flag`, with no variants: [`answer`] reads what it
    /// answers.
    fn compile(flag: &str, rule: Json) -> JsonLogicRule {
        JsonLogicRule::compile(flag, &[], &rule, vec![]).expect("compiles")
    }

    /// What `rule` answers for `context`, as text, whether a variant of its
    /// flag or not.
    fn answer(
        rule: &JsonLogicRule,
        context: &EvaluationContext,
    ) -> Result<Option<String>, RuleError> {
        rule.run(context, |answer| {
            Ok(match answer {
                DataValue::Null => None,
                DataValue::Bool(b) => Some(b.to_string()),
                other => Some(
                    other
                        .as_str()
                        .ok_or_else(|| RuleError(other.to_string()))?
                        .to_owned(),
                ),
            })
        })
    }

    fn run(flag: &str, rule: Json, context: Json) -> Result<Option<String>, RuleError> {
        answer(&compile(flag, rule), &ctx(context))
    }

    #[test]
    fn a_conversion_is_shared_by_the_flags_of_one_context_and_no_other() {
        let reads_some = compile(
            "some",
            json!({"cat": [{"var": "country"}, "/", {"var": "$flagd.flagKey"}]}),
        );
        // `{"var": ""}` may read anything: it is given every attribute.
        let reads_all = |flag: &str| {
            compile(
                flag,
                json!({"if": [{"var": ""}, {"cat": [{"var": "country"}, "/", {"var": "$flagd.flagKey"}]}, "none"]}),
            )
        };
        let (first, second) = (reads_all("first"), reads_all("second"));
        let nl = ctx(json!({"country": "NL", "$flagd": {"flagKey": "forged"}}));
        let be = ctx(json!({"country": "BE"}));
        for _ in 0..2 {
            for (context, country) in [(&nl, "NL"), (&be, "BE"), (&nl, "NL")] {
                assert_eq!(
                    answer(&reads_some, context),
                    Ok(Some(format!("{country}/some")))
                );
                assert_eq!(
                    answer(&first, context),
                    Ok(Some(format!("{country}/first")))
                );
                assert_eq!(
                    answer(&second, context),
                    Ok(Some(format!("{country}/second")))
                );
            }
        }
        // A clone is the same context (and shares its conversion).
        assert_eq!(nl.clone().id(), nl.id());
        assert_ne!(nl.id(), be.id());
    }

    #[test]
    fn a_rule_converts_only_the_attributes_it_can_read() {
        let keys = |rule: Json| reads(&rule).map(|k| k.into_vec());
        assert_eq!(
            keys(
                json!({"if": [{"in": [{"var": "user.country"}, ["NL"]]}, "a", {"var": ["plan", "free"]}]})
            ),
            Some(vec!["plan".into(), "user".into(), "user.country".into()])
        );
        assert_eq!(
            keys(json!({"fractional": [["a", 50], ["b", 50]]})),
            Some(vec!["targetingKey".into()])
        );
        assert_eq!(
            keys(json!({"missing_some": [1, ["a", "b"]]})),
            Some(vec!["a".into(), "b".into()])
        );
        for unsure in [
            json!({"var": ""}),
            json!({"var": 1e-7}),
            json!({"var": [18446744073709551615u64]}),
            json!({"var": {"cat": ["a", "b"]}}),
            json!({"missing": {"var": "names"}}),
            json!({"map": [{"var": "items"}, {"var": ""}]}),
        ] {
            assert_eq!(keys(unsure.clone()), None, "{unsure}");
        }
    }

    #[test]
    fn a_rule_sees_the_attributes_it_reads_and_no_fewer() {
        let context = json!({"targetingKey": "user-1", "user": {"country": "NL"}, "plan": "pro",
                             "user.flat": "yes", "items": [{"x": 2}, {"x": 3}], "other": 1});
        for (rule, expected) in [
            (json!({"var": "user.country"}), "NL"),
            (
                json!({"if": [{"==": [{"var": "plan"}, "pro"]}, "on", "off"]}),
                "on",
            ),
            (
                json!({"if": [{"missing": ["plan", "nope"]}, "missing", "all"]}),
                "missing",
            ),
            (
                json!({"if": [{"some": [{"var": "items"}, {">": [{"var": "x"}, 2]}]}, "yes", "no"]}),
                "yes",
            ),
            (
                json!({"if": [{"==": [{"var": "$flagd.flagKey"}, "f"]}, "self", "other"]}),
                "self",
            ),
        ] {
            assert_eq!(
                run("f", rule.clone(), context.clone()),
                Ok(Some(expected.into())),
                "{rule}"
            );
        }
    }

    /// A rule that runs guest code (its lane says so) and answers `on`.
    struct OnPlugin;

    impl TargetingRule for OnPlugin {
        fn evaluate(&self, _: &EvaluationContext) -> Result<Option<&str>, RuleError> {
            Ok(Some("on"))
        }
        fn describe(&self) -> String {
            "plugin on".into()
        }
        fn lane(&self) -> Option<&str> {
            Some("on")
        }
    }

    #[test]
    fn a_rule_answers_one_of_its_flag_s_variants_or_says_which_it_lacks() {
        let variants = ["on".to_owned(), "off".to_owned(), "true".to_owned()];
        let rule = |rule: Json, plugins: Vec<Arc<dyn TargetingRule>>| {
            JsonLogicRule::compile("f", &variants, &rule, plugins).expect("compiles")
        };
        let nl = ctx(json!({"country": "NL"}));
        let evaluate = |r: Json| rule(r, vec![]).evaluate(&nl).map(|v| v.map(str::to_owned));
        assert_eq!(
            evaluate(json!({"if": [true, "off", "on"]})),
            Ok(Some("off".into()))
        );
        assert_eq!(evaluate(json!({"==": [1, 1]})), Ok(Some("true".into())));
        assert_eq!(evaluate(json!({"var": "missing"})), Ok(None));
        assert_eq!(
            evaluate(json!({"var": "country"})),
            Err(RuleError(
                "the targeting rule answered variant \"NL\", which flag \"f\" does not have".into()
            ))
        );
        assert_eq!(
            evaluate(json!({"==": [1, 2]})),
            Err(RuleError(
                "the targeting rule answered variant \"false\", which flag \"f\" does not have"
                    .into()
            ))
        );
        assert_eq!(
            evaluate(json!({"+": [1, 2]})),
            Err(RuleError(
                "the targeting rule answered 3, which is not a variant name".into()
            ))
        );
        // A name made from a plugin's answer is not echoed (it may carry
        // another caller's data).
        let with_plugin = rule(
            json!({"cat": [{PLUGIN: [0]}, "-nl"]}),
            vec![Arc::new(OnPlugin)],
        );
        assert_eq!(
            with_plugin.evaluate(&nl),
            Err(RuleError(
                "the targeting rule answered a variant flag \"f\" does not have".into()
            ))
        );
        let answered_by_plugin = rule(json!({PLUGIN: [0]}), vec![Arc::new(OnPlugin)]);
        assert_eq!(answered_by_plugin.evaluate(&nl), Ok(Some("on")));
    }

    #[test]
    fn fractional_uses_the_v2_hashing() {
        // The test vector: "bool-fractional" + "user-1" hashes into
        // bucket 91 of 100: past 50+40, into the last 10.
        let rule = json!({"fractional": [["a", 50], ["b", 40], ["c", 10]]});
        assert_eq!(
            run("bool-fractional", rule, json!({"targetingKey": "user-1"})),
            Ok(Some("c".into()))
        );
        let rule = json!({"fractional": [["a", 50], ["b", 50]]});
        assert_eq!(
            run("f", rule, json!({})),
            Ok(None),
            "no targeting key: null"
        );
    }

    #[test]
    fn huge_fractional_weights_do_not_overflow() {
        let rule = json!({"fractional": [["a", i64::MAX], ["b", i64::MAX], ["c", 1]]});
        let answer = run("f", rule, json!({"targetingKey": "u"})).expect("evaluates");
        assert!(matches!(answer.as_deref(), Some("a" | "b")), "{answer:?}");
    }

    #[test]
    fn sem_ver_starts_with_and_the_boolean_shorthand() {
        let rule = json!({"sem_ver": [{"var": "version"}, "^", "1.2"]});
        assert_eq!(
            run("f", rule.clone(), json!({"version": "v1.4.0"})),
            Ok(Some("true".into()))
        );
        assert_eq!(
            run("f", rule, json!({"version": "2.0.0"})),
            Ok(Some("false".into()))
        );
        let rule = json!({"if": [{"starts_with": [{"var": "email"}, "ops@"]}, "staff", null]});
        assert_eq!(
            run("f", rule.clone(), json!({"email": "ops@x.io"})),
            Ok(Some("staff".into()))
        );
        assert_eq!(run("f", rule, json!({"email": "me@x.io"})), Ok(None));
    }

    #[test]
    fn the_context_is_enriched_as_flagd_does() {
        let rule = json!({"if": [{"==": [{"var": "$flagd.flagKey"}, "my-flag"]}, "yes", "no"]});
        assert_eq!(run("my-flag", rule, json!({})), Ok(Some("yes".into())));
        let rule =
            json!({"if": [{">": [{"var": "$flagd.timestamp"}, 1_700_000_000]}, "now", "past"]});
        assert_eq!(run("f", rule, json!({})), Ok(Some("now".into())));
    }

    #[test]
    fn refs_resolve_and_a_missing_one_says_so() {
        let evaluators = json!({"is_staff": {"ends_with": [{"var": "email"}, "@x.io"]}});
        let Json::Object(evaluators) = evaluators else {
            unreachable!()
        };
        let evaluators = Evaluators::new(evaluators, &DocumentLimits::default());
        let rule = json!({"if": [{"$ref": "is_staff"}, "on", "off"]});
        let resolved = resolve_refs(&rule, &evaluators).expect("resolves");
        assert_eq!(
            resolved,
            json!({"if": [{"ends_with": [{"var": "email"}, "@x.io"]}, "on", "off"]})
        );
        let err = resolve_refs(&json!({"$ref": "nope"}), &evaluators).expect_err("missing");
        assert!(
            matches!(&err, ResolveError::Unresolvable(m) if m.contains("\"nope\"")),
            "{err}"
        );
    }

    #[test]
    fn a_ref_cycle_names_the_evaluators_on_it() {
        let Json::Object(map) = json!({
            "a": {"!": {"$ref": "b"}},
            "b": {"or": [true, {"$ref": "a"}]},
            "self": {"$ref": "self"},
            "shared": true,
            "twice": {"and": [{"$ref": "shared"}, {"$ref": "shared"}]},
        }) else {
            unreachable!()
        };
        let evaluators = Evaluators::new(map, &DocumentLimits::default());
        let err = resolve_refs(&json!({"$ref": "a"}), &evaluators).expect_err("a cycle");
        assert_eq!(err.to_string(), "$ref cycle: a -> b -> a");
        let err = resolve_refs(&json!({"$ref": "self"}), &evaluators).expect_err("a cycle");
        assert_eq!(err.to_string(), "$ref cycle: self -> self");
        // An evaluator used twice side by side is no cycle.
        assert!(resolve_refs(&json!({"$ref": "twice"}), &evaluators).is_ok());
    }

    /// `{"!!": [{"!!": [ ... inner ... ]}]}`, `levels` deep.
    fn nested(levels: usize, inner: Json) -> Json {
        (0..levels).fold(inner, |rule, _| json!({"!!": [rule]}))
    }

    #[test]
    fn refs_chained_past_the_depth_bound_are_refused_not_followed() {
        // 33 evaluators of 62 levels each, each ending in the next: about
        // 2,000 levels once resolved (this file killed flaghost on reload).
        let mut map = Map::new();
        for i in 0..33 {
            let next = if i == 32 {
                json!(true)
            } else {
                json!({"$ref": format!("e{}", i + 1)})
            };
            map.insert(format!("e{i}"), nested(62, next));
        }
        let evaluators = Evaluators::new(map, &DocumentLimits::default());
        let err = resolve_refs(&json!({"$ref": "e0"}), &evaluators).expect_err("too deep");
        assert!(
            matches!(&err, ResolveError::TooLarge(m) if m.contains("128 levels")
                || m.contains("chained more than 32")),
            "{err}"
        );
        // A rule within the bound resolves (each `!!` level is an object
        // and an array: 120 levels here).
        let mut map = Map::new();
        map.insert("e".into(), nested(30, json!(true)));
        let evaluators = Evaluators::new(map, &DocumentLimits::default());
        assert!(resolve_refs(&nested(30, json!({"$ref": "e"})), &evaluators).is_ok());
    }

    #[test]
    fn an_expansion_bomb_stops_at_the_file_s_allowance() {
        // e0 uses e1 twice, e1 uses e2 twice...: 2^30 copies if followed
        // (the 20 levels took 43 s and 9.5 GB).
        let mut map = Map::new();
        for i in 0..30 {
            let next = json!({"$ref": format!("e{}", i + 1)});
            map.insert(format!("e{i}"), json!({"or": [next, next]}));
        }
        map.insert("e30".into(), json!({"==": [{"var": "country"}, "NL"]}));
        let evaluators = Evaluators::new(map, &DocumentLimits::default());
        let started = std::time::Instant::now();
        let err = resolve_refs(&json!({"$ref": "e0"}), &evaluators).expect_err("a bomb");
        assert!(
            matches!(&err, ResolveError::TooLarge(m) if m.contains("16 MiB")),
            "{err}"
        );
        // Measured: 0.5 s in a debug build (the 20 levels took 43 s).
        assert!(
            started.elapsed() < std::time::Duration::from_secs(20),
            "stopped at the bound"
        );
        // The allowance is the file's: the next flag's $ref is refused too.
        assert!(resolve_refs(&json!({"$ref": "e30"}), &evaluators).is_err());
    }

    #[test]
    fn lowered_bounds_are_the_ones_that_refuse() {
        let mut map = Map::new();
        for i in 0..4 {
            map.insert(format!("e{i}"), json!({"$ref": format!("e{}", i + 1)}));
        }
        map.insert("e4".into(), json!({"==": [{"var": "country"}, "NL"]}));
        let tight = |limits: DocumentLimits| Evaluators::new(map.clone(), &limits);
        let rule = json!({"$ref": "e0"});
        let default = DocumentLimits::default();
        assert!(resolve_refs(&rule, &tight(default)).is_ok());
        let chain = DocumentLimits {
            max_ref_chain: 3,
            ..default
        };
        let err = resolve_refs(&rule, &tight(chain)).expect_err("chain");
        assert!(
            matches!(&err, ResolveError::TooLarge(m) if m.contains("chained more than 3 deep")
                && m.contains("e0 -> e1 -> e2 -> e3")),
            "{err}"
        );
        let depth = DocumentLimits {
            max_rule_depth: 1,
            ..default
        };
        let err = resolve_refs(&rule, &tight(depth)).expect_err("depth");
        assert!(
            matches!(&err, ResolveError::TooLarge(m) if m.contains("more than 1 levels")),
            "{err}"
        );
        let expansion = DocumentLimits {
            max_expansion_bytes: 40,
            ..default
        };
        let err = resolve_refs(&rule, &tight(expansion)).expect_err("expansion");
        assert!(
            matches!(&err, ResolveError::TooLarge(m) if m.contains("past 40 bytes")),
            "{err}"
        );
    }
}
