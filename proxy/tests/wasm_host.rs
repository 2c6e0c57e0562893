#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]
//! The WASM host against a real proxy-wasm guest (`plugins/test-guest`,
//! built from source for wasm32-wasip1 by the test build): module checks,
//! the start-up order, properties, verdicts and annotations, shared data,
//! the sandbox's environment, and what happens to a guest that traps, runs
//! past its deadline or eats its memory.

#[path = "common/guests.rs"]
mod guests;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use guests::guest_bytes;
use sluice::wasm::abi::{AbiVersion, Action, StreamType};
use sluice::wasm::engine::{self, CompileError};
use sluice::wasm::shared::{PluginMetrics, SharedData, SharedQueues};
use sluice::wasm::vm::HttpEvent;
use sluice::wasm::{PluginCode, PluginLimits, Vm, VmError};

fn engine() -> sluice::wasm::WasmEngine {
    engine::shared().expect("the WASM engine starts")
}

/// The test guest, configured with `config` (lines of `key=value`).
fn code(config: &str) -> PluginCode {
    code_with(config, Vec::new(), PluginLimits::default(), Arc::default())
}

fn code_with(config: &str, env: Vec<(String, String)>, limits: PluginLimits, shared: Arc<SharedData>) -> PluginCode {
    let engine = engine();
    // Compiled once per test binary (Cranelift in a debug build is slow).
    static MODULE: std::sync::OnceLock<sluice::wasm::PluginModule> = std::sync::OnceLock::new();
    let module = MODULE.get_or_init(|| {
        engine
            .compile(&guest_bytes("test-guest"), None)
            .expect("the guest compiles")
    });
    assert_eq!(module.abi, AbiVersion::V0_2_1);
    PluginCode::link(
        &engine,
        "test-guest",
        module,
        config.as_bytes().to_vec(),
        env,
        limits,
        shared,
        Arc::new(SharedQueues::default()),
        Arc::new(PluginMetrics::default()),
    )
    .expect("the guest links")
}

fn props(pairs: &[(&str, &[u8])]) -> HashMap<String, Vec<u8>> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), v.to_vec())).collect()
}

/// The annotations a stream's guest wrote (`sluice.annotation.*`).
fn annotations(vm: &Vm, id: u32) -> HashMap<String, String> {
    vm.stream(id)
        .expect("the stream is open")
        .properties
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("sluice.annotation.")
                .map(|k| (k.to_owned(), String::from_utf8_lossy(v).into_owned()))
        })
        .collect()
}

// A module with a memory and nothing else; and one that adds the 0.2.1
// marker but exports no allocator.
const MEMORY_ONLY: &[u8] = &[
    0, b'a', b's', b'm', 1, 0, 0, 0, // magic, version
    5, 3, 1, 0, 1, // memory section: one memory, min 1 page
    7, 10, 1, 6, b'm', b'e', b'm', b'o', b'r', b'y', 2, 0, // export "memory"
];

fn marker_without_allocator() -> Vec<u8> {
    let marker = b"proxy_abi_version_0_2_1";
    let mut m = vec![0, b'a', b's', b'm', 1, 0, 0, 0];
    m.extend_from_slice(&[1, 4, 1, 0x60, 0, 0]); // type: () -> ()
    m.extend_from_slice(&[3, 2, 1, 0]); // one function of type 0
    m.extend_from_slice(&[5, 3, 1, 0, 1]); // memory
    let mut exports = vec![2, 6];
    exports.extend_from_slice(b"memory");
    exports.extend_from_slice(&[2, 0, marker.len() as u8]);
    exports.extend_from_slice(marker);
    exports.extend_from_slice(&[0, 0]);
    m.push(7);
    m.push(exports.len() as u8);
    m.extend_from_slice(&exports);
    m.extend_from_slice(&[10, 4, 1, 2, 0, 0x0b]); // code: an empty body
    m
}

