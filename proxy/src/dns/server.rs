//! The DNS listener: UDP and TCP on one port, feeding the sans-IO engine.
//!
//! This is the `dns` listener of the data path. It owns the sockets and the
//! clock and nothing else: each message goes to [`DnsCore`], answers that
//! need no upstream (denied, cached, malformed) are sent inline from the
//! receive loop, and queries that need an upstream run as their own task,
//! bounded by `max_in_flight` and `query_timeout`. Audit records go to the
//! caller's [`DnsAuditSink`] — one that cannot take a record costs a counted
//! drop, never a stalled query. Shutdown is a [`CancellationToken`]: the
//! listener stops reading, and in-flight queries get up to `query_timeout`
//! to finish.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, mpsc};

use super::audit::DnsAuditSink;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::DnsError;
use super::audit::{DnsAuditRecord, DnsStats, Transport};
use super::bindings::Bindings;
use super::engine::{DnsCore, Pending, QueryContext, Reply, Step};
use super::forward::{ForwardError, Forwarder};

/// Client TCP connections served at once; more wait in the accept queue.
const MAX_TCP_CONNECTIONS: usize = 1_024;
/// Answers queued per TCP connection before its readers wait for the writer.
const TCP_WRITE_QUEUE: usize = 32;
/// Tries at finding a port free for both UDP and TCP when binding port 0.
const BIND_TRIES: usize = 16;

/// A bound DNS listener; [`DnsServer::run`] serves it until cancelled.
#[derive(Debug)]
pub struct DnsServer {
    udp: Arc<ListenerUdp>,
    tcp: TcpListener,
    local_addr: SocketAddr,
    current: Current,
}

/// What the listener serves with, swapped whole by [`DnsHandle::swap`]: a
/// batch of datagrams or a TCP connection takes the one in force when it
/// arrives and keeps it to its end.
type Current = Arc<arc_swap::ArcSwap<Shared>>;

/// Changes a running listener's engine in place (a reload that changed its
/// upstreams, cache or answers), on the same sockets: no query is refused
/// while it happens.
#[derive(Debug, Clone)]
pub struct DnsHandle {
    current: Current,
}

impl DnsHandle {
    /// Serves new queries with `core` (and a forwarder for its upstreams);
    /// queries in flight finish with the engine they started on.
    pub fn swap(&self, core: Arc<DnsCore>) {
        let old = self.current.load();
        let next = Shared::new(core, Arc::clone(&old.audit));
        self.current.store(Arc::new(next));
    }
}

#[derive(Debug)]
struct Shared {
    core: Arc<DnsCore>,
    forwarder: Forwarder,
    audit: Arc<dyn DnsAuditSink>,
    in_flight: Arc<Semaphore>,
    query_timeout: Duration,
    tcp_idle_timeout: Duration,
}

impl DnsServer {
    /// Binds UDP and TCP on `addr` (port 0 picks one port free for both);
    /// audit records go to `audit` (`try_send`: a full channel drops).
    pub async fn bind(
        addr: SocketAddr,
        core: Arc<DnsCore>,
        audit: mpsc::Sender<DnsAuditRecord>,
    ) -> Result<Self, DnsError> {
        Self::bind_with_sink(addr, core, Arc::new(audit)).await
    }

    /// Like [`DnsServer::bind`], with any audit sink.
    pub async fn bind_with_sink(
        addr: SocketAddr,
        core: Arc<DnsCore>,
        audit: Arc<dyn DnsAuditSink>,
    ) -> Result<Self, DnsError> {
        let (udp, tcp) = bind_pair(addr)
            .await
            .map_err(|source| DnsError::Bind { addr, source })?;
        let local_addr = udp.local_addr()?;
        // On a wildcard address a UDP answer must leave from the address the
        // client asked, not the one the route back to it would pick.
        #[cfg(target_os = "linux")]
        if addr.ip().is_unspecified() {
            use std::os::fd::AsFd;
            crate::sys::enable_pktinfo(udp.as_fd(), addr.is_ipv6())?;
        }
        let udp = listener_udp(udp)?;
        Ok(Self {
            udp: Arc::new(udp),
            tcp,
            local_addr,
            current: Arc::new(arc_swap::ArcSwap::from_pointee(Shared::new(core, audit))),
        })
    }

