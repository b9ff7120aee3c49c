//! Prometheus metrics (`GET /metrics`, text format 0.0.4), through the
//! Prometheus project's own client (`prometheus-client`).
//!
//! Most of what is exposed is read at scrape time from where it is kept
//! anyway: plugin counters and latency buckets from the plugins' own stats
//! (the admin listing's numbers), the cache's and Redis link's state from
//! the read path, reload outcomes from the flag store, the plugin registry
//! and the key file. Two things are counted here:
//!
//! - evaluations, by environment, flag, variant and reason (and errors by
//!   code): counters found once per flag set (its first evaluation), so
//!   counting one is an index and an atomic add, never a lookup by labels.
//!   Labels come from flag files, never from callers: a flag key a caller
//!   makes up is counted under the environment alone.
//! - HTTP requests, by route (the matched pattern, not the path), method and
//!   status, with a latency histogram.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric as _, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::access::ApiKeys;
use crate::environments::Environments;
use crate::evaluation::{ErrorCode, Reason};
use crate::flags::{Flag, FlagSet};
use crate::plugins::PluginRegistry;

/// The `Content-Type` of what [`Metrics::encode`] writes.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Reasons, in [`Reason`]'s order (counters are indexed by `reason as usize`).
const REASONS: [Reason; 6] = [
    Reason::Static,
    Reason::TargetingMatch,
    Reason::Default,
    Reason::Disabled,
    Reason::Error,
    Reason::Stale,
];

// NB: counters are indexed by `reason as usize`: the list must follow the
// enum's order.
const _: () = {
    assert!(Reason::Static as usize == 0 && Reason::TargetingMatch as usize == 1);
    assert!(Reason::Default as usize == 2 && Reason::Disabled as usize == 3);
    assert!(Reason::Error as usize == 4 && Reason::Stale as usize == 5);
    assert!(ErrorCode::FlagNotFound as usize == 0 && ErrorCode::ParseError as usize == 1);
    assert!(ErrorCode::TypeMismatch as usize == 2 && ErrorCode::General as usize == 3);
};

/// Error codes, in [`ErrorCode`]'s order.
const ERROR_CODES: [ErrorCode; 4] = [
    ErrorCode::FlagNotFound,
    ErrorCode::ParseError,
    ErrorCode::TypeMismatch,
    ErrorCode::General,
];

/// Outcomes of reloading something watched (flag files, plugins, the API
/// key file): versions put in force, and versions refused.
#[derive(Debug, Default)]
pub struct Reloads {
    accepted: AtomicU64,
    refused: AtomicU64,
}

impl Reloads {
    /// A new version is in force.
    pub fn accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    /// A new version was refused; the last good one stays.
    pub fn refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.accepted.load(Ordering::Relaxed),
            self.refused.load(Ordering::Relaxed),
        )
    }
}

/// What the metrics are read from.
pub struct Sources {
    /// The read path: cache state, flag sets, flag-file reloads.
    pub environments: Arc<Environments>,
    /// The plugins in force, with their stats and reloads.
    pub plugins: PluginRegistry,
    /// The API key file, if any.
    pub api_keys: Option<Arc<ApiKeys>>,
}

/// Every metric flaghost exposes.
pub struct Metrics {
    registry: Registry,
    http: Arc<HttpRequests>,
    evaluations: Arc<Evaluations>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// The routes, as matched (so a path's flag key or environment never
/// becomes a label); then `other` and `unmatched`.
const ROUTES: [&str; 12] = [
    "/ofrep/v1/evaluate/flags",
    "/ofrep/v1/evaluate/flags/{key}",
    "/environments/{environment}/ofrep/v1/evaluate/flags",
    "/environments/{environment}/ofrep/v1/evaluate/flags/{key}",
    "/healthz",
    "/readyz",
    "/metrics",
    "/admin/v1/cache/invalidate",
    "/admin/v1/plugins",
    "/admin/v1/plugins/{name}",
    "other",
    "unmatched",
];

const METHODS: [&str; 7] = ["GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD", "other"];

/// Upper bounds of the request histogram's buckets: 50 µs to about 1.6 s,
/// doubling (a flag answer takes tens of microseconds, a bulk answer with
/// plugins milliseconds).
const HTTP_BUCKETS: usize = 16;

fn http_bucket_bound(i: usize) -> Duration {
    Duration::from_micros(50 << i)
}

/// HTTP requests by route, method and status: a histogram each, kept
/// without a lock on the request path.
///
/// NB: not `prometheus-client`'s `Family<_, Histogram>`: its lookup takes a
/// read lock and each histogram a mutex, every request on every core
/// writing the same lines. Routes and methods are a fixed table; the
/// statuses each has seen are a short list swapped whole when one is new.
struct HttpRequests {
    cells: Vec<arc_swap::ArcSwap<Statuses>>,
    adding: Mutex<()>,
}

/// The statuses a route and method answered, each with its histogram.
type Statuses = Vec<(u16, Arc<HttpCell>)>;

/// One histogram: its buckets' counts (not cumulative; the last past every
/// bound), then their sum in nanoseconds (the count is the buckets' sum).
type HttpCell = Sharded<{ HTTP_BUCKETS + 2 }>;

impl HttpRequests {
    fn new() -> Self {
        Self {
            cells: (0..ROUTES.len() * METHODS.len())
                .map(|_| arc_swap::ArcSwap::from_pointee(Vec::new()))
                .collect(),
            adding: Mutex::new(()),
        }
    }

