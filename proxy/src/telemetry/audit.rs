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

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::dns::{DnsAuditRecord, DnsAuditSink, Transport};

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuditSink {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
    /// A file, opened for append (created if missing).
    File(PathBuf),
}

/// Audit writer failures (never raised on the record path).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The audit file could not be opened.
    #[error("opening audit file {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Writing or flushing the sink failed.
    #[error("writing audit records: {0}")]
    Write(#[source] io::Error),
    /// The writer thread could not be started.
    #[error("starting the audit writer thread: {0}")]
    Spawn(#[source] io::Error),
    /// The writer has already shut down.
    #[error("the audit writer is shut down")]
    Closed,
}

/// Counters the writer keeps (shared by all handles).
#[derive(Debug, Default)]
struct Stats {
    written: AtomicU64,
    dropped: AtomicU64,
    errors: AtomicU64,
    last_warn_secs: AtomicU64,
}

enum Msg<T> {
    Record(T),
    /// `count` complete JSON lines, already serialised.
    Lines(Vec<u8>, u64),
    Flush(oneshot::Sender<Result<(), AuditError>>),
    Reopen(oneshot::Sender<Result<(), AuditError>>),
    /// Write to another sink from here on (a reload changed
    /// `audit.destination`): everything queued before it goes to the old.
    Switch(Output, AuditSink, oneshot::Sender<Result<(), AuditError>>),
    Shutdown(oneshot::Sender<Result<(), AuditError>>),
}

/// A cheap-to-clone handle feeding the audit writer thread.
pub struct AuditWriter<T> {
    tx: mpsc::Sender<Msg<T>>,
    stats: Arc<Stats>,
}

impl<T> Clone for AuditWriter<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            stats: Arc::clone(&self.stats),
        }
    }
}

impl<T> std::fmt::Debug for AuditWriter<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditWriter")
            .field("capacity", &self.tx.max_capacity())
            .field("queued", &(self.tx.max_capacity() - self.tx.capacity()))
            .field("stats", &self.stats)
            .finish()
    }
}

/// Default queue capacity (records).
pub const DEFAULT_CAPACITY: usize = 65_536;

impl<T: Serialize + Send + 'static> AuditWriter<T> {
    /// Opens `sink` and starts the writer thread with a queue of `capacity`
    /// records (at least 1).
    pub fn start(sink: AuditSink, capacity: usize) -> Result<Self, AuditError> {
        let out = Output::open(&sink)?;
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let stats = Arc::new(Stats::default());
        let thread_stats = Arc::clone(&stats);
        std::thread::Builder::new()
            .name("sluice-audit".into())
            .spawn(move || {
                // The writer is throughput work: under SCHED_BATCH its
                // wake-ups (a batch every LINGER while records flow) wait
                // for the data plane to block or for the next tick instead
                // of preempting a worker mid-flow.
                #[cfg(target_os = "linux")]
                if let Err(e) = crate::sys::set_batch_scheduling() {
                    tracing::debug!(error = %e, "audit writer stays under the default scheduling policy");
                }
                writer_loop(rx, out, sink, &thread_stats)
            })
            .map_err(AuditError::Spawn)?;
        Ok(Self { tx, stats })
    }

    /// Enqueues a record without ever waiting. Returns `false` when it was
    /// dropped (queue full or writer shut down); drops are counted.
    pub fn record(&self, record: T) -> bool {
        match self.tx.try_send(Msg::Record(record)) {
            Ok(()) => true,
            Err(_) => {
                self.note_drop();
                false
            }
        }
    }

    /// Enqueues `count` records already serialised as JSON lines (each
    /// ending in `\n`), without ever waiting. Returns `false` when the batch
    /// was dropped; its records are counted as drops.
    pub fn record_lines(&self, lines: Vec<u8>, count: u64) -> bool {
        if count == 0 {
            return true;
        }
        match self.tx.try_send(Msg::Lines(lines, count)) {
            Ok(()) => true,
            Err(_) => {
                self.note_drops(count);
                false
            }
        }
    }

    fn note_drop(&self) {
        self.note_drops(1);
    }

    fn note_drops(&self, count: u64) {
        let total = self.stats.dropped.fetch_add(count, Ordering::Relaxed) + count;
        for _ in 0..count {
            super::metrics::audit_dropped();
        }
        // Rate limit: one warning per wall-clock second at most.
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let last = self.stats.last_warn_secs.load(Ordering::Relaxed);
        if now > last
            && self
                .stats
                .last_warn_secs
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                dropped_total = total,
                capacity = self.tx.max_capacity(),
                "audit queue full or closed: record dropped"
            );
        }
    }

    /// Records dropped so far (queue full or writer closed).
    pub fn dropped(&self) -> u64 {
        self.stats.dropped.load(Ordering::Relaxed)
    }

    /// Records written to the sink so far.
    pub fn written(&self) -> u64 {
        self.stats.written.load(Ordering::Relaxed)
    }

    /// Records that could not be serialised or written.
    pub fn errors(&self) -> u64 {
        self.stats.errors.load(Ordering::Relaxed)
    }

    /// Waits until every record queued before this call is written and the
    /// sink flushed.
    pub async fn flush(&self) -> Result<(), AuditError> {
        self.control(Msg::Flush).await
    }

    /// Reopens a file sink (after log rotation); a no-op for stdout/stderr.
    pub async fn reopen(&self) -> Result<(), AuditError> {
        self.control(Msg::Reopen).await
    }

    /// Writes to `sink` from now on: records queued before the call go to
    /// the old sink, later ones to the new. The new sink is opened here
    /// first, so a path that cannot be opened is an error and the old sink
    /// stays.
    pub async fn switch(&self, sink: AuditSink) -> Result<(), AuditError> {
        let out = Output::open(&sink)?;
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Msg::Switch(out, sink, ack))
            .await
            .map_err(|_| AuditError::Closed)?;
        done.await.map_err(|_| AuditError::Closed)?
    }

    /// Writes everything queued before this call, flushes and stops the
    /// writer thread. Later records are dropped (and counted).
    pub async fn shutdown(&self) -> Result<(), AuditError> {
        self.control(Msg::Shutdown).await
    }

    async fn control(&self, make: fn(oneshot::Sender<Result<(), AuditError>>) -> Msg<T>) -> Result<(), AuditError> {
        let (ack, done) = oneshot::channel();
        // Control messages wait for queue space: they sit behind the
        // records they must not overtake.
        self.tx.send(make(ack)).await.map_err(|_| AuditError::Closed)?;
        done.await.map_err(|_| AuditError::Closed)?
    }
}

