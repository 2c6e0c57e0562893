//! Resolution: the lenient IP-literal reader (the SSRF guard's view of odd
//! spellings), and the resolver against a real DNS server on loopback.

// Tests: a failed unwrap/expect is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use hickory_resolver::proto::op::{Message, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA};
use hickory_resolver::proto::rr::{RData, Record, RecordType};
use sluice::forward::resolve::{ResolveError, Resolver, ResolverSettings, parse_ip_lenient};
use tokio::net::UdpSocket;

fn ip(s: &str) -> IpAddr {
    IpAddr::from_str(s).unwrap()
}

#[test]
fn odd_ip_spellings_mean_what_inet_aton_says() {
    let table: &[(&str, Option<&str>)] = &[
        // Plain forms.
        ("127.0.0.1", Some("127.0.0.1")),
        ("169.254.169.254", Some("169.254.169.254")),
        // One part: the whole 32-bit value, decimal / hex / octal.
        ("2130706433", Some("127.0.0.1")),
        ("0x7f000001", Some("127.0.0.1")),
        ("0X7F000001", Some("127.0.0.1")),
        ("017700000001", Some("127.0.0.1")),
        ("2852039166", Some("169.254.169.254")),
        ("0", Some("0.0.0.0")),
        ("4294967295", Some("255.255.255.255")),
        // Octal and hex per part.
        ("0177.0.0.1", Some("127.0.0.1")),
        ("0x7f.0.0.1", Some("127.0.0.1")),
        ("0x7f.0x0.0x0.0x1", Some("127.0.0.1")),
        ("0251.0376.0251.0376", Some("169.254.169.254")),
        ("0xa9.0xfe.0xa9.0xfe", Some("169.254.169.254")),
        ("00000177.0.0.01", Some("127.0.0.1")),
        // Short forms: the last part fills the remaining bytes.
        ("127.1", Some("127.0.0.1")),
        ("127.0.1", Some("127.0.0.1")),
        ("10.1", Some("10.0.0.1")),
        ("169.254.43518", Some("169.254.169.254")),
        ("169.16689662", Some("169.254.169.254")),
        ("0x7f.1", Some("127.0.0.1")),
        // One trailing dot (FQDN style) still denotes the address.
        ("127.0.0.1.", Some("127.0.0.1")),
        ("2130706433.", Some("127.0.0.1")),
        // IPv6, bracketed, zoned, and IPv4-mapped (canonicalised to IPv4).
        ("::1", Some("::1")),
        ("[::1]", Some("::1")),
        ("fe80::1%eth0", Some("fe80::1")),
        ("::ffff:127.0.0.1", Some("127.0.0.1")),
        ("[::ffff:169.254.169.254]", Some("169.254.169.254")),
        ("::ffff:7f00:1", Some("127.0.0.1")),
        ("fd00:ec2::254", Some("fd00:ec2::254")),
        // Not addresses: names, out of range, malformed.
        ("example.com", None),
        ("localhost", None),
        ("127.0.0.1.example.com", None),
        ("256.0.0.1", None),
        ("1.2.3.4.5", None),
        ("1.2.3.256", None),
        ("4294967296", None),
        ("127.16777216", None),
        ("08.0.0.1", None),
        ("0x1g.0.0.1", None),
        ("1..1", None),
        (".1.2.3", None),
        ("127.0.0.1..", None),
        ("", None),
        ("+1.2.3.4", None),
        ("1.2.3.4 ", Some("1.2.3.4")),
        ("[127.0.0.1]", None),
        ("[example.com]", None),
        ("1e3", None),
    ];
    for (input, want) in table {
        let got = parse_ip_lenient(input);
        assert_eq!(got, want.map(ip), "parse_ip_lenient({input:?})");
    }
}

