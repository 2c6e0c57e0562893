//! Shared pieces of the side-by-side benchmark (`bench/run.sh`): the
//! ClientHello the load generator sends, how it tells the fake origin what to
//! do, and the `/proc` readings that turn a run into proxy CPU and RSS figures.
//!
//! The origin is crypto-free: it reads one TLS record (the ClientHello) and
//! answers with plain bytes, so on a two-core machine the proxy's core is the
//! limit, not the client's or the upstream's handshake cost. What the origin
//! should do is carried inside the ClientHello's `random` field, which every
//! SNI router forwards untouched; that keeps one origin process and one proxy
//! configuration for every phase of the run.

pub mod chart;

use std::fmt;

/// First bytes of `random` in a benchmark hello; anything else means a real
/// TLS client ([`Mode::Tls`]).
pub const MARKER: [u8; 4] = *b"SLB1";

/// Bytes the origin answers to a ClientHello (first byte looks like a TLS
/// handshake record so nothing in between is surprised by it).
pub const REPLY_LEN: usize = 128;

/// The origin's answer: a fake record header followed by filler.
#[must_use]
pub fn reply() -> [u8; REPLY_LEN] {
    let mut r = [0x5a_u8; REPLY_LEN];
    r[0] = 0x16;
    r[1] = 0x03;
    r[2] = 0x03;
    let body = u16::try_from(REPLY_LEN - 5).unwrap_or(0).to_be_bytes();
    r[3] = body[0];
    r[4] = body[1];
    r
}

/// What the origin does after reading the ClientHello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No marker: a real TLS client. Complete the handshake (the origin's
    /// only crypto), send [`REPLY_LEN`] bytes of application data, close.
    Tls,
    /// Answer [`REPLY_LEN`] bytes, then close (the origin closes first, so
    /// TIME_WAIT lands on listening ports and never exhausts the client's or
    /// the proxy's ephemeral ports).
    ReplyClose,
    /// Answer, then hold the connection until the client closes (idle flows).
    ReplyHold,
    /// Stream this many bytes, then close (bulk relay).
    Bulk(u64),
}

impl Mode {
    fn encode(self) -> [u8; 13] {
        let mut out = [0_u8; 13];
        out[..4].copy_from_slice(&MARKER);
        let (tag, n) = match self {
            // A marked hello is never a real TLS client.
            Mode::ReplyClose | Mode::Tls => (0, 0),
            Mode::ReplyHold => (1, 0),
            Mode::Bulk(n) => (2, n),
        };
        out[4] = tag;
        out[5..].copy_from_slice(&n.to_le_bytes());
        out
    }

    /// Reads the mode from the first TLS record a client sent (header
    /// included). Unmarked input is a real TLS client ([`Mode::Tls`]).
    #[must_use]
    pub fn from_record(record: &[u8]) -> Mode {
        // record header (5) + handshake header (4) + legacy_version (2)
        let Some(r) = record.get(11..24) else {
            return Mode::Tls;
        };
        if r[..4] != MARKER {
            return Mode::Tls;
        }
        let mut n = [0_u8; 8];
        n.copy_from_slice(&r[5..13]);
        match r[4] {
            1 => Mode::ReplyHold,
            2 => Mode::Bulk(u64::from_le_bytes(n)),
            _ => Mode::ReplyClose,
        }
    }
}

/// Why a capture could not be turned into a benchmark hello.
#[derive(Debug, PartialEq, Eq)]
pub struct HelloError(&'static str);

impl fmt::Display for HelloError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot rewrite ClientHello: {}", self.0)
    }
}

impl std::error::Error for HelloError {}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], HelloError> {
        let end = self.at.checked_add(n).ok_or(HelloError("length overflow"))?;
        let s = self.b.get(self.at..end).ok_or(HelloError("truncated"))?;
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<usize, HelloError> {
        Ok(usize::from(self.take(1)?[0]))
    }
    fn u16(&mut self) -> Result<usize, HelloError> {
        let s = self.take(2)?;
        Ok(usize::from(u16::from_be_bytes([s[0], s[1]])))
    }
}

fn u16_be(n: usize) -> Result<[u8; 2], HelloError> {
    u16::try_from(n)
        .map(u16::to_be_bytes)
        .map_err(|_| HelloError("field too long"))
}

