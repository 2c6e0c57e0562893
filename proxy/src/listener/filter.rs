//! The network-filter interface, shared by built-in filters (`sluice.policy`
//! now) and WASM filters (later): one trait, a per-flow context, and hooks
//! with default no-op bodies, in the spirit of Envoy's network filters and
//! pingora's phases.
//!
//! Hooks run in chain order, on the flow's task, and must not block:
//!
//! | hook | when | may |
//! |---|---|---|
//! | [`NetworkFilter::on_classified`] | the flow's name, protocol and port are known (SNI, Host, CONNECT target, or none), nothing has been sent upstream | decide, annotate, deny |
//! | [`NetworkFilter::on_destination`] | an upstream address has been chosen (resolved name, original destination), before connecting | deny that address |
//! | [`NetworkFilter::on_policy_change`] | a new configuration snapshot was installed while the flow is relayed | deny: the flow is closed, its record says why |
//! | [`NetworkFilter::on_close`] | the flow has ended, its audit record is complete | add to the record |
//!
//! Returning [`FilterStatus::Deny`] stops the chain. Whether the flow is
//! then actually refused depends on the denial's enforcement: a *watched*
//! denial is recorded as "would deny" and the flow goes on.

use std::borrow::Cow;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use sluice_api::reason::ReasonCode;
use sluice_api::{DomainName, Protocol};

use super::Snapshot;
use crate::policy::{DecidedBy, Enforcement, FlowQuery, Verdict};
use crate::telemetry::audit::{self, FlowRecord, VerdictRecord};

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
        }
    }

    /// A data-plane denial carried out whatever the mode: what cannot be
    /// classified, and what the listener refuses before any policy question.
    pub fn refused(reason: ReasonCode) -> Self {
        Self::check(reason, Enforcement::Enforced)
    }

    pub fn from_verdict(v: &Verdict, snap: &Snapshot) -> Self {
        Self {
            allow: v.action == sluice_api::Action::Allow,
            rule: RuleLabel::Policy(snap.rule_label(v.decided_by)),
            reason: v.reason,
            enforcement: v.enforcement,
            check: None,
        }
    }

    /// A deny that is carried out.
    pub fn blocks(&self) -> bool {
        !self.allow && self.enforcement == Enforcement::Enforced
    }

    pub fn record(&self) -> VerdictRecord {
        let mut r = VerdictRecord::new(
            if self.allow {
                audit::Action::Allow
            } else {
                audit::Action::Deny
            },
            self.rule.as_str(),
            self.reason.as_str(),
            match self.enforcement {
                Enforcement::Enforced => audit::Enforcement::Enforced,
                Enforcement::Watched => audit::Enforcement::Watched,
            },
        );
        r.check = self.check.map(Cow::Borrowed);
        r
    }
}

/// Everything a flow has learned, handed to each hook.
#[derive(Debug)]
pub struct FlowContext {
    pub id: u64,
    pub listener: Arc<str>,
    /// The listener's metric handles.
    pub metrics: crate::telemetry::metrics::ListenerMetrics,
    pub src: SocketAddr,
    /// Transparent mode: where the client was going before iptables.
    pub original_dst: Option<SocketAddr>,
    /// Explicit proxy: `host:port` of `CONNECT` or of an absolute-form URI.
    pub connect_target: Option<String>,
    pub sni: Option<String>,
    pub host: Option<String>,
    pub alpn: Vec<String>,
    pub ech: bool,
    pub protocol: Protocol,
    /// The canonical destination name, when there is one.
    pub name: Option<DomainName>,
    /// The destination address, when known before resolution.
    pub dst_ip: Option<IpAddr>,
    pub port: u16,
    /// SmartGroup id of an authenticated proxy user.
    pub identity: Option<u32>,
    /// The name came from a DNS binding, not from the flow itself.
    pub name_from_dns: bool,
    pub decision: Option<Decision>,
    /// The configuration snapshot the flow started with; kept to its end.
    pub snapshot: Arc<Snapshot>,
}

impl FlowContext {
    pub fn new(id: u64, plan: &super::ListenerPlan, src: SocketAddr, snapshot: Arc<Snapshot>) -> Self {
        Self {
            id,
            listener: plan.label.clone(),
            metrics: plan.metrics.clone(),
            src,
            original_dst: None,
            connect_target: None,
            sni: None,
            host: None,
            alpn: Vec::new(),
            ech: false,
            protocol: Protocol::Tcp,
            name: None,
            dst_ip: None,
            port: 0,
            identity: None,
            name_from_dns: false,
            decision: None,
            snapshot,
        }
    }

