//! `Listener`, its listener filters, filter chains and network filters
//! (`tcp_proxy`, `sluice.policy`, `sluice.dns`, Wasm over ECDS).

use envoy_types::pb::envoy::config::core::v3::{CidrRange, ExtensionConfigSource};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter as PbListenerFilter, filter, listener_filter,
};
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp;
use envoy_types::pb::google::protobuf::Any;
use ipnet::IpNet;

use super::model::{EnvoyChain, EnvoyListener, ListenerFilter, NetworkFilter, TcpProxy};
use super::{At, DecodeError, Host, bool_or, duration, filter_name, same_server, socket_address, timeout, type_url};
use crate::domain::DomainPattern;
use crate::envoy::{ChainMatch, Transport};
use crate::model::PortRange;

/// Envoy's default `listener_filters_timeout`.
const LISTENER_FILTERS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);
/// Envoy's default `tcp_proxy` `idle_timeout`.
const TCP_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

impl TryFrom<&Listener> for EnvoyListener {
    type Error = DecodeError;

    #[allow(
        deprecated,
        reason = "deprecated fields are still on the wire and must be refused, not ignored"
    )]
    fn try_from(l: &Listener) -> Result<Self, DecodeError> {
        let Listener {
            name,
            address,
            additional_addresses,
            // Names statistics only.
            stat_prefix: _,
            // Chooses which statistics are kept.
            stats_matcher: _,
            filter_chains,
            fcds_config,
            filter_chain_matcher,
            use_original_dst,
            default_filter_chain,
            // Buffer sizing: Sluice's relay sizes its own buffers.
            per_connection_buffer_limit_bytes: _,
            per_connection_buffer_high_watermark_timeout,
            // Data for extensions; Sluice runs none that read it.
            metadata: _,
            deprecated_v1,
            // Hot-restart draining; Sluice has no hot restart, and a flow
            // keeps the configuration it started with either way.
            drain_type: _,
            listener_filters,
            listener_filters_timeout,
            continue_on_listener_filters_timeout,
            transparent,
            freebind,
            socket_options,
            // TCP Fast Open only saves a round trip; clients without it
            // connect as usual.
            tcp_fast_open_queue_length: _,
            // Informational (tracing, statistics).
            traffic_direction: _,
            udp_listener_config,
            api_listener,
            // How accepted connections spread over Envoy's worker threads.
            connection_balance_config: _,
            // SO_REUSEPORT: how accepts spread over threads.
            reuse_port: _,
            enable_reuse_port: _,
            access_log,
            // The kernel's accept queue length.
            tcp_backlog_size: _,
            // Accept-loop batching.
            max_connections_to_accept_per_socket_event: _,
            bind_to_port,
            enable_mptcp,
            // Envoy's global connection limit and overload manager, which
            // Sluice does not have.
            ignore_global_conn_limit: _,
            bypass_overload_manager: _,
            tcp_keepalive,
            listener_specifier,
        } = l;
        let at = At::root(name);
        if name.is_empty() {
            return Err(at.f("name").missing("give the listener a name"));
        }
        if listener_specifier.is_some() {
            return Err(at
                .f("internal_listener")
                .unsupported("Sluice has no internal listeners"));
        }
        at.refuse_with("api_listener", api_listener, "Sluice's listeners are TCP listeners")?;
        at.refuse_with(
            "udp_listener_config",
            udp_listener_config,
            "Sluice's DNS proxy listens on UDP from sluice.yaml; over xDS, listeners are TCP",
        )?;
        let address = match socket_address(&at.f("address"), address.as_ref(), false)? {
            Host::Ip(a) => a,
            Host::Name(_) => return Err(at.f("address").invalid("a listener binds an IP address")),
        };
        at.refuse("additional_addresses", additional_addresses)?;
        at.refuse_with("fcds_config", fcds_config, "give the chains in filter_chains")?;
        at.refuse_with(
            "filter_chain_matcher",
            filter_chain_matcher,
            "match chains with filter_chain_match",
        )?;
        at.refuse_with(
            "use_original_dst",
            &bool_or(use_original_dst.as_ref(), false),
            "remove it; to serve redirected connections, use the original_dst listener filter",
        )?;
        at.refuse(
            "per_connection_buffer_high_watermark_timeout",
            per_connection_buffer_high_watermark_timeout,
        )?;
        at.refuse("deprecated_v1", deprecated_v1)?;
        at.refuse("freebind", &bool_or(freebind.as_ref(), false))?;
        at.refuse("socket_options", socket_options)?;
        at.refuse_with(
            "access_log",
            access_log,
            "Sluice writes its own audit record of every flow",
        )?;
        at.refuse_with(
            "bind_to_port",
            &!bool_or(bind_to_port.as_ref(), true),
            "remove it; a Sluice listener always binds its address",
        )?;
        at.refuse("enable_mptcp", enable_mptcp)?;
        at.refuse("tcp_keepalive", tcp_keepalive)?;

        let listener_filters = listener_filters
            .iter()
            .enumerate()
            .map(|(i, f)| listener_filter(&at.f("listener_filters").i(i), f))
            .collect::<Result<Vec<_>, _>>()?;
        let listener_filters_timeout = timeout(
            &at.f("listener_filters_timeout"),
            listener_filters_timeout.as_ref(),
            LISTENER_FILTERS_TIMEOUT,
        )?;
        let chains = filter_chains
            .iter()
            .enumerate()
            .map(|(i, c)| chain(&at.f("filter_chains").i(i), c))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, c) in chains.iter().enumerate() {
            if let Some(j) = chains[..i].iter().position(|d| d.matcher == c.matcher) {
                return Err(at.f("filter_chains").i(i).f("filter_chain_match").invalid(format!(
                    "the same as filter_chains[{j}]'s; no connection could reach this chain"
                )));
            }
        }
        let tls = listener_filters
            .iter()
            .any(|f| matches!(f, ListenerFilter::TlsInspector { .. }));
        let http = listener_filters.contains(&ListenerFilter::HttpInspector);
        for (i, c) in chains.iter().enumerate() {
            // Envoy accepts these and never matches them: what they match
            // on is only known through a listener filter.
            let at = at.f("filter_chains").i(i).f("filter_chain_match");
            let fix = "read from the ClientHello; add the tls_inspector listener filter";
            if !tls && !c.matcher.server_names.is_empty() {
                return Err(at.f("server_names").invalid(fix));
            }
            if !tls && c.matcher.transport_protocol == Some(Transport::Tls) {
                return Err(at.f("transport_protocol").invalid(fix));
            }
            if !tls && !http && !c.matcher.application_protocols.is_empty() {
                return Err(at
                    .f("application_protocols")
                    .invalid("read by a listener filter; add tls_inspector or http_inspector"));
            }
        }
        let default_chain = default_filter_chain
            .as_ref()
            .map(|c| chain(&at.f("default_filter_chain"), c))
            .transpose()?
            // Envoy does not read the default chain's match: it serves
            // whatever no other chain matches.
            .map(|c| EnvoyChain {
                matcher: ChainMatch::default(),
                ..c
            });
        if chains.is_empty() && default_chain.is_none() {
            return Err(at
                .f("filter_chains")
                .missing("give at least one filter chain or a default_filter_chain"));
        }
        Ok(EnvoyListener {
            name: name.clone(),
            address,
            transparent: bool_or(transparent.as_ref(), false),
            listener_filters,
            listener_filters_timeout,
            continue_on_listener_filters_timeout: *continue_on_listener_filters_timeout,
            chains,
            default_chain,
        })
    }
}

