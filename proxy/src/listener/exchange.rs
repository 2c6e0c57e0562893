//! HTTP filters on an exchange the explicit proxy sees: an absolute-form
//! request and its response, or a `CONNECT` and its `200`. The proxy shows
//! each filter that takes part (see [`super::HttpExchange`]) the request
//! head, then the body piece by piece as it arrives, then the trailers, and
//! the same for the response, and sends on what the filters leave.
//!
//! Bodies stream, as in Envoy: a piece every filter lets go of is sent on
//! at once, so a filter that only reads headers (or judges each piece) adds
//! no buffering and no size limit. A filter that buffers holds the body up
//! to its `max_body`, so only a filter that wants a body whole pays for it.
//! Once a request's headers are through, the exchange is shared by the
//! handler and the two bodies ([`Exchange`]), and its record is written
//! when the last of them lets go.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;

use super::filter::{Decision, FlowContext, HttpFields, HttpStatus, LocalReply, NetworkFilter};
use super::flow;
use super::pipeline::{Flow, Stop};
use super::{FilterStatus, HttpExchange, Shared};
use crate::telemetry::audit::FlowRecord;

/// The body of a response the proxy sends.
pub(super) type ProxyBody = UnsyncBoxBody<Bytes, BodyError>;

/// What a body relayed to or from the upstream can fail with.
pub(super) type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// The part each HTTP filter of the chain takes in one exchange, in chain
/// order, and what each holds of the bodies. Empty (and free) for a chain
/// without HTTP filters.
#[derive(Default)]
pub(super) struct Exchanges {
    filters: Vec<(Arc<dyn NetworkFilter>, Box<dyn HttpExchange>)>,
    /// Per side, per filter: the body the filter said `Buffer` to.
    held: [Vec<Vec<u8>>; 2],
}

/// Which head or trailers of an exchange the filters are shown.
#[derive(Debug, Clone, Copy)]
pub(super) enum Stage {
    RequestHeaders { end: bool },
    RequestTrailers,
    ResponseHeaders { end: bool },
    ResponseTrailers,
}

/// Which message of an exchange a body belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    Request,
    Response,
}

impl Side {
    /// The close reason when a filter holds more of the body than its
    /// `max_body`.
    fn too_large(self) -> &'static str {
        match self {
            Side::Request => "request-body-too-large",
            Side::Response => "response-body-too-large",
        }
    }

    /// The close reason when the body cannot be read or sent as framed.
    fn failed(self) -> &'static str {
        match self {
            Side::Request => "client-error",
            Side::Response => "upstream-error",
        }
    }

    fn trailers(self) -> Stage {
        match self {
            Side::Request => Stage::RequestTrailers,
            Side::Response => Stage::ResponseTrailers,
        }
    }

    fn index(self) -> usize {
        match self {
            Side::Request => 0,
            Side::Response => 1,
        }
    }
}

/// How filters ended an exchange early.
#[derive(Debug)]
pub(super) enum Ended {
    Reply(LocalReply),
    Stop(Stop),
}

