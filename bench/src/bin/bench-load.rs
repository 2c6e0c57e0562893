//! Load generator for the side-by-side benchmark, and the report that turns
//! its results into the table in docs/performance.md.
//!
//! Each phase prints one JSON line: what it did, how long it took, and what
//! the proxy under test spent on it (CPU seconds and RSS of the proxy's whole
//! process tree, read from `/proc` around the phase). One thread: the harness
//! pins it, with the fake origin, to the core the proxy does not have.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark tool")]
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "statistics over counts far below 2^52"
)]

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};
use sluice_bench::{Mode, REPLY_LEN, build_hello, procfs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::client::Resumption;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

#[derive(Parser, Debug)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Wait until TARGET routes a hello for SNI to the origin (or, with
    /// --expect-deny, check that it does not).
    Probe {
        #[command(flatten)]
        c: Common,
        #[arg(long)]
        expect_deny: bool,
        #[arg(long, default_value_t = 30)]
        wait_secs: u64,
    },
    /// COUNT connections, CONCURRENCY in flight: hello, reply, origin closes.
    Conn {
        #[command(flatten)]
        c: Common,
        #[command(flatten)]
        m: Measured,
        #[arg(long, default_value_t = 20_000)]
        count: usize,
        #[arg(long, default_value_t = 50)]
        concurrency: usize,
        /// Phase name in the output ("conn", "latency").
        #[arg(long, default_value = "conn")]
        phase: String,
    },
    /// COUNT real TLS connections (full handshake, no resumption) to the
    /// origin through TARGET, CONCURRENCY in flight: TLS handshake, 128
    /// bytes of application data, origin closes.
    Tls {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value = "bench.example")]
        sni: String,
        /// The origin's certificate (DER), trusted as the only root.
        #[arg(long)]
        ca: PathBuf,
        #[command(flatten)]
        m: Measured,
        #[arg(long, default_value_t = 5_000)]
        count: usize,
        #[arg(long, default_value_t = 50)]
        concurrency: usize,
        #[arg(long, default_value = "tls")]
        phase: String,
    },
    /// COUNT plain-HTTP requests for `http://HOST/` in absolute form through
    /// TARGET, an HTTP proxy, over CONCURRENCY keep-alive connections, each
    /// sending its requests one after another.
    Http {
        #[arg(long)]
        target: SocketAddr,
        /// `host:port` of the origin, as the request's URI and Host name it.
        #[arg(long)]
        host: String,
        #[command(flatten)]
        m: Measured,
        #[arg(long, default_value_t = 20_000)]
        count: usize,
        #[arg(long, default_value_t = 50)]
        concurrency: usize,
        #[arg(long, default_value = "http")]
        phase: String,
    },
    /// COUNT QUIC connections to the origin through TARGET (a `quic`
    /// listener, or the origin itself for `direct`), CONCURRENCY in flight,
    /// each from its own UDP port: full handshake, one stream asking for
    /// BYTES, read to its end, close. With `--phase quic-bulk` and one
    /// connection, the proxy CPU per GB.
    Quic {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value = "bench.example")]
        sni: String,
        /// The origin's certificate (DER), trusted as the only root.
        #[arg(long)]
        ca: PathBuf,
        #[command(flatten)]
        m: Measured,
        #[arg(long, default_value_t = 5_000)]
        count: usize,
        #[arg(long, default_value_t = 50)]
        concurrency: usize,
        /// Bytes each connection asks for.
        #[arg(long, default_value_t = REPLY_LEN as u64)]
        bytes: u64,
        #[arg(long, default_value = "quic")]
        phase: String,
    },
    /// STREAMS connections each receiving BYTES/STREAMS bytes after the hello.
    Bulk {
        #[command(flatten)]
        c: Common,
        #[command(flatten)]
        m: Measured,
        #[arg(long, default_value_t = 2_000_000_000)]
        bytes: u64,
        #[arg(long, default_value_t = 1)]
        streams: u64,
    },
    /// Open COUNT connections, complete the hello exchange, hold them idle,
    /// and read the proxy's RSS.
    Idle {
        #[command(flatten)]
        c: Common,
        #[command(flatten)]
        m: Measured,
        #[arg(long, default_value_t = 5_000)]
        count: usize,
        #[arg(long, default_value_t = 50)]
        concurrency: usize,
        /// Time to let the proxy settle before reading RSS.
        #[arg(long, default_value_t = 1_000)]
        settle_ms: u64,
    },
    /// Interleaved A/B on one proxy process: ROUNDS rounds, each sending
    /// BATCH connections (CONCURRENCY in flight, as `conn`) to every target
    /// in turn, in reverse order every other round, with the proxy's
    /// on-CPU time (schedstat, to the nanosecond) read around each batch.
    /// The targets are listeners of the same process, the first without
    /// the thing measured, so what drifts between rounds (other load on the
    /// machine, caches, frequency) cancels in each round's differences.
    Ab {
        /// `label=address`, the first the baseline.
        #[arg(long = "target", required = true, num_args = 1..)]
        targets: Vec<String>,
        /// A captured single-record ClientHello; its SNI is rewritten to --sni.
        #[arg(long)]
        hello: PathBuf,
        #[arg(long, default_value = "bench.example")]
        sni: String,
        /// The proxy's PID (its threads are counted).
        #[arg(long)]
        pid: u32,
        #[arg(long, default_value_t = 30)]
        rounds: usize,
        #[arg(long, default_value_t = 1_000)]
        batch: usize,
        #[arg(long, default_value_t = 50)]
        concurrency: usize,
        /// Bound on the whole phase.
        #[arg(long, default_value_t = 600)]
        max_secs: u64,
    },
    /// Print the tables from a results file (one JSON object per line).
    Report {
        file: PathBuf,
        /// Also draw the Sluice / peer ratios as an SVG chart here.
        #[arg(long)]
        svg: Option<PathBuf>,
    },
    /// Draw bench/dns/run.sh's ratios (its summary file: one line per
    /// server and mode) as an SVG chart.
    DnsChart {
        summary: PathBuf,
        #[arg(long)]
        svg: PathBuf,
        /// What run it is, for the chart's note.
        #[arg(long, default_value = "")]
        note: String,
    },
}

