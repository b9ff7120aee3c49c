//! A directory of flag files, `<dir>/<environment>.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;

use super::{FlagStore, Stamp, StoreError, valid_environment_name};
use crate::flags::{DocumentLimits, FlagSet, RuleBinder, parse_flag_file};
use crate::plugins::{PluginRegistry, PluginSet};
use crate::sha256_hex;

/// The state of a flag directory's files (see [`DirStore::flag_files`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlagFiles(Vec<(String, String)>);

/// The last set parsed per environment.
type Parsed = HashMap<String, Parse>;

struct Parse {
    /// The plugin generation its rules were bound under.
    generation: u64,
    set: Arc<FlagSet>,
    /// The file as it was stated before it was read, when that says
    /// whether it changed since (see [`Stamp::settled`]).
    stamp: Option<Stamp>,
}

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
        let generation = self.plugins.generation();
        // NB: a refresh or a watch of an unchanged file is an open and a
        // `stat` of the opened file, not a read and a hash: refreshing a
        // 1,000-flag file every 20 ms cost requests a quarter more at p99
        // (`cargo bench --bench refresh`). The stamp comes from the opened
        // file (not the path: a symlink flipped in between would pair one
        // file's stamp with another's bytes), and opening makes NFS
        // revalidate its cached attributes (close-to-open).
        let (path, file, meta) = self.open(environment)?;
        let stamp = Stamp::of(&meta);
        if let Some(parse) = self.parsed().get(environment)
            && parse.generation == generation
            && parse.stamp == Some(stamp)
        {
            return Ok(parse.set.clone());
        }
        let bytes = self.read_from(environment, &path, file, &meta)?;
        let stamp = stamp.settled();
        let digest = sha256_hex(&bytes);
        if let Some(parse) = self.parsed().get_mut(environment)
            && parse.set.digest == digest
            && parse.generation == generation
        {
            parse.stamp = stamp;
            return Ok(parse.set.clone());
        }
        let binder: &dyn RuleBinder = &self.plugins;
        let set = Arc::new(parse_flag_file(
            &path.display().to_string(),
            environment,
            &bytes,
            binder,
            &self.limits,
        )?);
        self.parsed().insert(
            environment.to_owned(),
            Parse {
                generation,
                set: set.clone(),
                stamp,
            },
        );
        Ok(set)
    }

    /// The digest of `environment`'s last parse, if its file is unchanged
    /// since (the same check as [`DirStore::load_sync`]'s first).
    fn unchanged_sync(&self, environment: &str) -> Option<String> {
        if !valid_environment_name(environment) {
            return None;
        }
        let generation = self.plugins.generation();
        let (_, _, meta) = self.open(environment).ok()?;
        let stamp = Stamp::of(&meta);
        let parsed = self.parsed();
        let parse = parsed.get(environment)?;
        (parse.generation == generation && parse.stamp == Some(stamp))
            .then(|| parse.set.digest.clone())
    }

    fn path(&self, environment: &str) -> PathBuf {
        self.dir.join(format!("{environment}.json"))
    }

    /// `environment`'s file and its bytes.
    fn read_whole(&self, environment: &str) -> Result<(PathBuf, Vec<u8>), StoreError> {
        let (path, file, meta) = self.open(environment)?;
        let bytes = self.read_from(environment, &path, file, &meta)?;
        Ok((path, bytes))
    }

    /// `environment`'s file, opened, and its metadata (of the opened file).
    fn open(
        &self,
        environment: &str,
    ) -> Result<(PathBuf, std::fs::File, std::fs::Metadata), StoreError> {
        let path = self.path(environment);
        let opened = std::fs::File::open(&path).and_then(|file| Ok((file.metadata()?, file)));
        match opened {
            Ok((meta, file)) => Ok((path, file, meta)),
            Err(e) => Err(self.io_error(environment, &path, &e)),
        }
    }

    /// The bytes of `file` (`meta` its metadata), refused past the size
    /// bound: checked before reading and while reading.
    fn read_from(
        &self,
        environment: &str,
        path: &Path,
        file: std::fs::File,
        meta: &std::fs::Metadata,
    ) -> Result<Vec<u8>, StoreError> {
        use std::io::Read as _;
        let max = self.limits.max_file_bytes;
        let too_large = |size: u64| {
            StoreError::Invalid(crate::flags::FlagFileError {
                file: path.display().to_string(),
                problems: vec![crate::flags::Problem::new(
                    None,
                    format!(
                        "the file is {size} bytes or more, over the limit of {} (--max-flag-file-mib)",
                        crate::flags::in_words(max)
                    ),
                )],
            })
        };
        if meta.len() > max as u64 {
            return Err(too_large(meta.len()));
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.take(max as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| self.io_error(environment, path, &e))?;
        if bytes.len() > max {
            return Err(too_large(bytes.len() as u64));
        }
        Ok(bytes)
    }

    fn io_error(&self, environment: &str, path: &Path, e: &std::io::Error) -> StoreError {
        // NB: a missing file in a missing directory is not an unknown
        // environment but a store that cannot be read.
        if e.kind() == std::io::ErrorKind::NotFound && self.dir.is_dir() {
            StoreError::NotFound(environment.to_owned())
        } else {
            StoreError::Io {
                path: path.display().to_string(),
                reason: e.to_string(),
            }
        }
    }

    /// Whether `environment`'s file would load with `plugins` (a candidate
    /// plugin set, not yet in force); a missing file loads.
    pub fn check_with(&self, environment: &str, plugins: &PluginSet) -> Result<(), StoreError> {
        let (path, bytes) = match self.read_whole(environment) {
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
                let (_, bytes) = self.read_whole(&env).ok()?;
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

    async fn unchanged(&self, environments: &[String]) -> Vec<Option<String>> {
        let (store, names) = (self.clone(), environments.to_vec());
        tokio::task::spawn_blocking(move || {
            names
                .iter()
                .map(|env| store.unchanged_sync(env))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_else(|_| vec![None; environments.len()])
    }

    fn describe(&self) -> String {
        format!("directory {}", self.dir.display())
    }
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

    #[test]
    fn a_change_is_seen_however_soon_and_whatever_its_times_say() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = DirStore::new(dir.path(), PluginSet::default());
        let file = dir.path().join("env.json");
        let write = |path: &Path, value: &str| {
            let doc = format!(
                r#"{{"flags": {{"f": {{"state": "ENABLED", "variants": {{"v": "{value}"}}, "defaultVariant": "v"}}}}}}"#
            );
            std::fs::write(path, doc).expect("write");
        };
        let served = |store: &DirStore| {
            let set = store.load_sync("env").expect("loads");
            set.flags["f"].variants["v"].value.clone()
        };
        let value = |s: &str| crate::flags::Value::String(s.into());
        write(&file, "AAAA");
        assert_eq!(served(&store), value("AAAA"));
        // The same length, within the same clock tick.
        write(&file, "BBBB");
        assert_eq!(served(&store), value("BBBB"));
        // Settled: the next load may go by the stamp alone.
        std::thread::sleep(std::time::Duration::from_millis(2100));
        assert_eq!(served(&store), value("BBBB"));
        assert_eq!(served(&store), value("BBBB"));
        // A poll's question, asked before loading, gets the same answers.
        let digest = store.load_sync("env").expect("loads").digest.clone();
        assert_eq!(store.unchanged_sync("env"), Some(digest));
        assert_eq!(store.unchanged_sync("missing"), None);
        // Rewritten in place with its modification time put back.
        let mtime = std::fs::metadata(&file)
            .expect("meta")
            .modified()
            .expect("mtime");
        write(&file, "CCCC");
        std::fs::File::options()
            .write(true)
            .open(&file)
            .expect("open")
            .set_modified(mtime)
            .expect("set mtime");
        assert_eq!(store.unchanged_sync("env"), None);
        assert_eq!(served(&store), value("CCCC"));
        // Replaced by another file of the same length and times.
        let other = dir.path().join("other.tmp");
        write(&other, "DDDD");
        std::fs::File::options()
            .write(true)
            .open(&other)
            .expect("open")
            .set_modified(mtime)
            .expect("set mtime");
        std::fs::rename(&other, &file).expect("rename");
        assert_eq!(store.unchanged_sync("env"), None);
        assert_eq!(served(&store), value("DDDD"));
    }
}
