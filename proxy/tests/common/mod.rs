//! Shared pieces of the in-process data-plane tests: a Sluice started from a
//! YAML string on `127.0.0.1:0`, its audit log read back, and the upstreams
//! and clients the tests drive through it — a TLS echo server with an rcgen
//! certificate made at test time, a raw TCP server that records every byte it
//! receives, a tiny hyper HTTP server, and a CONNECT / TLS client.
//!
//! Nothing here sleeps to make a test pass: waits are for an event (a
//! record, a byte, a close) and each is bounded so a broken proxy fails the
//! test instead of hanging it.

#![allow(dead_code, reason = "each test uses a subset of the helpers")]

pub mod guests;

/// A data-plane test: `flow_test!(name, async { … })` is a
/// `#[tokio::test]` on the multi-thread runtime whose body is
/// [`bounded`], so a stuck proxy fails the test instead of hanging it.
#[allow(unused_macros, reason = "each test file uses a subset of the helpers")]
macro_rules! flow_test {
    ($name:ident, $body:expr) => {
        #[tokio::test(flavor = "multi_thread")]
        async fn $name() {
            common::bounded($body).await
        }
    };
}

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;
use sluice::runtime::Server;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;

/// How long any single wait in a test may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// Runs a test body with an overall bound, so a stuck proxy fails the test.
pub async fn bounded<F: std::future::Future<Output = T>, T>(f: F) -> T {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("test did not finish within 60 s")
}

/// Polls `done` every 20 ms of real time until it holds (true) or [`WAIT`]
/// of real time has passed (false). For what another thread does, such as
/// the audit writer: it waits on the wall clock, even in a test that runs
/// in paused time (a blocking sleep holds tokio's clock still).
pub async fn wait_until(mut done: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if done() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(20)))
            .await
            .expect("the sleeping thread");
    }
}

