//! The admin API through the built binary: `/metrics` from the first
//! scrape, `/config_dump`, `/explain`, `/stats` and `/logging`, and the
//! process log written to a pipe. Each test runs its own `sluice run` on
//! port 0 and talks to the admin address it prints.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

#[path = "common/bb_support.rs"]
#[allow(
    dead_code,
    reason = "the harness serves several test files; this one uses part of it"
)]
mod bb_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use bb_support::{SLUICE, Sluice, TempDir, audit_records};

const WAIT: Duration = Duration::from_secs(10);

/// One HTTP/1.1 request to the admin API: (status, headers, body).
fn http(admin: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {raw}"));
    (status, head.to_owned(), body.to_owned())
}

fn get(admin: SocketAddr, path: &str) -> (u16, String) {
    let (status, _, body) = http(admin, "GET", path);
    (status, body)
}

/// A config with an explicit proxy (one user, so the dump has a password
/// to leave out), an audit file, and a policy allowing `allowed.test`.
fn config(dir: &TempDir) -> (std::path::PathBuf, std::path::PathBuf) {
    let audit = dir.join("audit.jsonl");
    let cfg = dir.write(
        "sluice.yaml",
        &format!(
            "admin: {{address: \"127.0.0.1:0\"}}
audit: {{destination: \"{}\"}}
runtime: {{drain_timeout: 2s}}
listeners:
  - name: proxy
    kind: http-proxy
    address: \"127.0.0.1:0\"
    peek_timeout: 1500ms
  - name: authed
    kind: http-proxy
    address: \"127.0.0.1:0\"
    users: [{{name: alice, password: s3cret-pw, smartgroup: agents}}]
resolver:
  nameservers: [\"127.0.0.1:9\"]
  hosts: {{allowed.test: [127.0.0.1]}}
webgroups:
  - {{name: t, domains: [allowed.test]}}
smartgroups:
  - {{name: agents, cidrs: [192.0.2.0/24]}}
policy:
  mode: enforce
  rules:
    - {{name: allow-test, to: {{webgroups: [t], smartgroups: [gateway, loopback]}}, action: allow}}
",
            audit.display()
        ),
    );
    (cfg, audit)
}

fn start(dir: &TempDir, env: &[(&str, &str)]) -> (Sluice, std::path::PathBuf) {
    let (cfg, audit) = config(dir);
    let mut cmd = Command::new(SLUICE);
    cmd.arg("run").arg("-c").arg(&cfg);
    for (k, v) in env {
        cmd.env(k, v);
    }
    (Sluice::start(cmd), audit)
}

/// `CONNECT allowed.test:PORT` through `proxy`, where nothing listens on
/// PORT: an allowed flow that ends in `connect-refused`.
fn refused_connect(proxy: SocketAddr) {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "CONNECT allowed.test:{port} HTTP/1.1\r\nHost: allowed.test:{port}\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 64];
    let n = s.read(&mut head).unwrap();
    assert!(
        head[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head[..n])
    );
    // A real ClientHello naming the target, so the tunnel dials.
    s.write_all(&bb_support::rustls_hello("allowed.test")).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
}

/// Regression (issue 13, item 10): `sluice_errors_total` and
/// `sluice_audit_dropped_total` were missing until non-zero.
#[test]
fn metrics_list_every_documented_family_from_the_first_scrape() {
    let dir = TempDir::new("admin-metrics");
    let (sluice, _) = start(&dir, &[]);
    let (status, text) = get(sluice.admin, "/metrics");
    assert_eq!(status, 200, "{text}");
    for (family, kind) in [
        ("sluice_flows_total", "counter"),
        ("sluice_active_flows", "gauge"),
        ("sluice_bytes_total", "counter"),
        ("sluice_flow_closes_total", "counter"),
        ("sluice_classify_duration_seconds", "histogram"),
        ("sluice_connect_duration_seconds", "histogram"),
        ("sluice_errors_total", "counter"),
        ("sluice_audit_dropped_total", "counter"),
        ("sluice_dns_queries_total", "counter"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} {kind}\n")),
            "no TYPE for {family}:\n{text}"
        );
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "no HELP for {family}:\n{text}"
        );
    }
    assert!(text.contains("\nsluice_audit_dropped_total 0\n"), "{text}");
    for kind in [
        "connect-refused",
        "connect-timeout",
        "dns-nxdomain",
        "upstream-error",
        "audit-write",
    ] {
        assert!(
            text.contains(&format!("sluice_errors_total{{kind=\"{kind}\"}} 0\n")),
            "no zero series for {kind}:\n{text}"
        );
    }

    // An error is counted under its kind.
    refused_connect(sluice.addr("proxy"));
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, text) = get(sluice.admin, "/metrics");
        if text.contains("sluice_errors_total{kind=\"connect-refused\"} 1\n") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "connect-refused not counted:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Regression (issue 13, item 13): durations were dumped as
/// `{"secs":5,"nanos":0}`.
#[test]
fn config_dump_writes_durations_as_the_config_file_does_and_no_password() {
    let dir = TempDir::new("admin-dump");
    let (sluice, _) = start(&dir, &[]);
    let (status, body) = get(sluice.admin, "/config_dump");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let proxy = v["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "proxy")
        .unwrap();
    assert_eq!(proxy["peek_timeout"], "1s 500ms", "{proxy}");
    assert_eq!(proxy["connect_timeout"], "10s", "{proxy}");
    assert_eq!(proxy["idle_timeout"], "5m", "{proxy}");
    // A listener shows its kind's options, and only those.
    assert_eq!(proxy["kind"], "http-proxy", "{proxy}");
    assert_eq!(proxy["connect_no_sni"], "deny", "{proxy}");
    for other in ["sni_check", "upstream_port", "upstream", "upstreams"] {
        assert!(proxy.get(other).is_none(), "{other} on an http-proxy listener: {proxy}");
    }
    assert_eq!(v["drain_timeout"], "2s", "{body}");
    assert!(!body.contains("secs"), "{body}");
    assert!(!body.contains("s3cret-pw"), "the dump shows a password: {body}");
    // What the dump shows, the configuration file reads back.
    assert_eq!(
        humantime::parse_duration(proxy["peek_timeout"].as_str().unwrap()).unwrap(),
        Duration::from_millis(1500)
    );
}

#[test]
fn explain_answers_like_the_cli_and_refuses_bad_input() {
    let dir = TempDir::new("admin-explain");
    let (sluice, _) = start(&dir, &[]);
    let (status, body) = get(sluice.admin, "/explain?src=10.0.0.1&sni=allowed.test&port=443");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["action"], "allow", "{body}");
    assert_eq!(v["decided_by"], "allow-test", "{body}");
    assert_eq!(v["reason"], "allowed-by-rule", "{body}");

    let (_, body) = get(
        sluice.admin,
        "/explain?src=10.0.0.1&dst=169.254.169.254&port=80&proto=http",
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["decided_by"], "builtin-guard", "{body}");
    assert_eq!(v["reason"], "guard-cloud-metadata", "{body}");

    for bad in [
        "/explain?sni=allowed.test",
        "/explain?src=nope&sni=allowed.test",
        "/explain?src=10.0.0.1&sni=bad..name",
        "/explain?src=10.0.0.1&dst=nope",
        "/explain?src=10.0.0.1&sni=a.test&proto=smtp",
    ] {
        let (status, body) = get(sluice.admin, bad);
        assert_eq!(status, 400, "{bad}: {body}");
    }
}

#[test]
fn stats_count_active_flows_and_audit_records() {
    let dir = TempDir::new("admin-stats");
    let (sluice, audit) = start(&dir, &[]);
    let (status, body) = get(sluice.admin, "/stats");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["active_flows"], 0, "{body}");
    assert_eq!(v["audit_dropped"], 0, "{body}");

    refused_connect(sluice.addr("proxy"));
    assert_eq!(audit_records(&audit, 1, WAIT).len(), 1);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, body) = get(sluice.admin, "/stats");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["audit_written"] == 1 && v["active_flows"] == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{body}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Regression (issue 13, item 11): `GET /logging?level=debug` changed the
