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

use sluice_api::{DomainName, Protocol};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::chain::Transport;
use super::filter::{Decision, FlowContext};
use super::flow::{self, deny};
use super::pipeline::{Flow, Stop};
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
pub async fn peek(client: &mut TcpStream, buf: &mut Vec<u8>, spec: &sluice_api::PeekOptions) -> Peeked {
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

/// Serves one connection of a transparent, sni or tcp listener: classifies
/// its first bytes, runs the pipeline, and relays it or closes it.
pub async fn serve(
    plan: Arc<ListenerPlan>,
    shared: Arc<Shared>,
    snap: Arc<Snapshot>,
    mut client: TcpStream,
    peer: SocketAddr,
    bound: Option<SocketAddr>,
) -> Option<flow::Relaying> {
    let active = plan.metrics.active();
    let mut flow = Flow::new(&shared, &plan, peer, snap, Instant::now());
    let mut buf = Vec::new();
    let decided = match front(&mut flow, &shared, &mut client, &mut buf, bound).await {
        Ok(transport) => flow.decide(&shared, transport, bound).await,
        Err(stop) => Err(stop),
    };
    match decided {
        Ok(fwd) => flow::connect_and_replay(shared, flow, fwd, client, buf, active).await,
        // Nobody here reads an answer: the connection is just closed.
        Err(stop) => {
            flow.end(&shared, stop);
            None
        }
    }
}

/// What the client showed before anything is decided: where it was going
/// (a redirected flow) and its first bytes, classified. A flow that cannot
/// be classified carries its refusal into the pipeline.
async fn front(
    flow: &mut Flow,
    shared: &Shared,
    client: &mut TcpStream,
    buf: &mut Vec<u8>,
    bound: Option<SocketAddr>,
) -> Result<Transport, Stop> {
    let plan = flow.ctx.plan.clone();
    if plan.needs_original || plan.spec.original_dst {
        match original_destination(client, bound) {
            Some(a) => {
                flow.ctx.original_dst = Some(a);
                flow.ctx.port = a.port();
            }
            None if plan.needs_original => return Err(flow.refuse(ReasonCode::NoOriginalDestination)),
            // Chains match on the listener's own address (Envoy's
            // `original_dst` without a redirect).
            None => {}
        }
    }
    let Some(peek_options) = plan.spec.front.peek() else {
        return Ok(Transport::RawBuffer);
    };
    let started = Instant::now();
    // The bytes are usually there already: peek first, and subscribe to
    // the forced shutdown only when it has to wait.
    let peeked = tokio::select! {
        biased;
        p = Box::pin(peek(client, buf, peek_options)) => p,
        () = shared.forced() => Peeked::Failed(ReasonCode::Shutdown),
    };
    plan.metrics.classified(started.elapsed());
    let ctx = &mut flow.ctx;
    Ok(match peeked {
        Peeked::Tls(h) => {
            from_hello(ctx, h);
            Transport::Tls
        }
        // An sni listener passes TLS only: plain HTTP would cross in
        // clear text to a port meant for TLS (the anti-evasion filter
        // refuses it).
        Peeked::Http(head) => {
            from_http(ctx, &head);
            Transport::RawBuffer
        }
        Peeked::Opaque => Transport::RawBuffer,
        // Fail closed: what cannot be classified is not forwarded,
        // whatever the mode.
        // Unless the listener says to go on as opaque TCP when the first
        // bytes are late (Envoy's `continue_on_listener_filters_timeout`).
        Peeked::Failed(ReasonCode::PeekTimeout)
            if matches!(
                plan.spec.front,
                sluice_api::envoy::Front::Inspect {
                    continue_on_timeout: true,
                    ..
                }
            ) =>
        {
            Transport::RawBuffer
        }
        Peeked::Failed(reason) => return Err(flow.refuse(reason)),
    })
}