const TLS_INSPECTOR_NAME: &str = "envoy.filters.listener.tls_inspector";
const ORIGINAL_DST_NAME: &str = "envoy.filters.listener.original_dst";
const HTTP_INSPECTOR_NAME: &str = "envoy.filters.listener.http_inspector";

fn listener_filter(at: &At<'_>, f: &PbListenerFilter) -> Result<ListenerFilter, DecodeError> {
    let PbListenerFilter {
        name,
        filter_disabled,
        config_type,
    } = f;
    at.refuse("filter_disabled", filter_disabled)?;
    let typed = match config_type {
        Some(listener_filter::ConfigType::TypedConfig(a)) => Some(a),
        Some(listener_filter::ConfigType::ConfigDiscovery(_)) => {
            return Err(at.f("config_discovery").unsupported("give the filter's typed_config"));
        }
        None => None,
    };
    // Without a typed_config, Envoy still finds the three by their
    // well-known names.
    let url = match (typed, name.as_str()) {
        (Some(a), _) => a.type_url.as_str(),
        (None, TLS_INSPECTOR_NAME) => type_url::TLS_INSPECTOR,
        (None, ORIGINAL_DST_NAME) => type_url::ORIGINAL_DST,
        (None, HTTP_INSPECTOR_NAME) => type_url::HTTP_INSPECTOR,
        (None, _) => {
            return Err(at
                .f("typed_config")
                .missing("give tls_inspector, original_dst or http_inspector"));
        }
    };
    let at = at.f("typed_config");
    match url {
        type_url::TLS_INSPECTOR => {
            let t: TlsInspector = match typed {
                Some(a) => at.unpack(a, type_url::TLS_INSPECTOR)?,
                None => TlsInspector::default(),
            };
            let TlsInspector {
                enable_ja3_fingerprinting,
                enable_ja4_fingerprinting,
                // Read-buffer sizing only.
                initial_read_buffer_size: _,
                // Sluice always closes a connection whose ClientHello it
                // cannot parse (it fails closed).
                close_connection_on_client_hello_parsing_errors: _,
                max_client_hello_size,
            } = &t;
            at.refuse_with(
                "enable_ja3_fingerprinting",
                &bool_or(enable_ja3_fingerprinting.as_ref(), false),
                "Sluice does not compute JA3 fingerprints; remove it",
            )?;
            at.refuse_with(
                "enable_ja4_fingerprinting",
                &bool_or(enable_ja4_fingerprinting.as_ref(), false),
                "Sluice does not compute JA4 fingerprints; remove it",
            )?;
            if max_client_hello_size.is_some_and(|m| m.value == 0) {
                return Err(at.f("max_client_hello_size").invalid("must be at least 1"));
            }
            Ok(ListenerFilter::TlsInspector {
                max_client_hello: max_client_hello_size.map(|m| m.value),
            })
        }
        // Both have no fields.
        type_url::ORIGINAL_DST => {
            if let Some(a) = typed {
                at.unpack::<envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst>(
                    a,
                    type_url::ORIGINAL_DST,
                )?;
            }
            Ok(ListenerFilter::OriginalDst)
        }
        type_url::HTTP_INSPECTOR => {
            if let Some(a) = typed {
                at.unpack::<envoy_types::pb::envoy::extensions::filters::listener::http_inspector::v3::HttpInspector>(
                    a,
                    type_url::HTTP_INSPECTOR,
                )?;
            }
            Ok(ListenerFilter::HttpInspector)
        }
        other => Err(at.invalid(format!(
            "`{other}` is not a listener filter Sluice runs; it runs tls_inspector, original_dst and http_inspector"
        ))),
    }
}

