//! The gateway's xDS stream: connects to a control server, keeps one ADS
//! stream open, and turns what arrives into configurations applied
//! through the same path a reload from the file takes.
//!
//! The servers of the bootstrap are tried in turn; after a stream ends or
//! a connection fails the next one is tried after a jittered, growing
//! pause (250 ms doubling to 30 s, reset once a stream has delivered).
//! Nothing the gateway runs changes while it is cut off.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use sluice_api::XdsBootstrap;
use sluice_api::config::Resources;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use super::client::{AdsClient, Outgoing};
use super::status::XdsStatus;

/// How long responses that leave a name undefined are held, waiting for
/// the response of the type that defines it (a policy naming a group
/// that arrives just after it), before they are NACKed.
pub const HOLD: Duration = Duration::from_secs(2);
/// Responses arriving this close together are applied as one change.
const BATCH: Duration = Duration::from_millis(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// What applying a candidate configuration gave.
#[derive(Debug)]
pub enum Applied {
    /// Running now; the text says what changed.
    Done(String),
    /// Refused. `dangling`: only because a name it uses is not defined,
    /// which a response of another type may still bring.
    Refused { message: String, dangling: bool },
}

/// Applies the resources a control server sent (the runtime, or a test's
/// stand-in).
pub trait Apply: Send + Sync + 'static {
    fn apply(&self, resources: Resources) -> impl Future<Output = Applied> + Send;
}

