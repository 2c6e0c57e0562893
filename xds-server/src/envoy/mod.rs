//! The same policy, for stock Envoy: each `sni` and `transparent` listener
//! of the configuration as an Envoy `Listener`, with the `Cluster`s it
//! sends allowed flows to. Sluice gateways subscribe to Sluice's own types
//! and Envoy to LDS and CDS, so both are served from one snapshot.
//!
//! # Why RBAC with a matcher, not one filter chain per rule
//!
//! Sluice's rules are ordered and the first that matches decides. Envoy
//! picks a filter chain by the *most specific* match (destination port,
//! then address, then server name, …, then source), whatever the order
//! the chains are written in: a `deny` for `10.0.0.0/8` → `*` written
//! before an `allow` for `10.1.0.0/16` → `api.example` would lose to it,
//! because the `allow` chain is more specific on both server name and
//! source. Expressing first-match with chains means splitting every rule
//! by every earlier one, which grows with the product of the groups.
//!
//! The RBAC network filter's `matcher` (`xds.type.matcher.v3.Matcher`)
//! is an ordered `matcher_list` where the first entry that matches
//! decides, with `on_no_match` for the default: Sluice's semantics as they
//! are, one entry per rule, in order. It also has a `shadow_matcher`,
//! which is what watch mode is: each verdict is computed and counted, and
//! only the enforced ones act. So each listener has one TLS filter chain
//! whose first network filter is RBAC with both matchers, then the
//! forwarding filters. (`resolver.hosts` names get a chain each, matching
//! that `server_names`, because their upstream is a fixed address rather
//! than a DNS lookup; the RBAC filter in it is the same.)
//!
//! What Envoy cannot enforce is listed, with the reason, in
//! `docs/envoy-translation.md`.

mod matcher;
pub mod policy;
mod sluice;

pub use sluice::for_sluice;

use std::net::IpAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, TypedExtensionConfig, address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::extensions::clusters::dynamic_forward_proxy::v3 as dfp_cluster;
use envoy_types::pb::envoy::extensions::common::dynamic_forward_proxy::v3::DnsCacheConfig;
use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3 as rbac_filter;
use envoy_types::pb::envoy::extensions::filters::network::sni_dynamic_forward_proxy::v3 as sni_dfp;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_proxy;
use envoy_types::pb::envoy::extensions::network::dns_resolver::cares::v3::CaresDnsResolverConfig;
use envoy_types::pb::envoy::r#type::matcher::v3::AddressMatcher;
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration, UInt32Value};
use envoy_types::pb::xds::core::v3::CidrRange as XdsCidrRange;
use ipnet::IpNet;
use prost::{Message, Name};
use sluice_api::{Action, Config, Listener as SluiceListener, ListenerKind, ListenerType, PolicyConfig};

use crate::snapshot::Resource;
use policy::{FlowKind, Groups, ListenerFacts};

/// Why a configuration cannot be translated for Envoy. The configuration
/// has been validated, so each of these means a bug in Sluice rather than
/// in the configuration; they are errors rather than panics all the same,
/// and `sluice-xds` keeps serving the last configuration that translated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TranslateError {
    /// A rule or group names a SmartGroup the configuration does not have.
    #[error("SmartGroup `{name}` is referenced but not defined")]
    UnknownSmartGroup { name: String },
    /// A rule or group names a WebGroup the configuration does not have.
    #[error("WebGroup `{name}` is referenced but not defined")]
    UnknownWebGroup { name: String },
    /// Two listeners would make Envoy resources of the same name (a
    /// listener name that is also another's hosts cluster, for instance).
    #[error("the Envoy resource name `{name}` would be used twice")]
    DuplicateName { name: String },
}

/// The Envoy resources for every `sni` and `transparent` listener of
/// `config`: a `Listener` named as in the configuration, and its clusters
/// (`<listener>/forward` and, for `resolver.hosts`, `<listener>/hosts/<name>`).
/// Listeners of other kinds are left out (see [`untranslated`]).
pub fn translate(config: &Config) -> Result<Vec<Resource>, TranslateError> {
    translate_policy(config, &config.policy)
}

/// [`translate`] with another of the configuration's policies (one of
/// `config.policies`, for the nodes a target gives it).
pub fn translate_policy(config: &Config, policy: &PolicyConfig) -> Result<Vec<Resource>, TranslateError> {
    let p = Policy { config, policy };
    let mut out: Vec<Resource> = Vec::new();
    for l in &config.listeners {
        let Some(facts) = ListenerFacts::of(&l.kind) else {
            continue;
        };
        for r in listener(p, l, facts)? {
            if out.iter().any(|o| o.name == r.name && o.type_url() == r.type_url()) {
                return Err(TranslateError::DuplicateName { name: r.name });
            }
            out.push(r);
        }
    }
    Ok(out)
}

