//! Command line and environment: raw arguments (clap, each option also read
//! from an environment variable), then a validated [`ServeConfig`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::cache::{RedisOptions, RedisTls};
use crate::flags::DocumentLimits;
use crate::http::{Cors, HttpOptions};
use crate::plugins::{Compiler, Isolation, Limits, limits};

/// flaghost: feature-flag evaluation over OFREP, with targeting rules as
/// sandboxed WebAssembly components.
#[derive(Debug, Parser)]
#[command(name = "flaghost", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// flaghost's subcommands.
// NB: parsed once per process; the size of the arguments does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve OFREP evaluations over HTTP.
    Serve(ServeArgs),
    /// Check flag files and plugins without serving: exit 0 when all load
    /// and every rule can be evaluated, else list every problem (file, flag,
    /// reason) and exit 1.
    Validate(ValidateArgs),
    /// Evaluate a flag (or all) on this machine, without a server: print
    /// the OFREP answer (stdout) and why (stderr). Exit 0 when every flag
    /// evaluated, 1 when one answered an error, 3 when the flags, plugins
    /// or context could not be loaded.
    Eval(EvalArgs),
    /// Internal: compiles one plugin component from stdin under a bound, for
    /// a running flaghost (see `plugins::compiler`).
    #[command(name = "compile-worker", hide = true)]
    CompileWorker(crate::plugins::compiler::WorkerArgs),
}

/// `flaghost validate`.
#[derive(Debug, Clone, Args)]
pub struct ValidateArgs {
    /// Flags and plugins.
    #[command(flatten)]
    pub source: SourceArgs,

    /// Exit 0 even when some rules can never be evaluated (a `$ref` to a
    /// missing evaluator, a `$ref` cycle, invalid JsonLogic): flagd loads
    /// such files too, and their flags answer PARSE_ERROR. They are still
    /// listed.
    #[arg(long)]
    pub allow_parse_errors: bool,

    /// Exit 0 even when a file loads otherwise than written (duplicate flag
    /// keys or variant names, where the last one counts; numbers past ±2^53
    /// that are not exact; `fractional` weights that are not non-negative
    /// integers): flagd loads such files too. They are still listed.
    #[arg(long)]
    pub allow_warnings: bool,
}

/// `flaghost eval`.
#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("which").required(true).args(["flag", "all"])))]
pub struct EvalArgs {
    /// Flags and plugins.
    #[command(flatten)]
    pub source: SourceArgs,

    /// The environment (flag file `<environment>.json`). Default: the only
    /// one, or `production`.
    #[arg(long)]
    pub environment: Option<String>,

    /// The flag to evaluate.
    pub flag: Option<String>,

    /// Evaluate every flag of the environment.
    #[arg(long, conflicts_with = "flag")]
    pub all: bool,

    /// The evaluation context: a JSON object of attributes
    /// (`{"targetingKey": "user-1", "country": "NL"}`).
    #[arg(long, conflicts_with = "context_file")]
    pub context: Option<String>,

    /// A file holding the evaluation context as a JSON object.
    #[arg(long)]
    pub context_file: Option<PathBuf>,

    /// How plugin evaluations are isolated, as `serve` takes it: with
    /// `reuse`, `--all` shows what a plugin carries from flag to flag.
    #[command(flatten)]
    pub isolation: IsolationArgs,
}

/// Where flags and plugins come from.
#[derive(Debug, Clone, Args)]
pub struct SourceArgs {
    /// Directory of flag files, one per environment: `<environment>.json` in
    /// the flagd flag-definition format.
    #[arg(long, env = "FLAGHOST_FLAGS", default_value = "flags")]
    pub flags: PathBuf,

    /// Directory of targeting plugins: `<name>.wasm` components implementing
    /// the flaghost:rules contract. Without it, no plugin is loaded.
    #[arg(long, env = "FLAGHOST_PLUGINS")]
    pub plugins: Option<PathBuf>,

    /// Directory where compiled plugins are cached, so that later starts
    /// load them without compiling. Must be writable by flaghost only (its
    /// files are loaded as machine code). Unset: compile at every start.
    #[arg(long, env = "FLAGHOST_PLUGIN_CACHE_DIR")]
    pub plugin_cache_dir: Option<PathBuf>,

    /// File holding the key that authenticates the compiled plugins in
    /// `--plugin-cache-dir` (created, mode 0600, at the first start; it must
    /// stay flaghost's own). Default: `<cache dir>.key`, beside the directory.
    #[arg(long, env = "FLAGHOST_PLUGIN_CACHE_KEY")]
    pub plugin_cache_key: Option<PathBuf>,

    /// Sandbox limits for plugin calls.
    #[command(flatten)]
    pub limits: LimitArgs,

    /// Bounds on flag documents.
    #[command(flatten)]
    pub documents: DocumentArgs,
}

/// Bounds on a flag document, from a file or from Redis alike.
#[derive(Debug, Clone, Args)]
pub struct DocumentArgs {
    /// Largest flag file read, in MiB; a larger one is refused (before it is
    /// read) and the last good version keeps serving.
    #[arg(long, env = "FLAGHOST_MAX_FLAG_FILE_MIB", default_value_t = crate::flags::DEFAULT_MAX_FILE_BYTES >> 20)]
    pub max_flag_file_mib: usize,

    /// How deep a rule may nest (objects and arrays) once its `$ref`s are
    /// resolved; deeper refuses the file. At most 128.
    #[arg(long, env = "FLAGHOST_MAX_RULE_DEPTH", default_value_t = crate::flags::MAX_RULE_DEPTH)]
    pub max_rule_depth: usize,

    /// How many `$ref`s may chain (an evaluator whose rule names another,
    /// and so on); longer refuses the file.
    #[arg(long, env = "FLAGHOST_MAX_REF_CHAIN", default_value_t = crate::flags::DEFAULT_MAX_REF_CHAIN)]
    pub max_ref_chain: usize,

    /// What `$ref`s may add to one file's rules once resolved, in MiB (a
    /// shared evaluator counts once per use); more refuses the file. It
    /// stops evaluators that use each other many times over, which grow by
    /// 2^n.
    #[arg(long, env = "FLAGHOST_MAX_RULE_EXPANSION_MIB", default_value_t = crate::flags::DEFAULT_MAX_EXPANSION_BYTES >> 20)]
    pub max_rule_expansion_mib: usize,
}

impl DocumentArgs {
    /// The bounds these arguments ask for.
    pub fn to_limits(&self) -> Result<DocumentLimits, ConfigError> {
        let mib = |option, value: usize| {
            if (1..=1024).contains(&value) {
                Ok(value << 20)
            } else {
                Err(ConfigError {
                    option,
                    reason: "must be 1 to 1024".into(),
                })
            }
        };
        if !(1..=crate::flags::MAX_RULE_DEPTH).contains(&self.max_rule_depth) {
            return Err(ConfigError {
                option: "--max-rule-depth (FLAGHOST_MAX_RULE_DEPTH)",
                reason: format!(
                    "must be 1 to {}: rules are parsed, compiled and evaluated on threads sized for that depth",
                    crate::flags::MAX_RULE_DEPTH
                ),
            });
        }
        if !(1..=crate::flags::MAX_RULE_DEPTH).contains(&self.max_ref_chain) {
            return Err(ConfigError {
                option: "--max-ref-chain (FLAGHOST_MAX_REF_CHAIN)",
                reason: format!("must be 1 to {}", crate::flags::MAX_RULE_DEPTH),
            });
        }
        Ok(DocumentLimits {
            max_file_bytes: mib(
                "--max-flag-file-mib (FLAGHOST_MAX_FLAG_FILE_MIB)",
                self.max_flag_file_mib,
            )?,
            max_rule_depth: self.max_rule_depth,
            max_ref_chain: self.max_ref_chain,
            max_expansion_bytes: mib(
                "--max-rule-expansion-mib (FLAGHOST_MAX_RULE_EXPANSION_MIB)",
                self.max_rule_expansion_mib,
            )?,
        })
    }
}

