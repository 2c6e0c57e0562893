//! Warnings for `sluice check`: things that are valid but almost certainly
//! not what the author meant. They never stop a config from loading.

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;

use crate::builtin;
use crate::config::{selected_workloads, unmatched_selectors};
use crate::domain::DomainName;
use crate::model::{Action, Config, Mode, PortRange, Pos, Rule};

/// One warning: where, and what. Shown as `file:line:col: warning: …`
/// ([`Warning::render`]), the same form as errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// `0:0` when the warning is about the file as a whole.
    pub at: Pos,
    pub kind: WarningKind,
}

impl Warning {
    /// `file:line:col: warning: …` (`file: warning: …` without a position).
    pub fn render(&self, file: &str) -> String {
        if self.at.line == 0 {
            format!("{file}: warning: {self}")
        } else {
            format!("{file}:{}:{}: warning: {self}", self.at.line, self.at.column)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WarningKind {
    /// Every flow `rule` matches is matched first by `by`.
    ShadowedRule {
        rule: String,
        by: String,
        by_line: u32,
        same_action: bool,
    },
    /// A rule's `from` lists only groups with no members.
    EmptySource { rule: String, groups: Vec<String> },
    /// A SmartGroup with no CIDRs and no matching workloads.
    EmptySmartGroup { group: String },
    /// A selector that no workload in the inventory matches.
    UnmatchedSelector { group: String, selector: String },
    /// `watch: true` on a rule in a policy already in watch mode.
    RedundantWatch { rule: String },
    /// A user group that no rule references.
    UnusedGroup { group: String, kind: &'static str },
    /// `resolver.hosts` maps `name` to an address in a guarded group, and
    /// the allow rules for that name do not name the group: flows to it
    /// will be denied by the guard.
    GuardedHost {
        name: String,
        ip: IpAddr,
        group: &'static str,
        rules: Vec<String>,
    },
    /// No listener: `sluice run` would have nothing to do.
    NoListeners,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            WarningKind::ShadowedRule {
                rule,
                by,
                by_line,
                same_action,
            } => write!(
                f,
                "rule `{rule}` can never match: rule `{by}` (line {by_line}) matches every flow it would{}; \
                 move it above `{by}` or delete it",
                if *same_action {
                    " with the same action"
                } else {
                    ", with the opposite action"
                }
            ),
            WarningKind::EmptySource { rule, groups } => write!(
                f,
                "rule `{rule}` can never match: its source group(s) {} have no members",
                groups.join(", ")
            ),
            WarningKind::EmptySmartGroup { group } => {
                write!(
                    f,
                    "smartgroup `{group}` has no members (no CIDRs, and no workload matches it)"
                )
            }
            WarningKind::UnmatchedSelector { group, selector } => {
                write!(
                    f,
                    "smartgroup `{group}`: selector {selector} matches no workload in the inventory"
                )
            }
            WarningKind::RedundantWatch { rule } => {
                write!(
                    f,
                    "rule `{rule}` sets `watch: true` but the policy is already in watch mode"
                )
            }
            WarningKind::UnusedGroup { group, kind } => {
                write!(f, "{kind} `{group}` is not used by any rule")
            }
            WarningKind::GuardedHost { name, ip, group, rules } => write!(
                f,
                "`{name}` resolves to {ip}, in the guarded group `{group}`, and {} `{group}` in its `to`: \
                 flows to `{name}` will be denied by the guard; add `{group}` to the `to.smartgroups` of the \
                 rule that allows `{name}`",
                if rules.len() == 1 {
                    format!("the rule that allows it (`{}`) does not name", rules[0])
                } else {
                    format!(
                        "none of the rules that allow it ({}) names",
                        rules.iter().map(|r| format!("`{r}`")).collect::<Vec<_>>().join(", ")
                    )
                }
            ),
            WarningKind::NoListeners => write!(
                f,
                "no listeners: `sluice run` would have nothing to do and refuses to start; add one under `listeners:`"
            ),
        }
    }
}

/// All warnings for a validated config, in file order.
pub fn lint(config: &Config) -> Vec<Warning> {
    let mut out = Vec::new();
    let empty: HashSet<&str> = config
        .smartgroups
        .iter()
        .filter(|g| {
            !g.builtin
                && g.cidrs.is_empty()
                && g.includes.is_empty()
                && selected_workloads(g, &config.inventory)
                    .iter()
                    .all(|w| w.ips.is_empty())
        })
        .map(|g| g.name.as_str())
        .collect();
    for g in &config.smartgroups {
        if empty.contains(g.name.as_str()) {
            out.push(Warning {
                at: g.at,
                kind: WarningKind::EmptySmartGroup { group: g.name.clone() },
            });
        }
        for sel in unmatched_selectors(g, &config.inventory) {
            let selector = format!(
                "{{{}}}",
                sel.iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            out.push(Warning {
                at: g.at,
                kind: WarningKind::UnmatchedSelector {
                    group: g.name.clone(),
                    selector,
                },
            });
        }
    }
    let rules = &config.policy.rules;
    for (i, b) in rules.iter().enumerate() {
        if !b.from.is_empty() && b.from.iter().all(|g| empty.contains(g.as_str())) {
            out.push(Warning {
                at: b.at,
                kind: WarningKind::EmptySource {
                    rule: b.name.clone(),
                    groups: b.from.clone(),
                },
            });
        }
        if b.watch && config.policy.mode == Mode::Watch {
            out.push(Warning {
                at: b.at,
                kind: WarningKind::RedundantWatch { rule: b.name.clone() },
            });
        }
        if let Some(a) = rules[..i].iter().find(|a| covers(config, a, b)) {
            out.push(Warning {
                at: b.at,
                kind: WarningKind::ShadowedRule {
                    rule: b.name.clone(),
                    by: a.name.clone(),
                    by_line: a.at.line,
                    same_action: a.action == b.action && a.watch == b.watch,
                },
            });
        }
    }
    let used_web: HashSet<&str> = rules
        .iter()
        .flat_map(|r| r.to.webgroups.iter().map(String::as_str))
        .collect();
    let used_smart: HashSet<&str> = rules
        .iter()
        .flat_map(|r| r.from.iter().chain(r.to.smartgroups.iter()).map(String::as_str))
        .collect();
    let included_web: HashSet<&str> = config
        .webgroups
        .iter()
        .flat_map(|g| g.includes.iter().map(String::as_str))
        .collect();
    let included_smart: HashSet<&str> = config
        .smartgroups
        .iter()
        .flat_map(|g| g.includes.iter().map(String::as_str))
        .collect();
    for g in config.webgroups.iter().filter(|g| !g.builtin) {
        if !used_web.contains(g.name.as_str()) && !included_web.contains(g.name.as_str()) {
            out.push(Warning {
                at: g.at,
                kind: WarningKind::UnusedGroup {
                    group: g.name.clone(),
                    kind: "webgroup",
                },
            });
        }
    }
    for g in config.smartgroups.iter().filter(|g| !g.builtin) {
        if !used_smart.contains(g.name.as_str()) && !included_smart.contains(g.name.as_str()) {
            out.push(Warning {
                at: g.at,
                kind: WarningKind::UnusedGroup {
                    group: g.name.clone(),
                    kind: "smartgroup",
                },
            });
        }
    }
    guarded_hosts(config, &mut out);
    if config.listeners.is_empty() {
        out.push(Warning {
            at: Pos::default(),
            kind: WarningKind::NoListeners,
        });
    }
    // In file order, each once: two checks can find the same thing.
    out.sort_by_key(|w| w.at);
    out.dedup();
    out
}

/// The guarded built-in groups, most specific first (the order the guard
/// checks an address in).
fn guarded_groups(config: &Config) -> Vec<&'static str> {
    let mut g = vec![
        builtin::CLOUD_METADATA,
        builtin::GATEWAY,
        builtin::LOOPBACK,
        builtin::LINK_LOCAL,
    ];
    if config.policy.guard_private_ranges {
        g.push(builtin::PRIVATE_RANGES);
    }
    g
}

/// `resolver.hosts` entries the guard will refuse although a rule allows
/// the name: a test or lab set-up that maps a name to 127.0.0.1, say.
fn guarded_hosts(config: &Config, out: &mut Vec<Warning>) {
    let guarded = guarded_groups(config);
    for (name, ips) in &config.resolver.hosts {
        let Ok(dn) = DomainName::parse(name) else { continue };
        // The allow rules that can decide a flow to this name.
        let allowing: Vec<&Rule> = config
            .policy
            .rules
            .iter()
            .filter(|r| {
                r.action == Action::Allow
                    && (r.to.is_any() || r.to.webgroups.iter().any(|g| in_webgroup(config, g, &dn)))
            })
            .collect();
        if allowing.is_empty() {
            continue;
        }
        for ip in ips {
            let ip = ip.to_canonical();
            let Some(group) = guarded.iter().copied().find(|g| {
                config
                    .smartgroup(g)
                    .is_some_and(|s| s.cidrs.iter().any(|c| c.contains(&ip)))
            }) else {
                continue;
            };
            if allowing.iter().any(|r| r.to.smartgroups.iter().any(|g| g == group)) {
                continue;
            }
            out.push(Warning {
                at: config.resolver.hosts_at.get(name).copied().unwrap_or_default(),
                kind: WarningKind::GuardedHost {
                    name: name.clone(),
                    ip,
                    group,
                    rules: allowing.iter().map(|r| r.name.clone()).collect(),
                },
            });
            break;
        }
    }
}

/// Whether `name` is in WebGroup `group` or a group it includes.
fn in_webgroup(config: &Config, group: &str, name: &DomainName) -> bool {
    let mut seen = HashSet::new();
    let mut stack = vec![group.to_owned()];
    while let Some(g) = stack.pop() {
        if !seen.insert(g.clone()) {
            continue;
        }
        if let Some(w) = config.webgroup(&g) {
            if w.patterns.iter().any(|p| p.matches(name)) {
                return true;
            }
            stack.extend(w.includes.iter().cloned());
        }
    }
    false
}

/// Whether rule `a` matches every flow rule `b` matches. Conservative: it
/// compares group names (with includes), not group contents, so it can miss
/// a shadowed rule but never reports one that is not.
fn covers(config: &Config, a: &Rule, b: &Rule) -> bool {
    let web_closure = |names: &[String]| closure(names, |n| config.webgroup(n).map(|g| g.includes.clone()));
    let smart_closure = |names: &[String]| closure(names, |n| config.smartgroup(n).map(|g| g.includes.clone()));

    let from_ok = a.from.is_empty()
        || a.from.iter().any(|g| g == crate::builtin::ANY)
        || (!b.from.is_empty() && b.from.iter().all(|g| smart_closure(&a.from).contains(g)));
    let proto_ok =
        a.protocols.is_empty() || (!b.protocols.is_empty() && b.protocols.iter().all(|p| a.protocols.contains(p)));
    let ports_ok = a.ports.is_empty() || (!b.ports.is_empty() && b.ports.iter().all(|p| covered(*p, &a.ports)));
    let to_ok = a.to.is_any()
        || (!b.to.is_any()
            && b.to.webgroups.iter().all(|g| web_closure(&a.to.webgroups).contains(g))
            && b.to
                .smartgroups
                .iter()
                .all(|g| smart_closure(&a.to.smartgroups).contains(g)));
    from_ok && proto_ok && ports_ok && to_ok
}

fn covered(p: PortRange, by: &[PortRange]) -> bool {
    by.iter().any(|r| r.covers(p))
}

/// The named groups and, transitively, every group they include: all of
/// these hold only members of the named groups.
fn closure(names: &[String], includes: impl Fn(&str) -> Option<Vec<String>>) -> HashSet<String> {
    let mut seen: HashSet<String> = HashSet::new();
    let mut stack: Vec<String> = names.to_vec();
    while let Some(n) = stack.pop() {
        if seen.insert(n.clone()) {
            stack.extend(includes(&n).unwrap_or_default());
        }
    }
    seen
}
