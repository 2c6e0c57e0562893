//! Built-in WebGroups and SmartGroups.
//!
//! They ship as plain text files under `api/data/` so a reviewer can read
//! exactly what `llm-providers` or `cloud-metadata` means, and are compiled
//! into the binary. A user config references them by name; a user group with
//! the same name extends the built-in one.

use ipnet::IpNet;

use crate::domain::DomainPattern;
use crate::model::{Pos, SmartGroup, WebGroup};
use crate::net::parse_cidr;

/// SmartGroup guarded by default (with the gateway's own addresses).
pub const CLOUD_METADATA: &str = "cloud-metadata";
pub const LINK_LOCAL: &str = "link-local";
pub const LOOPBACK: &str = "loopback";
pub const PRIVATE_RANGES: &str = "private-ranges";
pub const ANY: &str = "any";
/// The gateway's own addresses (listener addresses plus `gateway.addresses`).
pub const GATEWAY: &str = "gateway";
/// WebGroup of metadata-service names, guarded like `cloud-metadata`.
pub const CLOUD_METADATA_NAMES: &str = "cloud-metadata-names";
pub const DOH_RESOLVERS: &str = "doh-resolvers";

const WEBGROUPS: &[(&str, &str, &str)] = &[
    (
        "llm-providers",
        "Hosted large-language-model APIs",
        include_str!("../data/webgroups/llm-providers.txt"),
    ),
    (
        "package-registries",
        "Language package indexes and container registries",
        include_str!("../data/webgroups/package-registries.txt"),
    ),
    (
        DOH_RESOLVERS,
        "Public DNS-over-HTTPS resolvers (bypass the DNS proxy)",
        include_str!("../data/webgroups/doh-resolvers.txt"),
    ),
    (
        CLOUD_METADATA_NAMES,
        "Names of cloud instance-metadata services",
        include_str!("../data/webgroups/cloud-metadata-names.txt"),
    ),
];

const SMARTGROUPS: &[(&str, &str, &str)] = &[
    (
        CLOUD_METADATA,
        "Cloud instance-metadata service addresses",
        include_str!("../data/smartgroups/cloud-metadata.txt"),
    ),
    (
        LINK_LOCAL,
        "Link-local addresses",
        include_str!("../data/smartgroups/link-local.txt"),
    ),
    (
        LOOPBACK,
        "Loopback and unspecified addresses",
        include_str!("../data/smartgroups/loopback.txt"),
    ),
    (
        PRIVATE_RANGES,
        "RFC 1918, shared address space and IPv6 unique-local ranges",
        include_str!("../data/smartgroups/private-ranges.txt"),
    ),
    (ANY, "Every address", include_str!("../data/smartgroups/any.txt")),
];

/// Names of SmartGroups the built-in guard protects, in the order it checks.
pub const GUARDED_SMARTGROUPS: [&str; 4] = [CLOUD_METADATA, LINK_LOCAL, LOOPBACK, GATEWAY];

/// A line of a built-in data file that does not parse. Only reachable by
/// editing the data files; a unit test keeps them clean.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("built-in data file for `{group}`, line {line}: {message}")]
pub struct BuiltinError {
    pub group: &'static str,
    pub line: usize,
    pub message: String,
}

fn entries(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines().enumerate().filter_map(|(i, l)| {
        let l = l.split('#').next().unwrap_or("").trim();
        (!l.is_empty()).then_some((i + 1, l))
    })
}

/// The built-in WebGroups, parsed.
pub fn webgroups() -> Result<Vec<WebGroup>, BuiltinError> {
    WEBGROUPS
        .iter()
        .map(|&(name, description, text)| {
            let patterns = entries(text)
                .map(|(line, p)| {
                    DomainPattern::parse(p).map_err(|e| BuiltinError {
                        group: name,
                        line,
                        message: e.to_string(),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(WebGroup {
                name: name.to_owned(),
                description: Some(description.to_owned()),
                patterns,
                includes: Vec::new(),
                builtin: true,
                at: Pos::default(),
            })
        })
        .collect()
}

/// The built-in SmartGroups, parsed. `gateway` is included with the
/// addresses given here.
pub fn smartgroups(gateway: &[IpNet]) -> Result<Vec<SmartGroup>, BuiltinError> {
    let mut groups = SMARTGROUPS
        .iter()
        .map(|&(name, description, text)| {
            let cidrs = entries(text)
                .map(|(line, c)| {
                    parse_cidr(c).map_err(|e| BuiltinError {
                        group: name,
                        line,
                        message: e.to_string(),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(builtin_smartgroup(name, description, cidrs))
        })
        .collect::<Result<Vec<_>, _>>()?;
    groups.push(builtin_smartgroup(
        GATEWAY,
        "This gateway's own addresses",
        gateway.to_vec(),
    ));
    Ok(groups)
}

fn builtin_smartgroup(name: &str, description: &str, cidrs: Vec<IpNet>) -> SmartGroup {
    SmartGroup {
        name: name.to_owned(),
        description: Some(description.to_owned()),
        cidrs,
        selectors: Vec::new(),
        workloads: Vec::new(),
        includes: Vec::new(),
        builtin: true,
        at: Pos::default(),
    }
}

pub fn is_builtin_webgroup(name: &str) -> bool {
    WEBGROUPS.iter().any(|(n, _, _)| *n == name)
}

pub fn is_builtin_smartgroup(name: &str) -> bool {
    name == GATEWAY || SMARTGROUPS.iter().any(|(n, _, _)| *n == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_files_parse() {
        let web = webgroups().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(web.len(), WEBGROUPS.len());
        assert!(web.iter().all(|g| !g.patterns.is_empty()));
        let smart = smartgroups(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(smart.len(), SMARTGROUPS.len() + 1);
    }
}
