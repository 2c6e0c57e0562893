//! The cached-answer fast path, on wire bytes.
//!
//! Part of the sans-IO engine: most queries a busy resolver sees are plain
//! (one question, a hostname, maybe a bare EDNS OPT) and answered from the
//! cache. For those, the engine reads the header and question straight from
//! the datagram without allocating ([`WireQuery::parse`]), looks the cache
//! up with a key built on the stack, and answers by copying the entry's
//! pre-encoded answer ([`WireAnswer`]) and patching what differs per query:
//! the ID, the flags that mirror the query, the question name in the
//! client's own case, the TTLs (aged, at recorded offsets) and the OPT
//! record. Anything unusual — another opcode, several questions, EDNS
//! options or a version other than 0, a name needing escapes, an answer
//! that would need truncating — is left to the general path, which gives
//! the same answer the slow way. The policy still decides every query.

use hickory_proto::op::{Message, OpCode, Query};
use hickory_proto::rr::{DNSClass, Name, RecordType};

use super::cache::{CacheEntry, CacheKey, MAX_KEY_LEN};
pub use super::wire::WireAnswer;

const HEADER: usize = 12;
const TYPE_OPT: u16 = 41;
const TYPE_IXFR: u16 = 251;
const TYPE_AXFR: u16 = 252;
/// An OPT record with no options: root name, type, class, TTL, RDLENGTH.
const OPT_LEN: usize = 11;

/// A plain query, read in place from the client's datagram.
#[derive(Debug, Clone, Copy)]
pub struct WireQuery<'a> {
    pub id: u16,
    pub recursion_desired: bool,
    pub checking_disabled: bool,
    pub authentic_data: bool,
    /// The question name in wire form (labels and the root byte), as sent.
    pub qname: &'a [u8],
    pub qtype: u16,
    pub qclass: u16,
    /// (UDP payload size, DO bit) of a bare EDNS(0) OPT record.
    pub edns: Option<(u16, bool)>,
}

impl<'a> WireQuery<'a> {
    /// Reads a query the fast path can answer, or `None` for anything else
    /// (the general path then handles it, malformed or not).
    pub fn parse(b: &'a [u8]) -> Option<Self> {
        let head = b.get(..HEADER)?;
        let (f1, f2) = (head[2], head[3]);
        // QR=0, OPCODE=QUERY, AA and TC clear; Z clear and RCODE 0.
        if f1 & 0xfe != 0 || f2 & 0x4f != 0 {
            return None;
        }
        let count = |i: usize| u16::from_be_bytes([head[i], head[i + 1]]);
        let arcount = count(10);
        if count(4) != 1 || count(6) != 0 || count(8) != 0 || arcount > 1 {
            return None;
        }
        let name_end = plain_name_end(b, HEADER)?;
        let qname = &b[HEADER..name_end];
        let fixed = b.get(name_end..name_end + 4)?;
        let qtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let qclass = u16::from_be_bytes([fixed[2], fixed[3]]);
        if matches!(qtype, TYPE_IXFR | TYPE_AXFR | TYPE_OPT) {
            return None;
        }
        let mut end = name_end + 4;
        let mut edns = None;
        if arcount == 1 {
            let opt = b.get(end..end + OPT_LEN)?;
            // Root owner, type OPT, extended RCODE 0, version 0, no options.
            if opt[0] != 0
                || u16::from_be_bytes([opt[1], opt[2]]) != TYPE_OPT
                || opt[5] != 0
                || opt[6] != 0
                || opt[9] != 0
                || opt[10] != 0
            {
                return None;
            }
            edns = Some((u16::from_be_bytes([opt[3], opt[4]]), opt[7] & 0x80 != 0));
            end += OPT_LEN;
        }
        if end != b.len() {
            return None;
        }
        Some(Self {
            id: u16::from_be_bytes([head[0], head[1]]),
            recursion_desired: f1 & 0x01 != 0,
            authentic_data: f2 & 0x20 != 0,
            checking_disabled: f2 & 0x10 != 0,
            qname,
            qtype,
            qclass,
            edns,
        })
    }

