//! Batched UDP for the DNS proxy: `recvmmsg` / `sendmmsg` with the local
//! address each datagram was sent to (`IP_PKTINFO`), so a wildcard listener
//! answers from the address the client asked.

use std::io;
use std::net::SocketAddr;

/// Most datagrams one [`recv_batch`] or [`send_batch`] call moves.
pub const UDP_BATCH: usize = 16;

/// One received datagram: its length in the buffer, its sender, and the
/// local address it was sent to when the socket reports it
/// ([`enable_pktinfo`]).
pub type Received = (usize, SocketAddr, Option<std::net::IpAddr>);

/// One datagram to send: payload, destination, and the local address to
/// send it from (`None`: whatever the route picks).
pub type Outgoing<'a> = (&'a [u8], SocketAddr, Option<std::net::IpAddr>);

/// Room for one `IP_PKTINFO` or `IPV6_PKTINFO` control message, aligned for
/// `cmsghdr`.
#[cfg(target_os = "linux")]
type CmsgBuf = [u64; 8];

/// Registers a UDP socket with the current tokio reactor for reading only
/// (see `dns::server::ListenerUdp` for why). Needs a runtime.
#[cfg(target_os = "linux")]
pub fn register_read_only(socket: std::net::UdpSocket) -> io::Result<tokio::io::unix::AsyncFd<std::net::UdpSocket>> {
    socket.set_nonblocking(true)?;
    // SAFETY: the `UdpSocket` owns a valid descriptor and is moved into the
    // `AsyncFd`, which is the only owner from here on: nothing can close or
    // replace the descriptor while it is registered.
    let fd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE) };
    fd.map_err(io::Error::from)
}

/// Asks the kernel to report, with every datagram received on `fd`, the
/// local address it was sent to (`IP_PKTINFO`, and `IPV6_RECVPKTINFO` on an
/// IPv6 socket, which also receives IPv4 as mapped addresses). A listener
/// on a wildcard address needs it to answer from the address a client
/// asked, not whatever the route to the client picks.
#[cfg(target_os = "linux")]
pub fn enable_pktinfo(fd: std::os::fd::BorrowedFd<'_>, ipv6: bool) -> io::Result<()> {
    set_pktinfo(fd, ipv6, true)
}

