//! Configuration errors: each one names the file, line and column, the field
//! path, what is wrong and how to fix it.

use std::fmt;

use crate::domain::DomainError;
use crate::net::CidrError;

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// 1-based; 0 when the position is unknown.
    pub line: u32,
    pub column: u32,
    /// Field path such as `policy.rules[2].to.webgroups[0]`; empty when the
    /// YAML layer could not tell.
    pub path: String,
    pub kind: ConfigErrorKind,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A problem with the file as a whole (it cannot be read) has no
        // position to give.
        if self.line == 0 {
            write!(f, "{}: ", self.file)?;
        } else {
            write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        write!(f, "{}", self.kind)
    }
}

impl std::error::Error for ConfigError {}

/// What is wrong. Tests match on these variants exactly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigErrorKind {
    #[error("cannot read the file: {message}")]
    Io { message: String },
    /// The text is not YAML; nothing after the mistake can be read.
    #[error("YAML syntax: {message}; {fix}")]
    Syntax { message: String, fix: String },
    /// Well-formed YAML, but not the kind of value the field takes.
    #[error("expected {expected}, found {found}")]
    WrongType { expected: String, found: String },
    #[error("`{key}` is given twice in this mapping; keep one")]
    DuplicateKey { key: String },
    #[error("unknown field `{field}`{}; expected one of: {}", did_you_mean(suggestion), expected.join(", "))]
    UnknownField {
        field: String,
        expected: Vec<String>,
        suggestion: Option<String>,
    },
    #[error("unknown value `{value}`{}; expected one of: {}", did_you_mean(suggestion), expected.join(", "))]
    UnknownValue {
        value: String,
        expected: Vec<String>,
        suggestion: Option<String>,
    },
    #[error("missing field `{field}`; add it")]
    MissingField { field: String },
    #[error("{message}")]
    InvalidValue { message: String },
    #[error("invalid domain pattern `{pattern}`: {source}")]
    InvalidDomain { pattern: String, source: DomainError },
    #[error("invalid CIDR: {0}")]
    InvalidCidr(CidrError),
    #[error("`{value}` is not an IP address; write e.g. `10.1.2.3` or `fd00::1`")]
    InvalidIp { value: String },
    #[error("`{value}` is not an address with a port; write e.g. `127.0.0.1:3128` or `[::1]:3128`")]
    InvalidSocketAddress { value: String },
    #[error("port {value} is out of range; ports are 1 to 65535")]
    PortOutOfRange { value: String },
    #[error("port range `{value}` is reversed; write the low port first: `{fixed}`")]
    ReversedPortRange { value: String, fixed: String },
    #[error("`{value}` is not a port or port range; write e.g. `443` or `8000-8100` (low-high)")]
    InvalidPortRange { value: String },
    #[error(
        "no {kind} named `{name}`{}; define it under `{kind}s:` or use a built-in one",
        did_you_mean(suggestion)
    )]
    UnknownGroup {
        kind: GroupKind,
        name: String,
        suggestion: Option<String>,
    },
    #[error("no workload named `{name}` in `inventory`{}", did_you_mean(suggestion))]
    UnknownWorkload { name: String, suggestion: Option<String> },
    #[error(
        "no policy named `{name}`{}; define it under `policies:` (or name `default`, the `policy:` section)",
        did_you_mean(suggestion)
    )]
    UnknownPolicy { name: String, suggestion: Option<String> },
    #[error("no plugin named `{name}`{}; declare it under `plugins:`", did_you_mean(suggestion))]
    UnknownPlugin { name: String, suggestion: Option<String> },
    /// A plugin or a target names a listener no file (nor, for a control
    /// server, `envoy/`; nor, on a gateway, LDS) defines.
    #[error(
        "no listener named `{name}`{}; define it under `listeners:` (or, for a control server, as a Listener in `envoy/`)",
        did_you_mean(suggestion)
    )]
    UnknownListener { name: String, suggestion: Option<String> },
    #[error("{kind} `{name}` is defined twice (first at line {first_line}); rename or merge one")]
    DuplicateName {
        kind: NameKind,
        name: String,
        first_line: u32,
    },
    #[error(
        "`{name}` is not a valid name; use 1 to 63 letters, digits, `-`, `_` or `.`, starting with a letter or digit"
    )]
    InvalidName { name: String },
    #[error("{kind} includes form a cycle: {}; remove one include", cycle.join(" -> "))]
    IncludeCycle { kind: GroupKind, cycle: Vec<String> },
    #[error("an empty selector matches every workload; list labels, or use the built-in `any` group")]
    EmptySelector,
    #[error("`{value}` is not a sha256 digest; write 64 hexadecimal characters")]
    InvalidSha256 { value: String },
    #[error("the built-in {kind} `{name}` cannot be extended: {why}")]
    BuiltinNotExtensible {
        kind: GroupKind,
        name: String,
        why: &'static str,
    },
}

fn did_you_mean(s: &Option<String>) -> String {
    match s {
        Some(s) => format!(" (did you mean `{s}`?)"),
        None => String::new(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupKind {
    WebGroup,
    SmartGroup,
}

impl fmt::Display for GroupKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::WebGroup => "webgroup",
            Self::SmartGroup => "smartgroup",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    Listener,
    WebGroup,
    SmartGroup,
    Workload,
    Rule,
    Plugin,
    ProxyUser,
    Policy,
    Target,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Listener => "listener",
            Self::WebGroup => "webgroup",
            Self::SmartGroup => "smartgroup",
            Self::Workload => "workload",
            Self::Rule => "rule",
            Self::Plugin => "plugin",
            Self::ProxyUser => "proxy user",
            Self::Policy => "policy",
            Self::Target => "target",
        })
    }
}

/// Every problem found in one file, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub fn iter(&self) -> impl Iterator<Item = &ConfigError> {
        self.0.iter()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in &self.0 {
            writeln!(f, "{e}")?;
        }
        let n = self.0.len();
        write!(f, "{n} error{} in configuration", if n == 1 { "" } else { "s" })
    }
}

impl std::error::Error for ConfigErrors {}

/// The closest candidate, if it is close enough to be a plausible typo.
pub fn suggest<'a>(input: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(input, c), c))
        .filter(|(d, c)| *d > 0 && *d <= (c.len().max(input.len()) / 3).clamp(1, 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.to_owned())
}
