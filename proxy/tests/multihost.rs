//! Several hosts made of network namespaces joined by veth pairs, and real
//! flows through the built `sluice` and `sluice-xds` binaries between them:
//!
//! ```text
//!   w1 (agents)   10.77.1.2 ─┐                       ┌─ 10.77.9.2  inet: TLS origin (allowed.test,
//!                            ├─ gw: sluice gateway ──┤             denied.test) + DNS server
//!   w2 (servers)  10.77.2.2 ─┘   10.77.{1,2,8,9}.1   └─ 10.77.9.3  inet: an attacker's server
//!                                       │
//!                          ctl: sluice-xds 10.77.8.2
//! ```
//!
//! The workloads' default route is the gateway. There, iptables `REDIRECT`s
//! workload TCP 443 to Sluice's `transparent` listener, TCP 7000–7001 to
//! its `tcp` listener (east-west, to the original destination) and UDP and
//! TCP 53 to its `dns` listener; nothing else is forwarded. The gateway
//! takes its listeners, groups and policy from `sluice-xds` over xDS
//! (`xds.listeners: true`); the control server watches its directory, and
//! the test edits it to revoke a live flow.
//!
//! The servers (origin, attacker, DNS, east-west echo) and the clients run
//! in this process on sockets made inside the hosts' namespaces (a thread
//! enters one with `setns` just to make a socket). Only the namespaces the
//! test made see any packet; they are deleted, and the processes killed by
//! PID, when the test ends, passed or not.
//!
//! Needs root (network namespaces, iptables) and fails saying so when it
//! cannot make them; `SLUICE_SKIP_NETNS=1` skips it explicitly, except
//! under `CI=true`.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

#[path = "../../conformance/src/inner_cargo.rs"]
mod inner_cargo;

#[path = "common/bb_support.rs"]
#[allow(dead_code, reason = "the shared black-box harness; this file uses part of it")]
mod bb_support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bb_support::{Pki, Proc, SLUICE, Sluice, TempDir, audit_records, one_record};
use hickory_proto::op::{Message, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long any one wait may take.
const WAIT: Duration = Duration::from_secs(15);

const W1: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 2);
const W2: Ipv4Addr = Ipv4Addr::new(10, 77, 2, 2);
const CTL: Ipv4Addr = Ipv4Addr::new(10, 77, 8, 2);
const GW_INET: Ipv4Addr = Ipv4Addr::new(10, 77, 9, 1);
/// The TLS origin and DNS server: what the names resolve to.
const ORIGIN: Ipv4Addr = Ipv4Addr::new(10, 77, 9, 2);
/// An attacker's server: an allowed SNI sent here must never arrive.
const ATTACKER: Ipv4Addr = Ipv4Addr::new(10, 77, 9, 3);

/// The gateway's listeners (served by `sluice-xds`); each namespace has its
/// own ports, so fixed numbers cannot clash with anything.
const TRANSPARENT_PORT: u16 = 15001;
const EAST_WEST_PORT: u16 = 15002;
const DNS_PORT: u16 = 15053;
/// The east-west service port `agents` may reach on `servers`…
const SERVICE_PORT: u16 = 7000;
/// …and one they may not.
const OTHER_PORT: u16 = 7001;

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

// ------------------------------------------------------------------ hosts

/// Whether the test may run: `false` (with a loud notice) when skipped
/// explicitly outside CI; a missing tool fails it with how to fix that.
fn namespaces_wanted() -> bool {
    let ci = std::env::var("CI").as_deref() == Ok("true");
    if std::env::var_os("SLUICE_SKIP_NETNS").is_some() {
        assert!(
            !ci,
            "SLUICE_SKIP_NETNS is set but CI=true: the multi-host test must run in CI"
        );
        eprintln!("SKIPPED explicitly (SLUICE_SKIP_NETNS): multi-host namespace test not run");
        return false;
    }
    for tool in ["ip", "iptables"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "cannot run the multi-host test: `{tool}` is missing (apt-get install -y iproute2 iptables; scripts/test does it as root)"
        );
    }
    true
}