#[test]
fn modules_the_host_cannot_serve_are_refused_with_what_is_missing() {
    let e = engine();
    let err = e.compile(MEMORY_ONLY, None).unwrap_err();
    assert!(matches!(err, CompileError::UnknownAbi), "{err}");
    assert!(err.to_string().contains("proxy_abi_version_0_2_1"), "{err}");
    let err = e.compile(&marker_without_allocator(), None).unwrap_err();
    assert!(matches!(err, CompileError::NoAllocator), "{err}");
    let err = e.compile(b"not wasm at all", None).unwrap_err();
    assert!(matches!(err, CompileError::Invalid(_)), "{err}");

    let wasm = guest_bytes("test-guest");
    let wrong = "0".repeat(64);
    let err = e.compile(&wasm, Some(&wrong)).unwrap_err();
    assert!(matches!(err, CompileError::Sha256Mismatch { .. }), "{err}");
    let right = engine::hex_sha256(&wasm);
    assert_eq!(e.compile(&wasm, Some(&right.to_uppercase())).unwrap().sha256, right);
}

#[test]
fn a_plugin_that_refuses_or_traps_while_configuring_does_not_start() {
    let err = Vm::start(&code("configure=false")).unwrap_err();
    assert!(
        matches!(
            &err,
            VmError::Refused {
                callback: "proxy_on_configure",
                ..
            }
        ),
        "{err:?}"
    );

    let err = Vm::start(&code("start=trap")).unwrap_err();
    let VmError::Trap { callback, detail } = &err else {
        panic!("expected a trap, got {err:?}");
    };
    assert_eq!(*callback, "proxy_on_configure");
    // The guest's backtrace names the guest's own function.
    assert!(detail.contains("on_configure"), "{detail}");
}

#[test]
fn a_stream_reads_the_flows_properties_and_writes_its_verdict_and_notes() {
    let mut vm = Vm::start(&code("echo_props=1\nverdict=deny\nannotate=team:payments")).unwrap();
    let id = vm
        .new_stream(props(&[
            ("source.address", b"10.0.0.7:5555"),
            ("destination.port", &443i64.to_le_bytes()),
            ("connection.requested_server_name", b"api.example.test"),
            ("sluice.listener", b"egress"),
            ("sluice.protocol", b"tls"),
            ("sluice.verdict.action", b"allow"),
        ]))
        .unwrap();
    let answer = vm.on_new_connection(id).unwrap();
    assert_eq!(answer.action, Action::Continue);
    assert_eq!(answer.requests.close, None);
    let notes = annotations(&vm, id);
    assert_eq!(notes["source.address"], "10.0.0.7:5555");
    assert_eq!(notes["destination.port"], "443", "integers are 8-byte little-endian");
    assert_eq!(notes["connection.requested_server_name"], "api.example.test");
    assert_eq!(notes["sluice.listener"], "egress");
    assert_eq!(notes["sluice.verdict.action"], "allow");
    assert_eq!(notes["sluice.host"], "absent", "a property the flow lacks is not found");
    assert_eq!(notes["plugin_name"], "test-guest");
    assert_eq!(notes["team"], "payments");
    let state = vm.finish(id).unwrap();
    assert_eq!(state.properties["sluice.verdict"], b"deny");
    assert!(vm.stream(id).is_none(), "a finished stream is forgotten");
}

#[test]
fn closing_the_stream_is_a_request_the_host_carries_out_after_the_call() {
    let mut vm = Vm::start(&code("deny_sni=evil.test")).unwrap();
    let evil = vm
        .new_stream(props(&[("connection.requested_server_name", b"evil.test")]))
        .unwrap();
    let good = vm
        .new_stream(props(&[("connection.requested_server_name", b"good.test")]))
        .unwrap();
    assert_eq!(
        vm.on_new_connection(evil).unwrap().requests.close,
        Some(StreamType::Downstream)
    );
    assert_eq!(vm.on_new_connection(good).unwrap().requests.close, None);
}

