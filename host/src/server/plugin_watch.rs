//! Hot reload of the plugin directory: adding, replacing or removing a
//! `.wasm` takes effect without a restart.
//!
//! Every watch interval the directory is listed and each file hashed; a new
//! or changed file is compiled and checked off the request path (a blocking
//! task), then every flag file is checked against the candidate plugin set.
//! Only if all of that passes is the set swapped in (atomically: flag sets
//! already built keep the plugin versions they were bound to, so evaluations
//! in flight finish on them) and every environment reloaded. A file that
//! fails to load is refused and the previous version keeps serving; a
//! removed plugin that flags still use stays loaded, and that is reported.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::environments::Environments;
use crate::plugins::{PluginRuntime, PluginSet, RefusedFile, ReloadReport};
use crate::store::DirStore;

/// What the watcher remembers between looks.
#[derive(Default)]
struct Seen {
    /// Files refused, by name and digest, with why: not retried until they
    /// change (replace the file again to retry).
    refused: HashMap<(String, String), String>,
    /// Plugins whose file is gone but which flags still use.
    kept: HashSet<String>,
    /// Files over the size limit already logged, by name and size.
    oversized: HashSet<(String, u64)>,
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
        let mut kept: Vec<String> = self.kept.iter().cloned().collect();
        kept.sort();
        ReloadReport {
            refused,
            kept_after_removal: kept,
        }
    }
}

/// Watches `dir` every `interval` until aborted.
pub async fn watch(
    runtime: Arc<PluginRuntime>,
    dir: PathBuf,
    store: Arc<DirStore>,
    environments: Arc<Environments>,
    interval: Duration,
) {
    let mut seen = Seen::default();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        look(&runtime, &dir, &store, &environments, &mut seen).await;
    }
}

/// A plugin file as read.
struct File {
    /// Hex SHA-256, as [`crate::plugins::Plugin::digest`] gives it.
    digest: String,
    bytes: Vec<u8>,
}

/// The `*.wasm` files in `dir`, by plugin name, read and hashed (blocking
/// work: run off the async workers). A file over the size limit is left out,
/// and logged once per size.
fn files(
    dir: &Path,
    runtime: &PluginRuntime,
    oversized: &mut HashSet<(String, u64)>,
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
        match runtime.read_component(name, &path) {
            Ok(bytes) => {
                let digest = format!("{:x}", Sha256::digest(&bytes));
                files.insert(name.to_owned(), File { digest, bytes });
            }
            Err(e @ crate::plugins::PluginError::Invalid { .. }) => {
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
    Ok(files)
}

async fn look(
    runtime: &Arc<PluginRuntime>,
    dir: &Path,
    store: &Arc<DirStore>,
    environments: &Arc<Environments>,
    seen: &mut Seen,
) {
    let dir_owned = dir.to_path_buf();
    let (reader, mut oversized) = (runtime.clone(), std::mem::take(&mut seen.oversized));
    let listed = tokio::task::spawn_blocking(move || {
        let files = files(&dir_owned, &reader, &mut oversized);
        (files, oversized)
    })
    .await;
    let Ok((files, oversized)) = listed else {
        return;
    };
    seen.oversized = oversized;
    let files = match files {
        Ok(files) => files,
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "cannot list the plugin directory; plugins unchanged");
            return;
        }
    };
    // Refusals of files no longer on disk are forgotten.
    seen.refused
        .retain(|(name, digest), _| files.get(name).is_some_and(|f| &f.digest == digest));
    let current = store.plugins().current();
    let mut candidate = PluginSet::clone(&current);
    let mut changes = Vec::new();
    for (name, file) in files.iter() {
        let digest = file.digest.clone();
        if current.get(name).is_some_and(|p| p.digest() == digest)
            || seen.refused.contains_key(&(name.clone(), digest.clone()))
        {
            continue;
        }
        let (runtime, plugin_name, bytes) = (runtime.clone(), name.clone(), file.bytes.clone());
        let loaded = tokio::task::spawn_blocking(move || runtime.load(&plugin_name, &bytes)).await;
        match loaded {
            Ok(Ok(plugin)) => {
                let what = if current.get(name).is_some() {
                    "replaced"
                } else {
                    "added"
                };
                changes.push(format!("{name} {what} (digest {digest})"));
                candidate.insert(plugin);
            }
            Ok(Err(e)) => {
                warn!(plugin = %name, digest = %digest, error = %e,
                      "plugin file refused; the previous version (if any) keeps serving");
                seen.refused.insert((name.clone(), digest), e.to_string());
            }
            Err(_) => {
                // The compile panicked: remember it, or it would run every look.
                seen.refused
                    .insert((name.clone(), digest), "loading it panicked".into());
            }
        }
    }
    let removed: Vec<String> = current
        .iter()
        .map(|p| p.name().to_owned())
        .filter(|name| !files.contains_key(name))
        .collect();
    for name in &removed {
        if !seen.kept.contains(name) {
            candidate.remove(name);
            changes.push(format!("{name} removed"));
        }
    }
    if changes.is_empty() {
        store.plugins().set_report(seen.report());
        return;
    }

    // Only problems the change brings count: a flag file broken on its own
    // (or caught half-written) must not get a good plugin refused.
    let before = check_flags(store, environments, &current).await;
    let new_problems = |problems: Vec<String>| -> Vec<String> {
        problems
            .into_iter()
            .filter(|p| !before.contains(p))
            .collect()
    };
    let mut problems = new_problems(check_flags(store, environments, &candidate).await);
    // A removed plugin that flags use stays loaded.
    let needed: Vec<&String> = removed
        .iter()
        .filter(|name| {
            let missing = format!("plugin {name:?} is not loaded");
            problems.iter().any(|p| p.contains(&missing))
        })
        .collect();
    if !needed.is_empty() {
        for name in needed {
            if let Some(plugin) = current.get(name) {
                candidate.insert(plugin.clone());
                changes.retain(|c| c != &format!("{name} removed"));
                if seen.kept.insert(name.clone()) {
                    warn!(plugin = %name, "plugin file removed but flags still use it: the loaded copy keeps serving");
                }
            }
        }
        problems = new_problems(check_flags(store, environments, &candidate).await);
    }
    if !problems.is_empty() {
        warn!(changes = ?changes, problems = ?problems,
              "plugin change refused: flag files would not load with it; the previous plugins keep serving");
        for (name, file) in &files {
            if current.get(name).is_none_or(|p| p.digest() != file.digest) {
                seen.refused
                    .insert((name.clone(), file.digest.clone()), problems.join("; "));
            }
        }
        store.plugins().set_report(seen.report());
        return;
    }
    seen.kept
        .retain(|name| !files.contains_key(name) && candidate.get(name).is_some());
    store.plugins().set_report(seen.report());
    if changes.is_empty() {
        return;
    }
    store.plugins().replace(candidate);
    info!(changes = ?changes, "plugins changed; reloading flag sets");
    environments.reload_all().await;
}

/// Every problem flag files would have with `candidate`.
async fn check_flags(
    store: &Arc<DirStore>,
    environments: &Arc<Environments>,
    candidate: &PluginSet,
) -> Vec<String> {
    let names = match environments.store().environments().await {
        Ok(names) => names,
        Err(e) => return vec![e.to_string()],
    };
    names
        .iter()
        .filter_map(|env| store.check_with(env, candidate).err())
        .map(|e| e.to_string())
        .collect()
}
