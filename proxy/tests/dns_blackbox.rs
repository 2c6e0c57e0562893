//! Black-box tests of the DNS proxy: the built `sluice` binary, run as a
//! child process with port-0 listeners whose bound ports are read back from
//! its stderr, asked by the real `dig` (Debian `dnsutils`), forwarding to a
//! small authority this test process serves on 127.0.0.1:0 over UDP and TCP.
//!
//! The last test checks that the bindings the DNS proxy records are what
//! the data plane uses: inside a throwaway network namespace (this test
//! binary re-run under `unshare --net`), an iptables `REDIRECT` sends an
//! opaque TCP flow to a `transparent` listener, which allows it only after
//! that client resolved the name through Sluice (a cache hit counts; the
//! binding expires after its floor and grace), and a transparent TLS flow
//! only when its SNI is the name the address was resolved for. It needs
//! root, `unshare`, `ip` and `iptables`; when any of that is missing it
//! fails and says why. Set `SLUICE_SKIP_NETNS=1` to skip it explicitly.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use serde_json::Value;

// ------------------------------------------------------------------ authority

/// A fixed zone served over UDP and TCP on one port, counting the queries
/// it is asked by name, so a test can tell whether Sluice forwarded one.
struct Authority {
    addr: SocketAddr,
    asked: Arc<Mutex<Vec<String>>>,
}

impl Authority {
    fn asked_for(&self, name: &str) -> usize {
        self.asked.lock().unwrap().iter().filter(|n| n.as_str() == name).count()
    }
}

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

fn soa() -> Record {
    Record::from_rdata(
        name("test."),
        600,
        RData::SOA(SOA::new(
            name("ns.test."),
            name("hostmaster.test."),
            1,
            3600,
            600,
            86_400,
            300,
        )),
    )
}

fn answer(q: &Message, over_udp: bool) -> Message {
    let query = q.queries[0].clone();
    let qname = query.name().to_ascii().to_ascii_lowercase();
    let mut m = Message::response(q.metadata.id, OpCode::Query);
    m.metadata.recursion_desired = q.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.authoritative = true;
    m.add_query(query.clone());
    let a = |ip: Ipv4Addr| Record::from_rdata(name(&qname), 300, RData::A(A(ip)));
    match (qname.as_str(), query.query_type()) {
        ("www.allowed.test.", RecordType::A) => {
            m.add_answer(a(Ipv4Addr::new(192, 0, 2, 10)));
        }
        ("svc.test.", RecordType::A) => {
            m.add_answer(a(Ipv4Addr::new(10, 77, 0, 5)));
        }
        // The service's address with a one-second TTL.
        ("short.test.", RecordType::A) => {
            m.add_answer(Record::from_rdata(
                name(&qname),
                1,
                RData::A(A(Ipv4Addr::new(10, 77, 0, 5))),
            ));
        }
        // 100 addresses: about 1.7 kB, over 512 and over 1232 bytes.
        ("big.allowed.test.", RecordType::A) => {
            for i in 0..100u8 {
                m.add_answer(a(Ipv4Addr::new(198, 18, 0, i)));
            }
        }
        (n, RecordType::A) if n.ends_with(".test.") => {
            m.add_answer(a(Ipv4Addr::new(198, 51, 100, 1)));
        }
        // Every name under test. exists, with A records only: NODATA.
        (n, _) if n.ends_with(".test.") => {
            m.add_authority(soa());
        }
        _ => {
            m.metadata.response_code = ResponseCode::NXDomain;
            m.add_authority(soa());
        }
    }
    if over_udp && m.to_vec().unwrap().len() > 512 {
        m.answers.clear();
        m.metadata.truncation = true;
    }
    m
}

/// Starts the authority on `ip`, port 0 (the same port for UDP and TCP).
/// Its threads live as long as the test process.
fn start_authority(ip: Ipv4Addr) -> Authority {
    let mut pair = None;
    for _ in 0..32 {
        let udp = UdpSocket::bind((ip, 0)).unwrap();
        if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()) {
            pair = Some((udp, tcp));
            break;
        }
    }
    let (udp, tcp) = pair.expect("no port free for both UDP and TCP");
    let addr = udp.local_addr().unwrap();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&asked);
    thread::spawn(move || {
        let mut buf = vec![0u8; 65_535];
        loop {
            let Ok((n, peer)) = udp.recv_from(&mut buf) else { return };
            let Ok(q) = Message::from_vec(&buf[..n]) else { continue };
            seen.lock()
                .unwrap()
                .push(q.queries[0].name().to_ascii().to_ascii_lowercase());
            let _ = udp.send_to(&answer(&q, true).to_vec().unwrap(), peer);
        }
    });
    let seen = Arc::clone(&asked);
    thread::spawn(move || {
        for stream in tcp.incoming() {
            let Ok(mut s) = stream else { return };
            let seen = Arc::clone(&seen);
            thread::spawn(move || {
                loop {
                    let mut len = [0u8; 2];
                    if s.read_exact(&mut len).is_err() {
                        return;
                    }
                    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    if s.read_exact(&mut buf).is_err() {
                        return;
                    }
                    let Ok(q) = Message::from_vec(&buf) else { return };
                    seen.lock()
                        .unwrap()
                        .push(q.queries[0].name().to_ascii().to_ascii_lowercase());
                    let out = answer(&q, false).to_vec().unwrap();
                    let mut framed = u16::try_from(out.len()).unwrap().to_be_bytes().to_vec();
                    framed.extend_from_slice(&out);
                    if s.write_all(&framed).is_err() {
                        return;
                    }
                }
            });
        }
    });
    Authority { addr, asked }
}

