//! The flag model: one environment's flag set as flaghost evaluates it, and
//! the flagd-format parser that builds it (see [`parse`]).
//!
//! A [`FlagSet`] is immutable once built; a change to a flag file builds a new
//! one, and readers holding the old one finish with it.

mod lint;
mod parse;
mod targeting;

pub use crate::rules::{BindError, RuleBinder};
pub use parse::{FlagFileError, Problem, parse_flag_file};
pub use targeting::{DEFAULT_MAX_EXPANSION_BYTES, DEFAULT_MAX_REF_CHAIN, MAX_RULE_DEPTH};

/// Bounds on one flag document (a flag file, or the same document read from
/// Redis): the same bounds apply wherever a document comes from, at
/// start-up and on reload alike. A document past one is refused with file
/// (or key), flag and reason, and the last good set keeps serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DocumentLimits {
    /// Largest flag file read, in bytes.
    pub max_file_bytes: usize,
    /// How deep a rule may nest once its `$ref`s are resolved (at most
    /// [`MAX_RULE_DEPTH`]).
    pub max_rule_depth: usize,
    /// How many `$ref`s may chain (an evaluator naming one naming one...).
    pub max_ref_chain: usize,
    /// What `$ref`s may add to one document's rules, in bytes.
    pub max_expansion_bytes: usize,
}

/// Default of [`DocumentLimits::max_file_bytes`].
pub const DEFAULT_MAX_FILE_BYTES: usize = 16 << 20;

impl Default for DocumentLimits {
    fn default() -> Self {
        Self {
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            max_rule_depth: MAX_RULE_DEPTH,
            max_ref_chain: DEFAULT_MAX_REF_CHAIN,
            max_expansion_bytes: DEFAULT_MAX_EXPANSION_BYTES,
        }
    }
}

/// `bytes` for a message: whole MiB as such (`16 MiB`), else in bytes.
pub fn in_words(bytes: usize) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

impl DocumentLimits {
    /// The largest Redis entry a document within these bounds can make:
    /// the file, what its `$ref`s may add once resolved, and the envelope.
    pub fn max_entry_bytes(&self) -> usize {
        self.max_file_bytes
            .saturating_add(self.max_expansion_bytes)
            .saturating_add(1 << 20)
    }
}

use std::collections::HashMap;
use std::sync::Arc;

/// The maps evaluation looks keys up in on every call, with a fast hasher
/// (foldhash): SipHash's DoS resistance buys nothing for keys that come from
/// our own flag files, and costs a third of a static flag's evaluation.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

use serde::Serialize;

use crate::rules::TargetingRule;

/// A flag value: what a variant stands for.
///
/// Integers and floats are kept apart (`1` and `1.0` are different values), as
/// OpenFeature distinguishes integer and float flags.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Value {
    /// A boolean flag value.
    Bool(bool),
    /// A string flag value.
    String(String),
    /// An integer flag value.
    Integer(i64),
    /// A float flag value; always written with a decimal point.
    Float(f64),
    /// An object flag value.
    Object(serde_json::Map<String, serde_json::Value>),
}

/// The type of a flag: all of its variants share it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    /// Boolean variants.
    Bool,
    /// String variants.
    String,
    /// Numeric variants, integer or float.
    Number,
    /// Object variants.
    Object,
}

impl Value {
    /// The type this value belongs to.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Integer(_) | Value::Float(_) => ValueType::Number,
            Value::Object(_) => ValueType::Object,
        }
    }
}

impl Value {
    /// The value as JSON; a float keeps its decimal point, so it reads back
    /// as a float.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Bool(b) => (*b).into(),
            Value::String(s) => s.as_str().into(),
            Value::Integer(i) => (*i).into(),
            Value::Float(f) => {
                serde_json::Number::from_f64(*f).map_or(serde_json::Value::Null, Into::into)
            }
            Value::Object(o) => serde_json::Value::Object(o.clone()),
        }
    }
}

impl FlagSet {
    /// The set as a flagd flag file that parses back into it, as JSON text:
    /// metadata and every flag's [`Flag::definition`].
    pub fn document(&self) -> String {
        // NB: fields in key order, as a `serde_json::Value` writes them, so
        // the text is the same as the document parsed and written again.
        #[derive(Serialize)]
        struct Document<'a> {
            flags: std::collections::BTreeMap<&'a str, &'a serde_json::value::RawValue>,
            metadata: &'a Metadata,
        }
        let document = Document {
            flags: self
                .flags
                .iter()
                .map(|(key, flag)| (key.as_str(), &*flag.definition))
                .collect(),
            metadata: &self.metadata,
        };
        // NB: maps with string keys and JSON text always serialise.
        serde_json::to_string(&document).unwrap_or_default()
    }
}

