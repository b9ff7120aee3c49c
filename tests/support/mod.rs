//! Support for the end-to-end tests and benches: build the guest components,
//! lay out flag and plugin directories, and serve flaghost on a free port.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use flaghost::config::ServeConfig;
use flaghost::plugins::{Compiler, Limits};
use serde_json::Value;
use tokio::sync::oneshot;

/// The repository's root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the repository")
        .to_path_buf()
}

/// Builds every guest component once per test binary (`plugins/build.sh`).
pub fn build_plugins() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let status = Command::new("bash")
            .arg(root().join("plugins/build.sh"))
            .status()
            .expect("run plugins/build.sh");
        assert!(status.success(), "plugins/build.sh failed");
    });
}

/// An example plugin's component file.
pub fn plugin(name: &str) -> PathBuf {
    build_plugins();
    root().join("target/plugins").join(format!("{name}.wasm"))
}

/// A rule written in Python or JavaScript (`allow-list-py`), as
/// `plugins/build.sh` builds it when their toolchains are installed.
pub fn language_plugin(name: &str) -> PathBuf {
    build_plugins();
    root()
        .join("target/language-plugins")
        .join(format!("{name}.wasm"))
}

/// The `flaghost` binary `cargo test --workspace` builds beside the test
/// binaries (`target/<profile>/flaghost`): flaghost compiles plugins in
/// child processes of it, under the compile bound.
pub fn flaghost_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            let exe = std::env::current_exe().expect("the test binary");
            let profile = exe
                .parent()
                .and_then(Path::parent)
                .expect("the test binary lives in target/<profile>/deps");
            // NB: not asserted here (benches build no flaghost binary and
            // compile in process); a missing one is named by the compile
            // error: `cargo test --workspace` builds it.
            profile.join(format!("flaghost{}", std::env::consts::EXE_SUFFIX))
        })
        .clone()
}

/// Compiles plugins as `flaghost serve` does: in children running the
/// flaghost binary.
pub fn compiler() -> Compiler {
    Compiler::Child(flaghost_binary())
}

/// `PUT {base}/admin/v1/plugins/{name}` with `bytes`, behind `token`: the
/// status and the JSON answer. A free function over a client and a base
/// URL, so a test can run it in a task of its own.
pub async fn put_plugin(
    client: &reqwest::Client,
    base: &str,
    token: &str,
    name: &str,
    bytes: Vec<u8>,
) -> (u16, Value) {
    let response = client
        .put(format!("{base}/admin/v1/plugins/{name}"))
        .bearer_auth(token)
        .header("content-type", "application/wasm")
        .body(bytes)
        .send()
        .await
        .expect("answers");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON"))
}

/// A purpose-built test component's file.
pub fn fixture(name: &str) -> PathBuf {
    build_plugins();
    root()
        .join("target/plugin-fixtures")
        .join(format!("{name}.wasm"))
}

/// Limits for tests that check answers, not timings: a deadline generous
/// enough for a debug build on a loaded machine (the default 10 ms is not).
pub fn answer_limits() -> Limits {
    Limits {
        deadline: std::time::Duration::from_secs(2),
        ..Limits::default()
    }
}

/// A configuration serving the bundled examples (examples/flags with the
/// example plugins), `production` by default, on a free port.
pub fn examples_config(limits: Limits) -> ServeConfig {
    build_plugins();
    config_for(
        root().join("examples/flags"),
        Some(root().join("target/plugins")),
        "production",
        limits,
    )
}

/// A configuration over `flags` and `plugins` as `flaghost serve` would
/// build it with no options: on a free port, no Redis, no admin token.
pub fn config_for(
    flags: PathBuf,
    plugins: Option<PathBuf>,
    default_environment: &str,
    limits: Limits,
) -> ServeConfig {
    ServeConfig {
        listen: "127.0.0.1:0".parse().expect("address"),
        metrics_listen: None,
        traces: None,
        flags,
        plugins,
        plugin_cache_dir: None,
        plugin_cache_key: None,
        default_environment: default_environment.to_owned(),
        ignored: Vec::new(),
        cache_ttl: flaghost::cache::DEFAULT_TTL,
        redis: None,
        check_interval: Duration::from_secs(1),
        watch_interval: Some(Duration::from_secs(1)),
        admin_token: None,
        metrics_token: None,
        api_keys_file: None,
        api_key_rate_limit: None,
        http: Default::default(),
        limits,
        documents: Default::default(),
        compiler: compiler(),
    }
}