/// Runs the client until `stop` turns true.
pub async fn run<A: Apply>(
    bootstrap: XdsBootstrap,
    modules: std::path::PathBuf,
    apply: Arc<A>,
    status: Arc<XdsStatus>,
    mut stop: watch::Receiver<bool>,
) {
    let mut client = AdsClient::new(&bootstrap);
    let initial = Instant::now() + bootstrap.initial_fetch_timeout;
    let mut failures: u32 = 0;
    let mut next = 0usize;
    loop {
        let Some(server) = bootstrap.servers.get(next % bootstrap.servers.len().max(1)) else {
            return;
        };
        let server = server.to_string();
        next = next.wrapping_add(1);
        status.connecting(&server);
        let mut session = Session {
            modules: &modules,
            tls: bootstrap.tls.as_ref(),
            client: &mut client,
            apply: &*apply,
            status: &status,
            initial,
            held_since: None,
            delivered: false,
        };
        let ended = tokio::select! {
            r = session.serve(&server) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        let delivered = session.delivered;
        match ended {
            Ok(()) => tracing::warn!("xDS: {server} ended the stream; trying again"),
            Err(e) => tracing::warn!("xDS: {server}: {e}; trying again"),
        }
        status.disconnected(&server);
        failures = if delivered { 0 } else { failures.saturating_add(1) };
        let pause = backoff(failures);
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// The pause before the next attempt: doubling from [`BACKOFF_MIN`] to
/// [`BACKOFF_MAX`], times a random factor in [0.5, 1.5) so a fleet that
/// lost its server does not come back in step.
fn backoff(failures: u32) -> Duration {
    let base = BACKOFF_MIN.saturating_mul(1u32 << failures.min(8)).min(BACKOFF_MAX);
    base.mul_f64(0.5 + rand::random::<f64>())
}

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StreamError {
    #[error("cannot connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("the stream failed: {0}")]
    Status(#[from] tonic::Status),
    #[error("not a server address: {0}")]
    Address(String),
    #[error("TLS: cannot read {path}: {source}")]
    TlsFile { path: String, source: std::io::Error },
}

struct Session<'a, A> {
    /// Where plugin modules from xDS are kept.
    modules: &'a std::path::Path,
    tls: Option<&'a sluice_api::XdsTls>,
    client: &'a mut AdsClient,
    apply: &'a A,
    status: &'a XdsStatus,
    initial: Instant,
    /// When the responses held now were first found to leave a name
    /// undefined.
    held_since: Option<Instant>,
    /// A response arrived on this stream.
    delivered: bool,
}

/// The two variants of ADS, as the session needs them.
enum Wire {
    Sotw {
        tx: mpsc::Sender<DiscoveryRequest>,
        rx: tonic::Streaming<envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse>,
    },
    Delta {
        tx: mpsc::Sender<DeltaDiscoveryRequest>,
        rx: tonic::Streaming<envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse>,
    },
}

impl Wire {
    async fn send(&self, out: Vec<Outgoing>) {
        for o in out {
            // A closed channel means the stream ended; the next read says
            // how.
            let _ = match (self, o) {
                (Self::Sotw { tx, .. }, Outgoing::Sotw(r)) => tx.send(r).await.map_err(drop),
                (Self::Delta { tx, .. }, Outgoing::Delta(r)) => tx.send(r).await.map_err(drop),
                _ => Ok(()),
            };
        }
    }

    /// The next response, held as pending in `client`. `Ok(false)`: the
    /// server ended the stream.
    async fn receive(&mut self, client: &mut AdsClient, status: &XdsStatus) -> Result<bool, tonic::Status> {
        let refused = match self {
            Self::Sotw { rx, .. } => {
                let Some(r) = rx.message().await? else { return Ok(false) };
                let (url, nonce) = (r.type_url.clone(), r.nonce.clone());
                client.on_sotw(r).err().map(|e| (url, nonce, e))
            }
            Self::Delta { rx, .. } => {
                let Some(r) = rx.message().await? else { return Ok(false) };
                let (url, nonce) = (r.type_url.clone(), r.nonce.clone());
                client.on_delta(r).err().map(|e| (url, nonce, e))
            }
        };
        if let Some((url, nonce, e)) = refused {
            tracing::warn!("xDS: refused a response: {e}");
            status.rejected(&e.to_string());
            if let Some(nack) = client.refuse(&url, nonce, &e.to_string()) {
                self.send(vec![nack]).await;
            }
        }
        Ok(true)
    }
}

impl<A: Apply> Session<'_, A> {
    async fn serve(&mut self, server: &str) -> Result<(), StreamError> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{server}"))
            .map_err(|e| StreamError::Address(format!("{server}: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        if let Some(tls) = self.tls {
            endpoint = endpoint.tls_config(tls_config(tls, server)?)?;
        }
        let channel = endpoint.connect().await?;
        let mut grpc = AggregatedDiscoveryServiceClient::new(channel);
        // The first requests wait in the channel while the call is set up.
        let first = self.client.on_connect();
        let mut wire = if self.client.is_delta() {
            let (tx, rx) = mpsc::channel(64);
            for o in first {
                if let Outgoing::Delta(r) = o {
                    let _ = tx.try_send(r);
                }
            }
            let rx = grpc
                .delta_aggregated_resources(ReceiverStream::new(rx))
                .await?
                .into_inner();
            Wire::Delta { tx, rx }
        } else {
            let (tx, rx) = mpsc::channel(64);
            for o in first {
                if let Outgoing::Sotw(r) = o {
                    let _ = tx.try_send(r);
                }
            }
            let rx = grpc
                .stream_aggregated_resources(ReceiverStream::new(rx))
                .await?
                .into_inner();
            Wire::Sotw { tx, rx }
        };
        self.status.connected(server);
        tracing::info!("xDS: connected to {server}");
        loop {
            let hold_until = self.held_since.map(|t| t + HOLD);
            // Past the initial fetch timeout, an unsynced type no longer
            // makes the loop wait (nor wake).
            let wait_initial = (!self.client.synced() && Instant::now() < self.initial).then_some(self.initial);
            let wake = [hold_until, wait_initial].into_iter().flatten().min();
            tokio::select! {
                more = wire.receive(self.client, self.status) => {
                    if !more? {
                        return Ok(());
                    }
                    self.delivered = true;
                    // Take what arrived with it, so a change that spans
                    // several types is applied as one.
                    while let Ok(more) = tokio::time::timeout(BATCH, wire.receive(self.client, self.status)).await {
                        if !more? {
                            return Ok(());
                        }
                    }
                }
                () = sleep_until(wake) => {}
            }
            let out = self.settle().await;
            wire.send(out).await;
        }
    }

    /// Applies what is pending, when it is time to: ACKs, NACKs, or
    /// nothing yet (waiting for the first response of every type, or for
    /// the type that defines a name).
    async fn settle(&mut self) -> Vec<Outgoing> {
        if !self.client.has_pending() {
            return Vec::new();
        }
        // New EDS clusters are asked for before the clusters are applied.
        let mut out = self.client.follow_clusters();
        let now = Instant::now();
        if !self.client.synced() && now < self.initial {
            return out;
        }
        // Make before break: clusters wait (a while) for their endpoints.
        if self.client.warming() {
            let since = *self.held_since.get_or_insert(now);
            if now < since + HOLD {
                return out;
            }
            self.client.stop_warming();
        }
        out.extend(self.commit_or_reject(now).await);
        out
    }

    async fn commit_or_reject(&mut self, now: Instant) -> Vec<Outgoing> {
        let mut candidate = match self.client.candidate() {
            Ok(c) => c,
            Err(super::client::Refusal {
                message,
                dangling: true,
            }) if now < *self.held_since.get_or_insert(now) + HOLD => {
                tracing::debug!("xDS: holding an update for the resource it names: {message}");
                return Vec::new();
            }
            Err(super::client::Refusal { message: why, .. }) => {
                self.held_since = None;
                tracing::warn!("xDS: refused an update; the running configuration is unchanged:\n{why}");
                self.status.rejected(&why);
                return self.client.reject(&why);
            }
        };
        if let Some(plugins) = candidate.plugins.as_mut()
            && let Err(why) = super::code::materialize(plugins, &self.client.plugin_code(), self.modules).await
        {
            self.held_since = None;
            tracing::warn!("xDS: refused an update; the running configuration is unchanged:\n{why}");
            self.status.rejected(&why);
            return self.client.reject(&why);
        }
        match self.apply.apply(candidate).await {
            Applied::Done(what) => {
                self.held_since = None;
                tracing::info!("xDS: applied: {what}");
                let acks = self.client.commit();
                self.status.applied(&self.client.accepted());
                acks
            }
            Applied::Refused { message, dangling } => {
                let since = *self.held_since.get_or_insert(now);
                if dangling && now < since + HOLD {
                    return Vec::new();
                }
                self.held_since = None;
                tracing::warn!("xDS: refused an update; the running configuration is unchanged:\n{message}");
                self.status.rejected(&message);
                self.client.reject(&message)
            }
        }
    }
}

/// The TLS settings of a connection, from files read now (so renewed
/// certificates are used at the next connection).
fn tls_config(tls: &sluice_api::XdsTls, server: &str) -> Result<tonic::transport::ClientTlsConfig, StreamError> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|source| StreamError::TlsFile {
            path: p.display().to_string(),
            source,
        })
    };
    let host = server
        .rsplit_once(':')
        .map_or(server, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let mut config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&tls.ca)?))
        .domain_name(tls.server_name.clone().unwrap_or_else(|| host.to_owned()));
    if let Some((cert, key)) = &tls.identity {
        config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(config)
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
