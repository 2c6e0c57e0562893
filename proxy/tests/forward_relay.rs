//! Relay behaviour over real loopback sockets, for both movers: byte-exact
//! bulk round trip, half-close passthrough, idle timeout, cancellation and
//! reset attribution.

// Tests: a failed unwrap/expect is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use sluice::forward::relay::{CloseReason, RelayMode, RelayOptions, RelayStats, relay, relay_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const MODES: [RelayMode; 2] = [RelayMode::Splice, RelayMode::Copy];

/// Client and upstream ends of a relayed flow, plus the relay task.
struct Flow {
    client: TcpStream,
    server: TcpStream,
    relay: JoinHandle<RelayStats>,
}

async fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
    let addr = listener.local_addr().unwrap();
    let (connected, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (connected.unwrap(), accepted.unwrap().0)
}

async fn flow(opts: RelayOptions) -> Flow {
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let back = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (client, proxy_client) = pair(&front).await;
    let (proxy_upstream, server) = pair(&back).await;
    let relay = tokio::spawn(async move { relay(proxy_client, proxy_upstream, &opts).await });
    Flow { client, server, relay }
}

fn opts(mode: RelayMode, idle: Option<Duration>) -> RelayOptions {
    let mut o = RelayOptions::default();
    o.mode = mode;
    o.idle_timeout = idle;
    o
}

fn payload(len: usize, seed: u32) -> Vec<u8> {
    // A cheap LCG so a misplaced or repeated chunk cannot compare equal.
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            (x >> 16) as u8
        })
        .collect()
}

#[tokio::test]
async fn bulk_round_trip_is_byte_exact_in_both_modes() {
    for mode in MODES {
        let Flow {
            client,
            mut server,
            relay,
        } = flow(opts(mode, None)).await;
        let up = payload(8 * 1024 * 1024 + 13, 1);
        let down = payload(6 * 1024 * 1024 + 7, 2);

        // Upstream: read everything the client sends, then answer and close.
        let down_for_server = down.clone();
        let server_task = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            server.write_all(&down_for_server).await.unwrap();
            server.shutdown().await.unwrap();
            got
        });

        let (mut rd, mut wr) = client.into_split();
        let up_for_client = up.clone();
        let writer = tokio::spawn(async move {
            wr.write_all(&up_for_client).await.unwrap();
            wr.shutdown().await.unwrap();
            wr
        });
        let mut got_down = Vec::new();
        rd.read_to_end(&mut got_down).await.unwrap();
        let _wr = writer.await.unwrap();

        let got_up = server_task.await.unwrap();
        assert!(got_up == up, "{mode:?}: upstream received different bytes");
        assert!(got_down == down, "{mode:?}: client received different bytes");
        let stats = relay.await.unwrap();
        assert_eq!(stats.bytes_up, up.len() as u64, "{mode:?}");
        assert_eq!(stats.bytes_down, down.len() as u64, "{mode:?}");
        assert_eq!(stats.reason, CloseReason::ClientClosed, "{mode:?}");
        assert_eq!(stats.mode, mode.resolve());
    }
}

