//! Upstream connection establishment: happy eyeballs over the addresses the
//! resolver returned and the SSRF guard let through.
//!
//! RFC 8305 style: addresses are interleaved by family starting with the
//! family of the first one (the resolver puts IPv6 first), one attempt starts
//! every `stagger` (250 ms) or as soon as the previous one fails, the first
//! to complete wins and the rest are dropped (closing their sockets), and the
//! whole race is bounded by one overall timeout. The winning stream has
//! `TCP_NODELAY` set, since the relay forwards whatever arrives at once.
//! Failures are typed so the edge can map them to a 502/504 or a close and
//! an audit reason code (`connect-timeout`, `connect-refused`, …).

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{Instant, Sleep, sleep_until};

/// Why no upstream connection could be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// No attempt completed within the overall connect timeout.
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    /// Every address refused the connection (RST to our SYN).
    #[error("connection refused by {0}")]
    Refused(SocketAddr),
    /// No route to the host or network.
    #[error("{0} is unreachable")]
    Unreachable(SocketAddr),
    /// The caller passed no addresses (e.g. all were removed by the guard).
    #[error("no addresses to connect to")]
    NoAddresses,
    /// Any other socket error on the last address tried.
    #[error("connecting to {addr}: {source}")]
    Io {
        /// The address whose attempt failed.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: io::Error,
    },
}

impl ConnectError {
    /// The reason code written into the audit record.
    pub fn reason_code(&self) -> &'static str {
        match self {
            Self::Timeout(_) => "connect-timeout",
            Self::Refused(_) => "connect-refused",
            Self::Unreachable(_) => "connect-unreachable",
            Self::NoAddresses => "connect-no-addresses",
            Self::Io { .. } => "connect-error",
        }
    }

    fn from_io(addr: SocketAddr, e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => Self::Refused(addr),
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => Self::Unreachable(addr),
            _ => match e.raw_os_error() {
                Some(code) if is_unreachable_errno(code) => Self::Unreachable(addr),
                _ => Self::Io { addr, source: e },
            },
        }
    }

    /// Which failure tells an operator most when several attempts failed:
    /// a refusal proves a host answered, unreachability is next.
    fn rank(&self) -> u8 {
        match self {
            Self::Refused(_) => 3,
            Self::Unreachable(_) => 2,
            Self::Io { .. } => 1,
            _ => 0,
        }
    }
}

#[cfg(unix)]
fn is_unreachable_errno(code: i32) -> bool {
    code == libc::EHOSTUNREACH || code == libc::ENETUNREACH || code == libc::EADDRNOTAVAIL
}

#[cfg(not(unix))]
fn is_unreachable_errno(_code: i32) -> bool {
    false
}

/// How connections are made.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnectOptions {
    /// Bound on the whole race, all attempts included.
    pub timeout: Duration,
    /// Delay before starting the next attempt while one is in flight
    /// (RFC 8305 "Connection Attempt Delay").
    pub stagger: Duration,
    /// `SO_MARK` for upstream sockets, so iptables rules can exempt the
    /// proxy's own traffic from `REDIRECT`/`TPROXY` (Linux only).
    pub mark: Option<u32>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            stagger: Duration::from_millis(250),
            mark: None,
        }
    }
}

/// A connected upstream socket and the address that won the race.
#[derive(Debug)]
pub struct Connected {
    /// The connected socket, `TCP_NODELAY` set.
    pub stream: TcpStream,
    /// The address actually dialled (what the audit record calls `dst`).
    pub addr: SocketAddr,
}

