//! The steps the pipeline (`pipeline`) is made of: run the chain's filters
//! by the override rules, resolve and screen destinations, connect, replay
//! what was peeked, relay, and write the one audit record.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::Shared;
use super::chain::FilterChain;
use super::filter::{DataStatus, Decision, FilterStatus, FlowContext};
use super::pipeline::{Flow, Forward, Stop};
use crate::forward::{ConnectOptions, RelayOptions, ResolveError, connect_sending, parse_ip_lenient, relay_until};
use crate::policy::decision::{overrides, tightens};
use crate::telemetry::audit::FlowRecord;
use crate::telemetry::metrics;

/// Runs `on_classified` of every filter in chain order, applying what each
/// says by the override rules ([`apply`]); a filter that pauses is awaited.
pub async fn classified(chain: &FilterChain, ctx: &mut FlowContext) {
    for (i, f) in chain.filters.iter().enumerate() {
        let mut status = f.on_classified(ctx, i);
        while let FilterStatus::Pause(pending) = status {
            status = pending.await;
        }
        apply(ctx, f.name(), status);
    }
}

/// Applies one filter's word to the flow's verdict (the rules are in the
/// `filter` module's documentation): the first decision stands unless
/// `filter` tightens it, or loosens a rule's denial that the rule
/// delegates to `filter` by name.
pub fn apply(ctx: &mut FlowContext, filter: &str, status: FilterStatus) {
    let (new, loosening) = match status {
        FilterStatus::Continue | FilterStatus::Pause(_) => return,
        FilterStatus::Deny(d) => (d, false),
        FilterStatus::Allow(d) => (d, true),
    };
    let new = new.in_mode(ctx.snapshot.policy.mode());
    let Some(current) = &ctx.decision else {
        ctx.decision = Some(new);
        return;
    };
    let delegates = |s| ctx.snapshot.policy.delegates(s).iter().any(|d| &**d == filter);
    let change = overrides(current, &new, loosening, delegates);
    if change {
        ctx.extras_mut().changed_by.push(Arc::from(filter));
        ctx.decision = Some(new);
    }
}

/// Records a denial where enforce mode would have stopped at it: the first
/// denial stands, except that one carried out replaces one only watched.
/// In watch mode every check is watched, so the record names the same
/// check and reason that enforce mode would have refused the flow with.
pub fn deny(ctx: &mut FlowContext, d: Decision) {
    let d = d.in_mode(ctx.snapshot.policy.mode());
    let replace = ctx.decision.as_ref().is_none_or(|existing| tightens(existing, &d));
    if replace {
        ctx.decision = Some(d);
    }
}

/// Resolves a host: an IP literal (in any spelling) as itself, then the
/// config's static `resolver.hosts`, then DNS.
pub async fn resolve(shared: &Shared, ctx: &FlowContext, host: &str) -> Result<Vec<IpAddr>, ResolveError> {
    if let Some(ip) = parse_ip_lenient(host) {
        return Ok(vec![ip]);
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    // Names from the flow are canonical already: lowercase only when not.
    let key = if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    };
    if let Some(ips) = ctx.snapshot.config.resolver.hosts.get(&*key) {
        return Ok(ips.clone());
    }
    // Held for the lookup: a reload may swap the resolver meanwhile.
    let resolver = shared.resolver.load_full();
    resolver.resolve(host).await
}

/// Runs `on_destination` for every candidate address. Returns those the
/// chain lets through; an enforced denial removes an address, a watched one
/// is recorded and keeps it. With nothing left, the flow's decision is the
/// first denial.
pub fn screen(chain: &FilterChain, ctx: &mut FlowContext, addrs: &[IpAddr]) -> Vec<IpAddr> {
    let mut ok = Vec::with_capacity(addrs.len());
    let mut first_denial: Option<Decision> = None;
    for ip in addrs {
        let mut denied = None;
        for f in &chain.filters {
            if let FilterStatus::Deny(d) = f.on_destination(ctx, *ip) {
                denied = Some(d.in_mode(ctx.snapshot.policy.mode()));
                break;
            }
        }
        match denied {
            Some(d) if d.blocks() => {
                first_denial.get_or_insert(d);
            }
            Some(d) => {
                // Watched: let it through, but the record says it would
                // have been denied (unless an earlier denial already does).
                deny(ctx, d);
                ok.push(*ip);
            }
            None => ok.push(*ip),
        }
    }
    if ok.is_empty()
        && let Some(d) = first_denial
    {
        ctx.decision = Some(d);
    }
    ok
}

