//! Fuzzes configuration loading: any text must give a `Config` or located
//! errors, never a panic; and a config that loads must compile into a policy.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match sluice_api::config::load_str(text, "fuzz.yaml") {
        Ok(cfg) => {
            let _ = sluice::policy::Policy::compile(&cfg);
        }
        Err(errors) => assert!(!errors.0.is_empty()),
    }
});
