//! Incremental ADS (`DeltaAggregatedResources`) for one stream.
//!
//! A Delta response carries only what changed for the client: resources it
//! does not hold at their current version, and the names of resources it
//! holds that are gone (`removed_resources`). The core keeps, per type, the
//! version of every resource it believes the client holds; a resource sent
//! counts as held whether it was ACKed or NACKed (D13). Unlike SotW, a
//! request is never thrown away for its nonce: the nonce only ties an
//! ACK/NACK to a response (D12).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource as DeltaResource,
};

use super::subscription::Subscription;
use super::{Event, Nack, NodeSlot, Nonces, Output, ProtocolError, answer, check_request, order, subscribed_event};
use crate::snapshot::{Resource, Snapshot, TypeResources, type_url};

/// One type on one Delta stream.
#[derive(Debug, Default)]
struct TypeState {
    sub: Subscription,
    /// A request of this type has been seen on the stream.
    seen: bool,
    /// The nonce and `system_version_info` of the last response of this type.
    last_sent: Option<(String, String)>,
    /// That response is not acknowledged yet. As in SotW, one response per
    /// type is outstanding at most: it keeps a slow client from being
    /// flooded and lets the type order hold (A3/A4).
    awaiting: bool,
    /// Name → version of what the client is believed to hold, limited to
    /// what it is subscribed to.
    has: BTreeMap<String, String>,
    /// Names the next response must speak about whatever the client holds:
    /// in `resources` if they exist, in `removed_resources` if not. Filled by
    /// explicit subscriptions (D4, D16) and by unsubscribing a name that the
    /// wildcard still covers (D6).
    forced: BTreeSet<String>,
    /// Wildcard subscription: the first request is answered even when there
    /// is nothing, so a client waiting for its first LDS/CDS answer can go on.
    answer_owed: bool,
    acked_version: Option<String>,
    last_nack: Option<Nack>,
}

/// The protocol state of one Delta ADS stream.
///
/// Same use as [`super::SotwStream`]: feed it every request and every new
/// snapshot of the node, both with the node's current snapshot, and send
/// what it returns, in order.
#[derive(Debug, Default)]
pub struct DeltaStream {
    node: NodeSlot,
    nonces: Nonces,
    types: BTreeMap<String, TypeState>,
    /// ClusterLoadAssignment names owed a response because a cluster that
    /// uses them was just added or changed (A7).
    warming: BTreeSet<String>,
}

impl DeltaStream {
    /// A stream that has received nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the node of the stream from a request and returns it; see
    /// [`super::SotwStream::identify`].
    pub fn identify(&mut self, req: &DeltaDiscoveryRequest) -> Result<&Node, ProtocolError> {
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
        req: DeltaDiscoveryRequest,
        snap: &Snapshot,
    ) -> Result<Output<DeltaDiscoveryResponse>, ProtocolError> {
        let locators = !req.resource_locators_subscribe.is_empty() || !req.resource_locators_unsubscribe.is_empty();
        check_request(&req.type_url, locators)?;
        self.node.identify(req.node.as_ref())?;
        let mut out = Output::default();
        let wildcard_capable = order::is_full_state(&req.type_url);
        let st = self.types.entry(req.type_url.clone()).or_default();

        // D11: a nonce with error_detail is a NACK, without it an ACK, no
        // nonce is a spontaneous subscription change.
        if !req.response_nonce.is_empty() {
            match &st.last_sent {
                Some((nonce, version)) if *nonce == req.response_nonce => {
                    if st.awaiting {
                        st.awaiting = false;
                        let (event, nack) = answer(&req.type_url, nonce, version, version, req.error_detail.as_ref());
                        match nack {
                            Some(nack) => st.last_nack = Some(nack),
                            None => st.acked_version = Some(version.clone()),
                        }
                        out.events.push(event);
                    }
                }
                // D12: reported, but the subscription change below is applied.
                _ => out.events.push(Event::Stale {
                    type_url: req.type_url.clone(),
                    nonce: req.response_nonce.clone(),
                }),
            }
        }

        let first = !st.seen;
        st.seen = true;
        if first {
            // D14: a reconnecting client says what it holds. Only the first
            // request of a type on a stream may carry this.
            st.has.extend(req.initial_resource_versions);
        }
        let before = st.sub.clone();
        let change = st.sub.apply_delta(
            &req.resource_names_subscribe,
            &req.resource_names_unsubscribe,
            wildcard_capable,
        );
        if first || st.sub.is_wildcard() != before.is_wildcard() || st.sub.names() != before.names() {
            out.events.push(subscribed_event(&req.type_url, &st.sub));
        }
        for name in change.subscribed {
            // D4: a subscribed name is answered even if the client should
            // hold it, except on the first request when the client has just
            // told us its version (D15, Envoy re-lists known names).
            if !(first && st.has.contains_key(&name)) {
                st.forced.insert(name);
            }
        }
        for name in change.unsubscribed {
            if st.sub.is_wildcard() {
                // D6: still covered by `*`, the client must hear whether it
                // exists; it may have dropped its copy.
                st.forced.insert(name);
            } else {
                st.forced.remove(&name);
            }
        }
        // What the client no longer asks for it drops by itself (D5 needs no
        // response, and unsubscribing `*` leaves the explicit names only).
        let sub = &st.sub;
        st.has.retain(|n, _| sub.covers(n));
        st.forced.retain(|n| sub.covers(n));
        if first && sub.is_wildcard() {
            st.answer_owed = true;
        }

        out.responses = self.flush(snap);
        Ok(out)
    }

