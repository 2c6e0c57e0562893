//! The DNS proxy: policy on every query, and the source of IP → name truth.
//!
//! Workloads resolve through Sluice. Each query is decided by the policy
//! ([`QueryPolicy`]) before anything leaves the gateway: a denied name gets
//! NXDOMAIN (or REFUSED, or a sinkhole answer) and never reaches an upstream,
//! so the resolver cannot be used to learn or smuggle data about it. Allowed
//! queries are answered from the [`cache`] or forwarded to the configured
//! upstreams, and every address handed out is recorded in [`Bindings`] —
//! the table the TCP data plane consults to attribute IP-only flows to names
//! and to check that a transparent-mode SNI goes where DNS said it lives.
//!
//! The module is split like the rest of the data path: [`engine`] is sans-IO
//! (bytes and `Instant`s in, bytes and audit records out) so it can be unit
//! tested and fuzzed; [`forward`] and [`server`] are the only parts that touch
//! sockets or the clock.

pub mod audit;
pub mod bindings;
pub mod cache;
pub mod config;
pub mod ech;
pub mod engine;
pub mod exfil;
pub mod forward;
pub mod policy;
pub mod server;

pub use audit::{DnsAuditRecord, DnsStats, DnsStatsSnapshot, Transport};
pub use bindings::Bindings;
pub use config::{
    BindingsConfig, CacheConfig, DenyAnswer, DnsConfig, ExfilConfig, Upstream, UpstreamProto,
};
pub use engine::{DnsCore, Pending, QueryContext, Reply, Step};
pub use forward::{ForwardError, Forwarder, UpstreamAnswer};
pub use policy::{QueryPolicy, QueryVerdict, reason};
pub use server::DnsServer;

/// Errors building or running the DNS proxy. Per-query failures never surface
/// here: they become an rcode for the client and a reason in the audit record.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DnsError {
    #[error("no upstream resolvers are configured; add at least one `upstream`")]
    NoUpstreams,
    #[error(
        "upstream {addr} uses DNS-over-TLS but no TLS client configuration was given; \
         set `DnsConfig::tls`"
    )]
    TlsConfigMissing { addr: std::net::SocketAddr },
    #[error("upstream {addr}: `{server_name}` is not a valid TLS server name")]
    InvalidServerName {
        addr: std::net::SocketAddr,
        server_name: String,
    },
    #[error("`{field}` must be greater than zero")]
    ZeroLimit { field: &'static str },
    #[error("cannot bind the DNS listener on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("DNS listener I/O error: {0}")]
    Io(#[from] std::io::Error),
}
