//! The validated configuration: what `config::load` produces and what the
//! policy compiler and the data plane consume. Every value here has already
//! been checked; nothing downstream re-validates.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::domain::DomainPattern;

/// Protocols a rule can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tls,
    Http,
    Dns,
    Tcp,
    Udp,
    /// QUIC (HTTP/3 and others), classified from its Initial packets'
    /// ClientHello.
    Quic,
}

impl Protocol {
    pub const ALL: [Protocol; 6] = [Self::Tls, Self::Http, Self::Dns, Self::Tcp, Self::Udp, Self::Quic];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tls => "tls",
            Self::Http => "http",
            Self::Dns => "dns",
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Quic => "quic",
        }
    }

    pub fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown protocol `{s}`; expected one of tls, http, dns, tcp, udp, quic"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

/// Whether a verdict is carried out or only recorded (`watch`: a `deny`
/// means "would have denied").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Enforcement {
    /// The action was carried out (policy mode `enforce`).
    Enforced,
    /// The action was only recorded (policy mode `watch`, or a rule with
    /// `watch: true`).
    Watched,
}

impl Enforcement {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enforced => "enforced",
            Self::Watched => "watched",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `enforce` blocks what the policy denies; `watch` only records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Enforce,
    Watch,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Watch => "watch",
        }
    }
}

/// An inclusive port range; a single port is `lo == hi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn contains(self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }
    pub fn covers(self, other: PortRange) -> bool {
        self.lo <= other.lo && other.hi <= self.hi
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// The kind of a listener as `kind:` names it, without its options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ListenerType {
    /// Explicit proxy: `CONNECT` and absolute-form HTTP (`HTTPS_PROXY`).
    HttpProxy,
    /// iptables `REDIRECT` / `TPROXY`; destination from the socket.
    Transparent,
    /// TLS passthrough routed by SNI.
    Sni,
    /// East-west L4.
    Tcp,
    /// DNS proxy on UDP and TCP.
    Dns,
    /// QUIC on UDP: classified from its Initials, routed by SNI or TPROXY.
    Quic,
    /// Envoy resources taken over LDS and CDS (`xds.listeners: true`);
    /// never written in a file.
    #[serde(skip_deserializing)]
    Envoy,
}

impl ListenerType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HttpProxy => "http-proxy",
            Self::Transparent => "transparent",
            Self::Sni => "sni",
            Self::Tcp => "tcp",
            Self::Dns => "dns",
            Self::Quic => "quic",
            Self::Envoy => "envoy",
        }
    }
}

/// What a `quic` listener does with QUIC flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuicMode {
    /// Classify each flow's ClientHello and decide it like a TLS flow.
    Inspect,
    /// Drop every flow (`quic-blocked`): clients fall back to TCP, where
    /// the TCP listeners see them.
    Block,
}

/// Whether a `quic` listener follows a client that moves on purpose to
/// another port of its address, switching to a connection id it was given
/// encrypted (which no one on the path can read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QuicMigration {
    /// Such a client's datagrams start a new flow (refused
    /// `quic-not-initial`) and it reconnects.
    Off,
    /// They join the flow its address has relayed to that destination,
    /// when it has exactly one: for gateways where an address is one
    /// client (no NAT in front), since any host sharing the address could
    /// take the flow's replies.
    SameAddress,
}

/// What to do with a ClientHello carrying Encrypted Client Hello (its SNI
/// is only the outer, public name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EchPolicy {
    Allow,
    Deny,
}

/// Transparent mode: how an SNI is tied to the address the client dialled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SniCheck {
    /// The original destination must be an address the DNS proxy answered
    /// for that name to that client; without such bindings, Sluice dials an
    /// address the SNI resolves to instead of the original destination.
    Verify,
    /// Trust the original destination.
    Off,
}

/// An explicit-proxy user (HTTP Basic), whose flows count as coming from a
/// member of `smartgroup`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProxyUser {
    pub name: String,
    #[serde(skip)]
    pub password: String,
    pub smartgroup: String,
}