/// Installs the real clients (and the Prometheus parser) the client tests
/// use, once: tests/clients/install.sh is idempotent.
pub fn install_clients() {
    let status = std::process::Command::new("bash")
        .arg(root().join("tests/clients/install.sh"))
        .status()
        .expect("run tests/clients/install.sh");
    assert!(status.success(), "installing the clients failed");
}

/// A flag directory and a plugin directory in a temporary folder.
pub struct Dirs {
    tmp: tempfile::TempDir,
}

impl Dirs {
    /// Empty directories.
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir(tmp.path().join("flags")).expect("flags dir");
        std::fs::create_dir(tmp.path().join("plugins")).expect("plugins dir");
        Self { tmp }
    }

    /// The flag directory.
    pub fn flags(&self) -> PathBuf {
        self.tmp.path().join("flags")
    }

    /// The plugin directory.
    pub fn plugins(&self) -> PathBuf {
        self.tmp.path().join("plugins")
    }

    /// With a copy of the bundled example flag files (examples/flags), to
    /// break and mend.
    pub fn with_example_flags(self) -> Self {
        for env in ["production", "staging"] {
            let file = format!("{env}.json");
            std::fs::copy(
                root().join("examples/flags").join(&file),
                self.flags().join(&file),
            )
            .expect("copy the examples");
        }
        self
    }

    /// Writes `<environment>.json`.
    pub fn flag_file(self, environment: &str, doc: &Value) -> Self {
        let path = self.flags().join(format!("{environment}.json"));
        std::fs::write(path, serde_json::to_vec_pretty(doc).expect("json")).expect("write flags");
        self
    }

    /// Copies a component file in as plugin `name`.
    pub fn plugin(self, name: &str, component: &Path) -> Self {
        std::fs::copy(component, self.plugins().join(format!("{name}.wasm")))
            .unwrap_or_else(|e| panic!("copy {}: {e}", component.display()));
        self
    }

    /// Writes raw bytes as plugin `name`.
    pub fn plugin_bytes(self, name: &str, bytes: &[u8]) -> Self {
        std::fs::write(self.plugins().join(format!("{name}.wasm")), bytes).expect("write plugin");
        self
    }

    /// A serve configuration over these directories, listening on a free port.
    pub fn config(&self, default_environment: &str, limits: Limits) -> ServeConfig {
        config_for(
            self.flags(),
            Some(self.plugins()),
            default_environment,
            limits,
        )
    }
}

impl Default for Dirs {
    fn default() -> Self {
        Self::new()
    }
}