enum Output {
    Stdout(io::Stdout),
    Stderr(io::Stderr),
    File(File),
}

impl Output {
    fn open(sink: &AuditSink) -> Result<Self, AuditError> {
        Ok(match sink {
            AuditSink::Stdout => Self::Stdout(io::stdout()),
            AuditSink::Stderr => Self::Stderr(io::stderr()),
            AuditSink::File(path) => Self::File(open_append(path)?),
        })
    }
}

fn open_append(path: &Path) -> Result<File, AuditError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| AuditError::Open {
            path: path.to_owned(),
            source,
        })
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Stdout(o) => o.write(buf),
            Self::Stderr(o) => o.write(buf),
            Self::File(o) => o.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Stdout(o) => o.flush(),
            Self::Stderr(o) => o.flush(),
            Self::File(o) => o.flush(),
        }
    }
}

/// How long the writer waits for more records before parking.
const LINGER: std::time::Duration = std::time::Duration::from_millis(2);

fn writer_loop<T: Serialize>(mut rx: mpsc::Receiver<Msg<T>>, out: Output, mut sink: AuditSink, stats: &Stats) {
    let mut out = BufWriter::with_capacity(64 * 1024, out);
    let mut line = Vec::with_capacity(1024);
    // `None`: every handle is gone; flush what we have and stop.
    while let Some(mut msg) = rx.blocking_recv() {
        // Batch: handle everything already queued, flush once when idle.
        loop {
            match msg {
                Msg::Record(record) => {
                    line.clear();
                    let result = serde_json::to_writer(&mut line, &record)
                        .map_err(io::Error::from)
                        .and_then(|()| {
                            line.push(b'\n');
                            out.write_all(&line)
                        });
                    match result {
                        Ok(()) => {
                            stats.written.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            stats.errors.fetch_add(1, Ordering::Relaxed);
                            super::metrics::errors(super::metrics::AUDIT_WRITE, 1);
                            tracing::warn!(error = %e, "audit record not written");
                        }
                    }
                }
                Msg::Lines(lines, count) => match out.write_all(&lines) {
                    Ok(()) => {
                        stats.written.fetch_add(count, Ordering::Relaxed);
                    }
                    Err(e) => {
                        stats.errors.fetch_add(count, Ordering::Relaxed);
                        super::metrics::errors(super::metrics::AUDIT_WRITE, count);
                        tracing::warn!(error = %e, records = count, "audit records not written");
                    }
                },
                Msg::Flush(ack) => {
                    let _ = ack.send(out.flush().map_err(AuditError::Write));
                }
                Msg::Reopen(ack) => {
                    let result = out.flush().map_err(AuditError::Write).and_then(|()| {
                        if let AuditSink::File(path) = &sink {
                            *out.get_mut() = Output::File(open_append(path)?);
                        }
                        Ok(())
                    });
                    let _ = ack.send(result);
                }
                Msg::Switch(new_out, new_sink, ack) => {
                    let result = out.flush().map_err(AuditError::Write);
                    *out.get_mut() = new_out;
                    sink = new_sink;
                    let _ = ack.send(result);
                }
                Msg::Shutdown(ack) => {
                    let _ = ack.send(out.flush().map_err(AuditError::Write));
                    // Anything that slipped in behind the shutdown was
                    // accepted but will never be written: count it dropped.
                    rx.close();
                    while let Ok(late) = rx.try_recv() {
                        match late {
                            Msg::Record(_) => {
                                stats.dropped.fetch_add(1, Ordering::Relaxed);
                            }
                            Msg::Lines(_, count) => {
                                stats.dropped.fetch_add(count, Ordering::Relaxed);
                            }
                            Msg::Flush(ack) | Msg::Reopen(ack) | Msg::Shutdown(ack) | Msg::Switch(_, _, ack) => {
                                let _ = ack.send(Err(AuditError::Closed));
                            }
                        }
                    }
                    return;
                }
            }
            match rx.try_recv() {
                Ok(next) => msg = next,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    // Linger before parking: under load, records arrive
                    // faster than a park/unpark round trip, and waking this
                    // thread once per record costs the data plane a context
                    // switch each (a quarter of the DNS proxy's CPU when it
                    // did). Sleeping lets a batch build up; the cost is at
                    // most LINGER of extra audit latency.
                    std::thread::sleep(LINGER);
                    match rx.try_recv() {
                        Ok(next) => msg = next,
                        Err(_) => break,
                    }
                }
            }
        }
        if let Err(e) = out.flush() {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            super::metrics::errors(super::metrics::AUDIT_WRITE, 1);
            tracing::warn!(error = %e, "flushing audit sink failed");
        }
    }
    let _ = out.flush();
}

