//! The policy engine: (source, destination name and/or address, protocol,
//! port) → [`Verdict`].
//!
//! [`Policy::compile`] turns a validated [`Config`] into an immutable
//! snapshot — a WebGroup name index, a SmartGroup address index and the
//! rules as bitsets — once. [`Policy::decide`] then runs on every flow and
//! every DNS query without allocating or locking. The data plane holds the
//! snapshot in an `Arc`; a new config compiles into a new snapshot.
//!
//! Order of evaluation:
//! 1. the user's rules, first match wins;
//! 2. the policy default;
//! 3. the built-in guard, over both: a destination in `cloud-metadata`,
//!    `link-local`, `loopback`, the gateway's own addresses (and
//!    `private-ranges` when `guard_private_ranges` is set), or a name in
//!    `cloud-metadata-names`, is denied unless the rule that decided is an
//!    `allow` rule naming that built-in group in its `to`. Lifting is least
//!    privilege: it holds only for the flows that rule decides, and a
//!    `deny` rule naming the group never opens anything.
//!
//! In watch mode (or for a rule with `watch: true`) a deny is *watched*:
//! recorded as "would deny" and let through.

mod cidrs;
pub mod decision;
mod domains;
mod explain;
mod rules;
mod sets;

use std::net::IpAddr;

use sluice_api::builtin;
use sluice_api::config::selected_workloads;
use sluice_api::reason::ReasonCode;
use sluice_api::{Action, Config, DomainName, Mode, PortRange, Protocol};

pub use cidrs::CidrIndex;
pub use domains::{DomainIndex, NameHits};
pub use explain::{Explanation, Step};
use rules::RuleIndex;
use sets::{BitSet, SetArena, SetId};

/// What the policy is asked about one flow or query.
#[derive(Debug, Clone, Copy)]
pub struct FlowQuery<'a> {
    pub src: IpAddr,
    /// SNI, Host, CONNECT target or DNS query name, canonical.
    pub name: Option<&'a DomainName>,
    /// Destination address when known (transparent mode, resolved name).
    pub dst: Option<IpAddr>,
    pub protocol: Protocol,
    /// Destination port; not consulted for `dns` queries, which name no port.
    pub port: u16,
    /// A SmartGroup the source belongs to by authentication (an explicit
    /// proxy user), on top of the groups its address is in.
    pub identity: Option<u32>,
}

pub use sluice_api::Enforcement;

/// Which part of the policy decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecidedBy {
    /// Index into `Config::policy.rules`.
    Rule(u32),
    Default,
    BuiltinGuard,
}

/// The destination group that made a rule (or the guard) match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DestMatch {
    WebGroup(u32),
    SmartGroup(u32),
}

/// A decision. `Copy`, no heap: names are looked up through the [`Policy`]
/// that produced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Verdict {
    pub action: Action,
    pub decided_by: DecidedBy,
    pub reason: ReasonCode,
    pub enforcement: Enforcement,
    /// The source SmartGroup the deciding rule matched on (`None` when the
    /// rule takes any source, or for the default).
    pub source_group: Option<u32>,
    pub dest: Option<DestMatch>,
}

impl Verdict {
    /// Whether the flow must be stopped: a deny that is enforced.
    pub fn blocks(&self) -> bool {
        self.action == Action::Deny && self.enforcement == Enforcement::Enforced
    }
    /// A deny only recorded (watch mode).
    pub fn would_deny(&self) -> bool {
        self.action == Action::Deny && self.enforcement == Enforcement::Watched
    }
}

#[derive(Debug)]
struct CompiledRule {
    name: String,
    from_any: bool,
    from: BitSet,
    to_any: bool,
    to_web: BitSet,
    to_smart: BitSet,
    /// Bit per `Protocol`.
    protocols: u8,
    ports: Box<[PortRange]>,
    action: Action,
    watch: bool,
    /// An allow rule for tls/http to WebGroups also allows resolving them.
    implies_dns: bool,
    /// The guards this rule lifts for the flows it decides: bit `i` for
    /// `guards[i]`, [`GUARD_METADATA_NAME`] for the metadata-names guard.
    /// Only `allow` rules naming the guarded group in `to` have any.
    lifts: u8,
    /// Filters this rule hands its decision to (`delegate`).
    delegate: Box<[std::sync::Arc<str>]>,
}

