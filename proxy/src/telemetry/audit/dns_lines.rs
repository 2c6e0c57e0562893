//! DNS query records, written as JSON lines straight into batches on the
//! DNS worker.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, UNIX_EPOCH};

use tokio::sync::Notify;

use crate::dns::{DnsAuditRecord, DnsAuditSink, Transport};

use super::record::AuditRecord;
#[cfg(test)]
use super::record::DnsQueryRecord;
use super::writer::AuditWriter;
// ------------------------------------------------------------ DNS queries

/// Batches are handed to the writer once they reach this size…
const DNS_BATCH_BYTES: usize = 32 * 1024;
/// …or this long after their first record, whichever comes first.
const DNS_FLUSH_DELAY: Duration = Duration::from_millis(10);

/// The source's SmartGroups for a DNS audit record: calls `each` with every
/// group name of `src` (from the policy snapshot current at the call).
pub type SourceGroups = Box<dyn Fn(IpAddr, &mut dyn FnMut(&str)) + Send + Sync>;

/// The DNS listener's [`DnsAuditSink`] into the audit log: writes each
/// query's JSON line (the [`DnsQueryRecord`] shape, byte for byte) straight
/// into a reusable batch buffer on the DNS worker, adds the source's
/// SmartGroups and the per-listener metrics there too, and hands the writer
/// thread one queue message per batch. Whatever is buffered is handed over
/// on [`DnsAuditSink::flush`] (the listener calls it when it stops) and when
/// the log is dropped.
pub struct DnsAuditLog {
    writer: AuditWriter<AuditRecord>,
    /// The listener name as a JSON string, quotes included.
    listener_json: Vec<u8>,
    groups: SourceGroups,
    batch: Mutex<DnsBatch>,
    pending: Arc<Notify>,
}

struct DnsBatch {
    lines: Vec<u8>,
    count: u64,
    metrics: crate::telemetry::metrics::DnsMetrics,
    clock: TimeCache,
    verdict: VerdictText,
}

impl std::fmt::Debug for DnsAuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsAuditLog")
            .field("listener", &String::from_utf8_lossy(&self.listener_json))
            .field("writer", &self.writer)
            .finish_non_exhaustive()
    }
}

impl DnsAuditLog {
    /// A sink for listener `listener`. Starts a small task (so call it inside
    /// a tokio runtime) that hands a partial batch over `DNS_FLUSH_DELAY`
    /// after its first record.
    pub fn start(writer: AuditWriter<AuditRecord>, listener: &str, groups: SourceGroups) -> Arc<Self> {
        let mut listener_json = Vec::with_capacity(listener.len() + 2);
        json_str(&mut listener_json, listener);
        let pending = Arc::new(Notify::new());
        let log = Arc::new(Self {
            writer,
            listener_json,
            groups,
            batch: Mutex::new(DnsBatch {
                lines: Vec::with_capacity(DNS_BATCH_BYTES + 1024),
                count: 0,
                metrics: crate::telemetry::metrics::DnsMetrics::new(listener),
                clock: TimeCache::default(),
                verdict: VerdictText::default(),
            }),
            pending: Arc::clone(&pending),
        });
        let weak: Weak<Self> = Arc::downgrade(&log);
        tokio::spawn(async move {
            loop {
                pending.notified().await;
                tokio::time::sleep(DNS_FLUSH_DELAY).await;
                let Some(log) = weak.upgrade() else { return };
                log.flush();
            }
        });
        log
    }

    fn batch(&self) -> MutexGuard<'_, DnsBatch> {
        self.batch.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn hand_over(&self, batch: &mut DnsBatch) {
        batch.metrics.publish();
        if batch.count == 0 {
            return;
        }
        let lines = std::mem::replace(&mut batch.lines, Vec::with_capacity(DNS_BATCH_BYTES + 1024));
        let count = std::mem::take(&mut batch.count);
        self.writer.record_lines(lines, count);
    }
}