#[derive(Args, Debug)]
struct Common {
    #[arg(long)]
    target: SocketAddr,
    /// A captured single-record ClientHello; its SNI is rewritten to --sni.
    #[arg(long)]
    hello: PathBuf,
    #[arg(long, default_value = "bench.example")]
    sni: String,
}

#[derive(Args, Debug)]
struct Measured {
    /// Name of what is measured ("direct", "sluice", "envoy", ...).
    #[arg(long)]
    label: String,
    /// Root PID of the proxy under test (its descendants are counted too).
    #[arg(long)]
    pid: Option<u32>,
    /// PID of the fake origin, to show the client core's load.
    #[arg(long)]
    origin_pid: Option<u32>,
    #[arg(long, default_value_t = 1)]
    round: u32,
    /// Bound on the whole phase.
    #[arg(long, default_value_t = 180)]
    max_secs: u64,
}

fn hello(c: &Common, mode: Mode) -> Arc<[u8]> {
    let cap = std::fs::read(&c.hello).unwrap_or_else(|e| panic!("{}: {e}", c.hello.display()));
    build_hello(&cap, &c.sni, mode).unwrap().into()
}

/// CPU of the proxy, the origin and this process, sampled around a phase.
struct Meter {
    pid: Option<u32>,
    origin: Option<u32>,
    start: Instant,
    proxy: f64,
    origin_cpu: f64,
    own: f64,
}

impl Meter {
    fn start(m: &Measured) -> Self {
        Meter {
            pid: m.pid,
            origin: m.origin_pid,
            proxy: m.pid.map_or(0.0, procfs::tree_cpu_secs),
            origin_cpu: m.origin_pid.map_or(0.0, procfs::cpu_secs),
            own: procfs::cpu_secs(std::process::id()),
            start: Instant::now(),
        }
    }
    fn finish(&self, m: &Measured, phase: &str) -> serde_json::Map<String, Value> {
        let elapsed = self.start.elapsed().as_secs_f64();
        let mut o = serde_json::Map::new();
        o.insert("label".into(), json!(m.label));
        o.insert("phase".into(), json!(phase));
        o.insert("round".into(), json!(m.round));
        o.insert("elapsed_s".into(), json!(elapsed));
        if let Some(pid) = self.pid {
            o.insert("proxy_cpu_s".into(), json!(procfs::tree_cpu_secs(pid) - self.proxy));
        }
        let origin = self.origin.map_or(0.0, |p| procfs::cpu_secs(p) - self.origin_cpu);
        let own = procfs::cpu_secs(std::process::id()) - self.own;
        o.insert("origin_cpu_s".into(), json!(origin));
        o.insert("load_cpu_s".into(), json!(own));
        // Share of one core used on the client side: near 1.0 means the
        // client core, not the proxy, set the pace of this phase.
        o.insert("client_core_busy".into(), json!((origin + own) / elapsed));
        o
    }
}

/// One connection: connect, hello, read the reply, wait for the origin's
/// close. Returns connect-to-first-reply-byte time.
async fn one(target: SocketAddr, hello: &[u8], buf: &mut [u8]) -> std::io::Result<Duration> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect(target).await?;
    s.set_nodelay(true)?;
    s.write_all(hello).await?;
    let mut got = 0;
    let mut first = None;
    while got < REPLY_LEN {
        let n = s.read(buf).await?;
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        first.get_or_insert_with(|| t0.elapsed());
        got += n;
    }
    while s.read(buf).await? > 0 {}
    Ok(first.unwrap_or_default())
}

/// One request on `s` (a keep-alive connection to the proxy): its time to
/// the whole answer, and whether the connection may carry another.
async fn one_request(s: &mut TcpStream, request: &[u8], buf: &mut Vec<u8>) -> std::io::Result<(Duration, bool)> {
    let t0 = Instant::now();
    s.write_all(request).await?;
    buf.clear();
    let mut chunk = [0_u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            if !head.starts_with("http/1.1 200") {
                let line = head.lines().next().unwrap_or_default().to_owned();
                return Err(std::io::Error::other(format!("answered `{line}`")));
            }
            let body = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| std::io::Error::other("an answer without content-length"))?;
            while buf.len() < end + 4 + body {
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    return Err(ErrorKind::UnexpectedEof.into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let close = head
                .lines()
                .any(|l| l.starts_with("connection:") && l.contains("close"));
            return Ok((t0.elapsed(), !close));
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn http(target: SocketAddr, host: &str, m: &Measured, count: usize, concurrency: usize, phase: &str) -> Value {
    let request: Arc<[u8]> = format!(
        "GET http://{host}/v1/models HTTP/1.1\r\nhost: {host}\r\nuser-agent: bench-load\r\naccept: */*\r\n\r\n"
    )
    .into_bytes()
    .into();
    let next = Arc::new(AtomicUsize::new(0));
    let meter = Meter::start(m);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(m.max_secs);
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (request, next) = (request.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0_usize;
            let mut buf = Vec::with_capacity(4096);
            let mut conn: Option<TcpStream> = None;
            while next.fetch_add(1, Ordering::Relaxed) < count {
                if tokio::time::Instant::now() > deadline {
                    errors += 1;
                    continue;
                }
                let s = match conn.take() {
                    Some(s) => s,
                    None => match timeout(Duration::from_secs(10), TcpStream::connect(target)).await {
                        Ok(Ok(s)) => {
                            let _ = s.set_nodelay(true);
                            s
                        }
                        _ => {
                            errors += 1;
                            continue;
                        }
                    },
                };
                let mut s = s;
                match timeout(Duration::from_secs(10), one_request(&mut s, &request, &mut buf)).await {
                    Ok(Ok((d, again))) => {
                        lat.push(u32::try_from(d.as_micros()).unwrap_or(u32::MAX));
                        if again {
                            conn = Some(s);
                        }
                    }
                    _ => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut o = gathered(tasks, &meter, m, phase, count, concurrency).await;
    let ok = o["ok"].as_u64().unwrap_or(0);
    let elapsed = o["elapsed_s"].as_f64().unwrap_or(f64::NAN);
    o.insert("req_per_s".into(), json!(ok as f64 / elapsed));
    if let Some(cpu) = o.get("proxy_cpu_s").and_then(Value::as_f64) {
        o.insert("proxy_cpu_us_per_req".into(), json!(cpu * 1e6 / ok.max(1) as f64));
    }
    Value::Object(o)
}

/// Opens a connection and completes the hello exchange, keeping it open.
async fn open_idle(target: SocketAddr, hello: &[u8]) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(target).await?;
    s.set_nodelay(true)?;
    s.write_all(hello).await?;
    let mut buf = [0_u8; REPLY_LEN];
    s.read_exact(&mut buf).await?;
    Ok(s)
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)])
}

/// One TLS connection: connect, full handshake, read the origin's answer,
/// wait for its close. Returns connect-to-first-application-byte time.
async fn one_tls(target: SocketAddr, tls: &TlsConnector, name: &ServerName<'static>) -> std::io::Result<Duration> {
    let t0 = Instant::now();
    let s = TcpStream::connect(target).await?;
    s.set_nodelay(true)?;
    let mut t = tls.connect(name.clone(), s).await?;
    let mut buf = [0_u8; REPLY_LEN];
    t.read_exact(&mut buf).await?;
    let first = t0.elapsed();
    // close_notify then EOF; an abrupt close after the answer is fine too.
    while matches!(t.read(&mut buf).await, Ok(n) if n > 0) {}
    Ok(first)
}

fn tls_connector(ca: &PathBuf) -> TlsConnector {
    let der = std::fs::read(ca).unwrap_or_else(|e| panic!("{}: {e}", ca.display()));
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(der)).unwrap();
    let mut cfg = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Every connection pays a full handshake, as a new client would.
    cfg.resumption = Resumption::disabled();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(cfg))
}

