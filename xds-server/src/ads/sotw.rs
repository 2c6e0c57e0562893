//! State of the World ADS (`StreamAggregatedResources`) for one stream.
//!
//! Every SotW response of a type carries a version for the whole type
//! (the snapshot's aggregate version) and the resources the client is
//! subscribed to. The core sends *all* of them in every response, for every
//! type, not only the ones that changed: for LDS/CDS and Sluice's types the
//! protocol requires it (S17/S19), and for the others it is what Envoy
//! expects in practice: its watch map hands an empty update to every watch
//! whose resource is missing from a response, which SDS and ECDS reject
//! (Envoy `source/common/config/watch_map.cc`, `onConfigUpdate`). What
//! differs between the two kinds is deletion: a full-state type sends a
//! response when a resource disappears, the others do not (S18).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};

use super::subscription::Subscription;
use super::{Event, Nack, NodeSlot, Nonces, Output, ProtocolError, answer, check_request, order, subscribed_event};
use crate::snapshot::{Resource, Snapshot, TypeResources, type_url};

/// One type on one SotW stream.
#[derive(Debug, Default)]
struct TypeState {
    sub: Subscription,
    /// A request of this type has been seen on the stream.
    seen: bool,
    /// The nonce and version of the last response of this type.
    last_sent: Option<(String, String)>,
    /// That response is not acknowledged yet (S13).
    awaiting: bool,
    /// Name → version of what the last response held. It counts as what the
    /// client has, whether it ACKed or NACKed it, so a rejected version is
    /// not sent again (S15).
    sent: BTreeMap<String, String>,
    /// Names subscribed since the last response: sent even if unchanged (S20).
    fresh: BTreeSet<String>,
    /// Full-state type: the first request is answered even when empty, so
    /// a client waiting for its first LDS/CDS answer can go on.
    answer_owed: bool,
    acked_version: Option<String>,
    last_nack: Option<Nack>,
}

/// The protocol state of one SotW ADS stream.
///
/// Feed it every request with [`SotwStream::on_request`] and every new
/// snapshot of the stream's node with [`SotwStream::on_snapshot`]; send what
/// they return, in order. Both take the node's *current* snapshot: a request
/// that acknowledges a response may release a change held back until then.
#[derive(Debug, Default)]
pub struct SotwStream {
    node: NodeSlot,
    nonces: Nonces,
    types: BTreeMap<String, TypeState>,
    /// ClusterLoadAssignment names owed a response because a cluster that
    /// uses them was just added or changed (A7).
    warming: BTreeSet<String>,
}

impl SotwStream {
    /// A stream that has received nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the node of the stream from a request and returns it. The first
    /// request must carry a node with an id (N3/N4); later ones may omit it,
    /// and a different node later is ignored. Call this on the first request
    /// to choose the snapshot, before [`SotwStream::on_request`].
    pub fn identify(&mut self, req: &DiscoveryRequest) -> Result<&Node, ProtocolError> {
        self.node.identify(req.node.as_ref())
    }

    /// The node of the stream, once known.
    pub fn node(&self) -> Option<&Node> {
        self.node.get()
    }

    /// A request arrived; `snap` is the node's current snapshot. Returns the
    /// responses to send now, in order, and what happened. An error ends the
    /// stream.
    pub fn on_request(
        &mut self,
        req: DiscoveryRequest,
        snap: &Snapshot,
    ) -> Result<Output<DiscoveryResponse>, ProtocolError> {
        check_request(&req.type_url, !req.resource_locators.is_empty())?;
        self.node.identify(req.node.as_ref())?;
        let mut out = Output::default();
        let full_state = order::is_full_state(&req.type_url);
        let st = self.types.entry(req.type_url.clone()).or_default();

        if let Some((nonce, version)) = &st.last_sent {
            if req.response_nonce != *nonce {
                // S10/S11: the request was written before the client saw
                // the last response of this type, so its ACK/NACK and its
                // names are out of date. The client sends them again with the
                // last nonce when it handles that response, and as at most
                // one response is outstanding (S13), that request is bound
                // to come.
                out.events.push(Event::Stale {
                    type_url: req.type_url,
                    nonce: req.response_nonce,
                });
                return Ok(out);
            }
            if st.awaiting {
                st.awaiting = false;
                // S6/S7: error_detail tells a NACK, not the version, which
                // may equal the one sent when new names were rejected.
                let (event, nack) = answer(
                    &req.type_url,
                    nonce,
                    version,
                    &req.version_info,
                    req.error_detail.as_ref(),
                );
                match nack {
                    Some(nack) => st.last_nack = Some(nack),
                    None => st.acked_version = Some(req.version_info.clone()),
                }
                out.events.push(event);
            }
        }
        // S12: with nothing sent for this type yet, any nonce is accepted (a
        // reconnecting client may carry one from its previous stream).

        let first = !st.seen;
        st.seen = true;
        let before = st.sub.clone();
        st.sub.apply_sotw(&req.resource_names, full_state);
        if first || st.sub.is_wildcard() != before.is_wildcard() || st.sub.names() != before.names() {
            out.events.push(subscribed_event(&req.type_url, &st.sub));
        }
        let sub = &st.sub;
        st.fresh
            .extend(sub.names().iter().filter(|n| !before.names().contains(*n)).cloned());
        st.fresh.retain(|n| sub.names().contains(n));
        // What the client no longer asks for is no longer "what it has":
        // otherwise an unsubscription would look like a deletion and bring a
        // needless response (S26), and a re-subscription would not (S20).
        st.sent.retain(|n, _| sub.covers(n));

        if first && full_state {
            let tr = snap.resources(&req.type_url);
            if sub.is_wildcard() && sub.names().is_empty() && req.version_info == tr.version() {
                // S30: a reconnecting wildcard-only client already at the
                // current version has all of it; nothing to send.
                st.sent = tr.iter().map(|r| (r.name.clone(), r.version.clone())).collect();
            } else {
                st.answer_owed = true;
            }
        }

        out.responses = self.flush(snap);
        Ok(out)
    }

