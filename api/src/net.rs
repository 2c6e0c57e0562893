//! Addresses and CIDRs as Sluice compares them.
//!
//! An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`) is the IPv4 address it
//! carries: a workload must not escape an IPv4 rule by writing its
//! destination the other way.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};

/// The address to match: IPv4-mapped IPv6 becomes IPv4.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// Why a CIDR was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CidrError {
    #[error("`{value}` is not an IP address or CIDR; write e.g. `10.0.0.0/8`, `10.1.2.3` or `fd00::/8`")]
    Syntax { value: String },
    #[error("`{value}` has host bits set below the /{prefix} prefix; did you mean `{suggestion}`?")]
    HostBits {
        value: String,
        prefix: u8,
        suggestion: String,
    },
}

/// Parses `10.0.0.0/8`, `fd00::/8` or a bare address (a /32 or /128).
/// Host bits set below the prefix are an error: `10.0.0.1/8` is almost
/// always a typo, and silently widening it would change who is allowed.
pub fn parse_cidr(value: &str) -> Result<IpNet, CidrError> {
    let v = value.trim();
    let net = if v.contains('/') {
        v.parse::<IpNet>()
            .map_err(|_| CidrError::Syntax { value: v.to_owned() })?
    } else {
        let ip: IpAddr = v.parse().map_err(|_| CidrError::Syntax { value: v.to_owned() })?;
        IpNet::from(ip)
    };
    if net.addr() != net.network() {
        return Err(CidrError::HostBits {
            value: v.to_owned(),
            prefix: net.prefix_len(),
            suggestion: net.trunc().to_string(),
        });
    }
    Ok(canonical_net(net))
}

/// `::ffff:a.b.c.d/96+n` is the IPv4 network `a.b.c.d/n`.
pub fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && v6.prefix_len() >= 96
        && let Ok(n) = Ipv4Net::new(v4, v6.prefix_len() - 96)
    {
        return IpNet::V4(n);
    }
    net
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        assert_eq!(parse_cidr("10.0.0.0/8").map(|n| n.to_string()), Ok("10.0.0.0/8".into()));
        assert_eq!(parse_cidr("10.1.2.3").map(|n| n.to_string()), Ok("10.1.2.3/32".into()));
        assert_eq!(
            parse_cidr("::ffff:10.0.0.0/104").map(|n| n.to_string()),
            Ok("10.0.0.0/8".into())
        );
        assert!(matches!(parse_cidr("10.0.0.1/8"), Err(CidrError::HostBits { .. })));
        assert!(matches!(parse_cidr("10.0.0.0/33"), Err(CidrError::Syntax { .. })));
        assert!(matches!(parse_cidr("banana"), Err(CidrError::Syntax { .. })));
    }

    #[test]
    fn mapped_addresses() {
        let mapped: IpAddr = "::ffff:169.254.169.254".parse().unwrap_or(IpAddr::from([0; 4]));
        assert_eq!(canonical_ip(mapped), IpAddr::from([169, 254, 169, 254]));
    }
}
