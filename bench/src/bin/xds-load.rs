//! `xds-load`: how fast one policy change reaches many gateways.
//!
//! Starts `sluice-xds` on a copy of a configuration directory, opens
//! `--streams` ADS streams to it, each on its own connection, as a gateway
//! would (half Delta, half State of the World unless told otherwise, each
//! subscribed to Sluice's four types by wildcard and ACKing every response
//! at once), then edits the policy file `--changes` times. For each change
//! it measures, per stream, the time from the edit to the arrival of the
//! policy that carries it (the ACK is sent at once), and reports the p50,
//! p99 and maximum over streams, the server's CPU time per change, and its
//! resident memory per stream.
//!
//! The server watches its directory every `--watch-interval` (20 ms here),
//! so up to that much of each figure is the poll, not the push.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use prost::Message;
use sluice_api::proto::{type_url, v1 as pb};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

#[derive(Parser, Debug)]
struct Args {
    /// The `sluice-xds` binary.
    #[arg(long, default_value = "target/release/sluice-xds")]
    xds_bin: PathBuf,
    /// The directory to serve (copied; its `policy.yaml` is edited).
    #[arg(long, default_value = "examples/xds/config")]
    config_dir: PathBuf,
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// One stream in this many uses State of the World; the rest Delta.
    #[arg(long, default_value_t = 2)]
    sotw_every: usize,
    #[arg(long, default_value_t = 10)]
    changes: usize,
    #[arg(long, default_value = "20ms")]
    watch_interval: String,
}

struct Server {
    child: Child,
    ads: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(args: &Args, dir: &Path) -> Result<Server, String> {
    let mut child = Command::new(&args.xds_bin)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--watch-interval",
        ])
        .arg(&args.watch_interval)
        .arg("--config-dir")
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", args.xds_bin.display()))?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let ads = loop {
        let line = lines
            .next()
            .ok_or("sluice-xds exited before listening")?
            .map_err(|e| e.to_string())?;
        if line.contains("over ADS") {
            let addr = line.rsplit(" on ").next().unwrap_or_default().trim();
            break addr.parse().map_err(|e| format!("{addr}: {e}"))?;
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Ok(Server { child, ads })
}

/// The server's CPU time (user + system) and resident memory.
fn usage(pid: u32) -> (Duration, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the line; after the `)` they
    // are the 12th and 13th. Clock ticks are 100 a second on Linux.
    let cpu = Duration::from_millis((ticks(11) + ticks(12)) * 10);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (cpu, rss_kib)
}

/// The marker rule of change `n`: the policy a stream last received
/// carries it once the change reached it.
fn marker(n: usize) -> String {
    format!("bench-change-{n}")
}

fn policy_marker(body: &[u8]) -> Option<usize> {
    let p = pb::Policy::decode(body).ok()?;
    p.rules
        .iter()
        .find_map(|r| r.name.strip_prefix("bench-change-")?.parse().ok())
}

/// Per change, when each stream got it.
type Arrivals = Arc<Mutex<Vec<Vec<Option<Instant>>>>>;