/// Listeners [`translate`] leaves out, with their kind: `http-proxy`
/// (Envoy's explicit proxy needs an HTTP connection manager and routes
/// Sluice does not emit yet), `tcp`, `dns` and `quic` (Envoy has no
/// QUIC passthrough routed by SNI: its UDP proxy cannot read a QUIC
/// Initial's ClientHello; Sluice gateways take `quic` listeners as
/// `sluice.quic`, see [`for_sluice`]).
pub fn untranslated(config: &Config) -> Vec<(&str, ListenerType)> {
    config
        .listeners
        .iter()
        .filter(|l| ListenerFacts::of(&l.kind).is_none())
        .map(|l| (l.name.as_str(), l.ty()))
        .collect()
}

pub(crate) fn pack<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

pub(crate) fn ext<M: Message + Name>(name: &str, m: &M) -> TypedExtensionConfig {
    TypedExtensionConfig {
        name: name.to_owned(),
        typed_config: Some(pack(m)),
    }
}

fn duration(d: Duration) -> PbDuration {
    PbDuration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn socket(ip: IpAddr, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(port))),
            ..SocketAddress::default()
        })),
    }
}

fn network_filter<M: Message + Name>(name: &str, m: &M) -> Filter {
    Filter {
        name: name.to_owned(),
        config_type: Some(filter::ConfigType::TypedConfig(pack(m))),
    }
}

fn listener_filter<M: Message + Name>(name: &str, m: &M) -> ListenerFilter {
    ListenerFilter {
        name: name.to_owned(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(pack(m))),
        ..ListenerFilter::default()
    }
}

/// A configuration with the policy being translated.
#[derive(Debug, Clone, Copy)]
struct Policy<'a> {
    config: &'a Config,
    policy: &'a PolicyConfig,
}

/// The RBAC filter for flows of `kind`: the enforcing matcher always, the
/// shadow one when something is only watched.
fn rbac(p: Policy<'_>, l: &SluiceListener, facts: ListenerFacts, kind: FlowKind) -> Result<Filter, TranslateError> {
    let d = policy::decisions(p.config, p.policy, facts, kind)?;
    let shadow = d.watches().then(|| matcher::lower(&d, matcher::Role::Shadow));
    Ok(network_filter(
        "envoy.filters.network.rbac",
        &rbac_filter::Rbac {
            stat_prefix: format!("sluice.{}.", l.name),
            matcher: Some(matcher::lower(&d, matcher::Role::Enforce)),
            shadow_matcher: shadow,
            shadow_rules_stat_prefix: if d.watches() {
                "sluice_watch.".to_owned()
            } else {
                String::new()
            },
            enforcement_type: rbac_filter::rbac::EnforcementType::OneTimeOnFirstByte as i32,
            ..rbac_filter::Rbac::default()
        },
    ))
}

/// The network plugins serving `l`, each as a filter whose configuration
/// comes over ECDS (ADS) under the plugin's name. HTTP plugins have no
/// place here: these listeners relay TCP.
fn plugin_filters(config: &Config, l: &SluiceListener) -> Vec<Filter> {
    use envoy_types::pb::envoy::config::core::v3::{
        AggregatedConfigSource, ApiVersion, ConfigSource, ExtensionConfigSource, config_source,
    };
    config
        .plugins
        .iter()
        .filter(|p| !p.http && p.serves(&l.name))
        .map(|p| Filter {
            name: p.name.clone(),
            config_type: Some(filter::ConfigType::ConfigDiscovery(ExtensionConfigSource {
                config_source: Some(ConfigSource {
                    config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
                    resource_api_version: ApiVersion::V3 as i32,
                    ..ConfigSource::default()
                }),
                type_urls: vec!["type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm".to_owned()],
                ..ExtensionConfigSource::default()
            })),
        })
        .collect()
}

/// Forwarding to `cluster`. The upstream connection waits for the
/// client's first bytes, so the RBAC filter before it has decided: a
/// denied flow never opens a connection upstream.
fn tcp_proxy(l: &SluiceListener, cluster: &str) -> Filter {
    let idle = l.kind.connection().map(|c| c.idle_timeout);
    network_filter(
        "envoy.filters.network.tcp_proxy",
        &tcp_proxy::TcpProxy {
            stat_prefix: format!("sluice.{}", l.name),
            cluster_specifier: Some(tcp_proxy::tcp_proxy::ClusterSpecifier::Cluster(cluster.to_owned())),
            idle_timeout: idle.map(duration),
            upstream_connect_mode: tcp_proxy::UpstreamConnectMode::OnDownstreamData as i32,
            max_early_data_bytes: Some(UInt32Value { value: 64 * 1024 }),
            ..tcp_proxy::TcpProxy::default()
        },
    )
}

