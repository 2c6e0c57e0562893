#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]
//! A proxyless gRPC client (grpcio from PyPI: the xDS client of gRPC's C
//! core) configured by `sluice-xds` from plain Envoy resources: a Listener
//! whose API listener's HTTP connection manager takes its routes over ADS,
//! the RouteConfiguration, an EDS Cluster and a ClusterLoadAssignment with
//! two weighted localities, each a real gRPC server on loopback.
//!
//! The client dials `xds:///greeter` and its calls reach both backends in
//! the localities' proportion; `/nodes` shows the client's stream with
//! LDS, RDS, CDS and EDS ACKed, each holding only the resource it named
//! (the directory has others); an edit of the endpoints reaches the
//! running client, whose next calls go to the one backend left; a file
//! with an unknown field is refused with its name and line (`/config`)
//! and changes nothing served.
//!
//! The test needs Python with grpcio: `scripts/test` installs it into
//! `target/grpc-venv`. Without it the test fails under `CI=true` and says
//! so otherwise.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long anything may take before the test gives up.
const WAIT: Duration = Duration::from_secs(60);

/// Two gRPC servers on 127.0.0.1:0, one per tag, answering
/// `/sluice.test.Greeter/Hello` with their tag; prints their ports. No
/// generated code: a generic handler on raw bytes.
const BACKEND: &str = r#"
import sys
from concurrent import futures
import grpc

servers, ports = [], []
for tag in sys.argv[1:]:
    def hello(request, context, tag=tag):
        return tag.encode()
    s = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    s.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "sluice.test.Greeter", {"Hello": grpc.unary_unary_rpc_method_handler(hello)}),))
    ports.append(str(s.add_insecure_port("127.0.0.1:0")))
    s.start()
    servers.append(s)
print("ports", " ".join(ports), flush=True)
servers[0].wait_for_termination()
"#;

/// A client of `xds:///<target>`, driven line by line: `call N` makes N
/// calls and prints how many each backend answered, as JSON.
const CLIENT: &str = r#"
import collections, json, sys
import grpc

with grpc.insecure_channel("xds:///" + sys.argv[1]) as channel:
    hello = channel.unary_unary("/sluice.test.Greeter/Hello")
    first = True
    for line in sys.stdin:
        words = line.split()
        if words[:1] != ["call"]:
            break
        seen = collections.Counter()
        for _ in range(int(words[1])):
            seen[hello(b"", timeout=30, wait_for_ready=first).decode()] += 1
            first = False
        print(json.dumps(seen), flush=True)
"#;

/// The Python of the venv `scripts/test` makes, if grpcio is in it.
fn python() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/grpc-venv/bin/python");
    let works = Command::new(&p)
        .args(["-c", "import grpc"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    works.then_some(p)
}

/// A child process, killed (by its PID) and reaped when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lines of a child's output, read on a thread of their own (a full pipe
/// would stall the child), kept for messages and handed over one by one.
struct Lines {
    rx: Receiver<String>,
    all: Arc<Mutex<String>>,
}

impl Lines {
    fn of(r: impl Read + Send + 'static) -> Lines {
        let (tx, rx) = channel();
        let all = Arc::new(Mutex::new(String::new()));
        let keep = all.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(r).lines().map_while(Result::ok) {
                {
                    let mut a = keep.lock().unwrap();
                    a.push_str(&line);
                    a.push('\n');
                }
                let _ = tx.send(line);
            }
        });
        Lines { rx, all }
    }

    /// The next line for which `f` gives something, within [`WAIT`].
    fn find<T>(&self, what: &str, mut f: impl FnMut(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(t) = f(&line) {
                        return t;
                    }
                }
                Err(_) => panic!("{what}: not within {WAIT:?}; output:\n{}", self.text()),
            }
        }
    }

    fn text(&self) -> String {
        self.all.lock().unwrap().clone()
    }
}

/// `sluice-xds serve` on a directory.
struct Server {
    _proc: Proc,
    ads: SocketAddr,
    admin: SocketAddr,
    log: Lines,
}

