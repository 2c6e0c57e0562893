//! The little HTTP/1.1 the demo speaks, without I/O: request and response
//! heads parsed from the bytes read so far (`Ok(None)` while the head is
//! incomplete), and the `http://` URLs the agent is given. The upstream and
//! the agent feed these functions from their sockets; the tests feed them
//! split and malformed inputs.

use std::fmt;
use std::str::FromStr;

/// A head longer than this is refused rather than buffered.
pub const MAX_HEAD: usize = 16 * 1024;

/// Why a head or a URL was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HttpError {
    /// No end of head within [`MAX_HEAD`] bytes.
    HeadTooLong,
    /// The head is not UTF-8.
    NotUtf8,
    /// The first line is not `METHOD TARGET HTTP/1.x`.
    RequestLine(String),
    /// The first line is not `HTTP/1.x CODE REASON`.
    StatusLine(String),
    /// A header line without a `:`.
    HeaderLine(String),
    /// Not an `http://host[:port][/path]` URL.
    Url(String),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::HeadTooLong => write!(f, "no end of the HTTP head within {MAX_HEAD} bytes"),
            Self::NotUtf8 => write!(f, "the HTTP head is not UTF-8"),
            Self::RequestLine(l) => write!(f, "not an HTTP/1 request line: {l:?}"),
            Self::StatusLine(l) => write!(f, "not an HTTP/1 status line: {l:?}"),
            Self::HeaderLine(l) => write!(f, "not an HTTP header line: {l:?}"),
            Self::Url(u) => write!(f, "not an http:// URL: {u:?} (expected http://HOST[:PORT][/PATH])"),
        }
    }
}

impl std::error::Error for HttpError {}

/// A request's first line and the headers the upstream looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub target: String,
    /// The `Host` header; for an absolute-form target without one, the
    /// target's authority.
    pub host: Option<String>,
}

/// A response's status and headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    /// Bytes of the input the head took, `\r\n\r\n` included: the body
    /// starts there.
    pub len: usize,
}

impl ResponseHead {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The head as text and its length, once `\r\n\r\n` has been read.
fn head(buf: &[u8]) -> Result<Option<(&str, usize)>, HttpError> {
    match buf.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(end) => {
            let text = std::str::from_utf8(&buf[..end]).map_err(|_| HttpError::NotUtf8)?;
            Ok(Some((text, end + 4)))
        }
        None if buf.len() >= MAX_HEAD => Err(HttpError::HeadTooLong),
        None => Ok(None),
    }
}

fn headers<'a>(lines: impl Iterator<Item = &'a str>) -> Result<Vec<(String, String)>, HttpError> {
    lines
        .map(|l| match l.split_once(':') {
            Some((k, v)) if !k.is_empty() && !k.contains(' ') => Ok((k.to_owned(), v.trim().to_owned())),
            _ => Err(HttpError::HeaderLine(l.to_owned())),
        })
        .collect()
}

fn is_http1(version: &str) -> bool {
    matches!(version, "HTTP/1.0" | "HTTP/1.1")
}

/// Parses a request head from the start of `buf`.
pub fn parse_request(buf: &[u8]) -> Result<Option<RequestHead>, HttpError> {
    let Some((text, _)) = head(buf)? else {
        return Ok(None);
    };
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or_default();
    let mut parts = first.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::RequestLine(first.to_owned()));
    };
    if method.is_empty() || target.is_empty() || !is_http1(version) {
        return Err(HttpError::RequestLine(first.to_owned()));
    }
    let headers = headers(lines)?;
    let host = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("host"))
        .map(|(_, v)| v.clone())
        .or_else(|| target.parse::<Url>().ok().map(|u| u.authority()));
    Ok(Some(RequestHead {
        method: method.to_owned(),
        target: target.to_owned(),
        host,
    }))
}

/// Parses a response head from the start of `buf`.
pub fn parse_response(buf: &[u8]) -> Result<Option<ResponseHead>, HttpError> {
    let Some((text, len)) = head(buf)? else {
        return Ok(None);
    };
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or_default();
    let mut parts = first.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(HttpError::StatusLine(first.to_owned()));
    };
    let status = match code.parse::<u16>() {
        Ok(s) if is_http1(version) && code.len() == 3 => s,
        _ => return Err(HttpError::StatusLine(first.to_owned())),
    };
    Ok(Some(ResponseHead {
        status,
        reason: parts.next().unwrap_or_default().to_owned(),
        headers: headers(lines)?,
        len,
    }))
}

