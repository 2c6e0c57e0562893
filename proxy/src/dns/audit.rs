//! What the DNS proxy reports: one audit record per query, and counters.
//!
//! Records are produced by the sans-IO engine and handed by the server to a
//! [`DnsAuditSink`] the caller owns: a bounded channel (tests, embedders), or
//! the telemetry stage's audit log, which writes the JSON line on the spot
//! and ships lines to the writer thread in batches. A sink never slows a
//! query down: a record it cannot take is dropped and counted in
//! [`DnsStats::audit_drops`]. Counters are plain atomics so the telemetry
//! stage can export them however it likes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use tokio::sync::mpsc;

/// Where the DNS listener delivers one audit record per answered query.
///
/// Called on the listener's worker for every query, so it must be cheap and
/// must never wait.
pub trait DnsAuditSink: std::fmt::Debug + Send + Sync + 'static {
    /// Takes one record; returns `false` when it had to drop it.
    fn record(&self, record: DnsAuditRecord) -> bool;

    /// Takes every record of `records` (the answers of one receive batch),
    /// leaving it empty; returns how many it had to drop.
    fn record_all(&self, records: &mut Vec<DnsAuditRecord>) -> u64 {
        let mut dropped = 0;
        for record in records.drain(..) {
            if !self.record(record) {
                dropped += 1;
            }
        }
        dropped
    }

    /// Hands on anything buffered. The listener calls it when it stops, so
    /// a clean shutdown loses nothing.
    fn flush(&self) {}
}

impl DnsAuditSink for mpsc::Sender<DnsAuditRecord> {
    fn record(&self, record: DnsAuditRecord) -> bool {
        self.try_send(record).is_ok()
    }
}

/// How the query reached Sluice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Udp,
    Tcp,
}

/// One query, as decided and answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DnsAuditRecord {
    /// When the query arrived, Unix milliseconds (taken by the I/O edge).
    pub time_unix_ms: u64,
    pub source: SocketAddr,
    pub transport: Transport,
    /// Canonical name when it parsed as one, else the name as received
    /// (shared: a cache hit hands out the entry's copy).
    #[serde(serialize_with = "as_str")]
    pub qname: Arc<str>,
    /// Written as the type's mnemonic (`A`, `AAAA`, `HTTPS`), or as its
    /// number for a type without one ([`qtype_name`]).
    #[serde(serialize_with = "qtype_text")]
    pub qtype: u16,
    /// The policy's action.
    pub allowed: bool,
    /// Whether the action was enforced (false in watch mode).
    pub enforced: bool,
    /// Denied by policy but answered because of watch mode ("would deny").
    pub watched: bool,
    /// The policy's rule name (shared with the compiled policy).
    #[serde(serialize_with = "as_str")]
    pub rule: Arc<str>,
    pub reason: &'static str,
    /// Response code sent to the client (extended codes included).
    pub rcode: u16,
    /// The upstream that produced the answer; `None` for cache hits and
    /// answers Sluice made itself.
    pub upstream: Option<SocketAddr>,
    pub latency_us: u64,
    pub cache_hit: bool,
    /// An `ech` SvcParam was removed from the answer.
    pub ech_stripped: bool,
    /// Notes the query filters (plugins) gave, in order; omitted when none.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "notes_map")]
    pub annotations: Option<Box<Vec<(String, String)>>>,
}

/// Notes as a JSON object, in the order they were given.
#[allow(
    clippy::box_collection,
    reason = "the field's own type: a pointer in every record, allocated only when a plugin notes something"
)]
fn notes_map<S: serde::Serializer>(notes: &Option<Box<Vec<(String, String)>>>, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let notes = notes.as_deref().map_or(&[][..], Vec::as_slice);
    let mut m = s.serialize_map(Some(notes.len()))?;
    for (k, v) in notes {
        m.serialize_entry(k, v)?;
    }
    m.end()
}

fn as_str<S: serde::Serializer>(value: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(value)
}

fn qtype_text<S: serde::Serializer>(qtype: &u16, s: S) -> Result<S::Ok, S::Error> {
    match qtype_name(*qtype) {
        Some(name) => s.serialize_str(name),
        None => s.serialize_u16(*qtype),
    }
}

