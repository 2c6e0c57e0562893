//! Relay throughput and CPU per GB: `splice(2)` vs the copy loop.
//!
//! Each iteration relays `MIB` MiB over loopback: a client thread writes into
//! the proxy's front socket, the proxy (one current-thread tokio runtime on
//! its own thread, like a pinned single-worker proxy) relays to an origin
//! thread that reads and discards. Wall time per iteration gives criterion's
//! throughput; `getrusage(RUSAGE_THREAD)` around each relay on the proxy
//! thread gives the proxy's own CPU, summed into "CPU seconds per GB"
//! printed at the end. Run with e.g.
//! `cargo bench -p sluice --bench splice -- --measurement-time 5`.

// A benchmark harness: failing loudly on a broken setup is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use sluice::forward::relay::{RelayMode, RelayOptions, relay};

const MIB: usize = 64;
const CHUNK: usize = 256 * 1024;

/// One relay configuration under test.
#[derive(Clone, Copy)]
struct Variant {
    name: &'static str,
    mode: RelayMode,
    pipe_size: usize,
    copy_buffer: usize,
}

const VARIANTS: &[Variant] = &[
    Variant {
        name: "splice-pipe256k",
        mode: RelayMode::Splice,
        pipe_size: 256 * 1024,
        copy_buffer: 0,
    },
    Variant {
        name: "splice-pipe64k",
        mode: RelayMode::Splice,
        pipe_size: 64 * 1024,
        copy_buffer: 0,
    },
    Variant {
        name: "copy-buf64k",
        mode: RelayMode::Copy,
        pipe_size: 0,
        copy_buffer: 64 * 1024,
    },
];

/// A proxy thread relaying every accepted connection with `variant`,
/// reporting the proxy thread's CPU time per relayed flow.
struct Proxy {
    front: SocketAddr,
    cpu: mpsc::Receiver<Duration>,
}

fn start_proxy(variant: Variant, origin: SocketAddr) -> Proxy {
    let (addr_tx, addr_rx) = mpsc::channel();
    let (cpu_tx, cpu_rx) = mpsc::channel();
    thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            let mut opts = RelayOptions::default();
            opts.mode = variant.mode;
            opts.pipe_size = variant.pipe_size;
            opts.copy_buffer = variant.copy_buffer;
            opts.idle_timeout = None;
            loop {
                let (client, _) = listener.accept().await.unwrap();
                let before = sluice::sys::thread_cpu_time().unwrap();
                let upstream = tokio::net::TcpStream::connect(origin).await.unwrap();
                upstream.set_nodelay(true).unwrap();
                let stats = relay(client, upstream, &opts).await;
                assert_eq!(stats.bytes_up, (MIB * 1024 * 1024) as u64);
                let after = sluice::sys::thread_cpu_time().unwrap();
                if cpu_tx.send(after - before).is_err() {
                    return;
                }
            }
        });
    });
    Proxy {
        front: addr_rx.recv().unwrap(),
        cpu: cpu_rx,
    }
}

/// An origin that reads each connection to EOF and reports when done.
fn start_origin() -> (SocketAddr, mpsc::Receiver<usize>) {
    let listener = StdListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (done_tx, done_rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        for conn in listener.incoming() {
            let mut conn = conn.unwrap();
            let mut total = 0;
            loop {
                match conn.read(&mut buf).unwrap() {
                    0 => break,
                    n => total += n,
                }
            }
            if done_tx.send(total).is_err() {
                return;
            }
        }
    });
    (addr, done_rx)
}

fn one_transfer(front: SocketAddr, done: &mpsc::Receiver<usize>, data: &[u8]) -> Duration {
    let start = Instant::now();
    let mut client = StdStream::connect(front).unwrap();
    for _ in 0..MIB * 1024 * 1024 / data.len() {
        client.write_all(data).unwrap();
    }
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let got = done.recv().unwrap();
    let elapsed = start.elapsed();
    assert_eq!(got, MIB * 1024 * 1024);
    elapsed
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .configure_from_args();
    let data = vec![0x5a_u8; CHUNK];
    let mut summary = Vec::new();
    {
        let mut group = c.benchmark_group("relay");
        group.throughput(Throughput::Bytes((MIB * 1024 * 1024) as u64));
        for variant in VARIANTS {
            let (origin, done) = start_origin();
            let proxy = start_proxy(*variant, origin);
            let mut cpu = Duration::ZERO;
            let mut wall = Duration::ZERO;
            let mut flows = 0u64;
            group.bench_function(BenchmarkId::from_parameter(variant.name), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let t = one_transfer(proxy.front, &done, &data);
                        total += t;
                        wall += t;
                        cpu += proxy.cpu.recv().unwrap();
                        flows += 1;
                    }
                    total
                });
            });
            let gb = (flows * (MIB as u64) * 1024 * 1024) as f64 / 1e9;
            summary.push((
                variant.name,
                gb / wall.as_secs_f64(),
                cpu.as_secs_f64() / gb,
                flows,
            ));
        }
        group.finish();
    }
    c.final_summary();
    println!("\nrelay summary ({MIB} MiB per flow, loopback, proxy = one current-thread runtime):");
    println!(
        "{:<18} {:>12} {:>22} {:>7}",
        "variant", "GB/s (wall)", "proxy CPU s per GB", "flows"
    );
    for (name, gbps, cpu_per_gb, flows) in summary {
        println!("{name:<18} {gbps:>12.2} {cpu_per_gb:>22.3} {flows:>7}");
    }
}