    /// The cache key of this question (lower-cased presentation name) in
    /// `buf`; returns its length.
    pub fn cache_key(&self, buf: &mut [u8; MAX_KEY_LEN]) -> Option<usize> {
        let dnssec_ok = self.edns.is_some_and(|(_, d)| d);
        // The fixed part first (with an empty name), then the name written
        // straight after it, lower-cased, labels joined by dots.
        let start = CacheKey::encode(buf, b"", self.qtype, self.qclass, dnssec_ok, self.checking_disabled)?;
        let mut len = start;
        let mut i = 0;
        while let Some(&label) = self.qname.get(i) {
            if label == 0 {
                break;
            }
            let label = usize::from(label);
            if len > start {
                *buf.get_mut(len)? = b'.';
                len += 1;
            }
            let bytes = self.qname.get(i + 1..i + 1 + label)?;
            let dst = buf.get_mut(len..len + label)?;
            for (d, s) in dst.iter_mut().zip(bytes) {
                *d = s.to_ascii_lowercase();
            }
            len += label;
            i += 1 + label;
        }
        Some(len)
    }
}

/// End of an uncompressed name of letters, digits, `-` and `_` starting at
/// `start` — names whose presentation form needs no escaping, so the
/// lower-cased labels joined by dots are exactly the canonical name. The
/// root name is not one (the general path refuses it).
fn plain_name_end(b: &[u8], start: usize) -> Option<usize> {
    let mut i = start;
    loop {
        let len = usize::from(*b.get(i)?);
        if len == 0 {
            return (i > start && i + 1 - start <= 255).then_some(i + 1);
        }
        if len > 63 {
            return None;
        }
        let label = b.get(i + 1..i + 1 + len)?;
        if !label
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'_')
        {
            return None;
        }
        i += 1 + len;
    }
}

impl WireAnswer {
    /// Encodes `entry` as the answer to (its name, `qtype`, `qclass`), or
    /// `None` if it cannot be served this way.
    pub fn build(entry: &CacheEntry, qtype: u16, qclass: u16) -> Option<Self> {
        let name = Name::from_ascii(format!("{}.", entry.qname.as_str())).ok()?;
        let mut question = Query::query(name.clone(), RecordType::from(qtype));
        question.set_query_class(DNSClass::from(qclass));
        let mut m = Message::response(0, OpCode::Query);
        m.add_query(question);
        m.answers.clone_from(&entry.answers);
        m.authorities.clone_from(&entry.authorities);
        m.additionals.clone_from(&entry.additionals);
        let bytes = m.to_vec().ok()?;
        let (qname_len, ttl_offsets) = walk(&bytes)?;
        let binds = super::wire::bound_addrs(&name, &entry.answers);
        Some(Self {
            bytes,
            qname_len,
            ttl_offsets,
            binds,
        })
    }

    /// The answer for `q`, `age_secs` after caching, or `None` if it does
    /// not fit in `limit` bytes (the general path then truncates properly).
    /// `flags` are the header's second byte (RA, AD, CD, RCODE); `payload`
    /// the EDNS size Sluice advertises.
    pub fn render(&self, q: &WireQuery<'_>, age_secs: u32, flags: u8, payload: u16, limit: usize) -> Option<Vec<u8>> {
        let opt = if q.edns.is_some() { OPT_LEN } else { 0 };
        let len = self.bytes.len() + opt;
        if len > limit || q.qname.len() != self.qname_len {
            return None;
        }
        let mut out = reply_buf(len);
        out.extend_from_slice(&self.bytes);
        out[..2].copy_from_slice(&q.id.to_be_bytes());
        // QR=1, OPCODE=QUERY, AA=0, TC=0, RD as asked.
        out[2] = 0x80 | u8::from(q.recursion_desired);
        out[3] = flags;
        out[HEADER..HEADER + self.qname_len].copy_from_slice(q.qname);
        for &at in &self.ttl_offsets {
            let ttl = out.get_mut(at..at + 4)?;
            let aged = u32::from_be_bytes([ttl[0], ttl[1], ttl[2], ttl[3]]).saturating_sub(age_secs);
            ttl.copy_from_slice(&aged.to_be_bytes());
        }
        if let Some((_, dnssec_ok)) = q.edns {
            let arcount = u16::from_be_bytes([out[10], out[11]]).checked_add(1)?;
            out[10..12].copy_from_slice(&arcount.to_be_bytes());
            out.push(0);
            out.extend_from_slice(&TYPE_OPT.to_be_bytes());
            out.extend_from_slice(&payload.to_be_bytes());
            out.extend_from_slice(&[0, 0, if dnssec_ok { 0x80 } else { 0 }, 0, 0, 0]);
        }
        Some(out)
    }
}

/// Answer buffers this thread has sent and may reuse: a cached answer is a
/// few hundred nanoseconds of user-space work, and an allocation and a free
/// per answer showed in it.
const REPLY_POOL_MAX: usize = 64;
/// Buffers larger than this go back to the allocator.
const REPLY_POOL_BUF_MAX: usize = 4096;

