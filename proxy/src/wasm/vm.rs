//! One plugin instance: its store, its exports, and the proxy-wasm call
//! order. A plugin is linked once (`PluginCode`, shared by all its
//! instances); an instance is started by running the guest's
//! `_initialize`, creating the root context, and calling `on_vm_start`
//! and `on_configure` with the configuration: either returning false, or a
//! trap, refuses the instance.
//!
//! Every callback runs under the plugin's deadline (epoch interruption)
//! and memory cap. A trap, a deadline or the memory cap poisons the
//! instance: the caller drops it and applies the plugin's failure policy.

use std::sync::Arc;

use wasmtime::{Instance, InstancePre, Linker, Store, Trap, TypedFunc, WasmParams, WasmResults};

use super::abi::{AbiVersion, Action, PeerType};
use super::engine::{EPOCH_TICK, PluginModule, WasmEngine};
use super::shared::{PluginMetrics, SharedData, SharedQueues};
use super::state::{
    CallBuffers, CalloutResponse, GuestFault, HostState, HttpParts, MemoryLimiter, Overtime, Phase, PluginLimits,
    Requests, StreamState,
};

/// An HTTP context's callbacks, in the order an exchange reaches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpEvent {
    RequestHeaders,
    RequestBody,
    RequestTrailers,
    ResponseHeaders,
    ResponseBody,
    ResponseTrailers,
}

/// Everything needed to start instances of one plugin.
pub struct PluginCode {
    pub name: Arc<str>,
    /// What the `plugin_root_id` property says (the name unless set).
    pub root_id: Arc<str>,
    pub abi: AbiVersion,
    pre: InstancePre<HostState>,
    engine: WasmEngine,
    pub vm_config: Vec<u8>,
    pub plugin_config: Vec<u8>,
    pub env: Vec<(String, String)>,
    pub limits: PluginLimits,
    pub shared: Arc<SharedData>,
    pub queues: Arc<SharedQueues>,
    pub metrics: Arc<PluginMetrics>,
    /// The upstreams `proxy_http_call` may name.
    pub upstreams: Arc<Vec<super::callout::Upstream>>,
}

