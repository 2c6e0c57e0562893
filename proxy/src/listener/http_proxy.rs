//! The explicit proxy (`HTTPS_PROXY` / `HTTP_PROXY`).
//!
//! `CONNECT host:port` is decided on the target, answered `200`, and then
//! the tunnel's first bytes are classified like a transparent flow: a
//! ClientHello's SNI must name the CONNECT target (else `sni-mismatch`,
//! domain fronting), a plain HTTP Host likewise (`host-mismatch`). A CONNECT
//! to an IP literal is decided by the address, then by the SNI. Denials
//! before the `200` get a `403` naming the rule and reason code; after it,
//! the tunnel is closed.
//!
//! Absolute-form requests (`GET http://host/path`) are served by hyper with
//! keep-alive: every request is decided on its own URI host and forwarded
//! over its own upstream connection. `CONNECT` must be the first request on
//! a proxy connection (as every common client sends it).
//!
//! With `users` configured, requests need `Proxy-Authorization: Basic`; the
//! user's SmartGroup joins the source's groups for policy.

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use base64::Engine as _;
use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use sluice_api::{DomainName, Protocol};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::chain::{FilterChain, Transport};
use super::filter::{Decision, FlowContext};
use super::flow::{self, deny};
use super::peek::{self, Peeked};
use super::{ListenerPlan, Shared, Snapshot};
use crate::classify::http::Host;
use crate::classify::{HttpLimits, Progress, RequestHead, parse_request_head};
use crate::forward::{ConnectOptions, connect, parse_ip_lenient};

use super::edge;
use crate::telemetry::audit::FlowRecord;
use crate::telemetry::metrics;
use sluice_api::reason::ReasonCode;

pub async fn serve(
    plan: Arc<ListenerPlan>,
    shared: Arc<Shared>,
    snap: Arc<Snapshot>,
    mut client: TcpStream,
    peer: SocketAddr,
    closing: &tokio_util::sync::CancellationToken,
) -> Option<flow::Relaying> {
    let accepted = Instant::now();
    let active = plan.metrics.active();
    let mut buf = Vec::with_capacity(2048);
    // Shutdown ends the wait for a first request like any other. The read
    // goes first: the head is usually there already, and the forced
    // shutdown is subscribed to only when the read has to wait.
    let first = tokio::select! {
        biased;
        r = Box::pin(read_head(&mut client, &mut buf, &plan.spec)) => r,
        () = shared.forced() => Err(ReasonCode::Shutdown),
    };
    let head = match first {
        Ok(h) => h,
        Err(reason) => {
            let mut ctx = FlowContext::new(shared.next_id(), &plan, peer, snap);
            ctx.protocol = Protocol::Http;
            ctx.decision = Some(Decision::refused(reason));
            let _ = refuse(&mut client, &ctx).await;
            let rec = flow::denied_record(&ctx);
            flow::finish(&shared, None, &ctx, rec, accepted);
            return None;
        }
    };
    if head.method.eq_ignore_ascii_case("CONNECT") {
        tunnel(plan, shared, snap, client, peer, head, buf, accepted, active).await
    } else {
        let _active = active;
        let io = Rewind {
            prefix: Bytes::from(buf),
            inner: client,
        };
        let forced = shared.clone();
        let idle = plan.spec.idle_timeout;
        let label = plan.label.clone();
        let state = Arc::new(ConnState { plan, shared, peer });
        let service = hyper::service::service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(state.handle(req).await) }
        });
        // Between requests nothing else ends a kept-alive connection: the
        // listener's idle timeout bounds the wait for the next request head,
        // so an idle client cannot hold a `max_connections` slot forever.
        let conn = hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .timer(TokioTimer::new())
            .header_read_timeout(idle)
            .serve_connection(TokioIo::new(io), service);
        // A kept-alive connection has no end of its own: when the drain
        // time is over it is closed like a relayed flow, not left serving
        // requests whose records could no longer be written.
        let mut conn = std::pin::pin!(conn);
        tokio::select! {
            _ = conn.as_mut() => return None,
            () = forced.forced() => return None,
            () = closing.cancelled() => return None,
            // Draining (the process stopping, or this listener removed by a
            // reload): finish the request in progress, if any, then close
            // instead of waiting for the next one.
            () = forced.stopping() => conn.as_mut().graceful_shutdown(),
            () = forced.listener_gone(&label) => conn.as_mut().graceful_shutdown(),
        }
        tokio::select! {
            _ = conn => {}
            () = forced.forced() => {}
            () = closing.cancelled() => {}
        }
        None
    }
}

