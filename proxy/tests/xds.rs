#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]
//! A gateway driven by a control server over xDS: the control server is
//! `sluice-xds`'s ADS service, run in its own runtime in this process so
//! a test can publish any snapshot (an invalid one too) and kill it; the
//! gateway is Sluice with `xds:` in its file, serving real tunnels.

#[macro_use]
mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use sluice::runtime::Server;
use sluice::xds::XdsStatus;
use sluice_api::config::Resources;
use sluice_api::proto::v1 as pb;
use sluice_xds::catalog::Catalog;
use sluice_xds::service::{Ads, Stats};
use sluice_xds::snapshot::Resource;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `sluice-xds`'s ADS service on its own runtime and thread: stopping it
/// ends every stream and connection at once, as a killed process would.
struct ControlPlane {
    addr: SocketAddr,
    tx: tokio::sync::watch::Sender<Arc<Catalog>>,
    stats: Arc<Stats>,
    rt: Option<tokio::runtime::Runtime>,
}

impl ControlPlane {
    async fn start(resources: &Resources) -> Self {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), resources).await
    }

    async fn start_on(addr: SocketAddr, resources: &Resources) -> Self {
        Self::start_with(addr, resources, None).await
    }

    /// Serving what `sluice-xds` makes of a directory.
    async fn start_dir(dir: &std::path::Path) -> Self {
        let c = Self::start(&Resources::default()).await;
        c.tx.send_replace(
            sluice_xds::source::Source::Dir(dir.to_path_buf())
                .load()
                .unwrap()
                .catalog,
        );
        c
    }

    /// With TLS: the server's certificate and key, and with `client_ca`
    /// mutual TLS where a node's id must be a name of its certificate.
    async fn start_with(addr: SocketAddr, resources: &Resources, tls: Option<(&Pki, bool)>) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = std::net::TcpListener::bind(addr).unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::watch::channel(catalog(resources, &[]));
        let stats = Arc::new(Stats::default());
        let mut ads = Ads::new(rx, stats.clone());
        let mut builder = tonic::transport::Server::builder();
        if let Some((pki, mutual)) = tls {
            use tonic::transport::{Certificate, Identity, ServerTlsConfig};
            let mut config = ServerTlsConfig::new().identity(Identity::from_pem(&pki.server.0, &pki.server.1));
            if mutual {
                config = config.client_ca_root(Certificate::from_pem(&pki.ca));
                ads = ads.verify_node_ids();
            }
            builder = builder.tls_config(config).unwrap();
        }
        let service = AggregatedDiscoveryServiceServer::new(ads);
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            builder
                .add_service(service)
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        });
        Self {
            addr,
            tx,
            stats,
            rt: Some(rt),
        }
    }

    fn publish(&self, resources: &Resources) {
        self.publish_with(resources, &[]);
    }

    fn publish_with(&self, resources: &Resources, extra: &[Resource]) {
        self.tx.send_replace(catalog(resources, extra));
    }

    fn refused(&self) -> u64 {
        self.stats.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn nacks(&self) -> u64 {
        self.stats.nacks.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn stop(mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Every node gets `r` and `extra` (ECDS resources): the server's own
/// snapshot builder; the test's control server has no targets.
fn catalog(r: &Resources, extra: &[Resource]) -> Arc<Catalog> {
    Arc::new(
        Catalog::build(r, "default", Vec::new(), |r, _, _| {
            sluice_xds::source::snapshot(r, extra)
        })
        .unwrap(),
    )
}

fn webgroup(name: &str, domains: &[&str]) -> pb::WebGroup {
    pb::WebGroup {
        name: name.into(),
        domains: domains.iter().map(|d| (*d).to_owned()).collect(),
        ..Default::default()
    }
}

fn rule(name: &str, webgroups: &[&str], smartgroups: &[&str], action: pb::Action) -> pb::Rule {
    pb::Rule {
        name: name.into(),
        to: Some(pb::Destination {
            webgroups: webgroups.iter().map(|d| (*d).to_owned()).collect(),
            smartgroups: smartgroups.iter().map(|d| (*d).to_owned()).collect(),
        }),
        action: action as i32,
        ..Default::default()
    }
}

/// The control server's configuration: `good` names allowed (with the
/// test upstream's addresses, which the guard protects otherwise), or not.
fn served(allow_good: bool, extra_rules: Vec<pb::Rule>) -> Resources {
    let mut rules = extra_rules;
    if allow_good {
        rules.push(rule(
            "allow-good",
            &["good"],
            &["gateway", "loopback"],
            pb::Action::Allow,
        ));
    }
    Resources {
        webgroups: Some(vec![
            webgroup("good", &["allowed.test"]),
            webgroup("bad", &["denied.test"]),
        ]),
        smartgroups: Some(vec![]),
        workloads: Some(vec![]),
        policies: Some(vec![pb::Policy {
            name: "default".into(),
            mode: pb::Mode::Enforce as i32,
            default: pb::Action::Deny as i32,
            rules,
            ..Default::default()
        }]),
        plugins: None,
        listeners: None,
    }
}

/// A gateway whose own file denies everything and names the control
/// server.
struct Gateway {
    server: Server,
    status: Arc<XdsStatus>,
    audit: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Gateway {
    async fn start(control: SocketAddr, protocol: &str) -> Self {
        Self::start_as(control, protocol, "gw-test", "").await
    }

    /// A gateway named `id`, with `extra` YAML under `xds:` (e.g. `tls:`).
    async fn start_as(control: SocketAddr, protocol: &str, id: &str, extra: &str) -> Self {
        let dir = scratch_dir();
        let audit = dir.path().join("audit.jsonl");
        let yaml = format!(
            "{}listeners:\n  - {{name: proxy, kind: http-proxy, address: \"127.0.0.1:0\"}}\n\
             policy:\n  default: deny\n\
             xds:\n  servers: [\"{control}\"]\n  node: {{id: {id}, cluster: tests, metadata: {{zone: a}}}}\n  protocol: {protocol}\n  initial_fetch_timeout: 5s\n{extra}",
            base_config(&audit)
        );
        let file = dir.path().join("gateway.yaml");
        std::fs::write(&file, &yaml).unwrap();
        let config = sluice_api::config::load_file(&file).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        let bootstrap = config.bootstrap.xds.clone().unwrap();
        let server = Server::start(config, None).await.expect("the gateway starts");
        let status = server.start_xds(bootstrap);
        Self {
            server,
            status,
            audit,
            _dir: dir,
        }
    }

    fn proxy(&self) -> SocketAddr {
        self.server.addr("proxy").unwrap()
    }

    fn rules(&self) -> Vec<String> {
        let snap = self.server.shared.snapshot.load();
        snap.config.policy.rules.iter().map(|r| r.name.clone()).collect()
    }

    /// Waits until the gateway enforces exactly `rules` (by name).
    async fn wait_rules(&self, rules: &[&str]) {
        let ok = wait_until(|| self.rules() == rules).await;
        assert!(
            ok,
            "the gateway runs {:?}, not {rules:?}; xDS status: {:?}",
            self.rules(),
            self.status.state()
        );
    }

    fn records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    async fn wait_record(&self, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let mut found = None;
        let ok = wait_until(|| {
            found = self.records().into_iter().find(|r| pred(r));
            found.is_some()
        })
        .await;
        assert!(ok, "no such record; all: {:?}", self.records());
        found.unwrap()
    }
}

/// `GET path` on the gateway's admin API: the status and the body.
async fn admin_get(g: &Gateway, path: &str) -> (u16, String) {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(g.server.admin).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    within("the admin answer", s.read_to_string(&mut text)).await.unwrap();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

async fn status_of(g: &Gateway, target: &str) -> u16 {
    connect_via(g.proxy(), target, "").await.1.status
}

/// A policy change at the control server reaches the running gateway:
/// new flows get the new verdict, and a live tunnel the change denies is
/// closed with `policy-revoked` in its record. Both protocol variants.
async fn policy_change_reaches_the_gateway(protocol: &str) {
    let up = TlsEcho::start().await;
    let target = format!("allowed.test:{}", up.addr().port());
    let control = ControlPlane::start(&served(true, vec![])).await;
    let gw = Gateway::start(control.addr, protocol).await;
    gw.wait_rules(&["allow-good"]).await;
    assert!(gw.status.state().connected);

    let (stream, resp) = connect_via(gw.proxy(), &target, "").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let mut open = up_connect(&up, "allowed.test", stream).await;
    echo(&mut open, b"before the change").await;

    control.publish(&served(false, vec![]));
    gw.wait_rules(&[]).await;
    let mut rest = Vec::new();
    let _ = within("the revoked tunnel to close", open.read_to_end(&mut rest)).await;
    let r = gw
        .wait_record(|r| field(r, "connect_target") == target && field(r, "close_reason") == "policy-revoked")
        .await;
    assert_eq!(decided(&r), ("deny", "default-deny"), "{r}");
    assert_eq!(status_of(&gw, &target).await, 403, "a new flow gets the new verdict");
    assert_eq!(control.nacks(), 0);
    gw.server.shutdown(Duration::from_millis(100)).await;
}

flow_test!(a_policy_change_reaches_a_delta_gateway_and_revokes_live_flows, async {
    policy_change_reaches_the_gateway("delta").await;
});

flow_test!(a_policy_change_reaches_a_sotw_gateway_and_revokes_live_flows, async {
    policy_change_reaches_the_gateway("sotw").await;
});

// An update the gateway cannot use is NACKed with the resource, the field
// and the reason; the gateway keeps enforcing what it had.
flow_test!(
    an_invalid_update_is_nacked_and_the_last_good_configuration_kept,
    async {
        let up = TlsEcho::start().await;
        let target = format!("allowed.test:{}", up.addr().port());
        let control = ControlPlane::start(&served(true, vec![])).await;
        let gw = Gateway::start(control.addr, "delta").await;
        gw.wait_rules(&["allow-good"]).await;

        // A malformed pattern: refused at once.
        let mut bad = served(false, vec![]);
        bad.webgroups = Some(vec![
            webgroup("good", &["allowed.test", "bad name"]),
            webgroup("bad", &[]),
        ]);
        control.publish(&bad);
        assert!(wait_until(|| control.nacks() >= 1).await, "no NACK reached the server");
        assert_eq!(gw.status.state().rejected, 1);
        let why = gw.status.state().last_rejection.unwrap_or_default();
        assert!(
            why.contains("sluice.v1.WebGroup `good`: domains[1]: invalid domain pattern `bad name`"),
            "{why}"
        );
        assert_eq!(gw.rules(), ["allow-good"], "the last good policy stays");
        assert_eq!(status_of(&gw, &target).await, 200);
        let (code, body) = admin_get(&gw, "/xds").await;
        assert_eq!(code, 200, "{body}");
        let state: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(state["connected"], true, "{body}");
        assert_eq!(state["rejected"], 1, "{body}");
        assert!(
            state["last_rejection"]
                .as_str()
                .unwrap()
                .contains("invalid domain pattern `bad name`"),
            "{body}"
        );
        let webgroups = state["accepted"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type_url"] == "type.googleapis.com/sluice.v1.WebGroup")
            .cloned();
        assert_eq!(webgroups.map(|t| t["resources"].clone()), Some(2.into()), "{body}");

        // A policy naming a group nobody defines: held for the group's type
        // to bring it, then refused.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let nacks = control.nacks();
        control.publish(&served(true, vec![rule("ghost", &["nowhere"], &[], pb::Action::Deny)]));
        assert!(wait_until(|| gw.status.state().rejected >= 2).await, "not refused");
        assert!(
            wait_until(|| control.nacks() > nacks).await,
            "no second NACK at the server"
        );
        let why = gw.status.state().last_rejection.unwrap_or_default();
        assert!(
            why.contains("sluice.v1.Policy `default`: rules[0].to.webgroups[0]: no webgroup named `nowhere`"),
            "{why}"
        );
        assert_eq!(gw.rules(), ["allow-good"]);

        // The next good change is taken.
        control.publish(&served(true, vec![rule("deny-bad", &["bad"], &[], pb::Action::Deny)]));
        gw.wait_rules(&["deny-bad", "allow-good"]).await;
        gw.server.shutdown(Duration::from_millis(100)).await;
    }
);

// A new group and the policy that names it, published together, are
// applied together, whatever order the two responses arrive in.
flow_test!(a_group_and_the_policy_naming_it_arrive_as_one_change, async {
    let control = ControlPlane::start(&served(true, vec![])).await;
    let gw = Gateway::start(control.addr, "sotw").await;
    gw.wait_rules(&["allow-good"]).await;
    let mut next = served(true, vec![rule("deny-new", &["brand-new"], &[], pb::Action::Deny)]);
    next.webgroups
        .as_mut()
        .unwrap()
        .push(webgroup("brand-new", &["new.test"]));
    control.publish(&next);
    gw.wait_rules(&["deny-new", "allow-good"]).await;
    assert_eq!(control.nacks(), 0, "{:?}", gw.status.state());
    gw.server.shutdown(Duration::from_millis(100)).await;
});

// The control server goes away: the gateway keeps enforcing what it has,
// reconnects when a server is back, and takes what that one serves.
flow_test!(the_gateway_outlives_its_control_server_and_resynchronises, async {
    let up = TlsEcho::start().await;
    let target = format!("allowed.test:{}", up.addr().port());
    let control = ControlPlane::start(&served(true, vec![])).await;
    let addr = control.addr;
    let gw = Gateway::start(addr, "delta").await;
    gw.wait_rules(&["allow-good"]).await;

    control.stop();
    assert!(wait_until(|| !gw.status.state().connected).await);
    assert_eq!(
        status_of(&gw, &target).await,
        200,
        "still enforcing the last configuration"
    );
    assert_eq!(gw.rules(), ["allow-good"]);

    // Back on the same address, with a changed policy.
    let control = ControlPlane::start_on(
        addr,
        &served(true, vec![rule("deny-bad", &["bad"], &[], pb::Action::Deny)]),
    )
    .await;
    gw.wait_rules(&["deny-bad", "allow-good"]).await;
    assert!(gw.status.state().streams >= 2);
    assert_eq!(control.nacks(), 0);
    gw.server.shutdown(Duration::from_millis(100)).await;
});

// Before the control server answers, the gateway serves its own file.
flow_test!(until_the_control_server_answers_the_gateway_serves_its_file, async {
    // Find a free port, then leave it closed for now.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let up = TlsEcho::start().await;
    let target = format!("allowed.test:{}", up.addr().port());
    let gw = Gateway::start(addr, "sotw").await;
    assert!(gw.rules().is_empty());
    assert_eq!(status_of(&gw, &target).await, 403, "the file denies everything");
    let _control = ControlPlane::start_on(addr, &served(true, vec![])).await;
    gw.wait_rules(&["allow-good"]).await;
    assert_eq!(status_of(&gw, &target).await, 200);
    gw.server.shutdown(Duration::from_millis(100)).await;
});

/// A CA, the server's certificate (for 127.0.0.1) and gateway
/// certificates, made now, as PEM.
struct Pki {
    ca: String,
    server: (String, String),
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "sluice test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = params.self_signed(&key).unwrap();
        let issuer = rcgen::Issuer::new(params, key);
        let server = Self::leaf(&issuer, &["127.0.0.1", "localhost"]);
        Self {
            ca: ca.pem(),
            server,
            issuer,
            dir: scratch_dir(),
        }
    }

    fn leaf(issuer: &rcgen::Issuer<'static, rcgen::KeyPair>, names: &[&str]) -> (String, String) {
        let params = rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// `xds.tls` for a gateway whose certificate names `names`.
    fn gateway_tls(&self, names: &[&str]) -> String {
        let (cert, key) = Self::leaf(&self.issuer, names);
        let tag = names.join("-");
        let files = [
            ("ca.pem", self.ca.clone()),
            (&*format!("{tag}.pem"), cert),
            (&*format!("{tag}.key"), key),
        ]
        .map(|(n, text)| {
            let p = self.dir.path().join(n);
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        });
        format!(
            "  tls:\n    ca: \"{}\"\n    cert: \"{}\"\n    key: \"{}\"\n",
            files[0], files[1], files[2]
        )
    }
}

// Mutual TLS: a gateway whose certificate names its node id gets its
// configuration; one that claims an id its certificate does not name is
// refused, and keeps its own file.
flow_test!(with_mutual_tls_a_node_is_what_its_certificate_says, async {
    let pki = Pki::new();
    let control = ControlPlane::start_with(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &served(true, vec![]),
        Some((&pki, true)),
    )
    .await;
    let honest = Gateway::start_as(control.addr, "delta", "gw-a", &pki.gateway_tls(&["gw-a"])).await;
    honest.wait_rules(&["allow-good"]).await;

    let liar = Gateway::start_as(control.addr, "sotw", "gw-b", &pki.gateway_tls(&["gw-c"])).await;
    assert!(
        wait_until(|| control.refused() >= 1).await,
        "the stream of a node claiming another id was not refused"
    );
    assert!(
        liar.rules().is_empty(),
        "the liar keeps its own file: {:?}",
        liar.rules()
    );
    assert_eq!(liar.status.state().applied, 0);
    honest.server.shutdown(Duration::from_millis(100)).await;
    liar.server.shutdown(Duration::from_millis(100)).await;
});

// TLS without client certificates: the gateway checks the server's.
flow_test!(over_tls_the_gateway_checks_the_servers_certificate, async {
    let pki = Pki::new();
    let control = ControlPlane::start_with(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &served(true, vec![]),
        Some((&pki, false)),
    )
    .await;
    let ca = pki.dir.path().join("only-ca.pem");
    std::fs::write(&ca, &pki.ca).unwrap();
    let gw = Gateway::start_as(
        control.addr,
        "delta",
        "gw-a",
        &format!("  tls:\n    ca: \"{}\"\n", ca.display()),
    )
    .await;
    gw.wait_rules(&["allow-good"]).await;

    // A gateway that trusts another CA never takes its configuration.
    let other = Pki::new();
    let wrong = other.dir.path().join("other-ca.pem");
    std::fs::write(&wrong, &other.ca).unwrap();
    let fooled = Gateway::start_as(
        control.addr,
        "delta",
        "gw-b",
        &format!("  tls:\n    ca: \"{}\"\n", wrong.display()),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !fooled.status.state().connected && fooled.status.state().applied == 0,
        "{:?}",
        fooled.status.state()
    );
    gw.server.shutdown(Duration::from_millis(100)).await;
    fooled.server.shutdown(Duration::from_millis(100)).await;
});

/// ECDS resources for the test guest, as `sluice-xds` makes them from a
/// `plugins:` section; with `code_url`, the code is remote.
fn plugin_resources(config: &str, code_url: Option<&str>) -> Vec<Resource> {
    plugin_resources_of("test-guest", config, code_url)
}

fn plugin_resources_of(guest: &str, config: &str, code_url: Option<&str>) -> Vec<Resource> {
    let yaml = format!(
        "plugins:\n  - name: guard\n    path: \"{}\"\n    config: {}\n    deadline: 50ms\n",
        common::guests::guest(guest).display(),
        serde_json::to_string(config).unwrap()
    );
    let config = sluice_api::config::load_str(&yaml, "plugins.yaml").unwrap();
    sluice_xds::ecds::plugins(&config, None, code_url).unwrap().0
}

/// Serves `body` to every HTTP request, as a module server would.
async fn module_server(body: Vec<u8>) -> SocketAddr {
    use tokio::io::AsyncWriteExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&body).await;
            });
        }
    });
    addr
}

