//! Lifecycle on a node made of namespaces (issue 11): a rolling update where a second nodedns
//! starts beside the first and the first gets SIGTERM, with a client namespace sending a steady
//! stream through the node's link; and fail-open interception, where a kube-proxy-style DNAT
//! takes the ClusterIP to a fake cluster DNS once nodedns is dead. Both firewall backends.
//!
//! Layout: a "node" namespace runs nodedns on 169.254.20.10 and the ClusterIP 10.96.0.10 (a
//! bridge link); a "client" namespace (a pod) reaches the node over a veth pair (10.77.0.2 →
//! 10.77.0.1); for fail-open a "cluster" namespace holds the fake cluster DNS (10.78.0.2) behind
//! another veth pair. Every packet stays inside these namespaces.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;

use crate::harness::build_query_id;
use crate::netns_e2e::{
    LINK, LOCAL, Netns, NsNodedns, NsUpstream, a_strings, have_tool, poll, require_netns,
};

const CLUSTER_IP: &str = "10.96.0.10";
const HOT: usize = 50;

fn cluster_dns() -> SocketAddr {
    SocketAddr::new(CLUSTER_IP.parse().expect("literal"), 53)
}

fn local() -> SocketAddr {
    SocketAddr::new(LOCAL.parse().expect("literal"), 53)
}

fn hot_name(k: usize) -> String {
    format!("h{k}.example.")
}

fn hot_ip(k: usize) -> String {
    format!("10.9.0.{}", k + 1)
}

/// Joins `other` to `node` by a veth pair: `node_ip`/24 on the node side (`dev`), `other_ip`/24 on
/// `other`'s eth0, with a default route back through the node.
fn wire(node: &Netns, other: &Netns, dev: &str, node_ip: &str, other_ip: &str) {
    node.ok(&[
        "ip",
        "link",
        "add",
        dev,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &other.name,
    ]);
    node.ok(&["ip", "addr", "add", &format!("{node_ip}/24"), "dev", dev]);
    node.ok(&["ip", "link", "set", dev, "up"]);
    other.ok(&[
        "ip",
        "addr",
        "add",
        &format!("{other_ip}/24"),
        "dev",
        "eth0",
    ]);
    other.ok(&["ip", "link", "set", "eth0", "up"]);
    other.ok(&["ip", "route", "add", "default", "via", node_ip]);
}

/// nodedns's flags on the node: both addresses, a bridge link, `backend`, `upstream`.
fn node_args<'a>(backend: &'a str, upstream: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "--listen",
        "169.254.20.10:53",
        "--listen",
        "10.96.0.10:53",
        "--upstream",
        upstream,
        "--link-kind",
        "bridge",
        "--firewall",
        backend,
    ];
    v.extend_from_slice(extra);
    v
}

/// nodedns's rules in the node namespace, for either backend.
fn rule_count(ns: &Netns, backend: &str) -> usize {
    match backend {
        "iptables" => ns.nodedns_rule_count(),
        _ => ns.nft_rule_count(),
    }
}

/// What the client's stream saw.
#[derive(Debug, Default)]
struct Report {
    sent: usize,
    answered: usize,
    tcp: usize,
    lost: Vec<String>,
    wrong: Vec<String>,
}

/// What a query asked and what its answer must be.
struct Want {
    name: String,
    /// The A record of a hot name; `None`: a miss, NXDOMAIN.
    ip: Option<String>,
}

fn check(m: &Message, want: &Want) -> Result<(), String> {
    let qname = m.queries.first().map(|q| q.name().to_ascii());
    if qname.as_deref() != Some(want.name.as_str()) {
        return Err(format!("question {qname:?} for {}", want.name));
    }
    match &want.ip {
        Some(ip)
            if m.metadata.response_code == ResponseCode::NoError
                && a_strings(m) == [ip.clone()] =>
        {
            Ok(())
        }
        None if m.metadata.response_code == ResponseCode::NXDomain => Ok(()),
        _ => Err(format!(
            "{}: {:?} {:?}",
            want.name,
            m.metadata.response_code,
            a_strings(m)
        )),
    }
}

/// A framed TCP query on a connection of its own.
fn tcp_query(to: SocketAddr, q: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(q);
    s.write_all(&framed)?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len)?;
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

