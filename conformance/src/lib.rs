//! Scenario runners; see `tests/`. `policy` loads the policy scenarios of
//! `conformance/policy/` and compares an engine's verdicts with them.
#![forbid(unsafe_code)]

pub mod policy;
