//! The `env.proxy_*` host functions of proxy-wasm ABI 0.2.1 (0.2.0 is the
//! same less `proxy_get_log_level`), every one of them: a module built with
//! any published SDK imports most of them even when it uses few.
//!
//! Each returns only the statuses the published SDKs expect of that call
//! (the Rust SDK panics on any other): see `abi::Status`. A bad pointer
//! traps the guest. While the guest starts or runs its allocator for the
//! host, only logging, the clock and WASI's output are allowed; any other
//! call traps (`restricted`), as the reference host does.
//!
//! What a call asks of the flow (close it, resume it) is recorded in the
//! instance's `Requests` and carried out once the callback returns.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use wasmtime::{Caller, Linker};

use super::abi::{
    BufferType, LogLevel, MapType, MetricType, Status, StreamType, decode_pairs, encode_pairs, split_path,
};
use super::properties;
use super::state::{GuestFault, GuestMemory, Headers, HostState, Phase, header_name};

type R = wasmtime::Result<i32>;

fn ok() -> R {
    Ok(Status::Ok.code())
}

fn status(s: Status) -> R {
    Ok(s.code())
}

/// Hands `result`'s bytes to the guest, or returns its status.
fn give_or(c: &mut Caller<'_, HostState>, result: Result<Vec<u8>, Status>, ptr_ptr: i32, len_ptr: i32) -> R {
    match result {
        Ok(bytes) => {
            c.give(&bytes, ptr_ptr, len_ptr)?;
            ok()
        }
        Err(s) => status(s),
    }
}

/// Writes `result`'s number to the guest at `out`, or returns its status.
fn write_or(c: &mut Caller<'_, HostState>, result: Result<u64, Status>, out: i32, wide: bool) -> R {
    match result {
        Ok(v) if wide => {
            c.write_u64(out, v)?;
            ok()
        }
        Ok(v) => {
            c.write_u32(out, u32::try_from(v).unwrap_or(u32::MAX))?;
            ok()
        }
        Err(s) => status(s),
    }
}

/// Traps unless the instance is running a callback.
fn running(c: &Caller<'_, HostState>, call: &'static str) -> Result<(), GuestFault> {
    if c.data().phase == Phase::Running {
        Ok(())
    } else {
        Err(GuestFault::Restricted(call))
    }
}

/// Reads a UTF-8 string argument; `None` when it is not UTF-8.
fn read_str(c: &mut Caller<'_, HostState>, ptr: i32, len: i32) -> Result<Option<String>, GuestFault> {
    Ok(String::from_utf8(c.read(ptr, len)?).ok())
}

