use super::*;
use crate::config::common::FakeSources;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn resolv() -> FakeSources {
    FakeSources::default().with_file(
        "/etc/resolv.conf",
        "# node\nsearch example.com\nnameserver 10.0.0.2\nnameserver fe80::1%eth0 ; v6\nnameserver 10.0.0.2\n",
    )
}

/// The CoreDNS cache policy with the cap `ttl` on both kinds (`cache 30`).
fn capped(ttl: u64) -> CachePolicy {
    CachePolicy {
        max_ttl: secs(ttl),
        max_negative_ttl: secs(ttl),
        ..CachePolicy::COREDNS
    }
}

fn zone(
    name: &str,
    servers: &[&str],
    transport: Transport,
    policy: Policy,
    cache: CachePolicy,
) -> Zone {
    Zone {
        name: name.into(),
        servers: servers.iter().map(|s| sa(s)).collect(),
        transport,
        policy,
        forward: ForwardOptions::default(),
        cache,
        origin: Origin::default(),
    }
}

pub(crate) fn stub_sequential_model() -> Model {
    Model {
        listen: vec![sa("169.254.20.10:53")],
        port: None,
        zones: vec![
            zone(
                "cluster.local",
                &["10.0.0.10:53"],
                Transport::Tcp,
                Policy::Random,
                CachePolicy {
                    max_ttl: secs(30),
                    max_negative_ttl: secs(5),
                    ..CachePolicy::COREDNS
                },
            ),
            zone(
                "acme.internal",
                &["192.168.1.53:5353", "[fd00::53]:53"],
                Transport::PreferUdp,
                Policy::Random,
                capped(30),
            ),
            zone(
                ".",
                &["10.1.0.1:53", "10.1.0.2:53", "10.1.0.3:53"],
                Transport::PreferUdp,
                Policy::Sequential,
                capped(30),
            ),
        ],
        health: Some(Health {
            addr: sa("169.254.20.10:8080"),
            lameduck: Duration::ZERO,
        }),
        ready: None,
        metrics: Some(sa("0.0.0.0:9253")),
        reload: None,
        log_queries: false,
        loop_detect: LoopDetect::Off,
        cache_file: None,
        inputs: vec![],
    }
}

#[test]
fn stub_domain_and_sequential_policy() {
    let text = include_str!("../testdata/stub-sequential.Corefile");
    let m = parse(text, "Corefile", &FakeSources::default()).unwrap();
    assert_eq!(m.zones[0].origin, Origin::at("Corefile", 3));
    assert_eq!(m.zones[1].origin, Origin::at("Corefile", 15));
    assert_eq!(m.without_origins(), stub_sequential_model());
}

pub(crate) fn everything_model() -> Model {
    let cache = CachePolicy {
        success: true,
        denial: false,
        min_ttl: secs(10),
        max_ttl: secs(600),
        min_negative_ttl: secs(5),
        max_negative_ttl: secs(60),
        servfail_ttl: Duration::ZERO,
        success_capacity: 5000,
        denial_capacity: 2000,
        prefetch: Some(Prefetch {
            amount: 3,
            duration: secs(120),
            percent: 20,
        }),
        serve_stale: Some(ServeStale {
            duration: secs(1800),
            verify: true,
        }),
    };
    let fwd = |name: &str, servers: &[&str]| Zone {
        forward: ForwardOptions {
            max_fails: 0,
            health_check: secs(1),
            expire: secs(90),
            max_concurrent: Some(500),
        },
        ..zone(
            name,
            servers,
            Transport::PreferUdp,
            Policy::RoundRobin,
            cache,
        )
    };
    Model {
        listen: vec![],
        port: Some(1053),
        zones: vec![
            fwd("example.org", &["10.9.0.1:53", "10.9.0.2:5353"]),
            fwd("example.net", &["10.9.0.1:53", "10.9.0.2:5353"]),
            fwd("internal.example.org", &[]),
            zone(
                ".",
                &["10.0.0.2:53", "[fe80::1]:53"],
                Transport::PreferUdp,
                Policy::Random,
                CachePolicy::OFF,
            ),
        ],
        health: Some(Health {
            addr: sa("0.0.0.0:8081"),
            lameduck: secs(5),
        }),
        ready: Some(sa("127.0.0.1:8181")),
        metrics: None,
        reload: Some(secs(10)),
        log_queries: true,
        loop_detect: LoopDetect::Off,
        cache_file: Some(CacheFile {
            path: PathBuf::from("/var/lib/nodedns/cache.bin"),
            interval: Some(secs(30)),
        }),
        inputs: vec![],
    }
}

