//! The WASI preview1 calls a proxy-wasm plugin makes, under both
//! `wasi_snapshot_preview1` and `wasi_unstable` as the spec asks: no
//! arguments, an environment of only what the plugin's configuration sets,
//! real clocks and randomness, stdout and stderr into the log with the
//! plugin's name, and no files (every descriptor but 1 and 2 is "bad").
//!
//! Written here rather than taken from wasmtime-wasi: that crate's sync
//! API blocks on a tokio runtime inside every write (it panics when called
//! from a tokio worker, which is where plugins run), pulls in about 80 more
//! crates, and pins wasmtime to an older patch release. A plugin needs six
//! calls of it; the rest answer as a sandbox with no files would.

use std::time::{SystemTime, UNIX_EPOCH};

use wasmtime::{Caller, Linker};

use super::abi::LogLevel;
use super::state::{GuestFault, GuestMemory, HostState};

const SUCCESS: i32 = 0;
const BADF: i32 = 8;
const INVAL: i32 = 28;
const NOSYS: i32 = 52;

/// The most bytes one `random_get` fills.
const MAX_RANDOM: i32 = 64 * 1024;
/// A line the guest writes is logged when it ends, or when this long.
const MAX_LINE: usize = 4096;

/// Adds the WASI calls to `linker` under both module names.
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    const M: &str = "wasi_snapshot_preview1";
    linker.func_wrap(
        M,
        "args_sizes_get",
        |mut c: Caller<'_, HostState>, count: i32, size: i32| {
            c.write_u32(count, 0)?;
            c.write_u32(size, 0)?;
            Ok::<_, wasmtime::Error>(SUCCESS)
        },
    )?;
    linker.func_wrap(M, "args_get", |_: Caller<'_, HostState>, _: i32, _: i32| SUCCESS)?;
    linker.func_wrap(
        M,
        "environ_sizes_get",
        |mut c: Caller<'_, HostState>, count: i32, size: i32| {
            let env = &c.data().env;
            let n = env.len() as u32;
            let bytes: usize = env.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
            c.write_u32(count, n)?;
            c.write_u32(size, u32::try_from(bytes).unwrap_or(u32::MAX))?;
            Ok::<_, wasmtime::Error>(SUCCESS)
        },
    )?;
    linker.func_wrap(M, "environ_get", |mut c: Caller<'_, HostState>, ptrs: i32, buf: i32| {
        let env: Vec<Vec<u8>> = c
            .data()
            .env
            .iter()
            .map(|(k, v)| format!("{k}={v}\0").into_bytes())
            .collect();
        let mut at = buf as u32;
        for (i, entry) in env.iter().enumerate() {
            c.write_u32(ptrs.wrapping_add(4 * i as i32), at)?;
            c.write(at as i32, entry)?;
            at = at.wrapping_add(entry.len() as u32);
        }
        Ok::<_, wasmtime::Error>(SUCCESS)
    })?;
    linker.func_wrap(
        M,
        "clock_time_get",
        |mut c: Caller<'_, HostState>, id: i32, _precision: i64, out: i32| {
            let nanos = match id {
                0 => SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
                1 => monotonic_nanos(),
                _ => return Ok::<_, wasmtime::Error>(INVAL),
            };
            c.write_u64(out, nanos)?;
            Ok(SUCCESS)
        },
    )?;
    linker.func_wrap(M, "clock_res_get", |mut c: Caller<'_, HostState>, id: i32, out: i32| {
        if !(0..=1).contains(&id) {
            return Ok::<_, wasmtime::Error>(INVAL);
        }
        c.write_u64(out, 1)?;
        Ok(SUCCESS)
    })?;
    linker.func_wrap(M, "random_get", |mut c: Caller<'_, HostState>, buf: i32, len: i32| {
        if !(0..=MAX_RANDOM).contains(&len) {
            return Ok::<_, wasmtime::Error>(INVAL);
        }
        let mut bytes = vec![0u8; len as usize];
        rand::fill(&mut bytes[..]);
        c.write(buf, &bytes)?;
        Ok(SUCCESS)
    })?;
    linker.func_wrap(
        M,
        "fd_write",
        |mut c: Caller<'_, HostState>, fd: i32, iovs: i32, iovs_len: i32, written: i32| {
            if fd != 1 && fd != 2 {
                return Ok::<_, wasmtime::Error>(BADF);
            }
            if !(0..=1024).contains(&iovs_len) {
                return Ok(INVAL);
            }
            let table = c.read(iovs, iovs_len.wrapping_mul(8))?;
            let mut total: u32 = 0;
            for iov in table.chunks_exact(8) {
                let ptr = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
                let len = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
                let bytes = c.read(ptr, len)?;
                total = total.wrapping_add(bytes.len() as u32);
                write_lines(c.data_mut(), fd, &bytes);
            }
            c.write_u32(written, total)?;
            Ok(SUCCESS)
        },
    )?;
    linker.func_wrap(
        M,
        "proc_exit",
        |_: Caller<'_, HostState>, code: i32| -> wasmtime::Result<()> { Err(GuestFault::Exit(code).into()) },
    )?;
    linker.func_wrap(M, "sched_yield", |_: Caller<'_, HostState>| SUCCESS)?;
    // No files: every descriptor is bad (and wasi-libc's scan for
    // pre-opened directories ends at the first bad one).
    linker.func_wrap(M, "fd_close", |_: Caller<'_, HostState>, _: i32| BADF)?;
    linker.func_wrap(M, "fd_fdstat_get", |_: Caller<'_, HostState>, _: i32, _: i32| BADF)?;
    linker.func_wrap(M, "fd_fdstat_set_flags", |_: Caller<'_, HostState>, _: i32, _: i32| {
        BADF
    })?;
    linker.func_wrap(M, "fd_filestat_get", |_: Caller<'_, HostState>, _: i32, _: i32| BADF)?;
    linker.func_wrap(M, "fd_prestat_get", |_: Caller<'_, HostState>, _: i32, _: i32| BADF)?;
    linker.func_wrap(
        M,
        "fd_prestat_dir_name",
        |_: Caller<'_, HostState>, _: i32, _: i32, _: i32| BADF,
    )?;
    linker.func_wrap(
        M,
        "fd_read",
        |_: Caller<'_, HostState>, _: i32, _: i32, _: i32, _: i32| BADF,
    )?;
    linker.func_wrap(
        M,
        "fd_seek",
        |_: Caller<'_, HostState>, _: i32, _: i64, _: i32, _: i32| BADF,
    )?;
    linker.func_wrap(
        M,
        "path_open",
        |_: Caller<'_, HostState>, _: i32, _: i32, _: i32, _: i32, _: i32, _: i64, _: i64, _: i32, _: i32| BADF,
    )?;
    linker.func_wrap(
        M,
        "poll_oneoff",
        |_: Caller<'_, HostState>, _: i32, _: i32, _: i32, _: i32| NOSYS,
    )?;
    // The calls above have the same form in the older snapshot.
    linker.alias_module(M, "wasi_unstable")?;
    Ok(())
}

/// Nanoseconds on a monotonic clock.
fn monotonic_nanos() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(std::time::Instant::now);
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Appends what the guest wrote to its stdout (fd 1, logged at info) or
/// stderr (fd 2, at error), logging each complete line.
fn write_lines(state: &mut HostState, fd: i32, bytes: &[u8]) {
    let level = if fd == 1 { LogLevel::Info } else { LogLevel::Error };
    let mut pending = std::mem::take(if fd == 1 { &mut state.stdout } else { &mut state.stderr });
    for &b in bytes {
        if b == b'\n' || pending.len() >= MAX_LINE {
            state.log(level, &String::from_utf8_lossy(&pending));
            pending.clear();
            if b == b'\n' {
                continue;
            }
        }
        pending.push(b);
    }
    *(if fd == 1 { &mut state.stdout } else { &mut state.stderr }) = pending;
}
