//! Every kind of configuration error: the exact `ConfigErrorKind`, the
//! file:line:column it is reported at, and the field path.
//!
//! Positions are not written as numbers but found in the YAML text (`at`),
//! so a test says "the error points at `10.0.0.1/8`" and stays right when the
//! document is edited.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use sluice_api::config::{ConfigError, ConfigErrorKind, GroupKind, NameKind, load_str};
use sluice_api::domain::DomainError;
use sluice_api::net::CidrError;

const FILE: &str = "test.yaml";

/// 1-based (line, column) of the `nth` (0-based) occurrence of `needle`.
fn at_nth(text: &str, needle: &str, nth: usize) -> (u32, u32) {
    let (offset, _) = text
        .match_indices(needle)
        .nth(nth)
        .unwrap_or_else(|| panic!("`{needle}` #{nth} not in the text"));
    let before = &text[..offset];
    let line = before.matches('\n').count() as u32 + 1;
    let col = before.rsplit('\n').next().unwrap_or("").chars().count() as u32 + 1;
    (line, col)
}

/// Position of the only occurrence of `needle`.
fn at(text: &str, needle: &str) -> (u32, u32) {
    assert_eq!(
        text.matches(needle).count(),
        1,
        "`{needle}` must occur exactly once in the test input"
    );
    at_nth(text, needle, 0)
}

/// All errors of a file that must not load.
fn errors(text: &str) -> Vec<ConfigError> {
    match load_str(text, FILE) {
        Ok(_) => panic!("expected errors, the config loaded:\n{text}"),
        Err(e) => e.0,
    }
}

/// The single error of a file that must not load.
fn one_error(text: &str) -> ConfigError {
    let mut errs = errors(text);
    assert_eq!(errs.len(), 1, "expected exactly one error, got: {errs:#?}");
    errs.remove(0)
}

#[track_caller]
fn assert_error(e: &ConfigError, pos: (u32, u32), path: &str, kind: &ConfigErrorKind) {
    assert_eq!(&e.kind, kind, "kind of {e}");
    assert_eq!((e.line, e.column), pos, "position of {e}");
    assert_eq!(e.path, path, "path of {e}");
    assert_eq!(e.file, FILE);
}

fn loads(text: &str) {
    if let Err(e) = load_str(text, FILE) {
        panic!("expected the config to load, got:\n{e}");
    }
}

// ---------------------------------------------------------------- YAML layer

#[test]
fn unknown_field_with_did_you_mean() {
    let text = "listners:\n  - name: proxy\n";
    let e = one_error(text);
    match &e.kind {
        ConfigErrorKind::UnknownField {
            field,
            suggestion,
            expected,
        } => {
            assert_eq!(field, "listners");
            assert_eq!(suggestion.as_deref(), Some("listeners"));
            assert!(expected.iter().any(|x| x == "listeners"), "{expected:?}");
        }
        other => panic!("expected UnknownField, got {other:?}"),
    }
    assert_eq!((e.line, e.column), at(text, "listners"));
    assert!(e.to_string().contains("did you mean `listeners`"), "{e}");
}

#[test]
fn unknown_field_in_a_rule() {
    let text = "policy:\n  rules:\n    - name: r\n      action: allow\n      protocol: [tls]\n";
    let e = one_error(text);
    assert!(
        matches!(&e.kind, ConfigErrorKind::UnknownField { field, suggestion, .. }
            if field == "protocol" && suggestion.as_deref() == Some("protocols")),
        "{:?}",
        e.kind
    );
    assert_eq!((e.line, e.column), at(text, "protocol:"));
}

/// What works today: the unknown key is rejected at its position and named.
#[test]
fn unknown_field_is_rejected_at_its_position() {
    let text = "policy:\n  rules:\n    - {name: r, action: allow, bogus: 1}\n";
    let e = one_error(text);
    assert_eq!((e.line, e.column), at(text, "bogus"));
    assert!(e.to_string().contains("`bogus`"), "{e}");
    let text = "listners: []\n";
    let e = one_error(text);
    assert_eq!((e.line, e.column), (1, 1));
    assert!(e.to_string().contains("`listners`"), "{e}");
}

#[test]
fn unknown_enum_value() {
    let text = "policy:\n  mode: enforse\n";
    let e = one_error(text);
    assert!(
        matches!(&e.kind, ConfigErrorKind::UnknownValue { value, suggestion, expected }
            if value == "enforse" && suggestion.as_deref() == Some("enforce")
                && expected == &["enforce".to_owned(), "watch".to_owned()]),
        "{:?}",
        e.kind
    );
    assert_eq!((e.line, e.column), at(text, "enforse"));

    let text = "listeners:\n  - name: p\n    kind: http_proxy\n    address: 127.0.0.1:3128\n";
    let e = one_error(text);
    assert!(
        matches!(&e.kind, ConfigErrorKind::UnknownValue { value, suggestion, .. }
            if value == "http_proxy" && suggestion.as_deref() == Some("http-proxy")),
        "{:?}",
        e.kind
    );
    assert_eq!((e.line, e.column), at(text, "http_proxy"));
}

#[test]
fn unknown_enum_value_is_rejected_at_its_position() {
    let text = "policy:\n  rules:\n    - name: r\n      protocols: [tls, tcpp]\n      action: allow\n";
    let e = one_error(text);
    assert_eq!((e.line, e.column), at(text, "tcpp"));
    assert!(e.to_string().contains("`tcpp`"), "{e}");
}

