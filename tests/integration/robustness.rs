//! Malformed and unusual input: garbage floods, short datagrams, odd headers and opcodes.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};

use crate::fake_upstream::FakeUpstream;
use crate::harness::{
    Nodedns, Rng, a_addrs, build_query, build_query_id, query_tcp, query_udp_retry,
    tcp_exchange_raw, udp_exchange_raw,
};

const IP1: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

/// How long to wait before concluding that no reply is coming.
const SILENCE: Duration = Duration::from_millis(500);

fn rcode(reply: &[u8]) -> u8 {
    assert!(
        reply.len() >= 12,
        "reply shorter than a header: {reply:02x?}"
    );
    reply[3] & 0x0f
}

/// The 4-bit header RCODE of a response code.
fn rc(code: ResponseCode) -> u8 {
    (u16::from(code) & 0x0f) as u8
}

fn reply_id(reply: &[u8]) -> u16 {
    u16::from_be_bytes([reply[0], reply[1]])
}

/// Hand-made nasty packets: compression loops, overlong labels, bad counts.
fn nasty_packets() -> Vec<Vec<u8>> {
    let hdr = |qd: u16, an: u16, ar: u16| {
        let mut h = vec![0x12, 0x34, 0x01, 0x00];
        h.extend_from_slice(&qd.to_be_bytes());
        h.extend_from_slice(&an.to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&ar.to_be_bytes());
        h
    };
    let mut v = Vec::new();
    // Question name is a pointer to itself.
    let mut p = hdr(1, 0, 0);
    p.extend_from_slice(&[0xc0, 0x0c, 0x00, 0x01, 0x00, 0x01]);
    v.push(p);
    // Two pointers pointing at each other.
    let mut p = hdr(1, 0, 0);
    p.extend_from_slice(&[0xc0, 0x0e, 0xc0, 0x0c, 0x00, 0x01, 0x00, 0x01]);
    v.push(p);
    // Forward pointer beyond the end.
    let mut p = hdr(1, 0, 0);
    p.extend_from_slice(&[0xc0, 0xff, 0x00, 0x01, 0x00, 0x01]);
    v.push(p);
    // Label length longer than the packet.
    let mut p = hdr(1, 0, 0);
    p.extend_from_slice(&[0x3f, b'a', b'b', 0x00]);
    v.push(p);
    // Reserved label type 0x40 / 0x80.
    let mut p = hdr(1, 0, 0);
    p.extend_from_slice(&[0x41, b'a', 0x00, 0x00, 0x01, 0x00, 0x01]);
    v.push(p);
    let mut p = hdr(1, 0, 0);
    p.extend_from_slice(&[0x81, b'a', 0x00, 0x00, 0x01, 0x00, 0x01]);
    v.push(p);
    // Name longer than 255 bytes (5 labels of 63).
    let mut p = hdr(1, 0, 0);
    for _ in 0..5 {
        p.push(63);
        p.extend(std::iter::repeat_n(b'x', 63));
    }
    p.extend_from_slice(&[0x00, 0x00, 0x01, 0x00, 0x01]);
    v.push(p);
    // QDCOUNT says 1 but the question is missing; QDCOUNT 0.
    v.push(hdr(1, 0, 0));
    v.push(hdr(0, 0, 0));
    // Huge counts.
    let mut p = hdr(1, 0xffff, 0xffff);
    p.extend_from_slice(&[0x01, b'a', 0x00, 0x00, 0x01, 0x00, 0x01]);
    v.push(p);
    // A question and an ARCOUNT=1 with a truncated OPT.
    let mut p = hdr(1, 0, 1);
    p.extend_from_slice(&[
        0x01, b'a', 0x00, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x29, 0x04,
    ]);
    v.push(p);
    // Two OPT records.
    let mut p = hdr(1, 0, 2);
    p.extend_from_slice(&[0x01, b'a', 0x00, 0x00, 0x01, 0x00, 0x01]);
    for _ in 0..2 {
        p.extend_from_slice(&[0x00, 0x00, 0x29, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
    }
    v.push(p);
    // OPT with an option whose length overruns the RDATA.
    let mut p = hdr(1, 0, 1);
    p.extend_from_slice(&[0x01, b'a', 0x00, 0x00, 0x01, 0x00, 0x01]);
    p.extend_from_slice(&[
        0x00, 0x00, 0x29, 0x04, 0xd0, 0, 0, 0, 0, 0, 4, 0, 10, 0, 200,
    ]);
    v.push(p);
    v
}

/// Randomly mutates a valid query.
fn mutate(rng: &mut Rng, valid: &[u8]) -> Vec<u8> {
    let mut p = valid.to_vec();
    match rng.below(5) {
        0 => {
            // Flip a few bytes.
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(p.len());
                p[i] = rng.next_u64() as u8;
            }
        }
        1 => p.truncate(rng.below(p.len())),
        2 => {
            let n = rng.below(64);
            let extra = rng.bytes(n);
            p.extend_from_slice(&extra);
        }
        3 => {
            // Random header counts.
            let i = 4 + 2 * rng.below(4);
            p[i] = rng.next_u64() as u8;
            p[i + 1] = rng.next_u64() as u8;
        }
        _ => {
            // Random flags / opcode.
            p[2] = rng.next_u64() as u8;
            p[3] = rng.next_u64() as u8;
        }
    }
    p
}

async fn assert_serving(node: &mut Nodedns, name: &str) {
    assert!(node.is_running(), "nodedns died");
    let r = query_udp_retry(node.addr, name, RecordType::A).await;
    assert_eq!(a_addrs(&r), vec![IP1], "UDP query after the abuse");
    let r = query_tcp(node.addr, name, RecordType::A, None, false).await;
    assert_eq!(a_addrs(&r), vec![IP1], "TCP query after the abuse");
    assert!(node.is_running(), "nodedns died");
}

#[tokio::test]
async fn udp_garbage_flood_then_normal_query() {
    let up = FakeUpstream::start().await;
    up.set_a("ok.example", IP1, 30);
    let mut node = Nodedns::with_upstream(&up, &["--attempt-timeout", "300ms"]).await;
    let mut rng = Rng::from_time("udp_garbage_flood");
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let target: SocketAddr = node.addr;
    let valid: Vec<Vec<u8>> = [
        build_query("ok.example", RecordType::A, None, false),
        build_query("ok.example", RecordType::AAAA, Some(1232), true),
        build_query("garbage.example", RecordType::TXT, Some(4096), false),
    ]
    .iter()
    .map(|m| m.to_vec().unwrap())
    .collect();

    // Drain replies concurrently so that our socket buffer never matters.
    let rx = std::sync::Arc::new(sock);
    let drain_sock = rx.clone();
    let drain = tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        let mut n = 0usize;
        while let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_secs(2), drain_sock.recv_from(&mut buf)).await
        {
            n += 1;
            if n > 100_000 {
                break;
            }
        }
        n
    });

    let mut packets: Vec<Vec<u8>> = nasty_packets();
    for _ in 0..3000 {
        let p = if rng.below(3) == 0 {
            let v = &valid[rng.below(valid.len())];
            mutate(&mut rng, v)
        } else {
            let len = rng.below(601);
            rng.bytes(len)
        };
        packets.push(p);
    }
    for (i, p) in packets.iter().enumerate() {
        let _ = rx.send_to(p, target).await;
        if i % 200 == 0 {
            // Yield a little so that the flood is not just dropped by the kernel.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let replies = drain.await.unwrap();
    eprintln!(
        "garbage flood: {} packets sent, {replies} replies",
        packets.len()
    );
    assert_serving(&mut node, "ok.example").await;
}

#[tokio::test]
async fn tcp_garbage_streams_then_normal_query() {
    let up = FakeUpstream::start().await;
    up.set_a("ok.example", IP1, 30);
    let mut node = Nodedns::with_upstream(&up, &[]).await;
    let mut rng = Rng::from_time("tcp_garbage_streams");
    let addr = node.addr;

    // Random bytes, then close.
    for _ in 0..5 {
        if let Ok(mut s) = TcpStream::connect(addr).await {
            let len = 1 + rng.below(600);
            let _ = s.write_all(&rng.bytes(len)).await;
        }
    }
    // A length of 65535 followed by a few bytes, then close.
    if let Ok(mut s) = TcpStream::connect(addr).await {
        let _ = s.write_all(&[0xff, 0xff, 1, 2, 3, 4]).await;
    }
    // A zero-length frame, then a garbage frame, then a valid query.
    if let Ok(mut s) = TcpStream::connect(addr).await {
        let _ = s.write_all(&[0, 0]).await;
        let _ = s.write_all(&[0, 5, 1, 2, 3, 4, 5]).await;
        let q = build_query("ok.example", RecordType::A, None, false)
            .to_vec()
            .unwrap();
        let mut f = (q.len() as u16).to_be_bytes().to_vec();
        f.extend_from_slice(&q);
        let _ = s.write_all(&f).await;
    }
    // Each nasty packet, framed.
    for p in nasty_packets() {
        let _ = tcp_exchange_raw(addr, &p, Duration::from_millis(300)).await;
    }
    // A connection that sends one byte and stays open while others are served.
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(&[0x00]).await.unwrap();
    let _idle_silent = TcpStream::connect(addr).await.unwrap();

    assert_serving(&mut node, "ok.example").await;
    drop(idle);
}

#[tokio::test]
async fn short_datagrams_dropped() {
    let up = FakeUpstream::start().await;
    up.set_a("ok.example", IP1, 30);
    let mut node = Nodedns::with_upstream(&up, &[]).await;
    let q = build_query_id(0x4242, "ok.example", RecordType::A, None, false)
        .to_vec()
        .unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for len in 0..12 {
        sock.send_to(&q[..len], node.addr).await.unwrap();
    }
    let mut buf = vec![0u8; 4096];
    let got = tokio::time::timeout(SILENCE, sock.recv_from(&mut buf)).await;
    assert!(
        got.is_err(),
        "datagrams shorter than a DNS header must be dropped, got a reply: {:02x?}",
        got.ok()
            .and_then(|r| r.ok())
            .map(|(n, _)| buf[..n].to_vec())
    );
    assert_serving(&mut node, "ok.example").await;
}

#[tokio::test]
async fn qr1_packets_not_answered() {
    let up = FakeUpstream::start().await;
    up.set_a("ok.example", IP1, 30);
    let mut node = Nodedns::with_upstream(&up, &[]).await;
    let mut m = Message::new(0x5151, MessageType::Response, OpCode::Query);
    m.add_query(Query::query(
        Name::from_ascii("ok.example.").unwrap(),
        RecordType::A,
    ));
    let bytes = m.to_vec().unwrap();
    assert_eq!(bytes[2] & 0x80, 0x80);
    let got = udp_exchange_raw(node.addr, &bytes, SILENCE).await;
    assert!(
        got.is_none(),
        "a QR=1 packet must not be answered: {got:02x?}"
    );
    let got = tcp_exchange_raw(node.addr, &bytes, SILENCE).await;
    assert!(
        got.is_none(),
        "a QR=1 message over TCP must not be answered: {got:02x?}"
    );
    assert_eq!(
        up.queries("ok.example"),
        0,
        "a QR=1 packet must not be forwarded"
    );
    assert_serving(&mut node, "ok.example").await;
}

#[tokio::test]
async fn qdcount_two_gives_formerr() {
    let up = FakeUpstream::start().await;
    up.set_a("a.example", IP1, 30);
    up.set_a("b.example", IP1, 30);
    let node = Nodedns::with_upstream(&up, &[]).await;
    let mut m = Message::new(0x7a7a, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(
        Name::from_ascii("a.example.").unwrap(),
        RecordType::A,
    ));
    m.add_query(Query::query(
        Name::from_ascii("b.example.").unwrap(),
        RecordType::A,
    ));
    let bytes = m.to_vec().unwrap();
    assert_eq!(bytes[5], 2, "QDCOUNT=2");
    let reply = udp_exchange_raw(node.addr, &bytes, Duration::from_secs(3))
        .await
        .expect("QDCOUNT=2 must be answered (FORMERR) over UDP");
    assert_eq!(reply_id(&reply), 0x7a7a);
    assert_eq!(reply[2] & 0x80, 0x80, "QR=1");
    assert_eq!(rcode(&reply), rc(ResponseCode::FormErr), "FORMERR expected");
    let reply = tcp_exchange_raw(node.addr, &bytes, Duration::from_secs(3))
        .await
        .expect("QDCOUNT=2 must be answered (FORMERR) over TCP");
    assert_eq!(rcode(&reply), rc(ResponseCode::FormErr));
    assert_eq!(
        up.queries("a.example") + up.queries("b.example"),
        0,
        "must not be forwarded"
    );
}

#[tokio::test]
async fn opcode_status_gives_notimp() {
    let up = FakeUpstream::start().await;
    up.set_a("ok.example", IP1, 30);
    let node = Nodedns::with_upstream(&up, &[]).await;
    for op in [OpCode::Status] {
        let mut m = Message::new(0x2b2b, MessageType::Query, op);
        m.add_query(Query::query(
            Name::from_ascii("ok.example.").unwrap(),
            RecordType::A,
        ));
        let bytes = m.to_vec().unwrap();
        let reply = udp_exchange_raw(node.addr, &bytes, Duration::from_secs(3))
            .await
            .unwrap_or_else(|| panic!("opcode {op:?} must be answered with NOTIMP"));
        assert_eq!(reply_id(&reply), 0x2b2b);
        assert_eq!(rcode(&reply), rc(ResponseCode::NotImp), "opcode {op:?}");
        assert_eq!(
            (reply[2] >> 3) & 0x0f,
            u8::from(op),
            "the reply must echo the opcode"
        );
    }
    assert_eq!(up.queries("ok.example"), 0, "must not be forwarded");
}

#[tokio::test]
async fn axfr_refused_over_udp_and_tcp() {
    let up = FakeUpstream::start().await;
    up.set_a("cluster.local", IP1, 30);
    let node = Nodedns::with_upstream(&up, &[]).await;
    for rtype in [RecordType::AXFR] {
        let q = build_query_id(0x3c3c, "cluster.local", rtype, None, false);
        let bytes = q.to_vec().unwrap();
        let reply = udp_exchange_raw(node.addr, &bytes, Duration::from_secs(3))
            .await
            .unwrap_or_else(|| panic!("{rtype} over UDP must be answered"));
        assert_eq!(reply_id(&reply), 0x3c3c);
        assert_eq!(rcode(&reply), rc(ResponseCode::Refused), "{rtype} over UDP");
        let reply = tcp_exchange_raw(node.addr, &bytes, Duration::from_secs(3))
            .await
            .unwrap_or_else(|| panic!("{rtype} over TCP must be answered"));
        assert_eq!(rcode(&reply), rc(ResponseCode::Refused), "{rtype} over TCP");
    }
    assert_eq!(
        up.queries("cluster.local"),
        0,
        "zone transfers must not be forwarded"
    );
}
