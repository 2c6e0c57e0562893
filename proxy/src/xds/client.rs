//! The gateway's side of ADS, without I/O: what to ask a control server
//! for, what its responses hold, and the ACK or NACK each one earns.
//!
//! A response is first held as *pending* for its type. The caller builds a
//! configuration from the accepted resources with every pending response
//! laid over them ([`AdsClient::candidate`]), checks and applies it, then
//! either [`AdsClient::commit`]s (the pending responses become accepted,
//! each is ACKed) or [`AdsClient::reject`]s (each is NACKed with the
//! reason, and the accepted resources stay as they were). Holding several
//! types' responses together is what lets a policy and the groups it names
//! change in one step.
//!
//! Both variants of the protocol are spoken: State of the World (every
//! response carries a type's whole set, and a version for it) and Delta
//! (a response carries what changed and what was removed, each resource
//! with its own version); on a new stream Delta tells the server what the
//! gateway already holds (`initial_resource_versions`).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::{Any, Struct, Value, value};
use envoy_types::pb::google::rpc::Status;
use prost::Message;
use sluice_api::config::{ResourceKind, Resources};
use sluice_api::proto::v1 as pb;
use sluice_api::xds::type_url as envoy_url;
use sluice_api::{XdsBootstrap, XdsNode};

/// gRPC's INVALID_ARGUMENT, the code a NACK carries.
const INVALID_ARGUMENT: i32 = 3;

/// Why a candidate cannot be built. `dangling`: only because it names a
/// resource of another type that has not come (it may be the next to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub message: String,
    pub dangling: bool,
}

/// A request to send on the stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Outgoing {
    Sotw(DiscoveryRequest),
    Delta(DeltaDiscoveryRequest),
}

/// Why a response could not even be held as pending.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResponseError {
    #[error("a response for {0}, which this gateway did not subscribe to")]
    NotSubscribed(String),
    #[error("{type_url}: resource {index}: {reason}")]
    Resource {
        type_url: String,
        index: usize,
        reason: String,
    },
    #[error("a {0} response without a nonce")]
    NoNonce(String),
}

/// One resource as accepted: its version (Delta's per-resource version;
/// empty in SotW) and its message.
#[derive(Debug, Clone, PartialEq)]
struct Held {
    version: String,
    body: Any,
}

#[derive(Debug, Default)]
struct TypeState {
    /// What the gateway runs with, by name.
    accepted: BTreeMap<String, Held>,
    /// SotW: the version of `accepted` (what an ACK repeats).
    version: String,
    /// A response received and not yet ACKed or NACKed: its nonce, its
    /// version (SotW) and the set it would make.
    pending: Option<Pending>,
    /// A response was received for this type on some stream.
    received: bool,
    /// Names subscribed on the current stream were sent.
    subscribed: bool,
    /// The names subscribed to; `None`: every resource (wildcard). EDS is
    /// subscribed by name: the service names of the EDS clusters held.
    names: Option<BTreeSet<String>>,
    /// The nonce of the last response on this stream, which a change of
    /// names repeats in SotW.
    nonce: String,
}

#[derive(Debug)]
struct Pending {
    nonce: String,
    version: String,
    set: BTreeMap<String, Held>,
}

/// The client state of one gateway, kept across streams.
#[derive(Debug)]
pub struct AdsClient {
    node: Node,
    delta: bool,
    types: BTreeMap<&'static str, TypeState>,
    /// The node goes in the first request of each stream only.
    node_sent: bool,
    /// EDS names whose assignment was waited for and did not come: later
    /// updates do not wait for them again.
    gave_up: BTreeSet<String>,
}

impl AdsClient {
    /// A client subscribed, by wildcard, to Sluice's own types.
    pub fn new(bootstrap: &XdsBootstrap) -> Self {
        let mut types: BTreeMap<&'static str, TypeState> = ResourceKind::ALL
            .into_iter()
            .map(|k| (k.type_url(), TypeState::default()))
            .collect();
        if bootstrap.listeners {
            types.insert(envoy_url::CLUSTER, TypeState::default());
            types.insert(envoy_url::LISTENER, TypeState::default());
            types.insert(
                envoy_url::CLUSTER_LOAD_ASSIGNMENT,
                TypeState {
                    names: Some(BTreeSet::new()),
                    ..TypeState::default()
                },
            );
        }
        Self {
            node: node(&bootstrap.node),
            delta: bootstrap.delta,
            types,
            node_sent: false,
            gave_up: BTreeSet::new(),
        }
    }

    pub fn is_delta(&self) -> bool {
        self.delta
    }