#[test]
fn missing_field() {
    let text = "listeners:\n  - name: proxy\n    kind: http-proxy\n";
    let e = one_error(text);
    assert_eq!(
        e.kind,
        ConfigErrorKind::MissingField {
            field: "address".into()
        }
    );
    let text = "policy:\n  rules:\n    - name: r\n      to: {webgroups: [llm-providers]}\n";
    let e = one_error(text);
    assert_eq!(e.kind, ConfigErrorKind::MissingField { field: "action".into() });
}

#[test]
fn missing_field_is_rejected_at_its_mapping_with_its_path() {
    let text = "listeners:\n  - name: proxy\n    kind: http-proxy\n";
    let e = one_error(text);
    assert_error(
        &e,
        at(text, "name: proxy"),
        "listeners[0].address",
        &ConfigErrorKind::MissingField {
            field: "address".into(),
        },
    );
    assert!(e.to_string().contains("`address`"), "{e}");
}

/// Regression (issue 13, item 5): unknown fields, unknown values and
/// missing fields stopped at the first, without a path. Four problems,
/// four errors, each with its path, in file order.
#[test]
fn every_unknown_field_value_and_missing_field_is_reported_with_its_path() {
    let text = "listeners:
  - name: proxy
    kind: http_proxy
    address: 127.0.0.1:3128
    peek_timout: 5s
policy:
  mode: enforse
  rules:
    - name: r
      to: {webgroups: [llm-providers]}
";
    let errs = errors(text);
    let got: Vec<(&str, (u32, u32))> = errs.iter().map(|e| (e.path.as_str(), (e.line, e.column))).collect();
    assert_eq!(
        got,
        vec![
            ("listeners[0].kind", at(text, "http_proxy")),
            ("listeners[0].peek_timout", at(text, "peek_timout")),
            ("policy.mode", at(text, "enforse")),
            ("policy.rules[0].action", at(text, "name: r")),
        ],
        "{errs:#?}"
    );
    assert!(matches!(&errs[0].kind, ConfigErrorKind::UnknownValue { value, .. } if value == "http_proxy"));
    assert!(
        matches!(&errs[1].kind, ConfigErrorKind::UnknownField { field, suggestion, .. }
        if field == "peek_timout" && suggestion.as_deref() == Some("peek_timeout"))
    );
    assert!(matches!(&errs[2].kind, ConfigErrorKind::UnknownValue { value, .. } if value == "enforse"));
    assert_eq!(errs[3].kind, ConfigErrorKind::MissingField { field: "action".into() });
    // The value left out for `kind` is not also called missing.
    assert!(
        !errs
            .iter()
            .any(|e| e.path == "listeners[0].kind" && matches!(e.kind, ConfigErrorKind::MissingField { .. }))
    );
}

#[test]
fn two_missing_fields_of_one_mapping_are_both_reported() {
    let text = "listeners:\n  - name: proxy\n";
    let errs = errors(text);
    let fields: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(fields, ["listeners[0].kind", "listeners[0].address"], "{errs:#?}");
}

#[test]
fn wrong_types_are_said_in_words_and_do_not_stop_the_rest() {
    let text = "listeners:
  - name: proxy
    kind: http-proxy
    address: 127.0.0.1:3128
    max_connections: many
webgroups:
  - name: w
    domains: example.com
smartgroups:
  - name: s
    cidrs: [10.0.0.0/33]
";
    let errs = errors(text);
    assert_eq!(errs.len(), 3, "{errs:#?}");
    assert_error(
        &errs[0],
        at(text, "many"),
        "listeners[0].max_connections",
        &ConfigErrorKind::WrongType {
            expected: "a whole number".into(),
            found: "`many`".into(),
        },
    );
    assert_error(
        &errs[1],
        at(text, "example.com"),
        "webgroups[0].domains",
        &ConfigErrorKind::WrongType {
            expected: "a list (`[a, b]`, or `- item` lines)".into(),
            found: "`example.com`".into(),
        },
    );
    // The validator still ran on everything else.
    assert_eq!(errs[2].path, "smartgroups[0].cidrs[0]");
    let shown = errs[0].to_string();
    assert!(!shown.contains("invalid YAML"), "{shown}");
    assert!(shown.contains("expected a whole number, found `many`"), "{shown}");
}

#[test]
fn an_element_of_the_wrong_shape_keeps_later_paths_right() {
    let text = "listeners:
  - proxy
  - {name: b, kind: http-proxy, address: nowhere}
";
    let errs = errors(text);
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["listeners[0]", "listeners[1].address"], "{errs:#?}");
    assert_eq!((errs[1].line, errs[1].column), at(text, "nowhere"));
}

#[test]
fn a_key_given_twice_is_named() {
    let text = "policy:\n  mode: watch\n  mode: enforce\n";
    let e = one_error(text);
    assert_eq!(e.kind, ConfigErrorKind::DuplicateKey { key: "mode".into() });
    assert_eq!(e.path, "policy.mode");
    assert_eq!(e.line, 3);
}

#[test]
fn yaml_syntax_error() {
    let text = "policy:\n  mode: 'enforce\n";
    let e = one_error(text);
    assert!(matches!(e.kind, ConfigErrorKind::Syntax { .. }), "{:?}", e.kind);
    assert!(e.line >= 2, "{e}");
}

/// Regression (issue 13, item 6): an unclosed `[` was reported on the
/// following line, with the position repeated and no fix.
#[test]
fn an_unclosed_bracket_is_reported_where_it_opens_with_the_fix() {
    let text = "policy:\n  rules:\n    - name: r\n      protocols: [tls, http\n      action: allow\n";
    let e = one_error(text);
    assert_eq!((e.line, e.column), at(text, "[tls"), "{e}");
    let ConfigErrorKind::Syntax { message, fix } = &e.kind else {
        panic!("{:?}", e.kind)
    };
    assert_eq!(message, "this `[` is never closed");
    assert!(fix.contains("close it with `]`"), "{fix}");
    let shown = e.to_string();
    assert!(
        !shown.contains("at line"),
        "the position is given once, as file:line:col: {shown}"
    );
    assert!(shown.starts_with("test.yaml:4:18: "), "{shown}");
}