#[derive(Debug, Clone, Copy)]
struct Guard {
    group: u32,
    reason: ReasonCode,
}

/// A compiled, immutable policy snapshot.
#[derive(Debug)]
pub struct Policy {
    mode: Mode,
    default: Action,
    rules: Vec<CompiledRule>,
    web_names: Vec<String>,
    smart_names: Vec<String>,
    sets: SetArena,
    domains: DomainIndex,
    cidrs: CidrIndex,
    guards: Vec<Guard>,
    metadata_names: Option<Guard>,
    any_group: Option<u32>,
    /// `None` for an empty policy or one too large to index.
    index: Option<RuleIndex>,
    /// Per SmartGroup: the set of groups a member of it is in (itself and
    /// every group including it), for authenticated identities.
    identity_sets: Vec<SetId>,
    /// Per interned set: what the guard makes of it, precomputed so the
    /// guard reads one byte instead of walking the set's members.
    guard_of: Vec<u8>,
}

/// `guard_of` bits: the low bits are 1 + the index in `guards` of the
/// first guarded SmartGroup in the set (0: none); this bit marks a set
/// holding the metadata-names WebGroup.
const GUARD_METADATA_NAME: u8 = 0x80;

/// Transitive include closure, inverted: `containers[g]` = `g` and every
/// group that includes `g` directly or indirectly.
fn containers(includes: &[Vec<u32>]) -> Vec<Vec<u32>> {
    let n = includes.len();
    let mut out: Vec<Vec<u32>> = (0..n as u32).map(|g| vec![g]).collect();
    for h in 0..n {
        let mut seen = vec![false; n];
        let mut stack: Vec<u32> = includes[h].clone();
        while let Some(m) = stack.pop() {
            let Some(slot) = seen.get_mut(m as usize) else {
                continue;
            };
            if *slot {
                continue;
            }
            *slot = true;
            if m as usize != h {
                out[m as usize].push(h as u32);
            }
            stack.extend(includes.get(m as usize).into_iter().flatten().copied());
        }
    }
    out
}