    /// The node's snapshot changed. Returns the responses to send now.
    pub fn on_snapshot(&mut self, snap: &Snapshot) -> Output<DiscoveryResponse> {
        Output {
            responses: self.flush(snap),
            events: Vec::new(),
        }
    }

    /// The client's subscription to `type_url`, if it has asked for the type.
    pub fn subscription(&self, type_url: &str) -> Option<&Subscription> {
        self.types.get(type_url).map(|t| &t.sub)
    }

    /// The last version of `type_url` the client acknowledged on this stream.
    pub fn acked_version(&self, type_url: &str) -> Option<&str> {
        self.types.get(type_url).and_then(|t| t.acked_version.as_deref())
    }

    /// The last rejection of `type_url` on this stream. It stays after a
    /// later ACK, as a record of what went wrong.
    pub fn last_nack(&self, type_url: &str) -> Option<&Nack> {
        self.types.get(type_url).and_then(|t| t.last_nack.as_ref())
    }

    /// Whether a response of `type_url` waits for its ACK/NACK.
    pub fn awaiting_ack(&self, type_url: &str) -> bool {
        self.types.get(type_url).is_some_and(|t| t.awaiting)
    }

    /// Sends what each type has to send, in make-before-break order. A type
    /// with something to send that still waits for the ACK of its previous
    /// response holds back every type after it (A3/A4): otherwise a listener
    /// could go out before the cluster update it relies on.
    fn flush(&mut self, snap: &Snapshot) -> Vec<DiscoveryResponse> {
        let mut responses = Vec::new();
        let clas = snap.resources(type_url::CLUSTER_LOAD_ASSIGNMENT);
        self.warming.retain(|n| clas.contains(n));
        let no_owed = BTreeSet::new();
        let mut held = false;
        for url in order::sorted(self.types.keys()) {
            let Some(st) = self.types.get_mut(&url) else { continue };
            let tr = snap.resources(&url);
            let owed = if url == type_url::CLUSTER_LOAD_ASSIGNMENT {
                &self.warming
            } else {
                &no_owed
            };
            let Some(plan) = plan(st, order::is_full_state(&url), tr, owed) else {
                continue;
            };
            if held || st.awaiting {
                held = true;
                continue;
            }
            let nonce = self.nonces.next();
            let mut version = tr.version().to_owned();
            if plan.warming && st.last_sent.as_ref().is_some_and(|(_, v)| *v == version) {
                // A7: the resend for a warming cluster must not look like a
                // repeat of the last response.
                version = format!("{version}-{nonce}");
            }
            if url == type_url::CLUSTER {
                for r in &plan.resources {
                    if st.sent.get(&r.name) != Some(&r.version) {
                        self.warming.extend(r.eds_name.iter().cloned());
                    }
                }
            }
            if url == type_url::CLUSTER_LOAD_ASSIGNMENT {
                for r in &plan.resources {
                    self.warming.remove(&r.name);
                }
            }
            st.sent = plan
                .resources
                .iter()
                .map(|r| (r.name.clone(), r.version.clone()))
                .collect();
            st.fresh.clear();
            st.answer_owed = false;
            st.awaiting = true;
            st.last_sent = Some((nonce.clone(), version.clone()));
            responses.push(DiscoveryResponse {
                version_info: version,
                resources: plan.resources.iter().map(|r| r.body.clone()).collect(),
                type_url: url,
                nonce,
                ..Default::default()
            });
        }
        responses
    }
}

/// What one type would send now.
struct Plan {
    resources: Vec<Arc<Resource>>,
    /// It includes a CLA owed to a warming cluster (A7).
    warming: bool,
}

/// Whether a type has something to send, and what: every subscribed
/// resource that exists.
fn plan(st: &TypeState, full_state: bool, tr: &TypeResources, owed: &BTreeSet<String>) -> Option<Plan> {
    if !st.seen {
        return None;
    }
    let resources: Vec<Arc<Resource>> = if st.sub.is_wildcard() {
        tr.iter().cloned().collect()
    } else {
        st.sub.names().iter().filter_map(|n| tr.get(n)).cloned().collect()
    };
    // S14: send only when the content for this client changed or the
    // subscription added names (S20), or for warming (A7).
    let changed = resources.iter().any(|r| st.sent.get(&r.name) != Some(&r.version));
    let fresh = resources.iter().any(|r| st.fresh.contains(&r.name));
    let warming = resources.iter().any(|r| owed.contains(&r.name));
    // Nothing added or changed, so `resources` is a subset of `sent`: a
    // length difference is a resource that disappeared. For a full-state type
    // that is a deletion to announce (S17, S-T10); for the others a missing
    // resource is not a deletion, and nothing is sent (S18).
    let deleted = full_state && resources.len() != st.sent.len();
    let send = changed || fresh || warming || deleted || (full_state && st.answer_owed);
    send.then_some(Plan { resources, warming })
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]
mod tests {
    use std::collections::HashSet;

    use envoy_types::pb::google::rpc::Status;

