//! `sluice explain`: the verdict for one flow and the chain of reasons that
//! led to it — which groups the source and destination are in, what the
//! guard checked, why each earlier rule did not match, which one did.
//! Not on the data path, so it may allocate freely.

use serde::Serialize;
use sluice_api::Protocol;

use super::{DecidedBy, FlowQuery, Policy, Verdict};

#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub action: &'static str,
    pub enforcement: &'static str,
    pub decided_by: String,
    pub reason: &'static str,
    pub source_group: Option<String>,
    pub destination_group: Option<String>,
    pub source_smartgroups: Vec<String>,
    pub destination_webgroups: Vec<String>,
    pub destination_smartgroups: Vec<String>,
    pub steps: Vec<Step>,
    #[serde(skip)]
    pub verdict: Verdict,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum Step {
    Guard { outcome: String },
    RuleSkipped { rule: String, why: String },
    RuleMatched { rule: String, why: String },
    Default { outcome: String },
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Guard { outcome } => write!(f, "guard: {outcome}"),
            Step::RuleSkipped { rule, why } => write!(f, "rule `{rule}`: no match: {why}"),
            Step::RuleMatched { rule, why } => write!(f, "rule `{rule}`: MATCH: {why}"),
            Step::Default { outcome } => write!(f, "default: {outcome}"),
        }
    }
}

impl Policy {
    pub fn explain(&self, q: &FlowQuery<'_>) -> Explanation {
        let src_set = self.cidrs.lookup(q.src);
        let dst_set = q.dst.map(|ip| self.cidrs.lookup(ip));
        let hits = q.name.map(|n| self.domains.lookup(n));
        let (verdict, tried, matched) = self.decide_with(q, src_set, dst_set, hits.as_ref());
        let guarded = self.guard(dst_set, hits.as_ref());

        let source_smartgroups: Vec<String> = self.smartgroups_of(q.src).into_iter().map(str::to_owned).collect();
        let destination_webgroups: Vec<String> = q
            .name
            .map(|n| self.webgroups_of(n).into_iter().map(str::to_owned).collect())
            .unwrap_or_default();
        let destination_smartgroups: Vec<String> = q
            .dst
            .map(|ip| self.smartgroups_of(ip).into_iter().map(str::to_owned).collect())
            .unwrap_or_default();

        let mut steps = Vec::new();
        let guarded_names = guarded.map(|(_, needed)| self.guarded_names(needed).join("`, `"));
        steps.push(Step::Guard {
            outcome: match &guarded_names {
                Some(names) => format!(
                    "destination is in built-in group `{names}`: only an allow rule naming it in `to` lets the flow through"
                ),
                None => "destination is in no guarded group".to_owned(),
            },
        });
        for (i, r) in self.rules.iter().enumerate().take(tried) {
            if matched != Some(i) {
                steps.push(Step::RuleSkipped {
                    rule: r.name.clone(),
                    why: self.why_not(r, q, src_set),
                });
                continue;
            }
            let mut why = Vec::new();
            match self.rule_matches(r, q, self.sets.get(src_set), dst_set, hits.as_ref()) {
                Some((source_group, dest)) => {
                    why.push(source_group.map_or("any source".to_owned(), |g| {
                        format!("source in `{}`", self.smartgroup_name(g))
                    }));
                    why.push(dest.map_or("any destination".to_owned(), |d| {
                        format!("destination in `{}`", self.dest_name(d))
                    }));
                }
                None => why.push("matched".to_owned()),
            }
            if r.protocols & q.protocol.bit() == 0 {
                why.push("dns implied by an allow for tls/http to its webgroups".to_owned());
            }
            let mut why = format!(
                "{} -> {} ({})",
                why.join(", "),
                r.action,
                self.enforcement(r.watch).as_str()
            );
            if verdict.decided_by == DecidedBy::BuiltinGuard {
                why.push_str(&format!(
                    "; it does not lift the guard: {}",
                    if r.action == sluice_api::Action::Allow {
                        "its `to` does not name the guarded group"
                    } else {
                        "a watched deny cannot let a guarded flow through"
                    }
                ));
            }
            steps.push(Step::RuleMatched {
                rule: r.name.clone(),
                why,
            });
        }
        if verdict.decided_by == DecidedBy::BuiltinGuard {
            steps.push(Step::Guard {
                outcome: format!("the guard stands -> deny ({})", verdict.reason),
            });
        } else if verdict.decided_by == DecidedBy::Default {
            steps.push(Step::Default {
                outcome: format!(
                    "no rule matched -> {} ({})",
                    verdict.action,
                    verdict.enforcement.as_str()
                ),
            });
        }
        Explanation {
            action: verdict.action.as_str(),
            enforcement: verdict.enforcement.as_str(),
            decided_by: self.decided_by_name(verdict.decided_by).to_owned(),
            reason: verdict.reason.as_str(),
            source_group: verdict.source_group.map(|g| self.smartgroup_name(g).to_owned()),
            destination_group: verdict.dest.map(|d| self.dest_name(d).to_owned()),
            source_smartgroups,
            destination_webgroups,
            destination_smartgroups,
            steps,
            verdict,
        }
    }

    /// The guarded groups behind lift bits.
    pub(super) fn guarded_names(&self, bits: u8) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .guards
            .iter()
            .enumerate()
            .filter(|(i, _)| bits & (1 << i) != 0)
            .map(|(_, g)| self.smartgroup_name(g.group))
            .collect();
        if bits & super::GUARD_METADATA_NAME != 0
            && let Some(g) = self.metadata_names
        {
            names.push(self.webgroup_name(g.group));
        }
        names
    }

    fn why_not(&self, r: &super::CompiledRule, q: &FlowQuery<'_>, src_set: u32) -> String {
        let implied = q.protocol == Protocol::Dns && r.implies_dns;
        if r.protocols & q.protocol.bit() == 0 && !implied {
            let list: Vec<&str> = Protocol::ALL
                .iter()
                .filter(|p| r.protocols & p.bit() != 0)
                .map(|p| p.as_str())
                .collect();
            return format!("protocol {} is not in [{}]", q.protocol, list.join(", "));
        }
        if q.protocol != Protocol::Dns && !r.ports.is_empty() && !r.ports.iter().any(|p| p.contains(q.port)) {
            let list: Vec<String> = r.ports.iter().map(ToString::to_string).collect();
            return format!("port {} is not in [{}]", q.port, list.join(", "));
        }
        if !r.from_any && r.from.first_common(self.sets.get(src_set)).is_none() {
            return format!("source {} is in none of its `from` groups", q.src);
        }
        let mut what = Vec::new();
        if let Some(n) = q.name {
            what.push(format!("name {n}"));
        }
        if let Some(ip) = q.dst
            && !implied
        {
            what.push(format!("address {ip}"));
        }
        if what.is_empty() {
            return "the flow has no destination name or address to match `to`".to_owned();
        }
        format!("{} in none of its `to` groups", what.join(" and "))
    }
}
