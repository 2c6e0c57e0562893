//! TLS ClientHello classification. A TLS client speaks first, and its first
//! handshake message names where it wants to go (SNI), what it wants to speak
//! there (ALPN) and whether the real name is hidden (ECH). This module reads
//! exactly that from the peeked bytes without terminating TLS: it walks the
//! record layer, reassembles the handshake message across TCP segments and TLS
//! records, and decodes only the ClientHello fields policy needs (RFC 8446
//! §4.1.2, RFC 6066 §3, RFC 7301, draft-ietf-tls-esni). QUIC carries the same
//! message without records; [`parse_client_hello_message`] reads it there.
//!
//! It keeps no state between calls: the caller passes the whole buffer peeked
//! so far each time. Size is bounded by [`Limits`], checked against the declared
//! lengths as soon as they are seen so an oversized hello is refused before its
//! bytes are buffered.

use super::{Progress, is_host_name};

/// Record content type of handshake messages.
const CONTENT_HANDSHAKE: u8 = 22;
const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;
/// RFC 8446 §5.1: a plaintext record carries at most 2^14 bytes.
const MAX_RECORD_PAYLOAD: usize = 1 << 14;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;

const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_PRE_SHARED_KEY: u16 = 41;
const EXT_SUPPORTED_VERSIONS: u16 = 43;
/// `encrypted_client_hello` (draft-ietf-tls-esni-22 §11.1).
const EXT_ECH: u16 = 0xfe0d;

/// Bounds on what the parser accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest ClientHello handshake message accepted, counting its 4-byte
    /// handshake header but not record headers.
    pub max_client_hello: usize,
}

impl Default for Limits {
    /// 16 KiB: several times the largest hellos seen in practice (browsers with
    /// post-quantum key shares send about 1.8 KiB), small enough to bound what a
    /// flow may make us buffer.
    fn default() -> Self {
        Limits {
            max_client_hello: 16 * 1024,
        }
    }
}

/// What the policy layer needs from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientHello {
    /// The `host_name` from `server_name`, exactly as sent (case preserved).
    /// With ECH this is the outer, public name.
    pub sni: Option<String>,
    /// ALPN protocol names in the client's order; opaque bytes per RFC 7301.
    pub alpn: Vec<Vec<u8>>,
    /// `legacy_version` of the ClientHello body (0x0303 for TLS 1.2 and 1.3).
    pub legacy_version: u16,
    /// `supported_versions` in the client's order, GREASE values removed.
    /// Empty when the extension is absent (a pre-TLS 1.3 client).
    pub supported_versions: Vec<u16>,
    /// The `encrypted_client_hello` extension is present: the SNI above is the
    /// outer name and the real destination is hidden.
    pub ech: bool,
    /// Number of cipher suites offered, GREASE included.
    pub cipher_suite_count: usize,
    /// Length of the handshake message, 4-byte header included.
    pub handshake_len: usize,
}

impl ClientHello {
    /// Highest protocol version offered: from `supported_versions` when sent
    /// (TLS 1.3 clients), else `legacy_version`.
    pub fn highest_version(&self) -> u16 {
        self.supported_versions
            .iter()
            .copied()
            .max()
            .unwrap_or(self.legacy_version)
    }
}

/// A first-flight byte stream that is not an acceptable ClientHello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("record content type {0} is not handshake (22)")]
    NotHandshake(u8),
    #[error("SSLv2-style record header")]
    Sslv2,
    #[error("protocol version {0:#06x} is not SSL 3.0 or TLS")]
    BadVersion(u16),
    #[error("handshake message type {0} is not ClientHello (1)")]
    NotClientHello(u8),
    #[error("ClientHello declares {declared} bytes, more than the limit of {max}")]
    Oversized { declared: usize, max: usize },
    #[error("malformed ClientHello: bad {0}")]
    Malformed(Field),
    #[error("bad server_name: {0}")]
    BadSni(SniProblem),
    #[error("extension {0:#06x} appears more than once")]
    DuplicateExtension(u16),
}

impl TlsError {
    /// Stable reason code for audit records and metrics labels.
    /// The verdict's reason for a ClientHello that does not parse.
    pub fn reason(&self) -> sluice_api::reason::ReasonCode {
        use sluice_api::reason::ReasonCode as R;
        match self {
            TlsError::NotHandshake(_) => R::TlsNotHandshake,
            TlsError::Sslv2 => R::TlsSslv2,
            TlsError::BadVersion(_) => R::TlsBadVersion,
            TlsError::NotClientHello(_) => R::TlsNotClientHello,
            TlsError::Oversized { .. } => R::TlsOversized,
            TlsError::Malformed(_) => R::TlsMalformed,
            TlsError::BadSni(_) => R::TlsBadSni,
            TlsError::DuplicateExtension(_) => R::TlsDuplicateExtension,
        }
    }

    pub fn reason_code(&self) -> &'static str {
        match self {
            TlsError::NotHandshake(_) => "tls-not-handshake",
            TlsError::Sslv2 => "tls-sslv2",
            TlsError::BadVersion(_) => "tls-bad-version",
            TlsError::NotClientHello(_) => "tls-not-client-hello",
            TlsError::Oversized { .. } => "tls-oversized",
            TlsError::Malformed(_) => "tls-malformed",
            TlsError::BadSni(_) => "tls-bad-sni",
            TlsError::DuplicateExtension(_) => "tls-duplicate-extension",
        }
    }
}

/// The structure whose length or content was wrong in a malformed hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Field {
    #[error("record length")]
    RecordLength,
    #[error("legacy_version")]
    LegacyVersion,
    #[error("random")]
    Random,
    #[error("legacy_session_id")]
    SessionId,
    #[error("cipher_suites")]
    CipherSuites,
    #[error("legacy_compression_methods")]
    CompressionMethods,
    #[error("extensions block")]
    Extensions,
    #[error("bytes after the extensions")]
    TrailingBytes,
    #[error("server_name extension")]
    ServerName,
    #[error("application_layer_protocol_negotiation extension")]
    Alpn,
    #[error("supported_versions extension")]
    SupportedVersions,
    #[error("encrypted_client_hello extension")]
    Ech,
    #[error("pre_shared_key extension not last")]
    PreSharedKeyNotLast,
}

