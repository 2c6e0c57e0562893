//! Listeners: accept connections, classify them, ask the filter chain, and
//! forward or refuse. This is the data path of DESIGN.md end to end:
//!
//! ```text
//! accept (ConnLimit) ─► peek & classify (classify::) ─► chain filters (sluice.policy)
//!     ─► destination (cluster: CONNECT target / original dst / SNI / static)
//!     ─► on_destination filters (SSRF guard) ─► connect ─► replay peeked bytes
//!     ─► relay (splice) ─► on_close filters ─► audit record + metrics
//! ```
//!
//! `pipeline` runs it once for every listener kind, over the steps in
//! `flow`; `http_proxy` (explicit proxy) and `peek` (transparent, sni and
//! tcp) only build each flow's context and carry out how it ends, with the
//! answers `crate::edge` gives. `quic` does the same for QUIC on UDP, where
//! a flow is a 4-tuple and its first bytes are Initial packets.

pub mod chain;
mod exchange;
pub mod filter;
mod flow;
mod http_proxy;
mod peek;
mod pipeline;
mod quic;

pub use pipeline::Stop;
pub use quic::{bind as bind_quic, spawn as spawn_quic};

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use arc_swap::{ArcSwap, ArcSwapOption};
use sluice_api::Config;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use chain::{ChainMatch, Cluster, FilterChain, Front, ListenerPlan, ListenerResource, Transport, UnknownFilter};
pub use filter::{
    AntiEvasionFilter, DataStatus, Decision, FilterStatus, FlowContext, FlowExtras, HttpExchange, HttpFields,
    HttpPending, HttpStatus, LocalReply, NetworkFilter, PolicyFilter,
};
pub use http_proxy::Buffered;

use crate::dns::Bindings;
use crate::forward::{ConnLimit, Resolver};
use crate::policy::Policy;
use crate::telemetry::audit::{AuditRecord, AuditWriter};

/// Why a snapshot cannot be built from a checked configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Filter(#[from] UnknownFilter),
    #[error(transparent)]
    Plugin(#[from] crate::wasm::PluginLoadError),
}

/// Changes a listener's plan as a snapshot is built (see [`Snapshot::build`]).
pub type PlanHook = dyn Fn(&Config, &mut ListenerPlan) + Send + Sync;

/// One configuration, compiled: everything a flow or a query needs, its
/// listeners' plans (chains and clusters) and the policy among it.
/// Immutable; a flow keeps the one it started with, a reload swaps in a new
/// one, and the runtime binds, keeps or closes listeners to match it.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Config,
    pub policy: Policy,
    /// The TCP listeners' plans, in configuration order (DNS listeners are
    /// served by `dns`).
    listeners: Vec<Arc<ListenerPlan>>,
    /// The loaded plugins, started.
    pub plugins: crate::wasm::PluginSet,
    /// Rule names (then `default`, `builtin-guard`) shared without copying,
    /// for the DNS proxy's per-query verdicts.
    rule_labels: Vec<Arc<str>>,
    /// Unique over the life of the process (never reused, unlike an
    /// address): what per-thread caches of this snapshot's decisions are
    /// keyed by.
    serial: u64,
}

impl Snapshot {
    pub fn new(config: Config) -> Result<Self, SnapshotError> {
        Self::build(config, None)
    }

