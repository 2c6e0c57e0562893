//! Standard Envoy resources, without I/O: the bytes of a `Listener`, a
//! `Cluster` or a `ClusterLoadAssignment` (as an xDS server sends them, in
//! a `google.protobuf.Any`) become the checked types of [`model`], or a
//! [`DecodeError`] naming the resource and the field path at fault.
//!
//! Sluice supports a documented subset of Envoy's v3 API
//! (`docs/envoy-api-support.md`). Every field of these messages is either
//! mapped, ignored because ignoring it cannot change what happens to a
//! flow (statistics names, metadata for extensions Sluice does not run,
//! socket tuning), or refused when set. "Set" is proto3's: a field that
//! differs from its default. The decoders destructure every message
//! without `..`, so a field added to Envoy's API does not compile until it
//! is given one of those three fates here.
//!
//! It is meant for both ends: the gateway's xDS client (to ACK or NACK)
//! and the control server (to check what it is about to send). Neither
//! calls it yet; the data plane still takes its listeners from
//! `sluice.yaml` ([`crate::envoy::translate`]).

mod cluster;
pub mod gateway;
mod listener;
pub mod model;
pub mod plugin_options;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{
    Address, ApiVersion, ConfigSource, address, config_source, socket_address,
};
use envoy_types::pb::google::protobuf::{Any, BoolValue, Duration as PbDuration};
use prost::Message;

pub use model::*;

/// Type URLs of the standard resources and typed configurations decoded here.
pub mod type_url {
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    pub const CLUSTER_LOAD_ASSIGNMENT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    pub const TCP_PROXY: &str = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy";
    pub const TLS_INSPECTOR: &str =
        "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector";
    pub const ORIGINAL_DST: &str = "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst";
    pub const HTTP_INSPECTOR: &str =
        "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector";
    /// A plugin's configuration over ECDS.
    pub const NETWORK_WASM: &str = "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm";
    pub const EMPTY: &str = "type.googleapis.com/google.protobuf.Empty";
    pub const STRUCT: &str = "type.googleapis.com/google.protobuf.Struct";
}

/// The names of Sluice's own network filters.
pub mod filter_name {
    pub const POLICY: &str = crate::envoy::POLICY;
    pub const DNS: &str = "sluice.dns";
    /// An explicit proxy (`kind: http-proxy`) as a filter.
    pub const HTTP_PROXY: &str = "sluice.http_proxy";
    /// TLS passthrough routed by SNI (`kind: sni`) as a filter.
    pub const SNI: &str = "sluice.sni";
    /// A transparent listener (`kind: transparent`) as a filter.
    pub const TRANSPARENT: &str = "sluice.transparent";
    /// East-west TCP (`kind: tcp`) as a filter.
    pub const TCP: &str = "sluice.tcp";
    /// A QUIC listener on UDP (`kind: quic`) as a filter.
    pub const QUIC: &str = "sluice.quic";

    /// The listener kind a terminal Sluice filter makes, by its name.
    pub fn kind(name: &str) -> Option<crate::model::ListenerType> {
        use crate::model::ListenerType;
        match name {
            DNS => Some(ListenerType::Dns),
            HTTP_PROXY => Some(ListenerType::HttpProxy),
            SNI => Some(ListenerType::Sni),
            TRANSPARENT => Some(ListenerType::Transparent),
            TCP => Some(ListenerType::Tcp),
            QUIC => Some(ListenerType::Quic),
            _ => None,
        }
    }

    /// The filter that makes a listener of `kind` (every kind of
    /// `sluice.yaml`).
    pub fn of(kind: crate::model::ListenerType) -> Option<&'static str> {
        use crate::model::ListenerType;
        match kind {
            ListenerType::Dns => Some(DNS),
            ListenerType::HttpProxy => Some(HTTP_PROXY),
            ListenerType::Sni => Some(SNI),
            ListenerType::Transparent => Some(TRANSPARENT),
            ListenerType::Tcp => Some(TCP),
            ListenerType::Quic => Some(QUIC),
            ListenerType::Envoy => None,
        }
    }
}

