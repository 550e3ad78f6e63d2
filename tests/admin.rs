//! Black-box tests of the admin server over loopback TCP/UDP.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nodedns::admin::{self, AdminState};
use nodedns::metrics::{CacheKind, Metrics, Proto, SetupErrorKind, UpstreamFailure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const OPENMETRICS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,\
    application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

struct Server {
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

fn start(state: Arc<AdminState>) -> Server {
    let listener = admin::bind("127.0.0.1:0".parse().expect("addr")).expect("bind admin");
    let addr = listener.local_addr().expect("local addr");
    let (shutdown, rx) = watch::channel(false);
    let task = tokio::spawn(admin::serve(listener, state, rx));
    Server {
        addr,
        shutdown,
        task,
    }
}

struct Reply {
    status: u16,
    headers: String,
    body: String,
}

/// One raw HTTP/1.1 request with `Connection: close`; reads until EOF.
async fn http(addr: SocketAddr, method: &str, path: &str, accept: Option<&str>) -> Reply {
    let mut s = TcpStream::connect(addr).await.expect("connect admin");
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    let req =
        format!("{method} {path} HTTP/1.1\r\nHost: test\r\n{accept}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write request");
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.expect("read response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("header/body separator");
    let (status_line, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    Reply {
        status,
        headers: headers.to_ascii_lowercase(),
        body: body.to_owned(),
    }
}

fn sample(text: &str, series: &str) -> Option<String> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|r| r.strip_prefix(' '))
            .map(str::to_owned)
    })
}

fn state_with(metrics: Arc<Metrics>, probe: Option<SocketAddr>) -> Arc<AdminState> {
    Arc::new(AdminState::new(metrics, probe).with_probe_timeout(Duration::from_millis(300)))
}

fn populated_metrics() -> Arc<Metrics> {
    let m = Arc::new(Metrics::new(&["10.0.0.10:53".parse().expect("addr")], 2));
    m.request(0, Proto::Udp, 1, 0);
    m.request(1, Proto::Udp, 1, 0);
    m.request(1, Proto::Tcp, 33, 3);
    m.cache_hit(0, CacheKind::Positive);
    m.cache_miss(1);
    m.cache_eviction(CacheKind::Positive);
    m.upstream_query(0, Proto::Udp);
    m.upstream_failure(0, UpstreamFailure::Servfail);
    m.upstream_duration(0, Duration::from_millis(2));
    m.setup_error(SetupErrorKind::Reconcile);
    m
}

#[tokio::test]
async fn metrics_scrape_negotiates_format_and_reports_values() {
    let srv = start(state_with(populated_metrics(), None));

    let r = http(srv.addr, "GET", "/metrics", Some(OPENMETRICS_ACCEPT)).await;
    assert_eq!(r.status, 200);
    assert!(
        r.headers
            .contains("content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"),
        "{}",
        r.headers
    );
    assert_eq!(
        sample(
            &r.body,
            r#"nodedns_requests_total{proto="udp",type="A",rcode="NOERROR"}"#
        )
        .as_deref(),
        Some("2")
    );
    assert_eq!(
        sample(
            &r.body,
            r#"nodedns_requests_total{proto="tcp",type="SRV",rcode="NXDOMAIN"}"#
        )
        .as_deref(),
        Some("1")
    );
    assert_eq!(
        sample(&r.body, "nodedns_cache_misses_total").as_deref(),
        Some("1")
    );
    assert!(r.body.ends_with("# EOF\n"));

    let r = http(srv.addr, "GET", "/metrics", None).await;
    assert_eq!(r.status, 200);
    assert!(
        r.headers
            .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{}",
        r.headers
    );
    assert_eq!(
        sample(&r.body, r#"nodedns_cache_hits_total{kind="positive"}"#).as_deref(),
        Some("1")
    );
    assert!(!r.body.contains("# EOF"));

    srv.shutdown.send(true).expect("server alive");
    tokio::time::timeout(Duration::from_secs(5), srv.task)
        .await
        .expect("serve returns after shutdown")
        .expect("serve task");
}

#[tokio::test]
async fn unknown_path_and_method() {
    let srv = start(state_with(Arc::new(Metrics::new(&[], 1)), None));
    assert_eq!(http(srv.addr, "GET", "/nope", None).await.status, 404);
    let r = http(srv.addr, "POST", "/metrics", None).await;
    assert_eq!(r.status, 405);
    assert!(r.headers.contains("allow: get, head"));
    let r = http(srv.addr, "HEAD", "/ready", None).await;
    assert_eq!(r.status, 503);
    assert!(r.body.is_empty());
}

#[tokio::test]
async fn ready_flips_when_all_flags_set() {
    let state = state_with(Arc::new(Metrics::new(&[], 1)), None);
    let srv = start(state.clone());

    let r = http(srv.addr, "GET", "/ready", None).await;
    assert_eq!(r.status, 503);
    assert_eq!(
        r.body,
        "not ready: listeners_bound, setup_done, upstream_reachable\n"
    );

    state.set_listeners_bound(true);
    state.set_setup_done(true);
    let r = http(srv.addr, "GET", "/ready", None).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.body, "not ready: upstream_reachable\n");

    state.set_upstream_reachable(true);
    let r = http(srv.addr, "GET", "/ready", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "ok\n");

    state.set_upstream_reachable(false);
    assert_eq!(http(srv.addr, "GET", "/ready", None).await.status, 503);
}

