//! Policy engine at scale: WebGroups totalling 1,000,000 generated patterns
//! and SmartGroups totalling 100,000 CIDRs, 200 rules.
//!
//! Prints compile time, resident memory and per-decision p50/p99/p99.9
//! (each decision timed on its own, timer overhead subtracted), then runs
//! criterion on the same snapshot. Targets (DESIGN.md): p99 ≤ 1 µs,
//! compile ≤ 3 s, ≤ 300 MB.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout, reason = "benchmark")]

use std::hint::black_box;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use criterion::Criterion;
use ipnet::IpNet;
use sluice::policy::{FlowQuery, Policy};
use sluice_api::config::load_str;
use sluice_api::{
    Action, Config, Destination, DomainName, DomainPattern, Mode, PortRange, Protocol, Rule, SmartGroup, WebGroup,
};

const PATTERNS: usize = 1_000_000;
const WEBGROUPS: usize = 1_000;
const CIDRS: usize = 100_000;
const SMARTGROUPS: usize = 100;
const RULES: usize = 200;

/// xorshift: deterministic, dependency-free.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn label(&mut self) -> String {
        let len = 3 + self.below(10) as usize;
        (0..len).map(|_| (b'a' + self.below(26) as u8) as char).collect()
    }
}

const TLDS: &[&str] = &["com", "net", "org", "io", "ai", "dev", "co.uk", "cloud"];

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn generate(rng: &mut Rng) -> (Config, Vec<String>) {
    let mut cfg = load_str("policy: {mode: enforce}\n", "bench.yaml").unwrap();
    let mut sample_names = Vec::new();
    for g in 0..WEBGROUPS {
        let mut patterns = Vec::with_capacity(PATTERNS / WEBGROUPS);
        for _ in 0..PATTERNS / WEBGROUPS {
            let base = format!("{}.{}", rng.label(), TLDS[rng.below(TLDS.len() as u64) as usize]);
            let p = if rng.below(10) < 6 {
                let n = if rng.below(2) == 0 {
                    format!("{}.{base}", rng.label())
                } else {
                    base.clone()
                };
                DomainPattern::Exact(DomainName::parse(&n).unwrap())
            } else {
                DomainPattern::Subdomains(DomainName::parse(&base).unwrap())
            };
            if rng.below(100) == 0 {
                sample_names.push(match &p {
                    DomainPattern::Exact(n) => n.to_string(),
                    DomainPattern::Subdomains(n) => format!("{}.{n}", rng.label()),
                    DomainPattern::Any => String::from("any.example"),
                });
            }
            patterns.push(p);
        }
        cfg.webgroups.push(WebGroup {
            name: format!("web{g}"),
            description: None,
            patterns,
            includes: vec![],
            builtin: false,
            at: Default::default(),
        });
    }
    for g in 0..SMARTGROUPS {
        let cidrs = (0..CIDRS / SMARTGROUPS)
            .map(|_| {
                if rng.below(10) == 0 {
                    let a = (0x2001_0db8u128 << 96) | (u128::from(rng.next()) << 32);
                    IpNet::new(IpAddr::from(std::net::Ipv6Addr::from(a)), 48 + rng.below(81) as u8)
                        .unwrap()
                        .trunc()
                } else {
                    let a = (rng.next() as u32 & 0x00ff_ffff) | 0x0a00_0000;
                    IpNet::new(IpAddr::from(a.to_be_bytes()), 16 + rng.below(17) as u8)
                        .unwrap()
                        .trunc()
                }
            })
            .collect();
        cfg.smartgroups.push(SmartGroup {
            name: format!("smart{g}"),
            description: None,
            cidrs,
            selectors: vec![],
            workloads: vec![],
            includes: vec![],
            builtin: false,
            at: Default::default(),
        });
    }
    cfg.policy.mode = Mode::Enforce;
    cfg.policy.rules = (0..RULES)
        .map(|i| Rule {
            name: format!("rule{i}"),
            from: (0..3)
                .map(|_| format!("smart{}", rng.below(SMARTGROUPS as u64)))
                .collect(),
            to: Destination {
                webgroups: (0..5).map(|_| format!("web{}", rng.below(WEBGROUPS as u64))).collect(),
                smartgroups: vec![],
            },
            protocols: vec![Protocol::Tls, Protocol::Http],
            ports: vec![PortRange { lo: 443, hi: 443 }, PortRange { lo: 8000, hi: 8100 }],
            action: if i % 7 == 0 { Action::Deny } else { Action::Allow },
            watch: false,
            delegate: Vec::new(),
            at: Default::default(),
        })
        .collect();
    (cfg, sample_names)
}