    /// The node's snapshot changed. Returns the responses to send now.
    pub fn on_snapshot(&mut self, snap: &Snapshot) -> Output<DeltaDiscoveryResponse> {
        Output {
            responses: self.flush(snap),
            events: Vec::new(),
        }
    }

    /// The client's subscription to `type_url`, if it has asked for the type.
    pub fn subscription(&self, type_url: &str) -> Option<&Subscription> {
        self.types.get(type_url).map(|t| &t.sub)
    }

    /// The `system_version_info` of the last response of `type_url` the
    /// client acknowledged on this stream.
    pub fn acked_version(&self, type_url: &str) -> Option<&str> {
        self.types.get(type_url).and_then(|t| t.acked_version.as_deref())
    }

    /// The last rejection of `type_url` on this stream.
    pub fn last_nack(&self, type_url: &str) -> Option<&Nack> {
        self.types.get(type_url).and_then(|t| t.last_nack.as_ref())
    }

    /// Whether a response of `type_url` waits for its ACK/NACK.
    pub fn awaiting_ack(&self, type_url: &str) -> bool {
        self.types.get(type_url).is_some_and(|t| t.awaiting)
    }

    /// Name → version of the resources of `type_url` the client is believed
    /// to hold.
    pub fn client_resources(&self, type_url: &str) -> Option<&BTreeMap<String, String>> {
        self.types.get(type_url).map(|t| &t.has)
    }

