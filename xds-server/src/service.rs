//! The ADS gRPC service: one task per stream, feeding the protocol core
//! ([`crate::ads`]) the stream's requests and every new snapshot, and
//! sending what it returns.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use envoy_types::pb::envoy::config::core::v3::Node;

use crate::ads::{DeltaStream, Event, Output, ProtocolError, SotwStream};
use crate::catalog::Catalog;
use crate::registry::Registry;
use crate::snapshot::Snapshot;

/// Responses queued per stream before the stream's task waits for the
/// client to read.
const QUEUE: usize = 16;

type Responses<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Counters over every stream.
#[derive(Debug, Default)]
pub struct Stats {
    pub streams: AtomicU64,
    pub open: AtomicU64,
    pub responses: AtomicU64,
    pub acks: AtomicU64,
    pub nacks: AtomicU64,
    /// Streams refused because the node id is not in the certificate.
    pub refused: AtomicU64,
}

#[derive(Debug, Clone)]
pub struct Ads {
    catalogs: watch::Receiver<Arc<Catalog>>,
    stats: Arc<Stats>,
    registry: Arc<Registry>,
    /// Mutual TLS: a node's id must be a name its certificate proves.
    verify_node: bool,
}

impl Ads {
    pub fn new(catalogs: watch::Receiver<Arc<Catalog>>, stats: Arc<Stats>) -> Self {
        Self {
            catalogs,
            stats,
            registry: Arc::default(),
            verify_node: false,
        }
    }

    /// With mutual TLS: a stream whose node id is not a DNS name of the
    /// client's certificate is refused (`PERMISSION_DENIED`), so a node
    /// cannot claim another's id and get its policy.
    #[must_use]
    pub fn verify_node_ids(mut self) -> Self {
        self.verify_node = true;
        self
    }

    /// The catalogs this service serves.
    pub fn catalogs(&self) -> watch::Receiver<Arc<Catalog>> {
        self.catalogs.clone()
    }

    /// What every open stream was sent, ACKed and NACKed.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }
}

/// The two variants, as a stream task needs them.
trait Core: Send + 'static {
    type Req: Send + 'static;
    type Resp: Send + 'static;
    fn identify(&mut self, req: &Self::Req) -> Result<Node, ProtocolError>;
    fn on_request(&mut self, req: Self::Req, snap: &Snapshot) -> Result<Output<Self::Resp>, ProtocolError>;
    fn on_snapshot(&mut self, snap: &Snapshot) -> Output<Self::Resp>;
    /// `sotw` or `delta`.
    const PROTOCOL: &'static str;
    /// A response's type, version, nonce and number of resources.
    fn describe(r: &Self::Resp) -> (&str, &str, &str, usize);
}

impl Core for SotwStream {
    type Req = DiscoveryRequest;
    type Resp = DiscoveryResponse;
    const PROTOCOL: &'static str = "sotw";
    fn describe(r: &DiscoveryResponse) -> (&str, &str, &str, usize) {
        (&r.type_url, &r.version_info, &r.nonce, r.resources.len())
    }
    fn identify(&mut self, req: &DiscoveryRequest) -> Result<Node, ProtocolError> {
        SotwStream::identify(self, req).cloned()
    }
    fn on_request(
        &mut self,
        req: DiscoveryRequest,
        snap: &Snapshot,
    ) -> Result<Output<DiscoveryResponse>, ProtocolError> {
        SotwStream::on_request(self, req, snap)
    }
    fn on_snapshot(&mut self, snap: &Snapshot) -> Output<DiscoveryResponse> {
        SotwStream::on_snapshot(self, snap)
    }
}

impl Core for DeltaStream {
    type Req = DeltaDiscoveryRequest;
    type Resp = DeltaDiscoveryResponse;
    const PROTOCOL: &'static str = "delta";
    fn describe(r: &DeltaDiscoveryResponse) -> (&str, &str, &str, usize) {
        (
            &r.type_url,
            &r.system_version_info,
            &r.nonce,
            r.resources.len() + r.removed_resources.len(),
        )
    }
    fn identify(&mut self, req: &DeltaDiscoveryRequest) -> Result<Node, ProtocolError> {
        DeltaStream::identify(self, req).cloned()
    }
    fn on_request(
        &mut self,
        req: DeltaDiscoveryRequest,
        snap: &Snapshot,
    ) -> Result<Output<DeltaDiscoveryResponse>, ProtocolError> {
        DeltaStream::on_request(self, req, snap)
    }
    fn on_snapshot(&mut self, snap: &Snapshot) -> Output<DeltaDiscoveryResponse> {
        DeltaStream::on_snapshot(self, snap)
    }
}

