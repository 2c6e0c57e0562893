//! The WebGroup index: canonical name → the WebGroups it belongs to.
//!
//! Exact patterns and `*.suffix` patterns live in two open-addressing hash
//! tables whose keys are slices of one byte arena, so a million patterns
//! cost a few bytes of overhead each instead of one heap allocation each. A
//! lookup probes the exact table once and the suffix table once per dot in
//! the name (usually two to four probes), and allocates nothing.

use std::hash::BuildHasher;

use foldhash::fast::FixedState;
use hashbrown::HashTable;
use sluice_api::{DomainName, DomainPattern};

use super::sets::{EMPTY_SET, SetArena, SetId};

/// A name has at most 127 labels, so at most 127 suffixes plus the exact
/// entry and `*` can match.
pub const MAX_HITS: usize = 130;

#[derive(Debug, Clone, Copy)]
struct Entry {
    offset: u32,
    len: u8,
    set: SetId,
}

#[derive(Debug)]
struct Table {
    table: HashTable<Entry>,
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
        let hasher = FixedState::with_seed(0x5_1ce_0000_2026);
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
        let mut arena = Vec::new();
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
        let mut table = HashTable::with_capacity(distinct);
        let mut i = 0;
        while i < keys.len() {
            let name = keys[i].0;
            let mut groups = Vec::new();
            while i < keys.len() && keys[i].0 == name {
                groups.push(keys[i].1);
                i += 1;
            }
            let set = sets.intern(expand(&mut groups));
            let entry = Entry {
                offset: arena.len() as u32,
                len: name.len() as u8,
                set,
            };
            arena.extend_from_slice(name.as_bytes());
            let h = hasher.hash_one(name.as_bytes());
            let bytes: &[u8] = arena;
            table.insert_unique(h, entry, |e| {
                hasher.hash_one(
                    bytes
                        .get(e.offset as usize..e.offset as usize + e.len as usize)
                        .unwrap_or(&[]),
                )
            });
        }
        Table { table }
    }

    fn find(&self, table: &Table, key: &[u8]) -> SetId {
        let h = self.hasher.hash_one(key);
        table.table.find(h, |e| self.key(e) == key).map_or(EMPTY_SET, |e| e.set)
    }

    fn key(&self, e: &Entry) -> &[u8] {
        self.arena
            .get(e.offset as usize..e.offset as usize + e.len as usize)
            .unwrap_or(&[])
    }

    /// Every WebGroup set the canonical `name` falls in.
    #[inline]
    pub fn lookup(&self, name: &DomainName) -> NameHits {
        let mut hits = NameHits {
            sets: [EMPTY_SET; MAX_HITS],
            len: 0,
        };
        let bytes = name.as_str().as_bytes();
        hits.push(self.find(&self.exact, bytes));
        if !self.suffix.table.is_empty() {
            for (i, b) in bytes.iter().enumerate() {
                if *b == b'.' {
                    if let Some(rest) = bytes.get(i + 1..) {
                        hits.push(self.find(&self.suffix, rest));
                    }
                }
            }
        }
        hits.push(self.any);
        hits
    }

    pub fn pattern_count(&self) -> usize {
        self.patterns
    }

    pub fn heap_bytes(&self) -> usize {
        self.arena.len()
            + (self.exact.table.capacity() + self.suffix.table.capacity()) * (std::mem::size_of::<Entry>() + 1)
    }
}
