//! Stopping and signals: SIGTERM with misses in flight, SIGQUIT, reload signals.

use std::time::Duration;

use hickory_proto::rr::RecordType;
use nix::sys::signal::Signal;

use crate::fake_upstream::{Behavior, FakeUpstream};
use crate::harness::{Nodedns, build_query_id, private_addr, query_udp};

/// SIGTERM while UDP misses are in flight to a slow upstream: the process exits (misses finish
/// within the upstream delay), instead of a worker spinning on its shut socket forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_misses_in_flight_exits() {
    let up = FakeUpstream::start().await;
    up.set_default_behavior(Behavior::Delay(300));
    let mut node = Nodedns::with_upstream(&up, &["--workers", "2"]).await;
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // A bounded burst of distinct names: every one a miss, all in flight at once.
    for i in 0..400u16 {
        let q = build_query_id(i, &format!("miss-{i}.example."), RecordType::A, None, false)
            .to_vec()
            .unwrap();
        let _ = sock.send_to(&q, node.addr).await;
    }
    // Wait until the upstream has seen misses from the burst (they are in flight now).
    let seen =
        crate::harness::wait_until(Duration::from_secs(5), || up.total_queries() >= 50).await;
    assert!(seen, "the misses reached the upstream");
    node.signal(Signal::SIGTERM);
    let st = tokio::task::block_in_place(|| node.wait_exit(Duration::from_secs(10)));
    assert!(
        st.is_some(),
        "nodedns did not exit within 10 s of SIGTERM with misses in flight; stderr:\n{}",
        node.stderr_text()
    );
    assert!(st.is_some_and(|s| s.success()), "clean exit: {st:?}");
}

/// SIGQUIT stops nodedns like SIGTERM (exit 0 after its own shutdown), not with the default
/// action, which would leave its link and rules on the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigquit_stops_cleanly() {
    let up = FakeUpstream::start().await;
    up.set_a("q.example", "10.0.0.1".parse().unwrap(), 60);
    let mut node = Nodedns::with_upstream(&up, &[]).await;
    let r = query_udp(node.addr, "q.example.", RecordType::A, None, false).await;
    assert_eq!(r.answers.len(), 1);
    node.signal(Signal::SIGQUIT);
    let st = tokio::task::block_in_place(|| node.wait_exit(Duration::from_secs(10)));
    assert!(
        st.is_some_and(|s| s.success()),
        "SIGQUIT: clean exit expected, got {st:?}; stderr:\n{}",
        node.stderr_text()
    );
    assert!(
        node.stderr_text().contains("shutting down"),
        "{}",
        node.stderr_text()
    );
}

/// User plus system CPU time of `pid` so far, in clock ticks (`/proc/PID/stat` fields 14 and 15);
/// `None` once the process is gone.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// What became of one query of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Answered,
    /// ICMP port unreachable: it arrived after the last socket had closed.
    Refused,
    Lost,
    Wrong,
}

/// One query on its own connected socket: answered (checked against `expect_rcode` and the
/// question), refused (nothing bound any more), or lost (no reply within `wait`).
async fn one_query(
    to: std::net::SocketAddr,
    id: u16,
    name: String,
    expect_rcode: hickory_proto::op::ResponseCode,
    wait: Duration,
) -> Fate {
    let Ok(sock) = tokio::net::UdpSocket::bind("127.0.0.1:0").await else {
        return Fate::Lost;
    };
    if sock.connect(to).await.is_err() {
        return Fate::Lost;
    }
    let Ok(q) = build_query_id(id, &name, RecordType::A, None, false).to_vec() else {
        return Fate::Wrong;
    };
    if let Err(e) = sock.send(&q).await {
        return if e.kind() == std::io::ErrorKind::ConnectionRefused {
            Fate::Refused
        } else {
            Fate::Lost
        };
    }
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(wait, sock.recv(&mut buf)).await {
        Err(_) => Fate::Lost,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Fate::Refused,
        Ok(Err(_)) => Fate::Lost,
        Ok(Ok(n)) => match hickory_proto::op::Message::from_vec(&buf[..n]) {
            Ok(m)
                if m.metadata.id == id
                    && m.metadata.response_code == expect_rcode
                    && m.queries
                        .first()
                        .map(|q| q.name().to_ascii().to_lowercase())
                        == Some(name.to_lowercase()) =>
            {
                Fate::Answered
            }
            _ => Fate::Wrong,
        },
    }
}

