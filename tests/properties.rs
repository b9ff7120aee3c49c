//! Property tests over what an adversary controls: flag documents (files,
//! and the same documents as Redis entries), Redis entries, and OFREP
//! requests.
//!
//! The generators build *valid* flagd documents (nested JsonLogic, `$ref`
//! chains, `fractional`, `sem_ver`, the example plugins) and OFREP requests,
//! then mutate most of them: a value swapped for a hostile one, a key
//! renamed, bytes flipped, cut, inserted or repeated. So most cases reach
//! the compiler and the evaluator rather than dying in the JSON parser, and
//! the unmutated ones check that valid input is taken.
//!
//! Every property runs `PROPTEST_CASES` cases (default [`CASES`]), which
//! bounds its time in CI. A failing case is shrunk, and its seed kept in
//! `tests/properties.proptest-regressions` (commit it), which is replayed
//! first on every later run.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use flaghost::cache::{EntryReader, encode};
use flaghost::environments::{Environments, Timing};
use flaghost::flags::{DocumentLimits, RuleBinder, parse_flag_file};
use flaghost::http::{AppState, HttpOptions, app};
use flaghost::plugins::{Compiler, PluginRuntime, PluginSet};
use flaghost::signing::SigningKey;
use flaghost::store::{DirStore, FlagStore};
use flaghost_tests::{answer_limits, build_plugins, root};
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{Map, Value as Json, json};
use sha2::Digest as _;
use tower::ServiceExt as _;

/// Cases per property unless `PROPTEST_CASES` says otherwise. Measured in
/// a debug build on a 2-core machine: 1,000 cases of each of the three
/// properties take 11 s, so 512 cost CI about 6 s. Of 500 flag-file cases,
/// 172 were valid and loaded, 83 of 328 mutated ones still loaded, and
/// their bulk answers were DEFAULT, TARGETING_MATCH, STATIC, GENERAL and
/// PARSE_ERROR: the cases reach the evaluator.
const CASES: u32 = 512;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(CASES);
    ProptestConfig {
        cases,
        // NB: shrinking a failure re-runs cases; bounded so a failing CI
        // run still ends.
        max_shrink_iters: 2_000,
        ..ProptestConfig::default()
    }
}

/// What every case shares: a runtime, and the example plugins loaded once.
struct World {
    rt: tokio::runtime::Runtime,
    runtime: Arc<PluginRuntime>,
    plugins: PluginSet,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        build_plugins();
        let runtime =
            Arc::new(PluginRuntime::new(answer_limits(), Compiler::InProcess).expect("engine"));
        let (plugins, errors) = runtime
            .load_dir(&root().join("target/plugins"))
            .expect("plugin dir");
        assert!(errors.is_empty(), "{errors:?}");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        World {
            rt,
            runtime,
            plugins,
        }
    })
}

/// The OFREP router over the flag files in `flags`, `env` by default.
fn router(flags: &Path, env: &str) -> (Arc<Environments>, axum::Router) {
    let world = world();
    let store: Arc<dyn FlagStore> = Arc::new(DirStore::new(flags, world.plugins.clone()));
    let environments = Arc::new(Environments::new(store, None, Timing::default()));
    let metrics_environments = environments.clone();
    let router = app(
        AppState {
            environments: environments.clone(),
            default_environment: env.into(),
            admin: None,
            metrics_token: None,
            plugins: Default::default(),
            plugin_changes: None,
            plugin_pool: world.runtime.pool().clone(),
            plugin_budget: world.runtime.limits().request_budget(),
            api_keys: None,
            metrics: std::sync::Arc::new(flaghost::metrics::Metrics::of_environments(
                metrics_environments,
            )),
        },
        &HttpOptions::default(),
    );
    (environments, router)
}

/// An answer: status and body (JSON when it parses, else its text).
async fn send(router: &axum::Router, request: Request<Body>) -> (StatusCode, Json) {
    let response = router.clone().oneshot(request).await.expect("infallible");
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 64 << 20)
        .await
        .expect("a body");
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Json::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, body)
}

