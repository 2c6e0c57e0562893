//! Fuzzes what the etcd store reads from outside: store URLs (from the
//! command line) and file names and contents (keys and values under the
//! prefix, which anything with write access to etcd can put there). Every
//! input is either accepted or refused with a typed error, never a panic;
//! an accepted URL prints back as itself once normalised, and a set of
//! accepted files loads (into a configuration or every problem of it).

#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_xds::store::etcd::StoreUrl;
use sluice_xds::store::files::{FileSet, check_name, module_name};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(url) = text.parse::<StoreUrl>() {
        let again: StoreUrl = url.to_string().parse().expect("a printed URL parses");
        assert_eq!(again, url);
    }
    // A module name made from any path is a valid name.
    let _ = check_name(&module_name(std::path::Path::new(&*text)))
        .map_err(|e| panic!("module_name({text:?}): {e}"));
    // Files: NUL-separated name and content pairs.
    let mut set = FileSet::new("etcd://fuzz:1/p");
    let mut parts = data.split(|b| *b == 0);
    while let (Some(name), Some(content)) = (parts.next(), parts.next()) {
        let name = String::from_utf8_lossy(name);
        if check_name(&name).is_ok() {
            let _ = set.insert(&name, content.to_vec(), format!("etcd://fuzz:1/p/{name}"));
        }
    }
    let _ = sluice_xds::source::Source::Files(std::sync::Arc::new(set)).load();
});
