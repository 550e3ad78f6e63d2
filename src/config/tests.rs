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
    // Malformed: served from the default zone, and /ready names the variable.
    let c = cli(&["--upstream", "127.0.0.1"])
        .unwrap()
        .into_config(bad)
        .unwrap();
    assert_eq!(c.zones.len(), 1);
    assert!(
        c.not_ready[0].contains("KUBE_DNS_UPSTREAM_SERVICE_HOST=\"not-an-ip\""),
        "{:?}",
        c.not_ready
    );
    // Missing: the same, unless --forward covers the cluster domain.
    let c = cli(&["--upstream", "127.0.0.1"])
        .unwrap()
        .into_config(no_env)
        .unwrap();
    assert!(c.not_ready[0].contains("KUBE_DNS_UPSTREAM_SERVICE_HOST is not set"));
    let c = cli(&[
        "--upstream",
        "127.0.0.1",
        "--forward",
        "cluster.local=10.0.0.1",
    ])
    .unwrap()
    .into_config(no_env)
    .unwrap();
    assert!(c.not_ready.is_empty(), "{:?}", c.not_ready);
}

fn go(args: &[&str]) -> Result<Cli, clap::Error> {
    Cli::parse_args(
        std::iter::once("nodedns")
            .chain(args.iter().copied())
            .map(String::from),
    )
}

#[test]
fn the_addons_flags_map_onto_nodedns_flags() {
    let c = go(&[
        "-localip",
        "169.254.20.10,fd00::10",
        "-dns.port=5353",
        "-upstreamsvc",
        "10.0.0.10,10.0.0.11:5300",
        "-setupinterface=false",
        "-setupiptables=false",
        "-skipteardown",
        "-interfacename",
        "nld0",
        "-syncinterval",
        "90",
        "-health-port",
        "9099",
        "-prometheus-listen-address",
        ":9254",
        "-metrics-listen-address=127.0.0.1:9354",
        "-pidfile",
        "/run/x.pid",
        "-reloadwithsignal",
        "-quiet",
        "--resolv-conf",
        "/dev/null",
        "--upstream",
        "127.0.0.1",
    ])
    .unwrap();
    assert_eq!(c.log_level, "warn");
    let c = c.into_config(no_env).unwrap();
    assert_eq!(
        c.listen,
        vec![
            "169.254.20.10:5353".parse().unwrap(),
            "[fd00::10]:5353".parse().unwrap()
        ]
    );
    assert_eq!(c.node.firewall, Some(Backend::None));
    assert!(!c.node.setup_interface && c.node.skip_teardown);
    assert_eq!(c.node.interface, "nld0");
    assert_eq!(c.node.sync_interval, Duration::from_secs(90));
    assert_eq!(c.health_listen, Some("169.254.20.10:9099".parse().unwrap()));
    assert_eq!(c.metrics_listen, Some("0.0.0.0:9254".parse().unwrap()));
    assert_eq!(
        c.setup_metrics_listen,
        Some("127.0.0.1:9354".parse().unwrap())
    );
    assert_eq!(c.pidfile, Some(PathBuf::from("/run/x.pid")));
    assert!(c.not_ready.is_empty(), "{:?}", c.not_ready);
    let cluster = c.zones.iter().find(|z| z.name == "cluster.local").unwrap();
    assert_eq!(
        cluster.servers,
        vec![
            "10.0.0.10:53".parse().unwrap(),
            "10.0.0.11:5300".parse().unwrap()
        ]
    );
    // Defaults: the health port is 9053, node-cache's listener 0.0.0.0:9353.
    let c = go(&["--upstream", "127.0.0.1"])
        .unwrap()
        .into_config(no_env)
        .unwrap();
    assert_eq!(c.health_listen, Some("169.254.20.10:9053".parse().unwrap()));
    assert_eq!(
        c.setup_metrics_listen,
        Some("0.0.0.0:9353".parse().unwrap())
    );
    assert_eq!(c.node.firewall, None);
    // -corefile stands in for a missing -conf; -setupiptables=true keeps auto.
    let c = go(&["-corefile", "/etc/Corefile", "-setupiptables"]).unwrap();
    assert_eq!(c.conf, Some(PathBuf::from("/etc/Corefile")));
    assert_eq!(c.firewall, "auto");
    // Conflicting spellings.
    assert!(go(&["-localip", "10.0.0.1", "--listen", "10.0.0.1:53"]).is_err());
    assert!(go(&["-health-port", "1", "--health-listen", "off"]).is_err());
    assert!(
        go(&[
            "-prometheus-listen-address",
            ":1",
            "--metrics-listen",
            "off"
        ])
        .is_err()
    );
    assert!(go(&["-health-port"]).is_err());
}

