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

/// Scheme of an absolute-form target. `Https` means the client asked the
/// proxy itself to make the TLS connection to the origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
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
    /// Set for absolute-form targets only.
    pub scheme: Option<Scheme>,
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
    /// The verdict's reason for a request head that does not parse.
    pub fn reason(&self) -> sluice_api::reason::ReasonCode {
        use sluice_api::reason::ReasonCode as R;
        match self {
            HttpError::Syntax(_) => R::HttpMalformed,
            HttpError::HeadTooLarge { .. } => R::HttpOversized,
            HttpError::TooManyHeaders { .. } => R::HttpTooManyHeaders,
            HttpError::DuplicateHost => R::HttpDuplicateHost,
            HttpError::ConflictingHost => R::HttpConflictingHost,
            HttpError::MissingHost => R::HttpMissingHost,
            HttpError::BadTarget => R::HttpBadTarget,
            HttpError::UnsupportedScheme => R::HttpUnsupportedScheme,
            HttpError::UserInfo => R::HttpUserinfo,
            HttpError::BadHost => R::HttpBadHost,
            HttpError::BadPort => R::HttpBadPort,
        }
    }

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
pub fn parse_request_head(input: &[u8], limits: &HttpLimits) -> Result<Progress<RequestHead>, HttpError> {
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
            return Err(HttpError::HeadTooLarge { max: limits.max_head });
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
    let host_authority = host_value.map(|v| parse_authority(trim_ows(v))).transpose()?;

    let (form, scheme, target_authority) = classify_target(method, target)?;
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
        scheme,
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
fn classify_target(method: &str, target: &str) -> Result<(TargetForm, Option<Scheme>, Option<Authority>), HttpError> {
    if method == "CONNECT" {
        let authority = parse_authority(target.as_bytes())?;
        // RFC 9110 §9.3.6: the CONNECT target always names a port.
        if authority.port.is_none() {
            return Err(HttpError::BadPort);
        }
        return Ok((TargetForm::Authority, None, Some(authority)));
    }
    if target == "*" {
        return if method == "OPTIONS" {
            Ok((TargetForm::Asterisk, None, None))
        } else {
            Err(HttpError::BadTarget)
        };
    }
    if target.starts_with('/') {
        return Ok((TargetForm::Origin, None, None));
    }
    let Some((scheme, rest)) = target.split_once("://") else {
        return Err(HttpError::BadTarget);
    };
    let (scheme, default_port) = if scheme.eq_ignore_ascii_case("http") {
        (Scheme::Http, 80)
    } else if scheme.eq_ignore_ascii_case("https") {
        (Scheme::Https, 443)
    } else {
        return Err(HttpError::UnsupportedScheme);
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority_str = rest.get(..end).unwrap_or(rest);
    let mut authority = parse_authority(authority_str.as_bytes())?;
    authority.port = Some(authority.port.unwrap_or(default_port));
    Ok((TargetForm::Absolute, Some(scheme), Some(authority)))
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
        let close = bracketed.iter().position(|&b| b == b']').ok_or(HttpError::BadHost)?;
        let (inside, after) = bracketed.split_at_checked(close).ok_or(HttpError::BadHost)?;
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
    let numeric =
        last_label.iter().all(u8::is_ascii_digit) || last_label.get(..2).is_some_and(|p| p.eq_ignore_ascii_case(b"0x"));
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
    let port = digits.iter().fold(0u32, |acc, &d| acc * 10 + u32::from(d - b'0'));
    match u16::try_from(port) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(HttpError::BadPort),
    }
}

/// Strips optional whitespace (SP / HTAB) around a header value.
fn trim_ows(value: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = value.iter().position(|b| !is_ows(b)).unwrap_or(value.len());
    let end = value.iter().rposition(|b| !is_ows(b)).map_or(start, |i| i + 1);
    value.get(start..end).unwrap_or_default()
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

    fn parse(input: &[u8]) -> Result<Progress<RequestHead>, HttpError> {
        parse_request_head(input, &HttpLimits::default())
    }

    fn done(input: &[u8]) -> RequestHead {
        match parse(input) {
            Ok(Progress::Done(head)) => head,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(input)),
        }
    }

    fn err(input: &[u8]) -> HttpError {
        match parse(input) {
            Err(e) => e,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(input)),
        }
    }

    fn is_need_more(r: &Result<Progress<RequestHead>, HttpError>) -> bool {
        matches!(r, Ok(Progress::NeedMore { .. }))
    }

    fn name(n: &str) -> Option<Host> {
        Some(Host::Name(n.to_owned()))
    }

    #[test]
    fn origin_form_takes_host_header() {
        let input = b"GET /index.html?q=1 HTTP/1.1\r\nUser-Agent: t\r\nHost: Example.com:8080\r\n\r\nbody";
        let head = done(input);
        assert_eq!(head.method, "GET");
        assert_eq!(head.target, "/index.html?q=1");
        assert_eq!(head.form, TargetForm::Origin);
        assert_eq!(head.version, 1);
        assert_eq!(head.host, name("Example.com"));
        assert_eq!(head.port, Some(8080));
        assert_eq!(head.host_header.as_deref(), Some("Example.com:8080"));
        assert_eq!(head.header_count, 2);
        assert_eq!(head.head_len, input.len() - 4);
        let head = done(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n");
        assert_eq!(head.port, None);
        assert_eq!(head.destination(8081), Some((&Host::Name("example.com".into()), 8081)));
    }

    #[test]
    fn one_byte_at_a_time() {
        let input = b"POST http://example.com/x HTTP/1.1\r\nHost: example.com\r\nContent-Length: 2\r\n\r\nhi";
        let end = input.len() - 2;
        for k in 0..end {
            assert!(is_need_more(&parse(&input[..k])), "prefix {k}");
        }
        for k in end..=input.len() {
            assert_eq!(done(&input[..k]), done(input));
        }
    }

    #[test]
    fn absolute_form_defaults_ports_and_wins_over_host() {
        let head = done(b"GET http://example.com/a HTTP/1.1\r\nHost: example.com\r\n\r\n");
        assert_eq!(
            (head.form, head.host.clone(), head.port),
            (TargetForm::Absolute, name("example.com"), Some(80))
        );
        assert_eq!(head.destination(1), Some((&Host::Name("example.com".into()), 80)));
        let head = done(b"GET HTTP://Example.com:8080 HTTP/1.0\r\n\r\n");
        assert_eq!((head.host, head.port), (name("Example.com"), Some(8080)));
        let head = done(b"GET https://example.com?x HTTP/1.1\r\n\r\n");
        assert_eq!((head.scheme, head.port), (Some(Scheme::Https), Some(443)));
        let head = done(b"GET http://[2001:db8::1]:8000/ HTTP/1.1\r\n\r\n");
        assert_eq!(head.host, Some(Host::Ipv6("2001:db8::1".parse().unwrap())));
        assert_eq!(head.port, Some(8000));
        assert_eq!(head.host.unwrap().to_string(), "[2001:db8::1]");
        // Same name spelled differently is not a conflict.
        done(b"GET http://example.com/ HTTP/1.1\r\nHost: EXAMPLE.com.:80\r\n\r\n");
    }

    #[test]
    fn connect_takes_authority_form() {
        let head = done(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nProxy-Connection: keep-alive\r\n\r\n\x16\x03\x01");
        assert_eq!(head.form, TargetForm::Authority);
        assert_eq!((head.host, head.port), (name("example.com"), Some(443)));
        let head = done(b"CONNECT [::1]:8443 HTTP/1.1\r\n\r\n");
        assert_eq!(head.host, Some(Host::Ipv6(Ipv6Addr::LOCALHOST)));
        let head = done(b"CONNECT 10.0.0.1:22 HTTP/1.0\r\n\r\n");
        assert_eq!(
            (head.host, head.port),
            (Some(Host::Ipv4(Ipv4Addr::new(10, 0, 0, 1))), Some(22))
        );
        assert_eq!(err(b"CONNECT example.com HTTP/1.1\r\n\r\n"), HttpError::BadPort);
        assert_eq!(err(b"CONNECT /x HTTP/1.1\r\n\r\n"), HttpError::BadHost);
        // The scheme's colon reads as a port separator.
        assert_eq!(
            err(b"CONNECT http://example.com:443/ HTTP/1.1\r\n\r\n"),
            HttpError::BadPort
        );
    }

    #[test]
    fn refuses_userinfo() {
        assert_eq!(
            err(b"GET http://good.example@evil.example/ HTTP/1.1\r\n\r\n"),
            HttpError::UserInfo
        );
        assert_eq!(
            err(b"CONNECT user:pw@evil.example:443 HTTP/1.1\r\n\r\n"),
            HttpError::UserInfo
        );
        assert_eq!(err(b"GET / HTTP/1.1\r\nHost: a@b\r\n\r\n"), HttpError::UserInfo);
    }

    #[test]
    fn refuses_several_or_conflicting_hosts() {
        assert_eq!(
            err(b"GET / HTTP/1.1\r\nHost: a.example\r\nhost: a.example\r\n\r\n"),
            HttpError::DuplicateHost
        );
        assert_eq!(
            err(b"GET / HTTP/1.1\r\nHost: a.example\r\nHOST: b.example\r\n\r\n"),
            HttpError::DuplicateHost
        );
        assert_eq!(
            err(b"GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\n\r\n"),
            HttpError::ConflictingHost
        );
        assert_eq!(
            err(b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:8443\r\n\r\n"),
            HttpError::ConflictingHost
        );
        assert_eq!(err(b"GET / HTTP/1.1\r\n\r\n"), HttpError::MissingHost);
        assert_eq!(err(b"GET / HTTP/1.1\r\nHost:\r\n\r\n"), HttpError::BadHost);
        let head = done(b"GET / HTTP/1.0\r\n\r\n");
        assert_eq!(head.destination(80), None);
        assert_eq!((head.host, head.version), (None, 0));
    }

    #[test]
    fn host_forms() {
        let host = |s: &str| parse_authority(s.as_bytes()).map(|a| (a.host, a.port));
        assert_eq!(host("127.0.0.1:80"), Ok((Host::Ipv4(Ipv4Addr::LOCALHOST), Some(80))));
        assert_eq!(
            host("xn--caf-dma.example"),
            Ok((Host::Name("xn--caf-dma.example".into()), None))
        );
        // Numeric spellings resolvers would turn into 127.0.0.1.
        for bad in [
            "127.1",
            "0x7f.0.0.1",
            "2130706433",
            "0177.0.0.1",
            "127.0.0.01",
            "1.2.3.4.5",
            "example.123",
        ] {
            assert_eq!(host(bad), Err(HttpError::BadHost), "{bad}");
        }
        for bad in [
            "",
            "[::1",
            "[fe80::1%25eth0]",
            "[v1.x]",
            "[::1]x",
            "a b",
            "a%2eb",
            "caf\u{e9}.example",
            "a\\b",
        ] {
            assert_eq!(host(bad), Err(HttpError::BadHost), "{bad}");
        }
        for bad in ["a:", "a:0", "a:65536", "a:+80", "a:80a", "a:1:2", "[::1]:", "a:123456"] {
            assert_eq!(host(bad), Err(HttpError::BadPort), "{bad}");
        }
        assert_eq!(host("a:65535"), Ok((Host::Name("a".into()), Some(65535))));
        assert_eq!(host("a:0080"), Ok((Host::Name("a".into()), Some(80))));
    }

    #[test]
    fn refuses_bad_targets_and_schemes() {
        assert_eq!(err(b"GET * HTTP/1.1\r\nHost: a\r\n\r\n"), HttpError::BadTarget);
        assert_eq!(
            done(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n").form,
            TargetForm::Asterisk
        );
        assert_eq!(err(b"GET example.com/ HTTP/1.1\r\n\r\n"), HttpError::BadTarget);
        assert_eq!(
            err(b"GET ftp://example.com/ HTTP/1.1\r\n\r\n"),
            HttpError::UnsupportedScheme
        );
    }

    #[test]
    fn syntax_errors_come_from_httparse() {
        assert_eq!(
            err(b"GET / HTTP/2.0\r\n\r\n"),
            HttpError::Syntax(httparse::Error::Version)
        );
        assert!(matches!(
            err(b"GET / HTTP/1.1\r\nHost : a\r\n\r\n"),
            HttpError::Syntax(_)
        ));
        assert!(matches!(err(b"\x16\x03\x01\x02\x00"), HttpError::Syntax(_)));
        assert_eq!(
            HttpError::Syntax(httparse::Error::Token).reason_code(),
            "http-malformed"
        );
    }

    #[test]
    fn bounds_head_size_and_header_count() {
        let limits = HttpLimits {
            max_head: 64,
            max_headers: 4,
        };
        let mut long = b"GET / HTTP/1.1\r\nHost: a\r\nX: ".to_vec();
        long.resize(63, b'x');
        assert!(is_need_more(&parse_request_head(&long, &limits)));
        long.push(b'x');
        assert_eq!(
            parse_request_head(&long, &limits),
            Err(HttpError::HeadTooLarge { max: 64 })
        );
        long.extend_from_slice(b"\r\n\r\n");
        assert_eq!(
            parse_request_head(&long, &limits),
            Err(HttpError::HeadTooLarge { max: 64 })
        );
        let exact = b"GET / HTTP/1.1\r\nHost: a\r\nX: yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy\r\n\r\n";
        assert_eq!(exact.len(), 64);
        assert!(parse_request_head(exact, &limits).is_ok_and(|p| p.done().is_some()));
        let many = b"GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n";
        assert_eq!(
            parse_request_head(many, &limits),
            Err(HttpError::TooManyHeaders { max: 4 })
        );
        assert_eq!(parse(&[b'G'; 20_000]), Err(HttpError::HeadTooLarge { max: 16 * 1024 }));
    }

    #[test]
    fn reason_codes_are_stable() {
        assert_eq!(HttpError::HeadTooLarge { max: 1 }.reason_code(), "http-oversized");
        assert_eq!(HttpError::DuplicateHost.reason_code(), "http-duplicate-host");
        assert_eq!(HttpError::ConflictingHost.reason_code(), "http-conflicting-host");
        assert_eq!(HttpError::UserInfo.reason_code(), "http-userinfo");
        assert_eq!(HttpError::BadHost.reason_code(), "http-bad-host");
        assert_eq!(HttpError::BadPort.reason_code(), "http-bad-port");
    }

    fn arb_head() -> impl Strategy<Value = Vec<u8>> {
        (
            prop_oneof![Just("GET"), Just("POST"), Just("CONNECT"), Just("OPTIONS")],
            "[a-z0-9]{1,10}(\\.[a-z]{1,8}){0,2}",
            proptest::option::of(1u16..),
            proptest::collection::vec(("[A-Za-z-]{1,12}", "[ -~]{0,30}"), 0..8),
            proptest::collection::vec(any::<u8>(), 0..20),
        )
            .prop_map(|(method, host, port, headers, tail)| {
                let authority = match port {
                    Some(p) => format!("{host}:{p}"),
                    None => host.clone(),
                };
                let target = match method {
                    "CONNECT" => authority.clone(),
                    "OPTIONS" => "*".to_owned(),
                    _ => format!("http://{authority}/p"),
                };
                let mut s = format!("{method} {target} HTTP/1.1\r\nHost: {authority}\r\n");
                for (n, v) in headers {
                    s.push_str(&format!("{n}: {v}\r\n"));
                }
                s.push_str("\r\n");
                let mut out = s.into_bytes();
                out.extend(tail);
                out
            })
    }

    proptest! {
        #[test]
        fn never_panics_and_prefixes_agree(input in proptest::collection::vec(any::<u8>(), 0..300)) {
            let whole = parse(&input);
            for k in 0..input.len() {
                let part = parse(&input[..k]);
                prop_assert!(is_need_more(&part) || part == whole);
            }
        }

        #[test]
        fn never_panics_on_head_shaped_noise(line in "[A-Z]{1,8} [ -~]{0,40} HTTP/1\\.[01]\r\n([ -~]{0,30}\r\n){0,4}\r\n") {
            let _ = parse(line.as_bytes());
        }

        #[test]
        fn segmentation_does_not_change_the_result(input in arb_head()) {
            let whole = parse(&input);
            prop_assert!(!is_need_more(&whole), "{:?}", whole);
            for k in 0..input.len() {
                let part = parse(&input[..k]);
                prop_assert!(is_need_more(&part) || part == whole, "prefix {}: {:?} vs {:?}", k, part, whole);
            }
        }
    }
}