#[test]
fn data_callbacks_see_the_bytes_and_a_rewrite_is_reported() {
    let mut vm = Vm::start(&code("data_deny=DROP TABLE")).unwrap();
    let id = vm.new_stream(HashMap::new()).unwrap();
    assert_eq!(vm.on_data(id, true, b"SELECT 1", false).unwrap().requests.close, None);
    assert_eq!(
        vm.on_data(id, true, b"x; DROP TABLE users", false)
            .unwrap()
            .requests
            .close,
        Some(StreamType::Downstream)
    );
    let mut vm = Vm::start(&code("rewrite=1")).unwrap();
    let id = vm.new_stream(HashMap::new()).unwrap();
    assert!(vm.on_data(id, true, b"original", false).unwrap().requests.rewrote);
}

#[test]
fn shared_data_is_shared_by_every_instance_of_a_plugin() {
    let shared = Arc::new(SharedData::default());
    let make = || code_with("count=budget", Vec::new(), PluginLimits::default(), shared.clone());
    let (a, b) = (make(), make());
    let mut vms = [Vm::start(&a).unwrap(), Vm::start(&b).unwrap()];
    let mut counts = Vec::new();
    for i in [0, 1, 0] {
        let vm = &mut vms[i];
        let id = vm.new_stream(HashMap::new()).unwrap();
        vm.on_new_connection(id).unwrap();
        counts.push(annotations(vm, id)["count"].clone());
    }
    assert_eq!(counts, ["1", "2", "3"]);
    assert_eq!(shared.get(b"budget").map(|(v, _)| v), Some(b"3".to_vec()));
}

#[test]
fn the_environment_is_only_what_the_plugin_is_given() {
    // The host's PATH is set in every test process.
    assert!(std::env::var("PATH").is_ok());
    let mut vm = Vm::start(&code("env=PATH")).unwrap();
    let id = vm.new_stream(HashMap::new()).unwrap();
    vm.on_new_connection(id).unwrap();
    assert_eq!(
        annotations(&vm, id)["env"],
        "unset",
        "the host's environment never leaks"
    );

    let env = vec![("GREETING".to_owned(), "hello".to_owned())];
    let mut vm = Vm::start(&code_with("env=GREETING", env, PluginLimits::default(), Arc::default())).unwrap();
    let id = vm.new_stream(HashMap::new()).unwrap();
    vm.on_new_connection(id).unwrap();
    assert_eq!(annotations(&vm, id)["env"], "hello");
}

#[test]
fn a_guest_that_prints_is_logged_not_failed() {
    let mut vm = Vm::start(&code("print=hello from the guest")).unwrap();
    let id = vm.new_stream(HashMap::new()).unwrap();
    assert_eq!(vm.on_new_connection(id).unwrap().action, Action::Continue);
}

#[test]
fn a_callback_past_its_deadline_is_stopped() {
    let limits = PluginLimits {
        deadline: Duration::from_millis(20),
        ..PluginLimits::default()
    };
    let mut vm = Vm::start(&code_with("connection=spin", Vec::new(), limits, Arc::default())).unwrap();
    let id = vm.new_stream(HashMap::new()).unwrap();
    let err = vm.on_new_connection(id).unwrap_err();
    assert_eq!(
        err,
        VmError::Deadline {
            callback: "proxy_on_new_connection",
            deadline_ms: 20
        }
    );
}

#[test]
fn memory_past_the_plugins_limit_is_refused_and_reported() {
    let limits = PluginLimits {
        max_memory: 8 << 20,
        ..PluginLimits::default()
    };
    let mut vm = Vm::start(&code_with("connection=grow", Vec::new(), limits, Arc::default())).unwrap();
    let id = vm.new_stream(HashMap::new()).unwrap();
    let err = vm.on_new_connection(id).unwrap_err();
    assert_eq!(
        err,
        VmError::MemoryLimit {
            callback: "proxy_on_new_connection",
            max_memory: 8 << 20
        }
    );
}

#[test]
fn a_trap_in_a_stream_callback_names_the_callback_and_the_guest_frames() {
    let mut vm = Vm::start(&code("connection=trap")).unwrap();
    let id = vm.new_stream(HashMap::new()).unwrap();
    let err = vm.on_new_connection(id).unwrap_err();
    let VmError::Trap { callback, detail } = &err else {
        panic!("expected a trap, got {err:?}");
    };
    assert_eq!(*callback, "proxy_on_new_connection");
    assert!(detail.contains("on_new_connection"), "{detail}");
}

