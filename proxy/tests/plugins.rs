#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]
//! WASM plugins declared in `sluice.yaml`, on real flows through Sluice:
//! the test guest (`plugins/test-guest`, built from source) denies, allows
//! what a rule delegates to it, annotates records, sees flow bytes, fails
//! closed or open, and a plugin that cannot start refuses the
//! configuration (at start, on reload, and in `sluice check`).

#[macro_use]
mod common;

use common::guests::guest;
use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A `plugins:` entry for the test guest named `name`, configured with
/// `config` (lines of `key=value`), plus `extra` settings.
fn plugin(name: &str, config: &str, extra: &str) -> String {
    format!(
        "plugins:\n  - name: {name}\n    path: \"{}\"\n    config: {}\n{extra}",
        guest("test-guest").display(),
        serde_json::to_string(config).unwrap()
    )
}

/// An `sni` listener forwarding to the upstream's port, the standard
/// rules, and the plugin.
fn sni_with(plugin_yaml: &str, rules: Option<&str>) -> impl FnOnce(std::net::SocketAddr) -> String {
    let plugin_yaml = plugin_yaml.to_owned();
    let rules = rules.map(str::to_owned);
    move |up| {
        let c = TestConfig::listener("sni", "sni", &format!("upstream_port: {}", up.port())).head(&plugin_yaml);
        match rules {
            Some(r) => c.rules(&r),
            None => c,
        }
        .yaml()
    }
}

/// The number plugin `plugin` keeps in its shared data under `key` (0
/// before it wrote one).
fn shared_count(rig: &Rig<RawSink>, plugin: &str, key: &str) -> u64 {
    let snap = rig.sluice.server.shared.snapshot.load();
    snap.plugins
        .get(plugin)
        .and_then(|p| p.code.shared.get(key.as_bytes()))
        .and_then(|(v, _)| String::from_utf8(v).ok())
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0)
}

/// Sends a ClientHello naming `sni` through the `sni` listener and waits
/// for the flow's record.
async fn hello(rig: &Rig<RawSink>, sni: &str) -> serde_json::Value {
    let mut s = TcpStream::connect(rig.sluice.addr("sni")).await.unwrap();
    s.write_all(&rustls_hello(sni)).await.unwrap();
    s.shutdown().await.unwrap();
    let _ = wait_closed(&mut s).await;
    rig.sluice.wait_record(|r| field(r, "sni") == sni).await
}

flow_test!(a_plugin_denies_a_flow_the_policy_allowed, async {
    let rig = Rig::<RawSink>::with_upstream(sni_with(&plugin("guard", "deny_sni=allowed.test", ""), None)).await;
    let r = hello(&rig, "allowed.test").await;
    assert_eq!(decided(&r), ("deny", "plugin-denied"), "{r}");
    assert_eq!(rule(&r), "guard", "the plugin's name is the record's rule: {r}");
    assert_eq!(r["changed_by"], serde_json::json!(["guard"]), "{r}");
    assert_eq!(rig.up.accepts(), 0, "no byte of a denied flow reaches the upstream");
    rig.stop().await;
});

flow_test!(a_plugin_allows_only_what_a_rule_delegates_to_it, async {
    // `deny-bad` hands its denials to the plugin, which allows everything.
    let delegating = format!(
        "    - {{name: deny-bad, to: {{webgroups: [bad]}}, action: deny, delegate: [lenient]}}\n{}",
        STD_RULES.lines().skip(1).map(|l| format!("{l}\n")).collect::<String>()
    );
    let rig = Rig::<RawSink>::with_upstream(sni_with(&plugin("lenient", "verdict=allow", ""), Some(&delegating))).await;
    let r = hello(&rig, "denied.test").await;
    assert_eq!(decided(&r), ("allow", "plugin-allowed"), "{r}");
    assert_eq!(rule(&r), "lenient", "{r}");
    rig.stop().await;

    // Without the delegation the rule's denial stands.
    let rig = Rig::<RawSink>::with_upstream(sni_with(&plugin("lenient", "verdict=allow", ""), None)).await;
    let r = hello(&rig, "denied.test").await;
    assert_eq!(decided(&r), ("deny", "denied-by-rule"), "{r}");
    assert_eq!(rule(&r), "deny-bad", "{r}");
    rig.stop().await;
});

flow_test!(a_plugins_notes_and_shared_counts_reach_the_audit_record, async {
    let rig = Rig::<RawSink>::with_upstream(sni_with(
        &plugin(
            "tagger",
            "annotate=team:payments\ncount=flows\necho_props=1\nmetric=flows_seen",
            "",
        ),
        None,
    ))
    .await;
    let first = hello(&rig, "allowed.test").await;
    assert_eq!(action(&first), "allow", "{first}");
    let notes = &first["annotations"];
    assert_eq!(notes["team"], "payments", "{first}");
    assert_eq!(notes["count"], "1", "{first}");
    assert_eq!(notes["connection.requested_server_name"], "allowed.test", "{first}");
    assert_eq!(notes["sluice.listener"], "sni", "{first}");
    assert_eq!(
        notes["sluice.verdict.action"], "allow",
        "the plugin sees the decision so far: {first}"
    );
    assert_eq!(notes["sluice.verdict.rule"], "allow-good", "{first}");
    // The count is shared by the plugin's instances: a second flow sees 2.
    let mut s = TcpStream::connect(rig.sluice.addr("sni")).await.unwrap();
    s.write_all(&rustls_hello("allowed.test")).await.unwrap();
    s.shutdown().await.unwrap();
    let _ = wait_closed(&mut s).await;
    let both = rig.sluice.wait_records(2, |r| field(r, "sni") == "allowed.test").await;
    let counts: Vec<&str> = both
        .iter()
        .map(|r| r["annotations"]["count"].as_str().unwrap())
        .collect();
    assert_eq!(counts, ["1", "2"]);
    // The plugin's own metric is on /metrics, labelled with its name.
    let mut admin = TcpStream::connect(rig.sluice.server.admin).await.unwrap();
    admin
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    within(
        "/metrics",
        tokio::io::AsyncReadExt::read_to_string(&mut admin, &mut text),
    )
    .await
    .unwrap();
    assert!(
        text.contains("sluice_plugin_counter{plugin=\"tagger\",metric=\"flows_seen\"} 2"),
        "{text}"
    );
    rig.stop().await;
});

