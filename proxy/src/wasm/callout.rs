//! A plugin's HTTP calls (`proxy_http_call`), made by the host: HTTP/1.1,
//! plain or over TLS (an `https://` upstream, whose certificate is checked
//! for its host against `runtime.plugin_ca` or the built-in Mozilla
//! roots), to one of the upstreams the plugin's declaration names, each on
//! a connection of its own, bounded in time and in the size of the
//! answer. The answer (or the failure) goes to the guest's
//! `proxy_on_http_call_response` (see `Plugin::dispatch`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::state::{Callout, CalloutResponse, Headers};
use crate::listener::Buffered;

/// The longest a call may take, whatever the guest asked (a timeout of 0
/// means "no timeout" in the ABI; here it means this).
pub const MAX_CALL_TIME: Duration = Duration::from_secs(60);

/// The largest answer body a guest is handed.
pub const MAX_ANSWER_BODY: usize = 1 << 20;

/// An upstream a plugin may call: where it is and how it is reached.
#[derive(Clone)]
pub struct Upstream {
    /// The name the guest calls it by.
    pub name: String,
    /// `host:port`, as dialled.
    pub address: String,
    /// For an `https://` upstream: the name its certificate must carry,
    /// and the TLS settings.
    tls: Option<(ServerName<'static>, Arc<rustls::ClientConfig>)>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("address", &self.address)
            .field("tls", &self.tls.as_ref().map(|(n, _)| n))
            .finish()
    }
}

impl PartialEq for Upstream {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.address == other.address
            && match (&self.tls, &other.tls) {
                (None, None) => true,
                (Some((a, x)), Some((b, y))) => a == b && Arc::ptr_eq(x, y),
                _ => false,
            }
    }
}

impl Eq for Upstream {}

/// Why a plugin's upstreams cannot be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    #[error("upstreams.{name}: `{host}` is not a name or address a certificate can be checked for")]
    ServerName { name: String, host: String },
    #[error("runtime.plugin_ca: {0}")]
    Ca(String),
}

impl Upstream {
    /// The upstreams a plugin declares (name → `host:port`,
    /// `http://host:port` or `https://host:port`, checked when the
    /// configuration was read). `ca_pem` is `runtime.plugin_ca`'s content:
    /// the CAs `https://` upstreams must chain to (else the built-in
    /// Mozilla roots).
    pub fn declared(declared: &[(String, String)], ca_pem: Option<&[u8]>) -> Result<Vec<Upstream>, UpstreamError> {
        let mut tls_config = None;
        let mut out = Vec::with_capacity(declared.len());
        for (name, value) in declared {
            let (tls, address) = match value.strip_prefix("https://") {
                Some(rest) => (true, rest),
                None => (false, value.strip_prefix("http://").unwrap_or(value)),
            };
            let tls = if tls {
                let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let server_name = ServerName::try_from(host.to_owned()).map_err(|_| UpstreamError::ServerName {
                    name: name.clone(),
                    host: host.to_owned(),
                })?;
                let config = match &tls_config {
                    Some(c) => Arc::clone(c),
                    None => {
                        let c = client_config(ca_pem)?;
                        tls_config = Some(Arc::clone(&c));
                        c
                    }
                };
                Some((server_name, config))
            } else {
                None
            };
            out.push(Upstream {
                name: name.clone(),
                address: address.to_owned(),
                tls,
            });
        }
        Ok(out)
    }
}