#[test]
fn a_tab_is_called_a_tab() {
    let e = one_error("policy:\n\tmode: watch\n");
    let ConfigErrorKind::Syntax { fix, .. } = &e.kind else {
        panic!("{:?}", e.kind)
    };
    assert!(fix.contains("spaces"), "{fix}");
}

#[test]
fn a_listener_port_above_65535_is_out_of_range() {
    let text = "listeners:\n  - {name: p, kind: http-proxy, address: \"127.0.0.1:99999\"}\n";
    let e = one_error(text);
    assert_eq!(e.kind, ConfigErrorKind::PortOutOfRange { value: "99999".into() });
    assert!(e.to_string().contains("out of range"), "{e}");
    let text = "listeners:\n  - {name: t, kind: tcp, address: \"127.0.0.1:5432\", upstream: \"db:70000\"}\n";
    assert_eq!(
        one_error(text).kind,
        ConfigErrorKind::PortOutOfRange { value: "70000".into() }
    );
}

#[test]
fn a_missing_file_is_named_without_a_position() {
    let path = std::path::Path::new("/nonexistent/sluice-test/sluice.yaml");
    let e = sluice_api::config::load_file(path).unwrap_err();
    let shown = e.to_string();
    assert!(
        shown.starts_with(
            "/nonexistent/sluice-test/sluice.yaml: cannot read the file: there is no such file; check the path"
        ),
        "{shown}"
    );
    assert!(!shown.contains(":0:0"), "{shown}");
}

// ---------------------------------------------------------------- CIDRs, IPs, addresses

#[test]
fn bad_cidr_syntax() {
    let text = "smartgroups:\n  - name: office\n    cidrs: [10.0.0.0/8, 10.0.0.0/33, banana]\n";
    let errs = errors(text);
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert_error(
        &errs[0],
        at(text, "10.0.0.0/33"),
        "smartgroups[0].cidrs[1]",
        &ConfigErrorKind::InvalidCidr(CidrError::Syntax {
            value: "10.0.0.0/33".into(),
        }),
    );
    assert_error(
        &errs[1],
        at(text, "banana"),
        "smartgroups[0].cidrs[2]",
        &ConfigErrorKind::InvalidCidr(CidrError::Syntax { value: "banana".into() }),
    );
}

#[test]
fn bad_cidr_host_bits() {
    let text = "smartgroups:\n  - name: office\n    cidrs:\n      - 10.0.0.1/8\n      - \"2001:db8::1/32\"\n";
    let errs = errors(text);
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert_error(
        &errs[0],
        at(text, "10.0.0.1/8"),
        "smartgroups[0].cidrs[0]",
        &ConfigErrorKind::InvalidCidr(CidrError::HostBits {
            value: "10.0.0.1/8".into(),
            prefix: 8,
            suggestion: "10.0.0.0/8".into(),
        }),
    );
    assert_error(
        &errs[1],
        at(text, "\"2001:db8::1/32\""),
        "smartgroups[0].cidrs[1]",
        &ConfigErrorKind::InvalidCidr(CidrError::HostBits {
            value: "2001:db8::1/32".into(),
            prefix: 32,
            suggestion: "2001:db8::/32".into(),
        }),
    );
    assert!(errs[0].to_string().contains("did you mean `10.0.0.0/8`"), "{}", errs[0]);
}

#[test]
fn bad_workload_ip() {
    let text = "inventory:\n  - name: w\n    ips: [10.0.0.300]\n";
    assert_error(
        &one_error(text),
        at(text, "10.0.0.300"),
        "inventory[0].ips[0]",
        &ConfigErrorKind::InvalidIp {
            value: "10.0.0.300".into(),
        },
    );
}

#[test]
fn bad_gateway_address() {
    let text = "gateway:\n  addresses: [10.0.0.1/32]\n";
    assert_error(
        &one_error(text),
        at(text, "10.0.0.1/32"),
        "gateway.addresses[0]",
        &ConfigErrorKind::InvalidIp {
            value: "10.0.0.1/32".into(),
        },
    );
}

#[test]
fn invalid_socket_address() {
    let text = "admin:\n  address: localhost:9901\n";
    assert_error(
        &one_error(text),
        at(text, "localhost:9901"),
        "admin.address",
        &ConfigErrorKind::InvalidSocketAddress {
            value: "localhost:9901".into(),
        },
    );
    let text = "listeners:\n  - name: p\n    kind: http-proxy\n    address: 127.0.0.1\n";
    assert_error(
        &one_error(text),
        at(text, "127.0.0.1"),
        "listeners[0].address",
        &ConfigErrorKind::InvalidSocketAddress {
            value: "127.0.0.1".into(),
        },
    );
    let text = "listeners:\n  - name: p\n    kind: dns\n    address: \"::1:53\"\n";
    assert_error(
        &one_error(text),
        at(text, "\"::1:53\""),
        "listeners[0].address",
        &ConfigErrorKind::InvalidSocketAddress { value: "::1:53".into() },
    );
}

