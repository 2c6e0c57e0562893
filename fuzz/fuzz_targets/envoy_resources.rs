//! Fuzzes the decoding of standard Envoy resources (`sluice_api::xds`):
//! any bytes as a `Listener`, a `Cluster` or a `ClusterLoadAssignment` must
//! give a checked value or a refusal (never a panic); what is accepted has
//! a name, and the same message re-encoded decodes to the same value. A
//! decoded listener is mapped onto what a gateway runs (with the same bytes
//! as its one cluster): a mapping or a refusal, and every chain mapped
//! runs the anti-evasion checks and the policy first.

#![no_main]

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::google::protobuf::Any;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use sluice_api::xds::{self, type_url};

fn any(type_url: &str, value: Vec<u8>) -> Any {
    Any {
        type_url: type_url.into(),
        value,
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(l) = xds::decode_listener(&any(type_url::LISTENER, data.to_vec())) {
        assert!(!l.name.is_empty());
        let again = Listener::decode(data).map(|m| m.encode_to_vec());
        let again = again.map(|b| xds::decode_listener(&any(type_url::LISTENER, b)));
        assert_eq!(again.ok(), Some(Ok(l.clone())));
        let clusters = xds::decode_cluster(&any(type_url::CLUSTER, data.to_vec()))
            .map(|c| std::collections::BTreeMap::from([(c.name.clone(), c)]))
            .unwrap_or_default();
        if let Ok(spec) = xds::gateway::gateway_listener(&l, &clusters, &Default::default())
            && let Some(e) = spec.envoy()
        {
            for c in e.chains.iter().chain(&e.default_chain) {
                assert_eq!(
                    c.filters.get(..2),
                    Some(&[sluice_api::envoy::ANTI_EVASION.to_owned(), sluice_api::envoy::POLICY.to_owned()][..])
                );
            }
        }
    }
    if let Ok(c) = xds::decode_cluster(&any(type_url::CLUSTER, data.to_vec())) {
        assert!(!c.name.is_empty());
        let again = Cluster::decode(data).map(|m| m.encode_to_vec());
        let again = again.map(|b| xds::decode_cluster(&any(type_url::CLUSTER, b)));
        assert_eq!(again.ok(), Some(Ok(c)));
    }
    if let Ok(la) = xds::decode_load_assignment(&any(type_url::CLUSTER_LOAD_ASSIGNMENT, data.to_vec())) {
        assert!(!la.cluster_name.is_empty());
        let again = ClusterLoadAssignment::decode(data).map(|m| m.encode_to_vec());
        let again = again.map(|b| xds::decode_load_assignment(&any(type_url::CLUSTER_LOAD_ASSIGNMENT, b)));
        assert_eq!(again.ok(), Some(Ok(la)));
    }
});
