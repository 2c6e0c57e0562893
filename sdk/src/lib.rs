//! Write Sluice policy plugins in Rust.
//!
//! A thin typed layer over the [`proxy_wasm`] crate: a plugin built with it
//! is a plain proxy-wasm module (ABI 0.2.1) that Sluice runs, and that
//! Envoy can load too (where Sluice's own properties are absent).
//!
//! Implement [`ConnectionPolicy`] and register it with [`connection_policy!`]:
//!
//! ```ignore
//! use sluice_sdk::proxy_wasm::traits::Context;
//! use sluice_sdk::{connection_policy, ConnectionPolicy, Flow, Notes, Verdict};
//!
//! #[derive(Default)]
//! struct OnlyApi;
//!
//! impl ConnectionPolicy for OnlyApi {
//!     fn configure(&mut self, _config: &[u8]) -> Result<(), String> {
//!         Ok(())
//!     }
//!     fn decide(&mut self, flow: &Flow, notes: &mut Notes, _ctx: &dyn Context) -> Verdict {
//!         if flow.host.as_deref().is_some_and(|h| h.starts_with("api.")) {
//!             Verdict::Abstain
//!         } else {
//!             notes.add("why", "not an api host");
//!             Verdict::Deny
//!         }
//!     }
//! }
//!
//! connection_policy!(OnlyApi);
//! ```
//!
//! A plugin's verdict is applied by Sluice's chain rules: [`Verdict::Deny`]
//! denies what the policy allowed; [`Verdict::Allow`] allows only what a
//! rule hands to the plugin with `delegate`; [`Verdict::Abstain`] leaves the
//! decision as it is. Notes go into the flow's audit record
//! (`annotations`).

use std::time::{Duration, SystemTime};

pub use proxy_wasm;
use proxy_wasm::traits::{Context, RootContext, StreamContext};
use proxy_wasm::types::{Action, ContextType};

/// What a flow shows a plugin: Sluice's properties, read once when the
/// connection is classified. A DNS listener presents each query as a flow
/// of protocol `dns` whose `host` is the query name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Flow {
    /// The flow id of its audit record (`connection.id`).
    pub id: u64,
    /// The listener's name.
    pub listener: String,
    /// `tls`, `http`, `tcp`.
    pub protocol: String,
    /// The client's address, `ip:port`.
    pub source: String,
    /// Where the flow goes, `ip:port`, when known before it is dialled.
    pub destination: Option<String>,
    pub port: u16,
    /// The TLS SNI.
    pub sni: Option<String>,
    /// The destination name (SNI, Host or CONNECT target), canonical.
    pub host: Option<String>,
    /// Explicit proxy: the `host:port` the client asked for.
    pub connect_target: Option<String>,
    pub alpn: Vec<String>,
    /// The source's SmartGroups (an authenticated user's included).
    pub smartgroups: Vec<String>,
    /// The destination name's WebGroups.
    pub webgroups: Vec<String>,
    /// The decision so far (the policy's, or an earlier filter's).
    pub decision: Option<Decision>,
    /// A DNS query (protocol `dns`): its type (1 A, 28 AAAA, 16 TXT, …);
    /// its name is `host`.
    pub query_type: Option<u16>,
}

/// A decision as the chain has it when the plugin is asked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    pub allow: bool,
    /// The rule that decided (`default`, `builtin-guard`, a rule's name).
    pub rule: String,
    /// The reason code (`allowed-by-rule`, `default-deny`, ...).
    pub reason: String,
}

