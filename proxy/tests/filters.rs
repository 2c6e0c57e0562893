#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]
//! Filters after the built-in ones, in process: who may change a verdict
//! (a filter loosens only a denial a rule delegates to it by name; never
//! the guard's, an anti-evasion check's or the default's), annotations and
//! `changed_by` in the record, data hooks that see and can close a flow,
//! and a listener with two filter chains reaching two clusters.

#[macro_use]
mod common;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use sluice::listener::{
    ChainMatch, Cluster, DataStatus, Decision, FilterChain, FilterStatus, FlowContext, FlowExtras, ListenerPlan,
    NetworkFilter, PolicyFilter,
};
use sluice::policy::Enforcement;
use sluice_api::reason::ReasonCode;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Allows every flow it sees and notes that it saw it.
#[derive(Debug)]
struct Lenient;

impl NetworkFilter for Lenient {
    fn name(&self) -> &str {
        "lenient"
    }

    fn on_classified(&self, ctx: &mut FlowContext, index: usize) -> FilterStatus {
        // Per-flow state, counted across hooks of one flow.
        *ctx.filter_state(index, || 0u32) += 1;
        ctx.annotate("lenient.saw", ctx.sni.clone().unwrap_or_default());
        FilterStatus::Allow(Decision::by_filter(
            self.name(),
            true,
            ReasonCode::AllowedByRule,
            Enforcement::Enforced,
        ))
    }
}

/// Adds `filter` after the built-in filters of every chain.
fn after_builtins(filter: Arc<dyn NetworkFilter>) -> Arc<sluice::listener::PlanHook> {
    Arc::new(move |_, plan: &mut ListenerPlan| {
        plan.chains = plan
            .chains
            .iter()
            .map(|c| {
                let mut filters = c.filters.clone();
                filters.push(filter.clone());
                Arc::new(FilterChain::new(
                    c.name.clone(),
                    c.matcher.clone(),
                    filters,
                    c.cluster.clone(),
                ))
            })
            .collect();
    })
}