#[test]
fn a_host_call_from_inside_the_guests_allocator_is_refused() {
    let engine = engine();
    let module = engine
        .compile(&guests::guest_bytes("bad-allocator"), None)
        .expect("the raw guest compiles");
    let code = PluginCode::link(
        &engine,
        "bad-allocator",
        &module,
        b"some configuration".to_vec(),
        Vec::new(),
        PluginLimits::default(),
        Arc::default(),
        Arc::new(SharedQueues::default()),
        Arc::new(PluginMetrics::default()),
    )
    .unwrap();
    let err = Vm::start(&code).unwrap_err();
    let VmError::Trap { callback, detail } = &err else {
        panic!("expected a trap, got {err:?}");
    };
    assert_eq!(*callback, "proxy_on_configure");
    assert!(
        detail.contains("`proxy_get_property` may not be called from inside the guest's allocator"),
        "{detail}"
    );
}

#[test]
fn compiled_modules_are_kept_on_disk_in_a_directory_only_this_user_can_write() {
    use engine::Origin;
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cache_path = dir.path().join("cache");
    let cache = sluice::sys::TrustedDir::open(&cache_path).unwrap();
    assert_eq!(
        std::fs::metadata(&cache_path).unwrap().permissions().mode() & 0o777,
        0o700
    );
    // Engines made here share nothing in memory, as two runs of the
    // process would not.
    let fresh = || engine::WasmEngine::new(2, 1 << 24).unwrap();
    let wasm = guest_bytes("test-guest");
    let compiled = fresh().compile_cached(&wasm, None, Some(&cache)).unwrap();
    assert_eq!(compiled.origin, Origin::Compiled);
    let files: Vec<_> = std::fs::read_dir(&cache_path)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(&compiled.sha256))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].ends_with(".cwasm"), "{files:?}");
    // Another engine (another run) reads it back instead of compiling.
    let again = fresh().compile_cached(&wasm, None, Some(&cache)).unwrap();
    assert_eq!(again.origin, Origin::Disk);
    // A foreign file in its place is dropped and the module compiled
    // again. (Put there by a rename, as the cache writes: a file mapped by
    // a live module must never be rewritten in place.)
    drop(again);
    let foreign = dir.path().join("foreign");
    std::fs::write(&foreign, b"not a compiled module").unwrap();
    std::fs::rename(&foreign, cache_path.join(&files[0])).unwrap();
    let repaired = fresh().compile_cached(&wasm, None, Some(&cache)).unwrap();
    assert_eq!(repaired.origin, Origin::Compiled);
    assert_eq!(
        fresh().compile_cached(&wasm, None, Some(&cache)).unwrap().origin,
        Origin::Disk
    );
    // A directory others can write is refused.
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let refused = sluice::sys::TrustedDir::open(&open).unwrap_err();
    assert!(refused.to_string().contains("make it 0700"), "{refused}");
}

#[test]
fn a_context_whose_on_done_says_not_yet_ends_when_the_guest_calls_done() {
    use sluice::wasm::vm::MAX_DONE_WAIT;
    use std::time::Instant;
    let shared = Arc::new(SharedData::default());
    let code = code_with("done_later=1", Vec::new(), PluginLimits::default(), shared.clone());
    let logged = || shared.get(b"logged").map(|(v, _)| String::from_utf8(v).unwrap());
    let mut vm = Vm::start(&code).unwrap();
    let id = vm.new_stream(HashMap::new()).unwrap();
    vm.on_new_connection(id).unwrap();
    vm.finish(id).unwrap();
    assert_eq!(vm.deferred(), 1);
    assert!(vm.stream(id).is_some(), "the context waits for proxy_done");
    assert_eq!(logged(), None, "on_log waits too");
    vm.finish_deferred(Instant::now()).unwrap();
    assert_eq!(vm.deferred(), 1, "the guest has not called proxy_done yet");
    // Its tick calls proxy_done for the waiting context.
    vm.tick().unwrap();
    vm.finish_deferred(Instant::now()).unwrap();
    assert_eq!(vm.deferred(), 0);
    assert!(vm.stream(id).is_none());
    assert_eq!(logged().as_deref(), Some("1"));
    // A guest that never calls it: ended once the wait is over.
    let id = vm.new_stream(HashMap::new()).unwrap();
    vm.on_new_connection(id).unwrap();
    vm.finish(id).unwrap();
    vm.finish_deferred(Instant::now()).unwrap();
    assert!(vm.stream(id).is_some());
    vm.finish_deferred(Instant::now() + MAX_DONE_WAIT + Duration::from_secs(1))
        .unwrap();
    assert!(vm.stream(id).is_none());
    assert_eq!(logged().as_deref(), Some("2"));
}

