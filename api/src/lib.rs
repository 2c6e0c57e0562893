//! `sluice-api`: the resource model shared by the proxy and the control
//! server — configuration files, WebGroups, SmartGroups, rules — and the
//! validation that turns untrusted input into checked types.
#![forbid(unsafe_code)]

pub mod builtin;
pub mod config;
pub mod domain;
pub mod envoy;
pub mod lint;
pub mod model;
pub mod net;
pub mod proto;
pub mod reason;
pub mod xds;

pub use config::{ConfigError, ConfigErrorKind, ConfigErrors};
pub use domain::{DomainError, DomainName, DomainPattern};
pub use model::*;