/// Reopens `writer`'s file on every SIGHUP (log rotation), until the writer
/// shuts down. Call inside a tokio runtime.
#[cfg(unix)]
pub fn reopen_on_sighup<T: Serialize + Send + 'static>(
    writer: AuditWriter<T>,
) -> io::Result<tokio::task::JoinHandle<()>> {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match writer.reopen().await {
                Ok(()) => tracing::info!("audit sink reopened on SIGHUP"),
                Err(AuditError::Closed) => return,
                Err(e) => tracing::warn!(error = %e, "reopening audit sink failed"),
            }
        }
    }))
}

/// The current time as RFC 3339 UTC with milliseconds
/// (`2026-11-23T10:32:32.123Z`), the audit record's time format.
pub fn rfc3339_now() -> String {
    rfc3339(SystemTime::now())
}

/// `t` as RFC 3339 UTC with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    use std::fmt::Write as _;
    // `YYYY-MM-DDTHH:MM:SS.mmmZ` is 24 bytes: one allocation, no regrowth
    // (`to_string` grew the buffer three times per record).
    let mut s = String::with_capacity(24);
    let _ = write!(s, "{}", humantime::format_rfc3339_millis(t));
    s
}

/// Whether the verdict was acted on or only recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Enforcement {
    /// The action was carried out (policy mode `enforce`).
    Enforced,
    /// The action was only recorded (policy mode `watch`, or a rule with
    /// `watch: true`): a `deny` here means "would have denied".
    Watched,
}

/// The verdict's action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Action {
    /// The flow was (or would be) let through.
    Allow,
    /// The flow was (or would be) refused.
    Deny,
}

/// The decision part of an audit record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct VerdictRecord {
    /// Allow or deny.
    pub action: Action,
    /// What decided: a rule's name, `default`, `builtin-guard`, or the data
    /// plane's `anti-evasion`, `classify` or `listener`.
    pub rule: String,
    /// Reason code (`rule-match`, `default-deny`, `sni-mismatch`,
    /// `ech-present`, `ssrf-loopback`, `connect-timeout`, …).
    pub reason: Cow<'static, str>,
    /// Enforced or only watched.
    pub mode: Enforcement,
    /// Which anti-evasion check decided the destination, when one ran
    /// (`dns-binding`, `sni-resolved`, `off`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<Cow<'static, str>>,
}

impl VerdictRecord {
    /// A verdict with no check.
    pub fn new(action: Action, rule: &str, reason: impl Into<Cow<'static, str>>, mode: Enforcement) -> Self {
        Self {
            action,
            rule: rule.to_owned(),
            reason: reason.into(),
            mode,
            check: None,
        }
    }
}

/// Every audit line: a TCP flow or a DNS query. Both carry a `kind` field
/// (`flow` / `dns`) so one log can be filtered by it.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum AuditRecord {
    Flow(Box<FlowRecord>),
    Dns(Box<DnsQueryRecord>),
}

