//! Policy scenarios: a `sluice.yaml` document plus flows with the verdict
//! each one must get. The format is described in `conformance/policy/README.md`.
//!
//! Loading and comparing live here, apart from the engine, so the same
//! scenarios can later be run against another implementation (Envoy with the
//! translated config) by swapping [`Engine`].

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_saphyr::Spanned;
use sluice::policy::{FlowQuery, Policy, Verdict};
use sluice_api::{Action, DomainName, Protocol};

/// Scenarios and known gaps must add up to at least this many flows.
pub const MIN_FLOWS: usize = 60;

/// Expected enforcement of a verdict: the api's own.
pub use sluice_api::Enforcement;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    description: String,
    config: String,
    #[serde(default)]
    flows: Vec<Spanned<Flow>>,
}

/// One flow and what the policy must say about it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flow {
    /// Source address as the proxy saw it (not normalised by the runner).
    pub src: String,
    /// SNI, Host or DNS query name, as seen on the wire.
    #[serde(default)]
    pub name: Option<String>,
    /// Destination address, when known.
    #[serde(default)]
    pub dst: Option<String>,
    pub proto: Protocol,
    /// Destination port; defaults to 53 for `dns`, required otherwise.
    #[serde(default)]
    pub port: Option<u16>,
    pub action: Action,
    pub enforcement: Enforcement,
    /// Deciding rule name, `default` or `builtin-guard`.
    pub rule: String,
    /// Reason code, e.g. `allowed-by-rule`.
    pub reason: String,
    /// Source SmartGroup the deciding rule matched on; `"-"` = none.
    #[serde(default)]
    pub source_group: Option<String>,
    /// Destination WebGroup/SmartGroup that matched; `"-"` = none.
    #[serde(default)]
    pub dest_group: Option<String>,
    /// Free text: why this flow is here.
    #[serde(default)]
    pub note: Option<String>,
}

/// A flow with the line it starts on in its file.
#[derive(Debug, Clone)]
pub struct LocatedFlow {
    pub line: u64,
    pub flow: Flow,
}

#[derive(Debug, Clone)]
pub struct Scenario {
    /// File name, e.g. `guard.yaml`.
    pub file: String,
    pub description: String,
    pub config: String,
    pub flows: Vec<LocatedFlow>,
}

/// What an engine said about a flow, in the scenario's vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub action: Action,
    pub enforcement: Enforcement,
    pub rule: String,
    pub reason: String,
    pub source_group: Option<String>,
    pub dest_group: Option<String>,
}

impl fmt::Display for Observed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "action={} enforcement={} rule={} reason={} source_group={} dest_group={}",
            self.action,
            self.enforcement.as_str(),
            self.rule,
            self.reason,
            self.source_group.as_deref().unwrap_or("-"),
            self.dest_group.as_deref().unwrap_or("-"),
        )
    }
}

/// One flow whose verdict differs from the expectation, or that could not run.
#[derive(Debug, Clone)]
pub struct Mismatch {
    pub file: String,
    pub index: usize,
    pub line: u64,
    pub message: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{} flows[{}]: {}", self.file, self.line, self.index, self.message)
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
    paths.iter().map(|p| load_file(p)).collect()
}

pub fn load_file(path: &Path) -> Result<Scenario, String> {
    let file = path
        .file_name()
        .map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
    let text = std::fs::read_to_string(path).map_err(|e| format!("{file}: {e}"))?;
    let raw: RawScenario = serde_saphyr::from_str(&text).map_err(|e| format!("{file}: {e}"))?;
    Ok(Scenario {
        file,
        description: raw.description,
        config: raw.config,
        flows: raw
            .flows
            .into_iter()
            .map(|f| LocatedFlow {
                line: f.referenced.line(),
                flow: f.value,
            })
            .collect(),
    })
}