/// Adds every `env.proxy_*` function of the ABI to `linker`.
#[allow(
    clippy::too_many_lines,
    reason = "one registration per ABI function, in the spec's order"
)]
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    const E: &str = "env";

    // Logging and time.
    linker.func_wrap(
        E,
        "proxy_log",
        |mut c: Caller<'_, HostState>, level: i32, ptr: i32, len: i32| -> R {
            let Ok(level) = LogLevel::try_from(level) else {
                return status(Status::BadArgument);
            };
            let msg = c.read(ptr, len)?;
            c.data_mut().log(level, &String::from_utf8_lossy(&msg));
            ok()
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_get_log_level",
        |mut c: Caller<'_, HostState>, out: i32| -> R {
            c.write_u32(out, current_log_level() as u32)?;
            ok()
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_get_current_time_nanoseconds",
        |mut c: Caller<'_, HostState>, out: i32| -> R {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
            c.write_u64(out, now)?;
            ok()
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_set_tick_period_milliseconds",
        |mut c: Caller<'_, HostState>, ms: i32| -> R {
            running(&c, "proxy_set_tick_period_milliseconds")?;
            c.data_mut().tick_period = Duration::from_millis(u64::from(ms as u32));
            ok()
        },
    )?;

    // Buffers.
    linker.func_wrap(
        E,
        "proxy_get_buffer_bytes",
        |mut c: Caller<'_, HostState>, kind: i32, start: i32, max: i32, ptr_ptr: i32, len_ptr: i32| -> R {
            running(&c, "proxy_get_buffer_bytes")?;
            let Ok(kind) = BufferType::try_from(kind) else {
                return status(Status::BadArgument);
            };
            let Some(buf) = buffer(c.data(), kind) else {
                return status(Status::NotFound);
            };
            // In u64: the SDK asks for u32::MAX bytes from 0.
            let start = u64::from(start as u32);
            let end = start.saturating_add(u64::from(max as u32)).min(buf.len() as u64);
            let bytes = if start >= end {
                Vec::new()
            } else {
                buf[start as usize..end as usize].to_vec()
            };
            c.give(&bytes, ptr_ptr, len_ptr)?;
            ok()
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_set_buffer_bytes",
        |mut c: Caller<'_, HostState>, kind: i32, start: i32, size: i32, ptr: i32, len: i32| -> R {
            running(&c, "proxy_set_buffer_bytes")?;
            let data = c.read(ptr, len)?;
            let max = c.data().limits.max_value;
            let Ok(kind) = BufferType::try_from(kind) else {
                return status(Status::BadArgument);
            };
            let Some(buf) = buffer_mut(c.data_mut(), kind) else {
                // Not available in this callback: nothing to change, and
                // the SDK panics on any status but Ok.
                return ok();
            };
            if buf.len().saturating_add(data.len()) > max {
                return Err(GuestFault::TooLarge("proxy_set_buffer_bytes").into());
            }
            let (start, size) = (start as u32 as usize, size as u32 as usize);
            if start >= buf.len() {
                buf.extend_from_slice(&data);
            } else {
                let end = start.saturating_add(size).min(buf.len());
                buf.splice(start..end, data);
            }
            // The relay passes flow bytes on as they came: a plugin that
            // changes them cannot have its way, and the flow is closed
            // rather than carried on with bytes it did not mean to send.
            // (HTTP bodies are buffered, and go on as the plugin left them.)
            if matches!(kind, BufferType::DownstreamData | BufferType::UpstreamData) {
                c.data_mut().requests.rewrote = true;
            }
            ok()
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_get_buffer_status",
        |mut c: Caller<'_, HostState>, kind: i32, len_ptr: i32, flags_ptr: i32| -> R {
            running(&c, "proxy_get_buffer_status")?;
            let Ok(kind) = BufferType::try_from(kind) else {
                return status(Status::BadArgument);
            };
            let Some(len) = buffer(c.data(), kind).map(<[u8]>::len) else {
                return status(Status::NotFound);
            };
            c.write_u32(len_ptr, u32::try_from(len).unwrap_or(u32::MAX))?;
            c.write_u32(flags_ptr, 0)?;
            ok()
        },
    )?;

    // Header maps: the request's headers in an HTTP callback. A map that
    // is not open in this callback reads as empty and ignores writes, as
    // in Envoy (the SDKs panic on any status but Ok for most of these).
    linker.func_wrap(
        E,
        "proxy_get_header_map_size",
        |mut c: Caller<'_, HostState>, kind: i32, out: i32| -> R {
            running(&c, "proxy_get_header_map_size")?;
            let Ok(kind) = MapType::try_from(kind) else {
                return status(Status::BadArgument);
            };
            let size = map(c.data(), kind).map_or(0, |m| encode_pairs(m).len());
            c.write_u32(out, u32::try_from(size).unwrap_or(u32::MAX))?;
            ok()
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_get_header_map_pairs",
        |mut c: Caller<'_, HostState>, kind: i32, ptr_ptr: i32, len_ptr: i32| -> R {
            running(&c, "proxy_get_header_map_pairs")?;
            let bytes = MapType::try_from(kind)
                .ok()
                .and_then(|k| map(c.data(), k))
                .map(|m| encode_pairs(m))
                .unwrap_or_default();
            c.give(&bytes, ptr_ptr, len_ptr)?;
            ok()
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_set_header_map_pairs",
        |mut c: Caller<'_, HostState>, kind: i32, ptr: i32, len: i32| -> R {
            running(&c, "proxy_set_header_map_pairs")?;
            let bytes = c.read(ptr, len)?;
            let Ok(pairs) = decode_pairs(&bytes, c.data().limits.pairs) else {
                return status(Status::BadArgument);
            };
            if let Some(m) = MapType::try_from(kind).ok().and_then(|k| map_mut(c.data_mut(), k)) {
                *m = pairs.into_iter().map(|(k, v)| (header_name(&k), v)).collect();
            }
            ok()
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_get_header_map_value",
        |mut c: Caller<'_, HostState>, kind: i32, key: i32, key_len: i32, ptr_ptr: i32, len_ptr: i32| -> R {
            running(&c, "proxy_get_header_map_value")?;
            let key = c.read(key, key_len)?.to_ascii_lowercase();
            let value = MapType::try_from(kind)
                .ok()
                .and_then(|k| map(c.data(), k))
                .and_then(|m| m.iter().find(|(k, _)| k.as_bytes() == key).map(|(_, v)| v.clone()))
                .ok_or(Status::NotFound);
            give_or(&mut c, value, ptr_ptr, len_ptr)
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_add_header_map_value",
        |mut c: Caller<'_, HostState>, kind: i32, key: i32, key_len: i32, val: i32, val_len: i32| -> R {
            running(&c, "proxy_add_header_map_value")?;
            let key = header_name(&c.read(key, key_len)?);
            let value = c.read(val, val_len)?;
            let max = c.data().limits.pairs.max_pairs;
            if let Some(m) = MapType::try_from(kind).ok().and_then(|k| map_mut(c.data_mut(), k))
                && m.len() < max
            {
                m.push((key, value));
            }
            ok()
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_replace_header_map_value",
        |mut c: Caller<'_, HostState>, kind: i32, key: i32, key_len: i32, val: i32, val_len: i32| -> R {
            running(&c, "proxy_replace_header_map_value")?;
            let key = header_name(&c.read(key, key_len)?);
            let value = c.read(val, val_len)?;
            if let Some(m) = MapType::try_from(kind).ok().and_then(|k| map_mut(c.data_mut(), k)) {
                match m.iter().position(|(k, _)| *k == key) {
                    Some(i) => {
                        m[i].1 = value;
                        let mut seen = false;
                        m.retain(|(k, _)| *k != key || !std::mem::replace(&mut seen, true));
                    }
                    None => m.push((key, value)),
                }
            }
            ok()
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_remove_header_map_value",
        |mut c: Caller<'_, HostState>, kind: i32, key: i32, key_len: i32| -> R {
            running(&c, "proxy_remove_header_map_value")?;
            let key = header_name(&c.read(key, key_len)?);
            if let Some(m) = MapType::try_from(kind).ok().and_then(|k| map_mut(c.data_mut(), k)) {
                m.retain(|(k, _)| *k != key);
            }
            ok()
        },
    )?;

    // The stream.
    type Request = fn(&mut super::state::Requests, StreamType);
    let requests: [(&'static str, Request); 2] = [
        ("proxy_continue_stream", |r, k| r.resume = Some(k)),
        ("proxy_close_stream", |r, k| r.close = Some(k)),
    ];
    for (name, record) in requests {
        linker.func_wrap(E, name, move |mut c: Caller<'_, HostState>, kind: i32| -> R {
            running(&c, name)?;
            let Ok(kind) = StreamType::try_from(kind) else {
                return status(Status::BadArgument);
            };
            let s = c.data_mut();
            s.requests.on = Some(s.context());
            record(&mut s.requests, kind);
            ok()
        })?;
    }
    linker.func_wrap(
        E,
        "proxy_get_status",
        |mut c: Caller<'_, HostState>, code: i32, ptr_ptr: i32, len_ptr: i32| -> R {
            running(&c, "proxy_get_status")?;
            c.write_u32(code, 0)?;
            c.give(&[], ptr_ptr, len_ptr)?;
            ok()
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_send_local_response",
        |mut c: Caller<'_, HostState>,
         code: i32,
         details: i32,
         details_len: i32,
         body: i32,
         body_len: i32,
         headers: i32,
         headers_len: i32,
         _grpc: i32|
         -> R {
            running(&c, "proxy_send_local_response")?;
            c.read(details, details_len)?;
            let body = c.read(body, body_len)?;
            let raw = c.read(headers, headers_len)?;
            let headers = decode_pairs(&raw, c.data().limits.pairs).unwrap_or_default();
            let s = c.data_mut();
            s.requests.on = Some(s.context());
            if s.stream().is_some_and(|st| st.http.is_some()) {
                // An HTTP callback: the client gets this answer instead.
                let status = u16::try_from(code)
                    .ok()
                    .filter(|c| (200..=599).contains(c))
                    .unwrap_or(403);
                s.requests.local_reply = Some(crate::listener::LocalReply {
                    status,
                    headers: headers
                        .into_iter()
                        .map(|(k, v)| (String::from_utf8_lossy(&k).to_ascii_lowercase(), v))
                        .collect(),
                    body,
                });
            } else {
                // No HTTP exchange in a connection-level callback: the
                // stream is refused instead of answered.
                s.requests.close = Some(StreamType::Downstream);
            }
            ok()
        },
    )?;

    // Call-outs: to the upstreams the plugin's declaration names. The call
    // is made once the callback returns; its answer comes to
    // `proxy_on_http_call_response` on the root context.
    linker.func_wrap(
        E,
        "proxy_http_call",
        |mut c: Caller<'_, HostState>,
         up: i32,
         up_len: i32,
         headers: i32,
         headers_len: i32,
         body: i32,
         body_len: i32,
         trailers: i32,
         trailers_len: i32,
         timeout: i32,
         token_ptr: i32|
         -> R {
            running(&c, "proxy_http_call")?;
            let upstream = read_str(&mut c, up, up_len)?.unwrap_or_default();
            let raw_headers = c.read(headers, headers_len)?;
            let body = c.read(body, body_len)?;
            let raw_trailers = c.read(trailers, trailers_len)?;
            // Checked before anything is dispatched, as the reference host
            // does, so a bad pointer fails the call and not the answer.
            c.write_u32(token_ptr, 0)?;
            let limits = c.data().limits;
            let (Ok(headers), Ok(trailers)) = (
                decode_pairs(&raw_headers, limits.pairs),
                decode_pairs(&raw_trailers, limits.pairs),
            ) else {
                return status(Status::BadArgument);
            };
            let headers: Headers = headers.into_iter().map(|(k, v)| (header_name(&k), v)).collect();
            let Some(to) = c.data().upstreams.iter().find(|u| u.name == upstream).cloned() else {
                c.data_mut().log(
                    LogLevel::Warn,
                    &format!("http_call to `{upstream}`, which is not one of the plugin's upstreams"),
                );
                return status(Status::BadArgument);
            };
            let has = |name: &[u8]| headers.iter().any(|(k, v)| k.as_bytes() == name && !v.is_empty());
            if !(has(b":method") && has(b":path") && has(b":authority")) {
                c.data_mut().log(
                    LogLevel::Warn,
                    "http_call without :method, :path and :authority headers",
                );
                return status(Status::BadArgument);
            }
            if timeout < 0 || body.len() > limits.max_value {
                return status(Status::BadArgument);
            }
            let s = c.data_mut();
            s.last_token = s.last_token.wrapping_add(1).max(1);
            let token = s.last_token;
            s.requests.calls.push(super::state::Callout {
                token,
                upstream,
                to,
                headers,
                body,
                trailers: trailers.into_iter().map(|(k, v)| (header_name(&k), v)).collect(),
                timeout: Duration::from_millis(u64::from(timeout as u32)),
            });
            c.write_u32(token_ptr, token)?;
            ok()
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_grpc_call",
        |c: Caller<'_, HostState>,
         _a: i32,
         _b: i32,
         _c3: i32,
         _d: i32,
         _e: i32,
         _f: i32,
         _g: i32,
         _h: i32,
         _i: i32,
         _j: i32,
         _k: i32,
         _l: i32|
         -> R {
            running(&c, "proxy_grpc_call")?;
            status(Status::ParseFailure)
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_grpc_stream",
        |c: Caller<'_, HostState>,
         _a: i32,
         _b: i32,
         _c3: i32,
         _d: i32,
         _e: i32,
         _f: i32,
         _g: i32,
         _h: i32,
         _i: i32|
         -> R {
            running(&c, "proxy_grpc_stream")?;
            status(Status::ParseFailure)
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_grpc_send",
        |c: Caller<'_, HostState>, _a: i32, _b: i32, _c3: i32, _d: i32| -> R {
            running(&c, "proxy_grpc_send")?;
            status(Status::NotFound)
        },
    )?;
    for name in ["proxy_grpc_cancel", "proxy_grpc_close"] {
        linker.func_wrap(E, name, move |c: Caller<'_, HostState>, _id: i32| -> R {
            running(&c, name)?;
            status(Status::NotFound)
        })?;
    }

    // Shared data and queues.
    linker.func_wrap(
        E,
        "proxy_get_shared_data",
        |mut c: Caller<'_, HostState>, key: i32, key_len: i32, ptr_ptr: i32, len_ptr: i32, cas_ptr: i32| -> R {
            running(&c, "proxy_get_shared_data")?;
            let key = c.read(key, key_len)?;
            let Some((value, cas)) = c.data().shared.get(&key) else {
                return status(Status::NotFound);
            };
            c.give(&value, ptr_ptr, len_ptr)?;
            c.write_u32(cas_ptr, cas)?;
            ok()
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_set_shared_data",
        |mut c: Caller<'_, HostState>, key: i32, key_len: i32, val: i32, val_len: i32, cas: i32| -> R {
            running(&c, "proxy_set_shared_data")?;
            let key = c.read(key, key_len)?;
            let value = c.read(val, val_len)?;
            if value.len() > c.data().limits.max_value {
                return status(Status::InternalFailure);
            }
            status(c.data().shared.set(&key, value, cas as u32))
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_register_shared_queue",
        |mut c: Caller<'_, HostState>, name: i32, name_len: i32, out: i32| -> R {
            running(&c, "proxy_register_shared_queue")?;
            let name = String::from_utf8_lossy(&c.read(name, name_len)?).into_owned();
            let slot = c.data().slot;
            let id = c.data().queues.register(&name, slot);
            c.write_u32(out, id)?;
            ok()
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_resolve_shared_queue",
        |mut c: Caller<'_, HostState>, vm: i32, vm_len: i32, name: i32, name_len: i32, out: i32| -> R {
            running(&c, "proxy_resolve_shared_queue")?;
            c.read(vm, vm_len)?;
            let name = String::from_utf8_lossy(&c.read(name, name_len)?).into_owned();
            let id = c.data().queues.resolve(&name).map(u64::from).ok_or(Status::NotFound);
            write_or(&mut c, id, out, false)
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_enqueue_shared_queue",
        |mut c: Caller<'_, HostState>, id: i32, val: i32, val_len: i32| -> R {
            running(&c, "proxy_enqueue_shared_queue")?;
            let value = c.read(val, val_len)?;
            status(c.data().queues.enqueue(id as u32, value))
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_dequeue_shared_queue",
        |mut c: Caller<'_, HostState>, id: i32, ptr_ptr: i32, len_ptr: i32| -> R {
            running(&c, "proxy_dequeue_shared_queue")?;
            let item = c.data().queues.dequeue(id as u32);
            give_or(&mut c, item, ptr_ptr, len_ptr)
        },
    )?;

    // Metrics.
    linker.func_wrap(
        E,
        "proxy_define_metric",
        |mut c: Caller<'_, HostState>, kind: i32, name: i32, name_len: i32, out: i32| -> R {
            running(&c, "proxy_define_metric")?;
            let Ok(kind) = MetricType::try_from(kind) else {
                return status(Status::BadArgument);
            };
            let Some(name) = read_str(&mut c, name, name_len)? else {
                return status(Status::BadArgument);
            };
            let id = c.data().metrics.define(kind, &name).map(u64::from);
            write_or(&mut c, id, out, false)
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_increment_metric",
        |c: Caller<'_, HostState>, id: i32, delta: i64| -> R {
            running(&c, "proxy_increment_metric")?;
            status(c.data().metrics.increment(id as u32, delta))
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_record_metric",
        |c: Caller<'_, HostState>, id: i32, value: i64| -> R {
            running(&c, "proxy_record_metric")?;
            status(c.data().metrics.record(id as u32, value as u64))
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_get_metric",
        |mut c: Caller<'_, HostState>, id: i32, out: i32| -> R {
            running(&c, "proxy_get_metric")?;
            let v = c.data().metrics.get(id as u32);
            write_or(&mut c, v, out, true)
        },
    )?;

    // Properties.
    linker.func_wrap(
        E,
        "proxy_get_property",
        |mut c: Caller<'_, HostState>, path: i32, path_len: i32, ptr_ptr: i32, len_ptr: i32| -> R {
            running(&c, "proxy_get_property")?;
            let raw = c.read(path, path_len)?;
            let Ok(segments) = split_path(&raw) else {
                return status(Status::NotFound);
            };
            let Some(value) = properties::get(c.data(), &segments) else {
                return status(Status::NotFound);
            };
            c.give(&value, ptr_ptr, len_ptr)?;
            ok()
        },
    )?;
    linker.func_wrap(
        E,
        "proxy_set_property",
        |mut c: Caller<'_, HostState>, path: i32, path_len: i32, val: i32, val_len: i32| -> R {
            running(&c, "proxy_set_property")?;
            let raw = c.read(path, path_len)?;
            let value = c.read(val, val_len)?;
            if value.len() > c.data().limits.max_value {
                return ok();
            }
            if let Ok(segments) = split_path(&raw) {
                properties::set(c.data_mut(), &segments, value);
            }
            // The SDK panics on anything but Ok; a path that cannot be
            // stored is dropped (and reads back as absent).
            ok()
        },
    )?;

    // Contexts and foreign functions.
    linker.func_wrap(
        E,
        "proxy_set_effective_context",
        |mut c: Caller<'_, HostState>, id: i32| -> R {
            running(&c, "proxy_set_effective_context")?;
            let id = id as u32;
            let s = c.data_mut();
            if id == s.root_id || s.streams.contains_key(&id) {
                s.effective = Some(id);
                ok()
            } else {
                status(Status::BadArgument)
            }
        },
    )?;
    linker.func_wrap(E, "proxy_done", |mut c: Caller<'_, HostState>| -> R {
        running(&c, "proxy_done")?;
        match c.data_mut().stream_mut() {
            Some(s) => {
                s.done = true;
                ok()
            }
            None => status(Status::NotFound),
        }
    })?;
    linker.func_wrap(
        E,
        "proxy_call_foreign_function",
        |mut c: Caller<'_, HostState>, name: i32, name_len: i32, args: i32, args_len: i32, _pp: i32, _lp: i32| -> R {
            running(&c, "proxy_call_foreign_function")?;
            c.read(name, name_len)?;
            c.read(args, args_len)?;
            status(Status::NotFound)
        },
    )?;
    Ok(())
}

