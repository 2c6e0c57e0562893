//! `Cluster` (STATIC, STRICT_DNS, LOGICAL_DNS, EDS, ORIGINAL_DST with round
//! robin, least request or random) and `ClusterLoadAssignment`.

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::HealthStatus;
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as PbEndpoint, LbEndpoint, LocalityLbEndpoints, cluster_load_assignment,
    lb_endpoint, locality_lb_endpoints,
};

use super::model::{
    ClusterKind, DnsFamily, DnsSettings, Endpoint, EndpointAddress, EnvoyCluster, Health, LbPolicy, LoadAssignment,
    Locality,
};
use super::{At, DecodeError, Host, duration, same_server, socket_address};
use crate::model::HostPort;

/// Envoy's defaults.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DNS_REFRESH_RATE: Duration = Duration::from_secs(5);
const OVERPROVISIONING_FACTOR: u32 = super::model::DEFAULT_OVERPROVISIONING;
const LEAST_REQUEST_CHOICES: u32 = 2;

impl TryFrom<&Cluster> for EnvoyCluster {
    type Error = DecodeError;

    #[allow(
        deprecated,
        reason = "deprecated fields are still on the wire and must be refused, not ignored"
    )]
    fn try_from(c: &Cluster) -> Result<Self, DecodeError> {
        let Cluster {
            transport_socket_matches,
            transport_socket_matcher,
            name,
            // Names statistics only.
            alt_stat_name: _,
            stats_matcher: _,
            eds_cluster_config,
            connect_timeout,
            // Buffer sizing: Sluice's relay sizes its own buffers.
            per_connection_buffer_limit_bytes: _,
            per_connection_buffer_high_watermark_timeout,
            lb_policy,
            load_assignment,
            health_checks,
            // The options below apply to HTTP connection pools; Sluice
            // relays bytes (as tcp_proxy does, which never uses them).
            max_requests_per_connection: _,
            circuit_breakers,
            upstream_http_protocol_options: _,
            common_http_protocol_options: _,
            http_protocol_options: _,
            http2_protocol_options: _,
            typed_extension_protocol_options: _,
            dns_refresh_rate,
            // Spreads refreshes in time only.
            dns_jitter: _,
            dns_failure_refresh_rate,
            respect_dns_ttl,
            dns_lookup_family,
            dns_resolvers,
            use_tcp_for_dns_lookups,
            dns_resolution_config,
            typed_dns_resolver_config,
            // Sluice does not warm clusters: a flow to a cluster without
            // endpoints yet fails like one to an empty cluster.
            wait_for_warm_on_init: _,
            outlier_detection,
            // Housekeeping of ORIGINAL_DST's host list (memory only).
            cleanup_interval: _,
            upstream_bind_config,
            lb_subset_config,
            common_lb_config,
            transport_socket,
            // Data for extensions; Sluice runs none that read it.
            metadata: _,
            // HTTP only (see above).
            protocol_selection: _,
            upstream_connection_options,
            close_connections_on_host_health_failure,
            // Only matters with active health checks, which are refused.
            ignore_health_on_host_removal: _,
            filters,
            load_balancing_policy,
            lrs_server,
            // Only matters with lrs_server, which is refused.
            lrs_report_endpoint_metrics: _,
            // Statistics only.
            track_timeout_budgets: _,
            upstream_config,
            track_cluster_stats: _,
            // Opens connections ahead of need: latency only.
            preconnect_policy: _,
            // HTTP only (see above).
            connection_pool_per_downstream_connection: _,
            queuing_policies: _,
            cluster_discovery_type,
            lb_config,
        } = c;
        let at = At::root(name);
        if name.is_empty() {
            return Err(at.f("name").missing("give the cluster a name"));
        }
        let tls = "Sluice relays what the client sent and never originates TLS; remove it";
        at.refuse_with("transport_socket_matches", transport_socket_matches, tls)?;
        at.refuse_with("transport_socket_matcher", transport_socket_matcher, tls)?;
        at.refuse_with("transport_socket", transport_socket, tls)?;
        at.refuse(
            "per_connection_buffer_high_watermark_timeout",
            per_connection_buffer_high_watermark_timeout,
        )?;
        at.refuse("health_checks", health_checks)?;
        at.refuse("circuit_breakers", circuit_breakers)?;
        at.refuse("dns_failure_refresh_rate", dns_failure_refresh_rate)?;
        let resolver = "names are resolved by the gateway's own resolver; remove it";
        at.refuse_with("dns_resolvers", dns_resolvers, resolver)?;
        at.refuse_with("use_tcp_for_dns_lookups", use_tcp_for_dns_lookups, resolver)?;
        at.refuse_with("dns_resolution_config", dns_resolution_config, resolver)?;
        at.refuse_with("typed_dns_resolver_config", typed_dns_resolver_config, resolver)?;
        at.refuse("outlier_detection", outlier_detection)?;
        at.refuse("upstream_bind_config", upstream_bind_config)?;
        at.refuse("lb_subset_config", lb_subset_config)?;
        at.refuse("common_lb_config", common_lb_config)?;
        at.refuse("upstream_connection_options", upstream_connection_options)?;
        at.refuse(
            "close_connections_on_host_health_failure",
            close_connections_on_host_health_failure,
        )?;
        at.refuse("filters", filters)?;
        at.refuse_with(
            "load_balancing_policy",
            load_balancing_policy,
            "choose the balancer with lb_policy",
        )?;
        at.refuse("lrs_server", lrs_server)?;
        at.refuse("upstream_config", upstream_config)?;

        let discovery = match cluster_discovery_type {
            // proto3: an absent type is STATIC.
            None => cluster::DiscoveryType::Static,
            Some(cluster::ClusterDiscoveryType::Type(t)) => cluster::DiscoveryType::try_from(*t)
                .map_err(|_| at.f("type").invalid(format!("unknown discovery type {t}")))?,
            Some(cluster::ClusterDiscoveryType::ClusterType(_)) => {
                return Err(at
                    .f("cluster_type")
                    .unsupported("use STATIC, STRICT_DNS, LOGICAL_DNS, EDS or ORIGINAL_DST"));
            }
        };
        let lb = lb(&at, *lb_policy, lb_config.as_ref(), discovery)?;
        let connect_timeout = match connect_timeout {
            None => CONNECT_TIMEOUT,
            Some(d) => duration(&at.f("connect_timeout"), d)?,
        };
        if connect_timeout.is_zero() {
            return Err(at.f("connect_timeout").invalid("must be above 0s"));
        }
        if discovery != cluster::DiscoveryType::Eds {
            at.refuse_with(
                "eds_cluster_config",
                eds_cluster_config,
                "only an EDS cluster reads it; remove it",
            )?;
        }
        let is_dns = matches!(
            discovery,
            cluster::DiscoveryType::StrictDns | cluster::DiscoveryType::LogicalDns
        );
        // Like Envoy, the DNS settings of a cluster that resolves nothing
        // have no effect; they are read only where they apply.
        let dns = if is_dns {
            Some(dns_settings(
                &at,
                dns_refresh_rate.as_ref(),
                *respect_dns_ttl,
                *dns_lookup_family,
            )?)
        } else {
            None
        };
        let inline = |names: bool| {
            let Some(cla) = load_assignment else {
                return Err(at.f("load_assignment").missing("give the cluster's endpoints"));
            };
            let mut la = load_assignment_at(&at.f("load_assignment"), cla, names)?;
            // Inside a cluster, Envoy does not read the assignment's name.
            la.cluster_name.clone_from(name);
            Ok(la)
        };
        let kind = match (discovery, dns) {
            (cluster::DiscoveryType::Static, _) => ClusterKind::Static {
                endpoints: inline(false)?,
            },
            (cluster::DiscoveryType::StrictDns, Some(dns)) => ClusterKind::StrictDns {
                endpoints: inline(true)?,
                dns,
            },
            (cluster::DiscoveryType::LogicalDns, Some(dns)) => {
                let la = inline(true)?;
                let mut all = la.localities.iter().flat_map(|l| l.endpoints.iter());
                let (Some(one), None) = (all.next(), all.next()) else {
                    return Err(at
                        .f("load_assignment")
                        .f("endpoints")
                        .invalid("a LOGICAL_DNS cluster takes exactly one endpoint"));
                };
                let endpoint = match &one.address {
                    EndpointAddress::Name(hp) => hp.clone(),
                    EndpointAddress::Ip(a) => HostPort {
                        host: a.ip().to_string(),
                        port: a.port(),
                    },
                };
                ClusterKind::LogicalDns { endpoint, dns }
            }
            (cluster::DiscoveryType::Eds, _) => {
                at.refuse_with(
                    "load_assignment",
                    load_assignment,
                    "an EDS cluster's endpoints come over EDS; remove it",
                )?;
                let Some(eds) = eds_cluster_config else {
                    return Err(at.f("eds_cluster_config").missing("give eds_config: {ads: {}}"));
                };
                let cluster::EdsClusterConfig {
                    eds_config,
                    service_name,
                } = eds;
                let eds_at = at.f("eds_cluster_config");
                same_server(&eds_at.f("eds_config"), eds_config.as_ref())?;
                ClusterKind::Eds {
                    service_name: if service_name.is_empty() {
                        name.clone()
                    } else {
                        service_name.clone()
                    },
                }
            }
            (cluster::DiscoveryType::OriginalDst, _) => {
                at.refuse_with(
                    "load_assignment",
                    load_assignment,
                    "an ORIGINAL_DST cluster dials each connection's original destination; remove it",
                )?;
                let port_override = match lb_config {
                    Some(cluster::LbConfig::OriginalDstLbConfig(o)) => {
                        original_dst(&at.f("original_dst_lb_config"), o)?
                    }
                    _ => None,
                };
                ClusterKind::OriginalDst { port_override }
            }
            // `dns` is Some exactly for the DNS types.
            (cluster::DiscoveryType::StrictDns | cluster::DiscoveryType::LogicalDns, None) => {
                return Err(at.f("type").invalid("a DNS cluster without DNS settings"));
            }
        };
        Ok(EnvoyCluster {
            name: name.clone(),
            kind,
            lb,
            connect_timeout,
        })
    }
}