fn plugin_names(g: &Gateway) -> Vec<String> {
    g.server
        .shared
        .snapshot
        .load()
        .config
        .plugins
        .iter()
        .map(|p| p.name.clone())
        .collect()
}

// A plugin delivered over ECDS (the module inline) judges the gateway's
// flows; taken away, it stops; its settings (deadline) come with it.
flow_test!(a_plugin_over_ecds_judges_flows_and_goes_when_removed, async {
    let up = TlsEcho::start().await;
    let target = format!("allowed.test:{}", up.addr().port());
    let control = ControlPlane::start(&served(true, vec![])).await;
    let gw = Gateway::start(control.addr, "delta").await;
    gw.wait_rules(&["allow-good"]).await;

    control.publish_with(&served(true, vec![]), &plugin_resources("deny_sni=allowed.test", None));
    assert!(
        wait_until(|| plugin_names(&gw) == ["guard"]).await,
        "{:?}",
        gw.status.state()
    );
    let snap = gw.server.shared.snapshot.load();
    let p = &snap.config.plugins[0];
    assert_eq!(p.deadline, Duration::from_millis(50));
    assert!(p.sha256.is_some(), "the module's digest is checked when it is loaded");
    drop(snap);

    let (stream, resp) = connect_via(gw.proxy(), &target, "").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let _ = within("the refused handshake", up.pki.connect("allowed.test", stream)).await;
    let r = gw.wait_record(|r| field(r, "connect_target") == target).await;
    assert_eq!(decided(&r), ("deny", "plugin-denied"), "{r}");

    control.publish(&served(true, vec![]));
    assert!(wait_until(|| plugin_names(&gw).is_empty()).await);
    assert_eq!(control.nacks(), 0);
    gw.server.shutdown(Duration::from_millis(100)).await;
});

