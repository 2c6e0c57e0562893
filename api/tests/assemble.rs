//! One configuration from several sources: a directory of files (the
//! control server's source) and a gateway's file with resources from a
//! control server. Problems are placed in the source they are in.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]
use std::fs;

use sluice_api::config::{Assembly, Resources, load_dir, load_str};
use sluice_api::proto::v1 as pb;
use sluice_api::{Action, ConfigErrorKind, Mode};

const LISTENERS: &str = "listeners:\n  - name: proxy\n    kind: http-proxy\n    address: 127.0.0.1:0\n";
const GROUPS: &str = "\
webgroups:
  - name: corp
    domains: [corp.example, \"*.corp.example\"]
smartgroups:
  - name: dev
    cidrs: [10.0.0.0/8]
";
const POLICY: &str = "\
policy:
  mode: watch
  rules:
    - name: corp
      from: [dev]
      to:
        webgroups: [corp]
      ports: [443, \"8000-8100\"]
      protocols: [tls]
      action: allow
";

fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

#[test]
fn a_directory_is_one_configuration_and_its_resources() {
    let dir = dir_with(&[
        ("10-listeners.yaml", LISTENERS),
        ("20-groups.yml", GROUPS),
        ("30-policy.yaml", POLICY),
        ("notes.txt", "not: [yaml"),
    ]);
    let (config, resources) = load_dir(dir.path()).unwrap();
    assert_eq!(config.listeners.len(), 1);
    assert!(config.webgroup("corp").is_some());
    assert_eq!(config.policy.mode, Mode::Watch);
    assert_eq!(config.policy.rules[0].ports.len(), 2);

    let web = resources.webgroups.as_deref().unwrap();
    assert_eq!(web.len(), 1, "built-in groups are not served: every gateway has them");
    assert_eq!(web[0].domains, ["corp.example", "*.corp.example"]);
    let policies = resources.policies.as_deref().unwrap();
    assert_eq!(policies.len(), 1);
    assert_eq!(policies[0].name, "default");
    assert_eq!(policies[0].rules[0].ports, ["443", "8000-8100"]);
}

#[test]
fn a_problem_in_a_directory_is_placed_in_its_file() {
    let bad_groups =
        "webgroups:\n  - name: other\n    domains: [ok.example]\n  - name: broken\n    domains: [\"bad domain\"]\n";
    let dir = dir_with(&[("a.yaml", GROUPS), ("b.yaml", bad_groups), ("c.yaml", POLICY)]);
    let errors = load_dir(dir.path()).unwrap_err();
    let e = &errors.0[0];
    assert!(e.file.ends_with("b.yaml"), "{e}");
    assert_eq!(e.path, "webgroups[1].domains[0]", "the index inside b.yaml");
    assert_eq!(e.line, 5);
    assert!(matches!(e.kind, ConfigErrorKind::InvalidDomain { .. }), "{e}");
}

#[test]
fn a_section_given_by_two_files_is_refused() {
    let dir = dir_with(&[("a.yaml", POLICY), ("b.yaml", "policy:\n  default: allow\n")]);
    let errors = load_dir(dir.path()).unwrap_err();
    let text = errors.to_string();
    assert!(
        text.contains("b.yaml") && text.contains("`policy` is already given in") && text.contains("a.yaml"),
        "{text}"
    );
}

#[test]
fn an_empty_directory_says_what_it_needs() {
    let dir = dir_with(&[]);
    let text = load_dir(dir.path()).unwrap_err().to_string();
    assert!(text.contains("no .yaml or .yml file"), "{text}");
}

/// The gateway's side: its own file for listeners, the rest from the
/// resources a control server sent. The result is the configuration the
/// directory describes.
#[test]
fn resources_replace_the_sections_they_make() {
    let dir = dir_with(&[("g.yaml", GROUPS), ("p.yaml", POLICY), ("l.yaml", LISTENERS)]);
    let (served, resources) = load_dir(dir.path()).unwrap();

    let local = format!("{LISTENERS}policy:\n  default: allow\n");
    let mut a = Assembly::new();
    a.add_file(&local, "gateway.yaml");
    a.replace_with(&resources);
    let config = a.build().unwrap();
    assert_eq!(config.policy.mode, served.policy.mode);
    assert_eq!(
        config.policy.default,
        Action::Deny,
        "the served policy replaced the local one"
    );
    let names = |c: &sluice_api::Config| {
        c.policy
            .rules
            .iter()
            .map(|r| {
                (
                    r.name.clone(),
                    r.from.clone(),
                    r.to.clone(),
                    r.ports.clone(),
                    r.protocols.clone(),
                    r.action,
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&config), names(&served));
    assert_eq!(
        config.webgroup("corp"),
        served
            .webgroup("corp")
            .map(|g| {
                let mut g = g.clone();
                g.at = config.webgroup("corp").unwrap().at;
                g
            })
            .as_ref()
    );

    // A kind not sent keeps the file's section.
    let mut a = Assembly::new();
    a.add_file(&format!("{LISTENERS}{GROUPS}"), "gateway.yaml");
    a.replace_with(&Resources {
        policies: resources.policies.clone(),
        ..Resources::default()
    });
    assert!(a.build().unwrap().webgroup("corp").is_some());
}

fn with_local(resources: &Resources) -> Result<sluice_api::Config, sluice_api::ConfigErrors> {
    let mut a = Assembly::new();
    a.add_file(LISTENERS, "gateway.yaml");
    a.replace_with(resources);
    a.build()
}

#[test]
fn a_problem_in_a_resource_names_the_resource_and_the_field() {
    let resources = Resources {
        webgroups: Some(vec![pb::WebGroup {
            name: "corp".into(),
            domains: vec!["ok.example".into(), "bad domain".into()],
            ..Default::default()
        }]),
        policies: Some(vec![pb::Policy {
            name: "edge".into(),
            rules: vec![pb::Rule {
                name: "r".into(),
                to: Some(pb::Destination {
                    webgroups: vec!["crop".into()],
                    ..Default::default()
                }),
                action: pb::Action::Allow as i32,
                ..Default::default()
            }],
            ..Default::default()
        }]),
        ..Default::default()
    };
    let errors = with_local(&resources).unwrap_err();
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("sluice.v1.WebGroup `corp`: domains[1]: invalid domain pattern `bad domain`")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with(
            "sluice.v1.Policy `edge`: rules[0].to.webgroups[0]: no webgroup named `crop` (did you mean `corp`?)"
        )),
        "{lines:?}"
    );
}

#[test]
fn absent_fields_and_unknown_enum_values_are_refused() {
    let policy = pb::Policy {
        name: "p".into(),
        mode: 7,
        rules: vec![
            pb::Rule {
                name: String::new(),
                action: pb::Action::Deny as i32,
                ..Default::default()
            },
            pb::Rule {
                name: "no-action".into(),
                protocols: vec![0, 9],
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let errors = with_local(&Resources {
        policies: Some(vec![policy.clone()]),
        ..Default::default()
    })
    .unwrap_err();
    let text = errors.to_string();
    assert!(text.contains("sluice.v1.Policy `p`: mode: unknown value `7`"), "{text}");
    assert!(
        text.contains("rules[1].protocols[0]: unknown value `0`")
            && text.contains("rules[1].protocols[1]: unknown value `9`"),
        "{text}"
    );

    let policy = pb::Policy {
        mode: 0,
        rules: vec![
            policy.rules[0].clone(),
            pb::Rule {
                name: "no-action".into(),
                ..Default::default()
            },
        ],
        ..policy
    };
    let text = with_local(&Resources {
        policies: Some(vec![policy]),
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        text.contains("sluice.v1.Policy `p`: rules[0].name: missing field `name`"),
        "{text}"
    );
    assert!(text.contains("rules[1].action: missing field `action`"), "{text}");
}

#[test]
fn a_gateway_takes_one_policy() {
    let p = |n: &str| pb::Policy {
        name: n.into(),
        ..Default::default()
    };
    let text = with_local(&Resources {
        policies: Some(vec![p("a"), p("b")]),
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        text.contains("2 Policy resources were sent (a, b); a gateway enforces one"),
        "{text}"
    );
    // None sent for this node: the default policy (enforce, deny).
    let c = with_local(&Resources {
        policies: Some(vec![]),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        (c.policy.mode, c.policy.default, c.policy.rules.len()),
        (Mode::Enforce, Action::Deny, 0)
    );
}

#[test]
fn the_local_file_and_a_directory_agree() {
    // A directory of one file validates as that file does.
    let text = format!("{LISTENERS}{GROUPS}{POLICY}");
    let dir = dir_with(&[("sluice.yaml", &text)]);
    let (from_dir, _) = load_dir(dir.path()).unwrap();
    let from_file = load_str(&text, "x").unwrap();
    assert_eq!(from_dir.policy, from_file.policy);
    assert_eq!(from_dir.webgroups, from_file.webgroups);
}

const TARGETED: &str = "\
policies:
  - name: strict
    rules:
      - {name: corp-only, from: [dev], to: {webgroups: [corp]}, action: allow}
  - name: open
    default: allow
targets:
  - name: build-gateways
    nodes: {clusters: [build], labels: {zone: eu}}
    policy: strict
  - name: lab
    nodes: {ids: [gw-lab-1]}
    policy: open
";

#[test]
fn named_policies_and_targets_are_served_by_name() {
    let dir = dir_with(&[("g.yaml", GROUPS), ("p.yaml", POLICY), ("t.yaml", TARGETED)]);
    let (config, resources) = load_dir(dir.path()).unwrap();
    assert_eq!(config.policy.name, "default");
    assert_eq!(
        config.policies.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        ["strict", "open"]
    );
    assert_eq!(config.policies[1].default, Action::Allow);
    assert_eq!(config.targets.len(), 2);
    assert_eq!(config.targets[0].clusters, ["build"]);
    let names: Vec<&str> = resources
        .policies
        .as_deref()
        .unwrap()
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(names, ["default", "strict", "open"]);
}

#[test]
fn a_target_must_name_a_policy_and_a_named_policy_its_name() {
    let bad = "\
policies:
  - rules: []
  - name: default
targets:
  - name: t
    policy: strickt
    plugins: [nope]
    listeners: [nowhere]
policy: {}
";
    let dir = dir_with(&[("g.yaml", GROUPS), ("t.yaml", bad)]);
    let text = load_dir(dir.path()).unwrap_err().to_string();
    assert!(text.contains("policies[0].name: missing field `name`"), "{text}");
    assert!(
        text.contains("policies[1].name: policy `default` is defined twice"),
        "{text}"
    );
    assert!(text.contains("targets[0].policy: no policy named `strickt`"), "{text}");
    assert!(text.contains("targets[0].plugins[0]: no plugin named `nope`"), "{text}");
    assert!(
        text.contains("targets[0].listeners[0]: no listener named `nowhere`"),
        "{text}"
    );
    // The errors of one policy name its place in the file.
    let dir = dir_with(&[(
        "t.yaml",
        "policies:\n  - name: p\n    rules:\n      - {name: r, to: {webgroups: [nope]}, action: allow}\n",
    )]);
    let e = load_dir(dir.path()).unwrap_err();
    assert_eq!(e.0[0].path, "policies[0].rules[0].to.webgroups[0]", "{e}");
    assert_eq!(e.0[0].line, 4);
}
