//! Every shipped configuration — `examples/**/*.yaml` and the embedded
//! default — loads cleanly, and rejects an unknown key injected at every level
//! of it, naming the key and its line (STYLE.md §2).
//!
//! Injection edits the YAML text line by line at the right indentation, so
//! the rest of the document, its comments and positions, stay as written.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

use std::path::{Path, PathBuf};

use sluice_api::config::{ConfigErrorKind, EMBEDDED_DEFAULT, EMBEDDED_DEFAULT_NAME, load_str};

const KEY: &str = "bogus_key_for_test";

/// Sections that are lists of mappings: the key goes into their first item.
const LIST_SECTIONS: [&str; 5] = ["listeners", "webgroups", "smartgroups", "inventory", "plugins"];
/// Sections that are mappings: the key goes inside them.
const MAP_SECTIONS: [&str; 5] = ["policy", "admin", "audit", "gateway", "xds"];
/// Directories a control server serves (`sluice-xds serve --config-dir`):
/// their files are parts of one configuration, loaded together.
const SERVED_DIRS: [&str; 1] = ["xds/config"];
/// Directories of YAML that is not Sluice's: Kubernetes manifests, checked
/// against the Kubernetes schemas by `scripts/k8s-validate` (which also
/// runs the policy and gateway configuration they embed through
/// `sluice-xds check` and `sluice check`).
const OTHER_YAML: [&str; 1] = ["kubernetes"];

/// (name, text) of every shipped configuration.
fn shipped() -> Vec<(String, String)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut files = Vec::new();
    collect_yaml(&root, &mut files);
    files.sort();
    assert!(
        files.len() >= 3,
        "expected the example configs under {}",
        root.display()
    );
    let mut out: Vec<(String, String)> = files
        .iter()
        .map(|p| {
            let name = p.strip_prefix(&root).unwrap_or(p).display().to_string();
            (format!("examples/{name}"), std::fs::read_to_string(p).unwrap())
        })
        .collect();
    out.push((EMBEDDED_DEFAULT_NAME.to_owned(), EMBEDDED_DEFAULT.to_owned()));
    out
}

fn collect_yaml(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if SERVED_DIRS.iter().chain(&OTHER_YAML).any(|d| path.ends_with(d)) {
                continue;
            }
            collect_yaml(&path, out);
        } else if path.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(path);
        }
    }
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

fn is_content(line: &str) -> bool {
    let t = line.trim();
    !t.is_empty() && !t.starts_with('#')
}

/// Index of the line `name:` (nothing after but a comment) at `indent`,
/// searching `lines[from..to]`.
fn find_key(lines: &[String], from: usize, to: usize, name: &str, at_indent: usize) -> Option<usize> {
    (from..to).find(|&i| {
        let l = &lines[i];
        indent(l) == at_indent
            && l.trim_start()
                .strip_prefix(name)
                .and_then(|r| r.strip_prefix(':'))
                .is_some()
    })
}

/// End (exclusive) of the block that starts at line `start`: the next content
/// line indented no deeper than it.
fn block_end(lines: &[String], start: usize) -> usize {
    let base = indent(&lines[start]);
    (start + 1..lines.len())
        .find(|&i| is_content(&lines[i]) && indent(&lines[i]) <= base)
        .unwrap_or(lines.len())
}

/// One injected document and the 1-based line the key is on.
struct Injected {
    site: String,
    text: String,
    line: u32,
}

fn render(lines: &[String]) -> String {
    let mut s = lines.join("\n");
    s.push('\n');
    s
}

/// Injects into the first item of the block list under the key at `key_line`.
fn inject_first_item(lines: &[String], key_line: usize, site: &str) -> Injected {
    let rest = lines[key_line].split_once(':').map_or("", |(_, r)| r).trim();
    assert!(
        rest.is_empty() || rest.starts_with('#'),
        "{site}: write the section in block style to test it: `{rest}`"
    );
    let end = block_end(lines, key_line);
    let item = (key_line + 1..end)
        .find(|&i| lines[i].trim_start().starts_with("- "))
        .unwrap_or_else(|| panic!("{site}: no list item found"));
    let dash = indent(&lines[item]);
    let mut lines = lines.to_vec();
    let body = lines[item][dash + 2..].to_owned();
    if let Some(inner) = body.strip_prefix('{') {
        // `- {name: a, ...}`: put the key first in the flow mapping.
        lines[item] = format!("{}- {{{KEY}: 1, {inner}", " ".repeat(dash));
        return Injected {
            site: site.to_owned(),
            text: render(&lines),
            line: item as u32 + 1,
        };
    }
    // `- name: a` then more keys at dash + 2: add ours after the first key.
    lines.insert(item + 1, format!("{}{KEY}: 1", " ".repeat(dash + 2)));
    Injected {
        site: site.to_owned(),
        text: render(&lines),
        line: item as u32 + 2,
    }
}

