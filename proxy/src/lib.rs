//! `sluice`: the data plane. One module per stage of the data path:
//!
//! ```text
//! accept ─► classify ─► identify + policy ─► plugins ─► enforce / forward ─► audit
//! ```
//!
//! `policy` is the engine every stage asks; `cli` holds the command line.

pub mod admin;
pub mod classify;
pub mod cli;
pub mod dns;
pub mod edge;
pub mod forward;
pub mod listener;
pub mod policy;
pub mod runtime;
pub mod sys;
pub mod telemetry;
pub mod wasm;
pub mod xds;
