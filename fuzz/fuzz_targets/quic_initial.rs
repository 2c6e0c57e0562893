//! Fuzzes the QUIC Initial classifier with sequences of datagrams. It must
//! never panic, and once a flow is decided every later datagram must get the
//! same answer.
//!
//! Random bytes almost never authenticate, so half of the inputs are sealed
//! first: the fuzz bytes become the plaintext frames of real Initial packets
//! (keys from the classifier's own `client_initial_secrets`, which the tests
//! pin to RFC 9001 and RFC 9369), so the frame parser, the CRYPTO reassembly
//! and the ClientHello parser behind them are reached too.
//!
//! Input: byte 0 picks the mode (bit 0: sealed, bit 1: QUIC v2); then chunks
//! of a 2-byte length and that many bytes, each one datagram (raw mode) or
//! one Initial's frames (sealed mode; the chunk's first byte also picks the
//! packet number length and whether it shares the previous datagram).

#![no_main]

use libfuzzer_sys::fuzz_target;
use ring::aead::quic::{AES_128, HeaderProtectionKey};
use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use sluice::classify::{Progress, QuicInitial, QuicLimits, QuicVersion, client_initial_secrets};

const DCID: [u8; 8] = [0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08];
/// At most this many datagrams per input, as a flow's Initial phase is short.
const MAX_DATAGRAMS: usize = 24;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let chunks = chunks(rest);
    let datagrams = if mode & 1 == 0 {
        chunks.iter().map(|c| c.to_vec()).collect()
    } else {
        let version = if mode & 2 == 0 {
            QuicVersion::V1
        } else {
            QuicVersion::V2
        };
        seal_all(version, &chunks)
    };

    let mut flow = QuicInitial::new(QuicLimits::default());
    let mut decided = None;
    for d in &datagrams {
        let r = flow.push_datagram(d);
        match (&decided, &r) {
            (Some(first), _) => assert_eq!(&r, first, "a decided flow changed its answer"),
            (None, Ok(Progress::NeedMore { .. })) => {}
            (None, _) => decided = Some(r),
        }
    }
    // The same datagrams give the same answer in a fresh flow.
    let mut again = QuicInitial::new(QuicLimits::default());
    let mut last = None;
    for d in &datagrams {
        last = Some(again.push_datagram(d));
        if matches!(last, Some(Ok(Progress::Done(_))) | Some(Err(_))) {
            break;
        }
    }
    if let Some(first) = decided {
        assert_eq!(last, Some(first));
    }
});

fn chunks(mut rest: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while out.len() < MAX_DATAGRAMS {
        let Some((len, tail)) = rest.split_first_chunk::<2>() else {
            break;
        };
        let len = usize::from(u16::from_be_bytes(*len)).min(tail.len());
        let (chunk, tail) = tail.split_at(len);
        out.push(chunk);
        rest = tail;
    }
    out
}

/// Seals each chunk (after its control byte) as the frames of an Initial.
fn seal_all(version: QuicVersion, chunks: &[&[u8]]) -> Vec<Vec<u8>> {
    let Ok(secrets) = client_initial_secrets(version, &DCID) else {
        return Vec::new();
    };
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &secrets.key).unwrap());
    let hp = HeaderProtectionKey::new(&AES_128, &secrets.hp).unwrap();
    let mut datagrams: Vec<Vec<u8>> = Vec::new();
    for (pn, chunk) in chunks.iter().enumerate() {
        let Some((&control, frames)) = chunk.split_first() else {
            continue;
        };
        let packet = seal(
            version,
            &key,
            &secrets.iv,
            &hp,
            pn as u64,
            usize::from(control & 3) + 1,
            frames,
        );
        match datagrams.last_mut() {
            Some(last) if control & 4 != 0 => last.extend(packet),
            _ => datagrams.push(packet),
        }
    }
    datagrams
}

fn seal(
    version: QuicVersion,
    key: &LessSafeKey,
    iv: &[u8; 12],
    hp: &HeaderProtectionKey,
    pn: u64,
    pn_len: usize,
    frames: &[u8],
) -> Vec<u8> {
    // The Length field is written in two bytes: at most 0x3fff.
    let mut payload = frames[..frames.len().min(0x3fff - 16 - pn_len)].to_vec();
    while pn_len + payload.len() < 4 {
        payload.push(0);
    }
    let type_bits = match version {
        QuicVersion::V2 => 1u8,
        _ => 0,
    };
    let mut out = vec![0xc0 | type_bits << 4 | (pn_len as u8 - 1)];
    out.extend(version.to_wire().to_be_bytes());
    out.push(DCID.len() as u8);
    out.extend(DCID);
    out.push(0); // SCID
    out.push(0); // token
    let length = (pn_len + payload.len() + 16) as u16;
    out.extend((0x4000 | length).to_be_bytes());
    let pn_offset = out.len();
    out.extend(&pn.to_be_bytes()[8 - pn_len..]);
    let mut nonce = *iv;
    for (n, p) in nonce.iter_mut().rev().zip(pn.to_be_bytes().into_iter().rev()) {
        *n ^= p;
    }
    let tag = key
        .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&out[..]), &mut payload)
        .unwrap();
    out.extend(payload);
    out.extend(tag.as_ref());
    let mask = hp.new_mask(&out[pn_offset + 4..pn_offset + 20]).unwrap();
    out[0] ^= mask[0] & 0x0f;
    for i in 0..pn_len {
        out[pn_offset + i] ^= mask[1 + i];
    }
    out
}