    fn observe(&self, route: usize, method: usize, status: u16, took: Duration) {
        let Some(cell) = self.cells.get(route * METHODS.len() + method) else {
            return;
        };
        let histogram = match cell.load().iter().find(|(s, _)| *s == status) {
            Some((_, histogram)) => histogram.clone(),
            None => {
                let _adding = self.adding.lock().unwrap_or_else(PoisonError::into_inner);
                let statuses = cell.load_full();
                if let Some((_, histogram)) = statuses.iter().find(|(s, _)| *s == status) {
                    histogram.clone()
                } else {
                    let histogram = Arc::new(HttpCell::default());
                    let mut more = Vec::clone(&statuses);
                    more.push((status, histogram.clone()));
                    cell.store(Arc::new(more));
                    histogram
                }
            }
        };
        let bucket = (0..HTTP_BUCKETS)
            .find(|&i| took <= http_bucket_bound(i))
            .unwrap_or(HTTP_BUCKETS);
        histogram.add(bucket);
        histogram.add_by(
            HTTP_BUCKETS + 1,
            u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
        );
    }
}

impl Metrics {
    /// Metrics read from `sources`.
    pub fn new(sources: Sources) -> Self {
        let evaluations = Arc::new(Evaluations::default());
        let http = Arc::new(HttpRequests::new());
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Collected {
            sources,
            evaluations: evaluations.clone(),
            http: http.clone(),
        }));
        Self {
            registry,
            http,
            evaluations,
        }
    }

    /// Metrics of `environments` alone (no plugins registry, no key file):
    /// for a router built without `server::build`, as benches and tests do.
    pub fn of_environments(environments: Arc<Environments>) -> Self {
        Self::new(Sources {
            environments,
            plugins: PluginRegistry::default(),
            api_keys: None,
        })
    }

    /// Everything, in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 << 10);
        // NB: writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }

    /// The evaluation counters.
    pub fn evaluations(&self) -> &Evaluations {
        &self.evaluations
    }

    /// Counts an HTTP request to `route` (the matched pattern, if any).
    pub fn request(
        &self,
        route: Option<&str>,
        method: &axum::http::Method,
        status: u16,
        took: Duration,
    ) {
        let route = match route {
            Some(r) => ROUTES[..ROUTES.len() - 2]
                .iter()
                .position(|known| *known == r)
                .unwrap_or(ROUTES.len() - 2),
            None => ROUTES.len() - 1,
        };
        let method = match *method {
            axum::http::Method::GET => 0,
            axum::http::Method::POST => 1,
            axum::http::Method::PUT => 2,
            axum::http::Method::DELETE => 3,
            axum::http::Method::OPTIONS => 4,
            axum::http::Method::HEAD => 5,
            _ => 6,
        };
        self.http.observe(route, method, status, took);
    }
}

/// Evaluation counters, by environment and flag, kept across reloads of a
/// flag set (a reload that keeps a flag keeps its counts).
#[derive(Debug)]
pub struct Evaluations {
    /// Tells this registry's counters from another's (an address could be
    /// reused by the next one).
    id: u64,
    flags: Mutex<HashMap<(String, String), Arc<FlagCounts>>>,
    /// Flags callers asked for that the environment does not have.
    not_found: Mutex<HashMap<String, Arc<AtomicU64>>>,
}

