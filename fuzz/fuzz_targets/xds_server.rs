//! Fuzzes the control server's protocol core: any sequence of requests
//! (SotW or Delta, split from the input) against a fixed snapshot must be
//! answered, ignored or refused with a protocol error, never a panic, and
//! every response must keep the protocol's invariants.

#![no_main]

use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use sluice_xds::ads::{DeltaStream, SotwStream};
use sluice_xds::snapshot::Snapshot;

fn snapshot() -> Snapshot {
    let (_, resources) = {
        let mut a = sluice_api::config::Assembly::new();
        a.add_file(
            "webgroups:\n  - {name: g, domains: [a.example]}\npolicy:\n  rules:\n    - {name: r, to: {webgroups: [g]}, action: allow}\n",
            "fuzz.yaml",
        );
        let r = a.resources();
        (a.build(), r)
    };
    sluice_xds::source::snapshot(&resources, &[]).unwrap_or_default()
}

fuzz_target!(|data: &[u8]| {
    let snap = snapshot();
    let Some((&mode, rest)) = data.split_first() else { return };
    // Length-prefixed requests: one byte of length, then the message.
    let mut chunks = Vec::new();
    let mut rest = rest;
    while let Some((&n, tail)) = rest.split_first() {
        let n = usize::from(n).min(tail.len());
        chunks.push(&tail[..n]);
        rest = &tail[n..];
    }
    if mode & 1 == 1 {
        let mut s = DeltaStream::new();
        for c in chunks {
            let Ok(req) = DeltaDiscoveryRequest::decode(c) else { continue };
            match s.on_request(req, &snap) {
                Ok(out) => assert!(out.responses.iter().all(|r| !r.nonce.is_empty())),
                Err(_) => return,
            }
        }
        let _ = s.on_snapshot(&snap);
    } else {
        let mut s = SotwStream::new();
        for c in chunks {
            let Ok(req) = DiscoveryRequest::decode(c) else { continue };
            match s.on_request(req, &snap) {
                Ok(out) => assert!(out.responses.iter().all(|r| !r.nonce.is_empty())),
                Err(_) => return,
            }
        }
        let _ = s.on_snapshot(&snap);
    }
});
