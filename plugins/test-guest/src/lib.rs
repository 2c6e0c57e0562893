//! A guest for the host's tests, in the manner of wasmtime's test programs:
//! one module whose plugin configuration (lines of `key=value`) chooses
//! what it does, so each host behaviour has a guest that exercises it.
//!
//! | key | effect |
//! |---|---|
//! | `configure=false` | `on_configure` returns false |
//! | `start=trap` | `on_vm_start` panics (a trap) |
//! | `deny_sni=NAME` | a connection whose SNI is NAME is closed |
//! | `verdict=allow` or `deny` | writes `sluice.verdict` on every connection |
//! | `annotate=KEY:VALUE` | writes `sluice.annotation.KEY` |
//! | `connection=trap`, `spin`, `grow` | on a new connection: panic, loop forever, or allocate until memory runs out |
//! | `trap_sni=NAME` | panics on a connection whose SNI is NAME |
//! | `done_later=1` | a connection's `on_done` returns false; the next `on_tick` calls `proxy_done` for it; `on_log` adds one to shared-data `logged` |
//! | `count=KEY` | adds one to shared-data KEY (with CAS) and annotates `count` with the new value |
//! | `env=NAME` | annotates `env` with environment variable NAME (or `unset`) |
//! | `print=TEXT` | prints TEXT to stdout and to stderr on each connection |
//! | `echo_props=1` | annotates each property the host offers a connection |
//! | `data_deny=TEXT` | closes a connection whose downstream bytes contain TEXT |
//! | `rewrite=1` | changes the downstream bytes it is shown |
//! | `metric=NAME` | defines counter NAME and adds one per connection |
//! | `http=1` | an HTTP plugin: with `deny_header=NAME` it answers 451 to a request carrying header NAME; with `add_header=NAME:VALUE` it adds a request header; it annotates `authority` with `:authority` |
//! | `queue=NAME` | registers queue NAME; each connection enqueues an item; `on_queue_ready` dequeues them and adds their number to shared-data `dequeued` |
//! | `tick=MS` | asks to be ticked every MS milliseconds; each tick adds one to shared-data `ticks` |
//! | `verdict_action=allow` or `deny` | writes `sluice.verdict.action`, and `sluice.verdict.reason` `the test guest said so`, on every connection |
//! | `audit=KEY:VALUE` | writes `sluice.audit.KEY` |
//! | `callout=UPSTREAM` | on a new connection: pauses it and asks `UPSTREAM` for `GET /check`; a `200` resumes the connection (annotated `callout`: the body), anything else closes it |
//! | `body=1` (HTTP) | upper-cases a request body it is shown whole and closes a response body with ` [seen]`; a request body containing `forbidden` is answered 403 |
//! | `stream=1` (HTTP) | lets each body piece go as it is shown, upper-casing request pieces; annotates `request_pieces` and `response_pieces` with how many callbacks each body took; a request piece containing `forbidden` is answered 403 |
//! | `response_header=NAME:VALUE` (HTTP) | adds a response header; `drop_response_header=NAME` removes one |
//! | `props=1` (HTTP) | annotates `url_path`, `query`, `method` (request properties) and `code` (`response.code`) |
//! | `trailers=1` (HTTP) | annotates `request_trailers` with the number of request trailers |

use proxy_wasm::traits::{Context, HttpContext, RootContext, StreamContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { cfg: Rc::new(Vec::new()) }) });
}}

type Config = Vec<(String, String)>;

struct Root {
    cfg: Rc<Config>,
}

/// Adds `n` to the decimal count in shared-data `key` (with CAS).
fn add_shared(ctx: &dyn Context, key: &str, n: u64) -> u64 {
    loop {
        let (bytes, cas) = ctx.get_shared_data(key);
        let now = bytes
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
            + n;
        if ctx.set_shared_data(key, Some(now.to_string().as_bytes()), cas).is_ok() {
            return now;
        }
    }
}

fn value<'a>(cfg: &'a Config, key: &str) -> Option<&'a str> {
    cfg.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

impl Context for Root {}

impl RootContext for Root {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        let text = String::from_utf8_lossy(&raw).into_owned();
        let cfg: Config = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        if value(&cfg, "start") == Some("trap") {
            panic!("asked to trap while configuring");
        }
        let ok = value(&cfg, "configure") != Some("false");
        if let Some(name) = value(&cfg, "queue") {
            self.register_shared_queue(name);
        }
        if let Some(ms) = value(&cfg, "tick").and_then(|v| v.parse::<u64>().ok()) {
            self.set_tick_period(std::time::Duration::from_millis(ms));
        }
        self.cfg = Rc::new(cfg);
        proxy_wasm::hostcalls::log(LogLevel::Info, "configured").ok();
        ok
    }

    fn on_tick(&mut self) {
        // Connections whose `on_done` asked to finish later finish now.
        for id in DONE_LATER.with(|p| std::mem::take(&mut *p.borrow_mut())) {
            if proxy_wasm::hostcalls::set_effective_context(id).is_ok() {
                let _ = proxy_wasm::hostcalls::done();
            }
        }
        loop {
            let (bytes, cas) = self.get_shared_data("ticks");
            let n = bytes
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0)
                + 1;
            if self
                .set_shared_data("ticks", Some(n.to_string().as_bytes()), cas)
                .is_ok()
            {
                break;
            }
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        let mut n = 0u64;
        while let Ok(Some(_)) = self.dequeue_shared_queue(queue_id) {
            n += 1;
        }
        add_shared(self, "dequeued", n);
    }

    fn create_stream_context(&self, id: u32) -> Option<Box<dyn StreamContext>> {
        Some(Box::new(Stream {
            cfg: self.cfg.clone(),
            id,
        }))
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Http {
            cfg: self.cfg.clone(),
            pieces: [0, 0],
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        if value(&self.cfg, "http") == Some("1") {
            Some(ContextType::HttpContext)
        } else {
            Some(ContextType::StreamContext)
        }
    }
}

