//! Loading a configuration's `plugins:` into a snapshot: read each file,
//! check its sha256, compile and link it, and start one instance (the
//! canary) before the snapshot is accepted. A plugin that is configured
//! either runs or the configuration is refused, with the plugin's name,
//! its file and the reason; the running snapshot keeps serving.
//!
//! A plugin that is unchanged by a reload (same module, configuration,
//! environment and settings) is carried over as it is, instances and all,
//! so a reload drops no flow's context. A changed one is started anew but
//! keeps its name's shared data, queues and metrics.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use sluice_api::Config;

use super::engine;
use super::filter::{FailurePolicy, Plugin};
use super::shared::{PluginMetrics, SharedData, SharedQueues};
use super::state::PluginLimits;
use super::vm::PluginCode;

/// A plugin that could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("plugin `{name}` ({}): {reason}", path.display())]
pub struct PluginLoadError {
    pub name: String,
    pub path: PathBuf,
    pub reason: String,
}

/// The plugins of one snapshot, by name.
#[derive(Debug, Default, Clone)]
pub struct PluginSet {
    plugins: Vec<Arc<Plugin>>,
}

/// What makes two declarations of a plugin the same plugin.
fn identity(sha256: &str, config: &[u8], p: &sluice_api::Plugin, ca: Option<&[u8]>) -> String {
    format!(
        "{sha256}|{}|{:?}|{}|{:?}|{}|{:?}|{:?}|{}|{:?}|{}|{:?}|{}",
        String::from_utf8_lossy(config),
        p.env,
        p.data,
        p.failure,
        p.http,
        p.root_id,
        p.deadline,
        p.max_memory,
        p.upstreams,
        p.max_body,
        (p.max_pairs, p.max_value),
        ca.map_or_else(String::new, engine::hex_sha256),
    )
}

/// Plugins loaded so far, by name, for reuse across snapshots.
static LOADED: Mutex<Vec<(String, Weak<Plugin>)>> = Mutex::new(Vec::new());

impl PluginSet {
    /// Loads and starts every plugin `config` declares.
    pub fn load(config: &Config) -> Result<Self, PluginLoadError> {
        let base = config_dir(config);
        let cache = if config.plugins.is_empty() {
            None
        } else {
            cache_dir(&config.bootstrap.plugin_cache)
        };
        let mut plugins = Vec::with_capacity(config.plugins.len());
        // Read at each load, so a renewed CA file is taken up by a reload.
        let ca = match &config.bootstrap.plugin_ca {
            Some(ca) if !config.plugins.is_empty() => {
                let path = match &base {
                    Some(dir) if ca.is_relative() => dir.join(ca),
                    _ => ca.clone(),
                };
                let pem = std::fs::read(&path).map_err(|e| PluginLoadError {
                    name: config.plugins.first().map(|p| p.name.clone()).unwrap_or_default(),
                    path: path.clone(),
                    reason: format!("runtime.plugin_ca: cannot read the CA file: {e}"),
                })?;
                Some(pem)
            }
            _ => None,
        };
        for p in &config.plugins {
            plugins.push(load_one(p, base.as_deref(), cache.as_ref(), ca.as_deref())?);
        }
        Ok(Self { plugins })
    }

    /// The plugin named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Plugin>> {
        self.plugins.iter().find(|p| p.name() == name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Plugin>> {
        self.plugins.iter()
    }
}

/// The on-disk cache of compiled modules, as configured; `None` (with a
/// warning saying why) when it cannot be used: plugins are then compiled
/// at every start.
fn cache_dir(setting: &sluice_api::PluginCache) -> Option<crate::sys::TrustedDir> {
    let dir = match setting {
        sluice_api::PluginCache::Off => return None,
        sluice_api::PluginCache::Dir(d) => d.clone(),
        sluice_api::PluginCache::Default => {
            let base = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
            base.join("sluice").join("plugins")
        }
    };
    match crate::sys::TrustedDir::open(&dir) {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "the plugin cache cannot be used; plugins are compiled at every start");
            None
        }
    }
}