/// A listener: its name and address, and its kind with that kind's own
/// options (an option of another kind cannot be written, let alone ignored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    #[serde(flatten)]
    pub kind: ListenerKind,
}

impl Listener {
    pub fn ty(&self) -> ListenerType {
        self.kind.ty()
    }
}

/// A listener's kind, carrying the options only it has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ListenerKind {
    /// Explicit proxy: `CONNECT` and absolute-form HTTP (`HTTPS_PROXY`).
    HttpProxy(HttpProxyOptions),
    /// iptables `REDIRECT` / `TPROXY`; destination from the socket.
    Transparent(TransparentOptions),
    /// TLS passthrough routed by SNI.
    Sni(SniOptions),
    /// East-west L4.
    Tcp(TcpOptions),
    /// DNS proxy on UDP and TCP.
    Dns(DnsListener),
    /// QUIC on UDP.
    Quic(QuicOptions),
    /// Envoy resources taken over xDS, mapped onto the model.
    Envoy(Box<crate::envoy::FromEnvoy>),
}

impl ListenerKind {
    pub fn ty(&self) -> ListenerType {
        match self {
            Self::HttpProxy(_) => ListenerType::HttpProxy,
            Self::Transparent(_) => ListenerType::Transparent,
            Self::Sni(_) => ListenerType::Sni,
            Self::Tcp(_) => ListenerType::Tcp,
            Self::Dns(_) => ListenerType::Dns,
            Self::Quic(_) => ListenerType::Quic,
            Self::Envoy(_) => ListenerType::Envoy,
        }
    }

    /// The connection options of a listener kind that relays flows (every
    /// kind but `dns`; for `quic`, a flow is a client's 4-tuple).
    pub fn connection(&self) -> Option<&ConnectionOptions> {
        match self {
            Self::HttpProxy(o) => Some(&o.connection),
            Self::Transparent(o) => Some(&o.connection),
            Self::Sni(o) => Some(&o.connection),
            Self::Tcp(o) => Some(&o.connection),
            Self::Quic(o) => Some(&o.connection),
            Self::Envoy(o) => Some(&o.connection),
            Self::Dns(_) => None,
        }
    }

    /// How the client's first bytes are read, for the kinds that read them.
    pub fn peek(&self) -> Option<&PeekOptions> {
        match self {
            Self::HttpProxy(o) => Some(&o.peek),
            Self::Transparent(o) => Some(&o.peek),
            Self::Sni(o) => Some(&o.peek),
            Self::Quic(o) => Some(&o.peek),
            Self::Envoy(o) => o.front.peek(),
            Self::Tcp(_) | Self::Dns(_) => None,
        }
    }
}

/// What every TCP listener has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ConnectionOptions {
    /// At the limit, accepting pauses.
    pub max_connections: usize,
    #[serde(serialize_with = "duration_text")]
    pub connect_timeout: Duration,
    #[serde(serialize_with = "duration_text")]
    pub idle_timeout: Duration,
}

impl Default for ConnectionOptions {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// What a listener that reads the client's first bytes (a ClientHello, a
/// request head) has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PeekOptions {
    /// Time for the first bytes to arrive.
    #[serde(serialize_with = "duration_text")]
    pub peek_timeout: Duration,
    pub max_client_hello: usize,
    pub ech: EchPolicy,
}

