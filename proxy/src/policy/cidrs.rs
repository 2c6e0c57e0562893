//! The SmartGroup address index: IP address → the SmartGroups holding it.
//!
//! All CIDRs of all groups are flattened into sorted, disjoint address
//! intervals, each labelled with the interned set of groups covering it. A
//! lookup is one binary search and allocates nothing. For IPv4 a first
//! level indexed by the top 16 bits narrows the search to the intervals
//! starting in that /16 — usually one cache line — so a lookup costs one or
//! two cache misses even with 100,000 CIDRs. IPv4-mapped IPv6 addresses are
//! looked up as IPv4.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

use super::sets::{EMPTY_SET, SetArena, SetId};

#[derive(Debug, Default)]
struct Intervals<T> {
    /// Start of each interval; the interval runs to the next start.
    starts: Vec<T>,
    sets: Vec<SetId>,
}

impl<T: Ord + Copy> Intervals<T> {
    fn lookup(&self, ip: T) -> SetId {
        let i = self.starts.partition_point(|s| *s <= ip);
        if i == 0 {
            EMPTY_SET
        } else {
            self.sets.get(i - 1).copied().unwrap_or(EMPTY_SET)
        }
    }
}

/// Interval starts and their sets, side by side, eight to a cache line:
/// the line that holds the matching start holds its set too.
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy, Default)]
struct Block {
    starts: [u32; BLOCK],
    sets: [SetId; BLOCK],
}

const BLOCK: usize = 8;

/// IPv4 intervals with a /16 first level and a summary of each block's
/// first start: a lookup reads the bucket and a few lines of the summary
/// (small enough to stay cached) and then exactly one block line, instead
/// of a binary search that misses on every step.
#[derive(Debug, Default)]
struct V4Index {
    blocks: Vec<Block>,
    len: usize,
    /// `summary[b]` = first start of block `b`.
    summary: Vec<u32>,
    /// `buckets[k]` = index of the first interval starting at or after
    /// `k << 16`; 65,537 entries.
    buckets: Vec<u32>,
}

impl V4Index {
    fn new(iv: Intervals<u32>) -> Self {
        let mut buckets = Vec::with_capacity(65_537);
        let mut i = 0usize;
        for k in 0..=65_536u64 {
            while i < iv.starts.len() && u64::from(iv.starts[i]) < (k << 16) {
                i += 1;
            }
            buckets.push(i as u32);
        }
        let blocks: Vec<Block> = iv
            .starts
            .chunks(BLOCK)
            .zip(iv.sets.chunks(BLOCK))
            .map(|(st, se)| {
                let mut b = Block::default();
                b.starts.iter_mut().zip(st).for_each(|(d, s)| *d = *s);
                b.sets.iter_mut().zip(se).for_each(|(d, s)| *d = *s);
                b
            })
            .collect();
        let summary: Vec<u32> = iv.starts.iter().step_by(BLOCK).copied().collect();
        Self {
            blocks: on_huge_pages(&blocks),
            len: iv.starts.len(),
            summary,
            buckets: on_huge_pages(&buckets),
        }
    }

    /// Starts loading the cache lines `lookup(ip)` will read first.
    #[inline]
    fn prefetch(&self, ip: u32) {
        let k = (ip >> 16) as usize;
        let lo = self.buckets.get(k).copied().unwrap_or(0) as usize;
        if let Some(s) = self.summary.get(lo / BLOCK) {
            crate::sys::prefetch(s);
        }
        if let Some(b) = self.blocks.get(lo / BLOCK) {
            crate::sys::prefetch(b);
        }
    }

    #[inline]
    fn lookup(&self, ip: u32) -> SetId {
        let k = (ip >> 16) as usize;
        let lo = self.buckets.get(k).copied().unwrap_or(0) as usize;
        let hi = self.buckets.get(k + 1).copied().unwrap_or(0) as usize;
        // Every block before `lo / BLOCK` starts at or below `ip`, every
        // block from `hi.div_ceil(BLOCK)` on starts above it.
        let (b_lo, b_hi) = (lo / BLOCK, hi.div_ceil(BLOCK).min(self.summary.len()));
        let within = self
            .summary
            .get(b_lo..b_hi)
            .map_or(0, |s| s.partition_point(|s| *s <= ip));
        // The last block starting at or below `ip` holds the interval.
        let Some(b) = (b_lo + within).checked_sub(1) else {
            return EMPTY_SET;
        };
        let Some(block) = self.blocks.get(b) else {
            return EMPTY_SET;
        };
        let n = self.len.saturating_sub(b * BLOCK).min(BLOCK);
        let i = block.starts.get(..n).map_or(0, |s| s.partition_point(|s| *s <= ip));
        match i.checked_sub(1) {
            Some(i) => block.sets.get(i).copied().unwrap_or(EMPTY_SET),
            None => EMPTY_SET,
        }
    }
}