/// The plugin sandbox's limits.
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Wall-clock deadline of one plugin call, in milliseconds.
    #[arg(long, env = "FLAGHOST_PLUGIN_DEADLINE_MS", default_value_t = limits::DEFAULT_DEADLINE.as_millis() as u64)]
    pub plugin_deadline_ms: u64,

    /// Wall-clock deadline of a plugin's start-up, in milliseconds: creating
    /// an instance, its configuration check, and creating a flag's rule in
    /// it. Apart from the evaluation deadline because a Python or
    /// JavaScript runtime starts far slower than it evaluates; the
    /// request's plugin budget does not cut it either.
    #[arg(long, env = "FLAGHOST_PLUGIN_INIT_DEADLINE_MS", default_value_t = limits::DEFAULT_INIT_DEADLINE.as_millis() as u64)]
    pub plugin_init_deadline_ms: u64,

    /// Cap on a plugin instance's linear memory, in MiB.
    #[arg(long, env = "FLAGHOST_PLUGIN_MEMORY_MIB", default_value_t = limits::DEFAULT_MEMORY_BYTES >> 20)]
    pub plugin_memory_mib: usize,

    /// Largest plugin component accepted (a file in the plugin directory or
    /// an upload through the admin API), in MiB.
    #[arg(long, env = "FLAGHOST_PLUGIN_MAX_FILE_MIB", default_value_t = limits::DEFAULT_MAX_COMPONENT_BYTES >> 20)]
    pub plugin_max_file_mib: usize,

    /// Largest answer a plugin call may return (a variant name, or an error
    /// message), in bytes; larger answers are refused as errors.
    #[arg(long, env = "FLAGHOST_PLUGIN_MAX_ANSWER_BYTES", default_value_t = limits::DEFAULT_MAX_ANSWER_BYTES)]
    pub plugin_max_answer_bytes: usize,

    /// Context bytes one plugin call may read (through `context.get`);
    /// reading past it fails the evaluation.
    #[arg(long, env = "FLAGHOST_PLUGIN_MAX_CONTEXT_BYTES", default_value_t = limits::DEFAULT_MAX_CONTEXT_BYTES)]
    pub plugin_max_context_bytes: usize,

    /// Plugins that may be loaded at once; the pool of plugin instances is
    /// sized for them (twice this many live plugins, counting replaced
    /// versions still finishing, times plugin threads + 2 instances each).
    #[arg(long, env = "FLAGHOST_PLUGIN_MAX_PLUGINS", default_value_t = limits::DEFAULT_MAX_PLUGINS)]
    pub plugin_max_plugins: usize,

    /// CPU time compiling one plugin may use, in seconds. Each compile runs
    /// in a child process of its own; one that needs more is stopped and
    /// the plugin refused.
    #[arg(long, env = "FLAGHOST_PLUGIN_COMPILE_CPU_SECS", default_value_t = crate::plugins::compiler::DEFAULT_CPU.as_secs())]
    pub plugin_compile_cpu_secs: u64,

    /// Memory (address space) compiling one plugin may use, in MiB.
    #[arg(long, env = "FLAGHOST_PLUGIN_COMPILE_MEMORY_MIB", default_value_t = crate::plugins::compiler::DEFAULT_MEMORY_BYTES >> 20)]
    pub plugin_compile_memory_mib: u64,
}

/// How the plugin threads are shared while serving: only `serve` takes
/// these (`validate` and `eval` run no pool).
#[derive(Debug, Clone, Args)]
pub struct PoolArgs {
    /// Threads plugin code runs on (never the HTTP workers). Default: the
    /// number of cores, at least 2.
    #[arg(long, env = "FLAGHOST_PLUGIN_THREADS")]
    pub plugin_threads: Option<usize>,

    /// The plugin threads' `nice` value (0–19): above 0 they yield the CPU
    /// to the HTTP workers when both want it. Deadlines are wall-clock, so a
    /// higher value turns CPU contention into plugin deadlines.
    #[arg(long, env = "FLAGHOST_PLUGIN_NICE", default_value_t = limits::DEFAULT_POOL_NICE)]
    pub plugin_nice: i32,

    /// Plugin threads one plugin may hold at once (its share); its other
    /// calls wait in its queue. Default: half the plugin threads.
    #[arg(long, env = "FLAGHOST_PLUGIN_MAX_CONCURRENCY")]
    pub plugin_max_concurrency: Option<usize>,

    /// Evaluations of one plugin that may wait for a plugin thread; more
    /// answer an error at once.
    #[arg(long, env = "FLAGHOST_PLUGIN_QUEUE", default_value_t = limits::DEFAULT_QUEUE)]
    pub plugin_queue: usize,

    /// Running time all the plugin calls of one request may spend together
    /// (a bulk evaluation makes one per plugin flag), in milliseconds; waiting for a plugin thread is not counted. Flags it
    /// does not reach answer an error saying so. Default: one deadline.
    #[arg(long, env = "FLAGHOST_PLUGIN_REQUEST_BUDGET_MS")]
    pub plugin_request_budget_ms: Option<u64>,

    /// Share of the deadline in CPU time past which a call is a strike
    /// toward quarantine (0.5: a call using over half its deadline; a
    /// deadline reached with less CPU is the machine's doing).
    #[arg(long, env = "FLAGHOST_PLUGIN_STRIKE_FRACTION", default_value_t = limits::DEFAULT_STRIKE_FRACTION)]
    pub plugin_strike_fraction: f64,

    /// Strikes (deadlines, or calls past the strike fraction of the
    /// deadline) close together after which a plugin is quarantined: its
    /// evaluations answer an error at once, without running. Strikes fill a
    /// bucket that drains one every 500 ms; quick answers do not empty it.
    #[arg(long, env = "FLAGHOST_PLUGIN_QUARANTINE_AFTER", default_value_t = limits::DEFAULT_QUARANTINE_AFTER)]
    pub plugin_quarantine_after: u32,

    /// How long a quarantine lasts before the plugin is tried again, in
    /// milliseconds.
    #[arg(long, env = "FLAGHOST_PLUGIN_QUARANTINE_MS", default_value_t = limits::DEFAULT_QUARANTINE_FOR.as_millis() as u64)]
    pub plugin_quarantine_ms: u64,

    /// How plugin evaluations are isolated.
    #[command(flatten)]
    pub isolation: IsolationArgs,
}

/// How plugin evaluations are isolated: `serve` takes these, and `eval`
/// (whose `--all` calls a plugin once per flag, as one request would).
#[derive(Debug, Clone, Default, Args)]
pub struct IsolationArgs {
    /// How plugin evaluations are isolated. `fresh`: a new instance for
    /// every evaluation, so nothing one caller's evaluation leaves in a
    /// plugin reaches another caller or flag (about 16 µs per evaluation
    /// for a small Rust rule). `reuse`: one instance per plugin per plugin
    /// thread, reused across callers and flags (about 1 µs), so a rule can
    /// carry one caller's data to the next: only for plugins trusted not to.
    #[arg(long, env = "FLAGHOST_PLUGIN_ISOLATION", value_enum, default_value_t = Isolation::Fresh)]
    pub plugin_isolation: Isolation,

