//! `sluice-demo agent`: the demo's "AI agent". Every round it GETs each URL
//! it was given, through an explicit proxy (`--proxy`, else `HTTP_PROXY`)
//! or directly (where a transparent gateway's REDIRECT rules catch it), and
//! prints one line per request saying what came back: the status and, for
//! a denial by Sluice, the rule and reason from its `X-Sluice-*` headers;
//! or that the connection was closed without an answer (what a transparent
//! gateway does to a denied flow).
//!
//! Until its first request gets through to something (the gateway or, with
//! no gateway, the upstream), failures to resolve or connect are retried
//! every second for at most `--wait`: the agent may start before the
//! gateway listens (podman-compose before 4.6 skips `service_healthy`
//! conditions). Past that bound it gives up and exits 1.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::http::{self, Url};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The body is read up to this much; the agent prints its first line.
const MAX_BODY: usize = 64 * 1024;

#[derive(Debug)]
pub struct Args {
    pub urls: Vec<Url>,
    pub proxy: Option<Url>,
    pub interval: Duration,
    /// 0: for ever.
    pub rounds: u64,
    pub wait: Duration,
}

/// What one request came to.
#[derive(Debug)]
enum Outcome {
    /// Could not resolve or connect: nothing was reached.
    Unreachable(String),
    /// Connected, then the connection ended or failed before a whole
    /// response head.
    NoAnswer(String),
    Answer {
        head: http::ResponseHead,
        first_line: String,
    },
}

pub fn run(args: &Args) -> Result<(), String> {
    let via = match &args.proxy {
        Some(p) => format!("via proxy http://{}", p.authority()),
        None => "direct".to_owned(),
    };
    let list = args.urls.iter().map(Url::to_string).collect::<Vec<_>>().join(", ");
    println!(
        "agent: every {} s: GET {list} {via}{}",
        args.interval.as_secs(),
        if args.proxy.is_none() {
            " (a transparent gateway may intercept it)"
        } else {
            ""
        }
    );
    let started = Instant::now();
    let mut reached = false;
    let mut round: u64 = 0;
    loop {
        round += 1;
        for url in &args.urls {
            let outcome = loop {
                let o = request(url, args.proxy.as_ref());
                match &o {
                    Outcome::Unreachable(e) if !reached => {
                        if started.elapsed() >= args.wait {
                            return Err(format!(
                                "nothing answered within {} s ({e}); is the gateway running?",
                                args.wait.as_secs()
                            ));
                        }
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    _ => break o,
                }
            };
            if !matches!(outcome, Outcome::Unreachable(_)) {
                reached = true;
            }
            println!("agent: GET {url} {via} -> {}", describe(&outcome));
        }
        if args.rounds != 0 && round >= args.rounds {
            return Ok(());
        }
        std::thread::sleep(args.interval);
    }
}

fn describe(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Unreachable(e) => format!("unreachable: {e}"),
        Outcome::NoAnswer(why) => format!("no HTTP answer: {why}"),
        Outcome::Answer { head, first_line } => {
            let mut s = format!("HTTP {}", head.status);
            if let Some(rule) = head.header("x-sluice-rule") {
                s.push_str(&format!(
                    " (rule {rule}, reason {})",
                    head.header("x-sluice-reason").unwrap_or("not given")
                ));
            }
            if !first_line.is_empty() {
                s.push_str(": ");
                s.push_str(first_line);
            }
            s
        }
    }
}

fn connect(host: &str, port: u16) -> Result<TcpStream, String> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    let mut last = format!("{host} has no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = format!("cannot connect to {host}:{port} ({addr}): {e}"),
        }
    }
    Err(last)
}

fn request(url: &Url, proxy: Option<&Url>) -> Outcome {
    // Through a proxy: the absolute URL as the target (RFC 9112 §3.2.2).
    let (conn, target) = match proxy {
        Some(p) => (connect(&p.host, p.port), url.to_string()),
        None => (connect(&url.host, url.port), url.path.clone()),
    };
    let mut stream = match conn {
        Ok(s) => s,
        Err(e) => return Outcome::Unreachable(e),
    };
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let req = format!(
        "GET {target} HTTP/1.1\r\nHost: {}\r\nUser-Agent: sluice-demo-agent\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        url.authority()
    );
    if let Err(e) = stream.write_all(req.as_bytes()) {
        return Outcome::NoAnswer(format!("the request could not be sent: {e}"));
    }
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let head = loop {
        match stream.read(&mut chunk) {
            Ok(0) => return Outcome::NoAnswer("the connection was closed before any response".to_owned()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                return Outcome::NoAnswer("the connection was reset before any response".to_owned());
            }
            // How a read timeout shows on Linux.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Outcome::NoAnswer(format!("no response within {} s", IO_TIMEOUT.as_secs()));
            }
            Err(e) => return Outcome::NoAnswer(format!("reading the response: {e}")),
        }
        match http::parse_response(&buf) {
            Ok(Some(head)) => break head,
            Ok(None) => {}
            Err(e) => return Outcome::NoAnswer(e.to_string()),
        }
    };
    // The body, for its first line: up to Content-Length, else to the end.
    let want = head
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(MAX_BODY)
        .min(MAX_BODY);
    while buf.len() - head.len < want {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = &buf[head.len..buf.len().min(head.len + want)];
    let first_line = String::from_utf8_lossy(body)
        .lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(120)
        .collect();
    Outcome::Answer { head, first_line }
}
