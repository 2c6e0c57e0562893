//! `http-auth`: an HTTP plugin written against the plain `proxy-wasm`
//! crate, in the style of that SDK's own examples (`http_headers`,
//! `http_config`, `http_auth_random`, `hello_world`'s tick), and nothing
//! Sluice-specific: the same module runs in Envoy. It checks every
//! request's API key with an authorisation service before letting it on.
//!
//! Configuration (JSON):
//!
//! ```json
//! {"upstream": "auth", "authority": "auth.internal", "key_header": "x-api-key",
//!  "refresh_ms": 1000}
//! ```
//!
//! - Every `refresh_ms` the root context fetches `GET /denylist` from the
//!   `upstream` (a line per host) and keeps it in shared data.
//! - A request to a host on the denylist is answered `403` at once.
//! - A request without the `key_header` is answered `401`.
//! - Otherwise the request is paused while `GET /check` (with the key) goes
//!   to the `upstream`: a `200` lets the request on with `x-auth-user` set
//!   to the answer's body; anything else (or no answer) is answered `403`.
//! - Every response through the plugin gets `x-auth: checked`.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;
use std::rc::Rc;
use std::time::Duration;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(AuthRoot { config: Rc::new(Config::default()) })
    });
}}

/// Where shared data keeps the denylist, for every worker's instance.
const DENYLIST: &str = "http-auth.denylist";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    upstream: String,
    authority: String,
    #[serde(default = "default_key_header")]
    key_header: String,
    #[serde(default)]
    refresh_ms: u64,
}

fn default_key_header() -> String {
    "x-api-key".to_owned()
}

impl Default for Config {
    fn default() -> Self {
        Config {
            upstream: String::new(),
            authority: String::new(),
            key_header: default_key_header(),
            refresh_ms: 0,
        }
    }
}

struct AuthRoot {
    config: Rc<Config>,
}

impl Context for AuthRoot {
    /// The denylist fetched on a tick.
    fn on_http_call_response(&mut self, _token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        if self.get_http_call_response_header(":status").as_deref() != Some("200") {
            proxy_wasm::hostcalls::log(LogLevel::Warn, "denylist fetch failed; keeping the last one").ok();
            return;
        }
        let body = self.get_http_call_response_body(0, body_size).unwrap_or_default();
        if let Err(e) = self.set_shared_data(DENYLIST, Some(&body), None) {
            proxy_wasm::hostcalls::log(LogLevel::Warn, &format!("cannot keep the denylist: {e:?}")).ok();
        }
    }
}

impl RootContext for AuthRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(bytes) = self.get_plugin_configuration() else {
            proxy_wasm::hostcalls::log(LogLevel::Error, "http-auth needs a configuration").ok();
            return false;
        };
        match serde_json::from_slice::<Config>(&bytes) {
            Ok(c) if !c.upstream.is_empty() && !c.authority.is_empty() => {
                if c.refresh_ms > 0 {
                    self.set_tick_period(Duration::from_millis(c.refresh_ms));
                }
                self.config = Rc::new(c);
                true
            }
            Ok(_) => {
                proxy_wasm::hostcalls::log(LogLevel::Error, "http-auth: upstream and authority must be set").ok();
                false
            }
            Err(e) => {
                proxy_wasm::hostcalls::log(LogLevel::Error, &format!("http-auth: bad configuration: {e}")).ok();
                false
            }
        }
    }

    fn on_tick(&mut self) {
        let c = &self.config;
        let call = self.dispatch_http_call(
            &c.upstream,
            vec![(":method", "GET"), (":path", "/denylist"), (":authority", &c.authority)],
            None,
            vec![],
            Duration::from_secs(5),
        );
        if let Err(e) = call {
            proxy_wasm::hostcalls::log(LogLevel::Warn, &format!("cannot fetch the denylist: {e:?}")).ok();
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(AuthRequest {
            config: self.config.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct AuthRequest {
    config: Rc<Config>,
}

impl AuthRequest {
    fn refuse(&self, status: u32, why: &str) {
        self.send_http_response(
            status,
            vec![("x-denied-by", "http-auth")],
            Some(format!("{why}\n").as_bytes()),
        );
    }

    fn denylisted(&self, host: &str) -> bool {
        let (list, _) = self.get_shared_data(DENYLIST);
        let host = host.split(':').next().unwrap_or(host);
        list.map(|l| String::from_utf8_lossy(&l).lines().any(|h| h.trim() == host))
            .unwrap_or(false)
    }
}

impl Context for AuthRequest {
    /// The answer to `/check`.
    fn on_http_call_response(&mut self, _token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        if self.get_http_call_response_header(":status").as_deref() == Some("200") {
            let user = self.get_http_call_response_body(0, body_size).unwrap_or_default();
            let user = String::from_utf8_lossy(&user).trim().to_owned();
            self.set_http_request_header("x-auth-user", Some(&user));
            self.resume_http_request();
        } else {
            self.refuse(403, "key refused");
        }
    }
}

impl HttpContext for AuthRequest {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let host = self.get_http_request_header(":authority").unwrap_or_default();
        if self.denylisted(&host) {
            self.refuse(403, "host on the denylist");
            return Action::Pause;
        }
        let Some(key) = self.get_http_request_header(&self.config.key_header) else {
            self.refuse(401, "no API key");
            return Action::Pause;
        };
        let c = &self.config;
        let call = self.dispatch_http_call(
            &c.upstream,
            vec![
                (":method", "GET"),
                (":path", "/check"),
                (":authority", &c.authority),
                ("x-api-key", &key),
            ],
            None,
            vec![],
            Duration::from_secs(5),
        );
        match call {
            Ok(_) => Action::Pause,
            Err(e) => {
                proxy_wasm::hostcalls::log(LogLevel::Warn, &format!("cannot reach the auth service: {e:?}")).ok();
                self.refuse(403, "auth service unreachable");
                Action::Pause
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.set_http_response_header("x-auth", Some("checked"));
        Action::Continue
    }

    fn on_log(&mut self) {
        let status = self.get_http_response_header(":status").unwrap_or_default();
        proxy_wasm::hostcalls::log(LogLevel::Info, &format!("request done: {status}")).ok();
    }
}
