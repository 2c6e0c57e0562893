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
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use base64::Engine as _;
use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use sluice_api::{DomainName, Protocol};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::chain::Transport;
use super::exchange::{
    Counted, Ended, Exchange, Exchanges, Filtered, Live, Passed, ProxyBody, Pump, Side, Stage, fields_of,
    reply_through_filters, set_fields,
};
use super::filter::{Decision, FlowContext};
use super::flow::{self, deny};
use super::peek::{self, Peeked};
use super::pipeline::{Flow, Stop};
use super::{ListenerPlan, Shared, Snapshot};
use crate::classify::http::Host;
use crate::classify::{HttpLimits, Progress, RequestHead, parse_request_head};
use crate::forward::{ConnectOptions, connect, parse_ip_lenient};

use crate::edge;
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
    let peek_options = plan.peek();
    let first = tokio::select! {
        biased;
        r = Box::pin(read_head(&mut client, &mut buf, &peek_options)) => r,
        () = shared.forced() => Err(ReasonCode::Shutdown),
    };
    let head = match first {
        Ok(h) => h,
        Err(reason) => {
            let mut flow = Flow::new(&shared, &plan, peer, snap, accepted);
            flow.ctx.protocol = Protocol::Http;
            let stop = flow.refuse(reason);
            return stopped(&mut client, &shared, flow, stop).await;
        }
    };
    if head.method.eq_ignore_ascii_case("CONNECT") {
        let flow = Flow::new(&shared, &plan, peer, snap, accepted);
        tunnel(shared, flow, client, head, buf, active).await
    } else {
        // Each request is a flow of its own, with its own context.
        let _active = active;
        let io = Rewind {
            prefix: Bytes::from(buf),
            inner: client,
        };
        let forced = shared.clone();
        let idle = plan.connection().idle_timeout;
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
    spec: &sluice_api::PeekOptions,
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
    let users = match &plan.spec.front {
        super::Front::HttpProxy { users, .. } => users.as_slice(),
        _ => &[],
    };
    if users.is_empty() {
        return Ok(None);
    }
    let (user, pass) = header.and_then(basic_credentials).ok_or(())?;
    let u = users.iter().find(|u| u.name == user).ok_or(())?;
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

/// Carries out a stop where no hyper serves the connection (the first
/// request head, `CONNECT`): the answer [`edge::answer`] gives, if any,
/// then the record.
async fn stopped(client: &mut TcpStream, shared: &Shared, flow: Flow, stop: Stop) -> Option<flow::Relaying> {
    if let Some(a) = edge::answer(flow.ctx.decision.as_ref(), stop) {
        let _ = respond(client, &a).await;
    }
    flow.end(shared, stop);
    None
}

async fn respond(client: &mut TcpStream, a: &edge::Answer<'_>) -> std::io::Result<()> {
    let body = edge::body(a.message, a.rule, a.reason);
    let mut extra = String::new();
    if a.status.code == 407 {
        extra.push_str("Proxy-Authenticate: Basic realm=\"sluice\"\r\n");
    }
    let msg = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Sluice-Rule: {}\r\nX-Sluice-Reason: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        a.status.code,
        a.status.text,
        body.len(),
        a.rule,
        a.reason,
    );
    client.write_all(msg.as_bytes()).await?;
    client.shutdown().await
}

/// The request's target host, as the name or address the pipeline decides
/// on and dials (the cluster is the request's target).
fn target_host(ctx: &mut FlowContext, host: &Host) -> Result<(), ReasonCode> {
    match host {
        Host::Name(n) => ctx.name = Some(DomainName::parse(n).map_err(|_| ReasonCode::HttpBadHost)?),
        Host::Ipv4(ip) => ctx.dst_ip = Some((*ip).into()),
        Host::Ipv6(ip) => ctx.dst_ip = Some((*ip).into()),
    }
    Ok(())
}

