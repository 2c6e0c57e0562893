//! The gateway's xDS client: takes Sluice's resources (WebGroups,
//! SmartGroups, the inventory, the policy) from a control server over ADS
//! and applies each update the way a reload of the file is applied.
//!
//! `client` is the protocol without I/O; `run` drives it over a gRPC
//! stream; `status` is what the admin API shows of it.

pub mod client;
pub mod code;
pub mod ecds;
pub mod run;
pub mod status;

pub use client::{AdsClient, Outgoing};
pub use run::{Applied, Apply, run};
pub use status::XdsStatus;