    /// A new stream is open: the first request of every type. Pending
    /// responses of the old stream are dropped (their nonces mean nothing
    /// on this one); what was accepted is announced so the server can
    /// skip it.
    pub fn on_connect(&mut self) -> Vec<Outgoing> {
        self.node_sent = false;
        let urls: Vec<&'static str> = self.types.keys().copied().collect();
        let mut out = Vec::with_capacity(urls.len());
        for url in urls {
            let node = self.node_once();
            let Some(t) = self.types.get_mut(url) else { continue };
            t.pending = None;
            t.nonce.clear();
            // Nothing to ask for yet (no EDS cluster): no request, which
            // in SotW would read as a wildcard.
            if t.names.as_ref().is_some_and(BTreeSet::is_empty) {
                t.subscribed = false;
                continue;
            }
            t.subscribed = true;
            let names = subscription(t.names.as_ref());
            out.push(if self.delta {
                Outgoing::Delta(DeltaDiscoveryRequest {
                    node,
                    type_url: url.to_owned(),
                    resource_names_subscribe: names,
                    initial_resource_versions: t
                        .accepted
                        .iter()
                        .map(|(n, h)| (n.clone(), h.version.clone()))
                        .collect::<HashMap<_, _>>(),
                    ..Default::default()
                })
            } else {
                Outgoing::Sotw(DiscoveryRequest {
                    node,
                    type_url: url.to_owned(),
                    version_info: t.version.clone(),
                    resource_names: names,
                    ..Default::default()
                })
            });
        }
        out
    }

    /// Follows the clusters held (pending or accepted) with the EDS
    /// subscription: the service names of their EDS clusters. Returns the
    /// requests that tell the server, if the names changed (in SotW, a
    /// pending EDS response's ACK or NACK carries them instead).
    pub fn follow_clusters(&mut self) -> Vec<Outgoing> {
        let Some(clusters) = self.types.get(envoy_url::CLUSTER) else {
            return Vec::new();
        };
        let set = clusters.pending.as_ref().map_or(&clusters.accepted, |p| &p.set);
        let wanted: BTreeSet<String> = set
            .values()
            .filter_map(|h| sluice_api::xds::decode_cluster(&h.body).ok())
            .filter_map(|c| match c.kind {
                sluice_api::xds::ClusterKind::Eds { service_name } => Some(service_name),
                _ => None,
            })
            .collect();
        let delta = self.delta;
        let node_sent = self.node_sent;
        let node = self.node.clone();
        let Some(t) = self.types.get_mut(envoy_url::CLUSTER_LOAD_ASSIGNMENT) else {
            return Vec::new();
        };
        let old = t.names.replace(wanted.clone()).unwrap_or_default();
        if old == wanted && (t.subscribed || wanted.is_empty()) {
            return Vec::new();
        }
        let first = !t.subscribed;
        t.subscribed = true;
        // The node goes in the stream's first request only.
        let node = (first && !node_sent).then_some(node);
        let sends_node = node.is_some();
        // What is no longer subscribed is no longer held.
        t.accepted.retain(|n, _| wanted.contains(n));
        if let Some(p) = t.pending.as_mut() {
            p.set.retain(|n, _| wanted.contains(n));
        }
        let out = if delta {
            Outgoing::Delta(DeltaDiscoveryRequest {
                node,
                type_url: envoy_url::CLUSTER_LOAD_ASSIGNMENT.to_owned(),
                resource_names_subscribe: wanted.difference(&old).cloned().collect(),
                resource_names_unsubscribe: old.difference(&wanted).cloned().collect(),
                initial_resource_versions: if first {
                    t.accepted
                        .iter()
                        .map(|(n, h)| (n.clone(), h.version.clone()))
                        .collect::<HashMap<_, _>>()
                } else {
                    HashMap::new()
                },
                ..Default::default()
            })
        } else if t.pending.is_some() {
            return Vec::new();
        } else {
            Outgoing::Sotw(DiscoveryRequest {
                node,
                type_url: envoy_url::CLUSTER_LOAD_ASSIGNMENT.to_owned(),
                version_info: t.version.clone(),
                resource_names: wanted.into_iter().collect(),
                response_nonce: t.nonce.clone(),
                ..Default::default()
            })
        };
        if sends_node {
            self.node_sent = true;
        }
        vec![out]
    }

    /// An EDS service name is subscribed and its assignment has not come:
    /// its cluster is warming.
    pub fn warming(&self) -> bool {
        let Some(t) = self.types.get(envoy_url::CLUSTER_LOAD_ASSIGNMENT) else {
            return false;
        };
        let held = |n: &String| t.accepted.contains_key(n) || t.pending.as_ref().is_some_and(|p| p.set.contains_key(n));
        t.names.iter().flatten().any(|n| !held(n) && !self.gave_up.contains(n))
    }

