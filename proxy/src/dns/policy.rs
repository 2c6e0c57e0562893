//! The seam between the DNS proxy and the policy engine.
//!
//! The DNS proxy never looks at rules itself: for each query it asks a
//! [`QueryPolicy`] (implemented by the policy engine over its compiled
//! snapshot), then its [`QueryFilter`]s, and acts on the [`QueryVerdict`]
//! (a [`Decision`], the verdict type flows carry too). Keeping the seam this small
//! lets the proxy be tested with a ten-line policy and lets the engine change
//! without touching the DNS path.

use std::net::IpAddr;
use std::time::Instant;

use sluice_api::DomainName;

pub use crate::policy::decision::{Decision, RuleLabel};

/// Decides queries. Called on the hot path, once per query that parses.
pub trait QueryPolicy: Send + Sync + 'static {
    /// Decide one query. `qname` is canonical (lower case, A-labels, no
    /// trailing dot); `qtype` is the wire value (1 = A, 28 = AAAA, 65 = HTTPS…).
    fn decide(&self, src: IpAddr, qname: &DomainName, qtype: u16) -> QueryVerdict;

    /// Whether the rule behind `verdict` hands its denial to the filter
    /// named `filter` (the rule's `delegate`): only then may that filter
    /// allow what the rule denied. None does unless the policy says so.
    fn delegates(&self, verdict: &QueryVerdict, filter: &str) -> bool {
        let _ = (verdict, filter);
        false
    }

    /// The policy's mode, applied to what the query filters say
    /// ([`Decision::in_mode`]): in watch mode their denials are only
    /// recorded.
    fn mode(&self) -> sluice_api::Mode {
        sluice_api::Mode::Enforce
    }
}

/// The verdict on a query: the same type a flow carries
/// ([`crate::policy::decision::Decision`]), so a query and a flow are
/// judged, overridden and recorded by the same rules.
pub type QueryVerdict = Decision;

/// A query as the query filters see it.
#[derive(Debug, Clone, Copy)]
pub struct QueryInfo<'a> {
    /// The client, IPv4-mapped addresses as plain IPv4.
    pub src: IpAddr,
    pub qname: &'a DomainName,
    pub qtype: u16,
    pub now: Instant,
}

/// What a query filter answers.
#[derive(Debug)]
pub enum QueryStatus {
    Continue,
    /// Tightens the verdict: applied when it denies what was allowed, or
    /// carries out what was only watched.
    Deny(QueryVerdict),
    /// Loosens a denial, applied only where the deciding rule delegates to
    /// this filter ([`QueryPolicy::delegates`]).
    Allow(QueryVerdict),
}

/// The DNS sibling of the flows' network filter: after the policy has
/// judged a query, each filter sees it with the verdict so far, in order,
/// and the engine applies its answer by the same override rules as a flow
/// chain ([`crate::policy::decision::overrides`]). A denial by a filter is
/// answered like a policy denial (NXDOMAIN, REFUSED or a sinkhole) and its
/// record names the filter's rule and reason. The built-in one is the
/// exfiltration detector; plugins will add theirs.
pub trait QueryFilter: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &str;
    /// Runs on the hot path, once per query that reached the policy; must
    /// not block.
    fn on_query(&self, query: &QueryInfo<'_>, verdict: &QueryVerdict) -> QueryStatus;
}

/// Reason codes the DNS proxy itself produces, next to the policy engine's.
pub mod reason {
    /// The query looked like data exfiltration (long or high-entropy labels,
    /// or too many unique subdomains of one parent from one source).
    pub const DNS_EXFILTRATION: &str = sluice_api::reason::ReasonCode::DnsExfiltration.as_str();
    /// The query name is not a name the policy can classify (the root, or
    /// bytes that are not a hostname); it is refused.
    pub const DNS_INVALID_NAME: &str = sluice_api::reason::ReasonCode::DnsInvalidName.as_str();
    /// The message could not be parsed; FORMERR was returned.
    pub const DNS_MALFORMED: &str = sluice_api::reason::ReasonCode::DnsMalformed.as_str();
    /// Opcode other than QUERY; NOTIMP was returned.
    pub const DNS_NOT_IMPLEMENTED: &str = sluice_api::reason::ReasonCode::DnsNotImplemented.as_str();
    /// EDNS version other than 0; BADVERS was returned (RFC 6891 §6.1.3).
    pub const DNS_BAD_EDNS_VERSION: &str = sluice_api::reason::ReasonCode::DnsBadEdnsVersion.as_str();
    /// AXFR/IXFR: zone transfers are multi-message streams an egress
    /// resolver does not relay; REFUSED was returned.
    pub const DNS_ZONE_TRANSFER: &str = sluice_api::reason::ReasonCode::DnsZoneTransfer.as_str();
    /// Rule name used in verdicts produced by the exfiltration detector.
    pub const EXFILTRATION_RULE: &str = "builtin-dns-exfiltration";
}

/// Verdicts recently given, per (policy version, source, name): a query
/// repeated by the same client (a resolver's retry, a refresh, the A and
/// AAAA pair) skips the policy engine. A fixed number of slots, two ways per
/// set, so it never grows; a new key replaces the set's less recently used
/// slot. A hit needs the policy version, the source and every byte of the
/// name to be equal, so it can only return what the engine would.
///
/// The version must be distinct for every compiled policy over the memo's
/// life (the snapshot's serial): a reload changes it and every old slot
/// stops matching.
#[derive(Debug)]
pub struct VerdictMemo {
    slots: Box<[Option<MemoSlot>]>,
    hasher: foldhash::fast::RandomState,
    /// Bumped per lookup; a slot keeps the value of its last use.
    clock: u64,
}