fn lb(
    at: &At<'_>,
    policy: i32,
    config: Option<&cluster::LbConfig>,
    discovery: cluster::DiscoveryType,
) -> Result<LbPolicy, DecodeError> {
    let policy = cluster::LbPolicy::try_from(policy).map_err(|_| {
        at.f("lb_policy")
            .invalid(format!("unknown load balancing policy {policy}"))
    })?;
    let original_dst = discovery == cluster::DiscoveryType::OriginalDst;
    let lb = match policy {
        // Envoy takes CLUSTER_PROVIDED for ORIGINAL_DST; the default
        // (ROUND_ROBIN, i.e. not set) means the same there.
        cluster::LbPolicy::ClusterProvided | cluster::LbPolicy::RoundRobin if original_dst => LbPolicy::ClusterProvided,
        _ if original_dst => {
            return Err(at
                .f("lb_policy")
                .invalid("an ORIGINAL_DST cluster takes CLUSTER_PROVIDED"));
        }
        cluster::LbPolicy::RoundRobin => LbPolicy::RoundRobin,
        cluster::LbPolicy::Random => LbPolicy::Random,
        cluster::LbPolicy::LeastRequest => LbPolicy::LeastRequest {
            choice_count: LEAST_REQUEST_CHOICES,
        },
        cluster::LbPolicy::ClusterProvided => {
            return Err(at
                .f("lb_policy")
                .invalid("CLUSTER_PROVIDED is for ORIGINAL_DST clusters"));
        }
        cluster::LbPolicy::RingHash | cluster::LbPolicy::Maglev | cluster::LbPolicy::LoadBalancingPolicyConfig => {
            return Err(at
                .f("lb_policy")
                .unsupported("use ROUND_ROBIN, LEAST_REQUEST or RANDOM"));
        }
    };
    let Some(config) = config else { return Ok(lb) };
    match (config, lb) {
        (cluster::LbConfig::RoundRobinLbConfig(r), LbPolicy::RoundRobin) => {
            let cluster::RoundRobinLbConfig { slow_start_config } = r;
            at.f("round_robin_lb_config")
                .refuse("slow_start_config", slow_start_config)?;
            Ok(lb)
        }
        (cluster::LbConfig::LeastRequestLbConfig(l), LbPolicy::LeastRequest { .. }) => {
            let at = at.f("least_request_lb_config");
            let cluster::LeastRequestLbConfig {
                choice_count,
                active_request_bias,
                slow_start_config,
            } = l;
            at.refuse("active_request_bias", active_request_bias)?;
            at.refuse("slow_start_config", slow_start_config)?;
            let choice_count = match choice_count {
                None => LEAST_REQUEST_CHOICES,
                Some(c) if c.value >= 2 => c.value,
                Some(_) => return Err(at.f("choice_count").invalid("must be at least 2")),
            };
            Ok(LbPolicy::LeastRequest { choice_count })
        }
        // Read with the discovery type.
        (cluster::LbConfig::OriginalDstLbConfig(_), LbPolicy::ClusterProvided) => Ok(lb),
        (cluster::LbConfig::RingHashLbConfig(_), _) => Err(at
            .f("ring_hash_lb_config")
            .unsupported("ring hash balancing is not supported; remove it")),
        (cluster::LbConfig::MaglevLbConfig(_), _) => Err(at
            .f("maglev_lb_config")
            .unsupported("Maglev balancing is not supported; remove it")),
        (cluster::LbConfig::RoundRobinLbConfig(_), _) => Err(at
            .f("round_robin_lb_config")
            .invalid("configures a balancer the cluster does not use (see lb_policy)")),
        (cluster::LbConfig::LeastRequestLbConfig(_), _) => Err(at
            .f("least_request_lb_config")
            .invalid("configures a balancer the cluster does not use (see lb_policy)")),
        (cluster::LbConfig::OriginalDstLbConfig(_), _) => Err(at
            .f("original_dst_lb_config")
            .invalid("only an ORIGINAL_DST cluster reads it")),
    }
}

