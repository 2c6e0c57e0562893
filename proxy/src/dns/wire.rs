//! The DNS proxy's shared wire-level types, a leaf the other `dns` modules
//! build on (it imports none of them): the cache key, the pre-encoded
//! answer of the fast path, and the addresses an answer binds to its name.

use std::net::IpAddr;

use hickory_proto::rr::rdata::svcb::SvcParamValue;
use hickory_proto::rr::{Name, RData, Record};

/// What identifies a cacheable question: (qname, qtype, qclass, DO, CD),
/// kept as one byte string so the engine's wire fast path can look an
/// entry up from a key it built on the stack ([`CacheKey::encode`]),
/// without allocating. Layout: qtype and qclass (big-endian), a flags byte
/// (DO = 1, CD = 2), then the lower-cased presentation name, so
/// `Example.COM` and `example.com` share an entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey(Box<[u8]>);

/// Longest encoded key: the fixed part and a 253-byte presentation name
/// (with room to spare for a name the caller has not length-checked).
pub const MAX_KEY_LEN: usize = KEY_PREFIX + 255;
const KEY_PREFIX: usize = 5;

impl CacheKey {
    /// `qname` must be the canonical (lower-case) presentation form.
    pub fn new(qname: &str, qtype: u16, qclass: u16, dnssec_ok: bool, checking_disabled: bool) -> Self {
        let mut buf = [0u8; MAX_KEY_LEN];
        let len =
            Self::encode(&mut buf, qname.as_bytes(), qtype, qclass, dnssec_ok, checking_disabled).unwrap_or(KEY_PREFIX);
        Self(buf[..len].into())
    }

    /// Writes the key for these fields into `buf`, returning its length
    /// (`None` if the name does not fit).
    pub fn encode(
        buf: &mut [u8; MAX_KEY_LEN],
        qname: &[u8],
        qtype: u16,
        qclass: u16,
        dnssec_ok: bool,
        checking_disabled: bool,
    ) -> Option<usize> {
        let end = KEY_PREFIX.checked_add(qname.len()).filter(|e| *e <= MAX_KEY_LEN)?;
        buf[..2].copy_from_slice(&qtype.to_be_bytes());
        buf[2..4].copy_from_slice(&qclass.to_be_bytes());
        buf[4] = u8::from(dnssec_ok) | (u8::from(checking_disabled) << 1);
        buf[KEY_PREFIX..end].copy_from_slice(qname);
        Some(end)
    }

    pub fn qtype(&self) -> u16 {
        u16::from_be_bytes([self.0[0], self.0[1]])
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::borrow::Borrow<[u8]> for CacheKey {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

/// A cache entry's answer, encoded once for the fast path.
#[derive(Debug)]
pub struct WireAnswer {
    /// The whole message without OPT: ID and flags are overwritten per
    /// query, the question name too (same length, the client's case).
    pub(super) bytes: Vec<u8>,
    pub(super) qname_len: usize,
    /// Where each record's TTL sits in `bytes`.
    pub(super) ttl_offsets: Vec<usize>,
    /// Addresses the answer binds to the name, with their record TTLs (what
    /// the general path records for a hit, worked out once).
    pub binds: Vec<(IpAddr, u32)>,
}

/// Every address `answers` hand out for `wire_qname` (following CNAMEs, and
/// including HTTPS/SVCB address hints), with its record's TTL.
pub fn bound_addrs(wire_qname: &Name, answers: &[Record]) -> Vec<(IpAddr, u32)> {
    let mut chain: Vec<&Name> = vec![wire_qname];
    // Follow the chain whatever order the records came in; each pass
    // adds at least one name or stops, so this is bounded by answers.len().
    loop {
        let before = chain.len();
        for record in answers {
            if let RData::CNAME(target) = &record.data
                && chain.contains(&&record.name)
                && !chain.contains(&&target.0)
            {
                chain.push(&target.0);
            }
        }
        if chain.len() == before {
            break;
        }
    }
    let mut out = Vec::new();
    for record in answers {
        if !chain.contains(&&record.name) {
            continue;
        }
        let mut put = |ip: IpAddr| out.push((ip, record.ttl));
        match &record.data {
            RData::A(a) => put(IpAddr::V4(a.0)),
            RData::AAAA(aaaa) => put(IpAddr::V6(aaaa.0)),
            RData::HTTPS(https) => hints(&https.0.svc_params, &mut put),
            RData::SVCB(svcb) => hints(&svcb.svc_params, &mut put),
            _ => {}
        }
    }
    out
}

/// Hands each address hint of an HTTPS/SVCB record to `put`: clients may
/// connect to hints without ever asking for A/AAAA.
fn hints(params: &[(hickory_proto::rr::rdata::svcb::SvcParamKey, SvcParamValue)], put: &mut impl FnMut(IpAddr)) {
    for (_, value) in params {
        match value {
            SvcParamValue::Ipv4Hint(h) => h.0.iter().for_each(|a| put(IpAddr::V4(a.0))),
            SvcParamValue::Ipv6Hint(h) => h.0.iter().for_each(|a| put(IpAddr::V6(a.0))),
            _ => {}
        }
    }
}
