//! Load balancing across an Envoy cluster's endpoints (a chain from xDS
//! whose `tcp_proxy` names a STATIC, STRICT_DNS, LOGICAL_DNS or EDS
//! cluster): which endpoint a flow is sent to, and which ones after it if
//! connecting fails.
//!
//! As in Envoy: endpoints are grouped by priority; a priority level takes
//! the share of flows its healthy endpoints earn (scaled by the
//! overprovisioning factor, spilling the rest to the next level, degraded
//! endpoints used only when healthy ones fall short); a level with fewer
//! than half of its endpoints usable is in *panic* and uses all of them,
//! health ignored. Within the chosen group:
//! - round robin follows a smooth weighted schedule (each endpoint in
//!   proportion to its weight, interleaved), from a random start;
//! - random draws in proportion to weight;
//! - least request draws `choice_count` endpoints and takes the one with
//!   fewest active flows (with unequal weights, the highest weight per
//!   active flow).
//!
//! A DNS cluster's names are resolved when a flow needs them, through the
//! gateway's resolver and its TTL-respecting cache, and a resolution is
//! kept no longer than the cluster's `dns_refresh_rate`.
//!
//! Picking takes no lock: the table is swapped whole, counters are atomic.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use arc_swap::ArcSwapOption;
use sluice_api::envoy::{
    BalancedCluster, DnsFamily, DnsSettings, EndpointAddress, Endpoints, Health, LbPolicy, Locality,
};

/// A cluster's running state, shared by every chain (of every listener)
/// that sends flows to it, and kept across configuration changes that
/// leave the cluster as it was.
#[derive(Debug)]
pub struct Balancer {
    def: BalancedCluster,
    table: ArcSwapOption<Table>,
    /// A flow is resolving the names again; others use the old table
    /// meanwhile.
    refreshing: AtomicBool,
    /// Active flows by endpoint, kept across tables so a re-resolution
    /// does not forget them.
    active: Mutex<HashMap<SocketAddr, Weak<AtomicU32>>>,
}

/// One resolution (or the fixed endpoints), ready to pick from.
#[derive(Debug)]
struct Table {
    levels: Vec<Level>,
    /// Per mille shares of the levels' groups, in order; they add up to
    /// 1000 (or the table is empty).
    shares: Vec<(usize, Group, u32)>,
    at: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    Healthy,
    Degraded,
    /// Panic: every endpoint of the level, health ignored.
    All,
}

#[derive(Debug)]
struct Level {
    healthy: Pool,
    degraded: Pool,
    all: Pool,
}

impl Level {
    fn pool(&self, g: Group) -> &Pool {
        match g {
            Group::Healthy => &self.healthy,
            Group::Degraded => &self.degraded,
            Group::All => &self.all,
        }
    }
}

#[derive(Debug)]
struct Member {
    addr: SocketAddr,
    weight: u32,
    active: Arc<AtomicU32>,
}

#[derive(Debug)]
struct Pool {
    members: Vec<Member>,
    /// Member indices in smooth weighted round-robin order.
    schedule: Vec<u32>,
    next: AtomicUsize,
    /// Cumulative weights, for weighted random draws.
    cumulative: Vec<u64>,
    uniform: bool,
}

/// The longest a round-robin schedule gets; weights are scaled down to fit.
const MAX_SCHEDULE: u64 = 4096;

