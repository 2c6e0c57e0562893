//! A plugin's HTTP calls (`proxy_http_call`), made by the host: plain
//! HTTP/1.1 to one of the upstreams the plugin's declaration names, each
//! on a connection of its own, bounded in time and in the size of the
//! answer. The answer (or the failure) goes to the guest's
//! `proxy_on_http_call_response` (see `Plugin::dispatch`).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::state::{Callout, CalloutResponse, Headers};
use crate::listener::Buffered;

/// The longest a call may take, whatever the guest asked (a timeout of 0
/// means "no timeout" in the ABI; here it means this).
pub const MAX_CALL_TIME: Duration = Duration::from_secs(60);

/// The largest answer body a guest is handed.
pub const MAX_ANSWER_BODY: usize = 1 << 20;

/// Why a call failed (the guest is told only that it did: no headers).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CalloutError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot connect to {address}: {source}")]
    Connect { address: String, source: std::io::Error },
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
    let stream = TcpStream::connect(&call.address)
        .await
        .map_err(|source| CalloutError::Connect {
            address: call.address.clone(),
            source,
        })?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
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
