//! docker-compose.yml, the Dockerfile and .env.example, checked against
//! flaghost's own options (no Docker engine runs here): the structure the
//! deployment relies on, and that every setting they pass is one `flaghost
//! serve` knows and accepts.

use std::collections::BTreeMap;

use clap::{CommandFactory, Parser};
use flaghost::config::{Cli, Command};
use flaghost_tests::root;
use serde_json::Value;

fn compose() -> Value {
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).expect("read");
    serde_norway::from_str(&text).expect("docker-compose.yml is YAML")
}

/// Environment variable to long option, from `flaghost serve`'s arguments.
fn serve_options() -> BTreeMap<String, String> {
    let cli = Cli::command();
    let serve = cli.find_subcommand("serve").expect("serve");
    serve
        .get_arguments()
        .filter_map(|a| Some((a.get_env()?.to_str()?.to_owned(), a.get_long()?.to_owned())))
        .collect()
}

/// `flaghost serve` with `settings` (environment variable, value) passed
/// as options must validate.
fn serve_accepts(settings: &[(String, String)]) {
    let options = serve_options();
    let mut args = vec!["flaghost".to_owned(), "serve".to_owned()];
    for (name, value) in settings {
        if name == "RUST_LOG" || value.is_empty() {
            continue;
        }
        let long = options
            .get(name)
            .unwrap_or_else(|| panic!("{name} is no option of flaghost serve"));
        args.push(format!("--{long}"));
        args.push(value.clone());
    }
    let cli = Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let Command::Serve(serve) = cli.command else {
        panic!("serve")
    };
    serve.validate().unwrap_or_else(|e| panic!("{args:?}: {e}"));
}

#[test]
fn redis_service_is_as_specified() {
    let compose = compose();
    let redis = &compose["services"]["redis"];
    assert_eq!(redis["image"], "redis:7.2-alpine");
    assert_eq!(
        redis["command"],
        serde_json::json!(["redis-server", "--appendonly", "yes"])
    );
    let ports: Vec<&str> = redis["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(ports.iter().any(|p| p.ends_with("6379:6379")), "{ports:?}");
    let volume = redis["volumes"][0].as_str().expect("a volume");
    let (name, mount) = volume.split_once(':').expect("name:path");
    assert_eq!(mount, "/data");
    assert!(
        compose["volumes"].get(name).is_some(),
        "{name} is a named volume"
    );
    let health = &redis["healthcheck"];
    assert_eq!(
        health["test"],
        serde_json::json!(["CMD", "redis-cli", "ping"])
    );
    assert_eq!(
        (&health["interval"], &health["timeout"], &health["retries"]),
        (
            &serde_json::json!("5s"),
            &serde_json::json!("3s"),
            &serde_json::json!(5)
        )
    );
}

#[test]
fn flaghost_service_starts_after_redis_with_options_flaghost_accepts() {
    let compose = compose();
    let flaghost = &compose["services"]["flaghost"];
    assert_eq!(
        flaghost["depends_on"]["redis"]["condition"],
        "service_healthy"
    );
    assert_eq!(flaghost["build"]["dockerfile"], "Dockerfile");
    let env = flaghost["environment"].as_object().expect("environment");
    assert_eq!(env["REDIS_URL"], "redis://redis:6379");
    let settings: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| {
            let v = v.as_str().expect("string values").to_owned();
            // `${VAR:-}` is filled in by compose; empty when unset.
            let v = if v.starts_with("${") {
                String::new()
            } else {
                v
            };
            (k.clone(), v)
        })
        .collect();
    serve_accepts(&settings);

    // The image holds the flags and plugins where the service points.
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).expect("read");
    assert!(
        dockerfile.matches("\nFROM ").count() + usize::from(dockerfile.starts_with("FROM ")) >= 2,
        "multi-stage"
    );
    for var in ["FLAGHOST_FLAGS", "FLAGHOST_PLUGINS"] {
        let path = env[var].as_str().expect("path");
        assert!(dockerfile.contains(path), "the image has {path} ({var})");
    }
    assert!(dockerfile.contains("ENTRYPOINT [\"flaghost\", \"serve\"]"));
}

#[test]
fn env_example_documents_options_flaghost_accepts() {
    let text = std::fs::read_to_string(root().join(".env.example")).expect("read");
    let settings: Vec<(String, String)> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && l.contains('='))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("k=v");
            (k.trim().to_owned(), v.trim().to_owned())
        })
        .collect();
    assert!(settings.iter().any(|(k, _)| k == "REDIS_URL"));
    serve_accepts(&settings);
}
