//! Warm restart end to end: `--cache-file` (or a Corefile's `cache { file PATH }`) written at stop
//! and read at start by the real binary.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hickory_proto::rr::RecordType;
use nix::sys::signal::Signal;

use crate::fake_upstream::FakeUpstream;
use crate::harness::{Nodedns, a_addrs, free_port, query_udp_retry, wait_until};

const NAMES: [&str; 3] = [
    "web.default.svc.cluster.local",
    "db.default.svc.cluster.local",
    "example.com",
];

fn file(label: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{label}-{}.cache", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

async fn fill_and_stop(up: &FakeUpstream, path: &Path, extra: &[&str]) {
    let mut args = vec!["--cache-file", path.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut node = Nodedns::with_upstream(up, &args).await;
    for n in NAMES {
        let r = query_udp_retry(node.addr, &format!("{n}."), RecordType::A).await;
        assert_eq!(a_addrs(&r).len(), 1);
    }
    node.signal(Signal::SIGTERM);
    let st = tokio::task::block_in_place(|| node.wait_exit(Duration::from_secs(10)));
    assert!(
        st.is_some_and(|s| s.success()),
        "{st:?}: {}",
        node.stderr_text()
    );
    assert!(path.exists(), "written at stop");
}

async fn upstream_with_names() -> FakeUpstream {
    let up = FakeUpstream::start().await;
    for (i, n) in NAMES.iter().enumerate() {
        up.set_a(n, Ipv4Addr::new(10, 0, 0, i as u8 + 1), 300);
    }
    up
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_names_survive_a_restart_without_upstream_queries() {
    let up = upstream_with_names().await;
    let path = file("warm");
    fill_and_stop(&up, &path, &[]).await;
    assert_eq!(up.queries(NAMES[0]), 1);

    let node = Nodedns::with_upstream(&up, &["--cache-file", path.to_str().unwrap()]).await;
    // The file is read in the background once the listeners answer.
    let loaded = wait_until(Duration::from_secs(5), || {
        node.stderr_text().contains("warm start")
    })
    .await;
    assert!(loaded, "{}", node.stderr_text());
    for (i, n) in NAMES.iter().enumerate() {
        let r = query_udp_retry(node.addr, &format!("{n}."), RecordType::A).await;
        assert_eq!(a_addrs(&r), vec![Ipv4Addr::new(10, 0, 0, i as u8 + 1)]);
        assert_eq!(up.queries(n), 1, "{n} answered from the file, not upstream");
    }
    let _ = std::fs::remove_file(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_or_foreign_cache_files_mean_one_warning_and_a_cold_start() {
    let up = upstream_with_names().await;
    let path = file("bad");
    fill_and_stop(&up, &path, &[]).await;
    let good = std::fs::read(&path).unwrap();
    let other_up = FakeUpstream::start().await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated", good[..good.len() / 2].to_vec()),
        (
            "random",
            (0..good.len()).map(|i| (i * 37 % 251) as u8).collect(),
        ),
        ("other-config", good.clone()),
    ];
    for (what, bytes) in cases {
        std::fs::write(&path, &bytes).unwrap();
        // "other-config": the same file read by a nodedns forwarding `.` elsewhere.
        let server = if what == "other-config" {
            &other_up
        } else {
            &up
        };
        for n in NAMES {
            server.set_a(n, Ipv4Addr::new(10, 0, 0, 9), 300);
        }
        let before = server.queries(NAMES[0]);
        let node = Nodedns::with_upstream(server, &["--cache-file", path.to_str().unwrap()]).await;
        let warned = wait_until(Duration::from_secs(5), || {
            node.stderr_text().contains("cache file ignored")
        })
        .await;
        assert!(warned, "{what}: {}", node.stderr_text());
        let warnings = node
            .stderr_text()
            .lines()
            .filter(|l| l.contains("cache file ignored"))
            .count();
        assert_eq!(warnings, 1, "{what}: one warning");
        let r = query_udp_retry(node.addr, &format!("{}.", NAMES[0]), RecordType::A).await;
        assert_eq!(a_addrs(&r).len(), 1);
        assert_eq!(
            server.queries(NAMES[0]),
            before + 1,
            "{what}: a cold start asks upstream"
        );
        drop(node);
    }
    let _ = std::fs::remove_file(&path);
}

/// The Corefile's nodedns-only `cache { file PATH INTERVAL }`, with no cache flag at all: the
/// interval is an hour, so the file the second start reads is the one written at SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corefile_cache_file_survives_a_restart_without_upstream_queries() {
    let up = upstream_with_names().await;
    let path = file("corefile-warm");
    let conf = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("corefile-warm-{}.Corefile", std::process::id()));
    let port = free_port();
    std::fs::write(
        &conf,
        format!(
            ".:{port} {{\n    cache 300 {{\n        file \"{}\" 1h\n    }}\n    forward . {}\n}}\n",
            path.display(),
            up.addr
        ),
    )
    .unwrap();
    let at = Some(format!("127.0.0.1:{port}").parse().unwrap());
    let args = vec!["--conf".to_string(), conf.display().to_string()];

    let mut node = Nodedns::start_env(at, &args, &[]).await;
    for n in NAMES {
        let r = query_udp_retry(node.addr, &format!("{n}."), RecordType::A).await;
        assert_eq!(a_addrs(&r).len(), 1);
    }
    assert!(
        !path.exists(),
        "not written before the interval or the stop"
    );
    node.signal(Signal::SIGTERM);
    let st = tokio::task::block_in_place(|| node.wait_exit(Duration::from_secs(10)));
    assert!(
        st.is_some_and(|s| s.success()),
        "{st:?}: {}",
        node.stderr_text()
    );
    assert!(path.exists(), "written at stop: {}", node.stderr_text());
    drop(node);
    assert_eq!(up.queries(NAMES[0]), 1);

    let node = Nodedns::start_env(at, &args, &[]).await;
    let loaded = wait_until(Duration::from_secs(5), || {
        node.stderr_text().contains("warm start")
    })
    .await;
    assert!(loaded, "{}", node.stderr_text());
    for (i, n) in NAMES.iter().enumerate() {
        let r = query_udp_retry(node.addr, &format!("{n}."), RecordType::A).await;
        assert_eq!(a_addrs(&r), vec![Ipv4Addr::new(10, 0, 0, i as u8 + 1)]);
        assert_eq!(up.queries(n), 1, "{n} answered from the file, not upstream");
    }
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&conf);
}

/// A file longer than this cache's budget could have written is not read (a load holds at most
/// the budget's worth besides the cache): one warning naming the reason, a cold start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_longer_than_the_cache_budget_is_not_read() {
    let up = upstream_with_names().await;
    let path = file("over-budget");
    fill_and_stop(&up, &path, &[]).await;
    let small = [
        "--cache-file",
        path.to_str().unwrap(),
        "--cache-bytes",
        "40",
        "--negative-cache-bytes",
        "40",
        "--cache-size",
        "1",
        "--negative-cache-size",
        "1",
    ];
    let node = Nodedns::with_upstream(&up, &small).await;
    let warned = wait_until(Duration::from_secs(5), || {
        node.stderr_text()
            .contains("longer than this cache's budget")
    })
    .await;
    assert!(warned, "{}", node.stderr_text());
    let _ = std::fs::remove_file(&path);
}

