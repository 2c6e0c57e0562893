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
use std::time::Duration;

use ipnet::IpNet;
use serde::Serialize;

use crate::domain::{DomainName, DomainPattern};
pub use crate::xds::model::{DnsFamily, DnsSettings, Endpoint, EndpointAddress, Health, LbPolicy, Locality};

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
    /// The destination before iptables `REDIRECT` is read for every
    /// connection (Envoy's `original_dst` listener filter), and chains
    /// match on it.
    pub original_dst: bool,
    /// Chosen by Envoy's rules: criterion by criterion, the most specific
    /// match ([`select`]).
    pub chains: Vec<ChainResource>,
    /// Serves a flow no chain matches (Envoy's `default_filter_chain`);
    /// without one, such a flow is refused (`no-filter-chain`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_chain: Option<ChainResource>,
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
    Inspect {
        peek: PeekOptions,
        /// When the first bytes do not come within the peek timeout, the
        /// flow goes on as opaque TCP instead of being refused (Envoy's
        /// `continue_on_listener_filters_timeout`).
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        continue_on_timeout: bool,
    },
    /// Nothing is read: opaque TCP.
    Raw,
    /// UDP datagrams, grouped into flows by 4-tuple; a flow's Initial
    /// packets are decrypted for their ClientHello (`kind: quic`). Served
    /// by the QUIC listener, never by the TCP accept loop.
    Quic {
        peek: PeekOptions,
        /// `quic: block`: every flow is dropped (`quic-blocked`).
        block: bool,
        /// `migration: same-address`: a client that moves to another port
        /// of its address keeps its only flow there.
        follow_address: bool,
    },
}

impl Front {
    pub fn peek(&self) -> Option<&PeekOptions> {
        match self {
            Self::HttpProxy { peek, .. } | Self::Inspect { peek, .. } | Self::Quic { peek, .. } => Some(peek),
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
    /// ALPN values from the ClientHello.
    pub application_protocols: Vec<String>,
    /// The client's port.
    pub source_ports: Vec<u16>,
}

/// What a flow shows when its chain is chosen.
#[derive(Debug, Clone, Copy)]
pub struct ChainInput<'a> {
    /// The SNI (Envoy's requested server name).
    pub server_name: Option<&'a DomainName>,
    /// The port the client dialled (before a redirect, if any).
    pub port: u16,
    pub src: IpAddr,
    pub src_port: u16,
    /// The address the client dialled (before a redirect, if any).
    pub dst: Option<IpAddr>,
    pub transport: Transport,
    /// The ClientHello's ALPN values, in the client's order.
    pub alpn: &'a [String],
}

/// How one criterion of a chain's match meets a flow: the chain does not
/// constrain it, constrains it and fails, or matches with a specificity
/// (higher is more specific).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fit {
    Any,
    No,
    Yes(u32),
}

impl ChainMatch {
    /// Every criterion fits (a chain considered alone).
    pub fn matches(&self, input: &ChainInput<'_>) -> bool {
        self.fits(input).iter().all(|f| *f != Fit::No)
    }

    /// Each criterion, in the order Envoy narrows by them.
    fn fits(&self, f: &ChainInput<'_>) -> [Fit; 7] {
        let src = f.src.to_canonical();
        [
            fit(&self.destination_ports, |r| {
                r.contains(f.port).then(|| u32::MAX - u32::from(r.hi - r.lo))
            }),
            match f.dst.map(|d| d.to_canonical()) {
                Some(d) => fit(&self.destination_prefixes, |p| {
                    p.contains(&d).then_some(u32::from(p.prefix_len()))
                }),
                None if self.destination_prefixes.is_empty() => Fit::Any,
                None => Fit::No,
            },
            match f.server_name {
                Some(n) => fit(&self.server_names, |p| {
                    p.matches(n).then(|| match p {
                        DomainPattern::Exact(_) => u32::MAX,
                        DomainPattern::Subdomains(suffix) => suffix.as_str().len() as u32 + 1,
                        DomainPattern::Any => 0,
                    })
                }),
                None if self.server_names.is_empty() => Fit::Any,
                None => Fit::No,
            },
            match self.transport_protocol {
                None => Fit::Any,
                Some(t) if t == f.transport => Fit::Yes(1),
                Some(_) => Fit::No,
            },
            // The client's first protocol that some chain names wins.
            fit(&self.application_protocols, |p| {
                f.alpn.iter().position(|a| a == p).map(|i| u32::MAX - i as u32)
            }),
            fit(&self.source_prefixes, |p| {
                p.contains(&src).then_some(u32::from(p.prefix_len()))
            }),
            fit(&self.source_ports, |p| (*p == f.src_port).then_some(1)),
        ]
    }
}

