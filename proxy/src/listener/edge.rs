//! The edge: what a client is told when its flow is refused or fails, in
//! one place. A refusal's HTTP status follows from its reason's kind, a
//! failure's from its close reason; the body and the `X-Sluice-Rule` /
//! `X-Sluice-Reason` headers name both, so a user who sees the answer can
//! find the rule and the docs entry. Listeners that speak no HTTP (sni,
//! transparent, tcp) just close; DNS answers are the DNS proxy's (NXDOMAIN,
//! REFUSED or a sinkhole per `deny_answer`; SERVFAIL for an upstream
//! failure).

use sluice_api::reason::{ReasonCode, ReasonKind};

/// An HTTP status and its reason phrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub code: u16,
    pub text: &'static str,
}

const BAD_REQUEST: Status = Status {
    code: 400,
    text: "Bad Request",
};
const FORBIDDEN: Status = Status {
    code: 403,
    text: "Forbidden",
};

/// The status an explicit-proxy client gets for a refusal, or `None` when
/// there is nobody to answer (the client went away or never sent a
/// request, or the process is stopping): the connection is just closed.
pub fn refusal(reason: ReasonCode) -> Option<Status> {
    use ReasonCode as R;
    Some(match reason {
        R::ProxyAuthRequired => Status {
            code: 407,
            text: "Proxy Authentication Required",
        },
        R::ConnectNotFirst => Status {
            code: 405,
            text: "Method Not Allowed",
        },
        R::PeekTimeout | R::ClientClosedEarly | R::ClientError | R::Shutdown => return None,
        // A request that contradicts itself is malformed before it is
        // anything else.
        R::HttpConflictingHost => BAD_REQUEST,
        r => match r.kind() {
            ReasonKind::Classify => BAD_REQUEST,
            _ => FORBIDDEN,
        },
    })
}

/// The status for an allowed flow that could not be forwarded: a connect
/// that timed out is `504`, anything else upstream (no address, refused,
/// unreachable, an upstream error) `502`.
pub fn failure(close_reason: &str) -> Status {
    if close_reason == "connect-timeout" || close_reason == "dns-timeout" {
        Status {
            code: 504,
            text: "Gateway Timeout",
        }
    } else {
        Status {
            code: 502,
            text: "Bad Gateway",
        }
    }
}

/// The plain-text body of a refusal or failure: a sentence, then the rule
/// and the reason on their own lines (what tools and people grep for).
pub fn body(message: &str, rule: &str, reason: &str) -> String {
    format!("{message}\nrule: {rule}\nreason: {reason}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_an_answer_by_its_kind() {
        for r in ReasonCode::EVERY {
            let s = refusal(*r);
            match r {
                ReasonCode::ProxyAuthRequired => assert_eq!(s.map(|s| s.code), Some(407)),
                ReasonCode::ConnectNotFirst => assert_eq!(s.map(|s| s.code), Some(405)),
                ReasonCode::PeekTimeout
                | ReasonCode::ClientClosedEarly
                | ReasonCode::ClientError
                | ReasonCode::Shutdown => assert_eq!(s, None),
                _ if r.kind() == ReasonKind::Classify || *r == ReasonCode::HttpConflictingHost => {
                    assert_eq!(s.map(|s| s.code), Some(400), "{r}");
                }
                _ => assert_eq!(s.map(|s| s.code), Some(403), "{r}"),
            }
        }
        assert_eq!(failure("connect-timeout").code, 504);
        assert_eq!(failure("connect-refused").code, 502);
        assert_eq!(failure("dns-nxdomain").code, 502);
        assert_eq!(failure("upstream-error").code, 502);
    }
}
