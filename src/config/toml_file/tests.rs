use super::*;
use crate::config::addon::{self, tests as addon_tests};
use crate::config::common::FakeSources;
use crate::config::corefile::{self, tests as corefile_tests};

const DEFAULT: &str = include_str!("../testdata/addon-default.toml");

#[test]
fn addon_default_equals_the_rendered_template() {
    let src = addon_tests::sources();
    let from_toml = parse(DEFAULT, "nodedns.toml", &src).unwrap();
    assert_eq!(from_toml.inputs, vec![PathBuf::from("/etc/resolv.conf")]);
    assert_eq!(from_toml.zones[0].origin, Origin::at("nodedns.toml", 14));
    assert_eq!(from_toml.zones[3].origin, Origin::at("nodedns.toml", 37));
    let text = addon::render(
        addon_tests::TEMPLATE,
        "Corefile.base",
        &addon_tests::inputs(&["169.254.20.10"]),
        &src,
    )
    .unwrap();
    let from_corefile = corefile::parse(&text, "Corefile", &src).unwrap();
    assert_eq!(from_toml.without_origins(), from_corefile.without_origins());
}

fn golden_models() -> Vec<Model> {
    vec![
        addon_tests::addon_model(&["169.254.20.10"]),
        addon_tests::addon_model(&["169.254.20.10", "10.96.0.10"]),
        corefile_tests::stub_sequential_model(),
        corefile_tests::everything_model(),
        Model {
            zones: vec![Zone {
                name: ".".into(),
                servers: vec!["[::1]:5353".parse().unwrap()],
                transport: Transport::Udp,
                policy: Policy::RoundRobin,
                forward: ForwardOptions::default(),
                cache: CachePolicy {
                    servfail_ttl: Duration::from_micros(1500),
                    ..CachePolicy::FLAGS
                },
                origin: Origin::default(),
            }],
            // A cache file without an interval (the flag's applies).
            cache_file: Some(CacheFile {
                path: PathBuf::from("/var/lib/nodedns/cache \"1\".bin"),
                interval: None,
            }),
            ..Model::default()
        },
    ]
}

#[test]
fn to_toml_reads_back_to_the_same_model() {
    for m in golden_models() {
        let text = to_toml(&m);
        let back = parse(&text, "printed.toml", &FakeSources::default())
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(back.without_origins(), m, "{text}");
    }
}

#[track_caller]
fn assert_error(text: &str, prefix: &str) {
    let src = FakeSources::default();
    let e = parse(text, "n.toml", &src).unwrap_err().to_string();
    assert!(
        e.starts_with(prefix),
        "{e:?} does not start with {prefix:?}"
    );
}

#[test]
fn errors_name_the_line() {
    let z = "[[zone]]\nname = \".\"\nservers = [\"1.1.1.1\"]\n";
    assert_error(
        &format!("{z}colour = 1\n"),
        "n.toml:4: unknown field `colour`",
    );
    assert_error(
        &format!("{z}[zone.cache]\nmax_ttl = \"soon\"\n"),
        "n.toml:5: cache max_ttl: invalid duration",
    );
    assert_error(
        &format!("{z}[zone.cache]\nsuccess = \"many\"\n"),
        "n.toml:5: invalid type",
    );
    assert_error(
        &format!("{z}transport = \"carrier-pigeon\"\n"),
        "n.toml:4: unknown variant `carrier-pigeon`",
    );
    assert_error(
        "[[zone]]\nname = \".\"\nservers = [\n  \"1.1.1.1\",\n  \"service:kube-dns\",\n]\n",
        "n.toml:5: service:kube-dns: environment variable KUBE_DNS_SERVICE_HOST is not set",
    );
    assert_error(
        "[[zone]]\nname = \".\"\nservers = [\"tls://1.1.1.1\"]\n",
        "n.toml:3: upstream \"tls://1.1.1.1\": tls:// is not supported",
    );
    assert_error(
        &format!("{z}\n[[zone]]\nnames = [\"a\", \".\"]\nservers = []\n"),
        "n.toml:6: zone . is defined twice (lines 2 and 6)",
    );
    assert_error(
        "metrics = \"localhost:9253\"\n[[zone]]\nname = \".\"\nservers = []\n",
        "n.toml:1: metrics: invalid address",
    );
    assert_error(
        &format!("{z}[zone.cache]\nmax_ttl = \"5s\"\nmin_ttl = \"10s\"\n"),
        "n.toml:6: cache min_ttl is above max_ttl",
    );
    assert_error(
        "[[zone]]\nname = \"a\"\nservers = []\nexcept = [\"b\"]\n",
        "n.toml:4: except b: not a name below the zone",
    );
    assert_error("log_queries = true\n", "n.toml:1: no [[zone]] tables");
    assert_error("listen = [\n", "n.toml:");
    assert_error(
        "[[zone]]\nname = \".\"\nservers = [\"/nope\"]\n",
        "n.toml:3: cannot read nameservers from /nope",
    );
}