#[test]
fn every_option() {
    let text = include_str!("../testdata/everything.Corefile");
    let m = parse(text, "Corefile", &resolv()).unwrap();
    assert_eq!(m.inputs, vec![PathBuf::from("/etc/resolv.conf")]);
    assert_eq!(m.zones[2].origin, Origin::at("Corefile", 23));
    assert_eq!(m.without_origins(), everything_model());
}

#[test]
fn defaults_of_bare_plugins() {
    let m = parse(
        "example.org {\n cache\n forward example.org 1.1.1.1\n health\n ready\n prometheus\n reload\n loop\n}\n",
        "C",
        &FakeSources::default(),
    )
    .unwrap();
    let z = &m.zones[0];
    assert_eq!(z.cache, CachePolicy::COREDNS);
    assert_eq!(z.transport, Transport::PreferUdp);
    assert_eq!(z.policy, Policy::Random);
    assert_eq!(m.port, None);
    assert_eq!(m.health.unwrap().addr, sa("0.0.0.0:8080"));
    assert_eq!(m.ready, Some(sa("0.0.0.0:8181")));
    assert_eq!(m.metrics, Some(sa("0.0.0.0:9153")));
    assert_eq!(m.reload, Some(secs(30)));
    assert_eq!(m.loop_detect, LoopDetect::On);
}

#[test]
fn cache_floor_is_clamped_to_the_cap_and_force_tcp_wins() {
    let m = parse(
        ". {\n cache 3\n forward . 1.1.1.1 {\n prefer_udp\n force_tcp\n }\n}\n",
        "C",
        &FakeSources::default(),
    )
    .unwrap();
    assert_eq!(m.zones[0].cache.min_ttl, secs(3));
    assert_eq!(m.zones[0].cache.max_ttl, secs(3));
    assert_eq!(m.zones[0].transport, Transport::Tcp);
}

#[test]
fn environment_variables_and_quotes() {
    let src = FakeSources::default()
        .with_env("UP", "10.2.0.1")
        .with_env("ZONE", "corp");
    let m = parse(
        "{$ZONE}.example:53 {\n forward . {%UP%}:5353 \"10.2.0.2\" # comment\n}\n",
        "C",
        &src,
    )
    .unwrap();
    assert_eq!(m.zones[0].name, "corp.example");
    assert_eq!(
        m.zones[0].servers,
        vec![sa("10.2.0.1:5353"), sa("10.2.0.2:53")]
    );
    assert_eq!(m.port, Some(53));
}

#[test]
fn one_line_blocks() {
    let m = parse(
        ". {\n health { lameduck 2s }\n forward . 1.1.1.1 { force_tcp }\n}",
        "C",
        &FakeSources::default(),
    )
    .unwrap();
    assert_eq!(m.health.unwrap().lameduck, secs(2));
    assert_eq!(m.zones[0].transport, Transport::Tcp);
}

fn error(text: &str) -> String {
    let src = resolv().with_env("SET", "1.1.1.1");
    match parse(text, "Corefile", &src) {
        Ok(m) => panic!("parsed: {m:?}"),
        Err(e) => e.to_string(),
    }
}

#[track_caller]
fn assert_error(text: &str, prefix: &str) {
    let e = error(text);
    assert!(
        e.starts_with(prefix),
        "{e:?} does not start with {prefix:?}"
    );
}

const OK_FWD: &str = "    forward . 1.1.1.1\n";

