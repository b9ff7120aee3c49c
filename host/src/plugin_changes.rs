//! Changes to the plugins in force, from the plugin directory's watcher and
//! from the admin API: one at a time, each checked the same way before it
//! takes effect.
//!
//! A change builds a candidate plugin set: new components are compiled and
//! checked against the contract off the request path (blocking tasks), then
//! every flag file is checked against the candidate. Only problems the
//! change brings count: a flag file broken on its own (or caught
//! half-written) must not get a good plugin refused. If all of that passes,
//! the set is swapped in atomically (flag sets already built keep the plugin
//! versions they were bound to, so evaluations in flight finish on them) and
//! every environment is reloaded. Every change is logged with what changed.
//!
//! The plugin directory stays the one source of truth: an upload is written
//! into it (so it survives a restart, and the watcher finds nothing new) and
//! a deletion removes the file. A plugin whose file is removed while flags
//! still use it stays loaded, and is reported, until no flag uses it.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{info, warn};

use crate::environments::Environments;
use crate::flags::Problem;
use crate::plugins::{
    Plugin, PluginError, PluginRegistry, PluginRuntime, PluginSet, RefusedFile, ReloadReport,
    valid_plugin_name,
};
use crate::sha256_hex;
use crate::store::{DirStore, FlagFiles, Stamp, StoreError};

/// Why a change asked through the admin API was not made. Nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// Not a name a plugin file can have.
    #[error(
        "invalid plugin name {0:?}: use up to 64 letters, digits, '_', '-' and '.', not starting with '.'"
    )]
    InvalidName(String),
    /// No plugin of that name, loaded or on disk.
    #[error("no plugin {0:?} is loaded or in the plugin directory")]
    NotFound(String),
    /// The component does not load (not a component, another contract...).
    #[error("{0}")]
    Refused(PluginError),
    /// Flag files would not load with the new version.
    #[error("flag files would not load with this version of plugin {plugin}: {}", problems.join("; "))]
    FlagsRefuse {
        /// The plugin.
        plugin: String,
        /// What the flag files' check says.
        problems: Vec<String>,
    },
    /// Flags use the plugin.
    #[error("plugin {plugin} is in use; change the flags that use it first: {}", problems.join("; "))]
    InUse {
        /// The plugin.
        plugin: String,
        /// What the flag files' check says without it.
        problems: Vec<String>,
    },
    /// Compiling or checking failed inside flaghost (a panic): not the
    /// caller's fault.
    #[error("{0}")]
    Internal(String),
    /// The plugin directory could not be written.
    #[error("cannot write the plugin directory ({path}): {reason}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        reason: String,
    },
}

/// What an upload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Upload {
    /// A new plugin.
    Added,
    /// A new version of a loaded plugin.
    Replaced,
    /// The same bytes as the loaded version: nothing to do.
    Unchanged,
}

/// What the watcher remembers between looks.
#[derive(Default)]
struct Seen {
    /// Files refused, by name and digest, with why: not retried until they
    /// change (replace the file again to retry).
    refused: HashMap<(String, String), String>,
    /// Plugins whose file is gone but which flags still use, with the state
    /// of the flag files when that was found: looked at again once they
    /// change.
    kept: HashMap<String, FlagFiles>,
    /// Files over the size limit already logged, by name and size.
    oversized: HashSet<(String, u64)>,
    /// Each file's stamp when it was last read, with the digest of what
    /// was read. NB: a look read and hashed every component every second,
    /// the 18 MB Python and 12 MB JavaScript examples: about 16 ms of CPU a
    /// second at rest (`sha256sum` of the two: 157 ms for ten passes).
    stamps: HashMap<String, (Stamp, String)>,
}

impl Seen {
    fn report(&self) -> ReloadReport {
        // NB: `refused` holds only files on disk (trimmed at every look).
        let mut refused: Vec<RefusedFile> = self
            .refused
            .iter()
            .map(|((name, digest), reason)| RefusedFile {
                name: name.clone(),
                digest: digest.clone(),
                reason: reason.clone(),
            })
            .collect();
        refused.sort_by(|a, b| a.name.cmp(&b.name));
        let mut kept: Vec<String> = self.kept.keys().cloned().collect();
        kept.sort();
        ReloadReport {
            refused,
            kept_after_removal: kept,
        }
    }

