use std::path::PathBuf;
use std::time::Duration;

use super::*;
use crate::config::common::FakeSources;
use crate::config::corefile;
use crate::config::model::{CachePolicy, ForwardOptions, Health, Model, Policy, Transport, Zone};

pub(crate) const TEMPLATE: &str = include_str!("../testdata/addon-template.Corefile");

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

pub(crate) fn sources() -> FakeSources {
    FakeSources::default()
        .with_env("KUBE_DNS_UPSTREAM_SERVICE_HOST", "10.0.0.10")
        .with_file(
            "/etc/resolv.conf",
            "nameserver 10.0.0.2\nnameserver 10.0.0.3\noptions ndots:5\n",
        )
}

pub(crate) fn inputs(locals: &[&str]) -> AddonInputs {
    AddonInputs {
        upstream_svc: "kube-dns-upstream".into(),
        local_ips: locals.iter().map(|s| s.parse().unwrap()).collect(),
        kube_dns: KubeDns::default(),
        prometheus: None,
    }
}

fn zone(name: &str, servers: &[&str], transport: Transport, cache: CachePolicy) -> Zone {
    Zone {
        name: name.into(),
        servers: servers.iter().map(|s| sa(s)).collect(),
        transport,
        policy: Policy::Random,
        forward: ForwardOptions::default(),
        cache,
        origin: Origin::default(),
    }
}

fn capped(ttl: u64) -> CachePolicy {
    CachePolicy {
        max_ttl: secs(ttl),
        max_negative_ttl: secs(ttl),
        ..CachePolicy::COREDNS
    }
}

/// What the addon's default ConfigMap means, on the given local IPs (origins cleared).
pub(crate) fn addon_model(locals: &[&str]) -> Model {
    let cluster = CachePolicy {
        max_ttl: secs(30),
        max_negative_ttl: secs(5),
        ..CachePolicy::COREDNS
    };
    Model {
        listen: locals.iter().map(|ip| sa(&format!("{ip}:53"))).collect(),
        port: None,
        zones: vec![
            zone("cluster.local", &["10.0.0.10:53"], Transport::Tcp, cluster),
            zone(
                "in-addr.arpa",
                &["10.0.0.10:53"],
                Transport::Tcp,
                capped(30),
            ),
            zone("ip6.arpa", &["10.0.0.10:53"], Transport::Tcp, capped(30)),
            zone(
                ".",
                &["10.0.0.2:53", "10.0.0.3:53"],
                Transport::PreferUdp,
                capped(30),
            ),
        ],
        health: Some(Health {
            addr: sa(&format!("{}:8080", locals[0])),
            lameduck: Duration::ZERO,
        }),
        ready: None,
        metrics: Some(sa("0.0.0.0:9253")),
        reload: Some(secs(30)),
        log_queries: false,
        loop_detect: crate::config::model::LoopDetect::On,
        cache_file: None,
        inputs: vec![],
    }
}

fn render_and_parse(inputs: &AddonInputs, src: &FakeSources) -> Model {
    let text = render(TEMPLATE, "Corefile.base", inputs, src).unwrap();
    corefile::parse(&text, "Corefile", src).unwrap()
}

#[test]
fn default_template_on_the_link_local_ip() {
    let m = render_and_parse(&inputs(&["169.254.20.10"]), &sources());
    assert_eq!(m.inputs, vec![PathBuf::from("/etc/resolv.conf")]);
    assert_eq!(m.zones[0].origin, Origin::at("Corefile", 3));
    assert_eq!(m.without_origins(), addon_model(&["169.254.20.10"]));
}

#[test]
fn default_template_on_two_ips() {
    let ips = ["169.254.20.10", "10.96.0.10"];
    let text = render(TEMPLATE, "Corefile.base", &inputs(&ips), &sources()).unwrap();
    assert!(
        text.contains("    bind 169.254.20.10 10.96.0.10 \n"),
        "{text}"
    );
    assert!(text.contains("    health 169.254.20.10:8080\n"), "{text}");
    assert_eq!(
        text.lines().count(),
        TEMPLATE.lines().count(),
        "line numbers are kept"
    );
    let m = corefile::parse(&text, "Corefile", &sources()).unwrap();
    assert_eq!(m.without_origins(), addon_model(&ips));
}

