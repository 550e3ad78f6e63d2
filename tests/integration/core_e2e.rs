//! End-to-end tests of the core forwarder and cache: the real binary against a fake upstream.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::fake_upstream::{Behavior, FakeUpstream};
use crate::harness::{
    Nodedns, Rng, a_addrs, build_query, build_query_id, exchange_tcp, exchange_udp, min_answer_ttl,
    query_tcp, query_udp, read_frame, soa_ttl, udp_exchange_raw,
};

const IP1: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const IP2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

#[tokio::test]
async fn health_query_answered_locally() {
    let up = FakeUpstream::start().await;
    let node = Nodedns::with_upstream(&up, &[]).await;
    let bytes = crate::harness::health_query(0x1234);
    let reply = udp_exchange_raw(node.addr, &bytes, Duration::from_secs(3))
        .await
        .expect("health reply");
    let m = Message::from_vec(&reply).expect("health reply parses");
    assert_eq!(m.id, 0x1234);
    assert_eq!(m.response_code, ResponseCode::NoError);
    assert_eq!(
        up.queries("health.nodedns"),
        0,
        "the health query must not be forwarded"
    );
}

#[tokio::test]
async fn cache_hit_not_forwarded() {
    let up = FakeUpstream::start().await;
    up.set_a("hit.example", IP1, 30);
    let node = Nodedns::with_upstream(&up, &[]).await;
    let r1 = query_udp(node.addr, "hit.example", RecordType::A, None, false).await;
    assert_eq!(r1.response_code, ResponseCode::NoError);
    assert_eq!(a_addrs(&r1), vec![IP1]);
    assert_eq!(up.queries("hit.example"), 1);
    for _ in 0..5 {
        let r = query_udp(node.addr, "hit.example", RecordType::A, None, false).await;
        assert_eq!(r.response_code, ResponseCode::NoError);
        assert_eq!(a_addrs(&r), vec![IP1]);
    }
    // Also a hit over TCP.
    let r = query_tcp(node.addr, "hit.example", RecordType::A, None, false).await;
    assert_eq!(a_addrs(&r), vec![IP1]);
    assert_eq!(
        up.queries("hit.example"),
        1,
        "cache hits must not reach the upstream"
    );
}

#[tokio::test]
async fn ttl_counts_down_and_entry_expires() {
    let up = FakeUpstream::start().await;
    up.set_a("ttl.example", IP1, 3);
    let node = Nodedns::with_upstream(&up, &[]).await;
    let t0 = Instant::now();
    let r1 = query_udp(node.addr, "ttl.example", RecordType::A, None, false).await;
    let ttl1 = min_answer_ttl(&r1);
    assert!(ttl1 <= 3, "served TTL {ttl1} exceeds the upstream TTL 3");
    // The one legitimate sleep: let real time pass for the TTL.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r2 = query_udp(node.addr, "ttl.example", RecordType::A, None, false).await;
    assert_eq!(a_addrs(&r2), vec![IP1]);
    let ttl2 = min_answer_ttl(&r2);
    assert!(
        ttl2 < ttl1 || ttl1 == 0,
        "TTL must count down: first {ttl1}, after 1.5 s {ttl2}"
    );
    assert_eq!(up.queries("ttl.example"), 1, "second query must be a hit");
    // Change the answer upstream; after expiry nodedns must fetch the new one.
    up.set_a("ttl.example", IP2, 3);
    let wait = Duration::from_millis(3600).saturating_sub(t0.elapsed());
    tokio::time::sleep(wait).await;
    let r3 = query_udp(node.addr, "ttl.example", RecordType::A, None, false).await;
    assert_eq!(
        up.queries("ttl.example"),
        2,
        "after the TTL expired the upstream must see a second query"
    );
    assert_eq!(a_addrs(&r3), vec![IP2], "expired entry must be refreshed");
}

#[tokio::test]
async fn served_ttl_capped_by_upstream_and_max_ttl() {
    let up = FakeUpstream::start().await;
    up.set_a("long.example", IP1, 3600);
    up.set_a("short.example", IP1, 7);
    // Default --max-ttl is 30s.
    let node = Nodedns::with_upstream(&up, &[]).await;
    for _ in 0..2 {
        let r = query_udp(node.addr, "long.example", RecordType::A, None, false).await;
        let ttl = min_answer_ttl(&r);
        assert!(ttl <= 30, "TTL {ttl} exceeds the default --max-ttl 30s");
        assert!(ttl > 0, "TTL must not be zero for a fresh entry");
        let r = query_udp(node.addr, "short.example", RecordType::A, None, false).await;
        let ttl = min_answer_ttl(&r);
        assert!(ttl <= 7, "TTL {ttl} exceeds the upstream TTL 7");
    }
    drop(node);
    let node = Nodedns::with_upstream(&up, &["--max-ttl", "10s"]).await;
    for _ in 0..2 {
        let r = query_udp(node.addr, "long.example", RecordType::A, None, false).await;
        let ttl = min_answer_ttl(&r);
        assert!(ttl <= 10, "TTL {ttl} exceeds --max-ttl 10s");
        let r = query_udp(node.addr, "short.example", RecordType::A, None, false).await;
        let ttl = min_answer_ttl(&r);
        assert!(ttl <= 7, "TTL {ttl} exceeds the upstream TTL 7");
    }
}