impl Exchanges {
    /// Begins the exchange with every HTTP filter of `chain`. `Err`: a
    /// filter that could not take part denied it (fail closed), and the
    /// denial stands.
    pub(super) fn begin(chain: &super::FilterChain, ctx: &mut FlowContext) -> Result<Self, LocalReply> {
        let mut out = Exchanges::default();
        for (i, f) in chain.filters.iter().enumerate().filter(|(_, f)| f.wants_http()) {
            match f.http_exchange(ctx, i) {
                Ok(Some(x)) => out.filters.push((f.clone(), x)),
                Ok(None) => {}
                Err(status) => {
                    if let Some(r) = judge(ctx, f.name(), status) {
                        out.finish();
                        return Err(r);
                    }
                }
            }
        }
        Ok(out)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// Whether any filter is shown bodies.
    pub(super) fn reads_bodies(&self) -> bool {
        self.filters.iter().any(|(_, x)| x.max_body() > 0)
    }

    /// Shows `stage` to every filter in turn: whether any changed the
    /// part, or `Err` with a local reply that stands (an enforced denial),
    /// which ends the exchange.
    pub(super) async fn run(
        &mut self,
        ctx: &mut FlowContext,
        stage: Stage,
        fields: &mut HttpFields,
    ) -> Result<bool, LocalReply> {
        let mut changed = false;
        for (f, x) in &mut self.filters {
            let status = match stage {
                Stage::RequestHeaders { end } => x.request_headers(fields, end).await,
                Stage::RequestTrailers => x.request_trailers(fields).await,
                Stage::ResponseHeaders { end } => x.response_headers(fields, end).await,
                Stage::ResponseTrailers => x.response_trailers(fields).await,
            };
            changed |= matches!(status, HttpStatus::Changed);
            if let Some(r) = judge(ctx, f.name(), status) {
                return Err(r);
            }
        }
        Ok(changed)
    }

    /// Shows one piece of a body (`end`: the last) to the filters that
    /// read bodies, in chain order, and returns what the last of them let
    /// go of, to send on. A filter that says `Buffer` holds what it was
    /// shown and is shown it again with the next piece appended (nothing
    /// of it reaches later filters meanwhile). A filter is never shown
    /// more than its `max_body` at once: a larger piece is cut, and a
    /// filter that holds `max_body` and is sent more ends the exchange.
    pub(super) async fn body(
        &mut self,
        ctx: &mut FlowContext,
        side: Side,
        piece: Vec<u8>,
        end: bool,
    ) -> Result<Vec<u8>, Ended> {
        let Exchanges { filters, held } = self;
        let held = &mut held[side.index()];
        held.resize_with(filters.len(), Vec::new);
        let mut data = piece;
        for ((f, x), held) in filters.iter_mut().zip(held.iter_mut()) {
            let max = x.max_body();
            if max == 0 {
                continue;
            }
            let mut out = Vec::new();
            let total = data.len();
            let mut at = 0;
            loop {
                let room = max.saturating_sub(held.len());
                let len = (total - at).min(room);
                if len == 0 && at < total {
                    return Err(Ended::Stop(Stop::failed(side.too_large())));
                }
                if held.is_empty() && at == 0 && len == total {
                    *held = std::mem::take(&mut data);
                } else {
                    held.extend_from_slice(data.get(at..at + len).unwrap_or_default());
                }
                at += len;
                let last = at >= total;
                let status = match side {
                    Side::Request => x.request_body(held, end && last).await,
                    Side::Response => x.response_body(held, end && last).await,
                };
                let keep = matches!(status, HttpStatus::Buffer) && !(end && last);
                if let Some(r) = judge(ctx, f.name(), status) {
                    return Err(Ended::Reply(r));
                }
                if !keep {
                    if out.is_empty() {
                        out = std::mem::take(held);
                    } else {
                        out.append(held);
                    }
                }
                if last {
                    break;
                }
            }
            data = out;
        }
        Ok(data)
    }

    /// Ends every filter's part; their notes for the record.
    pub(super) fn finish(&mut self) -> Vec<(String, String)> {
        self.filters.iter_mut().flat_map(|(_, x)| x.finish()).collect()
    }
}

/// Applies a filter's word on an exchange: a reply is a denial, which
/// stands unless watched.
fn judge(ctx: &mut FlowContext, filter: &str, status: HttpStatus) -> Option<LocalReply> {
    let HttpStatus::Reply(reply, decision) = status else {
        return None;
    };
    flow::apply(ctx, filter, FilterStatus::Deny(decision));
    ctx.decision.as_ref().is_some_and(Decision::blocks).then_some(reply)
}

/// A request once its head is through the filters: shared by the handler
/// and the bodies still streaming, and written to the audit log, with the
/// filters' notes, when the last of them lets go.
pub(super) struct Exchange {
    shared: Arc<Shared>,
    pub(super) live: tokio::sync::Mutex<Live>,
    /// Body bytes sent on, each way.
    pub(super) up: AtomicU64,
    pub(super) down: AtomicU64,
}

/// What the handler and the bodies of an exchange take turns at.
pub(super) struct Live {
    pub(super) flow: Flow,
    pub(super) filters: Exchanges,
    /// The upstream, once connected (or the one that failed).
    pub(super) dst: Option<SocketAddr>,
    pub(super) close_reason: &'static str,
    /// A body's filters ended the exchange after its head had gone: the
    /// handler answers with it if it still can.
    pub(super) ended: Option<Ended>,
}

impl Exchange {
    pub(super) fn new(shared: Arc<Shared>, flow: Flow, filters: Exchanges) -> Arc<Self> {
        Arc::new(Exchange {
            shared,
            live: tokio::sync::Mutex::new(Live {
                flow,
                filters,
                dst: None,
                close_reason: "completed",
                ended: None,
            }),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
        })
    }
}

impl Live {
    /// Records how the exchange ended: a denial, or a stop's reason.
    pub(super) fn end_with(&mut self, ended: &Ended) {
        self.close_reason = match ended {
            Ended::Reply(_) | Ended::Stop(Stop::Refused) => "denied",
            Ended::Stop(Stop::Failed { reason, dst }) => {
                if self.dst.is_none() {
                    self.dst = *dst;
                }
                reason
            }
        };
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        let live = self.live.get_mut();
        let mut rec = match live.dst {
            Some(dst) => live.flow.record_to(dst),
            None => FlowRecord::of_flow(&live.flow.ctx),
        };
        for (k, v) in live.filters.finish() {
            rec.annotations.insert(k, v);
        }
        rec.close_reason = Cow::Borrowed(live.close_reason);
        rec.bytes_up += self.up.load(Ordering::Relaxed);
        rec.bytes_down += self.down.load(Ordering::Relaxed);
        live.flow.write(&self.shared, rec);
    }
}

/// A body on its way through the filters that read bodies: each piece
/// as it arrives, then the trailers.
pub(super) struct Pump {
    inner: Incoming,
    exchange: Arc<Exchange>,
    side: Side,
    /// Frames ready to send on: at most the data the filters let go of
    /// and the trailers.
    out: VecDeque<Frame<Bytes>>,
    /// The filters have been shown the end of the data.
    shown_end: bool,
    done: bool,
    bytes_in: u64,
    bytes_out: u64,
    /// The length the message's head went with, once it has gone.
    declared: Option<u64>,
}

impl Pump {
    pub(super) fn new(inner: Incoming, exchange: Arc<Exchange>, side: Side) -> Self {
        Pump {
            inner,
            exchange,
            side,
            out: VecDeque::new(),
            shown_end: false,
            done: false,
            bytes_in: 0,
            bytes_out: 0,
            declared: None,
        }
    }