// Remote code: fetched and checked against the resource's sha256; a
// module that does not match is refused (NACKed) and nothing changes.
flow_test!(remote_plugin_code_is_checked_against_its_sha256, async {
    let control = ControlPlane::start(&served(true, vec![])).await;
    let gw = Gateway::start(control.addr, "sotw").await;
    gw.wait_rules(&["allow-good"]).await;

    let module = std::fs::read(common::guests::guest("test-guest")).unwrap();
    let good = module_server(module.clone()).await;
    control.publish_with(
        &served(true, vec![]),
        &plugin_resources("", Some(&format!("http://{good}"))),
    );
    assert!(
        wait_until(|| plugin_names(&gw) == ["guard"]).await,
        "{:?}",
        gw.status.state()
    );

    // The resource names another module's digest (one never fetched
    // here, so not on disk); the server hands out the test guest.
    let bad = module_server(module).await;
    control.publish_with(
        &served(true, vec![]),
        &plugin_resources_of("bad-allocator", "", Some(&format!("http://{bad}"))),
    );
    assert!(
        wait_until(|| gw.status.state().rejected >= 1).await,
        "not refused: {:?}",
        gw.status.state()
    );
    let why = gw.status.state().last_rejection.unwrap_or_default();
    assert!(
        why.contains("plugin `guard`: the module at http://") && why.contains("the resource requires; refused"),
        "{why}"
    );
    assert_eq!(plugin_names(&gw), ["guard"], "the running plugin stays");
    assert!(wait_until(|| control.nacks() >= 1).await);
    gw.server.shutdown(Duration::from_millis(100)).await;
});

