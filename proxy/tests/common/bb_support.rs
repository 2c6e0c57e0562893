//! Harness for the black-box tests: runs the built `sluice` binary (and
//! `curl`, and helpers) as child processes, reads the bound ports back from
//! their output, and makes TLS material with rcgen. Every child is owned by
//! a [`Proc`] that kills it by PID when dropped, so a failed assertion
//! leaves nothing running; every wait has a deadline.
//!
//! Named `bb_*` and included with `#[path]` so it never clashes with other
//! test files' `common/` modules.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

/// A private directory under the system temp dir, removed when dropped.
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        Self(
            tempfile::Builder::new()
                .prefix(&format!("sluice-bb-{tag}-"))
                .tempdir()
                .unwrap(),
        )
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

/// The lines a child writes to one of its pipes, collected by a thread;
/// `closed` turns true at end of file.
#[derive(Clone, Default)]
pub struct Lines(Arc<(Mutex<Vec<String>>, Condvar)>, Arc<AtomicBool>);

impl Lines {
    fn collect(r: impl Read + Send + 'static) -> Self {
        let lines = Self::default();
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines() {
                let Ok(line) = line else { break };
                let (m, cv) = &*l.0;
                m.lock().unwrap().push(line);
                cv.notify_all();
            }
            let _g = l.0.0.lock().unwrap();
            l.1.store(true, Ordering::SeqCst);
            l.0.1.notify_all();
        });
        lines
    }

    /// Waits until the writer closed the pipe (so every line is in),
    /// up to `timeout`.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.0;
        let mut g = m.lock().unwrap();
        while !self.1.load(Ordering::SeqCst) {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            g = cv.wait_timeout(g, deadline - now).unwrap().0;
        }
        true
    }

    /// The first line (already written or still to come) for which `pred`
    /// holds, or `None` after `timeout`.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.0;
        let mut g = m.lock().unwrap();
        loop {
            if let Some(l) = g.iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            g = cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    pub fn count(&self, pred: impl Fn(&str) -> bool) -> usize {
        self.0.0.lock().unwrap().iter().filter(|l| pred(l)).count()
    }

    pub fn text(&self) -> String {
        self.0.0.lock().unwrap().join("\n")
    }
}

/// A child process that is killed (by its PID, via `Child::kill`) when
/// dropped, unless it has already exited.
pub struct Proc {
    what: String,
    child: Child,
    exited: Option<ExitStatus>,
    pub stdout: Lines,
    pub stderr: Lines,
}

