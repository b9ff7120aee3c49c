//! The plugins in force: a [`PluginSet`] per plugin directory, swapped whole
//! in the [`PluginRegistry`], and the binding of flags' `plugin` rules to them.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value as Json;

use super::rule::PluginRule;
use super::{Plugin, PluginError};
use crate::rules::TargetingRule;
use crate::rules::{BindError, RuleBinder};

/// Whether `name` can name a plugin: it is the stem of its file, so up to
/// 64 letters, digits, `_`, `-` and `.`, not starting with `.`.
pub fn valid_plugin_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The plugins of one plugin directory, by name.
#[derive(Default, Clone)]
pub struct PluginSet {
    pub(super) plugins: HashMap<String, Arc<Plugin>>,
}

impl PluginSet {
    /// The plugin called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Plugin>> {
        self.plugins.get(name)
    }

    /// Every plugin, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Plugin>> {
        let mut all: Vec<_> = self.plugins.values().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all.into_iter()
    }

    /// How many plugins there are.
    pub fn len(&self) -> usize {
        self.plugins.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }

    /// Adds (or replaces) a plugin.
    pub fn insert(&mut self, plugin: Arc<Plugin>) {
        self.plugins.insert(plugin.name.clone(), plugin);
    }

    /// Removes a plugin.
    pub fn remove(&mut self, name: &str) -> Option<Arc<Plugin>> {
        self.plugins.remove(name)
    }
}

/// The plugins in force, shared by the flag store, the shared cache and the
/// admin API, and replaced whole when the plugin directory changes. A flag
/// set already built keeps the plugins it was bound to: evaluations in
/// flight finish on the version they started with.
#[derive(Clone, Default)]
pub struct PluginRegistry {
    current: Arc<arc_swap::ArcSwap<PluginSet>>,
    generation: Arc<AtomicU64>,
    report: Arc<std::sync::Mutex<ReloadReport>>,
    reloads: Arc<crate::metrics::Reloads>,
}

/// What the last looks at the plugin directory could not apply, for the
/// admin listing.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReloadReport {
    /// Files refused (they do not load, or flag files would not load with
    /// them), with why; the previous version keeps serving.
    pub refused: Vec<RefusedFile>,
    /// Plugins whose file was removed while flags use them: the loaded copy
    /// keeps serving.
    pub kept_after_removal: Vec<String>,
}

/// A plugin file that was refused.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RefusedFile {
    /// The plugin.
    pub name: String,
    /// The file's SHA-256.
    pub digest: String,
    /// Why.
    pub reason: String,
}

impl PluginRegistry {
    /// A registry holding `set`.
    pub fn new(set: PluginSet) -> Self {
        Self {
            current: Arc::new(arc_swap::ArcSwap::from_pointee(set)),
            generation: Arc::new(AtomicU64::new(0)),
            report: Arc::default(),
            reloads: Arc::default(),
        }
    }

    /// Plugin changes put in force and refused (directory and uploads).
    pub fn reloads(&self) -> &crate::metrics::Reloads {
        &self.reloads
    }

    /// What the directory watcher could not apply.
    pub fn report(&self) -> ReloadReport {
        self.report
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the watcher's report.
    pub fn set_report(&self, report: ReloadReport) {
        *self
            .report
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = report;
    }

    /// The plugins now.
    pub fn current(&self) -> Arc<PluginSet> {
        self.current.load_full()
    }

    /// Counts replacements: flag files parsed under another generation are
    /// parsed (and their plugin configurations checked) again.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Puts `set` in force.
    pub fn replace(&self, set: PluginSet) {
        self.current.store(Arc::new(set));
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

impl From<PluginSet> for PluginRegistry {
    fn from(set: PluginSet) -> Self {
        Self::new(set)
    }
}

impl RuleBinder for PluginRegistry {
    fn bind(
        &self,
        flag_key: &str,
        variants: &[String],
        plugin: &str,
        config: &Json,
    ) -> Result<Arc<dyn TargetingRule>, BindError> {
        self.current.load().bind(flag_key, variants, plugin, config)
    }
}

impl RuleBinder for PluginSet {
    fn bind(
        &self,
        flag_key: &str,
        variants: &[String],
        plugin: &str,
        config: &Json,
    ) -> Result<Arc<dyn TargetingRule>, BindError> {
        let Some(plugin) = self.plugins.get(plugin) else {
            let mut loaded: Vec<String> = self.plugins.keys().cloned().collect();
            loaded.sort();
            return Err(BindError::NotLoaded {
                plugin: plugin.to_owned(),
                loaded,
            });
        };
        let config = config.to_string();
        plugin
            .check_config(flag_key, variants, &config)
            .map_err(|e| {
                BindError::Refused(match e {
                    PluginError::Guest { plugin, message } => {
                        format!("plugin {plugin} refused the configuration: {message}")
                    }
                    other => other.to_string(),
                })
            })?;
        Ok(Arc::new(PluginRule {
            id: super::next_id(),
            seed: plugin.seed_for(flag_key),
            plugin: plugin.clone(),
            flag_key: flag_key.to_owned(),
            variants: variants.to_vec(),
            config,
        }))
    }
}
