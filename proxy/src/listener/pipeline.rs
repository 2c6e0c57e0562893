//! The one pipeline every TCP flow goes through, whatever its listener:
//!
//! ```text
//! accept ─► front: the listener kind builds the context (peek and classify,
//!           or read the CONNECT / request head)
//!        ─► identify: a DNS binding names an address-only flow
//!        ─► choose the chain (server name, port, prefixes, transport);
//!           its cluster fixes the port (and a static destination)
//!        ─► filters: on_classified (anti-evasion, policy, plugins)
//!        ─► destination: the cluster's candidate addresses
//!        ─► screen: on_destination for each address (the guard)
//!        ─► connect ─► replay ─► relay ─► finish (on_close, metrics, record)
//! ```
//!
//! Each stage answers `Result<_, Stop>`: a flow either goes on or stops,
//! refused (its decision says by whom and why) or failed (allowed, but not
//! forwarded: a close reason). A listener kind only builds the flow's
//! context and carries out the outcome — `peek` closes the connection,
//! `http_proxy` answers with what [`crate::edge::answer`] gives — and the
//! record of every flow, stopped or relayed, is written by [`Flow`].

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use sluice_api::reason::ReasonCode;
use sluice_api::{DomainName, Enforcement, SniCheck};

use super::chain::{ChainInput, Cluster, FilterChain, Transport};
use super::filter::{Decision, FlowContext};
use super::flow::{self, deny};
use super::{ListenerPlan, Shared, Snapshot};
use crate::telemetry::audit::FlowRecord;

/// Why a flow ends without being relayed: the outcome of a stage that did
/// not let it go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Refused: the flow's decision names the rule and the reason (no
    /// decision at all is refused as `no-decision`).
    Refused,
    /// Allowed, but it could not be forwarded: the close reason
    /// (`dns-nxdomain`, `connect-refused`, …) and the address tried.
    Failed {
        reason: &'static str,
        dst: Option<SocketAddr>,
    },
}

impl Stop {
    pub fn failed(reason: &'static str) -> Self {
        Self::Failed { reason, dst: None }
    }
}

/// An allowed flow's way out: the chain that decided it and the addresses
/// to dial, in order.
#[derive(Debug)]
pub struct Forward {
    pub chain: Arc<FilterChain>,
    pub addrs: Vec<SocketAddr>,
}

/// A flow on its way through the pipeline: its context (with the chain once
/// one is chosen), and when it was accepted.
#[derive(Debug)]
pub struct Flow {
    pub ctx: FlowContext,
    pub accepted: Instant,
}

impl Flow {
    pub fn new(
        shared: &Shared,
        plan: &Arc<ListenerPlan>,
        peer: SocketAddr,
        snap: Arc<Snapshot>,
        accepted: Instant,
    ) -> Self {
        Self {
            ctx: FlowContext::new(shared.next_id(), plan, peer, snap),
            accepted,
        }
    }

    /// A refusal by the listener itself, before any filter: carried out in
    /// every mode.
    pub fn refuse(&mut self, reason: ReasonCode) -> Stop {
        deny(&mut self.ctx, Decision::refused(reason));
        Stop::Refused
    }

    /// Stops a flow whose decision so far is a denial that is carried out.
    fn go_on(&self) -> Result<(), Stop> {
        match &self.ctx.decision {
            Some(d) if d.blocks() => Err(Stop::Refused),
            _ => Ok(()),
        }
    }

    /// Runs the pipeline from what the front learned to the addresses to
    /// dial: identify, choose the chain, filters, destination, screen.
    /// `local` is the listener's bound address, where the front knows it
    /// (what a client that was not redirected dialled).
    pub async fn decide(
        &mut self,
        shared: &Shared,
        transport: Transport,
        local: Option<SocketAddr>,
    ) -> Result<Forward, Stop> {
        self.go_on()?;
        self.identify(shared);
        let chain = self.choose(transport, local)?;
        // A flow that names nothing, to a cluster of endpoints, is judged
        // on the endpoint it would reach: picked first.
        let picked = match &chain.balancer {
            Some(_) if self.ctx.name.is_none() && self.ctx.dst_ip.is_none() => {
                let picked = self.destination(shared, &chain).await?;
                if let Some(a) = picked.first() {
                    self.ctx.dst_ip = Some(a.ip());
                    self.ctx.port = a.port();
                }
                Some(picked)
            }
            _ => None,
        };
        self.judge(&chain).await?;
        let candidates = match picked {
            Some(p) => p,
            None => self.destination(shared, &chain).await?,
        };
        let addrs = self.screen(&chain, &candidates)?;
        Ok(Forward { chain, addrs })
    }

    /// Decides again on the chain and addresses already chosen, once the
    /// flow has shown more (the inside of a `CONNECT` tunnel).
    pub async fn decide_again(&mut self, fwd: Forward) -> Result<Forward, Stop> {
        self.go_on()?;
        self.judge(&fwd.chain).await?;
        // Screened again: the decision above may have replaced a watched
        // guard denial that the record must keep.
        let addrs = self.screen(&fwd.chain, &fwd.addrs)?;
        Ok(Forward {
            chain: fwd.chain,
            addrs,
        })
    }

