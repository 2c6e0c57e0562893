//! Which node gets what: one snapshot per policy and choice of plugins
//! (the groups and the inventory are everyone's), and the targets that
//! pick them for a node by its id, cluster and metadata labels. A node no
//! target picks gets the `policy:` of the configuration and every plugin.

use std::collections::BTreeMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::value::Kind;
use sluice_api::Target;
use sluice_api::config::Resources;

use crate::snapshot::{Snapshot, SnapshotError};

fn choice(t: &Target) -> Choice {
    Choice {
        plugins: t.plugins.clone(),
        listeners: t.listeners.clone(),
    }
}

/// Whether a node is a Sluice gateway (its client names itself so).
pub fn is_sluice(node: &Node) -> bool {
    node.user_agent_name == "sluice"
}

/// What a target chooses besides the policy; `None`: every one.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Choice {
    pub plugins: Option<Vec<String>>,
    pub listeners: Option<Vec<String>>,
}

impl Choice {
    /// Whether the resource of listener `name` is chosen.
    pub fn listener(&self, name: &str) -> bool {
        self.listeners.as_ref().is_none_or(|l| l.iter().any(|n| n == name))
    }

    /// Whether plugin `name` is chosen.
    pub fn plugin(&self, name: &str) -> bool {
        self.plugins.as_ref().is_none_or(|l| l.iter().any(|n| n == name))
    }
}

/// A policy, what the target chooses, and whether for Sluice gateways.
type Key = (String, Choice, bool);

/// Everything the server serves, by node.
#[derive(Debug, Clone)]
pub struct Catalog {
    /// The policy of nodes no target picks.
    default: String,
    /// By policy, the plugins chosen (`None`: all), and whether the node
    /// is a Sluice gateway (which takes Sluice-shaped listeners, where
    /// stock Envoy takes the policy translated into RBAC).
    by_policy: BTreeMap<Key, Arc<Snapshot>>,
    targets: Vec<Target>,
}

impl Catalog {
    /// One snapshot per policy of `resources` and choice of plugins the
    /// targets make (made by `make`, given the plugins to include, `None`
    /// for all), and the targets of the configuration.
    pub fn build(
        resources: &Resources,
        default: &str,
        targets: Vec<Target>,
        make: impl Fn(&Resources, &Choice, bool) -> Result<Snapshot, SnapshotError>,
    ) -> Result<Self, SnapshotError> {
        let keys = std::iter::once((default.to_owned(), Choice::default()))
            .chain(targets.iter().map(|t| (t.policy.clone(), choice(t))))
            .collect::<std::collections::BTreeSet<_>>();
        let mut by_policy = BTreeMap::new();
        for (policy, chosen) in keys {
            // No `policy:` written: such nodes get the groups and no
            // policy resource (they keep their own file's).
            let one = Resources {
                policies: Some(
                    resources
                        .policies
                        .iter()
                        .flatten()
                        .filter(|p| p.name == policy)
                        .cloned()
                        .collect(),
                ),
                ..resources.clone()
            };
            for sluice in [false, true] {
                let snap = make(&one, &chosen, sluice)?;
                by_policy.insert((policy.clone(), chosen.clone(), sluice), Arc::new(snap));
            }
        }
        Ok(Self {
            default: default.to_owned(),
            by_policy,
            targets,
        })
    }

    /// The policy a node gets and the name of the target that picked it
    /// (`None`: no target did).
    pub fn policy_for(&self, node: &Node) -> (&str, Option<&str>) {
        let label = |k: &str| {
            let v = node.metadata.as_ref()?.fields.get(k)?;
            match v.kind.as_ref()? {
                Kind::StringValue(s) => Some(s.clone()),
                Kind::NumberValue(n) => Some(n.to_string()),
                Kind::BoolValue(b) => Some(b.to_string()),
                _ => None,
            }
        };
        match self.targets.iter().find(|t| t.matches(&node.id, &node.cluster, label)) {
            Some(t) => (t.policy.as_str(), Some(t.name.as_str())),
            None => (self.default.as_str(), None),
        }
    }

    /// The snapshot for a node.
    pub fn for_node(&self, node: &Node) -> Arc<Snapshot> {
        let (policy, target) = self.policy_for(node);
        let chosen = target
            .and_then(|t| self.targets.iter().find(|x| x.name == t))
            .map(choice)
            .unwrap_or_default();
        self.get(policy, chosen, is_sluice(node))
    }

    fn get(&self, policy: &str, chosen: Choice, sluice: bool) -> Arc<Snapshot> {
        self.by_policy
            .get(&(policy.to_owned(), chosen, sluice))
            .or_else(|| self.by_policy.get(&(self.default.clone(), Choice::default(), sluice)))
            .cloned()
            .unwrap_or_default()
    }

    /// The snapshot of a policy with every plugin (the default's for an
    /// unknown name).
    pub fn snapshot(&self, policy: &str) -> Arc<Snapshot> {
        self.get(policy, Choice::default(), false)
    }

