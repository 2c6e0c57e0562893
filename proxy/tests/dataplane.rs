#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]
//! The data plane end to end, in process: a real Sluice on `127.0.0.1:0`,
//! real TLS clients and upstreams (rustls, rcgen certificates made at test
//! time), and the audit log read back. One test per behaviour; every wait is
//! bounded, and no assertion depends on how long something took.

#[macro_use]
mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: usize = 1 << 20;

/// An explicit proxy with the standard rules.
fn proxy_config() -> String {
    TestConfig::listener("proxy", "http-proxy", "").yaml()
}

flow_test!(connect_allowed_round_trips_one_mib_over_real_tls, async {
    let rig = Rig::start().await;
    let (tls, target) = rig.tunnel("allowed.test").await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let data = payload(MIB);
    echo_round_trip(tls, &data).await;

    let r = rig.record(&target).await;
    assert_eq!(action(&r), "allow", "{r}");
    assert_eq!(rule(&r), "allow-good", "{r}");
    assert_eq!(reason(&r), "allowed-by-rule", "{r}");
    assert_eq!(r["verdict"]["mode"], "enforced", "{r}");
    assert_eq!(field(&r, "listener"), "proxy");
    assert_eq!(field(&r, "sni"), "allowed.test");
    assert_eq!(r["alpn"], serde_json::json!(["h2", "http/1.1"]), "{r}");
    assert_eq!(r["ech"], false);
    assert_eq!(field(&r, "dst"), rig.up.addr.to_string(), "{r}");
    assert!(r["bytes_up"].as_u64().unwrap() >= MIB as u64, "{r}");
    assert!(r["bytes_down"].as_u64().unwrap() >= MIB as u64, "{r}");
    assert!(
        ["client-closed", "upstream-closed"].contains(&field(&r, "close_reason")),
        "{r}"
    );
    assert_eq!(rig.up.handshakes.load(std::sync::atomic::Ordering::SeqCst), 1);
    rig.stop().await;
});

flow_test!(connect_denied_gets_403_naming_rule_and_reason, async {
    let rig = Rig::start().await;
    let target = rig.target("denied.test");
    let (_s, resp) = rig.connect(&target).await;
    assert_eq!(resp.status, 403, "{resp:?}");
    assert_eq!(resp.header("x-sluice-rule"), Some("deny-bad"), "{resp:?}");
    assert_eq!(resp.header("x-sluice-reason"), Some("denied-by-rule"), "{resp:?}");
    assert!(resp.body.contains("deny-bad"), "{resp:?}");
    assert!(resp.body.contains("denied-by-rule"), "{resp:?}");

    let r = rig.record(&target).await;
    assert_eq!(action(&r), "deny", "{r}");
    assert_eq!(rule(&r), "deny-bad", "{r}");
    assert_eq!(field(&r, "close_reason"), "denied", "{r}");
    assert!(r.get("dst").is_none(), "a denied flow dials nothing: {r}");
    assert_eq!(rig.up.accepts(), 0, "the upstream must accept nothing");
    rig.stop().await;
});

flow_test!(connect_then_other_sni_is_sni_mismatch, async {
    let rig = Rig::start().await;
    let target = rig.target("allowed.test");
    let (stream, resp) = rig.connect(&target).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    // Domain fronting: the tunnel names an allowed host, the hello another.
    let hs = within("the TLS handshake to fail", rig.up.pki.connect("evil.test", stream)).await;
    assert!(hs.is_err(), "the handshake must not complete");

    let r = rig.record(&target).await;
    assert_eq!(decided(&r), ("deny", "sni-mismatch"), "{r}");
    assert_eq!(field(&r, "sni"), "evil.test", "{r}");
    assert_eq!(r["bytes_up"], 0, "{r}");
    assert_eq!(rig.up.accepts(), 0, "no byte may reach the upstream");
    rig.stop().await;
});

flow_test!(connect_to_ip_literal_is_decided_by_ip_then_sni, async {
    let rig = Rig::start().await;
    let target = rig.up.addr.to_string();
    let record = |sni: &'static str| {
        let target = target.clone();
        rig.sluice
            .wait_record(move |r| field(r, "connect_target") == target && field(r, "sni") == sni)
    };

    // Allowed SNI: through, by the name's rule.
    let (stream, resp) = rig.connect(&target).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    echo_round_trip(
        up_connect(&rig.up, "allowed.test", stream).await,
        b"hello over an IP literal",
    )
    .await;
    let r = record("allowed.test").await;
    assert_eq!(action(&r), "allow", "{r}");
    assert_eq!(rule(&r), "allow-good", "the SNI decides once known: {r}");

    // Denied SNI to the same allowed address: refused.
    let before = rig.up.accepts();
    let (stream, resp) = rig.connect(&target).await;
    assert_eq!(resp.status, 200, "the address alone is allowed: {resp:?}");
    let hs = within("the TLS handshake to fail", rig.up.pki.connect("denied.test", stream)).await;
    assert!(hs.is_err(), "a denied SNI must not get through");
    let r = record("denied.test").await;
    assert_eq!(action(&r), "deny", "{r}");
    assert_eq!(rule(&r), "deny-bad", "{r}");
    assert_eq!(rig.up.accepts(), before, "the denied flow reached the upstream");
    rig.stop().await;
});

async fn http_client(proxy: std::net::SocketAddr) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

fn get(uri: &str, host: &str) -> Request<Empty<Bytes>> {
    Request::get(uri)
        .header(hyper::header::HOST, host)
        .body(Empty::new())
        .unwrap()
}

async fn send(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    req: Request<Empty<Bytes>>,
) -> (hyper::http::response::Parts, String) {
    within("the sender to be ready", sender.ready()).await.unwrap();
    let resp = within("a response", sender.send_request(req)).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = within("the response body", body.collect()).await.unwrap().to_bytes();
    (parts, String::from_utf8_lossy(&body).into_owned())
}

