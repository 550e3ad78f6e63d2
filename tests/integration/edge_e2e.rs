//! Edge cases of the core beyond the basic contract: coalescing, spoofed upstream replies,
//! negative-entry expiry, unreachable upstreams, TCP framing and idle connections, load.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::fake_upstream::{Behavior, FakeUpstream};
use crate::harness::{
    Nodedns, Rng, a_addrs, build_query, build_query_id, exchange_udp, free_port, query_udp,
    read_frame, soa_ttl, udp_exchange_raw,
};

const IP1: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

/// Randomises the case of each letter.
fn random_case(rng: &mut Rng, name: &str) -> String {
    name.chars()
        .map(|c| {
            if rng.below(2) == 0 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect()
}

#[tokio::test]
async fn concurrent_identical_queries_each_get_own_id_and_case() {
    let up = FakeUpstream::start().await;
    up.set_a("coal.example", IP1, 30);
    up.set_behavior("coal.example", Behavior::Delay(300));
    let node = Nodedns::with_upstream(&up, &[]).await;
    let mut rng = Rng::from_time("coalescing");
    let mut tasks = Vec::new();
    for i in 0..20 {
        let spelling = random_case(&mut rng, "coal.example");
        let id = rng.u16();
        let addr = node.addr;
        let edns = if i % 2 == 0 { None } else { Some(1232) };
        tasks.push(tokio::spawn(async move {
            let q = build_query_id(id, &spelling, RecordType::A, edns, false);
            let r = exchange_udp(addr, &q).await; // asserts the ID
            (spelling, edns, r)
        }));
    }
    for t in tasks {
        let (spelling, edns, r) = t.await.unwrap();
        assert_eq!(a_addrs(&r), vec![IP1], "{spelling}");
        assert_eq!(
            r.queries[0].name().to_ascii(),
            format!("{spelling}."),
            "each waiting client must get its own question spelling"
        );
        assert_eq!(
            r.edns.is_some(),
            edns.is_some(),
            "{spelling}: OPT in reply iff in query"
        );
    }
    eprintln!(
        "20 concurrent identical queries -> {} upstream queries",
        up.queries("coal.example")
    );
}

#[tokio::test]
async fn spoofed_upstream_reply_with_wrong_id_is_ignored() {
    let up = FakeUpstream::start().await;
    up.set_a("spoof.example", IP1, 30);
    up.set_behavior("spoof.example", Behavior::WrongId);
    let node = Nodedns::with_upstream(
        &up,
        &["--attempt-timeout", "300ms", "--query-deadline", "1s"],
    )
    .await;
    let q = build_query("spoof.example", RecordType::A, None, false);
    let raw = udp_exchange_raw(node.addr, &q.to_vec().unwrap(), Duration::from_secs(2))
        .await
        .expect("an answer within --query-deadline + 1 s");
    let r = Message::from_vec(&raw).unwrap();
    assert!(
        r.answers.is_empty() && r.response_code == ResponseCode::ServFail,
        "an upstream reply with the wrong ID must be ignored (SERVFAIL expected), got {:?} {:?}",
        r.response_code,
        r.answers
    );
}

#[tokio::test]
async fn spoofed_upstream_reply_with_wrong_question_is_ignored() {
    let up = FakeUpstream::start().await;
    up.set_a("spoof2.example", IP1, 30);
    up.set_behavior("spoof2.example", Behavior::WrongName);
    let node = Nodedns::with_upstream(
        &up,
        &["--attempt-timeout", "300ms", "--query-deadline", "1s"],
    )
    .await;
    let q = build_query("spoof2.example", RecordType::A, None, false);
    let raw = udp_exchange_raw(node.addr, &q.to_vec().unwrap(), Duration::from_secs(2))
        .await
        .expect("an answer within --query-deadline + 1 s");
    let r = Message::from_vec(&raw).unwrap();
    assert!(
        r.answers.is_empty() && r.response_code == ResponseCode::ServFail,
        "an upstream reply for another question must be ignored (SERVFAIL expected), got {:?} {:?}",
        r.response_code,
        r.answers
    );
    // And nothing was cached under the client's name.
    up.set_behavior("spoof2.example", Behavior::Normal);
    let r = query_udp(node.addr, "spoof2.example", RecordType::A, None, false).await;
    assert_eq!(a_addrs(&r), vec![IP1]);
}

#[tokio::test]
async fn negative_entry_counts_down_and_expires() {
    let up = FakeUpstream::start().await;
    up.set_soa(60, 60);
    let node = Nodedns::with_upstream(&up, &["--max-negative-ttl", "2s"]).await;
    let t0 = Instant::now();
    let r1 = query_udp(node.addr, "gone.example", RecordType::A, None, false).await;
    assert_eq!(r1.response_code, ResponseCode::NXDomain);
    let ttl1 = soa_ttl(&r1).expect("SOA");
    assert!(ttl1 <= 2, "SOA TTL {ttl1} > --max-negative-ttl 2s");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r2 = query_udp(node.addr, "gone.example", RecordType::A, None, false).await;
    assert_eq!(r2.response_code, ResponseCode::NXDomain);
    let ttl2 = soa_ttl(&r2).expect("SOA");
    assert!(
        ttl2 < ttl1 || ttl1 == 0,
        "negative TTL must count down: {ttl1} then {ttl2}"
    );
    assert_eq!(up.queries("gone.example"), 1);
    // The name appears upstream; after the negative TTL the new answer is served.
    up.set_a("gone.example", IP1, 30);
    tokio::time::sleep(Duration::from_millis(2600).saturating_sub(t0.elapsed())).await;
    let r3 = query_udp(node.addr, "gone.example", RecordType::A, None, false).await;
    assert_eq!(up.queries("gone.example"), 2, "expired negative entry");
    assert_eq!(a_addrs(&r3), vec![IP1]);
}

#[tokio::test]
async fn unreachable_upstream_gives_servfail() {
    // A port with nothing behind it: bound, then released.
    let dead = format!("127.0.0.1:{}", free_port());
    let node = Nodedns::start(&[
        "--upstream".to_string(),
        dead,
        "--attempt-timeout".to_string(),
        "500ms".to_string(),
        "--query-deadline".to_string(),
        "2s".to_string(),
    ])
    .await;
    for tcp in [false, true] {
        let q = build_query("any.example", RecordType::A, None, false);
        let bytes = q.to_vec().unwrap();
        let raw = if tcp {
            crate::harness::tcp_exchange_raw(node.addr, &bytes, Duration::from_secs(3)).await
        } else {
            udp_exchange_raw(node.addr, &bytes, Duration::from_secs(3)).await
        }
        .unwrap_or_else(|| panic!("tcp={tcp}: SERVFAIL expected within the deadline + 1 s"));
        let r = Message::from_vec(&raw).unwrap();
        assert_eq!(r.id, q.id);
        assert_eq!(r.response_code, ResponseCode::ServFail, "tcp={tcp}");
    }
}

#[tokio::test]
async fn tcp_query_written_byte_by_byte() {
    let up = FakeUpstream::start().await;
    up.set_a("slowwrite.example", IP1, 30);
    let node = Nodedns::with_upstream(&up, &[]).await;
    let q = build_query("slowwrite.example", RecordType::A, None, false);
    let b = q.to_vec().unwrap();
    let mut framed = (b.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&b);
    let mut s = TcpStream::connect(node.addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    for byte in framed {
        s.write_all(&[byte]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let f = tokio::time::timeout(Duration::from_secs(8), read_frame(&mut s))
        .await
        .expect("reply in time")
        .expect("reply");
    let r = Message::from_vec(&f).unwrap();
    assert_eq!(r.id, q.id);
    assert_eq!(a_addrs(&r), vec![IP1]);
}

#[tokio::test]
async fn idle_tcp_connection_closed() {
    let up = FakeUpstream::start().await;
    up.set_a("idle.example", IP1, 30);
    let node = Nodedns::with_upstream(&up, &["--tcp-idle-timeout", "1s"]).await;
    let mut s = TcpStream::connect(node.addr).await.unwrap();
    let q = build_query("idle.example", RecordType::A, None, false)
        .to_vec()
        .unwrap();
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    s.write_all(&framed).await.unwrap();
    tokio::time::timeout(Duration::from_secs(8), read_frame(&mut s))
        .await
        .expect("reply in time")
        .expect("reply");
    // Now idle: the server must close within the idle timeout (+ slack).
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(4), s.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "--tcp-idle-timeout 1s: an idle client connection must be closed (got {closed:?})"
    );
}

#[tokio::test]
async fn many_concurrent_clients() {
    let up = FakeUpstream::start().await;
    for i in 0..50u8 {
        up.set_a(&format!("c{i}.example"), Ipv4Addr::new(10, 5, 0, i), 30);
    }
    let node = Nodedns::with_upstream(&up, &[]).await;
    let mut tasks = Vec::new();
    for k in 0..200usize {
        let addr = node.addr;
        let i = (k % 50) as u8;
        tasks.push(tokio::spawn(async move {
            let r = crate::harness::query_udp_retry(addr, &format!("c{i}.example"), RecordType::A)
                .await;
            (i, r)
        }));
    }
    for t in tasks {
        let (i, r) = t.await.unwrap();
        assert_eq!(a_addrs(&r), vec![Ipv4Addr::new(10, 5, 0, i)]);
    }
    for i in 0..50u8 {
        let n = up.queries(&format!("c{i}.example"));
        assert!(
            (1..=4).contains(&n),
            "c{i}.example: {n} upstream queries for 4 client queries"
        );
    }
}

#[tokio::test]
async fn truncated_reply_echoes_question_and_opt() {
    let up = FakeUpstream::start().await;
    up.set_many_a("tcq.example", 40, 30);
    let node = Nodedns::with_upstream(&up, &[]).await;
    for (edns, label) in [
        (None, "no EDNS"),
        (Some(512), "EDNS 512"),
        (Some(100), "EDNS 100"),
    ] {
        let q = build_query("TcQ.example", RecordType::A, edns, false);
        let raw = udp_exchange_raw(node.addr, &q.to_vec().unwrap(), Duration::from_secs(8))
            .await
            .expect("UDP reply");
        assert!(raw.len() <= 512, "{label}: {} bytes over UDP", raw.len());
        let r = Message::from_vec(&raw).unwrap();
        assert_eq!(r.id, q.id);
        assert!(r.truncation, "{label}: TC expected");
        assert_eq!(
            r.queries.first().map(|q| q.name().to_ascii()),
            Some("TcQ.example.".to_string()),
            "{label}: the TC reply must echo the question"
        );
        assert_eq!(
            r.edns.is_some(),
            edns.is_some(),
            "{label}: OPT iff in query"
        );
    }
}

#[tokio::test]
async fn zero_ttl_answer_served_with_zero_ttl() {
    let up = FakeUpstream::start().await;
    up.set_a("zero.example", IP1, 0);
    let node = Nodedns::with_upstream(&up, &[]).await;
    for _ in 0..2 {
        let r = query_udp(node.addr, "zero.example", RecordType::A, None, false).await;
        assert_eq!(a_addrs(&r), vec![IP1]);
        assert_eq!(
            r.answers[0].ttl, 0,
            "served TTL must not exceed the upstream TTL 0"
        );
    }
    eprintln!(
        "TTL 0: {} upstream queries for 2 client queries",
        up.queries("zero.example")
    );
}

#[tokio::test]
async fn label_with_dot_is_not_two_labels() {
    let up = FakeUpstream::start().await;
    // `a\.b.example` is one label "a.b" under example; `a.b.example` is two labels.
    up.set_a("a\\.b.example", Ipv4Addr::new(10, 6, 0, 1), 30);
    up.set_a("a.b.example", Ipv4Addr::new(10, 6, 0, 2), 30);
    let node = Nodedns::with_upstream(&up, &[]).await;
    for _ in 0..2 {
        let r = query_udp(node.addr, "a\\.b.example", RecordType::A, None, false).await;
        assert_eq!(
            a_addrs(&r),
            vec![Ipv4Addr::new(10, 6, 0, 1)],
            "one label a.b"
        );
        let r = query_udp(node.addr, "a.b.example", RecordType::A, None, false).await;
        assert_eq!(
            a_addrs(&r),
            vec![Ipv4Addr::new(10, 6, 0, 2)],
            "two labels a, b"
        );
    }
    assert_eq!(up.queries("a\\.b.example"), 1);
    assert_eq!(up.queries("a.b.example"), 1);
}

#[tokio::test]
async fn case_folding_is_ascii_only() {
    let up = FakeUpstream::start().await;
    let node = Nodedns::with_upstream(&up, &[]).await;
    // Labels with bytes 0xC1 and 0xE1 (Latin-1 'Á' / 'á'): different names in DNS, as case
    // folding is ASCII only. The fake names them with hickory's octal escapes.
    let raw_query = |id: u16, first: u8| {
        let mut m = Message::new(id, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        let label: Vec<u8> = vec![first, b'x'];
        let name = Name::from_labels(vec![label, b"example".to_vec()]).unwrap();
        m.add_query(Query::query(name, RecordType::A));
        m
    };
    let upper = raw_query(0x1111, 0xc1);
    let lower = raw_query(0x2222, 0xe1);
    up.set_a("\\301x.example", Ipv4Addr::new(10, 7, 0, 1), 30);
    up.set_a("\\341x.example", Ipv4Addr::new(10, 7, 0, 2), 30);
    for _ in 0..2 {
        let r = exchange_udp(node.addr, &upper).await;
        assert_eq!(a_addrs(&r), vec![Ipv4Addr::new(10, 7, 0, 1)], "byte 0xC1");
        let r = exchange_udp(node.addr, &lower).await;
        assert_eq!(a_addrs(&r), vec![Ipv4Addr::new(10, 7, 0, 2)], "byte 0xE1");
    }
}

#[tokio::test]
async fn longest_names_forwarded_and_cached() {
    let up = FakeUpstream::start().await;
    // 3 labels of 63 + one of 61 = 253 characters: the longest legal name.
    let l63 = "x".repeat(63);
    let name = format!("{l63}.{l63}.{l63}.{}", "y".repeat(61));
    assert_eq!(name.len(), 253);
    up.set_a(&name, IP1, 30);
    let node = Nodedns::with_upstream(&up, &[]).await;
    for _ in 0..2 {
        let r = query_udp(node.addr, &name, RecordType::A, Some(1232), false).await;
        assert_eq!(a_addrs(&r), vec![IP1]);
    }
    assert_eq!(up.queries(&name), 1);
}