#[tokio::test]
async fn nxdomain_cached_with_soa_default_cap() {
    let up = FakeUpstream::start().await;
    up.set_soa(60, 3600);
    // Default --max-negative-ttl is 5s.
    let node = Nodedns::with_upstream(&up, &[]).await;
    for i in 0..3 {
        let r = query_udp(node.addr, "nx.example", RecordType::A, None, false).await;
        assert_eq!(r.response_code, ResponseCode::NXDomain, "query {i}");
        let ttl = soa_ttl(&r).unwrap_or_else(|| panic!("query {i}: NXDOMAIN must carry the SOA"));
        assert!(
            ttl <= 5,
            "query {i}: SOA TTL {ttl} exceeds --max-negative-ttl 5s"
        );
    }
    assert_eq!(up.queries("nx.example"), 1, "NXDOMAIN must be cached");
}

#[tokio::test]
async fn nxdomain_negative_ttl_is_min_of_soa_ttl_and_minimum() {
    let up = FakeUpstream::start().await;
    up.set_soa(20, 4);
    let node = Nodedns::with_upstream(&up, &["--max-negative-ttl", "30s"]).await;
    for i in 0..2 {
        let r = query_udp(node.addr, "nx2.example", RecordType::A, None, false).await;
        assert_eq!(r.response_code, ResponseCode::NXDomain);
        let ttl = soa_ttl(&r).expect("SOA in authority");
        assert!(
            ttl <= 4,
            "query {i}: SOA TTL {ttl} > min(SOA TTL 20, MINIMUM 4)"
        );
    }
    assert_eq!(up.queries("nx2.example"), 1);
    // SOA TTL below MINIMUM: the TTL is the bound.
    up.set_soa(3, 20);
    for i in 0..2 {
        let r = query_udp(node.addr, "nx3.example", RecordType::A, None, false).await;
        assert_eq!(r.response_code, ResponseCode::NXDomain);
        let ttl = soa_ttl(&r).expect("SOA in authority");
        assert!(
            ttl <= 3,
            "query {i}: SOA TTL {ttl} > min(SOA TTL 3, MINIMUM 20)"
        );
    }
    assert_eq!(up.queries("nx3.example"), 1);
}

#[tokio::test]
async fn negative_answer_without_soa_not_cached() {
    let up = FakeUpstream::start().await;
    up.set_behavior("nosoa.example", Behavior::NxDomainNoSoa);
    let node = Nodedns::with_upstream(&up, &[]).await;
    let r = query_udp(node.addr, "nosoa.example", RecordType::A, None, false).await;
    assert_eq!(r.response_code, ResponseCode::NXDomain);
    let after_first = up.queries("nosoa.example");
    assert!(after_first >= 1);
    let r = query_udp(node.addr, "nosoa.example", RecordType::A, None, false).await;
    assert_eq!(r.response_code, ResponseCode::NXDomain);
    assert!(
        up.queries("nosoa.example") > after_first,
        "an NXDOMAIN without SOA must not be cached (upstream saw {} then {})",
        after_first,
        up.queries("nosoa.example")
    );
}

#[tokio::test]
async fn nodata_cached() {
    let up = FakeUpstream::start().await;
    up.set_a("v4only.example", IP1, 30);
    up.set_soa(60, 60);
    let node = Nodedns::with_upstream(&up, &[]).await;
    for i in 0..3 {
        let r = query_udp(node.addr, "v4only.example", RecordType::AAAA, None, false).await;
        assert_eq!(r.response_code, ResponseCode::NoError, "query {i}");
        assert!(r.answers.is_empty(), "query {i}: NODATA has no answers");
        let ttl = soa_ttl(&r).expect("NODATA carries the SOA");
        assert!(
            ttl <= 5,
            "query {i}: SOA TTL {ttl} exceeds --max-negative-ttl 5s"
        );
    }
    assert_eq!(up.queries("v4only.example"), 1, "NODATA must be cached");
    // The A entry is separate.
    let r = query_udp(node.addr, "v4only.example", RecordType::A, None, false).await;
    assert_eq!(a_addrs(&r), vec![IP1]);
    assert_eq!(up.queries("v4only.example"), 2);
}

#[tokio::test]
async fn question_case_echoed_from_cache() {
    let up = FakeUpstream::start().await;
    up.set_a("svc-1.default.svc.cluster.local", IP1, 30);
    let node = Nodedns::with_upstream(&up, &[]).await;
    let r = query_udp(
        node.addr,
        "svc-1.default.svc.cluster.local",
        RecordType::A,
        None,
        false,
    )
    .await;
    assert_eq!(a_addrs(&r), vec![IP1]);
    for spelling in [
        "SvC-1.DeFault.svc.CLUSTER.local",
        "SVC-1.DEFAULT.SVC.CLUSTER.LOCAL",
        "svc-1.default.svc.cluster.local",
    ] {
        let r = query_udp(node.addr, spelling, RecordType::A, None, false).await;
        assert_eq!(a_addrs(&r), vec![IP1], "{spelling}");
        let got = r
            .queries
            .first()
            .expect("question echoed")
            .name()
            .to_ascii();
        assert_eq!(
            got.trim_end_matches('.'),
            spelling,
            "the reply's question must have the client's spelling"
        );
    }
    assert_eq!(
        up.queries("svc-1.default.svc.cluster.local"),
        1,
        "names differing only in case must share one cache entry"
    );
}