/// SIGTERM during a bounded stream of misses to a slow upstream (300 ms each): nodedns keeps
/// serving through its grace, then drains: every query that reached it is answered, those sent
/// after its sockets closed meet a closed port (ICMP unreachable), none meets silence; it exits
/// within grace + query deadline, and no thread spins meanwhile.
///
/// Before the drain, a stop left each socket open but unread while its misses finished, and the
/// stream's queries that arrived then were silently lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_a_stream_of_slow_misses() {
    use hickory_proto::op::ResponseCode;
    let up = FakeUpstream::start().await;
    up.set_default_behavior(Behavior::Delay(300));
    up.set_a("hot.example", "10.0.0.7".parse().unwrap(), 300);
    up.set_behavior("hot.example", Behavior::Normal);
    let (grace, deadline) = (Duration::from_millis(300), Duration::from_secs(4));
    // Its own loopback IP: once its port closes, no other test's nodedns can be given it.
    let args: Vec<String> = [
        "--upstream",
        &up.addr_str(),
        "--workers",
        "2",
        "--shutdown-grace",
        "300ms",
        "--query-deadline",
        "4s",
        "--attempt-timeout",
        "2s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut node = Nodedns::start_env(Some(private_addr()), &args, &[]).await;
    let addr = node.addr;
    let warm = query_udp(addr, "hot.example.", RecordType::A, None, false).await;
    assert_eq!(warm.answers.len(), 1);

    // The stream: 240 misses, one every 5 ms (bounded: 240 queries, ~1.2 s). SIGTERM after the
    // 40th, so the stream runs on through the grace and the drain.
    let mut tasks = Vec::new();
    let mut cpu_at_term = None;
    for i in 0..240u16 {
        let name = format!("slow-{i}.example.");
        tasks.push(tokio::spawn(one_query(
            addr,
            i,
            name,
            ResponseCode::NXDomain,
            Duration::from_secs(8),
        )));
        if i == 40 {
            cpu_at_term = cpu_ticks(node.pid());
            node.signal(Signal::SIGTERM);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut stream = Vec::new();
    for t in tasks {
        stream.push(t.await.unwrap_or(Fate::Lost));
    }
    // Then hits, one at a time, until one meets the closed port (bounded: 500 × 10 ms): they
    // cost no upstream time, so the drain ends and the sockets close while they come.
    let mut late = Vec::new();
    for i in 0..500u16 {
        let f = one_query(
            addr,
            1000 + i,
            "hot.example.".into(),
            ResponseCode::NoError,
            Duration::from_secs(3),
        )
        .await;
        late.push(f);
        if f != Fate::Answered {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut cpu_before_exit = cpu_at_term;
    let limit = grace + deadline + Duration::from_secs(2);
    let exited = tokio::task::block_in_place(|| {
        let start = std::time::Instant::now();
        loop {
            if let Some(c) = cpu_ticks(node.pid()) {
                cpu_before_exit = Some(c);
            }
            if !node.is_running() {
                return true;
            }
            if start.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let stderr = node.stderr_text();
    assert!(exited, "no exit within grace + deadline + 2 s:\n{stderr}");
    let count = |v: &[Fate], f: Fate| v.iter().filter(|x| **x == f).count();
    assert_eq!(
        count(&stream, Fate::Lost),
        0,
        "stream queries lost: {stream:?}\n{stderr}"
    );
    assert_eq!(count(&stream, Fate::Wrong), 0, "wrong answers: {stream:?}");
    assert_eq!(
        count(&late, Fate::Lost) + count(&late, Fate::Wrong),
        0,
        "late: {late:?}\n{stderr}"
    );
    assert_eq!(
        late.last(),
        Some(&Fate::Refused),
        "the sockets must close once drained: {late:?}"
    );
    // At least the 40 before the SIGTERM and those in the grace were answered.
    assert!(count(&stream, Fate::Answered) >= 41, "{stream:?}");
    // A spinning thread would burn CPU for the whole drain (seconds); serving this costs little.
    let hz = 100; // USER_HZ is 100 on Linux
    if let (Some(a), Some(b)) = (cpu_at_term, cpu_before_exit) {
        assert!(
            b.saturating_sub(a) < hz,
            "nodedns used {} ticks of CPU between SIGTERM and exit: a thread spins?\n{stderr}",
            b - a
        );
    }
}

/// Lameduck: from SIGTERM on `/ready` is 503 "draining" while DNS is still answered for the
/// grace; then nodedns exits by itself. Before the drain existed `/ready` stayed 200 until the
/// process was gone, and DNS stopped at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_ready_to_draining_and_serves_through_the_grace() {
    let up = FakeUpstream::start().await;
    up.set_a("q.example", "10.0.0.1".parse().unwrap(), 60);
    let http: std::net::SocketAddr = format!("127.0.0.1:{}", crate::harness::free_port())
        .parse()
        .unwrap();
    let http_s = http.to_string();
    // The cluster zone forwarded explicitly: without it (and without the Service variables)
    // `/ready` says the cluster DNS is missing.
    let cluster = format!("cluster.local={}", up.addr_str());
    let mut node = Nodedns::with_upstream(
        &up,
        &[
            "--health-listen",
            &http_s,
            "--shutdown-grace",
            "5s",
            "--forward",
            &cluster,
        ],
    )
    .await;
    // Ready first (an upstream answered once the probe ran, or through this query).
    let r = query_udp(node.addr, "q.example.", RecordType::A, None, false).await;
    assert_eq!(r.answers.len(), 1);
    let mut status = 0;
    for _ in 0..100 {
        status = crate::metrics_e2e::http_get(http, "/ready").await.0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 200, "ready before the stop");
    node.signal(Signal::SIGTERM);
    assert!(
        crate::harness::wait_until(Duration::from_secs(2), || node
            .stderr_text()
            .contains("draining"))
        .await,
        "{}",
        node.stderr_text()
    );
    let (status, body) = crate::metrics_e2e::http_get(http, "/ready").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("draining"), "{body}");
    // Still serving: a hit and a miss.
    let r = query_udp(node.addr, "q.example.", RecordType::A, None, false).await;
    assert_eq!(r.answers.len(), 1, "a hit during the grace");
    up.set_a("new.example", "10.0.0.2".parse().unwrap(), 60);
    let r = query_udp(node.addr, "new.example.", RecordType::A, None, false).await;
    assert_eq!(r.answers.len(), 1, "a miss during the grace");
    assert!(
        !node.stderr_text().contains("shutting down"),
        "the grace is not over yet: {}",
        node.stderr_text()
    );
    let st = tokio::task::block_in_place(|| node.wait_exit(Duration::from_secs(15)));
    assert!(
        st.is_some_and(|s| s.success()),
        "{st:?}: {}",
        node.stderr_text()
    );
}