    /// An address-only flow (opaque TCP, TLS without SNI) gets the name the
    /// DNS proxy answered this client with for that address, so WebGroup
    /// rules apply to it too.
    fn identify(&mut self, shared: &Shared) {
        let ctx = &mut self.ctx;
        let (None, Some(orig)) = (&ctx.name, ctx.original_dst) else {
            return;
        };
        let bindings = shared.bindings.load();
        if let Some(b) = &*bindings
            && let Some(name) = b.lookup(ctx.src.ip(), orig.ip(), now())
        {
            ctx.name = Some(name);
            ctx.name_from_dns = true;
        }
    }

    /// Picks the chain on what the flow showed; its cluster then fixes the
    /// port, and for a static upstream the destination decided on.
    fn choose(&mut self, transport: Transport, local: Option<SocketAddr>) -> Result<Arc<FilterChain>, Stop> {
        let ctx = &mut self.ctx;
        // What the client dialled: before a redirect, or the listener.
        let dialled = ctx.original_dst.or(local);
        let dst = ctx.dst_ip.or(dialled.map(|a| a.ip())).filter(|ip| !ip.is_unspecified());
        // Envoy's server name is the SNI only (not a Host header, not a
        // name the DNS proxy bound to the address).
        let server_name = ctx.name.as_ref().filter(|_| ctx.sni.is_some() && !ctx.name_from_dns);
        let input = ChainInput {
            server_name,
            port: dialled.map_or(ctx.port, |a| a.port()),
            src: ctx.src.ip(),
            src_port: ctx.src.port(),
            dst,
            transport,
            alpn: &ctx.alpn,
        };
        let Some(chain) = ctx.plan.chain(&input).cloned() else {
            return Err(self.refuse(ReasonCode::NoFilterChain));
        };
        match &chain.cluster {
            // A fixed upstream: decided on its port, and its name or address.
            Cluster::Static { upstream } => {
                ctx.port = upstream.port;
                match crate::forward::parse_ip_lenient(&upstream.host) {
                    Some(ip) => ctx.dst_ip = Some(ip),
                    None => match DomainName::parse(&upstream.host) {
                        Ok(n) => ctx.name = Some(n),
                        Err(_) => deny(ctx, Decision::refused(ReasonCode::BadUpstream)),
                    },
                }
            }
            Cluster::SniDynamic { port } => ctx.port = *port,
            // Decided on the name the flow showed and the port it dialled
            // (the endpoints are screened once picked), or on the endpoint
            // picked for a flow without one.
            Cluster::Balanced(_) => ctx.port = input.port,
            Cluster::OriginalDst { .. } | Cluster::RequestTarget => {}
        }
        let verify = matches!(
            chain.cluster,
            Cluster::OriginalDst {
                sni_check: SniCheck::Verify
            }
        ) && !ctx.name_from_dns;
        if ctx.name.is_none() || !verify {
            // Address-only flows (and `sni_check: off`) are decided on the
            // address the client dialled.
            ctx.dst_ip = ctx.dst_ip.or(ctx.original_dst.map(|a| a.ip()));
        }
        ctx.chain = Some(chain.clone());
        Ok(chain)
    }

    /// The chain's filters, on what the flow showed: the anti-evasion
    /// checks, the policy, then any other filter.
    async fn judge(&mut self, chain: &FilterChain) -> Result<(), Stop> {
        flow::classified(chain, &mut self.ctx).await;
        match &self.ctx.decision {
            Some(d) if !d.blocks() => Ok(()),
            _ => Err(Stop::Refused),
        }
    }

    /// The cluster's candidate addresses, in the order to try them.
    async fn destination(&mut self, shared: &Shared, chain: &FilterChain) -> Result<Vec<SocketAddr>, Stop> {
        let ctx = &mut self.ctx;
        if let Some(b) = &chain.balancer {
            let attempts = chain.upstream.map_or(1, |u| u.max_connect_attempts);
            let ctx = &*ctx;
            return b
                .pick(attempts, |host| async move {
                    resolve(shared, ctx, &host).await.map_err(|stop| match stop {
                        Stop::Failed { reason, .. } => reason,
                        Stop::Refused => "dns-error",
                    })
                })
                .await
                .map_err(|e| Stop::failed(e.reason_code()));
        }
        let (ips, port, check) = match &chain.cluster {
            Cluster::RequestTarget => {
                let ips = match (&ctx.connect_target, &ctx.name, ctx.dst_ip) {
                    (Some(_), Some(name), _) => resolve(shared, ctx, name.as_str()).await?,
                    (Some(_), None, Some(ip)) => vec![ip],
                    _ => return Err(Stop::failed("no-destination")),
                };
                (ips, ctx.port, None)
            }
            Cluster::SniDynamic { port } => {
                let name = ctx.name.as_ref().map(DomainName::as_str).unwrap_or_default();
                (resolve(shared, ctx, name).await?, *port, None)
            }
            Cluster::Static { upstream } => (resolve(shared, ctx, &upstream.host).await?, upstream.port, None),
            Cluster::OriginalDst { sni_check } => original_destination(shared, ctx, *sni_check).await?,
            Cluster::Balanced(b) => return Err(Stop::failed(no_balancer(&b.name))),
        };
        if let Some(d) = ctx.decision.as_mut() {
            d.check = check;
        }
        Ok(ips.into_iter().map(|ip| SocketAddr::new(ip, port)).collect())
    }

