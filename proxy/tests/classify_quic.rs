//! Runs the QUIC Initial classifier over the vectors in `tests/data/quic/`
//! (RFC 9001 and RFC 9369 Appendix A's client Initials, and flows this file's
//! encoder wrote from captured ClientHellos) against `expected.txt`, then over
//! flows built at test time: ClientHellos split across Initials and datagrams,
//! reordered, coalesced, padded, duplicated, and every kind of refusal.
//!
//! The encoder here is test-only and independent of the classifier: it derives
//! keys with ring's HKDF itself and seals with ring's AES-GCM. It is checked
//! first against the RFC vectors — re-protecting an RFC plaintext must give the
//! RFC's protected bytes exactly — so the flows it builds are real Initials.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use sluice::classify::{
    ClientHello, Defect, Limits, NotInitial, Progress, QuicError, QuicInitial, QuicLimits, QuicVersion, TlsError,
    client_initial_secrets, parse_client_hello_message,
};

const V1: u32 = 0x0000_0001;
const V2: u32 = 0x6b33_43cf;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/quic")
}

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A `.hex` vector: the datagrams of one flow, in order. Hex digits, any
/// whitespace; a line `--` ends a datagram; `#` starts a comment line.
fn load_datagrams(name: &str) -> Vec<Vec<u8>> {
    let text = fs::read_to_string(data_dir().join(name)).unwrap();
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        if line == "--" {
            out.push(hex(&current));
            current.clear();
        } else {
            current.push_str(line);
        }
    }
    if !current.is_empty() {
        out.push(hex(&current));
    }
    out
}

fn save_datagrams(name: &str, comment: &str, datagrams: &[Vec<u8>]) {
    let mut text = String::new();
    for line in comment.lines() {
        text.push_str(&format!("# {line}\n"));
    }
    for (i, d) in datagrams.iter().enumerate() {
        if i > 0 {
            text.push_str("--\n");
        }
        for chunk in d.chunks(32) {
            text.push_str(&to_hex(chunk));
            text.push('\n');
        }
    }
    fs::write(data_dir().join(name), text).unwrap();
}

/// One line of `expected.txt`: a file name then `key=value` fields.
fn load_expectations() -> BTreeMap<String, BTreeMap<String, String>> {
    let text = fs::read_to_string(data_dir().join("expected.txt")).unwrap();
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let file = words.next().unwrap().to_owned();
        let fields = words
            .map(|w| {
                let (k, v) = w
                    .split_once('=')
                    .unwrap_or_else(|| panic!("expected.txt:{}: `{w}` is not key=value", n + 1));
                (k.to_owned(), v.to_owned())
            })
            .collect();
        assert!(out.insert(file.clone(), fields).is_none(), "{file} listed twice");
    }
    out
}

/// Feeds `datagrams` to a fresh flow; the result of the last one.
fn classify(datagrams: &[Vec<u8>]) -> Result<Progress<ClientHello>, QuicError> {
    classify_with(QuicLimits::default(), datagrams)
}

fn classify_with(limits: QuicLimits, datagrams: &[Vec<u8>]) -> Result<Progress<ClientHello>, QuicError> {
    let mut flow = QuicInitial::new(limits);
    let mut last = Ok(Progress::NeedMore { at_least: None });
    for d in datagrams {
        last = flow.push_datagram(d);
    }
    last
}

fn done(datagrams: &[Vec<u8>]) -> ClientHello {
    match classify(datagrams) {
        Ok(Progress::Done(hello)) => hello,
        other => panic!("expected a ClientHello, got {other:?}"),
    }
}

fn need_more() -> Result<Progress<ClientHello>, QuicError> {
    Ok(Progress::NeedMore { at_least: None })
}

fn alpn_string(hello: &ClientHello) -> String {
    if hello.alpn.is_empty() {
        return "-".into();
    }
    let names: Vec<String> = hello
        .alpn
        .iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    names.join(",")
}

/// The handshake bytes carried by a recorded TLS first flight: the record
/// headers stripped, which is what a QUIC client puts in CRYPTO frames.
fn handshake_of(records_file: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/clienthello")
        .join(records_file);
    let records = fs::read(path).unwrap();
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + 5 <= records.len() {
        let len = usize::from(u16::from_be_bytes([records[pos + 3], records[pos + 4]]));
        out.extend_from_slice(&records[pos + 5..pos + 5 + len]);
        pos += 5 + len;
    }
    out
}

/// Test-only Initial packet encoder (RFC 9001 §5), independent of the
/// classifier's own key schedule.
mod enc {
    use ring::aead::quic::{AES_128, HeaderProtectionKey};
    use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    use ring::hkdf;

    use super::{V1, V2};

    pub const DCID: [u8; 8] = [0x5a, 0x1c, 0xe0, 0x00, 0xc1, 0x1e, 0x47, 0x19];
    pub const SCID: [u8; 4] = [0xc1, 0x1e, 0x47, 0x5c];