#[derive(Clone)]
enum Kind {
    Hello(Arc<[u8]>),
    Tls(TlsConnector, ServerName<'static>),
    Quic(quinn::ClientConfig, Arc<str>, u64),
}

/// QUIC client settings trusting only the origin's certificate (ALPN
/// `bench`, no resumption: every connection a full handshake).
fn quic_client(ca: &PathBuf) -> quinn::ClientConfig {
    let der = std::fs::read(ca).unwrap_or_else(|e| panic!("{}: {e}", ca.display()));
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(der)).unwrap();
    let mut cfg = ClientConfig::builder_with_provider(Arc::new(tokio_rustls::rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&tokio_rustls::rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.resumption = Resumption::disabled();
    cfg.alpn_protocols = vec![b"bench".to_vec()];
    quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(cfg).unwrap(),
    ))
}

/// One QUIC connection from a UDP port of its own (a proxy keys flows by
/// address): handshake, ask for `bytes` on a stream, read them, close.
/// Returns the time to the first byte and the bytes read.
async fn one_quic(
    target: SocketAddr,
    cfg: &quinn::ClientConfig,
    sni: &str,
    bytes: u64,
) -> std::io::Result<(Duration, u64)> {
    let t0 = Instant::now();
    let mut ep = quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    ep.set_default_client_config(cfg.clone());
    let conn = ep
        .connect(target, sni)
        .map_err(std::io::Error::other)?
        .await
        .map_err(std::io::Error::other)?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(std::io::Error::other)?;
    send.write_all(&bytes.to_le_bytes())
        .await
        .map_err(std::io::Error::other)?;
    send.finish().map_err(std::io::Error::other)?;
    let mut first = None;
    let mut got = 0_u64;
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await.map_err(std::io::Error::other)? {
        first.get_or_insert_with(|| t0.elapsed());
        got += chunk.bytes.len() as u64;
    }
    conn.close(0_u32.into(), b"done");
    // Let the close go out; the client does not wait for the drain.
    let _ = timeout(Duration::from_millis(50), ep.wait_idle()).await;
    Ok((first.unwrap_or_else(|| t0.elapsed()), got))
}

/// How an A/B phase runs (see `Cmd::Ab`).
struct Ab {
    rounds: usize,
    batch: usize,
    concurrency: usize,
    deadline: Instant,
}

impl Ab {
    async fn run(&self, targets: &[String], hello_file: &PathBuf, sni: &str, pid: u32) -> Value {
        let cap = std::fs::read(hello_file).unwrap_or_else(|e| panic!("{}: {e}", hello_file.display()));
        let hello: Arc<[u8]> = build_hello(&cap, sni, Mode::ReplyClose).unwrap().into();
        let targets: Vec<(String, SocketAddr)> = targets
            .iter()
            .map(|t| {
                let (label, addr) = t
                    .split_once('=')
                    .unwrap_or_else(|| panic!("--target {t}: want label=address"));
                (
                    label.to_owned(),
                    addr.parse().unwrap_or_else(|e| panic!("--target {t}: {e}")),
                )
            })
            .collect();
        // Warm every path first: instances started, caches filled.
        for (_, addr) in &targets {
            self.batch(*addr, &hello).await;
        }
        let mut per: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
        let mut errors = 0;
        let mut done = 0;
        for round in 0..self.rounds {
            if Instant::now() > self.deadline {
                break;
            }
            let mut order: Vec<usize> = (0..targets.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            for i in order {
                let before = procfs::runtime_ns(pid);
                errors += self.batch(targets[i].1, &hello).await;
                let spent = procfs::runtime_ns(pid).saturating_sub(before);
                per[i].push(spent as f64 / 1_000.0 / self.batch as f64);
            }
            done += 1;
        }
        let summary = |v: &[f64]| {
            let mut s = v.to_vec();
            s.sort_by(f64::total_cmp);
            let mean = s.iter().sum::<f64>() / s.len().max(1) as f64;
            let var = s.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (s.len().max(2) - 1) as f64;
            json!({
                "median_us": quantile(&s, 0.5),
                "p25_us": quantile(&s, 0.25),
                "p75_us": quantile(&s, 0.75),
                "mean_us": mean,
                "stderr_us": (var / s.len().max(1) as f64).sqrt(),
            })
        };
        let mut out = Vec::new();
        for (i, (label, _)) in targets.iter().enumerate() {
            let mut o = summary(&per[i]);
            o["label"] = json!(label);
            o["per_round_us"] = json!(per[i]);
            if i > 0 {
                // Each round's difference against the baseline batch of the
                // same round: neighbours in time.
                let diffs: Vec<f64> = per[i].iter().zip(&per[0]).map(|(b, a)| b - a).collect();
                o["added"] = summary(&diffs);
                eprintln!(
                    "{label}: {:.2} us of proxy CPU per connection added over {} (median of {} paired rounds; mean {:.2} +- {:.2})",
                    o["added"]["median_us"].as_f64().unwrap_or(f64::NAN),
                    targets[0].0,
                    diffs.len(),
                    o["added"]["mean_us"].as_f64().unwrap_or(f64::NAN),
                    o["added"]["stderr_us"].as_f64().unwrap_or(f64::NAN),
                );
            }
            out.push(o);
        }
        json!({
            "phase": "ab",
            "rounds": done,
            "batch": self.batch,
            "concurrency": self.concurrency,
            "errors": errors,
            "targets": out,
        })
    }

    /// One batch to `target`; the connections that failed.
    async fn batch(&self, target: SocketAddr, hello: &Arc<[u8]>) -> usize {
        let next = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..self.concurrency.max(1) {
            let (next, hello, count) = (next.clone(), hello.clone(), self.batch);
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0_u8; 4096];
                let mut errors = 0_usize;
                while next.fetch_add(1, Ordering::Relaxed) < count {
                    if !matches!(
                        timeout(Duration::from_secs(10), one(target, &hello, &mut buf)).await,
                        Ok(Ok(_))
                    ) {
                        errors += 1;
                    }
                }
                errors
            }));
        }
        let mut errors = 0;
        for t in tasks {
            errors += t.await.unwrap_or(1);
        }
        errors
    }
}

