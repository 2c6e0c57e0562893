//! The `quic` listener end to end, with real QUIC: a quinn server with an
//! rcgen certificate on `127.0.0.1:0`, Sluice in-process with a `quic`
//! listener that takes the destination from the SNI (`resolver.hosts`
//! sends every test name to 127.0.0.1, the server's port is the listener's
//! `upstream_port`), and quinn clients that dial Sluice's UDP address.
//! Raw datagrams from `tests/data/quic/` stand in for clients where a test
//! needs exact Initials (a hello split over two datagrams in reverse order,
//! malformed ones).
//!
//! Waits are for an event and bounded; a client that must fail has a short
//! idle timeout of its own, so a refusal is seen as the handshake giving
//! up, never as a timed assertion.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

#[macro_use]
mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Sluice, TestConfig, action, field, reason, within};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;

/// Quic to the good names and the test upstream on loopback; the bad names
/// denied.
const QUIC_RULES: &str = r"    - {name: deny-bad, to: {webgroups: [bad]}, action: deny}
    - {name: allow-good, to: {webgroups: [good], smartgroups: [gateway, loopback]}, protocols: [quic], action: allow}
";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A QUIC server that echoes each bidirectional stream, counting the
/// connection attempts that reach it.
struct QuicEcho {
    addr: SocketAddr,
    cert: CertificateDer<'static>,
    incoming: Arc<AtomicUsize>,
    _endpoint: quinn::Endpoint,
}

impl QuicEcho {
    async fn start() -> Self {
        Self::at(
            "127.0.0.1:0".parse().unwrap(),
            &["allowed.test", "denied.test", "chrome-like.example.test"],
        )
    }

    /// A server on `at` with a new certificate for `names`.
    fn at(at: SocketAddr, names: &[&str]) -> Self {
        let ck = rcgen::generate_simple_self_signed(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
        let key = PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
        Self::with_key(at, ck.cert.der().clone(), key)
    }

    /// A server on `at` presenting `cert`.
    fn with_key(at: SocketAddr, cert: CertificateDer<'static>, key: PrivateKeyDer<'static>) -> Self {
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        tls.alpn_protocols = vec![b"h3".to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
        let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let endpoint = quinn::Endpoint::server(config, at).unwrap();
        let addr = endpoint.local_addr().unwrap();
        let incoming = Arc::new(AtomicUsize::new(0));
        let (server, count) = (endpoint.clone(), incoming.clone());
        tokio::spawn(async move {
            while let Some(attempt) = server.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let Ok(conn) = attempt.await else { return };
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        tokio::spawn(async move {
                            let Ok(data) = recv.read_to_end(16 << 20).await else {
                                return;
                            };
                            if send.write_all(&data).await.is_ok() {
                                let _ = send.finish();
                                let _ = send.stopped().await;
                            }
                        });
                    }
                });
            }
        });
        Self {
            addr,
            cert,
            incoming,
            _endpoint: endpoint,
        }
    }

    fn incoming(&self) -> usize {
        self.incoming.load(Ordering::SeqCst)
    }
}

/// A quinn client trusting the server's certificate, offering `alpn`, that
/// gives up on a silent peer after two seconds.
fn client(cert: &CertificateDer<'static>, alpn: Vec<Vec<u8>>) -> quinn::Endpoint {
    client_at("127.0.0.1:0".parse().unwrap(), cert, alpn)
}

/// [`client`], bound to `from`.
fn client_at(from: SocketAddr, cert: &CertificateDer<'static>, alpn: Vec<Vec<u8>>) -> quinn::Endpoint {
    let mut endpoint = quinn::Endpoint::client(from).unwrap();
    endpoint.set_default_client_config(client_config(cert, alpn, Duration::from_secs(2)));
    endpoint
}

/// A client's configuration: trusting `cert`, offering `alpn`, giving up
/// on a silent peer after `idle`.
fn client_config(cert: &CertificateDer<'static>, alpn: Vec<Vec<u8>>, idle: Duration) -> quinn::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = alpn;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(idle.try_into().unwrap()));
    config.transport_config(Arc::new(transport));
    config
}

fn h3() -> Vec<Vec<u8>> {
    vec![b"h3".to_vec()]
}

/// An allowed connection through `via` naming `allowed.test`, handshake
/// done.
async fn handshake(client: &quinn::Endpoint, via: SocketAddr) -> quinn::Connection {
    within("the handshake", async {
        client.connect(via, "allowed.test").unwrap().await
    })
    .await
    .expect("an allowed QUIC flow goes through")
}

/// Connects through `via` naming `sni`, sends `data` on one stream and
/// returns what came back; `Err` with the reason when the handshake or the
/// stream failed.
async fn round_trip(endpoint: &quinn::Endpoint, via: SocketAddr, sni: &str, data: &[u8]) -> Result<Vec<u8>, String> {
    let connecting = endpoint.connect(via, sni).map_err(|e| e.to_string())?;
    let conn = connecting.await.map_err(|e| e.to_string())?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(data).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    let back = recv.read_to_end(16 << 20).await.map_err(|e| e.to_string())?;
    conn.close(0u32.into(), b"done");
    Ok(back)
}

/// A `quic` listener named `quic` dialling the server's port, with `extra`
/// options; flows end one second after their last datagram unless `extra`
/// sets `idle_timeout`.
fn config(up: &QuicEcho, extra: &str) -> TestConfig {
    let mut options = vec![format!("upstream_port: {}", up.addr.port())];
    if !extra.contains("idle_timeout") {
        options.push("idle_timeout: 1s".to_owned());
    }
    if !extra.is_empty() {
        options.push(extra.to_owned());
    }
    TestConfig::listener("quic", "quic", &options.join(", ")).rules(QUIC_RULES)
}

/// Longer than a refused client keeps retransmitting its Initial (its own
/// idle timeout is 2 s), so all its datagrams are one flow.
const HOLD: &str = "idle_timeout: 10s";

fn is_quic(r: &Value) -> bool {
    field(r, "listener") == "quic"
}

/// The datagrams of a vector of `tests/data/quic/` (see its README).
fn vector(name: &str) -> Vec<Vec<u8>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/quic").join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut out = Vec::new();
    let mut hex = String::new();
    for line in text.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
        if line == "--" {
            out.push(std::mem::take(&mut hex));
        } else {
            hex.extend(line.chars().filter(|c| !c.is_whitespace()));
        }
    }
    if !hex.is_empty() {
        out.push(hex);
    }
    out.iter()
        .map(|h| {
            (0..h.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
                .collect()
        })
        .collect()
}