    /// The wait for the missing assignments is over: their clusters go on
    /// without endpoints, and later updates do not wait for them again.
    pub fn stop_warming(&mut self) {
        let Some(t) = self.types.get(envoy_url::CLUSTER_LOAD_ASSIGNMENT) else {
            return;
        };
        let held = |n: &String| t.accepted.contains_key(n) || t.pending.as_ref().is_some_and(|p| p.set.contains_key(n));
        let missing: Vec<String> = t.names.iter().flatten().filter(|n| !held(n)).cloned().collect();
        self.gave_up.extend(missing);
    }

    fn node_once(&mut self) -> Option<Node> {
        (!std::mem::replace(&mut self.node_sent, true)).then(|| self.node.clone())
    }

    /// Holds a State-of-the-World response as pending for its type.
    pub fn on_sotw(&mut self, r: DiscoveryResponse) -> Result<(), ResponseError> {
        let t = self.state(&r.type_url)?;
        if r.nonce.is_empty() {
            return Err(ResponseError::NoNonce(r.type_url));
        }
        t.nonce.clone_from(&r.nonce);
        // A wildcard type's response is its whole set; a named type's
        // holds the resources that changed (EDS), laid over the others.
        let mut set = match &t.names {
            None => BTreeMap::new(),
            Some(names) => {
                let mut set = t.pending.take().map_or_else(|| t.accepted.clone(), |p| p.set);
                set.retain(|n, _| names.contains(n));
                set
            }
        };
        for (index, body) in r.resources.into_iter().enumerate() {
            let name = resource_name(&r.type_url, index, &body)?;
            set.insert(
                name,
                Held {
                    version: String::new(),
                    body,
                },
            );
        }
        t.pending = Some(Pending {
            nonce: r.nonce,
            version: r.version_info,
            set,
        });
        Ok(())
    }

    /// Holds a Delta response as pending: the accepted set (or the set of
    /// an earlier pending response) with its changes and removals.
    pub fn on_delta(&mut self, r: DeltaDiscoveryResponse) -> Result<(), ResponseError> {
        let t = self.state(&r.type_url)?;
        if r.nonce.is_empty() {
            return Err(ResponseError::NoNonce(r.type_url));
        }
        t.nonce.clone_from(&r.nonce);
        let mut set = t.pending.take().map_or_else(|| t.accepted.clone(), |p| p.set);
        for (index, res) in r.resources.into_iter().enumerate() {
            let Some(body) = res.resource else {
                return Err(ResponseError::Resource {
                    type_url: r.type_url,
                    index,
                    reason: format!("`{}` has no body", res.name),
                });
            };
            let name = resource_name(&r.type_url, index, &body)?;
            if name != res.name {
                return Err(ResponseError::Resource {
                    type_url: r.type_url,
                    index,
                    reason: format!("named `{}` in the response but `{name}` in its body", res.name),
                });
            }
            set.insert(
                name,
                Held {
                    version: res.version,
                    body,
                },
            );
        }
        for name in &r.removed_resources {
            set.remove(name);
        }
        t.pending = Some(Pending {
            nonce: r.nonce,
            version: r.system_version_info,
            set,
        });
        Ok(())
    }

    fn state(&mut self, type_url: &str) -> Result<&mut TypeState, ResponseError> {
        self.types
            .get_mut(type_url)
            .ok_or_else(|| ResponseError::NotSubscribed(type_url.to_owned()))
    }

    /// Whether some response waits for its ACK or NACK.
    pub fn has_pending(&self) -> bool {
        self.types.values().any(|t| t.pending.is_some())
    }

    /// Every subscribed type has had a response (on this stream or an
    /// earlier one), pending ones included.
    pub fn synced(&self) -> bool {
        self.types
            .values()
            .all(|t| t.received || t.pending.is_some() || t.names.as_ref().is_some_and(BTreeSet::is_empty))
    }