impl std::fmt::Debug for PluginCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginCode")
            .field("name", &self.name)
            .field("abi", &self.abi)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// What went wrong running a plugin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmError {
    #[error("cannot link the module: {0}")]
    Link(String),
    #[error("{callback} ran past the plugin's deadline of {deadline_ms} ms")]
    Deadline { callback: &'static str, deadline_ms: u128 },
    #[error("{callback} hit the plugin's memory limit of {max_memory} bytes")]
    MemoryLimit { callback: &'static str, max_memory: usize },
    #[error("{callback} trapped: {detail}")]
    Trap { callback: &'static str, detail: String },
    #[error(
        "the plugin refused to start: {callback} returned false{}",
        said.as_ref().map(|s| format!(" (it logged: {s})")).unwrap_or_default()
    )]
    Refused {
        callback: &'static str,
        /// The last error the plugin logged, which usually says why.
        said: Option<String>,
    },
    #[error("{0} is gone (its instance failed)")]
    Gone(&'static str),
}

impl PluginCode {
    /// Links `module` with the host's functions. Imports the host does not
    /// have (from an SDK's newer ABI) trap if they are ever called.
    #[allow(clippy::too_many_arguments, reason = "the parts of a plugin's declaration")]
    pub fn link(
        engine: &WasmEngine,
        name: &str,
        module: &PluginModule,
        plugin_config: Vec<u8>,
        env: Vec<(String, String)>,
        limits: PluginLimits,
        shared: Arc<SharedData>,
        queues: Arc<SharedQueues>,
        metrics: Arc<PluginMetrics>,
    ) -> Result<Self, VmError> {
        let link = |e: wasmtime::Error| VmError::Link(format!("{e:#}"));
        let mut linker = Linker::new(engine.engine());
        super::wasi::add_to_linker(&mut linker).map_err(link)?;
        super::host::add_to_linker(&mut linker).map_err(link)?;
        linker.define_unknown_imports_as_traps(&module.module).map_err(link)?;
        let pre = linker.instantiate_pre(&module.module).map_err(link)?;
        Ok(Self {
            name: Arc::from(name),
            root_id: Arc::from(name),
            abi: module.abi,
            pre,
            engine: engine.clone(),
            vm_config: Vec::new(),
            plugin_config,
            env,
            limits,
            shared,
            queues,
            metrics,
            upstreams: Arc::default(),
        })
    }
}

/// A callback the guest may export.
type Callback<P, R> = Option<Arc<TypedFunc<P, R>>>;

/// `proxy_on_http_call_response`'s parameters.
type Five = (i32, i32, i32, i32, i32);

/// The callbacks a guest may export (all optional). Shared handles: a
/// callback is taken out for a call by cloning it, and a wasmtime
/// `TypedFunc`'s own clone costs more than a reference count.
struct Exports {
    on_context_create: Callback<(i32, i32), ()>,
    on_vm_start: Callback<(i32, i32), i32>,
    on_configure: Callback<(i32, i32), i32>,
    on_tick: Callback<i32, ()>,
    on_queue_ready: Callback<(i32, i32), ()>,
    on_new_connection: Callback<i32, i32>,
    on_downstream_data: Callback<(i32, i32, i32), i32>,
    on_upstream_data: Callback<(i32, i32, i32), i32>,
    on_request_headers: Callback<(i32, i32, i32), i32>,
    on_request_body: Callback<(i32, i32, i32), i32>,
    on_request_trailers: Callback<(i32, i32), i32>,
    on_response_headers: Callback<(i32, i32, i32), i32>,
    on_response_body: Callback<(i32, i32, i32), i32>,
    on_response_trailers: Callback<(i32, i32), i32>,
    on_http_call_response: Callback<Five, ()>,
    on_downstream_close: Callback<(i32, i32), ()>,
    on_upstream_close: Callback<(i32, i32), ()>,
    on_done: Callback<i32, i32>,
    on_log: Callback<i32, ()>,
    on_delete: Callback<i32, ()>,
}

impl std::fmt::Debug for Exports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exports").finish_non_exhaustive()
    }
}

/// A running instance.
#[derive(Debug)]
pub struct Vm {
    store: Store<HostState>,
    exports: Exports,
    next_id: u32,
    /// Contexts whose `on_done` returned false, waiting for `proxy_done`.
    deferred: usize,
}

/// How long a context whose `on_done` returned false waits for the guest's
/// `proxy_done` before `on_log` and `on_delete` are called anyway.
pub const MAX_DONE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// What a stream callback answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub action: Action,
    pub requests: Requests,
}

impl Vm {
    /// Starts an instance: `_initialize` (or `_start`), the root context,
    /// `on_vm_start`, `on_configure`.
    pub fn start(code: &PluginCode) -> Result<Self, VmError> {
        Self::start_in(code, 0)
    }