/// Rewrites a captured single-record ClientHello: its SNI becomes `sni`, its
/// `random` carries `mode`, and every length is fixed up. A padding extension,
/// if present, is resized so the hello keeps its captured size where it can.
pub fn build_hello(capture: &[u8], sni: &str, mode: Mode) -> Result<Vec<u8>, HelloError> {
    let mut c = Cursor { b: capture, at: 0 };
    if c.u8()? != 0x16 {
        return Err(HelloError("not a handshake record"));
    }
    let rec_version = c.take(2)?;
    let rec_len = c.u16()?;
    if capture.len() != 5 + rec_len {
        return Err(HelloError("capture is not exactly one TLS record"));
    }
    if c.u8()? != 1 {
        return Err(HelloError("not a ClientHello"));
    }
    let hs_len = c.take(3)?;
    let hs_len = usize::from(hs_len[0]) << 16 | usize::from(hs_len[1]) << 8 | usize::from(hs_len[2]);
    if hs_len + 4 != rec_len {
        return Err(HelloError("handshake message does not fill the record"));
    }
    let version = c.take(2)?;
    let _random = c.take(32)?;
    let sid_len = c.u8()?;
    let sid = c.take(sid_len)?;
    let suites_len = c.u16()?;
    let suites = c.take(suites_len)?;
    let comp_len = c.u8()?;
    let comp = c.take(comp_len)?;
    let ext_len = c.u16()?;
    let ext_end = c.at + ext_len;
    let mut exts: Vec<(u16, Vec<u8>)> = Vec::new();
    let mut saw_sni = false;
    while c.at < ext_end {
        let ty = c.u16()?;
        let len = c.u16()?;
        let data = c.take(len)?;
        let ty = u16::try_from(ty).map_err(|_| HelloError("extension type"))?;
        if ty == 0 {
            saw_sni = true;
            let mut d = Vec::with_capacity(sni.len() + 5);
            d.extend_from_slice(&u16_be(sni.len() + 3)?);
            d.push(0);
            d.extend_from_slice(&u16_be(sni.len())?);
            d.extend_from_slice(sni.as_bytes());
            exts.push((ty, d));
        } else {
            exts.push((ty, data.to_vec()));
        }
    }
    if !saw_sni {
        return Err(HelloError("capture has no server_name extension"));
    }
    let body_len = |exts: &[(u16, Vec<u8>)]| exts.iter().map(|(_, d)| 4 + d.len()).sum::<usize>();
    // Keep the captured size when a padding extension (21) can absorb the change.
    if let Some(i) = exts.iter().position(|(t, _)| *t == 21) {
        let want = ext_len;
        let now = body_len(&exts);
        let pad = exts[i].1.len();
        if now > want {
            exts[i].1.truncate(pad.saturating_sub(now - want));
        } else {
            exts[i].1.resize(pad + (want - now), 0);
        }
    }
    let new_ext_len = body_len(&exts);

    let mut random = [0_u8; 32];
    random[..13].copy_from_slice(&mode.encode());
    // The rest of `random` stays fixed: the proxies never look at it.
    for (i, b) in random.iter_mut().enumerate().skip(13) {
        *b = u8::try_from(i).unwrap_or(0).wrapping_mul(37);
    }

    let mut msg = Vec::with_capacity(capture.len() + sni.len());
    msg.extend_from_slice(version);
    msg.extend_from_slice(&random);
    msg.push(u8::try_from(sid_len).map_err(|_| HelloError("session id"))?);
    msg.extend_from_slice(sid);
    msg.extend_from_slice(&u16_be(suites_len)?);
    msg.extend_from_slice(suites);
    msg.push(u8::try_from(comp_len).map_err(|_| HelloError("compression"))?);
    msg.extend_from_slice(comp);
    msg.extend_from_slice(&u16_be(new_ext_len)?);
    for (ty, d) in &exts {
        msg.extend_from_slice(&ty.to_be_bytes());
        msg.extend_from_slice(&u16_be(d.len())?);
        msg.extend_from_slice(d);
    }
    let hs = u32::try_from(msg.len())
        .map_err(|_| HelloError("too long"))?
        .to_be_bytes();
    let mut out = Vec::with_capacity(msg.len() + 9);
    out.push(0x16);
    out.extend_from_slice(rec_version);
    out.extend_from_slice(&u16_be(msg.len() + 4)?);
    out.push(1);
    out.extend_from_slice(&hs[1..]);
    out.extend_from_slice(&msg);
    Ok(out)
}