    /// A handle to swap this listener's engine while it runs.
    pub fn handle(&self) -> DnsHandle {
        DnsHandle {
            current: Arc::clone(&self.current),
        }
    }

    /// The bound address (the same port for UDP and TCP).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn stats(&self) -> Arc<DnsStats> {
        Arc::clone(self.current.load().core.stats())
    }

    pub fn bindings(&self) -> Arc<Bindings> {
        Arc::clone(self.current.load().core.bindings())
    }

    /// Serves until `shutdown` is cancelled, then lets in-flight queries
    /// finish (bounded by the query timeout) and returns.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), DnsError> {
        let tracker = TaskTracker::new();
        let Self { udp, tcp, current, .. } = self;
        let result = tokio::select! {
            () = shutdown.cancelled() => Ok(()),
            r = udp_loop(&udp, &current, &tracker) => r,
            r = tcp_loop(&tcp, &current, &tracker, &shutdown) => r,
        };
        let shared = current.load_full();
        tracker.close();
        let grace = shared.query_timeout + Duration::from_millis(100);
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!("dns listener shut down with queries still in flight");
        }
        shared.audit.flush();
        result
    }
}

async fn bind_pair(addr: SocketAddr) -> std::io::Result<(UdpSocket, TcpListener)> {
    let mut last = None;
    for _ in 0..BIND_TRIES {
        let udp = UdpSocket::bind(addr).await?;
        let port = udp.local_addr()?.port();
        match TcpListener::bind(SocketAddr::new(addr.ip(), port)).await {
            Ok(tcp) => return Ok((udp, tcp)),
            // With port 0 the kernel chose a UDP port whose TCP twin is taken;
            // try another one.
            Err(e) if addr.port() == 0 && e.kind() == std::io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::from(std::io::ErrorKind::AddrInUse)))
}

fn context(src: SocketAddr, transport: Transport) -> QueryContext {
    let (now, unix_ms) = clocks();
    QueryContext {
        src,
        transport,
        now,
        unix_ms,
    }
}

/// Arrival time on both clocks (monotonic for TTLs and latency, Unix for
/// the audit record).
fn clocks() -> (std::time::Instant, u64) {
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    (now(), unix_ms)
}

/// tokio's clock rather than `std`'s, so tests with paused time drive TTLs.
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

impl Shared {
    fn new(core: Arc<DnsCore>, audit: Arc<dyn DnsAuditSink>) -> Self {
        let config = core.config();
        Self {
            forwarder: Forwarder::new(config, Arc::clone(core.stats())),
            in_flight: Arc::new(Semaphore::new(config.max_in_flight)),
            query_timeout: config.query_timeout,
            tcp_idle_timeout: config.tcp_idle_timeout,
            audit,
            core,
        }
    }

    fn emit(&self, record: DnsAuditRecord) {
        if !self.audit.record(record) {
            DnsStats::bump(&self.core.stats().audit_drops);
        }
    }

    fn emit_all(&self, records: &mut Vec<DnsAuditRecord>) {
        let dropped = self.audit.record_all(records);
        if dropped > 0 {
            self.core
                .stats()
                .audit_drops
                .fetch_add(dropped, std::sync::atomic::Ordering::Relaxed);
        }
    }

    async fn resolve(&self, pending: Box<Pending>) -> Reply {
        let exchange = self.forwarder.forward(&pending.upstream_query, &pending.question);
        let outcome = tokio::time::timeout(self.query_timeout, exchange)
            .await
            .unwrap_or(Err(ForwardError::Deadline));
        self.core.complete(*pending, outcome, now())
    }
}

