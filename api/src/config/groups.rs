//! WebGroups, SmartGroups and the inventory their selectors pick from:
//! names, patterns, CIDRs, includes (and their cycles).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde_saphyr::Location;

use super::raw::{self, S};
use super::{ConfigErrorKind, GroupKind, NameKind, Validator, pos, suggest};
use crate::builtin;
use crate::domain::DomainPattern;
use crate::model::*;
use crate::net::parse_cidr;

impl Validator {
    pub(super) fn inventory(&mut self, raw: &[S<raw::RawWorkload>]) -> Vec<Workload> {
        let mut seen = HashMap::new();
        let mut out = Vec::new();
        for (i, w) in raw.iter().enumerate() {
            let (at, w) = (w.referenced, &w.value);
            let path = format!("inventory[{i}]");
            let ok = self.require(&w.name, at, &path, "name")
                && self.name(&w.name, &format!("{path}.name"), NameKind::Workload, &mut seen);
            let ips: Vec<IpAddr> = w
                .ips
                .iter()
                .enumerate()
                .filter_map(|(j, ip)| self.ip(ip, &format!("{path}.ips[{j}]")))
                .collect();
            if ok {
                out.push(Workload {
                    name: w.name.value.clone(),
                    ips,
                    labels: w.labels.clone(),
                });
            }
        }
        out
    }

    pub(super) fn webgroups(&mut self, raw: &[S<raw::RawWebGroup>]) -> Vec<WebGroup> {
        let mut groups = match builtin::webgroups() {
            Ok(g) => g,
            Err(e) => {
                self.err(
                    Location::UNKNOWN,
                    "",
                    ConfigErrorKind::InvalidValue { message: e.to_string() },
                );
                Vec::new()
            }
        };
        let mut seen = HashMap::new();
        let mut include_refs = Vec::new();
        for (i, g) in raw.iter().enumerate() {
            let (at, g) = (g.referenced, &g.value);
            let path = format!("webgroups[{i}]");
            let ok = self.require(&g.name, at, &path, "name")
                && self.name(&g.name, &format!("{path}.name"), NameKind::WebGroup, &mut seen);
            let mut patterns = Vec::with_capacity(g.domains.len());
            for (j, d) in g.domains.iter().enumerate() {
                match DomainPattern::parse(&d.value) {
                    Ok(p) => patterns.push(p),
                    Err(source) => self.err(
                        d.referenced,
                        format!("{path}.domains[{j}]"),
                        ConfigErrorKind::InvalidDomain {
                            pattern: d.value.clone(),
                            source,
                        },
                    ),
                }
            }
            for (j, inc) in g.include.iter().enumerate() {
                include_refs.push((inc, format!("{path}.include[{j}]")));
            }
            if !ok {
                continue;
            }
            let includes = g.include.iter().map(|s| s.value.clone()).collect();
            if let Some(existing) = groups.iter_mut().find(|w| w.builtin && w.name == g.name.value) {
                // Same name as a built-in: the user's entries extend it.
                existing.patterns.extend(patterns);
                existing.includes = includes;
                if g.description.is_some() {
                    existing.description.clone_from(&g.description);
                }
            } else {
                groups.push(WebGroup {
                    name: g.name.value.clone(),
                    description: g.description.clone(),
                    patterns,
                    includes,
                    builtin: false,
                    at: pos(at),
                });
            }
        }
        let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
        for (inc, path) in include_refs {
            let _ = self.group_ref(inc, path, GroupKind::WebGroup, &names);
        }
        let graph: Vec<(String, Vec<String>)> = groups.iter().map(|g| (g.name.clone(), g.includes.clone())).collect();
        self.check_cycles(
            GroupKind::WebGroup,
            &graph,
            raw.iter().map(|g| (&g.value.name.value, g.referenced)),
        );
        groups
    }

