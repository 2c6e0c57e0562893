//! A fleet on loopback for tests and the propagation benchmark: a real
//! etcd (Debian's `etcd-server`, or `$SLUICE_ETCD`), `sluice-xds`
//! replicas serving it, and `sluice` gateways taking their policy from
//! them, each a process started here and stopped by its PID.
#![allow(dead_code, reason = "each user takes what it needs")]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long any one wait may take.
pub const WAIT: Duration = Duration::from_secs(20);

/// A free port on loopback (bound, then released for the child to take).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `GET path` on loopback: the status code and body, or None when nothing
/// answers.
pub fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split(' ').nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

/// Polls `f` every 20 ms until it gives `Some`, for at most `WAIT`.
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn etcd_binary() -> PathBuf {
    let bin = std::env::var_os("SLUICE_ETCD").map_or_else(|| PathBuf::from("/usr/bin/etcd"), PathBuf::from);
    assert!(
        bin.exists(),
        "{} not found: these tests need a real etcd (scripts/test installs Debian's etcd-server; or set SLUICE_ETCD)",
        bin.display()
    );
    bin
}

/// One etcd member on loopback, its data in a temporary directory.
pub struct Etcd {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub client: SocketAddr,
    peer: SocketAddr,
    /// With TLS: the files of a test PKI (`ca.pem`, `server.pem`,
    /// `server.key`, `client.pem`, `client.key`), and client certificates
    /// required.
    pub tls: Option<PathBuf>,
}

impl Etcd {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// An etcd that speaks only TLS and requires a client certificate; the
    /// PKI is made here.
    pub fn start_tls() -> Self {
        let dir = tempfile::tempdir().unwrap().keep();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = params.self_signed(&key).unwrap();
        let issuer = rcgen::Issuer::new(params, key);
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        for (name, sans) in [
            ("server", vec!["127.0.0.1".to_owned()]),
            ("client", vec!["sluice-xds".to_owned()]),
        ] {
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(sans)
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
        }
        Self::start_with(Some(dir))
    }

    fn start_with(tls: Option<PathBuf>) -> Self {
        let mut e = Self {
            child: None,
            dir: tempfile::tempdir().unwrap(),
            client: SocketAddr::from(([127, 0, 0, 1], free_port())),
            peer: SocketAddr::from(([127, 0, 0, 1], free_port())),
            tls,
        };
        e.run();
        e
    }

    /// The `sluice-xds` flags that reach this etcd over TLS.
    pub fn tls_args(&self) -> Vec<String> {
        let Some(d) = &self.tls else { return Vec::new() };
        let f = |n: &str| d.join(n).display().to_string();
        vec![
            "--store-ca".into(),
            f("ca.pem"),
            "--store-cert".into(),
            f("client.pem"),
            "--store-key".into(),
            f("client.key"),
        ]
    }