/// One DNS query: the DNS proxy's record plus what only the data plane
/// knows (listener name, the source's SmartGroups).
#[derive(Debug, Clone, Serialize)]
pub struct DnsQueryRecord {
    pub kind: &'static str,
    /// When the query arrived, RFC 3339 UTC with milliseconds (as flows).
    pub time: String,
    pub listener: String,
    pub src_groups: Vec<String>,
    #[serde(flatten)]
    pub query: crate::dns::DnsAuditRecord,
}

/// One audit line per flow. Optional fields are omitted when unknown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct FlowRecord {
    /// Always `flow`.
    pub kind: &'static str,
    /// When the flow was accepted, RFC 3339 UTC with milliseconds.
    pub time: String,
    /// Process-unique flow id (ties the record to tracing spans).
    pub flow_id: u64,
    /// Listener name from the configuration.
    pub listener: String,
    /// Client address.
    pub src: SocketAddr,
    /// SmartGroups the client address belongs to.
    pub src_groups: Vec<String>,
    /// The address actually dialled; `None` when the flow never connected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst: Option<SocketAddr>,
    /// Transparent mode: the destination the client addressed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_dst: Option<SocketAddr>,
    /// SmartGroups the destination address belongs to.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dst_groups: Vec<String>,
    /// Explicit proxy: the `CONNECT host:port` target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_target: Option<String>,
    /// TLS SNI (the outer SNI when ECH is present).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// Plain HTTP `Host`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The name the DNS proxy answered with the destination address, for a
    /// flow that carried none itself (DNS binding).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_name: Option<String>,
    /// TLS ALPN protocols offered.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub alpn: Vec<String>,
    /// Whether the ClientHello carried an ECH extension.
    pub ech: bool,
    /// The decision.
    pub verdict: VerdictRecord,
    /// Bytes client → upstream (including replayed peeked bytes).
    pub bytes_up: u64,
    /// Bytes upstream → client.
    pub bytes_down: u64,
    /// Accept to close, in milliseconds.
    pub duration_ms: u64,
    /// Why the flow ended (`client-closed`, `idle-timeout`, `denied`, …).
    pub close_reason: Cow<'static, str>,
    /// Filters that changed the verdict after the first decision, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub changed_by: Vec<String>,
    /// Notes the filters added.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub annotations: std::collections::BTreeMap<String, String>,
}

impl FlowRecord {
    /// A record stamped now, for a flow from `src` on `listener`, with
    /// everything else empty and the given verdict.
    pub fn new(flow_id: u64, listener: impl Into<String>, src: SocketAddr, verdict: VerdictRecord) -> Self {
        Self {
            time: rfc3339_now(),
            ..Self::unstamped(flow_id, listener, src, verdict)
        }
    }

    /// Like [`FlowRecord::new`] with `time` left empty, for a caller that
    /// stamps it with the flow's own start.
    pub fn unstamped(flow_id: u64, listener: impl Into<String>, src: SocketAddr, verdict: VerdictRecord) -> Self {
        Self {
            kind: "flow",
            dns_name: None,
            time: String::new(),
            flow_id,
            listener: listener.into(),
            src,
            src_groups: Vec::new(),
            dst: None,
            original_dst: None,
            dst_groups: Vec::new(),
            connect_target: None,
            sni: None,
            host: None,
            alpn: Vec::new(),
            ech: false,
            verdict,
            bytes_up: 0,
            bytes_down: 0,
            duration_ms: 0,
            close_reason: Cow::Borrowed(""),
            changed_by: Vec::new(),
            annotations: std::collections::BTreeMap::new(),
        }
    }
}

// ------------------------------------------------------------ DNS queries

/// Batches are handed to the writer once they reach this size…
const DNS_BATCH_BYTES: usize = 32 * 1024;
/// …or this long after their first record, whichever comes first.
const DNS_FLUSH_DELAY: Duration = Duration::from_millis(10);

/// The source's SmartGroups for a DNS audit record: calls `each` with every
/// group name of `src` (from the policy snapshot current at the call).
pub type SourceGroups = Box<dyn Fn(IpAddr, &mut dyn FnMut(&str)) + Send + Sync>;

/// The DNS listener's [`DnsAuditSink`] into the audit log: writes each
/// query's JSON line (the [`DnsQueryRecord`] shape, byte for byte) straight
/// into a reusable batch buffer on the DNS worker, adds the source's
/// SmartGroups and the per-listener metrics there too, and hands the writer
/// thread one queue message per batch. Whatever is buffered is handed over
/// on [`DnsAuditSink::flush`] (the listener calls it when it stops) and when
/// the log is dropped.
pub struct DnsAuditLog {
    writer: AuditWriter<AuditRecord>,
    /// The listener name as a JSON string, quotes included.
    listener_json: Vec<u8>,
    groups: SourceGroups,
    batch: Mutex<DnsBatch>,
    pending: Arc<Notify>,
}

