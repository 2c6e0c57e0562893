//! What a Sluice gateway runs of a decoded Envoy listener, taken over LDS
//! and CDS (and EDS) from any xDS server: the listener mapped onto the
//! data plane's model ([`crate::envoy`]), its chains chosen by Envoy's
//! rules, its clusters balanced as Envoy balances them. What the model
//! cannot run is refused with the field at fault and why, never run
//! differently from what it says.
//!
//! | Envoy | Sluice |
//! |---|---|
//! | `tls_inspector`, `http_inspector` | the first bytes are classified (ClientHello or HTTP head) |
//! | `original_dst` listener filter | the destination before iptables is read; chains match on it |
//! | filter chains, `default_filter_chain` | chosen as Envoy chooses ([`crate::envoy::select`]) |
//! | `tcp_proxy` → `STATIC`, `STRICT_DNS`, `LOGICAL_DNS`, `EDS` | a balanced cluster: round robin, least request, random |
//! | `tcp_proxy` → `ORIGINAL_DST` | the original destination, held against the SNI |
//!
//! Every chain runs Sluice's anti-evasion checks and policy first, whether
//! or not it names `sluice.policy`: a gateway relays nothing its policy has
//! not judged, and a listener written for Envoy runs unchanged.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::model::{
    ClusterKind, EndpointAddress, EnvoyChain, EnvoyCluster, EnvoyListener, ListenerFilter, LoadAssignment,
    NetworkFilter,
};
use super::{DecodeError, DecodeErrorKind};
use crate::envoy::{
    ANTI_EVASION, BalancedCluster, ChainResource, Cluster, Endpoints, FromEnvoy, Front, POLICY, UpstreamOptions,
};
use crate::model::{ConnectionOptions, PeekOptions, SniCheck};

/// A listener a gateway runs, from Envoy resources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSpec {
    pub name: String,
    pub address: SocketAddr,
    pub kind: SpecKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecKind {
    /// Filter chains and clusters, on the model.
    Envoy(Box<FromEnvoy>),
    /// One chain ending in a listener kind of Sluice's own (`sluice.dns`,
    /// `sluice.http_proxy`, `sluice.sni`): that kind, with the settings the
    /// filter gives (as `sluice.yaml` writes them, as JSON text).
    Sluice {
        kind: crate::model::ListenerType,
        options: String,
    },
}

impl ListenerSpec {
    /// The model of a listener with filter chains (`None` for DNS).
    pub fn envoy(&self) -> Option<&FromEnvoy> {
        match &self.kind {
            SpecKind::Envoy(e) => Some(e),
            SpecKind::Sluice { .. } => None,
        }
    }
}

/// The longest a listener's filters may wait for the first bytes when
/// Envoy's `listener_filters_timeout` says `0s` (no limit): Sluice bounds
/// every wait.
const LONGEST_PEEK: Duration = Duration::from_secs(3600);

fn invalid(l: &EnvoyListener, path: &str, reason: impl Into<String>) -> DecodeError {
    DecodeError {
        resource: l.name.clone(),
        path: path.to_owned(),
        kind: DecodeErrorKind::Invalid { reason: reason.into() },
    }
}

