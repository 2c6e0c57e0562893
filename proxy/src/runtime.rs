//! Running a whole Sluice process: one compiled snapshot shared by every
//! flow and query, and the sockets that serve it. Starting and reloading are
//! the same step: a snapshot is built, then the runtime binds, keeps,
//! rebinds or closes listeners (TCP, DNS, admin), switches the audit sink
//! and the resolver, and installs the snapshot. Everything that can fail
//! (binding, opening) happens before anything running is touched, so a
//! reload that fails leaves the running configuration as it was. On
//! shutdown: stop accepting, let flows drain, close what is left, flush the
//! audit log. `sluice run` and the black-box tests both go through
//! [`Server`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use sluice_api::config::ConfigErrors;
use sluice_api::{
    AuditDestination, Config, DnsDeny, DnsListener, DnsTransport, ListenerKind, ListenerType, Mode, Protocol,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::dns::{
    self, Bindings, BindingsConfig, DnsConfig, DnsCore, DnsHandle, DnsServer, DnsStats, QueryPolicy, QueryVerdict,
    VerdictMemo,
};
use crate::policy::FlowQuery;
use crate::telemetry::audit::{AuditRecord, DnsAuditLog, SourceGroups};

use crate::admin::{self, Admin};
use crate::forward::{Resolver, ResolverSettings};
use crate::listener::{self, PlanHook, Shared, Snapshot};
use crate::telemetry::audit::{AuditSink, AuditWriter};
use crate::telemetry::logging::LogControl;
use crate::telemetry::metrics;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error(
        "cannot bind listener `{name}` on {addr}: {source}; another process may hold that address (pick another in `listeners`), or a port below 1024 needs root or CAP_NET_BIND_SERVICE"
    )]
    Bind {
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot bind the admin API on {addr}: {source}; set another `admin.address`")]
    Admin { addr: SocketAddr, source: std::io::Error },
    #[error("cannot open the audit log: {0}")]
    Audit(String),
    #[error("cannot set up the resolver: {0}")]
    Resolver(String),
    #[error("cannot set up metrics: {0}")]
    Metrics(String),
    #[error("DNS listener `{name}`: {message}")]
    Dns { name: String, message: String },
    #[error(transparent)]
    Plan(#[from] listener::SnapshotError),
}

/// The DNS proxy asks the same compiled policy as the TCP listeners, from
/// the snapshot current when the query arrives.
struct SnapshotQueries(Arc<Shared>);

thread_local! {
    /// This worker thread's recent DNS verdicts (see [`VerdictMemo`]).
    static DNS_VERDICTS: std::cell::RefCell<VerdictMemo> = std::cell::RefCell::new(VerdictMemo::new());
}

impl QueryPolicy for SnapshotQueries {
    fn decide(&self, src: std::net::IpAddr, qname: &sluice_api::DomainName, _qtype: u16) -> QueryVerdict {
        let snap = self.0.snapshot.load();
        let decide = || {
            let v = snap.policy.decide(&FlowQuery {
                src,
                name: Some(qname),
                dst: None,
                protocol: Protocol::Dns,
                port: 53,
                identity: None,
            });
            QueryVerdict::from_verdict(&v, snap.rule_label(v.decided_by))
        };
        // A DNS decision depends on the snapshot, the source and the name
        // only (protocol and port are fixed), which is the memo's key.
        DNS_VERDICTS
            .try_with(|memo| match memo.try_borrow_mut() {
                Ok(mut memo) => memo.get_or_decide(snap.serial(), src, qname, decide),
                Err(_) => decide(),
            })
            .unwrap_or_else(|_| decide())
    }

    fn mode(&self) -> sluice_api::Mode {
        self.0.snapshot.load().policy.mode()
    }

    fn delegates(&self, verdict: &QueryVerdict, filter: &str) -> bool {
        let snap = self.0.snapshot.load();
        verdict
            .source
            .is_some_and(|s| snap.policy.delegates(s).iter().any(|d| &**d == filter))
    }
}

/// A WASM plugin judging a DNS listener's queries: the plugin is looked up
/// in the snapshot current when the query arrives (a reload that changes
/// which plugins serve the listener builds a new engine).
#[derive(Debug)]
struct PluginQueries {
    listener: String,
    plugin: String,
    shared: Arc<Shared>,
}

impl dns::QueryFilter for PluginQueries {
    fn name(&self) -> &str {
        &self.plugin
    }

    fn on_query(&self, query: &dns::QueryInfo<'_>, verdict: &QueryVerdict) -> dns::QueryStatus {
        let snap = self.shared.snapshot.load();
        let Some(plugin) = snap.plugins.get(&self.plugin) else {
            return dns::QueryStatus::Continue;
        };
        let policy = &snap.policy;
        let properties = crate::wasm::filter::query_properties(
            &self.listener,
            query.src,
            query.qname,
            query.qtype,
            &policy.smartgroups_of(query.src),
            &policy.webgroups_of(query.qname),
            verdict,
        );
        match plugin.judge(properties) {
            Some(d) if d.allow => dns::QueryStatus::Allow(d),
            Some(d) => dns::QueryStatus::Deny(d),
            None => dns::QueryStatus::Continue,
        }
    }
}

/// The nameservers of `/etc/resolv.conf`, as UDP upstreams.
fn system_nameservers(exclude: SocketAddr) -> Vec<dns::Upstream> {
    nameservers_in(
        &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        exclude,
    )
}

/// `nameserver` lines of a resolv.conf, minus Sluice's own DNS listener (a
/// gateway whose resolv.conf points at itself must not forward to itself).
fn nameservers_in(text: &str, exclude: SocketAddr) -> Vec<dns::Upstream> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .filter(|a| *a != exclude)
        .map(dns::Upstream::udp)
        .collect()
}

