//! QUIC Initial classification. A QUIC client's first flight is a ClientHello
//! like any TLS client's, but it travels inside encrypted Initial packets on
//! UDP, so a gateway that reads only TCP is walked around by every client that
//! tries HTTP/3 first. Initial packets are encrypted with keys anyone can
//! derive from public values (the version's published salt and the Destination
//! Connection ID the client chose, RFC 9001 §5.2): they hide nothing from an
//! on-path observer, and they protect only the ClientHello, never application
//! data. This module derives those keys, removes header protection, decrypts
//! the Initials, reassembles their CRYPTO frames and hands the handshake bytes
//! to the same ClientHello parser TCP flows use, so SNI, ALPN (`h3`) and ECH
//! presence feed the same anti-evasion checks and policy.
//!
//! It is sans-IO: a [`QuicInitial`] is the state of one flow, fed each datagram
//! the client sends until it returns the ClientHello or an error. It reads no
//! clock (the Initial-phase timeout is the caller's), bounds what it buffers by
//! [`QuicLimits`], and never panics on any input. Versions 1 (RFC 9000) and 2
//! (RFC 9369) are understood; anything else is refused with its own reason.

use ring::aead::quic::{AES_128, HeaderProtectionKey};
use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;

use super::Progress;
use super::tls::{ClientHello, Limits, TlsError, parse_client_hello_message};

/// The version field of QUIC version 1 (RFC 9000).
pub const VERSION_1: u32 = 0x0000_0001;
/// The version field of QUIC version 2 (RFC 9369 §3.1).
pub const VERSION_2: u32 = 0x6b33_43cf;

/// Header form bit: set on long headers, clear on short (1-RTT) headers. The
/// fixed bit next to it is not checked: RFC 9287 lets clients grease it.
const FORM_LONG: u8 = 0x80;
/// Bits of the first byte under header protection on a long header.
const LONG_PROTECTED_BITS: u8 = 0x0f;
/// Reserved bits of a long header; zero once protection is removed.
const LONG_RESERVED_BITS: u8 = 0x0c;
const MAX_CID_LEN: usize = 20;
/// Header protection samples 16 bytes starting 4 bytes after the packet
/// number's offset, as if the packet number were 4 bytes (RFC 9001 §5.4.2).
const SAMPLE_OFFSET: usize = 4;
const SAMPLE_LEN: usize = 16;

const FRAME_PADDING: u8 = 0x00;
const FRAME_PING: u8 = 0x01;
const FRAME_ACK: u8 = 0x02;
const FRAME_ACK_ECN: u8 = 0x03;
const FRAME_CRYPTO: u8 = 0x06;
const FRAME_CONNECTION_CLOSE: u8 = 0x1c;

/// Bounds on what one flow may make the classifier hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuicLimits {
    /// Largest ClientHello accepted, 4-byte handshake header included; CRYPTO
    /// data past this offset is refused before it is buffered.
    pub max_client_hello: usize,
    /// Initial packets read (decrypted) per flow before the ClientHello must
    /// be complete; duplicates count.
    pub max_initial_packets: usize,
}

impl Default for QuicLimits {
    /// 64 KiB and 16 packets. A post-quantum browser hello is about 1.8 KiB,
    /// two Initials; 16 packets carry about 18 KiB of hello, far past any
    /// seen, while a flood of Initials still stops at 16 decryptions. 64 KiB
    /// bounds the reassembly buffer even for a hello that declares more than
    /// those packets could carry.
    fn default() -> Self {
        QuicLimits {
            max_client_hello: 64 * 1024,
            max_initial_packets: 16,
        }
    }
}

/// A QUIC version whose Initial packets this module can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum QuicVersion {
    /// RFC 9000.
    V1,
    /// RFC 9369.
    V2,
}

/// Long-header packet types, named as in RFC 9000 §17.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LongType {
    Initial,
    ZeroRtt,
    Handshake,
    Retry,
}

impl QuicVersion {
    /// The version a long header's version field names, if supported.
    pub fn from_wire(version: u32) -> Option<Self> {
        match version {
            VERSION_1 => Some(Self::V1),
            VERSION_2 => Some(Self::V2),
            _ => None,
        }
    }

    /// The version field's value.
    pub fn to_wire(self) -> u32 {
        match self {
            Self::V1 => VERSION_1,
            Self::V2 => VERSION_2,
        }
    }

    /// RFC 9001 §5.2 and RFC 9369 §3.3.1.
    fn initial_salt(self) -> &'static [u8; 20] {
        match self {
            Self::V1 => &[
                0x38, 0x76, 0x2c, 0xf7, 0xf5, 0x59, 0x34, 0xb3, 0x4d, 0x17, 0x9a, 0xe6, 0xa4, 0xc8, 0x0c, 0xad, 0xcc,
                0xbb, 0x7f, 0x0a,
            ],
            Self::V2 => &[
                0x0d, 0xed, 0xe3, 0xde, 0xf7, 0x00, 0xa6, 0xdb, 0x81, 0x93, 0x81, 0xbe, 0x6e, 0x26, 0x9d, 0xcb, 0xf9,
                0xbd, 0x2e, 0xd9,
            ],
        }
    }

    /// HKDF labels for the packet key, IV and header protection key
    /// (RFC 9001 §5.1, RFC 9369 §3.3.2).
    fn labels(self) -> [&'static [u8]; 3] {
        match self {
            Self::V1 => [b"quic key", b"quic iv", b"quic hp"],
            Self::V2 => [b"quicv2 key", b"quicv2 iv", b"quicv2 hp"],
        }
    }

    /// The two type bits of a long header (RFC 9000 §17.2; v2 renumbers them,
    /// RFC 9369 §3.2).
    fn packet_type(self, first_byte: u8) -> LongType {
        let bits = (first_byte >> 4) & 0x03;
        let v1_order = match self {
            Self::V1 => bits,
            Self::V2 => bits.wrapping_sub(1) & 0x03,
        };
        match v1_order {
            0 => LongType::Initial,
            1 => LongType::ZeroRtt,
            2 => LongType::Handshake,
            _ => LongType::Retry,
        }
    }
}