// A change that revokes one destination closes only the flows to it:
// a live tunnel the new policy still allows is not disturbed.
flow_test!(a_change_closes_only_the_flows_it_denies, async {
    let up = TlsEcho::start().await;
    let with_other = |allow_good: bool| {
        let mut r = served(
            allow_good,
            vec![rule(
                "allow-other",
                &["other"],
                &["gateway", "loopback"],
                pb::Action::Allow,
            )],
        );
        r.webgroups.as_mut().unwrap().push(webgroup("other", &["evil.test"]));
        r
    };
    let control = ControlPlane::start(&with_other(true)).await;
    let gw = Gateway::start(control.addr, "delta").await;
    gw.wait_rules(&["allow-other", "allow-good"]).await;

    let open = |host: &'static str| {
        let (proxy, target) = (gw.proxy(), format!("{host}:{}", up.addr().port()));
        let up = &up;
        async move {
            let (stream, resp) = connect_via(proxy, &target, "").await;
            assert_eq!(resp.status, 200, "{resp:?}");
            (up_connect(up, host, stream).await, target)
        }
    };
    let (mut good, good_target) = open("allowed.test").await;
    let (mut other, _) = open("evil.test").await;
    echo(&mut good, b"good").await;
    echo(&mut other, b"other").await;

    control.publish(&with_other(false));
    gw.wait_rules(&["allow-other"]).await;
    let mut rest = Vec::new();
    let _ = within("the revoked tunnel to close", good.read_to_end(&mut rest)).await;
    let r = gw
        .wait_record(|r| field(r, "connect_target") == good_target && field(r, "close_reason") == "policy-revoked")
        .await;
    assert_eq!(decided(&r), ("deny", "default-deny"), "{r}");
    echo(&mut other, b"still here").await;
    gw.server.shutdown(Duration::from_millis(100)).await;
});

