//! A plugin in a flow's filter chain: the same [`NetworkFilter`] trait as
//! `sluice.policy`, so a plugin's word is applied by the chain's override
//! rules (it may deny what was allowed; it may allow only what a rule
//! delegates to it).
//!
//! A plugin has one instance per slot (one slot per worker thread); a flow
//! is served by the slot its id picks, for its whole life, so its stream
//! context stays in one instance. A callback takes the slot's lock for as
//! long as it runs (at most the plugin's deadline).
//!
//! A plugin says what it wants of a flow by closing it
//! (`proxy_close_stream`, or a local reply), or by writing the property
//! `sluice.verdict` (`deny` or `allow`); it annotates the audit record by
//! writing `sluice.annotation.<key>`. A trap, a deadline or the memory cap
//! gives the flow the plugin's failure policy, reason `plugin-failed`; the
//! instance is dropped and started again for later flows, at most once a
//! second per slot, so a plugin that crashes on every flow cannot spin.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use sluice_api::reason::ReasonCode;

use super::abi::Action;
use super::properties::{int, string, uint};
use super::vm::{PluginCode, Vm, VmError};
use crate::listener::{
    DataStatus, Decision, FilterStatus, FlowContext, FlowExtras, HttpRequestHead, HttpStatus, LocalReply, NetworkFilter,
};
use crate::policy::Enforcement;
use crate::telemetry::audit::FlowRecord;

/// How long a slot whose instance failed waits before starting another.
pub const RESTART_BACKOFF: Duration = Duration::from_secs(1);

/// What a failed plugin means for the flows it was to judge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Deny them (`plugin-failed`): the default.
    Closed,
    /// Let the rest of the chain decide, as if the plugin were not there.
    Open,
}

/// A loaded plugin: its code and its instances.
#[derive(Debug)]
pub struct Plugin {
    pub code: PluginCode,
    pub failure: FailurePolicy,
    /// Whether flows through this plugin are relayed by copy so it sees
    /// their bytes.
    pub data: bool,
    /// What makes a later declaration the same plugin (module, settings).
    pub identity: String,
    /// An HTTP plugin: an HTTP context per plain-HTTP request, no stream
    /// context per flow.
    pub http: bool,
    slots: Vec<Mutex<Slot>>,
}

#[derive(Debug, Default)]
struct Slot {
    vm: Option<Vm>,
    /// Bumped each time the slot starts an instance, so a flow whose
    /// instance was replaced does not ask the new one about its context.
    generation: u64,
    failed_at: Option<Instant>,
    last_error: Option<VmError>,
    /// When the instance's next `on_tick` is due.
    next_tick: Option<Instant>,
}

/// A flow's place in the plugin: which slot, which instance, which context.
#[derive(Debug, Clone, Copy)]
struct Stream {
    slot: usize,
    generation: u64,
    id: u32,
}

impl Plugin {
    /// Starts the first instance now (the canary: a plugin that traps or
    /// refuses its configuration is refused here, before it serves), and
    /// the rest on first use.
    pub fn start(
        code: PluginCode,
        failure: FailurePolicy,
        data: bool,
        slots: usize,
        identity: String,
        http: bool,
    ) -> Result<Self, VmError> {
        let vm = Vm::start(&code)?;
        let slots: Vec<Mutex<Slot>> = (0..slots.max(1)).map(|_| Mutex::default()).collect();
        if let Some(first) = slots.first() {
            let mut s = lock(first);
            s.vm = Some(vm);
            s.generation = 1;
        }
        Ok(Self {
            code,
            failure,
            data,
            identity,
            http,
            slots,
        })
    }

    pub fn name(&self) -> &str {
        &self.code.name
    }

    /// Runs `f` on the instance of the slot for `flow`, starting one if the
    /// slot has none (and has not failed within [`RESTART_BACKOFF`]). A
    /// failure drops the instance.
    fn with_vm<R>(&self, slot: usize, f: impl FnOnce(&mut Vm, u64) -> Result<R, VmError>) -> Result<R, VmError> {
        let Some(cell) = self.slots.get(slot) else {
            return Err(VmError::Gone("the plugin slot"));
        };
        let mut s = lock(cell);
        if s.vm.is_none() {
            if let (Some(at), Some(e)) = (s.failed_at, &s.last_error)
                && at.elapsed() < RESTART_BACKOFF
            {
                return Err(e.clone());
            }
            match Vm::start_in(&self.code, slot) {
                Ok(vm) => {
                    s.vm = Some(vm);
                    s.generation += 1;
                }
                Err(e) => return Err(self.failed(&mut s, e)),
            }
        }
        let generation = s.generation;
        let Some(vm) = s.vm.as_mut() else {
            return Err(VmError::Gone("the plugin slot"));
        };
        match f(vm, generation) {
            Ok(r) => Ok(r),
            Err(e) => Err(self.failed(&mut s, e)),
        }
    }