    /// Sends what each type has to send, in make-before-break order; a type
    /// held back by an unacknowledged response holds back the types after it
    /// (see [`super::SotwStream`]).
    fn flush(&mut self, snap: &Snapshot) -> Vec<DeltaDiscoveryResponse> {
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
            let Some(plan) = plan(st, tr, owed) else { continue };
            if held || st.awaiting {
                held = true;
                continue;
            }
            let nonce = self.nonces.next();
            let version = tr.version().to_owned();
            let mut resources = Vec::with_capacity(plan.resources.len());
            for r in &plan.resources {
                let changed = st.has.get(&r.name) != Some(&r.version);
                if url == type_url::CLUSTER && changed {
                    self.warming.extend(r.eds_name.iter().cloned());
                }
                if url == type_url::CLUSTER_LOAD_ASSIGNMENT {
                    self.warming.remove(&r.name);
                }
                st.has.insert(r.name.clone(), r.version.clone());
                resources.push(DeltaResource {
                    name: r.name.clone(),
                    version: r.version.clone(),
                    resource: Some(r.body.clone()),
                    ..Default::default()
                });
            }
            for name in &plan.removed {
                st.has.remove(name);
            }
            st.forced.clear();
            st.answer_owed = false;
            st.awaiting = true;
            st.last_sent = Some((nonce.clone(), version.clone()));
            responses.push(DeltaDiscoveryResponse {
                system_version_info: version,
                resources,
                type_url: url,
                removed_resources: plan.removed,
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
    removed: Vec<String>,
}

fn plan(st: &TypeState, tr: &TypeResources, owed: &BTreeSet<String>) -> Option<Plan> {
    if !st.seen {
        return None;
    }
    let covered: Vec<_> = if st.sub.is_wildcard() {
        tr.iter().collect()
    } else {
        st.sub.names().iter().filter_map(|n| tr.get(n)).collect()
    };
    let resources: Vec<_> = covered
        .into_iter()
        .filter(|r| st.forced.contains(&r.name) || owed.contains(&r.name) || st.has.get(&r.name) != Some(&r.version))
        .cloned()
        .collect();
    // Gone: held by the client but no longer in the snapshot (D17, D14), or
    // asked about and not there (D16, D6).
    let removed: BTreeSet<String> = st
        .has
        .keys()
        .chain(st.forced.iter())
        .filter(|n| !tr.contains(n))
        .cloned()
        .collect();
    let send = !resources.is_empty() || !removed.is_empty() || st.answer_owed;
    send.then(|| Plan {
        resources,
        removed: removed.into_iter().collect(),
    })
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use envoy_types::pb::google::rpc::Status;

    use super::*;
    use crate::ads::testutil::{Entry, name_of, node, snap, strings};
    use crate::snapshot::type_url::{
        CLUSTER, CLUSTER_LOAD_ASSIGNMENT as CLA, LISTENER, ROUTE_CONFIGURATION as RDS, SECRET,
    };

    fn request(t: &str, subscribe: &[&str], unsubscribe: &[&str], nonce: &str) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            node: Some(node()),
            type_url: t.to_owned(),
            resource_names_subscribe: strings(subscribe),
            resource_names_unsubscribe: strings(unsubscribe),
            response_nonce: nonce.to_owned(),
            ..Default::default()
        }
    }

    fn ack(t: &str, nonce: &str) -> DeltaDiscoveryRequest {
        request(t, &[], &[], nonce)
    }

    /// A client: a stream plus the checks of D-T12 on every response.
    #[derive(Default)]
    struct Client {
        s: DeltaStream,
        nonces: HashSet<String>,
    }

    impl Client {
        fn send(&mut self, req: DeltaDiscoveryRequest, snap: &Snapshot) -> Output<DeltaDiscoveryResponse> {
            let out = self.s.on_request(req, snap).unwrap();
            self.check(&out.responses);
            out
        }

        fn push(&mut self, snap: &Snapshot) -> Output<DeltaDiscoveryResponse> {
            let out = self.s.on_snapshot(snap);
            self.check(&out.responses);
            out
        }

        /// D-T12: a unique nonce on every response; each resource of the
        /// response's type, named and versioned; no name twice.
        fn check(&mut self, responses: &[DeltaDiscoveryResponse]) {
            for r in responses {
                assert!(!r.nonce.is_empty(), "empty nonce");
                assert!(self.nonces.insert(r.nonce.clone()), "nonce {} reused", r.nonce);
                let mut names = HashSet::new();
                for res in &r.resources {
                    let any = res.resource.as_ref().unwrap();
                    assert_eq!(any.type_url, r.type_url);
                    assert_eq!(name_of(any), res.name);
                    assert!(!res.version.is_empty());
                    assert!(names.insert(res.name.clone()), "duplicate {}", res.name);
                }
                for n in &r.removed_resources {
                    assert!(names.insert(n.clone()), "{n} both sent and removed");
                }
            }
        }
    }

    fn one(out: &Output<DeltaDiscoveryResponse>) -> &DeltaDiscoveryResponse {
        assert_eq!(out.responses.len(), 1, "expected one response, got {:?}", out.responses);
        &out.responses[0]
    }

    fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
        r.resources.iter().map(|r| r.name.as_str()).collect()
    }

    fn removed(r: &DeltaDiscoveryResponse) -> Vec<&str> {
        r.removed_resources.iter().map(String::as_str).collect()
    }

    const CDS3: &[Entry<'static>] = &[
        (CLUSTER, "c1", "1", None),
        (CLUSTER, "c2", "1", None),
        (CLUSTER, "c3", "1", None),
    ];

    /// A wildcard CDS client that holds and has acked `snap`.
    fn synced(snap: &Snapshot) -> Client {
        let mut c = Client::default();
        let r = one(&c.send(request(CLUSTER, &[], &[], ""), snap)).clone();
        c.send(ack(CLUSTER, &r.nonce), snap);
        c
    }