    /// One plugin isolated otherwise than --plugin-isolation, as
    /// `NAME=fresh` or `NAME=reuse` (repeat it, or separate with commas in
    /// the variable): e.g. `--plugin-isolation-for py-rule=reuse` for a
    /// runtime too dear to instantiate per evaluation.
    #[arg(long, env = "FLAGHOST_PLUGIN_ISOLATION_FOR", value_delimiter = ',', value_parser = parse_isolation_for)]
    pub plugin_isolation_for: Vec<(String, Isolation)>,
}

/// `NAME=MODE` of `--plugin-isolation-for`.
fn parse_isolation_for(text: &str) -> Result<(String, Isolation), String> {
    let (name, mode) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not NAME=MODE (e.g. py-rule=reuse)"))?;
    let name = name.trim();
    if !crate::plugins::valid_plugin_name(name) {
        return Err(format!(
            "{name:?} is not a plugin name (letters, digits, '.', '-' and '_')"
        ));
    }
    let mode = <Isolation as ValueEnum>::from_str(mode.trim(), true)
        .map_err(|_| format!("{mode:?} is not an isolation mode: fresh or reuse"))?;
    Ok((name.to_owned(), mode))
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `flaghost serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "FLAGHOST_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Address of a second listener serving only `GET /metrics`, open to
    /// whoever reaches it (a scraper's network). Unset: `/metrics` is on the
    /// main address, behind the admin token.
    #[arg(long, env = "FLAGHOST_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,

    /// Flags and plugins.
    #[command(flatten)]
    pub source: SourceArgs,

    /// How the plugin threads are shared.
    #[command(flatten)]
    pub pool: PoolArgs,

    /// The environment `/ofrep/v1/...` evaluates in;
    /// `/environments/{env}/ofrep/v1/...` picks another.
    #[arg(
        long,
        env = "FLAGHOST_DEFAULT_ENVIRONMENT",
        default_value = "production"
    )]
    pub default_environment: String,

    /// Seconds a resolved flag set stays cached before it is reloaded.
    #[arg(long, env = "FLAG_CACHE_TTL", default_value_t = crate::cache::DEFAULT_TTL.as_secs())]
    pub cache_ttl: u64,

    /// Redis to share resolved flag sets through
    /// (`redis://[user:password@]host[:port][/db]`; `rediss://` for TLS; an
    /// ACL user as `redis://user:password@host`). Unset: an in-memory
    /// cache only. An unreachable Redis is no start-up error: flaghost serves
    /// from memory and moves onto Redis when it answers.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<Secret>,

    /// How long a request may wait for Redis before it is served from
    /// memory, in milliseconds.
    #[arg(long, env = "FLAGHOST_REDIS_RESPONSE_TIMEOUT_MS", default_value_t = crate::cache::DEFAULT_RESPONSE_TIMEOUT.as_millis() as u64)]
    pub redis_response_timeout_ms: u64,

    /// PEM file of the CA certificates that sign Redis's TLS certificate
    /// (`rediss://` only); only these are then trusted. Unset: public CAs
    /// (Mozilla's roots).
    #[arg(long, env = "FLAGHOST_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// PEM file of a client certificate for a Redis that asks for one
    /// (`tls-auth-clients yes`); with --redis-client-key.
    #[arg(long, env = "FLAGHOST_REDIS_CLIENT_CERT")]
    pub redis_client_cert: Option<PathBuf>,

    /// PEM file of the client certificate's private key (unencrypted).
    #[arg(long, env = "FLAGHOST_REDIS_CLIENT_KEY")]
    pub redis_client_key: Option<PathBuf>,

    /// A secret shared by every instance using this Redis (16 characters
    /// or more): entries are signed with it (HMAC-SHA-256), and an entry
    /// that is unsigned, does not verify, or has expired is ignored and
    /// overwritten. Unset: whatever Redis holds is trusted.
    #[arg(long, env = "FLAGHOST_CACHE_SIGNING_KEY", hide_env_values = true)]
    pub cache_signing_key: Option<Secret>,

    /// Largest Redis entry read or written, in MiB; a larger one is ignored
    /// (never fetched whole) or not written. Default: the largest entry a
    /// flag file within the document bounds makes (`--max-flag-file-mib`
    /// plus `--max-rule-expansion-mib` plus 1; 33 with their defaults).
    #[arg(long, env = "FLAGHOST_CACHE_MAX_ENTRY_MIB")]
    pub cache_max_entry_mib: Option<usize>,

    /// How often each instance checks that Redis still holds its flag sets
    /// (and rewrites the missing), and retries a failed refresh, in
    /// milliseconds.
    #[arg(long, env = "FLAGHOST_CHECK_INTERVAL_MS", default_value_t = 1000)]
    pub check_interval_ms: u64,

    /// How often the flag directory and the plugin directory are checked
    /// for changed, new and removed files, in milliseconds; 0 turns
    /// reloading off.
    #[arg(long, env = "FLAGHOST_WATCH_INTERVAL_MS", default_value_t = 1000)]
    pub watch_interval_ms: u64,

    /// Token that unlocks the admin API (`Authorization: Bearer <token>`).
    /// Unset: the admin API is off.
    #[arg(long, env = "FLAGHOST_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,

    /// Token that reads `GET /metrics` on the main address and nothing
    /// else, for a scraper that must not hold the admin token (the admin
    /// token reads it too). Unset: only the admin token does.
    #[arg(long, env = "FLAGHOST_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<Secret>,

    /// JSON file of callers' API keys per environment,
    /// `{"<environment>": ["<key>", "sha256:<hex>", ...]}`; callers send
    /// `Authorization: Bearer <key>` or `X-API-Key: <key>`. Set, every
    /// environment needs a key; unset, evaluation is open. Reloaded when it
    /// changes (with --watch-interval-ms).
    #[arg(long, env = "FLAGHOST_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,

    /// Requests a second each API key may make (it may also burst this
    /// many at once); past it, 429 with `Retry-After`. 0 or unset: no limit.
    #[arg(long, env = "FLAGHOST_API_KEY_RATE_LIMIT")]
    pub api_key_rate_limit: Option<u32>,

    /// Largest request body accepted, in bytes; larger ones get a 413.
    #[arg(long, env = "FLAGHOST_BODY_LIMIT", default_value_t = crate::http::DEFAULT_BODY_LIMIT)]
    pub body_limit: usize,

    /// Time a client has to send a request's headers, in milliseconds
    /// (an idle keep-alive connection too); past it the connection is closed.
    #[arg(long, env = "FLAGHOST_HEADER_TIMEOUT_MS", default_value_t = crate::http::connections::DEFAULT_HEADER_TIMEOUT.as_millis() as u64)]
    pub header_timeout_ms: u64,

    /// Time a client has to send a request's whole body, in milliseconds,
    /// plus a second for every 64 KiB it sends; past it the request is
    /// refused (408).
    #[arg(long, env = "FLAGHOST_BODY_TIMEOUT_MS", default_value_t = crate::http::connections::DEFAULT_BODY_TIMEOUT.as_millis() as u64)]
    pub body_timeout_ms: u64,

    /// Client connections open at once; one more is closed at once. Default:
    /// the process's open-file limit less 256 (kept for flaghost's own
    /// files, Redis and plugin compiles), at most 10,000.
    #[arg(long, env = "FLAGHOST_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Client connections open at once from one address (an IPv6 client
    /// counts by its /64). Default: half of `--max-connections`, so one
    /// client never holds every slot. Behind a proxy, where every connection
    /// comes from the proxy, set it to `--max-connections`.
    #[arg(long, env = "FLAGHOST_MAX_CONNECTIONS_PER_CLIENT")]
    pub max_connections_per_client: Option<usize>,

    /// Browser origins allowed to call flaghost (CORS), comma-separated
    /// (`https://app.example.com,https://admin.example.com`), or `*` for any.
    /// Unset: no CORS headers, so browsers refuse cross-origin calls.
    #[arg(long, env = "FLAGHOST_CORS_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub cors_allowed_origins: Vec<String>,

    /// OTLP/HTTP endpoint of a trace collector (`http://collector:4318`;
    /// spans go to `<endpoint>/v1/traces`, protobuf). Unset: no traces.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Share of the traces started here that are kept, 0 to 1 (a caller's
    /// `traceparent` decides for its own).
    #[arg(long, env = "FLAGHOST_TRACE_SAMPLE_RATIO", default_value_t = 1.0)]
    pub trace_sample_ratio: f64,

    /// Log format (the level comes from `RUST_LOG`, default `info`).
    #[arg(long, env = "FLAGHOST_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// A secret given on the command line or in the environment (the Redis
/// URL, which may hold a password, and the tokens): its `Debug` never shows
/// it, so printing the parsed arguments leaks nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Self(text.to_owned()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Longest cache TTL: 30 days.
const MAX_TTL_SECONDS: u64 = 30 * 24 * 3600;
/// Longest interval or timeout: a day.
const MAX_INTERVAL_MS: u64 = 24 * 3600 * 1000;

/// A configuration value that cannot work.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{option}: {reason}")]
pub struct ConfigError {
    /// The option (and its environment variable).
    pub option: &'static str,
    /// Why.
    pub reason: String,
}

/// A validated `serve` configuration. Its `Debug` shows no secret: the
/// admin token is redacted, and so is a password in the Redis URL.
#[derive(Clone)]
pub struct ServeConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Address serving `GET /metrics` alone, open; `None`: none.
    pub metrics_listen: Option<SocketAddr>,
    /// Where spans go; `None`: no traces.
    pub traces: Option<crate::telemetry::TraceOptions>,
    /// Flag file directory.
    pub flags: PathBuf,
    /// Plugin directory, if any.
    pub plugins: Option<PathBuf>,
    /// Where compiled plugins are cached, if anywhere.
    pub plugin_cache_dir: Option<PathBuf>,
    /// The key file authenticating them (`None`: `<cache dir>.key`).
    pub plugin_cache_key: Option<PathBuf>,
    /// Default environment.
    pub default_environment: String,
    /// Settings given that have no effect in this configuration (warned
    /// about at start-up).
    pub ignored: Vec<Ignored>,
    /// Cache TTL.
    pub cache_ttl: Duration,
    /// Redis, if configured.
    pub redis: Option<RedisOptions>,
    /// How often the shared cache is checked and failed refreshes retried.
    pub check_interval: Duration,
    /// How often flag files are checked for changes; `None`: never.
    pub watch_interval: Option<Duration>,
    /// The admin API's token; `None`: the admin API is off.
    pub admin_token: Option<String>,
    /// A token that reads `/metrics` only; `None`: only the admin token does.
    pub metrics_token: Option<String>,
    /// Callers' API keys; `None`: evaluation is open.
    pub api_keys_file: Option<PathBuf>,
    /// Each key's request rate; `None`: unlimited.
    pub api_key_rate_limit: Option<crate::access::RateLimit>,
    /// The HTTP edge: body limit, CORS.
    pub http: HttpOptions,
    /// Plugin limits.
    pub limits: Limits,
    /// Bounds on flag documents, from files and from Redis.
    pub documents: DocumentLimits,
    /// Where plugins are compiled: a child process of this binary, under
    /// the compile bound of `limits`.
    pub compiler: Compiler,
}

