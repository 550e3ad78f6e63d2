//! Configuration files end to end: the addon's Corefile template with the Service variables and a
//! kube-dns ConfigMap directory, reloaded the way the kubelet updates a ConfigMap volume.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use nix::sys::signal::Signal;

use crate::fake_upstream::FakeUpstream;
use crate::harness::{Nodedns, query_udp_retry, wait_until};

fn tmpdir(label: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes a ConfigMap volume the way the kubelet does: the data in a fresh `..TIMESTAMP` directory,
/// `..data` swapped to it by rename, each key a symlink through `..data`.
fn write_configmap(dir: &Path, version: u32, files: &[(&str, &str)]) {
    let v = dir.join(format!("..v{version}"));
    std::fs::create_dir_all(&v).unwrap();
    for (k, text) in files {
        std::fs::write(v.join(k), text).unwrap();
        let link = dir.join(k);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{k}"), &link).unwrap();
        }
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..v{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
}

/// The addon's template (its structure; the port is the test's).
fn template(port: u16) -> String {
    format!(
        "cluster.local:{port} {{
    errors
    cache {{
        success 9984 30
        denial 9984 5
    }}
    reload
    loop
    bind __PILLAR__LOCAL__DNS__ __PILLAR__DNS__SERVER__
    forward . __PILLAR__CLUSTER__DNS__ {{
        force_tcp
    }}
    prometheus :9253
}}
.:{port} {{
    errors
    cache 30
    reload
    loop
    bind __PILLAR__LOCAL__DNS__ __PILLAR__DNS__SERVER__
    forward . __PILLAR__UPSTREAM__SERVERS__
    prometheus :9253
}}
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addon_template_with_kube_dns_configmap_reloads_while_serving() {
    let cluster = FakeUpstream::start().await;
    let default_a = FakeUpstream::start().await;
    let default_b = FakeUpstream::start().await;
    cluster.set_a(
        "web.default.svc.cluster.local",
        "10.1.0.1".parse().unwrap(),
        300,
    );
    for up in [&default_a, &default_b] {
        up.set_a("example.com", "93.184.216.34".parse().unwrap(), 300);
        for i in 0..50 {
            up.set_a(
                &format!("n{i}.example.org"),
                "10.9.9.9".parse().unwrap(),
                300,
            );
        }
    }
    let dir = tmpdir("cfg-e2e");
    let port = crate::harness::free_port();
    let base = dir.join("Corefile.base");
    std::fs::write(&base, template(port)).unwrap();
    let cm = dir.join("kube-dns");
    std::fs::create_dir_all(&cm).unwrap();
    write_configmap(
        &cm,
        1,
        &[("upstreamNameservers", &format!(r#"["{}"]"#, default_a.addr))],
    );
    let args: Vec<String> = [
        "--conf",
        dir.join("Corefile").to_str().unwrap(),
        "--basecorefile",
        base.to_str().unwrap(),
        "--kubednscm",
        cm.to_str().unwrap(),
        "--reload-interval",
        "200ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let cport = cluster.addr.port().to_string();
    let mut node = Nodedns::start_env(
        Some(format!("127.0.0.1:{port}").parse().unwrap()),
        &args,
        &[
            ("KUBE_DNS_UPSTREAM_SERVICE_HOST", "127.0.0.1"),
            ("KUBE_DNS_UPSTREAM_SERVICE_PORT", cport.as_str()),
        ],
    )
    .await;
    assert_eq!(node.port(), port, "served on the template's port");

    // Cluster names go to the cluster DNS over TCP (force_tcp), others to the ConfigMap's
    // upstream over UDP (custom upstreams drop force_tcp, as node-cache does).
    let r = query_udp_retry(node.addr, "web.default.svc.cluster.local.", RecordType::A).await;
    assert_eq!(r.answers.len(), 1, "{r:?}");
    assert_eq!(cluster.tcp_queries_for("web.default.svc.cluster.local"), 1);
    assert_eq!(cluster.udp_queries(), 0);
    let r = query_udp_retry(node.addr, "example.com.", RecordType::A).await;
    assert_eq!(r.answers.len(), 1);
    assert_eq!(default_a.queries("example.com"), 1);
    assert!(default_a.udp_queries() >= 1 && default_a.tcp_queries() == 0);

    // A steady, bounded stream of cached queries runs across the reloads; none may fail.
    let addr = node.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicUsize::new(0));
    let stream = {
        let (stop, failures, sent) = (stop.clone(), failures.clone(), sent.clone());
        tokio::spawn(async move {
            for _ in 0..2000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let r = query_udp_retry(addr, "example.com.", RecordType::A).await;
                sent.fetch_add(1, Ordering::Relaxed);
                if r.response_code != ResponseCode::NoError || r.answers.len() != 1 {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    // The kubelet swaps the ConfigMap: `.` now goes to B, within a poll interval or so.
    write_configmap(
        &cm,
        2,
        &[("upstreamNameservers", &format!(r#"["{}"]"#, default_b.addr))],
    );
    let mut i = 0;
    let moved = wait_until(Duration::from_secs(10), || {
        i += 1;
        let name = format!("n{}.example.org.", i % 50);
        let a = tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(query_udp_retry(addr, &name, RecordType::A))
        });
        a.answers.len() == 1 && default_b.total_queries() > 0
    })
    .await;
    assert!(
        moved,
        "after the ConfigMap swap new names go to B; stderr:\n{}",
        node.stderr_text()
    );
    // The name cached before the reload is still answered from cache: no new upstream query.
    let before = default_a.queries("example.com") + default_b.queries("example.com");
    let r = query_udp_retry(node.addr, "example.com.", RecordType::A).await;
    assert_eq!(r.answers.len(), 1);
    assert_eq!(
        default_a.queries("example.com") + default_b.queries("example.com"),
        before
    );

    // A broken ConfigMap: the running configuration keeps serving, the error names the key.
    write_configmap(&cm, 3, &[("upstreamNameservers", r#"["not-an-ip"]"#)]);
    let logged = wait_until(Duration::from_secs(10), || {
        node.stderr_text().contains("reload failed")
    })
    .await;
    assert!(logged, "{}", node.stderr_text());
    let err_line = node
        .stderr_text()
        .lines()
        .find(|l| l.contains("reload failed"))
        .unwrap_or_default()
        .to_string();
    assert!(err_line.contains("upstreamNameservers"), "{err_line}");
    let r = query_udp_retry(node.addr, "n1.example.org.", RecordType::A).await;
    assert_eq!(
        r.answers.len(),
        1,
        "still served by the last good configuration"
    );

    // The ConfigMap fixed, the template broken: the error names the template's file and line
    // (line 18: `bogus_plugin` after the `.` block's `cache 30`).
    write_configmap(
        &cm,
        4,
        &[("upstreamNameservers", &format!(r#"["{}"]"#, default_a.addr))],
    );
    std::fs::write(
        &base,
        template(port).replace("cache 30", "cache 30\n    bogus_plugin"),
    )
    .unwrap();
    let named = wait_until(Duration::from_secs(10), || {
        node.stderr_text().contains("Corefile.base:18")
    })
    .await;
    assert!(named, "{}", node.stderr_text());
    assert!(
        node.stderr_text().contains("bogus_plugin"),
        "{}",
        node.stderr_text()
    );
    let r = query_udp_retry(node.addr, "n2.example.org.", RecordType::A).await;
    assert_eq!(
        r.answers.len(),
        1,
        "still served by the last good configuration"
    );

    // Fixed again, then SIGHUP and SIGUSR1 reload at once.
    std::fs::write(&base, template(port)).unwrap();
    for (sig, word) in [(Signal::SIGHUP, "SIGHUP"), (Signal::SIGUSR1, "SIGUSR1")] {
        node.signal(sig);
        let ok = wait_until(Duration::from_secs(10), || {
            node.stderr_text()
                .lines()
                .any(|l| l.contains("configuration reloaded") && l.contains(word))
        })
        .await;
        assert!(ok, "{word}: {}", node.stderr_text());
        assert!(node.is_running());
    }

    stop.store(true, Ordering::Relaxed);
    let _ = stream.await;
    assert!(sent.load(Ordering::Relaxed) > 0);
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "a query failed during the reloads"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