/// A `CONNECT`: decided on its target while a status can still be sent,
/// answered `200`, then decided again on what the tunnel carries.
async fn tunnel(
    shared: Arc<Shared>,
    mut flow: Flow,
    mut client: TcpStream,
    head: RequestHead,
    mut buf: Vec<u8>,
    active: metrics::ActiveFlow,
) -> Option<flow::Relaying> {
    let decided = match connect_front(&mut flow, &head, &buf) {
        Ok(()) => flow.decide(&shared, Transport::Tls, None).await,
        Err(stop) => Err(stop),
    };
    // The target was resolved and screened before answering, so a target
    // the guard refuses (a name resolving to 169.254.169.254) or one that
    // does not resolve still gets a response that says so.
    let fwd = match decided {
        Ok(fwd) => fwd,
        Err(stop) => return stopped(&mut client, &shared, flow, stop).await,
    };
    // Boxed: only a chain with an HTTP filter pays for that future's state.
    let through = if fwd.chain.filters.iter().any(|f| f.wants_http()) {
        Box::pin(connect_through_filters(&fwd.chain, &mut flow.ctx, &head, &buf)).await
    } else {
        Ok(Cow::Borrowed(CONNECTION_ESTABLISHED))
    };
    let established = match through {
        Ok(answer) => answer,
        Err(reply) => {
            let resp = local_reply_bytes(&reply);
            let _ = client.write_all(&resp).await;
            let _ = client.shutdown().await;
            flow.end(&shared, Stop::Refused);
            return None;
        }
    };
    if client.write_all(&established).await.is_err() {
        flow.end(&shared, Stop::failed("client-error"));
        return None;
    }

    // What the client sends through the tunnel decides again.
    buf.drain(..head.head_len.min(buf.len()));
    let started = Instant::now();
    let plan = flow.ctx.plan.clone();
    let peek_options = plan.peek();
    let peeked = tokio::select! {
        biased;
        p = Box::pin(peek::peek(&mut client, &mut buf, &peek_options)) => p,
        () = shared.forced() => Peeked::Failed(ReasonCode::Shutdown),
    };
    plan.metrics.classified(started.elapsed());
    // Decided again, on what the tunnel carries; the anti-evasion filter
    // holds it against the target.
    let ctx = &mut flow.ctx;
    ctx.decision = None;
    ctx.tunnel = true;
    let extras = ctx.extras_mut();
    extras.changed_by.clear();
    extras.target = head.host;
    let target_name = ctx.name.clone();
    match peeked {
        Peeked::Tls(h) => {
            peek::from_hello(ctx, h);
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
        Peeked::Failed(reason) => deny(ctx, Decision::refused(reason)),
    }
    // After the `200` there is no status to send: a stop closes the tunnel.
    match flow.decide_again(fwd).await {
        Ok(fwd) => flow::connect_and_replay(shared, flow, fwd, client, buf, active).await,
        Err(stop) => {
            flow.end(&shared, stop);
            None
        }
    }
}

/// A `CONNECT` through the chain's HTTP filters: its request head
/// (`:method` `CONNECT`, `:authority` the target, its headers), then the
/// `200` that answers it, which a filter may add headers to. Returns the
/// `200` to send, or the local reply that denies the tunnel. The exchange
/// ends there: what the tunnel carries is not HTTP the filters see.
async fn connect_through_filters(
    chain: &super::FilterChain,
    ctx: &mut FlowContext,
    head: &RequestHead,
    buf: &[u8],
) -> Result<Cow<'static, [u8]>, super::LocalReply> {
    let mut exchanges = Exchanges::begin(chain, ctx)?;
    let outcome = async {
        let mut fields: super::HttpFields = vec![
            (":method".to_owned(), b"CONNECT".to_vec()),
            (
                ":authority".to_owned(),
                ctx.connect_target.clone().unwrap_or_default().into_bytes(),
            ),
        ];
        let head_bytes = buf.get(..head.head_len).unwrap_or(&[]);
        let mut parsed = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut parsed);
        if req.parse(head_bytes).is_ok() {
            fields.extend(
                req.headers
                    .iter()
                    .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec())),
            );
        }
        if let Err(r) = exchanges
            .run(ctx, Stage::RequestHeaders { end: false }, &mut fields)
            .await
        {
            return Err(reply_through_filters(&mut exchanges, ctx, r).await);
        }
        let mut answer: super::HttpFields = vec![(":status".to_owned(), b"200".to_vec())];
        exchanges
            .run(ctx, Stage::ResponseHeaders { end: false }, &mut answer)
            .await?;
        let mut out = b"HTTP/1.1 200 Connection established\r\n".to_vec();
        for (k, v) in answer.iter().filter(|(k, _)| !k.starts_with(':')) {
            if hyper::header::HeaderName::from_bytes(k.as_bytes()).is_ok()
                && hyper::header::HeaderValue::from_bytes(v).is_ok()
            {
                out.extend_from_slice(k.as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(v);
                out.extend_from_slice(b"\r\n");
            }
        }
        out.extend_from_slice(b"\r\n");
        Ok(Cow::Owned(out))
    }
    .await;
    ctx.extras_mut().annotations.extend(exchanges.finish());
    outcome
}