/// The buffer `kind` as the current callback may read it.
fn buffer(s: &HostState, kind: BufferType) -> Option<&[u8]> {
    match kind {
        BufferType::VmConfiguration if s.config_readable => Some(&s.vm_config),
        BufferType::PluginConfiguration if s.config_readable => Some(&s.plugin_config),
        BufferType::DownstreamData => s.buffers.downstream.as_deref(),
        BufferType::UpstreamData => s.buffers.upstream.as_deref(),
        BufferType::HttpCallResponseBody => s.buffers.callout.as_ref().map(|r| r.body.as_slice()),
        BufferType::HttpRequestBody => s.stream()?.http.as_ref()?.request_body.as_deref(),
        BufferType::HttpResponseBody => s.stream()?.http.as_ref()?.response_body.as_deref(),
        _ => None,
    }
}

fn buffer_mut(s: &mut HostState, kind: BufferType) -> Option<&mut Vec<u8>> {
    match kind {
        BufferType::DownstreamData => s.buffers.downstream.as_mut(),
        BufferType::UpstreamData => s.buffers.upstream.as_mut(),
        BufferType::HttpRequestBody => {
            let http = s.stream_mut()?.http.as_mut()?;
            http.changed |= http.request_body.is_some();
            http.request_body.as_mut()
        }
        BufferType::HttpResponseBody => {
            let http = s.stream_mut()?.http.as_mut()?;
            http.changed |= http.response_body.is_some();
            http.response_body.as_mut()
        }
        _ => None,
    }
}