/// Reads the first request head.
async fn read_head(
    client: &mut TcpStream,
    buf: &mut Vec<u8>,
    spec: &sluice_api::Listener,
) -> Result<RequestHead, ReasonCode> {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + spec.peek_timeout;
    let limits = HttpLimits::default();
    let mut need = 1usize;
    loop {
        while buf.len() < need {
            if buf.len() > limits.max_head {
                return Err(ReasonCode::HttpOversized);
            }
            buf.reserve(2048);
            match tokio::time::timeout_at(deadline, client.read_buf(buf)).await {
                Err(_) => return Err(ReasonCode::PeekTimeout),
                Ok(Ok(0)) => return Err(ReasonCode::ClientClosedEarly),
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return Err(ReasonCode::ClientError),
            }
        }
        match parse_request_head(buf, &limits) {
            Ok(Progress::Done(h)) => return Ok(h),
            Ok(Progress::NeedMore { at_least }) => need = buf.len() + at_least.unwrap_or(1),
            Err(e) => return Err(e.reason()),
        }
    }
}

/// `Proxy-Authorization: Basic …` → (user, password).
fn basic_credentials(value: &[u8]) -> Option<(String, String)> {
    let v = std::str::from_utf8(value).ok()?.trim();
    let (scheme, token) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(token.trim()).ok()?;
    let s = String::from_utf8(decoded).ok()?;
    let (u, p) = s.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}

/// Checks proxy credentials; `Ok(identity)` when allowed (no users
/// configured: no identity), `Err(())` when a `407` is due.
fn authenticate(plan: &ListenerPlan, snap: &Snapshot, header: Option<&[u8]>) -> Result<Option<u32>, ()> {
    if plan.spec.users.is_empty() {
        return Ok(None);
    }
    let (user, pass) = header.and_then(basic_credentials).ok_or(())?;
    let u = plan.spec.users.iter().find(|u| u.name == user).ok_or(())?;
    // Compare without an early exit, so timing does not reveal how much of
    // a guessed password was right.
    let (a, b) = (u.password.as_bytes(), pass.as_bytes());
    let diff = a
        .iter()
        .zip(b)
        .fold(a.len() ^ b.len(), |acc, (x, y)| acc | usize::from(x ^ y));
    if diff != 0 {
        return Err(());
    }
    Ok(snap.policy.smartgroup_id(&u.smartgroup))
}

fn header_in_head<'a>(head: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(head).ok()?;
    req.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value)
}

/// Answers a refused CONNECT (no hyper there) with the status its reason
/// calls for ([`edge::refusal`]), or just closes when nobody is there to
/// read one.
async fn refuse(client: &mut TcpStream, ctx: &FlowContext) -> std::io::Result<()> {
    let Some(d) = ctx.decision.as_ref() else {
        return Ok(());
    };
    match edge::refusal(d.reason) {
        Some(status) => {
            respond(
                client,
                status,
                d.rule.as_str(),
                d.reason.as_str(),
                "Sluice refused this request.",
            )
            .await
        }
        None => Ok(()),
    }
}

/// Answers a CONNECT that was allowed but could not be forwarded.
async fn fail(client: &mut TcpStream, ctx: &FlowContext, close_reason: &str) -> std::io::Result<()> {
    let rule = ctx.decision.as_ref().map_or("-", |d| d.rule.as_str());
    respond(
        client,
        edge::failure(close_reason),
        rule,
        close_reason,
        "Sluice could not reach the target.",
    )
    .await
}