flow_test!(a_failing_plugin_fails_closed_unless_it_is_fail_open, async {
    let rig = Rig::<RawSink>::with_upstream(sni_with(&plugin("fragile", "connection=trap", ""), None)).await;
    let r = hello(&rig, "allowed.test").await;
    assert_eq!(decided(&r), ("deny", "plugin-failed"), "{r}");
    assert_eq!(rule(&r), "fragile", "{r}");
    assert_eq!(rig.up.accepts(), 0);
    rig.stop().await;

    let rig = Rig::<RawSink>::with_upstream(sni_with(
        &plugin("fragile", "connection=trap", "    fail_open: true\n"),
        None,
    ))
    .await;
    let r = hello(&rig, "allowed.test").await;
    assert_eq!(
        decided(&r),
        ("allow", "allowed-by-rule"),
        "fail open: the rest of the chain decides: {r}"
    );
    rig.stop().await;
});

flow_test!(a_data_plugin_sees_the_bytes_and_closes_the_flow, async {
    let rig = Rig::<RawSink>::with_upstream(|up| {
        TestConfig::listener("east-west", "tcp", &format!("upstream: \"{up}\""))
            .head(&plugin("dlp", "data_deny=SECRET", "    data: true\n"))
            .yaml()
    })
    .await;
    let mut s = TcpStream::connect(rig.sluice.addr("east-west")).await.unwrap();
    s.write_all(b"here is the SECRET").await.unwrap();
    let _ = wait_closed(&mut s).await;
    let r = rig.sluice.wait_record(|r| field(r, "listener") == "east-west").await;
    assert_eq!(decided(&r), ("deny", "plugin-denied"), "{r}");
    assert_eq!(field(&r, "close_reason"), "policy-revoked", "{r}");
    rig.stop().await;
});

flow_test!(a_plugin_that_cannot_start_refuses_the_configuration, async {
    // At start: the error names the plugin, its file and the reason.
    let dir = scratch_dir();
    let yaml = format!(
        "{}{}",
        base_config(&dir.path().join("audit.jsonl")),
        TestConfig::listener("sni", "sni", "upstream_port: 9")
            .head(&plugin("picky", "configure=false", ""))
            .yaml()
    );
    let config = sluice_api::config::load_str(&yaml, "test.yaml").unwrap();
    let Err(err) = sluice::runtime::Server::start(config, None).await else {
        panic!("a plugin that cannot start must refuse the configuration");
    };
    let text = err.to_string();
    assert!(text.contains("plugin `picky`"), "{text}");
    assert!(text.contains("test_guest.wasm"), "{text}");
    assert!(text.contains("proxy_on_configure returned false"), "{text}");

    // On reload: refused, and the running configuration keeps serving.
    let rig = Rig::<RawSink>::with_upstream(sni_with(&plugin("picky", "verdict=deny", ""), None)).await;
    let bad = TestConfig::listener("sni", "sni", &format!("upstream_port: {}", rig.up.addr.port())).head(&plugin(
        "picky",
        "configure=false",
        "",
    ));
    let yaml = format!(
        "{}{}",
        base_config(&rig.sluice.audit),
        bad.yaml().replace("127.0.0.1:0", &rig.sluice.addr("sni").to_string())
    );
    let refused = rig
        .sluice
        .server
        .reload(sluice_api::config::load_str(&yaml, "reload.yaml").unwrap())
        .await;
    assert!(refused.is_err(), "a plugin that cannot start must refuse the reload");
    let r = hello(&rig, "allowed.test").await;
    assert_eq!(
        decided(&r),
        ("deny", "plugin-denied"),
        "the old plugin still serves: {r}"
    );
    rig.stop().await;
});

#[test]
fn sluice_check_loads_and_starts_every_plugin() {
    let dir = scratch_dir();
    let write = |name: &str, plugin_yaml: &str| {
        let path = dir.path().join(name);
        let yaml = format!(
            "{}{}",
            base_config(&dir.path().join("audit.jsonl")),
            TestConfig::listener("sni", "sni", "upstream_port: 443")
                .head(plugin_yaml)
                .yaml()
        );
        std::fs::write(&path, yaml).unwrap();
        path
    };
    // Plugin names are process-wide (a plugin keeps its shared data across
    // reloads by name): each test here uses its own.
    let good = write("good.yaml", &plugin("checked", "annotate=a:b", ""));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    assert_eq!(
        sluice::cli::check(&good, &mut out, &mut err),
        0,
        "{}",
        String::from_utf8_lossy(&err)
    );
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("plugins:     1 (each loaded and started)"), "{out}");
    assert!(out.contains("checked ("), "{out}");

    let bad = write("bad.yaml", &plugin("choosy", "configure=false", ""));
    let (mut out, mut err) = (Vec::new(), Vec::new());
    assert_eq!(sluice::cli::check(&bad, &mut out, &mut err), 1);
    let err = String::from_utf8_lossy(&err);
    // The form docs/configuration.md shows.
    assert_eq!(
        err.trim_end(),
        format!(
            "{}: plugin `choosy` ({}): the plugin refused to start: proxy_on_configure returned false",
            bad.display(),
            guest("test-guest").display()
        )
    );

    let wrong_hash = write(
        "hash.yaml",
        &plugin("pinned", "annotate=a:b", &format!("    sha256: {}\n", "ab".repeat(32))),
    );
    let (mut out, mut err) = (Vec::new(), Vec::new());
    assert_eq!(sluice::cli::check(&wrong_hash, &mut out, &mut err), 1);
    let err = String::from_utf8_lossy(&err);
    assert!(err.contains("sha256 mismatch"), "{err}");
}

/// An `sni` listener to the upstream's port with example plugin `name`
/// (from `plugins/`) configured with `config`, and `head` before it.
fn example(name: &str, config: &serde_json::Value, head: &str) -> impl FnOnce(std::net::SocketAddr) -> String {
    let yaml = format!(
        "{head}plugins:\n  - name: {name}\n    path: \"{}\"\n    config: {}\n",
        guest(name).display(),
        serde_json::to_string(&config.as_str().map_or_else(|| config.to_string(), str::to_owned)).unwrap()
    );
    move |up| {
        TestConfig::listener("sni", "sni", &format!("upstream_port: {}", up.port()))
            .head(&yaml)
            .yaml()
    }
}

