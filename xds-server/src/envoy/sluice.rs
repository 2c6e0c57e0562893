//! The directory's listeners as a Sluice gateway takes them over LDS and
//! CDS (`xds.listeners: true`): Envoy resources in the two shapes a
//! gateway runs (`sluice_api::xds::gateway`), not the RBAC translation
//! stock Envoy gets. The gateway's own `sluice.policy` filter decides, so
//! the policy travels as Sluice's `Policy` resource, not in the listener.
//!
//! | listener | Envoy resources |
//! |---|---|
//! | `transparent` | `original_dst` + `tls_inspector`; one chain: `sluice.policy` → `tcp_proxy` to an `ORIGINAL_DST` cluster |
//! | `tcp` with an address `upstream` | one chain: `sluice.policy` → `tcp_proxy` to a `STATIC` cluster of that address |
//! | `dns`, `http-proxy`, `sni` | one chain: `sluice.policy` → `sluice.dns` / `sluice.http_proxy` / `sluice.sni`, whose `google.protobuf.Struct` holds every setting of the listener as `sluice.yaml` writes it |
//!
//! A `tcp` listener whose upstream is a name is not sent. Of a transparent
//! or tcp listener's options, the address, the connect and idle timeouts
//! travel; the others take their defaults.

use std::net::IpAddr;

use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener};
use envoy_types::pb::envoy::extensions::filters::listener::original_dst::v3::OriginalDst;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3 as tcp_proxy;
use sluice_api::{Config, Listener as SluiceListener, ListenerKind};

use super::{duration, listener_filter, network_filter, original_dst_cluster, pack, socket, static_cluster};
use crate::snapshot::Resource;

fn relay(l: &SluiceListener, cluster: &str) -> Vec<Filter> {
    let idle = l.kind.connection().map(|c| duration(c.idle_timeout));
    vec![
        Filter {
            name: sluice_api::envoy::POLICY.to_owned(),
            config_type: None,
        },
        network_filter(
            "envoy.filters.network.tcp_proxy",
            &tcp_proxy::TcpProxy {
                stat_prefix: l.name.clone(),
                cluster_specifier: Some(tcp_proxy::tcp_proxy::ClusterSpecifier::Cluster(cluster.to_owned())),
                idle_timeout: idle,
                ..tcp_proxy::TcpProxy::default()
            },
        ),
    ]
}

fn listener(
    l: &SluiceListener,
    listener_filters: Vec<envoy_types::pb::envoy::config::listener::v3::ListenerFilter>,
    cluster: &str,
) -> Resource {
    Resource::new(
        l.name.clone(),
        pack(&Listener {
            name: l.name.clone(),
            address: Some(socket(l.address.ip(), l.address.port())),
            listener_filters,
            filter_chains: vec![FilterChain {
                name: "sluice".to_owned(),
                filters: relay(l, cluster),
                ..FilterChain::default()
            }],
            ..Listener::default()
        }),
    )
}

/// The resources for Sluice gateways of `config`'s listeners.
pub fn for_sluice(config: &Config) -> Vec<Resource> {
    let mut out = Vec::new();
    for l in &config.listeners {
        match &l.kind {
            ListenerKind::Transparent(_) => {
                let (cluster_name, cluster) = original_dst_cluster(l);
                out.push(cluster);
                let filters = vec![
                    listener_filter("envoy.filters.listener.original_dst", &OriginalDst {}),
                    listener_filter("envoy.filters.listener.tls_inspector", &TlsInspector::default()),
                ];
                out.push(listener(l, filters, &cluster_name));
            }
            ListenerKind::Tcp(o) => {
                let Some(up) = &o.upstream else { continue };
                let Ok(ip) = up.host.parse::<IpAddr>() else { continue };
                let cluster_name = format!("{}/upstream", l.name);
                out.push(Resource::new(
                    cluster_name.clone(),
                    pack(&static_cluster(&cluster_name, &[ip], up.port, l)),
                ));
                out.push(listener(l, Vec::new(), &cluster_name));
            }
            // Kinds with no Envoy shape: one chain ending in Sluice's
            // filter for the kind, its settings as `sluice.yaml` writes them.
            kind => {
                let (Some(filter), Some(settings)) = (
                    sluice_api::xds::filter_name::of(kind.ty()),
                    sluice_api::config::listener_settings(kind),
                ) else {
                    continue;
                };
                let own = Filter {
                    name: filter.to_owned(),
                    config_type: Some(
                        envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(pack(
                            &sluice_api::xds::json_struct(&settings),
                        )),
                    ),
                };
                out.push(Resource::new(
                    l.name.clone(),
                    pack(&Listener {
                        name: l.name.clone(),
                        address: Some(socket(l.address.ip(), l.address.port())),
                        filter_chains: vec![FilterChain {
                            name: "sluice".to_owned(),
                            filters: vec![
                                Filter {
                                    name: sluice_api::envoy::POLICY.to_owned(),
                                    config_type: None,
                                },
                                own,
                            ],
                            ..FilterChain::default()
                        }],
                        ..Listener::default()
                    }),
                ));
            }
        }
    }
    out
}