/// Why a `server_name` extension was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SniProblem {
    #[error("no host_name entry")]
    NoHostName,
    #[error("more than one host_name entry")]
    MultipleHostNames,
    #[error("host_name is not an ASCII DNS name")]
    InvalidHostName,
}

/// First-bytes guess for transparent mode, where nothing says which protocol
/// the client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniff {
    /// A TLS handshake record (or an SSLv2 hello, which the TLS parser then
    /// refuses with its own reason code).
    Tls,
    /// An HTTP/1 request line: an upper-case method token then a space.
    Http,
    /// A TLS record of another content type (change_cipher_spec, alert,
    /// application_data, heartbeat; the type is given) where a client's
    /// first record must be a handshake: a ClientHello hidden from the
    /// classifier, or a tunnel that is TLS but shows no hello. Never opaque.
    TlsRecordOutOfPlace(u8),
    /// Neither; the flow is opaque TCP.
    Unknown,
    NeedMore,
}

/// Longest method token `sniff` waits for before calling the stream unknown;
/// the longest registered method (`UPDATEREDIRECTREF`) is 17 bytes.
const MAX_SNIFF_METHOD: usize = 24;

/// Guesses from the first bytes whether the stream is TLS, HTTP/1 or neither.
///
/// HTTP/2 prior knowledge (`PRI * HTTP/2.0`) reads as `Http`; the HTTP/1 parser
/// then rejects its version.
pub fn sniff(buf: &[u8]) -> Sniff {
    let Some(&first) = buf.first() else {
        return Sniff::NeedMore;
    };
    if first == CONTENT_HANDSHAKE {
        return match buf.get(1) {
            None => Sniff::NeedMore,
            Some(3) => Sniff::Tls,
            Some(_) => Sniff::Unknown,
        };
    }
    if matches!(first, 20 | 21 | 23 | 24) {
        // A record header: content type, version 3.x with x ≤ 4 (SSL 3.0 to
        // TLS 1.3's legacy value).
        return match (buf.get(1), buf.get(2)) {
            (None, _) | (Some(3), None) => Sniff::NeedMore,
            (Some(3), Some(minor)) if *minor <= 4 => Sniff::TlsRecordOutOfPlace(first),
            _ => Sniff::Unknown,
        };
    }
    if first & 0x80 != 0 {
        // SSLv2 record: 2-byte length with the high bit set, then msg type 1.
        return match buf.get(2) {
            None => Sniff::NeedMore,
            Some(1) => Sniff::Tls,
            Some(_) => Sniff::Unknown,
        };
    }
    for (i, &b) in buf.iter().enumerate().take(MAX_SNIFF_METHOD + 1) {
        if b == b' ' {
            return if i > 0 { Sniff::Http } else { Sniff::Unknown };
        }
        if !(b.is_ascii_uppercase() || b == b'-' || b == b'_') {
            return Sniff::Unknown;
        }
    }
    if buf.len() > MAX_SNIFF_METHOD {
        Sniff::Unknown
    } else {
        Sniff::NeedMore
    }
}

/// Parses the ClientHello at the start of `input`, the bytes peeked so far.
///
/// Returns `NeedMore` while `input` is a valid but incomplete prefix; call again
/// with a longer buffer. Bytes after the ClientHello are ignored. For any input,
/// a prefix of it yields either `NeedMore` or the same result as the whole.
pub fn parse_client_hello(input: &[u8], limits: &Limits) -> Result<Progress<ClientHello>, TlsError> {
    let mut pos = 0usize;
    // Handshake bytes seen so far, and the header of the handshake message as
    // far as it has been seen (it may itself be split across records).
    let mut hs_seen = 0usize;
    let mut hs_header = [0u8; HANDSHAKE_HEADER_LEN];
    let mut hs_total: Option<usize> = None;
    loop {
        let header = input.get(pos..).unwrap_or_default();
        check_record_header(header, pos == 0)?;
        let Some(record_len) = record_len(header) else {
            // A partial header is checked again once its content type (byte
            // 1), version (byte 3) or length (byte 5) is in.
            let next_check = match header.len() {
                0 => 1,
                1 | 2 => 3,
                _ => RECORD_HEADER_LEN,
            };
            return Ok(need(next_check - header.len()));
        };
        let payload_start = pos.saturating_add(RECORD_HEADER_LEN);
        let available = input.len().saturating_sub(payload_start).min(record_len);
        let payload = input
            .get(payload_start..payload_start.saturating_add(available))
            .unwrap_or_default();

        let before = hs_seen;
        let header_part = payload.iter().take(HANDSHAKE_HEADER_LEN.saturating_sub(before));
        for (idx, &b) in (before..).zip(header_part) {
            // Refuse on the very first handshake byte: no reason to buffer a
            // message we will not parse.
            if idx == 0 && b != HANDSHAKE_CLIENT_HELLO {
                return Err(TlsError::NotClientHello(b));
            }
            if let Some(slot) = hs_header.get_mut(idx) {
                *slot = b;
            }
        }
        hs_seen = before + payload.len();
        if hs_total.is_none() && hs_seen >= HANDSHAKE_HEADER_LEN {
            hs_total = Some(declared_len(hs_header, limits)?);
        }
        if let Some(total) = hs_total
            && hs_seen >= total
        {
            return finish(input, total).map(Progress::Done);
        }
        let until_check = handshake_until_check(hs_seen, hs_total);
        let rest_of_record = record_len - available;
        if rest_of_record > 0 {
            // If the current record ends first, the next record's content type
            // byte is checked as soon as it arrives.
            return Ok(need(until_check.min(rest_of_record + 1)));
        }
        pos = payload_start + record_len;
    }
}

/// Checks as much of a record header as `header` holds. Each check runs only
/// once all of its bytes are present, so a prefix of the input fails with the
/// same error as the whole or not at all.
fn check_record_header(header: &[u8], first_record: bool) -> Result<(), TlsError> {
    let Some(&content_type) = header.first() else {
        return Ok(());
    };
    // An SSLv2 header is a 2-byte length with the high bit set; no TLS content
    // type has that bit, so it is the one thing the first byte can tell.
    if first_record && content_type & 0x80 != 0 {
        return Err(TlsError::Sslv2);
    }
    if content_type != CONTENT_HANDSHAKE {
        return Err(TlsError::NotHandshake(content_type));
    }
    if let (Some(&major), Some(&minor)) = (header.get(1), header.get(2))
        && (major != 3 || minor > 4)
    {
        return Err(TlsError::BadVersion(u16::from_be_bytes([major, minor])));
    }
    // RFC 8446 §5.1 forbids zero-length handshake fragments and records over
    // 2^14 bytes; a peer that sends either is not a TLS client.
    if let Some(len) = record_len(header)
        && (len == 0 || len > MAX_RECORD_PAYLOAD)
    {
        return Err(TlsError::Malformed(Field::RecordLength));
    }
    Ok(())
}