fn dns_config(name: &str, addr: SocketAddr, l: &DnsListener, mode: Mode) -> Result<DnsConfig, StartError> {
    let upstreams: Vec<dns::Upstream> = if l.upstreams.is_empty() {
        system_nameservers(addr)
    } else {
        l.upstreams
            .iter()
            .map(|u| match u.transport {
                DnsTransport::Udp => dns::Upstream::udp(u.address),
                DnsTransport::Tcp => dns::Upstream::tcp(u.address),
                DnsTransport::Tls => dns::Upstream::tls(u.address, u.server_name.clone().unwrap_or_default()),
            })
            .collect()
    };
    if upstreams.is_empty() {
        return Err(StartError::Dns {
            name: name.to_owned(),
            message: "no upstreams: set `upstreams`, or list a nameserver in /etc/resolv.conf".into(),
        });
    }
    let tls = if l.upstreams.iter().any(|u| u.transport == DnsTransport::Tls) {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| StartError::Dns {
                name: name.to_owned(),
                message: e.to_string(),
            })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Some(Arc::new(tls))
    } else {
        None
    };
    let deny_answer = match l.deny_answer {
        DnsDeny::Nxdomain => dns::DenyAnswer::NxDomain,
        DnsDeny::Refused => dns::DenyAnswer::Refused,
        DnsDeny::Sinkhole { v4, v6 } => dns::DenyAnswer::Sinkhole { v4, v6 },
    };
    Ok(DnsConfig {
        upstreams,
        tls,
        deny_answer,
        strip_ech: l.strip_ech.unwrap_or(mode == Mode::Enforce),
        cache: dns::CacheConfig {
            max_entries: l.cache_entries,
            ..dns::CacheConfig::default()
        },
        bindings: bindings_config(l),
        exfiltration: l.exfiltration.then(dns::ExfilConfig::default),
        upstream_udp_sockets: l.upstream_sockets,
        upstream_socket_max_queries: l.upstream_socket_max_queries,
        upstream_socket_max_age: l.upstream_socket_max_age,
        ..DnsConfig::default()
    })
}

fn bindings_config(l: &DnsListener) -> BindingsConfig {
    BindingsConfig {
        min_ttl: l.binding_min_ttl,
        grace: l.binding_grace,
        max_entries: l.max_bindings,
        ..BindingsConfig::default()
    }
}

/// A running Sluice.
/// What a reload did (and what starting did: a start is a reload from
/// nothing). Serialised as the answer of `POST /reload`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReloadReport {
    /// The file (or `<embedded default>`) the configuration came from.
    pub source: String,
    /// Listeners bound for the first time.
    pub added: Vec<String>,
    /// Listeners whose options changed, applied in place on their sockets.
    pub changed: Vec<String>,
    /// Listeners moved to another address: bound there, and the old socket
    /// closed (its flows drain).
    pub rebound: Vec<String>,
    /// Listeners closed; their flows drain for `runtime.drain_timeout`.
    pub removed: Vec<String>,
    /// The admin API's new address, when it moved.
    pub admin: Option<SocketAddr>,
    /// The audit log's new destination, when it changed.
    pub audit: Option<String>,
    /// Whether the resolver was rebuilt (`resolver.nameservers` changed).
    pub resolver: bool,
    /// Settings that changed in the file but apply only after a restart,
    /// each with its running and its new value.
    pub restart_needed: Vec<String>,
    /// Every listener's bound address after the reload.
    pub listeners: BTreeMap<String, SocketAddr>,
}

impl std::fmt::Display for ReloadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "reloaded {}", self.source)?;
        let list = |v: &[String]| v.join(", ");
        for (what, names) in [
            ("added", &self.added),
            ("changed in place", &self.changed),
            ("moved", &self.rebound),
            ("removed (draining)", &self.removed),
        ] {
            if !names.is_empty() {
                write!(f, "; listeners {what}: {}", list(names))?;
            }
        }
        if let Some(a) = self.admin {
            write!(f, "; admin API now on http://{a}")?;
        }
        if let Some(a) = &self.audit {
            write!(f, "; audit log now to {a}")?;
        }
        if self.resolver {
            write!(f, "; resolver rebuilt")?;
        }
        if !self.restart_needed.is_empty() {
            write!(f, "; need a restart: {}", list(&self.restart_needed))?;
        }
        Ok(())
    }
}

/// Why a reload (or a start) did not happen; the running configuration, if
/// any, is unchanged.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    #[error("{0}")]
    Config(ConfigErrors),
    #[error("the process runs the embedded default; there is no file to reload (start it with `run -c FILE`)")]
    NoFile,
    #[error(transparent)]
    Start(#[from] StartError),
}

/// A request for a reload from the file, with where to send the outcome.
type ReloadRequest = oneshot::Sender<Result<ReloadReport, String>>;

#[derive(Debug)]
pub struct Server {
    /// Listener addresses as bound at start (see [`Server::addr`] for now).
    pub listeners: BTreeMap<String, (ListenerType, SocketAddr)>,
    pub admin: SocketAddr,
    pub shared: Arc<Shared>,
    pub warnings: Vec<String>,
    inner: Arc<Inner>,
}