impl Default for Evaluations {
    fn default() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            flags: Mutex::default(),
            not_found: Mutex::default(),
        }
    }
}

/// One flag's counters.
#[derive(Debug, Default)]
struct FlagCounts {
    /// By variant name.
    variants: Mutex<HashMap<String, Arc<ReasonCounts>>>,
    /// Answers without a variant (disabled, no default variant, errors).
    unserved: ReasonCounts,
    /// Failures by code.
    errors: Sharded<{ ERROR_CODES.len() }>,
}

/// Counts by reason.
type ReasonCounts = Sharded<{ REASONS.len() }>;

/// `N` counters that every worker thread adds to: each of the first
/// threads to count has a shard (a cache line) of its own that only it
/// writes, with a plain load and store; threads past them share the last
/// shard, with atomic adds. Read by summing the shards.
///
/// NB: a bulk answer counts every flag. With one shared counter per flag,
/// each a locked add, a 900-flag answer cost 25% more CPU (a quick `wrk`
/// side by side; perf put 68% of the answer loop on the `lock` add).
#[derive(Debug)]
struct Sharded<const N: usize> {
    shards: Box<[Shard<N>]>,
}

#[derive(Debug)]
#[repr(align(64))]
struct Shard<const N: usize>([AtomicU64; N]);

/// Shards per counter: one for each of the first counting threads (the
/// HTTP workers: one per core, at most 16), and one they share past that.
fn shards() -> usize {
    static SHARDS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SHARDS.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(2, std::num::NonZero::get)
            .clamp(1, 16)
            + 1
    })
}

thread_local! {
    /// This thread's shard if it owns one (never reused: a thread that
    /// ends leaves its index unused).
    static SHARD: Option<usize> = {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let index = NEXT.fetch_add(1, Ordering::Relaxed) as usize;
        (index + 1 < shards()).then_some(index)
    };
}

impl<const N: usize> Default for Sharded<N> {
    fn default() -> Self {
        Self {
            shards: (0..shards())
                .map(|_| Shard(std::array::from_fn(|_| AtomicU64::new(0))))
                .collect(),
        }
    }
}

impl<const N: usize> Sharded<N> {
    fn add(&self, i: usize) {
        self.add_by(i, 1);
    }

    fn add_by(&self, i: usize, n: u64) {
        match SHARD.with(|s| *s).and_then(|own| self.shards.get(own)) {
            // NB: this thread is the one writer of its shard: no locked add.
            Some(own) => {
                if let Some(counter) = own.0.get(i) {
                    counter.store(
                        counter.load(Ordering::Relaxed).wrapping_add(n),
                        Ordering::Relaxed,
                    );
                }
            }
            None => {
                if let Some(counter) = self.shards.last().and_then(|s| s.0.get(i)) {
                    counter.fetch_add(n, Ordering::Relaxed);
                }
            }
        }
    }

    /// Each counter, summed over the shards.
    fn totals(&self) -> [u64; N] {
        let mut totals = [0; N];
        for shard in &self.shards {
            for (total, counter) in totals.iter_mut().zip(&shard.0) {
                *total += counter.load(Ordering::Relaxed);
            }
        }
        totals
    }
}

/// One flag set's counters, found once: by flag position, then variant
/// ordinal.
#[derive(Debug)]
pub struct SetCounters {
    /// The [`Evaluations`] they belong to.
    owner: u64,
    flags: Vec<ResolvedFlag>,
    not_found: Arc<AtomicU64>,
}

#[derive(Debug)]
struct ResolvedFlag {
    counts: Arc<FlagCounts>,
    variants: Vec<Option<Arc<ReasonCounts>>>,
}

impl Evaluations {
    fn owner(&self) -> u64 {
        self.id
    }