/// Why a datagram is not the start of a QUIC flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NotInitial {
    #[error("a short-header (1-RTT) packet")]
    ShortHeader,
    #[error("only 0-RTT or Handshake packets, and no Initial yet")]
    NoInitialPacket,
}

/// What was wrong with a malformed Initial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Defect {
    #[error("empty datagram")]
    Empty,
    #[error("long header truncated")]
    Header,
    #[error("connection id of {0} bytes, more than 20")]
    ConnectionIdLength(u8),
    #[error("Length field runs past the datagram")]
    Length,
    #[error("packet too short to sample for header protection")]
    TooShort,
    #[error("a Retry packet from the client")]
    Retry,
    #[error("QUIC version changed within the flow")]
    VersionChanged,
    #[error("Initial with another destination connection id than the flow's first")]
    DcidChanged,
    #[error("reserved header bits set")]
    ReservedBits,
    #[error("packet without frames")]
    NoFrames,
    #[error("truncated frame")]
    Frame,
    #[error("frame type {0:#04x} is not allowed in an Initial")]
    ForbiddenFrame(u8),
    #[error("CRYPTO frames disagree about the byte at offset {offset}")]
    CryptoConflict { offset: u64 },
}

/// A datagram sequence that does not yield an acceptable ClientHello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QuicError {
    #[error("not a QUIC Initial: {0}")]
    NotInitial(NotInitial),
    #[error("QUIC version {0:#010x} is neither v1 nor v2")]
    UnsupportedVersion(u32),
    #[error("Version Negotiation packet from a client")]
    VersionNegotiation,
    #[error("malformed QUIC Initial: {0}")]
    Malformed(Defect),
    #[error("QUIC Initial does not decrypt with its Initial keys")]
    DecryptFailed,
    #[error("CRYPTO data reaches offset {end}, past the limit of {max}")]
    Oversized { end: u64, max: usize },
    #[error("more than {max} Initial packets without a complete ClientHello")]
    TooManyPackets { max: usize },
    /// The reassembled ClientHello itself is refused; its reason is the TLS
    /// one, exactly as over TCP.
    #[error("ClientHello in QUIC Initials: {0}")]
    Tls(TlsError),
}

impl QuicError {
    /// The verdict's reason for a flow whose Initials do not classify.
    pub fn reason(&self) -> sluice_api::reason::ReasonCode {
        use sluice_api::reason::ReasonCode as R;
        match self {
            QuicError::NotInitial(_) => R::QuicNotInitial,
            QuicError::UnsupportedVersion(_) => R::QuicUnsupportedVersion,
            QuicError::VersionNegotiation => R::QuicVersionNegotiation,
            QuicError::Malformed(_) => R::QuicMalformed,
            QuicError::DecryptFailed => R::QuicDecryptFailed,
            QuicError::Oversized { .. } => R::QuicOversized,
            QuicError::TooManyPackets { .. } => R::QuicTooManyPackets,
            QuicError::Tls(e) => e.reason(),
        }
    }
}

/// Client Initial packet protection material (RFC 9001 §5.2). Public by
/// design: anyone who sees the first Initial can compute it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitialSecrets {
    /// AEAD_AES_128_GCM key.
    pub key: [u8; 16],
    /// AEAD IV; the nonce is this XOR the packet number.
    pub iv: [u8; 12],
    /// AES-128 header protection key.
    pub hp: [u8; 16],
}

/// Derives the client's Initial keys for `version` from the Destination
/// Connection ID of the client's first Initial: HKDF-Extract with the
/// version's salt, then TLS 1.3 HKDF-Expand-Label "client in" and the
/// version's key/iv/hp labels.
///
/// ring refuses only output lengths beyond 255 hash blocks, which these are
/// not; should it ever fail, the packet counts as undecryptable.
pub fn client_initial_secrets(version: QuicVersion, dcid: &[u8]) -> Result<InitialSecrets, QuicError> {
    let initial = hkdf::Salt::new(hkdf::HKDF_SHA256, version.initial_salt()).extract(dcid);
    let mut client = [0u8; 32];
    expand_label(&initial, b"client in", &mut client)?;
    let client = hkdf::Prk::new_less_safe(hkdf::HKDF_SHA256, &client);
    let [key_label, iv_label, hp_label] = version.labels();
    let mut secrets = InitialSecrets {
        key: [0; 16],
        iv: [0; 12],
        hp: [0; 16],
    };
    expand_label(&client, key_label, &mut secrets.key)?;
    expand_label(&client, iv_label, &mut secrets.iv)?;
    expand_label(&client, hp_label, &mut secrets.hp)?;
    Ok(secrets)
}

/// Output length for `Prk::expand`.
struct OutLen(usize);

