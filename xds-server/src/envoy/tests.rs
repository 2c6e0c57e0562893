#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]
//! The translation, checked by running the emitted protobuf: a small
//! evaluator of the matcher subset the translator writes (the network
//! inputs, the IP matcher, exact/suffix/regex string matchers, and/or/not)
//! decides flows, and the answer is compared with Sluice's semantics.

use std::net::IpAddr;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter, listener_filter};
use envoy_types::pb::envoy::config::rbac::v3 as rbac;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac;
use envoy_types::pb::envoy::extensions::matching::input_matchers::ip::v3::Ip;
use envoy_types::pb::xds::r#type::matcher::v3::matcher::matcher_list::Predicate;
use envoy_types::pb::xds::r#type::matcher::v3::matcher::matcher_list::predicate::{MatchType, single_predicate};
use envoy_types::pb::xds::r#type::matcher::v3::matcher::{MatcherType, OnMatch, on_match};
use envoy_types::pb::xds::r#type::matcher::v3::{Matcher, StringMatcher, string_matcher};
use ipnet::IpNet;
use prost::Message;
use sluice_api::config::load_str;
use sluice_api::{Config, PortRange};

use super::*;
use crate::snapshot::type_url;

/// A connection as Envoy's network inputs see it.
#[derive(Debug, Clone, Copy)]
struct Flow<'a> {
    src: &'a str,
    sni: Option<&'a str>,
    dst: &'a str,
    port: u16,
}

fn flow<'a>(src: &'a str, sni: Option<&'a str>) -> Flow<'a> {
    Flow {
        src,
        sni,
        dst: "93.184.216.34",
        port: 443,
    }
}

fn config(yaml: &str) -> Config {
    load_str(yaml, "t.yaml").unwrap_or_else(|e| panic!("{e}"))
}

fn listeners(c: &Config) -> Vec<Listener> {
    translate(c)
        .unwrap()
        .iter()
        .filter(|r| r.type_url() == type_url::LISTENER)
        .map(|r| Listener::decode(r.body.value.as_slice()).unwrap())
        .collect()
}

fn rbac_of(l: &Listener, chain: &str) -> Rbac {
    let c = l.filter_chains.iter().find(|c| c.name == chain).expect("chain");
    let f = &c.filters[0];
    assert_eq!(f.name, "envoy.filters.network.rbac");
    let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
        panic!("{f:?}")
    };
    assert_eq!(
        any.type_url,
        "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC"
    );
    Rbac::decode(any.value.as_slice()).unwrap()
}

/// `(rule name, RBAC action)` the matcher picks for `f`.
fn decide(m: &Matcher, f: Flow<'_>) -> (String, rbac::rbac::Action) {
    if let Some(MatcherType::MatcherList(list)) = &m.matcher_type {
        for fm in &list.matchers {
            if eval(fm.predicate.as_ref().unwrap(), f) {
                return action(fm.on_match.as_ref().unwrap());
            }
        }
    }
    action(m.on_no_match.as_deref().unwrap())
}

fn action(o: &OnMatch) -> (String, rbac::rbac::Action) {
    let Some(on_match::OnMatch::Action(a)) = &o.on_match else {
        panic!("{o:?}")
    };
    let any = a.typed_config.as_ref().unwrap();
    assert_eq!(any.type_url, "type.googleapis.com/envoy.config.rbac.v3.Action");
    let a = rbac::Action::decode(any.value.as_slice()).unwrap();
    (a.name, rbac::rbac::Action::try_from(a.action).unwrap())
}

