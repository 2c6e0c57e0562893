//! The `sluice` command line: `run`, `check`, `explain`.
//!
//! Everything here returns an exit code and writes to the given writers, so
//! tests drive it in-process; `main.rs` only wires stdout and stderr.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use sluice_api::config::{self, ConfigErrors};
use sluice_api::{Config, DomainName, Protocol, lint};

use crate::policy::{FlowQuery, Policy};
use crate::runtime::ReloadError;

#[derive(Debug, Parser)]
#[command(
    name = "sluice",
    version,
    about = "Egress and east-west proxy with policy on SNI, Host and DNS names",
    after_help = "With no command, `sluice` runs the embedded default configuration: an explicit proxy on \
                  127.0.0.1:3128, a DNS proxy on 127.0.0.1:5353 and the admin API on 127.0.0.1:9901, in watch \
                  mode (every decision recorded, nothing blocked). `sluice run -c FILE` runs your own."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy (with no -c: the embedded default configuration).
    Run(RunArgs),
    /// Validate a configuration file and summarise it.
    Check(CheckArgs),
    /// Show the verdict for one flow and the reasons for it.
    Explain(ExplainArgs),
    /// Ask a running Sluice whether it is ready (its admin API's `/ready`):
    /// exit 0 when it is. For health checks where there is no curl (a
    /// container image holding only this binary).
    Health(HealthArgs),
}

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// The admin API's address (`admin.address` of the configuration).
    #[arg(long, default_value = config::DEFAULT_ADMIN)]
    pub admin: String,
}

#[derive(Debug, Args, Default)]
pub struct RunArgs {
    /// Configuration file; without it, the embedded default.
    #[arg(short, long)]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Configuration file (as with `run` and `explain`).
    #[arg(short, long, value_name = "FILE", conflicts_with = "file")]
    pub config: Option<PathBuf>,
    /// Configuration file, given without `-c`.
    #[arg(value_name = "FILE", required_unless_present = "config")]
    pub file: Option<PathBuf>,
}

impl CheckArgs {
    /// The file to check, however it was given.
    pub fn path(&self) -> Option<&Path> {
        self.config.as_deref().or(self.file.as_deref())
    }
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// Configuration file; without it, the embedded default.
    #[arg(short, long)]
    pub config: Option<PathBuf>,
    /// Source address of the workload.
    #[arg(long)]
    pub src: IpAddr,
    /// TLS server name (implies --proto tls).
    #[arg(long, conflicts_with_all = ["host", "name"])]
    pub sni: Option<String>,
    /// HTTP Host (implies --proto http).
    #[arg(long, conflicts_with = "name")]
    pub host: Option<String>,
    /// Any destination name, e.g. a DNS query name with --proto dns.
    #[arg(long)]
    pub name: Option<String>,
    /// Destination address.
    #[arg(long)]
    pub dst: Option<IpAddr>,
    /// Destination port.
    #[arg(long, default_value_t = 443)]
    pub port: u16,
    /// tls, http, dns, tcp or udp.
    #[arg(long)]
    pub proto: Option<Protocol>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Loads `path`, or the embedded default.
pub fn load(path: Option<&Path>) -> Result<Config, ConfigErrors> {
    match path {
        Some(p) => config::load_file(p),
        None => config::embedded_default(),
    }
}

/// `sluice check FILE`.
pub fn check(file: &Path, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let cfg = match config::load_file(file) {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(err, "{e}");
            return 1;
        }
    };
    // Everything a start would do short of binding: plugins are loaded,
    // compiled and started (their canary), so a plugin that would refuse
    // to run is refused here.
    if let Err(e) = crate::listener::Snapshot::new(cfg.clone()) {
        let _ = writeln!(err, "{}: {e}", file.display());
        return 1;
    }
    let policy = Policy::compile(&cfg);
    let user_web = cfg.webgroups.iter().filter(|g| !g.builtin).count();
    let user_smart = cfg.smartgroups.iter().filter(|g| !g.builtin).count();
    let _ = writeln!(out, "{}: OK", file.display());
    let _ = writeln!(out, "  listeners:   {}", cfg.listeners.len());
    for l in &cfg.listeners {
        let _ = writeln!(out, "    {} ({}) on {}", l.name, l.ty().as_str(), l.address);
    }
    let _ = writeln!(
        out,
        "  webgroups:   {} ({} yours, {} built-in), {} patterns",
        cfg.webgroups.len(),
        user_web,
        cfg.webgroups.len() - user_web,
        policy.pattern_count()
    );
    let _ = writeln!(
        out,
        "  smartgroups: {} ({} yours, {} built-in), {} CIDRs and workload addresses",
        cfg.smartgroups.len(),
        user_smart,
        cfg.smartgroups.len() - user_smart,
        policy.cidr_count()
    );
    let _ = writeln!(out, "  inventory:   {} workloads", cfg.inventory.len());
    let _ = writeln!(
        out,
        "  policy:      {} rules, mode {}, default {}",
        cfg.policy.rules.len(),
        cfg.policy.mode.as_str(),
        cfg.policy.default
    );
    let _ = writeln!(out, "  plugins:     {} (each loaded and started)", cfg.plugins.len());
    for p in &cfg.plugins {
        let served = if p.listeners.is_empty() {
            "every listener".to_owned()
        } else {
            p.listeners.join(", ")
        };
        let _ = writeln!(out, "    {} ({}) on {served}", p.name, p.path.display());
    }
    let lifts = policy.guard_lifts();
    if lifts.is_empty() {
        let _ = writeln!(
            out,
            "  guard:       on for every flow (no allow rule names a guarded group)"
        );
    } else {
        let _ = writeln!(out, "  guard:       lifted only for the flows these rules decide:");
        for (rule, groups) in lifts {
            let _ = writeln!(out, "    rule `{rule}` lifts {}", groups.join(", "));
        }
    }
    let warnings = lint::lint(&cfg);
    let shown = file.display().to_string();
    if warnings.is_empty() {
        let _ = writeln!(out, "  no warnings");
    } else {
        let _ = writeln!(
            out,
            "  {} warning{}:",
            warnings.len(),
            if warnings.len() == 1 { "" } else { "s" }
        );
        for w in &warnings {
            let _ = writeln!(out, "{}", w.render(&shown));
        }
    }
    0
}