/// A resource Sluice cannot take: which one, where in it, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{kind}", Location(.resource, .path))]
#[non_exhaustive]
pub struct DecodeError {
    /// The resource's name; empty when it could not be read.
    pub resource: String,
    /// The field at fault, as in Envoy's YAML: `filter_chains[1].filters[0].typed_config.cluster`;
    /// empty for the resource as a whole.
    pub path: String,
    pub kind: DecodeErrorKind,
}

/// What is wrong with a field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeErrorKind {
    /// The bytes are not a protobuf message of the expected type.
    #[error("cannot be decoded as {message}: {reason}")]
    Undecodable { message: String, reason: String },
    /// An `Any` of another type than the field takes.
    #[error("is a {got}; Sluice takes {expected} here")]
    WrongType { expected: String, got: String },
    /// Set, but Sluice cannot honour it.
    #[error("not supported by Sluice; {fix}")]
    Unsupported { fix: &'static str },
    /// Required and absent.
    #[error("missing; {fix}")]
    Missing { fix: &'static str },
    /// Present with a value Sluice cannot take.
    #[error("{reason}")]
    Invalid { reason: String },
    /// Names another resource that has not been received (it may be the
    /// next to arrive).
    #[error("no {what} was sent")]
    Undefined { what: String },
}

struct Location<'a>(&'a str, &'a str);

impl fmt::Display for Location<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0.is_empty(), self.1.is_empty()) {
            (true, true) => Ok(()),
            (false, true) => write!(f, "{}: ", self.0),
            (true, false) => write!(f, "{}: ", self.1),
            (false, false) => write!(f, "{}: {}: ", self.0, self.1),
        }
    }
}

/// A listener from the `Any` of an LDS response.
pub fn decode_listener(any: &Any) -> Result<EnvoyListener, DecodeError> {
    let msg = unpack::<envoy_types::pb::envoy::config::listener::v3::Listener>(any, type_url::LISTENER)?;
    EnvoyListener::try_from(&msg)
}

/// A cluster from the `Any` of a CDS response.
pub fn decode_cluster(any: &Any) -> Result<EnvoyCluster, DecodeError> {
    let msg = unpack::<envoy_types::pb::envoy::config::cluster::v3::Cluster>(any, type_url::CLUSTER)?;
    EnvoyCluster::try_from(&msg)
}

/// A load assignment from the `Any` of an EDS response.
pub fn decode_load_assignment(any: &Any) -> Result<LoadAssignment, DecodeError> {
    let msg = unpack::<envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment>(
        any,
        type_url::CLUSTER_LOAD_ASSIGNMENT,
    )?;
    LoadAssignment::try_from(&msg)
}

/// A `google.protobuf.Struct` as JSON (whole numbers as integers).
pub fn struct_json(s: &envoy_types::pb::google::protobuf::Struct) -> serde_json::Value {
    use envoy_types::pb::google::protobuf::value::Kind;
    fn value(v: &envoy_types::pb::google::protobuf::Value) -> serde_json::Value {
        match &v.kind {
            None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
            Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
            Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
            Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() < 9.0e15 => serde_json::Value::from(*n as i64),
            Some(Kind::NumberValue(n)) => {
                serde_json::Number::from_f64(*n).map_or(serde_json::Value::Null, serde_json::Value::Number)
            }
            Some(Kind::ListValue(l)) => serde_json::Value::Array(l.values.iter().map(value).collect()),
            Some(Kind::StructValue(s)) => struct_json(s),
        }
    }
    // Sorted keys: the same Struct always gives the same text.
    let mut fields: Vec<(&String, &envoy_types::pb::google::protobuf::Value)> = s.fields.iter().collect();
    fields.sort_by(|a, b| a.0.cmp(b.0));
    serde_json::Value::Object(fields.into_iter().map(|(k, v)| (k.clone(), value(v))).collect())
}