/// A setting given without the one it needs: it does nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ignored {
    /// The setting given.
    pub option: &'static str,
    /// The setting it needs, not given.
    pub without: &'static str,
}

impl std::fmt::Display for Ignored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} is ignored without {}", self.option, self.without)
    }
}

impl std::fmt::Debug for ServeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeConfig")
            .field("listen", &self.listen)
            .field("metrics_listen", &self.metrics_listen)
            .field("traces", &self.traces)
            .field("flags", &self.flags)
            .field("plugins", &self.plugins)
            .field("plugin_cache_dir", &self.plugin_cache_dir)
            .field("plugin_cache_key", &self.plugin_cache_key)
            .field("default_environment", &self.default_environment)
            .field("ignored", &self.ignored)
            .field("cache_ttl", &self.cache_ttl)
            .field("redis", &self.redis)
            .field("check_interval", &self.check_interval)
            .field("watch_interval", &self.watch_interval)
            .field(
                "admin_token",
                &self.admin_token.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "metrics_token",
                &self.metrics_token.as_ref().map(|_| "<redacted>"),
            )
            .field("api_keys_file", &self.api_keys_file)
            .field("api_key_rate_limit", &self.api_key_rate_limit)
            .field("http", &self.http)
            .field("limits", &self.limits)
            .field("documents", &self.documents)
            .field("compiler", &self.compiler)
            .finish()
    }
}

