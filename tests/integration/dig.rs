//! The real `dig` against the binary.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use crate::fake_upstream::FakeUpstream;
use crate::harness::Nodedns;

fn dig_installed() -> bool {
    Command::new("dig")
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Runs dig (bounded by +tries=1 +time=2) in a blocking thread and returns its stdout.
async fn dig(port: u16, args: &[&str]) -> String {
    let mut cmd_args = vec![
        "@127.0.0.1".to_string(),
        "-p".to_string(),
        port.to_string(),
        "+tries=1".to_string(),
        "+time=2".to_string(),
    ];
    cmd_args.extend(args.iter().map(|s| s.to_string()));
    tokio::task::spawn_blocking(move || {
        let out = Command::new("dig")
            .args(&cmd_args)
            .stdin(Stdio::null())
            .output()
            .expect("run dig");
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .await
    .unwrap()
}

/// Whether dig's answer section has `name ... IN A ip`.
fn has_a(out: &str, name: &str, ip: &str) -> bool {
    out.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() == 5 && f[0].eq_ignore_ascii_case(name) && f[2] == "IN" && f[3] == "A" && f[4] == ip
    })
}

#[tokio::test]
async fn dig_udp_and_tcp() {
    if !dig_installed() {
        eprintln!("SKIP dig_udp_and_tcp: dig is not installed");
        return;
    }
    let up = FakeUpstream::start().await;
    up.set_a(
        "web.default.svc.cluster.local",
        Ipv4Addr::new(10, 96, 0, 10),
        30,
    );
    let node = Nodedns::with_upstream(&up, &[]).await;
    for extra in [
        &[][..],
        &["+tcp"][..],
        &["+notcp", "+dnssec"][..],
        &["+noedns"][..],
    ] {
        let mut args = vec!["web.default.svc.cluster.local", "A"];
        args.extend_from_slice(extra);
        let out = dig(node.port(), &args).await;
        assert!(
            out.contains("status: NOERROR"),
            "dig {args:?}: NOERROR expected:\n{out}"
        );
        assert!(
            has_a(&out, "web.default.svc.cluster.local.", "10.96.0.10"),
            "dig {args:?}: the A record expected:\n{out}"
        );
        assert!(
            !out.contains("recursion requested but not available"),
            "dig {args:?}: RA must be set:\n{out}"
        );
    }
    // One miss for DO=0 and one for +dnssec (DO=1 is its own cache entry); the rest are hits.
    assert_eq!(
        up.queries("web.default.svc.cluster.local"),
        2,
        "dig queries after the first (per DO bit) must be hits"
    );
    let out = dig(node.port(), &["nope.default.svc.cluster.local", "A"]).await;
    assert!(
        out.contains("status: NXDOMAIN"),
        "NXDOMAIN expected:\n{out}"
    );
    let out = dig(
        node.port(),
        &["nope.default.svc.cluster.local", "A", "+tcp"],
    )
    .await;
    assert!(
        out.contains("status: NXDOMAIN"),
        "NXDOMAIN over TCP expected:\n{out}"
    );
}

#[tokio::test]
async fn dig_large_answer_falls_back_to_tcp() {
    if !dig_installed() {
        eprintln!("SKIP dig_large_answer_falls_back_to_tcp: dig is not installed");
        return;
    }
    let up = FakeUpstream::start().await;
    up.set_many_a("many.example", 40, 30);
    let node = Nodedns::with_upstream(&up, &[]).await;
    // +noedns: 512-byte limit, so nodedns sets TC and dig retries over TCP by itself.
    let out = dig(node.port(), &["many.example", "A", "+noedns", "+tries=1"]).await;
    assert!(out.contains("status: NOERROR"), "{out}");
    assert!(
        out.contains("ANSWER: 40"),
        "40 answers expected after dig's TCP retry:\n{out}"
    );
}
