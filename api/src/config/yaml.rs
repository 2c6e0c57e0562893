//! The YAML layer of loading: text → [`RawConfig`], with every problem of
//! shape reported, not just the first.
//!
//! serde stops at the first unknown field, unknown value or value of the
//! wrong type. Each time it does, the problem is recorded with its field
//! path and position, the offending node is marked to be skipped, and the
//! text is read again ([`super::track`] does the skipping), until it reads
//! through. The validator then sees everything else, and is told which
//! paths were skipped so it does not call them missing.
//!
//! A syntax error is different: the text has no structure past it, so it
//! is the only problem reported, placed where the mistake is (an unclosed
//! bracket at its opening, not where the parser gave up) and with a fix.

use std::collections::HashSet;

use serde::Deserialize;
use serde_saphyr::Location;

use super::error::{ConfigError, ConfigErrorKind, suggest};
use super::raw::RawConfig;
use super::track::{Track, Tracker, join};

/// More problems than this in one file are not worth reading one by one.
const MAX_PROBLEMS: usize = 100;

/// What the YAML layer made of a file.
pub(super) struct Parsed {
    pub raw: RawConfig,
    /// Unknown fields and values, wrong types: in the order found.
    pub errors: Vec<ConfigError>,
    /// Paths of the nodes skipped for those errors.
    pub skipped: HashSet<String>,
}

/// Reads `text` (named `file` in messages). `Err` holds the one syntax
/// error that stops reading.
pub(super) fn parse(text: &str, file: &str) -> Result<Parsed, Box<ConfigError>> {
    // An empty file is an empty configuration, not a YAML error.
    let text = if text.trim().is_empty() { "{}" } else { text };
    // A key given twice is found here, all of them with their positions;
    // serde then reads the first of each, so the rest can be checked too.
    let mut errors: Vec<ConfigError> = duplicate_keys(text)
        .into_iter()
        .map(|(path, key, (line, column))| ConfigError {
            file: file.to_owned(),
            line,
            column,
            path,
            kind: ConfigErrorKind::DuplicateKey { key },
        })
        .collect();
    let mut options = serde_saphyr::Options::default();
    options.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::FirstWins;
    let mut skip = HashSet::new();
    loop {
        let tracker = Tracker::new(skip);
        let result = serde_saphyr::with_deserializer_from_str_with_options(text, options.clone(), |de| {
            RawConfig::deserialize(Track::new(de, &tracker))
        });
        let failed_at = tracker.failure();
        skip = tracker.into_skip();
        let e = match result {
            Ok(raw) => {
                return Ok(Parsed {
                    raw,
                    errors,
                    skipped: skip,
                });
            }
            Err(e) => e,
        };
        let path = failed_at.unwrap_or_default();
        let Some((kind, loc, node)) = shape_problem(text, e.without_snippet(), &path) else {
            return Err(Box::new(syntax_error(text, file, e.without_snippet())));
        };
        let progress = !node.is_empty() && skip.insert(node.clone());
        errors.push(ConfigError {
            file: file.to_owned(),
            line: loc.line() as u32,
            column: loc.column() as u32,
            path: node,
            kind,
        });
        if !progress || errors.len() >= MAX_PROBLEMS {
            // Nothing left to skip (the document itself is the wrong
            // shape), or enough said: report what was found, and validate
            // nothing else.
            return Ok(Parsed {
                raw: empty(),
                errors,
                skipped: skip,
            });
        }
    }
}

/// The configuration of an empty document: what is left to validate when
/// the whole document was the wrong shape.
pub(super) fn empty() -> RawConfig {
    serde_saphyr::from_str("{}").unwrap_or_else(|_| unreachable!("an empty mapping is a valid configuration"))
}