/// What a reload needs, shared with the tasks that ask for one.
#[derive(Debug)]
struct Inner {
    shared: Arc<Shared>,
    metrics: metrics::PrometheusHandle,
    log: Option<LogControl>,
    dns_stats: Arc<DnsStats>,
    running: tokio::sync::Mutex<Running>,
    /// Bound addresses now, for [`Server::addr`] (read without the lock).
    bound: crate::admin::Bound,
    /// The file reloads read; `None` for the embedded default.
    source: std::sync::Mutex<Option<PathBuf>>,
    /// The resources a control server sent last, laid over the file by
    /// every reload; `None` before the first (or without `xds:`).
    xds: std::sync::Mutex<Option<sluice_api::config::Resources>>,
    /// The xDS client's state, once it is started, for the admin API.
    xds_status: Arc<std::sync::OnceLock<Arc<crate::xds::XdsStatus>>>,
    reload_tx: mpsc::Sender<ReloadRequest>,
    /// Watchers and the reload task, ended at shutdown.
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    /// Applied to every listener plan of every snapshot.
    hook: Option<Hook>,
}

/// A [`PlanHook`] the runtime holds (Debug for the runtime's own).
#[derive(Clone)]
struct Hook(Arc<PlanHook>);

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PlanHook")
    }
}

impl std::ops::Deref for Hook {
    type Target = PlanHook;
    fn deref(&self) -> &PlanHook {
        &*self.0
    }
}

/// The sockets serving the installed snapshot.
#[derive(Debug, Default)]
struct Running {
    tcp: BTreeMap<String, TcpRun>,
    dns: BTreeMap<String, DnsRun>,
    admin: Option<AdminRun>,
    /// The bindings table's settings (from the first DNS listener).
    bindings: Option<BindingsConfig>,
    workers: Option<Option<usize>>,
    audit: Option<(AuditDestination, usize)>,
    nameservers: Option<Vec<SocketAddr>>,
}

/// How long a reload waits for each `quic` listener to apply it.
const QUIC_APPLY_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug)]
struct TcpRun {
    kind: ListenerType,
    configured: SocketAddr,
    bound: SocketAddr,
    stop: watch::Sender<bool>,
    closing: CancellationToken,
    /// A `quic` listener's: the last configuration generation it applied.
    applied: Option<watch::Receiver<u64>>,
}

/// What a DNS listener is built from; a change to any of it rebuilds the
/// listener's engine.
#[derive(Debug, Clone, PartialEq)]
struct DnsSpec {
    address: SocketAddr,
    listener: DnsListener,
    mode: Mode,
    /// The plugins that judge its queries, in order.
    plugins: Vec<String>,
}

#[derive(Debug)]
struct DnsRun {
    spec: DnsSpec,
    bound: SocketAddr,
    handle: DnsHandle,
    cancel: CancellationToken,
}

#[derive(Debug)]
struct AdminRun {
    configured: SocketAddr,
    bound: SocketAddr,
    stop: watch::Sender<bool>,
}

/// Sockets opened for a reload, not yet serving: dropped (closed) if a
/// later step fails.
struct Prepared {
    tcp: Vec<(String, ListenerType, SocketAddr, tokio::net::TcpListener)>,
    /// `quic` listeners' sockets.
    udp: Vec<(String, ListenerType, SocketAddr, tokio::net::UdpSocket)>,
    dns_new: Vec<(String, DnsSpec, DnsServer)>,
    dns_swap: Vec<(String, DnsSpec, Arc<DnsCore>)>,
    admin: Option<(SocketAddr, tokio::net::TcpListener)>,
    resolver: Option<Resolver>,
    bindings: Option<Option<Arc<Bindings>>>,
    warnings: Vec<String>,
}

fn audit_sink(d: &AuditDestination) -> AuditSink {
    match d {
        AuditDestination::Stdout => AuditSink::Stdout,
        AuditDestination::Stderr => AuditSink::Stderr,
        AuditDestination::File(p) => AuditSink::File(p.clone()),
    }
}

fn describe_audit(d: &AuditDestination) -> String {
    match d {
        AuditDestination::Stdout => "stdout".into(),
        AuditDestination::Stderr => "stderr".into(),
        AuditDestination::File(p) => p.display().to_string(),
    }
}

fn new_resolver(nameservers: &[SocketAddr]) -> Result<Resolver, StartError> {
    if nameservers.is_empty() {
        Resolver::system().or_else(|_| Resolver::new(&ResolverSettings::with_nameservers(Vec::new())))
    } else {
        Resolver::new(&ResolverSettings::with_nameservers(nameservers.to_vec()))
    }
    .map_err(|e| StartError::Resolver(e.to_string()))
}

impl Server {
    /// Binds everything `config` names and starts serving it.
    pub async fn start(config: Config, log: Option<LogControl>) -> Result<Self, StartError> {
        Self::start_with(config, log, None).await
    }