impl hkdf::KeyType for OutLen {
    fn len(&self) -> usize {
        self.0
    }
}

/// TLS 1.3 HKDF-Expand-Label (RFC 8446 §7.1) with an empty context.
fn expand_label(prk: &hkdf::Prk, label: &[u8], out: &mut [u8]) -> Result<(), QuicError> {
    const PREFIX: &[u8] = b"tls13 ";
    let length = u16::try_from(out.len())
        .map_err(|_| QuicError::DecryptFailed)?
        .to_be_bytes();
    let label_len = [u8::try_from(PREFIX.len() + label.len()).map_err(|_| QuicError::DecryptFailed)?];
    let info: [&[u8]; 5] = [&length, &label_len, PREFIX, label, &[0]];
    prk.expand(&info, OutLen(out.len()))
        .and_then(|okm| okm.fill(out))
        .map_err(|_| QuicError::DecryptFailed)
}

/// A connection id, at most 20 bytes, held without allocating.
#[derive(Clone, Copy, PartialEq, Eq)]
struct ConnId {
    len: usize,
    bytes: [u8; MAX_CID_LEN],
}

impl ConnId {
    fn new(id: &[u8]) -> Option<Self> {
        let mut bytes = [0u8; MAX_CID_LEN];
        bytes.get_mut(..id.len())?.copy_from_slice(id);
        Some(ConnId { len: id.len(), bytes })
    }

    fn as_slice(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or_default()
    }
}

/// The keys of one flow, derived once from its original DCID.
struct Keys {
    version: QuicVersion,
    dcid: ConnId,
    packet: LessSafeKey,
    iv: [u8; 12],
    header: HeaderProtectionKey,
}

impl Keys {
    fn derive(version: QuicVersion, dcid: ConnId) -> Result<Self, QuicError> {
        let secrets = client_initial_secrets(version, dcid.as_slice())?;
        let packet = UnboundKey::new(&AES_128_GCM, &secrets.key).map_err(|_| QuicError::DecryptFailed)?;
        let header = HeaderProtectionKey::new(&AES_128, &secrets.hp).map_err(|_| QuicError::DecryptFailed)?;
        Ok(Keys {
            version,
            dcid,
            packet: LessSafeKey::new(packet),
            iv: secrets.iv,
            header,
        })
    }
}

/// The fields of a long header read before header protection is removed.
struct LongHeader {
    first_byte: u8,
    version: QuicVersion,
    kind: LongType,
    dcid: ConnId,
    /// Offset of the (protected) packet number.
    pn_offset: usize,
    /// Offset just past this packet within the datagram's remainder.
    end: usize,
}

impl LongHeader {
    /// Reads the long header at the start of `buf`. Version is checked before
    /// anything after it, since only the version says how the rest is laid out.
    fn parse(buf: &[u8]) -> Result<Self, QuicError> {
        let header = QuicError::Malformed(Defect::Header);
        let mut r = Reader::new(buf);
        let first_byte = r.u8().ok_or(header)?;
        let wire_version = r.u32().ok_or(header)?;
        if wire_version == 0 {
            return Err(QuicError::VersionNegotiation);
        }
        let version = QuicVersion::from_wire(wire_version).ok_or(QuicError::UnsupportedVersion(wire_version))?;
        let dcid = read_cid(&mut r)?;
        read_cid(&mut r)?;
        let kind = version.packet_type(first_byte);
        match kind {
            // A Retry has no Length field to skip it by, and only servers send one.
            LongType::Retry => return Err(QuicError::Malformed(Defect::Retry)),
            LongType::Initial => {
                let token_len = r.varint().ok_or(header)?;
                r.take_u64(token_len).ok_or(header)?;
            }
            LongType::ZeroRtt | LongType::Handshake => {}
        }
        let length = r.varint().ok_or(header)?;
        let pn_offset = r.position();
        let end = usize::try_from(length)
            .ok()
            .and_then(|len| pn_offset.checked_add(len))
            .filter(|&end| end <= buf.len())
            .ok_or(QuicError::Malformed(Defect::Length))?;
        Ok(LongHeader {
            first_byte,
            version,
            kind,
            dcid,
            pn_offset,
            end,
        })
    }
}

fn read_cid(r: &mut Reader<'_>) -> Result<ConnId, QuicError> {
    let header = QuicError::Malformed(Defect::Header);
    let len = r.u8().ok_or(header)?;
    if usize::from(len) > MAX_CID_LEN {
        return Err(QuicError::Malformed(Defect::ConnectionIdLength(len)));
    }
    let id = r.take(usize::from(len)).ok_or(header)?;
    ConnId::new(id).ok_or(header)
}

/// The state of one flow's Initial phase: feed it each datagram the client
/// sends, in arrival order, until it returns `Done` or an error.
///
/// ```
/// use sluice::classify::{Progress, QuicInitial, QuicLimits};
///
/// let mut flow = QuicInitial::new(QuicLimits::default());
/// // A datagram that is not QUIC at all is refused with a reason code.
/// match flow.push_datagram(b"GET / HTTP/1.1\r\n") {
///     Ok(Progress::Done(hello)) => println!("SNI {:?}", hello.sni),
///     Ok(Progress::NeedMore { .. }) => println!("wait for the next datagram"),
///     Err(e) => println!("deny, reason {}", e.reason()),
/// }
/// ```
pub struct QuicInitial {
    limits: QuicLimits,
    keys: Option<Keys>,
    /// Largest packet number decrypted so far, to expand truncated ones.
    largest_pn: Option<u64>,
    packets: usize,
    crypto: CryptoStream,
    /// Reused buffer the current packet is decrypted in.
    scratch: Vec<u8>,
    /// Set once the flow is decided; later datagrams get the same answer.
    outcome: Option<Result<ClientHello, QuicError>>,
}

