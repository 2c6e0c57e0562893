//! Every relative link in the repository's Markdown resolves: the file it
//! names exists, and an `#anchor` names a heading of that file (GitHub's
//! slugs). Regression (issue 13, item 15): user docs linked to a design
//! document outside the repository and to raw results that are not
//! committed.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::collections::HashSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The Markdown files users read: the README, `docs/`, `bench/`,
/// `examples/`, `conformance/`, `sdk/`, `plugins/`, `docker/`.
fn markdown_files() -> Vec<PathBuf> {
    let mut out = vec![root().join("README.md")];
    let mut stack: Vec<PathBuf> = ["docs", "bench", "examples", "conformance", "sdk", "plugins", "docker"]
        .iter()
        .map(|d| root().join(d))
        .collect();
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if p.is_dir() && name != "out" && name != "target" && !name.starts_with('.') {
                stack.push(p);
            } else if name.ends_with(".md") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// GitHub's anchor for a heading: lower case, punctuation other than `-`
/// and `_` dropped, spaces to `-`; repeats get `-1`, `-2`, ….
fn anchors(text: &str) -> HashSet<String> {
    let mut seen: HashSet<String> = HashSet::new();
    let mut in_code = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        let Some(title) = line.strip_prefix('#').map(|l| l.trim_start_matches('#')) else {
            continue;
        };
        if !title.starts_with(' ') {
            continue;
        }
        let slug: String = title
            .trim()
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect();
        let mut unique = slug.clone();
        let mut n = 1;
        while seen.contains(&unique) {
            unique = format!("{slug}-{n}");
            n += 1;
        }
        seen.insert(unique);
    }
    seen
}

/// `(line, target)` of every inline link outside code blocks and spans.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut in_code = false;
    for (n, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        // Drop code spans: `[a](b)` inside backticks is not a link.
        let mut plain = String::new();
        for (i, part) in line.split('`').enumerate() {
            if i % 2 == 0 {
                plain.push_str(part);
            }
        }
        let mut rest = plain.as_str();
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let Some(end) = after.find(')') else { break };
            out.push((n + 1, after[..end].trim().to_owned()));
            rest = &after[end..];
        }
    }
    out
}

#[test]
fn every_relative_link_in_the_markdown_resolves() {
    let files = markdown_files();
    assert!(files.len() >= 5, "{files:?}");
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (line, target) in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (path, anchor) = target.split_once('#').unwrap_or((&target, ""));
            let resolved = if path.is_empty() {
                file.clone()
            } else {
                file.parent().unwrap().join(path)
            };
            let shown = format!(
                "{}:{line}: ({target})",
                file.strip_prefix(root()).unwrap_or(file).display()
            );
            if !resolved.exists() {
                broken.push(format!("{shown}: no such file"));
                continue;
            }
            if path.contains("bench/out") || path.starts_with("out/") {
                broken.push(format!("{shown}: bench/out is not committed"));
                continue;
            }
            if !anchor.is_empty() && resolved.extension().is_some_and(|e| e == "md") {
                let heads = anchors(&std::fs::read_to_string(&resolved).unwrap());
                if !heads.contains(anchor) {
                    broken.push(format!("{shown}: no heading with anchor `#{anchor}`"));
                }
            }
        }
    }
    assert!(checked > 0);
    assert!(
        broken.is_empty(),
        "{} broken link(s):\n{}",
        broken.len(),
        broken.join("\n")
    );
}

#[test]
fn the_docs_cite_no_document_outside_the_repository() {
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        for (n, line) in text.lines().enumerate() {
            assert!(
                !line.contains("shared/DESIGN.md") && !line.contains("(DESIGN.md)"),
                "{}:{}: cites the design document, which is not in the repository: {line}",
                file.display(),
                n + 1
            );
        }
    }
}

#[test]
fn slugs_follow_github() {
    let a = anchors(
        "# Title\n## `admin`\n### Verdicts and reason codes\n## Run (2026-11-23 19:33 UTC, `f152537`)\n## Title\n```\n# not a heading\n```\n",
    );
    for want in [
        "title",
        "admin",
        "verdicts-and-reason-codes",
        "run-2026-11-23-1933-utc-f152537",
        "title-1",
    ] {
        assert!(a.contains(want), "{want} not in {a:?}");
    }
    assert!(!a.contains("not-a-heading"));
}
