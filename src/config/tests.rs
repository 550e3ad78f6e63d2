use super::*;
use std::collections::HashMap;
use std::io::Write;

fn cli(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::try_parse_from(std::iter::once("nodedns").chain(args.iter().copied()))
}

fn no_env(_: &str) -> Option<String> {
    None
}

#[test]
fn durations_accept_units() {
    assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
    assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
    assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
    assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
    assert!(parse_duration("5x").is_err());
    assert!(parse_duration("").is_err());
    assert!(parse_duration("-1").is_err());
}

#[test]
fn booleans_in_every_style() {
    assert!(cli(&["--force-tcp"]).unwrap().force_tcp);
    assert!(cli(&["--force-tcp=true"]).unwrap().force_tcp);
    assert!(!cli(&["--force-tcp=false"]).unwrap().force_tcp);
    assert!(!cli(&["--setup-interface=false"]).unwrap().setup_interface);
    assert!(cli(&[]).unwrap().setup_interface);
    assert!(cli(&["--force-tcp=maybe"]).is_err());
}

#[test]
fn defaults_match_the_addon() {
    let c = cli(&["--upstream", "127.0.0.1"])
        .unwrap()
        .into_config(no_env)
        .unwrap();
    assert_eq!(c.listen, vec!["169.254.20.10:53".parse().unwrap()]);
    assert_eq!(c.zones[0].cache.max_ttl, Duration::from_secs(30));
    assert_eq!(c.zones[0].cache.max_negative_ttl, Duration::from_secs(5));
    assert_eq!(c.limits.positive_entries, 9984);
    assert_eq!(c.limits.negative_entries, 9984);
    assert_eq!(c.upstream.attempt_timeout, Duration::from_secs(2));
    assert_eq!(c.upstream.deadline, Duration::from_secs(5));
    assert_eq!(c.zones.len(), 1);
    assert_eq!(c.zones[0].name, ".");
    assert_eq!(c.zones[0].servers, vec!["127.0.0.1:53".parse().unwrap()]);
    assert_eq!(c.zones[0].transport, model::Transport::PreferUdp);
}

#[test]
fn bad_values_are_errors_not_panics() {
    assert!(cli(&["--listen", "nope"]).is_err());
    assert!(
        cli(&["--listen", "1.2.3.4"]).is_err(),
        "a listen address needs a port"
    );
    assert!(cli(&["--upstream", "1.2.3.4:99999"]).is_err());
    assert!(cli(&["--forward", "cluster.local"]).is_err());
    assert!(cli(&["--forward", "a..b=1.2.3.4"]).is_err());
    assert!(cli(&["--cache-size", "-1"]).is_err());
    assert!(cli(&["--no-such-flag"]).is_err());
    let e = cli(&["--upstream", "127.0.0.1", "--cache-size", "0"])
        .unwrap()
        .into_config(no_env);
    assert!(e.is_err());
}

#[test]
fn forward_and_servers_parse() {
    let z = parse_forward("Cluster.Local=10.96.0.10,10.96.0.11:5353,[::1]:53").unwrap();
    assert_eq!(z.zone, "cluster.local");
    assert_eq!(
        z.servers,
        vec![
            "10.96.0.10:53".parse().unwrap(),
            "10.96.0.11:5353".parse().unwrap(),
            "[::1]:53".parse().unwrap()
        ]
    );
    assert_eq!(
        parse_server("fd00::10").unwrap(),
        "[fd00::10]:53".parse().unwrap()
    );
}

#[test]
fn cluster_dns_from_service_env() {
    let env: HashMap<&str, &str> = [
        ("KUBE_DNS_UPSTREAM_SERVICE_HOST", "10.96.0.10"),
        ("KUBE_DNS_UPSTREAM_SERVICE_PORT", "53"),
    ]
    .into();
    let get = |k: &str| env.get(k).map(|v| v.to_string());
    let c = cli(&["--upstream", "127.0.0.1"])
        .unwrap()
        .into_config(get)
        .unwrap();
    let zones: Vec<_> = c
        .zones
        .iter()
        .map(|z| (z.name.as_str(), z.servers[0].to_string()))
        .collect();
    assert!(zones.contains(&("cluster.local", "10.96.0.10:53".into())));
    assert!(zones.contains(&("in-addr.arpa", "10.96.0.10:53".into())));
    assert!(zones.contains(&("ip6.arpa", "10.96.0.10:53".into())));
    let bad = |k: &str| (k == "KUBE_DNS_UPSTREAM_SERVICE_HOST").then(|| "not-an-ip".to_string());
    let e = cli(&["--upstream", "127.0.0.1"])
        .unwrap()
        .into_config(bad)
        .unwrap_err();
    assert!(
        e.to_string().contains("KUBE_DNS_UPSTREAM_SERVICE_HOST"),
        "{e}"
    );
}