fn connect_timeout(l: &SluiceListener) -> Option<PbDuration> {
    l.kind.connection().map(|c| duration(c.connect_timeout))
}

/// Addresses of the built-in guard no `allow` rule opens: Envoy never
/// dials them from an `sni` listener (see `docs/envoy-translation.md` for
/// why the guard is per listener there, not per rule).
fn unlifted_guard(p: Policy<'_>) -> Result<Vec<IpNet>, TranslateError> {
    let config = p.config;
    let groups = Groups::new(config);
    let mut nets = Vec::new();
    for g in policy::guarded_groups(p.policy) {
        let lifted = p
            .policy
            .rules
            .iter()
            .any(|r| r.action == Action::Allow && r.to.smartgroups.iter().any(|n| n == g));
        if !lifted && config.smartgroup(g).is_some() {
            nets.extend(groups.addresses(g)?);
        }
    }
    Ok(IpNet::aggregate(&nets))
}

fn listener(p: Policy<'_>, l: &SluiceListener, facts: ListenerFacts) -> Result<Vec<Resource>, TranslateError> {
    let config = p.config;
    let mut resources = Vec::new();
    let tls = FilterChainMatch {
        transport_protocol: "tls".to_owned(),
        ..FilterChainMatch::default()
    };
    let mut chains = Vec::new();
    let mut listener_filters = Vec::new();
    match &l.kind {
        ListenerKind::Sni(o) => {
            let guard = unlifted_guard(p)?;
            // `resolver.hosts`: a fixed answer, so a static cluster and a
            // chain for that server name.
            for (name, ips) in &config.resolver.hosts {
                let cluster_name = format!("{}/hosts/{name}", l.name);
                let endpoints: Vec<IpAddr> = ips
                    .iter()
                    .copied()
                    .filter(|ip| !guard.iter().any(|n| n.contains(ip)))
                    .collect();
                resources.push(Resource::new(
                    cluster_name.clone(),
                    pack(&static_cluster(&cluster_name, &endpoints, o.upstream_port, l)),
                ));
                chains.push(FilterChain {
                    name: format!("hosts/{name}"),
                    filter_chain_match: Some(FilterChainMatch {
                        server_names: vec![name.clone()],
                        ..tls.clone()
                    }),
                    filters: vec![rbac(p, l, facts, FlowKind::Tls)?, tcp_proxy(l, &cluster_name)],
                    ..FilterChain::default()
                });
            }
            let cluster_name = format!("{}/forward", l.name);
            let cache = dns_cache(config, l, &guard);
            resources.push(Resource::new(
                cluster_name.clone(),
                pack(&Cluster {
                    name: cluster_name.clone(),
                    connect_timeout: connect_timeout(l),
                    lb_policy: cluster::LbPolicy::ClusterProvided as i32,
                    cluster_discovery_type: Some(cluster::ClusterDiscoveryType::ClusterType(
                        cluster::CustomClusterType {
                            name: "envoy.clusters.dynamic_forward_proxy".to_owned(),
                            typed_config: Some(pack(&dfp_cluster::ClusterConfig {
                                cluster_implementation_specifier: Some(
                                    dfp_cluster::cluster_config::ClusterImplementationSpecifier::DnsCacheConfig(
                                        cache.clone(),
                                    ),
                                ),
                                ..dfp_cluster::ClusterConfig::default()
                            })),
                        },
                    )),
                    ..Cluster::default()
                }),
            ));
            chains.push(FilterChain {
                name: "sni".to_owned(),
                filter_chain_match: Some(tls.clone()),
                filters: vec![
                    rbac(p, l, facts, FlowKind::Tls)?,
                    network_filter(
                        "envoy.filters.network.sni_dynamic_forward_proxy",
                        &sni_dfp::FilterConfig {
                            dns_cache_config: Some(cache),
                            port_specifier: Some(sni_dfp::filter_config::PortSpecifier::PortValue(u32::from(
                                o.upstream_port,
                            ))),
                            ..sni_dfp::FilterConfig::default()
                        },
                    ),
                    tcp_proxy(l, &cluster_name),
                ],
                ..FilterChain::default()
            });
        }
        ListenerKind::Transparent(_) => {
            // The destination before iptables `REDIRECT`.
            listener_filters.push(listener_filter("envoy.filters.listener.original_dst", &OriginalDst {}));
            let (cluster_name, cluster) = original_dst_cluster(l);
            resources.push(cluster);
            chains.push(FilterChain {
                name: "tls".to_owned(),
                filter_chain_match: Some(tls.clone()),
                filters: vec![rbac(p, l, facts, FlowKind::Tls)?, tcp_proxy(l, &cluster_name)],
                ..FilterChain::default()
            });
            // Anything that is not TLS is judged as opaque TCP, on its
            // addresses and port.
            chains.push(FilterChain {
                name: "opaque".to_owned(),
                filter_chain_match: Some(FilterChainMatch {
                    transport_protocol: "raw_buffer".to_owned(),
                    ..FilterChainMatch::default()
                }),
                filters: vec![rbac(p, l, facts, FlowKind::Opaque)?, tcp_proxy(l, &cluster_name)],
                ..FilterChain::default()
            });
        }
        ListenerKind::HttpProxy(_)
        | ListenerKind::Tcp(_)
        | ListenerKind::Dns(_)
        | ListenerKind::Quic(_)
        | ListenerKind::Envoy(_) => {
            return Ok(Vec::new());
        }
    }
    // The network plugins that judge this listener's flows, after the
    // policy (RBAC) and before forwarding, as Envoy's Wasm filter fetched
    // over ECDS: the same TypedExtensionConfig a Sluice gateway takes.
    let plugins = plugin_filters(config, l);
    for c in &mut chains {
        let at = 1.min(c.filters.len());
        c.filters.splice(at..at, plugins.iter().cloned());
    }
    listener_filters.push(listener_filter(
        "envoy.filters.listener.tls_inspector",
        &TlsInspector::default(),
    ));
    let peek_timeout = l.kind.peek().map(|p| duration(p.peek_timeout));
    resources.push(Resource::new(
        l.name.clone(),
        pack(&Listener {
            name: l.name.clone(),
            address: Some(socket(l.address.ip(), l.address.port())),
            stat_prefix: format!("sluice_{}", l.name),
            filter_chains: chains,
            listener_filters,
            listener_filters_timeout: peek_timeout,
            // A ClientHello that does not arrive in time is refused, as
            // Sluice's `peek-timeout`.
            continue_on_listener_filters_timeout: false,
            ..Listener::default()
        }),
    ));
    Ok(resources)
}

