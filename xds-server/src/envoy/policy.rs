//! Sluice's policy, for one listener, as an ordered list of conditions and
//! verdicts: the shape of an RBAC `matcher_list` (first match wins), kept
//! as plain data so it can be checked without Envoy and lowered to
//! protobuf in one place ([`super::matcher`]).
//!
//! The order is the proxy's (`proxy/src/policy/mod.rs`): the rules, first
//! match wins, then the default; over both the built-in guard, which
//! denies a guarded destination unless the rule that decided is an `allow`
//! rule naming that group. Envoy has no "guard after the rule" step, so
//! each rule becomes up to three entries, in this order: the rule's flows
//! whose name is a metadata-service name (denied unless the rule lifts
//! that guard), its flows to each guarded address group (transparent
//! listeners, where the destination address is known before the
//! decision), and then the rule's own verdict.

use std::collections::BTreeSet;

use ipnet::IpNet;
use sluice_api::{Action, Config, DomainPattern, ListenerKind, Mode, PolicyConfig, PortRange, Protocol, Rule, builtin};

use super::TranslateError;

/// What a condition reads of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    /// The client's address is in one of these.
    Source(Vec<IpNet>),
    /// The address the client dialled (after `REDIRECT`) is in one of these.
    Destination(Vec<IpNet>),
    /// The port the client dialled is in one of these.
    Port(Vec<PortRange>),
    /// The SNI matches one of these.
    Name(Vec<DomainPattern>),
    /// The ClientHello carries an SNI.
    HasName,
    Not(Box<Cond>),
    All(Vec<Cond>),
    AnyOf(Vec<Cond>),
}

/// Which kind of flow a filter chain carries: what the policy is asked
/// with (`protocol`) and whether a name can be known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowKind {
    /// A TLS ClientHello (`transport_protocol: tls`).
    Tls,
    /// Anything else, judged as opaque `tcp`.
    Opaque,
}

/// The outcome of one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The rule's name, `default`, `no-sni`, or `guard:<group>`.
    pub name: String,
    pub action: Action,
    /// Recorded only (policy `mode: watch`, or a rule with `watch: true`).
    pub watched: bool,
}

/// One entry: when `cond` holds, `verdict` decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub cond: Cond,
    pub verdict: Verdict,
}

/// A listener's policy: entries in order, then what decides when none
/// matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decisions {
    pub entries: Vec<Entry>,
    pub otherwise: Verdict,
}

impl Decisions {
    /// Whether any verdict is only watched: then the enforcing matcher and
    /// the shadow one differ.
    pub fn watches(&self) -> bool {
        self.otherwise.watched || self.entries.iter().any(|e| e.verdict.watched)
    }
}

/// The built-in address guards in the proxy's order (most specific
/// first), with `private-ranges` when the policy asks for it.
pub fn guarded_groups(policy: &PolicyConfig) -> Vec<&'static str> {
    let mut g = vec![
        builtin::CLOUD_METADATA,
        builtin::GATEWAY,
        builtin::LOOPBACK,
        builtin::LINK_LOCAL,
    ];
    if policy.guard_private_ranges {
        g.push(builtin::PRIVATE_RANGES);
    }
    g
}

/// Resolves group names to what Envoy can match on.
#[derive(Debug, Clone, Copy)]
pub struct Groups<'a> {
    config: &'a Config,
}

impl<'a> Groups<'a> {
    pub fn new(config: &'a Config) -> Self {
        Self { config }
    }

    /// Every address of a SmartGroup: its CIDRs, its workloads' addresses
    /// (by name and by selector), and the same of every group it includes.
    pub fn addresses(&self, name: &str) -> Result<Vec<IpNet>, TranslateError> {
        let mut out = BTreeSet::new();
        let mut seen = BTreeSet::new();
        let mut todo = vec![name.to_owned()];
        while let Some(n) = todo.pop() {
            if !seen.insert(n.clone()) {
                continue;
            }
            let g = self
                .config
                .smartgroup(&n)
                .ok_or_else(|| TranslateError::UnknownSmartGroup { name: n.clone() })?;
            out.extend(g.cidrs.iter().copied().map(|c| c.trunc()));
            for w in sluice_api::config::selected_workloads(g, &self.config.inventory) {
                out.extend(w.ips.iter().map(|ip| IpNet::from(sluice_api::net::canonical_ip(*ip))));
            }
            todo.extend(g.includes.iter().cloned());
        }
        Ok(IpNet::aggregate(&out.into_iter().collect()))
    }

    /// The union of [`Self::addresses`] over `names`.
    pub fn addresses_of(&self, names: &[String]) -> Result<Vec<IpNet>, TranslateError> {
        let mut all = Vec::new();
        for n in names {
            all.extend(self.addresses(n)?);
        }
        Ok(IpNet::aggregate(&all))
    }