    /// `set`'s counters, to count many with one lookup: found at its first
    /// evaluation, then kept with it.
    pub fn counter<'a>(&self, set: &'a FlagSet) -> Counter<'a> {
        let found = set.counters.get_or_init(|| Arc::new(self.resolve(set)));
        if found.owner == self.owner() {
            // NB: borrowed, not an `Arc` clone: every request on every core
            // would write the same reference count.
            return Counter::Kept(found);
        }
        // NB: a set is served by one flaghost; should two share one, the
        // second's counts are still right, found each time.
        Counter::Found(Box::new(self.resolve(set)))
    }

    fn resolve(&self, set: &FlagSet) -> SetCounters {
        let mut flags = self.flags.lock().unwrap_or_else(PoisonError::into_inner);
        let resolved = set
            .flags
            .values()
            .map(|flag| {
                let counts = flags
                    .entry((set.environment.clone(), flag.key.clone()))
                    .or_default()
                    .clone();
                let mut variants = vec![None; flag.variants.len() + 1];
                {
                    let mut by_name = counts
                        .variants
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    for (name, variant) in &flag.variants {
                        if variants.len() <= variant.ordinal {
                            variants.resize(variant.ordinal + 1, None);
                        }
                        variants[variant.ordinal] =
                            Some(by_name.entry(name.clone()).or_default().clone());
                    }
                }
                ResolvedFlag { counts, variants }
            })
            .collect();
        let not_found = self
            .not_found
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(set.environment.clone())
            .or_default()
            .clone();
        SetCounters {
            owner: self.owner(),
            flags: resolved,
            not_found,
        }
    }

    /// Drops the counters of flags no set in `sets` has.
    fn keep_only(&self, sets: &[Arc<FlagSet>]) {
        let live: HashSet<(&str, &str)> = sets
            .iter()
            .flat_map(|s| s.flags.keys().map(|k| (s.environment.as_str(), k.as_str())))
            .collect();
        // NB: counters a set holds stay, though the set was not among
        // `sets` (one loaded between the listing and this): its counts
        // would otherwise go unreported for as long as it serves.
        self.flags
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(environment, flag), counts| {
                Arc::strong_count(counts) > 1
                    || live.contains(&(environment.as_str(), flag.as_str()))
            });
        let environments: HashSet<&str> = sets.iter().map(|s| s.environment.as_str()).collect();
        self.not_found
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|environment, count| {
                Arc::strong_count(count) > 1 || environments.contains(environment.as_str())
            });
    }
}

/// Counts the evaluations of one flag set.
pub enum Counter<'a> {
    /// The set's own counters.
    Kept(&'a SetCounters),
    /// Counters found for this use only.
    Found(Box<SetCounters>),
}

impl Counter<'_> {
    fn counters(&self) -> &SetCounters {
        match self {
            Counter::Kept(kept) => kept,
            Counter::Found(found) => found,
        }
    }

    /// `flag` answered `variant` (if any) for `reason` (as sent).
    pub fn served(&self, flag: &Flag, variant: Option<usize>, reason: Reason) {
        let Some(resolved) = self.counters().flags.get(flag.position) else {
            return;
        };
        let counts = match variant.and_then(|v| resolved.variants.get(v)) {
            Some(Some(counts)) => counts,
            _ => &resolved.counts.unserved,
        };
        counts.add(reason as usize);
    }

    /// `flag` failed with `code`.
    pub fn failed(&self, flag: &Flag, code: ErrorCode) {
        let Some(resolved) = self.counters().flags.get(flag.position) else {
            return;
        };
        resolved.counts.unserved.add(Reason::Error as usize);
        resolved.counts.errors.add(code as usize);
    }

    /// A caller asked for a flag the set does not have.
    pub fn not_found(&self) {
        self.counters().not_found.fetch_add(1, Ordering::Relaxed);
    }
}

/// What is read at scrape time.
struct Collected {
    sources: Sources,
    evaluations: Arc<Evaluations>,
    http: Arc<HttpRequests>,
}

impl std::fmt::Debug for Collected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Collected")
    }
}

/// Writes one counter (or gauge) family: a descriptor, then a sample per
/// label set.
fn family<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
    for (labels, value) in samples {
        let sample: MetricEncoder = family.encode_family(&labels)?;
        match metric_type {
            MetricType::Counter => ConstCounter::new(value).encode(sample)?,
            _ => ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(sample)?,
        }
    }
    Ok(())
}

impl Collector for Collected {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let environments = &self.sources.environments;
        let sets = environments.loaded_sets();
        // NB: counters of a set loaded but not evaluated yet are found now,
        // so a reload between scrapes does not drop a flag's counts.
        for set in &sets {
            self.evaluations.counter(set);
        }
        self.evaluations.keep_only(&sets);

