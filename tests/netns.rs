//! Integration tests for `netif` and `firewall`, each in a throw-away network namespace.
//!
//! They need root and the `ip` command; otherwise each test prints why it is skipped and passes.
//! Library code runs on a thread that has `setns`-ed into the test namespace: netlink sockets,
//! UDP sockets and child processes (iptables, nft) all belong to that thread's namespace. The
//! harness verifies the latter before touching any firewall, so a mistake cannot reach the
//! host's rules.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nodedns::firewall::{self, Backend, Firewall, Intercept, Rules};
use nodedns::netif::{self, LinkKind, Netif, NetifConfig, NetifError, Repair};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Why this environment cannot run the tests, if it cannot.
fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not running as root".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("the `ip` command (iproute2) is missing".into());
    }
    None
}

macro_rules! require_env {
    () => {
        if let Some(reason) = skip_reason() {
            eprintln!("SKIP {}: {reason}", module_path!());
            return;
        }
    };
}

/// A named network namespace, deleted on drop (also when the test panics).
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("nodedns-t-{}-{n}", std::process::id());
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip netns add");
        assert!(out.status.success(), "ip netns add {name}: {out:?}");
        let ns = Netns { name };
        // A fresh namespace has lo down; local delivery needs it up.
        ns.ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs a command inside the namespace via `ip netns exec`.
    fn exec(&self, argv: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .output()
            .expect("run ip netns exec")
    }

    /// Like [`exec`](Self::exec) but asserts success and returns stdout.
    fn ok(&self, argv: &[&str]) -> String {
        let out = self.exec(argv);
        assert!(
            out.status.success(),
            "{argv:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` on a thread that lives in the namespace and returns its result (re-raising a
    /// panic). Checks that the thread and the processes it spawns are really in the namespace.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        std::thread::scope(|s| {
            let h = s.spawn(|| {
                let file = std::fs::File::open(&path).expect("open netns file");
                let ino = file.metadata().expect("stat netns file").ino();
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                let own = std::fs::metadata("/proc/thread-self/ns/net")
                    .expect("stat own netns")
                    .ino();
                assert_eq!(own, ino, "thread is not in the test namespace");
                let child = Command::new("readlink")
                    .arg("/proc/self/ns/net")
                    .output()
                    .expect("run readlink");
                assert_eq!(
                    String::from_utf8_lossy(&child.stdout).trim(),
                    format!("net:[{ino}]"),
                    "child processes do not inherit the thread's namespace"
                );
                f()
            });
            match h.join() {
                Ok(v) => v,
                Err(p) => std::panic::resume_unwind(p),
            }
        })
    }

    /// Runs an async closure on a current-thread runtime inside the namespace.
    fn block_on<T: Send, Fut: Future<Output = T>>(&self, f: impl FnOnce() -> Fut + Send) -> T {
        self.run(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime")
                .block_on(f())
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test literal")
}

const LINK: &str = "nodedns0";
const V4: &str = "169.254.20.10";
const V6: &str = "fd00:53::10";

fn cfg(kind: LinkKind, addrs: &[&str]) -> NetifConfig {
    NetifConfig {
        name: LINK.into(),
        kind,
        addrs: addrs.iter().map(|a| ip(a)).collect(),
    }
}

/// Sends one datagram from another socket in the same namespace to `to` and checks it arrives.
fn assert_udp_roundtrip(to: SocketAddr) {
    let server = UdpSocket::bind(to).unwrap_or_else(|e| panic!("bind {to}: {e}"));
    // A timeout, not a sleep: recv returns as soon as the datagram is there.
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("set timeout");
    let unspecified: SocketAddr = if to.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let client = UdpSocket::bind(unspecified).expect("bind client");
    client.send_to(b"ping", to).expect("send");
    let mut buf = [0u8; 16];
    let (n, from) = server
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("datagram to {to} did not arrive: {e}"));
    assert_eq!(&buf[..n], b"ping");
    assert_eq!(
        from.port(),
        client.local_addr().expect("client addr").port()
    );
}

fn link_exists(ns: &Netns, name: &str) -> bool {
    ns.exec(&["ip", "link", "show", "dev", name])
        .status
        .success()
}