#[test]
fn two_listeners_on_one_address() {
    let text = "listeners:\n  - name: proxy\n    kind: http-proxy\n    address: 127.0.0.1:3128\n  \
                - name: sni\n    kind: sni\n    address: 127.0.0.1:3128\n";
    let e = one_error(text);
    assert_eq!((e.line, e.column), at_nth(text, "127.0.0.1:3128", 1));
    assert_eq!(e.path, "listeners[1].address");
    match &e.kind {
        ConfigErrorKind::InvalidValue { message } => {
            assert!(
                message.contains("`proxy`") && message.contains("127.0.0.1:3128"),
                "{message}"
            );
        }
        other => panic!("expected InvalidValue, got {other:?}"),
    }
    // A DNS listener takes UDP and TCP, so it collides with a TCP listener too.
    let text = "listeners:\n  - name: dns\n    kind: dns\n    address: 127.0.0.1:5353\n  \
                - name: tcp\n    kind: tcp\n    address: 127.0.0.1:5353\n";
    assert_eq!(one_error(text).path, "listeners[1].address");
    // Port 0 (pick any) never collides.
    loads(
        "listeners:\n  - {name: a, kind: http-proxy, address: 127.0.0.1:0}\n  \
         - {name: b, kind: sni, address: 127.0.0.1:0}\n",
    );
}

#[test]
fn wildcard_listener_overlaps_specific_address() {
    let text = "listeners:\n  - name: all\n    kind: transparent\n    address: 0.0.0.0:3128\n  \
                - name: local\n    kind: http-proxy\n    address: 127.0.0.1:3128\n";
    let e = one_error(text);
    assert_eq!(e.path, "listeners[1].address");
}

#[test]
fn mapped_listener_address_collides_with_ipv4() {
    let text = "listeners:\n  - name: a\n    kind: http-proxy\n    address: \"[::ffff:127.0.0.1]:3128\"\n  \
                - name: b\n    kind: sni\n    address: 127.0.0.1:3128\n";
    let e = one_error(text);
    assert_eq!(e.path, "listeners[1].address");
}

// ---------------------------------------------------------------- domain patterns

fn domain_error(pattern_yaml: &str, pattern: &str, source: DomainError) {
    let text = format!("webgroups:\n  - name: g\n    domains: [ok.example, {pattern_yaml}]\n");
    assert_error(
        &one_error(&text),
        at(&text, pattern_yaml),
        "webgroups[0].domains[1]",
        &ConfigErrorKind::InvalidDomain {
            pattern: pattern.into(),
            source,
        },
    );
}

#[test]
fn invalid_domain_misplaced_wildcard() {
    domain_error(
        "\"api.*.com\"",
        "api.*.com",
        DomainError::MisplacedWildcard {
            pattern: "api.*.com".into(),
        },
    );
    domain_error("\"**\"", "**", DomainError::MisplacedWildcard { pattern: "**".into() });
    domain_error(
        "\"*api.com\"",
        "*api.com",
        DomainError::MisplacedWildcard {
            pattern: "*api.com".into(),
        },
    );
    domain_error(
        "\"*.*.com\"",
        "*.*.com",
        DomainError::MisplacedWildcard {
            pattern: "*.*.com".into(),
        },
    );
}

#[test]
fn invalid_domain_empty_label() {
    domain_error("a..example", "a..example", DomainError::EmptyLabel);
    domain_error(".example.com", ".example.com", DomainError::EmptyLabel);
    domain_error("\"*..example.com\"", "*..example.com", DomainError::EmptyLabel);
}

#[test]
fn invalid_domain_label_too_long() {
    let label = "a".repeat(64);
    let name = format!("{label}.example.com");
    domain_error(&name, &name, DomainError::LabelTooLong { label, len: 64 });
    // 63 bytes is the limit, and fine.
    loads(&format!(
        "webgroups:\n  - name: g\n    domains: [{}.example.com]\n",
        "a".repeat(63)
    ));
}

#[test]
fn invalid_domain_name_too_long() {
    let name = format!(
        "{}.{}.{}.{}",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(62)
    );
    assert_eq!(name.len(), 254);
    domain_error(&name, &name, DomainError::NameTooLong { len: 254 });
    // 253 bytes is the limit; one trailing dot is not counted.
    let ok = format!(
        "{}.{}.{}.{}",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(61)
    );
    assert_eq!(ok.len(), 253);
    loads(&format!("webgroups:\n  - name: g\n    domains: [{ok}, {ok}.]\n"));
}

#[test]
fn invalid_domain_bad_idn() {
    let text = "webgroups:\n  - name: g\n    domains: [ok.example, xn--zz.example]\n";
    let e = one_error(text);
    assert_eq!(
        (e.line, e.column, e.path.as_str()),
        (at(text, "xn--zz").0, at(text, "xn--zz").1, "webgroups[0].domains[1]")
    );
    assert!(
        matches!(&e.kind, ConfigErrorKind::InvalidDomain { pattern, source: DomainError::InvalidIdn { .. } } if pattern == "xn--zz.example"),
        "{:?}",
        e.kind
    );
}

#[test]
fn invalid_idn_message_says_why() {
    let text = "webgroups:\n  - name: g\n    domains: [xn--zz.example]\n";
    let shown = one_error(text).to_string();
    assert!(!shown.contains("(Errors)"), "{shown}");
}

/// `_srv.example.com` is accepted (underscore labels are common in service
/// names), but the same label in front of an internationalised name is
/// rejected, because any IDN/ACE label sends the whole name through strict
/// (STD3) IDNA. An SNI like `_acme.xn--bcher-kva.example` cannot be parsed
/// for the same reason.
#[test]
fn underscore_label_with_idn_suffix() {
    loads(
        "webgroups:\n  - name: g\n    domains: [_srv.example.com, _srv.xn--bcher-kva.example, \"_srv.bücher.example\"]\n",
    );
}

