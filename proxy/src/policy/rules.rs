//! First-match rule selection without walking the rule list.
//!
//! Each rule is one bit. For every group we know which rules name it (in
//! `from`, in `to.webgroups`, in `to.smartgroups`); for every interned set
//! of groups — what an address or a name resolves to — those rows are
//! OR-ed once at compile time. A decision then ANDs a handful of rows
//! (source set, destination set, name hit sets, protocol) and takes the
//! lowest set bit whose rule's ports also fit: a few dozen word operations
//! whatever the number of groups. Policies with more than
//! [`MAX_INDEXED_RULES`] rules fall back to the plain ordered scan.

use sluice_api::Protocol;

use super::CompiledRule;
use super::sets::{SetArena, SetId};

/// Rules beyond this use the ordered scan (the stack scratch row is fixed).
pub const MAX_INDEXED_RULES: usize = 64 * 64;

/// Per-set rows are precomputed while they fit in this many bytes;
/// otherwise rows are OR-ed from per-group rows at decision time.
const PER_SET_BUDGET: usize = 96 << 20;

#[derive(Debug)]
struct Rows {
    /// `groups × words`: rules naming each group.
    by_group: Vec<u64>,
    /// `sets × words`, when within budget.
    by_set: Option<Vec<u64>>,
}

#[derive(Debug)]
pub struct RuleIndex {
    words: usize,
    from: Rows,
    to_web: Rows,
    to_smart: Rows,
    from_any: Vec<u64>,
    to_any: Vec<u64>,
    /// Rows per `Protocol` (by its bit position).
    proto: [Vec<u64>; Protocol::ALL.len()],
    implied_dns: Vec<u64>,
}

fn set_bit(row: &mut [u64], i: usize) {
    if let Some(w) = row.get_mut(i / 64) {
        *w |= 1 << (i % 64);
    }
}

impl RuleIndex {
    pub fn build(rules: &[CompiledRule], n_web: usize, n_smart: usize, sets: &SetArena) -> Option<Self> {
        if rules.is_empty() || rules.len() > MAX_INDEXED_RULES {
            return None;
        }
        let words = rules.len().div_ceil(64);
        let mut from_g = vec![0u64; n_smart * words];
        let mut web_g = vec![0u64; n_web * words];
        let mut smart_g = vec![0u64; n_smart * words];
        let mut from_any = vec![0u64; words];
        let mut to_any = vec![0u64; words];
        let mut proto: [Vec<u64>; Protocol::ALL.len()] = std::array::from_fn(|_| vec![0u64; words]);
        let mut implied_dns = vec![0u64; words];
        for (i, r) in rules.iter().enumerate() {
            if r.from_any {
                set_bit(&mut from_any, i);
            }
            if r.to_any {
                set_bit(&mut to_any, i);
            }
            if r.implies_dns {
                set_bit(&mut implied_dns, i);
            }
            for (p, row) in Protocol::ALL.iter().zip(proto.iter_mut()) {
                if r.protocols & p.bit() != 0 {
                    set_bit(row, i);
                }
            }
            for g in 0..n_smart {
                if r.from.contains(g as u32) {
                    set_bit(&mut from_g[g * words..(g + 1) * words], i);
                }
                if r.to_smart.contains(g as u32) {
                    set_bit(&mut smart_g[g * words..(g + 1) * words], i);
                }
            }
            for g in 0..n_web {
                if r.to_web.contains(g as u32) {
                    set_bit(&mut web_g[g * words..(g + 1) * words], i);
                }
            }
        }
        let n_sets = sets.len();
        let per_set = n_sets.saturating_mul(words).saturating_mul(8 * 3) <= PER_SET_BUDGET;
        let expand = |by_group: &[u64]| -> Option<Vec<u64>> {
            if !per_set {
                return None;
            }
            let mut out = vec![0u64; n_sets * words];
            // Zeroed and untouched until filled: huge pages can still back it.
            crate::sys::advise_hugepages(&out);
            for s in 0..n_sets {
                let row = &mut out[s * words..(s + 1) * words];
                for g in sets.get(s as SetId) {
                    if let Some(src) = by_group.get(*g as usize * words..(*g as usize + 1) * words) {
                        row.iter_mut().zip(src).for_each(|(a, b)| *a |= b);
                    }
                }
            }
            Some(out)
        };
        Some(Self {
            words,
            from: Rows {
                by_set: expand(&from_g),
                by_group: from_g,
            },
            to_web: Rows {
                by_set: expand(&web_g),
                by_group: web_g,
            },
            to_smart: Rows {
                by_set: expand(&smart_g),
                by_group: smart_g,
            },
            from_any,
            to_any,
            proto,
            implied_dns,
        })
    }