/// A surge rollout: B starts beside A on the same cache file. A's periodic write comes first,
/// then A learns one more name and writes again at its stop; B merges both, so it answers the
/// name A learned last without asking upstream. (Merging only the first change B saw lost A's
/// final write.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_instance_merges_every_write_of_the_old_one_in_its_first_minute() {
    let up = upstream_with_names().await;
    let path = file("surge");
    let p = path.to_str().unwrap();
    let mut a =
        Nodedns::with_upstream(&up, &["--cache-file", p, "--cache-file-interval", "1s"]).await;
    let r = query_udp_retry(a.addr, &format!("{}.", NAMES[0]), RecordType::A).await;
    assert_eq!(a_addrs(&r).len(), 1);
    // B never writes during the test (its own interval is an hour).
    let b = Nodedns::with_upstream(&up, &["--cache-file", p, "--cache-file-interval", "1h"]).await;
    let merges = |n: &Nodedns| {
        n.stderr_text()
            .matches("merged the previous instance")
            .count()
    };
    assert!(
        wait_until(Duration::from_secs(10), || merges(&b) >= 1).await,
        "B merged no periodic write of A: {}",
        b.stderr_text()
    );
    // A learns the last name, then stops (its final write).
    let r = query_udp_retry(a.addr, &format!("{}.", NAMES[2]), RecordType::A).await;
    assert_eq!(a_addrs(&r).len(), 1);
    let before = merges(&b);
    a.signal(Signal::SIGTERM);
    let st = tokio::task::block_in_place(|| a.wait_exit(Duration::from_secs(10)));
    assert!(st.is_some_and(|s| s.success()), "{}", a.stderr_text());
    assert!(
        wait_until(Duration::from_secs(10), || merges(&b) > before).await,
        "B did not merge A's final write: {}",
        b.stderr_text()
    );
    let asked = up.queries(NAMES[2]);
    let r = query_udp_retry(b.addr, &format!("{}.", NAMES[2]), RecordType::A).await;
    assert_eq!(a_addrs(&r).len(), 1);
    assert_eq!(
        up.queries(NAMES[2]),
        asked,
        "B asked upstream for a name A's final write had"
    );
}
