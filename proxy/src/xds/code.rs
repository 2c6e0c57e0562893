//! Plugin code from xDS, put on disk: inline modules written, remote ones
//! fetched and checked against their SHA-256, both kept by digest in a
//! directory of this gateway's, so a module is fetched once and the
//! loader checks the digest again when it reads the file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use sluice_api::proto::v1 as pb;

use super::ecds::{Code, MAX_REMOTE, hex_sha256};

/// Where modules from xDS are kept: beside the compiled-module cache, or
/// in the temporary directory when that is off.
pub fn modules_dir(setting: &sluice_api::PluginCache) -> PathBuf {
    let base = match setting {
        sluice_api::PluginCache::Dir(d) => Some(d.clone()),
        sluice_api::PluginCache::Default => std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|c| c.join("sluice")),
        sluice_api::PluginCache::Off => None,
    };
    base.map_or_else(
        || std::env::temp_dir().join(format!("sluice-xds-modules-{}", std::process::id())),
        |b| b.join("xds-modules"),
    )
}

/// Puts the code of every plugin on disk and fills in its `path`; the
/// error says which plugin and why (it is the NACK's message).
pub async fn materialize(plugins: &mut [pb::Plugin], code: &[(String, Code)], dir: &Path) -> Result<(), String> {
    for p in plugins.iter_mut() {
        let Some((_, c)) = code.iter().find(|(n, _)| *n == p.name) else {
            return Err(format!("plugin `{}`: no code", p.name));
        };
        p.path = match c {
            Code::File(f) => f.clone(),
            Code::Inline(bytes) => store(dir, &p.sha256, bytes).map_err(|e| format!("plugin `{}`: {e}", p.name))?,
            Code::Remote {
                uri,
                sha256,
                timeout_ms,
            } => {
                let file = dir.join(format!("{sha256}.wasm"));
                if std::fs::read(&file).is_ok_and(|b| hex_sha256(&b) == *sha256) {
                    file.display().to_string()
                } else {
                    let bytes = fetch(uri, Duration::from_millis(*timeout_ms))
                        .await
                        .map_err(|e| format!("plugin `{}`: fetching {uri}: {e}", p.name))?;
                    let got = hex_sha256(&bytes);
                    if got != *sha256 {
                        return Err(format!(
                            "plugin `{}`: the module at {uri} has SHA-256 {got}, not the {sha256} the resource requires; refused",
                            p.name
                        ));
                    }
                    store(dir, sha256, &bytes).map_err(|e| format!("plugin `{}`: {e}", p.name))?
                }
            }
        }
    }
    Ok(())
}

/// Writes `bytes` as `<sha256>.wasm` (through a temporary file and a
/// rename, so a reader never sees half a module).
fn store(dir: &Path, sha256: &str, bytes: &[u8]) -> Result<String, String> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let file = dir.join(format!("{sha256}.wasm"));
    let tmp = dir.join(format!(".{sha256}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, &file))
        .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
    Ok(file.display().to_string())
}

/// GETs a module over plain HTTP/1.1, at most [`MAX_REMOTE`] bytes.
async fn fetch(uri: &str, timeout: Duration) -> Result<Vec<u8>, String> {
    let parsed: hyper::Uri = uri.parse().map_err(|e| format!("not a URI: {e}"))?;
    let host = parsed.host().ok_or("no host")?.to_owned();
    let port = parsed.port_u16().unwrap_or(80);
    let path = parsed.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let work = async {
        let stream = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, format!("{host}:{port}"))
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("status {}", resp.status()));
        }
        let body = Limited::new(resp.into_body(), MAX_REMOTE)
            .collect()
            .await
            .map_err(|e| format!("reading the body: {e}"))?;
        Ok(body.to_bytes().to_vec())
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))?
}
