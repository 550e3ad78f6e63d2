//! The command line: bad input exits 2 with one clear line; `--help` documents every flag.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{bin, free_port, safety_args};

/// Runs the binary with `args` and waits (bounded, 10 s) for it to exit.
fn run(args: &[&str]) -> Output {
    run_env(args, &[])
}

fn run_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut child = Command::new(bin())
        .args(args)
        .env_remove("KUBE_DNS_UPSTREAM_SERVICE_HOST")
        .env_remove("KUBE_DNS_UPSTREAM_SERVICE_PORT")
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
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
fn assert_usage_error(args: &[&str]) -> String {
    assert_usage_error_env(args, &[])
}

/// [`assert_usage_error`] with extra environment variables; returns the one stderr line.
fn assert_usage_error_env(args: &[&str], env: &[(&str, &str)]) -> String {
    let listen = format!("127.0.0.1:{}", free_port());
    let mut full: Vec<&str> = safety_args();
    if !args.contains(&"--listen") {
        full.extend(["--listen", &listen]);
    }
    full.extend_from_slice(args);
    let out = run_env(&full, env);
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
    lines[0].to_string()
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
fn unknown_log_level_exits_2_naming_the_levels() {
    // `warning` was taken as a target filter: every line, errors included, silently off.
    let line = assert_usage_error(&["--upstream", UP, "--log-level", "warning"]);
    assert!(line.contains("warn, info"), "{line}");
    assert_usage_error(&["--upstream", UP, "--log-level", "nodedns=loud"]);
}

#[test]
fn port_zero_upstreams_exit_2() {
    assert_usage_error(&["--upstream", "127.0.0.1:0"]);
    assert_usage_error(&["--upstream", UP, "--forward", "cluster.local=127.0.0.1:0"]);
    // A Service port of 0 in the environment is a /ready 503 naming it (tests/integration/deploy.rs),
    // not a failed start; in --upstream-svc's IP list it is bad input.
    assert_usage_error(&["--upstream", UP, "--upstream-svc", "127.0.0.1:0"]);
}

#[test]
fn addon_flags_exit_2_on_bad_values() {
    // Unknown in either style, never help (-health-port is no -h).
    let line = assert_usage_error(&["--upstream", UP, "-bogus", "1"]);
    assert!(line.contains("bogus"), "{line}");
    assert_usage_error(&["--upstream", UP, "--bogus"]);
    assert_usage_error(&["--upstream", UP, "-health-port", "0"]);
    assert_usage_error(&["--upstream", UP, "-health-port=x"]);
    assert_usage_error(&["--upstream", UP, "-localip", "169.254.20.10,nope"]);
    assert_usage_error(&["--upstream", UP, "-dns.port", "70000"]);
    assert_usage_error(&["--upstream", UP, "-syncinterval", "1m3"]);
    assert_usage_error(&["--upstream", UP, "-setupiptables=maybe"]);
    assert_usage_error(&["--upstream", UP, "-metrics-listen-address", "nowhere"]);
    // Two spellings of one setting that disagree.
    let line = assert_usage_error(&[
        "--upstream",
        UP,
        "-setupiptables=false",
        "--firewall",
        "iptables",
    ]);
    assert!(line.contains("setupiptables"), "{line}");
}

#[test]
fn version_names_the_commit() {
    for flag in ["-version", "--version"] {
        let out = run(&[flag]);
        assert_eq!(out.status.code(), Some(0), "{flag}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.starts_with("nodedns 0.") && text.contains("(commit "),
            "{flag}: {text}"
        );
    }
}

#[test]
fn bad_cluster_domain_exits_2() {
    assert_usage_error_env(
        &["--upstream", UP, "--cluster-domain", "a..b"],
        &[("KUBE_DNS_UPSTREAM_SERVICE_HOST", "127.0.0.1")],
    );
}

#[test]
fn garbage_resolv_conf_is_one_line_naming_it() {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("garbage-resolv.conf");
    std::fs::write(&path, "nameserver not-an-ip\n\x01\x02 garbage\n").unwrap();
    let p = path.to_string_lossy().into_owned();
    // safety_args' own --resolv-conf comes first; this later one wins.
    let line = assert_usage_error(&["--resolv-conf", &p]);
    assert!(
        line.contains("garbage-resolv.conf") && line.contains("line 1"),
        "{line}"
    );
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

#[test]
fn check_config_prints_the_effective_configuration_or_names_the_line() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let good = dir.join("check-good.Corefile");
    std::fs::write(
        &good,
        ".:53 {\n    cache 30\n    bind 127.0.0.1\n    forward . 127.0.0.1:5399 {\n        policy sequential\n    }\n}\n",
    )
    .unwrap();
    let out = run(&["check-config", good.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(r#"servers = ["127.0.0.1:5399"]"#),
        "{stdout}"
    );
    assert!(stdout.contains(r#"policy = "sequential""#), "{stdout}");
    let bad = dir.join("check-bad.Corefile");
    std::fs::write(
        &bad,
        ".:53 {\n    cache 30\n    frobnicate\n    forward . 127.0.0.1\n}\n",
    )
    .unwrap();
    let out = run(&["check-config", bad.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("check-bad.Corefile:3") && stderr.contains("frobnicate"),
        "{stderr}"
    );
    // TOML too.
    let toml = dir.join("check.toml");
    std::fs::write(
        &toml,
        "[[zone]]\nname = \".\"\nservers = [\"127.0.0.1:5399\"]\nbogus = 1\n",
    )
    .unwrap();
    let out = run(&["check-config", toml.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("check.toml:4"), "{stderr}");
}

#[test]
fn a_file_and_a_contradicting_flag_exit_2() {
    let conf = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("contra.Corefile");
    std::fs::write(&conf, ".:53 {\n    forward . 127.0.0.1:5399\n}\n").unwrap();
    let line = assert_usage_error(&["--conf", conf.to_str().unwrap(), "--upstream", UP]);
    assert!(line.contains("--upstream conflicts with --conf"), "{line}");
    // Go-style single-dash flags, as the addon's DaemonSet passes them, and no `-h` read out of an
    // unknown one.
    let line = assert_usage_error(&["-conf", conf.to_str().unwrap(), "-health-port", "9254"]);
    assert!(line.contains("health-port"), "{line}");
}
