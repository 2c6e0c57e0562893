//! A rough throughput probe of the DNS listener, for developers: ignored by
//! default, asserts nothing about time, prints queries per second.
//! `cargo test --release -p sluice --test dns_throughput -- --ignored --nocapture`
//! The real comparison against dnsmasq and unbound is the dnsperf benchmark.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    reason = "test code: a panic is the failure report; the probe prints its figures"
)]

/// Everything lives in `mod dns` so `cargo test -p sluice dns` selects it.
mod dns {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData, Record, RecordType};
    use sluice::dns::{DnsConfig, DnsCore, DnsServer, QueryPolicy, QueryVerdict, Upstream};
    use sluice_api::DomainName;
    use tokio::net::UdpSocket;
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    struct AllowAll;

    impl QueryPolicy for AllowAll {
        fn decide(&self, _src: IpAddr, _qname: &DomainName, _qtype: u16) -> QueryVerdict {
            QueryVerdict {
                allowed: true,
                enforced: true,
                rule: "all".into(),
                reason: "allowed-by-rule",
            }
        }
    }

    /// Answers every A query with one address, TTL 300.
    async fn upstream() -> SocketAddr {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let (n, peer) = sock.recv_from(&mut buf).await.unwrap();
                let q = Message::from_vec(&buf[..n]).unwrap();
                let mut m = Message::response(q.metadata.id, OpCode::Query);
                m.metadata.recursion_available = true;
                m.add_query(q.queries[0].clone());
                m.add_answer(Record::from_rdata(
                    q.queries[0].name().clone(),
                    300,
                    RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
                ));
                let _ = sock.send_to(&m.to_vec().unwrap(), peer).await;
            }
        });
        addr
    }

    async fn load(server: SocketAddr, names: usize, window: usize, duration: Duration) -> (u64, u64) {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.connect(server).await.unwrap();
        let queries: Vec<Vec<u8>> = (0..names)
            .map(|i| {
                let mut m = Message::new(u16::try_from(i % 65536).unwrap(), MessageType::Query, OpCode::Query);
                m.metadata.recursion_desired = true;
                m.add_query(Query::query(
                    Name::from_ascii(format!("n{i}.bench.test.")).unwrap(),
                    RecordType::A,
                ));
                m.set_edns(Edns::new());
                m.to_vec().unwrap()
            })
            .collect();
        let mut buf = vec![0u8; 4096];
        let (mut sent, mut received) = (0u64, 0u64);
        let start = Instant::now();
        let mut next = 0usize;
        while start.elapsed() < duration {
            while sent - received < window as u64 {
                sock.send(&queries[next % queries.len()]).await.unwrap();
                next += 1;
                sent += 1;
            }
            match tokio::time::timeout(Duration::from_millis(200), sock.recv(&mut buf)).await {
                Ok(Ok(_)) => received += 1,
                // A lost datagram: forget it so the window keeps moving.
                _ => received = sent,
            }
        }
        (sent, received)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a developer's probe; run explicitly in release mode"]
    async fn udp_throughput_probe() {
        let up = upstream().await;
        let config = DnsConfig {
            upstreams: vec![Upstream::udp(up)],
            ..DnsConfig::default()
        };
        let core = Arc::new(DnsCore::with_new_bindings(config, Arc::new(AllowAll)).unwrap());
        let (tx, mut rx) = mpsc::channel(65_536);
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        let server = DnsServer::bind("127.0.0.1:0".parse().unwrap(), Arc::clone(&core), tx)
            .await
            .unwrap();
        let addr = server.local_addr();
        let token = CancellationToken::new();
        tokio::spawn(server.run(token.clone()));

        for (label, names) in [("cached (100 names)", 100), ("uncached (1M names)", 1_000_000)] {
            let started = Instant::now();
            let (sent, received) = load(addr, names, 64, Duration::from_secs(3)).await;
            let secs = started.elapsed().as_secs_f64();
            println!(
                "{label}: sent {sent}, answered {received}, {:.0} qps",
                received as f64 / secs
            );
        }
        println!("{:?}", core.stats().snapshot());
        token.cancel();
    }
}