fn post(path: &str, body: Vec<u8>) -> Request<Body> {
    Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .expect("a request")
}

/// `text` percent-encoded for a URL path segment.
fn path_segment(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// ---------------------------------------------------------------- generators

const ATTRIBUTES: &[&str] = &[
    "targetingKey",
    "country",
    "plan",
    "age",
    "email",
    "version",
    "account.tier",
    "score",
    "beta",
    "tags",
];
const VARIANT_NAMES: &[&str] = &["on", "off", "red", "blue", "green", "a", "b"];
const FLAG_KEYS: &[&str] = &["alpha", "beta-flag", "c_1", "d.e", "new-checkout", "x"];
const EVALUATORS: usize = 4;

fn literal() -> impl Strategy<Value = Json> {
    prop_oneof![
        any::<bool>().prop_map(Json::from),
        (-1000i64..1000).prop_map(Json::from),
        (-1.0e6f64..1.0e6).prop_map(Json::from),
        select(
            &[
                "NL",
                "BE",
                "pro",
                "free",
                "1.2.3",
                "2.0.0-beta.1",
                "a@example.com",
                ""
            ][..]
        )
        .prop_map(Json::from),
        Just(Json::Null),
    ]
}

/// `{name: args}`: one JsonLogic operation.
fn op(name: &str, args: Json) -> Json {
    let mut map = Map::new();
    map.insert(name.to_owned(), args);
    Json::Object(map)
}

fn var() -> impl Strategy<Value = Json> {
    prop_oneof![
        6 => select(ATTRIBUTES).prop_map(|a| json!({ "var": a })),
        1 => Just(json!({"var": "$flagd.flagKey"})),
        // A computed path: the rule may read anything, so it is given every
        // attribute (the other conversion path).
        1 => (select(ATTRIBUTES), 0usize..4).prop_map(|(a, at)| {
            let at = at.min(a.len());
            json!({"var": {"cat": [&a[..at], &a[at..]]}})
        }),
    ]
}

/// A JsonLogic rule over the context, using flagd's operators and `$ref`s
/// to the file's evaluators `e0`..`e3` (which may refer to each other, in
/// cycles too: such a flag loads and answers PARSE_ERROR).
fn rule() -> impl Strategy<Value = Json> {
    let leaf = prop_oneof![
        3 => var(),
        3 => literal(),
        1 => (0..EVALUATORS).prop_map(|i| json!({ "$ref": format!("e{i}") })),
    ];
    leaf.prop_recursive(5, 48, 4, |inner| {
        prop_oneof![
            (
                select(
                    &[
                        "==", "!=", "===", "<", ">", "<=", ">=", "in", "+", "-", "*", "/", "%"
                    ][..]
                ),
                inner.clone(),
                inner.clone()
            )
                .prop_map(|(name, a, b)| op(name, json!([a, b]))),
            (
                select(
                    &[
                        "and", "or", "!", "!!", "cat", "max", "min", "merge", "missing"
                    ][..]
                ),
                prop::collection::vec(inner.clone(), 0..4)
            )
                .prop_map(|(name, args)| op(name, Json::from(args))),
            (inner.clone(), inner.clone(), inner.clone())
                .prop_map(|(c, a, b)| json!({"if": [c, a, b]})),
            (
                var(),
                select(&["=", "!=", ">", ">=", "<", "<=", "^", "~"][..]),
                select(&["1.2.3", "2.0.0", "0.0.1-alpha", "v1", "x"][..])
            )
                .prop_map(|(v, op, version)| json!({"sem_ver": [v, op, version]})),
            (select(&["starts_with", "ends_with"][..]), var(), literal())
                .prop_map(|(name, v, affix)| op(name, json!([v, affix]))),
            (var(), prop::collection::vec(literal(), 0..4))
                .prop_map(|(v, list)| json!({"in": [v, list]})),
            (
                prop::option::of(var()),
                prop::collection::vec((select(VARIANT_NAMES), 0u32..100), 1..4)
            )
                .prop_map(|(by, buckets)| {
                    let mut args: Vec<Json> = by.into_iter().collect();
                    args.extend(buckets.into_iter().map(|(v, w)| json!([v, w])));
                    json!({ "fractional": args })
                }),
        ]
    })
}

/// A variant value of each flag type.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Bool,
    String,
    Integer,
    Float,
    Object,
}