#[derive(Debug)]
struct MemoSlot {
    version: u64,
    src: IpAddr,
    /// Reused across overwrites, so a miss does not allocate once the slot
    /// has held a name as long.
    name: String,
    verdict: QueryVerdict,
    used: u64,
}

impl MemoSlot {
    fn holds(&self, version: u64, src: IpAddr, name: &str) -> bool {
        self.version == version && self.src == src && self.name == name
    }
}

impl VerdictMemo {
    /// Slots in a memo (names × sources a thread keeps).
    pub const SLOTS: usize = 512;

    pub fn new() -> Self {
        Self {
            slots: (0..Self::SLOTS).map(|_| None).collect(),
            hasher: foldhash::fast::RandomState::default(),
            clock: 0,
        }
    }

    /// The memoised verdict for the key, or `decide()`'s (then remembered).
    pub fn get_or_decide(
        &mut self,
        version: u64,
        src: IpAddr,
        qname: &DomainName,
        decide: impl FnOnce() -> QueryVerdict,
    ) -> QueryVerdict {
        use std::hash::BuildHasher;

        let name = qname.as_str();
        self.clock += 1;
        let now = self.clock;
        let set = super::spread(self.hasher.hash_one((src, name)), self.slots.len() / 2) * 2;
        let Some([a, b]) = self.slots.get_mut(set..set + 2) else {
            return decide();
        };
        for slot in [&mut *a, &mut *b].into_iter().flatten() {
            if slot.holds(version, src, name) {
                slot.used = now;
                return slot.verdict.clone();
            }
        }
        let verdict = decide();
        // An empty way, else the one used longer ago.
        let victim = match (&*a, &*b) {
            (None, _) => a,
            (_, None) => b,
            (Some(x), Some(y)) => {
                if x.used <= y.used {
                    a
                } else {
                    b
                }
            }
        };
        match victim {
            Some(m) => {
                m.version = version;
                m.src = src;
                m.name.clear();
                m.name.push_str(name);
                m.verdict = verdict.clone();
                m.used = now;
            }
            None => {
                *victim = Some(MemoSlot {
                    version,
                    src,
                    name: name.to_owned(),
                    verdict: verdict.clone(),
                    used: now,
                });
            }
        }
        verdict
    }
}

impl Default for VerdictMemo {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    fn verdict(rule: &str, allowed: bool) -> QueryVerdict {
        use sluice_api::reason::ReasonCode;
        let reason = if allowed {
            ReasonCode::AllowedByRule
        } else {
            ReasonCode::DefaultDeny
        };
        QueryVerdict::labelled(rule, allowed, reason, sluice_api::Enforcement::Enforced)
    }

    fn name(s: &str) -> DomainName {
        DomainName::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn a_hit_needs_version_source_and_name_equal() {
        let mut memo = VerdictMemo::new();
        let calls = Cell::new(0);
        let ask = |memo: &mut VerdictMemo, version, src: &str, n: &str, v: QueryVerdict| {
            memo.get_or_decide(version, src.parse().unwrap_or_else(|e| panic!("{e}")), &name(n), || {
                calls.set(calls.get() + 1);
                v
            })
        };
        assert_eq!(
            ask(&mut memo, 1, "10.0.0.1", "a.example", verdict("r1", true)),
            verdict("r1", true)
        );
        // Same key: remembered, the closure's verdict is not used.
        assert_eq!(
            ask(&mut memo, 1, "10.0.0.1", "a.example", verdict("x", false)),
            verdict("r1", true)
        );
        assert_eq!(calls.get(), 1);
        // Any part different: asked again.
        assert_eq!(
            ask(&mut memo, 2, "10.0.0.1", "a.example", verdict("r2", false)),
            verdict("r2", false)
        );
        assert_eq!(
            ask(&mut memo, 2, "10.0.0.2", "a.example", verdict("r3", true)),
            verdict("r3", true)
        );
        assert_eq!(
            ask(&mut memo, 2, "10.0.0.2", "b.a.example", verdict("r4", false)),
            verdict("r4", false)
        );
        assert_eq!(
            ask(&mut memo, 2, "10.0.0.2", "a.exampl", verdict("r5", true)),
            verdict("r5", true)
        );
        assert_eq!(calls.get(), 5);
        // The reload (version 2) replaced what version 1 said.
        assert_eq!(
            ask(&mut memo, 2, "10.0.0.1", "a.example", verdict("r2", true)),
            verdict("r2", false)
        );
        assert_eq!(calls.get(), 5);
    }

    #[test]
    fn many_keys_stay_exact_in_a_bounded_memo() {
        let mut memo = VerdictMemo::new();
        // Four times as many keys as slots, asked twice: every answer is
        // the one for its own key, whether remembered or recomputed.
        for round in 0..2 {
            for i in 0..(4 * VerdictMemo::SLOTS) {
                let n = name(&format!("n{i}.example"));
                let allowed = i % 3 == 0;
                let got = memo.get_or_decide(7, "192.0.2.1".parse().unwrap_or_else(|e| panic!("{e}")), &n, || {
                    verdict(&format!("rule{i}"), allowed)
                });
                assert_eq!(got, verdict(&format!("rule{i}"), allowed), "round {round}, key {i}");
            }
        }
        assert_eq!(memo.slots.len(), VerdictMemo::SLOTS);
    }
}