    /// Forgets what it knew about plugin `name`: its file was just written
    /// or deleted through the admin API.
    fn forget(&mut self, name: &str) {
        self.refused.retain(|(refused, _), _| refused != name);
        self.kept.remove(name);
    }
}

/// The one way the plugins in force change.
pub struct PluginChanges {
    runtime: Arc<PluginRuntime>,
    dir: PathBuf,
    store: Arc<DirStore>,
    environments: Arc<Environments>,
    /// Held for the whole of a change: changes happen one at a time.
    seen: tokio::sync::Mutex<Seen>,
}

/// A plugin file as listed.
struct File {
    /// Hex SHA-256, as [`Plugin::digest`] gives it.
    digest: String,
    /// Its bytes, unless its stamp showed it unchanged since a look read
    /// it: then it is not read again.
    bytes: Option<Arc<[u8]>>,
}

/// Why a component could not be compiled.
enum Compile {
    /// It is not one flaghost can run.
    Refused(PluginError),
    /// flaghost failed (the compiler panicked, or its process could not be
    /// run): not the component's fault.
    Failed(String),
}

/// Problems of flag files, by file and flag (`None`: the file as a whole).
type Problems = HashMap<(String, Option<String>), Problem>;

/// The problems in `after` that `before` does not have, with their files.
/// Compared by file and flag, not by message: a flag already refused (its
/// message may list the plugins loaded, which the change alters) is not a
/// problem the change brings.
fn new_problems(before: &Problems, after: Problems) -> Vec<(String, Problem)> {
    let mut new: Vec<(String, Problem)> = after
        .into_iter()
        .filter(|(at, _)| !before.contains_key(at))
        .map(|((file, _), problem)| (file, problem))
        .collect();
    new.sort_by(|a, b| (&a.0, &a.1.flag).cmp(&(&b.0, &b.1.flag)));
    new
}

/// Problems in words: `file: flag "f": reason`.
fn in_words(problems: &[(String, Problem)]) -> Vec<String> {
    problems
        .iter()
        .map(|(file, problem)| format!("{file}: {problem}"))
        .collect()
}

impl PluginChanges {
    /// Changes to the plugins of `dir`, which `store`'s flag files bind to.
    pub fn new(
        runtime: Arc<PluginRuntime>,
        dir: PathBuf,
        store: Arc<DirStore>,
        environments: Arc<Environments>,
    ) -> Self {
        Self {
            runtime,
            dir,
            store,
            environments,
            seen: tokio::sync::Mutex::default(),
        }
    }

    /// The largest component accepted.
    pub fn max_file_bytes(&self) -> usize {
        self.runtime.limits().max_component_bytes
    }

    fn registry(&self) -> &PluginRegistry {
        self.store.plugins()
    }