/// Answers the listener's UDP queries. On Linux a wake-up takes every
/// datagram waiting (up to [`sys::UDP_BATCH`]) with one `recvmmsg`, and the
/// answers made inline go back with one `sendmmsg`: under load the syscall
/// and wake-up costs are shared by a burst, and the client's side is woken
/// once per burst rather than once per answer. Queries that need an
/// upstream still run as their own tasks and answer on their own.
#[cfg(target_os = "linux")]
async fn udp_loop(udp: &Arc<ListenerUdp>, current: &Current, tracker: &TaskTracker) -> Result<(), DnsError> {
    use std::os::fd::AsFd;

    use crate::sys;

    let mut bufs: Vec<Vec<u8>> = (0..sys::UDP_BATCH).map(|_| vec![0u8; usize::from(u16::MAX)]).collect();
    let mut got = Vec::with_capacity(sys::UDP_BATCH);
    let mut replies: Vec<(Vec<u8>, SocketAddr, Option<IpAddr>)> = Vec::with_capacity(sys::UDP_BATCH);
    let mut audits = Vec::with_capacity(sys::UDP_BATCH);
    loop {
        let mut ready = udp.fd.readable().await?;
        match ready.try_io(|s| sys::recv_batch(s.as_fd(), &mut bufs, &mut got)) {
            Ok(Ok(())) => {}
            // WouldBlock: readiness is cleared and the next `readable()` waits.
            Err(_) => continue,
            // ICMP errors from earlier sends can surface here; they concern
            // one client, not the listener.
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "dns udp receive error");
                continue;
            }
        }
        drop(ready);
        // The batch is served by the engine in force now.
        let shared = &current.load_full();
        // One reading of the clocks for the batch: its datagrams were all
        // taken off the socket at this moment.
        let (arrived, unix_ms) = clocks();
        for (i, &(n, src, local)) in got.iter().enumerate() {
            let Some(bytes) = bufs.get(i).and_then(|b| b.get(..n)) else {
                continue;
            };
            // `try_io` never yields by itself: under a flood this loop would
            // starve the forwarded queries and upstream readers on the same
            // worker. Each datagram spends from the task's cooperative budget.
            tokio::task::coop::consume_budget().await;
            let ctx = QueryContext {
                src,
                transport: Transport::Udp,
                now: arrived,
                unix_ms,
            };
            match shared.core.handle_query_bytes(ctx, bytes) {
                Step::Drop => {}
                Step::Reply(reply) => {
                    replies.push((reply.bytes, src, local));
                    audits.push(reply.audit);
                }
                Step::Forward(pending) => spawn_udp_forward(udp, shared, tracker, pending, src, local),
            }
        }
        send_all(udp, shared, &replies).await;
        for (bytes, _, _) in replies.drain(..) {
            super::fast::recycle(bytes);
        }
        shared.emit_all(&mut audits);
    }
}

/// Sends `replies` with as few `sendmmsg` calls as the socket allows. A
/// full send buffer (see [`ListenerUdp`]) is waited out for at most
/// [`SEND_WAIT`]; what is still unsent then is dropped and counted, as a
/// router would drop it.
#[cfg(target_os = "linux")]
async fn send_all(udp: &ListenerUdp, shared: &Shared, replies: &[(Vec<u8>, SocketAddr, Option<IpAddr>)]) {
    let msgs: Vec<crate::sys::Outgoing<'_>> = replies
        .iter()
        .map(|(b, dst, local)| (b.as_slice(), *dst, *local))
        .collect();
    send_msgs(udp, shared, &msgs).await;
}

