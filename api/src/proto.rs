//! Sluice's own xDS resources as protobuf messages (`proto/sluice/v1`),
//! generated at build time, and their type URLs.
//!
//! They carry the `sluice.yaml` vocabulary unchanged; turning them into a
//! checked configuration is the validator's job
//! ([`crate::config::Assembly`]), the same code that checks a file.

pub mod v1 {
    // Generated code: its doc comments come from the .proto file.
    #![allow(clippy::doc_markdown, clippy::derive_partial_eq_without_eq)]
    include!(concat!(env!("OUT_DIR"), "/sluice.v1.rs"));
}

/// Type URLs of Sluice's resources, as they appear in `Any.type_url` and
/// `DiscoveryRequest.type_url`.
pub mod type_url {
    pub const WEB_GROUP: &str = "type.googleapis.com/sluice.v1.WebGroup";
    pub const SMART_GROUP: &str = "type.googleapis.com/sluice.v1.SmartGroup";
    pub const WORKLOAD: &str = "type.googleapis.com/sluice.v1.Workload";
    pub const POLICY: &str = "type.googleapis.com/sluice.v1.Policy";
    /// ECDS: plugins travel as Envoy's extension configurations.
    pub const EXTENSION_CONFIG: &str = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig";
    /// Every Sluice type, in the order a gateway applies them (groups
    /// before the policy that names them).
    pub const ALL: [&str; 4] = [WEB_GROUP, SMART_GROUP, WORKLOAD, POLICY];
}

#[cfg(test)]
mod tests {
    use prost::Name;

    use super::v1;

    #[test]
    fn type_urls_are_what_prost_names() {
        assert_eq!(v1::WebGroup::type_url(), super::type_url::WEB_GROUP);
        assert_eq!(v1::SmartGroup::type_url(), super::type_url::SMART_GROUP);
        assert_eq!(v1::Workload::type_url(), super::type_url::WORKLOAD);
        assert_eq!(v1::Policy::type_url(), super::type_url::POLICY);
    }
}