    /// Like [`Server::start`], with `hook` changing each listener's plan in
    /// every snapshot (extra filters or chains).
    pub async fn start_with(
        config: Config,
        log: Option<LogControl>,
        hook: Option<Arc<PlanHook>>,
    ) -> Result<Self, StartError> {
        let metrics_handle = metrics::install().map_err(|e| StartError::Metrics(e.to_string()))?;
        drop(metrics::spawn_upkeep(metrics_handle.clone(), Duration::from_secs(5)));
        let audit: AuditWriter<AuditRecord> = AuditWriter::start(
            audit_sink(&config.bootstrap.audit.destination),
            config.bootstrap.audit.queue,
        )
        .map_err(|e| StartError::Audit(e.to_string()))?;
        let resolver = new_resolver(&config.resolver.nameservers)?;
        let dns_stats = Arc::new(DnsStats::default());
        let workers = config.bootstrap.workers;
        let audit_state = (config.bootstrap.audit.destination.clone(), config.bootstrap.audit.queue);
        let nameservers = config.resolver.nameservers.clone();
        let source =
            (config.source != sluice_api::config::EMBEDDED_DEFAULT_NAME).then(|| PathBuf::from(&config.source));
        let shared = Arc::new(Shared::new(
            Snapshot::build(config.clone(), hook.as_deref())?,
            audit,
            resolver,
            None,
        ));
        let (reload_tx, reload_rx) = mpsc::channel(4);
        let inner = Arc::new(Inner {
            shared: shared.clone(),
            metrics: metrics_handle,
            log,
            dns_stats,
            running: tokio::sync::Mutex::new(Running {
                workers: Some(workers),
                audit: Some(audit_state),
                nameservers: Some(nameservers),
                ..Running::default()
            }),
            bound: crate::admin::Bound::default(),
            source: std::sync::Mutex::new(source),
            xds: std::sync::Mutex::new(None),
            xds_status: Arc::default(),
            reload_tx,
            tasks: std::sync::Mutex::new(Vec::new()),
            hook: hook.map(Hook),
        });
        let report = {
            let mut running = inner.running.lock().await;
            let snapshot = Snapshot::build(config, inner.hook.as_deref())?;
            match inner.reconcile(&mut running, snapshot).await {
                Ok(r) => r,
                Err(ReloadError::Start(e)) => return Err(e),
                Err(e) => return Err(StartError::Resolver(e.to_string())),
            }
        };
        inner.spawn_reloader(reload_rx);
        let listeners = inner.bound_now();
        let admin = report.admin.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        Ok(Self {
            listeners,
            admin,
            shared,
            warnings: report.restart_needed,
            inner,
        })
    }

    /// Bound address of listener `name`, as it is now (after any reload).
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.inner.bound_now().get(name).map(|(_, a)| *a)
    }

    /// Every listener's kind and bound address, as they are now.
    pub fn bound(&self) -> BTreeMap<String, (ListenerType, SocketAddr)> {
        self.inner.bound_now()
    }

    /// The admin API's address now.
    pub async fn admin_addr(&self) -> SocketAddr {
        self.inner
            .running
            .lock()
            .await
            .admin
            .as_ref()
            .map_or(self.admin, |a| a.bound)
    }

    /// Replaces the running configuration with `config`, every section in
    /// place: new flows use it at once, relayed flows it now denies are
    /// closed and recorded, listeners are bound, kept, moved or closed to
    /// match. On an error nothing running changes.
    pub async fn reload(&self, config: Config) -> Result<ReloadReport, ReloadError> {
        self.inner.reload(config).await
    }

    /// Reloads from the file the server was started with.
    pub async fn reload_file(&self) -> Result<ReloadReport, ReloadError> {
        self.inner.reload_file().await
    }

    /// Applies resources from a control server: the file (or the embedded
    /// default) with each section they make replaced, checked as a whole,
    /// then reloaded like an edit of the file. Later reloads of the file
    /// keep them.
    pub async fn apply_resources(&self, resources: sluice_api::config::Resources) -> Result<ReloadReport, ReloadError> {
        self.inner.apply_resources(resources).await
    }

    /// Starts taking resources from the control servers of `xds:`; the
    /// client stops at shutdown. Its state is on the admin API.
    pub fn start_xds(&self, bootstrap: sluice_api::XdsBootstrap) -> Arc<crate::xds::XdsStatus> {
        let status = Arc::new(crate::xds::XdsStatus::default());
        let _ = self.inner.xds_status.set(status.clone());
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let apply = Arc::new(XdsApply {
            inner: Arc::downgrade(&self.inner),
        });
        let task_status = status.clone();
        let modules = crate::xds::code::modules_dir(&self.shared.snapshot.load().config.bootstrap.plugin_cache);
        self.inner.keep(tokio::spawn(async move {
            // Dropping the sender at the end of the task is all the
            // client needs to know; the task itself is aborted at shutdown.
            let _keep = stop_tx;
            crate::xds::run(bootstrap, modules, apply, task_status, stop).await;
        }));
        status
    }

    /// Reloads whenever `path` changes on disk (its length, modification
    /// time or inode), checking every `every`; the outcome is logged. Also
    /// makes `path` the file `POST /reload` and SIGHUP read.
    pub fn watch_file(&self, path: PathBuf, every: Duration) {
        *self
            .inner
            .source
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(path.clone());
        let tx = self.inner.reload_tx.clone();
        self.inner.keep(tokio::spawn(async move {
            let stamp = |p: &std::path::Path| {
                std::fs::metadata(p).ok().map(|m| {
                    use std::os::unix::fs::MetadataExt;
                    (m.len(), m.modified().ok(), m.ino())
                })
            };
            let mut last = stamp(&path);
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let now = stamp(&path);
                if now == last || now.is_none() {
                    continue;
                }
                // Let an editor finish writing before reading.
                tokio::time::sleep(every.min(Duration::from_millis(200))).await;
                last = stamp(&path);
                let (reply, outcome) = oneshot::channel();
                if tx.send(reply).await.is_err() {
                    return;
                }
                match outcome.await {
                    Ok(Ok(r)) => tracing::info!("{} changed: {r}", path.display()),
                    Ok(Err(e)) => tracing::warn!(
                        "{} changed but was not applied; the running configuration is unchanged:\n{e}",
                        path.display()
                    ),
                    Err(_) => return,
                }
            }
        }));
    }

    /// Stops accepting, waits up to `drain` for flows to finish, closes the
    /// rest, and flushes the audit log.
    pub async fn shutdown(self, drain: Duration) {
        {
            let mut running = self.inner.running.lock().await;
            for (_, t) in std::mem::take(&mut running.tcp) {
                let _ = t.stop.send(true);
            }
            for (_, d) in std::mem::take(&mut running.dns) {
                d.cancel.cancel();
            }
            if let Some(a) = running.admin.take() {
                let _ = a.stop.send(true);
            }
        }
        self.shared.begin_draining();
        let deadline = tokio::time::Instant::now() + drain;
        while self.shared.active_flows() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.shared.force_close();
        let settle = tokio::time::Instant::now() + Duration::from_secs(2);
        while self.shared.active_flows() > 0 && tokio::time::Instant::now() < settle {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for t in std::mem::take(
            &mut *self
                .inner
                .tasks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        ) {
            t.abort();
        }
        let _ = self.shared.audit.shutdown().await;
    }
}

