//! The edge: what a client is told when its flow or query is refused or
//! fails, in one place. A refusal's HTTP status follows from its reason's
//! kind, a failure's from its close reason; the body and the
//! `X-Sluice-Rule` / `X-Sluice-Reason` headers name both, so a user who sees
//! the answer can find the rule and the docs entry. Listeners that speak no
//! HTTP (sni, transparent, tcp) just close. A DNS query refused before the
//! policy gets the rcode its reason calls for ([`dns_refusal`]); one the
//! policy or a query filter denies gets what the listener's `deny_answer`
//! says ([`dns_denial`]: NXDOMAIN, REFUSED or a sinkhole address); an
//! upstream failure SERVFAIL ([`DNS_FAILURE`]).

use std::net::IpAddr;

use sluice_api::reason::{ReasonCode, ReasonKind};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

use crate::dns::config::DenyAnswer;
use crate::listener::Stop;
use crate::policy::decision::Decision;

/// What an explicit-proxy client is told about a flow that stopped: the
/// status, the rule and reason for the `X-Sluice-*` headers, and a sentence
/// for the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer<'a> {
    pub status: Status,
    pub rule: &'a str,
    pub reason: &'a str,
    pub message: &'static str,
}

/// The answer to a flow that stopped with `stop` and `decision`, or `None`
/// when nobody is there to read one (see [`refusal`]). A refusal names the
/// rule and reason code that decided; a failure names the rule that
/// allowed the flow and the close reason.
pub fn answer(decision: Option<&Decision>, stop: Stop) -> Option<Answer<'_>> {
    match stop {
        Stop::Refused => {
            let (rule, reason) = decision.map_or(
                (ReasonCode::NoDecision.kind().rule_label(), ReasonCode::NoDecision),
                |d| (d.rule.as_str(), d.reason),
            );
            Some(Answer {
                status: refusal(reason)?,
                rule,
                reason: reason.as_str(),
                message: refusal_message(reason),
            })
        }
        Stop::Failed { reason, .. } => Some(Answer {
            status: failure(reason),
            rule: decision.map_or("-", |d| d.rule.as_str()),
            reason,
            message: failure_message(reason),
        }),
    }
}

/// The sentence in a refusal's body: what to fix, where the client can.
fn refusal_message(reason: ReasonCode) -> &'static str {
    use ReasonCode as R;
    match reason {
        R::ProxyAuthRequired => "Proxy authentication required.",
        R::ConnectNotFirst => "CONNECT must be the first request on a proxy connection.",
        R::HttpBadTarget => "A proxy request needs an absolute URI (http://host/path) or CONNECT host:port.",
        R::HttpUnsupportedScheme => "Only http:// URIs are proxied; use CONNECT for https.",
        R::HttpConflictingHost => "The Host header names another host than the URI.",
        R::HttpBadHost => "The host is neither a valid name nor an address in dotted or IPv6 form.",
        _ => "Sluice refused this request.",
    }
}

/// The sentence in a failure's body.
fn failure_message(close_reason: &str) -> &'static str {
    if close_reason.starts_with("dns-") {
        "Sluice could not resolve the host."
    } else if close_reason.starts_with("connect-") {
        "Sluice could not connect to the host."
    } else {
        "Sluice could not reach the target."
    }
}

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
    } else if close_reason == "request-body-too-large" {
        Status {
            code: 413,
            text: "Content Too Large",
        }
    } else {
        Status {
            code: 502,
            text: "Bad Gateway",
        }
    }
}

/// The rcode for a DNS message refused before the policy (it cannot be
/// answered as asked): FORMERR for one that does not parse, NOTIMP for
/// another opcode, BADVERS for another EDNS version, REFUSED otherwise (a
/// name that is not a hostname, a zone transfer).
pub fn dns_refusal(reason: ReasonCode) -> ResponseCode {
    match reason {
        ReasonCode::DnsMalformed => ResponseCode::FormErr,
        ReasonCode::DnsNotImplemented => ResponseCode::NotImp,
        ReasonCode::DnsBadEdnsVersion => ResponseCode::BADVERS,
        _ => ResponseCode::Refused,
    }
}

/// What a client is told about a query the policy or a query filter denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsDenial {
    pub rcode: ResponseCode,
    /// The one address to answer with (a sinkhole's, for A and AAAA only).
    pub address: Option<IpAddr>,
}

