//! docker-compose.yml, the Dockerfile and .env.example, checked against
//! flaghost's own options (no Docker engine runs here): the structure the
//! deployment relies on, that every setting they pass is one `flaghost
//! serve` knows and accepts, and that every `.env` line reaches flaghost's
//! parsed configuration through the compose file as compose passes it.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::{CommandFactory, Parser};
use flaghost::config::{Cli, Command, ServeConfig};
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
/// as options must validate; what it parsed, by environment variable (the
/// raw value clap took), and the configuration it gives.
fn serve_accepts(settings: &[(String, String)]) -> (BTreeMap<String, String>, ServeConfig) {
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
    let matches = Cli::command()
        .try_get_matches_from(&args)
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let serve_matches = matches.subcommand_matches("serve").expect("serve");
    let serve = Cli::command()
        .find_subcommand("serve")
        .cloned()
        .expect("serve");
    let parsed = serve
        .get_arguments()
        .filter_map(|a| {
            let env = a.get_env()?.to_str()?.to_owned();
            let raw = serve_matches.get_raw(a.get_id().as_str())?;
            let value = raw
                .map(|v| v.to_string_lossy())
                .collect::<Vec<_>>()
                .join(",");
            Some((env, value))
        })
        .collect();
    let cli = Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let Command::Serve(serve) = cli.command else {
        panic!("serve")
    };
    let config = serve.validate().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    (parsed, config)
}

/// `.env.example`'s settings, in order.
fn env_example() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(root().join(".env.example")).expect("read");
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#') && l.contains('='))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("k=v");
            (k.trim().to_owned(), v.trim().to_owned())
        })
        .collect()
}

/// `text` with compose's `${VAR}`, `${VAR-default}` and `${VAR:-default}`
/// filled in from `dotenv` (compose reads the project's `.env` for these).
fn interpolate(text: &str, dotenv: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let end = rest[at..].find('}').expect("closing brace") + at;
        let inner = &rest[at + 2..end];
        let value = if let Some((name, default)) = inner.split_once(":-") {
            dotenv
                .get(name)
                .filter(|v| !v.is_empty())
                .cloned()
                .unwrap_or_else(|| default.to_owned())
        } else if let Some((name, default)) = inner.split_once('-') {
            dotenv
                .get(name)
                .cloned()
                .unwrap_or_else(|| default.to_owned())
        } else {
            dotenv.get(inner).cloned().unwrap_or_default()
        };
        out.push_str(&value);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

/// The flaghost container's environment as compose makes it from the
/// service and a project `.env` holding `dotenv` (`None`: no `.env`):
/// `env_file` first, `environment` (interpolated) over it.
fn container_env(dotenv: Option<&BTreeMap<String, String>>) -> BTreeMap<String, String> {
    let compose = compose();
    let flaghost = &compose["services"]["flaghost"];
    let empty = BTreeMap::new();
    let mut env = BTreeMap::new();
    for file in flaghost["env_file"].as_array().expect("env_file") {
        assert_eq!(file["path"], ".env", "the env file is the project's .env");
        match dotenv {
            Some(dotenv) => env.extend(dotenv.clone()),
            None => assert_eq!(file["required"], false, "compose starts without a .env"),
        }
    }
    for (name, value) in flaghost["environment"].as_object().expect("environment") {
        let value = value.as_str().expect("string values");
        env.insert(name.clone(), interpolate(value, dotenv.unwrap_or(&empty)));
    }
    env
}

/// Runs the compose file's Redis healthcheck against the Redis on `port`.
fn redis_healthcheck(port: u16) -> bool {
    let compose = compose();
    let test = compose["services"]["redis"]["healthcheck"]["test"]
        .as_array()
        .expect("test")
        .clone();
    assert_eq!(test[0], "CMD-SHELL", "{test:?}");
    let command = test[1]
        .as_str()
        .expect("a shell command")
        .replace("redis-cli", &format!("redis-cli -p {port}"));
    std::process::Command::new("sh")
        .args(["-c", &command])
        .status()
        .expect("sh runs")
        .success()
}

#[test]
fn redis_service_is_as_specified_and_not_published() {
    let compose = compose();
    let redis = &compose["services"]["redis"];
    assert_eq!(redis["image"], "redis:7.2-alpine");
    assert_eq!(
        redis["command"],
        serde_json::json!(["redis-server", "--appendonly", "yes"])
    );
    // A Redis already on the host's 6379 must not clash: not published
    // unless the operator uncomments it.
    assert!(redis.get("ports").is_none(), "{:?}", redis["ports"]);
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).expect("read");
    assert!(
        text.contains("#   - \"127.0.0.1:6379:6379\""),
        "the commented line is there"
    );
    let volume = redis["volumes"][0].as_str().expect("a volume");
    let (name, mount) = volume.split_once(':').expect("name:path");
    assert_eq!(mount, "/data");
    assert!(
        compose["volumes"].get(name).is_some(),
        "{name} is a named volume"
    );
    let health = &redis["healthcheck"];
    assert_eq!(
        (&health["interval"], &health["timeout"], &health["retries"]),
        (
            &serde_json::json!("5s"),
            &serde_json::json!("3s"),
            &serde_json::json!(5)
        )
    );
}