impl Policy {
    /// Builds the snapshot. The config has been validated, so every group a
    /// rule names exists.
    pub fn compile(config: &Config) -> Self {
        let web_names: Vec<String> = config.webgroups.iter().map(|g| g.name.clone()).collect();
        let smart_names: Vec<String> = config.smartgroups.iter().map(|g| g.name.clone()).collect();
        let web_id = |n: &str| web_names.iter().position(|x| x == n).map(|i| i as u32);
        let smart_id = |n: &str| smart_names.iter().position(|x| x == n).map(|i| i as u32);

        let mut sets = SetArena::new();
        let web_includes: Vec<Vec<u32>> = config
            .webgroups
            .iter()
            .map(|g| g.includes.iter().filter_map(|n| web_id(n)).collect())
            .collect();
        let web_patterns: Vec<&[sluice_api::DomainPattern]> =
            config.webgroups.iter().map(|g| g.patterns.as_slice()).collect();
        let domains = DomainIndex::build(&web_patterns, &containers(&web_includes), &mut sets);

        let smart_includes: Vec<Vec<u32>> = config
            .smartgroups
            .iter()
            .map(|g| g.includes.iter().filter_map(|n| smart_id(n)).collect())
            .collect();
        let mut nets = Vec::new();
        for (g, group) in config.smartgroups.iter().enumerate() {
            nets.extend(group.cidrs.iter().map(|n| (*n, g as u32)));
            for w in selected_workloads(group, &config.inventory) {
                nets.extend(w.ips.iter().map(|ip| (ipnet::IpNet::from(*ip), g as u32)));
            }
        }
        let smart_containers = containers(&smart_includes);
        let cidrs = CidrIndex::build(&nets, &smart_containers, &mut sets);
        let identity_sets: Vec<SetId> = smart_containers
            .into_iter()
            .map(|mut c| {
                c.sort_unstable();
                c.dedup();
                sets.intern(c)
            })
            .collect();

        // Most specific first: the first group holding an address decides.
        let mut guarded: Vec<(&str, ReasonCode)> = vec![
            (builtin::CLOUD_METADATA, ReasonCode::GuardCloudMetadata),
            (builtin::GATEWAY, ReasonCode::GuardGateway),
            (builtin::LOOPBACK, ReasonCode::GuardLoopback),
            (builtin::LINK_LOCAL, ReasonCode::GuardLinkLocal),
        ];
        if config.policy.guard_private_ranges {
            guarded.push((builtin::PRIVATE_RANGES, ReasonCode::GuardPrivateRanges));
        }
        let guards: Vec<Guard> = guarded
            .into_iter()
            .filter_map(|(name, reason)| smart_id(name).map(|group| Guard { group, reason }))
            .collect();
        let metadata_names = web_id(builtin::CLOUD_METADATA_NAMES).map(|group| Guard {
            group,
            reason: ReasonCode::GuardMetadataName,
        });
        // What an allow rule lifts: the guarded groups its `to` names.
        let lifts = |r: &sluice_api::Rule| -> u8 {
            if r.action != Action::Allow {
                return 0;
            }
            let mut bits = 0u8;
            for (i, g) in guards.iter().enumerate() {
                let name = smart_names.get(g.group as usize).map(String::as_str);
                if r.to.smartgroups.iter().any(|n| Some(n.as_str()) == name) {
                    bits |= 1 << i;
                }
            }
            if let Some(g) = metadata_names
                && let Some(name) = web_names.get(g.group as usize)
                && r.to.webgroups.iter().any(|n| n == name)
            {
                bits |= GUARD_METADATA_NAME;
            }
            bits
        };

        let rules: Vec<CompiledRule> = config
            .policy
            .rules
            .iter()
            .map(|r| {
                let mut from = BitSet::with_capacity(smart_names.len());
                r.from.iter().filter_map(|n| smart_id(n)).for_each(|g| from.insert(g));
                let mut to_web = BitSet::with_capacity(web_names.len());
                r.to.webgroups
                    .iter()
                    .filter_map(|n| web_id(n))
                    .for_each(|g| to_web.insert(g));
                let mut to_smart = BitSet::with_capacity(smart_names.len());
                r.to.smartgroups
                    .iter()
                    .filter_map(|n| smart_id(n))
                    .for_each(|g| to_smart.insert(g));
                let mut protocols = if r.protocols.is_empty() {
                    Protocol::ALL.iter().fold(0, |m, p| m | p.bit())
                } else {
                    r.protocols.iter().fold(0, |m, p| m | p.bit())
                };
                // TLS and plain HTTP ride on TCP: an L4 rule covers them,
                // or an east-west `tcp` rule would stop matching the moment
                // a service turned on TLS.
                if protocols & Protocol::Tcp.bit() != 0 {
                    protocols |= Protocol::Tls.bit() | Protocol::Http.bit();
                }
                // Likewise QUIC rides on UDP.
                if protocols & Protocol::Udp.bit() != 0 {
                    protocols |= Protocol::Quic.bit();
                }
                let implies_dns = r.action == Action::Allow
                    && !r.to.webgroups.is_empty()
                    && protocols & (Protocol::Tls.bit() | Protocol::Http.bit() | Protocol::Quic.bit()) != 0;
                CompiledRule {
                    name: r.name.clone(),
                    from_any: r.from.is_empty() || r.from.iter().any(|g| g == builtin::ANY),
                    from,
                    to_any: r.to.is_any(),
                    to_web,
                    to_smart,
                    protocols,
                    ports: r.ports.clone().into_boxed_slice(),
                    action: r.action,
                    watch: r.watch,
                    implies_dns,
                    lifts: lifts(r),
                    delegate: r.delegate.iter().map(|d| std::sync::Arc::from(d.as_str())).collect(),
                }
            })
            .collect();

        let any_group = smart_id(builtin::ANY);
        sets.freeze();
        let guard_of: Vec<u8> = (0..sets.len())
            .map(|s| {
                let groups = sets.get(s as SetId);
                let first = guards
                    .iter()
                    .position(|g| groups.contains(&g.group))
                    .map_or(0, |i| i as u8 + 1);
                // Set ids are shared by names and addresses; the metadata
                // bit is only ever read for a name's sets.
                let meta = metadata_names.is_some_and(|g| groups.contains(&g.group));
                first | if meta { GUARD_METADATA_NAME } else { 0 }
            })
            .collect();
        let index = RuleIndex::build(&rules, web_names.len(), smart_names.len(), &sets);
        Self {
            mode: config.policy.mode,
            default: config.policy.default,
            rules,
            web_names,
            smart_names,
            sets,
            domains,
            cidrs,
            guards,
            metadata_names,
            any_group,
            index,
            identity_sets,
            guard_of,
        }
    }