async fn respond(
    client: &mut TcpStream,
    status: edge::Status,
    rule: &str,
    reason: &str,
    message: &str,
) -> std::io::Result<()> {
    let body = edge::body(message, rule, reason);
    let mut extra = String::new();
    if status.code == 407 {
        extra.push_str("Proxy-Authenticate: Basic realm=\"sluice\"\r\n");
    }
    let msg = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Sluice-Rule: {rule}\r\nX-Sluice-Reason: {reason}\r\n{extra}Connection: close\r\n\r\n{body}",
        status.code,
        status.text,
        body.len()
    );
    client.write_all(msg.as_bytes()).await?;
    client.shutdown().await
}

fn target_host(ctx: &mut FlowContext, host: &Host) -> Result<String, ReasonCode> {
    match host {
        Host::Name(n) => {
            let name = DomainName::parse(n).map_err(|_| ReasonCode::HttpBadHost)?;
            let s = name.to_string();
            ctx.name = Some(name);
            Ok(s)
        }
        Host::Ipv4(ip) => {
            ctx.dst_ip = Some((*ip).into());
            Ok(ip.to_string())
        }
        Host::Ipv6(ip) => {
            ctx.dst_ip = Some((*ip).into());
            Ok(ip.to_string())
        }
    }
}

#[allow(
    clippy::too_many_arguments,
    reason = "one call site; a struct would only rename them"
)]
async fn tunnel(
    plan: Arc<ListenerPlan>,
    shared: Arc<Shared>,
    snap: Arc<Snapshot>,
    mut client: TcpStream,
    peer: SocketAddr,
    head: RequestHead,
    mut buf: Vec<u8>,
    accepted: Instant,
    active: metrics::ActiveFlow,
) -> Option<flow::Relaying> {
    let mut ctx = FlowContext::new(shared.next_id(), &plan, peer, snap.clone());
    ctx.protocol = Protocol::Tls;
    // Named in the record even when refused before the target is decided on.
    if let (Some(h), Some(p)) = (&head.host, head.port) {
        ctx.connect_target = Some(format!("{h}:{p}"));
    }
    let head_bytes = buf.get(..head.head_len).unwrap_or(&[]);
    match authenticate(&plan, &snap, header_in_head(head_bytes, "proxy-authorization")) {
        Ok(identity) => ctx.identity = identity,
        Err(()) => {
            ctx.decision = Some(Decision::refused(ReasonCode::ProxyAuthRequired));
            let _ = refuse(&mut client, &ctx).await;
            let rec = flow::denied_record(&ctx);
            flow::finish(&shared, None, &ctx, rec, accepted);
            return None;
        }
    }
    let (Some(host), Some(port)) = (head.host.clone(), head.port) else {
        ctx.decision = Some(Decision::refused(ReasonCode::HttpBadTarget));
        let _ = refuse(&mut client, &ctx).await;
        let rec = flow::denied_record(&ctx);
        flow::finish(&shared, None, &ctx, rec, accepted);
        return None;
    };
    ctx.port = port;
    ctx.connect_target = Some(format!("{host}:{port}"));
    let dial_host = match target_host(&mut ctx, &host) {
        Ok(h) => h,
        Err(reason) => {
            ctx.decision = Some(Decision::refused(reason));
            let _ = refuse(&mut client, &ctx).await;
            let rec = flow::denied_record(&ctx);
            flow::finish(&shared, None, &ctx, rec, accepted);
            return None;
        }
    };
    let Some(chain) = plan
        .chain(ctx.name.as_ref(), port, peer.ip(), ctx.dst_ip, Transport::Tls)
        .cloned()
    else {
        ctx.decision = Some(Decision::refused(ReasonCode::NoFilterChain));
        let _ = refuse(&mut client, &ctx).await;
        let rec = flow::denied_record(&ctx);
        flow::finish(&shared, None, &ctx, rec, accepted);
        return None;
    };
    // First decision, on the target alone, while a 403 can still be sent.
    flow::classified(&chain, &mut ctx).await;
    if ctx.decision.as_ref().is_none_or(Decision::blocks) {
        let _ = refuse(&mut client, &ctx).await;
        let rec = flow::denied_record(&ctx);
        flow::finish(&shared, Some(&*chain), &ctx, rec, accepted);
        return None;
    }
    // Resolve and screen the target before answering, so a target the
    // guard refuses (a name resolving to 169.254.169.254) or one that does
    // not resolve still gets a response that says so.
    let resolved = match Box::pin(flow::resolve(&shared, &ctx, &dial_host)).await {
        Ok(ips) => ips,
        Err(e) => {
            let _ = fail(&mut client, &ctx, e.reason_code()).await;
            flow::failed(&shared, Some(&*chain), &ctx, e.reason_code(), accepted);
            return None;
        }
    };
    if flow::screen(&chain, &mut ctx, &resolved).is_empty() {
        let _ = refuse(&mut client, &ctx).await;
        let rec = flow::denied_record(&ctx);
        flow::finish(&shared, Some(&*chain), &ctx, rec, accepted);
        return None;
    }
    if client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        let mut rec = ctx.record();
        rec.close_reason = Cow::Borrowed("client-error");
        flow::finish(&shared, Some(&*chain), &ctx, rec, accepted);
        return None;
    }

    // What the client sends through the tunnel decides again.
    buf.drain(..head.head_len.min(buf.len()));
    let started = Instant::now();
    let peeked = tokio::select! {
        biased;
        p = Box::pin(peek::peek(&mut client, &mut buf, &plan.spec)) => p,
        () = shared.forced() => Peeked::Failed(ReasonCode::Shutdown),
    };
    plan.metrics.classified(started.elapsed());
    // Decided again, on what the tunnel carries; the anti-evasion filter
    // holds it against the target.
    ctx.decision = None;
    ctx.tunnel = true;
    let extras = ctx.extras_mut();
    extras.changed_by.clear();
    extras.target = Some(host.clone());
    let target_name = ctx.name.clone();
    match peeked {
        Peeked::Tls(h) => {
            peek::from_hello(&mut ctx, h);
            // Without SNI the CONNECT target names the destination (when
            // `connect_no_sni: allow` lets such a flow on at all).
            if ctx.sni.is_none() {
                ctx.name = target_name;
            }
        }
        Peeked::Http(h2) => {
            ctx.protocol = Protocol::Http;
            ctx.host.clone_from(&h2.host_header);
            ctx.extras_mut().http_host = h2.host;
        }
        Peeked::Opaque => ctx.protocol = Protocol::Tcp,
        Peeked::Failed(reason) => deny(&mut ctx, Decision::refused(reason)),
    }
    if ctx.decision.as_ref().is_some_and(Decision::blocks) {
        let rec = flow::denied_record(&ctx);
        flow::finish(&shared, Some(&*chain), &ctx, rec, accepted);
        return None;
    }
    flow::classified(&chain, &mut ctx).await;
    if ctx.decision.as_ref().is_none_or(Decision::blocks) {
        let rec = flow::denied_record(&ctx);
        flow::finish(&shared, Some(&*chain), &ctx, rec, accepted);
        return None;
    }
    // Screened again: the decision above may have replaced a watched
    // guard denial that the record must keep.
    let ips = flow::screen(&chain, &mut ctx, &resolved);
    if ips.is_empty() {
        let rec = flow::denied_record(&ctx);
        flow::finish(&shared, Some(&*chain), &ctx, rec, accepted);
        return None;
    }
    let addrs = flow::with_port(&ips, port);
    flow::connect_and_replay(&plan, shared, ctx, chain, client, &addrs, buf, accepted, active).await
}