impl DnsAuditLog {
    /// Adds one record to the locked batch; `groups` caches the rendered
    /// SmartGroups of the last source within one call of `record_all`.
    fn add(&self, batch: &mut DnsBatch, q: &DnsAuditRecord, groups: &mut GroupsCache) {
        let DnsBatch {
            lines,
            clock,
            verdict,
            metrics,
            ..
        } = batch;
        write_dns_line(lines, clock, verdict, &self.listener_json, &self.groups, groups, q);
        metrics.record(
            q.allowed,
            q.watched,
            &q.rule,
            q.reason,
            q.cache_hit,
            Duration::from_micros(q.latency_us),
        );
        batch.count += 1;
        if batch.lines.len() >= DNS_BATCH_BYTES {
            self.hand_over(batch);
        } else if batch.count == 1 {
            self.pending.notify_one();
        }
    }
}

/// The JSON array of SmartGroups last rendered, and for which source; and
/// the text of the last IPv4 source address written.
#[derive(Default)]
struct GroupsCache {
    src: Option<IpAddr>,
    json: Vec<u8>,
    ip_text_of: Option<IpAddr>,
    ip_text: Vec<u8>,
}

impl DnsAuditSink for DnsAuditLog {
    fn record(&self, q: DnsAuditRecord) -> bool {
        let mut batch = self.batch();
        self.add(&mut batch, &q, &mut GroupsCache::default());
        true
    }

    /// One lock for the whole receive batch, and a source's groups looked
    /// up once per batch (a snapshot swap in between is seen from the next
    /// batch on).
    fn record_all(&self, records: &mut Vec<DnsAuditRecord>) -> u64 {
        let mut groups = GroupsCache::default();
        let mut batch = self.batch();
        for q in records.drain(..) {
            self.add(&mut batch, &q, &mut groups);
        }
        0
    }

    fn flush(&self) {
        let mut batch = self.batch();
        self.hand_over(&mut batch);
    }
}

impl Drop for DnsAuditLog {
    fn drop(&mut self) {
        self.flush();
        // Lets the flush task see the log is gone and end.
        self.pending.notify_one();
    }
}

/// The RFC 3339 text of the current second, reused for every record
/// stamped within it.
#[derive(Default)]
struct TimeCache {
    second: Option<u64>,
    /// `YYYY-MM-DDTHH:MM:SS.` (20 bytes) when the formatter gave the usual shape.
    prefix: Vec<u8>,
    /// The decimal digits of `second` (so `time_unix_ms` is these and three more).
    second_digits: Vec<u8>,
}

impl TimeCache {
    fn write(&mut self, out: &mut Vec<u8>, unix_ms: u64) {
        let second = unix_ms / 1000;
        let millis = unix_ms % 1000;
        if self.second != Some(second) {
            let text = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_secs(second)).to_string();
            self.prefix.clear();
            // `…:SS.000Z`: keep everything up to the dot.
            if text.len() == 24 && text.ends_with(".000Z") {
                self.prefix.extend_from_slice(&text.as_bytes()[..20]);
                self.second = Some(second);
                self.second_digits.clear();
                write_u64(&mut self.second_digits, second);
            } else {
                self.second = None;
            }
        }
        if self.second.is_some() {
            out.extend_from_slice(&self.prefix);
            out.push(b'0' + (millis / 100) as u8);
            out.push(b'0' + (millis / 10 % 10) as u8);
            out.push(b'0' + (millis % 10) as u8);
            out.push(b'Z');
        } else {
            let _ = write!(
                out,
                "{}",
                humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(unix_ms))
            );
        }
    }

    /// `unix_ms` in decimal, reusing the digits of its second when
    /// [`Self::write`] just saw that second.
    fn write_unix_ms(&self, out: &mut Vec<u8>, unix_ms: u64) {
        let second = unix_ms / 1000;
        if second > 0 && self.second == Some(second) {
            let millis = unix_ms % 1000;
            out.extend_from_slice(&self.second_digits);
            out.push(b'0' + (millis / 100) as u8);
            out.push(b'0' + (millis / 10 % 10) as u8);
            out.push(b'0' + (millis % 10) as u8);
        } else {
            write_u64(out, unix_ms);
        }
    }
}