/// [`send_all`] for messages already in `sendmmsg` form.
#[cfg(target_os = "linux")]
async fn send_msgs(udp: &ListenerUdp, shared: &Shared, msgs: &[crate::sys::Outgoing<'_>]) {
    use std::os::fd::AsFd;

    let mut next = 0;
    let mut waited = Duration::ZERO;
    while next < msgs.len() {
        let rest = &msgs[next..];
        match crate::sys::send_batch(udp.fd.get_ref().as_fd(), rest) {
            Ok(0) => break,
            Ok(sent) => next += sent,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if waited >= SEND_WAIT {
                    let unsent = (msgs.len() - next) as u64;
                    shared
                        .core
                        .stats()
                        .dropped
                        .fetch_add(unsent, std::sync::atomic::Ordering::Relaxed);
                    tracing::debug!(unsent, "dns udp send buffer stayed full; answers dropped");
                    break;
                }
                tokio::time::sleep(SEND_RETRY).await;
                waited += SEND_RETRY;
            }
            // The first message failed (e.g. an unroutable client); skip it.
            Err(e) => {
                tracing::debug!(error = %e, dst = %rest[0].1, "dns udp send failed");
                next += 1;
            }
        }
    }
}

/// How long answers wait for room in a full listener send buffer…
#[cfg(target_os = "linux")]
const SEND_WAIT: Duration = Duration::from_millis(50);
/// …checking this often.
#[cfg(target_os = "linux")]
const SEND_RETRY: Duration = Duration::from_millis(1);

/// Sends one answer, from `local` when given (see `enable_pktinfo`),
/// waiting out a full send buffer like [`send_all`].
#[cfg(target_os = "linux")]
async fn send_one(udp: &ListenerUdp, shared: &Shared, bytes: &[u8], dst: SocketAddr, local: Option<IpAddr>) {
    send_msgs(udp, shared, &[(bytes, dst, local)]).await;
}

/// The listener's UDP socket on Linux, registered with the reactor for
/// reading only. A DNS listener sends far more often than it ever has to
/// wait to send; registered for writability as well (as a
/// `tokio::net::UdpSocket` is), every answer the kernel frees runs the
/// reactor's callback on this socket with the event in its mask. The
/// cached-answer benchmark put that at about 1 % of a query's CPU (five
/// alternated runs each: median 2.92 against 2.96 µs). When the send buffer
/// is full, senders poll for room instead ([`send_all`]).
#[cfg(target_os = "linux")]
#[derive(Debug)]
struct ListenerUdp {
    fd: tokio::io::unix::AsyncFd<std::net::UdpSocket>,
}

#[cfg(target_os = "linux")]
fn listener_udp(udp: UdpSocket) -> std::io::Result<ListenerUdp> {
    Ok(ListenerUdp {
        fd: crate::sys::register_read_only(udp.into_std()?)?,
    })
}

/// Off Linux the listener keeps tokio's socket.
#[cfg(not(target_os = "linux"))]
type ListenerUdp = UdpSocket;

#[cfg(not(target_os = "linux"))]
fn listener_udp(udp: UdpSocket) -> std::io::Result<ListenerUdp> {
    Ok(udp)
}

/// Sends one answer (no local address control off Linux).
#[cfg(not(target_os = "linux"))]
async fn send_one(udp: &UdpSocket, _shared: &Shared, bytes: &[u8], dst: SocketAddr, _local: Option<IpAddr>) {
    if let Err(e) = udp.send_to(bytes, dst).await {
        tracing::debug!(error = %e, %dst, "dns udp send failed");
    }
}

#[cfg(not(target_os = "linux"))]
async fn udp_loop(udp: &Arc<UdpSocket>, current: &Current, tracker: &TaskTracker) -> Result<(), DnsError> {
    let mut buf = vec![0u8; usize::from(u16::MAX)];
    loop {
        let (n, src) = match udp.recv_from(&mut buf).await {
            Ok(v) => v,
            // ICMP errors from earlier sends can surface here; they concern
            // one client, not the listener.
            Err(e) => {
                tracing::debug!(error = %e, "dns udp receive error");
                continue;
            }
        };
        let shared = &current.load_full();
        match shared.core.handle_query_bytes(context(src, Transport::Udp), &buf[..n]) {
            Step::Drop => {}
            Step::Reply(reply) => {
                if let Err(e) = udp.send_to(&reply.bytes, src).await {
                    tracing::debug!(error = %e, %src, "dns udp send failed");
                }
                shared.emit(reply.audit);
            }
            Step::Forward(pending) => spawn_udp_forward(udp, shared, tracker, pending, src, None),
        }
    }
}

