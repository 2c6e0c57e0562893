//! The network-filter interface, shared by the built-in filters
//! (`sluice.anti-evasion`, `sluice.policy`) and WASM plugins: one trait, a
//! per-flow context, and hooks with default no-op bodies, in the spirit of
//! Envoy's network filters and pingora's phases.
//!
//! Hooks run in chain order, on the flow's task, and must not block (a
//! filter that must wait returns [`FilterStatus::Pause`]):
//!
//! | hook | when | may |
//! |---|---|---|
//! | [`NetworkFilter::on_classified`] | the flow's name, protocol and port are known (SNI, Host, CONNECT target, or none), nothing has been sent upstream | allow, deny, pause, annotate, keep state |
//! | [`NetworkFilter::http_exchange`] | plain HTTP or a `CONNECT` on an `http-proxy` listener: a request, decided, before it is sent on; then its response (filters that [`wants_http`](NetworkFilter::wants_http)) | change headers, bodies and trailers, answer locally (deny), pause |
//! | [`NetworkFilter::on_destination`] | an upstream address has been chosen (resolved name, original destination), before connecting | deny that address |
//! | [`NetworkFilter::on_downstream_data`], [`NetworkFilter::on_upstream_data`] | bytes cross the relay, for a chain with a filter that [`wants_data`](NetworkFilter::wants_data) | close the flow |
//! | [`NetworkFilter::on_policy_change`] | a new configuration snapshot was installed while the flow is relayed | deny: the flow is closed, its record says why |
//! | [`NetworkFilter::on_close`] | the flow has ended, its audit record is complete | add to the record |
//!
//! Every filter of the chain runs, whatever earlier ones said, so a later
//! one sees a denied flow too. Who may change the verdict (the chain
//! applies these rules, `flow::apply`):
//!
//! - the first decision stands, unless a later filter **tightens** it:
//!   denies what was allowed, or carries out a denial that was only watched;
//! - a filter may **loosen** (allow what was denied) only a denial by a
//!   rule that names it in `delegate`; a denial by the built-in guard, by
//!   an anti-evasion check or by the default is final;
//! - watch mode is applied in one place, to every word the chain takes
//!   (`Decision::in_mode`): in watch mode a denial is only recorded,
//!   unless its reason fails closed (`ReasonCode::fails_closed`); a rule's
//!   own `watch: true` watches its denials in enforce mode too.
//!
//! The record names, in `changed_by`, every filter that changed the verdict
//! after the first decision, and carries the filters' `annotations`.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use sluice_api::reason::ReasonCode;
use sluice_api::{DomainName, Protocol};

use super::Snapshot;
use crate::classify::http::Host;
pub use crate::policy::decision::{Decision, RuleLabel};
use crate::policy::{DecidedBy, Enforcement, FlowQuery};
use crate::telemetry::audit::FlowRecord;

/// Everything a flow has learned, handed to each hook.
#[derive(Debug)]
pub struct FlowContext {
    pub id: u64,
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
    /// The listener's plan the flow started with: its name, options and
    /// metric handles.
    pub plan: Arc<super::ListenerPlan>,
    /// The filter chain serving the flow, once one is chosen: its cluster
    /// says where the flow goes.
    pub chain: Option<Arc<super::FilterChain>>,
    /// Explicit proxy: the flow is the inside of a `CONNECT` tunnel.
    pub tunnel: bool,
    /// What most flows never need, allocated on first use: a relayed flow
    /// keeps its context until its record is written, so the context stays
    /// small.
    pub extras: Option<Box<FlowExtras>>,
}

impl FlowExtras {
    /// Adds a note to the flow's audit record (`annotations`).
    pub fn annotate(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.annotations.push((key.into(), value.into()));
    }
}

/// The less common parts of a flow's context.
#[derive(Debug, Default)]
pub struct FlowExtras {
    /// Explicit proxy tunnels: the `CONNECT` target, parsed.
    pub target: Option<Host>,
    /// The `Host` of a plain-HTTP request head inside a tunnel, parsed.
    pub http_host: Option<Host>,
    /// Notes filters add for the audit record (`annotations`).
    pub annotations: Vec<(String, String)>,
    /// Filters that changed the verdict after the first decision.
    pub changed_by: Vec<Arc<str>>,
    /// Each filter's own per-flow state, by the filter's position.
    pub state: FilterState,
}

/// Per-flow state of the chain's filters, created on a filter's first use
/// (nothing is allocated for a flow whose filters keep none).
#[derive(Default)]
pub struct FilterState(Vec<(usize, Box<dyn std::any::Any + Send + Sync>)>);

impl fmt::Debug for FilterState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.iter().map(|(i, _)| i)).finish()
    }
}

