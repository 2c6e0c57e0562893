//! Memory held by idle relayed flows. A separate test binary (its own
//! process) so the RSS reading is not disturbed by the bulk-transfer tests.

// Tests: a failed unwrap/expect is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use sluice::forward::relay::{RelayMode, RelayOptions, relay};
use tokio::net::{TcpListener, TcpStream};

const MODES: [RelayMode; 2] = [RelayMode::Splice, RelayMode::Copy];

fn opts(mode: RelayMode, idle: Option<Duration>) -> RelayOptions {
    let mut o = RelayOptions::default();
    o.mode = mode;
    o.idle_timeout = idle;
    o
}

/// Resident memory of this process in bytes (Linux `/proc/self/statm`).
fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn idle_relayed_flows_hold_no_buffers() {
    // 2,000 relayed flows that moved a few bytes and then went idle. The
    // client and origin ends are plain std sockets (a file descriptor, no
    // user-space state), so the RSS growth is the proxy side: relay task,
    // two registered sockets, idle timer. Reported for docs/performance.md;
    // the assertion only guards against per-flow buffers (64 KiB each).
    const FLOWS: usize = 2_000;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for mode in MODES {
        let front = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let back = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (front_addr, back_addr) = (front.local_addr().unwrap(), back.local_addr().unwrap());
        let mut ends = Vec::with_capacity(FLOWS);
        let mut relays = Vec::with_capacity(FLOWS);
        let before = rss_bytes();
        for _ in 0..FLOWS {
            use std::io::{Read, Write};
            let mut client = std::net::TcpStream::connect(front_addr).unwrap();
            let (proxy_client, _) = front.accept().unwrap();
            let proxy_upstream = std::net::TcpStream::connect(back_addr).unwrap();
            let (mut server, _) = back.accept().unwrap();
            // Non-blocking so waiting for the relayed bytes below yields to
            // the (single-threaded) runtime instead of blocking it.
            server.set_nonblocking(true).unwrap();
            proxy_client.set_nonblocking(true).unwrap();
            proxy_upstream.set_nonblocking(true).unwrap();
            let o = opts(mode, Some(Duration::from_secs(3600)));
            relays.push(rt.spawn(async move {
                let c = TcpStream::from_std(proxy_client).unwrap();
                let u = TcpStream::from_std(proxy_upstream).unwrap();
                relay(c, u, &o).await
            }));
            // One small exchange so each relay has borrowed (and returned)
            // a buffer or pipe at least once.
            client.write_all(b"hi").unwrap();
            rt.block_on(async {
                let mut b = [0u8; 2];
                loop {
                    match server.read(&mut b) {
                        Ok(2) => break,
                        _ => tokio::task::yield_now().await,
                    }
                }
            });
            ends.push((client, server));
        }
        rt.block_on(tokio::task::yield_now());
        let per_flow = rss_bytes().saturating_sub(before) / FLOWS;
        println!("{mode:?}: ~{per_flow} bytes RSS per idle relayed flow (proxy side)");
        assert!(per_flow < 8 * 1024, "{mode:?}: {per_flow} bytes per idle flow");
        drop(ends);
        for r in relays {
            let stats = rt.block_on(r).unwrap();
            assert_eq!(stats.bytes_up, 2);
        }
    }
}

#[tokio::test]
async fn relay_state_is_small() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
    let o = RelayOptions::default();
    let f = relay(a.unwrap(), b.unwrap().0, &o);
    let size = std::mem::size_of_val(&f);
    println!("relay future: {size} bytes");
    // The whole per-flow relay state; an async two-loop version was 2.1 KiB.
    assert!(size <= 1024, "relay future grew to {size} bytes");
}
