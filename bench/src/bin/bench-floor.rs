//! The cheapest TCP relay this machine can run: the reference floor for the
//! side-by-side benchmark.
//!
//! It makes no decision at all. It accepts, reads the client's first bytes,
//! connects to one fixed upstream, sends them, then relays both ways until
//! both sides have closed, and closes. Like Sluice's relay, each direction
//! copies reads of under 16 KiB (a `recv` and a `send`) and switches to
//! `splice(2)` through a pooled pipe after a full one. One thread, one
//! epoll set driven directly (edge-triggered, every descriptor registered
//! once, no `EPOLL_CTL_DEL`: `close` removes it), no timers, nothing
//! allocated per flow but a slab slot (and a buffer if a send is partial).
//! Its CPU per connection and per GB is the kernel's loopback TCP work plus
//! the least event-loop cost on the proxy's core: what any proxy using the
//! same system calls pays before it does anything useful. `run.sh`
//! measures it beside the real proxies so the targets can be read against
//! it; it is never a "peer".
//!
//! Not a proxy to deploy: no limits, no timeouts, no policy; it trusts its
//! loopback clients. Errors on a flow close that flow.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark tool")]

use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::{AsFd, OwnedFd};

use clap::Parser;
use rustix::event::epoll::{self, Event, EventData, EventFlags};
use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvFlags, SendFlags, Shutdown, SocketFlags, SocketType, accept_with, bind, connect, listen, recv,
    send, shutdown, socket_with, sockopt,
};
use rustix::pipe::{PipeFlags, SpliceFlags, fcntl_setpipe_size, pipe_with, splice};

#[derive(Parser, Debug)]
struct Args {
    /// Where to listen (IPv4).
    #[arg(long)]
    listen: SocketAddrV4,
    /// The one upstream every flow goes to (IPv4).
    #[arg(long)]
    upstream: SocketAddrV4,
    /// Pipe size for the splice relay, the same as Sluice's default.
    #[arg(long, default_value_t = 256 * 1024)]
    pipe_bytes: usize,
}

const LISTENER: u64 = u64::MAX;
/// Reads of up to this many bytes are copied; a full one switches the
/// direction to splice (Sluice's relay does the same).
const COPY_BYTES: usize = 16 * 1024;
/// Edge-triggered, both directions, peer half-close reported.
const INTEREST: EventFlags = EventFlags::IN
    .union(EventFlags::OUT)
    .union(EventFlags::RDHUP)
    .union(EventFlags::ET);

/// A kernel pipe between two splices, and how many bytes it holds.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    len: usize,
}

/// One direction of a flow.
#[derive(Default)]
struct Half {
    /// Bytes copied in but not yet accepted by the destination.
    copied: Vec<u8>,
    /// Switched to splice after a full copy buffer, as Sluice's relay does:
    /// small exchanges cost a `recv` and a `send` instead of two splices.
    spliced: bool,
    pipe: Option<Pipe>,
    /// The source reached EOF.
    eof: bool,
    /// EOF was passed on (`shutdown(SHUT_WR)` on the destination) while
    /// the other direction still ran.
    done: bool,
}

/// Readiness bits per socket, set by events and cleared by `EAGAIN`, so a
/// wake-up tries only what can make progress (as tokio's readiness does
/// for Sluice): edge-triggered epoll reports a change once.
const READABLE: u8 = 1;
const WRITABLE: u8 = 2;

struct Flow {
    /// `[client, upstream]` readiness.
    ready: [u8; 2],
    client: OwnedFd,
    /// None until the client's first bytes arrived and the connect began.
    upstream: Option<OwnedFd>,
    /// `[client → upstream, upstream → client]`.
    halves: [Half; 2],
}

struct Floor {
    epoll: OwnedFd,
    upstream: SocketAddrV4,
    pipe_bytes: usize,
    flows: Vec<Option<Flow>>,
    free: Vec<usize>,
    pipes: Vec<Pipe>,
}

