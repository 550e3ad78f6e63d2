//! Serve-stale (RFC 8767) and prefetch, end to end: the real binary, a fake upstream that stops
//! answering or says SERVFAIL, and `/metrics` to tell hits from misses.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

use crate::fake_upstream::{Behavior, FakeUpstream};
use crate::harness::{Nodedns, a_addrs, free_port, min_answer_ttl, query_udp_retry};
use crate::metrics_e2e::{http_get, sample};

const NAME: &str = "web.default.svc.cluster.local";
const IP: Ipv4Addr = Ipv4Addr::new(10, 96, 7, 7);

async fn metric(maddr: SocketAddr, series: &str) -> f64 {
    let (_, body) = http_get(maddr, "/metrics").await;
    sample(&body, series).unwrap_or(0.0)
}

/// Starts nodedns against `up` with a metrics listener and `extra` args.
async fn start(up: &FakeUpstream, extra: &[&str]) -> (Nodedns, SocketAddr) {
    let maddr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut args = vec![
        "--metrics-listen",
        &*Box::leak(maddr.to_string().into_boxed_str()),
    ];
    args.extend_from_slice(&["--attempt-timeout", "200ms", "--query-deadline", "600ms"]);
    args.extend_from_slice(extra);
    (Nodedns::with_upstream(up, &args).await, maddr)
}

/// The entry lives 1 s (the record's TTL); waiting it out has no signal to wait for.
async fn let_it_expire() {
    tokio::time::sleep(Duration::from_millis(1100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn immediate_serves_stale_when_upstream_drops_or_servfails() {
    const DROPPED: &str = "api.default.svc.cluster.local";
    let up = FakeUpstream::start().await;
    up.set_a(NAME, IP, 1);
    up.set_a(DROPPED, IP, 1);
    // SERVFAIL caching on, so what keeps the stale entry is the rule that a SERVFAIL never
    // replaces a servable answer (not merely SERVFAIL being uncacheable).
    let (node, maddr) = start(&up, &["--serve-stale", "1h", "--servfail-ttl", "5s"]).await;
    for n in [NAME, DROPPED] {
        let r = query_udp_retry(node.addr, &format!("{n}."), RecordType::A).await;
        assert_eq!(a_addrs(&r), vec![IP]);
    }
    let_it_expire().await;

    // Upstream silent: the stale answer at once, with RFC 8767's 30 s TTL (at most the record's).
    up.set_behavior(DROPPED, Behavior::Drop);
    let r = query_udp_retry(node.addr, &format!("{DROPPED}."), RecordType::A).await;
    assert_eq!(r.response_code, ResponseCode::NoError);
    assert_eq!(a_addrs(&r), vec![IP]);
    assert_eq!(
        min_answer_ttl(&r),
        1,
        "stale TTL is min(30, the stored TTL)"
    );
    assert_eq!(metric(maddr, "nodedns_stale_answers_total").await, 1.0);
    let refreshed =
        crate::harness::wait_until(Duration::from_secs(3), || up.queries(DROPPED) >= 2).await;
    assert!(refreshed, "the stale answer triggered a background refresh");

    // Upstream says SERVFAIL: the refresh's SERVFAIL never replaces the servable answer.
    up.set_behavior(NAME, Behavior::ServFail);
    let r = query_udp_retry(node.addr, &format!("{NAME}."), RecordType::A).await;
    assert_eq!(a_addrs(&r), vec![IP]);
    let refreshed =
        crate::harness::wait_until(Duration::from_secs(3), || up.queries(NAME) >= 2).await;
    assert!(refreshed, "the refresh got its SERVFAIL");
    for _ in 0..3 {
        let r = query_udp_retry(node.addr, &format!("{NAME}."), RecordType::A).await;
        assert_eq!(r.response_code, ResponseCode::NoError, "{r:?}");
        assert_eq!(a_addrs(&r), vec![IP]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_serve_stale_an_expired_entry_is_a_miss() {
    let up = FakeUpstream::start().await;
    up.set_a(NAME, IP, 1);
    let (node, _maddr) = start(&up, &[]).await;
    let q = format!("{NAME}.");
    assert_eq!(
        a_addrs(&query_udp_retry(node.addr, &q, RecordType::A).await),
        vec![IP]
    );
    let_it_expire().await;
    up.set_behavior(NAME, Behavior::Drop);
    let r = query_udp_retry(node.addr, &q, RecordType::A).await;
    assert_eq!(
        r.response_code,
        ResponseCode::ServFail,
        "off by default for flags"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_asks_upstream_first_then_serves_stale() {
    let up = FakeUpstream::start().await;
    up.set_a(NAME, IP, 1);
    let (node, maddr) = start(
        &up,
        &["--serve-stale", "1h", "--serve-stale-mode", "verify"],
    )
    .await;
    let q = format!("{NAME}.");
    assert_eq!(
        a_addrs(&query_udp_retry(node.addr, &q, RecordType::A).await),
        vec![IP]
    );
    let_it_expire().await;

    // Upstream has a new answer: verify gets it (not the stale one).
    let new_ip = Ipv4Addr::new(10, 96, 8, 8);
    up.set_a(NAME, new_ip, 1);
    let r = query_udp_retry(node.addr, &q, RecordType::A).await;
    assert_eq!(a_addrs(&r), vec![new_ip], "verify asked upstream first");
    assert_eq!(metric(maddr, "nodedns_stale_answers_total").await, 0.0);
    let_it_expire().await;

    // Upstream silent: after the verify timeout, the stale answer.
    up.set_behavior(NAME, Behavior::Drop);
    let before = up.queries(NAME);
    let r = query_udp_retry(node.addr, &q, RecordType::A).await;
    assert_eq!(r.response_code, ResponseCode::NoError);
    assert_eq!(a_addrs(&r), vec![new_ip]);
    assert!(up.queries(NAME) > before, "upstream was asked first");
    assert_eq!(metric(maddr, "nodedns_stale_answers_total").await, 1.0);
    // Within the failure recheck period upstream is not asked again: stale at once.
    let asked = up.queries(NAME);
    let r = query_udp_retry(node.addr, &q, RecordType::A).await;
    assert_eq!(a_addrs(&r), vec![new_ip]);
    assert_eq!(
        up.queries(NAME),
        asked,
        "no new upstream query during the recheck period"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_keeps_a_steadily_queried_name_from_ever_missing() {
    let up = FakeUpstream::start().await;
    up.set_a(NAME, IP, 2);
    // AMOUNT 1, refresh in the last 50% of the entry's 2 s life.
    let (node, maddr) = start(&up, &["--prefetch", "1,1m,50"]).await;
    let q = format!("{NAME}.");
    // A bounded, steady stream across several TTLs: 60 queries, 100 ms apart (6 s, 3 lifetimes).
    for _ in 0..60 {
        let r = query_udp_retry(node.addr, &q, RecordType::A).await;
        assert_eq!(a_addrs(&r), vec![IP]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let misses = metric(maddr, "nodedns_cache_misses_total").await;
    let prefetches = metric(maddr, "nodedns_prefetches_total").await;
    assert_eq!(misses, 1.0, "only the first query missed");
    assert!(
        prefetches >= 2.0,
        "refreshed before each expiry: {prefetches}"
    );
    assert!(up.queries(NAME) >= 3, "the fake saw the refreshes");
}
