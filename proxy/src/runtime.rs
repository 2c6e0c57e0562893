//! Starting and stopping a whole Sluice process: bind every listener and
//! the admin API, share one compiled snapshot, and on shutdown stop
//! accepting, let flows drain, then close what is left and flush the audit
//! log. `sluice run` and the black-box tests both go through [`Server`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_api::{AuditDestination, Config, DnsDeny, DnsListener, DnsTransport, ListenerKind, Mode, Protocol};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::dns::{
    self, Bindings, BindingsConfig, DnsConfig, DnsCore, DnsServer, DnsStats, QueryPolicy, QueryVerdict, VerdictMemo,
};
use crate::policy::{Enforcement, FlowQuery};
use crate::telemetry::audit::{AuditRecord, DnsAuditLog, SourceGroups};

use crate::admin::{self, Admin};
use crate::forward::{Resolver, ResolverSettings};
use crate::listener::{self, ListenerPlan, Shared, Snapshot};
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
            QueryVerdict {
                allowed: v.action == sluice_api::Action::Allow,
                enforced: v.enforcement == Enforcement::Enforced,
                rule: snap.rule_label(v.decided_by),
                reason: v.reason.as_str(),
            }
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
#[derive(Debug)]
pub struct Server {
    /// Bound address of each listener, by name (port 0 resolved).
    pub listeners: BTreeMap<String, (ListenerKind, SocketAddr)>,
    pub admin: SocketAddr,
    pub shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    dns_cancel: CancellationToken,
    /// Things the operator should know that did not stop the start.
    pub warnings: Vec<String>,
}

impl Server {
    pub async fn start(config: Config, log: Option<LogControl>) -> Result<Self, StartError> {
        let metrics_handle = metrics::install().map_err(|e| StartError::Metrics(e.to_string()))?;
        drop(metrics::spawn_upkeep(metrics_handle.clone(), Duration::from_secs(5)));
        let sink = match &config.audit.destination {
            AuditDestination::Stdout => AuditSink::Stdout,
            AuditDestination::Stderr => AuditSink::Stderr,
            AuditDestination::File(p) => AuditSink::File(p.clone()),
        };
        let audit: AuditWriter<AuditRecord> =
            AuditWriter::start(sink, config.audit.queue).map_err(|e| StartError::Audit(e.to_string()))?;
        let resolver = if config.resolver.nameservers.is_empty() {
            Resolver::system().or_else(|_| Resolver::new(&ResolverSettings::with_nameservers(Vec::new())))
        } else {
            Resolver::new(&ResolverSettings::with_nameservers(config.resolver.nameservers.clone()))
        }
        .map_err(|e| StartError::Resolver(e.to_string()))?;
        let (stop, stop_rx) = watch::channel(false);

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

        // One binding table for every DNS listener: the data plane asks it
        // whatever listener answered the client.
        let dns_specs: Vec<(String, SocketAddr, DnsListener)> = config
            .listeners
            .iter()
            .filter_map(|l| l.dns.clone().map(|d| (l.name.clone(), l.address, d)))
            .collect();
        let dns_stats = Arc::new(DnsStats::default());
        let bindings = dns_specs
            .first()
            .map(|(_, _, d)| Arc::new(Bindings::with_stats(&bindings_config(d), dns_stats.clone())));
        let mode = config.policy.mode;
        let shared = Arc::new(Shared::new(
            Snapshot::new(config),
            audit,
            resolver,
            bindings.clone(),
            stop_rx.clone(),
        ));
        let mut tasks = Vec::new();
        let dns_cancel = CancellationToken::new();
        let mut warnings = Vec::new();
        for (name, addr, d) in dns_specs {
            let cfg = match dns_config(&name, addr, &d, mode) {
                Ok(c) => c,
                // Relying on the system's resolvers and finding none: serve
                // everything else (the embedded default must start on any
                // machine) and say why this listener is missing.
                Err(StartError::Dns { message, .. }) if d.upstreams.is_empty() => {
                    warnings.push(format!("DNS listener `{name}` not started: {message}"));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let policy: Arc<dyn QueryPolicy> = Arc::new(SnapshotQueries(shared.clone()));
            let table = bindings
                .clone()
                .unwrap_or_else(|| Arc::new(Bindings::with_stats(&cfg.bindings, dns_stats.clone())));
            let core = DnsCore::new(cfg, policy, table, dns_stats.clone()).map_err(|e| StartError::Dns {
                name: name.clone(),
                message: e.to_string(),
            })?;
            // Audit lines (with the source's SmartGroups from the snapshot
            // current at the query) and metrics are made on the DNS worker
            // and reach the writer thread in batches.
            let groups_of = shared.clone();
            let groups: SourceGroups = Box::new(move |ip, each| {
                let snap = groups_of.snapshot.load();
                snap.policy.smartgroups_of(ip).into_iter().for_each(each);
            });
            let sink = DnsAuditLog::start(shared.audit.clone(), &name, groups);
            let server = DnsServer::bind_with_sink(addr, Arc::new(core), sink)
                .await
                .map_err(|e| StartError::Dns {
                    name: name.clone(),
                    message: e.to_string(),
                })?;
            listeners.insert(name.clone(), (ListenerKind::Dns, server.local_addr()));
            let token = dns_cancel.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = server.run(token).await {
                    tracing::error!(error = %e, "DNS listener stopped");
                }
            }));
        }
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
            tasks,
            dns_cancel,
            warnings,
        })
    }

    /// Bound address of listener `name`.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners.get(name).map(|(_, a)| *a)
    }

    /// Replaces the running configuration: new flows use it at once, and
    /// relayed flows it now denies are closed and recorded.
    pub fn reload(&self, config: Config) {
        self.shared.install(Snapshot::new(config));
    }

    /// Stops accepting, waits up to `drain` for flows to finish, closes the
    /// rest, and flushes the audit log.
    pub async fn shutdown(self, drain: Duration) {
        let _ = self.stop.send(true);
        self.dns_cancel.cancel();
        let deadline = tokio::time::Instant::now() + drain;
        while self.shared.active_flows() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.shared.force_close();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The upstream socket pool settings of `sluice.yaml` reach the DNS
    /// engine's configuration.
    #[test]
    fn dns_listener_pool_settings_reach_the_engine() {
        let yaml = "listeners:\n  - name: dns\n    kind: dns\n    address: 127.0.0.1:0\n    upstreams: [\"127.0.0.1:9\"]\n    upstream_sockets: 4\n    upstream_socket_max_queries: 50\n    upstream_socket_max_age: 3s\n";
        let cfg = sluice_api::config::load_str(yaml, "t.yaml").unwrap_or_else(|e| panic!("{e}"));
        let l = cfg.listeners[0].dns.as_ref().unwrap_or_else(|| unreachable!());
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
