//! The `sluice check` and `sluice explain` commands, in-process, and the
//! documentation that shows them: every YAML block in
//! docs/configuration.md must load, and the `explain` transcript there must
//! be what the command prints.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::path::{Path, PathBuf};

use clap::Parser;
use sluice::cli::{self, Cli, Command};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(args: &[&str]) -> (i32, String, String) {
    let cli = Cli::try_parse_from(std::iter::once("sluice").chain(args.iter().copied())).unwrap();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = match cli.command.unwrap() {
        Command::Check { file } => cli::check(&file, &mut out, &mut err),
        Command::Explain(a) => cli::explain(&a, &mut out, &mut err),
        Command::Run(_) => unreachable!("not tested in-process"),
    };
    (code, String::from_utf8(out).unwrap(), String::from_utf8(err).unwrap())
}

/// Writes `text` to `name` in a fresh directory, removed when the guard
/// drops.
fn temp_file(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new().prefix("sluice-cli-test-").tempdir().unwrap();
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    (dir, p)
}

#[test]
fn check_summarises_examples() {
    for ex in ["quickstart", "ai-egress", "east-west"] {
        let p = root().join("examples").join(ex).join("sluice.yaml");
        let (code, out, err) = run(&["check", p.to_str().unwrap()]);
        assert_eq!(code, 0, "{ex}: {err}");
        assert!(out.contains(": OK"), "{out}");
        for field in [
            "listeners:",
            "webgroups:",
            "smartgroups:",
            "inventory:",
            "policy:",
            "patterns",
            "CIDRs",
        ] {
            assert!(out.contains(field), "{ex}: summary lacks {field}: {out}");
        }
    }
}

#[test]
fn check_warns_about_shadowed_rules() {
    let (_dir, p) = temp_file(
        "shadow.yaml",
        "smartgroups:\n  - {name: devs, cidrs: [10.0.0.0/24]}\npolicy:\n  rules:\n    - name: all-llms\n      to: {webgroups: [llm-providers]}\n      action: allow\n    - name: devs-llms\n      from: [devs]\n      to: {webgroups: [llm-providers]}\n      protocols: [tls]\n      action: deny\n",
    );
    let (code, out, _) = run(&["check", p.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(
        out.contains("line 8: rule `devs-llms` can never match: rule `all-llms` (line 5) matches every flow it would, with the opposite action"),
        "{out}"
    );
}

#[test]
fn check_reports_errors_with_positions() {
    let (_dir, p) = temp_file(
        "bad.yaml",
        "policy:\n  rules:\n    - name: r\n      to: {webgroups: [llm-provider]}\n      action: allow\n",
    );
    let (code, _, err) = run(&["check", p.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("bad.yaml:4:"), "{err}");
    assert!(err.contains("policy.rules[0].to.webgroups[0]"), "{err}");
    assert!(err.contains("did you mean `llm-providers`"), "{err}");
}

#[test]
fn explain_json() {
    let p = root().join("examples/ai-egress/sluice.yaml");
    let (code, out, err) = run(&[
        "explain",
        "-c",
        p.to_str().unwrap(),
        "--src",
        "10.1.0.30",
        "--dst",
        "169.254.169.254",
        "--port",
        "80",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["action"], "deny");
    assert_eq!(v["decided_by"], "builtin-guard");
    assert_eq!(v["reason"], "guard-cloud-metadata");
    assert_eq!(
        v["destination_smartgroups"],
        serde_json::json!(["cloud-metadata", "link-local"])
    );
}

#[test]
fn explain_rejects_bad_input() {
    let (code, _, err) = run(&["explain", "--src", "10.0.0.1", "--sni", "a..b"]);
    assert_eq!(code, 2);
    assert!(err.contains("empty label"), "{err}");
    let (code, _, err) = run(&["explain", "--src", "10.0.0.1"]);
    assert_eq!(code, 2);
    assert!(err.contains("give a destination"), "{err}");
}

fn doc() -> String {
    std::fs::read_to_string(root().join("docs/configuration.md")).unwrap()
}

/// Fenced blocks of `doc` with the given info string, with the line each
/// starts on.
fn blocks(doc: &str, info: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, bool, String)> = None;
    for (n, line) in doc.lines().enumerate() {
        match (&mut current, line.strip_prefix("```")) {
            (None, Some(tag)) => current = Some((n + 2, tag.trim() == info, String::new())),
            (Some(_), Some(_)) => {
                if let Some((start, true, text)) = current.take() {
                    out.push((start, text));
                }
            }
            (Some((_, _, text)), None) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, None) => {}
        }
    }
    out
}

#[test]
fn every_yaml_block_in_the_configuration_reference_loads() {
    let doc = doc();
    let yaml = blocks(&doc, "yaml");
    assert!(yaml.len() >= 8, "found only {} yaml blocks", yaml.len());
    for (line, text) in yaml {
        if let Err(e) = sluice_api::config::load_str(&text, &format!("docs/configuration.md (block at line {line})")) {
            panic!("{e}");
        }
    }
}

#[test]
fn the_explain_transcript_in_the_docs_is_real() {
    let doc = doc();
    let transcript = blocks(&doc, "")
        .into_iter()
        .find(|(_, b)| b.starts_with("$ sluice explain"))
        .expect("an explain transcript")
        .1
        .clone();
    let mut lines = transcript.lines();
    let cmd = lines.next().unwrap().trim_start_matches("$ sluice ");
    let expected: String = lines.map(|l| format!("{l}\n")).collect();
    let args: Vec<String> = cmd
        .split_whitespace()
        .map(|a| {
            if a.starts_with("examples/") {
                root().join(a).display().to_string()
            } else {
                a.to_owned()
            }
        })
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, expected);
}
