//! `sluice-demo upstream`: the demo's upstream. It answers every request
//! with 200 and a body naming the `Host` it was asked as, so an agent's
//! output shows which name reached it (the demo gives it two:
//! `api.demo.internal`, which the policy allows, and
//! `blocked.demo.internal`, which it does not). One thread per connection,
//! one request per connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use crate::http::{self, HttpError, RequestHead};

/// How long a client may take to send its head.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

pub fn run(listen: SocketAddr) -> Result<(), String> {
    let listener = TcpListener::bind(listen).map_err(|e| {
        format!(
            "cannot listen on {listen}: {e}{}",
            if listen.port() < 1024 {
                " (a port below 1024 needs root, CAP_NET_BIND_SERVICE or net.ipv4.ip_unprivileged_port_start)"
            } else {
                ""
            }
        )
    })?;
    println!("upstream: listening on {listen}; every request gets 200 and the Host it named");
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                std::thread::spawn(move || serve(stream));
            }
            // A connection that failed before it was accepted; the
            // listener itself is fine.
            Err(e) => eprintln!("upstream: accept: {e}"),
        }
    }
    Ok(())
}

fn serve(mut stream: TcpStream) {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "an unknown peer".to_owned(), |a| a.to_string());
    let (status, body) = match read_head(&mut stream) {
        Ok(Some(req)) => {
            let host = req.host.as_deref().unwrap_or("(no Host header)");
            println!("upstream: {peer}: {} {} Host: {host} -> 200", req.method, req.target);
            ("200 OK", format!("demo upstream: hello, {host}\n"))
        }
        // Closed before a whole head: nothing to answer.
        Ok(None) => return,
        Err(e) => {
            println!("upstream: {peer}: -> 400: {e}");
            ("400 Bad Request", format!("demo upstream: {e}\n"))
        }
    };
    let answer = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if let Err(e) = stream.write_all(answer.as_bytes()) {
        eprintln!("upstream: {peer}: cannot answer: {e}");
    }
}

/// Reads until the request head is whole; `Ok(None)` if the client closed
/// (or went quiet) first.
fn read_head(stream: &mut TcpStream) -> Result<Option<RequestHead>, HttpError> {
    // Without a timeout a silent client would hold its thread for ever.
    if stream.set_read_timeout(Some(READ_TIMEOUT)).is_err() {
        return Ok(None);
    }
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return Ok(None),
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        if let Some(head) = http::parse_request(&buf)? {
            return Ok(Some(head));
        }
    }
}