flow_test!(ai_egress_guard_admits_labelled_workloads_within_their_budget, async {
    // The tests' source, 127.0.0.1, is in `agents`; `allowed.test` is in `good`.
    let head = "smartgroups:\n  - {name: agents, cidrs: [127.0.0.1/32]}\n  - {name: elsewhere, cidrs: [10.9.9.0/24]}\n";
    let unlabelled = serde_json::json!({"providers": "good", "ai_groups": ["elsewhere"], "per_minute": 5});
    let rig = Rig::<RawSink>::with_upstream(example("ai-egress-guard", &unlabelled, head)).await;
    let r = hello(&rig, "allowed.test").await;
    assert_eq!(decided(&r), ("deny", "plugin-denied"), "{r}");
    assert_eq!(r["annotations"]["why"], "not labelled for AI", "{r}");
    rig.stop().await;

    // Labelled, with a budget of two a minute: the third flow is refused
    // (a run that straddles a minute boundary starts a new budget, and is
    // tried again).
    let labelled = serde_json::json!({"providers": "good", "ai_groups": ["agents"], "per_minute": 2});
    let rig = Rig::<RawSink>::with_upstream(example("ai-egress-guard", &labelled, head)).await;
    let mut seen = Vec::new();
    for attempt in 0..2 {
        let before = rig.sluice.records().len();
        for _ in 0..3 {
            let mut s = TcpStream::connect(rig.sluice.addr("sni")).await.unwrap();
            s.write_all(&rustls_hello("allowed.test")).await.unwrap();
            s.shutdown().await.unwrap();
            let _ = wait_closed(&mut s).await;
        }
        let all = rig
            .sluice
            .wait_records(before + 3, |r| field(r, "sni") == "allowed.test")
            .await;
        seen = all[before..]
            .iter()
            .map(|r| {
                (
                    action(r).to_owned(),
                    r["annotations"]["budget.used"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        if seen[2].1 == "3" || attempt == 1 {
            break;
        }
    }
    let want: Vec<(String, String)> = [("allow", "1"), ("allow", "2"), ("deny", "3")]
        .iter()
        .map(|(a, u)| ((*a).to_owned(), (*u).to_owned()))
        .collect();
    // A later attempt starts after earlier flows of the same minute.
    let used: Vec<u64> = seen.iter().map(|(_, u)| u.parse().unwrap()).collect();
    if used[0] == 1 {
        assert_eq!(seen, want);
    } else {
        assert!(
            seen.iter().all(|(a, _)| a == "deny"),
            "past the budget every flow is refused: {seen:?}"
        );
    }
    rig.stop().await;
});

flow_test!(business_hours_denies_its_webgroup_outside_the_hours, async {
    let always = serde_json::json!({"webgroup": "good", "open": "00:00", "close": "24:00",
        "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "utc_offset": "+01:00"});
    let rig = Rig::<RawSink>::with_upstream(example("business-hours", &always, "")).await;
    let r = hello(&rig, "allowed.test").await;
    assert_eq!(action(&r), "allow", "{r}");
    assert!(r["annotations"]["local_time"].as_str().is_some(), "{r}");
    rig.stop().await;

    let never = serde_json::json!({"webgroup": "good", "open": "09:00", "close": "18:00", "days": []});
    let rig = Rig::<RawSink>::with_upstream(example("business-hours", &never, "")).await;
    let r = hello(&rig, "allowed.test").await;
    assert_eq!(decided(&r), ("deny", "plugin-denied"), "{r}");
    assert_eq!(r["annotations"]["why"], "outside business hours", "{r}");
    // Other WebGroups are left to the policy.
    let r = hello(&rig, "denied.test").await;
    assert_eq!(decided(&r), ("deny", "denied-by-rule"), "{r}");
    rig.stop().await;
});

#[test]
fn an_example_plugins_bad_configuration_refuses_it_with_the_plugins_words() {
    let dir = scratch_dir();
    let path = dir.path().join("bad.yaml");
    let bad = serde_json::json!({"webgroup": "good", "open": "18:00", "close": "09:00", "days": []});
    let yaml = format!(
        "{}{}",
        base_config(&dir.path().join("audit.jsonl")),
        example("business-hours", &bad, "")("127.0.0.1:9".parse().unwrap())
    );
    std::fs::write(&path, yaml).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    assert_eq!(sluice::cli::check(&path, &mut out, &mut err), 1);
    let err = String::from_utf8_lossy(&err);
    assert!(
        err.contains("plugin `business-hours`") && err.contains("proxy_on_configure returned false"),
        "{err}"
    );
}

#[test]
fn the_plugin_guide_shows_the_only_api_plugin_as_it_is() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let doc = std::fs::read_to_string(root.join("docs/plugins.md")).unwrap();
    let start = doc.find("```rust\n").expect("a rust block") + "```rust\n".len();
    let len = doc[start..].find("```").unwrap();
    let source = std::fs::read_to_string(root.join("plugins/only-api/src/lib.rs")).unwrap();
    assert_eq!(
        &doc[start..start + len],
        source,
        "docs/plugins.md and plugins/only-api differ"
    );
}

flow_test!(the_plugin_guides_example_denies_hosts_without_its_prefix, async {
    let rig = Rig::<RawSink>::with_upstream(example("only-api", &serde_json::json!("allowed."), "")).await;
    let r = hello(&rig, "allowed.test").await;
    assert_eq!(action(&r), "allow", "{r}");
    let r = hello(&rig, "curl.example.test").await;
    assert_eq!(decided(&r), ("deny", "plugin-denied"), "{r}");
    assert_eq!(r["annotations"]["why"], "not an API host", "{r}");
    rig.stop().await;
});

/// A DNS upstream on loopback that answers every A query with 192.0.2.1.
async fn dns_upstream() -> std::net::SocketAddr {
    use hickory_proto::op::{Message, OpCode};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{RData, Record, RecordType};
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            let Ok(q) = Message::from_vec(&buf[..n]) else { continue };
            let mut m = Message::response(q.metadata.id, OpCode::Query);
            m.metadata.recursion_desired = q.metadata.recursion_desired;
            m.metadata.recursion_available = true;
            for query in &q.queries {
                m.add_query(query.clone());
                if query.query_type() == RecordType::A {
                    m.add_answer(Record::from_rdata(
                        query.name().clone(),
                        60,
                        RData::A(A::new(192, 0, 2, 1)),
                    ));
                }
            }
            let _ = sock.send_to(&m.to_vec().unwrap(), from).await;
        }
    });
    addr
}

flow_test!(dns_tunnel_guard_judges_each_query_of_the_dns_listener_it_names, async {
    use hickory_proto::op::ResponseCode;
    let upstream = dns_upstream().await;
    let plugin_yaml = format!(
        "plugins:\n  - name: dns-tunnel-guard\n    path: \"{}\"\n    listeners: [dns]\n",
        guest("dns-tunnel-guard").display()
    );
    // The test base ends in its `webgroups:` list: the head extends it.
    let sluice = TestConfig::listener("dns", "dns", &format!("upstreams: [\"{upstream}\"]"))
        .head(&format!(
            "  - {{name: tunnel, domains: [\"*.t.example.test\"]}}\n{plugin_yaml}"
        ))
        .rules("    - {name: names, to: {webgroups: [good, bad, tunnel]}, protocols: [dns], action: allow}\n")
        .start()
        .await;
    let dns = sluice.addr("dns");
    assert_eq!(ask(dns, "allowed.test.").await, ResponseCode::NoError);
    let tunnelled = "mzxw6ytboi4dgnzqgq2tmobzha3tkmrs.t.example.test.";
    assert_eq!(
        ask(dns, tunnelled).await,
        ResponseCode::NXDomain,
        "the listener's deny answer"
    );
    let r = sluice
        .wait_record(|r| field(r, "qname") == tunnelled.trim_end_matches('.'))
        .await;
    assert_eq!(r["rule"], "dns-tunnel-guard", "{r}");
    assert_eq!(r["reason"], "plugin-denied", "{r}");
    // The plugin's notes reach the query's record.
    assert!(
        r["annotations"]["why"].as_str().is_some_and(|w| w.contains("entropy")),
        "{r}"
    );
    let ok = sluice.wait_record(|r| field(r, "qname") == "allowed.test").await;
    assert_eq!(ok["reason"], "allowed-by-rule", "{ok}");
    assert!(ok.get("annotations").is_none(), "no notes, no field: {ok}");
    sluice.stop().await;
});

flow_test!(a_plugin_that_asks_to_be_ticked_is_ticked, async {
    let rig = Rig::<RawSink>::with_upstream(sni_with(&plugin("ticker", "tick=20", ""), None)).await;
    // The plugin counts its ticks in shared data; a flow reads the count.
    let ticked = wait_until(|| {
        let snap = rig.sluice.server.shared.snapshot.load();
        snap.plugins
            .get("ticker")
            .and_then(|p| p.code.shared.get(b"ticks"))
            .and_then(|(v, _)| String::from_utf8(v).ok())
            .and_then(|s| s.parse::<u64>().ok())
            .is_some_and(|n| n >= 3)
    })
    .await;
    assert!(ticked, "on_tick was not called three times");
    rig.stop().await;
});

/// Sends a plain-HTTP request for `http://host/path` through the `proxy`
/// listener with `extra` header lines; the answer's head and body.
async fn get_through(rig: &Rig<HttpUpstream>, host: &str, extra: &str) -> (RawResponse, String) {
    get_path(rig, host, "/x", extra).await
}

/// The same for `path`.
async fn get_path(rig: &Rig<HttpUpstream>, host: &str, path: &str, extra: &str) -> (RawResponse, String) {
    let target = rig.target(host);
    let mut s = TcpStream::connect(rig.proxy()).await.unwrap();
    s.write_all(
        format!("GET http://{target}{path} HTTP/1.1\r\nHost: {target}\r\n{extra}Connection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let head = read_head(&mut s).await;
    let mut body = String::new();
    let _ = within("the body", tokio::io::AsyncReadExt::read_to_string(&mut s, &mut body)).await;
    (head, body)
}

flow_test!(
    an_http_plugin_reads_and_changes_request_headers_and_answers_locally,
    async {
        let rig = Rig::<HttpUpstream>::with(
            &TestConfig::listener("proxy", "http-proxy", "")
                .head(&plugin(
                    "http-guard",
                    "http=1\ndeny_header=x-secret\nadd_header=x-added:by-plugin",
                    "    kind: http\n",
                ))
                .yaml(),
        )
        .await;
        // Let through, with the header the plugin added reaching the upstream.
        let (head, body) = get_through(&rig, "allowed.test", "").await;
        assert_eq!(head.status, 200, "{head:?} {body}");
        assert!(body.ends_with("x-added=by-plugin"), "{body}");
        let target = rig.target("allowed.test");
        let r = rig.sluice.wait_record(|r| field(r, "connect_target") == target).await;
        assert_eq!(action(&r), "allow", "{r}");
        assert_eq!(r["annotations"]["authority"], target.as_str(), "{r}");

        // Answered by the plugin: its status, header and body; nothing forwarded.
        let before = rig.up.accepts();
        let (head, body) = get_through(&rig, "allowed.test", "X-Secret: 1\r\n").await;
        assert_eq!(head.status, 451, "{head:?}");
        assert_eq!(head.header("x-blocked-by"), Some("test-guest"), "{head:?}");
        assert_eq!(body, "blocked by the test guest");
        assert_eq!(
            rig.up.accepts(),
            before,
            "a request the plugin answered is not forwarded"
        );
        let denied = rig
            .sluice
            .wait_records(2, |r| field(r, "connect_target") == target)
            .await;
        assert_eq!(decided(&denied[1]), ("deny", "plugin-denied"), "{}", denied[1]);
        assert_eq!(rule(&denied[1]), "http-guard", "{}", denied[1]);
        rig.stop().await;
    }
);

flow_test!(
    a_plugin_that_only_reads_headers_leaves_the_request_as_the_client_sent_it,
    async {
        // The same request through Sluice without a plugin and with one
        // that reads a header and writes none: the upstream must see the
        // same header names in the same order (`host` where the client
        // put it), and the same request line.
        let extra = "X-One: 1\r\nAccept: */*\r\nX-Two: 2\r\n";
        let mut seen = Vec::new();
        for head in [
            String::new(),
            plugin("reader", "http=1\ndeny_header=x-absent", "    kind: http\n"),
        ] {
            let rig =
                Rig::<HttpUpstream>::with(&TestConfig::listener("proxy", "http-proxy", "").head(&head).yaml()).await;
            let (resp, body) = get_through(&rig, "allowed.test", extra).await;
            assert_eq!(resp.status, 200, "{resp:?} {body}");
            let names = resp.header("x-upstream-headers").unwrap_or_default().to_owned();
            // Each rig has its own upstream port.
            let line = body.replace(&rig.target("allowed.test"), "TARGET");
            seen.push((names, line));
            rig.stop().await;
        }
        assert_eq!(seen[0], seen[1], "without a plugin, then with one that only reads");
        assert!(seen[1].0.contains("x-one,accept,x-two"), "{:?}", seen[1]);
    }
);

flow_test!(credential_leak_guard_refuses_requests_carrying_credentials, async {
    let config = serde_json::json!({"bearer_hosts": ["allowed.test"]});
    let rig = Rig::<HttpUpstream>::with(
        &TestConfig::listener("proxy", "http-proxy", "")
            .head(&format!(
                "plugins:\n  - name: credential-leak-guard\n    kind: http\n    path: \"{}\"\n    config: {}\n",
                guest("credential-leak-guard").display(),
                serde_json::to_string(&config.to_string()).unwrap()
            ))
            .yaml(),
    )
    .await;
    let (head, _) = get_path(&rig, "allowed.test", "/clean", "").await;
    assert_eq!(head.status, 200, "{head:?}");
    // An AWS key id in the URL.
    let (head, body) = get_path(&rig, "allowed.test", "/upload?key=AKIAIOSFODNN7EXAMPLE", "").await;
    assert_eq!(head.status, 403, "{head:?}");
    assert_eq!(body, "credential in request: aws-access-key-id\n");
    // A bearer token: to a host allowed for it, and to another.
    let bearer = "Authorization: Bearer abc.def.ghi\r\n";
    let (head, _) = get_path(&rig, "allowed.test", "/api", bearer).await;
    assert_eq!(head.status, 200, "{head:?}");
    let (head, body) = get_path(&rig, "curl.example.test", "/api", bearer).await;
    assert_eq!(head.status, 403, "{head:?}");
    assert_eq!(body, "credential in request: bearer-token-to-unlisted-host\n");
    let r = rig
        .sluice
        .wait_record(|r| reason(r) == "plugin-denied" && field(r, "connect_target").starts_with("curl.example.test"))
        .await;
    assert_eq!(rule(&r), "credential-leak-guard", "{r}");
    assert_eq!(r["annotations"]["leak"], "bearer-token-to-unlisted-host", "{r}");
    let records = rig.sluice.wait_records(4, |r| field(r, "listener") == "proxy").await;
    assert!(
        records.iter().all(|r| !r.to_string().contains("AKIAIOSFODNN7EXAMPLE")),
        "the secret itself is never recorded"
    );
    rig.stop().await;
});

flow_test!(reloading_a_plugin_under_load_loses_no_flow, async {
    let config = |version: u32, port: u16| {
        TestConfig::listener("sni", "sni", &format!("upstream_port: {port}")).head(&plugin(
            "versioned",
            &format!("annotate=version:{version}"),
            "",
        ))
    };
    let rig = Rig::<RawSink>::with_upstream(|up| config(1, up.port()).yaml()).await;
    let addr = rig.sluice.addr("sni");
    // Flows run back to back until the reloads are done (and at least 50).
    let reloading = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let still = reloading.clone();
    let load = tokio::spawn(async move {
        let mut sent = 0usize;
        while sent < 50 || still.load(std::sync::atomic::Ordering::SeqCst) {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&rustls_hello("allowed.test")).await.unwrap();
            s.shutdown().await.unwrap();
            let _ = wait_closed(&mut s).await;
            sent += 1;
        }
        sent
    });
    // Reload while the flows run, the plugin's configuration changing each
    // time (so each reload starts new instances), and wait between reloads
    // until a flow has been judged by the new one.
    for version in 2..=6u32 {
        rig.sluice.reload(&config(version, rig.up.addr.port())).await;
        let tag = version.to_string();
        rig.sluice
            .wait_record(|r| field(r, "sni") == "allowed.test" && r["annotations"]["version"] == tag.as_str())
            .await;
    }
    reloading.store(false, std::sync::atomic::Ordering::SeqCst);
    let flows = within("the load", load).await.unwrap();
    let records = rig
        .sluice
        .wait_records(flows, |r| field(r, "sni") == "allowed.test")
        .await;
    assert_eq!(records.len(), flows, "one record per flow");
    let versions: std::collections::BTreeSet<&str> = records
        .iter()
        .map(|r| {
            assert_eq!(
                decided(r),
                ("allow", "allowed-by-rule"),
                "no flow may fail over a reload: {r}"
            );
            r["annotations"]["version"].as_str().unwrap()
        })
        .collect();
    assert_eq!(versions.len(), 6, "every version judged flows: {versions:?}");
    assert_eq!(rig.up.accepts(), flows, "every flow reached the upstream");
    rig.stop().await;
});

flow_test!(
    an_assemblyscript_plugin_built_with_its_published_sdk_runs_unmodified,
    async {
        let wasm = common::guests::assemblyscript("add-header");
        let rig = Rig::<HttpUpstream>::with(
            &TestConfig::listener("proxy", "http-proxy", "")
                .head(&format!(
                    // The SDK (0.1.8) needs a configuration that is not empty:
                // it passes the configuration's size where the host writes
                // the length, and frees a null buffer when there is none
                // (in Envoy as here).
                "plugins:\n  - name: add-header\n    kind: http\n    root_id: add_header\n    config: any\n    path: \"{}\"\n",
                    wasm.display()
                ))
                .yaml(),
        )
        .await;
        let (head, body) = get_through(&rig, "allowed.test", "").await;
        assert_eq!(head.status, 200, "{head:?} {body}");
        assert!(body.ends_with("x-added=from-assemblyscript"), "{body}");
        rig.stop().await;
    }
);

flow_test!(a_plugins_own_deadline_and_memory_limit_apply_to_its_flows, async {
    for (config, limit) in [
        ("connection=spin", "    deadline: 5ms\n"),
        ("connection=grow", "    max_memory: 4MiB\n"),
    ] {
        let rig = Rig::<RawSink>::with_upstream(sni_with(&plugin("bounded", config, limit), None)).await;
        let r = hello(&rig, "allowed.test").await;
        assert_eq!(decided(&r), ("deny", "plugin-failed"), "{config}: {r}");
        assert_eq!(rig.up.accepts(), 0);
        rig.stop().await;
    }
});

#[test]
fn plugin_limits_out_of_range_are_refused_at_their_position() {
    let yaml = format!(
        "listeners:\n  - {{name: sni, kind: sni, address: \"127.0.0.1:0\", upstream_port: 443}}\nplugins:\n  - name: p\n    path: \"{}\"\n    max_memory: lots\n    deadline: 5s\n    max_pairs: 0\n    max_value: 1B\n    max_body: 1GiB\n    failure: sometimes\n    upstreams:\n      auth: nope\n",
        guest("test-guest").display()
    );
    let err = sluice_api::config::load_str(&yaml, "limits.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("limits.yaml:6:17: plugins[0].max_memory: `lots` is not a memory size from 64KiB to 256MiB"),
        "{err}"
    );
    assert!(
        err.contains("limits.yaml:7:15: plugins[0].deadline: duration `5s` is out of range"),
        "{err}"
    );
    for expected in [
        "limits.yaml:8:16: plugins[0].max_pairs: 0 is out of range; use 1 to 65536",
        "limits.yaml:9:16: plugins[0].max_value: `1B` is not a size from 1KiB to 64MiB",
        "limits.yaml:10:15: plugins[0].max_body: `1GiB` is not a body size up to 64MiB",
        "limits.yaml:11:14: plugins[0].failure: `sometimes` is not a failure policy; write `closed` (the default), `open` or `reload`",
        "limits.yaml:13:13: plugins[0].upstreams.auth: `nope` is not an upstream address; write `host:port`",
    ] {
        assert!(err.contains(expected), "{expected}\n{err}");
    }
}

flow_test!(
    an_item_on_a_shared_queue_is_delivered_to_the_instance_that_registered_it,
    async {
        let rig = Rig::<RawSink>::with_upstream(sni_with(&plugin("queuer", "queue=work", ""), None)).await;
        for _ in 0..3 {
            hello(&rig, "allowed.test").await;
        }
        let dequeued = || shared_count(&rig, "queuer", "dequeued");
        assert!(
            wait_until(|| dequeued() >= 3).await,
            "on_queue_ready took {} of 3 items",
            dequeued()
        );
        rig.stop().await;
    }
);

/// A `plugins:` entry for `http-auth` calling the service at `auth`.
fn http_auth_plugin(auth: std::net::SocketAddr) -> String {
    let config = serde_json::json!({
        "upstream": "auth", "authority": "auth.internal", "key_header": "x-api-key", "refresh_ms": 100
    });
    format!(
        "plugins:\n  - name: http-auth\n    kind: http\n    path: \"{}\"\n    upstreams:\n      auth: \"{auth}\"\n    config: {}\n",
        guest("http-auth").display(),
        serde_json::to_string(&config.to_string()).unwrap()
    )
}

flow_test!(http_auth_a_plain_proxy_wasm_plugin_checks_keys_with_a_call_out, async {
    use std::sync::atomic::Ordering;
    let (auth, checks) = auth_service().await;
    let rig = Rig::<HttpUpstream>::with(
        &TestConfig::listener("proxy", "http-proxy", "")
            .head(&http_auth_plugin(auth))
            .yaml(),
    )
    .await;
    // No key: answered by the plugin at once, nothing forwarded, no call.
    let (head, body) = get_path(&rig, "allowed.test", "/a", "").await;
    assert_eq!(head.status, 401, "{head:?} {body}");
    assert_eq!(body, "no API key\n");
    assert_eq!(head.header("x-denied-by"), Some("http-auth"), "{head:?}");
    assert_eq!(checks.load(Ordering::SeqCst), 0);
    assert_eq!(rig.up.accepts(), 0);
    // A good key: the request waits for `/check`, then goes on with the
    // header the plugin set from the answer; the response is marked.
    let (head, body) = get_path(&rig, "allowed.test", "/b", "X-Api-Key: good\r\n").await;
    assert_eq!(head.status, 200, "{head:?} {body}");
    let seen = head.header("x-upstream-headers").unwrap_or_default();
    assert!(seen.split(',').any(|h| h == "x-auth-user"), "{seen}");
    assert_eq!(head.header("x-auth"), Some("checked"), "{head:?}");
    assert_eq!(checks.load(Ordering::SeqCst), 1);
    // A refused key: 403 after the check, not forwarded.
    let before = rig.up.accepts();
    let (head, body) = get_path(&rig, "allowed.test", "/c", "X-Api-Key: bad\r\n").await;
    assert_eq!(head.status, 403, "{head:?}");
    assert_eq!(body, "key refused\n");
    assert_eq!(rig.up.accepts(), before);
    let target = rig.target("allowed.test");
    let refused = rig
        .sluice
        .wait_record(|r| {
            field(r, "connect_target") == target && reason(r) == "plugin-denied" && r["duration_ms"].is_number()
        })
        .await;
    assert_eq!(rule(&refused), "http-auth", "{refused}");
    // The denylist the root context fetches on its ticks reaches the
    // request contexts through shared data.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (head, body) = get_path(&rig, "curl.example.test", "/d", "X-Api-Key: good\r\n").await;
        if head.status == 403 {
            assert_eq!(body, "host on the denylist\n");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the denylist never arrived");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    rig.stop().await;
});

flow_test!(
    an_http_plugin_sees_and_changes_bodies_response_headers_and_trailers,
    async {
        let rig = Rig::<HttpUpstream>::with(
            &TestConfig::listener("proxy", "http-proxy", "")
                .head(&plugin(
                    "bodies",
                    "http=1\nbody=1\ntrailers=1\nprops=1\nresponse_header=x-seen:yes\ndrop_response_header=x-upstream-body-len",
                    "    kind: http\n    max_body: 64\n",
                ))
                .yaml(),
        )
        .await;
        let target = rig.target("allowed.test");
        let post = |body: &str, extra: &str| {
            format!(
                "POST http://{target}/up?q=1 HTTP/1.1\r\nHost: {target}\r\nX-Echo-Body: 1\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        };
        let proxy = rig.proxy();
        let send = |request: String| async move {
            let mut s = TcpStream::connect(proxy).await.unwrap();
            s.write_all(request.as_bytes()).await.unwrap();
            let head = read_head(&mut s).await;
            let mut body = String::new();
            let _ = within("the body", tokio::io::AsyncReadExt::read_to_string(&mut s, &mut body)).await;
            (head, body)
        };
        // The request body goes upstream as the plugin changed it, and the
        // response body comes back with what the plugin appended; response
        // headers added and removed.
        let (head, body) = send(post("hello", "")).await;
        assert_eq!(head.status, 200, "{head:?} {body}");
        assert!(body.contains(" body=HELLO"), "{body}");
        assert!(body.ends_with(" [seen]"), "{body}");
        assert_eq!(
            head.header("content-length"),
            Some(body.len().to_string().as_str()),
            "{head:?}"
        );
        assert_eq!(head.header("x-seen"), Some("yes"), "{head:?}");
        assert_eq!(head.header("x-upstream-body-len"), None, "{head:?}");
        // A body the plugin refuses is answered, not forwarded; the answer
        // goes back through the plugin's response callbacks, as in Envoy.
        let before = rig.up.accepts();
        let (head, body) = send(post("this is forbidden", "")).await;
        assert_eq!(head.status, 403, "{head:?}");
        assert_eq!(body, "forbidden body [seen]");
        assert_eq!(head.header("x-seen"), Some("yes"), "{head:?}");
        assert_eq!(rig.up.accepts(), before);
        // A body above the plugin's max_body is refused with 413.
        let (head, _) = send(post(&"x".repeat(100), "")).await;
        assert_eq!(head.status, 413, "{head:?}");
        let r = rig
            .sluice
            .wait_record(|r| field(r, "close_reason") == "request-body-too-large")
            .await;
        assert_eq!(action(&r), "allow", "{r}");
        // Trailers reach the plugin (and the upstream).
        let chunked = format!(
            "POST http://{target}/up HTTP/1.1\r\nHost: {target}\r\nX-Echo-Body: 1\r\nTransfer-Encoding: chunked\r\nTE: trailers\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\nx-check: 1\r\n\r\n"
        );
        let (head, body) = send(chunked).await;
        assert_eq!(head.status, 200, "{head:?} {body}");
        assert!(body.contains(" body=HELLO"), "{body}");
        let r = rig
            .sluice
            .wait_record(|r| r["annotations"]["request_trailers"].is_string())
            .await;
        assert_eq!(r["annotations"]["request_trailers"], "1", "{r}");
        rig.stop().await;
    }
);

/// Sends `head` and `body` to the proxy while reading its answer (it may
/// answer before it has read the body), and returns the answer whole.
async fn exchange(proxy: std::net::SocketAddr, head: String, body: Vec<u8>) -> RawResponse {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let (mut rd, mut wr) = s.split();
    let send = async {
        wr.write_all(head.as_bytes()).await.unwrap();
        let _ = wr.write_all(&body).await;
    };
    let recv = async {
        let mut all = Vec::new();
        within("the response", tokio::io::AsyncReadExt::read_to_end(&mut rd, &mut all))
            .await
            .unwrap();
        all
    };
    let ((), all) = tokio::join!(send, recv);
    let split = all.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head") + 4;
    let mut resp = RawResponse::parse_head(&all[..split]);
    resp.body = String::from_utf8_lossy(&all[split..]).into_owned();
    resp
}

flow_test!(bodies_stream_through_an_http_plugin_that_lets_each_piece_go, async {
    // The guest exports the body callbacks, as every module built with the
    // Rust SDK does, and lets each piece go as it is shown (upper-casing
    // request pieces): bodies far larger than its `max_body` stream through
    // both ways, byte for byte, piece by piece.
    let rig = Rig::<HttpUpstream>::with(
        &TestConfig::listener("proxy", "http-proxy", "")
            .head(&plugin(
                "pieces",
                "http=1\nstream=1",
                "    kind: http\n    max_body: 64KiB\n",
            ))
            .yaml(),
    )
    .await;
    let target = rig.target("allowed.test");
    let size = 3 << 20;
    let body = pattern(size);
    let resp = exchange(
        rig.proxy(),
        format!(
            "POST http://{target}/big HTTP/1.1\r\nHost: {target}\r\nX-Reply-Bytes: {size}\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
        ),
        body.clone(),
    )
    .await;
    assert_eq!(resp.status, 200, "{:?}", resp.headers);
    assert_eq!(resp.header("x-upstream-body-len"), Some(size.to_string().as_str()));
    let upper = body.to_ascii_uppercase();
    assert_eq!(
        resp.header("x-upstream-body-sum"),
        Some(fnv1a(&upper).to_string().as_str())
    );
    assert_eq!(resp.header("content-length"), Some(size.to_string().as_str()));
    assert!(
        resp.body.as_bytes() == pattern(size),
        "the response body changed on the way"
    );
    let r = rig
        .sluice
        .wait_record(|r| {
            field(r, "connect_target").starts_with("allowed.test") && r["annotations"]["response_pieces"].is_string()
        })
        .await;
    assert_eq!(field(&r, "close_reason"), "completed", "{r}");
    assert_eq!(r["bytes_up"], size, "{r}");
    assert_eq!(r["bytes_down"], size, "{r}");
    let pieces = |k: &str| r["annotations"][k].as_str().unwrap().parse::<usize>().unwrap();
    // Pieces of at most 64 KiB each: the plugin never held the body whole.
    assert!(pieces("request_pieces") >= size / (64 << 10), "{r}");
    assert!(pieces("response_pieces") >= size / (64 << 10), "{r}");

    // Chunked, the same.
    let mut chunked = Vec::new();
    for c in body.chunks(50_000) {
        chunked.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        chunked.extend_from_slice(c);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let resp = exchange(
        rig.proxy(),
        format!("POST http://{target}/chunked HTTP/1.1\r\nHost: {target}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"),
        chunked,
    )
    .await;
    assert_eq!(resp.status, 200, "{:?}", resp.headers);
    assert_eq!(
        resp.header("x-upstream-body-sum"),
        Some(fnv1a(&upper).to_string().as_str())
    );

    // A piece the plugin refuses partway ends the request: the upstream
    // never gets a whole request, and the client is answered 403.
    let mut bad = pattern(1 << 20);
    for (i, b) in b"forbidden".iter().cycle().take(64 << 10).enumerate() {
        bad[(512 << 10) + i] = *b;
    }
    let resp = exchange(
        rig.proxy(),
        format!(
            "POST http://{target}/bad HTTP/1.1\r\nHost: {target}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            bad.len()
        ),
        bad,
    )
    .await;
    assert_eq!(resp.status, 403, "{:?} {}", resp.headers, resp.body);
    assert_eq!(resp.body, "forbidden piece");
    let r = rig
        .sluice
        .wait_record(|r| field(r, "connect_target").starts_with("allowed.test") && reason(r) == "plugin-denied")
        .await;
    assert_eq!(field(&r, "close_reason"), "denied", "{r}");
    assert_eq!(rule(&r), "pieces", "{r}");
    rig.stop().await;

    // A plugin that holds bodies whole (pausing to the end) still gets at
    // most its `max_body`: a larger response is refused, 502.
    let rig = Rig::<HttpUpstream>::with(
        &TestConfig::listener("proxy", "http-proxy", "")
            .head(&plugin(
                "whole",
                "http=1\nbody=1",
                "    kind: http\n    max_body: 1KiB\n",
            ))
            .yaml(),
    )
    .await;
    let target = rig.target("allowed.test");
    let resp = exchange(
        rig.proxy(),
        format!(
            "POST http://{target}/small HTTP/1.1\r\nHost: {target}\r\nX-Reply-Bytes: 100000\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"
        ),
        b"hello".to_vec(),
    )
    .await;
    assert_eq!(resp.status, 502, "{:?}", resp.headers);
    let r = rig
        .sluice
        .wait_record(|r| field(r, "close_reason") == "response-body-too-large")
        .await;
    assert_eq!(action(&r), "allow", "{r}");
    rig.stop().await;
});

flow_test!(an_http_plugin_sees_the_connect_request_and_adds_to_its_200, async {
    let rig = Rig::<HttpUpstream>::with(
        &TestConfig::listener("proxy", "http-proxy", "")
            .head(&plugin(
                "tunnels",
                "http=1\ndeny_header=x-secret\nresponse_header=x-tunnel:watched",
                "    kind: http\n",
            ))
            .yaml(),
    )
    .await;
    let target = rig.target("allowed.test");
    let (_s, resp) = connect_via(rig.proxy(), &target, "").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.header("x-tunnel"), Some("watched"), "{resp:?}");
    drop(_s);
    let (_s, resp) = connect_via(rig.proxy(), &target, "X-Secret: 1\r\n").await;
    assert_eq!(resp.status, 451, "{resp:?}");
    assert_eq!(resp.header("x-blocked-by"), Some("test-guest"), "{resp:?}");
    assert_eq!(resp.body, "blocked by the test guest");
    let r = rig
        .sluice
        .wait_record(|r| field(r, "connect_target") == target && reason(r) == "plugin-denied")
        .await;
    assert_eq!(rule(&r), "tunnels", "{r}");
    assert_eq!(r["annotations"]["authority"], target.as_str(), "{r}");
    rig.stop().await;
});

flow_test!(a_network_plugin_pauses_a_flow_until_its_call_out_answers, async {
    use std::sync::atomic::Ordering;
    let (auth, checks) = auth_service().await;
    let rig = Rig::<RawSink>::with_upstream(sni_with(
        &plugin(
            "gate",
            "callout=auth",
            &format!("    upstreams:\n      auth: \"{auth}\"\n"),
        ),
        None,
    ))
    .await;
    let r = hello(&rig, "allowed.test").await;
    assert_eq!(decided(&r), ("allow", "allowed-by-rule"), "{r}");
    assert_eq!(r["annotations"]["callout"], "alice", "{r}");
    assert_eq!(checks.load(Ordering::SeqCst), 1);
    rig.stop().await;

    // An upstream that does not answer: the call fails, the plugin closes
    // the flow.
    let gone = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let rig = Rig::<RawSink>::with_upstream(sni_with(
        &plugin(
            "gate",
            "callout=auth",
            &format!("    upstreams:\n      auth: \"{gone}\"\n"),
        ),
        None,
    ))
    .await;
    let r = hello(&rig, "allowed.test").await;
    assert_eq!(decided(&r), ("deny", "plugin-denied"), "{r}");
    assert_eq!(rig.up.accepts(), 0);
    rig.stop().await;
});

flow_test!(a_plugin_calls_out_over_tls_to_an_https_upstream, async {
    use std::sync::atomic::Ordering;
    let (ca_pem, server) = test_pki(&["localhost"]);
    let (auth, checks) = auth_service_with(Some(server)).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("plugin-ca.pem");
    std::fs::write(&ca, &ca_pem).unwrap();
    let declared = |runtime: &str| {
        let plugin_yaml = format!(
            "{runtime}{}",
            plugin(
                "tls-gate",
                "callout=auth",
                &format!("    upstreams:\n      auth: \"https://localhost:{}\"\n", auth.port()),
            )
        );
        move |up| sni_with(&plugin_yaml, None)(up)
    };
    // The certificate chains to runtime.plugin_ca and names the host: the
    // call is answered over TLS and the flow goes on.
    let rig = Rig::<RawSink>::with_upstream(declared(&format!("runtime:\n  plugin_ca: \"{}\"\n", ca.display()))).await;
    let r = hello(&rig, "allowed.test").await;
    assert_eq!(decided(&r), ("allow", "allowed-by-rule"), "{r}");
    assert_eq!(r["annotations"]["callout"], "alice", "{r}");
    assert_eq!(checks.load(Ordering::SeqCst), 1);
    rig.stop().await;

    // Without that CA (the built-in roots), the certificate is not
    // trusted: the call fails and the plugin closes the flow.
    let rig = Rig::<RawSink>::with_upstream(declared("")).await;
    let r = hello(&rig, "allowed.test").await;
    assert_eq!(decided(&r), ("deny", "plugin-denied"), "{r}");
    assert_eq!(
        checks.load(Ordering::SeqCst),
        1,
        "no request was made without a trusted certificate"
    );
    rig.stop().await;

    // A plugin_ca that holds no certificate refuses the configuration.
    std::fs::write(&ca, "not a certificate").unwrap();
    let path = dir.path().join("sluice.yaml");
    let yaml = format!(
        "{}{}",
        base_config(&dir.path().join("audit.jsonl")),
        declared(&format!("runtime:\n  plugin_ca: \"{}\"\n", ca.display()))(auth)
    );
    std::fs::write(&path, yaml).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    assert_eq!(sluice::cli::check(&path, &mut out, &mut err), 1);
    let err = String::from_utf8_lossy(&err);
    assert!(err.contains("runtime.plugin_ca: no certificate in the file"), "{err}");
});

flow_test!(failure_policies_closed_open_and_reload, async {
    for (policy, after) in [
        ("closed", ("deny", "plugin-failed")),
        ("open", ("allow", "allowed-by-rule")),
        ("reload", ("allow", "allowed-by-rule")),
    ] {
        let rig = Rig::<RawSink>::with_upstream(sni_with(
            &plugin(
                "fragile",
                "trap_sni=curl.example.test",
                &format!("    failure: {policy}\n"),
            ),
            None,
        ))
        .await;
        let r = hello(&rig, "curl.example.test").await;
        let expected = if policy == "open" {
            ("allow", "allowed-by-rule")
        } else {
            ("deny", "plugin-failed")
        };
        assert_eq!(decided(&r), expected, "{policy}: {r}");
        // Closed and open: the plugin judges nothing more, on any worker.
        // Reload: a new instance judges later flows (after its backoff).
        if policy == "reload" {
            tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        }
        for _ in 0..3 {
            let mut s = TcpStream::connect(rig.sluice.addr("sni")).await.unwrap();
            s.write_all(&rustls_hello("allowed.test")).await.unwrap();
            s.shutdown().await.unwrap();
            let _ = wait_closed(&mut s).await;
        }
        let later = rig.sluice.wait_records(3, |r| field(r, "sni") == "allowed.test").await;
        for r in &later {
            assert_eq!(decided(r), after, "{policy}: {r}");
        }
        rig.stop().await;
    }
});

flow_test!(a_plugins_verdict_reason_and_audit_notes_reach_the_record, async {
    let rig = Rig::<RawSink>::with_upstream(sni_with(
        &plugin("judge", "verdict_action=deny\naudit=ticket:SEC-42", ""),
        None,
    ))
    .await;
    let r = hello(&rig, "allowed.test").await;
    assert_eq!(decided(&r), ("deny", "plugin-denied"), "{r}");
    assert_eq!(r["changed_by"], serde_json::json!(["judge"]), "{r}");
    assert_eq!(r["annotations"]["verdict_reason"], "the test guest said so", "{r}");
    assert_eq!(r["annotations"]["ticket"], "SEC-42", "{r}");
    rig.stop().await;
});