/// Replays bytes already read before handing the stream to hyper.
struct Rewind {
    prefix: Bytes,
    inner: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// A hyper response naming `rule` and `reason`, with the status `status`.
fn answer(status: edge::Status, rule: &str, reason: &str, message: &str) -> Response<ProxyBody> {
    let body = edge::body(message, rule, reason);
    let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed());
    *r.status_mut() = StatusCode::from_u16(status.code).unwrap_or(StatusCode::FORBIDDEN);
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    if let Ok(v) = hyper::header::HeaderValue::from_str(rule) {
        h.insert("x-sluice-rule", v);
    }
    if let Ok(v) = hyper::header::HeaderValue::from_str(reason) {
        h.insert("x-sluice-reason", v);
    }
    if status.code == 407 {
        h.insert(
            hyper::header::PROXY_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Basic realm=\"sluice\""),
        );
    }
    r
}

/// The answer to a refused request: its status from its reason
/// ([`edge::refusal`]).
fn refusal(ctx: &FlowContext, message: &str) -> Response<ProxyBody> {
    let d = ctx
        .decision
        .clone()
        .unwrap_or_else(|| Decision::refused(ReasonCode::NoDecision));
    let status = edge::refusal(d.reason).unwrap_or(edge::Status {
        code: 400,
        text: "Bad Request",
    });
    answer(status, d.rule.as_str(), d.reason.as_str(), message)
}

