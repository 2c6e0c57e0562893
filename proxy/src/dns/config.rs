//! Runtime configuration of the DNS proxy.
//!
//! These are the already-checked values the proxy runs with; the friendly
//! `sluice.yaml` / xDS translation (owned by the config layer) produces one of
//! these. [`DnsConfig::validate`] is the single place the combination of
//! fields is checked, and [`super::DnsCore::new`] refuses a config that fails it.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use super::DnsError;

/// How an upstream resolver is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum UpstreamProto {
    /// UDP, retried over TCP when the answer comes back truncated.
    Udp,
    /// TCP only (RFC 7766 framing).
    Tcp,
    /// DNS-over-TLS (RFC 7858); `server_name` is checked against the certificate.
    Tls { server_name: String },
}

/// One upstream resolver. Upstreams are tried in the order configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub proto: UpstreamProto,
}

impl Upstream {
    pub fn udp(addr: SocketAddr) -> Self {
        Self {
            addr,
            proto: UpstreamProto::Udp,
        }
    }

    pub fn tcp(addr: SocketAddr) -> Self {
        Self {
            addr,
            proto: UpstreamProto::Tcp,
        }
    }

    pub fn tls(addr: SocketAddr, server_name: impl Into<String>) -> Self {
        Self {
            addr,
            proto: UpstreamProto::Tls {
                server_name: server_name.into(),
            },
        }
    }
}

/// What a workload gets back for a query the policy denies (enforce mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum DenyAnswer {
    /// "No such name": the least surprising failure for clients.
    #[default]
    NxDomain,
    /// "I will not answer that": tells an operator debugging a client that a
    /// policy, not the DNS, is in the way.
    Refused,
    /// A fixed address (A for v4, AAAA for v6; NODATA for other types), so the
    /// workload's connection lands somewhere observable.
    Sinkhole { v4: Ipv4Addr, v6: Ipv6Addr },
}

/// Response cache bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    /// Entry cap (LRU beyond it). Zero disables the cache.
    pub max_entries: usize,
    /// Upper bound on how long a positive answer is kept, whatever its TTL.
    pub max_ttl: Duration,
    /// Upper bound for negative answers (RFC 2308 §5 suggests hours at most).
    pub max_negative_ttl: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_entries: 65_536,
            max_ttl: Duration::from_secs(86_400),
            max_negative_ttl: Duration::from_secs(3_600),
        }
    }
}

/// IP → name bindings handed to the data plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingsConfig {
    /// A binding lives at least this long, whatever the record's TTL:
    /// clients keep using addresses past short TTLs, and a flow refused for
    /// that reason is a false positive.
    pub min_ttl: Duration,
    /// Extra time after the (floored) TTL before a binding is forgotten.
    pub grace: Duration,
    /// Cap on (source, address, name) bindings in total (LRU by address).
    pub max_entries: usize,
    /// Cap on bindings for one address (a CDN address serves many names and
    /// many sources); the soonest to expire is evicted first.
    pub max_per_destination: usize,
    /// Cap on names one source holds for one address (a wildcard zone
    /// behind one address, queried with ever-new labels, would otherwise
    /// grow without bound); the soonest to expire is evicted first.
    pub max_names_per_pair: usize,
    /// Cap on sources tracked by `has_bindings_for_source`.
    pub max_sources: usize,
}

impl Default for BindingsConfig {
    fn default() -> Self {
        Self {
            min_ttl: Duration::from_secs(60),
            grace: Duration::from_secs(30),
            max_entries: 262_144,
            max_per_destination: 4_096,
            max_names_per_pair: 64,
            max_sources: 65_536,
        }
    }
}

/// Exfiltration-shaped query detection. Off unless configured.
#[derive(Debug, Clone, PartialEq)]
pub struct ExfilConfig {
    /// A label longer than this is flagged (legitimate labels are rarely long;
    /// tunnelling tools pack as much as a label holds).
    pub max_label_len: usize,
    /// Labels at least this long are checked for entropy (short labels have
    /// too few characters for the estimate to mean anything).
    pub entropy_min_len: usize,
    /// Shannon entropy, bits per character, above which a label is flagged.
    pub entropy_threshold: f64,
    /// Unique subdomains of one parent (its registrable name) from one source per
    /// minute above which further new subdomains are flagged.
    pub max_unique_subdomains_per_minute: usize,
    /// Cap on (source, parent) windows tracked (LRU beyond it).
    pub max_tracked: usize,
}

impl Default for ExfilConfig {
    fn default() -> Self {
        Self {
            max_label_len: 50,
            entropy_min_len: 24,
            entropy_threshold: 4.2,
            max_unique_subdomains_per_minute: 100,
            max_tracked: 16_384,
        }
    }
}