/// `sluice explain`.
pub fn explain(args: &ExplainArgs, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    let cfg = match load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(err, "{e}");
            return 1;
        }
    };
    let raw_name = args.sni.as_deref().or(args.host.as_deref()).or(args.name.as_deref());
    let name = match raw_name.map(|n| DomainName::parse(strip_port(n))) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(e)) => {
            let _ = writeln!(err, "invalid name `{}`: {e}", raw_name.unwrap_or_default());
            return 2;
        }
    };
    if name.is_none() && args.dst.is_none() {
        let _ = writeln!(
            err,
            "give a destination: --sni NAME, --host NAME, --name NAME or --dst IP"
        );
        return 2;
    }
    let protocol = args.proto.unwrap_or(if args.sni.is_some() {
        Protocol::Tls
    } else if args.host.is_some() {
        Protocol::Http
    } else {
        Protocol::Tcp
    });
    let policy = Policy::compile(&cfg);
    let q = FlowQuery {
        identity: None,
        src: args.src,
        name: name.as_ref(),
        dst: args.dst,
        protocol,
        port: args.port,
    };
    let x = policy.explain(&q);
    if args.json {
        match serde_json::to_string_pretty(&x) {
            Ok(s) => {
                let _ = writeln!(out, "{s}");
            }
            Err(e) => {
                let _ = writeln!(err, "cannot render JSON: {e}");
                return 1;
            }
        }
        return 0;
    }
    let _ = writeln!(
        out,
        "verdict: {} ({}) by {} - reason {}",
        x.action,
        x.enforcement,
        if x.decided_by == "default" || x.decided_by == "builtin-guard" {
            x.decided_by.clone()
        } else {
            format!("rule `{}`", x.decided_by)
        },
        x.reason
    );
    if x.enforcement == "watched" && x.action == "deny" {
        let _ = writeln!(
            out,
            "  (watch mode: this flow would be denied; it is let through and recorded)"
        );
    }
    let _ = writeln!(
        out,
        "source {}: smartgroups [{}]",
        args.src,
        x.source_smartgroups.join(", ")
    );
    if let Some(n) = &name {
        let _ = writeln!(
            out,
            "destination name {n}: webgroups [{}]",
            x.destination_webgroups.join(", ")
        );
    }
    if let Some(ip) = args.dst {
        let _ = writeln!(
            out,
            "destination address {ip}: smartgroups [{}]",
            x.destination_smartgroups.join(", ")
        );
    }
    let _ = writeln!(out, "protocol {protocol}, port {}", args.port);
    let _ = writeln!(out, "chain:");
    for (i, s) in x.steps.iter().enumerate() {
        let _ = writeln!(out, "  {}. {s}", i + 1);
    }
    0
}

/// `--host example.com:8080` names a port too; the policy wants the name.
fn strip_port(n: &str) -> &str {
    match n.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => n,
    }
}

