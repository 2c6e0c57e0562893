//! Socket options for transparent interception: the destination a
//! connection had before iptables `REDIRECT` (`SO_ORIGINAL_DST`,
//! `IP6T_SO_ORIGINAL_DST`), and `IP_TRANSPARENT` / `IPV6_TRANSPARENT` for a
//! `TPROXY` listener.

use std::io;
use std::net::SocketAddr;

#[cfg(target_os = "linux")]
mod linux {
    use std::io;
    use std::mem::{MaybeUninit, size_of};
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
    use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

    use tokio::net::TcpStream;

    /// Reads the pre-`REDIRECT` destination of an accepted connection.
    pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
        let local = stream.local_addr()?;
        let fd = stream.as_fd();
        match local {
            SocketAddr::V4(_) => original_dst_v4(fd),
            // A dual-stack listener sees IPv4 flows as v4-mapped IPv6; their
            // conntrack entry is an IPv4 one, so ask the IPv4 table first.
            SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_some() => {
                original_dst_v4(fd).or_else(|_| original_dst_v6(fd))
            }
            SocketAddr::V6(_) => original_dst_v6(fd),
        }
    }

    fn original_dst_v4(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
        let mut addr = MaybeUninit::<libc::sockaddr_in>::zeroed();
        let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: `fd` is a live socket borrowed for the call; `addr` points to
        // writable memory of exactly `len` bytes, and the kernel writes at most
        // `len` bytes and updates `len`.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_IP,
                libc::SO_ORIGINAL_DST,
                addr.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the buffer was zero-initialised, so every byte is defined
        // whatever the kernel wrote; `sockaddr_in` is plain old data.
        let addr = unsafe { addr.assume_init() };
        if len as usize != size_of::<libc::sockaddr_in>() || addr.sin_family != libc::AF_INET as libc::sa_family_t {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "SO_ORIGINAL_DST returned a non-IPv4 address",
            ));
        }
        let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
        Ok(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(addr.sin_port))))
    }

    fn original_dst_v6(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
        let mut addr = MaybeUninit::<libc::sockaddr_in6>::zeroed();
        let mut len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        // SAFETY: as in `original_dst_v4`: a live borrowed fd and a writable
        // buffer whose size is passed in `len`.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_IPV6,
                libc::IP6T_SO_ORIGINAL_DST,
                addr.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: zero-initialised plain old data, see above.
        let addr = unsafe { addr.assume_init() };
        if len as usize != size_of::<libc::sockaddr_in6>() || addr.sin6_family != libc::AF_INET6 as libc::sa_family_t {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "IP6T_SO_ORIGINAL_DST returned a non-IPv6 address",
            ));
        }
        Ok(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(addr.sin6_addr.s6_addr),
            u16::from_be(addr.sin6_port),
            u32::from_be(addr.sin6_flowinfo),
            addr.sin6_scope_id,
        )))
    }

    fn setsockopt_int(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
        // SAFETY: `fd` is a live borrowed socket; the option value is a local
        // `c_int` whose address and exact size are passed.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                name,
                (&value as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Marks a socket `IP_TRANSPARENT` (IPv4) or `IPV6_TRANSPARENT` (IPv6).
    pub fn set_ip_transparent(socket: &impl AsFd) -> io::Result<()> {
        set_ip_transparent_to(socket, true)
    }

    /// Sets or clears `IP_TRANSPARENT` (IPv4) or `IPV6_TRANSPARENT` (IPv6)
    /// on a socket, bound or not: netfilter's `TPROXY` reads it per packet.
    pub fn set_ip_transparent_to(socket: &impl AsFd, on: bool) -> io::Result<()> {
        let fd = socket.as_fd();
        let domain = socket2::SockRef::from(&fd).domain()?;
        let value = libc::c_int::from(on);
        if domain == socket2::Domain::IPV6 {
            setsockopt_int(fd, libc::SOL_IPV6, libc::IPV6_TRANSPARENT, value)
        } else if domain == socket2::Domain::IPV4 {
            setsockopt_int(fd, libc::SOL_IP, libc::IP_TRANSPARENT, value)
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "IP_TRANSPARENT needs an IPv4 or IPv6 socket",
            ))
        }
    }
}

#[cfg(target_os = "linux")]
pub use linux::{set_ip_transparent, set_ip_transparent_to};

/// The destination a connection had before iptables `REDIRECT` (IPv4
/// `SO_ORIGINAL_DST`, IPv6 `IP6T_SO_ORIGINAL_DST`).
///
/// On a socket that was not redirected this returns an error (`ENOENT` when
/// conntrack has no entry, `ENOPROTOOPT` without conntrack) — or, when
/// conntrack tracks the flow without NAT, the socket's own local address,
/// which the caller must treat as "not redirected" (a loop to ourselves).
#[cfg(target_os = "linux")]
pub fn original_dst(stream: &tokio::net::TcpStream) -> io::Result<SocketAddr> {
    linux::original_dst(stream)
}

/// Not supported off Linux: transparent interception relies on netfilter.
#[cfg(not(target_os = "linux"))]
pub fn original_dst(_stream: &tokio::net::TcpStream) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "SO_ORIGINAL_DST (transparent mode) is only available on Linux",
    ))
}

/// Not supported off Linux: `TPROXY` is a netfilter feature.
#[cfg(not(target_os = "linux"))]
pub fn set_ip_transparent_to<S>(_socket: &S, _on: bool) -> io::Result<()> {
    set_ip_transparent(_socket)
}

/// Not supported off Linux: `TPROXY` is a netfilter feature.
#[cfg(not(target_os = "linux"))]
pub fn set_ip_transparent<S>(_socket: &S) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "IP_TRANSPARENT (TPROXY) is only available on Linux",
    ))
}