#[test]
fn kube_dns_config_map() {
    let src = sources()
        .with_file(
            "/etc/kube-dns/stubDomains",
            r#"{"acme.local": ["1.2.3.4", "1.2.3.5:5353"], "Corp.example.": ["[fd00::1]:53"]}"#,
        )
        .with_file(
            "/etc/kube-dns/upstreamNameservers",
            "[\"8.8.8.8\", \"dns://8.8.4.4\"]\n",
        )
        .with_file("/etc/kube-dns/federations", "{not even json");
    let kd = read_kube_dns(Path::new("/etc/kube-dns"), &src).unwrap();
    assert_eq!(
        kd,
        KubeDns {
            stub_domains: vec![
                (
                    "acme.local".into(),
                    vec![sa("1.2.3.4:53"), sa("1.2.3.5:5353")]
                ),
                ("corp.example".into(), vec![sa("[fd00::1]:53")]),
            ],
            upstream_nameservers: vec![sa("8.8.8.8:53"), sa("8.8.4.4:53")],
        }
    );
    // The upstream forward was written with force_tcp: custom upstreams drop it.
    let template = TEMPLATE.replace(
        "forward . __PILLAR__UPSTREAM__SERVERS__\n",
        "forward . __PILLAR__UPSTREAM__SERVERS__ {\n            force_tcp\n    }\n",
    );
    let ins = AddonInputs {
        kube_dns: kd,
        ..inputs(&["169.254.20.10"])
    };
    let text = render(&template, "Corefile.base", &ins, &src).unwrap();
    assert!(
        text.contains(
            "\nacme.local:53 {\n    errors\n    cache 30\n    bind 169.254.20.10\n    forward . 1.2.3.4:53 1.2.3.5:5353\n}\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("    forward . 8.8.8.8:53 8.8.4.4:53 {\n\n    }\n"),
        "{text}"
    );
    let m = corefile::parse(&text, "Corefile", &src).unwrap();
    assert!(m.inputs.is_empty(), "resolv.conf is not read");
    let mut want = addon_model(&["169.254.20.10"]);
    want.zones[3].servers = vec![sa("8.8.8.8:53"), sa("8.8.4.4:53")];
    want.zones.push(zone(
        "acme.local",
        &["1.2.3.4:53", "1.2.3.5:5353"],
        Transport::PreferUdp,
        capped(30),
    ));
    want.zones.push(zone(
        "corp.example",
        &["[fd00::1]:53"],
        Transport::PreferUdp,
        capped(30),
    ));
    assert_eq!(m.without_origins(), want);

    // Without custom upstreams the same force_tcp stays.
    let text = render(
        &template,
        "Corefile.base",
        &inputs(&["169.254.20.10"]),
        &sources(),
    )
    .unwrap();
    let m = corefile::parse(&text, "Corefile", &sources()).unwrap();
    assert_eq!(m.zones[3].transport, Transport::Tcp);
}

#[test]
fn service_port_and_dns_server_comma() {
    let src = sources().with_env("KUBE_DNS_UPSTREAM_SERVICE_PORT", "5353");
    let t = "a:53 {\n bind __PILLAR__LOCAL__DNS__,__PILLAR__DNS__SERVER__\n forward . __PILLAR__CLUSTER__DNS__\n prometheus __PROMETHEUS__ENDPOINT__\n}\n";
    let ins = AddonInputs {
        prometheus: Some(":9253".into()),
        ..inputs(&["169.254.20.10"])
    };
    let text = render(t, "T", &ins, &src).unwrap();
    assert_eq!(
        text,
        "a:53 {\n bind 169.254.20.10\n forward . 10.0.0.10:5353\n prometheus :9253\n}\n"
    );
}

#[track_caller]
fn render_error(template: &str, ins: &AddonInputs, src: &FakeSources, prefix: &str) {
    let e = render(template, "Corefile.base", ins, src)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(prefix),
        "{e:?} does not start with {prefix:?}"
    );
}

