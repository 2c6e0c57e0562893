//! Differential conformance with stock Envoy: the scenarios of
//! `conformance/envoy/` give the same Envoy resources to Envoy and to
//! Sluice (both over ADS from `sluice-xds`), send the same connections
//! through both, and compare where each connection ends up. The format is
//! described in `conformance/envoy/README.md`.
//!
//! The parts without I/O — reading a scenario, filling its placeholders,
//! judging outcomes, reading `KNOWN_DIFFERENCES.md`, drawing the table —
//! come first; the processes (upstreams, `sluice-xds`, Envoy, Sluice) and
//! the client that makes the connections come after. Every child process
//! is killed by its PID when its handle drops, every wait has a deadline,
//! and nothing is sent anywhere but 127.0.0.0/8.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub use crate::envoy_binary::envoy_binary;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_saphyr::Spanned;

/// How long one connection (connect, send, read the answer) may take.
pub const FLOW_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an implementation may take to start and run every listener.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an upstream waits for the client's first bytes before it
/// answers anyway.
const UPSTREAM_PATIENCE: Duration = Duration::from_millis(300);
/// The name of the listener a Sluice gateway's own file must hold (a file
/// without listeners does not run); the listeners sent over LDS replace it.
pub const PLACEHOLDER_LISTENER: &str = "conformance-placeholder";
/// The node id both implementations present to `sluice-xds`.
pub const NODE_ID: &str = "conformance";

// ---------------------------------------------------------------------------
// Scenarios

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    description: String,
    upstreams: Vec<String>,
    resources: String,
    #[serde(default)]
    flows: Vec<Spanned<RawFlow>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlow {
    listener: String,
    #[serde(default)]
    sni: Option<String>,
    #[serde(default)]
    alpn: Option<Vec<String>>,
    #[serde(default)]
    tls: bool,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    bytes: Option<String>,
    #[serde(default)]
    count: Option<usize>,
    expect: Expect,
    #[serde(default)]
    note: Option<String>,
}

/// What a connection sends once connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// Nothing: the client only reads.
    Nothing,
    /// A real TLS ClientHello (rustls), with this SNI (none when `None`)
    /// and these ALPN protocols.
    Hello { sni: Option<String>, alpn: Vec<String> },
    /// These bytes.
    Bytes(Vec<u8>),
}

/// One flow: `count` connections, one after the other, to a listener.
#[derive(Debug, Clone)]
pub struct Flow {
    pub listener: String,
    pub payload: Payload,
    /// The loopback address the client binds to; the kernel's choice
    /// (127.0.0.1) when `None`.
    pub source: Option<Ipv4Addr>,
    pub count: usize,
    pub expect: Expect,
    pub note: Option<String>,
    /// Line of the flow in its file.
    pub line: u64,
}

/// Where the connections of a flow must end up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Every connection reaches this upstream, or (`closed`) is closed by
    /// the proxy without any upstream answering.
    All(String),
    /// Exactly so many connections reach each upstream (round robin).
    Counts(BTreeMap<String, usize>),
    /// Every named upstream gets at least one connection, no other
    /// upstream gets any, and none is closed (random choices).
    Spread(BTreeSet<String>),
}

/// The outcome word for a connection the proxy closed unanswered.
pub const CLOSED: &str = "closed";

impl<'de> Deserialize<'de> for Expect {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Expect;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an upstream name, `closed`, a map of upstream names to counts, or {spread: [names]}")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Expect, E> {
                Ok(Expect::All(v.to_owned()))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Expect, A::Error> {
                let mut counts = BTreeMap::new();
                let mut spread = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key == "spread" {
                        spread = Some(map.next_value::<Vec<String>>()?);
                    } else if counts.insert(key.clone(), map.next_value::<usize>()?).is_some() {
                        return Err(de::Error::custom(format!("`{key}` is given twice")));
                    }
                }
                match spread {
                    Some(_) if !counts.is_empty() => Err(de::Error::custom("`spread` cannot be mixed with counts")),
                    Some(names) => Ok(Expect::Spread(names.into_iter().collect())),
                    None if counts.is_empty() => Err(de::Error::custom("an empty expectation")),
                    None => Ok(Expect::Counts(counts)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All(name) => f.write_str(name),
            Self::Counts(counts) => write_counts(f, counts.iter().map(|(k, v)| (k.as_str(), *v))),
            Self::Spread(names) => {
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                write!(f, "spread [{}]", names.join(", "))
            }
        }
    }
}

fn write_counts<'a>(f: &mut fmt::Formatter<'_>, counts: impl Iterator<Item = (&'a str, usize)>) -> fmt::Result {
    let parts: Vec<String> = counts.map(|(k, v)| format!("{k}: {v}")).collect();
    write!(f, "{{{}}}", parts.join(", "))
}

/// A scenario file, checked.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// File name, e.g. `chain-server-names.yaml`.
    pub file: String,
    pub description: String,
    pub upstreams: Vec<String>,
    /// Envoy resources in Envoy's YAML form, placeholders unfilled.
    pub resources: String,
    pub flows: Vec<Flow>,
}

impl Scenario {
    /// The file name without `.yaml`: the name of the resources file.
    pub fn stem(&self) -> &str {
        self.file.strip_suffix(".yaml").unwrap_or(&self.file)
    }

    /// The listeners the flows use.
    pub fn listeners(&self) -> BTreeSet<String> {
        self.flows.iter().map(|f| f.listener.clone()).collect()
    }
}

/// Reads every `*.yaml` in `dir`, sorted by name.
pub fn load_dir(dir: &Path) -> Result<Vec<Scenario>, String> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| {
            let file = p
                .file_name()
                .map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into_owned());
            let text = std::fs::read_to_string(p).map_err(|e| format!("{file}: {e}"))?;
            parse_scenario(&file, &text)
        })
        .collect()
}

