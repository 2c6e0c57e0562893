//! The WASM host's costs, with the test guest (`plugins/test-guest`, built
//! for wasm32-wasip1 by the same helper the tests use):
//!
//! - `instantiate`: a new instance started (`_initialize`, root context,
//!   `on_vm_start`, `on_configure`) from a linked module;
//! - `flow/plain`: one flow through a connection-level plugin that says
//!   nothing: stream context created, `on_new_connection`, the close
//!   callbacks, `on_done`, `on_log`, `on_delete` — what a plugin adds to a
//!   connection, warm (target ≤ 2 µs);
//! - `flow/plain-cold`: the same after walking 16 MiB of other memory (not
//!   timed), as between two connections of a busy proxy: what the same
//!   calls cost when the caches and TLB no longer hold the plugin;
//! - `flow/plain-cold-ends`: the caches cold before each flow's start and
//!   before its end, as when a flow's end runs as its connection closes;
//! - `flow/plain-cold-batched`: each flow's start cold, its end in a batch
//!   of sixteen ends. A model of ending closed flows' contexts in batches,
//!   which was tried and taken out: it saves 1.4–1.8 µs per flow here, but
//!   side by side (`bench/run.sh`) Sluice with the test guest spent more
//!   per connection with it than without (see bench/RESULTS.md);
//! - `flow/null`, `flow/null-cold`: the same two through the null guest
//!   (`plugins/null-guest`), whose callbacks return at once: the host's
//!   and wasmtime's share of a flow, with no guest work;
//! - `flow/properties`: the same, the guest reading nine properties and
//!   writing ten (host calls with allocations in the guest);
//! - `flow/properties-map-clone`: the host's copy of the flow's properties
//!   alone, to tell the host's share from the guest's;
//! - `http/exchange`: one plain-HTTP request through an HTTP plugin: its
//!   context, `on_http_request_headers` on twelve headers (the guest reads
//!   one and writes a property), `on_http_response_headers` on six, then
//!   `on_done`, `on_log`, `on_delete` — what an HTTP plugin adds to a
//!   request;
//! - `http/exchange-add-header`: the same, the guest adding a request
//!   header (the host reads the changed map back).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout, reason = "benchmark")]

#[path = "../tests/common/guests.rs"]
mod guests;

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::Criterion;
use sluice::wasm::shared::{PluginMetrics, SharedData, SharedQueues};
use sluice::wasm::vm::HttpEvent;
use sluice::wasm::{PluginCode, PluginLimits, Vm, engine};

fn code(config: &str) -> PluginCode {
    code_of("test-guest", config)
}

fn code_of(guest: &str, config: &str) -> PluginCode {
    let engine = engine::shared().unwrap();
    let module = engine.compile(&guests::guest_bytes(guest), None).unwrap();
    PluginCode::link(
        &engine,
        "bench",
        &module,
        config.as_bytes().to_vec(),
        Vec::new(),
        PluginLimits::default(),
        Arc::new(SharedData::default()),
        Arc::new(SharedQueues::default()),
        Arc::new(PluginMetrics::default()),
    )
    .unwrap()
}