    /// Uploads `bytes` as plugin `name`: compiled and checked (the component,
    /// then every flag file against it) before it is written to the plugin
    /// directory and put in force. Refused with nothing changed otherwise.
    pub async fn put(
        &self,
        name: &str,
        bytes: Arc<[u8]>,
    ) -> Result<(Upload, Arc<Plugin>), ChangeError> {
        if !valid_plugin_name(name) {
            return Err(ChangeError::InvalidName(name.to_owned()));
        }
        let path = self.path(name);
        let digest = sha256_hex(&bytes);
        // NB: compiled before the lock is taken: a plugin that is slow to
        // compile (up to the compile bound) holds up no other change. Only
        // checking the flag files and swapping the set are one at a time.
        let unchanged = |set: &PluginSet| set.get(name).is_some_and(|p| p.digest() == digest);
        let compiled = if unchanged(&self.registry().current()) {
            None
        } else {
            Some(self.compile(name, bytes.clone()).await)
        };
        let mut seen = self.seen.lock().await;
        let current = self.registry().current();
        if let Some(loaded) = current.get(name).filter(|_| unchanged(&current)) {
            // NB: the file may be gone (kept after removal) or hold a refused
            // version: the upload puts the loaded one back on disk.
            if self.on_disk(name).await.map(|b| sha256_hex(&b)).as_deref() != Some(digest.as_str())
            {
                write_atomically(&self.dir, &path, bytes).await?;
                info!(plugin = %name, digest = %digest, "plugin file restored through the admin API");
            }
            seen.forget(name);
            self.registry().set_report(seen.report());
            return Ok((Upload::Unchanged, loaded.clone()));
        }
        // (Compiled under the lock only if another change replaced these
        // very bytes while this one waited.)
        let compiled = match compiled {
            Some(compiled) => compiled,
            None => self.compile(name, bytes.clone()).await,
        };
        let plugin = match compiled {
            Ok(plugin) => plugin,
            Err(Compile::Refused(e)) => {
                self.registry().reloads().refused();
                warn!(plugin = %name, digest = %digest, error = %e, "plugin upload refused");
                return Err(ChangeError::Refused(e));
            }
            Err(Compile::Failed(why)) => return Err(ChangeError::Internal(why)),
        };
        let mut candidate = PluginSet::clone(&current);
        candidate.insert(plugin.clone());
        let problems = self.problems_brought(&current, &candidate).await;
        if !problems.is_empty() {
            self.registry().reloads().refused();
            warn!(plugin = %name, digest = %digest, problems = ?problems,
                  "plugin upload refused: flag files would not load with it");
            return Err(ChangeError::FlagsRefuse {
                plugin: name.to_owned(),
                problems,
            });
        }
        write_atomically(&self.dir, &path, bytes).await?;
        seen.forget(name);
        self.registry().set_report(seen.report());
        let (upload, change) = match current.get(name) {
            Some(previous) => (
                Upload::Replaced,
                format!(
                    "{name} replaced through the admin API (digest {} -> {digest}, {} bytes)",
                    previous.digest(),
                    plugin.size()
                ),
            ),
            None => (
                Upload::Added,
                format!(
                    "{name} added through the admin API (digest {digest}, {} bytes)",
                    plugin.size()
                ),
            ),
        };
        self.apply(candidate, vec![change]).await;
        Ok((upload, plugin))
    }

