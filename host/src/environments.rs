//! The read path: an environment's current flag set, from the cache, else the
//! flag store (cache-aside), with the last good set kept to serve through a
//! store that fails.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use tracing::{debug, warn};

use crate::cache::FlagCache;
use crate::flags::FlagSet;
use crate::store::{FlagStore, StoreError, valid_environment_name};

/// Why an environment has no flag set to evaluate.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LookupError {
    /// The name is not a valid environment name.
    #[error("invalid environment name {0:?}: use letters, digits, '_', '.' and '-'")]
    InvalidName(String),
    /// No such environment.
    #[error("environment {0:?} was not found")]
    NotFound(String),
    /// The store failed and there is no earlier good set to serve.
    #[error("environment {environment:?} is unavailable: {reason}")]
    Unavailable {
        /// The environment.
        environment: String,
        /// Why.
        reason: String,
    },
}

/// Resolves environments to flag sets.
pub struct Environments {
    cache: Arc<dyn FlagCache>,
    store: Arc<dyn FlagStore>,
    /// The last set successfully loaded per environment: served, with a
    /// warning, when the store fails (a file broken on disk, a read error).
    last_good: RwLock<HashMap<String, Arc<FlagSet>>>,
}

impl Environments {
    /// A read path over `cache` and `store`.
    pub fn new(cache: Arc<dyn FlagCache>, store: Arc<dyn FlagStore>) -> Self {
        Self {
            cache,
            store,
            last_good: RwLock::new(HashMap::new()),
        }
    }

    /// The cache backend.
    pub fn cache(&self) -> &Arc<dyn FlagCache> {
        &self.cache
    }

    /// The flag store.
    pub fn store(&self) -> &Arc<dyn FlagStore> {
        &self.store
    }

    /// `environment`'s current flag set.
    pub async fn get(&self, environment: &str) -> Result<Arc<FlagSet>, LookupError> {
        if !valid_environment_name(environment) {
            return Err(LookupError::InvalidName(environment.to_owned()));
        }
        match self.cache.get(environment).await {
            Ok(Some(set)) => return Ok(set),
            Ok(None) => {}
            Err(e) => warn!(environment, error = %e, "cache read failed; loading from the store"),
        }
        self.refresh(environment).await
    }

    /// Loads `environment` from the store and caches it; on a store failure
    /// serves the last good set, if there is one.
    pub async fn refresh(&self, environment: &str) -> Result<Arc<FlagSet>, LookupError> {
        match self.store.load(environment).await {
            Ok(set) => {
                if let Err(e) = self.cache.put(set.clone()).await {
                    warn!(environment, error = %e, "cache write failed; serving from the store");
                }
                self.last_good
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(environment.to_owned(), set.clone());
                Ok(set)
            }
            Err(StoreError::NotFound(_)) => {
                debug!(environment, "unknown environment");
                Err(LookupError::NotFound(environment.to_owned()))
            }
            Err(StoreError::InvalidEnvironment(name)) => Err(LookupError::InvalidName(name)),
            Err(e) => {
                let last = self
                    .last_good
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(environment)
                    .cloned();
                match last {
                    Some(set) => {
                        warn!(environment, error = %e, digest = %set.digest,
                              "flag store failed; serving the last good flag set");
                        // Cache it again so the store is not retried per request.
                        if let Err(e) = self.cache.put(set.clone()).await {
                            warn!(environment, error = %e, "cache write failed");
                        }
                        Ok(set)
                    }
                    None => Err(LookupError::Unavailable {
                        environment: environment.to_owned(),
                        reason: e.to_string(),
                    }),
                }
            }
        }
    }
}
