//! Name resolution for the forwarding stage, and the strict reading of IP
//! literals that the SSRF guard relies on.
//!
//! An allowed flow names its destination by a host (CONNECT target, SNI, Host
//! header); this module turns that host into every address it may mean:
//! an IP literal is returned as is (no DNS), anything else goes to
//! hickory-resolver (system configuration or configured upstream servers,
//! with hickory's TTL-respecting cache) for both A and AAAA. The caller runs
//! the SSRF guard over *all* returned addresses before dialling any of them.
//!
//! Attackers spell loopback and metadata addresses in ways a naive parser
//! reads as a name: `2130706433`, `0177.0.0.1`, `0x7f.1`, `[::ffff:127.0.0.1]`.
//! [`parse_ip_lenient`] reads a host exactly the way `inet_aton(3)` and the
//! WHATWG URL parser would and canonicalises IPv4-mapped IPv6, so such a host
//! is classified as the address it really denotes. `resolve` uses the same
//! reading, so what is classified is what is dialled.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;

/// Why a host could not be turned into addresses.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    /// The name does not exist (NXDOMAIN).
    #[error("{name}: no such domain")]
    NxDomain {
        /// The name that was looked up.
        name: String,
    },
    /// The name exists but has no A or AAAA records.
    #[error("{name}: no A or AAAA records")]
    NoRecords {
        /// The name that was looked up.
        name: String,
    },
    /// The upstream servers did not answer in time.
    #[error("{name}: DNS lookup timed out")]
    Timeout {
        /// The name that was looked up.
        name: String,
    },
    /// The host is not a valid DNS name.
    #[error("{name:?} is not a valid host name")]
    InvalidName {
        /// The rejected host.
        name: String,
    },
    /// The system resolver configuration could not be read.
    #[error("reading the system DNS configuration: {0}")]
    SystemConfig(#[source] NetError),
    /// The resolver could not be built from its settings.
    #[error("building the DNS resolver: {0}")]
    Build(#[source] NetError),
    /// Any other failure of the lookup (server failure, refused, I/O).
    #[error("{name}: DNS lookup failed: {source}")]
    Lookup {
        /// The name that was looked up.
        name: String,
        /// What hickory reported.
        #[source]
        source: NetError,
    },
}

impl ResolveError {
    /// The reason code written into the audit record.
    pub fn reason_code(&self) -> &'static str {
        match self {
            Self::NxDomain { .. } => "dns-nxdomain",
            Self::NoRecords { .. } => "dns-no-records",
            Self::Timeout { .. } => "dns-timeout",
            Self::InvalidName { .. } => "dns-invalid-name",
            Self::SystemConfig(_) | Self::Build(_) => "dns-config",
            Self::Lookup { .. } => "dns-error",
        }
    }
}

/// How the resolver is built. `Default` = system configuration.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ResolverSettings {
    /// Upstream servers (UDP with TCP fallback). Empty: use the system's
    /// configuration (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    /// Per-query timeout.
    pub timeout: Duration,
    /// Retries per query after the first try.
    pub attempts: usize,
    /// Number of cached responses.
    pub cache_size: u64,
    /// Consult `/etc/hosts` before DNS.
    pub use_hosts_file: bool,
}

impl Default for ResolverSettings {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            timeout: Duration::from_secs(3),
            attempts: 2,
            cache_size: 4096,
            use_hosts_file: true,
        }
    }
}

impl ResolverSettings {
    /// Settings that query exactly these upstream servers.
    pub fn with_nameservers(nameservers: Vec<SocketAddr>) -> Self {
        Self {
            nameservers,
            ..Self::default()
        }
    }
}

/// A cached, shareable (cheap `Clone`) A/AAAA resolver.
#[derive(Debug, Clone)]
pub struct Resolver {
    inner: TokioResolver,
}

impl Resolver {
    /// Builds a resolver; must be called inside a tokio runtime.
    pub fn new(settings: &ResolverSettings) -> Result<Self, ResolveError> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if settings.nameservers.is_empty() {
            TokioResolver::builder(provider).map_err(ResolveError::SystemConfig)?
        } else {
            let servers = settings
                .nameservers
                .iter()
                .map(|addr| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = addr.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = addr.port();
                    NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider)
        };
        let opts = builder.options_mut();
        opts.timeout = settings.timeout;
        opts.attempts = settings.attempts;
        opts.cache_size = settings.cache_size;
        // Both families in parallel: happy eyeballs wants them all.
        opts.ip_strategy = LookupIpStrategy::Ipv6AndIpv4;
        opts.use_hosts_file = if settings.use_hosts_file {
            ResolveHosts::Always
        } else {
            ResolveHosts::Never
        };
        // Hosts named by clients are absolute; search-list expansion would
        // let `api.example.com` quietly become `api.example.com.corp.`.
        opts.ndots = 0;
        let inner = builder.build().map_err(|source| ResolveError::Lookup {
            name: String::new(),
            source,
        })?;
        Ok(Self { inner })
    }

    /// A resolver using the system configuration.
    pub fn system() -> Result<Self, ResolveError> {
        Self::new(&ResolverSettings::default())
    }

    /// All addresses `host` denotes, IPv6 and IPv4, canonicalised
    /// (IPv4-mapped IPv6 becomes IPv4). IP literals in any spelling
    /// `inet_aton` accepts are returned without a lookup.
    pub async fn resolve(&self, host: &str) -> Result<Vec<IpAddr>, ResolveError> {
        if let Some(ip) = parse_ip_lenient(host) {
            return Ok(vec![ip]);
        }
        let name = host.trim_end_matches('.');
        if name.is_empty() || name.contains(['/', ' ', '\\', '@', ':', '%']) {
            return Err(ResolveError::InvalidName { name: host.to_owned() });
        }
        let fqdn = format!("{name}.");
        let lookup = match self.inner.lookup_ip(fqdn.as_str()).await {
            Ok(lookup) => lookup,
            Err(e) => return Err(classify(name, e)),
        };
        let mut out: Vec<IpAddr> = Vec::new();
        for ip in lookup.iter() {
            let ip = ip.to_canonical();
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
        if out.is_empty() {
            return Err(ResolveError::NoRecords { name: name.to_owned() });
        }
        Ok(out)
    }

    /// Drops every cached answer (e.g. after a configuration change).
    pub fn clear_cache(&self) {
        self.inner.clear_cache();
    }
}

