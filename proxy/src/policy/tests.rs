#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use super::*;

fn policy(yaml: &str) -> (Config, Policy) {
    let cfg = sluice_api::config::load_str(yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}"));
    let p = Policy::compile(&cfg);
    (cfg, p)
}

fn name(s: &str) -> DomainName {
    DomainName::parse(s).unwrap()
}

#[test]
fn first_match_then_default() {
    let (_, p) = policy(
        r#"
policy:
  mode: enforce
  rules:
    - name: deny-chat
      to: {webgroups: [chat]}
      action: deny
    - name: allow-openai
      to: {webgroups: [openai]}
      protocols: [tls]
      ports: [443]
      action: allow
webgroups:
  - name: openai
    domains: ["*.openai.com", openai.com]
  - name: chat
    domains: [chat.openai.com]
"#,
    );
    let q = |n: &str, port| FlowQuery {
        identity: None,
        src: "10.0.0.1".parse().unwrap(),
        name: Some(Box::leak(Box::new(name(n)))),
        dst: None,
        protocol: Protocol::Tls,
        port,
    };
    let v = p.decide(&q("api.openai.com", 443));
    assert_eq!((v.action, v.reason), (Action::Allow, ReasonCode::AllowedByRule));
    assert_eq!(p.decided_by_name(v.decided_by), "allow-openai");
    let v = p.decide(&q("chat.openai.com", 443));
    assert_eq!((v.action, p.decided_by_name(v.decided_by)), (Action::Deny, "deny-chat"));
    let v = p.decide(&q("api.openai.com", 8443));
    assert_eq!((v.action, v.reason), (Action::Deny, ReasonCode::DefaultDeny));
    assert!(v.blocks());
}

#[test]
fn guard_and_lifting() {
    let (_, p) = policy("policy: {mode: enforce, default: allow}\n");
    let q = FlowQuery {
        identity: None,
        src: "10.0.0.1".parse().unwrap(),
        name: None,
        dst: Some("169.254.169.254".parse().unwrap()),
        protocol: Protocol::Tcp,
        port: 80,
    };
    let v = p.decide(&q);
    assert_eq!(
        (v.action, v.reason, v.decided_by),
        (Action::Deny, ReasonCode::GuardCloudMetadata, DecidedBy::BuiltinGuard)
    );
    let mapped = FlowQuery {
        dst: Some("::ffff:127.0.0.1".parse().unwrap()),
        ..q
    };
    assert_eq!(p.decide(&mapped).reason, ReasonCode::GuardLoopback);
    let (_, p) = policy(
        "policy:\n  mode: enforce\n  rules:\n    - {name: imds, to: {smartgroups: [cloud-metadata]}, action: allow}\n",
    );
    let v = p.decide(&q);
    assert_eq!((v.action, p.decided_by_name(v.decided_by)), (Action::Allow, "imds"));
}

/// Keys of 23 bytes are stored in the slot, longer ones in the arena: both
/// sides of the boundary must match exactly and only exactly.
#[test]
fn names_either_side_of_the_inline_key_limit() {
    // 22, 23, 24 and 25 bytes.
    let keys = [
        "abcdefghijklmnopqr.com",
        "abcdefghijklmnopqrs.com",
        "abcdefghijklmnopqrst.com",
        "abcdefghijklmnopqrstu.com",
    ];
    let yaml = format!(
        "policy: {{mode: enforce}}\nwebgroups:\n  - name: exact\n    domains: [{}]\n  - name: sub\n    domains: [{}]\n",
        keys.join(", "),
        keys.iter().map(|k| format!("\"*.{k}\"")).collect::<Vec<_>>().join(", ")
    );
    let (_, p) = policy(&yaml);
    for k in keys {
        assert_eq!(p.webgroups_of(&name(k)), vec!["exact"], "{k}");
        assert_eq!(p.webgroups_of(&name(&format!("x.{k}"))), vec!["sub"], "x.{k}");
        // Same length, last letter of the first label changed.
        let near = k.replacen(".com", "", 1);
        let near = format!("{}z.com", &near[..near.len() - 1]);
        assert!(p.webgroups_of(&name(&near)).is_empty(), "{near}");
        assert!(p.webgroups_of(&name(&format!("x.{near}"))).is_empty(), "x.{near}");
        // One byte shorter and one byte longer.
        assert!(p.webgroups_of(&name(&k[1..])).is_empty(), "{}", &k[1..]);
        assert!(p.webgroups_of(&name(&format!("a{k}"))).is_empty(), "a{k}");
    }
}

