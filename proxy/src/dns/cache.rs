//! Response cache for allowed queries.
//!
//! Sits between the policy decision and the forwarder: a query the policy
//! allows (or only watches) is looked up here first, and an upstream answer
//! is stored here before it is returned. Policy is never cached — it runs on
//! every query — only upstream data is.
//!
//! Positive answers live for their smallest TTL; negative answers (NXDOMAIN
//! and NODATA) for min(SOA TTL, SOA MINIMUM) per RFC 2308 §5, and are not
//! cached without an SOA. Both are capped by configuration. On a hit, every
//! TTL is decremented by the time the entry has spent here. Entries are keyed
//! by (qname, qtype, qclass, DO, CD): DO changes which records are present,
//! and a CD=1 answer may hold data a validating upstream would have refused.
//! Bounded by entry count: sharded LRUs under short-held mutexes; entries are
//! `Arc`s so a hit copies records outside the lock.

use std::hash::BuildHasher;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{RData, Record};
use lru::LruCache;
use sluice_api::DomainName;

use super::config::CacheConfig;
use super::wire::WireAnswer;
pub use super::wire::{CacheKey, MAX_KEY_LEN};

const SHARDS: usize = 16;

/// A stored upstream answer (OPT removed; ECH already stripped if configured).
#[derive(Debug)]
pub struct CacheEntry {
    /// The canonical query name (the policy and the bindings want it on a
    /// fast-path hit, which never parses the name into one).
    pub qname: DomainName,
    /// The same name, shared into every audit record served from here.
    pub qname_shared: Arc<str>,
    pub rcode: ResponseCode,
    pub authentic_data: bool,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
    pub ech_stripped: bool,
    /// The answer pre-encoded for the wire fast path, made on its first use
    /// (`None` inside: this entry cannot be served that way).
    pub wire: std::sync::OnceLock<Option<WireAnswer>>,
    inserted: Instant,
    expires: Instant,
}

/// An entry as it should be served at a given moment.
#[derive(Debug)]
pub struct CacheHit {
    pub entry: Arc<CacheEntry>,
    /// Whole seconds the entry has been cached; subtract from every TTL.
    pub age_secs: u32,
}

impl CacheEntry {
    /// When the entry was cached: its records' TTLs count from here.
    pub fn cached_at(&self) -> Instant {
        self.inserted
    }

    /// Records with TTLs aged by `age_secs`.
    pub fn aged(records: &[Record], age_secs: u32) -> Vec<Record> {
        records
            .iter()
            .map(|r| {
                let mut r = r.clone();
                r.ttl = r.ttl.saturating_sub(age_secs);
                r
            })
            .collect()
    }
}

type Shard = LruCache<CacheKey, Arc<CacheEntry>>;

#[derive(Debug)]
pub struct DnsCache {
    shards: Box<[Mutex<Shard>]>,
    hasher: foldhash::fast::RandomState,
    config: CacheConfig,
}

impl DnsCache {
    pub fn new(config: &CacheConfig) -> Self {
        let per_shard = NonZeroUsize::new(config.max_entries.div_ceil(SHARDS).max(1)).unwrap_or(NonZeroUsize::MIN);
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(LruCache::new(per_shard))).collect(),
            hasher: foldhash::fast::RandomState::default(),
            config: config.clone(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.config.max_entries > 0
    }

    pub fn get(&self, key: &CacheKey, now: Instant) -> Option<CacheHit> {
        self.get_bytes(key.as_bytes(), now)
    }

    /// Looks an entry up by an encoded key ([`CacheKey::encode`]).
    pub fn get_bytes(&self, key: &[u8], now: Instant) -> Option<CacheHit> {
        if !self.enabled() {
            return None;
        }
        let mut shard = self.shard(key);
        let entry = shard.get(key)?;
        if entry.expires <= now {
            shard.pop(key);
            return None;
        }
        let entry = Arc::clone(entry);
        drop(shard);
        let age = now.saturating_duration_since(entry.inserted).as_secs();
        Some(CacheHit {
            entry,
            age_secs: u32::try_from(age).unwrap_or(u32::MAX),
        })
    }

    /// Stores an upstream answer if it is cacheable; returns whether it was.
    #[allow(clippy::too_many_arguments, reason = "mirrors the message sections")]
    pub fn insert(
        &self,
        key: CacheKey,
        qname: &DomainName,
        rcode: ResponseCode,
        authentic_data: bool,
        answers: &[Record],
        authorities: &[Record],
        additionals: &[Record],
        ech_stripped: bool,
        now: Instant,
    ) -> bool {
        if !self.enabled() {
            return false;
        }
        let Some(ttl) = self.lifetime(rcode, answers, authorities, additionals) else {
            return false;
        };
        if ttl.is_zero() {
            return false;
        }
        let entry = Arc::new(CacheEntry {
            qname: qname.clone(),
            qname_shared: Arc::from(qname.as_str()),
            rcode,
            authentic_data,
            answers: answers.to_vec(),
            authorities: authorities.to_vec(),
            additionals: additionals.to_vec(),
            ech_stripped,
            wire: std::sync::OnceLock::new(),
            inserted: now,
            expires: now + ttl,
        });
        self.shard(key.as_bytes()).put(key, entry);
        true
    }