    fn failed(&self, s: &mut Slot, e: VmError) -> VmError {
        tracing::error!(plugin = %self.code.name, error = %e, "plugin failed; its instance is dropped");
        metrics::counter!("sluice_plugin_failures_total", "plugin" => self.code.name.to_string()).increment(1);
        s.vm = None;
        s.next_tick = None;
        s.failed_at = Some(Instant::now());
        s.last_error = Some(e.clone());
        e
    }

    /// Calls `on_tick` on every instance whose tick period has passed;
    /// returns how long until the next one is due (`None`: no instance
    /// asked to be ticked).
    pub fn tick_due(&self, now: Instant) -> Option<Duration> {
        for (queue, slot) in self.code.queues.take_ready() {
            let Some(cell) = self.slots.get(slot) else { continue };
            let mut guard = lock(cell);
            let s = &mut *guard;
            if let Some(vm) = s.vm.as_mut()
                && let Err(e) = vm.queue_ready(queue)
            {
                self.failed(s, e);
            }
        }
        let mut next: Option<Duration> = None;
        for cell in &self.slots {
            let mut guard = lock(cell);
            let s = &mut *guard;
            let Some(vm) = s.vm.as_mut() else { continue };
            let period = vm.tick_period();
            if period.is_zero() {
                s.next_tick = None;
                continue;
            }
            let due = *s.next_tick.get_or_insert(now + period);
            let wait = if due <= now {
                let ticked = vm.tick();
                s.next_tick = Some(now + period);
                if let Err(e) = ticked {
                    self.failed(s, e);
                    continue;
                }
                period
            } else {
                due - now
            };
            next = Some(next.map_or(wait, |n| n.min(wait)));
        }
        next
    }

    fn slot_of(&self, flow: u64) -> usize {
        (flow % self.slots.len() as u64) as usize
    }

    fn decision(&self, allow: bool, reason: ReasonCode) -> Decision {
        Decision::by_filter(self.name(), allow, reason, Enforcement::Enforced)
    }

    /// Judges one thing in a single stream (a DNS query): creates a stream
    /// context with `properties`, calls `on_new_connection`, reads what the
    /// plugin said, and ends the stream. `None`: no opinion.
    pub fn judge(&self, properties: HashMap<String, Vec<u8>>) -> Option<Decision> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let slot = self.slot_of(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let ran = self.with_vm(slot, |vm, _| {
            let id = vm.new_stream(properties)?;
            let answer = vm.on_new_connection(id)?;
            let said = vm.stream(id).map(|s| said(&s.properties)).unwrap_or_default();
            vm.finish(id)?;
            Ok((answer, said))
        });
        match ran {
            Ok((answer, said)) if answer.requests.close.is_some() || said.verdict == Some(false) => {
                Some(self.decision(false, ReasonCode::PluginDenied))
            }
            Ok((_, said)) if said.verdict == Some(true) => Some(self.decision(true, ReasonCode::PluginAllowed)),
            Ok(_) => None,
            Err(_) => match self.failure {
                FailurePolicy::Closed => Some(self.decision(false, ReasonCode::PluginFailed)),
                FailurePolicy::Open => None,
            },
        }
    }
}

/// Ticks `plugin`'s instances (`on_tick`) on a thread of its own until the
/// plugin is dropped. Idle plugins (no tick period) are looked at every
/// 100 ms, since an instance may set its period in any callback.
pub fn spawn_ticker(plugin: &Arc<Plugin>) {
    let weak = Arc::downgrade(plugin);
    let name = format!("sluice-tick-{}", plugin.name());
    let spawned = std::thread::Builder::new().name(name).spawn(move || {
        while let Some(plugin) = weak.upgrade() {
            let wait = plugin.tick_due(Instant::now());
            drop(plugin);
            // An enqueue unparks the thread early.
            std::thread::park_timeout(wait.unwrap_or(IDLE_TICK_CHECK).min(IDLE_TICK_CHECK));
        }
    });
    match spawned {
        Ok(handle) => {
            *plugin.code.queues.waker.lock().unwrap_or_else(PoisonError::into_inner) = Some(handle.thread().clone());
        }
        Err(e) => {
            tracing::error!(plugin = %plugin.name(), error = %e, "cannot start the plugin's tick thread; on_tick and on_queue_ready will not be called");
        }
    }
}

