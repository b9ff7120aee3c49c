//! Flag sources: where an environment's flag file comes from.
//!
//! [`FlagStore`] is the port; [`DirStore`] reads `<dir>/<environment>.json`.

mod dir;
mod stamp;

pub use dir::{DirStore, FlagFiles};
pub(crate) use stamp::Stamp;

use std::sync::Arc;

use async_trait::async_trait;

use crate::flags::{FlagFileError, FlagSet};

/// Why a flag store could not give an environment's flag set.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The environment name is not `[A-Za-z0-9_.-]+`.
    #[error("invalid environment name {0:?}: use letters, digits, '_', '.' and '-'")]
    InvalidEnvironment(String),
    /// No flag file for the environment.
    #[error("environment {0:?} was not found")]
    NotFound(String),
    /// The file exists but was refused.
    #[error(transparent)]
    Invalid(#[from] FlagFileError),
    /// The file could not be read.
    #[error("cannot read {path}: {reason}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        reason: String,
    },
}

/// A source of flag sets, one per environment.
#[async_trait]
pub trait FlagStore: Send + Sync {
    /// Loads and validates `environment`'s flag set.
    async fn load(&self, environment: &str) -> Result<Arc<FlagSet>, StoreError>;

    /// The environments this store holds.
    async fn environments(&self) -> Result<Vec<String>, StoreError>;

    /// For each of `environments` in turn, the digest of the set
    /// [`FlagStore::load`] would give now, where the store knows it without
    /// reading (nothing changed since its last load); `None` where it must
    /// load to tell.
    ///
    /// NB: a poll asks this first, for every environment at once, so an
    /// unchanged store costs a poll one trip off the async workers, not one
    /// per environment (each such trip wakes a thread: an idle flaghost
    /// with a few environments woke one over 10 times a second).
    async fn unchanged(&self, environments: &[String]) -> Vec<Option<String>> {
        vec![None; environments.len()]
    }

    /// What the store is, for logs (`directory ./flags`).
    fn describe(&self) -> String;
}

/// Whether `name` can name an environment: it appears in URLs, file names and
/// cache keys, so it is limited to `[A-Za-z0-9_.-]`, and not `.` or `..`.
pub fn valid_environment_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}