/// The answer to an allowed request that could not be forwarded.
fn failure(ctx: &FlowContext, close_reason: &str, message: &str) -> Response<ProxyBody> {
    let rule = ctx.decision.as_ref().map_or("-", |d| d.rule.as_str());
    answer(edge::failure(close_reason), rule, close_reason, message)
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and the proxy's own.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
];

/// Removes hop-by-hop headers: the fixed list, and every header the
/// `Connection` header names (RFC 9110 §7.6.1: `Connection: x-hop` makes
/// `x-hop` meant for this hop only, so it must not be forwarded).
fn strip_hop_by_hop(headers: &mut hyper::HeaderMap) {
    let named: Vec<hyper::header::HeaderName> = headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| hyper::header::HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for h in named {
        headers.remove(h);
    }
    for h in HOP_BY_HOP {
        headers.remove(*h);
    }
}

/// What every request on one absolute-form connection shares. Not the
/// configuration snapshot: each request is its own flow and takes the one
/// in force when it arrives, so a reload reaches pooled connections too.
struct ConnState {
    plan: Arc<ListenerPlan>,
    shared: Arc<Shared>,
    peer: SocketAddr,
}

/// Writes a request's audit record once both its bodies are done.
struct RecordGuard {
    shared: Arc<Shared>,
    ctx: FlowContext,
    chain: Arc<FilterChain>,
    record: Mutex<Option<FlowRecord>>,
    up: AtomicU64,
    down: AtomicU64,
    accepted: Instant,
}

impl Drop for RecordGuard {
    fn drop(&mut self) {
        let rec = self.record.get_mut().ok().and_then(Option::take);
        if let Some(mut rec) = rec {
            rec.bytes_up += self.up.load(Ordering::Relaxed);
            rec.bytes_down += self.down.load(Ordering::Relaxed);
            flow::finish(&self.shared, Some(&*self.chain), &self.ctx, rec, self.accepted);
        }
    }
}