/// A tiny authoritative-ish DNS server: answers a fixed zone, NXDOMAIN
/// for anything else.
async fn dns_server() -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                return;
            };
            let Ok(req) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
            resp.metadata.recursion_desired = req.metadata.recursion_desired;
            resp.metadata.recursion_available = true;
            resp.queries = req.queries.clone();
            let mut found_name = false;
            for q in &req.queries {
                let name = q.name().to_ascii().to_ascii_lowercase();
                let records: &[&str] = match name.as_str() {
                    "multi.test." => &["192.0.2.10", "192.0.2.11", "2001:db8::10"],
                    "meta.test." => &["169.254.169.254"],
                    "mapped.test." => &["::ffff:127.0.0.1"],
                    "v4only.test." => &["198.51.100.7"],
                    _ => continue,
                };
                found_name = true;
                for r in records {
                    let rdata = match (ip(r), q.query_type()) {
                        (IpAddr::V4(v4), RecordType::A) => RData::A(A(v4)),
                        (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(v6)),
                        _ => continue,
                    };
                    resp.add_answer(Record::from_rdata(q.name().clone(), 60, rdata));
                }
            }
            if !found_name {
                resp.metadata.response_code = ResponseCode::NXDomain;
            }
            let _ = sock.send_to(&resp.to_vec().unwrap(), peer).await;
        }
    });
    addr
}

async fn resolver() -> Resolver {
    let server = dns_server().await;
    let mut settings = ResolverSettings::with_nameservers(vec![server]);
    settings.use_hosts_file = false;
    Resolver::new(&settings).unwrap()
}

#[tokio::test]
async fn returns_every_a_and_aaaa() {
    let r = resolver().await;
    let mut got = r.resolve("multi.test").await.unwrap();
    got.sort();
    assert_eq!(
        got,
        vec![ip("192.0.2.10"), ip("192.0.2.11"), ip("2001:db8::10")]
    );
    // Trailing dot and case make no difference.
    let mut again = r.resolve("MULTI.test.").await.unwrap();
    again.sort();
    assert_eq!(again, got);
}

#[tokio::test]
async fn a_name_for_metadata_resolves_to_metadata() {
    let r = resolver().await;
    assert_eq!(
        r.resolve("meta.test").await.unwrap(),
        vec![ip("169.254.169.254")]
    );
    // IPv4-mapped IPv6 answers are canonicalised so the guard sees IPv4.
    assert_eq!(
        r.resolve("mapped.test").await.unwrap(),
        vec![ip("127.0.0.1")]
    );
    assert_eq!(
        r.resolve("v4only.test").await.unwrap(),
        vec![ip("198.51.100.7")]
    );
}

#[tokio::test]
async fn ip_literals_skip_dns() {
    // No server at all: a lookup would fail, literals must not need one.
    let mut settings = ResolverSettings::with_nameservers(vec!["127.0.0.1:9".parse().unwrap()]);
    settings.use_hosts_file = false;
    let r = Resolver::new(&settings).unwrap();
    assert_eq!(r.resolve("0x7f.1").await.unwrap(), vec![ip("127.0.0.1")]);
    assert_eq!(
        r.resolve("[::ffff:10.0.0.1]").await.unwrap(),
        vec![ip("10.0.0.1")]
    );
    assert_eq!(
        r.resolve("2001:db8::1").await.unwrap(),
        vec![ip("2001:db8::1")]
    );
}

#[tokio::test]
async fn nxdomain_and_invalid_names_are_typed() {
    let r = resolver().await;
    let err = r.resolve("nope.test").await.unwrap_err();
    assert!(matches!(err, ResolveError::NxDomain { .. }), "{err:?}");
    assert_eq!(err.reason_code(), "dns-nxdomain");

    for bad in ["", ".", "a b.test", "user@host.test", "x/y.test"] {
        let err = r.resolve(bad).await.unwrap_err();
        assert!(
            matches!(err, ResolveError::InvalidName { .. }),
            "{bad:?}: {err:?}"
        );
    }
}
