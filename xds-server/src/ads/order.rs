//! Per-type policy: the order in which types go on the wire when several
//! have something to send, and which types are full-state (and
//! wildcard-capable) in State of the World.
//!
//! The order is make-before-break (rules A3/A4 in `notes/xds-protocol.md`):
//! what a resource refers to goes out before the resource. Secrets and
//! extension configs before the clusters and listeners that wait for them;
//! clusters and their endpoints before the listeners and routes that send
//! traffic to them. Cluster removals come last without a rule of their own:
//! CDS is full state, so a cluster disappears by a later CDS response that
//! leaves it out.

use crate::snapshot::type_url;

/// Types in the order they are sent; anything else follows, by type URL.
pub const ORDER: &[&str] = &[
    type_url::SECRET,
    type_url::CLUSTER,
    type_url::CLUSTER_LOAD_ASSIGNMENT,
    type_url::TYPED_EXTENSION_CONFIG,
    type_url::LISTENER,
    type_url::ROUTE_CONFIGURATION,
    type_url::VIRTUAL_HOST,
    type_url::SLUICE_WEB_GROUP,
    type_url::SLUICE_SMART_GROUP,
    type_url::SLUICE_WORKLOAD,
    type_url::SLUICE_POLICY,
];

/// Types that are full-state in SotW and may be subscribed to by wildcard
/// (`*`, or the legacy empty list). Every SotW response of such a type holds
/// all of the client's resources of it, and a resource left out is deleted
/// (rules S17/S19/S22). Sluice's own types behave like LDS/CDS.
pub const FULL_STATE: &[&str] = &[
    type_url::LISTENER,
    type_url::CLUSTER,
    // Sluice gateways take every plugin meant for them by wildcard; a
    // plugin left out of a response is removed. (Envoy names the ones its
    // listeners use, and gets exactly those.)
    type_url::TYPED_EXTENSION_CONFIG,
    type_url::SLUICE_WEB_GROUP,
    type_url::SLUICE_SMART_GROUP,
    type_url::SLUICE_WORKLOAD,
    type_url::SLUICE_POLICY,
];

/// Whether `type_url` is full-state in SotW and wildcard-capable.
pub fn is_full_state(type_url: &str) -> bool {
    FULL_STATE.contains(&type_url)
}

/// Position of `type_url` in the send order; unknown types share the last.
pub fn rank(type_url: &str) -> usize {
    ORDER.iter().position(|t| *t == type_url).unwrap_or(ORDER.len())
}

/// `type_urls` sorted into send order (ties, among unknown types, by URL).
pub fn sorted<'a>(type_urls: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    let mut v: Vec<String> = type_urls.into_iter().cloned().collect();
    v.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.cmp(b)));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a4_order_and_unknown_types_last() {
        let mut all: Vec<String> = ORDER.iter().rev().map(|s| (*s).to_owned()).collect();
        all.insert(3, "type.googleapis.com/z.Unknown".to_owned());
        all.insert(0, "type.googleapis.com/a.Unknown".to_owned());
        let got = sorted(&all);
        let mut want: Vec<String> = ORDER.iter().map(|s| (*s).to_owned()).collect();
        want.push("type.googleapis.com/a.Unknown".to_owned());
        want.push("type.googleapis.com/z.Unknown".to_owned());
        assert_eq!(got, want);
    }

    #[test]
    fn full_state_types_are_lds_cds_and_sluice_types() {
        assert!(is_full_state(type_url::LISTENER));
        assert!(is_full_state(type_url::CLUSTER));
        assert!(is_full_state(type_url::SLUICE_POLICY));
        assert!(!is_full_state(type_url::CLUSTER_LOAD_ASSIGNMENT));
        assert!(!is_full_state(type_url::ROUTE_CONFIGURATION));
        assert!(!is_full_state(type_url::SECRET));
        assert!(!is_full_state("type.googleapis.com/x.Unknown"));
    }
}