fn eval(p: &Predicate, f: Flow<'_>) -> bool {
    match p.match_type.as_ref().unwrap() {
        MatchType::OrMatcher(l) => {
            assert!(l.predicate.len() >= 2, "or_matcher needs two predicates");
            l.predicate.iter().any(|p| eval(p, f))
        }
        MatchType::AndMatcher(l) => {
            assert!(l.predicate.len() >= 2, "and_matcher needs two predicates");
            l.predicate.iter().all(|p| eval(p, f))
        }
        MatchType::NotMatcher(p) => !eval(p, f),
        MatchType::SinglePredicate(s) => {
            let input = s.input.as_ref().unwrap();
            let value: Option<String> = match input.name.as_str() {
                "envoy.matching.inputs.source_ip" => Some(f.src.to_owned()),
                "envoy.matching.inputs.destination_ip" => Some(f.dst.to_owned()),
                "envoy.matching.inputs.destination_port" => Some(f.port.to_string()),
                "envoy.matching.inputs.server_name" => f.sni.map(str::to_owned),
                other => panic!("input {other}"),
            };
            let type_url = &input.typed_config.as_ref().unwrap().type_url;
            assert!(
                type_url.starts_with("type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3."),
                "{type_url}"
            );
            let Some(value) = value else { return false };
            match s.matcher.as_ref().unwrap() {
                single_predicate::Matcher::ValueMatch(m) => string_match(m, &value),
                single_predicate::Matcher::CustomMatch(c) => {
                    assert_eq!(c.name, "envoy.matching.matchers.ip");
                    let any = c.typed_config.as_ref().unwrap();
                    assert_eq!(
                        any.type_url,
                        "type.googleapis.com/envoy.extensions.matching.input_matchers.ip.v3.Ip"
                    );
                    let ip = Ip::decode(any.value.as_slice()).unwrap();
                    assert!(!ip.stat_prefix.is_empty());
                    let addr: IpAddr = value.parse().unwrap();
                    ip.cidr_ranges.iter().any(|r| {
                        let net: IpNet = format!("{}/{}", r.address_prefix, r.prefix_len.unwrap().value)
                            .parse()
                            .unwrap();
                        net.contains(&addr)
                    })
                }
            }
        }
    }
}

/// The regexes the translator writes: `.+` and `<digits>[0-9]{n}`.
fn string_match(m: &StringMatcher, v: &str) -> bool {
    let fold = |s: &str| {
        if m.ignore_case {
            s.to_ascii_lowercase()
        } else {
            s.to_owned()
        }
    };
    match m.match_pattern.as_ref().unwrap() {
        string_matcher::MatchPattern::Exact(e) => fold(v) == fold(e),
        string_matcher::MatchPattern::Suffix(e) => fold(v).ends_with(&fold(e)),
        string_matcher::MatchPattern::SafeRegex(r) if r.regex == ".+" => !v.is_empty(),
        string_matcher::MatchPattern::SafeRegex(r) => {
            let (prefix, rest) = r.regex.split_once("[0-9]{").unwrap();
            let n: usize = rest.strip_suffix('}').unwrap().parse().unwrap();
            v.len() == prefix.len() + n
                && v.starts_with(prefix)
                && v[prefix.len()..].bytes().all(|b| b.is_ascii_digit())
        }
        other => panic!("{other:?}"),
    }
}

const GROUPS: &str = r#"
listeners:
  - {name: egress, kind: sni, address: "127.0.0.1:10443", upstream_port: 443}
inventory:
  - {name: build-01, ips: [10.0.1.5], labels: {app: ci}}
  - {name: agent-7, ips: [10.0.2.7], labels: {app: agent, env: prod}}
webgroups:
  - {name: corp, domains: [api.corp.example, "*.svc.corp.example"]}
  - {name: more, domains: [extra.example], include: [corp]}
  - {name: all, domains: ["*"]}
  - {name: bad, domains: [evil.example]}
smartgroups:
  - {name: agents, selectors: [{app: agent}], include: [builders]}
  - {name: builders, workloads: [build-01], cidrs: [10.0.9.0/24]}
  - {name: lab, cidrs: [10.0.0.0/8]}
"#;

#[test]
fn rule_order_is_kept_where_envoy_chains_would_pick_the_more_specific() {
    // A filter chain for the allow (server name + /24) is more specific
    // than one for the deny (/8, any name), so chains would let
    // builders through; Sluice's first-match says the deny wins.
    let c = config(&format!(
        "{GROUPS}policy:
  rules:
    - {{name: lab-deny, from: [lab], action: deny}}
    - {{name: builders-corp, from: [builders], to: {{webgroups: [corp]}}, action: allow}}
    - {{name: agents-corp, from: [agents], to: {{webgroups: [more]}}, action: allow}}
"
    ));
    let l = &listeners(&c)[0];
    let m = rbac_of(l, "sni").matcher.unwrap();
    let d = |src, sni| decide(&m, flow(src, Some(sni)));
    assert_eq!(
        d("10.0.9.1", "api.corp.example"),
        ("lab-deny".into(), rbac::rbac::Action::Deny)
    );
    assert_eq!(
        d("192.0.2.1", "api.corp.example"),
        ("default".into(), rbac::rbac::Action::Deny),
        "default deny"
    );
    // Reorder: the allow now comes first and decides.
    let c = config(&format!(
        "{GROUPS}policy:
  rules:
    - {{name: builders-corp, from: [builders], to: {{webgroups: [corp]}}, action: allow}}
    - {{name: lab-deny, from: [lab], action: deny}}
"
    ));
    let m = rbac_of(&listeners(&c)[0], "sni").matcher.unwrap();
    assert_eq!(
        decide(&m, flow("10.0.9.1", Some("api.corp.example"))),
        ("builders-corp".into(), rbac::rbac::Action::Allow)
    );
    assert_eq!(
        decide(&m, flow("10.0.9.1", Some("other.example"))),
        ("lab-deny".into(), rbac::rbac::Action::Deny)
    );
    // No shadow matcher when nothing is watched.
    assert!(rbac_of(&listeners(&c)[0], "sni").shadow_matcher.is_none());
}