    struct Len(usize);

    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }

    fn expand_label(prk: &hkdf::Prk, label: &str, len: usize) -> Vec<u8> {
        let full = format!("tls13 {label}");
        let mut info = u16::try_from(len).unwrap().to_be_bytes().to_vec();
        info.push(u8::try_from(full.len()).unwrap());
        info.extend_from_slice(full.as_bytes());
        info.push(0);
        let mut out = vec![0; len];
        prk.expand(&[&info], Len(len)).unwrap().fill(&mut out).unwrap();
        out
    }

    /// (key, iv, hp) for the client's Initials.
    pub fn secrets(version: u32, dcid: &[u8]) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let (salt, prefix) = match version {
            V1 => ("38762cf7f55934b34d179ae6a4c80cadccbb7f0a", "quic"),
            V2 => ("0dede3def700a6db819381be6e269dcbf9bd2ed9", "quicv2"),
            other => panic!("no salt for {other:#x}"),
        };
        let initial = hkdf::Salt::new(hkdf::HKDF_SHA256, &super::hex(salt)).extract(dcid);
        let client = expand_label(&initial, "client in", 32);
        let client = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &client);
        (
            expand_label(&client, &format!("{prefix} key"), 16),
            expand_label(&client, &format!("{prefix} iv"), 12),
            expand_label(&client, &format!("{prefix} hp"), 16),
        )
    }

    pub fn varint(v: u64) -> Vec<u8> {
        match v {
            0..=0x3f => vec![u8::try_from(v).unwrap()],
            0x40..=0x3fff => (0x4000 | u16::try_from(v).unwrap()).to_be_bytes().to_vec(),
            0x4000..=0x3fff_ffff => (0x8000_0000 | u32::try_from(v).unwrap()).to_be_bytes().to_vec(),
            _ => (0xc000_0000_0000_0000 | v).to_be_bytes().to_vec(),
        }
    }

    pub fn crypto(offset: usize, data: &[u8]) -> Vec<u8> {
        let mut f = vec![0x06];
        f.extend(varint(offset as u64));
        f.extend(varint(data.len() as u64));
        f.extend_from_slice(data);
        f
    }

    pub fn ping() -> Vec<u8> {
        vec![0x01]
    }

    pub fn ack(largest: u64) -> Vec<u8> {
        let mut f = vec![0x02];
        f.extend(varint(largest));
        f.extend([0, 0, 0]);
        f
    }

    fn type_bits(version: u32, v1_type: u8) -> u8 {
        if version == V2 { (v1_type + 1) & 3 } else { v1_type }
    }

    #[derive(Clone, Debug)]
    pub struct Initial {
        pub version: u32,
        pub dcid: Vec<u8>,
        pub scid: Vec<u8>,
        pub token: Vec<u8>,
        pub pn: u64,
        pub pn_len: usize,
        pub frames: Vec<u8>,
        /// Value of the two reserved header bits (0 in any valid packet).
        pub reserved: u8,
        /// Keys from this DCID instead of the packet's own.
        pub keys_from: Option<Vec<u8>>,
    }

    impl Initial {
        pub fn new(version: u32, pn: u64, frames: Vec<u8>) -> Self {
            Initial {
                version,
                dcid: DCID.to_vec(),
                scid: SCID.to_vec(),
                token: Vec::new(),
                pn,
                pn_len: 2,
                frames,
                reserved: 0,
                keys_from: None,
            }
        }

        /// Adds PADDING so that the protected packet is `len` bytes, as a
        /// client does to reach a 1200-byte datagram.
        pub fn padded_to(mut self, len: usize) -> Self {
            let now = self.protect().len();
            if now < len {
                self.frames.resize(self.frames.len() + (len - now), 0);
            }
            self
        }

        pub fn protect(&self) -> Vec<u8> {
            let key_dcid = self.keys_from.as_deref().unwrap_or(&self.dcid);
            let (key, iv, hp) = secrets(self.version, key_dcid);
            let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &key).unwrap());
            let hp = HeaderProtectionKey::new(&AES_128, &hp).unwrap();

            let mut payload = self.frames.clone();
            // The sample must exist (RFC 9001 §5.4.2): pad short payloads.
            while self.pn_len + payload.len() < 4 {
                payload.push(0);
            }
            let pn_bits = u8::try_from(self.pn_len - 1).unwrap();
            let mut out = vec![0xc0 | type_bits(self.version, 0) << 4 | self.reserved << 2 | pn_bits];
            out.extend(self.version.to_be_bytes());
            out.push(u8::try_from(self.dcid.len()).unwrap());
            out.extend(&self.dcid);
            out.push(u8::try_from(self.scid.len()).unwrap());
            out.extend(&self.scid);
            out.extend(varint(self.token.len() as u64));
            out.extend(&self.token);
            let length = (self.pn_len + payload.len() + 16) as u64;
            // Two bytes at least, as clients write it.
            if length < 0x4000 {
                out.extend((0x4000 | u16::try_from(length).unwrap()).to_be_bytes());
            } else {
                out.extend(varint(length));
            }
            let pn_offset = out.len();
            out.extend(&self.pn.to_be_bytes()[8 - self.pn_len..]);
            let mut nonce = [0u8; 12];
            nonce.copy_from_slice(&iv);
            for (n, p) in nonce.iter_mut().rev().zip(self.pn.to_be_bytes().iter().rev()) {
                *n ^= p;
            }
            let tag = key
                .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&out[..]), &mut payload)
                .unwrap();
            out.extend(payload);
            out.extend(tag.as_ref());
            let mask = hp.new_mask(&out[pn_offset + 4..pn_offset + 20]).unwrap();
            out[0] ^= mask[0] & 0x0f;
            for i in 0..self.pn_len {
                out[pn_offset + i] ^= mask[1 + i];
            }
            out
        }
    }

    /// A long-header packet of another type (1 = 0-RTT, 2 = Handshake in v1
    /// numbering) with filler for a body: the classifier must skip it by its
    /// Length without reading it.
    pub fn other_long(version: u32, v1_type: u8, body_len: usize) -> Vec<u8> {
        let mut out = vec![0xc0 | type_bits(version, v1_type) << 4 | 1];
        out.extend(version.to_be_bytes());
        out.push(DCID.len() as u8);
        out.extend(DCID);
        out.push(SCID.len() as u8);
        out.extend(SCID);
        out.extend((0x4000 | u16::try_from(body_len).unwrap()).to_be_bytes());
        out.extend((0..body_len).map(|i| (i * 7 + 3) as u8));
        out
    }
}