/// An Envoy Listener (one chain: `sluice.policy` → `tcp_proxy`) and the
/// STATIC Cluster it relays to, as any xDS server would send them.
fn envoy_tcp_listener(name: &str, addr: SocketAddr, upstream: SocketAddr, chains: usize) -> Vec<Resource> {
    use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
    use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
    use envoy_types::pb::envoy::config::endpoint::v3::{
        ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
    };
    use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
    use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{TcpProxy, tcp_proxy};
    use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration};
    use prost::{Message, Name};
    let sock = |a: SocketAddr| Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: a.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(a.port()))),
            ..Default::default()
        })),
    };
    let pack = |m: &dyn Fn() -> (String, Vec<u8>)| {
        let (type_url, value) = m();
        Any { type_url, value }
    };
    let cluster_name = format!("{name}-upstream");
    let chain = |i: usize| FilterChain {
        name: format!("c{i}"),
        filters: vec![
            Filter {
                name: "sluice.policy".into(),
                config_type: None,
            },
            Filter {
                name: "envoy.filters.network.tcp_proxy".into(),
                config_type: Some(filter::ConfigType::TypedConfig(pack(&|| {
                    let t = TcpProxy {
                        stat_prefix: name.to_owned(),
                        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster_name.clone())),
                        ..Default::default()
                    };
                    (TcpProxy::type_url(), t.encode_to_vec())
                }))),
            },
        ],
        ..Default::default()
    };
    let mut listener = Listener {
        name: name.to_owned(),
        address: Some(sock(addr)),
        filter_chains: (0..chains).map(chain).collect(),
        ..Default::default()
    };
    if chains > 1 {
        for (i, c) in listener.filter_chains.iter_mut().enumerate() {
            c.filter_chain_match = Some(envoy_types::pb::envoy::config::listener::v3::FilterChainMatch {
                destination_port: Some(envoy_types::pb::google::protobuf::UInt32Value { value: 1000 + i as u32 }),
                ..Default::default()
            });
        }
    }
    let cluster = Cluster {
        name: cluster_name.clone(),
        connect_timeout: Some(PbDuration { seconds: 2, nanos: 0 }),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Static as i32,
        )),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: cluster_name.clone(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints: vec![LbEndpoint {
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(sock(upstream)),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    vec![
        Resource::new(name, pack(&|| (Listener::type_url(), listener.encode_to_vec()))),
        Resource::new(&cluster_name, pack(&|| (Cluster::type_url(), cluster.encode_to_vec()))),
    ]
}

// `xds.listeners: true`: the gateway takes its listeners from Envoy
// Listener and Cluster resources (the shapes its listener kinds have),
// binds them, relays through them under its policy, and refuses a shape
// it cannot run with the field at fault.
flow_test!(a_gateway_takes_envoy_listeners_and_clusters_over_lds_and_cds, async {
    let up = TlsEcho::start().await;
    let control = ControlPlane::start(&served(true, vec![])).await;
    let gw = Gateway::start_as(control.addr, "delta", "gw-lds", "  listeners: true\n").await;
    gw.wait_rules(&["allow-good"]).await;
    assert!(
        wait_until(|| gw.server.addr("proxy").is_none()).await,
        "the server sent no listener, so the file's are replaced: {:?} {:?}",
        gw.status.state(),
        gw.server
            .shared
            .snapshot
            .load()
            .config
            .listeners
            .iter()
            .map(|l| l.name.clone())
            .collect::<Vec<_>>()
    );

    let db = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    control.publish_with(&served(true, vec![]), &envoy_tcp_listener("db", db, up.addr(), 1));
    assert!(
        wait_until(|| gw.server.addr("db").is_some()).await,
        "{:?}",
        gw.status.state()
    );
    let stream = tokio::net::TcpStream::connect(gw.server.addr("db").unwrap())
        .await
        .unwrap();
    let mut tls = up_connect(&up, "allowed.test", stream).await;
    echo(&mut tls, b"through an Envoy listener").await;

    // A listener whose tcp_proxy names a cluster that was not sent: refused,
    // named, and the running listener stays.
    let alone: Vec<Resource> = envoy_tcp_listener("db", db, up.addr(), 1).into_iter().take(1).collect();
    control.publish_with(&served(true, vec![]), &alone);
    assert!(
        wait_until(|| gw.status.state().rejected >= 1).await,
        "{:?}",
        gw.status.state()
    );
    let why = gw.status.state().last_rejection.unwrap_or_default();
    assert!(
        why.contains("Envoy Listener db: filter_chains[0].filters[1].typed_config.cluster"),
        "{why}"
    );
    assert!(gw.server.addr("db").is_some(), "the running listener stays");
    echo(&mut tls, b"still relayed").await;

    // Two chains chosen by destination port (1000 and 1001): a connection
    // to the listener's own port matches neither and is refused.
    let applied = gw.status.state().applied;
    control.publish_with(&served(true, vec![]), &envoy_tcp_listener("db", db, up.addr(), 2));
    assert!(
        wait_until(|| gw.status.state().applied > applied).await,
        "{:?}",
        gw.status.state()
    );
    let mut stream = tokio::net::TcpStream::connect(gw.server.addr("db").unwrap())
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    let closed = within("the refusal", stream.read(&mut byte)).await;
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    let refused = gw.wait_record(|r| r["verdict"]["reason"] == "no-filter-chain").await;
    assert_eq!(refused["listener"], "db", "{refused}");
    gw.server.shutdown(Duration::from_millis(100)).await;
});

// The whole way: `sluice-xds` makes Sluice-shaped Envoy listeners of its
// directory's `tcp` listener for Sluice gateways (not the RBAC translation
// stock Envoy gets), and a gateway with `xds.listeners: true` binds and
// relays through it.
flow_test!(sluice_xds_serves_a_gateway_its_listeners, async {
    let up = TlsEcho::start().await;
    let db = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (explicit, dns) = (free(), free());
    let dir = scratch_dir();
    // Every kind: tcp in its Envoy shape; http-proxy (with its users) and
    // dns as Sluice's own filters with all their settings.
    std::fs::write(
        dir.path().join("served.yaml"),
        format!(
            "listeners:\n  - {{name: db, kind: tcp, address: \"{db}\", upstream: \"{}\"}}\n\
             \x20 - {{name: explicit, kind: http-proxy, address: \"{explicit}\", users: [{{name: ci, password: hunter2, smartgroup: builders}}]}}\n\
             \x20 - {{name: dns, kind: dns, address: \"{dns}\", deny_answer: refused}}\n\
             smartgroups:\n  - {{name: builders, cidrs: [10.9.0.0/16]}}\n\
             policy:\n  rules:\n    - {{name: to-upstream, to: {{smartgroups: [gateway, loopback]}}, action: allow}}\n",
            up.addr()
        ),
    )
    .unwrap();
    let control = ControlPlane::start_dir(dir.path()).await;
    let gw = Gateway::start_as(control.addr, "sotw", "gw-sx", "  listeners: true\n").await;
    gw.wait_rules(&["to-upstream"]).await;
    assert!(
        wait_until(|| gw.server.addr("db").is_some()).await,
        "{:?}",
        gw.status.state()
    );
    let stream = tokio::net::TcpStream::connect(gw.server.addr("db").unwrap())
        .await
        .unwrap();
    let mut tls = up_connect(&up, "allowed.test", stream).await;
    echo(&mut tls, b"from a directory, through sluice-xds").await;
    assert!(
        wait_until(|| gw.server.addr("explicit").is_some() && gw.server.addr("dns").is_some()).await,
        "{:?}",
        gw.status.state()
    );
    // The explicit proxy came with its users.
    let target = up.addr().to_string();
    let (_, refused) = connect_via(gw.server.addr("explicit").unwrap(), &target, "").await;
    assert_eq!(refused.status, 407, "{refused:?}");
    let (stream, ok) = connect_via(
        gw.server.addr("explicit").unwrap(),
        &target,
        "Proxy-Authorization: Basic Y2k6aHVudGVyMg==\r\n",
    )
    .await;
    assert_eq!(ok.status, 200, "{ok:?}");
    let mut tls = up_connect(&up, "allowed.test", stream).await;
    echo(&mut tls, b"through the explicit proxy from sluice-xds").await;
    // The DNS listener came with its settings.
    assert_eq!(
        ask(gw.server.addr("dns").unwrap(), "denied.test").await,
        hickory_proto::op::ResponseCode::Refused
    );
    assert_eq!(control.nacks(), 0, "{:?}", gw.status.state());
    gw.server.shutdown(Duration::from_millis(100)).await;
});

/// `served(true, …)` and a webgroup `edge` of `names`, allowed (with the
/// test upstreams' addresses) by rule `allow-edge`.
fn served_with_edge(names: &[&str]) -> Resources {
    let rule = rule("allow-edge", &["edge"], &["gateway", "loopback"], pb::Action::Allow);
    let mut resources = served(true, vec![rule]);
    if let Some(w) = resources.webgroups.as_mut() {
        w.push(webgroup("edge", names));
    }
    resources
}

/// A TCP upstream that answers every connection with its name once the
/// first bytes arrived.
async fn named_upstream(name: &'static str) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(name.as_bytes()).await;
            });
        }
    });
    addr
}

