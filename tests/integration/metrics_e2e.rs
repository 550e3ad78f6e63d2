//! Observability end to end: the real binary's `/metrics` after a known sequence of queries, and
//! `/ready` following upstream reachability.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::fake_upstream::{Behavior, FakeUpstream};
use crate::harness::{Nodedns, free_port, query_tcp, query_udp};

/// A plain HTTP/1.1 GET; returns (status, body).
pub(crate) async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr)
        .await
        .expect("connect to the HTTP endpoint");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: nodedns\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("send request");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("HTTP response within 5 s")
        .expect("read response");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of the sample whose name and labels are exactly `series`.
pub(crate) fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

#[tokio::test]
async fn metrics_count_exactly_what_happened() {
    let up = FakeUpstream::start().await;
    up.set_a(
        "svc-1.default.svc.cluster.local",
        Ipv4Addr::new(10, 96, 0, 11),
        300,
    );
    up.set_soa(60, 60);
    up.set_behavior("dead.example", Behavior::Drop);
    let mport = free_port();
    let maddr: SocketAddr = format!("127.0.0.1:{mport}").parse().unwrap();
    let node = Nodedns::with_upstream(
        &up,
        &[
            "--metrics-listen",
            &maddr.to_string(),
            "--attempt-timeout",
            "200ms",
            "--query-deadline",
            "3s",
        ],
    )
    .await;
    let a = node.addr;
    let svc = "svc-1.default.svc.cluster.local";
    // 1 miss (NOERROR), 2 hits (UDP, TCP), 1 miss (NXDOMAIN), 1 negative hit, 1 miss that times out.
    assert_eq!(
        query_udp(a, svc, RecordType::A, None, false)
            .await
            .metadata
            .response_code,
        ResponseCode::NoError
    );
    assert_eq!(
        query_udp(a, svc, RecordType::A, None, false)
            .await
            .metadata
            .response_code,
        ResponseCode::NoError
    );
    assert_eq!(
        query_tcp(a, svc, RecordType::A, None, false)
            .await
            .metadata
            .response_code,
        ResponseCode::NoError
    );
    let nx = "nope.default.svc.cluster.local";
    assert_eq!(
        query_udp(a, nx, RecordType::AAAA, None, false)
            .await
            .metadata
            .response_code,
        ResponseCode::NXDomain
    );
    assert_eq!(
        query_udp(a, nx, RecordType::AAAA, None, false)
            .await
            .metadata
            .response_code,
        ResponseCode::NXDomain
    );
    let started = Instant::now();
    assert_eq!(
        query_udp(a, "dead.example", RecordType::A, None, false)
            .await
            .metadata
            .response_code,
        ResponseCode::ServFail
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "SERVFAIL came after the deadline"
    );

    let (status, body) = http_get(maddr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    let u = up.addr.to_string();
    let expect: Vec<(String, f64)> = vec![
        (
            r#"nodedns_requests_total{proto="udp",type="A",rcode="NOERROR"}"#.into(),
            2.0,
        ),
        (
            r#"nodedns_requests_total{proto="tcp",type="A",rcode="NOERROR"}"#.into(),
            1.0,
        ),
        (
            r#"nodedns_requests_total{proto="udp",type="AAAA",rcode="NXDOMAIN"}"#.into(),
            2.0,
        ),
        (
            r#"nodedns_requests_total{proto="udp",type="A",rcode="SERVFAIL"}"#.into(),
            1.0,
        ),
        (r#"nodedns_cache_hits_total{kind="positive"}"#.into(), 2.0),
        (r#"nodedns_cache_hits_total{kind="negative"}"#.into(), 1.0),
        ("nodedns_cache_misses_total".into(), 3.0),
        (r#"nodedns_cache_entries{kind="positive"}"#.into(), 1.0),
        (r#"nodedns_cache_entries{kind="negative"}"#.into(), 1.0),
        // svc, nope, and three attempts at dead.example (each server at most 3 tries in all).
        (
            format!(r#"nodedns_upstream_queries_total{{upstream="{u}",proto="udp"}}"#),
            5.0,
        ),
        (
            format!(r#"nodedns_upstream_queries_total{{upstream="{u}",proto="tcp"}}"#),
            0.0,
        ),
        (
            format!(r#"nodedns_upstream_failures_total{{upstream="{u}",cause="timeout"}}"#),
            3.0,
        ),
        (
            format!(r#"nodedns_upstream_failures_total{{upstream="{u}",cause="servfail"}}"#),
            0.0,
        ),
        (
            format!(r#"nodedns_upstream_duration_seconds_count{{upstream="{u}"}}"#),
            2.0,
        ),
        ("nodedns_requests_in_flight".into(), 0.0),
        ("nodedns_stale_answers_total".into(), 0.0),
    ];
    let mut wrong = Vec::new();
    for (series, want) in &expect {
        let got = sample(&body, series);
        if got != Some(*want) {
            wrong.push(format!("{series}: want {want}, got {got:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{}\n--- /metrics ---\n{body}",
        wrong.join("\n")
    );
    // Nothing else was asked upstream.
    assert_eq!(up.queries(svc), 1);
    assert_eq!(up.queries(nx), 1);

    // The exposition parses with the Prometheus project's own parser, when it is installed.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/prom_parse.py");
    let has_parser = std::process::Command::new("python3")
        .args(["-c", "import prometheus_client"])
        .status()
        .is_ok_and(|s| s.success());
    if has_parser {
        let out = std::process::Command::new("python3")
            .args([script, "text"])
            .stdin(std::process::Stdio::piped())
            .output_with_stdin(&body)
            .expect("run the parser");
        assert!(
            out.status.success(),
            "parser rejected /metrics: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        println!("SKIP parser check: python3 prometheus_client not installed");
    }

    // The CoreDNS names dashboards and the coredns-mixin alerts query, for the same sequence,
    // read through the Prometheus project's parser when it is there (else through `sample`).
    let read = if has_parser {
        let out = std::process::Command::new("python3")
            .args([script, "text", "--dump"])
            .stdin(std::process::Stdio::piped())
            .output_with_stdin(&body)
            .expect("run the parser");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    } else {
        body.clone()
    };
    let compat: Vec<(String, f64)> = vec![
        (
            r#"coredns_dns_requests_total{proto="udp",type="A"}"#.into(),
            3.0,
        ),
        (
            r#"coredns_dns_requests_total{proto="tcp",type="A"}"#.into(),
            1.0,
        ),
        (
            r#"coredns_dns_requests_total{proto="udp",type="AAAA"}"#.into(),
            2.0,
        ),
        // The harness's readiness query (health.nodedns. TXT CH) is the fourth NOERROR.
        (
            r#"coredns_dns_requests_total{proto="udp",type="TXT"}"#.into(),
            1.0,
        ),
        (
            r#"coredns_dns_responses_total{rcode="NOERROR"}"#.into(),
            4.0,
        ),
        (
            r#"coredns_dns_responses_total{rcode="NXDOMAIN"}"#.into(),
            2.0,
        ),
        (
            r#"coredns_dns_responses_total{rcode="SERVFAIL"}"#.into(),
            1.0,
        ),
        (r#"coredns_cache_hits_total{type="success"}"#.into(), 2.0),
        (r#"coredns_cache_hits_total{type="denial"}"#.into(), 1.0),
        ("coredns_cache_misses_total".into(), 3.0),
        (r#"coredns_cache_entries{type="success"}"#.into(), 1.0),
        (r#"coredns_cache_entries{type="denial"}"#.into(), 1.0),
        (
            format!(r#"coredns_forward_requests_total{{to="{u}"}}"#),
            5.0,
        ),
        (
            format!(
                r#"coredns_proxy_request_duration_seconds_count{{proxy_name="forward",to="{u}"}}"#
            ),
            2.0,
        ),
        ("coredns_forward_max_concurrent_rejects_total".into(), 0.0),
        // Every answered request, hits included (the 7 above).
        ("coredns_dns_request_duration_seconds_count".into(), 7.0),
        (
            r#"coredns_dns_request_duration_seconds_bucket{le="+Inf"}"#.into(),
            7.0,
        ),
        (
            format!(
                r#"coredns_build_info{{version="{}",revision="{}"}}"#,
                env!("CARGO_PKG_VERSION"),
                nodedns::config::GIT_COMMIT
            ),
            1.0,
        ),
    ];
    let mut wrong = Vec::new();
    for (series, want) in &compat {
        let got = sample(&read, series);
        if got != Some(*want) {
            wrong.push(format!("{series}: want {want}, got {got:?}"));
        }
    }
    // process_* from /proc: present and plausible (the values are the kernel's, not ours).
    for (series, min) in [
        ("process_resident_memory_bytes", 1e6),
        ("process_open_fds", 5.0),
        ("process_max_fds", 64.0),
        ("process_start_time_seconds", 1e9),
        ("process_cpu_seconds_total", 0.0),
    ] {
        match sample(&read, series) {
            Some(v) if v >= min => {}
            got => wrong.push(format!("{series}: want >= {min}, got {got:?}")),
        }
    }
    assert!(
        wrong.is_empty(),
        "{}\n--- parsed ---\n{read}",
        wrong.join("\n")
    );
    drop(node);
}

/// Small helper: spawn with stdin, write `input`, wait for output.
trait OutputWithStdin {
    fn output_with_stdin(&mut self, input: &str) -> Option<std::process::Output>;
}

impl OutputWithStdin for std::process::Command {
    fn output_with_stdin(&mut self, input: &str) -> Option<std::process::Output> {
        use std::io::Write;
        let mut child = self
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .ok()?;
        child.stdin.take()?.write_all(input.as_bytes()).ok()?;
        child.wait_with_output().ok()
    }
}

#[tokio::test]
async fn ready_follows_upstream_reachability() {
    let up = FakeUpstream::start().await;
    // The readiness probe asks upstream for `. NS`: unanswered at first.
    up.set_behavior(".", Behavior::Drop);
    let hport = free_port();
    let haddr: SocketAddr = format!("127.0.0.1:{hport}").parse().unwrap();
    // The cluster zone has its servers (no Service variable needed, which /ready would name).
    let cluster = format!("cluster.local={}", up.addr_str());
    let node = Nodedns::with_upstream(
        &up,
        &["--health-listen", &haddr.to_string(), "--forward", &cluster],
    )
    .await;
    let (status, body) = http_get(haddr, "/ready").await;
    assert_eq!(status, 503, "ready before any upstream answered: {body}");
    assert!(
        body.contains("upstream"),
        "503 body should name what is missing: {body}"
    );
    // Alive all the while: the listener answers.
    let (status, _) = http_get(haddr, "/health").await;
    assert_eq!(status, 200);

    up.set_behavior(".", Behavior::Normal);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = http_get(haddr, "/ready").await;
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never became ready: {body}\n{}",
            node.stderr_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _) = http_get(haddr, "/nope").await;
    assert_eq!(status, 404);
}

/// `coredns_forward_max_concurrent_rejects_total` counts exactly the forwards refused at
/// `--max-concurrent`.
#[tokio::test]
async fn max_concurrent_refusals_are_counted() {
    let up = FakeUpstream::start().await;
    up.set_behavior("slow.example", Behavior::Drop);
    let maddr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let node = Nodedns::with_upstream(
        &up,
        &[
            "--metrics-listen",
            &maddr.to_string(),
            "--max-concurrent",
            "1",
            "--query-deadline",
            "3s",
        ],
    )
    .await;
    let a = node.addr;
    // One forward holds the only slot (its upstream never answers) ...
    let held =
        tokio::spawn(async move { query_udp(a, "slow.example", RecordType::A, None, false).await });
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.queries("slow.example") == 0 {
        assert!(
            Instant::now() < deadline,
            "the first query never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ... so two other names are refused at once.
    for name in ["other1.example", "other2.example"] {
        let r = query_udp(a, name, RecordType::A, None, false).await;
        assert_eq!(r.metadata.response_code, ResponseCode::Refused, "{name}");
    }
    let (_, body) = http_get(maddr, "/metrics").await;
    assert_eq!(
        sample(&body, "coredns_forward_max_concurrent_rejects_total"),
        Some(2.0),
        "{body}"
    );
    assert_eq!(
        held.await.expect("join").metadata.response_code,
        ResponseCode::ServFail
    );
    drop(node);
}