thread_local! {
    static REPLY_POOL: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An empty buffer with room for `len` bytes, from this thread's pool when
/// it has one.
fn reply_buf(len: usize) -> Vec<u8> {
    let mut buf = REPLY_POOL
        .try_with(|p| p.try_borrow_mut().ok().and_then(|mut p| p.pop()))
        .ok()
        .flatten()
        .unwrap_or_default();
    buf.clear();
    buf.reserve(len);
    buf
}

/// Hands a sent answer's buffer back for [`WireAnswer::render`] to reuse.
pub fn recycle(buf: Vec<u8>) {
    if buf.capacity() > REPLY_POOL_BUF_MAX {
        return;
    }
    let _ = REPLY_POOL.try_with(|p| {
        if let Ok(mut p) = p.try_borrow_mut()
            && p.len() < REPLY_POOL_MAX
        {
            p.push(buf);
        }
    });
}

/// How an upstream answer is rewritten for the client ([`patch_upstream`]).
#[derive(Debug, Clone, Copy)]
pub struct Patch {
    pub id: u16,
    pub recursion_desired: bool,
    pub checking_disabled: bool,
    pub authentic_data: bool,
    /// The client's DO bit when it spoke EDNS; `None` when it did not.
    pub edns: Option<bool>,
    /// The EDNS UDP payload size Sluice advertises.
    pub payload: u16,
    /// Largest answer the client takes.
    pub limit: usize,
}

/// Passes an upstream answer on without decoding and re-encoding it: the
/// upstream's bytes with the header rewritten for the client (ID, RD and CD
/// echoed, RA set, AD as computed, AA and RCODE kept, TC cleared) and the
/// upstream's OPT record replaced by Sluice's (or dropped, for a client
/// without EDNS). `None` — encode it the general way — for anything that
/// does not walk cleanly, an OPT that is not the last record or carries an
/// extended RCODE, a SIG(0)/TSIG record, a record type whose names this
/// does not know how to find, a compression pointer into the header (its
/// bytes change here, so the name would read differently than it was
/// checked and bound), or an answer over `limit`.
pub fn patch_upstream(wire: &[u8], p: &Patch) -> Option<Vec<u8>> {
    const TYPE_SIG: u16 = 24;
    const TYPE_TSIG: u16 = 250;
    let head = wire.get(..HEADER)?;
    let count = |i: usize| u16::from_be_bytes([head[i], head[i + 1]]);
    let (an, ns, ar) = (count(6), count(8), count(10));
    if count(4) != 1 {
        return None;
    }
    check_name(wire, HEADER)?;
    let mut i = skip_name(wire, HEADER)? + 4;
    let first_additional = usize::from(an) + usize::from(ns);
    let mut opt_start = None;
    for k in 0..first_additional + usize::from(ar) {
        let start = i;
        check_name(wire, i)?;
        i = skip_name(wire, i)?;
        let fixed = wire.get(i..i + 10)?;
        let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let rdata = i + 10;
        i = rdata + usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        check_rdata_names(wire, rtype, rdata, i)?;
        match rtype {
            TYPE_OPT if k >= first_additional && opt_start.is_none() && fixed[4] == 0 => opt_start = Some(start),
            TYPE_OPT | TYPE_SIG | TYPE_TSIG => return None,
            _ if opt_start.is_some() => return None,
            _ => {}
        }
    }
    if i != wire.len() {
        return None;
    }
    let body = opt_start.unwrap_or(wire.len());
    let len = body + if p.edns.is_some() { OPT_LEN } else { 0 };
    if len > p.limit {
        return None;
    }
    let arcount = ar - u16::from(opt_start.is_some()) + u16::from(p.edns.is_some());
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&wire[..body]);
    out[..2].copy_from_slice(&p.id.to_be_bytes());
    out[2] = 0x80 | (wire[2] & 0x04) | u8::from(p.recursion_desired);
    out[3] = 0x80 | (u8::from(p.authentic_data) << 5) | (u8::from(p.checking_disabled) << 4) | (wire[3] & 0x0f);
    out[10..12].copy_from_slice(&arcount.to_be_bytes());
    if let Some(dnssec_ok) = p.edns {
        out.push(0);
        out.extend_from_slice(&TYPE_OPT.to_be_bytes());
        out.extend_from_slice(&p.payload.to_be_bytes());
        out.extend_from_slice(&[0, 0, if dnssec_ok { 0x80 } else { 0 }, 0, 0, 0]);
    }
    Some(out)
}