fn value_of(kind: Kind) -> BoxedStrategy<Json> {
    match kind {
        Kind::Bool => any::<bool>().prop_map(Json::from).boxed(),
        Kind::String => select(&["A", "B", "hello", "", "ünïcode"][..])
            .prop_map(Json::from)
            .boxed(),
        Kind::Integer => (-1_000_000i64..1_000_000).prop_map(Json::from).boxed(),
        Kind::Float => (-1000i32..1000)
            .prop_map(|n| Json::from(f64::from(n) + 0.5))
            .boxed(),
        Kind::Object => (0i64..10).prop_map(|n| json!({"n": n, "k": "v"})).boxed(),
    }
}

/// A targeting rule whose answers are `names` (through `if`, `fractional`
/// or an example plugin), or any rule at all.
fn targeting(names: Vec<String>) -> BoxedStrategy<Json> {
    let pick = select(names.clone());
    let plugin = (
        select(ATTRIBUTES),
        prop::collection::vec(select(&["NL", "BE", "pro", "beta", "user-1"][..]), 0..3),
        pick.clone(),
        pick.clone(),
        0u8..=100,
        any::<bool>(),
    )
        .prop_map(
            |(attribute, values, variant, otherwise, percentage, allow)| {
                if allow {
                    json!({"plugin": ["allow-list",
                    {"attribute": attribute, "values": values, "variant": variant}]})
                } else {
                    json!({"plugin": ["percentage-rollout",
                    {"percentage": percentage, "variant": variant, "otherwise": otherwise}]})
                }
            },
        );
    prop_oneof![
        3 => (rule(), pick.clone(), pick.clone()).prop_map(|(c, a, b)| json!({"if": [c, a, b]})),
        2 => prop::collection::vec((pick.clone(), 0u32..100), 1..4).prop_map(|buckets| {
            json!({"fractional": buckets.into_iter().map(|(v, w)| json!([v, w])).collect::<Vec<_>>()})
        }),
        2 => (rule(), plugin, pick).prop_map(|(c, p, v)| json!({"if": [c, p, v]})),
        // NB: flagd's schema wants an object here.
        1 => rule().prop_map(|r| if r.is_object() { r } else { json!({"if": [r]}) }),
    ]
    .boxed()
}

fn flag() -> impl Strategy<Value = Json> {
    (
        select(
            &[
                Kind::Bool,
                Kind::String,
                Kind::Integer,
                Kind::Float,
                Kind::Object,
            ][..],
        ),
        prop::sample::subsequence(VARIANT_NAMES.to_vec(), 1..4),
    )
        .prop_flat_map(|(kind, names)| {
            let names: Vec<String> = names.into_iter().map(str::to_owned).collect();
            (
                prop::collection::vec(value_of(kind), names.len()),
                prop::option::of(select(names.clone())),
                prop::option::of(targeting(names.clone())),
                select(&["ENABLED", "ENABLED", "DISABLED"][..]),
                any::<bool>(),
                Just(names),
            )
        })
        .prop_map(|(values, default, targeting, state, metadata, names)| {
            let variants: Map<String, Json> = names.into_iter().zip(values).collect();
            let mut flag = json!({"state": state, "variants": variants});
            if let Some(default) = default {
                flag["defaultVariant"] = json!(default);
            }
            if let Some(targeting) = targeting {
                flag["targeting"] = targeting;
            }
            if metadata {
                flag["metadata"] = json!({"team": "growth", "version": 3});
            }
            flag
        })
}