    /// Starts an instance for plugin slot `slot`.
    pub fn start_in(code: &PluginCode, slot: usize) -> Result<Self, VmError> {
        let state = HostState {
            plugin: code.name.clone(),
            slot,
            root_name: code.root_id.clone(),
            abi: code.abi,
            limits: code.limits,
            phase: Phase::Starting,
            memory: None,
            allocator: None,
            env: code.env.clone(),
            vm_config: code.vm_config.clone(),
            plugin_config: code.plugin_config.clone(),
            config_readable: false,
            root_id: 1,
            current: 0,
            effective: None,
            streams: Default::default(),
            buffers: CallBuffers::default(),
            upstreams: code.upstreams.clone(),
            last_token: 0,
            requests: Requests::default(),
            tick_period: std::time::Duration::ZERO,
            shared: code.shared.clone(),
            queues: code.queues.clone(),
            metrics: code.metrics.clone(),
            last_error: None,
            stdout: Vec::new(),
            stderr: Vec::new(),
            limiter: MemoryLimiter {
                max_memory: code.limits.max_memory,
                hit: false,
            },
            overtime: Overtime::default(),
        };
        let mut store = Store::new(code.engine.engine(), state);
        store.limiter(|s| &mut s.limiter);
        let limits = code.limits;
        store.epoch_deadline_callback(move |mut ctx| Ok(on_deadline(&mut ctx.data_mut().overtime, limits)));
        store.set_epoch_deadline(deadline_ticks(code.limits));
        let instance = code
            .pre
            .instantiate(&mut store)
            .map_err(|e| classify(&store, "instantiation", &e))?;
        let memory = instance.get_memory(&mut store, "memory");
        let allocator =
            typed(&instance, &mut store, "proxy_on_memory_allocate").or_else(|| typed(&instance, &mut store, "malloc"));
        store.data_mut().memory = memory;
        store.data_mut().allocator = allocator;
        let exports = Exports {
            on_context_create: typed_export(&instance, &mut store, "proxy_on_context_create"),
            on_vm_start: typed_export(&instance, &mut store, "proxy_on_vm_start"),
            on_configure: typed_export(&instance, &mut store, "proxy_on_configure"),
            on_tick: typed_export(&instance, &mut store, "proxy_on_tick"),
            on_queue_ready: typed_export(&instance, &mut store, "proxy_on_queue_ready"),
            on_new_connection: typed_export(&instance, &mut store, "proxy_on_new_connection"),
            on_downstream_data: typed_export(&instance, &mut store, "proxy_on_downstream_data"),
            on_upstream_data: typed_export(&instance, &mut store, "proxy_on_upstream_data"),
            on_request_headers: typed_export(&instance, &mut store, "proxy_on_request_headers"),
            on_request_body: typed_export(&instance, &mut store, "proxy_on_request_body"),
            on_request_trailers: typed_export(&instance, &mut store, "proxy_on_request_trailers"),
            on_response_headers: typed_export(&instance, &mut store, "proxy_on_response_headers"),
            on_response_body: typed_export(&instance, &mut store, "proxy_on_response_body"),
            on_response_trailers: typed_export(&instance, &mut store, "proxy_on_response_trailers"),
            on_http_call_response: typed_export(&instance, &mut store, "proxy_on_http_call_response"),
            on_downstream_close: typed_export(&instance, &mut store, "proxy_on_downstream_connection_close"),
            on_upstream_close: typed_export(&instance, &mut store, "proxy_on_upstream_connection_close"),
            on_done: typed_export(&instance, &mut store, "proxy_on_done"),
            on_log: typed_export(&instance, &mut store, "proxy_on_log"),
            on_delete: typed_export(&instance, &mut store, "proxy_on_delete"),
        };
        // A reactor initialises with `_initialize`; a command with `_start`
        // (only when there is no `_initialize`). Host calls are restricted
        // meanwhile.
        let init = typed::<(), ()>(&instance, &mut store, "_initialize")
            .map(|f| ("_initialize", f))
            .or_else(|| typed::<(), ()>(&instance, &mut store, "_start").map(|f| ("_start", f)));
        let mut vm = Self {
            store,
            exports,
            next_id: 2,
            deferred: 0,
        };
        if let Some((name, f)) = init {
            vm.call(name, Phase::Starting, 0, &f, ())?;
        }
        let root = vm.store.data().root_id as i32;
        if let Some(f) = vm.exports.on_context_create.clone() {
            vm.call("proxy_on_context_create", Phase::Running, root as u32, &f, (root, 0))?;
        }
        vm.store.data_mut().config_readable = true;
        let started = match vm.exports.on_vm_start.clone() {
            Some(f) => {
                let len = vm.store.data().vm_config.len() as i32;
                vm.call("proxy_on_vm_start", Phase::Running, root as u32, &f, (root, len))
            }
            None => Ok(1),
        };
        let configured = match started {
            Ok(0) => Err(vm.refused("proxy_on_vm_start")),
            Ok(_) => match vm.exports.on_configure.clone() {
                Some(f) => {
                    let len = vm.store.data().plugin_config.len() as i32;
                    vm.call("proxy_on_configure", Phase::Running, root as u32, &f, (root, len))
                        .and_then(|ok| {
                            if ok == 0 {
                                Err(vm.refused("proxy_on_configure"))
                            } else {
                                Ok(())
                            }
                        })
                }
                None => Ok(()),
            },
            Err(e) => Err(e),
        };
        vm.store.data_mut().config_readable = false;
        configured.map(|()| vm)
    }