use enc::Initial;

/// The post-quantum, ECH-GREASE hello of `tests/data/clienthello` (1,889
/// bytes, like current Chrome's): too big for one Initial.
fn pq_hello() -> Vec<u8> {
    let hello = handshake_of("rustls-0.23-stub-x25519mlkem768-ech-grease.bin");
    assert_eq!(hello.len(), 1889);
    hello
}

/// A QUIC-shaped ClientHello: TLS 1.3 only, empty session id, ALPN `h3`,
/// `quic_transport_parameters`, and a key share of `share_len` bytes.
fn h3_hello(sni: &str, share_len: usize) -> Vec<u8> {
    fn ext(t: u16, data: &[u8]) -> Vec<u8> {
        let mut e = t.to_be_bytes().to_vec();
        e.extend(u16::try_from(data.len()).unwrap().to_be_bytes());
        e.extend_from_slice(data);
        e
    }
    let name = sni.as_bytes();
    let mut sni_data = u16::try_from(name.len() + 3).unwrap().to_be_bytes().to_vec();
    sni_data.push(0);
    sni_data.extend(u16::try_from(name.len()).unwrap().to_be_bytes());
    sni_data.extend_from_slice(name);
    let mut share = vec![0x11, 0xec];
    share.extend(u16::try_from(share_len).unwrap().to_be_bytes());
    share.extend((0..share_len).map(|i| (i * 13 % 251) as u8));
    let mut shares = u16::try_from(share.len()).unwrap().to_be_bytes().to_vec();
    shares.extend(share);
    let exts = [
        ext(0, &sni_data),
        ext(16, &[0, 3, 2, b'h', b'3']),
        ext(43, &[2, 3, 4]),
        ext(10, &[0, 4, 0x11, 0xec, 0, 0x1d]),
        ext(13, &[0, 4, 4, 3, 8, 4]),
        ext(51, &shares),
        ext(57, &[1, 2, 0x40, 0x64, 4, 4, 0x80, 0x10, 0, 0]),
    ]
    .concat();
    let mut body = vec![3, 3];
    body.extend([0x42; 32]);
    body.push(0);
    body.extend([0, 6, 0x13, 1, 0x13, 2, 0x13, 3]);
    body.extend([1, 0]);
    body.extend(u16::try_from(exts.len()).unwrap().to_be_bytes());
    body.extend(exts);
    let mut msg = vec![1];
    msg.extend(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
    msg.extend(body);
    msg
}

/// One Initial per piece of `hello` cut at `cuts`, each padded to 1200 bytes,
/// packet numbers from 0.
fn split_initials(version: u32, hello: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut bounds = vec![0];
    bounds.extend_from_slice(cuts);
    bounds.push(hello.len());
    bounds
        .windows(2)
        .enumerate()
        .map(|(i, w)| {
            Initial::new(version, i as u64, enc::crypto(w[0], &hello[w[0]..w[1]]))
                .padded_to(1200)
                .protect()
        })
        .collect()
}

// ---------------------------------------------------------------------------
// RFC vectors

#[test]
fn encoder_reproduces_the_rfc_packets() {
    let plaintext = hex(&fs::read_to_string(data_dir().join("rfc9001-a2-payload.frames")).unwrap());
    for (version, file) in [
        (V1, "rfc9001-a2-client-initial.hex"),
        (V2, "rfc9369-a2-client-initial.hex"),
    ] {
        let mut frames = plaintext.clone();
        frames.resize(1162, 0);
        let packet = Initial {
            version,
            dcid: hex("8394c8f03e515708"),
            scid: Vec::new(),
            token: Vec::new(),
            pn: 2,
            pn_len: 4,
            frames,
            reserved: 0,
            keys_from: None,
        };
        let rfc = load_datagrams(file);
        assert_eq!(rfc.len(), 1);
        assert_eq!(rfc[0].len(), 1200, "{file}");
        assert_eq!(to_hex(&packet.protect()), to_hex(&rfc[0]), "{file}");
    }
}

#[test]
fn rfc_vectors_decrypt_to_the_rfc_client_hello() {
    let plaintext = hex(&fs::read_to_string(data_dir().join("rfc9001-a2-payload.frames")).unwrap());
    // 06 (CRYPTO), offset 00, length 40f1: the ClientHello is the rest.
    assert_eq!(&plaintext[..4], &[0x06, 0x00, 0x40, 0xf1]);
    let inner = &plaintext[4..];
    assert_eq!(inner.len(), 0xf1);
    let want = match parse_client_hello_message(inner, &Limits::default()) {
        Ok(Progress::Done(hello)) => hello,
        other => panic!("{other:?}"),
    };
    assert_eq!(want.sni.as_deref(), Some("example.com"));
    for (file, version) in [
        ("rfc9001-a2-client-initial.hex", QuicVersion::V1),
        ("rfc9369-a2-client-initial.hex", QuicVersion::V2),
    ] {
        let mut flow = QuicInitial::new(QuicLimits::default());
        let got = flow.push_datagram(&load_datagrams(file)[0]);
        assert_eq!(got, Ok(Progress::Done(want.clone())), "{file}");
        assert_eq!(flow.version(), Some(version));
        assert_eq!(flow.original_dcid(), Some(&hex("8394c8f03e515708")[..]));
        assert_eq!(flow.initial_packets(), 1);
    }
}

fn check_fields(name: &str, hello: &ClientHello, flow: &QuicInitial, want: &BTreeMap<String, String>) {
    let secrets = flow
        .version()
        .zip(flow.original_dcid())
        .map(|(v, dcid)| client_initial_secrets(v, dcid).unwrap());
    for (key, value) in want {
        let got = match key.as_str() {
            "version" => format!("{:x}", flow.version().unwrap().to_wire()),
            "dcid" => to_hex(flow.original_dcid().unwrap()),
            "key" => to_hex(&secrets.as_ref().unwrap().key),
            "iv" => to_hex(&secrets.as_ref().unwrap().iv),
            "hp" => to_hex(&secrets.as_ref().unwrap().hp),
            "packets" => flow.initial_packets().to_string(),
            "sni" => hello.sni.clone().unwrap_or_else(|| "-".into()),
            "alpn" => alpn_string(hello),
            "ech" => u8::from(hello.ech).to_string(),
            "hs_len" => hello.handshake_len.to_string(),
            "error" => panic!("{name}: expected error {value}, parsed {hello:?}"),
            other => panic!("{name}: unknown expectation key {other}"),
        };
        assert_eq!(&got, value, "{name}: {key}");
    }
}

#[test]
fn classify_recorded_vectors() {
    let expectations = load_expectations();
    let mut files: Vec<String> = fs::read_dir(data_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".hex"))
        .collect();
    files.sort();
    let listed: Vec<&String> = expectations.keys().collect();
    let found: Vec<&String> = files.iter().collect();
    assert_eq!(listed, found, "expected.txt and the .hex files disagree");

    for name in &files {
        let datagrams = load_datagrams(name);
        let want = &expectations[name];
        let mut flow = QuicInitial::new(QuicLimits::default());
        let mut result = need_more();
        for d in &datagrams {
            result = flow.push_datagram(d);
        }
        match (want.get("error"), &result) {
            (Some(code), Err(e)) => assert_eq!(e.reason().as_str(), code, "{name}: {e}"),
            (Some(code), other) => panic!("{name}: expected {code}, got {other:?}"),
            (None, Ok(Progress::Done(hello))) => check_fields(name, hello, &flow, want),
            (None, other) => panic!("{name}: expected a ClientHello, got {other:?}"),
        }
        // Every datagram cut short: never a panic, never a hello.
        for (i, d) in datagrams.iter().enumerate() {
            for k in 0..d.len() {
                let mut cut = datagrams[..i].to_vec();
                cut.push(d[..k].to_vec());
                assert!(
                    !matches!(classify(&cut), Ok(Progress::Done(_))) || i + 1 < datagrams.len(),
                    "{name}: datagram {i} cut at {k} still gave a hello"
                );
            }
        }
        println!("{name}: {result:?}");
    }
}

