//! In-process tests of the DNS proxy on real sockets (127.0.0.1, port 0):
//! a client speaking DNS (messages built with hickory-proto) → Sluice →
//! a small authority started by each test, serving fixed records over UDP,
//! TCP and DNS-over-TLS and counting what it is asked.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

/// Everything lives in `mod dns` so `cargo test -p sluice dns` selects it.
mod dns {
    use sluice_api::Enforcement;
    use sluice_api::reason::ReasonCode;

    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    use std::str::FromStr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::rdata::svcb::{Alpn, EchConfigList, IpHint, SvcParamKey, SvcParamValue};
    use hickory_proto::rr::rdata::{A, CNAME, HTTPS, SOA, SVCB};
    use hickory_proto::rr::{Name, RData, Record, RecordType};
    use sluice::dns::{DenyAnswer, DnsAuditRecord, DnsConfig, DnsCore, DnsServer, QueryPolicy, QueryVerdict, Upstream};
    use sluice_api::DomainName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream, UdpSocket};
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    // ---------------------------------------------------------------- policy

    /// Allows `allowed.test` and `cdn.test` and their subdomains, watches
    /// `watch.test` (would deny, answered anyway), denies everything else.
    struct TestPolicy;

    impl QueryPolicy for TestPolicy {
        fn decide(&self, _src: IpAddr, qname: &DomainName, _qtype: u16) -> QueryVerdict {
            let n = qname.as_str();
            let under = |zone: &str| n == zone || n.ends_with(&format!(".{zone}"));
            if under("allowed.test") || under("cdn.test") {
                QueryVerdict::labelled("allow-test", true, ReasonCode::AllowedByRule, Enforcement::Enforced)
            } else if under("watch.test") {
                QueryVerdict::labelled("deny-watch", false, ReasonCode::DeniedByRule, Enforcement::Watched)
            } else {
                QueryVerdict::labelled("default", false, ReasonCode::DefaultDeny, Enforcement::Enforced)
            }
        }
    }

    // ---------------------------------------------------------------- authority

    #[derive(Default)]
    struct Seen {
        udp: AtomicUsize,
        tcp: AtomicUsize,
        tls: AtomicUsize,
        names: Mutex<Vec<String>>,
        /// (CD, DO) of the last query received.
        last_flags: Mutex<Option<(bool, bool)>>,
    }

    impl Seen {
        fn total(&self) -> usize {
            self.udp.load(Ordering::SeqCst) + self.tcp.load(Ordering::SeqCst) + self.tls.load(Ordering::SeqCst)
        }

        fn asked_for(&self, name: &str) -> usize {
            self.names.lock().unwrap().iter().filter(|n| n.as_str() == name).count()
        }
    }

    struct Authority {
        addr: SocketAddr,
        tls_addr: SocketAddr,
        tls_roots: Arc<rustls::ClientConfig>,
        seen: Arc<Seen>,
    }

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn soa() -> Record {
        let zone = name("allowed.test.");
        Record::from_rdata(
            zone.clone(),
            600,
            RData::SOA(SOA::new(
                name("ns.allowed.test."),
                name("hostmaster.allowed.test."),
                1,
                3600,
                600,
                86_400,
                300,
            )),
        )
    }

    fn a(owner: &str, ttl: u32, ip: Ipv4Addr) -> Record {
        Record::from_rdata(name(owner), ttl, RData::A(A(ip)))
    }

    /// The fixed zone the authority serves.
    fn zone_answer(q: &Message, over_udp: bool) -> Message {
        let query = q.queries[0].clone();
        let qname = query.name().to_ascii().to_ascii_lowercase();
        let mut m = Message::response(q.metadata.id, OpCode::Query);
        m.metadata.recursion_desired = q.metadata.recursion_desired;
        m.metadata.recursion_available = true;
        m.metadata.authoritative = true;
        m.add_query(query.clone());
        if let Some(e) = &q.edns {
            let mut edns = Edns::new();
            edns.set_max_payload(1232);
            edns.set_dnssec_ok(e.flags().dnssec_ok);
            m.set_edns(edns);
        }
        let qt = query.query_type();
        match (qname.as_str(), qt) {
            ("www.allowed.test.", RecordType::A) => {
                m.add_answer(a(&qname, 300, Ipv4Addr::new(192, 0, 2, 10)));
            }
            ("short.allowed.test.", RecordType::A) => {
                m.add_answer(a(&qname, 5, Ipv4Addr::new(192, 0, 2, 11)));
            }
            ("alias.allowed.test.", RecordType::A) => {
                m.add_answer(Record::from_rdata(
                    name(&qname),
                    300,
                    RData::CNAME(CNAME(name("mid.allowed.test."))),
                ));
                m.add_answer(Record::from_rdata(
                    name("mid.allowed.test."),
                    300,
                    RData::CNAME(CNAME(name("edge.cdn.test."))),
                ));
                m.add_answer(a("edge.cdn.test.", 30, Ipv4Addr::new(192, 0, 2, 20)));
            }
            ("ech.allowed.test.", RecordType::HTTPS) => {
                let svcb = SVCB::new(
                    1,
                    Name::root(),
                    vec![
                        (SvcParamKey::Alpn, SvcParamValue::Alpn(Alpn(vec!["h2".into()]))),
                        (
                            SvcParamKey::Ipv4Hint,
                            SvcParamValue::Ipv4Hint(IpHint(vec![A(Ipv4Addr::new(192, 0, 2, 30))])),
                        ),
                        (
                            SvcParamKey::EchConfigList,
                            SvcParamValue::EchConfigList(EchConfigList(vec![0xfe, 0x0d, 0, 4, 1, 2, 3, 4])),
                        ),
                    ],
                );
                m.add_answer(Record::from_rdata(name(&qname), 300, RData::HTTPS(HTTPS(svcb))));
            }
            ("big.allowed.test.", RecordType::A) => {
                for i in 0..100u8 {
                    m.add_answer(a(&qname, 300, Ipv4Addr::new(198, 18, 0, i)));
                }
            }
            ("medium.allowed.test.", RecordType::A) => {
                for i in 0..40u8 {
                    m.add_answer(a(&qname, 300, Ipv4Addr::new(198, 18, 1, i)));
                }
            }
            ("servfail.allowed.test.", _) => {
                m.metadata.response_code = ResponseCode::ServFail;
            }
            (n, RecordType::A) if n.ends_with("denied.test.") || n.ends_with("watch.test.") => {
                m.add_answer(a(n, 300, Ipv4Addr::new(198, 51, 100, 1)));
            }
            _ => {
                m.metadata.response_code = ResponseCode::NXDomain;
                m.add_authority(soa());
            }
        }
        let limit = q.edns.as_ref().map_or(512, |e| usize::from(e.max_payload()));
        if over_udp && m.to_vec().unwrap().len() > limit {
            m.answers.clear();
            m.metadata.truncation = true;
        }
        m
    }

    fn record_query(seen: &Seen, q: &Message) {
        seen.names
            .lock()
            .unwrap()
            .push(q.queries[0].name().to_ascii().to_ascii_lowercase());
        *seen.last_flags.lock().unwrap() = Some((
            q.metadata.checking_disabled,
            q.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok),
        ));
    }

    async fn serve_stream<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S, seen: Arc<Seen>) {
        loop {
            let mut len = [0u8; 2];
            if s.read_exact(&mut len).await.is_err() {
                return;
            }
            let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
            if s.read_exact(&mut buf).await.is_err() {
                return;
            }
            let q = Message::from_vec(&buf).unwrap();
            record_query(&seen, &q);
            let out = zone_answer(&q, false).to_vec().unwrap();
            let mut framed = u16::try_from(out.len()).unwrap().to_be_bytes().to_vec();
            framed.extend_from_slice(&out);
            if s.write_all(&framed).await.is_err() {
                return;
            }
        }
    }

    async fn start_authority() -> Authority {
        let seen = Arc::new(Seen::default());
        // UDP and TCP on one port: the kernel's UDP pick may have its TCP
        // twin taken by a concurrently running test, so try a few.
        let mut pair = None;
        for _ in 0..32 {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()).await {
                pair = Some((udp, tcp));
                break;
            }
        }
        let (udp, tcp) = pair.expect("no port free for both UDP and TCP");
        let addr = udp.local_addr().unwrap();
        let tls_tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tls_addr = tls_tcp.local_addr().unwrap();

        let s = Arc::clone(&seen);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65535];
            loop {
                let (n, peer) = udp.recv_from(&mut buf).await.unwrap();
                let q = Message::from_vec(&buf[..n]).unwrap();
                s.udp.fetch_add(1, Ordering::SeqCst);
                record_query(&s, &q);
                let out = zone_answer(&q, true).to_vec().unwrap();
                udp.send_to(&out, peer).await.unwrap();
            }
        });
        let s = Arc::clone(&seen);
        tokio::spawn(async move {
            loop {
                let (stream, _) = tcp.accept().await.unwrap();
                s.tcp.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve_stream(stream, Arc::clone(&s)));
            }
        });

        let cert = rcgen::generate_simple_self_signed(vec!["dns.test".to_owned()]).unwrap();
        let cert_der = cert.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let server_config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![cert_der.clone()], key)
                .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert_der).unwrap();
        let tls_roots = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        let s = Arc::clone(&seen);
        tokio::spawn(async move {
            loop {
                let (stream, _) = tls_tcp.accept().await.unwrap();
                let acceptor = acceptor.clone();
                let s = Arc::clone(&s);
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(stream).await {
                        s.tls.fetch_add(1, Ordering::SeqCst);
                        serve_stream(tls, s).await;
                    }
                });
            }
        });
        Authority {
            addr,
            tls_addr,
            tls_roots,
            seen,
        }
    }

    // ---------------------------------------------------------------- harness

    struct Harness {
        dns: SocketAddr,
        auth: Authority,
        audit: mpsc::Receiver<DnsAuditRecord>,
        core: Arc<DnsCore>,
        token: CancellationToken,
        server: tokio::task::JoinHandle<()>,
    }

    impl Harness {
        async fn start(tweak: impl FnOnce(&mut DnsConfig, &Authority)) -> Self {
            let auth = start_authority().await;
            let mut config = DnsConfig {
                upstreams: vec![Upstream::udp(auth.addr)],
                ..DnsConfig::default()
            };
            tweak(&mut config, &auth);
            let core = Arc::new(DnsCore::with_new_bindings(config, Arc::new(TestPolicy)).unwrap());
            let (tx, audit) = mpsc::channel(1024);
            let server = DnsServer::bind("127.0.0.1:0".parse().unwrap(), Arc::clone(&core), tx)
                .await
                .unwrap();
            let dns = server.local_addr();
            let token = CancellationToken::new();
            let t = token.clone();
            let server = tokio::spawn(async move { server.run(t).await.unwrap() });
            Self {
                dns,
                auth,
                audit,
                core,
                token,
                server,
            }
        }

        async fn stop(self) {
            self.token.cancel();
            self.server.await.unwrap();
        }

        async fn next_audit(&mut self) -> DnsAuditRecord {
            tokio::time::timeout(Duration::from_secs(10), self.audit.recv())
                .await
                .unwrap()
                .unwrap()
        }
    }

    struct Ask {
        edns: Option<u16>,
        dnssec_ok: bool,
        checking_disabled: bool,
        id: u16,
    }

    impl Default for Ask {
        fn default() -> Self {
            Self {
                edns: Some(1232),
                dnssec_ok: false,
                checking_disabled: false,
                id: 0x5151,
            }
        }
    }

    fn build_query(qname: &str, qtype: RecordType, ask: &Ask) -> Vec<u8> {
        let mut m = Message::new(ask.id, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.metadata.checking_disabled = ask.checking_disabled;
        m.add_query(Query::query(name(qname), qtype));
        if let Some(payload) = ask.edns {
            let mut e = Edns::new();
            e.set_max_payload(payload);
            e.set_dnssec_ok(ask.dnssec_ok);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    async fn udp_raw(server: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.send_to(bytes, server).await.unwrap();
        let mut buf = vec![0u8; 65535];
        match tokio::time::timeout(Duration::from_secs(10), sock.recv_from(&mut buf)).await {
            Ok(r) => Some(buf[..r.unwrap().0].to_vec()),
            Err(_) => None,
        }
    }

    async fn udp_ask(server: SocketAddr, qname: &str, qtype: RecordType, ask: &Ask) -> (Message, usize) {
        let bytes = udp_raw(server, &build_query(qname, qtype, ask))
            .await
            .expect("no UDP answer");
        (Message::from_vec(&bytes).unwrap(), bytes.len())
    }

    async fn tcp_ask(server: SocketAddr, qname: &str, qtype: RecordType, ask: &Ask) -> Message {
        let mut s = TcpStream::connect(server).await.unwrap();
        let q = build_query(qname, qtype, ask);
        let mut framed = u16::try_from(q.len()).unwrap().to_be_bytes().to_vec();
        framed.extend_from_slice(&q);
        s.write_all(&framed).await.unwrap();
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await.unwrap();
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut buf).await.unwrap();
        Message::from_vec(&buf).unwrap()
    }

    fn a_addrs(m: &Message) -> Vec<Ipv4Addr> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    fn now() -> std::time::Instant {
        tokio::time::Instant::now().into_std()
    }

    fn dn(s: &str) -> DomainName {
        DomainName::parse(s).unwrap()
    }

    // ---------------------------------------------------------------- tests

    #[tokio::test]
    async fn allowed_query_is_forwarded_with_id_flags_and_edns_preserved() {
        let mut h = Harness::start(|_, _| {}).await;
        let ask = Ask {
            dnssec_ok: true,
            checking_disabled: true,
            id: 0xbeef,
            ..Ask::default()
        };
        let (m, _) = udp_ask(h.dns, "WWW.Allowed.Test.", RecordType::A, &ask).await;
        assert_eq!(m.metadata.id, 0xbeef);
        assert_eq!(m.metadata.message_type, MessageType::Response);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.recursion_desired && m.metadata.recursion_available);
        assert!(m.metadata.checking_disabled);
        assert!(m.edns.as_ref().unwrap().flags().dnssec_ok);
        assert_eq!(m.queries[0].name().to_ascii(), "WWW.Allowed.Test.");
        assert_eq!(a_addrs(&m), vec![Ipv4Addr::new(192, 0, 2, 10)]);
        // The upstream saw the client's CD and DO bits.
        assert_eq!(*h.auth.seen.last_flags.lock().unwrap(), Some((true, true)));

        let rec = h.next_audit().await;
        assert_eq!(&*rec.qname, "www.allowed.test");
        assert_eq!(rec.qtype, 1);
        assert!(rec.allowed && rec.enforced && !rec.watched && !rec.cache_hit);
        assert_eq!(&*rec.rule, "allow-test");
        assert_eq!(rec.reason, "allowed-by-rule");
        assert_eq!(rec.rcode, 0);
        assert_eq!(rec.upstream, Some(h.auth.addr));
        assert_eq!(h.core.stats().snapshot().allowed, 1);
        h.stop().await;
    }

    #[tokio::test]
    async fn denied_query_gets_nxdomain_and_never_reaches_upstream() {
        let mut h = Harness::start(|_, _| {}).await;
        let (m, _) = udp_ask(h.dns, "secret.denied.test.", RecordType::A, &Ask::default()).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert!(m.answers.is_empty());
        assert_eq!(h.auth.seen.total(), 0);
        let rec = h.next_audit().await;
        assert!(!rec.allowed && rec.enforced && !rec.watched);
        assert_eq!((&*rec.rule, rec.reason, rec.rcode), ("default", "default-deny", 3));
        assert_eq!(h.core.stats().snapshot().denied, 1);
        h.stop().await;
    }

    #[tokio::test]
    async fn denied_query_can_be_refused() {
        let h = Harness::start(|c, _| c.deny_answer = DenyAnswer::Refused).await;
        let (m, _) = udp_ask(h.dns, "x.denied.test.", RecordType::A, &Ask::default()).await;
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
        h.stop().await;
    }

    #[tokio::test]
    async fn denied_query_can_be_sinkholed() {
        let v4 = Ipv4Addr::new(10, 99, 0, 1);
        let v6 = Ipv6Addr::from_str("fd00::99").unwrap();
        let h = Harness::start(|c, _| c.deny_answer = DenyAnswer::Sinkhole { v4, v6 }).await;
        let (m, _) = udp_ask(h.dns, "x.denied.test.", RecordType::A, &Ask::default()).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(a_addrs(&m), vec![v4]);
        let (m, _) = udp_ask(h.dns, "x.denied.test.", RecordType::AAAA, &Ask::default()).await;
        assert!(matches!(&m.answers[0].data, RData::AAAA(aaaa) if aaaa.0 == v6));
        let (m, _) = udp_ask(h.dns, "x.denied.test.", RecordType::TXT, &Ask::default()).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
        // A sinkhole address is not a binding: nothing was allowed.
        assert!(h.core.bindings().is_empty());
        assert_eq!(h.auth.seen.total(), 0);
        h.stop().await;
    }

    #[tokio::test]
    async fn watch_mode_answers_and_records_would_deny() {
        let mut h = Harness::start(|_, _| {}).await;
        let (m, _) = udp_ask(h.dns, "a.watch.test.", RecordType::A, &Ask::default()).await;
        assert_eq!(a_addrs(&m), vec![Ipv4Addr::new(198, 51, 100, 1)]);
        let rec = h.next_audit().await;
        assert!(!rec.allowed && !rec.enforced && rec.watched);
        assert_eq!(&*rec.rule, "deny-watch");
        assert_eq!(h.core.stats().snapshot().watched, 1);
        h.stop().await;
    }

    #[tokio::test]
    async fn ech_is_stripped_from_https_answers_when_enabled() {
        let mut h = Harness::start(|c, _| c.strip_ech = true).await;
        let (m, _) = udp_ask(h.dns, "ech.allowed.test.", RecordType::HTTPS, &Ask::default()).await;
        let RData::HTTPS(https) = &m.answers[0].data else {
            panic!("expected HTTPS, got {m:?}")
        };
        let keys: Vec<SvcParamKey> = https.0.svc_params.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, vec![SvcParamKey::Alpn, SvcParamKey::Ipv4Hint]);
        let rec = h.next_audit().await;
        assert!(rec.ech_stripped);
        // The address hint is a binding too.
        assert!(h.core.bindings().is_bound(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 30)),
            &dn("ech.allowed.test"),
            now()
        ));
        // Cached copies are stripped too.
        let (m, _) = udp_ask(h.dns, "ech.allowed.test.", RecordType::HTTPS, &Ask::default()).await;
        let RData::HTTPS(https) = &m.answers[0].data else {
            panic!("expected HTTPS")
        };
        assert!(https.0.svc_params.iter().all(|(k, _)| *k != SvcParamKey::EchConfigList));
        let rec = h.next_audit().await;
        assert!(rec.cache_hit && rec.ech_stripped);
        h.stop().await;
    }

    #[tokio::test]
    async fn ech_is_kept_when_stripping_is_off() {
        let mut h = Harness::start(|_, _| {}).await;
        let (m, _) = udp_ask(h.dns, "ech.allowed.test.", RecordType::HTTPS, &Ask::default()).await;
        let RData::HTTPS(https) = &m.answers[0].data else {
            panic!("expected HTTPS")
        };
        assert!(https.0.svc_params.iter().any(|(k, _)| *k == SvcParamKey::EchConfigList));
        assert!(!h.next_audit().await.ech_stripped);
        h.stop().await;
    }

    #[tokio::test]
    async fn truncated_udp_upstream_answer_is_retried_over_tcp() {
        let h = Harness::start(|_, _| {}).await;
        // Over TCP to Sluice, so the client gets all 100 records.
        let m = tcp_ask(h.dns, "big.allowed.test.", RecordType::A, &Ask::default()).await;
        assert_eq!(a_addrs(&m).len(), 100);
        assert!(!m.metadata.truncation);
        assert_eq!(h.auth.seen.udp.load(Ordering::SeqCst), 1);
        assert_eq!(h.auth.seen.tcp.load(Ordering::SeqCst), 1);
        // Over UDP the client gets TC (1600+ bytes > 1232) and no partial answer.
        let (m, len) = udp_ask(h.dns, "big.allowed.test.", RecordType::A, &Ask::default()).await;
        assert!(m.metadata.truncation);
        assert!(m.answers.is_empty());
        assert!(len <= 1232);
        h.stop().await;
    }

    #[tokio::test]
    async fn answer_larger_than_client_udp_size_is_truncated() {
        let h = Harness::start(|_, _| {}).await;
        // ~700 bytes: fits the 1232 Sluice advertises upstream, not 512.
        let no_edns = Ask {
            edns: None,
            ..Ask::default()
        };
        let (m, len) = udp_ask(h.dns, "medium.allowed.test.", RecordType::A, &no_edns).await;
        assert!(m.metadata.truncation, "{m:?}");
        assert!(len <= 512);
        assert!(m.edns.is_none(), "no OPT for a client that sent none");
        let (m, len) = udp_ask(h.dns, "medium.allowed.test.", RecordType::A, &Ask::default()).await;
        assert!(!m.metadata.truncation);
        assert_eq!(a_addrs(&m).len(), 40);
        assert!(len > 512);
        let m = tcp_ask(h.dns, "medium.allowed.test.", RecordType::A, &no_edns).await;
        assert_eq!(a_addrs(&m).len(), 40);
        h.stop().await;
    }

    #[tokio::test]
    async fn upstream_down_gives_servfail() {
        // A port nobody listens on: the kernel refuses at once.
        let dead = {
            let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            s.local_addr().unwrap()
        };
        let mut h = Harness::start(|c, _| c.upstreams = vec![Upstream::udp(dead), Upstream::tcp(dead)]).await;
        let (m, _) = udp_ask(h.dns, "www.allowed.test.", RecordType::A, &Ask::default()).await;
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        let rec = h.next_audit().await;
        assert_eq!(rec.rcode, 2);
        assert!(rec.upstream.is_none());
        let stats = h.core.stats().snapshot();
        assert_eq!(stats.servfail, 1);
        assert!(stats.upstream_errors >= 2);
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn silent_upstream_gives_servfail_within_the_query_timeout() {
        // Bound but never answering: only the timeouts end the query.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let silent_addr = silent.local_addr().unwrap();
        let h = Harness::start(|c, _| {
            c.upstreams = vec![Upstream::udp(silent_addr)];
            c.attempt_timeout = Duration::from_secs(2);
            c.attempts = 5;
            c.query_timeout = Duration::from_secs(3);
        })
        .await;
        let start = tokio::time::Instant::now();
        let (m, _) = udp_ask(h.dns, "www.allowed.test.", RecordType::A, &Ask::default()).await;
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        // Paused clock: this is virtual time, exact, not wall-clock.
        assert!(
            start.elapsed() <= Duration::from_secs(3) + Duration::from_millis(10),
            "{:?}",
            start.elapsed()
        );
        drop(silent);
        h.stop().await;
    }

    #[tokio::test]
    async fn failover_to_the_next_upstream() {
        let dead = {
            let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            s.local_addr().unwrap()
        };
        let mut h = Harness::start(|c, a| c.upstreams = vec![Upstream::udp(dead), Upstream::udp(a.addr)]).await;
        let (m, _) = udp_ask(h.dns, "www.allowed.test.", RecordType::A, &Ask::default()).await;
        assert_eq!(a_addrs(&m), vec![Ipv4Addr::new(192, 0, 2, 10)]);
        assert_eq!(h.next_audit().await.upstream, Some(h.auth.addr));
        h.stop().await;
    }

    #[tokio::test]
    async fn tcp_and_tls_upstreams() {
        let h = Harness::start(|c, a| c.upstreams = vec![Upstream::tcp(a.addr)]).await;
        let (m, _) = udp_ask(h.dns, "www.allowed.test.", RecordType::A, &Ask::default()).await;
        assert_eq!(a_addrs(&m), vec![Ipv4Addr::new(192, 0, 2, 10)]);
        assert_eq!(h.auth.seen.tcp.load(Ordering::SeqCst), 1);
        h.stop().await;

        let h = Harness::start(|c, a| {
            c.upstreams = vec![Upstream::tls(a.tls_addr, "dns.test")];
            c.tls = Some(Arc::clone(&a.tls_roots));
        })
        .await;
        let (m, _) = udp_ask(h.dns, "www.allowed.test.", RecordType::A, &Ask::default()).await;
        assert_eq!(a_addrs(&m), vec![Ipv4Addr::new(192, 0, 2, 10)]);
        // A second (uncached) query reuses the idle TLS connection.
        let (m, _) = udp_ask(h.dns, "alias.allowed.test.", RecordType::A, &Ask::default()).await;
        assert_eq!(m.answers.len(), 3);
        assert_eq!(h.auth.seen.tls.load(Ordering::SeqCst), 1);
        assert_eq!(h.auth.seen.total(), 1);
        assert_eq!(h.auth.seen.asked_for("alias.allowed.test."), 1);
        h.stop().await;
    }

    #[tokio::test]
    async fn tls_upstream_with_wrong_name_fails_closed() {
        let h = Harness::start(|c, a| {
            c.upstreams = vec![Upstream::tls(a.tls_addr, "other.test")];
            c.tls = Some(Arc::clone(&a.tls_roots));
        })
        .await;
        let (m, _) = udp_ask(h.dns, "www.allowed.test.", RecordType::A, &Ask::default()).await;
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(h.auth.seen.tls.load(Ordering::SeqCst), 0);
        h.stop().await;
    }

    #[tokio::test]
    async fn cache_hit_does_not_ask_upstream_and_ages_ttl() {
        let mut h = Harness::start(|_, _| {}).await;
        let (m1, _) = udp_ask(h.dns, "www.allowed.test.", RecordType::A, &Ask::default()).await;
        let (m2, _) = udp_ask(
            h.dns,
            "www.allowed.test.",
            RecordType::A,
            &Ask {
                id: 7,
                ..Ask::default()
            },
        )
        .await;
        assert_eq!(h.auth.seen.asked_for("www.allowed.test."), 1);
        assert_eq!(m2.metadata.id, 7);
        assert_eq!(a_addrs(&m1), a_addrs(&m2));
        assert!(m2.answers[0].ttl <= m1.answers[0].ttl);
        assert!(!h.next_audit().await.cache_hit);
        let rec = h.next_audit().await;
        assert!(rec.cache_hit);
        assert!(rec.upstream.is_none());
        let stats = h.core.stats().snapshot();
        assert_eq!((stats.cache_hits, stats.cache_misses), (1, 1));
        // DO=1 is a different cache entry.
        udp_ask(
            h.dns,
            "www.allowed.test.",
            RecordType::A,
            &Ask {
                dnssec_ok: true,
                ..Ask::default()
            },
        )
        .await;
        assert_eq!(h.auth.seen.asked_for("www.allowed.test."), 2);
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn cache_entry_expires_with_its_ttl() {
        let h = Harness::start(|_, _| {}).await;
        let (m, _) = udp_ask(h.dns, "short.allowed.test.", RecordType::A, &Ask::default()).await;
        assert_eq!(m.answers[0].ttl, 5);
        tokio::time::advance(Duration::from_secs(3)).await;
        let (m, _) = udp_ask(h.dns, "short.allowed.test.", RecordType::A, &Ask::default()).await;
        assert_eq!(m.answers[0].ttl, 2, "TTL decremented on a hit");
        assert_eq!(h.auth.seen.asked_for("short.allowed.test."), 1);
        tokio::time::advance(Duration::from_secs(3)).await;
        udp_ask(h.dns, "short.allowed.test.", RecordType::A, &Ask::default()).await;
        assert_eq!(h.auth.seen.asked_for("short.allowed.test."), 2);
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn negative_answers_are_cached_for_the_soa_minimum() {
        let h = Harness::start(|_, _| {}).await;
        let (m, _) = udp_ask(h.dns, "nope.allowed.test.", RecordType::A, &Ask::default()).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert!(matches!(m.authorities[0].data, RData::SOA(_)));
        tokio::time::advance(Duration::from_secs(299)).await;
        let (m, _) = udp_ask(h.dns, "nope.allowed.test.", RecordType::A, &Ask::default()).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(m.authorities[0].ttl, 600 - 299);
        assert_eq!(h.auth.seen.asked_for("nope.allowed.test."), 1);
        // min(SOA TTL 600, MINIMUM 300) = 300 s.
        tokio::time::advance(Duration::from_secs(2)).await;
        udp_ask(h.dns, "nope.allowed.test.", RecordType::A, &Ask::default()).await;
        assert_eq!(h.auth.seen.asked_for("nope.allowed.test."), 2);
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn bindings_follow_cname_chains_to_the_queried_name() {
        let h = Harness::start(|_, _| {}).await;
        let bindings = Arc::clone(h.core.bindings());
        let me = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let edge = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 20));
        // Before resolving, an IP-only flow to `edge` cannot be attributed.
        assert!(!bindings.has_bindings_for_source(me, now()));
        assert_eq!(bindings.lookup(me, edge, now()), None);

        let (m, _) = udp_ask(h.dns, "alias.allowed.test.", RecordType::A, &Ask::default()).await;
        assert_eq!(m.answers.len(), 3);
        assert_eq!(bindings.lookup(me, edge, now()), Some(dn("alias.allowed.test")));
        assert!(bindings.is_bound(me, edge, &dn("alias.allowed.test"), now()));
        assert!(!bindings.is_bound(me, edge, &dn("edge.cdn.test"), now()));
        assert!(bindings.has_bindings_for_source(me, now()));
        assert_eq!(bindings.names_for(edge, now()), vec![dn("alias.allowed.test")]);
        assert!(!bindings.is_bound(
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
            edge,
            &dn("alias.allowed.test"),
            now()
        ));

        // The record's TTL is 30 s; the 60 s floor and 30 s grace keep it 90 s.
        tokio::time::advance(Duration::from_secs(89)).await;
        assert!(bindings.is_bound(me, edge, &dn("alias.allowed.test"), now()));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!bindings.is_bound(me, edge, &dn("alias.allowed.test"), now()));
        assert!(!bindings.has_bindings_for_source(me, now()));
        h.stop().await;
    }

    #[tokio::test]
    async fn tcp_clients_get_answers_and_denials() {
        let h = Harness::start(|_, _| {}).await;
        let m = tcp_ask(h.dns, "www.allowed.test.", RecordType::A, &Ask::default()).await;
        assert_eq!(a_addrs(&m), vec![Ipv4Addr::new(192, 0, 2, 10)]);
        let m = tcp_ask(h.dns, "x.denied.test.", RecordType::A, &Ask::default()).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        h.stop().await;
    }

    #[tokio::test]
    async fn exfiltration_shaped_query_is_denied_with_its_reason() {
        let mut h = Harness::start(|c, _| c.exfiltration = Some(sluice::dns::ExfilConfig::default())).await;
        let long = format!("{}.allowed.test.", "a".repeat(55));
        let (m, _) = udp_ask(h.dns, &long, RecordType::A, &Ask::default()).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        let rec = h.next_audit().await;
        assert_eq!(rec.reason, "dns-exfiltration");
        assert!(!rec.allowed && rec.enforced);
        assert_eq!(h.auth.seen.total(), 0);
        h.stop().await;
    }

    #[tokio::test]
    async fn full_audit_channel_drops_and_counts() {
        let auth = start_authority().await;
        let config = DnsConfig {
            upstreams: vec![Upstream::udp(auth.addr)],
            ..DnsConfig::default()
        };
        let core = Arc::new(DnsCore::with_new_bindings(config, Arc::new(TestPolicy)).unwrap());
        let (tx, _rx) = mpsc::channel(1);
        let server = DnsServer::bind("127.0.0.1:0".parse().unwrap(), Arc::clone(&core), tx)
            .await
            .unwrap();
        let dns = server.local_addr();
        let token = CancellationToken::new();
        let run = tokio::spawn(server.run(token.clone()));
        for _ in 0..3 {
            udp_ask(dns, "x.denied.test.", RecordType::A, &Ask::default()).await;
        }
        assert_eq!(core.stats().snapshot().audit_drops, 2);
        token.cancel();
        run.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn malformed_datagrams_get_formerr_or_nothing() {
        let mut h = Harness::start(|_, _| {}).await;
        // A header claiming one question, then nothing.
        let (m, _) = {
            let bytes = udp_raw(h.dns, &[0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0])
                .await
                .unwrap();
            (Message::from_vec(&bytes).unwrap(), bytes.len())
        };
        assert_eq!(m.metadata.id, 0x1234);
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        assert_eq!(h.next_audit().await.reason, "dns-malformed");
        // Too short for a header: dropped; the server keeps serving.
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.send_to(&[1, 2, 3], h.dns).await.unwrap();
        let (m, _) = udp_ask(h.dns, "www.allowed.test.", RecordType::A, &Ask::default()).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(h.core.stats().snapshot().dropped, 1);
        h.stop().await;
    }

    #[tokio::test]
    async fn malformed_corpus_replayed_over_udp_and_tcp() {
        let h = Harness::start(|_, _| {}).await;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dns");
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "bin"))
            .collect();
        files.sort();
        assert!(files.len() >= 20);
        for path in &files {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let bytes = std::fs::read(path).unwrap();
            let drop_expected = name.starts_with("drop-");
            // UDP: an answer (never for drop-*), parsable and echoing the ID.
            let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            sock.send_to(&bytes, h.dns).await.unwrap();
            if !drop_expected {
                let mut buf = vec![0u8; 65535];
                let (n, _) = tokio::time::timeout(Duration::from_secs(10), sock.recv_from(&mut buf))
                    .await
                    .unwrap_or_else(|_| panic!("{name}: no UDP answer"))
                    .unwrap();
                let m = Message::from_vec(&buf[..n]).unwrap();
                assert_eq!(m.metadata.id.to_be_bytes(), bytes[..2], "{name}");
                assert_ne!(m.metadata.response_code, ResponseCode::NoError, "{name}");
            }
            // TCP: an answer, or the connection closes for drop-*.
            let mut s = TcpStream::connect(h.dns).await.unwrap();
            let mut framed = u16::try_from(bytes.len()).unwrap().to_be_bytes().to_vec();
            framed.extend_from_slice(&bytes);
            s.write_all(&framed).await.unwrap();
            let mut len = [0u8; 2];
            let read = tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut len))
                .await
                .unwrap();
            assert_eq!(read.is_err(), drop_expected, "{name}: TCP outcome");
        }
        // Still serving.
        let (m, _) = udp_ask(h.dns, "www.allowed.test.", RecordType::A, &Ask::default()).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(h.auth.seen.total(), 1, "no malformed query reached the upstream");
        h.stop().await;
    }

    #[tokio::test]
    async fn pipelined_tcp_queries_are_all_answered() {
        let h = Harness::start(|_, _| {}).await;
        let mut s = TcpStream::connect(h.dns).await.unwrap();
        let mut out = Vec::new();
        for (i, qname) in ["www.allowed.test.", "x.denied.test.", "alias.allowed.test."]
            .iter()
            .enumerate()
        {
            let q = build_query(
                qname,
                RecordType::A,
                &Ask {
                    id: u16::try_from(i).unwrap() + 1,
                    ..Ask::default()
                },
            );
            out.extend_from_slice(&u16::try_from(q.len()).unwrap().to_be_bytes());
            out.extend_from_slice(&q);
        }
        s.write_all(&out).await.unwrap();
        let mut ids = Vec::new();
        for _ in 0..3 {
            let mut len = [0u8; 2];
            s.read_exact(&mut len).await.unwrap();
            let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
            s.read_exact(&mut buf).await.unwrap();
            ids.push(Message::from_vec(&buf).unwrap().metadata.id);
        }
        ids.sort_unstable();
        assert_eq!(ids, vec![1, 2, 3]);
        h.stop().await;
    }

    #[tokio::test]
    async fn shutdown_stops_serving() {
        let h = Harness::start(|_, _| {}).await;
        let dns = h.dns;
        udp_ask(dns, "www.allowed.test.", RecordType::A, &Ask::default()).await;
        h.stop().await;
        // The sockets are closed: TCP is refused.
        assert!(TcpStream::connect(dns).await.is_err());
    }

    #[tokio::test]
    async fn pooled_tcp_connection_closed_by_upstream_is_replaced() {
        // An upstream that answers one query per connection, then hangs up.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let mut len = [0u8; 2];
                s.read_exact(&mut len).await.unwrap();
                let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
                s.read_exact(&mut buf).await.unwrap();
                let out = zone_answer(&Message::from_vec(&buf).unwrap(), false).to_vec().unwrap();
                let mut framed = u16::try_from(out.len()).unwrap().to_be_bytes().to_vec();
                framed.extend_from_slice(&out);
                s.write_all(&framed).await.unwrap();
            }
        });
        let h = Harness::start(|c, _| c.upstreams = vec![Upstream::tcp(addr)]).await;
        let (m, _) = udp_ask(h.dns, "www.allowed.test.", RecordType::A, &Ask::default()).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        let (m, _) = udp_ask(h.dns, "alias.allowed.test.", RecordType::A, &Ask::default()).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(m.answers.len(), 3);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        h.stop().await;
    }

    /// A real resolver (hickory-resolver, UDP with TCP fallback) pointed at Sluice.
    #[tokio::test]
    async fn dns_real_hickory_resolver_through_sluice() {
        use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
        use hickory_resolver::net::runtime::TokioRuntimeProvider;

        let h = Harness::start(|_, _| {}).await;
        let mut udp = ConnectionConfig::udp();
        udp.port = h.dns.port();
        let mut tcp = ConnectionConfig::tcp();
        tcp.port = h.dns.port();
        let ns = NameServerConfig::new(h.dns.ip(), true, vec![udp, tcp]);
        let resolver = hickory_resolver::Resolver::builder_with_config(
            ResolverConfig::from_name_servers(vec![ns]),
            TokioRuntimeProvider::default(),
        )
        .build()
        .unwrap();

        let ips: Vec<IpAddr> = resolver
            .lookup_ip("alias.allowed.test.")
            .await
            .unwrap()
            .iter()
            .collect();
        assert!(ips.contains(&IpAddr::V4(Ipv4Addr::new(192, 0, 2, 20))), "{ips:?}");
        assert!(h.core.bindings().is_bound(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 20)),
            &dn("alias.allowed.test"),
            now()
        ));
        // The 100-record answer only fits over TCP; the resolver retries on TC.
        let big = resolver.lookup_ip("big.allowed.test.").await.unwrap();
        assert_eq!(big.iter().filter(IpAddr::is_ipv4).count(), 100);
        // Denied names fail to resolve.
        assert!(resolver.lookup_ip("secret.denied.test.").await.is_err());
        h.stop().await;
    }

    #[tokio::test]
    async fn ipv6_listener_serves_and_binds_v6_sources() {
        let Ok(probe) = UdpSocket::bind("[::1]:0").await else {
            // No IPv6 loopback in this sandbox: nothing to test.
            return;
        };
        drop(probe);
        let auth = start_authority().await;
        let config = DnsConfig {
            upstreams: vec![Upstream::udp(auth.addr)],
            ..DnsConfig::default()
        };
        let core = Arc::new(DnsCore::with_new_bindings(config, Arc::new(TestPolicy)).unwrap());
        let (tx, _rx) = mpsc::channel(16);
        let server = DnsServer::bind("[::1]:0".parse().unwrap(), Arc::clone(&core), tx)
            .await
            .unwrap();
        let dns = server.local_addr();
        assert!(dns.is_ipv6());
        let token = CancellationToken::new();
        let run = tokio::spawn(server.run(token.clone()));
        let sock = UdpSocket::bind("[::1]:0").await.unwrap();
        sock.send_to(&build_query("www.allowed.test.", RecordType::A, &Ask::default()), dns)
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let (n, _) = tokio::time::timeout(Duration::from_secs(10), sock.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            a_addrs(&Message::from_vec(&buf[..n]).unwrap()),
            vec![Ipv4Addr::new(192, 0, 2, 10)]
        );
        assert!(core.bindings().is_bound(
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
            &dn("www.allowed.test"),
            now()
        ));
        let m = tcp_ask(dns, "x.denied.test.", RecordType::A, &Ask::default()).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        token.cancel();
        run.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn upstream_servfail_is_passed_on_but_not_cached_and_fails_over() {
        let mut h = Harness::start(|_, _| {}).await;
        for _ in 0..2 {
            let (m, _) = udp_ask(h.dns, "servfail.allowed.test.", RecordType::A, &Ask::default()).await;
            assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
            assert_eq!(h.next_audit().await.upstream, Some(h.auth.addr));
        }
        assert_eq!(h.auth.seen.asked_for("servfail.allowed.test."), 2);
        h.stop().await;

        // Two upstreams both failing: each is asked once, then the last
        // SERVFAIL is what the client gets.
        let h = Harness::start(|c, a| c.upstreams = vec![Upstream::udp(a.addr), Upstream::tcp(a.addr)]).await;
        let (m, _) = udp_ask(h.dns, "servfail.allowed.test.", RecordType::A, &Ask::default()).await;
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(h.auth.seen.udp.load(Ordering::SeqCst), 1);
        assert_eq!(h.auth.seen.tcp.load(Ordering::SeqCst), 1);
        h.stop().await;
    }

    // ---------------------------------------------------------------- upstream UDP pool

    /// A UDP upstream answering from the test zone and recording the source
    /// port of every query. With `forge`, each real answer is preceded by
    /// two impostors carrying 6.6.6.6: one with another ID, one with the
    /// right ID but another question.
    async fn start_port_recording_upstream(forge: bool) -> (SocketAddr, Arc<Mutex<Vec<u16>>>) {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let ports = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&ports);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65535];
            loop {
                let (n, peer) = sock.recv_from(&mut buf).await.unwrap();
                seen.lock().unwrap().push(peer.port());
                let q = Message::from_vec(&buf[..n]).unwrap();
                if forge {
                    let mut wrong_id = zone_answer(&q, true);
                    wrong_id.metadata.id ^= 0x8000;
                    wrong_id.answers.clear();
                    wrong_id.add_answer(a(&q.queries[0].name().to_ascii(), 300, Ipv4Addr::new(6, 6, 6, 6)));
                    sock.send_to(&wrong_id.to_vec().unwrap(), peer).await.unwrap();
                    let mut other = q.clone();
                    other.queries[0] = Query::query(name("evil.allowed.test."), RecordType::A);
                    let mut wrong_question = zone_answer(&other, true);
                    wrong_question.answers.clear();
                    wrong_question.add_answer(a("evil.allowed.test.", 300, Ipv4Addr::new(6, 6, 6, 6)));
                    sock.send_to(&wrong_question.to_vec().unwrap(), peer).await.unwrap();
                }
                let out = zone_answer(&q, true).to_vec().unwrap();
                sock.send_to(&out, peer).await.unwrap();
            }
        });
        (addr, ports)
    }

    #[tokio::test]
    async fn forged_and_mismatched_upstream_answers_are_ignored_and_counted() {
        let (up, _) = start_port_recording_upstream(true).await;
        let mut h = Harness::start(|c, _| c.upstreams = vec![Upstream::udp(up)]).await;
        let (m, _) = udp_ask(h.dns, "www.allowed.test.", RecordType::A, &Ask::default()).await;
        assert_eq!(a_addrs(&m), vec![Ipv4Addr::new(192, 0, 2, 10)]);
        assert_eq!(h.next_audit().await.upstream, Some(up));
        let stats = h.core.stats().snapshot();
        assert_eq!(stats.upstream_mismatched, 2, "{stats:?}");
        assert_eq!(stats.upstream_errors, 0);
        let client = IpAddr::V4(Ipv4Addr::LOCALHOST);
        assert!(
            h.core
                .bindings()
                .lookup(client, IpAddr::V4(Ipv4Addr::new(6, 6, 6, 6)), now())
                .is_none()
        );
        // Also when the case of the question differs: names compare
        // case-insensitively, so the real answer is still accepted.
        let (m, _) = udp_ask(
            h.dns,
            "WWW.Allowed.TEST.",
            RecordType::A,
            &Ask {
                id: 9,
                ..Ask::default()
            },
        )
        .await;
        assert_eq!(m.metadata.id, 9);
        h.stop().await;
    }

    #[tokio::test]
    async fn upstream_sockets_are_reused_round_robin() {
        let (up, ports) = start_port_recording_upstream(false).await;
        let h = Harness::start(|c, _| {
            c.upstreams = vec![Upstream::udp(up)];
            c.upstream_udp_sockets = 2;
            c.cache.max_entries = 0;
        })
        .await;
        for i in 0..6 {
            udp_ask(h.dns, &format!("n{i}.allowed.test."), RecordType::A, &Ask::default()).await;
        }
        let ports = ports.lock().unwrap().clone();
        assert_eq!(ports.len(), 6);
        assert_ne!(ports[0], ports[1], "two sockets, taken in turn: {ports:?}");
        for (i, p) in ports.iter().enumerate() {
            assert_eq!(*p, ports[i % 2], "{ports:?}");
        }
        h.stop().await;
    }

    #[tokio::test]
    async fn upstream_sockets_rotate_after_max_queries() {
        let (up, ports) = start_port_recording_upstream(false).await;
        let h = Harness::start(|c, _| {
            c.upstreams = vec![Upstream::udp(up)];
            c.upstream_udp_sockets = 1;
            c.upstream_socket_max_queries = 3;
            c.cache.max_entries = 0;
        })
        .await;
        for i in 0..7 {
            udp_ask(h.dns, &format!("r{i}.allowed.test."), RecordType::A, &Ask::default()).await;
        }
        let ports = ports.lock().unwrap().clone();
        assert_eq!(ports.len(), 7);
        assert!(ports[..3].iter().all(|p| *p == ports[0]), "{ports:?}");
        assert!(ports[3..6].iter().all(|p| *p == ports[3]), "{ports:?}");
        assert_ne!(ports[0], ports[3], "{ports:?}");
        assert_ne!(ports[3], ports[6], "{ports:?}");
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn upstream_sockets_rotate_after_max_age() {
        let (up, ports) = start_port_recording_upstream(false).await;
        let h = Harness::start(|c, _| {
            c.upstreams = vec![Upstream::udp(up)];
            c.upstream_udp_sockets = 1;
            c.upstream_socket_max_age = Duration::from_secs(5);
            c.cache.max_entries = 0;
        })
        .await;
        udp_ask(h.dns, "t1.allowed.test.", RecordType::A, &Ask::default()).await;
        udp_ask(h.dns, "t2.allowed.test.", RecordType::A, &Ask::default()).await;
        tokio::time::advance(Duration::from_secs(6)).await;
        udp_ask(h.dns, "t3.allowed.test.", RecordType::A, &Ask::default()).await;
        let ports = ports.lock().unwrap().clone();
        assert_eq!(ports[0], ports[1], "{ports:?}");
        assert_ne!(ports[1], ports[2], "{ports:?}");
        h.stop().await;
    }

    #[tokio::test]
    async fn a_burst_of_queries_from_many_clients_is_answered_to_each() {
        let h = Harness::start(|_, _| {}).await;
        // Fill the cache, then send a burst larger than one receive batch
        // before reading any answer.
        udp_ask(h.dns, "www.allowed.test.", RecordType::A, &Ask::default()).await;
        let mut clients = Vec::new();
        for i in 0..40u16 {
            let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let (name, id) = if i % 3 == 0 {
                ("x.denied.test.", 1000 + i)
            } else {
                ("www.allowed.test.", 1000 + i)
            };
            let q = build_query(name, RecordType::A, &Ask { id, ..Ask::default() });
            sock.send_to(&q, h.dns).await.unwrap();
            clients.push((sock, id, name));
        }
        for (sock, id, name) in clients {
            let mut buf = vec![0u8; 4096];
            let (n, from) = tokio::time::timeout(Duration::from_secs(10), sock.recv_from(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(from, h.dns);
            let m = Message::from_vec(&buf[..n]).unwrap();
            assert_eq!(m.metadata.id, id);
            assert_eq!(m.queries[0].name().to_ascii(), name);
            let want = if name.starts_with('x') {
                ResponseCode::NXDomain
            } else {
                ResponseCode::NoError
            };
            assert_eq!(m.metadata.response_code, want);
        }
        assert_eq!(h.auth.seen.asked_for("www.allowed.test."), 1);
        h.stop().await;
    }
}