    /// Removes plugin `name`: unloaded and its file deleted, unless flags
    /// use it (then nothing changes). Returns the plugin unloaded, if it was
    /// loaded (a refused file is only deleted).
    pub async fn delete(&self, name: &str) -> Result<Option<Arc<Plugin>>, ChangeError> {
        if !valid_plugin_name(name) {
            return Err(ChangeError::InvalidName(name.to_owned()));
        }
        let mut seen = self.seen.lock().await;
        let current = self.registry().current();
        let path = self.path(name);
        let loaded = current.get(name).cloned();
        if loaded.is_none() && !path.exists() {
            return Err(ChangeError::NotFound(name.to_owned()));
        }
        let mut candidate = PluginSet::clone(&current);
        if loaded.is_some() {
            candidate.remove(name);
            let problems = self.problems_brought(&current, &candidate).await;
            if !problems.is_empty() {
                info!(plugin = %name, problems = ?problems, "plugin deletion refused: flags use it");
                return Err(ChangeError::InUse {
                    plugin: name.to_owned(),
                    problems,
                });
            }
        }
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(ChangeError::Io {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                });
            }
        }
        seen.forget(name);
        self.registry().set_report(seen.report());
        match &loaded {
            Some(plugin) => {
                let change = format!(
                    "{name} removed through the admin API (digest {})",
                    plugin.digest()
                );
                self.apply(candidate, vec![change]).await;
            }
            None => info!(plugin = %name, "refused plugin file deleted through the admin API"),
        }
        Ok(loaded)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.wasm"))
    }

    /// Compiles and checks a component, off the async workers.
    async fn compile(&self, name: &str, bytes: Arc<[u8]>) -> Result<Arc<Plugin>, Compile> {
        let (runtime, plugin_name) = (self.runtime.clone(), name.to_owned());
        match tokio::task::spawn_blocking(move || runtime.load(&plugin_name, &bytes)).await {
            Ok(Ok(plugin)) => Ok(plugin),
            Ok(Err(e @ PluginError::Compiler { .. })) => Err(Compile::Failed(e.to_string())),
            Ok(Err(e)) => Err(Compile::Refused(e)),
            Err(_) => Err(Compile::Failed(format!(
                "compiling plugin {name} panicked; see the logs"
            ))),
        }
    }

    /// Puts `candidate` in force and reloads every environment on it.
    async fn apply(&self, candidate: PluginSet, changes: Vec<String>) {
        self.registry().replace(candidate);
        self.registry().reloads().accepted();
        info!(changes = ?changes, "plugins changed; reloading flag sets");
        self.environments.reload_all().await;
    }

    /// The problems flag files would have with `candidate` that they do not
    /// have with `current`.
    async fn problems_brought(&self, current: &PluginSet, candidate: &PluginSet) -> Vec<String> {
        let before = self.check_flags(current).await;
        in_words(&new_problems(&before, self.check_flags(candidate).await))
    }

    /// Every problem flag files would have with `candidate`, by file and
    /// flag. Blocking work (every file parsed, every plugin configuration
    /// checked in its plugin): run off the async workers.
    async fn check_flags(&self, candidate: &PluginSet) -> Problems {
        let (store, candidate) = (self.store.clone(), candidate.clone());
        let checked = tokio::task::spawn_blocking(move || {
            let mut problems = Problems::new();
            let environments = match store.environments_sync() {
                Ok(names) => names,
                Err(e) => {
                    problems.insert(
                        ("flag directory".into(), None),
                        Problem::new(None, e.to_string()),
                    );
                    return problems;
                }
            };
            for env in environments {
                match store.check_with(&env, &candidate) {
                    Ok(()) => {}
                    Err(StoreError::Invalid(e)) => {
                        for p in e.problems {
                            problems.insert((e.file.clone(), p.flag.clone()), p);
                        }
                    }
                    Err(other) => {
                        problems.insert((env, None), Problem::new(None, other.to_string()));
                    }
                }
            }
            problems
        })
        .await;
        checked.unwrap_or_else(|_| {
            Problems::from([(
                ("flag files".into(), None),
                Problem::new(None, "checking them panicked; see the logs".into()),
            )])
        })
    }

    /// One look at the plugin directory: applies what changed in it.
    ///
    /// The files that changed are compiled side by side, without the lock:
    /// uploads go on meanwhile. The lock is taken again to decide, against
    /// the plugins in force by then.
    pub async fn look(&self) {
        let Some(files) = self.list().await else {
            return;
        };
        let to_compile: Vec<(&String, &File)> = {
            let mut seen = self.seen.lock().await;
            // Refusals of files no longer on disk are forgotten.
            seen.refused
                .retain(|(name, digest), _| files.get(name).is_some_and(|f| &f.digest == digest));
            let current = self.registry().current();
            files
                .iter()
                .filter(|(name, file)| {
                    current.get(name).is_none_or(|p| p.digest() != file.digest)
                        && !seen
                            .refused
                            .contains_key(&((*name).clone(), file.digest.clone()))
                })
                .collect()
        };
        let compiled =
            futures_util::future::join_all(to_compile.iter().map(|&(name, file)| async move {
                match &file.bytes {
                    Some(bytes) => self.compile(name, bytes.clone()).await,
                    // NB: listed unchanged but not loaded (a compile that failed
                    // for flaghost's reasons is retried): read now. Bytes that
                    // are no longer these are left to the next look.
                    None => match self.on_disk(name).await {
                        Some(bytes) if sha256_hex(&bytes) == file.digest => {
                            self.compile(name, bytes.into()).await
                        }
                        _ => Err(Compile::Failed(format!("{name} changed while it was read"))),
                    },
                }
            }))
            .await;

        let mut seen = self.seen.lock().await;
        let seen = &mut *seen;
        let current = self.registry().current();
        let mut candidate = PluginSet::clone(&current);
        let mut changes = Vec::new();
        for ((name, file), compiled) in to_compile.into_iter().zip(compiled) {
            let digest = file.digest.clone();
            // NB: an upload or a deletion through the admin API may have
            // come first while this compiled (or before the listing was
            // taken): what is on disk now wins, so a file that no longer
            // holds these bytes is left to the next look.
            if current.get(name).is_some_and(|p| p.digest() == digest)
                || self.on_disk(name).await.map(|b| sha256_hex(&b)).as_deref()
                    != Some(digest.as_str())
            {
                continue;
            }
            match compiled {
                Ok(plugin) => {
                    changes.push(match current.get(name) {
                        Some(previous) => {
                            format!("{name} replaced (digest {} -> {digest})", previous.digest())
                        }
                        None => format!("{name} added (digest {digest})"),
                    });
                    candidate.insert(plugin);
                }
                Err(Compile::Refused(e)) => {
                    self.registry().reloads().refused();
                    warn!(plugin = %name, digest = %digest, error = %e,
                          "plugin file refused; the previous version (if any) keeps serving");
                    seen.refused.insert((name.clone(), digest), e.to_string());
                }
                Err(Compile::Failed(why)) => {
                    // NB: not remembered as a refusal: flaghost's failure
                    // (no process could be started, a compile out of
                    // wall-clock time on a busy machine), not the file's;
                    // the next look tries again.
                    warn!(plugin = %name, digest = %digest, error = %why,
                          "compiling a plugin file failed inside flaghost; trying again at the next look");
                }
            }
        }
        // A plugin whose file is gone is unloaded, unless flags use it: one
        // kept for that is looked at again once the flag files change.
        seen.kept.retain(|name, _| !files.contains_key(name));
        let flag_files = if seen.kept.is_empty() {
            None
        } else {
            Some(self.store.flag_files())
        };
        let removed: Vec<String> = current
            .iter()
            .map(|p| p.name().to_owned())
            // (A file written by an upload since the listing is not gone.)
            .filter(|name| !files.contains_key(name) && !self.path(name).exists())
            .filter(|name| {
                seen.kept
                    .get(name)
                    .is_none_or(|at| Some(at) != flag_files.as_ref())
            })
            .collect();
        for name in &removed {
            candidate.remove(name);
            let digest = current.get(name).map_or("", |p| p.digest());
            changes.push(format!("{name} removed (digest {digest})"));
        }
        if changes.is_empty() {
            self.registry().set_report(seen.report());
            return;
        }
        // NB: taken before the flag files are checked, so a flag file that
        // changes during the check is looked at again next time.
        let flag_files = match flag_files {
            Some(files) => files,
            None if !removed.is_empty() => self.store.flag_files(),
            None => FlagFiles::default(),
        };

        let before = self.check_flags(&current).await;
        let mut problems = new_problems(&before, self.check_flags(&candidate).await);
        // A removed plugin that flags use stays loaded.
        let needed: Vec<&String> = removed
            .iter()
            .filter(|name| {
                problems
                    .iter()
                    .any(|(_, p)| p.missing_plugin.as_ref() == Some(*name))
            })
            .collect();
        if !needed.is_empty() {
            for name in needed {
                if let Some(plugin) = current.get(name) {
                    candidate.insert(plugin.clone());
                    changes.retain(|c| !c.starts_with(&format!("{name} removed ")));
                    if seen.kept.insert(name.clone(), flag_files.clone()).is_none() {
                        warn!(plugin = %name, "plugin file removed but flags still use it: the loaded copy keeps serving");
                    }
                }
            }
            problems = new_problems(&before, self.check_flags(&candidate).await);
        }
        if !problems.is_empty() {
            let problems = in_words(&problems);
            self.registry().reloads().refused();
            warn!(changes = ?changes, problems = ?problems,
                  "plugin change refused: flag files would not load with it; the previous plugins keep serving");
            for (name, file) in &files {
                if current.get(name).is_none_or(|p| p.digest() != file.digest) {
                    seen.refused
                        .insert((name.clone(), file.digest.clone()), problems.join("; "));
                }
            }
            self.registry().set_report(seen.report());
            return;
        }
        seen.kept.retain(|name, _| candidate.get(name).is_some());
        self.registry().set_report(seen.report());
        if changes.is_empty() {
            return;
        }
        self.apply(candidate, changes).await;
    }

    /// The plugin directory's files, read and hashed off the async workers;
    /// Plugin `name`'s file as it is now, if it can be read and is within
    /// the size limit (a file swapped for a huge one is not read whole).
    async fn on_disk(&self, name: &str) -> Option<Vec<u8>> {
        let (runtime, path, name) = (self.runtime.clone(), self.path(name), name.to_owned());
        tokio::task::spawn_blocking(move || runtime.read_component(&name, &path).ok())
            .await
            .ok()
            .flatten()
    }

    /// `None` if it cannot be listed (logged).
    async fn list(&self) -> Option<HashMap<String, File>> {
        let (dir, reader) = (self.dir.clone(), self.runtime.clone());
        let (mut oversized, mut stamps) = {
            let mut seen = self.seen.lock().await;
            (
                std::mem::take(&mut seen.oversized),
                std::mem::take(&mut seen.stamps),
            )
        };
        let oversized_before = oversized.len();
        let listed = tokio::task::spawn_blocking(move || {
            let files = files(&dir, &reader, &mut oversized, &mut stamps);
            (files, oversized, stamps)
        })
        .await;
        let Ok((files, oversized, stamps)) = listed else {
            return None;
        };
        // A file newly refused for its size is a refused reload.
        for _ in oversized_before..oversized.len() {
            self.registry().reloads().refused();
        }
        let mut seen = self.seen.lock().await;
        seen.oversized = oversized;
        seen.stamps = stamps;
        drop(seen);
        match files {
            Ok(files) => Some(files),
            Err(e) => {
                warn!(dir = %self.dir.display(), error = %e, "cannot list the plugin directory; plugins unchanged");
                None
            }
        }
    }
}

