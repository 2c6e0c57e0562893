//! [`Decisions`] lowered to Envoy's unified matcher
//! (`xds.type.matcher.v3.Matcher`): an ordered `matcher_list` whose
//! actions are `envoy.config.rbac.v3.Action`s, for the RBAC network
//! filter's `matcher` and `shadow_matcher`.
//!
//! Inputs are the network ones (`source_ip`, `destination_ip`,
//! `destination_port`, `server_name`); addresses are matched with the
//! `envoy.matching.matchers.ip` trie, names with case-insensitive string
//! matchers.

use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::rbac::v3 as rbac;
use envoy_types::pb::envoy::extensions::matching::common_inputs::network::v3 as inputs;
use envoy_types::pb::envoy::extensions::matching::input_matchers::ip::v3::Ip;
use envoy_types::pb::google::protobuf::UInt32Value;
use envoy_types::pb::xds::core::v3::TypedExtensionConfig;
use envoy_types::pb::xds::r#type::matcher::v3::matcher::matcher_list::predicate::{
    MatchType, PredicateList, SinglePredicate, single_predicate,
};
use envoy_types::pb::xds::r#type::matcher::v3::matcher::matcher_list::{FieldMatcher, Predicate};
use envoy_types::pb::xds::r#type::matcher::v3::matcher::{MatcherList, MatcherType, OnMatch, on_match};
use envoy_types::pb::xds::r#type::matcher::v3::{Matcher, RegexMatcher, StringMatcher, string_matcher};
use ipnet::IpNet;
use sluice_api::{Action, DomainPattern, PortRange};

use super::policy::{Cond, Decisions, Verdict, port_blocks};
use prost::{Message, Name};

use super::pack;

/// Which of the two matchers is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `matcher`: what is carried out. A watched deny lets the flow
    /// through, flagged (`LOG`).
    Enforce,
    /// `shadow_matcher`: every verdict as decided, watched or not; Envoy
    /// counts it (`shadow_allowed` / `shadow_denied`) and records the rule
    /// in the `shadow_effective_policy_id` metadata.
    Shadow,
}

/// The matcher for `d` in `role`.
pub fn lower(d: &Decisions, role: Role) -> Matcher {
    let matchers = d
        .entries
        .iter()
        .map(|e| FieldMatcher {
            predicate: Some(predicate(&e.cond)),
            on_match: Some(action(&e.verdict, role)),
        })
        .collect::<Vec<_>>();
    Matcher {
        on_no_match: Some(Box::new(action(&d.otherwise, role))),
        matcher_type: (!matchers.is_empty()).then_some(MatcherType::MatcherList(MatcherList { matchers })),
    }
}

/// An extension as the xDS matcher types carry it (`xds.core.v3`, not
/// Envoy's `envoy.config.core.v3` of the same shape).
fn ext<M: Message + Name>(name: &str, m: &M) -> TypedExtensionConfig {
    TypedExtensionConfig {
        name: name.to_owned(),
        typed_config: Some(pack(m)),
    }
}

fn action(v: &Verdict, role: Role) -> OnMatch {
    let a = match (v.action, v.watched, role) {
        (Action::Allow, _, _) => rbac::rbac::Action::Allow,
        (Action::Deny, true, Role::Enforce) => rbac::rbac::Action::Log,
        (Action::Deny, _, _) => rbac::rbac::Action::Deny,
    };
    OnMatch {
        keep_matching: false,
        on_match: Some(on_match::OnMatch::Action(ext(
            &v.name,
            &rbac::Action {
                name: v.name.clone(),
                action: a as i32,
            },
        ))),
    }
}

fn predicate(c: &Cond) -> Predicate {
    let m = match c {
        Cond::Source(nets) => single(
            "envoy.matching.inputs.source_ip",
            pack(&inputs::SourceIpInput {}),
            ip_matcher("source", nets),
        ),
        Cond::Destination(nets) => single(
            "envoy.matching.inputs.destination_ip",
            pack(&inputs::DestinationIpInput {}),
            ip_matcher("destination", nets),
        ),
        Cond::Port(ranges) => return any_of(ranges.iter().flat_map(|r| port(*r)).collect()),
        Cond::Name(patterns) => return any_of(patterns.iter().flat_map(name).collect()),
        Cond::HasName => server_name(regex(".+")),
        Cond::Not(inner) => MatchType::NotMatcher(Box::new(predicate(inner))),
        Cond::All(parts) if parts.is_empty() => return always(),
        Cond::All(parts) => return all_of(parts.iter().map(predicate).collect()),
        Cond::AnyOf(parts) => return any_of(parts.iter().map(predicate).collect()),
    };
    Predicate { match_type: Some(m) }
}

/// A predicate that holds for every connection: the source address is an
/// address. (A matcher list entry needs a predicate; a rule that takes
/// any flow still has to sit at its place in the order.)
fn always() -> Predicate {
    let all = ["0.0.0.0/0", "::/0"]
        .iter()
        .filter_map(|n| n.parse().ok())
        .collect::<Vec<IpNet>>();
    Predicate {
        match_type: Some(single(
            "envoy.matching.inputs.source_ip",
            pack(&inputs::SourceIpInput {}),
            ip_matcher("any", &all),
        )),
    }
}