/// The `q` quantile of sorted `s` (nearest rank); NaN when empty.
fn quantile(s: &[f64], q: f64) -> f64 {
    if s.is_empty() {
        return f64::NAN;
    }
    let i = ((s.len() - 1) as f64 * q).round() as usize;
    s[i.min(s.len() - 1)]
}

async fn conn(c: &Common, m: &Measured, count: usize, concurrency: usize, phase: &str) -> Value {
    let h = hello(c, Mode::ReplyClose);
    drive(c.target, Kind::Hello(h), m, count, concurrency, phase).await
}

/// The workers' latencies and errors, as the phase's result: counts and
/// latency percentiles beside the meter's CPU figures.
async fn gathered(
    tasks: Vec<tokio::task::JoinHandle<(Vec<u32>, usize)>>,
    meter: &Meter,
    m: &Measured,
    phase: &str,
    count: usize,
    concurrency: usize,
) -> serde_json::Map<String, Value> {
    let mut lat = Vec::with_capacity(count);
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.unwrap();
        lat.extend(l);
        errors += e;
    }
    let mut o = meter.finish(m, phase);
    lat.sort_unstable();
    o.insert("count".into(), json!(count));
    o.insert("ok".into(), json!(lat.len()));
    o.insert("errors".into(), json!(errors));
    o.insert("concurrency".into(), json!(concurrency));
    o.insert("p50_us".into(), json!(percentile(&lat, 0.50)));
    o.insert("p90_us".into(), json!(percentile(&lat, 0.90)));
    o.insert("p99_us".into(), json!(percentile(&lat, 0.99)));
    o.insert("p999_us".into(), json!(percentile(&lat, 0.999)));
    o.insert("max_us".into(), json!(percentile(&lat, 1.0)));
    o
}

async fn drive(target: SocketAddr, kind: Kind, m: &Measured, count: usize, concurrency: usize, phase: &str) -> Value {
    let next = Arc::new(AtomicUsize::new(0));
    let meter = Meter::start(m);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(m.max_secs);
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (kind, next) = (kind.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0_usize;
            let mut buf = vec![0_u8; 4096];
            while next.fetch_add(1, Ordering::Relaxed) < count {
                if tokio::time::Instant::now() > deadline {
                    errors += 1;
                    continue;
                }
                let r = match &kind {
                    Kind::Hello(h) => timeout(Duration::from_secs(10), one(target, h, &mut buf)).await,
                    Kind::Tls(t, n) => timeout(Duration::from_secs(10), one_tls(target, t, n)).await,
                    Kind::Quic(cfg, sni, bytes) => {
                        timeout(Duration::from_secs(10), async {
                            let (first, got) = one_quic(target, cfg, sni, *bytes).await?;
                            if got == *bytes {
                                Ok(first)
                            } else {
                                Err(std::io::Error::other("short answer"))
                            }
                        })
                        .await
                    }
                };
                match r {
                    Ok(Ok(d)) => lat.push(u32::try_from(d.as_micros()).unwrap_or(u32::MAX)),
                    _ => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut o = gathered(tasks, &meter, m, phase, count, concurrency).await;
    let ok = o["ok"].as_u64().unwrap_or(0);
    let elapsed = o["elapsed_s"].as_f64().unwrap_or(f64::NAN);
    o.insert("conn_per_s".into(), json!(ok as f64 / elapsed));
    if let Some(cpu) = o.get("proxy_cpu_s").and_then(Value::as_f64) {
        o.insert("proxy_cpu_us_per_conn".into(), json!(cpu * 1e6 / ok.max(1) as f64));
    }
    Value::Object(o)
}

/// The QUIC phases: new connections (`quic`), or one connection's bulk
/// transfer (`quic-bulk`: throughput and proxy CPU per GB).
#[allow(clippy::too_many_arguments, reason = "one argument per command-line option")]
async fn quic(
    target: SocketAddr,
    sni: &str,
    ca: &PathBuf,
    m: &Measured,
    count: usize,
    concurrency: usize,
    bytes: u64,
    phase: &str,
) -> Value {
    let cfg = quic_client(ca);
    if phase != "quic-bulk" {
        return drive(
            target,
            Kind::Quic(cfg, Arc::from(sni), bytes),
            m,
            count,
            concurrency,
            phase,
        )
        .await;
    }
    let meter = Meter::start(m);
    let r = timeout(Duration::from_secs(m.max_secs), one_quic(target, &cfg, sni, bytes)).await;
    let (first, got) = match r {
        Ok(Ok(x)) => x,
        _ => (Duration::ZERO, 0),
    };
    let mut o = meter.finish(m, phase);
    let elapsed = o["elapsed_s"].as_f64().unwrap_or(f64::NAN);
    o.insert("bytes".into(), json!(got));
    o.insert("first_byte_s".into(), json!(first.as_secs_f64()));
    o.insert("errors".into(), json!(u64::from(got != bytes)));
    o.insert("gbit_s".into(), json!(got as f64 * 8.0 / elapsed / 1e9));
    if let Some(cpu) = o.get("proxy_cpu_s").and_then(Value::as_f64) {
        o.insert("proxy_cpu_s_per_gb".into(), json!(cpu / (got as f64 / 1e9)));
    }
    Value::Object(o)
}

async fn bulk(c: &Common, m: &Measured, bytes: u64, streams: u64) -> Value {
    let per = bytes / streams.max(1);
    let h = hello(c, Mode::Bulk(per));
    let meter = Meter::start(m);
    let mut tasks = Vec::new();
    for _ in 0..streams.max(1) {
        let (h, target) = (h.clone(), c.target);
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let run = async {
                let mut s = TcpStream::connect(target).await?;
                s.write_all(&h).await?;
                let mut buf = vec![0_u8; 256 * 1024];
                let mut got = 0_u64;
                let mut first = None;
                // Longest wait for data once it flows: a stalled relay shows here.
                let mut last = Instant::now();
                let mut stall = Duration::ZERO;
                loop {
                    let n = s.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    if first.is_some() {
                        stall = stall.max(last.elapsed());
                    }
                    last = Instant::now();
                    first.get_or_insert_with(|| t0.elapsed());
                    got += n as u64;
                }
                std::io::Result::Ok((got, first.unwrap_or_default(), stall))
            };
            let none = (0, Duration::ZERO, Duration::ZERO);
            timeout(Duration::from_secs(120), run)
                .await
                .map_or(none, |r| r.unwrap_or(none))
        }));
    }
    let mut got = 0;
    let mut first_byte = Duration::ZERO;
    let mut stall = Duration::ZERO;
    for t in tasks {
        let (n, first, st) = t.await.unwrap();
        got += n;
        first_byte = first_byte.max(first);
        stall = stall.max(st);
    }
    let mut o = meter.finish(m, "bulk");
    let elapsed = o["elapsed_s"].as_f64().unwrap_or(f64::NAN);
    o.insert("bytes".into(), json!(got));
    o.insert("first_byte_s".into(), json!(first_byte.as_secs_f64()));
    o.insert("max_read_gap_s".into(), json!(stall.as_secs_f64()));
    o.insert("errors".into(), json!(u64::from(got != per * streams.max(1))));
    o.insert("gbit_s".into(), json!(got as f64 * 8.0 / elapsed / 1e9));
    if let Some(cpu) = o.get("proxy_cpu_s").and_then(Value::as_f64) {
        o.insert("proxy_cpu_s_per_gb".into(), json!(cpu / (got as f64 / 1e9)));
    }
    Value::Object(o)
}