    /// The body's next frame as the filters leave it; `None` at its end.
    pub(super) async fn next(&mut self) -> Option<Result<Frame<Bytes>, Ended>> {
        loop {
            if let Some(f) = self.out.pop_front() {
                return Some(Ok(f));
            }
            if self.done {
                return None;
            }
            let step = match self.inner.frame().await {
                None => {
                    self.done = true;
                    self.show(Vec::new(), true).await
                }
                Some(Err(_)) => {
                    self.done = true;
                    Err(Ended::Stop(Stop::failed(self.side.failed())))
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        self.bytes_in += data.len() as u64;
                        let end = self.inner.is_end_stream();
                        self.done = end;
                        self.show(Vec::from(data), end).await
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(trailers) => {
                            self.done = true;
                            match self.show(Vec::new(), true).await {
                                Ok(()) => self.trailers(trailers).await,
                                Err(e) => Err(e),
                            }
                        }
                        Err(_) => Ok(()),
                    },
                },
            };
            if let Err(e) = step {
                self.done = true;
                self.out.clear();
                return Some(Err(e));
            }
            if self.done
                && let Some(declared) = self.declared
                && declared != self.bytes_out
            {
                tracing::warn!(
                    declared,
                    sent = self.bytes_out,
                    "an HTTP filter changed the length of a body whose head had gone with its content-length; \
                     a filter that changes a body's length must remove content-length in its headers callback"
                );
                self.out.clear();
                return Some(Err(Ended::Stop(Stop::failed(self.side.failed()))));
            }
        }
    }

