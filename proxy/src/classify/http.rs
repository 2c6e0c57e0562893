//! HTTP/1.x request-head classification. Explicit-proxy clients (`HTTP_PROXY`,
//! `HTTPS_PROXY`) open with `CONNECT host:port` or an absolute-form request, and
//! plain-HTTP flows caught transparently carry a `Host` header; either way the
//! destination is in the request head. This module finds the end of the head,
//! tokenises it with `httparse`, and turns the request-target and `Host` into a
//! checked destination ([`Host`] + port), refusing anything ambiguous: several
//! `Host` headers, a `Host` that disagrees with the target, userinfo, numeric
//! host forms that resolvers would read as an IP other than the one written.
//!
//! Like the TLS parser it is stateless and bounded: call it with everything
//! peeked so far; a head longer than [`HttpLimits::max_head`] is an error.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use super::{Progress, is_host_name};

/// Hard cap on `HttpLimits::max_headers`: the header slots httparse fills live
/// on the stack.
const HEADER_SLOTS: usize = 128;

/// Bounds on what the parser accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Longest request head (request line + headers + blank line) accepted.
    pub max_head: usize,
    /// Most header lines accepted; values above 128 act as 128.
    pub max_headers: usize,
}

impl Default for HttpLimits {
    /// 16 KiB and 100 headers: above what browsers and HTTP client libraries
    /// send, in line with the default head limits of common servers.
    fn default() -> Self {
        HttpLimits {
            max_head: 16 * 1024,
            max_headers: 100,
        }
    }
}

/// Shape of the request-target (RFC 9112 §3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetForm {
    /// `/path?query`, with the authority in `Host`.
    Origin,
    /// `http://host:port/path`, sent to a forward proxy.
    Absolute,
    /// `host:port`, only for `CONNECT`.
    Authority,
    /// `*`, only for `OPTIONS`.
    Asterisk,
}

/// A destination host, already checked: a DNS name as written (case kept), or
/// an IP literal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    Name(String),
    Ipv4(Ipv4Addr),
    Ipv6(Ipv6Addr),
}

impl Host {
    /// Same host, comparing names case-insensitively and ignoring a trailing
    /// dot, as DNS does.
    pub fn same_as(&self, other: &Host) -> bool {
        match (self, other) {
            (Host::Name(a), Host::Name(b)) => {
                let a = a.strip_suffix('.').unwrap_or(a);
                let b = b.strip_suffix('.').unwrap_or(b);
                a.eq_ignore_ascii_case(b)
            }
            _ => self == other,
        }
    }
}

impl fmt::Display for Host {
    /// The URI spelling: IPv6 in brackets, so `host:port` stays unambiguous.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(name) => f.write_str(name),
            Host::Ipv4(ip) => write!(f, "{ip}"),
            Host::Ipv6(ip) => write!(f, "[{ip}]"),
        }
    }
}

/// `host[:port]` from a request-target or `Host` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    pub host: Host,
    pub port: Option<u16>,
}

/// What the policy layer needs from a request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The request-target exactly as sent.
    pub target: String,
    pub form: TargetForm,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// Destination host: from the target for `CONNECT` and absolute-form (RFC
    /// 9112 §3.2.2 makes the target win over `Host`), else from `Host`.
    pub host: Option<Host>,
    /// Destination port: explicit, or the scheme's default for absolute-form.
    /// `None` when only a port-less `Host` named the destination: the caller
    /// knows which port the client dialled.
    pub port: Option<u16>,
    /// Raw `Host` header value, if one was sent.
    pub host_header: Option<String>,
    pub header_count: usize,
    /// Bytes up to and including the blank line ending the head.
    pub head_len: usize,
}

impl RequestHead {
    /// Where the client wants to go, with `default_port` standing in for a
    /// port nobody named (the port it dialled, in transparent mode).
    pub fn destination(&self, default_port: u16) -> Option<(&Host, u16)> {
        Some((self.host.as_ref()?, self.port.unwrap_or(default_port)))
    }
}