/// Injects inside the block mapping under the key at `key_line`.
fn inject_in_mapping(lines: &[String], key_line: usize, site: &str) -> Injected {
    let rest = lines[key_line].split_once(':').map_or("", |(_, r)| r).trim();
    assert!(
        rest.is_empty() || rest.starts_with('#'),
        "{site}: write the section in block style to test it: `{rest}`"
    );
    let child = (key_line + 1..lines.len())
        .find(|&i| is_content(&lines[i]))
        .unwrap_or_else(|| panic!("{site}: empty mapping"));
    let mut lines = lines.to_vec();
    lines.insert(key_line + 1, format!("{}{KEY}: 1", " ".repeat(indent(&lines[child]))));
    Injected {
        site: site.to_owned(),
        text: render(&lines),
        line: key_line as u32 + 2,
    }
}

/// Every injection for one document: top level, first item of every list
/// section present, first rule, and inside every mapping section present.
fn injections(text: &str) -> Vec<Injected> {
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let mut out = Vec::new();

    let mut top = lines.clone();
    top.push(format!("{KEY}: 1"));
    out.push(Injected {
        site: "top level".into(),
        text: render(&top),
        line: top.len() as u32,
    });

    for section in LIST_SECTIONS {
        if let Some(i) = find_key(&lines, 0, lines.len(), section, 0) {
            out.push(inject_first_item(&lines, i, &format!("{section}[0]")));
        }
    }
    for section in MAP_SECTIONS {
        if let Some(i) = find_key(&lines, 0, lines.len(), section, 0) {
            out.push(inject_in_mapping(&lines, i, section));
        }
    }
    if let Some(p) = find_key(&lines, 0, lines.len(), "policy", 0) {
        let end = block_end(&lines, p);
        let child = (p + 1..end).find(|&i| is_content(&lines[i])).map(|i| indent(&lines[i]));
        if let Some(r) = child.and_then(|ci| find_key(&lines, p + 1, end, "rules", ci)) {
            out.push(inject_first_item(&lines, r, "policy.rules[0]"));
        }
    }
    out
}

/// Sections each document has, to check no injection site was missed.
fn sections_present(text: &str) -> Vec<String> {
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let mut out: Vec<String> = LIST_SECTIONS
        .iter()
        .chain(MAP_SECTIONS.iter())
        .filter(|s| find_key(&lines, 0, lines.len(), s, 0).is_some())
        .map(|s| (*s).to_owned())
        .collect();
    if text.lines().any(|l| l.trim_start().starts_with("rules:")) {
        out.push("rules".into());
    }
    out
}

#[test]
fn every_shipped_config_loads_cleanly() {
    for (name, text) in shipped() {
        let config = load_str(&text, &name).unwrap_or_else(|e| panic!("{name} does not load:\n{e}"));
        assert!(!config.listeners.is_empty(), "{name}: an example that serves nothing");
        if name != EMBEDDED_DEFAULT_NAME {
            let warnings = sluice_api::lint::lint(&config);
            let shown: Vec<String> = warnings.iter().map(ToString::to_string).collect();
            assert!(
                warnings.is_empty(),
                "{name}: `sluice check` warnings in an example:\n{}",
                shown.join("\n")
            );
        }
    }
}

#[test]
fn the_injector_reaches_every_section() {
    for (name, text) in shipped()
        .into_iter()
        .chain([("fixture".to_owned(), FIXTURE.to_owned())])
    {
        let sites: Vec<String> = injections(&text).into_iter().map(|i| i.site).collect();
        // top level + one per section present
        assert_eq!(sites.len(), 1 + sections_present(&text).len(), "{name}: {sites:?}");
        for i in injections(&text) {
            let line = i.text.lines().nth(i.line as usize - 1).unwrap();
            assert!(line.contains(KEY), "{name} {}: line {} is `{line}`", i.site, i.line);
        }
    }
}