/// Parses and checks one scenario file.
pub fn parse_scenario(file: &str, text: &str) -> Result<Scenario, String> {
    let raw: RawScenario = serde_saphyr::from_str(text).map_err(|e| format!("{file}: {e}"))?;
    let mut upstreams = BTreeSet::new();
    for u in &raw.upstreams {
        let ok = !u.is_empty() && u.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !ok {
            return Err(format!("{file}: upstream `{u}`: use letters, digits, - and _"));
        }
        if u == CLOSED || u == "spread" {
            return Err(format!("{file}: `{u}` cannot name an upstream"));
        }
        if !upstreams.insert(u.as_str()) {
            return Err(format!("{file}: upstream `{u}` is listed twice"));
        }
    }
    for p in placeholders(&raw.resources).map_err(|e| format!("{file}: resources: {e}"))? {
        if let Placeholder::Upstream(name) = p
            && !upstreams.contains(name.as_str())
        {
            return Err(format!(
                "{file}: resources: `${{upstream.{name}}}` names no upstream of `upstreams:`"
            ));
        }
    }
    let flows = raw
        .flows
        .into_iter()
        .enumerate()
        .map(|(i, f)| {
            let line = f.referenced.line();
            check_flow(f.value, line, &upstreams).map_err(|e| format!("{file}:{line} flows[{i}]: {e}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Scenario {
        file: file.to_owned(),
        description: raw.description,
        upstreams: raw.upstreams,
        resources: raw.resources,
        flows,
    })
}

fn check_flow(raw: RawFlow, line: u64, upstreams: &BTreeSet<&str>) -> Result<Flow, String> {
    let hello = raw.sni.is_some() || raw.alpn.is_some() || raw.tls;
    let payload = match (hello, raw.bytes) {
        (true, Some(_)) => return Err("`bytes` cannot be sent with `sni`, `alpn` or `tls`".to_owned()),
        (false, Some(b)) => Payload::Bytes(b.into_bytes()),
        (true, None) => Payload::Hello {
            sni: raw.sni,
            alpn: raw.alpn.unwrap_or_default(),
        },
        (false, None) => Payload::Nothing,
    };
    let source = match raw.source {
        None => None,
        Some(s) => {
            let ip: Ipv4Addr = s.parse().map_err(|_| format!("source `{s}` is not an IPv4 address"))?;
            // Nothing is ever sent from or to anywhere but loopback.
            if !ip.is_loopback() {
                return Err(format!("source `{s}` is not in 127.0.0.0/8"));
            }
            Some(ip)
        }
    };
    let count = raw.count.unwrap_or(1);
    if count == 0 {
        return Err("`count` must be at least 1".to_owned());
    }
    let known = |name: &str| -> Result<(), String> {
        if upstreams.contains(name) {
            Ok(())
        } else {
            Err(format!("`{name}` is not one of the scenario's upstreams"))
        }
    };
    match &raw.expect {
        Expect::All(name) if name == CLOSED => {}
        Expect::All(name) => known(name)?,
        Expect::Counts(counts) => {
            for name in counts.keys() {
                if name != CLOSED {
                    known(name)?;
                }
            }
            let sum: usize = counts.values().sum();
            if sum != count {
                return Err(format!("the expected counts add up to {sum}, but `count` is {count}"));
            }
        }
        Expect::Spread(names) => {
            for name in names {
                known(name)?;
            }
            if names.len() > count {
                return Err(format!("{count} connections cannot reach {} upstreams", names.len()));
            }
        }
    }
    Ok(Flow {
        listener: raw.listener,
        payload,
        source,
        count,
        expect: raw.expect,
        note: raw.note,
        line,
    })
}

// ---------------------------------------------------------------------------
// Placeholders

/// A `${…}` in the resources.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Placeholder {
    /// `${upstream.NAME}`: the port of upstream NAME.
    Upstream(String),
    /// `${port.NAME}`: a free loopback port the runner picks, the same
    /// wherever NAME appears (for a listener that a chain's
    /// `destination_port` must name).
    Port(String),
}

/// Every placeholder in `text`, in order.
pub fn placeholders(text: &str) -> Result<Vec<Placeholder>, String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("${") {
        let after = &rest[at + 2..];
        let Some(end) = after.find('}') else {
            return Err("a `${` without its `}`".to_owned());
        };
        let inner = &after[..end];
        let p = match inner.split_once('.') {
            Some(("upstream", name)) if !name.is_empty() => Placeholder::Upstream(name.to_owned()),
            Some(("port", name)) if !name.is_empty() => Placeholder::Port(name.to_owned()),
            _ => {
                return Err(format!(
                    "`${{{inner}}}` is not `${{upstream.NAME}}` or `${{port.NAME}}`"
                ));
            }
        };
        out.push(p);
        rest = &after[end + 1..];
    }
    Ok(out)
}

/// `text` with every placeholder replaced by its port.
pub fn fill(text: &str, ports: &BTreeMap<Placeholder, u16>) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let all = placeholders(text)?;
    for p in all {
        let (kind, name) = match &p {
            Placeholder::Upstream(n) => ("upstream", n),
            Placeholder::Port(n) => ("port", n),
        };
        let token = format!("${{{kind}.{name}}}");
        let Some(at) = rest.find(&token) else {
            return Err(format!("{token} not found"));
        };
        let port = ports.get(&p).ok_or_else(|| format!("no port for {token}"))?;
        out.push_str(&rest[..at]);
        out.push_str(&port.to_string());
        rest = &rest[at + token.len()..];
    }
    out.push_str(rest);
    Ok(out)
}

// ---------------------------------------------------------------------------
// Outcomes

/// How one connection ended.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// This upstream answered (its name came back).
    Upstream(String),
    /// The proxy closed the connection (FIN or RST) and no upstream
    /// answered.
    Closed,
    /// Nothing came back and nothing was closed within [`FLOW_TIMEOUT`].
    Timeout,
    /// The connection could not be made, or the answer was no upstream's.
    Error(String),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Upstream(name) => f.write_str(name),
            Self::Closed => f.write_str(CLOSED),
            Self::Timeout => f.write_str("timeout"),
            Self::Error(e) => write!(f, "error ({e})"),
        }
    }
}

/// The outcomes of a flow's connections, counted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally(pub BTreeMap<Outcome, usize>);

impl Tally {
    pub fn add(&mut self, o: Outcome) {
        *self.0.entry(o).or_default() += 1;
    }

    /// The same outcome for every one of `count` connections (a flow that
    /// could not run at all).
    pub fn all(o: Outcome, count: usize) -> Self {
        Self(BTreeMap::from([(o, count)]))
    }