/// A request head Sluice will not classify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    #[error("malformed request head: {0}")]
    Syntax(httparse::Error),
    #[error("request head exceeds {max} bytes")]
    HeadTooLarge { max: usize },
    #[error("more than {max} header lines")]
    TooManyHeaders { max: usize },
    #[error("more than one Host header")]
    DuplicateHost,
    #[error("Host header disagrees with the request-target")]
    ConflictingHost,
    #[error("HTTP/1.1 request without a Host header")]
    MissingHost,
    #[error("request-target does not fit the method")]
    BadTarget,
    #[error("URI scheme is not http or https")]
    UnsupportedScheme,
    #[error("authority carries userinfo")]
    UserInfo,
    #[error("host is not a DNS name or IP literal")]
    BadHost,
    #[error("port is missing, empty, zero or not a number below 65536")]
    BadPort,
}

impl HttpError {
    /// Stable reason code for audit records and metrics labels.
    pub fn reason_code(&self) -> &'static str {
        match self {
            HttpError::Syntax(_) => "http-malformed",
            HttpError::HeadTooLarge { .. } => "http-oversized",
            HttpError::TooManyHeaders { .. } => "http-too-many-headers",
            HttpError::DuplicateHost => "http-duplicate-host",
            HttpError::ConflictingHost => "http-conflicting-host",
            HttpError::MissingHost => "http-missing-host",
            HttpError::BadTarget => "http-bad-target",
            HttpError::UnsupportedScheme => "http-unsupported-scheme",
            HttpError::UserInfo => "http-userinfo",
            HttpError::BadHost => "http-bad-host",
            HttpError::BadPort => "http-bad-port",
        }
    }
}

/// Parses the HTTP/1.x request head at the start of `input`, the bytes peeked
/// so far. Bytes after the head (a body, or a tunnelled ClientHello) are
/// ignored. For any input, a prefix of it yields either `NeedMore` or the same
/// result as the whole.
pub fn parse_request_head(
    input: &[u8],
    limits: &HttpLimits,
) -> Result<Progress<RequestHead>, HttpError> {
    // Looking only at the first max_head bytes makes the outcome independent of
    // how much more has arrived, which is what keeps prefixes consistent.
    let window = input.get(..limits.max_head).unwrap_or(input);
    let mut slots = [httparse::EMPTY_HEADER; HEADER_SLOTS];
    let max_headers = limits.max_headers.min(HEADER_SLOTS);
    let headers = slots.get_mut(..max_headers).unwrap_or_default();
    let mut req = httparse::Request::new(headers);
    let head_len = match req.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if window.len() >= limits.max_head => {
            return Err(HttpError::HeadTooLarge {
                max: limits.max_head,
            });
        }
        Ok(httparse::Status::Partial) => return Ok(Progress::NeedMore { at_least: Some(1) }),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::TooManyHeaders { max: max_headers });
        }
        Err(e) => return Err(HttpError::Syntax(e)),
    };
    // httparse fills all three on Complete; a miss would be its bug, so treat
    // it as unparseable rather than panic.
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(HttpError::Syntax(httparse::Error::Token));
    };

    let mut host_values = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"))
        .map(|h| h.value);
    let host_value = host_values.next();
    if host_values.next().is_some() {
        return Err(HttpError::DuplicateHost);
    }
    let host_header = host_value.map(|v| String::from_utf8_lossy(trim_ows(v)).into_owned());
    let host_authority = host_value
        .map(|v| parse_authority(trim_ows(v)))
        .transpose()?;

    let (form, target_authority) = classify_target(method, target)?;
    let (host, port) = match target_authority {
        Some(authority) => {
            if let Some(from_header) = &host_authority
                && (!from_header.host.same_as(&authority.host)
                    || from_header.port.is_some_and(|p| Some(p) != authority.port))
            {
                return Err(HttpError::ConflictingHost);
            }
            (Some(authority.host), authority.port)
        }
        None => {
            if host_authority.is_none() && version >= 1 {
                return Err(HttpError::MissingHost);
            }
            match host_authority {
                Some(a) => (Some(a.host), a.port),
                None => (None, None),
            }
        }
    };

    Ok(Progress::Done(RequestHead {
        method: method.to_owned(),
        target: target.to_owned(),
        form,
        version,
        host,
        port,
        host_header,
        header_count: req.headers.len(),
        head_len,
    }))
}

