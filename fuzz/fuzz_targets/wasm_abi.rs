//! Fuzzes what the WASM host decodes from a guest before acting on it: a
//! header map in the ABI's pairs encoding and a property path. Neither may
//! panic; a map that decodes must encode back to the same bytes (the
//! encoding has one form per map, the empty map aside), and every segment
//! of a path that splits is non-empty or comes from the guest's own bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::wasm::abi::{PairsLimits, decode_pairs, encode_pairs, split_path};

fuzz_target!(|data: &[u8]| {
    let limits = PairsLimits {
        max_pairs: 64,
        max_bytes: 64 * 1024,
    };
    if let Ok(pairs) = decode_pairs(data, limits) {
        assert!(pairs.len() <= limits.max_pairs);
        let again = encode_pairs(&pairs);
        if pairs.is_empty() {
            assert!(data.is_empty() || data == [0, 0, 0, 0]);
        } else {
            assert_eq!(again, data, "a decoded map encodes back to its bytes");
        }
    }
    if let Ok(segments) = split_path(data) {
        assert!(!segments.is_empty());
        let total: usize = segments.iter().map(|s| s.len()).sum();
        assert!(total <= data.len());
    }
});