    /// Calls `f` for context `ctx` under the deadline, with the guest's
    /// requests cleared before and the instance's phase set to `phase`.
    fn call<P: WasmParams, Q: WasmResults>(
        &mut self,
        callback: &'static str,
        phase: Phase,
        ctx: u32,
        f: &TypedFunc<P, Q>,
        args: P,
    ) -> Result<Q, VmError> {
        let limits = self.store.data().limits;
        self.store.set_epoch_deadline(deadline_ticks(limits));
        {
            let s = self.store.data_mut();
            s.phase = phase;
            s.current = ctx;
            s.effective = None;
            s.requests = Requests::default();
            s.overtime = Overtime::default();
        }
        let out = f.call(&mut self.store, args);
        self.store.data_mut().phase = Phase::Running;
        out.map_err(|e| classify(&self.store, callback, &e))
    }

    /// Creates a stream context with `properties`; returns its id.
    pub fn new_stream(&mut self, properties: std::collections::HashMap<String, Vec<u8>>) -> Result<u32, VmError> {
        self.new_stream_with(StreamState {
            properties,
            ..StreamState::default()
        })
    }

    /// Creates a stream context for a flow, whose properties are read from
    /// `facts` when the guest asks; returns its id.
    pub fn new_flow_stream(&mut self, facts: super::properties::FlowFacts) -> Result<u32, VmError> {
        self.new_stream_with(StreamState {
            facts: Some(Box::new(facts)),
            ..StreamState::default()
        })
    }