#[test]
fn resolv_conf_gives_the_default_zone_without_ourselves() {
    let dir = std::env::temp_dir().join(format!("nodedns-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("resolv.conf");
    let mut f = std::fs::File::create(&path).unwrap();
    writeln!(f, "search default.svc.cluster.local\nnameserver 169.254.20.10\nnameserver 10.0.0.2\noptions ndots:5").unwrap();
    let p = path.to_str().unwrap();
    let c = cli(&["--resolv-conf", p, "--listen", "169.254.20.10:53"])
        .unwrap()
        .into_config(no_env)
        .unwrap();
    assert_eq!(c.zones[0].servers, vec!["10.0.0.2:53".parse().unwrap()]);
    std::fs::write(&path, "nameserver 169.254.20.10\n").unwrap();
    assert!(
        cli(&["--resolv-conf", p, "--listen", "169.254.20.10:53"])
            .unwrap()
            .into_config(no_env)
            .is_err()
    );
    std::fs::write(&path, "garbage\n").unwrap();
    assert!(
        cli(&["--resolv-conf", p])
            .unwrap()
            .into_config(no_env)
            .is_err()
    );
    let missing = dir.join("missing");
    assert!(
        cli(&["--resolv-conf", missing.to_str().unwrap()])
            .unwrap()
            .into_config(no_env)
            .is_err()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_later_flag_overrides_an_earlier_one_and_lists_accumulate() {
    let c = cli(&[
        "--metrics-listen",
        "off",
        "--metrics-listen",
        "127.0.0.1:9999",
        "--listen",
        "127.0.0.1:1",
        "--listen",
        "[::1]:1",
    ])
    .unwrap();
    assert_eq!(
        c.metrics_listen,
        OptionalAddr(Some("127.0.0.1:9999".parse().unwrap()))
    );
    assert_eq!(c.listen.len(), 2);
}

#[test]
fn resolv_conf_parsing() {
    let s = parse_resolv_conf(
        "# comment\nsearch a b\nnameserver 10.0.0.2 # trailing\nnameserver fd00::1\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\noptions ndots:5\n",
    )
    .unwrap();
    assert_eq!(
        s,
        vec![
            "10.0.0.2:53".parse::<SocketAddr>().unwrap(),
            "[fd00::1]:53".parse().unwrap()
        ]
    );
    assert!(
        parse_resolv_conf("nameserver nope\n")
            .unwrap_err()
            .contains("line 1")
    );
    assert!(parse_resolv_conf("search x\n").is_err());
    assert!(parse_resolv_conf("").is_err());
}

#[test]
fn log_levels_are_checked() {
    for ok in ["info", "WARN", "nodedns=debug,warn", "off", "a::b=trace"] {
        assert!(check_log_level(ok).is_ok(), "{ok}");
    }
    for bad in ["warning", "verbose", "nodedns=loud", ""] {
        assert!(check_log_level(bad).is_err(), "{bad}");
    }
}

#[test]
fn upstream_health_and_policy_flags_shape_flag_zones() {
    let c = cli(&["--upstream", "127.0.0.1"])
        .unwrap()
        .into_config(no_env)
        .unwrap();
    let z = &c.zones[0];
    assert_eq!(
        z.policy,
        Policy::Fastest,
        "flag-built zones default to fastest"
    );
    assert_eq!(z.forward.max_fails, 2);
    assert_eq!(z.forward.health_check, Duration::from_millis(500));
    assert_eq!(c.upstream.tcp_pool_size, 2);
    let c = cli(&[
        "--upstream",
        "127.0.0.1",
        "--upstream-policy",
        "sequential",
        "--max-fails",
        "0",
        "--health-check",
        "2s",
        "--tcp-pool-size",
        "4",
    ])
    .unwrap()
    .into_config(no_env)
    .unwrap();
    let z = &c.zones[0];
    assert_eq!(z.policy, Policy::Sequential);
    assert_eq!(z.forward.max_fails, 0);
    assert_eq!(z.forward.health_check, Duration::from_secs(2));
    assert_eq!(c.upstream.tcp_pool_size, 4);
    assert!(cli(&["--upstream-policy", "quickest"]).is_err());
    for bad in [&["--tcp-pool-size", "0"][..], &["--health-check", "1ms"]] {
        let mut args = vec!["--upstream", "127.0.0.1"];
        args.extend_from_slice(bad);
        assert!(cli(&args).unwrap().into_config(no_env).is_err(), "{bad:?}");
    }
}
