//! The relay: once a flow is allowed, connected and its peeked bytes
//! replayed, move bytes both ways until both sides are done.
//!
//! Each direction is a small loop: wait until the source is readable, move
//! what is there to the destination, repeat; on EOF shut down the write side
//! of the destination (half-close is passed through, so a client that sends
//! its request and shuts its write side still gets the whole response). The
//! flow ends when both directions have seen EOF, when either side fails
//! (reset), when nothing moved for the idle timeout, or when the caller
//! cancels it (drain, policy change). The result is a [`RelayStats`]: bytes
//! each way and a [`CloseReason`] for the audit record.
//!
//! Two movers share that skeleton. [`RelayMode::Splice`] (Linux) moves bytes
//! socket → pipe → socket with `splice(2)`, never through user space;
//! [`RelayMode::Copy`] reads into a buffer and writes it out. Neither holds a
//! buffer or a pipe while the flow is idle: both are borrowed from a
//! per-thread pool when the source becomes readable and returned, empty, as
//! soon as it would block, so an idle flow costs only its task and sockets.
//! `benches/splice.rs` compares the two; [`RelayMode::Auto`] picks the one
//! that measured better, the copy loop (figures at [`RelayMode::resolve`]).

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until};

/// Which mover a relay uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RelayMode {
    /// The mover that measured faster on this platform.
    #[default]
    Auto,
    /// `splice(2)` through a pipe (Linux; falls back to copy elsewhere).
    Splice,
    /// Read into a pooled buffer, write it out.
    Copy,
}

impl RelayMode {
    /// The concrete mover `Auto` stands for here: the copy loop.
    ///
    /// `benches/splice.rs` (64 MiB flows over loopback, proxy on one
    /// current-thread runtime, 2 cores shared with client and origin)
    /// measured proxy CPU per GB within noise of each other (splice 0.285 s
    /// with a 256 KiB pipe, 0.288 s with 64 KiB; copy 0.298 s) while the copy
    /// loop moved bulk data faster end to end (1.74 GB/s against 1.15–1.34):
    /// loopback TCP gives splice nothing to move by reference, and the
    /// spliced segments cost the receiver more. Splice stays selectable.
    pub fn resolve(self) -> Self {
        match self {
            Self::Splice if crate::sys::SPLICE_SUPPORTED => Self::Splice,
            _ => Self::Copy,
        }
    }

    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Splice => "splice",
            Self::Copy => "copy",
        }
    }
}

/// How a relay runs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RelayOptions {
    /// Which mover to use.
    pub mode: RelayMode,
    /// Close the flow when no byte moved either way for this long.
    pub idle_timeout: Option<Duration>,
    /// Requested pipe size for the splice mover (kernel-capped).
    pub pipe_size: usize,
    /// Buffer size for the copy mover.
    pub copy_buffer: usize,
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            mode: RelayMode::Auto,
            idle_timeout: Some(Duration::from_secs(300)),
            pipe_size: 256 * 1024,
            copy_buffer: 64 * 1024,
        }
    }
}

/// Why a relayed flow ended (the audit record's `close_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// Both sides closed normally; the client sent its FIN first.
    ClientClosed,
    /// Both sides closed normally; the upstream sent its FIN first.
    UpstreamClosed,
    /// No byte moved either way for the idle timeout.
    IdleTimeout,
    /// The client reset the connection (or vanished under a write).
    ClientReset,
    /// The upstream reset the connection (or vanished under a write).
    UpstreamReset,
    /// Another socket error on the client side.
    ClientError,
    /// Another socket error on the upstream side.
    UpstreamError,
    /// A local resource failed (no file descriptors for a pipe, …).
    ProxyError,
    /// The caller ended the flow (drain on shutdown, policy re-evaluation).
    Cancelled,
}

