//! One test per way a plugin can fail, each with a small purpose-built guest
//! component (plugins/fixtures/), served beside a well-behaved plugin whose
//! flags must keep answering correctly, during and after the failure.

use std::time::Duration;

use flaghost::plugins::{Limits, PluginError, PluginRuntime};
use flaghost_tests::{Dirs, Flaghost, compiler, fixture, plugin};
use serde_json::{Value, json};

/// The good flag beside every bad one: on for country NL (allow-list).
fn neighbour_flag() -> Value {
    json!({"state": "ENABLED", "variants": {"on": true, "off": false}, "defaultVariant": "off",
           "targeting": {"plugin": ["allow-list",
               {"attribute": "country", "values": ["NL"], "variant": "on"}]}})
}

/// A flag directory with a good flag (`neighbour`, allow-list) and a flag
/// (`bad`) whose rule runs `fixture`.
fn dirs_with(fixture_name: &str, config: Value) -> Dirs {
    Dirs::new()
        .plugin("allow-list", &plugin("allow-list"))
        .plugin(fixture_name, &fixture(fixture_name))
        .flag_file(
            "prod",
            &json!({"flags": {
                "neighbour": neighbour_flag(),
                "bad": {"state": "ENABLED", "variants": {"on": true, "off": false},
                        "defaultVariant": "off",
                        "targeting": {"plugin": [fixture_name, config]}}
            }}),
        )
}

/// Short deadlines; no quarantine (each test sees every failure run).
fn limits() -> Limits {
    Limits {
        deadline: Duration::from_millis(50),
        memory_bytes: 16 << 20,
        quarantine_after: u32::MAX,
        ..Limits::default()
    }
}

/// The neighbour answers right, for a matching and a non-matching context.
async fn neighbour_is_fine(fh: &Flaghost) {
    let (status, body) = fh.evaluate("neighbour", json!({"country": "NL"})).await;
    assert_eq!(
        (status, &body["value"], &body["reason"]),
        (200, &json!(true), &json!("TARGETING_MATCH")),
        "{body}"
    );
    let (status, body) = fh.evaluate("neighbour", json!({"country": "US"})).await;
    assert_eq!(
        (status, &body["value"], &body["reason"]),
        (200, &json!(false), &json!("DEFAULT")),
        "{body}"
    );
}

