//! The Envoy-shaped data-plane model: a listener holds filter chains, picked
//! by what the flow looks like (server name, destination port, source and
//! destination prefixes, transport protocol); a chain is a list of network
//! filters ending in a cluster that says where allowed traffic goes.
//!
//! The model itself, as data, is `sluice_api::envoy`, where the friendly
//! listener kinds of `sluice.yaml` are translated into it; the xDS client
//! will receive the same resources, so everything downstream sees one
//! shape. Here a resource becomes a running plan: filter names become
//! filters.

use std::net::IpAddr;
use std::sync::Arc;

use sluice_api::envoy;
pub use sluice_api::envoy::{ChainInput, ChainMatch, Cluster, Front, ListenerResource, Transport, UpstreamOptions};

use crate::forward::balance::Balancer;

use super::filter::{AntiEvasionFilter, NetworkFilter, PolicyFilter};

#[derive(Debug, Clone)]
pub struct FilterChain {
    pub name: String,
    pub matcher: ChainMatch,
    pub filters: Vec<Arc<dyn NetworkFilter>>,
    pub cluster: Cluster,
    /// A balanced cluster's running state.
    pub balancer: Option<Arc<Balancer>>,
    /// The cluster's and `tcp_proxy`'s options, for a chain from xDS.
    pub upstream: Option<UpstreamOptions>,
    /// Some filter reads the flow's bytes: its flows are relayed by copy
    /// through the data hooks; every other chain's by the zero-copy relay.
    pub inspects_data: bool,
}

impl FilterChain {
    pub fn new(name: String, matcher: ChainMatch, filters: Vec<Arc<dyn NetworkFilter>>, cluster: Cluster) -> Self {
        let inspects_data = filters.iter().any(|f| f.wants_data());
        let balancer = match &cluster {
            Cluster::Balanced(b) => Some(Balancer::shared(b)),
            _ => None,
        };
        Self {
            name,
            matcher,
            filters,
            cluster,
            balancer,
            upstream: None,
            inspects_data,
        }
    }

    /// How long connecting may take, and how long the relayed flow may
    /// idle (`None`: forever).
    pub fn timeouts(
        &self,
        listener: &sluice_api::ConnectionOptions,
    ) -> (std::time::Duration, Option<std::time::Duration>) {
        match &self.upstream {
            Some(u) => (u.connect_timeout, u.idle_timeout),
            None => (listener.connect_timeout, Some(listener.idle_timeout)),
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
                super::FilterStatus::Deny(d) => Some(d.in_mode(snapshot.policy.mode())).filter(super::Decision::blocks),
                _ => None,
            })
    }
}

/// A chain names a filter this proxy does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("listener `{listener}`, chain `{chain}`: no filter named `{filter}`")]
pub struct UnknownFilter {
    pub listener: String,
    pub chain: String,
    pub filter: String,
}

/// A listener ready to serve: its resource, with each chain's filters
/// made from their names.
#[derive(Debug, Clone)]
pub struct ListenerPlan {
    pub spec: ListenerResource,
    /// The name, shared by every flow's context without a copy.
    pub label: Arc<str>,
    pub metrics: crate::telemetry::metrics::ListenerMetrics,
    /// Shared by every flow that picks one, without a copy.
    pub chains: Vec<Arc<FilterChain>>,
    /// Serves a flow no chain matches.
    pub default_chain: Option<Arc<FilterChain>>,
    /// Some chain dials the original destination: a connection without
    /// one is refused.
    pub needs_original: bool,
}

/// The filter named `name`, among the built-in ones.
fn builtin_filter(name: &str) -> Option<Arc<dyn NetworkFilter>> {
    match name {
        envoy::ANTI_EVASION => Some(Arc::new(AntiEvasionFilter)),
        envoy::POLICY => Some(Arc::new(PolicyFilter)),
        _ => None,
    }
}

impl ListenerPlan {
    /// Makes each chain's filters from their names: the built-in ones, and
    /// the loaded `plugins`.
    pub fn compile(spec: ListenerResource, plugins: &crate::wasm::PluginSet) -> Result<Self, UnknownFilter> {
        let compile_chain = |c: &envoy::ChainResource| -> Result<Arc<FilterChain>, UnknownFilter> {
            let filters = c
                .filters
                .iter()
                .map(|f| {
                    builtin_filter(f)
                        .or_else(|| {
                            plugins.get(f).map(|p| {
                                Arc::new(crate::wasm::WasmFilter { plugin: p.clone() }) as Arc<dyn NetworkFilter>
                            })
                        })
                        .ok_or_else(|| UnknownFilter {
                            listener: spec.name.clone(),
                            chain: c.name.clone(),
                            filter: f.clone(),
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let mut chain = FilterChain::new(c.name.clone(), c.matcher.clone(), filters, c.cluster.clone());
            chain.upstream = c.upstream;
            Ok(Arc::new(chain))
        };
        let chains = spec.chains.iter().map(compile_chain).collect::<Result<Vec<_>, _>>()?;
        let default_chain = spec.default_chain.as_ref().map(compile_chain).transpose()?;
        let needs_original = chains
            .iter()
            .chain(&default_chain)
            .any(|c| matches!(c.cluster, Cluster::OriginalDst { .. }));
        Ok(Self {
            label: Arc::from(spec.name.as_str()),
            metrics: crate::telemetry::metrics::ListenerMetrics::new(&spec.name),
            spec,
            chains,
            default_chain,
            needs_original,
        })
    }

    /// Translates and compiles a friendly listener with the plugins that
    /// serve it; `None` for a `dns` one.
    pub fn from_config(
        l: &sluice_api::Listener,
        config: &sluice_api::Config,
        plugins: &crate::wasm::PluginSet,
    ) -> Option<Result<Self, UnknownFilter>> {
        envoy::translate(l, &config.plugins).map(|spec| Self::compile(spec, plugins))
    }

    /// The chain that serves a flow, chosen by Envoy's rules
    /// ([`envoy::select`]), or the default chain.
    pub fn chain(&self, input: &ChainInput<'_>) -> Option<&Arc<FilterChain>> {
        envoy::select(&self.chains, |c| &c.matcher, input)
            .and_then(|i| self.chains.get(i))
            .or(self.default_chain.as_ref())
    }

    /// The connection options every flow of this listener uses.
    pub fn connection(&self) -> &sluice_api::ConnectionOptions {
        &self.spec.connection
    }

    /// How the first bytes are read (not at all for opaque TCP).
    pub fn peek(&self) -> sluice_api::PeekOptions {
        self.spec.front.peek().copied().unwrap_or_default()
    }
}
