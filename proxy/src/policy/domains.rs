//! The WebGroup index: canonical name → the WebGroups it belongs to.
//!
//! Exact patterns and `*.suffix` patterns live in two open-addressing hash
//! tables of 32-byte slots. A key of up to 23 bytes is stored in its slot,
//! so a hit on it reads one cache line; longer keys live in one byte arena
//! (a few bytes of overhead each, no allocation per pattern). Either way a
//! hit is confirmed byte for byte, never on the hash alone. A lookup probes
//! the exact table once and the suffix table once per dot in the name
//! (usually two to four probes, their cache misses overlapped), and
//! allocates nothing.

use std::hash::BuildHasher;

use foldhash::fast::FixedState;
use sluice_api::{DomainName, DomainPattern};

use super::sets::{EMPTY_SET, SetArena, SetId};

/// A name has at most 127 labels, so at most 127 suffixes plus the exact
/// entry and `*` can match.
pub const MAX_HITS: usize = 130;

/// Keys up to this many bytes are stored in the slot itself, so a hit on
/// such a name reads one cache line; longer keys live in the arena.
const INLINE: usize = 23;

/// One slot of the open-addressing table: 32 bytes, two to a cache line and
/// never straddling one. `tag == 0` marks an empty slot.
#[repr(C, align(32))]
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// Low bits of the key's hash, never 0 for a used slot: probing
    /// compares this and the length before any key byte.
    tag: u32,
    set: SetId,
    len: u8,
    /// The key, zero-padded, when `len <= INLINE`; otherwise its first four
    /// bytes are the key's offset in the arena (little-endian).
    key: [u8; INLINE],
}

impl Slot {
    const EMPTY: Self = Self {
        tag: 0,
        set: EMPTY_SET,
        len: 0,
        key: [0; INLINE],
    };
}

/// A key prepared for probing: its home slot and tags.
#[derive(Debug, Clone, Copy)]
struct Probe {
    home: u32,
    tag: u32,
    byte: u8,
    /// Where the probed suffix starts in the name (0 for the exact probe).
    start: u8,
    exact: bool,
}

impl Probe {
    const NONE: Self = Self {
        home: 0,
        tag: 0,
        byte: 0,
        start: 0,
        exact: false,
    };
}

/// Probes hashed and prefetched together before any is looked up.
const BATCH: usize = 8;

/// Linear probing over a slot array at load factor ≤ 1/2, the home slot
/// picked by multiply-shift (no power-of-two rounding, so the table is
/// exactly twice the keys).
///
/// Beside the slots, one tag byte per slot (0: empty): a probe scans the
/// tags — 2 MB for a million keys, small enough to stay in cache — and
/// reads a slot only where its tag byte matches. A name that is in no
/// table (most names) is answered from the tags without touching the
/// slots; a hit reads the one slot that holds it.
#[derive(Debug, Default)]
struct Table {
    tags: Box<[u8]>,
    slots: Box<[Slot]>,
    /// Bit `n` set when some key has `n` labels (n ≥ 127 folds into 127):
    /// a suffix with a label count no key has is not probed at all.
    label_counts: u128,
}

fn label_bit(labels: usize) -> u128 {
    1u128 << labels.min(127)
}

fn tag(h: u64) -> u32 {
    (h as u32) | 1
}

fn tag_byte(h: u64) -> u8 {
    ((h >> 32) as u8).max(1)
}

impl Table {
    fn with_keys(n: usize) -> Self {
        let cap = n.max(1) * 2;
        // Advised before the first write, so huge pages back the slots.
        let mut slots: Vec<Slot> = Vec::with_capacity(cap);
        crate::sys::advise_hugepages(slots.spare_capacity_mut());
        slots.resize(cap, Slot::EMPTY);
        // Zeroed and untouched until filled: the advice still applies.
        let tags = vec![0u8; cap].into_boxed_slice();
        crate::sys::advise_hugepages(&tags);
        Self {
            tags,
            slots: slots.into_boxed_slice(),
            label_counts: 0,
        }
    }

    /// The home slot of hash `h`: its high bits scaled onto the table (the
    /// tag uses the low bits, so the two stay independent).
    #[inline]
    fn home(&self, h: u64) -> usize {
        ((u128::from(h) * self.slots.len() as u128) >> 64) as usize
    }

    fn insert(&mut self, h: u64, slot: Slot) {
        let mut i = self.home(h);
        // The table is at most half full, so an empty slot exists.
        for _ in 0..self.slots.len() {
            if let (Some(t), Some(s)) = (self.tags.get_mut(i), self.slots.get_mut(i))
                && *t == 0
            {
                *t = tag_byte(h);
                *s = slot;
                return;
            }
            i = self.next(i);
        }
    }

    #[inline]
    fn next(&self, i: usize) -> usize {
        if i + 1 >= self.slots.len() { 0 } else { i + 1 }
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

/// A lookup in progress: probes hashed and prefetched, not yet read.
#[derive(Debug, Clone, Copy)]
pub struct Pending {
    batch: [Probe; BATCH],
    n: usize,
    /// Where in the name to continue looking for suffixes.
    next: usize,
    /// Labels of the suffix after the last dot looked at.
    labels: usize,
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
            let mut slot = Slot {
                tag: tag(h),
                set,
                len: name.len() as u8,
                key: [0; INLINE],
            };
            match slot.key.get_mut(..name.len()) {
                Some(k) => k.copy_from_slice(name.as_bytes()),
                None => {
                    slot.key[..4].copy_from_slice(&(arena.len() as u32).to_le_bytes());
                    arena.extend_from_slice(name.as_bytes());
                }
            }
            table.insert(h, slot);
        }
        table
    }