#[test]
fn render_errors_name_the_line() {
    let one = inputs(&["169.254.20.10"]);
    render_error(
        TEMPLATE,
        &one,
        &FakeSources::default(),
        "Corefile.base:12: __PILLAR__CLUSTER__DNS__: environment variable KUBE_DNS_UPSTREAM_SERVICE_HOST is not set",
    );
    render_error(
        TEMPLATE,
        &one,
        &FakeSources::default().with_env("KUBE_DNS_UPSTREAM_SERVICE_HOST", "kube-dns"),
        "Corefile.base:12: __PILLAR__CLUSTER__DNS__: KUBE_DNS_UPSTREAM_SERVICE_HOST=\"kube-dns\" is not an IP address",
    );
    render_error(
        &TEMPLATE.replace("cluster.local:53", "__PILLAR__DNS__DOMAIN__:53"),
        &one,
        &sources(),
        "Corefile.base:3: placeholder __PILLAR__DNS__DOMAIN__ is not filled in",
    );
    render_error(
        "\n.:53 {\n prometheus __PROMETHEUS__ENDPOINT__\n}\n",
        &one,
        &sources(),
        "Corefile.base:3: __PROMETHEUS__ENDPOINT__: no Prometheus listen address given",
    );
    render_error(
        TEMPLATE,
        &inputs(&[]),
        &sources(),
        "Corefile.base:11: __PILLAR__LOCAL__DNS__: no local IPs given",
    );
}

#[test]
fn kube_dns_errors_name_the_key() {
    let dir = Path::new("/cm");
    let e = |src: FakeSources| read_kube_dns(dir, &src).unwrap_err().to_string();
    let bad_json =
        e(FakeSources::default().with_file("/cm/stubDomains", "{\n \"a\": [\"1.1.1.1\",]\n}"));
    assert!(
        bad_json.starts_with("/cm/stubDomains:2: bad JSON"),
        "{bad_json}"
    );
    let bad_addr = e(FakeSources::default()
        .with_file("/cm/upstreamNameservers", "[\n\"8.8.8.8\",\n\"8.8.8.x\"\n]"));
    assert!(
        bad_addr.starts_with(
            "/cm/upstreamNameservers:3: upstreamNameservers: invalid server address \"8.8.8.x\""
        ),
        "{bad_addr}"
    );
    let tls =
        e(FakeSources::default().with_file("/cm/stubDomains", "{\"a\": [\"tls://1.1.1.1\"]}"));
    assert!(
        tls.starts_with("/cm/stubDomains:1: stubDomains: upstream \"tls://1.1.1.1\": tls://"),
        "{tls}"
    );
    let bad_domain =
        e(FakeSources::default().with_file("/cm/stubDomains", "{\"a..b\": [\"1.1.1.1\"]}"));
    assert!(
        bad_domain.starts_with("/cm/stubDomains:1: stubDomains: bad zone name"),
        "{bad_domain}"
    );
    let wrong_type = e(FakeSources::default().with_file("/cm/upstreamNameservers", "{\"a\": 1}"));
    assert!(
        wrong_type.starts_with("/cm/upstreamNameservers:1: bad JSON"),
        "{wrong_type}"
    );
    assert_eq!(
        read_kube_dns(dir, &FakeSources::default()).unwrap(),
        KubeDns::default()
    );
}

proptest::proptest! {
    #[test]
    fn arbitrary_templates_do_not_panic(s in "(__PILLAR__[A-Z_]{0,14}|[a-z:, {}\n]{0,6}){0,30}") {
        let _ = render(&s, "T", &inputs(&["169.254.20.10", "fd00::1"]), &sources());
    }
}