async fn stream(
    ads: SocketAddr,
    i: usize,
    delta: bool,
    arrivals: Arrivals,
    ready: Arc<AtomicUsize>,
) -> Result<(), String> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{ads}"))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let mut grpc = AggregatedDiscoveryServiceClient::new(channel);
    let node = Node {
        id: format!("load-{i}"),
        cluster: "bench".into(),
        ..Default::default()
    };
    let mut first = true;
    let mut seen = |m: Option<usize>| {
        let now = Instant::now();
        if first {
            first = false;
            ready.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(n) = m {
            let mut a = arrivals.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(slot) = a.get_mut(n).and_then(|v| v.get_mut(i)) {
                slot.get_or_insert(now);
            }
        }
    };
    if delta {
        let (tx, rx) = mpsc::channel(8);
        for (k, url) in type_url::ALL.iter().enumerate() {
            let _ = tx
                .send(DeltaDiscoveryRequest {
                    node: (k == 0).then(|| node.clone()),
                    type_url: (*url).to_owned(),
                    resource_names_subscribe: vec!["*".into()],
                    ..Default::default()
                })
                .await;
        }
        let mut rx = grpc
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        while let Some(r) = rx.message().await.map_err(|e| e.to_string())? {
            let m = (r.type_url == type_url::POLICY)
                .then(|| {
                    r.resources
                        .first()?
                        .resource
                        .as_ref()
                        .and_then(|a| policy_marker(&a.value))
                })
                .flatten();
            let _ = tx
                .send(DeltaDiscoveryRequest {
                    type_url: r.type_url.clone(),
                    response_nonce: r.nonce.clone(),
                    ..Default::default()
                })
                .await;
            if r.type_url == type_url::POLICY {
                seen(m);
            }
        }
    } else {
        let (tx, rx) = mpsc::channel(8);
        for (k, url) in type_url::ALL.iter().enumerate() {
            let _ = tx
                .send(DiscoveryRequest {
                    node: (k == 0).then(|| node.clone()),
                    type_url: (*url).to_owned(),
                    ..Default::default()
                })
                .await;
        }
        let mut rx = grpc
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        while let Some(r) = rx.message().await.map_err(|e| e.to_string())? {
            let m = (r.type_url == type_url::POLICY)
                .then(|| r.resources.first().and_then(|a| policy_marker(&a.value)))
                .flatten();
            let _ = tx
                .send(DiscoveryRequest {
                    type_url: r.type_url.clone(),
                    version_info: r.version_info.clone(),
                    response_nonce: r.nonce.clone(),
                    ..Default::default()
                })
                .await;
            if r.type_url == type_url::POLICY {
                seen(m);
            }
        }
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> Result<(), String> {
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!("xds-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    for f in std::fs::read_dir(&args.config_dir).map_err(|e| e.to_string())? {
        let f = f.map_err(|e| e.to_string())?.path();
        if let Some(name) = f.file_name() {
            std::fs::copy(&f, dir.join(name)).map_err(|e| e.to_string())?;
        }
    }
    let policy_file = dir.join("policy.yaml");
    let base_policy = std::fs::read_to_string(&policy_file).map_err(|e| e.to_string())?;
    let server = start(&args, &dir)?;
    let pid = server.child.id();
    let (_, rss_before) = usage(pid);

    let arrivals: Arrivals = Arc::new(Mutex::new(vec![vec![None; args.streams]; args.changes + 1]));
    let ready = Arc::new(AtomicUsize::new(0));
    // Set before the server is stopped: the streams' errors after that
    // are the end of the run, not worth a line each.
    let finished = Arc::new(AtomicBool::new(false));
    let opened = Instant::now();
    for i in 0..args.streams {
        let delta = args.sotw_every == 0 || i % args.sotw_every != 0;
        let (a, r) = (arrivals.clone(), ready.clone());
        let ads = server.ads;
        let done = finished.clone();
        tokio::spawn(async move {
            if let Err(e) = stream(ads, i, delta, a, r).await
                && !done.load(Ordering::Relaxed)
            {
                eprintln!("stream {i}: {e}");
            }
        });
        if i % 50 == 49 {
            tokio::task::yield_now().await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while ready.load(Ordering::Relaxed) < args.streams {
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {} streams got their first policy",
                ready.load(Ordering::Relaxed),
                args.streams
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let connect_time = opened.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (cpu_idle, rss_after) = usage(pid);
    println!(
        "{} streams ({} State of the World, {} Delta) connected and served in {:.0} ms",
        args.streams,
        (0..args.streams)
            .filter(|i| args.sotw_every != 0 && i % args.sotw_every == 0)
            .count(),
        (0..args.streams)
            .filter(|i| args.sotw_every == 0 || i % args.sotw_every != 0)
            .count(),
        ms(connect_time)
    );
    println!(
        "server RSS: {} KiB before, {} KiB with the streams: {:.1} KiB per stream",
        rss_before,
        rss_after,
        (rss_after.saturating_sub(rss_before)) as f64 / args.streams as f64
    );

    let mut p50s = Vec::new();
    let mut p99s = Vec::new();
    let mut cpus = Vec::new();
    let mut cpu_before = cpu_idle;
    for n in 1..=args.changes {
        let changed = base_policy.replace(
            "  rules:\n",
            &format!(
                "  rules:\n    - {{name: {}, to: {{webgroups: [corp-apis]}}, ports: [{}], action: deny}}\n",
                marker(n),
                1000 + n
            ),
        );
        let t0 = Instant::now();
        std::fs::write(&policy_file, changed).map_err(|e| e.to_string())?;
        let deadline = t0 + Duration::from_secs(30);
        let lat = loop {
            let all: Option<Vec<Duration>> = {
                let a = arrivals.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                a[n].iter()
                    .map(|t| t.map(|t| t.saturating_duration_since(t0)))
                    .collect()
            };
            if let Some(l) = all {
                break l;
            }
            if Instant::now() > deadline {
                return Err(format!("change {n} did not reach every stream within 30 s"));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        // Let the ACKs be processed before reading the CPU time.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (cpu, _) = usage(pid);
        let mut sorted = lat;
        sorted.sort();
        let (p50, p99, max) = (
            percentile(&sorted, 0.5),
            percentile(&sorted, 0.99),
            *sorted.last().unwrap_or(&Duration::ZERO),
        );
        let used = cpu.saturating_sub(cpu_before);
        cpu_before = cpu;
        println!(
            "change {n:2}: p50 {:7.1} ms  p99 {:7.1} ms  max {:7.1} ms  server CPU {:6.0} ms ({:.1} µs per stream)",
            ms(p50),
            ms(p99),
            ms(max),
            ms(used),
            used.as_secs_f64() * 1e6 / args.streams as f64
        );
        p50s.push(p50);
        p99s.push(p99);
        cpus.push(used);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    p50s.sort();
    p99s.sort();
    cpus.sort();
    println!(
        "median over {} changes: p50 {:.1} ms, p99 {:.1} ms, server CPU {:.0} ms per change; worst p99 {:.1} ms",
        args.changes,
        ms(percentile(&p50s, 0.5)),
        ms(percentile(&p99s, 0.5)),
        ms(percentile(&cpus, 0.5)),
        ms(*p99s.last().unwrap_or(&Duration::ZERO))
    );
    finished.store(true, Ordering::Relaxed);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