/// Sends `datagrams` from a fresh socket to `to`; the socket is returned so
/// its address names the flow.
async fn send_raw(to: SocketAddr, datagrams: &[Vec<u8>]) -> tokio::net::UdpSocket {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for d in datagrams {
        s.send_to(d, to).await.unwrap();
    }
    s
}

flow_test!(allowed_sni_handshakes_and_round_trips_a_megabyte, async {
    let up = QuicEcho::start().await;
    let sluice = config(&up, "").start().await;
    let client = client(&up.cert, h3());
    let data = common::payload(1 << 20);
    let back = within(
        "the round trip",
        round_trip(&client, sluice.addr("quic"), "allowed.test", &data),
    )
    .await
    .expect("an allowed QUIC flow goes through");
    assert_eq!(back.len(), data.len());
    assert!(back == data, "the echo differs from what was sent");
    let r = sluice.wait_record(is_quic).await;
    assert_eq!((action(&r), reason(&r)), ("allow", "allowed-by-rule"), "{r}");
    assert_eq!(field(&r, "protocol"), "quic", "{r}");
    assert_eq!(field(&r, "sni"), "allowed.test", "{r}");
    assert_eq!(r["alpn"], serde_json::json!(["h3"]), "{r}");
    assert_eq!(field(&r, "dst"), up.addr.to_string(), "{r}");
    assert_eq!(field(&r, "close_reason"), "idle-timeout", "{r}");
    // QUIC adds headers, acknowledgements and the handshake to the payload.
    assert!(r["bytes_up"].as_u64().unwrap() > 1 << 20, "{r}");
    assert!(r["bytes_down"].as_u64().unwrap() > 1 << 20, "{r}");
    client.wait_idle().await;
    let records = sluice.stop_and_records(Duration::from_millis(200)).await;
    assert_eq!(records.iter().filter(|r| is_quic(r)).count(), 1, "one record per flow");
});

flow_test!(a_wildcard_listener_answers_from_the_address_the_client_sent_to, async {
    // Bound to 0.0.0.0; the client sends to 127.0.0.2, another local
    // address. The route back to the client would pick 127.0.0.1, whose
    // datagrams a QUIC client drops: the answers must come from 127.0.0.2.
    let up = QuicEcho::start().await;
    let yaml = config(&up, "").yaml().replace(
        "name: quic, kind: quic, address: \"127.0.0.1:0\"",
        "name: quic, kind: quic, address: \"0.0.0.0:0\"",
    );
    assert!(yaml.contains("0.0.0.0:0"), "{yaml}");
    let sluice = Sluice::start(&yaml).await;
    let at = SocketAddr::from(([127, 0, 0, 2], sluice.addr("quic").port()));
    let client = client(&up.cert, h3());
    let back = within(
        "the round trip",
        round_trip(&client, at, "allowed.test", b"from the VIP"),
    )
    .await
    .expect("the handshake completes through a wildcard listener");
    assert_eq!(back, b"from the VIP");
    sluice.stop().await;
});

flow_test!(denied_sni_gets_nothing_through_and_one_record, async {
    let up = QuicEcho::start().await;
    let sluice = config(&up, HOLD).start().await;
    let client = client(&up.cert, h3());
    let got = round_trip(&client, sluice.addr("quic"), "denied.test", b"hello").await;
    assert!(got.is_err(), "a denied QUIC flow completed: {got:?}");
    assert_eq!(up.incoming(), 0, "the upstream saw a connection attempt");
    let r = sluice.wait_record(is_quic).await;
    assert_eq!((action(&r), reason(&r)), ("deny", "denied-by-rule"), "{r}");
    assert_eq!(r["verdict"]["rule"], "deny-bad", "{r}");
    assert_eq!(field(&r, "sni"), "denied.test", "{r}");
    assert_eq!(field(&r, "protocol"), "quic", "{r}");
    assert_eq!(field(&r, "close_reason"), "denied", "{r}");
    assert_eq!(r["bytes_up"], 0, "{r}");
    // The client retransmitted its Initial meanwhile: still one flow.
    let records = sluice.stop_and_records(Duration::from_millis(200)).await;
    assert_eq!(records.iter().filter(|r| is_quic(r)).count(), 1, "{records:?}");
});

flow_test!(an_allowed_name_resolving_to_cloud_metadata_is_guarded, async {
    // `metadata.test` is in the allowed WebGroup, but resolves to
    // 169.254.169.254: the SSRF guard refuses it as over TCP, and nothing
    // is dialled.
    let up = QuicEcho::start().await;
    let sluice = config(&up, HOLD).start().await;
    let client = client(&up.cert, h3());
    let got = round_trip(&client, sluice.addr("quic"), "metadata.test", b"hello").await;
    assert!(got.is_err(), "a guarded QUIC flow completed: {got:?}");
    assert_eq!(up.incoming(), 0, "the upstream saw a connection attempt");
    let r = sluice.wait_record(is_quic).await;
    assert_eq!((action(&r), reason(&r)), ("deny", "guard-cloud-metadata"), "{r}");
    assert_eq!(r["verdict"]["rule"], "builtin-guard", "{r}");
    assert_eq!(field(&r, "sni"), "metadata.test", "{r}");
    assert_eq!(field(&r, "close_reason"), "denied", "{r}");
    assert!(r.get("dst").is_none(), "nothing dialled: {r}");
    sluice.stop().await;
});

flow_test!(a_hello_over_two_initials_is_classified_and_handshakes, async {
    let up = QuicEcho::start().await;
    let sluice = config(&up, "").start().await;
    // Sixty long protocol names make a ClientHello of about 2 KiB: more
    // than one Initial datagram (1200 bytes) can carry.
    let mut alpn: Vec<Vec<u8>> = (0..60)
        .map(|i| format!("x-sluice-test-padding-protocol-{i:02}").into_bytes())
        .collect();
    alpn.push(b"h3".to_vec());
    let client = client(&up.cert, alpn);
    let back = within(
        "the round trip",
        round_trip(&client, sluice.addr("quic"), "allowed.test", b"split"),
    )
    .await
    .expect("a large-hello QUIC flow goes through");
    assert_eq!(back, b"split");
    let r = sluice.wait_record(is_quic).await;
    assert_eq!(action(&r), "allow", "{r}");
    assert_eq!(field(&r, "sni"), "allowed.test", "{r}");
    assert_eq!(r["alpn"].as_array().map(Vec::len), Some(61), "{r}");
    sluice.stop().await;
});