    fn enforcement(&self, rule_watch: bool) -> Enforcement {
        if self.mode == Mode::Watch || rule_watch {
            Enforcement::Watched
        } else {
            Enforcement::Enforced
        }
    }

    /// Decides one flow. Allocation-free.
    pub fn decide(&self, q: &FlowQuery<'_>) -> Verdict {
        // Independent lookups: start all their memory loads first, then
        // finish the addresses (short chains, mostly cached) and start the
        // loads that depend on their sets while the name's misses are
        // still in flight.
        let pending = q.name.map(|n| self.domains.start(n));
        self.cidrs.prefetch(q.src);
        if let Some(d) = q.dst {
            self.cidrs.prefetch(d);
        }
        let src_set = self.cidrs.lookup(q.src);
        let dst_set = q.dst.map(|ip| self.cidrs.lookup(ip));
        if let Some(index) = &self.index {
            index.prefetch_rows(src_set, dst_set);
        }
        // Read if a rule matches (for the source group it matched on).
        self.sets.prefetch(src_set);
        if let Some(g) = dst_set.and_then(|d| self.guard_of.get(d as usize)) {
            crate::sys::prefetch(g);
        }
        let hits = q.name.zip(pending).map(|(n, p)| self.domains.finish(n, p));
        self.decide_with(q, src_set, dst_set, hits.as_ref()).0
    }

    /// The decision, how many rules were tried, and the rule that matched
    /// (which may have been overruled by the guard). Shared by `decide` and
    /// `explain`.
    fn decide_with(
        &self,
        q: &FlowQuery<'_>,
        src_set: SetId,
        dst_set: Option<SetId>,
        hits: Option<&NameHits>,
    ) -> (Verdict, usize, Option<usize>) {
        let guard = self.guard(dst_set, hits);
        let Some((i, source_group, dest)) = self.first_rule(q, src_set, dst_set, hits) else {
            return match guard {
                Some((v, _)) => (v, self.rules.len(), None),
                None => (self.default_verdict(), self.rules.len(), None),
            };
        };
        let Some(r) = self.rules.get(i) else {
            return (self.default_verdict(), self.rules.len(), None);
        };
        // Only an allow rule naming every guarded group the flow touches
        // lifts the guard, and only for the flows it decides. A deny rule
        // keeps its own name on the verdict, unless it only watches where
        // the guard would block.
        if let Some((v, needed)) = guard
            && r.lifts & needed != needed
            && (r.action == Action::Allow || self.enforcement(r.watch) != v.enforcement)
        {
            return (v, i + 1, Some(i));
        }
        let reason = match r.action {
            Action::Allow => ReasonCode::AllowedByRule,
            Action::Deny => ReasonCode::DeniedByRule,
        };
        let v = Verdict {
            action: r.action,
            decided_by: DecidedBy::Rule(i as u32),
            reason,
            enforcement: self.enforcement(r.watch),
            source_group,
            dest,
        };
        (v, i + 1, Some(i))
    }