/// Awaits `f` for at most [`WAIT`], naming `what` on failure.
pub async fn within<F: std::future::Future<Output = T>, T>(what: &str, f: F) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Names every test config resolves (through `resolver.hosts`; tests have
/// no DNS) and the WebGroups the standard policy uses.
pub fn base_config(audit: &Path) -> String {
    format!(
        r#"admin: {{address: "127.0.0.1:0"}}
audit: {{destination: "{audit}"}}
resolver:
  hosts:
    allowed.test: [127.0.0.1]
    evil.test: [127.0.0.1]
    denied.test: [127.0.0.1]
    metadata.test: [169.254.169.254]
    curl.example.test: [127.0.0.1]
    mixed-case.example.test: [127.0.0.1]
    chrome-like.example.test: [127.0.0.1]
    mixed.test: [169.254.169.254, 127.0.0.1]
    mapped.test: ["::ffff:169.254.169.254"]
    ech-grease.example.test: [127.0.0.1]
webgroups:
  - {{name: good, domains: [allowed.test, metadata.test, curl.example.test, ech-grease.example.test, mixed-case.example.test,
      chrome-like.example.test, mixed.test, mapped.test]}}
  - {{name: bad, domains: [denied.test, evil.test]}}
"#,
        audit = audit.display()
    )
}

/// Deny the bad names, allow the good ones, and — after both — allow the
/// test upstreams by address. The test upstreams live on 127.0.0.1 (the
/// gateway, since the listeners bind there, and loopback), which the guard
/// refuses unless the allow rule that decides names those groups, so
/// `allow-good` names them too.
pub const STD_RULES: &str = r"    - {name: deny-bad, to: {webgroups: [bad]}, action: deny}
    - {name: allow-good, to: {webgroups: [good], smartgroups: [gateway, loopback]}, protocols: [tls, http, tcp], action: allow}
    - {name: test-upstreams, to: {smartgroups: [gateway, loopback]}, protocols: [tls, http, tcp], action: allow}
";

/// A test configuration, built from its parts rather than written out in
/// each test: listeners (name, kind and the kind's options as YAML flow
/// entries, e.g. `peek_timeout: 300ms`), the policy mode (enforce unless
/// [`TestConfig::watch`]), the rules ([`STD_RULES`] unless given), and any
/// YAML before the listeners (extra groups).
#[derive(Debug, Clone)]
pub struct TestConfig {
    head: String,
    /// Name, kind and options of each listener.
    listeners: Vec<(String, String, String)>,
    watch: bool,
    rules: String,
}

impl TestConfig {
    /// One listener on `127.0.0.1:0`.
    pub fn listener(name: &str, kind: &str, options: &str) -> Self {
        Self {
            head: String::new(),
            listeners: Vec::new(),
            watch: false,
            rules: STD_RULES.to_owned(),
        }
        .and(name, kind, options)
    }

    /// Another listener on `127.0.0.1:0`.
    pub fn and(mut self, name: &str, kind: &str, options: &str) -> Self {
        self.listeners
            .push((name.to_owned(), kind.to_owned(), options.to_owned()));
        self
    }

    /// Policy mode `watch`.
    pub fn watch(mut self) -> Self {
        self.watch = true;
        self
    }

    /// These rules (YAML list items, indented four spaces) instead of the
    /// standard ones.
    pub fn rules(mut self, rules: &str) -> Self {
        self.rules = rules.to_owned();
        self
    }

    /// YAML written before the listeners (SmartGroups, WebGroups).
    pub fn head(mut self, yaml: &str) -> Self {
        self.head = yaml.to_owned();
        self
    }

    /// The YAML after `base_config`, every listener on `127.0.0.1:0`.
    pub fn yaml(&self) -> String {
        self.yaml_at(|_| "127.0.0.1:0".to_owned())
    }

    /// The YAML with each listener at the address `address` gives for its
    /// name.
    fn yaml_at(&self, address: impl Fn(&str) -> String) -> String {
        let listeners: String = self
            .listeners
            .iter()
            .map(|(name, kind, options)| {
                let sep = if options.is_empty() { "" } else { ", " };
                format!(
                    "  - {{name: {name}, kind: {kind}, address: \"{}\"{sep}{options}}}\n",
                    address(name)
                )
            })
            .collect();
        let mode = if self.watch { "  mode: watch\n" } else { "" };
        format!(
            "{}listeners:\n{listeners}policy:\n{mode}  rules:\n{}",
            self.head, self.rules
        )
    }

    pub async fn start(&self) -> Sluice {
        Sluice::start(&self.yaml()).await
    }

    /// Starts an upstream and Sluice together.
    pub async fn rig<U: Upstream>(&self) -> Rig<U> {
        Rig::with(&self.yaml()).await
    }
}

/// A test upstream on loopback.
pub trait Upstream: Sized {
    fn start() -> impl std::future::Future<Output = Self>;
    fn addr(&self) -> SocketAddr;
}

impl Upstream for TlsEcho {
    async fn start() -> Self {
        TlsEcho::start().await
    }
    fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Upstream for RawSink {
    async fn start() -> Self {
        RawSink::start().await
    }
    fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Upstream for HttpUpstream {
    async fn start() -> Self {
        HttpUpstream::start().await
    }
    fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// What most data-plane tests start from: an upstream on loopback (a TLS
/// echo unless said otherwise) and Sluice, usually with an `http-proxy`
/// listener named `proxy`.
pub struct Rig<U = TlsEcho> {
    pub up: U,
    pub sluice: Sluice,
}

impl Rig<TlsEcho> {
    /// A TLS echo upstream, and Sluice with one `http-proxy` listener named
    /// `proxy` and the standard rules, enforced.
    pub async fn start() -> Self {
        TestConfig::listener("proxy", "http-proxy", "").rig().await
    }
}

impl<U: Upstream> Rig<U> {
    /// The upstream, and Sluice started with `base_config` and `rest`.
    pub async fn with(rest: &str) -> Self {
        Self::with_upstream(|_| rest.to_owned()).await
    }

    /// The upstream, and Sluice started with `base_config` and what
    /// `rest` makes of the upstream's address.
    pub async fn with_upstream(rest: impl FnOnce(SocketAddr) -> String) -> Self {
        let up = U::start().await;
        let sluice = Sluice::start(&rest(up.addr())).await;
        Self { up, sluice }
    }

    pub fn proxy(&self) -> SocketAddr {
        self.sluice.addr("proxy")
    }

    /// `host` at the upstream's port: what a client names in CONNECT.
    pub fn target(&self, host: &str) -> String {
        format!("{host}:{}", self.up.addr().port())
    }

    /// CONNECTs to `target` through the `proxy` listener.
    pub async fn connect(&self, target: &str) -> (TcpStream, RawResponse) {
        connect_via(self.proxy(), target, "").await
    }

    /// CONNECTs to `target` (answered 200), sends `bytes` through the
    /// tunnel and half-closes.
    pub async fn send_through(&self, target: &str, bytes: &[u8]) -> TcpStream {
        let (mut s, resp) = self.connect(target).await;
        assert_eq!(resp.status, 200, "{resp:?}");
        s.write_all(bytes).await.unwrap();
        s.shutdown().await.unwrap();
        s
    }

    /// The record of the flow that named `target` in CONNECT.
    pub async fn record(&self, target: &str) -> Value {
        self.sluice.wait_record(|r| field(r, "connect_target") == target).await
    }

    pub async fn stop(self) {
        self.sluice.stop().await;
    }
}

impl Rig<TlsEcho> {
    /// Opens a tunnel to `host` at the upstream's port (answered 200) and
    /// completes TLS with the upstream through it, naming `host`.
    pub async fn tunnel(&self, host: &str) -> (TlsStream<TcpStream>, String) {
        let target = self.target(host);
        let (stream, resp) = self.connect(&target).await;
        assert_eq!(resp.status, 200, "{resp:?}");
        (up_connect(&self.up, host, stream).await, target)
    }
}

/// A record's action and reason, to compare as one.
pub fn decided(r: &Value) -> (&str, &str) {
    (action(r), reason(r))
}

/// A private directory for one test's files, removed with the guard.
pub fn scratch_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("sluice-dataplane-").tempdir().unwrap()
}

/// A running Sluice and its audit log.
pub struct Sluice {
    pub server: Server,
    pub audit: PathBuf,
    /// Removed when the test drops or stops this Sluice.
    _dir: tempfile::TempDir,
}

impl Sluice {
    /// Starts Sluice with `base_config` followed by `rest` (listeners,
    /// policy, extra groups).
    pub async fn start(rest: &str) -> Self {
        Self::start_with(rest, None).await
    }

    /// Like [`Sluice::start`], with `hook` changing every listener's plan
    /// (extra filters or chains).
    pub async fn start_with(rest: &str, hook: Option<Arc<sluice::listener::PlanHook>>) -> Self {
        let dir = scratch_dir();
        let audit = dir.path().join("audit.jsonl");
        let yaml = format!("{}{rest}", base_config(&audit));
        let config = sluice_api::config::load_str(&yaml, "test.yaml")
            .unwrap_or_else(|e| panic!("test config does not load: {e}\n{yaml}"));
        let server = Server::start_with(config, None, hook).await.expect("server starts");
        Self {
            server,
            audit,
            _dir: dir,
        }
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.server
            .addr(listener)
            .unwrap_or_else(|| panic!("no listener `{listener}`"))
    }

    /// Every audit record written so far.
    pub fn records(&self) -> Vec<Value> {
        Self::read_records(&self.audit)
    }

    fn read_records(audit: &Path) -> Vec<Value> {
        let Ok(text) = std::fs::read_to_string(audit) else {
            return Vec::new();
        };
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {l}")))
            .collect()
    }

    /// Waits (bounded) until `n` records satisfy `pred`, and returns them.
    /// The writer is asynchronous: a flow's record appears shortly after the
    /// flow ends.
    pub async fn wait_records(&self, n: usize, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut found = Vec::new();
        let done = wait_until(|| {
            found = self.records().into_iter().filter(|r| pred(r)).collect();
            found.len() >= n
        })
        .await;
        assert!(
            done,
            "expected {n} matching audit record(s), found {}; all records:\n{}",
            found.len(),
            self.records()
                .iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        );
        found
    }

    /// Waits for the one record matching `pred`.
    pub async fn wait_record(&self, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_records(1, pred).await.remove(0)
    }

    /// Stops Sluice (the audit log flushed) and returns every record it
    /// wrote, for "exactly one record per flow" checks.
    pub async fn stop_and_records(self, drain: Duration) -> Vec<Value> {
        let Self { server, audit, _dir } = self;
        server.shutdown(drain).await;
        Self::read_records(&audit)
    }

    /// Reloads with `config`, each listener kept at the address it is bound
    /// to (a listener that moved would be rebound).
    pub async fn reload(&self, config: &TestConfig) {
        let yaml = format!(
            "{}{}",
            base_config(&self.audit),
            config.yaml_at(|name| self.addr(name).to_string())
        );
        let config = sluice_api::config::load_str(&yaml, "reload.yaml")
            .unwrap_or_else(|e| panic!("reload config does not load: {e}\n{yaml}"));
        self.server.reload(config).await.expect("the reload is accepted");
    }

    /// Stops Sluice (flushing the audit log) and removes its files.
    pub async fn stop(self) {
        self.server.shutdown(Duration::from_millis(200)).await;
    }
}

/// `record.verdict.reason`.
pub fn reason(r: &Value) -> &str {
    r["verdict"]["reason"].as_str().unwrap_or("")
}

/// `record.verdict.action`.
pub fn action(r: &Value) -> &str {
    r["verdict"]["action"].as_str().unwrap_or("")
}

/// `record.verdict.rule`.
pub fn rule(r: &Value) -> &str {
    r["verdict"]["rule"].as_str().unwrap_or("")
}

/// `record.<field>` as a string.
pub fn field<'a>(r: &'a Value, f: &str) -> &'a str {
    r[f].as_str().unwrap_or("")
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// One self-signed certificate for `names`, made now, and a client config
/// that trusts exactly it.
pub struct TestPki {
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
}

impl TestPki {
    pub fn new(names: &[&str]) -> Self {
        let ck = rcgen::generate_simple_self_signed(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
            .expect("rcgen certificate");
        let cert: CertificateDer<'static> = ck.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let mut client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Self {
            server: Arc::new(server),
            client: Arc::new(client),
        }
    }

    /// TLS handshake as a client over `io`, naming `sni`.
    pub async fn connect<IO>(&self, sni: &str, io: IO) -> std::io::Result<tokio_rustls::client::TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let name = ServerName::try_from(sni.to_owned()).expect("valid server name");
        tokio_rustls::TlsConnector::from(self.client.clone())
            .connect(name, io)
            .await
    }
}

/// A TLS server that echoes every byte back, counting accepted TCP
/// connections and completed handshakes.
pub struct TlsEcho {
    pub addr: SocketAddr,
    pub pki: Arc<TestPki>,
    pub accepts: Arc<AtomicUsize>,
    pub handshakes: Arc<AtomicUsize>,
}

/// Names the test certificate covers.
pub const CERT_NAMES: &[&str] = &[
    "allowed.test",
    "evil.test",
    "denied.test",
    "metadata.test",
    "mixed.test",
    "mapped.test",
];

impl TlsEcho {
    pub async fn start() -> Self {
        let pki = Arc::new(TestPki::new(CERT_NAMES));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let handshakes = Arc::new(AtomicUsize::new(0));
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server.clone());
        let (a, h) = (accepts.clone(), handshakes.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                let h = h.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else { return };
                    h.fetch_add(1, Ordering::SeqCst);
                    let (mut r, mut w) = tokio::io::split(tls);
                    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                        let _ = w.shutdown().await;
                    }
                });
            }
        });
        Self {
            addr,
            pki,
            accepts,
            handshakes,
        }
    }

    pub fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }
}

