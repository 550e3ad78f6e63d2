//! Self-tests of the fake upstream, talking to it directly (no nodedns involved).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

use crate::fake_upstream::{Behavior, FakeUpstream};
use crate::harness::{
    a_addrs, build_query, build_query_id, exchange_tcp, exchange_udp, read_frame, soa_ttl,
    udp_exchange_raw,
};
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn fake_answers_a_over_udp_and_tcp() {
    let up = FakeUpstream::start().await;
    up.set_a(
        "svc-1.default.svc.cluster.local",
        Ipv4Addr::new(10, 0, 0, 1),
        30,
    );
    let r = exchange_udp(
        up.addr,
        &build_query(
            "SVC-1.default.svc.cluster.local",
            RecordType::A,
            None,
            false,
        ),
    )
    .await;
    assert_eq!(r.response_code, ResponseCode::NoError);
    assert_eq!(a_addrs(&r), vec![Ipv4Addr::new(10, 0, 0, 1)]);
    assert_eq!(r.answers[0].ttl, 30);
    assert!(
        r.edns.is_none(),
        "no OPT in the reply to a query without one"
    );
    let r = exchange_tcp(
        up.addr,
        &build_query(
            "svc-1.default.svc.cluster.local",
            RecordType::A,
            Some(1232),
            true,
        ),
    )
    .await;
    assert_eq!(a_addrs(&r), vec![Ipv4Addr::new(10, 0, 0, 1)]);
    let e = r.edns.expect("OPT echoed");
    assert!(e.flags().dnssec_ok, "DO echoed");
    assert_eq!(up.queries("svc-1.default.svc.cluster.local."), 2);
    assert_eq!(up.udp_queries(), 1);
    assert_eq!(up.tcp_queries(), 1);
    assert_eq!(up.tcp_connections(), 1);
}

#[tokio::test]
async fn fake_negative_answers() {
    let up = FakeUpstream::start().await;
    up.set_a("exists.test", Ipv4Addr::new(10, 0, 0, 2), 30);
    up.set_soa(20, 10);
    let r = exchange_udp(
        up.addr,
        &build_query("missing.test", RecordType::A, None, false),
    )
    .await;
    assert_eq!(r.response_code, ResponseCode::NXDomain);
    assert_eq!(soa_ttl(&r), Some(20));
    let r = exchange_udp(
        up.addr,
        &build_query("exists.test", RecordType::AAAA, None, false),
    )
    .await;
    assert_eq!(r.response_code, ResponseCode::NoError);
    assert!(r.answers.is_empty());
    assert_eq!(soa_ttl(&r), Some(20));
    up.set_behavior("nosoa.test", Behavior::NxDomainNoSoa);
    let r = exchange_udp(
        up.addr,
        &build_query("nosoa.test", RecordType::A, None, false),
    )
    .await;
    assert_eq!(r.response_code, ResponseCode::NXDomain);
    assert_eq!(soa_ttl(&r), None);
}

#[tokio::test]
async fn fake_behaviors() {
    let up = FakeUpstream::start().await;
    up.set_a("x.test", Ipv4Addr::new(10, 0, 0, 3), 30);
    up.set_behavior("x.test", Behavior::ServFail);
    let r = exchange_udp(up.addr, &build_query("x.test", RecordType::A, None, false)).await;
    assert_eq!(r.response_code, ResponseCode::ServFail);
    up.set_behavior("x.test", Behavior::Refused);
    let r = exchange_udp(up.addr, &build_query("x.test", RecordType::A, None, false)).await;
    assert_eq!(r.response_code, ResponseCode::Refused);
    up.set_behavior("x.test", Behavior::TruncateUdp);
    let r = exchange_udp(up.addr, &build_query("x.test", RecordType::A, None, false)).await;
    assert!(r.truncation);
    assert!(r.answers.is_empty());
    let r = exchange_tcp(up.addr, &build_query("x.test", RecordType::A, None, false)).await;
    assert!(!r.truncation);
    assert_eq!(a_addrs(&r).len(), 1);
    up.set_behavior("x.test", Behavior::Drop);
    let q = build_query("x.test", RecordType::A, None, false)
        .to_vec()
        .unwrap();
    assert!(
        udp_exchange_raw(up.addr, &q, Duration::from_millis(300))
            .await
            .is_none()
    );
    up.set_behavior("x.test", Behavior::Delay(300));
    let t = Instant::now();
    let r = exchange_udp(up.addr, &build_query("x.test", RecordType::A, None, false)).await;
    assert!(t.elapsed() >= Duration::from_millis(290));
    assert_eq!(a_addrs(&r).len(), 1);
    // Changing the answer at run time.
    up.set_behavior("x.test", Behavior::Normal);
    up.set_a("x.test", Ipv4Addr::new(10, 0, 0, 4), 30);
    let r = exchange_udp(up.addr, &build_query("x.test", RecordType::A, None, false)).await;
    assert_eq!(a_addrs(&r), vec![Ipv4Addr::new(10, 0, 0, 4)]);
    assert_eq!(up.queries("X.TEST"), 7);
}