#[test]
fn invalid_domain_bad_character() {
    domain_error("\"exa mple.com\"", "exa mple.com", DomainError::InvalidChar { ch: ' ' });
}

#[test]
fn valid_domain_patterns_load() {
    loads(
        "webgroups:\n  - name: g\n    domains: [\"*\", \"*.example.com\", EXAMPLE.com., bücher.example, \
         \"*.xn--caf-dma.example\", _srv.example.com]\n",
    );
}

// ---------------------------------------------------------------- references

#[test]
fn unknown_smartgroup_in_from_with_suggestion() {
    let text = "smartgroups:\n  - name: agents\n    cidrs: [10.0.0.0/8]\npolicy:\n  rules:\n    - name: r\n      \
                from: [agnets]\n      action: allow\n";
    assert_error(
        &one_error(text),
        at(text, "agnets"),
        "policy.rules[0].from[0]",
        &ConfigErrorKind::UnknownGroup {
            kind: GroupKind::SmartGroup,
            name: "agnets".into(),
            suggestion: Some("agents".into()),
        },
    );
}

#[test]
fn unknown_webgroup_in_to_with_suggestion() {
    let text = "policy:\n  rules:\n    - name: r\n      to: {webgroups: [llm-provider]}\n      action: allow\n";
    let e = one_error(text);
    assert_error(
        &e,
        at(text, "llm-provider"),
        "policy.rules[0].to.webgroups[0]",
        &ConfigErrorKind::UnknownGroup {
            kind: GroupKind::WebGroup,
            name: "llm-provider".into(),
            suggestion: Some("llm-providers".into()),
        },
    );
    assert!(e.to_string().contains("did you mean `llm-providers`"), "{e}");
}

#[test]
fn unknown_smartgroup_in_to() {
    let text = "policy:\n  rules:\n    - name: r\n      to:\n        smartgroups: [loopbak]\n      action: allow\n";
    assert_error(
        &one_error(text),
        at(text, "loopbak"),
        "policy.rules[0].to.smartgroups[0]",
        &ConfigErrorKind::UnknownGroup {
            kind: GroupKind::SmartGroup,
            name: "loopbak".into(),
            suggestion: Some("loopback".into()),
        },
    );
}

#[test]
fn unknown_group_without_plausible_suggestion() {
    let text = "policy:\n  rules:\n    - name: r\n      to: {webgroups: [zzzzzzzzzz]}\n      action: allow\n";
    let e = one_error(text);
    assert!(
        matches!(&e.kind, ConfigErrorKind::UnknownGroup { suggestion: None, .. }),
        "{:?}",
        e.kind
    );
}

#[test]
fn unknown_include() {
    let text = "webgroups:\n  - name: a\n    include: [package-registry]\nsmartgroups:\n  - name: s\n    \
                include: [privat-ranges]\n";
    let errs = errors(text);
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert_error(
        &errs[0],
        at(text, "package-registry]"),
        "webgroups[0].include[0]",
        &ConfigErrorKind::UnknownGroup {
            kind: GroupKind::WebGroup,
            name: "package-registry".into(),
            suggestion: Some("package-registries".into()),
        },
    );
    assert_error(
        &errs[1],
        at(text, "privat-ranges"),
        "smartgroups[0].include[0]",
        &ConfigErrorKind::UnknownGroup {
            kind: GroupKind::SmartGroup,
            name: "privat-ranges".into(),
            suggestion: Some("private-ranges".into()),
        },
    );
}

#[test]
fn unknown_workload_with_suggestion() {
    let text = "inventory:\n  - name: trainer-1\n    ips: [10.0.0.1]\nsmartgroups:\n  - name: s\n    \
                workloads: [trainer-l]\n";
    assert_error(
        &one_error(text),
        at(text, "trainer-l]"),
        "smartgroups[0].workloads[0]",
        &ConfigErrorKind::UnknownWorkload {
            name: "trainer-l".into(),
            suggestion: Some("trainer-1".into()),
        },
    );
}

// ---------------------------------------------------------------- names

fn duplicate(text: &str, kind: NameKind, name: &str, path: &str) {
    let needle = format!("name: {name}\n");
    let first = at_nth(text, &needle, 0);
    let second = at_nth(text, &needle, 1);
    // The position is the value, after `name: `.
    let second = (second.0, second.1 + "name: ".len() as u32);
    assert_error(
        &one_error(text),
        second,
        path,
        &ConfigErrorKind::DuplicateName {
            kind,
            name: name.into(),
            first_line: first.0,
        },
    );
}

#[test]
fn duplicate_listener() {
    duplicate(
        "listeners:\n  - name: proxy\n    kind: http-proxy\n    address: 127.0.0.1:3128\n  - name: proxy\n    \
         kind: sni\n    address: 127.0.0.1:8443\n",
        NameKind::Listener,
        "proxy",
        "listeners[1].name",
    );
}

#[test]
fn duplicate_webgroup() {
    duplicate(
        "webgroups:\n  - name: ai\n    domains: [a.example]\n  - name: ai\n    domains: [b.example]\n",
        NameKind::WebGroup,
        "ai",
        "webgroups[1].name",
    );
}

#[test]
fn duplicate_smartgroup() {
    duplicate(
        "smartgroups:\n  - name: dev\n    cidrs: [10.0.0.0/8]\n  - name: dev\n    cidrs: [10.1.0.0/16]\n",
        NameKind::SmartGroup,
        "dev",
        "smartgroups[1].name",
    );
}

#[test]
fn duplicate_workload() {
    duplicate(
        "inventory:\n  - name: w1\n    ips: [10.0.0.1]\n  - name: w1\n    ips: [10.0.0.2]\n",
        NameKind::Workload,
        "w1",
        "inventory[1].name",
    );
}