// ---------------------------------------------------------------------------
// Flows built at test time

#[test]
fn post_quantum_hello_across_two_initials_in_one_datagram() {
    let hello = pq_hello();
    for version in [V1, V2] {
        let packets = split_initials(version, &hello, &[1000]);
        let hello_got = done(&[packets.concat()]);
        assert_eq!(hello_got.sni.as_deref(), Some("chrome-like.example.test"));
        assert!(hello_got.ech);
        assert_eq!(hello_got.handshake_len, 1889);
        assert_eq!(alpn_string(&hello_got), "h2,http/1.1");
    }
}

#[test]
fn post_quantum_hello_across_two_datagrams() {
    let hello = pq_hello();
    let datagrams = split_initials(V1, &hello, &[1100]);
    let mut flow = QuicInitial::new(QuicLimits::default());
    assert_eq!(flow.push_datagram(&datagrams[0]), need_more());
    let got = flow.push_datagram(&datagrams[1]).unwrap().done().unwrap();
    assert_eq!(got.sni.as_deref(), Some("chrome-like.example.test"));
    assert_eq!(flow.initial_packets(), 2);
    // The same hello over TCP: one parser, one answer.
    let over_tcp = sluice::classify::parse_client_hello(
        &fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/data/clienthello/rustls-0.23-stub-x25519mlkem768-ech-grease.bin"),
        )
        .unwrap(),
        &Limits::default(),
    )
    .unwrap()
    .done()
    .unwrap();
    assert_eq!(got, over_tcp);
}

