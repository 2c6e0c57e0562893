//! Sans-IO tests of the DNS engine: the malformed-packet corpus, arbitrary
//! bytes (proptest), and answer shaping, with time passed in explicitly.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

/// Everything lives in `mod dns` so `cargo test -p sluice dns` selects it.
mod dns {
    use sluice_api::Enforcement;
    use sluice_api::reason::ReasonCode;

    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::path::Path;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData, Record, RecordType};
    use proptest::prelude::*;
    use sluice::dns::{
        DnsConfig, DnsCore, ForwardError, QueryContext, QueryPolicy, QueryVerdict, Step, Transport, Upstream,
        UpstreamAnswer,
    };
    use sluice_api::DomainName;

    struct AllowTest;

    impl QueryPolicy for AllowTest {
        fn decide(&self, _src: IpAddr, qname: &DomainName, _qtype: u16) -> QueryVerdict {
            let allowed = qname.as_str() == "allowed.test" || qname.as_str().ends_with(".allowed.test");
            let (rule, reason) = if allowed {
                ("allow-test", ReasonCode::AllowedByRule)
            } else {
                ("default", ReasonCode::DefaultDeny)
            };
            QueryVerdict::labelled(rule, allowed, reason, Enforcement::Enforced)
        }
    }

    const UPSTREAM: &str = "127.0.0.1:53";

    fn core() -> DnsCore {
        let config = DnsConfig {
            upstreams: vec![Upstream::udp(UPSTREAM.parse().unwrap())],
            ..DnsConfig::default()
        };
        DnsCore::with_new_bindings(config, Arc::new(AllowTest)).unwrap()
    }

    fn ctx(transport: Transport, now: Instant) -> QueryContext {
        QueryContext {
            src: "10.1.2.3:5353".parse().unwrap(),
            transport,
            now,
            unix_ms: 1_700_000_000_000,
        }
    }

    fn corpus() -> Vec<(String, Vec<u8>)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dns");
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "bin"))
            .map(|p| {
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    std::fs::read(&p).unwrap(),
                )
            })
            .collect();
        files.sort();
        files
    }

    #[test]
    fn malformed_corpus_gets_the_outcome_its_name_says() {
        let core = core();
        let files = corpus();
        assert!(files.len() >= 20, "corpus went missing: {}", files.len());
        for (name, bytes) in &files {
            let expected = match name.split('-').next().unwrap() {
                "drop" => None,
                "formerr" => Some(ResponseCode::FormErr),
                "notimp" => Some(ResponseCode::NotImp),
                "badvers" => Some(ResponseCode::BADVERS),
                "refused" => Some(ResponseCode::Refused),
                other => panic!("{name}: unknown outcome prefix `{other}`"),
            };
            for transport in [Transport::Udp, Transport::Tcp] {
                match (core.handle_query_bytes(ctx(transport, Instant::now()), bytes), expected) {
                    (Step::Drop, None) => {}
                    (Step::Reply(reply), Some(rcode)) => {
                        let m =
                            Message::from_vec(&reply.bytes).unwrap_or_else(|e| panic!("{name}: reply unparsable: {e}"));
                        // Compare wire values: 16 is both BADVERS and BADSIG to hickory.
                        assert_eq!(u16::from(m.metadata.response_code), u16::from(rcode), "{name}");
                        assert_eq!(m.metadata.message_type, MessageType::Response, "{name}");
                        assert_eq!(m.metadata.id.to_be_bytes(), bytes[..2], "{name}: ID not echoed");
                        assert!(!reply.audit.allowed, "{name}");
                    }
                    (step, _) => panic!("{name}: expected {expected:?}, got {step:?}"),
                }
            }
        }
        let stats = core.stats().snapshot();
        assert!(stats.formerr >= 10, "{stats:?}");
    }

    fn query(qname: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(qname).unwrap(), qtype));
        if let Some(p) = edns {
            let mut e = Edns::new();
            e.set_max_payload(p);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    /// The upstream's answer to `pending`, built as an authority would.
    fn upstream_answer(
        pending: &sluice::dns::Pending,
        answers: Vec<Record>,
        additionals: Vec<Record>,
    ) -> UpstreamAnswer {
        let sent = Message::from_vec(&pending.upstream_query).unwrap();
        let mut m = Message::response(sent.metadata.id, OpCode::Query);
        m.add_query(pending.question.clone());
        m.answers = answers;
        m.additionals = additionals;
        UpstreamAnswer {
            wire: m.to_vec().unwrap(),
            message: m,
            upstream: UPSTREAM.parse().unwrap(),
        }
    }

    fn a_records(owner: &str, n: u8) -> Vec<Record> {
        (0..n)
            .map(|i| {
                Record::from_rdata(
                    Name::from_ascii(owner).unwrap(),
                    300,
                    RData::A(A(Ipv4Addr::new(198, 18, 2, i))),
                )
            })
            .collect()
    }

    #[test]
    fn upstream_query_carries_question_rd_and_edns() {
        let core = core();
        let Step::Forward(p) = core.handle_query_bytes(
            ctx(Transport::Udp, Instant::now()),
            &query("a.allowed.test.", RecordType::AAAA, None),
        ) else {
            panic!("expected Forward");
        };
        let sent = Message::from_vec(&p.upstream_query).unwrap();
        assert_eq!(sent.metadata.id, 0, "the forwarder picks the ID");
        assert!(sent.metadata.recursion_desired);
        assert_eq!(sent.queries[0].query_type(), RecordType::AAAA);
        assert_eq!(sent.edns.unwrap().max_payload(), 1232);
    }

    #[test]
    fn additional_section_is_dropped_before_truncating() {
        let core = core();
        let now = Instant::now();
        let Step::Forward(p) =
            core.handle_query_bytes(ctx(Transport::Udp, now), &query("a.allowed.test.", RecordType::A, None))
        else {
            panic!("expected Forward");
        };
        // 2 answers fit in 512 bytes; 40 additional records do not.
        let answer = upstream_answer(
            &p,
            a_records("a.allowed.test.", 2),
            a_records("extra.allowed.test.", 40),
        );
        let reply = core.complete(*p, Ok(answer), now + Duration::from_millis(3));
        assert!(reply.bytes.len() <= 512);
        let m = Message::from_vec(&reply.bytes).unwrap();
        assert!(!m.metadata.truncation);
        assert_eq!(m.answers.len(), 2);
        assert!(m.additionals.is_empty());
        assert_eq!(m.metadata.id, 0x4242);
        assert_eq!(reply.audit.latency_us, 3_000);
        assert_eq!(reply.audit.time_unix_ms, 1_700_000_000_000);
    }

    #[test]
    fn forward_failure_becomes_servfail() {
        let core = core();
        let now = Instant::now();
        let Step::Forward(p) = core.handle_query_bytes(
            ctx(Transport::Tcp, now),
            &query("a.allowed.test.", RecordType::A, Some(4096)),
        ) else {
            panic!("expected Forward");
        };
        let reply = core.complete(*p, Err(ForwardError::Deadline), now);
        let m = Message::from_vec(&reply.bytes).unwrap();
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
        assert!(m.edns.is_some());
        assert_eq!(core.stats().snapshot().servfail, 1);
    }

    #[test]
    fn cached_answer_ttls_count_down_with_passed_in_time() {
        let core = core();
        let t0 = Instant::now();
        let q = query("a.allowed.test.", RecordType::A, Some(1232));
        let Step::Forward(p) = core.handle_query_bytes(ctx(Transport::Udp, t0), &q) else {
            panic!("expected Forward")
        };
        let answer = upstream_answer(&p, a_records("a.allowed.test.", 1), vec![]);
        core.complete(*p, Ok(answer), t0);
        let Step::Reply(hit) = core.handle_query_bytes(ctx(Transport::Udp, t0 + Duration::from_secs(100)), &q) else {
            panic!("expected a cache hit");
        };
        assert!(hit.audit.cache_hit);
        assert_eq!(Message::from_vec(&hit.bytes).unwrap().answers[0].ttl, 200);
        assert!(matches!(
            core.handle_query_bytes(ctx(Transport::Udp, t0 + Duration::from_secs(300)), &q),
            Step::Forward(_)
        ));
        // The binding outlives the cache entry only by the floor/grace rules.
        let src: IpAddr = "10.1.2.3".parse().unwrap();
        let dst = IpAddr::V4(Ipv4Addr::new(198, 18, 2, 0));
        assert!(core.bindings().is_bound(
            src,
            dst,
            &DomainName::parse("a.allowed.test").unwrap(),
            t0 + Duration::from_secs(329)
        ));
        assert!(!core.bindings().is_bound(
            src,
            dst,
            &DomainName::parse("a.allowed.test").unwrap(),
            t0 + Duration::from_secs(331)
        ));
    }

    /// Runs bytes through the engine the way the server does; must not panic,
    /// and any reply must be a parsable response echoing the ID.
    fn exercise(core: &DnsCore, bytes: &[u8]) {
        let now = Instant::now();
        for transport in [Transport::Udp, Transport::Tcp] {
            let reply = match core.handle_query_bytes(ctx(transport, now), bytes) {
                Step::Drop => continue,
                Step::Reply(reply) => reply,
                Step::Forward(p) => core.complete(*p, Err(ForwardError::Deadline), now),
            };
            let m = Message::from_vec(&reply.bytes).unwrap();
            assert_eq!(m.metadata.message_type, MessageType::Response);
            assert_eq!(m.metadata.id.to_be_bytes(), bytes[..2]);
            if transport == Transport::Udp {
                assert!(reply.bytes.len() <= 1232);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            exercise(&core(), &bytes);
        }

        #[test]
        fn mutated_valid_queries_never_panic(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            edns in proptest::option::of(512u16..4096),
        ) {
            let mut bytes = query("www.allowed.test.", RecordType::HTTPS, edns);
            for (i, b) in flips {
                let i = i.index(bytes.len());
                bytes[i] = b;
            }
            exercise(&core(), &bytes);
        }
    }

    #[test]
    fn src_is_reported_in_audit() {
        let core = core();
        let Step::Reply(r) = core.handle_query_bytes(
            ctx(Transport::Udp, Instant::now()),
            &query("x.denied.test.", RecordType::A, None),
        ) else {
            panic!("expected a denial");
        };
        assert_eq!(r.audit.source, "10.1.2.3:5353".parse::<SocketAddr>().unwrap());
        assert_eq!(r.audit.rcode, 3);
        let json = serde_json::to_value(&r.audit).unwrap();
        assert_eq!(json["transport"], "udp");
        assert_eq!(json["reason"], "default-deny");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 1_000, ..ProptestConfig::default() })]

        /// Whatever an upstream sends that passes the forwarder's checks, the
        /// engine turns into a parsable answer for the client.
        #[test]
        fn arbitrary_upstream_answers_never_panic(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
            strip_ech in any::<bool>(),
        ) {
            let config = DnsConfig {
                upstreams: vec![Upstream::udp(UPSTREAM.parse().unwrap())],
                strip_ech,
                ..DnsConfig::default()
            };
            let core = DnsCore::with_new_bindings(config, Arc::new(AllowTest)).unwrap();
            let now = Instant::now();
            let Step::Forward(p) = core.handle_query_bytes(ctx(Transport::Udp, now), &query("a.allowed.test.", RecordType::A, Some(1232))) else {
                panic!("expected Forward");
            };
            let mut bytes = upstream_answer(&p, a_records("a.allowed.test.", 3), a_records("b.allowed.test.", 2)).message.to_vec().unwrap();
            for (i, b) in flips {
                let i = i.index(bytes.len());
                bytes[i] = b;
            }
            let id = u16::from_be_bytes([bytes[0], bytes[1]]);
            let outcome = sluice::dns::forward::check_answer(UPSTREAM.parse().unwrap(), &bytes, id, &p.question)
                .map(|message| UpstreamAnswer {
                    message,
                    upstream: UPSTREAM.parse().unwrap(),
                    wire: bytes.clone(),
                });
            let reply = core.complete(*p, outcome, now);
            let m = Message::from_vec(&reply.bytes).unwrap();
            prop_assert_eq!(m.metadata.id, 0x4242);
            prop_assert!(reply.bytes.len() <= 1232);
        }
    }

    // ---------------------------------------------------------------- cached fast path

    /// Allows `*.allowed.test` except from 10.9.9.9.
    struct AllowButOneSource;

    impl QueryPolicy for AllowButOneSource {
        fn decide(&self, src: IpAddr, qname: &DomainName, qtype: u16) -> QueryVerdict {
            let mut v = AllowTest.decide(src, qname, qtype);
            if src == IpAddr::V4(Ipv4Addr::new(10, 9, 9, 9)) {
                v = QueryVerdict::labelled("no-ten-nine", false, ReasonCode::DeniedByRule, Enforcement::Enforced);
            }
            v
        }
    }

    fn core_with(fast: bool) -> DnsCore {
        let config = DnsConfig {
            upstreams: vec![Upstream::udp(UPSTREAM.parse().unwrap())],
            wire_fast_path: fast,
            ..DnsConfig::default()
        };
        DnsCore::with_new_bindings(config, Arc::new(AllowButOneSource)).unwrap()
    }

    struct Ask2 {
        id: u16,
        rd: bool,
        cd: bool,
        ad: bool,
        edns: Option<(u16, bool)>,
    }

    fn query2(qname: &str, qtype: RecordType, a: &Ask2) -> Vec<u8> {
        let mut m = Message::new(a.id, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = a.rd;
        m.metadata.checking_disabled = a.cd;
        m.metadata.authentic_data = a.ad;
        m.add_query(Query::query(Name::from_ascii(qname).unwrap(), qtype));
        if let Some((payload, dnssec_ok)) = a.edns {
            let mut e = Edns::new();
            e.set_max_payload(payload);
            e.set_dnssec_ok(dnssec_ok);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    fn soa_record() -> Record {
        let n = Name::from_ascii("allowed.test.").unwrap();
        Record::from_rdata(
            n.clone(),
            600,
            RData::SOA(hickory_proto::rr::rdata::SOA::new(
                Name::from_ascii("ns.allowed.test.").unwrap(),
                Name::from_ascii("hostmaster.allowed.test.").unwrap(),
                1,
                3600,
                600,
                86400,
                300,
            )),
        )
    }

    /// Sends `q` through `core` at `t0` and completes it with an upstream
    /// answer carrying these sections (AD set).
    fn prime(core: &DnsCore, q: &[u8], rcode: ResponseCode, sections: [Vec<Record>; 3], t0: Instant) {
        let Step::Forward(p) = core.handle_query_bytes(ctx(Transport::Udp, t0), q) else {
            panic!("expected Forward");
        };
        let sent = Message::from_vec(&p.upstream_query).unwrap();
        let mut m = Message::response(sent.metadata.id, OpCode::Query);
        m.metadata.response_code = rcode;
        m.metadata.authentic_data = true;
        m.add_query(p.question.clone());
        let [answers, authorities, additionals] = sections;
        m.answers = answers;
        m.authorities = authorities;
        m.additionals = additionals;
        let answer = UpstreamAnswer {
            wire: m.to_vec().unwrap(),
            message: m,
            upstream: UPSTREAM.parse().unwrap(),
        };
        core.complete(*p, Ok(answer), t0);
    }

    fn cname_chain() -> [Vec<Record>; 3] {
        let name = |s: &str| Name::from_ascii(s).unwrap();
        [
            vec![
                Record::from_rdata(
                    name("www.allowed.test."),
                    120,
                    RData::CNAME(hickory_proto::rr::rdata::CNAME(name("edge.cdn.test."))),
                ),
                Record::from_rdata(name("edge.cdn.test."), 60, RData::A(A(Ipv4Addr::new(192, 0, 2, 7)))),
                Record::from_rdata(name("edge.cdn.test."), 90, RData::A(A(Ipv4Addr::new(192, 0, 2, 8)))),
            ],
            vec![soa_record()],
            vec![Record::from_rdata(
                name("ns.allowed.test."),
                300,
                RData::A(A(Ipv4Addr::new(192, 0, 2, 53))),
            )],
        ]
    }

    fn reply_of(step: Step) -> sluice::dns::Reply {
        match step {
            Step::Reply(r) => r,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn fast_path_answers_byte_for_byte_as_the_general_path() {
        let fast = core_with(true);
        let slow = core_with(false);
        let t0 = Instant::now();
        let asks = [
            Ask2 {
                id: 1,
                rd: true,
                cd: false,
                ad: false,
                edns: None,
            },
            Ask2 {
                id: 0xffff,
                rd: false,
                cd: false,
                ad: true,
                edns: None,
            },
            Ask2 {
                id: 77,
                rd: true,
                cd: false,
                ad: false,
                edns: Some((4096, false)),
            },
            Ask2 {
                id: 78,
                rd: true,
                cd: false,
                ad: true,
                edns: Some((100, false)),
            },
            Ask2 {
                id: 79,
                rd: true,
                cd: false,
                ad: false,
                edns: Some((1232, true)),
            },
            Ask2 {
                id: 80,
                rd: true,
                cd: true,
                ad: false,
                edns: Some((1232, true)),
            },
        ];
        for core in [&fast, &slow] {
            for ask in &asks {
                // The first of each cache key misses and is primed; RD=1 so
                // the answer is stored.
                let q = query2("www.allowed.test.", RecordType::A, &Ask2 { rd: true, ..*ask });
                if let Step::Forward(_) = core.handle_query_bytes(ctx(Transport::Udp, t0), &q) {
                    prime(core, &q, ResponseCode::NoError, cname_chain(), t0);
                }
                let q = query2("nx.allowed.test.", RecordType::AAAA, &Ask2 { rd: true, ..*ask });
                if let Step::Forward(_) = core.handle_query_bytes(ctx(Transport::Udp, t0), &q) {
                    prime(
                        core,
                        &q,
                        ResponseCode::NXDomain,
                        [vec![], vec![soa_record()], vec![]],
                        t0,
                    );
                }
            }
        }
        let before = fast.stats().snapshot().cache_fast_hits;
        let mut compared = 0;
        // Fast-path answers are rendered into recycled buffers: start the
        // pool with a dirty one, and hand every answer back after comparing.
        sluice::dns::fast::recycle(vec![0xAA; 300]);
        for age in [0, 7, 59] {
            let now = t0 + Duration::from_secs(age);
            for transport in [Transport::Udp, Transport::Tcp] {
                for ask in &asks {
                    for (name, qtype) in [
                        ("www.allowed.test.", RecordType::A),
                        ("nx.allowed.test.", RecordType::AAAA),
                    ] {
                        let q = query2(name, qtype, ask);
                        let a = reply_of(fast.handle_query_bytes(ctx(transport, now), &q));
                        let b = reply_of(slow.handle_query_bytes(ctx(transport, now), &q));
                        assert_eq!(a.bytes, b.bytes, "{name} age {age} {transport:?} id {}", ask.id);
                        assert_eq!(a.audit, b.audit);
                        sluice::dns::fast::recycle(a.bytes);
                        compared += 1;
                    }
                }
            }
        }
        let fast_hits = fast.stats().snapshot().cache_fast_hits - before;
        // Every comparison but the too-small-payload UDP ones (which need
        // truncating, and so go the general way) took the fast path.
        assert!(fast_hits >= compared / 2, "{fast_hits} of {compared}");
        assert_eq!(slow.stats().snapshot().cache_fast_hits, 0);
        let (f, s) = (fast.stats().snapshot(), slow.stats().snapshot());
        assert_eq!(
            (f.queries, f.allowed, f.cache_hits),
            (s.queries, s.allowed, s.cache_hits)
        );
    }

    #[test]
    fn fast_path_keeps_the_client_case_patches_id_and_ttl_and_honours_do() {
        let core = core_with(true);
        let t0 = Instant::now();
        let plain = Ask2 {
            id: 1,
            rd: true,
            cd: false,
            ad: false,
            edns: Some((1232, false)),
        };
        let q = query2("www.allowed.test.", RecordType::A, &plain);
        prime(&core, &q, ResponseCode::NoError, cname_chain(), t0);
        let mixed = query2("WwW.ALLowed.tEST.", RecordType::A, &Ask2 { id: 0x1234, ..plain });
        let hit = reply_of(core.handle_query_bytes(ctx(Transport::Udp, t0 + Duration::from_secs(20)), &mixed));
        assert_eq!(core.stats().snapshot().cache_fast_hits, 1);
        assert!(hit.audit.cache_hit);
        assert_eq!(&*hit.audit.qname, "www.allowed.test");
        // Header and question exactly as the client sent them (bar QR/RA).
        assert_eq!(&hit.bytes[..2], &[0x12, 0x34]);
        let qname_wire = &mixed[12..12 + 19];
        assert_eq!(&hit.bytes[12..12 + 19], qname_wire);
        let m = Message::from_vec(&hit.bytes).unwrap();
        assert_eq!(m.metadata.id, 0x1234);
        assert_eq!(m.queries[0].name().to_ascii(), "WwW.ALLowed.tEST.");
        let ttls: Vec<u32> = m.answers.iter().map(|r| r.ttl).collect();
        assert_eq!(ttls, vec![100, 40, 70]);
        assert_eq!(m.authorities[0].ttl, 580);
        assert!(!m.edns.as_ref().unwrap().flags().dnssec_ok);
        assert!(!m.metadata.authentic_data, "AD only if the client asked for it");

        // DO=1 is its own entry; its answer says DO=1.
        let with_do = query2(
            "www.allowed.test.",
            RecordType::A,
            &Ask2 {
                edns: Some((1232, true)),
                ..plain
            },
        );
        assert!(matches!(
            core.handle_query_bytes(ctx(Transport::Udp, t0), &with_do),
            Step::Forward(_)
        ));
        prime(&core, &with_do, ResponseCode::NoError, cname_chain(), t0);
        let hit = reply_of(core.handle_query_bytes(ctx(Transport::Udp, t0), &with_do));
        let m = Message::from_vec(&hit.bytes).unwrap();
        assert!(m.edns.as_ref().unwrap().flags().dnssec_ok);
        assert!(m.metadata.authentic_data);
        assert_eq!(core.stats().snapshot().cache_fast_hits, 2);
    }

    #[test]
    fn fast_path_records_bindings_and_still_asks_the_policy() {
        let core = core_with(true);
        let t0 = Instant::now();
        let ask = Ask2 {
            id: 5,
            rd: true,
            cd: false,
            ad: false,
            edns: None,
        };
        let q = query2("www.allowed.test.", RecordType::A, &ask);
        prime(&core, &q, ResponseCode::NoError, cname_chain(), t0);
        let other: SocketAddr = "10.4.4.4:999".parse().unwrap();
        let mut c = ctx(Transport::Udp, t0 + Duration::from_secs(1));
        c.src = other;
        let hit = reply_of(core.handle_query_bytes(c, &q));
        assert!(hit.audit.cache_hit);
        assert_eq!(hit.audit.source, other);
        let name = DomainName::parse("www.allowed.test").unwrap();
        for last in [7, 8] {
            assert!(
                core.bindings()
                    .is_bound(other.ip(), IpAddr::V4(Ipv4Addr::new(192, 0, 2, last)), &name, t0)
            );
        }
        // The NS glue in the additional section is not bound to the name.
        assert!(
            !core
                .bindings()
                .is_bound(other.ip(), IpAddr::V4(Ipv4Addr::new(192, 0, 2, 53)), &name, t0)
        );
        // A source the policy denies gets NXDOMAIN from the same cache entry's name.
        c.src = "10.9.9.9:53".parse().unwrap();
        let denied = reply_of(core.handle_query_bytes(c, &q));
        assert_eq!(
            Message::from_vec(&denied.bytes).unwrap().metadata.response_code,
            ResponseCode::NXDomain
        );
        assert_eq!(&*denied.audit.rule, "no-ten-nine");
        assert!(!denied.audit.cache_hit);
        let stats = core.stats().snapshot();
        assert_eq!((stats.queries, stats.denied, stats.cache_fast_hits), (3, 1, 1));
    }

    /// Sends `q` through `core` and completes it with an upstream answer
    /// (AA and AD set, EDNS with DO when `upstream_do`); returns the reply.
    fn answer_via(
        core: &DnsCore,
        q: &[u8],
        transport: Transport,
        rcode: ResponseCode,
        sections: [Vec<Record>; 3],
        upstream_do: Option<bool>,
    ) -> sluice::dns::Reply {
        let now = Instant::now();
        let Step::Forward(p) = core.handle_query_bytes(ctx(transport, now), q) else {
            panic!("expected Forward");
        };
        let sent = Message::from_vec(&p.upstream_query).unwrap();
        let mut m = Message::response(0x7777, OpCode::Query);
        m.metadata.response_code = rcode;
        m.metadata.authoritative = true;
        m.metadata.authentic_data = true;
        m.metadata.recursion_desired = sent.metadata.recursion_desired;
        m.add_query(p.question.clone());
        let [answers, authorities, additionals] = sections;
        m.answers = answers;
        m.authorities = authorities;
        m.additionals = additionals;
        if let Some(dnssec_ok) = upstream_do {
            let mut e = Edns::new();
            e.set_max_payload(4096);
            e.set_dnssec_ok(dnssec_ok);
            m.set_edns(e);
        }
        let answer = UpstreamAnswer {
            wire: m.to_vec().unwrap(),
            message: m,
            upstream: UPSTREAM.parse().unwrap(),
        };
        core.complete(*p, Ok(answer), now)
    }

    #[test]
    fn upstream_answers_passed_on_patched_mean_what_the_general_path_says() {
        let fast = core_with(true);
        let slow = core_with(false);
        let asks = [
            Ask2 {
                id: 1,
                rd: true,
                cd: false,
                ad: false,
                edns: None,
            },
            Ask2 {
                id: 2,
                rd: false,
                cd: true,
                ad: true,
                edns: None,
            },
            Ask2 {
                id: 3,
                rd: true,
                cd: false,
                ad: true,
                edns: Some((1232, false)),
            },
            Ask2 {
                id: 4,
                rd: true,
                cd: true,
                ad: false,
                edns: Some((4096, true)),
            },
        ];
        let mut n = 0u16;
        for ask in &asks {
            for transport in [Transport::Udp, Transport::Tcp] {
                for upstream_do in [None, Some(false), Some(true)] {
                    for nx in [false, true] {
                        // A fresh name each time: no cache hit in between.
                        n += 1;
                        let name = format!("p{n}.allowed.test.");
                        let (rcode, sections) = if nx {
                            (ResponseCode::NXDomain, [vec![], vec![soa_record()], vec![]])
                        } else {
                            let [mut answers, authorities, additionals] = cname_chain();
                            answers[0] =
                                Record::from_rdata(Name::from_ascii(&name).unwrap(), 120, answers[0].data.clone());
                            (ResponseCode::NoError, [answers, authorities, additionals])
                        };
                        let q = query2(&name, RecordType::A, ask);
                        let a = answer_via(&fast, &q, transport, rcode, sections.clone(), upstream_do);
                        let b = answer_via(&slow, &q, transport, rcode, sections, upstream_do);
                        let (ma, mb) = (
                            Message::from_vec(&a.bytes).unwrap(),
                            Message::from_vec(&b.bytes).unwrap(),
                        );
                        assert_eq!(ma, mb, "{name} {transport:?} upstream DO {upstream_do:?}");
                        assert_eq!(ma.metadata.id, ask.id);
                        assert_eq!(a.audit, b.audit);
                    }
                }
            }
        }
        let passed = fast.stats().snapshot().upstream_passthrough;
        assert_eq!(passed, u64::from(n), "every one of these is plain");
        assert_eq!(slow.stats().snapshot().upstream_passthrough, 0);
        // Bindings are recorded either way.
        let src: IpAddr = "10.1.2.3".parse().unwrap();
        let name = DomainName::parse("p1.allowed.test").unwrap();
        for core in [&fast, &slow] {
            assert!(
                core.bindings()
                    .is_bound(src, IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), &name, Instant::now())
            );
        }
    }

    #[test]
    fn oversized_upstream_answers_still_go_the_general_way() {
        let fast = core_with(true);
        let ask = Ask2 {
            id: 9,
            rd: true,
            cd: false,
            ad: false,
            edns: None,
        };
        let q = query2("big.allowed.test.", RecordType::A, &ask);
        let reply = answer_via(
            &fast,
            &q,
            Transport::Udp,
            ResponseCode::NoError,
            [
                a_records("big.allowed.test.", 2),
                vec![],
                a_records("extra.allowed.test.", 40),
            ],
            Some(false),
        );
        assert!(reply.bytes.len() <= 512);
        let m = Message::from_vec(&reply.bytes).unwrap();
        assert_eq!(m.answers.len(), 2);
        assert!(m.additionals.is_empty());
        assert_eq!(fast.stats().snapshot().upstream_passthrough, 0);
    }

    /// A policy whose `delegated.test` denial is rule 0's, handed to the
    /// filter `test.dns-filter`; `*.allowed.test` allowed; the rest denied
    /// by the default.
    struct Delegating;

    impl QueryPolicy for Delegating {
        fn decide(&self, src: IpAddr, qname: &DomainName, qtype: u16) -> QueryVerdict {
            let mut v = AllowTest.decide(src, qname, qtype);
            if qname.as_str() == "delegated.test" {
                v = QueryVerdict::labelled("deny-delegated", false, ReasonCode::DeniedByRule, Enforcement::Enforced);
                v.source = Some(sluice::policy::DecidedBy::Rule(0));
            } else if !v.allow {
                v.source = Some(sluice::policy::DecidedBy::Default);
            }
            v
        }

        fn delegates(&self, verdict: &QueryVerdict, filter: &str) -> bool {
            verdict.source == Some(sluice::policy::DecidedBy::Rule(0)) && filter == "test.dns-filter"
        }
    }

    /// Denies `blocked.allowed.test`, and allows everything it is shown.
    #[derive(Debug)]
    struct TestFilter;

    impl sluice::dns::QueryFilter for TestFilter {
        fn name(&self) -> &str {
            "test.dns-filter"
        }

        fn on_query(&self, q: &sluice::dns::QueryInfo<'_>, _verdict: &QueryVerdict) -> sluice::dns::QueryStatus {
            if q.qname.as_str() == "blocked.allowed.test" {
                sluice::dns::QueryStatus::Deny(QueryVerdict::labelled(
                    "test.dns-filter",
                    false,
                    ReasonCode::DeniedByRule,
                    Enforcement::Enforced,
                ))
            } else {
                sluice::dns::QueryStatus::Allow(QueryVerdict::labelled(
                    "test.dns-filter",
                    true,
                    ReasonCode::AllowedByRule,
                    Enforcement::Enforced,
                ))
            }
        }
    }

    /// The DNS sibling of the flow chain follows the same override rules: a
    /// filter tightens any verdict, and loosens only a denial whose rule
    /// delegates to it, never the default's.
    #[test]
    fn query_filters_follow_the_override_rules() {
        let config = DnsConfig {
            upstreams: vec![Upstream::udp(UPSTREAM.parse().unwrap())],
            ..DnsConfig::default()
        };
        let mut core = DnsCore::with_new_bindings(config, Arc::new(Delegating)).unwrap();
        core.add_filter(Box::new(TestFilter));
        let ask = |name: &str| {
            let now = Instant::now();
            let reply = match core.handle_query_bytes(ctx(Transport::Udp, now), &query(name, RecordType::A, None)) {
                Step::Forward(p) => {
                    let answer = upstream_answer(&p, a_records(name, 1), Vec::new());
                    core.complete(*p, Ok(answer), now)
                }
                Step::Reply(r) => r,
                s => panic!("{name}: {s:?}"),
            };
            (reply.audit.allowed, reply.audit.rule.to_string(), reply.audit.reason)
        };
        // Tightened: the policy allowed it, the filter's denial stands.
        assert_eq!(
            ask("blocked.allowed.test."),
            (false, "test.dns-filter".to_owned(), "denied-by-rule")
        );
        // Loosened: the rule hands its denial to this filter by name.
        assert_eq!(
            ask("delegated.test."),
            (true, "test.dns-filter".to_owned(), "allowed-by-rule")
        );
        // Not loosened: the default's denial is final.
        assert_eq!(ask("other.test."), (false, "default".to_owned(), "default-deny"));
        // An allowed query the filter only allows again is the policy's.
        assert_eq!(
            ask("www.allowed.test."),
            (true, "allow-test".to_owned(), "allowed-by-rule")
        );
    }

    /// `Delegating`, in watch mode.
    struct Watching;

    impl QueryPolicy for Watching {
        fn decide(&self, src: IpAddr, qname: &DomainName, qtype: u16) -> QueryVerdict {
            Delegating.decide(src, qname, qtype)
        }

        fn mode(&self) -> sluice_api::Mode {
            sluice_api::Mode::Watch
        }
    }

    /// Watch mode reaches a query filter's denial too: answered, and
    /// recorded as a watched denial.
    #[test]
    fn in_watch_mode_a_query_filter_denial_is_only_recorded() {
        let config = DnsConfig {
            upstreams: vec![Upstream::udp(UPSTREAM.parse().unwrap())],
            ..DnsConfig::default()
        };
        let mut core = DnsCore::with_new_bindings(config, Arc::new(Watching)).unwrap();
        core.add_filter(Box::new(TestFilter));
        let now = Instant::now();
        let Step::Forward(p) = core.handle_query_bytes(
            ctx(Transport::Udp, now),
            &query("blocked.allowed.test.", RecordType::A, None),
        ) else {
            panic!("a watched denial is forwarded like an allowed query");
        };
        let answer = upstream_answer(&p, a_records("blocked.allowed.test.", 1), Vec::new());
        let reply = core.complete(*p, Ok(answer), now);
        let a = &reply.audit;
        assert_eq!(
            (a.allowed, a.enforced, a.watched, &*a.rule),
            (false, false, true, "test.dns-filter")
        );
        assert_eq!(Message::from_vec(&reply.bytes).unwrap().answers.len(), 1);
    }
}
