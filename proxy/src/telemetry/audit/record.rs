//! The audit records: a flow's, a DNS query's, and the verdict inside them.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::time::SystemTime;

use serde::Serialize;

/// The current time as RFC 3339 UTC with milliseconds
/// (`2026-11-23T10:32:32.123Z`), the audit record's time format.
pub fn rfc3339_now() -> String {
    rfc3339(SystemTime::now())
}

/// `t` as RFC 3339 UTC with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    use std::fmt::Write as _;
    // `YYYY-MM-DDTHH:MM:SS.mmmZ` is 24 bytes: one allocation, no regrowth
    // (`to_string` grew the buffer three times per record).
    let mut s = String::with_capacity(24);
    let _ = write!(s, "{}", humantime::format_rfc3339_millis(t));
    s
}

/// The verdict's action and whether it was carried out: the api's own
/// types, which serialise as the records always have (`allow`/`deny`,
/// `enforced`/`watched`).
pub use sluice_api::{Action, Enforcement};

use crate::listener::FlowContext;
use crate::policy::decision::Decision;
use sluice_api::reason::ReasonCode;

/// The decision part of an audit record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct VerdictRecord {
    /// Allow or deny.
    pub action: Action,
    /// What decided: a rule's name, `default`, `builtin-guard`, or the data
    /// plane's `anti-evasion`, `classify` or `listener`.
    pub rule: String,
    /// Reason code (`rule-match`, `default-deny`, `sni-mismatch`,
    /// `ech-present`, `ssrf-loopback`, `connect-timeout`, …).
    pub reason: Cow<'static, str>,
    /// Enforced or only watched.
    pub mode: Enforcement,
    /// Which anti-evasion check decided the destination, when one ran
    /// (`dns-binding`, `sni-resolved`, `off`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<Cow<'static, str>>,
}

impl VerdictRecord {
    /// A verdict with no check.
    pub fn new(action: Action, rule: &str, reason: impl Into<Cow<'static, str>>, mode: Enforcement) -> Self {
        Self {
            action,
            rule: rule.to_owned(),
            reason: reason.into(),
            mode,
            check: None,
        }
    }
}

impl FlowRecord {
    /// The record of a flow as its context stands; `flow::finish` stamps
    /// its `time` with the moment the flow was accepted.
    pub fn of_flow(ctx: &FlowContext) -> Self {
        let decision = ctx
            .decision
            .clone()
            .unwrap_or_else(|| Decision::refused(ReasonCode::NoDecision));
        let mut r = Self::unstamped(ctx.id, ctx.plan.label.to_string(), ctx.src, (&decision).into());
        r.src_groups = ctx
            .snapshot
            .policy
            .smartgroups_of(ctx.src.ip())
            .into_iter()
            .map(str::to_owned)
            .collect();
        // An authenticated proxy user's group joins the source's groups for
        // policy; the record must show it, or a rule `from: [that group]`
        // deciding the flow is unexplained.
        if let Some(id) = ctx.identity {
            let g = ctx.snapshot.policy.smartgroup_name(id);
            if !r.src_groups.iter().any(|s| s == g) {
                r.src_groups.push(g.to_owned());
            }
        }
        r.original_dst = ctx.original_dst;
        r.connect_target.clone_from(&ctx.connect_target);
        r.sni.clone_from(&ctx.sni);
        r.host.clone_from(&ctx.host);
        r.alpn.clone_from(&ctx.alpn);
        r.ech = ctx.ech;
        if ctx.protocol == sluice_api::Protocol::Quic {
            r.protocol = Some(sluice_api::Protocol::Quic.as_str());
        }
        if let Some(x) = &ctx.extras {
            r.annotations = x.annotations.iter().cloned().collect();
            r.changed_by = x.changed_by.iter().map(|f| f.to_string()).collect();
        }
        if ctx.name_from_dns {
            r.dns_name = ctx.name.as_ref().map(ToString::to_string);
        }
        r
    }
}

impl From<&Decision> for VerdictRecord {
    fn from(d: &Decision) -> Self {
        let action = if d.allow { Action::Allow } else { Action::Deny };
        let mut r = VerdictRecord::new(action, d.rule.as_str(), d.reason.as_str(), d.enforcement);
        r.check = d.check.map(Cow::Borrowed);
        r
    }
}