/// `sluice run`: serves the configuration until SIGTERM or SIGINT; SIGHUP
/// reloads it from its file (a bad file is reported and the running
/// configuration kept).
/// `sluice health`: GET `/ready` from the admin API at `args.admin`.
/// Prints the answer; 0 when it is `200`, 1 otherwise (or unreachable).
pub fn health(args: &HealthArgs, out: &mut dyn Write, err: &mut dyn Write) -> i32 {
    use std::io::Read;
    let addr = args.admin.trim_start_matches("http://").trim_end_matches('/');
    let answer = (|| -> Result<(String, String), String> {
        let target = std::net::ToSocketAddrs::to_socket_addrs(addr)
            .map_err(|e| format!("{addr}: {e}"))?
            .next()
            .ok_or_else(|| format!("{addr}: no address"))?;
        let mut s = std::net::TcpStream::connect_timeout(&target, std::time::Duration::from_secs(3))
            .map_err(|e| format!("cannot reach the admin API at {addr}: {e}"))?;
        let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(5)));
        s.write_all(format!("GET /ready HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let mut text = String::new();
        s.read_to_string(&mut text).map_err(|e| e.to_string())?;
        let (head, body) = text.split_once("\r\n\r\n").ok_or("not an HTTP answer")?;
        Ok((head.lines().next().unwrap_or_default().to_owned(), body.to_owned()))
    })();
    match answer {
        Ok((status, body)) if status.split(' ').nth(1) == Some("200") => {
            let _ = write!(out, "{body}");
            0
        }
        Ok((status, body)) => {
            let _ = writeln!(err, "sluice: {status}: {}", body.trim_end());
            1
        }
        Err(e) => {
            let _ = writeln!(err, "sluice: {e}");
            1
        }
    }
}

pub fn run(args: &RunArgs, err: &mut dyn Write) -> i32 {
    let cfg = match load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(err, "{e}");
            return 1;
        }
    };
    if cfg.listeners.is_empty() {
        let _ = writeln!(
            err,
            "sluice: {} defines no listeners, so there is nothing to run; add one under `listeners:` \
             (see docs/configuration.md)",
            cfg.source
        );
        return 1;
    }
    let log = crate::telemetry::logging::init();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(w) = cfg.bootstrap.workers {
        builder.worker_threads(w);
    }
    let rt = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(err, "sluice: cannot start the runtime: {e}");
            return 1;
        }
    };
    rt.block_on(serve(cfg, args.config.clone(), log, err))
}

async fn serve(
    cfg: Config,
    path: Option<std::path::PathBuf>,
    log: Option<crate::telemetry::logging::LogControl>,
    err: &mut dyn Write,
) -> i32 {
    use tokio::signal::unix::{SignalKind, signal};
    // Handlers first: a signal that arrives while listeners are still being
    // bound must be handled (drain, flush), not kill the process.
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        let _ = writeln!(err, "sluice: cannot install signal handlers");
        return 1;
    };
    let source = cfg.source.clone();
    let mode = cfg.policy.mode;
    let xds = cfg.bootstrap.xds.clone();
    let server = match crate::runtime::Server::start(cfg, log).await {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(err, "sluice: {e}");
            return 1;
        }
    };
    for (name, (kind, addr)) in &server.listeners {
        let _ = writeln!(err, "sluice: listening: {name} ({}) on {addr}", kind.as_str());
    }
    for w in &server.warnings {
        let _ = writeln!(err, "sluice: warning: {w}");
    }
    let _ = writeln!(err, "sluice: admin API on http://{}", server.admin);
    let _ = writeln!(err, "sluice: running {source} in {} mode", mode.as_str());
    if let Some(x) = xds {
        let servers: Vec<String> = x.servers.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            err,
            "sluice: taking resources from xDS server {} as node `{}` ({})",
            servers.join(", "),
            x.node.id,
            if x.delta { "delta" } else { "state of the world" }
        );
        let _status = server.start_xds(x);
    }
    if let Some(p) = &path {
        // Edits to the file apply by themselves, like SIGHUP.
        server.watch_file(p.clone(), std::time::Duration::from_secs(1));
    }
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                // Log rotation: the file was renamed; start a new one.
                if let Err(e) = server.shared.audit.reopen().await {
                    let _ = writeln!(err, "sluice: cannot reopen the audit log: {e}");
                }
                match server.reload_file().await {
                    Ok(report) => {
                        let _ = writeln!(err, "sluice: {report}");
                        for (name, addr) in &report.listeners {
                            if report.added.contains(name) || report.rebound.contains(name) {
                                let _ = writeln!(err, "sluice: listening: {name} on {addr}");
                            }
                        }
                    }
                    Err(ReloadError::NoFile) => {
                        let _ = writeln!(err, "sluice: SIGHUP: running the embedded default, nothing to reload");
                    }
                    Err(e) => {
                        let _ = writeln!(err, "{e}\nsluice: reload rejected; the running configuration is unchanged");
                    }
                }
            }
        }
    }
    // The drain time of the configuration in force now, not the one the
    // process started with.
    let drain = server.shared.snapshot.load().config.bootstrap.drain_timeout;
    let _ = writeln!(
        err,
        "sluice: shutting down: draining for up to {}",
        humantime::format_duration(drain)
    );
    server.shutdown(drain).await;
    let _ = writeln!(err, "sluice: stopped");
    0
}
