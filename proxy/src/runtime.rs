//! Starting and stopping a whole Sluice process: bind every listener and
//! the admin API, share one compiled snapshot, and on shutdown stop
//! accepting, let flows drain, then close what is left and flush the audit
//! log. `sluice run` and the black-box tests both go through [`Server`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_api::{AuditDestination, Config, ListenerKind};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{self, Admin, LogControl};
use crate::forward::{Resolver, ResolverSettings};
use crate::listener::{self, ListenerPlan, Shared, Snapshot};
use crate::telemetry::audit::{AuditSink, AuditWriter, FlowRecord};
use crate::telemetry::metrics;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error("cannot bind listener `{name}` on {addr}: {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot bind the admin API on {addr}: {source}")]
    Admin { addr: SocketAddr, source: std::io::Error },
    #[error("cannot open the audit log: {0}")]
    Audit(String),
    #[error("cannot set up the resolver: {0}")]
    Resolver(String),
    #[error("cannot set up metrics: {0}")]
    Metrics(String),
}

/// A running Sluice.
#[derive(Debug)]
pub struct Server {
    /// Bound address of each listener, by name (port 0 resolved).
    pub listeners: BTreeMap<String, (ListenerKind, SocketAddr)>,
    pub admin: SocketAddr,
    pub shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    force: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Server {
    pub async fn start(config: Config, log: Option<LogControl>) -> Result<Self, StartError> {
        let metrics_handle = metrics::install().map_err(|e| StartError::Metrics(e.to_string()))?;
        let _ = metrics::spawn_upkeep(metrics_handle.clone(), Duration::from_secs(5));
        let sink = match &config.audit.destination {
            AuditDestination::Stdout => AuditSink::Stdout,
            AuditDestination::Stderr => AuditSink::Stderr,
            AuditDestination::File(p) => AuditSink::File(p.clone()),
        };
        let audit: AuditWriter<FlowRecord> =
            AuditWriter::start(sink, config.audit.queue).map_err(|e| StartError::Audit(e.to_string()))?;
        let resolver = if config.resolver.nameservers.is_empty() {
            Resolver::system().or_else(|_| Resolver::new(&ResolverSettings::with_nameservers(Vec::new())))
        } else {
            Resolver::new(&ResolverSettings::with_nameservers(config.resolver.nameservers.clone()))
        }
        .map_err(|e| StartError::Resolver(e.to_string()))?;
        let (stop, stop_rx) = watch::channel(false);
        let (force, force_rx) = watch::channel(false);

        let plans: Vec<ListenerPlan> = config
            .listeners
            .iter()
            .filter(|l| l.kind != ListenerKind::Dns)
            .map(ListenerPlan::from_config)
            .collect();
        let mut bound = Vec::new();
        let mut listeners = BTreeMap::new();
        for plan in plans {
            let l = listener::bind(&plan).map_err(|source| StartError::Bind {
                name: plan.spec.name.clone(),
                addr: plan.spec.address,
                source,
            })?;
            let addr = l.local_addr().unwrap_or(plan.spec.address);
            listeners.insert(plan.spec.name.clone(), (plan.spec.kind, addr));
            bound.push((plan, l));
        }
        let admin_addr = config.admin.address;
        let admin_listener = tokio::net::TcpListener::bind(admin_addr)
            .await
            .map_err(|source| StartError::Admin {
                addr: admin_addr,
                source,
            })?;
        let admin_addr = admin_listener.local_addr().unwrap_or(admin_addr);

        let shared = Arc::new(Shared::new(Snapshot::new(config), audit, resolver, force_rx));
        let mut tasks = Vec::new();
        for (plan, l) in bound {
            tasks.push(listener::spawn(Arc::new(plan), l, shared.clone(), stop_rx.clone()));
        }
        tasks.push(admin::spawn(
            Admin {
                shared: shared.clone(),
                metrics: metrics_handle,
                log,
            },
            admin_listener,
            stop_rx,
        ));
        Ok(Self {
            listeners,
            admin: admin_addr,
            shared,
            stop,
            force,
            tasks,
        })
    }

    /// Bound address of listener `name`.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners.get(name).map(|(_, a)| *a)
    }

    /// Replaces the running configuration: new flows use it at once.
    pub fn reload(&self, config: Config) {
        self.shared.snapshot.store(Arc::new(Snapshot::new(config)));
    }

    /// Stops accepting, waits up to `drain` for flows to finish, closes the
    /// rest, and flushes the audit log.
    pub async fn shutdown(self, drain: Duration) {
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + drain;
        while self.shared.active_flows() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.force.send(true);
        let settle = tokio::time::Instant::now() + Duration::from_secs(2);
        while self.shared.active_flows() > 0 && tokio::time::Instant::now() < settle {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for t in self.tasks {
            t.abort();
        }
        let _ = self.shared.audit.shutdown().await;
    }
}