#[allow(deprecated, reason = "use_proxy_proto is still on the wire and must be refused")]
fn chain(at: &At<'_>, c: &FilterChain) -> Result<EnvoyChain, DecodeError> {
    let FilterChain {
        filter_chain_match,
        filters,
        use_proxy_proto,
        // Data for extensions; Sluice runs none that read it.
        metadata: _,
        transport_socket,
        // Bounds the transport socket's handshake; there is none (refused).
        transport_socket_connect_timeout: _,
        name,
    } = c;
    at.refuse("use_proxy_proto", &bool_or(use_proxy_proto.as_ref(), false))?;
    at.refuse_with(
        "transport_socket",
        transport_socket,
        "Sluice never terminates TLS; remove it",
    )?;
    let default = FilterChainMatch::default();
    let matcher = chain_match(
        &at.f("filter_chain_match"),
        filter_chain_match.as_ref().unwrap_or(&default),
    )?;
    let filters = filters
        .iter()
        .enumerate()
        .map(|(i, f)| network_filter(&at.f("filters").i(i), f))
        .collect::<Result<Vec<_>, _>>()?;
    let Some(last) = filters.len().checked_sub(1) else {
        return Err(at.f("filters").missing("end the chain with tcp_proxy or sluice.dns"));
    };
    let mut policy = None;
    for (i, f) in filters.iter().enumerate() {
        let at = at.f("filters").i(i);
        if f.is_terminal() && i != last {
            return Err(at.invalid(format!(
                "ends the chain, so filters[{}] and after would never run",
                i + 1
            )));
        }
        if i == last && !f.is_terminal() {
            return Err(at.invalid("a chain must end with tcp_proxy or sluice.dns"));
        }
        match f {
            NetworkFilter::SluicePolicy if policy.is_some() => {
                return Err(at.invalid("sluice.policy appears twice in the chain"));
            }
            NetworkFilter::SluicePolicy => policy = Some(i),
            NetworkFilter::Wasm { .. } if policy.is_none() && filters[i..].contains(&NetworkFilter::SluicePolicy) => {
                return Err(at.invalid("plugins run after sluice.policy; move sluice.policy before this filter"));
            }
            _ => {}
        }
    }
    Ok(EnvoyChain {
        name: name.clone(),
        matcher,
        filters,
    })
}