#[test]
fn service_port_and_except() {
    let src = FakeSources::default()
        .with_env("DNS_SERVICE_HOST", "fd00::10")
        .with_env("DNS_SERVICE_PORT", "5353");
    let m = parse(
        "[[zone]]\nname = \"cluster.local\"\nservers = [\"service:dns\"]\nexcept = [\"x.cluster.local\"]\n[zone.cache]\n",
        "n.toml",
        &src,
    )
    .unwrap();
    assert_eq!(m.zones[0].servers, vec!["[fd00::10]:5353".parse().unwrap()]);
    assert_eq!(m.zones[0].cache, CachePolicy::COREDNS);
    assert_eq!(m.zones[1].name, "x.cluster.local");
    assert!(m.zones[1].servers.is_empty());
    assert_eq!(m.zones[1].cache, CachePolicy::COREDNS);
}

proptest::proptest! {
    #[test]
    fn arbitrary_toml_does_not_panic(s in "\\PC*") {
        let _ = parse(&s, "n.toml", &FakeSources::default());
    }
}

#[test]
fn policy_fastest_reads_and_prints() {
    let text = "[[zone]]\nname = \".\"\nservers = [\"10.0.0.1\"]\npolicy = \"fastest\"\n";
    let m = parse(text, "f.toml", &FakeSources::default()).unwrap();
    assert_eq!(m.zones[0].policy, Policy::Fastest);
    let back = parse(&to_toml(&m), "printed.toml", &FakeSources::default()).unwrap();
    assert_eq!(back.zones[0].policy, Policy::Fastest);
}

#[test]
fn loop_detect_takes_a_boolean_or_a_word() {
    let p = |v: &str| {
        parse(
            &format!("{v}\n[[zone]]\nname = \".\"\nservers = [\"10.0.0.1\"]\n"),
            "n.toml",
            &FakeSources::default(),
        )
        .map(|m| m.loop_detect)
        .map_err(|e| e.to_string())
    };
    assert_eq!(p(""), Ok(LoopDetect::Off));
    assert_eq!(p("loop_detect = true"), Ok(LoopDetect::On));
    assert_eq!(p("loop_detect = false"), Ok(LoopDetect::Off));
    assert_eq!(p("loop_detect = \"on\""), Ok(LoopDetect::On));
    assert_eq!(p("loop_detect = \"fatal\""), Ok(LoopDetect::Fatal));
    let e = p("loop_detect = \"sometimes\"").unwrap_err();
    assert!(
        e.starts_with("n.toml:1:") && e.contains("off, on or fatal"),
        "{e}"
    );
}

#[test]
fn cache_file_and_its_interval() {
    let z = "[[zone]]\nname = \".\"\nservers = [\"10.0.0.1\"]\n";
    let p = |head: &str| parse(&format!("{head}{z}"), "n.toml", &FakeSources::default());
    let m = p("cache_file = \"/var/lib/nodedns/cache.bin\"\ncache_file_interval = \"1m30s\"\n")
        .unwrap();
    assert_eq!(
        m.cache_file,
        Some(CacheFile {
            path: PathBuf::from("/var/lib/nodedns/cache.bin"),
            interval: Some(Duration::from_secs(90)),
        })
    );
    let back = parse(&to_toml(&m), "printed.toml", &FakeSources::default()).unwrap();
    assert_eq!(back.cache_file, m.cache_file);
    assert_eq!(
        p("cache_file = \"c.bin\"\n")
            .unwrap()
            .cache_file
            .unwrap()
            .interval,
        None
    );
    assert_eq!(p("").unwrap().cache_file, None);
    for (head, want) in [
        (
            "cache_file = \"\"\n",
            "n.toml:1: cache_file: the path is empty",
        ),
        (
            "cache_file = \"a\\tb\"\n",
            "n.toml:1: cache_file: control character",
        ),
        (
            "cache_file = \"/a\"\ncache_file_interval = \"999ms\"\n",
            "n.toml:2: cache_file_interval must be at least 1s",
        ),
        (
            "cache_file = \"/a\"\ncache_file_interval = \"often\"\n",
            "n.toml:2: cache_file_interval: invalid duration",
        ),
        (
            "cache_file_interval = \"1m\"\n",
            "n.toml:1: cache_file_interval without cache_file",
        ),
        ("cache_file = 3\n", "n.toml:1: invalid type"),
    ] {
        assert_error(&format!("{head}{z}"), want);
    }
}