fn addrs_of(ns: &Netns, name: &str) -> String {
    ns.ok(&["ip", "-o", "addr", "show", "dev", name])
}

// ---------------------------------------------------------------------------------------------
// netif
// ---------------------------------------------------------------------------------------------

#[test]
fn bridge_link_carries_v4_and_v6_and_receives_udp() {
    require_env!();
    let ns = Netns::new();
    let c = cfg(LinkKind::Bridge, &[V4, V6]);
    let (first, second, local) = ns.block_on(|| async {
        let first = netif::ensure(&c).await.expect("first ensure");
        // IPv6 must be bindable right away (IFA_F_NODAD), and both must receive traffic.
        assert_udp_roundtrip(SocketAddr::new(ip(V4), 53));
        assert_udp_roundtrip(SocketAddr::new(ip(V6), 53));
        let second = netif::ensure(&c).await.expect("second ensure");
        let local = (
            netif::is_local(ip(V4)).expect("probe"),
            netif::is_local(ip("169.254.20.11")).expect("probe"),
        );
        (first, second, local)
    });
    assert!(first.link_created);
    assert_eq!(first.added, vec![ip(V4), ip(V6)]);
    assert!(
        second.is_noop(),
        "second ensure changed something: {second:?}"
    );
    assert_eq!(second.present, vec![ip(V4), ip(V6)]);
    assert_eq!(local, (true, false));

    let addrs = addrs_of(&ns, LINK);
    assert!(addrs.contains(&format!("{V4}/32")), "{addrs}");
    assert!(addrs.contains(&format!("{V6}/128")), "{addrs}");
    let v6_line = addrs.lines().find(|l| l.contains(V6)).unwrap_or_default();
    assert!(!v6_line.contains("tentative"), "{addrs}");
    let link = ns.ok(&["ip", "-o", "link", "show", "dev", LINK]);
    assert!(link.contains(",UP"), "{link}");
}

