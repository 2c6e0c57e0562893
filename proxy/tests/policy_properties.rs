//! Property tests: the compiled policy (hash-table name index, interval
//! address index, bitset rules) must agree with a plain reference written
//! directly from the semantics in docs/configuration.md, on random
//! patterns, names, CIDRs, addresses and rules.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::type_complexity,
    reason = "test code"
)]

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use proptest::prelude::*;
use sluice::policy::{DecidedBy, FlowQuery, Policy};
use sluice_api::builtin;
use sluice_api::config::{load_str, selected_workloads};
use sluice_api::reason::ReasonCode;
use sluice_api::{
    Action, Config, Destination, DomainName, DomainPattern, Mode, PortRange, Protocol, Rule, SmartGroup, WebGroup,
};

const LABELS: &[&str] = &["a", "b", "c", "api", "xn--bcher-kva", "openai", "com", "io"];

fn label() -> impl Strategy<Value = String> {
    prop::sample::select(LABELS).prop_map(str::to_owned)
}

fn name() -> impl Strategy<Value = DomainName> {
    prop_oneof![
        8 => prop::collection::vec(label(), 1..5).prop_map(|l| DomainName::parse(&l.join(".")).unwrap()),
        1 => prop::sample::select(vec!["metadata.google.internal", "a.metadata.google.internal", "metadata"])
            .prop_map(|n| DomainName::parse(n).unwrap()),
    ]
}

fn pattern() -> impl Strategy<Value = DomainPattern> {
    prop_oneof![
        6 => name().prop_map(DomainPattern::Exact),
        6 => name().prop_map(DomainPattern::Subdomains),
        1 => Just(DomainPattern::Any),
    ]
}

fn v4net() -> impl Strategy<Value = IpNet> {
    (
        prop::sample::select(vec![
            [10u8, 0, 0, 0],
            [10, 1, 0, 0],
            [192, 168, 1, 0],
            [169, 254, 169, 254],
            [127, 0, 0, 1],
        ]),
        0u8..=32,
        any::<u32>(),
    )
        .prop_map(|(base, len, noise)| {
            let ip = u32::from_be_bytes(base) ^ (noise & 0x0000_ffff);
            IpNet::new(IpAddr::from(ip.to_be_bytes()), len).unwrap().trunc()
        })
}

fn v6net() -> impl Strategy<Value = IpNet> {
    (
        prop::sample::select(vec!["fd00::", "fd00:ec2::254", "2001:db8::", "::1", "fe80::1"]),
        0u8..=128,
        any::<u16>(),
    )
        .prop_map(|(base, len, noise)| {
            let ip: std::net::Ipv6Addr = base.parse().unwrap();
            let ip = u128::from(ip) ^ u128::from(noise);
            IpNet::new(IpAddr::from(std::net::Ipv6Addr::from(ip)), len)
                .unwrap()
                .trunc()
        })
}

const SPECIAL_IPS: &[&str] = &[
    "169.254.169.254",
    "::ffff:169.254.169.254",
    "169.254.1.1",
    "127.0.0.1",
    "::1",
    "fd00:ec2::254",
    "10.0.0.5",
    "10.1.0.1",
    "192.168.1.7",
    "100.100.100.200",
    "fe80::1",
    "8.8.8.8",
    "2001:db8::1",
];

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        prop::sample::select(SPECIAL_IPS).prop_map(|s| s.parse::<IpAddr>().unwrap()),
        v4net().prop_flat_map(host_in),
        v6net().prop_flat_map(host_in),
        v4net().prop_flat_map(host_in).prop_map(|ip| match ip {
            IpAddr::V4(a) => IpAddr::V6(a.to_ipv6_mapped()),
            other => other,
        }),
    ]
}

fn host_in(n: IpNet) -> impl Strategy<Value = IpAddr> {
    any::<u128>().prop_map(move |r| match n {
        IpNet::V4(n) => {
            let span = u64::from(u32::from(n.broadcast()) - u32::from(n.network())) + 1;
            IpAddr::from((u32::from(n.network()) + (r % u128::from(span)) as u32).to_be_bytes())
        }
        IpNet::V6(n) => {
            let span = u128::from(n.broadcast()) - u128::from(n.network());
            let off = if span == u128::MAX { r } else { r % (span + 1) };
            IpAddr::from(std::net::Ipv6Addr::from(u128::from(n.network()) + off))
        }
    })
}

fn base_config() -> Config {
    load_str("policy: {mode: enforce}\n", "prop.yaml").unwrap()
}

fn webgroup(i: usize, patterns: Vec<DomainPattern>, includes: Vec<String>) -> WebGroup {
    WebGroup {
        name: format!("w{i}"),
        description: None,
        patterns,
        includes,
        builtin: false,
        at: Default::default(),
    }
}

