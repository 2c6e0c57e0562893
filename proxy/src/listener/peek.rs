//! Transparent, sni and tcp listeners: the client speaks first and never
//! names a proxy, so Sluice reads (and keeps, to replay) the first bytes —
//! a ClientHello, an HTTP request head, or nothing it recognises — to learn
//! where the flow is going.
//!
//! Destinations, by cluster:
//! - original destination (transparent, tcp without `upstream`): where the
//!   client was going before iptables. With an SNI or Host and
//!   `sni_check: verify`, the name decides instead: Sluice dials an address
//!   the name resolves to (the original one if it is among them), so an
//!   allowed SNI sent to an attacker's IP never reaches the attacker.
//! - SNI dynamic (sni): the SNI resolved, on the configured port.
//! - static (tcp with `upstream`): a fixed `host:port`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use sluice_api::{DomainName, ListenerKind, Protocol, SniCheck};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::chain::{Cluster, Transport};
use super::filter::{Decision, FlowContext};
use super::flow::{self, check_enforcement, deny};
use super::{ListenerPlan, Shared, Snapshot};
use crate::classify::http::Host;
use crate::classify::{
    ClientHello, HttpLimits, Limits, Progress, RequestHead, Sniff, parse_client_hello, parse_request_head, sniff,
};
use sluice_api::reason::ReasonCode;

/// What the first bytes were.
#[derive(Debug)]
pub enum Peeked {
    Tls(ClientHello),
    Http(RequestHead),
    /// Neither TLS nor HTTP: opaque TCP.
    Opaque,
    /// Classification failed (a TLS record out of place included); refused
    /// whatever the mode.
    Failed(ReasonCode),
}

/// Reads into `buf` until the first bytes classify, within `spec`'s peek
/// timeout and size bound. Bytes read stay in `buf` for replay.
pub async fn peek(client: &mut TcpStream, buf: &mut Vec<u8>, spec: &sluice_api::Listener) -> Peeked {
    let deadline = tokio::time::Instant::now() + spec.peek_timeout;
    let limits = Limits {
        max_client_hello: spec.max_client_hello,
    };
    let http = HttpLimits::default();
    // A backstop only: the parsers refuse oversized input from its declared
    // lengths long before this many bytes arrive.
    let cap = spec.max_client_hello.max(http.max_head) + 4096;
    let mut need = 1usize;
    loop {
        while buf.len() < need {
            if buf.len() >= cap {
                return Peeked::Failed(ReasonCode::ClassifyOversized);
            }
            buf.reserve((need - buf.len()).max(2048).min(cap - buf.len()));
            match tokio::time::timeout_at(deadline, client.read_buf(buf)).await {
                Err(_) => return Peeked::Failed(ReasonCode::PeekTimeout),
                Ok(Ok(0)) => return Peeked::Failed(ReasonCode::ClientClosedEarly),
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return Peeked::Failed(ReasonCode::ClientError),
            }
        }
        // Re-parse only once enough has arrived to change the answer: a
        // client sending 1-byte segments must not make us re-scan its hello
        // once per byte.
        match sniff(buf) {
            Sniff::NeedMore => need = buf.len() + 1,
            Sniff::Tls => match parse_client_hello(buf, &limits) {
                Ok(Progress::Done(h)) => return Peeked::Tls(h),
                Ok(Progress::NeedMore { at_least }) => need = buf.len() + at_least.unwrap_or(1),
                Err(e) => return Peeked::Failed(e.reason()),
            },
            Sniff::Http => match parse_request_head(buf, &http) {
                Ok(Progress::Done(h)) => return Peeked::Http(h),
                Ok(Progress::NeedMore { at_least }) => need = buf.len() + at_least.unwrap_or(1),
                Err(e) => return Peeked::Failed(e.reason()),
            },
            Sniff::TlsRecordOutOfPlace(_) => return Peeked::Failed(ReasonCode::TlsRecordOutOfPlace),
            Sniff::Unknown => return Peeked::Opaque,
        }
    }
}

