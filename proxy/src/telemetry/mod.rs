//! Telemetry: what the data path leaves behind for operators.
//!
//! Every flow ends in exactly one audit record ([`audit`]: JSON lines written
//! off the hot path through a bounded queue that never blocks traffic) and
//! updates Prometheus metrics ([`metrics`]: counters, gauges and histograms
//! rendered by the admin listener's `/metrics`). Both sit at the very end of
//! the data path, after the relay reports how the flow closed.

pub mod audit;
pub mod logging;
pub mod metrics;

pub use audit::{AuditError, AuditSink, AuditWriter, FlowRecord, VerdictRecord};