fn smartgroup(i: usize, cidrs: Vec<IpNet>, includes: Vec<String>) -> SmartGroup {
    SmartGroup {
        name: format!("s{i}"),
        description: None,
        cidrs,
        selectors: vec![],
        workloads: vec![],
        includes,
        builtin: false,
        at: Default::default(),
    }
}

// ---- the reference ------------------------------------------------------

fn closure_contains(groups: &dyn Fn(&str) -> Vec<String>, root: &str, target_match: &dyn Fn(&str) -> bool) -> bool {
    let mut seen = BTreeSet::new();
    let mut stack = vec![root.to_owned()];
    while let Some(g) = stack.pop() {
        if !seen.insert(g.clone()) {
            continue;
        }
        if target_match(&g) {
            return true;
        }
        stack.extend(groups(&g));
    }
    false
}

fn ref_in_webgroup(cfg: &Config, group: &str, n: &DomainName) -> bool {
    closure_contains(
        &|g| cfg.webgroup(g).map(|w| w.includes.clone()).unwrap_or_default(),
        group,
        &|g| cfg.webgroup(g).is_some_and(|w| w.patterns.iter().any(|p| p.matches(n))),
    )
}

fn ref_in_smartgroup(cfg: &Config, group: &str, ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    closure_contains(
        &|g| cfg.smartgroup(g).map(|s| s.includes.clone()).unwrap_or_default(),
        group,
        &|g| {
            cfg.smartgroup(g).is_some_and(|s| {
                s.cidrs.iter().any(|c| c.contains(&ip))
                    || selected_workloads(s, &cfg.inventory)
                        .iter()
                        .any(|w| w.ips.contains(&ip))
            })
        },
    )
}

/// (action, decided-by name, reason, watched)
///
/// The reference: the first matching rule (or the default) decides, then the
/// guard overrules it unless that rule is an allow naming every guarded
/// group the flow touches, or a deny at least as strict as the guard.
fn ref_decide(cfg: &Config, q: &FlowQuery<'_>, identity: Option<&str>) -> (Action, String, ReasonCode, bool) {
    let watch_all = cfg.policy.mode == Mode::Watch;
    // The guarded groups the flow touches: the most specific guarded
    // SmartGroup holding the address, and the metadata-names WebGroup.
    let mut touched: Vec<(&str, bool, ReasonCode)> = Vec::new();
    if let Some(dst) = q.dst {
        let mut guarded = vec![
            (builtin::CLOUD_METADATA, ReasonCode::GuardCloudMetadata),
            (builtin::GATEWAY, ReasonCode::GuardGateway),
            (builtin::LOOPBACK, ReasonCode::GuardLoopback),
            (builtin::LINK_LOCAL, ReasonCode::GuardLinkLocal),
        ];
        if cfg.policy.guard_private_ranges {
            guarded.push((builtin::PRIVATE_RANGES, ReasonCode::GuardPrivateRanges));
        }
        if let Some((g, reason)) = guarded.iter().find(|(g, _)| ref_in_smartgroup(cfg, g, dst)) {
            touched.push((g, true, *reason));
        }
    }
    if let Some(n) = q.name
        && ref_in_webgroup(cfg, builtin::CLOUD_METADATA_NAMES, n)
    {
        touched.push((builtin::CLOUD_METADATA_NAMES, false, ReasonCode::GuardMetadataName));
    }
    let guard = touched
        .first()
        .map(|(_, _, reason)| (Action::Deny, "builtin-guard".to_owned(), *reason, watch_all));
    let lifts = |r: &sluice_api::Rule| {
        r.action == Action::Allow
            && touched.iter().all(|(g, smart, _)| {
                if *smart {
                    r.to.smartgroups.iter().any(|x| x == g)
                } else {
                    r.to.webgroups.iter().any(|x| x == g)
                }
            })
    };
    for r in &cfg.policy.rules {
        let proto = r.protocols.is_empty()
            || r.protocols.contains(&q.protocol)
            || (r.protocols.contains(&Protocol::Tcp) && matches!(q.protocol, Protocol::Tls | Protocol::Http))
            || (r.protocols.contains(&Protocol::Udp) && q.protocol == Protocol::Quic);
        let implied = !proto
            && q.protocol == Protocol::Dns
            && r.action == Action::Allow
            && !r.to.webgroups.is_empty()
            && r.protocols.iter().any(|p| {
                matches!(
                    p,
                    Protocol::Tls | Protocol::Http | Protocol::Tcp | Protocol::Udp | Protocol::Quic
                )
            });
        if !proto && !implied {
            continue;
        }
        if q.protocol != Protocol::Dns && !r.ports.is_empty() && !r.ports.iter().any(|p| p.contains(q.port)) {
            continue;
        }
        // An authenticated identity is a member of its group and of every
        // group including it.
        let by_identity = |g: &str| {
            identity.is_some_and(|id| {
                closure_contains(
                    &|x| cfg.smartgroup(x).map(|s| s.includes.clone()).unwrap_or_default(),
                    g,
                    &|x| x == id,
                )
            })
        };
        let from = r.from.is_empty()
            || r.from
                .iter()
                .any(|g| ref_in_smartgroup(cfg, g, q.src) || by_identity(g));
        if !from {
            continue;
        }
        let by_name = q
            .name
            .is_some_and(|n| r.to.webgroups.iter().any(|g| ref_in_webgroup(cfg, g, n)));
        let to = if implied {
            by_name
        } else {
            r.to.is_any()
                || by_name
                || q.dst
                    .is_some_and(|ip| r.to.smartgroups.iter().any(|g| ref_in_smartgroup(cfg, g, ip)))
        };
        if to {
            let watched = watch_all || r.watch;
            if let Some(g) = &guard {
                let strict_deny = r.action == Action::Deny && watched == watch_all;
                if !lifts(r) && !strict_deny {
                    return g.clone();
                }
            }
            let reason = if r.action == Action::Allow {
                ReasonCode::AllowedByRule
            } else {
                ReasonCode::DeniedByRule
            };
            return (r.action, r.name.clone(), reason, watched);
        }
    }
    if let Some(g) = guard {
        return g;
    }
    let reason = if cfg.policy.default == Action::Allow {
        ReasonCode::DefaultAllow
    } else {
        ReasonCode::DefaultDeny
    };
    (cfg.policy.default, "default".into(), reason, watch_all)
}