flow_test!(a_hello_split_over_two_datagrams_in_reverse_order_is_classified, async {
    let up = QuicEcho::start().await;
    // The vector's hello carries ECH; allowed here to see the flow relayed.
    let sluice = config(&up, "ech: allow").start().await;
    let datagrams = vector("v2-pq-hello-two-datagrams-reversed.hex");
    assert_eq!(datagrams.len(), 2);
    let _client = send_raw(sluice.addr("quic"), &datagrams).await;
    let r = sluice.wait_record(is_quic).await;
    assert_eq!(action(&r), "allow", "{r}");
    assert_eq!(field(&r, "sni"), "chrome-like.example.test", "{r}");
    assert_eq!(r["alpn"], serde_json::json!(["h2", "http/1.1"]), "{r}");
    assert_eq!(r["ech"], true, "{r}");
    let sent: usize = datagrams.iter().map(Vec::len).sum();
    assert_eq!(
        r["bytes_up"].as_u64(),
        Some(sent as u64),
        "both held datagrams replayed: {r}"
    );
    sluice.stop().await;
});

flow_test!(ech_is_denied_by_default, async {
    let up = QuicEcho::start().await;
    let sluice = config(&up, "").start().await;
    let _client = send_raw(
        sluice.addr("quic"),
        &vector("v1-pq-hello-two-initials-one-datagram.hex"),
    )
    .await;
    let r = sluice.wait_record(is_quic).await;
    assert_eq!((action(&r), reason(&r)), ("deny", "ech-present"), "{r}");
    sluice.stop().await;
});

flow_test!(quic_block_drops_every_flow_with_one_record, async {
    let up = QuicEcho::start().await;
    let sluice = config(&up, &format!("quic: block, {HOLD}")).start().await;
    let client = client(&up.cert, h3());
    let got = round_trip(&client, sluice.addr("quic"), "allowed.test", b"hello").await;
    assert!(got.is_err(), "a blocked QUIC flow completed: {got:?}");
    assert_eq!(up.incoming(), 0);
    let r = sluice.wait_record(is_quic).await;
    assert_eq!((action(&r), reason(&r)), ("deny", "quic-blocked"), "{r}");
    assert_eq!(r["verdict"]["rule"], "listener", "{r}");
    assert_eq!(field(&r, "protocol"), "quic", "{r}");
    // Counted like any listener's flows: by listener, action and reason.
    let metrics = get_metrics(sluice.server.admin_addr().await).await;
    assert!(
        metrics.lines().any(|l| l.starts_with("sluice_flows_total{")
            && l.contains("listener=\"quic\"")
            && l.contains("action=\"deny\"")
            && l.contains("reason=\"quic-blocked\"")),
        "{metrics}"
    );
    let records = sluice.stop_and_records(Duration::from_millis(200)).await;
    assert_eq!(records.iter().filter(|r| is_quic(r)).count(), 1, "{records:?}");
});

/// `GET /metrics` from the admin API.
async fn get_metrics(admin: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    within("the metrics", s.read_to_string(&mut text)).await.unwrap();
    text
}

/// A UDP NAT in front of Sluice: the client's datagrams leave from one
/// outside port, then (once `rebind` is set) from another, as when a NAT's
/// mapping expires; answers to either port go back to the client.
async fn nat(to: SocketAddr) -> (SocketAddr, Arc<std::sync::atomic::AtomicBool>) {
    let inside = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let at = inside.local_addr().unwrap();
    let first = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let second = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let rebind = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = rebind.clone();
    tokio::spawn(async move {
        let (mut a, mut b, mut c) = (vec![0u8; 65_535], vec![0u8; 65_535], vec![0u8; 65_535]);
        let mut client = None;
        loop {
            tokio::select! {
                r = inside.recv_from(&mut a) => {
                    let Ok((n, from)) = r else { return };
                    client = Some(from);
                    let out = if flag.load(Ordering::SeqCst) { &second } else { &first };
                    let _ = out.send_to(&a[..n], to).await;
                }
                r = first.recv(&mut b) => {
                    let Ok(n) = r else { return };
                    if let Some(cl) = client { let _ = inside.send_to(&b[..n], cl).await; }
                }
                r = second.recv(&mut c) => {
                    let Ok(n) = r else { return };
                    if let Some(cl) = client { let _ = inside.send_to(&c[..n], cl).await; }
                }
            }
        }
    });
    (at, rebind)
}

// A client whose NAT gives it a new port mid-connection (same address,
// the server's connection id) keeps its flow: no new flow, no refusal.
flow_test!(a_client_whose_nat_rebinds_keeps_its_flow, async {
    let up = QuicEcho::start().await;
    let sluice = config(&up, "").start().await;
    let (via, rebind) = nat(sluice.addr("quic")).await;
    let client = client(&up.cert, h3());
    let conn = handshake(&client, via).await;
    for (i, msg) in [&b"before the rebinding"[..], &b"after the rebinding"[..]]
        .into_iter()
        .enumerate()
    {
        if i == 1 {
            rebind.store(true, Ordering::SeqCst);
        }
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(msg).await.unwrap();
        send.finish().unwrap();
        let back = within("the echo", recv.read_to_end(1024)).await.unwrap();
        assert_eq!(back, msg);
    }
    conn.close(0u32.into(), b"done");
    let r = sluice.wait_record(is_quic).await;
    assert_eq!(action(&r), "allow", "{r}");
    client.wait_idle().await;
    let records = sluice.stop_and_records(Duration::from_millis(200)).await;
    let quic: Vec<_> = records.iter().filter(|r| is_quic(r)).collect();
    assert_eq!(quic.len(), 1, "one flow, nothing refused: {quic:?}");
});