impl Pool {
    fn new(members: Vec<Member>) -> Self {
        let total: u64 = members.iter().map(|m| u64::from(m.weight)).sum();
        let uniform = members.windows(2).all(|w| w[0].weight == w[1].weight);
        let weights: Vec<u64> = if uniform {
            vec![1; members.len()]
        } else {
            let scale = total.div_ceil(MAX_SCHEDULE).max(1);
            members.iter().map(|m| (u64::from(m.weight) / scale).max(1)).collect()
        };
        // Smooth weighted round robin: each step every member gains its
        // weight, the richest is chosen and pays the total.
        let sum: i64 = weights.iter().map(|w| *w as i64).sum();
        let mut current = vec![0i64; weights.len()];
        let mut schedule = Vec::with_capacity(sum as usize);
        for _ in 0..sum {
            let mut best = 0;
            for (i, w) in weights.iter().enumerate() {
                current[i] += *w as i64;
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= sum;
            schedule.push(best as u32);
        }
        let cumulative = members
            .iter()
            .scan(0u64, |acc, m| {
                *acc += u64::from(m.weight);
                Some(*acc)
            })
            .collect();
        let start = if schedule.is_empty() {
            0
        } else {
            rand::random_range(0..schedule.len())
        };
        Self {
            members,
            schedule,
            next: AtomicUsize::new(start),
            cumulative,
            uniform,
        }
    }

    fn pick(&self, lb: LbPolicy) -> Option<&Member> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        if n == 1 {
            return self.members.first();
        }
        match lb {
            LbPolicy::RoundRobin | LbPolicy::ClusterProvided => {
                let i = self.next.fetch_add(1, Ordering::Relaxed) % self.schedule.len();
                self.members.get(*self.schedule.get(i)? as usize)
            }
            LbPolicy::Random => self.weighted_random(),
            LbPolicy::LeastRequest { choice_count } => {
                let mut best: Option<&Member> = None;
                for _ in 0..choice_count.max(1) {
                    let c = if self.uniform {
                        self.members.get(rand::random_range(0..n))
                    } else {
                        self.weighted_random()
                    };
                    let Some(c) = c else { continue };
                    best = match best {
                        None => Some(c),
                        Some(b) if lighter(c, b) => Some(c),
                        keep => keep,
                    };
                }
                best
            }
        }
    }

    fn weighted_random(&self) -> Option<&Member> {
        let total = *self.cumulative.last()?;
        if total == 0 {
            return self.members.first();
        }
        let r = rand::random_range(0..total);
        let i = self.cumulative.partition_point(|c| *c <= r);
        self.members.get(i)
    }
}

/// `a` carries less load than `b`: fewer active flows per unit of weight.
fn lighter(a: &Member, b: &Member) -> bool {
    let load = |m: &Member| (u64::from(m.active.load(Ordering::Relaxed)) + 1) * 1_000_000 / u64::from(m.weight.max(1));
    load(a) < load(b)
}

/// Holds one active flow on an endpoint (for least request) until dropped.
#[derive(Debug)]
pub struct ActiveGuard(Arc<AtomicU32>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a balanced cluster has nowhere to send a flow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BalanceError {
    #[error("cluster `{0}` has no endpoint")]
    NoEndpoint(String),
    #[error("cluster `{cluster}`: resolving `{host}`: {reason}")]
    Resolve {
        cluster: String,
        host: String,
        reason: &'static str,
    },
}

impl BalanceError {
    /// The close reason in the flow's record.
    pub fn reason_code(&self) -> &'static str {
        match self {
            Self::NoEndpoint(_) => "no-healthy-upstream",
            Self::Resolve { reason, .. } => reason,
        }
    }
}

/// Every balancer alive, by cluster name: a configuration change that
/// keeps a cluster as it was keeps its state.
static LIVE: Mutex<Vec<Weak<Balancer>>> = Mutex::new(Vec::new());

impl Balancer {
    /// The balancer for `def`: the live one if the cluster is unchanged,
    /// else a new one.
    pub fn shared(def: &BalancedCluster) -> Arc<Self> {
        let mut live = LIVE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        live.retain(|w| w.strong_count() > 0);
        if let Some(b) = live.iter().filter_map(Weak::upgrade).find(|b| b.def == *def) {
            return b;
        }
        let b = Arc::new(Self::new(def.clone()));
        live.push(Arc::downgrade(&b));
        b
    }

    pub fn new(def: BalancedCluster) -> Self {
        let b = Self {
            def,
            table: ArcSwapOption::empty(),
            refreshing: AtomicBool::new(false),
            active: Mutex::new(HashMap::new()),
        };
        if let Endpoints::Fixed { localities } = &b.def.endpoints {
            let members = localities
                .iter()
                .flat_map(|loc| {
                    loc.endpoints.iter().filter_map(move |e| match e.address {
                        EndpointAddress::Ip(a) => Some((loc.priority, a, e.weight, e.health)),
                        EndpointAddress::Name(_) => None,
                    })
                })
                .collect();
            b.table.store(Some(Arc::new(b.build(members))));
        }
        b
    }

    pub fn name(&self) -> &str {
        &self.def.name
    }

