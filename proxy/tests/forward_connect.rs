//! Upstream connect: error mapping and the happy-eyeballs race, on real
//! loopback sockets.

// Tests: a failed unwrap/expect is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::time::Duration;

use sluice::forward::connect::{ConnectError, ConnectOptions, connect, connect_ips, connect_sending};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};

/// An address nobody listens on: bind a port, then free it.
async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

/// A listener whose accept queue is full, so the kernel drops further SYNs
/// and a connect to it hangs (a black hole on loopback).
struct BlackHole {
    addr: SocketAddr,
    listener: TcpListener,
    _fillers: Vec<StdTcpStream>,
}

async fn black_hole() -> BlackHole {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    // Blocking connects with a real-time timeout, off the runtime: the first
    // one or two fill the queue, the next one times out.
    let filled = tokio::task::spawn_blocking(move || {
        for _ in 0..16 {
            match StdTcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(s) => fillers.push(s),
                Err(_) => return Some(fillers),
            }
        }
        None
    })
    .await
    .unwrap()
    .expect("accept queue never filled: cannot make a black hole");
    BlackHole {
        addr,
        listener,
        _fillers: filled,
    }
}

fn opts(timeout: Duration) -> ConnectOptions {
    let mut o = ConnectOptions::default();
    o.timeout = timeout;
    o
}

#[tokio::test]
async fn connects_and_sets_nodelay() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let c = connect(&[addr], &ConnectOptions::default()).await.unwrap();
    assert_eq!(c.addr, addr);
    assert!(c.stream.nodelay().unwrap());
    assert_eq!(c.stream.peer_addr().unwrap(), addr);
}

#[tokio::test]
async fn refused_maps_to_refused() {
    let addr = closed_port().await;
    let err = connect(&[addr], &ConnectOptions::default()).await.unwrap_err();
    assert!(matches!(err, ConnectError::Refused(a) if a == addr), "{err:?}");
    assert_eq!(err.reason_code(), "connect-refused");
}

#[tokio::test]
async fn no_addresses_is_an_error() {
    let err = connect(&[], &ConnectOptions::default()).await.unwrap_err();
    assert!(matches!(err, ConnectError::NoAddresses), "{err:?}");
    assert_eq!(err.reason_code(), "connect-no-addresses");
}

#[tokio::test(start_paused = true)]
async fn black_hole_maps_to_timeout() {
    tokio::time::resume();
    let hole = black_hole().await;
    tokio::time::pause();
    let err = connect(&[hole.addr], &opts(Duration::from_secs(10))).await.unwrap_err();
    assert!(
        matches!(err, ConnectError::Timeout(d) if d == Duration::from_secs(10)),
        "{err:?}"
    );
    assert_eq!(err.reason_code(), "connect-timeout");
    // The same with bytes to send: the send finds the socket connecting.
    let err = connect_sending(&[hole.addr], &opts(Duration::from_secs(10)), b"hello")
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConnectError::Timeout(d) if d == Duration::from_secs(10)),
        "{err:?}"
    );
}

#[tokio::test]
async fn falls_back_from_refused_to_working() {
    let good = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let good_addr = good.local_addr().unwrap();
    let bad1 = closed_port().await;
    let bad2 = closed_port().await;
    let c = connect(&[bad1, bad2, good_addr], &ConnectOptions::default())
        .await
        .unwrap();
    assert_eq!(c.addr, good_addr);
}