    /// Every pattern of a WebGroup and of the groups it includes, sorted,
    /// without repeats.
    pub fn patterns(&self, name: &str) -> Result<Vec<DomainPattern>, TranslateError> {
        let mut out = BTreeSet::new();
        let mut seen = BTreeSet::new();
        let mut todo = vec![name.to_owned()];
        while let Some(n) = todo.pop() {
            if !seen.insert(n.clone()) {
                continue;
            }
            let g = self
                .config
                .webgroup(&n)
                .ok_or_else(|| TranslateError::UnknownWebGroup { name: n.clone() })?;
            out.extend(g.patterns.iter().cloned());
            todo.extend(g.includes.iter().cloned());
        }
        // `*` covers every other pattern.
        if out.contains(&DomainPattern::Any) {
            return Ok(vec![DomainPattern::Any]);
        }
        Ok(out.into_iter().collect())
    }

    /// The union of [`Self::patterns`] over `names`.
    pub fn patterns_of(&self, names: &[String]) -> Result<Vec<DomainPattern>, TranslateError> {
        let mut all = BTreeSet::new();
        for n in names {
            all.extend(self.patterns(n)?);
        }
        if all.contains(&DomainPattern::Any) {
            return Ok(vec![DomainPattern::Any]);
        }
        Ok(all.into_iter().collect())
    }
}

/// What a listener tells the policy about its flows before any byte is
/// read.
#[derive(Debug, Clone, Copy)]
pub struct ListenerFacts {
    /// The port the policy is asked about when it is fixed (an `sni`
    /// listener asks about its `upstream_port`); `None` when it is the
    /// port the client dialled (`transparent`).
    pub fixed_port: Option<u16>,
    /// The destination address is known at decision time (`transparent`).
    pub knows_destination: bool,
    /// A flow without SNI is refused before the policy (`sni`: it has
    /// nowhere to go).
    pub needs_name: bool,
}

impl ListenerFacts {
    pub fn of(kind: &ListenerKind) -> Option<Self> {
        match kind {
            ListenerKind::Sni(o) => Some(Self {
                fixed_port: Some(o.upstream_port),
                knows_destination: false,
                needs_name: true,
            }),
            ListenerKind::Transparent(_) => Some(Self {
                fixed_port: None,
                knows_destination: true,
                needs_name: false,
            }),
            ListenerKind::HttpProxy(_)
            | ListenerKind::Tcp(_)
            | ListenerKind::Dns(_)
            | ListenerKind::Quic(_)
            | ListenerKind::Envoy(_) => None,
        }
    }
}

/// `policy` for flows of `kind` on a listener with `facts`; the groups
/// it names are `config`'s.
pub fn decisions(
    config: &Config,
    policy: &PolicyConfig,
    facts: ListenerFacts,
    kind: FlowKind,
) -> Result<Decisions, TranslateError> {
    let groups = Groups::new(config);
    let watch_all = policy.mode == Mode::Watch;
    let guard = |name: String| Verdict {
        name,
        action: Action::Deny,
        watched: watch_all,
    };
    let metadata_names = match config.webgroup(builtin::CLOUD_METADATA_NAMES) {
        Some(_) if kind == FlowKind::Tls => groups.patterns(builtin::CLOUD_METADATA_NAMES)?,
        _ => Vec::new(),
    };
    let mut address_guards = Vec::new();
    if facts.knows_destination {
        for g in guarded_groups(policy) {
            if config.smartgroup(g).is_some() {
                let nets = groups.addresses(g)?;
                if !nets.is_empty() {
                    address_guards.push((g, nets));
                }
            }
        }
    }
    let mut entries = Vec::new();
    if facts.needs_name && kind == FlowKind::Tls {
        entries.push(Entry {
            cond: Cond::Not(Box::new(Cond::HasName)),
            verdict: guard("no-sni".to_owned()),
        });
    }
    for rule in &policy.rules {
        let Some(cond) = rule_cond(&groups, rule, facts, kind)? else {
            continue;
        };
        let verdict = Verdict {
            name: rule.name.clone(),
            action: rule.action,
            watched: watch_all || rule.watch,
        };
        let lifts = |group: &str, web: bool| {
            rule.action == Action::Allow
                && if web {
                    rule.to.webgroups.iter().any(|g| g == group)
                } else {
                    rule.to.smartgroups.iter().any(|g| g == group)
                }
        };
        if !metadata_names.is_empty() && !lifts(builtin::CLOUD_METADATA_NAMES, true) {
            entries.push(Entry {
                cond: and(vec![cond.clone(), Cond::Name(metadata_names.clone())]),
                verdict: guard(format!("guard:{}", builtin::CLOUD_METADATA_NAMES)),
            });
        }
        // The most specific guarded group holding the address decides,
        // so each gets its own entry, in the guard's order.
        for (g, nets) in &address_guards {
            entries.push(Entry {
                cond: and(vec![cond.clone(), Cond::Destination(nets.clone())]),
                verdict: if lifts(g, false) {
                    verdict.clone()
                } else {
                    guard(format!("guard:{g}"))
                },
            });
        }
        entries.push(Entry { cond, verdict });
    }
    if !metadata_names.is_empty() {
        entries.push(Entry {
            cond: Cond::Name(metadata_names),
            verdict: guard(format!("guard:{}", builtin::CLOUD_METADATA_NAMES)),
        });
    }
    for (g, nets) in address_guards {
        entries.push(Entry {
            cond: Cond::Destination(nets),
            verdict: guard(format!("guard:{g}")),
        });
    }
    Ok(Decisions {
        entries,
        otherwise: Verdict {
            name: "default".to_owned(),
            action: policy.default,
            watched: watch_all,
        },
    })
}

