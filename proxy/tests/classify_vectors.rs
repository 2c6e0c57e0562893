//! Runs the TLS classifier over the recorded first flights in
//! `tests/data/clienthello/` and checks each against `expected.txt`, then over
//! ClientHellos rustls builds at test time (plain, with an X25519MLKEM768-sized
//! key share, and with ECH GREASE). Every vector is also fed one byte at a time
//! and re-fragmented into three records, which must not change the result.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sluice::classify::{ClientHello, Limits, Progress, TlsError, parse_client_hello};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/clienthello")
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

fn parse_all(bytes: &[u8]) -> Result<Progress<ClientHello>, TlsError> {
    parse_client_hello(bytes, &Limits::default())
}

/// Feeds `bytes` one more byte at a time: every strict prefix must be
/// `NeedMore` (with a hint that does not overshoot) until the outcome is
/// decided, and the decided outcome must be the whole input's.
fn check_byte_at_a_time(name: &str, bytes: &[u8]) {
    let whole = parse_all(bytes);
    let mut k = 0;
    while k <= bytes.len() {
        match parse_all(&bytes[..k]) {
            Ok(Progress::NeedMore { at_least }) => {
                let at_least = at_least.unwrap_or(1);
                assert!(at_least >= 1, "{name}: zero hint at {k}");
                // Every prefix short of the hint must also need more.
                for j in k + 1..(k + at_least).min(bytes.len() + 1) {
                    assert!(
                        matches!(parse_all(&bytes[..j]), Ok(Progress::NeedMore { .. })),
                        "{name}: hint {at_least} at {k} overshoots, {j} is decided"
                    );
                }
            }
            decided => {
                assert_eq!(decided, whole, "{name}: prefix {k} decided differently");
                return;
            }
        }
        k += 1;
    }
    assert!(matches!(whole, Ok(Progress::NeedMore { .. })), "{name}");
}