/// Runs `prog args`, failing the test with its stderr when it fails.
fn run(what: &str, prog: &str, args: &[&str]) {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot {what}: cannot run `{prog}`: {e}"));
    assert!(
        out.status.success(),
        "cannot {what}: `{prog} {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// One host: a network namespace, deleted when dropped.
struct Netns(String);

impl Netns {
    fn add(host: &str) -> Self {
        let name = format!("sluice-mh-{}-{host}", std::process::id());
        // A namespace left by an earlier run whose PID we reuse.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .unwrap_or_else(|e| {
                panic!("network namespaces could not be created: cannot run `ip`: {e} (apt-get install -y iproute2)")
            });
        assert!(
            out.status.success(),
            "network namespaces could not be created: `ip netns add {name}` failed ({}): {}\n\
             The multi-host test builds its hosts from network namespaces and needs root \
             (CAP_SYS_ADMIN and CAP_NET_ADMIN). Run it as root, or set SLUICE_SKIP_NETNS=1 \
             to skip it explicitly (not allowed under CI=true).",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let ns = Self(name);
        ns.sh("ip link set lo up");
        ns
    }

    /// `sh -c cmd` inside the namespace.
    fn sh(&self, cmd: &str) {
        run(
            &format!("set up host {}", self.0),
            "ip",
            &["netns", "exec", &self.0, "sh", "-c", cmd],
        );
    }

    /// `prog` to be run inside the namespace (`ip netns exec` execs it, so
    /// the child's PID is the program's own).
    fn exec(&self, prog: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).arg(prog);
        c
    }

    /// Runs `f` on a thread inside the namespace: sockets it makes belong
    /// to the namespace wherever they are used afterwards.
    fn with<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.0);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                enter(&file).unwrap_or_else(|e| panic!("setns({path}): {e}"));
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Moves the calling thread into the network namespace `ns`.
#[allow(unsafe_code, reason = "setns(2) has no safe wrapper among this crate's dependencies")]
fn enter(ns: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: setns only reads its two integer arguments; the descriptor is
    // open for the whole call (borrowed from `ns`). It changes the network
    // namespace of the calling thread alone, a thread made for this that
    // ends when its closure returns.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The five hosts, cabled and routed. Dropping it deletes them, and with
/// them their veths and iptables rules.
struct Hosts {
    gw: Netns,
    w1: Netns,
    w2: Netns,
    inet: Netns,
    ctl: Netns,
}

/// A veth pair from the gateway (`gw_if`, `gw_addr`) to `host` (`eth0`,
/// `host_addr`). Both ends are made inside namespaces of the test, so no
/// name ever appears in the machine's own namespace.
fn cable(gw: &Netns, gw_if: &str, gw_addr: &str, host: &Netns, host_addr: &str) {
    gw.sh(&format!(
        "ip link add {gw_if} type veth peer name eth0 netns {} && ip addr add {gw_addr} dev {gw_if} && ip link set {gw_if} up",
        host.0
    ));
    host.sh(&format!("ip addr add {host_addr} dev eth0 && ip link set eth0 up"));
}

fn build_hosts() -> Hosts {
    let h = Hosts {
        gw: Netns::add("gw"),
        w1: Netns::add("w1"),
        w2: Netns::add("w2"),
        inet: Netns::add("inet"),
        ctl: Netns::add("ctl"),
    };
    cable(&h.gw, "to-w1", "10.77.1.1/24", &h.w1, "10.77.1.2/24");
    cable(&h.gw, "to-w2", "10.77.2.1/24", &h.w2, "10.77.2.2/24");
    cable(&h.gw, "to-inet", "10.77.9.1/24", &h.inet, "10.77.9.2/24");
    cable(&h.gw, "to-ctl", "10.77.8.1/24", &h.ctl, "10.77.8.2/24");
    h.w1.sh("ip route add default via 10.77.1.1");
    h.w2.sh("ip route add default via 10.77.2.1");
    h.inet.sh(&format!(
        "ip addr add {ATTACKER}/24 dev eth0 && ip route add default via 10.77.9.1"
    ));
    // A router that forwards nothing on its own: every workload flow the
    // test makes is redirected to Sluice, and anything else is dropped, so
    // no byte can reach another host around the proxy.
    h.gw.sh("echo 1 > /proc/sys/net/ipv4/ip_forward && iptables -P FORWARD DROP");
    for iface in ["to-w1", "to-w2"] {
        h.gw.sh(&format!(
            "iptables -t nat -A PREROUTING -i {iface} -p tcp --dport 443 -j REDIRECT --to-ports {TRANSPARENT_PORT} && \
             iptables -t nat -A PREROUTING -i {iface} -p tcp -m multiport --dports {SERVICE_PORT},{OTHER_PORT} -j REDIRECT --to-ports {EAST_WEST_PORT} && \
             iptables -t nat -A PREROUTING -i {iface} -p udp --dport 53 -j REDIRECT --to-ports {DNS_PORT} && \
             iptables -t nat -A PREROUTING -i {iface} -p tcp --dport 53 -j REDIRECT --to-ports {DNS_PORT}"
        ));
    }
    h
}

// ---------------------------------------------------------------- servers

/// What a server saw, one line per event, in order.
#[derive(Clone, Default)]
struct Events(Arc<Mutex<Vec<String>>>);

impl Events {
    fn push(&self, e: String) {
        self.0.lock().unwrap().push(e);
    }

    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    fn count(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.0.lock().unwrap().iter().filter(|e| pred(e)).count()
    }

    /// Waits (bounded) for an event `pred` holds for: the server notes an
    /// event a moment after the client saw its effect.
    fn wait_for(&self, pred: impl Fn(&str) -> bool) -> bool {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if self.count(&pred) > 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

fn tcp_listener(rt: &tokio::runtime::Runtime, ns: &Netns, addr: SocketAddr) -> tokio::net::TcpListener {
    let l = ns
        .with(|| std::net::TcpListener::bind(addr))
        .unwrap_or_else(|e| panic!("bind {addr} in {}: {e}", ns.0));
    l.set_nonblocking(true).unwrap();
    let _g = rt.enter();
    tokio::net::TcpListener::from_std(l).unwrap()
}

/// Echoes until the peer closes.
async fn echo_back<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() || s.flush().await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A TLS echo server: `accept PEER` per connection, `tls SNI PEER` per
/// completed handshake.
fn tls_server(rt: &tokio::runtime::Runtime, ns: &Netns, addr: SocketAddr, pki: &Pki) -> Events {
    let l = tcp_listener(rt, ns, addr);
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server.clone());
    let events = Events::default();
    let seen = events.clone();
    rt.spawn(async move {
        loop {
            let Ok((s, peer)) = l.accept().await else { continue };
            seen.push(format!("accept {peer}"));
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                if let Ok(t) = acceptor.accept(s).await {
                    let sni = t.get_ref().1.server_name().unwrap_or("-").to_owned();
                    seen.push(format!("tls {sni} {peer}"));
                    echo_back(t).await;
                }
            });
        }
    });
    events
}