/// TLS settings for calls out: HTTP/1.1, the certificate checked against
/// `ca_pem`'s CAs or the built-in roots.
fn client_config(ca_pem: Option<&[u8]>) -> Result<Arc<rustls::ClientConfig>, UpstreamError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| UpstreamError::Ca(format!("not a PEM file of certificates: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| UpstreamError::Ca(format!("a certificate that cannot be a root: {e}")))?;
            }
            if roots.is_empty() {
                return Err(UpstreamError::Ca("no certificate in the file".into()));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| UpstreamError::Ca(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Why a call failed (the guest is told only that it did: no headers).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CalloutError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot connect to {address}: {source}")]
    Connect { address: String, source: std::io::Error },
    #[error("TLS with {address} failed: {source}")]
    Tls { address: String, source: std::io::Error },
    #[error("the request is not valid HTTP: {0}")]
    Request(String),
    #[error("the exchange failed: {0}")]
    Exchange(#[from] hyper::Error),
    #[error("the answer's body is above {MAX_ANSWER_BODY} bytes")]
    TooLarge,
}

/// Makes `call` and reads its answer.
pub async fn perform(call: &Callout) -> Result<CalloutResponse, CalloutError> {
    let limit = if call.timeout.is_zero() {
        MAX_CALL_TIME
    } else {
        call.timeout.min(MAX_CALL_TIME)
    };
    tokio::time::timeout(limit, exchange(call))
        .await
        .map_err(|_| CalloutError::Timeout(limit))?
}

async fn exchange(call: &Callout) -> Result<CalloutResponse, CalloutError> {
    let request = build(call)?;
    let to = &call.to;
    let stream = TcpStream::connect(&to.address)
        .await
        .map_err(|source| CalloutError::Connect {
            address: to.address.clone(),
            source,
        })?;
    let _ = stream.set_nodelay(true);
    match &to.tls {
        None => send(stream, request).await,
        Some((server_name, config)) => {
            let stream = tokio_rustls::TlsConnector::from(Arc::clone(config))
                .connect(server_name.clone(), stream)
                .await
                .map_err(|source| CalloutError::Tls {
                    address: to.address.clone(),
                    source,
                })?;
            send(stream, request).await
        }
    }
}

/// Sends `request` on `io` and reads the answer.
async fn send<I>(io: I, request: Request<Buffered>) -> Result<CalloutResponse, CalloutError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let response = sender.send_request(request).await?;
    let (parts, body) = response.into_parts();
    let mut headers: Headers = vec![(":status".to_owned(), parts.status.as_str().as_bytes().to_vec())];
    headers.extend(
        parts
            .headers
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec())),
    );
    let collected =
        Limited::new(body, MAX_ANSWER_BODY)
            .collect()
            .await
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(e) => CalloutError::Exchange(*e),
                Err(_) => CalloutError::TooLarge,
            })?;
    let trailers = collected
        .trailers()
        .map(|t| {
            t.iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
                .collect()
        })
        .unwrap_or_default();
    Ok(CalloutResponse {
        headers,
        body: collected.to_bytes().to_vec(),
        trailers,
    })
}

/// The guest's headers as a request: `:method`, `:path`, `:authority` (as
/// `Host`) and the rest as they are; a body gets its length.
fn build(call: &Callout) -> Result<Request<Buffered>, CalloutError> {
    let field = |name: &str| {
        call.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
            .unwrap_or_default()
    };
    let bad = |e: &dyn std::fmt::Display| CalloutError::Request(e.to_string());
    let mut builder = Request::builder()
        .method(hyper::Method::from_bytes(field(":method")).map_err(|e| bad(&e))?)
        .uri(hyper::Uri::try_from(field(":path")).map_err(|e| bad(&e))?)
        .header(hyper::header::HOST, field(":authority"));
    for (k, v) in call.headers.iter().filter(|(k, _)| !k.starts_with(':')) {
        if k.eq_ignore_ascii_case("host") || k.eq_ignore_ascii_case("content-length") {
            continue;
        }
        builder = builder.header(k.as_str(), v.as_slice());
    }
    if !call.body.is_empty() && call.trailers.is_empty() {
        builder = builder.header(hyper::header::CONTENT_LENGTH, call.body.len());
    }
    let mut trailers = hyper::HeaderMap::new();
    for (k, v) in &call.trailers {
        let name = hyper::header::HeaderName::from_bytes(k.as_bytes()).map_err(|e| bad(&e))?;
        let value = hyper::header::HeaderValue::from_bytes(v).map_err(|e| bad(&e))?;
        trailers.append(name, value);
    }
    builder
        .body(Buffered::new(Bytes::from(call.body.clone()), trailers))
        .map_err(|e| bad(&e))
}
