//! The proxy-wasm ABI's data, sans IO: the status codes a host call
//! returns, the enums a guest passes in, the "pairs" encoding of header
//! maps, and property paths. Everything a guest hands the host is decoded
//! here, with limits, before any host state is touched; nothing here reads
//! guest memory or calls the guest.
//!
//! Values are those of proxy-wasm ABI 0.2.1 (0.2.0 is the same less
//! `proxy_get_log_level`).

use std::fmt;

/// The ABI versions a module may declare by exporting a marker function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbiVersion {
    V0_2_0,
    V0_2_1,
}

impl AbiVersion {
    /// The marker exports, newest first.
    pub const MARKERS: [(&'static str, AbiVersion); 2] = [
        ("proxy_abi_version_0_2_1", AbiVersion::V0_2_1),
        ("proxy_abi_version_0_2_0", AbiVersion::V0_2_0),
    ];

    /// The version a module declares, from the names of its exports.
    pub fn declared<'a>(exports: impl IntoIterator<Item = &'a str>) -> Option<AbiVersion> {
        let exports: Vec<&str> = exports.into_iter().collect();
        Self::MARKERS
            .iter()
            .find(|(marker, _)| exports.contains(marker))
            .map(|&(_, v)| v)
    }
}

impl fmt::Display for AbiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AbiVersion::V0_2_0 => "0.2.0",
            AbiVersion::V0_2_1 => "0.2.1",
        })
    }
}

/// What a host call returns. Only these values are ever returned: the
/// published Rust SDK has no variant for the spec's InvalidMemoryAccess or
/// Unimplemented (a guest that got one would panic), so a bad pointer traps
/// the guest instead and an unsupported call answers with what the SDK
/// expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    Ok = 0,
    NotFound = 1,
    BadArgument = 2,
    SerializationFailure = 3,
    ParseFailure = 4,
    Empty = 7,
    CasMismatch = 8,
    InternalFailure = 10,
}

impl Status {
    pub fn code(self) -> i32 {
        self as i32
    }
}

macro_rules! abi_enum {
    ($(#[$doc:meta])* $name:ident { $($variant:ident = $value:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($variant = $value),+
        }

        impl TryFrom<i32> for $name {
            type Error = i32;
            fn try_from(v: i32) -> Result<Self, i32> {
                match v {
                    $($value => Ok($name::$variant),)+
                    other => Err(other),
                }
            }
        }
    };
}

abi_enum! {
    /// `proxy_log`'s and `proxy_get_log_level`'s levels.
    LogLevel { Trace = 0, Debug = 1, Info = 2, Warn = 3, Error = 4, Critical = 5 }
}

abi_enum! {
    /// The byte buffers a guest can read or write.
    BufferType {
        HttpRequestBody = 0,
        HttpResponseBody = 1,
        DownstreamData = 2,
        UpstreamData = 3,
        HttpCallResponseBody = 4,
        GrpcReceiveBuffer = 5,
        VmConfiguration = 6,
        PluginConfiguration = 7,
        CallData = 8,
    }
}

abi_enum! {
    /// The header maps a guest can read or write.
    MapType {
        HttpRequestHeaders = 0,
        HttpRequestTrailers = 1,
        HttpResponseHeaders = 2,
        HttpResponseTrailers = 3,
        GrpcReceiveInitialMetadata = 4,
        GrpcReceiveTrailingMetadata = 5,
        HttpCallResponseHeaders = 6,
        HttpCallResponseTrailers = 7,
    }
}

abi_enum! {
    /// What `proxy_continue_stream` and `proxy_close_stream` act on.
    StreamType { HttpRequest = 0, HttpResponse = 1, Downstream = 2, Upstream = 3 }
}

abi_enum! {
    /// `proxy_define_metric`'s kinds.
    MetricType { Counter = 0, Gauge = 1, Histogram = 2 }
}

abi_enum! {
    /// Who closed a connection (passed to the close callbacks).
    PeerType { Unknown = 0, Local = 1, Remote = 2 }
}

/// What a stream or HTTP callback answers: go on, or wait (until the guest
/// calls `proxy_continue_stream`, or for more data). Any value but 0 is a
/// pause, as in the reference host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
}

impl From<i32> for Action {
    fn from(v: i32) -> Self {
        if v == 0 { Action::Continue } else { Action::Pause }
    }
}

/// Bounds on what a guest may hand the host in one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairsLimits {
    /// At most this many pairs in one map.
    pub max_pairs: usize,
    /// At most this many bytes in one encoded map.
    pub max_bytes: usize,
}

impl Default for PairsLimits {
    /// The reference host's limits: 1,024 pairs and 1 MiB.
    fn default() -> Self {
        PairsLimits {
            max_pairs: 1024,
            max_bytes: 1 << 20,
        }
    }
}