    fn new_stream_with(&mut self, state: StreamState) -> Result<u32, VmError> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(2);
        self.store.data_mut().streams.insert(id, state);
        let root = self.store.data().root_id as i32;
        if let Some(f) = self.exports.on_context_create.clone() {
            self.call("proxy_on_context_create", Phase::Running, id, &f, (id as i32, root))?;
        }
        Ok(id)
    }

    /// `proxy_on_new_connection` for stream `id`.
    pub fn on_new_connection(&mut self, id: u32) -> Result<Answer, VmError> {
        let Some(f) = self.exports.on_new_connection.clone() else {
            return Ok(self.answer(Action::Continue));
        };
        let a = self.call("proxy_on_new_connection", Phase::Running, id, &f, id as i32)?;
        Ok(self.answer(Action::from(a)))
    }

    /// `proxy_on_downstream_data` / `proxy_on_upstream_data` for stream
    /// `id`, with `data` readable (buffer 2 or 3) during the call.
    pub fn on_data(&mut self, id: u32, downstream: bool, data: &[u8], end: bool) -> Result<Answer, VmError> {
        let (name, f) = if downstream {
            ("proxy_on_downstream_data", self.exports.on_downstream_data.clone())
        } else {
            ("proxy_on_upstream_data", self.exports.on_upstream_data.clone())
        };
        let Some(f) = f else {
            return Ok(self.answer(Action::Continue));
        };
        let buf = Some(data.to_vec());
        if downstream {
            self.store.data_mut().buffers.downstream = buf;
        } else {
            self.store.data_mut().buffers.upstream = buf;
        }
        let len = i32::try_from(data.len()).unwrap_or(i32::MAX);
        let out = self.call(name, Phase::Running, id, &f, (id as i32, len, i32::from(end)));
        self.store.data_mut().buffers = CallBuffers::default();
        Ok(self.answer(Action::from(out?)))
    }

    /// One of HTTP context `id`'s callbacks, on the part of its exchange
    /// that has just been put in the context ([`Vm::http_parts`]): a
    /// headers or trailers callback is told how many fields there are, a
    /// body callback how many bytes.
    pub fn on_http(&mut self, id: u32, event: HttpEvent, end_of_stream: bool) -> Result<Answer, VmError> {
        let e = &self.exports;
        let (name, f3, f2) = match event {
            HttpEvent::RequestHeaders => ("proxy_on_request_headers", e.on_request_headers.clone(), None),
            HttpEvent::RequestBody => ("proxy_on_request_body", e.on_request_body.clone(), None),
            HttpEvent::RequestTrailers => ("proxy_on_request_trailers", None, e.on_request_trailers.clone()),
            HttpEvent::ResponseHeaders => ("proxy_on_response_headers", e.on_response_headers.clone(), None),
            HttpEvent::ResponseBody => ("proxy_on_response_body", e.on_response_body.clone(), None),
            HttpEvent::ResponseTrailers => ("proxy_on_response_trailers", None, e.on_response_trailers.clone()),
        };
        let size = self
            .store
            .data()
            .streams
            .get(&id)
            .and_then(|s| s.http.as_ref())
            .map_or(0, |h| match event {
                HttpEvent::RequestHeaders => h.request_headers.as_ref().map_or(0, Vec::len),
                HttpEvent::RequestBody => h.request_body.as_ref().map_or(0, Vec::len),
                HttpEvent::RequestTrailers => h.request_trailers.as_ref().map_or(0, Vec::len),
                HttpEvent::ResponseHeaders => h.response_headers.as_ref().map_or(0, Vec::len),
                HttpEvent::ResponseBody => h.response_body.as_ref().map_or(0, Vec::len),
                HttpEvent::ResponseTrailers => h.response_trailers.as_ref().map_or(0, Vec::len),
            });
        let size = i32::try_from(size).unwrap_or(i32::MAX);
        let out = match (f3, f2) {
            (Some(f), _) => self.call(
                name,
                Phase::Running,
                id,
                &f,
                (id as i32, size, i32::from(end_of_stream)),
            )?,
            (None, Some(f)) => self.call(name, Phase::Running, id, &f, (id as i32, size))?,
            (None, None) => 0,
        };
        Ok(self.answer(Action::from(out)))
    }

    /// Whether the guest has a callback for HTTP bodies (a module without
    /// one never needs its bodies buffered).
    pub fn reads_bodies(&self) -> bool {
        self.exports.on_request_body.is_some() || self.exports.on_response_body.is_some()
    }

    /// HTTP context `id`'s parts (made when first asked for).
    pub fn http_parts(&mut self, id: u32) -> Option<&mut HttpParts> {
        let s = self.store.data_mut().streams.get_mut(&id)?;
        Some(s.http.get_or_insert_with(HttpParts::default))
    }

    /// Registers who waits for paused context `id` to be resumed or ended.
    pub fn wait_for(&mut self, id: u32, waiter: tokio::sync::oneshot::Sender<Requests>) {
        if let Some(s) = self.store.data_mut().streams.get_mut(&id) {
            s.waiter = Some(waiter);
        }
    }

    /// Tells whoever waits for the context `requests` settle (resumed,
    /// closed or answered) what the guest asked of it.
    pub fn settle(&mut self, requests: &Requests) {
        let Some(id) = requests.on.filter(|&id| requests.settles(id)) else {
            return;
        };
        if let Some(w) = self.store.data_mut().streams.get_mut(&id).and_then(|s| s.waiter.take()) {
            let _ = w.send(requests.clone());
        }
    }

    /// `proxy_on_http_call_response` on the root context for call `token`;
    /// `None` when the call failed (no headers, as in Envoy).
    pub fn on_http_call_response(&mut self, token: u32, response: Option<CalloutResponse>) -> Result<Answer, VmError> {
        let Some(f) = self.exports.on_http_call_response.clone() else {
            return Ok(self.answer(Action::Continue));
        };
        let root = self.store.data().root_id;
        let counts = response.as_ref().map_or((0, 0, 0), |r| {
            (
                i32::try_from(r.headers.len()).unwrap_or(i32::MAX),
                i32::try_from(r.body.len()).unwrap_or(i32::MAX),
                i32::try_from(r.trailers.len()).unwrap_or(i32::MAX),
            )
        });
        self.store.data_mut().buffers.callout = response;
        let out = self.call(
            "proxy_on_http_call_response",
            Phase::Running,
            root,
            &f,
            (root as i32, token as i32, counts.0, counts.1, counts.2),
        );
        self.store.data_mut().buffers = CallBuffers::default();
        out?;
        Ok(self.answer(Action::Continue))
    }

    /// Ends context `id`: `on_done`, then `on_log` and `on_delete`. When
    /// `on_done` returns false the guest has more to do: the context stays
    /// until the guest calls `proxy_done` for it (from any later callback)
    /// or [`MAX_DONE_WAIT`] passes, and what it said so far is returned now
    /// (see [`Vm::finish_deferred`]).
    pub fn finish_http(&mut self, id: u32) -> Result<StreamState, VmError> {
        let ready = match self.exports.on_done.clone() {
            Some(f) => self.call("proxy_on_done", Phase::Running, id, &f, id as i32),
            None => Ok(1),
        };
        match ready {
            Err(e) => {
                self.store.data_mut().streams.remove(&id);
                Err(e)
            }
            Ok(0) => match self.store.data_mut().streams.get_mut(&id) {
                Some(s) if !s.done => {
                    s.done_by = Some(std::time::Instant::now() + MAX_DONE_WAIT);
                    let said = StreamState {
                        properties: s.properties.clone(),
                        ..StreamState::default()
                    };
                    self.deferred += 1;
                    Ok(said)
                }
                _ => self.log_and_delete(id),
            },
            Ok(_) => self.log_and_delete(id),
        }
    }

    /// `on_log` and `on_delete` for context `id`, which then is gone.
    fn log_and_delete(&mut self, id: u32) -> Result<StreamState, VmError> {
        let ctx = id as i32;
        let result = (|| {
            if let Some(f) = self.exports.on_log.clone() {
                self.call("proxy_on_log", Phase::Running, id, &f, ctx)?;
            }
            if let Some(f) = self.exports.on_delete.clone() {
                self.call("proxy_on_delete", Phase::Running, id, &f, ctx)?;
            }
            Ok(())
        })();
        let state = self.store.data_mut().streams.remove(&id).unwrap_or_default();
        result.map(|()| state)
    }

    /// Ends the contexts that waited after `on_done` and have since been
    /// finished by the guest (`proxy_done`), or have waited `MAX_DONE_WAIT`.
    pub fn finish_deferred(&mut self, now: std::time::Instant) -> Result<(), VmError> {
        if self.deferred == 0 {
            return Ok(());
        }
        let due: Vec<u32> = self
            .store
            .data()
            .streams
            .iter()
            .filter(|(_, s)| s.done_by.is_some_and(|by| s.done || now >= by))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.deferred = self.deferred.saturating_sub(1);
            self.log_and_delete(id)?;
        }
        Ok(())
    }

    /// How many contexts wait for `proxy_done`.
    pub fn deferred(&self) -> usize {
        self.deferred
    }

    /// Ends stream `id`: both close callbacks, then `on_done`, `on_log` and
    /// `on_delete`. Returns what the stream's properties ended as.
    pub fn finish(&mut self, id: u32) -> Result<StreamState, VmError> {
        let peer = PeerType::Remote as i32;
        let closes = [
            (
                "proxy_on_downstream_connection_close",
                self.exports.on_downstream_close.clone(),
            ),
            (
                "proxy_on_upstream_connection_close",
                self.exports.on_upstream_close.clone(),
            ),
        ];
        for (name, f) in closes {
            if let Some(f) = f
                && let Err(e) = self.call(name, Phase::Running, id, &f, (id as i32, peer))
            {
                self.store.data_mut().streams.remove(&id);
                return Err(e);
            }
        }
        self.finish_http(id)
    }

    /// Forgets stream `id` without calling the guest (its instance failed).
    pub fn forget(&mut self, id: u32) -> Option<StreamState> {
        self.store.data_mut().streams.remove(&id)
    }

    /// `proxy_on_tick` for the root context; returns what it asked for.
    pub fn tick(&mut self) -> Result<Requests, VmError> {
        let root = self.store.data().root_id;
        if let Some(f) = self.exports.on_tick.clone() {
            self.call("proxy_on_tick", Phase::Running, root, &f, root as i32)?;
        }
        Ok(self.answer(Action::Continue).requests)
    }

    /// `proxy_on_queue_ready` for the root context: queue `id` has items.
    pub fn queue_ready(&mut self, id: u32) -> Result<Requests, VmError> {
        let root = self.store.data().root_id;
        if let Some(f) = self.exports.on_queue_ready.clone() {
            self.call(
                "proxy_on_queue_ready",
                Phase::Running,
                root,
                &f,
                (root as i32, id as i32),
            )?;
        }
        Ok(self.answer(Action::Continue).requests)
    }

    /// How often the plugin asked to be ticked (zero: never).
    pub fn tick_period(&self) -> std::time::Duration {
        self.store.data().tick_period
    }

    /// Stream `id`'s properties (what the guest wrote included).
    pub fn stream(&self, id: u32) -> Option<&StreamState> {
        self.store.data().streams.get(&id)
    }

    fn refused(&self, callback: &'static str) -> VmError {
        VmError::Refused {
            callback,
            said: self.store.data().last_error.clone(),
        }
    }

    fn answer(&mut self, action: Action) -> Answer {
        Answer {
            action,
            requests: std::mem::take(&mut self.store.data_mut().requests),
        }
    }
}