impl FilterState {
    /// Filter `index`'s state, made with `init` the first time.
    pub fn get_or_insert_with<T: Send + Sync + 'static>(&mut self, index: usize, init: impl FnOnce() -> T) -> &mut T {
        let pos = match self.0.iter().position(|(i, v)| *i == index && v.is::<T>()) {
            Some(p) => p,
            None => {
                self.0.push((index, Box::new(init())));
                self.0.len() - 1
            }
        };
        match self.0.get_mut(pos).and_then(|(_, v)| v.downcast_mut::<T>()) {
            Some(v) => v,
            None => unreachable!("the slot was found or made for this type"),
        }
    }

    /// Filter `index`'s state, if it has made one.
    pub fn get<T: 'static>(&self, index: usize) -> Option<&T> {
        self.0
            .iter()
            .find(|(i, _)| *i == index)
            .and_then(|(_, v)| v.downcast_ref::<T>())
    }
}

impl FlowContext {
    pub fn new(id: u64, plan: &Arc<super::ListenerPlan>, src: SocketAddr, snapshot: Arc<Snapshot>) -> Self {
        Self {
            id,
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
            plan: plan.clone(),
            chain: None,
            tunnel: false,
            extras: None,
        }
    }

    /// The listener's name.
    pub fn listener(&self) -> &Arc<str> {
        &self.plan.label
    }

    /// The less common parts, made on first use.
    pub fn extras_mut(&mut self) -> &mut FlowExtras {
        self.extras.get_or_insert_with(Box::default)
    }

    /// Adds a note to the flow's audit record (`annotations`).
    pub fn annotate(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.extras_mut().annotate(key, value);
    }

    /// Filter `index`'s per-flow state, made with `init` the first time.
    pub fn filter_state<T: Send + Sync + 'static>(&mut self, index: usize, init: impl FnOnce() -> T) -> &mut T {
        self.extras_mut().state.get_or_insert_with(index, init)
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
}

/// What a hook tells the chain. The chain applies it by the override rules
/// (see the module documentation): the first decision stands unless a
/// later filter tightens it (denies what was allowed, or carries out a
/// denial that was only watched) or loosens a rule's denial that the rule
/// hands to it by name (`delegate`).
pub enum FilterStatus {
    /// No opinion.
    Continue,
    /// Deny the flow.
    Deny(Decision),
    /// Allow the flow.
    Allow(Decision),
    /// Wait (a plugin's call out, for one): the chain awaits the future and
    /// applies what it returns. Only a flow whose filter pauses pays for it.
    Pause(Pending),
}

/// What a paused filter resumes with.
pub type Pending = std::pin::Pin<Box<dyn std::future::Future<Output = FilterStatus> + Send>>;

impl fmt::Debug for FilterStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Continue => f.write_str("Continue"),
            Self::Deny(d) => f.debug_tuple("Deny").field(d).finish(),
            Self::Allow(d) => f.debug_tuple("Allow").field(d).finish(),
            Self::Pause(_) => f.write_str("Pause(..)"),
        }
    }
}

/// What a data hook tells the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataStatus {
    /// Pass the bytes on.
    Continue,
    /// End the flow; the decision goes into its record (enforced denials
    /// only: a watched one is recorded and the flow goes on).
    Close(Decision),
}

/// An HTTP message's fields as HTTP filters see them: names lower case,
/// pseudo-headers first, as in Envoy (`:method`, `:path`, `:authority`,
/// `:scheme` on a request, `:status` on a response).
pub type HttpFields = Vec<(String, Vec<u8>)>;

/// An answer a filter gives in place of the upstream's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

/// What an HTTP filter says of one part of an exchange.
#[derive(Debug)]
pub enum HttpStatus {
    /// Go on; the filter did not change the part.
    Continue,
    /// Go on, with the part as the filter changed it.
    Changed,
    /// Hold this piece of the body (as the filter left it) and show it
    /// again, with the next piece appended, in the next body hook: Envoy's
    /// `StopIterationAndBuffer`, which a proxy-wasm plugin asks for by
    /// pausing a body callback before the end of the stream. Only body
    /// hooks say it, and never with `end_of_stream`.
    Buffer,
    /// Deny the exchange with `decision`, answering `reply` (an enforced
    /// denial; in watch mode the exchange goes on and the denial is
    /// recorded).
    Reply(LocalReply, Decision),
}

/// What an HTTP filter's hook returns: ready at once unless the filter
/// paused the exchange (waiting for a call out, say).
pub type HttpPending<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = HttpStatus> + Send + 'a>>;