impl LimitArgs {
    /// The limits these arguments ask for, the plugin threads shared as
    /// `pool` says. `None`: `validate` and `eval`, which call plugins one at
    /// a time, on one plugin thread; `serve` checks its own pool's bound
    /// (below) with the threads it is given.
    pub fn to_limits(&self, pool: Option<&PoolArgs>) -> Result<Limits, ConfigError> {
        if self.plugin_deadline_ms == 0 {
            return Err(ConfigError {
                option: "--plugin-deadline-ms (FLAGHOST_PLUGIN_DEADLINE_MS)",
                reason: "must be at least 1".into(),
            });
        }
        if self.plugin_init_deadline_ms == 0 || self.plugin_init_deadline_ms > MAX_INTERVAL_MS {
            return Err(ConfigError {
                option: "--plugin-init-deadline-ms (FLAGHOST_PLUGIN_INIT_DEADLINE_MS)",
                reason: format!("must be between 1 and {MAX_INTERVAL_MS}"),
            });
        }
        if self.plugin_memory_mib == 0 || self.plugin_memory_mib > 4096 {
            return Err(ConfigError {
                option: "--plugin-memory-mib (FLAGHOST_PLUGIN_MEMORY_MIB)",
                reason: "must be between 1 and 4096".into(),
            });
        }
        if self.plugin_max_file_mib == 0 || self.plugin_max_file_mib > 1024 {
            return Err(ConfigError {
                option: "--plugin-max-file-mib (FLAGHOST_PLUGIN_MAX_FILE_MIB)",
                reason: "must be between 1 and 1024".into(),
            });
        }
        if self.plugin_compile_cpu_secs == 0 || self.plugin_compile_cpu_secs > 3600 {
            return Err(ConfigError {
                option: "--plugin-compile-cpu-secs (FLAGHOST_PLUGIN_COMPILE_CPU_SECS)",
                reason: "must be between 1 and 3600".into(),
            });
        }
        if !(256..=(1 << 20)).contains(&self.plugin_compile_memory_mib) {
            return Err(ConfigError {
                option: "--plugin-compile-memory-mib (FLAGHOST_PLUGIN_COMPILE_MEMORY_MIB)",
                reason: "must be between 256 and 1048576 (the compiler itself needs about 100 MiB of address space)".into(),
            });
        }
        let mut limits = Limits {
            deadline: Duration::from_millis(self.plugin_deadline_ms),
            init_deadline: Duration::from_millis(self.plugin_init_deadline_ms),
            memory_bytes: self.plugin_memory_mib << 20,
            max_component_bytes: self.plugin_max_file_mib << 20,
            max_answer_bytes: self.plugin_max_answer_bytes.max(1),
            max_context_bytes: self.plugin_max_context_bytes.max(1),
            max_plugins: self.plugin_max_plugins.clamp(1, 4096),
            compile_cpu: Duration::from_secs(self.plugin_compile_cpu_secs),
            compile_memory_bytes: self.plugin_compile_memory_mib << 20,
            ..Limits::default()
        };
        match pool {
            Some(pool) => pool.apply(&mut limits)?,
            None => {
                limits.pool_threads = 1;
                limits.max_concurrency = 1;
            }
        }
        let memories = u64::from(limits.pool_component_instances())
            * u64::from(limits::MAX_MEMORIES_PER_COMPONENT);
        if memories > limits::MAX_POOL_MEMORIES {
            return Err(ConfigError {
                option: "--plugin-max-plugins (FLAGHOST_PLUGIN_MAX_PLUGINS) with --plugin-threads",
                reason: format!(
                    "the instance pool would hold {memories} memory slots (2 × plugins × (threads + 2) × {}), \
                     over {} (each reserves about 4 GiB of address space): lower either",
                    limits::MAX_MEMORIES_PER_COMPONENT,
                    limits::MAX_POOL_MEMORIES
                ),
            });
        }
        Ok(limits)
    }
}

impl PoolArgs {
    /// Sets the pool's share of `limits` as these arguments ask.
    fn apply(&self, limits: &mut Limits) -> Result<(), ConfigError> {
        if !(self.plugin_strike_fraction > 0.0 && self.plugin_strike_fraction <= 1.0) {
            return Err(ConfigError {
                option: "--plugin-strike-fraction (FLAGHOST_PLUGIN_STRIKE_FRACTION)",
                reason: "must be more than 0 and at most 1".into(),
            });
        }
        let pool_threads = self
            .plugin_threads
            .unwrap_or_else(limits::default_pool_threads)
            .clamp(1, 256);
        limits.pool_threads = pool_threads;
        limits.max_concurrency = self
            .plugin_max_concurrency
            .unwrap_or((pool_threads / 2).max(1))
            .clamp(1, pool_threads);
        limits.queue = self.plugin_queue.clamp(1, 1 << 16);
        limits.pool_nice = self.plugin_nice.clamp(0, 19);
        limits.request_budget = self
            .plugin_request_budget_ms
            .map(|ms| Duration::from_millis(ms.clamp(1, MAX_INTERVAL_MS)));
        limits.strike_fraction = self.plugin_strike_fraction;
        limits.quarantine_after = self.plugin_quarantine_after.max(1);
        limits.quarantine_for =
            Duration::from_millis(self.plugin_quarantine_ms.min(MAX_INTERVAL_MS));
        self.isolation.apply(limits);
        Ok(())
    }
}

impl IsolationArgs {
    /// Sets how `limits` isolate plugin evaluations, as these arguments ask.
    pub fn apply(&self, limits: &mut Limits) {
        limits.isolation = self.plugin_isolation;
        limits.isolation_for = self.plugin_isolation_for.iter().cloned().collect();
    }
}

impl ServeArgs {
    /// Settings given that do nothing without another: refusing them would
    /// break the documented rollback (unset `REDIS_URL`, keep the rest of
    /// `.env`), so they are named in a warning at start-up instead.
    fn ignored(&self) -> Vec<Ignored> {
        let set = |p: &Option<PathBuf>| p.as_ref().is_some_and(|p| !p.as_os_str().is_empty());
        let redis = self
            .redis_url
            .as_ref()
            .is_some_and(|u| !u.expose().trim().is_empty());
        let keys = set(&self.api_keys_file);
        [
            (
                !redis && set(&self.redis_ca_file),
                "--redis-ca-file (FLAGHOST_REDIS_CA_FILE)",
                "REDIS_URL",
            ),
            (
                !redis && set(&self.redis_client_cert),
                "--redis-client-cert (FLAGHOST_REDIS_CLIENT_CERT)",
                "REDIS_URL",
            ),
            (
                !redis && set(&self.redis_client_key),
                "--redis-client-key (FLAGHOST_REDIS_CLIENT_KEY)",
                "REDIS_URL",
            ),
            (
                !redis
                    && self
                        .cache_signing_key
                        .as_ref()
                        .is_some_and(|k| !k.expose().is_empty()),
                "--cache-signing-key (FLAGHOST_CACHE_SIGNING_KEY)",
                "REDIS_URL",
            ),
            (
                !redis && self.cache_max_entry_mib.is_some(),
                "--cache-max-entry-mib (FLAGHOST_CACHE_MAX_ENTRY_MIB)",
                "REDIS_URL",
            ),
            (
                !keys && self.api_key_rate_limit.is_some_and(|n| n > 0),
                "--api-key-rate-limit (FLAGHOST_API_KEY_RATE_LIMIT)",
                "--api-keys-file (FLAGHOST_API_KEYS_FILE)",
            ),
        ]
        .into_iter()
        .filter(|(given, ..)| *given)
        .map(|(_, option, without)| Ignored { option, without })
        .collect()
    }