struct DnsBatch {
    lines: Vec<u8>,
    count: u64,
    metrics: super::metrics::DnsMetrics,
    clock: TimeCache,
    verdict: VerdictText,
}

impl std::fmt::Debug for DnsAuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsAuditLog")
            .field("listener", &String::from_utf8_lossy(&self.listener_json))
            .field("writer", &self.writer)
            .finish_non_exhaustive()
    }
}

impl DnsAuditLog {
    /// A sink for listener `listener`. Starts a small task (so call it inside
    /// a tokio runtime) that hands a partial batch over `DNS_FLUSH_DELAY`
    /// after its first record.
    pub fn start(writer: AuditWriter<AuditRecord>, listener: &str, groups: SourceGroups) -> Arc<Self> {
        let mut listener_json = Vec::with_capacity(listener.len() + 2);
        json_str(&mut listener_json, listener);
        let pending = Arc::new(Notify::new());
        let log = Arc::new(Self {
            writer,
            listener_json,
            groups,
            batch: Mutex::new(DnsBatch {
                lines: Vec::with_capacity(DNS_BATCH_BYTES + 1024),
                count: 0,
                metrics: super::metrics::DnsMetrics::new(listener),
                clock: TimeCache::default(),
                verdict: VerdictText::default(),
            }),
            pending: Arc::clone(&pending),
        });
        let weak: Weak<Self> = Arc::downgrade(&log);
        tokio::spawn(async move {
            loop {
                pending.notified().await;
                tokio::time::sleep(DNS_FLUSH_DELAY).await;
                let Some(log) = weak.upgrade() else { return };
                log.flush();
            }
        });
        log
    }

    fn batch(&self) -> MutexGuard<'_, DnsBatch> {
        self.batch.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn hand_over(&self, batch: &mut DnsBatch) {
        batch.metrics.publish();
        if batch.count == 0 {
            return;
        }
        let lines = std::mem::replace(&mut batch.lines, Vec::with_capacity(DNS_BATCH_BYTES + 1024));
        let count = std::mem::take(&mut batch.count);
        self.writer.record_lines(lines, count);
    }
}

impl DnsAuditLog {
    /// Adds one record to the locked batch; `groups` caches the rendered
    /// SmartGroups of the last source within one call of `record_all`.
    fn add(&self, batch: &mut DnsBatch, q: &DnsAuditRecord, groups: &mut GroupsCache) {
        let DnsBatch {
            lines,
            clock,
            verdict,
            metrics,
            ..
        } = batch;
        write_dns_line(lines, clock, verdict, &self.listener_json, &self.groups, groups, q);
        metrics.record(
            q.allowed,
            q.watched,
            &q.rule,
            q.reason,
            q.cache_hit,
            Duration::from_micros(q.latency_us),
        );
        batch.count += 1;
        if batch.lines.len() >= DNS_BATCH_BYTES {
            self.hand_over(batch);
        } else if batch.count == 1 {
            self.pending.notify_one();
        }
    }
}

/// The JSON array of SmartGroups last rendered, and for which source; and
/// the text of the last IPv4 source address written.
#[derive(Default)]
struct GroupsCache {
    src: Option<IpAddr>,
    json: Vec<u8>,
    ip_text_of: Option<IpAddr>,
    ip_text: Vec<u8>,
}

impl DnsAuditSink for DnsAuditLog {
    fn record(&self, q: DnsAuditRecord) -> bool {
        let mut batch = self.batch();
        self.add(&mut batch, &q, &mut GroupsCache::default());
        true
    }

    /// One lock for the whole receive batch, and a source's groups looked
    /// up once per batch (a snapshot swap in between is seen from the next
    /// batch on).
    fn record_all(&self, records: &mut Vec<DnsAuditRecord>) -> u64 {
        let mut groups = GroupsCache::default();
        let mut batch = self.batch();
        for q in records.drain(..) {
            self.add(&mut batch, &q, &mut groups);
        }
        0
    }

    fn flush(&self) {
        let mut batch = self.batch();
        self.hand_over(&mut batch);
    }
}

impl Drop for DnsAuditLog {
    fn drop(&mut self) {
        self.flush();
        // Lets the flush task see the log is gone and end.
        self.pending.notify_one();
    }
}