#[test]
fn go_durations() {
    assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
    assert_eq!(parse_duration("1h2m3s").unwrap(), Duration::from_secs(3723));
    assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
    assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
    for bad in ["1m3", "s", "1x", "1s1", "--1", "1 s"] {
        assert!(parse_duration(bad).is_err(), "{bad}");
    }
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

/// `health { lameduck D }` is the shutdown grace, no longer an inert setting; an explicit
/// `--shutdown-grace` wins; a `health` without lameduck keeps the flag's default.
#[test]
fn lameduck_sets_the_shutdown_grace() {
    let file = |health: &str| {
        format!(".:53 {{\n    bind 169.254.20.10\n    {health}\n    forward . 10.0.0.1\n}}\n")
    };
    let conf = |text: String, extra: &[&str]| {
        let src = common::FakeSources::default().with_file("/c/Corefile", &text);
        let mut args = vec!["--conf", "/c/Corefile", "--listen", "169.254.20.10:53"];
        args.extend_from_slice(extra);
        Cli::parse_args(
            std::iter::once("nodedns")
                .chain(args.iter().copied())
                .map(String::from),
        )
        .map_err(|e| e.to_string())
        .and_then(|c| c.into_config_from(&src).map_err(|e| e.to_string()))
    };
    let c = conf(file("health 169.254.20.10:8080 {\n lameduck 7s\n }"), &[]).expect("config");
    assert_eq!(c.shutdown_grace, Duration::from_secs(7));
    let c = conf(
        file("health 169.254.20.10:8080 {\n lameduck 7s\n }"),
        &["--shutdown-grace", "1s"],
    )
    .expect("config");
    assert_eq!(c.shutdown_grace, Duration::from_secs(1), "the flag wins");
    let c = conf(file("health 169.254.20.10:8080"), &[]).expect("config");
    assert_eq!(c.shutdown_grace, Duration::from_secs(5), "the default");
}

#[test]
fn serve_stale_and_prefetch_flags_reach_every_flag_zone() {
    let c = cli(&[
        "--upstream",
        "127.0.0.1",
        "--prefetch",
        "2,1m,20",
        "--serve-stale",
        "1h",
        "--serve-stale-mode",
        "verify",
    ])
    .unwrap()
    .into_config(no_env)
    .unwrap();
    let z = &c.zones[0].cache;
    assert_eq!(
        z.prefetch,
        Some(model::Prefetch {
            amount: 2,
            duration: Duration::from_secs(60),
            percent: 20
        })
    );
    assert_eq!(
        z.serve_stale,
        Some(model::ServeStale {
            duration: Duration::from_secs(3600),
            verify: true
        })
    );
    let off = cli(&["--upstream", "127.0.0.1"])
        .unwrap()
        .into_config(no_env)
        .unwrap();
    assert_eq!(off.zones[0].cache.prefetch, None);
    assert_eq!(off.zones[0].cache.serve_stale, None);
    assert!(cli(&["--prefetch", "1,1m,5"]).is_err(), "PCT is 10-90");
    assert!(cli(&["--serve-stale-mode", "sometimes"]).is_err());
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

/// Builds a config from `args` with `src` (a machine with 10.1.2.3 besides loopback, a
/// resolv.conf at /r).
fn self_check(args: &[&str], resolv: &str) -> Result<Config, String> {
    let src = common::FakeSources::default()
        .with_file("/r", resolv)
        .with_file(
            "/c/Corefile",
            ".:53 {\n    forward . 127.0.0.1 10.0.0.1\n}\ncluster.local:53 {\n    forward . 127.0.0.53\n}\n",
        )
        .with_file(
            "/c/z.toml",
            "[[zone]]\nname = \".\"\nservers = [\"10.1.2.3\", \"10.0.0.1:53\"]\n",
        )
        .with_local_ip("10.1.2.3");
    let mut v = vec!["nodedns", "--resolv-conf", "/r"];
    v.extend_from_slice(args);
    Cli::parse_args(v.into_iter().map(String::from))
        .map_err(|e| e.to_string())
        .and_then(|c| c.into_config_from(&src).map_err(|e| e.to_string()))
}

fn servers_of(c: &Config, zone: &str) -> Vec<SocketAddr> {
    c.zones
        .iter()
        .find(|z| z.name == zone)
        .map(|z| z.servers.clone())
        .unwrap_or_default()
}

#[test]
fn is_self_covers_exact_and_wildcard_listen_addresses() {
    let sa = |s: &str| -> SocketAddr { s.parse().unwrap() };
    let local = |ip: IpAddr| ip == "10.1.2.3".parse::<IpAddr>().unwrap();
    let exact = [sa("169.254.20.10:53")];
    assert!(is_self(sa("169.254.20.10:53"), &exact, &local));
    assert!(!is_self(sa("169.254.20.10:5353"), &exact, &local));
    assert!(
        !is_self(sa("127.0.0.1:53"), &exact, &local),
        "not a wildcard"
    );
    let any4 = [sa("0.0.0.0:53")];
    for s in [
        "127.0.0.1:53",
        "127.0.0.53:53",
        "127.255.0.9:53",
        "10.1.2.3:53",
        "[::ffff:127.0.0.1]:53",
    ] {
        assert!(is_self(sa(s), &any4, &local), "{s}");
    }
    assert!(
        !is_self(sa("127.0.0.1:5353"), &any4, &local),
        "another port"
    );
    assert!(
        !is_self(sa("10.0.0.1:53"), &any4, &local),
        "not this machine's"
    );
    assert!(
        !is_self(sa("[::1]:53"), &any4, &local),
        "0.0.0.0 is IPv4 only"
    );
    let any6 = [sa("[::]:53")];
    assert!(is_self(sa("[::1]:53"), &any6, &local));
    assert!(
        !is_self(sa("127.0.0.1:53"), &any6, &local),
        "the listeners are V6ONLY"
    );
}

#[test]
fn a_zone_forwarding_only_to_nodedns_is_an_error_naming_it() {
    // --upstream, exact and through a wildcard listen (any 127/8 address, a local address).
    for (listen, up) in [
        ("127.0.0.1:53", "127.0.0.1:53"),
        ("0.0.0.0:53", "127.0.0.1"),
        ("0.0.0.0:53", "127.0.0.2:53"),
        ("0.0.0.0:53", "10.1.2.3"),
    ] {
        let e = self_check(
            &["--listen", listen, "--upstream", up],
            "nameserver 10.0.0.1\n",
        )
        .expect_err(up);
        assert!(
            e.contains("--upstream: zone . forwards only to nodedns's own listen address")
                && e.contains("a loop")
                && !e.contains('\n'),
            "{e}"
        );
    }
    // --forward.
    let e = self_check(
        &[
            "--listen",
            "0.0.0.0:53",
            "--upstream",
            "10.0.0.1",
            "--forward",
            "acme.local=127.0.0.1",
        ],
        "",
    )
    .expect_err("forward");
    assert!(
        e.contains("--forward: zone acme.local forwards only to nodedns"),
        "{e}"
    );
    // resolv.conf.
    let e = self_check(&["--listen", "0.0.0.0:53"], "nameserver 127.0.0.53\n").expect_err("resolv");
    assert!(
        e.contains("--resolv-conf /r: zone . forwards only to nodedns"),
        "{e}"
    );
    // The cluster DNS from --upstream-svc.
    let e = self_check(
        &[
            "--listen",
            "10.96.0.10:53",
            "--upstream",
            "10.0.0.1",
            "--upstream-svc",
            "10.96.0.10",
        ],
        "",
    )
    .expect_err("svc");
    assert!(
        e.contains("--upstream-svc: zone cluster.local forwards only to nodedns"),
        "{e}"
    );
    // A file zone: the Corefile's cluster.local goes to 127.0.0.53 only.
    let e =
        self_check(&["--conf", "/c/Corefile", "--listen", "0.0.0.0:53"], "").expect_err("corefile");
    assert!(
        e.contains("/c/Corefile:4: zone cluster.local forwards only to nodedns"),
        "{e}"
    );
    // Another port is no loop.
    let c = self_check(&["--listen", "0.0.0.0:5353", "--upstream", "127.0.0.1"], "").unwrap();
    assert_eq!(servers_of(&c, "."), vec!["127.0.0.1:53".parse().unwrap()]);
}

#[test]
fn self_servers_among_others_are_dropped_with_a_warning() {
    let sa = |s: &str| -> SocketAddr { s.parse().unwrap() };
    let c = self_check(
        &[
            "--listen",
            "0.0.0.0:53",
            "--upstream",
            "127.0.0.1",
            "--upstream",
            "10.0.0.1",
        ],
        "",
    )
    .unwrap();
    assert_eq!(servers_of(&c, "."), vec![sa("10.0.0.1:53")]);
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    assert!(
        c.warnings[0].contains("--upstream: zone .: server 127.0.0.1:53 dropped"),
        "{:?}",
        c.warnings
    );
    let c = self_check(
        &["--listen", "0.0.0.0:53"],
        "nameserver 10.1.2.3\nnameserver 10.0.0.2\n",
    )
    .unwrap();
    assert_eq!(servers_of(&c, "."), vec![sa("10.0.0.2:53")]);
    assert!(
        c.warnings[0].contains("--resolv-conf /r"),
        "{:?}",
        c.warnings
    );
    let c = self_check(
        &[
            "--listen",
            "0.0.0.0:53",
            "--upstream",
            "10.0.0.1",
            "--forward",
            "a.local=127.0.0.1,10.0.0.3:53",
        ],
        "",
    )
    .unwrap();
    assert_eq!(servers_of(&c, "a.local"), vec![sa("10.0.0.3:53")]);
    let c = self_check(&["--conf", "/c/z.toml", "--listen", "0.0.0.0:53"], "").unwrap();
    assert_eq!(servers_of(&c, "."), vec![sa("10.0.0.1:53")]);
    assert!(
        c.warnings[0].contains("10.1.2.3:53 dropped"),
        "{:?}",
        c.warnings
    );
    // Nothing to drop: no warning.
    let c = self_check(&["--listen", "127.0.0.1:53", "--upstream", "127.0.0.2"], "").unwrap();
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

#[test]
fn loop_detection_defaults_on_for_flags_and_follows_a_file_unless_the_flag_is_given() {
    use model::LoopDetect;
    let flags = |extra: &[&str]| {
        let mut a = vec!["--listen", "127.0.0.1:5300", "--upstream", "10.0.0.1"];
        a.extend_from_slice(extra);
        self_check(&a, "").unwrap().loop_detect
    };
    assert_eq!(flags(&[]), LoopDetect::On);
    assert_eq!(flags(&["--loop-detect", "off"]), LoopDetect::Off);
    assert_eq!(flags(&["--loop-detect", "fatal"]), LoopDetect::Fatal);
    assert!(cli(&["--loop-detect", "maybe"]).is_err());
    let file = |extra: &[&str]| {
        let mut a = vec!["--conf", "/c/z.toml", "--listen", "127.0.0.1:5300"];
        a.extend_from_slice(extra);
        self_check(&a, "").unwrap().loop_detect
    };
    // The TOML file has no loop_detect: no check, as a Corefile without `loop`.
    assert_eq!(file(&[]), LoopDetect::Off);
    assert_eq!(
        file(&["--loop-detect", "fatal"]),
        LoopDetect::Fatal,
        "the flag wins"
    );
}

/// A file's `cache { file PATH [INTERVAL] }` (or TOML's `cache_file`) sets the cache file; an
/// explicit `--cache-file` or `--cache-file-interval` wins, each on its own.
#[test]
fn the_cache_file_comes_from_the_file_unless_the_flag_says() {
    let corefile = |file: &str| {
        format!(".:53 {{\n    cache 30 {{\n        {file}\n    }}\n    forward . 10.0.0.1\n}}\n")
    };
    let conf = |text: String, extra: &[&str]| {
        let src = common::FakeSources::default()
            .with_file("/c/Corefile", &text)
            .with_file(
                "/c/n.toml",
                "cache_file = \"/t/c.bin\"\ncache_file_interval = \"5m\"\n[[zone]]\nname = \".\"\nservers = [\"10.0.0.1\"]\n",
            );
        let mut args = vec!["nodedns", "--listen", "127.0.0.1:5300"];
        args.extend_from_slice(extra);
        Cli::parse_args(args.into_iter().map(String::from))
            .map_err(|e| e.to_string())
            .and_then(|c| c.into_config_from(&src).map_err(|e| e.to_string()))
            .map(|c| c.cache_file)
    };
    let p = |s: &str| PathBuf::from(s);
    let secs = Duration::from_secs;
    let with = |f: &str| conf(corefile(f), &["--conf", "/c/Corefile"]).unwrap();
    assert_eq!(with("file /f/c.bin 2m"), Some((p("/f/c.bin"), secs(120))));
    assert_eq!(
        with("file /f/c.bin"),
        Some((p("/f/c.bin"), secs(60))),
        "the flag's default interval"
    );
    assert_eq!(with("success 100"), None, "no file, no flag: none");
    let flags = |f: &str, extra: &[&str]| {
        let mut a = vec!["--conf", "/c/Corefile"];
        a.extend_from_slice(extra);
        conf(corefile(f), &a).unwrap()
    };
    assert_eq!(
        flags("file /f/c.bin 2m", &["--cache-file", "/x.bin"]),
        Some((p("/x.bin"), secs(120))),
        "the path flag wins, the file's interval stays"
    );
    assert_eq!(
        flags("file /f/c.bin 2m", &["--cache-file-interval", "10s"]),
        Some((p("/f/c.bin"), secs(10))),
        "the interval flag wins"
    );
    assert_eq!(
        flags("success 100", &["--cache-file", "/x.bin"]),
        Some((p("/x.bin"), secs(60))),
        "the flag alone, with a file that names none"
    );
    assert_eq!(
        conf(String::new(), &["--conf", "/c/n.toml"]).unwrap(),
        Some((p("/t/c.bin"), secs(300))),
        "TOML"
    );
    // A file's bad value stops the start with its place.
    let e = conf(corefile("file /f/c.bin 100ms"), &["--conf", "/c/Corefile"]).unwrap_err();
    assert_eq!(e, "/c/Corefile:3: cache file interval must be at least 1s");
}
