//! The control server's admin API (loopback by default):
//!
//! | path | what |
//! |---|---|
//! | `GET /ready` | `200` while a configuration is served and its store (etcd) answers; `503` with the reason while the store cannot be reached (the last good configuration is still served) |
//! | `GET /nodes` | every connected node: its stream, protocol, policy and target, and per type what was sent, what it ACKed, its last NACK and why |
//! | `GET /resources` | per policy, per type, every resource served and its version |
//! | `GET /config` | the source: loads, rejections, the last rejection's errors while it stands; with a store, its revision and health |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /plugins/<sha256>.wasm` | a plugin's module, when plugins' code is remote (`--code-url`) |

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::registry::Registry;
use crate::source::SourceState;

#[derive(Clone)]
pub struct Admin {
    /// What is served now, for `/resources`.
    pub catalog: tokio::sync::watch::Receiver<Arc<crate::catalog::Catalog>>,
    /// Plugin modules served at `/plugins/<sha256>.wasm`.
    pub modules: Arc<Mutex<Arc<crate::ecds::Modules>>>,
    pub registry: Arc<Registry>,
    pub source: Arc<Mutex<SourceState>>,
    /// The etcd store's health, when the configuration comes from one.
    pub store: Option<Arc<Mutex<crate::store::StoreState>>>,
    pub metrics: Option<PrometheusHandle>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

fn json<T: serde::Serialize>(v: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(v) {
        Ok(b) => reply(StatusCode::OK, "application/json", b),
        Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e.to_string()),
    }
}

impl Admin {
    fn route(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        if req.method() != Method::GET {
            let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET\n");
            r.headers_mut()
                .insert(hyper::header::ALLOW, hyper::header::HeaderValue::from_static("GET"));
            return r;
        }
        match path {
            "/ready" => match self.store.as_ref().map(|s| lock(s).clone()) {
                Some(st) if !st.reachable => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!(
                        "not ready: {}; serving the last good configuration (revision {})\n",
                        st.last_error.as_deref().unwrap_or("the store cannot be reached"),
                        st.revision
                    ),
                ),
                _ => reply(StatusCode::OK, "text/plain", "ready\n"),
            },
            "/nodes" => json(&self.registry.streams()),
            "/resources" => json(&crate::diff::versions(&self.catalog.borrow())),
            "/config" => {
                #[derive(serde::Serialize)]
                struct Config {
                    #[serde(flatten)]
                    source: SourceState,
                    #[serde(skip_serializing_if = "Option::is_none")]
                    store: Option<crate::store::StoreState>,
                }
                json(&Config {
                    source: lock(&self.source).clone(),
                    store: self.store.as_ref().map(|s| lock(s).clone()),
                })
            }
            "/metrics" => match &self.metrics {
                Some(h) => reply(StatusCode::OK, "text/plain; version=0.0.4", h.render()),
                None => reply(StatusCode::NOT_FOUND, "text/plain", "metrics are not installed\n"),
            },
            p if p.starts_with("/plugins/") => {
                let sha = p.trim_start_matches("/plugins/").trim_end_matches(".wasm");
                let module = self
                    .modules
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get(sha)
                    .cloned();
                match module {
                    Some(m) => reply(StatusCode::OK, "application/wasm", Bytes::from(m.to_vec())),
                    None => reply(StatusCode::NOT_FOUND, "text/plain", "no such module\n"),
                }
            }
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found; try /ready, /nodes, /resources, /config, /metrics\n",
            ),
        }
    }
}

/// Serves the admin API on `listener` until the task is dropped.
pub async fn serve(admin: Admin, listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let r = admin.route(&req);
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