/// An allowed flow, connected, its peeked bytes replayed: all that is left
/// is to relay it and write its record ([`Relaying::run`]).
///
/// Flows get here through boxed futures that are freed before the relay
/// starts, and what the record needs afterwards waits in one box: a task
/// keeps the size of its largest state for its whole life, and an idle
/// relayed flow should cost the relay's state, not the classifier's.
#[derive(Debug)]
pub struct Relaying {
    client: TcpStream,
    upstream: TcpStream,
    shared: Arc<Shared>,
    /// `None`: the flow may idle forever (an Envoy `tcp_proxy` with
    /// `idle_timeout: 0s`).
    idle_timeout: Option<std::time::Duration>,
    tail: Box<Tail>,
}

/// Why a relayed flow was ended from outside its two sockets.
#[derive(Debug)]
enum Ended {
    /// A data hook or a new configuration denied it: the denial.
    Denied(Box<Decision>),
    /// It reached its chain's maximum age.
    Aged,
}

/// An idle timer that never fires in practice.
const FOREVER: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

/// What the record needs once the relay is over.
#[derive(Debug)]
struct Tail {
    flow: Flow,
    chain: Arc<FilterChain>,
    dst: SocketAddr,
    replayed: u64,
    _active: metrics::ActiveFlow,
    /// Counts the flow on its endpoint while it lasts (least request).
    _endpoint: Option<crate::forward::balance::ActiveGuard>,
}

/// Connects an allowed flow to `fwd`'s addresses and replays `replay`. A
/// flow that stops here (a data hook closes it on its first bytes, the
/// connect fails) has its record written, and `None` is returned.
pub async fn connect_and_replay(
    shared: Arc<Shared>,
    mut flow: Flow,
    fwd: Forward,
    client: TcpStream,
    replay: Vec<u8>,
    active: metrics::ActiveFlow,
) -> Option<Relaying> {
    let Forward { chain, addrs } = fwd;
    // A filter that reads the flow sees its first bytes too, before any
    // of them leaves.
    if chain.inspects_data {
        let ctx = &mut flow.ctx;
        let mut extras = ctx.extras.take().unwrap_or_default();
        let closed = inspect(&chain, ctx, &mut extras, &replay, true);
        ctx.extras = Some(extras);
        if let Some(d) = closed {
            ctx.decision = Some(d);
            flow.end(&shared, Stop::Refused);
            return None;
        }
    }
    let (connect_timeout, idle_timeout) = chain.timeouts(flow.ctx.plan.connection());
    let opts = ConnectOptions {
        timeout: connect_timeout,
        ..ConnectOptions::default()
    };
    let started = Instant::now();
    let (mut upstream, dst, sent) = match connect_sending(&addrs, &opts, &replay).await {
        Ok((c, sent)) => {
            metrics::connect_latency("ok", started.elapsed());
            (c.stream, c.addr, sent)
        }
        Err(e) => {
            metrics::connect_latency(e.reason_code(), started.elapsed());
            let stop = Stop::Failed {
                reason: e.reason_code(),
                dst: addrs.first().copied(),
            };
            flow.end(&shared, stop);
            return None;
        }
    };
    if let Some(rest) = replay.get(sent..)
        && !rest.is_empty()
        && let Err(e) = upstream.write_all(rest).await
    {
        tracing::debug!(flow = flow.ctx.id, error = %e, "replaying peeked bytes failed");
        let stop = Stop::Failed {
            reason: "upstream-error",
            dst: Some(dst),
        };
        flow.end(&shared, stop);
        return None;
    }
    Some(Relaying {
        client,
        upstream,
        shared,
        idle_timeout,
        tail: Box::new(Tail {
            _endpoint: chain.balancer.as_ref().and_then(|b| b.track(dst)),
            flow,
            chain,
            dst,
            replayed: replay.len() as u64,
            _active: active,
        }),
    })
}

