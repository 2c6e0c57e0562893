//! Standard Envoy resources into Sluice's checked types: each supported
//! shape decodes to what it means; each refused field, set on a good
//! resource, is refused with exactly its path; ignored fields change
//! nothing; no bytes make the decoders panic; the support matrix in
//! `docs/envoy-api-support.md` lists every field of every message.
#![allow(clippy::unwrap_used, clippy::expect_used, deprecated, reason = "test code")]

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{
    self as core, Address, AggregatedConfigSource, CidrRange, ConfigSource, ExtensionConfigSource, HealthStatus,
    SocketAddress, TransportSocket, address, config_source, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as PbEndpoint, LbEndpoint, LocalityLbEndpoints, cluster_load_assignment,
    lb_endpoint, locality_lb_endpoints,
};
use envoy_types::pb::envoy::config::listener::v3::{
    self as ls, Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter as PbListenerFilter, filter,
    listener_filter,
};
use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{self as tcp, TcpProxy as PbTcpProxy};
use envoy_types::pb::google::protobuf::{Any, BoolValue, Duration as PbDuration, UInt32Value};
use prost::{Message, Name};
use sluice_api::envoy::{ChainMatch, Transport};
use sluice_api::model::{HostPort, PortRange};
use sluice_api::xds::{
    ClusterKind, DecodeError, DecodeErrorKind, DnsFamily, DnsSettings, Endpoint, EndpointAddress, EnvoyChain,
    EnvoyCluster, EnvoyListener, Health, LbPolicy, ListenerFilter, LoadAssignment, Locality, NetworkFilter, TcpProxy,
    decode_cluster, decode_listener, decode_load_assignment, type_url,
};
use sluice_api::{DomainPattern, xds};

// ---------------------------------------------------------------- builders

fn any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

