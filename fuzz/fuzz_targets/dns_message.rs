//! Fuzzes the DNS proxy's message path: a client query (any bytes) through
//! policy, cache and deny answers, and — when the query is forwarded — an
//! upstream answer (more fuzz bytes) through validation, ECH stripping,
//! truncation and binding. Nothing may panic.

#![no_main]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;
use sluice_api::Enforcement;
use sluice_api::reason::ReasonCode;
use sluice::dns::{
    DnsConfig, DnsCore, ForwardError, QueryContext, QueryPolicy, QueryVerdict, Step, Transport, Upstream,
    UpstreamAnswer,
};


#[derive(Debug)]
struct Policy(bool);

impl QueryPolicy for Policy {
    fn decide(&self, _src: std::net::IpAddr, qname: &sluice_api::DomainName, _qtype: u16) -> QueryVerdict {
        let allowed = self.0 || qname.as_str().ends_with("allowed.test");
        QueryVerdict::labelled("fuzz", allowed, ReasonCode::AllowedByRule, Enforcement::Enforced)
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else { return };
    let split = usize::from(ctl).min(rest.len());
    let (query, answer) = rest.split_at(split.max(rest.len().min(12)));
    let upstream: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 53));
    let config = DnsConfig {
        upstreams: vec![Upstream::udp(upstream)],
        strip_ech: ctl & 1 == 0,
        ..DnsConfig::default()
    };
    let Ok(core) = DnsCore::with_new_bindings(config, Arc::new(Policy(ctl & 2 == 0))) else {
        return;
    };
    let now = Instant::now();
    let ctx = QueryContext {
        src: SocketAddr::from(([10, 0, 0, 1], 5353)),
        transport: if ctl & 4 == 0 { Transport::Udp } else { Transport::Tcp },
        now,
        unix_ms: 0,
    };
    if let Step::Forward(pending) = core.handle_query_bytes(ctx, query) {
        let outcome = match Message::from_vec(answer) {
            Ok(message) => Ok(UpstreamAnswer { message, upstream, wire: answer.to_vec() }),
            Err(_) => Err(ForwardError::Malformed(upstream)),
        };
        let _ = core.complete(*pending, outcome, now);
        // Ask again, with another ID and the name's case flipped: an answer
        // the first pass cached is now served by the cache's wire-level fast
        // path (ID, flags, name case, TTLs and OPT patched in place).
        let mut again = query.to_vec();
        if again.len() >= 2 {
            again[0] ^= 0x5a;
            again[1] ^= 0xa5;
        }
        for b in again.iter_mut().skip(12) {
            if b.is_ascii_alphabetic() {
                *b ^= 0x20;
            }
        }
        let later = QueryContext {
            now: now + std::time::Duration::from_secs(u64::from(ctl >> 4)),
            ..ctx
        };
        let _ = core.handle_query_bytes(later, &again);
    }
});
