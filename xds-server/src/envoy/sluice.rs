//! The directory's listeners as a Sluice gateway takes them over LDS
//! (`xds.listeners: true`), not the RBAC translation stock Envoy gets: each
//! is a `Listener` whose one chain is `sluice.policy` → Sluice's filter for
//! the listener's kind (`sluice.transparent`, `sluice.tcp`, `sluice.sni`,
//! `sluice.http_proxy`, `sluice.dns`, `sluice.quic`), whose `google.protobuf.Struct`
//! holds every setting of the listener as `sluice.yaml` writes it. The
//! gateway reads them back with the file's own reader
//! (`sluice_api::xds::gateway`), so nothing is lost on the way: an
//! explicit proxy's users (with their passwords: serve xDS over TLS), a
//! transparent listener's `sni_check`, a DNS listener's upstreams. The
//! policy travels as Sluice's `Policy` resource.

use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
use sluice_api::Config;

use super::{pack, socket};
use crate::snapshot::Resource;

/// The resources for Sluice gateways of `config`'s listeners.
pub fn for_sluice(config: &Config) -> Vec<Resource> {
    let mut out = Vec::new();
    for l in &config.listeners {
        let (Some(name), Some(settings)) = (
            sluice_api::xds::filter_name::of(l.kind.ty()),
            sluice_api::config::listener_settings(&l.kind),
        ) else {
            continue;
        };
        let own = Filter {
            name: name.to_owned(),
            config_type: Some(filter::ConfigType::TypedConfig(pack(&sluice_api::xds::json_struct(
                &settings,
            )))),
        };
        let policy = Filter {
            name: sluice_api::envoy::POLICY.to_owned(),
            config_type: None,
        };
        out.push(Resource::new(
            l.name.clone(),
            pack(&Listener {
                name: l.name.clone(),
                address: Some(socket(l.address.ip(), l.address.port())),
                filter_chains: vec![FilterChain {
                    name: "sluice".to_owned(),
                    filters: vec![policy, own],
                    ..FilterChain::default()
                }],
                ..Listener::default()
            }),
        ));
    }
    out
}