/// How a list criterion fits: its best entry's specificity.
fn fit<T>(list: &[T], score: impl Fn(&T) -> Option<u32>) -> Fit {
    if list.is_empty() {
        return Fit::Any;
    }
    list.iter().filter_map(score).max().map_or(Fit::No, Fit::Yes)
}

/// The chain that serves a flow, by Envoy's rules: criterion by criterion
/// (destination port, destination address, server name, transport,
/// application protocol, source address, source port), the chains whose most specific
/// value matches are kept — an exact name before `*.example.com`, a longer
/// prefix before a shorter one — and only when none constrains the
/// criterion and matches do the chains that leave it open stay. There is
/// no going back: once a more specific chain was kept for one criterion, a
/// later criterion it fails ends in no chain at all, even if a chain set
/// aside earlier would have fit. `None`: no chain; the default chain, if
/// any, serves the flow.
pub fn select<T>(chains: &[T], matcher: impl Fn(&T) -> &ChainMatch, input: &ChainInput<'_>) -> Option<usize> {
    if let [only] = chains {
        return matcher(only).matches(input).then_some(0);
    }
    let fits: Vec<[Fit; 7]> = chains.iter().map(|c| matcher(c).fits(input)).collect();
    let mut alive: Vec<usize> = (0..chains.len()).collect();
    for level in 0..7 {
        let at = |i: usize| fits.get(i).map_or(Fit::No, |f| f[level]);
        let best = alive
            .iter()
            .filter_map(|&i| match at(i) {
                Fit::Yes(s) => Some(s),
                _ => None,
            })
            .max();
        alive.retain(|&i| match best {
            Some(b) => at(i) == Fit::Yes(b),
            None => at(i) == Fit::Any,
        });
        if alive.is_empty() {
            return None;
        }
    }
    alive.first().copied()
}

/// Where an allowed flow is sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Cluster {
    /// Endpoints an Envoy cluster lists or resolves, one picked per flow by
    /// the cluster's load balancing.
    Balanced(BalancedCluster),
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

/// An Envoy cluster of endpoints (STATIC, STRICT_DNS, LOGICAL_DNS, EDS).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BalancedCluster {
    pub name: String,
    pub lb: LbPolicy,
    pub endpoints: Endpoints,
    /// Envoy's `overprovisioning_factor`, in percent.
    pub overprovisioning_factor: u32,
}

/// Where a balanced cluster's endpoints come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Endpoints {
    /// Addresses as given (STATIC), or as EDS last delivered them.
    Fixed { localities: Vec<Locality> },
    /// Every address of every name (STRICT_DNS).
    StrictDns {
        localities: Vec<Locality>,
        dns: DnsSettings,
    },
    /// The first address of one name (LOGICAL_DNS).
    LogicalDns { endpoint: HostPort, dns: DnsSettings },
}

/// What an Envoy cluster and its `tcp_proxy` say about connecting and
/// relaying, for a chain from xDS (a friendly listener's chain uses the
/// listener's connection options).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct UpstreamOptions {
    pub connect_timeout: Duration,
    /// `None`: never (Envoy's `0s`).
    pub idle_timeout: Option<Duration>,
    /// Endpoints tried before the flow fails (at least 1).
    pub max_connect_attempts: u32,
    /// The flow is closed this long after it was accepted, whatever
    /// happens (`max_downstream_connection_duration`); `None`: no limit.
    pub max_duration: Option<Duration>,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<UpstreamOptions>,
}

/// A listener delivered as Envoy resources (LDS and CDS), already checked
/// and mapped onto the model: what [`translate`] needs beyond the name and
/// address. Its chains name the built-in filters and the plugins the
/// Envoy chain names (ECDS filters); the plugins whose `listeners` option
/// serves the listener are added when it is translated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FromEnvoy {
    pub transparent: bool,
    pub original_dst: bool,
    pub connection: ConnectionOptions,
    pub front: Front,
    pub chains: Vec<ChainResource>,
    pub default_chain: Option<ChainResource>,
}