#[test]
fn duplicate_rule() {
    duplicate(
        "policy:\n  rules:\n    - name: r\n      action: allow\n    - name: r\n      action: deny\n",
        NameKind::Rule,
        "r",
        "policy.rules[1].name",
    );
}

#[test]
fn duplicate_plugin() {
    duplicate(
        "plugins:\n  - name: p\n    path: a.wasm\n  - name: p\n    path: b.wasm\n",
        NameKind::Plugin,
        "p",
        "plugins[1].name",
    );
}

#[test]
fn same_name_as_builtin_extends_it() {
    loads("webgroups:\n  - name: llm-providers\n    domains: [llm.internal.example]\n");
    loads("smartgroups:\n  - name: private-ranges\n    cidrs: [198.18.0.0/15]\n");
}

#[test]
fn builtin_any_cannot_be_extended() {
    let text = "smartgroups:\n  - name: any\n    cidrs: [10.0.0.0/8]\n";
    let e = one_error(text);
    assert_eq!((e.line, e.column), at(text, "any"));
    assert_eq!(e.path, "smartgroups[0].name");
    assert!(
        matches!(&e.kind, ConfigErrorKind::BuiltinNotExtensible { kind: GroupKind::SmartGroup, name, .. } if name == "any"),
        "{:?}",
        e.kind
    );
}

#[test]
fn invalid_name() {
    let text = "webgroups:\n  - name: -ai\n    domains: [a.example]\n";
    assert_error(
        &one_error(text),
        at(text, "-ai"),
        "webgroups[0].name",
        &ConfigErrorKind::InvalidName { name: "-ai".into() },
    );
}

// ---------------------------------------------------------------- ports

fn port_error(port_yaml: &str, kind: ConfigErrorKind) {
    let text = format!("policy:\n  rules:\n    - name: r\n      ports: [443, {port_yaml}]\n      action: allow\n");
    assert_error(
        &one_error(&text),
        at(&text, port_yaml),
        "policy.rules[0].ports[1]",
        &kind,
    );
}

#[test]
fn port_zero() {
    port_error("0", ConfigErrorKind::PortOutOfRange { value: "0".into() });
}

#[test]
fn port_too_large() {
    port_error("70000", ConfigErrorKind::PortOutOfRange { value: "70000".into() });
    port_error(
        "\"8000-70000\"",
        ConfigErrorKind::PortOutOfRange { value: "70000".into() },
    );
    port_error("65536", ConfigErrorKind::PortOutOfRange { value: "65536".into() });
}

#[test]
fn port_negative() {
    port_error("-1", ConfigErrorKind::PortOutOfRange { value: "-1".into() });
}

#[test]
fn port_range_reversed() {
    port_error(
        "\"9-3\"",
        ConfigErrorKind::ReversedPortRange {
            value: "9-3".into(),
            fixed: "3-9".into(),
        },
    );
}

#[test]
fn port_not_a_number() {
    port_error("\"abc\"", ConfigErrorKind::InvalidPortRange { value: "abc".into() });
    port_error("\"80-\"", ConfigErrorKind::InvalidPortRange { value: "80-".into() });
}

#[test]
fn port_edges_load() {
    loads(
        "policy:\n  rules:\n    - name: r\n      ports: [1, 65535, \"1-65535\", \"443\", \"8080-8080\"]\n      action: allow\n",
    );
}

// ---------------------------------------------------------------- groups

#[test]
fn include_cycle() {
    let text = "webgroups:\n  - name: a\n    include: [b]\n  - name: b\n    include: [c]\n  - name: c\n    \
                include: [a]\n";
    let e = one_error(text);
    assert_eq!(
        e.kind,
        ConfigErrorKind::IncludeCycle {
            kind: GroupKind::WebGroup,
            cycle: vec!["a".into(), "b".into(), "c".into(), "a".into()],
        }
    );
    assert_eq!(e.line, at(text, "name: a").0, "{e}");
    assert_eq!(e.path, "webgroups");
}

#[test]
fn include_self_cycle_smartgroup() {
    let text = "smartgroups:\n  - name: ok\n    cidrs: [10.0.0.0/8]\n  - name: loop\n    include: [ok, loop]\n";
    let e = one_error(text);
    assert_eq!(
        e.kind,
        ConfigErrorKind::IncludeCycle {
            kind: GroupKind::SmartGroup,
            cycle: vec!["loop".into(), "loop".into()]
        }
    );
    assert_eq!(e.line, at(text, "name: loop").0, "{e}");
    assert_eq!(e.path, "smartgroups");
}

#[test]
fn empty_selector() {
    let text = "smartgroups:\n  - name: everyone\n    selectors: [{app: web}, {}]\n";
    assert_error(
        &one_error(text),
        at(text, "{}"),
        "smartgroups[0].selectors[1]",
        &ConfigErrorKind::EmptySelector,
    );
}

// ---------------------------------------------------------------- plugins, audit

#[test]
fn bad_sha256() {
    let text = "plugins:\n  - name: p\n    path: p.wasm\n    sha256: abc123\n";
    assert_error(
        &one_error(text),
        at(text, "abc123"),
        "plugins[0].sha256",
        &ConfigErrorKind::InvalidSha256 { value: "abc123".into() },
    );
    let bad = "g".repeat(64);
    let text = format!("plugins:\n  - name: p\n    path: p.wasm\n    sha256: {bad}\n");
    assert_error(
        &one_error(&text),
        at(&text, &bad),
        "plugins[0].sha256",
        &ConfigErrorKind::InvalidSha256 { value: bad },
    );
    loads(&format!(
        "plugins:\n  - name: p\n    path: p.wasm\n    sha256: {}\n",
        "aB".repeat(32)
    ));
}

