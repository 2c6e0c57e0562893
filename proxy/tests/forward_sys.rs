//! The syscall layer and the accept limiter on real sockets: what
//! `original_dst` says about a socket nobody redirected, `IP_TRANSPARENT`,
//! raw pipe splicing, and accept pausing at the connection limit.

// Tests: a failed unwrap/expect is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use sluice::forward::limit::ConnLimit;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

#[tokio::test]
async fn original_dst_on_a_plain_socket_is_not_garbage() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (_c, accepted) = tokio::join!(TcpStream::connect(addr), l.accept());
    let (s, _) = accepted.unwrap();
    match sluice::sys::original_dst(&s) {
        // No conntrack entry (ENOENT) or no conntrack at all (ENOPROTOOPT).
        Err(e) => assert!(e.raw_os_error().is_some(), "{e:?}"),
        // Conntrack tracks the flow without NAT: the real destination, which
        // is our own address (the caller treats that as "not redirected").
        Ok(dst) => assert_eq!(dst, addr),
    }
}

#[tokio::test]
async fn original_dst_on_ipv6_plain_socket_is_not_garbage() {
    let Ok(l) = TcpListener::bind("[::1]:0").await else {
        eprintln!("no IPv6 loopback here; nothing to check");
        return;
    };
    let addr = l.local_addr().unwrap();
    let (_c, accepted) = tokio::join!(TcpStream::connect(addr), l.accept());
    let (s, _) = accepted.unwrap();
    match sluice::sys::original_dst(&s) {
        Err(e) => assert!(e.raw_os_error().is_some(), "{e:?}"),
        Ok(dst) => assert_eq!(dst.ip(), addr.ip()),
    }
}

#[tokio::test]
async fn ip_transparent_needs_cap_net_admin() {
    for socket in [TcpSocket::new_v4().unwrap(), TcpSocket::new_v6().unwrap()] {
        match sluice::sys::set_ip_transparent(&socket) {
            Ok(()) => {
                // We had CAP_NET_ADMIN: binding a foreign address now works.
                let sock = socket2::SockRef::from(&socket);
                assert!(sock.domain().is_ok());
            }
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e:?}"),
        }
    }
}

#[tokio::test]
async fn pipe_splices_socket_to_socket() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
    let (mut a, b) = (a.unwrap(), b.unwrap().0);
    let (c, d) = tokio::join!(TcpStream::connect(addr), l.accept());
    let (c, mut d) = (c.unwrap(), d.unwrap().0);

    let mut pipe = sluice::sys::take_pipe(64 * 1024).unwrap();
    assert!(pipe.capacity() >= 4096);
    a.write_all(b"through the kernel").await.unwrap();
    let n = pipe.fill_from(&b).await.unwrap();
    assert_eq!(n, 18);
    assert_eq!(pipe.len(), 18);
    assert_eq!(pipe.drain_to(&c).await.unwrap(), 18);
    assert!(pipe.is_empty());
    sluice::sys::give_pipe(pipe);

    let mut got = [0u8; 18];
    d.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"through the kernel");

    // EOF reads as 0 bytes.
    a.shutdown().await.unwrap();
    let mut pipe = sluice::sys::take_pipe(0).unwrap();
    assert_eq!(pipe.fill_from(&b).await.unwrap(), 0);
    sluice::sys::give_pipe(pipe);
}

#[tokio::test(start_paused = true)]
async fn accepting_pauses_at_the_limit_and_resumes() {
    let limit = ConnLimit::new(1);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    // Both clients complete the handshake in the kernel backlog.
    let _c1 = TcpStream::connect(addr).await.unwrap();
    let _c2 = TcpStream::connect(addr).await.unwrap();

    let (_s1, _, permit) = limit.accept(&l).await.unwrap();
    assert_eq!(limit.in_use(), 1);
    // At the limit, accept is not even called: the wait only ends when the
    // permit is released (paused time makes "never" instant to observe).
    let blocked = tokio::time::timeout(Duration::from_secs(3600), limit.accept(&l)).await;
    assert!(blocked.is_err(), "accepted past the limit");
    assert!(limit.try_acquire().is_none());

    drop(permit);
    let (_s2, _, _permit2) = limit.accept(&l).await.unwrap();
    assert_eq!(limit.in_use(), 1);
}

#[test]
fn zero_means_unlimited() {
    let limit = ConnLimit::new(0);
    let permits: Vec<_> = (0..1000).map(|_| limit.try_acquire().unwrap()).collect();
    assert_eq!(limit.in_use(), 1000);
    drop(permits);
    assert_eq!(limit.in_use(), 0);
}

/// A reload that changes `max_connections`: raising it frees slots at once;
/// lowering it below what is in use cuts no flow, and no new one starts
/// until enough have ended.
#[tokio::test(start_paused = true)]
async fn a_resized_limit_raises_at_once_and_lowers_as_flows_end() {
    let mut limit = ConnLimit::new(2);
    let a = limit.try_acquire().unwrap();
    let b = limit.try_acquire().unwrap();
    assert!(limit.try_acquire().is_none());
    limit.resize(3);
    let c = limit.try_acquire().expect("raised: a slot at once");
    assert_eq!(limit.in_use(), 3);

    limit.resize(1);
    assert_eq!(limit.max(), 1);
    assert!(limit.try_acquire().is_none(), "three in use against a limit of one");
    drop(a);
    tokio::task::yield_now().await;
    assert!(limit.try_acquire().is_none(), "two still in use");
    drop(b);
    tokio::task::yield_now().await;
    assert!(limit.try_acquire().is_none(), "one still in use");
    drop(c);
    // The slots taken back as flows ended leave exactly one.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let d = limit.try_acquire().expect("under the new limit now");
    assert!(limit.try_acquire().is_none());
    drop(d);
}