#[test]
fn errors_name_file_and_line() {
    let cases: &[(String, &str)] = &[
        (
            format!(".:53 {{\n{OK_FWD}    rewrite name a b\n}}\n"),
            "Corefile:3: unknown plugin rewrite",
        ),
        (
            format!(".:53 {{\n{OK_FWD}    cache {{\n        success 1\n}}\n"),
            "Corefile:1: unbalanced {",
        ),
        (
            format!(".:53 {{\n{OK_FWD}}}\n}}\n"),
            "Corefile:4: unbalanced }",
        ),
        (
            ".:53 {\n    forward . 1.1.1.300\n}\n".into(),
            "Corefile:2: forward: invalid server address \"1.1.1.300\"",
        ),
        (
            format!(".:53 {{\n{OK_FWD}    cache 30s {{\n        prefetch 2 soon\n    }}\n}}\n"),
            "Corefile:4: cache prefetch duration: invalid duration",
        ),
        (
            ".:53 {\n    forward . {$UNSET_VAR}\n}\n".into(),
            "Corefile:2: environment variable UNSET_VAR is not set",
        ),
        (
            format!("a.org {{\n{OK_FWD}}}\nb.org {{\n{OK_FWD}}}\nA.org. {{\n{OK_FWD}}}\n"),
            "Corefile:7: zone a.org is defined twice (lines 1 and 7)",
        ),
        (
            ".:53 {\n    forward .\n}\n".into(),
            "Corefile:2: forward needs FROM and at least one server",
        ),
        (
            ".:53 {\n    forward . tls://1.1.1.1\n}\n".into(),
            "Corefile:2: forward: upstream \"tls://1.1.1.1\": tls:// is not supported",
        ),
        (
            format!(
                "a.org {{\n    bind 10.0.0.1\n{OK_FWD}}}\nb.org {{\n    bind 10.0.0.2\n{OK_FWD}}}\n"
            ),
            "Corefile:6: bind addresses differ from those at line 2",
        ),
        (
            format!("a.org {{\n    bind 10.0.0.1\n{OK_FWD}}}\nb.org {{\n{OK_FWD}}}\n"),
            "Corefile:5: this block has no bind",
        ),
        (
            ".:53 {\n    forward . 1.1.1.1 {\n        next NXDOMAIN\n    }\n}\n".into(),
            "Corefile:3: forward option next is not supported",
        ),
        (
            format!(".:53 {{\n{OK_FWD}    cache {{\n        success lots\n    }}\n}}\n"),
            "Corefile:4: cache success capacity \"lots\" is not a number",
        ),
        (
            format!("a.org:53 {{\n{OK_FWD}}}\nb.org:54 {{\n{OK_FWD}}}\n"),
            "Corefile:4: port 54 differs from port 53",
        ),
        (
            "a.org {\n    cache 30\n}\n".into(),
            "Corefile:1: zone a.org has no forward",
        ),
        (
            format!("tls://.:853 {{\n{OK_FWD}}}\n"),
            "Corefile:1: server block tls://.:853: tls:// is not supported",
        ),
        (
            format!("\n.:53\n{{\n{OK_FWD}}}\n"),
            "Corefile:2: \".:53\" is not a server block",
        ),
        (
            format!("cache 30\n.:53 {{\n{OK_FWD}}}\n"),
            "Corefile:1: \"cache 30\" is not a server block",
        ),
        (
            "import common\n".into(),
            "Corefile:1: import is not supported",
        ),
        (
            "(snip) {\n    errors\n}\n".into(),
            "Corefile:1: snippets are not supported",
        ),
        (
            format!(".:53 {{\n{OK_FWD}    cache{{\n    }}\n}}\n"),
            "Corefile:3: brace glued to a word",
        ),
        (
            format!(".:53 {{\n{OK_FWD}    cache 30 {{\n        keepttl\n    }}\n}}\n"),
            "Corefile:4: cache keepttl is not supported",
        ),
        (
            format!("a.org {{\n{OK_FWD}    cache 30 sub.a.org\n}}\n"),
            "Corefile:3: cache for zones narrower than the server block",
        ),
        (
            "a.org {\n    forward b.org 1.1.1.1\n}\n".into(),
            "Corefile:2: forward b.org: FROM must be . or the server block's zone",
        ),
        (
            format!(".:53 {{\n    bind eth0\n{OK_FWD}}}\n"),
            "Corefile:2: bind \"eth0\" is not an IP address",
        ),
        (
            format!(".:53 {{\n{OK_FWD}    health :8080\n}}\n.:53 {{\n}}\n"),
            "Corefile:5: zone . has no forward",
        ),
        (
            format!(
                "a.org {{\n{OK_FWD}    health :8080\n}}\nb.org {{\n{OK_FWD}    health :8081\n}}\n"
            ),
            "Corefile:7: health given twice (lines 3 and 7)",
        ),
        (
            format!(
                "a.org {{\n{OK_FWD}    prometheus :9253\n}}\nb.org {{\n{OK_FWD}    prometheus :9153\n}}\n"
            ),
            "Corefile:7: prometheus 0.0.0.0:9153 differs",
        ),
        (
            ".:53 {\n    forward . ./missing.conf\n}\n".into(),
            "Corefile:2: cannot read nameservers from ./missing.conf",
        ),
        (
            format!(".:53 {{\n{OK_FWD}    log \"unterminated\n}}\n"),
            "Corefile:3: unterminated quoted string",
        ),
        ("".into(), "Corefile:1: no server blocks"),
        (
            format!(".:53 {{\n{OK_FWD}    a {{\n b {{\n c {{\n }}\n }}\n }}\n}}\n"),
            "Corefile:5: blocks nested too deeply",
        ),
        (
            "a.org {\n    forward . 1.1.1.1 {\n        except other.org\n    }\n}\n".into(),
            "Corefile:3: forward except other.org: not a name below",
        ),
    ];
    for (text, prefix) in cases {
        assert_error(text, prefix);
    }
}