/// A valid flagd document: flags, up to four `$evaluators`, set metadata.
fn document() -> impl Strategy<Value = Json> {
    (
        prop::collection::btree_map(select(FLAG_KEYS), flag(), 1..5),
        prop::collection::vec(rule(), 0..=EVALUATORS),
        any::<bool>(),
    )
        .prop_map(|(flags, evaluators, metadata)| {
            let mut doc = json!({ "flags": flags });
            if !evaluators.is_empty() {
                // NB: a `$ref` to an evaluator not generated is a missing
                // one: the flag loads and answers PARSE_ERROR.
                doc["$evaluators"] = evaluators
                    .into_iter()
                    .enumerate()
                    .map(|(i, rule)| (format!("e{i}"), rule))
                    .collect::<Map<_, _>>()
                    .into();
            }
            if metadata {
                doc["metadata"] = json!({"owner": "platform", "flagSetId": "props"});
            }
            doc
        })
}

/// A value written to hurt.
fn hostile() -> impl Strategy<Value = Json> {
    prop_oneof![
        Just(Json::Null),
        Just(json!(true)),
        Just(json!(-1)),
        Just(json!(0.5)),
        Just(json!(1e300)),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        Just(json!("")),
        Just(json!("\u{0}\u{202e}é∂")),
        Just(Json::String("a".repeat(10_000))),
        Just(json!([])),
        Just(json!({})),
        (1usize..200).prop_map(|depth| (0..depth).fold(json!(true), |v, _| json!([v]))),
        (1usize..200).prop_map(|depth| (0..depth).fold(json!(true), |v, _| json!({"!!": [v]}))),
        Just(json!({"$ref": "e0"})),
        Just(json!({"$ref": "nowhere"})),
        Just(json!({"$ref": 7})),
        Just(json!({"var": ""})),
        Just(json!({"var": ["country", "NL"]})),
        Just(json!({"fractional": []})),
        Just(json!({"fractional": [["on", 1e300], ["off", -1]]})),
        Just(json!({"fractional": [{"var": "x"}, ["on", "50"]]})),
        Just(json!({"sem_ver": [null, "~", {}]})),
        Just(json!({"plugin": ["allow-list", {}]})),
        Just(json!({"plugin": ["ghost", {"variant": "on"}]})),
        Just(json!({"plugin": []})),
        Just(json!({"if": []})),
        Just(json!({"reduce": [[1, 2], {"+": [{"var": "current"}, {"var": "accumulator"}]}, 0]})),
        Just(json!({"state": "ENABLED", "variants": {}})),
        literal(),
    ]
}

