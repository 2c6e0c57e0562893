//! Reason codes: the stable, machine-readable "why" of every verdict, written
//! into audit records and metrics labels. Renaming one is a breaking change
//! for anyone alerting on it.

use std::fmt;

use serde::Serialize;

/// The "why" of a verdict. One vocabulary for the policy, the built-in
/// guard, the data plane's own checks and the DNS proxy; serialised as the
/// kebab-case codes users see in audit records and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

    /// The ClientHello's SNI names another host than the CONNECT target.
    SniMismatch,
    /// A plain-HTTP Host inside a tunnel names another host than its target.
    HostMismatch,
    /// A ClientHello without SNI in a tunnel to a named target.
    ConnectNoSni,
    /// The ClientHello carries Encrypted Client Hello (`ech: deny`).
    EchPresent,
    /// Transparent mode: the address dialled is not one the DNS proxy gave
    /// this client for the SNI.
    SniDestinationMismatch,
    /// A first TLS record that is not a handshake.
    TlsRecordOutOfPlace,
    /// Plain text on an `sni` listener.
    NotTls,
    /// A ClientHello without SNI on an `sni` listener.
    NoSni,
    /// An absolute-form request whose Host names another host than its URI.
    HttpConflictingHost,

    TlsNotHandshake,
    TlsSslv2,
    TlsBadVersion,
    TlsNotClientHello,
    TlsOversized,
    TlsMalformed,
    TlsBadSni,
    TlsDuplicateExtension,
    HttpMalformed,
    HttpOversized,
    HttpTooManyHeaders,
    HttpDuplicateHost,
    HttpMissingHost,
    HttpBadTarget,
    HttpUnsupportedScheme,
    HttpUserinfo,
    HttpBadHost,
    HttpBadPort,
    /// A datagram with no QUIC Initial where a flow must start with one (a
    /// short-header packet, or only 0-RTT/Handshake packets).
    QuicNotInitial,
    /// A QUIC version other than v1 (RFC 9000) and v2 (RFC 9369).
    QuicUnsupportedVersion,
    /// A Version Negotiation packet (version 0) from a client.
    QuicVersionNegotiation,
    /// A QUIC Initial whose header, frames or CRYPTO data do not parse or
    /// contradict each other.
    QuicMalformed,
    /// A QUIC Initial that fails authentication with the Initial keys.
    QuicDecryptFailed,
    /// CRYPTO data beyond the largest ClientHello accepted.
    QuicOversized,
    /// More Initial packets than a ClientHello may take.
    QuicTooManyPackets,
    /// A `quic: block` listener drops every QUIC flow, so clients fall
    /// back to TCP.
    QuicBlocked,
    /// More bytes than any ClientHello or request head may take.
    ClassifyOversized,
    /// The first bytes did not arrive within `peek_timeout`.
    PeekTimeout,
    /// The client closed before its first bytes classified.
    ClientClosedEarly,
    /// A socket error while reading the first bytes.
    ClientError,

    /// Proxy credentials missing or wrong.
    ProxyAuthRequired,
    /// `CONNECT` after another request on one proxy connection.
    ConnectNotFirst,
    /// No filter chain of the listener matches the flow.
    NoFilterChain,
    /// A transparent flow that was not redirected.
    NoOriginalDestination,
    /// A `tcp` listener's `upstream` is not a name or an address.
    BadUpstream,
    /// The process is stopping.
    Shutdown,
    /// No filter decided (never expected; fails closed).
    NoDecision,

    /// A WASM plugin denied the flow or query.
    PluginDenied,
    /// A WASM plugin allowed what a rule delegated to it.
    PluginAllowed,
    /// A plugin trapped, ran past its deadline or memory limit, or could
    /// not run; its failure policy decided.
    PluginFailed,

    DnsExfiltration,
    DnsInvalidName,
    DnsMalformed,
    DnsNotImplemented,
    DnsBadEdnsVersion,
    DnsZoneTransfer,
}