#[test]
fn h3_hello_across_three_initials_any_order() {
    let hello = h3_hello("h3.example.test", 1216 + 32);
    assert!(hello.len() > 1200);
    for version in [V1, V2] {
        let datagrams = split_initials(version, &hello, &[400, 900]);
        let orders: [[usize; 3]; 6] = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]];
        for order in orders {
            let mut flow = QuicInitial::new(QuicLimits::default());
            for (n, &i) in order.iter().enumerate() {
                let r = flow.push_datagram(&datagrams[i]);
                if n < 2 {
                    assert_eq!(r, need_more(), "{order:?} step {n}");
                } else {
                    let h = r.unwrap().done().unwrap();
                    assert_eq!(h.sni.as_deref(), Some("h3.example.test"));
                    assert_eq!(h.alpn, vec![b"h3".to_vec()]);
                    assert_eq!(h.supported_versions, vec![0x0304]);
                }
            }
        }
    }
}

#[test]
fn crypto_frames_out_of_order_within_a_packet() {
    let hello = h3_hello("order.example.test", 100);
    let (a, b) = hello.split_at(50);
    let (b, c) = b.split_at(60);
    let frames = [enc::crypto(110, c), enc::crypto(0, a), enc::crypto(50, b)].concat();
    let got = done(&[Initial::new(V1, 0, frames).padded_to(1200).protect()]);
    assert_eq!(got.sni.as_deref(), Some("order.example.test"));
}

#[test]
fn padding_ping_and_ack_frames_around_crypto() {
    let hello = h3_hello("frames.example.test", 64);
    let (a, b) = hello.split_at(30);
    let frames = [
        enc::ping(),
        vec![0; 17],
        enc::crypto(0, a),
        enc::ack(0),
        enc::ping(),
        vec![0; 3],
        enc::crypto(30, b),
        vec![0; 300],
    ]
    .concat();
    let got = done(&[Initial::new(V2, 0, frames).protect()]);
    assert_eq!(got.sni.as_deref(), Some("frames.example.test"));
}

#[test]
fn coalesced_with_zero_rtt_handshake_short_header_and_zero_padding() {
    let hello = h3_hello("coalesced.example.test", 32);
    for version in [V1, V2] {
        let initial = Initial::new(version, 0, enc::crypto(0, &hello)).protect();
        let zero_rtt = enc::other_long(version, 1, 50);
        let handshake = enc::other_long(version, 2, 40);
        let short = [0x43, 1, 2, 3, 4, 5, 6, 7, 8, 9];
        let datagram = [
            initial.clone(),
            zero_rtt.clone(),
            handshake,
            short.to_vec(),
            vec![0; 200],
        ]
        .concat();
        assert_eq!(done(&[datagram]).sni.as_deref(), Some("coalesced.example.test"));
        // 0-RTT first in the datagram, Initial after it.
        let datagram = [zero_rtt.clone(), initial].concat();
        assert_eq!(done(&[datagram]).sni.as_deref(), Some("coalesced.example.test"));
        // A datagram of 0-RTT alone, once the flow has an Initial, is skipped.
        let half = split_initials(version, &hello, &[40]);
        let mut flow = QuicInitial::new(QuicLimits::default());
        assert_eq!(flow.push_datagram(&half[0]), need_more());
        assert_eq!(flow.push_datagram(&zero_rtt), need_more());
        assert!(matches!(flow.push_datagram(&half[1]), Ok(Progress::Done(_))));
    }
}

#[test]
fn coalesced_initial_of_another_connection_is_ignored() {
    let hello = h3_hello("first.example.test", 32);
    let (a, b) = hello.split_at(40);
    let first = Initial::new(V1, 0, enc::crypto(0, a)).protect();
    let mut stranger = Initial::new(
        V1,
        1,
        enc::crypto(40, b"conflicting bytes that would poison the stream"),
    );
    stranger.dcid = vec![9; 8];
    let rest = Initial::new(V1, 2, enc::crypto(40, b)).protect();
    let got = done(&[[first, stranger.protect()].concat(), rest]);
    assert_eq!(got.sni.as_deref(), Some("first.example.test"));
}

