//! `sluice-xds`: the control server. For now it validates configuration
//! files with the same code the proxy uses, so a control-plane operator can
//! check what it will serve; the ADS service arrives with the xDS work.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    match (args.next().as_deref(), args.collect::<Vec<_>>()) {
        (Some("validate"), files) if !files.is_empty() => {
            let mut ok = true;
            for f in files.iter().map(PathBuf::from) {
                match sluice_api::config::load_file(&f) {
                    Ok(c) => println!("{}: OK ({} rules)", f.display(), c.policy.rules.len()),
                    Err(e) => {
                        eprintln!("{e}");
                        ok = false;
                    }
                }
            }
            if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        _ => {
            eprintln!("usage: sluice-xds validate FILE...");
            ExitCode::from(2)
        }
    }
}
