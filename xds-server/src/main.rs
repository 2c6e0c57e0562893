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
use sluice_xds::store::etcd::{Store, StoreError, StoreTls, StoreUrl};
use sluice_xds::store::files::FileSet;
use sluice_xds::store::{self, Written};

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
    /// What serving DIR would change against a running server (its admin
    /// API at --against): per policy the resources added, changed and
    /// removed; per connected node the policy it would get.
    Diff {
        dir: PathBuf,
        /// The running server's admin API.
        #[arg(long, default_value = "http://127.0.0.1:9903")]
        against: String,
    },
    /// Validates single configuration files.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Adds or replaces files in a store: the configuration that results is
    /// validated whole and written in one transaction, or nothing is.
    Apply {
        #[command(flatten)]
        store: StoreArgs,
        /// A `.yaml` file, an `envoy/` resource file, or a directory of them
        /// (with the modules of the plugins they declare).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// Removes files from a store, if what remains validates.
    Delete {
        #[command(flatten)]
        store: StoreArgs,
        /// Names as `get` lists them (`policy.yaml`, `envoy/listener.yaml`).
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Lists a store's files and its revision; with NAME, prints that file;
    /// with --to, writes every file into a directory (which `serve
    /// --config-dir` can serve).
    Get {
        #[command(flatten)]
        conn: StoreConn,
        name: Option<String>,
        #[arg(long, conflicts_with = "name")]
        to: Option<PathBuf>,
    },
    /// Replaces a store's configuration with a directory's (which must
    /// validate): how a directory moves into etcd.
    Import {
        #[command(flatten)]
        store: StoreArgs,
        dir: PathBuf,
    },
    /// Asks a running server's admin API whether it is ready (`/ready`):
    /// exit 0 when it is. For health checks in images without curl.
    Health {
        /// The admin API's address.
        #[arg(long, default_value = "127.0.0.1:9903")]
        admin: String,
    },
}

#[derive(clap::Args, Debug)]
struct StoreArgs {
    #[command(flatten)]
    conn: StoreConn,
    /// The store's revision this change is based on (as `get` printed it):
    /// refused if anything changed since. By default, the revision read
    /// just before writing.
    #[arg(long)]
    base_revision: Option<i64>,
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// The directory of `.yaml` files to serve; the embedded example when
    /// neither this nor --store is given.
    #[arg(long, conflicts_with = "store")]
    config_dir: Option<PathBuf>,
    /// Serves the configuration kept in etcd under a prefix
    /// (etcd://HOST:PORT[,HOST:PORT…]/PREFIX), shared with other replicas;
    /// changes to it apply by themselves.
    #[arg(long)]
    store: Option<String>,
    #[command(flatten)]
    store_tls: StoreTlsArgs,
    /// Where the gRPC (ADS) service listens; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:18000")]
    listen: SocketAddr,
    /// Where the admin API listens (`/ready`, `/nodes`, `/config`,
    /// `/metrics`); port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:9903")]
    admin: SocketAddr,
    /// The server's certificate (PEM) for TLS; with `--tls-key`.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The server's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA certificates (PEM) client certificates must chain to: mutual
    /// TLS, and a node's id must be a DNS name of its certificate.
    #[arg(long, requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// Plugins' code is fetched by gateways from this base URL (this
    /// server's admin API as they reach it, e.g. `http://xds.internal:9903`)
    /// and checked against its SHA-256, instead of sent inline.
    #[arg(long)]
    code_url: Option<String>,
    /// How often the directory is checked for changes.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    watch_interval: Duration,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => serve(ServeArgs {
            config_dir: None,
            store: None,
            store_tls: StoreTlsArgs::default(),
            listen: SocketAddr::from(([127, 0, 0, 1], 18000)),
            admin: SocketAddr::from(([127, 0, 0, 1], 9903)),
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            code_url: None,
            watch_interval: Duration::from_secs(1),
        }),
        Some(Command::Serve(args)) => serve(args),
        Some(Command::Check { dir }) => check(dir),
        Some(Command::Diff { dir, against }) => diff(dir, &against),
        Some(Command::Validate { files }) => validate(&files),
        Some(Command::Apply { store, files }) => write(&store, Change::Apply, &files),
        Some(Command::Import { store, dir }) => write(&store, Change::Import, &[dir]),
        Some(Command::Delete { store, names }) => delete(&store, names),
        Some(Command::Get { conn, name, to }) => get(&conn, name.as_deref(), to.as_deref()),
        Some(Command::Health { admin }) => health(&admin),
    }
}

