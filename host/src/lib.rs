//! flaghost: feature-flag evaluation over the OpenFeature Remote Evaluation
//! Protocol (OFREP), with teams' targeting rules as sandboxed WebAssembly
//! components.
//!
//! # Layout
//!
//! Read top-down, the modules follow a request's path:
//!
//! - [`http`]: the axum router, OFREP handlers, and [`http::ApiError`], the
//!   one place an error becomes a status and a body.
//! - [`evaluation`]: pure, synchronous evaluation of a flag over an immutable
//!   flag set; reasons and error codes as OpenFeature defines them.
//! - [`environments`]: the read path, cache else store, with the last good
//!   flag set kept to serve through a failing store.
//! - [`cache`]: the [`cache::FlagCache`] port and its in-memory TTL backend.
//! - [`store`]: the [`store::FlagStore`] port and the flag-file directory.
//! - [`flags`]: the flag model and the flagd-format parser and validation.
//! - [`plugins`]: the wasmtime runtime that runs targeting rules sandboxed.
//! - [`config`] and [`server`]: command line, start-up and shutdown.

pub mod cache;
pub mod config;
pub mod environments;
pub mod evaluation;
pub mod flags;
pub mod http;
pub mod plugins;
pub mod server;
pub mod store;
pub mod telemetry;
