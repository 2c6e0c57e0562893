//! What of a decoded Envoy listener a Sluice gateway runs today: the
//! shapes its listener kinds already have, taken over LDS and CDS from any
//! xDS server. Anything else is refused with the field at fault and why,
//! never run differently from what it says.
//!
//! | Envoy shape | Sluice listener |
//! |---|---|
//! | `original_dst` listener filter, one chain: `sluice.policy` → `tcp_proxy` to an `ORIGINAL_DST` cluster | `kind: transparent` |
//! | one chain: `sluice.policy` → `tcp_proxy` to a `STATIC` cluster with one endpoint | `kind: tcp`, `upstream:` that endpoint |
//!
//! The chain must match everything (Sluice's policy decides what a chain
//! match would), and `sluice.policy` is required: a gateway relays nothing
//! its policy has not judged.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::model::{
    ClusterKind, EndpointAddress, EnvoyChain, EnvoyCluster, EnvoyListener, ListenerFilter, NetworkFilter,
};
use super::{DecodeError, DecodeErrorKind};

/// A listener a gateway runs, from Envoy resources.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSpec {
    pub name: String,
    pub address: SocketAddr,
    pub kind: SpecKind,
    /// The cluster's `connect_timeout`.
    pub connect_timeout: Duration,
    /// `tcp_proxy`'s `idle_timeout`.
    pub idle_timeout: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecKind {
    /// The destination before iptables `REDIRECT`, judged and relayed.
    Transparent,
    /// Opaque TCP to one fixed address.
    Tcp { upstream: SocketAddr },
}

fn err(l: &EnvoyListener, path: &str, kind: DecodeErrorKind) -> DecodeError {
    DecodeError {
        resource: l.name.clone(),
        path: path.to_owned(),
        kind,
    }
}

fn invalid(l: &EnvoyListener, path: &str, reason: impl Into<String>) -> DecodeError {
    err(l, path, DecodeErrorKind::Invalid { reason: reason.into() })
}

/// The listener a gateway runs for `l`, its clusters taken from `clusters`
/// (by name).
pub fn gateway_listener(
    l: &EnvoyListener,
    clusters: &BTreeMap<String, EnvoyCluster>,
) -> Result<ListenerSpec, DecodeError> {
    let (chain, at): (&EnvoyChain, String) = match (l.chains.as_slice(), &l.default_chain) {
        ([c], None) => (c, "filter_chains[0]".to_owned()),
        ([], Some(c)) => (c, "default_filter_chain".to_owned()),
        ([], None) => return Err(invalid(l, "filter_chains", "no filter chain; give one")),
        _ => {
            return Err(invalid(
                l,
                "filter_chains[1]",
                "a Sluice gateway runs one filter chain per listener from xDS today; match names and sources in the policy's rules instead",
            ));
        }
    };
    if chain.matcher != crate::envoy::ChainMatch::default() || !chain.application_protocols.is_empty() {
        return Err(invalid(
            l,
            &format!("{at}.filter_chain_match"),
            "a Sluice gateway's chain from xDS matches every flow today; the policy's rules decide by name, source and port",
        ));
    }
    let mut policy = false;
    let mut proxy = None;
    for (i, f) in chain.filters.iter().enumerate() {
        let path = format!("{at}.filters[{i}]");
        match f {
            NetworkFilter::SluicePolicy => policy = true,
            NetworkFilter::TcpProxy(t) => proxy = Some((t, path)),
            NetworkFilter::Wasm { .. } => {
                return Err(invalid(
                    l,
                    &path,
                    "plugins reach a Sluice gateway as ECDS resources that name their listeners (sluice.v1.PluginOptions.listeners), not as filters of the chain",
                ));
            }
            NetworkFilter::SluiceDns => {
                return Err(invalid(
                    l,
                    &path,
                    "a DNS listener is a UDP listener; give it in the gateway's file",
                ));
            }
        }
    }
    if !policy {
        return Err(invalid(
            l,
            &format!("{at}.filters"),
            "no `sluice.policy` filter: a Sluice gateway relays nothing its policy has not judged; put it before tcp_proxy",
        ));
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
        return Err(invalid(
            l,
            &cluster_at,
            format!("no cluster `{}` was sent (CDS)", tcp.cluster),
        ));
    };
    let original_dst = l
        .listener_filters
        .iter()
        .any(|f| matches!(f, ListenerFilter::OriginalDst));
    let kind = match (&cluster.kind, original_dst) {
        (ClusterKind::OriginalDst { port_override: None }, true) => SpecKind::Transparent,
        (ClusterKind::OriginalDst { .. }, true) => {
            return Err(invalid(
                l,
                &cluster_at,
                format!(
                    "cluster `{}` overrides the port; a Sluice transparent listener dials the original destination",
                    cluster.name
                ),
            ));
        }
        (ClusterKind::OriginalDst { .. }, false) => {
            return Err(invalid(
                l,
                "listener_filters",
                "an ORIGINAL_DST cluster needs the original_dst listener filter",
            ));
        }
        (ClusterKind::Static { endpoints }, false) => {
            let all: Vec<&EndpointAddress> = endpoints
                .localities
                .iter()
                .flat_map(|loc| loc.endpoints.iter().map(|e| &e.address))
                .collect();
            match all.as_slice() {
                [EndpointAddress::Ip(upstream)] => SpecKind::Tcp { upstream: *upstream },
                _ => {
                    return Err(invalid(
                        l,
                        &cluster_at,
                        format!(
                            "cluster `{}` has {} endpoints; a Sluice gateway balances across endpoints of a cluster from xDS not yet: give one",
                            cluster.name,
                            all.len()
                        ),
                    ));
                }
            }
        }
        (ClusterKind::Static { .. }, true) => {
            return Err(invalid(
                l,
                "listener_filters",
                "original_dst with a STATIC cluster: the original destination would be dropped; use an ORIGINAL_DST cluster",
            ));
        }
        _ => {
            return Err(invalid(
                l,
                &cluster_at,
                format!(
                    "cluster `{}` is a kind a Sluice gateway runs from xDS not yet (STATIC with one endpoint, or ORIGINAL_DST)",
                    cluster.name
                ),
            ));
        }
    };
    if l.transparent && kind != SpecKind::Transparent {
        return Err(invalid(
            l,
            "transparent",
            "only a transparent listener binds with IP_TRANSPARENT",
        ));
    }
    Ok(ListenerSpec {
        name: l.name.clone(),
        address: l.address,
        kind,
        connect_timeout: cluster.connect_timeout,
        idle_timeout: tcp.idle_timeout,
    })
}
