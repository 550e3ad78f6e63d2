//! Stopping and signals: SIGTERM with misses in flight, SIGQUIT, reload signals.

use std::time::Duration;

use hickory_proto::rr::RecordType;
use nix::sys::signal::Signal;

use crate::fake_upstream::{Behavior, FakeUpstream};
use crate::harness::{Nodedns, build_query_id, query_udp};

/// SIGTERM while UDP misses are in flight to a slow upstream: the process exits (misses finish
/// within the upstream delay), instead of a worker spinning on its shut socket forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_misses_in_flight_exits() {
    let up = FakeUpstream::start().await;
    up.set_default_behavior(Behavior::Delay(300));
    let mut node = Nodedns::with_upstream(&up, &["--workers", "2"]).await;
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // A bounded burst of distinct names: every one a miss, all in flight at once.
    for i in 0..400u16 {
        let q = build_query_id(i, &format!("miss-{i}.example."), RecordType::A, None, false)
            .to_vec()
            .unwrap();
        let _ = sock.send_to(&q, node.addr).await;
    }
    // Wait until the upstream has seen misses from the burst (they are in flight now).
    let seen =
        crate::harness::wait_until(Duration::from_secs(5), || up.total_queries() >= 50).await;
    assert!(seen, "the misses reached the upstream");
    node.signal(Signal::SIGTERM);
    let st = tokio::task::block_in_place(|| node.wait_exit(Duration::from_secs(10)));
    assert!(
        st.is_some(),
        "nodedns did not exit within 10 s of SIGTERM with misses in flight; stderr:\n{}",
        node.stderr_text()
    );
    assert!(st.is_some_and(|s| s.success()), "clean exit: {st:?}");
}

/// SIGQUIT stops nodedns like SIGTERM (exit 0 after its own shutdown), not with the default
/// action, which would leave its link and rules on the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigquit_stops_cleanly() {
    let up = FakeUpstream::start().await;
    up.set_a("q.example", "10.0.0.1".parse().unwrap(), 60);
    let mut node = Nodedns::with_upstream(&up, &[]).await;
    let r = query_udp(node.addr, "q.example.", RecordType::A, None, false).await;
    assert_eq!(r.answers.len(), 1);
    node.signal(Signal::SIGQUIT);
    let st = tokio::task::block_in_place(|| node.wait_exit(Duration::from_secs(10)));
    assert!(
        st.is_some_and(|s| s.success()),
        "SIGQUIT: clean exit expected, got {st:?}; stderr:\n{}",
        node.stderr_text()
    );
    assert!(
        node.stderr_text().contains("shutting down"),
        "{}",
        node.stderr_text()
    );
}
