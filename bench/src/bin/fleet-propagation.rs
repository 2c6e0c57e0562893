//! `fleet-propagation`: how long a policy change takes from `sluice-xds
//! apply` to every gateway's verdicts, with one control-plane replica and
//! with several sharing one etcd.
//!
//! For each replica count it starts a fresh etcd on loopback (a temporary
//! data directory; `--etcd`, Debian's by default), imports a small
//! configuration, starts the replicas (`sluice-xds serve --store`) and
//! `--gateways` real gateways (`sluice run`), spread over the replicas
//! (gateway i prefers replica i mod R and lists the others after it). Each
//! change rewrites a WebGroup so that a new name is allowed; the clock
//! starts when `sluice-xds apply` is started and stops, per gateway, when
//! that gateway logs `xDS: applied` and its `/explain` says the new name
//! is allowed (checked, not assumed). Reported per replica count: the
//! apply command's own time, and the time until the last gateway (and the
//! median gateway) enforces the change: p50, p90 and max over changes.
//!
//! Everything runs on loopback; every process is started here and stopped
//! by its PID.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Parser, Debug)]
struct Args {
    /// Where the built `sluice` and `sluice-xds` are.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// The etcd binary.
    #[arg(long, default_value = "/usr/bin/etcd")]
    etcd: PathBuf,
    /// Gateways (processes) in the fleet.
    #[arg(long, default_value_t = 12)]
    gateways: usize,
    /// Replica counts to measure, in turn.
    #[arg(long, value_delimiter = ',', default_value = "1,3")]
    replicas: Vec<usize>,
    /// Changes per replica count.
    #[arg(long, default_value_t = 15)]
    changes: usize,
}

const WAIT: Duration = Duration::from_secs(30);

fn free_port() -> Result<u16, String> {
    Ok(TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| e.to_string())?
        .port())
}

fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    Some((head.split(' ').nth(1)?.parse().ok()?, body.to_owned()))
}

/// Where log lines of interest go: (gateway, when seen).
type Events = mpsc::Sender<(usize, Instant)>;

/// A child process, killed by PID when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `cmd` and reads its stderr until each of `wanted` has been seen
/// (the rest of each such line is returned); later lines containing
/// `event` are sent, timestamped, to `events` with `id`.
fn start(
    mut cmd: Command,
    wanted: &[&str],
    event: Option<(&'static str, usize, Events)>,
) -> Result<(Proc, Vec<String>), String> {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let proc = Proc(child);
    let mut lines = BufReader::new(stderr).lines();
    let mut found = vec![None; wanted.len()];
    while found.iter().any(Option::is_none) {
        let Some(Ok(line)) = lines.next() else {
            return Err(format!("{cmd:?} exited before saying {wanted:?}"));
        };
        for (i, w) in wanted.iter().enumerate() {
            if let Some(rest) = line.split(w).nth(1) {
                found[i] = Some(rest.trim().to_owned());
            }
        }
    }
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if let Some((needle, id, tx)) = &event
                && line.contains(needle)
            {
                let _ = tx.send((*id, Instant::now()));
            }
        }
    });
    Ok((proc, found.into_iter().flatten().collect()))
}

