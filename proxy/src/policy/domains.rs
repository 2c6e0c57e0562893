//! The WebGroup index: canonical name → the WebGroups it belongs to.
//!
//! Exact patterns and `*.suffix` patterns live in two open-addressing hash
//! tables whose keys are slices of one byte arena, so a million patterns
//! cost a few bytes of overhead each instead of one heap allocation each. A
//! lookup probes the exact table once and the suffix table once per dot in
//! the name (usually two to four probes), and allocates nothing.

use std::hash::BuildHasher;

use foldhash::fast::FixedState;
use sluice_api::{DomainName, DomainPattern};

use super::sets::{EMPTY_SET, SetArena, SetId};

/// A name has at most 127 labels, so at most 127 suffixes plus the exact
/// entry and `*` can match.
pub const MAX_HITS: usize = 130;

/// One slot of the open-addressing table. 16 bytes, four to a cache line;
/// `fingerprint == 0` marks an empty slot.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// High bits of the key's hash, never 0 for a used slot: probing
    /// compares this first and touches the key bytes in the arena only on
    /// a fingerprint match (nearly always the real key).
    fingerprint: u32,
    offset: u32,
    set: SetId,
    len: u8,
}

/// Linear probing over a power-of-two slot array at load factor ≤ 1/2:
/// a probe reads one cache line in the common case, and the table is one
/// flat allocation (no separate control bytes to miss on).
#[derive(Debug, Default)]
struct Table {
    slots: Box<[[u32; 4]]>,
    mask: usize,
    /// Bit `n` set when some key has `n` labels (n ≥ 127 folds into 127):
    /// a suffix with a label count no key has is not probed at all.
    label_counts: u128,
}

fn label_bit(labels: usize) -> u128 {
    1u128 << labels.min(127)
}

impl Entry {
    fn pack(self) -> [u32; 4] {
        [self.fingerprint, self.offset, self.set, u32::from(self.len)]
    }
}

fn fingerprint(h: u64) -> u32 {
    ((h >> 32) as u32) | 1
}

impl Table {
    fn with_keys(n: usize) -> Self {
        let cap = (n.max(1) * 2).next_power_of_two();
        // All-zero words come from a zeroed allocation the kernel has not
        // touched yet, so huge-page advice still applies to it.
        let slots: Box<[[u32; 4]]> = vec![[0u32; 4]; cap].into_boxed_slice();
        crate::sys::advise_hugepages(&slots);
        Self {
            slots,
            mask: cap - 1,
            label_counts: 0,
        }
    }

    fn insert(&mut self, h: u64, e: Entry) {
        let mut i = h as usize & self.mask;
        // The table is at most half full, so an empty slot exists.
        while let Some(slot) = self.slots.get_mut(i) {
            if slot[0] == 0 {
                *slot = e.pack();
                return;
            }
            i = (i + 1) & self.mask;
        }
    }

    fn is_empty(&self) -> bool {
        self.label_counts == 0
    }
}

#[derive(Debug)]
pub struct DomainIndex {
    arena: Box<[u8]>,
    exact: Table,
    suffix: Table,
    /// Groups holding `*`.
    any: SetId,
    hasher: FixedState,
    patterns: usize,
}

/// The sets a name matched, without allocation.
#[derive(Debug, Clone, Copy)]
pub struct NameHits {
    sets: [SetId; MAX_HITS],
    len: usize,
}

impl NameHits {
    pub fn iter(&self) -> impl Iterator<Item = SetId> + '_ {
        self.sets[..self.len].iter().copied()
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    fn push(&mut self, s: SetId) {
        if s != EMPTY_SET && self.len < MAX_HITS {
            self.sets[self.len] = s;
            self.len += 1;
        }
    }
}

impl DomainIndex {
    /// `groups[g]` lists the patterns of group `g`; `containers[g]` the
    /// groups (including `g`) a name matching one of them belongs to.
    pub fn build(groups: &[&[DomainPattern]], containers: &[Vec<u32>], sets: &mut SetArena) -> Self {
        let hasher = FixedState::with_seed(0x51ce_0000_2026);
        let mut exact_keys: Vec<(&str, u32)> = Vec::new();
        let mut suffix_keys: Vec<(&str, u32)> = Vec::new();
        let mut any: Vec<u32> = Vec::new();
        let mut patterns = 0;
        for (g, pats) in groups.iter().enumerate() {
            patterns += pats.len();
            for p in pats.iter() {
                match p {
                    DomainPattern::Exact(n) => exact_keys.push((n.as_str(), g as u32)),
                    DomainPattern::Subdomains(n) => suffix_keys.push((n.as_str(), g as u32)),
                    DomainPattern::Any => any.push(g as u32),
                }
            }
        }
        // Sized up front and advised before the first byte is written, so
        // the kernel backs the key bytes with huge pages too.
        let key_bytes: usize = exact_keys.iter().chain(suffix_keys.iter()).map(|(k, _)| k.len()).sum();
        let mut arena: Vec<u8> = Vec::with_capacity(key_bytes);
        crate::sys::advise_hugepages(arena.spare_capacity_mut());
        let expand = |gs: &mut Vec<u32>| {
            let mut out: Vec<u32> = gs
                .iter()
                .flat_map(|g| containers.get(*g as usize).into_iter().flatten().copied())
                .collect();
            out.sort_unstable();
            out.dedup();
            out
        };
        let exact = Self::table(&mut exact_keys, &mut arena, sets, &hasher, &expand);
        let suffix = Self::table(&mut suffix_keys, &mut arena, sets, &hasher, &expand);
        let any = sets.intern(expand(&mut any));

        Self {
            arena: arena.into_boxed_slice(),
            exact,
            suffix,
            any,
            hasher,
            patterns,
        }
    }