/// The listener a gateway runs for `l`: its clusters taken from `clusters`
/// (by name), an EDS cluster's endpoints from `assignments` (by service
/// name; a cluster whose assignment has not come yet has no endpoints, as
/// in Envoy while it warms).
pub fn gateway_listener(
    l: &EnvoyListener,
    clusters: &BTreeMap<String, EnvoyCluster>,
    assignments: &BTreeMap<String, LoadAssignment>,
) -> Result<ListenerSpec, DecodeError> {
    if let Some((kind, options)) = sluice_listener(l)? {
        return Ok(ListenerSpec {
            name: l.name.clone(),
            address: l.address,
            kind: SpecKind::Sluice { kind, options },
        });
    }
    let original_dst = l.listener_filters.contains(&ListenerFilter::OriginalDst);
    if l.transparent && !original_dst {
        return Err(invalid(
            l,
            "listener_filters",
            "a transparent listener needs the original_dst listener filter",
        ));
    }
    let inspector = l.listener_filters.iter().find_map(|f| match f {
        ListenerFilter::TlsInspector { max_client_hello } => Some(*max_client_hello),
        ListenerFilter::HttpInspector => Some(None),
        ListenerFilter::OriginalDst => None,
    });
    let front = match inspector {
        None => Front::Raw,
        Some(max_client_hello) => {
            let d = PeekOptions::default();
            Front::Inspect {
                peek: PeekOptions {
                    peek_timeout: l.listener_filters_timeout.unwrap_or(LONGEST_PEEK),
                    max_client_hello: max_client_hello.map_or(d.max_client_hello, |m| m as usize),
                    ech: d.ech,
                },
                continue_on_timeout: l.continue_on_listener_filters_timeout,
            }
        }
    };
    let chain = |c: &EnvoyChain, at: String, i: usize| -> Result<ChainResource, DecodeError> {
        chain(l, c, &at, i, original_dst, clusters, assignments)
    };
    let chains = l
        .chains
        .iter()
        .enumerate()
        .map(|(i, c)| chain(c, format!("filter_chains[{i}]"), i))
        .collect::<Result<Vec<_>, _>>()?;
    let default_chain = l
        .default_chain
        .as_ref()
        .map(|c| chain(c, "default_filter_chain".to_owned(), l.chains.len()))
        .transpose()?;
    Ok(ListenerSpec {
        name: l.name.clone(),
        address: l.address,
        kind: SpecKind::Envoy(Box::new(FromEnvoy {
            transparent: l.transparent,
            original_dst,
            connection: ConnectionOptions::default(),
            front,
            chains,
            default_chain,
        })),
    })
}

/// A listener whose chain ends in one of Sluice's listener filters
/// (`sluice.dns`, `sluice.http_proxy`, `sluice.sni`) is a listener of that
/// kind: the kind and its settings, if it is one. It has that one chain,
/// matching everything, and no listener filters (the kind reads what it
/// needs itself).
fn sluice_listener(l: &EnvoyListener) -> Result<Option<(crate::model::ListenerType, String)>, DecodeError> {
    let chains: Vec<(String, &EnvoyChain)> = l
        .chains
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("filter_chains[{i}]"), c))
        .chain(l.default_chain.iter().map(|c| ("default_filter_chain".to_owned(), c)))
        .collect();
    let found = chains.iter().find_map(|(at, c)| {
        c.filters.iter().enumerate().find_map(|(i, f)| match f {
            NetworkFilter::SluiceListener { kind, options } => {
                Some((format!("{at}.filters[{i}]"), *kind, options, at.clone(), *c))
            }
            _ => None,
        })
    });
    let Some((at, kind, options, chain_at, chain)) = found else {
        return Ok(None);
    };
    if chains.len() > 1 {
        return Err(invalid(
            l,
            &at,
            format!(
                "a `{}` listener has one filter chain, matching every flow; give the others a listener of their own",
                kind.as_str()
            ),
        ));
    }
    if chain.matcher != crate::envoy::ChainMatch::default() {
        return Err(invalid(
            l,
            &format!("{chain_at}.filter_chain_match"),
            format!(
                "a `{}` listener's chain matches every flow; the policy decides by source and name",
                kind.as_str()
            ),
        ));
    }
    if let Some((i, _)) = chain
        .filters
        .iter()
        .enumerate()
        .find(|(_, f)| !matches!(f, NetworkFilter::SluicePolicy | NetworkFilter::SluiceListener { .. }))
    {
        return Err(invalid(
            l,
            &format!("{chain_at}.filters[{i}]"),
            format!(
                "a `{}` listener runs sluice.policy and its own filter only; plugins reach it over ECDS",
                kind.as_str()
            ),
        ));
    }
    if !l.listener_filters.is_empty() {
        return Err(invalid(
            l,
            "listener_filters",
            format!("a `{}` listener reads what it needs itself; remove them", kind.as_str()),
        ));
    }
    if l.transparent {
        return Err(invalid(
            l,
            "transparent",
            format!("a `{}` listener binds its own address", kind.as_str()),
        ));
    }
    Ok(Some((kind, options.clone())))
}