impl std::fmt::Debug for QuicInitial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicInitial")
            .field("version", &self.version())
            .field("packets", &self.packets)
            .field("crypto_contiguous", &self.crypto.contiguous)
            .field("outcome", &self.outcome)
            .finish_non_exhaustive()
    }
}

impl QuicInitial {
    pub fn new(limits: QuicLimits) -> Self {
        QuicInitial {
            limits,
            keys: None,
            largest_pn: None,
            packets: 0,
            crypto: CryptoStream::default(),
            scratch: Vec::new(),
            outcome: None,
        }
    }

    /// The version of the flow's first Initial, once one was seen.
    pub fn version(&self) -> Option<QuicVersion> {
        self.keys.as_ref().map(|k| k.version)
    }

    /// The Destination Connection ID of the flow's first Initial, from which
    /// its keys come (and by which a server recognises the flow).
    pub fn original_dcid(&self) -> Option<&[u8]> {
        self.keys.as_ref().map(|k| k.dcid.as_slice())
    }

    /// Initial packets decrypted (or tried) so far.
    pub fn initial_packets(&self) -> usize {
        self.packets
    }

    /// Reads one datagram of the flow. `NeedMore` (with `at_least: None`, as
    /// datagrams are not byte counts) means the ClientHello is not complete
    /// yet. Once decided, the flow keeps its answer: later datagrams are not
    /// read and get the same result, and the buffers are released.
    pub fn push_datagram(&mut self, datagram: &[u8]) -> Result<Progress<ClientHello>, QuicError> {
        if let Some(outcome) = &self.outcome {
            return outcome.clone().map(Progress::Done);
        }
        let result = self.read_datagram(datagram).and_then(|()| self.try_finish());
        let decided = match result {
            Ok(Progress::NeedMore { at_least }) => return Ok(Progress::NeedMore { at_least }),
            Ok(Progress::Done(hello)) => Ok(hello),
            Err(e) => Err(e),
        };
        self.outcome = Some(decided.clone());
        self.crypto = CryptoStream::default();
        self.scratch = Vec::new();
        decided.map(Progress::Done)
    }

    fn read_datagram(&mut self, datagram: &[u8]) -> Result<(), QuicError> {
        if datagram.is_empty() {
            return Err(QuicError::Malformed(Defect::Empty));
        }
        let mut rest = datagram;
        let mut first_in_datagram = true;
        let mut datagram_version = None;
        let mut initials = 0usize;
        while let Some(&first_byte) = rest.first() {
            if first_byte & FORM_LONG == 0 {
                if first_in_datagram {
                    return Err(QuicError::NotInitial(NotInitial::ShortHeader));
                }
                // A short-header packet can only be last in a datagram (RFC
                // 9000 §12.2), and bytes that are not a packet (zero padding
                // after the last one) read as one too: nothing more for us.
                break;
            }
            let header = LongHeader::parse(rest)?;
            let flow_version = self.keys.as_ref().map(|k| k.version);
            for known in [datagram_version, flow_version].into_iter().flatten() {
                if known != header.version {
                    return Err(QuicError::Malformed(Defect::VersionChanged));
                }
            }
            datagram_version = Some(header.version);
            let (packet, after) = rest
                .split_at_checked(header.end)
                .ok_or(QuicError::Malformed(Defect::Length))?;
            if header.kind == LongType::Initial && self.read_initial(packet, &header, first_in_datagram)? {
                initials += 1;
            }
            rest = after;
            first_in_datagram = false;
        }
        if initials == 0 && self.keys.is_none() {
            return Err(QuicError::NotInitial(NotInitial::NoInitialPacket));
        }
        Ok(())
    }

    /// Decrypts one Initial and takes in its frames; `false` when the packet
    /// was ignored.
    fn read_initial(&mut self, packet: &[u8], header: &LongHeader, first_in_datagram: bool) -> Result<bool, QuicError> {
        let keys = match &self.keys {
            None => &*self.keys.insert(Keys::derive(header.version, header.dcid)?),
            // A client keeps its first DCID until the server answers, and
            // this flow has not been answered. Later packets in a datagram
            // with another DCID are to be ignored (RFC 9000 §12.2); a datagram
            // that starts with one is not this flow's.
            Some(keys) if keys.dcid != header.dcid && first_in_datagram => {
                return Err(QuicError::Malformed(Defect::DcidChanged));
            }
            Some(keys) if keys.dcid != header.dcid => return Ok(false),
            Some(keys) => keys,
        };
        self.packets += 1;
        if self.packets > self.limits.max_initial_packets {
            return Err(QuicError::TooManyPackets {
                max: self.limits.max_initial_packets,
            });
        }
        let opened = open(keys, self.largest_pn, packet, header, &mut self.scratch)?;
        self.largest_pn = Some(self.largest_pn.map_or(opened.pn, |l| l.max(opened.pn)));
        let payload = self
            .scratch
            .get(opened.payload)
            .ok_or(QuicError::Malformed(Defect::Length))?;
        read_frames(payload, &mut self.crypto, self.limits.max_client_hello)?;
        Ok(true)
    }

