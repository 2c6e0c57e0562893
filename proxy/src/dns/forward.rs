//! Forwarding allowed queries to the configured upstream resolvers.
//!
//! The I/O half of the miss path: the engine hands over a [`Pending`] query's
//! bytes, this module gets an answer from the first upstream that gives a
//! usable one, and the engine finishes the answer. Upstreams are tried in
//! order, for `attempts` rounds, each exchange bounded by `attempt_timeout`
//! (the server bounds the whole by `query_timeout`). UDP answers with TC set
//! are retried over TCP to the same upstream; DNS-over-TLS uses rustls.
//!
//! Every attempt uses a fresh socket (a fresh source port) and a fresh random
//! ID, and an answer is accepted only if its ID and question match what was
//! sent — the usual defences against off-path spoofing. An upstream that
//! answers SERVFAIL, REFUSED or NOTIMP is skipped in favour of the next one,
//! but its answer is returned if nobody does better.
//!
//! [`Pending`]: super::Pending

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio_rustls::TlsConnector;

use super::audit::DnsStats;
use super::config::{DnsConfig, UpstreamProto};

/// Why no upstream produced an answer (for one attempt, or in the end the
/// last attempt's reason).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardError {
    #[error("upstream {0} did not answer in time")]
    Timeout(SocketAddr),
    #[error("upstream {addr}: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
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
}

#[derive(Debug)]
enum Link {
    Udp,
    Tcp,
    Tls(ServerName<'static>),
}

#[derive(Debug)]
struct Target {
    addr: SocketAddr,
    link: Link,
}

/// Sends queries to upstreams. Cheap to share (`Arc`), holds no sockets
/// between queries.
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
                    UpstreamProto::Udp => Link::Udp,
                    UpstreamProto::Tcp => Link::Tcp,
                    UpstreamProto::Tls { server_name } => {
                        Link::Tls(ServerName::try_from(server_name.clone()).ok()?)
                    }
                };
                Some(Target { addr: u.addr, link })
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
    pub async fn forward(
        &self,
        query: &[u8],
        question: &Query,
    ) -> Result<UpstreamAnswer, ForwardError> {
        let mut fallback: Option<UpstreamAnswer> = None;
        let mut last_err = ForwardError::Deadline;
        for _ in 0..self.attempts {
            for target in &self.targets {
                let attempt = tokio::time::timeout(
                    self.attempt_timeout,
                    self.exchange(target, query, question),
                );
                let result = match attempt.await {
                    Ok(result) => result,
                    Err(_) => Err(ForwardError::Timeout(target.addr)),
                };
                match result {
                    Ok(message) => {
                        let answer = UpstreamAnswer {
                            message,
                            upstream: target.addr,
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
    ) -> Result<Message, ForwardError> {
        let mut query = query.to_vec();
        let id: u16 = rand::random();
        if let Some(head) = query.get_mut(..2) {
            head.copy_from_slice(&id.to_be_bytes());
        }
        let addr = target.addr;
        match &target.link {
            Link::Udp => {
                let message = udp_exchange(addr, &query, id, question).await?;
                if !message.metadata.truncation {
                    return Ok(message);
                }
                let tcp = TcpStream::connect(addr)
                    .await
                    .map_err(|source| ForwardError::Io { addr, source })?;
                stream_exchange(tcp, addr, &query, id, question).await
            }
            Link::Tcp => {
                let tcp = TcpStream::connect(addr)
                    .await
                    .map_err(|source| ForwardError::Io { addr, source })?;
                stream_exchange(tcp, addr, &query, id, question).await
            }
            Link::Tls(name) => {
                let connector = self.tls.as_ref().ok_or(ForwardError::NoTls(addr))?;
                let tcp = TcpStream::connect(addr)
                    .await
                    .map_err(|source| ForwardError::Io { addr, source })?;
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|source| ForwardError::Io { addr, source })?;
                stream_exchange(tls, addr, &query, id, question).await
            }
        }
    }
}

fn is_upstream_failure(rcode: ResponseCode) -> bool {
    matches!(
        rcode,
        ResponseCode::ServFail | ResponseCode::Refused | ResponseCode::NotImp
    )
}

async fn udp_exchange(
    addr: SocketAddr,
    query: &[u8],
    id: u16,
    question: &Query,
) -> Result<Message, ForwardError> {
    let io = |source| ForwardError::Io { addr, source };
    let local: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await.map_err(io)?;
    // Connected: the kernel filters datagrams from anyone else, and an ICMP
    // "port unreachable" surfaces as an error instead of a timeout.
    socket.connect(addr).await.map_err(io)?;
    socket.send(query).await.map_err(io)?;
    let mut buf = vec![0u8; usize::from(u16::MAX)];
    loop {
        let n = socket.recv(&mut buf).await.map_err(io)?;
        // A datagram that is not our answer (stale, or spoofed) is ignored;
        // the attempt timeout bounds how long we keep listening.
        if let Ok(message) = check_answer(addr, &buf[..n], id, question) {
            return Ok(message);
        }
    }
}

async fn stream_exchange<S>(
    mut stream: S,
    addr: SocketAddr,
    query: &[u8],
    id: u16,
    question: &Query,
) -> Result<Message, ForwardError>
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
    check_answer(addr, &buf, id, question)
}

/// Parses an upstream message and checks it answers what was asked (ID,
/// QR bit, and the one question). Sans-IO; public for fuzzing.
pub fn check_answer(
    addr: SocketAddr,
    bytes: &[u8],
    id: u16,
    question: &Query,
) -> Result<Message, ForwardError> {
    let message = Message::from_vec(bytes).map_err(|_| ForwardError::Malformed(addr))?;
    let same_question = message.queries.len() == 1
        && message.queries.first().is_some_and(|q| {
            q.name() == question.name()
                && q.query_type() == question.query_type()
                && q.query_class() == question.query_class()
        });
    if message.metadata.id != id
        || message.metadata.message_type != MessageType::Response
        || !same_question
    {
        return Err(ForwardError::Mismatch(addr));
    }
    Ok(message)
}