#[tokio::test]
async fn concurrent_both_ways_echo_in_both_modes() {
    // Upstream echoes while the client is still writing: both directions
    // are busy at once, and back-pressure must not deadlock.
    for mode in MODES {
        let Flow { client, server, relay } = flow(opts(mode, None)).await;
        let data = payload(4 * 1024 * 1024, 3);
        let echo = tokio::spawn(async move {
            let (mut r, mut w) = server.into_split();
            tokio::io::copy(&mut r, &mut w).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let (mut rd, mut wr) = client.into_split();
        let to_send = data.clone();
        let writer = tokio::spawn(async move {
            wr.write_all(&to_send).await.unwrap();
            wr.shutdown().await.unwrap();
            wr
        });
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.unwrap();
        let _wr = writer.await.unwrap();
        echo.await.unwrap();
        assert!(got == data, "{mode:?}: echo differs");
        let stats = relay.await.unwrap();
        assert_eq!(stats.bytes_up, data.len() as u64);
        assert_eq!(stats.bytes_down, data.len() as u64);
        assert_eq!(stats.reason, CloseReason::ClientClosed);
    }
}

#[tokio::test]
async fn half_close_lets_the_response_through_in_both_modes() {
    for mode in MODES {
        let Flow {
            mut client,
            mut server,
            relay,
        } = flow(opts(mode, None)).await;
        let response = payload(1024 * 1024 + 1, 4);

        client.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        client.shutdown().await.unwrap(); // client is done sending

        // The upstream sees the request and then EOF (the FIN passed on) …
        let mut request = Vec::new();
        server.read_to_end(&mut request).await.unwrap();
        assert_eq!(request, b"GET / HTTP/1.0\r\n\r\n");
        // … and can still answer over the half-open connection.
        server.write_all(&response).await.unwrap();
        server.shutdown().await.unwrap();

        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert!(got == response, "{mode:?}: response differs");

        let stats = relay.await.unwrap();
        assert_eq!(stats.reason, CloseReason::ClientClosed, "{mode:?}");
        assert_eq!(stats.bytes_up, 18);
        assert_eq!(stats.bytes_down, response.len() as u64);
    }
}

#[tokio::test]
async fn upstream_closing_first_is_recorded() {
    for mode in MODES {
        let Flow {
            mut client,
            mut server,
            relay,
        } = flow(opts(mode, None)).await;
        server.write_all(b"bye").await.unwrap();
        server.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"bye");
        client.shutdown().await.unwrap();
        let stats = relay.await.unwrap();
        assert_eq!(stats.reason, CloseReason::UpstreamClosed, "{mode:?}");
        assert_eq!(stats.bytes_down, 3);
        drop(server);
    }
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_closes_with_reason_in_both_modes() {
    for mode in MODES {
        let Flow {
            mut client,
            mut server,
            relay,
        } = flow(opts(mode, Some(Duration::from_secs(30)))).await;
        // Some traffic first: the timer counts from the last byte.
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");

        // Then silence: paused time auto-advances to the idle deadline.
        let stats = relay.await.unwrap();
        assert_eq!(stats.reason, CloseReason::IdleTimeout, "{mode:?}");
        assert_eq!(stats.bytes_up, 4);
        assert_eq!(stats.bytes_down, 0);

        // The relay dropped both sockets: each end sees EOF.
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        server.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }
}

#[tokio::test]
async fn cancel_ends_the_relay() {
    for mode in MODES {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let back = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut client, proxy_client) = pair(&front).await;
        let (proxy_upstream, _server) = pair(&back).await;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let o = opts(mode, None);
        let relay = tokio::spawn(async move {
            relay_until(proxy_client, proxy_upstream, &o, async {
                let _ = stopped.await;
            })
            .await
        });
        stop.send(()).unwrap();
        let stats = relay.await.unwrap();
        assert_eq!(stats.reason, CloseReason::Cancelled, "{mode:?}");
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
    }
}

#[tokio::test]
async fn upstream_reset_is_attributed_to_the_upstream() {
    for mode in MODES {
        let Flow { client, server, relay } = flow(opts(mode, None)).await;
        // SO_LINGER 0 makes close() send RST instead of FIN.
        let server = server.into_std().unwrap();
        socket2::SockRef::from(&server)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(server);
        let stats = relay.await.unwrap();
        assert_eq!(stats.reason, CloseReason::UpstreamReset, "{mode:?}");
        assert!(stats.error.is_some());
        drop(client);
    }
}

#[tokio::test]
async fn client_reset_is_attributed_to_the_client() {
    for mode in MODES {
        let Flow { client, server, relay } = flow(opts(mode, None)).await;
        let client = client.into_std().unwrap();
        socket2::SockRef::from(&client)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(client);
        let stats = relay.await.unwrap();
        assert_eq!(stats.reason, CloseReason::ClientReset, "{mode:?}");
        drop(server);
    }
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_applies_to_a_half_closed_flow() {
    for mode in MODES {
        let Flow {
            mut client,
            mut server,
            relay,
        } = flow(opts(mode, Some(Duration::from_secs(60)))).await;
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap(); // the FIN arrived
        // The upstream never answers nor closes: idle timeout ends it.
        let stats = relay.await.unwrap();
        assert_eq!(stats.reason, CloseReason::IdleTimeout, "{mode:?}");
        drop((client, server));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_flows_on_a_multi_thread_runtime() {
    // Pipes and buffers come from per-thread pools and may be returned on
    // another worker: run several flows at once across workers.
    let mut tasks = Vec::new();
    for i in 0..16u32 {
        let mode = MODES[i as usize % 2];
        tasks.push(tokio::spawn(async move {
            let Flow { client, server, relay } = flow(opts(mode, None)).await;
            let data = payload(512 * 1024 + i as usize, i);
            let echo = tokio::spawn(async move {
                let (mut r, mut w) = server.into_split();
                tokio::io::copy(&mut r, &mut w).await.unwrap();
                w.shutdown().await.unwrap();
            });
            let (mut rd, mut wr) = client.into_split();
            let to_send = data.clone();
            let writer = tokio::spawn(async move {
                wr.write_all(&to_send).await.unwrap();
                wr.shutdown().await.unwrap();
                wr
            });
            let mut got = Vec::new();
            rd.read_to_end(&mut got).await.unwrap();
            let _wr = writer.await.unwrap();
            echo.await.unwrap();
            assert!(got == data, "flow {i} ({mode:?}) differs");
            let stats = relay.await.unwrap();
            assert_eq!(stats.bytes_down, data.len() as u64);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// A splice-mode direction starts on the copy path and switches to splice
/// at its first large read: small and large messages alternating on one
/// flow must still arrive whole and in order, both ways.
#[tokio::test]
async fn small_then_large_then_small_messages_keep_their_order() {
    for mode in MODES {
        let Flow {
            mut client,
            mut server,
            relay,
        } = flow(opts(mode, None)).await;
        let sizes = [100usize, 517, 3 * 1024 * 1024 + 5, 128, 64 * 1024, 1, 900 * 1024, 7];
        let echo = tokio::spawn(async move {
            // Upstream: echo each message back, then close after EOF.
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = server.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                server.write_all(&buf[..n]).await.unwrap();
            }
            server.shutdown().await.unwrap();
        });
        for (i, len) in sizes.iter().enumerate() {
            let msg = payload(*len, 100 + i as u32);
            let (mut rd, mut wr) = client.split();
            let send = async {
                wr.write_all(&msg).await.unwrap();
            };
            let recv = async {
                let mut got = vec![0u8; msg.len()];
                rd.read_exact(&mut got).await.unwrap();
                got
            };
            let ((), got) = tokio::join!(send, recv);
            assert!(got == msg, "{mode:?}: message {i} ({len} bytes) came back different");
        }
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "{mode:?}: bytes after the last echo");
        echo.await.unwrap();
        let stats = relay.await.unwrap();
        let total: u64 = sizes.iter().map(|s| *s as u64).sum();
        assert_eq!(stats.bytes_up, total, "{mode:?}");
        assert_eq!(stats.bytes_down, total, "{mode:?}");
        assert_eq!(stats.reason, CloseReason::ClientClosed, "{mode:?}");
    }
}

/// A client that stops reading while the upstream trickles small writes:
/// the relay blocks on the full client socket with bytes owed (and, on the
/// copy path, compacts what it holds), then delivers everything in order
/// once the client reads again.
#[tokio::test]
async fn a_stalled_reader_gets_every_byte_once_it_reads_again() {
    for mode in MODES {
        let Flow {
            mut client,
            mut server,
            relay,
        } = flow(opts(mode, None)).await;
        let data = payload(6 * 1024 * 1024 + 3, 77);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            // Small writes, so the relay mostly reads small amounts.
            for chunk in sent.chunks(1000) {
                server.write_all(chunk).await.unwrap();
            }
            server.shutdown().await.unwrap();
            server
        });
        // Let the client's receive buffer and the relay fill up.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut got = Vec::with_capacity(data.len());
        client.read_to_end(&mut got).await.unwrap();
        let _server = writer.await.unwrap();
        assert!(got == data, "{mode:?}: the stalled reader got different bytes");
        client.shutdown().await.unwrap();
        let stats = relay.await.unwrap();
        assert_eq!(stats.bytes_down, data.len() as u64, "{mode:?}");
    }
}
