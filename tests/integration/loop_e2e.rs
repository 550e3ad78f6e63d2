//! Loop detection end to end: a fake upstream that forwards what it receives back to nodedns
//! (a UDP relay on loopback), and nodedns finding the loop, blocking the zone and reporting it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

use crate::fake_upstream::FakeUpstream;
use crate::harness::{Nodedns, free_port, query_udp, wait_until};

/// Datagrams the relay passes at most (a broken detection must not make the test flood itself).
const RELAY_CAP: usize = 500;

/// A UDP "upstream" that forwards every query it gets to `target` (nodedns's listener) from a
/// fresh socket and relays the reply back: the misconfiguration CoreDNS's `loop` is for.
struct Relay {
    addr: SocketAddr,
    /// Queries and replies relayed.
    relayed: Arc<AtomicUsize>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Relay {
        let sock = Arc::new(
            tokio::net::UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("bind relay"),
        );
        let addr = sock.local_addr().expect("relay addr");
        let relayed = Arc::new(AtomicUsize::new(0));
        let count = relayed.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                if count.fetch_add(1, Ordering::Relaxed) >= RELAY_CAP {
                    continue;
                }
                let query = buf[..n].to_vec();
                let (sock, count) = (sock.clone(), count.clone());
                tokio::spawn(async move {
                    let Ok(out) = tokio::net::UdpSocket::bind("127.0.0.1:0").await else {
                        return;
                    };
                    if out.send_to(&query, target).await.is_err() {
                        return;
                    }
                    let mut reply = vec![0u8; 4096];
                    if let Ok(Ok(n)) =
                        tokio::time::timeout(Duration::from_secs(5), out.recv(&mut reply)).await
                    {
                        count.fetch_add(1, Ordering::Relaxed);
                        let _ = sock.send_to(&reply[..n], from).await;
                    }
                });
            }
        });
        Relay { addr, relayed }
    }

    fn relayed(&self) -> usize {
        self.relayed.load(Ordering::Relaxed)
    }
}

fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(3)) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: nodedns\r\nConnection: close\r\n\r\n"
    );
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

