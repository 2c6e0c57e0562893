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
//! the data path writes.

use std::borrow::Cow;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

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
    Flush(oneshot::Sender<Result<(), AuditError>>),
    Reopen(oneshot::Sender<Result<(), AuditError>>),
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
            .spawn(move || writer_loop(rx, out, sink, &thread_stats))
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

    fn note_drop(&self) {
        let total = self.stats.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        super::metrics::audit_dropped();
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

fn writer_loop<T: Serialize>(mut rx: mpsc::Receiver<Msg<T>>, out: Output, sink: AuditSink, stats: &Stats) {
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
                            tracing::warn!(error = %e, "audit record not written");
                        }
                    }
                }
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
                            Msg::Flush(ack) | Msg::Reopen(ack) | Msg::Shutdown(ack) => {
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
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
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
    /// Name of the rule that decided; `None` for the policy default or a
    /// decision taken before policy (parse failure, SSRF guard).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
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
    /// A verdict with no rule and no check.
    pub fn new(action: Action, reason: impl Into<Cow<'static, str>>, mode: Enforcement) -> Self {
        Self {
            action,
            rule: None,
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
}

impl FlowRecord {
    /// A record stamped now, for a flow from `src` on `listener`, with
    /// everything else empty and the given verdict.
    pub fn new(flow_id: u64, listener: impl Into<String>, src: SocketAddr, verdict: VerdictRecord) -> Self {
        Self {
            kind: "flow",
            dns_name: None,
            time: rfc3339_now(),
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
        }
    }
}