/// Which upstream answers a ClientHello naming `sni` sent to `addr`
/// (`closed` when none does).
async fn who_answers(addr: SocketAddr, sni: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&rustls_hello(sni)).await.unwrap();
    let mut out = Vec::new();
    let _ = within("an answer", s.read_to_end(&mut out)).await;
    if out.is_empty() {
        "closed".to_owned()
    } else {
        String::from_utf8_lossy(&out).into_owned()
    }
}

fn plain(yaml: &str) -> Vec<Resource> {
    let p = sluice_xds::plain::Plain::parse([("edge.yaml", yaml)]).unwrap_or_else(|e| panic!("{e:?}"));
    p.resources().cloned().collect()
}

// Envoy's own shapes on a gateway: chains chosen by server name, the
// default chain for the rest, a STATIC cluster balanced round robin and an
// EDS cluster whose endpoints change without the listener changing.
flow_test!(a_gateway_runs_envoy_chains_and_balances_their_clusters, async {
    let (a1, a2, b1, b2, d) = (
        named_upstream("a1").await,
        named_upstream("a2").await,
        named_upstream("b1").await,
        named_upstream("b2").await,
        named_upstream("d").await,
    );
    let resources = served_with_edge(&["a.test", "*.b.test", "other.test", "b.test"]);
    let control = ControlPlane::start(&resources).await;
    let gw = Gateway::start_as(control.addr, "sotw", "gw-edge", "  listeners: true\n").await;
    gw.wait_rules(&["allow-edge", "allow-good"]).await;
    let endpoint = |a: SocketAddr| {
        format!(
            "    - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {}}}}}}}\n",
            a.port()
        )
    };
    let cla = |eps: &[SocketAddr]| {
        format!(
            "\"@type\": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
cluster_name: b-endpoints
endpoints:
- lb_endpoints:
{}",
            eps.iter().map(|a| endpoint(*a)).collect::<String>()
        )
    };
    let edge = format!(
        "\"@type\": type.googleapis.com/envoy.config.listener.v3.Listener
name: edge
address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
listener_filters:
- name: envoy.filters.listener.tls_inspector
  typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector}}
filter_chains:
- filter_chain_match: {{server_names: [a.test]}}
  filters:
  - name: envoy.filters.network.tcp_proxy
    typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: a, cluster: a}}