    /// The first rule matching, with the groups it matched on.
    fn first_rule(
        &self,
        q: &FlowQuery<'_>,
        src_set: SetId,
        dst_set: Option<SetId>,
        hits: Option<&NameHits>,
    ) -> Option<(usize, Option<u32>, Option<DestMatch>)> {
        // Read only once a rule is chosen: most decisions never need the
        // source set's members, and reading them costs a cache miss.
        let src_groups = || self.sets.get(src_set);
        match &self.index {
            Some(index) => {
                let port_ok = |i: usize| {
                    self.rules
                        .get(i)
                        .is_some_and(|r| r.ports.is_empty() || r.ports.iter().any(|p| p.contains(q.port)))
                };
                let hit_sets = hits.into_iter().flat_map(|h| h.iter());
                let identity = q.identity.and_then(|g| self.identity_sets.get(g as usize).copied());
                let i = index.first_match(q.protocol, src_set, identity, dst_set, hit_sets, &self.sets, port_ok)?;
                let r = self.rules.get(i)?;
                let (source_group, dest) = self.rule_matches(r, q, src_groups(), dst_set, hits)?;
                Some((i, source_group, dest))
            }
            None => self.rules.iter().enumerate().find_map(|(i, r)| {
                self.rule_matches(r, q, src_groups(), dst_set, hits)
                    .map(|(s, d)| (i, s, d))
            }),
        }
    }

    fn default_verdict(&self) -> Verdict {
        let reason = match self.default {
            Action::Allow => ReasonCode::DefaultAllow,
            Action::Deny => ReasonCode::DefaultDeny,
        };
        Verdict {
            action: self.default,
            decided_by: DecidedBy::Default,
            reason,
            enforcement: self.enforcement(false),
            source_group: None,
            dest: None,
        }
    }

    /// The guard's denial when the flow touches a guarded group, with the
    /// lift bits a rule needs to overrule it (see [`CompiledRule::lifts`]).
    /// The address's guard names the verdict when both fire.
    fn guard(&self, dst_set: Option<SetId>, hits: Option<&NameHits>) -> Option<(Verdict, u8)> {
        let deny = |reason, dest| Verdict {
            action: Action::Deny,
            decided_by: DecidedBy::BuiltinGuard,
            reason,
            enforcement: self.enforcement(false),
            source_group: None,
            dest: Some(dest),
        };
        let mut fired: Option<(Verdict, u8)> = None;
        if let Some(set) = dst_set {
            // The most specific guarded group holding the address decides:
            // a rule naming `cloud-metadata` opens 169.254.169.254 although
            // it is link-local too, but one naming `link-local` (or
            // `private-ranges`) does not open the metadata service inside it.
            let first = self.guard_of.get(set as usize).map_or(0, |b| b & !GUARD_METADATA_NAME);
            if let Some(i) = usize::from(first).checked_sub(1)
                && let Some(g) = self.guards.get(i)
            {
                fired = Some((deny(g.reason, DestMatch::SmartGroup(g.group)), 1 << i));
            }
        }
        if let (Some(g), Some(hits)) = (self.metadata_names, hits)
            && hits.iter().any(|s| {
                self.guard_of
                    .get(s as usize)
                    .is_some_and(|b| b & GUARD_METADATA_NAME != 0)
            })
        {
            fired = Some(match fired {
                Some((v, bits)) => (v, bits | GUARD_METADATA_NAME),
                None => (deny(g.reason, DestMatch::WebGroup(g.group)), GUARD_METADATA_NAME),
            });
        }
        fired
    }

    /// Rules that lift a guard, as (rule name, guarded group names), in
    /// rule order: what `sluice check` reports.
    pub fn guard_lifts(&self) -> Vec<(&str, Vec<&str>)> {
        self.rules
            .iter()
            .filter(|r| r.lifts != 0)
            .map(|r| {
                let groups = self.guarded_names(r.lifts);
                (r.name.as_str(), groups)
            })
            .collect()
    }