impl Relaying {
    /// Relays until the flow ends (or `closing` is cancelled: its listener
    /// is gone and the drain time is over), then writes its record.
    pub async fn run(self, closing: &tokio_util::sync::CancellationToken) {
        let Self {
            client,
            upstream,
            shared,
            idle_timeout,
            tail,
        } = self;
        let opts = RelayOptions {
            idle_timeout,
            ..RelayOptions::default()
        };
        let mut tail = tail;
        // The data hooks' mutable part, out of the context while the
        // re-check below reads it.
        let mut extras = if tail.chain.inspects_data {
            Some(tail.flow.ctx.extras.take().unwrap_or_default())
        } else {
            None
        };
        // Ends the relay on a forced shutdown, or when a newly installed
        // configuration denies the flow (its denial kept for the record).
        let revoked = std::sync::OnceLock::new();
        let cancel = async {
            let flow = super::RelayedFlow {
                chain: &tail.chain,
                ctx: &tail.flow.ctx,
                dst: tail.dst.ip(),
                closing,
            };
            let ends = shared.relay_ends(&flow);
            let ended = match tail.chain.upstream.and_then(|u| u.max_duration) {
                None => ends.await.map(Ended::Denied),
                // Boxed: only flows with a maximum age pay for the timer.
                Some(age) => {
                    let at = tokio::time::Instant::from_std(tail.flow.accepted) + age;
                    Box::pin(async move {
                        tokio::select! {
                            d = ends => d.map(Ended::Denied),
                            () = tokio::time::sleep_until(at) => Some(Ended::Aged),
                        }
                    })
                    .await
                }
            };
            if let Some(e) = ended {
                let _ = revoked.set(e);
            }
        };
        let stats = match extras.as_mut() {
            // Boxed: a flow without data hooks never pays for this state.
            Some(extras) => {
                Box::pin(relay_inspected(
                    client,
                    upstream,
                    idle_timeout,
                    &tail,
                    extras,
                    &revoked,
                    cancel,
                ))
                .await
            }
            None => relay_until(client, upstream, &opts, cancel).await,
        };
        if let Some(extras) = extras {
            tail.flow.ctx.extras = Some(extras);
        }
        let Tail {
            flow,
            dst,
            replayed,
            _active,
            ..
        } = *tail;
        let mut rec = flow.record_to(dst);
        rec.bytes_up = replayed + stats.bytes_up;
        rec.bytes_down = stats.bytes_down;
        rec.close_reason = Cow::Borrowed(stats.reason.as_str());
        match revoked.into_inner() {
            Some(Ended::Denied(d)) => {
                tracing::debug!(flow = flow.ctx.id, reason = %d.reason, "closed: the new configuration denies it");
                rec.verdict = (&*d).into();
                rec.close_reason = Cow::Borrowed("policy-revoked");
            }
            Some(Ended::Aged) => rec.close_reason = Cow::Borrowed("max-duration"),
            None => {}
        }
        flow.write(&shared, rec);
    }
}

/// Completes and writes the record: duration, `on_close` hooks, metrics.
pub fn finish(shared: &Shared, chain: Option<&FilterChain>, ctx: &FlowContext, mut rec: FlowRecord, accepted: Instant) {
    let lived = accepted.elapsed();
    rec.duration_ms = lived.as_millis() as u64;
    // `time` is when the flow was accepted (`time` + `duration_ms` is when
    // it ended): the wall clock now, less the monotonic time it lived.
    let now = std::time::SystemTime::now();
    rec.time = crate::telemetry::audit::rfc3339(now.checked_sub(lived).unwrap_or(now));
    if let Some(chain) = chain {
        for f in &chain.filters {
            f.on_close(ctx, &mut rec);
        }
    }
    let action = if rec.verdict.action == crate::telemetry::audit::Action::Allow {
        "allow"
    } else {
        "deny"
    };
    metrics::flow_finished(ctx.listener(), action, &rec.verdict.rule, &rec.verdict.reason);
    ctx.plan.metrics.relayed(rec.bytes_up, rec.bytes_down);
    let close = close_reason_static(&rec);
    metrics::flow_closed(ctx.listener(), close);
    if let Some(kind) = metrics::error_kind(close) {
        metrics::errors(kind, 1);
    }
    tracing::debug!(flow = ctx.id, listener = %ctx.listener(), action, reason = %rec.verdict.reason, close = %rec.close_reason, "flow finished");
    shared
        .audit
        .record(crate::telemetry::audit::AuditRecord::Flow(Box::new(rec)));
}

/// Metrics labels must be `'static`; close reasons are.
/// Takes the record rather than `&Cow`, which clippy's `ptr_arg` flags
/// although the variant is the point here.
fn close_reason_static(rec: &FlowRecord) -> &'static str {
    match &rec.close_reason {
        Cow::Borrowed(s) => s,
        Cow::Owned(_) => "other",
    }
}