#[test]
fn duplicate_initials_and_packet_number_lengths() {
    let hello = pq_hello();
    let datagrams = split_initials(V1, &hello, &[700]);
    let mut flow = QuicInitial::new(QuicLimits::default());
    assert_eq!(flow.push_datagram(&datagrams[0]), need_more());
    assert_eq!(flow.push_datagram(&datagrams[0]), need_more());
    assert!(matches!(flow.push_datagram(&datagrams[1]), Ok(Progress::Done(_))));
    assert_eq!(flow.initial_packets(), 3);

    for pn_len in 1..=4 {
        let mut packets = Vec::new();
        for (i, (start, end)) in [(0, 600), (600, 1200), (1200, hello.len())].into_iter().enumerate() {
            let mut p = Initial::new(V2, 250 + i as u64 * 3, enc::crypto(start, &hello[start..end]));
            p.pn_len = pn_len;
            packets.push(p.padded_to(1200).protect());
        }
        assert_eq!(done(&packets).handshake_len, 1889, "pn_len {pn_len}");
    }
}

#[test]
fn decided_flow_keeps_its_answer() {
    let hello = h3_hello("kept.example.test", 16);
    let datagram = Initial::new(V1, 0, enc::crypto(0, &hello)).padded_to(1200).protect();
    let mut flow = QuicInitial::new(QuicLimits::default());
    let first = flow.push_datagram(&datagram);
    assert!(matches!(first, Ok(Progress::Done(_))));
    assert_eq!(flow.push_datagram(b"garbage"), first);
    assert_eq!(flow.push_datagram(&[]), first);
}

#[test]
fn conflicting_overlap_is_refused() {
    let hello = h3_hello("overlap.example.test", 64);
    let mut other = hello.clone();
    other[60] ^= 0x20;
    let datagrams = vec![
        Initial::new(V1, 0, enc::crypto(0, &hello[..80])).protect(),
        Initial::new(V1, 1, enc::crypto(50, &other[50..])).protect(),
    ];
    assert_eq!(
        classify(&datagrams),
        Err(QuicError::Malformed(Defect::CryptoConflict { offset: 60 }))
    );
    // The same overlap, consistent, is fine.
    let datagrams = vec![
        Initial::new(V1, 0, enc::crypto(0, &hello[..80])).protect(),
        Initial::new(V1, 1, enc::crypto(50, &hello[50..])).protect(),
    ];
    assert!(matches!(classify(&datagrams), Ok(Progress::Done(_))));
}

#[test]
fn oversized_crypto_and_hello() {
    let limits = QuicLimits::default();
    let past_the_end = Initial::new(V1, 0, enc::crypto(limits.max_client_hello - 1, &[1, 2])).protect();
    assert_eq!(
        classify(&[past_the_end]),
        Err(QuicError::Oversized {
            end: limits.max_client_hello as u64 + 1,
            max: limits.max_client_hello
        })
    );
    // A hello declaring more than the limit is refused from its header, with
    // the reason TCP gives.
    let declares_70k = Initial::new(V1, 0, enc::crypto(0, &[1, 0x01, 0x11, 0x70])).protect();
    let r = classify(&[declares_70k]);
    assert_eq!(
        r,
        Err(QuicError::Tls(TlsError::Oversized {
            declared: 70_004,
            max: 64 * 1024
        }))
    );
    assert_eq!(r.unwrap_err().reason().as_str(), "tls-oversized");
    // A smaller limit refuses the post-quantum hello as soon as its first
    // Initial shows the declared length.
    let small = QuicLimits {
        max_client_hello: 1000,
        ..QuicLimits::default()
    };
    let datagrams = split_initials(V1, &pq_hello(), &[900]);
    assert_eq!(
        classify_with(small, &datagrams[..1]),
        Err(QuicError::Tls(TlsError::Oversized {
            declared: 1889,
            max: 1000
        }))
    );
}

#[test]
fn too_many_initials() {
    let hello = pq_hello();
    let limits = QuicLimits::default();
    let mut flow = QuicInitial::new(limits);
    for i in 0..limits.max_initial_packets {
        let d = Initial::new(V1, i as u64, enc::crypto(i * 10, &hello[i * 10..i * 10 + 10])).protect();
        assert_eq!(flow.push_datagram(&d), need_more(), "packet {i}");
    }
    let n = limits.max_initial_packets;
    let d = Initial::new(V1, n as u64, enc::crypto(n * 10, &hello[n * 10..])).protect();
    assert_eq!(
        flow.push_datagram(&d),
        Err(QuicError::TooManyPackets {
            max: limits.max_initial_packets
        })
    );
    assert_eq!(
        flow.push_datagram(&d).unwrap_err().reason().as_str(),
        "quic-too-many-packets"
    );
}

