//! What the server knows of each stream, for the admin API and metrics:
//! the node, the policy it was given, and per type what was last sent,
//! what the node ACKed, and its last NACK with the reason.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Instant, SystemTime};

use serde::Serialize;

use crate::ads::Event;

/// Every open stream, by a number the server gives it.
#[derive(Debug, Default)]
pub struct Registry {
    streams: Mutex<BTreeMap<u64, StreamView>>,
    next: Mutex<u64>,
}

/// One stream, as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct StreamView {
    pub stream: u64,
    /// `sotw` or `delta`.
    pub protocol: &'static str,
    pub node: Option<String>,
    pub cluster: Option<String>,
    /// The policy this node is served, and the target that picked it.
    pub policy: Option<String>,
    pub target: Option<String>,
    #[serde(serialize_with = "rfc3339")]
    pub since: SystemTime,
    pub types: BTreeMap<String, TypeView>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TypeView {
    /// The version and nonce of the last response sent.
    pub sent_version: String,
    pub sent_nonce: String,
    /// Resources in the last response.
    pub sent_resources: usize,
    /// The version the node last ACKed.
    pub acked_version: Option<String>,
    /// The node's last NACK: the version it refused and why.
    pub nack: Option<NackView>,
    pub acks: u64,
    pub nacks: u64,
    /// When a push of a new snapshot went out, not yet ACKed: for the
    /// push latency (publish to ACK).
    #[serde(skip)]
    pub pushed_at: Option<Instant>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NackView {
    pub version: String,
    pub message: String,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_seconds(*t))
}

impl Registry {
    /// A stream opened; returns its number.
    pub fn open(&self, protocol: &'static str) -> u64 {
        let id = {
            let mut n = self.next.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            *n += 1;
            *n
        };
        self.with(|m| {
            m.insert(
                id,
                StreamView {
                    stream: id,
                    protocol,
                    node: None,
                    cluster: None,
                    policy: None,
                    target: None,
                    since: SystemTime::now(),
                    types: BTreeMap::new(),
                },
            );
        });
        metrics::gauge!("sluice_xds_streams").increment(1.0);
        metrics::counter!("sluice_xds_streams_total", "protocol" => protocol).increment(1);
        id
    }

    pub fn close(&self, id: u64) {
        self.with(|m| {
            m.remove(&id);
        });
        metrics::gauge!("sluice_xds_streams").decrement(1.0);
    }

    pub fn identified(&self, id: u64, node: &str, cluster: &str, policy: &str, target: Option<&str>) {
        self.with(|m| {
            if let Some(s) = m.get_mut(&id) {
                s.node = Some(node.to_owned());
                s.cluster = Some(cluster.to_owned());
                s.policy = Some(policy.to_owned());
                s.target = target.map(str::to_owned);
            }
        });
    }

    /// A response went out. `push`: it carries a new snapshot (not the
    /// answer to a request).
    pub fn sent(&self, id: u64, type_url: &str, version: &str, nonce: &str, resources: usize, push: bool) {
        self.with(|m| {
            if let Some(s) = m.get_mut(&id) {
                let t = s.types.entry(type_url.to_owned()).or_default();
                t.sent_version = version.to_owned();
                t.sent_nonce = nonce.to_owned();
                t.sent_resources = resources;
                if push && t.pushed_at.is_none() {
                    t.pushed_at = Some(Instant::now());
                }
            }
        });
        metrics::counter!("sluice_xds_responses_total", "type" => short(type_url)).increment(1);
    }

    /// What the protocol core saw: ACKs and NACKs.
    pub fn events(&self, id: u64, events: &[Event]) {
        if events.is_empty() {
            return;
        }
        self.with(|m| {
            let Some(s) = m.get_mut(&id) else { return };
            let node = s.node.clone().unwrap_or_default();
            for e in events {
                match e {
                    Event::Ack { type_url, version, .. } => {
                        let t = s.types.entry(type_url.clone()).or_default();
                        t.acked_version = Some(version.clone());
                        t.acks += 1;
                        if let Some(at) = t.pushed_at.take() {
                            metrics::histogram!("sluice_xds_push_latency_seconds").record(at.elapsed().as_secs_f64());
                        }
                        metrics::counter!("sluice_xds_acks_total", "type" => short(type_url)).increment(1);
                    }
                    Event::Nack {
                        type_url,
                        version,
                        message,
                        ..
                    } => {
                        let t = s.types.entry(type_url.clone()).or_default();
                        t.nacks += 1;
                        t.pushed_at = None;
                        t.nack = Some(NackView {
                            version: version.clone(),
                            message: message.clone(),
                        });
                        metrics::counter!("sluice_xds_nacks_total", "type" => short(type_url)).increment(1);
                        tracing::warn!("node `{node}` rejected {type_url} version {version}: {message}");
                    }
                    _ => {}
                }
            }
        });
    }

    /// Every open stream.
    pub fn streams(&self) -> Vec<StreamView> {
        self.streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    fn with(&self, f: impl FnOnce(&mut BTreeMap<u64, StreamView>)) {
        f(&mut self.streams.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    }
}

/// The type's name without `type.googleapis.com/`, as a metric label.
fn short(type_url: &str) -> String {
    type_url.rsplit('/').next().unwrap_or(type_url).to_owned()
}
