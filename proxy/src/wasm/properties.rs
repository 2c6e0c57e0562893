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

use std::net::SocketAddr;
use std::sync::Arc;

use sluice_api::{DomainName, Protocol};

use super::state::HostState;
use crate::listener::{Decision, FlowContext, Snapshot};

/// What a flow's properties are computed from, when a plugin asks for
/// one: copied from the flow's context once (a few fields, most of them
/// without allocating), so a flow whose plugin reads two properties does
/// not pay for building twenty.
#[derive(Debug, Clone)]
pub struct FlowFacts {
    pub id: u64,
    pub src: SocketAddr,
    pub dst: Option<SocketAddr>,
    pub port: u16,
    pub sni: Option<String>,
    pub listener: Arc<str>,
    pub protocol: Protocol,
    pub name: Option<DomainName>,
    pub connect_target: Option<String>,
    pub alpn: Vec<String>,
    pub ech: bool,
    pub identity: Option<u32>,
    pub decision: Option<Decision>,
    pub snapshot: Arc<Snapshot>,
}

impl FlowFacts {
    pub fn of(ctx: &FlowContext) -> Self {
        Self {
            id: ctx.id,
            src: ctx.src,
            dst: ctx
                .original_dst
                .or_else(|| ctx.dst_ip.map(|ip| SocketAddr::new(ip, ctx.port))),
            port: ctx.port,
            sni: ctx.sni.clone(),
            listener: ctx.listener().clone(),
            protocol: ctx.protocol,
            name: ctx.name.clone(),
            connect_target: ctx.connect_target.clone(),
            alpn: ctx.alpn.clone(),
            ech: ctx.ech,
            identity: ctx.identity,
            decision: ctx.decision.clone(),
            snapshot: ctx.snapshot.clone(),
        }
    }

    /// The property at `path` (dotted), if the flow has it.
    pub fn get(&self, path: &str) -> Option<Vec<u8>> {
        let policy = &self.snapshot.policy;
        Some(match path {
            "source.address" => string(self.src.to_string()),
            "source.port" => int(i64::from(self.src.port())),
            "destination.address" => string(self.dst?.to_string()),
            "destination.port" => int(i64::from(self.port)),
            "connection.id" => uint(self.id),
            "connection.requested_server_name" => string(self.sni.as_ref()?),
            "sluice.listener" => string(&*self.listener),
            "sluice.protocol" => string(self.protocol.to_string()),
            "sluice.source.smartgroups" => {
                let mut groups = policy.smartgroups_of(self.src.ip().to_canonical());
                if let Some(id) = self.identity {
                    groups.push(policy.smartgroup_name(id));
                }
                string(groups.join(","))
            }
            "sluice.host" => string(self.name.as_ref()?.as_str()),
            "sluice.destination.webgroups" => string(policy.webgroups_of(self.name.as_ref()?).join(",")),
            "sluice.connect_target" => string(self.connect_target.as_ref()?),
            "sluice.tls.alpn" | "sluice.alpn" if !self.alpn.is_empty() => string(self.alpn.join(",")),
            "sluice.tls.ech" if self.protocol == Protocol::Tls => vec![u8::from(self.ech)],
            "sluice.verdict.action" => string(if self.decision.as_ref()?.allow { "allow" } else { "deny" }),
            "sluice.verdict.rule" => string(self.decision.as_ref()?.rule.as_str()),
            "sluice.verdict.reason" => string(self.decision.as_ref()?.reason.as_str()),
            _ => return None,
        })
    }
}

/// The value at `path` for the context host calls act on, if there is one.
pub fn get(s: &HostState, path: &[&str]) -> Option<Vec<u8>> {
    match path {
        ["plugin_name" | "plugin_vm_id"] => Some(s.plugin.as_bytes().to_vec()),
        ["plugin_root_id"] => Some(s.root_name.as_bytes().to_vec()),
        ["request" | "response", ..] => http(s, path),
        _ => {
            let key = path.join(".");
            let stream = s.stream()?;
            // What the plugin wrote (or a DNS query's properties) first,
            // then the flow's own.
            match stream.properties.get(&key) {
                Some(v) => Some(v.clone()),
                None => stream.facts.as_ref()?.get(&key),
            }
        }
    }
}

/// Envoy's request and response attributes, read from an HTTP context's
/// headers as they are now (a plugin's changes included).
fn http(s: &HostState, path: &[&str]) -> Option<Vec<u8>> {
    let parts = s.stream()?.http.as_ref()?;
    let field =
        |map: Option<&super::state::Headers>, name: &str| map?.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
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