impl std::fmt::Display for ValueType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ValueType::Bool => "boolean",
            ValueType::String => "string",
            ValueType::Number => "number",
            ValueType::Object => "object",
        })
    }
}

/// Metadata of a flag or flag set: flagd allows strings, numbers and
/// booleans as values.
///
/// Serialised once, when it is built: every answer carries its flag's
/// metadata, and writing the map again for each one was the largest single
/// cost of a 1,000-flag bulk answer. It serialises as that JSON.
#[derive(Clone)]
pub struct Metadata {
    entries: serde_json::Map<String, serde_json::Value>,
    json: Box<serde_json::value::RawValue>,
}

impl Metadata {
    /// Metadata of `entries`.
    pub fn new(entries: serde_json::Map<String, serde_json::Value>) -> Self {
        // NB: a map of JSON values always serialises (string keys).
        let json = serde_json::value::to_raw_value(&entries).unwrap_or_default();
        Self { entries, json }
    }

    /// The metadata as JSON.
    pub fn json(&self) -> &str {
        self.json.get()
    }

    /// The entries, by key.
    pub fn entries(&self) -> &serde_json::Map<String, serde_json::Value> {
        &self.entries
    }
}

impl Default for Metadata {
    fn default() -> Self {
        Self::new(serde_json::Map::new())
    }
}

impl std::ops::Deref for Metadata {
    type Target = serde_json::Map<String, serde_json::Value>;
    fn deref(&self) -> &Self::Target {
        &self.entries
    }
}

impl PartialEq for Metadata {
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries
    }
}

impl std::fmt::Debug for Metadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.entries.fmt(f)
    }
}

impl Serialize for Metadata {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.json.serialize(serializer)
    }
}

/// Whether a flag is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagState {
    /// Evaluated normally.
    Enabled,
    /// Answers DISABLED with no value: the caller's code default applies.
    Disabled,
}

/// How a flag picks its variant.
#[derive(Clone)]
pub enum Targeting {
    /// No rule: the default variant, reason STATIC.
    None,
    /// A rule that picks a variant per context: JsonLogic, or a wasm plugin.
    Rule(Arc<dyn TargetingRule>),
    /// A rule flaghost loaded but cannot evaluate; flagd answers PARSE_ERROR for
    /// such a flag instead of refusing the whole file, and so does flaghost.
    Unparsable(String),
}

impl std::fmt::Debug for Targeting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Targeting::None => f.write_str("None"),
            Targeting::Rule(rule) => write!(f, "Rule({})", rule.describe()),
            Targeting::Unparsable(why) => write!(f, "Unparsable({why:?})"),
        }
    }
}

/// One flag, validated.
#[derive(Debug, Clone)]
pub struct Flag {
    /// The flag's key.
    pub key: String,
    /// Enabled or disabled.
    pub state: FlagState,
    /// Its variants by name; never empty, all of one [`ValueType`].
    pub variants: Variants,
    /// The variant served when no rule applies; `None` means the caller's code
    /// default. NB: when set, it names one of `variants` (checked at parse).
    pub default_variant: Option<String>,
    /// How the variant is picked.
    pub targeting: Targeting,
    /// The flag's metadata laid over the flag set's (flag keys win), merged
    /// once at parse so evaluation only clones it.
    pub metadata: Arc<Metadata>,
    /// The flag in the flagd format as evaluated (`$ref`s resolved, metadata
    /// merged): parsed alone, it gives this flag back. Cached in Redis.
    pub definition: Arc<serde_json::value::RawValue>,
    /// The key as a JSON string, for answers.
    pub key_json: Box<str>,
    /// The rule's plugin-pool lane, asked of it once at load: a bulk
    /// answer asks every flag, and a call through the rule's vtable to
    /// memory no other step touches cost 2% of a 900-flag answer (perf).
    lane: Option<Box<str>>,
    /// Its place in its set's key order, set when the set is built: where
    /// its evaluation counters are (see [`crate::metrics`]).
    pub(crate) position: usize,
}

