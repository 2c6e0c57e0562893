//! What a client asked for, for one type on one stream: the wildcard, the
//! explicit names, and whether an empty request still means "wildcard"
//! (the legacy form, rules S23/S24 and D8–D10).

use std::collections::BTreeSet;

/// The name that subscribes to every resource of a type meant for the node.
pub const WILDCARD: &str = "*";

/// A client's interest in one type on one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    wildcard: bool,
    names: BTreeSet<String>,
    legacy_possible: bool,
}

impl Default for Subscription {
    fn default() -> Self {
        Subscription {
            wildcard: false,
            names: BTreeSet::new(),
            legacy_possible: true,
        }
    }
}

/// How a Delta request changed a subscription.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct DeltaChange {
    /// Names listed in `resource_names_subscribe`, `*` excluded.
    pub subscribed: Vec<String>,
    /// Explicit names that were dropped by `resource_names_unsubscribe`.
    pub unsubscribed: Vec<String>,
    /// `*` was dropped.
    pub wildcard_dropped: bool,
}

impl Subscription {
    /// Whether the client subscribed by wildcard (explicitly or in the legacy way).
    pub fn is_wildcard(&self) -> bool {
        self.wildcard
    }

    /// The explicitly subscribed names (never `*`).
    pub fn names(&self) -> &BTreeSet<String> {
        &self.names
    }

    /// Whether an empty request would still mean "wildcard": no request of
    /// this type on this stream has named anything yet.
    pub fn legacy_wildcard_possible(&self) -> bool {
        self.legacy_possible
    }

    /// Whether a resource called `name` is of interest to the client.
    pub fn covers(&self, name: &str) -> bool {
        self.wildcard || self.names.contains(name)
    }

    /// Applies a SotW request's `resource_names`, which replace the whole
    /// subscription. An empty list means wildcard only while nothing has been
    /// named yet and only for a wildcard-capable type; after that it means
    /// "nothing" (S23/S24/S26), which is what gRPC sends when it drops its
    /// last name.
    pub(crate) fn apply_sotw(&mut self, names: &[String], wildcard_capable: bool) {
        if names.is_empty() {
            self.wildcard = self.legacy_possible && wildcard_capable;
            self.names.clear();
            return;
        }
        self.legacy_possible = false;
        self.wildcard = names.iter().any(|n| n == WILDCARD);
        self.names = names.iter().filter(|n| *n != WILDCARD).cloned().collect();
    }

    /// Applies a Delta request's subscribe and unsubscribe lists, which are
    /// changes (an empty list changes nothing, D1). The legacy wildcard holds
    /// while no request has subscribed to anything; naming a resource later
    /// keeps it, and only unsubscribing `*` ends it (D9). As in
    /// go-control-plane, only the subscribe list decides legacy mode (D10).
    pub(crate) fn apply_delta(
        &mut self,
        subscribe: &[String],
        unsubscribe: &[String],
        wildcard_capable: bool,
    ) -> DeltaChange {
        let mut change = DeltaChange::default();
        if self.legacy_possible && subscribe.is_empty() && wildcard_capable {
            self.wildcard = true;
        }
        if !subscribe.is_empty() || unsubscribe.iter().any(|n| n == WILDCARD) {
            self.legacy_possible = false;
        }
        for name in subscribe {
            if name == WILDCARD {
                self.wildcard = true;
            } else {
                self.names.insert(name.clone());
                change.subscribed.push(name.clone());
            }
        }
        for name in unsubscribe {
            if name == WILDCARD {
                change.wildcard_dropped |= self.wildcard;
                self.wildcard = false;
            } else if self.names.remove(name) {
                change.unsubscribed.push(name.clone());
            }
            // A name never subscribed is ignored (D5).
        }
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    fn state(s: &Subscription) -> (bool, Vec<&str>) {
        (s.is_wildcard(), s.names().iter().map(String::as_str).collect())
    }

    #[test]
    fn s23_sotw_legacy_sequence() {
        let mut s = Subscription::default();
        s.apply_sotw(&v(&[]), true);
        assert_eq!(state(&s), (true, vec![]));
        s.apply_sotw(&v(&["*", "A"]), true);
        assert_eq!(state(&s), (true, vec!["A"]));
        s.apply_sotw(&v(&["A"]), true);
        assert_eq!(state(&s), (false, vec!["A"]));
        s.apply_sotw(&v(&[]), true);
        assert_eq!(
            state(&s),
            (false, vec![]),
            "empty after a name is nothing, not wildcard"
        );
    }

    #[test]
    fn s24_legacy_empty_list_only_for_wildcard_capable_types() {
        let mut s = Subscription::default();
        s.apply_sotw(&v(&[]), false);
        assert_eq!(state(&s), (false, vec![]));
        // Explicit `*` is honoured for any type.
        s.apply_sotw(&v(&["*"]), false);
        assert_eq!(state(&s), (true, vec![]));
    }

    #[test]
    fn d9_delta_legacy_sequence() {
        let mut s = Subscription::default();
        s.apply_delta(&v(&[]), &v(&[]), true);
        assert_eq!(state(&s), (true, vec![]));
        s.apply_delta(&v(&["A"]), &v(&[]), true);
        assert_eq!(
            state(&s),
            (true, vec!["A"]),
            "naming a resource keeps the legacy wildcard"
        );
        let c = s.apply_delta(&v(&[]), &v(&["*"]), true);
        assert!(c.wildcard_dropped);
        assert_eq!(state(&s), (false, vec!["A"]));
        let c = s.apply_delta(&v(&[]), &v(&["A"]), true);
        assert_eq!(c.unsubscribed, v(&["A"]));
        assert_eq!(state(&s), (false, vec![]), "and not wildcard again");
        s.apply_delta(&v(&[]), &v(&[]), true);
        assert_eq!(state(&s), (false, vec![]));
    }

    #[test]
    fn d8_delta_explicit_wildcard() {
        let mut s = Subscription::default();
        s.apply_delta(&v(&["e1"]), &v(&[]), true);
        assert_eq!(state(&s), (false, vec!["e1"]));
        s.apply_delta(&v(&["*"]), &v(&[]), true);
        assert_eq!(state(&s), (true, vec!["e1"]));
        s.apply_delta(&v(&["e2"]), &v(&[]), true);
        assert_eq!(state(&s), (true, vec!["e1", "e2"]));
        s.apply_delta(&v(&[]), &v(&["*"]), true);
        assert_eq!(state(&s), (false, vec!["e1", "e2"]));
    }

    #[test]
    fn d5_phantom_unsubscribe_is_ignored() {
        let mut s = Subscription::default();
        s.apply_delta(&v(&["a"]), &v(&[]), false);
        let c = s.apply_delta(&v(&[]), &v(&["zz"]), false);
        assert_eq!(c, DeltaChange::default());
        assert_eq!(state(&s), (false, vec!["a"]));
    }

    #[test]
    fn delta_unsubscribing_star_first_ends_legacy() {
        let mut s = Subscription::default();
        s.apply_delta(&v(&[]), &v(&["*"]), true);
        assert_eq!(state(&s), (false, vec![]));
        s.apply_delta(&v(&[]), &v(&[]), true);
        assert_eq!(
            state(&s),
            (false, vec![]),
            "an ACK later does not bring the wildcard back"
        );
    }
}
