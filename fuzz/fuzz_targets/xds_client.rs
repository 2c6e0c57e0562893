//! Fuzzes what a gateway does with what a control server sends: any bytes
//! as a Delta or a State-of-the-World response must be held or refused
//! (never a panic), and the configuration they make must validate or give
//! errors that name a resource.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use sluice::xds::AdsClient;
use sluice_api::config::Assembly;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, DiscoveryResponse};

const BASE: &str = "listeners:\n  - {name: proxy, kind: http-proxy, address: 127.0.0.1:3128}\n";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let bootstrap = sluice_api::XdsBootstrap {
        servers: vec![],
        node: sluice_api::XdsNode {
            id: "fuzz".into(),
            cluster: String::new(),
            metadata: Default::default(),
        },
        delta: mode & 1 == 1,
        initial_fetch_timeout: std::time::Duration::from_secs(1),
        tls: None,
        listeners: mode & 2 == 2,
    };
    let mut client = AdsClient::new(&bootstrap);
    let _ = client.on_connect();
    let held = if bootstrap.delta {
        DeltaDiscoveryResponse::decode(rest).map(|r| client.on_delta(r).is_ok())
    } else {
        DiscoveryResponse::decode(rest).map(|r| client.on_sotw(r).is_ok())
    };
    if held != Ok(true) {
        return;
    }
    let candidate = match client.candidate() {
        Ok(c) => c,
        Err(why) => {
            let _ = client.reject(&why.message);
            return;
        }
    };
    let mut a = Assembly::new();
    a.add_file(BASE, "fuzz.yaml");
    a.replace_with(&candidate);
    match a.build() {
        Ok(cfg) => {
            let _ = sluice::policy::Policy::compile(&cfg);
            let _ = client.commit();
        }
        Err(errors) => {
            assert!(!errors.0.is_empty());
            let _ = client.reject(&errors.to_string());
        }
    }
});