/// A name with more suffixes than one batch of probes holds: every
/// suffix, in the first batch and after it, is still looked up.
#[test]
fn deep_names_are_probed_past_the_first_batch() {
    let labels = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l"];
    let mut yaml = String::from("policy: {mode: enforce}\nwebgroups:\n");
    for depth in 1..labels.len() {
        let suffix = labels[labels.len() - depth..].join(".");
        yaml.push_str(&format!("  - name: g{depth}\n    domains: [\"*.{suffix}\"]\n"));
    }
    yaml.push_str(&format!("  - name: whole\n    domains: [{}]\n", labels.join(".")));
    let (_, p) = policy(&yaml);
    let mut got = p.webgroups_of(&name(&labels.join(".")));
    got.sort_unstable();
    let mut want: Vec<String> = (1..labels.len()).map(|d| format!("g{d}")).collect();
    want.push("whole".to_owned());
    want.sort_unstable();
    assert_eq!(got, want);
    // One label less: the deepest suffix group no longer matches.
    let mut got = p.webgroups_of(&name(&labels[1..].join(".")));
    got.sort_unstable();
    assert_eq!(got.len(), labels.len() - 2, "{got:?}");
}

/// Many intervals inside one /16 (the summary-search path) and a few in
/// another (the direct path), checked address by address against the
/// CIDRs themselves.
#[test]
fn dense_and_sparse_slash16_buckets_match_the_cidrs() {
    let mut nets: Vec<Vec<String>> = vec![Vec::new(); 4];
    for i in 0..300u32 {
        let g = (i * 7 % 4) as usize;
        let (third, fourth) = (i % 250, ((i * 37) % 256) & !15);
        let len = [32, 28, 30, 24][(i % 4) as usize];
        let ip: IpAddr = [10, 1, third as u8, fourth as u8].into();
        nets[g].push(ipnet::IpNet::new(ip, len).unwrap().trunc().to_string());
    }
    nets[1].push("10.2.3.0/24".to_owned());
    nets[2].push("10.2.3.128/25".to_owned());
    let mut yaml = String::from("policy: {mode: enforce}\nsmartgroups:\n");
    for (g, n) in nets.iter().enumerate() {
        yaml.push_str(&format!("  - name: s{g}\n    cidrs: [{}]\n", n.join(", ")));
    }
    let (_, p) = policy(&yaml);
    let parsed: Vec<Vec<ipnet::IpNet>> = nets
        .iter()
        .map(|n| n.iter().map(|c| c.parse::<ipnet::IpNet>().unwrap().trunc()).collect())
        .collect();
    for third in [0u8, 1, 2, 3, 77, 128, 249, 250, 255] {
        for fourth in (0..=255u8).step_by(3) {
            for second in [1u8, 2] {
                let ip: IpAddr = [10, second, third, fourth].into();
                let mut want: Vec<String> = (0..4)
                    .filter(|g| parsed[*g].iter().any(|n| n.contains(&ip)))
                    .map(|g| format!("s{g}"))
                    .collect();
                want.push("private-ranges".to_owned());
                want.sort_unstable();
                let mut got: Vec<&str> = p.smartgroups_of(ip);
                got.sort_unstable();
                assert_eq!(got, want, "{ip}");
            }
        }
    }
}