impl CloseReason {
    /// The reason code written into the audit record.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientClosed => "client-closed",
            Self::UpstreamClosed => "upstream-closed",
            Self::IdleTimeout => "idle-timeout",
            Self::ClientReset => "client-reset",
            Self::UpstreamReset => "upstream-reset",
            Self::ClientError => "client-error",
            Self::UpstreamError => "upstream-error",
            Self::ProxyError => "proxy-error",
            Self::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a finished relay reports.
#[derive(Debug)]
#[non_exhaustive]
pub struct RelayStats {
    /// Bytes moved client → upstream (not counting bytes the caller replayed).
    pub bytes_up: u64,
    /// Bytes moved upstream → client.
    pub bytes_down: u64,
    /// Why the flow ended.
    pub reason: CloseReason,
    /// The mover that ran.
    pub mode: RelayMode,
    /// The socket error behind a reset/error reason, for logs.
    pub error: Option<io::Error>,
}

/// Relays until both sides close, one fails, or the idle timeout fires.
pub async fn relay(client: TcpStream, upstream: TcpStream, opts: &RelayOptions) -> RelayStats {
    relay_until(client, upstream, opts, std::future::pending()).await
}

/// As [`relay`], and also ends (with [`CloseReason::Cancelled`]) when
/// `cancel` completes.
pub async fn relay_until<C>(client: TcpStream, upstream: TcpStream, opts: &RelayOptions, cancel: C) -> RelayStats
where
    C: Future<Output = ()>,
{
    let mode = opts.mode.resolve();
    let shared = Shared {
        start: Instant::now(),
        last_activity_ms: AtomicU64::new(0),
        first_eof: AtomicU8::new(0),
        up: AtomicU64::new(0),
        down: AtomicU64::new(0),
    };
    let up = pump(&client, &upstream, Side::Client, &shared.up, &shared, opts, mode);
    let down = pump(&upstream, &client, Side::Upstream, &shared.down, &shared, opts, mode);
    let idle = idle_watch(&shared, opts.idle_timeout);

    let (reason, error) = tokio::select! {
        result = async { tokio::try_join!(up, down) } => match result {
            Ok(_) => {
                let reason = if shared.first_eof.load(Ordering::Relaxed) == Side::Upstream as u8 {
                    CloseReason::UpstreamClosed
                } else {
                    CloseReason::ClientClosed
                };
                (reason, None)
            }
            Err(e) => (e.reason(), Some(e.error)),
        },
        () = idle => (CloseReason::IdleTimeout, None),
        () = cancel => (CloseReason::Cancelled, None),
    };
    RelayStats {
        bytes_up: shared.up.load(Ordering::Relaxed),
        bytes_down: shared.down.load(Ordering::Relaxed),
        reason,
        mode,
        error,
    }
}

/// Which socket something happened on. Values are stored in `first_eof`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Side {
    Client = 1,
    Upstream = 2,
}

/// Per-flow state both directions and the idle watcher read. Atomics (not
/// `Cell`) only so the relay future stays `Send`; all access is from one task.
struct Shared {
    start: Instant,
    last_activity_ms: AtomicU64,
    first_eof: AtomicU8,
    up: AtomicU64,
    down: AtomicU64,
}

impl Shared {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_activity_ms.store(ms, Ordering::Relaxed);
    }
}

struct PumpError {
    side: Option<Side>,
    error: io::Error,
}

impl PumpError {
    fn on(side: Side) -> impl FnOnce(io::Error) -> Self {
        move |error| Self {
            side: Some(side),
            error,
        }
    }

    fn local(error: io::Error) -> Self {
        Self { side: None, error }
    }

    fn reason(&self) -> CloseReason {
        let reset = matches!(
            self.error.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted | io::ErrorKind::BrokenPipe
        );
        match (self.side, reset) {
            (Some(Side::Client), true) => CloseReason::ClientReset,
            (Some(Side::Upstream), true) => CloseReason::UpstreamReset,
            (Some(Side::Client), false) => CloseReason::ClientError,
            (Some(Side::Upstream), false) => CloseReason::UpstreamError,
            (None, _) => CloseReason::ProxyError,
        }
    }
}

fn other(side: Side) -> Side {
    match side {
        Side::Client => Side::Upstream,
        Side::Upstream => Side::Client,
    }
}