/// A known gap: a flow the implementation is known to get wrong, with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownGap {
    pub file: String,
    pub index: usize,
    pub reason: String,
}

/// Parses `KNOWN_GAPS.md`: every line of the form
/// ``- `file.yaml#3`: reason`` is a gap; other lines are prose.
pub fn parse_known_gaps(text: &str) -> Result<Vec<KnownGap>, String> {
    let mut gaps = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let Some(rest) = line.trim().strip_prefix("- `") else {
            continue;
        };
        let Some((id, reason)) = rest.split_once('`') else {
            return Err(format!("KNOWN_GAPS.md:{}: expected - `file.yaml#N`: reason", n + 1));
        };
        let Some((file, index)) = id.split_once('#') else {
            return Err(format!("KNOWN_GAPS.md:{}: `{id}` is not file.yaml#N", n + 1));
        };
        let index = index
            .parse()
            .map_err(|_| format!("KNOWN_GAPS.md:{}: `{index}` is not a flow index", n + 1))?;
        let reason = reason.trim_start_matches(':').trim().to_owned();
        if reason.is_empty() {
            return Err(format!("KNOWN_GAPS.md:{}: a gap needs a reason", n + 1));
        }
        gaps.push(KnownGap {
            file: file.to_owned(),
            index,
            reason,
        });
    }
    Ok(gaps)
}

/// The implementation under test.
pub trait Engine {
    type Compiled;
    /// Loads and compiles a scenario's config.
    fn compile(&self, scenario: &Scenario) -> Result<Self::Compiled, String>;
    /// Decides one flow.
    fn decide(&self, compiled: &Self::Compiled, flow: &Flow) -> Result<Observed, String>;
}

/// Sluice's own policy engine, in process.
#[derive(Debug, Clone, Copy, Default)]
pub struct SluiceEngine;

/// The parsed parts of a flow, ready to build a [`FlowQuery`].
#[derive(Debug, Clone)]
pub struct ParsedFlow {
    pub src: IpAddr,
    pub name: Option<DomainName>,
    pub dst: Option<IpAddr>,
    pub protocol: Protocol,
    pub port: u16,
}

impl ParsedFlow {
    pub fn parse(flow: &Flow) -> Result<Self, String> {
        let src = flow
            .src
            .parse()
            .map_err(|_| format!("src `{}` is not an IP address", flow.src))?;
        let dst = match &flow.dst {
            Some(d) => Some(d.parse().map_err(|_| format!("dst `{d}` is not an IP address"))?),
            None => None,
        };
        let name = match &flow.name {
            Some(n) => Some(DomainName::parse(n).map_err(|e| format!("name `{n}`: {e}"))?),
            None => None,
        };
        let port = match (flow.port, flow.proto) {
            (Some(p), _) => p,
            (None, Protocol::Dns) => 53,
            (None, _) => return Err("`port` is required for protocols other than dns".to_owned()),
        };
        Ok(Self {
            src,
            name,
            dst,
            protocol: flow.proto,
            port,
        })
    }

    pub fn query(&self) -> FlowQuery<'_> {
        FlowQuery {
            identity: None,
            src: self.src,
            name: self.name.as_ref(),
            dst: self.dst,
            protocol: self.protocol,
            port: self.port,
        }
    }
}

/// Turns a Sluice verdict into the scenario vocabulary.
pub fn observe(policy: &Policy, v: &Verdict) -> Observed {
    Observed {
        action: v.action,
        enforcement: match v.enforcement {
            sluice::policy::Enforcement::Enforced => Enforcement::Enforced,
            sluice::policy::Enforcement::Watched => Enforcement::Watched,
        },
        rule: policy.decided_by_name(v.decided_by).to_owned(),
        reason: v.reason.as_str().to_owned(),
        source_group: v.source_group.map(|g| policy.smartgroup_name(g).to_owned()),
        dest_group: v.dest.map(|d| policy.dest_name(d).to_owned()),
    }
}