/// log level.
#[test]
fn logging_changes_only_on_post() {
    let dir = TempDir::new("admin-logging");
    let (sluice, _) = start(&dir, &[("SLUICE_LOG", "info")]);
    let (status, body) = get(sluice.admin, "/logging?level=debug");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("log filter: info"), "a GET must not change it: {body}");

    let (status, head, body) = http(sluice.admin, "PUT", "/logging?level=debug");
    assert_eq!(status, 405, "{body}");
    assert!(head.to_ascii_lowercase().contains("allow: get, post"), "{head}");
    let (_, body) = get(sluice.admin, "/logging");
    assert!(body.contains("log filter: info"), "{body}");

    let (status, _, body) = http(sluice.admin, "POST", "/logging?level=debug");
    assert_eq!(status, 200, "{body}");
    let (_, body) = get(sluice.admin, "/logging");
    assert!(body.contains("log filter: debug"), "{body}");

    let (status, _, body) = http(sluice.admin, "POST", "/logging?level=not%20a%20filter[");
    assert_eq!(status, 400, "{body}");
    let (_, body) = get(sluice.admin, "/logging");
    assert!(
        body.contains("log filter: debug"),
        "a bad filter keeps the last good one: {body}"
    );

    let (status, _, _) = http(sluice.admin, "POST", "/metrics");
    assert_eq!(status, 405);
}