#[test]
fn groups_resolve_cidrs_selectors_workloads_and_includes() {
    let c = config(&format!(
        "{GROUPS}policy:
  default: deny
  rules:
    - {{name: agents-more, from: [agents], to: {{webgroups: [more]}}, action: allow}}
"
    ));
    let m = rbac_of(&listeners(&c)[0], "sni").matcher.unwrap();
    let allowed = |src, sni| decide(&m, flow(src, Some(sni))).1 == rbac::rbac::Action::Allow;
    // agent-7 by selector, build-01 by name through `builders`, a /24 of
    // `builders` through the include; the WebGroup through its include.
    for src in ["10.0.2.7", "10.0.1.5", "10.0.9.200", "::ffff:10.0.2.7"] {
        for sni in ["extra.example", "api.corp.example", "a.svc.corp.example"] {
            assert!(allowed(src, sni), "{src} {sni}");
        }
    }
    assert!(!allowed("10.0.2.8", "extra.example"));
    assert!(!allowed("10.0.2.7", "corp.example"));
}

#[test]
fn domain_patterns_mean_what_they_mean_in_sluice() {
    let c = config(&format!(
        "{GROUPS}policy:
  rules:
    - {{name: corp, to: {{webgroups: [corp]}}, action: allow}}
"
    ));
    let m = rbac_of(&listeners(&c)[0], "sni").matcher.unwrap();
    let allowed = |sni| decide(&m, flow("10.9.9.9", Some(sni))).1 == rbac::rbac::Action::Allow;
    for sni in [
        "api.corp.example",
        "API.Corp.Example",
        "api.corp.example.",
        "a.svc.corp.example",
        "a.b.svc.corp.example",
        "A.SVC.corp.example.",
    ] {
        assert!(allowed(sni), "{sni}");
    }
    // `*.x` is not the apex, and a suffix is label-aligned.
    for sni in [
        "svc.corp.example",
        "xsvc.corp.example",
        "api.corp.example.evil",
        "corp.example",
    ] {
        assert!(!allowed(sni), "{sni}");
    }
    // `*` is any name, but a flow with no name is refused first.
    let c = config(&format!(
        "{GROUPS}policy:
  rules:
    - {{name: all, to: {{webgroups: [all]}}, action: allow}}
"
    ));
    let m = rbac_of(&listeners(&c)[0], "sni").matcher.unwrap();
    assert_eq!(decide(&m, flow("10.9.9.9", Some("x.y"))).0, "all");
    assert_eq!(
        decide(&m, flow("10.9.9.9", None)),
        ("no-sni".into(), rbac::rbac::Action::Deny)
    );
}

#[test]
fn a_trailing_dot_does_not_slip_past_a_deny() {
    let c = config(&format!(
        "{GROUPS}policy:
  default: allow
  rules:
    - {{name: no-evil, to: {{webgroups: [bad]}}, action: deny}}
"
    ));
    let m = rbac_of(&listeners(&c)[0], "sni").matcher.unwrap();
    for sni in ["evil.example", "evil.example.", "EVIL.example"] {
        assert_eq!(decide(&m, flow("10.0.0.1", Some(sni))).0, "no-evil", "{sni}");
    }
    assert_eq!(decide(&m, flow("10.0.0.1", Some("good.example"))).0, "default");
}