/// A TCP server that records everything each connection sends until EOF,
/// reports it on a channel, then answers `got N` and closes.
pub struct RawSink {
    pub addr: SocketAddr,
    pub accepts: Arc<AtomicUsize>,
    received: tokio::sync::Mutex<mpsc::UnboundedReceiver<Vec<u8>>>,
}

impl RawSink {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::unbounded_channel();
        let a = accepts.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let _ = stream.read_to_end(&mut got).await;
                    // Answer after the client's half-close, to show it was
                    // relayed as a half-close and not a full one.
                    let _ = stream.write_all(format!("got {}", got.len()).as_bytes()).await;
                    let _ = stream.shutdown().await;
                    let _ = tx.send(got);
                });
            }
        });
        Self {
            addr,
            accepts,
            received: tokio::sync::Mutex::new(rx),
        }
    }

    pub fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }

    /// The bytes of the next connection to finish.
    pub async fn next_received(&self) -> Vec<u8> {
        let mut rx = self.received.lock().await;
        within("the upstream to receive a connection's bytes", rx.recv())
            .await
            .expect("sink task alive")
    }
}

/// `n` bytes that are not all alike, for bodies that must arrive intact.
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| b'a' + (i % 23) as u8).collect()
}

/// FNV-1a, to compare a large body with what arrived.
pub fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A plain HTTP/1.1 server answering `upstream saw METHOD TARGET host=HOST`,
/// with the request's header names in `x-upstream-headers` and its body
/// length in `x-upstream-body-len` and FNV-1a in `x-upstream-body-sum`; a
/// request with `x-reply-bytes: N` is answered N bytes of [`pattern`]
/// instead.
pub struct HttpUpstream {
    pub addr: SocketAddr,
    pub accepts: Arc<AtomicUsize>,
}