impl Server {
    fn start(dir: &Path) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice-xds"))
            .arg("serve")
            .arg("--config-dir")
            .arg(dir)
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(["--watch-interval", "100ms"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sluice-xds");
        let log = Lines::of(child.stderr.take().unwrap());
        let proc = Proc(child);
        let admin = log.find("the admin address", |l| {
            l.split_once("admin API on http://")?.1.trim().parse().ok()
        });
        let ads = log.find("the ADS address", |l| {
            l.split_once(" over ADS on ")?.1.trim().parse().ok()
        });
        Server {
            _proc: proc,
            ads,
            admin,
            log,
        }
    }

    /// A JSON document of the admin API.
    fn get(&self, path: &str) -> serde_json::Value {
        let mut s = TcpStream::connect(self.admin).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes())
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {e}: {text}"))
    }

    /// The admin API's `/nodes`.
    fn nodes(&self) -> serde_json::Value {
        self.get("/nodes")
    }

    /// The `/nodes` entry of `node`, once there is one.
    fn node(&self, node: &str) -> serde_json::Value {
        self.nodes()
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node"] == node)
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    }

    /// Waits until `cond` holds for `node`'s `/nodes` entry.
    fn until(&self, what: &str, node: &str, cond: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let n = self.node(node);
            if cond(&n) {
                return n;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {WAIT:?}\n{n:#}\n--- sluice-xds ---\n{}",
                self.log.text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The client, with its stdin to drive it and its answers.
struct Client {
    stdin: ChildStdin,
    out: Lines,
    _proc: Proc,
    stderr: PathBuf,
}

impl Client {
    /// Makes `n` calls; how many each backend answered.
    fn call(&mut self, n: usize) -> serde_json::Map<String, serde_json::Value> {
        writeln!(self.stdin, "call {n}").unwrap();
        self.stdin.flush().unwrap();
        let stderr = &self.stderr;
        self.out
            .find("the answers", |l| match serde_json::from_str::<serde_json::Value>(l) {
                Ok(serde_json::Value::Object(m)) => Some(m),
                _ => {
                    eprintln!("client: {l}\n{}", std::fs::read_to_string(stderr).unwrap_or_default());
                    None
                }
            })
    }
}

/// The directory's plain Envoy resources: what `xds:///greeter` needs,
/// with `endpoints` as the ClusterLoadAssignment's localities, and a
/// listener and a cluster no gRPC client asks for.
fn resources(endpoints: &[(&str, u32, u16)]) -> String {
    let mut localities = String::new();
    for (zone, weight, port) in endpoints {
        localities.push_str(&format!(
            "- locality: {{zone: {zone}}}
  load_balancing_weight: {weight}
  lb_endpoints:
  - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}
"
        ));
    }
    format!(
        r#""@type": type.googleapis.com/envoy.config.listener.v3.Listener
name: greeter
api_listener:
  api_listener:
    "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
    stat_prefix: greeter
    rds:
      route_config_name: greeter-routes
      config_source: {{ads: {{}}, resource_api_version: V3}}
    http_filters:
    - name: envoy.filters.http.router
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
---
"@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
name: greeter-routes
virtual_hosts:
- name: greeter
  domains: ["*"]
  routes:
  - match: {{prefix: ""}}
    route: {{cluster: greeter-backends}}
---
"@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
name: greeter-backends
type: EDS
eds_cluster_config:
  service_name: greeter-endpoints
  eds_config: {{ads: {{}}, resource_api_version: V3}}
lb_policy: ROUND_ROBIN
---
"@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
cluster_name: greeter-endpoints
endpoints:
{localities}---
resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: unrelated
  address: {{socket_address: {{address: 127.0.0.1, port_value: 9}}}}
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: unrelated
  type: STATIC
  load_assignment:
    cluster_name: unrelated
    endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 9}}}}}}}}]}}]
"#
    )
}

const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

fn count(m: &serde_json::Map<String, serde_json::Value>, backend: &str) -> u64 {
    m.get(backend).and_then(serde_json::Value::as_u64).unwrap_or(0)
}

