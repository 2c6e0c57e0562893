#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]
//! `sluice-xds` as a process: `check` and `serve`, driven by a scripted
//! ADS client (envoy-types' tonic client) and read back through the admin
//! API. The directory it serves is edited while it runs.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use envoy_types::pb::google::rpc::Status;
use prost::Message;
use sluice_api::proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const BIN: &str = env!("CARGO_BIN_EXE_sluice-xds");
const POLICY_URL: &str = "type.googleapis.com/sluice.v1.Policy";
const WAIT: Duration = Duration::from_secs(10);

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/xds/config")
}

fn copy_examples() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(examples()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.path().join(f.file_name().unwrap())).unwrap();
    }
    dir
}

#[test]
fn check_says_what_a_directory_serves_or_every_problem() {
    let out = Command::new(BIN).arg("check").arg(examples()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("OK: 1 webgroups, 2 smartgroups, 0 workloads, 1 policy (3 rules), 0 named policies, 0 targets, 0 plugins, 0 Envoy resources"),
        "{text}"
    );

    let dir = copy_examples();
    let policy = dir.path().join("policy.yaml");
    let text = std::fs::read_to_string(&policy)
        .unwrap()
        .replace("[corp-apis]", "[corp-apiz]");
    std::fs::write(&policy, text).unwrap();
    let out = Command::new(BIN).arg("check").arg(dir.path()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("policy.yaml:16:21: policy.rules[1].to.webgroups[0]: no webgroup named `corp-apiz` (did you mean `corp-apis`?)"),
        "{err}"
    );
}

/// The server process, stopped by PID when dropped.
struct Served {
    child: Child,
    ads: SocketAddr,
    admin: SocketAddr,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(dir: &Path) -> Served {
    serve_with(dir, &["--admin", "127.0.0.1:0"])
}

fn serve_with(dir: &Path, extra: &[&str]) -> Served {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--watch-interval", "100ms"])
        .args(extra)
        .arg("--config-dir")
        .arg(dir)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut ads, mut admin) = (None, None);
    while ads.is_none() || admin.is_none() {
        let line = lines.next().expect("sluice-xds exited").unwrap();
        if let Some(a) = line.split(" over ADS on ").nth(1) {
            ads = Some(a.trim().parse().unwrap());
        }
        if let Some(a) = line.strip_prefix("sluice-xds: admin API on http://") {
            admin = Some(a.trim().parse().unwrap());
        }
    }
    // Keep reading its log, so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Served {
        child,
        ads: ads.unwrap(),
        admin: admin.unwrap(),
    }
}