/// A plain TCP echo server: `accept PEER` per connection.
fn tcp_server(rt: &tokio::runtime::Runtime, ns: &Netns, addr: SocketAddr) -> Events {
    let l = tcp_listener(rt, ns, addr);
    let events = Events::default();
    let seen = events.clone();
    rt.spawn(async move {
        loop {
            let Ok((s, peer)) = l.accept().await else { continue };
            seen.push(format!("accept {peer}"));
            tokio::spawn(echo_back(s));
        }
    });
    events
}

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

/// The "internet's" DNS: allowed.test and denied.test have the origin's
/// address; other types under test. have no data; anything else does not
/// exist.
fn dns_answer(q: &Message) -> Message {
    let query = q.queries[0].clone();
    let qname = query.name().to_ascii().to_ascii_lowercase();
    let mut m = Message::response(q.metadata.id, OpCode::Query);
    m.metadata.recursion_desired = q.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.authoritative = true;
    m.add_query(query.clone());
    let soa = Record::from_rdata(
        name("test."),
        60,
        RData::SOA(SOA::new(
            name("ns.test."),
            name("hostmaster.test."),
            1,
            3600,
            600,
            86_400,
            60,
        )),
    );
    match (qname.as_str(), query.query_type()) {
        ("allowed.test." | "denied.test.", RecordType::A) => {
            m.add_answer(Record::from_rdata(name(&qname), 60, RData::A(A(ORIGIN))));
        }
        (n, _) if n.ends_with(".test.") => {
            m.add_authority(soa);
        }
        _ => {
            m.metadata.response_code = ResponseCode::NXDomain;
            m.add_authority(soa);
        }
    }
    m
}

/// A DNS server over UDP: `QNAME QTYPE PEER` per query.
fn dns_server(rt: &tokio::runtime::Runtime, ns: &Netns, addr: SocketAddr) -> Events {
    let u = ns
        .with(|| UdpSocket::bind(addr))
        .unwrap_or_else(|e| panic!("bind udp {addr} in {}: {e}", ns.0));
    u.set_nonblocking(true).unwrap();
    let u = {
        let _g = rt.enter();
        tokio::net::UdpSocket::from_std(u).unwrap()
    };
    let events = Events::default();
    let seen = events.clone();
    rt.spawn(async move {
        let mut buf = vec![0u8; 65_535];
        loop {
            let Ok((n, peer)) = u.recv_from(&mut buf).await else {
                continue;
            };
            let Ok(q) = Message::from_vec(&buf[..n]) else { continue };
            let Some(query) = q.queries.first() else { continue };
            seen.push(format!(
                "{} {} {peer}",
                query.name().to_ascii().to_ascii_lowercase(),
                query.query_type()
            ));
            let _ = u.send_to(&dns_answer(&q).to_vec().unwrap(), peer).await;
        }
    });
    events
}

// ---------------------------------------------------------------- clients

/// A TCP connection from a host; reads and writes give up after [`WAIT`].
fn tcp_from(ns: &Netns, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let s = ns.with(|| TcpStream::connect_timeout(&dst, WAIT))?;
    s.set_read_timeout(Some(WAIT))?;
    s.set_write_timeout(Some(WAIT))?;
    Ok(s)
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS session from a host to `dst` with `sni` (verified against the
/// test CA): `Err` says why there is none.
fn tls_from(ns: &Netns, dst: SocketAddr, sni: &str, pki: &Pki) -> Result<Tls, String> {
    let tcp = tcp_from(ns, dst).map_err(|e| format!("connect {dst}: {e}"))?;
    let server_name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    let conn = rustls::ClientConnection::new(pki.client.clone(), server_name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
            assert!(
                !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
                "TLS to {dst} (SNI {sni}) was neither completed nor refused within {WAIT:?}"
            );
            return Err(format!("handshake: {e}"));
        }
    }
    Ok(tls)
}

/// Sends `msg` and reads the same bytes back.
fn echo(s: &mut (impl Read + Write), msg: &[u8]) -> std::io::Result<()> {
    s.write_all(msg)?;
    s.flush()?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    assert_eq!(back, msg, "the echo came back changed");
    Ok(())
}

/// Whether the peer closed (end of file or reset) within [`WAIT`]; data
/// is a failure, since none of the test's servers speaks first.
fn closed_within_wait(s: &mut impl Read) -> Result<(), String> {
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => Ok(()),
        Ok(_) => Err("data arrived on a connection that should be closed".to_owned()),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            Err(format!("still open after {WAIT:?}"))
        }
        Err(_) => Ok(()),
    }
}

/// An A query for `qname`, from a host, to `server` over UDP: the answer,
/// which must come from the address asked (whatever answered it).
fn ask_udp(ns: &Netns, server: SocketAddr, qname: &str, id: u16) -> Message {
    let u = ns.with(|| UdpSocket::bind("0.0.0.0:0")).unwrap();
    u.set_read_timeout(Some(WAIT)).unwrap();
    let mut q = Message::query();
    q.metadata.id = id;
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(name(qname), RecordType::A));
    u.send_to(&q.to_vec().unwrap(), server).unwrap();
    let mut buf = [0u8; 4096];
    let (n, from) = u
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("no DNS answer for {qname} over UDP within {WAIT:?}: {e}"));
    assert_eq!(from, server, "the answer for {qname} came from another address");
    let m = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(m.metadata.id, id);
    m
}