/// How often a plugin's instances are checked for a tick period.
const IDLE_TICK_CHECK: Duration = Duration::from_millis(100);

fn lock(m: &Mutex<Slot>) -> MutexGuard<'_, Slot> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The filter that runs a plugin in a chain.
#[derive(Debug, Clone)]
pub struct WasmFilter {
    pub plugin: Arc<Plugin>,
}

impl WasmFilter {
    fn decision(&self, allow: bool, reason: ReasonCode) -> Decision {
        self.plugin.decision(allow, reason)
    }

    /// What a failure means for the flow, by the plugin's policy.
    fn failure(&self) -> FilterStatus {
        match self.plugin.failure {
            FailurePolicy::Closed => FilterStatus::Deny(self.decision(false, ReasonCode::PluginFailed)),
            FailurePolicy::Open => FilterStatus::Continue,
        }
    }
}

impl NetworkFilter for WasmFilter {
    fn name(&self) -> &str {
        self.plugin.name()
    }

    fn on_classified(&self, ctx: &mut FlowContext, index: usize) -> FilterStatus {
        if self.plugin.http {
            // Judged per request, in `on_http_request`.
            return FilterStatus::Continue;
        }
        let slot = self.plugin.slot_of(ctx.id);
        let properties = flow_properties(ctx);
        let ran = self.plugin.with_vm(slot, |vm, generation| {
            let id = vm.new_stream(properties)?;
            let answer = vm.on_new_connection(id)?;
            let said = vm.stream(id).map(|s| said(&s.properties)).unwrap_or_default();
            Ok((Stream { slot, generation, id }, answer, said))
        });
        let (stream, answer, said) = match ran {
            Ok(r) => r,
            Err(_) => return self.failure(),
        };
        *ctx.filter_state(index, || None::<Stream>) = Some(stream);
        for (k, v) in said.annotations {
            ctx.annotate(k, v);
        }
        if answer.requests.close.is_some() || said.verdict == Some(false) {
            return FilterStatus::Deny(self.decision(false, ReasonCode::PluginDenied));
        }
        if answer.action == Action::Pause {
            tracing::error!(plugin = %self.plugin.name(), "the plugin paused a new connection; a paused connection is not resumed yet, so it gets the failure policy");
            return self.failure();
        }
        match said.verdict {
            Some(true) => FilterStatus::Allow(self.decision(true, ReasonCode::PluginAllowed)),
            _ => FilterStatus::Continue,
        }
    }

    fn wants_data(&self) -> bool {
        self.plugin.data && !self.plugin.http
    }

    fn wants_http(&self) -> bool {
        self.plugin.http
    }

    /// An HTTP context for the request: its headers (pseudo-headers first)
    /// through `on_request_headers`, then `on_done`, `on_log`,
    /// `on_delete`. A local reply, a closed stream or `sluice.verdict`
    /// `deny` deny the request; header changes go upstream.
    fn on_http_request(&self, ctx: &mut FlowContext, _index: usize, head: &mut HttpRequestHead) -> HttpStatus {
        let slot = self.plugin.slot_of(ctx.id);
        let properties = flow_properties(ctx);
        let headers: Vec<(Vec<u8>, Vec<u8>)> = head
            .headers
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.clone()))
            .collect();
        let end_of_stream = !head.has_body;
        let ran = self.plugin.with_vm(slot, |vm, _| {
            let id = vm.new_stream(properties)?;
            let (answer, headers) = vm.on_request_headers(id, headers, end_of_stream)?;
            let state = vm.finish_http(id)?;
            Ok((answer, headers, said(&state.properties)))
        });
        let (answer, headers, said) = match ran {
            Ok(r) => r,
            Err(_) => {
                return match self.plugin.failure {
                    FailurePolicy::Closed => HttpStatus::Reply(
                        failure_reply(self.name()),
                        self.decision(false, ReasonCode::PluginFailed),
                    ),
                    FailurePolicy::Open => HttpStatus::Continue,
                };
            }
        };
        for (k, v) in said.annotations {
            ctx.annotate(k, v);
        }
        if let Some(reply) = answer.requests.local_reply {
            return HttpStatus::Reply(reply, self.decision(false, ReasonCode::PluginDenied));
        }
        if answer.requests.close.is_some() || said.verdict == Some(false) {
            return HttpStatus::Reply(
                denied_reply(self.name()),
                self.decision(false, ReasonCode::PluginDenied),
            );
        }
        if answer.action == Action::Pause {
            tracing::error!(plugin = %self.plugin.name(), "the plugin paused a request; a paused request is not resumed yet, so it gets the failure policy");
            return match self.plugin.failure {
                FailurePolicy::Closed => HttpStatus::Reply(
                    failure_reply(self.name()),
                    self.decision(false, ReasonCode::PluginFailed),
                ),
                FailurePolicy::Open => HttpStatus::Continue,
            };
        }
        head.headers = headers
            .into_iter()
            .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v))
            .collect();
        HttpStatus::Continue
    }

    fn on_downstream_data(&self, _ctx: &FlowContext, extras: &mut FlowExtras, index: usize, data: &[u8]) -> DataStatus {
        self.data(extras, index, true, data)
    }

    fn on_upstream_data(&self, _ctx: &FlowContext, extras: &mut FlowExtras, index: usize, data: &[u8]) -> DataStatus {
        self.data(extras, index, false, data)
    }

    fn on_close(&self, ctx: &FlowContext, record: &mut FlowRecord) {
        let Some(Some(stream)) = ctx
            .extras
            .as_ref()
            .and_then(|x| x.state.get::<Option<Stream>>(filter_index(ctx, self)))
            .copied()
        else {
            return;
        };
        let finished = self.plugin.with_vm(stream.slot, |vm, generation| {
            if generation != stream.generation {
                return Ok(None);
            }
            vm.finish(stream.id).map(Some)
        });
        if let Ok(Some(state)) = finished {
            for (k, v) in said(&state.properties).annotations {
                record.annotations.insert(k, v);
            }
        }
    }
}