async fn idle(c: &Common, m: &Measured, count: usize, concurrency: usize, settle: u64) -> Value {
    let h = hello(c, Mode::ReplyHold);
    let rss = || m.pid.map_or(0, procfs::tree_rss_kib);
    let before = rss();
    let meter = Meter::start(m);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (h, next, target) = (h.clone(), next.clone(), c.target);
        tasks.push(tokio::spawn(async move {
            let mut held = Vec::new();
            let mut errors = 0_usize;
            while next.fetch_add(1, Ordering::Relaxed) < count {
                match timeout(Duration::from_secs(10), open_idle(target, &h)).await {
                    Ok(Ok(s)) => held.push(s),
                    _ => errors += 1,
                }
            }
            (held, errors)
        }));
    }
    let mut held = Vec::with_capacity(count);
    let mut errors = 0;
    for t in tasks {
        let (s, e) = t.await.unwrap();
        held.extend(s);
        errors += e;
    }
    tokio::time::sleep(Duration::from_millis(settle)).await;
    let after = rss();
    let mut o = meter.finish(m, "idle");
    let ok = held.len();
    drop(held);
    o.insert("count".into(), json!(count));
    o.insert("ok".into(), json!(ok));
    o.insert("errors".into(), json!(errors));
    if m.pid.is_some() {
        o.insert("rss_before_kib".into(), json!(before));
        o.insert("rss_after_kib".into(), json!(after));
        o.insert(
            "kib_per_flow".into(),
            json!((after as f64 - before as f64) / ok.max(1) as f64),
        );
    }
    // Let the proxy see the closes before the next phase starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Value::Object(o)
}

