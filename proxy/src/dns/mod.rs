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
//!
//! Wiring it up (the policy engine implements [`QueryPolicy`]; the data plane
//! keeps the `Arc<Bindings>`; telemetry drains the audit channel):
//!
//! ```no_run
//! use std::net::IpAddr;
//! use std::sync::Arc;
//! use sluice::dns::{DnsConfig, DnsCore, DnsServer, QueryPolicy, QueryVerdict, Upstream};
//! use sluice_api::reason::ReasonCode;
//! use sluice_api::{DomainName, Enforcement};
//!
//! struct AllowAll;
//! impl QueryPolicy for AllowAll {
//!     fn decide(&self, _src: IpAddr, _qname: &DomainName, _qtype: u16) -> QueryVerdict {
//!         QueryVerdict::labelled("default", true, ReasonCode::DefaultAllow, Enforcement::Enforced)
//!     }
//! }
//!
//! # async fn run() -> Result<(), sluice::dns::DnsError> {
//! let config = DnsConfig {
//!     upstreams: vec![Upstream::udp("192.0.2.53:53".parse().unwrap())],
//!     strip_ech: true,
//!     ..DnsConfig::default()
//! };
//! let core = Arc::new(DnsCore::with_new_bindings(config, Arc::new(AllowAll))?);
//! let bindings = Arc::clone(core.bindings()); // for the data plane
//! let (audit_tx, mut audit_rx) = tokio::sync::mpsc::channel(4096);
//! let server = DnsServer::bind("0.0.0.0:5353".parse().unwrap(), core, audit_tx).await?;
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! tokio::spawn(server.run(shutdown.clone()));
//! tokio::spawn(async move { while let Some(_record) = audit_rx.recv().await {} });
//! // Later, on a TCP flow from `src` to `dst`:
//! let now = tokio::time::Instant::now().into_std();
//! let src: IpAddr = "10.0.0.7".parse().unwrap();
//! let dst: IpAddr = "93.184.216.34".parse().unwrap();
//! let _name: Option<DomainName> = bindings.lookup(src, dst, now);
//! shutdown.cancel();
//! # Ok(())
//! # }
//! ```

/// `hash` reduced to `0..n` (shard or slot index) from its mixed high bits.
/// foldhash's fast hash does not mix every key's low bits well: with `% 16`
/// some seeds put 1,024 consecutive IPv4 addresses in as few as 3 of 16
/// shards, and a shard's share of a table's capacity then held them all.
pub(crate) fn spread(hash: u64, n: usize) -> usize {
    let h = (hash ^ (hash >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    ((u128::from(h) * n as u128) >> 64) as usize
}

pub mod audit;
pub mod bindings;
pub mod cache;
pub mod config;
pub mod ech;
pub mod engine;
pub mod exfil;
pub mod fast;
pub mod forward;
pub mod policy;
pub mod server;
pub mod wire;

pub use audit::{DnsAuditRecord, DnsAuditSink, DnsStats, DnsStatsSnapshot, Transport};
pub use bindings::Bindings;
pub use config::{BindingsConfig, CacheConfig, DenyAnswer, DnsConfig, ExfilConfig, Upstream, UpstreamProto};
pub use engine::{DnsCore, Pending, QueryContext, Reply, Step};
pub use forward::{ForwardError, Forwarder, UpstreamAnswer};
pub use policy::{QueryFilter, QueryInfo, QueryPolicy, QueryStatus, QueryVerdict, VerdictMemo, reason};
pub use server::{DnsHandle, DnsServer};

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
