//! Classification: the first stage after `accept`. Before Sluice can pick a
//! policy it must know what the client is asking for, and it has to learn that
//! from the bytes the client sends first, without terminating TLS. The listener
//! peeks at the start of the stream and hands the bytes here; these parsers say
//! either "need more" or what they found (the SNI, ALPN and ECH presence of a TLS
//! ClientHello, or the method, target and Host of an HTTP/1 request head). The
//! result feeds identify → policy → plugins → enforce (see DESIGN.md, "Data
//! path"); the peeked bytes are later replayed to the upstream unchanged.
//! QUIC on UDP is classified the same way from the client's Initial packets
//! ([`quic`]), whose ClientHello goes through the same TLS parser.
//!
//! The parsers are sans-IO: no sockets, no clock, bounded in size, and they never
//! panic on any input, so they can be unit-tested with split inputs and fuzzed.
//! Anything they cannot parse is an error with a stable reason code for the audit
//! record, and the flow is denied (fail closed).
//!
//! ```
//! use sluice::classify::{Limits, Progress, parse_client_hello};
//!
//! // What a listener does with each peek: parse everything seen so far.
//! let first_segment = [22, 3, 1, 0, 200, 1, 0, 0];
//! match parse_client_hello(&first_segment, &Limits::default()) {
//!     Ok(Progress::NeedMore { at_least }) => assert_eq!(at_least, Some(1)),
//!     Ok(Progress::Done(hello)) => println!("SNI {:?}", hello.sni),
//!     Err(e) => println!("deny, reason {}", e.reason_code()),
//! }
//! ```

pub mod http;
pub mod quic;
pub mod tls;

pub use http::{
    Authority, Host, HttpError, HttpLimits, RequestHead, Scheme, TargetForm, parse_authority, parse_request_head,
};
pub use quic::{
    Defect, InitialSecrets, NotInitial, QuicError, QuicInitial, QuicLimits, QuicVersion, client_initial_secrets,
};
pub use tls::{
    ClientHello, Field, Limits, SniProblem, Sniff, TlsError, is_grease, parse_client_hello, parse_client_hello_message,
    sniff,
};

/// Outcome of feeding a parser the bytes peeked so far.
///
/// Parsers are called again with a longer buffer (the same prefix plus whatever
/// arrived since) until they return `Done` or an error; they keep no state
/// between calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress<T> {
    /// The input is a valid prefix but is not complete yet. `at_least`, when
    /// known, is how many more bytes must arrive before calling again can return
    /// anything other than `NeedMore` (a result *or* an error), so a caller may
    /// wait for that many before re-parsing without delaying a refusal. ≥ 1.
    NeedMore { at_least: Option<usize> },
    /// The message is complete.
    Done(T),
}

impl<T> Progress<T> {
    /// The parsed value, if the message was complete.
    pub fn done(self) -> Option<T> {
        match self {
            Progress::Done(v) => Some(v),
            Progress::NeedMore { .. } => None,
        }
    }
}

/// Whether `name` is a DNS host name as it may appear in an SNI or a Host
/// header: LDH labels (plus `_`, which real names carry), each 1–63 bytes, at
/// most 253 bytes, an optional single trailing dot. Case is kept: the policy
/// layer compares case-insensitively, and rewriting here would hide what the
/// client really sent from the audit record.
pub(crate) fn is_host_name(name: &[u8]) -> bool {
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    name.split(|&b| b == b'.').all(|label| {
        (1..=63).contains(&label.len())
            && label
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}