        let mut evaluations = Vec::new();
        let mut errors = Vec::new();
        {
            let flags = self
                .evaluations
                .flags
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let mut keys: Vec<&(String, String)> = flags.keys().collect();
            keys.sort();
            for key in keys {
                let counts = &flags[key];
                let (environment, flag) = key;
                let variants = counts
                    .variants
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let mut names: Vec<&String> = variants.keys().collect();
                names.sort();
                let by_variant = names
                    .into_iter()
                    .map(|n| (n.as_str(), &*variants[n]))
                    .chain(std::iter::once(("", &counts.unserved)));
                for (variant, reasons) in by_variant {
                    for (reason, count) in REASONS.iter().zip(reasons.totals()) {
                        if count > 0 {
                            evaluations.push((
                                [
                                    ("environment", environment.clone()),
                                    ("flag", flag.clone()),
                                    ("variant", variant.to_owned()),
                                    ("reason", reason.as_str().to_owned()),
                                ],
                                count,
                            ));
                        }
                    }
                }
                for (code, count) in ERROR_CODES.iter().zip(counts.errors.totals()) {
                    if count > 0 {
                        errors.push((
                            [
                                ("environment", environment.clone()),
                                ("flag", flag.clone()),
                                ("code", code.as_str().to_owned()),
                            ],
                            count,
                        ));
                    }
                }
            }
            let not_found = self
                .evaluations
                .not_found
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let mut environments: Vec<&String> = not_found.keys().collect();
            environments.sort();
            for environment in environments {
                let count = not_found[environment].load(Ordering::Relaxed);
                if count > 0 {
                    errors.push((
                        [
                            ("environment", environment.clone()),
                            ("flag", String::new()),
                            ("code", ErrorCode::FlagNotFound.as_str().to_owned()),
                        ],
                        count,
                    ));
                }
            }
        }
        family(
            &mut encoder,
            "flaghost_evaluations",
            "Flag evaluations answered, by environment, flag, variant (empty: none served) and reason (as sent: STALE for a value served past its TTL)",
            MetricType::Counter,
            evaluations,
        )?;
        family(
            &mut encoder,
            "flaghost_evaluation_errors",
            "Failed flag evaluations by environment, flag and error code (flag empty: a flag the environment does not have)",
            MetricType::Counter,
            errors,
        )?;
        family(
            &mut encoder,
            "flaghost_flags",
            "Flags loaded, by environment",
            MetricType::Gauge,
            sets.iter().map(|s| {
                (
                    [("environment", s.environment.clone())],
                    s.flags.len() as u64,
                )
            }),
        )?;

        // The cache.
        let cache = environments.cache_status();
        family(
            &mut encoder,
            "flaghost_cache_backend",
            "The cache serving flag sets: 1 for the one in use (redis, memory-fallback: Redis configured but unreachable, memory-only: no Redis configured)",
            MetricType::Gauge,
            ["redis", "memory-fallback", "memory-only"]
                .into_iter()
                .map(|b| ([("backend", b)], u64::from(cache.backend == b))),
        )?;
        if let Some(link) = &cache.redis {
            family(
                &mut encoder,
                "flaghost_redis_link",
                "The Redis connection's state: 1 for the current one",
                MetricType::Gauge,
                ["connected", "connecting", "disconnected"]
                    .into_iter()
                    .map(|s| ([("state", s)], u64::from(link.state == s))),
            )?;
            family(
                &mut encoder,
                "flaghost_redis_breaker_transitions",
                "Times the Redis breaker opened (Redis unreachable: serving from memory) and closed again",
                MetricType::Counter,
                [
                    ([("to", "open")], link.breaker_opened),
                    ([("to", "closed")], link.breaker_closed),
                ],
            )?;
            family(
                &mut encoder,
                "flaghost_redis_late_answers",
                "Redis requests that got no answer in time while Redis still answered PING",
                MetricType::Counter,
                [(NoLabels, link.late_answers)],
            )?;
        }

        // Reloads.
        let mut reloads = vec![("flags", environments.reloads().counts())];
        reloads.push(("plugins", self.sources.plugins.reloads().counts()));
        if let Some(keys) = &self.sources.api_keys {
            reloads.push(("api_keys", keys.reloads().counts()));
        }
        family(
            &mut encoder,
            "flaghost_reloads",
            "Watched files (flag files, plugins, the API key file) put in force or refused (the last good version kept)",
            MetricType::Counter,
            reloads.into_iter().flat_map(|(what, (accepted, refused))| {
                [
                    ([("what", what), ("outcome", "accepted")], accepted),
                    ([("what", what), ("outcome", "refused")], refused),
                ]
            }),
        )?;