/// JSON as a `google.protobuf.Struct` (a non-object gives an empty one):
/// the inverse of [`struct_json`].
pub fn json_struct(v: &serde_json::Value) -> envoy_types::pb::google::protobuf::Struct {
    use envoy_types::pb::google::protobuf::{ListValue, NullValue, Struct, Value, value::Kind};
    fn value(v: &serde_json::Value) -> Value {
        let kind = match v {
            serde_json::Value::Null => Kind::NullValue(NullValue::NullValue as i32),
            serde_json::Value::Bool(b) => Kind::BoolValue(*b),
            serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
            serde_json::Value::String(s) => Kind::StringValue(s.clone()),
            serde_json::Value::Array(a) => Kind::ListValue(ListValue {
                values: a.iter().map(value).collect(),
            }),
            serde_json::Value::Object(_) => Kind::StructValue(json_struct(v)),
        };
        Value { kind: Some(kind) }
    }
    Struct {
        fields: match v {
            serde_json::Value::Object(m) => m.iter().map(|(k, v)| (k.clone(), value(v))).collect(),
            _ => Default::default(),
        },
    }
}

fn unpack<M: Message + Default>(any: &Any, expected: &str) -> Result<M, DecodeError> {
    if any.type_url != expected {
        return Err(DecodeError {
            resource: String::new(),
            path: String::new(),
            kind: DecodeErrorKind::WrongType {
                expected: expected.to_owned(),
                got: any.type_url.clone(),
            },
        });
    }
    M::decode(any.value.as_slice()).map_err(|e| DecodeError {
        resource: String::new(),
        path: String::new(),
        kind: DecodeErrorKind::Undecodable {
            message: message_name(expected).to_owned(),
            reason: e.to_string(),
        },
    })
}

fn message_name(type_url: &str) -> &str {
    type_url.rsplit('/').next().unwrap_or(type_url)
}

/// Where the decoder is: the resource and the path of the current field.
#[derive(Debug, Clone)]
struct At<'a> {
    resource: &'a str,
    path: String,
}

impl<'a> At<'a> {
    fn root(resource: &'a str) -> Self {
        Self {
            resource,
            path: String::new(),
        }
    }

    /// A field of the current message.
    fn f(&self, name: &str) -> Self {
        let path = if self.path.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.path)
        };
        Self {
            resource: self.resource,
            path,
        }
    }

    /// An element of the current repeated field.
    fn i(&self, index: usize) -> Self {
        Self {
            resource: self.resource,
            path: format!("{}[{index}]", self.path),
        }
    }

    fn err(&self, kind: DecodeErrorKind) -> DecodeError {
        DecodeError {
            resource: self.resource.to_owned(),
            path: self.path.clone(),
            kind,
        }
    }

    fn unsupported(&self, fix: &'static str) -> DecodeError {
        self.err(DecodeErrorKind::Unsupported { fix })
    }

    fn missing(&self, fix: &'static str) -> DecodeError {
        self.err(DecodeErrorKind::Missing { fix })
    }

    fn invalid(&self, reason: impl Into<String>) -> DecodeError {
        self.err(DecodeErrorKind::Invalid { reason: reason.into() })
    }

    /// Refuses field `name` when it differs from its default.
    fn refuse<T: IsSet + ?Sized>(&self, name: &str, value: &T) -> Result<(), DecodeError> {
        self.refuse_with(name, value, "remove it")
    }

    fn refuse_with<T: IsSet + ?Sized>(&self, name: &str, value: &T, fix: &'static str) -> Result<(), DecodeError> {
        if value.is_set() {
            return Err(self.f(name).unsupported(fix));
        }
        Ok(())
    }

    /// An `Any` of the expected type, decoded.
    fn unpack<M: Message + Default>(&self, any: &Any, expected: &str) -> Result<M, DecodeError> {
        if any.type_url != expected {
            return Err(self.err(DecodeErrorKind::WrongType {
                expected: expected.to_owned(),
                got: any.type_url.clone(),
            }));
        }
        M::decode(any.value.as_slice()).map_err(|e| {
            self.err(DecodeErrorKind::Undecodable {
                message: message_name(expected).to_owned(),
                reason: e.to_string(),
            })
        })
    }
}