#[tokio::test]
async fn question_case_echoed_on_miss() {
    let up = FakeUpstream::start().await;
    up.set_a("miss.example", IP1, 30);
    let node = Nodedns::with_upstream(&up, &[]).await;
    let r = query_udp(node.addr, "MiSs.ExAmPlE", RecordType::A, None, false).await;
    assert_eq!(a_addrs(&r), vec![IP1]);
    assert_eq!(r.queries[0].name().to_ascii(), "MiSs.ExAmPlE.");
}

#[tokio::test]
async fn id_echoed_raw() {
    let up = FakeUpstream::start().await;
    up.set_a("id.example", IP1, 30);
    up.set_a("id2.example", IP1, 30);
    let node = Nodedns::with_upstream(&up, &[]).await;
    let mut rng = Rng::from_time("id_echoed_raw");
    let mut ids: Vec<u16> = vec![0, 1, 0xffff, 0x8000];
    ids.extend((0..16).map(|_| rng.u16()));
    for (i, id) in ids.iter().enumerate() {
        // Alternate a cached name and fresh names (misses).
        let name = if i % 2 == 0 {
            "id.example".to_string()
        } else {
            format!("nx-{i}.id2.example")
        };
        let bytes = build_query_id(*id, &name, RecordType::A, None, false)
            .to_vec()
            .unwrap();
        let reply = udp_exchange_raw(node.addr, &bytes, Duration::from_secs(8))
            .await
            .unwrap_or_else(|| panic!("no reply for id {id:#06x}"));
        assert!(reply.len() >= 12, "reply too short: {reply:02x?}");
        assert_eq!(
            u16::from_be_bytes([reply[0], reply[1]]),
            *id,
            "reply ID must echo the query ID"
        );
        assert_eq!(reply[2] & 0x80, 0x80, "QR must be set");
        // Over TCP too.
        let m = build_query_id(*id, &name, RecordType::A, None, false);
        let r = exchange_tcp(node.addr, &m).await; // asserts the ID
        assert_eq!(r.id, *id);
    }
}

#[tokio::test]
async fn opt_in_reply_iff_query_had_one() {
    let up = FakeUpstream::start().await;
    up.set_a("opt.example", IP1, 30);
    let node = Nodedns::with_upstream(&up, &[]).await;
    for round in ["miss", "hit"] {
        let r = query_udp(node.addr, "opt.example", RecordType::A, None, false).await;
        assert!(
            r.edns.is_none(),
            "{round}: no OPT expected in reply to a plain query"
        );
        let r = query_udp(node.addr, "opt.example", RecordType::A, Some(1232), false).await;
        assert!(
            r.edns.is_some(),
            "{round}: OPT expected in reply to an EDNS query"
        );
        let r = query_tcp(node.addr, "opt.example", RecordType::A, None, false).await;
        assert!(r.edns.is_none(), "{round}: no OPT expected over TCP");
        let r = query_tcp(node.addr, "opt.example", RecordType::A, Some(4096), false).await;
        assert!(r.edns.is_some(), "{round}: OPT expected over TCP");
    }
    // Also for negative answers.
    for _ in 0..2 {
        let r = query_udp(node.addr, "nx-opt.example", RecordType::A, None, false).await;
        assert_eq!(r.response_code, ResponseCode::NXDomain);
        assert!(r.edns.is_none());
        let r = query_udp(
            node.addr,
            "nx-opt.example",
            RecordType::A,
            Some(1232),
            false,
        )
        .await;
        assert_eq!(r.response_code, ResponseCode::NXDomain);
        assert!(r.edns.is_some());
    }
}

#[tokio::test]
async fn do_and_cd_bits_are_separate_cache_entries() {
    let up = FakeUpstream::start().await;
    up.set_a("do.example", IP1, 30);
    let node = Nodedns::with_upstream(&up, &[]).await;
    let name = "do.example";
    let r = query_udp(node.addr, name, RecordType::A, Some(1232), false).await;
    assert!(!r.edns.as_ref().expect("OPT").flags().dnssec_ok);
    query_udp(node.addr, name, RecordType::A, Some(1232), false).await;
    assert_eq!(up.queries(name), 1);

    let r = query_udp(node.addr, name, RecordType::A, Some(1232), true).await;
    assert_eq!(a_addrs(&r), vec![IP1]);
    assert!(
        r.edns.as_ref().expect("OPT").flags().dnssec_ok,
        "the DO bit must be copied into the reply (RFC 3225)"
    );
    assert_eq!(
        up.queries(name),
        2,
        "a DO=1 query must not be served from the DO=0 entry"
    );
    let seen = up.last_query(name).expect("upstream saw the query");
    assert!(
        seen.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok),
        "the DO=1 query must be forwarded with DO=1"
    );
    query_udp(node.addr, name, RecordType::A, Some(1232), true).await;
    assert_eq!(up.queries(name), 2, "the DO=1 entry must be cached");

    // CD bit.
    let mut q = build_query(name, RecordType::A, Some(1232), false);
    q.metadata.checking_disabled = true;
    let r = exchange_udp(node.addr, &q).await;
    assert_eq!(a_addrs(&r), vec![IP1]);
    assert_eq!(
        up.queries(name),
        3,
        "a CD=1 query must not be served from the CD=0 entry"
    );
    let mut q = build_query(name, RecordType::A, Some(1232), false);
    q.metadata.checking_disabled = true;
    exchange_udp(node.addr, &q).await;
    assert_eq!(up.queries(name), 3, "the CD=1 entry must be cached");
}

