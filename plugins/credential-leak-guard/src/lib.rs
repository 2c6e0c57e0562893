//! `credential-leak-guard`: on plain HTTP, refuse requests that carry
//! cloud credentials or API keys where they should not go. An HTTP plugin
//! (`kind: http`) written with the plain `proxy-wasm` crate.
//!
//! Configuration (JSON):
//!
//! ```json
//! {"bearer_hosts": ["api.internal.example"]}
//! ```
//!
//! A request is answered `403` (and not forwarded) when its path or any
//! header carries an AWS access key id (`AKIA…`/`ASIA…`, 20 characters) or
//! a GitHub token (`ghp_`, `gho_`, `ghu_`, `ghs_`, `ghr_` and 36
//! characters), or when it carries `Authorization: Bearer …` to a host not
//! in `bearer_hosts`. The record notes what was found (`leak`), never the
//! secret itself.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { cfg: Rc::new(Config::default()) }) });
}}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    bearer_hosts: Vec<String>,
}

struct Root {
    cfg: Rc<Config>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        if raw.is_empty() {
            return true;
        }
        match serde_json::from_slice::<Config>(&raw) {
            Ok(cfg) => {
                self.cfg = Rc::new(cfg);
                true
            }
            Err(e) => {
                proxy_wasm::hostcalls::log(LogLevel::Error, &format!("configuration refused: {e}")).ok();
                false
            }
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request { cfg: self.cfg.clone() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Request {
    cfg: Rc<Config>,
}

/// Whether `text` holds `prefix` followed by `len` characters of `class`.
fn token(text: &[u8], prefix: &[u8], len: usize, class: fn(u8) -> bool) -> bool {
    text.windows(prefix.len() + len)
        .any(|w| w.starts_with(prefix) && w[prefix.len()..].iter().all(|&b| class(b)))
}

/// What kind of credential `text` carries, if any.
fn credential(text: &[u8]) -> Option<&'static str> {
    let upper_digit = |b: u8| b.is_ascii_uppercase() || b.is_ascii_digit();
    if token(text, b"AKIA", 16, upper_digit) || token(text, b"ASIA", 16, upper_digit) {
        return Some("aws-access-key-id");
    }
    for prefix in [&b"ghp_"[..], b"gho_", b"ghu_", b"ghs_", b"ghr_"] {
        if token(text, prefix, 36, |b| b.is_ascii_alphanumeric()) {
            return Some("github-token");
        }
    }
    None
}

impl Request {
    fn refuse(&self, leak: &str) -> Action {
        self.set_property(vec!["sluice", "audit", "leak"], Some(leak.as_bytes()));
        self.send_http_response(
            403,
            vec![("x-sluice-plugin", "credential-leak-guard")],
            Some(format!("credential in request: {leak}\n").as_bytes()),
        );
        Action::Pause
    }
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let headers = self.get_http_request_headers_bytes();
        for (_, value) in &headers {
            if let Some(leak) = credential(value) {
                return self.refuse(leak);
            }
        }
        let host = headers
            .iter()
            .find(|(k, _)| k == ":authority")
            .map(|(_, v)| String::from_utf8_lossy(v).to_ascii_lowercase())
            .unwrap_or_default();
        let host = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h).to_owned();
        let bearer = headers
            .iter()
            .any(|(k, v)| k == "authorization" && v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer "));
        if bearer && !self.cfg.bearer_hosts.iter().any(|h| h.eq_ignore_ascii_case(&host)) {
            return self.refuse("bearer-token-to-unlisted-host");
        }
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_credentials_and_only_credentials() {
        assert_eq!(
            credential(b"/upload?key=AKIAIOSFODNN7EXAMPLE"),
            Some("aws-access-key-id")
        );
        assert_eq!(
            credential(b"token ghp_abcdefghijklmnopqrstuvwxyz0123456789"),
            Some("github-token")
        );
        assert_eq!(credential(b"AKIA-not-a-key"), None);
        assert_eq!(credential(b"/index.html"), None);
    }
}
