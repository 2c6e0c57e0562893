//! The Envoy-shaped data-plane model: a listener holds filter chains, picked
//! by what the flow looks like (server name, destination port, source and
//! destination prefixes, transport protocol); a chain is a list of network
//! filters ending in a cluster that says where allowed traffic goes.
//!
//! The friendly listener kinds of `sluice.yaml` compile into this model
//! ([`ListenerPlan::from_config`]); the xDS client will build the same model
//! from Envoy resources, so everything downstream sees one shape.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use sluice_api::{DomainName, DomainPattern, EchPolicy, Listener, ListenerKind, PortRange, SniCheck};

use super::filter::{AntiEvasionFilter, NetworkFilter, PolicyFilter};

/// What the first bytes of a flow turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tls,
    RawBuffer,
}

/// Envoy's `FilterChainMatch`, the subset Sluice supports. An empty list
/// matches anything.
#[derive(Debug, Clone, Default)]
pub struct ChainMatch {
    pub server_names: Vec<DomainPattern>,
    pub destination_ports: Vec<PortRange>,
    pub source_prefixes: Vec<IpNet>,
    pub destination_prefixes: Vec<IpNet>,
    pub transport_protocol: Option<Transport>,
}

impl ChainMatch {
    pub fn matches(
        &self,
        name: Option<&DomainName>,
        port: u16,
        src: IpAddr,
        dst: Option<IpAddr>,
        transport: Transport,
    ) -> bool {
        let name_ok =
            self.server_names.is_empty() || name.is_some_and(|n| self.server_names.iter().any(|p| p.matches(n)));
        let port_ok = self.destination_ports.is_empty() || self.destination_ports.iter().any(|p| p.contains(port));
        let src_ok =
            self.source_prefixes.is_empty() || self.source_prefixes.iter().any(|p| p.contains(&src.to_canonical()));
        let dst_ok = self.destination_prefixes.is_empty()
            || dst.is_some_and(|d| self.destination_prefixes.iter().any(|p| p.contains(&d.to_canonical())));
        let transport_ok = self.transport_protocol.is_none_or(|t| t == transport);
        name_ok && port_ok && src_ok && dst_ok && transport_ok
    }
}

/// Where an allowed flow is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cluster {
    /// The `CONNECT` target or absolute-form URI of an explicit proxy request.
    RequestTarget,
    /// The destination before iptables `REDIRECT`/`TPROXY`, checked against
    /// the SNI per [`SniCheck`].
    OriginalDst { sni_check: SniCheck },
    /// The SNI, resolved, on a fixed port (Envoy's
    /// `sni_dynamic_forward_proxy`).
    SniDynamic { port: u16 },
    /// A fixed `host:port`.
    Static { host: String, port: u16 },
}

#[derive(Debug, Clone)]
pub struct FilterChain {
    pub name: String,
    pub matcher: ChainMatch,
    pub filters: Vec<Arc<dyn NetworkFilter>>,
    pub cluster: Cluster,
    /// Some filter reads the flow's bytes: its flows are relayed by copy
    /// through the data hooks; every other chain's by the zero-copy relay.
    pub inspects_data: bool,
}

impl FilterChain {
    pub fn new(name: String, matcher: ChainMatch, filters: Vec<Arc<dyn NetworkFilter>>, cluster: Cluster) -> Self {
        let inspects_data = filters.iter().any(|f| f.wants_data());
        Self {
            name,
            matcher,
            filters,
            cluster,
            inspects_data,
        }
    }

    /// Runs `on_policy_change` in chain order for a flow relayed to `dst`
    /// now that `snapshot` is installed: the first denial that is enforced,
    /// if any. A watched denial does not end the flow.
    pub fn denied_under(
        &self,
        snapshot: &super::Snapshot,
        ctx: &super::FlowContext,
        dst: IpAddr,
    ) -> Option<super::Decision> {
        self.filters
            .iter()
            .find_map(|f| match f.on_policy_change(ctx, snapshot, dst) {
                super::FilterStatus::Deny(d) if d.blocks() => Some(d),
                _ => None,
            })
    }
}

/// A listener ready to serve.
#[derive(Debug, Clone)]
pub struct ListenerPlan {
    pub spec: Listener,
    /// The name, shared by every flow's context without a copy.
    pub label: Arc<str>,
    pub metrics: crate::telemetry::metrics::ListenerMetrics,
    /// Shared by every flow that picks one, without a copy.
    pub chains: Vec<Arc<FilterChain>>,
}

impl ListenerPlan {
    /// Compiles a friendly listener: one chain matching everything, the
    /// policy filter, and the cluster its kind implies.
    pub fn from_config(spec: &Listener) -> Self {
        let cluster = match spec.kind {
            ListenerKind::HttpProxy => Cluster::RequestTarget,
            ListenerKind::Transparent => Cluster::OriginalDst {
                sni_check: spec.sni_check,
            },
            ListenerKind::Sni => Cluster::SniDynamic {
                port: spec.upstream_port,
            },
            ListenerKind::Tcp => match spec.upstream.as_deref().and_then(split_host_port) {
                Some((host, port)) => Cluster::Static { host, port },
                None => Cluster::OriginalDst {
                    sni_check: SniCheck::Off,
                },
            },
            // DNS listeners are served by `dns`, not by filter chains.
            ListenerKind::Dns => Cluster::RequestTarget,
        };
        let anti_evasion: Arc<dyn NetworkFilter> = Arc::new(AntiEvasionFilter);
        let policy: Arc<dyn NetworkFilter> = Arc::new(PolicyFilter);
        Self {
            spec: spec.clone(),
            label: Arc::from(spec.name.as_str()),
            metrics: crate::telemetry::metrics::ListenerMetrics::new(&spec.name),
            chains: vec![Arc::new(FilterChain::new(
                format!("{}/default", spec.name),
                ChainMatch::default(),
                vec![anti_evasion, policy],
                cluster,
            ))],
        }
    }

    /// The first chain whose match fits the flow (Envoy picks the most
    /// specific; friendly listeners have one chain, and xDS-fed ones are
    /// ordered most specific first by the translator).
    pub fn chain(
        &self,
        name: Option<&DomainName>,
        port: u16,
        src: IpAddr,
        dst: Option<IpAddr>,
        transport: Transport,
    ) -> Option<&Arc<FilterChain>> {
        self.chains
            .iter()
            .find(|c| c.matcher.matches(name, port, src, dst, transport))
    }

    pub fn ech_denied(&self) -> bool {
        self.spec.ech == EchPolicy::Deny
    }
}

/// `host:port`, with IPv6 literals in brackets.
pub fn split_host_port(s: &str) -> Option<(String, u16)> {
    let (h, p) = s.rsplit_once(':')?;
    let port = p.parse::<u16>().ok().filter(|p| *p != 0)?;
    let host = h.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(h);
    if host.is_empty() {
        return None;
    }
    Some((host.to_owned(), port))
}
