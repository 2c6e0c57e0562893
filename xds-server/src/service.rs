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
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use envoy_types::pb::envoy::config::core::v3::Node;

use crate::ads::{DeltaStream, Event, Output, ProtocolError, SotwStream};
use crate::catalog::Catalog;
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
}

#[derive(Debug, Clone)]
pub struct Ads {
    catalogs: watch::Receiver<Arc<Catalog>>,
    stats: Arc<Stats>,
}

impl Ads {
    pub fn new(catalogs: watch::Receiver<Arc<Catalog>>, stats: Arc<Stats>) -> Self {
        Self { catalogs, stats }
    }
}

/// The two variants, as a stream task needs them.
trait Core: Send + 'static {
    type Req: Send + 'static;
    type Resp: Send + 'static;
    fn identify(&mut self, req: &Self::Req) -> Result<Node, ProtocolError>;
    fn on_request(&mut self, req: Self::Req, snap: &Snapshot) -> Result<Output<Self::Resp>, ProtocolError>;
    fn on_snapshot(&mut self, snap: &Snapshot) -> Output<Self::Resp>;
    fn node_id(&self) -> Option<String>;
}

impl Core for SotwStream {
    type Req = DiscoveryRequest;
    type Resp = DiscoveryResponse;
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
    fn node_id(&self) -> Option<String> {
        self.node().map(|n| n.id.clone())
    }
}

impl Core for DeltaStream {
    type Req = DeltaDiscoveryRequest;
    type Resp = DeltaDiscoveryResponse;
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
    fn node_id(&self) -> Option<String> {
        self.node().map(|n| n.id.clone())
    }
}

impl Ads {
    fn serve<C: Core>(&self, mut core: C, mut inbound: Streaming<C::Req>) -> Responses<C::Resp>
    where
        C::Req: prost::Message + Default,
    {
        let (tx, rx) = mpsc::channel(QUEUE);
        let mut catalogs = self.catalogs.clone();
        let stats = self.stats.clone();
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
                let out = tokio::select! {
                    m = inbound.message() => match m {
                        Ok(Some(req)) => {
                            if node.is_none() {
                                match core.identify(&req) {
                                    Ok(n) => node = Some(n),
                                    Err(e) => {
                                        let _ = tx.send(Err(status_of(&e))).await;
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
                        let snap = snapshot_for(&catalogs.borrow_and_update(), node.as_ref());
                        core.on_snapshot(&snap)
                    }
                };
                report(&stats, core.node_id().as_deref(), &out.events);
                for r in out.responses {
                    stats.responses.fetch_add(1, Ordering::Relaxed);
                    if tx.send(Ok(r)).await.is_err() {
                        break;
                    }
                }
            }
            stats.open.fetch_sub(1, Ordering::Relaxed);
        });
        Box::pin(ReceiverStream::new(rx))
    }
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

fn report(stats: &Stats, node: Option<&str>, events: &[Event]) {
    let node = node.unwrap_or("?");
    for e in events {
        match e {
            Event::Ack { type_url, version, .. } => {
                stats.acks.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(node, type_url, version, "ACK");
            }
            Event::Nack {
                type_url,
                version,
                message,
                ..
            } => {
                stats.nacks.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("node `{node}` rejected {type_url} version {version}: {message}");
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
        Ok(Response::new(self.serve(SotwStream::new(), request.into_inner())))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Ok(Response::new(self.serve(DeltaStream::new(), request.into_inner())))
    }
}