impl Flow {
    /// Reads the flow's properties through `ctx` (a stream context).
    pub fn read(ctx: &dyn Context) -> Self {
        let text = |path: &str| {
            ctx.get_property(path.split('.').collect())
                .and_then(|v| String::from_utf8(v).ok())
        };
        let list = |path: &str| {
            text(path)
                .map(|s| s.split(',').filter(|x| !x.is_empty()).map(str::to_owned).collect())
                .unwrap_or_default()
        };
        let int = |path: &str| {
            ctx.get_property(path.split('.').collect())
                .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                .map(u64::from_le_bytes)
        };
        let decision = text("sluice.verdict.action").map(|action| Decision {
            allow: action == "allow",
            rule: text("sluice.verdict.rule").unwrap_or_default(),
            reason: text("sluice.verdict.reason").unwrap_or_default(),
        });
        Flow {
            id: int("connection.id").unwrap_or(0),
            listener: text("sluice.listener").unwrap_or_default(),
            protocol: text("sluice.protocol").unwrap_or_default(),
            source: text("source.address").unwrap_or_default(),
            destination: text("destination.address"),
            port: int("destination.port").and_then(|p| u16::try_from(p).ok()).unwrap_or(0),
            sni: text("connection.requested_server_name"),
            host: text("sluice.host"),
            connect_target: text("sluice.connect_target"),
            alpn: list("sluice.tls.alpn"),
            smartgroups: list("sluice.source.smartgroups"),
            webgroups: list("sluice.destination.webgroups"),
            decision,
            query_type: int("dns.query.type").and_then(|t| u16::try_from(t).ok()),
        }
    }

    /// The client's IP address, without the port.
    pub fn source_ip(&self) -> &str {
        match self.source.rsplit_once(':') {
            Some((ip, _)) => ip.trim_start_matches('[').trim_end_matches(']'),
            None => &self.source,
        }
    }

    pub fn in_smartgroup(&self, name: &str) -> bool {
        self.smartgroups.iter().any(|g| g == name)
    }

    pub fn in_webgroup(&self, name: &str) -> bool {
        self.webgroups.iter().any(|g| g == name)
    }
}

/// What a plugin says of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No opinion: the decision so far stands.
    Abstain,
    /// Deny the flow (reason `plugin-denied`).
    Deny,
    /// Allow the flow: only effective where a rule delegates to the plugin
    /// (reason `plugin-allowed`).
    Allow,
}

/// Notes for the flow's audit record.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Notes(Vec<(String, String)>);

impl Notes {
    /// Adds `key: value` to the record's `annotations`.
    pub fn add(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.0.push((key.into(), value.into()));
    }

    pub fn iter(&self) -> impl Iterator<Item = &(String, String)> {
        self.0.iter()
    }
}

/// Gives `verdict` and `notes` to Sluice for the flow of `ctx`: the
/// verdict as `sluice.verdict.action`, each note as `sluice.audit.<key>`.
pub fn tell(ctx: &dyn Context, verdict: Verdict, notes: &Notes) {
    for (k, v) in notes.iter() {
        ctx.set_property(vec!["sluice", "audit", k], Some(v.as_bytes()));
    }
    let word: Option<&[u8]> = match verdict {
        Verdict::Abstain => None,
        Verdict::Deny => Some(b"deny"),
        Verdict::Allow => Some(b"allow"),
    };
    if let Some(word) = word {
        ctx.set_property(vec!["sluice", "verdict", "action"], Some(word));
    }
}

/// Gives `verdict` with the plugin's own words for it (`reason`: shown in
/// the audit record's `annotations.verdict_reason`).
pub fn tell_why(ctx: &dyn Context, verdict: Verdict, reason: &str, notes: &Notes) {
    if verdict != Verdict::Abstain {
        ctx.set_property(vec!["sluice", "verdict", "reason"], Some(reason.as_bytes()));
    }
    tell(ctx, verdict, notes);
}

/// A connection-level policy: configured once per instance, asked once per
/// flow when it is classified (before any byte is sent upstream).
pub trait ConnectionPolicy: 'static {
    /// The plugin's configuration (`config:` in `sluice.yaml`: a string as
    /// is, anything else as JSON). An error refuses the plugin, and with
    /// it the configuration that declares it.
    fn configure(&mut self, config: &[u8]) -> Result<(), String>;

    /// The plugin's word on `flow`. `ctx` reaches the rest of the ABI
    /// (shared data, metrics, the clock).
    fn decide(&mut self, flow: &Flow, notes: &mut Notes, ctx: &dyn Context) -> Verdict;
}

