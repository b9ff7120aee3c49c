//! Start-up: load plugins and flags, pick the backends, serve until a signal.
//!
//! [`build`] is the one place that decides which cache and store run; it logs
//! what it picked.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::access::ApiKeys;
use crate::cache::{FlagCache, RedisCache, redact_url};
use crate::config::{IsolationArgs, ServeConfig, SourceArgs};
use crate::environments::{Environments, Timing};
use crate::http::{AppState, BearerToken, HttpOptions, app};
use crate::plugin_changes::PluginChanges;
use crate::plugins::{Compiler, PluginError, PluginRegistry, PluginRuntime, PluginSet};
use crate::signing::SigningKey;
use crate::store::{DirStore, FlagStore, StoreError};

/// A service ready to serve: its router state and what it loaded.
pub struct Service {
    /// The router's state.
    pub state: AppState,
    /// How the router behaves.
    pub http: HttpOptions,
    /// Keeps the engine (and its epoch ticker) alive.
    pub runtime: Arc<PluginRuntime>,
    /// The `--metrics-listen` socket, bound.
    pub metrics_listener: Option<TcpListener>,
    /// Reloads the plugin directory and flag files, and keeps the shared
    /// cache warm, while served.
    _maintenance: AbortOnDrop,
}

/// Stops a background task when the service goes.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The plugin runtime, compiling with `compiler`, caching compiled plugins
/// in `cache_dir` if given, authenticated with the key in `key_file` (by
/// default beside the directory: `<dir>.key`).
fn runtime(
    limits: crate::plugins::Limits,
    compiler: Compiler,
    cache_dir: Option<&Path>,
    key_file: Option<&Path>,
) -> anyhow::Result<PluginRuntime> {
    let runtime = PluginRuntime::new(limits, compiler)?;
    let Some(dir) = cache_dir else {
        return Ok(runtime);
    };
    let cache_dir_option = || {
        format!(
            "--plugin-cache-dir (FLAGHOST_PLUGIN_CACHE_DIR): cannot use {}",
            dir.display()
        )
    };
    // NB: the directory first (0700, as `Artifacts` wants it): the key's
    // default place is beside it, and its parents may not exist yet.
    {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(cache_dir_option)?;
    }
    let key_file = match key_file {
        Some(file) => file.to_path_buf(),
        None => default_key_file(dir).with_context(|| {
            format!(
                "--plugin-cache-key (FLAGHOST_PLUGIN_CACHE_KEY): needed, since {} has no name to put the key beside",
                dir.display()
            )
        })?,
    };
    let real_parent = std::path::absolute(&key_file)?
        .parent()
        .map(Path::canonicalize)
        .transpose()
        .context("--plugin-cache-key (FLAGHOST_PLUGIN_CACHE_KEY): its directory")?;
    if real_parent.is_some_and(|p| dir.canonicalize().is_ok_and(|d| p.starts_with(d))) {
        anyhow::bail!(
            "--plugin-cache-key (FLAGHOST_PLUGIN_CACHE_KEY): {} is inside the cache directory; keep the key outside it",
            key_file.display()
        );
    }
    let key = SigningKey::load_or_create(&key_file)
        .context("--plugin-cache-key (FLAGHOST_PLUGIN_CACHE_KEY)")?;
    runtime
        .cache_compiled_in(dir, key)
        .with_context(cache_dir_option)
}

/// `<dir>.key`, beside the cache directory `dir`.
fn default_key_file(dir: &Path) -> Option<std::path::PathBuf> {
    let absolute = std::path::absolute(dir).ok()?;
    let name = absolute.file_name()?.to_str()?;
    Some(absolute.with_file_name(format!("{name}.key")))
}

/// Loads plugins from `dir` (if any), refusing to go on if one fails.
fn load_plugins(
    runtime: &PluginRuntime,
    dir: Option<&Path>,
) -> anyhow::Result<(PluginSet, Vec<PluginError>)> {
    match dir {
        None => Ok((PluginSet::default(), Vec::new())),
        Some(dir) => runtime
            .load_dir(dir)
            .with_context(|| format!("cannot read the plugin directory {}", dir.display())),
    }
}

