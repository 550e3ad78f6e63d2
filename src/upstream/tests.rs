use super::*;
use std::str::FromStr;

fn ups(zones: &[(&str, &str)]) -> Upstreams {
    let specs: Vec<ZoneSpec> = zones
        .iter()
        .map(|(z, s)| ZoneSpec {
            zone: z.to_string(),
            servers: vec![SocketAddr::from_str(s).unwrap()],
        })
        .collect();
    Upstreams::new(&specs, Options::default()).unwrap()
}

fn wire(name: &str) -> Vec<u8> {
    zone_to_wire(name).unwrap()
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
    assert_eq!(zone_to_wire(".").unwrap(), vec![0]);
    assert_eq!(
        zone_to_wire("Cluster.Local.").unwrap(),
        b"\x07cluster\x05local\x00".to_vec()
    );
    assert!(zone_to_wire("a..b").is_err());
    assert!(zone_to_wire(&"x".repeat(64)).is_err());
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
