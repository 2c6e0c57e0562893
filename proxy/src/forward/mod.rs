//! Forwarding: the last stage of the data path, entered once a flow is allowed.
//!
//! ```text
//! verdict = allow ─► resolve (resolve.rs) ─► SSRF guard (caller, on the
//!                    addresses returned) ─► connect (connect.rs, happy
//!                    eyeballs) ─► replay peeked bytes (caller) ─► relay
//!                    (relay.rs, splice or copy) ─► RelayStats for the audit
//! ```
//!
//! Nothing here knows about policy: the caller decides, this module moves
//! bytes and reports what happened (addresses used, bytes each way, why the
//! flow ended) as typed values the audit record and metrics are built from.
//! `limit.rs` is the per-listener accept throttle; `balance.rs` picks an
//! endpoint of an Envoy cluster from xDS.

pub mod balance;
pub mod connect;
pub mod limit;
pub mod relay;
pub mod resolve;

pub use connect::{ConnectError, ConnectOptions, Connected, connect, connect_ips, connect_sending};
pub use limit::{ConnLimit, ConnPermit};
pub use relay::{CloseReason, RelayMode, RelayOptions, RelayStats, relay, relay_until};
pub use resolve::{ResolveError, Resolver, ResolverSettings, parse_ip_lenient};