/// The directory relative plugin paths are read from: the configuration
/// file's own (none for the embedded default: the working directory).
fn config_dir(config: &Config) -> Option<PathBuf> {
    if config.source == sluice_api::config::EMBEDDED_DEFAULT_NAME {
        return None;
    }
    Path::new(&config.source).parent().map(Path::to_path_buf)
}

fn load_one(
    p: &sluice_api::Plugin,
    base: Option<&Path>,
    cache: Option<&crate::sys::TrustedDir>,
    ca: Option<&[u8]>,
) -> Result<Arc<Plugin>, PluginLoadError> {
    let path = match base {
        Some(dir) if p.path.is_relative() => dir.join(&p.path),
        _ => p.path.clone(),
    };
    let fail = |reason: String| PluginLoadError {
        name: p.name.clone(),
        path: path.clone(),
        reason,
    };
    let wasm = std::fs::read(&path).map_err(|e| fail(format!("cannot read the module: {e}")))?;
    let config = match &p.config {
        None => Vec::new(),
        Some(serde_json::Value::String(s)) => s.as_bytes().to_vec(),
        Some(v) => v.to_string().into_bytes(),
    };
    let sha256 = engine::hex_sha256(&wasm);
    let id = identity(&sha256, &config, p, ca);
    let mut loaded = LOADED.lock().unwrap_or_else(PoisonError::into_inner);
    loaded.retain(|(_, w)| w.strong_count() > 0);
    let previous = loaded.iter().find(|(n, _)| *n == p.name).and_then(|(_, w)| w.upgrade());
    if let Some(prev) = &previous
        && prev.identity == id
        // A plugin that failed for good is started afresh by a reload.
        && !prev.is_broken()
    {
        return Ok(prev.clone());
    }
    let engine = engine::shared().map_err(|e| fail(format!("the WASM engine cannot start: {e}")))?;
    let module = engine
        .compile_cached(&wasm, p.sha256.as_deref(), cache)
        .map_err(|e| fail(e.to_string()))?;
    let (shared, queues, metrics) = match &previous {
        Some(prev) => (
            prev.code.shared.clone(),
            prev.code.queues.clone(),
            prev.code.metrics.clone(),
        ),
        None => (
            Arc::new(SharedData::default()),
            Arc::new(SharedQueues::default()),
            Arc::new(PluginMetrics::default()),
        ),
    };
    let code = PluginCode::link(
        &engine,
        &p.name,
        &module,
        config,
        p.env.clone(),
        PluginLimits {
            max_memory: usize::try_from(p.max_memory).unwrap_or(usize::MAX),
            deadline: p.deadline,
            pairs: super::abi::PairsLimits {
                max_pairs: p.max_pairs,
                max_bytes: usize::try_from(p.max_value).unwrap_or(usize::MAX),
            },
            max_value: usize::try_from(p.max_value).unwrap_or(usize::MAX),
        },
        shared,
        queues,
        metrics,
    )
    .map_err(|e| fail(e.to_string()))?;
    let mut code = code;
    if let Some(root) = &p.root_id {
        code.root_id = Arc::from(root.as_str());
    }
    code.upstreams = Arc::new(super::callout::Upstream::declared(&p.upstreams, ca).map_err(|e| fail(e.to_string()))?);
    let failure = match p.failure {
        sluice_api::PluginFailure::Closed => FailurePolicy::Closed,
        sluice_api::PluginFailure::Open => FailurePolicy::Open,
        sluice_api::PluginFailure::Reload => FailurePolicy::Reload,
    };
    let slots = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
    let mut plugin = Plugin::start(code, failure, p.data, slots, id, p.http).map_err(|e| fail(e.to_string()))?;
    plugin.max_body = usize::try_from(p.max_body).unwrap_or(usize::MAX);
    let plugin = Arc::new(plugin);
    super::filter::spawn_ticker(&plugin);
    loaded.retain(|(n, _)| *n != p.name);
    loaded.push((p.name.clone(), Arc::downgrade(&plugin)));
    Ok(plugin)
}

/// Every loaded plugin's metrics, by plugin name, for `/metrics`.
pub fn all_metrics() -> HashMap<String, Vec<super::shared::Metric>> {
    LOADED
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter_map(|(n, w)| w.upgrade().map(|p| (n.clone(), p.code.metrics.all())))
        .collect()
}