struct Flow {
    src: IpAddr,
    name: DomainName,
    dst: IpAddr,
}

fn flows(rng: &mut Rng, names: &[String]) -> Vec<Flow> {
    (0..20_000)
        .map(|_| {
            let name = if rng.below(2) == 0 {
                names[rng.below(names.len() as u64) as usize].clone()
            } else {
                format!(
                    "{}.{}.{}",
                    rng.label(),
                    rng.label(),
                    TLDS[rng.below(TLDS.len() as u64) as usize]
                )
            };
            Flow {
                src: IpAddr::from(((rng.next() as u32 & 0x00ff_ffff) | 0x0a00_0000).to_be_bytes()),
                name: DomainName::parse(&name).unwrap(),
                dst: IpAddr::from((rng.next() as u32).to_be_bytes()),
            }
        })
        .collect()
}

fn query(f: &Flow) -> FlowQuery<'_> {
    FlowQuery {
        identity: None,
        src: f.src,
        name: Some(&f.name),
        dst: Some(f.dst),
        protocol: Protocol::Tls,
        port: 443,
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let mut rng = Rng(0x5eed_1234_5678_9abc);
    let rss0 = rss_kib();
    let t = Instant::now();
    let (cfg, names) = generate(&mut rng);
    let gen_time = t.elapsed();
    let rss_cfg = rss_kib();

    let t = Instant::now();
    let policy = Policy::compile(&cfg);
    let compile = t.elapsed();
    let rss_policy = rss_kib();
    let heap = policy.heap_bytes();
    drop(cfg);
    let rss_after_drop = rss_kib();

    let flows = flows(&mut rng, &names);

    // Timer overhead: back-to-back Instant::now() pairs.
    let mut overhead: Vec<u64> = (0..100_000)
        .map(|_| {
            let a = Instant::now();
            let b = Instant::now();
            (b - a).as_nanos() as u64
        })
        .collect();
    overhead.sort_unstable();
    let timer = percentile(&overhead, 0.5);

    let measure = |make: &dyn Fn(&Flow) -> FlowQuery<'_>| {
        let mut lat = Vec::with_capacity(flows.len() * 10);
        for _ in 0..10 {
            for f in &flows {
                let q = make(f);
                let a = Instant::now();
                black_box(policy.decide(black_box(&q)));
                lat.push(((Instant::now() - a).as_nanos() as u64).saturating_sub(timer));
            }
        }
        lat.sort_unstable();
        lat
    };
    let lat = measure(&query);
    let addr_only = measure(&|f| FlowQuery { name: None, ..query(f) });
    let name_only = measure(&|f| FlowQuery {
        dst: None,
        src: "192.0.2.1".parse().unwrap(),
        ..query(f)
    });
    let allowed = flows
        .iter()
        .filter(|f| policy.decide(&query(f)).action == Action::Allow)
        .count();

    println!(
        "policy benchmark: {} patterns in {WEBGROUPS} webgroups, {} CIDRs in {SMARTGROUPS} smartgroups, {RULES} rules",
        policy.pattern_count(),
        policy.cidr_count()
    );
    println!(
        "  generate config:   {:>8.3} s (not part of compile)",
        gen_time.as_secs_f64()
    );
    println!("  compile:           {:>8.3} s", compile.as_secs_f64());
    println!(
        "  RSS: config {} MiB, policy {} MiB (both {} MiB); policy alone after dropping the config {} MiB; index heap {} MiB",
        (rss_cfg - rss0) / 1024,
        (rss_policy - rss_cfg) / 1024,
        (rss_policy - rss0) / 1024,
        rss_after_drop.saturating_sub(rss0) / 1024,
        heap / (1024 * 1024)
    );
    println!(
        "  decide (n={}, timer overhead {timer} ns subtracted): p50 {} ns, p99 {} ns, p99.9 {} ns, max {} ns; {}% allowed",
        lat.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        percentile(&lat, 0.999),
        lat[lat.len() - 1],
        allowed * 100 / flows.len()
    );

    for (what, l) in [
        ("addresses only (no name)", &addr_only),
        ("name only (fixed source, no address)", &name_only),
    ] {
        println!(
            "  decide, {what}: p50 {} ns, p99 {} ns, p99.9 {} ns",
            percentile(l, 0.5),
            percentile(l, 0.99),
            percentile(l, 0.999)
        );
    }
    println!("  interned group sets: {}", policy.set_count());

    let mut c = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let mut i = 0;
    c.bench_function("decide/1M-patterns-100k-cidrs", |b| {
        b.iter(|| {
            i = (i + 1) % flows.len();
            black_box(policy.decide(black_box(&query(&flows[i]))))
        })
    });
    c.final_summary();
}