/// [`enable_pktinfo`], or its undoing when `on` is false.
#[cfg(target_os = "linux")]
pub fn set_pktinfo(fd: std::os::fd::BorrowedFd<'_>, ipv6: bool, on: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let on = libc::c_int::from(on);
    let set = |level: libc::c_int, name: libc::c_int| {
        // SAFETY: `on` is a live c_int and the length passed is its size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                name,
                std::ptr::from_ref(&on).cast(),
                socklen_of::<libc::c_int>(),
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    if ipv6 {
        set(libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO)?;
        // IPv4 arriving on a dual-stack socket reports IP_PKTINFO; an
        // IPv6-only socket may refuse the option, which changes nothing.
        let _ = set(libc::IPPROTO_IP, libc::IP_PKTINFO);
        Ok(())
    } else {
        set(libc::IPPROTO_IP, libc::IP_PKTINFO)
    }
}

/// Receives up to `bufs.len()` (at most [`UDP_BATCH`]) datagrams waiting on
/// the non-blocking UDP socket `fd` with one `recvmmsg(2)`, without
/// waiting. `out` is cleared, then gets a [`Received`] for each datagram,
/// in order, into `bufs[0..]`; a datagram longer than its buffer is cut to
/// the buffer's length. `WouldBlock` when nothing is waiting.
///
/// The DNS listener uses it to take a burst of queries per wake-up, so the
/// per-syscall and per-wake-up costs are shared by the burst.
#[cfg(target_os = "linux")]
pub fn recv_batch(fd: std::os::fd::BorrowedFd<'_>, bufs: &mut [Vec<u8>], out: &mut Vec<Received>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    out.clear();
    let n = bufs.len().min(UDP_BATCH);
    if n == 0 {
        return Ok(());
    }
    // SAFETY: all-zero bytes are a valid value for these plain C structs
    // (integers and null pointers).
    let mut addrs: [libc::sockaddr_storage; UDP_BATCH] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut iovs: [libc::iovec; UDP_BATCH] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut hdrs: [libc::mmsghdr; UDP_BATCH] = unsafe { std::mem::zeroed() };
    let mut cmsgs: [CmsgBuf; UDP_BATCH] = [[0; 8]; UDP_BATCH];
    for i in 0..n {
        iovs[i] = libc::iovec {
            iov_base: bufs[i].as_mut_ptr().cast(),
            iov_len: bufs[i].len(),
        };
        hdrs[i].msg_hdr.msg_name = std::ptr::from_mut(&mut addrs[i]).cast();
        hdrs[i].msg_hdr.msg_namelen = socklen_of::<libc::sockaddr_storage>();
        hdrs[i].msg_hdr.msg_iov = std::ptr::from_mut(&mut iovs[i]);
        hdrs[i].msg_hdr.msg_iovlen = 1;
        hdrs[i].msg_hdr.msg_control = cmsgs[i].as_mut_ptr().cast();
        hdrs[i].msg_hdr.msg_controllen = std::mem::size_of::<CmsgBuf>();
    }
    // SAFETY: `hdrs[..n]` are initialised headers whose name, iovec and
    // control pointers point into `addrs`, `iovs`, `bufs` and `cmsgs`, all
    // alive and not otherwise borrowed until the call returns; each iovec's
    // length is its buffer's length, each name length the size of its
    // `sockaddr_storage` and each control length the size of its buffer, so
    // the kernel writes only inside them. `n` is at most the length of each
    // array. A null timeout is allowed.
    let got = unsafe {
        libc::recvmmsg(
            fd.as_raw_fd(),
            hdrs.as_mut_ptr(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    for i in 0..usize::try_from(got).unwrap_or(0).min(n) {
        let hdr = &hdrs[i];
        let Some(src) = sockaddr_to_std(&addrs[i], hdr.msg_hdr.msg_namelen) else {
            continue;
        };
        let len = (hdr.msg_len as usize).min(bufs[i].len());
        out.push((len, src, pktinfo_dst(&hdr.msg_hdr)));
    }
    Ok(())
}

/// The local address in a received message's `IP_PKTINFO` or
/// `IPV6_PKTINFO` control message, if it has one.
#[cfg(target_os = "linux")]
fn pktinfo_dst(msg: &libc::msghdr) -> Option<std::net::IpAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr};
    // SAFETY: `msg` is a header the kernel filled in by recvmmsg, whose
    // control pointer and (kernel-updated) length describe a live buffer;
    // the CMSG_* walkers stay inside that length. Each payload is read
    // unaligned, only after the header's level, type and length say it
    // holds the structure read.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            let h = &*c;
            let data = libc::CMSG_DATA(c);
            if h.cmsg_level == libc::IPPROTO_IP
                && h.cmsg_type == libc::IP_PKTINFO
                && h.cmsg_len as usize >= libc::CMSG_LEN(std::mem::size_of::<libc::in_pktinfo>() as u32) as usize
            {
                let info = std::ptr::read_unaligned(data.cast::<libc::in_pktinfo>());
                return Some(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr)).into());
            }
            if h.cmsg_level == libc::IPPROTO_IPV6
                && h.cmsg_type == libc::IPV6_PKTINFO
                && h.cmsg_len as usize >= libc::CMSG_LEN(std::mem::size_of::<libc::in6_pktinfo>() as u32) as usize
            {
                let info = std::ptr::read_unaligned(data.cast::<libc::in6_pktinfo>());
                let ip = Ipv6Addr::from(info.ipi6_addr.s6_addr);
                return Some(ip.to_ipv4_mapped().map_or(ip.into(), Into::into));
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    None
}

/// Fills `buf` with the control message that makes a datagram leave from
/// `src`; returns its length.
#[cfg(target_os = "linux")]
fn pktinfo_src(src: std::net::IpAddr, buf: &mut CmsgBuf) -> usize {
    // SAFETY: a zeroed `msghdr` whose control pointer and length describe
    // `buf` lets CMSG_FIRSTHDR point at its start; `buf` has room for the
    // header plus either payload (64 bytes ≥ CMSG_SPACE of both), so the
    // header and the unaligned payload writes stay inside it.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_control = buf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of::<CmsgBuf>();
        let c = libc::CMSG_FIRSTHDR(&msg);
        if c.is_null() {
            return 0;
        }
        match src {
            std::net::IpAddr::V4(ip) => {
                (*c).cmsg_level = libc::IPPROTO_IP;
                (*c).cmsg_type = libc::IP_PKTINFO;
                (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::in_pktinfo>() as u32) as usize;
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(ip).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::in_pktinfo>(), info);
                libc::CMSG_SPACE(std::mem::size_of::<libc::in_pktinfo>() as u32) as usize
            }
            std::net::IpAddr::V6(ip) => {
                (*c).cmsg_level = libc::IPPROTO_IPV6;
                (*c).cmsg_type = libc::IPV6_PKTINFO;
                (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::in6_pktinfo>() as u32) as usize;
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr { s6_addr: ip.octets() },
                    ipi6_ifindex: 0,
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::in6_pktinfo>(), info);
                libc::CMSG_SPACE(std::mem::size_of::<libc::in6_pktinfo>() as u32) as usize
            }
        }
    }
}

