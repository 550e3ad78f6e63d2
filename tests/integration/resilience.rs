//! Upstream resilience end to end: health checking (a dead upstream is marked down, skipped, probed
//! and readmitted) and the server order of each policy, the real binary against fake upstreams on
//! loopback. Assertions count the queries each fake sees, never time.

use std::net::Ipv4Addr;
use std::time::Duration;

use hickory_proto::rr::RecordType;

use crate::fake_upstream::{Behavior, FakeUpstream};
use crate::harness::{Nodedns, a_addrs, query_udp, wait_until};

const IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 7);
/// Names each test may ask (every fake knows them all).
const NAMES: usize = 80;

fn name(i: usize) -> String {
    format!("r{i}.example")
}

async fn fakes(n: usize) -> Vec<FakeUpstream> {
    let mut v = Vec::new();
    for _ in 0..n {
        let up = FakeUpstream::start().await;
        for i in 0..NAMES {
            up.set_a(&name(i), IP, 300);
        }
        v.push(up);
    }
    v
}

async fn start(ups: &[&FakeUpstream], extra: &[&str]) -> Nodedns {
    let mut args = Vec::new();
    for up in ups {
        args.push("--upstream".to_string());
        args.push(up.addr_str());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Nodedns::start(&args).await
}

/// Queries a fake saw that were not health or readiness probes (`. NS`).
fn client_queries(up: &FakeUpstream) -> usize {
    up.total_queries() - up.queries(".")
}

#[tokio::test]
async fn resilience_a_dead_upstream_is_skipped_probed_and_readmitted() {
    let f = fakes(2).await;
    let (dead, live) = (&f[0], &f[1]);
    dead.set_default_behavior(Behavior::Drop);
    // Sequential: without health checking every query would try the dead one first.
    let node = start(
        &[dead, live],
        &[
            "--upstream-policy",
            "sequential",
            "--attempt-timeout",
            "300ms",
            "--query-deadline",
            "3s",
            "--max-fails",
            "2",
            "--health-check",
            "100ms",
        ],
    )
    .await;

    // The first two queries time out on the dead one, then the live one answers.
    for i in 0..2 {
        let r = query_udp(node.addr, &name(i), RecordType::A, None, false).await;
        assert_eq!(a_addrs(&r), vec![IP], "{}", name(i));
        assert_eq!(dead.queries(&name(i)), 1);
    }
    // Marked down: no client query waits for it any more.
    for i in 2..22 {
        let r = query_udp(node.addr, &name(i), RecordType::A, None, false).await;
        assert_eq!(a_addrs(&r), vec![IP], "{}", name(i));
        assert_eq!(live.queries(&name(i)), 1);
    }
    assert_eq!(
        client_queries(dead),
        2,
        "after it was marked down the dead upstream must see only probes"
    );
    // It is probed (`. NS`, every 100 ms); the readiness probe at start was one already.
    let probes = dead.queries(".");
    assert!(
        wait_until(Duration::from_secs(10), || dead.queries(".") >= probes + 2).await,
        "the dead upstream is not probed (saw {} root queries)",
        dead.queries(".")
    );
    assert_eq!(client_queries(dead), 2, "probes only");

    // It answers again: the next probe marks it up, and (sequential) it takes queries again.
    dead.set_default_behavior(Behavior::Normal);
    let mut back = None;
    for i in 22..NAMES {
        let r = query_udp(node.addr, &name(i), RecordType::A, None, false).await;
        assert_eq!(a_addrs(&r), vec![IP], "{}", name(i));
        if dead.queries(&name(i)) == 1 {
            back = Some(i);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let back = back.expect("the revived upstream never took a query again");
    for i in back + 1..(back + 4).min(NAMES) {
        query_udp(node.addr, &name(i), RecordType::A, None, false).await;
        assert_eq!(dead.queries(&name(i)), 1, "up again: first in order");
        assert_eq!(live.queries(&name(i)), 0);
    }
}

#[tokio::test]
async fn resilience_max_fails_zero_keeps_trying_the_dead_upstream() {
    let f = fakes(2).await;
    let (dead, live) = (&f[0], &f[1]);
    dead.set_default_behavior(Behavior::Drop);
    let node = start(
        &[dead, live],
        &[
            "--upstream-policy",
            "sequential",
            "--attempt-timeout",
            "200ms",
            "--max-fails",
            "0",
            "--health-check",
            "50ms",
        ],
    )
    .await;
    for i in 0..4 {
        let r = query_udp(node.addr, &name(i), RecordType::A, None, false).await;
        assert_eq!(a_addrs(&r), vec![IP]);
    }
    assert_eq!(
        client_queries(dead),
        4,
        "health checking off: never skipped"
    );
}

#[tokio::test]
async fn resilience_sequential_always_asks_the_first() {
    let f = fakes(3).await;
    let node = start(&[&f[0], &f[1], &f[2]], &["--upstream-policy", "sequential"]).await;
    for i in 0..10 {
        query_udp(node.addr, &name(i), RecordType::A, None, false).await;
    }
    let seen: Vec<usize> = f.iter().map(client_queries).collect();
    assert_eq!(seen, vec![10, 0, 0]);
}

#[tokio::test]
async fn resilience_round_robin_spreads() {
    let f = fakes(3).await;
    let node = start(
        &[&f[0], &f[1], &f[2]],
        &["--upstream-policy", "round_robin"],
    )
    .await;
    for i in 0..9 {
        query_udp(node.addr, &name(i), RecordType::A, None, false).await;
    }
    let seen: Vec<usize> = f.iter().map(client_queries).collect();
    assert_eq!(seen, vec![3, 3, 3], "one first attempt each in turn");
}

#[tokio::test]
async fn resilience_random_spreads() {
    let f = fakes(3).await;
    let node = start(&[&f[0], &f[1], &f[2]], &["--upstream-policy", "random"]).await;
    for i in 0..30 {
        query_udp(node.addr, &name(i), RecordType::A, None, false).await;
    }
    let seen: Vec<usize> = f.iter().map(client_queries).collect();
    assert_eq!(seen.iter().sum::<usize>(), 30);
    // All 30 on one of three servers: odds 3 × 3^-30.
    assert!(
        seen.iter().filter(|&&n| n > 0).count() >= 2,
        "random must not stick to one server: {seen:?}"
    );
}

#[tokio::test]
async fn resilience_fastest_prefers_the_fast_one_and_is_the_default() {
    let f = fakes(3).await;
    f[0].set_default_behavior(Behavior::Delay(40));
    f[1].set_default_behavior(Behavior::Delay(40));
    // No --upstream-policy: fastest is the default for flag-built zones.
    let node = start(&[&f[0], &f[1], &f[2]], &[]).await;
    for i in 0..20 {
        query_udp(node.addr, &name(i), RecordType::A, None, false).await;
    }
    let seen: Vec<usize> = f.iter().map(client_queries).collect();
    assert_eq!(seen.iter().sum::<usize>(), 20);
    // Each slow one is tried at most once (never measured counts as fastest), then never again.
    assert!(
        seen[2] >= 18,
        "fastest must send the rest to the fast server: {seen:?}"
    );
}

fn tmpdir(label: &str) -> std::path::PathBuf {
    let d = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create the test's directory");
    d
}

/// Starts nodedns on a TOML file with one zone `.` to `up` and `zone_extra` lines in it.
async fn start_toml(label: &str, up: &FakeUpstream, zone_extra: &str, flags: &[&str]) -> Nodedns {
    let dir = tmpdir(label);
    let conf = dir.join("nodedns.toml");
    std::fs::write(
        &conf,
        format!(
            "[[zone]]\nname = \".\"\nservers = [\"{}\"]\n{zone_extra}\n",
            up.addr
        ),
    )
    .expect("write the config");
    let mut args = vec!["--conf".to_string(), conf.display().to_string()];
    args.extend(flags.iter().map(|s| s.to_string()));
    Nodedns::start(&args).await
}

#[tokio::test]
async fn resilience_zone_max_concurrent_refuses_past_the_limit() {
    let f = fakes(1).await;
    let up = &f[0];
    up.set_default_behavior(Behavior::Delay(500));
    let node = start_toml("zone-max-concurrent", up, "max_concurrent = 1", &[]).await;
    // Two misses at once: one is forwarded, the other is REFUSED without reaching upstream (the
    // first is held for 500 ms, a generous window for the second to arrive in).
    let (n0, n1) = (name(0), name(1));
    let (a, b) = tokio::join!(
        query_udp(node.addr, &n0, RecordType::A, None, false),
        query_udp(node.addr, &n1, RecordType::A, None, false),
    );
    let mut rcodes = vec![a.response_code, b.response_code];
    rcodes.sort_by_key(|r| u16::from(*r));
    assert_eq!(
        rcodes,
        vec![
            hickory_proto::op::ResponseCode::NoError,
            hickory_proto::op::ResponseCode::Refused
        ]
    );
    assert_eq!(
        client_queries(up),
        1,
        "the refused query never went upstream"
    );
    // The slot is released with the answer.
    let r = query_udp(node.addr, &name(2), RecordType::A, None, false).await;
    assert_eq!(a_addrs(&r), vec![IP]);
}

#[tokio::test]
async fn resilience_tcp_pool_uses_its_size_in_connections() {
    let f = fakes(1).await;
    let up = &f[0];
    let node = start(&[up], &["--force-tcp", "--tcp-pool-size", "2"]).await;
    for i in 0..10 {
        let r = query_udp(node.addr, &name(i), RecordType::A, None, false).await;
        assert_eq!(a_addrs(&r), vec![IP]);
    }
    assert_eq!(up.tcp_queries(), up.total_queries(), "--force-tcp");
    assert_eq!(
        up.tcp_connections(),
        2,
        "two pipelined connections, used in turn and kept"
    );
}

#[tokio::test]
async fn resilience_tcp_connections_expire() {
    let f = fakes(1).await;
    let up = &f[0];
    let node = start_toml(
        "tcp-expire",
        up,
        "transport = \"tcp\"\nexpire = \"300ms\"",
        &["--tcp-pool-size", "1"],
    )
    .await;
    let r = query_udp(node.addr, &name(0), RecordType::A, None, false).await;
    assert_eq!(a_addrs(&r), vec![IP]);
    let before = up.tcp_connections();
    // The subject is a lifetime, so time must pass: twice `expire`.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = query_udp(node.addr, &name(1), RecordType::A, None, false).await;
    assert_eq!(a_addrs(&r), vec![IP]);
    assert_eq!(
        up.tcp_connections(),
        before + 1,
        "a connection older than the zone's expire is replaced"
    );
}

#[tokio::test]
async fn resilience_a_reload_keeps_health() {
    let f = fakes(2).await;
    let (dead, live) = (&f[0], &f[1]);
    dead.set_default_behavior(Behavior::Drop);
    let node = start(
        &[dead, live],
        &[
            "--upstream-policy",
            "sequential",
            "--attempt-timeout",
            "300ms",
            "--health-check",
            "100ms",
        ],
    )
    .await;
    for i in 0..2 {
        query_udp(node.addr, &name(i), RecordType::A, None, false).await;
    }
    assert_eq!(client_queries(dead), 2);
    // A reload builds a new forwarding generation with the same servers.
    node.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(10), || {
            node.stderr_text().contains("configuration reloaded")
        })
        .await,
        "no reload: {}",
        node.stderr_text()
    );
    for i in 2..8 {
        let r = query_udp(node.addr, &name(i), RecordType::A, None, false).await;
        assert_eq!(a_addrs(&r), vec![IP]);
    }
    assert_eq!(
        client_queries(dead),
        2,
        "the new generation must know the server is down"
    );
    // And it is still probed: revived, it takes queries again.
    dead.set_default_behavior(Behavior::Normal);
    let mut back = false;
    for i in 8..NAMES {
        query_udp(node.addr, &name(i), RecordType::A, None, false).await;
        if dead.queries(&name(i)) == 1 {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "no probe after the reload marked the server up");
}

#[test]
fn resilience_health_and_policy_flags_conflict_with_a_file() {
    let conf = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("resilience.Corefile");
    std::fs::write(&conf, ".:53 {\n    forward . 127.0.0.1:5399\n}\n").expect("write");
    for (flag, value) in [
        ("--upstream-policy", "sequential"),
        ("--max-fails", "3"),
        ("--health-check", "1s"),
    ] {
        let mut child = std::process::Command::new(crate::harness::bin())
            // The safety flags too: should the check ever let it start, it touches nothing.
            .args(crate::harness::safety_args())
            .args(["--listen", "127.0.0.1:0"])
            .args(["--conf", conf.to_str().expect("utf-8 path"), flag, value])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run nodedns");
        // Bounded: a nodedns that started anyway is killed, and the test fails below.
        let started = std::time::Instant::now();
        while child.try_wait().ok().flatten().is_none()
            && started.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let out = child.wait_with_output().expect("nodedns output");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {stderr}");
        assert!(
            stderr.contains(&format!("{flag} conflicts with --conf")),
            "{flag}: {stderr}"
        );
    }
}