/// The client's steady stream, run inside the client namespace: ~1,000 queries a second in
/// batches of 10 every 10 ms, from 16 sockets (so they spread over every reuseport socket), to
/// both addresses; 4 in 5 hit the hot names, 1 in 5 is a miss; every 25th goes over TCP. It runs
/// until `done` is set and 3,000 more are sent; bounded by `max` queries and 60 s. Then it
/// collects replies for up to 3 s: what has none by then is lost.
fn stream(done: &AtomicBool, sent_ctr: &AtomicUsize, max: usize) -> Report {
    let targets = [local(), cluster_dns()];
    let socks: Vec<UdpSocket> = (0..16)
        .map(|_| {
            let s = UdpSocket::bind("0.0.0.0:0").expect("bind client socket");
            s.set_nonblocking(true).expect("nonblocking");
            s
        })
        .collect();
    let mut pending: HashMap<(usize, u16), Want> = HashMap::new();
    let mut r = Report::default();
    let mut buf = vec![0u8; 4096];
    let collect = |pending: &mut HashMap<(usize, u16), Want>, r: &mut Report, buf: &mut [u8]| {
        for (si, s) in socks.iter().enumerate() {
            // Bounded: a socket holds at most what was sent to it.
            while let Ok(n) = s.recv(buf) {
                let Ok(m) = Message::from_vec(&buf[..n]) else {
                    r.wrong.push("unparsable reply".into());
                    continue;
                };
                let Some(want) = pending.remove(&(si, m.metadata.id)) else {
                    r.wrong
                        .push(format!("unexpected reply id {}", m.metadata.id));
                    continue;
                };
                match check(&m, &want) {
                    Ok(()) => r.answered += 1,
                    Err(e) => r.wrong.push(e),
                }
            }
        }
    };
    let start = Instant::now();
    let mut extra_after_done = None;
    let mut i = 0usize;
    while i < max && start.elapsed() < Duration::from_secs(60) {
        if done.load(Ordering::Relaxed) && extra_after_done.is_none() {
            extra_after_done = Some(i + 3000);
        }
        if extra_after_done.is_some_and(|end| i >= end) {
            break;
        }
        for _ in 0..10 {
            let want = if i % 5 == 4 {
                Want {
                    name: format!("m{i}.miss.example."),
                    ip: None,
                }
            } else {
                let k = i % HOT;
                Want {
                    name: hot_name(k),
                    ip: Some(hot_ip(k)),
                }
            };
            let to = targets[i % targets.len()];
            let (si, id) = (i % socks.len(), (i / socks.len()) as u16);
            let q = build_query_id(id, &want.name, RecordType::A, None, false)
                .to_vec()
                .expect("encode");
            if i % 25 == 24 {
                r.tcp += 1;
                match tcp_query(to, &q).map(|b| Message::from_vec(&b)) {
                    Ok(Ok(m)) if m.metadata.id == id => match check(&m, &want) {
                        Ok(()) => r.answered += 1,
                        Err(e) => r.wrong.push(format!("tcp {e}")),
                    },
                    Ok(_) => r.wrong.push(format!("tcp {}: bad reply", want.name)),
                    Err(e) => r.lost.push(format!("tcp {} to {to}: {e}", want.name)),
                }
            } else {
                match socks[si].send_to(&q, to) {
                    Ok(_) => {
                        pending.insert((si, id), want);
                    }
                    Err(e) => r.lost.push(format!("send {} to {to}: {e}", want.name)),
                }
            }
            i += 1;
            r.sent += 1;
        }
        sent_ctr.store(i, Ordering::Relaxed);
        collect(&mut pending, &mut r, &mut buf);
        // Pacing of the load generator (10 queries per 10 ms), not a wait for an event.
        std::thread::sleep(Duration::from_millis(10));
    }
    let end = Instant::now() + Duration::from_secs(3);
    while !pending.is_empty() && Instant::now() < end {
        collect(&mut pending, &mut r, &mut buf);
        std::thread::sleep(Duration::from_millis(5));
    }
    r.lost
        .extend(pending.values().map(|w| format!("udp {}", w.name)));
    r
}