#[tokio::test]
async fn tc_over_udp_when_reply_exceeds_client_size() {
    let up = FakeUpstream::start().await;
    up.set_many_a("big.example", 40, 30);
    let node = Nodedns::with_upstream(&up, &[]).await;

    // No EDNS: 512 bytes max.
    let q = build_query("big.example", RecordType::A, None, false);
    let raw = udp_exchange_raw(node.addr, &q.to_vec().unwrap(), Duration::from_secs(8))
        .await
        .expect("UDP reply");
    assert!(
        raw.len() <= 512,
        "UDP reply of {} bytes to a non-EDNS client",
        raw.len()
    );
    let r = Message::from_vec(&raw).expect("parse");
    assert!(
        r.truncation,
        "40 A records do not fit in 512 bytes: TC expected"
    );
    assert_eq!(r.response_code, ResponseCode::NoError);

    // Then TCP: the full answer.
    let r = query_tcp(node.addr, "big.example", RecordType::A, None, false).await;
    assert!(!r.truncation);
    assert_eq!(r.answers.len(), 40, "full answer over TCP");

    // EDNS 1232: 40 A records fit (about 700 bytes).
    let q = build_query("big.example", RecordType::A, Some(1232), false);
    let raw = udp_exchange_raw(node.addr, &q.to_vec().unwrap(), Duration::from_secs(8))
        .await
        .expect("UDP reply");
    let r = Message::from_vec(&raw).expect("parse");
    assert!(!r.truncation, "a {}-byte reply fits 1232", raw.len());
    assert_eq!(r.answers.len(), 40);

    // EDNS 512 advertised: treated as 512.
    let q = build_query("big.example", RecordType::A, Some(512), false);
    let raw = udp_exchange_raw(node.addr, &q.to_vec().unwrap(), Duration::from_secs(8))
        .await
        .expect("UDP reply");
    assert!(raw.len() <= 512);
    assert!(Message::from_vec(&raw).expect("parse").truncation);
}

#[tokio::test]
async fn big_txt_tc_over_udp_full_over_tcp() {
    let up = FakeUpstream::start().await;
    up.set_big_txt("txt.example", 3000, 30);
    let node = Nodedns::with_upstream(&up, &[]).await;
    let q = build_query("txt.example", RecordType::TXT, Some(1232), false);
    let raw = udp_exchange_raw(node.addr, &q.to_vec().unwrap(), Duration::from_secs(8))
        .await
        .expect("UDP reply");
    assert!(raw.len() <= 1232, "UDP reply of {} bytes > 1232", raw.len());
    let r = Message::from_vec(&raw).expect("parse");
    assert!(
        r.truncation,
        "a 3000-byte TXT does not fit 1232: TC expected"
    );
    let r = query_tcp(node.addr, "txt.example", RecordType::TXT, Some(1232), false).await;
    assert!(!r.truncation);
    assert_eq!(r.answers.len(), 1);
    let r = query_tcp(node.addr, "txt.example", RecordType::TXT, None, false).await;
    assert_eq!(r.answers.len(), 1);
}

#[tokio::test]
async fn upstream_truncation_retried_over_tcp() {
    let up = FakeUpstream::start().await;
    up.set_a("tc.example", IP1, 30);
    up.set_behavior("tc.example", Behavior::TruncateUdp);
    let node = Nodedns::with_upstream(&up, &[]).await;
    let r = query_udp(node.addr, "tc.example", RecordType::A, None, false).await;
    assert_eq!(r.response_code, ResponseCode::NoError);
    assert!(
        !r.truncation,
        "the full answer fits 512 bytes: no TC to the client"
    );
    assert_eq!(a_addrs(&r), vec![IP1]);
    assert!(
        up.tcp_queries_for("tc.example") >= 1,
        "after TC=1 over UDP nodedns must retry upstream over TCP"
    );

    // A large answer that the upstream truncates: TC to a small UDP client, full over TCP.
    up.set_many_a("tcbig.example", 40, 30);
    up.set_behavior("tcbig.example", Behavior::TruncateUdp);
    let r = query_udp(node.addr, "tcbig.example", RecordType::A, None, false).await;
    assert!(
        r.truncation,
        "40 records do not fit a 512-byte client: TC expected"
    );
    let r = query_tcp(node.addr, "tcbig.example", RecordType::A, None, false).await;
    assert_eq!(r.answers.len(), 40);
    assert!(up.tcp_queries_for("tcbig.example") >= 1);
}

/// Writes `queries` back-to-back on one TCP connection and returns the replies by ID.
async fn pipeline(stream: &mut TcpStream, queries: &[Message]) -> HashMap<u16, Message> {
    let mut wire = Vec::new();
    for q in queries {
        let b = q.to_vec().unwrap();
        wire.extend_from_slice(&(b.len() as u16).to_be_bytes());
        wire.extend_from_slice(&b);
    }
    stream.write_all(&wire).await.unwrap();
    let mut replies = HashMap::new();
    for i in 0..queries.len() {
        let f = tokio::time::timeout(Duration::from_secs(8), read_frame(stream))
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for pipelined reply {i}"))
            .unwrap_or_else(|| panic!("connection closed before pipelined reply {i}"));
        let m = Message::from_vec(&f).expect("pipelined reply parses");
        replies.insert(m.id, m);
    }
    replies
}