        // HTTP requests.
        let mut requests = encoder.encode_descriptor(
            "flaghost_http_request_duration_seconds",
            "HTTP requests by route (as matched), method and status: time to the response's headers",
            None,
            MetricType::Histogram,
        )?;
        for (at, cell) in self.http.cells.iter().enumerate() {
            let (route, method) = (ROUTES[at / METHODS.len()], METHODS[at % METHODS.len()]);
            let mut statuses: Statuses = Vec::clone(&cell.load());
            statuses.sort_by_key(|(status, _)| *status);
            for (status, histogram) in statuses {
                let totals = histogram.totals();
                let status = status.to_string();
                let labels = [
                    ("route", route),
                    ("method", method),
                    ("status", status.as_str()),
                ];
                let buckets: Vec<(f64, u64)> = (0..=HTTP_BUCKETS)
                    .map(|i| {
                        let bound = if i < HTTP_BUCKETS {
                            http_bucket_bound(i).as_secs_f64()
                        } else {
                            f64::INFINITY
                        };
                        (bound, totals[i])
                    })
                    .collect();
                let sum = Duration::from_nanos(totals[HTTP_BUCKETS + 1]).as_secs_f64();
                histogram_of(requests.encode_family(&labels)?, sum, &buckets)?;
            }
        }

        // Plugins: the admin listing's numbers, from the same counters.
        let plugins = self.sources.plugins.current();
        let mut stats: Vec<(String, crate::plugins::StatsSnapshot)> = plugins
            .iter()
            .map(|p| (p.name().to_owned(), p.stats()))
            .collect();
        stats.sort_by(|a, b| a.0.cmp(&b.0));
        family(
            &mut encoder,
            "flaghost_plugin_calls",
            "Plugin calls run",
            MetricType::Counter,
            stats
                .iter()
                .map(|(n, s)| ([("plugin", n.clone())], s.evaluations)),
        )?;
        family(
            &mut encoder,
            "flaghost_plugin_errors",
            "Failed plugin calls by kind (deadline: stopped at its deadline or its request's budget)",
            MetricType::Counter,
            stats.iter().flat_map(|(n, s)| {
                [
                    ("deadline", s.errors.deadline),
                    ("memory", s.errors.memory),
                    ("trap", s.errors.trap),
                    ("output", s.errors.output),
                    ("guest", s.errors.guest),
                ]
                .map(|(kind, v)| ([("plugin", n.clone()), ("kind", kind.to_owned())], v))
            }),
        )?;
        family(
            &mut encoder,
            "flaghost_plugin_refused",
            "Plugin calls not run: the plugin was quarantined, or at its share of the plugin threads",
            MetricType::Counter,
            stats
                .iter()
                .map(|(n, s)| ([("plugin", n.clone())], s.refused)),
        )?;
        family(
            &mut encoder,
            "flaghost_plugin_quarantines",
            "Times a plugin was quarantined after repeated slow calls",
            MetricType::Counter,
            stats
                .iter()
                .map(|(n, s)| ([("plugin", n.clone())], s.quarantines)),
        )?;
        let mut latency = encoder.encode_descriptor(
            "flaghost_plugin_call_duration_seconds",
            "Plugin call wall time",
            None,
            MetricType::Histogram,
        )?;
        for (name, s) in &stats {
            let labels = [("plugin", name.as_str())];
            let sample = latency.encode_family(&labels)?;
            let buckets: Vec<(f64, u64)> = s
                .latency_buckets
                .iter()
                .map(|&(bound, count)| (bound.map_or(f64::INFINITY, |b| b.as_secs_f64()), count))
                .collect();
            histogram_of(sample, s.latency_sum.as_secs_f64(), &buckets)?;
        }
        Ok(())
    }
}

/// No labels.
#[derive(Clone, Copy)]
struct NoLabels;

impl EncodeLabelSet for NoLabels {
    fn encode(
        &self,
        _: &mut prometheus_client::encoding::LabelSetEncoder,
    ) -> Result<(), std::fmt::Error> {
        Ok(())
    }
}

fn histogram_of(
    mut sample: MetricEncoder,
    sum: f64,
    buckets: &[(f64, u64)],
) -> Result<(), std::fmt::Error> {
    let count = buckets.iter().map(|b| b.1).sum();
    sample.encode_histogram::<NoLabelSet>(sum, count, buckets, None)
}