#[test]
fn empty_plugin_path_and_audit_queue() {
    let text = "plugins:\n  - name: p\n    path: \"\"\naudit:\n  destination: stdout\n  queue: 0\n";
    let errs = errors(text);
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert_eq!(
        (errs[0].path.as_str(), (errs[0].line, errs[0].column)),
        ("plugins[0].path", at(text, "\"\""))
    );
    assert_eq!(
        (errs[1].path.as_str(), (errs[1].line, errs[1].column)),
        ("audit.queue", at(text, "0\n"))
    );
    assert!(
        errs.iter()
            .all(|e| matches!(e.kind, ConfigErrorKind::InvalidValue { .. }))
    );
}

// ---------------------------------------------------------------- many errors, display

#[test]
fn all_errors_reported_in_file_order() {
    // Sections in an order unlike the validator's, with errors in each.
    let text = "\
policy:
  rules:
    - name: r1
      from: [nobody]
      ports: [0]
      action: allow
    - name: r1
      action: deny
smartgroups:
  - name: s
    cidrs: [10.0.0.1/8]
webgroups:
  - name: w
    domains: [\"api.*.com\"]
admin:
  address: nowhere
";
    let errs = errors(text);
    let got: Vec<(u32, u32, &str)> = errs.iter().map(|e| (e.line, e.column, e.path.as_str())).collect();
    let want = vec![
        (at(text, "nobody").0, at(text, "nobody").1, "policy.rules[0].from[0]"),
        (at(text, "[0]").0, at(text, "[0]").1 + 1, "policy.rules[0].ports[0]"),
        (at_nth(text, "r1", 1).0, at_nth(text, "r1", 1).1, "policy.rules[1].name"),
        (
            at(text, "10.0.0.1/8").0,
            at(text, "10.0.0.1/8").1,
            "smartgroups[0].cidrs[0]",
        ),
        (
            at(text, "\"api.*.com\"").0,
            at(text, "\"api.*.com\"").1,
            "webgroups[0].domains[0]",
        ),
        (at(text, "nowhere").0, at(text, "nowhere").1, "admin.address"),
    ];
    assert_eq!(got, want, "{errs:#?}");
    let all = sluice_api::ConfigErrors(errs).to_string();
    assert!(all.ends_with("6 errors in configuration"), "{all}");
}

#[test]
fn display_names_file_line_column_and_path() {
    let text = "smartgroups:\n  - name: office\n    cidrs: [10.0.0.1/8]\n";
    let e = one_error(text);
    let (line, col) = at(text, "10.0.0.1/8");
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!("{FILE}:{line}:{col}: smartgroups[0].cidrs[0]: ")),
        "{shown}"
    );
    assert!(shown.contains("10.0.0.0/8"), "the fix is in the message: {shown}");
}

#[test]
fn empty_file_is_an_empty_config() {
    loads("");
    loads("# only a comment\n");
}