/// A rolling update with `maxSurge`: A serves the link-local IP and a ClusterIP with rules; a
/// client streams queries; B starts with the same flags (a handover: it adopts A's link and
/// rules); A gets SIGTERM, drains and exits, leaving link, addresses and rules to B. Not one query
/// is lost or wrong. Then B alone gets SIGTERM, and it tears everything down.
///
/// Before peer-aware teardown, A's exit deleted the link and every `nodedns:` rule under B, and
/// the stream's queries went unanswered until B's reconcile put them back.
fn rolling_update(test: &str, backend: &str) {
    let node = Netns::new("rolln");
    let client = Netns::new("rollc");
    wire(&node, &client, "vc0", "10.77.0.1", "10.77.0.2");
    // Connections still in A's accept queue move to B's listener instead of being reset (see the
    // README); per namespace.
    let _ = node.exec(&["sysctl", "-qw", "net.ipv4.tcp_migrate_req=1"]);
    let up = NsUpstream::start(&node, "127.0.0.1:0");
    for k in 0..HOT {
        up.set_a(&hot_name(k), hot_ip(k).parse().expect("literal"), 300);
    }
    let upstream = up.addr_str();
    let args = node_args(backend, &upstream, &["--shutdown-grace", "1s"]);
    let mut a = NsNodedns::start(&node, &args, &[]);
    // Answering comes before the rules (they follow the bind): wait for them.
    assert!(
        poll(Duration::from_secs(10), || rule_count(&node, backend) == 24),
        "{test}: A's rules"
    );

    let done = AtomicBool::new(false);
    let sent = AtomicUsize::new(0);
    let (mut b, report) = std::thread::scope(|s| {
        let load = s.spawn(|| client.run(|| stream(&done, &sent, 40_000)));
        assert!(
            poll(Duration::from_secs(20), || sent.load(Ordering::Relaxed)
                >= 1000),
            "{test}: the stream did not start"
        );
        let b = NsNodedns::spawn(&node, &args, &[]);
        // Readiness of B itself: its health query could be answered by A.
        assert!(
            b.wait_log("an upstream answered; ready", Duration::from_secs(20)),
            "{test}: B not ready:\n{}",
            b.stderr_text()
        );
        assert!(
            b.stderr_text().contains("handover: another nodedns serves"),
            "{test}: B must log the handover:\n{}",
            b.stderr_text()
        );
        a.stop();
        done.store(true, Ordering::Relaxed);
        let report = match load.join() {
            Ok(r) => r,
            Err(p) => std::panic::resume_unwind(p),
        };
        (b, report)
    });
    let a_log = a.stderr_text();
    assert!(report.sent >= 4000 && report.tcp > 0, "{test}: {report:?}");
    assert!(
        report.lost.is_empty() && report.wrong.is_empty(),
        "{test}: {} of {} lost, {} wrong: {:?} {:?}\nA:\n{a_log}\nB:\n{}",
        report.lost.len(),
        report.sent,
        report.wrong.len(),
        &report.lost[..report.lost.len().min(20)],
        &report.wrong[..report.wrong.len().min(20)],
        b.stderr_text()
    );
    assert_eq!(report.answered, report.sent, "{test}: {report:?}");
    // B still has everything.
    assert!(node.link_exists(LINK), "{test}: link gone after A's exit");
    assert_eq!(node.addr_count(LINK, LOCAL), 1, "{}", node.addrs_of(LINK));
    assert_eq!(
        node.addr_count(LINK, CLUSTER_IP),
        1,
        "{}",
        node.addrs_of(LINK)
    );
    assert_eq!(
        rule_count(&node, backend),
        24,
        "{test}: B's rules after A's exit"
    );
    let m = client.query(cluster_dns(), &hot_name(1), RecordType::A);
    assert_eq!(a_strings(&m), vec![hot_ip(1)]);
    assert!(
        a_log.contains("leaving link, addresses and rules to it"),
        "{test}: A must hand over:\n{a_log}"
    );

    // The last one out tears down.
    b.stop();
    assert!(
        !node.link_exists(LINK),
        "{test}: B left the link:\n{}",
        b.stderr_text()
    );
    assert_eq!(rule_count(&node, backend), 0, "{test}: B left rules");
    assert_eq!(node.nodedns_rule_count(), 0);
    assert!(node.nft_table().is_none());
}

#[test]
fn rolling_update_loses_nothing_iptables() {
    require_netns!("rolling_update_loses_nothing_iptables");
    if !have_tool("rolling_update_loses_nothing_iptables", "iptables-restore") {
        return;
    }
    rolling_update("iptables", "iptables");
}

#[test]
fn rolling_update_loses_nothing_nftables() {
    require_netns!("rolling_update_loses_nothing_nftables");
    if !have_tool("rolling_update_loses_nothing_nftables", "nft") {
        return;
    }
    rolling_update("nftables", "nftables");
}