/// One direction, `src` → `dst`, until EOF on `src` (then half-close `dst`).
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    src_side: Side,
    counter: &AtomicU64,
    shared: &Shared,
    opts: &RelayOptions,
    mode: RelayMode,
) -> Result<(), PumpError> {
    #[cfg(target_os = "linux")]
    if mode == RelayMode::Splice {
        pump_splice(src, dst, src_side, counter, shared, opts.pipe_size).await?;
        end_of_stream(dst, src_side, shared);
        return Ok(());
    }
    let _ = mode;
    pump_copy(src, dst, src_side, counter, shared, opts.copy_buffer).await?;
    end_of_stream(dst, src_side, shared);
    Ok(())
}

fn end_of_stream(dst: &TcpStream, src_side: Side, shared: &Shared) {
    let _ = shared
        .first_eof
        .compare_exchange(0, src_side as u8, Ordering::Relaxed, Ordering::Relaxed);
    // Pass the half-close on. ENOTCONN here only means the peer is already
    // gone, which the other direction will report.
    let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
}

#[cfg(target_os = "linux")]
async fn pump_splice(
    src: &TcpStream,
    dst: &TcpStream,
    src_side: Side,
    counter: &AtomicU64,
    shared: &Shared,
    pipe_size: usize,
) -> Result<(), PumpError> {
    let dst_side = other(src_side);
    loop {
        // Idle point: no pipe is held while waiting.
        src.readable().await.map_err(PumpError::on(src_side))?;
        let mut pipe = crate::sys::take_pipe(pipe_size).map_err(PumpError::local)?;
        loop {
            match pipe.try_fill_from(src) {
                Ok(0) => {
                    crate::sys::give_pipe(pipe);
                    return Ok(());
                }
                Ok(n) => {
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                    shared.touch();
                    // On error the pipe still holds bytes and is closed on
                    // drop, never pooled.
                    pipe.drain_to(dst).await.map_err(PumpError::on(dst_side))?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    crate::sys::give_pipe(pipe);
                    break;
                }
                Err(e) => return Err(PumpError::on(src_side)(e)),
            }
        }
    }
}

/// Buffers kept per worker thread for the copy mover.
const BUF_POOL_MAX: usize = 32;

thread_local! {
    static BUF_POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

fn take_buf(size: usize) -> Box<[u8]> {
    let size = size.max(4096);
    match BUF_POOL.with(|p| p.borrow_mut().pop()) {
        Some(buf) if buf.len() == size => buf,
        _ => vec![0u8; size].into_boxed_slice(),
    }
}

fn give_buf(buf: Box<[u8]>) {
    BUF_POOL.with(|p| {
        let mut pool = p.borrow_mut();
        if pool.len() < BUF_POOL_MAX {
            pool.push(buf);
        }
    });
}

async fn pump_copy(
    src: &TcpStream,
    dst: &TcpStream,
    src_side: Side,
    counter: &AtomicU64,
    shared: &Shared,
    buf_size: usize,
) -> Result<(), PumpError> {
    let dst_side = other(src_side);
    loop {
        // Idle point: no buffer is held while waiting.
        src.readable().await.map_err(PumpError::on(src_side))?;
        let mut buf = take_buf(buf_size);
        loop {
            match src.try_read(&mut buf) {
                Ok(0) => {
                    give_buf(buf);
                    return Ok(());
                }
                Ok(n) => {
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                    shared.touch();
                    write_all(dst, &buf[..n]).await.map_err(PumpError::on(dst_side))?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    give_buf(buf);
                    break;
                }
                Err(e) => return Err(PumpError::on(src_side)(e)),
            }
        }
    }
}

async fn write_all(dst: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        dst.writable().await?;
        match dst.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Completes when no byte has moved for `timeout`; never without a timeout.
async fn idle_watch(shared: &Shared, timeout: Option<Duration>) {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    loop {
        let last = Duration::from_millis(shared.last_activity_ms.load(Ordering::Relaxed));
        let deadline = shared.start + last + timeout;
        if Instant::now() >= deadline {
            return;
        }
        sleep_until(deadline).await;
    }
}