    /// The probe for `key` (starting at `start` in the name), its home tag
    /// and slot already being fetched into cache; `None` when no key of
    /// that label count exists.
    #[inline]
    fn probe(&self, table: &Table, key: &[u8], start: usize, labels: usize, exact: bool) -> Option<Probe> {
        if table.label_counts & label_bit(labels) == 0 {
            return None;
        }
        let h = self.hasher.hash_one(key);
        let home = table.home(h);
        if let Some(t) = table.tags.get(home) {
            crate::sys::prefetch(t);
        }
        if let Some(slot) = table.slots.get(home) {
            crate::sys::prefetch(slot);
        }
        Some(Probe {
            home: home as u32,
            tag: tag(h),
            byte: tag_byte(h),
            start: start as u8,
            exact,
        })
    }

    /// The set of the slot holding `key`, if any. A short key is compared
    /// in the slot, a long one byte for byte in the arena: a hash or tag
    /// match alone never counts.
    #[inline]
    fn find(&self, table: &Table, key: &[u8], p: &Probe) -> SetId {
        let mut i = p.home as usize;
        for _ in 0..table.tags.len() {
            match table.tags.get(i) {
                None | Some(0) => return EMPTY_SET,
                Some(t) if *t == p.byte => {
                    if let Some(s) = table.slots.get(i)
                        && self.holds(s, key, p.tag)
                    {
                        return s.set;
                    }
                }
                Some(_) => {}
            }
            i = table.next(i);
        }
        EMPTY_SET
    }

    #[inline]
    fn holds(&self, s: &Slot, key: &[u8], tag: u32) -> bool {
        if s.tag != tag || usize::from(s.len) != key.len() {
            return false;
        }
        if key.len() > INLINE {
            return self.long_key(s) == key;
        }
        // Short keys are compared as the zero-padded bytes a slot holds.
        let mut padded = [0; INLINE];
        if let Some(d) = padded.get_mut(..key.len()) {
            d.copy_from_slice(key);
        }
        s.key == padded
    }

    fn long_key(&self, s: &Slot) -> &[u8] {
        let offset = u32::from_le_bytes([s.key[0], s.key[1], s.key[2], s.key[3]]) as usize;
        self.arena.get(offset..offset + usize::from(s.len)).unwrap_or(&[])
    }

    /// Looks up a batch of prepared probes, in order.
    #[inline]
    fn flush(&self, name: &[u8], batch: &[Probe], hits: &mut NameHits) {
        for p in batch {
            let table = if p.exact { &self.exact } else { &self.suffix };
            if let Some(key) = name.get(usize::from(p.start)..) {
                hits.push(self.find(table, key, p));
            }
        }
    }

    /// Every WebGroup set the canonical `name` falls in: the exact entry
    /// first, then the suffixes from the longest, then `*`.
    #[inline]
    pub fn lookup(&self, name: &DomainName) -> NameHits {
        self.finish(name, self.start(name))
    }

    /// Hashes the name's first probes and starts loading their tags and
    /// slots; [`DomainIndex::finish`] looks them up. In between, the
    /// caller can do other work while the misses are in flight.
    #[inline]
    pub fn start(&self, name: &DomainName) -> Pending {
        let bytes = name.as_str().as_bytes();
        let mut pending = Pending {
            batch: [Probe::NONE; BATCH],
            n: 0,
            next: 0,
            labels: bytes.iter().filter(|b| **b == b'.').count() + 1,
        };
        if let Some(p) = self.probe(&self.exact, bytes, 0, pending.labels, true) {
            pending.batch[0] = p;
            pending.n = 1;
        }
        self.fill(bytes, &mut pending);
        pending
    }

    /// Adds suffix probes from byte `pending.next` on until the batch is
    /// full or the name ends.
    #[inline]
    fn fill(&self, bytes: &[u8], pending: &mut Pending) {
        if self.suffix.is_empty() {
            pending.next = bytes.len();
            return;
        }
        while pending.n < BATCH
            && let Some(&b) = bytes.get(pending.next)
        {
            let i = pending.next;
            pending.next += 1;
            if b != b'.' {
                continue;
            }
            pending.labels -= 1;
            if let Some(rest) = bytes.get(i + 1..)
                && let Some(p) = self.probe(&self.suffix, rest, i + 1, pending.labels, false)
                && let Some(slot) = pending.batch.get_mut(pending.n)
            {
                *slot = p;
                pending.n += 1;
            }
        }
    }

    /// Looks up the probes [`DomainIndex::start`] prepared (and, for a name
    /// with more suffixes than one batch holds, the rest, a batch at a
    /// time).
    #[inline]
    pub fn finish(&self, name: &DomainName, mut pending: Pending) -> NameHits {
        let mut hits = NameHits {
            sets: [EMPTY_SET; MAX_HITS],
            len: 0,
        };
        let bytes = name.as_str().as_bytes();
        loop {
            self.flush(bytes, pending.batch.get(..pending.n).unwrap_or(&[]), &mut hits);
            if pending.next >= bytes.len() {
                break;
            }
            pending.n = 0;
            self.fill(bytes, &mut pending);
        }
        hits.push(self.any);
        hits
    }

    pub fn pattern_count(&self) -> usize {
        self.patterns
    }

    pub fn heap_bytes(&self) -> usize {
        self.arena.len() + (self.exact.slots.len() + self.suffix.slots.len()) * (std::mem::size_of::<Slot>() + 1)
    }
}