flow_test!(plain_http_keep_alive_allowed_then_denied_each_audited, async {
    let rig = Rig::<HttpUpstream>::with(&proxy_config()).await;
    let port = rig.up.addr.port();
    let mut client = http_client(rig.proxy()).await;

    let host = format!("allowed.test:{port}");
    let (parts, body) = send(&mut client, get(&format!("http://{host}/x"), &host)).await;
    assert_eq!(parts.status, StatusCode::OK, "{body}");
    assert_eq!(body, format!("upstream saw GET /x host={host}"));

    // Same client connection, a denied host.
    let (parts, body) = send(&mut client, get("http://denied.test/", "denied.test")).await;
    assert_eq!(parts.status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(parts.headers["x-sluice-rule"], "deny-bad");
    assert_eq!(parts.headers["x-sluice-reason"], "denied-by-rule");
    assert!(body.contains("deny-bad") && body.contains("denied-by-rule"), "{body}");

    // And the connection is still usable.
    let (parts, body) = send(&mut client, get(&format!("http://{host}/y"), &host)).await;
    assert_eq!(parts.status, StatusCode::OK, "{body}");
    assert_eq!(body, format!("upstream saw GET /y host={host}"));

    let allowed = rig
        .sluice
        .wait_records(2, |r| field(r, "connect_target") == host && action(r) == "allow")
        .await;
    for r in &allowed {
        assert_eq!(rule(r), "allow-good", "{r}");
        assert_eq!(field(r, "host"), host, "{r}");
        assert_eq!(field(r, "dst"), rig.up.addr.to_string(), "{r}");
        assert!(r["bytes_down"].as_u64().unwrap() > 0, "{r}");
    }
    assert_ne!(allowed[0]["flow_id"], allowed[1]["flow_id"], "one record per request");
    let denied = rig
        .sluice
        .wait_record(|r| field(r, "connect_target") == "denied.test:80")
        .await;
    assert_eq!(action(&denied), "deny", "{denied}");
    assert_eq!(rule(&denied), "deny-bad", "{denied}");
    assert_eq!(
        rig.up.accepts(),
        2,
        "one upstream connection per allowed request, none for the denied one"
    );
    rig.stop().await;
});

flow_test!(name_resolving_to_cloud_metadata_is_guarded_even_when_allowed, async {
    let sluice = Sluice::start(&proxy_config()).await;
    let pki = TestPki::new(CERT_NAMES);

    // Plain HTTP: refused with a 403 naming the guard.
    let mut client = http_client(sluice.addr("proxy")).await;
    let (parts, body) = send(
        &mut client,
        get("http://metadata.test/latest/meta-data/", "metadata.test"),
    )
    .await;
    assert_eq!(parts.status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(parts.headers["x-sluice-reason"], "guard-cloud-metadata", "{body}");
    let r = sluice
        .wait_record(|r| field(r, "connect_target") == "metadata.test:80")
        .await;
    assert_eq!(action(&r), "deny", "{r}");
    assert_eq!(rule(&r), "builtin-guard", "{r}");
    assert!(r.get("dst").is_none(), "nothing dialled: {r}");

    // CONNECT: the name is allowed, but the address it resolves to is
    // screened before the tunnel is answered: a 403 naming the guard.
    let (_stream, resp) = connect_via(sluice.addr("proxy"), "metadata.test:443", "").await;
    assert_eq!(resp.status, 403, "{resp:?}");
    assert_eq!(resp.header("x-sluice-reason"), Some("guard-cloud-metadata"), "{resp:?}");
    let _ = &pki;
    let r = sluice
        .wait_record(|r| field(r, "connect_target") == "metadata.test:443")
        .await;
    assert_eq!(decided(&r), ("deny", "guard-cloud-metadata"), "{r}");
    assert_eq!(field(&r, "close_reason"), "denied", "{r}");
    assert!(r.get("dst").is_none(), "nothing dialled: {r}");
    sluice.stop().await;
});

flow_test!(
    name_resolving_to_the_gateway_is_guarded_without_a_rule_naming_it,
    async {
        let up = TlsEcho::start().await;
        let http_up = HttpUpstream::start().await;
        // No rule names `gateway` or `loopback`: the SSRF guard stands.
        let sluice = Sluice::start(
            "listeners:
  - {name: proxy, kind: http-proxy, address: \"127.0.0.1:0\"}
policy:
  rules:
    - {name: allow-good, to: {webgroups: [good]}, protocols: [tls, http], action: allow}
",
        )
        .await;
        let target = format!("allowed.test:{}", up.addr.port());
        let (stream, resp) = connect_via(sluice.addr("proxy"), &target, "").await;
        // The name is allowed, but 127.0.0.1 is the gateway: refused before
        // the tunnel opens.
        assert_eq!(resp.status, 403, "{resp:?}");
        assert_eq!(resp.header("x-sluice-reason"), Some("guard-gateway"), "{resp:?}");
        drop(stream);
        let r = sluice.wait_record(|r| field(r, "connect_target") == target).await;
        assert_eq!(action(&r), "deny", "{r}");
        assert_eq!(rule(&r), "builtin-guard", "{r}");
        assert_eq!(reason(&r), "guard-gateway", "{r}");
        assert_eq!(up.accepts(), 0);

        let host = format!("allowed.test:{}", http_up.addr.port());
        let mut client = http_client(sluice.addr("proxy")).await;
        let (parts, body) = send(&mut client, get(&format!("http://{host}/"), &host)).await;
        assert_eq!(parts.status, StatusCode::FORBIDDEN, "{body}");
        assert_eq!(parts.headers["x-sluice-reason"], "guard-gateway", "{body}");
        assert_eq!(http_up.accepts(), 0);
        sluice.stop().await;
    }
);

flow_test!(watch_mode_lets_a_would_deny_flow_through_and_records_it, async {
    let rig = TestConfig::listener("proxy", "http-proxy", "")
        .watch()
        .rig::<TlsEcho>()
        .await;
    let target = rig.target("denied.test");
    let (stream, resp) = rig.connect(&target).await;
    assert_eq!(resp.status, 200, "watch mode does not refuse: {resp:?}");
    let tls = within("the TLS handshake", rig.up.pki.connect("denied.test", stream))
        .await
        .expect("the watched flow reaches the upstream");
    echo_round_trip(tls, &payload(4096)).await;

    let r = rig.record(&target).await;
    assert_eq!(action(&r), "deny", "{r}");
    assert_eq!(r["verdict"]["mode"], "watched", "{r}");
    assert_eq!(rule(&r), "deny-bad", "{r}");
    assert_eq!(reason(&r), "denied-by-rule", "{r}");
    assert_eq!(field(&r, "dst"), rig.up.addr.to_string(), "{r}");
    assert!(r["bytes_down"].as_u64().unwrap() >= 4096, "{r}");
    rig.stop().await;
});

flow_test!(silent_tunnel_closes_at_peek_timeout, async {
    let rig = TestConfig::listener("proxy", "http-proxy", "peek_timeout: 300ms")
        .rig::<TlsEcho>()
        .await;
    let target = rig.target("allowed.test");
    let (mut stream, resp) = rig.connect(&target).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    // Send nothing: Sluice gives up waiting for the first bytes.
    assert_eq!(
        wait_closed(&mut stream).await,
        0,
        "nothing comes back on a closed tunnel"
    );
    let r = rig.record(&target).await;
    assert_eq!(decided(&r), ("deny", "peek-timeout"), "{r}");
    assert_eq!(rig.up.accepts(), 0);
    rig.stop().await;
});

/// An `sni` listener forwarding to `upstream_port`, and the standard rules.
fn sni_config(upstream_port: u16, extra_listeners: &str) -> String {
    format!(
        "listeners:
  - {{name: sni, kind: sni, address: \"127.0.0.1:0\", upstream_port: {upstream_port}}}
{extra_listeners}policy:
  rules:
{STD_RULES}"
    )
}

/// Writes `bytes` one per TCP segment, then half-closes.
async fn write_byte_by_byte(stream: &mut TcpStream, bytes: &[u8]) {
    stream.set_nodelay(true).unwrap();
    for b in bytes {
        stream.write_all(std::slice::from_ref(b)).await.unwrap();
        stream.flush().await.unwrap();
    }
}

flow_test!(
    sni_hello_in_one_byte_segments_is_classified_and_replayed_exactly,
    async {
        let rig = Rig::<RawSink>::with_upstream(|up| sni_config(up.port(), "")).await;
        let hello = vector("curl-7.88-openssl-3.0-alpn-h2.bin");

        let mut client = TcpStream::connect(rig.sluice.addr("sni")).await.unwrap();
        write_byte_by_byte(&mut client, &hello).await;
        client.shutdown().await.unwrap();
        let got = rig.up.next_received().await;
        assert!(got == hello, "the upstream must see the exact hello bytes replayed");

        let r = rig.sluice.wait_record(|r| field(r, "sni") == "curl.example.test").await;
        assert_eq!(action(&r), "allow", "{r}");
        assert_eq!(rule(&r), "allow-good", "{r}");
        assert_eq!(r["alpn"], serde_json::json!(["h2", "http/1.1"]), "{r}");
        assert_eq!(r["bytes_up"], hello.len(), "{r}");
        assert_eq!(field(&r, "dst"), rig.up.addr.to_string(), "{r}");
        rig.stop().await;
    }
);

flow_test!(sni_listener_allowed_sni_reaches_upstream_port_with_real_tls, async {
    let rig = Rig::<TlsEcho>::with_upstream(|up| sni_config(up.port(), "")).await;
    let stream = TcpStream::connect(rig.sluice.addr("sni")).await.unwrap();
    let tls = within("the TLS handshake", rig.up.pki.connect("allowed.test", stream))
        .await
        .expect("TLS through the sni listener");
    echo_round_trip(tls, &payload(64 * 1024)).await;
    let r = rig.sluice.wait_record(|r| field(r, "sni") == "allowed.test").await;
    assert_eq!(action(&r), "allow", "{r}");
    assert_eq!(field(&r, "dst"), rig.up.addr.to_string(), "{r}");
    assert!(r["bytes_up"].as_u64().unwrap() >= 64 * 1024, "{r}");
    assert!(r["bytes_down"].as_u64().unwrap() >= 64 * 1024, "{r}");
    rig.stop().await;
});

flow_test!(record_time_is_when_the_flow_was_accepted, async {
    let rig = Rig::<TlsEcho>::with_upstream(|up| sni_config(up.port(), "")).await;
    let before = std::time::SystemTime::now();
    let stream = TcpStream::connect(rig.sluice.addr("sni")).await.unwrap();
    let tls = within("the TLS handshake", rig.up.pki.connect("allowed.test", stream))
        .await
        .expect("TLS through the sni listener");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    echo_round_trip(tls, &payload(1024)).await;
    let r = rig.sluice.wait_record(|r| field(r, "sni") == "allowed.test").await;
    let time = humantime::parse_rfc3339(field(&r, "time")).unwrap();
    // Milliseconds are truncated, so the stamp may read up to 1 ms early.
    let since = time
        .duration_since(before - Duration::from_millis(1))
        .unwrap_or_else(|_| panic!("record time before the connect: {r}"));
    assert!(
        since < Duration::from_millis(1000),
        "stamped {since:?} after the connect: {r}"
    );
    assert!(r["duration_ms"].as_u64().unwrap() >= 1500, "{r}");
    rig.stop().await;
});

flow_test!(sni_listener_denied_sni_gets_no_byte_through, async {
    let rig = Rig::<TlsEcho>::with_upstream(|up| sni_config(up.port(), "")).await;
    let stream = TcpStream::connect(rig.sluice.addr("sni")).await.unwrap();
    let hs = within("the TLS handshake to fail", rig.up.pki.connect("denied.test", stream)).await;
    assert!(hs.is_err());
    let r = rig.sluice.wait_record(|r| field(r, "sni") == "denied.test").await;
    assert_eq!(action(&r), "deny", "{r}");
    assert_eq!(rule(&r), "deny-bad", "{r}");
    assert_eq!(field(&r, "close_reason"), "denied", "{r}");
    assert_eq!(rig.up.accepts(), 0, "no byte may reach the upstream");
    rig.stop().await;
});

/// Sends `bytes` to the sni listener and expects the connection closed with
/// `want` as the reason and nothing forwarded.
async fn sni_refuses(bytes: &[u8], want: &str) {
    let up = RawSink::start().await;
    let sluice = Sluice::start(&sni_config(up.addr.port(), "")).await;
    let mut client = TcpStream::connect(sluice.addr("sni")).await.unwrap();
    client.write_all(bytes).await.unwrap();
    // Half-close, so a flow wrongly forwarded ends too and leaves its record.
    client.shutdown().await.unwrap();
    assert_eq!(wait_closed(&mut client).await, 0);
    let r = sluice.wait_record(|r| field(r, "listener") == "sni").await;
    assert_eq!(action(&r), "deny", "{r}");
    assert_eq!(reason(&r), want, "{r}");
    assert_eq!(field(&r, "close_reason"), "denied", "{r}");
    assert_eq!(up.accepts(), 0, "nothing may be forwarded");
    sluice.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sni_listener_closes_non_tls_bytes_as_not_tls() {
    bounded(sni_refuses(b"SSH-2.0-OpenSSH_9.6\r\n", "not-tls")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sni_listener_refuses_a_hello_in_an_application_data_record() {
    bounded(sni_refuses(
        &as_application_data(rustls_hello("allowed.test")),
        "tls-record-out-of-place",
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sni_listener_closes_plain_http_as_not_tls() {
    bounded(sni_refuses(
        b"GET / HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n",
        "not-tls",
    ))
    .await;
}

flow_test!(sni_listener_closes_malformed_hello_with_tls_reason, async {
    sni_refuses(&vector("error-duplicate-server-name.bin"), "tls-duplicate-extension").await;
    sni_refuses(&vector("error-server-name-with-nul.bin"), "tls-bad-sni").await;
    sni_refuses(&vector("error-sslv2-compat-hello.bin"), "tls-sslv2").await;
});

flow_test!(ech_hello_denied_with_ech_deny_and_allowed_with_ech_allow, async {
    let up = RawSink::start().await;
    let sluice = Sluice::start(&sni_config(
        up.addr.port(),
        &format!(
            "  - {{name: sni-ech-allow, kind: sni, address: \"127.0.0.1:0\", upstream_port: {}, ech: allow}}\n",
            up.addr.port()
        ),
    ))
    .await;
    let hello = vector("rustls-0.23-ech-grease-stub-hpke.bin");

    // `sni` has the default, `ech: deny`.
    let mut client = TcpStream::connect(sluice.addr("sni")).await.unwrap();
    client.write_all(&hello).await.unwrap();
    assert_eq!(wait_closed(&mut client).await, 0);
    let r = sluice.wait_record(|r| field(r, "listener") == "sni").await;
    assert_eq!(decided(&r), ("deny", "ech-present"), "{r}");
    assert_eq!(r["ech"], true, "{r}");
    assert_eq!(up.accepts(), 0);

    let mut client = TcpStream::connect(sluice.addr("sni-ech-allow")).await.unwrap();
    client.write_all(&hello).await.unwrap();
    client.shutdown().await.unwrap();
    let got = up.next_received().await;
    assert!(got == hello, "the ECH hello must be forwarded unchanged");
    let r = sluice.wait_record(|r| field(r, "listener") == "sni-ech-allow").await;
    assert_eq!(action(&r), "allow", "{r}");
    assert_eq!(r["ech"], true, "{r}");
    assert_eq!(field(&r, "sni"), "ech-grease.example.test", "{r}");
    sluice.stop().await;
});

flow_test!(proxy_auth_maps_user_to_smartgroup_identity, async {
    // The source, 127.0.0.1, is not in `devs`; only alice's identity is.
    let rig = Rig::<TlsEcho>::with("smartgroups:
  - {name: devs, cidrs: [10.99.0.0/24]}
listeners:
  - name: proxy
    kind: http-proxy
    address: \"127.0.0.1:0\"
    users: [{name: alice, password: s3cret, smartgroup: devs}]
  - {name: open, kind: http-proxy, address: \"127.0.0.1:0\"}
policy:
  rules:
    - {name: devs-allowed, from: [devs], to: {webgroups: [good], smartgroups: [gateway, loopback]}, protocols: [tls], action: allow}
").await;
    let target = rig.target("allowed.test");
    let basic = |creds: &str| {
        use base64::Engine as _;
        format!(
            "Proxy-Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(creds)
        )
    };

    let (_s, resp) = rig.connect(&target).await;
    assert_eq!(resp.status, 407, "{resp:?}");
    assert!(
        resp.header("proxy-authenticate")
            .is_some_and(|v| v.starts_with("Basic")),
        "{resp:?}"
    );

    let (_s, resp) = connect_via(rig.proxy(), &target, &basic("alice:wrong")).await;
    assert_eq!(resp.status, 407, "{resp:?}");
    let (_s, resp) = connect_via(rig.proxy(), &target, &basic("mallory:s3cret")).await;
    assert_eq!(resp.status, 407, "{resp:?}");

    let (stream, resp) = connect_via(rig.proxy(), &target, &basic("alice:s3cret")).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let tls = within("the TLS handshake", rig.up.pki.connect("allowed.test", stream))
        .await
        .expect("alice reaches the upstream");
    echo_round_trip(tls, b"hi from alice").await;
    let r = rig
        .sluice
        .wait_record(|r| field(r, "connect_target") == target && action(r) == "allow")
        .await;
    assert_eq!(rule(&r), "devs-allowed", "{r}");
    let groups = r["src_groups"].as_array().unwrap();
    assert!(
        groups.iter().any(|g| g == "devs"),
        "the user's group is on the record: {r}"
    );
    assert_eq!(rig.up.accepts(), 1);

    // The same request without an identity is not allowed.
    let (_s, resp) = connect_via(rig.sluice.addr("open"), &target, "").await;
    assert_eq!(resp.status, 403, "{resp:?}");
    assert_eq!(resp.header("x-sluice-reason"), Some("default-deny"), "{resp:?}");

    let denied = rig
        .sluice
        .wait_records(3, |r| {
            reason(r) == "proxy-auth-required" && field(r, "listener") == "proxy"
        })
        .await;
    assert_eq!(denied.len(), 3);
    for r in &denied {
        assert_eq!(
            field(r, "connect_target"),
            target,
            "a refused flow still names its target: {r}"
        );
    }
    rig.stop().await;
});

flow_test!(max_connections_pauses_accepting_until_a_flow_ends, async {
    let rig = TestConfig::listener("proxy", "http-proxy", "max_connections: 2")
        .rig::<TlsEcho>()
        .await;
    let proxy = rig.proxy();
    let target = rig.target("allowed.test");
    let mut open = Vec::new();
    for _ in 0..2 {
        let (stream, resp) = connect_via(proxy, &target, "").await;
        assert_eq!(resp.status, 200, "{resp:?}");
        let tls = within("the TLS handshake", rig.up.pki.connect("allowed.test", stream))
            .await
            .unwrap();
        open.push(tls);
    }

    // The third connects (the kernel queues it) but is not accepted.
    let events = Arc::new(Mutex::new(Vec::<&'static str>::new()));
    let mut third = TcpStream::connect(proxy).await.unwrap();
    third
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let ev = events.clone();
    let waiter = tokio::spawn(async move {
        let resp = read_head(&mut third).await;
        ev.lock().unwrap().push("third-answered");
        (third, resp)
    });
    // Give a wrongly accepted third connection every chance to be
    // answered before the first one ends; the assertion is on the order.
    tokio::time::sleep(Duration::from_millis(300)).await;
    events.lock().unwrap().push("first-closed");
    drop(open.remove(0));

    let (third, resp) = within("the third CONNECT's answer", waiter).await.unwrap();
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(*events.lock().unwrap(), ["first-closed", "third-answered"]);
    let tls = within("the TLS handshake", rig.up.pki.connect("allowed.test", third))
        .await
        .expect("the third flow is served once admitted");
    echo_round_trip(tls, b"third").await;
    rig.stop().await;
});

// ---------------------------------------------------------------------------
// Edges of the behaviours above.

flow_test!(connect_with_pipelined_hello_replays_only_the_hello, async {
    let rig = Rig::<RawSink>::with(&proxy_config()).await;
    let hello = vector("curl-7.88-openssl-3.0-alpn-h2.bin");
    let target = rig.target("curl.example.test");
    // The client does not wait for the 200 before its ClientHello.
    let mut s = TcpStream::connect(rig.proxy()).await.unwrap();
    let mut first = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").into_bytes();
    first.extend_from_slice(&hello);
    s.write_all(&first).await.unwrap();
    let resp = read_head(&mut s).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    s.shutdown().await.unwrap();
    let got = rig.up.next_received().await;
    assert!(
        got == hello,
        "the upstream must see the hello and nothing of the CONNECT request"
    );
    let mut answer = Vec::new();
    within("the upstream's answer", s.read_to_end(&mut answer))
        .await
        .unwrap();
    assert_eq!(answer, format!("got {}", hello.len()).as_bytes(), "half-close relayed");
    let r = rig.record(&target).await;
    assert_eq!(action(&r), "allow", "{r}");
    assert_eq!(field(&r, "sni"), "curl.example.test", "{r}");
    rig.stop().await;
});

flow_test!(
    connect_sni_differing_only_in_case_and_trailing_dot_is_no_mismatch,
    async {
        let rig = Rig::<RawSink>::with(&proxy_config()).await;
        let hello = vector("openssl-3.0-s_client-mixed-case-sni.bin"); // SNI Mixed-Case.Example.TEST
        let target = rig.target("mixed-case.example.test.");
        let (mut s, resp) = rig.connect(&target).await;
        assert_eq!(resp.status, 200, "{resp:?}");
        s.write_all(&hello).await.unwrap();
        s.shutdown().await.unwrap();
        assert!(rig.up.next_received().await == hello);
        let r = rig.record(&target).await;
        assert_eq!(action(&r), "allow", "{r}");
        rig.stop().await;
    }
);

/// An explicit proxy in `mode`, with `options` added to its listener, and a
/// policy whose only allow rule names the destinations without protocols:
/// whatever the tunnel carries, the rule alone would let it pass.
fn tunnel_config(mode: &str, options: &str) -> String {
    format!(
        "listeners:
  - {{name: proxy, kind: http-proxy, address: \"127.0.0.1:0\"{options}}}
policy:
  mode: {mode}
  rules:
    - {{name: deny-bad, to: {{webgroups: [bad]}}, action: deny}}
    - {{name: any-protocol, to: {{webgroups: [good], smartgroups: [gateway, loopback]}}, action: allow}}
"
    )
}

/// Opens `CONNECT allowed.test:PORT`, sends `bytes` through the tunnel and
/// half-closes; returns the flow's record.
async fn through_tunnel(sluice: &Sluice, up: &RawSink, bytes: &[u8]) -> serde_json::Value {
    let target = format!("allowed.test:{}", up.addr.port());
    let of_target = |r: &serde_json::Value| field(r, "connect_target") == target;
    let before = sluice.records().iter().filter(|r| of_target(r)).count();
    let (mut s, resp) = connect_via(sluice.addr("proxy"), &target, "").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    s.write_all(bytes).await.unwrap();
    s.shutdown().await.unwrap();
    let _ = wait_closed(&mut s).await;
    sluice.wait_records(before + 1, of_target).await.swap_remove(before)
}

flow_test!(connect_hello_without_sni_is_refused_as_connect_no_sni, async {
    let rig = Rig::<RawSink>::with(&tunnel_config("enforce", "")).await;
    // Behind a CDN this hello reaches the default virtual host, and the
    // encrypted Host picks any site there: fronting with no name shown.
    let r = through_tunnel(&rig.sluice, &rig.up, &vector("openssl-3.0-s_client-no-sni.bin")).await;
    assert_eq!(decided(&r), ("deny", "connect-no-sni"), "{r}");
    assert_eq!(rule(&r), "anti-evasion", "{r}");
    assert_eq!(r["verdict"]["mode"], "enforced", "{r}");
    assert_eq!(field(&r, "close_reason"), "denied", "{r}");
    assert!(r.get("sni").is_none(), "{r}");
    assert_eq!(rig.up.accepts(), 0, "no byte may reach the upstream");
    rig.stop().await;
});

flow_test!(connect_no_sni_allow_decides_a_hello_without_sni_by_the_target, async {
    let rig = Rig::<RawSink>::with(&tunnel_config("enforce", ", connect_no_sni: allow")).await;
    let hello = vector("openssl-3.0-s_client-no-sni.bin");
    let target = rig.target("allowed.test");
    let (mut s, resp) = rig.connect(&target).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    s.write_all(&hello).await.unwrap();
    s.shutdown().await.unwrap();
    assert!(rig.up.next_received().await == hello);
    let r = rig.record(&target).await;
    assert_eq!(action(&r), "allow", "{r}");
    assert_eq!(rule(&r), "any-protocol", "{r}");
    assert!(r.get("sni").is_none(), "{r}");
    rig.stop().await;
});

flow_test!(
    connect_hello_in_an_application_data_record_is_a_tls_record_out_of_place,
    async {
        let rig = Rig::<RawSink>::with(&tunnel_config("enforce", "")).await;
        // Read as opaque TCP, this passed the rule that names the target
        // without protocols.
        let wrapped = as_application_data(rustls_hello("allowed.test"));
        let r = through_tunnel(&rig.sluice, &rig.up, &wrapped).await;
        assert_eq!(decided(&r), ("deny", "tls-record-out-of-place"), "{r}");
        assert_eq!(rule(&r), "anti-evasion", "{r}");
        assert_eq!(rig.up.accepts(), 0, "no byte may reach the upstream");
        // Every other record type a client cannot open with.
        for t in [20u8, 21, 24] {
            let mut bytes = rustls_hello("allowed.test");
            bytes[0] = t;
            let r = through_tunnel(&rig.sluice, &rig.up, &bytes).await;
            assert_eq!(reason(&r), "tls-record-out-of-place", "type {t}: {r}");
        }
        // Watch mode refuses it too: it is not a policy question.
        let watch = Sluice::start(&tunnel_config("watch", "")).await;
        let r = through_tunnel(&watch, &rig.up, &wrapped).await;
        assert_eq!(reason(&r), "tls-record-out-of-place", "{r}");
        assert_eq!(r["verdict"]["mode"], "enforced", "{r}");
        assert_eq!(rig.up.accepts(), 0, "no byte may reach the upstream");
        watch.stop().await;
        rig.stop().await;
    }
);

/// What the record of each tunnel scenario says, in `mode`: (action, rule,
/// reason, mode) per scenario.
async fn tunnel_verdicts(mode: &str) -> Vec<(String, String, String, String)> {
    let up = RawSink::start().await;
    let sluice = Sluice::start(&tunnel_config(mode, "")).await;
    let scenarios: Vec<(&str, Vec<u8>)> = vec![
        // Fronting: the hello names a denied host.
        ("sni-b-denied", rustls_hello("evil.test")),
        // Fronting: the hello names a host no rule mentions.
        ("sni-b-unknown", rustls_hello("unlisted.example")),
        ("no-sni", vector("openssl-3.0-s_client-no-sni.bin")),
        (
            "plain-http-other-host",
            b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n".to_vec(),
        ),
        ("allowed", rustls_hello("allowed.test")),
    ];
    let mut out = Vec::new();
    for (name, bytes) in scenarios {
        let r = through_tunnel(&sluice, &up, &bytes).await;
        let v = &r["verdict"];
        let text = |k: &str| {
            v[k].as_str()
                .unwrap_or_else(|| panic!("{name}: verdict without `{k}`: {r}"))
        };
        out.push((
            text("action").to_owned(),
            text("rule").to_owned(),
            text("reason").to_owned(),
            text("mode").to_owned(),
        ));
    }
    sluice.stop().await;
    out
}

flow_test!(watch_mode_records_the_verdict_and_reason_enforce_carries_out, async {
    let enforce = tunnel_verdicts("enforce").await;
    let watch = tunnel_verdicts("watch").await;
    assert_eq!(enforce[0].2, "sni-mismatch", "{enforce:?}");
    assert_eq!(enforce[0].1, "anti-evasion", "{enforce:?}");
    assert_eq!(enforce[2].2, "connect-no-sni", "{enforce:?}");
    assert_eq!(enforce[3].2, "host-mismatch", "{enforce:?}");
    assert_eq!(enforce[4].2, "allowed-by-rule", "{enforce:?}");
    for (e, w) in enforce.iter().zip(&watch) {
        assert_eq!(
            (&e.0, &e.1, &e.2),
            (&w.0, &w.1, &w.2),
            "watch must record what enforce does"
        );
        assert_eq!((e.3.as_str(), w.3.as_str()), ("enforced", "watched"), "{e:?} / {w:?}");
    }
});

flow_test!(connect_tunnel_plain_http_is_checked_against_the_target, async {
    let rig = Rig::<RawSink>::with(&proxy_config()).await;
    let target = rig.target("allowed.test");

    let (mut s, resp) = rig.connect(&target).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    s.write_all(b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n").await.unwrap();
    assert_eq!(wait_closed(&mut s).await, 0);
    let r = rig.record(&target).await;
    assert_eq!(decided(&r), ("deny", "host-mismatch"), "{r}");
    assert_eq!(rig.up.accepts(), 0);

    let request = format!("GET / HTTP/1.1\r\nHost: {target}\r\n\r\n");
    let (mut s, resp) = rig.connect(&target).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    s.write_all(request.as_bytes()).await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(rig.up.next_received().await, request.as_bytes());
    let r = rig
        .sluice
        .wait_record(|r| field(r, "connect_target") == target && action(r) == "allow")
        .await;
    assert_eq!(field(&r, "host"), target, "{r}");
    rig.stop().await;
});

flow_test!(connect_ech_hello_denied_by_http_proxy_default, async {
    let rig = Rig::<RawSink>::with(&proxy_config()).await;
    let target = rig.target("ech-grease.example.test");
    let (mut s, resp) = rig.connect(&target).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    s.write_all(&vector("rustls-0.23-ech-grease-stub-hpke.bin"))
        .await
        .unwrap();
    assert_eq!(wait_closed(&mut s).await, 0);
    let r = rig.record(&target).await;
    assert_eq!(decided(&r), ("deny", "ech-present"), "{r}");
    assert_eq!(rig.up.accepts(), 0);
    rig.stop().await;
});

flow_test!(watch_mode_records_sni_mismatch_and_forwards, async {
    let rig = TestConfig::listener("proxy", "http-proxy", "")
        .watch()
        .rig::<RawSink>()
        .await;
    // Both names are allowed, so only the mismatch would deny. (With a
    // denied SNI the record carries the policy's would-deny instead.)
    let target = rig.target("allowed.test");
    let hello = vector("curl-7.88-openssl-3.0-alpn-h2.bin"); // SNI curl.example.test
    let (mut s, resp) = rig.connect(&target).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    s.write_all(&hello).await.unwrap();
    s.shutdown().await.unwrap();
    assert!(rig.up.next_received().await == hello, "watch mode forwards");
    let r = rig.record(&target).await;
    assert_eq!(action(&r), "deny", "{r}");
    assert_eq!(r["verdict"]["mode"], "watched", "{r}");
    assert_eq!(reason(&r), "sni-mismatch", "{r}");
    rig.stop().await;
});

flow_test!(
    connect_to_a_closed_port_closes_the_tunnel_with_the_connect_error,
    async {
        // A port nothing listens on: bind, note, close.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let sluice = Sluice::start(&proxy_config()).await;
        let target = format!("allowed.test:{port}");
        let (mut s, resp) = connect_via(sluice.addr("proxy"), &target, "").await;
        assert_eq!(resp.status, 200, "{resp:?}");
        s.write_all(&rustls_hello("allowed.test")).await.unwrap();
        assert_eq!(wait_closed(&mut s).await, 0);
        let r = sluice.wait_record(|r| field(r, "connect_target") == target).await;
        assert_eq!(action(&r), "allow", "the verdict stays the policy's: {r}");
        assert_eq!(field(&r, "close_reason"), "connect-refused", "{r}");

        let host = format!("allowed.test:{port}");
        let mut client = http_client(sluice.addr("proxy")).await;
        let (parts, body) = send(&mut client, get(&format!("http://{host}/"), &host)).await;
        assert_eq!(parts.status, StatusCode::BAD_GATEWAY, "{body}");
        let r = sluice
            .wait_record(|r| field(r, "connect_target") == host && field(r, "host") == host)
            .await;
        assert_eq!(field(&r, "close_reason"), "connect-refused", "{r}");
        sluice.stop().await;
    }
);

flow_test!(plain_http_strips_proxy_credentials_and_hop_by_hop_headers, async {
    let rig = TestConfig::listener(
        "proxy",
        "http-proxy",
        "users: [{name: alice, password: s3cret, smartgroup: devs}]",
    )
    .head("smartgroups:\n  - {name: devs, cidrs: [10.99.0.0/24]}\n")
    .rig::<HttpUpstream>()
    .await;
    let host = rig.target("allowed.test");
    let mut client = http_client(rig.proxy()).await;

    let (parts, body) = send(&mut client, get(&format!("http://{host}/"), &host)).await;
    assert_eq!(parts.status, StatusCode::PROXY_AUTHENTICATION_REQUIRED, "{body}");
    assert!(parts.headers.contains_key("proxy-authenticate"));
    let r = rig.sluice.wait_record(|r| reason(r) == "proxy-auth-required").await;
    assert_eq!(
        field(&r, "connect_target"),
        host,
        "a refused request still names its target: {r}"
    );

    use base64::Engine as _;
    let creds = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
    let req = Request::get(format!("http://{host}/"))
        .header(hyper::header::HOST, &host)
        .header("proxy-authorization", format!("Basic {creds}"))
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "for the proxy only")
        .header("x-end", "for the origin")
        .body(Empty::new())
        .unwrap();
    let (parts, body) = send(&mut client, req).await;
    assert_eq!(parts.status, StatusCode::OK, "{body}");
    let seen = parts.headers["x-upstream-headers"].to_str().unwrap().to_owned();
    let seen: Vec<&str> = seen.split(',').collect();
    assert!(seen.contains(&"x-end"), "{seen:?}");
    assert!(
        !seen.contains(&"proxy-authorization"),
        "credentials leaked upstream: {seen:?}"
    );
    assert!(!seen.contains(&"connection"), "{seen:?}");
    assert!(
        !seen.contains(&"x-hop"),
        "a header named in Connection is hop-by-hop (RFC 9110 7.6.1): {seen:?}"
    );
    rig.stop().await;
});

flow_test!(plain_http_post_body_is_forwarded_and_counted, async {
    let rig = Rig::<HttpUpstream>::with(&proxy_config()).await;
    let host = rig.target("allowed.test");
    let stream = TcpStream::connect(rig.proxy()).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let data = payload(256 * 1024);
    let req = Request::post(format!("http://{host}/upload"))
        .header(hyper::header::HOST, &host)
        .body(http_body_util::Full::new(Bytes::from(data.clone())))
        .unwrap();
    let resp = within("a response", sender.send_request(req)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-upstream-body-len"], data.len().to_string().as_str());
    let _ = resp.into_body().collect().await.unwrap();
    let r = rig.sluice.wait_record(|r| field(r, "host") == host).await;
    assert!(r["bytes_up"].as_u64().unwrap() >= data.len() as u64, "{r}");
    rig.stop().await;
});

flow_test!(plain_http_refusals_for_bad_requests, async {
    let rig = Rig::<HttpUpstream>::with(&proxy_config()).await;
    let host = rig.target("allowed.test");
    // The first request of a connection is refused by the classifier
    // itself, which then closes the connection.
    let mut client = http_client(rig.proxy()).await;
    let (parts, body) = send(&mut client, get(&format!("http://{host}/"), "evil.test")).await;
    assert_eq!(parts.status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(parts.headers["x-sluice-reason"], "http-conflicting-host");

    // Later requests on a kept-alive connection are refused one by one.
    let mut client = http_client(rig.proxy()).await;
    let (parts, body) = send(&mut client, get(&format!("http://{host}/ok"), &host)).await;
    assert_eq!(parts.status, StatusCode::OK, "{body}");

    let (parts, body) = send(&mut client, get(&format!("http://{host}/"), "evil.test")).await;
    assert_eq!(parts.status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(parts.headers["x-sluice-reason"], "http-conflicting-host");

    let (parts, body) = send(&mut client, get("http://2130706433/", "2130706433")).await;
    assert_eq!(parts.status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(parts.headers["x-sluice-reason"], "http-bad-host");

    let req = Request::connect(host.as_str())
        .header(hyper::header::HOST, &host)
        .body(Empty::new())
        .unwrap();
    let (parts, body) = send(&mut client, req).await;
    assert_eq!(parts.status, StatusCode::METHOD_NOT_ALLOWED, "{body}");
    assert_eq!(parts.headers["x-sluice-reason"], "connect-not-first");
    assert_eq!(rig.up.accepts(), 1, "only the allowed request was forwarded");
    rig.stop().await;
});

flow_test!(connect_numeric_ip_spellings_do_not_evade_the_guard, async {
    // Everything allowed by rule, but the guard (gateway, loopback) stands.
    let rig = Rig::<RawSink>::with(
        "listeners:
  - {name: proxy, kind: http-proxy, address: \"127.0.0.1:0\"}
policy:
  rules:
    - {name: anything, action: allow}
",
    )
    .await;
    let port = rig.up.addr.port();
    for host in ["2130706433", "0x7f.1", "0177.0.0.1", "127.1", "[::ffff:127.0.0.1]"] {
        let target = format!("{host}:{port}");
        let (mut s, resp) = rig.connect(&target).await;
        if resp.status == 200 {
            // Read as an address: the guard must screen it.
            s.write_all(&vector("openssl-3.0-s_client-no-sni.bin")).await.unwrap();
            assert_eq!(wait_closed(&mut s).await, 0);
            let r = rig.record(&target).await;
            assert_eq!(action(&r), "deny", "{target}: {r}");
            assert!(reason(&r).starts_with("guard-"), "{target}: {r}");
        } else if resp.status == 403 {
            // Read as the address it is, and guarded at once.
            assert!(
                resp.header("x-sluice-reason").is_some_and(|r| r.starts_with("guard-")),
                "{target}: {resp:?}"
            );
        } else {
            // Refused as ambiguous before any decision.
            assert_eq!(resp.status, 400, "{target}: {resp:?}");
            assert_eq!(
                resp.header("x-sluice-reason"),
                Some("http-bad-host"),
                "{target}: {resp:?}"
            );
        }
    }
    assert_eq!(rig.up.accepts(), 0, "a numeric spelling reached 127.0.0.1");
    rig.stop().await;
});

#[tokio::test(flavor = "multi_thread")]
async fn sni_listener_hello_without_sni_is_refused() {
    bounded(sni_refuses(&vector("openssl-3.0-s_client-no-sni.bin"), "no-sni")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sni_listener_refuses_oversized_hello_declaration() {
    bounded(sni_refuses(
        &vector("error-declared-64k-oversized.bin"),
        "tls-oversized",
    ))
    .await;
}

// ---------------------------------------------------------------------------
// Timeouts, draining, and one record per flow.

flow_test!(every_flow_leaves_exactly_one_record, async {
    let tls_up = TlsEcho::start().await;
    let http_up = HttpUpstream::start().await;
    let sluice = Sluice::start(&proxy_config()).await;
    let proxy = sluice.addr("proxy");

    // 1: allowed tunnel. 2: 403 tunnel. 3: sni-mismatch. 4-6: three
    // requests on one kept-alive connection (allowed, denied, allowed).
    let (stream, _) = connect_via(proxy, &format!("allowed.test:{}", tls_up.addr.port()), "").await;
    let tls = up_connect(&tls_up, "allowed.test", stream).await;
    echo_round_trip(tls, b"one").await;
    let (_s, resp) = connect_via(proxy, "denied.test:443", "").await;
    assert_eq!(resp.status, 403);
    let (stream, _) = connect_via(proxy, &format!("allowed.test:{}", tls_up.addr.port()), "").await;
    assert!(tls_up.pki.connect("evil.test", stream).await.is_err());
    let host = format!("allowed.test:{}", http_up.addr.port());
    let mut client = http_client(proxy).await;
    for (uri, h, want) in [
        (format!("http://{host}/a"), host.clone(), StatusCode::OK),
        (
            "http://denied.test/".to_owned(),
            "denied.test".to_owned(),
            StatusCode::FORBIDDEN,
        ),
        (format!("http://{host}/b"), host.clone(), StatusCode::OK),
    ] {
        let (parts, body) = send(&mut client, get(&uri, &h)).await;
        assert_eq!(parts.status, want, "{body}");
    }
    drop(client);
    sluice.wait_records(6, |_| true).await;

    let records = sluice.stop_and_records(Duration::from_millis(200)).await;
    let mut ids: Vec<u64> = records.iter().map(|r| r["flow_id"].as_u64().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(
        (records.len(), ids.len()),
        (6, 6),
        "six flows, six records, distinct ids:\n{}",
        records.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")
    );
});

flow_test!(idle_tunnel_closes_at_idle_timeout, async {
    let rig = TestConfig::listener("proxy", "http-proxy", "idle_timeout: 300ms")
        .rig::<TlsEcho>()
        .await;
    let target = rig.target("allowed.test");
    let (stream, resp) = rig.connect(&target).await;
    assert_eq!(resp.status, 200);
    let mut tls = up_connect(&rig.up, "allowed.test", stream).await;
    // Say nothing more: Sluice closes the idle flow.
    wait_closed(&mut tls).await;
    let r = rig.record(&target).await;
    assert_eq!(action(&r), "allow", "{r}");
    assert_eq!(field(&r, "close_reason"), "idle-timeout", "{r}");
    rig.stop().await;
});

flow_test!(silent_clients_time_out_on_every_listener_kind, async {
    let rig = Rig::<RawSink>::with_upstream(|up| {
        TestConfig::listener(
            "sni",
            "sni",
            &format!("upstream_port: {}, peek_timeout: 300ms", up.port()),
        )
        .and("proxy", "http-proxy", "peek_timeout: 300ms")
        .yaml()
    })
    .await;
    for listener in ["sni", "proxy"] {
        let mut s = TcpStream::connect(rig.sluice.addr(listener)).await.unwrap();
        assert_eq!(
            wait_closed(&mut s).await,
            0,
            "{listener}: nothing is sent to a silent client"
        );
        let r = rig.sluice.wait_record(|r| field(r, "listener") == listener).await;
        assert_eq!(decided(&r), ("deny", "peek-timeout"), "{r}");
    }
    assert_eq!(rig.up.accepts(), 0);
    rig.stop().await;
});

flow_test!(shutdown_closes_a_tunnel_that_outlives_the_drain_and_records_it, async {
    let rig = Rig::start().await;
    let proxy = rig.proxy();
    let target = rig.target("allowed.test");
    let (stream, _) = connect_via(proxy, &target, "").await;
    let mut tls = up_connect(&rig.up, "allowed.test", stream).await;
    tls.write_all(b"before shutdown").await.unwrap();
    let mut echo = [0u8; 15];
    tls.read_exact(&mut echo).await.unwrap();

    let records = rig.sluice.stop_and_records(Duration::from_millis(100)).await;
    wait_closed(&mut tls).await;
    let r = records
        .iter()
        .find(|r| field(r, "connect_target") == target)
        .unwrap_or_else(|| panic!("the cut flow's record was not flushed: {records:?}"));
    assert_eq!(field(r, "close_reason"), "cancelled", "{r}");
    assert!(
        TcpStream::connect(proxy).await.is_err(),
        "the listener must be closed after shutdown"
    );
});

flow_test!(shutdown_closes_kept_alive_plain_http_connections, async {
    let rig = Rig::<HttpUpstream>::with(&proxy_config()).await;
    let host = rig.target("allowed.test");
    let mut client = http_client(rig.proxy()).await;
    let (parts, _) = send(&mut client, get(&format!("http://{host}/before"), &host)).await;
    assert_eq!(parts.status, StatusCode::OK);

    rig.sluice.stop_and_records(Duration::from_millis(100)).await;
    // The proxy is gone: the kept-alive connection must not still be
    // served (its records would go nowhere).
    let served = match within("the sender", client.ready()).await {
        Ok(()) => within(
            "a response",
            client.send_request(get(&format!("http://{host}/after"), &host)),
        )
        .await
        .is_ok(),
        Err(_) => false,
    };
    assert!(!served, "a request was served after shutdown");
});

// ---------------------------------------------------------------------------
// transparent and tcp listeners, as far as they go without iptables.

flow_test!(
    transparent_listener_refuses_a_connection_that_was_not_redirected,
    async {
        let sluice = TestConfig::listener("tp", "transparent", "").start().await;
        let mut s = TcpStream::connect(sluice.addr("tp")).await.unwrap();
        s.write_all(&vector("curl-7.88-openssl-3.0-alpn-h2.bin")).await.unwrap();
        assert_eq!(wait_closed(&mut s).await, 0);
        let r = sluice.wait_record(|r| field(r, "listener") == "tp").await;
        assert_eq!(decided(&r), ("deny", "no-original-destination"), "{r}");
        sluice.stop().await;
    }
);

/// A `tcp` listener with a static `upstream` and one allow rule.
async fn tcp_static(upstream: &str, rule: &str) -> Sluice {
    TestConfig::listener("east-west", "tcp", &format!("upstream: \"{upstream}\""))
        .rules(&format!("    - {rule}\n"))
        .start()
        .await
}

async fn tcp_forwards(sluice: &Sluice, up: &RawSink) -> serde_json::Value {
    let mut s = TcpStream::connect(sluice.addr("east-west")).await.unwrap();
    s.write_all(b"\x00east-west bytes").await.unwrap();
    s.shutdown().await.unwrap();
    let mut answer = Vec::new();
    let _ = within("the connection to end", s.read_to_end(&mut answer)).await;
    let r = sluice.wait_record(|r| field(r, "listener") == "east-west").await;
    assert_eq!(action(&r), "allow", "{r}");
    assert_eq!(up.next_received().await, b"\x00east-west bytes");
    assert_eq!(answer, b"got 16");
    r
}

flow_test!(tcp_listener_static_upstream_allowed_by_address_rule, async {
    let up = RawSink::start().await;
    let sluice = tcp_static(
        &up.addr.to_string(),
        "{name: to-db, to: {smartgroups: [gateway, loopback]}, protocols: [tcp], action: allow}",
    )
    .await;
    tcp_forwards(&sluice, &up).await;
    sluice.stop().await;
});

flow_test!(tcp_listener_static_upstream_allowed_by_port_rule, async {
    let up = RawSink::start().await;
    let sluice = tcp_static(
        &up.addr.to_string(),
        &format!(
            "{{name: to-db, to: {{smartgroups: [gateway, loopback]}}, protocols: [tcp], ports: [{}], action: allow}}",
            up.addr.port()
        ),
    )
    .await;
    tcp_forwards(&sluice, &up).await;
    sluice.stop().await;
});

flow_test!(tcp_listener_static_upstream_by_name_allowed_by_webgroup_rule, async {
    let up = RawSink::start().await;
    let sluice = tcp_static(
        &format!("allowed.test:{}", up.addr.port()),
        "{name: to-db, to: {webgroups: [good], smartgroups: [gateway, loopback]}, protocols: [tcp], action: allow}",
    )
    .await;
    let r = tcp_forwards(&sluice, &up).await;
    assert_eq!(rule(&r), "to-db", "{r}");
    sluice.stop().await;
});

flow_test!(tcp_listener_denies_by_rule, async {
    let up = RawSink::start().await;
    let sluice = tcp_static(
        &up.addr.to_string(),
        "{name: no-db, to: {smartgroups: [gateway, loopback]}, protocols: [tcp], action: deny}",
    )
    .await;
    let mut s = TcpStream::connect(sluice.addr("east-west")).await.unwrap();
    let _ = s.write_all(b"\x00east-west bytes").await;
    assert_eq!(wait_closed(&mut s).await, 0, "a denied flow gets no byte back");
    let r = sluice.wait_record(|r| field(r, "listener") == "east-west").await;
    assert_eq!(decided(&r), ("deny", "denied-by-rule"), "{r}");
    assert_eq!(rule(&r), "no-db", "{r}");
    assert_eq!(field(&r, "close_reason"), "denied", "{r}");
    assert_eq!(up.accepts(), 0, "nothing may reach the upstream");
    sluice.stop().await;
});

flow_test!(tcp_listener_in_watch_mode_forwards_and_records_the_would_deny, async {
    let rig = Rig::<RawSink>::with_upstream(|up| TestConfig::listener("east-west", "tcp", &format!("upstream: \"{}\"", up))
            .watch()
            .rules("    - {name: nothing-for-db, to: {smartgroups: [gateway, loopback]}, protocols: [tcp], action: deny}\n")
            .yaml()).await;
    let mut s = TcpStream::connect(rig.sluice.addr("east-west")).await.unwrap();
    s.write_all(b"\x00east-west bytes").await.unwrap();
    s.shutdown().await.unwrap();
    let mut answer = Vec::new();
    let _ = within("the connection to end", s.read_to_end(&mut answer)).await;
    assert_eq!(rig.up.next_received().await, b"\x00east-west bytes");
    assert_eq!(answer, b"got 16");
    let r = rig.sluice.wait_record(|r| field(r, "listener") == "east-west").await;
    assert_eq!(action(&r), "deny", "{r}");
    assert_eq!(rule(&r), "nothing-for-db", "{r}");
    assert_eq!(reason(&r), "denied-by-rule", "{r}");
    assert_eq!(r["verdict"]["mode"], "watched", "{r}");
    assert_eq!(r["bytes_up"], 16, "{r}");
    rig.stop().await;
});

// ---------------------------------------------------------------------------
// Fragmented and large hellos on the wire.

flow_test!(connect_head_and_hello_in_one_byte_segments_are_classified, async {
    let rig = Rig::<RawSink>::with(&proxy_config()).await;
    let target = rig.target("curl.example.test");
    let hello = vector("curl-7.88-split-3-records.bin");
    let mut s = TcpStream::connect(rig.proxy()).await.unwrap();
    write_byte_by_byte(
        &mut s,
        format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes(),
    )
    .await;
    let resp = read_head(&mut s).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    write_byte_by_byte(&mut s, &hello).await;
    s.shutdown().await.unwrap();
    assert!(
        rig.up.next_received().await == hello,
        "the upstream must see the exact hello"
    );
    let r = rig.record(&target).await;
    assert_eq!(action(&r), "allow", "{r}");
    assert_eq!(field(&r, "sni"), "curl.example.test", "{r}");
    rig.stop().await;
});

flow_test!(sni_post_quantum_hellos_split_over_records_are_routed, async {
    let rig = Rig::<RawSink>::with_upstream(|up| {
        TestConfig::listener("sni", "sni", &format!("upstream_port: {}, ech: allow", up.port())).yaml()
    })
    .await;
    for file in [
        "rustls-pq-split-inside-handshake-header.bin",
        "rustls-pq-split-5-records.bin",
        "rustls-0.23-stub-x25519mlkem768-ech-grease.bin",
    ] {
        let hello = vector(file);
        let mut s = TcpStream::connect(rig.sluice.addr("sni")).await.unwrap();
        write_byte_by_byte(&mut s, &hello).await;
        s.shutdown().await.unwrap();
        assert!(
            rig.up.next_received().await == hello,
            "{file}: the upstream must see the exact hello"
        );
        let mut answer = Vec::new();
        let _ = within("the flow to end", s.read_to_end(&mut answer)).await;
    }
    let records = rig
        .sluice
        .wait_records(3, |r| field(r, "sni") == "chrome-like.example.test")
        .await;
    for r in records {
        assert_eq!(action(&r), "allow", "{r}");
        assert_eq!(r["ech"], true, "{r}");
    }
    rig.stop().await;
});

flow_test!(max_client_hello_refuses_a_larger_hello, async {
    let rig = Rig::<RawSink>::with_upstream(|up| {
        TestConfig::listener(
            "sni",
            "sni",
            &format!("upstream_port: {}, ech: allow, max_client_hello: 1024", up.port()),
        )
        .yaml()
    })
    .await;
    let mut s = TcpStream::connect(rig.sluice.addr("sni")).await.unwrap();
    s.write_all(&vector("rustls-0.23-stub-x25519mlkem768-ech-grease.bin"))
        .await
        .unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(wait_closed(&mut s).await, 0);
    let r = rig.sluice.wait_record(|r| field(r, "listener") == "sni").await;
    assert_eq!(decided(&r), ("deny", "tls-oversized"), "{r}");
    assert_eq!(rig.up.accepts(), 0);
    rig.stop().await;
});

flow_test!(idle_kept_alive_plain_http_connection_closes_at_idle_timeout, async {
    let rig = TestConfig::listener("proxy", "http-proxy", "idle_timeout: 300ms, max_connections: 1")
        .rig::<HttpUpstream>()
        .await;
    let host = rig.target("allowed.test");
    let stream = TcpStream::connect(rig.proxy()).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let (parts, _) = send(&mut sender, get(&format!("http://{host}/"), &host)).await;
    assert_eq!(parts.status, StatusCode::OK);
    // Idle from here on: the proxy must close the connection, or an idle
    // client would hold a connection slot (here the only one) forever.
    within("the idle connection to be closed", conn).await.unwrap().ok();
    let mut client = http_client(rig.proxy()).await;
    let (parts, _) = send(&mut client, get(&format!("http://{host}/next"), &host)).await;
    assert_eq!(parts.status, StatusCode::OK, "the slot was freed");
    rig.stop().await;
});

flow_test!(guard_screens_each_resolved_address_and_ipv4_mapped_spellings, async {
    let rig = Rig::start().await;

    // Two addresses, one guarded: only the other is dialled.
    let target = rig.target("mixed.test");
    let (stream, resp) = rig.connect(&target).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let tls = up_connect(&rig.up, "mixed.test", stream).await;
    echo_round_trip(tls, b"mixed").await;
    let r = rig.record(&target).await;
    assert_eq!(action(&r), "allow", "{r}");
    assert_eq!(field(&r, "dst"), rig.up.addr.to_string(), "{r}");

    // The metadata address written as IPv4-mapped IPv6 is still guarded.
    let (_stream, resp) = rig.connect("mapped.test:443").await;
    assert_eq!(resp.status, 403, "{resp:?}");
    assert_eq!(resp.header("x-sluice-reason"), Some("guard-cloud-metadata"), "{resp:?}");
    let r = rig
        .sluice
        .wait_record(|r| field(r, "connect_target") == "mapped.test:443")
        .await;
    assert_eq!(decided(&r), ("deny", "guard-cloud-metadata"), "{r}");
    rig.stop().await;
});

flow_test!(reload_closes_the_open_flows_it_denies_and_only_those, async {
    let rig = Rig::start().await;
    let proxy = rig.proxy();
    let target = rig.target("allowed.test");
    let (stream, resp) = connect_via(proxy, &target, "").await;
    assert_eq!(resp.status, 200);
    let mut open = up_connect(&rig.up, "allowed.test", stream).await;
    let reload = |watch: bool, rule: &str| {
        let config = TestConfig::listener("proxy", "http-proxy", "").rules(&format!("{rule}{STD_RULES}"));
        let config = if watch { config.watch() } else { config };
        let sluice = &rig.sluice;
        async move { sluice.reload(&config).await }
    };

    // A configuration that still allows the flow leaves it alone.
    reload(
        false,
        "    - {name: unrelated, to: {webgroups: [bad]}, protocols: [dns], action: deny}\n",
    )
    .await;
    echo(&mut open, b"still allowed").await;
    // One that denies it only in watch mode leaves it alone too.
    reload(
        true,
        "    - {name: now-denied, to: {webgroups: [good]}, action: deny}\n",
    )
    .await;
    echo(&mut open, b"only watched").await;

    // Enforced: new flows are refused, and the open one is closed.
    reload(
        false,
        "    - {name: now-denied, to: {webgroups: [good]}, action: deny}\n",
    )
    .await;
    let (_s, resp) = connect_via(proxy, &target, "").await;
    assert_eq!(resp.status, 403, "{resp:?}");
    assert_eq!(resp.header("x-sluice-rule"), Some("now-denied"));
    let mut rest = Vec::new();
    let end = within("the revoked flow to close", open.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "bytes after the revocation: {rest:?} ({end:?})");

    let r = rig
        .sluice
        .wait_record(|r| field(r, "connect_target") == target && field(r, "close_reason") == "policy-revoked")
        .await;
    assert_eq!(action(&r), "deny", "{r}");
    assert_eq!(r["verdict"]["rule"], "now-denied", "{r}");
    assert_eq!(r["verdict"]["mode"], "enforced", "{r}");
    // It did relay before: both echoes' bytes are counted.
    assert!(r["bytes_down"].as_u64().unwrap() >= 25, "{r}");
    rig.stop().await;
});

// An authenticated user's tunnel is re-checked by the user's SmartGroup
// *name*: a reload that renumbers the groups leaves it open, one that no
// longer allows the group closes it.
flow_test!(reload_rechecks_an_authenticated_tunnel_by_group_name, async {
    let config = |groups: &str, rules: &str| {
        TestConfig::listener(
            "proxy",
            "http-proxy",
            "users: [{name: alice, password: s3cret, smartgroup: devs}]",
        )
        .head(&format!("smartgroups:\n{groups}  - {{name: devs, cidrs: [10.99.0.0/24]}}\n"))
        .rules(&format!(
            "{rules}    - {{name: test-upstreams, from: [devs], to: {{smartgroups: [gateway, loopback]}}, protocols: [tls], action: allow}}\n"
        ))
    };
    let devs_allowed = "    - {name: devs-allowed, from: [devs], to: {webgroups: [good], smartgroups: [gateway, loopback]}, protocols: [tls], action: allow}\n";
    let rig = config("", devs_allowed).rig::<TlsEcho>().await;
    let target = rig.target("allowed.test");
    let creds = {
        use base64::Engine as _;
        format!(
            "Proxy-Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode("alice:s3cret")
        )
    };
    let (stream, resp) = connect_via(rig.proxy(), &target, &creds).await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let mut open = up_connect(&rig.up, "allowed.test", stream).await;
    echo(&mut open, b"as alice").await;

    // New groups declared first: `devs` gets another id; still allowed.
    let renumbered = config(
        "  - {name: ops, cidrs: [10.98.0.0/24]}\n  - {name: qa, cidrs: [10.97.0.0/24]}\n",
        devs_allowed,
    );
    rig.sluice.reload(&renumbered).await;
    echo(&mut open, b"renumbered").await;

    // `devs` no longer reaches the good names: the tunnel is closed.
    rig.sluice.reload(&config("", "")).await;
    let mut rest_bytes = Vec::new();
    let _ = within("the revoked tunnel to close", open.read_to_end(&mut rest_bytes)).await;
    assert!(rest_bytes.is_empty());
    let r = rig
        .sluice
        .wait_record(|r| field(r, "connect_target") == target && field(r, "close_reason") == "policy-revoked")
        .await;
    assert_eq!(decided(&r), ("deny", "default-deny"), "{r}");
    rig.stop().await;
});

flow_test!(reload_applies_to_the_next_request_on_a_kept_alive_connection, async {
    let rig = Rig::<HttpUpstream>::with(&proxy_config()).await;
    let proxy = rig.proxy();
    let host = rig.target("allowed.test");
    let mut client = http_client(proxy).await;
    let (parts, _) = send(&mut client, get(&format!("http://{host}/before"), &host)).await;
    assert_eq!(parts.status, StatusCode::OK);

    let now_denied = "    - {name: now-denied, to: {webgroups: [good]}, action: deny}\n";
    let config = TestConfig::listener("proxy", "http-proxy", "").rules(&format!("{now_denied}{STD_RULES}"));
    rig.sluice.reload(&config).await;

    // Each request is its own flow, decided by the policy in force when
    // it arrives — a pooled client connection must not keep a revoked
    // permission.
    let (parts, body) = send(&mut client, get(&format!("http://{host}/after"), &host)).await;
    assert_eq!(parts.status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(parts.headers["x-sluice-rule"], "now-denied");
    rig.stop().await;
});

flow_test!(
    watch_mode_records_ech_but_still_refuses_what_cannot_be_classified,
    async {
        let rig = Rig::<RawSink>::with_upstream(|up| {
            TestConfig::listener("sni", "sni", &format!("upstream_port: {}", up.port()))
                .watch()
                .yaml()
        })
        .await;
        let hello = vector("rustls-0.23-ech-grease-stub-hpke.bin");
        let mut s = TcpStream::connect(rig.sluice.addr("sni")).await.unwrap();
        s.write_all(&hello).await.unwrap();
        s.shutdown().await.unwrap();
        assert!(rig.up.next_received().await == hello, "watched ECH is forwarded");
        let r = rig
            .sluice
            .wait_record(|r| field(r, "sni") == "ech-grease.example.test")
            .await;
        assert_eq!(action(&r), "deny", "{r}");
        assert_eq!(r["verdict"]["mode"], "watched", "{r}");
        assert_eq!(reason(&r), "ech-present", "{r}");

        // Fail closed whatever the mode.
        let mut s = TcpStream::connect(rig.sluice.addr("sni")).await.unwrap();
        s.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").await.unwrap();
        s.shutdown().await.unwrap();
        assert_eq!(wait_closed(&mut s).await, 0);
        let r = rig.sluice.wait_record(|r| reason(r) == "not-tls").await;
        assert_eq!(r["verdict"]["mode"], "enforced", "{r}");
        assert_eq!(rig.up.accepts(), 1);
        rig.stop().await;
    }
);