    /// Like [`Snapshot::new`], with `hook` given each listener's plan to
    /// change before it is shared (extra filters or chains: the plugin host,
    /// tests).
    pub fn build(config: Config, hook: Option<&PlanHook>) -> Result<Self, SnapshotError> {
        let plugins = crate::wasm::PluginSet::load(&config)?;
        let policy = Policy::compile(&config);
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let Some(plan) = ListenerPlan::from_config(l, &config, &plugins) else {
                continue;
            };
            let mut plan = plan?;
            if let Some(hook) = hook {
                hook(&config, &mut plan);
            }
            listeners.push(Arc::new(plan));
        }
        let mut rule_labels: Vec<Arc<str>> = config.policy.rules.iter().map(|r| Arc::from(r.name.as_str())).collect();
        rule_labels.push(Arc::from("default"));
        rule_labels.push(Arc::from("builtin-guard"));
        static SERIAL: AtomicU64 = AtomicU64::new(1);
        Ok(Self {
            config,
            policy,
            listeners,
            plugins,
            rule_labels,
            serial: SERIAL.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// The plan of TCP listener `name`, when this snapshot has one.
    pub fn plan(&self, name: &str) -> Option<&Arc<ListenerPlan>> {
        self.listeners.iter().find(|p| &*p.label == name)
    }

    /// Every TCP listener's plan.
    pub fn plans(&self) -> &[Arc<ListenerPlan>] {
        &self.listeners
    }

    /// See the field: distinct for every snapshot this process builds.
    pub fn serial(&self) -> u64 {
        self.serial
    }

    pub fn rule_label(&self, d: crate::policy::DecidedBy) -> Arc<str> {
        let n = self.config.policy.rules.len();
        let i = match d {
            crate::policy::DecidedBy::Rule(i) => i as usize,
            crate::policy::DecidedBy::Default => n,
            crate::policy::DecidedBy::BuiltinGuard => n + 1,
        };
        self.rule_labels.get(i).cloned().unwrap_or_else(|| Arc::from("?"))
    }
}

/// State every flow of every listener shares.
#[derive(Debug)]
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub audit: AuditWriter<AuditRecord>,
    /// Swapped by a reload that changes `resolver.nameservers`.
    pub resolver: ArcSwap<Resolver>,
    /// IP → name bindings from the DNS proxy's answers, when one runs
    /// (swapped by a reload that adds or removes DNS listeners).
    pub bindings: ArcSwapOption<Bindings>,
    next_id: AtomicU64,
    active: AtomicUsize,
    /// Becomes `true` when draining starts: idle keep-alive connections
    /// close instead of waiting for another request.
    stopping: watch::Sender<bool>,
    /// What relayed flows watch: a forced close, and each configuration
    /// installed. One channel, so an idle flow waits on one receiver.
    control: watch::Sender<Control>,
}

/// See [`Shared::force_close`] and [`Shared::install`].
#[derive(Debug, Clone, Copy, Default)]
struct Control {
    /// In-flight flows must end now (the drain time is over).
    forced: bool,
    /// Bumped by every install.
    generation: u64,
}

impl Shared {
    pub fn new(
        snapshot: Snapshot,
        audit: AuditWriter<AuditRecord>,
        resolver: Resolver,
        bindings: Option<Arc<Bindings>>,
    ) -> Self {
        Self {
            snapshot: ArcSwap::from_pointee(snapshot),
            audit,
            resolver: ArcSwap::from_pointee(resolver),
            bindings: ArcSwapOption::new(bindings),
            next_id: AtomicU64::new(1),
            active: AtomicUsize::new(0),
            stopping: watch::Sender::new(false),
            control: watch::Sender::new(Control::default()),
        }
    }

    /// The process is stopping: kept-alive connections finish the request
    /// in progress and close.
    pub fn begin_draining(&self) {
        self.stopping.send_replace(true);
    }

    /// Ends the flows of a listener that is gone, now that its drain time
    /// is over. Relayed flows learn it through the same channel as a new
    /// configuration (no waiter of their own, which an idle flow would pay
    /// for in memory).
    pub fn close_listener(&self, closing: &CancellationToken) {
        closing.cancel();
        self.control
            .send_modify(|c| c.generation = c.generation.wrapping_add(1));
    }

    /// How many configurations have been installed: what a listener that
    /// applies each one itself (a `quic` listener's socket options)
    /// reports back once it has.
    pub fn generation(&self) -> u64 {
        self.control.borrow().generation
    }

    /// Ends every flow still open now (when the drain time is over).
    pub fn force_close(&self) {
        self.control.send_modify(|c| c.forced = true);
    }

