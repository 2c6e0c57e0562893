//! `sluice-xds`: the control server. Validates a directory of
//! configuration with the same code the gateways run and serves it to
//! them over ADS (State of the World and Delta).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Parser, Subcommand};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use sluice_xds::service::{Ads, Stats};
use sluice_xds::source::{Source, SourceState, watch_dir};

#[derive(Parser, Debug)]
#[command(
    name = "sluice-xds",
    version,
    about = "Sluice control server: serves configuration to gateways over xDS"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serves a configuration directory over ADS; edits to it apply by
    /// themselves (a change that does not validate is refused and the last
    /// good configuration kept).
    Serve(ServeArgs),
    /// Validates a configuration directory as `serve` would, and says what
    /// it serves.
    Check { dir: PathBuf },
    /// Validates single configuration files.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// The directory of `.yaml` files to serve; the embedded example when
    /// not given.
    #[arg(long)]
    config_dir: Option<PathBuf>,
    /// Where the gRPC (ADS) service listens; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:18000")]
    listen: SocketAddr,
    /// How often the directory is checked for changes.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    watch_interval: Duration,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => serve(ServeArgs {
            config_dir: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 18000)),
            watch_interval: Duration::from_secs(1),
        }),
        Some(Command::Serve(args)) => serve(args),
        Some(Command::Check { dir }) => check(dir),
        Some(Command::Validate { files }) => validate(&files),
    }
}

fn check(dir: PathBuf) -> ExitCode {
    match Source::Dir(dir.clone()).load() {
        Ok(loaded) => {
            let r = &loaded.resources;
            let n = |v: &Option<Vec<_>>| v.as_ref().map_or(0, Vec::len);
            println!(
                "{}: OK: {} webgroups, {} smartgroups, {} workloads, {} policy ({} rules)",
                dir.display(),
                r.webgroups.as_ref().map_or(0, Vec::len),
                r.smartgroups.as_ref().map_or(0, Vec::len),
                r.workloads.as_ref().map_or(0, Vec::len),
                n(&r.policies),
                loaded.config.policy.rules.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn validate(files: &[PathBuf]) -> ExitCode {
    let mut ok = true;
    for f in files {
        match sluice_api::config::load_file(f) {
            Ok(c) => println!("{}: OK ({} rules)", f.display(), c.policy.rules.len()),
            Err(e) => {
                eprintln!("{e}");
                ok = false;
            }
        }
    }
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

fn serve(args: ServeArgs) -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    let source = args.config_dir.clone().map_or(Source::Embedded, Source::Dir);
    let loaded = match source.load() {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "{e}\nsluice-xds: {} does not validate; nothing served",
                source.describe()
            );
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sluice-xds: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(args.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("sluice-xds: cannot listen on {}: {e}", args.listen);
                return ExitCode::FAILURE;
            }
        };
        let addr = listener.local_addr().unwrap_or(args.listen);
        let (tx, rx) = tokio::sync::watch::channel(loaded.catalog.clone());
        let state = Arc::new(Mutex::new(SourceState {
            loads: 1,
            ..SourceState::default()
        }));
        tokio::spawn(watch_dir(source.clone(), args.watch_interval, tx, state));
        let stats = Arc::new(Stats::default());
        eprintln!(
            "sluice-xds: serving {} ({} rules) over ADS on {addr}",
            source.describe(),
            loaded.config.policy.rules.len()
        );
        let shutdown = async {
            use tokio::signal::unix::{SignalKind, signal};
            match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
                (Ok(mut t), Ok(mut i)) => {
                    tokio::select! {
                        _ = t.recv() => {}
                        _ = i.recv() => {}
                    }
                }
                _ => std::future::pending().await,
            }
        };
        let served = tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(Ads::new(rx, stats)))
            .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), shutdown)
            .await;
        match served {
            Ok(()) => {
                eprintln!("sluice-xds: stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sluice-xds: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