    use super::*;
    use crate::ads::testutil::{Entry, name_of, node, snap, strings};
    use crate::snapshot::type_url::{
        CLUSTER, CLUSTER_LOAD_ASSIGNMENT as CLA, LISTENER, ROUTE_CONFIGURATION as RDS, SECRET, SLUICE_POLICY,
        SLUICE_WEB_GROUP, TYPED_EXTENSION_CONFIG as ECDS,
    };

    fn request(t: &str, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            node: Some(node()),
            type_url: t.to_owned(),
            resource_names: strings(names),
            version_info: version.to_owned(),
            response_nonce: nonce.to_owned(),
            ..Default::default()
        }
    }

    fn nack(mut req: DiscoveryRequest, message: &str) -> DiscoveryRequest {
        req.error_detail = Some(Status {
            code: 3,
            message: message.to_owned(),
            details: vec![],
        });
        req
    }

    /// A client: a stream plus the checks of S-T13 on every response.
    #[derive(Default)]
    struct Client {
        s: SotwStream,
        nonces: HashSet<String>,
    }

    impl Client {
        fn send(&mut self, req: DiscoveryRequest, snap: &Snapshot) -> Output<DiscoveryResponse> {
            let out = self.s.on_request(req, snap).unwrap();
            self.check(&out.responses);
            out
        }

        fn push(&mut self, snap: &Snapshot) -> Output<DiscoveryResponse> {
            let out = self.s.on_snapshot(snap);
            self.check(&out.responses);
            out
        }

        /// S-T13: nonce non-empty and unique on the stream; version non-empty;
        /// each Any of the response's type; no name twice.
        fn check(&mut self, responses: &[DiscoveryResponse]) {
            for r in responses {
                assert!(!r.nonce.is_empty(), "empty nonce");
                assert!(self.nonces.insert(r.nonce.clone()), "nonce {} reused", r.nonce);
                assert!(!r.version_info.is_empty(), "empty version");
                let mut names = HashSet::new();
                for any in &r.resources {
                    assert_eq!(any.type_url, r.type_url);
                    assert!(names.insert(name_of(any)), "duplicate {}", name_of(any));
                }
            }
        }
    }

    fn names(r: &DiscoveryResponse) -> Vec<String> {
        r.resources.iter().map(name_of).collect()
    }

    fn one(out: &Output<DiscoveryResponse>) -> &DiscoveryResponse {
        assert_eq!(out.responses.len(), 1, "expected one response, got {:?}", out.responses);
        &out.responses[0]
    }

    const CDS2: &[Entry<'static>] = &[(CLUSTER, "c1", "1", None), (CLUSTER, "c2", "1", None)];

    #[test]
    fn s_t1_first_wildcard_request_gets_all_clusters() {
        let snap = snap(CDS2);
        let mut c = Client::default();
        let out = c.send(request(CLUSTER, &[], "", ""), &snap);
        let r = one(&out);
        assert_eq!(names(r), ["c1", "c2"]);
        assert_eq!(r.version_info, snap.resources(CLUSTER).version());
        assert!(c.s.subscription(CLUSTER).unwrap().is_wildcard());
        assert!(c.s.awaiting_ack(CLUSTER));
    }

    #[test]
    fn s_t2_ack_brings_nothing_until_content_changes() {
        let snap = snap(CDS2);
        let mut c = Client::default();
        let r = one(&c.send(request(CLUSTER, &[], "", ""), &snap)).clone();
        let out = c.send(request(CLUSTER, &[], &r.version_info, &r.nonce), &snap);
        assert!(out.responses.is_empty());
        assert_eq!(
            out.events,
            [Event::Ack {
                type_url: CLUSTER.into(),
                version: r.version_info.clone(),
                nonce: r.nonce.clone()
            }]
        );
        assert_eq!(c.s.acked_version(CLUSTER), Some(r.version_info.as_str()));
        assert!(
            c.push(&snap).responses.is_empty(),
            "the same snapshot again sends nothing"
        );
    }

    #[test]
    fn s_t3_content_change_sends_all_clusters() {
        let snap1 = snap(CDS2);
        let mut c = Client::default();
        let r1 = one(&c.send(request(CLUSTER, &[], "", ""), &snap1)).clone();
        c.send(request(CLUSTER, &[], &r1.version_info, &r1.nonce), &snap1);
        let snap2 = snap(&[(CLUSTER, "c1", "1", None), (CLUSTER, "c2", "2", None)]);
        let out = c.push(&snap2);
        let r2 = one(&out);
        assert_eq!(names(r2), ["c1", "c2"], "full state: the unchanged c1 too");
        assert_eq!(r2.version_info, snap2.resources(CLUSTER).version());
        assert_ne!(r2.version_info, r1.version_info);
        assert_ne!(r2.nonce, r1.nonce);
    }

    /// S-T4/S-T5 setup: V1 acked, V2 sent with nonce N2.
    fn nack_setup() -> (Client, DiscoveryResponse, DiscoveryResponse) {
        let mut c = Client::default();
        let snap1 = snap(CDS2);
        let r1 = one(&c.send(request(CLUSTER, &[], "", ""), &snap1)).clone();
        c.send(request(CLUSTER, &[], &r1.version_info, &r1.nonce), &snap1);
        let r2 = one(&c.push(&snap(&[(CLUSTER, "c1", "bad", None)]))).clone();
        (c, r1, r2)
    }

    #[test]
    fn s_t4_nack_is_recorded_and_not_answered() {
        let (mut c, r1, r2) = nack_setup();
        let snap2 = snap(&[(CLUSTER, "c1", "bad", None)]);
        let out = c.send(
            nack(request(CLUSTER, &[], &r1.version_info, &r2.nonce), "c1: bad field"),
            &snap2,
        );
        assert!(out.responses.is_empty(), "S15: the rejected version is not sent again");
        assert_eq!(
            out.events,
            [Event::Nack {
                type_url: CLUSTER.into(),
                version: r2.version_info.clone(),
                nonce: r2.nonce.clone(),
                code: 3,
                message: "c1: bad field".into()
            }]
        );
        let n = c.s.last_nack(CLUSTER).unwrap();
        assert_eq!(
            (n.version.as_str(), n.message.as_str()),
            (r2.version_info.as_str(), "c1: bad field")
        );
        assert_eq!(
            c.s.acked_version(CLUSTER),
            Some(r1.version_info.as_str()),
            "still the old one"
        );
        assert!(!c.s.awaiting_ack(CLUSTER));
        // The same snapshot again, or the client asking again at the old
        // version with the same nonce, sends nothing either.
        assert!(c.push(&snap2).responses.is_empty());
        let out = c.send(request(CLUSTER, &[], &r1.version_info, &r2.nonce), &snap2);
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn s_t5_change_after_nack_is_sent_at_once() {
        let (mut c, r1, r2) = nack_setup();
        let snap2 = snap(&[(CLUSTER, "c1", "bad", None)]);
        c.send(nack(request(CLUSTER, &[], &r1.version_info, &r2.nonce), "no"), &snap2);
        let snap3 = snap(&[(CLUSTER, "c1", "fixed", None)]);
        let out = c.push(&snap3);
        let r3 = one(&out);
        assert_eq!(r3.version_info, snap3.resources(CLUSTER).version());
        assert_eq!(names(r3), ["c1"]);
    }

    #[test]
    fn s_t6_new_name_at_same_version_is_sent_and_resent_after_resubscribe() {
        let snap = snap(&[(CLA, "a", "1", None), (CLA, "b", "1", None)]);
        let mut c = Client::default();
        let r1 = one(&c.send(request(CLA, &["a"], "", ""), &snap)).clone();
        assert_eq!(names(&r1), ["a"]);
        let r2 = one(&c.send(request(CLA, &["a", "b"], &r1.version_info, &r1.nonce), &snap)).clone();
        assert!(names(&r2).contains(&"b".to_owned()));
        assert_eq!(
            r2.version_info, r1.version_info,
            "same version: only the subscription grew"
        );
        // Drop b (no response needed), then ask for it again: b is resent.
        let out = c.send(request(CLA, &["a"], &r2.version_info, &r2.nonce), &snap);
        assert!(out.responses.is_empty());
        let out = c.send(request(CLA, &["a", "b"], &r2.version_info, &r2.nonce), &snap);
        assert!(names(one(&out)).contains(&"b".to_owned()));
    }

    #[test]
    fn s_t7_stale_nonce_is_ignored() {
        let snap1 = snap(&[(CLA, "a", "1", None), (CLA, "b", "1", None)]);
        let mut c = Client::default();
        let r1 = one(&c.send(request(CLA, &["a"], "", ""), &snap1)).clone();
        c.send(request(CLA, &["a"], &r1.version_info, &r1.nonce), &snap1);
        let snap2 = snap(&[(CLA, "a", "2", None), (CLA, "b", "1", None)]);
        let r2 = one(&c.push(&snap2)).clone();
        // Written before r2 arrived: asks for b with r1's nonce.
        let out = c.send(request(CLA, &["a", "b"], &r1.version_info, &r1.nonce), &snap2);
        assert!(out.responses.is_empty());
        assert_eq!(
            out.events,
            [Event::Stale {
                type_url: CLA.into(),
                nonce: r1.nonce.clone()
            }]
        );
        assert_eq!(
            c.s.subscription(CLA).unwrap().names().len(),
            1,
            "the stale names were not applied"
        );
        assert!(c.s.awaiting_ack(CLA), "and it did not count as an ACK");
        // Any garbage nonce is stale too.
        assert!(
            c.send(request(CLA, &["a", "b"], "", "xyz"), &snap2)
                .responses
                .is_empty()
        );
        // With the right nonce the same request is served.
        let out = c.send(request(CLA, &["a", "b"], &r2.version_info, &r2.nonce), &snap2);
        assert_eq!(names(one(&out)), ["a", "b"]);
    }

    #[test]
    fn s_t8_unknown_nonce_on_a_new_stream_is_answered() {
        let snap = snap(CDS2);
        let mut c = Client::default();
        let out = c.send(request(CLUSTER, &[], "old-version", "nonce-from-last-stream"), &snap);
        assert_eq!(names(one(&out)), ["c1", "c2"]);
        assert!(
            !out.events
                .iter()
                .any(|e| matches!(e, Event::Stale { .. } | Event::Ack { .. }))
        );
    }

    #[test]
    fn s_t9_lds_legacy_wildcard_sequence() {
        let snap = snap(&[(LISTENER, "A", "1", None), (LISTENER, "B", "1", None)]);
        let mut c = Client::default();
        let state = |c: &Client| {
            let s = c.s.subscription(LISTENER).unwrap();
            (s.is_wildcard(), s.names().iter().cloned().collect::<Vec<_>>())
        };
        let r = one(&c.send(request(LISTENER, &[], "", ""), &snap)).clone();
        assert_eq!(state(&c), (true, vec![]));
        assert_eq!(names(&r), ["A", "B"]);
        let out = c.send(request(LISTENER, &["*", "A"], &r.version_info, &r.nonce), &snap);
        assert_eq!(state(&c), (true, strings(&["A"])));
        // A was named anew: S20 resends (full state: all of it).
        let r = one(&out).clone();
        assert_eq!(names(&r), ["A", "B"]);
        let out = c.send(request(LISTENER, &["A"], &r.version_info, &r.nonce), &snap);
        assert_eq!(state(&c), (false, strings(&["A"])));
        assert!(out.responses.is_empty(), "dropping the wildcard needs no answer");
        let out = c.send(request(LISTENER, &[], &r.version_info, &r.nonce), &snap);
        assert_eq!(state(&c), (false, vec![]), "empty now means nothing");
        assert!(out.responses.is_empty());
        assert!(!c.s.subscription(LISTENER).unwrap().legacy_wildcard_possible());
    }

    #[test]
    fn s_t10_deleted_named_listener_sends_response_without_it() {
        let mut c = Client::default();
        let snap1 = snap(&[(LISTENER, "x", "1", None), (LISTENER, "y", "1", None)]);
        let r1 = one(&c.send(request(LISTENER, &["x"], "", ""), &snap1)).clone();
        assert_eq!(names(&r1), ["x"]);
        c.send(request(LISTENER, &["x"], &r1.version_info, &r1.nonce), &snap1);
        let snap2 = snap(&[(LISTENER, "y", "1", None)]);
        let out = c.push(&snap2);
        let r2 = one(&out);
        assert!(r2.resources.is_empty());
        assert_ne!(r2.version_info, r1.version_info);
    }

    #[test]
    fn s_t11_rds_for_a_missing_name_waits_until_it_exists() {
        let mut c = Client::default();
        let snap1 = snap(&[(RDS, "other", "1", None)]);
        let out = c.send(request(RDS, &["r1"], "", ""), &snap1);
        assert!(out.responses.is_empty());
        assert!(c.push(&snap1).responses.is_empty());
        let snap2 = snap(&[(RDS, "other", "1", None), (RDS, "r1", "1", None)]);
        assert_eq!(names(one(&c.push(&snap2))), ["r1"]);
    }

    #[test]
    fn s_t12_reconnect_at_current_version() {
        let snap1 = snap(&[
            (CLUSTER, "c1", "1", None),
            (LISTENER, "l1", "1", None),
            (CLA, "c1", "1", None),
            (CLUSTER, "c2", "1", None),
        ]);
        let mut c = Client::default();
        let cds = snap1.resources(CLUSTER).version().to_owned();
        let lds = snap1.resources(LISTENER).version().to_owned();
        let eds = snap1.resources(CLA).version().to_owned();
        assert!(
            c.send(request(CLUSTER, &[], &cds, "n-old"), &snap1)
                .responses
                .is_empty()
        );
        assert!(c.send(request(LISTENER, &[], &lds, ""), &snap1).responses.is_empty());
        let out = c.send(request(CLA, &["c1"], &eds, "n-old"), &snap1);
        assert_eq!(names(one(&out)), ["c1"], "named types are always answered");
        // An older version, or names beside the wildcard, are answered.
        let mut c = Client::default();
        assert_eq!(
            one(&c.send(request(CLUSTER, &[], "stale", ""), &snap1)).resources.len(),
            2
        );
        let mut c = Client::default();
        assert_eq!(
            one(&c.send(request(CLUSTER, &["*", "c1"], &cds, ""), &snap1))
                .resources
                .len(),
            2
        );
        // And a later change still goes out on the resumed stream.
        let mut c = Client::default();
        c.send(request(CLUSTER, &[], &cds, ""), &snap1);
        let snap2 = snap(&[(CLUSTER, "c1", "2", None)]);
        assert_eq!(names(one(&c.push(&snap2))), ["c1"]);
    }

    #[test]
    fn s_t13_response_invariants_over_many_types() {
        // Client::check runs on every response of every test; this one just
        // makes many at once.
        let entries: Vec<Entry<'_>> = [SECRET, CLUSTER, CLA, ECDS, LISTENER, RDS, SLUICE_POLICY]
            .iter()
            .flat_map(|t| [(*t, "a", "1", None), (*t, "b", "1", None)])
            .collect();
        let snap1 = snap(&entries);
        let mut c = Client::default();
        for t in [SECRET, CLUSTER, CLA, ECDS, LISTENER, RDS, SLUICE_POLICY] {
            c.send(request(t, &["a", "b", "a"], "", ""), &snap1);
        }
        assert_eq!(c.nonces.len(), 7);
    }

    #[test]
    fn s_t14_request_without_type_url_is_an_error() {
        let mut s = SotwStream::new();
        let err = s
            .on_request(request("", &[], "", ""), &Snapshot::default())
            .unwrap_err();
        assert_eq!(err, ProtocolError::MissingTypeUrl);
    }

    #[test]
    fn s7_nack_is_told_by_error_detail_not_by_version() {
        // [A] v1/n1, ACK; [A,B] at v1/n1; B sent at v1/n2; B rejected at v1/n2.
        let snap = snap(&[(RDS, "A", "1", None), (RDS, "B", "1", None)]);
        let mut c = Client::default();
        let r1 = one(&c.send(request(RDS, &["A"], "", ""), &snap)).clone();
        c.send(request(RDS, &["A"], &r1.version_info, &r1.nonce), &snap);
        let r2 = one(&c.send(request(RDS, &["A", "B"], &r1.version_info, &r1.nonce), &snap)).clone();
        assert_eq!(r2.version_info, r1.version_info);
        let out = c.send(
            nack(request(RDS, &["A", "B"], &r1.version_info, &r2.nonce), "B invalid"),
            &snap,
        );
        assert!(
            matches!(out.events.as_slice(), [Event::Nack { .. }]),
            "{:?}",
            out.events
        );
        assert!(out.responses.is_empty());
    }

    #[test]
    fn s13_one_unacknowledged_response_per_type() {
        let mut c = Client::default();
        let r1 = one(&c.send(request(CLUSTER, &[], "", ""), &snap(&[(CLUSTER, "c1", "1", None)]))).clone();
        // Two changes before the ACK: nothing goes out...
        assert!(c.push(&snap(&[(CLUSTER, "c1", "2", None)])).responses.is_empty());
        let latest = snap(&[(CLUSTER, "c1", "3", None)]);
        assert!(c.push(&latest).responses.is_empty());
        // ...until the ACK, which brings the latest only.
        let out = c.send(request(CLUSTER, &[], &r1.version_info, &r1.nonce), &latest);
        assert_eq!(one(&out).version_info, latest.resources(CLUSTER).version());
    }

    #[test]
    fn s13_envoy_3355_no_push_for_a_dropped_name() {
        // EDS [a,b] acked; the client drops b (its cluster went away); then b
        // changes. Nothing may be sent for b, so the client is never handed a
        // response that no watcher consumes.
        let snap1 = snap(&[(CLA, "a", "1", None), (CLA, "b", "1", None)]);
        let mut c = Client::default();
        let r1 = one(&c.send(request(CLA, &["a", "b"], "", ""), &snap1)).clone();
        c.send(request(CLA, &["a", "b"], &r1.version_info, &r1.nonce), &snap1);
        assert!(
            c.send(request(CLA, &["a"], &r1.version_info, &r1.nonce), &snap1)
                .responses
                .is_empty()
        );
        let snap2 = snap(&[(CLA, "a", "1", None), (CLA, "b", "2", None)]);
        assert!(c.push(&snap2).responses.is_empty());
        // And the client's next request, still carrying n1, is current.
        let out = c.send(request(CLA, &["a"], &r1.version_info, &r1.nonce), &snap2);
        assert!(!out.events.iter().any(|e| matches!(e, Event::Stale { .. })));
    }

    #[test]
    fn s18_deleting_a_non_full_state_resource_sends_nothing() {
        let mut c = Client::default();
        let snap1 = snap(&[(CLA, "a", "1", None), (CLA, "b", "1", None)]);
        let r1 = one(&c.send(request(CLA, &["a", "b"], "", ""), &snap1)).clone();
        c.send(request(CLA, &["a", "b"], &r1.version_info, &r1.nonce), &snap1);
        assert!(c.push(&snap(&[(CLA, "a", "1", None)])).responses.is_empty());
        // The next real change carries what exists.
        assert_eq!(names(one(&c.push(&snap(&[(CLA, "a", "2", None)])))), ["a"]);
    }

    #[test]
    fn s20_new_name_after_a_nack_is_answered() {
        let snap = snap(&[(RDS, "A", "bad", None), (RDS, "B", "1", None)]);
        let mut c = Client::default();
        let r1 = one(&c.send(request(RDS, &["A"], "", ""), &snap)).clone();
        let out = c.send(nack(request(RDS, &["A", "B"], "", &r1.nonce), "A invalid"), &snap);
        let r2 = one(&out);
        assert!(names(r2).contains(&"B".to_owned()));
    }

    #[test]
    fn s26_unsubscribing_needs_no_response() {
        let snap = snap(&[(LISTENER, "a", "1", None), (LISTENER, "b", "1", None)]);
        let mut c = Client::default();
        let r = one(&c.send(request(LISTENER, &["a", "b"], "", ""), &snap)).clone();
        assert!(
            c.send(request(LISTENER, &["a"], &r.version_info, &r.nonce), &snap)
                .responses
                .is_empty()
        );
        assert!(
            c.send(request(LISTENER, &[], &r.version_info, &r.nonce), &snap)
                .responses
                .is_empty()
        );
        assert!(c.push(&snap).responses.is_empty());
    }

    #[test]
    fn n3_node_comes_from_the_first_request() {
        let snap = snap(CDS2);
        let mut s = SotwStream::new();
        let mut first = request(CLUSTER, &[], "", "");
        first.node = None;
        assert_eq!(s.identify(&first).unwrap_err(), ProtocolError::MissingNode);
        assert_eq!(s.on_request(first, &snap).unwrap_err(), ProtocolError::MissingNode);
        let mut empty_id = request(CLUSTER, &[], "", "");
        empty_id.node = Some(Node::default());
        assert_eq!(s.on_request(empty_id, &snap).unwrap_err(), ProtocolError::EmptyNodeId);

        let mut s = SotwStream::new();
        assert_eq!(s.identify(&request(CLUSTER, &[], "", "")).unwrap().id, "proxy-1");
        let r = one(&s.on_request(request(CLUSTER, &[], "", ""), &snap).unwrap()).clone();
        let mut later = request(LISTENER, &[], "", "");
        later.node = None;
        s.on_request(later, &snap).unwrap();
        let mut other = request(CLUSTER, &[], &r.version_info, &r.nonce);
        other.node = Some(Node {
            id: "someone-else".into(),
            ..Default::default()
        });
        s.on_request(other, &snap).unwrap();
        assert_eq!(s.node().unwrap().id, "proxy-1");
    }

    #[test]
    fn d17_resource_locators_are_refused() {
        let mut s = SotwStream::new();
        let mut req = request(CLA, &[], "", "");
        req.resource_locators.push(Default::default());
        assert!(matches!(
            s.on_request(req, &Snapshot::default()),
            Err(ProtocolError::ResourceLocatorsUnsupported { .. })
        ));
    }

    #[test]
    fn unknown_type_is_kept_and_served_when_it_appears() {
        let t = "type.googleapis.com/example.Unknown";
        let mut c = Client::default();
        let out = c.send(request(t, &["u"], "", ""), &Snapshot::default());
        assert!(out.responses.is_empty());
        assert!(
            c.send(request(t, &[], "", ""), &Snapshot::default())
                .responses
                .is_empty()
        );
        assert!(!c.s.subscription(t).unwrap().is_wildcard(), "no legacy wildcard for it");
        c.send(request(t, &["u"], "", ""), &Snapshot::default());
        assert_eq!(names(one(&c.push(&snap(&[(t, "u", "1", None)])))), ["u"]);
    }

    #[test]
    fn sluice_types_are_full_state_and_wildcard_capable() {
        let mut c = Client::default();
        let out = c.send(request(SLUICE_WEB_GROUP, &[], "", ""), &Snapshot::default());
        assert!(one(&out).resources.is_empty(), "an empty first answer, like LDS/CDS");
        let r = one(&out).clone();
        c.send(
            request(SLUICE_WEB_GROUP, &[], &r.version_info, &r.nonce),
            &Snapshot::default(),
        );
        let snap1 = snap(&[(SLUICE_WEB_GROUP, "g1", "1", None), (SLUICE_WEB_GROUP, "g2", "1", None)]);
        let r = one(&c.push(&snap1)).clone();
        assert_eq!(names(&r), ["g1", "g2"]);
        c.send(request(SLUICE_WEB_GROUP, &[], &r.version_info, &r.nonce), &snap1);
        let out = c.push(&snap(&[(SLUICE_WEB_GROUP, "g2", "1", None)]));
        assert_eq!(names(one(&out)), ["g2"], "a deletion is a response without it");
    }

    /// Acknowledges every response in `out`, asking for the same names.
    fn ack_all(c: &mut Client, out: &Output<DiscoveryResponse>, names_by_type: &[(&str, &[&str])], snap: &Snapshot) {
        for r in &out.responses {
            let names = names_by_type
                .iter()
                .find(|(t, _)| *t == r.type_url)
                .map(|(_, n)| *n)
                .unwrap_or(&[]);
            c.send(request(&r.type_url, names, &r.version_info, &r.nonce), snap);
        }
    }

    #[test]
    fn a_t4_one_change_set_goes_out_in_a4_order() {
        let types = [SLUICE_POLICY, RDS, LISTENER, ECDS, CLA, CLUSTER, SECRET];
        let subs: Vec<(&str, &[&str])> = types.iter().map(|t| (*t, &["a"][..])).collect();
        let v1: Vec<Entry<'_>> = types.iter().map(|t| (*t, "a", "1", None)).collect();
        let snap1 = snap(&v1);
        let mut c = Client::default();
        // Subscribe in the "wrong" order.
        let mut first = Output::default();
        for t in types {
            first
                .responses
                .extend(c.send(request(t, &["a"], "", ""), &snap1).responses);
        }
        ack_all(&mut c, &first, &subs, &snap1);
        let v2: Vec<Entry<'_>> = types.iter().map(|t| (*t, "a", "2", None)).collect();
        let out = c.push(&snap(&v2));
        let got: Vec<&str> = out.responses.iter().map(|r| r.type_url.as_str()).collect();
        assert_eq!(got, [SECRET, CLUSTER, CLA, ECDS, LISTENER, RDS, SLUICE_POLICY]);
    }

    #[test]
    fn a3_a_blocked_type_holds_back_later_types() {
        let snap1 = snap(&[(CLUSTER, "x", "1", None), (RDS, "r", "to-x", None)]);
        let mut c = Client::default();
        let cds1 = one(&c.send(request(CLUSTER, &[], "", ""), &snap1)).clone();
        let rds1 = one(&c.send(request(RDS, &["r"], "", ""), &snap1)).clone();
        c.send(request(RDS, &["r"], &rds1.version_info, &rds1.nonce), &snap1);
        // CDS{x} is not acked yet; the route moves to y, which needs CDS{x,y}.
        let snap2 = snap(&[
            (CLUSTER, "x", "1", None),
            (CLUSTER, "y", "1", None),
            (RDS, "r", "to-y", None),
        ]);
        assert!(
            c.push(&snap2).responses.is_empty(),
            "RDS must not overtake the held CDS"
        );
        let out = c.send(request(CLUSTER, &[], &cds1.version_info, &cds1.nonce), &snap2);
        let got: Vec<&str> = out.responses.iter().map(|r| r.type_url.as_str()).collect();
        assert_eq!(got, [CLUSTER, RDS]);
        // A type with nothing pending holds nothing back.
        let rds2 = out.responses[1].clone();
        c.send(request(RDS, &["r"], &rds2.version_info, &rds2.nonce), &snap2);
        let snap3 = snap(&[
            (CLUSTER, "x", "1", None),
            (CLUSTER, "y", "1", None),
            (RDS, "r", "to-x", None),
        ]);
        assert!(c.s.awaiting_ack(CLUSTER));
        assert_eq!(one(&c.push(&snap3)).type_url, RDS);
    }

    #[test]
    fn a7_changed_cluster_gets_its_unchanged_cla_again() {
        let snap1 = snap(&[(CLUSTER, "c1", "1", Some("c1-eds")), (CLA, "c1-eds", "1", None)]);
        let mut c = Client::default();
        let cds = one(&c.send(request(CLUSTER, &[], "", ""), &snap1)).clone();
        c.send(request(CLUSTER, &[], &cds.version_info, &cds.nonce), &snap1);
        let eds = one(&c.send(request(CLA, &["c1-eds"], "", ""), &snap1)).clone();
        c.send(request(CLA, &["c1-eds"], &eds.version_info, &eds.nonce), &snap1);
        // The cluster changes (say, a connect timeout); its CLA does not.
        let snap2 = snap(&[(CLUSTER, "c1", "2", Some("c1-eds")), (CLA, "c1-eds", "1", None)]);
        let out = c.push(&snap2);
        let got: Vec<&str> = out.responses.iter().map(|r| r.type_url.as_str()).collect();
        assert_eq!(got, [CLUSTER, CLA], "CDS, then the CLA that ends its warming");
        let eds2 = &out.responses[1];
        assert_eq!(names(eds2), ["c1-eds"]);
        assert_ne!(
            eds2.version_info, eds.version_info,
            "bumped, so it cannot pass for a repeat"
        );
        // Once sent, it is not owed any more.
        ack_all(&mut c, &out, &[(CLUSTER, &[]), (CLA, &["c1-eds"])], &snap2);
        assert!(c.push(&snap2).responses.is_empty());
    }

    #[test]
    fn a7_unchanged_cluster_owes_nothing() {
        let snap1 = snap(&[
            (CLUSTER, "c1", "1", Some("c1")),
            (CLUSTER, "c2", "1", Some("c2")),
            (CLA, "c1", "1", None),
            (CLA, "c2", "1", None),
        ]);
        let mut c = Client::default();
        let cds = one(&c.send(request(CLUSTER, &[], "", ""), &snap1)).clone();
        c.send(request(CLUSTER, &[], &cds.version_info, &cds.nonce), &snap1);
        let eds = one(&c.send(request(CLA, &["c1", "c2"], "", ""), &snap1)).clone();
        c.send(request(CLA, &["c1", "c2"], &eds.version_info, &eds.nonce), &snap1);
        // Only c2 changes: CDS (full state) carries both, EDS only follows
        // because of c2, and the response is all subscribed CLAs.
        let snap2 = snap(&[
            (CLUSTER, "c1", "1", Some("c1")),
            (CLUSTER, "c2", "2", Some("c2")),
            (CLA, "c1", "1", None),
            (CLA, "c2", "1", None),
        ]);
        let out = c.push(&snap2);
        assert_eq!(out.responses.len(), 2);
        // A CDS change that touches no EDS cluster sends no CLA.
        ack_all(&mut c, &out, &[(CLUSTER, &[]), (CLA, &["c1", "c2"])], &snap2);
        let mut entries: Vec<Entry<'_>> = vec![
            (CLUSTER, "c1", "1", Some("c1")),
            (CLUSTER, "c2", "2", Some("c2")),
            (CLA, "c1", "1", None),
            (CLA, "c2", "1", None),
        ];
        entries.push((CLUSTER, "static", "1", None));
        let out = c.push(&snap(&entries));
        assert_eq!(one(&out).type_url, CLUSTER);
    }

    #[test]
    fn a7_new_cluster_cla_is_sent_once_subscribed() {
        let snap1 = snap(&[(CLUSTER, "c1", "1", Some("c1")), (CLA, "c1", "1", None)]);
        let mut c = Client::default();
        let cds = one(&c.send(request(CLUSTER, &[], "", ""), &snap1)).clone();
        // Envoy asks for the CLA after processing CDS.
        let eds_out = c.send(request(CLA, &["c1"], "", ""), &snap1);
        assert_eq!(names(one(&eds_out)), ["c1"]);
        c.send(request(CLUSTER, &[], &cds.version_info, &cds.nonce), &snap1);
        assert!(c.push(&snap1).responses.is_empty());
    }

    #[test]
    fn a7_warming_cla_waits_for_the_eds_ack_and_holds_lds() {
        let snap1 = snap(&[
            (CLUSTER, "c1", "1", Some("c1")),
            (CLA, "c1", "1", None),
            (LISTENER, "l", "1", None),
        ]);
        let mut c = Client::default();
        let cds = one(&c.send(request(CLUSTER, &[], "", ""), &snap1)).clone();
        c.send(request(CLUSTER, &[], &cds.version_info, &cds.nonce), &snap1);
        let eds = one(&c.send(request(CLA, &["c1"], "", ""), &snap1)).clone();
        let lds = one(&c.send(request(LISTENER, &[], "", ""), &snap1)).clone();
        c.send(request(LISTENER, &[], &lds.version_info, &lds.nonce), &snap1);
        // EDS not acked yet. The cluster and the listener change.
        let snap2 = snap(&[
            (CLUSTER, "c1", "2", Some("c1")),
            (CLA, "c1", "1", None),
            (LISTENER, "l", "2", None),
        ]);
        let out = c.push(&snap2);
        let got: Vec<&str> = out.responses.iter().map(|r| r.type_url.as_str()).collect();
        assert_eq!(
            got,
            [CLUSTER],
            "the owed CLA waits for the EDS ACK, and LDS waits behind it"
        );
        let out = c.send(request(CLA, &["c1"], &eds.version_info, &eds.nonce), &snap2);
        let got: Vec<&str> = out.responses.iter().map(|r| r.type_url.as_str()).collect();
        assert_eq!(got, [CLA, LISTENER]);
    }
}