/// Why an encoded map was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PairsError {
    #[error("the map is {len} bytes, above the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("the map declares {count} pairs, above the limit of {max}")]
    TooMany { count: usize, max: usize },
    #[error("the map ends at byte {at}, inside its {what}")]
    Truncated { at: usize, what: &'static str },
    #[error("pair {index}'s {what} is not followed by a NUL byte")]
    MissingNul { index: usize, what: &'static str },
    #[error("{extra} bytes follow the last pair")]
    TrailingBytes { extra: usize },
}

/// One header: a name and a value, as bytes (a guest may send any bytes;
/// whether they are a valid HTTP header is for the caller to judge).
pub type Pair = (Vec<u8>, Vec<u8>);

/// Encodes `pairs` as the ABI's map: a u32 count, the u32 lengths of each
/// name and value, then each name and value followed by a NUL byte (all
/// integers little-endian). An empty map is empty (zero bytes), which every
/// SDK reads as no pairs.
pub fn encode_pairs<K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &[(K, V)]) -> Vec<u8> {
    if pairs.is_empty() {
        return Vec::new();
    }
    let size = 4 + pairs
        .iter()
        .map(|(k, v)| 10 + k.as_ref().len() + v.as_ref().len())
        .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&u32_len(pairs.len()).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&u32_len(k.as_ref().len()).to_le_bytes());
        out.extend_from_slice(&u32_len(v.as_ref().len()).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_ref());
        out.push(0);
        out.extend_from_slice(v.as_ref());
        out.push(0);
    }
    out
}

/// A length as the ABI's u32; the host never builds a map of 4 GiB, and a
/// larger one saturates rather than wraps.
fn u32_len(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Decodes a map a guest sent, refusing anything inconsistent: above the
/// limits, truncated, a name or value without its NUL, bytes after the last
/// pair. Zero bytes is the empty map.
pub fn decode_pairs(bytes: &[u8], limits: PairsLimits) -> Result<Vec<Pair>, PairsError> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    if bytes.len() > limits.max_bytes {
        return Err(PairsError::TooLarge {
            len: bytes.len(),
            max: limits.max_bytes,
        });
    }
    let mut at = 0;
    let count = read_u32(bytes, &mut at, "pair count")? as usize;
    if count > limits.max_pairs {
        return Err(PairsError::TooMany {
            count,
            max: limits.max_pairs,
        });
    }
    let mut lens = Vec::with_capacity(count);
    for _ in 0..count {
        let k = read_u32(bytes, &mut at, "lengths")? as usize;
        let v = read_u32(bytes, &mut at, "lengths")? as usize;
        lens.push((k, v));
    }
    let mut pairs = Vec::with_capacity(count);
    for (index, (k, v)) in lens.into_iter().enumerate() {
        let key = read_terminated(bytes, &mut at, k, index, "name")?;
        let value = read_terminated(bytes, &mut at, v, index, "value")?;
        pairs.push((key.to_vec(), value.to_vec()));
    }
    if at != bytes.len() {
        return Err(PairsError::TrailingBytes {
            extra: bytes.len() - at,
        });
    }
    Ok(pairs)
}

fn read_u32(bytes: &[u8], at: &mut usize, what: &'static str) -> Result<u32, PairsError> {
    let end = at.checked_add(4).filter(|&e| e <= bytes.len());
    let Some(end) = end else {
        return Err(PairsError::Truncated { at: bytes.len(), what });
    };
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[*at..end]);
    *at = end;
    Ok(u32::from_le_bytes(word))
}

fn read_terminated<'a>(
    bytes: &'a [u8],
    at: &mut usize,
    len: usize,
    index: usize,
    what: &'static str,
) -> Result<&'a [u8], PairsError> {
    let end = at.checked_add(len).filter(|&e| e < bytes.len());
    let Some(end) = end else {
        return Err(PairsError::Truncated { at: bytes.len(), what });
    };
    if bytes[end] != 0 {
        return Err(PairsError::MissingNul { index, what });
    }
    let s = &bytes[*at..end];
    *at = end + 1;
    Ok(s)
}

/// Why a property path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the property path is empty")]
    Empty,
    #[error("the property path is {len} bytes, above the limit of {max}")]
    TooLong { len: usize, max: usize },
    #[error("segment {index} of the property path is not UTF-8")]
    NotUtf8 { index: usize },
}

/// The longest property path a guest may ask for.
pub const MAX_PATH_BYTES: usize = 1024;