async fn probe(c: &Common, expect_deny: bool, wait: u64) -> bool {
    let h = hello(c, Mode::ReplyClose);
    let mut buf = vec![0_u8; 4096];
    if expect_deny {
        let attempt = async {
            let mut s = TcpStream::connect(c.target).await?;
            s.write_all(&h).await?;
            let mut got = 0;
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return std::io::Result::Ok(got),
                    Ok(n) => got += n,
                }
            }
        };
        return match timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(0)) => {
                eprintln!("probe {}: SNI {} refused (closed, no byte)", c.target, c.sni);
                true
            }
            Ok(Ok(n)) => {
                eprintln!("probe {}: SNI {} LEAKED {n} bytes", c.target, c.sni);
                false
            }
            Ok(Err(e)) => {
                eprintln!("probe {}: SNI {} refused at connect/write: {e}", c.target, c.sni);
                true
            }
            Err(_) => {
                eprintln!("probe {}: SNI {} held 5 s with no byte through", c.target, c.sni);
                true
            }
        };
    }
    let end = Instant::now() + Duration::from_secs(wait);
    loop {
        match timeout(Duration::from_secs(5), one(c.target, &h, &mut buf)).await {
            Ok(Ok(_)) => return true,
            Ok(Err(e)) if Instant::now() >= end => {
                eprintln!("probe {}: {e}", c.target);
                return false;
            }
            Err(_) if Instant::now() >= end => {
                eprintln!("probe {}: timed out", c.target);
                return false;
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

// ---------------------------------------------------------------- report

/// Columns of the tables. `floor` (bench-floor, a relay that decides
/// nothing) is a reference, like `direct`, never a peer.
/// `wasm` is Sluice with one connection-level plugin, beside `sluice`.
const LABELS: [&str; 8] = ["direct", "floor", "base", "sluice", "wasm", "envoy", "haproxy", "nginx"];
const PEERS: [&str; 3] = ["envoy", "haproxy", "nginx"];

struct Metric {
    name: &'static str,
    phase: &'static str,
    field: &'static str,
    lower_is_better: bool,
    target: &'static str,
}

const METRICS: [Metric; 21] = [
    Metric {
        name: "proxy CPU per new TLS connection (µs)",
        phase: "conn",
        field: "proxy_cpu_us_per_conn",
        lower_is_better: true,
        target: "< 1.0 × best peer; ≤ 1.10 × floor",
    },
    Metric {
        name: "proxy CPU per connection, sequential (µs)",
        phase: "latency",
        field: "proxy_cpu_us_per_conn",
        lower_is_better: true,
        target: "< 1.0 × best peer; ≤ 1.10 × floor",
    },
    Metric {
        name: "new connections/s, 50 in flight",
        phase: "conn",
        field: "conn_per_s",
        lower_is_better: false,
        target: "(client core bound)",
    },
    Metric {
        name: "connect+hello → first byte p50 (µs)",
        phase: "latency",
        field: "p50_us",
        lower_is_better: true,
        target: "",
    },
    Metric {
        name: "connect+hello → first byte p90 (µs)",
        phase: "latency",
        field: "p90_us",
        lower_is_better: true,
        target: "",
    },
    Metric {
        name: "connect+hello → first byte p99 (µs)",
        phase: "latency",
        field: "p99_us",
        lower_is_better: true,
        target: "below every peer in 2 of 3 rounds",
    },
    Metric {
        name: "proxy CPU per GB relayed (s)",
        phase: "bulk",
        field: "proxy_cpu_s_per_gb",
        lower_is_better: true,
        target: "≤ floor",
    },
    Metric {
        name: "bulk throughput, 1 stream (Gbit/s)",
        phase: "bulk",
        field: "gbit_s",
        lower_is_better: false,
        target: "(no target)",
    },
    Metric {
        name: "RSS per idle proxied flow (KiB)",
        phase: "idle",
        field: "kib_per_flow",
        lower_is_better: true,
        target: "≤ 3 KiB, below HAProxy",
    },
    Metric {
        name: "TLS end to end: proxy CPU per connection (µs)",
        phase: "tls",
        field: "proxy_cpu_us_per_conn",
        lower_is_better: true,
        target: "",
    },
    Metric {
        name: "TLS end to end: handshakes/s, 50 in flight",
        phase: "tls",
        field: "conn_per_s",
        lower_is_better: false,
        target: "(client crypto bound)",
    },
    Metric {
        name: "TLS end to end: connect+handshake → first byte p50 (µs)",
        phase: "tls-latency",
        field: "p50_us",
        lower_is_better: true,
        target: "",
    },
    Metric {
        name: "TLS end to end: connect+handshake → first byte p99 (µs)",
        phase: "tls-latency",
        field: "p99_us",
        lower_is_better: true,
        target: "",
    },
    Metric {
        name: "proxy CPU per plain-HTTP request, keep-alive, 50 in flight (µs)",
        phase: "http",
        field: "proxy_cpu_us_per_req",
        lower_is_better: true,
        target: "",
    },
    Metric {
        name: "plain-HTTP request → whole answer p99, 50 in flight (µs)",
        phase: "http",
        field: "p99_us",
        lower_is_better: true,
        target: "",
    },
    Metric {
        name: "QUIC: proxy CPU per new connection, 50 in flight (µs)",
        phase: "quic",
        field: "proxy_cpu_us_per_conn",
        lower_is_better: true,
        target: "",
    },
    Metric {
        name: "QUIC: connections/s, 50 in flight",
        phase: "quic",
        field: "conn_per_s",
        lower_is_better: false,
        target: "(client crypto bound)",
    },
    Metric {
        name: "QUIC: connect+handshake → first byte p50, 50 in flight (µs)",
        phase: "quic",
        field: "p50_us",
        lower_is_better: true,
        target: "",
    },
    Metric {
        name: "QUIC: proxy CPU per GB relayed (s)",
        phase: "quic-bulk",
        field: "proxy_cpu_s_per_gb",
        lower_is_better: true,
        target: "",
    },
    Metric {
        name: "QUIC: bulk throughput, 1 connection (Gbit/s)",
        phase: "quic-bulk",
        field: "gbit_s",
        lower_is_better: false,
        target: "(client crypto bound)",
    },
    Metric {
        name: "client core busy, conn phase (share of 1 core)",
        phase: "conn",
        field: "client_core_busy",
        lower_is_better: true,
        target: "(< 1.0: client not the limit)",
    },
];

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    })
}

fn fmt(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(x) if x.abs() >= 100.0 => format!("{x:.0}"),
        Some(x) if x.abs() >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
        _ => "–".into(),
    }
}

/// The metrics the chart shows: those with a target against the peers.
const CHARTED: [&str; 5] = [
    "proxy CPU per new TLS connection (µs)",
    "proxy CPU per connection, sequential (µs)",
    "connect+hello → first byte p99 (µs)",
    "proxy CPU per GB relayed (s)",
    "RSS per idle proxied flow (KiB)",
];

/// Writes `chart` to `path`, saying so.
fn write_chart(path: &PathBuf, chart: &str) {
    match std::fs::write(path, chart) {
        Ok(()) => eprintln!("chart: {}", path.display()),
        Err(e) => eprintln!("chart: cannot write {}: {e}", path.display()),
    }
}

/// bench/dns/run.sh's summary: `SERVER MODE QPS AVG P50 P99 LOST CPU CAPPED`
/// per line (medians over its rounds; `nan` where there is none).
fn dns_chart(summary: &PathBuf, svg: &PathBuf, note: &str) {
    let text = std::fs::read_to_string(summary).unwrap_or_else(|e| panic!("{}: {e}", summary.display()));
    let mut rows: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 9 {
            let nums = f[2..9].iter().map(|v| v.parse::<f64>().unwrap_or(f64::NAN)).collect();
            rows.insert((f[0].to_owned(), f[1].to_owned()), nums);
        }
    }
    // (metric, column in nums, lower is better)
    let columns = [
        ("max qps", 0, false),
        ("qps, server held to part of a CPU", 6, false),
        ("server CPU per query", 5, true),
        ("p99 latency at a fixed rate", 3, true),
    ];
    let mut groups = Vec::new();
    for mode in ["cached", "uncached"] {
        for (name, col, lower) in columns {
            let get = |server: &str| {
                rows.get(&(server.to_owned(), mode.to_owned()))
                    .and_then(|v| v.get(col).copied())
                    .filter(|x| x.is_finite() && *x > 0.0)
            };
            let ratios = ["dnsmasq", "unbound"]
                .iter()
                .map(|p| ((*p).to_owned(), get("sluice").zip(get(p)).map(|(a, b)| a / b)))
                .collect();
            groups.push(sluice_bench::chart::Group {
                metric: format!("{mode}: {name}"),
                lower_is_better: lower,
                ratios,
            });
        }
    }
    write_chart(
        svg,
        &sluice_bench::chart::ratio_chart("DNS: Sluice against dnsmasq and unbound", note, &groups),
    );
}

