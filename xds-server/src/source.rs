//! Where the control server's configuration comes from: a directory of
//! `sluice.yaml`-vocabulary files (or the embedded example), checked by
//! the same validator the gateways run, and turned into the snapshot every
//! node is served.
//!
//! The directory is watched: a change that validates replaces the
//! snapshot; one that does not is logged with file:line:column and
//! counted, and the last good snapshot keeps being served.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use serde::Serialize;
use sluice_api::config::{Assembly, ResourceKind, Resources};
use sluice_api::{Config, ConfigErrors};
use tokio::sync::watch;

use crate::catalog::Catalog;
use crate::plain::Plain;
use crate::snapshot::{Resource, Snapshot, SnapshotError};
use crate::store::files::FileSet;

/// The example configuration `sluice-xds` serves when given none.
pub const EMBEDDED: [(&str, &str); 2] = [
    (
        "<embedded>/groups.yaml",
        include_str!("../../examples/xds/config/groups.yaml"),
    ),
    (
        "<embedded>/policy.yaml",
        include_str!("../../examples/xds/config/policy.yaml"),
    ),
];

/// A configuration source.
#[derive(Debug, Clone)]
pub enum Source {
    Dir(PathBuf),
    Embedded,
    /// A set of files read from a store ([`crate::store`]).
    Files(Arc<FileSet>),
}

impl Source {
    pub fn describe(&self) -> String {
        match self {
            Self::Dir(d) => d.display().to_string(),
            Self::Embedded => "the embedded example (examples/xds/config)".to_owned(),
            Self::Files(f) => f.origin.clone(),
        }
    }

    /// Loads and validates the source, plugins' code inline.
    pub fn load(&self) -> Result<Loaded, ConfigErrors> {
        self.load_with(None)
    }