/// The healthcheck passes on a Redis that answers PONG and fails on one
/// that answers an error (as one loading its append-only file answers
/// `-LOADING`), run as written against a real `redis-server` and a socket
/// answering that error.
#[test]
fn the_redis_healthcheck_fails_while_redis_loads() {
    let redis = flaghost_tests::RedisServer::start();
    assert!(redis_healthcheck(redis.port()), "a ready Redis is healthy");

    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let loading = std::thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        // redis-cli may connect more than once (it asks for the server's
        // commands first on some versions): answer each the same.
        listener.set_nonblocking(false).expect("blocking");
        for stream in listener.incoming().take(2) {
            let Ok(mut stream) = stream else { return };
            let mut buffer = [0u8; 1024];
            while let Ok(n) = stream.read(&mut buffer) {
                if n == 0
                    || stream
                        .write_all(b"-LOADING Redis is loading the dataset in memory\r\n")
                        .is_err()
                {
                    break;
                }
            }
        }
    });
    assert!(!redis_healthcheck(port), "a loading Redis is not healthy");
    drop(loading);
}

#[test]
fn every_env_example_setting_reaches_flaghost_through_compose() {
    let example = env_example();
    assert!(example.iter().any(|(k, _)| k == "REDIS_URL"));
    // Each setting at a value of its own, not flaghost's default, so a
    // value that did not arrive shows.
    let own = |name: &str, value: &str| -> String {
        match name {
            "REDIS_URL" => "rediss://flaghost:pw@cache.internal:6380".into(),
            "FLAGHOST_REDIS_CA_FILE" => "/etc/flaghost/redis-ca.pem".into(),
            "FLAGHOST_REDIS_CLIENT_CERT" => "/etc/flaghost/redis-client.pem".into(),
            "FLAGHOST_REDIS_CLIENT_KEY" => "/etc/flaghost/redis-client.key".into(),
            "FLAG_CACHE_TTL" => "60".into(),
            "FLAGHOST_ADMIN_TOKEN" => "an-admin-token-of-32-characters!".into(),
            "FLAGHOST_LOG_FORMAT" => "text".into(),
            "FLAGHOST_API_KEYS_FILE" => "/etc/flaghost/api-keys.json".into(),
            "FLAGHOST_METRICS_LISTEN" => "0.0.0.0:9090".into(),
            "FLAGHOST_METRICS_TOKEN" => "a-metrics-token-of-32-characters".into(),
            "FLAGHOST_API_KEY_RATE_LIMIT" => "50".into(),
            "OTEL_EXPORTER_OTLP_ENDPOINT" => "http://otel-collector:4318".into(),
            "FLAGHOST_TRACE_SAMPLE_RATIO" => "0.25".into(),
            "RUST_LOG" => "debug".into(),
            _ => match value.parse::<u64>() {
                Ok(n) => (n + 7).to_string(),
                Err(_) => value.to_owned(),
            },
        }
    };
    let dotenv: BTreeMap<String, String> = example
        .iter()
        .map(|(k, v)| (k.clone(), own(k, v)))
        .collect();
    let env = container_env(Some(&dotenv));
    for (name, value) in &dotenv {
        assert_eq!(
            env.get(name),
            Some(value),
            "{name} from .env reaches the container"
        );
    }
    let settings: Vec<(String, String)> = env.into_iter().collect();
    let (parsed, config) = serve_accepts(&settings);
    for (name, value) in &dotenv {
        if name == "RUST_LOG" {
            continue;
        }
        assert_eq!(
            parsed.get(name),
            Some(value),
            "{name} reaches flaghost's parsed options"
        );
    }
    assert_eq!(config.cache_ttl, Duration::from_secs(60));
    let redis = config.redis.as_ref().expect("redis");
    assert_eq!(
        redis.tls.ca_file.as_deref(),
        Some(std::path::Path::new("/etc/flaghost/redis-ca.pem"))
    );
    assert!(redis.tls.client_cert.is_some());
    assert_eq!(
        config.admin_token.as_deref(),
        Some("an-admin-token-of-32-characters!")
    );
    assert_eq!(
        config.api_key_rate_limit,
        Some(flaghost::access::RateLimit { per_second: 50 })
    );
    assert_eq!(
        config.metrics_listen,
        Some("0.0.0.0:9090".parse().expect("address"))
    );
    assert_eq!(
        config.traces,
        Some(flaghost::telemetry::TraceOptions {
            endpoint: "http://otel-collector:4318".into(),
            sample_ratio: 0.25,
        })
    );
    assert_eq!(
        config.api_keys_file.as_deref(),
        Some(std::path::Path::new("/etc/flaghost/api-keys.json"))
    );
    assert_eq!(
        config.metrics_token.as_deref(),
        Some("a-metrics-token-of-32-characters")
    );
    assert_eq!(config.ignored, [], "every setting given has its effect");
}