#[test]
fn dummy_kind_works_or_reports_kind_unsupported() {
    require_env!();
    let ns = Netns::new();
    let c = cfg(LinkKind::Dummy, &[V4]);
    let res = ns.block_on(|| async { netif::ensure(&c).await });
    match res {
        Ok(out) => {
            assert!(out.link_created);
            let link = ns.ok(&["ip", "-d", "-o", "link", "show", "dev", LINK]);
            assert!(link.contains("dummy"), "{link}");
        }
        Err(e @ NetifError::KindUnsupported { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("--link-kind bridge"), "{msg}");
            eprintln!("dummy link type unavailable here (expected on this kernel): {msg}");
            assert!(!link_exists(&ns, LINK));
        }
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[test]
fn out_of_band_changes_are_repaired_and_reported() {
    require_env!();
    let ns = Netns::new();
    let mut nif = Netif::new(cfg(LinkKind::Bridge, &[V4, V6]));
    let first = ns.block_on(|| async { nif.ensure().await.expect("ensure") });
    assert!(first.repaired.is_empty());

    ns.ok(&["ip", "addr", "del", &format!("{V4}/32"), "dev", LINK]);
    let out = ns.block_on(|| async { nif.ensure().await.expect("ensure") });
    assert_eq!(out.added, vec![ip(V4)]);
    assert_eq!(out.repaired, vec![Repair::AddressRestored(ip(V4))]);
    assert!(addrs_of(&ns, LINK).contains(V4));

    ns.ok(&["ip", "link", "set", LINK, "down"]);
    let out = ns.block_on(|| async { nif.ensure().await.expect("ensure") });
    // Setting a link down flushes its IPv6 addresses (unless keep_addr_on_down), so the
    // repair includes them.
    assert_eq!(
        out.repaired,
        vec![
            Repair::LinkSetUp(LINK.into()),
            Repair::AddressRestored(ip(V6))
        ]
    );
    assert!(
        ns.ok(&["ip", "-o", "link", "show", "dev", LINK])
            .contains(",UP")
    );

    ns.ok(&["ip", "link", "del", LINK]);
    let out = ns.block_on(|| async { nif.ensure().await.expect("ensure") });
    assert!(out.link_created);
    assert_eq!(
        out.repaired,
        vec![
            Repair::LinkRecreated(LINK.into()),
            Repair::AddressRestored(ip(V4)),
            Repair::AddressRestored(ip(V6)),
        ]
    );

    ns.block_on(|| async { nif.teardown().await.expect("teardown") });
    assert!(
        !link_exists(&ns, LINK),
        "link created by us must be deleted"
    );
    assert!(nif.owned().is_empty());
}

#[test]
fn teardown_of_preexisting_link_removes_only_our_addresses() {
    require_env!();
    let ns = Netns::new();
    ns.ok(&["ip", "link", "add", LINK, "type", "bridge"]);
    ns.ok(&["ip", "addr", "add", "10.9.9.9/32", "dev", LINK]);
    let mut nif = Netif::new(cfg(LinkKind::Bridge, &[V4, "10.9.9.9"]));
    let out = ns.block_on(|| async { nif.ensure().await.expect("ensure") });
    assert!(!out.link_created);
    assert!(out.link_set_up, "the pre-existing link was down");
    assert_eq!(out.added, vec![ip(V4)]);
    assert_eq!(out.present, vec![ip("10.9.9.9")]);
    assert!(!nif.owned().link_created);

    ns.block_on(|| async { nif.teardown().await.expect("teardown") });
    assert!(
        link_exists(&ns, LINK),
        "a link we did not create must survive"
    );
    let addrs = addrs_of(&ns, LINK);
    assert!(
        addrs.contains("10.9.9.9/32"),
        "foreign address removed: {addrs}"
    );
    assert!(
        !addrs.contains(V4),
        "our address survived teardown: {addrs}"
    );
}

#[test]
fn a_link_left_by_a_crashed_nodedns_is_adopted_and_removed_at_teardown() {
    require_env!();
    let ns = Netns::new();
    // First instance creates the link and "crashes" (its state is dropped without teardown).
    let mut first = Netif::new(cfg(LinkKind::Bridge, &[V4]));
    ns.block_on(|| async { first.ensure().await.expect("ensure") });
    drop(first);
    assert!(
        ns.ok(&["ip", "link", "show", LINK])
            .contains("alias nodedns")
    );
    // The next instance finds it, knows it is nodedns's, and removes it at exit.
    let mut second = Netif::new(cfg(LinkKind::Bridge, &[V4]));
    let out = ns.block_on(|| async { second.ensure().await.expect("ensure") });
    assert!(out.adopted && !out.link_created && out.added.is_empty());
    assert!(second.owned().link_created);
    ns.block_on(|| async { second.teardown().await.expect("teardown") });
    assert!(
        !link_exists(&ns, LINK),
        "the adopted link survived teardown"
    );
    // A same-named link without the alias is someone else's: never adopted.
    ns.ok(&["ip", "link", "add", LINK, "type", "bridge"]);
    let mut third = Netif::new(cfg(LinkKind::Bridge, &[V4]));
    let out = ns.block_on(|| async { third.ensure().await.expect("ensure") });
    assert!(!out.adopted);
    ns.block_on(|| async { third.teardown().await.expect("teardown") });
    assert!(link_exists(&ns, LINK));
}

#[test]
fn addresses_local_elsewhere_are_not_added_and_need_no_link() {
    require_env!();
    let ns = Netns::new();
    ns.ok(&["ip", "addr", "add", "10.96.0.10/32", "dev", "lo"]);
    let c = cfg(LinkKind::Bridge, &["10.96.0.10", "127.0.0.1"]);
    let out = ns.block_on(|| async { netif::ensure(&c).await.expect("ensure") });
    assert!(out.is_noop(), "{out:?}");
    assert_eq!(out.local_elsewhere, vec![ip("127.0.0.1"), ip("10.96.0.10")]);
    assert!(
        !link_exists(&ns, LINK),
        "no link may be created with nothing to add"
    );

    // Like kube-proxy IPVS: the ClusterIP on kube-ipvs0 is left there, the other IP is ours.
    ns.ok(&["ip", "link", "add", "kube-ipvs0", "type", "bridge"]);
    ns.ok(&["ip", "addr", "add", "10.96.0.11/32", "dev", "kube-ipvs0"]);
    let c = cfg(LinkKind::Bridge, &[V4, "10.96.0.11"]);
    let out = ns.block_on(|| async { netif::ensure(&c).await.expect("ensure") });
    assert!(out.link_created);
    assert_eq!(out.added, vec![ip(V4)]);
    assert_eq!(out.local_elsewhere, vec![ip("10.96.0.11")]);
    assert!(!addrs_of(&ns, LINK).contains("10.96.0.11"));
}

// ---------------------------------------------------------------------------------------------
// firewall
// ---------------------------------------------------------------------------------------------

fn tool_missing(tool: &str) -> bool {
    let missing = Command::new(tool).arg("--version").output().is_err();
    if missing {
        eprintln!("SKIP: `{tool}` is not installed");
    }
    missing
}

fn fw_rules() -> Rules {
    Rules {
        addrs: vec![SocketAddr::new(ip(V4), 53), SocketAddr::new(ip(V6), 53)],
        health_port: Some(8080),
        // The default: the socket-match rules, so their saved form is checked against the tools.
        intercept: Intercept::WhileListening,
    }
}

#[test]
fn iptables_rules_are_ensured_repaired_and_torn_down() {
    require_env!();
    if tool_missing("iptables-restore") || tool_missing("ip6tables-restore") {
        return;
    }
    let ns = Netns::new();
    // Foreign rules in the very chains we use, which must survive teardown.
    let foreign4 = "-A PREROUTING -d 10.0.0.1/32 -p udp -m udp --dport 53 -j NOTRACK";
    let foreign4f = "-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT";
    let foreign6 = "-A OUTPUT -d fd00::1/128 -p udp -m udp --dport 53 -j NOTRACK";
    ns.ok(&["sh", "-c", &format!("iptables -t raw {foreign4}")]);
    ns.ok(&["sh", "-c", &format!("iptables -t filter {foreign4f}")]);
    ns.ok(&["sh", "-c", &format!("ip6tables -t raw {foreign6}")]);
    let save = |tool: &str| {
        let raw = ns.ok(&[tool, "-t", "raw"]);
        raw + &ns.ok(&[tool, "-t", "filter"])
    };

    let fw = Firewall::new(Backend::Iptables, fw_rules());
    let wanted = firewall::iptables::rules(&fw_rules());
    let added = ns.run(|| fw.ensure()).expect("ensure");
    assert_eq!(added.len(), 24, "{added:#?}");
    let (v4, v6): (Vec<_>, Vec<_>) = wanted
        .iter()
        .cloned()
        .partition(|r| r.family == firewall::iptables::Family::V4);
    assert!(firewall::iptables::missing(&v4, &save("iptables-save")).is_empty());
    assert!(firewall::iptables::missing(&v6, &save("ip6tables-save")).is_empty());
    // Prepended: our rules come before the foreign one in PREROUTING.
    let raw = ns.ok(&["iptables-save", "-t", "raw"]);
    let first = raw.lines().find(|l| l.starts_with("-A PREROUTING"));
    assert!(first.is_some_and(|l| l.contains("nodedns:")), "{raw}");

    assert_eq!(
        ns.run(|| fw.ensure()).expect("ensure"),
        Vec::<String>::new()
    );

    // Out-of-band deletion of one rule: only that one is re-added.
    let victim = &v4[1];
    ns.ok(&[
        "sh",
        "-c",
        &format!(
            "iptables -t {} {}",
            victim.table,
            victim.save_line().replacen("-A ", "-D ", 1)
        ),
    ]);
    assert_eq!(
        ns.run(|| fw.ensure()).expect("ensure"),
        vec![victim.describe()]
    );

    // A duplicate of ours (as a racing second instance could leave) is removed too.
    ns.ok(&[
        "sh",
        "-c",
        &format!("iptables -t {} {}", victim.table, victim.save_line()),
    ]);
    ns.run(|| fw.teardown()).expect("teardown");
    let (s4, s6) = (save("iptables-save"), save("ip6tables-save"));
    assert!(!s4.contains("nodedns"), "{s4}");
    assert!(!s6.contains("nodedns"), "{s6}");
    assert!(s4.contains(foreign4), "{s4}");
    assert!(s4.contains(foreign4f), "{s4}");
    assert!(s6.contains(foreign6), "{s6}");
    // Idempotent.
    ns.run(|| fw.teardown()).expect("second teardown");
}

/// The handle of the rule `rule` in chain `chain` of our nft table.
fn nft_handle(ns: &Netns, chain: &str, rule: &str) -> String {
    let listing = ns.ok(&["nft", "-a", "list", "chain", "inet", "nodedns", chain]);
    listing
        .lines()
        .find_map(|l| {
            let (text, handle) = l.trim().split_once(" # handle ")?;
            (text == rule).then(|| handle.trim().to_string())
        })
        .unwrap_or_else(|| panic!("rule {rule:?} not in {listing}"))
}

#[test]
fn nftables_table_is_ensured_repaired_and_torn_down() {
    require_env!();
    if tool_missing("nft") {
        return;
    }
    let ns = Netns::new();
    ns.ok(&["nft", "add", "table", "inet", "foreign"]);
    ns.ok(&[
        "nft",
        "add chain inet foreign c { type filter hook input priority 0; }",
    ]);
    ns.ok(&["nft", "add rule inet foreign c tcp dport 22 accept"]);

    let fw = Firewall::new(Backend::Nftables, fw_rules());
    let chains = firewall::nft::chains(&fw_rules());
    let added = ns.run(|| fw.ensure()).expect("ensure");
    assert_eq!(added.len(), 4 + 24, "{added:#?}");
    let listing = ns.ok(&["nft", "list", "table", "inet", "nodedns"]);
    assert_eq!(listing, firewall::nft::table_text(&chains));
    assert_eq!(
        ns.run(|| fw.ensure()).expect("ensure"),
        Vec::<String>::new()
    );

    let rule = format!("ip daddr {V4} udp dport 53 socket transparent 0 notrack");
    let handle = nft_handle(&ns, "raw-prerouting", &rule);
    ns.ok(&[
        "nft",
        "delete",
        "rule",
        "inet",
        "nodedns",
        "raw-prerouting",
        "handle",
        &handle,
    ]);
    assert_eq!(
        ns.run(|| fw.ensure()).expect("ensure"),
        vec![format!("nft rule inet nodedns raw-prerouting {rule}")]
    );
    let listing = ns.ok(&["nft", "list", "table", "inet", "nodedns"]);
    assert_eq!(listing, firewall::nft::table_text(&chains));

    ns.run(|| fw.teardown()).expect("teardown");
    let tables = ns.ok(&["nft", "list", "tables"]);
    assert!(!tables.contains("inet nodedns"), "{tables}");
    assert!(tables.contains("inet foreign"), "{tables}");
    let foreign = ns.ok(&["nft", "list", "table", "inet", "foreign"]);
    assert!(foreign.contains("tcp dport 22 accept"), "{foreign}");
    ns.run(|| fw.teardown()).expect("second teardown");
}

/// Drops CAP_NET_ADMIN from the calling thread's effective set (capabilities are per thread, so
/// the rest of the test process keeps it).
fn drop_net_admin_on_this_thread() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    const CAP_NET_ADMIN: u32 = 12;
    let mut hdr = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget/capset with a v3 header read/write exactly two `Data` structs.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    assert_eq!(rc, 0, "capget");
    data[0].effective &= !(1 << CAP_NET_ADMIN);
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) };
    assert_eq!(rc, 0, "capset");
}

#[test]
fn without_cap_net_admin_local_addresses_work_and_others_name_the_capability() {
    require_env!();
    let ns = Netns::new();
    ns.ok(&["ip", "addr", "add", "10.96.0.10/32", "dev", "lo"]);
    let local = cfg(LinkKind::Bridge, &["10.96.0.10", "127.0.0.1"]);
    let needs_link = cfg(LinkKind::Bridge, &[V4]);
    let (ok, err) = ns.run(|| {
        drop_net_admin_on_this_thread();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(async {
            (
                netif::ensure(&local).await,
                netif::ensure(&needs_link).await,
            )
        })
    });
    let ok = ok.expect("read-only ensure must work without CAP_NET_ADMIN");
    assert!(ok.is_noop());
    match err {
        Err(e @ NetifError::PermissionDenied { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("CAP_NET_ADMIN") && !msg.contains('\n'),
                "{msg}"
            );
        }
        other => panic!("expected PermissionDenied, got {other:?}"),
    }
    assert!(!link_exists(&ns, LINK));
}