/// Translates a friendly listener: one chain matching everything, with the
/// built-in filters, then each of `plugins` that serves the listener (in
/// declaration order), and the cluster its kind implies. `None` for a `dns`
/// listener, which the DNS proxy serves (not filter chains).
pub fn translate(l: &Listener, plugins: &[crate::Plugin]) -> Option<ListenerResource> {
    let serving = || plugins.iter().filter(|p| p.serves(&l.name)).map(|p| p.name.clone());
    let (front, cluster) = match &l.kind {
        ListenerKind::Envoy(e) => {
            // The chain's own plugins, then those that name the listener
            // (once each).
            let with_plugins = |c: &ChainResource| {
                let mut filters = c.filters.clone();
                for p in serving() {
                    if !filters.contains(&p) {
                        filters.push(p);
                    }
                }
                ChainResource { filters, ..c.clone() }
            };
            return Some(ListenerResource {
                name: l.name.clone(),
                address: l.address,
                transparent: e.transparent,
                connection: e.connection,
                front: e.front.clone(),
                original_dst: e.original_dst,
                chains: e.chains.iter().map(with_plugins).collect(),
                default_chain: e.default_chain.as_ref().map(with_plugins),
            });
        }
        ListenerKind::HttpProxy(o) => (
            Front::HttpProxy {
                peek: o.peek,
                connect_no_sni: o.connect_no_sni,
                users: o.users.clone(),
            },
            Cluster::RequestTarget,
        ),
        ListenerKind::Transparent(o) => (
            Front::Inspect {
                peek: o.peek,
                continue_on_timeout: false,
            },
            Cluster::OriginalDst { sni_check: o.sni_check },
        ),
        ListenerKind::Sni(o) => (
            Front::Inspect {
                peek: o.peek,
                continue_on_timeout: false,
            },
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
        ListenerKind::Quic(o) => (
            Front::Quic {
                peek: o.peek,
                block: o.quic == crate::model::QuicMode::Block,
                follow_address: o.migration == crate::model::QuicMigration::SameAddress,
            },
            if o.transparent {
                Cluster::OriginalDst { sni_check: o.sni_check }
            } else {
                Cluster::SniDynamic { port: o.upstream_port }
            },
        ),
        ListenerKind::Dns(_) => return None,
    };
    Some(ListenerResource {
        name: l.name.clone(),
        address: l.address,
        transparent: match &l.kind {
            ListenerKind::Transparent(_) => true,
            ListenerKind::Quic(o) => o.transparent,
            _ => false,
        },
        connection: *l.kind.connection()?,
        front,
        original_dst: matches!(cluster, Cluster::OriginalDst { .. }),
        chains: vec![ChainResource {
            name: format!("{}/default", l.name),
            matcher: ChainMatch::default(),
            filters: [ANTI_EVASION, POLICY]
                .into_iter()
                .map(str::to_owned)
                .chain(serving())
                .collect(),
            cluster,
            upstream: None,
        }],
        default_chain: None,
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

    fn pattern(p: &str) -> DomainPattern {
        DomainPattern::parse(p).unwrap_or_else(|e| panic!("{e}"))
    }

    fn net(n: &str) -> IpNet {
        n.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    fn ip(a: &str) -> IpAddr {
        a.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    fn name(n: &str) -> DomainName {
        DomainName::parse(n).unwrap_or_else(|e| panic!("{e}"))
    }

    fn input<'a>(server_name: Option<&'a DomainName>, port: u16, src: &str, alpn: &'a [String]) -> ChainInput<'a> {
        ChainInput {
            server_name,
            port,
            src: ip(src),
            src_port: 40000,
            dst: Some(ip("127.0.0.1")),
            transport: Transport::Tls,
            alpn,
        }
    }

    #[test]
    fn chains_match_on_what_the_flow_shows() {
        let m = ChainMatch {
            server_names: vec![pattern("*.example.com")],
            destination_ports: vec![PortRange { lo: 443, hi: 443 }],
            source_prefixes: vec![net("10.0.0.0/8")],
            destination_prefixes: Vec::new(),
            transport_protocol: Some(Transport::Tls),
            application_protocols: Vec::new(),
            source_ports: Vec::new(),
        };
        let n = name("api.example.com");
        let ok = input(Some(&n), 443, "10.1.2.3", &[]);
        assert!(m.matches(&ok));
        assert!(!m.matches(&ChainInput {
            transport: Transport::RawBuffer,
            ..ok
        }));
        assert!(!m.matches(&ChainInput { port: 80, ..ok }));
        assert!(!m.matches(&ChainInput {
            server_name: None,
            ..ok
        }));
        // An IPv4-mapped source is the IPv4 address it maps.
        assert!(m.matches(&ChainInput {
            src: ip("::ffff:10.1.2.3"),
            ..ok
        }));
    }

    fn chains(ms: &[ChainMatch]) -> impl Fn(&ChainInput<'_>) -> Option<usize> + '_ {
        move |i| select(ms, |m| m, i)
    }

    #[test]
    fn the_most_specific_server_name_wins() {
        let ms = [
            ChainMatch::default(),
            ChainMatch {
                server_names: vec![pattern("*.com")],
                ..ChainMatch::default()
            },
            ChainMatch {
                server_names: vec![pattern("*.example.com")],
                ..ChainMatch::default()
            },
            ChainMatch {
                server_names: vec![pattern("www.example.com")],
                ..ChainMatch::default()
            },
        ];
        let pick = chains(&ms);
        let at = |n: &str| {
            let n = name(n);
            pick(&input(Some(&n), 443, "10.0.0.1", &[]))
        };
        assert_eq!(at("www.example.com"), Some(3));
        assert_eq!(at("api.example.com"), Some(2));
        assert_eq!(at("a.b.example.com"), Some(2));
        assert_eq!(at("example.com"), Some(1));
        assert_eq!(at("example.org"), Some(0));
        assert_eq!(pick(&input(None, 443, "10.0.0.1", &[])), Some(0));
    }

    #[test]
    fn a_specific_port_and_the_longest_prefix_win() {
        let ms = [
            ChainMatch {
                source_prefixes: vec![net("10.0.0.0/8")],
                ..ChainMatch::default()
            },
            ChainMatch {
                source_prefixes: vec![net("10.1.0.0/16")],
                ..ChainMatch::default()
            },
            ChainMatch {
                destination_ports: vec![PortRange { lo: 8443, hi: 8443 }],
                ..ChainMatch::default()
            },
        ];
        let pick = chains(&ms);
        assert_eq!(pick(&input(None, 443, "10.1.2.3", &[])), Some(1));
        assert_eq!(pick(&input(None, 443, "10.2.2.3", &[])), Some(0));
        assert_eq!(pick(&input(None, 443, "192.0.2.1", &[])), None);
        // The port is narrowed on first: its chain wins whatever the source.
        assert_eq!(pick(&input(None, 8443, "10.1.2.3", &[])), Some(2));
    }

    #[test]
    fn there_is_no_going_back_to_a_less_specific_chain() {
        // Envoy keeps the chain with the matching port, then finds its
        // server name does not fit: no chain, though the other would fit.
        let ms = [
            ChainMatch {
                destination_ports: vec![PortRange { lo: 443, hi: 443 }],
                server_names: vec![pattern("a.example.com")],
                ..ChainMatch::default()
            },
            ChainMatch::default(),
        ];
        let pick = chains(&ms);
        let (a, b) = (name("a.example.com"), name("b.example.com"));
        assert_eq!(pick(&input(Some(&a), 443, "10.0.0.1", &[])), Some(0));
        assert_eq!(pick(&input(Some(&b), 443, "10.0.0.1", &[])), None);
        assert_eq!(pick(&input(Some(&b), 80, "10.0.0.1", &[])), Some(1));
    }

    #[test]
    fn the_clients_first_protocol_that_a_chain_names_wins() {
        let ms = [
            ChainMatch {
                application_protocols: vec!["http/1.1".into()],
                ..ChainMatch::default()
            },
            ChainMatch {
                application_protocols: vec!["h2".into()],
                ..ChainMatch::default()
            },
            ChainMatch {
                transport_protocol: Some(Transport::RawBuffer),
                ..ChainMatch::default()
            },
        ];
        let pick = chains(&ms);
        let (h2_first, h1_first, other) = (
            ["h2".to_owned(), "http/1.1".to_owned()],
            ["http/1.1".to_owned(), "h2".to_owned()],
            ["spdy/3".to_owned()],
        );
        assert_eq!(pick(&input(None, 443, "10.0.0.1", &h2_first)), Some(1));
        assert_eq!(pick(&input(None, 443, "10.0.0.1", &h1_first)), Some(0));
        // TLS with no protocol a chain names: the raw_buffer chain was
        // already set aside at the transport criterion.
        assert_eq!(pick(&input(None, 443, "10.0.0.1", &other)), None);
        let raw = ChainInput {
            transport: Transport::RawBuffer,
            ..input(None, 443, "10.0.0.1", &[])
        };
        assert_eq!(pick(&raw), Some(2));
    }
}