    #[test]
    fn d_t1_empty_subscribe_gets_all_clusters_with_versions() {
        let snap = snap(CDS3);
        let mut c = Client::default();
        let out = c.send(request(CLUSTER, &[], &[], ""), &snap);
        let r = one(&out);
        assert_eq!(names(r), ["c1", "c2", "c3"]);
        for res in &r.resources {
            assert_eq!(res.version, snap.resources(CLUSTER).get(&res.name).unwrap().version);
        }
        assert!(r.removed_resources.is_empty());
        assert_eq!(r.system_version_info, snap.resources(CLUSTER).version());
    }

    #[test]
    fn d_t2_one_changed_cluster_goes_alone() {
        let mut c = synced(&snap(CDS3));
        assert_eq!(
            c.s.acked_version(CLUSTER),
            Some(snap(CDS3).resources(CLUSTER).version())
        );
        let snap2 = snap(&[
            (CLUSTER, "c1", "1", None),
            (CLUSTER, "c2", "2", None),
            (CLUSTER, "c3", "1", None),
        ]);
        let out = c.push(&snap2);
        assert_eq!(names(one(&out)), ["c2"]);
        assert!(one(&out).removed_resources.is_empty());
    }

    #[test]
    fn d_t3_deleted_cluster_is_removed() {
        let mut c = synced(&snap(CDS3));
        let out = c.push(&snap(&[(CLUSTER, "c1", "1", None), (CLUSTER, "c3", "1", None)]));
        let r = one(&out);
        assert!(r.resources.is_empty());
        assert_eq!(removed(r), ["c2"]);
        assert!(!c.s.client_resources(CLUSTER).unwrap().contains_key("c2"));
    }

    #[test]
    fn d_t4_subscribed_name_is_resent_even_if_held() {
        let snap = snap(&[(CLA, "x", "1", None)]);
        let mut c = Client::default();
        let r = one(&c.send(request(CLA, &["x"], &[], ""), &snap)).clone();
        c.send(ack(CLA, &r.nonce), &snap);
        let out = c.send(request(CLA, &["x"], &[], ""), &snap);
        assert_eq!(names(one(&out)), ["x"]);
    }

    #[test]
    fn d_t5_unsubscribing_a_name_never_subscribed_is_silent() {
        let snap = snap(&[(CLA, "x", "1", None)]);
        let mut c = Client::default();
        let r = one(&c.send(request(CLA, &["x"], &[], ""), &snap)).clone();
        c.send(ack(CLA, &r.nonce), &snap);
        let out = c.send(request(CLA, &[], &["y"], ""), &snap);
        assert!(out.is_empty(), "{out:?}");
        // Unsubscribing a held name needs no response either.
        let out = c.send(request(CLA, &[], &["x"], ""), &snap);
        assert!(out.responses.is_empty());
        assert!(c.s.client_resources(CLA).unwrap().is_empty());
    }

    #[test]
    fn d_t6_unsubscribing_a_name_the_wildcard_covers() {
        // `*` + e2 (exists) + e4 (does not); unsubscribe both.
        let snap = snap(&[(CLA, "e1", "1", None), (CLA, "e2", "1", None)]);
        let mut c = Client::default();
        let out = c.send(request(CLA, &["*", "e2", "e4"], &[], ""), &snap);
        let r = one(&out).clone();
        assert_eq!(names(&r), ["e1", "e2"]);
        assert_eq!(removed(&r), ["e4"], "D16");
        c.send(ack(CLA, &r.nonce), &snap);
        let out = c.send(request(CLA, &[], &["e2", "e4"], ""), &snap);
        let r = one(&out);
        assert_eq!(names(r), ["e2"], "still in the wildcard: resent");
        assert_eq!(removed(r), ["e4"], "not in it: removed");
    }

