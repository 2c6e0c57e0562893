//! Runs every scenario in `conformance/policy/` against Sluice's policy
//! engine and reports every mismatch (file, line, flow index) before failing.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::io::Write as _;
use std::path::PathBuf;

use sluice::policy::{DecidedBy, Step};
use sluice_api::reason::ReasonCode;
use sluice_conformance::policy::{
    KnownGap, MIN_FLOWS, ParsedFlow, Scenario, SluiceEngine, compile_config, load_dir, observe, parse_known_gaps, run,
};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policy")
}

fn scenarios() -> Vec<Scenario> {
    load_dir(&dir()).unwrap_or_else(|e| panic!("cannot load scenarios: {e}"))
}

/// Writes straight to stderr, past the test harness's capture, so skipped
/// gaps and the totals show in every `cargo test` run, not only on failure.
fn loud(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

fn known_gaps() -> Vec<KnownGap> {
    match std::fs::read_to_string(dir().join("KNOWN_GAPS.md")) {
        Ok(text) => parse_known_gaps(&text).unwrap_or_else(|e| panic!("{e}")),
        Err(_) => Vec::new(),
    }
}

#[test]
fn policy_scenarios() {
    let scenarios = scenarios();
    let gaps = known_gaps();
    let mut problems = Vec::new();
    for s in &scenarios {
        if s.flows.is_empty() {
            problems.push(format!("{}: the scenario has no flows", s.file));
        }
        if s.description.trim().is_empty() {
            problems.push(format!("{}: the scenario has no description", s.file));
        }
    }
    for g in &gaps {
        let exists = scenarios.iter().any(|s| s.file == g.file && g.index < s.flows.len());
        if !exists {
            problems.push(format!(
                "KNOWN_GAPS.md lists {}#{}, which does not exist",
                g.file, g.index
            ));
        }
    }

    // Every reason code is exercised by at least one flow.
    for code in ReasonCode::ALL {
        if !scenarios
            .iter()
            .flat_map(|s| &s.flows)
            .any(|f| f.flow.reason == code.as_str())
        {
            problems.push(format!("no scenario flow expects reason `{code}`"));
        }
    }

    let report = run(&SluiceEngine, &scenarios, &gaps);
    for (m, why) in &report.skipped {
        loud(&format!("SKIPPED (known gap: {why}): {m}"));
    }
    loud(&format!(
        "policy scenarios: {} files, {} flows, {} passed, {} known gaps skipped, {} mismatches",
        report.files,
        report.flows,
        report.passed,
        report.skipped.len(),
        report.mismatches.len()
    ));
    if report.flows < MIN_FLOWS {
        problems.push(format!(
            "only {} flows in total; the suite needs at least {MIN_FLOWS}",
            report.flows
        ));
    }
    problems.extend(report.mismatches.iter().map(ToString::to_string));
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// `explain` must reach the same verdict as `decide`, and say so in its
/// rendered fields, for every scenario flow.
#[test]
fn explain_agrees_with_decide() {
    let mut checked = 0;
    let mut problems = Vec::new();
    for s in scenarios() {
        let Ok(policy) = compile_config(&s) else {
            continue;
        };
        for (i, lf) in s.flows.iter().enumerate() {
            let Ok(parsed) = ParsedFlow::parse(&lf.flow) else {
                continue;
            };
            let q = parsed.query();
            let decided = policy.decide(&q);
            let explained = policy.explain(&q);
            checked += 1;
            let o = observe(&policy, &decided);
            let rendered = (
                explained.action,
                explained.enforcement,
                explained.decided_by.as_str(),
                explained.reason,
                explained.source_group.as_deref(),
                explained.destination_group.as_deref(),
            );
            let expected = (
                o.action.as_str(),
                o.enforcement.as_str(),
                o.rule.as_str(),
                o.reason.as_str(),
                o.source_group.as_deref(),
                o.dest_group.as_deref(),
            );
            if explained.verdict != decided || rendered != expected {
                problems.push(format!(
                    "{}:{} flows[{i}]: explain {:?} / {rendered:?} != decide {decided:?} / {expected:?}",
                    s.file, lf.line, explained.verdict
                ));
            }
            // The chain: the guard, then every rule tried (skipped ones, the
            // match), then the default if nothing matched. When the guard
            // decides, the rules tried up to the one that matched (if any,
            // overruled because it does not lift the guard) come between
            // the guard's two steps.
            let matched = explained
                .steps
                .iter()
                .filter(|s| matches!(s, Step::RuleMatched { .. }))
                .count();
            let rule_steps = explained
                .steps
                .iter()
                .filter(|s| matches!(s, Step::RuleMatched { .. } | Step::RuleSkipped { .. }))
                .count();
            let (want_steps, want_matched) = match decided.decided_by {
                DecidedBy::BuiltinGuard => {
                    let tried = if matched == 1 { rule_steps } else { policy.rule_count() };
                    let ends_with_guard = matches!(explained.steps.last(), Some(Step::Guard { .. }));
                    let match_is_last_rule =
                        matched == 0 || matches!(explained.steps.iter().rev().nth(1), Some(Step::RuleMatched { .. }));
                    (
                        if ends_with_guard && match_is_last_rule {
                            2 + tried
                        } else {
                            usize::MAX
                        },
                        matched.min(1),
                    )
                }
                DecidedBy::Rule(r) => (1 + r as usize + 1, 1),
                DecidedBy::Default => (1 + policy.rule_count() + 1, 0),
            };
            if explained.steps.len() != want_steps || matched != want_matched {
                let steps: Vec<String> = explained.steps.iter().map(ToString::to_string).collect();
                problems.push(format!(
                    "{}:{} flows[{i}]: explain chain has {} steps ({matched} matches), expected {want_steps} \
                     ({want_matched}):\n  {}",
                    s.file,
                    lf.line,
                    explained.steps.len(),
                    steps.join("\n  ")
                ));
            }
        }
    }
    loud(&format!("explain checked against decide on {checked} flows"));
    assert!(checked >= MIN_FLOWS, "only {checked} flows explained");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn known_gaps_format() {
    let gaps = parse_known_gaps("# Known gaps\n\nprose\n- `a.yaml#3`: because\n").unwrap();
    assert_eq!(
        gaps,
        vec![KnownGap {
            file: "a.yaml".into(),
            index: 3,
            reason: "because".into()
        }]
    );
    assert!(parse_known_gaps("- `a.yaml#x`: because\n").is_err());
    assert!(parse_known_gaps("- `a.yaml#1`:\n").is_err());
}