/// The null guest (`plugins/null-guest`): the raw ABI, every callback a
/// flow reaches returning at once. The benchmarks run it to tell the
/// host's share of a flow from a plugin's own.
fn null_code() -> PluginCode {
    let engine = engine();
    let module = engine
        .compile(&guest_bytes("null-guest"), None)
        .expect("the null guest compiles");
    assert_eq!(module.abi, AbiVersion::V0_2_1);
    PluginCode::link(
        &engine,
        "null-guest",
        &module,
        Vec::new(),
        Vec::new(),
        PluginLimits::default(),
        Arc::default(),
        Arc::new(SharedQueues::default()),
        Arc::new(PluginMetrics::default()),
    )
    .expect("the null guest links")
}

#[test]
fn a_guest_that_returns_at_once_lets_every_flow_and_request_through_unchanged() {
    let mut vm = Vm::start(&null_code()).expect("the null guest starts");
    for _ in 0..3 {
        let id = vm
            .new_stream(props(&[("connection.requested_server_name", b"api.example.com")]))
            .unwrap();
        let answer = vm.on_new_connection(id).unwrap();
        assert_eq!(answer.action, Action::Continue);
        assert_eq!(answer.requests.close, None);
        assert!(vm.on_data(id, true, b"hello", false).unwrap().requests.close.is_none());
        vm.finish(id).unwrap();
        assert!(vm.stream(id).is_none(), "the context ended");
    }
    // An HTTP context: no header callback, so nothing is changed and the
    // caller keeps its own fields.
    let id = vm.new_stream(HashMap::new()).unwrap();
    vm.http_parts(id).unwrap().request_headers = Some(vec![(":method".to_owned(), b"GET".to_vec())]);
    let answer = vm.on_http(id, HttpEvent::RequestHeaders, true).unwrap();
    assert_eq!(answer.action, Action::Continue);
    assert!(!vm.http_parts(id).unwrap().changed);
    vm.finish_http(id).unwrap();
}

#[test]
fn an_http_context_is_marked_changed_only_when_the_guest_writes_a_header() {
    let request = || {
        vec![
            (":method".to_owned(), b"GET".to_vec()),
            (":path".to_owned(), b"/".to_vec()),
            (":authority".to_owned(), b"api.example.com".to_vec()),
            ("x-keep".to_owned(), b"1".to_vec()),
        ]
    };
    for (config, changed) in [
        ("http=1\ndeny_header=x-absent", false),
        ("http=1\nadd_header=x-added:yes", true),
    ] {
        let mut vm = Vm::start(&code(config)).unwrap();
        let id = vm.new_stream(HashMap::new()).unwrap();
        vm.http_parts(id).unwrap().request_headers = Some(request());
        vm.on_http(id, HttpEvent::RequestHeaders, true).unwrap();
        let parts = vm.http_parts(id).unwrap();
        assert_eq!(parts.changed, changed, "{config}");
        let has_added = parts
            .request_headers
            .as_ref()
            .unwrap()
            .iter()
            .any(|(k, v)| k == "x-added" && v == b"yes");
        assert_eq!(has_added, changed, "{config}");
        vm.finish_http(id).unwrap();
    }
}
