//! The bundled examples end to end: flaghost serves examples/flags with the
//! example plugins built as real components, on a free port, and a real HTTP
//! client evaluates every example flag.

use flaghost::plugins::{Isolation, Limits};
use flaghost_tests::{Flaghost, answer_limits, examples_config};
use serde_json::{Value, json};

async fn start(isolation: Isolation) -> Flaghost {
    let limits = Limits {
        isolation,
        ..answer_limits()
    };
    Flaghost::start(&examples_config(limits))
        .await
        .expect("flaghost starts on the examples")
}

/// Checks an answer's status, value, variant and reason.
fn check(answer: &(u16, Value), value: Option<Value>, variant: &str, reason: &str) {
    let (status, body) = answer;
    assert_eq!(*status, 200, "{body}");
    assert_eq!(body.get("value").cloned(), value, "value in {body}");
    assert_eq!(body["variant"], variant, "variant in {body}");
    assert_eq!(body["reason"], reason, "reason in {body}");
}

async fn every_example_flag(fh: &Flaghost) {
    let dutch_beta =
        json!({"targetingKey": "user-1", "country": "NL", "account": {"tier": "beta"}});
    let us_free = json!({"targetingKey": "user-2", "country": "US", "account": {"tier": "free"}});

    check(
        &fh.evaluate("eu-pricing-banner", dutch_beta.clone()).await,
        Some(json!("Prices include VAT")),
        "eu",
        "TARGETING_MATCH",
    );
    check(
        &fh.evaluate("eu-pricing-banner", us_free.clone()).await,
        Some(json!("")),
        "none",
        "DEFAULT",
    );
    check(
        &fh.evaluate("beta-search", dutch_beta.clone()).await,
        Some(json!(true)),
        "on",
        "TARGETING_MATCH",
    );
    // No default variant: no value, so the caller's code default applies.
    check(
        &fh.evaluate("beta-search", us_free.clone()).await,
        None,
        "",
        "DEFAULT",
    );
    check(
        &fh.evaluate("items-per-page", json!({})).await,
        Some(json!(10)),
        "small",
        "STATIC",
    );
    check(
        &fh.evaluate("discount-rate", json!({})).await,
        Some(json!(0.15)),
        "sale",
        "STATIC",
    );
    check(
        &fh.evaluate("theme", json!({})).await,
        Some(json!({"background": "#ffffff", "accent": "#0057b8"})),
        "light",
        "STATIC",
    );
    check(
        &fh.evaluate("legacy-reports", json!({})).await,
        None,
        "",
        "DISABLED",
    );

    // JsonLogic, flagd-style: a $ref'd sem_ver gate, then a fractional split.
    check(
        &fh.evaluate(
            "new-app-ui",
            json!({"targetingKey": "user-1", "appVersion": "4.9.2"}),
        )
        .await,
        Some(json!("classic")),
        "v1",
        "DEFAULT",
    );
    let (status, body) = fh
        .evaluate(
            "new-app-ui",
            json!({"targetingKey": "user-1", "appVersion": "v5.1"}),
        )
        .await;
    assert_eq!(
        (status, &body["reason"]),
        (200, &json!("TARGETING_MATCH")),
        "{body}"
    );
    assert!(
        ["redesign", "redesign-beta"].contains(&body["value"].as_str().unwrap_or("")),
        "{body}"
    );

    // A plugin as one operator inside JsonLogic: the allow-list gates a
    // fractional split; outside Benelux everyone is off.
    check(
        &fh.evaluate(
            "eu-express-delivery",
            json!({"targetingKey": "user-1", "country": "US"}),
        )
        .await,
        Some(json!(false)),
        "off",
        "TARGETING_MATCH",
    );
    let mut on = 0;
    for i in 0..100 {
        let ctx = json!({"targetingKey": format!("user-{i}"), "country": "NL"});
        let (status, body) = fh.evaluate("eu-express-delivery", ctx).await;
        assert_eq!(
            (status, &body["reason"]),
            (200, &json!("TARGETING_MATCH")),
            "{body}"
        );
        on += usize::from(body["value"] == json!(true));
    }
    assert!(
        (30..=70).contains(&on),
        "half of Dutch users should be on, got {on} of 100"
    );

    // The rollout: stable per user, about a quarter of users in.
    let mut on = 0;
    for i in 0..400 {
        let ctx = json!({"targetingKey": format!("user-{i}")});
        let (status, first) = fh.evaluate("new-checkout", ctx.clone()).await;
        assert_eq!(status, 200, "{first}");
        assert_eq!(first["reason"], "TARGETING_MATCH");
        let (_, again) = fh.evaluate("new-checkout", ctx).await;
        assert_eq!(
            first["value"], again["value"],
            "user-{i} keeps their answer"
        );
        if first["value"] == json!(true) {
            on += 1;
        }
    }
    assert!(
        (70..=130).contains(&on),
        "25% of 400 users should be about 100, got {on}"
    );
    // Without a targeting key there is nothing to bucket by: the default.
    check(
        &fh.evaluate("new-checkout", json!({})).await,
        Some(json!(false)),
        "off",
        "DEFAULT",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_flag_evaluates_over_http() {
    let fh = start(Isolation::Reuse).await;
    every_example_flag(&fh).await;
    fh.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_flag_evaluates_with_a_fresh_instance_per_call() {
    let fh = start(Isolation::Fresh).await;
    every_example_flag(&fh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_merges_flag_over_flag_set() {
    let fh = start(Isolation::Reuse).await;
    let (_, body) = fh
        .evaluate("new-checkout", json!({"targetingKey": "a"}))
        .await;
    assert_eq!(
        body["metadata"]["team"], "checkout",
        "the flag's own key wins"
    );
    assert_eq!(
        body["metadata"]["flagSetId"], "shop",
        "the set's keys come through"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environments_are_picked_by_base_url() {
    let fh = start(Isolation::Reuse).await;
    let poland = json!({"country": "PL"});
    check(
        &fh.evaluate_in(Some("staging"), "eu-pricing-banner", poland.clone())
            .await,
        Some(json!("Prices include VAT")),
        "eu",
        "TARGETING_MATCH",
    );
    check(
        &fh.evaluate_in(Some("production"), "eu-pricing-banner", poland)
            .await,
        Some(json!("")),
        "none",
        "DEFAULT",
    );
    check(
        &fh.evaluate_in(Some("staging"), "new-checkout", json!({}))
            .await,
        Some(json!(true)),
        "on",
        "STATIC",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_evaluation_answers_every_enabled_flag_with_an_etag() {
    let fh = start(Isolation::Reuse).await;
    let url = format!("{}/ofrep/v1/evaluate/flags", fh.base);
    let body = json!({"context": {"targetingKey": "user-1", "country": "NL"}}).to_string();
    let response = fh
        .client
        .post(&url)
        .body(body.clone())
        .send()
        .await
        .expect("bulk");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let etag = response.headers()["etag"]
        .to_str()
        .expect("etag")
        .to_owned();
    let answer: Value = response.json().await.expect("json");
    let keys: Vec<&str> = answer["flags"]
        .as_array()
        .expect("flags")
        .iter()
        .map(|f| f["key"].as_str().expect("key"))
        .collect();
    assert_eq!(
        keys,
        [
            "beta-search",
            "discount-rate",
            "eu-express-delivery",
            "eu-pricing-banner",
            "items-per-page",
            "new-app-ui",
            "new-checkout",
            "theme"
        ],
        "sorted, disabled flags left out"
    );
    assert_eq!(answer["metadata"]["flagSetId"], "shop");

    let again = fh
        .client
        .post(&url)
        .header("if-none-match", &etag)
        .body(body)
        .send()
        .await
        .expect("bulk");
    assert_eq!(
        again.status(),
        304,
        "same context, same flags: not modified"
    );

    let other = json!({"context": {"targetingKey": "user-1", "country": "US"}}).to_string();
    let changed = fh
        .client
        .post(&url)
        .header("if-none-match", &etag)
        .body(other)
        .send()
        .await
        .expect("bulk");
    assert_eq!(
        changed.status(),
        200,
        "another context's answer differs: no 304"
    );
    assert_ne!(changed.headers()["etag"].to_str().expect("etag"), etag);
}
