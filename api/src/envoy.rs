//! The Envoy-shaped model the data plane serves, as plain data, and the
//! translator from `sluice.yaml`'s friendly listeners into it.
//!
//! A listener holds filter chains, picked by what a flow shows (server
//! name, destination port, source and destination prefixes, transport); a
//! chain names its network filters in order and ends in a cluster that says
//! where an allowed flow goes. The proxy turns these into running plans
//! (filter names into filters); the control server will send the same model
//! over xDS, so the local-file mode and `sluice-xds` share this translator.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::Serialize;

use crate::domain::{DomainName, DomainPattern};
use crate::model::{
    Action, ConnectionOptions, EchPolicy, HostPort, Listener, ListenerKind, PeekOptions, PortRange, ProxyUser, SniCheck,
};

/// The built-in filter that runs first on every chain: ECH, SNI against the
/// CONNECT target, no SNI in a tunnel, Host against the target, plain text
/// or no SNI where the destination is the SNI.
pub const ANTI_EVASION: &str = "sluice.anti-evasion";
/// The built-in policy filter: the guard, the rules, the default.
pub const POLICY: &str = "sluice.policy";

/// A TCP listener as the data plane serves it (Envoy's `Listener`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenerResource {
    pub name: String,
    pub address: SocketAddr,
    /// Accepted connections may be addressed to anything (iptables
    /// `TPROXY`): the socket is bound with `IP_TRANSPARENT` (Envoy's
    /// `transparent`).
    pub transparent: bool,
    pub connection: ConnectionOptions,
    /// How a connection's first bytes are read before a chain is chosen.
    pub front: Front,
    /// Tried in order; the first whose match fits the flow serves it.
    pub chains: Vec<ChainResource>,
}

/// What a listener reads from a connection before anything is decided
/// (Envoy's listener filters and the HTTP connection manager, in the
/// subset Sluice needs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Front {
    /// An explicit proxy: a `CONNECT` or absolute-form request head, then,
    /// inside a tunnel, the first bytes as for [`Front::Inspect`].
    HttpProxy {
        peek: PeekOptions,
        /// A ClientHello without SNI in a tunnel to a named target.
        connect_no_sni: Action,
        /// Basic proxy authentication when non-empty.
        users: Vec<ProxyUser>,
    },
    /// The first bytes, classified: a ClientHello, a plain HTTP request
    /// head, or opaque (Envoy's `tls_inspector` and `http_inspector`).
    Inspect { peek: PeekOptions },
    /// Nothing is read: opaque TCP.
    Raw,
}

impl Front {
    pub fn peek(&self) -> Option<&PeekOptions> {
        match self {
            Self::HttpProxy { peek, .. } | Self::Inspect { peek } => Some(peek),
            Self::Raw => None,
        }
    }

    /// A ClientHello with ECH is denied (`ech: deny`).
    pub fn denies_ech(&self) -> bool {
        self.peek().is_some_and(|p| p.ech == EchPolicy::Deny)
    }
}

/// What the first bytes of a flow turned out to be (Envoy's
/// `transport_protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    Tls,
    RawBuffer,
}

/// Envoy's `FilterChainMatch`, the subset Sluice supports. An empty list
/// matches anything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ChainMatch {
    pub server_names: Vec<DomainPattern>,
    pub destination_ports: Vec<PortRange>,
    pub source_prefixes: Vec<IpNet>,
    pub destination_prefixes: Vec<IpNet>,
    pub transport_protocol: Option<Transport>,
}

impl ChainMatch {
    pub fn matches(
        &self,
        name: Option<&DomainName>,
        port: u16,
        src: IpAddr,
        dst: Option<IpAddr>,
        transport: Transport,
    ) -> bool {
        let name_ok =
            self.server_names.is_empty() || name.is_some_and(|n| self.server_names.iter().any(|p| p.matches(n)));
        let port_ok = self.destination_ports.is_empty() || self.destination_ports.iter().any(|p| p.contains(port));
        let src_ok =
            self.source_prefixes.is_empty() || self.source_prefixes.iter().any(|p| p.contains(&src.to_canonical()));
        let dst_ok = self.destination_prefixes.is_empty()
            || dst.is_some_and(|d| self.destination_prefixes.iter().any(|p| p.contains(&d.to_canonical())));
        let transport_ok = self.transport_protocol.is_none_or(|t| t == transport);
        name_ok && port_ok && src_ok && dst_ok && transport_ok
    }
}

/// Where an allowed flow is sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Cluster {
    /// The `CONNECT` target or absolute-form URI of an explicit proxy
    /// request.
    RequestTarget,
    /// The destination before iptables `REDIRECT`/`TPROXY`, checked against
    /// the SNI per [`SniCheck`] (Envoy's `ORIGINAL_DST`).
    OriginalDst { sni_check: SniCheck },
    /// The SNI, resolved, on a fixed port (Envoy's
    /// `sni_dynamic_forward_proxy`). A flow without SNI has nowhere to go.
    SniDynamic { port: u16 },
    /// A fixed `host:port`.
    Static { upstream: HostPort },
}

/// One filter chain: when it applies, its network filters by name (in the
/// order they run), and its cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainResource {
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: ChainMatch,
    pub filters: Vec<String>,
    pub cluster: Cluster,
}