/// Fills the context from a ClientHello: SNI, ALPN, ECH presence, protocol
/// (the anti-evasion filter then judges them).
pub fn from_hello(ctx: &mut FlowContext, h: ClientHello) {
    ctx.protocol = Protocol::Tls;
    ctx.ech = h.ech;
    // Protocol ids are ASCII in practice: each buffer becomes its String
    // in place (and the list reuses its allocation); only invalid UTF-8
    // is copied, lossily.
    ctx.alpn = h
        .alpn
        .into_iter()
        .map(|a| String::from_utf8(a).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
        .collect();
    if let Some(sni) = h.sni {
        match DomainName::parse(&sni) {
            Ok(n) => ctx.name = Some(n),
            Err(_) => deny(ctx, Decision::refused(ReasonCode::TlsBadSni)),
        }
        ctx.sni = Some(sni);
    }
}

/// Fills the context from a plain HTTP request head: Host, protocol.
pub fn from_http(ctx: &mut FlowContext, head: &RequestHead) {
    ctx.protocol = Protocol::Http;
    ctx.host.clone_from(&head.host_header);
    match &head.host {
        Some(Host::Name(n)) => match DomainName::parse(n) {
            Ok(n) => ctx.name = Some(n),
            Err(_) => deny(ctx, Decision::refused(ReasonCode::HttpBadHost)),
        },
        Some(Host::Ipv4(ip)) => ctx.dst_ip = Some((*ip).into()),
        Some(Host::Ipv6(ip)) => ctx.dst_ip = Some((*ip).into()),
        None => {}
    }
}

/// The destination a redirected client was going to: `SO_ORIGINAL_DST`
/// after iptables `REDIRECT`; after `TPROXY` (no NAT) the accepted socket's
/// own local address. A connection made straight to the listener has
/// neither.
fn original_destination(client: &TcpStream, bound: Option<SocketAddr>) -> Option<SocketAddr> {
    let local = client.local_addr().ok();
    if let Ok(a) = crate::sys::original_dst(client)
        && Some(a) != local
    {
        return Some(a);
    }
    let local = local?;
    let direct = bound.is_some_and(|b| b.port() == local.port() && (b.ip().is_unspecified() || b.ip() == local.ip()));
    (!direct).then_some(local)
}

pub async fn serve(
    plan: Arc<ListenerPlan>,
    shared: Arc<Shared>,
    snap: Arc<Snapshot>,
    mut client: TcpStream,
    peer: SocketAddr,
    bound: Option<SocketAddr>,
) -> Option<flow::Relaying> {
    let accepted = Instant::now();
    let active = plan.metrics.active();
    let mut ctx = FlowContext::new(shared.next_id(), &plan, peer, snap);
    let kind = plan.spec.kind;
    let needs_original = plan
        .chains
        .iter()
        .any(|c| matches!(c.cluster, Cluster::OriginalDst { .. }));
    if needs_original {
        match original_destination(&client, bound) {
            Some(a) => {
                ctx.original_dst = Some(a);
                ctx.port = a.port();
            }
            None => {
                ctx.decision = Some(Decision::refused(ReasonCode::NoOriginalDestination));
                let rec = flow::denied_record(&ctx);
                flow::finish(&shared, None, &ctx, rec, accepted);
                return None;
            }
        }
    }

    let mut buf = Vec::new();
    let transport = if kind == ListenerKind::Tcp {
        Transport::RawBuffer
    } else {
        let started = Instant::now();
        // The bytes are usually there already: peek first, and subscribe to
        // the forced shutdown only when it has to wait.
        let peeked = tokio::select! {
            biased;
            p = Box::pin(peek(&mut client, &mut buf, &plan.spec)) => p,
            () = shared.forced() => Peeked::Failed(ReasonCode::Shutdown),
        };
        plan.metrics.classified(started.elapsed());
        match peeked {
            Peeked::Tls(h) => {
                from_hello(&mut ctx, h);
                Transport::Tls
            }
            // An sni listener passes TLS only: plain HTTP would cross in
            // clear text to a port meant for TLS.
            Peeked::Http(head) => {
                from_http(&mut ctx, &head);
                Transport::RawBuffer
            }
            Peeked::Opaque => Transport::RawBuffer,
            Peeked::Failed(reason) => {
                // Fail closed: what cannot be classified is not forwarded,
                // whatever the mode.
                deny(&mut ctx, Decision::refused(reason));
                Transport::RawBuffer
            }
        }
    };
    if let Some(d) = &ctx.decision
        && d.blocks()
    {
        let rec = flow::denied_record(&ctx);
        flow::finish(&shared, None, &ctx, rec, accepted);
        return None;
    }
    let now = tokio::time::Instant::now().into_std();
    let bindings = shared.bindings.load_full();
    // An address-only flow (opaque TCP, TLS without SNI) gets the name the
    // DNS proxy answered this client with for that address, so WebGroup
    // rules apply to it too.
    if ctx.name.is_none()
        && let (Some(b), Some(orig)) = (&bindings, ctx.original_dst)
        && let Some(name) = b.lookup(peer.ip(), orig.ip(), now)
    {
        ctx.name = Some(name);
        ctx.name_from_dns = true;
    }
    // The chain is chosen on what the flow showed; its cluster then says
    // where the flow goes and what it is decided on.
    let Some(chain) = plan
        .chain(
            ctx.name.as_ref(),
            ctx.port,
            peer.ip(),
            ctx.dst_ip.or(ctx.original_dst.map(|a| a.ip())),
            transport,
        )
        .cloned()
    else {
        deny(&mut ctx, Decision::refused(ReasonCode::NoFilterChain));
        let rec = flow::denied_record(&ctx);
        flow::finish(&shared, None, &ctx, rec, accepted);
        return None;
    };
    match &chain.cluster {
        // A fixed upstream: decided on its port, and its name or address.
        Cluster::Static { host, port } => {
            ctx.port = *port;
            match crate::forward::parse_ip_lenient(host) {
                Some(ip) => ctx.dst_ip = Some(ip),
                None => match DomainName::parse(host) {
                    Ok(n) => ctx.name = Some(n),
                    Err(_) => deny(&mut ctx, Decision::refused(ReasonCode::BadUpstream)),
                },
            }
        }
        Cluster::SniDynamic { port } => ctx.port = *port,
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
    // The anti-evasion checks, then the policy, then any other filter.
    flow::classified(&chain, &mut ctx).await;
    if ctx.decision.as_ref().is_none_or(Decision::blocks) {
        let rec = flow::denied_record(&ctx);
        flow::finish(&shared, Some(&*chain), &ctx, rec, accepted);
        return None;
    }

    let (ips, port, check) = match &chain.cluster {
        Cluster::SniDynamic { port } => {
            let name = ctx.name.as_ref().map(DomainName::as_str).unwrap_or_default();
            match Box::pin(flow::resolve(&shared, &ctx, name)).await {
                Ok(ips) => (ips, *port, None),
                Err(e) => return resolve_failed(&shared, &chain, &mut ctx, e.reason_code(), accepted),
            }
        }
        Cluster::OriginalDst { sni_check } => {
            let Some(orig) = ctx.original_dst else {
                return resolve_failed(&shared, &chain, &mut ctx, "no-original-destination", accepted);
            };
            let bound = bindings.as_ref().filter(|b| b.has_bindings_for_source(peer.ip(), now));
            match (&ctx.name, sni_check) {
                // The DNS proxy knows what it told this client: the address
                // dialled must be one it answered for that name.
                (Some(name), SniCheck::Verify) if !ctx.name_from_dns && bound.is_some() => {
                    if bound.is_some_and(|b| b.is_bound(peer.ip(), orig.ip(), name, now)) {
                        (vec![orig.ip()], orig.port(), Some("dns-binding"))
                    } else {
                        let e = check_enforcement(&ctx);
                        let mut d = Decision::check(ReasonCode::SniDestinationMismatch, e);
                        d.check = Some("dns-binding");
                        deny(&mut ctx, d);
                        if ctx.decision.as_ref().is_some_and(Decision::blocks) {
                            let rec = flow::denied_record(&ctx);
                            flow::finish(&shared, Some(&*chain), &ctx, rec, accepted);
                            return None;
                        }
                        (vec![orig.ip()], orig.port(), Some("dns-binding"))
                    }
                }
                (Some(name), SniCheck::Verify) if !ctx.name_from_dns => {
                    match Box::pin(flow::resolve(&shared, &ctx, name.as_str())).await {
                        // Keep the client's choice when the name really has that
                        // address (CDN affinity); otherwise dial the name's own.
                        Ok(ips) if ips.contains(&orig.ip().to_canonical()) || ips.contains(&orig.ip()) => {
                            (vec![orig.ip()], orig.port(), Some("sni-resolved"))
                        }
                        Ok(ips) => (ips, orig.port(), Some("sni-resolved")),
                        Err(e) => return resolve_failed(&shared, &chain, &mut ctx, e.reason_code(), accepted),
                    }
                }
                (Some(_), SniCheck::Off) => (vec![orig.ip()], orig.port(), Some("off")),
                (Some(_), SniCheck::Verify) => (vec![orig.ip()], orig.port(), Some("dns-binding")),
                (None, _) => (vec![orig.ip()], orig.port(), None),
            }
        }
        Cluster::Static { host, port } => match Box::pin(flow::resolve(&shared, &ctx, host)).await {
            Ok(ips) => (ips, *port, None),
            Err(e) => return resolve_failed(&shared, &chain, &mut ctx, e.reason_code(), accepted),
        },
        Cluster::RequestTarget => return resolve_failed(&shared, &chain, &mut ctx, "no-destination", accepted),
    };
    if let Some(d) = ctx.decision.as_mut() {
        d.check = check;
    }
    let ips = flow::screen(&chain, &mut ctx, &ips);
    if ips.is_empty() {
        let rec = flow::denied_record(&ctx);
        flow::finish(&shared, Some(&*chain), &ctx, rec, accepted);
        return None;
    }
    let addrs = flow::with_port(&ips, port);
    flow::connect_and_replay(&plan, shared, ctx, chain, client, &addrs, buf, accepted, active).await
}

fn resolve_failed(
    shared: &Shared,
    chain: &super::chain::FilterChain,
    ctx: &mut FlowContext,
    reason: &'static str,
    accepted: Instant,
) -> Option<flow::Relaying> {
    flow::failed(shared, Some(chain), ctx, reason, accepted);
    None
}