fn original_dst(at: &At<'_>, o: &cluster::OriginalDstLbConfig) -> Result<Option<u16>, DecodeError> {
    let cluster::OriginalDstLbConfig {
        use_http_header,
        http_header_name,
        upstream_port_override,
        metadata_key,
    } = o;
    let fix = "Sluice dials the connection's original destination; remove it";
    at.refuse_with("use_http_header", use_http_header, fix)?;
    at.refuse_with("http_header_name", http_header_name, fix)?;
    at.refuse_with("metadata_key", metadata_key, fix)?;
    upstream_port_override
        .map(|p| {
            u16::try_from(p.value).ok().filter(|p| *p != 0).ok_or_else(|| {
                at.f("upstream_port_override")
                    .invalid(format!("{} is not a port", p.value))
            })
        })
        .transpose()
}

fn dns_settings(
    at: &At<'_>,
    refresh_rate: Option<&envoy_types::pb::google::protobuf::Duration>,
    respect_ttl: bool,
    family: i32,
) -> Result<DnsSettings, DecodeError> {
    let refresh_rate = match refresh_rate {
        None => DNS_REFRESH_RATE,
        Some(d) => duration(&at.f("dns_refresh_rate"), d)?,
    };
    if refresh_rate.is_zero() {
        return Err(at.f("dns_refresh_rate").invalid("must be above 0s"));
    }
    let family = match cluster::DnsLookupFamily::try_from(family) {
        Ok(cluster::DnsLookupFamily::Auto) => DnsFamily::Auto,
        Ok(cluster::DnsLookupFamily::V4Only) => DnsFamily::V4Only,
        Ok(cluster::DnsLookupFamily::V6Only) => DnsFamily::V6Only,
        Ok(cluster::DnsLookupFamily::V4Preferred) => DnsFamily::V4Preferred,
        Ok(cluster::DnsLookupFamily::All) => DnsFamily::All,
        Err(_) => {
            return Err(at
                .f("dns_lookup_family")
                .invalid(format!("unknown lookup family {family}")));
        }
    };
    Ok(DnsSettings {
        family,
        refresh_rate,
        respect_ttl,
    })
}