#[test]
fn a_proxyless_grpc_client_resolves_xds_targets_from_plain_envoy_resources() {
    let Some(python) = python() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "grpcio is needed under CI=true: scripts/test installs it into target/grpc-venv"
        );
        eprintln!("skipped: no target/grpc-venv (scripts/test installs grpcio into it)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let backend_py = file("backend.py", BACKEND);
    let client_py = file("client.py", CLIENT);

    let mut backend = Command::new(&python)
        .arg(&backend_py)
        .args(["a", "b"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(tmp.path().join("backend.err")).unwrap())
        .spawn()
        .expect("start the backends");
    let backend_out = Lines::of(backend.stdout.take().unwrap());
    let _backend = Proc(backend);
    let (a, b): (u16, u16) = backend_out.find("the backends' ports", |l| {
        let mut w = l.strip_prefix("ports ")?.split(' ');
        Some((w.next()?.parse().ok()?, w.next()?.parse().ok()?))
    });

    // Only plain Envoy resources: the directory has no sluice.yaml file.
    let config = tmp.path().join("config");
    std::fs::create_dir_all(config.join("envoy")).unwrap();
    let grpc_yaml = config.join("envoy/grpc.yaml");
    std::fs::write(&grpc_yaml, resources(&[("a", 3, a), ("b", 1, b)])).unwrap();
    let server = Server::start(&config);

    let bootstrap = file(
        "bootstrap.json",
        &serde_json::json!({
            "xds_servers": [{
                "server_uri": server.ads.to_string(),
                "channel_creds": [{"type": "insecure"}],
                "server_features": ["xds_v3"]
            }],
            "node": {"id": "grpc-proxyless", "cluster": "test", "locality": {"zone": "a"}}
        })
        .to_string(),
    );
    let stderr = tmp.path().join("client.err");
    let mut child = Command::new(&python)
        .arg(&client_py)
        .arg("greeter")
        .env("GRPC_XDS_BOOTSTRAP", &bootstrap)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("start the client");
    let mut client = Client {
        stdin: child.stdin.take().unwrap(),
        out: Lines::of(child.stdout.take().unwrap()),
        _proc: Proc(child),
        stderr,
    };

    // Both localities are used, the one of weight 3 more.
    let answers = client.call(40);
    let (from_a, from_b) = (count(&answers, "a"), count(&answers, "b"));
    assert_eq!(from_a + from_b, 40, "{answers:?}");
    assert!(from_b > 0 && from_a > from_b, "weights 3:1, got {answers:?}");

    // The client's stream: each type ACKed, nothing NACKed, and each
    // response held only what it named (LDS and CDS have two resources).
    let node = server.until("the four types ACKed", "grpc-proxyless", |n| {
        [LDS, RDS, CDS, EDS].iter().all(|t| {
            let v = &n["types"][t];
            !v["sent_version"].is_null() && v["acked_version"] == v["sent_version"]
        })
    });
    assert_eq!(node["protocol"], "sotw", "{node:#}");
    for t in [LDS, RDS, CDS, EDS] {
        let v = &node["types"][t];
        assert_eq!(v["nacks"], 0, "{t}: {node:#}");
        assert_eq!(v["sent_resources"], 1, "{t}: {node:#}");
    }

    // Edit the endpoints: only backend b is left, and the running client
    // follows.
    let eds_before = node["types"][EDS]["acked_version"].clone();
    std::fs::write(&grpc_yaml, resources(&[("b", 1, b)])).unwrap();
    server.until("the new endpoints ACKed", "grpc-proxyless", |n| {
        let v = &n["types"][EDS];
        v["acked_version"] != eds_before && v["acked_version"] == v["sent_version"]
    });
    // The ACK comes as the client takes the update; its picker may change
    // a moment later.
    let deadline = Instant::now() + WAIT;
    while count(&client.call(5), "b") != 5 {
        assert!(Instant::now() < deadline, "calls still reach backend a");
        std::thread::sleep(Duration::from_millis(100));
    }
    let answers = client.call(20);
    assert_eq!(count(&answers, "b"), 20, "{answers:?}");

    // A bad file is refused with its name and line, and what is served
    // stays as it was.
    std::fs::write(
        config.join("envoy/more.yaml"),
        "\"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster\nname: more\nlb_polcy: RANDOM\n",
    )
    .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let state = server.get("/config");
        if let Some(e) = state["last_error"].as_str() {
            assert!(e.contains("more.yaml:3:1: unknown field `lb_polcy`"), "{e}");
            break;
        }
        assert!(Instant::now() < deadline, "the bad file was not refused: {state:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let answers = client.call(5);
    assert_eq!(count(&answers, "b"), 5, "{answers:?}");
    assert_eq!(server.node("grpc-proxyless")["types"][CDS]["sent_resources"], 1);
}
