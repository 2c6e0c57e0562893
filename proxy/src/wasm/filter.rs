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
use super::properties::{FlowFacts, int, string};
use super::state::{Callout, CalloutResponse, HttpParts, Requests};
use super::vm::{Answer, HttpEvent, PluginCode, Vm, VmError};
use crate::listener::{
    DataStatus, Decision, FilterStatus, FlowContext, FlowExtras, HttpExchange, HttpFields, HttpPending, HttpStatus,
    LocalReply, NetworkFilter,
};
use crate::policy::Enforcement;
use crate::telemetry::audit::FlowRecord;

/// How long a slot whose instance failed waits before starting another.
pub const RESTART_BACKOFF: Duration = Duration::from_secs(1);

/// What a failed plugin means for the flows it was to judge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailurePolicy {
    /// Deny them (`plugin-failed`), and every later flow too, with no new
    /// instance until the configuration replaces the plugin: the default.
    Closed,
    /// Let the rest of the chain decide, as if the plugin were not there,
    /// for every later flow too, until the configuration replaces it.
    Open,
    /// Deny them, and start a new instance for later flows (at most once
    /// per [`RESTART_BACKOFF`] per slot).
    Reload,
}

impl FailurePolicy {
    /// Whether a flow the plugin cannot judge goes on.
    fn lets_through(self) -> bool {
        self == FailurePolicy::Open
    }
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
    /// The largest HTTP body the plugin is shown whole (0: none).
    pub max_body: usize,
    /// Where the plugin's calls out run (the runtime it was loaded on).
    runtime: Option<tokio::runtime::Handle>,
    /// Set when an instance failed and the policy is not `reload`: the
    /// plugin judges nothing more (every flow gets the failure policy)
    /// until the configuration replaces it.
    broken: std::sync::atomic::AtomicBool,
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
            max_body: DEFAULT_MAX_BODY,
            runtime: tokio::runtime::Handle::try_current().ok(),
            broken: std::sync::atomic::AtomicBool::new(false),
            slots,
        })
    }

    /// Makes the calls out a callback asked for; each answer goes to the
    /// instance that asked (if it still serves), and what that callback
    /// asks in turn is carried out the same way.
    pub fn dispatch(self: &Arc<Self>, slot: usize, generation: u64, calls: Vec<Callout>) {
        if calls.is_empty() {
            return;
        }
        let Some(rt) = self
            .runtime
            .clone()
            .or_else(|| tokio::runtime::Handle::try_current().ok())
        else {
            tracing::error!(plugin = %self.name(), "no runtime to make the plugin's calls out on; they fail");
            for call in calls {
                self.answer_call(slot, generation, call.token, None);
            }
            return;
        };
        for call in calls {
            let plugin = self.clone();
            rt.spawn(async move {
                let answer = match super::callout::perform(&call).await {
                    Ok(r) => Some(r),
                    Err(e) => {
                        tracing::warn!(plugin = %plugin.name(), upstream = %call.upstream, error = %e, "a plugin's call out failed");
                        None
                    }
                };
                plugin.answer_call(slot, generation, call.token, answer);
            });
        }
    }

    fn answer_call(self: &Arc<Self>, slot: usize, generation: u64, token: u32, answer: Option<CalloutResponse>) {
        let ran = self.with_vm(slot, |vm, now| {
            if now != generation {
                // The instance that asked is gone, and its contexts with it.
                return Ok(Vec::new());
            }
            let a = vm.on_http_call_response(token, answer)?;
            vm.settle(&a.requests);
            Ok(a.requests.calls)
        });
        if let Ok(calls) = ran {
            self.dispatch(slot, generation, calls);
        }
    }

    /// Carries out what a root-context callback asked (`on_tick`,
    /// `on_queue_ready`) of a paused context it switched to; returns the
    /// calls out it asked for.
    fn after_root(vm: &mut Vm, requests: Requests) -> Vec<Callout> {
        vm.settle(&requests);
        requests.calls
    }

    pub fn name(&self) -> &str {
        &self.code.name
    }

    /// Whether an instance failed and the plugin judges nothing more.
    pub fn is_broken(&self) -> bool {
        self.broken.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs `f` on the instance of the slot for `flow`, starting one if the
    /// slot has none (and has not failed within [`RESTART_BACKOFF`]). A
    /// failure drops the instance.
    fn with_vm<R>(&self, slot: usize, f: impl FnOnce(&mut Vm, u64) -> Result<R, VmError>) -> Result<R, VmError> {
        if self.broken.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(VmError::Gone("the plugin (an instance of it failed)"));
        }
        let Some(cell) = self.slots.get(slot) else {
            return Err(VmError::Gone("the plugin slot"));
        };
        let mut s = lock(cell);
        if s.vm.is_none() {
            // Only `reload` starts an instance again after a failure (and
            // not within the backoff, so a crash loop cannot spin).
            if let (Some(at), Some(e)) = (s.failed_at, &s.last_error)
                && (self.failure != FailurePolicy::Reload || at.elapsed() < RESTART_BACKOFF)
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
            // Contexts the guest has finished since (`proxy_done`) end now.
            Ok(r) => match vm.finish_deferred(Instant::now()) {
                Ok(()) => Ok(r),
                Err(e) => {
                    self.failed(&mut s, e);
                    Ok(r)
                }
            },
            Err(e) => Err(self.failed(&mut s, e)),
        }
    }

    fn failed(&self, s: &mut Slot, e: VmError) -> VmError {
        let next = match self.failure {
            FailurePolicy::Reload => "a new one starts for later flows",
            FailurePolicy::Closed => "later flows it would judge are denied until the configuration replaces it",
            FailurePolicy::Open => "later flows go on without it until the configuration replaces it",
        };
        tracing::error!(plugin = %self.code.name, error = %e, "plugin failed; its instance is dropped, and {next}");
        metrics::counter!("sluice_plugin_failures_total", "plugin" => self.code.name.to_string()).increment(1);
        s.vm = None;
        s.next_tick = None;
        if self.failure != FailurePolicy::Reload {
            self.broken.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        s.failed_at = Some(Instant::now());
        s.last_error = Some(e.clone());
        e
    }

    /// Calls `on_tick` on every instance whose tick period has passed;
    /// returns how long until the next one is due (`None`: no instance
    /// asked to be ticked).
    pub fn tick_due(self: &Arc<Self>, now: Instant) -> Option<Duration> {
        let mut calls = Vec::new();
        for (queue, slot) in self.code.queues.take_ready() {
            let Some(cell) = self.slots.get(slot) else { continue };
            let mut guard = lock(cell);
            let s = &mut *guard;
            if let Some(vm) = s.vm.as_mut() {
                match vm.queue_ready(queue) {
                    Ok(r) => calls.push((slot, s.generation, Self::after_root(vm, r))),
                    Err(e) => {
                        self.failed(s, e);
                    }
                }
            }
        }
        let mut next: Option<Duration> = None;
        for (slot, cell) in self.slots.iter().enumerate() {
            let mut guard = lock(cell);
            let s = &mut *guard;
            let Some(vm) = s.vm.as_mut() else { continue };
            // Contexts that waited past `on_done` end once the guest says
            // so, or when their wait is over.
            if let Err(e) = vm.finish_deferred(now) {
                self.failed(s, e);
                continue;
            }
            let Some(vm) = s.vm.as_mut() else { continue };
            let period = vm.tick_period();
            if period.is_zero() {
                s.next_tick = None;
                continue;
            }
            let due = *s.next_tick.get_or_insert(now + period);
            let wait = if due <= now {
                let ticked = vm.tick().and_then(|r| vm.finish_deferred(now).map(|()| r));
                s.next_tick = Some(now + period);
                match ticked {
                    Ok(r) => calls.push((slot, s.generation, Self::after_root(vm, r))),
                    Err(e) => {
                        self.failed(s, e);
                        continue;
                    }
                }
                period
            } else {
                due - now
            };
            next = Some(next.map_or(wait, |n| n.min(wait)));
        }
        // Outside the slots' locks: an answer takes the lock again.
        for (slot, generation, c) in calls {
            self.dispatch(slot, generation, c);
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
        let with_notes = |mut d: Decision, notes: Vec<(String, String)>| {
            if !notes.is_empty() {
                d.notes = Some(Box::new(notes));
            }
            d
        };
        match ran {
            Ok((answer, said)) if answer.requests.close.is_some() || said.verdict == Some(false) => Some(with_notes(
                self.decision(false, ReasonCode::PluginDenied),
                said.annotations,
            )),
            Ok((_, said)) if said.verdict == Some(true) => Some(with_notes(
                self.decision(true, ReasonCode::PluginAllowed),
                said.annotations,
            )),
            Ok(_) => None,
            Err(_) if self.failure.lets_through() => None,
            Err(_) => Some(self.decision(false, ReasonCode::PluginFailed)),
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
        if self.plugin.failure.lets_through() {
            FilterStatus::Continue
        } else {
            FilterStatus::Deny(self.decision(false, ReasonCode::PluginFailed))
        }
    }

    /// A fail-closed plugin's failure, in an HTTP exchange.
    fn failed_reply(&self) -> HttpStatus {
        HttpStatus::Reply(
            failure_reply(self.name()),
            self.decision(false, ReasonCode::PluginFailed),
        )
    }

    /// What a resumed stream's properties say of it now.
    fn verdict_of(&self, stream: Stream) -> FilterStatus {
        let said = self.plugin.with_vm(stream.slot, |vm, generation| {
            if generation != stream.generation {
                return Err(VmError::Gone("the instance serving this flow"));
            }
            Ok(vm.stream(stream.id).map(|s| said(&s.properties)).unwrap_or_default())
        });
        match said {
            Ok(s) if s.verdict == Some(false) => FilterStatus::Deny(self.decision(false, ReasonCode::PluginDenied)),
            Ok(s) if s.verdict == Some(true) => FilterStatus::Allow(self.decision(true, ReasonCode::PluginAllowed)),
            Ok(_) => FilterStatus::Continue,
            Err(_) => self.failure(),
        }
    }
}

/// How long a paused flow or exchange waits to be resumed before it gets
/// the plugin's failure policy (a call out is bounded by
/// `callout::MAX_CALL_TIME`, so this leaves the answer time to arrive).
pub const MAX_PAUSE: Duration = Duration::from_secs(65);

/// The largest HTTP body shown whole to a plugin, unless its declaration
/// says otherwise (`max_body`).
pub const DEFAULT_MAX_BODY: usize = 1 << 20;

/// Whether a callback left its context paused: it answered `Pause` and
/// neither resumed, ended nor answered it.
fn pauses(answer: &Answer, id: u32, said: &Said) -> bool {
    answer.action == Action::Pause
        && !answer.requests.settles(id)
        && answer.requests.close.is_none()
        && answer.requests.local_reply.is_none()
        && said.verdict != Some(false)
}

/// A plugin's HTTP context for one exchange. Each part of the exchange is
/// put in the context, the part's callback runs, and the part goes on as
/// the guest left it. A callback that pauses (to wait for a call out)
/// holds the exchange until the guest resumes it (`proxy_continue_stream`),
/// answers it or closes it, from any later callback. The context ends
/// (`on_done`, `on_log`, `on_delete`) when the exchange is over.
#[derive(Debug)]
pub struct WasmExchange {
    filter: WasmFilter,
    stream: Stream,
    max_body: usize,
    /// The instance failed and the plugin fails open: the rest of the
    /// exchange goes on without it.
    failed: bool,
    finished: bool,
}

/// A part of an exchange on its way through a callback.
enum Part<'a> {
    Fields(&'a mut HttpFields),
    Body(&'a mut Vec<u8>),
}

impl WasmExchange {
    /// Runs `event`'s callback on `part`.
    async fn run(&mut self, event: HttpEvent, end_of_stream: bool, mut part: Part<'_>) -> HttpStatus {
        if self.failed || self.finished {
            return HttpStatus::Continue;
        }
        let stream = self.stream;
        // A copy for the context (properties read it in later callbacks);
        // the caller keeps its own, and takes the guest's back only when
        // the guest changed it.
        let given = match &part {
            Part::Fields(f) => Given::Fields((*f).clone()),
            Part::Body(b) => Given::Body((*b).clone()),
        };
        // A body callback paused before the end of the stream buffers (as
        // Envoy reads it): the piece is held and shown again with the next.
        let buffers = matches!(part, Part::Body(_)) && !end_of_stream;
        let ran = self.filter.plugin.with_vm(stream.slot, |vm, generation| {
            if generation != stream.generation {
                return Err(VmError::Gone("the instance serving this request"));
            }
            let Some(parts) = vm.http_parts(stream.id) else {
                return Err(VmError::Gone("the request's context"));
            };
            given.put(parts, event);
            let answer = vm.on_http(stream.id, event, end_of_stream)?;
            let said = vm.stream(stream.id).map(|s| said(&s.properties)).unwrap_or_default();
            let paused = (!buffers && pauses(&answer, stream.id, &said)).then(|| {
                let (tx, rx) = tokio::sync::oneshot::channel();
                vm.wait_for(stream.id, tx);
                rx
            });
            let back = if paused.is_some() {
                None
            } else {
                vm.http_parts(stream.id).and_then(|p| Given::changed(p, event))
            };
            Ok((answer, said, paused, back))
        });
        let (answer, told, paused, back) = match ran {
            Ok(r) => r,
            Err(_) => return self.fail(),
        };
        let plugin = &self.filter.plugin;
        plugin.dispatch(stream.slot, stream.generation, answer.requests.calls.clone());
        if let Some(reply) = answer.requests.local_reply {
            return HttpStatus::Reply(reply, self.filter.decision(false, ReasonCode::PluginDenied));
        }
        if answer.requests.close.is_some() || told.verdict == Some(false) {
            return self.denied();
        }
        let back = if let Some(rx) = paused {
            match tokio::time::timeout(MAX_PAUSE, rx).await {
                Ok(Ok(r)) if r.local_reply.is_some() => {
                    let reply = r.local_reply.unwrap_or_else(|| denied_reply(self.filter.name()));
                    return HttpStatus::Reply(reply, self.filter.decision(false, ReasonCode::PluginDenied));
                }
                Ok(Ok(r)) if r.close.is_some() => return self.denied(),
                Ok(Ok(_)) => {
                    let taken = plugin.with_vm(stream.slot, |vm, generation| {
                        if generation != stream.generation {
                            return Err(VmError::Gone("the instance serving this request"));
                        }
                        let told = vm.stream(stream.id).map(|s| said(&s.properties)).unwrap_or_default();
                        Ok((told, vm.http_parts(stream.id).and_then(|p| Given::changed(p, event))))
                    });
                    match taken {
                        Ok((said, _)) if said.verdict == Some(false) => return self.denied(),
                        Ok((_, back)) => back,
                        Err(_) => return self.fail(),
                    }
                }
                Ok(Err(_)) => return self.fail(),
                Err(_) => {
                    tracing::error!(plugin = %plugin.name(), "the plugin paused a request and did not resume it within {MAX_PAUSE:?}");
                    return self.fail();
                }
            }
        } else {
            back
        };
        let held = buffers && answer.action == Action::Pause;
        match (back, &mut part) {
            (Some(Given::Fields(f)), Part::Fields(out)) => {
                **out = f;
                HttpStatus::Changed
            }
            (Some(Given::Body(b)), Part::Body(out)) => {
                **out = b;
                if held { HttpStatus::Buffer } else { HttpStatus::Changed }
            }
            _ if held => HttpStatus::Buffer,
            _ => HttpStatus::Continue,
        }
    }

    fn denied(&self) -> HttpStatus {
        HttpStatus::Reply(
            denied_reply(self.filter.name()),
            self.filter.decision(false, ReasonCode::PluginDenied),
        )
    }

    /// The instance failed: the plugin's failure policy.
    fn fail(&mut self) -> HttpStatus {
        self.failed = true;
        if self.filter.plugin.failure.lets_through() {
            HttpStatus::Continue
        } else {
            self.filter.failed_reply()
        }
    }
}

/// A part as handed to the guest.
enum Given {
    Fields(super::state::Headers),
    Body(Vec<u8>),
}

impl Given {
    fn put(self, parts: &mut HttpParts, event: HttpEvent) {
        parts.changed = false;
        match (self, event) {
            (Given::Fields(f), HttpEvent::RequestHeaders) => parts.request_headers = Some(f),
            (Given::Fields(f), HttpEvent::RequestTrailers) => parts.request_trailers = Some(f),
            (Given::Fields(f), HttpEvent::ResponseHeaders) => parts.response_headers = Some(f),
            (Given::Fields(f), HttpEvent::ResponseTrailers) => parts.response_trailers = Some(f),
            (Given::Body(b), HttpEvent::RequestBody) => parts.request_body = Some(b),
            (Given::Body(b), HttpEvent::ResponseBody) => parts.response_body = Some(b),
            _ => {}
        }
    }

    /// The part as the guest left it, when the guest changed it.
    fn changed(parts: &mut HttpParts, event: HttpEvent) -> Option<Given> {
        std::mem::take(&mut parts.changed).then(|| Given::take(parts, event))
    }

    /// The part as the guest left it (kept readable in the context).
    fn take(parts: &mut HttpParts, event: HttpEvent) -> Given {
        match event {
            HttpEvent::RequestHeaders => Given::Fields(parts.request_headers.clone().unwrap_or_default()),
            HttpEvent::RequestTrailers => Given::Fields(parts.request_trailers.clone().unwrap_or_default()),
            HttpEvent::ResponseHeaders => Given::Fields(parts.response_headers.clone().unwrap_or_default()),
            HttpEvent::ResponseTrailers => Given::Fields(parts.response_trailers.clone().unwrap_or_default()),
            HttpEvent::RequestBody => Given::Body(parts.request_body.clone().unwrap_or_default()),
            HttpEvent::ResponseBody => Given::Body(parts.response_body.clone().unwrap_or_default()),
        }
    }
}

impl HttpExchange for WasmExchange {
    fn max_body(&self) -> usize {
        self.max_body
    }

    fn request_headers<'a>(&'a mut self, fields: &'a mut HttpFields, end_of_stream: bool) -> HttpPending<'a> {
        Box::pin(self.run(HttpEvent::RequestHeaders, end_of_stream, Part::Fields(fields)))
    }

    fn request_body<'a>(&'a mut self, body: &'a mut Vec<u8>, end_of_stream: bool) -> HttpPending<'a> {
        Box::pin(self.run(HttpEvent::RequestBody, end_of_stream, Part::Body(body)))
    }

    fn request_trailers<'a>(&'a mut self, fields: &'a mut HttpFields) -> HttpPending<'a> {
        Box::pin(self.run(HttpEvent::RequestTrailers, true, Part::Fields(fields)))
    }

    fn response_headers<'a>(&'a mut self, fields: &'a mut HttpFields, end_of_stream: bool) -> HttpPending<'a> {
        Box::pin(self.run(HttpEvent::ResponseHeaders, end_of_stream, Part::Fields(fields)))
    }

    fn response_body<'a>(&'a mut self, body: &'a mut Vec<u8>, end_of_stream: bool) -> HttpPending<'a> {
        Box::pin(self.run(HttpEvent::ResponseBody, end_of_stream, Part::Body(body)))
    }

    fn response_trailers<'a>(&'a mut self, fields: &'a mut HttpFields) -> HttpPending<'a> {
        Box::pin(self.run(HttpEvent::ResponseTrailers, true, Part::Fields(fields)))
    }

    fn finish(&mut self) -> Vec<(String, String)> {
        if std::mem::replace(&mut self.finished, true) {
            return Vec::new();
        }
        let stream = self.stream;
        let ended = self.filter.plugin.with_vm(stream.slot, |vm, generation| {
            if generation != stream.generation {
                return Ok(None);
            }
            vm.finish_http(stream.id).map(Some)
        });
        match ended {
            Ok(Some(state)) => said(&state.properties).annotations,
            _ => Vec::new(),
        }
    }
}

impl Drop for WasmExchange {
    /// An exchange cut short (the client went away) still ends its context.
    fn drop(&mut self) {
        self.finish();
    }
}

impl NetworkFilter for WasmFilter {
    fn name(&self) -> &str {
        self.plugin.name()
    }

    fn on_classified(&self, ctx: &mut FlowContext, index: usize) -> FilterStatus {
        if self.plugin.http {
            // Judged per request, in its HTTP exchange.
            return FilterStatus::Continue;
        }
        let slot = self.plugin.slot_of(ctx.id);
        let facts = FlowFacts::of(ctx);
        let ran = self.plugin.with_vm(slot, |vm, generation| {
            let id = vm.new_flow_stream(facts)?;
            let answer = vm.on_new_connection(id)?;
            let said = vm.stream(id).map(|s| said(&s.properties)).unwrap_or_default();
            // Only a flow that waits pays for the channel.
            let paused = pauses(&answer, id, &said).then(|| {
                let (tx, rx) = tokio::sync::oneshot::channel();
                vm.wait_for(id, tx);
                rx
            });
            Ok((Stream { slot, generation, id }, answer, said, paused))
        });
        let (stream, answer, said, paused) = match ran {
            Ok(r) => r,
            Err(_) => return self.failure(),
        };
        *ctx.filter_state(index, || None::<Stream>) = Some(stream);
        self.plugin
            .dispatch(stream.slot, stream.generation, answer.requests.calls.clone());
        for (k, v) in said.annotations {
            ctx.annotate(k, v);
        }
        if let Some(rx) = paused {
            // Resumed (or ended) by a later callback: the answer to a call
            // out, a tick, a queue.
            let this = self.clone();
            return FilterStatus::Pause(Box::pin(async move {
                match tokio::time::timeout(MAX_PAUSE, rx).await {
                    Ok(Ok(r)) if r.close.is_some() || r.local_reply.is_some() => {
                        FilterStatus::Deny(this.decision(false, ReasonCode::PluginDenied))
                    }
                    Ok(Ok(_)) => this.verdict_of(stream),
                    _ => this.failure(),
                }
            }));
        }
        if answer.requests.close.is_some() || said.verdict == Some(false) {
            return FilterStatus::Deny(self.decision(false, ReasonCode::PluginDenied));
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

    /// An HTTP context for the exchange (see [`WasmExchange`]).
    fn http_exchange(&self, ctx: &FlowContext, _index: usize) -> Result<Option<Box<dyn HttpExchange>>, HttpStatus> {
        let slot = self.plugin.slot_of(ctx.id);
        let facts = FlowFacts::of(ctx);
        let ran = self.plugin.with_vm(slot, |vm, generation| {
            let id = vm.new_flow_stream(facts)?;
            let bodies = vm.reads_bodies();
            vm.http_parts(id);
            Ok((Stream { slot, generation, id }, bodies))
        });
        match ran {
            Ok((stream, bodies)) => Ok(Some(Box::new(WasmExchange {
                filter: self.clone(),
                stream,
                max_body: if bodies { self.plugin.max_body } else { 0 },
                failed: false,
                finished: false,
            }))),
            Err(_) if self.plugin.failure.lets_through() => Ok(None),
            Err(_) => Err(self.failed_reply()),
        }
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
            Err(_) if self.plugin.failure.lets_through() => return DataStatus::Continue,
            Err(_) => return DataStatus::Close(self.decision(false, ReasonCode::PluginFailed)),
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

/// Where a plugin's own write of `sluice.verdict.action` and
/// `sluice.verdict.reason` is kept (see `properties::set`).
pub const WRITTEN_VERDICT: &str = "\0written.sluice.verdict.action";
pub const WRITTEN_REASON: &str = "\0written.sluice.verdict.reason";

/// What the plugin said through properties.
#[derive(Debug, Default)]
struct Said {
    /// `sluice.verdict`: `Some(true)` allow, `Some(false)` deny.
    verdict: Option<bool>,
    annotations: Vec<(String, String)>,
}

fn said(properties: &HashMap<String, Vec<u8>>) -> Said {
    let word = |v: &Vec<u8>| match v.as_slice() {
        b"allow" => Some(true),
        b"deny" => Some(false),
        _ => None,
    };
    // `sluice.verdict.action` counts only once the plugin wrote it (it
    // starts as the decision so far); `sluice.verdict` is its short form.
    let verdict = properties
        .get(WRITTEN_VERDICT)
        .and_then(word)
        .or_else(|| properties.get("sluice.verdict").and_then(word));
    let mut annotations: Vec<(String, String)> = properties
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("sluice.audit.")
                .or_else(|| k.strip_prefix("sluice.annotation."))
                .map(|k| (k.to_owned(), String::from_utf8_lossy(v).into_owned()))
        })
        .collect();
    if verdict.is_some()
        && let Some(why) = properties.get(WRITTEN_REASON)
    {
        annotations.push(("verdict_reason".to_owned(), String::from_utf8_lossy(why).into_owned()));
    }
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