/// The DNS listener's upstream socket pool settings: bounded, DNS-only,
/// positioned, and carried into the model.
#[test]
fn dns_upstream_socket_pool_settings() {
    let dns = |opts: &str| format!("listeners:\n  - name: dns\n    kind: dns\n    address: 127.0.0.1:5353\n{opts}");
    let text = dns("    upstream_sockets: 0\n");
    let e = one_error(&text);
    assert_eq!((e.line, e.column), at(&text, "0\n"));
    assert_eq!(e.path, "listeners[0].upstream_sockets");
    assert!(matches!(e.kind, ConfigErrorKind::InvalidValue { .. }), "{e}");
    let text = dns("    upstream_socket_max_queries: 2000000\n");
    assert_eq!(one_error(&text).path, "listeners[0].upstream_socket_max_queries");
    let text = dns("    upstream_socket_max_age: 2h\n");
    let e = one_error(&text);
    assert_eq!(e.path, "listeners[0].upstream_socket_max_age");
    assert!(e.to_string().contains("at most 1h"), "{e}");
    // Only DNS listeners have upstream sockets.
    let text = "listeners:\n  - name: p\n    kind: http-proxy\n    address: 127.0.0.1:3128\n    upstream_sockets: 8\n";
    let e = one_error(text);
    assert_eq!(e.path, "listeners[0].upstream_sockets");
    assert!(e.to_string().contains("only to `dns` listeners"), "{e}");

    let cfg = load_str(
        &dns("    upstream_sockets: 64\n    upstream_socket_max_queries: 100\n    upstream_socket_max_age: 2s\n"),
        FILE,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let sluice_api::ListenerKind::Dns(d) = &cfg.listeners[0].kind else {
        panic!("no dns options")
    };
    assert_eq!(d.upstream_sockets, 64);
    assert_eq!(d.upstream_socket_max_queries, 100);
    assert_eq!(d.upstream_socket_max_age, std::time::Duration::from_secs(2));
    let cfg = load_str(&dns(""), FILE).unwrap_or_else(|e| panic!("{e}"));
    let sluice_api::ListenerKind::Dns(d) = &cfg.listeners[0].kind else {
        panic!("no dns options")
    };
    assert_eq!(
        (
            d.upstream_sockets,
            d.upstream_socket_max_queries,
            d.upstream_socket_max_age
        ),
        (16, 1_024, std::time::Duration::from_secs(10))
    );
}

// ---------------------------------------------------------------- robustness

/// Damaged versions of every shipped configuration (bytes replaced,
/// deleted, lines duplicated or swapped) load or fail with located errors,
/// never panic, and the YAML layer's re-reads stay bounded. What the
/// `config` fuzz target checks, run on stable in CI.
mod damaged {
    use proptest::prelude::*;

    fn shipped() -> Vec<String> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut out = vec![sluice_api::config::EMBEDDED_DEFAULT.to_owned()];
        for ex in ["quickstart", "ai-egress", "east-west"] {
            out.push(std::fs::read_to_string(root.join("examples").join(ex).join("sluice.yaml")).unwrap());
        }
        out
    }

    #[derive(Debug, Clone)]
    enum Damage {
        Replace(usize, u8),
        Delete(usize, usize),
        DuplicateLine(usize),
        SwapLines(usize, usize),
        Insert(usize, &'static str),
    }

    fn damage() -> impl Strategy<Value = Damage> {
        prop_oneof![
            (
                any::<usize>(),
                prop::sample::select(b" :-[]{}\t\n#'\"&*!|>,x0".to_vec())
            )
                .prop_map(|(i, b)| Damage::Replace(i, b)),
            (any::<usize>(), 1usize..20).prop_map(|(i, n)| Damage::Delete(i, n)),
            any::<usize>().prop_map(Damage::DuplicateLine),
            (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Damage::SwapLines(a, b)),
            (
                any::<usize>(),
                prop::sample::select(vec!["bogus: 1\n", "  - 5\n", "[", "{x: ", "kind: nope\n", ": :\n"])
            )
                .prop_map(|(i, s)| Damage::Insert(i, s)),
        ]
    }

    fn apply(text: &str, damages: &[Damage]) -> String {
        let mut t = text.as_bytes().to_vec();
        for d in damages {
            match *d {
                Damage::Replace(i, b) if !t.is_empty() => {
                    let i = i % t.len();
                    t[i] = b;
                }
                Damage::Delete(i, n) if !t.is_empty() => {
                    let i = i % t.len();
                    t.drain(i..(i + n).min(t.len()));
                }
                Damage::Insert(i, s) => {
                    let i = i % (t.len() + 1);
                    t.splice(i..i, s.bytes());
                }
                Damage::DuplicateLine(i) | Damage::SwapLines(i, _) => {
                    let mut lines: Vec<Vec<u8>> = t.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect();
                    let a = i % lines.len();
                    match *d {
                        Damage::SwapLines(_, j) => {
                            let b = j % lines.len();
                            lines.swap(a, b);
                        }
                        _ => {
                            let l = lines[a].clone();
                            lines.insert(a, l);
                        }
                    }
                    t = lines.join(&b'\n');
                }
                _ => {}
            }
        }
        String::from_utf8_lossy(&t).into_owned()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        #[test]
        fn damaged_configs_load_or_fail_with_located_errors(which in 0usize..4, damages in prop::collection::vec(damage(), 1..6)) {
            let text = apply(&shipped()[which], &damages);
            match sluice_api::config::load_str(&text, "damaged.yaml") {
                Ok(_) => {}
                Err(e) => {
                    prop_assert!(!e.0.is_empty());
                    prop_assert!(e.0.len() <= 200, "{} errors", e.0.len());
                    for err in &e.0 {
                        prop_assert_eq!(&err.file, "damaged.yaml");
                        prop_assert!(err.line > 0, "an error without a position: {}", err);
                    }
                }
            }
        }
    }
}

/// Each listener kind carries its own options: one written on another kind
/// is reported where it stands, with the kinds it applies to.
#[test]
fn an_option_of_another_listener_kind_is_an_error_at_its_position() {
    let cases = [
        (
            "tcp",
            "peek_timeout: 2s",
            "`peek_timeout` does not apply to a `tcp` listener (only to: http-proxy, transparent, sni, quic)",
        ),
        (
            "dns",
            "max_connections: 5",
            "`max_connections` does not apply to a `dns` listener (only to: http-proxy, transparent, sni, tcp, quic)",
        ),
        (
            "dns",
            "idle_timeout: 5s",
            "`idle_timeout` does not apply to a `dns` listener",
        ),
        (
            "sni",
            "sni_check: off",
            "`sni_check` does not apply to a `sni` listener (only to: transparent, quic)",
        ),
        (
            "transparent",
            "upstream: \"db:5432\"",
            "`upstream` does not apply to a `transparent` listener (only to: tcp)",
        ),
        (
            "http-proxy",
            "upstream_port: 443",
            "`upstream_port` does not apply to a `http-proxy` listener (only to: sni, quic)",
        ),
        (
            "quic",
            "connect_timeout: 1s",
            "`connect_timeout` does not apply to a `quic` listener (only to: http-proxy, transparent, sni, tcp)",
        ),
        (
            "sni",
            "quic: block",
            "`quic` does not apply to a `sni` listener (only to: quic)",
        ),
    ];
    for (kind, option, message) in cases {
        let text = format!("listeners:\n  - name: l\n    kind: {kind}\n    address: 127.0.0.1:3128\n    {option}\n");
        let e = one_error(&text);
        let field = option.split(':').next().unwrap_or_default();
        assert_eq!(e.path, format!("listeners[0].{field}"), "{e}");
        // At the value, as for every value error.
        assert_eq!((e.line, e.column), (5, 5 + field.len() as u32 + 2), "{e}");
        assert!(e.to_string().contains(message), "{e}");
    }
    // An unbracketed IPv6 upstream is ambiguous: refused with the spelling
    // that works.
    let e = one_error("listeners:\n  - {name: l, kind: tcp, address: 127.0.0.1:5432, upstream: \"fd00::5:5432\"}\n");
    assert_eq!(e.path, "listeners[0].upstream");
    assert!(e.to_string().contains("[fd00::5]:5432"), "{e}");
}