fn sock(host: &str, port: u32) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: host.into(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

fn sock_mut(a: &mut Option<Address>) -> &mut SocketAddress {
    match a.as_mut().and_then(|a| a.address.as_mut()) {
        Some(address::Address::SocketAddress(s)) => s,
        _ => panic!("not a socket address"),
    }
}

fn u32v(value: u32) -> Option<UInt32Value> {
    Some(UInt32Value { value })
}

fn yes() -> Option<BoolValue> {
    Some(BoolValue { value: true })
}

fn secs(seconds: i64) -> Option<PbDuration> {
    Some(PbDuration { seconds, nanos: 0 })
}

fn cidr(a: &str, len: u32) -> CidrRange {
    CidrRange {
        address_prefix: a.into(),
        prefix_len: u32v(len),
    }
}

fn ads() -> Option<ConfigSource> {
    Some(ConfigSource {
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    })
}

fn listener_filter<M: Message + Name>(name: &str, m: &M) -> PbListenerFilter {
    PbListenerFilter {
        name: name.into(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(any(m))),
        ..Default::default()
    }
}

fn named(name: &str) -> Filter {
    Filter {
        name: name.into(),
        config_type: None,
    }
}

fn tcp_proxy(cluster: &str) -> Filter {
    Filter {
        name: "envoy.filters.network.tcp_proxy".into(),
        config_type: Some(filter::ConfigType::TypedConfig(any(&PbTcpProxy {
            stat_prefix: "out".into(),
            cluster_specifier: Some(tcp::tcp_proxy::ClusterSpecifier::Cluster(cluster.into())),
            ..Default::default()
        }))),
    }
}

fn wasm(name: &str) -> Filter {
    Filter {
        name: name.into(),
        config_type: Some(filter::ConfigType::ConfigDiscovery(ExtensionConfigSource {
            config_source: ads(),
            type_urls: vec![type_url::NETWORK_WASM.into()],
            ..Default::default()
        })),
    }
}

/// A transparent egress listener: TLS by SNI (policy, a plugin, relay to
/// the original destination), plain HTTP on port 80, DNS over TCP by
/// default.
fn good_listener() -> Listener {
    Listener {
        name: "egress".into(),
        address: Some(sock("0.0.0.0", 15001)),
        transparent: yes(),
        listener_filters: vec![
            listener_filter("envoy.filters.listener.original_dst", &OriginalDst {}),
            listener_filter(
                "envoy.filters.listener.tls_inspector",
                &TlsInspector {
                    max_client_hello_size: u32v(8192),
                    ..Default::default()
                },
            ),
            // No typed_config: found by its well-known name.
            PbListenerFilter {
                name: "envoy.filters.listener.http_inspector".into(),
                ..Default::default()
            },
        ],
        listener_filters_timeout: secs(2),
        filter_chains: vec![
            FilterChain {
                name: "tls".into(),
                filter_chain_match: Some(FilterChainMatch {
                    destination_port: u32v(443),
                    prefix_ranges: vec![cidr("192.0.2.77", 24)],
                    source_prefix_ranges: vec![cidr("10.0.0.0", 8), cidr("fd00::", 8)],
                    server_names: vec!["*.example.com".into(), "api.openai.com".into()],
                    transport_protocol: "tls".into(),
                    application_protocols: vec!["h2".into(), "http/1.1".into()],
                    source_ports: vec![40000],
                    ..Default::default()
                }),
                filters: vec![named("sluice.policy"), wasm("audit"), tcp_proxy("original")],
                ..Default::default()
            },
            FilterChain {
                name: "plain".into(),
                filter_chain_match: Some(FilterChainMatch {
                    destination_port: u32v(80),
                    transport_protocol: "raw_buffer".into(),
                    ..Default::default()
                }),
                filters: vec![named("sluice.policy"), tcp_proxy("original")],
                ..Default::default()
            },
        ],
        default_filter_chain: Some(FilterChain {
            name: "dns".into(),
            filters: vec![named("sluice.dns")],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn relay(cluster: &str) -> NetworkFilter {
    NetworkFilter::TcpProxy(TcpProxy {
        cluster: cluster.into(),
        idle_timeout: Some(Duration::from_secs(3600)),
        max_connect_attempts: 1,
        max_downstream_connection_duration: None,
    })
}

fn expected_listener() -> EnvoyListener {
    EnvoyListener {
        name: "egress".into(),
        address: "0.0.0.0:15001".parse().unwrap(),
        transparent: true,
        listener_filters: vec![
            ListenerFilter::OriginalDst,
            ListenerFilter::TlsInspector {
                max_client_hello: Some(8192),
            },
            ListenerFilter::HttpInspector,
        ],
        listener_filters_timeout: Some(Duration::from_secs(2)),
        continue_on_listener_filters_timeout: false,
        chains: vec![
            EnvoyChain {
                name: "tls".into(),
                matcher: ChainMatch {
                    server_names: vec![
                        DomainPattern::parse("*.example.com").unwrap(),
                        DomainPattern::parse("api.openai.com").unwrap(),
                    ],
                    destination_ports: vec![PortRange { lo: 443, hi: 443 }],
                    source_prefixes: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
                    // Host bits dropped, as Envoy does.
                    destination_prefixes: vec!["192.0.2.0/24".parse().unwrap()],
                    transport_protocol: Some(Transport::Tls),
                    application_protocols: vec!["h2".into(), "http/1.1".into()],
                    source_ports: vec![40000],
                },
                filters: vec![
                    NetworkFilter::SluicePolicy,
                    NetworkFilter::Wasm { name: "audit".into() },
                    relay("original"),
                ],
            },
            EnvoyChain {
                name: "plain".into(),
                matcher: ChainMatch {
                    destination_ports: vec![PortRange { lo: 80, hi: 80 }],
                    transport_protocol: Some(Transport::RawBuffer),
                    ..ChainMatch::default()
                },
                filters: vec![NetworkFilter::SluicePolicy, relay("original")],
            },
        ],
        default_chain: Some(EnvoyChain {
            name: "dns".into(),
            matcher: ChainMatch::default(),
            filters: vec![NetworkFilter::SluiceListener {
                kind: sluice_api::ListenerType::Dns,
                options: String::new(),
            }],
        }),
    }
}

fn endpoint(host: &str, port: u32, weight: Option<u32>) -> LbEndpoint {
    LbEndpoint {
        load_balancing_weight: weight.and_then(u32v),
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(PbEndpoint {
            address: Some(sock(host, port)),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn good_cla() -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: "db".into(),
        endpoints: vec![
            LocalityLbEndpoints {
                locality: Some(core::Locality {
                    region: "eu".into(),
                    ..Default::default()
                }),
                lb_endpoints: vec![
                    endpoint("10.0.0.1", 5432, Some(3)),
                    LbEndpoint {
                        health_status: HealthStatus::Draining as i32,
                        ..endpoint("fd00::2", 5432, None)
                    },
                ],
                load_balancing_weight: u32v(10),
                ..Default::default()
            },
            LocalityLbEndpoints {
                lb_endpoints: vec![endpoint("10.0.1.1", 5432, None)],
                priority: 1,
                ..Default::default()
            },
        ],
        policy: Some(cluster_load_assignment::Policy {
            overprovisioning_factor: u32v(200),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn expected_cla() -> LoadAssignment {
    let ep = |a: &str, weight, health| Endpoint {
        address: EndpointAddress::Ip(a.parse().unwrap()),
        weight,
        health,
    };
    LoadAssignment {
        cluster_name: "db".into(),
        localities: vec![
            Locality {
                weight: Some(10),
                priority: 0,
                endpoints: vec![
                    ep("10.0.0.1:5432", 3, Health::Healthy),
                    ep("[fd00::2]:5432", 1, Health::Draining),
                ],
            },
            Locality {
                weight: None,
                priority: 1,
                endpoints: vec![ep("10.0.1.1:5432", 1, Health::Healthy)],
            },
        ],
        overprovisioning_factor: 200,
    }
}

fn static_cluster() -> Cluster {
    Cluster {
        name: "db".into(),
        connect_timeout: Some(PbDuration {
            seconds: 1,
            nanos: 500_000_000,
        }),
        load_assignment: Some(good_cla()),
        ..Default::default()
    }
}

fn typed(t: cluster::DiscoveryType) -> Option<cluster::ClusterDiscoveryType> {
    Some(cluster::ClusterDiscoveryType::Type(t as i32))
}

fn dns_cluster() -> Cluster {
    Cluster {
        name: "search".into(),
        cluster_discovery_type: typed(cluster::DiscoveryType::StrictDns),
        dns_lookup_family: cluster::DnsLookupFamily::V4Only as i32,
        dns_refresh_rate: secs(30),
        respect_dns_ttl: true,
        lb_policy: cluster::LbPolicy::LeastRequest as i32,
        lb_config: Some(cluster::LbConfig::LeastRequestLbConfig(cluster::LeastRequestLbConfig {
            choice_count: u32v(3),
            ..Default::default()
        })),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: "ignored".into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![
                    endpoint("Search.Example.COM.", 443, None),
                    endpoint("192.0.2.1", 443, None),
                ],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn eds_cluster() -> Cluster {
    Cluster {
        name: "api".into(),
        cluster_discovery_type: typed(cluster::DiscoveryType::Eds),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: ads(),
            service_name: "api-v2".into(),
        }),
        lb_policy: cluster::LbPolicy::Random as i32,
        ..Default::default()
    }
}

fn original_dst_cluster() -> Cluster {
    Cluster {
        name: "original".into(),
        cluster_discovery_type: typed(cluster::DiscoveryType::OriginalDst),
        lb_policy: cluster::LbPolicy::ClusterProvided as i32,
        lb_config: Some(cluster::LbConfig::OriginalDstLbConfig(cluster::OriginalDstLbConfig {
            upstream_port_override: u32v(8443),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn listener(l: &Listener) -> Result<EnvoyListener, DecodeError> {
    decode_listener(&any(l))
}

fn cluster_of(c: &Cluster) -> Result<EnvoyCluster, DecodeError> {
    decode_cluster(&any(c))
}

// ------------------------------------------------------------ good shapes

#[test]
fn a_good_listener_decodes_to_what_it_means() {
    assert_eq!(listener(&good_listener()).unwrap(), expected_listener());
}

#[test]
fn listener_timeouts_read_like_envoy() {
    let mut l = good_listener();
    l.listener_filters_timeout = None;
    assert_eq!(
        listener(&l).unwrap().listener_filters_timeout,
        Some(Duration::from_secs(15))
    );
    l.listener_filters_timeout = secs(0);
    l.continue_on_listener_filters_timeout = true;
    let got = listener(&l).unwrap();
    assert_eq!(got.listener_filters_timeout, None);
    assert!(got.continue_on_listener_filters_timeout);

    let mut l = good_listener();
    edit_tcp(&mut l, |t| {
        t.idle_timeout = secs(0);
        t.max_connect_attempts = u32v(3);
        t.max_downstream_connection_duration = secs(600);
    });
    assert_eq!(
        listener(&l).unwrap().chains[0].filters[2],
        NetworkFilter::TcpProxy(TcpProxy {
            cluster: "original".into(),
            idle_timeout: None,
            max_connect_attempts: 3,
            max_downstream_connection_duration: Some(Duration::from_secs(600)),
        })
    );
}

#[test]
fn sluice_filters_take_an_empty_config() {
    let mut l = good_listener();
    l.filter_chains[0].filters[0].config_type = Some(filter::ConfigType::TypedConfig(Any {
        type_url: type_url::EMPTY.into(),
        value: Vec::new(),
    }));
    assert_eq!(listener(&l).unwrap(), expected_listener());
}

#[test]
fn a_static_cluster_decodes_with_its_endpoints() {
    assert_eq!(
        cluster_of(&static_cluster()).unwrap(),
        EnvoyCluster {
            name: "db".into(),
            kind: ClusterKind::Static {
                endpoints: expected_cla()
            },
            lb: LbPolicy::RoundRobin,
            connect_timeout: Duration::from_millis(1500),
        }
    );
}

#[test]
fn a_strict_dns_cluster_keeps_names_and_dns_settings() {
    let got = cluster_of(&dns_cluster()).unwrap();
    let ep = |address| Endpoint {
        address,
        weight: 1,
        health: Health::Healthy,
    };
    assert_eq!(
        got,
        EnvoyCluster {
            name: "search".into(),
            kind: ClusterKind::StrictDns {
                endpoints: LoadAssignment {
                    cluster_name: "search".into(),
                    localities: vec![Locality {
                        weight: None,
                        priority: 0,
                        endpoints: vec![
                            ep(EndpointAddress::Name(HostPort {
                                host: "search.example.com".into(),
                                port: 443
                            })),
                            ep(EndpointAddress::Ip("192.0.2.1:443".parse().unwrap())),
                        ],
                    }],
                    overprovisioning_factor: 140,
                },
                dns: DnsSettings {
                    family: DnsFamily::V4Only,
                    refresh_rate: Duration::from_secs(30),
                    respect_ttl: true,
                },
            },
            lb: LbPolicy::LeastRequest { choice_count: 3 },
            connect_timeout: Duration::from_secs(5),
        }
    );
}

#[test]
fn a_logical_dns_cluster_has_one_endpoint() {
    let mut c = dns_cluster();
    c.cluster_discovery_type = typed(cluster::DiscoveryType::LogicalDns);
    let e = cluster_of(&c).unwrap_err();
    assert_eq!(e.path, "load_assignment.endpoints");
    c.load_assignment.as_mut().unwrap().endpoints[0].lb_endpoints.pop();
    c.dns_refresh_rate = None;
    c.dns_lookup_family = 0;
    c.respect_dns_ttl = false;
    c.lb_policy = cluster::LbPolicy::Random as i32;
    c.lb_config = None;
    assert_eq!(
        cluster_of(&c).unwrap(),
        EnvoyCluster {
            name: "search".into(),
            kind: ClusterKind::LogicalDns {
                endpoint: HostPort {
                    host: "search.example.com".into(),
                    port: 443
                },
                dns: DnsSettings {
                    family: DnsFamily::Auto,
                    refresh_rate: Duration::from_secs(5),
                    respect_ttl: false,
                },
            },
            lb: LbPolicy::Random,
            connect_timeout: Duration::from_secs(5),
        }
    );
}

#[test]
fn an_eds_cluster_names_its_assignment() {
    assert_eq!(
        cluster_of(&eds_cluster()).unwrap(),
        EnvoyCluster {
            name: "api".into(),
            kind: ClusterKind::Eds {
                service_name: "api-v2".into()
            },
            lb: LbPolicy::Random,
            connect_timeout: Duration::from_secs(5),
        }
    );
    // Without a service name, the cluster's own; `self` is the same stream.
    let mut c = eds_cluster();
    let eds = c.eds_cluster_config.as_mut().unwrap();
    eds.service_name.clear();
    eds.eds_config.as_mut().unwrap().config_source_specifier = Some(config_source::ConfigSourceSpecifier::Self_(
        core::SelfConfigSource::default(),
    ));
    assert_eq!(
        cluster_of(&c).unwrap().kind,
        ClusterKind::Eds {
            service_name: "api".into()
        }
    );
}

#[test]
fn an_original_dst_cluster_is_cluster_provided() {
    assert_eq!(
        cluster_of(&original_dst_cluster()).unwrap(),
        EnvoyCluster {
            name: "original".into(),
            kind: ClusterKind::OriginalDst {
                port_override: Some(8443)
            },
            lb: LbPolicy::ClusterProvided,
            connect_timeout: Duration::from_secs(5),
        }
    );
    let mut c = original_dst_cluster();
    c.lb_policy = 0;
    c.lb_config = None;
    assert_eq!(
        cluster_of(&c).unwrap().kind,
        ClusterKind::OriginalDst { port_override: None }
    );
}

#[test]
fn a_load_assignment_decodes_with_localities_priorities_and_health() {
    assert_eq!(decode_load_assignment(&any(&good_cla())).unwrap(), expected_cla());
}

// -------------------------------------------------------- ignored fields

#[test]
fn ignored_fields_change_nothing() {
    let mut l = good_listener();
    l.stat_prefix = "egress".into();
    l.metadata = Some(core::Metadata::default());
    l.per_connection_buffer_limit_bytes = u32v(1 << 20);
    l.traffic_direction = core::TrafficDirection::Outbound as i32;
    l.drain_type = ls::listener::DrainType::ModifyOnly as i32;
    l.tcp_fast_open_queue_length = u32v(100);
    l.enable_reuse_port = yes();
    l.reuse_port = true;
    l.tcp_backlog_size = u32v(4096);
    l.max_connections_to_accept_per_socket_event = u32v(10);
    l.ignore_global_conn_limit = true;
    l.bypass_overload_manager = true;
    l.filter_chains[0].metadata = Some(core::Metadata::default());
    l.filter_chains[0].transport_socket_connect_timeout = secs(3);
    // Envoy does not read the default chain's match either.
    l.default_filter_chain.as_mut().unwrap().filter_chain_match = Some(FilterChainMatch {
        destination_port: u32v(53),
        application_protocols: vec!["dot".into()],
        ..Default::default()
    });
    l.listener_filters[1] = listener_filter(
        "envoy.filters.listener.tls_inspector",
        &TlsInspector {
            max_client_hello_size: u32v(8192),
            initial_read_buffer_size: u32v(4096),
            close_connection_on_client_hello_parsing_errors: true,
            ..Default::default()
        },
    );
    edit_tcp(&mut l, |t| {
        t.stat_prefix = "other".into();
        t.flush_access_log_on_connected = true;
    });
    assert_eq!(listener(&l).unwrap(), expected_listener());

    let mut c = static_cluster();
    c.alt_stat_name = "db-stats".into();
    c.per_connection_buffer_limit_bytes = u32v(1 << 20);
    c.max_requests_per_connection = u32v(100);
    c.http2_protocol_options = Some(core::Http2ProtocolOptions::default());
    c.dns_lookup_family = cluster::DnsLookupFamily::V6Only as i32;
    c.wait_for_warm_on_init = Some(BoolValue { value: false });
    c.cleanup_interval = secs(10);
    c.metadata = Some(core::Metadata::default());
    let la = c.load_assignment.as_mut().unwrap();
    la.endpoints[0].metadata = Some(core::Metadata::default());
    if let Some(lb_endpoint::HostIdentifier::Endpoint(e)) = &mut la.endpoints[0].lb_endpoints[0].host_identifier {
        e.hostname = "db-1".into();
        e.observability_name = "db-1".into();
    }
    assert_eq!(
        cluster_of(&c).unwrap().kind,
        ClusterKind::Static {
            endpoints: expected_cla()
        }
    );
}

// ------------------------------------------------------- refused fields

type Edit<T> = Box<dyn Fn(&mut T)>;

fn edit_tcp(l: &mut Listener, f: impl Fn(&mut PbTcpProxy)) {
    let Some(filter::ConfigType::TypedConfig(a)) = &mut l.filter_chains[0].filters[2].config_type else {
        panic!("no tcp_proxy")
    };
    let mut t = PbTcpProxy::decode(a.value.as_slice()).unwrap();
    f(&mut t);
    *a = any(&t);
}

fn edit_ecds(l: &mut Listener, f: impl Fn(&mut ExtensionConfigSource)) {
    let Some(filter::ConfigType::ConfigDiscovery(s)) = &mut l.filter_chains[0].filters[1].config_type else {
        panic!("no ECDS filter")
    };
    f(s);
}

fn edit_match(l: &mut Listener, f: impl Fn(&mut FilterChainMatch)) {
    f(l.filter_chains[0].filter_chain_match.as_mut().unwrap());
}

/// Each edit sets one field Sluice refuses; the error names exactly it.
fn refused_listener_fields() -> Vec<(String, Edit<Listener>)> {
    let t = "filter_chains[0].filters[2].typed_config";
    let w = "filter_chains[0].filters[1].config_discovery";
    let m = "filter_chains[0].filter_chain_match";
    let fields: Vec<(String, Edit<Listener>)> = vec![
        (
            "additional_addresses".into(),
            Box::new(|l| l.additional_addresses.push(Default::default())),
        ),
        (
            "fcds_config".into(),
            Box::new(|l| l.fcds_config = Some(Default::default())),
        ),
        (
            "filter_chain_matcher".into(),
            Box::new(|l| l.filter_chain_matcher = Some(Default::default())),
        ),
        ("use_original_dst".into(), Box::new(|l| l.use_original_dst = yes())),
        (
            "per_connection_buffer_high_watermark_timeout".into(),
            Box::new(|l| l.per_connection_buffer_high_watermark_timeout = secs(1)),
        ),
        (
            "deprecated_v1".into(),
            Box::new(|l| l.deprecated_v1 = Some(Default::default())),
        ),
        ("freebind".into(), Box::new(|l| l.freebind = yes())),
        (
            "socket_options".into(),
            Box::new(|l| l.socket_options.push(Default::default())),
        ),
        ("access_log".into(), Box::new(|l| l.access_log.push(Default::default()))),
        (
            "bind_to_port".into(),
            Box::new(|l| l.bind_to_port = Some(BoolValue { value: false })),
        ),
        ("enable_mptcp".into(), Box::new(|l| l.enable_mptcp = true)),
        (
            "tcp_keepalive".into(),
            Box::new(|l| l.tcp_keepalive = Some(Default::default())),
        ),
        (
            "api_listener".into(),
            Box::new(|l| l.api_listener = Some(Default::default())),
        ),
        (
            "udp_listener_config".into(),
            Box::new(|l| l.udp_listener_config = Some(Default::default())),
        ),
        (
            "internal_listener".into(),
            Box::new(|l| {
                l.listener_specifier = Some(ls::listener::ListenerSpecifier::InternalListener(
                    ls::listener::InternalListenerConfig {},
                ));
            }),
        ),
        (
            "address.socket_address.protocol".into(),
            Box::new(|l| sock_mut(&mut l.address).protocol = socket_address::Protocol::Udp as i32),
        ),
        (
            "address.socket_address.resolver_name".into(),
            Box::new(|l| sock_mut(&mut l.address).resolver_name = "custom".into()),
        ),
        (
            "address.socket_address.ipv4_compat".into(),
            Box::new(|l| sock_mut(&mut l.address).ipv4_compat = true),
        ),
        (
            "address.socket_address.network_namespace_filepath".into(),
            Box::new(|l| sock_mut(&mut l.address).network_namespace_filepath = "/run/netns/x".into()),
        ),
        (
            "address.socket_address.named_port".into(),
            Box::new(|l| {
                sock_mut(&mut l.address).port_specifier = Some(socket_address::PortSpecifier::NamedPort("http".into()));
            }),
        ),
        (
            "address.pipe".into(),
            Box::new(|l| {
                l.address = Some(Address {
                    address: Some(address::Address::Pipe(Default::default())),
                });
            }),
        ),
        (
            "address.envoy_internal_address".into(),
            Box::new(|l| {
                l.address = Some(Address {
                    address: Some(address::Address::EnvoyInternalAddress(Default::default())),
                });
            }),
        ),
        (
            "listener_filters[0].filter_disabled".into(),
            Box::new(|l| l.listener_filters[0].filter_disabled = Some(Default::default())),
        ),
        (
            "listener_filters[0].config_discovery".into(),
            Box::new(|l| {
                l.listener_filters[0].config_type =
                    Some(listener_filter::ConfigType::ConfigDiscovery(Default::default()));
            }),
        ),
        (
            "listener_filters[1].typed_config.enable_ja3_fingerprinting".into(),
            Box::new(|l| {
                l.listener_filters[1] = listener_filter(
                    "tls",
                    &TlsInspector {
                        enable_ja3_fingerprinting: yes(),
                        ..Default::default()
                    },
                );
            }),
        ),
        (
            "listener_filters[1].typed_config.enable_ja4_fingerprinting".into(),
            Box::new(|l| {
                l.listener_filters[1] = listener_filter(
                    "tls",
                    &TlsInspector {
                        enable_ja4_fingerprinting: yes(),
                        ..Default::default()
                    },
                );
            }),
        ),
        (
            "filter_chains[0].use_proxy_proto".into(),
            Box::new(|l| l.filter_chains[0].use_proxy_proto = yes()),
        ),
        (
            "filter_chains[0].transport_socket".into(),
            Box::new(|l| l.filter_chains[0].transport_socket = Some(TransportSocket::default())),
        ),
        (
            "default_filter_chain.transport_socket".into(),
            Box::new(|l| l.default_filter_chain.as_mut().unwrap().transport_socket = Some(TransportSocket::default())),
        ),
        (
            format!("{m}.address_suffix"),
            Box::new(|l| edit_match(l, |m| m.address_suffix = "x".into())),
        ),
        (
            format!("{m}.suffix_len"),
            Box::new(|l| edit_match(l, |m| m.suffix_len = u32v(1))),
        ),
        (
            format!("{m}.direct_source_prefix_ranges"),
            Box::new(|l| edit_match(l, |m| m.direct_source_prefix_ranges.push(cidr("10.0.0.0", 8)))),
        ),
        (
            format!("{m}.source_type"),
            Box::new(|l| {
                edit_match(l, |m| {
                    m.source_type = ls::filter_chain_match::ConnectionSourceType::External as i32;
                });
            }),
        ),
        (
            format!("{t}.weighted_clusters"),
            Box::new(|l| {
                edit_tcp(l, |t| {
                    t.cluster_specifier = Some(tcp::tcp_proxy::ClusterSpecifier::WeightedClusters(Default::default()));
                });
            }),
        ),
        (
            format!("{t}.on_demand"),
            Box::new(|l| edit_tcp(l, |t| t.on_demand = Some(Default::default()))),
        ),
        (
            format!("{t}.metadata_match"),
            Box::new(|l| edit_tcp(l, |t| t.metadata_match = Some(Default::default()))),
        ),
        (
            format!("{t}.downstream_idle_timeout"),
            Box::new(|l| edit_tcp(l, |t| t.downstream_idle_timeout = secs(1))),
        ),
        (
            format!("{t}.upstream_idle_timeout"),
            Box::new(|l| edit_tcp(l, |t| t.upstream_idle_timeout = secs(1))),
        ),
        (
            format!("{t}.access_log"),
            Box::new(|l| edit_tcp(l, |t| t.access_log.push(Default::default()))),
        ),
        (
            format!("{t}.backoff_options"),
            Box::new(|l| edit_tcp(l, |t| t.backoff_options = Some(Default::default()))),
        ),
        (
            format!("{t}.hash_policy"),
            Box::new(|l| edit_tcp(l, |t| t.hash_policy.push(Default::default()))),
        ),
        (
            format!("{t}.tunneling_config"),
            Box::new(|l| edit_tcp(l, |t| t.tunneling_config = Some(Default::default()))),
        ),
        (
            format!("{t}.max_downstream_connection_duration_jitter_percentage"),
            Box::new(|l| {
                edit_tcp(l, |t| {
                    t.max_downstream_connection_duration_jitter_percentage = Some(Default::default());
                });
            }),
        ),
        (
            format!("{t}.proxy_protocol_tlvs"),
            Box::new(|l| edit_tcp(l, |t| t.proxy_protocol_tlvs.push(Default::default()))),
        ),
        (
            format!("{t}.proxy_protocol_tlv_merge_policy"),
            Box::new(|l| edit_tcp(l, |t| t.proxy_protocol_tlv_merge_policy = 1)),
        ),
        (
            format!("{t}.upstream_connect_mode"),
            Box::new(|l| edit_tcp(l, |t| t.upstream_connect_mode = 1)),
        ),
        (
            format!("{t}.max_early_data_bytes"),
            Box::new(|l| edit_tcp(l, |t| t.max_early_data_bytes = u32v(0))),
        ),
        (
            format!("{t}.check_drain_close"),
            Box::new(|l| edit_tcp(l, |t| t.check_drain_close = yes())),
        ),
        (
            "filter_chains[0].filters[1].typed_config".into(),
            Box::new(|l| {
                l.filter_chains[0].filters[1].config_type = Some(filter::ConfigType::TypedConfig(Any {
                    type_url: type_url::NETWORK_WASM.into(),
                    value: Vec::new(),
                }));
            }),
        ),
        (
            "filter_chains[0].filters[0].typed_config".into(),
            Box::new(|l| {
                l.filter_chains[0].filters[0].config_type =
                    Some(filter::ConfigType::TypedConfig(any(&UInt32Value { value: 1 })));
            }),
        ),
        (
            format!("{w}.default_config"),
            Box::new(|l| edit_ecds(l, |s| s.default_config = Some(Any::default()))),
        ),
        (
            format!("{w}.apply_default_config_without_warming"),
            Box::new(|l| edit_ecds(l, |s| s.apply_default_config_without_warming = true)),
        ),
        (
            format!("{w}.config_source.authorities"),
            Box::new(|l| {
                edit_ecds(l, |s| {
                    s.config_source.as_mut().unwrap().authorities.push(Default::default())
                })
            }),
        ),
        (
            format!("{w}.config_source.initial_fetch_timeout"),
            Box::new(|l| edit_ecds(l, |s| s.config_source.as_mut().unwrap().initial_fetch_timeout = secs(1))),
        ),
        (
            format!("{w}.config_source.resource_api_version"),
            Box::new(|l| edit_ecds(l, |s| s.config_source.as_mut().unwrap().resource_api_version = 1)),
        ),
        (
            format!("{w}.config_source.path_config_source"),
            Box::new(|l| {
                edit_ecds(l, |s| {
                    s.config_source.as_mut().unwrap().config_source_specifier = Some(
                        config_source::ConfigSourceSpecifier::PathConfigSource(Default::default()),
                    );
                });
            }),
        ),
        (
            format!("{w}.config_source.api_config_source"),
            Box::new(|l| {
                edit_ecds(l, |s| {
                    s.config_source.as_mut().unwrap().config_source_specifier =
                        Some(config_source::ConfigSourceSpecifier::ApiConfigSource(Default::default()));
                });
            }),
        ),
    ];
    fields
}

/// Each edit gives a field a value Sluice cannot take, or removes one it
/// needs.
fn bad_listener_values() -> Vec<(&'static str, Edit<Listener>)> {
    vec![
        (
            "filter_chains[0].filter_chain_match.source_ports[1]",
            Box::new(|l| edit_match(l, |m| m.source_ports.push(70000))),
        ),
        ("name", Box::new(|l| l.name.clear())),
        ("address", Box::new(|l| l.address = None)),
        (
            "address.socket_address.address",
            Box::new(|l| sock_mut(&mut l.address).address = "proxy.local".into()),
        ),
        (
            "address.socket_address.port_value",
            Box::new(|l| {
                sock_mut(&mut l.address).port_specifier = Some(socket_address::PortSpecifier::PortValue(70000));
            }),
        ),
        (
            "filter_chains",
            Box::new(|l| {
                l.filter_chains.clear();
                l.default_filter_chain = None;
            }),
        ),
        (
            "listener_filters[0].typed_config",
            Box::new(|l| {
                l.listener_filters[0] = PbListenerFilter {
                    name: "envoy.filters.listener.unknown".into(),
                    ..Default::default()
                };
            }),
        ),
        (
            "listener_filters[1].typed_config",
            Box::new(|l| {
                l.listener_filters[1].config_type = Some(listener_filter::ConfigType::TypedConfig(Any {
                    type_url: "type.googleapis.com/envoy.extensions.filters.listener.proxy_protocol.v3.ProxyProtocol"
                        .into(),
                    value: Vec::new(),
                }));
            }),
        ),
        (
            "listener_filters_timeout",
            Box::new(|l| {
                l.listener_filters_timeout = Some(PbDuration { seconds: -1, nanos: 0 });
            }),
        ),
        (
            "filter_chains[0].filter_chain_match.destination_port",
            Box::new(|l| edit_match(l, |m| m.destination_port = u32v(0))),
        ),
        (
            "filter_chains[0].filter_chain_match.prefix_ranges[0].prefix_len",
            Box::new(|l| edit_match(l, |m| m.prefix_ranges[0].prefix_len = u32v(33))),
        ),
        (
            "filter_chains[0].filter_chain_match.source_prefix_ranges[1].address_prefix",
            Box::new(|l| edit_match(l, |m| m.source_prefix_ranges[1].address_prefix = "nope".into())),
        ),
        (
            "filter_chains[0].filter_chain_match.server_names[1]",
            Box::new(|l| edit_match(l, |m| m.server_names[1] = "api.*.com".into())),
        ),
        (
            "filter_chains[0].filter_chain_match.transport_protocol",
            Box::new(|l| edit_match(l, |m| m.transport_protocol = "quic".into())),
        ),
        (
            "filter_chains[0].filter_chain_match.application_protocols[0]",
            Box::new(|l| edit_match(l, |m| m.application_protocols[0].clear())),
        ),
        (
            "filter_chains[1].filter_chain_match",
            Box::new(|l| l.filter_chains[1].filter_chain_match = l.filter_chains[0].filter_chain_match.clone()),
        ),
        (
            "filter_chains[0].filters",
            Box::new(|l| l.filter_chains[0].filters.clear()),
        ),
        (
            "filter_chains[0].filter_chain_match.server_names",
            Box::new(|l| {
                l.listener_filters.remove(1);
            }),
        ),
        (
            "filter_chains[0].filter_chain_match.transport_protocol",
            Box::new(|l| {
                l.listener_filters.remove(1);
                edit_match(l, |m| m.server_names.clear());
            }),
        ),
        (
            "filter_chains[0].filter_chain_match.application_protocols",
            Box::new(|l| {
                l.listener_filters.truncate(1);
                edit_match(l, |m| {
                    m.server_names.clear();
                    m.transport_protocol.clear();
                });
            }),
        ),
        (
            "filter_chains[0].filters[1]",
            Box::new(|l| l.filter_chains[0].filters.truncate(2)),
        ),
        (
            "filter_chains[1].filters[1]",
            Box::new(|l| l.filter_chains[1].filters.push(named("sluice.policy"))),
        ),
        (
            "filter_chains[0].filters[0]",
            Box::new(|l| l.filter_chains[0].filters.swap(0, 1)),
        ),
        (
            "filter_chains[0].filters[1]",
            Box::new(|l| l.filter_chains[0].filters[1] = named("sluice.policy")),
        ),
        (
            "filter_chains[0].filters[0].typed_config",
            Box::new(|l| l.filter_chains[0].filters[0] = named("envoy.filters.network.rbac")),
        ),
        (
            "filter_chains[0].filters[2].typed_config.cluster_specifier",
            Box::new(|l| edit_tcp(l, |t| t.cluster_specifier = None)),
        ),
        (
            "filter_chains[0].filters[2].typed_config.cluster",
            Box::new(|l| {
                edit_tcp(l, |t| {
                    t.cluster_specifier = Some(tcp::tcp_proxy::ClusterSpecifier::Cluster(String::new()))
                })
            }),
        ),
        (
            "filter_chains[0].filters[2].typed_config.max_connect_attempts",
            Box::new(|l| edit_tcp(l, |t| t.max_connect_attempts = u32v(0))),
        ),
        (
            "filter_chains[0].filters[2].typed_config",
            Box::new(|l| {
                let Some(filter::ConfigType::TypedConfig(a)) = &mut l.filter_chains[0].filters[2].config_type else {
                    panic!()
                };
                a.value = vec![0xff, 0xff];
            }),
        ),
        (
            "filter_chains[0].filters[1].name",
            Box::new(|l| l.filter_chains[0].filters[1].name.clear()),
        ),
        (
            "filter_chains[0].filters[1].config_discovery.type_urls",
            Box::new(|l| edit_ecds(l, |s| s.type_urls.clear())),
        ),
        (
            "filter_chains[0].filters[1].config_discovery.type_urls[1]",
            Box::new(|l| edit_ecds(l, |s| s.type_urls.push(type_url::TCP_PROXY.into()))),
        ),
        (
            "filter_chains[0].filters[1].config_discovery.config_source",
            Box::new(|l| edit_ecds(l, |s| s.config_source = None)),
        ),
    ]
}

#[test]
fn every_refused_listener_field_is_refused_with_its_path() {
    for (path, edit) in refused_listener_fields() {
        let mut l = good_listener();
        edit(&mut l);
        let e = listener(&l).expect_err(&path);
        assert_eq!(e.path, path, "{e}");
        assert_eq!(e.resource, "egress", "{e}");
        assert!(matches!(e.kind, DecodeErrorKind::Unsupported { .. }), "{path}: {e}");
        // The message says where and how to fix it.
        assert!(
            e.to_string()
                .starts_with(&format!("egress: {path}: not supported by Sluice; ")),
            "{e}"
        );
    }
}

#[test]
fn every_bad_listener_value_is_refused_with_its_path() {
    for (path, edit) in bad_listener_values() {
        let mut l = good_listener();
        edit(&mut l);
        let e = listener(&l).expect_err(path);
        assert_eq!(e.path, path, "{e}");
    }
}

fn edit_cla(c: &mut Cluster) -> &mut ClusterLoadAssignment {
    c.load_assignment.as_mut().unwrap()
}

fn edit_ep(c: &mut Cluster) -> &mut PbEndpoint {
    match &mut edit_cla(c).endpoints[0].lb_endpoints[0].host_identifier {
        Some(lb_endpoint::HostIdentifier::Endpoint(e)) => e,
        _ => panic!("no endpoint"),
    }
}

fn refused_cluster_fields() -> Vec<(String, Edit<Cluster>)> {
    let e = "load_assignment.endpoints[0].lb_endpoints[0]";
    let fields: Vec<(String, Edit<Cluster>)> = vec![
        (
            "transport_socket_matches".into(),
            Box::new(|c| c.transport_socket_matches.push(Default::default())),
        ),
        (
            "transport_socket_matcher".into(),
            Box::new(|c| c.transport_socket_matcher = Some(Default::default())),
        ),
        (
            "transport_socket".into(),
            Box::new(|c| c.transport_socket = Some(Default::default())),
        ),
        (
            "per_connection_buffer_high_watermark_timeout".into(),
            Box::new(|c| c.per_connection_buffer_high_watermark_timeout = secs(1)),
        ),
        (
            "health_checks".into(),
            Box::new(|c| c.health_checks.push(Default::default())),
        ),
        (
            "circuit_breakers".into(),
            Box::new(|c| c.circuit_breakers = Some(Default::default())),
        ),
        (
            "dns_failure_refresh_rate".into(),
            Box::new(|c| c.dns_failure_refresh_rate = Some(Default::default())),
        ),
        (
            "dns_resolvers".into(),
            Box::new(|c| c.dns_resolvers.push(sock("8.8.8.8", 53))),
        ),
        (
            "use_tcp_for_dns_lookups".into(),
            Box::new(|c| c.use_tcp_for_dns_lookups = true),
        ),
        (
            "dns_resolution_config".into(),
            Box::new(|c| c.dns_resolution_config = Some(Default::default())),
        ),
        (
            "typed_dns_resolver_config".into(),
            Box::new(|c| c.typed_dns_resolver_config = Some(Default::default())),
        ),
        (
            "outlier_detection".into(),
            Box::new(|c| c.outlier_detection = Some(Default::default())),
        ),
        (
            "upstream_bind_config".into(),
            Box::new(|c| c.upstream_bind_config = Some(Default::default())),
        ),
        (
            "lb_subset_config".into(),
            Box::new(|c| c.lb_subset_config = Some(Default::default())),
        ),
        (
            "common_lb_config".into(),
            Box::new(|c| c.common_lb_config = Some(Default::default())),
        ),
        (
            "upstream_connection_options".into(),
            Box::new(|c| c.upstream_connection_options = Some(Default::default())),
        ),
        (
            "close_connections_on_host_health_failure".into(),
            Box::new(|c| c.close_connections_on_host_health_failure = true),
        ),
        ("filters".into(), Box::new(|c| c.filters.push(Default::default()))),
        (
            "load_balancing_policy".into(),
            Box::new(|c| c.load_balancing_policy = Some(Default::default())),
        ),
        (
            "lrs_server".into(),
            Box::new(|c| c.lrs_server = Some(Default::default())),
        ),
        (
            "upstream_config".into(),
            Box::new(|c| c.upstream_config = Some(Default::default())),
        ),
        (
            "cluster_type".into(),
            Box::new(|c| {
                c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::ClusterType(Default::default()));
            }),
        ),
        (
            "lb_policy".into(),
            Box::new(|c| c.lb_policy = cluster::LbPolicy::RingHash as i32),
        ),
        (
            "lb_policy".into(),
            Box::new(|c| c.lb_policy = cluster::LbPolicy::Maglev as i32),
        ),
        (
            "ring_hash_lb_config".into(),
            Box::new(|c| c.lb_config = Some(cluster::LbConfig::RingHashLbConfig(Default::default()))),
        ),
        (
            "maglev_lb_config".into(),
            Box::new(|c| c.lb_config = Some(cluster::LbConfig::MaglevLbConfig(Default::default()))),
        ),
        (
            "round_robin_lb_config.slow_start_config".into(),
            Box::new(|c| {
                c.lb_config = Some(cluster::LbConfig::RoundRobinLbConfig(cluster::RoundRobinLbConfig {
                    slow_start_config: Some(Default::default()),
                }));
            }),
        ),
        (
            "eds_cluster_config".into(),
            Box::new(|c| c.eds_cluster_config = Some(Default::default())),
        ),
        (
            "load_assignment.named_endpoints".into(),
            Box::new(|c| {
                edit_cla(c).named_endpoints.insert("x".into(), PbEndpoint::default());
            }),
        ),
        (
            "load_assignment.policy.drop_overloads".into(),
            Box::new(|c| {
                edit_cla(c)
                    .policy
                    .as_mut()
                    .unwrap()
                    .drop_overloads
                    .push(Default::default());
            }),
        ),
        (
            "load_assignment.policy.endpoint_stale_after".into(),
            Box::new(|c| edit_cla(c).policy.as_mut().unwrap().endpoint_stale_after = secs(1)),
        ),
        (
            "load_assignment.policy.weighted_priority_health".into(),
            Box::new(|c| edit_cla(c).policy.as_mut().unwrap().weighted_priority_health = true),
        ),
        (
            "load_assignment.endpoints[0].proximity".into(),
            Box::new(|c| edit_cla(c).endpoints[0].proximity = u32v(1)),
        ),
        (
            "load_assignment.endpoints[0].leds_cluster_locality_config".into(),
            Box::new(|c| {
                edit_cla(c).endpoints[0].lb_config = Some(locality_lb_endpoints::LbConfig::LedsClusterLocalityConfig(
                    Default::default(),
                ));
            }),
        ),
        (
            "load_assignment.endpoints[0].load_balancer_endpoints".into(),
            Box::new(|c| {
                edit_cla(c).endpoints[0].lb_config = Some(locality_lb_endpoints::LbConfig::LoadBalancerEndpoints(
                    Default::default(),
                ));
            }),
        ),
        (
            format!("{e}.endpoint_name"),
            Box::new(|c| {
                edit_cla(c).endpoints[0].lb_endpoints[0].host_identifier =
                    Some(lb_endpoint::HostIdentifier::EndpointName("x".into()));
            }),
        ),
        (
            format!("{e}.endpoint.health_check_config"),
            Box::new(|c| edit_ep(c).health_check_config = Some(Default::default())),
        ),
        (
            format!("{e}.endpoint.additional_addresses"),
            Box::new(|c| edit_ep(c).additional_addresses.push(Default::default())),
        ),
        (
            format!("{e}.endpoint.address.socket_address.resolver_name"),
            Box::new(|c| sock_mut(&mut edit_ep(c).address).resolver_name = "x".into()),
        ),
    ];
    fields
}

fn bad_cluster_values() -> Vec<(String, Edit<Cluster>)> {
    let e = "load_assignment.endpoints[0].lb_endpoints[0]";
    let fields: Vec<(String, Edit<Cluster>)> = vec![
        ("name".into(), Box::new(|c| c.name.clear())),
        ("connect_timeout".into(), Box::new(|c| c.connect_timeout = secs(0))),
        (
            "connect_timeout".into(),
            Box::new(|c| {
                c.connect_timeout = Some(PbDuration { seconds: 0, nanos: -5 });
            }),
        ),
        ("lb_policy".into(), Box::new(|c| c.lb_policy = 99)),
        (
            "lb_policy".into(),
            Box::new(|c| c.lb_policy = cluster::LbPolicy::ClusterProvided as i32),
        ),
        (
            "type".into(),
            Box::new(|c| c.cluster_discovery_type = Some(cluster::ClusterDiscoveryType::Type(42))),
        ),
        (
            "least_request_lb_config".into(),
            Box::new(|c| c.lb_config = Some(cluster::LbConfig::LeastRequestLbConfig(Default::default()))),
        ),
        (
            "original_dst_lb_config".into(),
            Box::new(|c| c.lb_config = Some(cluster::LbConfig::OriginalDstLbConfig(Default::default()))),
        ),
        ("load_assignment".into(), Box::new(|c| c.load_assignment = None)),
        (
            format!("{e}.endpoint.address.socket_address.address"),
            Box::new(|c| sock_mut(&mut edit_ep(c).address).address = "db.internal".into()),
        ),
        (
            format!("{e}.endpoint"),
            Box::new(|c| edit_cla(c).endpoints[0].lb_endpoints[0].host_identifier = None),
        ),
        (
            format!("{e}.load_balancing_weight"),
            Box::new(|c| edit_cla(c).endpoints[0].lb_endpoints[0].load_balancing_weight = u32v(0)),
        ),
        (
            format!("{e}.health_status"),
            Box::new(|c| edit_cla(c).endpoints[0].lb_endpoints[0].health_status = 17),
        ),
        (
            "load_assignment.endpoints[1].load_balancing_weight".into(),
            Box::new(|c| edit_cla(c).endpoints[1].load_balancing_weight = u32v(0)),
        ),
        (
            "load_assignment.policy.overprovisioning_factor".into(),
            Box::new(|c| edit_cla(c).policy.as_mut().unwrap().overprovisioning_factor = u32v(0)),
        ),
    ];
    fields
}

#[test]
fn every_refused_cluster_field_is_refused_with_its_path() {
    for (path, edit) in refused_cluster_fields() {
        let mut c = static_cluster();
        edit(&mut c);
        let e = cluster_of(&c).expect_err(&path);
        assert_eq!(e.path, path, "{e}");
        assert_eq!(e.resource, "db", "{e}");
        assert!(matches!(e.kind, DecodeErrorKind::Unsupported { .. }), "{path}: {e}");
    }
}

#[test]
fn every_bad_cluster_value_is_refused_with_its_path() {
    for (path, edit) in bad_cluster_values() {
        let mut c = static_cluster();
        edit(&mut c);
        let e = cluster_of(&c).expect_err(&path);
        assert_eq!(e.path, path, "{e}");
    }
}

#[test]
fn each_discovery_type_refuses_what_it_does_not_read() {
    let cases: Vec<(Cluster, &str)> = vec![
        (
            Cluster {
                load_assignment: Some(good_cla()),
                ..eds_cluster()
            },
            "load_assignment",
        ),
        (
            Cluster {
                eds_cluster_config: None,
                ..eds_cluster()
            },
            "eds_cluster_config",
        ),
        (
            {
                let mut c = eds_cluster();
                c.eds_cluster_config.as_mut().unwrap().eds_config = None;
                c
            },
            "eds_cluster_config.eds_config",
        ),
        (
            Cluster {
                load_assignment: Some(good_cla()),
                ..original_dst_cluster()
            },
            "load_assignment",
        ),
        (
            Cluster {
                lb_policy: cluster::LbPolicy::Random as i32,
                ..original_dst_cluster()
            },
            "lb_policy",
        ),
        (
            Cluster {
                lb_config: Some(cluster::LbConfig::OriginalDstLbConfig(cluster::OriginalDstLbConfig {
                    use_http_header: true,
                    ..Default::default()
                })),
                ..original_dst_cluster()
            },
            "original_dst_lb_config.use_http_header",
        ),
        (
            Cluster {
                lb_config: Some(cluster::LbConfig::OriginalDstLbConfig(cluster::OriginalDstLbConfig {
                    upstream_port_override: u32v(0),
                    ..Default::default()
                })),
                ..original_dst_cluster()
            },
            "original_dst_lb_config.upstream_port_override",
        ),
        (
            Cluster {
                dns_refresh_rate: secs(0),
                ..dns_cluster()
            },
            "dns_refresh_rate",
        ),
        (
            Cluster {
                dns_lookup_family: 9,
                ..dns_cluster()
            },
            "dns_lookup_family",
        ),
        (
            Cluster {
                lb_config: Some(cluster::LbConfig::LeastRequestLbConfig(cluster::LeastRequestLbConfig {
                    choice_count: u32v(1),
                    ..Default::default()
                })),
                ..dns_cluster()
            },
            "least_request_lb_config.choice_count",
        ),
        (
            Cluster {
                lb_config: Some(cluster::LbConfig::LeastRequestLbConfig(cluster::LeastRequestLbConfig {
                    active_request_bias: Some(Default::default()),
                    ..Default::default()
                })),
                ..dns_cluster()
            },
            "least_request_lb_config.active_request_bias",
        ),
    ];
    for (c, path) in cases {
        let e = cluster_of(&c).expect_err(path);
        assert_eq!(e.path, path, "{e}");
    }
}

#[test]
fn a_load_assignment_over_eds_holds_addresses_only() {
    let mut cla = good_cla();
    cla.endpoints[1].lb_endpoints[0] = endpoint("db.internal", 5432, None);
    let e = decode_load_assignment(&any(&cla)).unwrap_err();
    assert_eq!(e.resource, "db");
    assert_eq!(
        e.path,
        "endpoints[1].lb_endpoints[0].endpoint.address.socket_address.address"
    );

    let mut cla = good_cla();
    cla.named_endpoints.insert("a".into(), PbEndpoint::default());
    assert_eq!(decode_load_assignment(&any(&cla)).unwrap_err().path, "named_endpoints");

    let mut cla = good_cla();
    cla.cluster_name.clear();
    assert_eq!(decode_load_assignment(&any(&cla)).unwrap_err().path, "cluster_name");
}

// ----------------------------------------------------------- bad bytes

#[test]
fn wrong_types_and_garbage_are_errors() {
    let l = any(&good_listener());
    let e = decode_cluster(&l).unwrap_err();
    assert!(matches!(e.kind, DecodeErrorKind::WrongType { .. }), "{e}");
    assert!(decode_load_assignment(&l).is_err());
    let garbage = Any {
        type_url: type_url::LISTENER.into(),
        value: vec![0x0a, 0xff, 0xff, 0xff],
    };
    let e = decode_listener(&garbage).unwrap_err();
    assert!(matches!(e.kind, DecodeErrorKind::Undecodable { .. }), "{e}");
    assert_eq!(e.path, "");
    // Every prefix of a good resource decodes or is refused; none panics.
    for (url, bytes) in [
        (type_url::LISTENER, l.value.clone()),
        (type_url::CLUSTER, any(&dns_cluster()).value),
        (type_url::CLUSTER_LOAD_ASSIGNMENT, any(&good_cla()).value),
    ] {
        for n in 0..bytes.len() {
            let a = Any {
                type_url: url.into(),
                value: bytes[..n].to_vec(),
            };
            let _ = (decode_listener(&a), decode_cluster(&a), decode_load_assignment(&a));
        }
    }
}

fn decode_all(bytes: &[u8]) {
    for url in [type_url::LISTENER, type_url::CLUSTER, type_url::CLUSTER_LOAD_ASSIGNMENT] {
        let a = Any {
            type_url: url.into(),
            value: bytes.to_vec(),
        };
        let _ = (decode_listener(&a), decode_cluster(&a), decode_load_assignment(&a));
    }
}

proptest::proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
        decode_all(&bytes);
    }

    /// Good resources with a few bytes changed: deep enough to reach the
    /// field checks, not only the protobuf decoder.
    #[test]
    fn mutated_resources_never_panic(which in 0usize..3, edits in proptest::collection::vec((0usize..4096, proptest::num::u8::ANY), 1..8)) {
        let mut bytes = match which {
            0 => any(&good_listener()).value,
            1 => any(&dns_cluster()).value,
            _ => any(&good_cla()).value,
        };
        for (at, b) in edits {
            let n = bytes.len();
            bytes[at % n] = b;
        }
        decode_all(&bytes);
    }
}

// -------------------------------------------------------- the docs

/// Every field of every message decoded here, by its name in Envoy's
/// protos (oneof members by their own names).
const MESSAGES: &[(&str, &[&str])] = &[
    (
        "Listener",
        &[
            "name",
            "address",
            "additional_addresses",
            "stat_prefix",
            "stats_matcher",
            "filter_chains",
            "fcds_config",
            "filter_chain_matcher",
            "use_original_dst",
            "default_filter_chain",
            "per_connection_buffer_limit_bytes",
            "per_connection_buffer_high_watermark_timeout",
            "metadata",
            "deprecated_v1",
            "drain_type",
            "listener_filters",
            "listener_filters_timeout",
            "continue_on_listener_filters_timeout",
            "transparent",
            "freebind",
            "socket_options",
            "tcp_fast_open_queue_length",
            "traffic_direction",
            "udp_listener_config",
            "api_listener",
            "connection_balance_config",
            "reuse_port",
            "enable_reuse_port",
            "access_log",
            "tcp_backlog_size",
            "max_connections_to_accept_per_socket_event",
            "bind_to_port",
            "enable_mptcp",
            "ignore_global_conn_limit",
            "bypass_overload_manager",
            "tcp_keepalive",
            "internal_listener",
        ],
    ),
    (
        "SocketAddress",
        &[
            "protocol",
            "address",
            "resolver_name",
            "ipv4_compat",
            "network_namespace_filepath",
            "port_value",
            "named_port",
        ],
    ),
    (
        "ListenerFilter",
        &["name", "filter_disabled", "typed_config", "config_discovery"],
    ),
    (
        "TlsInspector",
        &[
            "enable_ja3_fingerprinting",
            "enable_ja4_fingerprinting",
            "initial_read_buffer_size",
            "close_connection_on_client_hello_parsing_errors",
            "max_client_hello_size",
        ],
    ),
    (
        "FilterChain",
        &[
            "filter_chain_match",
            "filters",
            "use_proxy_proto",
            "metadata",
            "transport_socket",
            "transport_socket_connect_timeout",
            "name",
        ],
    ),
    (
        "FilterChainMatch",
        &[
            "destination_port",
            "prefix_ranges",
            "address_suffix",
            "suffix_len",
            "direct_source_prefix_ranges",
            "source_type",
            "source_prefix_ranges",
            "source_ports",
            "server_names",
            "transport_protocol",
            "application_protocols",
        ],
    ),
    ("CidrRange", &["address_prefix", "prefix_len"]),
    ("Filter", &["name", "typed_config", "config_discovery"]),
    (
        "ExtensionConfigSource",
        &[
            "config_source",
            "default_config",
            "apply_default_config_without_warming",
            "type_urls",
        ],
    ),
    (
        "ConfigSource",
        &[
            "authorities",
            "path",
            "path_config_source",
            "api_config_source",
            "ads",
            "self",
            "initial_fetch_timeout",
            "resource_api_version",
        ],
    ),
    (
        "TcpProxy",
        &[
            "stat_prefix",
            "cluster",
            "weighted_clusters",
            "on_demand",
            "metadata_match",
            "idle_timeout",
            "downstream_idle_timeout",
            "upstream_idle_timeout",
            "access_log",
            "max_connect_attempts",
            "backoff_options",
            "hash_policy",
            "tunneling_config",
            "max_downstream_connection_duration",
            "max_downstream_connection_duration_jitter_percentage",
            "access_log_flush_interval",
            "flush_access_log_on_connected",
            "access_log_options",
            "proxy_protocol_tlvs",
            "proxy_protocol_tlv_merge_policy",
            "upstream_connect_mode",
            "max_early_data_bytes",
            "check_drain_close",
        ],
    ),
    (
        "Cluster",
        &[
            "transport_socket_matches",
            "transport_socket_matcher",
            "name",
            "alt_stat_name",
            "stats_matcher",
            "type",
            "cluster_type",
            "eds_cluster_config",
            "connect_timeout",
            "per_connection_buffer_limit_bytes",
            "per_connection_buffer_high_watermark_timeout",
            "lb_policy",
            "load_assignment",
            "health_checks",
            "max_requests_per_connection",
            "circuit_breakers",
            "upstream_http_protocol_options",
            "common_http_protocol_options",
            "http_protocol_options",
            "http2_protocol_options",
            "typed_extension_protocol_options",
            "dns_refresh_rate",
            "dns_jitter",
            "dns_failure_refresh_rate",
            "respect_dns_ttl",
            "dns_lookup_family",
            "dns_resolvers",
            "use_tcp_for_dns_lookups",
            "dns_resolution_config",
            "typed_dns_resolver_config",
            "wait_for_warm_on_init",
            "outlier_detection",
            "cleanup_interval",
            "upstream_bind_config",
            "lb_subset_config",
            "ring_hash_lb_config",
            "maglev_lb_config",
            "original_dst_lb_config",
            "least_request_lb_config",
            "round_robin_lb_config",
            "common_lb_config",
            "transport_socket",
            "metadata",
            "protocol_selection",
            "upstream_connection_options",
            "close_connections_on_host_health_failure",
            "ignore_health_on_host_removal",
            "filters",
            "load_balancing_policy",
            "lrs_server",
            "lrs_report_endpoint_metrics",
            "track_timeout_budgets",
            "upstream_config",
            "track_cluster_stats",
            "preconnect_policy",
            "connection_pool_per_downstream_connection",
            "queuing_policies",
        ],
    ),
    ("EdsClusterConfig", &["eds_config", "service_name"]),
    ("RoundRobinLbConfig", &["slow_start_config"]),
    (
        "LeastRequestLbConfig",
        &["choice_count", "active_request_bias", "slow_start_config"],
    ),
    (
        "OriginalDstLbConfig",
        &[
            "use_http_header",
            "http_header_name",
            "upstream_port_override",
            "metadata_key",
        ],
    ),
    (
        "ClusterLoadAssignment",
        &["cluster_name", "endpoints", "named_endpoints", "policy"],
    ),
    (
        "Policy",
        &[
            "drop_overloads",
            "overprovisioning_factor",
            "endpoint_stale_after",
            "weighted_priority_health",
        ],
    ),
    (
        "LocalityLbEndpoints",
        &[
            "locality",
            "metadata",
            "lb_endpoints",
            "load_balancer_endpoints",
            "leds_cluster_locality_config",
            "load_balancing_weight",
            "priority",
            "proximity",
        ],
    ),
    (
        "LbEndpoint",
        &[
            "endpoint",
            "endpoint_name",
            "health_status",
            "metadata",
            "load_balancing_weight",
        ],
    ),
    (
        "Endpoint",
        &[
            "address",
            "health_check_config",
            "hostname",
            "additional_addresses",
            "observability_name",
        ],
    ),
];

/// `docs/envoy-api-support.md` has a section per message (a heading
/// ending in the message's name in backticks) whose table has one row per
/// field, starting `` | `field` | `` and saying supported, ignored or
/// refused, and no other rows.
#[test]
fn the_support_matrix_lists_every_field() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/envoy-api-support.md");
    let doc = std::fs::read_to_string(path).unwrap();
    for (message, fields) in MESSAGES {
        let heading = doc
            .lines()
            .position(|l| {
                let l = l.trim_end();
                l.starts_with('#') && (l.ends_with(&format!("`{message}`")) || l.ends_with(&format!(".{message}`")))
            })
            .unwrap_or_else(|| panic!("no section for {message}"));
        let rows: Vec<&str> = doc
            .lines()
            .skip(heading + 1)
            .take_while(|l| !l.starts_with('#'))
            .filter(|l| l.starts_with("| `"))
            .collect();
        let mut documented: Vec<&str> = rows
            .iter()
            .map(|r| r.trim_start_matches("| `").split('`').next().unwrap())
            .collect();
        for row in &rows {
            assert!(
                ["| supported", "| ignored", "| refused"]
                    .iter()
                    .any(|v| row.contains(v)),
                "{message}: {row} says neither supported, ignored nor refused"
            );
        }
        let mut want: Vec<&str> = fields.to_vec();
        want.sort_unstable();
        documented.sort_unstable();
        assert_eq!(documented, want, "{message}: the fields in the doc");
    }
}

#[test]
fn errors_read_as_resource_path_and_fix() {
    let mut l = good_listener();
    edit_tcp(&mut l, |t| t.cluster_specifier = None);
    let e = listener(&l).unwrap_err();
    assert_eq!(
        e.to_string(),
        "egress: filter_chains[0].filters[2].typed_config.cluster_specifier: missing; name the cluster to relay to in `cluster`"
    );
    assert_eq!(xds::filter_name::DNS, "sluice.dns");
}

// What a gateway runs of a decoded listener (`xds::gateway`).

fn one_chain(listener_filters: Vec<PbListenerFilter>, filters: Vec<Filter>) -> Listener {
    Listener {
        name: "edge".into(),
        address: Some(sock("127.0.0.1", 15001)),
        listener_filters,
        filter_chains: vec![FilterChain {
            filters,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn clusters(list: &[Cluster]) -> std::collections::BTreeMap<String, EnvoyCluster> {
    list.iter()
        .map(|c| {
            let d = cluster_of(c).unwrap();
            (d.name.clone(), d)
        })
        .collect()
}

#[test]
fn a_gateway_maps_envoy_listeners_onto_its_model_and_names_what_it_cannot_run() {
    use sluice_api::envoy::{ANTI_EVASION, Cluster as Target, Endpoints, POLICY};
    use sluice_api::xds::gateway::gateway_listener;
    let mut original = original_dst_cluster();
    original.lb_config = None;
    let mut one = static_cluster();
    one.load_assignment = Some(ClusterLoadAssignment {
        cluster_name: "db".into(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: vec![endpoint("10.0.0.7", 5432, None)],
            ..Default::default()
        }],
        ..Default::default()
    });
    let known = clusters(&[original.clone(), one.clone()]);
    let none = std::collections::BTreeMap::new();

    let transparent = one_chain(
        vec![listener_filter("envoy.filters.listener.original_dst", &OriginalDst {})],
        vec![named("sluice.policy"), tcp_proxy("original")],
    );
    let spec = gateway_listener(&listener(&transparent).unwrap(), &known, &none).unwrap();
    assert!(spec.envoy().unwrap().original_dst);
    assert_eq!(spec.address.to_string(), "127.0.0.1:15001");
    assert!(matches!(
        spec.envoy().unwrap().chains[0].cluster,
        Target::OriginalDst { .. }
    ));

    // No sluice.policy named: the gateway runs it anyway, first.
    let tcp = one_chain(vec![], vec![tcp_proxy("db")]);
    let spec = gateway_listener(&listener(&tcp).unwrap(), &known, &none).unwrap();
    let chain = &spec.envoy().unwrap().chains[0];
    assert_eq!(chain.filters, [ANTI_EVASION, POLICY]);
    let Target::Balanced(b) = &chain.cluster else {
        panic!("{:?}", chain.cluster)
    };
    let Endpoints::Fixed { localities } = &b.endpoints else {
        panic!("{:?}", b.endpoints)
    };
    assert_eq!(localities[0].endpoints.len(), 1);
    assert_eq!(chain.upstream.unwrap().connect_timeout, Duration::from_millis(1500));
    // Several endpoints are balanced.
    let spec = gateway_listener(&listener(&tcp).unwrap(), &clusters(&[static_cluster()]), &none).unwrap();
    assert!(matches!(spec.envoy().unwrap().chains[0].cluster, Target::Balanced(_)));

    let refused = |l: Listener, known: &std::collections::BTreeMap<String, EnvoyCluster>| {
        gateway_listener(&listener(&l).unwrap(), known, &none).unwrap_err()
    };
    let e = refused(
        one_chain(vec![], vec![named("sluice.policy"), tcp_proxy("nowhere")]),
        &known,
    );
    assert_eq!(e.path, "filter_chains[0].filters[1].typed_config.cluster", "{e}");
    assert!(e.to_string().contains("no cluster `nowhere` was sent"), "{e}");
    // A cluster that has not come may be the next to: the gateway holds the
    // update a while rather than refusing it at once.
    assert!(matches!(e.kind, DecodeErrorKind::Undefined { .. }), "{e:?}");
    let e = refused(
        one_chain(vec![], vec![named("sluice.policy"), tcp_proxy("original")]),
        &known,
    );
    assert_eq!(e.path, "listener_filters", "{e}");
    // A plugin named in the chain runs there, after the policy.
    let with_plugin = one_chain(vec![], vec![named("sluice.policy"), wasm("guard"), tcp_proxy("db")]);
    let spec = gateway_listener(&listener(&with_plugin).unwrap(), &known, &none).unwrap();
    assert_eq!(spec.envoy().unwrap().chains[0].filters, [ANTI_EVASION, POLICY, "guard"]);
}

#[test]
fn a_chain_of_sluice_dns_makes_a_dns_listener_with_its_settings() {
    use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};
    use sluice_api::xds::gateway::{SpecKind, gateway_listener};
    let text = |s: &str| Value {
        kind: Some(Kind::StringValue(s.into())),
    };
    let settings = Struct {
        fields: [
            (
                "upstreams".to_owned(),
                Value {
                    kind: Some(Kind::ListValue(ListValue {
                        values: vec![text("udp://127.0.0.1:5353")],
                    })),
                },
            ),
            (
                "cache_entries".to_owned(),
                Value {
                    kind: Some(Kind::NumberValue(512.0)),
                },
            ),
        ]
        .into(),
    };
    let dns = Filter {
        name: "sluice.dns".into(),
        config_type: Some(filter::ConfigType::TypedConfig(any(&settings))),
    };
    let (none, no_eds) = (std::collections::BTreeMap::new(), std::collections::BTreeMap::new());
    let l = one_chain(vec![], vec![named("sluice.policy"), dns.clone()]);
    let spec = gateway_listener(&listener(&l).unwrap(), &none, &no_eds).unwrap();
    let SpecKind::Sluice { kind, options } = &spec.kind else {
        panic!("{spec:?}")
    };
    assert_eq!(*kind, sluice_api::ListenerType::Dns);
    assert_eq!(options, r#"{"cache_entries":512,"upstreams":["udp://127.0.0.1:5353"]}"#);
    // sluice.http_proxy, sluice.sni and sluice.quic make their kinds the same way.
    for (filter, want) in [
        ("sluice.http_proxy", sluice_api::ListenerType::HttpProxy),
        ("sluice.sni", sluice_api::ListenerType::Sni),
        ("sluice.quic", sluice_api::ListenerType::Quic),
    ] {
        let l = one_chain(vec![], vec![named(filter)]);
        let spec = gateway_listener(&listener(&l).unwrap(), &none, &no_eds).unwrap();
        assert!(
            matches!(&spec.kind, SpecKind::Sluice { kind, options } if *kind == want && options.is_empty()),
            "{spec:?}"
        );
    }

    // One chain only, matching everything, and nothing else in it.
    let mut two = l.clone();
    two.filter_chains.push(FilterChain {
        filter_chain_match: Some(FilterChainMatch {
            destination_port: u32v(53),
            ..Default::default()
        }),
        filters: vec![tcp_proxy("db")],
        ..Default::default()
    });
    let e = gateway_listener(&listener(&two).unwrap(), &none, &no_eds).unwrap_err();
    assert_eq!(e.path, "filter_chains[0].filters[1]", "{e}");
    let e = gateway_listener(
        &listener(&one_chain(
            vec![listener_filter("envoy.filters.listener.original_dst", &OriginalDst {})],
            vec![dns.clone()],
        ))
        .unwrap(),
        &none,
        &no_eds,
    )
    .unwrap_err();
    assert_eq!(e.path, "listener_filters", "{e}");
}
