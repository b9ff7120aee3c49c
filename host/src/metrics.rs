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

use std::collections::{BTreeMap, HashSet};
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

/// A route as counted: one of [`ROUTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route(usize);

impl Route {
    /// A request no route matched.
    pub const UNMATCHED: Route = Route(ROUTES.len() - 1);

    /// The route of a request that matched `pattern` (if any).
    pub fn of(pattern: Option<&str>) -> Self {
        let Some(pattern) = pattern else {
            return Route::UNMATCHED;
        };
        let other = ROUTES.len() - 2;
        Route(
            ROUTES[..other]
                .iter()
                .position(|known| *known == pattern)
                .unwrap_or(other),
        )
    }

    /// Its pattern (`other` for a route not in the table, `unmatched` for
    /// none).
    pub fn as_str(self) -> &'static str {
        ROUTES[self.0]
    }
}

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

    fn observe(&self, route: Route, method: usize, status: u16, took: Duration) {
        let Some(cell) = self.cells.get(route.0 * METHODS.len() + method) else {
            return;
        };
        let record = |histogram: &HttpCell| {
            let bucket = (0..HTTP_BUCKETS)
                .find(|&i| took <= http_bucket_bound(i))
                .unwrap_or(HTTP_BUCKETS);
            histogram.add(bucket);
            histogram.add_by(
                HTTP_BUCKETS + 1,
                u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
            );
        };
        // NB: used through the guard, not an `Arc` clone: every request on
        // every core would write the histogram's reference count.
        if let Some((_, histogram)) = cell.load().iter().find(|(s, _)| *s == status) {
            return record(histogram);
        }
        let _adding = self.adding.lock().unwrap_or_else(PoisonError::into_inner);
        let statuses = cell.load_full();
        if let Some((_, histogram)) = statuses.iter().find(|(s, _)| *s == status) {
            return record(histogram);
        }
        let histogram = Arc::new(HttpCell::default());
        record(&histogram);
        let mut more = Vec::clone(&statuses);
        more.push((status, histogram));
        cell.store(Arc::new(more));
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

    /// Counts an HTTP request to `route`.
    pub fn request(&self, route: Route, method: &axum::http::Method, status: u16, took: Duration) {
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

/// `N` counters that every worker thread adds to: each of the first
/// threads to count has a shard (a cache line) of its own that only it
/// writes, with a plain load and store; threads past them share the last
/// shard, with atomic adds. Read by summing the shards.
///
/// NB: every request counts, on every core. With one shared counter, each
/// a locked add, a 900-flag bulk answer (a count per flag) cost 25% more
/// CPU (a quick `wrk` side by side; perf put 68% of the answer loop on the
/// `lock` add). Evaluation counters are sharded the same way, a block per
/// flag set (see [`SetCounters`]).
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

/// Adds `n` to `counter`: a plain load and store when this thread is its
/// one writer (`own`), an atomic add when threads share it.
fn bump(counter: &AtomicU64, n: u64, own: bool) {
    if own {
        counter.store(
            counter.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    } else {
        counter.fetch_add(n, Ordering::Relaxed);
    }
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
        let own = SHARD
            .with(|s| *s)
            .filter(|&own| own + 1 < self.shards.len());
        let shard = own.map_or(self.shards.last(), |own| self.shards.get(own));
        if let Some(counter) = shard.and_then(|s| s.0.get(i)) {
            bump(counter, n, own.is_some());
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

/// Evaluation counters, by environment and flag, kept across reloads of a
/// flag set (a reload that keeps a flag keeps its counts).
///
/// Each flag set counts into one block of its own ([`SetCounters`]); a set
/// no longer served has its counts folded into `retired` at the next
/// scrape, and a scrape reports `retired` plus every set still served.
#[derive(Debug)]
pub struct Evaluations {
    /// Tells this registry's counters from another's (an address could be
    /// reused by the next one).
    id: u64,
    tallies: Mutex<Tallies>,
    /// Rows (a flag, or a variant of one) `retired` may hold before a fold
    /// drops those no live block names ([`MAX_RETIRED_ROWS`]).
    max_retired_rows: usize,
}

/// Rows the retired totals may hold, and twice the rows of the live blocks,
/// before a fold drops the flags and variants no live block names. A
/// scrape drops those no loaded set has; without a scraper, flag files
/// whose keys or variant names change at every reload would otherwise grow
/// them without end. NB: a set loaded but not yet evaluated has no live
/// block: should a fold prune, its flags' earlier counts go (a counter
/// reset to Prometheus). Reloads that keep their names never prune.
pub const MAX_RETIRED_ROWS: usize = 1 << 18;

#[derive(Debug, Default)]
struct Tallies {
    /// The blocks of sets that may still count.
    live: Vec<Arc<SetCounters>>,
    /// What sets no longer served counted, by environment and flag.
    retired: Totals,
}

impl Default for Evaluations {
    fn default() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            tallies: Mutex::default(),
            max_retired_rows: MAX_RETIRED_ROWS,
        }
    }
}

/// Evaluation counts by environment and flag (the empty flag: flags callers
/// asked for that the environment does not have).
pub type Totals = BTreeMap<(String, String), FlagTotals>;

/// One flag's evaluation counts.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FlagTotals {
    /// By variant name, then reason (in [`REASONS`]' order).
    pub variants: BTreeMap<String, [u64; REASONS.len()]>,
    /// Answers without a variant (disabled, no default variant, errors),
    /// by reason.
    pub unserved: [u64; REASONS.len()],
    /// Failures by code (in [`ErrorCode`]'s order).
    pub errors: [u64; ERROR_CODES.len()],
}

impl FlagTotals {
    fn is_zero(&self) -> bool {
        self.variants.values().flatten().all(|&n| n == 0)
            && self.unserved.iter().chain(&self.errors).all(|&n| n == 0)
    }
}

/// One flag set's counters: one contiguous block per shard (see
/// [`Sharded`]), a flag's counters at an offset of their own, in the set's
/// key order.
///
/// NB: a bulk answer counts every flag, in key order. Counters reached
/// through a pointer or two per flag (an `Arc` per flag and variant) cost a
/// 900-flag answer 24% more CPU, most of it waiting on those loads (perf);
/// here the next counter's address is known without loading anything, and
/// the walk is forward through one block.
#[derive(Debug)]
pub struct SetCounters {
    /// The [`Evaluations`] they belong to.
    owner: u64,
    environment: String,
    /// Where each flag's counters are, by flag position.
    ///
    /// NB: apart from the names, which only a scrape reads: each count
    /// would otherwise load a name list from elsewhere in memory first
    /// (perf: 7% of a bulk answer's loop waited on that load).
    flags: Vec<FlagSlots>,
    /// Each flag's key and variant names, by flag position.
    names: Vec<FlagNames>,
    /// Counters per shard (a whole number of lines).
    stride: usize,
    /// Shards of this block: [`shards()`], or one that every thread adds
    /// to atomically when that many would take more than
    /// [`MAX_SHARDED_BYTES`].
    shards: usize,
    lines: Box<[Line]>,
    /// Its flags and their variants, counted once each.
    rows: usize,
}

/// The most a set's counters take, in bytes, with a shard per worker.
///
/// NB: a block is 48 bytes per variant and shard. A 16 MiB flag file can
/// hold millions of variants, and a shard per core would multiply what it
/// costs by the machine's cores; past this, one shard.
const MAX_SHARDED_BYTES: usize = 32 << 20;

/// Where one flag's counters are in its set's block: for each variant (by
/// ordinal), then for answers without one, a counter per reason; then one
/// per error code.
#[derive(Debug, Clone, Copy)]
struct FlagSlots {
    offset: u32,
    /// Variant ordinals the flag has (0 to this, less one).
    variants: u32,
}

impl FlagSlots {
    fn served(self, variant: Option<usize>, reason: Reason) -> usize {
        let variants = self.variants as usize;
        let row = variant.filter(|&v| v < variants).unwrap_or(variants);
        self.offset as usize + row * REASONS.len() + reason as usize
    }

    fn failed(self, code: ErrorCode) -> usize {
        self.offset as usize + (self.variants as usize + 1) * REASONS.len() + code as usize
    }

    fn len(self) -> usize {
        (self.variants as usize + 1) * REASONS.len() + ERROR_CODES.len()
    }
}

/// A flag's key, and its variants' names by ordinal.
#[derive(Debug)]
struct FlagNames {
    key: String,
    variants: Vec<Option<String>>,
}

/// The counter of flags the set does not have.
const NOT_FOUND_SLOT: usize = 0;

/// Eight counters: a cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Line([AtomicU64; 8]);

impl SetCounters {
    fn new(owner: u64, set: &FlagSet) -> Self {
        Self::bounded(owner, set, MAX_SHARDED_BYTES)
    }

    /// A block for `set`, sharded if that takes at most `max_sharded_bytes`.
    fn bounded(owner: u64, set: &FlagSet, max_sharded_bytes: usize) -> Self {
        let mut offset = NOT_FOUND_SLOT + 1;
        let mut flags = Vec::with_capacity(set.flags.len());
        let mut names = Vec::with_capacity(set.flags.len());
        for flag in set.flags.values() {
            let mut variants = vec![None; flag.variants.len()];
            for (name, variant) in &flag.variants {
                if variants.len() <= variant.ordinal {
                    variants.resize(variant.ordinal + 1, None);
                }
                variants[variant.ordinal] = Some(name.clone());
            }
            // NB: a flag file is bounded far below 4 G counters.
            let slots = FlagSlots {
                offset: u32::try_from(offset).unwrap_or(u32::MAX),
                variants: u32::try_from(variants.len()).unwrap_or(u32::MAX),
            };
            offset += slots.len();
            flags.push(slots);
            names.push(FlagNames {
                key: flag.key.clone(),
                variants,
            });
        }
        let stride = offset.div_ceil(8) * 8;
        let sharded = shards();
        let shards = if sharded.saturating_mul(stride).saturating_mul(8) <= max_sharded_bytes {
            sharded
        } else {
            1
        };
        Self {
            owner,
            environment: set.environment.clone(),
            flags,
            names,
            stride,
            shards,
            lines: (0..shards * stride / 8).map(|_| Line::default()).collect(),
            rows: set.flags.values().map(|f| 1 + f.variants.len()).sum(),
        }
    }

    fn counter(&self, shard: usize, slot: usize) -> Option<&AtomicU64> {
        let at = shard * self.stride + slot;
        self.lines.get(at / 8).map(|line| &line.0[at % 8])
    }

    /// Counter `slot`, summed over the shards.
    fn total(&self, slot: usize) -> u64 {
        (0..self.shards)
            .filter_map(|shard| self.counter(shard, slot))
            .map(|c| c.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }

    /// Adds what this block counted to `totals`.
    fn add_to(&self, totals: &mut Totals) {
        let not_found = self.total(NOT_FOUND_SLOT);
        if not_found > 0 {
            let mut counts = FlagTotals::default();
            counts.errors[ErrorCode::FlagNotFound as usize] = not_found;
            merge(totals, (&self.environment, ""), counts);
        }
        for (&flag, names) in self.flags.iter().zip(&self.names) {
            let row = |variant| -> [u64; REASONS.len()] {
                std::array::from_fn(|r| self.total(flag.served(variant, REASONS[r])))
            };
            let counts = FlagTotals {
                variants: (names.variants.iter().enumerate())
                    .filter_map(|(ordinal, name)| Some((name.clone()?, row(Some(ordinal)))))
                    .filter(|(_, reasons)| reasons.iter().any(|&n| n > 0))
                    .collect(),
                unserved: row(None),
                errors: std::array::from_fn(|c| self.total(flag.failed(ERROR_CODES[c]))),
            };
            merge(totals, (&self.environment, &names.key), counts);
        }
    }
}

/// Adds `counts` to `totals`' entry for `(environment, flag)`, unless they
/// are all zero.
fn merge(totals: &mut Totals, (environment, flag): (&str, &str), counts: FlagTotals) {
    if counts.is_zero() {
        return;
    }
    let entry = totals
        .entry((environment.to_owned(), flag.to_owned()))
        .or_default();
    for (name, reasons) in counts.variants {
        let row = entry.variants.entry(name).or_default();
        for (total, n) in row.iter_mut().zip(reasons) {
            *total += n;
        }
    }
    for (total, n) in (entry.unserved.iter_mut()).zip(counts.unserved) {
        *total += n;
    }
    for (total, n) in entry.errors.iter_mut().zip(counts.errors) {
        *total += n;
    }
}

impl Evaluations {
    /// `set`'s counters, to count many with one lookup: found at its first
    /// evaluation, then kept with it.
    pub fn counter<'a>(&self, set: &'a FlagSet) -> Counter<'a> {
        let found = set.counters.get_or_init(|| self.resolve(set));
        let counters = if found.owner == self.id {
            // NB: borrowed, not an `Arc` clone: every request on every core
            // would write the same reference count.
            Counters::Kept(found)
        } else {
            // NB: a set is served by one flaghost; should two share one
            // (tests, benches), the second's counts are still right, in a
            // block made for this use and folded in at its next scrape.
            Counters::Found(self.resolve(set))
        };
        Counter {
            counters,
            on_one_thread: std::marker::PhantomData,
            shard: SHARD.with(|s| *s),
        }
    }

    fn resolve(&self, set: &FlagSet) -> Arc<SetCounters> {
        // NB: folded here too, not only at scrapes: with no scraper, each
        // reload would otherwise leave its block behind. After the new
        // block is live, so a fold that prunes keeps this set's names.
        let counters = Arc::new(SetCounters::new(self.id, set));
        self.lock().live.push(counters.clone());
        self.fold_retired();
        counters
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tallies> {
        self.tallies.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Folds the blocks of sets no longer served into the retired totals.
    ///
    /// NB: their counters are summed outside the lock (a request may be
    /// waiting on it for a new set's block), and each block leaves `live`
    /// under the same lock its counts join `retired`: a scrape sees them
    /// in one or the other, never both or neither.
    fn fold_retired(&self) {
        let retiring: Vec<Arc<SetCounters>> = self
            .lock()
            .live
            .iter_mut()
            // NB: `get_mut` sees every count the set's last user made. A
            // block held here is no longer unique: a fold running at the
            // same time leaves it alone.
            .filter_map(|counters| Arc::get_mut(counters).is_some().then(|| counters.clone()))
            .collect();
        if retiring.is_empty() {
            return;
        }
        let mut folded = Totals::new();
        for counters in &retiring {
            counters.add_to(&mut folded);
        }
        let mut tallies = self.lock();
        let Tallies { live, retired } = &mut *tallies;
        live.retain(|counters| !retiring.iter().any(|r| Arc::ptr_eq(r, counters)));
        for ((environment, flag), counts) in folded {
            merge(retired, (&environment, &flag), counts);
        }
        // NB: retired rows of the flags sets still serve are about as many
        // as the live blocks' rows; only past twice that (and the bound)
        // are they names nothing serves any more.
        let rows: usize = retired.values().map(|c| 1 + c.variants.len()).sum();
        let live_rows: usize = live.iter().map(|c| c.rows).sum();
        if rows > self.max_retired_rows.max(2 * live_rows) {
            let mut named = HashSet::new();
            insert_names(&mut named, live);
            prune(retired, &named);
        }
    }

    /// Every count so far, of the flags some set in `sets` (or one still
    /// serving) has: what sets no longer served counted is folded in
    /// first, and the flags no set has any more are dropped.
    pub fn totals(&self, sets: &[Arc<FlagSet>]) -> Totals {
        self.fold_retired();
        let (mut totals, live) = {
            let mut tallies = self.lock();
            let Tallies { live, retired } = &mut *tallies;
            // What some set has: environments, flags, and their variants.
            let mut served: HashSet<(&str, &str, &str)> = HashSet::new();
            for set in sets {
                served.insert((&set.environment, "", ""));
                for flag in set.flags.values() {
                    served.insert((&set.environment, &flag.key, ""));
                    served.extend(
                        (flag.variants.keys())
                            .map(|v| (set.environment.as_str(), flag.key.as_str(), v.as_str())),
                    );
                }
            }
            insert_names(&mut served, live);
            prune(retired, &served);
            (retired.clone(), live.clone())
        };
        // NB: summed outside the lock; a block held here cannot be folded
        // meanwhile.
        for counters in &live {
            counters.add_to(&mut totals);
        }
        totals
    }
}

/// Environments, flags and variants (as `(environment, flag, variant)`,
/// the flag or variant empty for the whole) some block of `live` counts.
fn insert_names<'a>(
    names: &mut HashSet<(&'a str, &'a str, &'a str)>,
    live: &'a [Arc<SetCounters>],
) {
    for counters in live {
        let environment = counters.environment.as_str();
        names.insert((environment, "", ""));
        for flag in &counters.names {
            names.insert((environment, &flag.key, ""));
            names.extend(
                (flag.variants.iter().flatten())
                    .map(|v| (environment, flag.key.as_str(), v.as_str())),
            );
        }
    }
}

/// Drops from `retired` the flags and variants `names` does not have.
fn prune(retired: &mut Totals, names: &HashSet<(&str, &str, &str)>) {
    retired.retain(|(environment, flag), counts| {
        counts.variants.retain(|variant, _| {
            names.contains(&(environment.as_str(), flag.as_str(), variant.as_str()))
        });
        names.contains(&(environment.as_str(), flag.as_str(), ""))
    });
}

/// A set's counters, as one evaluation uses them.
enum Counters<'a> {
    /// The set's own block.
    Kept(&'a SetCounters),
    /// A block found for this use only.
    Found(Arc<SetCounters>),
}

/// Counts the evaluations of one flag set, on one thread.
pub struct Counter<'a> {
    counters: Counters<'a>,
    /// NB: not `Send`: it adds to its thread's shard without a locked add,
    /// so it must not be held across an `.await` (the task could resume on
    /// another thread, and two threads write one shard).
    on_one_thread: std::marker::PhantomData<*const ()>,
    /// This thread's shard, if it owns one.
    shard: Option<usize>,
}

impl Counter<'_> {
    fn counters(&self) -> &SetCounters {
        match &self.counters {
            Counters::Kept(kept) => kept,
            Counters::Found(found) => found,
        }
    }

    fn add(&self, slot: usize) {
        let counters = self.counters();
        let own = self.shard.filter(|&own| own + 1 < counters.shards);
        let shard = own.unwrap_or(counters.shards - 1);
        if let Some(counter) = counters.counter(shard, slot) {
            bump(counter, 1, own.is_some());
        }
    }

    /// `flag` answered `variant` (if any) for `reason` (as sent).
    pub fn served(&self, flag: &Flag, variant: Option<usize>, reason: Reason) {
        if let Some(&slots) = self.counters().flags.get(flag.position) {
            self.add(slots.served(variant, reason));
        }
    }

    /// `flag` failed with `code`.
    pub fn failed(&self, flag: &Flag, code: ErrorCode) {
        if let Some(&slots) = self.counters().flags.get(flag.position) {
            self.add(slots.served(None, Reason::Error));
            self.add(slots.failed(code));
        }
    }

    /// A caller asked for a flag the set does not have.
    pub fn not_found(&self) {
        self.add(NOT_FOUND_SLOT);
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
        let mut evaluations = Vec::new();
        let mut errors = Vec::new();
        for ((environment, flag), counts) in self.evaluations.totals(&sets) {
            let by_variant = counts
                .variants
                .iter()
                .map(|(name, reasons)| (name.as_str(), reasons))
                .chain(std::iter::once(("", &counts.unserved)));
            for (variant, reasons) in by_variant {
                for (reason, &count) in REASONS.iter().zip(reasons) {
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
            for (code, &count) in ERROR_CODES.iter().zip(&counts.errors) {
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
            "Plugin calls not run: the plugin was quarantined, at its share of the plugin threads, its queue was full, or the request's budget was spent",
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

#[cfg(test)]
mod tests;