    /// Hands the contiguous CRYPTO bytes to the ClientHello parser.
    fn try_finish(&self) -> Result<Progress<ClientHello>, QuicError> {
        let prefix = self.crypto.contiguous_bytes();
        if prefix.is_empty() {
            return Ok(Progress::NeedMore { at_least: None });
        }
        let limits = Limits {
            max_client_hello: self.limits.max_client_hello,
        };
        match parse_client_hello_message(prefix, &limits) {
            Ok(Progress::Done(hello)) => Ok(Progress::Done(hello)),
            Ok(Progress::NeedMore { .. }) => Ok(Progress::NeedMore { at_least: None }),
            Err(e) => Err(QuicError::Tls(e)),
        }
    }
}

/// Where the plaintext of an opened packet lies in the scratch buffer.
struct Opened {
    pn: u64,
    payload: std::ops::Range<usize>,
}

/// Removes header protection from `packet` and decrypts it into `scratch`
/// (RFC 9001 §5.3, §5.4).
fn open(
    keys: &Keys,
    largest_pn: Option<u64>,
    packet: &[u8],
    header: &LongHeader,
    scratch: &mut Vec<u8>,
) -> Result<Opened, QuicError> {
    let too_short = QuicError::Malformed(Defect::TooShort);
    let sample_start = header.pn_offset.checked_add(SAMPLE_OFFSET).ok_or(too_short)?;
    let sample_end = sample_start.checked_add(SAMPLE_LEN).ok_or(too_short)?;
    let sample = packet.get(sample_start..sample_end).ok_or(too_short)?;
    let [m0, m1, m2, m3, m4] = keys.header.new_mask(sample).map_err(|_| QuicError::DecryptFailed)?;

    scratch.clear();
    scratch.extend_from_slice(packet);
    let first_byte = header.first_byte ^ (m0 & LONG_PROTECTED_BITS);
    if let Some(b) = scratch.first_mut() {
        *b = first_byte;
    }
    let pn_len = usize::from(first_byte & 0x03) + 1;
    let pn_end = header.pn_offset + pn_len;
    let pn_bytes = scratch.get_mut(header.pn_offset..pn_end).ok_or(too_short)?;
    let mut truncated = 0u64;
    for (b, m) in pn_bytes.iter_mut().zip([m1, m2, m3, m4]) {
        *b ^= m;
        truncated = truncated << 8 | u64::from(*b);
    }
    let pn = decode_packet_number(largest_pn, truncated, pn_len * 8);

    let mut nonce = keys.iv;
    for (n, p) in nonce.iter_mut().rev().zip(pn.to_be_bytes().into_iter().rev()) {
        *n ^= p;
    }
    let (aad, body) = scratch.split_at_mut_checked(pn_end).ok_or(too_short)?;
    let plaintext = keys
        .packet
        .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(&*aad), body)
        .map_err(|_| QuicError::DecryptFailed)?;
    let len = plaintext.len();
    // Checked only after authentication, so a forged header cannot tell an
    // attacker which bits mattered (RFC 9001 §5.4.1).
    if first_byte & LONG_RESERVED_BITS != 0 {
        return Err(QuicError::Malformed(Defect::ReservedBits));
    }
    Ok(Opened {
        pn,
        payload: pn_end..pn_end + len,
    })
}

/// RFC 9000 Appendix A.3: the full packet number closest to the next one
/// expected whose low `bits` bits are `truncated`.
fn decode_packet_number(largest: Option<u64>, truncated: u64, bits: usize) -> u64 {
    let expected = largest.map_or(0, |l| l.saturating_add(1));
    let window = 1u64 << bits.min(32);
    let half = window / 2;
    let candidate = (expected & !(window - 1)) | truncated;
    if candidate.saturating_add(half) <= expected && candidate < (1u64 << 62) - window {
        candidate + window
    } else if candidate > expected.saturating_add(half) && candidate >= window {
        candidate - window
    } else {
        candidate
    }
}

/// Reads the frames of a decrypted Initial: only those RFC 9000 §12.4 permits
/// there, and CRYPTO data goes into the stream.
fn read_frames(payload: &[u8], crypto: &mut CryptoStream, max: usize) -> Result<(), QuicError> {
    let truncated = QuicError::Malformed(Defect::Frame);
    if payload.is_empty() {
        return Err(QuicError::Malformed(Defect::NoFrames));
    }
    let mut r = Reader::new(payload);
    // A frame type is a varint, but every type allowed here fits its one-byte
    // form, and a longer encoding of it is forbidden (RFC 9000 §12.4).
    while let Some(frame_type) = r.u8() {
        match frame_type {
            FRAME_PADDING | FRAME_PING => {}
            FRAME_ACK | FRAME_ACK_ECN => skip_ack(&mut r, frame_type == FRAME_ACK_ECN).ok_or(truncated)?,
            FRAME_CRYPTO => {
                let offset = r.varint().ok_or(truncated)?;
                let len = r.varint().ok_or(truncated)?;
                let data = r.take_u64(len).ok_or(truncated)?;
                crypto.insert(offset, data, max)?;
            }
            FRAME_CONNECTION_CLOSE => {
                // error code, offending frame type, reason phrase.
                r.varint().ok_or(truncated)?;
                r.varint().ok_or(truncated)?;
                let reason_len = r.varint().ok_or(truncated)?;
                r.take_u64(reason_len).ok_or(truncated)?;
            }
            other => return Err(QuicError::Malformed(Defect::ForbiddenFrame(other))),
        }
    }
    Ok(())
}