    fn short(o: &Outcome) -> String {
        match o {
            Outcome::Error(_) => "error".to_owned(),
            o => o.to_string(),
        }
    }

    /// For the table: the outcome of a single connection, or counts.
    pub fn render(&self, count: usize) -> String {
        match self.0.iter().next() {
            Some((o, _)) if count == 1 && self.0.len() == 1 => Self::short(o),
            _ => {
                let parts: Vec<String> = self.0.iter().map(|(o, n)| format!("{}: {n}", Self::short(o))).collect();
                format!("{{{}}}", parts.join(", "))
            }
        }
    }

    /// The error messages among the outcomes.
    pub fn errors(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|o| match o {
                Outcome::Error(e) => Some(e.as_str()),
                _ => None,
            })
            .collect()
    }
}

fn outcome_of(name: &str) -> Outcome {
    if name == CLOSED {
        Outcome::Closed
    } else {
        Outcome::Upstream(name.to_owned())
    }
}

/// Whether `got` is what `flow` expects; `Err` says how it is not.
pub fn check(flow: &Flow, got: &Tally) -> Result<(), String> {
    let ok = match &flow.expect {
        Expect::All(name) => *got == Tally::all(outcome_of(name), flow.count),
        Expect::Counts(counts) => {
            let want: BTreeMap<Outcome, usize> = counts.iter().map(|(k, v)| (outcome_of(k), *v)).collect();
            got.0 == want
        }
        Expect::Spread(names) => {
            let reached: BTreeSet<&Outcome> = got.0.keys().collect();
            let want: Vec<Outcome> = names.iter().map(|n| Outcome::Upstream(n.clone())).collect();
            reached.len() == want.len() && want.iter().all(|w| reached.contains(w))
        }
    };
    if ok {
        Ok(())
    } else {
        Err(format!("expected {}, got {}", flow.expect, got.render(flow.count)))
    }
}

/// Whether two implementations did the same with a flow: the same counts,
/// or for a `spread` (random choices) the same upstreams reached.
pub fn agree(flow: &Flow, a: &Tally, b: &Tally) -> bool {
    match flow.expect {
        Expect::Spread(_) => a.0.keys().collect::<BTreeSet<_>>() == b.0.keys().collect::<BTreeSet<_>>(),
        _ => a == b,
    }
}

// ---------------------------------------------------------------------------
// Known differences

/// A flow Sluice is known to handle differently from Envoy, with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownDifference {
    pub file: String,
    pub index: usize,
    pub reason: String,
}

/// Parses `KNOWN_DIFFERENCES.md`: every line of the form
/// ``- `file.yaml#3`: reason`` is a difference; other lines are prose.
pub fn parse_known_differences(text: &str) -> Result<Vec<KnownDifference>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let Some(rest) = line.trim().strip_prefix("- `") else {
            continue;
        };
        let at = |m: String| format!("KNOWN_DIFFERENCES.md:{}: {m}", n + 1);
        let Some((id, reason)) = rest.split_once('`') else {
            return Err(at("expected - `file.yaml#N`: reason".to_owned()));
        };
        let Some((file, index)) = id.split_once('#') else {
            return Err(at(format!("`{id}` is not file.yaml#N")));
        };
        let index = index
            .parse()
            .map_err(|_| at(format!("`{index}` is not a flow index")))?;
        let reason = reason.trim_start_matches(':').trim().to_owned();
        if reason.is_empty() {
            return Err(at("a difference needs a reason".to_owned()));
        }
        out.push(KnownDifference {
            file: file.to_owned(),
            index,
            reason,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Results and the table

/// The implementations under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Side {
    Envoy,
    Sluice,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Envoy => "envoy",
            Self::Sluice => "sluice",
        }
    }
}

/// What each implementation that ran did with each flow of a scenario.
#[derive(Debug, Clone, Default)]
pub struct ScenarioResult {
    /// Per side: one tally per flow, or why the side could not run the
    /// scenario at all.
    pub sides: BTreeMap<Side, Result<Vec<Tally>, String>>,
}

impl ScenarioResult {
    /// The tally of flow `i` on `side`; `None` when the side did not run.
    pub fn tally(&self, side: Side, i: usize, count: usize) -> Option<Tally> {
        match self.sides.get(&side)? {
            Ok(t) => t.get(i).cloned(),
            Err(_) => Some(Tally::all(Outcome::Error("did not start".to_owned()), count)),
        }
    }
}