/// Differs from its proto3 default: the test for "this field was given".
trait IsSet {
    fn is_set(&self) -> bool;
}

impl<T> IsSet for Option<T> {
    fn is_set(&self) -> bool {
        self.is_some()
    }
}

impl<T> IsSet for Vec<T> {
    fn is_set(&self) -> bool {
        !self.is_empty()
    }
}

impl<K, V, S> IsSet for std::collections::HashMap<K, V, S> {
    fn is_set(&self) -> bool {
        !self.is_empty()
    }
}

impl IsSet for String {
    fn is_set(&self) -> bool {
        !self.is_empty()
    }
}

impl IsSet for bool {
    fn is_set(&self) -> bool {
        *self
    }
}

impl IsSet for i32 {
    fn is_set(&self) -> bool {
        *self != 0
    }
}

impl IsSet for u32 {
    fn is_set(&self) -> bool {
        *self != 0
    }
}

fn duration(at: &At<'_>, d: &PbDuration) -> Result<Duration, DecodeError> {
    let (Ok(secs), Ok(nanos)) = (u64::try_from(d.seconds), u32::try_from(d.nanos)) else {
        return Err(at.invalid("a negative duration"));
    };
    if nanos >= 1_000_000_000 {
        return Err(at.invalid("nanos must be below 1,000,000,000"));
    }
    Ok(Duration::new(secs, nanos))
}

/// A timeout where Envoy reads `0s` as "none" and absence as `default`.
fn timeout(at: &At<'_>, d: Option<&PbDuration>, default: Duration) -> Result<Option<Duration>, DecodeError> {
    match d {
        None => Ok(Some(default)),
        Some(d) => duration(at, d).map(|d| (!d.is_zero()).then_some(d)),
    }
}

fn bool_or(v: Option<&BoolValue>, default: bool) -> bool {
    v.map_or(default, |b| b.value)
}

/// What a `core.v3.Address` may hold where Sluice reads one: a TCP socket
/// address, its host an IP or (`names`) a DNS name, with a numeric port.
#[derive(Debug)]
enum Host {
    Ip(SocketAddr),
    Name(crate::model::HostPort),
}

fn socket_address(at: &At<'_>, a: Option<&Address>, names: bool) -> Result<Host, DecodeError> {
    let Some(Address { address: Some(kind) }) = a else {
        return Err(at.missing("give a socket_address"));
    };
    let s = match kind {
        address::Address::SocketAddress(s) => s,
        address::Address::Pipe(_) => return Err(at.f("pipe").unsupported("Sluice listens and connects over TCP")),
        address::Address::EnvoyInternalAddress(_) => {
            return Err(at
                .f("envoy_internal_address")
                .unsupported("Sluice has no internal listeners"));
        }
    };
    let at = at.f("socket_address");
    let envoy_types::pb::envoy::config::core::v3::SocketAddress {
        protocol,
        address,
        resolver_name,
        ipv4_compat,
        network_namespace_filepath,
        port_specifier,
    } = s;
    match socket_address::Protocol::try_from(*protocol) {
        Ok(socket_address::Protocol::Tcp) => {}
        _ => return Err(at.f("protocol").unsupported("Sluice takes TCP here")),
    }
    at.refuse_with(
        "resolver_name",
        resolver_name,
        "names are resolved by the gateway's own resolver",
    )?;
    at.refuse_with(
        "ipv4_compat",
        ipv4_compat,
        "remove it; a `::` listener follows the host's IPV6_V6ONLY setting",
    )?;
    at.refuse_with(
        "network_namespace_filepath",
        network_namespace_filepath,
        "Sluice binds in its own network namespace",
    )?;
    let port = match port_specifier {
        Some(socket_address::PortSpecifier::PortValue(p)) => {
            u16::try_from(*p).map_err(|_| at.f("port_value").invalid(format!("{p} is not a port")))?
        }
        Some(socket_address::PortSpecifier::NamedPort(_)) => {
            return Err(at.f("named_port").unsupported("give the port as port_value"));
        }
        None => return Err(at.f("port_value").missing("give the port")),
    };
    if let Ok(ip) = address.parse::<IpAddr>() {
        return Ok(Host::Ip(SocketAddr::new(ip, port)));
    }
    if !names {
        return Err(at
            .f("address")
            .invalid(format!("`{address}` is not an IP address; this address takes one")));
    }
    let name =
        crate::domain::DomainName::parse(address).map_err(|e| at.f("address").invalid(format!("`{address}`: {e}")))?;
    Ok(Host::Name(crate::model::HostPort {
        host: name.as_str().to_owned(),
        port,
    }))
}