/// Skips an ACK frame's fields (RFC 9000 §19.3). The range count is the
/// peer's word, but each range costs at least two bytes, so the loop ends
/// with the payload.
fn skip_ack(r: &mut Reader<'_>, ecn: bool) -> Option<()> {
    r.varint()?; // largest acknowledged
    r.varint()?; // ack delay
    let ranges = r.varint()?;
    r.varint()?; // first range
    for _ in 0..ranges {
        r.varint()?; // gap
        r.varint()?; // range length
    }
    if ecn {
        for _ in 0..3 {
            r.varint()?;
        }
    }
    Some(())
}

/// The client's Initial CRYPTO stream, reassembled by offset. Frames may
/// arrive in any order and overlap; overlapping bytes must agree, or a
/// middlebox and the server could read different hellos. One bit per byte
/// records what has arrived; both buffers grow only to the highest offset
/// seen, which is at most the hello limit.
#[derive(Debug, Default)]
struct CryptoStream {
    data: Vec<u8>,
    filled: Vec<u64>,
    /// Length of the prefix that has fully arrived.
    contiguous: usize,
}

impl CryptoStream {
    fn insert(&mut self, offset: u64, bytes: &[u8], max: usize) -> Result<(), QuicError> {
        let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        let end = offset.saturating_add(len);
        let max_u64 = u64::try_from(max).unwrap_or(u64::MAX);
        if end > max_u64 {
            return Err(QuicError::Oversized { end, max });
        }
        // Both fit in usize: they are at most `max`.
        let (Ok(start), Ok(end)) = (usize::try_from(offset), usize::try_from(end)) else {
            return Err(QuicError::Oversized { end, max });
        };
        if self.data.len() < end {
            self.data.resize(end, 0);
            self.filled.resize(end.div_ceil(64), 0);
        }
        let dst = self
            .data
            .get_mut(start..end)
            .ok_or(QuicError::Oversized { end: end as u64, max })?;
        for ((at, slot), &byte) in (start..).zip(dst.iter_mut()).zip(bytes) {
            let Some(word) = self.filled.get_mut(at / 64) else {
                continue;
            };
            let bit = 1u64 << (at % 64);
            if *word & bit == 0 {
                *word |= bit;
                *slot = byte;
            } else if *slot != byte {
                return Err(QuicError::Malformed(Defect::CryptoConflict { offset: at as u64 }));
            }
        }
        self.advance();
        Ok(())
    }

    fn advance(&mut self) {
        loop {
            let at = self.contiguous;
            let Some(&word) = self.filled.get(at / 64) else {
                return;
            };
            if at.is_multiple_of(64) && word == u64::MAX {
                self.contiguous += 64;
            } else if word & (1u64 << (at % 64)) != 0 {
                self.contiguous += 1;
            } else {
                return;
            }
        }
    }

    fn contiguous_bytes(&self) -> &[u8] {
        self.data.get(..self.contiguous).unwrap_or_default()
    }
}

