//! Properties a plugin reads and writes (`proxy_get_property`,
//! `proxy_set_property`), with Envoy's names and encodings where Envoy has
//! the attribute, so a plugin written for Envoy reads them unchanged:
//! strings as raw bytes, integers as 8-byte little-endian, addresses as
//! `ip:port`.
//!
//! | path | type | value |
//! |---|---|---|
//! | `plugin_name`, `plugin_vm_id` | string | the plugin's name |
//! | `plugin_root_id` | string | its `root_id` (the name unless set) |
//! | `source.address`, `destination.address` | string | `ip:port` |
//! | `source.port`, `destination.port` | int | |
//! | `connection.id` | uint | the flow id of the audit record |
//! | `connection.requested_server_name` | string | the SNI |
//! | `sluice.listener` | string | the listener's name |
//! | `sluice.protocol` | string | `tls`, `http`, `tcp`, `dns` |
//! | `sluice.host` | string | the destination name (SNI, Host or CONNECT target) |
//! | `sluice.connect_target` | string | explicit proxy: `host:port` asked for |
//! | `sluice.alpn` | string | the ALPN protocols offered, comma-separated |
//! | `sluice.source.smartgroups` | string | the source's SmartGroups (and an authenticated user's), comma-separated |
//! | `sluice.destination.webgroups` | string | the destination name's WebGroups, comma-separated |
//! | `sluice.tls.alpn` | string | the ALPN protocols offered, comma-separated |
//! | `sluice.tls.ech` | bool (1 byte) | the ClientHello offered ECH (TLS flows) |
//! | `sluice.verdict.action`, `.rule`, `.reason` | string | the decision so far |
//! | `request.path`, `.url_path`, `.query`, `.host`, `.method`, `.scheme`, `.protocol` | string | HTTP contexts: the request as it is now |
//! | `request.headers.<name>`, `response.headers.<name>` | string | HTTP contexts: a header |
//! | `response.code` | int | HTTP contexts, once the response arrived |
//!
//! A plugin gives its own verdict by writing `sluice.verdict.action`
//! (`allow` or `deny`, with an optional `sluice.verdict.reason`), and notes
//! for the audit record under `sluice.audit.<key>`. Anything else it
//! writes can be read back by it for the rest of the flow.

use super::state::HostState;

/// The value at `path` for the context host calls act on, if there is one.
pub fn get(s: &HostState, path: &[&str]) -> Option<Vec<u8>> {
    match path {
        ["plugin_name" | "plugin_vm_id"] => Some(s.plugin.as_bytes().to_vec()),
        ["plugin_root_id"] => Some(s.root_name.as_bytes().to_vec()),
        ["request" | "response", ..] => http(s, path),
        _ => {
            let key = path.join(".");
            s.stream()?.properties.get(&key).cloned()
        }
    }
}

/// Envoy's request and response attributes, read from an HTTP context's
/// headers as they are now (a plugin's changes included).
fn http(s: &HostState, path: &[&str]) -> Option<Vec<u8>> {
    let parts = s.stream()?.http.as_ref()?;
    let field = |map: Option<&super::state::Headers>, name: &str| {
        map?.iter()
            .find(|(k, _)| k.as_slice() == name.as_bytes())
            .map(|(_, v)| v.clone())
    };
    let req = parts.request_headers.as_ref();
    let resp = parts.response_headers.as_ref();
    let path_field = || field(req, ":path");
    match path {
        ["request", "path"] => path_field(),
        ["request", "url_path"] => path_field().map(|p| p.split(|&b| b == b'?').next().unwrap_or_default().to_vec()),
        ["request", "query"] => path_field().map(|p| {
            p.iter()
                .position(|&b| b == b'?')
                .map_or_else(Vec::new, |i| p[i + 1..].to_vec())
        }),
        ["request", "host"] => field(req, ":authority"),
        ["request", "method"] => field(req, ":method"),
        ["request", "scheme"] => field(req, ":scheme"),
        ["request", "protocol"] => req.map(|_| b"HTTP/1.1".to_vec()),
        ["request", "headers", name] => field(req, &name.to_ascii_lowercase()),
        ["response", "code"] => field(resp, ":status")
            .and_then(|v| std::str::from_utf8(&v).ok()?.parse::<i64>().ok())
            .map(int),
        ["response", "headers", name] => field(resp, &name.to_ascii_lowercase()),
        _ => None,
    }
}

/// Stores `value` at `path` for the stream host calls act on (a root
/// context has no stream: the write is dropped, and reads back as absent).
pub fn set(s: &mut HostState, path: &[&str], value: Vec<u8>) {
    let key = path.join(".");
    if let Some(stream) = s.stream_mut() {
        // The verdict properties start as the decision so far: what the
        // plugin writes to them is kept apart, so a write is told from the
        // value it was given.
        let written = match key.as_str() {
            "sluice.verdict.action" => Some(super::filter::WRITTEN_VERDICT),
            "sluice.verdict.reason" => Some(super::filter::WRITTEN_REASON),
            _ => None,
        };
        if let Some(w) = written {
            stream.properties.insert(w.to_owned(), value.clone());
        }
        stream.properties.insert(key, value);
    }
}

/// A string property's bytes.
pub fn string(v: impl AsRef<str>) -> Vec<u8> {
    v.as_ref().as_bytes().to_vec()
}

/// An integer property's bytes (8-byte little-endian).
pub fn int(v: i64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// An unsigned integer property's bytes (8-byte little-endian).
pub fn uint(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}