/// One variant of a flag: its value, and its name and value as JSON, made
/// once at load.
///
/// NB: an answer is then copies of these, not serialisation: writing each
/// flag's strings again (escaping them byte by byte) was the largest single
/// cost of a 1,000-flag bulk answer.
#[derive(Debug, Clone)]
pub struct Variant {
    /// What the variant stands for.
    pub value: Value,
    /// `value` as JSON.
    pub value_json: Box<str>,
    /// The variant's name as a JSON string.
    pub name_json: Box<str>,
    /// Its place among its flag's variants in name order (0, 1, ...), set
    /// when the [`Variants`] are built: where its evaluation counters are
    /// (see [`crate::metrics`]).
    pub ordinal: usize,
}

impl Variant {
    /// Variant `name` serving `value`.
    pub fn new(name: &str, value: Value) -> Self {
        Self {
            value_json: json_text(&value),
            name_json: json_text(name),
            value,
            ordinal: 0,
        }
    }
}

impl PartialEq for Variant {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

/// A flag's variants, in name order, each numbered by its place (its
/// [`Variant::ordinal`]).
///
/// NB: not a hash map: a flag has a handful of variants, and every
/// evaluation finds the one it serves by name. A binary search over two to
/// ten short names costs a few compares; hashing the name cost more (perf of
/// a 45-flag bulk answer: 3% of it in `HashMap::get_key_value`). The place
/// also lets an answer cross threads as a number (see
/// [`crate::evaluation::Verdict`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Variants(Box<[(String, Variant)]>);

impl Variants {
    /// The variant `name`, with its name.
    pub fn get_key_value(&self, name: &str) -> Option<(&str, &Variant)> {
        let at = self
            .0
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()?;
        self.at(at)
    }

    /// The variant `name`.
    pub fn get(&self, name: &str) -> Option<&Variant> {
        self.get_key_value(name).map(|(_, variant)| variant)
    }

    /// Whether there is a variant `name`.
    pub fn contains_key(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// The variant numbered `ordinal`, with its name.
    pub fn at(&self, ordinal: usize) -> Option<(&str, &Variant)> {
        self.0
            .get(ordinal)
            .map(|(name, variant)| (name.as_str(), variant))
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none (only while a flag is being refused).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Each variant with its name, in name order (by ordinal).
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&String, &Variant)> {
        self.0.iter().map(|(name, variant)| (name, variant))
    }

    /// The names, in order.
    pub fn keys(&self) -> impl ExactSizeIterator<Item = &String> {
        self.0.iter().map(|(name, _)| name)
    }

    /// The variants, in name order.
    pub fn values(&self) -> impl ExactSizeIterator<Item = &Variant> {
        self.0.iter().map(|(_, variant)| variant)
    }
}

impl FromIterator<(String, Variant)> for Variants {
    /// The variants, each under its name (the last of equal names wins),
    /// numbered in name order.
    fn from_iter<I: IntoIterator<Item = (String, Variant)>>(variants: I) -> Self {
        let mut deduplicated = sorted_last_wins(variants, |(name, _)| name);
        for (ordinal, (_, variant)) in deduplicated.iter_mut().enumerate() {
            variant.ordinal = ordinal;
        }
        Self(deduplicated.into_boxed_slice())
    }
}

impl<'a> IntoIterator for &'a Variants {
    type Item = (&'a String, &'a Variant);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (String, Variant)>,
        fn(&'a (String, Variant)) -> (&'a String, &'a Variant),
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(name, variant)| (name, variant))
    }
}

impl std::ops::Index<&str> for Variants {
    type Output = Variant;
    /// # Panics
    ///
    /// When there is no variant `name` (as a map's index does).
    fn index(&self, name: &str) -> &Variant {
        match self.get(name) {
            Some(variant) => variant,
            None => panic!("no variant {name:?}"),
        }
    }
}

/// `value` as compact JSON, as serde_json writes it.
pub fn json_text(value: &(impl Serialize + ?Sized)) -> Box<str> {
    // NB: flag values, names and keys always serialise (string keys,
    // finite numbers: the parser refuses others).
    serde_json::to_string(value)
        .unwrap_or_else(|_| "null".into())
        .into_boxed_str()
}

impl Flag {
    /// The lane of the plugin pool the flag's evaluations wait in, if its
    /// rule runs guest code (see [`crate::rules::TargetingRule::lane`]).
    pub fn lane(&self) -> Option<&str> {
        self.lane.as_deref()
    }