#[test]
fn watched_rules_and_watch_mode_go_to_the_shadow_matcher() {
    let c = config(&format!(
        "{GROUPS}policy:
  rules:
    - {{name: try-deny, from: [lab], to: {{webgroups: [corp]}}, action: deny, watch: true}}
    - {{name: corp, to: {{webgroups: [corp]}}, action: allow}}
"
    ));
    let r = rbac_of(&listeners(&c)[0], "sni");
    let (m, s) = (r.matcher.unwrap(), r.shadow_matcher.unwrap());
    assert_eq!(r.shadow_rules_stat_prefix, "sluice_watch.");
    let f = flow("10.1.1.1", Some("api.corp.example"));
    // Carried out: let through, flagged; recorded: the deny.
    assert_eq!(decide(&m, f), ("try-deny".into(), rbac::rbac::Action::Log));
    assert_eq!(decide(&s, f), ("try-deny".into(), rbac::rbac::Action::Deny));
    // Other flows: the same in both.
    let g = flow("192.0.2.1", Some("api.corp.example"));
    assert_eq!(decide(&m, g), decide(&s, g));

    // Watch mode: nothing is denied, the shadow says what would be.
    let c = config(&format!(
        "{GROUPS}policy:
  mode: watch
  rules:
    - {{name: corp, to: {{webgroups: [corp]}}, action: allow}}
"
    ));
    let r = rbac_of(&listeners(&c)[0], "sni");
    let (m, s) = (r.matcher.unwrap(), r.shadow_matcher.unwrap());
    let f = flow("10.1.1.1", Some("other.example"));
    assert_eq!(decide(&m, f), ("default".into(), rbac::rbac::Action::Log));
    assert_eq!(decide(&s, f), ("default".into(), rbac::rbac::Action::Deny));
    assert_eq!(decide(&m, flow("10.1.1.1", None)).1, rbac::rbac::Action::Log);
}

#[test]
fn metadata_names_are_guarded_unless_the_deciding_rule_names_them() {
    let c = config(&format!(
        "{GROUPS}policy:
  rules:
    - {{name: lab-metadata, from: [lab], to: {{webgroups: [cloud-metadata-names]}}, action: allow}}
    - {{name: all, to: {{webgroups: [all]}}, action: allow}}
"
    ));
    let m = rbac_of(&listeners(&c)[0], "sni").matcher.unwrap();
    let d = |src| decide(&m, flow(src, Some("metadata.google.internal")));
    assert_eq!(d("10.0.0.1"), ("lab-metadata".into(), rbac::rbac::Action::Allow));
    assert_eq!(
        d("192.0.2.1"),
        ("guard:cloud-metadata-names".into(), rbac::rbac::Action::Deny)
    );
    assert_eq!(decide(&m, flow("192.0.2.1", Some("example.com"))).0, "all");
}

#[test]
fn port_and_protocol_decide_which_rules_an_sni_listener_keeps() {
    let c = config(&format!(
        "{GROUPS}policy:
  rules:
    - {{name: other-port, to: {{webgroups: [corp]}}, ports: [8443], action: deny}}
    - {{name: dns-only, to: {{webgroups: [corp]}}, protocols: [dns], action: deny}}
    - {{name: tcp, to: {{webgroups: [corp]}}, protocols: [tcp], ports: [400-500], action: allow}}
"
    ));
    let m = rbac_of(&listeners(&c)[0], "sni").matcher.unwrap();
    assert_eq!(decide(&m, flow("10.0.0.1", Some("api.corp.example"))).0, "tcp");
}