impl TryFrom<&ClusterLoadAssignment> for LoadAssignment {
    type Error = DecodeError;

    fn try_from(cla: &ClusterLoadAssignment) -> Result<Self, DecodeError> {
        let at = At::root(&cla.cluster_name);
        if cla.cluster_name.is_empty() {
            return Err(at.f("cluster_name").missing("give the EDS service name of the cluster"));
        }
        // Over EDS, endpoints are addresses: Envoy resolves no names there.
        load_assignment_at(&at, cla, false)
    }
}

/// `names`: endpoints may be DNS names (a DNS cluster's inline endpoints).
fn load_assignment_at(at: &At<'_>, cla: &ClusterLoadAssignment, names: bool) -> Result<LoadAssignment, DecodeError> {
    let ClusterLoadAssignment {
        cluster_name,
        endpoints,
        named_endpoints,
        policy,
    } = cla;
    at.refuse_with(
        "named_endpoints",
        named_endpoints,
        "give each endpoint in endpoints[].lb_endpoints[].endpoint",
    )?;
    let mut overprovisioning_factor = OVERPROVISIONING_FACTOR;
    if let Some(p) = policy {
        let at = at.f("policy");
        let cluster_load_assignment::Policy {
            drop_overloads,
            overprovisioning_factor: factor,
            endpoint_stale_after,
            weighted_priority_health,
        } = p;
        at.refuse("drop_overloads", drop_overloads)?;
        at.refuse("endpoint_stale_after", endpoint_stale_after)?;
        at.refuse("weighted_priority_health", weighted_priority_health)?;
        if let Some(f) = factor {
            if f.value == 0 {
                return Err(at.f("overprovisioning_factor").invalid("must be above 0"));
            }
            overprovisioning_factor = f.value;
        }
    }
    let localities = endpoints
        .iter()
        .enumerate()
        .map(|(i, l)| locality(&at.f("endpoints").i(i), l, names))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(LoadAssignment {
        cluster_name: cluster_name.clone(),
        localities,
        overprovisioning_factor,
    })
}

