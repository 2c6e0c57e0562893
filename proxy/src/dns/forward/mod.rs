//! Forwarding allowed queries to the configured upstream resolvers.
//!
//! The I/O half of the miss path: the engine hands over a [`Pending`] query's
//! bytes, this module gets an answer from the first upstream that gives a
//! usable one, and the engine finishes the answer. Upstreams are tried in
//! order, for `attempts` rounds, each exchange bounded by `attempt_timeout`
//! (the server bounds the whole by `query_timeout`). UDP answers with TC set
//! are retried over TCP to the same upstream; DNS-over-TLS uses rustls.
//!
//! UDP attempts go through a small pool of long-lived sockets per upstream
//! ([`udp_pool`]: random source ports, rotated), every attempt with a
//! fresh random ID, and an answer is accepted only if its ID and question
//! match what was sent — the usual defences against off-path spoofing.
//! TCP and TLS connections are kept idle per upstream (a few, for
//! a few seconds) and reused one query at a time, since a DoT handshake
//! costs far more than the query. An upstream that answers SERVFAIL, REFUSED
//! or NOTIMP is skipped in favour of the next one,
//! but its answer is returned if nobody does better.
//!
//! [`Pending`]: super::Pending

use std::net::SocketAddr;
use std::sync::Arc;

use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::audit::DnsStats;
use super::config::{DnsConfig, UpstreamProto};
mod udp_pool;

use udp_pool::UdpPool;

/// Why no upstream produced an answer (for one attempt, or in the end the
/// last attempt's reason).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardError {
    #[error("upstream {0} did not answer in time")]
    Timeout(SocketAddr),
    #[error("upstream {addr}: {source}")]
    Io { addr: SocketAddr, source: std::io::Error },
    #[error("upstream {0} sent a message that does not parse")]
    Malformed(SocketAddr),
    #[error("upstream {0} sent an answer for a different question")]
    Mismatch(SocketAddr),
    #[error("the query could not be framed for an upstream")]
    QueryTooLarge,
    #[error("upstream {0} is DNS-over-TLS but no TLS configuration is set")]
    NoTls(SocketAddr),
    #[error("no upstream answered within the query timeout")]
    Deadline,
}

/// A usable answer and who gave it.
#[derive(Debug)]
pub struct UpstreamAnswer {
    pub message: Message,
    pub upstream: SocketAddr,
    /// The message as received (empty if unknown): the engine passes a
    /// plain answer on patched rather than re-encoded.
    pub wire: Vec<u8>,
}

#[derive(Debug)]
enum Link {
    Udp(UdpPool),
    Tcp,
    Tls(ServerName<'static>),
}
/// Idle upstream connections kept per upstream.
const MAX_IDLE_PER_UPSTREAM: usize = 8;
/// Idle connections older than this are not reused: upstreams close idle
/// connections after a few seconds (RFC 7766 §6.2.3), and a dead one costs
/// a failed write before the retry.
const MAX_IDLE: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug)]
struct Target {
    addr: SocketAddr,
    link: Link,
    idle: std::sync::Mutex<Vec<(Conn, tokio::time::Instant)>>,
}

/// Sends queries to upstreams. Cheap to share (`Arc`); holds the pooled
/// UDP sockets and idle TCP/TLS connections of its upstreams.
pub struct Forwarder {
    targets: Vec<Target>,
    attempts: usize,
    attempt_timeout: std::time::Duration,
    tls: Option<TlsConnector>,
    stats: Arc<DnsStats>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("targets", &self.targets)
            .finish_non_exhaustive()
    }
}

impl Forwarder {
    /// Builds from a validated config; TLS names that do not parse are
    /// skipped here because `DnsConfig::validate` already rejected them.
    pub fn new(config: &DnsConfig, stats: Arc<DnsStats>) -> Self {
        let targets = config
            .upstreams
            .iter()
            .filter_map(|u| {
                let link = match &u.proto {
                    UpstreamProto::Udp => Link::Udp(UdpPool::new(
                        u.addr,
                        config.upstream_udp_sockets,
                        config.upstream_socket_max_queries,
                        config.upstream_socket_max_age,
                        Arc::clone(&stats),
                    )),
                    UpstreamProto::Tcp => Link::Tcp,
                    UpstreamProto::Tls { server_name } => Link::Tls(ServerName::try_from(server_name.clone()).ok()?),
                };
                Some(Target {
                    addr: u.addr,
                    link,
                    idle: std::sync::Mutex::default(),
                })
            })
            .collect();
        Self {
            targets,
            attempts: config.attempts.max(1),
            attempt_timeout: config.attempt_timeout,
            tls: config.tls.clone().map(TlsConnector::from),
            stats,
        }
    }

    /// Gets an answer for `query` (ID bytes are overwritten per attempt).
    pub async fn forward(&self, query: &[u8], question: &Query) -> Result<UpstreamAnswer, ForwardError> {
        let mut fallback: Option<UpstreamAnswer> = None;
        let mut last_err = ForwardError::Deadline;
        for _ in 0..self.attempts {
            for target in &self.targets {
                let attempt = tokio::time::timeout(self.attempt_timeout, self.exchange(target, query, question));
                let result = match attempt.await {
                    Ok(result) => result,
                    Err(_) => Err(ForwardError::Timeout(target.addr)),
                };
                match result {
                    Ok((message, wire)) => {
                        let answer = UpstreamAnswer {
                            message,
                            upstream: target.addr,
                            wire,
                        };
                        if is_upstream_failure(answer.message.metadata.response_code) {
                            fallback = Some(answer);
                            continue;
                        }
                        return Ok(answer);
                    }
                    Err(e) => {
                        DnsStats::bump(&self.stats.upstream_errors);
                        tracing::debug!(error = %e, "dns upstream attempt failed");
                        last_err = e;
                    }
                }
            }
            if let Some(answer) = fallback.take() {
                return Ok(answer);
            }
        }
        Err(last_err)
    }