/// `/proc` readings of a process tree (a proxy's master and workers).
pub mod procfs {
    use std::fs;

    /// Clock ticks per second of `/proc/PID/stat` times (`USER_HZ`, fixed at
    /// 100 by the Linux ABI on x86-64 and arm64).
    pub const TICKS_PER_SEC: f64 = 100.0;

    fn stat_fields(pid: u32) -> Option<Vec<String>> {
        let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name is in parentheses and may contain spaces.
        let after = s.rsplit_once(')')?.1;
        Some(after.split_whitespace().map(str::to_owned).collect())
    }

    /// `pid` and all its descendants.
    #[must_use]
    pub fn tree(root: u32) -> Vec<u32> {
        let mut parent_of = Vec::new();
        if let Ok(rd) = fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                    continue;
                };
                // fields after ')': state, ppid, ...
                if let Some(ppid) = stat_fields(pid).and_then(|f| f.get(1)?.parse::<u32>().ok()) {
                    parent_of.push((pid, ppid));
                }
            }
        }
        let mut out = vec![root];
        let mut i = 0;
        while i < out.len() {
            let p = out[i];
            out.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
            i += 1;
        }
        out
    }

    /// On-CPU time of one process, all its threads, in nanoseconds: the
    /// scheduler's own sum (`/proc/PID/task/*/schedstat`), exact where
    /// `stat` counts 10 ms ticks. Threads that have exited are not counted.
    #[must_use]
    pub fn runtime_ns(pid: u32) -> u64 {
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            return 0;
        };
        tasks
            .flatten()
            .filter_map(|t| fs::read_to_string(t.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }

    /// user + system CPU seconds of one process (all its threads).
    #[must_use]
    pub fn cpu_secs(pid: u32) -> f64 {
        // after ')': utime is field 14 of stat, i.e. index 11 here; stime 12.
        let Some(f) = stat_fields(pid) else { return 0.0 };
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        #[allow(clippy::cast_precision_loss, reason = "tick counts are far below 2^52")]
        let t = (ticks(11) + ticks(12)) as f64;
        t / TICKS_PER_SEC
    }

    /// Resident set size of one process, KiB.
    #[must_use]
    pub fn rss_kib(pid: u32) -> u64 {
        let Ok(s) = fs::read_to_string(format!("/proc/{pid}/status")) else {
            return 0;
        };
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// CPU seconds summed over a process tree.
    #[must_use]
    pub fn tree_cpu_secs(root: u32) -> f64 {
        tree(root).into_iter().map(cpu_secs).sum()
    }

    /// RSS summed over a process tree, KiB.
    #[must_use]
    pub fn tree_rss_kib(root: u32) -> u64 {
        tree(root).into_iter().map(rss_kib).sum()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn curl() -> Vec<u8> {
        std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../proxy/tests/data/clienthello/curl-7.88-openssl-3.0-alpn-h2.bin"
        ))
        .unwrap()
    }

    #[test]
    fn rewrite_keeps_size_and_sets_sni_and_mode() {
        let cap = curl();
        let h = build_hello(&cap, "bench.example", Mode::Bulk(1 << 31)).unwrap();
        assert_eq!(h.len(), cap.len(), "padding absorbs the shorter name");
        assert!(h.windows(13).any(|w| w == b"bench.example"));
        assert!(!h.windows(17).any(|w| w == b"curl.example.test"));
        assert_eq!(Mode::from_record(&h), Mode::Bulk(1 << 31));
        let h = build_hello(&cap, "a-much-longer-name.bench.example", Mode::ReplyHold).unwrap();
        assert_eq!(Mode::from_record(&h), Mode::ReplyHold);
        assert_eq!(Mode::from_record(&cap), Mode::Tls);
        let h = build_hello(&cap, "bench.example", Mode::ReplyClose).unwrap();
        assert_eq!(Mode::from_record(&h), Mode::ReplyClose);
    }
}
