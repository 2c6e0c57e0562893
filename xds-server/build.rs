//! Compiles the vendored Envoy API files (`proto/vendor`, see
//! `proto/README.md`) with protox, a protobuf compiler written in Rust, into
//! a descriptor set for prost-reflect: `sluice-xds` reads plain Envoy
//! resources from YAML/JSON with it. No Rust code is generated for them
//! (envoy-types has the structs) and no `protoc` is needed.
//!
//! Also generates the gRPC client of etcd's v3 API (`proto/etcd`, etcd's
//! own files): the configuration store replicas share.

use std::error::Error;
use std::path::PathBuf;

/// The files whose messages a plain resource may be or hold behind an
/// `Any`; their imports come along.
const ENVOY_ROOTS: &[&str] = &[
    "envoy/config/listener/v3/listener.proto",
    "envoy/config/route/v3/route.proto",
    "envoy/config/cluster/v3/cluster.proto",
    "envoy/config/endpoint/v3/endpoint.proto",
    "envoy/extensions/filters/network/http_connection_manager/v3/http_connection_manager.proto",
    "envoy/extensions/filters/http/router/v3/router.proto",
    "envoy/extensions/filters/network/tcp_proxy/v3/tcp_proxy.proto",
    "envoy/extensions/filters/listener/tls_inspector/v3/tls_inspector.proto",
    "envoy/extensions/filters/listener/original_dst/v3/original_dst.proto",
    "envoy/extensions/filters/listener/http_inspector/v3/http_inspector.proto",
    "envoy/extensions/transport_sockets/tls/v3/tls.proto",
    "envoy/extensions/upstreams/http/v3/http_protocol_options.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    let mut compiler = protox::Compiler::new(["proto/vendor"])?;
    // Comments are not needed to read JSON, and would triple the size.
    compiler.include_imports(true).include_source_info(false);
    compiler.open_files(ENVOY_ROOTS)?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("envoy_descriptors.bin");
    std::fs::write(out, compiler.encode_file_descriptor_set())?;
    // etcd's KV, Watch, Lease and Maintenance clients; no server.
    let etcd = protox::compile(["etcd/api/etcdserverpb/rpc.proto"], ["proto/etcd"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_transport(false)
        .compile_fds(etcd)?;
    println!("cargo:rerun-if-changed=proto/vendor");
    println!("cargo:rerun-if-changed=proto/etcd");
    println!("cargo:rerun-if-changed=build.rs");
    Ok(())
}