/// The mnemonic of a DNS resource record type, from the IANA registry
/// ("Resource Record (RR) TYPEs"); `None` for a number without one (which
/// audit records then write as the number).
pub fn qtype_name(qtype: u16) -> Option<&'static str> {
    Some(match qtype {
        1 => "A",
        2 => "NS",
        5 => "CNAME",
        6 => "SOA",
        12 => "PTR",
        13 => "HINFO",
        15 => "MX",
        16 => "TXT",
        17 => "RP",
        18 => "AFSDB",
        24 => "SIG",
        25 => "KEY",
        28 => "AAAA",
        29 => "LOC",
        33 => "SRV",
        35 => "NAPTR",
        36 => "KX",
        37 => "CERT",
        39 => "DNAME",
        41 => "OPT",
        42 => "APL",
        43 => "DS",
        44 => "SSHFP",
        45 => "IPSECKEY",
        46 => "RRSIG",
        47 => "NSEC",
        48 => "DNSKEY",
        49 => "DHCID",
        50 => "NSEC3",
        51 => "NSEC3PARAM",
        52 => "TLSA",
        53 => "SMIMEA",
        55 => "HIP",
        59 => "CDS",
        60 => "CDNSKEY",
        61 => "OPENPGPKEY",
        62 => "CSYNC",
        63 => "ZONEMD",
        64 => "SVCB",
        65 => "HTTPS",
        99 => "SPF",
        108 => "EUI48",
        109 => "EUI64",
        249 => "TKEY",
        250 => "TSIG",
        251 => "IXFR",
        252 => "AXFR",
        253 => "MAILB",
        254 => "MAILA",
        255 => "ANY",
        256 => "URI",
        257 => "CAA",
        32768 => "TA",
        32769 => "DLV",
        _ => return None,
    })
}

/// Counters, updated with relaxed atomics (they are statistics, not
/// synchronisation).
#[derive(Debug, Default)]
pub struct DnsStats {
    /// Messages that parsed far enough to be answered or refused.
    pub queries: AtomicU64,
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
    /// Would have been denied; answered because of watch mode.
    pub watched: AtomicU64,
    pub cache_hits: AtomicU64,
    /// Cache hits answered on wire bytes (a subset of `cache_hits`).
    pub cache_fast_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    /// Upstream answers passed on patched rather than re-encoded.
    pub upstream_passthrough: AtomicU64,
    /// Failed exchanges with one upstream (a query may count several).
    pub upstream_errors: AtomicU64,
    /// Datagrams on an upstream socket that answered nothing we asked
    /// (unknown ID, wrong question, unparsable): stale or spoofed, ignored.
    pub upstream_mismatched: AtomicU64,
    pub servfail: AtomicU64,
    pub formerr: AtomicU64,
    /// Datagrams dropped without an answer (no readable header, a response
    /// sent to us, or overload).
    pub dropped: AtomicU64,
    pub bindings_evictions: AtomicU64,
    pub audit_drops: AtomicU64,
    pub ech_stripped: AtomicU64,
    pub exfiltration_flagged: AtomicU64,
}

/// A point-in-time copy of [`DnsStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DnsStatsSnapshot {
    pub queries: u64,
    pub allowed: u64,
    pub denied: u64,
    pub watched: u64,
    pub cache_hits: u64,
    pub cache_fast_hits: u64,
    pub cache_misses: u64,
    pub upstream_passthrough: u64,
    pub upstream_errors: u64,
    pub upstream_mismatched: u64,
    pub servfail: u64,
    pub formerr: u64,
    pub dropped: u64,
    pub bindings_evictions: u64,
    pub audit_drops: u64,
    pub ech_stripped: u64,
    pub exfiltration_flagged: u64,
}

impl DnsStats {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> DnsStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DnsStatsSnapshot {
            queries: get(&self.queries),
            allowed: get(&self.allowed),
            denied: get(&self.denied),
            watched: get(&self.watched),
            cache_hits: get(&self.cache_hits),
            cache_fast_hits: get(&self.cache_fast_hits),
            cache_misses: get(&self.cache_misses),
            upstream_passthrough: get(&self.upstream_passthrough),
            upstream_errors: get(&self.upstream_errors),
            upstream_mismatched: get(&self.upstream_mismatched),
            servfail: get(&self.servfail),
            formerr: get(&self.formerr),
            dropped: get(&self.dropped),
            bindings_evictions: get(&self.bindings_evictions),
            audit_drops: get(&self.audit_drops),
            ech_stripped: get(&self.ech_stripped),
            exfiltration_flagged: get(&self.exfiltration_flagged),
        }
    }
}
