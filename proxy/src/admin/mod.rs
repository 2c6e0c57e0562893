//! The admin API, on its own listener (loopback by default):
//!
//! | path | what |
//! |---|---|
//! | `GET /ready` | `200` once every listener is bound |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /config_dump` | the running configuration, JSON |
//! | `GET /explain?src=IP&sni=NAME&port=443` | a policy explanation, JSON (also `host=`, `name=`, `dst=`, `proto=`) |
//! | `GET /stats` | active flows, audit records written and dropped |
//! | `GET /xds` | the xDS client: server, connected, updates applied and refused, the last refusal, what is held per type |
//! | `GET /logging` | the log filter in force |
//! | `POST /logging?level=debug` | change the log filter at run time (any `tracing` filter); only `POST` changes state |
//! | `POST /reload` | read the configuration file again and apply it in place; the answer says what changed |

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use sluice_api::{DomainName, Protocol};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::listener::Shared;
use crate::policy::FlowQuery;
use crate::telemetry::logging::LogControl;
use crate::telemetry::metrics::PrometheusHandle;

#[derive(Clone)]
pub struct Admin {
    pub shared: Arc<Shared>,
    pub metrics: PrometheusHandle,
    pub log: Option<LogControl>,
    /// Asks the runtime to reload from its file; the answer is the report
    /// or the reason it was refused.
    pub reload:
        Option<tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<Result<crate::runtime::ReloadReport, String>>>>,
    /// The xDS client's state, when `xds:` started one.
    pub xds: Arc<std::sync::OnceLock<Arc<crate::xds::XdsStatus>>>,
    /// Every TCP listener's kind and bound address, as the runtime keeps
    /// them.
    pub bound: Bound,
}

/// Listeners by name: kind and bound address (shared with the runtime).
pub type Bound =
    Arc<std::sync::Mutex<std::collections::BTreeMap<String, (sluice_api::ListenerType, std::net::SocketAddr)>>>;

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").finish_non_exhaustive()
    }
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

fn query_map(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (!k.is_empty()).then(|| (k.to_owned(), v.replace("%3A", ":").replace("%3a", ":")))
        })
        .collect()
}

