//! The ADS protocol core: for one stream, decides what to send and when.
//!
//! This is the sans-IO part of the control server's xDS service. The gRPC
//! service owns the sockets and the clock; per stream it keeps a
//! [`SotwStream`] (State of the World, `StreamAggregatedResources`) or a
//! [`DeltaStream`] (`DeltaAggregatedResources`), feeds it every request and
//! every new snapshot of the stream's node, and sends the responses it
//! returns, in order. The events it returns (ACK, NACK, stale nonce,
//! subscription change) are for metrics, logs and the admin API.
//!
//! The rules it implements are numbered in `notes/xds-protocol.md` (S… for
//! SotW, D… for Delta, A… for ordering and warming); comments and tests cite
//! them. The choices that shape everything:
//!
//! * At most one unacknowledged response per type per stream (S13). Further
//!   pushes of the type wait until a request for it carries that response's
//!   nonce. This is what makes ignoring stale SotW requests safe (S10–S12).
//! * A NACKed response is not sent again: what was sent counts as what the
//!   client has, so only a real change, or a new subscription, brings the
//!   next response (S15, D13, S20, D4).
//! * Types go out in make-before-break order ([`order`]), and a type that
//!   has a change it cannot send yet holds back the types after it, so a
//!   listener never overtakes the cluster it needs (A3/A4).
//! * When a Cluster that is served by EDS is added or changed, its
//!   ClusterLoadAssignment is sent again even if unchanged, because Envoy
//!   keeps the cluster warming until it gets one (A7).

mod delta;
pub mod order;
mod sotw;
mod subscription;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::rpc::Status;

pub use delta::DeltaStream;
pub use sotw::SotwStream;
pub use subscription::{Subscription, WILDCARD};

/// What the stream core returns for one input: responses to send now, in
/// this order, and what happened.
#[derive(Debug, Clone, PartialEq)]
pub struct Output<R> {
    /// Responses to send, in order.
    pub responses: Vec<R>,
    /// What happened, for metrics and the admin API.
    pub events: Vec<Event>,
}

impl<R> Default for Output<R> {
    fn default() -> Self {
        Output {
            responses: Vec::new(),
            events: Vec::new(),
        }
    }
}

impl<R> Output<R> {
    /// Whether there is nothing to send and nothing to report.
    pub fn is_empty(&self) -> bool {
        self.responses.is_empty() && self.events.is_empty()
    }
}

/// Something that happened on a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// The client accepted the response with `nonce`.
    Ack {
        /// The type of the response.
        type_url: String,
        /// The version the client now runs (SotW `version_info`; for Delta the
        /// `system_version_info` of the acknowledged response).
        version: String,
        /// The acknowledged response's nonce.
        nonce: String,
    },
    /// The client rejected the response with `nonce` (S6, D11).
    Nack {
        /// The type of the response.
        type_url: String,
        /// The version that was rejected: the one sent with `nonce`.
        version: String,
        /// The rejected response's nonce.
        nonce: String,
        /// `error_detail.code` (a `google.rpc.Code`).
        code: i32,
        /// `error_detail.message`: why the client rejected it.
        message: String,
    },
    /// A request carried a nonce that is not the last one sent for its type.
    /// In SotW the whole request was ignored (S10/S11); in Delta only the
    /// ACK/NACK part was, subscription changes were applied (D12).
    Stale {
        /// The request's type.
        type_url: String,
        /// The nonce it carried.
        nonce: String,
    },
    /// The client's subscription to a type changed; this is the new one.
    Subscribed {
        /// The type.
        type_url: String,
        /// Whether it is a wildcard subscription.
        wildcard: bool,
        /// The explicitly subscribed names.
        names: Vec<String>,
    },
}

/// The last rejection of a type on a stream, for the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nack {
    /// The rejected version.
    pub version: String,
    /// The rejected response's nonce.
    pub nonce: String,
    /// `error_detail.code`.
    pub code: i32,
    /// `error_detail.message`.
    pub message: String,
}

/// A request the stream cannot go on with. The gRPC service ends the stream
/// with `InvalidArgument` (or `Unimplemented` for
/// [`ProtocolError::ResourceLocatorsUnsupported`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// An ADS request must say which type it is about (S-T14).
    #[error("request without type_url: an ADS request must name its resource type")]
    MissingTypeUrl,
    /// The first request of a stream must identify the node.
    #[error("the first request of the stream carries no node")]
    MissingNode,
    /// The node has no id, so it cannot be told apart from others.
    #[error("the node of the stream has an empty id")]
    EmptyNodeId,
    /// Dynamic-parameter resource locators (`resource_locators*`) are not
    /// implemented (D17).
    #[error("resource locators with dynamic parameters are not supported (type {type_url})")]
    ResourceLocatorsUnsupported {
        /// The request's type.
        type_url: String,
    },
}