    /// Up to `attempts` endpoints to try in order, each picked by the
    /// cluster's balancing (distinct while there are others to pick).
    /// `resolve` looks a DNS cluster's names up when its last resolution
    /// is too old.
    pub async fn pick<F, Fut>(&self, attempts: u32, resolve: F) -> Result<Vec<SocketAddr>, BalanceError>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<IpAddr>, &'static str>>,
    {
        let table = self.current(resolve).await?;
        let mut out: Vec<SocketAddr> = Vec::with_capacity(attempts as usize);
        // Bounded: a cluster with fewer endpoints than attempts repeats.
        for _ in 0..attempts.max(1).saturating_mul(4) {
            if out.len() >= attempts.max(1) as usize {
                break;
            }
            let Some(m) = table.pick(self.def.lb) else { break };
            if !out.contains(&m.addr) || table.distinct() <= out.len() {
                out.push(m.addr);
            }
        }
        if out.is_empty() {
            return Err(BalanceError::NoEndpoint(self.def.name.clone()));
        }
        Ok(out)
    }

    /// Counts a flow connected to `addr` as active until the guard drops.
    pub fn track(&self, addr: SocketAddr) -> Option<ActiveGuard> {
        let table = self.table.load();
        let m = table
            .as_ref()?
            .levels
            .iter()
            .flat_map(|l| &l.all.members)
            .find(|m| m.addr == addr)?;
        m.active.fetch_add(1, Ordering::Relaxed);
        Some(ActiveGuard(m.active.clone()))
    }

    /// The table to pick from: the fixed one, or a resolution young
    /// enough (resolving again when it is not).
    async fn current<F, Fut>(&self, resolve: F) -> Result<Arc<Table>, BalanceError>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<IpAddr>, &'static str>>,
    {
        let dns = match &self.def.endpoints {
            Endpoints::Fixed { .. } => None,
            Endpoints::StrictDns { dns, .. } | Endpoints::LogicalDns { dns, .. } => Some(*dns),
        };
        let old = self.table.load_full();
        let Some(dns) = dns else {
            return old.ok_or_else(|| BalanceError::NoEndpoint(self.def.name.clone()));
        };
        if let Some(t) = &old {
            let fresh = t.at.elapsed() < dns.refresh_rate;
            // One flow resolves again; the others keep the old table.
            if fresh || self.refreshing.swap(true, Ordering::AcqRel) {
                return Ok(t.clone());
            }
        }
        let result = self.resolve(dns, resolve).await;
        self.refreshing.store(false, Ordering::Release);
        match result {
            Ok(t) => {
                let t = Arc::new(t);
                self.table.store(Some(t.clone()));
                Ok(t)
            }
            // A failed refresh keeps the last good resolution.
            Err(e) => old.ok_or(e),
        }
    }

    async fn resolve<F, Fut>(&self, dns: DnsSettings, resolve: F) -> Result<Table, BalanceError>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<IpAddr>, &'static str>>,
    {
        let mut members = Vec::new();
        let mut failure = None;
        match &self.def.endpoints {
            Endpoints::Fixed { .. } => {}
            Endpoints::StrictDns { localities, .. } => {
                for (priority, weight, health, hp) in named(localities) {
                    match resolve(hp.host.clone()).await {
                        Ok(ips) => {
                            for ip in family(dns.family, &ips) {
                                members.push((priority, SocketAddr::new(ip, hp.port), weight, health));
                            }
                        }
                        Err(reason) => failure = Some((hp.host, reason)),
                    }
                }
            }
            Endpoints::LogicalDns { endpoint, .. } => match resolve(endpoint.host.clone()).await {
                Ok(ips) => {
                    if let Some(ip) = family(dns.family, &ips).first() {
                        members.push((0, SocketAddr::new(*ip, endpoint.port), 1, Health::Healthy));
                    }
                }
                Err(reason) => failure = Some((endpoint.host.clone(), reason)),
            },
        }
        match failure {
            Some((host, reason)) if members.is_empty() => Err(BalanceError::Resolve {
                cluster: self.def.name.clone(),
                host,
                reason,
            }),
            _ => Ok(self.build(members)),
        }
    }

    fn counter(&self, addr: SocketAddr) -> Arc<AtomicU32> {
        let mut active = self.active.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        active.retain(|_, w| w.strong_count() > 0);
        if let Some(c) = active.get(&addr).and_then(Weak::upgrade) {
            return c;
        }
        let c = Arc::new(AtomicU32::new(0));
        active.insert(addr, Arc::downgrade(&c));
        c
    }