impl Admin {
    fn route(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let q = query_map(req.uri().query());
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/ready") => reply(StatusCode::OK, "text/plain", "ready\n"),
            (&Method::GET, "/metrics") => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                crate::telemetry::metrics::render(&self.metrics),
            ),
            (&Method::GET, "/config_dump") => {
                let snap = self.shared.snapshot.load();
                match serde_json::to_vec_pretty(&snap.config) {
                    Ok(v) => reply(StatusCode::OK, "application/json", v),
                    Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e.to_string()),
                }
            }
            (&Method::GET, "/stats") => {
                let body = serde_json::json!({
                    "active_flows": self.shared.active_flows(),
                    "audit_written": self.shared.audit.written(),
                    "audit_dropped": self.shared.audit.dropped(),
                });
                reply(StatusCode::OK, "application/json", body.to_string())
            }
            (&Method::GET, "/explain") => self.explain(&q),
            (&Method::GET, "/listeners") => {
                let bound = self
                    .bound
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                let listeners: Vec<serde_json::Value> = bound
                    .iter()
                    .map(|(name, (kind, addr))| {
                        serde_json::json!({"name": name, "kind": kind.as_str(), "address": addr.to_string()})
                    })
                    .collect();
                reply(
                    StatusCode::OK,
                    "application/json",
                    serde_json::json!({ "listeners": listeners }).to_string(),
                )
            }
            (&Method::GET, "/xds") => match self.xds.get() {
                Some(status) => reply(
                    StatusCode::OK,
                    "application/json",
                    serde_json::to_vec_pretty(&status.state()).unwrap_or_default(),
                ),
                None => reply(
                    StatusCode::NOT_FOUND,
                    "text/plain",
                    "this gateway takes no resources from a control server (no `xds:` in its configuration)\n",
                ),
            },
            (&Method::GET, "/logging") => match &self.log {
                Some(log) => reply(
                    StatusCode::OK,
                    "text/plain",
                    format!(
                        "log filter: {}\nchange it with POST /logging?level=FILTER\n",
                        log.current()
                    ),
                ),
                None => reply(
                    StatusCode::NOT_IMPLEMENTED,
                    "text/plain",
                    "logging is not controllable in this process\n",
                ),
            },
            (&Method::POST, "/logging") => match (&self.log, q.get("level")) {
                (Some(log), Some(level)) => match log.set(level) {
                    Ok(()) => reply(StatusCode::OK, "text/plain", format!("log filter set to {level}\n")),
                    Err(e) => reply(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
                },
                (None, _) => reply(
                    StatusCode::NOT_IMPLEMENTED,
                    "text/plain",
                    "logging is not controllable in this process\n",
                ),
                (_, None) => reply(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    "give ?level=FILTER, e.g. ?level=debug\n",
                ),
            },
            (_, "/logging") => {
                let mut r = reply(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "text/plain",
                    "GET /logging reads the log filter; POST /logging?level=FILTER changes it\n",
                );
                r.headers_mut().insert(
                    hyper::header::ALLOW,
                    hyper::header::HeaderValue::from_static("GET, POST"),
                );
                r
            }
            (_, "/reload") => {
                let mut r = reply(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "text/plain",
                    "POST /reload reads the configuration file again and applies it\n",
                );
                r.headers_mut()
                    .insert(hyper::header::ALLOW, hyper::header::HeaderValue::from_static("POST"));
                r
            }
            (_, "/ready" | "/metrics" | "/config_dump" | "/stats" | "/explain" | "/xds" | "/listeners") => {
                let mut r = reply(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "text/plain",
                    "this path is read-only: use GET\n",
                );
                r.headers_mut()
                    .insert(hyper::header::ALLOW, hyper::header::HeaderValue::from_static("GET"));
                r
            }
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found; try /ready /metrics /config_dump /explain /stats /logging /reload\n",
            ),
        }
    }

    /// `POST /reload`: the runtime reads its file again and applies it; the
    /// answer is the report as JSON, or why nothing changed.
    async fn reload(&self) -> Response<Full<Bytes>> {
        let Some(tx) = &self.reload else {
            return reply(
                StatusCode::NOT_IMPLEMENTED,
                "text/plain",
                "this process cannot reload\n",
            );
        };
        let (ack, outcome) = tokio::sync::oneshot::channel();
        if tx.send(ack).await.is_err() {
            return reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "shutting down\n");
        }
        match outcome.await {
            Ok(Ok(report)) => match serde_json::to_vec_pretty(&report) {
                Ok(v) => reply(StatusCode::OK, "application/json", v),
                Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e.to_string()),
            },
            Ok(Err(why)) => reply(
                StatusCode::UNPROCESSABLE_ENTITY,
                "text/plain",
                format!("{why}\nreload refused; the running configuration is unchanged\n"),
            ),
            Err(_) => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "shutting down\n"),
        }
    }

    fn explain(&self, q: &HashMap<String, String>) -> Response<Full<Bytes>> {
        let bad = |m: String| reply(StatusCode::BAD_REQUEST, "text/plain", m + "\n");
        let Some(src) = q.get("src").and_then(|s| s.parse::<IpAddr>().ok()) else {
            return bad("give src=IP".into());
        };
        let raw = q.get("sni").or(q.get("host")).or(q.get("name"));
        let name = match raw.map(|n| DomainName::parse(n)) {
            None => None,
            Some(Ok(n)) => Some(n),
            Some(Err(e)) => return bad(format!("invalid name: {e}")),
        };
        let dst = match q.get("dst").map(|d| d.parse::<IpAddr>()) {
            None => None,
            Some(Ok(ip)) => Some(ip),
            Some(Err(_)) => return bad("invalid dst".into()),
        };
        let protocol = match q.get("proto").map(|p| p.parse::<Protocol>()) {
            Some(Ok(p)) => p,
            Some(Err(e)) => return bad(e),
            None if q.contains_key("sni") => Protocol::Tls,
            None if q.contains_key("host") => Protocol::Http,
            None => Protocol::Tcp,
        };
        let port = q.get("port").and_then(|p| p.parse().ok()).unwrap_or(443);
        let snap = self.shared.snapshot.load();
        let x = snap.policy.explain(&FlowQuery {
            src,
            name: name.as_ref(),
            dst,
            protocol,
            port,
            identity: None,
        });
        match serde_json::to_vec_pretty(&x) {
            Ok(v) => reply(StatusCode::OK, "application/json", v),
            Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e.to_string()),
        }
    }
}

/// Serves the admin API on `listener` until `stop`.
pub fn spawn(admin: Admin, listener: TcpListener, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let (stream, _peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(_) => continue,
                },
                _ = stop.wait_for(|v| *v) => break,
            };
            let admin = admin.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let admin = admin.clone();
                    async move {
                        let r = if req.method() == Method::POST && req.uri().path() == "/reload" {
                            admin.reload().await
                        } else {
                            admin.route(&req)
                        };
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}