fn classify(name: &str, e: NetError) -> ResolveError {
    let name = name.to_owned();
    if e.is_nx_domain() {
        ResolveError::NxDomain { name }
    } else if e.is_no_records_found() {
        ResolveError::NoRecords { name }
    } else if matches!(e, NetError::Timeout) {
        ResolveError::Timeout { name }
    } else if matches!(e, NetError::Proto(_)) {
        // hickory reports names it cannot encode (labels > 63 bytes, bad
        // characters) as protocol errors before sending anything.
        ResolveError::InvalidName { name }
    } else {
        ResolveError::Lookup { name, source: e }
    }
}

/// Reads `host` as an IP address the way permissive parsers do, or `None` if
/// it is a name.
///
/// Accepted: IPv6 (optionally in brackets, optionally with a `%zone`, which
/// is dropped), and IPv4 in every `inet_aton(3)` form — one to four parts,
/// each decimal, octal (leading `0`) or hex (`0x`), the last part filling the
/// remaining bytes (`127.1` = `127.0.0.1`, `2130706433` = `127.0.0.1`) — with
/// one optional trailing dot. The result is canonical: `::ffff:a.b.c.d`
/// becomes `a.b.c.d`. Anything out of range or malformed is `None`.
pub fn parse_ip_lenient(host: &str) -> Option<IpAddr> {
    let host = host.trim();
    let inner = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if inner.contains(':') {
        let without_zone = inner.split_once('%').map_or(inner, |(ip, _zone)| ip);
        return without_zone
            .parse::<Ipv6Addr>()
            .ok()
            .map(|ip| IpAddr::V6(ip).to_canonical());
    }
    if inner.len() != host.len() {
        // Brackets around something that is not IPv6.
        return None;
    }
    parse_inet_aton(host).map(IpAddr::V4)
}

/// `inet_aton(3)` semantics, strictly: no signs, no whitespace, no junk.
fn parse_inet_aton(s: &str) -> Option<Ipv4Addr> {
    let s = s.strip_suffix('.').unwrap_or(s);
    if s.is_empty() {
        return None;
    }
    let mut parts = [0u32; 4];
    let mut count = 0;
    for part in s.split('.') {
        if count == 4 {
            return None;
        }
        parts[count] = parse_aton_part(part)?;
        count += 1;
    }
    let byte = |v: u32| (v <= 0xff).then_some(v);
    let value = match count {
        1 => parts[0],
        2 => (byte(parts[0])? << 24) | (parts[1] <= 0x00ff_ffff).then_some(parts[1])?,
        3 => (byte(parts[0])? << 24) | (byte(parts[1])? << 16) | (parts[2] <= 0xffff).then_some(parts[2])?,
        _ => (byte(parts[0])? << 24) | (byte(parts[1])? << 16) | (byte(parts[2])? << 8) | byte(parts[3])?,
    };
    Some(Ipv4Addr::from(value))
}

/// One dotted part: `0x…` hex, `0…` octal, else decimal; must fit in `u32`.
fn parse_aton_part(part: &str) -> Option<u32> {
    let (digits, radix) = if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
        // `0x` alone is 0 to inet_aton and to URL parsers alike.
        if hex.is_empty() {
            return Some(0);
        }
        (hex, 16)
    } else if part.len() > 1 && part.starts_with('0') {
        (&part[1..], 8)
    } else {
        (part, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u32::from_str_radix(digits, radix).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aton_part_radixes() {
        assert_eq!(parse_aton_part("10"), Some(10));
        assert_eq!(parse_aton_part("010"), Some(8));
        assert_eq!(parse_aton_part("0x10"), Some(16));
        assert_eq!(parse_aton_part("08"), None);
        assert_eq!(parse_aton_part(""), None);
        assert_eq!(parse_aton_part("+1"), None);
        assert_eq!(parse_aton_part("4294967296"), None);
    }
}