/// Re-frames the handshake bytes carried by `records` as three records cut at
/// the given handshake offsets.
fn refragment(records: &[u8], cuts: [usize; 2]) -> Vec<u8> {
    let mut handshake = Vec::new();
    let mut pos = 0;
    while pos + 5 <= records.len() {
        let len = usize::from(u16::from_be_bytes([records[pos + 3], records[pos + 4]]));
        handshake.extend_from_slice(&records[pos + 5..pos + 5 + len]);
        pos += 5 + len;
    }
    let version = [records[1], records[2]];
    let mut out = Vec::new();
    let bounds = [0, cuts[0], cuts[1], handshake.len()];
    for w in bounds.windows(2) {
        let part = &handshake[w[0]..w[1]];
        out.push(22);
        out.extend_from_slice(&version);
        out.extend_from_slice(&u16::try_from(part.len()).unwrap().to_be_bytes());
        out.extend_from_slice(part);
    }
    out
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

fn versions_string(hello: &ClientHello) -> String {
    if hello.supported_versions.is_empty() {
        return "-".into();
    }
    let names: Vec<String> = hello.supported_versions.iter().map(|v| format!("{v:04x}")).collect();
    names.join(",")
}

fn check_fields(name: &str, hello: &ClientHello, want: &BTreeMap<String, String>) {
    for (key, value) in want {
        let got = match key.as_str() {
            "sni" => hello.sni.clone().unwrap_or_else(|| "-".into()),
            "alpn" => alpn_string(hello),
            "ech" => u8::from(hello.ech).to_string(),
            "versions" => versions_string(hello),
            "suites" => hello.cipher_suite_count.to_string(),
            "hs_len" => hello.handshake_len.to_string(),
            "min_hs_len" => {
                assert!(
                    hello.handshake_len >= value.parse().unwrap(),
                    "{name}: hs_len {}",
                    hello.handshake_len
                );
                continue;
            }
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
        .filter(|n| n.ends_with(".bin"))
        .collect();
    files.sort();
    let listed: Vec<&String> = expectations.keys().collect();
    let found: Vec<&String> = files.iter().collect();
    assert_eq!(listed, found, "expected.txt and the .bin files disagree");

    for name in &files {
        let bytes = fs::read(data_dir().join(name)).unwrap();
        let want = &expectations[name];
        let result = parse_all(&bytes);
        match (want.get("error"), &result) {
            (Some(code), Err(e)) => assert_eq!(e.reason_code(), code, "{name}: {e}"),
            (Some(code), other) => panic!("{name}: expected {code}, got {other:?}"),
            (None, Ok(Progress::Done(hello))) => {
                check_fields(name, hello, want);
                let hs_len = hello.handshake_len;
                let resplit = refragment(&bytes, [1, hs_len / 2]);
                assert_eq!(parse_all(&resplit), result, "{name}: three records");
                let resplit = refragment(&bytes, [3, hs_len - 1]);
                assert_eq!(parse_all(&resplit), result, "{name}: split in the handshake header");
            }
            (None, other) => panic!("{name}: expected a ClientHello, got {other:?}"),
        }
        check_byte_at_a_time(name, &bytes);
        println!("{name}: {result:?}");
    }
}

/// Builders for rustls client hellos; rustls with `ring` has no ML-KEM, so the
/// post-quantum share and the ECH GREASE encapsulation come from stubs that
/// only need to produce bytes of the right shape: the hello is never answered.
mod rustls_hellos {
    use super::*;
    use rustls::crypto::hpke::{EncapsulatedSecret, Hpke, HpkePrivateKey, HpkePublicKey, HpkeSealer, HpkeSuite};
    use rustls::crypto::{ActiveKeyExchange, SharedSecret, SupportedKxGroup};
    use rustls::internal::msgs::enums::{HpkeAead, HpkeKdf, HpkeKem};
    use rustls::internal::msgs::handshake::HpkeSymmetricCipherSuite;
    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, Error, NamedGroup, RootCertStore};

    /// X25519MLKEM768 client share: ML-KEM-768 encapsulation key (1184 bytes)
    /// followed by an X25519 public key (32), per draft-ietf-tls-ecdhe-mlkem.
    const MLKEM768_X25519_SHARE_LEN: usize = 1184 + 32;

    #[derive(Debug)]
    struct StubMlKemGroup;

    struct StubShare(Vec<u8>);

    impl SupportedKxGroup for StubMlKemGroup {
        fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
            let share = (0..MLKEM768_X25519_SHARE_LEN).map(|i| (i * 31 % 251) as u8).collect();
            Ok(Box::new(StubShare(share)))
        }

        fn name(&self) -> NamedGroup {
            NamedGroup::X25519MLKEM768
        }
    }

    impl ActiveKeyExchange for StubShare {
        fn complete(self: Box<Self>, _peer: &[u8]) -> Result<SharedSecret, Error> {
            Err(Error::General("stub key exchange cannot complete".into()))
        }

        fn pub_key(&self) -> &[u8] {
            &self.0
        }

        fn group(&self) -> NamedGroup {
            NamedGroup::X25519MLKEM768
        }
    }

    #[derive(Debug)]
    struct StubHpke;

    #[derive(Debug)]
    struct StubSealer;

    static STUB_HPKE: StubHpke = StubHpke;

    impl HpkeSealer for StubSealer {
        fn seal(&mut self, _aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, Error> {
            Ok(plaintext.to_vec())
        }
    }

    impl Hpke for StubHpke {
        fn seal(
            &self,
            _info: &[u8],
            _aad: &[u8],
            _plaintext: &[u8],
            _pub_key: &HpkePublicKey,
        ) -> Result<(EncapsulatedSecret, Vec<u8>), Error> {
            Err(Error::General("stub".into()))
        }

        fn setup_sealer(
            &self,
            _info: &[u8],
            _pub_key: &HpkePublicKey,
        ) -> Result<(EncapsulatedSecret, Box<dyn HpkeSealer + 'static>), Error> {
            // An uncompressed P-256 point is 65 bytes starting with 0x04; GREASE
            // only needs something that looks like one.
            let mut enc = vec![0x5a; 65];
            enc[0] = 0x04;
            Ok((EncapsulatedSecret(enc), Box::new(StubSealer)))
        }

        fn open(
            &self,
            _enc: &EncapsulatedSecret,
            _info: &[u8],
            _aad: &[u8],
            _ciphertext: &[u8],
            _secret_key: &HpkePrivateKey,
        ) -> Result<Vec<u8>, Error> {
            Err(Error::General("stub".into()))
        }

        fn setup_opener(
            &self,
            _enc: &EncapsulatedSecret,
            _info: &[u8],
            _secret_key: &HpkePrivateKey,
        ) -> Result<Box<dyn rustls::crypto::hpke::HpkeOpener + 'static>, Error> {
            Err(Error::General("stub".into()))
        }

        fn generate_key_pair(&self) -> Result<(HpkePublicKey, HpkePrivateKey), Error> {
            Err(Error::General("stub".into()))
        }

        fn suite(&self) -> HpkeSuite {
            HpkeSuite {
                kem: HpkeKem::DHKEM_P256_HKDF_SHA256,
                sym: HpkeSymmetricCipherSuite {
                    kdf_id: HpkeKdf::HKDF_SHA256,
                    aead_id: HpkeAead::AES_128_GCM,
                },
            }
        }
    }

    static STUB_MLKEM: StubMlKemGroup = StubMlKemGroup;

    #[derive(Clone, Copy)]
    pub(super) enum Flavour {
        Plain,
        PostQuantum,
        EchGrease,
        /// What current Chrome sends: a post-quantum share and ECH GREASE.
        PostQuantumEchGrease,
    }

    /// The first flight rustls writes for a connection to `server_name`.
    pub(super) fn client_hello(flavour: Flavour, server_name: &str) -> Vec<u8> {
        let mut provider = rustls::crypto::ring::default_provider();
        if let Flavour::PostQuantum | Flavour::PostQuantumEchGrease = flavour {
            // First in the list is the group rustls sends a key share for.
            provider.kx_groups.insert(0, &STUB_MLKEM);
        }
        let builder = ClientConfig::builder_with_provider(Arc::new(provider));
        let builder = match flavour {
            Flavour::EchGrease | Flavour::PostQuantumEchGrease => {
                let grease = rustls::client::EchGreaseConfig::new(&STUB_HPKE, HpkePublicKey(vec![0x04; 65]));
                builder.with_ech(rustls::client::EchMode::Grease(grease)).unwrap()
            }
            Flavour::Plain | Flavour::PostQuantum => builder.with_safe_default_protocol_versions().unwrap(),
        };
        let mut config = builder
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let name = ServerName::try_from(server_name.to_owned()).unwrap();
        let mut conn = ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }
}

use rustls_hellos::{Flavour, client_hello};

fn expect_done(name: &str, bytes: &[u8]) -> ClientHello {
    check_byte_at_a_time(name, bytes);
    match parse_all(bytes) {
        Ok(Progress::Done(hello)) => {
            let resplit = refragment(bytes, [2, hello.handshake_len * 2 / 3]);
            assert_eq!(parse_all(&resplit), Ok(Progress::Done(hello.clone())), "{name}");
            hello
        }
        other => panic!("{name}: {other:?}"),
    }
}

#[test]
fn classify_rustls_hello() {
    let hello = expect_done("rustls", &client_hello(Flavour::Plain, "rustls.example.test"));
    assert_eq!(hello.sni.as_deref(), Some("rustls.example.test"));
    assert_eq!(alpn_string(&hello), "h2,http/1.1");
    assert_eq!(versions_string(&hello), "0304,0303");
    assert!(!hello.ech);
}

#[test]
fn classify_rustls_post_quantum_sized_hello() {
    let hello = expect_done("rustls-pq", &client_hello(Flavour::PostQuantum, "pq.example.test"));
    assert_eq!(hello.sni.as_deref(), Some("pq.example.test"));
    assert!(hello.handshake_len > 1400, "{}", hello.handshake_len);
}

#[test]
fn classify_rustls_post_quantum_ech_grease_hello() {
    let hello = expect_done(
        "rustls-pq-ech",
        &client_hello(Flavour::PostQuantumEchGrease, "chrome-like.example.test"),
    );
    assert!(hello.ech);
    assert!(hello.handshake_len > 1600, "{}", hello.handshake_len);
}

#[test]
fn classify_rustls_ech_grease_hello() {
    let hello = expect_done("rustls-ech", &client_hello(Flavour::EchGrease, "inner.example.test"));
    assert!(hello.ech);
    // GREASE ECH sends the real name as the outer SNI.
    assert_eq!(hello.sni.as_deref(), Some("inner.example.test"));
    assert_eq!(versions_string(&hello), "0304");
}

/// Writes the rustls vectors into `tests/data/clienthello/`. Their bytes are
/// random per run, so they are generated once and committed:
/// `cargo test -p sluice --test classify_vectors -- --ignored regenerate`.
#[test]
#[ignore = "rewrites committed test vectors"]
fn regenerate_rustls_vectors() {
    let dir = data_dir();
    fs::write(
        dir.join("rustls-0.23-ring-alpn-h2.bin"),
        client_hello(Flavour::Plain, "rustls.example.test"),
    )
    .unwrap();
    fs::write(
        dir.join("rustls-0.23-stub-x25519mlkem768-share.bin"),
        client_hello(Flavour::PostQuantum, "pq.example.test"),
    )
    .unwrap();
    fs::write(
        dir.join("rustls-0.23-stub-x25519mlkem768-ech-grease.bin"),
        client_hello(Flavour::PostQuantumEchGrease, "chrome-like.example.test"),
    )
    .unwrap();
    fs::write(
        dir.join("rustls-0.23-ech-grease-stub-hpke.bin"),
        client_hello(Flavour::EchGrease, "ech-grease.example.test"),
    )
    .unwrap();
}