/// An sni listener whose policy denies `denied.test` by a rule that
/// delegates to `lenient` (declared as the test guest, which says nothing
/// unless configured to; the native `Lenient` filter does the loosening), `evil.test` by one that does not, and lets the
/// default deny anything else; `metadata.test` resolves to the metadata
/// service.
fn sni_config(upstream_port: u16) -> String {
    // The test base ends with its `webgroups:` list; these extend it.
    format!(
        "  - {{name: handed-over, domains: [denied.test]}}
  - {{name: kept, domains: [evil.test]}}
listeners:
  - {{name: sni, kind: sni, address: \"127.0.0.1:0\", upstream_port: {upstream_port}}}
plugins:
  - {{name: lenient, path: \"{guest}\"}}
policy:
  rules:
    - {{name: hand-over, to: {{webgroups: [handed-over]}}, action: deny, delegate: [lenient]}}
    - {{name: keep, to: {{webgroups: [kept]}}, action: deny}}
    - {{name: allow-good, to: {{webgroups: [good], smartgroups: [gateway, loopback]}}, action: allow}}
",
        guest = common::guests::guest("test-guest").display()
    )
}

async fn send_hello(sluice: &Sluice, sni: &str) -> serde_json::Value {
    let mut s = TcpStream::connect(sluice.addr("sni")).await.unwrap();
    s.write_all(&rustls_hello(sni)).await.unwrap();
    s.shutdown().await.unwrap();
    let _ = wait_closed(&mut s).await;
    sluice.wait_record(|r| field(r, "sni") == sni).await
}

flow_test!(a_filter_loosens_only_a_denial_a_rule_delegates_to_it, async {
    let up = RawSink::start().await;
    let sluice = Sluice::start_with(&sni_config(up.addr.port()), Some(after_builtins(Arc::new(Lenient)))).await;

    // The rule hands its denial to `lenient`, which allows.
    let r = send_hello(&sluice, "denied.test").await;
    assert_eq!(action(&r), "allow", "{r}");
    assert_eq!(rule(&r), "lenient", "{r}");
    assert_eq!(r["changed_by"], serde_json::json!(["lenient"]), "{r}");
    assert_eq!(r["annotations"]["lenient.saw"], "denied.test", "{r}");
    assert!(
        !up.next_received().await.is_empty(),
        "the allowed flow reached the upstream"
    );

    // A rule that delegates nothing keeps its denial.
    let r = send_hello(&sluice, "evil.test").await;
    assert_eq!((action(&r), rule(&r)), ("deny", "keep"), "{r}");
    assert!(r.get("changed_by").is_none(), "{r}");
    // So does the default…
    let r = send_hello(&sluice, "unlisted.example").await;
    assert_eq!((action(&r), reason(&r)), ("deny", "default-deny"), "{r}");
    // …the guard (the name is allowed, its address is the metadata
    // service)…
    let r = send_hello(&sluice, "metadata.test").await;
    assert_eq!((action(&r), reason(&r)), ("deny", "guard-cloud-metadata"), "{r}");
    // …and an allowed flow stays as the policy allowed it.
    let r = send_hello(&sluice, "allowed.test").await;
    assert_eq!((action(&r), rule(&r)), ("allow", "allow-good"), "{r}");
    assert!(r.get("changed_by").is_none(), "{r}");
    assert_eq!(r["annotations"]["lenient.saw"], "allowed.test", "{r}");
    assert_eq!(up.accepts(), 2);
    sluice.stop().await;
});

flow_test!(a_filter_cannot_loosen_an_anti_evasion_denial, async {
    let up = RawSink::start().await;
    let sluice = Sluice::start_with(
            &"listeners:
  - {name: proxy, kind: http-proxy, address: \"127.0.0.1:0\"}
plugins:
  - {name: lenient, path: \"GUEST\"}
policy:
  rules:
    - {name: everything, to: {webgroups: [good, bad], smartgroups: [gateway, loopback]}, action: allow, delegate: [lenient]}
"
            .replace("GUEST", &common::guests::guest("test-guest").display().to_string()),
            Some(after_builtins(Arc::new(Lenient))),
        )
        .await;
    let target = format!("allowed.test:{}", up.addr.port());
    let (mut s, resp) = connect_via(sluice.addr("proxy"), &target, "").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    s.write_all(&rustls_hello("evil.test")).await.unwrap();
    s.shutdown().await.unwrap();
    let _ = wait_closed(&mut s).await;
    let r = sluice
        .wait_record(|r| field(r, "connect_target") == target && field(r, "sni") == "evil.test")
        .await;
    assert_eq!(
        (action(&r), reason(&r), rule(&r)),
        ("deny", "sni-mismatch", "anti-evasion"),
        "{r}"
    );
    assert!(r.get("changed_by").is_none(), "{r}");
    assert_eq!(up.accepts(), 0);
    sluice.stop().await;
});

/// Counts the bytes it sees each way and closes a flow whose client sends
/// `FORBIDDEN`.
#[derive(Debug, Default)]
struct Reader {
    down: AtomicUsize,
    up: AtomicUsize,
}

impl NetworkFilter for Reader {
    fn name(&self) -> &str {
        "reader"
    }

    fn wants_data(&self) -> bool {
        true
    }

    fn on_downstream_data(&self, _ctx: &FlowContext, extras: &mut FlowExtras, _i: usize, data: &[u8]) -> DataStatus {
        self.down.fetch_add(data.len(), Ordering::SeqCst);
        if data.windows(9).any(|w| w == b"FORBIDDEN") {
            extras.annotate("reader.closed", "forbidden bytes");
            return DataStatus::Close(Decision::by_filter(
                "reader",
                false,
                ReasonCode::DeniedByRule,
                Enforcement::Enforced,
            ));
        }
        DataStatus::Continue
    }

    fn on_upstream_data(&self, _ctx: &FlowContext, _extras: &mut FlowExtras, _i: usize, data: &[u8]) -> DataStatus {
        self.up.fetch_add(data.len(), Ordering::SeqCst);
        DataStatus::Continue
    }
}

flow_test!(a_data_filter_sees_every_byte_and_can_close_the_flow, async {
    let up = RawSink::start().await;
    let reader = Arc::new(Reader::default());
    let sluice = Sluice::start_with(
        &format!(
            "listeners:
  - {{name: east-west, kind: tcp, address: \"127.0.0.1:0\", upstream: \"{}\"}}
policy:
  rules:
    - {{name: to-db, to: {{smartgroups: [gateway, loopback]}}, protocols: [tcp], action: allow}}
",
            up.addr
        ),
        Some(after_builtins(reader.clone())),
    )
    .await;
    // Bytes pass both ways through the hooks.
    let mut s = TcpStream::connect(sluice.addr("east-west")).await.unwrap();
    s.write_all(b"hello through the hooks").await.unwrap();
    s.shutdown().await.unwrap();
    let mut answer = Vec::new();
    let _ = within("the answer", tokio::io::AsyncReadExt::read_to_end(&mut s, &mut answer)).await;
    assert_eq!(up.next_received().await, b"hello through the hooks");
    assert_eq!(answer, b"got 23");
    let r = sluice.wait_record(|r| field(r, "listener") == "east-west").await;
    assert_eq!(action(&r), "allow", "{r}");
    assert_eq!(r["bytes_up"], 23, "{r}");
    assert_eq!(reader.down.load(Ordering::SeqCst), 23);
    assert_eq!(reader.up.load(Ordering::SeqCst), 6);

    // A chunk the filter refuses ends the flow; its record says why.
    let mut s = TcpStream::connect(sluice.addr("east-west")).await.unwrap();
    s.write_all(b"first ").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    s.write_all(b"FORBIDDEN bytes").await.unwrap();
    let _ = wait_closed(&mut s).await;
    let recs = sluice.wait_records(2, |r| field(r, "listener") == "east-west").await;
    let r = &recs[1];
    assert_eq!((action(r), rule(r)), ("deny", "reader"), "{r}");
    assert_eq!(field(r, "close_reason"), "policy-revoked", "{r}");
    assert_eq!(r["changed_by"], serde_json::json!(["reader"]), "{r}");
    assert_eq!(r["annotations"]["reader.closed"], "forbidden bytes", "{r}");
    sluice.stop().await;
});

// Two chains on one `sni` listener, chosen by server name, each with its
// own static cluster: each name reaches its own upstream.
flow_test!(a_listener_with_two_chains_reaches_two_clusters, async {
    let (first, second) = (RawSink::start().await, RawSink::start().await);
    let ports = (first.addr.port(), second.addr.port());
    let hook: Arc<sluice::listener::PlanHook> = Arc::new(move |_, plan: &mut ListenerPlan| {
        let chain = |name: &str, server: &str, port: u16| {
            let policy: Arc<dyn NetworkFilter> = Arc::new(PolicyFilter);
            let anti: Arc<dyn NetworkFilter> = Arc::new(sluice::listener::AntiEvasionFilter);
            Arc::new(FilterChain::new(
                name.to_owned(),
                ChainMatch {
                    server_names: vec![sluice_api::DomainPattern::parse(server).unwrap()],
                    ..ChainMatch::default()
                },
                vec![anti, policy],
                Cluster::Static {
                    upstream: sluice_api::HostPort {
                        host: "127.0.0.1".into(),
                        port,
                    },
                },
            ))
        };
        plan.chains = vec![
            chain("first", "allowed.test", ports.0),
            chain("second", "curl.example.test", ports.1),
        ];
    });
    let sluice = Sluice::start_with(
        "listeners:
  - {name: sni, kind: sni, address: \"127.0.0.1:0\", upstream_port: 1}
policy:
  rules:
    - {name: allow-good, to: {webgroups: [good], smartgroups: [gateway, loopback]}, action: allow}
",
        Some(hook),
    )
    .await;
    for (sni, sink) in [("allowed.test", &first), ("curl.example.test", &second)] {
        let hello = rustls_hello(sni);
        let mut s = TcpStream::connect(sluice.addr("sni")).await.unwrap();
        s.write_all(&hello).await.unwrap();
        s.shutdown().await.unwrap();
        assert!(sink.next_received().await == hello, "{sni} did not reach its cluster");
        let r = sluice.wait_record(|r| field(r, "sni") == sni).await;
        assert_eq!(action(&r), "allow", "{r}");
        let dst: std::net::SocketAddr = field(&r, "dst").parse().unwrap();
        assert_eq!(dst.ip(), IpAddr::from([127, 0, 0, 1]), "{r}");
        assert_eq!(dst.port(), sink.addr.port(), "{r}");
    }
    assert_eq!((first.accepts(), second.accepts()), (1, 1));
    // A name no chain matches is refused as such.
    let mut s = TcpStream::connect(sluice.addr("sni")).await.unwrap();
    s.write_all(&rustls_hello("chrome-like.example.test")).await.unwrap();
    s.shutdown().await.unwrap();
    let _ = wait_closed(&mut s).await;
    let r = sluice
        .wait_record(|r| field(r, "sni") == "chrome-like.example.test")
        .await;
    assert_eq!(reason(&r), "no-filter-chain", "{r}");
    sluice.stop().await;
});

/// Denies every flow it sees, as if carried out.
#[derive(Debug)]
struct Strict;

impl NetworkFilter for Strict {
    fn name(&self) -> &str {
        "strict"
    }

    fn on_classified(&self, _ctx: &mut FlowContext, _index: usize) -> FilterStatus {
        FilterStatus::Deny(Decision::by_filter(
            self.name(),
            false,
            ReasonCode::DeniedByRule,
            Enforcement::Enforced,
        ))
    }
}

// Watch mode is applied in one place to every filter's word: in watch
// mode a filter's denial is only recorded and the flow goes on, while a
// check that fails closed (plain text where the SNI is the destination)
// is refused all the same.
flow_test!(watch_mode_applies_to_what_a_filter_says, async {
    let up = RawSink::start().await;
    let config = TestConfig::listener("sni", "sni", &format!("upstream_port: {}", up.addr.port()))
        .watch()
        .yaml();
    let sluice = Sluice::start_with(&config, Some(after_builtins(Arc::new(Strict)))).await;

    let r = send_hello(&sluice, "allowed.test").await;
    assert_eq!((action(&r), rule(&r)), ("deny", "strict"), "{r}");
    assert_eq!(r["verdict"]["mode"], "watched", "{r}");
    assert_eq!(r["changed_by"], serde_json::json!(["strict"]), "{r}");
    assert!(
        !up.next_received().await.is_empty(),
        "the watched flow reached the upstream"
    );

    let mut s = TcpStream::connect(sluice.addr("sni")).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    let _ = wait_closed(&mut s).await;
    let r = sluice.wait_record(|r| field(r, "host") == "allowed.test").await;
    assert_eq!(decided(&r), ("deny", "not-tls"), "{r}");
    assert_eq!(r["verdict"]["mode"], "enforced", "{r}");
    assert!(r.get("changed_by").is_none(), "{r}");
    assert_eq!(up.accepts(), 1, "only the watched flow was forwarded");
    sluice.stop().await;
});
