//! What one node should have: the resources `sluice-xds` serves to it, grouped
//! by type URL, each with a content version.
//!
//! A [`Snapshot`] is the input of the ADS protocol core ([`crate::ads`]): the
//! core compares it with what a stream has already sent and decides what to
//! send next. Snapshots are immutable and shared (`Arc`) between every stream
//! of the nodes they are meant for; a change of configuration makes a new one.
//! They are built only through [`SnapshotBuilder`], which refuses what the
//! protocol forbids on the wire (a name twice in one type, S5; a resource
//! without a name or type), so the core can send a snapshot as it is.
//!
//! Versions are content hashes, never counters: with several `sluice-xds`
//! replicas a version must mean the same content everywhere (rule S30 in
//! `notes/xds-protocol.md`).

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

use envoy_types::pb::google::protobuf::Any;
use ring::digest;

/// Type URLs the control server knows by name. Any other type URL can still
/// be served; these are the ones with a rule attached (order, full state,
/// warming).
pub mod type_url {
    /// LDS.
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    /// CDS.
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    /// EDS.
    pub const CLUSTER_LOAD_ASSIGNMENT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    /// RDS.
    pub const ROUTE_CONFIGURATION: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    /// VHDS (Delta only).
    pub const VIRTUAL_HOST: &str = "type.googleapis.com/envoy.config.route.v3.VirtualHost";
    /// SDS.
    pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
    /// ECDS.
    pub const TYPED_EXTENSION_CONFIG: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
    /// Sluice's web groups.
    pub const SLUICE_WEB_GROUP: &str = "type.googleapis.com/sluice.v1.WebGroup";
    /// Sluice's smart groups.
    pub const SLUICE_SMART_GROUP: &str = "type.googleapis.com/sluice.v1.SmartGroup";
    /// Sluice's workloads.
    pub const SLUICE_WORKLOAD: &str = "type.googleapis.com/sluice.v1.Workload";
    /// Sluice's policies.
    pub const SLUICE_POLICY: &str = "type.googleapis.com/sluice.v1.Policy";
}

/// One named resource, encoded, with the version of its content.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    /// The name clients subscribe to.
    pub name: String,
    /// Opaque version of this resource's content: the Delta `Resource.version`,
    /// and an input of the SotW version of its type.
    pub version: String,
    /// The encoded resource; its `type_url` is the type it is served under.
    pub body: Any,
    /// For a Cluster served by EDS: the ClusterLoadAssignment name it asks for
    /// (`eds_cluster_config.service_name`, or else the cluster name). Set by
    /// whoever builds the snapshot, so the protocol core can resend that CLA
    /// when the cluster changes (cluster warming, rule A7) without decoding
    /// Envoy's Cluster message.
    pub eds_name: Option<String>,
}

impl Resource {
    /// A resource whose version is a hash of its encoded content, so equal
    /// content has an equal version on every replica.
    pub fn new(name: impl Into<String>, body: Any) -> Self {
        let version = short_hex(digest::digest(&digest::SHA256, &body.value).as_ref());
        Resource {
            name: name.into(),
            version,
            body,
            eds_name: None,
        }
    }

    /// A resource with a version chosen by the caller (e.g. a store revision).
    pub fn with_version(name: impl Into<String>, version: impl Into<String>, body: Any) -> Self {
        Resource {
            name: name.into(),
            version: version.into(),
            body,
            eds_name: None,
        }
    }

    /// Marks a Cluster as served by EDS under `cla_name`.
    #[must_use]
    pub fn with_eds_name(mut self, cla_name: impl Into<String>) -> Self {
        self.eds_name = Some(cla_name.into());
        self
    }

    /// The type URL this resource is served under.
    pub fn type_url(&self) -> &str {
        &self.body.type_url
    }
}

/// The resources of one type for one node, with the version of the set.
#[derive(Debug, Clone, PartialEq)]
pub struct TypeResources {
    version: String,
    resources: BTreeMap<String, Arc<Resource>>,
}

impl TypeResources {
    fn new(resources: BTreeMap<String, Arc<Resource>>) -> Self {
        // The SotW `version_info` of the type: a hash over the sorted
        // (name, version) pairs, each length-prefixed so that no two
        // different sets hash the same input.
        let mut ctx = digest::Context::new(&digest::SHA256);
        for (name, r) in &resources {
            for part in [name.as_bytes(), r.version.as_bytes()] {
                ctx.update(&(part.len() as u64).to_be_bytes());
                ctx.update(part);
            }
        }
        let version = short_hex(ctx.finish().as_ref());
        TypeResources { version, resources }
    }