impl Default for PeekOptions {
    fn default() -> Self {
        Self {
            peek_timeout: Duration::from_secs(5),
            max_client_hello: 16_384,
            ech: EchPolicy::Deny,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HttpProxyOptions {
    #[serde(flatten)]
    pub connection: ConnectionOptions,
    #[serde(flatten)]
    pub peek: PeekOptions,
    /// A ClientHello without SNI inside a `CONNECT` tunnel to a named
    /// target is denied (`connect-no-sni`) unless this is `Allow`.
    pub connect_no_sni: Action,
    /// When non-empty, Basic authentication is required.
    pub users: Vec<ProxyUser>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TransparentOptions {
    #[serde(flatten)]
    pub connection: ConnectionOptions,
    #[serde(flatten)]
    pub peek: PeekOptions,
    pub sni_check: SniCheck,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SniOptions {
    #[serde(flatten)]
    pub connection: ConnectionOptions,
    #[serde(flatten)]
    pub peek: PeekOptions,
    /// The port dialled on the resolved name.
    pub upstream_port: u16,
}

/// A `quic` listener: UDP datagrams, grouped into flows by the client's
/// address and the address it sent to. `connection.max_connections` bounds
/// the flows held at once, `connection.idle_timeout` ends a flow no
/// datagram crossed for that long; `peek.peek_timeout` bounds the Initial
/// phase (the ClientHello must be complete by then) and
/// `peek.max_client_hello` its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct QuicOptions {
    #[serde(flatten)]
    pub connection: ConnectionOptions,
    #[serde(flatten)]
    pub peek: PeekOptions,
    pub quic: QuicMode,
    /// TPROXY interception: each datagram's destination is its original
    /// one (`IP_RECVORIGDSTADDR`), held against the SNI per `sni_check`.
    /// Otherwise the SNI is the destination, on `upstream_port`.
    pub transparent: bool,
    /// Transparent only.
    pub sni_check: SniCheck,
    /// Not transparent only: the port dialled on the SNI's addresses.
    pub upstream_port: u16,
    pub migration: QuicMigration,
}

impl QuicOptions {
    /// A flow idle this long ends: QUIC's own idle timeouts are usually
    /// 30 s (quinn, Chrome), and a UDP flow has no close to wait for.
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TcpOptions {
    #[serde(flatten)]
    pub connection: ConnectionOptions,
    /// A fixed upstream; without it, the original destination (iptables
    /// `REDIRECT`).
    pub upstream: Option<HostPort>,
}

/// A `host:port` checked once: a name or an address literal, and a port
/// other than 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl HostPort {
    /// `host:port`, an IPv6 literal in brackets; `None` for anything else
    /// (no port, port 0, an empty host).
    pub fn parse(s: &str) -> Option<Self> {
        let (h, p) = s.trim().rsplit_once(':')?;
        let port = p.parse::<u16>().ok().filter(|p| *p != 0)?;
        let host = h.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(h);
        if host.is_empty() || (host.contains(':') && !h.starts_with('[')) {
            return None;
        }
        Some(Self {
            host: host.to_owned(),
            port,
        })
    }
}

impl Serialize for HostPort {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DnsTransport {
    Udp,
    Tcp,
    Tls,
}

/// An upstream resolver of a DNS listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DnsUpstream {
    pub transport: DnsTransport,
    pub address: SocketAddr,
    /// DNS-over-TLS: the name its certificate must carry.
    pub server_name: Option<String>,
}

/// What a denied query is answered with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DnsDeny {
    Nxdomain,
    Refused,
    Sinkhole {
        v4: std::net::Ipv4Addr,
        v6: std::net::Ipv6Addr,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DnsListener {
    /// Empty: the nameservers of `/etc/resolv.conf` at start-up.
    pub upstreams: Vec<DnsUpstream>,
    pub deny_answer: DnsDeny,
    /// `None`: on in enforce mode, off in watch mode.
    pub strip_ech: Option<bool>,
    pub cache_entries: usize,
    #[serde(serialize_with = "duration_text")]
    pub binding_min_ttl: Duration,
    #[serde(serialize_with = "duration_text")]
    pub binding_grace: Duration,
    pub max_bindings: usize,
    pub exfiltration: bool,
    /// Long-lived UDP sockets per UDP upstream (each on its own random
    /// source port).
    pub upstream_sockets: usize,
    /// A pooled upstream socket is replaced after this many queries…
    pub upstream_socket_max_queries: u32,
    /// …or at this age, so source ports keep changing.
    #[serde(serialize_with = "duration_text")]
    pub upstream_socket_max_age: Duration,
}

/// How Sluice resolves names it forwards to.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct ResolverConfig {
    /// Empty: the system configuration (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    /// Fixed answers, consulted first (like `/etc/hosts`).
    pub hosts: BTreeMap<String, Vec<IpAddr>>,
    /// Where each of `hosts` is written, for messages.
    #[serde(skip)]
    pub hosts_at: BTreeMap<String, Pos>,
}

/// Where something is written in its configuration file: 1-based line and
/// column, `0:0` for what no file wrote (built-in groups).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pos {
    pub line: u32,
    pub column: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WebGroup {
    pub name: String,
    pub description: Option<String>,
    pub patterns: Vec<DomainPattern>,
    /// Other WebGroups whose names also belong to this one (already checked
    /// to exist and to form no cycle).
    pub includes: Vec<String>,
    /// Shipped with Sluice (possibly extended by the user's config).
    pub builtin: bool,
    /// Where the user's config defines it, for messages.
    #[serde(skip)]
    pub at: Pos,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SmartGroup {
    pub name: String,
    pub description: Option<String>,
    pub cidrs: Vec<IpNet>,
    /// Each selector is a set of labels that must all match a workload.
    pub selectors: Vec<BTreeMap<String, String>>,
    pub workloads: Vec<String>,
    pub includes: Vec<String>,
    pub builtin: bool,
    /// Where the user's config defines it, for messages.
    #[serde(skip)]
    pub at: Pos,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub name: String,
    pub ips: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
}

/// Where a rule sends traffic. Empty lists on both sides mean "any
/// destination".
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Destination {
    pub webgroups: Vec<String>,
    pub smartgroups: Vec<String>,
}

impl Destination {
    pub fn is_any(&self) -> bool {
        self.webgroups.is_empty() && self.smartgroups.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub name: String,
    /// Source SmartGroups; empty = any source.
    pub from: Vec<String>,
    pub to: Destination,
    /// Empty = every protocol.
    pub protocols: Vec<Protocol>,
    /// Empty = every port.
    pub ports: Vec<PortRange>,
    pub action: Action,
    /// Log-only for this rule, whatever the global mode.
    pub watch: bool,
    /// Filters (plugins, by name) this rule hands its decision to: when the
    /// rule denies, a filter named here may allow the flow. Without it, no
    /// filter can loosen what the rule decided.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub delegate: Vec<String>,
    /// Where the rule is written in its file, for messages.
    #[serde(skip)]
    pub at: Pos,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyConfig {
    /// `default` for the `policy:` of a file.
    pub name: String,
    pub mode: Mode,
    pub default: Action,
    /// Whether the built-in guard also protects `private-ranges`.
    pub guard_private_ranges: bool,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "path")]
pub enum AuditDestination {
    Stdout,
    Stderr,
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditConfig {
    pub destination: AuditDestination,
    /// Records held in memory before the writer drops (and counts) them.
    pub queue: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AdminConfig {
    pub address: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plugin {
    pub name: String,
    pub path: PathBuf,
    pub sha256: Option<String>,
    /// What a trap, a deadline or the memory cap means (`failure:`).
    pub failure: PluginFailure,
    /// Handed verbatim to the plugin's root context.
    pub config: Option<serde_json::Value>,
    /// The listeners whose flows (or, for a `dns` listener, queries) the
    /// plugin judges, after the policy; empty: every listener but `dns`
    /// ones (a DNS listener is served only when named).
    pub listeners: Vec<String>,
    /// The plugin reads flow bytes: its flows are relayed by copy.
    pub data: bool,
    /// The plugin's whole environment (WASI `environ_get`).
    pub env: Vec<(String, String)>,
    /// `kind: http`: an HTTP plugin (an HTTP context per plain-HTTP
    /// request); otherwise a network plugin (a stream context per flow).
    pub http: bool,
    /// The root id the module registers its root context under (the
    /// `plugin_root_id` property); the plugin's name when not given.
    pub root_id: Option<String>,
    /// CPU time one callback may use (default 10 ms, at most 1 s).
    pub deadline: std::time::Duration,
    /// Linear memory one instance may use, in bytes (default 64 MiB, at
    /// most 256 MiB).
    pub max_memory: u64,
    /// The upstreams `proxy_http_call` may name: name → `host:port` (plain
    /// HTTP), `http://host:port` or `https://host:port` (TLS, verified
    /// for `host`).
    pub upstreams: Vec<(String, String)>,
    /// The largest HTTP body an HTTP plugin is shown whole (0: bodies
    /// stream past it unseen).
    pub max_body: u64,
    /// The most fields in one header map the plugin hands the host.
    pub max_pairs: usize,
    /// The largest value the plugin may hand the host in one call: an
    /// encoded header map, a buffer, a property, an HTTP call's body.
    pub max_value: u64,
}

/// What a plugin's failure (a trap, its deadline, its memory cap) means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PluginFailure {
    /// The flow is denied (`plugin-failed`), and so is every later flow
    /// the failed instance would have judged, until the configuration
    /// replaces the plugin (Envoy's `FAIL_CLOSED`).
    #[default]
    Closed,
    /// The flow goes on as if the plugin were not there, and so do later
    /// ones, until the configuration replaces the plugin (`FAIL_OPEN`).
    Open,
    /// The flow is denied, and a new instance is started for later flows,
    /// at most once a second per worker (`FAIL_RELOAD`).
    Reload,
}

impl Plugin {
    pub const DEFAULT_MAX_BODY: u64 = 1 << 20;
    pub const DEFAULT_MAX_PAIRS: u64 = 1024;
    pub const MAX_MAX_PAIRS: u64 = 65_536;
    pub const DEFAULT_MAX_VALUE: u64 = 1 << 20;
    pub const MAX_MAX_VALUE: u64 = 64 << 20;
    pub const MAX_MAX_BODY: u64 = 64 << 20;
    pub const DEFAULT_DEADLINE: std::time::Duration = std::time::Duration::from_millis(10);
    pub const MAX_DEADLINE: std::time::Duration = std::time::Duration::from_secs(1);
    pub const DEFAULT_MAX_MEMORY: u64 = 64 << 20;
    pub const MAX_MAX_MEMORY: u64 = 256 << 20;
}

impl Plugin {
    /// Whether the plugin judges the flows of TCP listener `name`.
    pub fn serves(&self, name: &str) -> bool {
        self.listeners.is_empty() || self.named(name)
    }

    /// Whether the plugin names listener `name` (how it serves a `dns` one).
    pub fn named(&self, name: &str) -> bool {
        self.listeners.iter().any(|l| l == name)
    }
}

/// A whole validated configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// Where it came from (a path, or `<embedded default>`).
    pub source: String,
    /// How this process runs; everything else here is the resources it
    /// serves (what a control server may send).
    #[serde(flatten)]
    pub bootstrap: Bootstrap,
    pub listeners: Vec<Listener>,
    /// User groups and built-in ones, built-ins first.
    pub webgroups: Vec<WebGroup>,
    pub smartgroups: Vec<SmartGroup>,
    pub inventory: Vec<Workload>,
    pub policy: PolicyConfig,
    /// Named policies, for a control server to serve to the nodes
    /// `targets` pick (a gateway enforces `policy` only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<PolicyConfig>,
    /// Which nodes get which named policy, first match first; a node no
    /// target picks gets `policy`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<Target>,
    pub plugins: Vec<Plugin>,
    /// The gateway's own addresses, guarded like loopback.
    pub gateway_addresses: Vec<IpAddr>,
    pub resolver: ResolverConfig,
}

/// Which gateways get a named policy: a node matches when its id is one of
/// `ids`, its cluster one of `clusters` and its metadata has every one of
/// `labels` (an empty list or map: any).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Target {
    pub name: String,
    pub ids: Vec<String>,
    pub clusters: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub policy: String,
    /// The plugins these nodes get; `None`: every plugin.
    pub plugins: Option<Vec<String>>,
    /// The listeners these nodes get (gateways that take listeners over
    /// xDS, and Envoy); `None`: every listener.
    pub listeners: Option<Vec<String>>,
}

impl Target {
    pub fn matches(&self, id: &str, cluster: &str, label: impl Fn(&str) -> Option<String>) -> bool {
        (self.ids.is_empty() || self.ids.iter().any(|i| i == id))
            && (self.clusters.is_empty() || self.clusters.iter().any(|c| c == cluster))
            && self.labels.iter().all(|(k, v)| label(k).as_deref() == Some(v))
    }
}

/// The process settings (Envoy's bootstrap): where the admin API listens,
/// where audit records go, the worker threads and the drain time. They
/// come from the local file, never from a control server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Bootstrap {
    pub admin: AdminConfig,
    pub audit: AuditConfig,
    /// On SIGTERM: stop accepting, let flows finish for this long, then close.
    #[serde(serialize_with = "duration_text")]
    pub drain_timeout: Duration,
    /// Worker threads for the data plane; `None`: one per core.
    pub workers: Option<usize>,
    /// Where compiled plugin modules are kept between runs.
    pub plugin_cache: PluginCache,
    /// The CAs plugins' `https://` upstreams must chain to (a PEM file,
    /// relative to the configuration file); the built-in Mozilla roots
    /// when `None`.
    pub plugin_ca: Option<std::path::PathBuf>,
    /// Where resources come from besides this file: a control server.
    pub xds: Option<XdsBootstrap>,
}

/// `xds:`: the control servers a gateway takes its resources from, and
/// who it says it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct XdsBootstrap {
    /// Tried in order; the next one when a server cannot be reached or
    /// its stream ends.
    pub servers: Vec<HostPort>,
    pub node: XdsNode,
    /// Incremental (Delta) xDS; State of the World when false.
    pub delta: bool,
    /// How long the first configuration may take before the gateway
    /// serves with its own file's (Envoy's `initial_fetch_timeout`).
    #[serde(serialize_with = "duration_text")]
    pub initial_fetch_timeout: Duration,
    /// TLS to the control servers; plain text when `None`.
    pub tls: Option<XdsTls>,
    /// Listeners come from the server too (Envoy `Listener` and `Cluster`
    /// resources over LDS and CDS), replacing the file's.
    pub listeners: bool,
}

/// `xds.tls`: how a gateway checks its control servers and, with a
/// certificate, proves who it is (mutual TLS). The files are read at each
/// connection, so renewed certificates are used without a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct XdsTls {
    /// PEM CA certificates the server's certificate must chain to.
    pub ca: PathBuf,
    /// PEM certificate and key of this gateway, for mutual TLS.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The name the server's certificate must have; the server's host
    /// when not given.
    pub server_name: Option<String>,
}

/// The node a gateway presents in its first request (Envoy's `Node`):
/// what the control server targets resources by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct XdsNode {
    pub id: String,
    pub cluster: String,
    pub metadata: BTreeMap<String, String>,
}

/// Where compiled plugin modules are kept (`runtime.plugin_cache`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PluginCache {
    /// `$XDG_CACHE_HOME/sluice/plugins` (or `~/.cache/sluice/plugins`).
    #[default]
    Default,
    /// Not kept: every start compiles every plugin.
    Off,
    Dir(PathBuf),
}

impl Config {
    pub fn webgroup(&self, name: &str) -> Option<&WebGroup> {
        self.webgroups.iter().find(|g| g.name == name)
    }
    pub fn smartgroup(&self, name: &str) -> Option<&SmartGroup> {
        self.smartgroups.iter().find(|g| g.name == name)
    }
}

/// Durations as the configuration file writes them (`5s`, `250ms`, `1h 30m`),
/// so `/config_dump` reads like `sluice.yaml` and its values can be pasted
/// back.
fn duration_text<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}