    /// Every snapshot, labelled by its policy (and the plugins chosen,
    /// when a target chooses).
    pub fn policies(&self) -> impl Iterator<Item = (String, &Arc<Snapshot>)> {
        self.by_policy.iter().map(|((p, chosen, sluice), s)| {
            let mut label = p.clone();
            if let Some(list) = &chosen.plugins {
                label.push_str(&format!(" (plugins: {})", list.join(", ")));
            }
            if let Some(list) = &chosen.listeners {
                label.push_str(&format!(" (listeners: {})", list.join(", ")));
            }
            if *sluice {
                label.push_str(" [sluice gateways]");
            }
            (label, s)
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

    use std::collections::HashMap;

    use envoy_types::pb::google::protobuf::{Struct, Value};
    use sluice_api::proto::v1 as pb;

    use super::*;

    fn node(id: &str, cluster: &str, labels: &[(&str, &str)]) -> Node {
        let fields: HashMap<String, Value> = labels
            .iter()
            .map(|(k, v)| {
                let v = Value {
                    kind: Some(Kind::StringValue((*v).to_owned())),
                };
                ((*k).to_owned(), v)
            })
            .collect();
        Node {
            id: id.into(),
            cluster: cluster.into(),
            metadata: Some(Struct { fields }),
            ..Default::default()
        }
    }

    fn target(name: &str, ids: &[&str], clusters: &[&str], labels: &[(&str, &str)], policy: &str) -> Target {
        Target {
            name: name.into(),
            ids: ids.iter().map(|s| (*s).to_owned()).collect(),
            clusters: clusters.iter().map(|s| (*s).to_owned()).collect(),
            labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            policy: policy.into(),
            plugins: None,
            listeners: None,
        }
    }

    fn catalog(targets: Vec<Target>) -> Catalog {
        let policy = |n: &str| pb::Policy {
            name: n.into(),
            ..Default::default()
        };
        let resources = Resources {
            webgroups: Some(vec![pb::WebGroup {
                name: "shared".into(),
                ..Default::default()
            }]),
            policies: Some(vec![policy("default"), policy("strict"), policy("lab")]),
            ..Default::default()
        };
        Catalog::build(&resources, "default", targets, |r, _, _| {
            crate::source::snapshot(r, &[])
        })
        .unwrap()
    }

    #[test]
    fn targets_pick_by_id_cluster_and_labels_first_match_first() {
        let c = catalog(vec![
            target("one-gateway", &["gw-7"], &[], &[], "lab"),
            target("eu-build", &[], &["build"], &[("zone", "eu")], "strict"),
            target("any-build", &[], &["build"], &[], "lab"),
        ]);
        assert_eq!(
            c.policy_for(&node("gw-7", "build", &[("zone", "eu")])),
            ("lab", Some("one-gateway"))
        );
        assert_eq!(
            c.policy_for(&node("gw-1", "build", &[("zone", "eu")])),
            ("strict", Some("eu-build"))
        );
        assert_eq!(
            c.policy_for(&node("gw-1", "build", &[("zone", "us")])),
            ("lab", Some("any-build"))
        );
        assert_eq!(c.policy_for(&node("gw-1", "build", &[])), ("lab", Some("any-build")));
        assert_eq!(
            c.policy_for(&node("gw-1", "prod", &[("zone", "eu")])),
            ("default", None)
        );
    }

    #[test]
    fn each_snapshot_holds_the_shared_groups_and_one_policy() {
        let c = catalog(vec![target("all-strict", &[], &[], &[], "strict")]);
        let snap = c.for_node(&node("x", "", &[]));
        let policies = snap.resources(sluice_api::proto::type_url::POLICY);
        assert_eq!(policies.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(), ["strict"]);
        assert!(
            snap.resources(sluice_api::proto::type_url::WEB_GROUP)
                .contains("shared")
        );
        // The shared groups are the same resource, at the same version, in
        // every policy's snapshot.
        let versions: Vec<String> = c
            .policies()
            .map(|(_, s)| {
                s.resources(sluice_api::proto::type_url::WEB_GROUP)
                    .get("shared")
                    .unwrap()
                    .version
                    .clone()
            })
            .collect();
        assert!(versions.windows(2).all(|w| w[0] == w[1]), "{versions:?}");
    }

    #[test]
    fn without_a_default_policy_untargeted_nodes_get_none() {
        let resources = Resources {
            policies: Some(vec![pb::Policy {
                name: "only".into(),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let c = Catalog::build(&resources, "default", Vec::new(), |r, _, _| {
            crate::source::snapshot(r, &[])
        })
        .unwrap();
        let snap = c.for_node(&node("x", "", &[]));
        assert!(snap.resources(sluice_api::proto::type_url::POLICY).is_empty());
        assert!(
            snap.get(sluice_api::proto::type_url::POLICY).is_some(),
            "listed, so the node hears there is none"
        );
    }

    #[test]
    fn a_target_can_choose_the_plugins_its_nodes_get() {
        use crate::snapshot::{Resource, type_url};
        let resources = Resources {
            policies: Some(vec![pb::Policy {
                name: "default".into(),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let mut few = target("few", &["gw-1"], &[], &[], "default");
        few.plugins = Some(vec!["a".into()]);
        let make = |r: &Resources, chosen: &Choice, _sluice: bool| {
            let ext: Vec<Resource> = ["a", "b"]
                .into_iter()
                .filter(|n| chosen.plugin(n))
                .map(|n| {
                    let body = envoy_types::pb::google::protobuf::Any {
                        type_url: type_url::TYPED_EXTENSION_CONFIG.into(),
                        value: n.as_bytes().to_vec(),
                    };
                    Resource::new(n, body)
                })
                .collect();
            crate::source::snapshot(r, &ext)
        };
        let c = Catalog::build(&resources, "default", vec![few], make).unwrap();
        let names = |snap: Arc<Snapshot>| {
            snap.resources(type_url::TYPED_EXTENSION_CONFIG)
                .iter()
                .map(|r| r.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(c.for_node(&node("gw-1", "", &[]))), ["a"]);
        assert_eq!(names(c.for_node(&node("gw-2", "", &[]))), ["a", "b"]);
        assert_eq!(
            c.policies().count(),
            4,
            "one snapshot per policy, choice of plugins and kind of node"
        );
    }

    #[test]
    fn a_target_can_choose_the_listeners_its_nodes_get() {
        use crate::snapshot::type_url;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("l.yaml"),
            "listeners:\n  - {name: db, kind: tcp, address: \"127.0.0.1:15432\", upstream: \"10.0.0.5:5432\"}\n  - {name: cache, kind: tcp, address: \"127.0.0.1:16379\", upstream: \"10.0.0.6:6379\"}\n\
             policy: {}\npolicies:\n  - {name: p}\ntargets:\n  - {name: db-only, nodes: {ids: [gw-1]}, policy: p, listeners: [db]}\n",
        )
        .unwrap();
        let loaded = crate::source::Source::Dir(dir.path().to_path_buf()).load().unwrap();
        let mut gw1 = node("gw-1", "", &[]);
        gw1.user_agent_name = "sluice".into();
        let mut gw2 = node("gw-2", "", &[]);
        gw2.user_agent_name = "sluice".into();
        let names = |n: &Node, t: &str| {
            loaded
                .catalog
                .for_node(n)
                .resources(t)
                .iter()
                .map(|r| r.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&gw1, type_url::LISTENER), ["db"]);
        // A gateway's tcp listener carries its upstream in its own filter.
        assert!(names(&gw1, type_url::CLUSTER).is_empty());
        assert_eq!(names(&gw2, type_url::LISTENER), ["cache", "db"]);
    }

    #[test]
    fn a_target_can_choose_plain_envoy_listeners_too() {
        use crate::snapshot::type_url;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("l.yaml"),
            "policy: {}\npolicies:\n  - {name: p}\ntargets:\n  - {name: edge-only, nodes: {ids: [gw-1]}, policy: p, listeners: [edge]}\n",
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("envoy")).unwrap();
        let listener = |name: &str, port: u16| {
            format!(
                "\"@type\": type.googleapis.com/envoy.config.listener.v3.Listener
name: {name}
address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
filter_chains:
- filters:
  - name: envoy.filters.network.tcp_proxy
    typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: s, cluster: c}}
---
"
            )
        };
        std::fs::write(
            dir.path().join("envoy/l.yaml"),
            format!(
                "{}{}\"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster\nname: c\ntype: STATIC\nload_assignment: {{cluster_name: c}}\n",
                listener("edge", 15001),
                listener("inner", 15002)
            ),
        )
        .unwrap();
        let loaded = crate::source::Source::Dir(dir.path().to_path_buf()).load().unwrap();
        let names = |n: &Node, t: &str| {
            loaded
                .catalog
                .for_node(n)
                .resources(t)
                .iter()
                .map(|r| r.name.clone())
                .collect::<Vec<_>>()
        };
        for sluice in [true, false] {
            let mut gw1 = node("gw-1", "", &[]);
            let mut gw2 = node("gw-2", "", &[]);
            if sluice {
                gw1.user_agent_name = "sluice".into();
                gw2.user_agent_name = "sluice".into();
            }
            assert_eq!(names(&gw1, type_url::LISTENER), ["edge"], "sluice node: {sluice}");
            assert_eq!(names(&gw1, type_url::CLUSTER), ["c"], "clusters stay");
            assert_eq!(names(&gw2, type_url::LISTENER), ["edge", "inner"]);
        }

        // A name defined nowhere is still refused.
        std::fs::write(
            dir.path().join("l.yaml"),
            "policy: {}\npolicies:\n  - {name: p}\ntargets:\n  - {name: t, nodes: {ids: [gw-1]}, policy: p, listeners: [edg]}\n",
        )
        .unwrap();
        let e = crate::source::Source::Dir(dir.path().to_path_buf()).load().unwrap_err();
        assert!(e.to_string().contains("no listener named `edg`"), "{e}");
    }
}