/// Translates a friendly listener: one chain matching everything, with the
/// built-in filters, then each of `plugins` that serves the listener (in
/// declaration order), and the cluster its kind implies. `None` for a `dns`
/// listener, which the DNS proxy serves (not filter chains).
pub fn translate(l: &Listener, plugins: &[crate::Plugin]) -> Option<ListenerResource> {
    let (front, cluster) = match &l.kind {
        ListenerKind::HttpProxy(o) => (
            Front::HttpProxy {
                peek: o.peek,
                connect_no_sni: o.connect_no_sni,
                users: o.users.clone(),
            },
            Cluster::RequestTarget,
        ),
        ListenerKind::Transparent(o) => (
            Front::Inspect { peek: o.peek },
            Cluster::OriginalDst { sni_check: o.sni_check },
        ),
        ListenerKind::Sni(o) => (
            Front::Inspect { peek: o.peek },
            Cluster::SniDynamic { port: o.upstream_port },
        ),
        ListenerKind::Tcp(o) => (
            Front::Raw,
            match &o.upstream {
                Some(upstream) => Cluster::Static {
                    upstream: upstream.clone(),
                },
                None => Cluster::OriginalDst {
                    sni_check: SniCheck::Off,
                },
            },
        ),
        ListenerKind::Dns(_) => return None,
    };
    Some(ListenerResource {
        name: l.name.clone(),
        address: l.address,
        transparent: matches!(l.kind, ListenerKind::Transparent(_)),
        connection: *l.kind.connection()?,
        front,
        chains: vec![ChainResource {
            name: format!("{}/default", l.name),
            matcher: ChainMatch::default(),
            filters: [ANTI_EVASION, POLICY]
                .into_iter()
                .map(str::to_owned)
                .chain(plugins.iter().filter(|p| p.serves(&l.name)).map(|p| p.name.clone()))
                .collect(),
            cluster,
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;

    fn listeners(yaml: &str) -> Vec<Option<ListenerResource>> {
        let cfg = load_str(&format!("listeners:\n{yaml}"), "t.yaml").unwrap_or_else(|e| panic!("{e}"));
        cfg.listeners.iter().map(|l| translate(l, &cfg.plugins)).collect()
    }

    #[test]
    fn each_kind_gets_its_front_and_cluster() {
        let got = listeners(
            "  - {name: p, kind: http-proxy, address: \"127.0.0.1:0\", connect_no_sni: allow}
  - {name: t, kind: transparent, address: \"127.0.0.1:0\", sni_check: off}
  - {name: s, kind: sni, address: \"127.0.0.1:0\", upstream_port: 8443}
  - {name: c, kind: tcp, address: \"127.0.0.1:0\", upstream: \"[fd00::5]:5432\"}
  - {name: o, kind: tcp, address: \"127.0.0.1:0\"}
  - {name: d, kind: dns, address: \"127.0.0.1:0\"}
",
        );
        let [Some(p), Some(t), Some(s), Some(c), Some(o), None] = got.as_slice() else {
            panic!("{got:?}")
        };
        assert!(matches!(
            p.front,
            Front::HttpProxy {
                connect_no_sni: Action::Allow,
                ..
            }
        ));
        assert_eq!(p.chains[0].cluster, Cluster::RequestTarget);
        assert!(t.transparent && !p.transparent);
        assert_eq!(
            t.chains[0].cluster,
            Cluster::OriginalDst {
                sni_check: SniCheck::Off
            }
        );
        assert_eq!(s.chains[0].cluster, Cluster::SniDynamic { port: 8443 });
        assert_eq!(
            c.chains[0].cluster,
            Cluster::Static {
                upstream: HostPort {
                    host: "fd00::5".into(),
                    port: 5432
                }
            }
        );
        assert_eq!(c.front, Front::Raw);
        assert_eq!(
            o.chains[0].cluster,
            Cluster::OriginalDst {
                sni_check: SniCheck::Off
            }
        );
        for l in [p, t, s, c, o] {
            assert_eq!(l.chains.len(), 1);
            assert_eq!(l.chains[0].filters, [ANTI_EVASION, POLICY]);
            assert_eq!(l.chains[0].matcher, ChainMatch::default());
        }
        assert!(s.front.denies_ech() && !c.front.denies_ech());
    }

    #[test]
    fn chains_match_on_what_the_flow_shows() {
        let m = ChainMatch {
            server_names: vec![DomainPattern::parse("*.example.com").unwrap_or_else(|e| panic!("{e}"))],
            destination_ports: vec![PortRange { lo: 443, hi: 443 }],
            source_prefixes: vec!["10.0.0.0/8".parse().unwrap_or_else(|e| panic!("{e}"))],
            destination_prefixes: Vec::new(),
            transport_protocol: Some(Transport::Tls),
        };
        let name = DomainName::parse("api.example.com").ok();
        let src: IpAddr = "10.1.2.3".parse().unwrap_or_else(|e| panic!("{e}"));
        assert!(m.matches(name.as_ref(), 443, src, None, Transport::Tls));
        assert!(!m.matches(name.as_ref(), 443, src, None, Transport::RawBuffer));
        assert!(!m.matches(name.as_ref(), 80, src, None, Transport::Tls));
        assert!(!m.matches(None, 443, src, None, Transport::Tls));
        // An IPv4-mapped source is the IPv4 address it maps.
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap_or_else(|e| panic!("{e}"));
        assert!(m.matches(name.as_ref(), 443, mapped, None, Transport::Tls));
    }
}