/// The `*.wasm` files in `dir`, by plugin name, read and hashed unless
/// their stamp in `stamps` shows them unchanged (blocking work: run off the
/// async workers). A file over the size limit is left out, and logged once
/// per size.
fn files(
    dir: &Path,
    runtime: &PluginRuntime,
    oversized: &mut HashSet<(String, u64)>,
    stamps: &mut HashMap<String, (Stamp, String)>,
) -> std::io::Result<HashMap<String, File>> {
    let mut files = HashMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_none_or(|x| x != "wasm") {
            continue;
        }
        let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        // NB: stated before it is read: a change after the stat gives a
        // new stamp at the next look, so these bytes are never vouched for
        // by a later version's stamp.
        let stamp = std::fs::metadata(&path).ok().map(|m| Stamp::of(&m));
        if let (Some(stamp), Some((known, digest))) = (stamp, stamps.get(name))
            && stamp == *known
        {
            let digest = digest.clone();
            files.insert(
                name.to_owned(),
                File {
                    digest,
                    bytes: None,
                },
            );
            continue;
        }
        stamps.remove(name);
        match runtime.read_component(name, &path) {
            Ok(bytes) => {
                let digest = sha256_hex(&bytes);
                if let Some(stamp) = stamp.and_then(Stamp::settled) {
                    stamps.insert(name.to_owned(), (stamp, digest.clone()));
                }
                files.insert(
                    name.to_owned(),
                    File {
                        digest,
                        bytes: Some(bytes.into()),
                    },
                );
            }
            Err(e @ PluginError::Invalid { .. }) => {
                let size = std::fs::metadata(&path).map_or(0, |m| m.len());
                if oversized.insert((name.to_owned(), size)) {
                    warn!(plugin = name, error = %e, "plugin file refused; the previous version (if any) keeps serving");
                }
            }
            // NB: a file being written may vanish or fail to read; the next
            // look sees it whole.
            Err(e) => {
                warn!(plugin = name, error = %e, "cannot read a plugin file; skipped this time")
            }
        }
    }
    stamps.retain(|name, _| files.contains_key(name));
    Ok(files)
}

/// Writes `path` whole or not at all: a temporary file in the same
/// directory (not named `*.wasm`, so the watcher never reads it half
/// written), synced, renamed over, and the rename synced. Readable by all,
/// like a file copied in: other instances sharing the directory load it.
async fn write_atomically(dir: &Path, path: &Path, bytes: Arc<[u8]>) -> Result<(), ChangeError> {
    let (dir, path) = (dir.to_path_buf(), path.to_path_buf());
    let target = path.display().to_string();
    let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::io::Write as _;
        let mut builder = tempfile::Builder::new();
        builder.prefix(".upload-").suffix(".tmp");
        #[cfg(unix)]
        builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
        let mut file = builder.tempfile_in(&dir)?;
        file.write_all(&bytes)?;
        file.as_file().sync_all()?;
        file.persist(&path).map_err(|e| e.error)?;
        std::fs::File::open(&dir)?.sync_all()
    })
    .await
    .unwrap_or_else(|_| Err(std::io::Error::other("writing panicked")));
    written.map_err(|e| ChangeError::Io {
        path: target,
        reason: e.to_string(),
    })
}