- filter_chain_match: {{server_names: [\"*.b.test\"]}}
  filters:
  - name: envoy.filters.network.tcp_proxy
    typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: b, cluster: b}}
default_filter_chain:
  filters:
  - name: envoy.filters.network.tcp_proxy
    typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: d, cluster: d}}
---
\"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster
name: a
type: STATIC
lb_policy: ROUND_ROBIN
load_assignment:
  cluster_name: a
  endpoints:
  - lb_endpoints:
{}{}---
\"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster
name: b
type: EDS
eds_cluster_config: {{service_name: b-endpoints, eds_config: {{ads: {{}}, resource_api_version: V3}}}}
---
\"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster
name: d
type: STATIC
load_assignment:
  cluster_name: d
  endpoints:
  - lb_endpoints:
{}---
",
        endpoint(a1),
        endpoint(a2),
        endpoint(d)
    );
    control.publish_with(&resources, &plain(&format!("{edge}{}", cla(&[b1]))));
    assert!(
        wait_until(|| gw.server.addr("edge").is_some()).await,
        "{:?}",
        gw.status.state()
    );
    let addr = gw.server.addr("edge").unwrap();
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..4 {
        *seen.entry(who_answers(addr, "a.test").await).or_insert(0) += 1;
    }
    assert_eq!(
        seen,
        [("a1".to_owned(), 2), ("a2".to_owned(), 2)].into(),
        "{:?}",
        gw.records()
    );
    assert_eq!(who_answers(addr, "x.b.test").await, "b1");
    assert_eq!(who_answers(addr, "other.test").await, "d");
    // `*.b.test` is not the apex: the default chain serves it.
    assert_eq!(who_answers(addr, "b.test").await, "d");

    // New endpoints over EDS alone: the listener stays, flows reach both.
    control.publish_with(&resources, &plain(&format!("{edge}{}", cla(&[b1, b2]))));
    let mut both = std::collections::BTreeSet::new();
    for _ in 0..50 {
        both.insert(who_answers(addr, "x.b.test").await);
        if both.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(both.len(), 2, "{both:?} {:?}", gw.status.state());
    assert_eq!(gw.server.addr("edge"), Some(addr), "the listener was not rebound");
    gw.server.shutdown(Duration::from_millis(100)).await;
});

/// A TCP upstream that greets every connection with its name at once and
/// keeps it open until the other side closes.
async fn holding_upstream(name: &'static str) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(name.as_bytes()).await;
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    addr
}

// `continue_on_listener_filters_timeout`: a client that says nothing is
// relayed as opaque TCP once the listener filters' timeout passes; and
// `max_downstream_connection_duration` closes the flow at that age.
flow_test!(late_first_bytes_go_on_as_opaque_tcp_and_flows_end_at_their_age, async {
    let hold = holding_upstream("hold").await;
    let resources = served(true, vec![]);
    let control = ControlPlane::start(&resources).await;
    let gw = Gateway::start_as(control.addr, "delta", "gw-slow", "  listeners: true\n").await;
    gw.wait_rules(&["allow-good"]).await;
    let yaml = format!(
        "\"@type\": type.googleapis.com/envoy.config.listener.v3.Listener
name: slow
address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
listener_filters:
- name: envoy.filters.listener.tls_inspector
  typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector}}
listener_filters_timeout: 0.2s
continue_on_listener_filters_timeout: true
filter_chains:
- filter_chain_match: {{transport_protocol: raw_buffer}}
  filters:
  - name: envoy.filters.network.tcp_proxy
    typed_config:
      \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
      stat_prefix: slow
      cluster: hold
      max_downstream_connection_duration: 0.6s
---
\"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster
name: hold
type: STATIC
load_assignment:
  cluster_name: hold
  endpoints:
  - lb_endpoints:
    - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {}}}}}}}