    /// Shows the filters one piece of the body, once (`end`: the last);
    /// what they let go of is queued.
    async fn show(&mut self, piece: Vec<u8>, end: bool) -> Result<(), Ended> {
        if self.shown_end {
            return Ok(());
        }
        self.shown_end = end;
        let mut live = self.exchange.live.lock().await;
        let Live { flow, filters, .. } = &mut *live;
        let data = filters.body(&mut flow.ctx, self.side, piece, end).await?;
        if !data.is_empty() {
            self.bytes_out += data.len() as u64;
            self.out.push_back(Frame::data(Bytes::from(data)));
        }
        Ok(())
    }

    async fn trailers(&mut self, trailers: hyper::HeaderMap) -> Result<(), Ended> {
        let mut fields = fields_of(&trailers);
        let mut live = self.exchange.live.lock().await;
        let Live { flow, filters, .. } = &mut *live;
        let changed = filters
            .run(&mut flow.ctx, self.side.trailers(), &mut fields)
            .await
            .map_err(Ended::Reply)?;
        let trailers = if changed { header_map(&fields) } else { trailers };
        if !trailers.is_empty() {
            self.out.push_back(Frame::trailers(trailers));
        }
        Ok(())
    }

    /// Sets how the message whose body this is goes on, once the filters
    /// have had the first piece (its head goes with what they let go of):
    /// with the exact length when the filters had all of it, else as it
    /// came unless the filters changed its length so far, else in chunks.
    pub(super) fn frame(&mut self, headers: &mut hyper::HeaderMap) {
        let trailers = self.out.iter().any(Frame::is_trailers);
        if self.done && !trailers {
            framed(headers, self.bytes_out);
        } else if self.bytes_out != self.bytes_in {
            framed_in_chunks(headers);
        }
        self.declared = headers
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok());
    }

    /// Puts a frame back in front (the first, taken to frame the head).
    pub(super) fn unread(&mut self, frame: Frame<Bytes>) {
        self.out.push_front(frame);
    }
}

/// A body as it came, or as the filters that read bodies leave it.
pub(super) type Passed = http_body_util::Either<Incoming, Filtered>;

/// The filters' [`Pump`] as a body hyper sends on: each frame is the pump
/// run to its next output. When the filters end the exchange, the body
/// fails (the message is cut short) and the exchange records why.
pub(super) struct Filtered {
    state: Pumping,
}

enum Pumping {
    Idle(Box<Pump>),
    Busy(PumpFuture),
    Done,
}