    /// Validates the raw arguments.
    pub fn validate(self) -> Result<ServeConfig, ConfigError> {
        if !crate::store::valid_environment_name(&self.default_environment) {
            return Err(ConfigError {
                option: "--default-environment (FLAGHOST_DEFAULT_ENVIRONMENT)",
                reason: format!(
                    "{:?} is not a valid environment name: use letters, digits, '_', '.' and '-'",
                    self.default_environment
                ),
            });
        }
        if self.cache_ttl == 0 || self.cache_ttl > MAX_TTL_SECONDS {
            return Err(ConfigError {
                option: "--cache-ttl (FLAG_CACHE_TTL)",
                reason: format!("must be between 1 and {MAX_TTL_SECONDS} seconds (30 days)"),
            });
        }
        for (option, ms) in [
            (
                "--check-interval-ms (FLAGHOST_CHECK_INTERVAL_MS)",
                self.check_interval_ms,
            ),
            (
                "--watch-interval-ms (FLAGHOST_WATCH_INTERVAL_MS)",
                self.watch_interval_ms,
            ),
            (
                "--redis-response-timeout-ms (FLAGHOST_REDIS_RESPONSE_TIMEOUT_MS)",
                self.redis_response_timeout_ms,
            ),
            (
                "--header-timeout-ms (FLAGHOST_HEADER_TIMEOUT_MS)",
                self.header_timeout_ms,
            ),
            (
                "--body-timeout-ms (FLAGHOST_BODY_TIMEOUT_MS)",
                self.body_timeout_ms,
            ),
        ] {
            if ms > MAX_INTERVAL_MS {
                return Err(ConfigError {
                    option,
                    reason: format!("must be at most {MAX_INTERVAL_MS} ms (a day)"),
                });
            }
        }
        let cache_ttl = Duration::from_secs(self.cache_ttl);
        let documents = self.source.documents.to_limits()?;
        let ignored = self.ignored();
        let redis = match self.redis_url.as_ref().map(|u| u.expose().trim()) {
            None | Some("") => None,
            Some(url) => {
                RedisOptions::check_url(url).map_err(|reason| ConfigError {
                    option: "--redis-url (REDIS_URL)",
                    reason,
                })?;
                if self.redis_response_timeout_ms == 0 {
                    return Err(ConfigError {
                        option: "--redis-response-timeout-ms (FLAGHOST_REDIS_RESPONSE_TIMEOUT_MS)",
                        reason: "must be at least 1".into(),
                    });
                }
                let signing_key = match self.cache_signing_key.as_ref().map(|k| k.expose().trim()) {
                    None | Some("") => None,
                    Some(secret) if secret.chars().count() < 16 => {
                        return Err(ConfigError {
                            option: "--cache-signing-key (FLAGHOST_CACHE_SIGNING_KEY)",
                            reason: "must be at least 16 characters: anyone who guesses it can plant flags in Redis".into(),
                        });
                    }
                    Some(secret) => Some(Arc::new(crate::signing::SigningKey::from_secret(secret))),
                };
                let max_entry_bytes = match self.cache_max_entry_mib {
                    None => documents.max_entry_bytes(),
                    Some(mib @ 1..=2048) => mib << 20,
                    Some(_) => {
                        return Err(ConfigError {
                            option: "--cache-max-entry-mib (FLAGHOST_CACHE_MAX_ENTRY_MIB)",
                            reason: "must be 1 to 2048".into(),
                        });
                    }
                };
                let nonempty = |p: Option<PathBuf>| p.filter(|p| !p.as_os_str().is_empty());
                let client_cert = match (
                    nonempty(self.redis_client_cert),
                    nonempty(self.redis_client_key),
                ) {
                    (None, None) => None,
                    (Some(cert), Some(key)) => Some((cert, key)),
                    _ => {
                        return Err(ConfigError {
                            option: "--redis-client-cert / --redis-client-key (FLAGHOST_REDIS_CLIENT_CERT / FLAGHOST_REDIS_CLIENT_KEY)",
                            reason: "give both, the certificate and its key, or neither".into(),
                        });
                    }
                };
                let tls = RedisTls {
                    ca_file: nonempty(self.redis_ca_file),
                    client_cert,
                };
                if tls.is_set() && !RedisOptions::is_tls(url) {
                    return Err(ConfigError {
                        option: "--redis-ca-file / --redis-client-cert (FLAGHOST_REDIS_CA_FILE / FLAGHOST_REDIS_CLIENT_CERT)",
                        reason: "certificates are for TLS: the Redis URL must start rediss://"
                            .into(),
                    });
                }
                Some(RedisOptions {
                    tls,
                    url: url.to_owned(),
                    ttl: cache_ttl,
                    response_timeout: Duration::from_millis(self.redis_response_timeout_ms),
                    signing_key,
                    max_entry_bytes,
                    documents,
                })
            }
        };
        if self.header_timeout_ms == 0 || self.body_timeout_ms == 0 {
            return Err(ConfigError {
                option: "--header-timeout-ms / --body-timeout-ms",
                reason: "must be at least 1".into(),
            });
        }
        if self.check_interval_ms == 0 {
            return Err(ConfigError {
                option: "--check-interval-ms (FLAGHOST_CHECK_INTERVAL_MS)",
                reason: "must be at least 1".into(),
            });
        }
        let token = |secret: Option<Secret>, option: &'static str| {
            // NB: trimmed, as a presented token is: `T ` in .env and `T`
            // sent are one token (and two that differ only so are one).
            let token = secret
                .map(|t| t.0.trim().to_owned())
                .filter(|t| !t.is_empty());
            if token.as_ref().is_some_and(|t| t.len() < 16) {
                return Err(ConfigError {
                    option,
                    reason: "must be at least 16 characters".into(),
                });
            }
            Ok(token)
        };
        let admin_token = token(self.admin_token, "--admin-token (FLAGHOST_ADMIN_TOKEN)")?;
        let metrics_token = token(
            self.metrics_token,
            "--metrics-token (FLAGHOST_METRICS_TOKEN)",
        )?;
        if metrics_token.is_some() && metrics_token == admin_token {
            return Err(ConfigError {
                option: "--metrics-token (FLAGHOST_METRICS_TOKEN)",
                reason: "is the admin token: a scraper's token must not open the admin API".into(),
            });
        }
        Ok(ServeConfig {
            ignored,
            cache_ttl,
            redis,
            check_interval: Duration::from_millis(self.check_interval_ms),
            watch_interval: (self.watch_interval_ms > 0)
                .then(|| Duration::from_millis(self.watch_interval_ms)),
            admin_token,
            metrics_token,
            api_keys_file: self.api_keys_file.filter(|f| !f.as_os_str().is_empty()),
            api_key_rate_limit: self
                .api_key_rate_limit
                .filter(|n| *n > 0)
                .map(|per_second| crate::access::RateLimit { per_second }),
            listen: self.listen,
            traces: match self.otlp_endpoint.as_deref().map(str::trim) {
                None | Some("") => None,
                Some(endpoint) => {
                    let url = url::Url::parse(endpoint).map_err(|e| ConfigError {
                        option: "--otlp-endpoint (OTEL_EXPORTER_OTLP_ENDPOINT)",
                        reason: format!(
                            "{endpoint:?} is not a URL like http://collector:4318 ({e})"
                        ),
                    })?;
                    if !url.username().is_empty() || url.password().is_some() {
                        return Err(ConfigError {
                            option: "--otlp-endpoint (OTEL_EXPORTER_OTLP_ENDPOINT)",
                            reason: "holds credentials, which would be logged: give a collector beside flaghost without them".into(),
                        });
                    }
                    if url.scheme() != "http" {
                        return Err(ConfigError {
                            option: "--otlp-endpoint (OTEL_EXPORTER_OTLP_ENDPOINT)",
                            reason: format!(
                                "{endpoint:?}: only http:// is built in (OTLP/HTTP to a collector beside flaghost)"
                            ),
                        });
                    }
                    if !(0.0..=1.0).contains(&self.trace_sample_ratio) {
                        return Err(ConfigError {
                            option: "--trace-sample-ratio (FLAGHOST_TRACE_SAMPLE_RATIO)",
                            reason: "must be between 0 and 1".into(),
                        });
                    }
                    Some(crate::telemetry::TraceOptions {
                        endpoint: endpoint.to_owned(),
                        sample_ratio: self.trace_sample_ratio,
                    })
                }
            },
            metrics_listen: match self.metrics_listen.as_deref().map(str::trim) {
                None | Some("") => None,
                Some(address) => Some(address.parse().map_err(|e| ConfigError {
                    option: "--metrics-listen (FLAGHOST_METRICS_LISTEN)",
                    reason: format!("{address:?} is not an address like 127.0.0.1:9090 ({e})"),
                })?),
            },
            limits: self.source.limits.to_limits(Some(&self.pool))?,
            documents,
            flags: self.source.flags,
            plugins: self.source.plugins,
            plugin_cache_dir: self.source.plugin_cache_dir,
            plugin_cache_key: self.source.plugin_cache_key,
            default_environment: self.default_environment,
            http: HttpOptions {
                body_limit: self.body_limit,
                body_timeout: Duration::from_millis(self.body_timeout_ms),
                cors: parse_cors(&self.cors_allowed_origins)?,
                connections: {
                    let max_connections = self
                        .max_connections
                        .unwrap_or_else(crate::http::connections::default_max_connections)
                        .max(1);
                    crate::http::ConnectionLimits {
                        header_timeout: Duration::from_millis(self.header_timeout_ms),
                        max_connections,
                        max_per_client: self
                            .max_connections_per_client
                            .unwrap_or_else(|| {
                                crate::http::connections::default_max_per_client(max_connections)
                            })
                            .clamp(1, max_connections),
                    }
                },
            },
            compiler: Compiler::this_binary().map_err(|e| ConfigError {
                option: "(the flaghost binary, which compiles plugins in child processes)",
                reason: format!("cannot find it: {e}"),
            })?,
        })
    }
}

