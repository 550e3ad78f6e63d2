//! A small cluster in network namespaces: one "cluster" namespace with the cluster DNS (a fake
//! authoritative server for cluster.local and in-addr.arpa on 10.250.0.1:53) and an "external"
//! resolver (another fake, 10.250.0.1:5300, for everything else), and two "node" namespaces
//! joined to the cluster's bridge by veth pairs (10.250.0.2 and 10.250.0.3). Each node runs the
//! real nodedns on 169.254.20.10, and glibc (`getent`) and `dig` inside the node resolve through
//! it, with `/etc/netns/<node>/resolv.conf` naming only 169.254.20.10.
//!
//! Node 1 routes the cluster zones with `--forward`; node 2 learns the cluster DNS from
//! `KUBE_DNS_UPSTREAM_SERVICE_HOST`, as the kubelet sets it. The default zone of both goes to the
//! external fake, so an answer for a cluster name proves the zone routing (the external fake knows
//! no cluster names and must see none).

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

use crate::netns_e2e::{
    LINK, LOCAL, Netns, NsNodedns, NsUpstream, a_strings, have_tool, poll, require_netns,
};

const SVC: &str = "svc-1.default.svc.cluster.local";
const SVC_IP: &str = "10.96.0.11";
const SRV: &str = "_http._tcp.svc-1.default.svc.cluster.local";
const PTR: &str = "11.0.96.10.in-addr.arpa";
const EXTERNAL: &str = "www.example.org";
const EXTERNAL_IP: &str = "192.0.2.80";
const CLUSTER_DNS: &str = "10.250.0.1";

