use super::*;
use std::str::FromStr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn zone(name: &str, server: &str) -> Zone {
    Zone {
        name: crate::config::model::normalize_zone(name).unwrap(),
        servers: vec![SocketAddr::from_str(server).unwrap()],
        transport: model::Transport::PreferUdp,
        policy: Policy::RoundRobin,
        forward: Default::default(),
        cache: CachePolicy::FLAGS,
        origin: Default::default(),
    }
}

fn ups(zones: &[(&str, &str)]) -> Upstreams {
    let specs: Vec<Zone> = zones.iter().map(|(z, s)| zone(z, s)).collect();
    Upstreams::new(&specs, Options::default()).unwrap()
}

fn wire(name: &str) -> Vec<u8> {
    wire::name_from_str(name).unwrap()
}

#[test]
fn a_zone_given_twice_keeps_only_the_later_servers() {
    // `--upstream 8.8.8.8 --forward .=1.1.1.1`: 8.8.8.8 routes nothing, so it must not be dialled,
    // probed (readiness) or counted.
    let u = ups(&[(".", "127.0.0.1:1"), (".", "127.0.0.1:2")]);
    assert_eq!(u.servers(), &["127.0.0.1:2".parse::<SocketAddr>().unwrap()]);
}

#[test]
fn tcp_ids_are_bounded() {
    let mut pending: HashMap<u16, ()> = HashMap::new();
    assert_eq!(free_id(&pending, 7), Some(7));
    pending.insert(7, ());
    let other = free_id(&pending, 7).unwrap();
    assert_ne!(other, 7);
    for id in 0..MAX_PENDING_PER_CONN as u16 {
        pending.insert(id, ());
    }
    assert_eq!(
        free_id(&pending, 7),
        None,
        "full: fail the attempt, never spin"
    );
}

#[test]
fn an_over_long_udp_reply_becomes_truncated() {
    let q = b"\x01a\x00\x00\x01\x00\x01";
    let mut reply = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
    reply.extend_from_slice(q);
    reply.resize(UDP_REPLY_MAX + 1, 0);
    let t = truncated_reply(&reply, q.len());
    assert!(wire::is_truncated(&t));
    assert!(matches(&t, 0x1234, q));
    assert_eq!(&t[6..12], &[0; 6]);
}

#[test]
fn longest_suffix_on_label_boundary_wins() {
    let u = ups(&[
        (".", "127.0.0.1:1"),
        ("cluster.local", "127.0.0.1:2"),
        ("svc.cluster.local.", "127.0.0.1:3"),
        ("in-addr.arpa", "127.0.0.1:4"),
    ]);
    let z = |n: &str| u.zone_for(&wire(n)).map(|z| z.to_vec());
    assert_eq!(z("a.b.svc.cluster.local"), Some(wire("svc.cluster.local")));
    assert_eq!(z("svc.cluster.local"), Some(wire("svc.cluster.local")));
    assert_eq!(z("pod.ns.pod.cluster.local"), Some(wire("cluster.local")));
    // "mycluster.local" is not inside "cluster.local".
    assert_eq!(z("x.mycluster.local"), Some(wire(".")));
    assert_eq!(z("10.0.96.10.in-addr.arpa"), Some(wire("in-addr.arpa")));
    assert_eq!(z("example.com"), Some(wire(".")));
    assert_eq!(u.servers().len(), 4);
}

#[test]
fn without_a_root_zone_other_names_have_no_route() {
    let u = ups(&[("cluster.local", "127.0.0.1:2")]);
    assert!(u.zone_for(&wire("example.com")).is_none());
    assert!(u.zone_for(&wire("a.cluster.local")).is_some());
}

#[test]
fn zone_names_validate() {
    assert_eq!(wire::name_from_str(".").unwrap(), vec![0]);
    assert_eq!(
        wire::name_from_str("Cluster.Local.").unwrap(),
        b"\x07cluster\x05local\x00".to_vec()
    );
    assert!(wire::name_from_str("a..b").is_err());
    assert!(wire::name_from_str(&"x".repeat(64)).is_err());
}

