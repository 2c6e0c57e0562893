//! `sluice-xds` as a library: the pieces of the control server that the
//! binary wires together, kept here so they can be tested without sockets.
#![forbid(unsafe_code)]

pub mod admin;
pub mod ads;
pub mod catalog;
pub mod diff;
pub mod ecds;
pub mod envoy;
pub mod plain;
pub mod registry;
pub mod service;
pub mod snapshot;
pub mod source;
pub mod store;