    /// Levels by priority and their shares.
    fn build(&self, mut members: Vec<(u32, SocketAddr, u32, Health)>) -> Table {
        members.sort_by_key(|m| m.0);
        let mut levels = Vec::new();
        let mut counts = Vec::new();
        for chunk in members.chunk_by(|a, b| a.0 == b.0) {
            let of = |keep: &dyn Fn(Health) -> bool| {
                Pool::new(
                    chunk
                        .iter()
                        .filter(|m| keep(m.3))
                        .map(|m| Member {
                            addr: m.1,
                            weight: m.2.max(1),
                            active: self.counter(m.1),
                        })
                        .collect(),
                )
            };
            // Draining endpoints are out altogether, as in Envoy: they do
            // not even count towards a level's panic.
            let healthy = of(&|h| h == Health::Healthy);
            let degraded = of(&|h| h == Health::Degraded);
            let all = of(&|h| h != Health::Draining);
            counts.push((healthy.members.len(), degraded.members.len(), all.members.len()));
            levels.push(Level { healthy, degraded, all });
        }
        Table {
            shares: shares(&counts, self.def.overprovisioning_factor),
            levels,
            at: Instant::now(),
        }
    }
}

/// Every endpoint of a DNS cluster: its priority, weight, health and
/// `host:port` (an address literal resolves to itself).
fn named(localities: &[Locality]) -> Vec<(u32, u32, Health, sluice_api::HostPort)> {
    localities
        .iter()
        .flat_map(|loc| {
            loc.endpoints.iter().map(move |e| {
                let hp = match &e.address {
                    EndpointAddress::Name(hp) => hp.clone(),
                    EndpointAddress::Ip(a) => sluice_api::HostPort {
                        host: a.ip().to_string(),
                        port: a.port(),
                    },
                };
                (loc.priority, e.weight, e.health, hp)
            })
        })
        .collect()
}

/// The per mille share of each level's groups, by Envoy's rules: a level
/// earns `overprovisioning × usable / total` (at most all), healthy first,
/// degraded with what healthy left over, and the shares are scaled to fill
/// the whole when the levels together earn less. A level whose usable
/// endpoints are fewer than half of all its endpoints is in panic.
fn shares(counts: &[(usize, usize, usize)], overprovisioning: u32) -> Vec<(usize, Group, u32)> {
    let earn = |n: usize, total: usize| -> u64 {
        if total == 0 {
            0
        } else {
            (u64::from(overprovisioning) * n as u64 * 10 / total as u64).min(1000)
        }
    };
    let healthy: Vec<u64> = counts.iter().map(|c| earn(c.0, c.2)).collect();
    let degraded: Vec<u64> = counts
        .iter()
        .zip(&healthy)
        .map(|(c, h)| earn(c.1, c.2).min(1000 - h))
        .collect();
    let total: u64 = healthy.iter().chain(&degraded).sum::<u64>().min(1000);
    if total == 0 {
        // Nothing usable anywhere: the first level that has endpoints, in
        // panic.
        return counts
            .iter()
            .position(|c| c.2 > 0)
            .map(|i| vec![(i, Group::All, 1000)])
            .unwrap_or_default();
    }
    let mut out = Vec::new();
    let mut left: u64 = 1000;
    for (g, earned) in [(Group::Healthy, &healthy), (Group::Degraded, &degraded)] {
        for (i, e) in earned.iter().enumerate() {
            let share = (e * 1000 / total).min(left);
            if share == 0 {
                continue;
            }
            left -= share;
            let (usable, _, all) = counts[i];
            let panic = (usable + counts[i].1) * 2 < all;
            out.push((i, if panic { Group::All } else { g }, share as u32));
        }
    }
    // Rounding leaves at most a few per mille: to the first share.
    if let Some(first) = out.first_mut() {
        first.2 += left as u32;
    }
    out
}

impl Table {
    fn pick(&self, lb: LbPolicy) -> Option<&Member> {
        let mut r = rand::random_range(0..1000u32);
        let (level, group, _) = self
            .shares
            .iter()
            .find(|(_, _, s)| {
                if r < *s {
                    true
                } else {
                    r -= s;
                    false
                }
            })
            .or(self.shares.first())?;
        self.levels.get(*level)?.pool(*group).pick(lb)
    }

    /// How many endpoints could be picked at all.
    fn distinct(&self) -> usize {
        self.shares
            .iter()
            .filter_map(|(l, g, _)| self.levels.get(*l).map(|lv| lv.pool(*g).members.len()))
            .sum()
    }
}

