//! Faults from upstream and from clients, end to end: an upstream that answers garbage under the
//! right ID, or records that do not parse, or cuts and resets its TCP connections; and a flood of
//! garbage datagrams at nodedns's own socket. Each case checks what the client gets and that
//! nodedns keeps serving; none measures time (the attempt timeout is set far above the client's
//! wait, so "the next server is asked at once" shows as an answer instead of a timeout).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

use crate::fake_upstream::{Behavior, FakeUpstream};
use crate::harness::{
    Nodedns, Rng, a_addrs, build_query, free_port, query_udp, udp_exchange_raw, wait_until,
};
use crate::metrics_e2e::http_get;

const IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 9);

/// nodedns with `servers` in this order (sequential), an attempt timeout of 30 s (so a reply
/// that was waited on instead of failed would never reach the client's 3 s wait) and metrics.
async fn start(servers: &[&FakeUpstream], extra: &[&str]) -> (Nodedns, SocketAddr) {
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let list = servers
        .iter()
        .map(|u| u.addr_str())
        .collect::<Vec<_>>()
        .join(",");
    let mut args: Vec<String> = [
        "--forward",
        &format!(".={list}"),
        "--upstream-policy",
        "sequential",
        "--max-fails",
        "0",
        "--attempt-timeout",
        "30s",
        "--query-deadline",
        "60s",
        "--metrics-listen",
        &metrics.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    (Nodedns::start(&args).await, metrics)
}

/// The `nodedns_upstream_failures_total` value for `cause` (all upstreams).
async fn failures(metrics: SocketAddr, cause: &str) -> u64 {
    let (_, body) = http_get(metrics, "/metrics").await;
    body.lines()
        .filter(|l| l.starts_with("nodedns_upstream_failures_total{"))
        .filter(|l| l.contains(&format!("cause=\"{cause}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

async fn ask(node: &Nodedns, name: &str) -> Option<hickory_proto::op::Message> {
    let q = build_query(name, RecordType::A, Some(1232), false);
    let bytes = udp_exchange_raw(node.addr, &q.to_vec().ok()?, Duration::from_secs(3)).await?;
    hickory_proto::op::Message::from_vec(&bytes).ok()
}

/// Garbage under the right ID, and records that do not parse, from the first server: each is that
/// server's failed attempt and the second server answers; with only the broken server the client
/// gets SERVFAIL, not a 30 s wait. The failures are counted as `malformed`.
#[tokio::test]
async fn fault_malformed_replies_fail_the_attempt_and_the_next_server_answers() {
    let broken = FakeUpstream::start().await;
    let good = FakeUpstream::start().await;
    for up in [&broken, &good] {
        up.set_a("g.example", IP, 300);
        up.set_a("r.example", IP, 300);
        up.set_a("only.example", IP, 300);
    }
    broken.set_behavior("g.example", Behavior::Garbage);
    broken.set_behavior("r.example", Behavior::BadRecords);
    let (node, metrics) = start(&[&broken, &good], &[]).await;
    for name in ["g.example.", "r.example."] {
        let m = ask(&node, name)
            .await
            .unwrap_or_else(|| panic!("{name}: no reply (waited on the broken server)"));
        assert_eq!(a_addrs(&m), vec![IP], "{name}");
        assert_eq!(broken.queries(name.trim_end_matches('.')), 1, "{name}");
        assert_eq!(good.queries(name.trim_end_matches('.')), 1, "{name}");
    }
    assert_eq!(failures(metrics, "malformed").await, 2);
    drop(node);

    let (alone, metrics) = start(&[&broken], &[]).await;
    broken.set_behavior("only.example", Behavior::Garbage);
    let m = ask(&alone, "only.example.")
        .await
        .expect("SERVFAIL, not a wait for the attempt timeout");
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(failures(metrics, "malformed").await >= 1);
    // Still serving.
    let m = query_udp(alone.addr, "g2.example.", RecordType::A, None, false).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
}

/// Over TCP (`force_tcp` zones), a server that sends half a reply and closes, or resets the
/// connection: the query is retried (on a fresh connection, then the next server) and answered;
/// nodedns keeps serving the broken server's other names over new connections.
#[tokio::test]
async fn fault_tcp_cut_and_reset_connections_fall_over_to_the_next_server() {
    let broken = FakeUpstream::start().await;
    let good = FakeUpstream::start().await;
    for up in [&broken, &good] {
        up.set_a("cut.example", IP, 300);
        up.set_a("reset.example", IP, 300);
        up.set_a("fine.example", IP, 300);
    }
    broken.set_behavior("cut.example", Behavior::CutTcp);
    broken.set_behavior("reset.example", Behavior::ResetTcp);
    let (node, _) = start(&[&broken, &good], &["--force-tcp", "--tcp-pool-size", "2"]).await;
    let baseline = fds(node.pid());
    for name in ["cut.example.", "reset.example."] {
        let m = ask(&node, name)
            .await
            .unwrap_or_else(|| panic!("{name}: no reply"));
        assert_eq!(a_addrs(&m), vec![IP], "{name}");
        assert!(good.queries(name.trim_end_matches('.')) >= 1, "{name}");
    }
    // The broken server's connections are gone; a new one serves a name it answers well.
    let m = ask(&node, "fine.example.").await.expect("fine.example");
    assert_eq!(a_addrs(&m), vec![IP]);
    assert_eq!(broken.queries("fine.example"), 1);
    assert_eq!(good.queries("fine.example"), 0);
    // Descriptors: the dead connections are closed; what stays is at most the pools' own
    // (2 per server).
    let pid = node.pid();
    assert!(
        wait_until(Duration::from_secs(5), || fds(pid) <= baseline + 4).await,
        "descriptors {} > baseline {baseline} + 4 pooled connections",
        fds(pid)
    );
}

/// A flood of random datagrams (bounded: 20,000, from several source ports) at nodedns's socket:
/// nothing crashes, nothing is forwarded that is not a query, and a real query afterwards is
/// answered. Datagrams that parse as a header get FORMERR or are dropped; none gets an answer
/// record.
#[tokio::test]
async fn fault_a_garbage_flood_does_not_stop_the_service() {
    let up = FakeUpstream::start().await;
    up.set_a("after.example", IP, 300);
    let (mut node, _) = start(&[&up], &[]).await;
    let baseline = fds(node.pid());
    let mut rng = Rng::from_time("garbage-flood");
    let mut socks = Vec::new();
    for _ in 0..4 {
        socks.push(tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap());
    }
    for i in 0..20_000usize {
        let len = rng.below(600);
        let mut d = rng.bytes(len);
        // Every fourth: a header that looks like a query, so the scanner's deeper paths run.
        if i % 4 == 0 && d.len() >= 12 {
            d[2] &= 0x7f;
            d[4] = 0;
            d[5] = 1;
        }
        let _ = socks[i % socks.len()].send_to(&d, node.addr).await;
        if i % 256 == 0 {
            tokio::task::yield_now().await;
        }
    }
    // Whatever came back: never an answer.
    let mut buf = vec![0u8; 4096];
    for s in &socks {
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(50), s.recv(&mut buf)).await
        {
            if let Ok(m) = hickory_proto::op::Message::from_vec(&buf[..n]) {
                assert!(m.answers.is_empty(), "garbage got an answer: {m:?}");
            }
        }
    }
    assert!(node.is_running(), "{}", node.stderr_text());
    let m = query_udp(node.addr, "after.example.", RecordType::A, None, false).await;
    assert_eq!(a_addrs(&m), vec![IP]);
    assert_eq!(up.queries("after.example"), 1);
    // Nothing of the flood holds a descriptor but the reused upstream sockets: at most one per
    // thread for the one server (an attempt's socket leaked would be one per forwarded query).
    let pid = node.pid();
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .count();
    assert!(
        wait_until(Duration::from_secs(5), || fds(pid) <= baseline + threads).await,
        "descriptors {} > baseline {baseline} + {threads} threads",
        fds(pid)
    );
}