/// Orders addresses RFC 8305 style: alternate families, starting with the
/// family of the first address, keeping the resolver's order within each.
pub fn interleave(addrs: &[SocketAddr]) -> Vec<SocketAddr> {
    let Some(first) = addrs.first() else {
        return Vec::new();
    };
    let first_v6 = first.is_ipv6();
    let (mut a, mut b): (Vec<_>, Vec<_>) = (Vec::new(), Vec::new());
    for addr in addrs {
        if addr.is_ipv6() == first_v6 {
            a.push(*addr);
        } else {
            b.push(*addr);
        }
    }
    let mut out = Vec::with_capacity(addrs.len());
    let (mut ia, mut ib) = (a.into_iter(), b.into_iter());
    loop {
        match (ia.next(), ib.next()) {
            (None, None) => break,
            (x, y) => out.extend(x.into_iter().chain(y)),
        }
    }
    out
}

type Attempt = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;

/// Connects to one of `ips` on `port` (see [`connect`]).
pub async fn connect_ips(ips: &[IpAddr], port: u16, opts: &ConnectOptions) -> Result<Connected, ConnectError> {
    let addrs: Vec<SocketAddr> = ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect();
    connect(&addrs, opts).await
}

/// Races connection attempts to `addrs` (happy eyeballs) and returns the
/// first that completes.
pub async fn connect(addrs: &[SocketAddr], opts: &ConnectOptions) -> Result<Connected, ConnectError> {
    // One address (an original destination, a static upstream, a name with
    // one record) is most flows: no race to run, so one timer and no boxed
    // attempts or bookkeeping.
    if let [addr] = addrs {
        return match tokio::time::timeout(opts.timeout, attempt(*addr, opts.mark)).await {
            Ok(Ok(stream)) => finish(stream, *addr),
            Ok(Err(e)) => Err(ConnectError::from_io(*addr, e)),
            Err(_) => Err(ConnectError::Timeout(opts.timeout)),
        };
    }
    let order = interleave(addrs);
    if order.is_empty() {
        return Err(ConnectError::NoAddresses);
    }
    let deadline = Instant::now() + opts.timeout;
    let mut overall: Pin<Box<Sleep>> = Box::pin(sleep_until(deadline));
    let mut next_start: Pin<Box<Sleep>> = Box::pin(sleep_until(Instant::now()));
    let mut pending = order.into_iter();
    let mut in_flight: Vec<(SocketAddr, Attempt)> = Vec::new();
    let mut best_err: Option<ConnectError> = None;
    let mut exhausted = false;

    std::future::poll_fn(|cx| {
        loop {
            // Start the next attempt when the stagger timer fires, or at once
            // when nothing is in flight (the previous attempt failed).
            let start_now = !exhausted && (in_flight.is_empty() || next_start.as_mut().poll(cx).is_ready());
            if start_now {
                match pending.next() {
                    Some(addr) => {
                        in_flight.push((addr, Box::pin(attempt(addr, opts.mark))));
                        next_start.as_mut().reset(Instant::now() + opts.stagger);
                    }
                    None => exhausted = true,
                }
            }

            let mut i = 0;
            while i < in_flight.len() {
                let (addr, fut) = &mut in_flight[i];
                match fut.as_mut().poll(cx) {
                    Poll::Ready(Ok(stream)) => {
                        let addr = *addr;
                        // Losers are dropped with `in_flight`, closing them.
                        return Poll::Ready(finish(stream, addr));
                    }
                    Poll::Ready(Err(e)) => {
                        let err = ConnectError::from_io(*addr, e);
                        if best_err.as_ref().is_none_or(|b| err.rank() >= b.rank()) {
                            best_err = Some(err);
                        }
                        drop(in_flight.swap_remove(i));
                    }
                    Poll::Pending => i += 1,
                }
            }

            if exhausted && in_flight.is_empty() {
                return Poll::Ready(Err(best_err.take().unwrap_or(ConnectError::Timeout(opts.timeout))));
            }
            if overall.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(ConnectError::Timeout(opts.timeout)));
            }
            if !exhausted {
                // A failure freed the only slot: start the next attempt now.
                if in_flight.is_empty() {
                    continue;
                }
                // Polling here also registers the waker for a timer that was
                // just reset above.
                if next_start.as_mut().poll(cx).is_ready() {
                    continue;
                }
            }
            return Poll::Pending;
        }
    })
    .await
}