impl WasmFilter {
    fn data(&self, extras: &mut FlowExtras, index: usize, downstream: bool, data: &[u8]) -> DataStatus {
        let Some(Some(stream)) = extras.state.get::<Option<Stream>>(index).copied() else {
            return DataStatus::Continue;
        };
        let ran = self.plugin.with_vm(stream.slot, |vm, generation| {
            if generation != stream.generation {
                return Err(VmError::Gone("the instance serving this flow"));
            }
            let answer = vm.on_data(stream.id, downstream, data, false)?;
            let said = vm.stream(stream.id).map(|s| said(&s.properties)).unwrap_or_default();
            Ok((answer, said))
        });
        let (answer, said) = match ran {
            Ok(r) => r,
            Err(_) => {
                return match self.plugin.failure {
                    FailurePolicy::Closed => DataStatus::Close(self.decision(false, ReasonCode::PluginFailed)),
                    FailurePolicy::Open => DataStatus::Continue,
                };
            }
        };
        for (k, v) in said.annotations {
            extras.annotate(k, v);
        }
        if answer.requests.rewrote {
            tracing::error!(plugin = %self.plugin.name(), "the plugin changed a flow's bytes; the relay passes bytes unchanged, so the flow is closed");
            return DataStatus::Close(self.decision(false, ReasonCode::PluginFailed));
        }
        if answer.requests.close.is_some() || said.verdict == Some(false) {
            return DataStatus::Close(self.decision(false, ReasonCode::PluginDenied));
        }
        DataStatus::Continue
    }
}

/// The answer to a request a plugin denied without answering it itself.
fn denied_reply(plugin: &str) -> LocalReply {
    LocalReply {
        status: 403,
        headers: vec![
            ("x-sluice-rule".to_owned(), plugin.as_bytes().to_vec()),
            ("x-sluice-reason".to_owned(), b"plugin-denied".to_vec()),
        ],
        body: format!("Sluice refused this request.\nrule: {plugin}\nreason: plugin-denied\n").into_bytes(),
    }
}

/// The answer to a request whose plugin failed (fail closed).
fn failure_reply(plugin: &str) -> LocalReply {
    LocalReply {
        status: 403,
        headers: vec![
            ("x-sluice-rule".to_owned(), plugin.as_bytes().to_vec()),
            ("x-sluice-reason".to_owned(), b"plugin-failed".to_vec()),
        ],
        body: format!("Sluice refused this request.\nrule: {plugin}\nreason: plugin-failed\n").into_bytes(),
    }
}

/// This filter's position in the flow's chain (its per-flow state is kept
/// under it).
fn filter_index(ctx: &FlowContext, me: &WasmFilter) -> usize {
    ctx.chain
        .as_ref()
        .and_then(|c| {
            c.filters
                .iter()
                .position(|f| std::ptr::addr_eq(Arc::as_ptr(f), std::ptr::from_ref(me)))
        })
        .unwrap_or(usize::MAX)
}