    /// The resources the gateway would run with if every pending
    /// response were accepted. A type never received is `None`: the
    /// gateway's own file keeps that section.
    pub fn candidate(&self) -> Result<Resources, Refusal> {
        let mut out = Resources::default();
        let mut listeners: Option<Vec<sluice_api::xds::model::EnvoyListener>> = None;
        let mut clusters = BTreeMap::new();
        let mut assignments = BTreeMap::new();
        for (url, t) in &self.types {
            if !t.received && t.pending.is_none() {
                continue;
            }
            let set = t.pending.as_ref().map_or(&t.accepted, |p| &p.set);
            let bodies = set.values().map(|h| &h.body);
            match ResourceKind::from_type_url(url) {
                Some(ResourceKind::WebGroup) => out.webgroups = Some(decode_all(bodies)),
                Some(ResourceKind::SmartGroup) => out.smartgroups = Some(decode_all(bodies)),
                Some(ResourceKind::Workload) => out.workloads = Some(decode_all(bodies)),
                Some(ResourceKind::Policy) => out.policies = Some(decode_all(bodies)),
                Some(ResourceKind::Plugin) => {
                    out.plugins = Some(
                        bodies
                            .filter_map(|b| super::ecds::plugin(b).ok().map(|(p, _)| p))
                            .collect(),
                    );
                }
                Some(ResourceKind::Listener) => {
                    listeners = Some(
                        bodies
                            .filter_map(|b| sluice_api::xds::decode_listener(b).ok())
                            .collect(),
                    );
                }
                None if *url == envoy_url::CLUSTER => {
                    for c in bodies.filter_map(|b| sluice_api::xds::decode_cluster(b).ok()) {
                        clusters.insert(c.name.clone(), c);
                    }
                }
                None if *url == envoy_url::CLUSTER_LOAD_ASSIGNMENT => {
                    for a in bodies.filter_map(|b| sluice_api::xds::decode_load_assignment(b).ok()) {
                        assignments.insert(a.cluster_name.clone(), a);
                    }
                }
                None => {}
            }
        }
        if let Some(ls) = listeners {
            let specs = ls
                .iter()
                .map(|l| sluice_api::xds::gateway::gateway_listener(l, &clusters, &assignments))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Refusal {
                    dangling: matches!(e.kind, sluice_api::xds::DecodeErrorKind::Undefined { .. }),
                    message: format!("Envoy Listener {e}"),
                })?;
            out.listeners = Some(specs);
        }
        Ok(out)
    }

    /// Where the code of each plugin of the candidate comes from, by name.
    pub fn plugin_code(&self) -> Vec<(String, super::ecds::Code)> {
        let Some(t) = self.types.get(ResourceKind::Plugin.type_url()) else {
            return Vec::new();
        };
        let set = t.pending.as_ref().map_or(&t.accepted, |p| &p.set);
        set.values()
            .filter_map(|h| super::ecds::plugin(&h.body).ok())
            .map(|(p, c)| (p.name, c))
            .collect()
    }

    /// The candidate was applied: ACK every pending response.
    pub fn commit(&mut self) -> Vec<Outgoing> {
        let delta = self.delta;
        let mut out = Vec::new();
        for (url, t) in &mut self.types {
            let Some(p) = t.pending.take() else { continue };
            t.accepted = p.set;
            t.version = p.version;
            t.received = true;
            out.push(answer(delta, url, t, p.nonce, None));
        }
        out
    }

    /// The candidate was refused: NACK every pending response with
    /// `message`; the accepted resources stay.
    pub fn reject(&mut self, message: &str) -> Vec<Outgoing> {
        let delta = self.delta;
        let mut out = Vec::new();
        for (url, t) in &mut self.types {
            let Some(p) = t.pending.take() else { continue };
            t.received = true;
            let status = Status {
                code: INVALID_ARGUMENT,
                message: message.to_owned(),
                details: Vec::new(),
            };
            out.push(answer(delta, url, t, p.nonce, Some(status)));
        }
        out
    }

    /// NACKs one response that could not be held at all (it could not be
    /// decoded), leaving other pending responses alone.
    pub fn refuse(&mut self, type_url: &str, nonce: String, message: &str) -> Option<Outgoing> {
        let delta = self.delta;
        let (url, t) = self.types.iter_mut().find(|(u, _)| **u == type_url)?;
        t.received = true;
        let status = Status {
            code: INVALID_ARGUMENT,
            message: message.to_owned(),
            details: Vec::new(),
        };
        Some(answer(delta, url, t, nonce, Some(status)))
    }

    /// Per type: the version accepted (SotW) and how many resources.
    pub fn accepted(&self) -> Vec<(&'static str, String, usize)> {
        self.types
            .iter()
            .map(|(u, t)| (*u, t.version.clone(), t.accepted.len()))
            .collect()
    }
}

/// The names a request subscribes to: `*`, or the type's names.
fn subscription(names: Option<&BTreeSet<String>>) -> Vec<String> {
    match names {
        None => vec!["*".to_owned()],
        Some(n) => n.iter().cloned().collect(),
    }
}