    #[test]
    fn d_t6_unsubscribed_name_deleted_meanwhile_is_removed() {
        let snap1 = snap(&[(CLA, "e1", "1", None), (CLA, "e2", "1", None)]);
        let mut c = Client::default();
        let r = one(&c.send(request(CLA, &["*", "e2"], &[], ""), &snap1)).clone();
        let snap2 = snap(&[(CLA, "e1", "1", None)]);
        // Deleted and unsubscribed before the ACK.
        let out = c.send(request(CLA, &[], &["e2"], &r.nonce), &snap2);
        let r = one(&out);
        assert!(r.resources.is_empty());
        assert_eq!(removed(r), ["e2"]);
    }

    #[test]
    fn d_t7_legacy_wildcard_sequence() {
        let snap1 = snap(&[(LISTENER, "A", "1", None), (LISTENER, "B", "1", None)]);
        let mut c = Client::default();
        let state = |c: &Client| {
            let s = c.s.subscription(LISTENER).unwrap();
            (s.is_wildcard(), s.names().iter().cloned().collect::<Vec<_>>())
        };
        let r = one(&c.send(request(LISTENER, &[], &[], ""), &snap1)).clone();
        assert_eq!(state(&c), (true, vec![]));
        assert_eq!(names(&r), ["A", "B"]);
        let r = one(&c.send(request(LISTENER, &["A"], &[], &r.nonce), &snap1)).clone();
        assert_eq!(state(&c), (true, strings(&["A"])));
        assert_eq!(names(&r), ["A"], "D4: the named one is resent");
        let out = c.send(request(LISTENER, &[], &["*"], &r.nonce), &snap1);
        assert_eq!(state(&c), (false, strings(&["A"])));
        assert!(out.responses.is_empty());
        assert_eq!(
            c.s.client_resources(LISTENER).unwrap().keys().collect::<Vec<_>>(),
            ["A"]
        );
        let out = c.send(request(LISTENER, &[], &["A"], ""), &snap1);
        assert_eq!(state(&c), (false, vec![]), "not wildcard again");
        assert!(out.responses.is_empty());
        // A change to B reaches nobody now.
        assert!(
            c.push(&snap(&[(LISTENER, "A", "1", None), (LISTENER, "B", "2", None)]))
                .is_empty()
        );
    }

    #[test]
    fn d_t8_subscription_with_a_stale_nonce_is_served() {
        let snap1 = snap(&[(CLA, "a", "1", None), (CLA, "b", "1", None)]);
        let mut c = Client::default();
        let r1 = one(&c.send(request(CLA, &["a"], &[], ""), &snap1)).clone();
        c.send(ack(CLA, &r1.nonce), &snap1);
        let snap2 = snap(&[(CLA, "a", "2", None), (CLA, "b", "1", None)]);
        let r2 = one(&c.push(&snap2)).clone();
        c.send(ack(CLA, &r2.nonce), &snap2);
        // Subscribing b with the old nonce.
        let out = c.send(request(CLA, &["b"], &[], &r1.nonce), &snap2);
        assert!(out.events.contains(&Event::Stale {
            type_url: CLA.into(),
            nonce: r1.nonce.clone()
        }));
        assert_eq!(names(one(&out)), ["b"]);
    }

    #[test]
    fn d_t8_stale_subscription_while_a_response_is_outstanding_is_not_lost() {
        let snap1 = snap(&[(CLA, "a", "1", None), (CLA, "b", "1", None)]);
        let mut c = Client::default();
        let r1 = one(&c.send(request(CLA, &["a"], &[], ""), &snap1)).clone();
        c.send(ack(CLA, &r1.nonce), &snap1);
        let snap2 = snap(&[(CLA, "a", "2", None), (CLA, "b", "1", None)]);
        let r2 = one(&c.push(&snap2)).clone();
        let out = c.send(request(CLA, &["b"], &[], &r1.nonce), &snap2);
        assert!(out.responses.is_empty(), "r2 is outstanding");
        assert!(
            c.s.subscription(CLA).unwrap().names().contains("b"),
            "but the subscription is applied"
        );
        let out = c.send(ack(CLA, &r2.nonce), &snap2);
        assert_eq!(names(one(&out)), ["b"]);
    }