#[test]
fn reply_matching_is_strict_on_id_and_question() {
    let q = b"\x01a\x00\x00\x01\x00\x01";
    let mut reply = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 0, 0, 0, 0, 0];
    reply.extend_from_slice(b"\x01A\x00\x00\x01\x00\x01");
    assert!(matches(&reply, 0x1234, q));
    assert!(!matches(&reply, 0x1235, q));
    let mut not_resp = reply.clone();
    not_resp[2] = 0x01;
    assert!(!matches(&not_resp, 0x1234, q));
    assert!(!matches(&reply[..14], 0x1234, q));
}

// ---- the TCP pool, against a real listener on loopback ----

/// A TCP DNS server on loopback that answers each framed query with the query itself, QR set.
/// The first `drop_first` connections are closed after reading one query, unanswered (a
/// connection that dies under its queries). Returns its address and a count of accepted
/// connections.
async fn echo_server(drop_first: usize) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let n = count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                loop {
                    let mut len = [0u8; 2];
                    if s.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
                    if s.read_exact(&mut msg).await.is_err() {
                        return;
                    }
                    if n < drop_first {
                        return;
                    }
                    msg[2] |= 0x80;
                    let mut out = len.to_vec();
                    out.extend_from_slice(&msg);
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

fn query(id: u16) -> (Vec<u8>, Vec<u8>) {
    let question = b"\x01a\x00\x00\x01\x00\x01".to_vec();
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    q.extend_from_slice(&question);
    (q, question)
}

#[tokio::test]
async fn the_pool_uses_its_connections_in_turn() {
    let (addr, accepted) = echo_server(0).await;
    let pool = TcpPool::new(addr, None, 3, Duration::from_secs(60));
    for id in 0..9 {
        let (q, question) = query(id);
        let r = pool.exchange(&q, &question).await.expect("a reply");
        assert_eq!(&r[..2], &id.to_be_bytes(), "the caller's own ID back");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        3,
        "three connections, each reused"
    );
}

#[tokio::test]
async fn a_lost_connection_is_replaced_and_its_query_retried() {
    let (addr, accepted) = echo_server(1).await;
    let pool = TcpPool::new(addr, None, 1, Duration::from_secs(60));
    let (q, question) = query(7);
    let r = pool.exchange(&q, &question).await;
    assert!(r.is_ok(), "retried on a fresh connection: {r:?}");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_spent_connection_is_not_reused() {
    let (addr, accepted) = echo_server(0).await;
    // A zero `expire`: every connection is spent as soon as it is dialled, so none is handed
    // out again (whether the query it was dialled for gets through does not matter here).
    let pool = TcpPool::new(addr, None, 1, Duration::ZERO);
    for id in 0..3 {
        let (q, question) = query(id);
        let _ = pool.exchange(&q, &question).await;
    }
    assert!(
        accepted.load(Ordering::SeqCst) >= 3,
        "each query on a fresh connection"
    );
}

/// A datagram on an attempt's socket: the reply, someone else's (ignored, RFC 5452), or the
/// queried server's garbage under the query's ID (the attempt fails).
#[test]
fn datagrams_are_classified_by_id_then_form() {
    // Question: example. A IN
    let question: &[u8] = &[7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 0, 0, 1, 0, 1];
    let reply = |id: u16, flags: u8, q: &[u8]| {
        let mut m = id.to_be_bytes().to_vec();
        m.extend_from_slice(&[flags, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        m.extend_from_slice(q);
        m
    };
    let other_q: &[u8] = &[5, b'e', b'v', b'i', b'l', b'x', 0, 0, 1, 0, 1];
    assert_eq!(
        classify(&reply(7, 0x81, question), 7, question),
        Datagram::Answer
    );
    assert_eq!(
        classify(&reply(8, 0x81, question), 7, question),
        Datagram::Foreign
    );
    assert_eq!(
        classify(&reply(7, 0x81, other_q), 7, question),
        Datagram::Foreign
    );
    assert_eq!(
        classify(&reply(7, 0x01, question), 7, question),
        Datagram::Malformed
    );
    assert_eq!(
        classify(&[0, 7, 0xff, 0xff, 0xff], 7, question),
        Datagram::Malformed
    );
    assert_eq!(classify(&[0], 7, question), Datagram::Foreign);
    // The ID and nothing else: garbage (this indexed past the end once).
    assert_eq!(classify(&[0, 7], 7, question), Datagram::Malformed);
    let mut bad_label = reply(7, 0x81, question);
    bad_label[12] = 0xc0;
    assert_eq!(classify(&bad_label, 7, question), Datagram::Malformed);
}
