//! Detection of exfiltration-shaped queries.
//!
//! DNS tunnels and exfiltration tools encode data into query names: long
//! labels, labels that look random, and a stream of never-repeating
//! subdomains under one parent they control. The detector is a query filter
//! (`sluice.dns-exfiltration`) after the policy: for a query the policy
//! allows, a hit turns the verdict into a denial with reason
//! `dns-exfiltration` (enforced unless the policy verdict was in watch
//! mode). Off unless configured. The per-(source, parent) windows are bounded
//! by an LRU; time is passed in.

use std::collections::HashSet;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lru::LruCache;
use sluice_api::DomainName;

use super::config::ExfilConfig;

const WINDOW: Duration = Duration::from_secs(60);

/// Why a name was flagged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExfilSignal {
    LongLabel,
    HighEntropyLabel,
    TooManySubdomains,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    seen: HashSet<u64>,
}

#[derive(Debug)]
pub struct ExfilDetector {
    config: ExfilConfig,
    windows: Mutex<LruCache<(IpAddr, Box<str>), Window>>,
    hasher: foldhash::fast::RandomState,
}

impl ExfilDetector {
    pub fn new(config: ExfilConfig) -> Self {
        let cap = NonZeroUsize::new(config.max_tracked).unwrap_or(NonZeroUsize::MIN);
        Self {
            config,
            windows: Mutex::new(LruCache::new(cap)),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    /// Checks one allowed query; `Some` means it looks like exfiltration.
    pub fn check(&self, src: IpAddr, name: &DomainName, now: Instant) -> Option<ExfilSignal> {
        let labels: Vec<&str> = name.as_str().split('.').collect();
        // The registrable part is chosen by the owner of the zone, not the
        // tunnel; only what is in front of it is checked and counted.
        let front = labels.len().saturating_sub(registrable_labels(&labels));
        for label in &labels[..front] {
            if label.len() > self.config.max_label_len {
                return Some(ExfilSignal::LongLabel);
            }
            if label.len() >= self.config.entropy_min_len && shannon_entropy(label) > self.config.entropy_threshold {
                return Some(ExfilSignal::HighEntropyLabel);
            }
        }
        if front == 0 {
            return None;
        }
        let split = labels[..front].iter().map(|l| l.len() + 1).sum::<usize>();
        let (sub, parent) = name.as_str().split_at(split);
        let sub_hash = self.hasher.hash_one(sub);
        let mut windows = self.windows.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let window = windows.get_or_insert_mut((src.to_canonical(), parent.into()), || Window {
            start: now,
            seen: HashSet::new(),
        });
        if now.saturating_duration_since(window.start) >= WINDOW {
            window.start = now;
            window.seen.clear();
        }
        let limit = self.config.max_unique_subdomains_per_minute;
        if window.seen.contains(&sub_hash) {
            return None;
        }
        if window.seen.len() >= limit {
            // Keep the set bounded: past the limit every new name is flagged
            // anyway, so there is nothing more to remember.
            return Some(ExfilSignal::TooManySubdomains);
        }
        window.seen.insert(sub_hash);
        None
    }
}

/// Labels in the registrable part of a name, without a public-suffix list:
/// two (`example.com`), or three under a two-letter country code with a
/// short second level (`example.co.uk`, `example.com.au`), so that all of
/// `co.uk` is not counted as one parent.
fn registrable_labels(labels: &[&str]) -> usize {
    match labels {
        [.., second, tld] if labels.len() >= 3 && tld.len() == 2 && second.len() <= 3 => 3,
        _ => 2,
    }
}

/// Shannon entropy of the label's bytes, in bits per character.
pub fn shannon_entropy(label: &str) -> f64 {
    let mut counts = [0u32; 256];
    for b in label.bytes() {
        counts[usize::from(b)] += 1;
    }
    let n = label.len() as f64;
    if n == 0.0 {
        return 0.0;
    }
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code: a panic is the failure report")]
mod tests {
    use super::*;

    fn name(s: &str) -> DomainName {
        DomainName::parse(s).unwrap()
    }

    #[test]
    fn flags_long_and_random_labels_not_ordinary_ones() {
        let d = ExfilDetector::new(ExfilConfig::default());
        let src: IpAddr = "10.0.0.1".parse().unwrap();
        let now = Instant::now();
        assert_eq!(d.check(src, &name("www.example.com"), now), None);
        assert_eq!(
            d.check(src, &name("kubernetes-production-cluster.example.com"), now),
            None
        );
        let long = format!("{}.evil.test", "a".repeat(51));
        assert_eq!(d.check(src, &name(&long), now), Some(ExfilSignal::LongLabel));
        assert_eq!(
            d.check(src, &name("x9fk2lq8zm3bv7wpt4ysn6hcr1dj5.evil.test"), now),
            Some(ExfilSignal::HighEntropyLabel)
        );
    }

    #[test]
    fn counts_unique_subdomains_per_minute() {
        let config = ExfilConfig {
            max_unique_subdomains_per_minute: 3,
            ..ExfilConfig::default()
        };
        let d = ExfilDetector::new(config);
        let src: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(d.check(src, &name(&format!("s{i}.evil.test")), t0), None);
        }
        // Repeats are free; a fourth new one is not.
        assert_eq!(d.check(src, &name("s0.evil.test"), t0), None);
        assert_eq!(
            d.check(src, &name("s3.evil.test"), t0),
            Some(ExfilSignal::TooManySubdomains)
        );
        // Another source has its own window; a new minute starts afresh.
        assert_eq!(d.check("10.0.0.2".parse().unwrap(), &name("s3.evil.test"), t0), None);
        assert_eq!(d.check(src, &name("s3.evil.test"), t0 + WINDOW), None);
    }

    #[test]
    fn country_code_second_levels_are_not_one_parent() {
        let config = ExfilConfig {
            max_unique_subdomains_per_minute: 2,
            ..ExfilConfig::default()
        };
        let d = ExfilDetector::new(config);
        let src: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        for site in ["a", "b", "c", "d"] {
            assert_eq!(d.check(src, &name(&format!("www.{site}.co.uk")), t0), None);
        }
        assert_eq!(d.check(src, &name("x.tunnel.co.uk"), t0), None);
        assert_eq!(d.check(src, &name("y.tunnel.co.uk"), t0), None);
        assert_eq!(
            d.check(src, &name("z.tunnel.co.uk"), t0),
            Some(ExfilSignal::TooManySubdomains)
        );
    }
}

/// The detector as a query filter.
#[derive(Debug)]
pub struct ExfilFilter {
    detector: ExfilDetector,
    stats: std::sync::Arc<super::audit::DnsStats>,
}

impl ExfilFilter {
    pub fn new(config: ExfilConfig, stats: std::sync::Arc<super::audit::DnsStats>) -> Self {
        Self {
            detector: ExfilDetector::new(config),
            stats,
        }
    }
}

impl super::policy::QueryFilter for ExfilFilter {
    fn name(&self) -> &str {
        "sluice.dns-exfiltration"
    }

    fn on_query(
        &self,
        q: &super::policy::QueryInfo<'_>,
        verdict: &super::policy::QueryVerdict,
    ) -> super::policy::QueryStatus {
        use super::policy::{QueryStatus, RuleLabel, reason};
        // Only what the policy lets through is worth a look (and only it
        // counts toward a parent's window).
        if !verdict.allow || self.detector.check(q.src, q.qname, q.now).is_none() {
            return QueryStatus::Continue;
        }
        super::audit::DnsStats::bump(&self.stats.exfiltration_flagged);
        QueryStatus::Deny(super::policy::Decision {
            allow: false,
            rule: RuleLabel::Builtin(reason::EXFILTRATION_RULE),
            reason: sluice_api::reason::ReasonCode::DnsExfiltration,
            enforcement: verdict.enforcement,
            check: None,
            source: None,
            notes: None,
        })
    }
}