    #[test]
    fn d_t9_nack_then_nothing_until_content_changes() {
        let mut c = synced(&snap(CDS3));
        let snap2 = snap(&[
            (CLUSTER, "c1", "bad", None),
            (CLUSTER, "c2", "1", None),
            (CLUSTER, "c3", "1", None),
        ]);
        let r = one(&c.push(&snap2)).clone();
        let mut req = ack(CLUSTER, &r.nonce);
        req.error_detail = Some(Status {
            code: 3,
            message: "c1: bad".into(),
            details: vec![],
        });
        let out = c.send(req, &snap2);
        assert!(out.responses.is_empty());
        assert_eq!(
            out.events,
            [Event::Nack {
                type_url: CLUSTER.into(),
                version: r.system_version_info.clone(),
                nonce: r.nonce.clone(),
                code: 3,
                message: "c1: bad".into()
            }]
        );
        assert_eq!(c.s.last_nack(CLUSTER).unwrap().message, "c1: bad");
        assert!(c.push(&snap2).responses.is_empty());
        let snap3 = snap(&[
            (CLUSTER, "c1", "good", None),
            (CLUSTER, "c2", "1", None),
            (CLUSTER, "c3", "1", None),
        ]);
        assert_eq!(names(one(&c.push(&snap3))), ["c1"]);
    }

    #[test]
    fn d_t10_reconnect_with_initial_resource_versions() {
        let snap = snap(&[(CLUSTER, "a", "1", None), (CLUSTER, "b", "2", None)]);
        let mut c = Client::default();
        let mut req = request(CLUSTER, &[], &[], "");
        req.initial_resource_versions = HashMap::from([
            (
                "a".to_owned(),
                snap.resources(CLUSTER).get("a").unwrap().version.clone(),
            ),
            ("b".to_owned(), "old".to_owned()),
            ("c".to_owned(), "gone".to_owned()),
        ]);
        let out = c.send(req, &snap);
        let r = one(&out);
        assert_eq!(names(r), ["b"]);
        assert_eq!(removed(r), ["c"]);
    }

    #[test]
    fn d15_reconnect_with_known_names_also_subscribed() {
        // Envoy's other shape: the held names listed in subscribe too.
        let snap = snap(&[(CLA, "a", "1", None), (CLA, "b", "2", None), (CLA, "n", "1", None)]);
        let mut c = Client::default();
        let mut req = request(CLA, &["a", "b", "n", "gone"], &[], "");
        req.initial_resource_versions = HashMap::from([
            ("a".to_owned(), snap.resources(CLA).get("a").unwrap().version.clone()),
            ("b".to_owned(), "old".to_owned()),
        ]);
        let out = c.send(req, &snap);
        let r = one(&out);
        assert_eq!(names(r), ["b", "n"], "a is held at its version; n is new");
        assert_eq!(removed(r), ["gone"]);
        // Later, subscribing a again is D4 again.
        let r = r.clone();
        c.send(ack(CLA, &r.nonce), &snap);
        assert_eq!(names(one(&c.send(request(CLA, &["a"], &[], ""), &snap))), ["a"]);
    }

    #[test]
    fn d14_initial_versions_only_on_the_first_request() {
        let snap = snap(&[(CLA, "a", "1", None)]);
        let mut c = Client::default();
        let r = one(&c.send(request(CLA, &["a"], &[], ""), &snap)).clone();
        c.send(ack(CLA, &r.nonce), &snap);
        let mut req = request(CLA, &[], &[], "");
        req.initial_resource_versions = HashMap::from([("zzz".to_owned(), "1".to_owned())]);
        assert!(c.send(req, &snap).responses.is_empty());
    }

    #[test]
    fn d_t11_subscribing_a_nonexistent_name_reports_it_removed() {
        let snap1 = snap(&[(RDS, "r1", "1", None)]);
        let mut c = Client::default();
        let out = c.send(request(RDS, &["r1", "nope"], &[], ""), &snap1);
        let r = one(&out).clone();
        assert_eq!(names(&r), ["r1"]);
        assert_eq!(removed(&r), ["nope"]);
        c.send(ack(RDS, &r.nonce), &snap1);
        // Said once; when it appears it is sent.
        assert!(c.push(&snap1).is_empty());
        let snap2 = snap(&[(RDS, "r1", "1", None), (RDS, "nope", "1", None)]);
        assert_eq!(names(one(&c.push(&snap2))), ["nope"]);
    }