    /// Swaps in a new configuration. New flows use it at once; every
    /// relayed flow is checked against it and closed (and recorded) if it
    /// now denies the flow (DESIGN.md's continuous verification).
    pub fn install(&self, snapshot: Snapshot) {
        self.snapshot.store(Arc::new(snapshot));
        self.control
            .send_modify(|c| c.generation = c.generation.wrapping_add(1));
    }

    /// What ends a relayed flow from outside: resolves with `None` on a
    /// forced close or when its listener's drain is over (`closing`, see
    /// [`Shared::close_listener`]), or with the enforced denial that the first snapshot
    /// installed after the flow was decided gives it (a flow decided on an
    /// older snapshot than the current one is checked at once). Pending
    /// while every snapshot still lets it through.
    async fn relay_ends(&self, flow: &RelayedFlow<'_>) -> Option<Box<Decision>> {
        // Subscribe before comparing, so an install in between is seen.
        let mut control = self.control.subscribe();
        let mut seen = None;
        loop {
            let now = *control.borrow_and_update();
            if now.forced || flow.closing.is_cancelled() {
                return None;
            }
            let stale = match seen {
                None => !Arc::ptr_eq(&self.snapshot.load(), &flow.ctx.snapshot),
                Some(generation) => generation != now.generation,
            };
            seen = Some(now.generation);
            if stale && let Some(d) = flow.chain.denied_under(&self.snapshot.load_full(), flow.ctx, flow.dst) {
                return Some(Box::new(d));
            }
            if control.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    pub fn active_flows(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Resolves when flows must be torn down.
    async fn forced(&self) {
        let mut rx = self.control.subscribe();
        let _ = rx.wait_for(|c| c.forced).await;
    }

    /// Resolves when a snapshot without TCP listener `name` is installed
    /// (a reload removed it): its kept-alive connections then drain.
    async fn listener_gone(&self, name: &str) {
        let mut control = self.control.subscribe();
        loop {
            if self.snapshot.load().plan(name).is_none() {
                return;
            }
            if control.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Resolves when draining starts.
    async fn stopping(&self) {
        let mut rx = self.stopping.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }
}

/// What [`Shared::relay_ends`] re-checks a relayed flow with.
#[derive(Debug, Clone, Copy)]
struct RelayedFlow<'a> {
    chain: &'a FilterChain,
    ctx: &'a FlowContext,
    dst: std::net::IpAddr,
    /// Its listener's: cancelled when the listener is gone and drained.
    closing: &'a CancellationToken,
}

/// Counts a flow as active for draining, for as long as it lives.
struct ActiveGuard(Arc<Shared>);

impl ActiveGuard {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.active.fetch_add(1, Ordering::Relaxed);
        Self(shared.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Binds a TCP listener for `plan`. Transparent listeners also ask for
/// `IP_TRANSPARENT` (needed for TPROXY, not for REDIRECT; without the
/// capability the listener still serves REDIRECTed flows).
pub fn bind(plan: &ListenerPlan) -> io::Result<TcpListener> {
    let addr = plan.spec.address;
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit it on Linux (see `NoDelay`); best effort.
    let _ = socket.set_tcp_nodelay(true);
    if addr.is_ipv6() {
        // `[::]` takes IPv4 too, as users expect of a wildcard.
        let _ = socket.set_only_v6(false);
    }
    if plan.spec.transparent
        && let Err(e) = crate::sys::set_ip_transparent(&socket)
    {
        tracing::debug!(listener = %plan.spec.name, error = %e, "IP_TRANSPARENT not set; TPROXY flows will not arrive, REDIRECT still works");
    }
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Puts `TCP_NODELAY` on accepted sockets (the relay forwards whatever
/// arrives at once). Linux copies it from the listening socket into each
/// accepted one, so after the first connection shows it did, the
/// `setsockopt` is skipped: one system call less per connection.
#[derive(Debug, Default)]
struct NoDelay {
    inherited: Option<bool>,
}

impl NoDelay {
    fn apply(&mut self, stream: &TcpStream) {
        let inherited = *self.inherited.get_or_insert_with(|| stream.nodelay().unwrap_or(false));
        if !inherited {
            let _ = stream.set_nodelay(true);
        }
    }
}

/// Serves TCP listener `name` on `listener` until `stop` turns true; each
/// accepted connection runs on its own task, with the listener's plan from
/// the snapshot in force when it arrives (so a reload that changes the
/// listener's options reaches the next connection). At `max_connections`,
/// accepting pauses. `closing` is cancelled when the listener is gone and
/// its drain time is over: its flows then end.
pub fn spawn(
    name: Arc<str>,
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    closing: CancellationToken,
) -> JoinHandle<()> {
    let bound = listener.local_addr().ok();
    tokio::spawn(async move {
        let mut limit = ConnLimit::new(
            shared
                .snapshot
                .load()
                .plan(&name)
                .map_or(0, |p| p.connection().max_connections),
        );
        let mut nodelay = NoDelay::default();
        // One stop future for the listener's life: re-creating it per
        // accept registered and unregistered a watch waiter (a mutex round
        // each) for every connection. Polled first, so a flood of ready
        // connections cannot keep the loop from seeing it.
        let stopped = stop.wait_for(|v| *v);
        tokio::pin!(stopped);
        loop {
            let accepted = tokio::select! {
                biased;
                _ = &mut stopped => break,
                r = limit.accept(&listener) => r,
            };
            let (stream, peer, permit) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = %name, error = %e, "accept failed");
                    crate::telemetry::metrics::errors("accept", 1);
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let snapshot = shared.snapshot.load_full();
            // Between a reload that removed this listener and the stop
            // reaching this loop: not ours to serve any more.
            let Some(plan) = snapshot.plan(&name).cloned() else {
                continue;
            };
            if plan.connection().max_connections != limit.max() {
                limit.resize(plan.connection().max_connections);
            }
            nodelay.apply(&stream);
            // A span per flow only while debug logging is on: entering and
            // leaving a disabled span on every poll still showed in the
            // per-connection profile. The level can change at runtime; a
            // flow keeps what it started with.
            let span = tracing::enabled!(tracing::Level::DEBUG)
                .then(|| tracing::debug_span!("flow", listener = %name, src = %peer));
            let shared = shared.clone();
            let closing = closing.clone();
            let flow = async move {
                let _permit = permit;
                let _active = ActiveGuard::new(&shared);
                // Classifying, deciding and connecting run in a boxed
                // future that is freed before the relay starts, so an
                // idle relayed flow holds only the relay's state.
                let relaying = match plan.spec.front {
                    Front::HttpProxy { .. } => {
                        Box::pin(http_proxy::serve(plan, shared, snapshot, stream, peer, &closing)).await
                    }
                    Front::Inspect { .. } | Front::Raw => {
                        Box::pin(peek::serve(plan, shared, snapshot, stream, peer, bound)).await
                    }
                    // A `quic` listener binds UDP only (`bind_quic`); a TCP
                    // connection never reaches its plan.
                    Front::Quic { .. } => None,
                };
                if let Some(relaying) = relaying {
                    relaying.run(&closing).await;
                }
            };
            match span {
                Some(span) => drop(tokio::spawn(tracing::Instrument::instrument(flow, span))),
                None => drop(tokio::spawn(flow)),
            }
        }
    })
}

/// A spawned flow keeps its future's full size for its whole life, idle or
/// not: these bounds catch a change that makes every idle connection
/// heavier. Classification runs boxed and is freed before the relay, so
/// the relay stage is what an idle flow holds (measured with the pinned
/// toolchain: relay 544 B, `Relaying::run` 840 B with the re-check on
/// configuration changes; the transient
/// peek::serve 2144 B, http_proxy::serve 3944 B).
#[cfg(test)]
mod future_sizes {
    use super::*;
    #[test]
    fn flow_futures_stay_small() {
        fn size<F: std::future::Future>(_: &F) -> usize {
            std::mem::size_of::<F>()
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|_| unreachable!());
        rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .unwrap_or_else(|_| unreachable!());
            let a = l.local_addr().unwrap_or_else(|_| unreachable!());
            let c = tokio::net::TcpStream::connect(a)
                .await
                .unwrap_or_else(|_| unreachable!());
            let cfg = sluice_api::config::embedded_default().unwrap_or_else(|_| unreachable!());
            let plan = ListenerPlan::from_config(&cfg.listeners[0], &cfg, &crate::wasm::PluginSet::default())
                .unwrap_or_else(|| unreachable!());
            let plan = std::sync::Arc::new(plan.unwrap_or_else(|_| unreachable!()));
            let snap = std::sync::Arc::new(Snapshot::new(cfg.clone()).unwrap_or_else(|_| unreachable!()));
            let shared = std::sync::Arc::new(Shared::new(
                Snapshot::new(cfg).unwrap_or_else(|_| unreachable!()),
                AuditWriter::start(crate::telemetry::audit::AuditSink::Stderr, 16).unwrap_or_else(|_| unreachable!()),
                crate::forward::Resolver::system().unwrap_or_else(|_| unreachable!()),
                None,
            ));
            let c2 = tokio::net::TcpStream::connect(a)
                .await
                .unwrap_or_else(|_| unreachable!());
            let c3 = tokio::net::TcpStream::connect(a)
                .await
                .unwrap_or_else(|_| unreachable!());
            let opts = crate::forward::RelayOptions::default();
            let rf = crate::forward::relay_until(c2, c3, &opts, shared.forced());
            assert!(size(&rf) <= 640, "relay_until future: {} bytes", size(&rf));
            drop(rf);
            // What an idle relayed flow's task holds: the relay stage alone.
            fn output_size2<A, B, F>(_: fn(A, B) -> F) -> usize {
                std::mem::size_of::<F>()
            }
            let run = output_size2(flow::Relaying::run);
            eprintln!("Relaying::run future: {run} bytes");
            assert!(run <= 896, "Relaying::run future: {run} bytes");
            let f = peek::serve(plan.clone(), shared.clone(), snap.clone(), c, a, None);
            assert!(size(&f) <= 2560, "peek::serve future: {} bytes", size(&f));
            let c = tokio::net::TcpStream::connect(a)
                .await
                .unwrap_or_else(|_| unreachable!());
            let closing = CancellationToken::new();
            let f = http_proxy::serve(plan, shared, snap, c, a, &closing);
            assert!(size(&f) <= 4352, "http_proxy::serve future: {} bytes", size(&f));
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
mod nodelay {
    use super::*;

    async fn accepted(listener: &TcpListener) -> TcpStream {
        let addr = listener.local_addr().unwrap();
        let (_client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        accepted.unwrap().0
    }

    #[tokio::test]
    async fn accepted_sockets_get_nodelay_from_the_listener_or_a_setsockopt() {
        let cfg = sluice_api::config::load_str(
            "listeners:\n  - {name: t, kind: sni, address: 127.0.0.1:0, upstream_port: 443}\n",
            "t.yaml",
        )
        .unwrap();
        let plan = ListenerPlan::from_config(&cfg.listeners[0], &cfg, &crate::wasm::PluginSet::default())
            .unwrap()
            .unwrap();
        let listener = bind(&plan).unwrap();
        let mut state = NoDelay::default();
        for _ in 0..3 {
            let s = accepted(&listener).await;
            state.apply(&s);
            assert!(s.nodelay().unwrap());
        }
        // This kernel copies the option into accepted sockets, which is what
        // lets `apply` skip the call from the second connection on.
        #[cfg(target_os = "linux")]
        assert_eq!(state.inherited, Some(true));

        // A listener without the option: every accepted socket gets the call.
        let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut state = NoDelay::default();
        for _ in 0..2 {
            let s = accepted(&plain).await;
            assert!(!s.nodelay().unwrap());
            state.apply(&s);
            assert!(s.nodelay().unwrap());
        }
        assert_eq!(state.inherited, Some(false));
    }
}