/// The callback `name`, if the guest exports one of that type.
fn typed_export<P: WasmParams, Q: WasmResults>(
    instance: &Instance,
    store: &mut Store<HostState>,
    name: &str,
) -> Option<Arc<TypedFunc<P, Q>>> {
    typed(instance, store, name).map(Arc::new)
}

/// The typed export `name`, if the guest has one of that type.
fn typed<P: WasmParams, Q: WasmResults>(
    instance: &Instance,
    store: &mut Store<HostState>,
    name: &str,
) -> Option<TypedFunc<P, Q>> {
    instance.get_typed_func::<P, Q>(&mut *store, name).ok()
}

/// How many windows of the deadline a callback may span on the wall clock
/// while it is not the one using the CPU (its thread preempted).
const MAX_WINDOWS: u32 = 10;

/// What a callback gets when it reaches its deadline on the wall clock. The
/// deadline is CPU time: a callback that used the CPU for a whole window is
/// stopped, one whose thread was preempted (a loaded machine) gets another
/// window, up to [`MAX_WINDOWS`]. The thread's CPU time is read only here,
/// never on the fast path.
fn on_deadline(o: &mut Overtime, limits: PluginLimits) -> wasmtime::UpdateDeadline {
    use wasmtime::UpdateDeadline;
    let window = deadline_ticks(limits);
    let Ok(now) = crate::sys::thread_cpu_time() else {
        return UpdateDeadline::Interrupt;
    };
    o.windows += 1;
    match o.cpu_at_first {
        None => {
            o.cpu_at_first = Some(now);
            UpdateDeadline::Continue(window)
        }
        // Nine tenths of a window on the CPU since the first: the guest
        // is running, not waiting for the CPU.
        Some(first) if now.saturating_sub(first) >= limits.deadline.mul_f32(0.9) => UpdateDeadline::Interrupt,
        Some(_) if o.windows >= MAX_WINDOWS => UpdateDeadline::Interrupt,
        Some(_) => UpdateDeadline::Continue(window),
    }
}

/// The deadline in epoch ticks.
fn deadline_ticks(limits: PluginLimits) -> u64 {
    let ticks = limits.deadline.as_micros() / EPOCH_TICK.as_micros().max(1);
    u64::try_from(ticks).unwrap_or(u64::MAX).max(1)
}

/// Names what stopped a call: the deadline, the memory cap, or a trap
/// with the guest's backtrace.
fn classify(store: &Store<HostState>, callback: &'static str, e: &wasmtime::Error) -> VmError {
    let limits = store.data().limits;
    if store.data().limiter.hit {
        return VmError::MemoryLimit {
            callback,
            max_memory: limits.max_memory,
        };
    }
    if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        return VmError::Deadline {
            callback,
            deadline_ms: limits.deadline.as_millis(),
        };
    }
    let cause = e
        .downcast_ref::<GuestFault>()
        .map_or_else(|| e.root_cause().to_string(), ToString::to_string);
    let backtrace = e
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .map(|bt| format!("\n{bt}"))
        .unwrap_or_default();
    VmError::Trap {
        callback,
        detail: format!("{cause}{backtrace}"),
    }
}
