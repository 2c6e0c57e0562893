//! Domain names and WebGroup patterns.
//!
//! Every name Sluice compares — a pattern from a config file, an SNI, a Host
//! header, a DNS query name — is first brought to one canonical form: ASCII,
//! lower case, no trailing dot, internationalised labels as punycode A-labels.
//! Matching then is plain byte comparison, done by the policy engine.

use std::fmt;

/// Longest name in presentation form without the trailing dot (RFC 1035 §2.3.4).
pub const MAX_NAME_LEN: usize = 253;
/// Longest single label (RFC 1035 §2.3.4).
pub const MAX_LABEL_LEN: usize = 63;

/// Why a name or pattern was rejected. Each message says how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DomainError {
    #[error("the name is empty; write a domain such as `api.example.com`")]
    Empty,
    #[error("the name is {len} bytes long; names are limited to {MAX_NAME_LEN} bytes")]
    NameTooLong { len: usize },
    #[error("label `{label}` is {len} bytes long; labels are limited to {MAX_LABEL_LEN} bytes")]
    LabelTooLong { label: String, len: usize },
    #[error("the name has an empty label (two dots in a row, or a leading dot); remove the extra dot")]
    EmptyLabel,
    #[error("character {ch:?} is not allowed in a domain name; use letters, digits, `-` and `_`")]
    InvalidChar { ch: char },
    #[error(
        "`*` may only be the whole pattern (`*`) or the whole first label (`*.example.com`); \
         `{pattern}` is neither"
    )]
    MisplacedWildcard { pattern: String },
    #[error("`{name}` is not a valid internationalised domain name ({detail}); check its spelling")]
    InvalidIdn { name: String, detail: String },
}

/// A validated, canonical domain name: ASCII lower case, no trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainName(Box<str>);

impl DomainName {
    /// Parses a name as written by a user or seen on the wire.
    ///
    /// One trailing dot is ignored, ASCII is lower-cased, and a Unicode name is
    /// converted to A-labels (UTS #46, non-transitional).
    pub fn parse(input: &str) -> Result<Self, DomainError> {
        let trimmed = input.strip_suffix('.').unwrap_or(input);
        if trimmed.is_empty() {
            return Err(DomainError::Empty);
        }
        let ascii = if trimmed.is_ascii() && !has_ace_label(trimmed) {
            trimmed.to_ascii_lowercase()
        } else {
            to_a_labels(trimmed)?
        };
        check_labels(&ascii)?;
        Ok(Self(ascii.into_boxed_str()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The labels from the right: `a.b.c` yields `c`, `b`, `a`.
    pub fn labels_rev(&self) -> impl Iterator<Item = &str> {
        self.0.rsplit('.')
    }
}

impl fmt::Display for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One entry of a WebGroup.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DomainPattern {
    /// `api.openai.com`: that name only.
    Exact(DomainName),
    /// `*.openai.com`: any name with one or more labels in front of the
    /// suffix; never the suffix itself.
    Subdomains(DomainName),
    /// `*`: any name.
    Any,
}

impl DomainPattern {
    pub fn parse(input: &str) -> Result<Self, DomainError> {
        let trimmed = input.trim();
        if trimmed == "*" {
            return Ok(Self::Any);
        }
        if let Some(rest) = trimmed.strip_prefix("*.") {
            if rest.contains('*') {
                return Err(DomainError::MisplacedWildcard {
                    pattern: trimmed.to_owned(),
                });
            }
            return DomainName::parse(rest).map(Self::Subdomains);
        }
        if trimmed.contains('*') {
            return Err(DomainError::MisplacedWildcard {
                pattern: trimmed.to_owned(),
            });
        }
        DomainName::parse(trimmed).map(Self::Exact)
    }

    /// Reference semantics, used by tests and `sluice explain`; the policy
    /// engine compiles patterns into an index instead of calling this.
    pub fn matches(&self, name: &DomainName) -> bool {
        match self {
            Self::Any => true,
            Self::Exact(p) => p == name,
            Self::Subdomains(suffix) => {
                let n = name.as_str();
                let s = suffix.as_str();
                n.len() > s.len() + 1 && n.ends_with(s) && n.as_bytes()[n.len() - s.len() - 1] == b'.'
            }
        }
    }
}

impl serde::Serialize for DomainPattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl serde::Serialize for DomainName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("*"),
            Self::Exact(n) => write!(f, "{n}"),
            Self::Subdomains(n) => write!(f, "*.{n}"),
        }
    }
}

