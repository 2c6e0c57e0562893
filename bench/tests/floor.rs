//! bench-floor is only a reference point, but its figures are only worth
//! reading if it really relays: every byte both ways, half-close passed on,
//! a refused upstream closing the client. Real sockets on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test")]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;

struct Floor {
    child: Child,
    addr: SocketAddr,
}

impl Floor {
    fn child_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_floor(upstream: SocketAddr) -> Floor {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bench-floor"))
        .args(["--listen", "127.0.0.1:0", "--upstream", &upstream.to_string()])
        .stdout(Stdio::piped())
        // Its complaints (an accept that failed) reach the test's log.
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start bench-floor");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    Floor { child, addr }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
}

fn client(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// The client sends `up` bytes and half-closes; the origin reads to EOF,
/// then sends `down` bytes and closes. Both sides check every byte.
fn round_trip(floor: &Floor, origin: &TcpListener, up: usize, down: usize, seed: u8) {
    let sent = pattern(up, seed);
    let answer = pattern(down, !seed);
    let origin_side = {
        let origin = origin.try_clone().unwrap();
        let (sent, answer) = (sent.clone(), answer.clone());
        thread::spawn(move || {
            let (mut s, _) = origin.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            assert!(got == sent, "origin got {} bytes, wanted {}", got.len(), sent.len());
            s.write_all(&answer).unwrap();
        })
    };
    let mut c = client(floor.addr);
    c.write_all(&sent).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    origin_side.join().unwrap();
    assert!(got == answer, "client got {} bytes, wanted {}", got.len(), answer.len());
}

#[test]
fn relays_every_byte_both_ways_and_passes_half_close_on() {
    let origin = TcpListener::bind("127.0.0.1:0").unwrap();
    let floor = start_floor(origin.local_addr().unwrap());
    // Small (one segment), then several pipe-fulls each way; sequential
    // flows reuse pooled pipes.
    round_trip(&floor, &origin, 517, 128, 1);
    round_trip(&floor, &origin, 3 << 20, 5 << 20, 2);
    round_trip(&floor, &origin, 1, 1 << 20, 3);
}

#[test]
fn a_refused_upstream_closes_the_client() {
    // A port nobody listens on: bind, read the port, close.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut floor = start_floor(port);
    let mut c = client(floor.addr);
    c.write_all(b"hello").unwrap();
    let mut buf = [0u8; 16];
    // EOF or a reset, but never a hang (the read timeout would fail it).
    match c.read(&mut buf) {
        Ok(n) => assert_eq!(n, 0, "got bytes from nowhere"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    // And it is still running: the failed flow closed only itself.
    let mut again = client(floor.addr);
    again.write_all(b"hello").unwrap();
    assert!(matches!(again.read(&mut buf), Ok(0) | Err(_)));
    assert!(floor.child_alive());
}