/// Runs a query that needs an upstream as its own task, within `max_in_flight`.
fn spawn_udp_forward(
    udp: &Arc<ListenerUdp>,
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    pending: Box<Pending>,
    src: SocketAddr,
    local: Option<IpAddr>,
) {
    let Ok(permit) = Arc::clone(&shared.in_flight).try_acquire_owned() else {
        DnsStats::bump(&shared.core.stats().dropped);
        return;
    };
    let shared = Arc::clone(shared);
    let udp = Arc::clone(udp);
    tracker.spawn(async move {
        let reply = shared.resolve(pending).await;
        drop(permit);
        send_one(&udp, &shared, &reply.bytes, src, local).await;
        shared.emit(reply.audit);
    });
}

async fn tcp_loop(
    tcp: &TcpListener,
    current: &Current,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<(), DnsError> {
    // One limit on TCP clients for the listener's life, whatever engine
    // serves them.
    let slots = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return Ok(());
        };
        let (stream, peer) = match tcp.accept().await {
            Ok(v) => v,
            // Per-connection failures (e.g. reset before accept, EMFILE) must
            // not end the listener.
            Err(e) => {
                tracing::debug!(error = %e, "dns tcp accept error");
                continue;
            }
        };
        let shared = current.load_full();
        let shutdown = shutdown.clone();
        let inner = tracker.clone();
        tracker.spawn(async move {
            serve_tcp(stream, peer, &shared, &inner, &shutdown).await;
            drop(slot);
        });
    }
}

/// One client connection: length-prefixed queries, answered as they
/// complete (RFC 7766 §6.2.1.1 allows out-of-order answers).
async fn serve_tcp(
    stream: TcpStream,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) {
    let (mut reader, mut writer) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(TCP_WRITE_QUEUE);
    let write = tracker.spawn(async move {
        while let Some(bytes) = rx.recv().await {
            let Ok(len) = u16::try_from(bytes.len()) else {
                continue;
            };
            let mut framed = Vec::with_capacity(bytes.len() + 2);
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(&bytes);
            if writer.write_all(&framed).await.is_err() {
                break;
            }
        }
        let _ = writer.shutdown().await;
    });
    let idle = shared.tcp_idle_timeout;
    loop {
        let mut len = [0u8; 2];
        let read = tokio::select! {
            () = shutdown.cancelled() => break,
            r = tokio::time::timeout(idle, reader.read_exact(&mut len)) => r,
        };
        if !matches!(read, Ok(Ok(_))) {
            break;
        }
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if !matches!(tokio::time::timeout(idle, reader.read_exact(&mut buf)).await, Ok(Ok(_))) {
            break;
        }
        match shared.core.handle_query_bytes(context(peer, Transport::Tcp), &buf) {
            // On a stream, a message without a readable header means the
            // framing is lost; the only safe thing is to close.
            Step::Drop => break,
            Step::Reply(reply) => {
                if tx.send(reply.bytes).await.is_err() {
                    break;
                }
                shared.emit(reply.audit);
            }
            Step::Forward(pending) => {
                let Ok(permit) = Arc::clone(&shared.in_flight).try_acquire_owned() else {
                    DnsStats::bump(&shared.core.stats().dropped);
                    continue;
                };
                let shared = Arc::clone(shared);
                let tx = tx.clone();
                tracker.spawn(async move {
                    let reply = shared.resolve(pending).await;
                    drop(permit);
                    let _ = tx.send(reply.bytes).await;
                    shared.emit(reply.audit);
                });
            }
        }
    }
    drop(tx);
    let _ = write.await;
}