    /// The aggregate version: changes whenever a resource is added, removed,
    /// or changes version. Never empty.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The resource called `name`, if there is one.
    pub fn get(&self, name: &str) -> Option<&Arc<Resource>> {
        self.resources.get(name)
    }

    /// Whether there is a resource called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.resources.contains_key(name)
    }

    /// The resources, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Resource>> {
        self.resources.values()
    }

    /// How many resources there are.
    pub fn len(&self) -> usize {
        self.resources.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.resources.is_empty()
    }
}

/// A type with no resources: what a snapshot holds for a type it does not list.
static EMPTY: LazyLock<TypeResources> = LazyLock::new(|| TypeResources::new(BTreeMap::new()));

/// Everything one node should have, by type URL. Immutable and shared.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Snapshot {
    types: BTreeMap<String, TypeResources>,
}

impl Snapshot {
    /// Starts a snapshot.
    pub fn builder() -> SnapshotBuilder {
        SnapshotBuilder::default()
    }

    /// The resources of `type_url`, if the snapshot lists that type.
    pub fn get(&self, type_url: &str) -> Option<&TypeResources> {
        self.types.get(type_url)
    }

    /// The resources of `type_url`; a type the snapshot does not list has
    /// none. For the protocol core an unlisted type and an empty one are the
    /// same thing: there is nothing of it for this node.
    pub fn resources(&self, type_url: &str) -> &TypeResources {
        self.types.get(type_url).unwrap_or(&EMPTY)
    }

    /// The type URLs the snapshot lists.
    pub fn type_urls(&self) -> impl Iterator<Item = &str> {
        self.types.keys().map(String::as_str)
    }
}

/// Why a resource was refused by [`SnapshotBuilder::add`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The resource's `body.type_url` is empty.
    #[error("resource {name:?} has no type URL")]
    MissingTypeUrl {
        /// The resource's name.
        name: String,
    },
    /// The resource has no name; clients could not subscribe to it.
    #[error("a resource of type {type_url} has no name")]
    MissingName {
        /// Its type URL.
        type_url: String,
    },
    /// The resource has an empty version (Delta sends it as is, D2).
    #[error("resource {name:?} of type {type_url} has an empty version")]
    MissingVersion {
        /// Its type URL.
        type_url: String,
        /// Its name.
        name: String,
    },
    /// Two resources of one type have the same name (xDS rule S5: a client
    /// NACKs such a response).
    #[error("resource {name:?} of type {type_url} is given twice")]
    DuplicateName {
        /// Its type URL.
        type_url: String,
        /// The name given twice.
        name: String,
    },
}

/// Collects resources into a [`Snapshot`].
#[derive(Debug, Default)]
pub struct SnapshotBuilder {
    types: BTreeMap<String, BTreeMap<String, Arc<Resource>>>,
}

impl SnapshotBuilder {
    /// Lists `type_url` even if no resource of it is added, to say "this node
    /// has none of these". (The core treats an unlisted type the same way;
    /// listing it makes the snapshot say so explicitly.)
    #[must_use]
    pub fn with_type(mut self, type_url: impl Into<String>) -> Self {
        self.types.entry(type_url.into()).or_default();
        self
    }

    /// Adds a resource under the type URL of its body.
    pub fn add(&mut self, resource: Resource) -> Result<(), SnapshotError> {
        if resource.body.type_url.is_empty() {
            return Err(SnapshotError::MissingTypeUrl { name: resource.name });
        }
        if resource.name.is_empty() {
            return Err(SnapshotError::MissingName {
                type_url: resource.body.type_url,
            });
        }
        let of_type = self.types.entry(resource.body.type_url.clone()).or_default();
        if of_type.contains_key(&resource.name) {
            return Err(SnapshotError::DuplicateName {
                type_url: resource.body.type_url,
                name: resource.name,
            });
        }
        of_type.insert(resource.name.clone(), Arc::new(resource));
        Ok(())
    }