/// One filter's view of one HTTP exchange (a plain-HTTP request and its
/// response, or a `CONNECT` request and its `200`), made by
/// [`NetworkFilter::http_exchange`]. Hooks run in this order, each part
/// only if the message has it: request headers, body, trailers, then
/// response headers, body, trailers; then [`HttpExchange::finish`]. (The
/// response may begin before the request body has ended, as in Envoy.)
/// A filter changes a part in place and returns [`HttpStatus::Changed`];
/// after [`HttpStatus::Continue`] the listener may send on the message as
/// it had it (it does for headers, which it keeps in their wire form), so
/// a filter that did not say `Changed` must not have changed the part.
///
/// Bodies stream: the body hooks run once per piece as it arrives, the
/// last with `end_of_stream` (the body then ends, or its trailers follow).
/// What a filter lets go of (`Continue`, `Changed`) is sent on at once; a
/// filter that says [`HttpStatus::Buffer`] is shown what it held with the
/// next piece appended, so one that buffers to the end sees the body
/// whole. A message's headers are sent on with the first piece the
/// filters let go of, so a body held whole to its end is sent with its
/// exact length.
pub trait HttpExchange: Send {
    /// The most body this filter is shown at once, and holds when it says
    /// `Buffer` (a larger piece is cut to it; holding more ends the
    /// exchange: `413` for a request, the response cut short); 0: bodies
    /// stream past the filter, which sees none.
    fn max_body(&self) -> usize;
    fn request_headers<'a>(&'a mut self, fields: &'a mut HttpFields, end_of_stream: bool) -> HttpPending<'a>;
    fn request_body<'a>(&'a mut self, body: &'a mut Vec<u8>, end_of_stream: bool) -> HttpPending<'a>;
    fn request_trailers<'a>(&'a mut self, fields: &'a mut HttpFields) -> HttpPending<'a>;
    fn response_headers<'a>(&'a mut self, fields: &'a mut HttpFields, end_of_stream: bool) -> HttpPending<'a>;
    fn response_body<'a>(&'a mut self, body: &'a mut Vec<u8>, end_of_stream: bool) -> HttpPending<'a>;
    fn response_trailers<'a>(&'a mut self, fields: &'a mut HttpFields) -> HttpPending<'a>;
    /// The exchange is over (answered, refused or failed): the filter's
    /// notes for the record.
    fn finish(&mut self) -> Vec<(String, String)>;
}

/// A network filter. See the module documentation for when hooks run.
pub trait NetworkFilter: Send + Sync + fmt::Debug {
    /// The filter's name as configured (`sluice.policy`, a plugin name):
    /// what a rule's `delegate` names and the record's `changed_by` shows.
    fn name(&self) -> &str;

    fn on_classified(&self, _ctx: &mut FlowContext, _index: usize) -> FilterStatus {
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

    /// Whether this filter takes part in HTTP exchanges
    /// ([`NetworkFilter::http_exchange`]).
    fn wants_http(&self) -> bool {
        false
    }

    /// An HTTP exchange begins (a plain-HTTP request or a `CONNECT`, after
    /// the flow was decided and before anything is sent on): the filter's
    /// part in it, if it takes one. `None` when it cannot (a failed
    /// plugin): then `Err` carries what that means for the exchange.
    fn http_exchange(&self, _ctx: &FlowContext, _index: usize) -> Result<Option<Box<dyn HttpExchange>>, HttpStatus> {
        Ok(None)
    }

    /// Whether this filter reads the flow's bytes. A chain with such a
    /// filter relays by copy and calls the data hooks; every other flow
    /// keeps the zero-copy path and never calls them.
    fn wants_data(&self) -> bool {
        false
    }

    /// Bytes from the client, before they are sent upstream. `extras` is
    /// the flow's mutable part while it is relayed (annotations, the
    /// filters' per-flow state); `ctx` is read-only then, because the
    /// re-check on a new configuration reads it at the same time.
    fn on_downstream_data(
        &self,
        _ctx: &FlowContext,
        _extras: &mut FlowExtras,
        _index: usize,
        _data: &[u8],
    ) -> DataStatus {
        DataStatus::Continue
    }

    /// Bytes from the upstream, before they are sent to the client.
    fn on_upstream_data(
        &self,
        _ctx: &FlowContext,
        _extras: &mut FlowExtras,
        _index: usize,
        _data: &[u8],
    ) -> DataStatus {
        DataStatus::Continue
    }

    fn on_close(&self, _ctx: &FlowContext, _record: &mut FlowRecord) {}
}

/// `sluice.anti-evasion`: the checks that catch a flow pretending to go
/// somewhere else than it does, first in every chain. Its denials are final:
/// no later filter can loosen them.
///
/// - ECH present on a listener with `ech: deny` (`ech-present`);
/// - inside a `CONNECT` tunnel to a named target: an SNI naming another
///   host (`sni-mismatch`, domain fronting), no SNI at all
///   (`connect-no-sni`, unless `connect_no_sni: allow`), a plain-HTTP Host
///   naming another host (`host-mismatch`);
/// - on an `sni` listener: anything but TLS (`not-tls`), a hello without
///   SNI (`no-sni`).
///
/// The tunnel checks and ECH are only recorded in watch mode; plain text
/// or no SNI where the SNI is the destination (a `sni_dynamic` cluster)
/// fail closed in every mode (`ReasonCode::fails_closed`).
#[derive(Debug, Default)]
pub struct AntiEvasionFilter;

impl NetworkFilter for AntiEvasionFilter {
    fn name(&self) -> &str {
        sluice_api::envoy::ANTI_EVASION
    }