/// Regression (issue 13, item 12): logs written to a pipe carried ANSI
/// colour codes.
#[test]
fn logs_to_a_pipe_have_no_colour_codes() {
    let dir = TempDir::new("admin-ansi");
    let (sluice, _) = start(&dir, &[("SLUICE_LOG", "debug")]);
    refused_connect(sluice.addr("proxy"));
    let line = sluice
        .proc
        .stderr
        .wait_for(WAIT, |l| l.contains("flow finished"))
        .unwrap_or_else(|| panic!("no debug log line:\n{}", sluice.proc.output()));
    assert!(!line.contains('\u{1b}'), "colour codes in a pipe: {line:?}");
    assert!(
        !sluice.proc.stderr.text().contains('\u{1b}'),
        "{}",
        sluice.proc.output()
    );
}

/// `POST /reload` reads the file again and answers with what changed; an
/// edit to the file applies by itself (the file is watched). Both leave
/// the running configuration alone when the file is bad.
#[test]
fn reload_by_admin_api_and_by_editing_the_file() {
    let dir = TempDir::new("admin-reload");
    let (sluice, _) = start(&dir, &[]);
    let cfg = dir.join("sluice.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap();

    // Nothing changed: an empty report.
    let (status, _, body) = http(sluice.admin, "POST", "/reload");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["added"], serde_json::json!([]), "{body}");
    assert!(v["listeners"]["proxy"].is_string(), "{body}");

    // A listener added by editing the file, picked up by the watch.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let added = text.replace(
        "listeners:\n",
        &format!("listeners:\n  - {{name: third, kind: http-proxy, address: \"127.0.0.1:{port}\"}}\n"),
    );
    std::fs::write(&cfg, &added).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the edited file was not applied:\n{}",
            sluice.proc.output()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, body) = get(sluice.admin, "/config_dump");
    assert!(body.contains("\"third\""), "{body}");

    // A broken file: refused with the reason, and nothing changes.
    std::fs::write(&cfg, added.replace("kind: http-proxy", "kind: http_proxy")).unwrap();
    let (status, _, body) = http(sluice.admin, "POST", "/reload");
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("unknown value `http_proxy`"), "{body}");
    assert!(body.contains("the running configuration is unchanged"), "{body}");
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "a refused reload closed a listener"
    );
    let (status, head, _) = http(sluice.admin, "GET", "/reload");
    assert_eq!(status, 405);
    assert!(head.to_ascii_lowercase().contains("allow: post"), "{head}");
}

#[test]
fn health_says_ready_through_the_admin_api_or_why_not() {
    let dir = TempDir::new("health");
    let (sluice, _) = start(&dir, &[]);
    let out = Command::new(SLUICE)
        .args(["health", "--admin", &sluice.admin.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ready\n");
    drop(sluice);
    // Nothing listens there any more.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = Command::new(SLUICE)
        .args(["health", "--admin", &closed.to_string()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot reach the admin API at {closed}")),
        "{err}"
    );
}