    /// The snapshot, with the aggregate version of each type.
    pub fn build(self) -> Snapshot {
        Snapshot {
            types: self
                .types
                .into_iter()
                .map(|(url, rs)| (url, TypeResources::new(rs)))
                .collect(),
        }
    }
}

/// The first 16 hex digits (64 bits) of a digest: short enough to read in
/// logs and the admin API, long enough that two contents never collide in
/// practice.
pub(crate) fn short_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().take(8).fold(String::with_capacity(16), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]
mod tests {
    use super::*;

    fn any(type_url: &str, value: &str) -> Any {
        Any {
            type_url: type_url.to_owned(),
            value: value.as_bytes().to_vec(),
        }
    }

    #[test]
    fn resource_version_is_a_content_hash() {
        let a = Resource::new("a", any(type_url::CLUSTER, "x"));
        let b = Resource::new("b", any(type_url::CLUSTER, "x"));
        let c = Resource::new("a", any(type_url::CLUSTER, "y"));
        assert_eq!(a.version, b.version);
        assert_ne!(a.version, c.version);
        assert_eq!(a.version.len(), 16);
        assert!(
            a.version
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
    }

    #[test]
    fn aggregate_version_depends_on_names_and_versions_only() {
        let build = |items: &[(&str, &str)]| {
            let mut b = Snapshot::builder();
            for (n, v) in items {
                b.add(Resource::new(*n, any(type_url::CLUSTER, v))).unwrap();
            }
            b.build().resources(type_url::CLUSTER).version().to_owned()
        };
        let v1 = build(&[("a", "1"), ("b", "2")]);
        assert_eq!(v1, build(&[("b", "2"), ("a", "1")]), "insertion order does not matter");
        assert_ne!(v1, build(&[("a", "1"), ("b", "3")]), "a changed resource changes it");
        assert_ne!(v1, build(&[("a", "1")]), "a removed resource changes it");
        // Length prefixes: moving a byte between name and version is a change.
        let x = Resource::with_version("ab", "c", any(type_url::CLUSTER, ""));
        let y = Resource::with_version("a", "bc", any(type_url::CLUSTER, ""));
        let one = |r: Resource| {
            let mut b = Snapshot::builder();
            b.add(r).unwrap();
            b.build().resources(type_url::CLUSTER).version().to_owned()
        };
        assert_ne!(one(x), one(y));
    }

    #[test]
    fn unlisted_type_is_empty_with_a_version() {
        let snap = Snapshot::builder().with_type(type_url::LISTENER).build();
        assert!(snap.get(type_url::LISTENER).unwrap().is_empty());
        assert!(snap.get(type_url::CLUSTER).is_none());
        let empty = snap.resources(type_url::CLUSTER);
        assert!(empty.is_empty());
        assert!(!empty.version().is_empty());
        assert_eq!(empty.version(), snap.resources(type_url::LISTENER).version());
    }

    #[test]
    fn builder_refuses_what_the_wire_forbids() {
        let mut b = Snapshot::builder();
        b.add(Resource::new("a", any(type_url::CLUSTER, "1"))).unwrap();
        assert_eq!(
            b.add(Resource::new("a", any(type_url::CLUSTER, "2"))),
            Err(SnapshotError::DuplicateName {
                type_url: type_url::CLUSTER.into(),
                name: "a".into()
            })
        );
        // The same name under another type is another resource.
        b.add(Resource::new("a", any(type_url::LISTENER, "1"))).unwrap();
        assert_eq!(
            b.add(Resource::new("", any(type_url::CLUSTER, "1"))),
            Err(SnapshotError::MissingName {
                type_url: type_url::CLUSTER.into()
            })
        );
        assert_eq!(
            b.add(Resource::new("z", any("", "1"))),
            Err(SnapshotError::MissingTypeUrl { name: "z".into() })
        );
        let snap = b.build();
        assert_eq!(
            snap.type_urls().collect::<Vec<_>>(),
            [type_url::CLUSTER, type_url::LISTENER]
        );
        assert_eq!(snap.resources(type_url::CLUSTER).get("a").unwrap().body.value, b"1");
    }

    #[test]
    fn eds_name_is_carried() {
        let r = Resource::new("c", any(type_url::CLUSTER, "1")).with_eds_name("c-eds");
        assert_eq!(r.eds_name.as_deref(), Some("c-eds"));
        assert_eq!(r.type_url(), type_url::CLUSTER);
    }
}