/// Sends what a copy left behind; `Ok(false)` while some remains (the
/// destination would block).
fn flush_copied(half: &mut Half, dst: std::os::fd::BorrowedFd<'_>, dst_ready: &mut u8) -> Result<bool, Errno> {
    while !half.copied.is_empty() {
        if *dst_ready & WRITABLE == 0 {
            return Ok(false);
        }
        match send(dst, &half.copied, SendFlags::NOSIGNAL) {
            Ok(n) => drop(half.copied.drain(..n)),
            Err(Errno::AGAIN) => {
                *dst_ready &= !WRITABLE;
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// A non-blocking, close-on-exec IPv4 TCP socket with `TCP_NODELAY`.
fn tcp_socket() -> Result<OwnedFd, Errno> {
    let fd = socket_with(
        AddressFamily::INET,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    sockopt::set_tcp_nodelay(&fd, true)?;
    Ok(fd)
}

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-floor: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> io::Result<()> {
    // TCP_NODELAY on the listener: accepted sockets inherit it.
    let listener = tcp_socket()?;
    sockopt::set_socket_reuseaddr(&listener, true)?;
    bind(&listener, &SocketAddr::V4(args.listen)).map_err(|e| {
        io::Error::other(format!(
            "cannot listen on {} ({e}): another process may hold the port; pass a free one with --listen",
            args.listen
        ))
    })?;
    listen(&listener, 4096)?;
    let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
    epoll::add(
        &epoll,
        &listener,
        EventData::new_u64(LISTENER),
        EventFlags::IN | EventFlags::ET,
    )?;
    // The bound address (the port may have been 0), for tests to read back.
    let bound = rustix::net::getsockname(&listener)?;
    let bound = SocketAddr::try_from(bound).map_err(|_| io::Error::other("listener has no IP address"))?;
    println!("listening on {bound}");
    eprintln!("bench-floor: {bound} -> {}", args.upstream);
    let mut floor = Floor {
        epoll,
        upstream: args.upstream,
        pipe_bytes: args.pipe_bytes,
        flows: Vec::new(),
        free: Vec::new(),
        pipes: Vec::new(),
    };
    let mut events = vec![
        Event {
            flags: EventFlags::empty(),
            data: EventData::new_u64(0),
        };
        256
    ];
    loop {
        let n = match epoll::wait(&floor.epoll, &mut events[..], None) {
            Ok(n) => n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        for ev in &events[..n] {
            let token = ev.data.u64();
            if token == LISTENER {
                floor.accept_all(&listener);
            } else {
                let slot = usize::try_from(token >> 1).unwrap();
                let side = usize::from(token & 1 == 1);
                let f = ev.flags;
                let mut bits = 0;
                if f.intersects(EventFlags::IN | EventFlags::RDHUP | EventFlags::HUP | EventFlags::ERR) {
                    bits |= READABLE;
                }
                if f.intersects(EventFlags::OUT | EventFlags::HUP | EventFlags::ERR) {
                    bits |= WRITABLE;
                }
                if let Some(Some(flow)) = floor.flows.get_mut(slot) {
                    flow.ready[side] |= bits;
                }
                floor.pump(slot);
            }
        }
    }
}

impl Floor {
    fn accept_all(&mut self, listener: &OwnedFd) {
        // The listener is edge-triggered: returning with connections still
        // queued would leave them unaccepted until another one arrives. A
        // failure other than "none left" (EMFILE, ENOBUFS, ENOMEM under
        // load) is retried for up to a second before giving up on this edge.
        let mut retries = 0;
        loop {
            match accept_with(listener, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC) {
                Ok(client) => self.open(client),
                Err(Errno::AGAIN) => return,
                // ECONNABORTED and the like: that one client is gone.
                Err(Errno::CONNABORTED | Errno::INTR) => {}
                Err(e) => {
                    eprintln!("bench-floor: accept: {e}");
                    retries += 1;
                    if retries > 1000 {
                        return;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        }
    }

    fn open(&mut self, client: OwnedFd) {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.flows.push(None);
            self.flows.len() - 1
        });
        let token = (slot as u64) << 1;
        if epoll::add(&self.epoll, &client, EventData::new_u64(token), INTEREST).is_err() {
            self.free.push(slot);
            return;
        }
        self.flows[slot] = Some(Flow {
            // Try the first read at once; assume room to write.
            ready: [READABLE | WRITABLE, WRITABLE],
            client,
            upstream: None,
            halves: [Half::default(), Half::default()],
        });
        self.pump(slot);
    }

    /// Moves whatever can move on a flow right now; closes it when both
    /// directions are done or anything fails.
    fn pump(&mut self, slot: usize) {
        let Some(mut flow) = self.flows.get_mut(slot).and_then(Option::take) else {
            return;
        };
        match self.step(slot, &mut flow) {
            Ok(false) => self.flows[slot] = Some(flow),
            // Done or failed: dropping the descriptors closes them, which
            // also takes them out of the epoll set.
            Ok(true) | Err(_) => {
                for half in &mut flow.halves {
                    if let Some(pipe) = half.pipe.take() {
                        self.give_pipe(pipe);
                    }
                }
                self.free.push(slot);
            }
        }
    }

    /// Ok(true) when the flow is finished.
    fn step(&mut self, slot: usize, flow: &mut Flow) -> Result<bool, Errno> {
        if flow.upstream.is_none() {
            let mut first = [0u8; 4096];
            let n = match recv(&flow.client, &mut first[..], RecvFlags::empty()) {
                Ok((0, _)) => return Ok(true),
                Ok((n, _)) => n,
                Err(Errno::AGAIN) => return Ok(false),
                Err(e) => return Err(e),
            };
            let up = tcp_socket()?;
            match connect(&up, &SocketAddr::V4(self.upstream)) {
                Ok(()) | Err(Errno::INPROGRESS) => {}
                Err(e) => return Err(e),
            }
            // On loopback the handshake is usually complete by now.
            let sent = match send(&up, &first[..n], SendFlags::NOSIGNAL) {
                Ok(s) => s,
                Err(Errno::AGAIN) => 0,
                Err(e) => return Err(e),
            };
            // Whatever the socket did not take goes out like any other
            // copied bytes, once the upstream is writable.
            flow.halves[0].copied.extend_from_slice(&first[sent..n]);
            epoll::add(&self.epoll, &up, EventData::new_u64(((slot as u64) << 1) | 1), INTEREST)?;
            flow.upstream = Some(up);
        }
        let up = flow.upstream.as_ref().expect("set above");
        let (c, u) = (flow.client.as_fd(), up.as_fd());
        let [to_up, to_client] = &mut flow.halves;
        let [rc, ru] = &mut flow.ready;
        self.relay(to_up, (c, rc), (u, ru))?;
        self.relay(to_client, (u, ru), (c, rc))?;
        // Both sides sent EOF and everything was delivered: `close` sends
        // the FINs, no `shutdown` needed.
        if flow
            .halves
            .iter()
            .all(|h| h.eof && h.pipe.is_none() && h.copied.is_empty())
        {
            return Ok(true);
        }
        for (half, dst) in flow.halves.iter_mut().zip([u, c]) {
            if half.eof && half.pipe.is_none() && half.copied.is_empty() && !half.done {
                shutdown(dst, Shutdown::Write)?;
                half.done = true;
            }
        }
        Ok(false)
    }

    /// Moves `src` → `dst` (copying until a read fills the copy buffer,
    /// then splicing through a pipe) until either side would block or
    /// `src` reached EOF with everything delivered.
    fn relay(
        &mut self,
        half: &mut Half,
        (src, src_ready): (std::os::fd::BorrowedFd<'_>, &mut u8),
        (dst, dst_ready): (std::os::fd::BorrowedFd<'_>, &mut u8),
    ) -> Result<(), Errno> {
        while !half.spliced {
            if !flush_copied(half, dst, dst_ready)? {
                return Ok(());
            }
            if half.eof || *src_ready & READABLE == 0 {
                return Ok(());
            }
            let mut buf = [0u8; COPY_BYTES];
            match recv(src, &mut buf[..], RecvFlags::empty()) {
                Ok((0, _)) => half.eof = true,
                Ok((n, _)) => {
                    half.spliced = n == COPY_BYTES;
                    let sent = if *dst_ready & WRITABLE == 0 {
                        0
                    } else {
                        match send(dst, &buf[..n], SendFlags::NOSIGNAL) {
                            Ok(s) => s,
                            Err(Errno::AGAIN) => {
                                *dst_ready &= !WRITABLE;
                                0
                            }
                            Err(e) => return Err(e),
                        }
                    };
                    half.copied.extend_from_slice(&buf[sent..n]);
                }
                Err(Errno::AGAIN) => {
                    *src_ready &= !READABLE;
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        // Spliced from here on, once the copied bytes are out.
        if !flush_copied(half, dst, dst_ready)? {
            return Ok(());
        }
        let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
        loop {
            if let Some(pipe) = &mut half.pipe {
                while pipe.len > 0 {
                    if *dst_ready & WRITABLE == 0 {
                        return Ok(());
                    }
                    match splice(&pipe.read, None, dst, None, pipe.len, flags) {
                        Ok(0) => return Err(Errno::PIPE),
                        Ok(n) => pipe.len -= n,
                        Err(Errno::AGAIN) => {
                            *dst_ready &= !WRITABLE;
                            return Ok(());
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            // The pipe is empty here. At EOF, or with nothing to read, it
            // goes back to the pool, as Sluice's does while a flow idles.
            if half.eof || *src_ready & READABLE == 0 {
                if let Some(pipe) = half.pipe.take() {
                    self.give_pipe(pipe);
                }
                return Ok(());
            }
            let pipe = match &mut half.pipe {
                Some(p) => p,
                None => half.pipe.insert(self.take_pipe()?),
            };
            match splice(src, None, &pipe.write, None, self.pipe_bytes, flags) {
                Ok(0) => half.eof = true,
                Ok(n) => pipe.len += n,
                // Pooled on the next pass, by the check above.
                Err(Errno::AGAIN) => *src_ready &= !READABLE,
                Err(e) => return Err(e),
            }
        }
    }

    /// Pools an empty pipe; one still holding bytes is closed.
    fn give_pipe(&mut self, pipe: Pipe) {
        if pipe.len == 0 && self.pipes.len() < 32 {
            self.pipes.push(pipe);
        }
    }

    fn take_pipe(&mut self) -> Result<Pipe, Errno> {
        if let Some(p) = self.pipes.pop() {
            return Ok(p);
        }
        let (read, write) = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
        // Best effort, as in Sluice: the kernel may cap it.
        let _ = fcntl_setpipe_size(&write, self.pipe_bytes);
        Ok(Pipe { read, write, len: 0 })
    }
}