/// Works out the target's form and, for the forms that carry one, its
/// authority with the port defaulted where the scheme defines one.
fn classify_target(
    method: &str,
    target: &str,
) -> Result<(TargetForm, Option<Authority>), HttpError> {
    if method == "CONNECT" {
        let authority = parse_authority(target.as_bytes())?;
        // RFC 9110 §9.3.6: the CONNECT target always names a port.
        if authority.port.is_none() {
            return Err(HttpError::BadPort);
        }
        return Ok((TargetForm::Authority, Some(authority)));
    }
    if target == "*" {
        return if method == "OPTIONS" {
            Ok((TargetForm::Asterisk, None))
        } else {
            Err(HttpError::BadTarget)
        };
    }
    if target.starts_with('/') {
        return Ok((TargetForm::Origin, None));
    }
    let Some((scheme, rest)) = target.split_once("://") else {
        return Err(HttpError::BadTarget);
    };
    let default_port = if scheme.eq_ignore_ascii_case("http") {
        80
    } else if scheme.eq_ignore_ascii_case("https") {
        443
    } else {
        return Err(HttpError::UnsupportedScheme);
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority_str = rest.get(..end).unwrap_or(rest);
    let mut authority = parse_authority(authority_str.as_bytes())?;
    authority.port = Some(authority.port.unwrap_or(default_port));
    Ok((TargetForm::Absolute, Some(authority)))
}

/// Parses `host[:port]` (RFC 3986 §3.2 without userinfo): a DNS name, a
/// dotted-quad IPv4 address, or an IPv6 address in brackets. Zone IDs,
/// IPvFuture and percent-encoding are refused.
pub fn parse_authority(input: &[u8]) -> Result<Authority, HttpError> {
    // Userinfo has no business in a proxy request and is a classic way to make
    // a URL look like it goes somewhere it does not (`http://good@evil/`).
    if input.contains(&b'@') {
        return Err(HttpError::UserInfo);
    }
    let (host, port) = if let Some(bracketed) = input.strip_prefix(b"[") {
        let close = bracketed
            .iter()
            .position(|&b| b == b']')
            .ok_or(HttpError::BadHost)?;
        let (inside, after) = bracketed
            .split_at_checked(close)
            .ok_or(HttpError::BadHost)?;
        let after = after.get(1..).unwrap_or_default();
        let ip = std::str::from_utf8(inside)
            .ok()
            .and_then(|s| s.parse::<Ipv6Addr>().ok())
            .ok_or(HttpError::BadHost)?;
        let port = match after {
            [] => None,
            [b':', digits @ ..] => Some(parse_port(digits)?),
            _ => return Err(HttpError::BadHost),
        };
        (Host::Ipv6(ip), port)
    } else {
        let (host, port) = match input.iter().position(|&b| b == b':') {
            Some(colon) => {
                let (host, rest) = input.split_at_checked(colon).ok_or(HttpError::BadHost)?;
                (host, Some(parse_port(rest.get(1..).unwrap_or_default())?))
            }
            None => (input, None),
        };
        (parse_host(host)?, port)
    };
    Ok(Authority { host, port })
}

fn parse_host(host: &[u8]) -> Result<Host, HttpError> {
    if !is_host_name(host) {
        return Err(HttpError::BadHost);
    }
    let trimmed = host.strip_suffix(b".").unwrap_or(host);
    let last_label = trimmed.rsplit(|&b| b == b'.').next().unwrap_or_default();
    // A numeric last label makes resolvers and URL parsers read the whole name
    // as an IPv4 address, in forms (127.1, 0x7f.1, 017700000001) that bypass a
    // name-based policy; only the canonical dotted quad is accepted as an IP.
    let numeric = last_label.iter().all(u8::is_ascii_digit)
        || last_label
            .get(..2)
            .is_some_and(|p| p.eq_ignore_ascii_case(b"0x"));
    if !numeric {
        return Ok(Host::Name(String::from_utf8_lossy(host).into_owned()));
    }
    std::str::from_utf8(host)
        .ok()
        .and_then(|s| s.parse::<Ipv4Addr>().ok())
        .map(Host::Ipv4)
        .ok_or(HttpError::BadHost)
}

fn parse_port(digits: &[u8]) -> Result<u16, HttpError> {
    // u16::from_str would also take a leading '+'.
    if digits.is_empty() || digits.len() > 5 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(HttpError::BadPort);
    }
    let port = digits
        .iter()
        .fold(0u32, |acc, &d| acc * 10 + u32::from(d - b'0'));
    match u16::try_from(port) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(HttpError::BadPort),
    }
}

/// Strips optional whitespace (SP / HTAB) around a header value.
fn trim_ows(value: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = value.iter().position(|b| !is_ows(b)).unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |i| i + 1);
    value.get(start..end).unwrap_or_default()
}
