//! Process settings: the admin API, the audit sink, the runtime, the
//! resolver the data plane dials names with.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use super::raw::{self, S};
use super::{ConfigErrorKind, DEFAULT_AUDIT_QUEUE, Validator, pos};
use crate::model::*;

impl Validator {
    pub(super) fn admin(&mut self, raw: Option<&S<raw::RawAdmin>>) -> AdminConfig {
        match raw {
            Some(a) if self.require(&a.value.address, a.referenced, "admin", "address") => AdminConfig {
                address: self.socket(&a.value.address, "admin.address"),
            },
            _ => AdminConfig {
                address: SocketAddr::from(([127, 0, 0, 1], 9901)),
            },
        }
    }

    /// `runtime.plugin_cache`: a directory, or `off`.
    pub(super) fn plugin_cache(&mut self, raw: Option<&raw::RawRuntime>) -> PluginCache {
        let Some(c) = raw.and_then(|r| r.plugin_cache.as_ref()) else {
            return PluginCache::Default;
        };
        match c.value.trim() {
            "off" | "none" => PluginCache::Off,
            "" => {
                self.err(
                    c.referenced,
                    "runtime.plugin_cache",
                    ConfigErrorKind::InvalidValue {
                        message: "plugin_cache is empty; write a directory, or `off`".into(),
                    },
                );
                PluginCache::Default
            }
            dir => PluginCache::Dir(PathBuf::from(dir)),
        }
    }

    /// `runtime.plugin_ca`: the PEM file of the CAs plugins' `https://`
    /// upstreams must chain to (`None`: the built-in Mozilla roots).
    pub(super) fn plugin_ca(&mut self, raw: Option<&raw::RawRuntime>) -> Option<PathBuf> {
        let c = raw.and_then(|r| r.plugin_ca.as_ref())?;
        match c.value.trim() {
            "" => {
                self.err(
                    c.referenced,
                    "runtime.plugin_ca",
                    ConfigErrorKind::InvalidValue {
                        message: "plugin_ca is empty; write the path of a PEM file of CA certificates, or leave it out for the built-in roots".into(),
                    },
                );
                None
            }
            path => Some(PathBuf::from(path)),
        }
    }

    /// `runtime`: the number of workers (`None`: one per core) and the drain time.
    pub(super) fn runtime(&mut self, raw: Option<&raw::RawRuntime>) -> (Option<usize>, Duration) {
        let Some(r) = raw else {
            return (None, Duration::from_secs(10));
        };
        let workers = self.bounded(&r.workers, "runtime.workers".into(), 0, 0, 1024) as usize;
        let drain = self.duration(
            &r.drain_timeout,
            "runtime.drain_timeout".into(),
            Duration::from_secs(10),
            Duration::from_secs(3600),
        );
        ((workers > 0).then_some(workers), drain)
    }

    pub(super) fn audit(&mut self, raw: Option<&S<raw::RawAudit>>) -> AuditConfig {
        let stdout = AuditConfig {
            destination: AuditDestination::Stdout,
            queue: DEFAULT_AUDIT_QUEUE,
        };
        let Some(a) = raw else {
            return stdout;
        };
        if !self.require(&a.value.destination, a.referenced, "audit", "destination") {
            return stdout;
        }
        let a = &a.value;
        let destination = match a.destination.value.trim() {
            "stdout" | "-" => AuditDestination::Stdout,
            "stderr" => AuditDestination::Stderr,
            "" => {
                self.err(
                    a.destination.referenced,
                    "audit.destination",
                    ConfigErrorKind::InvalidValue {
                        message: "audit destination is empty; write `stdout`, `stderr` or a file path".into(),
                    },
                );
                AuditDestination::Stdout
            }
            p => AuditDestination::File(PathBuf::from(p)),
        };
        let queue = match &a.queue {
            None => DEFAULT_AUDIT_QUEUE,
            Some(q) if q.value == 0 || q.value > 16_777_216 => {
                self.err(
                    q.referenced,
                    "audit.queue",
                    ConfigErrorKind::InvalidValue {
                        message: format!("audit queue size {} is out of range; use 1 to 16777216", q.value),
                    },
                );
                DEFAULT_AUDIT_QUEUE
            }
            Some(q) => q.value as usize,
        };
        AuditConfig { destination, queue }
    }

