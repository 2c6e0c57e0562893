//! Scenario runners; see `tests/`.
#![forbid(unsafe_code)]