#[tokio::test]
async fn tcp_pipelining() {
    let up = FakeUpstream::start().await;
    for i in 0..10u8 {
        up.set_a(&format!("p{i}.example"), Ipv4Addr::new(10, 2, 0, i), 30);
    }
    // A slow name first, so that replies may come back out of order.
    up.set_behavior("p0.example", Behavior::Delay(300));
    let node = Nodedns::with_upstream(&up, &[]).await;
    let mut s = TcpStream::connect(node.addr).await.unwrap();
    let queries: Vec<Message> = (0..10u16)
        .map(|i| {
            build_query_id(
                1000 + i,
                &format!("p{i}.example"),
                RecordType::A,
                None,
                false,
            )
        })
        .collect();
    let replies = pipeline(&mut s, &queries).await;
    assert_eq!(replies.len(), 10, "all pipelined queries must be answered");
    for i in 0..10u16 {
        let r = &replies[&(1000 + i)];
        assert_eq!(
            r.queries[0].name().to_ascii(),
            format!("p{i}.example."),
            "reply {} matched to the wrong question",
            1000 + i
        );
        assert_eq!(a_addrs(r), vec![Ipv4Addr::new(10, 2, 0, i as u8)]);
    }
    // Same connection again, now all hits.
    let queries: Vec<Message> = (0..10u16)
        .map(|i| {
            build_query_id(
                2000 + i,
                &format!("p{i}.example"),
                RecordType::A,
                None,
                false,
            )
        })
        .collect();
    let replies = pipeline(&mut s, &queries).await;
    assert_eq!(replies.len(), 10);
}