/// When `rule` applies to a flow of `kind` on the listener, or `None`
/// when it never can (wrong protocol or port, an empty group): then it
/// is left out, which keeps the order of the others.
fn rule_cond(
    groups: &Groups<'_>,
    rule: &Rule,
    facts: ListenerFacts,
    kind: FlowKind,
) -> Result<Option<Cond>, TranslateError> {
    // TLS (and plain HTTP) ride on TCP: a `tcp` rule covers them, as in
    // the proxy.
    let protocol_ok = rule.protocols.is_empty()
        || rule.protocols.contains(&Protocol::Tcp)
        || (kind == FlowKind::Tls && rule.protocols.contains(&Protocol::Tls));
    if !protocol_ok {
        return Ok(None);
    }
    let mut parts = Vec::new();
    match facts.fixed_port {
        Some(p) if !rule.ports.is_empty() && !rule.ports.iter().any(|r| r.contains(p)) => return Ok(None),
        Some(_) => {}
        None if rule.ports.is_empty() => {}
        None => parts.push(Cond::Port(rule.ports.clone())),
    }
    let from_any = rule.from.is_empty() || rule.from.iter().any(|g| g == builtin::ANY);
    if !from_any {
        let nets = groups.addresses_of(&rule.from)?;
        if nets.is_empty() {
            return Ok(None);
        }
        parts.push(Cond::Source(nets));
    }
    if !rule.to.is_any() {
        let mut to = Vec::new();
        if kind == FlowKind::Tls && !rule.to.webgroups.is_empty() {
            let patterns = groups.patterns_of(&rule.to.webgroups)?;
            if !patterns.is_empty() {
                to.push(Cond::Name(patterns));
            }
        }
        if facts.knows_destination && !rule.to.smartgroups.is_empty() {
            let nets = groups.addresses_of(&rule.to.smartgroups)?;
            if !nets.is_empty() {
                to.push(Cond::Destination(nets));
            }
        }
        match to.len() {
            0 => return Ok(None),
            1 => parts.extend(to),
            _ => parts.push(Cond::AnyOf(to)),
        }
    }
    Ok(Some(and(parts)))
}

/// `All`, flattened; an empty conjunction is `All([])`, which holds.
fn and(parts: Vec<Cond>) -> Cond {
    let mut out = Vec::new();
    for p in parts {
        match p {
            Cond::All(inner) => out.extend(inner),
            other => out.push(other),
        }
    }
    if out.len() == 1
        && let Some(only) = out.pop()
    {
        return only;
    }
    Cond::All(out)
}

/// A port range as decimal blocks `(prefix, free digits)`: `8000-8999`
/// is `(8, 3)`, which a matcher writes as the regex `8[0-9]{3}`. Ports
/// carry no leading zeros, so a block never has prefix 0 with free
/// digits. No range of ports needs more than about 80 blocks
/// (`1-65535` is 61, `1-58888` is 73).
pub fn port_blocks(r: PortRange) -> Vec<(u32, u32)> {
    let (mut x, hi) = (u32::from(r.lo), u32::from(r.hi));
    let mut out = Vec::new();
    if x == 0 {
        out.push((0, 0));
        x = 1;
    }
    while x <= hi {
        let mut k = 0;
        while x % 10u32.pow(k + 1) == 0 && x + 10u32.pow(k + 1) - 1 <= hi {
            k += 1;
        }
        out.push((x / 10u32.pow(k), k));
        x += 10u32.pow(k);
    }
    out
}
