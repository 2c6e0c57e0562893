//! The shared configuration store of control-server replicas.
//!
//! A directory is where a single control server starts; a fleet keeps its
//! configuration in etcd, under a key prefix, as the same files a
//! directory holds ([`files::FileSet`]). Every replica reads the store,
//! validates it with the same code a directory goes through, and serves
//! what it holds; since a resource's version is a hash of its content,
//! replicas serving the same files serve the same versions, and a gateway
//! that moves from one to another is sent nothing it already has.
//!
//! Writes (`apply`, `delete`, `import`) are validated as a whole before
//! they are written, in one transaction, and only if nothing changed since
//! the revision they were based on.

pub mod etcd;
pub mod files;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use self::etcd::{Store, StoreError};
use self::files::FileSet;
use crate::catalog::Catalog;
use crate::source::{Source, SourceState};

/// etcd's v3 API, generated from its own `.proto` files (`proto/etcd`).
#[allow(
    missing_debug_implementations,
    clippy::doc_markdown,
    clippy::derive_partial_eq_without_eq,
    clippy::large_enum_variant,
    clippy::doc_lazy_continuation,
    reason = "generated code"
)]
pub mod pb {
    pub mod mvccpb {
        include!(concat!(env!("OUT_DIR"), "/mvccpb.rs"));
    }
    pub mod authpb {
        include!(concat!(env!("OUT_DIR"), "/authpb.rs"));
    }
    pub mod etcdserverpb {
        include!(concat!(env!("OUT_DIR"), "/etcdserverpb.rs"));
    }
}

/// How long a replica waits before reading the store again after it
/// could not.
const RETRY: Duration = Duration::from_secs(1);

/// The store's health, for `/ready` and the log.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct StoreState {
    pub store: String,
    /// The store answered the last read and the watch is open.
    pub reachable: bool,
    /// The revision of the configuration served.
    pub revision: i64,
    /// Why the store could not be read, while it cannot.
    pub last_error: Option<String>,
}

/// What a replica does with each configuration it reads.
pub struct Publish {
    pub snapshots: watch::Sender<Arc<Catalog>>,
    pub state: Arc<Mutex<SourceState>>,
    pub store_state: Arc<Mutex<StoreState>>,
    pub code_url: Option<String>,
    pub modules: Arc<Mutex<Arc<crate::ecds::Modules>>>,
}

