//! The single home of `unsafe` in Sluice: raw Linux syscalls the data path
//! needs and no safe crate offers in the shape we need.
//!
//! What lives here, by concern: `sockopt` (`SO_ORIGINAL_DST`, the
//! destination a connection had before iptables `REDIRECT`, the
//! transparent listener's only source of truth for where a flow was going;
//! `IP_TRANSPARENT` for `TPROXY`), `splice` (`splice(2)` and its pipe pool,
//! so the relay never copies payload through user space), `udp` (batched
//! `recvmmsg`/`sendmmsg` with `IP_PKTINFO` for the DNS proxy), `udp_orig`
//! (`recvmsg` with `IP_ORIGDSTADDR` for the `quic` listener under
//! `TPROXY`), `wasm_cache`
//! (loading compiled plugin modules from a directory only this user can
//! write) and `cpu`
//! (thread CPU time and batch scheduling for benchmarks, huge pages and
//! prefetch for the policy indexes). Everything else in the crate is
//! `unsafe_code = "deny"`; each block here carries a `// SAFETY:` note saying
//! why the call cannot violate memory safety. The functions are thin: they
//! take borrowed file descriptors, return `io::Result`, and leave policy
//! (what to do on EOF, on a reset, on an idle pipe) to their callers.
//!
//! Idle memory matters (a target of ≤ 3 KiB per idle proxied connection), so a
//! relay does not own a pipe while it waits for data: pipes come from a small
//! per-thread pool when bytes are ready and go back to it, empty, before the
//! relay parks again. A pipe that still holds bytes is never pooled.

#![allow(unsafe_code)]

mod cpu;
mod sockopt;
mod splice;
mod udp;
mod udp_orig;
mod wasm_cache;

pub use cpu::*;
pub use sockopt::*;
pub use splice::*;
pub use udp::*;
pub use udp_orig::*;
pub use wasm_cache::TrustedDir;