    pub(super) fn smartgroups(
        &mut self,
        raw: &[S<raw::RawSmartGroup>],
        gateway: &[IpNet],
        inventory: &[Workload],
    ) -> Vec<SmartGroup> {
        let mut groups = match builtin::smartgroups(gateway) {
            Ok(g) => g,
            Err(e) => {
                self.err(
                    Location::UNKNOWN,
                    "",
                    ConfigErrorKind::InvalidValue { message: e.to_string() },
                );
                Vec::new()
            }
        };
        let workload_names: Vec<&str> = inventory.iter().map(|w| w.name.as_str()).collect();
        let mut seen = HashMap::new();
        let mut include_refs = Vec::new();
        for (i, g) in raw.iter().enumerate() {
            let (at, g) = (g.referenced, &g.value);
            let path = format!("smartgroups[{i}]");
            let ok = self.require(&g.name, at, &path, "name")
                && self.name(&g.name, &format!("{path}.name"), NameKind::SmartGroup, &mut seen);
            let mut cidrs = Vec::new();
            for (j, c) in g.cidrs.iter().enumerate() {
                match parse_cidr(&c.value) {
                    Ok(n) => cidrs.push(n),
                    Err(e) => self.err(
                        c.referenced,
                        format!("{path}.cidrs[{j}]"),
                        ConfigErrorKind::InvalidCidr(e),
                    ),
                }
            }
            for (j, s) in g.selectors.iter().enumerate() {
                if s.value.is_empty() {
                    self.err(
                        s.referenced,
                        format!("{path}.selectors[{j}]"),
                        ConfigErrorKind::EmptySelector,
                    );
                }
            }
            for (j, w) in g.workloads.iter().enumerate() {
                if !workload_names.contains(&w.value.as_str()) {
                    let suggestion = suggest(&w.value, workload_names.iter().copied());
                    self.err(
                        w.referenced,
                        format!("{path}.workloads[{j}]"),
                        ConfigErrorKind::UnknownWorkload {
                            name: w.value.clone(),
                            suggestion,
                        },
                    );
                }
            }
            for (j, inc) in g.include.iter().enumerate() {
                include_refs.push((inc, format!("{path}.include[{j}]")));
            }
            if !ok {
                continue;
            }
            if builtin::is_builtin_smartgroup(&g.name.value) {
                if g.name.value == builtin::ANY {
                    self.err(
                        g.name.referenced,
                        format!("{path}.name"),
                        ConfigErrorKind::BuiltinNotExtensible {
                            kind: GroupKind::SmartGroup,
                            name: g.name.value.clone(),
                            why: "it already holds every address; pick another name",
                        },
                    );
                    continue;
                }
                if let Some(existing) = groups.iter_mut().find(|s| s.name == g.name.value) {
                    existing.cidrs.extend(cidrs);
                    existing.selectors.extend(g.selectors.iter().map(|s| s.value.clone()));
                    existing.workloads.extend(g.workloads.iter().map(|s| s.value.clone()));
                    existing.includes = g.include.iter().map(|s| s.value.clone()).collect();
                }
                continue;
            }
            groups.push(SmartGroup {
                name: g.name.value.clone(),
                description: g.description.clone(),
                cidrs,
                selectors: g.selectors.iter().map(|s| s.value.clone()).collect(),
                workloads: g.workloads.iter().map(|s| s.value.clone()).collect(),
                includes: g.include.iter().map(|s| s.value.clone()).collect(),
                builtin: false,
                at: pos(at),
            });
        }
        let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
        for (inc, path) in include_refs {
            let _ = self.group_ref(inc, path, GroupKind::SmartGroup, &names);
        }
        let graph: Vec<(String, Vec<String>)> = groups.iter().map(|g| (g.name.clone(), g.includes.clone())).collect();
        self.check_cycles(
            GroupKind::SmartGroup,
            &graph,
            raw.iter().map(|g| (&g.value.name.value, g.referenced)),
        );
        groups
    }

    /// Reports each include cycle once, at the first group of it in the file.
    pub(super) fn check_cycles<'a>(
        &mut self,
        kind: GroupKind,
        graph: &[(String, Vec<String>)],
        positions: impl Iterator<Item = (&'a String, Location)>,
    ) {
        let index: HashMap<&str, usize> = graph.iter().enumerate().map(|(i, (n, _))| (n.as_str(), i)).collect();
        let positions: HashMap<&str, Location> = positions.map(|(n, l)| (n.as_str(), l)).collect();
        // 0 = unvisited, 1 = on stack, 2 = done
        let mut state = vec![0u8; graph.len()];
        let mut reported: HashSet<Vec<String>> = HashSet::new();
        for start in 0..graph.len() {
            if state[start] != 0 {
                continue;
            }
            let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
            state[start] = 1;
            while let Some(&mut (node, ref mut next)) = stack.last_mut() {
                let edges = &graph[node].1;
                if *next < edges.len() {
                    let target = edges[*next].as_str();
                    *next += 1;
                    let Some(&t) = index.get(target) else {
                        continue;
                    };
                    match state[t] {
                        0 => {
                            state[t] = 1;
                            stack.push((t, 0));
                        }
                        1 => {
                            let from = stack.iter().position(|(n, _)| *n == t).unwrap_or(0);
                            let mut cycle: Vec<String> =
                                stack[from..].iter().map(|(n, _)| graph[*n].0.clone()).collect();
                            cycle.push(graph[t].0.clone());
                            let mut key = cycle[..cycle.len() - 1].to_vec();
                            key.sort();
                            if reported.insert(key) {
                                let loc = positions.get(cycle[0].as_str()).copied().unwrap_or(Location::UNKNOWN);
                                self.err(loc, format!("{kind}s"), ConfigErrorKind::IncludeCycle { kind, cycle });
                            }
                        }
                        _ => {}
                    }
                } else {
                    state[node] = 2;
                    stack.pop();
                }
            }
        }
    }

    pub(super) fn group_ref(&mut self, r: &S<String>, path: String, kind: GroupKind, names: &[&str]) -> Option<String> {
        if names.contains(&r.value.as_str()) {
            return Some(r.value.clone());
        }
        let suggestion = suggest(&r.value, names.iter().copied());
        self.err(
            r.referenced,
            path,
            ConfigErrorKind::UnknownGroup {
                kind,
                name: r.value.clone(),
                suggestion,
            },
        );
        None
    }
}

/// Workloads in a SmartGroup through its selectors and workload names.
pub fn selected_workloads<'a>(group: &SmartGroup, inventory: &'a [Workload]) -> Vec<&'a Workload> {
    inventory
        .iter()
        .filter(|w| {
            group.workloads.contains(&w.name)
                || group
                    .selectors
                    .iter()
                    .any(|sel| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
        })
        .collect()
}

/// Labels used by a selector that no workload carries (for `sluice check`).
pub fn unmatched_selectors(group: &SmartGroup, inventory: &[Workload]) -> Vec<BTreeMap<String, String>> {
    group
        .selectors
        .iter()
        .filter(|sel| {
            !inventory
                .iter()
                .any(|w| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
        })
        .cloned()
        .collect()
}
