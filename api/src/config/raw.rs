//! The file format as written: serde types that keep each value's position.
//! These never leave the `config` module; `validate` turns them into the
//! checked types of `model`.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Visitor};
use serde_saphyr::Spanned;

use crate::model::{Action, EchPolicy, ListenerType, Mode, Protocol, QuicMigration, QuicMode, SniCheck};

pub type S<T> = Spanned<T>;

/// A required field that is absent: its value is a placeholder and its
/// position unknown (line 0). The validator reports it as missing, with
/// the path and the position of the mapping it is missing from, so that
/// every missing field of a file is reported, not only the first.
pub fn missing<T: Default>() -> S<T> {
    Spanned::new(
        T::default(),
        serde_saphyr::Location::UNKNOWN,
        serde_saphyr::Location::UNKNOWN,
    )
}

fn missing_kind() -> S<ListenerType> {
    Spanned::new(
        ListenerType::HttpProxy,
        serde_saphyr::Location::UNKNOWN,
        serde_saphyr::Location::UNKNOWN,
    )
}

fn missing_action() -> S<Action> {
    Spanned::new(
        Action::Deny,
        serde_saphyr::Location::UNKNOWN,
        serde_saphyr::Location::UNKNOWN,
    )
}

/// Whether a required field was absent (see [`missing`]).
pub fn is_missing<T>(v: &S<T>) -> bool {
    v.referenced.line() == 0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub admin: Option<S<RawAdmin>>,
    #[serde(default)]
    pub audit: Option<S<RawAudit>>,
    #[serde(default)]
    pub gateway: Option<RawGateway>,
    #[serde(default)]
    pub listeners: Vec<S<RawListener>>,
    #[serde(default)]
    pub webgroups: Vec<S<RawWebGroup>>,
    #[serde(default)]
    pub smartgroups: Vec<S<RawSmartGroup>>,
    #[serde(default)]
    pub inventory: Vec<S<RawWorkload>>,
    #[serde(default)]
    pub policy: Option<RawPolicy>,
    /// Named policies a control server serves to the nodes its `targets`
    /// pick.
    #[serde(default)]
    pub policies: Vec<S<RawPolicy>>,
    #[serde(default)]
    pub targets: Vec<S<RawTarget>>,
    #[serde(default)]
    pub plugins: Vec<S<RawPlugin>>,
    #[serde(default)]
    pub resolver: Option<RawResolver>,
    #[serde(default)]
    pub runtime: Option<RawRuntime>,
    #[serde(default)]
    pub xds: Option<S<RawXds>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawXds {
    #[serde(default)]
    pub servers: Vec<S<String>>,
    #[serde(default)]
    pub node: Option<S<RawNode>>,
    #[serde(default)]
    pub protocol: Option<S<String>>,
    #[serde(default)]
    pub initial_fetch_timeout: Option<S<String>>,
    #[serde(default)]
    pub tls: Option<S<RawXdsTls>>,
    #[serde(default)]
    pub listeners: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawXdsTls {
    #[serde(default = "missing")]
    pub ca: S<String>,
    #[serde(default)]
    pub cert: Option<S<String>>,
    #[serde(default)]
    pub key: Option<S<String>>,
    #[serde(default)]
    pub server_name: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNode {
    #[serde(default = "missing")]
    pub id: S<String>,
    #[serde(default)]
    pub cluster: Option<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    #[serde(default = "missing")]
    pub address: S<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    #[serde(default = "missing")]
    pub destination: S<String>,
    #[serde(default)]
    pub queue: Option<S<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGateway {
    #[serde(default)]
    pub addresses: Vec<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    #[serde(default = "missing")]
    pub name: S<String>,
    #[serde(default = "missing_kind")]
    pub kind: S<ListenerType>,
    #[serde(default = "missing")]
    pub address: S<String>,
    #[serde(default)]
    pub max_connections: Option<S<u64>>,
    #[serde(default)]
    pub peek_timeout: Option<S<String>>,
    #[serde(default)]
    pub connect_timeout: Option<S<String>>,
    #[serde(default)]
    pub idle_timeout: Option<S<String>>,
    #[serde(default)]
    pub max_client_hello: Option<S<u64>>,
    #[serde(default)]
    pub ech: Option<S<EchPolicy>>,
    #[serde(default)]
    pub connect_no_sni: Option<S<Action>>,
    #[serde(default)]
    pub sni_check: Option<S<SniCheck>>,
    #[serde(default)]
    pub upstream_port: Option<S<u64>>,
    #[serde(default)]
    pub upstream: Option<S<String>>,
    #[serde(default)]
    pub users: Vec<S<RawProxyUser>>,
    // quic listeners
    #[serde(default)]
    pub quic: Option<S<QuicMode>>,
    #[serde(default)]
    pub migration: Option<S<QuicMigration>>,
    #[serde(default)]
    pub transparent: Option<S<bool>>,
    // dns listeners
    #[serde(default)]
    pub upstreams: Vec<S<String>>,
    #[serde(default)]
    pub deny_answer: Option<S<DnsDenyKind>>,
    #[serde(default)]
    pub sinkhole: Vec<S<String>>,
    #[serde(default)]
    pub strip_ech: Option<S<bool>>,
    #[serde(default)]
    pub cache_entries: Option<S<u64>>,
    #[serde(default)]
    pub binding_min_ttl: Option<S<String>>,
    #[serde(default)]
    pub binding_grace: Option<S<String>>,
    #[serde(default)]
    pub max_bindings: Option<S<u64>>,
    #[serde(default)]
    pub exfiltration: Option<S<bool>>,
    #[serde(default)]
    pub upstream_sockets: Option<S<u64>>,
    #[serde(default)]
    pub upstream_socket_max_queries: Option<S<u64>>,
    #[serde(default)]
    pub upstream_socket_max_age: Option<S<String>>,
    /// A listener from xDS (`kind: envoy`), already mapped; never read
    /// from a file.
    #[serde(skip)]
    pub envoy: Option<Box<crate::envoy::FromEnvoy>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DnsDenyKind {
    Nxdomain,
    Refused,
    Sinkhole,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxyUser {
    #[serde(default = "missing")]
    pub name: S<String>,
    #[serde(default = "missing")]
    pub password: S<String>,
    #[serde(default = "missing")]
    pub smartgroup: S<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawResolver {
    #[serde(default)]
    pub nameservers: Vec<S<String>>,
    #[serde(default)]
    pub hosts: std::collections::BTreeMap<String, S<Vec<S<String>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRuntime {
    #[serde(default)]
    pub drain_timeout: Option<S<String>>,
    #[serde(default)]
    pub workers: Option<S<u64>>,
    #[serde(default)]
    pub plugin_cache: Option<S<String>>,
    #[serde(default)]
    pub plugin_ca: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebGroup {
    #[serde(default = "missing")]
    pub name: S<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub domains: Vec<S<String>>,
    #[serde(default)]
    pub include: Vec<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSmartGroup {
    #[serde(default = "missing")]
    pub name: S<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub cidrs: Vec<S<String>>,
    #[serde(default)]
    pub selectors: Vec<S<BTreeMap<String, String>>>,
    #[serde(default)]
    pub workloads: Vec<S<String>>,
    #[serde(default)]
    pub include: Vec<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWorkload {
    #[serde(default = "missing")]
    pub name: S<String>,
    #[serde(default)]
    pub ips: Vec<S<String>>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    /// Required under `policies:`; `policy:` is named `default`.
    #[serde(default)]
    pub name: Option<S<String>>,
    #[serde(default)]
    pub mode: Option<S<Mode>>,
    #[serde(default)]
    pub default: Option<S<Action>>,
    #[serde(default)]
    pub guard_private_ranges: bool,
    #[serde(default)]
    pub rules: Vec<S<RawRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTarget {
    #[serde(default = "missing")]
    pub name: S<String>,
    #[serde(default)]
    pub nodes: Option<S<RawNodeMatch>>,
    #[serde(default = "missing")]
    pub policy: S<String>,
    #[serde(default)]
    pub plugins: Option<Vec<S<String>>>,
    #[serde(default)]
    pub listeners: Option<Vec<S<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNodeMatch {
    #[serde(default)]
    pub ids: Vec<S<String>>,
    #[serde(default)]
    pub clusters: Vec<S<String>>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    #[serde(default = "missing")]
    pub name: S<String>,
    #[serde(default)]
    pub from: Vec<S<String>>,
    #[serde(default)]
    pub to: Option<RawDestination>,
    #[serde(default)]
    pub protocols: Vec<S<Protocol>>,
    #[serde(default)]
    pub ports: Vec<S<RawPort>>,
    #[serde(default = "missing_action")]
    pub action: S<Action>,
    #[serde(default)]
    pub watch: bool,
    #[serde(default)]
    pub delegate: Vec<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDestination {
    #[serde(default)]
    pub webgroups: Vec<S<String>>,
    #[serde(default)]
    pub smartgroups: Vec<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPlugin {
    #[serde(default = "missing")]
    pub name: S<String>,
    #[serde(default = "missing")]
    pub path: S<String>,
    #[serde(default)]
    pub sha256: Option<S<String>>,
    #[serde(default)]
    pub fail_open: bool,
    #[serde(default)]
    pub config: Option<serde_json::Value>,
    #[serde(default)]
    pub listeners: Option<Vec<S<String>>>,
    #[serde(default)]
    pub data: bool,
    #[serde(default)]
    pub env: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    pub kind: Option<S<String>>,
    #[serde(default)]
    pub root_id: Option<S<String>>,
    #[serde(default)]
    pub deadline: Option<S<String>>,
    #[serde(default)]
    pub max_memory: Option<S<String>>,
    #[serde(default)]
    pub failure: Option<S<String>>,
    #[serde(default)]
    pub upstreams: Option<std::collections::BTreeMap<String, S<String>>>,
    #[serde(default)]
    pub max_body: Option<S<String>>,
    #[serde(default)]
    pub max_pairs: Option<S<u64>>,
    #[serde(default)]
    pub max_value: Option<S<String>>,
}

/// A port as written: `443`, `"443"` or `"8000-8100"`. Range checks happen
/// in validation, where the position is known.
#[derive(Debug)]
pub enum RawPort {
    Number(i128),
    Text(String),
}

impl<'de> Deserialize<'de> for RawPort {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawPort;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port (443) or a port range (\"8000-8100\")")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawPort, E> {
                Ok(RawPort::Number(v.into()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawPort, E> {
                Ok(RawPort::Number(v.into()))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawPort, E> {
                Ok(RawPort::Text(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}
