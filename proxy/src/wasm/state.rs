//! What one plugin instance's host functions work on: the plugin's identity
//! and limits, the contexts the guest knows, what the current callback may
//! read (its buffers, its stream's properties) and what it asked for
//! (close, continue, a verdict), and the guest's memory with safe accessors.
//! Every pointer a guest passes is checked; a bad one traps the guest (the
//! Rust SDK has no status for "invalid memory access").

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use wasmtime::{AsContextMut, Caller, Memory, ResourceLimiter, TypedFunc};

use super::abi::{AbiVersion, LogLevel, PairsLimits, StreamType};
use super::shared::{PluginMetrics, SharedData, SharedQueues};

/// Limits on one plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PluginLimits {
    /// Linear memory, in bytes.
    pub max_memory: usize,
    /// How long one callback may run.
    pub deadline: Duration,
    /// Header maps a guest sends.
    pub pairs: PairsLimits,
    /// The largest buffer or property value a guest may write in one call.
    pub max_value: usize,
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self {
            max_memory: 64 << 20,
            deadline: Duration::from_millis(10),
            pairs: PairsLimits::default(),
            max_value: 1 << 20,
        }
    }
}

/// Where the instance is: host calls are restricted while the guest starts
/// (`_initialize`) and while it runs its allocator for the host, as the
/// reference host does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Starting,
    Allocating,
    Running,
}

/// A stream context's host-side state.
#[derive(Debug, Default)]
pub struct StreamState {
    /// Properties given to the stream (a DNS query's) and those the guest
    /// wrote, by dotted path.
    pub properties: HashMap<String, Vec<u8>>,
    /// The flow the stream is for, whose properties are computed when the
    /// guest asks (after `properties`).
    pub facts: Option<Box<super::properties::FlowFacts>>,
    /// The guest finished the context (`proxy_on_done` said no, then
    /// `proxy_done` was called).
    pub done: bool,
    /// An HTTP context: its messages' parts, once they arrived. They stay
    /// readable (and writable) after their own callback, so a paused
    /// request can be changed from `on_http_call_response`, and `on_log`
    /// sees them all.
    pub http: Option<HttpParts>,
    /// Who waits for the guest to resume (or end) this paused context.
    pub waiter: Option<tokio::sync::oneshot::Sender<Requests>>,
    /// `proxy_on_done` returned false: the context's `on_log` and
    /// `on_delete` wait for `proxy_done`, until this time at the latest.
    pub done_by: Option<std::time::Instant>,
}

/// An HTTP exchange's parts, as the guest sees them.
#[derive(Debug, Default)]
pub struct HttpParts {
    pub request_headers: Option<Headers>,
    pub request_body: Option<Vec<u8>>,
    pub request_trailers: Option<Headers>,
    pub response_headers: Option<Headers>,
    pub response_body: Option<Vec<u8>>,
    pub response_trailers: Option<Headers>,
    /// The guest changed a header map or a body since the host last
    /// looked (set by every host call that writes one): an exchange whose
    /// plugin only read takes nothing back.
    pub changed: bool,
}

/// An HTTP call a guest made (`proxy_http_call`), made by the host once
/// the callback returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callout {
    pub token: u32,
    /// The upstream's name, as the guest gave it.
    pub upstream: String,
    /// Where it is and how it is reached, from the plugin's `upstreams`.
    pub to: super::callout::Upstream,
    pub headers: Headers,
    pub body: Vec<u8>,
    pub trailers: Headers,
    pub timeout: Duration,
}

/// The answer to a [`Callout`], readable during `on_http_call_response`.
#[derive(Debug, Default)]
pub struct CalloutResponse {
    /// `:status` first.
    pub headers: Headers,
    pub body: Vec<u8>,
    pub trailers: Headers,
}

/// What the guest asked for during the current callback, carried out by the
/// host once the callback returns (never from inside a host call).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Requests {
    /// `proxy_close_stream`.
    pub close: Option<StreamType>,
    /// `proxy_continue_stream`.
    pub resume: Option<StreamType>,
    /// `proxy_set_buffer_bytes` on the flow's bytes.
    pub rewrote: bool,
    /// `proxy_send_local_response` in an HTTP callback.
    pub local_reply: Option<crate::listener::LocalReply>,
    /// The context the guest resumed, closed or answered (its effective
    /// one when it did).
    pub on: Option<u32>,
    /// `proxy_http_call`s to make.
    pub calls: Vec<Callout>,
}

impl Requests {
    /// Whether the guest resumed, closed or answered context `id`.
    pub fn settles(&self, id: u32) -> bool {
        self.on == Some(id) && (self.resume.is_some() || self.close.is_some() || self.local_reply.is_some())
    }
}

