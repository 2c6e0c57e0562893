//! The audit log: one JSON line per flow, written off the hot path.
//!
//! A flow task finishing calls [`AuditWriter::record`], which only tries to
//! enqueue the record on a bounded queue and returns at once: serialisation
//! and I/O happen on a dedicated thread (`sluice-audit`), so a slow disk or a
//! blocked stdout can never stall traffic. When the queue is full the record
//! is dropped, counted (see [`AuditWriter::dropped`] and the
//! `sluice_audit_dropped_total` metric) and a warning is logged at most once
//! a second. [`AuditWriter::shutdown`] drains everything queued before it and
//! flushes, so a clean stop loses nothing; [`AuditWriter::reopen`] reopens a
//! file sink for log rotation (wired to SIGHUP by [`reopen_on_sighup`]).
//!
//! The writer is generic over the record type; [`FlowRecord`] is the shape
//! the data path writes. DNS queries are too many for one queue message and
//! one serde pass each: [`DnsAuditLog`] writes their JSON lines directly
//! into a batch buffer on the DNS worker and hands the writer whole batches
//! ([`AuditWriter::record_lines`]).

mod dns_lines;
mod record;
mod writer;

pub use dns_lines::{DnsAuditLog, SourceGroups, json_str};
pub use record::{Action, AuditRecord, DnsQueryRecord, Enforcement, FlowRecord, VerdictRecord, rfc3339, rfc3339_now};
pub use writer::{AuditError, AuditSink, AuditWriter, DEFAULT_CAPACITY, reopen_on_sighup};