    /// Loads and validates the source; with `code_url` (the base URL
    /// gateways reach this server's admin API at), plugins' code is remote.
    pub fn load_with(&self, code_url: Option<&str>) -> Result<Loaded, ConfigErrors> {
        let (loaded, plain) = match self {
            // Only `envoy/` (a directory for proxyless gRPC, say): an empty
            // `sluice.yaml` configuration beside it.
            Self::Dir(d) if crate::plain::only_envoy(d) => {
                let a = Assembly::new();
                let resources = a.resources();
                (a.build().map(|c| (c, resources)), Plain::load_dir(d))
            }
            Self::Dir(d) => {
                // Targets and plugins may name the plain listeners too.
                let plain = Plain::load_dir(d);
                let names = plain.as_ref().map(Plain::listener_names).unwrap_or_default();
                (sluice_api::config::load_dir_with(d, names), plain)
            }
            Self::Embedded => {
                let mut a = Assembly::new();
                for (name, text) in EMBEDDED {
                    a.add_file(text, name);
                }
                let resources = a.resources();
                (a.build().map(|c| (c, resources)), Ok(Plain::default()))
            }
            Self::Files(f) => f.load(),
        };
        // Every problem of both readers at once.
        let ((config, resources), plain) = match (loaded, plain) {
            (Ok(l), Ok(p)) => (l, p),
            (l, p) => {
                let mut errors = l.err().map_or_else(Vec::new, |e| e.0);
                errors.extend(p.err().into_iter().flatten().map(Into::into));
                return Err(ConfigErrors(errors));
            }
        };
        let invalid = |message: String| {
            ConfigErrors(vec![sluice_api::ConfigError {
                file: self.describe(),
                line: 0,
                column: 0,
                path: String::new(),
                kind: sluice_api::ConfigErrorKind::InvalidValue { message },
            }])
        };
        // Stock Envoy's listeners and clusters, per policy: a node a
        // target picks enforces that policy in Envoy too.
        // Plugins as ECDS resources, the same for every node.
        let read = |p: &sluice_api::Plugin| match self {
            Self::Dir(d) => crate::ecds::read_module(p, Some(d)),
            Self::Embedded => crate::ecds::read_module(p, None),
            Self::Files(f) => f.module(&p.path).map_err(|e| format!("plugin `{}`: {e}", p.name)),
        };
        let (plugins, modules) = crate::ecds::plugins_with(&config, read, code_url).map_err(invalid)?;
        let mut envoy = std::collections::BTreeMap::new();
        for p in std::iter::once(&config.policy).chain(&config.policies) {
            let mut translated = crate::envoy::translate_policy(&config, p)
                .map_err(|e| invalid(format!("translating policy `{}` for Envoy: {e}", p.name)))?;
            // The plain Envoy resources of `envoy/`, the same for every node.
            plain
                .add_to(&mut translated)
                .map_err(|e| ConfigErrors(vec![e.into()]))?;
            envoy.entry(p.name.clone()).or_insert(translated);
        }
        // Sluice gateways that take listeners over xDS get them in the
        // shapes they run; the policy reaches them as Sluice's Policy.
        let mut sluice_listeners = crate::envoy::for_sluice(&config);
        // And the plain Envoy resources, which they run as Envoy does.
        plain
            .add_for_gateways(&mut sluice_listeners)
            .map_err(|e| ConfigErrors(vec![e.into()]))?;
        let plain_listeners = plain.listener_names();
        let listener_names: Vec<&str> = config
            .listeners
            .iter()
            .map(|l| l.name.as_str())
            .chain(plain_listeners.iter().map(String::as_str))
            .collect();
        let catalog = Catalog::build(
            &resources,
            &config.policy.name,
            config.targets.clone(),
            |r, chosen, sluice| {
                let policy = r
                    .policies
                    .iter()
                    .flatten()
                    .next()
                    .map_or(config.policy.name.as_str(), |p| p.name.as_str());
                let mut extra: Vec<Resource> = if sluice {
                    sluice_listeners.clone()
                } else {
                    envoy.get(policy).cloned().unwrap_or_default()
                };
                // The listeners a target chooses (and their clusters,
                // named `<listener>/…`); resources of no listener (the
                // plain ones) stay.
                extra.retain(|r| {
                    let owner = r.name.split('/').next().unwrap_or(&r.name);
                    !listener_names.contains(&owner) || chosen.listener(owner)
                });
                // The plugins a target chooses, or every one.
                extra.extend(plugins.iter().filter(|p| chosen.plugin(&p.name)).cloned());
                snapshot(r, &extra)
            },
        )
        .map_err(|e| invalid(e.to_string()))?;
        Ok(Loaded {
            snapshot: catalog.snapshot(&config.policy.name),
            config,
            resources,
            catalog: Arc::new(catalog),
            modules: Arc::new(modules),
        })
    }
}

/// A validated configuration and what it serves.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub resources: Resources,
    /// The snapshot of nodes no target picks.
    pub snapshot: Arc<Snapshot>,
    /// Every node's snapshot.
    pub catalog: Arc<Catalog>,
    /// Plugin modules served at `/plugins/<sha256>.wasm` (with a code URL).
    pub modules: Arc<crate::ecds::Modules>,
}

fn any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

/// The snapshot of Sluice's resources, and `envoy`'s (the same policy as
/// stock Envoy's listeners and clusters, [`crate::envoy::translate`]).
/// Every Sluice type, LDS and CDS are listed even when empty, so a client
/// subscribed to one hears that there are none. Sluice gateways subscribe
/// only to Sluice's types and Envoy only to LDS and CDS, so one snapshot
/// serves both.
pub fn snapshot(r: &Resources, envoy: &[Resource]) -> Result<Snapshot, SnapshotError> {
    let mut b = ResourceKind::ALL
        .into_iter()
        .fold(Snapshot::builder(), |b, k| b.with_type(k.type_url()))
        .with_type(crate::snapshot::type_url::TYPED_EXTENSION_CONFIG)
        .with_type(crate::snapshot::type_url::LISTENER)
        .with_type(crate::snapshot::type_url::CLUSTER);
    for e in envoy {
        b.add(e.clone())?;
    }
    for g in r.webgroups.iter().flatten() {
        b.add(Resource::new(&g.name, any(g)))?;
    }
    for g in r.smartgroups.iter().flatten() {
        b.add(Resource::new(&g.name, any(g)))?;
    }
    for w in r.workloads.iter().flatten() {
        b.add(Resource::new(&w.name, any(w)))?;
    }
    for p in r.policies.iter().flatten() {
        b.add(Resource::new(&p.name, any(p)))?;
    }
    Ok(b.build())
}