/// Sends each [`Outgoing`] of `msgs` (at most [`UDP_BATCH`] of them) on the
/// non-blocking UDP socket `fd` with one `sendmmsg(2)`, without waiting,
/// each from its given local address when it has one. Returns how many were
/// sent (a prefix of `msgs`); `WouldBlock` when none could be.
#[cfg(target_os = "linux")]
pub fn send_batch(fd: std::os::fd::BorrowedFd<'_>, msgs: &[Outgoing<'_>]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let n = msgs.len().min(UDP_BATCH);
    if n == 0 {
        return Ok(0);
    }
    // SAFETY: all-zero bytes are a valid value for these plain C structs.
    let mut addrs: [libc::sockaddr_storage; UDP_BATCH] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut iovs: [libc::iovec; UDP_BATCH] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut hdrs: [libc::mmsghdr; UDP_BATCH] = unsafe { std::mem::zeroed() };
    let mut cmsgs: [CmsgBuf; UDP_BATCH] = [[0; 8]; UDP_BATCH];
    for (i, (bytes, dst, src)) in msgs.iter().take(n).enumerate() {
        iovs[i] = libc::iovec {
            // The kernel only reads through it (sendmmsg); the pointer type
            // is `*mut` because `iovec` is shared with the receive side.
            iov_base: bytes.as_ptr().cast_mut().cast(),
            iov_len: bytes.len(),
        };
        hdrs[i].msg_hdr.msg_name = std::ptr::from_mut(&mut addrs[i]).cast();
        hdrs[i].msg_hdr.msg_namelen = std_to_sockaddr(*dst, &mut addrs[i]);
        hdrs[i].msg_hdr.msg_iov = std::ptr::from_mut(&mut iovs[i]);
        hdrs[i].msg_hdr.msg_iovlen = 1;
        if let Some(src) = src {
            let len = pktinfo_src(*src, &mut cmsgs[i]);
            if len > 0 {
                hdrs[i].msg_hdr.msg_control = cmsgs[i].as_mut_ptr().cast();
                hdrs[i].msg_hdr.msg_controllen = len;
            }
        }
    }
    // SAFETY: `hdrs[..n]` point into `addrs`, `iovs`, `cmsgs` and the
    // borrowed `msgs` slices, all alive until the call returns; each name
    // length is the size of the address written into that storage and each
    // control length that of the message written into its buffer; sendmmsg
    // only reads them and writes `msg_len` inside `hdrs`.
    let sent = unsafe { libc::sendmmsg(fd.as_raw_fd(), hdrs.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(sent).unwrap_or(0))
}

#[cfg(target_os = "linux")]
pub(super) fn socklen_of<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(std::mem::size_of::<T>()).unwrap_or(libc::socklen_t::MAX)
}