",
        hold.port()
    );
    control.publish_with(&resources, &plain(&yaml));
    assert!(
        wait_until(|| gw.server.addr("slow").is_some()).await,
        "{:?}",
        gw.status.state()
    );
    let mut s = tokio::net::TcpStream::connect(gw.server.addr("slow").unwrap())
        .await
        .unwrap();
    let mut greeting = [0u8; 4];
    within("the upstream's greeting", s.read_exact(&mut greeting))
        .await
        .unwrap();
    assert_eq!(&greeting, b"hold");
    // Then closed at 0.6 s, though both ends are still there.
    let mut rest = Vec::new();
    let _ = within("the close at the flow's age", s.read_to_end(&mut rest)).await;
    let rec = gw.wait_record(|r| r["listener"] == "slow").await;
    assert_eq!(rec["close_reason"], "max-duration", "{rec}");
    assert_eq!(rec["verdict"]["action"], "allow", "{rec}");
    gw.server.shutdown(Duration::from_millis(100)).await;
});

// A Listener whose chain is `sluice.dns` is a DNS listener, its settings
// those of a `dns` listener in `sluice.yaml`; a setting the reader refuses
// is NACKed with the Listener's name.
flow_test!(a_gateway_runs_a_dns_listener_from_lds, async {
    use hickory_proto::op::ResponseCode;
    let resources = served(true, vec![]);
    let control = ControlPlane::start(&resources).await;
    let gw = Gateway::start_as(control.addr, "delta", "gw-dns", "  listeners: true\n").await;
    gw.wait_rules(&["allow-good"]).await;
    let dns = |settings: &str| {
        plain(&format!(
            "\"@type\": type.googleapis.com/envoy.config.listener.v3.Listener
name: dns
address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
filter_chains:
- filters:
  - name: sluice.policy
  - name: sluice.dns
    typed_config:
      \"@type\": type.googleapis.com/google.protobuf.Struct
      value: {{{settings}}}
"
        ))
    };
    control.publish_with(&resources, &dns("deny_answer: refused"));
    assert!(
        wait_until(|| gw.server.addr("dns").is_some()).await,
        "{:?}",
        gw.status.state()
    );
    let addr = gw.server.addr("dns").unwrap();
    // Denied by the policy, answered as the filter's settings say.
    assert_eq!(ask(addr, "denied.test").await, ResponseCode::Refused);

    control.publish_with(&resources, &dns("deny_answr: refused"));
    assert!(
        wait_until(|| gw.status.state().rejected >= 1).await,
        "{:?}",
        gw.status.state()
    );
    let why = gw.status.state().last_rejection.unwrap_or_default();
    assert!(why.contains("dns") && why.contains("deny_answr"), "{why}");
    assert_eq!(
        ask(addr, "denied.test").await,
        ResponseCode::Refused,
        "the last good one runs"
    );
    gw.server.shutdown(Duration::from_millis(100)).await;
});

// A chain runs the plugins it names (filters with `config_discovery`, as
// stock Envoy's listeners name theirs), and only that chain.
flow_test!(an_envoy_chain_runs_the_plugins_it_names, async {
    let (a, b) = (named_upstream("a").await, named_upstream("b").await);
    let resources = served_with_edge(&["a.test", "b.test"]);
    // The plugin's own option names another listener, so it runs on
    // `edge` only where a chain names it.
    let yaml = format!(
        "listeners:\n  - {{name: side, kind: tcp, address: \"127.0.0.1:0\", upstream: \"127.0.0.1:9\"}}\n\
         plugins:\n  - name: guard\n    path: \"{}\"\n    config: \"annotate=chain:guarded\"\n    listeners: [side]\n",
        common::guests::guest("test-guest").display()
    );
    let config = sluice_api::config::load_str(&yaml, "plugins.yaml").unwrap();
    let mut extra = sluice_xds::ecds::plugins(&config, None, None).unwrap().0;
    let tcp = |name: &str, cluster: &str| {
        format!(
            "  - name: envoy.filters.network.tcp_proxy\n    typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: {name}, cluster: {cluster}}}\n"
        )
    };
    let cluster = |name: &str, port: u16| {
        format!(
            "---\n\"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster\nname: {name}\ntype: STATIC\nload_assignment:\n  cluster_name: {name}\n  endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]\n"
        )
    };
    let listeners = format!(
        "\"@type\": type.googleapis.com/envoy.config.listener.v3.Listener
name: edge
address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
listener_filters:
- name: envoy.filters.listener.tls_inspector
  typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector}}
filter_chains:
- filter_chain_match: {{server_names: [a.test]}}
  filters:
  - name: guard
    config_discovery:
      config_source: {{ads: {{}}}}
      type_urls: [type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm]
{}- filter_chain_match: {{server_names: [b.test]}}
  filters:
{}---
\"@type\": type.googleapis.com/envoy.config.listener.v3.Listener
name: side
address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
filter_chains:
- filters:
{}{}{}",
        tcp("a", "a"),
        tcp("b", "b"),
        tcp("side", "b"),
        cluster("a", a.port()),
        cluster("b", b.port())
    );
    extra.extend(plain(&listeners));
    let control = ControlPlane::start(&resources).await;
    let gw = Gateway::start_as(control.addr, "delta", "gw-chain-plugins", "  listeners: true\n").await;
    gw.wait_rules(&["allow-edge", "allow-good"]).await;
    control.publish_with(&resources, &extra);
    assert!(
        wait_until(|| gw.server.addr("edge").is_some() && plugin_names(&gw) == ["guard"]).await,
        "{:?}",
        gw.status.state()
    );
    let edge = gw.server.addr("edge").unwrap();
    assert_eq!(who_answers(edge, "a.test").await, "a");
    assert_eq!(who_answers(edge, "b.test").await, "b");
    let ra = gw.wait_record(|r| r["sni"] == "a.test").await;
    let rb = gw.wait_record(|r| r["sni"] == "b.test").await;
    assert_eq!(ra["annotations"]["chain"], "guarded", "{ra}");
    assert!(rb["annotations"]["chain"].is_null(), "{rb}");
    gw.server.shutdown(Duration::from_millis(100)).await;
});
