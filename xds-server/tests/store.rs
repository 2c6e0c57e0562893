#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]
//! The etcd store, with a real etcd: `import`, `apply`, `get` and
//! `delete` as a user runs them; replicas serving one store; gateways
//! failing over between replicas; etcd going away and coming back.

#[path = "common/fleet.rs"]
mod fleet;

use std::time::Duration;

use fleet::{Etcd, Gateway, Replica, get, wait_for, write_config, xds};

const AGENT: &str = "10.20.0.7";

/// The revision `get` prints.
fn revision(store: &str) -> i64 {
    let (ok, out, err) = xds(&["get", "--store", store]);
    assert!(ok, "{err}");
    out.lines()
        .next()
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no revision in {out}"))
}

/// `sluice-xds apply -f FILE`, based on `base` when given.
fn apply(store: &str, base: Option<i64>, file: &std::path::Path) -> (bool, String, String) {
    let base = base.map(|b| b.to_string());
    let mut args = vec!["apply", "--store", store, "-f", file.to_str().unwrap()];
    if let Some(b) = &base {
        args.extend(["--base-revision", b.as_str()]);
    }
    xds(&args)
}

fn import(store: &str, domains: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), domains);
    let (ok, out, err) = xds(&["import", "--store", store, dir.path().to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    dir
}

/// Rewrites `groups.yaml` in `dir` with `domains` and applies it.
fn apply_domains(store: &str, dir: &std::path::Path, domains: &[&str]) -> String {
    write_config(dir, domains);
    let (ok, out, err) = apply(store, None, &dir.join("groups.yaml"));
    assert!(ok, "{out}{err}");
    out
}

#[test]
fn import_apply_get_delete_and_what_is_refused() {
    let etcd = Etcd::start();
    let store = etcd.url("sluice/cli");

    // An empty store says so.
    let (ok, out, _) = xds(&["get", "--store", &store]);
    assert!(ok);
    assert_eq!(out.lines().count(), 1, "{out}");

    // import: every file of the directory.
    let dir = import(&store, &["one.test"]);
    let (_, out, _) = xds(&["get", "--store", &store]);
    assert!(out.contains("groups.yaml\t") && out.contains("policy.yaml\t"), "{out}");
    let (ok, groups, _) = xds(&["get", "--store", &store, "groups.yaml"]);
    assert!(ok && groups.contains("domains: [one.test]"), "{groups}");

    // Importing the same again writes nothing.
    let before = revision(&store);
    let (ok, out, err) = xds(&["import", "--store", &store, dir.path().to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.starts_with("unchanged"), "{out}");
    assert_eq!(revision(&store), before);

    // A change that would leave an invalid configuration: refused with
    // the file, line and column, and nothing written.
    let bad = tempfile::tempdir().unwrap();
    std::fs::write(
        bad.path().join("policy.yaml"),
        "policy:\n  default: deny\n  rules:\n    - name: r\n      to: {webgroups: [sitez]}\n      action: allow\n",
    )
    .unwrap();
    let (ok, _, err) = apply(&store, None, &bad.path().join("policy.yaml"));
    assert!(!ok);
    let shown = bad.path().join("policy.yaml").display().to_string();
    assert!(
        err.contains(&format!(
            "{shown}:5:24: policy.rules[0].to.webgroups[0]: no webgroup named `sitez`"
        )),
        "{err}"
    );
    assert!(err.contains("nothing was written"), "{err}");
    assert_eq!(revision(&store), before);

    // Deleting a file others need: refused, naming what would break.
    let (ok, _, err) = xds(&["delete", "--store", &store, "groups.yaml"]);
    assert!(!ok);
    assert!(err.contains("no smartgroup named `agents`"), "{err}");
    let (ok, _, err) = xds(&["delete", "--store", &store, "nope.yaml"]);
    assert!(!ok && err.contains("nope.yaml is not in the store"), "{err}");

    // A file that is not configuration is refused before anything is read.
    std::fs::write(bad.path().join("notes.txt"), "x").unwrap();
    let (ok, _, err) = apply(&store, None, &bad.path().join("notes.txt"));
    assert!(!ok && err.contains("`notes.txt` is not a configuration file"), "{err}");

    // apply and delete of an extra file.
    std::fs::write(
        bad.path().join("extra.yaml"),
        "webgroups:\n  - name: extra\n    domains: [extra.test]\n",
    )
    .unwrap();
    let (ok, out, err) = apply(&store, None, &bad.path().join("extra.yaml"));
    assert!(ok, "{err}");
    assert!(out.contains("extra.yaml"), "{out}");
    let (ok, out, err) = xds(&["delete", "--store", &store, "extra.yaml"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("written at revision"), "{out}");

    // get --to: a directory `serve --config-dir` (and `check`) takes.
    let out_dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = xds(&["get", "--store", &store, "--to", out_dir.path().to_str().unwrap()]);
    assert!(ok, "{err}");
    let (ok, out, err) = xds(&["check", out_dir.path().to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("OK: 1 webgroups, 1 smartgroups"), "{out}");
}

#[test]
fn a_write_based_on_a_stale_revision_is_refused_saying_what_changed() {
    let etcd = Etcd::start();
    let store = etcd.url("sluice/stale");
    let dir = import(&store, &["one.test"]);
    let base = revision(&store);

    // Two applies based on the same revision, run at once: exactly one is
    // written; the other is refused, naming the file and its revision.
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    write_config(a.path(), &["a.test"]);
    write_config(b.path(), &["b.test"]);
    let run = |d: &tempfile::TempDir| {
        let store = store.clone();
        let file = d.path().join("groups.yaml");
        std::thread::spawn(move || apply(&store, Some(base), &file))
    };
    let (ta, tb) = (run(&a), run(&b));
    let results = [ta.join().unwrap(), tb.join().unwrap()];
    let won: Vec<_> = results.iter().filter(|r| r.0).collect();
    let lost: Vec<_> = results.iter().filter(|r| !r.0).collect();
    assert_eq!((won.len(), lost.len()), (1, 1), "{results:?}");
    let after = revision(&store);
    assert_eq!(after, base + 1);
    assert!(
        lost[0].2.contains(&format!(
            "refused: the store changed since revision {base}, which this change is based on: groups.yaml changed at revision {after}"
        )),
        "{}",
        lost[0].2
    );

    // A change based on the old revision is refused even when it would
    // leave the store as it was then.
    write_config(dir.path(), &["one.test"]);
    let (ok, _, err) = apply(&store, Some(base), &dir.path().join("groups.yaml"));
    assert!(!ok && err.contains("groups.yaml changed at revision"), "{err}");
    // A deletion since is seen too.
    std::fs::write(
        dir.path().join("extra.yaml"),
        "webgroups:\n  - name: x\n    domains: [x.test]\n",
    )
    .unwrap();
    let (ok, _, err) = apply(&store, None, &dir.path().join("extra.yaml"));
    assert!(ok, "{err}");
    let with_extra = revision(&store);
    let (ok, _, err) = xds(&["delete", "--store", &store, "extra.yaml"]);
    assert!(ok, "{err}");
    let (ok, _, err) = apply(&store, Some(with_extra), &dir.path().join("groups.yaml"));
    assert!(!ok && err.contains("extra.yaml deleted"), "{err}");
    // Based on the current revision it goes through.
    let (ok, _, err) = apply(&store, Some(revision(&store)), &dir.path().join("groups.yaml"));
    assert!(ok, "{err}");
}

#[test]
fn replicas_serve_the_same_versions_and_a_change_reaches_gateways_on_either() {
    let etcd = Etcd::start();
    let store = etcd.url("sluice/two");
    let dir = import(&store, &["one.test"]);
    let a = Replica::start(&store);
    let b = Replica::start(&store);
    let ga = Gateway::start("gw-a", &[a.ads], "sotw");
    let gb = Gateway::start("gw-b", &[b.ads], "sotw");
    for g in [&ga, &gb] {
        wait_for("the first policy", || {
            (g.verdict(AGENT, "one.test").as_deref() == Some("allow")).then_some(())
        });
    }
    assert_eq!(a.resources(), b.resources());

    apply_domains(&store, dir.path(), &["two.test"]);
    for g in [&ga, &gb] {
        wait_for("the change on both gateways", || {
            (g.verdict(AGENT, "two.test").as_deref() == Some("allow")).then_some(())
        });
        assert_eq!(g.verdict(AGENT, "one.test").as_deref(), Some("deny"));
    }
    // Same content, same versions, whichever replica answers.
    wait_for("both replicas at the change", || {
        (a.resources() == b.resources()).then_some(())
    });
    // Both gateways run the same SotW versions, whichever replica they
    // took them from (versions are hashes of content).
    let accepted = |g: &Gateway| g.xds()["accepted"].clone();
    wait_for("the same versions on both gateways", || {
        (accepted(&ga) == accepted(&gb)).then_some(())
    });
    let versions = accepted(&ga);
    let webgroups = versions
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["type_url"].as_str().is_some_and(|u| u.ends_with("WebGroup")))
        .unwrap_or_else(|| panic!("{versions}"));
    assert_eq!(webgroups["version"].as_str().map(str::len), Some(16), "{versions}");
}

#[test]
fn a_replica_killed_under_changes_loses_no_gateway_and_no_change() {
    let etcd = Etcd::start();
    let store = etcd.url("sluice/failover");
    let dir = import(&store, &["v0.test"]);
    let mut a = Replica::start(&store);
    let b = Replica::start(&store);
    // Every gateway prefers `a`, and knows `b`.
    let gateways: Vec<Gateway> = (0..3)
        .map(|i| {
            Gateway::start(
                &format!("gw-{i}"),
                &[a.ads, b.ads],
                if i % 2 == 0 { "delta" } else { "sotw" },
            )
        })
        .collect();
    for g in &gateways {
        wait_for("the first policy", || {
            (g.verdict(AGENT, "v0.test").as_deref() == Some("allow")).then_some(())
        });
        assert_eq!(g.xds()["server"].as_str(), Some(a.ads.to_string().as_str()));
    }

    // Changes keep coming while `a` dies.
    let mut last = String::new();
    for i in 1..=6 {
        last = format!("v{i}.test");
        apply_domains(&store, dir.path(), &[&last]);
        if i == 3 {
            a.process.kill();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for g in &gateways {
        // Its configuration stays while it moves, and it ends at the last
        // change, from `b`.
        wait_for("the last change through the survivor", || {
            (g.verdict(AGENT, &last).as_deref() == Some("allow")).then_some(())
        });
        let x = g.xds();
        assert_eq!(x["server"].as_str(), Some(b.ads.to_string().as_str()), "{x}");
        assert_eq!(x["rejected"].as_u64(), Some(0), "{x}");
        assert_eq!(g.verdict(AGENT, "v1.test").as_deref(), Some("deny"));
    }
}

#[test]
fn without_etcd_replicas_keep_serving_the_last_good_configuration_and_say_not_ready() {
    let mut etcd = Etcd::start();
    let store = etcd.url("sluice/outage");
    let dir = import(&store, &["one.test"]);
    let r = Replica::start(&store);
    assert_eq!(r.ready().0, 200);

    etcd.stop();
    let (code, body) = wait_for("/ready to say not ready", || {
        let (c, b) = r.ready();
        (c == 503).then_some((c, b))
    });
    assert_eq!(code, 503);
    assert!(
        body.contains("not ready") && body.contains(&store) && body.contains("serving the last good configuration"),
        "{body}"
    );
    // So says `health`, which images use.
    let (ok, _, err) = xds(&["health", "--admin", &r.admin.to_string()]);
    assert!(!ok && err.contains("503: not ready"), "{err}");
    // A gateway that connects now still gets the configuration.
    let g = Gateway::start("late", &[r.ads], "delta");
    wait_for("the last good policy", || {
        (g.verdict(AGENT, "one.test").as_deref() == Some("allow")).then_some(())
    });
    // A write while etcd is gone fails clearly, and changes nothing.
    write_config(dir.path(), &["two.test"]);
    let (ok, _, err) = apply(&store, None, &dir.path().join("groups.yaml"));
    assert!(!ok && err.contains(&store), "{err}");

    etcd.restart();
    wait_for("/ready once etcd is back", || (r.ready().0 == 200).then_some(()));
    let (ok, out, _) = xds(&["health", "--admin", &r.admin.to_string()]);
    assert!(ok && out == "ready\n", "{out}");
    apply_domains(&store, dir.path(), &["two.test"]);
    wait_for("a change after the outage", || {
        (g.verdict(AGENT, "two.test").as_deref() == Some("allow")).then_some(())
    });
    let (_, config) = get(r.admin, "/config").unwrap();
    assert!(config.contains("\"reachable\": true"), "{config}");
}

#[test]
fn an_invalid_configuration_written_behind_its_back_is_refused_by_every_replica() {
    let etcd = Etcd::start();
    let store = etcd.url("sluice/behind");
    let dir = import(&store, &["one.test"]);
    let r = Replica::start(&store);
    let g = Gateway::start("gw", &[r.ads], "delta");
    wait_for("the first policy", || {
        (g.verdict(AGENT, "one.test").as_deref() == Some("allow")).then_some(())
    });
    // Written straight into etcd, past `apply`'s validation.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = sluice_xds::store::etcd::Store::new(store.parse().unwrap()).unwrap();
        let read = s.read(None).await.unwrap();
        let mut put = sluice_xds::store::files::FileSet::new("test");
        put.insert(
            "groups.yaml",
            b"webgroups:\n  - name: sites\n    domainz: [x]\n".to_vec(),
            "test",
        )
        .unwrap();
        s.write(read.revision, &put, &[]).await.unwrap();
    });
    let (_, config) = wait_for("the replica to refuse it", || {
        get(r.admin, "/config").filter(|(_, b)| b.contains("domainz"))
    });
    assert!(config.contains("groups.yaml:3:5"), "{config}");
    assert_eq!(r.ready().0, 200);
    // The gateway keeps the last good policy; a valid change then applies.
    assert_eq!(g.verdict(AGENT, "one.test").as_deref(), Some("allow"));
    apply_domains(&store, dir.path(), &["two.test"]);
    wait_for("the next good change", || {
        (g.verdict(AGENT, "two.test").as_deref() == Some("allow")).then_some(())
    });
}

#[test]
fn a_store_over_tls_with_a_client_certificate() {
    let etcd = Etcd::start_tls();
    let store = etcd.url("sluice/tls");
    let tls = etcd.tls_args();
    let with_tls = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(tls.iter().map(String::as_str));
        xds(&all)
    };
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), &["one.test"]);
    let (ok, out, err) = with_tls(&["import", "--store", &store, dir.path().to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    let r = Replica::start_with(&store, &tls);
    let g = Gateway::start("gw", &[r.ads], "delta");
    wait_for("the policy from a TLS store", || {
        (g.verdict(AGENT, "one.test").as_deref() == Some("allow")).then_some(())
    });
    // Without a client certificate etcd refuses; without a CA, so does
    // sluice-xds, before dialling.
    let (ok, _, err) = xds(&["get", "--store", &store, "--store-ca", &tls[1]]);
    assert!(!ok && err.contains(&store), "{err}");
    let (ok, _, err) = xds(&["get", "--store", &store]);
    assert!(!ok && err.contains("needs the CA to trust (--store-ca)"), "{err}");
    let plain = store.replacen("etcds://", "etcd://", 1);
    let (ok, _, err) = xds(&["get", "--store", &plain]);
    assert!(!ok, "plain gRPC to a TLS etcd answered: {err}");
}