    #[inline]
    fn or_into(&self, rows: &Rows, set: SetId, sets: &SetArena, out: &mut [u64]) {
        let w = self.words;
        if let Some(by_set) = &rows.by_set {
            if let Some(row) = by_set.get(set as usize * w..(set as usize + 1) * w) {
                out.iter_mut().zip(row).for_each(|(a, b)| *a |= b);
            }
            return;
        }
        for g in sets.get(set) {
            if let Some(row) = rows.by_group.get(*g as usize * w..(*g as usize + 1) * w) {
                out.iter_mut().zip(row).for_each(|(a, b)| *a |= b);
            }
        }
    }

    /// Starts loading the source's and destination's rows.
    #[inline]
    pub fn prefetch_rows(&self, src: SetId, dst: Option<SetId>) {
        let w = self.words;
        if let Some(row) = self.from.by_set.as_ref().and_then(|r| r.get(src as usize * w)) {
            crate::sys::prefetch(row);
        }
        if let Some(d) = dst
            && let Some(row) = self.to_smart.by_set.as_ref().and_then(|r| r.get(d as usize * w))
        {
            crate::sys::prefetch(row);
        }
    }

    /// Index of the first rule matching, given the flow's resolved sets.
    /// `port_ok(i)` checks rule `i`'s ports (not indexed: ranges).
    #[inline]
    #[allow(clippy::too_many_arguments, reason = "the hot path takes the flow's parts unbundled")]
    pub fn first_match(
        &self,
        protocol: Protocol,
        src: SetId,
        identity: Option<SetId>,
        dst: Option<SetId>,
        hits: impl Iterator<Item = SetId>,
        sets: &SetArena,
        port_ok: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let w = self.words;
        let mut from = [0u64; MAX_INDEXED_RULES / 64];
        let mut to = [0u64; MAX_INDEXED_RULES / 64];
        let mut web = [0u64; MAX_INDEXED_RULES / 64];
        let (from, to, web) = (&mut from[..w], &mut to[..w], &mut web[..w]);
        from.copy_from_slice(&self.from_any);
        self.or_into(&self.from, src, sets, from);
        if let Some(set) = identity {
            self.or_into(&self.from, set, sets, from);
        }
        to.copy_from_slice(&self.to_any);
        if let Some(d) = dst {
            self.or_into(&self.to_smart, d, sets, to);
        }
        for h in hits {
            self.or_into(&self.to_web, h, sets, web);
        }
        let proto = self.proto.get(protocol as usize).map_or(&[][..], Vec::as_slice);
        let dns = protocol == Protocol::Dns;
        for i in 0..w {
            let f = from[i];
            let p = proto.get(i).copied().unwrap_or(0);
            let mut c = f & (to[i] | web[i]) & p;
            if dns {
                c |= f & web[i] & self.implied_dns.get(i).copied().unwrap_or(0);
            }
            while c != 0 {
                let bit = c.trailing_zeros() as usize;
                let rule = i * 64 + bit;
                if dns || port_ok(rule) {
                    return Some(rule);
                }
                c &= c - 1;
            }
        }
        None
    }

    pub fn heap_bytes(&self) -> usize {
        let rows = |r: &Rows| r.by_group.capacity() * 8 + r.by_set.as_ref().map_or(0, |v| v.capacity() * 8);
        rows(&self.from) + rows(&self.to_web) + rows(&self.to_smart)
    }
}