/// A fake DNS listener: answers every query by echoing it with QR set, and reports what it
/// received. With `wrong_id`, it flips the ID so the reply must be rejected.
async fn fake_responder(wrong_id: bool) -> (SocketAddr, tokio::sync::mpsc::Receiver<Vec<u8>>) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind fake dns");
    let addr = sock.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
            let mut reply = buf[..n].to_vec();
            if reply.len() >= 12 {
                reply[2] |= 0x80;
                if wrong_id {
                    reply[0] ^= 0xff;
                }
            }
            let _ = tx.send(buf[..n].to_vec()).await;
            let _ = sock.send_to(&reply, peer).await;
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn health_ok_when_dns_listener_answers() {
    let (dns, mut seen) = fake_responder(false).await;
    let srv = start(state_with(Arc::new(Metrics::new(&[], 1)), Some(dns)));

    let r = http(srv.addr, "GET", "/health", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, "ok\n");

    let q = seen.recv().await.expect("probe query received");
    let msg = hickory_proto::op::Message::from_vec(&q).expect("probe parses");
    assert_eq!(msg.queries.len(), 1);
    assert_eq!(msg.queries[0].name().to_ascii(), "health.nodedns.");
    assert_eq!(u16::from(msg.queries[0].query_type()), 16, "TXT");
    assert_eq!(u16::from(msg.queries[0].query_class()), 3, "CH");
}

#[tokio::test]
async fn health_fails_on_reply_with_wrong_id() {
    let (dns, mut seen) = fake_responder(true).await;
    let srv = start(state_with(Arc::new(Metrics::new(&[], 1)), Some(dns)));
    let r = http(srv.addr, "GET", "/health", None).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(
        seen.recv().await.is_some(),
        "the probe did reach the responder"
    );
}

#[tokio::test]
async fn health_fails_when_listener_is_wedged() {
    // Bound but never read: the kernel queues the probe and nobody answers.
    let wedged = UdpSocket::bind("127.0.0.1:0").await.expect("bind wedged");
    let dns = wedged.local_addr().expect("addr");
    let srv = start(state_with(Arc::new(Metrics::new(&[], 1)), Some(dns)));
    let r = http(srv.addr, "GET", "/health", None).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("did not answer"), "{}", r.body);
    // The probe really was sent to the wedged socket.
    let mut buf = [0u8; 512];
    let (n, _) = wedged
        .try_recv_from(&mut buf)
        .expect("probe queued on wedged socket");
    assert_eq!(&buf[12..n - 4], admin::PROBE_QNAME_WIRE);
    drop(wedged);
}