/// The addresses of `ips` that Envoy's `dns_lookup_family` keeps.
fn family(f: DnsFamily, ips: &[IpAddr]) -> Vec<IpAddr> {
    let v4: Vec<IpAddr> = ips.iter().copied().filter(IpAddr::is_ipv4).collect();
    let v6: Vec<IpAddr> = ips.iter().copied().filter(IpAddr::is_ipv6).collect();
    match f {
        DnsFamily::V4Only => v4,
        DnsFamily::V6Only => v6,
        DnsFamily::Auto if v6.is_empty() => v4,
        DnsFamily::Auto => v6,
        DnsFamily::V4Preferred if v4.is_empty() => v6,
        DnsFamily::V4Preferred => v4,
        DnsFamily::All => ips.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;
    use sluice_api::envoy::Endpoint;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn cluster(lb: LbPolicy, endpoints: &[(u32, u16, u32, Health)]) -> BalancedCluster {
        let mut localities: Vec<Locality> = Vec::new();
        for &(priority, port, weight, health) in endpoints {
            let e = Endpoint {
                address: EndpointAddress::Ip(addr(port)),
                weight,
                health,
            };
            match localities.iter_mut().find(|l| l.priority == priority) {
                Some(l) => l.endpoints.push(e),
                None => localities.push(Locality {
                    weight: None,
                    priority,
                    endpoints: vec![e],
                }),
            }
        }
        BalancedCluster {
            name: "c".into(),
            lb,
            endpoints: Endpoints::Fixed { localities },
            overprovisioning_factor: 140,
        }
    }

    async fn counts(b: &Balancer, n: usize) -> std::collections::BTreeMap<u16, usize> {
        let mut out = std::collections::BTreeMap::new();
        for _ in 0..n {
            let picked = b.pick(1, |_| async { Err("unused") }).await.unwrap();
            *out.entry(picked[0].port()).or_default() += 1;
        }
        out
    }

    const H: Health = Health::Healthy;

    #[tokio::test]
    async fn round_robin_follows_the_weights_exactly() {
        let b = Balancer::new(cluster(
            LbPolicy::RoundRobin,
            &[(0, 1, 1, H), (0, 2, 1, H), (0, 3, 1, H)],
        ));
        assert_eq!(counts(&b, 30).await, [(1, 10), (2, 10), (3, 10)].into());
        let b = Balancer::new(cluster(LbPolicy::RoundRobin, &[(0, 1, 3, H), (0, 2, 1, H)]));
        assert_eq!(counts(&b, 40).await, [(1, 30), (2, 10)].into());
        // Interleaved, not in runs: never the light one twice in a row.
        let mut last = 0;
        for _ in 0..8 {
            let p = b.pick(1, |_| async { Err("unused") }).await.unwrap()[0].port();
            assert!(!(p == 2 && last == 2));
            last = p;
        }
    }

    #[tokio::test]
    async fn unusable_endpoints_take_nothing_unless_the_level_panics() {
        let b = Balancer::new(cluster(
            LbPolicy::RoundRobin,
            &[(0, 1, 1, H), (0, 2, 1, H), (0, 3, 1, Health::Unhealthy)],
        ));
        assert_eq!(counts(&b, 20).await, [(1, 10), (2, 10)].into());
        // One usable of three: panic, every endpoint takes its turn.
        let b = Balancer::new(cluster(
            LbPolicy::RoundRobin,
            &[(0, 1, 1, H), (0, 2, 1, Health::Unhealthy), (0, 3, 1, Health::Unhealthy)],
        ));
        assert_eq!(counts(&b, 30).await, [(1, 10), (2, 10), (3, 10)].into());
        // A draining endpoint is out, and does not count towards panic.
        let b = Balancer::new(cluster(
            LbPolicy::RoundRobin,
            &[(0, 1, 1, H), (0, 2, 1, Health::Unhealthy), (0, 3, 1, Health::Draining)],
        ));
        assert_eq!(counts(&b, 20).await, [(1, 20)].into());
    }

    #[tokio::test]
    async fn a_lower_priority_takes_what_the_first_cannot() {
        let b = Balancer::new(cluster(LbPolicy::RoundRobin, &[(0, 1, 1, H), (1, 2, 1, H)]));
        assert_eq!(counts(&b, 50).await, [(1, 50)].into());
        let b = Balancer::new(cluster(
            LbPolicy::RoundRobin,
            &[(0, 1, 1, Health::Unhealthy), (1, 2, 1, H)],
        ));
        assert_eq!(counts(&b, 50).await, [(2, 50)].into());
        // Half of priority 0 healthy: it earns 70%, the rest spills over.
        let b = Balancer::new(cluster(
            LbPolicy::RoundRobin,
            &[(0, 1, 1, H), (0, 2, 1, Health::Unhealthy), (1, 3, 1, H)],
        ));
        let c = counts(&b, 2000).await;
        let spilled = c.get(&3).copied().unwrap_or(0);
        assert!((450..=750).contains(&spilled), "{c:?}");
        assert_eq!(c.get(&2), None);
    }

    #[tokio::test]
    async fn least_request_prefers_the_idle_endpoint() {
        let b = Balancer::new(cluster(
            LbPolicy::LeastRequest { choice_count: 10 },
            &[(0, 1, 1, H), (0, 2, 1, H)],
        ));
        let _busy: Vec<ActiveGuard> = (0..5).map(|_| b.track(addr(1)).unwrap()).collect();
        let c = counts(&b, 40).await;
        assert!(c.get(&2).copied().unwrap_or(0) > 35, "{c:?}");
        drop(_busy);
        let c = counts(&b, 200).await;
        assert_eq!(c.len(), 2, "{c:?}");
    }

    #[tokio::test]
    async fn random_reaches_every_endpoint() {
        let b = Balancer::new(cluster(LbPolicy::Random, &[(0, 1, 1, H), (0, 2, 1, H), (0, 3, 1, H)]));
        assert_eq!(counts(&b, 300).await.len(), 3);
    }

    #[tokio::test]
    async fn several_attempts_go_to_different_endpoints() {
        let b = Balancer::new(cluster(
            LbPolicy::RoundRobin,
            &[(0, 1, 1, H), (0, 2, 1, H), (0, 3, 1, H)],
        ));
        let mut picked = b.pick(3, |_| async { Err("unused") }).await.unwrap();
        picked.sort();
        assert_eq!(picked, vec![addr(1), addr(2), addr(3)]);
        let one = Balancer::new(cluster(LbPolicy::RoundRobin, &[(0, 1, 1, H)]));
        assert_eq!(one.pick(3, |_| async { Err("unused") }).await.unwrap().len(), 3);
        let none = Balancer::new(cluster(LbPolicy::RoundRobin, &[]));
        assert_eq!(
            none.pick(1, |_| async { Err("unused") })
                .await
                .unwrap_err()
                .reason_code(),
            "no-healthy-upstream"
        );
    }

    #[tokio::test]
    async fn dns_clusters_resolve_and_keep_the_last_good_answer() {
        let dns = DnsSettings {
            family: DnsFamily::V4Only,
            refresh_rate: std::time::Duration::ZERO,
            respect_ttl: false,
        };
        let def = BalancedCluster {
            name: "d".into(),
            lb: LbPolicy::RoundRobin,
            endpoints: Endpoints::StrictDns {
                localities: vec![Locality {
                    weight: None,
                    priority: 0,
                    endpoints: vec![Endpoint {
                        address: EndpointAddress::Name(sluice_api::HostPort {
                            host: "svc.test".into(),
                            port: 9,
                        }),
                        weight: 1,
                        health: H,
                    }],
                }],
                dns,
            },
            overprovisioning_factor: 140,
        };
        let b = Balancer::new(def);
        let answer = |ips: &'static [&'static str]| {
            move |_host: String| async move { Ok(ips.iter().map(|i| i.parse().unwrap()).collect::<Vec<IpAddr>>()) }
        };
        let got = b.pick(2, answer(&["10.0.0.1", "10.0.0.2", "::1"])).await.unwrap();
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|a| a.is_ipv4() && a.port() == 9));
        // A failed resolution keeps the last good one.
        let kept = b.pick(1, |_| async { Err("dns-nxdomain") }).await.unwrap();
        assert!(kept[0].is_ipv4());
        let fresh = Balancer::new(b.def.clone());
        assert_eq!(
            fresh
                .pick(1, |_| async { Err("dns-nxdomain") })
                .await
                .unwrap_err()
                .reason_code(),
            "dns-nxdomain"
        );
        assert_eq!(family(DnsFamily::Auto, &["10.0.0.1".parse().unwrap()]).len(), 1);
    }
}
