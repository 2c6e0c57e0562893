//! Crypto-free fake origin for the side-by-side benchmark.
//!
//! Listens on one or more loopback ports; per connection it reads one TLS
//! record (the ClientHello), then does what the hello's `random` asks (see
//! `sluice_bench::Mode`): answer a few bytes and close, answer and hold until
//! the client closes, or stream N bytes. One thread, so it stays on the core
//! `taskset` gives it and leaves the other to the proxy under test.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark tool")]

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use sluice_bench::{Mode, REPLY_LEN, reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

#[derive(Parser, Debug)]
struct Args {
    /// Addresses to listen on (127.0.0.1 only in the benchmark).
    #[arg(long, required = true, num_args = 1..)]
    listen: Vec<SocketAddr>,
}

const CHUNK: usize = 256 * 1024;
static BULK: [u8; CHUNK] = [0x42; CHUNK];

fn listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = TcpSocket::new_v4()?;
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(4096)
}

async fn serve(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut hdr = [0_u8; 5];
    s.read_exact(&mut hdr).await?;
    let len = usize::from(u16::from_be_bytes([hdr[3], hdr[4]]));
    let mut rec = vec![0_u8; 5 + len];
    rec[..5].copy_from_slice(&hdr);
    s.read_exact(&mut rec[5..]).await?;
    match Mode::from_record(&rec) {
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

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    for addr in args.listen {
        let l = listener(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        tokio::spawn(async move {
            loop {
                match l.accept().await {
                    Ok((s, _)) => {
                        tokio::spawn(async move {
                            let _ = serve(s).await;
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