/// Fail-open: the node has a kube-proxy-style DNAT of the ClusterIP to a fake cluster DNS in its
/// own namespace. While nodedns runs, the client's queries to the ClusterIP are answered by it
/// (the fake sees a cached name once); after SIGKILL (no teardown: link, addresses and rules stay)
/// every query is answered by the cluster DNS through the DNAT; after a restart, nodedns again.
///
/// With the addon's unconditional NOTRACK the queries after the SIGKILL met a closed port.
fn fail_open(test: &str, backend: &str) {
    let node = Netns::new("openn");
    let client = Netns::new("openc");
    let cluster = Netns::new("opend");
    wire(&node, &client, "vc0", "10.77.0.1", "10.77.0.2");
    wire(&node, &cluster, "vd0", "10.78.0.1", "10.78.0.2");
    node.ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    let fake = NsUpstream::start(&cluster, "10.78.0.2:53");
    for k in 0..HOT {
        fake.set_a(&hot_name(k), hot_ip(k).parse().expect("literal"), 300);
    }
    // kube-proxy (iptables mode) for the kube-dns Service: tracked queries to the ClusterIP go
    // to its endpoint.
    for proto in ["udp", "tcp"] {
        node.ok(&[
            "iptables",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-d",
            "10.96.0.10/32",
            "-p",
            proto,
            "--dport",
            "53",
            "-j",
            "DNAT",
            "--to-destination",
            "10.78.0.2:53",
        ]);
    }
    let args = node_args(backend, "10.78.0.2:53", &[]);
    let name = hot_name(3);
    let mut n = NsNodedns::start(&node, &args, &[]);
    // Answering comes before the rules (they follow the bind): until they are in, a query to
    // the ClusterIP still goes to the DNAT.
    assert!(
        poll(Duration::from_secs(10), || rule_count(&node, backend) == 24),
        "{test}: rules"
    );
    for _ in 0..5 {
        let m = client.query(cluster_dns(), &name, RecordType::A);
        assert_eq!(a_strings(&m), vec![hot_ip(3)], "{m:?}");
    }
    let m = client.query_tcp(cluster_dns(), &name, RecordType::A);
    assert_eq!(a_strings(&m), vec![hot_ip(3)], "{m:?}");
    assert_eq!(
        fake.queries(&name),
        1,
        "{test}: with nodedns up the ClusterIP is answered from its cache"
    );

    n.kill9();
    assert!(node.link_exists(LINK) && rule_count(&node, backend) == 24);
    let before = fake.total_queries();
    for _ in 0..20 {
        let m = client.query(cluster_dns(), &name, RecordType::A);
        assert_eq!(
            a_strings(&m),
            vec![hot_ip(3)],
            "{test}: after SIGKILL: {m:?}"
        );
    }
    let m = client.query_tcp(cluster_dns(), &name, RecordType::A);
    assert_eq!(a_strings(&m), vec![hot_ip(3)], "{m:?}");
    assert_eq!(
        fake.total_queries() - before,
        21,
        "{test}: every query after the SIGKILL is the cluster DNS's"
    );

    // A restart adopts link and rules; nodedns answers again (its cache is new: one miss).
    let mut n = NsNodedns::start(&node, &args, &[]);
    assert!(
        n.stderr_text().contains("socket match"),
        "{test}: the kernel's socket match was expected:\n{}",
        n.stderr_text()
    );
    let before = fake.queries(&name);
    for _ in 0..5 {
        let m = client.query(cluster_dns(), &name, RecordType::A);
        assert_eq!(a_strings(&m), vec![hot_ip(3)], "{m:?}");
    }
    assert!(
        fake.queries(&name) - before <= 1,
        "{test}: after the restart nodedns answers from its cache"
    );
    n.stop();
    assert!(!node.link_exists(LINK));
    assert_eq!(rule_count(&node, backend), 0);
}

#[test]
fn fail_open_iptables() {
    require_netns!("fail_open_iptables");
    if !have_tool("fail_open_iptables", "iptables-restore") {
        return;
    }
    fail_open("iptables", "iptables");
}

#[test]
fn fail_open_nftables() {
    require_netns!("fail_open_nftables");
    if !have_tool("fail_open_nftables", "nft") || !have_tool("fail_open_nftables", "iptables") {
        return;
    }
    fail_open("nftables", "nftables");
}