/// Follows the name at `i` through its compression pointers (bounded),
/// failing on a pointer into the header or a malformed label.
fn check_name(b: &[u8], mut i: usize) -> Option<()> {
    for _ in 0..128 {
        let len = *b.get(i)?;
        match len & 0xc0 {
            0x00 if len == 0 => return Some(()),
            0x00 => i += 1 + usize::from(len),
            0xc0 => {
                let target = usize::from(u16::from_be_bytes([len & 0x3f, *b.get(i + 1)?]));
                if target < HEADER {
                    return None;
                }
                i = target;
            }
            _ => return None,
        }
    }
    None
}

/// Checks every domain name inside one record's data (`b[start..end]`),
/// for the types whose names are known; `None` for any other type that may
/// hold names.
fn check_rdata_names(b: &[u8], rtype: u16, start: usize, end: usize) -> Option<()> {
    let name_at = |offset: usize| -> Option<usize> {
        let at = start + offset;
        if at >= end {
            return None;
        }
        check_name(b, at)?;
        skip_name(b, at).filter(|after| *after <= end)
    };
    match rtype {
        // No names: A, HINFO, TXT, AAAA, OPT, DS, SSHFP, DNSKEY, NSEC3,
        // NSEC3PARAM, TLSA, CAA.
        1 | 13 | 16 | 28 | 41 | 43 | 44 | 48 | 50 | 51 | 52 | 257 => Some(()),
        // NS, CNAME, PTR, DNAME, NSEC: a name first.
        2 | 5 | 12 | 39 | 47 => name_at(0).map(drop),
        // MX: preference, exchange.
        15 => name_at(2).map(drop),
        // SRV: priority, weight, port, target.
        33 => name_at(6).map(drop),
        // SVCB, HTTPS: priority, target.
        64 | 65 => name_at(2).map(drop),
        // RRSIG: signer's name after 18 fixed bytes.
        46 => name_at(18).map(drop),
        // SOA: two names.
        6 => {
            let after = name_at(0)?;
            name_at(after - start).map(drop)
        }
        _ => None,
    }
}

/// Finds the question name's length and every record's TTL offset in an
/// encoded message without OPT; `None` if it does not walk cleanly.
fn walk(b: &[u8]) -> Option<(usize, Vec<usize>)> {
    let head = b.get(..HEADER)?;
    let count = |i: usize| usize::from(u16::from_be_bytes([head[i], head[i + 1]]));
    if count(4) != 1 {
        return None;
    }
    let qend = skip_name(b, HEADER)?;
    let mut i = qend + 4;
    let records = count(6) + count(8) + count(10);
    let mut ttls = Vec::with_capacity(records);
    for _ in 0..records {
        i = skip_name(b, i)?;
        let fixed = b.get(i..i + 10)?;
        if u16::from_be_bytes([fixed[0], fixed[1]]) == TYPE_OPT {
            return None;
        }
        ttls.push(i + 4);
        i += 10 + usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
    }
    (i == b.len()).then_some((qend - HEADER, ttls))
}