/// A body that counts what passes through it into a [`RecordGuard`].
struct Counted<B> {
    inner: B,
    guard: Arc<RecordGuard>,
    upstream: bool,
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r
            && let Some(d) = f.data_ref()
        {
            let counter = if self.upstream {
                &self.guard.up
            } else {
                &self.guard.down
            };
            counter.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl ConnState {
    async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let accepted = Instant::now();
        let snap = self.shared.snapshot.load_full();
        // The listener's options as they are now: a reload reaches
        // requests on connections kept alive from before it.
        let plan = snap
            .plan(&self.plan.label)
            .cloned()
            .unwrap_or_else(|| self.plan.clone());
        let mut ctx = FlowContext::new(self.shared.next_id(), &plan, self.peer, snap.clone());
        ctx.protocol = Protocol::Http;
        // Named in the record even when refused before the target is decided on.
        ctx.connect_target = req
            .uri()
            .authority()
            .map(|a| format!("{}:{}", a.host(), a.port_u16().unwrap_or(80)));
        let deny_now = |ctx: &mut FlowContext, reason: ReasonCode, msg: &str| {
            ctx.decision = Some(Decision::refused(reason));
            let resp = refusal(ctx, msg);
            let rec = flow::denied_record(ctx);
            flow::finish(&self.shared, None, ctx, rec, accepted);
            resp
        };
        match authenticate(
            &plan,
            &snap,
            req.headers()
                .get(hyper::header::PROXY_AUTHORIZATION)
                .map(|v| v.as_bytes()),
        ) {
            Ok(identity) => ctx.identity = identity,
            Err(()) => {
                return deny_now(
                    &mut ctx,
                    ReasonCode::ProxyAuthRequired,
                    "Proxy authentication required.",
                );
            }
        }
        if req.method() == hyper::Method::CONNECT {
            return deny_now(
                &mut ctx,
                ReasonCode::ConnectNotFirst,
                "CONNECT must be the first request on a proxy connection.",
            );
        }
        let Some(authority) = req.uri().authority().cloned() else {
            return deny_now(
                &mut ctx,
                ReasonCode::HttpBadTarget,
                "A proxy request needs an absolute URI (http://host/path).",
            );
        };
        if req.uri().scheme_str().is_some_and(|s| !s.eq_ignore_ascii_case("http")) {
            return deny_now(
                &mut ctx,
                ReasonCode::HttpUnsupportedScheme,
                "Only http:// URIs are proxied; use CONNECT for https.",
            );
        }
        let raw_host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = authority.port_u16().unwrap_or(80);
        ctx.port = port;
        ctx.connect_target = Some(format!("{}:{port}", authority.host()));
        ctx.host = req
            .headers()
            .get(hyper::header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let host = match raw_host.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) => Host::Ipv4(ip),
            Ok(IpAddr::V6(ip)) => Host::Ipv6(ip),
            // `0x7f.1`, `2130706433`: a resolver would read another address
            // than the one written; refuse rather than guess.
            Err(_) if parse_ip_lenient(&raw_host).is_some() => {
                return deny_now(&mut ctx, ReasonCode::HttpBadHost, "Numeric host spellings are refused.");
            }
            Err(_) => Host::Name(raw_host.clone()),
        };
        if let Some(h) = &ctx.host {
            let header_host = h
                .rsplit_once(':')
                .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
                .map_or(h.as_str(), |(a, _)| a);
            let header_host = header_host.trim_start_matches('[').trim_end_matches(']');
            let same = match (&host, header_host.parse::<IpAddr>()) {
                (Host::Name(n), Err(_)) => n
                    .trim_end_matches('.')
                    .eq_ignore_ascii_case(header_host.trim_end_matches('.')),
                (Host::Ipv4(a), Ok(b)) => IpAddr::V4(*a) == b,
                (Host::Ipv6(a), Ok(b)) => IpAddr::V6(*a) == b,
                _ => false,
            };
            if !same {
                return deny_now(
                    &mut ctx,
                    ReasonCode::HttpConflictingHost,
                    "The Host header names another host than the URI.",
                );
            }
        }
        let dial_host = match target_host(&mut ctx, &host) {
            Ok(h) => h,
            Err(reason) => return deny_now(&mut ctx, reason, "Invalid host."),
        };
        let Some(chain) = self
            .plan
            .chain(
                ctx.name.as_ref(),
                port,
                self.peer.ip(),
                ctx.dst_ip,
                Transport::RawBuffer,
            )
            .cloned()
        else {
            return deny_now(&mut ctx, ReasonCode::NoFilterChain, "Sluice refused this request.");
        };
        flow::classified(&chain, &mut ctx).await;
        if ctx.decision.as_ref().is_none_or(Decision::blocks) {
            let resp = refusal(&ctx, "Sluice refused this request.");
            let rec = flow::denied_record(&ctx);
            flow::finish(&self.shared, Some(&chain), &ctx, rec, accepted);
            return resp;
        }
        let ips = match flow::resolve(&self.shared, &ctx, &dial_host).await {
            Ok(ips) => ips,
            Err(e) => {
                let resp = failure(
                    &ctx,
                    e.reason_code(),
                    &format!("Sluice could not resolve the host ({}).", e.reason_code()),
                );
                flow::failed(&self.shared, Some(&chain), &ctx, e.reason_code(), accepted);
                return resp;
            }
        };
        let ips = flow::screen(&chain, &mut ctx, &ips);
        if ips.is_empty() {
            let resp = refusal(&ctx, "Sluice refused this request.");
            let rec = flow::denied_record(&ctx);
            flow::finish(&self.shared, Some(&chain), &ctx, rec, accepted);
            return resp;
        }
        let addrs = flow::with_port(&ips, port);
        let started = Instant::now();
        let opts = ConnectOptions {
            timeout: plan.spec.connect_timeout,
            ..ConnectOptions::default()
        };
        let mut rec = ctx.record();
        let upstream = match connect(&addrs, &opts).await {
            Ok(c) => {
                metrics::connect_latency("ok", started.elapsed());
                rec.dst = Some(c.addr);
                c.stream
            }
            Err(e) => {
                metrics::connect_latency(e.reason_code(), started.elapsed());
                rec.close_reason = Cow::Borrowed(e.reason_code());
                let resp = failure(&ctx, e.reason_code(), "Sluice could not connect to the host.");
                flow::finish(&self.shared, Some(&chain), &ctx, rec, accepted);
                return resp;
            }
        };
        rec.dst_groups = snap
            .policy
            .smartgroups_of(rec.dst.map_or(self.peer.ip(), |d| d.ip()))
            .into_iter()
            .map(str::to_owned)
            .collect();
        let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await {
            Ok(x) => x,
            Err(_) => {
                rec.close_reason = Cow::Borrowed("upstream-error");
                let resp = failure(&ctx, "upstream-error", "Upstream HTTP handshake failed.");
                flow::finish(&self.shared, Some(&chain), &ctx, rec, accepted);
                return resp;
            }
        };
        tokio::spawn(async move {
            let _ = conn.await;
        });
        rec.close_reason = Cow::Borrowed("completed");
        let guard = Arc::new(RecordGuard {
            shared: self.shared.clone(),
            ctx,
            chain,
            record: Mutex::new(Some(rec)),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            accepted,
        });
        let (mut parts, body) = req.into_parts();
        parts.uri = parts.uri.path_and_query().map_or_else(
            || hyper::Uri::from_static("/"),
            |pq| {
                hyper::Uri::from_maybe_shared(Bytes::copy_from_slice(pq.as_str().as_bytes()))
                    .unwrap_or_else(|_| hyper::Uri::from_static("/"))
            },
        );
        strip_hop_by_hop(&mut parts.headers);
        let out = Request::from_parts(
            parts,
            Counted {
                inner: body,
                guard: guard.clone(),
                upstream: true,
            },
        );
        match sender.send_request(out).await {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(
                    parts,
                    Counted {
                        inner: body,
                        guard,
                        upstream: false,
                    }
                    .boxed(),
                )
            }
            Err(_) => {
                if let Ok(mut r) = guard.record.lock()
                    && let Some(r) = r.as_mut()
                {
                    r.close_reason = Cow::Borrowed("upstream-error");
                }
                failure(&guard.ctx, "upstream-error", "Upstream request failed.")
            }
        }
    }
}