fn record_len(header: &[u8]) -> Option<usize> {
    match header.get(3..RECORD_HEADER_LEN) {
        Some(&[a, b]) => Some(usize::from(u16::from_be_bytes([a, b]))),
        _ => None,
    }
}

/// Handshake bytes until the next point where the outcome can change: the
/// type byte, the end of the length field, then the end of the message.
fn handshake_until_check(seen: usize, total: Option<usize>) -> usize {
    let next = match total {
        Some(total) => total,
        None if seen == 0 => 1,
        None => HANDSHAKE_HEADER_LEN,
    };
    next.saturating_sub(seen).max(1)
}

fn need<T>(at_least: usize) -> Progress<T> {
    Progress::NeedMore {
        at_least: Some(at_least.max(1)),
    }
}

/// The whole length (header included) a ClientHello's 4-byte handshake header
/// declares, refused when over the limit. Both entry points check the header
/// here, so a hello over TCP and one over QUIC are bounded the same way.
fn declared_len(header: [u8; HANDSHAKE_HEADER_LEN], limits: &Limits) -> Result<usize, TlsError> {
    let [_, a, b, c] = header;
    let declared = HANDSHAKE_HEADER_LEN + u32::from_be_bytes([0, a, b, c]) as usize;
    if declared > limits.max_client_hello {
        return Err(TlsError::Oversized {
            declared,
            max: limits.max_client_hello,
        });
    }
    Ok(declared)
}

/// Parses the ClientHello handshake message at the start of `input` when it
/// comes without a TLS record layer: QUIC carries TLS handshake messages in
/// CRYPTO frames, already reassembled by stream offset (RFC 9001 §4), so there
/// are no record headers to walk.
///
/// This is a second entry, not a second parser: it checks the handshake header
/// with the same `declared_len` and decodes the body with the same
/// `parse_message` as [`parse_client_hello`], so a hello seen over QUIC gets
/// exactly the checks (duplicate extensions, SNI syntax, ECH, ALPN) and the
/// same [`ClientHello`] as one seen over TCP. Wrapping the QUIC bytes in
/// synthetic records instead would have worked too, but would copy the hello
/// and subject it to record-layer limits (2^14 bytes per record) that QUIC
/// does not have.
///
/// Like [`parse_client_hello`] it keeps no state: pass the contiguous prefix
/// known so far; `NeedMore` counts the handshake bytes still missing.
pub fn parse_client_hello_message(input: &[u8], limits: &Limits) -> Result<Progress<ClientHello>, TlsError> {
    let Some(&msg_type) = input.first() else {
        return Ok(need(1));
    };
    if msg_type != HANDSHAKE_CLIENT_HELLO {
        return Err(TlsError::NotClientHello(msg_type));
    }
    let header = match input.get(..HANDSHAKE_HEADER_LEN) {
        Some(&[t, a, b, c]) => [t, a, b, c],
        _ => return Ok(need(HANDSHAKE_HEADER_LEN - input.len())),
    };
    let total = declared_len(header, limits)?;
    match input.get(..total) {
        Some(msg) => parse_message(msg).map(Progress::Done),
        None => Ok(need(total - input.len())),
    }
}

/// Decodes the complete handshake message of `total` bytes carried by the
/// (already validated) records at the start of `input`.
fn finish(input: &[u8], total: usize) -> Result<ClientHello, TlsError> {
    // Nearly every client sends the hello in one record: parse it in place.
    if record_len(input).is_some_and(|len| len >= total) {
        let msg = input
            .get(RECORD_HEADER_LEN..RECORD_HEADER_LEN.saturating_add(total))
            .ok_or(TlsError::Malformed(Field::RecordLength))?;
        return parse_message(msg);
    }
    let mut msg = Vec::with_capacity(total);
    let mut pos = 0usize;
    while msg.len() < total {
        let Some(len) = input.get(pos..).and_then(record_len) else {
            break;
        };
        let start = pos.saturating_add(RECORD_HEADER_LEN);
        let take = len.min(total - msg.len());
        let Some(chunk) = input.get(start..start.saturating_add(take)) else {
            break;
        };
        msg.extend_from_slice(chunk);
        pos = start.saturating_add(len);
    }
    parse_message(&msg)
}

/// Decodes a whole handshake message (header included) known to be a
/// ClientHello of the declared length.
fn parse_message(msg: &[u8]) -> Result<ClientHello, TlsError> {
    let body = msg
        .get(HANDSHAKE_HEADER_LEN..)
        .ok_or(TlsError::Malformed(Field::RecordLength))?;
    let mut hello = parse_body(body)?;
    hello.handshake_len = msg.len();
    Ok(hello)
}

