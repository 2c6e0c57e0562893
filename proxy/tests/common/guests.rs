//! The WASM guests the tests run, built from source (`plugins/`) for
//! `wasm32-wasip1` the first time a test asks for one, by the same cargo
//! and toolchain that runs the tests. Nothing prebuilt is committed.

#![allow(dead_code, reason = "each test binary uses a subset of the guests")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The path of guest crate `name`'s module, building the guests once per
/// test binary.
pub fn guest(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT.get_or_init(build).as_ref().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.join(format!("{}.wasm", name.replace('-', "_")));
    assert!(path.is_file(), "no guest module at {}", path.display());
    path
}

/// The bytes of guest `name`.
pub fn guest_bytes(name: &str) -> Vec<u8> {
    std::fs::read(guest(name)).unwrap_or_else(|e| panic!("reading guest {name}: {e}"))
}

fn build() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let manifest = root.join("plugins/Cargo.toml");
    let target = root.join("target/wasm-guests");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let out = Command::new(&cargo)
        .current_dir(root.join("plugins"))
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "wasm32-wasip1",
            "--manifest-path",
        ])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target)
        // The outer build's settings are for the host, not the guests.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .map_err(|e| format!("cannot run {cargo}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building the WASM guests failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(target.join("wasm32-wasip1/release"))
}

/// The module of AssemblyScript plugin `name` (`plugins/assemblyscript/`),
/// built once per test binary: its sources are copied to
/// `target/as-guests/NAME`, its packages installed from its lock file
/// (`npm ci`, the npm registry) and `asc` run as its `build` script says.
/// Needs Node.js and npm (Debian's `nodejs` and `npm`).
pub fn assemblyscript(name: &str) -> PathBuf {
    type Built = Vec<(String, Result<PathBuf, String>)>;
    static BUILT: OnceLock<std::sync::Mutex<Built>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, r)) = built.iter().find(|(n, _)| n == name) {
        return r.clone().unwrap_or_else(|e| panic!("{e}"));
    }
    let r = build_assemblyscript(name);
    built.push((name.to_owned(), r.clone()));
    r.unwrap_or_else(|e| panic!("{e}"))
}

fn build_assemblyscript(name: &str) -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let src = root.join("plugins/assemblyscript").join(name);
    let dir = root.join("target/as-guests").join(name);
    std::fs::create_dir_all(dir.join("assembly")).map_err(|e| format!("{}: {e}", dir.display()))?;
    for file in ["package.json", "package-lock.json", "assembly/index.ts"] {
        std::fs::copy(src.join(file), dir.join(file)).map_err(|e| format!("copying {file}: {e}"))?;
    }
    let run = |args: &[&str]| -> Result<(), String> {
        let out = Command::new("npm")
            .args(args)
            .current_dir(&dir)
            // npm's cache stays in the build tree, not in the user's home.
            .env("npm_config_cache", root.join("target/npm-cache"))
            .output()
            .map_err(|e| format!("cannot run npm (install Debian's nodejs and npm): {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "npm {} failed ({}):\n{}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    if !dir.join("node_modules/.bin/asc").exists() {
        run(&["ci", "--no-audit", "--no-fund"])?;
    }
    run(&["run", "build"])?;
    let wasm = dir.join("build").join(format!("{}.wasm", name.replace('-', "_")));
    if wasm.is_file() {
        Ok(wasm)
    } else {
        Err(format!("asc built no {}", wasm.display()))
    }
}