#[test]
fn transparent_listeners_match_ports_and_destinations_and_guard_addresses() {
    let c = config(
        r#"
listeners:
  - {name: redirect, kind: transparent, address: "127.0.0.1:15001"}
webgroups:
  - {name: corp, domains: [api.corp.example]}
smartgroups:
  - {name: db, cidrs: [10.5.0.0/16]}
policy:
  rules:
    - {name: web, to: {webgroups: [corp]}, ports: [443, 8000-8999], action: allow}
    - {name: db, to: {smartgroups: [db]}, protocols: [tcp], ports: [5432], action: allow}
    - {name: meta, from: [any], to: {smartgroups: [cloud-metadata]}, ports: [80], action: allow}
    - {name: rest, action: allow}
"#,
    );
    let ls = listeners(&c);
    let l = &ls[0];
    assert_eq!(l.name, "redirect");
    let names: Vec<_> = l
        .listener_filters
        .iter()
        .map(|f| {
            let Some(listener_filter::ConfigType::TypedConfig(a)) = &f.config_type else {
                panic!()
            };
            (f.name.as_str(), a.type_url.as_str())
        })
        .collect();
    assert_eq!(
        names,
        [
            (
                "envoy.filters.listener.original_dst",
                "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
            ),
            (
                "envoy.filters.listener.tls_inspector",
                "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
            ),
        ]
    );
    let tls = rbac_of(l, "tls").matcher.unwrap();
    let opaque = rbac_of(l, "opaque").matcher.unwrap();
    let at = |dst, port, sni| Flow {
        src: "10.0.0.1",
        sni,
        dst,
        port,
    };
    let web = Some("api.corp.example");
    assert_eq!(decide(&tls, at("93.184.216.34", 8123, web)).0, "web");
    assert_eq!(decide(&tls, at("93.184.216.34", 9000, web)).0, "rest");
    assert_eq!(decide(&opaque, at("10.5.1.1", 5432, None)).0, "db");
    // The guard: an allowed name to a guarded address is denied unless
    // the deciding rule names the group.
    assert_eq!(decide(&tls, at("127.0.0.2", 443, web)).0, "guard:loopback");
    // The listener's own address is the gateway's.
    assert_eq!(decide(&tls, at("127.0.0.1", 443, web)).0, "guard:gateway");
    assert_eq!(
        decide(&opaque, at("169.254.169.254", 80, None)),
        ("meta".into(), rbac::rbac::Action::Allow)
    );
    // 169.254.169.254 is link-local too; naming `cloud-metadata` opens it
    // (the most specific group decides), but not on another port.
    assert_eq!(
        decide(&opaque, at("169.254.169.254", 81, None)).0,
        "guard:cloud-metadata"
    );
    assert_eq!(decide(&opaque, at("169.254.1.1", 80, None)).0, "guard:link-local");
}

#[test]
fn port_blocks_cover_a_range_exactly() {
    for (lo, hi) in [
        (1, 65535),
        (1, 58888),
        (8000, 8999),
        (443, 443),
        (80, 8080),
        (0, 19),
        (65530, 65535),
        (99, 101),
    ] {
        let r = PortRange { lo, hi };
        let blocks = policy::port_blocks(r);
        assert!(blocks.len() <= 80, "{r}: {}", blocks.len());
        for p in 0..=65535u32 {
            let s = p.to_string();
            let hit = blocks.iter().any(|(prefix, free)| {
                let prefix = prefix.to_string();
                s.len() == prefix.len() + *free as usize && s.starts_with(&prefix)
            });
            assert_eq!(hit, (u32::from(lo)..=u32::from(hi)).contains(&p), "{r} {p}");
        }
    }
}

