//! UDP under `TPROXY`: a datagram intercepted by iptables keeps the
//! destination the client sent it to, and the kernel hands that
//! destination to a socket that asked for it (`IP_RECVORIGDSTADDR`,
//! `IPV6_RECVORIGDSTADDR`) in a control message of `recvmsg`. It is the
//! `quic` listener's only source of truth for where a transparent flow was
//! going (there is no `SO_ORIGINAL_DST` for UDP).

use std::io;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;

/// One datagram: its length in the caller's buffer, who sent it, and the
/// destination it had before `TPROXY` (absent when the socket did not ask,
/// or the datagram was addressed to the socket itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrigDatagram {
    pub len: usize,
    pub src: SocketAddr,
    pub orig_dst: Option<SocketAddr>,
}

/// Asks the kernel to report each datagram's original destination. A
/// dual-stack IPv6 socket also asks for IPv4's (its IPv4 datagrams carry
/// the IPv4 control message).
#[cfg(target_os = "linux")]
pub fn enable_recv_orig_dst(fd: BorrowedFd<'_>, ipv6: bool) -> io::Result<()> {
    set_recv_orig_dst(fd, ipv6, true)
}

/// [`enable_recv_orig_dst`], or its undoing when `on` is false.
#[cfg(target_os = "linux")]
pub fn set_recv_orig_dst(fd: BorrowedFd<'_>, ipv6: bool, on: bool) -> io::Result<()> {
    if ipv6 {
        setsockopt_flag(fd, libc::SOL_IPV6, libc::IPV6_RECVORIGDSTADDR, on)?;
        // A v6-only socket refuses the IPv4 option; it never sees IPv4.
        let _ = setsockopt_flag(fd, libc::SOL_IP, libc::IP_RECVORIGDSTADDR, on);
        Ok(())
    } else {
        setsockopt_flag(fd, libc::SOL_IP, libc::IP_RECVORIGDSTADDR, on)
    }
}

#[cfg(target_os = "linux")]
fn setsockopt_flag(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int, on: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let one = libc::c_int::from(on);
    // SAFETY: `fd` is a live socket borrowed for the call; the option value
    // points to a `c_int` that outlives the call, and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&one).cast(),
            super::udp::socklen_of::<libc::c_int>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Control-message room for one original destination (a `sockaddr_in6`
/// under its header, rounded up) with margin for one more message.
#[cfg(target_os = "linux")]
const CMSG_ROOM: usize = 128;

/// Receives one datagram into `buf` without blocking (`WouldBlock` when
/// none is queued), with its sender and original destination. A datagram
/// longer than `buf` is cut to it, as `recv_from` does.
#[cfg(target_os = "linux")]
pub fn recv_orig_dst(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<OrigDatagram> {
    use std::os::fd::AsRawFd;
    // u64 words keep the control buffer aligned for `cmsghdr`.
    let mut control = [0u64; CMSG_ROOM / 8];
    // SAFETY: all-zero is a valid `sockaddr_storage` (plain old data).
    let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: all-zero is a valid `msghdr`; the fields that matter are set
    // below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = std::ptr::from_mut(&mut from).cast();
    msg.msg_namelen = super::udp::socklen_of::<libc::sockaddr_storage>();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: every pointer in `msg` points to memory owned by this frame
    // that outlives the call (`from`, `iov` over `buf`, `control`), with its
    // size given; the kernel writes within those sizes and updates them.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let len = usize::try_from(n).unwrap_or(0).min(buf.len());
    let src = super::udp::sockaddr_to_std(&from, msg.msg_namelen)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "datagram from a non-IP address"))?;
    let mut orig_dst = None;
    // A truncated control buffer may have lost the original destination:
    // none, so a transparent listener refuses the datagram's flow.
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Ok(OrigDatagram {
            len,
            src,
            orig_dst: None,
        });
    }
    // Where the control data the kernel wrote ends: no payload is read
    // past it, whatever a header's `cmsg_len` says.
    #[allow(clippy::unnecessary_cast, reason = "size_t on glibc, socklen_t on musl")]
    let control_end = (msg.msg_control as usize).saturating_add(msg.msg_controllen as usize);
    // SAFETY: `msg` is the header the kernel just filled: `CMSG_FIRSTHDR`
    // returns null unless a whole `cmsghdr` fits in `msg_controllen`, and
    // `CMSG_NXTHDR` returns null unless the next whole header does. (They
    // do not check a header's payload: that bound is `control_end`, below.)
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: non-null `cmsg` points to a complete header inside
        // `control` (see above).
        let hdr = unsafe { &*cmsg };
        let is_v4 = hdr.cmsg_level == libc::SOL_IP && hdr.cmsg_type == libc::IP_ORIGDSTADDR;
        let is_v6 = hdr.cmsg_level == libc::SOL_IPV6 && hdr.cmsg_type == libc::IPV6_ORIGDSTADDR;
        if is_v4 || is_v6 {
            // SAFETY: `CMSG_LEN(0)` is arithmetic on a constant.
            let header = unsafe { libc::CMSG_LEN(0) } as usize;
            #[allow(clippy::unnecessary_cast, reason = "size_t on glibc, socklen_t on musl")]
            let data_len = (hdr.cmsg_len as usize).saturating_sub(header);
            // SAFETY: all-zero is a valid `sockaddr_storage`.
            let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            // SAFETY: `CMSG_DATA` is pointer arithmetic on a header inside
            // `control` (it is not dereferenced here).
            let data = unsafe { libc::CMSG_DATA(cmsg) };
            let left = control_end.saturating_sub(data as usize);
            let copy = data_len.min(left).min(std::mem::size_of::<libc::sockaddr_storage>());
            // SAFETY: `data` points inside `control`, and `copy` bytes from
            // it stay within `control_end` (the end of what the kernel
            // wrote in `control`) and within `storage`, which does not
            // overlap `control`.
            unsafe {
                std::ptr::copy_nonoverlapping(data, std::ptr::from_mut(&mut storage).cast::<u8>(), copy);
            }
            orig_dst = super::udp::sockaddr_to_std(&storage, copy as libc::socklen_t);
        }
        // SAFETY: as for `CMSG_FIRSTHDR`: `msg` and `cmsg` are the header
        // and a message of it.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok(OrigDatagram { len, src, orig_dst })
}