#[test]
fn resolv_conf_without_nameservers_is_an_error() {
    let src = FakeSources::default().with_file("/r", "search x\n");
    let e = parse(".:53 {\n forward . /r\n}\n", "C", &src).unwrap_err();
    assert_eq!(e.to_string(), "C:2: /r: no nameserver lines");
}

#[test]
fn at_most_fifteen_upstreams() {
    let ups: Vec<String> = (1..=16).map(|i| format!("10.0.0.{i}")).collect();
    let e = error(&format!(".:53 {{\n forward . {}\n}}\n", ups.join(" ")));
    assert!(e.starts_with("Corefile:2: forward has 16 upstreams"), "{e}");
}

#[test]
fn garbage_does_not_panic() {
    for text in [
        "{",
        "}",
        "{$",
        "a {$",
        "a {\n{$X",
        "\"",
        "a {\n b \"\\",
        ". {\n forward . [::1\n}",
        ". {\n cache 99999999999999999999\n}",
        "é {\n}",
        ":::: {\n}",
        ". {\n forward . 1.1.1.1:99999\n}",
        ". {\n cache {\n prefetch 1 1m 200%\n }\n}",
        "{%A%}",
    ] {
        let _ = parse(text, "C", &FakeSources::default());
    }
}

#[test]
fn reverse_zone_argument_is_not_a_ttl() {
    let m = parse(
        "10.in-addr.arpa {\n cache 10.in-addr.arpa\n forward . 1.1.1.1\n}\n",
        "C",
        &FakeSources::default(),
    )
    .unwrap();
    assert_eq!(m.zones[0].cache, CachePolicy::COREDNS);
    assert_error(
        ".:53 {\n cache 30x\n forward . 1.1.1.1\n}\n",
        "Corefile:2: cache TTL: invalid duration",
    );
}

proptest::proptest! {
    #[test]
    fn arbitrary_text_does_not_panic(s in "\\PC*") {
        let _ = parse(&s, "C", &resolv());
    }

    #[test]
    fn corefile_like_text_does_not_panic(
        s in "([a-z.:/0-9{}$%\"#\\-]{0,12}[ \n]){0,40}"
    ) {
        let _ = parse(&s, "C", &resolv().with_env("A", "1"));
    }
}

#[test]
fn policy_fastest_is_accepted() {
    let text = ".:53 {\n    forward . 10.0.0.1 10.0.0.2 {\n        policy fastest\n    }\n}\n";
    let m = parse(text, "Corefile", &FakeSources::default()).unwrap();
    assert_eq!(m.zones[0].policy, Policy::Fastest);
    let bad = ".:53 {\n    forward . 10.0.0.1 {\n        policy quickest\n    }\n}\n";
    let e = parse(bad, "Corefile", &FakeSources::default()).unwrap_err();
    assert_eq!(e.at.line, 3, "{e}");
    assert!(e.reason.contains("fastest"), "{e}");
}

