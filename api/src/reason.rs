//! Reason codes: the stable, machine-readable "why" of every verdict, written
//! into audit records and metrics labels. Renaming one is a breaking change
//! for anyone alerting on it.

use std::fmt;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ReasonCode {
    /// A user rule with `action: allow` matched.
    AllowedByRule,
    /// A user rule with `action: deny` matched.
    DeniedByRule,
    /// No rule matched; the policy default is allow.
    DefaultAllow,
    /// No rule matched; the policy default is deny.
    DefaultDeny,
    /// Built-in guard: destination in `cloud-metadata`.
    GuardCloudMetadata,
    /// Built-in guard: destination in `link-local`.
    GuardLinkLocal,
    /// Built-in guard: destination in `loopback`.
    GuardLoopback,
    /// Built-in guard: destination is the gateway itself.
    GuardGateway,
    /// Built-in guard: destination in `private-ranges` (`guard_private_ranges: true`).
    GuardPrivateRanges,
    /// Built-in guard: name in `cloud-metadata-names`.
    GuardMetadataName,
}

impl ReasonCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AllowedByRule => "allowed-by-rule",
            Self::DeniedByRule => "denied-by-rule",
            Self::DefaultAllow => "default-allow",
            Self::DefaultDeny => "default-deny",
            Self::GuardCloudMetadata => "guard-cloud-metadata",
            Self::GuardLinkLocal => "guard-link-local",
            Self::GuardLoopback => "guard-loopback",
            Self::GuardGateway => "guard-gateway",
            Self::GuardPrivateRanges => "guard-private-ranges",
            Self::GuardMetadataName => "guard-metadata-name",
        }
    }

    pub const ALL: [ReasonCode; 10] = [
        Self::AllowedByRule,
        Self::DeniedByRule,
        Self::DefaultAllow,
        Self::DefaultDeny,
        Self::GuardCloudMetadata,
        Self::GuardLinkLocal,
        Self::GuardLoopback,
        Self::GuardGateway,
        Self::GuardPrivateRanges,
        Self::GuardMetadataName,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