impl HttpUpstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let a = accepts.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let host = req
                            .headers()
                            .get(hyper::header::HOST)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_owned();
                        let names: Vec<String> = req.headers().keys().map(|k| k.as_str().to_owned()).collect();
                        let mut text = format!("upstream saw {} {} host={host}", req.method(), req.uri());
                        // What an HTTP plugin added, when it did.
                        if let Some(v) = req.headers().get("x-added").and_then(|v| v.to_str().ok()) {
                            text.push_str(&format!(" x-added={v}"));
                        }
                        let echo = req.headers().contains_key("x-echo-body");
                        let reply_bytes = req
                            .headers()
                            .get("x-reply-bytes")
                            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let received = body.len();
                        // What an HTTP plugin made of the body, when asked.
                        if echo {
                            text.push_str(&format!(" body={}", String::from_utf8_lossy(&body)));
                        }
                        let reply = match reply_bytes {
                            Some(n) => Bytes::from(pattern(n)),
                            None => Bytes::from(text),
                        };
                        let mut resp = Response::new(Full::new(reply));
                        let h = resp.headers_mut();
                        h.insert("x-upstream-headers", names.join(",").parse().unwrap());
                        h.insert("x-upstream-body-len", received.into());
                        h.insert("x-upstream-body-sum", fnv1a(&body).into());
                        Ok::<_, Infallible>(resp)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self { addr, accepts }
    }

    pub fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }
}

