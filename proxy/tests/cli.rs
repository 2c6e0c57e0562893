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
        Command::Check(a) => cli::check(a.path().unwrap(), &mut out, &mut err),
        Command::Explain(a) => cli::explain(&a, &mut out, &mut err),
        Command::Health(a) => cli::health(&a, &mut out, &mut err),
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
    let want = format!(
        "{}:8:7: warning: rule `devs-llms` can never match: rule `all-llms` (line 5) matches every flow it would, with the opposite action",
        p.display()
    );
    assert!(out.lines().any(|l| l.starts_with(&want)), "{out}");
}

/// Regression (issue 13, item 7): warnings used another format
/// (`file:line 7:`) than errors, and could be printed twice.
#[test]
fn check_warnings_use_the_error_format_once_each() {
    let (_dir, p) = temp_file(
        "twice.yaml",
        "listeners:\n  - {name: p, kind: http-proxy, address: \"127.0.0.1:3128\"}\nsmartgroups:\n  - name: web\n    selectors: [{app: web}, {app: web}]\npolicy:\n  rules:\n    - {name: r, from: [web], action: allow}\n",
    );
    let (code, out, _) = run(&["check", p.to_str().unwrap()]);
    assert_eq!(code, 0);
    let warnings: Vec<&str> = out.lines().filter(|l| l.contains(": warning: ")).collect();
    let file = p.display().to_string();
    for w in &warnings {
        let pos = w
            .strip_prefix(&format!("{file}:"))
            .and_then(|r| r.split_once(": warning: "))
            .map(|(pos, _)| pos);
        let ok = pos.is_some_and(|pos| {
            let parts: Vec<&str> = pos.split(':').collect();
            parts.len() == 2 && parts.iter().all(|n| n.parse::<u32>().is_ok_and(|n| n > 0))
        });
        assert!(ok, "not `file:line:col: warning: …`: {w}");
        assert_eq!(
            warnings.iter().filter(|x| *x == w).count(),
            1,
            "printed twice: {w}\n{out}"
        );
    }
    let selector: Vec<&&str> = warnings.iter().filter(|w| w.contains("selector {app: web}")).collect();
    assert_eq!(selector.len(), 1, "{out}");
    assert!(selector[0].starts_with(&format!("{file}:4:5: warning: ")), "{out}");
}

#[test]
fn check_takes_the_file_with_dash_c_or_positionally() {
    let p = root().join("examples/quickstart/sluice.yaml");
    let (c1, o1, _) = run(&["check", "-c", p.to_str().unwrap()]);
    let (c2, o2, _) = run(&["check", p.to_str().unwrap()]);
    let (c3, o3, _) = run(&["check", "--config", p.to_str().unwrap()]);
    assert_eq!((c1, c2, c3), (0, 0, 0));
    assert_eq!(o1, o2);
    assert_eq!(o1, o3);
    assert!(Cli::try_parse_from(["sluice", "check"]).is_err(), "a file is required");
}

/// Regression (issue 13, item 8): an empty file passed `check` silently and
/// ran with no listener.
#[test]
fn an_empty_file_warns_in_check_and_does_not_run() {
    let (_dir, p) = temp_file("empty.yaml", "");
    let (code, out, _) = run(&["check", p.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("{}: warning: no listeners", p.display())),
        "{out}"
    );
    let mut err = Vec::new();
    let args = cli::RunArgs {
        config: Some(p.clone()),
    };
    assert_eq!(cli::run(&args, &mut err), 1);
    let err = String::from_utf8(err).unwrap();
    assert!(
        err.contains("defines no listeners, so there is nothing to run"),
        "{err}"
    );
}

#[test]
fn top_level_help_says_a_bare_sluice_runs_the_embedded_default() {
    use clap::CommandFactory;
    let help = Cli::command().render_long_help().to_string();
    assert!(
        help.contains("With no command, `sluice` runs the embedded default configuration"),
        "{help}"
    );
}

/// Issue 13, item 4: `check` says which rules lift which guard, and warns
/// when `resolver.hosts` maps an allowed name to a guarded address that the
/// rule allowing it does not name.
#[test]
fn check_lists_guard_lifts_and_warns_about_guarded_hosts() {
    let (_dir, p) = temp_file(
        "guard.yaml",
        "listeners:
  - {name: p, kind: http-proxy, address: \"127.0.0.1:3128\"}
resolver:
  hosts:
    test.example: [127.0.0.1]
    lifted.example: [127.0.0.1]
webgroups:
  - {name: t, domains: [test.example]}
  - {name: l, domains: [lifted.example]}
smartgroups:
  - {name: ops, cidrs: [10.0.0.0/24]}
policy:
  rules:
    - {name: allow-test, to: {webgroups: [t]}, action: allow}
    - {name: allow-lifted, to: {webgroups: [l], smartgroups: [gateway]}, action: allow}
    - {name: ops-metadata, from: [ops], to: {smartgroups: [cloud-metadata]}, action: allow}
    - {name: no-loopback, to: {smartgroups: [loopback]}, action: deny}
",
    );
    let (code, out, _) = run(&["check", p.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("rule `allow-lifted` lifts gateway"), "{out}");
    assert!(out.contains("rule `ops-metadata` lifts cloud-metadata"), "{out}");
    assert!(
        !out.contains("rule `no-loopback` lifts"),
        "a deny rule lifts nothing: {out}"
    );
    let warning = format!(
        "{}:5:19: warning: `test.example` resolves to 127.0.0.1, in the guarded group `gateway`, and the rule that allows it (`allow-test`) does not name `gateway` in its `to`",
        p.display()
    );
    assert!(out.lines().any(|l| l.starts_with(&warning)), "{out}");
    assert!(!out.contains("`lifted.example` resolves"), "{out}");
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

/// Every `$ sluice check -c NAME` transcript in the reference is what
/// `check` prints for the block tagged `yaml NAME` (a file that is meant
/// not to load, so the every-block-loads test leaves it alone).
#[test]
fn the_check_transcripts_in_the_docs_are_real() {
    let doc = doc();
    let transcripts: Vec<String> = blocks(&doc, "")
        .into_iter()
        .map(|(_, b)| b)
        .filter(|b| b.starts_with("$ sluice check -c "))
        .collect();
    assert!(transcripts.len() >= 2, "{transcripts:?}");
    for t in transcripts {
        let mut lines = t.lines();
        let name = lines.next().unwrap().trim_start_matches("$ sluice check -c ").trim();
        let expected: String = lines.map(|l| format!("{l}\n")).collect();
        let (_, file) = blocks(&doc, &format!("yaml {name}"))
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no `yaml {name}` block for the transcript"));
        let (_dir, p) = temp_file(name, &file);
        let (code, out, err) = run(&["check", "-c", p.to_str().unwrap()]);
        let shown = if code == 0 { out } else { err };
        assert_eq!(shown.replace(&p.display().to_string(), name), expected, "{name}");
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