#[tokio::test]
async fn health_fails_fast_when_nothing_listens() {
    let gone = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let dns = gone.local_addr().expect("addr");
    drop(gone);
    // Generous timeout: the ICMP port-unreachable must fail the probe well before it.
    let state = Arc::new(
        AdminState::new(Arc::new(Metrics::new(&[], 1)), Some(dns))
            .with_probe_timeout(Duration::from_secs(30)),
    );
    let srv = start(state);
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        http(srv.addr, "GET", "/health", None),
    )
    .await
    .expect("probe failed fast");
    assert_eq!(r.status, 503, "{}", r.body);
}

#[tokio::test]
async fn reuseport_allows_a_second_listener_on_the_same_port() {
    let first = admin::bind("127.0.0.1:0".parse().expect("addr")).expect("bind first");
    let addr = first.local_addr().expect("addr");
    let second = admin::bind(addr).expect("surge pod binds the same port");
    assert_eq!(second.local_addr().expect("addr"), addr);
    let same = admin::bind_all(addr, addr);
    assert_eq!(same.expect("bind_all").len(), 1);
}

#[tokio::test]
async fn shutdown_closes_keepalive_connections() {
    let srv = start(state_with(Arc::new(Metrics::new(&[], 1)), None));
    // An idle keep-alive connection must not hold up shutdown.
    let mut idle = TcpStream::connect(srv.addr).await.expect("connect");
    idle.write_all(b"GET /ready HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 1024];
    let n = idle.read(&mut buf).await.expect("read response");
    assert!(
        std::str::from_utf8(&buf[..n])
            .unwrap_or("")
            .starts_with("HTTP/1.1 503")
    );

    srv.shutdown.send(true).expect("server alive");
    tokio::time::timeout(Duration::from_secs(2), srv.task)
        .await
        .expect("serve returned well before the drain timeout")
        .expect("serve task");
    // The server closed the idle connection.
    let n = tokio::time::timeout(Duration::from_secs(2), idle.read(&mut buf))
        .await
        .expect("connection closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        TcpStream::connect(srv.addr).await.is_err(),
        "listener closed"
    );
}

/// Runs tests/prom_parse.py on both formats when the Python client is installed.
#[tokio::test]
async fn python_prometheus_client_parses_both_formats() {
    let have = Command::new("python3")
        .args(["-c", "import prometheus_client"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        eprintln!(
            "SKIP: python3 with prometheus_client not available (pip install prometheus_client)"
        );
        return;
    }
    let metrics = populated_metrics();
    assert!(
        metrics.set_cache_snapshot_provider(|| nodedns::metrics::CacheSnapshot {
            positive_entries: 3,
            ..Default::default()
        })
    );
    let srv = start(state_with(metrics, None));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/prom_parse.py");
    for (accept, format) in [(Some(OPENMETRICS_ACCEPT), "openmetrics"), (None, "text")] {
        let body = http(srv.addr, "GET", "/metrics", accept).await.body;
        let mut child = Command::new("python3")
            .args([script, format])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn python3");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(body.as_bytes()).expect("write exposition");
        }
        let out = child.wait_with_output().expect("python3 finished");
        assert!(
            out.status.success(),
            "{format} rejected: {}\n{body}",
            String::from_utf8_lossy(&out.stderr)
        );
        // "<families> <samples>": every family we emit must come through.
        let stdout = String::from_utf8_lossy(&out.stdout);
        let families: usize = stdout
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .expect("family count");
        // 14 before, plus nodedns_config_generation and nodedns_reloads_total, plus
        // nodedns_upstream_healthy and nodedns_upstream_healthcheck_failures_total, plus
        // nodedns_loop_detected; plus the CoreDNS names (10, src/metrics/compat.rs) and
        // process_* (6).
        assert_eq!(families, 19 + 10 + 6, "{format}: {stdout}");
    }
}