    /// The type of the flag's variants.
    pub fn value_type(&self) -> Option<ValueType> {
        self.variants.values().next().map(|v| v.value.value_type())
    }
}

/// One environment's flags, as evaluated: immutable, shared by `Arc`.
#[derive(Debug)]
pub struct FlagSet {
    /// The environment these flags belong to.
    pub environment: String,
    /// The flags, by key.
    pub flags: Flags,
    /// The flag set's own metadata (`metadata` at the top of the file).
    pub metadata: Arc<Metadata>,
    /// Hex digest of the file the set was built from: two sets with the same
    /// digest evaluate identically.
    pub digest: String,
    /// Flags that loaded with a rule flaghost cannot evaluate (they answer
    /// PARSE_ERROR), each with the reason.
    pub warnings: Vec<Problem>,
    /// What loaded otherwise than written (duplicate keys, inexact numbers,
    /// `fractional` weights that are not non-negative integers), each with
    /// its flag and place.
    pub lints: Vec<Problem>,
    /// Its evaluation counters, found once (at its first evaluation) so
    /// that counting one is an index and an atomic add.
    pub counters: std::sync::OnceLock<Arc<crate::metrics::SetCounters>>,
}

/// One set's flags: looked up by key, and walked in key order.
///
/// NB: kept sorted by key when built, so a bulk answer (every flag, in key
/// order, so equal answers are equal bytes) neither sorts nor looks a flag up
/// again on each request.
#[derive(Debug, Default)]
pub struct Flags {
    sorted: Vec<Flag>,
    /// Key to its place in `sorted`.
    index: FastMap<String, usize>,
}

impl Flags {
    /// The flag `key`.
    pub fn get(&self, key: &str) -> Option<&Flag> {
        self.index.get(key).map(|&at| &self.sorted[at])
    }

    /// Whether there is a flag `key`.
    pub fn contains_key(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    /// How many flags.
    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    /// Each flag with its key, in key order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&String, &Flag)> {
        self.sorted.iter().map(|flag| (&flag.key, flag))
    }

    /// The keys, in order.
    pub fn keys(&self) -> impl ExactSizeIterator<Item = &String> {
        self.sorted.iter().map(|flag| &flag.key)
    }

    /// The flags, in key order.
    pub fn values(&self) -> impl ExactSizeIterator<Item = &Flag> {
        self.sorted.iter()
    }
}

impl FromIterator<Flag> for Flags {
    /// The flags, each under its own key (the last of equal keys wins).
    fn from_iter<I: IntoIterator<Item = Flag>>(flags: I) -> Self {
        let mut deduplicated = sorted_last_wins(flags, |flag| &flag.key);
        for (at, flag) in deduplicated.iter_mut().enumerate() {
            flag.position = at;
        }
        let index = deduplicated
            .iter()
            .enumerate()
            .map(|(at, flag)| (flag.key.clone(), at))
            .collect();
        Self {
            sorted: deduplicated,
            index,
        }
    }
}

/// `items` sorted by `key`, the last of equal keys kept.
fn sorted_last_wins<T>(items: impl IntoIterator<Item = T>, key: impl Fn(&T) -> &str) -> Vec<T> {
    let mut sorted: Vec<T> = items.into_iter().collect();
    // NB: stable, then keeping the last of a run: the last of equal keys wins.
    sorted.sort_by(|a, b| key(a).cmp(key(b)));
    let mut deduplicated: Vec<T> = Vec::with_capacity(sorted.len());
    for item in sorted {
        match deduplicated.last_mut() {
            Some(last) if key(last) == key(&item) => *last = item,
            _ => deduplicated.push(item),
        }
    }
    deduplicated
}

impl<'a> IntoIterator for &'a Flags {
    type Item = (&'a String, &'a Flag);
    type IntoIter = Box<dyn Iterator<Item = (&'a String, &'a Flag)> + 'a>;
    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

impl std::ops::Index<&str> for Flags {
    type Output = Flag;
    /// # Panics
    ///
    /// When there is no flag `key` (as a map's index does).
    fn index(&self, key: &str) -> &Flag {
        match self.get(key) {
            Some(flag) => flag,
            None => panic!("no flag {key:?}"),
        }
    }
}
