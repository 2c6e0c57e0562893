//! Fuzzes the TLS ClientHello classifier: it must never panic, a prefix of any
//! input must give `NeedMore` or the whole input's result, `NeedMore` hints must
//! never skip past the point where the outcome is decided, and a hello it
//! accepts must parse the same when its handshake message is re-framed into
//! other records.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::classify::{Limits, Progress, parse_client_hello, sniff};

fuzz_target!(|data: &[u8]| {
    let _ = sniff(data);
    let limits = Limits::default();
    let parse = |input: &[u8]| parse_client_hello(input, &limits);
    let whole = parse(data);

    // Follow the hints from the empty prefix: each hop lands on NeedMore or on
    // the first decided prefix, which must match the whole input.
    let mut k = 0usize;
    loop {
        let Some(prefix) = data.get(..k) else {
            assert!(
                matches!(whole, Ok(Progress::NeedMore { .. })),
                "hints overshot a decision: {whole:?}"
            );
            break;
        };
        match parse(prefix) {
            Ok(Progress::NeedMore { at_least }) => {
                let hop = at_least.unwrap_or(1);
                assert!(hop >= 1);
                k += hop;
            }
            decided => {
                assert_eq!(decided, whole, "prefix {k} decided differently");
                if k > 0 {
                    assert!(
                        matches!(parse(&data[..k - 1]), Ok(Progress::NeedMore { .. })),
                        "hint skipped past prefix {}",
                        k - 1
                    );
                }
                break;
            }
        }
    }

    if let Ok(Progress::Done(hello)) = &whole {
        let handshake = handshake_bytes(data, hello.handshake_len);
        assert_eq!(handshake.len(), hello.handshake_len);
        // Cut points taken from the input itself so the fuzzer explores them.
        let seed = data.iter().fold(0usize, |acc, &b| {
            acc.wrapping_mul(31).wrapping_add(usize::from(b))
        });
        let len = handshake.len();
        let mut cuts = vec![1 + seed % len, 1 + (seed / 7) % len, 1 + (seed / 131) % len];
        cuts.sort_unstable();
        cuts.dedup();
        let reframed = reframe(&handshake, &cuts);
        assert_eq!(parse(&reframed), whole, "re-framed at {cuts:?}");
    }
});

/// The first `total` handshake bytes carried by the records at the start of
/// `data` (already validated by the parser).
fn handshake_bytes(data: &[u8], total: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut pos = 0;
    while out.len() < total && pos + 5 <= data.len() {
        let len = usize::from(u16::from_be_bytes([data[pos + 3], data[pos + 4]]));
        let end = (pos + 5 + len).min(data.len());
        let take = (end - (pos + 5)).min(total - out.len());
        out.extend_from_slice(&data[pos + 5..pos + 5 + take]);
        pos += 5 + len;
    }
    out
}

fn reframe(handshake: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut bounds = vec![0];
    bounds.extend(cuts.iter().copied().filter(|&c| c < handshake.len()));
    bounds.push(handshake.len());
    let mut out = Vec::new();
    for w in bounds.windows(2) {
        let part = &handshake[w[0]..w[1]];
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&(part.len() as u16).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}