#[test]
fn redis_url_empty_in_env_is_the_rollback_and_no_env_is_memory_only() {
    // `REDIS_URL=` in .env: flaghost runs on its in-memory cache.
    let mut dotenv: BTreeMap<String, String> = env_example().into_iter().collect();
    dotenv.insert("REDIS_URL".into(), String::new());
    let env = container_env(Some(&dotenv));
    assert_eq!(env["REDIS_URL"], "");
    let (_, config) = serve_accepts(&env.into_iter().collect::<Vec<_>>());
    assert!(config.redis.is_none(), "rolled back to the in-memory cache");

    // The rollback leaves Redis's TLS lines in .env: flaghost still starts,
    // and names them in a warning rather than ignoring them silently.
    dotenv.insert(
        "FLAGHOST_REDIS_CA_FILE".into(),
        "/etc/flaghost/redis-ca.pem".into(),
    );
    let env = container_env(Some(&dotenv));
    let (_, config) = serve_accepts(&env.into_iter().collect::<Vec<_>>());
    assert!(config.redis.is_none());
    let ignored: Vec<String> = config.ignored.iter().map(ToString::to_string).collect();
    assert_eq!(
        ignored,
        ["--redis-ca-file (FLAGHOST_REDIS_CA_FILE) is ignored without REDIS_URL"]
    );

    // No .env at all: flaghost's defaults, the in-memory cache among them.
    let env = container_env(None);
    assert!(!env.contains_key("REDIS_URL"), "{env:?}");
    let (_, config) = serve_accepts(&env.into_iter().collect::<Vec<_>>());
    assert!(config.redis.is_none());
    assert_eq!(config.cache_ttl, Duration::from_secs(300));

    // Only the image's paths and the listen address are fixed by the
    // compose file, none from the shell (`${...}`): a variable exported
    // in the developer's shell cannot override .env.
    let compose = compose();
    let mut fixed: Vec<&String> = compose["services"]["flaghost"]["environment"]
        .as_object()
        .expect("environment")
        .keys()
        .collect();
    fixed.sort();
    assert_eq!(
        fixed,
        ["FLAGHOST_FLAGS", "FLAGHOST_LISTEN", "FLAGHOST_PLUGINS"]
    );
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).expect("read");
    assert!(!text.contains("${"), "nothing interpolated from the shell");
}

#[test]
fn flaghost_service_starts_after_redis_from_the_image_paths() {
    let compose = compose();
    let flaghost = &compose["services"]["flaghost"];
    assert_eq!(
        flaghost["depends_on"]["redis"]["condition"],
        "service_healthy"
    );
    assert_eq!(flaghost["build"]["dockerfile"], "Dockerfile");
    // The image holds the flags and plugins where the service points.
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).expect("read");
    let env = container_env(None);
    for var in ["FLAGHOST_FLAGS", "FLAGHOST_PLUGINS"] {
        let path = &env[var];
        assert!(
            dockerfile.contains(path.as_str()),
            "the image has {path} ({var})"
        );
    }
    assert!(dockerfile.contains("ENTRYPOINT [\"flaghost\", \"serve\"]"));
}

#[test]
fn the_image_caches_dependencies_runs_unprivileged_and_leaves_env_out() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).expect("read");
    let lines: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    let stages: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.starts_with("FROM "))
        .map(|(at, _)| at)
        .collect();
    assert!(stages.len() >= 2, "multi-stage");
    // Dependencies are built before the sources come in: a layer of their
    // own that a change to flaghost's code does not invalidate.
    let cook = lines
        .iter()
        .position(|l| l.contains("cargo chef cook"))
        .expect("dependencies cooked");
    let sources = lines
        .iter()
        .enumerate()
        .position(|(at, l)| at > cook && *l == "COPY . .")
        .expect("sources copied after");
    let build = lines
        .iter()
        .position(|l| l.contains("cargo build --release"))
        .expect("built");
    assert!(cook < sources && sources < build, "cook, copy, build");
    // The last stage runs as a user that is not root.
    let last = &lines[*stages.last().expect("stages")..];
    let user = last
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER in the final stage");
    assert!(!["root", "0", "0:0"].contains(&user.trim()), "{user}");
    let entry = last
        .iter()
        .position(|l| l.starts_with("ENTRYPOINT"))
        .expect("entrypoint");
    let user_at = last
        .iter()
        .position(|l| l.starts_with("USER "))
        .expect("user");
    assert!(user_at < entry, "USER before ENTRYPOINT");
    // .env (secrets, local settings) never reaches the build context.
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).expect("read");
    assert!(ignore.lines().any(|l| l.trim() == ".env"), "{ignore}");
}