fn answer(delta: bool, url: &str, t: &TypeState, nonce: String, error: Option<Status>) -> Outgoing {
    if delta {
        Outgoing::Delta(DeltaDiscoveryRequest {
            type_url: url.to_owned(),
            response_nonce: nonce,
            error_detail: error,
            ..Default::default()
        })
    } else {
        Outgoing::Sotw(DiscoveryRequest {
            type_url: url.to_owned(),
            version_info: t.version.clone(),
            resource_names: subscription(t.names.as_ref()),
            response_nonce: nonce,
            error_detail: error,
            ..Default::default()
        })
    }
}

/// The name of a resource, read from its body, after checking its type.
fn resource_name(type_url: &str, index: usize, body: &Any) -> Result<String, ResponseError> {
    let bad = |reason: String| ResponseError::Resource {
        type_url: type_url.to_owned(),
        index,
        reason,
    };
    if body.type_url != type_url {
        return Err(bad(format!("its type is {}, not the response's", body.type_url)));
    }
    let name = match ResourceKind::from_type_url(type_url) {
        Some(ResourceKind::WebGroup) => pb::WebGroup::decode(body.value.as_slice()).map(|m| m.name),
        Some(ResourceKind::SmartGroup) => pb::SmartGroup::decode(body.value.as_slice()).map(|m| m.name),
        Some(ResourceKind::Workload) => pb::Workload::decode(body.value.as_slice()).map(|m| m.name),
        Some(ResourceKind::Policy) => pb::Policy::decode(body.value.as_slice()).map(|m| m.name),
        Some(ResourceKind::Plugin) => {
            // Checked whole now, so a plugin Sluice cannot run is refused
            // with the field at fault.
            let (p, _) = super::ecds::plugin(body).map_err(|e| bad(format!("plugin: {e}")))?;
            Ok(p.name)
        }
        Some(ResourceKind::Listener) => {
            let l = sluice_api::xds::decode_listener(body).map_err(|e| bad(e.to_string()))?;
            Ok(l.name)
        }
        None if type_url == envoy_url::CLUSTER => {
            let c = sluice_api::xds::decode_cluster(body).map_err(|e| bad(e.to_string()))?;
            Ok(c.name)
        }
        None if type_url == envoy_url::CLUSTER_LOAD_ASSIGNMENT => {
            let a = sluice_api::xds::decode_load_assignment(body).map_err(|e| bad(e.to_string()))?;
            Ok(a.cluster_name)
        }
        None => return Err(bad("not a type this gateway reads".to_owned())),
    }
    .map_err(|e| bad(format!("cannot be decoded: {e}")))?;
    if name.is_empty() {
        return Err(bad("has no name".to_owned()));
    }
    Ok(name)
}

/// Bodies already decoded once by [`resource_name`]; one that fails now
/// cannot, and would be left out.
fn decode_all<'a, M: Message + Default>(bodies: impl Iterator<Item = &'a Any>) -> Vec<M> {
    bodies.filter_map(|b| M::decode(b.value.as_slice()).ok()).collect()
}