/// Where the store is and how to reach it.
#[derive(clap::Args, Debug)]
struct StoreConn {
    /// The store: etcd://HOST:PORT[,HOST:PORT…]/PREFIX (etcds:// for TLS).
    #[arg(long)]
    store: String,
    #[command(flatten)]
    tls: StoreTlsArgs,
}

/// TLS towards etcd (`etcds://`).
#[derive(clap::Args, Debug, Default)]
struct StoreTlsArgs {
    /// CA certificates (PEM) etcd's certificate must chain to.
    #[arg(long)]
    store_ca: Option<PathBuf>,
    /// A client certificate (PEM) for etcd's --client-cert-auth; with
    /// --store-key.
    #[arg(long, requires = "store_key")]
    store_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, requires = "store_cert")]
    store_key: Option<PathBuf>,
}

impl StoreTlsArgs {
    fn read(&self) -> Result<Option<StoreTls>, String> {
        let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
        let Some(ca) = &self.store_ca else {
            return match self.store_cert {
                Some(_) => Err("--store-cert needs --store-ca".to_owned()),
                None => Ok(None),
            };
        };
        let identity = match (&self.store_cert, &self.store_key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            _ => None,
        };
        Ok(Some(StoreTls {
            ca: read(ca)?,
            identity,
        }))
    }
}

/// Which write a command makes.
#[derive(Debug, Clone, Copy)]
enum Change {
    Apply,
    Import,
}

/// Runs `f` on a small runtime with a connection to the store.
fn with_store<T>(conn: &StoreConn, f: impl AsyncFnOnce(&Store) -> Result<T, String>) -> Result<T, String> {
    let url: StoreUrl = conn.store.parse().map_err(|e: StoreError| e.to_string())?;
    let tls = conn.tls.read()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    rt.block_on(async move {
        let store = Store::with_tls(url, tls).map_err(|e| e.to_string())?;
        f(&store).await
    })
}

fn report(outcome: Result<Written, String>) -> ExitCode {
    match outcome {
        Ok(Written::Unchanged { revision }) => {
            println!("unchanged: the store already holds this (revision {revision})");
            ExitCode::SUCCESS
        }
        Ok(Written::Done { revision, changed }) => {
            println!("written at revision {revision}: {}", changed.join(", "));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sluice-xds: {e}");
            ExitCode::FAILURE
        }
    }
}

fn write(args: &StoreArgs, change: Change, paths: &[PathBuf]) -> ExitCode {
    let mut set = FileSet::new("the command line");
    for p in paths {
        let read = if p.is_dir() {
            FileSet::read_dir(p)
        } else {
            FileSet::read_file(p)
        };
        match read {
            Ok(r) => set.files.extend(r.files),
            Err(e) => {
                eprintln!("{e}\nsluice-xds: nothing was written");
                return ExitCode::FAILURE;
            }
        }
    }
    let change = match change {
        Change::Apply => store::Change::Apply(set),
        Change::Import => store::Change::Import(set),
    };
    report(with_store(&args.conn, async |s| {
        store::write(s, change, args.base_revision)
            .await
            .map_err(|e| e.to_string())
    }))
}

fn delete(args: &StoreArgs, names: Vec<String>) -> ExitCode {
    report(with_store(&args.conn, async |s| {
        store::write(s, store::Change::Delete(names), args.base_revision)
            .await
            .map_err(|e| e.to_string())
    }))
}