/// Reads an IPv4 or IPv6 socket address the kernel wrote into `storage`.
#[cfg(target_os = "linux")]
pub(super) fn sockaddr_to_std(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET if len >= socklen_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a `sockaddr_in`, the
            // length says the kernel wrote all of it, and `sockaddr_storage`
            // is large and aligned enough for any socket address type.
            let a = unsafe { &*std::ptr::from_ref(storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 if len >= socklen_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above, for `sockaddr_in6`.
            let a = unsafe { &*std::ptr::from_ref(storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Writes `addr` into `storage` as the kernel expects it; returns its length.
#[cfg(target_os = "linux")]
fn std_to_sockaddr(addr: SocketAddr, storage: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: `sockaddr_storage` is large and aligned enough for a
            // `sockaddr_in`, and every bit pattern is valid for it.
            let sin = unsafe { &mut *std::ptr::from_mut(storage).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            };
            socklen_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for `sockaddr_in6`.
            let sin6 = unsafe { &mut *std::ptr::from_mut(storage).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            sin6.sin6_scope_id = a.scope_id();
            socklen_of::<libc::sockaddr_in6>()
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
#[allow(clippy::unwrap_used, reason = "test code: a panic is the failure report")]
mod udp_batch_tests {
    use std::net::UdpSocket;
    use std::os::fd::AsFd;

    use super::*;

    /// A wildcard socket learns which local address each datagram was sent
    /// to, and answers from it: 127.0.0.2 is answered from 127.0.0.2 (the
    /// route to the client would pick 127.0.0.1). IPv4 on a dual-stack
    /// IPv6 socket too.
    #[test]
    fn wildcard_sockets_answer_from_the_address_asked() {
        for wildcard in ["0.0.0.0:0", "[::]:0"] {
            let Ok(server) = UdpSocket::bind(wildcard) else {
                continue; // no IPv6 on this host
            };
            server.set_nonblocking(true).unwrap();
            enable_pktinfo(server.as_fd(), wildcard.starts_with('[')).unwrap();
            let port = server.local_addr().unwrap().port();
            let mut targets: Vec<SocketAddr> = vec![
                SocketAddr::from(([127, 0, 0, 1], port)),
                SocketAddr::from(([127, 0, 0, 2], port)),
            ];
            if wildcard.starts_with('[') {
                targets.push(SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), port));
            }
            for to in targets {
                let client = UdpSocket::bind(SocketAddr::new(
                    if to.is_ipv4() {
                        [127, 0, 0, 1].into()
                    } else {
                        std::net::Ipv6Addr::LOCALHOST.into()
                    },
                    0,
                ))
                .unwrap();
                client.connect(to).unwrap();
                client.send(b"query").unwrap();
                let mut bufs: Vec<Vec<u8>> = (0..UDP_BATCH).map(|_| vec![0u8; 64]).collect();
                let mut got = Vec::new();
                recv_batch(server.as_fd(), &mut bufs, &mut got).unwrap();
                assert_eq!(got.len(), 1, "{wildcard} -> {to}");
                let (len, src, dst) = got[0];
                assert_eq!(len, 5);
                assert_eq!(
                    dst,
                    Some(to.ip()),
                    "{wildcard}: local address of a datagram sent to {to}"
                );
                assert_eq!(send_batch(server.as_fd(), &[(b"answer", src, dst)]).unwrap(), 1);
                // A connected client only takes datagrams from `to`: this
                // fails (times out) if the answer left from another address.
                client
                    .set_read_timeout(Some(std::time::Duration::from_secs(5)))
                    .unwrap();
                let mut buf = [0u8; 16];
                let n = client.recv(&mut buf).unwrap();
                assert_eq!(&buf[..n], b"answer", "{wildcard} -> {to}");
            }
        }
    }

    #[test]
    fn send_and_receive_batches_keep_order_lengths_and_addresses() {
        for localhost in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(server) = UdpSocket::bind(localhost) else {
                continue; // no IPv6 on this host
            };
            server.set_nonblocking(true).unwrap();
            let mut bufs: Vec<Vec<u8>> = (0..UDP_BATCH).map(|_| vec![0u8; 64]).collect();
            let mut got = Vec::new();
            let err = recv_batch(server.as_fd(), &mut bufs, &mut got).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::WouldBlock);

            let clients: Vec<UdpSocket> = (0..3).map(|_| UdpSocket::bind(localhost).unwrap()).collect();
            let to = server.local_addr().unwrap();
            for (i, c) in clients.iter().enumerate() {
                c.send_to(&vec![i as u8; 10 + i], to).unwrap();
            }
            // Loopback delivery is synchronous: all three are queued now.
            recv_batch(server.as_fd(), &mut bufs, &mut got).unwrap();
            assert_eq!(got.len(), 3);
            for (i, (len, src, dst)) in got.iter().enumerate() {
                assert_eq!(*len, 10 + i);
                assert_eq!(*src, clients[i].local_addr().unwrap());
                assert_eq!(*dst, None, "no pktinfo unless asked for");
                assert!(bufs[i][..*len].iter().all(|b| usize::from(*b) == i));
            }

            let replies: Vec<(Vec<u8>, SocketAddr)> =
                got.iter().map(|(len, src, _)| (vec![0xab; *len * 2], *src)).collect();
            let msgs: Vec<Outgoing<'_>> = replies.iter().map(|(b, a)| (b.as_slice(), *a, None)).collect();
            assert_eq!(send_batch(server.as_fd(), &msgs).unwrap(), 3);
            for (i, c) in clients.iter().enumerate() {
                let mut buf = [0u8; 64];
                let (n, from) = c.recv_from(&mut buf).unwrap();
                assert_eq!((n, from), (2 * (10 + i), to));
            }
        }
    }
}