/// The CORS setting from `--cors-allowed-origins`.
fn parse_cors(origins: &[String]) -> Result<Cors, ConfigError> {
    let origins: Vec<&str> = origins
        .iter()
        .map(|o| o.trim())
        .filter(|o| !o.is_empty())
        .collect();
    if origins.is_empty() {
        return Ok(Cors::Off);
    }
    if origins == ["*"] {
        return Ok(Cors::Any);
    }
    let bad = |reason: String| ConfigError {
        option: "--cors-allowed-origins (FLAGHOST_CORS_ALLOWED_ORIGINS)",
        reason,
    };
    origins
        .into_iter()
        .map(|origin| {
            if origin == "*" {
                return Err(bad("`*` cannot be combined with other origins".into()));
            }
            let scheme_ok = origin.starts_with("http://") || origin.starts_with("https://");
            if !scheme_ok || origin.ends_with('/') {
                return Err(bad(format!(
                    "{origin:?} is not an origin: write scheme://host[:port], no path"
                )));
            }
            axum::http::HeaderValue::from_str(origin)
                .map_err(|_| bad(format!("{origin:?} is not a valid header value")))
        })
        .collect::<Result<_, _>>()
        .map(Cors::Origins)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("flaghost").chain(args.iter().copied()))
            .expect("arguments parse")
    }

    /// `args` parsed as `serve` (its first).
    fn serve_args(args: &[&str]) -> ServeArgs {
        let Command::Serve(serve) = parse(args).command else {
            panic!("expected serve");
        };
        serve
    }

    /// Why `serve` with `args` is refused.
    fn refused(args: &[&str]) -> ConfigError {
        serve_args(args).validate().expect_err("refused")
    }

    #[test]
    fn serve_arguments_validate_into_a_config() {
        let args = serve_args(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--flags",
            "f",
            "--plugins",
            "p",
            "--default-environment",
            "staging",
            "--plugin-deadline-ms",
            "25",
            "--plugin-isolation",
            "reuse",
            "--plugin-isolation-for",
            "strict=fresh",
            "--plugin-isolation-for",
            "py-rule=REUSE,other=fresh",
        ]);
        let config = args.validate().expect("valid");
        assert_eq!(config.default_environment, "staging");
        assert_eq!(config.limits.deadline, Duration::from_millis(25));
        assert_eq!(config.limits.isolation, Isolation::Reuse);
        assert_eq!(config.limits.isolation_of("strict"), Isolation::Fresh);
        assert_eq!(config.limits.isolation_of("other"), Isolation::Fresh);
        assert_eq!(config.limits.isolation_of("py-rule"), Isolation::Reuse);
        assert_eq!(config.limits.isolation_of("unnamed"), Isolation::Reuse);
        assert_eq!(config.plugins, Some(PathBuf::from("p")));
    }

    #[test]
    fn a_configuration_printed_for_debugging_shows_no_secret() {
        let args = serve_args(&[
            "serve",
            "--redis-url",
            "redis://flaghost:s3cret-password@cache.internal:6380/2",
            "--admin-token",
            "an-admin-token-nobody-may-read",
            "--metrics-token",
            "a-metrics-token-nobody-may-read",
        ]);
        let printed = format!("{:?}", args.validate().expect("valid"));
        assert!(!printed.contains("s3cret-password"), "{printed}");
        assert!(
            !printed.contains("an-admin-token-nobody-may-read"),
            "{printed}"
        );
        assert!(
            !printed.contains("a-metrics-token-nobody-may-read"),
            "{printed}"
        );
        assert!(
            printed.contains("cache.internal:6380"),
            "the rest is there: {printed}"
        );
        assert!(
            printed.contains("admin_token: Some(\"<redacted>\")"),
            "{printed}"
        );
    }

    #[test]
    fn isolation_is_fresh_unless_chosen_and_a_bad_choice_says_why() {
        let args = serve_args(&["serve", "--flags", "f"]);
        let config = args.validate().expect("valid");
        assert_eq!(config.limits.isolation_of("any"), Isolation::Fresh);
        for (bad, says) in [
            ("py-rule", "NAME=MODE"),
            ("py-rule=sometimes", "fresh or reuse"),
            ("../x=reuse", "not a plugin name"),
        ] {
            let Err(err) =
                Cli::try_parse_from(["flaghost", "serve", "--plugin-isolation-for", bad])
            else {
                panic!("{bad}: accepted");
            };
            let err = err.to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn a_short_cache_signing_key_is_refused() {
        let err = refused(&[
            "serve",
            "--redis-url",
            "redis://127.0.0.1:6379",
            "--cache-signing-key",
            "short",
        ]);
        assert!(err.option.contains("--cache-signing-key"), "{err}");
    }

    #[test]
    fn cors_origins_parse_or_say_what_is_wrong() {
        let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(parse_cors(&[]).expect("off"), Cors::Off);
        assert_eq!(parse_cors(&list(&["*"])).expect("any"), Cors::Any);
        let Cors::Origins(o) =
            parse_cors(&list(&["https://a.example", "http://b:8080"])).expect("list")
        else {
            panic!("a list");
        };
        assert_eq!(o.len(), 2);
        assert!(parse_cors(&list(&["a.example"])).is_err());
        assert!(parse_cors(&list(&["https://a.example/"])).is_err());
        assert!(parse_cors(&list(&["*", "https://a.example"])).is_err());
    }

    #[test]
    fn bad_values_name_their_option() {
        let err = refused(&["serve", "--default-environment", "../etc"]);
        assert!(err.option.contains("FLAGHOST_DEFAULT_ENVIRONMENT"), "{err}");
    }

    #[test]
    fn an_instance_pool_past_the_address_space_is_refused_naming_its_options() {
        let refused = |args: &[&str]| serve_args(args).validate().err();
        let err = refused(&[
            "serve",
            "--plugin-threads",
            "16",
            "--plugin-max-plugins",
            "1024",
        ])
        .expect("refused");
        assert!(err.option.contains("--plugin-max-plugins"), "{err}");
        assert!(err.reason.contains("memory slots"), "{err}");
        assert!(refused(&["serve", "--plugin-threads", "16"]).is_none());
    }

    #[test]
    fn validate_and_eval_size_their_pool_for_one_plugin_thread_whatever_the_machine() {
        // NB: 600 plugins fit one thread's pool (2 × 600 × 3 × 4 slots) but
        // no serving pool of 2 threads or more: the bound is each pool's own.
        let Command::Validate(validate) =
            parse(&["validate", "--plugin-max-plugins", "600"]).command
        else {
            panic!("expected validate");
        };
        let limits = validate.source.limits.to_limits(None).expect("fits");
        assert_eq!((limits.pool_threads, limits.max_concurrency), (1, 1));
        let serve = serve_args(&[
            "serve",
            "--plugin-threads",
            "2",
            "--plugin-max-plugins",
            "600",
        ]);
        assert!(serve.validate().is_err(), "a serving pool of 2 threads");
    }

    #[test]
    fn eval_takes_the_isolation_serve_does() {
        let Command::Eval(eval) = parse(&[
            "eval",
            "--all",
            "--plugin-isolation",
            "reuse",
            "--plugin-isolation-for",
            "strict=fresh",
        ])
        .command
        else {
            panic!("expected eval");
        };
        let mut limits = eval.source.limits.to_limits(None).expect("valid");
        eval.isolation.apply(&mut limits);
        assert_eq!(limits.isolation_of("any"), Isolation::Reuse);
        assert_eq!(limits.isolation_of("strict"), Isolation::Fresh);
    }

    #[test]
    fn parsed_arguments_printed_for_debugging_show_no_secret() {
        let cli = parse(&[
            "serve",
            "--redis-url",
            "redis://:hunter2@cache:6379",
            "--admin-token",
            "admin-token-sekrit-0123",
            "--cache-signing-key",
            "signing-key-sekrit-0123",
        ]);
        let printed = format!("{cli:?}");
        for secret in ["hunter2", "admin-token-sekrit", "signing-key-sekrit"] {
            assert!(!printed.contains(secret), "{printed}");
        }
    }

    #[test]
    fn validate_and_eval_take_no_serving_only_options() {
        // NB: eval takes the isolation options too (see
        // `eval_takes_the_isolation_serve_does`); validate checks plugins on
        // fresh instances whatever they say.
        let cli = Cli::command();
        let longs = |name: &str| -> Vec<String> {
            cli.find_subcommand(name)
                .expect("subcommand")
                .get_arguments()
                .filter_map(|a| a.get_long().map(str::to_owned))
                .collect()
        };
        let serving_only = [
            "plugin-threads",
            "plugin-nice",
            "plugin-max-concurrency",
            "plugin-queue",
            "plugin-request-budget-ms",
            "plugin-strike-fraction",
            "plugin-quarantine-after",
            "plugin-quarantine-ms",
        ];
        let isolation = ["plugin-isolation", "plugin-isolation-for"];
        for command in ["validate", "eval"] {
            let taken = longs(command);
            for option in serving_only {
                assert!(!taken.iter().any(|t| t == option), "{command} --{option}");
            }
            assert!(taken.iter().any(|t| t == "plugin-memory-mib"), "{command}");
            for option in isolation {
                let has = taken.iter().any(|t| t == option);
                assert_eq!(has, command == "eval", "{command} --{option}");
            }
        }
        let serve = longs("serve");
        for option in serving_only.into_iter().chain(isolation) {
            assert!(serve.iter().any(|t| t == option), "serve --{option}");
        }
    }

    #[test]
    fn a_metrics_token_must_be_long_and_not_the_admin_token() {
        let err = refused(&["serve", "--metrics-token", "short"]);
        assert!(err.option.contains("--metrics-token"), "{err}");
        let same = "the-same-token-0123456789";
        let err = refused(&["serve", "--admin-token", same, "--metrics-token", same]);
        assert!(err.reason.contains("admin token"), "{err}");
        let spaced = format!("{same} ");
        let err = refused(&["serve", "--admin-token", same, "--metrics-token", &spaced]);
        assert!(err.reason.contains("admin token"), "{err}");
    }

    #[test]
    fn settings_that_need_redis_or_keys_are_named_as_ignored_without_them() {
        let ignored = |args: &[&str]| -> Vec<&'static str> {
            let config = serve_args(args)
                .validate()
                .expect("a rollback still starts");
            config.ignored.iter().map(|i| i.option).collect()
        };
        let redis_settings = [
            "serve",
            "--redis-ca-file",
            "ca.pem",
            "--redis-client-cert",
            "c.pem",
            "--redis-client-key",
            "c.key",
            "--cache-signing-key",
            "signing-key-0123456789",
            "--cache-max-entry-mib",
            "8",
            "--api-key-rate-limit",
            "5",
        ];
        let named = ignored(&redis_settings);
        for option in [
            "--redis-ca-file",
            "--redis-client-cert",
            "--redis-client-key",
            "--cache-signing-key",
            "--cache-max-entry-mib",
            "--api-key-rate-limit",
        ] {
            assert!(
                named.iter().any(|n| n.starts_with(option)),
                "{option}: {named:?}"
            );
        }
        let with_both: Vec<&str> = redis_settings
            .into_iter()
            .chain([
                "--redis-url",
                "rediss://cache:6379",
                "--api-keys-file",
                "keys.json",
            ])
            .collect();
        assert_eq!(ignored(&with_both), Vec::<&str>::new());
    }

    #[test]
    fn redis_tls_options_that_cannot_work_are_refused_naming_them() {
        let err = refused(&[
            "serve",
            "--redis-url",
            "rediss://u:hunter2@cache:6379#insecure",
        ]);
        assert!(err.reason.contains("--redis-ca-file"), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let err = refused(&[
            "serve",
            "--redis-url",
            "redis://cache:6379",
            "--redis-ca-file",
            "ca.pem",
        ]);
        assert!(err.reason.contains("rediss://"), "{err}");
        let err = refused(&[
            "serve",
            "--redis-url",
            "rediss://cache:6379",
            "--redis-client-cert",
            "c.pem",
        ]);
        assert!(err.option.contains("--redis-client-key"), "{err}");
        let serve = serve_args(&[
            "serve",
            "--redis-url",
            "rediss://flaghost:pw@cache:6379",
            "--redis-ca-file",
            "ca.pem",
            "--redis-client-cert",
            "c.pem",
            "--redis-client-key",
            "c.key",
        ]);
        let tls = serve.validate().expect("valid").redis.expect("redis").tls;
        assert_eq!(tls.ca_file, Some(PathBuf::from("ca.pem")));
        assert_eq!(
            tls.client_cert,
            Some((PathBuf::from("c.pem"), PathBuf::from("c.key")))
        );
    }

    #[test]
    fn a_malformed_redis_url_names_the_variable_and_hides_the_password() {
        let err = refused(&["serve", "--redis-url", "http://user:hunter2@cache:6379"]);
        assert!(err.option.contains("REDIS_URL"), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn redis_is_off_unless_configured() {
        let args = serve_args(&["serve"]);
        let config = args.validate().expect("valid");
        assert!(config.redis.is_none());
        assert_eq!(config.cache_ttl, Duration::from_secs(300));
        assert!(config.admin_token.is_none());
        let args = serve_args(&[
            "serve",
            "--redis-url",
            "redis://:pw@127.0.0.1:6390/2",
            "--cache-ttl",
            "60",
        ]);
        let redis = args.validate().expect("valid").redis.expect("on");
        assert_eq!(redis.ttl, Duration::from_secs(60));
    }
}