/// Cursor over QUIC's encodings; every read is checked.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    fn position(&self) -> usize {
        self.pos
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let out = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }

    fn take_u64(&mut self, n: u64) -> Option<&'a [u8]> {
        self.take(usize::try_from(n).ok()?)
    }

    fn u8(&mut self) -> Option<u8> {
        let (&b, _) = self.take(1)?.split_first()?;
        Some(b)
    }

    fn u32(&mut self) -> Option<u32> {
        match self.take(4)? {
            &[a, b, c, d] => Some(u32::from_be_bytes([a, b, c, d])),
            _ => None,
        }
    }

    /// RFC 9000 §16 variable-length integer.
    fn varint(&mut self) -> Option<u64> {
        let first = self.u8()?;
        let len = 1usize << (first >> 6);
        let mut value = u64::from(first & 0x3f);
        for &b in self.take(len - 1)? {
            value = value << 8 | u64::from(b);
        }
        Some(value)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

    use super::*;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    const RFC_DCID: &str = "8394c8f03e515708";

    #[test]
    fn v1_keys_match_rfc9001_a1() {
        let s = client_initial_secrets(QuicVersion::V1, &hex(RFC_DCID)).unwrap();
        assert_eq!(s.key.to_vec(), hex("1f369613dd76d5467730efcbe3b1a22d"));
        assert_eq!(s.iv.to_vec(), hex("fa044b2f42a3fd3b46fb255c"));
        assert_eq!(s.hp.to_vec(), hex("9f50449e04a0e810283a1e9933adedd2"));
    }

    #[test]
    fn v2_keys_match_rfc9369_a1() {
        let s = client_initial_secrets(QuicVersion::V2, &hex(RFC_DCID)).unwrap();
        assert_eq!(s.key.to_vec(), hex("8b1a0bc121284290a29e0971b5cd045d"));
        assert_eq!(s.iv.to_vec(), hex("91f73e2351d8fa91660e909f"));
        assert_eq!(s.hp.to_vec(), hex("45b95e15235d6f45a6b19cbcb0294ba9"));
    }

    #[test]
    fn header_protection_mask_matches_rfc9001_a2() {
        let keys = Keys::derive(QuicVersion::V1, ConnId::new(&hex(RFC_DCID)).unwrap()).unwrap();
        let mask = keys.header.new_mask(&hex("d1b1c98dd7689fb8ec11d242b123dc9b")).unwrap();
        assert_eq!(mask.to_vec(), hex("437b9aec36"));
    }

    #[test]
    fn packet_types_per_version() {
        assert_eq!(QuicVersion::V1.packet_type(0xc0), LongType::Initial);
        assert_eq!(QuicVersion::V1.packet_type(0xd0), LongType::ZeroRtt);
        assert_eq!(QuicVersion::V1.packet_type(0xe0), LongType::Handshake);
        assert_eq!(QuicVersion::V1.packet_type(0xf0), LongType::Retry);
        assert_eq!(QuicVersion::V2.packet_type(0xd0), LongType::Initial);
        assert_eq!(QuicVersion::V2.packet_type(0xe0), LongType::ZeroRtt);
        assert_eq!(QuicVersion::V2.packet_type(0xf0), LongType::Handshake);
        assert_eq!(QuicVersion::V2.packet_type(0xc0), LongType::Retry);
        for v in [QuicVersion::V1, QuicVersion::V2] {
            assert_eq!(QuicVersion::from_wire(v.to_wire()), Some(v));
        }
        assert_eq!(QuicVersion::from_wire(0xff00_001d), None);
    }

    #[test]
    fn varints_rfc9000_a1_examples() {
        for (bytes, value) in [
            ("c2197c5eff14e88c", 151_288_809_941_952_652u64),
            ("9d7f3e7d", 494_878_333),
            ("7bbd", 15_293),
            ("25", 37),
            ("4025", 37),
        ] {
            assert_eq!(Reader::new(&hex(bytes)).varint(), Some(value), "{bytes}");
        }
        assert_eq!(Reader::new(&hex("c2197c")).varint(), None);
        assert_eq!(Reader::new(&[]).varint(), None);
    }

    #[test]
    fn packet_numbers_rfc9000_a3() {
        assert_eq!(decode_packet_number(Some(0xa82f_30ea), 0x9b32, 16), 0xa82f_9b32);
        assert_eq!(decode_packet_number(None, 2, 32), 2);
        assert_eq!(decode_packet_number(None, 0xff, 8), 0xff);
        assert_eq!(decode_packet_number(Some(254), 0, 8), 256);
        assert_eq!(decode_packet_number(Some(300), 0xff, 8), 255);
        // Out of range (packet numbers stop at 2^62 - 1), but no overflow.
        let _ = decode_packet_number(Some(u64::MAX), 0, 8);
        let _ = decode_packet_number(Some((1 << 62) - 1), 0xffff_ffff, 32);
    }

    #[test]
    fn crypto_stream_reassembles_out_of_order_with_overlaps() {
        let mut s = CryptoStream::default();
        s.insert(4, b"efgh", 100).unwrap();
        assert_eq!(s.contiguous_bytes(), b"");
        s.insert(0, b"abc", 100).unwrap();
        assert_eq!(s.contiguous_bytes(), b"abc");
        // Overlapping, consistent.
        s.insert(2, b"cde", 100).unwrap();
        assert_eq!(s.contiguous_bytes(), b"abcdefgh");
        s.insert(0, b"abcdefgh", 100).unwrap();
        s.insert(8, b"", 100).unwrap();
        assert_eq!(s.contiguous_bytes(), b"abcdefgh");
        assert_eq!(
            s.insert(6, b"gX", 100),
            Err(QuicError::Malformed(Defect::CryptoConflict { offset: 7 }))
        );
        assert_eq!(
            s.insert(99, b"xy", 100),
            Err(QuicError::Oversized { end: 101, max: 100 })
        );
        assert_eq!(
            s.insert(u64::MAX, b"x", 100),
            Err(QuicError::Oversized {
                end: u64::MAX,
                max: 100
            })
        );
    }

    #[test]
    fn crypto_stream_word_boundaries() {
        let data: Vec<u8> = (0..=255u8).cycle().take(300).collect();
        let mut s = CryptoStream::default();
        // Backwards in 7-byte pieces across word boundaries.
        let mut end = data.len();
        while end > 0 {
            let start = end.saturating_sub(7);
            s.insert(start as u64, &data[start..end], 1000).unwrap();
            if start > 0 {
                assert_eq!(s.contiguous, 0);
            }
            end = start;
        }
        assert_eq!(s.contiguous_bytes(), &data[..]);
    }

    #[test]
    fn frames_allowed_in_initials() {
        let mut s = CryptoStream::default();
        // PADDING, PING, ACK (one extra range), ACK_ECN, CRYPTO, CONNECTION_CLOSE.
        let mut payload = vec![0, 0, 1];
        payload.extend_from_slice(&[2, 10, 0, 1, 0, 2, 3]);
        payload.extend_from_slice(&[3, 10, 0, 0, 0, 1, 2, 0x40, 3]);
        payload.extend_from_slice(&[6, 0, 3, b'a', b'b', b'c']);
        payload.extend_from_slice(&[0x1c, 0, 0, 2, b'n', b'o']);
        read_frames(&payload, &mut s, 100).unwrap();
        assert_eq!(s.contiguous_bytes(), b"abc");
        assert_eq!(
            read_frames(&[], &mut s, 100),
            Err(QuicError::Malformed(Defect::NoFrames))
        );
        for forbidden in [0x04u8, 0x08, 0x0f, 0x1d, 0x1e, 0x40] {
            assert_eq!(
                read_frames(&[1, forbidden, 0, 0], &mut s, 100),
                Err(QuicError::Malformed(Defect::ForbiddenFrame(forbidden)))
            );
        }
        for truncated in [&[6u8, 0, 5, 1][..], &[2, 1, 0, 5], &[0x1c, 0, 0, 9, 1], &[6, 0x40]] {
            assert_eq!(
                read_frames(truncated, &mut s, 100),
                Err(QuicError::Malformed(Defect::Frame)),
                "{truncated:?}"
            );
        }
        // An ACK claiming 2^62 ranges ends with the payload, not after 2^62 steps.
        assert_eq!(
            read_frames(
                &[2, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 1, 1],
                &mut s,
                100
            ),
            Err(QuicError::Malformed(Defect::Frame))
        );
    }

    #[test]
    fn refuses_headers_before_decrypting() {
        let mut flow = QuicInitial::new(QuicLimits::default());
        assert_eq!(flow.push_datagram(&[]), Err(QuicError::Malformed(Defect::Empty)));
        let cases: [(&[u8], QuicError); 7] = [
            (&[0x40, 1, 2, 3], QuicError::NotInitial(NotInitial::ShortHeader)),
            (&[0x80, 0, 0, 0, 0, 8], QuicError::VersionNegotiation),
            (&[0xc0, 0xff, 0, 0, 0x1d, 8], QuicError::UnsupportedVersion(0xff00_001d)),
            (
                &[0xc0, 0, 0, 0, 1, 21],
                QuicError::Malformed(Defect::ConnectionIdLength(21)),
            ),
            (&[0xc0, 0, 0, 0, 1, 8, 1], QuicError::Malformed(Defect::Header)),
            (&[0xc0, 0, 0], QuicError::Malformed(Defect::Header)),
            (&[0xf0, 0, 0, 0, 1, 0, 0], QuicError::Malformed(Defect::Retry)),
        ];
        for (datagram, want) in cases {
            let mut flow = QuicInitial::new(QuicLimits::default());
            assert_eq!(flow.push_datagram(datagram), Err(want), "{datagram:x?}");
            // Decided: the same answer again, whatever comes next.
            assert_eq!(flow.push_datagram(b"anything"), Err(want));
        }
        // An Initial whose Length runs past the datagram.
        let mut flow = QuicInitial::new(QuicLimits::default());
        assert_eq!(
            flow.push_datagram(&[0xc0, 0, 0, 0, 1, 0, 0, 0, 0x10, 1, 2, 3]),
            Err(QuicError::Malformed(Defect::Length))
        );
        // One too short to sample.
        let mut flow = QuicInitial::new(QuicLimits::default());
        let mut short = vec![0xc0, 0, 0, 0, 1, 0, 0, 0, 19];
        short.extend_from_slice(&[0; 19]);
        assert_eq!(flow.push_datagram(&short), Err(QuicError::Malformed(Defect::TooShort)));
        // Long enough to sample, but the tag does not verify.
        let mut flow = QuicInitial::new(QuicLimits::default());
        let mut forged = vec![0xc0, 0, 0, 0, 1, 0, 0, 0, 40];
        forged.extend_from_slice(&[0x55; 40]);
        assert_eq!(flow.push_datagram(&forged), Err(QuicError::DecryptFailed));
        assert_eq!(flow.initial_packets(), 1);
        // Only a Handshake packet: no Initial to start from.
        let mut flow = QuicInitial::new(QuicLimits::default());
        assert_eq!(
            flow.push_datagram(&[0xe0, 0, 0, 0, 1, 0, 0, 2, 0, 0]),
            Err(QuicError::NotInitial(NotInitial::NoInitialPacket))
        );
    }

    #[test]
    fn reasons() {
        use sluice_api::reason::ReasonCode as R;
        let cases = [
            (QuicError::NotInitial(NotInitial::ShortHeader), R::QuicNotInitial),
            (QuicError::UnsupportedVersion(7), R::QuicUnsupportedVersion),
            (QuicError::VersionNegotiation, R::QuicVersionNegotiation),
            (QuicError::Malformed(Defect::Frame), R::QuicMalformed),
            (QuicError::DecryptFailed, R::QuicDecryptFailed),
            (QuicError::Oversized { end: 1, max: 0 }, R::QuicOversized),
            (QuicError::TooManyPackets { max: 1 }, R::QuicTooManyPackets),
            (QuicError::Tls(TlsError::NotClientHello(2)), R::TlsNotClientHello),
        ];
        for (e, r) in cases {
            assert_eq!(e.reason(), r, "{e}");
            assert!(r.fails_closed(), "{r}");
        }
    }

    proptest! {
        #[test]
        fn never_panics(datagrams in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..5)) {
            let mut flow = QuicInitial::new(QuicLimits::default());
            for d in &datagrams {
                let _ = flow.push_datagram(d);
            }
        }

        #[test]
        fn never_panics_on_long_header_noise(
            first in 0xc0u8..=0xff,
            v2 in any::<bool>(),
            tail in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut d = vec![first];
            d.extend_from_slice(&if v2 { VERSION_2 } else { VERSION_1 }.to_be_bytes());
            d.extend(tail);
            let mut flow = QuicInitial::new(QuicLimits::default());
            let _ = flow.push_datagram(&d);
        }

        #[test]
        fn never_panics_on_frame_noise(payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut s = CryptoStream::default();
            let _ = read_frames(&payload, &mut s, 4096);
        }
    }
}