impl Inner {
    fn keep(&self, task: JoinHandle<()>) {
        self.tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(task);
    }

    fn bound_now(&self) -> BTreeMap<String, (ListenerType, SocketAddr)> {
        self.bound
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    async fn reload(&self, config: Config) -> Result<ReloadReport, ReloadError> {
        let mut running = self.running.lock().await;
        let snapshot = Snapshot::build(config, self.hook.as_deref()).map_err(StartError::from)?;
        self.reconcile(&mut running, snapshot).await
    }

    /// The configuration of the file (or the embedded default) with the
    /// sections `resources` make replaced.
    fn assemble(&self, resources: Option<&sluice_api::config::Resources>) -> Result<Config, ReloadError> {
        let path = self
            .source
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut a = sluice_api::config::Assembly::new();
        match &path {
            Some(p) => a.add_path(p),
            None => a.add_file(
                sluice_api::config::EMBEDDED_DEFAULT,
                sluice_api::config::EMBEDDED_DEFAULT_NAME,
            ),
        }
        if let Some(r) = resources {
            a.replace_with(r);
        }
        a.build().map_err(ReloadError::Config)
    }

    async fn apply_resources(&self, resources: sluice_api::config::Resources) -> Result<ReloadReport, ReloadError> {
        let config = self.assemble(Some(&resources))?;
        let report = self.reload(config).await?;
        *self.xds.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(resources);
        Ok(report)
    }

    async fn reload_file(&self) -> Result<ReloadReport, ReloadError> {
        let xds = self
            .xds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if xds.is_some() {
            let config = self.assemble(xds.as_ref())?;
            return self.reload(config).await;
        }
        let path = self
            .source
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or(ReloadError::NoFile)?;
        let config = sluice_api::config::load_file(&path).map_err(ReloadError::Config)?;
        self.reload(config).await
    }

    /// Serves reload requests (from `POST /reload` and the file watch) one
    /// at a time.
    fn spawn_reloader(self: &Arc<Self>, mut rx: mpsc::Receiver<ReloadRequest>) {
        let inner = Arc::downgrade(self);
        self.keep(tokio::spawn(async move {
            while let Some(reply) = rx.recv().await {
                let Some(inner) = inner.upgrade() else { return };
                let outcome = inner.reload_file().await.map_err(|e| e.to_string());
                let _ = reply.send(outcome);
            }
        }));
    }

    /// Makes the sockets match `snapshot`, then installs it. Fallible steps
    /// (binding, building, opening) come first; once the first running
    /// thing changes, nothing can fail.
    async fn reconcile(&self, running: &mut Running, snapshot: Snapshot) -> Result<ReloadReport, ReloadError> {
        let cfg = &snapshot.config;
        let mut report = ReloadReport {
            source: cfg.source.clone(),
            ..ReloadReport::default()
        };
        let prepared = self.prepare(running, &snapshot, &mut report).await?;
        // Last fallible step, with an effect of its own: the audit sink.
        let audit = (cfg.bootstrap.audit.destination.clone(), cfg.bootstrap.audit.queue);
        if let Some((dest, queue)) = &running.audit {
            if *dest != audit.0 {
                self.shared
                    .audit
                    .switch(audit_sink(&audit.0))
                    .await
                    .map_err(|e| StartError::Audit(e.to_string()))?;
                report.audit = Some(describe_audit(&audit.0));
            }
            if *queue != audit.1 {
                report
                    .restart_needed
                    .push(format!("audit.queue ({queue} running, {} in the file)", audit.1));
            }
        }
        running.audit = Some((audit.0, running.audit.as_ref().map_or(audit.1, |a| a.1)));
        if let Some(Some(w)) = running.workers
            && cfg.bootstrap.workers != Some(w)
        {
            report.restart_needed.push(format!(
                "runtime.workers ({w} running, {} in the file)",
                cfg.bootstrap
                    .workers
                    .map_or_else(|| "one per core".to_owned(), |n| n.to_string())
            ));
        }
        report.restart_needed.extend(prepared.warnings.iter().cloned());
        self.commit(running, snapshot, prepared, &mut report);
        // A `quic` listener applies a change of `transparent` to its socket
        // itself: the reload is over once each has (bounded: one stuck
        // listener does not hold the reload, it is named in the log).
        let generation = self.shared.generation();
        for (name, run) in &running.tcp {
            if let Some(applied) = &run.applied {
                let mut applied = applied.clone();
                let done = tokio::time::timeout(QUIC_APPLY_WAIT, applied.wait_for(|g| *g >= generation)).await;
                if !matches!(done, Ok(Ok(_))) {
                    tracing::warn!(listener = %name, "the quic listener has not applied the new configuration to its socket yet");
                }
            }
        }
        Ok(report)
    }

    async fn prepare(
        &self,
        running: &Running,
        snapshot: &Snapshot,
        report: &mut ReloadReport,
    ) -> Result<Prepared, ReloadError> {
        let cfg = &snapshot.config;
        let old = self.shared.snapshot.load();
        let mut p = Prepared {
            tcp: Vec::new(),
            udp: Vec::new(),
            dns_new: Vec::new(),
            dns_swap: Vec::new(),
            admin: None,
            resolver: None,
            bindings: None,
            warnings: Vec::new(),
        };
        // TCP listeners: keep the socket when the address and kind stay.
        for l in cfg.listeners.iter().filter(|l| l.ty() != ListenerType::Dns) {
            let Some(plan) = snapshot.plan(&l.name) else {
                continue;
            };
            let (spec, kind) = (&plan.spec, l.ty());
            match running.tcp.get(&spec.name) {
                // The same address: as configured, or as bound (a file that
                // names the port a `:0` listener got). A `quic` listener whose
                // `transparent` changed keeps its socket too: its task sets
                // the socket's options when the snapshot is installed.
                Some(r) if (r.configured == spec.address || r.bound == spec.address) && r.kind == kind => {
                    if old.plan(&spec.name).map(|p| &p.spec) != Some(spec) {
                        report.changed.push(spec.name.clone());
                    }
                }
                r if kind == ListenerType::Quic => {
                    let l = listener::bind_quic(plan).map_err(|source| StartError::Bind {
                        name: spec.name.clone(),
                        addr: spec.address,
                        source,
                    })?;
                    if r.is_some() {
                        report.rebound.push(spec.name.clone());
                    } else {
                        report.added.push(spec.name.clone());
                    }
                    p.udp.push((spec.name.clone(), kind, spec.address, l));
                }
                r => {
                    let l = listener::bind(plan).map_err(|source| {
                        let holder = running
                            .tcp
                            .iter()
                            .find(|(n, t)| *n != &spec.name && t.configured == spec.address)
                            .map(|(n, _)| n.clone());
                        StartError::Bind {
                            name: spec.name.clone(),
                            addr: spec.address,
                            source: match holder {
                                Some(h) => std::io::Error::new(
                                    source.kind(),
                                    format!("{source} (listener `{h}` holds it until this reload completes: move or rename in two reloads)"),
                                ),
                                None => source,
                            },
                        }
                    })?;
                    if r.is_some() {
                        report.rebound.push(spec.name.clone());
                    } else {
                        report.added.push(spec.name.clone());
                    }
                    p.tcp.push((spec.name.clone(), kind, spec.address, l));
                }
            }
        }
        // The bindings table follows the first DNS listener's settings.
        let dns_specs: Vec<(&str, DnsSpec)> = cfg
            .listeners
            .iter()
            .filter_map(|l| {
                let ListenerKind::Dns(d) = &l.kind else {
                    return None;
                };
                let spec = DnsSpec {
                    address: l.address,
                    listener: d.clone(),
                    mode: cfg.policy.mode,
                    plugins: cfg
                        .plugins
                        .iter()
                        .filter(|p| p.named(&l.name))
                        .map(|p| p.name.clone())
                        .collect(),
                };
                Some((l.name.as_str(), spec))
            })
            .collect();
        let want_bindings = dns_specs.first().map(|(_, s)| bindings_config(&s.listener));
        let bindings = if want_bindings == running.bindings {
            self.shared.bindings.load_full()
        } else {
            let table = want_bindings
                .as_ref()
                .map(|c| Arc::new(Bindings::with_stats(c, self.dns_stats.clone())));
            p.bindings = Some(table.clone());
            table
        };
        let new_table = p.bindings.is_some();
        for (name, spec) in dns_specs {
            let running_dns = running.dns.get(name);
            let same_place = |r: &DnsRun| r.spec.address == spec.address || r.bound == spec.address;
            if running_dns.is_some_and(|r| {
                r.spec.listener == spec.listener
                    && r.spec.mode == spec.mode
                    && r.spec.plugins == spec.plugins
                    && same_place(r)
            }) && !new_table
            {
                continue;
            }
            let core = match self.dns_core(name, &spec, bindings.clone()) {
                Ok(c) => c,
                // No upstream anywhere: not a reason to refuse the rest.
                Err(StartError::Dns { message, .. }) if spec.listener.upstreams.is_empty() => {
                    p.warnings.push(format!("DNS listener `{name}` not started: {message}"));
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            match running_dns {
                Some(r) if same_place(r) => {
                    if r.spec.listener != spec.listener || r.spec.mode != spec.mode || r.spec.plugins != spec.plugins {
                        report.changed.push(name.to_owned());
                    }
                    p.dns_swap.push((name.to_owned(), spec, core));
                }
                r => {
                    let groups_of = self.shared.clone();
                    let groups: SourceGroups = Box::new(move |ip, each| {
                        let snap = groups_of.snapshot.load();
                        snap.policy.smartgroups_of(ip).into_iter().for_each(each);
                    });
                    let sink = DnsAuditLog::start(self.shared.audit.clone(), name, groups);
                    let server =
                        DnsServer::bind_with_sink(spec.address, core, sink)
                            .await
                            .map_err(|e| StartError::Dns {
                                name: name.to_owned(),
                                message: e.to_string(),
                            })?;
                    if r.is_some() {
                        report.rebound.push(name.to_owned());
                    } else {
                        report.added.push(name.to_owned());
                    }
                    p.dns_new.push((name.to_owned(), spec, server));
                }
            }
        }
        let admin = cfg.bootstrap.admin.address;
        if running
            .admin
            .as_ref()
            .is_none_or(|a| a.configured != admin && a.bound != admin)
        {
            let l = tokio::net::TcpListener::bind(admin)
                .await
                .map_err(|source| StartError::Admin { addr: admin, source })?;
            report.admin = Some(l.local_addr().unwrap_or(admin));
            p.admin = Some((admin, l));
        }
        if running
            .nameservers
            .as_ref()
            .is_some_and(|n| *n != cfg.resolver.nameservers)
        {
            p.resolver = Some(new_resolver(&cfg.resolver.nameservers)?);
            report.resolver = true;
        }
        Ok(p)
    }

    fn dns_core(
        &self,
        name: &str,
        spec: &DnsSpec,
        bindings: Option<Arc<Bindings>>,
    ) -> Result<Arc<DnsCore>, StartError> {
        let cfg = dns_config(name, spec.address, &spec.listener, spec.mode)?;
        let policy: Arc<dyn QueryPolicy> = Arc::new(SnapshotQueries(self.shared.clone()));
        let table = bindings.unwrap_or_else(|| Arc::new(Bindings::with_stats(&cfg.bindings, self.dns_stats.clone())));
        let mut core = DnsCore::new(cfg, policy, table, self.dns_stats.clone()).map_err(|e| StartError::Dns {
            name: name.to_owned(),
            message: e.to_string(),
        })?;
        for plugin in &spec.plugins {
            core.add_filter(Box::new(PluginQueries {
                listener: name.to_owned(),
                plugin: plugin.clone(),
                shared: self.shared.clone(),
            }));
        }
        Ok(Arc::new(core))
    }

    /// Installs `snapshot` and serves it with the prepared sockets. Cannot
    /// fail.
    fn commit(&self, running: &mut Running, snapshot: Snapshot, p: Prepared, report: &mut ReloadReport) {
        let drain = snapshot.config.bootstrap.drain_timeout;
        let names: Vec<(String, ListenerType)> = snapshot
            .config
            .listeners
            .iter()
            .map(|l| (l.name.clone(), l.ty()))
            .collect();
        let nameservers = snapshot.config.resolver.nameservers.clone();
        if let Some(r) = p.resolver {
            self.shared.resolver.store(Arc::new(r));
        }
        running.nameservers = Some(nameservers);
        if let Some(table) = p.bindings {
            running.bindings = table.as_ref().map(|_| {
                snapshot
                    .config
                    .listeners
                    .iter()
                    .find_map(|l| match &l.kind {
                        ListenerKind::Dns(d) => Some(d),
                        _ => None,
                    })
                    .map(bindings_config)
                    .unwrap_or_default()
            });
            self.shared.bindings.store(table);
        }
        self.shared.install(snapshot);

        // Closing listeners stop accepting now and end their flows when the
        // drain time is over.
        let retire_tcp = |t: TcpRun| {
            let _ = t.stop.send(true);
            let closing = t.closing;
            let shared = self.shared.clone();
            self.keep(tokio::spawn(async move {
                tokio::time::sleep(drain).await;
                shared.close_listener(&closing);
            }));
        };
        for (name, kind, configured, l) in p.tcp {
            let bound = l.local_addr().unwrap_or(configured);
            let (stop, stop_rx) = watch::channel(false);
            let closing = CancellationToken::new();
            self.keep(listener::spawn(
                Arc::from(name.as_str()),
                l,
                self.shared.clone(),
                stop_rx,
                closing.clone(),
            ));
            let fresh = TcpRun {
                kind,
                configured,
                bound,
                stop,
                closing,
                applied: None,
            };
            if let Some(old) = running.tcp.insert(name, fresh) {
                retire_tcp(old);
            }
        }
        // `quic` listeners live among the TCP ones: the same keep, rebind
        // and retire rules, a UDP socket and task of their own.
        for (name, kind, configured, socket) in p.udp {
            let bound = socket.local_addr().unwrap_or(configured);
            let (stop, stop_rx) = watch::channel(false);
            let closing = CancellationToken::new();
            let (applied, applied_rx) = watch::channel(0);
            self.keep(listener::spawn_quic(
                Arc::from(name.as_str()),
                socket,
                self.shared.clone(),
                stop_rx,
                closing.clone(),
                applied,
            ));
            let fresh = TcpRun {
                kind,
                configured,
                bound,
                stop,
                closing,
                applied: Some(applied_rx),
            };
            if let Some(old) = running.tcp.insert(name, fresh) {
                retire_tcp(old);
            }
        }
        let gone: Vec<String> = running
            .tcp
            .keys()
            .filter(|n| !names.iter().any(|(m, k)| m == *n && *k != ListenerType::Dns))
            .cloned()
            .collect();
        for n in gone {
            if let Some(t) = running.tcp.remove(&n) {
                report.removed.push(n);
                retire_tcp(t);
            }
        }

        for (name, spec, core) in p.dns_swap {
            if let Some(r) = running.dns.get_mut(&name) {
                r.handle.swap(core);
                r.spec = spec;
            }
        }
        for (name, spec, server) in p.dns_new {
            let bound = server.local_addr();
            let handle = server.handle();
            let cancel = CancellationToken::new();
            let token = cancel.clone();
            self.keep(tokio::spawn(async move {
                if let Err(e) = server.run(token).await {
                    tracing::error!(error = %e, "DNS listener stopped");
                }
            }));
            let fresh = DnsRun {
                spec,
                bound,
                handle,
                cancel,
            };
            if let Some(old) = running.dns.insert(name, fresh) {
                old.cancel.cancel();
            }
        }
        let gone: Vec<String> = running
            .dns
            .keys()
            .filter(|n| !names.iter().any(|(m, k)| m == *n && *k == ListenerType::Dns))
            .cloned()
            .collect();
        for n in gone {
            if let Some(d) = running.dns.remove(&n) {
                report.removed.push(n);
                d.cancel.cancel();
            }
        }

        if let Some((configured, l)) = p.admin {
            let bound = l.local_addr().unwrap_or(configured);
            let (stop, stop_rx) = watch::channel(false);
            self.keep(admin::spawn(
                Admin {
                    shared: self.shared.clone(),
                    metrics: self.metrics.clone(),
                    log: self.log.clone(),
                    reload: Some(self.reload_tx.clone()),
                    xds: self.xds_status.clone(),
                    bound: self.bound.clone(),
                },
                l,
                stop_rx,
            ));
            if let Some(old) = running.admin.replace(AdminRun {
                configured,
                bound,
                stop,
            }) {
                let _ = old.stop.send(true);
            }
        }

        let mut bound = BTreeMap::new();
        for (n, t) in &running.tcp {
            bound.insert(n.clone(), (t.kind, t.bound));
        }
        for (n, d) in &running.dns {
            bound.insert(n.clone(), (ListenerType::Dns, d.bound));
        }
        report.listeners = bound.iter().map(|(n, (_, a))| (n.clone(), *a)).collect();
        *self.bound.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = bound;
        for list in [
            &mut report.added,
            &mut report.changed,
            &mut report.rebound,
            &mut report.removed,
        ] {
            list.sort();
        }
    }
}

/// The xDS client's way into the runtime: a weak reference, so a client
/// task outliving the server applies nothing.
#[derive(Debug)]
struct XdsApply {
    inner: std::sync::Weak<Inner>,
}

impl crate::xds::Apply for XdsApply {
    async fn apply(&self, resources: sluice_api::config::Resources) -> crate::xds::Applied {
        use crate::xds::Applied;
        let Some(inner) = self.inner.upgrade() else {
            return Applied::Refused {
                message: "the gateway is shutting down".into(),
                dangling: false,
            };
        };
        match inner.apply_resources(resources).await {
            Ok(report) => Applied::Done(report.to_string()),
            Err(e) => {
                // Only names left undefined: the resource that defines
                // them may be the next to arrive.
                let dangling = match &e {
                    ReloadError::Config(errors) => errors.iter().all(|x| {
                        matches!(
                            x.kind,
                            sluice_api::ConfigErrorKind::UnknownGroup { .. }
                                | sluice_api::ConfigErrorKind::UnknownWorkload { .. }
                                | sluice_api::ConfigErrorKind::UnknownPlugin { .. }
                                | sluice_api::ConfigErrorKind::UnknownListener { .. }
                        )
                    }),
                    // A chain names a plugin whose ECDS resource may be next.
                    ReloadError::Start(StartError::Plan(crate::listener::SnapshotError::Filter(_))) => true,
                    _ => false,
                };
                Applied::Refused {
                    message: e.to_string(),
                    dangling,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The upstream socket pool settings of `sluice.yaml` reach the DNS
    /// engine's configuration.
    #[test]
    fn dns_listener_pool_settings_reach_the_engine() {
        let yaml = "listeners:\n  - name: dns\n    kind: dns\n    address: 127.0.0.1:0\n    upstreams: [\"127.0.0.1:9\"]\n    upstream_sockets: 4\n    upstream_socket_max_queries: 50\n    upstream_socket_max_age: 3s\n";
        let cfg = sluice_api::config::load_str(yaml, "t.yaml").unwrap_or_else(|e| panic!("{e}"));
        let ListenerKind::Dns(l) = &cfg.listeners[0].kind else {
            unreachable!()
        };
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!());
        let d = dns_config("dns", addr, l, Mode::Enforce).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.upstream_udp_sockets, 4);
        assert_eq!(d.upstream_socket_max_queries, 50);
        assert_eq!(d.upstream_socket_max_age, Duration::from_secs(3));
    }

    #[test]
    fn resolv_conf_nameservers() {
        let text = "# comment\nsearch example.com\nnameserver 10.0.0.2\nnameserver fd00::53\nnameserver 127.0.0.1\nnameserver bogus\noptions ndots:2\n";
        let own: SocketAddr = "127.0.0.1:53".parse().unwrap_or_else(|_| unreachable!());
        let got: Vec<SocketAddr> = nameservers_in(text, own).iter().map(|u| u.addr).collect();
        let want: Vec<SocketAddr> = ["10.0.0.2:53", "[fd00::53]:53"]
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect();
        assert_eq!(got, want);
        assert!(nameservers_in("", own).is_empty());
    }
}