    fn on_classified(&self, ctx: &mut FlowContext, _index: usize) -> FilterStatus {
        let spec = &ctx.plan.spec;
        // Every check denies as if enforced; watch mode is applied where
        // the chain takes the word (`Decision::in_mode`), and spares the
        // checks that fail closed.
        let deny = |reason| FilterStatus::Deny(Decision::check(reason, Enforcement::Enforced));
        if ctx.ech && spec.front.denies_ech() {
            return deny(ReasonCode::EchPresent);
        }
        // Where the SNI is the destination, a flow without one (or not TLS
        // at all) has nowhere to go that the policy could have judged.
        let sni_routed = ctx
            .chain
            .as_ref()
            .is_some_and(|c| matches!(c.cluster, super::Cluster::SniDynamic { .. }));
        let connect_no_sni = match &spec.front {
            super::Front::HttpProxy { connect_no_sni, .. } => *connect_no_sni,
            _ => sluice_api::Action::Deny,
        };
        match () {
            // A QUIC flow's ClientHello is TLS too, read from its Initials.
            () if sni_routed && !matches!(ctx.protocol, Protocol::Tls | Protocol::Quic) => deny(ReasonCode::NotTls),
            () if sni_routed && ctx.sni.is_none() => deny(ReasonCode::NoSni),
            () if ctx.tunnel => {
                let (target, http_host) = ctx
                    .extras
                    .as_ref()
                    .map_or((None, None), |x| (x.target.as_ref(), x.http_host.as_ref()));
                match (target, ctx.protocol) {
                    (Some(Host::Name(target)), Protocol::Tls) => match &ctx.sni {
                        Some(sni)
                            if DomainName::parse(sni).is_ok_and(|s| DomainName::parse(target).ok() != Some(s)) =>
                        {
                            deny(ReasonCode::SniMismatch)
                        }
                        None if connect_no_sni == sluice_api::Action::Deny => deny(ReasonCode::ConnectNoSni),
                        _ => FilterStatus::Continue,
                    },
                    (Some(target), Protocol::Http) => match http_host {
                        Some(h) if !h.same_as(target) => deny(ReasonCode::HostMismatch),
                        _ => FilterStatus::Continue,
                    },
                    _ => FilterStatus::Continue,
                }
            }
            _ => FilterStatus::Continue,
        }
    }
}

/// `sluice.policy`: asks the compiled policy about the flow, and again about
/// each address it is about to dial (the SSRF guard: a name allowed by
/// WebGroup must still not reach metadata, link-local, loopback or the
/// gateway itself).
#[derive(Debug, Default)]
pub struct PolicyFilter;

impl NetworkFilter for PolicyFilter {
    fn name(&self) -> &str {
        sluice_api::envoy::POLICY
    }

    fn on_classified(&self, ctx: &mut FlowContext, _index: usize) -> FilterStatus {
        let v = ctx.snapshot.policy.decide(&ctx.query(ctx.dst_ip));
        let d = Decision::from_verdict(&v, ctx.snapshot.rule_label(v.decided_by));
        if d.allow {
            FilterStatus::Allow(d)
        } else {
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
            return FilterStatus::Deny(Decision::from_verdict(&v, snapshot.rule_label(v.decided_by)));
        }
        q.dst = Some(dst);
        let v = snapshot.policy.decide(&q);
        if v.decided_by == DecidedBy::BuiltinGuard {
            return FilterStatus::Deny(Decision::from_verdict(&v, snapshot.rule_label(v.decided_by)));
        }
        FilterStatus::Continue
    }

    fn on_destination(&self, ctx: &mut FlowContext, dst: IpAddr) -> FilterStatus {
        let v = ctx.snapshot.policy.decide(&ctx.query(Some(dst)));
        // Only the guard can newly fire here: rules matched on the name
        // already decided, and matching on an address the flow did not name
        // is for address-only flows, decided in `on_classified`.
        if v.decided_by == DecidedBy::BuiltinGuard {
            let d = Decision::from_verdict(&v, ctx.snapshot.rule_label(v.decided_by));
            return FilterStatus::Deny(d);
        }
        FilterStatus::Continue
    }
}
