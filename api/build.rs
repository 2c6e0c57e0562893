//! Generates Rust types for Sluice's own xDS resources (`proto/`) with
//! protox, a protobuf compiler written in Rust, and prost-build: building
//! Sluice needs no `protoc`.

use std::error::Error;

const PROTOS: &[&str] = &["sluice/v1/resources.proto"];

fn main() -> Result<(), Box<dyn Error>> {
    let files = protox::compile(PROTOS, ["proto"])?;
    let mut config = prost_build::Config::new();
    // Maps as BTreeMap: the encoding of a message is then the same bytes
    // every time, and a resource's version (a hash of its encoding) only
    // changes when its content does.
    config.btree_map(["."]);
    // `impl prost::Name`: type URLs type.googleapis.com/sluice.v1.<Name>.
    config.enable_type_names();
    config.type_name_domain(["."], "type.googleapis.com");
    config.compile_fds(files)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