/// What the server has made of its source, for the log, the admin API and
/// metrics.
#[derive(Debug, Default, Clone, Serialize)]
pub struct SourceState {
    /// Changes applied since the start (the first load included).
    pub loads: u64,
    /// Changes rejected since the start.
    pub rejections: u64,
    /// Why the last rejected change was rejected, while the source is still
    /// in that state; `None` once a change validates.
    pub last_error: Option<String>,
}

/// Watches `dir` every `every` and publishes each change that validates.
pub async fn watch_dir(
    source: Source,
    every: Duration,
    snapshots: watch::Sender<Arc<Catalog>>,
    state: Arc<Mutex<SourceState>>,
    code_url: Option<String>,
    modules: Arc<Mutex<Arc<crate::ecds::Modules>>>,
) {
    let Source::Dir(dir) = &source else {
        // Nothing to watch; the sender stays, so streams keep their
        // snapshot.
        let _keep = snapshots;
        return std::future::pending().await;
    };
    let mut last = fingerprint(dir);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = fingerprint(dir);
        if now == last {
            continue;
        }
        // Let an editor finish writing before reading.
        tokio::time::sleep(every.min(Duration::from_millis(200))).await;
        last = fingerprint(dir);
        let outcome = source.load_with(code_url.as_deref());
        publish(outcome, &dir.display().to_string(), &state, &modules, &snapshots);
    }
}

/// Serves a changed configuration that validated, or counts and logs one
/// that did not (the last good one stays): the same for every source.
/// `what` names the change in the log. True when the change is served.
pub fn publish(
    outcome: Result<Loaded, ConfigErrors>,
    what: &str,
    state: &Mutex<SourceState>,
    modules: &Mutex<Arc<crate::ecds::Modules>>,
    snapshots: &watch::Sender<Arc<Catalog>>,
) -> bool {
    let mut st = state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    match outcome {
        Ok(loaded) => {
            st.loads += 1;
            metrics::counter!("sluice_xds_config_loads_total").increment(1);
            metrics::gauge!("sluice_xds_config_rejected").set(0.0);
            st.last_error = None;
            tracing::info!("{what}: changed; serving the new configuration");
            // The new modules first: a gateway told to fetch one finds it.
            *modules.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = loaded.modules;
            snapshots.send_replace(loaded.catalog);
            true
        }
        Err(e) => {
            st.rejections += 1;
            metrics::counter!("sluice_xds_config_rejections_total").increment(1);
            metrics::gauge!("sluice_xds_config_rejected").set(1.0);
            tracing::warn!("{what}: changed but was rejected; still serving the last good configuration:\n{e}");
            st.last_error = Some(e.to_string());
            false
        }
    }
}

/// Names, sizes, modification times and inodes of the directory's files
/// and of its `envoy/` subdirectory's: any edit, rename, addition or
/// removal changes it.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<std::time::SystemTime>, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut out: Vec<_> = [dir.to_path_buf(), dir.join(crate::plain::DIR)]
        .iter()
        .flat_map(std::fs::read_dir)
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((e.path(), m.len(), m.modified().ok(), m.ino()))
        })
        .collect();
    out.sort();
    out
}