/// The source of an ECDS or EDS resource: the stream this one came on.
fn same_server(at: &At<'_>, c: Option<&ConfigSource>) -> Result<(), DecodeError> {
    let Some(c) = c else {
        return Err(at.missing("give `ads: {}`"));
    };
    let ConfigSource {
        authorities,
        initial_fetch_timeout,
        resource_api_version,
        config_source_specifier,
    } = c;
    at.refuse("authorities", authorities)?;
    at.refuse_with(
        "initial_fetch_timeout",
        initial_fetch_timeout,
        "remove it; Sluice waits for the resource on the ADS stream",
    )?;
    match ApiVersion::try_from(*resource_api_version) {
        Ok(ApiVersion::Auto | ApiVersion::V3) => {}
        _ => return Err(at.f("resource_api_version").unsupported("Sluice speaks xDS v3")),
    }
    match config_source_specifier {
        Some(config_source::ConfigSourceSpecifier::Ads(_)) => Ok(()),
        Some(config_source::ConfigSourceSpecifier::Self_(s)) => match ApiVersion::try_from(s.transport_api_version) {
            Ok(ApiVersion::Auto | ApiVersion::V3) => Ok(()),
            _ => Err(at
                .f("self")
                .f("transport_api_version")
                .unsupported("Sluice speaks xDS v3")),
        },
        #[allow(deprecated, reason = "a path source is still on the wire from older servers")]
        Some(config_source::ConfigSourceSpecifier::Path(_)) => Err(at
            .f("path")
            .unsupported("Sluice takes resources over its ADS stream; use `ads: {}`")),
        Some(config_source::ConfigSourceSpecifier::PathConfigSource(_)) => Err(at
            .f("path_config_source")
            .unsupported("Sluice takes resources over its ADS stream; use `ads: {}`")),
        Some(config_source::ConfigSourceSpecifier::ApiConfigSource(_)) => Err(at
            .f("api_config_source")
            .unsupported("Sluice takes resources over its ADS stream; use `ads: {}`")),
        None => Err(at.missing("give `ads: {}`")),
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use envoy_types::pb::envoy::extensions::filters::listener::{http_inspector, original_dst, tls_inspector};
    use envoy_types::pb::envoy::extensions::filters::network::{tcp_proxy, wasm};
    use envoy_types::pb::google::protobuf::{Empty, Struct};
    use prost::Name;

    use super::type_url;

    #[test]
    fn type_urls_are_what_prost_names() {
        assert_eq!(Listener::type_url(), type_url::LISTENER);
        assert_eq!(Cluster::type_url(), type_url::CLUSTER);
        assert_eq!(ClusterLoadAssignment::type_url(), type_url::CLUSTER_LOAD_ASSIGNMENT);
        assert_eq!(tcp_proxy::v3::TcpProxy::type_url(), type_url::TCP_PROXY);
        assert_eq!(tls_inspector::v3::TlsInspector::type_url(), type_url::TLS_INSPECTOR);
        assert_eq!(original_dst::v3::OriginalDst::type_url(), type_url::ORIGINAL_DST);
        assert_eq!(http_inspector::v3::HttpInspector::type_url(), type_url::HTTP_INSPECTOR);
        assert_eq!(wasm::v3::Wasm::type_url(), type_url::NETWORK_WASM);
        assert_eq!(Empty::type_url(), type_url::EMPTY);
        assert_eq!(Struct::type_url(), type_url::STRUCT);
    }
}