/// Splits a property path into its segments. Segments are separated by one
/// NUL byte (`source\0address`); a trailing NUL, which some SDKs send, is
/// ignored. A single segment with dots (`source.address`) is split at the
/// dots as well, so both spellings of a well-known attribute name it.
pub fn split_path(bytes: &[u8]) -> Result<Vec<&str>, PathError> {
    if bytes.len() > MAX_PATH_BYTES {
        return Err(PathError::TooLong {
            len: bytes.len(),
            max: MAX_PATH_BYTES,
        });
    }
    let bytes = bytes.strip_suffix(&[0]).unwrap_or(bytes);
    if bytes.is_empty() {
        return Err(PathError::Empty);
    }
    let segments = bytes
        .split(|&b| b == 0)
        .enumerate()
        .map(|(index, s)| std::str::from_utf8(s).map_err(|_| PathError::NotUtf8 { index }))
        .collect::<Result<Vec<_>, _>>()?;
    if let [only] = segments.as_slice() {
        return Ok(only.split('.').collect());
    }
    Ok(segments)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_round_trips_in_the_abi_layout() {
        let bytes = encode_pairs(&[(":method", "GET")]);
        let mut want = vec![1, 0, 0, 0, 7, 0, 0, 0, 3, 0, 0, 0];
        want.extend_from_slice(b":method\0GET\0");
        assert_eq!(bytes, want);
        let pairs = [("a", ""), ("", "b"), ("host", "example.test")];
        let want: Vec<Pair> = pairs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect();
        assert_eq!(decode_pairs(&encode_pairs(&pairs), PairsLimits::default()), Ok(want));
        // Empty both ways: no bytes (never the lone NUL the spec allows,
        // which the Rust SDK cannot read), and the SDK's four zero bytes.
        assert!(encode_pairs::<&str, &str>(&[]).is_empty());
        assert_eq!(decode_pairs(&[], PairsLimits::default()), Ok(vec![]));
        assert_eq!(decode_pairs(&[0, 0, 0, 0], PairsLimits::default()), Ok(vec![]));
    }

    #[test]
    fn an_inconsistent_map_is_refused_with_what_is_wrong() {
        let good = encode_pairs(&[("k", "v")]);
        let limits = PairsLimits::default();
        assert!(matches!(
            decode_pairs(&good[..good.len() - 1], limits),
            Err(PairsError::Truncated { .. })
        ));
        let mut no_nul = good.clone();
        let last = no_nul.len() - 1;
        no_nul[last] = b'x';
        assert_eq!(
            decode_pairs(&no_nul, limits),
            Err(PairsError::MissingNul {
                index: 0,
                what: "value"
            })
        );
        let mut trailing = good.clone();
        trailing.push(7);
        assert_eq!(
            decode_pairs(&trailing, limits),
            Err(PairsError::TrailingBytes { extra: 1 })
        );
        // A count that promises more than the bytes hold.
        assert!(matches!(
            decode_pairs(&[3, 0, 0, 0], limits),
            Err(PairsError::Truncated { what: "lengths", .. })
        ));
        assert!(matches!(
            decode_pairs(&[0xff, 0xff, 0, 0], limits),
            Err(PairsError::TooMany { count: 65535, .. })
        ));
        let tight = PairsLimits {
            max_pairs: 1,
            max_bytes: 64,
        };
        let two = encode_pairs(&[("a", "b"), ("c", "d")]);
        assert_eq!(decode_pairs(&two, tight), Err(PairsError::TooMany { count: 2, max: 1 }));
        let big = encode_pairs(&[("a", "b".repeat(100))]);
        assert!(matches!(decode_pairs(&big, tight), Err(PairsError::TooLarge { .. })));
        // A length near u32::MAX must not wrap the cursor.
        let mut huge = vec![1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0];
        huge.extend_from_slice(b"\0\0");
        assert!(matches!(decode_pairs(&huge, limits), Err(PairsError::Truncated { .. })));
    }

    #[test]
    fn property_paths_split_at_nul_and_at_dots() {
        assert_eq!(split_path(b"source\0address"), Ok(vec!["source", "address"]));
        assert_eq!(split_path(b"source\0address\0"), Ok(vec!["source", "address"]));
        assert_eq!(split_path(b"source.address"), Ok(vec!["source", "address"]));
        assert_eq!(split_path(b"plugin_name"), Ok(vec!["plugin_name"]));
        // Dots inside one of several segments stay (a header name may have one).
        assert_eq!(
            split_path(b"request\0headers\0x.y"),
            Ok(vec!["request", "headers", "x.y"])
        );
        assert_eq!(split_path(b""), Err(PathError::Empty));
        assert_eq!(split_path(b"\0"), Err(PathError::Empty));
        assert_eq!(split_path(b"a\0\xff"), Err(PathError::NotUtf8 { index: 1 }));
        assert!(matches!(split_path(&[b'a'; 2000]), Err(PathError::TooLong { .. })));
    }

    #[test]
    fn the_declared_abi_is_the_newest_marker() {
        assert_eq!(
            AbiVersion::declared(["memory", "proxy_abi_version_0_2_0"]),
            Some(AbiVersion::V0_2_0)
        );
        assert_eq!(
            AbiVersion::declared(["proxy_abi_version_0_2_0", "proxy_abi_version_0_2_1"]),
            Some(AbiVersion::V0_2_1)
        );
        assert_eq!(AbiVersion::declared(["proxy_abi_version_0_1_0"]), None);
        assert_eq!(LogLevel::try_from(5), Ok(LogLevel::Critical));
        assert_eq!(LogLevel::try_from(6), Err(6));
        assert_eq!(Action::from(0), Action::Continue);
        assert_eq!(Action::from(7), Action::Pause);
        assert_eq!(Status::CasMismatch.code(), 8);
    }
}