/// Not supported off Linux: `TPROXY` is a netfilter feature.
#[cfg(not(target_os = "linux"))]
pub fn set_recv_orig_dst(fd: BorrowedFd<'_>, ipv6: bool, _on: bool) -> io::Result<()> {
    enable_recv_orig_dst(fd, ipv6)
}

/// Not supported off Linux: `TPROXY` is a netfilter feature.
#[cfg(not(target_os = "linux"))]
pub fn enable_recv_orig_dst(_fd: BorrowedFd<'_>, _ipv6: bool) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "IP_RECVORIGDSTADDR (TPROXY) is only available on Linux",
    ))
}

/// Not supported off Linux: `TPROXY` is a netfilter feature.
#[cfg(not(target_os = "linux"))]
pub fn recv_orig_dst(_fd: BorrowedFd<'_>, _buf: &mut [u8]) -> io::Result<OrigDatagram> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "IP_RECVORIGDSTADDR (TPROXY) is only available on Linux",
    ))
}

#[cfg(all(test, target_os = "linux"))]
#[allow(clippy::unwrap_used, reason = "test code: a panic is the failure report")]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    /// Without TPROXY the original destination is the socket's own
    /// address: the control message is there, and parses.
    #[test]
    fn reports_the_destination_of_a_datagram() {
        for (bind, v6) in [("127.0.0.1:0", false), ("[::1]:0", true)] {
            let Ok(rx) = std::net::UdpSocket::bind(bind) else {
                continue; // no IPv6 here
            };
            enable_recv_orig_dst(rx.as_fd(), v6).unwrap();
            let to = rx.local_addr().unwrap();
            let tx = std::net::UdpSocket::bind(if v6 { "[::1]:0" } else { "127.0.0.1:0" }).unwrap();
            tx.send_to(b"hello", to).unwrap();
            rx.set_nonblocking(false).unwrap();
            let mut buf = [0u8; 3];
            // Blocking socket: MSG_DONTWAIT may still find it empty at first.
            let got = loop {
                match recv_orig_dst(rx.as_fd(), &mut buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                    other => break other.unwrap(),
                }
            };
            assert_eq!(got.len, 3, "cut to the buffer");
            assert_eq!(&buf, b"hel");
            assert_eq!(got.src, tx.local_addr().unwrap());
            assert_eq!(got.orig_dst, Some(to));
        }
    }
}
