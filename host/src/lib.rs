//! flaghost: feature-flag evaluation over the OpenFeature Remote Evaluation
//! Protocol (OFREP), with teams' targeting rules as sandboxed WebAssembly
//! components.
//!
//! # Layout
//!
//! Read top-down, the modules follow a request's path:
//!
//! - [`http`]: the axum router, OFREP handlers, health and the admin API, and
//!   [`http::ApiError`], the one place an error becomes a status and a body.
//! - [`evaluation`]: pure, synchronous evaluation of a flag over an immutable
//!   flag set; reasons and error codes as OpenFeature defines them.
//! - [`environments`]: the read path: in-process snapshots refreshed from
//!   Redis and the flag store (single flight), the last good set served
//!   through failures (STALE past its TTL), and the background work: file
//!   reloads, Redis write-backs, invalidations from other instances.
//! - [`cache`]: the snapshot table, the [`cache::FlagCache`] port of the
//!   shared tier, and its Redis backend (key layout, breaker, pub/sub).
//! - [`store`]: the [`store::FlagStore`] port and the flag-file directory.
//! - [`rules`]: what a targeting rule is (trait, error, binder, the
//!   evaluation context), the leaf [`flags`], [`evaluation`] and [`plugins`]
//!   build on.
//! - [`flags`]: the flag model and the flagd-format parser and validation.
//! - [`plugins`]: the wasmtime runtime that runs targeting rules sandboxed.
//! - [`plugin_changes`]: the one way the plugins in force change (the plugin
//!   directory's watcher, the admin API's uploads and deletions).
//! - [`access`]: who may evaluate: caller API keys per environment.
//! - [`metrics`]: what `GET /metrics` exposes, and the evaluation counters.
//! - [`config`] and [`server`]: command line, start-up and shutdown.
//! - [`signing`]: HMAC-SHA-256 under flaghost's own key, for what it reads
//!   back from places others might write (compiled plugin artifacts).

pub mod access;
pub mod cache;
pub mod config;
pub mod environments;
pub mod evaluation;
pub mod flags;
pub mod http;
pub mod local;
pub mod metrics;
pub mod plugin_changes;
pub mod plugins;
pub mod rules;
pub mod server;
pub mod signing;
pub mod store;
pub mod telemetry;

/// The digest flaghost gives a file (flag file, plugin component): hex
/// SHA-256. One function, so digests computed in different places compare.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    format!("{:x}", sha2::Sha256::digest(bytes))
}