impl std::fmt::Debug for Publish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publish").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reads the store until it yields a configuration that validates: what a
/// replica starts serving. Each failure is logged and recorded in `state`.
pub async fn first_load(
    store: &Store,
    code_url: Option<&str>,
    state: &Mutex<SourceState>,
    store_state: &Mutex<StoreState>,
) -> (crate::source::Loaded, etcd::Read) {
    let mut last: Option<FileSet> = None;
    loop {
        match store.read(None).await {
            Ok(read) => {
                {
                    let mut st = lock(store_state);
                    st.reachable = true;
                    st.last_error = None;
                }
                if last.as_ref() != Some(&read.files) {
                    match Source::Files(Arc::new(read.files.clone())).load_with(code_url) {
                        Ok(loaded) => {
                            lock(store_state).revision = read.revision;
                            return (loaded, read);
                        }
                        Err(e) => {
                            tracing::warn!(
                                "{} (revision {}) does not validate; nothing to serve yet:\n{e}",
                                store.url(),
                                read.revision
                            );
                            let mut st = lock(state);
                            st.rejections += 1;
                            st.last_error = Some(e.to_string());
                        }
                    }
                    last = Some(read.files.clone());
                }
                // Wait for a change rather than polling.
                if let Err(e) = store.changed_after(read.revision).await {
                    unreachable(store_state, &e);
                    tokio::time::sleep(RETRY).await;
                }
            }
            Err(e) => {
                unreachable(store_state, &e);
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

fn unreachable(store_state: &Mutex<StoreState>, e: &StoreError) {
    let mut st = lock(store_state);
    if st.reachable || st.last_error.is_none() {
        tracing::warn!("{e}; serving the last good configuration until it is back");
    }
    st.reachable = false;
    st.last_error = Some(e.to_string());
    metrics::gauge!("sluice_xds_store_reachable").set(0.0);
}

/// Follows the store from `revision` on: every change is read, validated
/// and, when it validates, served; one that does not is refused, counted
/// and logged, and the last good configuration stays. While etcd cannot be
/// reached the replica keeps serving what it has and says so.
pub async fn follow(store: Store, mut revision: i64, mut served: FileSet, publish: Publish) {
    loop {
        match store.changed_after(revision).await {
            Ok(_) => {}
            Err(e) => {
                unreachable(&publish.store_state, &e);
                tokio::time::sleep(RETRY).await;
            }
        }
        let read = match store.read(None).await {
            Ok(r) => r,
            Err(e) => {
                unreachable(&publish.store_state, &e);
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        {
            let mut st = lock(&publish.store_state);
            if !st.reachable {
                tracing::info!("{}: reachable again at revision {}", store.url(), read.revision);
            }
            st.reachable = true;
            st.last_error = None;
            metrics::gauge!("sluice_xds_store_reachable").set(1.0);
        }
        revision = read.revision;
        if read.files == served {
            lock(&publish.store_state).revision = revision;
            continue;
        }
        let outcome = Source::Files(Arc::new(read.files.clone())).load_with(publish.code_url.as_deref());
        let what = format!(
            "{} at revision {revision} ({})",
            store.url(),
            served.changes(&read.files).join(", ")
        );
        if crate::source::publish(outcome, &what, &publish.state, &publish.modules, &publish.snapshots) {
            // The revision of what is served, not of a change refused.
            lock(&publish.store_state).revision = revision;
            served = read.files;
        }
    }
}

/// What a write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// Nothing differed; nothing written.
    Unchanged { revision: i64 },
    Done {
        revision: i64,
        /// Files written or removed.
        changed: Vec<String>,
    },
}

/// Why a write was not made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The configuration the write would leave does not validate.
    #[error("{errors}\nnothing was written: the configuration it would leave in {store} does not validate")]
    Invalid {
        store: String,
        errors: sluice_api::ConfigErrors,
    },
    #[error("{0}")]
    Files(sluice_api::ConfigErrors),
    #[error("{store}: {name} is not in the store; `sluice-xds get --store {store}` lists what is")]
    NoSuchFile { store: String, name: String },
}

/// How a write changes what the store holds.
#[derive(Debug, Clone)]
pub enum Change {
    /// Adds or replaces these files.
    Apply(FileSet),
    /// Removes these files.
    Delete(Vec<String>),
    /// Replaces everything with these files.
    Import(FileSet),
}

/// Makes `change` to the store, based on revision `base` (what the caller
/// read; the current revision when `None`): the result is validated
/// whole, then written in one transaction, refused if the store changed
/// since `base`.
pub async fn write(store: &Store, change: Change, base: Option<i64>) -> Result<Written, WriteError> {
    let before = store.read(base).await?;
    let mut after = before.files.clone();
    let mut delete = Vec::new();
    match &change {
        Change::Apply(set) => {
            for (name, f) in &set.files {
                after.files.insert(name.clone(), f.clone());
            }
        }
        Change::Delete(names) => {
            for n in names {
                if after.files.remove(n).is_none() {
                    return Err(WriteError::NoSuchFile {
                        store: store.url().to_string(),
                        name: n.clone(),
                    });
                }
            }
        }
        Change::Import(set) => {
            after.files = set.files.clone();
        }
    }
    let loaded = Source::Files(Arc::new(after.clone()))
        .load()
        .map_err(|errors| WriteError::Invalid {
            store: store.url().to_string(),
            errors,
        })?;
    // A module no plugin names any longer goes with the last file naming it.
    let used: Vec<String> = loaded
        .config
        .plugins
        .iter()
        .map(|p| files::module_name(&p.path))
        .collect();
    after
        .files
        .retain(|name, _| !name.starts_with(files::MODULES) || used.contains(name));
    let changed = before.files.changes(&after);
    if changed.is_empty() {
        // Unchanged against what the caller saw: but if that is stale,
        // the caller must hear so.
        if let Some(base) = base {
            let now = store.read(None).await?;
            if now.files != before.files {
                return Err(store.conflict(base).await.into());
            }
            return Ok(Written::Unchanged { revision: now.revision });
        }
        return Ok(Written::Unchanged {
            revision: before.revision,
        });
    }
    let mut put = FileSet::new(after.origin.clone());
    for name in &changed {
        if let Some(f) = after.files.get(name) {
            put.files.insert(name.clone(), f.clone());
        } else {
            delete.push(name.clone());
        }
    }
    let revision = store.write(before.revision, &put, &delete).await?;
    Ok(Written::Done { revision, changed })
}