/// flaghost serving on 127.0.0.1 on a free port; stops when dropped.
pub struct Flaghost {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// A real HTTP client.
    pub client: reqwest::Client,
    /// `http://127.0.0.1:<port>` of `--metrics-listen`, when configured.
    pub metrics_base: Option<String>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Flaghost {
    /// Builds and serves `config`; fails as start-up would.
    pub async fn start(config: &ServeConfig) -> anyhow::Result<Self> {
        log_to_test_output();
        let service = flaghost::server::build(config).await?;
        let metrics_base = match &service.metrics_listener {
            Some(listener) => Some(format!("http://{}", listener.local_addr()?)),
            None => None,
        };
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        let base = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(flaghost::server::serve(listener, service, async {
            let _ = stopped.await;
        }));
        Ok(Self {
            base,
            client: reqwest::Client::new(),
            metrics_base,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// `POST {path}` with a raw body; the status and the JSON answer (Null if none).
    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request reaches flaghost");
        let status = response.status().as_u16();
        let bytes = response.bytes().await.expect("body");
        let json = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                panic!(
                    "answer is not JSON ({e}): {}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        };
        (status, json)
    }

    /// `GET {path}`: the status and the JSON answer.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("request reaches flaghost");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// `GET /admin/v1/plugins` with the admin token `token`: the listing.
    pub async fn plugin_listing(&self, token: &str) -> Value {
        self.client
            .get(format!("{}/admin/v1/plugins", self.base))
            .bearer_auth(token)
            .send()
            .await
            .expect("request reaches flaghost")
            .json()
            .await
            .expect("the listing is JSON")
    }

    /// Name and digest of every plugin loaded, from the admin listing.
    pub async fn loaded_plugins(&self, token: &str) -> Vec<(String, String)> {
        self.plugin_listing(token).await["plugins"]
            .as_array()
            .expect("plugins")
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().unwrap_or_default().to_owned(),
                    p["digest"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    /// The cache backend `/readyz` reports (`redis`, `memory-fallback`,
    /// `memory-only`).
    pub async fn cache_backend(&self) -> String {
        let (status, body) = self.get("/readyz").await;
        assert_eq!(status, 200, "{body}");
        body["cache"]["backend"]
            .as_str()
            .expect("a backend")
            .to_owned()
    }

    /// Evaluates `key` in the default environment with `context`.
    pub async fn evaluate(&self, key: &str, context: Value) -> (u16, Value) {
        self.evaluate_in(None, key, context).await
    }

    /// Evaluates `key` in `environment` (or the default) with `context`.
    pub async fn evaluate_in(
        &self,
        environment: Option<&str>,
        key: &str,
        context: Value,
    ) -> (u16, Value) {
        let prefix = environment
            .map(|e| format!("/environments/{e}"))
            .unwrap_or_default();
        let body = serde_json::json!({ "context": context }).to_string();
        self.post_raw(&format!("{prefix}/ofrep/v1/evaluate/flags/{key}"), body)
            .await
    }

    /// Stops serving and waits for in-flight requests to finish.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        }
    }
}

impl Drop for Flaghost {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Iterations of the `spin` fixture that take about `fraction` of `deadline`
/// on this machine, measured through the runtime as flaghost runs it (a
/// guest cannot read a clock, so a rule that stays just under its deadline
/// is calibrated from outside).
pub fn spin_iterations(deadline: Duration, fraction: f64) -> u64 {
    use flaghost::flags::RuleBinder as _;
    let runtime = flaghost::plugins::PluginRuntime::new(
        Limits {
            deadline: Duration::from_secs(30),
            ..Limits::default()
        },
        compiler(),
    )
    .expect("engine");
    let dirs = Dirs::new().plugin("spin", &fixture("spin"));
    let (set, errors) = runtime.load_dir(&dirs.plugins()).expect("plugin dir");
    assert!(errors.is_empty(), "{errors:?}");
    let probe = 2_000_000;
    let rule = set
        .bind(
            "f",
            &["off".into(), "on".into()],
            "spin",
            &serde_json::json!({ "iterations": probe }),
        )
        .expect("binds");
    let context = flaghost::evaluation::EvaluationContext::default();
    rule.evaluate(&context).expect("warms up");
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let started = std::time::Instant::now();
        rule.evaluate(&context).expect("spins");
        best = best.min(started.elapsed());
    }
    let per_iteration = best.as_secs_f64() / f64::from(probe);
    (deadline.as_secs_f64() * fraction / per_iteration) as u64
}

pub mod redis_server;
pub use redis_server::RedisServer;

/// Waits up to `within` for `check` to hold, polling; whether it did.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The `$evaluators` that killed a running flaghost once, hot-reloaded from a
/// file or read from Redis: 33 chained evaluators `e0`..`e32`, each 62 levels
/// of `{"!!": [...]}` (about 4,000 levels once resolved). A rule names `e0`.
pub fn deep_ref_evaluators() -> serde_json::Map<String, Value> {
    (0..33)
        .map(|i| {
            let next = if i == 32 {
                Value::Bool(true)
            } else {
                serde_json::json!({"$ref": format!("e{}", i + 1)})
            };
            let rule = (0..62).fold(next, |rule, _| serde_json::json!({"!!": [rule]}));
            (format!("e{i}"), rule)
        })
        .collect()
}

/// flaghost's warnings and errors in the test's captured output, so a
/// failing test shows why flaghost refused what it refused (libtest prints
/// it only for a test that fails). Once per test binary.
pub fn log_to_test_output() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("flaghost=warn")),
        )
        .try_init();
}

/// Each thread of process `pid` with its context switches so far (how
/// often it went to sleep or was put off the CPU), by name and thread id.
pub fn thread_switches(pid: u32) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or("")
                .to_owned()
        };
        let switches = field("voluntary_ctxt_switches:").parse().unwrap_or(0u64)
            + field("nonvoluntary_ctxt_switches:").parse().unwrap_or(0u64);
        out.insert(
            format!("{} {}", field("Name:"), task.file_name().to_string_lossy()),
            switches,
        );
    }
    out
}

/// The thread of process `pid` that woke most often during `over`, and
/// how often a second: what an idle process costs the machine.
pub fn busiest_idle_thread(pid: u32, over: Duration) -> (String, f64) {
    let before = thread_switches(pid);
    std::thread::sleep(over);
    let after = thread_switches(pid);
    after
        .iter()
        .map(|(name, n)| {
            let woke = n.saturating_sub(before.get(name).copied().unwrap_or(0));
            (name.clone(), woke as f64 / over.as_secs_f64())
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or_default()
}