#[derive(Debug, Default)]
pub struct CidrIndex {
    v4: V4Index,
    v6: Intervals<u128>,
    cidrs: usize,
}

impl CidrIndex {
    /// `nets` are (network, group) pairs; `containers[g]` the groups an
    /// address in group `g` belongs to (including `g`).
    pub fn build(nets: &[(IpNet, u32)], containers: &[Vec<u32>], sets: &mut SetArena) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for (net, g) in nets {
            match sluice_api::net::canonical_net(*net) {
                IpNet::V4(n) => v4.push((u32::from(n.network()) as u128, u32::from(n.broadcast()) as u128, *g)),
                IpNet::V6(n) => v6.push((u128::from(n.network()), u128::from(n.broadcast()), *g)),
            }
        }
        let v4i = sweep(&v4, u32::MAX as u128, containers, sets);
        let v6i = sweep(&v6, u128::MAX, containers, sets);
        Self {
            v4: V4Index::new(Intervals {
                starts: v4i.starts.iter().map(|s| *s as u32).collect(),
                sets: v4i.sets,
            }),
            v6: v6i,
            cidrs: nets.len(),
        }
    }

    /// Starts loading what [`CidrIndex::lookup`] of `ip` will read, so the
    /// source's, the destination's and the name's cache misses overlap.
    #[inline]
    pub fn prefetch(&self, ip: IpAddr) {
        if let IpAddr::V4(a) = ip.to_canonical() {
            self.v4.prefetch(u32::from(a));
        }
    }

    #[inline]
    pub fn lookup(&self, ip: IpAddr) -> SetId {
        match ip.to_canonical() {
            IpAddr::V4(a) => self.v4.lookup(u32::from(a)),
            IpAddr::V6(a) => self.v6.lookup(u128::from(a)),
        }
    }

    pub fn cidr_count(&self) -> usize {
        self.cidrs
    }

    pub fn heap_bytes(&self) -> usize {
        self.v4.blocks.capacity() * std::mem::size_of::<Block>()
            + self.v4.summary.capacity() * 4
            + self.v4.buckets.capacity() * 4
            + self.v6.starts.capacity() * 16
            + self.v6.sets.capacity() * 4
    }
}

/// Sweeps interval end points left to right, keeping a count of how many
/// ranges of each group are open, and emits one interval per change.
fn sweep(ranges: &[(u128, u128, u32)], top: u128, containers: &[Vec<u32>], sets: &mut SetArena) -> Intervals<u128> {
    // (point, +1 open / -1 close at point): a range [lo, hi] opens at lo and
    // closes at hi+1 (which may overflow past the top of the space: then it
    // never closes).
    let mut events: Vec<(u128, i32, u32)> = Vec::with_capacity(ranges.len() * 2);
    for &(lo, hi, g) in ranges {
        events.push((lo, 1, g));
        if let Some(end) = hi.checked_add(1).filter(|e| *e <= top) {
            events.push((end, -1, g));
        }
    }
    events.sort_unstable_by_key(|e| e.0);
    let mut open: HashMap<u32, u32> = HashMap::new();
    let mut out = Intervals {
        starts: Vec::new(),
        sets: Vec::new(),
    };
    let mut i = 0;
    while i < events.len() {
        let point = events[i].0;
        while i < events.len() && events[i].0 == point {
            let (_, delta, g) = events[i];
            let c = open.entry(g).or_insert(0);
            if delta > 0 {
                *c += 1;
            } else {
                *c = c.saturating_sub(1);
                if *c == 0 {
                    open.remove(&g);
                }
            }
            i += 1;
        }
        let mut members: Vec<u32> = open
            .keys()
            .flat_map(|g| containers.get(*g as usize).into_iter().flatten().copied())
            .collect();
        members.sort_unstable();
        members.dedup();
        let set = sets.intern(members);
        if out.sets.last() != Some(&set) {
            out.starts.push(point);
            out.sets.push(set);
        }
    }
    out
}

/// A copy of `v` in a fresh allocation that was advised onto huge pages
/// before its first write (advice given after the pages are touched does
/// nothing), so random lookups into it do not also miss the TLB.
pub(super) fn on_huge_pages<T: Copy>(v: &[T]) -> Vec<T> {
    let mut out = Vec::with_capacity(v.len());
    crate::sys::advise_hugepages(out.spare_capacity_mut());
    out.extend_from_slice(v);
    out
}