/// One change to a document: on its JSON first, then on its bytes.
#[derive(Debug, Clone)]
enum Mutation {
    /// The value at this pre-order position becomes another.
    Replace(usize, Json),
    /// The object key at this position is renamed.
    Rename(usize, &'static str),
    /// A byte is XORed with a mask.
    Flip(usize, u8),
    /// The bytes end here.
    Cut(usize),
    /// A byte is inserted.
    Insert(usize, u8),
    /// A span is repeated.
    Repeat(usize, usize, u8),
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    let one = prop_oneof![
        4 => (any::<usize>(), hostile()).prop_map(|(at, v)| Mutation::Replace(at, v)),
        2 => (any::<usize>(), select(&["$ref", "variants", "state", "defaultVariant",
                "targeting", "flags", "$evaluators", "metadata", "", "context",
                "targetingKey", "signature", "digest", "flagSet", "format"][..]))
            .prop_map(|(at, k)| Mutation::Rename(at, k)),
        1 => (any::<usize>(), 1u8..=255).prop_map(|(at, mask)| Mutation::Flip(at, mask)),
        1 => any::<usize>().prop_map(Mutation::Cut),
        1 => (any::<usize>(), select(&b"{}[]\",:\\0-e.9 \x00\xff"[..]))
            .prop_map(|(at, b)| Mutation::Insert(at, b)),
        1 => (any::<usize>(), 1usize..64, 1u8..8).prop_map(|(at, len, n)| Mutation::Repeat(at, len, n)),
    ];
    // NB: about a third of the cases stay valid.
    prop_oneof![
        1 => Just(Vec::new()),
        2 => prop::collection::vec(one, 1..4),
    ]
}

/// `doc` with `mutations` applied, as bytes.
fn mutated(doc: &Json, mutations: &[Mutation]) -> Vec<u8> {
    let mut doc = doc.clone();
    for m in mutations {
        match m {
            Mutation::Replace(at, value) => {
                let n = count(&doc);
                replace(&mut doc, &mut (at % n), value);
            }
            Mutation::Rename(at, key) => {
                let n = count(&doc);
                rename(&mut doc, &mut (at % n), key);
            }
            _ => {}
        }
    }
    let mut bytes = serde_json::to_vec(&doc).expect("serialises");
    for m in mutations {
        let len = bytes.len().max(1);
        match *m {
            Mutation::Flip(at, mask) => {
                if let Some(b) = bytes.get_mut(at % len) {
                    *b ^= mask;
                }
            }
            Mutation::Cut(at) => bytes.truncate(at % len),
            Mutation::Insert(at, b) => bytes.insert((at % len).min(bytes.len()), b),
            Mutation::Repeat(at, span, times) => {
                let start = (at % len).min(bytes.len());
                let end = (start + span).min(bytes.len());
                let piece = bytes[start..end].to_vec();
                for _ in 0..times {
                    bytes.splice(end..end, piece.iter().copied());
                }
            }
            Mutation::Replace(..) | Mutation::Rename(..) => {}
        }
    }
    bytes
}

fn count(v: &Json) -> usize {
    1 + match v {
        Json::Array(items) => items.iter().map(count).sum(),
        Json::Object(map) => map.values().map(count).sum(),
        _ => 0,
    }
}

/// Replaces the value at pre-order position `*at`; `true` once done.
fn replace(v: &mut Json, at: &mut usize, with: &Json) -> bool {
    if *at == 0 {
        *v = with.clone();
        return true;
    }
    *at -= 1;
    match v {
        Json::Array(items) => items.iter_mut().any(|item| replace(item, at, with)),
        Json::Object(map) => map.values_mut().any(|item| replace(item, at, with)),
        _ => false,
    }
}

/// Renames a key of the object at or after pre-order position `*at`.
fn rename(v: &mut Json, at: &mut usize, to: &str) -> bool {
    if *at == 0
        && let Json::Object(map) = v
        && let Some(key) = map.keys().next().cloned()
        && let Some(value) = map.remove(&key)
    {
        map.insert(to.to_owned(), value);
        return true;
    }
    *at = at.saturating_sub(1);
    match v {
        Json::Array(items) => items.iter_mut().any(|item| rename(item, at, to)),
        Json::Object(map) => map.values_mut().any(|item| rename(item, at, to)),
        _ => false,
    }
}

/// A caller's context: some of the attributes rules read, and odd ones.
fn context() -> impl Strategy<Value = Json> {
    let attribute = prop_oneof![
        4 => select(ATTRIBUTES).prop_map(str::to_owned),
        1 => select(&["", "a.b.c", "$flagd", "\u{0}", "é", "__proto__"][..]).prop_map(str::to_owned),
    ];
    let value = prop_oneof![
        4 => literal(),
        1 => select(&["beta", "staff"][..]).prop_map(|tier| json!({"tier": tier})),
        1 => prop::collection::vec(literal(), 0..3).prop_map(Json::from),
    ];
    // NB: a targeting key is a string (anything else is an invalid
    // context, a 400); mutations make the other kinds.
    prop::collection::btree_map(attribute, value, 0..6).prop_map(|map| {
        Json::Object(
            map.into_iter()
                .map(|(k, v)| match (k.as_str(), v) {
                    ("targetingKey", Json::String(s)) => (k, Json::String(s)),
                    ("targetingKey", other) => (k, Json::String(other.to_string())),
                    (_, v) => (k, v),
                })
                .collect(),
        )
    })
}

/// Whether `served` is the variant value `written` (numbers compared as
/// numbers: the answer may print them otherwise).
fn same(served: &Json, written: &Json) -> bool {
    match (served, written) {
        (Json::Number(a), Json::Number(b)) => a.as_f64() == b.as_f64(),
        _ => served == written,
    }
}

const REASONS: &[&str] = &[
    "STATIC",
    "DEFAULT",
    "TARGETING_MATCH",
    "SPLIT",
    "DISABLED",
    "ERROR",
    "STALE",
];
const ERROR_CODES: &[&str] = &[
    "PARSE_ERROR",
    "TARGETING_KEY_MISSING",
    "INVALID_CONTEXT",
    "GENERAL",
    "FLAG_NOT_FOUND",
    "TYPE_MISMATCH",
];

/// Checks one OFREP evaluation answer for flag `key` against the document
/// it was served from (`None`: unknown, a mutated one).
fn check_answer(item: &Json, doc: Option<&Json>) -> Result<(), TestCaseError> {
    let key = item["key"].as_str().unwrap_or_default();
    if let Some(code) = item.get("errorCode") {
        prop_assert!(
            code.as_str().is_some_and(|c| ERROR_CODES.contains(&c)),
            "{item}"
        );
        return Ok(());
    }
    let reason = item["reason"].as_str().unwrap_or_default();
    prop_assert!(REASONS.contains(&reason), "{item}");
    if let (Some(value), Some(doc)) = (item.get("value"), doc) {
        let variants = &doc["flags"][key]["variants"];
        let variant = item["variant"].as_str().unwrap_or_default();
        prop_assert!(
            variants
                .get(variant)
                .is_some_and(|written| same(value, written)),
            "{key}: served {value} as {variant:?}, not one of {variants}"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------- properties

proptest! {
    #![proptest_config(config())]

    /// A flag file, valid or mutated, loads or is refused, never panics;
    /// once loaded every flag evaluates (bulk and alone) to one of its
    /// variants or an OFREP error, never a 5xx.
    #[test]
    fn any_flag_file_loads_or_is_refused_and_evaluates_without_a_5xx(
        doc in document(),
        changes in mutations(),
        contexts in prop::collection::vec(context(), 1..3),
    ) {
        let world = world();
        let dir = tempfile::tempdir().expect("tmp");
        let bytes = mutated(&doc, &changes);
        std::fs::write(dir.path().join("props.json"), &bytes).expect("write");
        let (environments, router) = router(dir.path(), "props");
        let loaded = world.rt.block_on(environments.refresh("props"));
        if changes.is_empty() {
            prop_assert!(loaded.is_ok(), "a valid document is refused: {:?}\n{doc:#}", loaded.err());
        }
        if loaded.is_err() {
            return Ok(());
        }
        let served: Option<Json> = serde_json::from_slice(&bytes).ok();
        let served = if changes.is_empty() { Some(doc.clone()) } else { served };
        let keys: Vec<String> = served
            .as_ref()
            .and_then(|d| d["flags"].as_object())
            .map(|flags| flags.keys().cloned().collect())
            .unwrap_or_default();
        let mut first_answers = Vec::new();
        for context in &contexts {
            let body = serde_json::to_vec(&json!({"context": context})).expect("json");
            let (status, answer) = world
                .rt
                .block_on(send(&router, post("/ofrep/v1/evaluate/flags", body.clone())));
            prop_assert_eq!(status, StatusCode::OK, "{}: {}", context, answer);
            prop_assert!(answer["flags"].is_array(), "{}", answer);
            first_answers.push(answer.clone());
            let flags = answer["flags"].as_array().cloned().unwrap_or_default();
            for item in &flags {
                check_answer(item, served.as_ref())?;
            }
            for key in keys.iter().take(5) {
                let path = format!("/ofrep/v1/evaluate/flags/{}", path_segment(key));
                let (status, answer) = world.rt.block_on(send(&router, post(&path, body.clone())));
                prop_assert!(
                    [StatusCode::OK, StatusCode::BAD_REQUEST, StatusCode::NOT_FOUND].contains(&status),
                    "{key}: {status} {answer}"
                );
                prop_assert!(answer.is_object(), "{key}: {status} {answer}");
                if status == StatusCode::OK {
                    check_answer(&answer, served.as_ref())?;
                }
            }
        }
        // Asked again after the other contexts, each context gets the same
        // answers: nothing of one request reaches the next.
        for (context, first) in contexts.iter().zip(&first_answers).rev() {
            let body = serde_json::to_vec(&json!({"context": context})).expect("json");
            let (_, again) = world
                .rt
                .block_on(send(&router, post("/ofrep/v1/evaluate/flags", body)));
            prop_assert_eq!(&again["flags"], &first["flags"], "{}", context);
        }
    }

    /// Any body and flag key a caller sends is answered with a JSON body
    /// and a status OFREP documents (or flaghost's documented 413), never a
    /// 5xx.
    #[test]
    fn any_ofrep_request_is_answered_in_json_without_a_5xx(
        context in context(),
        changes in mutations(),
        key in prop_oneof![
            3 => select(&["new-checkout", "dark-mode", "search-results", "beta-search",
                "items-per-page", "nope"][..]).prop_map(str::to_owned),
            1 => prop::collection::vec(any::<u8>(), 0..12)
                .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        ],
        bulk in any::<bool>(),
        wrap in prop_oneof![3 => Just(true), 1 => Just(false)],
    ) {
        static EXAMPLES: OnceLock<axum::Router> = OnceLock::new();
        let world = world();
        let router = EXAMPLES.get_or_init(|| {
            let (environments, router) = router(&root().join("examples/flags"), "production");
            world.rt.block_on(environments.refresh("production")).expect("examples load");
            router
        });
        let request = if wrap { json!({"context": context}) } else { context };
        let body = mutated(&request, &changes);
        let path = if bulk {
            "/ofrep/v1/evaluate/flags".to_owned()
        } else {
            format!("/ofrep/v1/evaluate/flags/{}", path_segment(&key))
        };
        let (status, answer) = world.rt.block_on(send(router, post(&path, body)));
        prop_assert!(!status.is_server_error(), "{path}: {status} {answer}");
        prop_assert!(
            [StatusCode::OK, StatusCode::BAD_REQUEST, StatusCode::NOT_FOUND,
             StatusCode::PAYLOAD_TOO_LARGE].contains(&status),
            "{path}: {status} {answer}"
        );
        prop_assert!(answer.is_object(), "{path}: {status} {answer}");
        if status.is_client_error() {
            prop_assert!(answer["errorCode"].is_string(), "{path}: {status} {answer}");
        }
        if changes.is_empty() && wrap {
            // A valid request is not refused as one.
            prop_assert_ne!(status, StatusCode::BAD_REQUEST, "{}: {}", path, answer);
        }
    }

    /// A Redis entry, valid or mutated, reads back or is a miss, never
    /// panics; with a signing key a changed entry never reads back as
    /// anything but what was written.
    #[test]
    fn any_redis_entry_reads_back_or_is_a_miss_and_a_signed_one_cannot_be_altered(
        doc in document(),
        changes in mutations(),
        signed in any::<bool>(),
    ) {
        let world = world();
        let bytes = serde_json::to_vec(&doc).expect("json");
        let limits = DocumentLimits::default();
        let Ok(mut set) = parse_flag_file("props.json", "props", &bytes, &world.plugins, &limits) else {
            return Err(TestCaseError::fail(format!("a valid document is refused:\n{doc:#}")));
        };
        set.digest = format!("{:x}", sha2::Sha256::digest(&bytes));
        let key = Arc::new(SigningKey::from_secret("a shared secret of some length"));
        let (entry, _) = encode(&set, std::time::Duration::from_secs(300), signed.then_some(&*key));
        let entry_doc: Json = serde_json::from_slice(&entry).expect("an entry is JSON");
        let planted = mutated(&entry_doc, &changes);
        let binder: Arc<dyn RuleBinder + Send + Sync> = Arc::new(world.plugins.clone());
        let reader = EntryReader::new(
            binder,
            signed.then(|| key.clone()),
            limits,
        );
        let read = reader.read_entry("props", &planted);
        if changes.is_empty() {
            prop_assert!(read.is_ok(), "a valid entry is a miss: {:?}", read.err());
        }
        if signed && planted != serde_json::to_vec(&entry_doc).expect("json")
            && let Ok(back) = read
        {
            prop_assert_eq!(&back.digest, &set.digest);
            prop_assert_eq!(back.document(), set.document(), "an altered signed entry was taken");
        }
    }
}