/// Builds the service for `config`: every plugin and every flag file must
/// load, or start-up fails listing what is wrong.
pub async fn build(config: &ServeConfig) -> anyhow::Result<Service> {
    let started = std::time::Instant::now();
    for ignored in &config.ignored {
        warn!(
            option = ignored.option,
            needs = ignored.without,
            "{ignored}"
        );
    }
    let runtime = Arc::new(runtime(
        config.limits.clone(),
        config.compiler.clone(),
        config.plugin_cache_dir.as_deref(),
        config.plugin_cache_key.as_deref(),
    )?);
    let (plugins, plugin_errors) = load_plugins(&runtime, config.plugins.as_deref())?;
    if !plugin_errors.is_empty() {
        let list: Vec<String> = plugin_errors.iter().map(ToString::to_string).collect();
        anyhow::bail!("plugins refused:\n  {}", list.join("\n  "));
    }
    for plugin in plugins.iter() {
        debug!(plugin = plugin.name(), digest = plugin.digest(), origin = ?plugin.origin(), "plugin loaded");
        if !plugin.trapped_imports().is_empty() {
            // NB: not INFO: every Python and JavaScript component imports
            // a dozen WASI interfaces it never calls; the admin listing
            // shows them (`trappedImports`).
            debug!(plugin = plugin.name(), imports = ?plugin.trapped_imports(),
                  "plugin imports interfaces outside the contract; calling them traps");
        }
    }
    for plugin in plugins
        .iter()
        .filter(|p| p.isolation() == crate::plugins::Isolation::Reuse)
    {
        info!(plugin = plugin.name(), isolation = %plugin.isolation(),
              "plugin instances are reused: a rule can carry one caller's data to another caller or flag");
    }
    let plugin_names: Vec<String> = plugins.iter().map(|p| p.name().to_owned()).collect();
    for name in config.limits.isolation_for.keys() {
        if !plugin_names.contains(name) {
            // NB: not an error: the plugin may be uploaded or dropped in later.
            warn!(plugin = %name, "--plugin-isolation-for names a plugin that is not loaded (yet)");
        }
    }
    let registry = PluginRegistry::new(plugins);

    // NB: the one place the shared cache is picked: Redis when REDIS_URL is
    // set, else none (the in-process snapshot is then the only cache).
    let shared: Option<Arc<dyn FlagCache>> = match &config.redis {
        None => {
            info!("redis disabled (REDIS_URL unset): in-memory cache only");
            None
        }
        Some(options) => {
            let redis = RedisCache::connect(options, Arc::new(registry.clone()))?;
            if !redis.wait_connected(crate::cache::CONNECT_TIMEOUT).await {
                warn!(redis = %redact_url(&options.url),
                      "redis unreachable at start-up: serving from memory, connecting in the background");
            }
            Some(Arc::new(redis))
        }
    };
    let store =
        Arc::new(DirStore::new(&config.flags, registry.clone()).with_limits(config.documents));
    let timing = Timing {
        ttl: config.cache_ttl,
        check_interval: config.check_interval,
    };
    let read_path = Arc::new(Environments::new(
        store.clone() as Arc<dyn FlagStore>,
        shared.clone(),
        timing,
    ));
    let environments = match store.environments_sync() {
        Ok(environments) => environments,
        Err(e) => {
            let from_redis = match &shared {
                Some(shared) => shared.environments().await.unwrap_or_default(),
                None => Vec::new(),
            };
            if from_redis.is_empty() {
                return Err(anyhow::Error::new(e).context(format!(
                    "cannot read the flag directory {}",
                    config.flags.display()
                )));
            }
            warn!(error = %e, environments = ?from_redis,
                  "cannot read the flag directory: serving the flag sets redis holds, marked STALE");
            from_redis
        }
    };

    let mut problems = Vec::new();
    let mut loaded = Vec::new();
    for env in &environments {
        match read_path.refresh(env).await {
            Ok(snapshot) => {
                for w in &snapshot.set.warnings {
                    warn!(environment = %env, problem = %w, "flag loaded with a rule it cannot evaluate");
                }
                for w in &snapshot.set.lints {
                    warn!(environment = %env, problem = %w, "flag file loaded otherwise than written");
                }
                loaded.push(format!("{env} ({} flags)", snapshot.set.flags.len()));
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    if !problems.is_empty() {
        anyhow::bail!("flag files refused:\n  {}", problems.join("\n  "));
    }
    if !environments.contains(&config.default_environment) {
        warn!(default_environment = %config.default_environment,
              "the default environment has no flag file: /ofrep/v1/ answers 404 until it has one");
    }
    info!(
        environments = %loaded.join(","),
        plugins = %plugin_names.join(","),
        cache = %shared.as_ref().map_or_else(|| "memory".to_owned(), |s| s.describe()),
        watch_interval_ms = config.watch_interval.map_or(0, |d| d.as_millis() as u64),
        store = %store.describe(),
        default_environment = %config.default_environment,
        plugin_deadline_ms = config.limits.deadline.as_secs_f64() * 1e3,
        plugin_memory_bytes = config.limits.memory_bytes,
        plugin_isolation = %config.limits.isolation,
        plugin_pagemap_reset = crate::plugins::pagemap_reset(),
        plugin_cache_dir = %config
            .plugin_cache_dir
            .as_deref()
            .map_or_else(|| "none".to_owned(), |d| d.display().to_string()),
        startup_ms = started.elapsed().as_millis() as u64,
        "flaghost loaded"
    );
    let api_keys = match &config.api_keys_file {
        None => None,
        Some(file) => {
            // NB: off the async workers: the path may be on a slow mount.
            let path = file.clone();
            let keys = tokio::task::spawn_blocking(move || ApiKeys::load(&path))
                .await
                .context("loading the API key file")?
                .context("--api-keys-file (FLAGHOST_API_KEYS_FILE)")?
                .with_rate_limit(config.api_key_rate_limit);
            if config.watch_interval.is_none() {
                warn!(file = %file.display(),
                      "--watch-interval-ms is 0: the API key file is not reloaded; a changed key needs a restart");
            }
            let (environments, keys_in_force) = keys.counts();
            info!(file = %file.display(), environments, keys = keys_in_force,
                  "API keys required: every environment needs one of its keys");
            Some(Arc::new(keys))
        }
    };
    let plugin_changes = config.plugins.as_ref().map(|dir| {
        Arc::new(PluginChanges::new(
            runtime.clone(),
            dir.clone(),
            store.clone(),
            read_path.clone(),
        ))
    });
    // NB: a look that compiles a changed plugin takes as long as the
    // compile (seconds; up to the compile bound): it runs in a task of its
    // own, started from the maintenance tick, so flag files, invalidations
    // and the Redis check never wait for it. One look at a time: a tick
    // that finds the last still running skips.
    let plugin_watch = plugin_changes.clone();
    let key_watch = api_keys.clone();
    let mut looking: Option<AbortOnDrop> = None;
    let maintenance = tokio::spawn(read_path.clone().maintain(config.watch_interval, move || {
        if let Some(keys) = &key_watch {
            keys.reload_in_background();
        }
        if let Some(changes) = &plugin_watch
            && looking.as_ref().is_none_or(|l| l.0.is_finished())
        {
            let changes = changes.clone();
            looking = Some(AbortOnDrop(tokio::spawn(async move {
                changes.look().await;
            })));
        }
    }));
    let metrics = Arc::new(crate::metrics::Metrics::new(crate::metrics::Sources {
        environments: read_path.clone(),
        plugins: registry.clone(),
        api_keys: api_keys.clone(),
    }));
    let metrics_listener = match config.metrics_listen {
        None => None,
        Some(address) => {
            let listener = TcpListener::bind(address).await.with_context(|| {
                format!("--metrics-listen (FLAGHOST_METRICS_LISTEN): cannot listen on {address}")
            })?;
            info!(address = %listener.local_addr()?, "metrics listening (GET /metrics, open)");
            Some(listener)
        }
    };
    Ok(Service {
        metrics_listener,
        state: AppState {
            metrics,
            environments: read_path,
            default_environment: config.default_environment.as_str().into(),
            admin: config.admin_token.as_deref().map(BearerToken::new),
            metrics_token: config.metrics_token.as_deref().map(BearerToken::new),
            plugins: registry,
            plugin_changes,
            plugin_pool: runtime.pool().clone(),
            plugin_budget: config.limits.request_budget(),
            api_keys,
        },
        http: config.http.clone(),
        runtime,
        _maintenance: AbortOnDrop(maintenance),
    })
}

/// Serves `service` on `listener` until `shutdown` completes, then finishes
/// in-flight requests and returns.
pub async fn serve(
    listener: TcpListener,
    mut service: Service,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let router = app(service.state.clone(), &service.http);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }
    };
    let metrics = service.metrics_listener.take().map(|listener| {
        // NB: its own small bounds: a scraper needs a connection or two,
        // and whoever else reaches this address must not hold the rest.
        let limits = crate::http::ConnectionLimits {
            max_connections: 64,
            max_per_client: 8,
            ..service.http.connections.clone()
        };
        let router = crate::http::metrics_app(service.state.clone());
        let stopped = until_stopped();
        tokio::spawn(async move {
            crate::http::connections::serve(listener, router, &limits, stopped).await;
        })
    });
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop.send(true);
    });
    crate::http::connections::serve(listener, router, &service.http.connections, until_stopped())
        .await;
    if let Some(metrics) = metrics {
        let _ = metrics.await;
    }
    drop(service);
    Ok(())
}