#[tokio::test]
async fn force_tcp_uses_tcp_and_reuses_connections() {
    let up = FakeUpstream::start().await;
    for i in 0..30u8 {
        up.set_a(&format!("ft{i}.example"), Ipv4Addr::new(10, 3, 0, i), 30);
    }
    let node = Nodedns::with_upstream(&up, &["--force-tcp"]).await;
    for i in 0..30u8 {
        let r = query_udp(
            node.addr,
            &format!("ft{i}.example"),
            RecordType::A,
            None,
            false,
        )
        .await;
        assert_eq!(a_addrs(&r), vec![Ipv4Addr::new(10, 3, 0, i)]);
    }
    let sequential_conns = up.tcp_connections();
    assert!(
        sequential_conns <= 2,
        "--force-tcp must reuse connections: {sequential_conns} connections for 30 sequential queries"
    );
    // And some concurrently.
    let mut tasks = Vec::new();
    for i in 0..10u8 {
        up.set_a(&format!("ftc{i}.example"), Ipv4Addr::new(10, 4, 0, i), 30);
        let addr = node.addr;
        tasks.push(tokio::spawn(async move {
            query_udp(addr, &format!("ftc{i}.example"), RecordType::A, None, false).await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().answers.len(), 1);
    }
    // Client queries (the readiness probe `. NS` is checked by its own test below).
    let udp_names: Vec<String> = up
        .udp_query_names()
        .into_iter()
        .filter(|n| !n.is_empty())
        .collect();
    assert!(
        udp_names.is_empty(),
        "--force-tcp: the upstream must see no UDP query; saw UDP queries for {udp_names:?}"
    );
    assert!(up.tcp_queries() >= 40, "tcp queries: {}", up.tcp_queries());
    assert!(
        up.tcp_connections() < 20,
        "--force-tcp must reuse connections: {} connections for 40 queries",
        up.tcp_connections()
    );
}

/// The pooled upstream TCP connection (here for truncated UDP answers) is shared by every UDP
/// worker. A worker with no miss in flight sleeps in a blocking `recvmmsg` and does not drive its
/// runtime, so the connection must not live on the runtime of the worker that happened to dial it:
/// queries arriving on the other workers (each from a fresh client port, so `SO_REUSEPORT` spreads
/// them) would wait on a connection whose reader and writer never run, and time out. (Without
/// `--force-tcp` the readiness probe goes over UDP, so the first dial is a worker's.)
#[tokio::test]
async fn tcp_fallback_connection_serves_every_worker() {
    let up = FakeUpstream::start().await;
    for i in 0..40u8 {
        let name = format!("fw{i}.example");
        up.set_a(&name, Ipv4Addr::new(10, 5, 0, i), 30);
        up.set_behavior(&name, Behavior::TruncateUdp);
    }
    let node = Nodedns::with_upstream(&up, &["--workers", "4"]).await;
    for i in 0..40u8 {
        let name = format!("fw{i}.example");
        let q = build_query(&name, RecordType::A, None, false);
        let raw = q.to_vec().unwrap();
        let reply = udp_exchange_raw(node.addr, &raw, Duration::from_secs(3))
            .await
            .unwrap_or_else(|| panic!("no reply for {name} (query {i} of 40) within 3 s"));
        let m = Message::from_vec(&reply).unwrap();
        assert_eq!(m.response_code, ResponseCode::NoError, "{name}");
        assert_eq!(a_addrs(&m), vec![Ipv4Addr::new(10, 5, 0, i)], "{name}");
    }
    assert_eq!(up.tcp_queries(), 40);
    assert!(
        up.tcp_connections() <= 2,
        "one connection shared by the workers, not {}",
        up.tcp_connections()
    );
}

#[tokio::test]
async fn upstream_timeout_gives_servfail_within_deadline() {
    let up = FakeUpstream::start().await;
    up.set_a("drop.example", IP1, 30);
    up.set_behavior("drop.example", Behavior::Drop);
    let node = Nodedns::with_upstream(
        &up,
        &["--attempt-timeout", "500ms", "--query-deadline", "2s"],
    )
    .await;
    let q = build_query("drop.example", RecordType::A, None, false);
    // Bounded wait: deadline (2 s) + 1 s.
    let raw = udp_exchange_raw(node.addr, &q.to_vec().unwrap(), Duration::from_secs(3))
        .await
        .expect("a SERVFAIL must arrive within --query-deadline + 1 s");
    let r = Message::from_vec(&raw).expect("parse");
    assert_eq!(r.id, q.id);
    assert_eq!(r.response_code, ResponseCode::ServFail);
    assert!(up.queries("drop.example") >= 1);

    // Over TCP too.
    let q = build_query("drop.example", RecordType::A, None, false);
    let raw =
        crate::harness::tcp_exchange_raw(node.addr, &q.to_vec().unwrap(), Duration::from_secs(3))
            .await
            .expect("a SERVFAIL over TCP within --query-deadline + 1 s");
    assert_eq!(
        Message::from_vec(&raw).expect("parse").response_code,
        ResponseCode::ServFail
    );

    // The name recovers when the upstream answers again (the failure was not cached).
    up.set_behavior("drop.example", Behavior::Normal);
    let r = query_udp(node.addr, "drop.example", RecordType::A, None, false).await;
    assert_eq!(a_addrs(&r), vec![IP1]);
}

#[tokio::test]
async fn servfail_passed_through_and_not_cached() {
    let up = FakeUpstream::start().await;
    up.set_a("sf.example", IP1, 30);
    up.set_behavior("sf.example", Behavior::ServFail);
    let node = Nodedns::with_upstream(&up, &[]).await;
    let r = query_udp(node.addr, "sf.example", RecordType::A, None, false).await;
    assert_eq!(r.response_code, ResponseCode::ServFail);
    let n1 = up.queries("sf.example");
    assert!(n1 >= 1);
    let r = query_udp(node.addr, "sf.example", RecordType::A, None, false).await;
    assert_eq!(r.response_code, ResponseCode::ServFail);
    let n2 = up.queries("sf.example");
    assert!(
        n2 > n1,
        "SERVFAIL must not be cached by default ({n1} then {n2} upstream queries)"
    );
    up.set_behavior("sf.example", Behavior::Normal);
    let r = query_udp(node.addr, "sf.example", RecordType::A, None, false).await;
    assert_eq!(a_addrs(&r), vec![IP1]);
}

#[tokio::test]
async fn servfail_cached_with_servfail_ttl() {
    let up = FakeUpstream::start().await;
    up.set_behavior("sf2.example", Behavior::ServFail);
    let node = Nodedns::with_upstream(&up, &["--servfail-ttl", "5s"]).await;
    let r = query_udp(node.addr, "sf2.example", RecordType::A, None, false).await;
    assert_eq!(r.response_code, ResponseCode::ServFail);
    let n1 = up.queries("sf2.example");
    let r = query_udp(node.addr, "sf2.example", RecordType::A, None, false).await;
    assert_eq!(r.response_code, ResponseCode::ServFail);
    assert_eq!(
        up.queries("sf2.example"),
        n1,
        "--servfail-ttl 5s: SERVFAIL must be cached"
    );
}

#[tokio::test]
async fn refused_from_upstream_passed_through() {
    let up = FakeUpstream::start().await;
    up.set_behavior("ref.example", Behavior::Refused);
    let node = Nodedns::with_upstream(&up, &[]).await;
    let r = query_udp(node.addr, "ref.example", RecordType::A, None, false).await;
    assert!(
        matches!(
            r.response_code,
            ResponseCode::Refused | ResponseCode::ServFail
        ),
        "REFUSED from upstream: got {:?}",
        r.response_code
    );
}

#[tokio::test]
async fn other_record_types_forwarded() {
    let up = FakeUpstream::start().await;
    up.set_srv(
        "_http._tcp.web.default.svc.cluster.local",
        80,
        "web.default.svc.cluster.local",
        30,
    );
    up.set_ptr("1.0.0.10.in-addr.arpa", "web.default.svc.cluster.local", 30);
    up.set_aaaa("v6.example", "fd00::1".parse().unwrap(), 30);
    let node = Nodedns::with_upstream(&up, &[]).await;
    for _ in 0..2 {
        let r = query_udp(
            node.addr,
            "_http._tcp.web.default.svc.cluster.local",
            RecordType::SRV,
            Some(1232),
            false,
        )
        .await;
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.answers[0].record_type(), RecordType::SRV);
        let r = query_udp(
            node.addr,
            "1.0.0.10.in-addr.arpa",
            RecordType::PTR,
            None,
            false,
        )
        .await;
        assert_eq!(r.answers[0].record_type(), RecordType::PTR);
        let r = query_udp(node.addr, "v6.example", RecordType::AAAA, None, false).await;
        assert_eq!(r.answers[0].record_type(), RecordType::AAAA);
    }
    for name in [
        "_http._tcp.web.default.svc.cluster.local",
        "1.0.0.10.in-addr.arpa",
        "v6.example",
    ] {
        assert_eq!(
            up.queries(name),
            1,
            "{name}: the second query must be a hit"
        );
    }
}

#[tokio::test]
async fn zone_routing_longest_suffix_wins() {
    let a = FakeUpstream::start().await; // cluster.local
    let b = FakeUpstream::start().await; // svc.cluster.local
    let c = FakeUpstream::start().await; // default
    let names = [
        "x.svc.cluster.local",
        "svc.cluster.local",
        "y.pod.cluster.local",
        "cluster.local",
        "example.com",
        "notcluster.local",
        "svc.cluster.local.evil.com",
        "xsvc.cluster.local",
    ];
    for (up, last) in [(&a, 1u8), (&b, 2), (&c, 3)] {
        for n in names {
            up.set_a(n, Ipv4Addr::new(10, 9, 0, last), 30);
        }
    }
    let args = vec![
        "--forward".to_string(),
        format!("cluster.local={}", a.addr_str()),
        "--forward".to_string(),
        format!("svc.cluster.local={}", b.addr_str()),
        "--upstream".to_string(),
        c.addr_str(),
    ];
    let node = Nodedns::start(&args).await;
    let expect = [
        ("x.svc.cluster.local", 2u8),
        ("svc.cluster.local", 2),
        ("y.pod.cluster.local", 1),
        ("cluster.local", 1),
        ("xsvc.cluster.local", 1),
        ("example.com", 3),
        ("notcluster.local", 3),
        ("svc.cluster.local.evil.com", 3),
    ];
    for (name, which) in expect {
        let r = query_udp(node.addr, name, RecordType::A, None, false).await;
        assert_eq!(
            a_addrs(&r),
            vec![Ipv4Addr::new(10, 9, 0, which)],
            "{name} must be forwarded to upstream #{which}"
        );
        let (ua, ub, uc) = (a.queries(name), b.queries(name), c.queries(name));
        let got = [ua, ub, uc];
        let mut want = [0usize; 3];
        want[which as usize - 1] = 1;
        assert_eq!(
            got, want,
            "{name}: queries seen by (cluster.local, svc.cluster.local, default)"
        );
    }
    // Case-insensitive zone match.
    let r = query_udp(node.addr, "Z.SVC.Cluster.Local", RecordType::A, None, false).await;
    assert_eq!(r.response_code, ResponseCode::NXDomain);
    assert_eq!(
        b.queries("z.svc.cluster.local"),
        1,
        "zone match must ignore case"
    );
}

#[tokio::test]
async fn forward_with_multiple_addresses() {
    let a1 = FakeUpstream::start().await;
    let a2 = FakeUpstream::start().await;
    let c = FakeUpstream::start().await;
    for up in [&a1, &a2] {
        up.set_a("m.cluster.local", IP1, 30);
    }
    a1.set_behavior("m.cluster.local", Behavior::Drop);
    let args = vec![
        "--forward".to_string(),
        format!("cluster.local={},{}", a1.addr_str(), a2.addr_str()),
        "--upstream".to_string(),
        c.addr_str(),
        "--attempt-timeout".to_string(),
        "300ms".to_string(),
        "--query-deadline".to_string(),
        "3s".to_string(),
    ];
    let node = Nodedns::start(&args).await;
    let q = build_query("m.cluster.local", RecordType::A, None, false);
    let raw = udp_exchange_raw(node.addr, &q.to_vec().unwrap(), Duration::from_secs(4))
        .await
        .expect("reply within the deadline");
    let r = Message::from_vec(&raw).unwrap();
    assert_eq!(
        a_addrs(&r),
        vec![IP1],
        "with one dead address the other must answer (got {:?})",
        r.response_code
    );
    assert_eq!(c.queries("m.cluster.local"), 0);
}

#[tokio::test]
async fn upstream_failover_between_upstreams() {
    let dead = FakeUpstream::start().await;
    let live = FakeUpstream::start().await;
    for up in [&dead, &live] {
        up.set_a("fo.example", IP1, 30);
    }
    dead.set_behavior("fo.example", Behavior::Drop);
    let args: Vec<String> = [
        "--upstream",
        &dead.addr_str(),
        "--upstream",
        &live.addr_str(),
        "--attempt-timeout",
        "300ms",
        "--query-deadline",
        "3s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let node = Nodedns::start(&args).await;
    let q = build_query("fo.example", RecordType::A, None, false);
    let raw = udp_exchange_raw(node.addr, &q.to_vec().unwrap(), Duration::from_secs(4))
        .await
        .expect("reply within the deadline");
    let r = Message::from_vec(&raw).unwrap();
    assert_eq!(
        a_addrs(&r),
        vec![IP1],
        "one upstream drops: the other must answer (got {:?})",
        r.response_code
    );
    assert_eq!(live.queries("fo.example"), 1);
}

#[tokio::test]
async fn min_ttl_keeps_short_lived_entries() {
    let up = FakeUpstream::start().await;
    up.set_a("short.example", IP1, 1);
    let node = Nodedns::with_upstream(&up, &["--min-ttl", "10s"]).await;
    let r = query_udp(node.addr, "short.example", RecordType::A, None, false).await;
    assert_eq!(a_addrs(&r), vec![IP1]);
    // Real time past the upstream TTL (1 s) but well within --min-ttl.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = query_udp(node.addr, "short.example", RecordType::A, None, false).await;
    assert_eq!(a_addrs(&r), vec![IP1]);
    assert_eq!(
        up.queries("short.example"),
        1,
        "--min-ttl 10s: an entry with upstream TTL 1 must still be cached after 2 s"
    );
}

#[tokio::test]
async fn listens_on_every_listen_address() {
    let up = FakeUpstream::start().await;
    up.set_a("two.example", IP1, 30);
    let second: std::net::SocketAddr = format!("127.0.0.1:{}", crate::harness::free_port())
        .parse()
        .unwrap();
    let node = Nodedns::with_upstream(&up, &["--listen", &second.to_string()]).await;
    for addr in [node.addr, second] {
        let r = query_udp(addr, "two.example", RecordType::A, None, false).await;
        assert_eq!(a_addrs(&r), vec![IP1], "UDP on {addr}");
        let r = query_tcp(addr, "two.example", RecordType::A, None, false).await;
        assert_eq!(a_addrs(&r), vec![IP1], "TCP on {addr}");
    }
    assert_eq!(
        up.queries("two.example"),
        1,
        "one cache shared by all listeners"
    );
}

#[tokio::test]
async fn force_tcp_readiness_probe_uses_tcp_too() {
    let up = FakeUpstream::start().await;
    up.set_a("ready.example", IP1, 30);
    let node = Nodedns::with_upstream(&up, &["--force-tcp"]).await;
    let r = query_udp(node.addr, "ready.example", RecordType::A, None, false).await;
    assert_eq!(a_addrs(&r), vec![IP1]);
    // Bounded wait for any background traffic (the readiness probe runs at start).
    let saw_udp =
        crate::harness::wait_until(Duration::from_millis(1500), || up.udp_queries() > 0).await;
    assert!(
        !saw_udp,
        "--force-tcp: the upstream must see no UDP query at all, but saw UDP queries for {:?} \
         (\"\" is the root: the readiness probe `. NS`)",
        up.udp_query_names()
    );
}

#[tokio::test]
async fn nodata_without_soa_not_cached() {
    let up = FakeUpstream::start().await;
    up.set_a("v4.example", IP1, 30);
    up.clear_soa();
    let node = Nodedns::with_upstream(&up, &[]).await;
    let r = query_udp(node.addr, "v4.example", RecordType::AAAA, None, false).await;
    assert_eq!(r.response_code, ResponseCode::NoError);
    assert!(r.answers.is_empty());
    let n1 = up.queries("v4.example");
    let r = query_udp(node.addr, "v4.example", RecordType::AAAA, None, false).await;
    assert_eq!(r.response_code, ResponseCode::NoError);
    assert!(
        up.queries("v4.example") > n1,
        "a NODATA without SOA must not be cached"
    );
}

#[tokio::test]
async fn forward_dot_is_the_default_zone() {
    let a = FakeUpstream::start().await;
    let d = FakeUpstream::start().await;
    a.set_a("x.cluster.local", IP1, 30);
    d.set_a("example.org", IP2, 30);
    let args = vec![
        "--forward".to_string(),
        format!("cluster.local={}", a.addr_str()),
        "--forward".to_string(),
        format!(".={}", d.addr_str()),
    ];
    let node = Nodedns::start(&args).await;
    let r = query_udp(node.addr, "x.cluster.local", RecordType::A, None, false).await;
    assert_eq!(a_addrs(&r), vec![IP1]);
    let r = query_udp(node.addr, "example.org", RecordType::A, None, false).await;
    assert_eq!(
        a_addrs(&r),
        vec![IP2],
        "`--forward .=ADDR` serves the default zone"
    );
    assert_eq!(d.queries("example.org"), 1);
    assert_eq!(a.queries("example.org"), 0);
}

#[tokio::test]
async fn serves_ipv6_and_ipv4_in_one_process() {
    let Ok(probe) = std::net::UdpSocket::bind("[::1]:0") else {
        println!("SKIP: no IPv6 loopback here");
        return;
    };
    let port = probe.local_addr().expect("local addr").port();
    drop(probe);
    let up = FakeUpstream::start().await;
    up.set_a("dual.example", IP1, 30);
    let v6: std::net::SocketAddr = format!("[::1]:{port}").parse().unwrap();
    let node = Nodedns::with_upstream(&up, &["--listen", &v6.to_string()]).await;
    for addr in [v6, node.addr] {
        let r = query_udp(addr, "dual.example", RecordType::A, Some(1232), false).await;
        assert_eq!(a_addrs(&r), vec![IP1], "UDP on {addr}");
        let r = query_tcp(addr, "dual.example", RecordType::A, None, false).await;
        assert_eq!(a_addrs(&r), vec![IP1], "TCP on {addr}");
    }
    assert_eq!(up.queries("dual.example"), 1);
}