#[test]
fn resources_are_envoy_types_with_envoy_type_urls() {
    let c = config(&format!(
        "{GROUPS}resolver:
  nameservers: [\"127.0.0.1:53\"]
  hosts:
    allowed.test: [127.0.0.1]
policy:
  rules:
    - {{name: corp, to: {{webgroups: [corp]}}, action: allow}}
"
    ));
    let rs = translate(&c).unwrap();
    let mut names: Vec<_> = rs.iter().map(|r| (r.type_url(), r.name.as_str())).collect();
    names.sort();
    assert_eq!(
        names,
        [
            (type_url::CLUSTER, "egress/forward"),
            (type_url::CLUSTER, "egress/hosts/allowed.test"),
            (type_url::LISTENER, "egress"),
        ]
    );
    let l = &listeners(&c)[0];
    assert_eq!(
        l.filter_chains.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["hosts/allowed.test", "sni"]
    );
    let urls = |chain: &str| -> Vec<String> {
        l.filter_chains
            .iter()
            .find(|c| c.name == chain)
            .unwrap()
            .filters
            .iter()
            .map(|f| match &f.config_type {
                Some(filter::ConfigType::TypedConfig(a)) => a.type_url.clone(),
                other => panic!("{other:?}"),
            })
            .collect()
    };
    assert_eq!(
        urls("sni"),
        [
            "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC",
            "type.googleapis.com/envoy.extensions.filters.network.sni_dynamic_forward_proxy.v3.FilterConfig",
            "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        ]
    );
    assert_eq!(
        urls("hosts/allowed.test"),
        [
            "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC",
            "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        ]
    );
    let forward = rs.iter().find(|r| r.name == "egress/forward").unwrap();
    let cl = Cluster::decode(forward.body.value.as_slice()).unwrap();
    let Some(cluster::ClusterDiscoveryType::ClusterType(t)) = &cl.cluster_discovery_type else {
        panic!("{cl:?}")
    };
    assert_eq!(t.name, "envoy.clusters.dynamic_forward_proxy");
    assert_eq!(
        t.typed_config.as_ref().unwrap().type_url,
        "type.googleapis.com/envoy.extensions.clusters.dynamic_forward_proxy.v3.ClusterConfig"
    );
    // Loopback is guarded and no rule opens it: the hosts cluster has no
    // endpoint there.
    let hosts = rs.iter().find(|r| r.name == "egress/hosts/allowed.test").unwrap();
    let cl = Cluster::decode(hosts.body.value.as_slice()).unwrap();
    assert!(cl.load_assignment.unwrap().endpoints[0].lb_endpoints.is_empty());
}

#[test]
fn other_listener_kinds_are_left_out_and_listed() {
    let c = config(
        r#"
listeners:
  - {name: p, kind: http-proxy, address: "127.0.0.1:3128"}
  - {name: c, kind: tcp, address: "127.0.0.1:5432", upstream: "10.0.0.5:5432"}
  - {name: d, kind: dns, address: "127.0.0.1:5353"}
  - {name: q, kind: quic, address: "127.0.0.1:8443"}
policy:
  rules: []
"#,
    );
    assert!(translate(&c).unwrap().is_empty());
    assert_eq!(
        untranslated(&c),
        [
            ("p", sluice_api::ListenerType::HttpProxy),
            ("c", sluice_api::ListenerType::Tcp),
            ("d", sluice_api::ListenerType::Dns),
            ("q", sluice_api::ListenerType::Quic),
        ]
    );
}

#[test]
fn any_port_range_on_a_transparent_listener_is_matched_exactly() {
    let c = config(
        r#"
listeners:
  - {name: t, kind: transparent, address: "127.0.0.1:15001"}
policy:
  rules:
    - {name: odd, ports: [1111-58888], action: allow}
"#,
    );
    let l = &listeners(&c)[0];
    let m = rbac_of(l, "opaque").matcher.unwrap();
    let at = |port| Flow {
        src: "10.0.0.1",
        sni: None,
        dst: "93.184.216.34",
        port,
    };
    for (port, rule) in [
        (1110, "default"),
        (1111, "odd"),
        (4242, "odd"),
        (58888, "odd"),
        (58889, "default"),
    ] {
        assert_eq!(decide(&m, at(port)).0, rule, "{port}");
    }
}

#[test]
fn network_plugins_serving_a_listener_are_wasm_filters_over_ecds_after_the_policy() {
    let c = config(
        r#"
listeners:
  - {name: edge, kind: sni, address: "127.0.0.1:8443", upstream_port: 443}
  - {name: other, kind: sni, address: "127.0.0.1:9443", upstream_port: 443}
plugins:
  - {name: guard, path: /nonexistent/guard.wasm, listeners: [edge]}
  - {name: everywhere, path: /nonexistent/all.wasm}
  - {name: web, path: /nonexistent/web.wasm, kind: http}
policy:
  rules: []
"#,
    );
    let ls = listeners(&c);
    let names = |l: &Listener| -> Vec<Vec<String>> {
        l.filter_chains
            .iter()
            .map(|ch| ch.filters.iter().map(|f| f.name.clone()).collect())
            .collect()
    };
    let edge = ls.iter().find(|l| l.name == "edge").unwrap();
    for chain in names(edge) {
        assert_eq!(chain[0], "envoy.filters.network.rbac");
        assert_eq!(&chain[1..3], ["guard", "everywhere"], "{chain:?}");
    }
    let other = ls.iter().find(|l| l.name == "other").unwrap();
    assert!(
        names(other)
            .iter()
            .all(|c| c[1] == "everywhere" && !c.contains(&"guard".to_owned()))
    );
    let f = &edge.filter_chains[0].filters[1];
    let Some(envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::ConfigDiscovery(src)) = &f.config_type
    else {
        panic!("{f:?}")
    };
    assert_eq!(
        src.type_urls,
        ["type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm"]
    );
    assert!(src.config_source.as_ref().unwrap().config_source_specifier.is_some());
}