fn get(conn: &StoreConn, name: Option<&str>, to: Option<&std::path::Path>) -> ExitCode {
    let url = &conn.store;
    let read = match with_store(conn, async |s| s.read(None).await.map_err(|e| e.to_string())) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sluice-xds: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(name) = name {
        let Some(f) = read.files.files.get(name) else {
            eprintln!("sluice-xds: {url}: no file {name} (at revision {})", read.revision);
            return ExitCode::FAILURE;
        };
        use std::io::Write;
        return match std::io::stdout().write_all(&f.bytes) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sluice-xds: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(dir) = to {
        for (name, f) in &read.files.files {
            let path = dir.join(name);
            let written = path
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::write(&path, &f.bytes));
            if let Err(e) = written {
                eprintln!("sluice-xds: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        }
        println!(
            "{} files of revision {} written to {}",
            read.files.files.len(),
            read.revision,
            dir.display()
        );
        return ExitCode::SUCCESS;
    }
    println!("{url} at revision {}", read.revision);
    for (name, f) in &read.files.files {
        println!(
            "{name}\t{} bytes\tchanged at revision {}",
            f.bytes.len(),
            read.changed_at.get(name).copied().unwrap_or_default()
        );
    }
    ExitCode::SUCCESS
}

/// GET `path` from a server's admin API at `base` (`http://host:port` or
/// `host:port`): the status line's code and the body.
fn http_get(base: &str, path: &str) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let base = base.trim_end_matches('/');
    let addr = base.strip_prefix("http://").unwrap_or(base);
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| format!("cannot reach {base}: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("not an HTTP answer")?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{base}{path}: not an HTTP answer"))?;
    Ok((code, body.to_owned()))
}

fn health(admin: &str) -> ExitCode {
    match http_get(admin, "/ready") {
        Ok((200, body)) => {
            print!("{body}");
            ExitCode::SUCCESS
        }
        Ok((code, body)) => {
            eprintln!("sluice-xds: {code}: {}", body.trim_end());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("sluice-xds: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check(dir: PathBuf) -> ExitCode {
    match Source::Dir(dir.clone()).load() {
        Ok(loaded) => {
            let r = &loaded.resources;
            let n = |v: &Option<Vec<_>>| v.as_ref().map_or(0, Vec::len);
            let envoy = loaded
                .snapshot
                .type_urls()
                .filter(|t| t.contains("envoy.config") && !t.ends_with("TypedExtensionConfig"))
                .map(|t| loaded.snapshot.resources(t).len())
                .sum::<usize>();
            println!(
                "{}: OK: {} webgroups, {} smartgroups, {} workloads, {} policy ({} rules), {} named policies, {} targets, {} plugins, {} Envoy resources",
                dir.display(),
                r.webgroups.as_ref().map_or(0, Vec::len),
                r.smartgroups.as_ref().map_or(0, Vec::len),
                r.workloads.as_ref().map_or(0, Vec::len),
                usize::from(n(&r.policies) > loaded.config.policies.len()),
                loaded.config.policy.rules.len(),
                loaded.config.policies.len(),
                loaded.config.targets.len(),
                loaded.config.plugins.len(),
                envoy
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn diff(dir: PathBuf, against: &str) -> ExitCode {
    let loaded = match Source::Dir(dir.clone()).load() {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "{e}\nsluice-xds: {} does not validate; it would not be served",
                dir.display()
            );
            return ExitCode::FAILURE;
        }
    };
    let fetch = |path: &str| -> Result<String, String> {
        match http_get(against, path)? {
            (200, body) => Ok(body),
            (code, _) => Err(format!("{against}{path}: {code}")),
        }
    };
    let answer = fetch("/resources").and_then(|r| {
        let old: sluice_xds::diff::Versions = serde_json::from_str(&r).map_err(|e| format!("/resources: {e}"))?;
        let nodes: Vec<sluice_xds::diff::NodeSeen> =
            serde_json::from_str(&fetch("/nodes")?).map_err(|e| format!("/nodes: {e}"))?;
        Ok((old, nodes))
    });
    match answer {
        Ok((old, nodes)) => {
            let new = sluice_xds::diff::versions(&loaded.catalog);
            print!("{}", sluice_xds::diff::report(&old, &new, &loaded.catalog, &nodes));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sluice-xds: {e}");
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
    let store_url = match args.store.as_deref().map(str::parse::<StoreUrl>) {
        None => None,
        Some(Ok(u)) => Some(u),
        Some(Err(e)) => {
            eprintln!("sluice-xds: {e}");
            return ExitCode::FAILURE;
        }
    };
    let store_tls = match args.store_tls.read() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("sluice-xds: {e}");
            return ExitCode::FAILURE;
        }
    };
    let source = args.config_dir.clone().map_or(Source::Embedded, Source::Dir);
    // A store is read once the runtime runs (and waited for).
    let loaded = match &store_url {
        Some(_) => None,
        None => match source.load_with(args.code_url.as_deref()) {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!(
                    "{e}\nsluice-xds: {} does not validate; nothing served",
                    source.describe()
                );
                return ExitCode::FAILURE;
            }
        },
    };
    let tls = match tls_config(&args) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("sluice-xds: {e}");
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
        let admin_listener = match tokio::net::TcpListener::bind(args.admin).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!(
                    "sluice-xds: cannot listen on {} for the admin API: {e}; set --admin",
                    args.admin
                );
                return ExitCode::FAILURE;
            }
        };
        let admin_addr = admin_listener.local_addr().unwrap_or(args.admin);
        let metrics = match metrics_exporter_prometheus::PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full("sluice_xds_push_latency_seconds".into()),
                &[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ],
            )
            .and_then(|b| b.install_recorder())
        {
            Ok(h) => Some(h),
            Err(e) => {
                eprintln!("sluice-xds: metrics are off: {e}");
                None
            }
        };
        metrics::counter!("sluice_xds_config_rejections_total").increment(0);
        metrics::gauge!("sluice_xds_config_rejected").set(0.0);
        let store = match store_url.map(|u| Store::with_tls(u, store_tls)).transpose() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("sluice-xds: {e}");
                return ExitCode::FAILURE;
            }
        };
        let state = Arc::new(Mutex::new(SourceState::default()));
        let store_state = store.as_ref().map(|s| {
            Arc::new(Mutex::new(store::StoreState {
                store: s.url().to_string(),
                ..store::StoreState::default()
            }))
        });
        let (loaded, read) = match (loaded, &store, &store_state) {
            (Some(l), _, _) => (l, None),
            (None, Some(s), Some(st)) => {
                eprintln!("sluice-xds: reading {}", s.url());
                let (l, read) = store::first_load(s, args.code_url.as_deref(), &state, st).await;
                metrics::gauge!("sluice_xds_store_reachable").set(1.0);
                (l, Some(read))
            }
            _ => return ExitCode::FAILURE,
        };
        metrics::counter!("sluice_xds_config_loads_total").increment(1);
        state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).loads = 1;
        let (tx, rx) = tokio::sync::watch::channel(loaded.catalog.clone());
        let modules = Arc::new(Mutex::new(loaded.modules.clone()));
        match (store, read, &store_state) {
            (Some(store), Some(read), Some(st)) => {
                tokio::spawn(store::follow(
                    store,
                    read.revision,
                    read.files,
                    store::Publish {
                        snapshots: tx,
                        state: state.clone(),
                        store_state: st.clone(),
                        code_url: args.code_url.clone(),
                        modules: modules.clone(),
                    },
                ));
            }
            _ => {
                tokio::spawn(watch_dir(
                    source.clone(),
                    args.watch_interval,
                    tx,
                    state.clone(),
                    args.code_url.clone(),
                    modules.clone(),
                ));
            }
        }
        let stats = Arc::new(Stats::default());
        let mut ads = Ads::new(rx, stats);
        if args.client_ca.is_some() {
            ads = ads.verify_node_ids();
        }
        tokio::spawn(sluice_xds::admin::serve(
            sluice_xds::admin::Admin {
                catalog: ads.catalogs(),
                modules,
                registry: ads.registry(),
                source: state,
                store: store_state.clone(),
                metrics,
            },
            admin_listener,
        ));
        eprintln!("sluice-xds: admin API on http://{admin_addr}");
        eprintln!(
            "sluice-xds: serving {} ({} rules) over ADS{} on {addr}",
            store_state.as_ref().map_or_else(
                || source.describe(),
                |s| {
                    let s = s.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    format!("{} (revision {})", s.store, s.revision)
                }
            ),
            loaded.config.policy.rules.len(),
            match (&args.tls_cert, &args.client_ca) {
                (None, _) => "",
                (Some(_), None) => " (TLS)",
                (Some(_), Some(_)) => " (mutual TLS)",
            }
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
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            builder = match builder.tls_config(tls) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("sluice-xds: TLS: {e}");
                    return ExitCode::FAILURE;
                }
            };
        }
        let served = builder
            .add_service(AggregatedDiscoveryServiceServer::new(ads))
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

/// The TLS settings of `serve`, from the files named on the command line.
fn tls_config(args: &ServeArgs) -> Result<Option<tonic::transport::ServerTlsConfig>, String> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
    let mut config = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
    if let Some(ca) = &args.client_ca {
        config = config.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    Ok(Some(config))
}