/// Evaluates `bad` several times while the neighbour is evaluated
/// concurrently; every `bad` answer must be an ERROR whose details contain
/// `says`, and the neighbour must stay right throughout and after.
async fn fails_alone(fixture_name: &str, says: &str, limits: Limits) {
    let dirs = dirs_with(fixture_name, json!({}));
    let fh = Flaghost::start(&dirs.config("prod", limits))
        .await
        .expect("starts");
    let neighbours = async {
        for _ in 0..20 {
            neighbour_is_fine(&fh).await;
        }
    };
    let failures = async {
        for _ in 0..4 {
            let (status, body) = fh.evaluate("bad", json!({"targetingKey": "u"})).await;
            assert_eq!(status, 400, "{body}");
            assert_eq!(body["errorCode"], "GENERAL", "{body}");
            assert_eq!(body["key"], "bad");
            let details = body["errorDetails"].as_str().expect("details");
            assert!(
                details.contains(fixture_name),
                "names the plugin: {details}"
            );
            assert!(details.contains(says), "says {says:?}: {details}");
        }
    };
    tokio::join!(neighbours, failures);
    neighbour_is_fine(&fh).await;
    fh.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_is_an_error_and_the_instance_is_replaced() {
    fails_alone("trap", "trapped", limits()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_loop_is_stopped_at_the_deadline() {
    fails_alone("endless-loop", "deadline", limits()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_growth_past_the_cap_is_stopped() {
    // A deadline long enough that only the cap can stop it.
    let limits = Limits {
        deadline: Duration::from_secs(5),
        ..limits()
    };
    fails_alone("memory-hog", "memory cap", limits).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_a_file_fails_for_want_of_any_directory() {
    // No directory is preopened, so the guest's own open fails and it
    // answers its error.
    fails_alone("reads-file", "answered an error", limits()).await;
}

/// Unix seconds now.
fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clock_and_environment_a_guest_reads_are_the_evaluations() {
    let dirs = Dirs::new()
        .plugin("reads-clock", &fixture("reads-clock"))
        .plugin("reads-env", &fixture("reads-env"))
        .flag_file(
            "prod",
            &json!({"flags": {
                "clock": {"state": "ENABLED", "variants": {"even": 0, "odd": 1}, "defaultVariant": "even",
                          "targeting": {"plugin": ["reads-clock", {}]}},
                "env": {"state": "ENABLED", "variants": {"empty": true, "something": false},
                        "defaultVariant": "something", "targeting": {"plugin": ["reads-env", {}]}}
            }}),
        );
    for isolation in [
        flaghost::plugins::Isolation::Fresh,
        flaghost::plugins::Isolation::Reuse,
    ] {
        let fh = Flaghost::start(&dirs.config(
            "prod",
            Limits {
                isolation,
                ..limits()
            },
        ))
        .await
        .expect("starts");
        let mut checked = 0;
        for _ in 0..6 {
            let before = now_secs();
            let (status, body) = fh.evaluate("clock", json!({})).await;
            let after = now_secs();
            assert_eq!(
                (status, &body["reason"]),
                (200, &json!("TARGETING_MATCH")),
                "{body}"
            );
            // The wall clock is the evaluation's time (whole seconds).
            if before == after {
                let parity = if before.is_multiple_of(2) {
                    "even"
                } else {
                    "odd"
                };
                assert_eq!(body["variant"], parity, "{isolation:?}: {body}");
                checked += 1;
            }
            let (status, body) = fh.evaluate("env", json!({})).await;
            assert_eq!((status, &body["variant"]), (200, &json!("empty")), "{body}");
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        }
        assert!(checked > 0, "some evaluation fell within one second");
        fh.stop().await.expect("clean stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_a_socket_traps_for_want_of_the_capability() {
    fails_alone("opens-socket", "wasi:sockets", limits()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_past_the_context_cap_fails_the_evaluation() {
    let dirs = dirs_with("trap", json!({})).flag_file(
        "prod",
        &json!({"flags": {
            "neighbour": neighbour_flag(),
            "blob-reader": {"state": "ENABLED", "variants": {"on": true, "off": false},
                            "defaultVariant": "off",
                            "targeting": {"plugin": ["allow-list",
                                {"attribute": "blob", "values": ["x"], "variant": "on"}]}}
        }}),
    );
    let fh = Flaghost::start(&dirs.config("prod", limits()))
        .await
        .expect("starts");
    let small = fh.evaluate("blob-reader", json!({"blob": "x"})).await;
    assert_eq!(
        (small.0, &small.1["value"]),
        (200, &json!(true)),
        "{}",
        small.1
    );
    let big = "y".repeat(200 << 10);
    let (status, body) = fh.evaluate("blob-reader", json!({"blob": big})).await;
    assert_eq!(status, 400, "{body}");
    let details = body["errorDetails"].as_str().expect("details");
    assert!(details.contains("context cap of 131072"), "{details}");
    neighbour_is_fine(&fh).await;
    fh.stop().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbounded_recursion_traps_at_the_wasm_stack_limit_and_the_process_survives() {
    fails_alone("deep-recursion", "stack", limits()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_of_megabytes_is_refused_at_the_answer_cap() {
    // NB: the deadline and memory cap leave only the answer cap to stop it.
    let limits = Limits {
        deadline: Duration::from_secs(5),
        memory_bytes: 64 << 20,
        ..limits()
    };
    fails_alone("huge-answer", "over the answer cap of 16384", limits).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_configuration_is_refused_at_load_naming_file_flag_and_reason() {
    let dirs = dirs_with("picky-config", json!({"ok": false}));
    let err = Flaghost::start(&dirs.config("prod", limits()))
        .await
        .err()
        .expect("refused");
    let message = format!("{err:#}");
    assert!(message.contains("prod.json"), "names the file: {message}");
    assert!(
        message.contains("flag \"bad\""),
        "names the flag: {message}"
    );
    assert!(
        message.contains("refused the configuration"),
        "says why: {message}"
    );

    // The same plugin with a configuration it accepts serves.
    let dirs = dirs_with("picky-config", json!({"ok": true}));
    let fh = Flaghost::start(&dirs.config("prod", limits()))
        .await
        .expect("starts");
    let (status, body) = fh.evaluate("bad", json!({})).await;
    assert_eq!((status, &body["value"]), (200, &json!(true)), "{body}");
    neighbour_is_fine(&fh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flag_naming_a_plugin_that_is_not_loaded_is_refused() {
    let dirs = dirs_with("trap", json!({}));
    std::fs::remove_file(dirs.plugins().join("trap.wasm")).expect("remove");
    let err = Flaghost::start(&dirs.config("prod", limits()))
        .await
        .err()
        .expect("refused");
    let message = format!("{err:#}");
    assert!(
        message.contains("plugin \"trap\" is not loaded"),
        "{message}"
    );
    assert!(
        message.contains("allow-list"),
        "lists what is loaded: {message}"
    );
}

#[test]
fn files_that_are_not_components_are_refused_and_the_rest_load() {
    let dirs = Dirs::new()
        .plugin("allow-list", &plugin("allow-list"))
        .plugin_bytes("empty", b"")
        .plugin_bytes(
            "random",
            &[0x13, 0x37, 0xde, 0xad, 0xbe, 0xef, 0x00, 0x01, 0x02],
        )
        .plugin_bytes("core-module", b"\0asm\x01\0\0\0")
        .plugin_bytes("huge", &vec![0u8; 50 << 20])
        .plugin_bytes(
            "truncated",
            &std::fs::read(plugin("allow-list")).expect("read")[..4096],
        );
    let runtime = PluginRuntime::new(Limits::default(), compiler()).expect("engine");
    let (plugins, errors) = runtime.load_dir(&dirs.plugins()).expect("dir");
    assert_eq!(
        plugins.iter().map(|p| p.name()).collect::<Vec<_>>(),
        ["allow-list"]
    );
    let said: Vec<String> = errors.iter().map(ToString::to_string).collect();
    let expect = [
        ("core-module", "core WebAssembly module, not a component"),
        ("empty", "empty"),
        ("huge", "over the limit"),
        ("random", "not a WebAssembly file"),
        ("truncated", "not a valid component"),
    ];
    assert_eq!(said.len(), expect.len(), "{said:#?}");
    for ((name, what), message) in expect.iter().zip(&said) {
        assert!(
            message.contains(name) && message.contains(what),
            "{name}: {message}"
        );
    }
    assert!(
        errors
            .iter()
            .all(|e| matches!(e, PluginError::Invalid { .. }))
    );
}

#[test]
fn a_component_of_another_world_is_refused_naming_what_is_missing() {
    let dirs = Dirs::new().plugin("crossing", &fixture("context-crossing"));
    let runtime = PluginRuntime::new(Limits::default(), compiler()).expect("engine");
    let (plugins, errors) = runtime.load_dir(&dirs.plugins()).expect("dir");
    assert!(plugins.is_empty());
    let message = errors[0].to_string();
    assert!(
        matches!(errors[0], PluginError::Contract { .. }),
        "{message}"
    );
    assert!(
        message.contains("flaghost:rules/rule@0.1.0"),
        "names the missing export: {message}"
    );
}

#[test]
fn a_component_built_for_another_contract_version_is_refused_naming_it_and_the_rest_load() {
    let dirs = Dirs::new()
        .plugin("future", &fixture("future-contract"))
        .plugin("allow-list", &plugin("allow-list"));
    let runtime = PluginRuntime::new(Limits::default(), compiler()).expect("engine");
    let (plugins, errors) = runtime.load_dir(&dirs.plugins()).expect("dir");
    let loaded: Vec<&str> = plugins.iter().map(|p| p.name()).collect();
    assert_eq!(loaded, ["allow-list"]);
    assert_eq!(
        plugins
            .get("allow-list")
            .expect("loaded")
            .contract_version(),
        "0.1.0",
        "the current version loads through the dispatch point"
    );
    let message = errors[0].to_string();
    assert!(message.contains("future"), "{message}");
    assert!(
        message.contains("built for contract version 0.2.0"),
        "{message}"
    );
    assert!(message.contains("serves 0.1.0"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listing_counts_each_plugins_evaluations_errors_and_timeouts() {
    let dirs = dirs_with("endless-loop", json!({}));
    let mut config = dirs.config("prod", limits());
    config.admin_token = Some("listing-token-0123456789".into());
    let fh = Flaghost::start(&config).await.expect("starts");
    for _ in 0..5 {
        neighbour_is_fine(&fh).await;
    }
    for _ in 0..3 {
        let (status, _) = fh.evaluate("bad", json!({})).await;
        assert_eq!(status, 400);
    }
    let url = format!("{}/admin/v1/plugins", fh.base);
    let refused = fh.client.get(&url).send().await.expect("answers");
    assert_eq!(refused.status().as_u16(), 401, "behind the admin token");
    let listing = fh.plugin_listing("listing-token-0123456789").await;
    assert_eq!(listing["contractVersions"], json!(["0.1.0"]));
    let plugins = listing["plugins"].as_array().expect("plugins");
    let by_name = |name: &str| {
        plugins
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("{name} listed: {listing}"))
            .clone()
    };
    let good = by_name("allow-list");
    assert_eq!(good["evaluations"], 10, "{good}");
    assert_eq!(good["timeouts"], 0, "{good}");
    assert_eq!(good["contractVersion"], "0.1.0");
    assert_eq!(good["origin"], "compiled");
    assert!(good["size"].as_u64() > Some(1000));
    assert_eq!(good["digest"].as_str().map(str::len), Some(64));
    assert!(good["latencyUs"]["p99"].as_f64() > Some(0.0), "{good}");
    let bad = by_name("endless-loop");
    assert_eq!(
        (
            &bad["evaluations"],
            &bad["timeouts"],
            &bad["errors"]["deadline"],
            &bad["errors"]["trap"]
        ),
        (&json!(3), &json!(3), &json!(3), &json!(0)),
        "{bad}"
    );
    assert!(
        bad["latencyUs"]["p50"].as_f64() >= Some(50_000.0 / 2.0),
        "{bad}"
    );
    fh.stop().await.expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_keeps_hitting_its_deadline_is_quarantined_then_retried() {
    let dirs = dirs_with("endless-loop", json!({}));
    let limits = Limits {
        quarantine_after: 3,
        quarantine_for: Duration::from_millis(1500),
        ..limits()
    };
    let fh = Flaghost::start(&dirs.config("prod", limits))
        .await
        .expect("starts");
    let bad = || async {
        let started = std::time::Instant::now();
        let (status, body) = fh.evaluate("bad", json!({})).await;
        assert_eq!(status, 400, "{body}");
        (
            body["errorDetails"].as_str().unwrap_or_default().to_owned(),
            started.elapsed(),
        )
    };
    for _ in 0..3 {
        let (details, _) = bad().await;
        assert!(details.contains("deadline"), "{details}");
    }
    for _ in 0..5 {
        let (details, took) = bad().await;
        assert!(details.contains("quarantined"), "{details}");
        assert!(
            took < Duration::from_millis(50),
            "answered without running: {took:?}"
        );
        neighbour_is_fine(&fh).await;
    }
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let (details, _) = bad().await;
    assert!(
        details.contains("deadline"),
        "retried after the cool-down: {details}"
    );
    let (details, _) = bad().await;
    assert!(
        details.contains("quarantined"),
        "and quarantined again at once: {details}"
    );
    neighbour_is_fine(&fh).await;
    fh.stop().await.expect("stops");
}

/// Flags whose rule is `remembers` (it hands each caller the previous
/// caller's targeting key as its error text, as a made-up variant name, or
/// through its choice of variant): two plain, one inside JsonLogic, one
/// choosing.
fn remembering_dirs() -> Dirs {
    let bad = |_: ()| {
        json!({"state": "ENABLED", "variants": {"on": true, "off": false},
               "defaultVariant": "off", "targeting": {"plugin": ["remembers", {}]}})
    };
    Dirs::new()
        .plugin("remembers", &fixture("remembers"))
        .flag_file(
            "prod",
            &json!({"flags": {"first": bad(()), "second": bad(()), "choosing": bad(()),
                "in-logic": {"state": "ENABLED", "variants": {"on": true, "off": false},
                    "defaultVariant": "off",
                    "targeting": {"if": [{"plugin": ["remembers", {}]}, "on", "off"]}}}}),
        )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_no_caller_s_data_reaches_another_caller_or_another_flag() {
    let fh = Flaghost::start(&remembering_dirs().config("prod", limits()))
        .await
        .expect("starts");
    let callers = ["alice-ssn-123-45-6789", "bob-ssn-987-65-4321"];
    // Callers take turns on every flag, one at a time and side by side, so
    // any state a plugin thread kept would be there for the next.
    for round in 0..3 {
        for flag in ["first", "second", "in-logic", "choosing"] {
            for leak in ["error", "variant", "choice"] {
                let answers =
                    futures_util::future::join_all(callers.iter().cycle().take(6).map(|caller| {
                        fh.evaluate(flag, json!({"targetingKey": caller, "leak": leak}))
                    }))
                    .await;
                for (status, body) in answers {
                    let text = body.to_string();
                    assert!(
                        !text.contains("ssn"),
                        "{flag}/{leak} round {round}: a caller saw another's data: {text}"
                    );
                    if leak == "choice" && flag != "in-logic" {
                        assert_eq!(
                            (status, &body["variant"]),
                            (200, &json!("off")),
                            "{flag}: the rule saw that a caller came before: {body}"
                        );
                    }
                }
            }
        }
    }
    // A bulk request evaluates every plugin flag in one request: the
    // choosing flag still sees no earlier evaluation, of its own or another flag.
    for caller in callers {
        let (status, body) = fh
            .post_raw(
                "/ofrep/v1/evaluate/flags",
                json!({"context": {"targetingKey": caller, "leak": "choice"}}).to_string(),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let choosing = body["flags"]
            .as_array()
            .and_then(|flags| flags.iter().find(|f| f["key"] == "choosing"))
            .expect("the choosing flag");
        assert_eq!(choosing["variant"], json!("off"), "{body}");
        assert!(!body.to_string().contains("ssn"), "{body}");
    }
    fh.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_s_own_text_never_reaches_a_caller_its_listing_keeps_it() {
    // With reuse chosen for it, `remembers` does carry each caller's key to
    // the next: its text holds it, and only flaghost's handling of plugin
    // text stands between it and the next caller.
    const TOKEN: &str = "failures-admin-token-0123456789";
    let dirs = remembering_dirs();
    let mut reuse = limits();
    reuse
        .isolation_for
        .insert("remembers".into(), flaghost::plugins::Isolation::Reuse);
    let mut config = dirs.config("prod", reuse);
    config.admin_token = Some(TOKEN.into());
    let fh = Flaghost::start(&config).await.expect("starts");
    let mut ids = Vec::new();
    for (flag, leak) in [
        ("first", "error"),
        ("second", "error"),
        ("first", "variant"),
        ("second", "variant"),
        ("in-logic", "variant"),
        ("in-logic", "error"),
    ] {
        for caller in ["alice-ssn-123-45-6789", "bob-ssn-987-65-4321"] {
            let (status, body) = fh
                .evaluate(flag, json!({"targetingKey": caller, "leak": leak}))
                .await;
            let text = body.to_string();
            assert!(
                !text.contains("ssn"),
                "{flag}/{leak}: a caller saw another's data: {text}"
            );
            if status == 400 {
                let details = body["errorDetails"].as_str().expect("details");
                let kind = if leak == "error" {
                    "answered an error"
                } else {
                    "does not have"
                };
                assert!(
                    details.contains("plugin remembers") && details.contains(kind),
                    "names the plugin and the kind: {details}"
                );
                let id = details
                    .split("error id ")
                    .nth(1)
                    .and_then(|rest| rest.get(..16))
                    .expect("an error id");
                ids.push(id.to_owned());
            }
        }
    }
    assert!(
        ids.len() >= 8,
        "the plugin's failures reached callers as errors: {ids:?}"
    );
    // The control: reuse does let a rule's choice carry what it kept (here,
    // that a caller came before), which is why it is not the default.
    let mut choices = Vec::new();
    for caller in ["carol", "dave"] {
        let (_, body) = fh
            .evaluate(
                "choosing",
                json!({"targetingKey": caller, "leak": "choice"}),
            )
            .await;
        choices.push(body["variant"].clone());
    }
    assert!(
        choices.contains(&json!("on")),
        "a reused instance remembered a caller: {choices:?}"
    );
    // The full text is the operator's, under the id the caller was given.
    let listing = fh.plugin_listing(TOKEN).await;
    assert_eq!(listing["plugins"][0]["isolation"], json!("reuse"));
    let recent = listing["plugins"][0]["recentErrors"]
        .as_array()
        .expect("recent errors");
    assert!(recent.len() <= flaghost::plugins::RECENT_ERRORS);
    let last = recent.last().expect("one");
    assert_eq!(last["id"], json!(ids.last().expect("an id")));
    assert!(
        last["message"].as_str().unwrap_or_default().contains("ssn"),
        "the listing keeps the plugin's text: {last}"
    );
    fh.stop().await.expect("clean stop");
}