    /// How long an answer may be cached, or `None` if it must not be.
    pub fn lifetime(
        &self,
        rcode: ResponseCode,
        answers: &[Record],
        authorities: &[Record],
        additionals: &[Record],
    ) -> Option<Duration> {
        let negative = match rcode {
            ResponseCode::NXDomain => true,
            ResponseCode::NoError => answers.is_empty(),
            // SERVFAIL and friends describe the upstream's state, not the name's.
            _ => return None,
        };
        if negative {
            // RFC 2308 §5: the SOA in the authority section sets the lifetime,
            // min(its TTL, its MINIMUM); without one, do not cache.
            let soa_ttl = authorities.iter().find_map(|r| match &r.data {
                RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                _ => None,
            })?;
            let ttl = Duration::from_secs(u64::from(soa_ttl));
            return Some(ttl.min(self.config.max_negative_ttl));
        }
        let min = answers
            .iter()
            .chain(authorities)
            .chain(additionals)
            .map(|r| r.ttl)
            .min()?;
        Some(Duration::from_secs(u64::from(min)).min(self.config.max_ttl))
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, key: &[u8]) -> MutexGuard<'_, Shard> {
        lock(&self.shards[super::spread(self.hasher.hash_one(key), SHARDS)])
    }
}

/// See `bindings::lock`: a poisoned shard still holds a valid LRU.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code: a panic is the failure report")]
mod tests {
    use std::net::Ipv4Addr;
    use std::str::FromStr;

    use hickory_proto::rr::Name;
    use hickory_proto::rr::rdata::{A, SOA};

    use super::*;

    fn key(name: &str) -> CacheKey {
        CacheKey::new(name, 1, 1, false, false)
    }

    fn dn() -> DomainName {
        DomainName::parse("a.test").unwrap()
    }

    #[test]
    fn keys_differ_by_every_field_and_encode_matches_new() {
        let k = CacheKey::new("a.test", 28, 1, true, false);
        assert_eq!(k.qtype(), 28);
        let mut buf = [0u8; MAX_KEY_LEN];
        let n = CacheKey::encode(&mut buf, b"a.test", 28, 1, true, false).unwrap();
        assert_eq!(&buf[..n], k.as_bytes());
        for other in [
            CacheKey::new("a.tes", 28, 1, true, false),
            CacheKey::new("a.test", 1, 1, true, false),
            CacheKey::new("a.test", 28, 3, true, false),
            CacheKey::new("a.test", 28, 1, false, false),
            CacheKey::new("a.test", 28, 1, true, true),
        ] {
            assert_ne!(k, other);
        }
    }

    fn a(ttl: u32) -> Record {
        Record::from_rdata(
            Name::from_str("a.test.").unwrap(),
            ttl,
            RData::A(A(Ipv4Addr::LOCALHOST)),
        )
    }

    fn soa(ttl: u32, minimum: u32) -> Record {
        let n = Name::from_str("test.").unwrap();
        Record::from_rdata(
            n.clone(),
            ttl,
            RData::SOA(SOA::new(n.clone(), n, 1, 3600, 600, 86400, minimum)),
        )
    }

    #[test]
    fn positive_entry_ages_and_expires() {
        let c = DnsCache::new(&CacheConfig::default());
        let t0 = Instant::now();
        assert!(c.insert(
            key("a.test"),
            &dn(),
            ResponseCode::NoError,
            false,
            &[a(30), a(10)],
            &[],
            &[],
            false,
            t0
        ));
        let hit = c.get(&key("a.test"), t0 + Duration::from_secs(4)).unwrap();
        assert_eq!(hit.age_secs, 4);
        assert_eq!(CacheEntry::aged(&hit.entry.answers, hit.age_secs)[1].ttl, 6);
        assert!(c.get(&key("a.test"), t0 + Duration::from_secs(10)).is_none());
        assert!(c.is_empty());
    }

    #[test]
    fn negative_uses_soa_minimum_and_needs_soa() {
        let c = DnsCache::new(&CacheConfig::default());
        assert_eq!(
            c.lifetime(ResponseCode::NXDomain, &[], &[soa(3600, 300)], &[]),
            Some(Duration::from_secs(300))
        );
        assert_eq!(
            c.lifetime(ResponseCode::NoError, &[], &[soa(120, 300)], &[]),
            Some(Duration::from_secs(120))
        );
        assert_eq!(c.lifetime(ResponseCode::NXDomain, &[], &[], &[]), None);
        assert_eq!(c.lifetime(ResponseCode::ServFail, &[a(30)], &[], &[]), None);
    }

    #[test]
    fn zero_ttl_and_disabled_cache_store_nothing() {
        let c = DnsCache::new(&CacheConfig::default());
        let t0 = Instant::now();
        assert!(!c.insert(
            key("a.test"),
            &dn(),
            ResponseCode::NoError,
            false,
            &[a(0)],
            &[],
            &[],
            false,
            t0
        ));
        let off = DnsCache::new(&CacheConfig {
            max_entries: 0,
            ..CacheConfig::default()
        });
        assert!(!off.insert(
            key("a.test"),
            &dn(),
            ResponseCode::NoError,
            false,
            &[a(9)],
            &[],
            &[],
            false,
            t0
        ));
    }
}
