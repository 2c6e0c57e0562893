//! `SO_ORIGINAL_DST` for real: iptables `REDIRECT` inside a throwaway
//! network namespace, IPv4, IPv6 and IPv4 on a dual-stack listener.
//!
//! The outer test re-runs this test binary under `unshare --net`, so the
//! iptables rules and interfaces live and die with a private namespace and
//! never touch the host. It needs root (CAP_NET_ADMIN), `unshare`, `ip` and
//! `iptables`/`ip6tables` (CI installs the Debian `iptables` package). When
//! any of that is missing the test fails and says why — it never passes
//! without having checked anything. Set `SLUICE_SKIP_NETNS=1` to skip it
//! explicitly on a machine that cannot make namespaces.

// Tests: a failed unwrap/expect is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::Command;

use tokio::net::{TcpListener, TcpStream};

const INNER_ENV: &str = "SLUICE_NETNS_INNER";

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn original_dst_after_iptables_redirect() {
    if std::env::var_os("SLUICE_SKIP_NETNS").is_some() {
        eprintln!("SKIPPED explicitly (SLUICE_SKIP_NETNS): REDIRECT test not run");
        return;
    }
    let missing: Vec<_> = ["unshare", "ip", "iptables", "ip6tables"]
        .into_iter()
        .filter(|t| !have(t))
        .collect();
    assert!(
        missing.is_empty(),
        "cannot run the REDIRECT test: missing {missing:?} (apt-get install -y iptables iproute2 util-linux)"
    );
    let uid = Command::new("id").arg("-u").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "cannot run the REDIRECT test: it needs root (CAP_NET_ADMIN) to make a network namespace"
    );
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("unshare")
        .args(["--net", "--"])
        .arg(&exe)
        .args([
            "--exact",
            "redirect_inner",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(INNER_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "REDIRECT test inside the namespace failed:\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
}

fn sh(cmd: &str) {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn redirected(listener: &TcpListener, to: SocketAddr) -> (TcpStream, TcpStream) {
    let (c, a) = tokio::join!(TcpStream::connect(to), listener.accept());
    (c.unwrap(), a.unwrap().0)
}

#[tokio::test]
#[ignore = "runs only inside the namespace made by original_dst_after_iptables_redirect"]
async fn redirect_inner() {
    assert!(
        std::env::var_os(INNER_ENV).is_some(),
        "run via original_dst_after_iptables_redirect, not directly: it rewrites iptables"
    );
    sh("ip link set lo up");
    sh("ip link add sl0 type veth peer name sl1");
    sh("ip link set sl0 up && ip link set sl1 up");
    sh("ip addr add 10.99.0.1/24 dev sl0");
    sh("ip -6 addr add fd00:99::1/64 dev sl0 nodad");

    // IPv4: 10.99.0.2:80 → our listener.
    let l4 = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let p4 = l4.local_addr().unwrap().port();
    sh(&format!(
        "iptables -t nat -A OUTPUT -p tcp -d 10.99.0.2 --dport 80 -j REDIRECT --to-ports {p4}"
    ));
    let (_c, s) = redirected(&l4, "10.99.0.2:80".parse().unwrap()).await;
    assert_eq!(s.local_addr().unwrap().port(), p4, "the rule redirected");
    assert_eq!(
        sluice::sys::original_dst(&s).unwrap(),
        "10.99.0.2:80".parse::<SocketAddr>().unwrap()
    );

    // IPv6: [fd00:99::2]:443 → an IPv6 listener.
    let l6 = TcpListener::bind("[::]:0").await.unwrap();
    let p6 = l6.local_addr().unwrap().port();
    sh(&format!(
        "ip6tables -t nat -A OUTPUT -p tcp -d fd00:99::2 --dport 443 -j REDIRECT --to-ports {p6}"
    ));
    let (_c, s) = redirected(&l6, "[fd00:99::2]:443".parse().unwrap()).await;
    assert_eq!(
        sluice::sys::original_dst(&s).unwrap(),
        "[fd00:99::2]:443".parse::<SocketAddr>().unwrap()
    );

    // IPv4 flow accepted by the dual-stack IPv6 listener (v4-mapped local
    // address): still the IPv4 original destination.
    sh(&format!(
        "iptables -t nat -A OUTPUT -p tcp -d 10.99.0.3 --dport 8080 -j REDIRECT --to-ports {p6}"
    ));
    let (_c, s) = redirected(&l6, "10.99.0.3:8080".parse().unwrap()).await;
    assert!(
        s.local_addr().unwrap().is_ipv6(),
        "accepted on the IPv6 socket"
    );
    assert_eq!(
        sluice::sys::original_dst(&s).unwrap(),
        "10.99.0.3:8080".parse::<SocketAddr>().unwrap()
    );

    // TPROXY's socket option: with IP_TRANSPARENT a socket may bind an
    // address that is not local (here TEST-NET-3); without it, it may not.
    let plain = tokio::net::TcpSocket::new_v4().unwrap();
    assert!(plain.bind("203.0.113.7:0".parse().unwrap()).is_err());
    let transparent = tokio::net::TcpSocket::new_v4().unwrap();
    sluice::sys::set_ip_transparent(&transparent).unwrap();
    transparent.bind("203.0.113.7:0".parse().unwrap()).unwrap();
    let transparent6 = tokio::net::TcpSocket::new_v6().unwrap();
    sluice::sys::set_ip_transparent(&transparent6).unwrap();
    transparent6
        .bind("[2001:db8::7]:0".parse().unwrap())
        .unwrap();
}