/// `ip netns exec <ns> dig @169.254.20.10 <args> +tries=1 +time=2`: its stdout.
fn dig(ns: &Netns, args: &[&str]) -> String {
    let mut argv = vec!["dig", "@169.254.20.10", "+tries=1", "+time=2"];
    argv.extend_from_slice(args);
    let out = ns.exec(&argv);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The answer-section records of type `rtype` in dig's output, as whitespace-split fields.
fn answers(out: &str, rtype: &str) -> Vec<Vec<String>> {
    out.lines()
        .filter(|l| !l.starts_with(';'))
        .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .filter(|f| f.len() >= 5 && f[2] == "IN" && f[3] == rtype)
        .collect()
}

/// `getent hosts <name>` inside `ns` (glibc's resolver, reading the namespace's resolv.conf).
fn getent(ns: &Netns, name: &str) -> String {
    let out = ns.exec(&["getent", "hosts", name]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Checks every lookup through the node's nodedns, then that repeating them is served from its
/// cache (the cluster DNS's query counts do not grow).
fn check_node(ns: &Netns, cluster: &NsUpstream, external: &NsUpstream) {
    let who = &ns.name;

    // glibc → nodedns → cluster DNS.
    let hosts = getent(ns, SVC);
    let fields: Vec<&str> = hosts.split_whitespace().collect();
    assert_eq!(
        fields.first().copied(),
        Some(SVC_IP),
        "{who}: getent hosts {SVC}: {hosts:?}"
    );
    assert!(fields.contains(&SVC), "{who}: {hosts:?}");

    // dig A, SRV and PTR.
    let out = dig(ns, &[SVC, "A"]);
    assert!(out.contains("status: NOERROR"), "{who}: {out}");
    let a = answers(&out, "A");
    assert_eq!(a.len(), 1, "{who}: {out}");
    assert_eq!(a[0][4], SVC_IP, "{who}: {out}");

    let out = dig(ns, &[SRV, "SRV"]);
    let srv = answers(&out, "SRV");
    assert_eq!(srv.len(), 1, "{who}: one SRV expected:\n{out}");
    assert_eq!(
        srv[0][4..],
        ["0", "100", "80", &format!("{SVC}.")],
        "{who}: SRV priority weight port target:\n{out}"
    );

    let out = dig(ns, &["-x", SVC_IP]);
    let ptr = answers(&out, "PTR");
    assert_eq!(ptr.len(), 1, "{who}: one PTR expected:\n{out}");
    assert_eq!(ptr[0][0], format!("{PTR}."), "{who}: {out}");
    assert_eq!(ptr[0][4], format!("{SVC}."), "{who}: {out}");

    // Everything else goes to the default zone's server.
    let out = dig(ns, &[EXTERNAL, "A"]);
    let a = answers(&out, "A");
    assert_eq!(a.len(), 1, "{who}: {out}");
    assert_eq!(a[0][4], EXTERNAL_IP, "{who}: {out}");

    // Now all of it again: served from the node's cache.
    let before = [
        cluster.queries(SVC),
        cluster.queries(SRV),
        cluster.queries(PTR),
        external.queries(EXTERNAL),
    ];
    assert!(before.iter().all(|&n| n >= 1), "{who}: {before:?}");
    assert_eq!(getent(ns, SVC).split_whitespace().next(), Some(SVC_IP));
    assert_eq!(answers(&dig(ns, &[SVC, "A"]), "A").len(), 1);
    assert_eq!(answers(&dig(ns, &[SRV, "SRV"]), "SRV").len(), 1);
    assert_eq!(answers(&dig(ns, &["-x", SVC_IP]), "PTR").len(), 1);
    assert_eq!(answers(&dig(ns, &[EXTERNAL, "A"]), "A").len(), 1);
    let after = [
        cluster.queries(SVC),
        cluster.queries(SRV),
        cluster.queries(PTR),
        external.queries(EXTERNAL),
    ];
    assert_eq!(
        after, before,
        "{who}: repeated lookups must be cache hits (upstream counts [A+AAAA, SRV, PTR, external])"
    );
}

#[test]
fn cluster_pods_resolve_services_through_nodedns() {
    let test = "cluster_pods_resolve_services_through_nodedns";
    require_netns!(test);
    for tool in ["dig", "getent"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            eprintln!("SKIP {test}: `{tool}` is not installed");
            return;
        }
    }
    if !have_tool(test, "iptables") {
        return;
    }

    // Namespaces first: they drop last, after the processes and fakes inside them.
    let cl = Netns::new("cl");
    let mut nodes = [Netns::new("n1"), Netns::new("n2")];

    // The cluster network: a bridge in the cluster namespace, one veth per node.
    cl.ok(&["ip", "link", "add", "br0", "type", "bridge"]);
    cl.ok(&["ip", "addr", "add", "10.250.0.1/24", "dev", "br0"]);
    cl.ok(&["ip", "link", "set", "br0", "up"]);
    for (i, node) in nodes.iter_mut().enumerate() {
        let port = format!("vn{}", i + 1);
        cl.ok(&[
            "ip", "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &node.name,
        ]);
        cl.ok(&["ip", "link", "set", &port, "master", "br0"]);
        cl.ok(&["ip", "link", "set", &port, "up"]);
        node.ok(&[
            "ip",
            "addr",
            "add",
            &format!("10.250.0.{}/24", i + 2),
            "dev",
            "eth0",
        ]);
        node.ok(&["ip", "link", "set", "eth0", "up"]);
        node.set_resolv_conf(
            "# written by the nodedns cluster test\nnameserver 169.254.20.10\n\
             options timeout:2 attempts:2\n",
        );
    }
    let cluster = NsUpstream::start(&cl, "10.250.0.1:53");
    cluster.set_a(SVC, SVC_IP.parse().expect("literal"), 30);
    cluster.set_srv(SRV, 80, SVC, 30);
    cluster.set_ptr(PTR, SVC, 30);
    let external = NsUpstream::start(&cl, "10.250.0.1:5300");
    external.set_a(EXTERNAL, EXTERNAL_IP.parse().expect("literal"), 30);

    // The nodes reach the cluster DNS directly (bounded wait for the links to come up).
    let cluster_addr: SocketAddr = "10.250.0.1:53".parse().expect("literal");
    for node in nodes.iter() {
        let q = crate::harness::build_query(SVC, RecordType::A, None, false)
            .to_vec()
            .expect("encode");
        assert!(
            poll(Duration::from_secs(10), || node
                .udp_exchange(cluster_addr, &q, Duration::from_millis(300))
                .is_ok()),
            "{} cannot reach the cluster DNS",
            node.name
        );
    }
    let direct = cluster.queries(SVC);

    let common = [
        "--listen",
        "169.254.20.10:53",
        "--link-kind",
        "bridge",
        "--upstream",
        "10.250.0.1:5300",
    ];
    let mut flags = common.to_vec();
    flags.extend([
        "--forward",
        "cluster.local=10.250.0.1",
        "--forward",
        "in-addr.arpa=10.250.0.1",
    ]);
    let mut n1 = NsNodedns::start(&nodes[0], &flags, &[]);
    let mut n2 = NsNodedns::start(
        &nodes[1],
        &common,
        &[("KUBE_DNS_UPSTREAM_SERVICE_HOST", CLUSTER_DNS)],
    );
    assert!(
        n2.stderr_text()
            .contains("zone=cluster.local servers=[10.250.0.1:53]"),
        "node 2 must take the cluster DNS from the environment:\n{}",
        n2.stderr_text()
    );

    check_node(&nodes[0], &cluster, &external);
    // Node 2 has its own cache: its first lookup goes to the cluster DNS again.
    let before_n2 = cluster.queries(SVC);
    check_node(&nodes[1], &cluster, &external);
    assert!(
        cluster.queries(SVC) > before_n2,
        "node 2's first lookup must reach the cluster DNS"
    );
    assert!(before_n2 > direct);

    // The zones were routed: no cluster name reached the external resolver, no external name
    // reached the cluster DNS.
    for name in [SVC, SRV, PTR] {
        assert_eq!(
            external.queries(name),
            0,
            "{name} leaked to the external resolver"
        );
    }
    assert_eq!(cluster.queries(EXTERNAL), 0);

    // A miss in the cluster zone is an NXDOMAIN from the cluster DNS, passed through.
    let m = nodes[1].query(
        SocketAddr::new(LOCAL.parse().expect("literal"), 53),
        "nope.default.svc.cluster.local",
        RecordType::A,
    );
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert!(a_strings(&m).is_empty());

    n1.stop();
    n2.stop();
    for node in nodes.iter() {
        assert!(!node.link_exists(LINK), "{}: link left", node.name);
        assert_eq!(node.nodedns_rule_count(), 0, "{}: rules left", node.name);
    }
}