    fn run(&mut self) {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://{}", self.client);
        let peer = format!("http://{}", self.peer);
        let log = std::fs::File::create(self.dir.path().join("etcd.log")).unwrap();
        let mut cmd = Command::new(etcd_binary());
        if let Some(d) = &self.tls {
            cmd.arg("--cert-file")
                .arg(d.join("server.pem"))
                .arg("--key-file")
                .arg(d.join("server.key"))
                .arg("--trusted-ca-file")
                .arg(d.join("ca.pem"))
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", "t0", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args([
                "--initial-cluster",
                &format!("t0={peer}"),
                "--initial-cluster-state",
                "new",
            ])
            .args([
                "--initial-cluster-token",
                "sluice-test",
                "--logger=zap",
                "--log-level=warn",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let log = self.dir.path().join("etcd.log");
        wait_for("etcd to answer /health", || {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!(
                    "etcd exited ({status}):\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if self.tls.is_some() {
                let mut args = vec!["get".to_owned(), "--store".to_owned(), self.url("health")];
                args.extend(self.tls_args());
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                return xds(&args).0.then_some(());
            }
            get(self.client, "/health")
                .filter(|(c, b)| *c == 200 && b.contains("true"))
                .map(|_| ())
        });
    }

    /// `etcd://ADDR/PREFIX` (`etcds://` with TLS).
    pub fn url(&self, prefix: &str) -> String {
        let scheme = if self.tls.is_some() { "etcds" } else { "etcd" };
        format!("{scheme}://{}/{prefix}", self.client)
    }

    /// Stops it by PID (SIGKILL: as a crash would).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports and data.
    pub fn restart(&mut self) {
        self.stop();
        self.run();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        if let Some(d) = &self.tls {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// The `sluice-xds` binary (this package's).
pub fn xds_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sluice-xds"))
}

/// The gateway binary, built beside `sluice-xds` by `cargo test
/// --workspace` (or `cargo build -p sluice`).
pub fn gateway_binary() -> PathBuf {
    let bin = xds_binary().with_file_name("sluice");
    assert!(
        bin.exists(),
        "{} not found: build the gateway first (`cargo build -p sluice`; `cargo test --workspace` does)",
        bin.display()
    );
    bin
}

/// Runs a `sluice-xds` command to its end: (success, stdout, stderr).
pub fn xds(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(xds_binary()).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A process whose stderr lines are read until the addresses it prints,
/// then drained in the background so it never blocks on a full pipe.
pub struct Process {
    child: Child,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Process {
    fn start(mut cmd: Command, wanted: &[&str]) -> (Self, Vec<String>) {
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut found: Vec<Option<String>> = vec![None; wanted.len()];
        let mut seen = Vec::new();
        while found.iter().any(Option::is_none) {
            let Some(Ok(line)) = lines.next() else {
                let _ = child.kill();
                panic!("{cmd:?} exited before saying {wanted:?}:\n{}", seen.join("\n"));
            };
            for (i, w) in wanted.iter().enumerate() {
                if let Some(rest) = line.split(w).nth(1) {
                    found[i] = Some(rest.trim().to_owned());
                }
            }
            seen.push(line);
        }
        let log = std::sync::Arc::new(std::sync::Mutex::new(seen));
        let sink = log.clone();
        std::thread::spawn(move || {
            for l in lines.map_while(Result::ok) {
                sink.lock().unwrap().push(l);
            }
        });
        (Self { child, log }, found.into_iter().map(Option::unwrap).collect())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL by PID.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `sluice-xds serve --store` replica.
pub struct Replica {
    pub process: Process,
    pub ads: SocketAddr,
    pub admin: SocketAddr,
}

impl Replica {
    pub fn start(store: &str) -> Self {
        Self::start_with(store, &[])
    }

    pub fn start_with(store: &str, extra: &[String]) -> Self {
        let mut cmd = Command::new(xds_binary());
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--store",
            store,
        ]);
        cmd.args(extra);
        let (process, found) = Process::start(cmd, &["admin API on http://", " over ADS on "]);
        Self {
            process,
            admin: found[0].parse().unwrap(),
            ads: found[1].parse().unwrap(),
        }
    }

    /// `/ready`: (status, body).
    pub fn ready(&self) -> (u16, String) {
        get(self.admin, "/ready").unwrap_or((0, "no answer".into()))
    }

    /// Every resource served and its version, per policy.
    pub fn resources(&self) -> String {
        get(self.admin, "/resources").unwrap().1
    }
}

/// A gateway taking its policy from `servers` (in that order of
/// preference), with an explicit-proxy listener.
pub struct Gateway {
    pub process: Process,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Gateway {
    pub fn start(id: &str, servers: &[SocketAddr], protocol: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let servers: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
        let config = format!(
            "admin: {{address: \"127.0.0.1:0\"}}
audit: {{destination: \"{audit}\"}}
listeners:
  - {{name: proxy, kind: http-proxy, address: \"127.0.0.1:0\"}}
resolver:
  nameservers: [\"127.0.0.1:9\"]
xds:
  servers: [{servers}]
  node: {{id: {id}, cluster: test}}
  protocol: {protocol}
policy:
  default: deny
",
            audit = dir.path().join("audit.jsonl").display(),
            servers = servers.join(", ")
        );
        let path = dir.path().join("gateway.yaml");
        std::fs::write(&path, config).unwrap();
        let mut cmd = Command::new(gateway_binary());
        cmd.arg("run").arg("-c").arg(&path);
        let (process, found) = Process::start(cmd, &["sluice: admin API on http://"]);
        Self {
            process,
            admin: found[0].parse().unwrap(),
            dir,
        }
    }

    /// The action the gateway's policy takes now for a TLS flow from
    /// `src` to `sni`.
    pub fn verdict(&self, src: &str, sni: &str) -> Option<String> {
        let (code, body) = get(self.admin, &format!("/explain?src={src}&sni={sni}"))?;
        if code != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v.get("action").and_then(|a| a.as_str()).map(str::to_owned)
    }

    /// The gateway's xDS client state (`/xds`).
    pub fn xds(&self) -> serde_json::Value {
        serde_json::from_str(&get(self.admin, "/xds").unwrap().1).unwrap()
    }
}

/// Writes the files of a configuration directory: `sites` (a WebGroup of
/// `domains`) which `agents` (10.20.0.0/16) may reach over TLS.
pub fn write_config(dir: &Path, domains: &[&str]) {
    std::fs::write(
        dir.join("groups.yaml"),
        format!(
            "webgroups:\n  - name: sites\n    domains: [{}]\nsmartgroups:\n  - name: agents\n    cidrs: [10.20.0.0/16]\n",
            domains.join(", ")
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("policy.yaml"),
        "policy:\n  mode: enforce\n  default: deny\n  rules:\n    - name: sites\n      from: [agents]\n      to: {webgroups: [sites]}\n      protocols: [tls]\n      action: allow\n",
    )
    .unwrap();
}