#[tokio::test]
async fn falls_back_from_black_hole_after_the_stagger() {
    // The first address never answers; after the 250 ms stagger the next
    // attempt starts and wins while the first is still pending.
    let hole = black_hole().await;
    let good = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let good_addr = good.local_addr().unwrap();
    let c = connect(&[hole.addr, good_addr], &opts(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(c.addr, good_addr);
}

#[tokio::test]
async fn ipv6_first_then_ipv4_fallback() {
    // Family interleaving: a dead IPv6 loopback port first, then IPv4.
    let good = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = good.local_addr().unwrap().port();
    let ips = ["::1".parse().unwrap(), "127.0.0.1".parse().unwrap()];
    // If IPv6 loopback is missing here the v6 attempt fails as unreachable
    // or unavailable instead of refused; either way IPv4 must win.
    let c = connect_ips(&ips, port, &ConnectOptions::default()).await.unwrap();
    assert_eq!(c.addr, SocketAddr::new(ips[1], port));
}

#[tokio::test]
async fn every_address_refusing_reports_refused() {
    let (a, b) = (closed_port().await, closed_port().await);
    let err = connect(&[a, b], &ConnectOptions::default()).await.unwrap_err();
    assert!(matches!(err, ConnectError::Refused(_)), "{err:?}");
}

#[tokio::test]
async fn mark_is_set_on_upstream_sockets() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let mut o = ConnectOptions::default();
    o.mark = Some(0x5c);
    match connect(&[addr], &o).await {
        Ok(c) => assert_eq!(socket2::SockRef::from(&c.stream).mark().unwrap(), 0x5c),
        // SO_MARK needs CAP_NET_ADMIN; without it the attempt fails typed.
        Err(e) => assert!(matches!(e, ConnectError::Io { .. }), "{e:?}"),
    }
    // And on the socket that sends its first bytes with the connect.
    match connect_sending(&[addr], &o, b"x").await {
        Ok((c, _)) => assert_eq!(socket2::SockRef::from(&c.stream).mark().unwrap(), 0x5c),
        Err(e) => assert!(matches!(e, ConnectError::Io { .. }), "{e:?}"),
    }
}

/// Connects with `connect_sending`, writes what it did not send, and
/// returns what the upstream received.
async fn send_through(l: &TcpListener, addrs: &[SocketAddr], first: &[u8]) -> (usize, Vec<u8>) {
    let (c, sent) = connect_sending(addrs, &ConnectOptions::default(), first).await.unwrap();
    assert!(c.stream.nodelay().unwrap());
    assert!(sent <= first.len());
    let mut stream = c.stream;
    stream.write_all(&first[sent..]).await.unwrap();
    stream.shutdown().await.unwrap();
    let (mut up, _) = l.accept().await.unwrap();
    let mut got = Vec::new();
    up.read_to_end(&mut got).await.unwrap();
    (sent, got)
}

#[tokio::test]
async fn connect_sending_delivers_the_first_bytes() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hello: Vec<u8> = (0..1500u32).map(|i| (i % 251) as u8).collect();
    let (_, got) = send_through(&l, &[addr], &hello).await;
    assert_eq!(got, hello);
}

#[tokio::test]
async fn connect_sending_with_nothing_to_send_just_connects() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (sent, got) = send_through(&l, &[addr], b"").await;
    assert_eq!((sent, got.len()), (0, 0));
}

#[tokio::test]
async fn connect_sending_to_several_addresses_leaves_the_bytes_to_the_caller() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let good = l.local_addr().unwrap();
    let bad = closed_port().await;
    let (sent, got) = send_through(&l, &[bad, good], b"after the race").await;
    assert_eq!(sent, 0);
    assert_eq!(got, b"after the race");
}

#[tokio::test]
async fn connect_sending_refused_maps_to_refused() {
    let addr = closed_port().await;
    let err = connect_sending(&[addr], &ConnectOptions::default(), b"hello")
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectError::Refused(a) if a == addr), "{err:?}");
    assert_eq!(err.reason_code(), "connect-refused");
}

#[tokio::test]
async fn connect_sending_waits_for_a_slow_handshake() {
    // The first SYN is dropped (full accept queue), so the send finds the
    // socket still connecting; freeing a slot lets the SYN retransmission
    // (about 1 s later) complete the handshake, and the bytes follow.
    let hole = black_hole().await;
    let addr = hole.addr;
    let racer =
        tokio::spawn(async move { connect_sending(&[addr], &opts(Duration::from_secs(20)), b"late hello").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (filler, _) = hole.listener.accept().await.unwrap();
    drop(filler);
    let (c, sent) = racer.await.unwrap().unwrap();
    assert_eq!(sent, 0, "the handshake cannot have completed inside connect(2)");
    let mut stream = c.stream;
    stream.write_all(b"late hello").await.unwrap();
    stream.shutdown().await.unwrap();
    // Later connections queue behind the fillers; find ours by its port.
    let ours = stream.local_addr().unwrap();
    loop {
        let (mut up, peer) = hole.listener.accept().await.unwrap();
        if peer == ours {
            let mut got = Vec::new();
            up.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"late hello");
            break;
        }
    }
}