/// Everything the DNS proxy runs with.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// Tried in order; each round goes through the whole list.
    pub upstreams: Vec<Upstream>,
    /// Rounds over the upstream list before giving up (≥ 1).
    pub attempts: usize,
    /// Budget for one exchange with one upstream.
    pub attempt_timeout: Duration,
    /// Budget for the whole query; past it the client gets SERVFAIL.
    pub query_timeout: Duration,
    pub deny_answer: DenyAnswer,
    /// TTL of sinkhole answers.
    pub deny_ttl: u32,
    /// Remove the `ech` SvcParam from HTTPS/SVCB answers so clients keep a
    /// visible SNI (the lead turns this on by default in enforce mode).
    pub strip_ech: bool,
    /// EDNS UDP payload size Sluice advertises, to upstreams and to clients
    /// (1232 avoids IP fragmentation, per DNS Flag Day 2020).
    pub udp_payload: u16,
    pub cache: CacheConfig,
    pub bindings: BindingsConfig,
    pub exfiltration: Option<ExfilConfig>,
    /// Queries waiting on an upstream at once; beyond it new ones are dropped
    /// (the client retries) rather than queued without bound.
    pub max_in_flight: usize,
    /// A client TCP connection with no query for this long is closed.
    pub tcp_idle_timeout: Duration,
    /// Trust roots and settings for DNS-over-TLS upstreams.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Long-lived UDP sockets kept per UDP upstream (each on its own random
    /// source port). Queries are spread over them; more sockets mean more
    /// ports an off-path attacker has to guess among, at the cost of file
    /// descriptors.
    pub upstream_udp_sockets: usize,
    /// A pooled upstream socket is replaced after this many queries…
    pub upstream_socket_max_queries: u32,
    /// …or once it is this old, whichever comes first, so source ports keep
    /// changing.
    pub upstream_socket_max_age: Duration,
    /// Answer plain cached queries on wire bytes, and pass plain upstream
    /// answers on patched instead of re-encoded (see `dns::fast`); off,
    /// every answer is decoded and encoded (same meaning, slower).
    pub wire_fast_path: bool,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            upstreams: Vec::new(),
            attempts: 2,
            attempt_timeout: Duration::from_millis(1_500),
            query_timeout: Duration::from_secs(4),
            deny_answer: DenyAnswer::default(),
            deny_ttl: 60,
            strip_ech: false,
            udp_payload: 1232,
            cache: CacheConfig::default(),
            bindings: BindingsConfig::default(),
            exfiltration: None,
            max_in_flight: 4_096,
            tcp_idle_timeout: Duration::from_secs(10),
            tls: None,
            upstream_udp_sockets: 16,
            upstream_socket_max_queries: 1_024,
            upstream_socket_max_age: Duration::from_secs(10),
            wire_fast_path: true,
        }
    }
}

impl DnsConfig {
    /// Checks the fields together; the only gate between a config and a running proxy.
    pub fn validate(&self) -> Result<(), DnsError> {
        if self.upstreams.is_empty() {
            return Err(DnsError::NoUpstreams);
        }
        for (field, value) in [
            ("attempts", self.attempts),
            ("max_in_flight", self.max_in_flight),
            ("upstream_udp_sockets", self.upstream_udp_sockets),
            (
                "upstream_socket_max_queries",
                usize::try_from(self.upstream_socket_max_queries).unwrap_or(usize::MAX),
            ),
            ("bindings.max_entries", self.bindings.max_entries),
            ("bindings.max_per_destination", self.bindings.max_per_destination),
            ("bindings.max_names_per_pair", self.bindings.max_names_per_pair),
            ("bindings.max_sources", self.bindings.max_sources),
        ] {
            if value == 0 {
                return Err(DnsError::ZeroLimit { field });
            }
        }
        if self.attempt_timeout.is_zero() {
            return Err(DnsError::ZeroLimit {
                field: "attempt_timeout",
            });
        }
        if self.query_timeout.is_zero() {
            return Err(DnsError::ZeroLimit { field: "query_timeout" });
        }
        if self.upstream_socket_max_age.is_zero() {
            return Err(DnsError::ZeroLimit {
                field: "upstream_socket_max_age",
            });
        }
        for up in &self.upstreams {
            if let UpstreamProto::Tls { server_name } = &up.proto {
                if self.tls.is_none() {
                    return Err(DnsError::TlsConfigMissing { addr: up.addr });
                }
                if rustls::pki_types::ServerName::try_from(server_name.as_str()).is_err() {
                    return Err(DnsError::InvalidServerName {
                        addr: up.addr,
                        server_name: server_name.clone(),
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code: a panic is the failure report")]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        "127.0.0.1:53".parse().unwrap()
    }

    #[test]
    fn validate_rejects_what_cannot_run() {
        assert!(matches!(DnsConfig::default().validate(), Err(DnsError::NoUpstreams)));
        let ok = DnsConfig {
            upstreams: vec![Upstream::udp(addr())],
            ..DnsConfig::default()
        };
        assert!(ok.validate().is_ok());
        let no_tls = DnsConfig {
            upstreams: vec![Upstream::tls(addr(), "dns.test")],
            ..ok.clone()
        };
        assert!(matches!(no_tls.validate(), Err(DnsError::TlsConfigMissing { .. })));
        let zero = DnsConfig {
            attempts: 0,
            ..ok.clone()
        };
        assert!(matches!(
            zero.validate(),
            Err(DnsError::ZeroLimit { field: "attempts" })
        ));
        let zero = DnsConfig {
            query_timeout: Duration::ZERO,
            ..ok
        };
        assert!(matches!(
            zero.validate(),
            Err(DnsError::ZeroLimit { field: "query_timeout" })
        ));
    }

    #[test]
    fn validate_rejects_a_bad_tls_server_name() {
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let config = DnsConfig {
            upstreams: vec![Upstream::tls(addr(), "not a name")],
            tls: Some(Arc::new(tls)),
            ..DnsConfig::default()
        };
        assert!(matches!(config.validate(), Err(DnsError::InvalidServerName { .. })));
    }
}