/// Which part of Sluice a reason comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReasonKind {
    /// A rule or the default decided.
    Policy,
    /// The built-in guard.
    Guard,
    /// An anti-evasion check.
    AntiEvasion,
    /// The first bytes could not be classified (fail closed).
    Classify,
    /// Refused by the listener before any policy question.
    Listener,
    /// The DNS proxy's own checks.
    Dns,
    /// A WASM plugin (the record's `rule` names it).
    Plugin,
}

impl ReasonKind {
    /// The `rule` a verdict of this kind names when no rule decided.
    pub fn rule_label(self) -> &'static str {
        match self {
            Self::Policy => "default",
            Self::Guard => "builtin-guard",
            Self::AntiEvasion => "anti-evasion",
            Self::Classify => "classify",
            Self::Listener => "listener",
            Self::Dns => "dns",
            Self::Plugin => "plugin",
        }
    }
}

macro_rules! codes {
    ($($variant:ident = $code:literal / $kind:ident),* $(,)?) => {
        impl ReasonCode {
            /// The code written to audit records and metrics labels.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $code,)*
                }
            }

            /// Where the reason comes from.
            pub const fn kind(self) -> ReasonKind {
                match self {
                    $(Self::$variant => ReasonKind::$kind,)*
                }
            }

            /// Every reason.
            pub const EVERY: &'static [ReasonCode] = &[$(Self::$variant,)*];
        }
    };
}

impl ReasonCode {
    /// Refused in every mode, watch included: what cannot be classified or
    /// routed (a malformed or out-of-place ClientHello, plain text or no
    /// SNI where the SNI is the destination, a request that contradicts
    /// itself, a DNS message that cannot be answered), and what the
    /// listener refuses before any policy question. Every other denial is
    /// only recorded in watch mode.
    pub const fn fails_closed(self) -> bool {
        match self.kind() {
            ReasonKind::Classify | ReasonKind::Listener => true,
            ReasonKind::Policy | ReasonKind::Guard | ReasonKind::Plugin => false,
            ReasonKind::AntiEvasion => matches!(
                self,
                Self::TlsRecordOutOfPlace | Self::NotTls | Self::NoSni | Self::HttpConflictingHost
            ),
            ReasonKind::Dns => !matches!(self, Self::DnsExfiltration),
        }
    }
}