/// Runs the chain's data hooks over `data` (`downstream`: from the client).
/// Returns the decision that closes the flow: the first enforced `Close`;
/// a watched one is noted (`changed_by`) and the bytes go on.
fn inspect(
    chain: &FilterChain,
    ctx: &FlowContext,
    extras: &mut super::filter::FlowExtras,
    data: &[u8],
    downstream: bool,
) -> Option<Decision> {
    if data.is_empty() {
        return None;
    }
    for (i, f) in chain.filters.iter().enumerate() {
        if !f.wants_data() {
            continue;
        }
        let status = if downstream {
            f.on_downstream_data(ctx, extras, i, data)
        } else {
            f.on_upstream_data(ctx, extras, i, data)
        };
        if let DataStatus::Close(d) = status {
            let d = d.in_mode(ctx.snapshot.policy.mode());
            extras.changed_by.push(Arc::from(f.name()));
            if d.blocks() {
                return Some(d);
            }
        }
    }
    None
}

/// The relay for a chain whose filters read the flow: a copy loop that
/// shows every chunk to the data hooks before passing it on. Half-closes
/// are passed on; the flow ends when both directions have, on the idle
/// timeout, on `cancel`, or when a hook closes it (its decision is put in
/// `revoked` for the record).
async fn relay_inspected<C: std::future::Future<Output = ()>>(
    client: TcpStream,
    upstream: TcpStream,
    idle: Option<std::time::Duration>,
    tail: &Tail,
    extras: &mut super::filter::FlowExtras,
    revoked: &std::sync::OnceLock<Ended>,
    cancel: C,
) -> crate::forward::RelayStats {
    use crate::forward::{CloseReason, RelayMode, RelayStats};
    use tokio::io::AsyncReadExt;
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let mut stats = RelayStats {
        bytes_up: 0,
        bytes_down: 0,
        reason: CloseReason::ClientClosed,
        mode: RelayMode::Copy,
        error: None,
    };
    let (mut up_buf, mut down_buf) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
    let (mut up_open, mut down_open) = (true, true);
    let mut first_eof: Option<CloseReason> = None;
    tokio::pin!(cancel);
    while up_open || down_open {
        let idle_timer = tokio::time::sleep(idle.unwrap_or(FOREVER));
        tokio::select! {
            () = &mut cancel => {
                stats.reason = CloseReason::Cancelled;
                return stats;
            }
            () = idle_timer => {
                stats.reason = CloseReason::IdleTimeout;
                return stats;
            }
            r = cr.read(&mut up_buf), if up_open => match r {
                Ok(0) => {
                    up_open = false;
                    first_eof.get_or_insert(CloseReason::ClientClosed);
                    let _ = uw.shutdown().await;
                }
                Ok(n) => {
                    let chunk = up_buf.get(..n).unwrap_or_default();
                    if let Some(d) = inspect(&tail.chain, &tail.flow.ctx, extras, chunk, true) {
                        let _ = revoked.set(Ended::Denied(Box::new(d)));
                        stats.reason = CloseReason::Cancelled;
                        return stats;
                    }
                    if let Err(e) = uw.write_all(chunk).await {
                        stats.reason = CloseReason::UpstreamError;
                        stats.error = Some(e);
                        return stats;
                    }
                    stats.bytes_up += n as u64;
                }
                Err(e) => {
                    stats.reason = CloseReason::ClientError;
                    stats.error = Some(e);
                    return stats;
                }
            },
            r = ur.read(&mut down_buf), if down_open => match r {
                Ok(0) => {
                    down_open = false;
                    first_eof.get_or_insert(CloseReason::UpstreamClosed);
                    let _ = cw.shutdown().await;
                }
                Ok(n) => {
                    let chunk = down_buf.get(..n).unwrap_or_default();
                    if let Some(d) = inspect(&tail.chain, &tail.flow.ctx, extras, chunk, false) {
                        let _ = revoked.set(Ended::Denied(Box::new(d)));
                        stats.reason = CloseReason::Cancelled;
                        return stats;
                    }
                    if let Err(e) = cw.write_all(chunk).await {
                        stats.reason = CloseReason::ClientError;
                        stats.error = Some(e);
                        return stats;
                    }
                    stats.bytes_down += n as u64;
                }
                Err(e) => {
                    stats.reason = CloseReason::UpstreamError;
                    stats.error = Some(e);
                    return stats;
                }
            },
        }
    }
    stats.reason = first_eof.unwrap_or(CloseReason::ClientClosed);
    stats
}