fn skip_name(b: &[u8], mut i: usize) -> Option<usize> {
    loop {
        let len = *b.get(i)?;
        match len & 0xc0 {
            0x00 if len == 0 => return Some(i + 1),
            0x00 => i += 1 + usize::from(len),
            0xc0 => {
                b.get(i + 1)?;
                return Some(i + 2);
            }
            _ => return None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code: a panic is the failure report")]
mod tests {
    use std::net::Ipv4Addr;

    use hickory_proto::op::{Edns, MessageType};

    use super::*;

    fn query(name: &str, edns: Option<(u16, bool)>) -> Vec<u8> {
        query_name(Name::from_ascii(name).unwrap(), edns)
    }

    fn query_name(name: Name, edns: Option<(u16, bool)>) -> Vec<u8> {
        let mut m = Message::new(0xbeef, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(name, RecordType::A));
        if let Some((payload, dnssec_ok)) = edns {
            let mut e = Edns::new();
            e.set_max_payload(payload);
            e.set_dnssec_ok(dnssec_ok);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    #[test]
    fn plain_queries_parse_and_key_lower_cased() {
        let b = query("WWW.Example.com.", Some((1232, true)));
        let q = WireQuery::parse(&b).unwrap();
        assert_eq!((q.id, q.qtype, q.qclass, q.edns), (0xbeef, 1, 1, Some((1232, true))));
        let mut buf = [0u8; MAX_KEY_LEN];
        let n = q.cache_key(&mut buf).unwrap();
        assert_eq!(
            &buf[..n],
            CacheKey::new("www.example.com", 1, 1, true, false).as_bytes()
        );
        assert!(WireQuery::parse(&query("a.test.", None)).unwrap().edns.is_none());
    }

    #[test]
    fn unusual_queries_are_left_to_the_general_path() {
        let ok = query("a.test.", Some((1232, false)));
        assert!(WireQuery::parse(&ok).is_some());
        // Trailing byte, cut short, a response, another opcode, an EDNS
        // option or version, a name that needs escaping, the root.
        let mut trailing = ok.clone();
        trailing.push(0);
        let mut response = ok.clone();
        response[2] |= 0x80;
        let mut notify = ok.clone();
        notify[2] |= 4 << 3;
        let mut version = ok.clone();
        let v = version.len() - 5;
        version[v] = 1;
        let mut option = ok.clone();
        let rdlen = option.len() - 1;
        option[rdlen] = 4;
        option.extend_from_slice(&[0, 10, 0, 0]);
        for bad in [
            trailing,
            ok[..ok.len() - 1].to_vec(),
            response,
            notify,
            version,
            option,
            query_name(Name::from_labels([&b"a.b"[..], b"test"]).unwrap(), None),
            query_name(Name::from_labels([&b"a b"[..], b"test"]).unwrap(), None),
            query_name(Name::from_labels([&b"a\xff"[..], b"test"]).unwrap(), None),
            query_name(Name::root(), None),
        ] {
            assert!(WireQuery::parse(&bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn walk_finds_every_ttl() {
        assert!(walk(&[0; 11]).is_none());
        let mut m = Message::response(0, OpCode::Query);
        let n = Name::from_ascii("a.test.").unwrap();
        m.add_query(Query::query(n.clone(), RecordType::A));
        for i in 0..3u8 {
            m.add_answer(hickory_proto::rr::Record::from_rdata(
                n.clone(),
                100 + u32::from(i),
                hickory_proto::rr::RData::A(hickory_proto::rr::rdata::A(Ipv4Addr::new(192, 0, 2, i))),
            ));
        }
        let b = m.to_vec().unwrap();
        let (qlen, ttls) = walk(&b).unwrap();
        assert_eq!(qlen, 8);
        let got: Vec<u32> = ttls
            .iter()
            .map(|&at| u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
            .collect();
        assert_eq!(got, vec![100, 101, 102]);
    }

    fn patch() -> Patch {
        Patch {
            id: 0x0102,
            recursion_desired: true,
            checking_disabled: false,
            authentic_data: false,
            edns: Some(true),
            payload: 1232,
            limit: 4096,
        }
    }

    fn upstream_answer() -> Vec<u8> {
        let mut m = Message::response(0x9999, OpCode::Query);
        let n = Name::from_ascii("a.test.").unwrap();
        m.add_query(Query::query(n.clone(), RecordType::A));
        m.add_answer(hickory_proto::rr::Record::from_rdata(
            n,
            60,
            hickory_proto::rr::RData::A(hickory_proto::rr::rdata::A(Ipv4Addr::new(192, 0, 2, 1))),
        ));
        let mut e = Edns::new();
        e.set_max_payload(4096);
        m.set_edns(e);
        m.to_vec().unwrap()
    }

    #[test]
    fn patched_answers_swap_header_and_opt() {
        let wire = upstream_answer();
        let out = patch_upstream(&wire, &patch()).unwrap();
        let m = Message::from_vec(&out).unwrap();
        assert_eq!(m.metadata.id, 0x0102);
        assert!(m.metadata.recursion_available && m.metadata.recursion_desired);
        let edns = m.edns.unwrap();
        assert_eq!((edns.max_payload(), edns.flags().dnssec_ok), (1232, true));
        assert_eq!(m.answers.len(), 1);
        // Without client EDNS the OPT is dropped; over the limit, no patch.
        let out = patch_upstream(&wire, &Patch { edns: None, ..patch() }).unwrap();
        assert!(Message::from_vec(&out).unwrap().edns.is_none());
        assert!(patch_upstream(&wire, &Patch { limit: 20, ..patch() }).is_none());
    }

    #[test]
    fn pointers_into_the_header_are_not_patched() {
        let mut wire = upstream_answer();
        // The answer's owner is a pointer to the question (offset 12); aim
        // it at the flags instead, which patching rewrites.
        let at = wire.windows(2).position(|w| w == [0xc0, 12]).unwrap();
        wire[at + 1] = 3;
        assert!(patch_upstream(&wire, &patch()).is_none());
        wire[at + 1] = 12;
        assert!(patch_upstream(&wire, &patch()).is_some());
    }
}
