//! The checked form of the standard Envoy resources Sluice takes: what is
//! left of a `Listener`, a `Cluster` or a `ClusterLoadAssignment` once
//! every field has been mapped or refused. Plain data, no protobuf: the
//! data plane builds its running objects from these and never looks at
//! the wire form again.

use std::net::SocketAddr;
use std::time::Duration;

use crate::envoy::ChainMatch;
use crate::model::HostPort;

/// Envoy's `Listener`, the subset Sluice supports: a TCP address, the
/// listener filters that read a connection's first bytes, and filter
/// chains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvoyListener {
    pub name: String,
    pub address: SocketAddr,
    /// Bound with `IP_TRANSPARENT` (iptables `TPROXY`).
    pub transparent: bool,
    /// In the order they run.
    pub listener_filters: Vec<ListenerFilter>,
    /// How long the listener filters may wait for bytes; `None`: no limit
    /// (Envoy's `0s`). Envoy's default, 15 s, when the field is absent.
    pub listener_filters_timeout: Option<Duration>,
    /// At that timeout, a chain is chosen with what is known so far instead
    /// of the connection being closed.
    pub continue_on_listener_filters_timeout: bool,
    /// Chosen by Envoy's rules (the most specific match, criterion by
    /// criterion), not by their order.
    pub chains: Vec<EnvoyChain>,
    /// Serves a connection no chain matches; without it, such a
    /// connection is closed.
    pub default_chain: Option<EnvoyChain>,
}

/// A listener filter: what it reads before a chain is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerFilter {
    /// Reads the ClientHello: SNI, ALPN, transport `tls`.
    TlsInspector {
        /// The largest ClientHello read; `None`: Sluice's default.
        max_client_hello: Option<u32>,
    },
    /// The destination before iptables `REDIRECT`/`TPROXY`.
    OriginalDst,
    /// Recognises a plain HTTP/1 or HTTP/2 request: application protocols
    /// `http/1.1`, `h2c`.
    HttpInspector,
}

/// A filter chain: when it applies and the network filters that serve it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvoyChain {
    pub name: String,
    /// Its `application_protocols` are ALPN values (from the ClientHello)
    /// or the protocol the HTTP inspector recognised.
    pub matcher: ChainMatch,
    /// In the order they run; the last one is terminal.
    pub filters: Vec<NetworkFilter>,
}

/// A network filter of a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkFilter {
    /// Sluice's policy (`sluice.policy`): the guard, the rules, the default.
    SluicePolicy,
    /// A listener kind of Sluice's own, as a terminal filter:
    /// `sluice.dns` (the DNS proxy, UDP and TCP on the address),
    /// `sluice.http_proxy` (an explicit proxy), `sluice.sni` (TLS routed by
    /// SNI). `options` are that kind's settings as `sluice.yaml` writes
    /// them, as JSON text (the filter's `google.protobuf.Struct`); empty:
    /// the defaults.
    SluiceListener {
        kind: crate::model::ListenerType,
        options: String,
    },
    /// A proxy-wasm plugin, its configuration delivered over ECDS as the
    /// `TypedExtensionConfig` of this name.
    Wasm { name: String },
    /// Envoy's `tcp_proxy`: relays the connection to a cluster. Terminal.
    TcpProxy(TcpProxy),
}

impl NetworkFilter {
    /// Ends a chain: nothing can run after it.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::SluiceListener { .. } | Self::TcpProxy(_))
    }
}

/// Envoy's `tcp_proxy` network filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpProxy {
    pub cluster: String,
    /// Closed after this long without bytes either way; `None`: never
    /// (Envoy's `0s`). Envoy's default, 1 h, when the field is absent.
    pub idle_timeout: Option<Duration>,
    /// Connection attempts to the cluster before giving up (at least 1).
    pub max_connect_attempts: u32,
    /// Closed after this long whatever happens; `None`: no limit.
    pub max_downstream_connection_duration: Option<Duration>,
}

/// Envoy's `Cluster`, the subset Sluice supports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvoyCluster {
    pub name: String,
    pub kind: ClusterKind,
    pub lb: LbPolicy,
    /// Time to establish a connection to an endpoint (Envoy's default 5 s
    /// when absent).
    pub connect_timeout: Duration,
}

/// How a cluster finds its endpoints (Envoy's discovery type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterKind {
    /// IP endpoints given in the cluster.
    Static { endpoints: LoadAssignment },
    /// Names resolved again and again; every address of every name is an
    /// endpoint.
    StrictDns {
        endpoints: LoadAssignment,
        dns: DnsSettings,
    },
    /// One name; a new connection goes to the first address of its latest
    /// resolution.
    LogicalDns { endpoint: HostPort, dns: DnsSettings },
    /// Endpoints delivered over EDS as the `ClusterLoadAssignment` of this
    /// name.
    Eds { service_name: String },
    /// The connection's destination before iptables `REDIRECT`/`TPROXY`.
    OriginalDst {
        /// Dial this port instead of the original one.
        port_override: Option<u16>,
    },
}

/// How a DNS cluster resolves its names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DnsSettings {
    pub family: DnsFamily,
    /// Time between resolutions (Envoy's default 5 s when absent).
    pub refresh_rate: Duration,
    /// Resolve again when the answer's TTL runs out instead of at
    /// `refresh_rate`.
    pub respect_ttl: bool,
}

/// Envoy's `dns_lookup_family`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum DnsFamily {
    /// IPv6 if there is any, else IPv4.
    Auto,
    V4Only,
    V6Only,
    /// IPv4 if there is any, else IPv6.
    V4Preferred,
    /// Both.
    All,
}

/// How a cluster picks an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum LbPolicy {
    RoundRobin,
    /// The endpoint with fewest active connections among `choice_count`
    /// picked at random (Envoy's default 2).
    LeastRequest {
        choice_count: u32,
    },
    Random,
    /// The cluster itself chooses (`ORIGINAL_DST`: the original
    /// destination).
    ClusterProvided,
}

/// Envoy's default `overprovisioning_factor`, in percent.
pub const DEFAULT_OVERPROVISIONING: u32 = 140;

/// Envoy's `ClusterLoadAssignment`: a cluster's endpoints, by locality and
/// priority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadAssignment {
    pub cluster_name: String,
    pub localities: Vec<Locality>,
    /// Envoy's `overprovisioning_factor` in percent (default 140): how far
    /// a priority level's healthy share is scaled before traffic spills
    /// over to the next priority.
    pub overprovisioning_factor: u32,
}

/// Envoy's `LocalityLbEndpoints`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Locality {
    /// `None`: unweighted. Envoy weighs localities only with
    /// locality-weighted balancing (in `common_lb_config`, refused here).
    pub weight: Option<u32>,
    /// 0 is the highest.
    pub priority: u32,
    pub endpoints: Vec<Endpoint>,
}

/// Envoy's `LbEndpoint`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Endpoint {
    pub address: EndpointAddress,
    /// At least 1 (Envoy's default 1).
    pub weight: u32,
    pub health: Health,
}

/// Where an endpoint is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum EndpointAddress {
    Ip(SocketAddr),
    /// A name, resolved by a DNS cluster.
    Name(HostPort),
}

/// An endpoint's health as the control server reports it (Envoy's
/// `health_status`; `UNKNOWN` counts as healthy, `TIMEOUT` as unhealthy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Health {
    Healthy,
    /// Takes traffic only when too few endpoints are healthy.
    Degraded,
    /// Takes no new connections.
    Draining,
    Unhealthy,
}
