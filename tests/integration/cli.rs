//! The command line: bad input exits 2 with one clear line; `--help` documents every flag.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{bin, free_port, safety_args};

/// Runs the binary with `args` and waits (bounded, 10 s) for it to exit.
fn run(args: &[&str]) -> Output {
    let mut child = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn nodedns");
    let start = Instant::now();
    loop {
        match child.try_wait().expect("try_wait") {
            Some(_) => return child.wait_with_output().expect("output"),
            None if start.elapsed() > Duration::from_secs(10) => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("output");
                panic!(
                    "nodedns {args:?} did not exit within 10 s; stderr:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Runs the binary with `args` (plus the safety flags and, unless `args` has one, a loopback
/// `--listen`, so that a wrongly accepted command line cannot touch the host) and checks that it
/// fails as a usage error.
fn assert_usage_error(args: &[&str]) {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut full: Vec<&str> = safety_args();
    if !args.contains(&"--listen") {
        full.extend(["--listen", &listen]);
    }
    full.extend_from_slice(args);
    let out = run(&full);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "nodedns {args:?}: exit code 2 expected, got {:?}; stderr:\n{stderr}",
        out.status
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "nodedns {args:?}: exactly one line on stderr expected, got {}:\n{stderr}",
        lines.len()
    );
}

const UP: &str = "127.0.0.1:5399";

#[test]
fn unknown_flag_exits_2_with_one_line() {
    assert_usage_error(&["--no-such-flag", "--upstream", UP]);
}

#[test]
fn bad_listen_address_exits_2() {
    assert_usage_error(&["--listen", "not-an-address", "--upstream", UP]);
    assert_usage_error(&["--listen", "127.0.0.1:99999", "--upstream", UP]);
}

#[test]
fn bad_upstream_address_exits_2() {
    assert_usage_error(&["--upstream", "300.1.1.1:53"]);
    assert_usage_error(&["--upstream", "127.0.0.1:port"]);
}

#[test]
fn bad_forward_exits_2() {
    assert_usage_error(&["--upstream", UP, "--forward", "cluster.local"]);
    assert_usage_error(&["--upstream", UP, "--forward", "cluster.local=nope"]);
}

#[test]
fn bad_duration_exits_2() {
    assert_usage_error(&["--upstream", UP, "--max-ttl", "five"]);
    assert_usage_error(&["--upstream", UP, "--attempt-timeout", "5parsecs"]);
}

#[test]
fn bad_number_exits_2() {
    assert_usage_error(&["--upstream", UP, "--cache-size", "-1"]);
    assert_usage_error(&["--upstream", UP, "--cache-size", "lots"]);
}

#[test]
fn help_lists_every_flag() {
    let out = run(&["--help"]);
    assert_eq!(out.status.code(), Some(0), "--help exits 0");
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--upstream",
        "--forward",
        "--min-ttl",
        "--max-ttl",
        "--max-negative-ttl",
        "--servfail-ttl",
        "--force-tcp",
        "--attempt-timeout",
        "--query-deadline",
        "--cache-size",
        "--negative-cache-size",
        "--cache-bytes",
        "--log-level",
    ] {
        assert!(
            help.contains(flag),
            "--help does not mention {flag}:\n{help}"
        );
    }
    for default in ["30s", "5s", "2s", "9984"] {
        assert!(
            help.contains(default),
            "--help does not show the default {default}:\n{help}"
        );
    }
}
