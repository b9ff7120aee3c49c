//! A directory of flag files, `<dir>/<environment>.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;

use super::{FlagStore, StoreError, valid_environment_name};
use crate::flags::{DocumentLimits, FlagSet, RuleBinder, parse_flag_file};
use crate::plugins::{PluginRegistry, PluginSet};
use crate::sha256_hex;

/// The state of a flag directory's files (see [`DirStore::flag_files`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlagFiles(Vec<(String, String)>);

/// The last set parsed per environment, with the plugin generation it was
/// bound under.
type Parsed = HashMap<String, (u64, Arc<FlagSet>)>;

/// Reads flag files from a directory; rules are bound to `plugins`. Cloning
/// shares it.
#[derive(Clone)]
pub struct DirStore {
    dir: PathBuf,
    plugins: PluginRegistry,
    /// The last set parsed per environment, with the plugin generation it
    /// was bound under: a file whose bytes did not change is not parsed (nor
    /// its plugin configurations checked) again while the plugins stay.
    parsed: Arc<Mutex<Parsed>>,
    limits: DocumentLimits,
}

impl DirStore {
    /// A store over `dir`, binding rules to `plugins`.
    pub fn new(dir: impl Into<PathBuf>, plugins: impl Into<PluginRegistry>) -> Self {
        Self {
            dir: dir.into(),
            plugins: plugins.into(),
            parsed: Arc::default(),
            limits: DocumentLimits::default(),
        }
    }

    /// The same store, bounding documents by `limits` instead of the
    /// defaults.
    #[must_use]
    pub fn with_limits(mut self, limits: DocumentLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads and parses one environment's file, synchronously.
    pub fn load_sync(&self, environment: &str) -> Result<Arc<FlagSet>, StoreError> {
        if !valid_environment_name(environment) {
            return Err(StoreError::InvalidEnvironment(environment.to_owned()));
        }
        let (path, bytes) = self.read(environment)?;
        let digest = sha256_hex(&bytes);
        let generation = self.plugins.generation();
        if let Some((parsed_under, set)) = self.parsed().get(environment)
            && set.digest == digest
            && *parsed_under == generation
        {
            return Ok(set.clone());
        }
        let binder: &dyn RuleBinder = &self.plugins;
        let set = Arc::new(parse_flag_file(
            &path.display().to_string(),
            environment,
            &bytes,
            binder,
            &self.limits,
        )?);
        self.parsed()
            .insert(environment.to_owned(), (generation, set.clone()));
        Ok(set)
    }

    /// `environment`'s file and its bytes.
    fn read(&self, environment: &str) -> Result<(PathBuf, Vec<u8>), StoreError> {
        let path = self.dir.join(format!("{environment}.json"));
        let max = self.limits.max_file_bytes;
        match read_capped(&path, max) {
            Ok(Ok(bytes)) => Ok((path, bytes)),
            Ok(Err(size)) => Err(StoreError::Invalid(crate::flags::FlagFileError {
                file: path.display().to_string(),
                problems: vec![crate::flags::Problem::new(
                    None,
                    format!(
                        "the file is {size} bytes or more, over the limit of {} (--max-flag-file-mib)",
                        crate::flags::in_words(max)
                    ),
                )],
            })),
            // NB: a missing file in a missing directory is not an unknown
            // environment but a store that cannot be read.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.dir.is_dir() => {
                Err(StoreError::NotFound(environment.to_owned()))
            }
            Err(e) => Err(StoreError::Io {
                path: path.display().to_string(),
                reason: e.to_string(),
            }),
        }
    }

    /// Whether `environment`'s file would load with `plugins` (a candidate
    /// plugin set, not yet in force); a missing file loads.
    pub fn check_with(&self, environment: &str, plugins: &PluginSet) -> Result<(), StoreError> {
        let (path, bytes) = match self.read(environment) {
            Ok(read) => read,
            Err(StoreError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        parse_flag_file(
            &path.display().to_string(),
            environment,
            &bytes,
            plugins,
            &self.limits,
        )?;
        Ok(())
    }

    /// The flag files' names and digests now: changes when a file's
    /// content does (symlinks followed, as the store reads them).
    pub fn flag_files(&self) -> FlagFiles {
        let mut files: Vec<(String, String)> = self
            .environments_sync()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|env| {
                let (_, bytes) = self.read(&env).ok()?;
                Some((env, sha256_hex(&bytes)))
            })
            .collect();
        files.sort();
        FlagFiles(files)
    }

    /// The plugins flag files are bound to.
    pub fn plugins(&self) -> &PluginRegistry {
        &self.plugins
    }

    /// The environments: the stems of the `*.json` files in the directory.
    pub fn environments_sync(&self) -> Result<Vec<String>, StoreError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| StoreError::Io {
            path: self.dir.display().to_string(),
            reason: e.to_string(),
        })?;
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .filter_map(|p| p.file_stem()?.to_str().map(str::to_owned))
            .collect();
        names.sort();
        Ok(names)
    }

    fn parsed(&self) -> std::sync::MutexGuard<'_, Parsed> {
        // The map is only ever replaced entry by entry: a panic elsewhere
        // cannot leave it half-written.
        self.parsed.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl FlagStore for DirStore {
    async fn load(&self, environment: &str) -> Result<Arc<FlagSet>, StoreError> {
        // NB: parsing binds plugin rules, which runs guest code (their
        // configuration checks): off the async workers.
        let (store, env) = (self.clone(), environment.to_owned());
        tokio::task::spawn_blocking(move || store.load_sync(&env))
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Io {
                    path: self.dir.display().to_string(),
                    reason: format!("loading {environment} panicked; see the logs"),
                })
            })
    }

    async fn environments(&self) -> Result<Vec<String>, StoreError> {
        self.environments_sync()
    }

    fn describe(&self) -> String {
        format!("directory {}", self.dir.display())
    }
}

/// The file's bytes, or `Err(size)` if it holds more than `max`: checked
/// before reading and while reading (a file growing meanwhile), so an
/// oversized file is never read whole.
fn read_capped(path: &Path, max: usize) -> std::io::Result<Result<Vec<u8>, u64>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    if size > max as u64 {
        return Ok(Err(size));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(max as u64 + 1).read_to_end(&mut bytes)?;
    if bytes.len() > max {
        return Ok(Err(bytes.len() as u64));
    }
    Ok(Ok(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_over_the_size_limit_is_refused_with_its_size_before_it_is_parsed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = DirStore::new(dir.path(), PluginSet::default());
        std::fs::write(dir.path().join("ok.json"), br#"{"flags": {}}"#).expect("write");
        assert!(store.load_sync("ok").is_ok());
        let over = vec![b' '; crate::flags::DEFAULT_MAX_FILE_BYTES + 1];
        std::fs::write(dir.path().join("big.json"), over).expect("write");
        let Err(StoreError::Invalid(e)) = store.load_sync("big") else {
            panic!("refused as invalid");
        };
        let text = e.to_string();
        assert!(
            text.contains("big.json") && text.contains("over the limit of 16 MiB"),
            "{text}"
        );
        // A lowered bound is the one that refuses.
        let tight = DirStore::new(dir.path(), PluginSet::default()).with_limits(DocumentLimits {
            max_file_bytes: 8,
            ..DocumentLimits::default()
        });
        let Err(StoreError::Invalid(e)) = tight.load_sync("ok") else {
            panic!("refused as invalid");
        };
        assert!(e.to_string().contains("over the limit of 8 bytes"), "{e}");
    }
}
