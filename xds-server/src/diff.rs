//! `sluice-xds diff`: what serving a directory would change, against what
//! a running server serves now — per policy, the resources added, changed
//! and removed; per connected node, the policy it would get and whether
//! what it is sent changes.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::catalog::Catalog;

/// Per policy, per type URL, resource name → version.
pub type Versions = BTreeMap<String, BTreeMap<String, BTreeMap<String, String>>>;

/// The versions a catalog serves (what `GET /resources` answers).
pub fn versions(catalog: &Catalog) -> Versions {
    catalog
        .policies()
        .map(|(policy, snap)| {
            let types = snap
                .type_urls()
                .map(|t| {
                    let names = snap
                        .resources(t)
                        .iter()
                        .map(|r| (r.name.clone(), r.version.clone()))
                        .collect();
                    (t.to_owned(), names)
                })
                .collect();
            (policy, types)
        })
        .collect()
}

/// A connected node, as `GET /nodes` lists it.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct NodeSeen {
    pub node: Option<String>,
    pub cluster: Option<String>,
    pub policy: Option<String>,
}

/// What changes for one type of one policy.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Change {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
}

impl Change {
    fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

/// Per policy and type, what changes from `old` to `new`.
pub fn changes(old: &Versions, new: &Versions) -> BTreeMap<(String, String), Change> {
    let empty = BTreeMap::new();
    let mut out = BTreeMap::new();
    let policies: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for p in policies {
        let (o, n) = (old.get(p).unwrap_or(&empty), new.get(p).unwrap_or(&empty));
        let types: std::collections::BTreeSet<&String> = o.keys().chain(n.keys()).collect();
        for t in types {
            let none = BTreeMap::new();
            let (ov, nv) = (o.get(t).unwrap_or(&none), n.get(t).unwrap_or(&none));
            let mut c = Change::default();
            for (name, v) in nv {
                match ov.get(name) {
                    None => c.added.push(name.clone()),
                    Some(old_v) if old_v != v => c.changed.push(name.clone()),
                    Some(_) => {}
                }
            }
            c.removed = ov.keys().filter(|k| !nv.contains_key(*k)).cloned().collect();
            if !c.is_empty() {
                out.insert((p.clone(), t.clone()), c);
            }
        }
    }
    out
}

/// The report: per policy what changes, then per node what it would get.
pub fn report(old: &Versions, new: &Versions, new_catalog: &Catalog, nodes: &[NodeSeen]) -> String {
    let changes = changes(old, new);
    let mut out = String::new();
    if changes.is_empty() {
        out.push_str("no resource changes\n");
    }
    for ((policy, type_url), c) in &changes {
        let short = type_url.rsplit('/').next().unwrap_or(type_url);
        let _ = write!(out, "policy `{policy}`: {short}:");
        for (what, names) in [("added", &c.added), ("changed", &c.changed), ("removed", &c.removed)] {
            if !names.is_empty() {
                let _ = write!(out, " {what} {}", names.join(", "));
            }
        }
        out.push('\n');
    }
    for n in nodes {
        let Some(id) = &n.node else { continue };
        let node = envoy_types::pb::envoy::config::core::v3::Node {
            id: id.clone(),
            cluster: n.cluster.clone().unwrap_or_default(),
            ..Default::default()
        };
        let (would, target) = new_catalog.policy_for(&node);
        let now = n.policy.as_deref().unwrap_or("?");
        let by = target.map_or_else(|| "no target".to_owned(), |t| format!("target `{t}`"));
        let touched = changes.keys().any(|(p, _)| p == would);
        let what = match (now == would, touched) {
            (true, false) => "nothing changes".to_owned(),
            (true, true) => "its policy's resources change".to_owned(),
            (false, _) => format!("moves from policy `{now}`"),
        };
        let _ = writeln!(out, "node `{id}`: policy `{would}` ({by}): {what}");
    }
    out
}
