//! Scenario runners; see `tests/`. `policy` loads the policy scenarios of
//! `conformance/policy/` and compares an engine's verdicts with them;
//! `envoy` runs the Envoy-resource scenarios of `conformance/envoy/` on
//! stock Envoy and on Sluice and compares where their connections go.
#![forbid(unsafe_code)]

pub mod envoy;
pub mod envoy_binary;
pub mod inner_cargo;
pub mod policy;