/// Every audit line: a TCP flow or a DNS query. Both carry a `kind` field
/// (`flow` / `dns`) so one log can be filtered by it.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum AuditRecord {
    Flow(Box<FlowRecord>),
    Dns(Box<DnsQueryRecord>),
}

/// One DNS query: the DNS proxy's record plus what only the data plane
/// knows (listener name, the source's SmartGroups).
#[derive(Debug, Clone, Serialize)]
pub struct DnsQueryRecord {
    pub kind: &'static str,
    /// When the query arrived, RFC 3339 UTC with milliseconds (as flows).
    pub time: String,
    pub listener: String,
    pub src_groups: Vec<String>,
    #[serde(flatten)]
    pub query: crate::dns::DnsAuditRecord,
}

/// One audit line per flow. Optional fields are omitted when unknown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct FlowRecord {
    /// Always `flow`.
    pub kind: &'static str,
    /// When the flow was accepted, RFC 3339 UTC with milliseconds.
    pub time: String,
    /// Process-unique flow id (ties the record to tracing spans).
    pub flow_id: u64,
    /// Listener name from the configuration.
    pub listener: String,
    /// Client address.
    pub src: SocketAddr,
    /// SmartGroups the client address belongs to.
    pub src_groups: Vec<String>,
    /// The address actually dialled; `None` when the flow never connected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst: Option<SocketAddr>,
    /// Transparent mode: the destination the client addressed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_dst: Option<SocketAddr>,
    /// SmartGroups the destination address belongs to.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dst_groups: Vec<String>,
    /// Explicit proxy: the `CONNECT host:port` target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_target: Option<String>,
    /// TLS SNI (the outer SNI when ECH is present).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// Plain HTTP `Host`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The name the DNS proxy answered with the destination address, for a
    /// flow that carried none itself (DNS binding).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_name: Option<String>,
    /// TLS ALPN protocols offered.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub alpn: Vec<String>,
    /// Whether the ClientHello carried an ECH extension.
    pub ech: bool,
    /// `quic` for a QUIC flow (UDP); absent for TCP flows, whose record
    /// was defined before QUIC and says what they are by its other fields.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<&'static str>,
    /// The decision.
    pub verdict: VerdictRecord,
    /// Bytes client → upstream (including replayed peeked bytes).
    pub bytes_up: u64,
    /// Bytes upstream → client.
    pub bytes_down: u64,
    /// Accept to close, in milliseconds.
    pub duration_ms: u64,
    /// Why the flow ended (`client-closed`, `idle-timeout`, `denied`, …).
    pub close_reason: Cow<'static, str>,
    /// Filters that changed the verdict after the first decision, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub changed_by: Vec<String>,
    /// Notes the filters added.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub annotations: std::collections::BTreeMap<String, String>,
}

impl FlowRecord {
    /// A record stamped now, for a flow from `src` on `listener`, with
    /// everything else empty and the given verdict.
    pub fn new(flow_id: u64, listener: impl Into<String>, src: SocketAddr, verdict: VerdictRecord) -> Self {
        Self {
            time: rfc3339_now(),
            ..Self::unstamped(flow_id, listener, src, verdict)
        }
    }

    /// Like [`FlowRecord::new`] with `time` left empty, for a caller that
    /// stamps it with the flow's own start.
    pub fn unstamped(flow_id: u64, listener: impl Into<String>, src: SocketAddr, verdict: VerdictRecord) -> Self {
        Self {
            kind: "flow",
            dns_name: None,
            time: String::new(),
            flow_id,
            listener: listener.into(),
            src,
            src_groups: Vec::new(),
            dst: None,
            original_dst: None,
            dst_groups: Vec::new(),
            connect_target: None,
            sni: None,
            host: None,
            alpn: Vec::new(),
            ech: false,
            protocol: None,
            verdict,
            bytes_up: 0,
            bytes_down: 0,
            duration_ms: 0,
            close_reason: Cow::Borrowed(""),
            changed_by: Vec::new(),
            annotations: std::collections::BTreeMap::new(),
        }
    }
}