#[test]
fn loop_fatal_and_the_strictest_block_wins() {
    let p = |text: &str| parse(text, "C", &FakeSources::default());
    let m = p(". {\n forward . 1.1.1.1\n}\n").unwrap();
    assert_eq!(
        m.loop_detect,
        LoopDetect::Off,
        "no `loop`: no check, as CoreDNS"
    );
    let m = p(". {\n forward . 1.1.1.1\n loop fatal\n}\n").unwrap();
    assert_eq!(m.loop_detect, LoopDetect::Fatal);
    let m = p("a.org {\n forward . 1.1.1.1\n loop fatal\n}\n. {\n forward . 1.1.1.1\n loop\n}\n")
        .unwrap();
    assert_eq!(m.loop_detect, LoopDetect::Fatal);
    let e = p(". {\n forward . 1.1.1.1\n loop later\n}\n")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("C:3:") && e.contains("loop"), "{e}");
}

#[test]
fn cache_file_is_one_for_every_block() {
    let p = |text: &str| parse(text, "C", &FakeSources::default());
    let m = p(". {\n cache 30 {\n  file /var/lib/nodedns/cache.bin\n }\n forward . 1.1.1.1\n}\n")
        .unwrap();
    assert_eq!(
        m.cache_file,
        Some(CacheFile {
            path: PathBuf::from("/var/lib/nodedns/cache.bin"),
            interval: None,
        })
    );
    assert_eq!(m.zones[0].cache, capped(30), "file changes no cache policy");
    let m = p(". {\n forward . 1.1.1.1\n}\n").unwrap();
    assert_eq!(m.cache_file, None);
    // The same file in several blocks (the addon repeats its cache settings) is fine; a block
    // without one is fine too.
    let m = p(
        "a.org {\n cache {\n  file \"/d/c.bin\" 2m\n }\n forward . 1.1.1.1\n}\n\
               b.org {\n cache 5\n forward . 1.1.1.1\n}\n\
               . {\n cache {\n  file /d/c.bin 2m\n }\n forward . 1.1.1.1\n}\n",
    )
    .unwrap();
    assert_eq!(
        m.cache_file,
        Some(CacheFile {
            path: PathBuf::from("/d/c.bin"),
            interval: Some(secs(120)),
        })
    );
}

#[test]
fn cache_file_errors_name_the_line() {
    let block =
        |opt: &str| format!(".:53 {{\n    cache 30 {{\n        {opt}\n    }}\n{OK_FWD}}}\n");
    for (opt, want) in [
        ("file", "Corefile:3: cache file takes PATH [INTERVAL]"),
        (
            "file /a 1m extra",
            "Corefile:3: cache file takes PATH [INTERVAL]",
        ),
        ("file \"\"", "Corefile:3: cache file: the path is empty"),
        ("file \" \"", "Corefile:3: cache file: the path is empty"),
        (
            "file \"a\nb\"",
            "Corefile:3: cache file: control character in the path",
        ),
        (
            "file /a 500ms",
            "Corefile:3: cache file interval must be at least 1s",
        ),
        (
            "file /a 0",
            "Corefile:3: cache file interval must be at least 1s",
        ),
        (
            "file /a soon",
            "Corefile:3: cache file interval: invalid duration",
        ),
        ("file /a {\n }", "Corefile:3: cache file takes no block"),
    ] {
        assert_error(&block(opt), want);
    }
    assert_error(
        &format!(
            "a.org {{\n cache {{\n  file /a\n }}\n{OK_FWD}}}\n. {{\n cache {{\n  file /b\n }}\n{OK_FWD}}}\n"
        ),
        "Corefile:9: cache file /b differs from cache file /a at line 3",
    );
    assert_error(
        &format!(
            "a.org {{\n cache {{\n  file /a 1m\n }}\n{OK_FWD}}}\n. {{\n cache {{\n  file /a\n }}\n{OK_FWD}}}\n"
        ),
        "Corefile:9: cache file /a differs from cache file /a 60s at line 3",
    );
}
