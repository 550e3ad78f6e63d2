//! Client TCP slots: idle and slow-loris connections cannot lock TCP clients out, and descriptors
//! return to their baseline.

use std::net::Ipv4Addr;
use std::time::Duration;

use hickory_proto::rr::RecordType;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::fake_upstream::FakeUpstream;
use crate::harness::{Nodedns, a_addrs, build_query, query_udp, read_frame, wait_until};

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// One query over a fresh TCP connection, with a hang bound; the answer's addresses.
async fn tcp_query(addr: std::net::SocketAddr, name: &str) -> Option<Vec<Ipv4Addr>> {
    let q = build_query(name, RecordType::A, None, false)
        .to_vec()
        .ok()?;
    let mut s = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    s.write_all(&framed).await.ok()?;
    let reply = tokio::time::timeout(Duration::from_secs(3), read_frame(&mut s))
        .await
        .ok()??;
    let m = hickory_proto::op::Message::from_vec(&reply).ok()?;
    Some(a_addrs(&m))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_trickling_connections_cannot_lock_out_tcp_clients() {
    let up = FakeUpstream::start().await;
    up.set_a("tcp.example", Ipv4Addr::new(10, 2, 2, 2), 300);
    let node = Nodedns::with_upstream(
        &up,
        &["--max-tcp-connections", "8", "--tcp-idle-timeout", "30s"],
    )
    .await;
    // The one miss first, over UDP (no client connection to wait out): its upstream socket is
    // reused (kept for its `expire`), so it is part of the baseline, not a leak.
    let m = query_udp(node.addr, "tcp.example.", RecordType::A, None, false).await;
    assert_eq!(a_addrs(&m), vec![Ipv4Addr::new(10, 2, 2, 2)]);
    let baseline = fds(node.pid());

    for (round, partial) in [(0, false), (1, true)] {
        // Eight connections take every slot: silent ones, then (round 1) slow-loris ones that sent
        // half a length prefix.
        let mut hogs = Vec::new();
        for _ in 0..8 {
            let mut s = TcpStream::connect(node.addr).await.unwrap();
            if partial {
                s.write_all(&[0]).await.unwrap();
            }
            hogs.push(s);
        }
        let all_in = wait_until(Duration::from_secs(5), || fds(node.pid()) >= baseline + 8).await;
        assert!(all_in, "round {round}: the hogs are connected");
        // A new client is still served (the longest-idle hog makes room), several times over.
        for i in 0..3 {
            let got = tcp_query(node.addr, "tcp.example.").await;
            assert_eq!(
                got,
                Some(vec![Ipv4Addr::new(10, 2, 2, 2)]),
                "round {round}, client {i}"
            );
        }
        drop(hogs);
    }
    // Every connection closed: back to the descriptor baseline.
    let back = wait_until(Duration::from_secs(5), || fds(node.pid()) <= baseline).await;
    assert!(
        back,
        "descriptors: {} now, {baseline} before",
        fds(node.pid())
    );
}