/// The node of a stream: taken from its first request (N3); later requests
/// may omit it, and a different one later is ignored.
#[derive(Debug, Default)]
struct NodeSlot(Option<Node>);

impl NodeSlot {
    fn get(&self) -> Option<&Node> {
        self.0.as_ref()
    }

    fn identify(&mut self, node: Option<&Node>) -> Result<&Node, ProtocolError> {
        let slot = &mut self.0;
        let node = match slot {
            Some(n) => n,
            None => {
                let n = node.ok_or(ProtocolError::MissingNode)?;
                if n.id.is_empty() {
                    return Err(ProtocolError::EmptyNodeId);
                }
                slot.insert(n.clone())
            }
        };
        Ok(node)
    }
}

/// Nonces: unique on the stream and never empty. A counter is enough, since
/// a nonce means nothing outside its stream (S2).
#[derive(Debug, Default)]
struct Nonces(u64);

impl Nonces {
    fn next(&mut self) -> String {
        self.0 += 1;
        self.0.to_string()
    }
}

/// The checks every ADS request goes through before its type is looked at.
fn check_request(type_url: &str, has_locators: bool) -> Result<(), ProtocolError> {
    if type_url.is_empty() {
        return Err(ProtocolError::MissingTypeUrl);
    }
    if has_locators {
        return Err(ProtocolError::ResourceLocatorsUnsupported {
            type_url: type_url.to_owned(),
        });
    }
    Ok(())
}

/// The event for a request that answers the response (`nonce`, `version`):
/// a NACK if it carries `error_detail` (S6, D11), else an ACK of
/// `acked_version`. Also returns the rejection to keep for the admin API.
fn answer(
    type_url: &str,
    nonce: &str,
    version: &str,
    acked_version: &str,
    error_detail: Option<&Status>,
) -> (Event, Option<Nack>) {
    let type_url = type_url.to_owned();
    let nonce = nonce.to_owned();
    match error_detail {
        Some(status) => {
            let nack = Nack {
                version: version.to_owned(),
                nonce,
                code: status.code,
                message: status.message.clone(),
            };
            let event = Event::Nack {
                type_url,
                version: nack.version.clone(),
                nonce: nack.nonce.clone(),
                code: nack.code,
                message: nack.message.clone(),
            };
            (event, Some(nack))
        }
        None => (
            Event::Ack {
                type_url,
                version: acked_version.to_owned(),
                nonce,
            },
            None,
        ),
    }
}

fn subscribed_event(type_url: &str, sub: &Subscription) -> Event {
    Event::Subscribed {
        type_url: type_url.to_owned(),
        wildcard: sub.is_wildcard(),
        names: sub.names().iter().cloned().collect(),
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]
pub(crate) mod testutil {
    //! Snapshots and resources for the stream tests. A resource body is
    //! `name=content`, so a test can read back which resource it got.
    use crate::snapshot::{Resource, Snapshot};
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::google::protobuf::Any;

    pub(crate) fn node() -> Node {
        Node {
            id: "proxy-1".into(),
            cluster: "edge".into(),
            ..Default::default()
        }
    }

    pub(crate) fn body(type_url: &str, name: &str, content: &str) -> Any {
        Any {
            type_url: type_url.to_owned(),
            value: format!("{name}={content}").into_bytes(),
        }
    }

    /// The resource name inside a test body.
    pub(crate) fn name_of(any: &Any) -> String {
        let s = String::from_utf8(any.value.clone()).unwrap();
        s.split('=').next().unwrap().to_owned()
    }

    /// One entry: (type URL, name, content, EDS name for clusters).
    pub(crate) type Entry<'a> = (&'a str, &'a str, &'a str, Option<&'a str>);

    pub(crate) fn snap(entries: &[Entry<'_>]) -> Snapshot {
        let mut b = Snapshot::builder();
        for (t, n, c, eds) in entries {
            let mut r = Resource::new(*n, body(t, n, c));
            if let Some(e) = eds {
                r = r.with_eds_name(*e);
            }
            b.add(r).unwrap();
        }
        b.build()
    }

    pub(crate) fn strings(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }
}