    async fn exchange(
        &self,
        target: &Target,
        query: &[u8],
        question: &Query,
    ) -> Result<(Message, Vec<u8>), ForwardError> {
        let mut query = query.to_vec();
        if let Link::Udp(pool) = &target.link {
            let (message, wire) = pool.exchange(&mut query, question).await?;
            if !message.metadata.truncation {
                return Ok((message, wire));
            }
        }
        // A fresh ID for the stream attempt too (after TC, it is a new exchange).
        let id: u16 = rand::random();
        if let Some(head) = query.get_mut(..2) {
            head.copy_from_slice(&id.to_be_bytes());
        }
        // Boxed: the TCP/TLS exchange (connect, handshake) is a large future
        // that most queries never run; inline it would be copied into every
        // forwarded query's task.
        Box::pin(self.stream_exchange(target, &query, id, question)).await
    }

    /// One exchange over TCP or TLS, on an idle pooled connection when there
    /// is one (a DoT handshake costs more than the query), else a new one.
    /// A pooled connection the upstream has meanwhile closed fails with an
    /// I/O error; the query is then retried once on a fresh connection.
    async fn stream_exchange(
        &self,
        target: &Target,
        query: &[u8],
        id: u16,
        question: &Query,
    ) -> Result<(Message, Vec<u8>), ForwardError> {
        let addr = target.addr;
        if let Some(mut conn) = target.take_idle() {
            match conn.exchange(addr, query, id, question).await {
                Ok(message) => {
                    target.put_idle(conn);
                    return Ok(message);
                }
                Err(ForwardError::Io { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let mut conn = self.connect(target).await?;
        let message = conn.exchange(addr, query, id, question).await?;
        target.put_idle(conn);
        Ok(message)
    }

    async fn connect(&self, target: &Target) -> Result<Conn, ForwardError> {
        let addr = target.addr;
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| ForwardError::Io { addr, source })?;
        // Queries are small and latency-bound; do not let Nagle hold them.
        let _ = tcp.set_nodelay(true);
        match &target.link {
            Link::Udp(_) | Link::Tcp => Ok(Conn::Tcp(tcp)),
            Link::Tls(name) => {
                let connector = self.tls.as_ref().ok_or(ForwardError::NoTls(addr))?;
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|source| ForwardError::Io { addr, source })?;
                Ok(Conn::Tls(Box::new(tls)))
            }
        }
    }
}

/// An open stream to an upstream.
#[derive(Debug)]
enum Conn {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Conn {
    async fn exchange(
        &mut self,
        addr: SocketAddr,
        query: &[u8],
        id: u16,
        question: &Query,
    ) -> Result<(Message, Vec<u8>), ForwardError> {
        match self {
            Self::Tcp(s) => framed_exchange(s, addr, query, id, question).await,
            Self::Tls(s) => framed_exchange(&mut **s, addr, query, id, question).await,
        }
    }
}

impl Target {
    fn take_idle(&self) -> Option<Conn> {
        let now = tokio::time::Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while let Some((conn, since)) = idle.pop() {
            if now.saturating_duration_since(since) < MAX_IDLE {
                return Some(conn);
            }
        }
        None
    }

    fn put_idle(&self, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.len() < MAX_IDLE_PER_UPSTREAM {
            idle.push((conn, tokio::time::Instant::now()));
        }
    }
}

fn is_upstream_failure(rcode: ResponseCode) -> bool {
    matches!(
        rcode,
        ResponseCode::ServFail | ResponseCode::Refused | ResponseCode::NotImp
    )
}

async fn framed_exchange<S>(
    stream: &mut S,
    addr: SocketAddr,
    query: &[u8],
    id: u16,
    question: &Query,
) -> Result<(Message, Vec<u8>), ForwardError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let io = |source| ForwardError::Io { addr, source };
    let len = u16::try_from(query.len()).map_err(|_| ForwardError::QueryTooLarge)?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(query);
    stream.write_all(&framed).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await.map_err(io)?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf).await.map_err(io)?;
    let message = check_answer(addr, &buf, id, question)?;
    Ok((message, buf))
}

/// Parses an upstream message and checks it answers what was asked (ID,
/// QR bit, and the one question). Sans-IO; public for fuzzing.
pub fn check_answer(addr: SocketAddr, bytes: &[u8], id: u16, question: &Query) -> Result<Message, ForwardError> {
    let message = Message::from_vec(bytes).map_err(|_| ForwardError::Malformed(addr))?;
    let same_question = message.queries.len() == 1
        && message.queries.first().is_some_and(|q| {
            q.name() == question.name()
                && q.query_type() == question.query_type()
                && q.query_class() == question.query_class()
        });
    if message.metadata.id != id || message.metadata.message_type != MessageType::Response || !same_question {
        return Err(ForwardError::Mismatch(addr));
    }
    Ok(message)
}