/// What the plugin said through properties.
#[derive(Debug, Default)]
struct Said {
    /// `sluice.verdict`: `Some(true)` allow, `Some(false)` deny.
    verdict: Option<bool>,
    annotations: Vec<(String, String)>,
}

fn said(properties: &HashMap<String, Vec<u8>>) -> Said {
    let verdict = properties.get("sluice.verdict").and_then(|v| match v.as_slice() {
        b"allow" => Some(true),
        b"deny" => Some(false),
        _ => None,
    });
    let mut annotations: Vec<(String, String)> = properties
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("sluice.annotation.")
                .map(|k| (k.to_owned(), String::from_utf8_lossy(v).into_owned()))
        })
        .collect();
    annotations.sort();
    Said { verdict, annotations }
}

/// The properties a DNS query shows a plugin: `source.address` (the
/// client's address, no port), `sluice.listener`, `sluice.protocol`
/// (`dns`), `sluice.host` and `dns.query.name` (the canonical name),
/// `dns.query.type` (int), the groups, and the decision so far.
#[allow(clippy::too_many_arguments, reason = "the parts of a query a plugin sees")]
pub fn query_properties(
    listener: &str,
    src: IpAddr,
    qname: &sluice_api::DomainName,
    qtype: u16,
    smartgroups: &[&str],
    webgroups: &[&str],
    decision: &Decision,
) -> HashMap<String, Vec<u8>> {
    let mut p = HashMap::new();
    p.insert("source.address".to_owned(), string(src.to_string()));
    p.insert("sluice.listener".to_owned(), string(listener));
    p.insert("sluice.protocol".to_owned(), string("dns"));
    p.insert("sluice.host".to_owned(), string(qname.as_str()));
    p.insert("dns.query.name".to_owned(), string(qname.as_str()));
    p.insert("dns.query.type".to_owned(), int(i64::from(qtype)));
    p.insert("sluice.source.smartgroups".to_owned(), string(smartgroups.join(",")));
    p.insert("sluice.destination.webgroups".to_owned(), string(webgroups.join(",")));
    insert_decision(&mut p, decision);
    p
}

fn insert_decision(p: &mut HashMap<String, Vec<u8>>, d: &Decision) {
    p.insert(
        "sluice.verdict.action".to_owned(),
        string(if d.allow { "allow" } else { "deny" }),
    );
    p.insert("sluice.verdict.rule".to_owned(), string(d.rule.as_str()));
    p.insert("sluice.verdict.reason".to_owned(), string(d.reason.as_str()));
}

/// The properties a flow shows a plugin (see `properties`).
fn flow_properties(ctx: &FlowContext) -> HashMap<String, Vec<u8>> {
    let mut p = HashMap::new();
    p.insert("source.address".to_owned(), string(ctx.src.to_string()));
    p.insert("source.port".to_owned(), int(i64::from(ctx.src.port())));
    let dst = ctx
        .original_dst
        .or_else(|| ctx.dst_ip.map(|ip: IpAddr| std::net::SocketAddr::new(ip, ctx.port)));
    if let Some(dst) = dst {
        p.insert("destination.address".to_owned(), string(dst.to_string()));
    }
    p.insert("destination.port".to_owned(), int(i64::from(ctx.port)));
    p.insert("connection.id".to_owned(), uint(ctx.id));
    if let Some(sni) = &ctx.sni {
        p.insert("connection.requested_server_name".to_owned(), string(sni));
    }
    p.insert("sluice.listener".to_owned(), string(&**ctx.listener()));
    p.insert("sluice.protocol".to_owned(), string(ctx.protocol.to_string()));
    let policy = &ctx.snapshot.policy;
    let mut groups = policy.smartgroups_of(ctx.src.ip().to_canonical());
    if let Some(id) = ctx.identity {
        groups.push(policy.smartgroup_name(id));
    }
    p.insert("sluice.source.smartgroups".to_owned(), string(groups.join(",")));
    if let Some(name) = &ctx.name {
        p.insert("sluice.host".to_owned(), string(name.as_str()));
        p.insert(
            "sluice.destination.webgroups".to_owned(),
            string(policy.webgroups_of(name).join(",")),
        );
    }
    if let Some(t) = &ctx.connect_target {
        p.insert("sluice.connect_target".to_owned(), string(t));
    }
    if !ctx.alpn.is_empty() {
        p.insert("sluice.alpn".to_owned(), string(ctx.alpn.join(",")));
    }
    if let Some(d) = &ctx.decision {
        insert_decision(&mut p, d);
    }
    p
}