/// An HTTP response read off a raw socket.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn parse_head(head: &[u8]) -> Self {
        let text = String::from_utf8_lossy(head);
        let mut lines = text.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP status line: {status_line:?}"));
        let headers = lines
            .filter(|l| !l.is_empty())
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        Self {
            status,
            headers,
            body: String::new(),
        }
    }
}

/// Reads a response head one byte at a time, so no tunnel byte after it is
/// consumed.
pub async fn read_head(stream: &mut TcpStream) -> RawResponse {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        let n = within("a response head", stream.read(&mut b))
            .await
            .expect("reading the response head");
        assert!(
            n == 1,
            "connection closed before the response head ended: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    RawResponse::parse_head(&head)
}

/// Sends `CONNECT target` (with `extra` header lines, each ending in CRLF)
/// and reads the answer's head. A non-200 answer's body is read to EOF.
pub async fn connect_via(proxy: SocketAddr, target: &str, extra: &str) -> (TcpStream, RawResponse) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{extra}\r\n").as_bytes())
        .await
        .unwrap();
    let mut resp = read_head(&mut s).await;
    if resp.status != 200 {
        let mut body = Vec::new();
        let _ = within("the refusal's body", s.read_to_end(&mut body)).await;
        resp.body = String::from_utf8_lossy(&body).into_owned();
    }
    (s, resp)
}

/// Waits until the peer closes `stream` (EOF or reset), discarding data.
/// Returns how many bytes arrived before the close.
pub async fn wait_closed<S: AsyncRead + Unpin>(stream: &mut S) -> usize {
    let mut total = 0;
    let mut buf = [0u8; 4096];
    loop {
        match within("the connection to be closed", stream.read(&mut buf)).await {
            Ok(0) | Err(_) => return total,
            Ok(n) => total += n,
        }
    }
}