fn node(n: &XdsNode) -> Node {
    let fields = n
        .metadata
        .iter()
        .map(|(k, v)| {
            let v = Value {
                kind: Some(value::Kind::StringValue(v.clone())),
            };
            (k.clone(), v)
        })
        .collect();
    Node {
        id: n.id.clone(),
        cluster: n.cluster.clone(),
        metadata: (!n.metadata.is_empty()).then_some(Struct { fields }),
        user_agent_name: "sluice".to_owned(),
        user_agent_version_type: Some(
            envoy_types::pb::envoy::config::core::v3::node::UserAgentVersionType::UserAgentVersion(
                env!("CARGO_PKG_VERSION").to_owned(),
            ),
        ),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

    use envoy_types::pb::envoy::service::discovery::v3::Resource;
    use prost::Name;

    use super::*;

    fn bootstrap(delta: bool) -> XdsBootstrap {
        XdsBootstrap {
            servers: Vec::new(),
            node: XdsNode {
                id: "gw".into(),
                cluster: "c".into(),
                metadata: [("zone".to_owned(), "a".to_owned())].into(),
            },
            delta,
            initial_fetch_timeout: std::time::Duration::from_secs(1),
            tls: None,
            listeners: false,
        }
    }

    fn group(name: &str, domain: &str) -> Any {
        Any {
            type_url: pb::WebGroup::type_url(),
            value: pb::WebGroup {
                name: name.into(),
                domains: vec![domain.into()],
                ..Default::default()
            }
            .encode_to_vec(),
        }
    }

    fn delta_resource(name: &str, version: &str, domain: &str) -> Resource {
        Resource {
            name: name.into(),
            version: version.into(),
            resource: Some(group(name, domain)),
            ..Default::default()
        }
    }

    fn delta_requests(out: Vec<Outgoing>) -> Vec<DeltaDiscoveryRequest> {
        out.into_iter()
            .map(|o| match o {
                Outgoing::Delta(r) => r,
                Outgoing::Sotw(_) => panic!("a SotW request from a Delta client"),
            })
            .collect()
    }

    #[test]
    fn the_first_request_of_a_stream_names_the_node_once_and_subscribes_by_wildcard() {
        let mut c = AdsClient::new(&bootstrap(true));
        let first = delta_requests(c.on_connect());
        assert_eq!(first.len(), ResourceKind::ALL.len());
        assert_eq!(first.iter().filter(|r| r.node.is_some()).count(), 1);
        let node = first[0].node.as_ref().unwrap();
        assert_eq!(
            (node.id.as_str(), node.cluster.as_str(), node.user_agent_name.as_str()),
            ("gw", "c", "sluice")
        );
        assert!(
            first
                .iter()
                .all(|r| r.resource_names_subscribe == ["*"] && r.initial_resource_versions.is_empty())
        );
        // A new stream names the node again.
        assert_eq!(
            delta_requests(c.on_connect())
                .iter()
                .filter(|r| r.node.is_some())
                .count(),
            1
        );
    }

    #[test]
    fn delta_changes_and_removals_are_held_then_acked_and_announced_on_reconnect() {
        let mut c = AdsClient::new(&bootstrap(true));
        let _ = c.on_connect();
        let url = pb::WebGroup::type_url();
        c.on_delta(DeltaDiscoveryResponse {
            type_url: url.clone(),
            nonce: "n1".into(),
            resources: vec![
                delta_resource("a", "v1", "a.example"),
                delta_resource("b", "v1", "b.example"),
            ],
            ..Default::default()
        })
        .unwrap();
        assert!(c.has_pending() && !c.synced());
        assert_eq!(c.candidate().unwrap().webgroups.unwrap().len(), 2);
        let acks = delta_requests(c.commit());
        assert_eq!(acks.len(), 1);
        assert_eq!(
            (acks[0].response_nonce.as_str(), acks[0].error_detail.is_none()),
            ("n1", true)
        );

        // b removed, a changed: refused; what was accepted stays.
        c.on_delta(DeltaDiscoveryResponse {
            type_url: url.clone(),
            nonce: "n2".into(),
            resources: vec![delta_resource("a", "v2", "bad name")],
            removed_resources: vec!["b".into()],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.candidate().unwrap().webgroups.unwrap().len(), 1);
        let nacks = delta_requests(c.reject("domains[0]: invalid"));
        assert_eq!(nacks[0].response_nonce, "n2");
        assert_eq!(nacks[0].error_detail.as_ref().unwrap().message, "domains[0]: invalid");
        assert_eq!(
            c.candidate().unwrap().webgroups.unwrap().len(),
            2,
            "the NACKed change is not kept"
        );

        // On a new stream, what is held is announced with its versions.
        let again = delta_requests(c.on_connect());
        let web = again.iter().find(|r| r.type_url == url).unwrap();
        let mut held: Vec<(String, String)> = web.initial_resource_versions.clone().into_iter().collect();
        held.sort();
        assert_eq!(held, [("a".into(), "v1".into()), ("b".into(), "v1".into())]);
    }

    #[test]
    fn sotw_acks_repeat_the_version_and_nacks_the_last_accepted_one() {
        let mut c = AdsClient::new(&bootstrap(false));
        let _ = c.on_connect();
        let url = pb::WebGroup::type_url();
        let response = |v: &str, n: &str, groups: Vec<Any>| DiscoveryResponse {
            type_url: url.clone(),
            version_info: v.into(),
            nonce: n.into(),
            resources: groups,
            ..Default::default()
        };
        c.on_sotw(response("v1", "n1", vec![group("a", "a.example")])).unwrap();
        let Outgoing::Sotw(ack) = c.commit().remove(0) else {
            panic!()
        };
        assert_eq!((ack.version_info.as_str(), ack.response_nonce.as_str()), ("v1", "n1"));
        c.on_sotw(response("v2", "n2", vec![])).unwrap();
        assert_eq!(
            c.candidate().unwrap().webgroups.unwrap().len(),
            0,
            "State of the World: an empty set removes all"
        );
        let Outgoing::Sotw(nack) = c.reject("no").remove(0) else {
            panic!()
        };
        assert_eq!((nack.version_info.as_str(), nack.response_nonce.as_str()), ("v1", "n2"));
        let Outgoing::Sotw(first) = c
            .on_connect()
            .into_iter()
            .find(|o| matches!(o, Outgoing::Sotw(r) if r.type_url == url))
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(first.version_info, "v1", "a new stream says what is held");
    }

    #[test]
    fn responses_that_cannot_be_held_are_refused_with_the_reason() {
        let mut c = AdsClient::new(&bootstrap(true));
        let _ = c.on_connect();
        let url = pb::WebGroup::type_url();
        let no_nonce = DeltaDiscoveryResponse {
            type_url: url.clone(),
            ..Default::default()
        };
        assert!(matches!(c.on_delta(no_nonce), Err(ResponseError::NoNonce(_))));
        let other = DeltaDiscoveryResponse {
            type_url: "type.googleapis.com/x.Y".into(),
            nonce: "n".into(),
            ..Default::default()
        };
        assert!(matches!(c.on_delta(other), Err(ResponseError::NotSubscribed(_))));
        let misnamed = DeltaDiscoveryResponse {
            type_url: url.clone(),
            nonce: "n".into(),
            resources: vec![Resource {
                name: "a".into(),
                resource: Some(group("b", "b.example")),
                ..Default::default()
            }],
            ..Default::default()
        };
        let e = c.on_delta(misnamed).unwrap_err().to_string();
        assert!(e.contains("named `a` in the response but `b` in its body"), "{e}");
        let garbage = DeltaDiscoveryResponse {
            type_url: url.clone(),
            nonce: "n".into(),
            resources: vec![Resource {
                name: "a".into(),
                resource: Some(Any {
                    type_url: url.clone(),
                    value: vec![0xff; 3],
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(
            c.on_delta(garbage)
                .unwrap_err()
                .to_string()
                .contains("cannot be decoded")
        );
        assert!(!c.has_pending(), "nothing refused is held");
        let Some(Outgoing::Delta(nack)) = c.refuse(&url, "n".into(), "why") else {
            panic!()
        };
        assert_eq!(nack.error_detail.unwrap().message, "why");
    }

    fn eds_cluster(name: &str, service: &str) -> Any {
        use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
        use envoy_types::pb::envoy::config::core::v3::{AggregatedConfigSource, ConfigSource, config_source};
        let c = Cluster {
            name: name.into(),
            cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Eds as i32)),
            eds_cluster_config: Some(cluster::EdsClusterConfig {
                eds_config: Some(ConfigSource {
                    config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
                    ..Default::default()
                }),
                service_name: service.into(),
            }),
            ..Default::default()
        };
        Any {
            type_url: Cluster::type_url(),
            value: c.encode_to_vec(),
        }
    }

    fn assignment(name: &str, port: u32) -> Any {
        use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
        use envoy_types::pb::envoy::config::endpoint::v3::{
            ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
        };
        let a = ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(Address {
                            address: Some(address::Address::SocketAddress(SocketAddress {
                                address: "10.0.0.1".into(),
                                port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                                ..Default::default()
                            })),
                        }),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        Any {
            type_url: ClusterLoadAssignment::type_url(),
            value: a.encode_to_vec(),
        }
    }

    fn sotw(type_url: &str, version: &str, nonce: &str, resources: Vec<Any>) -> DiscoveryResponse {
        DiscoveryResponse {
            type_url: type_url.into(),
            version_info: version.into(),
            nonce: nonce.into(),
            resources,
            ..Default::default()
        }
    }

    fn sotw_requests(out: Vec<Outgoing>) -> Vec<DiscoveryRequest> {
        out.into_iter()
            .map(|o| match o {
                Outgoing::Sotw(r) => r,
                Outgoing::Delta(r) => panic!("a Delta request on a SotW stream: {r:?}"),
            })
            .collect()
    }

    #[test]
    fn sotw_eds_follows_the_clusters_by_name_and_keeps_what_a_response_leaves_out() {
        let mut b = bootstrap(false);
        b.listeners = true;
        let mut c = AdsClient::new(&b);
        let first = sotw_requests(c.on_connect());
        // Nothing to ask EDS for yet: no request, which would read as a
        // wildcard.
        assert!(!first.iter().any(|r| r.type_url == envoy_url::CLUSTER_LOAD_ASSIGNMENT));
        assert!(!c.warming());

        c.on_sotw(sotw(
            envoy_url::CLUSTER,
            "1",
            "n1",
            vec![eds_cluster("a", "a-eps"), eds_cluster("b", "")],
        ))
        .unwrap();
        let follow = sotw_requests(c.follow_clusters());
        assert_eq!(follow.len(), 1);
        assert_eq!(follow[0].type_url, envoy_url::CLUSTER_LOAD_ASSIGNMENT);
        assert_eq!(follow[0].resource_names, ["a-eps", "b"]);
        assert!(c.warming(), "the clusters wait for their endpoints");
        assert!(c.follow_clusters().is_empty(), "said once");

        c.on_sotw(sotw(
            envoy_url::CLUSTER_LOAD_ASSIGNMENT,
            "e1",
            "n2",
            vec![assignment("a-eps", 1)],
        ))
        .unwrap();
        assert!(c.warming(), "`b` has not come");
        {
            // Given up on (the 2 s hold ran out), `b` is not waited for again.
            let mut later = AdsClient::new(&b);
            let _ = later.on_connect();
            later
                .on_sotw(sotw(envoy_url::CLUSTER, "1", "n1", vec![eds_cluster("b", "")]))
                .unwrap();
            let _ = later.follow_clusters();
            assert!(later.warming());
            later.stop_warming();
            assert!(!later.warming());
        }
        c.on_sotw(sotw(
            envoy_url::CLUSTER_LOAD_ASSIGNMENT,
            "e2",
            "n3",
            vec![assignment("b", 2)],
        ))
        .unwrap();
        assert!(!c.warming());
        let acks = sotw_requests(c.commit());
        let eds_ack = acks
            .iter()
            .find(|r| r.type_url == envoy_url::CLUSTER_LOAD_ASSIGNMENT)
            .unwrap();
        // The ACK keeps naming the subscription, not `*`.
        assert_eq!(eds_ack.resource_names, ["a-eps", "b"]);
        assert_eq!(eds_ack.response_nonce, "n3");
        // A SotW EDS response holds what changed; the other stays.
        let held: Vec<(&str, String, usize)> = c.accepted();
        let eds = held
            .iter()
            .find(|(u, _, _)| *u == envoy_url::CLUSTER_LOAD_ASSIGNMENT)
            .unwrap();
        assert_eq!(eds.2, 2);

        // `a` goes: its assignment is unsubscribed and dropped.
        c.on_sotw(sotw(envoy_url::CLUSTER, "2", "n4", vec![eds_cluster("b", "")]))
            .unwrap();
        let follow = sotw_requests(c.follow_clusters());
        assert_eq!(follow[0].resource_names, ["b"]);
        assert_eq!(follow[0].response_nonce, "n3");
        assert_eq!(follow[0].version_info, "e2");
        let _ = c.commit();
        let eds = c
            .accepted()
            .into_iter()
            .find(|(u, _, _)| *u == envoy_url::CLUSTER_LOAD_ASSIGNMENT)
            .unwrap();
        assert_eq!(eds.2, 1);
    }

    #[test]
    fn delta_eds_subscribes_and_unsubscribes_the_difference() {
        let mut b = bootstrap(true);
        b.listeners = true;
        let mut c = AdsClient::new(&b);
        let _ = c.on_connect();
        let cds = |nonce: &str, clusters: Vec<Any>| DeltaDiscoveryResponse {
            type_url: envoy_url::CLUSTER.into(),
            nonce: nonce.into(),
            resources: clusters
                .into_iter()
                .map(|a| {
                    let name = envoy_types::pb::envoy::config::cluster::v3::Cluster::decode(a.value.as_slice())
                        .unwrap()
                        .name;
                    Resource {
                        name,
                        version: "v".into(),
                        resource: Some(a),
                        ..Default::default()
                    }
                })
                .collect(),
            ..Default::default()
        };
        c.on_delta(cds("n1", vec![eds_cluster("a", ""), eds_cluster("b", "")]))
            .unwrap();
        let sub = delta_requests(c.follow_clusters());
        assert_eq!(sub[0].resource_names_subscribe, ["a", "b"]);
        assert!(sub[0].resource_names_unsubscribe.is_empty());
        assert!(sub[0].response_nonce.is_empty(), "a subscription change, not an ACK");
        let _ = c.commit();
        let mut gone = cds("n2", vec![eds_cluster("c", "")]);
        gone.removed_resources = vec!["a".into()];
        c.on_delta(gone).unwrap();
        let sub = delta_requests(c.follow_clusters());
        assert_eq!(sub[0].resource_names_subscribe, ["c"]);
        assert_eq!(sub[0].resource_names_unsubscribe, ["a"]);
        // On a new stream, the names are subscribed again with what is held.
        let again = delta_requests(c.on_connect());
        let eds = again
            .iter()
            .find(|r| r.type_url == envoy_url::CLUSTER_LOAD_ASSIGNMENT)
            .unwrap();
        assert_eq!(eds.resource_names_subscribe, ["b", "c"]);
    }
}