struct Stream {
    cfg: Rc<Config>,
    id: u32,
}

thread_local! {
    /// Connections waiting for `on_tick` to call `proxy_done` for them.
    static DONE_LATER: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Stream {
    fn annotate(&self, key: &str, value: &str) {
        self.set_property(vec!["sluice", "annotation", key], Some(value.as_bytes()));
    }
}

impl Context for Stream {
    fn on_done(&mut self) -> bool {
        if value(&self.cfg, "done_later") == Some("1") {
            DONE_LATER.with(|p| p.borrow_mut().push(self.id));
            return false;
        }
        true
    }

    fn on_http_call_response(&mut self, _token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        if self.get_http_call_response_header(":status").as_deref() == Some("200") {
            let body = self.get_http_call_response_body(0, body_size).unwrap_or_default();
            self.annotate("callout", &String::from_utf8_lossy(&body));
            self.resume_downstream();
        } else {
            self.close_downstream();
        }
    }
}

impl StreamContext for Stream {
    fn on_log(&mut self) {
        if value(&self.cfg, "done_later") == Some("1") {
            add_shared(self, "logged", 1);
        }
    }

    fn on_new_connection(&mut self) -> Action {
        let cfg = self.cfg.clone();
        match value(&cfg, "connection") {
            Some("trap") => panic!("asked to trap on a new connection"),
            Some("spin") => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            Some("grow") => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            _ => {}
        }
        if let Some(name) = value(&cfg, "trap_sni") {
            let sni = self.get_property(vec!["connection", "requested_server_name"]);
            if sni.as_deref() == Some(name.as_bytes()) {
                panic!("asked to trap on {name}");
            }
        }
        if let Some(text) = value(&cfg, "print") {
            println!("{text}");
            eprintln!("{text}");
        }
        if let Some(kv) = value(&cfg, "annotate") {
            if let Some((k, v)) = kv.split_once(':') {
                self.annotate(k, v);
            }
        }
        if let Some(name) = value(&cfg, "env") {
            let v = std::env::var(name).unwrap_or_else(|_| "unset".to_owned());
            self.annotate("env", &v);
        }
        if let Some(key) = value(&cfg, "count") {
            let n = loop {
                let (bytes, cas) = self.get_shared_data(key);
                let n = bytes
                    .and_then(|b| String::from_utf8(b).ok())
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0)
                    + 1;
                if self.set_shared_data(key, Some(n.to_string().as_bytes()), cas).is_ok() {
                    break n;
                }
            };
            self.annotate("count", &n.to_string());
        }
        if value(&cfg, "echo_props") == Some("1") {
            for path in [
                "source.address",
                "destination.port",
                "connection.requested_server_name",
                "sluice.listener",
                "sluice.protocol",
                "sluice.host",
                "sluice.verdict.action",
                "sluice.verdict.rule",
                "plugin_name",
            ] {
                let segments: Vec<&str> = path.split('.').collect();
                let shown = match self.get_property(segments) {
                    Some(v) if path.ends_with("port") && v.len() == 8 => {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&v);
                        i64::from_le_bytes(b).to_string()
                    }
                    Some(v) => String::from_utf8_lossy(&v).into_owned(),
                    None => "absent".to_owned(),
                };
                self.annotate(path, &shown);
            }
        }
        if let Some(name) = value(&cfg, "queue") {
            if let Some(id) = self.resolve_shared_queue("", name) {
                let _ = self.enqueue_shared_queue(id, Some(b"item"));
            }
        }
        if let Some(name) = value(&cfg, "metric") {
            if let Ok(id) = proxy_wasm::hostcalls::define_metric(proxy_wasm::types::MetricType::Counter, name) {
                let _ = proxy_wasm::hostcalls::increment_metric(id, 1);
            }
        }
        if let Some(v) = value(&cfg, "verdict") {
            self.set_property(vec!["sluice", "verdict"], Some(v.as_bytes()));
        }
        if let Some(v) = value(&cfg, "verdict_action") {
            self.set_property(vec!["sluice", "verdict", "action"], Some(v.as_bytes()));
            self.set_property(vec!["sluice", "verdict", "reason"], Some(b"the test guest said so"));
        }
        if let Some((k, v)) = value(&cfg, "audit").and_then(|kv| kv.split_once(':')) {
            self.set_property(vec!["sluice", "audit", k], Some(v.as_bytes()));
        }
        if let Some(upstream) = value(&cfg, "callout") {
            let asked = self.dispatch_http_call(
                upstream,
                vec![
                    (":method", "GET"),
                    (":path", "/check"),
                    (":authority", "auth"),
                    ("x-api-key", "good"),
                ],
                None,
                vec![],
                std::time::Duration::from_secs(5),
            );
            if asked.is_ok() {
                return Action::Pause;
            }
            self.close_downstream();
        }
        if let Some(name) = value(&cfg, "deny_sni") {
            let sni = self.get_property(vec!["connection", "requested_server_name"]);
            if sni.as_deref() == Some(name.as_bytes()) {
                self.close_downstream();
            }
        }
        Action::Continue
    }

    fn on_downstream_data(&mut self, size: usize, _end: bool) -> Action {
        let data = self.get_downstream_data(0, size).unwrap_or_default();
        if let Some(text) = value(&self.cfg, "data_deny") {
            if data.windows(text.len().max(1)).any(|w| w == text.as_bytes()) {
                self.close_downstream();
            }
        }
        if value(&self.cfg, "rewrite") == Some("1") {
            self.set_downstream_data(0, size, b"rewritten");
        }
        Action::Continue
    }
}