// A client that moves to another port on purpose (quinn's `rebind`, which
// also switches to a connection id its server gave it encrypted): with
// `migration: same-address` it keeps its flow, the only one from its
// address; without (the default), its datagrams start a new flow, refused
// `quic-not-initial`, which also shows that quinn did change its id.
flow_test!(a_client_that_moves_on_purpose_is_followed_only_when_asked, async {
    let up = QuicEcho::start().await;
    for follow in [true, false] {
        let extra = if follow {
            format!("{HOLD}, migration: same-address")
        } else {
            HOLD.to_owned()
        };
        let sluice = config(&up, &extra).start().await;
        let mut client = client(&up.cert, h3());
        // Longer than the second replies wait for the old port to go quiet.
        client.set_default_client_config(client_config(&up.cert, h3(), Duration::from_secs(10)));
        let conn = handshake(&client, sluice.addr("quic")).await;
        // After the handshake the server has sent spare connection ids.
        echo_on(&conn, b"before the move").await;
        let old = client.local_addr().unwrap();
        client
            .rebind(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .unwrap();
        assert_ne!(client.local_addr().unwrap(), old);
        if follow {
            echo_on(&conn, b"after the move").await;
            conn.close(0u32.into(), b"done");
            client.wait_idle().await;
            let records = sluice.stop_and_records(Duration::from_millis(200)).await;
            let quic: Vec<_> = records.iter().filter(|r| is_quic(r)).collect();
            assert_eq!(quic.len(), 1, "one flow, nothing refused: {quic:#?}");
            assert_eq!(action(quic[0]), "allow", "{}", quic[0]);
        } else {
            // quinn probes the new path at once; give it data to send too.
            if let Ok((mut send, _recv)) = conn.open_bi().await {
                let _ = send.write_all(b"after the move").await;
            }
            let r = sluice
                .wait_record(|r| is_quic(r) && reason(r) == "quic-not-initial")
                .await;
            assert_eq!(action(&r), "deny", "{r}");
            assert_eq!(field(&r, "src"), client.local_addr().unwrap().to_string(), "{r}");
            sluice.stop().await;
        }
    }
});

/// A UDP relay in front of Sluice that keeps a copy of the client's last
/// short-header datagram (what an on-path observer, or a host behind the
/// same NAT, can see).
async fn tap(to: SocketAddr) -> (SocketAddr, Arc<std::sync::Mutex<Option<Vec<u8>>>>) {
    let inside = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let at = inside.local_addr().unwrap();
    let out = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let seen = Arc::new(std::sync::Mutex::new(None));
    let keep = seen.clone();
    tokio::spawn(async move {
        let (mut a, mut b) = (vec![0u8; 65_535], vec![0u8; 65_535]);
        let mut client = None;
        loop {
            tokio::select! {
                r = inside.recv_from(&mut a) => {
                    let Ok((n, from)) = r else { return };
                    client = Some(from);
                    if a[0] & 0x80 == 0 {
                        *keep.lock().unwrap() = Some(a[..n].to_vec());
                    }
                    let _ = out.send_to(&a[..n], to).await;
                }
                r = out.recv(&mut b) => {
                    let Ok(n) = r else { return };
                    if let Some(cl) = client { let _ = inside.send_to(&b[..n], cl).await; }
                }
            }
        }
    });
    (at, seen)
}

// Another sender on the client's address that replays the client's
// datagrams (so it carries the server's connection id) from a port of its
// own does not take the replies of a client that is still talking.
flow_test!(a_replayed_datagram_from_another_port_does_not_take_the_replies, async {
    let up = QuicEcho::start().await;
    let sluice = config(&up, "").start().await;
    let (via, seen) = tap(sluice.addr("quic")).await;
    let client = client(&up.cert, h3());
    let conn = handshake(&client, via).await;
    let attacker = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let target = sluice.addr("quic");
    let mut stolen = 0usize;
    let mut buf = vec![0u8; 65_535];
    for i in 0..20u8 {
        // 200 KB each way: the server's answer is many datagrams, sent
        // while the replays arrive.
        let msg = vec![i; 200_000];
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&msg).await.unwrap();
        send.finish().unwrap();
        let replay = seen.lock().unwrap().clone();
        let replays = async {
            if let Some(d) = replay {
                for _ in 0..20 {
                    attacker.send_to(&d, target).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        };
        let ((), back) = tokio::join!(replays, within("the echo", recv.read_to_end(1 << 20)));
        assert!(back.unwrap() == msg, "the echo differs");
        while let Ok(n) = attacker.try_recv(&mut buf) {
            stolen += n;
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    while let Ok(n) = attacker.try_recv(&mut buf) {
        stolen += n;
    }
    assert!(seen.lock().unwrap().is_some(), "the tap saw no short-header datagram");
    assert_eq!(stolen, 0, "replies went to the replaying port");
    conn.close(0u32.into(), b"done");
    sluice.stop().await;
});

// Continuous verification: a relayed QUIC flow that a reloaded policy
// denies is ended, and its record says so.
flow_test!(a_policy_change_ends_a_relayed_flow, async {
    let up = QuicEcho::start().await;
    let cfg = config(&up, HOLD);
    let sluice = cfg.start().await;
    let client = client(&up.cert, h3());
    let conn = handshake(&client, sluice.addr("quic")).await;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(b"before").await.unwrap();
    send.finish().unwrap();
    assert_eq!(recv.read_to_end(1024).await.unwrap(), b"before");
    sluice
        .reload(
            &cfg.clone()
                .rules("    - {name: no-more, to: {webgroups: [good]}, action: deny}\n"),
        )
        .await;
    let r = sluice
        .wait_record(|r| is_quic(r) && field(r, "close_reason") == "policy-revoked")
        .await;
    assert_eq!((action(&r), reason(&r)), ("deny", "denied-by-rule"), "{r}");
    assert_eq!(r["verdict"]["rule"], "no-more", "{r}");
    assert!(r["bytes_down"].as_u64().unwrap() > 0, "{r}");
    sluice.stop().await;
});

// A real QUIC library's client, recorded and classified: quinn (rustls,
// X25519 only) sends a classic hello that fits in its first Initial. Its
// post-quantum counterpart is a Chromium capture in tests/data/quic/.
flow_test!(a_quinn_client_hello_classifies_from_its_first_initial, async {
    use sluice::classify::{Progress, QuicInitial, QuicLimits};
    let recorder = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let at = recorder.local_addr().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["allowed.test".to_owned()]).unwrap();
    let client = client(ck.cert.der(), h3());
    // Never answered: the client only sends its first flight (and
    // retransmits it) until its idle timeout.
    let _connecting = client.connect(at, "allowed.test").unwrap();
    let mut flow = QuicInitial::new(QuicLimits::default());
    let mut buf = vec![0u8; 65_535];
    let mut datagrams = 0;
    let mut sizes = Vec::new();
    let hello = loop {
        let (n, _) = within("the client's Initial", recorder.recv_from(&mut buf))
            .await
            .unwrap();
        datagrams += 1;
        sizes.push(n);
        match flow.push_datagram(&buf[..n]) {
            Ok(Progress::Done(hello)) => break hello,
            Ok(Progress::NeedMore { .. }) => assert!(datagrams < 4, "no hello in {datagrams} datagrams"),
            Err(e) => panic!("quinn's Initial does not classify: {e}"),
        }
    };
    assert_eq!(datagrams, 1, "a classic hello fits in one Initial");
    assert!(
        sizes[0] >= 1200,
        "an Initial datagram is padded to 1,200 bytes: {sizes:?}"
    );
    assert_eq!(hello.sni.as_deref(), Some("allowed.test"));
    assert_eq!(hello.alpn, [b"h3".to_vec()]);
    assert!(!hello.ech);
    assert!(hello.handshake_len < 1100, "{}", hello.handshake_len);
    assert_eq!(flow.initial_packets(), 1);
});

/// Sends `data` on a new stream of `conn` and requires it back.
async fn echo_on(conn: &quinn::Connection, data: &[u8]) {
    let (mut send, mut recv) = within("a stream", conn.open_bi()).await.unwrap();
    send.write_all(data).await.unwrap();
    send.finish().unwrap();
    let back = within("the echo", recv.read_to_end(1 << 20)).await.unwrap();
    assert_eq!(back, data);
}

// A reload that turns `transparent` on and off keeps the listener's socket
// (a second socket could not be bound to the address while the first
// serves: such reloads used to be refused) and the flows it relays.
flow_test!(
    a_reload_that_changes_transparent_keeps_the_socket_and_its_flows,
    async {
        let up = QuicEcho::start().await;
        let cfg = config(&up, HOLD);
        let sluice = cfg.start().await;
        let at = sluice.addr("quic");
        let client = client(&up.cert, h3());
        let conn = handshake(&client, at).await;
        echo_on(&conn, b"before").await;
        // Transparent, the listener takes each flow's destination from TPROXY
        // (`upstream_port` does not apply).
        let transparent = TestConfig::listener("quic", "quic", &format!("transparent: true, {HOLD}")).rules(QUIC_RULES);
        sluice.reload(&transparent).await;
        assert_eq!(sluice.addr("quic"), at, "the same socket");
        echo_on(&conn, b"while transparent").await;
        // (That the socket's options change is shown under TPROXY, in
        // `transparent_quic_under_tproxy`.)
        sluice.reload(&cfg).await;
        echo_on(&conn, b"after").await;
        conn.close(0u32.into(), b"done");
        let records = sluice.stop_and_records(Duration::from_millis(200)).await;
        let quic: Vec<_> = records.iter().filter(|r| is_quic(r)).collect();
        assert_eq!(quic.len(), 1, "one flow, kept across both reloads: {quic:#?}");
        assert_eq!(action(quic[0]), "allow", "{}", quic[0]);
    }
);

flow_test!(watch_mode_passes_a_denied_flow_and_records_would_deny, async {
    let up = QuicEcho::start().await;
    let sluice = config(&up, "").watch().start().await;
    let client = client(&up.cert, h3());
    let back = within(
        "the round trip",
        round_trip(&client, sluice.addr("quic"), "denied.test", b"watch"),
    )
    .await
    .expect("watch mode lets the flow through");
    assert_eq!(back, b"watch");
    let r = sluice.wait_record(is_quic).await;
    assert_eq!((action(&r), reason(&r)), ("deny", "denied-by-rule"), "{r}");
    assert_eq!(r["verdict"]["mode"], "watched", "{r}");
    assert!(r["bytes_down"].as_u64().unwrap() > 0, "{r}");
    sluice.stop().await;
});

flow_test!(garbage_never_crashes_the_listener_and_the_next_flow_passes, async {
    let up = QuicEcho::start().await;
    let sluice = config(&up, "").start().await;
    let at = sluice.addr("quic");
    let mut truncated = vector("rfc9001-a2-client-initial.hex").remove(0);
    truncated.truncate(60);
    let noise: Vec<u8> = (0..300u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 0x80)
        .collect();
    let cases: Vec<(Vec<Vec<u8>>, Option<&str>)> = vec![
        (vec![truncated], Some("quic-malformed")),
        (vec![Vec::new()], Some("quic-malformed")),
        (vector("error-short-header.hex"), Some("quic-not-initial")),
        (vector("error-flipped-ciphertext-byte.hex"), Some("quic-decrypt-failed")),
        (
            vector("error-version-negotiation.hex"),
            Some("quic-version-negotiation"),
        ),
        (vec![noise], None),
        (vec![vec![0xff; 1]], None),
    ];
    let mut sockets = Vec::new();
    for (datagrams, _) in &cases {
        sockets.push(send_raw(at, datagrams).await);
    }
    for (socket, (_, want)) in sockets.iter().zip(&cases) {
        let src = socket.local_addr().unwrap().to_string();
        let r = sluice.wait_record(|r| is_quic(r) && field(r, "src") == src).await;
        assert_eq!(action(&r), "deny", "{r}");
        assert_eq!(r["verdict"]["rule"], "classify", "{r}");
        match want {
            Some(w) => assert_eq!(reason(&r), *w, "{r}"),
            None => assert!(reason(&r).starts_with("quic-"), "{r}"),
        }
    }
    let client = client(&up.cert, h3());
    let back = within("the round trip", round_trip(&client, at, "allowed.test", b"still here"))
        .await
        .expect("the listener still serves");
    assert_eq!(back, b"still here");
    sluice.stop().await;
});

/// A flow whose ClientHello never completes is refused when its Initial
/// phase (`peek_timeout`) is over: paused time, so no wall-clock wait.
#[tokio::test(start_paused = true)]
async fn an_incomplete_hello_is_refused_at_the_initial_timeout() {
    let sluice = Sluice::start(
        &TestConfig::listener("quic", "quic", "upstream_port: 9, peek_timeout: 3s")
            .rules(QUIC_RULES)
            .yaml(),
    )
    .await;
    let first_half = vector("v2-pq-hello-two-datagrams-reversed.hex").remove(0);
    let _client = send_raw(sluice.addr("quic"), &[first_half]).await;
    // Let the listener hand the datagram to its flow, then pass the
    // Initial phase.
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    tokio::time::advance(Duration::from_secs(4)).await;
    let r = sluice.wait_record(is_quic).await;
    assert_eq!((action(&r), reason(&r)), ("deny", "peek-timeout"), "{r}");
    sluice.stop().await;
}

// `max_connections` bounds the flows a listener holds: past it, a new
// flow's datagrams are dropped (and counted), not recorded one by one.
flow_test!(flows_past_max_connections_are_dropped, async {
    let up = QuicEcho::start().await;
    let sluice = config(&up, "max_connections: 1, idle_timeout: 30s").start().await;
    let at = sluice.addr("quic");
    // A relayed flow holds the only slot (until it idles, 30 s).
    let first = client(&up.cert, h3());
    let got = round_trip(&first, at, "allowed.test", b"x").await;
    assert_eq!(got.as_deref(), Ok(&b"x"[..]), "the first flow");
    // Garbage would be refused with a record if it had a slot; the slot is
    // a relayed flow's, so it is dropped without one.
    let dropped = send_raw(at, &[vec![0u8; 8]]).await;
    let second = client(&up.cert, h3());
    let got = round_trip(&second, at, "allowed.test", b"y").await;
    assert!(got.is_err(), "a flow past max_connections went through: {got:?}");
    let records = sluice.stop_and_records(Duration::from_millis(200)).await;
    let src = dropped.local_addr().unwrap().to_string();
    assert!(
        !records.iter().any(|r| is_quic(r) && field(r, "src") == src),
        "{records:?}"
    );
    assert_eq!(up.incoming(), 1);
});

flow_test!(an_initial_that_never_completes_gives_up_its_slot, async {
    // Forged Initials with half a ClientHello (anyone can make them: the
    // keys follow from the id the sender picks) cannot fill the table for
    // a peek_timeout: a new flow takes the oldest one's slot.
    let up = QuicEcho::start().await;
    let sluice = config(&up, "max_connections: 1, peek_timeout: 30s").start().await;
    let at = sluice.addr("quic");
    let first_half = vector("v2-pq-hello-two-datagrams-reversed.hex").remove(0);
    let holder = send_raw(at, std::slice::from_ref(&first_half)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let client = client(&up.cert, h3());
    let got = within("the round trip", round_trip(&client, at, "allowed.test", b"z"))
        .await
        .expect("a new flow takes the slot of one still in its Initial phase");
    assert_eq!(got, b"z");
    let src = holder.local_addr().unwrap().to_string();
    let r = sluice.wait_record(|r| is_quic(r) && field(r, "src") == src).await;
    assert_eq!((action(&r), reason(&r)), ("deny", "peek-timeout"), "{r}");
    sluice.stop().await;
});

flow_test!(refused_flows_give_up_their_slots_to_new_flows, async {
    // A full table of refused flows (garbage that does not classify, as a
    // flood from spoofed sources would send) does not keep a real client
    // out for an idle timeout: the oldest refused flow's slot goes to it.
    let up = QuicEcho::start().await;
    let sluice = config(&up, "max_connections: 2, idle_timeout: 30s").start().await;
    let at = sluice.addr("quic");
    let _a = send_raw(at, &[vec![0u8; 8]]).await;
    let _b = send_raw(at, &[vec![1u8; 8]]).await;
    // Both are refused and recorded before the client comes.
    let refused = sluice.wait_records(2, is_quic).await;
    assert!(refused.iter().all(|r| action(r) == "deny"), "{refused:?}");
    let client = client(&up.cert, h3());
    let back = within("the round trip", round_trip(&client, at, "allowed.test", b"through"))
        .await
        .expect("a new flow takes a refused flow's slot");
    assert_eq!(back, b"through");
    assert_eq!(up.incoming(), 1, "the new flow reached the upstream");
    sluice.stop().await;
});

// --- Transparent mode: TPROXY for real, in a throwaway network namespace.
//
// The outer test re-runs this binary under `unshare --net` (as
// `forward_redirect.rs` does), so the iptables rules, routes and addresses
// live and die with a private namespace. It needs root (CAP_NET_ADMIN),
// `unshare`, `ip`, `iptables` and `ip6tables` with the TPROXY target; when
// any is missing it fails and says why. `SLUICE_SKIP_NETNS=1` skips it
// explicitly.

const INNER_ENV: &str = "SLUICE_NETNS_INNER";

fn have(tool: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn sh(cmd: &str) {
    let out = std::process::Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn transparent_quic_under_tproxy() {
    if std::env::var_os("SLUICE_SKIP_NETNS").is_some() {
        eprintln!("SKIPPED explicitly (SLUICE_SKIP_NETNS): TPROXY test not run");
        return;
    }
    let missing: Vec<_> = ["unshare", "ip", "iptables", "ip6tables"]
        .into_iter()
        .filter(|t| !have(t))
        .collect();
    assert!(
        missing.is_empty(),
        "cannot run the TPROXY test: missing {missing:?} (apt-get install -y iptables iproute2 util-linux)"
    );
    let uid = std::process::Command::new("id").arg("-u").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "cannot run the TPROXY test: it needs root (CAP_NET_ADMIN) to make a network namespace"
    );
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("unshare")
        .args(["--net", "--"])
        .arg(&exe)
        .args([
            "--exact",
            "tproxy_inner",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(INNER_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "TPROXY test inside the namespace failed:\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
}

/// A client endpoint bound to `from` (the address the iptables rules
/// intercept), trusting `cert`.
fn client_from(from: SocketAddr, cert: &CertificateDer<'static>) -> quinn::Endpoint {
    client_at(from, cert, h3())
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "runs only inside the namespace made by transparent_quic_under_tproxy"]
async fn tproxy_inner() {
    assert!(
        std::env::var_os(INNER_ENV).is_some(),
        "run via transparent_quic_under_tproxy, not directly: it rewrites iptables"
    );
    sh("ip link set lo up");
    sh("ip link add sl0 type veth peer name sl1");
    sh("ip link set sl0 up && ip link set sl1 up");
    // Clients on sl0; the real servers on lo; 10.99.0.2 / fd00:99::2 are
    // what the clients dial, owned by nobody: only TPROXY answers there.
    sh("ip addr add 10.99.0.1/24 dev sl0");
    sh("ip -6 addr add fd00:99::1/64 dev sl0 nodad");
    sh("ip addr add 10.99.0.3/32 dev lo");
    sh("ip -6 addr add fd00:99::3/128 dev lo nodad");
    sh("ip rule add fwmark 1 lookup 100 && ip route add local 0.0.0.0/0 dev lo table 100");
    sh("ip -6 rule add fwmark 1 lookup 100 && ip -6 route add local ::/0 dev lo table 100");

    let up4 = QuicEcho::at("10.99.0.3:4433".parse().unwrap(), &["allowed.test"]);
    let up6 = QuicEcho::at("[fd00:99::3]:4433".parse().unwrap(), &["allowed.test"]);
    let dir = common::scratch_dir();
    let audit = dir.path().join("audit.jsonl");
    // `allowed.test` resolves to the real servers: the flows dial
    // 10.99.0.2 / fd00:99::2, which are not its addresses, so Sluice sends
    // them to the name's own (anti-evasion), on the port dialled.
    let yaml = format!(
        r#"admin: {{address: "127.0.0.1:0"}}
audit: {{destination: "{}"}}
resolver:
  hosts:
    allowed.test: [10.99.0.3, "fd00:99::3"]
webgroups:
  - {{name: good, domains: [allowed.test, bound.test]}}
listeners:
  - {{name: t4, kind: quic, address: "0.0.0.0:0", transparent: true, idle_timeout: 1s}}
  - {{name: t6, kind: quic, address: "[::]:0", transparent: true, idle_timeout: 1s}}
  - {{name: dns, kind: dns, address: "127.0.0.1:0", upstreams: ["{dns}"]}}
policy:
  rules:
    - {{name: allow-good, to: {{webgroups: [good], smartgroups: [gateway, loopback]}}, protocols: [quic], action: allow}}
"#,
        audit.display(),
        dns = zone_server("bound.test.", BOUND_SERVER).await,
    );
    let config = sluice_api::config::load_str(&yaml, "tproxy.yaml").unwrap_or_else(|e| panic!("{e}"));
    let server = sluice::runtime::Server::start(config, None).await.unwrap();
    let p4 = server.addr("t4").unwrap().port();
    let p6 = server.addr("t6").unwrap().port();
    // Mark the clients' datagrams so they are routed to lo, where TPROXY
    // hands them to the listener with their destination intact.
    sh("iptables -t mangle -A OUTPUT -p udp -s 10.99.0.1 -d 10.99.0.2 --dport 4433 -j MARK --set-mark 1");
    sh(&format!(
        "iptables -t mangle -A PREROUTING -i lo -p udp -d 10.99.0.2 --dport 4433 -j TPROXY --on-port {p4} --tproxy-mark 1"
    ));
    sh("ip6tables -t mangle -A OUTPUT -p udp -s fd00:99::1 -d fd00:99::2 --dport 4433 -j MARK --set-mark 1");
    sh(&format!(
        "ip6tables -t mangle -A PREROUTING -i lo -p udp -d fd00:99::2 --dport 4433 -j TPROXY --on-port {p6} --tproxy-mark 1"
    ));

    for (from, dialled, up, listener) in [
        ("10.99.0.1:0", "10.99.0.2:4433", &up4, "t4"),
        ("[fd00:99::1]:0", "[fd00:99::2]:4433", &up6, "t6"),
    ] {
        let client = client_from(from.parse().unwrap(), &up.cert);
        let dialled: SocketAddr = dialled.parse().unwrap();
        let back = within(
            "the round trip",
            round_trip(&client, dialled, "allowed.test", b"tproxy"),
        )
        .await
        .unwrap_or_else(|e| panic!("{listener}: QUIC under TPROXY failed: {e}"));
        assert_eq!(back, b"tproxy");
        assert_eq!(up.incoming(), 1, "{listener}");
        let found = common::wait_until(|| {
            std::fs::read_to_string(&audit)
                .unwrap_or_default()
                .lines()
                .any(|l| l.contains(&format!("\"listener\":\"{listener}\"")))
        })
        .await;
        assert!(found, "{listener}: no record");
        let text = std::fs::read_to_string(&audit).unwrap();
        let r: Value = text
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|r| field(r, "listener") == listener)
            .unwrap();
        assert_eq!(action(&r), "allow", "{r}");
        assert_eq!(field(&r, "original_dst"), dialled.to_string(), "{r}");
        assert_eq!(field(&r, "dst"), up.addr.to_string(), "the name's own address: {r}");
        assert_eq!(r["verdict"]["check"], "sni-resolved", "{r}");
        assert_eq!(field(&r, "protocol"), "quic", "{r}");
    }
    toggle_under_tproxy(&server, &yaml, &up4).await;
    dns_binding_under_tproxy(&server, &audit).await;
    server.shutdown(Duration::from_millis(200)).await;
}

/// A reload that turns `transparent` off and on again changes the bound
/// socket's options in place: off, intercepted datagrams no longer reach
/// it (the kernel hands `TPROXY` datagrams only to a transparent socket);
/// on again, they do, with their original destination.
async fn toggle_under_tproxy(server: &sluice::runtime::Server, yaml: &str, up4: &QuicEcho) {
    let load = |text: &str| sluice_api::config::load_str(text, "tproxy.yaml").unwrap_or_else(|e| panic!("{e}"));
    let t4 = server.addr("t4").unwrap();
    let on = r#"- {name: t4, kind: quic, address: "0.0.0.0:0", transparent: true, idle_timeout: 1s}"#;
    assert!(yaml.contains(on));
    let off = yaml.replace(
        on,
        // Were the socket still transparent, an intercepted flow would now
        // be sent on to allowed.test on this port, and reach the server.
        r#"- {name: t4, kind: quic, address: "0.0.0.0:0", transparent: false, upstream_port: 4433, idle_timeout: 1s}"#,
    );
    server
        .reload(load(&off))
        .await
        .expect("turning transparent off is accepted");
    assert_eq!(server.addr("t4").unwrap(), t4, "the same socket");
    let dialled: SocketAddr = "10.99.0.2:4433".parse().unwrap();
    let before = up4.incoming();
    let client = client_from("10.99.0.1:0".parse().unwrap(), &up4.cert);
    let refused = round_trip(&client, dialled, "allowed.test", b"off").await;
    assert!(
        refused.is_err(),
        "an intercepted flow reached a listener that is not transparent: {refused:?}"
    );
    assert_eq!(up4.incoming(), before);
    server
        .reload(load(yaml))
        .await
        .expect("turning transparent on is accepted");
    assert_eq!(server.addr("t4").unwrap(), t4, "the same socket");
    let back = within(
        "the round trip",
        round_trip(&client, dialled, "allowed.test", b"on again"),
    )
    .await
    .unwrap_or_else(|e| panic!("QUIC under TPROXY after transparent came back failed: {e}"));
    assert_eq!(back, b"on again");
    assert_eq!(up4.incoming(), before + 1);
}

/// The address `bound.test` resolves to: a QUIC server in a namespace of
/// its own (`quic_server_inner`), reached through a veth, so the address
/// the client dials is a real server's and not this host's.
const BOUND_SERVER: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 99, 1, 2);
const SERVER_ENV: &str = "SLUICE_QUIC_SERVER_DIR";

/// A DNS server on 127.0.0.1 that answers `name` A with `ip`, and every
/// other question with an empty answer: the DNS proxy's upstream.
async fn zone_server(name: &'static str, ip: std::net::Ipv4Addr) -> SocketAddr {
    use hickory_proto::op::{Message, OpCode};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{RData, Record, RecordType};
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let at = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let Ok(q) = Message::from_vec(&buf[..n]) else { continue };
            let Some(query) = q.queries.first().cloned() else {
                continue;
            };
            let mut m = Message::response(q.metadata.id, OpCode::Query);
            m.metadata.recursion_desired = q.metadata.recursion_desired;
            m.metadata.recursion_available = true;
            m.add_query(query.clone());
            if query.name().to_ascii().eq_ignore_ascii_case(name) && query.query_type() == RecordType::A {
                m.add_answer(Record::from_rdata(query.name().clone(), 300, RData::A(A(ip))));
            }
            let _ = socket.send_to(&m.to_vec().unwrap(), from).await;
        }
    });
    at
}

/// A client whose DNS proxy answered `bound.test` with an address may
/// reach that address naming `bound.test` (check `dns-binding`, sent to
/// the address dialled, no lookup), and not naming another allowed name
/// (`sni-destination-mismatch`): DNS bindings hold QUIC flows as they hold
/// TLS ones.
async fn dns_binding_under_tproxy(server: &sluice::runtime::Server, audit: &Path) {
    use std::io::BufRead;
    let dir = common::scratch_dir();
    let ck = rcgen::generate_simple_self_signed(vec!["bound.test".to_owned(), "allowed.test".to_owned()]).unwrap();
    let cert: CertificateDer<'static> = ck.cert.der().clone();
    std::fs::write(dir.path().join("cert.der"), cert.as_ref()).unwrap();
    std::fs::write(dir.path().join("key.der"), ck.signing_key.serialize_der()).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut child = KillOnDrop(
        std::process::Command::new("unshare")
            .args(["--net", "--"])
            .arg(&exe)
            .args([
                "--exact",
                "quic_server_inner",
                "--include-ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(SERVER_ENV, dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("server.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    // `unshare` execs the test binary: the child's PID names its namespace,
    // once it has left this one.
    let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
    let theirs = format!("/proc/{}/ns/net", child.0.id());
    let left = common::wait_until(|| std::fs::read_link(&theirs).is_ok_and(|ns| ns != ours)).await;
    assert!(left, "the server's process never entered a namespace of its own");
    sh(&format!(
        "ip link add sv0 type veth peer name sv1 netns {} && ip addr add 10.99.1.1/24 dev sv0 && ip link set sv0 up",
        child.0.id()
    ));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let accepted = Arc::new(AtomicUsize::new(0));
    let stdout = child.0.stdout.take().unwrap();
    let counted = accepted.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            // The first line follows libtest's "test quic_server_inner ... ".
            if line.ends_with("quic-server: ready") {
                let _ = ready_tx.send(());
            } else if line.ends_with("quic-server: accepted") {
                counted.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let ready = tokio::task::spawn_blocking(move || ready_rx.recv_timeout(Duration::from_secs(20)).is_ok())
        .await
        .unwrap();
    assert!(
        ready,
        "the QUIC server in its own namespace did not start:\n{}",
        std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default()
    );

    // The client asks the DNS proxy, from its own address.
    let ask = {
        use hickory_proto::op::{Message, MessageType, OpCode, Query};
        use hickory_proto::rr::{Name, RecordType};
        let mut m = Message::new(0x7171, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii("bound.test.").unwrap(), RecordType::A));
        m.to_vec().unwrap()
    };
    let resolver = tokio::net::UdpSocket::bind("10.99.0.1:0").await.unwrap();
    resolver.send_to(&ask, server.addr("dns").unwrap()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let (n, _) = within("the DNS answer", resolver.recv_from(&mut buf)).await.unwrap();
    let answer = hickory_proto::op::Message::from_vec(&buf[..n]).unwrap();
    let ips: Vec<_> = answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            hickory_proto::rr::RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    assert_eq!(ips, [BOUND_SERVER], "{answer:?}");

    let dialled = SocketAddr::new(BOUND_SERVER.into(), 4433);
    let p4 = server.addr("t4").unwrap().port();
    sh(&format!(
        "iptables -t mangle -A OUTPUT -p udp -s 10.99.0.1 -d {BOUND_SERVER} --dport 4433 -j MARK --set-mark 1"
    ));
    sh(&format!(
        "iptables -t mangle -A PREROUTING -i lo -p udp -s 10.99.0.1 -d {BOUND_SERVER} --dport 4433 -j TPROXY --on-port {p4} --tproxy-mark 1"
    ));
    let client = client_from("10.99.0.1:0".parse().unwrap(), &cert);
    // An allowed name, but not the one the address was resolved for.
    let refused = round_trip(&client, dialled, "allowed.test", b"mismatch").await;
    assert!(refused.is_err(), "a mismatched SNI got through: {refused:?}");
    let back = within("the round trip", round_trip(&client, dialled, "bound.test", b"bound"))
        .await
        .unwrap_or_else(|e| panic!("QUIC to a DNS-bound address failed: {e}"));
    assert_eq!(back, b"bound");
    let reached = common::wait_until(|| accepted.load(Ordering::SeqCst) >= 1).await;
    assert!(reached, "the server saw no connection");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "only the bound name reached the server"
    );
    let records = |audit: &Path| -> Vec<Value> {
        std::fs::read_to_string(audit)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|r| field(r, "original_dst") == dialled.to_string())
            .collect()
    };
    // (The refused client retransmits past the listener's idle timeout of
    // a second, so it may make more than one record: wait for each name.)
    let has = |found: &[Value], sni: &str| found.iter().any(|r| field(r, "sni") == sni);
    let both = common::wait_until(|| {
        let found = records(audit);
        has(&found, "allowed.test") && has(&found, "bound.test")
    })
    .await;
    let found = records(audit);
    assert!(both, "{found:#?}");
    let denied = found.iter().find(|r| field(r, "sni") == "allowed.test").unwrap();
    assert_eq!(action(denied), "deny", "{denied}");
    assert_eq!(reason(denied), "sni-destination-mismatch", "{denied}");
    assert_eq!(denied["verdict"]["check"], "dns-binding", "{denied}");
    let allowed = found.iter().find(|r| field(r, "sni") == "bound.test").unwrap();
    assert_eq!(action(allowed), "allow", "{allowed}");
    assert_eq!(allowed["verdict"]["check"], "dns-binding", "{allowed}");
    assert_eq!(
        field(allowed, "dst"),
        dialled.to_string(),
        "sent where it was bound: {allowed}"
    );
    assert_eq!(field(allowed, "protocol"), "quic", "{allowed}");
}

/// A child process ended (and reaped) when the test lets go of it, failed
/// assertions included.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "runs only inside the namespace made by dns_binding_under_tproxy"]
async fn quic_server_inner() {
    let Some(dir) = std::env::var_os(SERVER_ENV) else {
        panic!("run via transparent_quic_under_tproxy, not directly: it configures interfaces");
    };
    let dir = std::path::PathBuf::from(dir);
    // The veth end arrives from the parent once this process runs.
    let linked = common::wait_until(|| {
        std::process::Command::new("ip")
            .args(["link", "show", "sv1"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
    .await;
    assert!(linked, "no sv1 in the server's namespace");
    sh(&format!(
        "ip link set lo up && ip addr add {BOUND_SERVER}/24 dev sv1 && ip link set sv1 up && ip route add default via 10.99.1.1"
    ));
    let cert = CertificateDer::from(std::fs::read(dir.join("cert.der")).unwrap());
    let key = PrivateKeyDer::Pkcs8(std::fs::read(dir.join("key.der")).unwrap().into());
    let echo = QuicEcho::with_key(SocketAddr::new(BOUND_SERVER.into(), 4433), cert, key);
    println!("quic-server: ready");
    // Bounded: the parent kills this process when its test is done.
    let mut seen = 0;
    for _ in 0..3000 {
        while seen < echo.incoming() {
            seen += 1;
            println!("quic-server: accepted");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