/// The DNS cache of an `sni` listener: the filter and the cluster must
/// carry the same one (same name, same settings). `resolver.nameservers` become its resolvers, and
/// answers in `guard` are dropped.
fn dns_cache(config: &Config, l: &SluiceListener, guard: &[IpNet]) -> DnsCacheConfig {
    let resolver = (!config.resolver.nameservers.is_empty()).then(|| {
        ext(
            "envoy.network.dns_resolver.cares",
            &CaresDnsResolverConfig {
                resolvers: config
                    .resolver
                    .nameservers
                    .iter()
                    .map(|a| socket(a.ip(), a.port()))
                    .collect(),
                ..CaresDnsResolverConfig::default()
            },
        )
    });
    let mut cache = DnsCacheConfig {
        dns_lookup_family: cluster::DnsLookupFamily::All as i32,
        typed_dns_resolver_config: resolver,
        resolved_address_filter: (!guard.is_empty()).then(|| AddressMatcher {
            ranges: guard
                .iter()
                .map(|n| XdsCidrRange {
                    address_prefix: n.network().to_string(),
                    prefix_len: Some(UInt32Value {
                        value: u32::from(n.prefix_len()),
                    }),
                })
                .collect(),
            invert_match: false,
        }),
        ..DnsCacheConfig::default()
    };
    // Envoy refuses a cache whose settings differ from a live one of the
    // same name, so the name carries the settings: a policy change that
    // changes the guard makes a new cache, and the old one goes with the
    // listener and cluster version that used it.
    let digest = ring::digest::digest(&ring::digest::SHA256, &cache.encode_to_vec());
    let short: String = digest.as_ref().iter().take(4).map(|b| format!("{b:02x}")).collect();
    cache.name = format!("sluice_{}_{short}", l.name);
    cache
}

/// The `ORIGINAL_DST` cluster of a transparent listener: its name and the
/// resource.
fn original_dst_cluster(l: &SluiceListener) -> (String, Resource) {
    let name = format!("{}/original-dst", l.name);
    let cluster = Cluster {
        name: name.clone(),
        connect_timeout: connect_timeout(l),
        lb_policy: cluster::LbPolicy::ClusterProvided as i32,
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::OriginalDst as i32,
        )),
        ..Cluster::default()
    };
    (name.clone(), Resource::new(name, pack(&cluster)))
}

fn static_cluster(name: &str, ips: &[IpAddr], port: u16, l: &SluiceListener) -> Cluster {
    Cluster {
        name: name.to_owned(),
        connect_timeout: connect_timeout(l),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32,
        )),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: name.to_owned(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: ips
                    .iter()
                    .map(|ip| LbEndpoint {
                        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                            address: Some(socket(*ip, port)),
                            ..Endpoint::default()
                        })),
                        ..LbEndpoint::default()
                    })
                    .collect(),
                ..LocalityLbEndpoints::default()
            }],
            ..ClusterLoadAssignment::default()
        }),
        ..Cluster::default()
    }
}

#[cfg(test)]
mod tests;
