//! The sans-IO DNS engine: query bytes in, a decision and answer bytes out.
//!
//! This is the whole per-query logic of the DNS proxy without sockets or
//! clocks, so it is unit-tested and fuzzed directly. The server calls
//! [`DnsCore::handle_query_bytes`] for each message; the result is a
//! [`Step`]: answer now (denied, cached, malformed), drop, or forward — in
//! which case the server runs the [`Pending`] query's bytes through the
//! forwarder and hands the outcome back to [`DnsCore::complete`].
//!
//! A plain query whose answer is cached takes a shortcut on wire bytes
//! ([`super::fast`]): policy, then the stored answer patched for this
//! client, with no message parsed or encoded. Everything else goes the
//! general way. Order of work for one query: header (unreadable → drop) → full parse
//! (fails → FORMERR) → checks (opcode, one question, EDNS version, a
//! classifiable name, not a zone transfer) → policy
//! → exfiltration detector → deny answer, or cache, or forward → ECH strip,
//! cache store, bindings → client answer, truncated to the client's UDP size.
//! Every answered query yields one [`DnsAuditRecord`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use hickory_proto::op::{Edns, Header, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use sluice_api::DomainName;

use super::DnsError;
use super::audit::{DnsAuditRecord, DnsStats, Transport};
use super::bindings::Bindings;
use super::cache::{CacheEntry, CacheKey, DnsCache, MAX_KEY_LEN};
use super::config::DnsConfig;
use super::ech::strip_ech;
use super::exfil::ExfilFilter;
use super::fast::{Patch, WireAnswer, WireQuery, patch_upstream};
use super::forward::{ForwardError, UpstreamAnswer};
use super::policy::{Decision, QueryFilter, QueryInfo, QueryPolicy, QueryStatus, QueryVerdict, RuleLabel};
use super::wire::bound_addrs;
use crate::policy::decision::overrides;
use sluice_api::reason::ReasonCode;

/// Smallest UDP payload every DNS client accepts (RFC 1035 §4.2.1).
const MIN_UDP_PAYLOAD: u16 = 512;
/// Rule name in audit records for messages that never reached the policy.
const PARSER_RULE: &str = "builtin-parser";

/// Where a message came from and when; supplied by the I/O edge.
#[derive(Debug, Clone, Copy)]
pub struct QueryContext {
    pub src: SocketAddr,
    pub transport: Transport,
    /// Arrival, monotonic (the server passes tokio's clock, so tests can pause it).
    pub now: Instant,
    /// Arrival, Unix milliseconds, for the audit record only.
    pub unix_ms: u64,
}

/// What to do with one message.
#[derive(Debug)]
pub enum Step {
    /// Send these bytes back to the client.
    Reply(Reply),
    /// Ask the upstreams, then call [`DnsCore::complete`].
    Forward(Box<Pending>),
    /// Send nothing (no readable header, or not a query).
    Drop,
}

/// An answer for the client, and the audit record describing it.
#[derive(Debug)]
pub struct Reply {
    pub bytes: Vec<u8>,
    pub audit: DnsAuditRecord,
}

#[derive(Debug, Clone, Copy)]
struct ClientEdns {
    payload: u16,
    dnssec_ok: bool,
}

/// The parts of the client's query the answer must echo.
#[derive(Debug, Clone)]
struct ClientQuery {
    id: u16,
    op_code: OpCode,
    recursion_desired: bool,
    checking_disabled: bool,
    authentic_data: bool,
    edns: Option<ClientEdns>,
    query: Option<Query>,
}

impl ClientQuery {
    fn from_header(h: &Header) -> Self {
        Self {
            id: h.metadata.id,
            op_code: h.metadata.op_code,
            recursion_desired: h.metadata.recursion_desired,
            checking_disabled: h.metadata.checking_disabled,
            authentic_data: h.metadata.authentic_data,
            edns: None,
            query: None,
        }
    }