impl Ads {
    fn serve<C: Core>(
        &self,
        mut core: C,
        mut inbound: Streaming<C::Req>,
        certs: Option<Arc<Vec<CertificateDer<'static>>>>,
    ) -> Responses<C::Resp>
    where
        C::Req: prost::Message + Default,
    {
        let (tx, rx) = mpsc::channel(QUEUE);
        let mut catalogs = self.catalogs.clone();
        let stats = self.stats.clone();
        let registry = self.registry.clone();
        let id = registry.open(C::PROTOCOL);
        let verify = self.verify_node;
        stats.streams.fetch_add(1, Ordering::Relaxed);
        stats.open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            // Whether new snapshots can still come (the source's task may
            // end; the stream then keeps the last one).
            let mut live = true;
            // The node, from the stream's first request: what picks its
            // snapshot in every catalog.
            let mut node: Option<Node> = None;
            loop {
                let mut push = false;
                let out = tokio::select! {
                    m = inbound.message() => match m {
                        Ok(Some(req)) => {
                            if node.is_none() {
                                let who = core.identify(&req).map_err(|e| status_of(&e)).and_then(|n| {
                                    if verify {
                                        proven(&n.id, certs.as_deref().map(Vec::as_slice)).map(|()| n)
                                    } else {
                                        Ok(n)
                                    }
                                });
                                match who {
                                    Ok(n) => {
                                        let catalog = catalogs.borrow().clone();
                                        let (policy, target) = catalog.policy_for(&n);
                                        registry.identified(id, &n.id, &n.cluster, policy, target);
                                        node = Some(n);
                                    }
                                    Err(status) => {
                                        if status.code() == tonic::Code::PermissionDenied {
                                            stats.refused.fetch_add(1, Ordering::Relaxed);
                                            tracing::warn!("refused a stream: {}", status.message());
                                        }
                                        let _ = tx.send(Err(status)).await;
                                        break;
                                    }
                                }
                            }
                            let snap = snapshot_for(&catalogs.borrow_and_update(), node.as_ref());
                            match core.on_request(req, &snap) {
                                Ok(out) => out,
                                Err(e) => {
                                    let _ = tx.send(Err(status_of(&e))).await;
                                    break;
                                }
                            }
                        }
                        Ok(None) | Err(_) => break,
                    },
                    changed = catalogs.changed(), if live => {
                        if changed.is_err() {
                            live = false;
                            continue;
                        }
                        let catalog = catalogs.borrow_and_update().clone();
                        if let Some(n) = &node {
                            let (policy, target) = catalog.policy_for(n);
                            registry.identified(id, &n.id, &n.cluster, policy, target);
                        }
                        push = true;
                        core.on_snapshot(&snapshot_for(&catalog, node.as_ref()))
                    }
                };
                report(&stats, &out.events);
                registry.events(id, &out.events);
                for r in out.responses {
                    stats.responses.fetch_add(1, Ordering::Relaxed);
                    let (type_url, version, nonce, n) = C::describe(&r);
                    registry.sent(id, type_url, version, nonce, n, push);
                    if tx.send(Ok(r)).await.is_err() {
                        break;
                    }
                }
            }
            stats.open.fetch_sub(1, Ordering::Relaxed);
            registry.close(id);
        });
        Box::pin(ReceiverStream::new(rx))
    }
}

/// Whether the client certificate proves `node_id`: it must be one of the
/// certificate's DNS names.
fn proven(node_id: &str, certs: Option<&[CertificateDer<'static>]>) -> Result<(), Status> {
    let Some(leaf) = certs.and_then(<[_]>::first) else {
        return Err(Status::permission_denied(
            "no client certificate: this server takes nodes with mutual TLS only",
        ));
    };
    let cert = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| Status::permission_denied(format!("the client certificate cannot be read: {e}")))?;
    let name = ServerName::try_from(node_id.to_owned()).map_err(|_| {
        Status::permission_denied(format!(
            "node id `{node_id}` is not a DNS name, so no certificate can prove it; name nodes like `gw-eu-1`"
        ))
    })?;
    cert.verify_is_valid_for_subject_name(&name).map_err(|_| {
        Status::permission_denied(format!(
            "node id `{node_id}` is not a name of the client certificate; a node may only be what its certificate says"
        ))
    })
}

fn snapshot_for(catalog: &Catalog, node: Option<&Node>) -> Arc<Snapshot> {
    match node {
        Some(n) => catalog.for_node(n),
        None => Arc::default(),
    }
}

fn status_of(e: &ProtocolError) -> Status {
    match e {
        ProtocolError::ResourceLocatorsUnsupported { .. } => Status::unimplemented(e.to_string()),
        _ => Status::invalid_argument(e.to_string()),
    }
}

fn report(stats: &Stats, events: &[Event]) {
    for e in events {
        match e {
            Event::Ack { .. } => {
                stats.acks.fetch_add(1, Ordering::Relaxed);
            }
            Event::Nack { .. } => {
                stats.nacks.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = Responses<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = Responses<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let certs = request.peer_certs();
        Ok(Response::new(self.serve(
            SotwStream::new(),
            request.into_inner(),
            certs,
        )))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let certs = request.peer_certs();
        Ok(Response::new(self.serve(
            DeltaStream::new(),
            request.into_inner(),
            certs,
        )))
    }
}
