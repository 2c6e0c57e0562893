#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]
//! Reloads in place, in process: listeners added, changed, moved and
//! removed while flows run; admin and audit settings changed; a reload
//! that cannot be applied leaves everything running as it was. Every
//! section of the configuration reloads without a restart.

#[macro_use]
mod common;

use common::*;
use sluice::runtime::{ReloadError, StartError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The listeners part of a test config, then the standard policy;
/// `runtime` is the inside of the `runtime` mapping (`drain_timeout: 1s`:
/// how long a removed listener's flows may run on).
fn config(listeners: &str, runtime: &str) -> String {
    format!(
        "runtime: {{{runtime}}}
listeners:
{listeners}policy:
  rules:
{STD_RULES}"
    )
}

async fn reload(sluice: &Sluice, rest: &str) -> Result<sluice::runtime::ReloadReport, ReloadError> {
    let yaml = format!("{}{rest}", base_config(&sluice.audit));
    let cfg = sluice_api::config::load_str(&yaml, "reload.yaml").unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    sluice.server.reload(cfg).await
}

async fn tunnel(proxy: std::net::SocketAddr, up: &TlsEcho) -> tokio_rustls::client::TlsStream<TcpStream> {
    let target = format!("allowed.test:{}", up.addr.port());
    let (stream, resp) = connect_via(proxy, &target, "").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    up_connect(up, "allowed.test", stream).await
}

flow_test!(listeners_are_added_changed_and_removed_while_flows_run, async {
    let up = TlsEcho::start().await;
    let sluice = Sluice::start(&config(
        "  - {name: a, kind: http-proxy, address: \"127.0.0.1:0\"}
  - {name: b, kind: http-proxy, address: \"127.0.0.1:0\"}
",
        "drain_timeout: 400ms",
    ))
    .await;
    let (a, b) = (sluice.addr("a"), sluice.addr("b"));
    let mut on_a = tunnel(a, &up).await;
    let mut on_b = tunnel(b, &up).await;

    // `a` changes an option, `b` goes, `c` comes.
    let report = reload(
        &sluice,
        &config(
            &format!(
                "  - {{name: a, kind: http-proxy, address: \"{a}\", connect_no_sni: allow}}
  - {{name: c, kind: http-proxy, address: \"127.0.0.1:0\"}}
"
            ),
            "drain_timeout: 400ms",
        ),
    )
    .await
    .unwrap();
    assert_eq!(report.added, ["c"], "{report:?}");
    assert_eq!(report.changed, ["a"], "{report:?}");
    assert_eq!(report.removed, ["b"], "{report:?}");
    assert!(report.rebound.is_empty(), "{report:?}");
    assert!(report.restart_needed.is_empty(), "{report:?}");

    // A flow on the unchanged socket is not disturbed; `a` keeps it.
    echo(&mut on_a, b"still here").await;
    assert_eq!(sluice.addr("a"), a);
    // The new listener serves.
    let c = sluice.server.addr("c").expect("c is bound");
    let mut on_c = tunnel(c, &up).await;
    echo(&mut on_c, b"new listener").await;
    // The removed one accepts nothing more…
    assert!(
        TcpStream::connect(b).await.is_err(),
        "a removed listener still accepts connections"
    );
    // …and its open flow runs on until the drain time is over.
    echo(&mut on_b, b"draining").await;
    let mut rest = Vec::new();
    let _ = within("the drained flow to close", on_b.read_to_end(&mut rest)).await;
    let r = sluice
        .wait_record(|r| field(r, "listener") == "b" && field(r, "close_reason") == "cancelled")
        .await;
    assert_eq!(action(&r), "allow", "{r}");
    // The flows on `a` and `c` are still up after the drain of `b`.
    echo(&mut on_a, b"after the drain").await;
    echo(&mut on_c, b"after the drain").await;
    sluice.stop().await;
});

flow_test!(a_listener_option_applies_to_the_next_connection, async {
    let up = RawSink::start().await;
    let sluice = Sluice::start(&config(
        "  - {name: a, kind: http-proxy, address: \"127.0.0.1:0\"}\n",
        "drain_timeout: 1s",
    ))
    .await;
    let a = sluice.addr("a");
    let target = format!("allowed.test:{}", up.addr.port());
    let no_sni = vector("openssl-3.0-s_client-no-sni.bin");
    let send = |hello: Vec<u8>| {
        let target = target.clone();
        async move {
            let (mut s, resp) = connect_via(a, &target, "").await;
            assert_eq!(resp.status, 200, "{resp:?}");
            s.write_all(&hello).await.unwrap();
            s.shutdown().await.unwrap();
            let _ = wait_closed(&mut s).await;
        }
    };
    send(no_sni.clone()).await;
    sluice
        .wait_record(|r| field(r, "listener") == "a" && reason(r) == "connect-no-sni")
        .await;
    reload(
        &sluice,
        &config(
            &format!("  - {{name: a, kind: http-proxy, address: \"{a}\", connect_no_sni: allow}}\n"),
            "drain_timeout: 1s",
        ),
    )
    .await
    .unwrap();
    send(no_sni.clone()).await;
    assert!(up.next_received().await == no_sni, "the new option did not apply");
    sluice.stop().await;
});

flow_test!(a_moved_listener_serves_on_its_new_address_and_drains_the_old, async {
    let up = TlsEcho::start().await;
    let sluice = Sluice::start(&config(
        "  - {name: a, kind: http-proxy, address: \"127.0.0.1:0\"}\n",
        "drain_timeout: 300ms",
    ))
    .await;
    let old = sluice.addr("a");
    let mut open = tunnel(old, &up).await;
    let report = reload(
        &sluice,
        &config(
            "  - {name: a, kind: http-proxy, address: \"127.0.0.1:0\", peek_timeout: 2s}\n",
            "drain_timeout: 300ms",
        ),
    )
    .await;
    // `127.0.0.1:0` again is the running address's configured form:
    // kept, not moved.
    let report = report.unwrap();
    assert!(report.rebound.is_empty(), "{report:?}");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let report = reload(
        &sluice,
        &config(
            &format!("  - {{name: a, kind: http-proxy, address: \"127.0.0.1:{port}\"}}\n"),
            "drain_timeout: 300ms",
        ),
    )
    .await
    .unwrap();
    assert_eq!(report.rebound, ["a"], "{report:?}");
    let new = sluice.server.addr("a").unwrap();
    assert_eq!(new.port(), port);
    let mut moved = tunnel(new, &up).await;
    echo(&mut moved, b"on the new address").await;
    assert!(TcpStream::connect(old).await.is_err(), "the old address still accepts");
    // The flow accepted on the old socket ends after the drain time.
    let mut rest = Vec::new();
    let _ = within("the old socket's flow to close", open.read_to_end(&mut rest)).await;
    echo(&mut moved, b"still serving").await;
    sluice.stop().await;
});

// Regression (issue 14): after a reload refused because a listener
// moved to an address in use, reloading the file that is running again
// reported the change again (the comparison was against the last file
// read), and `/config_dump` showed the refused address.
flow_test!(
    a_refused_reload_leaves_the_running_configuration_and_its_dump_alone,
    async {
        let sluice = Sluice::start(&config(
            "  - {name: a, kind: http-proxy, address: \"127.0.0.1:0\"}\n",
            "drain_timeout: 1s",
        ))
        .await;
        let running = sluice.addr("a");
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let busy = taken.local_addr().unwrap();
        let err = reload(
            &sluice,
            &config(
                &format!("  - {{name: a, kind: http-proxy, address: \"{busy}\"}}\n"),
                "drain_timeout: 1s",
            ),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&err, ReloadError::Start(StartError::Bind { name, addr, .. }) if name == "a" && *addr == busy),
            "{err:?}"
        );
        let snap = sluice.server.shared.snapshot.load();
        assert_eq!(
            snap.config.listeners[0].address.port(),
            0,
            "the running configuration (and so /config_dump) must not show the refused address"
        );
        assert_eq!(sluice.server.addr("a"), Some(running));
        // Reloading what runs changes nothing and says so.
        let report = reload(
            &sluice,
            &config(
                "  - {name: a, kind: http-proxy, address: \"127.0.0.1:0\"}\n",
                "drain_timeout: 1s",
            ),
        )
        .await
        .unwrap();
        for list in [&report.added, &report.changed, &report.rebound, &report.removed] {
            assert!(list.is_empty(), "{report:?}");
        }
        assert!(report.restart_needed.is_empty(), "{report:?}");
        drop(taken);
        sluice.stop().await;
    }
);

flow_test!(admin_and_audit_settings_reload_in_place, async {
    let up = RawSink::start().await;
    let sluice = Sluice::start(&config(
        "  - {name: a, kind: sni, address: \"127.0.0.1:0\", upstream_port: 9}\n",
        "drain_timeout: 1s",
    ))
    .await;
    let old_admin = sluice.server.admin_addr().await;
    let dir = scratch_dir();
    let new_audit = dir.path().join("moved.jsonl");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let yaml = format!(
        "{}listeners:\n  - {{name: a, kind: sni, address: \"{}\", upstream_port: {}}}\npolicy:\n  rules:\n{STD_RULES}",
        base_config(&new_audit).replace(
            "admin: {address: \"127.0.0.1:0\"}",
            &format!("admin: {{address: \"127.0.0.1:{port}\"}}")
        ),
        sluice.addr("a"),
        up.addr.port(),
    );
    let report = sluice
        .server
        .reload(sluice_api::config::load_str(&yaml, "moved.yaml").unwrap())
        .await
        .unwrap();
    assert_eq!(report.admin.map(|a| a.port()), Some(port), "{report:?}");
    assert_eq!(report.audit.as_deref(), Some(new_audit.to_str().unwrap()), "{report:?}");
    assert_eq!(report.changed, ["a"], "{report:?}");
    // The new admin address answers; the old one is closed.
    let ready = |addr: std::net::SocketAddr| async move {
        let Ok(mut s) = TcpStream::connect(addr).await else {
            return false;
        };
        let _ = s
            .write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await;
        let mut out = Vec::new();
        let _ = within("the admin answer", s.read_to_end(&mut out)).await;
        out.starts_with(b"HTTP/1.1 200")
    };
    assert!(ready(std::net::SocketAddr::from(([127, 0, 0, 1], port))).await);
    assert!(!ready(old_admin).await, "the old admin address still answers");
    // Records from now on go to the new file.
    let mut s = TcpStream::connect(sluice.addr("a")).await.unwrap();
    s.write_all(&rustls_hello("allowed.test")).await.unwrap();
    s.shutdown().await.unwrap();
    let _ = wait_closed(&mut s).await;
    let written =
        wait_until(|| std::fs::read_to_string(&new_audit).is_ok_and(|text| text.contains("\"listener\":\"a\""))).await;
    assert!(written, "no record in the new audit file");
    assert!(
        !up.next_received().await.is_empty(),
        "the sni listener forwards to the changed upstream port"
    );
    sluice.stop().await;
});

flow_test!(a_reload_names_what_needs_a_restart_and_applies_the_rest, async {
    let sluice = Sluice::start(&config(
        "  - {name: a, kind: http-proxy, address: \"127.0.0.1:0\"}\n",
        "drain_timeout: 1s, workers: 2",
    ))
    .await;
    let report = reload(
        &sluice,
        &config(
            "  - {name: a, kind: http-proxy, address: \"127.0.0.1:0\", peek_timeout: 2s}\n",
            "drain_timeout: 1s, workers: 3",
        ),
    )
    .await
    .unwrap();
    assert_eq!(report.changed, ["a"], "{report:?}");
    assert_eq!(report.restart_needed.len(), 1, "{report:?}");
    assert!(
        report.restart_needed[0].starts_with("runtime.workers (2 running, 3 in the file)"),
        "{report:?}"
    );
    sluice.stop().await;
});