fn chain_match(at: &At<'_>, m: &FilterChainMatch) -> Result<ChainMatch, DecodeError> {
    let FilterChainMatch {
        destination_port,
        prefix_ranges,
        address_suffix,
        suffix_len,
        direct_source_prefix_ranges,
        source_type,
        source_prefix_ranges,
        source_ports,
        server_names,
        transport_protocol,
        application_protocols,
    } = m;
    at.refuse("address_suffix", address_suffix)?;
    at.refuse("suffix_len", suffix_len)?;
    at.refuse_with(
        "direct_source_prefix_ranges",
        direct_source_prefix_ranges,
        "match the source with source_prefix_ranges",
    )?;
    at.refuse_with("source_type", source_type, "match the source with source_prefix_ranges")?;
    let destination_ports = match destination_port {
        None => Vec::new(),
        Some(p) => {
            let port = u16::try_from(p.value)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| at.f("destination_port").invalid(format!("{} is not a port", p.value)))?;
            vec![PortRange { lo: port, hi: port }]
        }
    };
    let destination_prefixes = cidrs(&at.f("prefix_ranges"), prefix_ranges)?;
    let source_prefixes = cidrs(&at.f("source_prefix_ranges"), source_prefix_ranges)?;
    let server_names = server_names
        .iter()
        .enumerate()
        .map(|(i, n)| DomainPattern::parse(n).map_err(|e| at.f("server_names").i(i).invalid(format!("`{n}`: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let transport_protocol = match transport_protocol.as_str() {
        "" => None,
        "tls" => Some(Transport::Tls),
        "raw_buffer" => Some(Transport::RawBuffer),
        other => {
            return Err(at
                .f("transport_protocol")
                .invalid(format!("`{other}`: Sluice knows `tls` and `raw_buffer`")));
        }
    };
    if let Some(i) = application_protocols.iter().position(String::is_empty) {
        return Err(at.f("application_protocols").i(i).invalid("an empty protocol"));
    }
    Ok(ChainMatch {
        server_names,
        destination_ports,
        source_prefixes,
        destination_prefixes,
        transport_protocol,
        application_protocols: application_protocols.clone(),
        source_ports: source_ports
            .iter()
            .enumerate()
            .map(|(i, p)| {
                u16::try_from(*p)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| at.f("source_ports").i(i).invalid(format!("{p} is not a port")))
            })
            .collect::<Result<_, _>>()?,
    })
}

fn cidrs(at: &At<'_>, ranges: &[CidrRange]) -> Result<Vec<IpNet>, DecodeError> {
    ranges.iter().enumerate().map(|(i, r)| cidr(&at.i(i), r)).collect()
}

fn cidr(at: &At<'_>, r: &CidrRange) -> Result<IpNet, DecodeError> {
    let CidrRange {
        address_prefix,
        prefix_len,
    } = r;
    let ip: std::net::IpAddr = address_prefix.parse().map_err(|_| {
        at.f("address_prefix")
            .invalid(format!("`{address_prefix}` is not an IP address"))
    })?;
    // Envoy reads an absent length as 0.
    let len = prefix_len.map_or(0, |l| l.value);
    let len = u8::try_from(len).map_err(|_| at.f("prefix_len").invalid(format!("{len} is too long")))?;
    // Like Envoy, host bits of the address are dropped.
    IpNet::new(ip, len)
        .map(|n| n.trunc())
        .map_err(|_| at.f("prefix_len").invalid(format!("{len} is too long for {ip}")))
}

fn network_filter(at: &At<'_>, f: &Filter) -> Result<NetworkFilter, DecodeError> {
    let Filter { name, config_type } = f;
    let typed = match config_type {
        Some(filter::ConfigType::ConfigDiscovery(src)) => {
            return wasm(at, name, src);
        }
        Some(filter::ConfigType::TypedConfig(a)) => Some(a),
        None => None,
    };
    if let Some(a) = typed {
        match a.type_url.as_str() {
            type_url::TCP_PROXY => return tcp_proxy(&at.f("typed_config"), a).map(NetworkFilter::TcpProxy),
            type_url::NETWORK_WASM => {
                return Err(at
                    .f("typed_config")
                    .unsupported("deliver plugins over ECDS: give config_discovery, named after the plugin"));
            }
            _ => {}
        }
    }
    let filter = match name.as_str() {
        filter_name::POLICY => NetworkFilter::SluicePolicy,
        // A listener kind of Sluice's own: its settings, as `sluice.yaml`
        // writes them.
        other if let Some(kind) = filter_name::kind(other) => {
            return match typed {
                Some(a) if a.type_url == type_url::STRUCT && !a.value.is_empty() => {
                    let s: envoy_types::pb::google::protobuf::Struct =
                        at.f("typed_config").unpack(a, type_url::STRUCT)?;
                    Ok(NetworkFilter::SluiceListener {
                        kind,
                        options: super::struct_json(&s).to_string(),
                    })
                }
                Some(a)
                    if !(a.value.is_empty() && (a.type_url == type_url::EMPTY || a.type_url == type_url::STRUCT)) =>
                {
                    Err(at.f("typed_config").invalid(format!(
                        "`{}`: give a google.protobuf.Struct of the listener's settings",
                        a.type_url
                    )))
                }
                _ => Ok(NetworkFilter::SluiceListener {
                    kind,
                    options: String::new(),
                }),
            };
        }
        _ => {
            return Err(match typed {
                Some(a) => at.f("typed_config").invalid(format!(
                    "`{}` is not a network filter Sluice runs; it runs tcp_proxy, sluice.policy, sluice.dns, sluice.http_proxy, sluice.sni and Wasm over ECDS",
                    a.type_url
                )),
                None => at
                    .f("typed_config")
                    .missing("give tcp_proxy's configuration, or name the filter sluice.policy or sluice.dns"),
            });
        }
    };
    // sluice.policy takes its settings from Sluice's own resources.
    if let Some(a) = typed
        && !(a.value.is_empty() && (a.type_url == type_url::EMPTY || a.type_url == type_url::STRUCT))
    {
        return Err(at
            .f("typed_config")
            .unsupported("Sluice's filters take no configuration here; leave typed_config out"));
    }
    Ok(filter)
}

/// A plugin: its configuration is the ECDS resource named after the filter.
fn wasm(at: &At<'_>, name: &str, src: &ExtensionConfigSource) -> Result<NetworkFilter, DecodeError> {
    if name.is_empty() {
        return Err(at.f("name").missing("name the filter after the plugin's ECDS resource"));
    }
    let at = at.f("config_discovery");
    let ExtensionConfigSource {
        config_source,
        default_config,
        apply_default_config_without_warming,
        type_urls,
    } = src;
    same_server(&at.f("config_source"), config_source.as_ref())?;
    at.refuse_with(
        "default_config",
        default_config,
        "remove it; a chain waits for its plugin's configuration",
    )?;
    at.refuse(
        "apply_default_config_without_warming",
        apply_default_config_without_warming,
    )?;
    if type_urls.is_empty() {
        return Err(at
            .f("type_urls")
            .missing("give type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm"));
    }
    if let Some(i) = type_urls.iter().position(|u| u != type_url::NETWORK_WASM) {
        return Err(at.f("type_urls").i(i).invalid(format!(
            "`{}`: over ECDS, Sluice takes plugins ({})",
            type_urls[i],
            type_url::NETWORK_WASM
        )));
    }
    Ok(NetworkFilter::Wasm { name: name.to_owned() })
}

#[allow(
    deprecated,
    reason = "deprecated fields are still on the wire and must be refused, not ignored"
)]
fn tcp_proxy(at: &At<'_>, a: &Any) -> Result<TcpProxy, DecodeError> {
    let t: tcp::TcpProxy = at.unpack(a, type_url::TCP_PROXY)?;
    let tcp::TcpProxy {
        // Names statistics only.
        stat_prefix: _,
        on_demand,
        metadata_match,
        idle_timeout,
        downstream_idle_timeout,
        upstream_idle_timeout,
        access_log,
        max_connect_attempts,
        backoff_options,
        hash_policy,
        tunneling_config,
        max_downstream_connection_duration,
        max_downstream_connection_duration_jitter_percentage,
        // Tune access logs, which are refused.
        access_log_flush_interval: _,
        flush_access_log_on_connected: _,
        access_log_options: _,
        proxy_protocol_tlvs,
        proxy_protocol_tlv_merge_policy,
        upstream_connect_mode,
        max_early_data_bytes,
        check_drain_close,
        cluster_specifier,
    } = &t;
    let cluster = match cluster_specifier {
        Some(tcp::tcp_proxy::ClusterSpecifier::Cluster(c)) if !c.is_empty() => c.clone(),
        Some(tcp::tcp_proxy::ClusterSpecifier::Cluster(_)) => {
            return Err(at.f("cluster").missing("name the cluster to relay to"));
        }
        Some(tcp::tcp_proxy::ClusterSpecifier::WeightedClusters(_)) => {
            return Err(at
                .f("weighted_clusters")
                .unsupported("name one cluster in `cluster` and weigh its endpoints instead"));
        }
        None => {
            return Err(at
                .f("cluster_specifier")
                .missing("name the cluster to relay to in `cluster`"));
        }
    };
    at.refuse("on_demand", on_demand)?;
    at.refuse("metadata_match", metadata_match)?;
    at.refuse_with(
        "downstream_idle_timeout",
        downstream_idle_timeout,
        "use idle_timeout, which covers both directions",
    )?;
    at.refuse_with(
        "upstream_idle_timeout",
        upstream_idle_timeout,
        "use idle_timeout, which covers both directions",
    )?;
    at.refuse_with(
        "access_log",
        access_log,
        "Sluice writes its own audit record of every flow",
    )?;
    at.refuse("backoff_options", backoff_options)?;
    at.refuse("hash_policy", hash_policy)?;
    at.refuse_with(
        "tunneling_config",
        tunneling_config,
        "Sluice relays the connection as it is; remove it",
    )?;
    at.refuse(
        "max_downstream_connection_duration_jitter_percentage",
        max_downstream_connection_duration_jitter_percentage,
    )?;
    at.refuse("proxy_protocol_tlvs", proxy_protocol_tlvs)?;
    at.refuse("proxy_protocol_tlv_merge_policy", proxy_protocol_tlv_merge_policy)?;
    at.refuse("upstream_connect_mode", upstream_connect_mode)?;
    at.refuse("max_early_data_bytes", max_early_data_bytes)?;
    at.refuse("check_drain_close", check_drain_close)?;
    let idle_timeout = timeout(&at.f("idle_timeout"), idle_timeout.as_ref(), TCP_IDLE_TIMEOUT)?;
    let max_connect_attempts = match max_connect_attempts {
        None => 1,
        Some(m) if m.value >= 1 => m.value,
        Some(_) => return Err(at.f("max_connect_attempts").invalid("must be at least 1")),
    };
    let max_downstream_connection_duration = max_downstream_connection_duration
        .as_ref()
        .map(|d| duration(&at.f("max_downstream_connection_duration"), d))
        .transpose()?
        .filter(|d| !d.is_zero());
    Ok(TcpProxy {
        cluster,
        idle_timeout,
        max_connect_attempts,
        max_downstream_connection_duration,
    })
}