struct Http {
    cfg: Rc<Config>,
    /// Body callbacks so far: request, response (`stream=1`).
    pieces: [usize; 2],
}

impl Http {
    /// `stream=1`: counts a body callback, and at the body's end notes
    /// how many there were.
    fn count_piece(&mut self, side: usize, end_of_stream: bool) {
        self.pieces[side] += 1;
        if end_of_stream {
            let key = if side == 0 { "request_pieces" } else { "response_pieces" };
            let n = self.pieces[side].to_string();
            self.set_property(vec!["sluice", "audit", key], Some(n.as_bytes()));
        }
    }
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let authority = self.get_http_request_header(":authority").unwrap_or_default();
        self.set_property(vec!["sluice", "annotation", "authority"], Some(authority.as_bytes()));
        if let Some(name) = value(&self.cfg, "deny_header") {
            if self.get_http_request_header(name).is_some() {
                self.send_http_response(
                    451,
                    vec![("x-blocked-by", "test-guest")],
                    Some(b"blocked by the test guest"),
                );
                return Action::Pause;
            }
        }
        if let Some((k, v)) = value(&self.cfg, "add_header").and_then(|kv| kv.split_once(':')) {
            self.add_http_request_header(k, v);
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if value(&self.cfg, "stream") == Some("1") {
            self.count_piece(0, end_of_stream);
            let piece = self.get_http_request_body(0, body_size).unwrap_or_default();
            if piece.windows(9).any(|w| w == b"forbidden") {
                self.send_http_response(403, vec![("x-blocked-by", "test-guest")], Some(b"forbidden piece"));
                return Action::Pause;
            }
            self.set_http_request_body(0, body_size, &piece.to_ascii_uppercase());
            return Action::Continue;
        }
        if value(&self.cfg, "body") != Some("1") {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        if body.windows(9).any(|w| w == b"forbidden") {
            self.send_http_response(403, vec![("x-blocked-by", "test-guest")], Some(b"forbidden body"));
            return Action::Pause;
        }
        self.set_http_request_body(0, body_size, &body.to_ascii_uppercase());
        Action::Continue
    }

    fn on_http_request_trailers(&mut self, num_trailers: usize) -> Action {
        if value(&self.cfg, "trailers") == Some("1") {
            self.set_property(
                vec!["sluice", "audit", "request_trailers"],
                Some(num_trailers.to_string().as_bytes()),
            );
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if value(&self.cfg, "props") == Some("1") {
            for (key, path) in [
                ("url_path", vec!["request", "url_path"]),
                ("query", vec!["request", "query"]),
                ("method", vec!["request", "method"]),
            ] {
                let v = self.get_property(path).unwrap_or_default();
                self.set_property(vec!["sluice", "audit", key], Some(&v));
            }
            let code = self
                .get_property(vec!["response", "code"])
                .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                .map_or(-1, i64::from_le_bytes);
            self.set_property(vec!["sluice", "audit", "code"], Some(code.to_string().as_bytes()));
        }
        if let Some((k, v)) = value(&self.cfg, "response_header").and_then(|kv| kv.split_once(':')) {
            self.add_http_response_header(k, v);
        }
        if let Some(name) = value(&self.cfg, "drop_response_header") {
            self.set_http_response_header(name, None);
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if value(&self.cfg, "stream") == Some("1") {
            self.count_piece(1, end_of_stream);
            return Action::Continue;
        }
        if value(&self.cfg, "body") != Some("1") {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        self.set_http_response_body(body_size, 0, b" [seen]");
        Action::Continue
    }
}