/// The RFC 3339 text of the current second, reused for every record
/// stamped within it.
#[derive(Default)]
struct TimeCache {
    second: Option<u64>,
    /// `YYYY-MM-DDTHH:MM:SS.` (20 bytes) when the formatter gave the usual shape.
    prefix: Vec<u8>,
    /// The decimal digits of `second` (so `time_unix_ms` is these and three more).
    second_digits: Vec<u8>,
}

impl TimeCache {
    fn write(&mut self, out: &mut Vec<u8>, unix_ms: u64) {
        let second = unix_ms / 1000;
        let millis = unix_ms % 1000;
        if self.second != Some(second) {
            let text = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_secs(second)).to_string();
            self.prefix.clear();
            // `…:SS.000Z`: keep everything up to the dot.
            if text.len() == 24 && text.ends_with(".000Z") {
                self.prefix.extend_from_slice(&text.as_bytes()[..20]);
                self.second = Some(second);
                self.second_digits.clear();
                write_u64(&mut self.second_digits, second);
            } else {
                self.second = None;
            }
        }
        if self.second.is_some() {
            out.extend_from_slice(&self.prefix);
            out.push(b'0' + (millis / 100) as u8);
            out.push(b'0' + (millis / 10 % 10) as u8);
            out.push(b'0' + (millis % 10) as u8);
            out.push(b'Z');
        } else {
            let _ = write!(
                out,
                "{}",
                humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(unix_ms))
            );
        }
    }

    /// `unix_ms` in decimal, reusing the digits of its second when
    /// [`Self::write`] just saw that second.
    fn write_unix_ms(&self, out: &mut Vec<u8>, unix_ms: u64) {
        let second = unix_ms / 1000;
        if second > 0 && self.second == Some(second) {
            let millis = unix_ms % 1000;
            out.extend_from_slice(&self.second_digits);
            out.push(b'0' + (millis / 100) as u8);
            out.push(b'0' + (millis / 10 % 10) as u8);
            out.push(b'0' + (millis % 10) as u8);
        } else {
            write_u64(out, unix_ms);
        }
    }
}