/// A problem serde found in a well-formed document: its kind, where it is,
/// and the path of the node to skip. `None` for a syntax error.
fn shape_problem(text: &str, e: &serde_saphyr::Error, path: &str) -> Option<(ConfigErrorKind, Location, String)> {
    use serde_saphyr::Error as E;
    let at = e.location().unwrap_or(Location::UNKNOWN);
    Some(match e {
        E::SerdeUnknownField { field, expected, .. } => (
            ConfigErrorKind::UnknownField {
                field: field.clone(),
                suggestion: suggest(field, expected.iter().copied()),
                expected: expected.iter().map(|s| (*s).to_owned()).collect(),
            },
            at,
            path.to_owned(),
        ),
        E::SerdeUnknownVariant { variant, expected, .. } => (
            ConfigErrorKind::UnknownValue {
                value: variant.clone(),
                suggestion: suggest(variant, expected.iter().copied()),
                expected: expected.iter().map(|s| (*s).to_owned()).collect(),
            },
            at,
            path.to_owned(),
        ),
        E::SerdeMissingField { field, .. } => (
            ConfigErrorKind::MissingField {
                field: (*field).to_owned(),
            },
            at,
            path.to_owned(),
        ),
        E::InvalidScalar { ty, .. } => (
            ConfigErrorKind::WrongType {
                expected: expected_words(ty).to_owned(),
                found: found_at(text, pos(at)),
            },
            at,
            path.to_owned(),
        ),
        E::Unexpected { expected, .. } => (
            ConfigErrorKind::WrongType {
                expected: expected_words(expected).to_owned(),
                found: found_at(text, pos(at)),
            },
            at,
            path.to_owned(),
        ),
        E::SerdeInvalidType { expected, .. } => (
            ConfigErrorKind::WrongType {
                expected: expected_words(expected).to_owned(),
                found: found_at(text, pos(at)),
            },
            at,
            path.to_owned(),
        ),
        E::SerdeInvalidValue {
            unexpected, expected, ..
        } => (
            ConfigErrorKind::InvalidValue {
                message: format!("{unexpected} is not {}", expected_words(expected)),
            },
            at,
            path.to_owned(),
        ),
        E::NullIntoString { .. } => (
            ConfigErrorKind::WrongType {
                expected: "a value".to_owned(),
                found: "nothing".to_owned(),
            },
            at,
            path.to_owned(),
        ),
        _ => return None,
    })
}