#[test]
fn versions_and_headers_that_are_refused() {
    let hello = h3_hello("v.example.test", 16);
    let good = Initial::new(V1, 0, enc::crypto(0, &hello[..20])).protect();
    // Draft-29 and a GREASE-style version: unsupported, with the version.
    for version in [0xff00_001du32, 0x1a2a_3a4a] {
        let mut d = good.clone();
        d[1..5].copy_from_slice(&version.to_be_bytes());
        assert_eq!(classify(&[d]), Err(QuicError::UnsupportedVersion(version)));
    }
    // Version negotiation.
    let mut vn = vec![0x80, 0, 0, 0, 0, 8];
    vn.extend(enc::DCID);
    vn.push(4);
    vn.extend(enc::SCID);
    vn.extend(V1.to_be_bytes());
    let r = classify(&[vn]);
    assert_eq!(r, Err(QuicError::VersionNegotiation));
    assert_eq!(r.unwrap_err().reason().as_str(), "quic-version-negotiation");
    // A short header first.
    let mut short = vec![0x41];
    short.extend(enc::DCID);
    short.extend([0x77; 40]);
    let r = classify(&[short.clone()]);
    assert_eq!(r, Err(QuicError::NotInitial(NotInitial::ShortHeader)));
    assert_eq!(r.unwrap_err().reason().as_str(), "quic-not-initial");
    // ... or later in the flow, as a datagram of its own.
    assert_eq!(
        classify(&[good.clone(), short]),
        Err(QuicError::NotInitial(NotInitial::ShortHeader))
    );
    // The version changing within a flow.
    let v2 = Initial::new(V2, 1, enc::crypto(20, &hello[20..])).protect();
    assert_eq!(
        classify(&[good.clone(), v2]),
        Err(QuicError::Malformed(Defect::VersionChanged))
    );
    // Another DCID in a later datagram.
    let mut moved = Initial::new(V1, 1, enc::crypto(20, &hello[20..]));
    moved.dcid = vec![0xdd; 8];
    assert_eq!(
        classify(&[good.clone(), moved.protect()]),
        Err(QuicError::Malformed(Defect::DcidChanged))
    );
    // Reserved bits set under protection.
    let mut reserved = Initial::new(V1, 0, enc::crypto(0, &hello));
    reserved.reserved = 2;
    assert_eq!(
        classify(&[reserved.protect()]),
        Err(QuicError::Malformed(Defect::ReservedBits))
    );
    // A STREAM frame in an Initial.
    let stream = Initial::new(V1, 0, [enc::crypto(0, &hello), vec![0x08, 0, 1, 0x61]].concat()).protect();
    assert_eq!(
        classify(&[stream]),
        Err(QuicError::Malformed(Defect::ForbiddenFrame(0x08)))
    );
    // Keys from another DCID than the header's: the tag fails.
    let mut wrong_keys = Initial::new(V1, 0, enc::crypto(0, &hello));
    wrong_keys.keys_from = Some(vec![1; 8]);
    assert_eq!(classify(&[wrong_keys.protect()]), Err(QuicError::DecryptFailed));
    // A ServerHello where the ClientHello should be: the TLS reason.
    let mut server_hello = hello.clone();
    server_hello[0] = 2;
    let r = classify(&[Initial::new(V1, 0, enc::crypto(0, &server_hello)).protect()]);
    assert_eq!(r, Err(QuicError::Tls(TlsError::NotClientHello(2))));
    assert_eq!(r.unwrap_err().reason().as_str(), "tls-not-client-hello");
}

#[test]
fn every_flipped_byte_of_the_rfc_packet_is_refused() {
    let packet = load_datagrams("rfc9001-a2-client-initial.hex").remove(0);
    // Header (22 bytes) and ciphertext alike: the header is authenticated
    // data, the DCID makes the keys, so no flip may still yield a hello.
    for i in 0..packet.len() {
        for bit in [0x01u8, 0x80] {
            let mut d = packet.clone();
            d[i] ^= bit;
            let r = classify(&[d]);
            assert!(r.is_err(), "byte {i} ^ {bit:#x}: {r:?}");
            if i >= 22 {
                assert_eq!(r, Err(QuicError::DecryptFailed), "byte {i} ^ {bit:#x}");
            }
        }
    }
}

#[test]
fn every_truncation_is_refused_without_panic() {
    let hello = pq_hello();
    let rfc = load_datagrams("rfc9369-a2-client-initial.hex").remove(0);
    let coalesced = split_initials(V1, &hello, &[1000]).concat();
    for d in [rfc, coalesced] {
        for k in 0..d.len() {
            let r = classify(&[d[..k].to_vec()]);
            // Cut exactly after the first of two coalesced Initials is a
            // valid (incomplete) flow; every other cut is malformed.
            match r {
                Ok(Progress::NeedMore { .. }) => assert_eq!(k, 1200, "cut at {k}"),
                Ok(Progress::Done(_)) => panic!("cut at {k} gave a hello"),
                Err(_) => {}
            }
        }
    }
}