/// A header map: names (lower case) and values, in order. The listener's
/// own shape for a message's fields, so handing them to a plugin is one
/// copy and taking them back none; a name a guest gives that is not UTF-8
/// is kept with its bad bytes replaced (no HTTP field name has any).
pub type Headers = crate::listener::HttpFields;

/// A header name a guest gave, as a map keeps it: lower case, UTF-8.
pub fn header_name(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).to_ascii_lowercase()
}

/// The buffers the current callback may read and write.
#[derive(Debug, Default)]
pub struct CallBuffers {
    pub downstream: Option<Vec<u8>>,
    pub upstream: Option<Vec<u8>>,
    /// The answer `on_http_call_response` is told about.
    pub callout: Option<CalloutResponse>,
}

/// One instance's host state.
pub struct HostState {
    pub plugin: Arc<str>,
    /// The plugin slot (worker) this instance serves.
    pub slot: usize,
    /// The root id the guest registered its root context under.
    pub root_name: Arc<str>,
    pub abi: AbiVersion,
    pub limits: PluginLimits,
    pub phase: Phase,
    pub memory: Option<Memory>,
    pub allocator: Option<TypedFunc<i32, i32>>,
    /// What WASI's `environ_get` shows: only what the plugin's
    /// configuration sets, never the host's environment.
    pub env: Vec<(String, String)>,
    pub vm_config: Vec<u8>,
    pub plugin_config: Vec<u8>,
    /// Whether the configuration buffers may be read now (only during
    /// `proxy_on_vm_start` and `proxy_on_configure`).
    pub config_readable: bool,
    pub root_id: u32,
    /// The context the current callback is for, and the one the guest
    /// switched to with `proxy_set_effective_context`.
    pub current: u32,
    pub effective: Option<u32>,
    pub streams: HashMap<u32, StreamState>,
    pub buffers: CallBuffers,
    /// The upstreams `proxy_http_call` may name.
    pub upstreams: Arc<Vec<super::callout::Upstream>>,
    /// The last `proxy_http_call` token handed out.
    pub last_token: u32,
    pub requests: Requests,
    /// `proxy_set_tick_period_milliseconds` (zero: no tick).
    pub tick_period: Duration,
    pub shared: Arc<SharedData>,
    pub queues: Arc<SharedQueues>,
    pub metrics: Arc<PluginMetrics>,
    /// The last line the guest logged at error level or above (or wrote to
    /// stderr): what a refusal to start reports.
    pub last_error: Option<String>,
    /// Unfinished lines the guest wrote to stdout and stderr.
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub limiter: MemoryLimiter,
    /// The current callback's past deadline windows (see `vm::on_deadline`).
    pub overtime: Overtime,
}

/// What a callback that outlived its deadline on the wall clock has used:
/// windows it has been given, and the thread's CPU time when the first
/// one began.
#[derive(Debug, Default, Clone, Copy)]
pub struct Overtime {
    pub windows: u32,
    pub cpu_at_first: Option<Duration>,
}

impl std::fmt::Debug for HostState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostState")
            .field("plugin", &self.plugin)
            .field("phase", &self.phase)
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

impl HostState {
    /// The context host calls act on now.
    pub fn context(&self) -> u32 {
        self.effective.unwrap_or(self.current)
    }

    /// The stream state of the context host calls act on, if it is a stream.
    pub fn stream(&self) -> Option<&StreamState> {
        self.streams.get(&self.context())
    }

    pub fn stream_mut(&mut self) -> Option<&mut StreamState> {
        let id = self.context();
        self.streams.get_mut(&id)
    }

    /// Logs a line the guest wrote, with the plugin's name.
    pub fn log(&mut self, level: LogLevel, message: &str) {
        if matches!(level, LogLevel::Error | LogLevel::Critical) {
            let mut line: String = message.chars().take(512).collect();
            if line.len() < message.len() {
                line.push('…');
            }
            self.last_error = Some(line);
        }
        let plugin = &*self.plugin;
        match level {
            LogLevel::Trace => tracing::trace!(plugin, "{message}"),
            LogLevel::Debug => tracing::debug!(plugin, "{message}"),
            LogLevel::Info => tracing::info!(plugin, "{message}"),
            LogLevel::Warn => tracing::warn!(plugin, "{message}"),
            LogLevel::Error | LogLevel::Critical => tracing::error!(plugin, "{message}"),
        }
    }
}