    pub fn query(&self, dst: Option<IpAddr>) -> FlowQuery<'_> {
        FlowQuery {
            src: self.src.ip(),
            name: self.name.as_ref(),
            dst,
            protocol: self.protocol,
            port: self.port,
            identity: self.identity,
        }
    }

    /// The audit record for this flow as it stands; `flow::finish` stamps
    /// its `time` with the moment the flow was accepted.
    pub fn record(&self) -> FlowRecord {
        let decision = self
            .decision
            .clone()
            .unwrap_or_else(|| Decision::refused(ReasonCode::NoDecision));
        let mut r = FlowRecord::unstamped(self.id, self.listener.to_string(), self.src, decision.record());
        r.src_groups = self
            .snapshot
            .policy
            .smartgroups_of(self.src.ip())
            .into_iter()
            .map(str::to_owned)
            .collect();
        // An authenticated proxy user's group joins the source's groups for
        // policy; the record must show it, or a rule `from: [that group]`
        // deciding the flow is unexplained.
        if let Some(id) = self.identity {
            let g = self.snapshot.policy.smartgroup_name(id);
            if !r.src_groups.iter().any(|s| s == g) {
                r.src_groups.push(g.to_owned());
            }
        }
        r.original_dst = self.original_dst;
        r.connect_target.clone_from(&self.connect_target);
        r.sni.clone_from(&self.sni);
        r.host.clone_from(&self.host);
        r.alpn.clone_from(&self.alpn);
        r.ech = self.ech;
        if self.name_from_dns {
            r.dns_name = self.name.as_ref().map(ToString::to_string);
        }
        r
    }
}

/// What a hook tells the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterStatus {
    Continue,
    /// Stop the chain with this decision (carried out unless watched).
    Deny(Decision),
}

/// A network filter. See the module documentation for when hooks run.
pub trait NetworkFilter: Send + Sync + fmt::Debug {
    /// The filter's name as configured (`sluice.policy`, a plugin name).
    fn name(&self) -> &str;

    fn on_classified(&self, _ctx: &mut FlowContext) -> FilterStatus {
        FilterStatus::Continue
    }

    fn on_destination(&self, _ctx: &mut FlowContext, _dst: IpAddr) -> FilterStatus {
        FilterStatus::Continue
    }

    /// `snapshot` is the newly installed configuration; `ctx` still holds
    /// the one the flow started with, and `dst` is the address it is
    /// connected to. Returning an enforced `Deny` closes the flow
    /// (`close_reason: policy-revoked`, the denial as its verdict).
    fn on_policy_change(&self, _ctx: &FlowContext, _snapshot: &Snapshot, _dst: IpAddr) -> FilterStatus {
        FilterStatus::Continue
    }

    fn on_close(&self, _ctx: &FlowContext, _record: &mut FlowRecord) {}
}

/// `sluice.policy`: asks the compiled policy about the flow, and again about
/// each address it is about to dial (the SSRF guard: a name allowed by
/// WebGroup must still not reach metadata, link-local, loopback or the
/// gateway itself).
#[derive(Debug, Default)]
pub struct PolicyFilter;

impl NetworkFilter for PolicyFilter {
    fn name(&self) -> &str {
        "sluice.policy"
    }

    fn on_classified(&self, ctx: &mut FlowContext) -> FilterStatus {
        let v = ctx.snapshot.policy.decide(&ctx.query(ctx.dst_ip));
        let d = Decision::from_verdict(&v, &ctx.snapshot);
        if d.allow {
            ctx.decision = Some(d);
            FilterStatus::Continue
        } else {
            ctx.decision = Some(d.clone());
            FilterStatus::Deny(d)
        }
    }

    /// The flow as it was decided (name, protocol, port, source, its
    /// address-only destination), and then the address it is connected to
    /// for the guard, asked of the new policy. An authenticated user's
    /// SmartGroup is looked up by name there (ids are per snapshot).
    fn on_policy_change(&self, ctx: &FlowContext, snapshot: &Snapshot, dst: IpAddr) -> FilterStatus {
        let identity = ctx
            .identity
            .and_then(|id| snapshot.policy.smartgroup_id(ctx.snapshot.policy.smartgroup_name(id)));
        let mut q = ctx.query(ctx.dst_ip);
        q.identity = identity;
        let v = snapshot.policy.decide(&q);
        if v.action != sluice_api::Action::Allow {
            return FilterStatus::Deny(Decision::from_verdict(&v, snapshot));
        }
        q.dst = Some(dst);
        let v = snapshot.policy.decide(&q);
        if v.decided_by == DecidedBy::BuiltinGuard {
            return FilterStatus::Deny(Decision::from_verdict(&v, snapshot));
        }
        FilterStatus::Continue
    }

    fn on_destination(&self, ctx: &mut FlowContext, dst: IpAddr) -> FilterStatus {
        let v = ctx.snapshot.policy.decide(&ctx.query(Some(dst)));
        // Only the guard can newly fire here: rules matched on the name
        // already decided, and matching on an address the flow did not name
        // is for address-only flows, decided in `on_classified`.
        if v.decided_by == DecidedBy::BuiltinGuard {
            let d = Decision::from_verdict(&v, &ctx.snapshot);
            return FilterStatus::Deny(d);
        }
        FilterStatus::Continue
    }
}