/// The answer to a `CONNECT` no filter added to.
const CONNECTION_ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

/// A local reply as HTTP/1.1 bytes, closing the connection.
fn local_reply_bytes(r: &super::LocalReply) -> Vec<u8> {
    let reason = StatusCode::from_u16(r.status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let mut out = format!("HTTP/1.1 {} {reason}\r\n", r.status).into_bytes();
    for (k, v) in &r.headers {
        let lower = k.to_ascii_lowercase();
        if lower == "content-length" || lower == "connection" {
            continue;
        }
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("content-length: {}\r\nconnection: close\r\n\r\n", r.body.len()).as_bytes());
    out.extend_from_slice(&r.body);
    out
}

/// The `CONNECT` request, read into the flow's context: credentials and
/// the target.
fn connect_front(flow: &mut Flow, head: &RequestHead, buf: &[u8]) -> Result<(), Stop> {
    let ctx = &mut flow.ctx;
    ctx.protocol = Protocol::Tls;
    // Named in the record even when refused before the target is decided on.
    if let (Some(h), Some(p)) = (&head.host, head.port) {
        ctx.connect_target = Some(format!("{h}:{p}"));
    }
    let head_bytes = buf.get(..head.head_len).unwrap_or(&[]);
    let plan = ctx.plan.clone();
    match authenticate(&plan, &ctx.snapshot, header_in_head(head_bytes, "proxy-authorization")) {
        Ok(identity) => ctx.identity = identity,
        Err(()) => return Err(flow.refuse(ReasonCode::ProxyAuthRequired)),
    }
    let (Some(host), Some(port)) = (&head.host, head.port) else {
        return Err(flow.refuse(ReasonCode::HttpBadTarget));
    };
    ctx.port = port;
    ctx.connect_target = Some(format!("{host}:{port}"));
    if let Err(reason) = target_host(ctx, host) {
        return Err(flow.refuse(reason));
    }
    Ok(())
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

/// A body held whole: one data frame and, if any, one trailers frame (a
/// body HTTP filters have seen, or a plugin's call out).
#[derive(Debug)]
pub struct Buffered {
    data: Option<Bytes>,
    trailers: Option<hyper::HeaderMap>,
}

impl Buffered {
    pub fn new(data: Bytes, trailers: hyper::HeaderMap) -> Self {
        Self {
            data: (!data.is_empty()).then_some(data),
            trailers: (!trailers.is_empty()).then_some(trailers),
        }
    }
}

impl Body for Buffered {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// The hyper response to a request that stopped with `stop` (see
/// [`edge::answer`]). A request has someone to answer, so a refusal that
/// would just close the connection is answered `400`.
fn stopped_response(decision: Option<&Decision>, stop: Stop) -> Response<ProxyBody> {
    let a = edge::answer(decision, stop).unwrap_or(edge::Answer {
        status: edge::Status {
            code: 400,
            text: "Bad Request",
        },
        rule: decision.map_or("-", |d| d.rule.as_str()),
        reason: decision.map_or("no-decision", |d| d.reason.as_str()),
        message: "Sluice refused this request.",
    });
    let body = edge::body(a.message, a.rule, a.reason);
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = StatusCode::from_u16(a.status.code).unwrap_or(StatusCode::FORBIDDEN);
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    if let Ok(v) = hyper::header::HeaderValue::from_str(a.rule) {
        h.insert("x-sluice-rule", v);
    }
    if let Ok(v) = hyper::header::HeaderValue::from_str(a.reason) {
        h.insert("x-sluice-reason", v);
    }
    if a.status.code == 407 {
        h.insert(
            hyper::header::PROXY_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Basic realm=\"sluice\""),
        );
    }
    r
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

impl ConnState {
    async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let snap = self.shared.snapshot.load_full();
        // The listener as it is now: a reload reaches requests on
        // connections kept alive from before it.
        let plan = snap
            .plan(&self.plan.label)
            .cloned()
            .unwrap_or_else(|| self.plan.clone());
        let mut flow = Flow::new(&self.shared, &plan, self.peer, snap, Instant::now());
        let decided = match request_front(&mut flow, &req) {
            Ok(()) => flow.decide(&self.shared, Transport::RawBuffer, None).await,
            Err(stop) => Err(stop),
        };
        let fwd = match decided {
            Ok(fwd) => fwd,
            Err(stop) => return self.stopped(flow, stop),
        };
        let mut exchanges = match Exchanges::begin(&fwd.chain, &mut flow.ctx) {
            Ok(x) => x,
            Err(reply) => return self.replied(flow, Exchanges::default(), reply),
        };
        let (mut parts, body) = req.into_parts();
        if !exchanges.is_empty()
            && let Err(reply) = request_head_through_filters(&mut exchanges, &mut flow.ctx, &mut parts, &body).await
        {
            let reply = reply_through_filters(&mut exchanges, &mut flow.ctx, reply).await;
            return self.replied(flow, exchanges, reply);
        }
        let bodies = exchanges.reads_bodies();
        // From here the bodies may outlive this handler: the exchange (and
        // the record) is theirs as much as its.
        let ex = Exchange::new(self.shared.clone(), flow, exchanges);
        // The head goes on with what the filters let go of first: a body
        // they hold whole is refused before anything is sent.
        let body = if bodies && !body.is_end_stream() {
            match body_through_filters(body, &ex, Side::Request, &mut parts.headers).await {
                Ok(body) => body,
                Err(ended) => return ended_before(&ex, ended).await,
            }
        } else {
            Passed::Left(body)
        };
        let started = Instant::now();
        let opts = ConnectOptions {
            timeout: plan.connection().connect_timeout,
            ..ConnectOptions::default()
        };
        let upstream = match connect(&fwd.addrs, &opts).await {
            Ok(c) => {
                metrics::connect_latency("ok", started.elapsed());
                c
            }
            Err(e) => {
                metrics::connect_latency(e.reason_code(), started.elapsed());
                let stop = Stop::Failed {
                    reason: e.reason_code(),
                    dst: fwd.addrs.first().copied(),
                };
                return ended_before(&ex, Ended::Stop(stop)).await;
            }
        };
        let dst = upstream.addr;
        ex.live.lock().await.dst = Some(dst);
        let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(upstream.stream)).await {
            Ok(x) => x,
            Err(_) => return ended_before(&ex, Ended::Stop(Stop::failed("upstream-error"))).await,
        };
        tokio::spawn(async move {
            let _ = conn.await;
        });
        parts.uri = parts.uri.path_and_query().map_or_else(
            || hyper::Uri::from_static("/"),
            |pq| {
                hyper::Uri::from_maybe_shared(Bytes::copy_from_slice(pq.as_str().as_bytes()))
                    .unwrap_or_else(|_| hyper::Uri::from_static("/"))
            },
        );
        strip_hop_by_hop(&mut parts.headers);
        // The request body is counted as it is sent (it may still be going
        // when the response comes); the record waits for both bodies.
        let body = Counted {
            inner: body,
            exchange: Some(ex.clone()),
            side: Side::Request,
        };
        let sent = sender.send_request(Request::from_parts(parts, body)).await;
        // The request's filters may have ended it while it was sent.
        let ended = ex.live.lock().await.ended.take();
        let resp = match (sent, ended) {
            (_, Some(ended)) => return ended_before(&ex, ended).await,
            (Ok(resp), None) => resp,
            (Err(_), None) => return ended_before(&ex, Ended::Stop(Stop::failed("upstream-error"))).await,
        };
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let mut live = ex.live.lock().await;
        if !live.filters.is_empty() {
            let Live { flow, filters, .. } = &mut *live;
            if let Err(reply) = response_head_through_filters(filters, &mut flow.ctx, &mut parts, &body).await {
                drop(live);
                return ended_before(&ex, Ended::Reply(reply)).await;
            }
        }
        drop(live);
        let body = if bodies && !body.is_end_stream() {
            match body_through_filters(body, &ex, Side::Response, &mut parts.headers).await {
                Ok(body) => body,
                Err(ended) => return ended_before(&ex, ended).await,
            }
        } else {
            Passed::Left(body)
        };
        let body = Counted {
            inner: body,
            exchange: Some(ex),
            side: Side::Response,
        };
        Response::from_parts(parts, body.boxed_unsync())
    }

    /// Answers a request that stopped, and writes its record.
    fn stopped(&self, flow: Flow, stop: Stop) -> Response<ProxyBody> {
        let resp = stopped_response(flow.ctx.decision.as_ref(), stop);
        flow.end(&self.shared, stop);
        resp
    }

    /// Answers a request with a filter's local reply (an enforced denial),
    /// and writes its record.
    fn replied(&self, mut flow: Flow, mut exchanges: Exchanges, reply: super::LocalReply) -> Response<ProxyBody> {
        let resp = local_response(reply, flow.ctx.decision.as_ref());
        flow.ctx.extras_mut().annotations.extend(exchanges.finish());
        flow.end(&self.shared, Stop::Refused);
        resp
    }
}

/// The answer to an exchange that ended before its response began: a
/// filter's reply (sent back through the filters' response stages, as
/// Envoy encodes one) or the stop's. The record says why, and is written
/// when the bodies still holding the exchange let go.
async fn ended_before(ex: &Exchange, ended: Ended) -> Response<ProxyBody> {
    let mut live = ex.live.lock().await;
    live.end_with(&ended);
    let Live { flow, filters, .. } = &mut *live;
    match ended {
        Ended::Reply(reply) => {
            let reply = reply_through_filters(filters, &mut flow.ctx, reply).await;
            local_response(reply, flow.ctx.decision.as_ref())
        }
        Ended::Stop(stop) => stopped_response(flow.ctx.decision.as_ref(), stop),
    }
}

/// A message's body on its way through the filters that read bodies: its
/// first round runs now, and `headers` (the message's head, not sent yet)
/// are framed for what the filters let go of; the rest streams as the
/// returned body is read.
async fn body_through_filters(
    body: Incoming,
    ex: &Arc<Exchange>,
    side: Side,
    headers: &mut hyper::HeaderMap,
) -> Result<Passed, Ended> {
    let mut pump = Pump::new(body, ex.clone(), side);
    match pump.next().await {
        Some(Ok(frame)) => pump.unread(frame),
        Some(Err(ended)) => return Err(ended),
        None => {}
    }
    pump.frame(headers);
    Ok(Passed::Right(Filtered::new(pump)))
}

/// A request's head on its way through the HTTP filters; it goes on as
/// they left it.
async fn request_head_through_filters(
    exchanges: &mut Exchanges,
    ctx: &mut FlowContext,
    parts: &mut hyper::http::request::Parts,
    body: &Incoming,
) -> Result<(), super::LocalReply> {
    let end = body.is_end_stream();
    let mut fields = request_fields(parts);
    if exchanges.run(ctx, Stage::RequestHeaders { end }, &mut fields).await? {
        // `host` is shown as `:authority`, whose changes are ignored (the
        // flow was decided on it): it goes on as it came.
        let host = parts.headers.get(hyper::header::HOST).cloned();
        set_fields(&mut parts.headers, &fields);
        if let Some(h) = host {
            parts.headers.insert(hyper::header::HOST, h);
        }
    }
    Ok(())
}

/// A response's head on its way through the HTTP filters, like a request's.
async fn response_head_through_filters(
    exchanges: &mut Exchanges,
    ctx: &mut FlowContext,
    parts: &mut hyper::http::response::Parts,
    body: &Incoming,
) -> Result<(), super::LocalReply> {
    let end = body.is_end_stream();
    let mut fields: super::HttpFields = vec![(":status".to_owned(), parts.status.as_str().as_bytes().to_vec())];
    fields.extend(fields_of(&parts.headers));
    if exchanges.run(ctx, Stage::ResponseHeaders { end }, &mut fields).await? {
        if let Some(status) = fields
            .iter()
            .find(|(k, _)| k == ":status")
            .and_then(|(_, v)| StatusCode::from_bytes(v).ok())
        {
            parts.status = status;
        }
        set_fields(&mut parts.headers, &fields);
    }
    Ok(())
}

/// A filter's local reply as a response.
fn local_response(r: super::LocalReply, decision: Option<&Decision>) -> Response<ProxyBody> {
    let mut resp = Response::builder().status(r.status);
    for (k, v) in &r.headers {
        resp = resp.header(k.as_str(), v.as_slice());
    }
    // As Envoy answers a local reply with a body and no type of its own.
    if !r.body.is_empty() && !r.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type")) {
        resp = resp.header(hyper::header::CONTENT_TYPE, "text/plain");
    }
    resp.body(
        Full::new(Bytes::from(r.body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    )
    .unwrap_or_else(|_| stopped_response(decision, Stop::Refused))
}

/// A request's head as HTTP filters see it: the pseudo-headers first;
/// `host` is `:authority` (the URI's, which the flow was decided on).
fn request_fields(parts: &hyper::http::request::Parts) -> super::HttpFields {
    let uri = &parts.uri;
    // In Envoy's order, so a plugin that lists them sees the same.
    let mut fields = vec![
        (
            ":authority".to_owned(),
            uri.authority().map_or("", |a| a.as_str()).as_bytes().to_vec(),
        ),
        (":scheme".to_owned(), b"http".to_vec()),
        (
            ":path".to_owned(),
            uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes().to_vec(),
        ),
        (":method".to_owned(), parts.method.as_str().as_bytes().to_vec()),
    ];
    fields.extend(fields_of(&parts.headers).into_iter().filter(|(k, _)| k != "host"));
    fields
}

/// An absolute-form request, read into the flow's context: credentials,
/// the URI's target, and its Host header held against it.
fn request_front(flow: &mut Flow, req: &Request<Incoming>) -> Result<(), Stop> {
    let ctx = &mut flow.ctx;
    ctx.protocol = Protocol::Http;
    // Named in the record even when refused before the target is decided on.
    ctx.connect_target = req
        .uri()
        .authority()
        .map(|a| format!("{}:{}", a.host(), a.port_u16().unwrap_or(80)));
    let plan = ctx.plan.clone();
    let credentials = req
        .headers()
        .get(hyper::header::PROXY_AUTHORIZATION)
        .map(|v| v.as_bytes());
    match authenticate(&plan, &ctx.snapshot, credentials) {
        Ok(identity) => ctx.identity = identity,
        Err(()) => return Err(flow.refuse(ReasonCode::ProxyAuthRequired)),
    }
    if req.method() == hyper::Method::CONNECT {
        return Err(flow.refuse(ReasonCode::ConnectNotFirst));
    }
    let Some(authority) = req.uri().authority() else {
        return Err(flow.refuse(ReasonCode::HttpBadTarget));
    };
    if req.uri().scheme_str().is_some_and(|s| !s.eq_ignore_ascii_case("http")) {
        return Err(flow.refuse(ReasonCode::HttpUnsupportedScheme));
    }
    let raw_host = authority.host().trim_start_matches('[').trim_end_matches(']');
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
        Err(_) if parse_ip_lenient(raw_host).is_some() => return Err(flow.refuse(ReasonCode::HttpBadHost)),
        Err(_) => Host::Name(raw_host.to_owned()),
    };
    if let Some(h) = &ctx.host
        && !same_host(&host, h)
    {
        return Err(flow.refuse(ReasonCode::HttpConflictingHost));
    }
    if let Err(reason) = target_host(ctx, &host) {
        return Err(flow.refuse(reason));
    }
    Ok(())
}

/// Whether a `Host` header (with or without a port) names `host`.
fn same_host(host: &Host, header: &str) -> bool {
    let header_host = header
        .rsplit_once(':')
        .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
        .map_or(header, |(a, _)| a);
    let header_host = header_host.trim_start_matches('[').trim_end_matches(']');
    match (host, header_host.parse::<IpAddr>()) {
        (Host::Name(n), Err(_)) => n
            .trim_end_matches('.')
            .eq_ignore_ascii_case(header_host.trim_end_matches('.')),
        (Host::Ipv4(a), Ok(b)) => IpAddr::V4(*a) == b,
        (Host::Ipv6(a), Ok(b)) => IpAddr::V6(*a) == b,
        _ => false,
    }
}