#[tokio::test]
async fn fake_truncates_large_udp_answers() {
    let up = FakeUpstream::start().await;
    up.set_many_a("big.test", 40, 30);
    up.set_big_txt("txt.test", 3000, 30);
    let r = exchange_udp(
        up.addr,
        &build_query("big.test", RecordType::A, None, false),
    )
    .await;
    assert!(r.truncation, "40 A records exceed 512 bytes");
    let r = exchange_udp(
        up.addr,
        &build_query("big.test", RecordType::A, Some(1232), false),
    )
    .await;
    assert!(!r.truncation);
    assert_eq!(r.answers.len(), 40);
    let r = exchange_udp(
        up.addr,
        &build_query("txt.test", RecordType::TXT, Some(1232), false),
    )
    .await;
    assert!(r.truncation, "3000-byte TXT exceeds 1232 bytes");
    let r = exchange_tcp(
        up.addr,
        &build_query("txt.test", RecordType::TXT, None, false),
    )
    .await;
    assert!(!r.truncation);
    assert_eq!(r.answers.len(), 1);
}

#[tokio::test]
async fn fake_tcp_pipelining_out_of_order() {
    let up = FakeUpstream::start().await;
    up.set_a("slow.test", Ipv4Addr::new(10, 0, 0, 5), 30);
    up.set_a("fast.test", Ipv4Addr::new(10, 0, 0, 6), 30);
    up.set_behavior("slow.test", Behavior::Delay(200));
    let mut s = tokio::net::TcpStream::connect(up.addr).await.unwrap();
    let mut wire = Vec::new();
    for (id, name) in [(1u16, "slow.test"), (2, "fast.test"), (3, "fast.test")] {
        let b = build_query_id(id, name, RecordType::A, None, false)
            .to_vec()
            .unwrap();
        wire.extend_from_slice(&(b.len() as u16).to_be_bytes());
        wire.extend_from_slice(&b);
    }
    s.write_all(&wire).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let f = tokio::time::timeout(Duration::from_secs(3), read_frame(&mut s))
            .await
            .unwrap()
            .unwrap();
        ids.push(hickory_proto::op::Message::from_vec(&f).unwrap().id);
    }
    assert_eq!(
        ids.last(),
        Some(&1),
        "the delayed reply comes last: {ids:?}"
    );
    ids.sort();
    assert_eq!(ids, vec![1, 2, 3]);
    assert_eq!(up.tcp_connections(), 1);
}

#[tokio::test]
async fn fake_shuts_down_on_drop() {
    let up = FakeUpstream::start().await;
    up.set_a("x.test", Ipv4Addr::new(10, 0, 0, 7), 30);
    let addr = up.addr;
    drop(up);
    // Bounded poll: the listener goes away once the loops see the shutdown signal.
    let mut closed = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(closed, "TCP listener still accepting after drop");
    let q = build_query("x.test", RecordType::A, None, false)
        .to_vec()
        .unwrap();
    assert!(
        udp_exchange_raw(addr, &q, Duration::from_millis(200))
            .await
            .is_none()
    );
}