    pub(super) fn resolver(&mut self, raw: Option<&raw::RawResolver>) -> ResolverConfig {
        let Some(r) = raw else { return ResolverConfig::default() };
        let mut out = ResolverConfig::default();
        for (i, ns) in r.nameservers.iter().enumerate() {
            let v = ns.value.trim();
            // A bare address means port 53.
            let parsed = v
                .parse::<SocketAddr>()
                .ok()
                .or_else(|| v.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)));
            match parsed {
                Some(a) => out.nameservers.push(a),
                None => self.err(
                    ns.referenced,
                    format!("resolver.nameservers[{i}]"),
                    ConfigErrorKind::InvalidSocketAddress { value: v.to_owned() },
                ),
            }
        }
        for (name, ips) in &r.hosts {
            let canonical = match crate::domain::DomainName::parse(name) {
                Ok(n) => n.to_string(),
                Err(source) => {
                    self.err(
                        ips.referenced,
                        format!("resolver.hosts.{name}"),
                        ConfigErrorKind::InvalidDomain {
                            pattern: name.clone(),
                            source,
                        },
                    );
                    continue;
                }
            };
            let addrs = ips
                .value
                .iter()
                .enumerate()
                .filter_map(|(i, ip)| self.ip(ip, &format!("resolver.hosts.{name}[{i}]")))
                .collect();
            out.hosts_at.insert(canonical.clone(), pos(ips.referenced));
            out.hosts.insert(canonical, addrs);
        }
        out
    }

    /// `xds`: the control servers and the node.
    pub(super) fn xds(&mut self, x: &S<raw::RawXds>) -> Option<XdsBootstrap> {
        let at = x.referenced;
        let x = &x.value;
        let mut servers = Vec::new();
        for (i, s) in x.servers.iter().enumerate() {
            match HostPort::parse(&s.value) {
                Some(hp) => servers.push(hp),
                None => self.err(
                    s.referenced,
                    format!("xds.servers[{i}]"),
                    ConfigErrorKind::InvalidValue {
                        message: format!(
                            "`{}` is not a server address; write `host:port`, e.g. `xds.internal:18000` or `127.0.0.1:18000`",
                            s.value
                        ),
                    },
                ),
            }
        }
        if x.servers.is_empty() {
            self.err(
                at,
                "xds.servers",
                ConfigErrorKind::InvalidValue {
                    message: "no control server is listed; add at least one `host:port`".into(),
                },
            );
        }
        let node = match &x.node {
            Some(n) if self.require(&n.value.id, n.referenced, "xds.node", "id") => {
                let id = n.value.id.value.trim().to_owned();
                if id.is_empty() {
                    self.err(
                        n.value.id.referenced,
                        "xds.node.id",
                        ConfigErrorKind::InvalidValue {
                            message: "the node id is empty; name this gateway, e.g. `gw-eu-1`".into(),
                        },
                    );
                }
                XdsNode {
                    id,
                    cluster: n.value.cluster.clone().unwrap_or_default(),
                    metadata: n.value.metadata.clone(),
                }
            }
            Some(_) => return None,
            None => {
                let _ = self.require(&raw::missing::<String>(), at, "xds", "node");
                return None;
            }
        };
        let delta = match x.protocol.as_ref().map(|p| (p, p.value.trim())) {
            None | Some((_, "delta")) => true,
            Some((_, "sotw")) => false,
            Some((p, other)) => {
                self.err(
                    p.referenced,
                    "xds.protocol",
                    ConfigErrorKind::UnknownValue {
                        value: other.to_owned(),
                        expected: vec!["delta".into(), "sotw".into()],
                        suggestion: None,
                    },
                );
                true
            }
        };
        let initial_fetch_timeout = self.duration(
            &x.initial_fetch_timeout,
            "xds.initial_fetch_timeout".into(),
            Duration::from_secs(15),
            Duration::from_secs(600),
        );
        let tls = x.tls.as_ref().and_then(|t| self.xds_tls(t));
        Some(XdsBootstrap {
            servers,
            node,
            delta,
            initial_fetch_timeout,
            tls,
            listeners: x.listeners,
        })
    }

    fn xds_tls(&mut self, t: &S<raw::RawXdsTls>) -> Option<XdsTls> {
        let (at, t) = (t.referenced, &t.value);
        if !self.require(&t.ca, at, "xds.tls", "ca") {
            return None;
        }
        let identity = match (&t.cert, &t.key) {
            (Some(c), Some(k)) => Some((PathBuf::from(c.value.trim()), PathBuf::from(k.value.trim()))),
            (None, None) => None,
            (Some(one), None) | (None, Some(one)) => {
                self.err(
                    one.referenced,
                    "xds.tls",
                    ConfigErrorKind::InvalidValue {
                        message: "give both `cert` and `key` (mutual TLS), or neither".into(),
                    },
                );
                None
            }
        };
        Some(XdsTls {
            ca: PathBuf::from(t.ca.value.trim()),
            identity,
            server_name: t.server_name.as_ref().map(|s| s.value.trim().to_owned()),
        })
    }
}