fn chain(
    l: &EnvoyListener,
    c: &EnvoyChain,
    at: &str,
    index: usize,
    original_dst: bool,
    clusters: &BTreeMap<String, EnvoyCluster>,
    assignments: &BTreeMap<String, LoadAssignment>,
) -> Result<ChainResource, DecodeError> {
    let mut proxy = None;
    let mut filters = vec![ANTI_EVASION.to_owned(), POLICY.to_owned()];
    for (i, f) in c.filters.iter().enumerate() {
        let path = format!("{at}.filters[{i}]");
        match f {
            NetworkFilter::SluicePolicy => {}
            NetworkFilter::TcpProxy(t) => proxy = Some((t, path)),
            // A plugin, by the name of its ECDS resource: it runs on this
            // chain, after the policy, in chain order.
            NetworkFilter::Wasm { name } => filters.push(name.clone()),
            // Handled as a listener of its kind before any chain is mapped.
            NetworkFilter::SluiceListener { kind, .. } => {
                return Err(invalid(
                    l,
                    &path,
                    format!("this filter makes a `{}` listener of its own", kind.as_str()),
                ));
            }
        }
    }
    let Some((tcp, tcp_at)) = proxy else {
        return Err(invalid(
            l,
            &format!("{at}.filters"),
            "no tcp_proxy: nothing says where flows go",
        ));
    };
    let cluster_at = format!("{tcp_at}.typed_config.cluster");
    let Some(cluster) = clusters.get(&tcp.cluster) else {
        return Err(DecodeError {
            resource: l.name.clone(),
            path: cluster_at,
            kind: DecodeErrorKind::Undefined {
                what: format!("cluster `{}`", tcp.cluster),
            },
        });
    };
    let balanced = |endpoints: Endpoints, overprovisioning_factor: u32| {
        Cluster::Balanced(BalancedCluster {
            name: cluster.name.clone(),
            lb: cluster.lb,
            endpoints,
            overprovisioning_factor,
        })
    };
    let target = match &cluster.kind {
        ClusterKind::OriginalDst { port_override: None } if original_dst => Cluster::OriginalDst {
            sni_check: SniCheck::Verify,
        },
        ClusterKind::OriginalDst { port_override: None } => {
            return Err(invalid(
                l,
                "listener_filters",
                format!(
                    "cluster `{}` is ORIGINAL_DST: add the original_dst listener filter",
                    cluster.name
                ),
            ));
        }
        ClusterKind::OriginalDst { .. } => {
            return Err(invalid(
                l,
                &cluster_at,
                format!(
                    "cluster `{}` overrides the port; a Sluice gateway dials the original destination",
                    cluster.name
                ),
            ));
        }
        ClusterKind::Static { endpoints } => balanced(
            Endpoints::Fixed {
                localities: endpoints.localities.clone(),
            },
            endpoints.overprovisioning_factor,
        ),
        ClusterKind::StrictDns { endpoints, dns } => balanced(
            Endpoints::StrictDns {
                localities: endpoints.localities.clone(),
                dns: *dns,
            },
            endpoints.overprovisioning_factor,
        ),
        ClusterKind::LogicalDns { endpoint, dns } => balanced(
            Endpoints::LogicalDns {
                endpoint: endpoint.clone(),
                dns: *dns,
            },
            crate::xds::model::DEFAULT_OVERPROVISIONING,
        ),
        ClusterKind::Eds { service_name } => match assignments.get(service_name) {
            Some(la) => {
                if let Some(e) = la
                    .localities
                    .iter()
                    .flat_map(|loc| &loc.endpoints)
                    .find(|e| matches!(e.address, EndpointAddress::Name(_)))
                {
                    return Err(invalid(
                        l,
                        &cluster_at,
                        format!(
                            "the ClusterLoadAssignment `{service_name}` of cluster `{}` names a host ({:?}); EDS endpoints are addresses",
                            cluster.name, e.address
                        ),
                    ));
                }
                balanced(
                    Endpoints::Fixed {
                        localities: la.localities.clone(),
                    },
                    la.overprovisioning_factor,
                )
            }
            None => balanced(
                Endpoints::Fixed { localities: Vec::new() },
                crate::xds::model::DEFAULT_OVERPROVISIONING,
            ),
        },
    };
    Ok(ChainResource {
        name: if c.name.is_empty() {
            format!("{}/{index}", l.name)
        } else {
            c.name.clone()
        },
        matcher: c.matcher.clone(),
        filters,
        cluster: target,
        upstream: Some(UpstreamOptions {
            connect_timeout: cluster.connect_timeout,
            idle_timeout: tcp.idle_timeout,
            max_connect_attempts: tcp.max_connect_attempts.max(1),
            max_duration: tcp.max_downstream_connection_duration,
        }),
    })
}