    /// `Some((matched source group, matched destination group))` when the
    /// rule applies.
    #[inline]
    fn rule_matches(
        &self,
        r: &CompiledRule,
        q: &FlowQuery<'_>,
        src_groups: &[u32],
        dst_set: Option<SetId>,
        hits: Option<&NameHits>,
    ) -> Option<(Option<u32>, Option<DestMatch>)> {
        let proto_ok = r.protocols & q.protocol.bit() != 0;
        let implied_dns = !proto_ok && q.protocol == Protocol::Dns && r.implies_dns;
        if !proto_ok && !implied_dns {
            return None;
        }
        if q.protocol != Protocol::Dns && !r.ports.is_empty() && !r.ports.iter().any(|p| p.contains(q.port)) {
            return None;
        }
        let source_group = if r.from_any {
            None
        } else {
            let identity = q
                .identity
                .and_then(|g| self.identity_sets.get(g as usize))
                .map(|s| self.sets.get(*s));
            match identity.and_then(|set| r.from.first_common(set)) {
                Some(g) => Some(g),
                None => Some(r.from.first_common(src_groups)?),
            }
        };
        if r.to_any && !implied_dns {
            return Some((source_group, None));
        }
        if let Some(hits) = hits {
            for s in hits.iter() {
                if let Some(g) = r.to_web.first_common(self.sets.get(s)) {
                    return Some((source_group, Some(DestMatch::WebGroup(g))));
                }
            }
        }
        if implied_dns {
            return None;
        }
        if let Some(set) = dst_set
            && let Some(g) = r.to_smart.first_common(self.sets.get(set))
        {
            return Some((source_group, Some(DestMatch::SmartGroup(g))));
        }
        None
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn default_action(&self) -> Action {
        self.default
    }

    /// Name of the rule, `default` or `builtin-guard`.
    pub fn decided_by_name(&self, d: DecidedBy) -> &str {
        match d {
            DecidedBy::Rule(i) => self.rules.get(i as usize).map_or("?", |r| r.name.as_str()),
            DecidedBy::Default => "default",
            DecidedBy::BuiltinGuard => "builtin-guard",
        }
    }

    /// The filters a verdict's rule hands its decision to: a filter named
    /// here may allow what that rule denied. Empty for the default and the
    /// guard, which delegate nothing.
    pub fn delegates(&self, d: DecidedBy) -> &[std::sync::Arc<str>] {
        match d {
            DecidedBy::Rule(i) => self.rules.get(i as usize).map_or(&[], |r| &r.delegate),
            DecidedBy::Default | DecidedBy::BuiltinGuard => &[],
        }
    }

    /// Id of a SmartGroup by name (for [`FlowQuery::identity`]).
    pub fn smartgroup_id(&self, name: &str) -> Option<u32> {
        self.smart_names.iter().position(|n| n == name).map(|i| i as u32)
    }

    pub fn webgroup_name(&self, id: u32) -> &str {
        self.web_names.get(id as usize).map_or("?", String::as_str)
    }

    pub fn smartgroup_name(&self, id: u32) -> &str {
        self.smart_names.get(id as usize).map_or("?", String::as_str)
    }

    pub fn dest_name(&self, d: DestMatch) -> &str {
        match d {
            DestMatch::WebGroup(g) => self.webgroup_name(g),
            DestMatch::SmartGroup(g) => self.smartgroup_name(g),
        }
    }

    /// SmartGroups holding `ip`, except the catch-all `any` (for audit records).
    pub fn smartgroups_of(&self, ip: IpAddr) -> Vec<&str> {
        let set = self.cidrs.lookup(ip);
        self.sets
            .get(set)
            .iter()
            .filter(|g| Some(**g) != self.any_group)
            .map(|g| self.smartgroup_name(*g))
            .collect()
    }

    /// WebGroups `name` belongs to.
    pub fn webgroups_of(&self, name: &DomainName) -> Vec<&str> {
        let hits = self.domains.lookup(name);
        let mut ids: Vec<u32> = hits.iter().flat_map(|s| self.sets.get(s).iter().copied()).collect();
        ids.sort_unstable();
        ids.dedup();
        ids.into_iter().map(|g| self.webgroup_name(g)).collect()
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    pub fn pattern_count(&self) -> usize {
        self.domains.pattern_count()
    }

    pub fn cidr_count(&self) -> usize {
        self.cidrs.cidr_count()
    }

    /// Approximate heap held by the indexes.
    pub fn heap_bytes(&self) -> usize {
        self.domains.heap_bytes()
            + self.cidrs.heap_bytes()
            + self.sets.heap_bytes()
            + self.index.as_ref().map_or(0, RuleIndex::heap_bytes)
    }

    /// Distinct group combinations interned by the indexes.
    pub fn set_count(&self) -> usize {
        self.sets.len()
    }
}

#[cfg(test)]
mod tests;