impl Proc {
    pub fn spawn(what: &str, mut cmd: Command) -> Self {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stdout = Lines::collect(child.stdout.take().unwrap());
        let stderr = Lines::collect(child.stderr.take().unwrap());
        Self {
            what: what.to_owned(),
            child,
            exited: None,
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` (`TERM`, `HUP`, …) to this process only.
    pub fn signal(&self, sig: &str) {
        // The shell's builtin `kill`: no procps needed on a minimal image.
        let st = Command::new("sh")
            .args(["-c", &format!("kill -{sig} {}", self.pid())])
            .status()
            .unwrap();
        assert!(st.success(), "kill -{sig} {} ({}) failed", self.pid(), self.what);
    }

    /// The exit status, waiting up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exited {
                return Some(s);
            }
            if let Some(s) = self.child.try_wait().unwrap() {
                self.exited = Some(s);
                // Let the reader threads take in the last lines.
                self.stdout.wait_closed(Duration::from_secs(2));
                self.stderr.wait_closed(Duration::from_secs(2));
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the process wrote, for failure messages.
    pub fn output(&self) -> String {
        format!(
            "--- {} stdout\n{}\n--- {} stderr\n{}",
            self.what,
            self.stdout.text(),
            self.what,
            self.stderr.text()
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited.is_none() && self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A running `sluice run`, with the addresses it printed.
pub struct Sluice {
    pub proc: Proc,
    pub listeners: BTreeMap<String, SocketAddr>,
    pub admin: SocketAddr,
}

impl Sluice {
    /// `sluice run -c config`.
    pub fn run(config: &Path) -> Self {
        let mut cmd = Command::new(SLUICE);
        cmd.arg("run").arg("-c").arg(config);
        Self::start(cmd)
    }

    /// Starts `cmd` (a `sluice run`, possibly wrapped in `ip netns exec`)
    /// and waits for its admin line, which comes after every listener line.
    pub fn start(mut cmd: Command) -> Self {
        cmd.env("RUST_LOG", "info");
        let mut proc = Proc::spawn("sluice", cmd);
        let admin_line = proc.stderr.wait_for(Duration::from_secs(20), |l| {
            l.starts_with("sluice: admin API on http://")
        });
        let Some(admin_line) = admin_line else {
            let st = proc.wait_exit(Duration::from_millis(100));
            panic!(
                "sluice did not report its admin address within 20 s (exit: {st:?})\n{}",
                proc.output()
            );
        };
        // `sluice run` installs its signal handlers only after printing
        // `sluice: running …` (see the ignored BUG test
        // `signal_right_after_startup_is_handled`); a signal before that
        // kills it. Wait for that line and a little more before any test
        // signals it.
        let running = proc
            .stderr
            .wait_for(Duration::from_secs(5), |l| l.starts_with("sluice: running "));
        assert!(running.is_some(), "no `sluice: running` line:\n{}", proc.output());
        std::thread::sleep(Duration::from_millis(100));
        let admin = admin_line
            .trim_start_matches("sluice: admin API on http://")
            .trim()
            .parse()
            .unwrap();
        let mut listeners = BTreeMap::new();
        for l in proc.stderr.text().lines() {
            // `sluice: listening: NAME (KIND) on ADDR`
            if let Some(rest) = l.strip_prefix("sluice: listening: ") {
                let (name, rest) = rest.split_once(" (").unwrap();
                let (_, addr) = rest.rsplit_once(" on ").unwrap();
                listeners.insert(name.to_owned(), addr.trim().parse().unwrap());
            }
        }
        Self { proc, listeners, admin }
    }

    pub fn addr(&self, name: &str) -> SocketAddr {
        *self
            .listeners
            .get(name)
            .unwrap_or_else(|| panic!("no listener `{name}` reported:\n{}", self.proc.output()))
    }

    pub fn port(&self, name: &str) -> u16 {
        self.addr(name).port()
    }
}

/// What one `curl` run printed and how it ended.
#[derive(Debug)]
pub struct CurlOut {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CurlOut {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

/// Runs the real `curl -sS --max-time 10 ARGS`, optionally wrapped
/// (`["ip", "netns", "exec", NS]`), with every proxy variable removed from
/// its environment so only `--proxy` counts.
pub fn curl(wrap: &[&str], args: &[&str]) -> CurlOut {
    let mut cmd = match wrap.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg("curl");
            c
        }
        None => Command::new("curl"),
    };
    cmd.args(["-sS", "--max-time", "10"]).args(args);
    for v in [
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "NO_PROXY",
    ] {
        cmd.env_remove(v);
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run curl: {e} (apt-get install -y curl; scripts/test does it)"));
    CurlOut {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Reads the audit file until it holds at least `n` records (JSON lines),
/// waiting up to `timeout`; returns what it holds then.
pub fn audit_records(path: &Path, n: usize, timeout: Duration) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let recs: Vec<serde_json::Value> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {l}")))
            .collect();
        if recs.len() >= n || Instant::now() >= deadline {
            return recs;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// The single record for which `pred` holds.
pub fn one_record<'a>(
    recs: &'a [serde_json::Value],
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> &'a serde_json::Value {
    let m: Vec<_> = recs.iter().filter(|r| pred(r)).collect();
    assert_eq!(
        m.len(),
        1,
        "expected exactly one audit record for {what}, got {m:#?}\nall: {recs:#?}"
    );
    m[0]
}

/// A test CA and a server certificate for `names`, as rustls configs and
/// as PEM files (`ca.pem`, `server.pem`, `server.key`) in `dir`.
pub struct Pki {
    pub ca_pem: PathBuf,
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Pki {
    pub fn new(dir: &TempDir, names: &[&str]) -> Self {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "sluice black-box test CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();

        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, "upstream");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();

        let ca_pem = dir.write("ca.pem", &ca.pem());
        let cert_pem = dir.write("server.pem", &cert.pem());
        let key_pem = dir.write("server.key", &key.serialize_pem());

        let chain = vec![cert.der().clone(), ca.der().clone()];
        let server = Self::server_config(chain, PrivateKeyDer::Pkcs8(key.serialize_der().into()));
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        Self {
            ca_pem,
            cert_pem,
            key_pem,
            server,
            client: Arc::new(client),
        }
    }

    pub fn server_config(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Arc<rustls::ServerConfig> {
        Arc::new(
            rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .unwrap(),
        )
    }
}

/// The body every upstream answers an HTTP request with.
pub const UPSTREAM_BODY: &str = "hello from the upstream\n";

/// Serves one accepted stream: an HTTP request gets a `200` with
/// [`UPSTREAM_BODY`] and the connection is closed; anything else is echoed
/// until the client closes.
pub async fn serve_stream<S>(mut s: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    let mut first = true;
    loop {
        let n = match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        if first && (chunk.starts_with(b"GET ") || chunk.starts_with(b"HEAD ")) {
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{UPSTREAM_BODY}",
                UPSTREAM_BODY.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
            break;
        }
        first = false;
        if s.write_all(chunk).await.is_err() {
            break;
        }
    }
}

/// An in-process upstream on 127.0.0.1:0: TLS when `tls` is given, plain
/// TCP otherwise. `hits` counts accepted connections (TLS: completed
/// handshakes).
pub struct Upstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start(tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        Self::start_on("127.0.0.1:0", tls).await
    }

    pub async fn start_on(bind: &str, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let l = tokio::net::TcpListener::bind(bind).await.unwrap();
        let addr = l.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { continue };
                let h = h.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    match acceptor {
                        Some(a) => {
                            if let Ok(t) = a.accept(s).await {
                                h.fetch_add(1, Ordering::SeqCst);
                                serve_stream(t).await;
                            }
                        }
                        None => {
                            h.fetch_add(1, Ordering::SeqCst);
                            serve_stream(s).await;
                        }
                    }
                });
            }
        });
        Self { addr, hits, task }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The first flight a rustls client writes for `name` (a real ClientHello).
pub fn rustls_hello(name: &str) -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}