/// The answer the listener's `deny_answer` calls for to a denied query of
/// type `qtype` (`None` when the message carried no question): NXDOMAIN or
/// REFUSED as configured, or for a sinkhole NOERROR with the sinkhole's
/// address for A and AAAA and no answer (NODATA) for any other type.
pub fn dns_denial(deny: DenyAnswer, qtype: Option<RecordType>) -> DnsDenial {
    let (rcode, address) = match deny {
        DenyAnswer::NxDomain => (ResponseCode::NXDomain, None),
        DenyAnswer::Refused => (ResponseCode::Refused, None),
        DenyAnswer::Sinkhole { v4, v6 } => (
            ResponseCode::NoError,
            match qtype {
                Some(RecordType::A) => Some(IpAddr::V4(v4)),
                Some(RecordType::AAAA) => Some(IpAddr::V6(v6)),
                _ => None,
            },
        ),
    };
    DnsDenial { rcode, address }
}

/// The rcode for an allowed query that could not be answered (no upstream
/// answered, or the answer could not be used).
pub const DNS_FAILURE: ResponseCode = ResponseCode::ServFail;

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

    #[test]
    fn a_dns_refusal_has_the_rcode_its_reason_calls_for() {
        assert_eq!(dns_refusal(ReasonCode::DnsMalformed), ResponseCode::FormErr);
        assert_eq!(dns_refusal(ReasonCode::DnsNotImplemented), ResponseCode::NotImp);
        assert_eq!(dns_refusal(ReasonCode::DnsBadEdnsVersion), ResponseCode::BADVERS);
        assert_eq!(dns_refusal(ReasonCode::DnsInvalidName), ResponseCode::Refused);
        assert_eq!(dns_refusal(ReasonCode::DnsZoneTransfer), ResponseCode::Refused);
        assert_eq!(DNS_FAILURE, ResponseCode::ServFail);
    }

    #[test]
    fn a_denied_query_gets_what_deny_answer_says() {
        use std::net::{Ipv4Addr, Ipv6Addr};
        let nx = dns_denial(DenyAnswer::NxDomain, Some(RecordType::A));
        assert_eq!((nx.rcode, nx.address), (ResponseCode::NXDomain, None));
        let refused = dns_denial(DenyAnswer::Refused, Some(RecordType::AAAA));
        assert_eq!((refused.rcode, refused.address), (ResponseCode::Refused, None));
        let (v4, v6) = (Ipv4Addr::new(192, 0, 2, 99), Ipv6Addr::LOCALHOST);
        let sink = DenyAnswer::Sinkhole { v4, v6 };
        assert_eq!(dns_denial(sink, Some(RecordType::A)).address, Some(IpAddr::V4(v4)));
        assert_eq!(dns_denial(sink, Some(RecordType::AAAA)).address, Some(IpAddr::V6(v6)));
        // NODATA for other types and for a message without a question.
        let txt = dns_denial(sink, Some(RecordType::TXT));
        assert_eq!((txt.rcode, txt.address), (ResponseCode::NoError, None));
        assert_eq!(dns_denial(sink, None).address, None);
    }

    #[test]
    fn an_answer_names_the_rule_and_the_reason() {
        let d = Decision::refused(ReasonCode::ProxyAuthRequired);
        let a = answer(Some(&d), Stop::Refused);
        assert_eq!(
            a.map(|a| (a.status.code, a.rule, a.reason)),
            Some((407, "listener", "proxy-auth-required"))
        );
        // Nobody to answer: closed without a word.
        let d = Decision::refused(ReasonCode::PeekTimeout);
        assert_eq!(answer(Some(&d), Stop::Refused), None);
        // No decision at all is a refusal too.
        let a = answer(None, Stop::Refused);
        assert_eq!(a.map(|a| a.reason), Some("no-decision"));
        let a = answer(Some(&d), Stop::failed("connect-timeout"));
        assert_eq!(
            a.map(|a| (a.status.code, a.reason, a.message)),
            Some((504, "connect-timeout", "Sluice could not connect to the host."))
        );
        let a = answer(None, Stop::failed("dns-nxdomain"));
        assert_eq!(a.map(|a| (a.status.code, a.rule)), Some((502, "-")));
    }
}