// ---- properties ---------------------------------------------------------

fn groups_strategy() -> impl Strategy<
    Value = (
        Vec<Vec<DomainPattern>>,
        Vec<Vec<IpNet>>,
        Vec<(usize, usize)>,
        Vec<(usize, usize)>,
    ),
> {
    (
        prop::collection::vec(prop::collection::vec(pattern(), 0..12), 1..6),
        prop::collection::vec(prop::collection::vec(prop_oneof![v4net(), v6net()], 0..10), 1..6),
        prop::collection::vec((0usize..6, 0usize..6), 0..4),
        prop::collection::vec((0usize..6, 0usize..6), 0..4),
    )
}

fn build(
    web: Vec<Vec<DomainPattern>>,
    smart: Vec<Vec<IpNet>>,
    wi: Vec<(usize, usize)>,
    si: Vec<(usize, usize)>,
) -> Config {
    let mut cfg = base_config();
    let nw = web.len();
    let ns = smart.len();
    // Includes only point to earlier groups, so they cannot form a cycle
    // (the validator rejects cycles before the compiler sees them).
    let inc = |edges: &[(usize, usize)], i: usize, n: usize, prefix: &str| -> Vec<String> {
        edges
            .iter()
            .filter(|(a, b)| a % n == i && b % n < i)
            .map(|(_, b)| format!("{prefix}{}", b % n))
            .collect()
    };
    for (i, p) in web.into_iter().enumerate() {
        cfg.webgroups.push(webgroup(i, p, inc(&wi, i, nw, "w")));
    }
    for (i, c) in smart.into_iter().enumerate() {
        cfg.smartgroups.push(smartgroup(i, c, inc(&si, i, ns, "s")));
    }
    cfg
}