/// The verdict's part of a DNS audit line (`"allowed":…` to the reason),
/// kept for the last verdict written: consecutive queries mostly share it.
#[derive(Default)]
struct VerdictText {
    key: Option<(bool, bool, bool, &'static str)>,
    rule: String,
    json: Vec<u8>,
}

impl VerdictText {
    fn write(&mut self, out: &mut Vec<u8>, q: &DnsAuditRecord) {
        let key = (q.allowed, q.enforced, q.watched, q.reason);
        if self.key != Some(key) || self.rule != *q.rule {
            let json = &mut self.json;
            json.clear();
            json.extend_from_slice(br#","allowed":"#);
            write_bool(json, q.allowed);
            json.extend_from_slice(br#","enforced":"#);
            write_bool(json, q.enforced);
            json.extend_from_slice(br#","watched":"#);
            write_bool(json, q.watched);
            json.extend_from_slice(br#","rule":"#);
            json_str(json, &q.rule);
            json.extend_from_slice(br#","reason":"#);
            json_str(json, q.reason);
            self.rule.clear();
            self.rule.push_str(&q.rule);
            self.key = Some(key);
        }
        out.extend_from_slice(&self.json);
    }
}

/// Appends one DNS query's audit line (with its `\n`) to `out`: the same
/// bytes `serde_json` writes for [`AuditRecord::Dns`] with a
/// [`DnsQueryRecord`] of this listener and the source's groups.
#[allow(clippy::too_many_arguments, reason = "the line's caches, each owned by the batch")]
fn write_dns_line(
    out: &mut Vec<u8>,
    clock: &mut TimeCache,
    verdict: &mut VerdictText,
    listener_json: &[u8],
    groups: &SourceGroups,
    cache: &mut GroupsCache,
    q: &DnsAuditRecord,
) {
    out.extend_from_slice(br#"{"kind":"dns","time":""#);
    clock.write(out, q.time_unix_ms);
    out.extend_from_slice(br#"","listener":"#);
    out.extend_from_slice(listener_json);
    out.extend_from_slice(br#","src_groups":"#);
    let src = q.source.ip();
    if cache.src != Some(src) {
        let json = &mut cache.json;
        json.clear();
        json.push(b'[');
        groups(src, &mut |g| {
            if json.len() > 1 {
                json.push(b',');
            }
            json_str(json, g);
        });
        json.push(b']');
        cache.src = Some(src);
    }
    out.extend_from_slice(&cache.json);
    out.extend_from_slice(br#","time_unix_ms":"#);
    clock.write_unix_ms(out, q.time_unix_ms);
    out.extend_from_slice(br#","source":""#);
    match q.source {
        SocketAddr::V4(a) => {
            if cache.ip_text_of != Some(src) {
                cache.ip_text.clear();
                write_ipv4(&mut cache.ip_text, *a.ip());
                cache.ip_text_of = Some(src);
            }
            out.extend_from_slice(&cache.ip_text);
            out.push(b':');
            write_u64(out, u64::from(a.port()));
        }
        SocketAddr::V6(_) => write_socket_addr(out, q.source),
    }
    out.extend_from_slice(br#"","transport":"#);
    out.extend_from_slice(match q.transport {
        Transport::Udp => br#""udp""#,
        Transport::Tcp => br#""tcp""#,
    });
    out.extend_from_slice(br#","qname":"#);
    json_str(out, &q.qname);
    out.extend_from_slice(br#","qtype":"#);
    match crate::dns::audit::qtype_name(q.qtype) {
        Some(name) => {
            out.push(b'"');
            out.extend_from_slice(name.as_bytes());
            out.push(b'"');
        }
        None => write_u64(out, u64::from(q.qtype)),
    }
    verdict.write(out, q);
    out.extend_from_slice(br#","rcode":"#);
    write_u64(out, u64::from(q.rcode));
    out.extend_from_slice(br#","upstream":"#);
    match q.upstream {
        Some(addr) => {
            out.push(b'"');
            write_socket_addr(out, addr);
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(br#","latency_us":"#);
    write_u64(out, q.latency_us);
    out.extend_from_slice(br#","cache_hit":"#);
    write_bool(out, q.cache_hit);
    out.extend_from_slice(br#","ech_stripped":"#);
    write_bool(out, q.ech_stripped);
    out.extend_from_slice(b"}\n");
}

fn write_bool(out: &mut Vec<u8>, v: bool) {
    out.extend_from_slice(if v { b"true" } else { b"false" });
}

/// Decimal digits of `v` (what `{}` gives, without the formatting machinery).
fn write_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// `a.b.c.d:port` for IPv4 by hand (every DNS query's source); IPv6 via its
/// `Display`, which is what serde writes for both.
fn write_ipv4(out: &mut Vec<u8>, ip: std::net::Ipv4Addr) {
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        write_u64(out, u64::from(octet));
    }
}

fn write_socket_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(a) => {
            write_ipv4(out, *a.ip());
            out.push(b':');
            write_u64(out, u64::from(a.port()));
        }
        SocketAddr::V6(_) => {
            let _ = write!(out, "{addr}");
        }
    }
}

/// Appends `s` as a JSON string, quotes included, escaped exactly as
/// `serde_json` does: `"` and `\`, the short escapes for backspace, form
/// feed, newline, carriage return and tab, `\u00XX` (lower-case hex) for the
/// other control characters; everything else, non-ASCII included, as is.
pub fn json_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short = match b {
            b'"' => b'"',
            b'\\' => b'\\',
            0x08 => b'b',
            0x0c => b'f',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            0x00..=0x1f => 0,
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        start = i + 1;
        if short == 0 {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.push(b'\\');
            out.push(short);
        }
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code: a panic is the failure report")]
mod dns_line_tests {
    use super::*;

    fn record(qname: &str, rule: &str, upstream: Option<SocketAddr>, ms: u64) -> DnsAuditRecord {
        DnsAuditRecord {
            time_unix_ms: ms,
            source: "[2001:db8::7]:5353".parse().unwrap(),
            transport: Transport::Tcp,
            qname: qname.into(),
            qtype: 65,
            allowed: false,
            enforced: true,
            watched: false,
            rule: rule.into(),
            reason: "default-deny",
            rcode: 3,
            upstream,
            latency_us: 1234,
            cache_hit: true,
            ech_stripped: false,
        }
    }

    fn serde_line(listener: &str, groups: &[&str], q: &DnsAuditRecord) -> Vec<u8> {
        let rec = AuditRecord::Dns(Box::new(DnsQueryRecord {
            kind: "dns",
            time: humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(q.time_unix_ms)).to_string(),
            listener: listener.to_owned(),
            src_groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            query: q.clone(),
        }));
        let mut line = serde_json::to_vec(&rec).unwrap();
        line.push(b'\n');
        line
    }

    fn ours(listener: &str, groups: &'static [&'static str], q: &DnsAuditRecord) -> Vec<u8> {
        let mut listener_json = Vec::new();
        json_str(&mut listener_json, listener);
        let groups: SourceGroups = Box::new(move |_, each| groups.iter().for_each(|g| each(g)));
        let mut out = Vec::new();
        write_dns_line(
            &mut out,
            &mut TimeCache::default(),
            &mut VerdictText::default(),
            &listener_json,
            &groups,
            &mut GroupsCache::default(),
            q,
        );
        out
    }

    #[test]
    fn cached_parts_follow_each_record() {
        // One set of caches over a run of records that change one part at a
        // time: each line must still be the record's own.
        let listener_json = br#""dns""#.to_vec();
        let groups: SourceGroups = Box::new(|src, each| {
            if src.is_loopback() {
                each("loopback");
            }
        });
        let (mut clock, mut verdict, mut src_cache) =
            (TimeCache::default(), VerdictText::default(), GroupsCache::default());
        let base = record("a.example", "rule-a", None, 1_763_893_952_123);
        let mut runs = vec![base.clone()];
        let mut q = base.clone();
        q.rule = Arc::from("rule-b");
        runs.push(q.clone());
        q.rule = Arc::from("rule-");
        runs.push(q.clone());
        q.reason = "allowed-by-rule";
        runs.push(q.clone());
        q.allowed = true;
        runs.push(q.clone());
        q.watched = true;
        runs.push(q.clone());
        q.enforced = false;
        runs.push(q.clone());
        q.source = "10.1.2.3:5353".parse().unwrap();
        runs.push(q.clone());
        q.source = "10.1.2.30:53".parse().unwrap();
        runs.push(q.clone());
        q.source = "[2001:db8::1]:53".parse().unwrap();
        runs.push(q.clone());
        q.source = "127.0.0.1:40000".parse().unwrap();
        runs.push(q.clone());
        for ms in [
            1_763_893_952_999,
            1_763_893_953_000,
            1_763_893_953_007,
            999,
            1_000,
            1_763_893_953_001,
        ] {
            q.time_unix_ms = ms;
            runs.push(q.clone());
        }
        for (i, q) in runs.iter().enumerate() {
            // A new receive batch starts a fresh source cache, as record_all does.
            if i % 4 == 0 {
                src_cache = GroupsCache::default();
            }
            let mut out = Vec::new();
            write_dns_line(
                &mut out,
                &mut clock,
                &mut verdict,
                &listener_json,
                &groups,
                &mut src_cache,
                q,
            );
            let want_groups: &[&str] = if q.source.ip().is_loopback() {
                &["loopback"]
            } else {
                &[]
            };
            let want = serde_line("dns", want_groups, q);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                String::from_utf8(want).unwrap(),
                "record {i}"
            );
        }
    }

    #[test]
    fn lines_are_byte_identical_to_serde() {
        let hostile = "a\"b\\c\u{0}\u{1f}\u{8}\u{c}\n\r\t\u{7f}é\u{2028}.test";
        let cases = [
            (
                "dns",
                &[][..],
                record("www.example.com", "default", None, 1_763_893_952_123),
            ),
            (
                "lis\"ten\\er\n",
                &["private-ranges", "we\"ird\u{1}"][..],
                record(hostile, "rule \"x\"\\", Some("192.0.2.53:53".parse().unwrap()), 0),
            ),
            (
                "dns",
                &["g"][..],
                record("", "r", Some("[::1]:53".parse().unwrap()), 999),
            ),
        ];
        for (listener, groups, q) in cases {
            let a = ours(listener, groups, &q);
            let b = serde_line(listener, groups, &q);
            assert_eq!(String::from_utf8(a).unwrap(), String::from_utf8(b).unwrap());
        }
        // A type with a name is written as the name, one without as its number.
        for (qtype, want) in [
            (1, r#""qtype":"A""#),
            (65, r#""qtype":"HTTPS""#),
            (65280, r#""qtype":65280"#),
        ] {
            let mut q = record("www.example.com", "r", None, 5);
            q.qtype = qtype;
            let a = String::from_utf8(ours("dns", &[], &q)).unwrap();
            assert!(a.contains(want), "{a}");
            assert_eq!(a, String::from_utf8(serde_line("dns", &[], &q)).unwrap());
        }
    }

    #[test]
    fn hostile_names_round_trip_through_a_json_parser() {
        let all_controls: String = (0u8..0x20).map(char::from).collect();
        for name in [
            "\"",
            "\\",
            "\\\"",
            "x\u{0}y",
            all_controls.as_str(),
            "\"},\"allowed\":true,\"x\":\"",
        ] {
            let line = ours("dns", &[], &record(name, name, None, 5));
            assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1, "one line");
            let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
            assert_eq!(v["qname"], name);
            assert_eq!(v["rule"], name);
            assert_eq!(v["allowed"], false);
        }
    }

    #[test]
    fn time_cache_matches_the_formatter_across_seconds() {
        let mut clock = TimeCache::default();
        for ms in [
            0,
            999,
            1_000,
            1_763_893_952_001,
            1_763_893_952_999,
            1_763_893_953_000,
            253_402_300_799_999,
        ] {
            let mut out = Vec::new();
            clock.write(&mut out, ms);
            let want = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string();
            assert_eq!(String::from_utf8(out).unwrap(), want);
        }
    }
}