#[test]
fn hostile_datagram_sequences_never_panic() {
    // A cheap deterministic generator: mutations of real Initials, not just
    // noise, so the walk reaches the frame parser and the reassembly.
    let hello = h3_hello("noise.example.test", 300);
    let base = split_initials(V1, &hello, &[300]);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..2000 {
        let mut flow = QuicInitial::new(QuicLimits::default());
        for _ in 0..(next() % 4 + 1) {
            let mut d = base[(next() % 2) as usize].clone();
            match next() % 4 {
                0 => d.truncate((next() as usize) % d.len()),
                1 => {
                    let i = (next() as usize) % d.len();
                    d[i] = next() as u8;
                }
                2 => d.extend((0..next() % 64).map(|_| next() as u8)),
                _ => {}
            }
            let _ = flow.push_datagram(&d);
        }
    }
}

// ---------------------------------------------------------------------------

/// Writes the encoder-made vectors into `tests/data/quic/`. The encoder is
/// deterministic, so rerunning gives the same files:
/// `cargo test -p sluice --test classify_quic -- --ignored regenerate`.
#[test]
#[ignore = "rewrites committed test vectors"]
fn regenerate_vectors() {
    let hello = pq_hello();
    save_datagrams(
        "v1-pq-hello-two-initials-one-datagram.hex",
        "The post-quantum + ECH GREASE hello of ../clienthello/rustls-0.23-stub-x25519mlkem768-ech-grease.bin\n\
         (record header stripped), CRYPTO 0..1000 and 1000..1889 in two 1200-byte Initials coalesced in one datagram.",
        &[split_initials(V1, &hello, &[1000]).concat()],
    );
    save_datagrams(
        "v2-pq-hello-two-datagrams-reversed.hex",
        "The same hello over QUIC v2, split at 1100, one Initial per datagram, second half first.",
        &{
            let mut d = split_initials(V2, &hello, &[1100]);
            d.reverse();
            d
        },
    );
    let h3 = h3_hello("h3.example.test", 1216 + 32);
    let mut coalesced = Initial::new(V1, 0, enc::crypto(0, &h3[..700])).protect();
    coalesced.extend(enc::other_long(V1, 1, 60));
    coalesced.extend([0u8; 100]);
    save_datagrams(
        "v1-h3-hello-coalesced-0rtt-then-second-initial.hex",
        "A hand-built QUIC ClientHello (ALPN h3, 1248-byte X25519MLKEM768-sized share):\n\
         datagram 1 = Initial (CRYPTO 0..700) + 0-RTT + zero padding; datagram 2 = Initial (PING, CRYPTO 700..end, PADDING).",
        &[
            coalesced,
            Initial::new(V1, 1, [enc::ping(), enc::crypto(700, &h3[700..])].concat())
                .padded_to(1200)
                .protect(),
        ],
    );
    let curl = handshake_of("curl-7.88-openssl-3.0-alpn-h2.bin");
    let one = Initial::new(V1, 0, enc::crypto(0, &curl[..300])).protect();
    let mut flipped = Initial::new(V1, 1, enc::crypto(300, &curl[300..])).protect();
    let at = flipped.len() - 40;
    flipped[at] ^= 0x04;
    save_datagrams(
        "error-flipped-ciphertext-byte.hex",
        "curl's hello in two Initials; one ciphertext byte of the second flipped.",
        &[one.clone(), flipped],
    );
    let mut other = curl.clone();
    other[350] ^= 0x01;
    save_datagrams(
        "error-conflicting-crypto-overlap.hex",
        "curl's hello: CRYPTO 0..400, then CRYPTO 300..end whose byte 350 differs.",
        &[
            Initial::new(V1, 0, enc::crypto(0, &curl[..400])).protect(),
            Initial::new(V1, 1, enc::crypto(300, &other[300..])).protect(),
        ],
    );
    let mut draft29 = one.clone();
    draft29[1..5].copy_from_slice(&0xff00_001du32.to_be_bytes());
    save_datagrams(
        "error-draft-29-version.hex",
        "An Initial with the version field of draft-29.",
        &[draft29],
    );
    let mut vn = vec![0x80, 0, 0, 0, 0, 8];
    vn.extend(enc::DCID);
    vn.push(4);
    vn.extend(enc::SCID);
    vn.extend(V1.to_be_bytes());
    vn.extend(V2.to_be_bytes());
    save_datagrams(
        "error-version-negotiation.hex",
        "A Version Negotiation packet (version 0) listing v1 and v2.",
        &[vn],
    );
    let mut short = vec![0x41];
    short.extend(enc::DCID);
    short.extend((0..60).map(|i| (i * 5) as u8));
    save_datagrams(
        "error-short-header.hex",
        "A short-header (1-RTT) packet as the first datagram.",
        &[short],
    );
    save_datagrams(
        "error-stream-frame-in-initial.hex",
        "An Initial with a STREAM frame (type 0x08) after curl's hello.",
        &[Initial::new(V1, 0, [enc::crypto(0, &curl), vec![0x08, 0, 2, b'h', b'i']].concat()).protect()],
    );
}
