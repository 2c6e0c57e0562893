//! A cargo started from inside a test, to build a binary the test runs.
//! Shared by `#[path]` with tests of other crates (proxy/tests/multihost.rs).

use std::process::Command;

/// Leaves out of `cmd`'s environment the variables `cargo test` gives the
/// test process for its own package (CARGO_MANIFEST_DIR, CARGO_PKG_NAME,
/// …). Build scripts that declare them with `rerun-if-env-changed` (ring's
/// does) would see them change and rebuild, in the inner build and again
/// in the next outer one.
pub fn without_test_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let Some(k) = key.to_str() else { continue };
        if ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_CRATE_", "CARGO_BIN_"]
            .iter()
            .any(|p| k.starts_with(p))
            || ["CARGO_PRIMARY_PACKAGE", "CARGO_TARGET_TMPDIR", "OUT_DIR"].contains(&k)
        {
            cmd.env_remove(k);
        }
    }
}