// ------------------------------------------------------------------ sluice

/// A running `sluice run` child. Dropping it stops that process (by its
/// PID: SIGTERM, then SIGKILL after a grace period) and nothing else.
struct Sluice {
    child: Child,
    listeners: BTreeMap<String, SocketAddr>,
    stderr: Arc<Mutex<Vec<String>>>,
    audit: PathBuf,
    config: PathBuf,
    /// Removed after `drop` has stopped the process.
    _dir: tempfile::TempDir,
}

/// A fresh directory for one Sluice's files, removed with the guard.
fn scratch_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("sluice-dns-blackbox-{tag}-"))
        .tempdir()
        .unwrap()
}

impl Sluice {
    /// Runs the built binary on `config` (its `audit:` section is added
    /// here, pointing at a fresh file) and waits until it is serving.
    fn start(tag: &str, config: &str) -> Self {
        let dir = scratch_dir(tag);
        let audit = dir.path().join("audit.jsonl");
        let path = dir.path().join("sluice.yaml");
        let text = format!(
            "admin: {{address: 127.0.0.1:0}}\naudit: {{destination: {}}}\n{config}",
            audit.display()
        );
        std::fs::write(&path, &text).unwrap();
        let path = path.canonicalize().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("run")
            .arg("-c")
            .arg(&path)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start the sluice binary");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let pipe = child.stderr.take().unwrap();
        let lines = Arc::clone(&stderr);
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { return };
                lines.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let mut s = Self {
            child,
            listeners: BTreeMap::new(),
            stderr,
            audit,
            config: path,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.starts_with("sluice: running") => break,
                Ok(line) => {
                    // `sluice: listening: NAME (KIND) on ADDR`
                    if let Some(rest) = line.strip_prefix("sluice: listening: ") {
                        let (name, rest) = rest.split_once(' ').unwrap();
                        let addr = rest.rsplit_once(" on ").unwrap().1;
                        s.listeners.insert(name.to_owned(), addr.parse().unwrap());
                    }
                }
                Err(_) => panic!(
                    "sluice did not start within 20 s (exit: {:?}); config:\n{text}\nstderr:\n{}",
                    s.child.try_wait(),
                    s.stderr()
                ),
            }
        }
        s
    }

    fn addr(&self, listener: &str) -> SocketAddr {
        *self
            .listeners
            .get(listener)
            .unwrap_or_else(|| panic!("no listener `{listener}` in {:?}", self.listeners))
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Rewrites the configuration file (same audit file) and sends SIGHUP
    /// to this process; returns once it says it reloaded.
    fn reload(&self, config: &str) {
        let text = format!(
            "admin: {{address: 127.0.0.1:0}}\naudit: {{destination: {}}}\n{config}",
            self.audit.display()
        );
        std::fs::write(&self.config, text).unwrap();
        let before = self.stderr.lock().unwrap().len();
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let lines = self.stderr.lock().unwrap()[before..].to_vec();
            if lines.iter().any(|l| l.starts_with("sluice: reloaded")) {
                return;
            }
            assert!(
                Instant::now() < deadline && !lines.iter().any(|l| l.contains("reload rejected")),
                "reload failed:\n{}",
                lines.join("\n")
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The audit records with `"kind": kind`, once there are at least
    /// `want` of them (the writer flushes when idle), or panics after 10 s.
    fn audit(&self, kind: &str, want: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&self.audit).unwrap_or_default();
            let records: Vec<Value> = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("bad audit line {l:?}: {e}")))
                .filter(|v| v["kind"] == kind)
                .collect();
            if records.len() >= want || Instant::now() > deadline {
                return records;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------ dig

#[derive(Debug)]
struct Dig {
    status: String,
    /// `(name, type, data)` of the answer section.
    answers: Vec<(String, String, String)>,
    raw: String,
}

impl Dig {
    fn a_records(&self) -> Vec<String> {
        self.answers
            .iter()
            .filter(|(_, t, _)| t == "A")
            .map(|(_, _, d)| d.clone())
            .collect()
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `dig @server -p port NAME TYPE` with `extra` options, bounded to a few
/// seconds; the status and answer section parsed from its output.
fn dig(server: SocketAddr, qname: &str, qtype: &str, extra: &[&str]) -> Dig {
    assert!(have("dig"), "`dig` is missing: apt-get install -y dnsutils");
    let out = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string()])
        .args(["+time=3", "+tries=1", "+nocookie"])
        .args(extra)
        .args([qname, qtype])
        .output()
        .unwrap();
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = raw
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or_else(|| {
            panic!(
                "no status in dig's output:\n{raw}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .to_owned();
    let mut answers = Vec::new();
    let mut in_answer = false;
    for line in raw.lines() {
        if line.starts_with(";; ANSWER SECTION") {
            in_answer = true;
        } else if line.trim().is_empty() || line.starts_with(";;") {
            in_answer = false;
        } else if in_answer {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() >= 5 {
                answers.push((f[0].to_owned(), f[3].to_owned(), f[4..].join(" ")));
            }
        }
    }
    Dig { status, answers, raw }
}

// ------------------------------------------------------------------ tests

/// A DNS listener forwarding to `auth`, with `options` appended to it,
/// and a policy allowing TLS to `www.allowed.test` (so resolving it too).
fn dns_config(auth: &Authority, options: &str, policy_extra: &str) -> String {
    format!(
        r#"
listeners:
  - name: dns
    kind: dns
    address: 127.0.0.1:0
    upstreams: ["{}"]
{options}
webgroups:
  - name: allowed
    domains: [www.allowed.test, big.allowed.test]
  - name: watched
    domains: [watch.test]
policy:
  default: deny
{policy_extra}
  rules:
    - name: watch-me
      to: {{webgroups: [watched]}}
      protocols: [dns]
      action: deny
      watch: true
    - name: allow-web
      to: {{webgroups: [allowed]}}
      protocols: [tls]
      action: allow
"#,
        auth.addr
    )
}

fn qname_of(v: &Value) -> String {
    v["qname"].as_str().unwrap().trim_end_matches('.').to_ascii_lowercase()
}

#[test]
fn dig_allowed_denied_watched_and_tcp_with_one_audit_record_each() {
    let auth = start_authority(Ipv4Addr::LOCALHOST);
    let sluice = Sluice::start("enforce", &dns_config(&auth, "", ""));
    let dns = sluice.addr("dns");

    // Allowed by the TLS rule: the upstream's answer, unchanged.
    let d = dig(dns, "www.allowed.test", "A", &[]);
    assert_eq!(d.status, "NOERROR", "{}", d.raw);
    assert_eq!(d.a_records(), ["192.0.2.10"], "{}", d.raw);
    assert_eq!(auth.asked_for("www.allowed.test."), 1);

    // Denied by default: NXDOMAIN made by Sluice, never forwarded.
    let d = dig(dns, "blocked.test", "A", &[]);
    assert_eq!(d.status, "NXDOMAIN", "{}", d.raw);
    assert!(d.answers.is_empty(), "{}", d.raw);
    assert_eq!(
        auth.asked_for("blocked.test."),
        0,
        "a denied query reached the upstream"
    );

    // A `watch: true` deny rule: answered normally, recorded as watched.
    let d = dig(dns, "watch.test", "A", &[]);
    assert_eq!(d.status, "NOERROR", "{}", d.raw);
    assert_eq!(d.a_records(), ["198.51.100.1"], "{}", d.raw);

    // DNS over TCP on the same port.
    let d = dig(dns, "www.allowed.test", "A", &["+tcp"]);
    assert_eq!(d.status, "NOERROR", "{}", d.raw);
    assert_eq!(d.a_records(), ["192.0.2.10"], "{}", d.raw);
    let d = dig(dns, "blocked.test", "A", &["+tcp"]);
    assert_eq!(d.status, "NXDOMAIN", "{}", d.raw);

    // Another type for an allowed name: forwarded, the upstream's NXDOMAIN.
    let d = dig(dns, "www.allowed.test", "AAAA", &[]);
    assert_eq!(d.status, "NOERROR", "{}", d.raw);
    assert!(d.answers.is_empty(), "{}", d.raw);

    let recs = sluice.audit("dns", 6);
    assert_eq!(
        recs.len(),
        6,
        "one dns audit record per query; got:\n{recs:#?}\nstderr:\n{}",
        sluice.stderr()
    );
    for r in &recs {
        for field in [
            "qname",
            "qtype",
            "rule",
            "reason",
            "rcode",
            "transport",
            "source",
            "listener",
        ] {
            assert!(!r[field].is_null(), "audit record lacks `{field}`: {r}");
        }
        assert_eq!(r["listener"], "dns");
    }
    let expect = [
        (
            "www.allowed.test",
            "A",
            "udp",
            true,
            false,
            "allow-web",
            "allowed-by-rule",
            0,
        ),
        ("blocked.test", "A", "udp", false, false, "default", "default-deny", 3),
        ("watch.test", "A", "udp", false, true, "watch-me", "denied-by-rule", 0),
        (
            "www.allowed.test",
            "A",
            "tcp",
            true,
            false,
            "allow-web",
            "allowed-by-rule",
            0,
        ),
        ("blocked.test", "A", "tcp", false, false, "default", "default-deny", 3),
        (
            "www.allowed.test",
            "AAAA",
            "udp",
            true,
            false,
            "allow-web",
            "allowed-by-rule",
            0,
        ),
    ];
    for (r, (qname, qtype, transport, allowed, watched, rule, reason, rcode)) in recs.iter().zip(expect) {
        assert_eq!(qname_of(r), qname, "{r}");
        assert_eq!(r["qtype"], qtype, "{r}");
        assert_eq!(r["transport"], transport, "{r}");
        assert_eq!(r["allowed"], allowed, "{r}");
        assert_eq!(r["watched"], watched, "{r}");
        assert_eq!(r["enforced"], !watched, "{r}");
        assert_eq!(r["rule"], rule, "{r}");
        assert_eq!(r["reason"], reason, "{r}");
        assert_eq!(r["rcode"], rcode, "{r}");
    }
    // The second TCP query for www.allowed.test may be a cache hit; a
    // forwarded one names the upstream.
    assert_eq!(recs[0]["upstream"], auth.addr.to_string(), "{}", recs[0]);
    assert!(recs[1]["upstream"].is_null(), "{}", recs[1]);
}

#[test]
fn dig_denied_with_deny_answer_refused() {
    let auth = start_authority(Ipv4Addr::LOCALHOST);
    let sluice = Sluice::start("refused", &dns_config(&auth, "    deny_answer: refused", ""));
    let dns = sluice.addr("dns");
    let d = dig(dns, "blocked.test", "A", &[]);
    assert_eq!(d.status, "REFUSED", "{}", d.raw);
    let d = dig(dns, "blocked.test", "A", &["+tcp"]);
    assert_eq!(d.status, "REFUSED", "{}", d.raw);
    let d = dig(dns, "www.allowed.test", "A", &[]);
    assert_eq!(d.status, "NOERROR", "{}", d.raw);
    assert_eq!(auth.asked_for("blocked.test."), 0);
    let recs = sluice.audit("dns", 3);
    assert_eq!(recs.len(), 3, "{recs:#?}");
    assert_eq!(recs[0]["rcode"], 5, "{}", recs[0]);
    assert_eq!(recs[0]["reason"], "default-deny", "{}", recs[0]);
}

#[test]
fn dig_denied_with_deny_answer_sinkhole() {
    let auth = start_authority(Ipv4Addr::LOCALHOST);
    let sluice = Sluice::start(
        "sinkhole",
        &dns_config(
            &auth,
            "    deny_answer: sinkhole\n    sinkhole: [192.0.2.99, \"2001:db8::99\"]",
            "",
        ),
    );
    let dns = sluice.addr("dns");
    let d = dig(dns, "blocked.test", "A", &[]);
    assert_eq!(d.status, "NOERROR", "{}", d.raw);
    assert_eq!(d.a_records(), ["192.0.2.99"], "{}", d.raw);
    let d = dig(dns, "blocked.test", "AAAA", &[]);
    assert_eq!(d.status, "NOERROR", "{}", d.raw);
    let aaaa: Vec<&str> = d
        .answers
        .iter()
        .filter(|(_, t, _)| t == "AAAA")
        .map(|(_, _, a)| a.as_str())
        .collect();
    assert_eq!(aaaa, ["2001:db8::99"], "{}", d.raw);
    assert_eq!(auth.asked_for("blocked.test."), 0);
    let recs = sluice.audit("dns", 2);
    assert_eq!(recs.len(), 2, "{recs:#?}");
    for r in &recs {
        assert_eq!(r["allowed"], false, "{r}");
        assert_eq!(r["reason"], "default-deny", "{r}");
        assert_eq!(r["rcode"], 0, "{r}");
    }
}

#[test]
fn dig_in_watch_mode_answers_and_the_audit_says_watched() {
    let auth = start_authority(Ipv4Addr::LOCALHOST);
    let sluice = Sluice::start("watch", &dns_config(&auth, "", "  mode: watch"));
    let dns = sluice.addr("dns");
    let d = dig(dns, "blocked.test", "A", &[]);
    assert_eq!(d.status, "NOERROR", "{}", d.raw);
    assert_eq!(d.a_records(), ["198.51.100.1"], "{}", d.raw);
    assert_eq!(auth.asked_for("blocked.test."), 1, "watch mode forwards");
    let recs = sluice.audit("dns", 1);
    assert_eq!(recs.len(), 1, "{recs:#?}");
    let r = &recs[0];
    assert_eq!(qname_of(r), "blocked.test");
    assert_eq!(r["allowed"], false, "{r}");
    assert_eq!(r["watched"], true, "{r}");
    assert_eq!(r["enforced"], false, "{r}");
    assert_eq!(r["reason"], "default-deny", "{r}");
    assert_eq!(r["rcode"], 0, "{r}");
}

#[test]
fn dig_truncation_tcp_fallback_zone_transfer_and_bad_packets() {
    let auth = start_authority(Ipv4Addr::LOCALHOST);
    let sluice = Sluice::start("truncation", &dns_config(&auth, "", ""));
    let dns = sluice.addr("dns");

    // The authority truncates over UDP; Sluice fetches the answer over TCP
    // and, as it is bigger than the client's 1232 bytes, answers with TC.
    let d = dig(dns, "big.allowed.test", "A", &["+ignore", "+bufsize=1232"]);
    assert_eq!(d.status, "NOERROR", "{}", d.raw);
    assert!(d.raw.contains(" tc"), "TC not set:\n{}", d.raw);
    assert!(d.answers.is_empty(), "{}", d.raw);
    // No EDNS: 512 bytes, TC too.
    let d = dig(dns, "big.allowed.test", "A", &["+ignore", "+noedns"]);
    assert!(d.raw.contains(" tc"), "TC not set:\n{}", d.raw);
    // dig retries over TCP and gets all of it; so does a big enough buffer.
    let d = dig(dns, "big.allowed.test", "A", &[]);
    assert_eq!(d.a_records().len(), 100, "{}", d.raw);
    let d = dig(dns, "big.allowed.test", "A", &["+bufsize=4096"]);
    assert_eq!(d.a_records().len(), 100, "{}", d.raw);
    assert!(!d.raw.contains(" tc"), "{}", d.raw);

    // Zone transfers are refused, whatever the policy says about the name.
    let out = Command::new("dig")
        .arg(format!("@{}", dns.ip()))
        .args([
            "-p",
            &dns.port().to_string(),
            "+time=3",
            "+tries=1",
            "axfr",
            "www.allowed.test",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Transfer failed"), "{text}");

    // Malformed datagrams: FORMERR or silence, and the server keeps going.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let header_only = [0x12, 0x34, 0x01, 0x00, 0, 0, 0, 0, 0, 0, 0, 0];
    let cut_name = [0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'w', b'w'];
    for pkt in [&[0xffu8, 0xff][..], &header_only[..], &cut_name[..], &[0u8; 600][..]] {
        udp.send_to(pkt, dns).unwrap();
        let mut buf = [0u8; 512];
        if let Ok((n, _)) = udp.recv_from(&mut buf) {
            assert!(n >= 12, "a reply shorter than a header");
            assert_eq!(buf[3] & 0x0f, 1, "not FORMERR for {pkt:02x?}: {:02x?}", &buf[..n]);
        }
    }
    let d = dig(dns, "www.allowed.test", "A", &[]);
    assert_eq!(d.a_records(), ["192.0.2.10"], "{}", d.raw);
    assert!(
        sluice.stderr().lines().all(|l| !l.contains("panicked")),
        "{}",
        sluice.stderr()
    );

    let recs = sluice.audit("dns", 6);
    let axfr = recs
        .iter()
        .find(|r| r["qtype"] == "AXFR")
        .expect("an audit record for the AXFR");
    assert_eq!(axfr["reason"], "dns-zone-transfer", "{axfr}");
    assert_eq!(axfr["rcode"], 5, "{axfr}");
}

#[test]
fn dig_gets_servfail_when_the_upstream_is_down() {
    // An upstream port nothing listens on (refused at once), and one that
    // swallows queries (answered only by Sluice's own timeout).
    let closed = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let hole = UdpSocket::bind("127.0.0.1:0").unwrap();
    for upstream in [closed, hole.local_addr().unwrap()] {
        let sluice = Sluice::start(
            "down",
            &format!(
                "listeners:\n  - name: dns\n    kind: dns\n    address: 127.0.0.1:0\n    upstreams: [\"{upstream}\"]\n\
                 policy:\n  default: allow\n"
            ),
        );
        let dns = sluice.addr("dns");
        for extra in [&[][..], &["+tcp"][..]] {
            let started = Instant::now();
            let out = Command::new("dig")
                .arg(format!("@{}", dns.ip()))
                .args(["-p", &dns.port().to_string(), "+time=10", "+tries=1", "+nocookie"])
                .args(extra)
                .args(["www.allowed.test", "A"])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains("status: SERVFAIL"),
                "upstream {upstream} {extra:?}:\n{text}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(8),
                "SERVFAIL took {:?}",
                started.elapsed()
            );
        }
        let recs = sluice.audit("dns", 2);
        assert_eq!(recs.len(), 2, "{recs:#?}");
        assert!(recs.iter().all(|r| r["rcode"] == 2), "{recs:#?}");
    }
}

#[test]
fn sighup_reload_applies_the_new_policy_to_queries_at_once() {
    let auth = start_authority(Ipv4Addr::LOCALHOST);
    let sluice = Sluice::start("reload", &dns_config(&auth, "", ""));
    let dns = sluice.addr("dns");
    let d = dig(dns, "www.allowed.test", "A", &[]);
    assert_eq!(d.a_records(), ["192.0.2.10"], "{}", d.raw);
    // The answer is cached now; the new policy denies the name.
    sluice.reload(&dns_config(&auth, "", "").replace("action: allow", "action: deny"));
    let d = dig(dns, "www.allowed.test", "A", &[]);
    assert_eq!(d.status, "NXDOMAIN", "a cached answer outlived the reload:\n{}", d.raw);
    let recs = sluice.audit("dns", 2);
    // A `tls` deny rule does not cover `dns`: the default denies.
    assert_eq!(recs[1]["reason"], "default-deny", "{}", recs[1]);
    assert_eq!(recs[1]["cache_hit"], false, "{}", recs[1]);
}

/// A reload changes a DNS listener's options in place, on the same socket:
/// the next query is answered the new way, and the reload says so.
#[test]
fn sighup_reload_changes_dns_listener_options_in_place() {
    let auth = start_authority(Ipv4Addr::LOCALHOST);
    let sluice = Sluice::start("reload-options", &dns_config(&auth, "", ""));
    let dns = sluice.addr("dns");
    let d = dig(dns, "blocked.test", "A", &[]);
    assert_eq!(d.status, "NXDOMAIN", "{}", d.raw);
    sluice.reload(&dns_config(&auth, "    deny_answer: refused", ""));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sluice.stderr().contains("listeners changed in place: dns") {
        assert!(
            Instant::now() < deadline,
            "no reload report after the reload:\n{}",
            sluice.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!sluice.stderr().contains("need a restart"), "{}", sluice.stderr());
    let d = dig(dns, "blocked.test", "A", &[]);
    assert_eq!(d.status, "REFUSED", "the new deny answer applies at once:\n{}", d.raw);
    assert_eq!(sluice.addr("dns"), dns, "the listener keeps its socket");
}

// A wildcard listener answers each UDP query from the address it was sent
// to (IP_PKTINFO / IPV6_PKTINFO, `sys::enable_pktinfo`), also for queries
// that go upstream first (www.allowed.test is forwarded, then cached).
#[test]
fn dig_to_a_wildcard_listener_gets_the_answer_from_the_address_it_asked() {
    let auth = start_authority(Ipv4Addr::LOCALHOST);
    let config = dns_config(&auth, "", "").replace("address: 127.0.0.1:0", "address: 0.0.0.0:0");
    let sluice = Sluice::start("wildcard", &config);
    let port = sluice.addr("dns").port();
    // 127.0.0.2 is a local address (127/8 is on lo) other than the one
    // the kernel picks as the source of packets to 127.0.0.1.
    let asked = SocketAddr::from(([127, 0, 0, 2], port));
    // The reply's source address, then what dig (a connected socket) sees.
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut q = Message::query();
    q.metadata.id = 0x5151;
    q.metadata.recursion_desired = true;
    q.add_query(hickory_proto::op::Query::query(
        name("www.allowed.test."),
        RecordType::A,
    ));
    udp.send_to(&q.to_vec().unwrap(), asked).unwrap();
    let mut buf = [0u8; 512];
    let (_, from) = udp.recv_from(&mut buf).expect("no reply at all");
    assert_eq!(from, asked, "the answer came from another address");
    let d = dig(asked, "www.allowed.test", "A", &[]);
    assert_eq!(d.status, "NOERROR", "{}", d.raw);
    // Answered from the cache this time, through the batched send.
    udp.send_to(&q.to_vec().unwrap(), asked).unwrap();
    let (_, from) = udp.recv_from(&mut buf).expect("no reply to the cached query");
    assert_eq!(from, asked, "the cached answer came from another address");
}

// ------------------------------------------------------------------ netns

const INNER_ENV: &str = "SLUICE_DNS_NETNS_INNER";

#[test]
fn bindings_let_an_ip_only_flow_through_only_after_resolving() {
    if std::env::var_os("SLUICE_SKIP_NETNS").is_some() {
        eprintln!("SKIPPED explicitly (SLUICE_SKIP_NETNS): DNS binding namespace test not run");
        return;
    }
    let missing: Vec<_> = ["unshare", "ip", "iptables", "dig"]
        .into_iter()
        .filter(|t| !have(t))
        .collect();
    assert!(
        missing.is_empty(),
        "cannot run the DNS binding test: missing {missing:?} (apt-get install -y iptables iproute2 util-linux dnsutils)"
    );
    let uid = Command::new("id").arg("-u").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "cannot run the DNS binding test: it needs root (CAP_NET_ADMIN) to make a network namespace"
    );
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new("unshare")
        .args(["--net", "--"])
        .arg(&exe)
        .args([
            "--exact",
            "bindings_inner",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(INNER_ENV, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let o = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let e = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let (stdout, stderr) = (o.join().unwrap(), e.join().unwrap());
    assert!(
        status.is_some_and(|s| s.success()) && stdout.contains("1 passed"),
        "DNS binding test inside the namespace failed (status {status:?}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
}

fn sh(cmd: &str) {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(
        out.status.success(),
        "cannot set up the namespace: `{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Connects from `src` to `dst`, sends a line and returns what came back
/// before the connection closed (bounded by a 5 s read timeout).
fn talk(src: Ipv4Addr, dst: SocketAddr) -> String {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from((src, 0)).into()).unwrap();
    sock.connect_timeout(&dst.into(), Duration::from_secs(5)).unwrap();
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(b"ping\n");
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
#[ignore = "runs only inside the namespace made by bindings_let_an_ip_only_flow_through_only_after_resolving"]
fn bindings_inner() {
    assert!(
        std::env::var_os(INNER_ENV).is_some(),
        "run via bindings_let_an_ip_only_flow_through_only_after_resolving, not directly: it rewrites iptables"
    );
    let client = Ipv4Addr::new(10, 77, 0, 1);
    let service = Ipv4Addr::new(10, 77, 0, 5);
    sh("ip link set lo up");
    sh("ip addr add 10.77.0.1/32 dev lo && ip addr add 10.77.0.5/32 dev lo");

    // The service: plain TCP (opaque to Sluice), counts connections, says
    // hello and echoes.
    let upstream = TcpListener::bind((service, 0)).unwrap();
    let port = upstream.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    thread::spawn(move || {
        for s in upstream.incoming() {
            let Ok(mut s) = s else { return };
            count.fetch_add(1, Ordering::SeqCst);
            thread::spawn(move || {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut line = Vec::new();
                let _ = s.read_to_end(&mut line);
                let _ = s.write_all(b"svc says: ");
                let _ = s.write_all(&line);
            });
        }
    });

    let auth = start_authority(Ipv4Addr::LOCALHOST);
    let sluice = Sluice::start(
        "netns",
        &format!(
            r#"
listeners:
  - name: dns
    kind: dns
    address: 127.0.0.1:0
    upstreams: ["{}"]
  - name: transparent
    kind: transparent
    address: 127.0.0.1:0
webgroups:
  - name: svc
    domains: [svc.test]
policy:
  default: deny
  rules:
    - name: svc-tcp
      to: {{webgroups: [svc]}}
      protocols: [tcp]
      action: allow
"#,
            auth.addr
        ),
    );
    let dns = sluice.addr("dns");
    let transparent = sluice.addr("transparent");
    // Only the client's address is redirected: Sluice's own connection to
    // the service (from 10.77.0.5, the local route's source) is not.
    sh(&format!(
        "iptables -t nat -A OUTPUT -p tcp -s {client} -d {service} --dport {port} -j REDIRECT --to-ports {}",
        transparent.port()
    ));
    let dst = SocketAddr::from((service, port));

    // Before resolving: an address-only flow no rule allows.
    let got = talk(client, dst);
    assert_eq!(got, "", "the flow reached the service before the name was resolved");
    let flows = sluice.audit("flow", 1);
    assert_eq!(flows.len(), 1, "{flows:#?}\nstderr:\n{}", sluice.stderr());
    let f = &flows[0];
    assert_eq!(f["original_dst"], dst.to_string(), "{f}");
    assert_eq!(f["verdict"]["action"], "deny", "{f}");
    assert_eq!(f["verdict"]["reason"], "default-deny", "{f}");
    assert!(f["dns_name"].is_null(), "{f}");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "the denied flow reached the service"
    );

    // Resolve through Sluice from the client's address.
    let d = dig(dns, "svc.test", "A", &["-b", "10.77.0.1"]);
    assert_eq!(d.status, "NOERROR", "{}", d.raw);
    assert_eq!(d.a_records(), ["10.77.0.5"], "{}", d.raw);

    // The same flow is now named by the binding and allowed.
    let got = talk(client, dst);
    assert_eq!(got, "svc says: ping\n", "stderr:\n{}", sluice.stderr());
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    let flows = sluice.audit("flow", 2);
    assert_eq!(flows.len(), 2, "{flows:#?}");
    let f = &flows[1];
    assert_eq!(f["dns_name"], "svc.test", "{f}");
    assert_eq!(f["verdict"]["action"], "allow", "{f}");
    assert_eq!(f["verdict"]["rule"], "svc-tcp", "{f}");
    assert_eq!(f["verdict"]["reason"], "allowed-by-rule", "{f}");
    assert_eq!(f["original_dst"], dst.to_string(), "{f}");

    // A different client address holds no binding: still denied.
    sh("ip addr add 10.77.0.2/32 dev lo");
    sh(&format!(
        "iptables -t nat -A OUTPUT -p tcp -s 10.77.0.2 -d {service} --dport {port} -j REDIRECT --to-ports {}",
        transparent.port()
    ));
    let got = talk(Ipv4Addr::new(10, 77, 0, 2), dst);
    assert_eq!(got, "", "a client that never resolved the name got through");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    let flows = sluice.audit("flow", 3);
    assert_eq!(flows[2]["verdict"]["reason"], "default-deny", "{}", flows[2]);

    // ... until it resolves the name itself, here over TCP and answered
    // from Sluice's cache: a cache hit binds the address for its client too.
    let d = dig(dns, "svc.test", "A", &["-b", "10.77.0.2", "+tcp"]);
    assert_eq!(d.a_records(), ["10.77.0.5"], "{}", d.raw);
    let queries = sluice.audit("dns", 2);
    assert_eq!(queries.len(), 2, "{queries:#?}");
    assert_eq!(queries[1]["cache_hit"], true, "{}", queries[1]);
    assert_eq!(auth.asked_for("svc.test."), 1);
    let got = talk(Ipv4Addr::new(10, 77, 0, 2), dst);
    assert_eq!(got, "svc says: ping\n", "stderr:\n{}", sluice.stderr());
    let flows = sluice.audit("flow", 4);
    assert_eq!(flows.len(), 4, "{flows:#?}");
    assert_eq!(flows[3]["dns_name"], "svc.test", "{}", flows[3]);
    assert_eq!(flows[3]["verdict"]["action"], "allow", "{}", flows[3]);
    drop(sluice);

    // Bindings expire: TTL 1 s, floor 1 s, grace 1 s.
    let sluice = Sluice::start(
        "netns-expiry",
        &format!(
            r#"
listeners:
  - name: dns
    kind: dns
    address: 127.0.0.1:0
    upstreams: ["{}"]
    binding_min_ttl: 1s
    binding_grace: 1s
  - name: transparent
    kind: transparent
    address: 127.0.0.1:0
webgroups:
  - name: svc
    domains: [short.test]
policy:
  rules:
    - name: svc-tcp
      to: {{webgroups: [svc]}}
      protocols: [tcp]
      action: allow
"#,
            auth.addr
        ),
    );
    let c3 = Ipv4Addr::new(10, 77, 0, 3);
    sh(&format!("ip addr add {c3}/32 dev lo"));
    sh(&format!(
        "iptables -t nat -A OUTPUT -p tcp -s {c3} -d {service} --dport {port} -j REDIRECT --to-ports {}",
        sluice.addr("transparent").port()
    ));
    let d = dig(sluice.addr("dns"), "short.test", "A", &["-b", "10.77.0.3"]);
    assert_eq!(d.a_records(), ["10.77.0.5"], "{}", d.raw);
    let resolved = Instant::now();
    let got = talk(c3, dst);
    assert_eq!(got, "svc says: ping\n", "stderr:\n{}", sluice.stderr());
    assert!(resolved.elapsed() < Duration::from_secs(2), "too slow to test expiry");
    thread::sleep(Duration::from_secs(3).saturating_sub(resolved.elapsed()));
    let got = talk(c3, dst);
    assert_eq!(got, "", "the flow got through after its binding expired");
    let flows = sluice.audit("flow", 2);
    assert_eq!(flows.len(), 2, "{flows:#?}");
    assert_eq!(flows[0]["dns_name"], "short.test", "{}", flows[0]);
    assert!(flows[1]["dns_name"].is_null(), "{}", flows[1]);
    assert_eq!(flows[1]["verdict"]["reason"], "default-deny", "{}", flows[1]);
    drop(sluice);

    // Transparent TLS: the SNI must name what the DNS proxy answered this
    // client for the address dialled.
    let sluice = Sluice::start(
        "netns-sni",
        &format!(
            r#"
listeners:
  - name: dns
    kind: dns
    address: 127.0.0.1:0
    upstreams: ["{}"]
  - name: transparent
    kind: transparent
    address: 127.0.0.1:0
webgroups:
  - name: svc
    domains: [svc.test, other.test]
policy:
  rules:
    - name: svc-tls
      to: {{webgroups: [svc]}}
      protocols: [tls]
      action: allow
"#,
            auth.addr
        ),
    );
    let c4 = Ipv4Addr::new(10, 77, 0, 4);
    sh(&format!("ip addr add {c4}/32 dev lo"));
    sh(&format!(
        "iptables -t nat -A OUTPUT -p tcp -s {c4} -d {service} --dport {port} -j REDIRECT --to-ports {}",
        sluice.addr("transparent").port()
    ));
    let d = dig(sluice.addr("dns"), "svc.test", "A", &["-b", "10.77.0.4"]);
    assert_eq!(d.a_records(), ["10.77.0.5"], "{}", d.raw);
    let before = accepted.load(Ordering::SeqCst);
    // An allowed name, but not the one this address was resolved for.
    let got = send_client_hello(c4, dst, "other.test");
    assert_eq!(got, "", "a mismatched SNI reached the service");
    assert_eq!(accepted.load(Ordering::SeqCst), before);
    // The name the address was resolved for.
    let got = send_client_hello(c4, dst, "svc.test");
    assert!(
        got.starts_with("svc says: "),
        "the ClientHello was not relayed: {got:?}"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), before + 1);
    let flows = sluice.audit("flow", 2);
    assert_eq!(flows.len(), 2, "{flows:#?}");
    assert_eq!(flows[0]["sni"], "other.test", "{}", flows[0]);
    assert_eq!(flows[0]["verdict"]["action"], "deny", "{}", flows[0]);
    assert_eq!(
        flows[0]["verdict"]["reason"], "sni-destination-mismatch",
        "{}",
        flows[0]
    );
    assert_eq!(flows[1]["sni"], "svc.test", "{}", flows[1]);
    assert_eq!(flows[1]["verdict"]["action"], "allow", "{}", flows[1]);
    assert_eq!(flows[1]["verdict"]["check"], "dns-binding", "{}", flows[1]);
}

/// Sends a real TLS ClientHello for `sni` (made by rustls) from `src` to
/// `dst`, half-closes, and returns what came back as text.
fn send_client_hello(src: Ipv4Addr, dst: SocketAddr, sni: &str) -> String {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let server_name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    let mut tls = rustls::ClientConnection::new(Arc::new(config), server_name).unwrap();
    let mut hello = Vec::new();
    tls.write_tls(&mut hello).unwrap();
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from((src, 0)).into()).unwrap();
    sock.connect_timeout(&dst.into(), Duration::from_secs(5)).unwrap();
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(&hello);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    String::from_utf8_lossy(&got).into_owned()
}