/// The same over TCP (two-byte length prefix).
fn ask_tcp(ns: &Netns, server: SocketAddr, qname: &str, id: u16) -> Message {
    let mut s = tcp_from(ns, server).unwrap_or_else(|e| panic!("DNS over TCP to {server}: {e}"));
    let mut q = Message::query();
    q.metadata.id = id;
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(name(qname), RecordType::A));
    let wire = q.to_vec().unwrap();
    let mut framed = u16::try_from(wire.len()).unwrap().to_be_bytes().to_vec();
    framed.extend_from_slice(&wire);
    s.write_all(&framed).unwrap();
    let mut len = [0u8; 2];
    s.read_exact(&mut len)
        .unwrap_or_else(|e| panic!("no DNS answer for {qname} over TCP within {WAIT:?}: {e}"));
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut body).unwrap();
    let m = Message::from_vec(&body).unwrap();
    assert_eq!(m.metadata.id, id);
    m
}

fn a_records(m: &Message) -> Vec<Ipv4Addr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

/// `GET path` on an admin API listening inside a namespace: status and body.
fn admin_get(ns: &Netns, addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = tcp_from(ns, addr).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            if n == 0 || tail.len() < n {
                break;
            }
            out.push_str(&tail[..n]);
            rest = tail[n..].strip_prefix("\r\n").unwrap_or(&tail[n..]);
        }
        out
    } else {
        body.to_owned()
    };
    Some((status, body))
}

// ---------------------------------------------------------------- the control plane

/// `sluice-xds`, built by cargo into this test's profile directory: an
/// integration test gets `CARGO_BIN_EXE_*` for its own package's binaries
/// only, so it asks cargo, as the conformance runner does (cargo has
/// released its build lock by the time tests run; under `cargo test
/// --workspace` the binary is already built and this is a no-op).
fn sluice_xds_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/multihost-… → target/<profile>
    let profile = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(workspace).args(["build", "--quiet"]);
    match profile.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some(p) => {
            cmd.args(["--profile", p]);
        }
    }
    cmd.args(["-p", "sluice-xds", "--bin", "sluice-xds"]);
    inner_cargo::without_test_env(&mut cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo} to build sluice-xds: {e}"));
    assert!(
        out.status.success(),
        "building sluice-xds failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = profile.join("sluice-xds");
    assert!(
        bin.is_file(),
        "cargo built sluice-xds but {} is not there",
        bin.display()
    );
    bin
}

const GROUPS_YAML: &str = "\
webgroups:
  - {name: allowed-sites, domains: [allowed.test]}
smartgroups:
  - {name: agents, cidrs: [10.77.1.0/24]}
  - {name: servers, cidrs: [10.77.2.0/24]}
";

