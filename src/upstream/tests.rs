use super::*;
use std::str::FromStr;

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
