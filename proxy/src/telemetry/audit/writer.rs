//! The writer thread, its queue and its sinks.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
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
            crate::telemetry::metrics::audit_dropped();
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
                            crate::telemetry::metrics::errors(crate::telemetry::metrics::AUDIT_WRITE, 1);
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
                        crate::telemetry::metrics::errors(crate::telemetry::metrics::AUDIT_WRITE, count);
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
            crate::telemetry::metrics::errors(crate::telemetry::metrics::AUDIT_WRITE, 1);
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