/// An `http://host[:port][/path]` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub host: String,
    pub port: u16,
    /// Starts with `/`.
    pub path: String,
}

impl Url {
    /// `host`, or `host:port` when the port is not 80: the `Host` header.
    pub fn authority(&self) -> String {
        if self.port == 80 {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for Url {
    type Err = HttpError;

    fn from_str(s: &str) -> Result<Self, HttpError> {
        let bad = || HttpError::Url(s.to_owned());
        let rest = s.strip_prefix("http://").ok_or_else(bad)?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad())?),
            None => (authority, 80),
        };
        let host_ok = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
        if !host_ok || port == 0 {
            return Err(bad());
        }
        Ok(Self {
            host: host.to_ascii_lowercase(),
            port,
            path: path.to_owned(),
        })
    }
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.authority(), self.path)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    /// Every split of `input` short of the whole is "need more".
    fn incomplete_until_whole<T: fmt::Debug>(input: &[u8], parse: fn(&[u8]) -> Result<Option<T>, HttpError>) {
        for i in 0..input.len() {
            assert!(
                matches!(parse(&input[..i]), Ok(None)),
                "{i} bytes: {:?}",
                parse(&input[..i])
            );
        }
    }

    #[test]
    fn origin_form_request_with_host() {
        let req = b"GET /v1/models HTTP/1.1\r\nhost: api.demo.internal\r\nUser-Agent: x\r\n\r\n";
        incomplete_until_whole(req, parse_request);
        let head = parse_request(req).unwrap().unwrap();
        assert_eq!(head.method, "GET");
        assert_eq!(head.target, "/v1/models");
        assert_eq!(head.host.as_deref(), Some("api.demo.internal"));
    }

    #[test]
    fn absolute_form_request_without_host_takes_the_targets_authority() {
        let head = parse_request(b"GET http://api.demo.internal:8080/x HTTP/1.0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(head.host.as_deref(), Some("api.demo.internal:8080"));
    }

    #[test]
    fn bad_requests_are_refused() {
        assert!(matches!(
            parse_request(b"GET /\r\n\r\n"),
            Err(HttpError::RequestLine(_))
        ));
        assert!(matches!(
            parse_request(b"GET / HTTP/2\r\n\r\n"),
            Err(HttpError::RequestLine(_))
        ));
        assert!(matches!(
            parse_request(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n"),
            Err(HttpError::HeaderLine(_))
        ));
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nX: \xff\r\n\r\n"),
            Err(HttpError::NotUtf8)
        );
        assert_eq!(parse_request(&[b'a'; MAX_HEAD]), Err(HttpError::HeadTooLong));
    }

    #[test]
    fn a_sluice_denial() {
        let resp = b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nx-sluice-rule: default\r\nX-Sluice-Reason: default-deny\r\n\r\nbody";
        incomplete_until_whole(&resp[..resp.len() - 4], parse_response);
        let head = parse_response(resp).unwrap().unwrap();
        assert_eq!(head.status, 403);
        assert_eq!(head.reason, "Forbidden");
        assert_eq!(head.header("X-Sluice-Rule"), Some("default"));
        assert_eq!(head.header("x-sluice-reason"), Some("default-deny"));
        assert_eq!(&resp[head.len..], b"body");
    }

    #[test]
    fn bad_status_lines_are_refused() {
        for line in ["HTTP/1.1 2000 OK", "HTTP/1.1 abc", "SSH-2.0-x", "HTTP/1.1"] {
            let input = format!("{line}\r\n\r\n");
            assert!(
                matches!(parse_response(input.as_bytes()), Err(HttpError::StatusLine(_))),
                "{line}"
            );
        }
        let empty_reason = parse_response(b"HTTP/1.1 204\r\n\r\n").unwrap().unwrap();
        assert_eq!((empty_reason.status, empty_reason.reason.as_str()), (204, ""));
    }

    #[test]
    fn urls() {
        let u: Url = "http://API.demo.internal".parse().unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("api.demo.internal", 80, "/")
        );
        assert_eq!(u.to_string(), "http://api.demo.internal/");
        let u: Url = "http://gateway-proxy:3128".parse().unwrap();
        assert_eq!((u.authority().as_str(), u.path.as_str()), ("gateway-proxy:3128", "/"));
        for bad in [
            "https://x/",
            "http://",
            "http://:80/",
            "http://x:0/",
            "http://x:99999/",
            "http://a b/",
            "ftp://x",
        ] {
            assert!(matches!(bad.parse::<Url>(), Err(HttpError::Url(_))), "{bad}");
        }
    }
}
