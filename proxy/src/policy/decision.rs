//! The verdict vocabulary every stage shares: a [`Decision`] is what a
//! flow or a DNS query carries, whoever made it (the policy, a data-plane
//! check, a filter), with the rule that decided, a reason from the api's
//! one reason vocabulary, and whether it is carried out or only watched.
//! Who may replace whose decision is [`tightens`] (and, for a filter's
//! allow, the rule's `delegate`).

use std::sync::Arc;

use sluice_api::reason::ReasonCode;

use super::{DecidedBy, Enforcement, Verdict};

/// The decision a flow carries: from the policy, or from a data-plane check
/// (a malformed ClientHello, an SNI that contradicts the CONNECT target, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allow: bool,
    /// What decided: a rule's name, `default` or `builtin-guard` for the
    /// policy, or the data plane's label for its own reasons
    /// (`ReasonKind::rule_label`).
    pub rule: RuleLabel,
    pub reason: ReasonCode,
    pub enforcement: Enforcement,
    /// Which anti-evasion check chose the destination (`dns-binding`,
    /// `sni-resolved`, `off`), when one ran.
    pub check: Option<&'static str>,
    /// The part of the policy that decided, for a policy verdict: what a
    /// filter's allow is checked against (only a rule that delegates to the
    /// filter can be loosened by it).
    pub source: Option<DecidedBy>,
    /// Notes a DNS query filter (a plugin) gave with its word, for the
    /// query's audit record (a flow keeps its notes in its context).
    pub notes: Option<Box<Vec<(String, String)>>>,
}

/// The `rule` of a verdict. Every verdict names one, so audit records and
/// metrics always carry the same fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleLabel {
    /// Shared with the snapshot's label, not copied per flow.
    Policy(Arc<str>),
    /// `anti-evasion`, `classify`, `listener`: see `ReasonKind::rule_label`.
    Builtin(&'static str),
}

impl RuleLabel {
    pub fn as_str(&self) -> &str {
        match self {
            Self::Policy(s) => s,
            Self::Builtin(s) => s,
        }
    }
}

impl Decision {
    /// A denial by the data plane itself (not by a rule): labelled by the
    /// reason's kind, carried out or watched per `enforcement`.
    pub fn check(reason: ReasonCode, enforcement: Enforcement) -> Self {
        Self {
            allow: false,
            rule: RuleLabel::Builtin(reason.kind().rule_label()),
            reason,
            enforcement,
            check: None,
            source: None,
            notes: None,
        }
    }

    /// A data-plane denial carried out whatever the mode: what cannot be
    /// classified, and what the listener refuses before any policy question.
    pub fn refused(reason: ReasonCode) -> Self {
        Self::check(reason, Enforcement::Enforced)
    }

    /// The policy's verdict, labelled `rule` (the snapshot's shared name
    /// of the rule that decided).
    pub fn from_verdict(v: &Verdict, rule: Arc<str>) -> Self {
        Self {
            allow: v.action == sluice_api::Action::Allow,
            rule: RuleLabel::Policy(rule),
            reason: v.reason,
            enforcement: v.enforcement,
            check: None,
            source: Some(v.decided_by),
            notes: None,
        }
    }

    /// A verdict labelled `rule` by whoever made it (an embedder's own
    /// policy, a test).
    pub fn labelled(rule: &str, allow: bool, reason: ReasonCode, enforcement: Enforcement) -> Self {
        Self::by_filter(rule, allow, reason, enforcement)
    }

    /// A filter's own verdict (a plugin's), labelled with its name.
    pub fn by_filter(filter: &str, allow: bool, reason: ReasonCode, enforcement: Enforcement) -> Self {
        Self {
            allow,
            rule: RuleLabel::Policy(Arc::from(filter)),
            reason,
            enforcement,
            check: None,
            source: None,
            notes: None,
        }
    }

    /// Watch mode, applied in this one place to every decision a filter,
    /// a data-plane check or a query filter makes: under `Mode::Watch` a
    /// denial is only recorded, unless its reason fails closed
    /// ([`ReasonCode::fails_closed`]). Enforce mode leaves it as made (a
    /// rule's own `watch: true` included).
    #[must_use]
    pub fn in_mode(mut self, mode: sluice_api::Mode) -> Self {
        if mode == sluice_api::Mode::Watch && !self.allow && !self.reason.fails_closed() {
            self.enforcement = Enforcement::Watched;
        }
        self
    }

    /// A deny that is carried out.
    pub fn blocks(&self) -> bool {
        !self.allow && self.enforcement == Enforcement::Enforced
    }
}

/// A later denial replaces the decision so far when it denies what was
/// allowed, or carries out what was only watched.
pub fn tightens(current: &Decision, new: &Decision) -> bool {
    current.allow || (new.blocks() && !current.blocks())
}

/// Whether a filter's word replaces the decision so far: a denial when it
/// [`tightens`]; an allow (`loosening`) only over a policy denial whose rule
/// delegates to the filter (`delegated`, asked with the part of the policy
/// that decided). A denial by the guard, by a data-plane check or by the
/// default is never loosened: `delegated` is asked only for a rule's.
pub fn overrides(
    current: &Decision,
    new: &Decision,
    loosening: bool,
    delegated: impl FnOnce(DecidedBy) -> bool,
) -> bool {
    if loosening {
        !current.allow
            && current
                .source
                .is_some_and(|s| matches!(s, DecidedBy::Rule(_)) && delegated(s))
    } else {
        tightens(current, new)
    }
}