/// What `flaghost validate` found.
#[derive(Debug, Default)]
pub struct Validation {
    /// What stops a file or plugin from loading.
    pub problems: Vec<String>,
    /// Rules that load but can never be evaluated (their flags answer
    /// PARSE_ERROR), as `serve` logs them at load.
    pub parse_errors: Vec<String>,
    /// What loads otherwise than written (duplicate keys, inexact numbers,
    /// `fractional` weights that are not non-negative integers), as `serve`
    /// logs it at load.
    pub lints: Vec<String>,
}

impl Validation {
    /// One line saying what was found, and whether `validate` succeeds:
    /// problems always fail it; rules that can never be evaluated and lints
    /// fail it unless allowed.
    pub fn summary(&self, allow_parse_errors: bool, allow_warnings: bool) -> (String, bool) {
        let (problems, parse_errors, lints) = (
            self.problems.len(),
            self.parse_errors.len(),
            self.lints.len(),
        );
        if problems + parse_errors + lints == 0 {
            return ("all flag files and plugins load".into(), true);
        }
        let allowed = |allowed: bool, n: usize, flag: &str| {
            if allowed && n > 0 {
                format!(" (allowed by {flag})")
            } else {
                String::new()
            }
        };
        let ok = problems == 0
            && (allow_parse_errors || parse_errors == 0)
            && (allow_warnings || lints == 0);
        (
            format!(
                "{problems} problem(s), {parse_errors} rule(s) that can never be evaluated{}, \
                 {lints} warning(s) of what loads otherwise than written{}",
                allowed(allow_parse_errors, parse_errors, "--allow-parse-errors"),
                allowed(allow_warnings, lints, "--allow-warnings"),
            ),
            ok,
        )
    }
}