/// Rejected, at the right line, with a message naming the key. Holds today.
#[test]
fn injected_unknown_key_is_rejected_and_named() {
    let mut checked = 0;
    for (name, text) in shipped()
        .into_iter()
        .chain([("fixture".to_owned(), FIXTURE.to_owned())])
    {
        for inj in injections(&text) {
            let errs = match load_str(&inj.text, &name) {
                Ok(_) => panic!("{name} with `{KEY}` in {} loaded:\n{}", inj.site, inj.text),
                Err(e) => e,
            };
            let e = &errs.0[0];
            assert_eq!(errs.0.len(), 1, "{name} {}: {errs}", inj.site);
            assert_eq!(e.line, inj.line, "{name} {}: {e}", inj.site);
            assert!(e.line > 0 && e.column > 0, "{name} {}: {e}", inj.site);
            assert!(e.to_string().contains(&format!("`{KEY}`")), "{name} {}: {e}", inj.site);
            checked += 1;
        }
    }
    let _ = std::io::Write::write_all(
        &mut std::io::stderr().lock(),
        format!("unknown-key injection: {checked} documents rejected\n").as_bytes(),
    );
}

/// The exact kind. Fails today: see `config_errors.rs`, YAML_KIND_BUG.
#[test]
fn injected_unknown_key_is_an_unknown_field_error() {
    for (name, text) in shipped()
        .into_iter()
        .chain([("fixture".to_owned(), FIXTURE.to_owned())])
    {
        for inj in injections(&text) {
            let errs = load_str(&inj.text, &name).err().unwrap();
            let e = &errs.0[0];
            assert!(
                matches!(&e.kind, ConfigErrorKind::UnknownField { field, .. } if field == KEY),
                "{name} {}: {:?}",
                inj.site,
                e.kind
            );
            assert!(e.line > 0, "{name} {}: {e}", inj.site);
        }
    }
}

/// Every section at once, flow-style items included, so the injector and the
/// loader are exercised on `plugins`, `gateway` and `audit` too.
const FIXTURE: &str = "\
# every section
admin:
  address: 127.0.0.1:9901
audit:
  destination: stderr
  queue: 1024
gateway:
  addresses: [192.0.2.1]
listeners:
  - {name: proxy, kind: http-proxy, address: 127.0.0.1:3128}
webgroups:
  - name: docs
    domains: [docs.rs]
smartgroups:

  - name: dev
    cidrs: [127.0.0.1/32]
inventory:
  - name: w
    ips: [10.0.0.1]
policy:
  # comment first
  mode: watch
  rules:
    - name: docs
      from: [dev]
      to: {webgroups: [docs]}
      action: allow
plugins:
  - name: audit-extra
    path: plugins/audit_extra.wasm
    config: {level: 2}
";

#[test]
fn fixture_loads() {
    load_str(FIXTURE, "fixture").unwrap_or_else(|e| panic!("{e}"));
}

/// A control server's directory loads as one configuration, and an unknown
/// key in any of its files is refused at its line in that file.
#[test]
fn every_served_directory_loads_cleanly_and_refuses_unknown_keys() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples");
    for d in SERVED_DIRS {
        let dir = root.join(d);
        let (config, resources) =
            sluice_api::config::load_dir(&dir).unwrap_or_else(|e| panic!("examples/{d} does not load:\n{e}"));
        assert!(
            resources.policies.is_some_and(|p| p.len() == 1),
            "examples/{d}: no policy"
        );
        let warnings: Vec<String> = sluice_api::lint::lint(&config)
            .iter()
            .map(ToString::to_string)
            // Gateways keep their listeners in their own files.
            .filter(|w| !w.starts_with("no listeners"))
            .collect();
        assert!(warnings.is_empty(), "examples/{d}: lint warnings: {warnings:?}");
        let mut files = Vec::new();
        collect_yaml(&dir, &mut files);
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for inj in injections(&text) {
                let copy = tempfile::tempdir().unwrap();
                for g in std::fs::read_dir(&dir).unwrap() {
                    let g = g.unwrap().path();
                    std::fs::copy(&g, copy.path().join(g.file_name().unwrap())).unwrap();
                }
                std::fs::write(copy.path().join(f.file_name().unwrap()), &inj.text).unwrap();
                let errs = sluice_api::config::load_dir(copy.path()).unwrap_err();
                let e = &errs.0[0];
                assert!(e.file.ends_with(&*f.file_name().unwrap().to_string_lossy()), "{e}");
                assert_eq!(e.line, inj.line, "{}: {e}", f.display());
                assert!(e.to_string().contains(&format!("`{KEY}`")), "{e}");
            }
        }
    }
}