/// Every mapping key given twice: (path, key, position of the repeat). Stops
/// quietly at a syntax error (reported by the deserializer) or a key that is
/// itself a list or mapping (which the configuration never uses).
fn duplicate_keys(text: &str) -> Vec<(String, String, Pos)> {
    use serde_saphyr::granit_parser::{Event, Parser};

    enum Frame {
        Map {
            seen: HashSet<String>,
            /// The key whose value is being read; `None` while a key is due.
            key: Option<String>,
        },
        Seq {
            index: usize,
        },
    }
    let mut out = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    // The path of each open collection, as rendered in errors.
    let mut paths: Vec<String> = vec![String::new()];
    // Where the node that starts now sits in its parent; `None` for a key.
    let place = |stack: &mut Vec<Frame>, paths: &[String]| -> Option<String> {
        let parent = paths.last().cloned().unwrap_or_default();
        match stack.last_mut() {
            None => Some(parent),
            Some(Frame::Seq { index }) => {
                let p = format!("{parent}[{index}]");
                *index += 1;
                Some(p)
            }
            Some(Frame::Map { key: Some(k), .. }) => Some(join(&parent, k)),
            Some(Frame::Map { key: None, .. }) => None,
        }
    };
    // A value has been read: the parent mapping expects a key again.
    let value_done = |stack: &mut Vec<Frame>| {
        if let Some(Frame::Map { key, .. }) = stack.last_mut() {
            *key = None;
        }
    };
    for item in Parser::new_from_str(text) {
        let Ok((event, span)) = item else { break };
        match event {
            Event::Scalar(value, ..) => match place(&mut stack, &paths) {
                Some(_) => value_done(&mut stack),
                None => {
                    let parent = paths.last().cloned().unwrap_or_default();
                    if let Some(Frame::Map { seen, key }) = stack.last_mut() {
                        let k = value.into_owned();
                        if k != "<<" && !seen.insert(k.clone()) {
                            let at = (span.start.line() as u32, span.start.col() as u32 + 1);
                            out.push((join(&parent, &k), k.clone(), at));
                        }
                        *key = Some(k);
                    }
                }
            },
            Event::Alias(_) => {
                if place(&mut stack, &paths).is_none() {
                    break;
                }
                value_done(&mut stack);
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let Some(path) = place(&mut stack, &paths) else {
                    break;
                };
                paths.push(path);
                stack.push(if matches!(event, Event::MappingStart(..)) {
                    Frame::Map {
                        seen: HashSet::new(),
                        key: None,
                    }
                } else {
                    Frame::Seq { index: 0 }
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                stack.pop();
                paths.pop();
                value_done(&mut stack);
            }
            _ => {}
        }
    }
    out
}

/// serde's and serde-saphyr's names for what a field takes, in the words of
/// the configuration reference.
fn expected_words(what: &str) -> &str {
    match what {
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" | "i8" | "i16" | "i32" | "i64" | "i128" | "isize"
        | "an integer" | "a number" => "a whole number",
        "f32" | "f64" | "a float" => "a number",
        "bool" | "a boolean" => "`true` or `false`",
        "string scalar" | "a string" | "string" | "a character" | "char" => "a single value (text)",
        "sequence start" | "a sequence" | "sequence" => "a list (`[a, b]`, or `- item` lines)",
        "mapping start" | "a map" | "map" => "a mapping (`key: value` lines, or `{key: value}`)",
        s if s.starts_with("struct ") => "a mapping (`key: value` lines, or `{key: value}`)",
        s if s.starts_with("a sequence") => "a list (`[a, b]`, or `- item` lines)",
        s => s,
    }
}

/// What the text holds at `loc`, for "found …": the scalar written there,
/// or the kind of collection that starts there.
fn found_at(text: &str, loc: Pos) -> String {
    let Some(rest) = offset_of(text, loc).and_then(|o| text.get(o..)) else {
        return "something else".to_owned();
    };
    let rest = rest.trim_start_matches([' ', '\t']);
    if rest.starts_with('[') || rest.starts_with("- ") || rest.starts_with("-\n") {
        return "a list".to_owned();
    }
    if rest.starts_with('{') {
        return "a mapping".to_owned();
    }
    let token: &str = rest.lines().next().unwrap_or("");
    let token = token
        .split(" #")
        .next()
        .unwrap_or(token)
        .trim_end_matches([',', ']', '}'])
        .trim();
    if token.is_empty() {
        // A key with nothing after it, whose value is the indented block
        // on the next lines.
        return "a mapping or list".to_owned();
    }
    if token.contains(": ") || token.ends_with(':') {
        return "a mapping".to_owned();
    }
    format!("`{token}`")
}

/// A 1-based line and column.
type Pos = (u32, u32);

fn pos(loc: Location) -> Pos {
    (loc.line() as u32, loc.column() as u32)
}

/// Byte offset of a 1-based line and column.
fn offset_of(text: &str, (line, col): Pos) -> Option<usize> {
    let (line, col) = (line as usize, col as usize);
    if line == 0 || col == 0 {
        return None;
    }
    if text.split_inclusive('\n').count() < line {
        return None;
    }
    let start: usize = text.split_inclusive('\n').take(line - 1).map(str::len).sum();
    let line_text = text.get(start..)?.lines().next().unwrap_or("");
    let in_line: usize = line_text.chars().take(col - 1).map(char::len_utf8).sum();
    Some(start + in_line)
}

/// 1-based line and column of a byte offset.
fn position_of(text: &str, offset: usize) -> Pos {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line as u32, col as u32)
}

/// The one error for text that is not YAML: where the mistake is, what it
/// is, and the fix.
fn syntax_error(text: &str, file: &str, e: &serde_saphyr::Error) -> ConfigError {
    let at = pos(e.location().unwrap_or(Location::UNKNOWN));
    let (mut line, mut column) = at;
    let raw = strip_position(&e.to_string());
    let (message, fix) = if let Some((opener, l, c)) = offset_of(text, at).and_then(|o| unclosed_bracket(text, o)) {
        // The parser gives up where the list or mapping should have ended,
        // often a line later; the mistake is the opening bracket.
        (line, column) = (l, c);
        let close = if opener == '[' { ']' } else { '}' };
        (
            format!("this `{opener}` is never closed"),
            format!(
                "close it with `{close}` on the same line, or write the {} as one `{}` per line",
                if opener == '[' { "list" } else { "mapping" },
                if opener == '[' { "- item" } else { "key: value" }
            ),
        )
    } else if raw.contains("found a tab") || raw.contains("tab") && raw.contains("indent") {
        (
            "a tab character".to_owned(),
            "YAML is indented with spaces only; replace the tab with spaces".to_owned(),
        )
    } else if raw.contains("unclosed quote") {
        (
            "this quoted value is never closed".to_owned(),
            "add the closing quote, or remove the opening one".to_owned(),
        )
    } else if raw.contains("misplaced bracket") {
        (
            "a closing bracket with no opening one".to_owned(),
            "remove it, or add the `[` or `{` it closes".to_owned(),
        )
    } else if raw.contains("mapping values are not allowed") || raw.contains("illegal placement of ':'") {
        (
            "a `:` where a value was expected".to_owned(),
            "check the indentation of this line against the one above, and quote values that contain `: `".to_owned(),
        )
    } else if raw.contains("did not find expected") || raw.contains("expected") {
        (
            raw.clone(),
            "check the indentation and punctuation of this line and the one above".to_owned(),
        )
    } else {
        (
            raw.clone(),
            "check the indentation and punctuation around here".to_owned(),
        )
    };
    ConfigError {
        file: file.to_owned(),
        line,
        column,
        path: String::new(),
        kind: ConfigErrorKind::Syntax { message, fix },
    }
}

/// serde-saphyr appends " at line L, column C" to its messages; we print
/// our own position.
fn strip_position(s: &str) -> String {
    let s = s.lines().find(|l| !l.trim().is_empty()).unwrap_or(s).trim();
    match s.rfind(" at line ") {
        Some(i) if s[i..].contains(", column ") => s[..i].to_owned(),
        _ => s.to_owned(),
    }
}

/// The innermost flow bracket (`[` or `{`) opened before `offset` on an
/// earlier line and not closed by then, with its position. Quotes and
/// comments are skipped.
fn unclosed_bracket(text: &str, offset: usize) -> Option<(char, u32, u32)> {
    let before = text.get(..offset)?;
    let mut stack: Vec<(char, usize)> = Vec::new();
    let mut quote: Option<char> = None;
    let mut comment = false;
    let mut prev = '\n';
    for (i, ch) in before.char_indices() {
        if comment {
            if ch == '\n' {
                comment = false;
            }
            prev = ch;
            continue;
        }
        match quote {
            Some(q) if ch == q => quote = None,
            Some(_) => {}
            None => match ch {
                '\'' | '"' if matches!(prev, ' ' | '[' | '{' | ',' | ':' | '\n') => quote = Some(ch),
                '#' if prev.is_whitespace() => comment = true,
                '[' | '{' => stack.push((ch, i)),
                ']' | '}' => {
                    stack.pop();
                }
                _ => {}
            },
        }
        prev = ch;
    }
    let (opener, at) = stack.pop()?;
    let error_line = before.matches('\n').count();
    let opener_line = text.get(..at)?.matches('\n').count();
    if opener_line >= error_line {
        return None;
    }
    let (l, c) = position_of(text, at);
    Some((opener, l, c))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "test code: a panic is the failure report")]