fn rule_strategy(nw: usize, ns: usize) -> impl Strategy<Value = Rule> {
    let smart_names = move || {
        prop::sample::select(
            (0..ns)
                .map(|i| format!("s{i}"))
                .chain(["any", "cloud-metadata", "loopback", "private-ranges", "link-local"].map(String::from))
                .collect::<Vec<_>>(),
        )
    };
    (
        prop::collection::vec(smart_names(), 0..3),
        prop::collection::vec(
            prop::sample::select(
                (0..nw)
                    .map(|i| format!("w{i}"))
                    .chain(["cloud-metadata-names".to_owned()])
                    .collect::<Vec<_>>(),
            ),
            0..3,
        ),
        prop::collection::vec(smart_names(), 0..2),
        prop::collection::vec(prop::sample::select(Protocol::ALL.to_vec()), 0..3),
        prop::collection::vec((1u16..1000, 0u16..50), 0..3),
        any::<bool>(),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(from, web, smart, mut protocols, ports, allow, watch)| {
            protocols.sort();
            protocols.dedup();
            Rule {
                name: String::new(),
                from,
                to: Destination {
                    webgroups: web,
                    smartgroups: smart,
                },
                protocols,
                ports: ports
                    .into_iter()
                    .map(|(lo, w)| PortRange {
                        lo,
                        hi: lo.saturating_add(w),
                    })
                    .collect(),
                action: if allow { Action::Allow } else { Action::Deny },
                watch,
                delegate: Vec::new(),
                at: Default::default(),
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn webgroup_index_matches_reference((web, smart, wi, si) in groups_strategy(), names in prop::collection::vec(name(), 1..20)) {
        let cfg = build(web, smart, wi, si);
        let policy = Policy::compile(&cfg);
        for n in &names {
            let got: BTreeSet<&str> = policy.webgroups_of(n).into_iter().collect();
            let want: BTreeSet<&str> = cfg.webgroups.iter().filter(|g| ref_in_webgroup(&cfg, &g.name, n)).map(|g| g.name.as_str()).collect();
            prop_assert_eq!(got, want, "name {}", n);
        }
    }

    #[test]
    fn smartgroup_index_matches_reference((web, smart, wi, si) in groups_strategy(), ips in prop::collection::vec(ip(), 1..30)) {
        let cfg = build(web, smart, wi, si);
        let policy = Policy::compile(&cfg);
        for ip in &ips {
            let got: BTreeSet<&str> = policy.smartgroups_of(*ip).into_iter().collect();
            let want: BTreeSet<&str> = cfg.smartgroups.iter()
                .filter(|g| g.name != builtin::ANY && ref_in_smartgroup(&cfg, &g.name, *ip))
                .map(|g| g.name.as_str()).collect();
            prop_assert_eq!(got, want, "ip {}", ip);
        }
    }

    #[test]
    fn decisions_match_reference(
        (web, smart, wi, si) in groups_strategy(),
        rules in prop_oneof![
            4 => prop::collection::vec(rule_strategy(6, 6), 0..8),
            // More than 64 rules: the rule index spans several words.
            1 => prop::collection::vec(rule_strategy(6, 6), 60..200),
        ],
        watch_mode in prop::bool::weighted(0.2),
        default_allow in any::<bool>(),
                guard_private in any::<bool>(),
        identity in prop::option::of(0usize..8),
        flows in prop::collection::vec((ip(), prop::option::of(name()), prop::option::of(ip()), prop::sample::select(Protocol::ALL.to_vec()), 1u16..1100), 1..20),
    ) {
        let nw = web.len();
        let ns = smart.len();
        let mut cfg = build(web, smart, wi, si);
        cfg.policy.mode = if watch_mode { Mode::Watch } else { Mode::Enforce };
        cfg.policy.default = if default_allow { Action::Allow } else { Action::Deny };
        cfg.policy.guard_private_ranges = guard_private;
        // Drop references to groups this case did not generate.
        cfg.policy.rules = rules.into_iter().enumerate().map(|(i, mut r)| {
            r.name = format!("r{i}");
            let ok_s = |g: &String| cfg.smartgroup(g).is_some() && g.strip_prefix('s').and_then(|n| n.parse::<usize>().ok()).is_none_or(|n| n < ns);
            r.from.retain(ok_s);
            r.to.smartgroups.retain(ok_s);
            r.to.webgroups.retain(|g| cfg.webgroup(g).is_some() && g.strip_prefix('w').and_then(|n| n.parse::<usize>().ok()).is_none_or(|n| n < nw));
            r
        }).collect();
                let policy = Policy::compile(&cfg);
        let identity_name = identity.map(|i| format!("s{i}")).filter(|n| cfg.smartgroup(n).is_some());
        let identity_id = identity_name.as_deref().and_then(|n| policy.smartgroup_id(n));
        for (src, n, dst, protocol, port) in &flows {
            let q = FlowQuery { src: *src, name: n.as_ref(), dst: *dst, protocol: *protocol, port: *port, identity: identity_id };
            let v = policy.decide(&q);
            let got = (v.action, policy.decided_by_name(v.decided_by).to_owned(), v.reason, v.would_deny() || (v.action == Action::Allow && v.enforcement == sluice::policy::Enforcement::Watched));
                        let want = ref_decide(&cfg, &q, identity_name.as_deref());
            prop_assert_eq!(got, want, "flow {:?}", q);
            if let DecidedBy::Rule(_) = v.decided_by {
                prop_assert!(v.source_group.is_none() || v.dest.is_some() || cfg.policy.rules.iter().any(|r| r.to.is_any()));
            }
            let x = policy.explain(&q);
            prop_assert_eq!(x.verdict, v);
        }
    }
}
