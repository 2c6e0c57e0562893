//! `splice(2)`: relayed bytes move socket → pipe → socket inside the
//! kernel, so the relay in `forward::relay` never copies payload through
//! user space. A relay owns a pipe only while bytes are in flight: pipes
//! come from a small per-thread pool and go back to it empty.

/// A kernel pipe used as the in-kernel buffer between two `splice(2)` calls.
///
/// Only the relay owns one, and only while bytes are in flight; `len` counts
/// the bytes that entered the pipe and have not yet left it, which is what
/// tells the caller whether the pipe may be returned to the pool.
#[derive(Debug)]
pub struct Pipe {
    #[cfg(target_os = "linux")]
    read: std::os::fd::OwnedFd,
    #[cfg(target_os = "linux")]
    write: std::os::fd::OwnedFd,
    capacity: usize,
    len: usize,
}

impl Pipe {
    /// Bytes that entered the pipe and have not been spliced out yet.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the pipe holds no bytes (and so may be pooled).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pipe's kernel buffer size (after the `F_SETPIPE_SZ` attempt).
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use super::Pipe;
    use std::cell::RefCell;
    use std::io;

    use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
    use tokio::io::Interest;
    use tokio::net::TcpStream;

    /// Creates a non-blocking, close-on-exec pipe and asks for `size` bytes of
    /// buffer (best effort: the kernel caps it at `fs.pipe-max-size`).
    pub fn new_pipe(size: usize) -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a writable array of two ints, as pipe2 requires.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by
        // nobody else; wrapping them transfers ownership (closed on drop).
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let wanted = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
        if wanted > 0 {
            // SAFETY: F_SETPIPE_SZ takes an int argument and touches no memory
            // of ours; failure (EPERM over the limit, EBUSY) is harmless.
            let _ = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, wanted) };
        }
        // SAFETY: F_GETPIPE_SZ takes no argument and returns an int.
        let got = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        let capacity = usize::try_from(got).unwrap_or(64 * 1024).max(4096);
        Ok(Pipe {
            read,
            write,
            capacity,
            len: 0,
        })
    }

    /// One `splice(2)` call between two descriptors, non-blocking, moving
    /// pages where the kernel can.
    pub fn splice_once(fd_in: BorrowedFd<'_>, fd_out: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        // SAFETY: both descriptors are live for the duration of the borrow;
        // null offsets mean "use and advance the file position", which is
        // what sockets and pipes require; no user memory is passed.
        let n = unsafe {
            libc::splice(
                fd_in.as_raw_fd(),
                std::ptr::null_mut(),
                fd_out.as_raw_fd(),
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    impl Pipe {
        /// Waits until `src` is readable and splices up to the pipe's free
        /// space into the pipe. `Ok(0)` means `src` reached EOF.
        pub async fn fill_from(&mut self, src: &TcpStream) -> io::Result<usize> {
            let room = self.capacity - self.len;
            if room == 0 {
                return Err(io::Error::other("splice pipe is full"));
            }
            loop {
                src.readable().await?;
                // try_io clears tokio's readiness on EAGAIN, so the next
                // `readable()` really waits for the socket.
                match src.try_io(Interest::READABLE, || {
                    splice_once(src.as_fd(), self.write.as_fd(), room)
                }) {
                    Ok(n) => {
                        self.len += n;
                        return Ok(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
        }

        /// Non-blocking variant of [`Pipe::fill_from`]: `Err(WouldBlock)` when
        /// `src` has nothing to read right now (readiness is cleared).
        pub fn try_fill_from(&mut self, src: &TcpStream) -> io::Result<usize> {
            let room = self.capacity - self.len;
            let n = src.try_io(Interest::READABLE, || {
                splice_once(src.as_fd(), self.write.as_fd(), room)
            })?;
            self.len += n;
            Ok(n)
        }

        /// One non-blocking splice of the pipe's bytes into `dst`:
        /// `Err(WouldBlock)` when `dst` cannot take more right now
        /// (readiness is cleared, so `poll_write_ready` will wait).
        pub fn try_drain_to(&mut self, dst: &TcpStream) -> io::Result<usize> {
            let n = dst.try_io(Interest::WRITABLE, || {
                splice_once(self.read.as_fd(), dst.as_fd(), self.len)
            })?;
            if n == 0 && self.len > 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "splice wrote zero bytes"));
            }
            self.len -= n;
            Ok(n)
        }

        /// Splices everything the pipe holds into `dst`, waiting for
        /// writability as needed (partial writes are retried).
        pub async fn drain_to(&mut self, dst: &TcpStream) -> io::Result<usize> {
            let mut total = 0;
            while self.len > 0 {
                dst.writable().await?;
                match dst.try_io(Interest::WRITABLE, || {
                    splice_once(self.read.as_fd(), dst.as_fd(), self.len)
                }) {
                    Ok(0) => {
                        return Err(io::Error::new(io::ErrorKind::WriteZero, "splice wrote zero bytes"));
                    }
                    Ok(n) => {
                        self.len -= n;
                        total += n;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
            Ok(total)
        }
    }

    /// Pipes kept per worker thread for reuse; beyond this they are closed.
    const POOL_MAX: usize = 32;

    thread_local! {
        static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
    }

    /// Takes an empty pipe from this thread's pool, or makes one of `size`.
    pub fn take_pipe(size: usize) -> io::Result<Pipe> {
        // The size is a per-relay option; a pooled pipe of another size is
        // still correct, only differently sized, so any pooled pipe will do.
        match POOL.with(|p| p.borrow_mut().pop()) {
            Some(p) => Ok(p),
            None => new_pipe(size),
        }
    }

    /// Returns a pipe to this thread's pool if it is empty; a pipe still
    /// holding bytes (an aborted relay) is closed, never reused.
    pub fn give_pipe(pipe: Pipe) {
        if !pipe.is_empty() {
            return;
        }
        POOL.with(|p| {
            let mut pool = p.borrow_mut();
            if pool.len() < POOL_MAX {
                pool.push(pipe);
            }
        });
    }
}

#[cfg(target_os = "linux")]
pub use linux::{give_pipe, new_pipe, splice_once, take_pipe};

/// True where the `splice(2)` relay is available.
pub const SPLICE_SUPPORTED: bool = cfg!(target_os = "linux");