fn parse_body(body: &[u8]) -> Result<ClientHello, TlsError> {
    use TlsError::Malformed;
    let mut r = Reader(body);
    let legacy_version = r.u16().ok_or(Malformed(Field::LegacyVersion))?;
    if legacy_version >> 8 != 3 {
        return Err(TlsError::BadVersion(legacy_version));
    }
    r.take(32).ok_or(Malformed(Field::Random))?;
    let session_id = r.vec_u8().ok_or(Malformed(Field::SessionId))?;
    if session_id.len() > 32 {
        return Err(Malformed(Field::SessionId));
    }
    let suites = r.vec_u16().ok_or(Malformed(Field::CipherSuites))?;
    if suites.len() < 2 || suites.len() % 2 != 0 {
        return Err(Malformed(Field::CipherSuites));
    }
    let compression = r.vec_u8().ok_or(Malformed(Field::CompressionMethods))?;
    if compression.is_empty() {
        return Err(Malformed(Field::CompressionMethods));
    }
    let mut hello = ClientHello {
        legacy_version,
        cipher_suite_count: suites.len() / 2,
        ..ClientHello::default()
    };
    // Extensions are optional before TLS 1.3 (RFC 5246 §7.4.1.2).
    if r.is_empty() {
        return Ok(hello);
    }
    let extensions = r.vec_u16().ok_or(Malformed(Field::Extensions))?;
    if !r.is_empty() {
        return Err(Malformed(Field::TrailingBytes));
    }

    let mut seen = SeenTypes::default();
    let mut after_psk = false;
    let mut r = Reader(extensions);
    while !r.is_empty() {
        let ext_type = r.u16().ok_or(Malformed(Field::Extensions))?;
        let data = r.vec_u16().ok_or(Malformed(Field::Extensions))?;
        // Two server_name extensions would let the proxy and the origin pick
        // different names, so duplicates of any type are refused (RFC 8446 §4.2).
        if !seen.insert(ext_type) {
            return Err(TlsError::DuplicateExtension(ext_type));
        }
        if after_psk {
            return Err(Malformed(Field::PreSharedKeyNotLast));
        }
        match ext_type {
            EXT_SERVER_NAME => hello.sni = Some(parse_server_name(data)?),
            EXT_ALPN => hello.alpn = parse_alpn(data)?,
            EXT_SUPPORTED_VERSIONS => hello.supported_versions = parse_supported_versions(data)?,
            EXT_ECH => {
                // ECHClientHello starts with its type byte; an empty body is
                // not an ECH extension any server would accept.
                if data.is_empty() {
                    return Err(Malformed(Field::Ech));
                }
                hello.ech = true;
            }
            EXT_PRE_SHARED_KEY => after_psk = true,
            _ => {}
        }
    }
    Ok(hello)
}

/// The extension types a ClientHello has carried so far. Real hellos carry
/// 10–20, checked against a short list; past `FEW` a 65,536-bit map takes
/// over (allocated only then), so a hostile hello with thousands of
/// extensions still costs O(1) per extension.
#[derive(Default)]
struct SeenTypes {
    few: [u16; SeenTypes::FEW],
    len: usize,
    many: Option<Box<[u64; 1024]>>,
}

impl SeenTypes {
    const FEW: usize = 32;

    /// Records `t`; `false` when it was already there.
    fn insert(&mut self, t: u16) -> bool {
        if let Some(bits) = self.many.as_deref_mut() {
            let (word, bit) = (usize::from(t >> 6), 1u64 << (t & 63));
            let fresh = bits[word] & bit == 0;
            bits[word] |= bit;
            return fresh;
        }
        if self.few[..self.len].contains(&t) {
            return false;
        }
        if self.len < Self::FEW {
            self.few[self.len] = t;
            self.len += 1;
            return true;
        }
        let mut bits = Box::new([0u64; 1024]);
        for &old in self.few.iter().chain([&t]) {
            bits[usize::from(old >> 6)] |= 1u64 << (old & 63);
        }
        self.many = Some(bits);
        true
    }
}

/// RFC 6066 §3 `ServerNameList`: exactly one `host_name`; entries of other
/// (unassigned) types are skipped, as their layout is the same opaque<1..2^16-1>.
fn parse_server_name(data: &[u8]) -> Result<String, TlsError> {
    let malformed = TlsError::Malformed(Field::ServerName);
    let mut r = Reader(data);
    let list = r.vec_u16().ok_or(malformed)?;
    if !r.is_empty() || list.is_empty() {
        return Err(malformed);
    }
    let mut host: Option<String> = None;
    let mut r = Reader(list);
    while !r.is_empty() {
        let name_type = r.u8().ok_or(malformed)?;
        let name = r.vec_u16().ok_or(malformed)?;
        if name_type != 0 {
            continue;
        }
        if host.is_some() {
            return Err(TlsError::BadSni(SniProblem::MultipleHostNames));
        }
        if !is_host_name(name) {
            return Err(TlsError::BadSni(SniProblem::InvalidHostName));
        }
        // is_host_name admits ASCII only, so this never replaces anything.
        host = Some(String::from_utf8_lossy(name).into_owned());
    }
    host.ok_or(TlsError::BadSni(SniProblem::NoHostName))
}

/// RFC 7301 §3.1 `ProtocolNameList`: at least one name, each 1–255 bytes.
fn parse_alpn(data: &[u8]) -> Result<Vec<Vec<u8>>, TlsError> {
    let malformed = TlsError::Malformed(Field::Alpn);
    let mut r = Reader(data);
    let list = r.vec_u16().ok_or(malformed)?;
    if !r.is_empty() || list.is_empty() {
        return Err(malformed);
    }
    let mut protocols = Vec::new();
    let mut r = Reader(list);
    while !r.is_empty() {
        let name = r.vec_u8().ok_or(malformed)?;
        if name.is_empty() {
            return Err(malformed);
        }
        protocols.push(name.to_vec());
    }
    Ok(protocols)
}

/// RFC 8446 §4.2.1, client form: a u8-prefixed list of 1–127 versions.
fn parse_supported_versions(data: &[u8]) -> Result<Vec<u16>, TlsError> {
    let malformed = TlsError::Malformed(Field::SupportedVersions);
    let mut r = Reader(data);
    let list = r.vec_u8().ok_or(malformed)?;
    if !r.is_empty() || list.is_empty() || list.len() % 2 != 0 {
        return Err(malformed);
    }
    Ok(list
        .chunks_exact(2)
        .filter_map(|pair| match pair {
            &[a, b] => Some(u16::from_be_bytes([a, b])),
            _ => None,
        })
        .filter(|&v| !is_grease(v))
        .collect())
}

/// RFC 8701 GREASE values: 0x?a?a with both bytes equal.
pub fn is_grease(value: u16) -> bool {
    value & 0x0f0f == 0x0a0a && value >> 8 == value & 0xff
}