/// A deterministic, non-periodic payload.
pub fn payload(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// Sends `data` through an echoing TLS stream while reading the echo, then
/// closes cleanly. Panics unless every byte comes back unchanged.
pub async fn echo_round_trip(tls: TlsStream<TcpStream>, data: &[u8]) {
    let (mut r, mut w) = tokio::io::split(tls);
    let out = data.to_vec();
    let writer = tokio::spawn(async move {
        w.write_all(&out).await.unwrap();
        w.flush().await.unwrap();
        w
    });
    let mut back = vec![0u8; data.len()];
    within("the echoed payload", r.read_exact(&mut back))
        .await
        .expect("reading the echo");
    assert!(back == data, "the echoed payload differs from what was sent");
    let mut w = writer.await.unwrap();
    w.shutdown().await.unwrap();
    let mut rest = Vec::new();
    let _ = within("the upstream's close", r.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "unexpected bytes after the echo");
}

/// A ClientHello test vector from `tests/data/clienthello/`.
pub fn vector(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/clienthello")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The first flight a rustls client writes for `server_name` (ALPN h2 and
/// http/1.1), made now: a real ClientHello naming any test host.
pub fn rustls_hello(server_name: &str) -> Vec<u8> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

/// `hello` with its first record's content type changed to
/// application_data (23): a ClientHello hidden from a classifier that looks
/// only at handshake records.
pub fn as_application_data(mut hello: Vec<u8>) -> Vec<u8> {
    hello[0] = 23;
    hello
}

/// A TLS session to `up` through `stream` (a tunnel already open), naming
/// `sni`.
pub async fn up_connect(up: &TlsEcho, sni: &str, stream: TcpStream) -> TlsStream<TcpStream> {
    within("the TLS handshake", up.pki.connect(sni, stream))
        .await
        .expect("TLS handshake through Sluice")
}

/// Sends `msg` over an echoing session and checks it comes back.
pub async fn echo(open: &mut TlsStream<TcpStream>, msg: &[u8]) {
    open.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    within("the echo", open.read_exact(&mut back)).await.unwrap();
    assert_eq!(back, msg);
}

/// An authorisation service on loopback, for `http-auth` and the test
/// guest's call outs: `GET /check` answers `200` with `alice` for
/// `x-api-key: good` and `403` otherwise; `GET /denylist` lists
/// `curl.example.test`. Counts the checks.
pub async fn auth_service() -> (SocketAddr, Arc<AtomicUsize>) {
    auth_service_with(None).await
}

/// A CA (its PEM) and, for `names`, a server's TLS settings with a
/// certificate it signed; made at test time.
pub fn test_pki(names: &[&str]) -> (String, Arc<rustls::ServerConfig>) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "sluice test CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap()).unwrap();
    let mut params = rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    (ca.pem(), Arc::new(server))
}

/// [`auth_service`], over TLS with `tls` when given.
pub async fn auth_service_with(tls: Option<Arc<rustls::ServerConfig>>) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let checks = Arc::new(AtomicUsize::new(0));
    let counted = checks.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counted = counted.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let counted = counted.clone();
                    async move {
                        let (status, body) = match req.uri().path() {
                            "/check" => {
                                counted.fetch_add(1, Ordering::SeqCst);
                                if req.headers().get("x-api-key").is_some_and(|k| k == "good") {
                                    (200, "alice")
                                } else {
                                    (403, "no")
                                }
                            }
                            "/denylist" => (200, "curl.example.test\n"),
                            _ => (404, ""),
                        };
                        let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                        *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                        Ok::<_, Infallible>(resp)
                    }
                });
                let http = hyper::server::conn::http1::Builder::new();
                match tls {
                    None => {
                        let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                    }
                    Some(tls) => {
                        if let Ok(stream) = tokio_rustls::TlsAcceptor::from(tls).accept(stream).await {
                            let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                }
            });
        }
    });
    (addr, checks)
}

/// Asks `server` for the A record of `name` over UDP; the answer's rcode.
pub async fn ask(server: SocketAddr, name: &str) -> hickory_proto::op::ResponseCode {
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RecordType};
    let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&m.to_vec().unwrap(), server).await.unwrap();
    let mut buf = [0u8; 1500];
    let (n, _) = within("the DNS answer", sock.recv_from(&mut buf)).await.unwrap();
    Message::from_vec(&buf[..n]).unwrap().metadata.response_code
}