    /// `on_destination` for every candidate; stops the flow when the chain
    /// lets none through.
    fn screen(&mut self, chain: &FilterChain, candidates: &[SocketAddr]) -> Result<Vec<SocketAddr>, Stop> {
        let ips: Vec<IpAddr> = candidates.iter().map(SocketAddr::ip).collect();
        let ips = flow::screen(chain, &mut self.ctx, &ips);
        if ips.is_empty() {
            return Err(Stop::Refused);
        }
        Ok(candidates.iter().copied().filter(|a| ips.contains(&a.ip())).collect())
    }

    /// The record of a flow relayed to (or last sent to) `dst`.
    pub fn record_to(&self, dst: SocketAddr) -> FlowRecord {
        let mut rec = FlowRecord::of_flow(&self.ctx);
        rec.dst = Some(dst);
        rec.dst_groups = self
            .ctx
            .snapshot
            .policy
            .smartgroups_of(dst.ip())
            .into_iter()
            .map(str::to_owned)
            .collect();
        rec
    }

    /// Writes the record of a flow that stopped before it was relayed.
    pub fn end(self, shared: &Shared, stop: Stop) {
        let mut rec = FlowRecord::of_flow(&self.ctx);
        match stop {
            Stop::Refused => rec.close_reason = Cow::Borrowed("denied"),
            Stop::Failed { reason, dst } => {
                rec.close_reason = Cow::Borrowed(reason);
                rec.dst = dst;
            }
        }
        self.write(shared, rec);
    }

    /// Completes and writes `rec`: duration, `on_close`, metrics.
    pub fn write(&self, shared: &Shared, rec: FlowRecord) {
        flow::finish(shared, self.ctx.chain.as_deref(), &self.ctx, rec, self.accepted);
    }
}

/// A balanced cluster always has its balancer (made with its chain); the
/// close reason if that ever failed to hold.
fn no_balancer(cluster: &str) -> &'static str {
    tracing::error!(cluster, "a balanced cluster without its balancer");
    "no-healthy-upstream"
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Resolves `host` for the flow; a failure stops it with its close reason.
async fn resolve(shared: &Shared, ctx: &FlowContext, host: &str) -> Result<Vec<IpAddr>, Stop> {
    // Boxed: a lookup's state is paid for only by the flows that wait on one.
    Box::pin(flow::resolve(shared, ctx, host))
        .await
        .map_err(|e| Stop::failed(e.reason_code()))
}

/// Where a redirected flow goes: the address the client dialled, held
/// against its name per `sni_check`. With DNS bindings for the client, the
/// address must be one the DNS proxy answered for the name; without, the
/// name is resolved and an address that is not among its own is replaced
/// by them, so an allowed SNI sent to an attacker's IP never reaches it.
async fn original_destination(
    shared: &Shared,
    ctx: &mut FlowContext,
    sni_check: SniCheck,
) -> Result<(Vec<IpAddr>, u16, Option<&'static str>), Stop> {
    let Some(orig) = ctx.original_dst else {
        return Err(Stop::failed("no-original-destination"));
    };
    let dialled = || vec![orig.ip()];
    let peer = ctx.src.ip();
    let now = now();
    match (&ctx.name, sni_check) {
        (Some(name), SniCheck::Verify) if !ctx.name_from_dns => {
            // Held for the check only: bindings are swapped by reloads.
            let bindings = shared.bindings.load_full();
            match bindings.as_ref().filter(|b| b.has_bindings_for_source(peer, now)) {
                Some(b) => {
                    if !b.is_bound(peer, orig.ip(), name, now) {
                        let mut d = Decision::check(ReasonCode::SniDestinationMismatch, Enforcement::Enforced);
                        d.check = Some("dns-binding");
                        deny(ctx, d);
                        if ctx.decision.as_ref().is_some_and(Decision::blocks) {
                            return Err(Stop::Refused);
                        }
                    }
                    Ok((dialled(), orig.port(), Some("dns-binding")))
                }
                None => {
                    let ips = resolve(shared, ctx, name.as_str()).await?;
                    // Keep the client's choice when the name really has
                    // that address (CDN affinity); otherwise dial the
                    // name's own.
                    if ips.contains(&orig.ip().to_canonical()) || ips.contains(&orig.ip()) {
                        Ok((dialled(), orig.port(), Some("sni-resolved")))
                    } else {
                        Ok((ips, orig.port(), Some("sni-resolved")))
                    }
                }
            }
        }
        (Some(_), SniCheck::Off) => Ok((dialled(), orig.port(), Some("off"))),
        (Some(_), SniCheck::Verify) => Ok((dialled(), orig.port(), Some("dns-binding"))),
        (None, _) => Ok((dialled(), orig.port(), None)),
    }
}