/// Connects like [`connect`] and sends `first` (bytes the upstream is owed:
/// a peeked ClientHello, a request head) as part of it. Returns how many
/// of them were sent; the caller writes the rest.
///
/// With one address the bytes go out on the first try, before any
/// readiness event: when the handshake completed inside `connect(2)` (a
/// nearby upstream, loopback), the send succeeds and the flow skips a
/// round through the reactor and the `SO_ERROR` check. When it has not,
/// the send fails with `EAGAIN` (or the connect's own error) and this
/// waits for writability as [`connect`] does: the same number of system
/// calls either way.
pub async fn connect_sending(
    addrs: &[SocketAddr],
    opts: &ConnectOptions,
    first: &[u8],
) -> Result<(Connected, usize), ConnectError> {
    let [addr] = addrs else {
        return connect(addrs, opts).await.map(|c| (c, 0));
    };
    if first.is_empty() {
        return connect(addrs, opts).await.map(|c| (c, 0));
    }
    match tokio::time::timeout(opts.timeout, attempt_sending(*addr, opts.mark, first)).await {
        Ok(Ok((stream, sent))) => Ok((Connected { stream, addr: *addr }, sent)),
        Ok(Err(e)) => Err(ConnectError::from_io(*addr, e)),
        Err(_) => Err(ConnectError::Timeout(opts.timeout)),
    }
}

/// One connection attempt that sends `first` as soon as the socket takes
/// it. `TCP_NODELAY` is set before the connect.
async fn attempt_sending(addr: SocketAddr, mark: Option<u32>, first: &[u8]) -> io::Result<(TcpStream, usize)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    if let Some(mark) = mark {
        set_mark(socket2::SockRef::from(&socket), mark)?;
    }
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    // A direct send, not tokio's `try_write`: the registration has seen no
    // readiness event yet, so `try_write` would not even try.
    match socket2::SockRef::from(&stream).send_with_flags(first, libc::MSG_NOSIGNAL) {
        Ok(sent) => return Ok((stream, sent)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    // Still connecting: wait as tokio's own connect does, then let the
    // caller write everything.
    stream.writable().await?;
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    Ok((stream, 0))
}

fn finish(stream: TcpStream, addr: SocketAddr) -> Result<Connected, ConnectError> {
    stream
        .set_nodelay(true)
        .map_err(|source| ConnectError::Io { addr, source })?;
    Ok(Connected { stream, addr })
}

async fn attempt(addr: SocketAddr, mark: Option<u32>) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv6() {
        TcpSocket::new_v6()?
    } else {
        TcpSocket::new_v4()?
    };
    if let Some(mark) = mark {
        set_mark(socket2::SockRef::from(&socket), mark)?;
    }
    socket.connect(addr).await
}

/// `SO_MARK` on an upstream socket (either kind: `SockRef` borrows both).
#[cfg(any(target_os = "linux", target_os = "android"))]
fn set_mark(socket: socket2::SockRef<'_>, mark: u32) -> io::Result<()> {
    socket.set_mark(mark)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn set_mark(_socket: socket2::SockRef<'_>, _mark: u32) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "SO_MARK is only available on Linux",
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.
mod tests {
    use super::*;

    #[test]
    fn interleave_alternates_families() {
        let v6a: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        let v6b: SocketAddr = "[2001:db8::2]:443".parse().unwrap();
        let v4a: SocketAddr = "192.0.2.1:443".parse().unwrap();
        let v4b: SocketAddr = "192.0.2.2:443".parse().unwrap();
        assert_eq!(interleave(&[v6a, v6b, v4a, v4b]), vec![v6a, v4a, v6b, v4b]);
        assert_eq!(interleave(&[v4a, v6a, v4b]), vec![v4a, v6a, v4b]);
        assert!(interleave(&[]).is_empty());
    }
}