/// Cursor over TLS's length-prefixed encodings; every read is checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }

    fn u16(&mut self) -> Option<u16> {
        match self.take(2)? {
            &[a, b] => Some(u16::from_be_bytes([a, b])),
            _ => None,
        }
    }

    fn vec_u8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }

    fn vec_u16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn u16be(v: usize) -> [u8; 2] {
        u16::try_from(v).unwrap().to_be_bytes()
    }

    fn ext(ext_type: u16, data: &[u8]) -> Vec<u8> {
        let mut out = ext_type.to_be_bytes().to_vec();
        out.extend_from_slice(&u16be(data.len()));
        out.extend_from_slice(data);
        out
    }

    fn server_name_data(entries: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (name_type, name) in entries {
            list.push(*name_type);
            list.extend_from_slice(&u16be(name.len()));
            list.extend_from_slice(name);
        }
        let mut out = u16be(list.len()).to_vec();
        out.extend(list);
        out
    }

    fn sni(name: &[u8]) -> Vec<u8> {
        ext(EXT_SERVER_NAME, &server_name_data(&[(0, name)]))
    }

    fn alpn(protocols: &[&[u8]]) -> Vec<u8> {
        let mut list = Vec::new();
        for p in protocols {
            list.push(u8::try_from(p.len()).unwrap());
            list.extend_from_slice(p);
        }
        let mut data = u16be(list.len()).to_vec();
        data.extend(list);
        ext(EXT_ALPN, &data)
    }

    fn versions(vs: &[u16]) -> Vec<u8> {
        let mut data = vec![u8::try_from(vs.len() * 2).unwrap()];
        for v in vs {
            data.extend_from_slice(&v.to_be_bytes());
        }
        ext(EXT_SUPPORTED_VERSIONS, &data)
    }

    /// A ClientHello handshake message (with header) carrying `extensions`.
    fn handshake(extensions: &[Vec<u8>]) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[0x42; 32]);
        body.push(32);
        body.extend_from_slice(&[0x17; 32]);
        let suites: [u16; 4] = [0x2a2a, 0x1301, 0x1302, 0xc02f];
        body.extend_from_slice(&u16be(suites.len() * 2));
        for s in suites {
            body.extend_from_slice(&s.to_be_bytes());
        }
        body.extend_from_slice(&[1, 0]);
        let block: Vec<u8> = extensions.concat();
        body.extend_from_slice(&u16be(block.len()));
        body.extend(block);
        let mut msg = vec![HANDSHAKE_CLIENT_HELLO];
        msg.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
        msg.extend(body);
        msg
    }

    /// Frames `msg` as handshake records with payloads cut at `cuts`.
    fn records(msg: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut bounds = vec![0];
        bounds.extend(cuts.iter().copied().filter(|&c| c > 0 && c < msg.len()));
        bounds.push(msg.len());
        bounds.sort_unstable();
        bounds.dedup();
        let mut out = Vec::new();
        for w in bounds.windows(2) {
            out.extend_from_slice(&[CONTENT_HANDSHAKE, 3, 1]);
            out.extend_from_slice(&u16be(w[1] - w[0]));
            out.extend_from_slice(&msg[w[0]..w[1]]);
        }
        out
    }

    fn typical_extensions() -> Vec<Vec<u8>> {
        vec![
            ext(0x0a0a, &[]),
            sni(b"api.Example.com"),
            alpn(&[b"h2", b"http/1.1"]),
            versions(&[0x3a3a, 0x0304, 0x0303]),
            // A key_share as large as an X25519MLKEM768 one plus X25519.
            ext(51, &vec![0x33; 1216 + 32 + 12]),
            ext(21, &[0; 200]),
            ext(0x4a4a, &[0]),
        ]
    }

    fn parse(input: &[u8]) -> Result<Progress<ClientHello>, TlsError> {
        parse_client_hello(input, &Limits::default())
    }

    fn done(input: &[u8]) -> ClientHello {
        match parse(input) {
            Ok(Progress::Done(hello)) => hello,
            other => panic!("expected a ClientHello, got {other:?}"),
        }
    }

    /// Every prefix is NeedMore (with a hint that does not skip past a
    /// decision) or the whole input's outcome.
    fn assert_prefixes_consistent(input: &[u8]) {
        let whole = parse(input);
        let mut k = 0;
        while k <= input.len() {
            match parse(&input[..k]) {
                Ok(Progress::NeedMore { at_least }) => {
                    let hint = at_least.unwrap_or(1);
                    assert!(hint >= 1);
                    // Jumping by the hint must not land past a decided prefix
                    // without passing through it undecided.
                    for j in k + 1..(k + hint).min(input.len() + 1) {
                        assert!(
                            matches!(parse(&input[..j]), Ok(Progress::NeedMore { .. })),
                            "hint {hint} at {k}, {j} decided"
                        );
                    }
                }
                decided => {
                    assert_eq!(decided, whole, "prefix {k} of {}", input.len());
                    return;
                }
            }
            k += 1;
        }
    }

    #[test]
    fn parses_typical_hello() {
        let msg = handshake(&typical_extensions());
        let hello = done(&records(&msg, &[]));
        assert_eq!(hello.sni.as_deref(), Some("api.Example.com"));
        assert_eq!(hello.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert_eq!(hello.supported_versions, vec![0x0304, 0x0303]);
        assert_eq!(hello.legacy_version, 0x0303);
        assert_eq!(hello.highest_version(), 0x0304);
        assert_eq!(hello.cipher_suite_count, 4);
        assert!(!hello.ech);
        assert_eq!(hello.handshake_len, msg.len());
        assert!(hello.handshake_len > 1600);
    }

    #[test]
    fn one_byte_at_a_time_needs_more_until_complete() {
        let input = records(&handshake(&typical_extensions()), &[]);
        for k in 0..input.len() {
            assert!(
                matches!(parse(&input[..k]), Ok(Progress::NeedMore { .. })),
                "prefix {k}"
            );
        }
        assert_eq!(parse(&input), Ok(Progress::Done(done(&input))));
        assert_prefixes_consistent(&input);
    }

    #[test]
    fn three_records_give_the_same_hello() {
        let msg = handshake(&typical_extensions());
        let whole = done(&records(&msg, &[]));
        for cuts in [[1, 2], [3, 900], [100, 200], [4, msg.len() - 1]] {
            let split = records(&msg, &cuts);
            assert_eq!(done(&split), whole, "cuts {cuts:?}");
            assert_prefixes_consistent(&split);
        }
    }

    #[test]
    fn one_byte_records_are_reassembled() {
        let msg = handshake(&[sni(b"tiny.example")]);
        let cuts: Vec<usize> = (1..msg.len()).collect();
        let input = records(&msg, &cuts);
        assert_eq!(done(&input).sni.as_deref(), Some("tiny.example"));
    }

    #[test]
    fn hints_are_exact_at_record_and_handshake_headers() {
        let input = records(&handshake(&[sni(b"a.example")]), &[]);
        let hint = |k: usize| match parse(&input[..k]) {
            Ok(Progress::NeedMore { at_least }) => at_least,
            other => panic!("{other:?}"),
        };
        assert_eq!(hint(0), Some(1));
        assert_eq!(hint(1), Some(2));
        assert_eq!(hint(3), Some(2));
        assert_eq!(hint(5), Some(1));
        assert_eq!(hint(6), Some(3));
        assert_eq!(hint(9), Some(input.len() - 9));
    }

    #[test]
    fn bare_message_parses_like_its_records() {
        let limits = Limits::default();
        let msg = handshake(&[sni(b"bare.example"), alpn(&[b"h3"])]);
        let via_records = done(&records(&msg, &[7]));
        assert_eq!(
            parse_client_hello_message(&msg, &limits),
            Ok(Progress::Done(via_records))
        );
        // Every strict prefix needs exactly the missing bytes.
        for k in 0..msg.len() {
            let want = match k {
                0 => 1,
                1..=3 => 4 - k,
                _ => msg.len() - k,
            };
            assert_eq!(parse_client_hello_message(&msg[..k], &limits), Ok(need(want)), "{k}");
        }
        // Trailing bytes are ignored, as on the record path.
        let mut longer = msg.clone();
        longer.extend_from_slice(&[9, 9, 9]);
        assert!(matches!(
            parse_client_hello_message(&longer, &limits),
            Ok(Progress::Done(_))
        ));
        assert_eq!(
            parse_client_hello_message(&[2, 0, 0, 40], &limits),
            Err(TlsError::NotClientHello(2))
        );
        assert_eq!(
            parse_client_hello_message(&[1, 1, 0, 0], &Limits { max_client_hello: 1024 }),
            Err(TlsError::Oversized {
                declared: 65540,
                max: 1024
            })
        );
        let mut bad = msg;
        bad[4 + 2 + 32] = 255;
        assert_eq!(
            parse_client_hello_message(&bad, &limits),
            Err(TlsError::Malformed(Field::SessionId))
        );
    }

    #[test]
    fn bytes_after_the_hello_are_ignored() {
        let mut input = records(&handshake(&[sni(b"a.example")]), &[]);
        let hello = done(&input);
        input.extend_from_slice(&[20, 3, 3, 0, 1, 1, 23, 3, 3]);
        assert_eq!(done(&input), hello);
    }

    #[test]
    fn hello_without_extensions_has_no_sni() {
        let mut msg = handshake(&[]);
        // Drop the empty extensions block and fix the lengths, like a TLS 1.0
        // client without extensions.
        msg.truncate(msg.len() - 2);
        let body_len = msg.len() - 4;
        msg[1..4].copy_from_slice(&u32::try_from(body_len).unwrap().to_be_bytes()[1..]);
        let hello = done(&records(&msg, &[]));
        assert_eq!(hello.sni, None);
        assert!(hello.supported_versions.is_empty());
        assert_eq!(hello.highest_version(), 0x0303);
    }

    #[test]
    fn ech_marks_outer_sni() {
        let hello = done(&records(
            &handshake(&[sni(b"public.example"), ext(EXT_ECH, &[0, 0, 1, 0, 1, 7])]),
            &[],
        ));
        assert!(hello.ech);
        assert_eq!(hello.sni.as_deref(), Some("public.example"));
        assert_eq!(
            parse(&records(&handshake(&[ext(EXT_ECH, &[])]), &[])),
            Err(TlsError::Malformed(Field::Ech))
        );
    }

    #[test]
    fn refuses_non_tls_and_sslv2() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(TlsError::NotHandshake(b'G')));
        assert_eq!(parse(&[0x80, 0x2e, 0x01, 0x03, 0x01]), Err(TlsError::Sslv2));
        assert_eq!(parse(&[0x80]), Err(TlsError::Sslv2));
        assert_eq!(parse(&[23, 3, 3, 0, 5]), Err(TlsError::NotHandshake(23)));
    }

    #[test]
    fn refuses_bad_record_versions_and_lengths() {
        assert_eq!(parse(&[22, 2, 0]), Err(TlsError::BadVersion(0x0200)));
        assert_eq!(parse(&[22, 3, 9]), Err(TlsError::BadVersion(0x0309)));
        assert_eq!(parse(&[22, 3, 1]), Ok(need(2)));
        assert_eq!(parse(&[22, 3, 1, 0, 0]), Err(TlsError::Malformed(Field::RecordLength)));
        assert_eq!(
            parse(&[22, 3, 1, 0x40, 1]),
            Err(TlsError::Malformed(Field::RecordLength))
        );
    }

    #[test]
    fn refuses_other_handshake_types_on_first_byte() {
        assert_eq!(parse(&[22, 3, 1, 0, 40, 2]), Err(TlsError::NotClientHello(2)));
    }

    #[test]
    fn oversized_is_refused_from_the_declared_length() {
        let limits = Limits { max_client_hello: 1024 };
        // 4 + 0x000400 = 1028 > 1024, known after 9 bytes.
        assert_eq!(
            parse_client_hello(&[22, 3, 1, 0x40, 0, 1, 0, 4, 0], &limits),
            Err(TlsError::Oversized {
                declared: 1028,
                max: 1024
            })
        );
        // The same when the handshake header straddles two records.
        assert_eq!(
            parse_client_hello(&[22, 3, 1, 0, 2, 1, 0, 22, 3, 1, 0x10, 0, 4, 0], &limits),
            Err(TlsError::Oversized {
                declared: 1028,
                max: 1024
            })
        );
        let fits = records(&handshake(&[sni(b"a.example")]), &[]);
        let exact = Limits {
            max_client_hello: fits.len() - 5,
        };
        assert!(matches!(parse_client_hello(&fits, &exact), Ok(Progress::Done(_))));
        let short = Limits {
            max_client_hello: fits.len() - 6,
        };
        assert!(matches!(
            parse_client_hello(&fits, &short),
            Err(TlsError::Oversized { .. })
        ));
    }

    #[test]
    fn refuses_overrunning_lengths() {
        let msg = handshake(&[sni(b"a.example")]);
        // Handshake body shorter than its fields: lie about the session id.
        let mut bad = msg.clone();
        bad[4 + 2 + 32] = 33;
        assert_eq!(parse(&records(&bad, &[])), Err(TlsError::Malformed(Field::SessionId)));
        let mut bad = msg.clone();
        bad[4 + 2 + 32] = 255;
        assert_eq!(parse(&records(&bad, &[])), Err(TlsError::Malformed(Field::SessionId)));
        // Extension length past the end of the block.
        let mut bad = handshake(&[ext(0x1234, &[1, 2, 3])]);
        let n = bad.len();
        bad[n - 4] = 0x00;
        bad[n - 3] = 0x09;
        assert_eq!(parse(&records(&bad, &[])), Err(TlsError::Malformed(Field::Extensions)));
        // Trailing bytes after the extensions block.
        let mut bad = handshake(&[sni(b"a.example")]);
        bad.push(0);
        let body_len = bad.len() - 4;
        bad[1..4].copy_from_slice(&u32::try_from(body_len).unwrap().to_be_bytes()[1..]);
        assert_eq!(
            parse(&records(&bad, &[])),
            Err(TlsError::Malformed(Field::TrailingBytes))
        );
        // Cipher suites with an odd length.
        let mut bad = msg;
        let at = 4 + 2 + 32 + 1 + 32;
        bad[at + 1] = 7;
        assert!(matches!(parse(&records(&bad, &[])), Err(TlsError::Malformed(_))));
    }

    #[test]
    fn refuses_duplicate_extensions() {
        let input = records(&handshake(&[sni(b"good.example"), sni(b"evil.example")]), &[]);
        assert_eq!(parse(&input), Err(TlsError::DuplicateExtension(0)));
        let input = records(&handshake(&[ext(0x0a0a, &[]), ext(0x0a0a, &[])]), &[]);
        assert_eq!(parse(&input), Err(TlsError::DuplicateExtension(0x0a0a)));
        // Past the short list, where the bitmap takes over: a duplicate of
        // an early type, of a late one, and of the type that overflowed it.
        let filler = |n: u16| -> Vec<Vec<u8>> { (0..n).map(|i| ext(0x1000 + i, &[])).collect() };
        for (dup_of, n) in [(0x1000, 40), (0x1000 + 39, 40), (0x1000 + 32, 33), (0x1000 + 31, 32)] {
            let mut exts = filler(n);
            exts.push(ext(dup_of, &[]));
            let input = records(&handshake(&exts), &[]);
            assert_eq!(
                parse(&input),
                Err(TlsError::DuplicateExtension(dup_of)),
                "{n} then {dup_of:#x}"
            );
        }
        // Many distinct types are fine, on either side of the switch.
        for n in [31, 32, 33, 2000] {
            let mut exts = filler(n);
            exts.push(sni(b"many.example"));
            let hello = done(&records(&handshake(&exts), &[]));
            assert_eq!(hello.sni.as_deref(), Some("many.example"), "{n}");
        }
    }

    #[test]
    fn seen_types_agree_with_a_set() {
        let mut seen = SeenTypes::default();
        let mut set = std::collections::HashSet::new();
        // A pseudo-random walk over a small range, so repeats happen before
        // and after the switch to the bitmap.
        let mut x = 12345u32;
        for _ in 0..5000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let t = u16::try_from((x >> 16) % 600).unwrap();
            assert_eq!(seen.insert(t), set.insert(t), "type {t}");
        }
    }

    #[test]
    fn server_name_rules() {
        let with = |entries: &[(u8, &[u8])]| parse(&records(&handshake(&[ext(0, &server_name_data(entries))]), &[]));
        assert_eq!(with(&[(1, b"whatever")]), Err(TlsError::BadSni(SniProblem::NoHostName)));
        assert_eq!(
            with(&[(0, b"a.example"), (0, b"b.example")]),
            Err(TlsError::BadSni(SniProblem::MultipleHostNames))
        );
        assert_eq!(
            with(&[(7, b"x"), (0, b"b.example")]).map(|p| p.done().and_then(|h| h.sni)),
            Ok(Some("b.example".to_owned()))
        );
        for bad in [
            &b""[..],
            b"exa mple.com",
            b"a..b",
            b".a",
            b"a\0b",
            b"caf\xc3\xa9.example",
            b"*.example",
            b"a/b",
            b"a..",
        ] {
            assert_eq!(
                with(&[(0, bad)]),
                Err(TlsError::BadSni(SniProblem::InvalidHostName)),
                "{bad:?}"
            );
        }
        let long_label = [b'a'; 64];
        assert_eq!(
            with(&[(0, &long_label)]),
            Err(TlsError::BadSni(SniProblem::InvalidHostName))
        );
        for good in [
            &b"xn--caf-dma.example"[..],
            b"A-1.Example.COM",
            b"_srv.example",
            b"example.com.",
        ] {
            assert!(matches!(with(&[(0, good)]), Ok(Progress::Done(_))), "{good:?}");
        }
        assert_eq!(
            parse(&records(&handshake(&[ext(0, &[0, 0])]), &[])),
            Err(TlsError::Malformed(Field::ServerName))
        );
    }

    #[test]
    fn pre_shared_key_must_be_last() {
        let input = records(&handshake(&[ext(EXT_PRE_SHARED_KEY, &[0; 8]), sni(b"a.example")]), &[]);
        assert_eq!(parse(&input), Err(TlsError::Malformed(Field::PreSharedKeyNotLast)));
        let input = records(&handshake(&[sni(b"a.example"), ext(EXT_PRE_SHARED_KEY, &[0; 8])]), &[]);
        assert!(matches!(parse(&input), Ok(Progress::Done(_))));
    }

    #[test]
    fn alpn_and_versions_must_be_well_formed() {
        let bad_alpn = records(&handshake(&[ext(EXT_ALPN, &[0, 3, 0, 1, b'x'])]), &[]);
        assert_eq!(parse(&bad_alpn), Err(TlsError::Malformed(Field::Alpn)));
        let empty_alpn = records(&handshake(&[ext(EXT_ALPN, &[0, 0])]), &[]);
        assert_eq!(parse(&empty_alpn), Err(TlsError::Malformed(Field::Alpn)));
        let odd_versions = records(&handshake(&[ext(EXT_SUPPORTED_VERSIONS, &[3, 3, 4, 3])]), &[]);
        assert_eq!(parse(&odd_versions), Err(TlsError::Malformed(Field::SupportedVersions)));
    }

    #[test]
    fn grease_detection() {
        for v in [0x0a0a, 0x1a1a, 0xfafa] {
            assert!(is_grease(v));
        }
        for v in [0x0304, 0x0a1a, 0x0a0b, 0xfe0d] {
            assert!(!is_grease(v));
        }
    }

    #[test]
    fn reason_codes_are_stable() {
        assert_eq!(TlsError::Sslv2.reason_code(), "tls-sslv2");
        assert_eq!(TlsError::NotHandshake(0).reason_code(), "tls-not-handshake");
        assert_eq!(TlsError::NotClientHello(2).reason_code(), "tls-not-client-hello");
        assert_eq!(
            TlsError::Oversized { declared: 2, max: 1 }.reason_code(),
            "tls-oversized"
        );
        assert_eq!(TlsError::Malformed(Field::Random).reason_code(), "tls-malformed");
        assert_eq!(TlsError::BadSni(SniProblem::NoHostName).reason_code(), "tls-bad-sni");
        assert_eq!(TlsError::DuplicateExtension(0).reason_code(), "tls-duplicate-extension");
        assert_eq!(TlsError::BadVersion(0).reason_code(), "tls-bad-version");
    }

    #[test]
    fn sniffs_first_bytes() {
        assert_eq!(sniff(b""), Sniff::NeedMore);
        assert_eq!(sniff(&[22]), Sniff::NeedMore);
        assert_eq!(sniff(&[22, 3, 1]), Sniff::Tls);
        assert_eq!(sniff(&[22, 4]), Sniff::Unknown);
        // Records of another type, first: TLS, out of place.
        for t in [20u8, 21, 23, 24] {
            assert_eq!(sniff(&[t]), Sniff::NeedMore);
            assert_eq!(sniff(&[t, 3]), Sniff::NeedMore);
            assert_eq!(sniff(&[t, 3, 3, 0, 5]), Sniff::TlsRecordOutOfPlace(t));
            assert_eq!(sniff(&[t, 3, 0]), Sniff::TlsRecordOutOfPlace(t));
            assert_eq!(sniff(&[t, 3, 5]), Sniff::Unknown);
            assert_eq!(sniff(&[t, 2]), Sniff::Unknown);
        }
        assert_eq!(sniff(&[25, 3, 3]), Sniff::Unknown);
        assert_eq!(sniff(&[0x80, 0x2e]), Sniff::NeedMore);
        assert_eq!(sniff(&[0x80, 0x2e, 1]), Sniff::Tls);
        assert_eq!(sniff(b"GE"), Sniff::NeedMore);
        assert_eq!(sniff(b"GET /"), Sniff::Http);
        assert_eq!(sniff(b"CONNECT a:443"), Sniff::Http);
        assert_eq!(sniff(b"M-SEARCH * HTTP/1.1"), Sniff::Http);
        assert_eq!(sniff(b"get /"), Sniff::Unknown);
        assert_eq!(sniff(b" GET"), Sniff::Unknown);
        assert_eq!(sniff(b"SSH-2.0-OpenSSH"), Sniff::Unknown);
        assert_eq!(sniff(&[b'A'; 30]), Sniff::Unknown);
    }

    fn is_need_more_progress(p: &Progress<ClientHello>) -> bool {
        matches!(p, Progress::NeedMore { .. })
    }

    fn is_need_more(r: &Result<Progress<ClientHello>, TlsError>) -> bool {
        r.as_ref().is_ok_and(is_need_more_progress)
    }

    fn arb_hello() -> impl Strategy<Value = Vec<u8>> {
        (
            proptest::option::of("[a-z0-9]{1,20}(\\.[a-z0-9-]{1,20}){0,3}"),
            proptest::collection::vec("[a-z0-9/.]{1,12}", 0..4),
            any::<bool>(),
            0usize..3000,
        )
            .prop_map(|(name, protocols, ech, share)| {
                let mut exts = vec![ext(0x1a1a, &[])];
                if let Some(name) = name {
                    exts.push(sni(name.as_bytes()));
                }
                if !protocols.is_empty() {
                    let p: Vec<&[u8]> = protocols.iter().map(|s| s.as_bytes()).collect();
                    exts.push(alpn(&p));
                }
                exts.push(versions(&[0x0304, 0x0303]));
                exts.push(ext(51, &vec![7; share]));
                if ech {
                    exts.push(ext(EXT_ECH, &[0, 0, 1, 0, 1, 9, 0, 0]));
                }
                handshake(&exts)
            })
    }

    proptest! {
        #[test]
        fn never_panics_and_prefixes_agree(input in proptest::collection::vec(any::<u8>(), 0..600)) {
            let whole = parse(&input);
            for k in 0..input.len() {
                let part = parse(&input[..k]);
                prop_assert!(is_need_more(&part) || part == whole);
            }
        }

        #[test]
        fn never_panics_on_tls_shaped_noise(tail in proptest::collection::vec(any::<u8>(), 0..400), len in 0u16..600) {
            // Random bytes behind a plausible record + handshake header reach
            // the body parser far more often than uniformly random input.
            let mut input = vec![22, 3, 1];
            input.extend_from_slice(&len.to_be_bytes());
            input.extend_from_slice(&[1, 0]);
            input.extend_from_slice(&len.saturating_sub(4).to_be_bytes());
            input.extend(tail);
            let _ = parse(&input);
        }

        #[test]
        fn any_record_split_gives_the_same_hello(msg in arb_hello(), cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..6)) {
            let whole = parse(&records(&msg, &[]));
            prop_assert!(whole.as_ref().is_ok_and(|p| !is_need_more_progress(p)), "{:?}", whole);
            let cuts: Vec<usize> = cuts.iter().map(|i| i.index(msg.len())).collect();
            let split = records(&msg, &cuts);
            prop_assert_eq!(parse(&split), whole.clone());
            // And any TCP segmentation of that: each prefix is NeedMore or the same.
            for k in 0..split.len() {
                let part = parse(&split[..k]);
                prop_assert!(is_need_more(&part), "prefix {} decided: {:?}", k, part);
            }
        }
    }
}