    fn table(
        keys: &mut Vec<(&str, u32)>,
        arena: &mut Vec<u8>,
        sets: &mut SetArena,
        hasher: &FixedState,
        expand: &dyn Fn(&mut Vec<u32>) -> Vec<u32>,
    ) -> Table {
        keys.sort_unstable();
        keys.dedup();
        let distinct = keys.windows(2).filter(|w| w[0].0 != w[1].0).count() + usize::from(!keys.is_empty());
        let mut table = Table::with_keys(distinct);
        let mut i = 0;
        while i < keys.len() {
            let name = keys[i].0;
            let mut groups = Vec::new();
            while i < keys.len() && keys[i].0 == name {
                groups.push(keys[i].1);
                i += 1;
            }
            let set = sets.intern(expand(&mut groups));
            let h = hasher.hash_one(name.as_bytes());
            table.label_counts |= label_bit(name.bytes().filter(|b| *b == b'.').count() + 1);
            table.insert(
                h,
                Entry {
                    fingerprint: fingerprint(h),
                    offset: arena.len() as u32,
                    set,
                    len: name.len() as u8,
                },
            );
            arena.extend_from_slice(name.as_bytes());
        }
        table
    }

    /// The probe for `key`: its hash, with its first slot already being
    /// fetched into cache; `None` when no key of that label count exists.
    #[inline]
    fn probe(&self, table: &Table, key: &[u8], labels: usize) -> Option<u64> {
        if table.label_counts & label_bit(labels) == 0 {
            return None;
        }
        let h = self.hasher.hash_one(key);
        if let Some(slot) = table.slots.get(h as usize & table.mask) {
            crate::sys::prefetch(slot);
        }
        Some(h)
    }

    fn find(&self, table: &Table, key: &[u8], h: u64) -> SetId {
        let fp = fingerprint(h);
        let mut i = h as usize & table.mask;
        while let Some(&[f, offset, set, len]) = table.slots.get(i) {
            if f == 0 {
                return EMPTY_SET;
            }
            if f == fp && self.key(offset, len) == key {
                return set;
            }
            i = (i + 1) & table.mask;
        }
        EMPTY_SET
    }

    fn key(&self, offset: u32, len: u32) -> &[u8] {
        self.arena.get(offset as usize..(offset + len) as usize).unwrap_or(&[])
    }

    /// Every WebGroup set the canonical `name` falls in.
    #[inline]
    pub fn lookup(&self, name: &DomainName) -> NameHits {
        let mut hits = NameHits {
            sets: [EMPTY_SET; MAX_HITS],
            len: 0,
        };
        let bytes = name.as_str().as_bytes();
        let mut labels = bytes.iter().filter(|b| **b == b'.').count() + 1;
        // Two passes: first hash every probe and prefetch its slot, so the
        // cache misses of the exact probe and of each suffix probe overlap;
        // then look them up.
        let exact = self.probe(&self.exact, bytes, labels);
        let mut suffixes: [(u32, u64); MAX_HITS] = [(0, 0); MAX_HITS];
        let mut n = 0;
        if !self.suffix.is_empty() {
            for (i, b) in bytes.iter().enumerate() {
                if *b == b'.' {
                    labels -= 1;
                    if let Some(rest) = bytes.get(i + 1..)
                        && let Some(h) = self.probe(&self.suffix, rest, labels)
                        && let Some(slot) = suffixes.get_mut(n)
                    {
                        *slot = ((i + 1) as u32, h);
                        n += 1;
                    }
                }
            }
        }
        if let Some(h) = exact {
            hits.push(self.find(&self.exact, bytes, h));
        }
        for &(start, h) in suffixes.iter().take(n) {
            if let Some(rest) = bytes.get(start as usize..) {
                hits.push(self.find(&self.suffix, rest, h));
            }
        }
        hits.push(self.any);
        hits
    }

    pub fn pattern_count(&self) -> usize {
        self.patterns
    }

    pub fn heap_bytes(&self) -> usize {
        self.arena.len() + (self.exact.slots.len() + self.suffix.slots.len()) * 16
    }
}