/// The pump run to its next frame; an end the filters made is recorded
/// in the exchange on the way, and only its close reason comes out.
type PumpFuture = Pin<Box<dyn Future<Output = (Box<Pump>, Option<Result<Frame<Bytes>, &'static str>>)> + Send>>;

impl Filtered {
    pub(super) fn new(pump: Pump) -> Self {
        Filtered {
            state: Pumping::Idle(Box::new(pump)),
        }
    }
}

/// A body the filters ended.
#[derive(Debug, thiserror::Error)]
#[error("the HTTP filters ended this body: {0}")]
struct BodyEnded(&'static str);

impl Body for Filtered {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        loop {
            match std::mem::replace(&mut self.state, Pumping::Done) {
                Pumping::Done => return Poll::Ready(None),
                Pumping::Idle(mut pump) => {
                    if let Some(f) = pump.out.pop_front() {
                        self.state = Pumping::Idle(pump);
                        return Poll::Ready(Some(Ok(f)));
                    }
                    self.state = Pumping::Busy(Box::pin(async move {
                        let next = match pump.next().await {
                            Some(Ok(f)) => Some(Ok(f)),
                            None => None,
                            Some(Err(ended)) => {
                                // The handler answers with a denial if the
                                // response has not begun; else the message
                                // is cut short.
                                let mut live = pump.exchange.live.lock().await;
                                live.end_with(&ended);
                                let why = live.close_reason;
                                live.ended.get_or_insert(ended);
                                Some(Err(why))
                            }
                        };
                        (pump, next)
                    }));
                }
                Pumping::Busy(mut fut) => match fut.as_mut().poll(cx) {
                    Poll::Pending => {
                        self.state = Pumping::Busy(fut);
                        return Poll::Pending;
                    }
                    Poll::Ready((pump, next)) => match next {
                        Some(Ok(f)) => {
                            self.state = Pumping::Idle(pump);
                            return Poll::Ready(Some(Ok(f)));
                        }
                        None => return Poll::Ready(None),
                        Some(Err(why)) => return Poll::Ready(Some(Err(Box::new(BodyEnded(why))))),
                    },
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, Pumping::Done)
    }
}

/// A body that counts what passes through it, and keeps its exchange (if
/// it has one) until it is done.
pub(super) struct Counted<B> {
    pub(super) inner: B,
    pub(super) exchange: Option<Arc<Exchange>>,
    pub(super) side: Side,
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
            && let Some(x) = &self.exchange
        {
            let counter = match self.side {
                Side::Request => &x.up,
                Side::Response => &x.down,
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

/// A local reply on its way back through the HTTP filters' response
/// stages, as Envoy encodes one: the filters see (and may change) its
/// headers and body like an upstream's. A filter's own reply there
/// replaces it.
pub(super) async fn reply_through_filters(
    exchanges: &mut Exchanges,
    ctx: &mut FlowContext,
    mut reply: LocalReply,
) -> LocalReply {
    if !reply.body.is_empty()
        && !reply
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        reply.headers.push(("content-type".to_owned(), b"text/plain".to_vec()));
    }
    let mut fields: HttpFields = vec![(":status".to_owned(), reply.status.to_string().into_bytes())];
    fields.extend(reply.headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())));
    let end = reply.body.is_empty();
    if let Err(r) = exchanges.run(ctx, Stage::ResponseHeaders { end }, &mut fields).await {
        return r;
    }
    let mut body = std::mem::take(&mut reply.body);
    if !end && exchanges.reads_bodies() {
        body = match exchanges.body(ctx, Side::Response, body, true).await {
            Ok(b) => b,
            Err(Ended::Reply(r)) => return r,
            // A reply larger than a filter's `max_body` goes on unseen.
            Err(Ended::Stop(_)) => std::mem::take(&mut reply.body),
        };
    }
    let status = fields
        .iter()
        .find(|(k, _)| k == ":status")
        .and_then(|(_, v)| std::str::from_utf8(v).ok()?.parse::<u16>().ok())
        .filter(|c| (200..=599).contains(c))
        .unwrap_or(reply.status);
    LocalReply {
        status,
        headers: fields.into_iter().filter(|(k, _)| !k.starts_with(':')).collect(),
        body,
    }
}

/// Frames a body whose whole length is known (and no trailers follow).
fn framed(headers: &mut hyper::HeaderMap, len: u64) {
    headers.remove(hyper::header::TRANSFER_ENCODING);
    headers.insert(hyper::header::CONTENT_LENGTH, hyper::header::HeaderValue::from(len));
}

/// Frames a body whose length is not known yet: in chunks.
fn framed_in_chunks(headers: &mut hyper::HeaderMap) {
    headers.remove(hyper::header::CONTENT_LENGTH);
    headers.insert(
        hyper::header::TRANSFER_ENCODING,
        hyper::header::HeaderValue::from_static("chunked"),
    );
}

pub(super) fn fields_of(map: &hyper::HeaderMap) -> HttpFields {
    map.iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect()
}

fn header_map(fields: &HttpFields) -> hyper::HeaderMap {
    let mut map = hyper::HeaderMap::new();
    set_fields(&mut map, fields);
    map
}

/// Replaces `headers` with `fields` (pseudo-headers aside; a field that is
/// not valid HTTP is dropped).
pub(super) fn set_fields(headers: &mut hyper::HeaderMap, fields: &HttpFields) {
    headers.clear();
    for (k, v) in fields.iter().filter(|(k, _)| !k.starts_with(':')) {
        if let (Ok(name), Ok(value)) = (
            hyper::header::HeaderName::from_bytes(k.as_bytes()),
            hyper::header::HeaderValue::from_bytes(v),
        ) {
            headers.append(name, value);
        }
    }
}