async fn get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut text))
        .await
        .unwrap()
        .unwrap();
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// Polls `path` on the admin API until `done` holds for its body.
async fn wait_admin(addr: SocketAddr, path: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let body = get(addr, path).await;
        if done(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "{path} never got there:\n{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Client {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: tonic::Streaming<DeltaDiscoveryResponse>,
}

impl Client {
    async fn connect(ads: SocketAddr, node: &str) -> Self {
        Self::connect_to(ads, node, POLICY_URL).await
    }

    async fn connect_to(ads: SocketAddr, node: &str, type_url: &str) -> Self {
        let mut grpc = AggregatedDiscoveryServiceClient::connect(format!("http://{ads}"))
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(16);
        tx.send(DeltaDiscoveryRequest {
            node: Some(Node {
                id: node.into(),
                cluster: "tests".into(),
                ..Default::default()
            }),
            type_url: type_url.into(),
            resource_names_subscribe: vec!["*".into()],
            ..Default::default()
        })
        .await
        .unwrap();
        let rx = grpc
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Self { tx, rx }
    }

    async fn next(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    }

    async fn answer_type(&mut self, type_url: &str, nonce: &str) {
        self.tx
            .send(DeltaDiscoveryRequest {
                type_url: type_url.into(),
                response_nonce: nonce.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    async fn answer(&mut self, nonce: &str, error: Option<&str>) {
        self.tx
            .send(DeltaDiscoveryRequest {
                type_url: POLICY_URL.into(),
                response_nonce: nonce.into(),
                error_detail: error.map(|m| Status {
                    code: 3,
                    message: m.into(),
                    details: vec![],
                }),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

fn rules(r: &DeltaDiscoveryResponse) -> Vec<String> {
    let p = pb::Policy::decode(r.resources[0].resource.as_ref().unwrap().value.as_slice()).unwrap();
    p.rules.into_iter().map(|r| r.name).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_pushes_changes_refuses_bad_ones_and_shows_every_node() {
    let dir = copy_examples();
    let server = serve(dir.path());
    assert_eq!(get(server.admin, "/ready").await, "ready\n");

    let mut c = Client::connect(server.ads, "gw-1").await;
    let first = c.next().await;
    assert_eq!(first.type_url, POLICY_URL);
    assert_eq!(rules(&first), ["no-doh", "corp-apis", "llm-providers"]);
    c.answer(&first.nonce, None).await;
    let nodes = wait_admin(server.admin, "/nodes", |b| b.contains("\"acks\": 1")).await;
    let v: serde_json::Value = serde_json::from_str(&nodes).unwrap();
    assert_eq!(v[0]["node"], "gw-1");
    assert_eq!(v[0]["protocol"], "delta");
    assert_eq!(v[0]["policy"], "default");
    assert_eq!(v[0]["types"][POLICY_URL]["acks"], 1, "{nodes}");

    // A change that does not validate: refused, visible, nothing pushed.
    let policy = dir.path().join("policy.yaml");
    let good = std::fs::read_to_string(&policy).unwrap();
    std::fs::write(&policy, good.replace("[corp-apis]", "[corp-apiz]")).unwrap();
    let config = wait_admin(server.admin, "/config", |b| b.contains("corp-apiz")).await;
    assert!(config.contains("policy.yaml:16:21"), "{config}");
    let metrics = get(server.admin, "/metrics").await;
    assert!(metrics.contains("sluice_xds_config_rejections_total 1"), "{metrics}");
    assert!(metrics.contains("sluice_xds_config_rejected 1"), "{metrics}");

    // A good change: pushed.
    std::fs::write(&policy, good.replace("name: llm-providers", "name: llm-apis")).unwrap();
    let pushed = c.next().await;
    assert_eq!(rules(&pushed), ["no-doh", "corp-apis", "llm-apis"]);
    let config = wait_admin(server.admin, "/config", |b| b.contains("\"last_error\": null")).await;
    assert!(config.contains("\"rejections\": 1"), "{config}");

    // The node refuses it: the NACK and its reason are on the admin API
    // and in the metrics.
    c.answer(&pushed.nonce, Some("not today")).await;
    let nodes = wait_admin(server.admin, "/nodes", |b| b.contains("not today")).await;
    let v: serde_json::Value = serde_json::from_str(&nodes).unwrap();
    assert_eq!(
        v[0]["types"][POLICY_URL]["nack"]["version"], pushed.system_version_info,
        "{nodes}"
    );
    let metrics = get(server.admin, "/metrics").await;
    assert!(
        metrics.contains("sluice_xds_nacks_total{type=\"sluice.v1.Policy\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("sluice_xds_streams 1"), "{metrics}");

    // The next change is pushed (the NACKed version is not sent again, a
    // new one is), ACKed, and its push latency measured.
    std::fs::write(&policy, good.replace("name: llm-providers", "name: llms")).unwrap();
    let pushed = c.next().await;
    assert_eq!(rules(&pushed), ["no-doh", "corp-apis", "llms"]);
    c.answer(&pushed.nonce, None).await;
    let metrics = wait_admin(server.admin, "/metrics", |b| {
        b.contains("sluice_xds_push_latency_seconds_count")
    })
    .await;
    assert!(metrics.contains("sluice_xds_push_latency_seconds_count 1"), "{metrics}");
}

/// Plugins are served as ECDS resources; with `--code-url` the module is
/// remote, with its SHA-256, and the admin API serves it.
#[tokio::test(flavor = "multi_thread")]
async fn plugins_are_served_over_ecds_with_their_code_remote() {
    use envoy_types::pb::envoy::config::core::v3::{TypedExtensionConfig, async_data_source};
    use envoy_types::pb::envoy::extensions::filters::network::wasm::v3::Wasm;
    use envoy_types::pb::envoy::extensions::wasm::v3::plugin_config;

    let dir = copy_examples();
    let module = b"\0asm\x01\0\0\0".to_vec();
    std::fs::write(dir.path().join("guard.wasm"), &module).unwrap();
    std::fs::write(
        dir.path().join("plugins.yaml"),
        "listeners:\n  - {name: proxy, kind: http-proxy, address: 127.0.0.1:3128}\nplugins:\n  - {name: guard, path: guard.wasm, listeners: [proxy]}\n",
    )
    .unwrap();
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (admin_arg, url) = (admin.to_string(), format!("http://{admin}"));
    let server = serve_with(dir.path(), &["--admin", &admin_arg, "--code-url", &url]);
    let mut c = Client::connect_to(
        server.ads,
        "gw-1",
        "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
    )
    .await;
    let r = c.next().await;
    assert_eq!(r.resources.len(), 1);
    let ext = TypedExtensionConfig::decode(r.resources[0].resource.as_ref().unwrap().value.as_slice()).unwrap();
    assert_eq!(ext.name, "guard");
    let wasm = Wasm::decode(ext.typed_config.unwrap().value.as_slice()).unwrap();
    let Some(plugin_config::Vm::VmConfig(vm)) = wasm.config.unwrap().vm else {
        panic!("no vm_config")
    };
    let Some(async_data_source::Specifier::Remote(remote)) = vm.code.unwrap().specifier else {
        panic!("not remote")
    };
    let uri = remote.http_uri.unwrap().uri;
    assert_eq!(uri, format!("{url}/plugins/{}.wasm", remote.sha256));
    let path = uri.trim_start_matches(&url);
    let body = get(server.admin, path).await;
    assert_eq!(body.as_bytes(), module.as_slice());
}

/// `diff` says what serving another directory would change, against a
/// running server: per policy, and per connected node.
#[tokio::test(flavor = "multi_thread")]
async fn diff_says_what_a_change_would_push_to_which_nodes() {
    let dir = copy_examples();
    let server = serve(dir.path());
    let mut c = Client::connect(server.ads, "gw-1").await;
    let first = c.next().await;
    c.answer(&first.nonce, None).await;
    let _ = wait_admin(server.admin, "/nodes", |b| b.contains("gw-1")).await;

    let next = copy_examples();
    let policy = next.path().join("policy.yaml");
    let text = std::fs::read_to_string(&policy)
        .unwrap()
        .replace("name: llm-providers", "name: llms");
    std::fs::write(&policy, text).unwrap();
    std::fs::write(
        next.path().join("targets.yaml"),
        "policies:\n  - {name: lab, default: allow}\ntargets:\n  - {name: lab-gw, nodes: {ids: [gw-2]}, policy: lab}\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["diff"])
        .arg(next.path())
        .arg("--against")
        .arg(format!("http://{}", server.admin))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("policy `default`: sluice.v1.Policy: changed default"),
        "{text}"
    );
    assert!(text.contains("policy `lab`: sluice.v1.Policy: added lab"), "{text}");
    assert!(
        text.contains("node `gw-1`: policy `default` (no target): its policy's resources change"),
        "{text}"
    );
    // Unchanged: nothing to push.
    let out = Command::new(BIN)
        .arg("diff")
        .arg(dir.path())
        .arg("--against")
        .arg(format!("http://{}", server.admin))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("no resource changes")
            && text.contains("node `gw-1`: policy `default` (no target): nothing changes"),
        "{text}"
    );
}

// The protocol rules, on the real server over gRPC, by a scripted client.
// (Every rule is also tested on the sans-IO core in `src/ads/`.)

const WEB_URL: &str = "type.googleapis.com/sluice.v1.WebGroup";

/// Whether nothing arrives within a moment: for rules that say the server
/// must stay silent. A late message makes this pass wrongly, never fail
/// wrongly.
async fn silent<T>(rx: &mut tonic::Streaming<T>) -> bool {
    tokio::time::timeout(Duration::from_millis(400), rx.message())
        .await
        .is_err()
}

struct Sotw {
    tx: mpsc::Sender<envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest>,
    rx: tonic::Streaming<envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse>,
}

impl Sotw {
    async fn open(ads: SocketAddr) -> Self {
        let mut grpc = AggregatedDiscoveryServiceClient::connect(format!("http://{ads}"))
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(16);
        let rx = grpc
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Self { tx, rx }
    }

    async fn send(&self, version: &str, nonce: &str, names: &[&str], nack: Option<&str>) {
        self.tx
            .send(envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest {
                node: Some(Node {
                    id: "scripted".into(),
                    ..Default::default()
                }),
                type_url: WEB_URL.into(),
                version_info: version.into(),
                response_nonce: nonce.into(),
                resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
                error_detail: nack.map(|m| Status {
                    code: 3,
                    message: m.into(),
                    details: vec![],
                }),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    async fn next(&mut self) -> envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    }
}

fn add_group(dir: &Path, name: &str) {
    std::fs::write(
        dir.join("extra.yaml"),
        format!("webgroups:\n  - {{name: {name}, domains: [{name}.example]}}\n"),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn sotw_stale_nonces_are_ignored_and_a_nacked_version_is_not_sent_again() {
    let dir = copy_examples();
    let server = serve(dir.path());
    let mut c = Sotw::open(server.ads).await;
    // Legacy wildcard: an empty first list.
    c.send("", "", &[], None).await;
    let r1 = c.next().await;
    assert_eq!(r1.resources.len(), 1, "every WebGroup of the node");
    assert!(!r1.nonce.is_empty() && !r1.version_info.is_empty());

    // A request with a nonce that is not the last one sent: ignored.
    c.send("", "not-a-nonce", &["*"], None).await;
    assert!(silent(&mut c.rx).await, "a stale request was answered");
    c.send(&r1.version_info, &r1.nonce, &[], None).await; // ACK
    assert!(silent(&mut c.rx).await, "an ACK with nothing new was answered");

    // A change: the whole set again (full state), a new version.
    add_group(dir.path(), "extra");
    let r2 = c.next().await;
    assert_eq!(r2.resources.len(), 2);
    assert_ne!(r2.version_info, r1.version_info);
    // NACKed: not sent again, however often the client asks at its old
    // version.
    c.send(&r1.version_info, &r2.nonce, &[], Some("no thanks")).await;
    assert!(silent(&mut c.rx).await, "the NACKed version was sent again");
    c.send(&r1.version_info, &r2.nonce, &[], None).await;
    assert!(silent(&mut c.rx).await, "the NACKed version was sent again");
    // The next real change is.
    add_group(dir.path(), "other");
    let r3 = c.next().await;
    assert_ne!(r3.version_info, r2.version_info);
    let names: Vec<String> = r3
        .resources
        .iter()
        .map(|a| pb::WebGroup::decode(a.value.as_slice()).unwrap().name)
        .collect();
    assert!(
        names.contains(&"other".to_owned()) && !names.contains(&"extra".to_owned()),
        "{names:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn delta_removal_reconnect_and_unsubscribe() {
    let dir = copy_examples();
    add_group(dir.path(), "extra");
    let server = serve(dir.path());
    let mut c = Client::connect_to(server.ads, "gw-d", WEB_URL).await;
    let r1 = c.next().await;
    let held: std::collections::HashMap<String, String> = r1
        .resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect();
    assert_eq!(held.len(), 2);
    c.answer_type(WEB_URL, &r1.nonce).await;

    // Deleted from the directory: named in removed_resources.
    std::fs::remove_file(dir.path().join("extra.yaml")).unwrap();
    let r2 = c.next().await;
    assert!(r2.resources.is_empty());
    assert_eq!(r2.removed_resources, ["extra"]);
    c.answer_type(WEB_URL, &r2.nonce).await;

    // A new stream that says what it holds gets only what differs: the
    // group it holds unchanged is not sent again, the one gone is removed.
    let mut grpc = AggregatedDiscoveryServiceClient::connect(format!("http://{}", server.ads))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(16);
    tx.send(DeltaDiscoveryRequest {
        node: Some(Node {
            id: "gw-d".into(),
            ..Default::default()
        }),
        type_url: WEB_URL.into(),
        resource_names_subscribe: vec!["*".into()],
        initial_resource_versions: held.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut rx = grpc
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let r = tokio::time::timeout(WAIT, rx.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        r.resources.is_empty(),
        "{:?}",
        r.resources.iter().map(|x| &x.name).collect::<Vec<_>>()
    );
    assert_eq!(r.removed_resources, ["extra"]);
    tx.send(DeltaDiscoveryRequest {
        type_url: WEB_URL.into(),
        response_nonce: r.nonce.clone(),
        ..Default::default()
    })
    .await
    .unwrap();

    // Unsubscribing the wildcard: nothing in answer, and later changes are
    // no longer sent.
    tx.send(DeltaDiscoveryRequest {
        type_url: WEB_URL.into(),
        resource_names_unsubscribe: vec!["*".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(silent(&mut rx).await);
    add_group(dir.path(), "late");
    assert!(
        silent(&mut rx).await,
        "a change was sent to a stream subscribed to nothing"
    );
    // Subscribing by name, with a stale nonce: honoured (Delta).
    tx.send(DeltaDiscoveryRequest {
        type_url: WEB_URL.into(),
        response_nonce: "stale".into(),
        resource_names_subscribe: vec!["late".into(), "nowhere".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let r = tokio::time::timeout(WAIT, rx.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        r.resources.iter().map(|x| x.name.as_str()).collect::<Vec<_>>(),
        ["late"]
    );
    assert_eq!(
        r.removed_resources,
        ["nowhere"],
        "a name that does not exist is said to be removed"
    );
}
