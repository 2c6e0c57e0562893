//! Crypto-free fake origin for the side-by-side benchmark.
//!
//! Listens on one or more loopback ports; per connection it reads one TLS
//! record (the ClientHello), then does what the hello's `random` asks (see
//! `sluice_bench::Mode`): answer a few bytes and close, answer and hold until
//! the client closes, or stream N bytes. A hello without the marker comes
//! from a real TLS client: the origin then completes the handshake with a
//! self-signed certificate for `bench.example` (written to `--cert-out` for
//! the client to trust) and answers over TLS. A connection that does not
//! start with a TLS record is plain HTTP/1.1 (the HTTP phase): every
//! request gets `200 ok`, with keep-alive. With `--quic-listen` it is also
//! a QUIC server (ALPN `bench`, the same certificate): on each stream the
//! client sends how many bytes it wants (a little-endian u64) and gets
//! them. One thread, so it stays on the core `taskset` gives it and leaves
//! the other to the proxy under test.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark tool")]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use clap::Parser;
use sluice_bench::{Mode, REPLY_LEN, reply};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

#[derive(Parser, Debug)]
struct Args {
    /// Addresses to listen on (127.0.0.1 only in the benchmark).
    #[arg(long, required = true, num_args = 1..)]
    listen: Vec<SocketAddr>,
    /// Where to write the origin's certificate (DER) for TLS clients.
    #[arg(long)]
    cert_out: Option<PathBuf>,
    /// UDP addresses to serve QUIC on.
    #[arg(long, num_args = 1..)]
    quic_listen: Vec<SocketAddr>,
}

/// The client's first record, already read, handed back to rustls before
/// the rest of the stream.
struct Prefixed {
    pre: Vec<u8>,
    at: usize,
    s: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.pre.len() {
            let n = (this.pre.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.pre[this.at..this.at + n]);
            this.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.s).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().s).poll_write(cx, b)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().s).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().s).poll_shutdown(cx)
    }
}

/// The origin's TLS acceptor, and its QUIC server settings with the same
/// certificate.
fn tls_acceptor(cert_out: Option<&PathBuf>) -> (TlsAcceptor, quinn::ServerConfig) {
    let ck = rcgen::generate_simple_self_signed(vec!["bench.example".to_owned()]).unwrap();
    let cert = CertificateDer::from(ck.cert.der().to_vec());
    if let Some(p) = cert_out {
        std::fs::write(p, cert.as_ref()).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let cfg = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key.clone_key())
        .unwrap();
    let mut quic =
        ServerConfig::builder_with_provider(Arc::new(tokio_rustls::rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&tokio_rustls::rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
    quic.alpn_protocols = vec![b"bench".to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(quic).unwrap();
    (
        TlsAcceptor::from(Arc::new(cfg)),
        quinn::ServerConfig::with_crypto(Arc::new(quic)),
    )
}

/// One QUIC connection: each stream asks for a number of bytes and gets
/// them, until the client closes.
async fn serve_quic(incoming: quinn::Incoming) -> Result<(), Box<dyn std::error::Error>> {
    let conn = incoming.await?;
    loop {
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return Ok(()),
        };
        tokio::spawn(async move {
            let mut want = [0_u8; 8];
            if recv.read_exact(&mut want).await.is_err() {
                return;
            }
            let mut n = u64::from_le_bytes(want);
            while n > 0 {
                let k = usize::try_from(n).unwrap_or(CHUNK).min(CHUNK);
                if send.write_all(&BULK[..k]).await.is_err() {
                    return;
                }
                n -= k as u64;
            }
            let _ = send.finish();
            let _ = send.stopped().await;
        });
    }
}

const CHUNK: usize = 256 * 1024;
static BULK: [u8; CHUNK] = [0x42; CHUNK];

fn listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = TcpSocket::new_v4()?;
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(4096)
}

async fn serve(mut s: TcpStream, tls: TlsAcceptor) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut hdr = [0_u8; 5];
    s.read_exact(&mut hdr).await?;
    if hdr[0] != 0x16 {
        // Not a TLS record: plain HTTP/1.1 from the HTTP phase.
        return http(s, hdr.to_vec()).await;
    }
    let len = usize::from(u16::from_be_bytes([hdr[3], hdr[4]]));
    let mut rec = vec![0_u8; 5 + len];
    rec[..5].copy_from_slice(&hdr);
    s.read_exact(&mut rec[5..]).await?;
    match Mode::from_record(&rec) {
        Mode::Tls => {
            let mut t = tls.accept(Prefixed { pre: rec, at: 0, s }).await?;
            t.write_all(&reply()).await?;
            t.shutdown().await?;
        }
        Mode::ReplyClose => {
            s.write_all(&reply()).await?;
        }
        Mode::ReplyHold => {
            s.write_all(&reply()).await?;
            let mut sink = [0_u8; REPLY_LEN];
            while s.read(&mut sink).await? > 0 {}
        }
        Mode::Bulk(mut n) => {
            drop(rec);
            while n > 0 {
                let k = usize::try_from(n).unwrap_or(CHUNK).min(CHUNK);
                s.write_all(&BULK[..k]).await?;
                n -= k as u64;
            }
            s.shutdown().await?;
        }
    }
    Ok(())
}

/// Plain HTTP/1.1, keep-alive: answers every request (a head, and a body
/// of its `content-length`, skipped) with `200` and a short body, until
/// the client closes.
async fn http(mut s: TcpStream, mut buf: Vec<u8>) -> std::io::Result<()> {
    const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 3\r\n\r\nok\n";
    let mut chunk = [0_u8; 4096];
    loop {
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let body = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            let total = end + 4 + body;
            while buf.len() < total {
                let n = s.read(&mut chunk).await?;
                if n == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.drain(..total);
            s.write_all(ANSWER).await?;
        }
        if buf.len() > 64 * 1024 {
            return Err(std::io::Error::other("request head over 64 KiB"));
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    let (tls, quic) = tls_acceptor(args.cert_out.as_ref());
    for addr in args.quic_listen {
        let ep = quinn::Endpoint::server(quic.clone(), addr).unwrap_or_else(|e| panic!("bind {addr}/udp: {e}"));
        tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                tokio::spawn(async move {
                    let _ = serve_quic(incoming).await;
                });
            }
        });
    }
    for addr in args.listen {
        let tls = tls.clone();
        let l = listener(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        tokio::spawn(async move {
            loop {
                match l.accept().await {
                    Ok((s, _)) => {
                        let tls = tls.clone();
                        tokio::spawn(async move {
                            let _ = serve(s, tls).await;
                        });
                    }
                    // EMFILE and friends: back off instead of spinning.
                    Err(e) => {
                        eprintln!("bench-origin: accept on {addr}: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        });
    }
    eprintln!("bench-origin: ready");
    // The accept loops never end; the harness stops the origin by PID.
    std::future::pending::<()>().await;
}