/// Caps an instance's linear memory at the plugin's limit (the pool's cap
/// is only a backstop: a module that declares no maximum is offered 4 GiB).
#[derive(Debug, Clone, Copy)]
pub struct MemoryLimiter {
    pub max_memory: usize,
    /// Set when a growth was refused, so a trap can be reported as the
    /// memory limit rather than as the guest's own failure.
    pub hit: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.max_memory {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// Why a guest was stopped inside a host call.
#[derive(Debug, thiserror::Error)]
pub enum GuestFault {
    #[error("the guest passed a pointer outside its memory ({ptr:#x}, {len} bytes)")]
    OutOfBounds { ptr: u32, len: u32 },
    #[error("the guest exports no memory")]
    NoMemory,
    #[error("the guest's allocator returned no memory for {0} bytes")]
    AllocationFailed(u32),
    #[error("the guest's allocator failed: {0}")]
    AllocatorFailed(String),
    #[error("`{0}` may not be called from inside the guest's allocator or while it starts")]
    Restricted(&'static str),
    #[error("`{0}` would make a buffer larger than the plugin's max_value")]
    TooLarge(&'static str),
    #[error("the guest called proc_exit({0})")]
    Exit(i32),
}

/// Guest memory access for host functions.
pub trait GuestMemory {
    fn read(&mut self, ptr: i32, len: i32) -> Result<Vec<u8>, GuestFault>;
    fn write(&mut self, ptr: i32, bytes: &[u8]) -> Result<(), GuestFault>;
    fn write_u32(&mut self, ptr: i32, v: u32) -> Result<(), GuestFault> {
        self.write(ptr, &v.to_le_bytes())
    }
    fn write_u64(&mut self, ptr: i32, v: u64) -> Result<(), GuestFault> {
        self.write(ptr, &v.to_le_bytes())
    }
    /// Hands `bytes` to the guest: allocates exactly their length with the
    /// guest's allocator, copies them, and writes the pointer and length to
    /// `ptr_ptr` and `len_ptr`. Empty data is handed over as a null pointer
    /// and zero length, without allocating.
    fn give(&mut self, bytes: &[u8], ptr_ptr: i32, len_ptr: i32) -> Result<(), GuestFault>;
}

/// The guest address range `[ptr, ptr + len)` as host indices.
fn range(ptr: i32, len: usize) -> Option<std::ops::Range<usize>> {
    let start = ptr as u32 as usize;
    Some(start..start.checked_add(len)?)
}

impl GuestMemory for Caller<'_, HostState> {
    fn read(&mut self, ptr: i32, len: i32) -> Result<Vec<u8>, GuestFault> {
        let memory = self.data().memory.ok_or(GuestFault::NoMemory)?;
        let fault = || GuestFault::OutOfBounds {
            ptr: ptr as u32,
            len: len as u32,
        };
        let r = range(ptr, len as u32 as usize).ok_or_else(fault)?;
        memory.data(&*self).get(r).map(<[u8]>::to_vec).ok_or_else(fault)
    }

    fn write(&mut self, ptr: i32, bytes: &[u8]) -> Result<(), GuestFault> {
        let memory = self.data().memory.ok_or(GuestFault::NoMemory)?;
        let fault = || GuestFault::OutOfBounds {
            ptr: ptr as u32,
            len: u32::try_from(bytes.len()).unwrap_or(u32::MAX),
        };
        let r = range(ptr, bytes.len()).ok_or_else(fault)?;
        memory
            .data_mut(&mut *self)
            .get_mut(r)
            .ok_or_else(fault)?
            .copy_from_slice(bytes);
        Ok(())
    }

    fn give(&mut self, bytes: &[u8], ptr_ptr: i32, len_ptr: i32) -> Result<(), GuestFault> {
        if bytes.is_empty() {
            self.write_u32(ptr_ptr, 0)?;
            return self.write_u32(len_ptr, 0);
        }
        let len = u32::try_from(bytes.len()).map_err(|_| GuestFault::AllocationFailed(u32::MAX))?;
        let alloc = self.data().allocator.clone().ok_or(GuestFault::NoMemory)?;
        let before = self.data().phase;
        self.data_mut().phase = Phase::Allocating;
        let ptr = alloc.call(self.as_context_mut(), len as i32);
        self.data_mut().phase = before;
        let ptr = ptr.map_err(|e| {
            GuestFault::AllocatorFailed(
                e.downcast_ref::<GuestFault>()
                    .map_or_else(|| e.root_cause().to_string(), ToString::to_string),
            )
        })?;
        if ptr == 0 {
            return Err(GuestFault::AllocationFailed(len));
        }
        // The allocator may have grown memory: `write` takes a fresh view.
        self.write(ptr, bytes)?;
        self.write_u32(ptr_ptr, ptr as u32)?;
        self.write_u32(len_ptr, len)
    }
}