/// `or_matcher` needs at least two predicates; one is used as it is.
fn any_of(mut v: Vec<Predicate>) -> Predicate {
    if v.len() == 1
        && let Some(p) = v.pop()
    {
        return p;
    }
    Predicate {
        match_type: Some(MatchType::OrMatcher(PredicateList { predicate: v })),
    }
}

fn all_of(mut v: Vec<Predicate>) -> Predicate {
    if v.len() == 1
        && let Some(p) = v.pop()
    {
        return p;
    }
    Predicate {
        match_type: Some(MatchType::AndMatcher(PredicateList { predicate: v })),
    }
}

fn single(input: &str, typed: envoy_types::pb::google::protobuf::Any, m: single_predicate::Matcher) -> MatchType {
    MatchType::SinglePredicate(SinglePredicate {
        input: Some(TypedExtensionConfig {
            name: input.to_owned(),
            typed_config: Some(typed),
        }),
        matcher: Some(m),
    })
}

fn ip_matcher(stat: &str, nets: &[IpNet]) -> single_predicate::Matcher {
    single_predicate::Matcher::CustomMatch(ext(
        "envoy.matching.matchers.ip",
        &Ip {
            cidr_ranges: nets.iter().flat_map(with_mapped).map(|n| cidr(&n)).collect(),
            stat_prefix: format!("sluice_{stat}_ip"),
        },
    ))
}

/// An IPv4 network and the same as IPv4-mapped IPv6 (`::ffff:10.0.0.0/104`):
/// a dual-stack listener sees IPv4 clients that way, and Sluice treats
/// them as the IPv4 address they map.
fn with_mapped(n: &IpNet) -> Vec<IpNet> {
    match n {
        IpNet::V4(v4) => {
            let mapped = ipnet::Ipv6Net::new(v4.network().to_ipv6_mapped(), v4.prefix_len() + 96)
                .map(IpNet::V6)
                .ok();
            std::iter::once(*n).chain(mapped).collect()
        }
        IpNet::V6(_) => vec![*n],
    }
}

fn cidr(n: &IpNet) -> CidrRange {
    CidrRange {
        address_prefix: n.network().to_string(),
        prefix_len: Some(UInt32Value {
            value: u32::from(n.prefix_len()),
        }),
    }
}

fn string(pattern: string_matcher::MatchPattern) -> StringMatcher {
    StringMatcher {
        ignore_case: true,
        match_pattern: Some(pattern),
    }
}

/// A regex; Envoy refuses `ignore_case` on one (the regexes here are
/// digits or `.+`, where case does not matter).
fn regex(r: &str) -> StringMatcher {
    StringMatcher {
        ignore_case: false,
        ..string(string_matcher::MatchPattern::SafeRegex(RegexMatcher {
            regex: r.to_owned(),
            engine_type: Some(
                envoy_types::pb::xds::r#type::matcher::v3::regex_matcher::EngineType::GoogleRe2(
                    envoy_types::pb::xds::r#type::matcher::v3::regex_matcher::GoogleRe2 {},
                ),
            ),
        }))
    }
}

fn server_name(m: StringMatcher) -> MatchType {
    single(
        "envoy.matching.inputs.server_name",
        pack(&inputs::ServerNameInput {}),
        single_predicate::Matcher::ValueMatch(m),
    )
}

/// A pattern as the SNI matchers that mean it. Sluice ignores one
/// trailing dot, so each is matched with and without it: otherwise a
/// `deny` for `x.example` would miss `x.example.` and let a later `allow`
/// take it.
fn name(p: &DomainPattern) -> Vec<Predicate> {
    use string_matcher::MatchPattern::{Exact, Suffix};
    let ms = match p {
        DomainPattern::Any => vec![regex(".+")],
        DomainPattern::Exact(n) => vec![string(Exact(n.to_string())), string(Exact(format!("{n}.")))],
        // `*.x` is any name under x, never x itself: the suffix `.x`.
        DomainPattern::Subdomains(n) => vec![string(Suffix(format!(".{n}"))), string(Suffix(format!(".{n}.")))],
    };
    ms.into_iter()
        .map(|m| Predicate {
            match_type: Some(server_name(m)),
        })
        .collect()
}

/// A port range as exact matches, or decimal blocks as small regexes
/// (`8\d{3}` for 8000-8999) on the `destination_port` input.
fn port(r: PortRange) -> Vec<Predicate> {
    let m = |s: StringMatcher| Predicate {
        match_type: Some(single(
            "envoy.matching.inputs.destination_port",
            pack(&inputs::DestinationPortInput {}),
            single_predicate::Matcher::ValueMatch(s),
        )),
    };
    if r.lo == r.hi {
        return vec![m(string(string_matcher::MatchPattern::Exact(r.lo.to_string())))];
    }
    port_blocks(r)
        .into_iter()
        .map(|(prefix, free)| {
            if free == 0 {
                m(string(string_matcher::MatchPattern::Exact(prefix.to_string())))
            } else {
                m(regex(&format!("{prefix}[0-9]{{{free}}}")))
            }
        })
        .collect()
}