/// Header map `kind` as the current callback may read it: an HTTP
/// context's maps once their message part arrived, a call-out's answer
/// during `on_http_call_response`.
fn map(s: &HostState, kind: MapType) -> Option<&Headers> {
    let http = || s.stream().and_then(|st| st.http.as_ref());
    match kind {
        MapType::HttpRequestHeaders => http()?.request_headers.as_ref(),
        MapType::HttpRequestTrailers => http()?.request_trailers.as_ref(),
        MapType::HttpResponseHeaders => http()?.response_headers.as_ref(),
        MapType::HttpResponseTrailers => http()?.response_trailers.as_ref(),
        MapType::HttpCallResponseHeaders => s.buffers.callout.as_ref().map(|r| &r.headers),
        MapType::HttpCallResponseTrailers => s.buffers.callout.as_ref().map(|r| &r.trailers),
        _ => None,
    }
}

/// Header map `kind` to change (marking its context changed when there is
/// one). Trailers may be added once their message's headers arrived (as
/// in Envoy, where they are made lazily).
fn map_mut(s: &mut HostState, kind: MapType) -> Option<&mut Headers> {
    let http = s.stream_mut()?.http.as_mut()?;
    let open = match kind {
        MapType::HttpRequestHeaders | MapType::HttpRequestTrailers => http.request_headers.is_some(),
        MapType::HttpResponseHeaders | MapType::HttpResponseTrailers => http.response_headers.is_some(),
        _ => false,
    };
    http.changed |= open;
    match kind {
        MapType::HttpRequestHeaders => http.request_headers.as_mut(),
        MapType::HttpRequestTrailers if http.request_headers.is_some() => {
            Some(http.request_trailers.get_or_insert_with(Vec::new))
        }
        MapType::HttpResponseHeaders => http.response_headers.as_mut(),
        MapType::HttpResponseTrailers if http.response_headers.is_some() => {
            Some(http.response_trailers.get_or_insert_with(Vec::new))
        }
        _ => None,
    }
}

/// The log level a plugin should log at: the most verbose level the
/// process's log filter lets through.
fn current_log_level() -> LogLevel {
    use tracing::level_filters::LevelFilter;
    match LevelFilter::current() {
        LevelFilter::TRACE => LogLevel::Trace,
        LevelFilter::DEBUG => LogLevel::Debug,
        LevelFilter::INFO => LogLevel::Info,
        LevelFilter::WARN => LogLevel::Warn,
        _ => LogLevel::Error,
    }
}