/// The verdict's part of a DNS audit line (`"allowed":…` to the reason),
/// kept for the last verdict written: consecutive queries mostly share it.
#[derive(Default)]
struct VerdictText {
    key: Option<(bool, bool, bool, &'static str)>,
    rule: String,
    json: Vec<u8>,
}

impl VerdictText {
    fn write(&mut self, out: &mut Vec<u8>, q: &DnsAuditRecord) {
        let key = (q.allowed, q.enforced, q.watched, q.reason);
        if self.key != Some(key) || self.rule != *q.rule {
            let json = &mut self.json;
            json.clear();
            json.extend_from_slice(br#","allowed":"#);
            write_bool(json, q.allowed);
            json.extend_from_slice(br#","enforced":"#);
            write_bool(json, q.enforced);
            json.extend_from_slice(br#","watched":"#);
            write_bool(json, q.watched);
            json.extend_from_slice(br#","rule":"#);
            json_str(json, &q.rule);
            json.extend_from_slice(br#","reason":"#);
            json_str(json, q.reason);
            self.rule.clear();
            self.rule.push_str(&q.rule);
            self.key = Some(key);
        }
        out.extend_from_slice(&self.json);
    }
}

/// Appends one DNS query's audit line (with its `\n`) to `out`: the same
/// bytes `serde_json` writes for [`AuditRecord::Dns`] with a
/// [`DnsQueryRecord`] of this listener and the source's groups.
#[allow(clippy::too_many_arguments, reason = "the line's caches, each owned by the batch")]
fn write_dns_line(
    out: &mut Vec<u8>,
    clock: &mut TimeCache,
    verdict: &mut VerdictText,
    listener_json: &[u8],
    groups: &SourceGroups,
    cache: &mut GroupsCache,
    q: &DnsAuditRecord,
) {
    out.extend_from_slice(br#"{"kind":"dns","time":""#);
    clock.write(out, q.time_unix_ms);
    out.extend_from_slice(br#"","listener":"#);
    out.extend_from_slice(listener_json);
    out.extend_from_slice(br#","src_groups":"#);
    let src = q.source.ip();
    if cache.src != Some(src) {
        let json = &mut cache.json;
        json.clear();
        json.push(b'[');
        groups(src, &mut |g| {
            if json.len() > 1 {
                json.push(b',');
            }
            json_str(json, g);
        });
        json.push(b']');
        cache.src = Some(src);
    }
    out.extend_from_slice(&cache.json);
    out.extend_from_slice(br#","time_unix_ms":"#);
    clock.write_unix_ms(out, q.time_unix_ms);
    out.extend_from_slice(br#","source":""#);
    match q.source {
        SocketAddr::V4(a) => {
            if cache.ip_text_of != Some(src) {
                cache.ip_text.clear();
                write_ipv4(&mut cache.ip_text, *a.ip());
                cache.ip_text_of = Some(src);
            }
            out.extend_from_slice(&cache.ip_text);
            out.push(b':');
            write_u64(out, u64::from(a.port()));
        }
        SocketAddr::V6(_) => write_socket_addr(out, q.source),
    }
    out.extend_from_slice(br#"","transport":"#);
    out.extend_from_slice(match q.transport {
        Transport::Udp => br#""udp""#,
        Transport::Tcp => br#""tcp""#,
    });
    out.extend_from_slice(br#","qname":"#);
    json_str(out, &q.qname);
    out.extend_from_slice(br#","qtype":"#);
    match crate::dns::audit::qtype_name(q.qtype) {
        Some(name) => {
            out.push(b'"');
            out.extend_from_slice(name.as_bytes());
            out.push(b'"');
        }
        None => write_u64(out, u64::from(q.qtype)),
    }
    verdict.write(out, q);
    out.extend_from_slice(br#","rcode":"#);
    write_u64(out, u64::from(q.rcode));
    out.extend_from_slice(br#","upstream":"#);
    match q.upstream {
        Some(addr) => {
            out.push(b'"');
            write_socket_addr(out, addr);
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(br#","latency_us":"#);
    write_u64(out, q.latency_us);
    out.extend_from_slice(br#","cache_hit":"#);
    write_bool(out, q.cache_hit);
    out.extend_from_slice(br#","ech_stripped":"#);
    write_bool(out, q.ech_stripped);
    if let Some(notes) = &q.annotations {
        out.extend_from_slice(br#","annotations":{"#);
        for (i, (k, v)) in notes.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json_str(out, k);
            out.push(b':');
            json_str(out, v);
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"}\n");
}

fn write_bool(out: &mut Vec<u8>, v: bool) {
    out.extend_from_slice(if v { b"true" } else { b"false" });
}

/// Decimal digits of `v` (what `{}` gives, without the formatting machinery).
fn write_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// `a.b.c.d:port` for IPv4 by hand (every DNS query's source); IPv6 via its
/// `Display`, which is what serde writes for both.
fn write_ipv4(out: &mut Vec<u8>, ip: std::net::Ipv4Addr) {
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        write_u64(out, u64::from(octet));
    }
}

fn write_socket_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(a) => {
            write_ipv4(out, *a.ip());
            out.push(b':');
            write_u64(out, u64::from(a.port()));
        }
        SocketAddr::V6(_) => {
            let _ = write!(out, "{addr}");
        }
    }
}

/// Appends `s` as a JSON string, quotes included, escaped exactly as
/// `serde_json` does: `"` and `\`, the short escapes for backspace, form
/// feed, newline, carriage return and tab, `\u00XX` (lower-case hex) for the
/// other control characters; everything else, non-ASCII included, as is.
pub fn json_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short = match b {
            b'"' => b'"',
            b'\\' => b'\\',
            0x08 => b'b',
            0x0c => b'f',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            0x00..=0x1f => 0,
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        start = i + 1;
        if short == 0 {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.push(b'\\');
            out.push(short);
        }
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code: a panic is the failure report")]
mod dns_line_tests {
    use super::*;

    fn record(qname: &str, rule: &str, upstream: Option<SocketAddr>, ms: u64) -> DnsAuditRecord {
        DnsAuditRecord {
            time_unix_ms: ms,
            source: "[2001:db8::7]:5353".parse().unwrap(),
            transport: Transport::Tcp,
            qname: qname.into(),
            qtype: 65,
            allowed: false,
            enforced: true,
            watched: false,
            rule: rule.into(),
            reason: "default-deny",
            rcode: 3,
            upstream,
            latency_us: 1234,
            cache_hit: true,
            ech_stripped: false,
            annotations: None,
        }
    }

    fn serde_line(listener: &str, groups: &[&str], q: &DnsAuditRecord) -> Vec<u8> {
        let rec = AuditRecord::Dns(Box::new(DnsQueryRecord {
            kind: "dns",
            time: humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(q.time_unix_ms)).to_string(),
            listener: listener.to_owned(),
            src_groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            query: q.clone(),
        }));
        let mut line = serde_json::to_vec(&rec).unwrap();
        line.push(b'\n');
        line
    }

    fn ours(listener: &str, groups: &'static [&'static str], q: &DnsAuditRecord) -> Vec<u8> {
        let mut listener_json = Vec::new();
        json_str(&mut listener_json, listener);
        let groups: SourceGroups = Box::new(move |_, each| groups.iter().for_each(|g| each(g)));
        let mut out = Vec::new();
        write_dns_line(
            &mut out,
            &mut TimeCache::default(),
            &mut VerdictText::default(),
            &listener_json,
            &groups,
            &mut GroupsCache::default(),
            q,
        );
        out
    }

    #[test]
    fn cached_parts_follow_each_record() {
        // One set of caches over a run of records that change one part at a
        // time: each line must still be the record's own.
        let listener_json = br#""dns""#.to_vec();
        let groups: SourceGroups = Box::new(|src, each| {
            if src.is_loopback() {
                each("loopback");
            }
        });
        let (mut clock, mut verdict, mut src_cache) =
            (TimeCache::default(), VerdictText::default(), GroupsCache::default());
        let base = record("a.example", "rule-a", None, 1_763_893_952_123);
        let mut runs = vec![base.clone()];
        let mut q = base.clone();
        q.rule = Arc::from("rule-b");
        runs.push(q.clone());
        q.rule = Arc::from("rule-");
        runs.push(q.clone());
        q.reason = "allowed-by-rule";
        runs.push(q.clone());
        q.allowed = true;
        runs.push(q.clone());
        q.watched = true;
        runs.push(q.clone());
        q.enforced = false;
        runs.push(q.clone());
        q.source = "10.1.2.3:5353".parse().unwrap();
        runs.push(q.clone());
        q.source = "10.1.2.30:53".parse().unwrap();
        runs.push(q.clone());
        q.source = "[2001:db8::1]:53".parse().unwrap();
        runs.push(q.clone());
        q.source = "127.0.0.1:40000".parse().unwrap();
        runs.push(q.clone());
        for ms in [
            1_763_893_952_999,
            1_763_893_953_000,
            1_763_893_953_007,
            999,
            1_000,
            1_763_893_953_001,
        ] {
            q.time_unix_ms = ms;
            runs.push(q.clone());
        }
        for (i, q) in runs.iter().enumerate() {
            // A new receive batch starts a fresh source cache, as record_all does.
            if i % 4 == 0 {
                src_cache = GroupsCache::default();
            }
            let mut out = Vec::new();
            write_dns_line(
                &mut out,
                &mut clock,
                &mut verdict,
                &listener_json,
                &groups,
                &mut src_cache,
                q,
            );
            let want_groups: &[&str] = if q.source.ip().is_loopback() {
                &["loopback"]
            } else {
                &[]
            };
            let want = serde_line("dns", want_groups, q);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                String::from_utf8(want).unwrap(),
                "record {i}"
            );
        }
    }

    #[test]
    fn lines_are_byte_identical_to_serde() {
        let hostile = "a\"b\\c\u{0}\u{1f}\u{8}\u{c}\n\r\t\u{7f}é\u{2028}.test";
        let cases = [
            (
                "dns",
                &[][..],
                record("www.example.com", "default", None, 1_763_893_952_123),
            ),
            (
                "lis\"ten\\er\n",
                &["private-ranges", "we\"ird\u{1}"][..],
                record(hostile, "rule \"x\"\\", Some("192.0.2.53:53".parse().unwrap()), 0),
            ),
            (
                "dns",
                &["g"][..],
                record("", "r", Some("[::1]:53".parse().unwrap()), 999),
            ),
        ];
        let mut noted = record("t.example", "p", None, 7);
        noted.annotations = Some(Box::new(vec![
            ("why".into(), "label of \"45\" characters".into()),
            ("k\n".into(), "v".into()),
        ]));
        for (listener, groups, q) in cases.into_iter().chain([("dns", &[][..], noted)]) {
            let a = ours(listener, groups, &q);
            let b = serde_line(listener, groups, &q);
            assert_eq!(String::from_utf8(a).unwrap(), String::from_utf8(b).unwrap());
        }
        // A type with a name is written as the name, one without as its number.
        for (qtype, want) in [
            (1, r#""qtype":"A""#),
            (65, r#""qtype":"HTTPS""#),
            (65280, r#""qtype":65280"#),
        ] {
            let mut q = record("www.example.com", "r", None, 5);
            q.qtype = qtype;
            let a = String::from_utf8(ours("dns", &[], &q)).unwrap();
            assert!(a.contains(want), "{a}");
            assert_eq!(a, String::from_utf8(serde_line("dns", &[], &q)).unwrap());
        }
    }

    #[test]
    fn hostile_names_round_trip_through_a_json_parser() {
        let all_controls: String = (0u8..0x20).map(char::from).collect();
        for name in [
            "\"",
            "\\",
            "\\\"",
            "x\u{0}y",
            all_controls.as_str(),
            "\"},\"allowed\":true,\"x\":\"",
        ] {
            let line = ours("dns", &[], &record(name, name, None, 5));
            assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1, "one line");
            let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
            assert_eq!(v["qname"], name);
            assert_eq!(v["rule"], name);
            assert_eq!(v["allowed"], false);
        }
    }

    #[test]
    fn time_cache_matches_the_formatter_across_seconds() {
        let mut clock = TimeCache::default();
        for ms in [
            0,
            999,
            1_000,
            1_763_893_952_001,
            1_763_893_952_999,
            1_763_893_953_000,
            253_402_300_799_999,
        ] {
            let mut out = Vec::new();
            clock.write(&mut out, ms);
            let want = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string();
            assert_eq!(String::from_utf8(out).unwrap(), want);
        }
    }
}