/// A flow that went wrong (or a scenario, when `index` is `None`),
/// located.
#[derive(Debug, Clone)]
pub struct Mismatch {
    pub file: String,
    pub index: Option<usize>,
    pub line: u64,
    pub message: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.index {
            Some(i) => write!(f, "{}:{} flows[{i}]: {}", self.file, self.line, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// The verdict over every scenario run.
#[derive(Debug, Default)]
pub struct Report {
    pub files: usize,
    pub flows: usize,
    /// Per side, flows whose outcome is the expected one.
    pub passed: BTreeMap<Side, usize>,
    /// Known differences that still differ, as listed, with their reason.
    pub skipped: Vec<(Mismatch, String)>,
    pub mismatches: Vec<Mismatch>,
}

/// Judges a scenario's results: Envoy must do what the scenario expects
/// (it is the reference; nothing excuses it), Sluice must do the same
/// unless the flow is a listed known difference, and a listed flow that
/// now agrees is a mismatch (the list must not go stale). A side that
/// could not run the scenario is one mismatch for the scenario (for
/// Sluice: unless every flow is listed).
pub fn judge(report: &mut Report, s: &Scenario, r: &ScenarioResult, known: &[KnownDifference]) {
    report.files += 1;
    report.flows += s.flows.len();
    let listed = |i: usize| known.iter().find(|k| k.file == s.file && k.index == i);
    let at = |i: usize, message: String| Mismatch {
        file: s.file.clone(),
        index: Some(i),
        line: s.flows[i].line,
        message,
    };
    let whole = |message: String| Mismatch {
        file: s.file.clone(),
        index: None,
        line: 0,
        message,
    };
    let envoy = r.sides.get(&Side::Envoy);
    match envoy {
        None => {}
        Some(Err(e)) => report
            .mismatches
            .push(whole(format!("envoy could not run the scenario: {e}"))),
        Some(Ok(tallies)) => {
            for (i, (flow, t)) in s.flows.iter().zip(tallies).enumerate() {
                match check(flow, t) {
                    Ok(()) => *report.passed.entry(Side::Envoy).or_default() += 1,
                    Err(e) => report.mismatches.push(at(i, format!("envoy: {e}{}", errors_of(t)))),
                }
            }
        }
    }
    let envoy = match envoy {
        Some(Ok(t)) => Some(t),
        _ => None,
    };
    match r.sides.get(&Side::Sluice) {
        None => {}
        Some(Err(e)) => {
            let mut unlisted = false;
            for i in 0..s.flows.len() {
                match listed(i) {
                    Some(k) => report
                        .skipped
                        .push((at(i, "sluice could not run the scenario".to_owned()), k.reason.clone())),
                    None => unlisted = true,
                }
            }
            if unlisted {
                report
                    .mismatches
                    .push(whole(format!("sluice could not run the scenario: {e}")));
            }
        }
        Some(Ok(tallies)) => {
            for (i, (flow, t)) in s.flows.iter().zip(tallies).enumerate() {
                let mut wrong = Vec::new();
                if let Err(e) = check(flow, t) {
                    wrong.push(format!("sluice: {e}{}", errors_of(t)));
                }
                if let Some(e) = envoy.and_then(|e| e.get(i))
                    && !agree(flow, e, t)
                {
                    wrong.push(format!(
                        "sluice did {} where envoy did {}",
                        t.render(flow.count),
                        e.render(flow.count)
                    ));
                }
                match (wrong.is_empty(), listed(i)) {
                    (true, None) => *report.passed.entry(Side::Sluice).or_default() += 1,
                    (true, Some(k)) => report.mismatches.push(at(
                        i,
                        format!(
                            "listed in KNOWN_DIFFERENCES.md ({}) but Sluice now agrees; remove it from the list",
                            k.reason
                        ),
                    )),
                    (false, None) => report.mismatches.push(at(i, wrong.join("; "))),
                    (false, Some(k)) => report.skipped.push((at(i, wrong.join("; ")), k.reason.clone())),
                }
            }
        }
    }
}

fn errors_of(t: &Tally) -> String {
    let e = t.errors();
    if e.is_empty() {
        String::new()
    } else {
        format!(" [{}]", e.join("; "))
    }
}

/// How a flow is shown in the table.
pub fn describe(flow: &Flow) -> String {
    let mut out = flow.listener.clone();
    match &flow.payload {
        Payload::Nothing => out.push_str(" (nothing sent)"),
        Payload::Hello { sni, alpn } => {
            match sni {
                Some(s) => out.push_str(&format!(" sni={s}")),
                None => out.push_str(" tls, no sni"),
            }
            if !alpn.is_empty() {
                out.push_str(&format!(" alpn={}", alpn.join(",")));
            }
        }
        Payload::Bytes(b) => {
            let text = String::from_utf8_lossy(b);
            let first = text.lines().next().unwrap_or_default();
            let shown: String = first.chars().take(20).collect();
            out.push_str(&format!(" bytes={shown:?}"));
        }
    }
    if let Some(src) = flow.source {
        out.push_str(&format!(" from {src}"));
    }
    if flow.count > 1 {
        out.push_str(&format!(" x{}", flow.count));
    }
    out
}

/// The scenario's table: flow, Envoy's outcome, Sluice's, the expected
/// one, with `!` after an outcome that is not the expected one.
pub fn table(s: &Scenario, r: &ScenarioResult) -> String {
    let mut rows = vec![[
        "#".to_owned(),
        "flow".to_owned(),
        "envoy".to_owned(),
        "sluice".to_owned(),
        "expected".to_owned(),
    ]];
    for (i, flow) in s.flows.iter().enumerate() {
        let cell = |side: Side| match r.tally(side, i, flow.count) {
            None => "-".to_owned(),
            Some(t) => {
                let mark = if check(flow, &t).is_ok() { "" } else { " !" };
                format!("{}{mark}", t.render(flow.count))
            }
        };
        rows.push([
            i.to_string(),
            describe(flow),
            cell(Side::Envoy),
            cell(Side::Sluice),
            flow.expect.to_string(),
        ]);
    }
    let mut widths = [0usize; 5];
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let words = s.description.split_whitespace().collect::<Vec<_>>().join(" ");
    // The first sentence; the file says the rest.
    let headline = words.split_once(". ").map_or(words.as_str(), |(first, _)| first);
    let mut out = format!("{} — {}\n", s.file, headline.trim_end_matches('.'));
    for row in &rows {
        let mut line = String::from("  ");
        for (j, (c, w)) in row.iter().zip(widths).enumerate() {
            if j + 1 == row.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    for (side, res) in &r.sides {
        if let Err(e) = res {
            // The first line; the failure message has the logs.
            let first = e.lines().next().unwrap_or_default();
            out.push_str(&format!("  {} did not run the scenario: {first}\n", side.as_str()));
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Processes

/// A child process, killed (by its PID) and reaped when dropped; its
/// output goes to a log file.
#[derive(Debug)]
pub struct Proc {
    what: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdin closed and stdout and stderr in `log`.
    pub fn spawn(what: &str, mut cmd: Command, log: &Path) -> Result<Self, String> {
        let file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = file.try_clone().map_err(|e| format!("{}: {e}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {what} ({:?}): {e}", cmd.get_program()))?;
        Ok(Self {
            what: what.to_owned(),
            child,
            log: log.to_path_buf(),
        })
    }

    /// The exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The whole log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log, headed by the process's name.
    pub fn tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(n);
        format!(
            "--- {} ({}), last lines ---\n{}",
            self.what,
            self.log.display(),
            lines[from..].join("\n")
        )
    }

    /// Waits until a log line contains `marker` and returns what follows
    /// it on that line.
    pub fn wait_for_line(&mut self, marker: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(rest) = self
                .log()
                .lines()
                .find_map(|l| l.split_once(marker).map(|(_, r)| r.trim().to_owned()))
            {
                return Ok(rest);
            }
            if let Some(st) = self.exited() {
                return Err(format!(
                    "{} exited ({st}) before saying `{marker}`\n{}",
                    self.what,
                    self.tail(40)
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} did not say `{marker}` within {timeout:?}\n{}",
                    self.what,
                    self.tail(40)
                ));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Where the binaries are.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub sluice_xds: PathBuf,
    pub sluice: PathBuf,
    /// Envoy; `None` when there is none.
    pub envoy: Option<PathBuf>,
}

/// The directory the cargo profile of the running test writes its
/// binaries to (`target/debug`): two levels above the test executable
/// (`target/debug/deps/envoy_differential-…`).
pub fn profile_dir() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("where am I: {e}"))?;
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or_else(|| format!("{} has no profile directory", exe.display()))
}

/// Builds binaries of the workspace with the cargo that runs the tests,
/// into the same target directory and profile (cargo's lock serialises
/// this with any other build). An integration test of this crate cannot
/// have cargo build another package's binaries (`CARGO_BIN_EXE_*` is only
/// for the crate's own), so it asks cargo itself; cargo has released its
/// build lock by the time the tests run.
pub fn build(workspace: &Path, profile_dir: &Path, bins: &[(&str, &str)]) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(workspace).arg("build").arg("--quiet");
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some(p) => {
            cmd.args(["--profile", p]);
        }
    }
    for (package, bin) in bins {
        cmd.args(["-p", package, "--bin", bin]);
    }
    crate::inner_cargo::without_test_env(&mut cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {cargo}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "building {bins:?} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A minimal HTTP/1.1 GET (admin APIs on loopback): the status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, FLOW_TIMEOUT).map_err(|e| format!("GET {path}: {e}"))?;
    s.set_read_timeout(Some(FLOW_TIMEOUT)).map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes())
        .map_err(|e| format!("GET {path}: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("GET {path}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Err(format!("GET {path}: no HTTP answer"));
    };
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("GET {path}: bad status line"))?;
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

/// A chunked HTTP/1.1 body, joined.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// `sluice-xds serve` on a directory.
#[derive(Debug)]
pub struct XdsServer {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl XdsServer {
    pub fn start(bin: &Path, config: &Path, work: &Path) -> Result<Self, String> {
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--config-dir")
            .arg(config)
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .env("RUST_LOG", "info");
        let mut proc = Proc::spawn("sluice-xds", cmd, &work.join("sluice-xds.log"))?;
        let addr = proc.wait_for_line(" over ADS on ", START_TIMEOUT)?;
        let addr = addr
            .parse()
            .map_err(|_| format!("sluice-xds serves on `{addr}`, not an address"))?;
        Ok(Self { proc, addr })
    }
}

/// The policy Sluice enforces in the scenarios (served by `sluice-xds`,
/// and in the gateway's own file until the server answers): everything,
/// the upstreams on loopback included. The built-in guard denies
/// loopback unless the deciding rule names it, and an address a listener
/// binds (127.0.0.1 here) is in `gateway`, which the guard takes first.
pub const POLICY: &str = "policy:
  mode: enforce
  default: allow
  rules:
    - name: conformance-upstreams
      from: [any]
      to: {smartgroups: [gateway, loopback]}
      action: allow
";

/// A running implementation, with the port of every listener.
#[derive(Debug)]
pub struct Running {
    /// The implementation's process (killed first) and `sluice-xds`.
    _procs: Vec<Proc>,
    pub ports: BTreeMap<String, u16>,
}

/// Stock Envoy with a bootstrap naming only `sluice-xds` (ADS for LDS
/// and CDS, EDS over the same stream), one worker (its balancers keep
/// their state per worker), and a DNS resolver on 127.0.0.1:9 so no query
/// leaves the machine (`localhost` comes from /etc/hosts).
pub fn start_envoy(bin: &Path, xds: XdsServer, work: &Path, listeners: &BTreeSet<String>) -> Result<Running, String> {
    let bootstrap = format!(
        r#"node: {{id: {NODE_ID}, cluster: {NODE_ID}}}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
typed_dns_resolver_config:
  name: envoy.network.dns_resolver.cares
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig
    resolvers: [{{socket_address: {{address: 127.0.0.1, port_value: 9}}}}]
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]
  lds_config: {{ads: {{}}, resource_api_version: V3}}
  cds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]
"#,
        port = xds.addr.port()
    );
    let cfg = work.join("envoy.yaml");
    std::fs::write(&cfg, bootstrap).map_err(|e| format!("{}: {e}", cfg.display()))?;
    let admin_path = work.join("envoy-admin-address");
    let mut cmd = Command::new(bin);
    cmd.arg("-c")
        .arg(&cfg)
        // No hot restart: nothing in shared memory that a killed Envoy
        // would leave behind in /dev/shm.
        .args(["--concurrency", "1", "--disable-hot-restart", "-l", "info"])
        .arg("--admin-address-path")
        .arg(&admin_path);
    let mut envoy = Proc::spawn("envoy", cmd, &work.join("envoy.log"))?;
    let deadline = Instant::now() + START_TIMEOUT;
    let admin: SocketAddr = loop {
        if let Ok(a) = std::fs::read_to_string(&admin_path)
            && let Ok(a) = a.trim().parse()
        {
            break a;
        }
        if let Some(st) = envoy.exited() {
            return Err(format!("envoy exited ({st})\n{}", envoy.tail(40)));
        }
        if Instant::now() >= deadline {
            return Err(format!("envoy wrote no admin address\n{}", envoy.tail(40)));
        }
        std::thread::sleep(Duration::from_millis(25));
    };
    let mut settled_since: Option<Instant> = None;
    loop {
        let stats = envoy_stats(admin)?;
        let stat = |n: &str| stats.get(n).copied().unwrap_or(0);
        let running = envoy_listeners(admin)?;
        let exited = envoy.exited();
        let rejected = stat("listener_manager.lds.update_rejected") + stat("cluster_manager.cds.update_rejected");
        let settled = stat("listener_manager.lds.update_success") >= 1
            && stat("cluster_manager.cds.update_success") >= 1
            && stat("cluster_manager.warming_clusters") == 0
            && stat("listener_manager.total_listeners_warming") == 0
            && stat("listener_manager.workers_started") == 1;
        let missing: Vec<&String> = listeners.iter().filter(|l| !running.contains_key(*l)).collect();
        if settled && missing.is_empty() && rejected == 0 && exited.is_none() {
            return Ok(Running {
                _procs: vec![envoy, xds.proc],
                ports: running,
            });
        }
        // Settled without a listener the flows name: give a late update a
        // moment, then say which.
        let since = *settled_since.get_or_insert_with(Instant::now);
        if !settled {
            settled_since = None;
        }
        let why = if rejected > 0 {
            Some("Envoy rejected the resources (LDS or CDS update_rejected)".to_owned())
        } else if let Some(st) = exited {
            Some(format!("envoy exited ({st})"))
        } else if settled && since.elapsed() > Duration::from_secs(3) {
            Some(format!("no listener {missing:?}"))
        } else if Instant::now() >= deadline {
            Some(format!(
                "not ready within {START_TIMEOUT:?} (missing listeners {missing:?}; lds/cds successes {}/{}, \
                 warming clusters {}, warming listeners {})",
                stat("listener_manager.lds.update_success"),
                stat("cluster_manager.cds.update_success"),
                stat("cluster_manager.warming_clusters"),
                stat("listener_manager.total_listeners_warming"),
            ))
        } else {
            None
        };
        if let Some(why) = why {
            return Err(format!(
                "{why}; Envoy runs listeners {:?}\n{}\n{}",
                running.keys().collect::<Vec<_>>(),
                envoy.tail(40),
                xds.proc.tail(20)
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Envoy's counters and gauges.
fn envoy_stats(admin: SocketAddr) -> Result<BTreeMap<String, u64>, String> {
    let (_, body) = http_get(admin, "/stats")?;
    Ok(body
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(": ")?;
            Some((k.to_owned(), v.trim().parse().ok()?))
        })
        .collect())
}

/// Envoy's listeners and the ports they bound, from
/// `GET /listeners?format=json`.
pub fn envoy_listeners(admin: SocketAddr) -> Result<BTreeMap<String, u16>, String> {
    let (status, body) = http_get(admin, "/listeners?format=json")?;
    if status != 200 {
        return Err(format!("envoy GET /listeners: {status}: {body}"));
    }
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("envoy GET /listeners: {e}: {body}"))?;
    let mut out = BTreeMap::new();
    for l in v["listener_statuses"].as_array().into_iter().flatten() {
        let name = l["name"].as_str();
        let port = l["local_address"]["socket_address"]["port_value"].as_u64();
        if let (Some(name), Some(port)) = (name, port.and_then(|p| u16::try_from(p).ok())) {
            out.insert(name.to_owned(), port);
        }
    }
    Ok(out)
}

/// Sluice's listeners and the addresses they bound, from its admin API's
/// `GET /listeners` (`{"listeners": [{"name": …, "address": "IP:PORT"}]}`).
pub fn sluice_listeners(admin: SocketAddr) -> Result<BTreeMap<String, SocketAddr>, String> {
    let (status, body) = http_get(admin, "/listeners")?;
    if status == 404 {
        return Err(format!(
            "Sluice's admin API answers 404 to GET /listeners, so the runner cannot learn which ports the \
             listeners it took over xDS bound (expected {{\"listeners\": [{{\"name\": …, \"address\": \
             \"127.0.0.1:PORT\"}}]}}): {}",
            body.trim()
        ));
    }
    if status != 200 {
        return Err(format!("sluice GET /listeners: {status}: {body}"));
    }
    let v: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("sluice GET /listeners: {e}: {body}"))?;
    let list = v["listeners"]
        .as_array()
        .ok_or_else(|| format!("sluice GET /listeners: no `listeners` list: {body}"))?;
    let mut out = BTreeMap::new();
    for l in list {
        let (Some(name), Some(addr)) = (l["name"].as_str(), l["address"].as_str()) else {
            return Err(format!("sluice GET /listeners: an entry without name or address: {l}"));
        };
        let addr = addr
            .parse()
            .map_err(|_| format!("sluice GET /listeners: `{addr}` is not an address"))?;
        out.insert(name.to_owned(), addr);
    }
    Ok(out)
}

/// The Sluice gateway: its own file holds the policy, a resolver that
/// answers `localhost` and sends nothing off the machine, one worker (as
/// Envoy runs), a placeholder listener (a file without one does not run),
/// and `xds:` with `listeners: true`, so the Listeners and Clusters of
/// `sluice-xds` replace the placeholder. The placeholder binds 127.0.0.2,
/// not 127.0.0.1: the port the kernel gives it could be one a scenario
/// picked earlier for a listener of its own on 127.0.0.1 (seen once in
/// CI: `exact-port` refused with "Address already in use").
pub fn start_sluice(bin: &Path, xds: XdsServer, work: &Path, listeners: &BTreeSet<String>) -> Result<Running, String> {
    let audit = work.join("audit.jsonl");
    let config = format!(
        "admin: {{address: \"127.0.0.1:0\"}}
audit: {{destination: \"{audit}\"}}
runtime: {{workers: 1}}
resolver:
  nameservers: [\"127.0.0.1:9\"]
  hosts:
    localhost: [127.0.0.1]
listeners:
  - {{name: {PLACEHOLDER_LISTENER}, kind: http-proxy, address: \"127.0.0.2:0\"}}
{POLICY}xds:
  servers: [\"{xds}\"]
  node: {{id: {NODE_ID}, cluster: {NODE_ID}}}
  listeners: true
  initial_fetch_timeout: 5s
",
        audit = audit.display(),
        xds = xds.addr,
    );
    let file = work.join("gateway.yaml");
    std::fs::write(&file, config).map_err(|e| format!("{}: {e}", file.display()))?;
    let mut cmd = Command::new(bin);
    cmd.arg("run").arg("-c").arg(&file);
    let mut sluice = Proc::spawn("sluice", cmd, &work.join("sluice.log"))?;
    let admin = sluice.wait_for_line("sluice: admin API on http://", START_TIMEOUT)?;
    let admin: SocketAddr = admin
        .parse()
        .map_err(|_| format!("sluice's admin API is on `{admin}`, not an address"))?;
    let deadline = Instant::now() + START_TIMEOUT;
    let mut settled_since: Option<Instant> = None;
    loop {
        let exited = sluice.exited();
        let (running, state) = match sluice_listeners(admin) {
            Ok(r) => (r, sluice_xds_state(admin)),
            Err(e) => return Err(sluice_failure(&e, admin, &sluice, &xds)),
        };
        let missing: Vec<&String> = listeners.iter().filter(|l| !running.contains_key(*l)).collect();
        if missing.is_empty() && !running.contains_key(PLACEHOLDER_LISTENER) && exited.is_none() {
            return Ok(Running {
                ports: running.into_iter().map(|(k, a)| (k, a.port())).collect(),
                _procs: vec![sluice, xds.proc],
            });
        }
        // Applied a response that holds the Listener type: what it runs
        // now is what it was sent, give or take a late update.
        let served = state.as_ref().and_then(|s| s.listeners_served);
        let settled = state.as_ref().is_some_and(|s| s.applied > 0) && served.is_some();
        let since = *settled_since.get_or_insert_with(Instant::now);
        if !settled {
            settled_since = None;
        }
        let runs = running.keys().collect::<Vec<_>>();
        let why = if let Some(st) = exited {
            Some(format!("sluice exited ({st})"))
        } else if let Some(r) = state.as_ref().and_then(|s| s.rejection.clone()) {
            Some(format!("Sluice refused (NACKed) what sluice-xds sent: {r}"))
        } else if settled && since.elapsed() > Duration::from_secs(3) {
            let hint = if served == Some(0) {
                " (sluice-xds sent this gateway no Listener at all: does it serve the plain resources of \
                 `envoy/` to Sluice gateways?)"
            } else {
                ""
            };
            Some(format!(
                "Sluice took {} Listener(s) over xDS and runs {runs:?}; missing {missing:?}{hint}",
                served.unwrap_or(0)
            ))
        } else if Instant::now() >= deadline {
            Some(format!(
                "the listeners of sluice-xds did not replace the file's within {START_TIMEOUT:?}: Sluice runs \
                 {runs:?}, missing {missing:?}"
            ))
        } else {
            None
        };
        if let Some(why) = why {
            return Err(sluice_failure(&why, admin, &sluice, &xds));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What Sluice's `GET /xds` says, in brief.
#[derive(Debug)]
struct XdsState {
    applied: u64,
    /// The last refusal, when any update was refused.
    rejection: Option<String>,
    /// How many Listeners the last applied response held; `None` before
    /// one held the type.
    listeners_served: Option<u64>,
}

fn sluice_xds_state(admin: SocketAddr) -> Option<XdsState> {
    let (status, body) = http_get(admin, "/xds").ok()?;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let rejected = v["rejected"].as_u64().unwrap_or(0);
    Some(XdsState {
        applied: v["applied"].as_u64().unwrap_or(0),
        rejection: (rejected > 0).then(|| v["last_rejection"].as_str().unwrap_or("(no reason given)").to_owned()),
        listeners_served: v["accepted"].as_array().and_then(|a| {
            a.iter()
                .find(|t| t["type_url"] == "type.googleapis.com/envoy.config.listener.v3.Listener")
                .and_then(|t| t["resources"].as_u64())
        }),
    })
}

fn sluice_failure(why: &str, admin: SocketAddr, sluice: &Proc, xds: &XdsServer) -> String {
    let state = http_get(admin, "/xds").map_or_else(|e| e, |(_, b)| b);
    format!(
        "{why}\n--- sluice GET /xds ---\n{}\n{}\n{}",
        state.trim(),
        sluice.tail(40),
        xds.proc.tail(20)
    )
}

// ---------------------------------------------------------------------------
// Upstreams and the client

/// One TCP server per upstream name on 127.0.0.1: each connection is
/// answered with the upstream's name and a newline, after the client's
/// first bytes (or a moment without any), then closed.
#[derive(Debug)]
pub struct Upstreams {
    pub ports: BTreeMap<String, u16>,
    stop: Arc<AtomicBool>,
}

impl Upstreams {
    pub fn start(names: &[String]) -> Result<Self, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut ports = BTreeMap::new();
        for name in names {
            let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("upstream {name}: {e}"))?;
            let port = listener.local_addr().map_err(|e| e.to_string())?.port();
            ports.insert(name.clone(), port);
            let stop = stop.clone();
            let answer = format!("{name}\n").into_bytes();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let answer = answer.clone();
                    std::thread::spawn(move || answer_once(conn, &answer));
                }
            });
        }
        Ok(Self { ports, stop })
    }
}

fn answer_once(mut conn: TcpStream, answer: &[u8]) {
    let mut buf = [0u8; 16 * 1024];
    let _ = conn.set_read_timeout(Some(UPSTREAM_PATIENCE));
    let _ = conn.read(&mut buf);
    if conn.write_all(answer).is_err() {
        return;
    }
    let _ = conn.shutdown(Shutdown::Write);
    // Read what is left until the client closes, so closing does not
    // reset the connection under the answer.
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    while let Ok(n) = conn.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
}

impl Drop for Upstreams {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake each accept loop so it sees the flag.
        for port in self.ports.values() {
            let _ = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], *port)), Duration::from_millis(200));
        }
    }
}

/// The first flight a rustls client writes: a real ClientHello with
/// `sni` (none for `None`) and `alpn`.
pub fn client_hello(sni: Option<&str>, alpn: &[String]) -> Result<Vec<u8>, String> {
    use rustls::pki_types::ServerName;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    // rustls sends no SNI for an address.
    let name = match sni {
        Some(s) => ServerName::try_from(s.to_owned()).map_err(|e| format!("sni `{s}`: {e}"))?,
        None => ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into()),
    };
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// One connection to `port` on 127.0.0.1, from `source`: sends `payload`
/// and reads the answer.
pub fn connect_once(port: u16, source: Option<Ipv4Addr>, payload: &[u8], upstreams: &BTreeSet<String>) -> Outcome {
    use socket2::{Domain, Protocol, Socket, Type};
    let deadline = Instant::now() + FLOW_TIMEOUT;
    let to = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let sock = match Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)) {
        Ok(s) => s,
        Err(e) => return Outcome::Error(format!("socket: {e}")),
    };
    if let Some(src) = source
        && let Err(e) = sock.bind(&SocketAddr::from((src, 0)).into())
    {
        return Outcome::Error(format!("bind {src}: {e}"));
    }
    if let Err(e) = sock.connect_timeout(&to.into(), FLOW_TIMEOUT) {
        return Outcome::Error(format!("connect {to}: {e}"));
    }
    let mut s: TcpStream = sock.into();
    let _ = s.set_write_timeout(Some(FLOW_TIMEOUT));
    // A proxy that closes at once makes this fail; the read says how.
    let _ = s.write_all(payload);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let _ = s.set_read_timeout(Some(left));
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.contains(&b'\n') {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if got.is_empty() {
                    return Outcome::Timeout;
                }
                break;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
                ) =>
            {
                break;
            }
            Err(e) => {
                if got.is_empty() {
                    return Outcome::Error(format!("read: {e}"));
                }
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&got);
    let answer = text.trim();
    if answer.is_empty() {
        Outcome::Closed
    } else if upstreams.contains(answer) {
        Outcome::Upstream(answer.to_owned())
    } else {
        Outcome::Error(format!("an answer from no upstream: {answer:?}"))
    }
}

// ---------------------------------------------------------------------------
// Running a scenario

/// Picks a distinct free loopback port for every `${port.NAME}`.
fn free_ports(names: &BTreeSet<String>) -> Result<BTreeMap<String, u16>, String> {
    // Held together until all are picked, so no two names get one port.
    let held: Vec<(String, TcpListener)> = names
        .iter()
        .map(|n| {
            TcpListener::bind("127.0.0.1:0")
                .map(|l| (n.clone(), l))
                .map_err(|e| format!("a free port for {n}: {e}"))
        })
        .collect::<Result<_, _>>()?;
    held.iter()
        .map(|(n, l)| Ok((n.clone(), l.local_addr().map_err(|e| e.to_string())?.port())))
        .collect()
}

/// Settings of a run.
#[derive(Debug, Clone)]
pub struct Run {
    pub binaries: Binaries,
    /// Keep each scenario's working directory (and say where).
    pub keep: bool,
    /// No flow starts after this instant.
    pub deadline: Instant,
}

/// Runs `s` on `side`: a directory for `sluice-xds` (the policy, and
/// `envoy/<scenario>.yaml` with the placeholders filled), `sluice-xds`,
/// the implementation, then every flow. `Err` when it could not start.
pub fn run_side(run: &Run, side: Side, s: &Scenario, upstreams: &Upstreams) -> Result<Vec<Tally>, String> {
    let work = tempfile::Builder::new()
        .prefix(&format!("sluice-conformance-{}-{}-", s.stem(), side.as_str()))
        .tempdir()
        .map_err(|e| format!("a working directory: {e}"))?;
    let config = work.path().join("config");
    let envoy_dir = config.join("envoy");
    std::fs::create_dir_all(&envoy_dir).map_err(|e| format!("{}: {e}", envoy_dir.display()))?;
    let wanted = placeholders(&s.resources)?;
    let port_names: BTreeSet<String> = wanted
        .iter()
        .filter_map(|p| match p {
            Placeholder::Port(n) => Some(n.clone()),
            Placeholder::Upstream(_) => None,
        })
        .collect();
    let mut ports: BTreeMap<Placeholder, u16> = free_ports(&port_names)?
        .into_iter()
        .map(|(n, p)| (Placeholder::Port(n), p))
        .collect();
    for (n, p) in &upstreams.ports {
        ports.insert(Placeholder::Upstream(n.clone()), *p);
    }
    let resources = fill(&s.resources, &ports)?;
    let file = envoy_dir.join(format!("{}.yaml", s.stem()));
    std::fs::write(&file, &resources).map_err(|e| format!("{}: {e}", file.display()))?;
    let policy = config.join("policy.yaml");
    std::fs::write(&policy, POLICY).map_err(|e| format!("{}: {e}", policy.display()))?;

    let result = (|| {
        let xds = XdsServer::start(&run.binaries.sluice_xds, &config, work.path())?;
        let listeners = s.listeners();
        let running = match side {
            Side::Envoy => {
                let bin = run.binaries.envoy.as_deref().ok_or("no Envoy binary")?;
                start_envoy(bin, xds, work.path(), &listeners)?
            }
            Side::Sluice => start_sluice(&run.binaries.sluice, xds, work.path(), &listeners)?,
        };
        let names: BTreeSet<String> = s.upstreams.iter().cloned().collect();
        let mut tallies = Vec::new();
        for flow in &s.flows {
            let mut tally = Tally::default();
            let Some(port) = running.ports.get(&flow.listener).copied() else {
                tallies.push(Tally::all(
                    Outcome::Error(format!("no listener `{}`", flow.listener)),
                    flow.count,
                ));
                continue;
            };
            let payload = match &flow.payload {
                Payload::Nothing => Ok(Vec::new()),
                Payload::Bytes(b) => Ok(b.clone()),
                Payload::Hello { sni, alpn } => client_hello(sni.as_deref(), alpn),
            };
            for _ in 0..flow.count {
                let o = match (&payload, Instant::now() < run.deadline) {
                    (_, false) => Outcome::Error("not run: the run's time is up".to_owned()),
                    (Err(e), _) => Outcome::Error(format!("ClientHello: {e}")),
                    (Ok(p), true) => connect_once(port, flow.source, p, &names),
                };
                tally.add(o);
            }
            tallies.push(tally);
        }
        Ok::<_, String>(tallies)
    })();
    if run.keep {
        let kept = work.keep();
        eprintln!("{} on {}: kept {}", s.file, side.as_str(), kept.display());
    }
    result
}

/// Runs every scenario on every side in `sides`, scenario by scenario
/// (the upstreams are shared by both sides of a scenario), and calls
/// `each` with every scenario's result as it comes.
pub fn run_all(
    run: &Run,
    sides: &[Side],
    scenarios: &[Scenario],
    mut each: impl FnMut(&Scenario, &ScenarioResult),
) -> Vec<ScenarioResult> {
    let mut out = Vec::new();
    for s in scenarios {
        let mut result = ScenarioResult::default();
        match Upstreams::start(&s.upstreams) {
            Ok(upstreams) => {
                for side in sides {
                    result.sides.insert(*side, run_side(run, *side, s, &upstreams));
                }
            }
            Err(e) => {
                for side in sides {
                    result.sides.insert(*side, Err(format!("upstreams: {e}")));
                }
            }
        }
        each(s, &result);
        out.push(result);
    }
    out
}