mod tests {
    use super::*;

    #[test]
    fn found_names_what_is_there() {
        let t = "a: abc\nb: [1]\nc: {x: 1}\nd:\n  - 1\ne: 5 # note\n";
        let at = |l, c| (l, c);
        assert_eq!(found_at(t, at(1, 4)), "`abc`");
        assert_eq!(found_at(t, at(2, 4)), "a list");
        assert_eq!(found_at(t, at(3, 4)), "a mapping");
        assert_eq!(found_at(t, at(5, 3)), "a list");
        assert_eq!(found_at(t, at(6, 4)), "`5`");
        assert_eq!(found_at(t, at(99, 1)), "something else");
    }

    #[test]
    fn unclosed_brackets_are_found_at_their_opening() {
        let t = "a: [x, y\nb: 1\n";
        let err_at = offset_of(t, (2, 2)).unwrap();
        assert_eq!(unclosed_bracket(t, err_at), Some(('[', 1, 4)));
        // Closed, quoted or commented brackets are not.
        for t in ["a: [x]\nb: 1\n", "a: '[x'\nb: 1\n", "a: 1 # [x\nb: 1\n"] {
            let err_at = offset_of(t, (2, 2)).unwrap();
            assert_eq!(unclosed_bracket(t, err_at), None, "{t}");
        }
    }

    #[test]
    fn duplicate_keys_are_found_with_paths_and_positions() {
        let t = "a: 1\nb:\n  - {x: 1, x: 2}\n  - y: 1\n    y: 2\na: 3\n";
        assert_eq!(
            duplicate_keys(t),
            vec![
                ("b[0].x".to_owned(), "x".to_owned(), (3, 12)),
                ("b[1].y".to_owned(), "y".to_owned(), (5, 5)),
                ("a".to_owned(), "a".to_owned(), (6, 1)),
            ]
        );
        assert!(duplicate_keys("a: [1, 1]\nb: {c: 1, d: 1}\n").is_empty());
    }

    #[test]
    fn positions_are_stripped_from_messages() {
        assert_eq!(strip_position("unclosed quote at line 1, column 8"), "unclosed quote");
        assert_eq!(strip_position("no position here"), "no position here");
    }
}