fn flow_properties() -> HashMap<String, Vec<u8>> {
    [
        ("source.address", b"10.0.0.7:5555".to_vec()),
        ("destination.port", 443i64.to_le_bytes().to_vec()),
        ("connection.requested_server_name", b"api.example.test".to_vec()),
        ("sluice.listener", b"egress".to_vec()),
        ("sluice.protocol", b"tls".to_vec()),
        ("sluice.host", b"api.example.test".to_vec()),
        ("sluice.verdict.action", b"allow".to_vec()),
        ("sluice.verdict.rule", b"allow-good".to_vec()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let plain = code("");
    c.bench_function("instantiate", |b| b.iter(|| black_box(Vm::start(&plain).unwrap())));

    let mut vm = Vm::start(&plain).unwrap();
    let props = flow_properties();
    c.bench_function("flow/plain", |b| {
        b.iter(|| {
            let id = vm.new_stream(props.clone()).unwrap();
            black_box(vm.on_new_connection(id).unwrap());
            black_box(vm.finish(id).unwrap());
        });
    });

    // Evicts the plugin from the caches and the TLB between flows.
    let mut other = vec![0u8; 16 << 20];
    let mut evict = move || {
        for page in other.chunks_mut(4096) {
            page[0] = page[0].wrapping_add(1);
        }
        for line in other.chunks(64) {
            black_box(line[0]);
        }
    };
    c.bench_function("flow/plain-cold", |b| {
        b.iter_batched(
            &mut evict,
            |()| {
                let id = vm.new_stream(props.clone()).unwrap();
                black_box(vm.on_new_connection(id).unwrap());
                black_box(vm.finish(id).unwrap());
            },
            criterion::BatchSize::PerIteration,
        );
    });

    // Each flow's start and its end cold (other connections' work before
    // each): how a flow's callbacks meet the caches when each end is made
    // as its connection closes.
    c.bench_function("flow/plain-cold-ends", |b| {
        b.iter_custom(|iters| {
            let mut spent = std::time::Duration::ZERO;
            for _ in 0..iters {
                evict();
                let t = std::time::Instant::now();
                let id = vm.new_stream(props.clone()).unwrap();
                black_box(vm.on_new_connection(id).unwrap());
                spent += t.elapsed();
                evict();
                let t = std::time::Instant::now();
                black_box(vm.finish(id).unwrap());
                spent += t.elapsed();
            }
            spent
        });
    });

    // Each flow's start cold (other connections' work between flows), its
    // end in a batch of 16 (the model the module doc describes), the
    // caches cold before the batch only.
    c.bench_function("flow/plain-cold-batched", |b| {
        b.iter_custom(|iters| {
            let mut spent = std::time::Duration::ZERO;
            let mut open = Vec::with_capacity(16);
            for i in 0..iters {
                evict();
                let t = std::time::Instant::now();
                let id = vm.new_stream(props.clone()).unwrap();
                black_box(vm.on_new_connection(id).unwrap());
                spent += t.elapsed();
                open.push(id);
                if open.len() == 16 || i + 1 == iters {
                    evict();
                    let t = std::time::Instant::now();
                    for id in open.drain(..) {
                        black_box(vm.finish(id).unwrap());
                    }
                    spent += t.elapsed();
                }
            }
            spent
        });
    });

    // The same seven guest entries into a guest that returns at once: what
    // the host and wasmtime cost per flow, with no guest work.
    let mut vm = Vm::start(&code_of("null-guest", "")).unwrap();
    c.bench_function("flow/null", |b| {
        b.iter(|| {
            let id = vm.new_stream(props.clone()).unwrap();
            black_box(vm.on_new_connection(id).unwrap());
            black_box(vm.finish(id).unwrap());
        });
    });
    c.bench_function("flow/null-cold", |b| {
        b.iter_batched(
            &mut evict,
            |()| {
                let id = vm.new_stream(props.clone()).unwrap();
                black_box(vm.on_new_connection(id).unwrap());
                black_box(vm.finish(id).unwrap());
            },
            criterion::BatchSize::PerIteration,
        );
    });

    let reading = code("echo_props=1\nverdict=allow");
    let mut vm = Vm::start(&reading).unwrap();
    c.bench_function("flow/properties", |b| {
        b.iter(|| {
            let id = vm.new_stream(props.clone()).unwrap();
            black_box(vm.on_new_connection(id).unwrap());
            black_box(vm.finish(id).unwrap());
        });
    });

    // The properties map alone, to tell the host's share from the guest's.
    c.bench_function("flow/properties-map-clone", |b| b.iter(|| black_box(props.clone())));

    let request: Vec<(String, Vec<u8>)> = [
        (":authority", "api.example.test"),
        (":scheme", "http"),
        (":path", "/v1/items?page=2"),
        (":method", "GET"),
        ("user-agent", "curl/8.5.0"),
        ("accept", "*/*"),
        ("accept-encoding", "gzip"),
        ("x-request-id", "4bf92f3577b34da6a3ce929d0e0e4736"),
        ("authorization", "Bearer abc.def.ghi"),
        ("x-tenant", "payments"),
        ("cookie", "session=1234567890abcdef"),
        ("content-type", "application/json"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
    .collect();
    let response: Vec<(String, Vec<u8>)> = [
        (":status", "200"),
        ("content-type", "application/json"),
        ("content-length", "512"),
        ("date", "Mon, 07 Dec 2026 07:00:00 GMT"),
        ("cache-control", "no-store"),
        ("server", "origin"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
    .collect();
    for (name, config) in [
        ("http/exchange", "http=1"),
        ("http/exchange-add-header", "http=1\nadd_header=x-added:yes"),
    ] {
        let mut vm = Vm::start(&code(config)).unwrap();
        c.bench_function(name, |b| {
            b.iter(|| {
                let id = vm.new_stream(props.clone()).unwrap();
                vm.http_parts(id).unwrap().request_headers = Some(request.clone());
                black_box(vm.on_http(id, HttpEvent::RequestHeaders, true).unwrap());
                black_box(vm.http_parts(id).unwrap().request_headers.clone());
                vm.http_parts(id).unwrap().response_headers = Some(response.clone());
                black_box(vm.on_http(id, HttpEvent::ResponseHeaders, false).unwrap());
                black_box(vm.finish_http(id).unwrap());
            });
        });
    }
    c.final_summary();
}