    fn dnssec_ok(&self) -> bool {
        self.edns.is_some_and(|e| e.dnssec_ok)
    }
}

/// An allowed (or watched) query waiting for an upstream answer.
#[derive(Debug)]
pub struct Pending {
    ctx: QueryContext,
    client: ClientQuery,
    qname: DomainName,
    verdict: QueryVerdict,
    watched: bool,
    key: CacheKey,
    /// The question, for the forwarder to check answers against.
    pub question: Query,
    /// The message to send upstream, with ID 0: the forwarder writes a fresh
    /// random ID into the first two bytes for every attempt.
    pub upstream_query: Vec<u8>,
}

/// The DNS proxy's decision and answer logic. Shared by all listener tasks.
pub struct DnsCore {
    config: DnsConfig,
    policy: Arc<dyn QueryPolicy>,
    cache: DnsCache,
    bindings: Arc<Bindings>,
    /// After the policy, in order (the exfiltration detector, when on).
    filters: Vec<Box<dyn QueryFilter>>,
    stats: Arc<DnsStats>,
}

impl std::fmt::Debug for DnsCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsCore")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl DnsCore {
    /// Builds the engine around an existing binding table (the one the data
    /// plane already holds). Make it with `Bindings::with_stats(cfg, stats)`
    /// using the same `stats` so evictions show up in [`DnsStats`]; or let
    /// [`DnsCore::with_new_bindings`] make both. Fails if the config does not
    /// validate.
    pub fn new(
        config: DnsConfig,
        policy: Arc<dyn QueryPolicy>,
        bindings: Arc<Bindings>,
        stats: Arc<DnsStats>,
    ) -> Result<Self, DnsError> {
        config.validate()?;
        Ok(Self {
            cache: DnsCache::new(&config.cache),
            filters: config
                .exfiltration
                .clone()
                .map(|c| Box::new(ExfilFilter::new(c, Arc::clone(&stats))) as Box<dyn QueryFilter>)
                .into_iter()
                .collect(),
            config,
            policy,
            bindings,
            stats,
        })
    }

    /// Builds the engine with a fresh binding table sharing its counters.
    pub fn with_new_bindings(config: DnsConfig, policy: Arc<dyn QueryPolicy>) -> Result<Self, DnsError> {
        let stats = Arc::new(DnsStats::default());
        let bindings = Arc::new(Bindings::with_stats(&config.bindings, Arc::clone(&stats)));
        Self::new(config, policy, bindings, stats)
    }

    /// Adds a query filter after those already there (the plugin host,
    /// tests); before the engine is shared.
    pub fn add_filter(&mut self, filter: Box<dyn QueryFilter>) {
        self.filters.push(filter);
    }

    pub fn config(&self) -> &DnsConfig {
        &self.config
    }

    pub fn stats(&self) -> &Arc<DnsStats> {
        &self.stats
    }

    pub fn bindings(&self) -> &Arc<Bindings> {
        &self.bindings
    }

    /// Handles one message from a client. Never panics, whatever the bytes.
    pub fn handle_query_bytes(&self, ctx: QueryContext, bytes: &[u8]) -> Step {
        let verdict = if self.config.wire_fast_path {
            match self.fast_path(ctx, bytes) {
                Ok(step) => return step,
                Err(verdict) => verdict,
            }
        } else {
            None
        };
        self.general_path(ctx, bytes, verdict)
    }

    /// Answers a plain query from the cache straight from and to wire bytes
    /// (see [`super::fast`]). `Err` hands the query to the general path,
    /// with the policy's verdict if it was already asked (so the policy and
    /// the exfiltration detector see each query once).
    fn fast_path(&self, ctx: QueryContext, bytes: &[u8]) -> Result<Step, Option<QueryVerdict>> {
        let q = WireQuery::parse(bytes).ok_or(None)?;
        let mut key = [0u8; MAX_KEY_LEN];
        let key_len = q.cache_key(&mut key).ok_or(None)?;
        let hit = self.cache.get_bytes(&key[..key_len], ctx.now).ok_or(None)?;
        let entry = &hit.entry;
        let wire = entry
            .wire
            .get_or_init(|| WireAnswer::build(entry, q.qtype, q.qclass))
            .as_ref()
            .ok_or(None)?;
        let client_do = q.edns.is_some_and(|(_, d)| d);
        let ad = entry.authentic_data && (q.authentic_data || client_do);
        let rcode = u16::from(entry.rcode);
        // RA=1, AD, CD echoed, RCODE (cached answers are NOERROR/NXDOMAIN).
        let flags = 0x80 | (u8::from(ad) << 5) | (u8::from(q.checking_disabled) << 4) | (rcode & 0x0f) as u8;
        let limit = self.client_limit(ctx.transport, q.edns.map(|(p, _)| p));
        let Some(bytes) = wire.render(&q, hit.age_secs, flags, self.config.udp_payload, limit) else {
            return Err(None);
        };
        let qname = &entry.qname;
        let verdict = self.decide(ctx, qname, q.qtype);
        if verdict.blocks() {
            return Err(Some(verdict));
        }
        let watched = !verdict.allow;
        DnsStats::bump(&self.stats.queries);
        DnsStats::bump(if watched {
            &self.stats.watched
        } else {
            &self.stats.allowed
        });
        DnsStats::bump(&self.stats.cache_hits);
        DnsStats::bump(&self.stats.cache_fast_hits);
        let src = ctx.src.ip();
        for &(ip, ttl) in &wire.binds {
            self.bindings
                .record_cached(src, ip, qname, ttl, entry.cached_at(), ctx.now);
        }
        let mut audit = self.audit(
            &ctx,
            Arc::clone(&entry.qname_shared),
            q.qtype,
            &verdict,
            watched,
            entry.rcode,
            ctx.now,
        );
        audit.cache_hit = true;
        audit.ech_stripped = entry.ech_stripped;
        Ok(Step::Reply(Reply { bytes, audit }))
    }

    fn general_path(&self, ctx: QueryContext, bytes: &[u8], verdict: Option<QueryVerdict>) -> Step {
        let mut decoder = BinDecoder::new(bytes);
        let Ok(header) = Header::read(&mut decoder) else {
            DnsStats::bump(&self.stats.dropped);
            return Step::Drop;
        };
        if header.metadata.message_type != MessageType::Query {
            // Answering a response could start a loop between two resolvers.
            DnsStats::bump(&self.stats.dropped);
            return Step::Drop;
        }
        DnsStats::bump(&self.stats.queries);
        let mut client = ClientQuery::from_header(&header);
        let Ok(message) = Message::from_vec(bytes) else {
            return Step::Reply(self.refuse_early(ctx, &client, ReasonCode::DnsMalformed));
        };
        client.edns = message.edns.as_ref().map(|e| ClientEdns {
            payload: e.max_payload(),
            dnssec_ok: e.flags().dnssec_ok,
        });
        if message.queries.len() != 1 {
            return Step::Reply(self.refuse_early(ctx, &client, ReasonCode::DnsMalformed));
        }
        client.query = message.queries.first().cloned();
        if client.op_code != OpCode::Query {
            return Step::Reply(self.refuse_early(ctx, &client, ReasonCode::DnsNotImplemented));
        }
        if message.edns.as_ref().is_some_and(|e| e.version() > 0) {
            return Step::Reply(self.refuse_early(ctx, &client, ReasonCode::DnsBadEdnsVersion));
        }
        let Some(query) = client.query.clone() else {
            return Step::Drop;
        };
        let qtype = u16::from(query.query_type());
        let Ok(qname) = DomainName::parse(&query.name().to_ascii()) else {
            return Step::Reply(self.refuse_early(ctx, &client, ReasonCode::DnsInvalidName));
        };
        if matches!(query.query_type(), RecordType::AXFR | RecordType::IXFR) {
            return Step::Reply(self.refuse_early(ctx, &client, ReasonCode::DnsZoneTransfer));
        }
        let verdict = verdict.unwrap_or_else(|| self.decide(ctx, &qname, qtype));
        if verdict.blocks() {
            DnsStats::bump(&self.stats.denied);
            return Step::Reply(self.deny(ctx, &client, &qname, qtype, &verdict));
        }
        let watched = !verdict.allow;
        DnsStats::bump(if watched {
            &self.stats.watched
        } else {
            &self.stats.allowed
        });

        let key = CacheKey::new(
            qname.as_str(),
            qtype,
            u16::from(query.query_class()),
            client.dnssec_ok(),
            client.checking_disabled,
        );
        if let Some(hit) = self.cache.get(&key, ctx.now) {
            DnsStats::bump(&self.stats.cache_hits);
            let entry = &hit.entry;
            let answers = CacheEntry::aged(&entry.answers, hit.age_secs);
            self.bind(ctx.src.ip(), &qname, query.name(), &answers, ctx.now);
            let ad = entry.authentic_data && (client.authentic_data || client.dnssec_ok());
            let answer = AnswerParts {
                rcode: entry.rcode,
                authoritative: false,
                authentic_data: ad,
                answers,
                authorities: CacheEntry::aged(&entry.authorities, hit.age_secs),
                additionals: CacheEntry::aged(&entry.additionals, hit.age_secs),
            };
            let (bytes, rcode) = self.encode_answer(&ctx, &client, answer);
            let mut audit = self.audit(
                &ctx,
                Arc::from(qname.as_str()),
                qtype,
                &verdict,
                watched,
                rcode,
                ctx.now,
            );
            audit.cache_hit = true;
            audit.ech_stripped = entry.ech_stripped;
            return Step::Reply(Reply { bytes, audit });
        }
        DnsStats::bump(&self.stats.cache_misses);

        let mut upstream = Message::new(0, MessageType::Query, OpCode::Query);
        upstream.metadata.recursion_desired = client.recursion_desired;
        upstream.metadata.checking_disabled = client.checking_disabled;
        upstream.metadata.authentic_data = client.authentic_data;
        upstream.add_query(query.clone());
        // Always speak EDNS upstream (bigger answers, fewer TCP retries); the
        // client's own EDNS options are hop-by-hop and are not forwarded.
        let mut edns = Edns::new();
        edns.set_max_payload(self.config.udp_payload);
        edns.set_dnssec_ok(client.dnssec_ok());
        upstream.set_edns(edns);
        let Ok(upstream_query) = upstream.to_vec() else {
            return Step::Reply(self.servfail(ctx, &client, &qname, qtype, &verdict, watched, None, ctx.now));
        };
        Step::Forward(Box::new(Pending {
            ctx,
            client,
            qname,
            verdict,
            watched,
            key,
            question: query,
            upstream_query,
        }))
    }

    /// Finishes a forwarded query with the forwarder's outcome.
    pub fn complete(&self, pending: Pending, outcome: Result<UpstreamAnswer, ForwardError>, now: Instant) -> Reply {
        let Pending {
            ctx,
            client,
            qname,
            verdict,
            watched,
            key,
            question,
            ..
        } = pending;
        let qtype = key.qtype();
        let answer = match outcome {
            Ok(answer) => answer,
            Err(_) => {
                return self.servfail(ctx, &client, &qname, qtype, &verdict, watched, None, now);
            }
        };
        let UpstreamAnswer {
            mut message,
            upstream,
            wire,
        } = answer;
        let rcode = message.metadata.response_code;
        let mut ech_stripped = false;
        if self.config.strip_ech {
            ech_stripped |= strip_ech(&mut message.answers);
            ech_stripped |= strip_ech(&mut message.additionals);
            if ech_stripped {
                DnsStats::bump(&self.stats.ech_stripped);
            }
        }
        if client.recursion_desired && !message.metadata.truncation {
            self.cache.insert(
                key,
                &qname,
                rcode,
                message.metadata.authentic_data,
                &message.answers,
                &message.authorities,
                &message.additionals,
                ech_stripped,
                now,
            );
        }
        if rcode == ResponseCode::NoError {
            self.bind(ctx.src.ip(), &qname, question.name(), &message.answers, now);
        }
        let ad = message.metadata.authentic_data && (client.authentic_data || client.dnssec_ok());
        // A plain answer goes on as the upstream sent it, header and OPT
        // rewritten; its question must be ours exactly (case included, as the
        // general path would echo it).
        if self.config.wire_fast_path
            && !ech_stripped
            && !wire.is_empty()
            && u16::from(rcode) < 16
            && message
                .queries
                .first()
                .is_some_and(|q| q.name().eq_case(question.name()))
        {
            let patch = Patch {
                id: client.id,
                recursion_desired: client.recursion_desired,
                checking_disabled: client.checking_disabled,
                authentic_data: ad,
                edns: client.edns.map(|e| e.dnssec_ok),
                payload: self.config.udp_payload,
                limit: self.client_limit(ctx.transport, client.edns.map(|e| e.payload)),
            };
            if let Some(bytes) = patch_upstream(&wire, &patch) {
                if rcode == ResponseCode::ServFail {
                    DnsStats::bump(&self.stats.servfail);
                }
                DnsStats::bump(&self.stats.upstream_passthrough);
                let mut audit = self.audit(&ctx, Arc::from(qname.as_str()), qtype, &verdict, watched, rcode, now);
                audit.upstream = Some(upstream);
                return Reply { bytes, audit };
            }
        }
        let parts = AnswerParts {
            rcode,
            authoritative: message.metadata.authoritative,
            authentic_data: ad,
            answers: message.answers,
            authorities: message.authorities,
            additionals: message.additionals,
        };
        let (bytes, rcode) = self.encode_answer(&ctx, &client, parts);
        if rcode == ResponseCode::ServFail {
            DnsStats::bump(&self.stats.servfail);
        }
        let mut audit = self.audit(&ctx, Arc::from(qname.as_str()), qtype, &verdict, watched, rcode, now);
        audit.upstream = Some(upstream);
        audit.ech_stripped = ech_stripped;
        Reply { bytes, audit }
    }

    /// The policy's verdict, then each query filter's word on it by the
    /// override rules.
    fn decide(&self, ctx: QueryContext, qname: &DomainName, qtype: u16) -> QueryVerdict {
        // A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d; the
        // policy's SmartGroups are written with plain IPv4 CIDRs.
        let src = ctx.src.ip().to_canonical();
        let mut verdict = self.policy.decide(src, qname, qtype);
        let info = QueryInfo {
            src,
            qname,
            qtype,
            now: ctx.now,
        };
        for f in &self.filters {
            let (mut new, loosening) = match f.on_query(&info, &verdict) {
                QueryStatus::Continue => continue,
                QueryStatus::Deny(d) => (d, false),
                QueryStatus::Allow(d) => (d, true),
            };
            // A filter's notes reach the record whether or not its word
            // stands.
            let notes = new.notes.take();
            let new = new.in_mode(self.policy.mode());
            if overrides(&verdict, &new, loosening, |_| self.policy.delegates(&verdict, f.name())) {
                let kept = verdict.notes.take();
                verdict = new;
                verdict.notes = kept;
            }
            if let Some(n) = notes {
                verdict.notes.get_or_insert_with(Box::default).extend(*n);
            }
        }
        verdict
    }

    /// Records every address handed out for `wire_qname` (following CNAMEs,
    /// and including HTTPS/SVCB address hints) as bound to `qname` for `src`.
    fn bind(&self, src: IpAddr, qname: &DomainName, wire_qname: &Name, answers: &[Record], now: Instant) {
        for (ip, ttl) in bound_addrs(wire_qname, answers) {
            self.bindings.record(src, ip, qname, ttl, now);
        }
    }

    fn deny(
        &self,
        ctx: QueryContext,
        client: &ClientQuery,
        qname: &DomainName,
        qtype: u16,
        verdict: &QueryVerdict,
    ) -> Reply {
        let question = client.query.as_ref();
        let denial = crate::edge::dns_denial(self.config.deny_answer, question.map(Query::query_type));
        let mut parts = AnswerParts::empty(denial.rcode);
        if let (Some(q), Some(address)) = (question, denial.address) {
            let rdata = match address {
                IpAddr::V4(v4) => RData::A(A(v4)),
                IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
            };
            parts
                .answers
                .push(Record::from_rdata(q.name().clone(), self.config.deny_ttl, rdata));
        }
        let (bytes, rcode) = self.encode_answer(&ctx, client, parts);
        let audit = self.audit(&ctx, Arc::from(qname.as_str()), qtype, verdict, false, rcode, ctx.now);
        Reply { bytes, audit }
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "all are the query's identity for the audit record"
    )]
    fn servfail(
        &self,
        ctx: QueryContext,
        client: &ClientQuery,
        qname: &DomainName,
        qtype: u16,
        verdict: &QueryVerdict,
        watched: bool,
        upstream: Option<SocketAddr>,
        now: Instant,
    ) -> Reply {
        DnsStats::bump(&self.stats.servfail);
        let (bytes, rcode) = self.encode_answer(&ctx, client, AnswerParts::empty(crate::edge::DNS_FAILURE));
        let mut audit = self.audit(&ctx, Arc::from(qname.as_str()), qtype, verdict, watched, rcode, now);
        audit.upstream = upstream;
        Reply { bytes, audit }
    }

    /// Answers a message that never reached the policy (bad form, opcode,
    /// EDNS version or name).
    fn refuse_early(&self, ctx: QueryContext, client: &ClientQuery, why: ReasonCode) -> Reply {
        let rcode = crate::edge::dns_refusal(why);
        if rcode == ResponseCode::FormErr {
            DnsStats::bump(&self.stats.formerr);
        } else {
            DnsStats::bump(&self.stats.denied);
        }
        let (bytes, rcode) = self.encode_answer(&ctx, client, AnswerParts::empty(rcode));
        let (qname, qtype) = client
            .query
            .as_ref()
            .map(|q| (q.name().to_ascii(), u16::from(q.query_type())))
            .unwrap_or_default();
        let verdict = Decision {
            allow: false,
            rule: RuleLabel::Builtin(PARSER_RULE),
            reason: why,
            enforcement: crate::policy::Enforcement::Enforced,
            check: None,
            source: None,
            notes: None,
        };
        let audit = self.audit(&ctx, Arc::from(qname), qtype, &verdict, false, rcode, ctx.now);
        Reply { bytes, audit }
    }

    /// Encodes an answer for this client: echoes ID, opcode, RD, CD and the
    /// question; answers EDNS with EDNS (DO echoed); fits UDP answers into
    /// the client's payload size, dropping the additional section first and
    /// setting TC only if the answer itself does not fit (RFC 2181 §9).
    /// Returns the bytes and the rcode actually sent.
    fn encode_answer(&self, ctx: &QueryContext, client: &ClientQuery, parts: AnswerParts) -> (Vec<u8>, ResponseCode) {
        let mut m = Message::response(client.id, client.op_code);
        m.metadata.recursion_desired = client.recursion_desired;
        m.metadata.recursion_available = true;
        m.metadata.checking_disabled = client.checking_disabled;
        m.metadata.authentic_data = parts.authentic_data;
        m.metadata.authoritative = parts.authoritative;
        m.metadata.response_code = parts.rcode;
        if let Some(q) = &client.query {
            m.add_query(q.clone());
        }
        m.answers = parts.answers;
        m.authorities = parts.authorities;
        m.additionals = parts.additionals;
        if let Some(ce) = client.edns {
            let mut edns = Edns::new();
            edns.set_max_payload(self.config.udp_payload);
            edns.set_dnssec_ok(ce.dnssec_ok);
            m.set_edns(edns);
        }
        let limit = self.client_limit(ctx.transport, client.edns.map(|e| e.payload));
        if let Some(bytes) = encode_within(&mut m, limit) {
            return (bytes, m.metadata.response_code);
        }
        // The answer could not be encoded at all (e.g. a record hickory
        // cannot emit): tell the client we failed rather than go silent.
        let mut fail = Message::error_msg(client.id, client.op_code, crate::edge::DNS_FAILURE);
        fail.metadata.recursion_desired = client.recursion_desired;
        fail.metadata.recursion_available = true;
        if let Some(q) = &client.query {
            fail.add_query(q.clone());
        }
        (fail.to_vec().unwrap_or_default(), ResponseCode::ServFail)
    }

    /// Largest answer a client takes: 64 KiB over TCP; over UDP its EDNS
    /// size (512 without EDNS), within [512, ours].
    fn client_limit(&self, transport: Transport, edns_payload: Option<u16>) -> usize {
        match transport {
            Transport::Tcp => usize::from(u16::MAX),
            Transport::Udp => {
                let ours = self.config.udp_payload.max(MIN_UDP_PAYLOAD);
                let theirs = edns_payload.unwrap_or(MIN_UDP_PAYLOAD);
                usize::from(theirs.clamp(MIN_UDP_PAYLOAD, ours))
            }
        }
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "the audit record's fields, gathered in one place"
    )]
    fn audit(
        &self,
        ctx: &QueryContext,
        qname: Arc<str>,
        qtype: u16,
        verdict: &QueryVerdict,
        watched: bool,
        rcode: ResponseCode,
        now: Instant,
    ) -> DnsAuditRecord {
        let latency = now.saturating_duration_since(ctx.now).as_micros();
        DnsAuditRecord {
            time_unix_ms: ctx.unix_ms,
            source: ctx.src,
            transport: ctx.transport,
            qname,
            qtype,
            allowed: verdict.allow,
            enforced: verdict.enforcement == crate::policy::Enforcement::Enforced,
            watched,
            rule: match &verdict.rule {
                RuleLabel::Policy(r) => Arc::clone(r),
                RuleLabel::Builtin(r) => Arc::from(*r),
            },
            reason: verdict.reason.as_str(),
            rcode: u16::from(rcode),
            upstream: None,
            latency_us: u64::try_from(latency).unwrap_or(u64::MAX),
            cache_hit: false,
            ech_stripped: false,
            annotations: verdict.notes.clone(),
        }
    }
}

#[derive(Debug)]
struct AnswerParts {
    rcode: ResponseCode,
    authoritative: bool,
    authentic_data: bool,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    additionals: Vec<Record>,
}

impl AnswerParts {
    fn empty(rcode: ResponseCode) -> Self {
        Self {
            rcode,
            authoritative: false,
            authentic_data: false,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
        }
    }
}

/// Encodes `m` in at most `limit` bytes: whole, else without the additional
/// section (OPT is kept), else header + question + OPT with TC set.
fn encode_within(m: &mut Message, limit: usize) -> Option<Vec<u8>> {
    let full = m.to_vec().ok()?;
    if full.len() <= limit {
        return Some(full);
    }
    if !m.additionals.is_empty() {
        m.additionals.clear();
        if let Ok(bytes) = m.to_vec()
            && bytes.len() <= limit
        {
            return Some(bytes);
        }
    }
    m.answers.clear();
    m.authorities.clear();
    m.metadata.truncation = true;
    m.to_vec().ok()
}