fn locality(at: &At<'_>, l: &LocalityLbEndpoints, names: bool) -> Result<Locality, DecodeError> {
    let LocalityLbEndpoints {
        // Names the zone for zone-aware routing and statistics, neither of
        // which Sluice does; the locality's weight and priority still apply.
        locality: _,
        // Data for extensions; Sluice runs none that read it.
        metadata: _,
        lb_endpoints,
        load_balancing_weight,
        priority,
        proximity,
        lb_config,
    } = l;
    at.refuse("proximity", proximity)?;
    match lb_config {
        None => {}
        #[allow(deprecated, reason = "still on the wire from older servers")]
        Some(locality_lb_endpoints::LbConfig::LoadBalancerEndpoints(_)) => {
            return Err(at
                .f("load_balancer_endpoints")
                .unsupported("give the endpoints in lb_endpoints"));
        }
        Some(locality_lb_endpoints::LbConfig::LedsClusterLocalityConfig(_)) => {
            return Err(at
                .f("leds_cluster_locality_config")
                .unsupported("give the endpoints in lb_endpoints"));
        }
    }
    if load_balancing_weight.is_some_and(|w| w.value == 0) {
        return Err(at.f("load_balancing_weight").invalid("must be at least 1"));
    }
    let endpoints = lb_endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| lb_endpoint(&at.f("lb_endpoints").i(i), e, names))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Locality {
        weight: load_balancing_weight.map(|w| w.value),
        priority: *priority,
        endpoints,
    })
}

fn lb_endpoint(at: &At<'_>, e: &LbEndpoint, names: bool) -> Result<Endpoint, DecodeError> {
    let LbEndpoint {
        health_status,
        // Data for extensions; Sluice runs none that read it.
        metadata: _,
        load_balancing_weight,
        host_identifier,
    } = e;
    let health = match HealthStatus::try_from(*health_status) {
        Ok(HealthStatus::Unknown | HealthStatus::Healthy) => Health::Healthy,
        Ok(HealthStatus::Unhealthy | HealthStatus::Timeout) => Health::Unhealthy,
        Ok(HealthStatus::Draining) => Health::Draining,
        Ok(HealthStatus::Degraded) => Health::Degraded,
        Err(_) => {
            return Err(at
                .f("health_status")
                .invalid(format!("unknown health status {health_status}")));
        }
    };
    let weight = match load_balancing_weight {
        None => 1,
        Some(w) if w.value >= 1 => w.value,
        Some(_) => return Err(at.f("load_balancing_weight").invalid("must be at least 1")),
    };
    let ep = match host_identifier {
        Some(lb_endpoint::HostIdentifier::Endpoint(ep)) => ep,
        Some(lb_endpoint::HostIdentifier::EndpointName(_)) => {
            return Err(at
                .f("endpoint_name")
                .unsupported("give the endpoint itself in `endpoint`"));
        }
        None => return Err(at.f("endpoint").missing("give the endpoint's address")),
    };
    let at = at.f("endpoint");
    let PbEndpoint {
        address,
        health_check_config,
        // For HTTP host rewriting and TLS names, neither of which Sluice
        // does to a relayed connection.
        hostname: _,
        additional_addresses,
        // Names the endpoint in logs and statistics only.
        observability_name: _,
    } = ep;
    at.refuse_with(
        "health_check_config",
        health_check_config,
        "Sluice does no active health checking; remove it",
    )?;
    at.refuse("additional_addresses", additional_addresses)?;
    let address = match socket_address(&at.f("address"), address.as_ref(), names)? {
        Host::Ip(a) => EndpointAddress::Ip(a),
        Host::Name(hp) => EndpointAddress::Name(hp),
    };
    Ok(Endpoint {
        address,
        weight,
        health,
    })
}
