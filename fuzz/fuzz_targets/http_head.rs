//! Fuzzes the HTTP/1 request-head classifier: it must never panic, and any
//! prefix of the input must give `NeedMore` or the whole input's result (so TCP
//! segmentation cannot change a decision). Prefixes are sampled, since checking
//! every one is quadratic in the input.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::classify::{HttpLimits, Progress, parse_authority, parse_request_head};

fuzz_target!(|data: &[u8]| {
    let _ = parse_authority(data);
    let limits = HttpLimits::default();
    let parse = |input: &[u8]| parse_request_head(input, &limits);
    let whole = parse(data);
    if let Ok(Progress::Done(head)) = &whole {
        assert!(head.head_len <= data.len() && head.head_len <= limits.max_head);
    }
    let steps = 32.min(data.len());
    for i in 0..steps {
        let k = i * data.len() / steps;
        let part = parse(&data[..k]);
        assert!(
            matches!(part, Ok(Progress::NeedMore { .. })) || part == whole,
            "prefix {k}: {part:?} vs {whole:?}"
        );
    }
    if let Some(last) = data.len().checked_sub(1) {
        let part = parse(&data[..last]);
        assert!(matches!(part, Ok(Progress::NeedMore { .. })) || part == whole);
    }
});