codes! {
    AllowedByRule = "allowed-by-rule" / Policy,
    DeniedByRule = "denied-by-rule" / Policy,
    DefaultAllow = "default-allow" / Policy,
    DefaultDeny = "default-deny" / Policy,
    GuardCloudMetadata = "guard-cloud-metadata" / Guard,
    GuardLinkLocal = "guard-link-local" / Guard,
    GuardLoopback = "guard-loopback" / Guard,
    GuardGateway = "guard-gateway" / Guard,
    GuardPrivateRanges = "guard-private-ranges" / Guard,
    GuardMetadataName = "guard-metadata-name" / Guard,
    SniMismatch = "sni-mismatch" / AntiEvasion,
    HostMismatch = "host-mismatch" / AntiEvasion,
    ConnectNoSni = "connect-no-sni" / AntiEvasion,
    EchPresent = "ech-present" / AntiEvasion,
    SniDestinationMismatch = "sni-destination-mismatch" / AntiEvasion,
    TlsRecordOutOfPlace = "tls-record-out-of-place" / AntiEvasion,
    NotTls = "not-tls" / AntiEvasion,
    NoSni = "no-sni" / AntiEvasion,
    HttpConflictingHost = "http-conflicting-host" / AntiEvasion,
    TlsNotHandshake = "tls-not-handshake" / Classify,
    TlsSslv2 = "tls-sslv2" / Classify,
    TlsBadVersion = "tls-bad-version" / Classify,
    TlsNotClientHello = "tls-not-client-hello" / Classify,
    TlsOversized = "tls-oversized" / Classify,
    TlsMalformed = "tls-malformed" / Classify,
    TlsBadSni = "tls-bad-sni" / Classify,
    TlsDuplicateExtension = "tls-duplicate-extension" / Classify,
    HttpMalformed = "http-malformed" / Classify,
    HttpOversized = "http-oversized" / Classify,
    HttpTooManyHeaders = "http-too-many-headers" / Classify,
    HttpDuplicateHost = "http-duplicate-host" / Classify,
    HttpMissingHost = "http-missing-host" / Classify,
    HttpBadTarget = "http-bad-target" / Classify,
    HttpUnsupportedScheme = "http-unsupported-scheme" / Classify,
    HttpUserinfo = "http-userinfo" / Classify,
    HttpBadHost = "http-bad-host" / Classify,
    HttpBadPort = "http-bad-port" / Classify,
    QuicNotInitial = "quic-not-initial" / Classify,
    QuicUnsupportedVersion = "quic-unsupported-version" / Classify,
    QuicVersionNegotiation = "quic-version-negotiation" / Classify,
    QuicMalformed = "quic-malformed" / Classify,
    QuicDecryptFailed = "quic-decrypt-failed" / Classify,
    QuicOversized = "quic-oversized" / Classify,
    QuicTooManyPackets = "quic-too-many-packets" / Classify,
    ClassifyOversized = "classify-oversized" / Classify,
    PeekTimeout = "peek-timeout" / Classify,
    ClientClosedEarly = "client-closed-early" / Classify,
    ClientError = "client-error" / Classify,
    ProxyAuthRequired = "proxy-auth-required" / Listener,
    ConnectNotFirst = "connect-not-first" / Listener,
    NoFilterChain = "no-filter-chain" / Listener,
    NoOriginalDestination = "no-original-destination" / Listener,
    BadUpstream = "bad-upstream" / Listener,
    Shutdown = "shutdown" / Listener,
    NoDecision = "no-decision" / Listener,
    QuicBlocked = "quic-blocked" / Listener,
    PluginDenied = "plugin-denied" / Plugin,
    PluginAllowed = "plugin-allowed" / Plugin,
    PluginFailed = "plugin-failed" / Plugin,
    DnsExfiltration = "dns-exfiltration" / Dns,
    DnsInvalidName = "dns-invalid-name" / Dns,
    DnsMalformed = "dns-malformed" / Dns,
    DnsNotImplemented = "dns-not-implemented" / Dns,
    DnsBadEdnsVersion = "dns-bad-edns-version" / Dns,
    DnsZoneTransfer = "dns-zone-transfer" / Dns,
}

impl ReasonCode {
    /// The reasons the policy engine gives (rules, default, guard): what the
    /// policy conformance scenarios cover.
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

    /// The reason whose code is `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::EVERY.iter().copied().find(|r| r.as_str() == s)
    }
}

impl Serialize for ReasonCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_parse_back() {
        let mut seen = std::collections::HashSet::new();
        for r in ReasonCode::EVERY {
            assert!(seen.insert(r.as_str()), "{} twice", r.as_str());
            assert_eq!(ReasonCode::parse(r.as_str()), Some(*r));
            assert!(
                r.as_str()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
                "{}",
                r.as_str()
            );
        }
        for r in ReasonCode::ALL {
            assert!(matches!(r.kind(), ReasonKind::Policy | ReasonKind::Guard));
        }
    }

    #[test]
    fn what_fails_closed_is_what_cannot_be_classified_or_routed() {
        use ReasonCode as R;
        let closed = [
            R::TlsMalformed,
            R::QuicMalformed,
            R::QuicUnsupportedVersion,
            R::QuicDecryptFailed,
            R::TlsRecordOutOfPlace,
            R::HttpOversized,
            R::PeekTimeout,
            R::NotTls,
            R::NoSni,
            R::HttpConflictingHost,
            R::ProxyAuthRequired,
            R::NoFilterChain,
            R::NoOriginalDestination,
            R::QuicBlocked,
            R::DnsMalformed,
            R::DnsZoneTransfer,
        ];
        let watchable = [
            R::DeniedByRule,
            R::DefaultDeny,
            R::GuardCloudMetadata,
            R::GuardLoopback,
            R::SniMismatch,
            R::HostMismatch,
            R::ConnectNoSni,
            R::EchPresent,
            R::SniDestinationMismatch,
            R::DnsExfiltration,
        ];
        for r in closed {
            assert!(r.fails_closed(), "{r}");
        }
        for r in watchable {
            assert!(!r.fails_closed(), "{r}");
        }
    }
}