fn has_ace_label(name: &str) -> bool {
    name.split('.')
        .any(|l| l.len() >= 4 && l[..4].eq_ignore_ascii_case("xn--"))
}

/// Converts label by label: ASCII labels are lower-cased as they are (so
/// `_dmarc` or `_443._tcp` survive next to an IDN label), Unicode and `xn--`
/// labels go through UTS #46 and must come out valid.
fn to_a_labels(name: &str) -> Result<String, DomainError> {
    let mut out = String::with_capacity(name.len() + 8);
    for (i, label) in name.split('.').enumerate() {
        if label.is_empty() {
            return Err(DomainError::EmptyLabel);
        }
        if i > 0 {
            out.push('.');
        }
        if label.is_ascii() && !has_ace_label(label) {
            out.push_str(&label.to_ascii_lowercase());
            continue;
        }
        match idna::domain_to_ascii_strict(label) {
            Ok(a) if !a.is_empty() && !a.contains('.') => out.push_str(&a),
            _ => {
                let detail = if label.is_ascii() {
                    format!("label `{label}` is not valid punycode")
                } else {
                    format!(
                        "label `{label}` cannot be converted to an A-label (a disallowed character, \
                         a symbol, or a mix of scripts IDNA does not permit)"
                    )
                };
                return Err(DomainError::InvalidIdn {
                    name: name.to_owned(),
                    detail,
                });
            }
        }
    }
    Ok(out)
}

fn check_labels(ascii: &str) -> Result<(), DomainError> {
    if ascii.len() > MAX_NAME_LEN {
        return Err(DomainError::NameTooLong { len: ascii.len() });
    }
    for label in ascii.split('.') {
        if label.is_empty() {
            return Err(DomainError::EmptyLabel);
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(DomainError::LabelTooLong {
                label: label.to_owned(),
                len: label.len(),
            });
        }
        if let Some(ch) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(DomainError::InvalidChar { ch });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> DomainName {
        DomainName::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn canonical_form() {
        assert_eq!(name("API.OpenAI.com.").as_str(), "api.openai.com");
        assert_eq!(name("bücher.example").as_str(), "xn--bcher-kva.example");
        assert_eq!(name("XN--BCHER-KVA.example").as_str(), "xn--bcher-kva.example");
        assert_eq!(name("_dmarc.example.com").as_str(), "_dmarc.example.com");
    }

    #[test]
    fn rejects() {
        assert_eq!(DomainName::parse(""), Err(DomainError::Empty));
        assert_eq!(DomainName::parse("."), Err(DomainError::Empty));
        assert_eq!(DomainName::parse("a..b"), Err(DomainError::EmptyLabel));
        assert_eq!(DomainName::parse(".a.b"), Err(DomainError::EmptyLabel));
        assert_eq!(DomainName::parse("a.b.."), Err(DomainError::EmptyLabel));
        assert!(matches!(
            DomainName::parse(&"a".repeat(64)),
            Err(DomainError::LabelTooLong { .. })
        ));
        let long = ["a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(63)].join(".");
        assert!(matches!(
            DomainName::parse(&long),
            Err(DomainError::NameTooLong { len: 255 })
        ));
        assert!(matches!(
            DomainName::parse("a b.com"),
            Err(DomainError::InvalidChar { ch: ' ' })
        ));
        assert!(matches!(
            DomainName::parse("xn--zz.com"),
            Err(DomainError::InvalidIdn { .. })
        ));
    }

    #[test]
    fn patterns() {
        assert_eq!(DomainPattern::parse("*"), Ok(DomainPattern::Any));
        assert_eq!(
            DomainPattern::parse("*.OpenAI.com."),
            Ok(DomainPattern::Subdomains(name("openai.com")))
        );
        for bad in ["**", "api.*.com", "*api.com", "*.*.com", "a*", "*.", "*.a..b"] {
            assert!(DomainPattern::parse(bad).is_err(), "{bad} should be rejected");
        }
        let wild = DomainPattern::parse("*.openai.com").unwrap_or(DomainPattern::Any);
        assert!(wild.matches(&name("api.openai.com")));
        assert!(wild.matches(&name("a.b.openai.com")));
        assert!(!wild.matches(&name("openai.com")));
        assert!(!wild.matches(&name("evilopenai.com")));
    }
}