struct Etcd {
    _proc: Proc,
    _dir: TempDir,
    url: String,
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Result<Self, String> {
        let p = std::env::temp_dir().join(format!("fleet-propagation-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).map_err(|e| e.to_string())?;
        Ok(Self(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn etcd(bin: &Path, tag: &str) -> Result<Etcd, String> {
    let dir = TempDir::new(&format!("etcd-{tag}"))?;
    let client = format!("http://127.0.0.1:{}", free_port()?);
    let peer = format!("http://127.0.0.1:{}", free_port()?);
    let mut cmd = Command::new(bin);
    cmd.args(["--name", "b0", "--data-dir"])
        .arg(dir.0.join("data"))
        .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
        .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
        .args([
            "--initial-cluster",
            &format!("b0={peer}"),
            "--initial-cluster-state",
            "new",
        ])
        .args(["--logger=zap", "--log-level=warn"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let proc = Proc(cmd.spawn().map_err(|e| format!("{}: {e}", bin.display()))?);
    let addr: SocketAddr = client
        .trim_start_matches("http://")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let deadline = Instant::now() + WAIT;
    while get(addr, "/health").is_none_or(|(c, _)| c != 200) {
        if Instant::now() > deadline {
            return Err("etcd never answered /health".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Etcd {
        _proc: proc,
        _dir: dir,
        url: format!("etcd://{}/bench", addr),
    })
}

fn write_groups(dir: &Path, name: &str) -> Result<(), String> {
    std::fs::write(
        dir.join("groups.yaml"),
        format!(
            "webgroups:\n  - name: sites\n    domains: [{name}]\nsmartgroups:\n  - name: agents\n    cidrs: [10.20.0.0/16]\n"
        ),
    )
    .map_err(|e| e.to_string())
}

fn xds(bin: &Path, args: &[&str]) -> Result<(), String> {
    let out = Command::new(bin).args(args).output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("sluice-xds {args:?}: {}", String::from_utf8_lossy(&out.stderr)))
    }
}

fn allowed(admin: SocketAddr, name: &str) -> bool {
    get(admin, &format!("/explain?src=10.20.0.7&sni={name}"))
        .is_some_and(|(c, b)| c == 200 && b.contains("\"action\": \"allow\""))
}

/// What one replica count gave, per change.
struct Run {
    replicas: usize,
    apply: Vec<Duration>,
    last: Vec<Duration>,
    median: Vec<Duration>,
}

fn run(args: &Args, replicas: usize) -> Result<Run, String> {
    let xds_bin = args.bin_dir.join("sluice-xds");
    let gw_bin = args.bin_dir.join("sluice");
    let etcd = etcd(&args.etcd, &replicas.to_string())?;
    let config = TempDir::new(&format!("config-{replicas}"))?;
    write_groups(&config.0, "v0.test")?;
    std::fs::write(
        config.0.join("policy.yaml"),
        "policy:\n  mode: enforce\n  default: deny\n  rules:\n    - name: sites\n      from: [agents]\n      to: {webgroups: [sites]}\n      protocols: [tls]\n      action: allow\n",
    )
    .map_err(|e| e.to_string())?;
    let config_dir = config.0.to_string_lossy().into_owned();
    xds(&xds_bin, &["import", "--store", &etcd.url, &config_dir])?;

    let mut servers = Vec::new();
    let mut procs = Vec::new();
    for _ in 0..replicas {
        let mut cmd = Command::new(&xds_bin);
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--store",
            &etcd.url,
        ]);
        let (p, found) = start(cmd, &[" over ADS on "], None)?;
        procs.push(p);
        servers.push(found.first().cloned().unwrap_or_default());
    }
    let (tx, rx) = mpsc::channel();
    let gw_dir = TempDir::new(&format!("gateways-{replicas}"))?;
    let mut admins = Vec::new();
    for i in 0..args.gateways {
        let order: Vec<String> = (0..replicas)
            .map(|k| format!("\"{}\"", servers[(i + k) % replicas]))
            .collect();
        let file = gw_dir.0.join(format!("gw-{i}.yaml"));
        std::fs::write(
            &file,
            format!(
                "admin: {{address: \"127.0.0.1:0\"}}\naudit: {{destination: \"{}\"}}\nlisteners:\n  - {{name: proxy, kind: http-proxy, address: \"127.0.0.1:0\"}}\nresolver:\n  nameservers: [\"127.0.0.1:9\"]\nxds:\n  servers: [{}]\n  node: {{id: gw-{i}, cluster: bench}}\n  protocol: {}\npolicy:\n  default: deny\n",
                gw_dir.0.join(format!("audit-{i}.jsonl")).display(),
                order.join(", "),
                if i % 2 == 0 { "delta" } else { "sotw" }
            ),
        )
        .map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&gw_bin);
        cmd.arg("run").arg("-c").arg(&file);
        let (p, found) = start(
            cmd,
            &["sluice: admin API on http://"],
            Some(("xDS: applied", i, tx.clone())),
        )?;
        procs.push(p);
        admins.push(
            found
                .first()
                .and_then(|a| a.parse::<SocketAddr>().ok())
                .ok_or("no admin address")?,
        );
    }
    let deadline = Instant::now() + WAIT;
    while !admins.iter().all(|a| allowed(*a, "v0.test")) {
        if Instant::now() > deadline {
            return Err("the gateways never took the first policy".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    while rx.try_recv().is_ok() {}

    let mut out = Run {
        replicas,
        apply: Vec::new(),
        last: Vec::new(),
        median: Vec::new(),
    };
    for c in 1..=args.changes {
        let name = format!("v{c}.test");
        write_groups(&config.0, &name)?;
        let file = config.0.join("groups.yaml").to_string_lossy().into_owned();
        let t0 = Instant::now();
        xds(&xds_bin, &["apply", "--store", &etcd.url, "-f", &file])?;
        out.apply.push(t0.elapsed());
        let mut at: Vec<Option<Duration>> = vec![None; admins.len()];
        let deadline = t0 + WAIT;
        while at.iter().any(Option::is_none) {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok((g, when)) => {
                    if at[g].is_none() && allowed(admins[g], &name) {
                        at[g] = Some(when.saturating_duration_since(t0));
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // A log line missed: the verdict itself, later.
                    for (g, a) in admins.iter().enumerate() {
                        if at[g].is_none() && allowed(*a, &name) {
                            at[g] = Some(t0.elapsed());
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err("gateway logs closed".into()),
            }
            if Instant::now() > deadline {
                return Err(format!("change {c} did not reach every gateway in {WAIT:?}"));
            }
        }
        let mut times: Vec<Duration> = at.into_iter().flatten().collect();
        times.sort();
        out.last.push(times.last().copied().unwrap_or_default());
        out.median.push(times.get(times.len() / 2).copied().unwrap_or_default());
        // Let the fleet settle (ACKs) before the next change.
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(procs);
    Ok(out)
}

fn pct(v: &[Duration], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort();
    let i = ((s.len() as f64 - 1.0) * p).round() as usize;
    s.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

fn main() -> Result<(), String> {
    let args = Args::parse();
    for bin in ["sluice", "sluice-xds"] {
        if !args.bin_dir.join(bin).exists() {
            return Err(format!(
                "{} not found: cargo build --release -p sluice -p sluice-xds",
                args.bin_dir.join(bin).display()
            ));
        }
    }
    println!(
        "fleet-propagation: {} gateways, {} changes per run, etcd {}",
        args.gateways,
        args.changes,
        args.etcd.display()
    );
    println!(
        "| replicas | apply p50 (ms) | last gateway p50 | p90 | max | median gateway p50 |\n|---|---|---|---|---|---|"
    );
    for &r in &args.replicas {
        let run = run(&args, r.max(1))?;
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            run.replicas,
            pct(&run.apply, 0.5),
            pct(&run.last, 0.5),
            pct(&run.last, 0.9),
            pct(&run.last, 1.0),
            pct(&run.median, 0.5)
        );
    }
    Ok(())
}
