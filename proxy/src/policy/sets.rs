//! Interned sets of group ids and a small bitset.
//!
//! The indexes map a name or an address to *one* set id; many names share
//! the same combination of groups, so each distinct combination is stored
//! once. A rule's group list is a bitset, so "is any matched group in this
//! rule" is a few word tests, with no allocation.

use std::collections::HashMap;

/// Id of an interned set of group ids.
pub type SetId = u32;

/// The empty set is always id 0.
pub const EMPTY_SET: SetId = 0;

#[derive(Debug, Default)]
pub struct SetArena {
    ids: Vec<u32>,
    spans: Vec<(u32, u32)>,
    index: HashMap<Vec<u32>, SetId>,
}

impl SetArena {
    pub fn new() -> Self {
        let mut a = Self::default();
        a.intern(Vec::new());
        a
    }

    /// `members` must be sorted and free of duplicates.
    pub fn intern(&mut self, members: Vec<u32>) -> SetId {
        if let Some(id) = self.index.get(&members) {
            return *id;
        }
        let id = self.spans.len() as SetId;
        self.spans.push((self.ids.len() as u32, members.len() as u32));
        self.ids.extend_from_slice(&members);
        self.index.insert(members, id);
        id
    }

    pub fn get(&self, id: SetId) -> &[u32] {
        match self.spans.get(id as usize) {
            Some(&(start, len)) => self.ids.get(start as usize..(start + len) as usize).unwrap_or(&[]),
            None => &[],
        }
    }

    /// Drops the build-time index; lookups by id keep working.
    pub fn freeze(&mut self) {
        self.index = HashMap::new();
        self.ids = super::cidrs::on_huge_pages(&self.ids);
        self.spans = super::cidrs::on_huge_pages(&self.spans);
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    pub fn heap_bytes(&self) -> usize {
        self.ids.capacity() * 4 + self.spans.capacity() * 8
    }
}

/// A fixed-size set of small integers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BitSet(Box<[u64]>);

impl BitSet {
    pub fn with_capacity(bits: usize) -> Self {
        Self(vec![0; bits.div_ceil(64)].into_boxed_slice())
    }

    pub fn insert(&mut self, i: u32) {
        if let Some(w) = self.0.get_mut((i / 64) as usize) {
            *w |= 1 << (i % 64);
        }
    }

    #[inline]
    pub fn contains(&self, i: u32) -> bool {
        self.0.get((i / 64) as usize).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// The first member of `set` that is also in `self`.
    #[inline]
    pub fn first_common(&self, set: &[u32]) -> Option<u32> {
        set.iter().copied().find(|i| self.contains(*i))
    }
}