/// Loads a scenario's config the way `sluice run -c` would.
pub fn compile_config(scenario: &Scenario) -> Result<Policy, String> {
    let source = format!("{}#config", scenario.file);
    let config = sluice_api::config::load_str(&scenario.config, &source).map_err(|e| e.to_string())?;
    Ok(Policy::compile(&config))
}

impl Engine for SluiceEngine {
    type Compiled = Policy;

    fn compile(&self, scenario: &Scenario) -> Result<Policy, String> {
        compile_config(scenario)
    }

    fn decide(&self, policy: &Policy, flow: &Flow) -> Result<Observed, String> {
        let parsed = ParsedFlow::parse(flow)?;
        Ok(observe(policy, &policy.decide(&parsed.query())))
    }
}

/// Compares what was observed with what the flow expects; `None` if equal.
pub fn compare(flow: &Flow, got: &Observed) -> Option<String> {
    let mut diffs = Vec::new();
    if flow.action != got.action {
        diffs.push(format!("action: expected {}, got {}", flow.action, got.action));
    }
    if flow.enforcement != got.enforcement {
        diffs.push(format!(
            "enforcement: expected {}, got {}",
            flow.enforcement.as_str(),
            got.enforcement.as_str()
        ));
    }
    if flow.rule != got.rule {
        diffs.push(format!("rule: expected {}, got {}", flow.rule, got.rule));
    }
    if flow.reason != got.reason {
        diffs.push(format!("reason: expected {}, got {}", flow.reason, got.reason));
    }
    let group = |what: &str, want: &Option<String>, got: &Option<String>, diffs: &mut Vec<String>| {
        if let Some(want) = want {
            let got = got.as_deref().unwrap_or("-");
            if want != got {
                diffs.push(format!("{what}: expected {want}, got {got}"));
            }
        }
    };
    group("source_group", &flow.source_group, &got.source_group, &mut diffs);
    group("dest_group", &flow.dest_group, &got.dest_group, &mut diffs);
    if diffs.is_empty() {
        None
    } else {
        Some(format!("{} (full verdict: {got})", diffs.join("; ")))
    }
}

/// The result of running scenarios.
#[derive(Debug, Default)]
pub struct Report {
    pub files: usize,
    pub flows: usize,
    pub passed: usize,
    /// Known gaps that still fail, as expected.
    pub skipped: Vec<(Mismatch, String)>,
    pub mismatches: Vec<Mismatch>,
}

/// Runs every flow of every scenario; a flow listed in `gaps` that fails is
/// reported as skipped, one that passes is a mismatch (the gap is stale).
pub fn run<E: Engine>(engine: &E, scenarios: &[Scenario], gaps: &[KnownGap]) -> Report {
    let mut report = Report {
        files: scenarios.len(),
        ..Report::default()
    };
    for s in scenarios {
        let compiled = engine.compile(s);
        for (index, lf) in s.flows.iter().enumerate() {
            report.flows += 1;
            let gap = gaps.iter().find(|g| g.file == s.file && g.index == index);
            let failure = match &compiled {
                Err(e) => Some(format!("config does not load: {e}")),
                Ok(c) => match engine.decide(c, &lf.flow) {
                    Err(e) => Some(format!("bad flow: {e}")),
                    Ok(got) => compare(&lf.flow, &got),
                },
            };
            let at = |message| Mismatch {
                file: s.file.clone(),
                index,
                line: lf.line,
                message,
            };
            match (failure, gap) {
                (None, None) => report.passed += 1,
                (None, Some(g)) => report.mismatches.push(at(format!(
                    "listed in KNOWN_GAPS.md ({}) but now passes; remove it from the list",
                    g.reason
                ))),
                (Some(m), None) => report.mismatches.push(at(m)),
                (Some(m), Some(g)) => report.skipped.push((at(m), g.reason.clone())),
            }
        }
    }
    report
}