/// The plugins of `source` for a command run without a server (`validate`,
/// `eval`), isolated as `isolation` says, compiled by children running this
/// binary (which must be `flaghost`), and the errors of those that did not
/// load.
fn local_plugins(
    source: &SourceArgs,
    isolation: &IsolationArgs,
) -> anyhow::Result<(PluginSet, Vec<PluginError>)> {
    let mut limits = source.limits.to_limits(None)?;
    isolation.apply(&mut limits);
    let runtime = runtime(
        limits,
        Compiler::this_binary().context("cannot find the flaghost binary to compile plugins")?,
        source.plugin_cache_dir.as_deref(),
        source.plugin_cache_key.as_deref(),
    )?;
    load_plugins(&runtime, source.plugins.as_deref())
}

/// `flaghost validate`: every problem with the plugins and flag files.
/// Plugins are compiled by children running this binary (which must be
/// `flaghost`).
pub fn validate(source: &SourceArgs) -> anyhow::Result<Validation> {
    // NB: isolation changes no check: a plugin is checked on a fresh instance.
    let (plugins, plugin_errors) = local_plugins(source, &IsolationArgs::default())?;
    let mut problems: Vec<String> = plugin_errors.iter().map(ToString::to_string).collect();
    let store = DirStore::new(&source.flags, plugins).with_limits(source.documents.to_limits()?);
    let environments = store
        .environments_sync()
        .with_context(|| format!("cannot read the flag directory {}", source.flags.display()))?;
    let mut parse_errors = Vec::new();
    let mut lints = Vec::new();
    for env in environments {
        match store.load_sync(&env) {
            Ok(set) => {
                let file = source.flags.join(format!("{env}.json"));
                parse_errors.extend(set.warnings.iter().map(|w| {
                    format!(
                        "{}: {w} (the flag loads and answers PARSE_ERROR)",
                        file.display()
                    )
                }));
                lints.extend(set.lints.iter().map(|w| format!("{}: {w}", file.display())));
            }
            Err(StoreError::Invalid(e)) => {
                problems.extend(e.problems.iter().map(|p| format!("{}: {p}", e.file)));
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    Ok(Validation {
        problems,
        parse_errors,
        lints,
    })
}

/// `flaghost eval`: the flag set of `environment` (or the one environment,
/// or `production`) loaded from `source` as `serve` would load it, every
/// plugin included and isolated as `isolation` says; an error names what
/// did not load.
pub fn load_locally(
    source: &SourceArgs,
    isolation: &IsolationArgs,
    environment: Option<&str>,
) -> anyhow::Result<Arc<crate::flags::FlagSet>> {
    let (plugins, plugin_errors) = local_plugins(source, isolation)?;
    if !plugin_errors.is_empty() {
        let list: Vec<String> = plugin_errors.iter().map(ToString::to_string).collect();
        anyhow::bail!("plugins refused:\n  {}", list.join("\n  "));
    }
    let store = DirStore::new(&source.flags, plugins).with_limits(source.documents.to_limits()?);
    let environment = match environment {
        Some(name) => name.to_owned(),
        None => {
            let found = store.environments_sync().with_context(|| {
                format!("cannot read the flag directory {}", source.flags.display())
            })?;
            match found.as_slice() {
                [only] => only.clone(),
                _ if found.iter().any(|e| e == "production") => "production".into(),
                _ => anyhow::bail!(
                    "{} holds the environments {found:?}: choose one with --environment",
                    source.flags.display()
                ),
            }
        }
    };
    store.load_sync(&environment).map_err(|e| match e {
        StoreError::Invalid(e) => anyhow::anyhow!(
            "{} was refused:\n  {}",
            e.file,
            e.problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n  ")
        ),
        other => anyhow::anyhow!("{other}"),
    })
}