    #[test]
    fn d_t12_response_invariants() {
        // Client::check runs on every response of every test; this one makes
        // several types at once, with a name both subscribed twice and gone.
        let snap1 = snap(&[
            (SECRET, "s", "1", None),
            (CLUSTER, "c", "1", None),
            (RDS, "r", "1", None),
        ]);
        let mut c = Client::default();
        c.send(request(SECRET, &["s", "s", "x"], &[], ""), &snap1);
        c.send(request(CLUSTER, &["*"], &[], ""), &snap1);
        c.send(request(RDS, &["r", "x"], &["x"], ""), &snap1);
        assert_eq!(c.nonces.len(), 3);
    }

    #[test]
    fn d_s_t14_request_without_type_url_is_an_error() {
        let mut s = DeltaStream::new();
        assert_eq!(
            s.on_request(request("", &[], &[], ""), &Snapshot::default())
                .unwrap_err(),
            ProtocolError::MissingTypeUrl
        );
        let mut req = request(CLA, &[], &[], "");
        req.resource_locators_subscribe.push(Default::default());
        assert!(matches!(
            s.on_request(req, &Snapshot::default()),
            Err(ProtocolError::ResourceLocatorsUnsupported { .. })
        ));
    }

    #[test]
    fn delta_node_comes_from_the_first_request() {
        let mut s = DeltaStream::new();
        let mut req = request(CLUSTER, &[], &[], "");
        req.node = None;
        assert_eq!(
            s.on_request(req.clone(), &Snapshot::default()).unwrap_err(),
            ProtocolError::MissingNode
        );
        assert_eq!(s.identify(&request(CLUSTER, &[], &[], "")).unwrap().id, "proxy-1");
        s.on_request(req, &Snapshot::default()).unwrap();
        assert_eq!(s.node().unwrap().id, "proxy-1");
    }

    #[test]
    fn delta_empty_wildcard_is_answered_empty() {
        let mut c = Client::default();
        let r = one(&c.send(request(LISTENER, &[], &[], ""), &Snapshot::default())).clone();
        assert!(r.resources.is_empty() && r.removed_resources.is_empty());
        // Not so for a named type with nothing there... except D16.
        let out = c.send(request(CLA, &[], &[], ""), &Snapshot::default());
        assert!(out.responses.is_empty());
    }

    #[test]
    fn delta_one_unacknowledged_response_per_type_and_order() {
        let snap1 = snap(&[(CLUSTER, "c", "1", None), (LISTENER, "l", "1", None)]);
        let mut c = Client::default();
        let cds = one(&c.send(request(CLUSTER, &[], &[], ""), &snap1)).clone();
        let lds = one(&c.send(request(LISTENER, &[], &[], ""), &snap1)).clone();
        c.send(ack(LISTENER, &lds.nonce), &snap1);
        let snap2 = snap(&[(CLUSTER, "c", "2", None), (LISTENER, "l", "2", None)]);
        assert!(
            c.push(&snap2).responses.is_empty(),
            "CDS waits for its ACK, LDS waits behind it"
        );
        let out = c.send(ack(CLUSTER, &cds.nonce), &snap2);
        let got: Vec<&str> = out.responses.iter().map(|r| r.type_url.as_str()).collect();
        assert_eq!(got, [CLUSTER, LISTENER]);
    }

    #[test]
    fn delta_a7_changed_cluster_gets_its_cla_again() {
        let snap1 = snap(&[
            (CLUSTER, "c1", "1", Some("c1")),
            (CLA, "c1", "1", None),
            (CLA, "c2", "1", None),
        ]);
        let mut c = Client::default();
        let cds = one(&c.send(request(CLUSTER, &[], &[], ""), &snap1)).clone();
        c.send(ack(CLUSTER, &cds.nonce), &snap1);
        let eds = one(&c.send(request(CLA, &["c1", "c2"], &[], ""), &snap1)).clone();
        c.send(ack(CLA, &eds.nonce), &snap1);
        let snap2 = snap(&[
            (CLUSTER, "c1", "2", Some("c1")),
            (CLA, "c1", "1", None),
            (CLA, "c2", "1", None),
        ]);
        let out = c.push(&snap2);
        let got: Vec<&str> = out.responses.iter().map(|r| r.type_url.as_str()).collect();
        assert_eq!(got, [CLUSTER, CLA]);
        assert_eq!(names(&out.responses[1]), ["c1"], "only the warming cluster's CLA");
    }
}