fn report(file: &PathBuf, svg: Option<&PathBuf>) {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    // (label, phase, field) -> values over rounds
    let mut vals: BTreeMap<(String, String, String), Vec<f64>> = BTreeMap::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut rounds = 0;
    // syscall -> label -> calls per connection
    let mut syscalls: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    for line in text.lines().filter(|l| l.trim_start().starts_with('{')) {
        let Ok(Value::Object(o)) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let label = o.get("label").and_then(Value::as_str).unwrap_or("?").to_owned();
        let phase = o.get("phase").and_then(Value::as_str).unwrap_or("?").to_owned();
        rounds = rounds.max(o.get("round").and_then(Value::as_u64).unwrap_or(1));
        *errors.entry(label.clone()).or_default() += o.get("errors").and_then(Value::as_u64).unwrap_or(0);
        if phase == "syscalls" {
            let conns = o.get("conns").and_then(Value::as_f64).unwrap_or(1.0).max(1.0);
            if let Some(Value::Object(calls)) = o.get("calls") {
                for (name, n) in calls {
                    let per = n.as_f64().unwrap_or(0.0) / conns;
                    syscalls.entry(name.clone()).or_default().insert(label.clone(), per);
                }
            }
            continue;
        }
        for (k, v) in &o {
            if let Some(x) = v.as_f64() {
                vals.entry((label.clone(), phase.clone(), k.clone()))
                    .or_default()
                    .push(x);
            }
        }
    }
    let get = |label: &str, m: &Metric| {
        vals.get(&(label.to_owned(), m.phase.to_owned(), m.field.to_owned()))
            .and_then(|v| median(v.clone()))
    };
    let best_peer = |m: &Metric| {
        PEERS.iter().filter_map(|p| get(p, m).map(|v| (*p, v))).reduce(|a, b| {
            let b_wins = if m.lower_is_better { b.1 < a.1 } else { b.1 > a.1 };
            if b_wins { b } else { a }
        })
    };

    println!("Median of {rounds} round(s). Lower is better for CPU, latency and RSS.\n");
    println!(
        "| metric | direct | floor | base | sluice | wasm | envoy | haproxy | nginx | best peer | sluice / best peer | target |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for m in &METRICS {
        let cells: Vec<String> = LABELS.iter().map(|l| fmt(get(l, m))).collect();
        let best = best_peer(m);
        let (bn, bv) = best.map_or(("–", None), |(n, v)| (n, Some(v)));
        let (bn, vs_best) = if m.field == "client_core_busy" {
            ("", String::new())
        } else {
            (bn, ratio(get("sluice", m), bv))
        };
        println!(
            "| {} | {} | {bn} | {vs_best} | {} |",
            m.name,
            cells.join(" | "),
            m.target
        );
    }
    let errs: Vec<String> = LABELS
        .iter()
        .map(|l| errors.get(*l).map_or("–".into(), ToString::to_string))
        .collect();
    println!("| failed connections (all phases) | {} | | | |", errs.join(" | "));

    // The floor against the best peer: a ratio target below the floor's own
    // ratio cannot be met by spending less in user space, only by making the
    // kernel do less.
    println!("\nThe floor (bench-floor: accept, read, connect, relay, close; no decision) against the best peer:\n");
    println!("| metric | floor | best peer | floor / best peer | sluice / floor | target |");
    println!("|---|---|---|---|---|---|");
    for m in METRICS
        .iter()
        .filter(|m| m.lower_is_better && m.field != "client_core_busy")
    {
        let floor = get("floor", m);
        let best = best_peer(m);
        let (bn, bv) = best.map_or(("–".to_owned(), None), |(n, v)| {
            (format!("{} {n}", fmt(Some(v))), Some(v))
        });
        println!(
            "| {} | {} | {bn} | {} | {} | {} |",
            m.name,
            fmt(floor),
            ratio(floor, bv),
            ratio(get("sluice", m), floor),
            m.target
        );
    }

    println!("\nSluice / each peer (below 1.00 = Sluice better for CPU, latency, RSS; above 1.00 better for rates;");
    println!("`base` is Sluice built from another revision, when the run had one: SLUICE_BASE / BASE_REV):\n");
    println!(
        "| metric | sluice / envoy | sluice / haproxy | sluice / nginx | sluice / direct | sluice / floor | sluice / base |"
    );
    println!("|---|---|---|---|---|---|---|");
    for m in METRICS.iter().filter(|m| m.field != "client_core_busy") {
        let s = get("sluice", m);
        let cells: Vec<String> = ["envoy", "haproxy", "nginx", "direct", "floor", "base"]
            .iter()
            .map(|p| ratio(s, get(p, m)))
            .collect();
        println!("| {} | {} |", m.name, cells.join(" | "));
    }
    // What one plugin adds: `wasm` (the test guest judging each flow) and
    // `wasm-null` (a guest that returns at once: the host's share) against
    // `sluice`, in the same run.
    let plugged = ["wasm", "wasm-null"];
    if METRICS.iter().any(|m| plugged.iter().any(|p| get(p, m).is_some())) {
        let diff = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => fmt(Some(a - b)),
            _ => "–".into(),
        };
        println!(
            "\nOne connection-level plugin (`wasm`; `wasm-null`: a plugin whose callbacks return at once) against none (`sluice`), same run:\n"
        );
        println!("| metric | sluice | wasm-null | wasm | wasm-null − sluice | wasm − sluice | wasm / sluice |");
        println!("|---|---|---|---|---|---|---|");
        for m in METRICS.iter().filter(|m| m.field != "client_core_busy") {
            let (s, n, w) = (get("sluice", m), get("wasm-null", m), get("wasm", m));
            println!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                m.name,
                fmt(s),
                fmt(n),
                fmt(w),
                diff(n, s),
                diff(w, s),
                ratio(w, s)
            );
        }
    }
    if rounds > 1 {
        println!("\nSpread over rounds (min – max), to judge the noise:\n");
        println!("| metric | direct | floor | base | sluice | wasm | envoy | haproxy | nginx | wasm-null |");
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for m in METRICS.iter().filter(|m| m.field != "client_core_busy") {
            let cells: Vec<String> = LABELS
                .iter()
                .chain(&["wasm-null"])
                .map(|l| {
                    let key = ((*l).to_owned(), m.phase.to_owned(), m.field.to_owned());
                    let v: Vec<f64> = vals
                        .get(&key)
                        .map_or(Vec::new(), |v| v.iter().copied().filter(|x| x.is_finite()).collect());
                    let lo = v.iter().copied().reduce(f64::min);
                    let hi = v.iter().copied().reduce(f64::max);
                    if lo.is_none() {
                        "–".into()
                    } else {
                        format!("{} – {}", fmt(lo), fmt(hi))
                    }
                })
                .collect();
            println!("| {} | {} |", m.name, cells.join(" | "));
        }
    }
    if !syscalls.is_empty() {
        println!("\nSystem calls per connection (strace -c -f, every thread, round 1; a diagnostic):\n");
        println!("| syscall | floor | base | sluice | envoy | haproxy | nginx |");
        println!("|---|---|---|---|---|---|---|");
        let mut names: Vec<&String> = syscalls.keys().filter(|n| *n != "total").collect();
        let weight = |n: &String| syscalls[n].values().copied().fold(0.0, f64::max);
        let sluice = |n: &String| syscalls[n].get("sluice").copied().unwrap_or(0.0);
        names.sort_by(|a, b| sluice(b).total_cmp(&sluice(a)).then(weight(b).total_cmp(&weight(a))));
        for n in names.into_iter().chain(syscalls.keys().filter(|n| *n == "total")) {
            // Drop noise: calls seen less than once per 50 connections everywhere.
            if weight(n) < 0.02 {
                continue;
            }
            let cells: Vec<String> = ["floor", "base", "sluice", "envoy", "haproxy", "nginx"]
                .iter()
                .map(|l| syscalls[n].get(*l).map_or("–".into(), |v| format!("{v:.2}")))
                .collect();
            println!("| {n} | {} |", cells.join(" | "));
        }
    }
    println!("\nEach proxy / direct path, bulk throughput:\n");
    let bulk = METRICS.iter().find(|m| m.field == "gbit_s").unwrap();
    let direct = get("direct", bulk);
    for l in ["floor", "base", "sluice", "envoy", "haproxy", "nginx"] {
        println!("- {l}: {}", ratio(get(l, bulk), direct));
    }
    let quic = METRICS
        .iter()
        .find(|m| m.phase == "quic-bulk" && m.field == "gbit_s")
        .unwrap();
    if get("direct", quic).is_some() {
        println!(
            "\nQUIC through Sluice / direct, bulk throughput: {}",
            ratio(get("sluice", quic), get("direct", quic))
        );
    }
    if let Some(path) = svg {
        let groups: Vec<sluice_bench::chart::Group> = METRICS
            .iter()
            .filter(|m| CHARTED.contains(&m.name))
            .map(|m| sluice_bench::chart::Group {
                metric: m.name.to_owned(),
                lower_is_better: m.lower_is_better,
                ratios: ["nginx", "haproxy", "envoy", "floor"]
                    .iter()
                    .map(|p| {
                        let r = get("sluice", m).zip(get(p, m)).map(|(a, b)| a / b);
                        ((*p).to_owned(), r)
                    })
                    .collect(),
            })
            .collect();
        let run = file
            .parent()
            .and_then(|d| d.file_name())
            .map_or_else(String::new, |d| d.to_string_lossy().into_owned());
        let note = format!("bench/run.sh run {run}: medians of {rounds} round(s); below 1.0 is better for Sluice");
        write_chart(
            path,
            &sluice_bench::chart::ratio_chart("Sluice against each peer and the floor relay", &note, &groups),
        );
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    let out = match cli.cmd {
        Cmd::Probe {
            c,
            expect_deny,
            wait_secs,
        } => {
            let ok = probe(&c, expect_deny, wait_secs).await;
            std::process::exit(i32::from(!ok));
        }
        Cmd::Conn {
            c,
            m,
            count,
            concurrency,
            phase,
        } => conn(&c, &m, count, concurrency, &phase).await,
        Cmd::Http {
            target,
            host,
            m,
            count,
            concurrency,
            phase,
        } => http(target, &host, &m, count, concurrency, &phase).await,
        Cmd::Tls {
            target,
            sni,
            ca,
            m,
            count,
            concurrency,
            phase,
        } => {
            let name = ServerName::try_from(sni).unwrap();
            let kind = Kind::Tls(tls_connector(&ca), name);
            drive(target, kind, &m, count, concurrency, &phase).await
        }
        Cmd::Quic {
            target,
            sni,
            ca,
            m,
            count,
            concurrency,
            bytes,
            phase,
        } => quic(target, &sni, &ca, &m, count, concurrency, bytes, &phase).await,
        Cmd::Bulk { c, m, bytes, streams } => bulk(&c, &m, bytes, streams).await,
        Cmd::Idle {
            c,
            m,
            count,
            concurrency,
            settle_ms,
        } => idle(&c, &m, count, concurrency, settle_ms).await,
        Cmd::Ab {
            targets,
            hello,
            sni,
            pid,
            rounds,
            batch,
            concurrency,
            max_secs,
        } => {
            let ab = Ab {
                rounds,
                batch,
                concurrency,
                deadline: Instant::now() + Duration::from_secs(max_secs),
            };
            ab.run(&targets, &hello, &sni, pid).await
        }
        Cmd::Report { file, svg } => {
            report(&file, svg.as_ref());
            return;
        }
        Cmd::DnsChart { summary, svg, note } => {
            dns_chart(&summary, &svg, &note);
            return;
        }
    };
    println!("{out}");
}
