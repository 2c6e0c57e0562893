//! The seam between the DNS proxy and the policy engine.
//!
//! The DNS proxy never looks at rules itself: for each query it asks a
//! [`QueryPolicy`] (implemented by the policy engine over its compiled
//! snapshot) and acts on the [`QueryVerdict`]. Keeping the seam this small
//! lets the proxy be tested with a ten-line policy and lets the engine change
//! without touching the DNS path.

use std::net::IpAddr;
use std::sync::Arc;

use sluice_api::DomainName;

/// Decides queries. Called on the hot path, once per query that parses.
pub trait QueryPolicy: Send + Sync + 'static {
    /// Decide one query. `qname` is canonical (lower case, A-labels, no
    /// trailing dot); `qtype` is the wire value (1 = A, 28 = AAAA, 65 = HTTPS…).
    fn decide(&self, src: IpAddr, qname: &DomainName, qtype: u16) -> QueryVerdict;
}

/// The policy's answer for one query.
///
/// `rule` is an `Arc<str>` rather than a `String` so the engine can hand out
/// the rule name from its compiled snapshot without allocating per query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryVerdict {
    /// The policy's action for this query.
    pub allowed: bool,
    /// `false` in watch mode (policy-wide or the rule's `watch: true`): the
    /// query is answered normally and the audit record says "would deny".
    pub enforced: bool,
    /// Rule name, or `"default"` / `"builtin-guard"`.
    pub rule: Arc<str>,
    /// Stable reason code (see `sluice_api::reason::ReasonCode` and [`reason`]).
    pub reason: &'static str,
}

/// Reason codes the DNS proxy itself produces, next to the policy engine's.
pub mod reason {
    /// The query looked like data exfiltration (long or high-entropy labels,
    /// or too many unique subdomains of one parent from one source).
    pub const DNS_EXFILTRATION: &str = "dns-exfiltration";
    /// The query name is not a name the policy can classify (the root, or
    /// bytes that are not a hostname); it is refused.
    pub const DNS_INVALID_NAME: &str = "dns-invalid-name";
    /// The message could not be parsed; FORMERR was returned.
    pub const DNS_MALFORMED: &str = "dns-malformed";
    /// Opcode other than QUERY; NOTIMP was returned.
    pub const DNS_NOT_IMPLEMENTED: &str = "dns-not-implemented";
    /// EDNS version other than 0; BADVERS was returned (RFC 6891 §6.1.3).
    pub const DNS_BAD_EDNS_VERSION: &str = "dns-bad-edns-version";
    /// AXFR/IXFR: zone transfers are multi-message streams an egress
    /// resolver does not relay; REFUSED was returned.
    pub const DNS_ZONE_TRANSFER: &str = "dns-zone-transfer";
    /// Rule name used in verdicts produced by the exfiltration detector.
    pub const EXFILTRATION_RULE: &str = "builtin-dns-exfiltration";
}