/// A counter in shared data that every instance of the plugin sees,
/// updated with compare-and-swap: the new count, or `None` if the host
/// kept refusing the update.
pub fn add_shared(ctx: &dyn Context, key: &str, delta: u64) -> Option<u64> {
    for _ in 0..16 {
        let (bytes, cas) = ctx.get_shared_data(key);
        let now = bytes
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map_or(0, u64::from_le_bytes)
            .saturating_add(delta);
        if ctx.set_shared_data(key, Some(&now.to_le_bytes()), cas).is_ok() {
            return Some(now);
        }
    }
    None
}

/// Adds `delta` to the count kept under `key` for `window` (a minute
/// number, say) and returns the new count: a count from an earlier window
/// starts again from zero, in the same key. Atomic across every instance
/// (compare-and-swap); `None` when it could not be written.
///
/// One key per counted thing, reused window after window, so the host's
/// shared data does not fill up with old windows (it holds a bounded
/// number of keys per plugin).
pub fn add_in_window(ctx: &dyn Context, key: &str, window: u64, delta: u64) -> Option<u64> {
    for _ in 0..16 {
        let (bytes, cas) = ctx.get_shared_data(key);
        let (stored_window, count) =
            bytes
                .and_then(|b| <[u8; 16]>::try_from(b.as_slice()).ok())
                .map_or((window, 0), |b| {
                    let mut w = [0u8; 8];
                    let mut c = [0u8; 8];
                    w.copy_from_slice(&b[..8]);
                    c.copy_from_slice(&b[8..]);
                    (u64::from_le_bytes(w), u64::from_le_bytes(c))
                });
        let now = if stored_window == window { count } else { 0 }.saturating_add(delta);
        let mut value = [0u8; 16];
        value[..8].copy_from_slice(&window.to_le_bytes());
        value[8..].copy_from_slice(&now.to_le_bytes());
        if ctx.set_shared_data(key, Some(&value), cas).is_ok() {
            return Some(now);
        }
    }
    None
}

/// The current time according to the host.
pub fn now(ctx: &dyn Context) -> SystemTime {
    ctx.get_current_time()
}

/// Seconds since the Unix epoch.
pub fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

#[doc(hidden)]
pub struct Root<P: ConnectionPolicy> {
    pub policy: std::rc::Rc<std::cell::RefCell<P>>,
}

impl<P: ConnectionPolicy> Context for Root<P> {}

impl<P: ConnectionPolicy> RootContext for Root<P> {
    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self.get_plugin_configuration().unwrap_or_default();
        match self.policy.borrow_mut().configure(&config) {
            Ok(()) => true,
            Err(e) => {
                let _ = proxy_wasm::hostcalls::log(
                    proxy_wasm::types::LogLevel::Error,
                    &format!("configuration refused: {e}"),
                );
                false
            }
        }
    }

    fn create_stream_context(&self, _id: u32) -> Option<Box<dyn StreamContext>> {
        Some(Box::new(Stream {
            policy: self.policy.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::StreamContext)
    }
}

#[doc(hidden)]
pub struct Stream<P: ConnectionPolicy> {
    policy: std::rc::Rc<std::cell::RefCell<P>>,
}

impl<P: ConnectionPolicy> Context for Stream<P> {}

impl<P: ConnectionPolicy> StreamContext for Stream<P> {
    fn on_new_connection(&mut self) -> Action {
        let flow = Flow::read(self);
        let mut notes = Notes::default();
        let verdict = self.policy.borrow_mut().decide(&flow, &mut notes, self);
        tell(self, verdict, &notes);
        Action::Continue
    }
}

/// Registers a [`ConnectionPolicy`] (made with `Default`) as the plugin's
/// root context.
#[macro_export]
macro_rules! connection_policy {
    ($policy:ty) => {
        $crate::proxy_wasm::main! {{
            $crate::proxy_wasm::set_log_level($crate::proxy_wasm::types::LogLevel::Info);
            $crate::proxy_wasm::set_root_context(|_| -> Box<dyn $crate::proxy_wasm::traits::RootContext> {
                Box::new($crate::Root {
                    policy: ::std::rc::Rc::new(::std::cell::RefCell::new(<$policy as ::std::default::Default>::default())),
                })
            });
        }}
    };
}