fn listeners_yaml() -> String {
    format!(
        "\
listeners:
  - {{name: egress-tls, kind: transparent, address: \"0.0.0.0:{TRANSPARENT_PORT}\", sni_check: verify}}
  - {{name: east-west, kind: tcp, address: \"0.0.0.0:{EAST_WEST_PORT}\"}}
  - {{name: dns, kind: dns, address: \"0.0.0.0:{DNS_PORT}\", upstreams: [\"{ORIGIN}:53\"], deny_answer: nxdomain}}
"
    )
}

/// The policy: `agents` may reach allowed.test over TLS (and so resolve
/// it), and `servers` on the service port; `servers` may not reach
/// `agents` at all. `sites_rule` is the first rule.
fn policy_yaml(sites_rule: &str) -> String {
    format!(
        "\
policy:
  mode: enforce
  default: deny
  rules:
    - {sites_rule}
    - {{name: agents-to-servers, from: [agents], to: {{smartgroups: [servers]}}, protocols: [tcp], ports: [{SERVICE_PORT}], action: allow}}
    - {{name: servers-not-to-agents, from: [servers], to: {{smartgroups: [agents]}}, action: deny}}
"
    )
}

const SITES_ALLOWED: &str = "{name: agents-to-sites, from: [agents], to: {webgroups: [allowed-sites]}, protocols: [tls], ports: [443], action: allow}";
const SITES_REVOKED: &str = "{name: sites-revoked, from: [agents], to: {webgroups: [allowed-sites]}, action: deny}";

/// Replaces a file of the served directory in one step, as an operator's
/// deploy would (the temporary name is not a `.yaml`, so never read).
fn replace(dir: &Path, file: &str, text: &str) {
    let tmp = dir.join(format!("{file}.new"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(file)).unwrap();
}

/// The gateway's policy rule names and listener names, read from its
/// admin API.
fn gateway_state(gw: &Netns, admin: SocketAddr) -> (Vec<String>, Vec<String>) {
    let rules = admin_get(gw, admin, "/config_dump")
        .and_then(|(_, b)| serde_json::from_str::<Value>(&b).ok())
        .map(|v| {
            v["policy"]["rules"]
                .as_array()
                .map(|rs| {
                    rs.iter()
                        .filter_map(|r| r["name"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        })
        .unwrap_or_default();
    let mut listeners: Vec<String> = admin_get(gw, admin, "/listeners")
        .and_then(|(_, b)| serde_json::from_str::<Value>(&b).ok())
        .map(|v| {
            v["listeners"]
                .as_array()
                .map(|ls| {
                    ls.iter()
                        .filter_map(|l| l["name"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        })
        .unwrap_or_default();
    listeners.sort();
    (rules, listeners)
}

fn s<'a>(r: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(r, |v, k| v.get(k)).and_then(Value::as_str)
}

fn groups(r: &Value, field: &str) -> Vec<String> {
    r[field]
        .as_array()
        .map(|a| a.iter().filter_map(|g| g.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

fn step(what: &str) {
    eprintln!("multihost: {what}");
}

// ---------------------------------------------------------------- the test

#[test]
fn flows_between_hosts_through_a_gateway_driven_by_sluice_xds() {
    if !namespaces_wanted() {
        return;
    }
    let started = Instant::now();
    // Declared in this order so they are dropped in the reverse one: the
    // processes are killed, then the servers' sockets closed, then the
    // namespaces deleted, also when an assertion fails. The hosts come
    // first so that a machine that cannot make them says so at once.
    let hosts = build_hosts();
    let xds_bin = sluice_xds_binary();
    step(&format!(
        "hosts made and sluice-xds built after {:?}",
        started.elapsed()
    ));
    let dir = TempDir::new("multihost");
    let pki = Pki::new(&dir, &["allowed.test", "denied.test"]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();

    // The internet: the origin and the DNS server on ORIGIN, an attacker
    // beside it. The workloads: an echo service each.
    let origin = tls_server(&rt, &hosts.inet, sock(ORIGIN, 443), &pki);
    let attacker = tcp_server(&rt, &hosts.inet, sock(ATTACKER, 443));
    let dns = dns_server(&rt, &hosts.inet, sock(ORIGIN, 53));
    let w2_service = tcp_server(&rt, &hosts.w2, sock(W2, SERVICE_PORT));
    let w2_other = tcp_server(&rt, &hosts.w2, sock(W2, OTHER_PORT));
    let w1_service = tcp_server(&rt, &hosts.w1, sock(W1, SERVICE_PORT));

    // The control plane, on its own host.
    let served = dir.join("control");
    std::fs::create_dir(&served).unwrap();
    std::fs::write(served.join("groups.yaml"), GROUPS_YAML).unwrap();
    std::fs::write(served.join("listeners.yaml"), listeners_yaml()).unwrap();
    std::fs::write(served.join("policy.yaml"), policy_yaml(SITES_ALLOWED)).unwrap();
    let mut cmd = hosts.ctl.exec(&xds_bin);
    cmd.arg("serve")
        .arg("--config-dir")
        .arg(&served)
        .args(["--listen", &format!("{CTL}:0"), "--admin", "127.0.0.1:0"])
        .args(["--watch-interval", "200ms"])
        .env("RUST_LOG", "info");
    let xds = Proc::spawn("sluice-xds", cmd);
    let Some(line) = xds.stderr.wait_for(WAIT, |l| l.contains(" over ADS on ")) else {
        panic!("sluice-xds did not start serving within {WAIT:?}:\n{}", xds.output());
    };
    let ads: SocketAddr = line.rsplit(" on ").next().unwrap().trim().parse().unwrap();
    assert_eq!(ads.ip(), std::net::IpAddr::V4(CTL), "{line}");

    // The gateway: only process settings and its xDS bootstrap in its file;
    // listeners, groups and policy come from sluice-xds.
    let audit = dir.join("audit.jsonl");
    let gw_config = dir.write(
        "gateway.yaml",
        &format!(
            "\
admin: {{address: \"127.0.0.1:0\"}}
audit: {{destination: \"{audit}\"}}
runtime: {{workers: 1}}
resolver: {{nameservers: [\"{ORIGIN}:53\"]}}
gateway: {{addresses: [10.77.1.1, 10.77.2.1, 10.77.8.1, {GW_INET}]}}
listeners:
  - {{name: bootstrap, kind: http-proxy, address: \"127.0.0.1:0\"}}
policy: {{default: deny}}
xds:
  servers: [\"{ads}\"]
  node: {{id: gw-multihost, cluster: multihost}}
  protocol: delta
  listeners: true
",
            audit = audit.display()
        ),
    );
    let mut cmd = hosts.gw.exec(Path::new(SLUICE));
    cmd.arg("run").arg("-c").arg(&gw_config);
    let gateway = Sluice::start(cmd);
    let admin = gateway.admin;
    let diagnose = || {
        format!(
            "gateway /xds: {:?}\n{}\n{}",
            admin_get(&hosts.gw, admin, "/xds").map(|(_, b)| b),
            gateway.proc.output(),
            xds.output()
        )
    };
    let served_listeners = ["dns", "east-west", "egress-tls"];
    let deadline = Instant::now() + WAIT;
    loop {
        let (rules, listeners) = gateway_state(&hosts.gw, admin);
        if rules == ["agents-to-sites", "agents-to-servers", "servers-not-to-agents"] && listeners == served_listeners {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway did not take its policy and listeners from sluice-xds within {WAIT:?}: rules {rules:?}, listeners {listeners:?}\n{}",
            diagnose()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    step(&format!(
        "hosts, sluice-xds and the gateway up after {:?}",
        started.elapsed()
    ));

    let https = |ip: Ipv4Addr| sock(ip, 443);
    let resolver = sock(ORIGIN, 53);

    // 1. An allowed SNI sent to the attacker's address before w1 resolved
    //    anything: no DNS answer binds the name, so Sluice dials what
    //    allowed.test resolves to, not the address the client chose.
    step("allowed SNI to the attacker's address, no DNS answer yet");
    let mut t = tls_from(&hosts.w1, https(ATTACKER), "allowed.test", &pki)
        .unwrap_or_else(|e| panic!("allowed.test via {ATTACKER} without a binding: {e}\n{}", diagnose()));
    echo(&mut t, b"rerouted to the real origin").unwrap();
    drop(t);
    assert!(
        origin.wait_for(|e| e.starts_with(&format!("tls allowed.test {GW_INET}:"))),
        "the origin never saw allowed.test from the gateway: {:?}",
        origin.all()
    );

    // 2. DNS through the gateway: the workload asks the internet's server,
    //    the gateway answers. allowed.test resolves; denied.test does not,
    //    over UDP and over TCP, and is never asked upstream.
    step("DNS: allowed.test answered, denied.test denied");
    let ok = ask_udp(&hosts.w1, resolver, "allowed.test.", 0x1001);
    assert_eq!(ok.metadata.response_code, ResponseCode::NoError, "{ok:?}");
    assert_eq!(a_records(&ok), [ORIGIN], "{ok:?}");
    let no = ask_udp(&hosts.w1, resolver, "denied.test.", 0x1002);
    assert_eq!(no.metadata.response_code, ResponseCode::NXDomain, "{no:?}");
    assert!(a_records(&no).is_empty(), "{no:?}");
    let no_tcp = ask_tcp(&hosts.w1, resolver, "denied.test.", 0x1003);
    assert_eq!(no_tcp.metadata.response_code, ResponseCode::NXDomain, "{no_tcp:?}");

    // 3. Allowed by SNI, to the address the DNS answer gave: the handshake
    //    completes with the origin and bytes echo. A second such flow stays
    //    open for step 7.
    step("allowed SNI to its resolved address");
    let mut t = tls_from(&hosts.w1, https(ORIGIN), "allowed.test", &pki)
        .unwrap_or_else(|e| panic!("allowed.test: {e}\n{}", diagnose()));
    echo(&mut t, b"hello allowed.test").unwrap();
    drop(t);
    let mut live_tls = tls_from(&hosts.w1, https(ORIGIN), "allowed.test", &pki)
        .unwrap_or_else(|e| panic!("allowed.test (live flow): {e}\n{}", diagnose()));
    echo(&mut live_tls, b"a flow that stays open").unwrap();
    let origin_before = origin.count(|e| e.starts_with("accept "));
    assert_eq!(origin_before, 3, "{:?}", origin.all());

    // 4. Denied by SNI: Sluice closes the connection after the ClientHello;
    //    nothing reaches the origin.
    step("denied SNI");
    let denied = tls_from(&hosts.w1, https(ORIGIN), "denied.test", &pki);
    assert!(denied.is_err(), "a TLS session with denied.test was completed");

    // 5. The allowed SNI sent to the attacker's address after the DNS proxy
    //    answered w1 for it: the destination is not one it gave, so the
    //    flow is refused outright.
    step("allowed SNI to the attacker's address after a DNS answer");
    let spoofed = tls_from(&hosts.w1, https(ATTACKER), "allowed.test", &pki);
    assert!(spoofed.is_err(), "a spoofed allowed.test session was completed");
    assert_eq!(
        origin.count(|e| e.starts_with("accept ")),
        origin_before,
        "a denied flow reached the origin: {:?}",
        origin.all()
    );

    // 6. East-west, decided by SmartGroup: agents → servers on the service
    //    port is allowed (and stays open for step 7); another port is not;
    //    servers → agents is denied by rule.
    step("east-west: allowed and denied by SmartGroup");
    let mut live_ew = tcp_from(&hosts.w1, sock(W2, SERVICE_PORT))
        .unwrap_or_else(|e| panic!("w1 → w2:{SERVICE_PORT}: {e}\n{}", diagnose()));
    echo(&mut live_ew, b"east-west allowed").unwrap_or_else(|e| panic!("w1 → w2:{SERVICE_PORT}: {e}\n{}", diagnose()));
    assert_eq!(w2_service.count(|_| true), 1, "{:?}", w2_service.all());
    let mut other = tcp_from(&hosts.w1, sock(W2, OTHER_PORT)).unwrap();
    let _ = other.write_all(b"not this port");
    closed_within_wait(&mut other).unwrap_or_else(|e| panic!("w1 → w2:{OTHER_PORT}: {e}"));
    let mut reverse = tcp_from(&hosts.w2, sock(W1, SERVICE_PORT)).unwrap();
    let _ = reverse.write_all(b"servers may not call agents");
    closed_within_wait(&mut reverse).unwrap_or_else(|e| panic!("w2 → w1:{SERVICE_PORT}: {e}"));

    // 7. The control plane revokes allowed.test: the live TLS flow is closed
    //    and recorded; the live east-west flow, still allowed, goes on.
    step("policy change on the control plane");
    let edited = Instant::now();
    replace(&served, "policy.yaml", &policy_yaml(SITES_REVOKED));
    closed_within_wait(&mut live_tls).unwrap_or_else(|e| {
        panic!(
            "the live allowed.test flow was not closed after the policy change: {e}\n{}",
            diagnose()
        )
    });
    step(&format!(
        "the live flow was closed {:?} after the edit",
        edited.elapsed()
    ));
    let (rules, _) = gateway_state(&hosts.gw, admin);
    assert_eq!(
        rules,
        ["sites-revoked", "agents-to-servers", "servers-not-to-agents"],
        "{}",
        diagnose()
    );
    echo(&mut live_ew, b"still allowed after the change").unwrap_or_else(|e| {
        panic!(
            "the east-west flow did not survive an unrelated change: {e}\n{}",
            diagnose()
        )
    });
    // New flows meet the new policy too.
    let after = tls_from(&hosts.w1, https(ORIGIN), "allowed.test", &pki);
    assert!(after.is_err(), "allowed.test was reached after it was revoked");
    live_ew.shutdown(std::net::Shutdown::Write).unwrap();
    closed_within_wait(&mut live_ew).unwrap();
    drop(live_ew);

    // What reached whom: the origin saw only the gateway, three times; the
    // attacker and the denied east-west services saw nothing; the DNS
    // server was asked only by the gateway, and never for denied.test.
    assert_eq!(origin.count(|e| e.starts_with("accept ")), 3, "{:?}", origin.all());
    assert_eq!(
        origin.count(|e| e.starts_with("tls allowed.test ")),
        3,
        "{:?}",
        origin.all()
    );
    assert!(
        origin.all().iter().all(|e| e.contains(&format!(" {GW_INET}:"))),
        "the origin was reached other than through the gateway: {:?}",
        origin.all()
    );
    assert!(
        attacker.all().is_empty(),
        "the attacker's server was reached: {:?}",
        attacker.all()
    );
    assert!(
        w2_other.all().is_empty(),
        "w2:{OTHER_PORT} was reached: {:?}",
        w2_other.all()
    );
    assert!(
        w1_service.all().is_empty(),
        "w1 was reached from w2: {:?}",
        w1_service.all()
    );
    assert!(
        dns.all().iter().all(|e| e.contains(&format!(" {GW_INET}:"))),
        "the DNS server was asked other than by the gateway: {:?}",
        dns.all()
    );
    assert_eq!(dns.count(|e| e.starts_with("denied.test.")), 0, "{:?}", dns.all());
    assert!(dns.count(|e| e.starts_with("allowed.test. A ")) > 0, "{:?}", dns.all());

    // The gateway's audit: a record per flow (9) and per query (3).
    step("audit records");
    let recs = audit_records(&audit, 12, WAIT);
    let flows: Vec<Value> = recs.iter().filter(|r| r["kind"] == "flow").cloned().collect();
    let queries: Vec<Value> = recs.iter().filter(|r| r["kind"] == "dns").cloned().collect();
    assert_eq!(
        (flows.len(), queries.len()),
        (9, 3),
        "{recs:#?}\n{}",
        gateway.proc.output()
    );
    let origin_dst = https(ORIGIN).to_string();
    let attacker_dst = https(ATTACKER).to_string();
    let from_w1 = |r: &Value| s(r, &["src"]).is_some_and(|v| v.starts_with(&format!("{W1}:")));

    // 1: rerouted to the name's own address.
    let r = one_record(&flows, "allowed SNI to the attacker, no binding", |r| {
        s(r, &["original_dst"]) == Some(attacker_dst.as_str()) && s(r, &["verdict", "action"]) == Some("allow")
    });
    assert!(from_w1(r), "{r}");
    assert_eq!(s(r, &["listener"]), Some("egress-tls"), "{r}");
    assert_eq!(s(r, &["sni"]), Some("allowed.test"), "{r}");
    assert_eq!(s(r, &["dst"]), Some(origin_dst.as_str()), "{r}");
    assert_eq!(s(r, &["verdict", "rule"]), Some("agents-to-sites"), "{r}");
    assert_eq!(s(r, &["verdict", "reason"]), Some("allowed-by-rule"), "{r}");
    assert_eq!(s(r, &["verdict", "check"]), Some("sni-resolved"), "{r}");
    assert!(groups(r, "src_groups").contains(&"agents".to_owned()), "{r}");

    // 3: allowed on the DNS proxy's word.
    let r = one_record(&flows, "allowed SNI", |r| {
        s(r, &["original_dst"]) == Some(origin_dst.as_str())
            && s(r, &["verdict", "action"]) == Some("allow")
            && s(r, &["close_reason"]) != Some("policy-revoked")
    });
    assert_eq!(s(r, &["sni"]), Some("allowed.test"), "{r}");
    assert_eq!(s(r, &["dst"]), Some(origin_dst.as_str()), "{r}");
    assert_eq!(s(r, &["verdict", "rule"]), Some("agents-to-sites"), "{r}");
    assert_eq!(s(r, &["verdict", "reason"]), Some("allowed-by-rule"), "{r}");
    assert_eq!(s(r, &["verdict", "check"]), Some("dns-binding"), "{r}");
    assert!(r["bytes_down"].as_u64().unwrap() > 0, "{r}");

    // 4: denied by the default.
    let r = one_record(&flows, "denied SNI", |r| s(r, &["sni"]) == Some("denied.test"));
    assert!(from_w1(r), "{r}");
    assert_eq!(s(r, &["original_dst"]), Some(origin_dst.as_str()), "{r}");
    assert_eq!(s(r, &["verdict", "action"]), Some("deny"), "{r}");
    assert_eq!(s(r, &["verdict", "rule"]), Some("default"), "{r}");
    assert_eq!(s(r, &["verdict", "reason"]), Some("default-deny"), "{r}");
    assert!(r.get("dst").is_none(), "a denied flow dials nothing: {r}");
    assert_eq!(r["bytes_down"].as_u64(), Some(0), "{r}");

    // 5: the spoofed destination.
    let r = one_record(&flows, "allowed SNI to the attacker after a DNS answer", |r| {
        s(r, &["original_dst"]) == Some(attacker_dst.as_str()) && s(r, &["verdict", "action"]) == Some("deny")
    });
    assert_eq!(s(r, &["sni"]), Some("allowed.test"), "{r}");
    assert_eq!(s(r, &["verdict", "rule"]), Some("anti-evasion"), "{r}");
    assert_eq!(s(r, &["verdict", "reason"]), Some("sni-destination-mismatch"), "{r}");
    assert_eq!(s(r, &["verdict", "mode"]), Some("enforced"), "{r}");
    assert!(r.get("dst").is_none(), "a denied flow dials nothing: {r}");

    // 6: east-west.
    let service = sock(W2, SERVICE_PORT).to_string();
    let r = one_record(&flows, "east-west allowed", |r| {
        s(r, &["original_dst"]) == Some(service.as_str())
    });
    assert!(from_w1(r), "{r}");
    assert_eq!(s(r, &["listener"]), Some("east-west"), "{r}");
    assert_eq!(s(r, &["dst"]), Some(service.as_str()), "{r}");
    assert_eq!(s(r, &["verdict", "action"]), Some("allow"), "{r}");
    assert_eq!(s(r, &["verdict", "rule"]), Some("agents-to-servers"), "{r}");
    assert_eq!(s(r, &["verdict", "reason"]), Some("allowed-by-rule"), "{r}");
    assert_eq!(s(r, &["close_reason"]), Some("client-closed"), "{r}");
    assert!(groups(r, "src_groups").contains(&"agents".to_owned()), "{r}");
    assert!(groups(r, "dst_groups").contains(&"servers".to_owned()), "{r}");
    let other_port = sock(W2, OTHER_PORT).to_string();
    let r = one_record(&flows, "east-west, another port", |r| {
        s(r, &["original_dst"]) == Some(other_port.as_str())
    });
    assert_eq!(s(r, &["listener"]), Some("east-west"), "{r}");
    assert_eq!(s(r, &["verdict", "action"]), Some("deny"), "{r}");
    assert_eq!(s(r, &["verdict", "reason"]), Some("default-deny"), "{r}");
    assert!(r.get("dst").is_none(), "a denied flow dials nothing: {r}");
    let agents_service = sock(W1, SERVICE_PORT).to_string();
    let r = one_record(&flows, "east-west, servers to agents", |r| {
        s(r, &["original_dst"]) == Some(agents_service.as_str())
    });
    assert!(s(r, &["src"]).is_some_and(|v| v.starts_with(&format!("{W2}:"))), "{r}");
    assert_eq!(s(r, &["verdict", "action"]), Some("deny"), "{r}");
    assert_eq!(s(r, &["verdict", "rule"]), Some("servers-not-to-agents"), "{r}");
    assert_eq!(s(r, &["verdict", "reason"]), Some("denied-by-rule"), "{r}");
    assert!(groups(r, "src_groups").contains(&"servers".to_owned()), "{r}");
    assert!(r.get("dst").is_none(), "a denied flow dials nothing: {r}");

    // 7: the revoked flow, and the one refused after the change.
    let r = one_record(&flows, "the revoked live flow", |r| {
        s(r, &["close_reason"]) == Some("policy-revoked")
    });
    assert!(from_w1(r), "{r}");
    assert_eq!(s(r, &["sni"]), Some("allowed.test"), "{r}");
    assert_eq!(s(r, &["dst"]), Some(origin_dst.as_str()), "{r}");
    assert_eq!(s(r, &["verdict", "action"]), Some("deny"), "{r}");
    assert_eq!(s(r, &["verdict", "rule"]), Some("sites-revoked"), "{r}");
    assert_eq!(s(r, &["verdict", "reason"]), Some("denied-by-rule"), "{r}");
    assert!(r["bytes_down"].as_u64().unwrap() > 0, "{r}");
    let r = one_record(&flows, "allowed.test after the change", |r| {
        s(r, &["verdict", "rule"]) == Some("sites-revoked") && s(r, &["close_reason"]) != Some("policy-revoked")
    });
    assert_eq!(s(r, &["original_dst"]), Some(origin_dst.as_str()), "{r}");
    assert_eq!(s(r, &["verdict", "reason"]), Some("denied-by-rule"), "{r}");

    // DNS.
    let r = one_record(&queries, "allowed.test query", |r| {
        s(r, &["qname"]) == Some("allowed.test")
    });
    assert!(
        s(r, &["source"]).is_some_and(|v| v.starts_with(&format!("{W1}:"))),
        "{r}"
    );
    assert_eq!(s(r, &["listener"]), Some("dns"), "{r}");
    assert_eq!(s(r, &["qtype"]), Some("A"), "{r}");
    assert_eq!(r["allowed"], true, "{r}");
    assert_eq!(s(r, &["rule"]), Some("agents-to-sites"), "{r}");
    assert_eq!(s(r, &["reason"]), Some("allowed-by-rule"), "{r}");
    assert_eq!(r["rcode"], 0, "{r}");
    for transport in ["udp", "tcp"] {
        let r = one_record(&queries, &format!("denied.test query over {transport}"), |r| {
            s(r, &["qname"]) == Some("denied.test") && s(r, &["transport"]) == Some(transport)
        });
        assert_eq!(r["allowed"], false, "{r}");
        assert_eq!(r["enforced"], true, "{r}");
        assert_eq!(s(r, &["rule"]), Some("default"), "{r}");
        assert_eq!(s(r, &["reason"]), Some("default-deny"), "{r}");
        assert_eq!(r["rcode"], 3, "NXDOMAIN: {r}");
        assert!(r["upstream"].is_null(), "a denied query went upstream: {r}");
    }

    // The gateway refused nothing the control plane sent.
    let (_, status) = admin_get(&hosts.gw, admin, "/xds").unwrap();
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["rejected"], 0, "{status:#}");
    step(&format!("done in {:?}", started.elapsed()));

    drop(gateway);
    drop(xds);
    drop(rt);
    drop(hosts);
}
