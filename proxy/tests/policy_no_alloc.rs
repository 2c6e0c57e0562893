//! A policy decision allocates nothing: counted with a global allocator
//! over many decisions of every kind (names, addresses, guard, DNS,
//! identities, default).
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]
#![allow(
    unsafe_code,
    reason = "a GlobalAlloc wrapper is unsafe by definition; it only forwards to System"
)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use sluice::policy::{FlowQuery, Policy};
use sluice_api::{DomainName, Protocol};

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    // Only the deciding thread counts: the test harness's own threads
    // allocate whenever they like. Const-initialised, so reading it does not
    // allocate.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn counting() -> bool {
    COUNTING.try_with(Cell::get).unwrap_or(false)
}

// SAFETY: every call forwards to the system allocator with the same
// arguments; the counter has no effect on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if counting() {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if counting() {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn decide_allocates_nothing() {
    let cfg = sluice_api::config::load_str(
        r#"
inventory:
  - {name: agent-1, ips: [10.0.0.7], labels: {app: agent}}
smartgroups:
  - {name: agents, selectors: [{app: agent}]}
  - {name: partners, cidrs: [203.0.113.0/24, "2001:db8::/32"]}
webgroups:
  - {name: apis, domains: ["*.example.com", api.example.org]}
policy:
  mode: enforce
  rules:
    - {name: deny-chat, to: {webgroups: [llm-providers]}, protocols: [http], action: deny}
    - {name: agents-llm, from: [agents], to: {webgroups: [llm-providers, apis]}, protocols: [tls], ports: [443], action: allow}
    - {name: partners, to: {smartgroups: [partners]}, protocols: [tcp], ports: ["1000-2000"], action: allow}
"#,
        "no-alloc.yaml",
    )
    .unwrap();
    let policy = Policy::compile(&cfg);
    let names: Vec<DomainName> = [
        "api.openai.com",
        "x.y.example.com",
        "api.example.org",
        "metadata.google.internal",
        "unknown.test",
    ]
    .iter()
    .map(|n| DomainName::parse(n).unwrap())
    .collect();
    let ips = [
        "10.0.0.7",
        "10.9.9.9",
        "203.0.113.5",
        "2001:db8::1",
        "169.254.169.254",
        "::ffff:127.0.0.1",
    ]
    .map(|s| s.parse::<std::net::IpAddr>().unwrap());
    let agents = policy.smartgroup_id("agents");
    let mut decisions = 0u64;
    COUNTING.with(|c| c.set(true));
    for _ in 0..50 {
        for src in ips {
            for name in names.iter().map(Some).chain([None]) {
                for dst in ips.iter().copied().map(Some).chain([None]) {
                    for protocol in Protocol::ALL {
                        for identity in [None, agents] {
                            let q = FlowQuery {
                                src,
                                name,
                                dst,
                                protocol,
                                port: 443,
                                identity,
                            };
                            std::hint::black_box(policy.decide(std::hint::black_box(&q)));
                            decisions += 1;
                        }
                    }
                }
            }
        }
    }
    COUNTING.with(|c| c.set(false));
    assert_eq!(
        ALLOCS.load(Ordering::Relaxed),
        0,
        "allocations during {decisions} decisions"
    );
    assert!(decisions > 10_000);
}