/// Polls `path` until `ok(status, body)`, up to `limit`; the last answer either way.
async fn poll_http(
    addr: SocketAddr,
    path: &str,
    limit: Duration,
    ok: impl Fn(u16, &str) -> bool,
) -> (u16, String) {
    let start = Instant::now();
    loop {
        let (status, body) = tokio::task::spawn_blocking({
            let path = path.to_string();
            move || http_get(addr, &path)
        })
        .await
        .unwrap_or((0, String::new()));
        if ok(status, &body) || start.elapsed() > limit {
            return (status, body);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The listen address, the HTTP address, and nodedns's args for `.` to `up` and `loop.test` to
/// `loop_server`.
fn args(up: &FakeUpstream, loop_server: SocketAddr, http: SocketAddr, mode: &str) -> Vec<String> {
    [
        "--upstream".to_string(),
        up.addr_str(),
        // The cluster zones to `up` too (no Service variable, which /ready would name).
        "--upstream-svc".into(),
        up.addr_str(),
        "--forward".into(),
        format!("loop.test={loop_server}"),
        "--health-listen".into(),
        http.to_string(),
        "--loop-detect".into(),
        mode.into(),
        "--attempt-timeout".into(),
        "500ms".into(),
        "--query-deadline".into(),
        "2s".into(),
    ]
    .to_vec()
}

#[tokio::test]
async fn loop_a_zone_forwarded_back_to_nodedns_is_found_blocked_and_reported() {
    let up = FakeUpstream::start().await;
    up.set_a("www.example.org", std::net::Ipv4Addr::new(192, 0, 2, 1), 60);
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let relay = Relay::start(listen).await;
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let node = Nodedns::start_env(Some(listen), &args(&up, relay.addr, http, "on"), &[]).await;

    let want = format!("loop detected: zone loop.test via {}", relay.addr);
    let (status, body) = poll_http(http, "/ready", Duration::from_secs(8), |s, b| {
        s == 503 && b.contains(&want)
    })
    .await;
    assert_eq!(status, 503, "{body}\n{}", node.stderr_text());
    assert!(body.contains(&want), "{body}");
    assert!(!body.contains("loop_check"), "the check is over: {body}");

    let (_, metrics) = poll_http(http, "/metrics", Duration::from_secs(5), |_, b| {
        b.contains(r#"nodedns_loop_detected{zone="."}"#)
    })
    .await;
    assert!(
        metrics.contains("nodedns_loop_detected{zone=\"loop.test\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("nodedns_loop_detected{zone=\".\"} 0"),
        "{metrics}"
    );

    // The loop unwinds and stays quiet: the relay passed a handful of datagrams, not a flood.
    let settled = wait_until(Duration::from_secs(3), {
        let mut last = usize::MAX;
        let relay = &relay;
        move || {
            let now = relay.relayed();
            let still = now == last;
            last = now;
            still
        }
    })
    .await;
    let relayed = relay.relayed();
    assert!(settled, "the relay kept relaying: {relayed}");
    assert!(relayed < 50, "relayed {relayed} datagrams");

    // The zone's queries get SERVFAIL without going upstream.
    let r = query_udp(node.addr, "www.loop.test", RecordType::A, None, false).await;
    assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(relay.relayed(), relayed, "nothing was forwarded");
    // The other zones are served.
    let r = query_udp(node.addr, "www.example.org", RecordType::A, None, false).await;
    assert_eq!(
        crate::harness::a_addrs(&r),
        vec![std::net::Ipv4Addr::new(192, 0, 2, 1)]
    );
    // Warned once.
    let log = node.stderr_text();
    assert_eq!(log.matches(&want).count(), 1, "{log}");
}

#[tokio::test]
async fn loop_fatal_exits_with_the_loop_in_one_line() {
    let up = FakeUpstream::start().await;
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let relay = Relay::start(listen).await;
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let mut child = std::process::Command::new(crate::harness::bin())
        .args(crate::harness::safety_args())
        .args(["--listen", &listen.to_string()])
        .args(args(&up, relay.addr, http, "fatal"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run nodedns");
    let started = Instant::now();
    while child.try_wait().ok().flatten().is_none() && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("nodedns output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or("");
    assert!(
        last.starts_with("nodedns: loop detected: zone loop.test via ")
            && last.contains(&relay.addr.to_string()),
        "{stderr}"
    );
    assert!(relay.relayed() < 50, "relayed {}", relay.relayed());
}

#[tokio::test]
async fn loop_no_loop_gives_a_zero_gauge_and_ready() {
    let up = FakeUpstream::start().await;
    let other = FakeUpstream::start().await;
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let a = args(&up, other.addr, http, "on");
    let _node = Nodedns::start(&a).await;
    let (status, body) = poll_http(http, "/ready", Duration::from_secs(5), |s, _| s == 200).await;
    assert_eq!(status, 200, "{body}");
    let (_, metrics) = poll_http(http, "/metrics", Duration::from_secs(2), |_, _| true).await;
    for zone in [".", "loop.test"] {
        assert!(
            metrics.contains(&format!("nodedns_loop_detected{{zone=\"{zone}\"}} 0")),
            "{zone}: {metrics}"
        );
    }
    // Each zone's probe reached its servers once.
    assert_eq!(other.total_queries(), 1 + other.queries("."));
}

/// A reload that points the looping zone at a real server lifts the block: the zone is probed
/// again, the gauge reads 0, `/ready` is 200 and the zone's names are answered.
#[tokio::test]
async fn loop_a_reload_that_fixes_the_zone_lifts_the_block() {
    let ip = std::net::Ipv4Addr::new(192, 0, 2, 7);
    let up = FakeUpstream::start().await;
    let fixed = FakeUpstream::start().await;
    fixed.set_a("www.loop.test", ip, 60);
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let relay = Relay::start(listen).await;
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("loop-reload-{}.toml", std::process::id()));
    let conf = |server: SocketAddr| {
        format!(
            "[[zone]]\nname = \".\"\nservers = [\"{}\"]\n\n[[zone]]\nname = \"loop.test\"\nservers = [\"{server}\"]\n",
            up.addr_str()
        )
    };
    std::fs::write(&path, conf(relay.addr)).expect("write config");
    let args: Vec<String> = [
        "--conf",
        path.to_str().expect("utf-8 path"),
        "--health-listen",
        &http.to_string(),
        "--loop-detect",
        "on",
        "--reload-interval",
        "3600s",
        "--attempt-timeout",
        "500ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let node = Nodedns::start_env(Some(listen), &args, &[]).await;
    let want = format!("loop detected: zone loop.test via {}", relay.addr);
    let (status, body) = poll_http(http, "/ready", Duration::from_secs(8), |s, b| {
        s == 503 && b.contains(&want)
    })
    .await;
    assert_eq!(status, 503, "{body}\n{}", node.stderr_text());

    std::fs::write(&path, conf(fixed.addr)).expect("rewrite config");
    node.signal(nix::sys::signal::Signal::SIGHUP);
    let (_, metrics) = poll_http(http, "/metrics", Duration::from_secs(10), |_, b| {
        b.contains("nodedns_loop_detected{zone=\"loop.test\"} 0")
    })
    .await;
    assert!(
        metrics.contains("nodedns_loop_detected{zone=\"loop.test\"} 0"),
        "{metrics}\n{}",
        node.stderr_text()
    );
    let (status, body) = poll_http(http, "/ready", Duration::from_secs(8), |s, _| s == 200).await;
    assert_eq!(status, 200, "{body}\n{}", node.stderr_text());
    let r = query_udp(node.addr, "www.loop.test", RecordType::A, None, false).await;
    assert_eq!(crate::harness::a_addrs(&r), vec![ip]);
    let _ = std::fs::remove_file(&path);
}
