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

/// Members stored in a set's own record, so reading a small set is one
/// cache-line access rather than an index load and then a member load.
const INLINE: usize = 6;

/// One set: `[len, start, members…]` — for a set of up to [`INLINE`]
/// members, `start` is unused and the members follow in the record;
/// otherwise they are at `ids[start..start + len]`. 32 bytes, aligned so
/// one record never straddles two cache lines.
#[repr(C, align(32))]
#[derive(Debug, Clone, Copy, Default)]
struct Record([u32; 2 + INLINE]);

#[derive(Debug, Default)]
pub struct SetArena {
    ids: Vec<u32>,
    records: Vec<Record>,
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
        let id = self.records.len() as SetId;
        let mut r = Record::default();
        r.0[0] = members.len() as u32;
        match r.0.get_mut(2..2 + members.len()) {
            Some(inline) => inline.copy_from_slice(&members),
            None => {
                r.0[1] = self.ids.len() as u32;
                self.ids.extend_from_slice(&members);
            }
        }
        self.records.push(r);
        self.index.insert(members, id);
        id
    }

    #[inline]
    pub fn get(&self, id: SetId) -> &[u32] {
        let Some(Record(r)) = self.records.get(id as usize) else {
            return &[];
        };
        let len = r[0] as usize;
        if len <= INLINE {
            r.get(2..2 + len).unwrap_or(&[])
        } else {
            let start = r[1] as usize;
            self.ids.get(start..start + len).unwrap_or(&[])
        }
    }

    /// Starts loading the record [`SetArena::get`] of `id` reads.
    #[inline]
    pub fn prefetch(&self, id: SetId) {
        if let Some(r) = self.records.get(id as usize) {
            crate::sys::prefetch(r);
        }
    }

    /// Drops the build-time index; lookups by id keep working.
    pub fn freeze(&mut self) {
        self.index = HashMap::new();
        self.ids = super::cidrs::on_huge_pages(&self.ids);
        self.records = super::cidrs::on_huge_pages(&self.records);
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn heap_bytes(&self) -> usize {
        self.ids.capacity() * 4 + self.records.capacity() * std::mem::size_of::<Record>()
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
