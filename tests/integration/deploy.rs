//! The Kubernetes deployment as shipped: `daemonset.yaml`'s container args, env and ConfigMap
//! Corefile, filled in with the README's sed recipe, run as the real binary in a network namespace
//! with the Service variables the kubelet sets; the addon's own DaemonSet args; `/ready` naming a
//! missing or malformed Service variable.
//!
//! The YAML is read with `yaml-rust2` (a dev-dependency: pure Rust, no serde layer, no C code),
//! because the test must read the manifest the operator applies, not a copy of its values.
//!
//! What the kubelet does and the test does by hand: the ConfigMap volume (`/etc/coredns`) is a
//! directory of the test's, so an arg under a volume's `mountPath` is rewritten to it; the node
//! directories the manifest mounts (`hostPath` of type `DirectoryOrCreate`: the cache file's
//! `/var/lib/nodedns`) are directories of the test's too, their `mountPath` rewritten in the args
//! and the Corefile, so the test never writes outside its target directory; `--link-kind bridge`
//! is added because this kernel has no dummy link type. Everything else is verbatim.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use yaml_rust2::{Yaml, YamlLoader};

use crate::netns_e2e::{
    LOCAL, Netns, NsNodedns, NsUpstream, a_strings, have_tool, local_dns, poll, require_netns,
};

const LOCALDNS: &str = "169.254.20.10";
const DOMAIN: &str = "cluster.local";
/// The kube-dns ClusterIP (nodedns takes it over in iptables mode).
const KUBEDNS: &str = "10.96.0.10";
/// The kube-dns-upstream ClusterIP: the fake cluster DNS listens here (TCP and UDP).
const UPSTREAM_SVC_IP: &str = "10.96.0.100";
/// The node's resolver (its resolv.conf): the fake for external names.
const NODE_RESOLVER: &str = "10.0.1.53";

const CLUSTER_NAME: &str = "web.default.svc.cluster.local";
const CLUSTER_IP: &str = "10.96.5.5";
const EXTERNAL_NAME: &str = "example.org";
const EXTERNAL_IP: &str = "192.0.2.80";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The README's sed expression for `mode` (the line in the "Deploy on Kubernetes" section that
/// contains `needle`), with the shell variables filled in.
fn readme_sed(needle: &str) -> String {
    let readme = std::fs::read_to_string(repo("README.md")).expect("read README.md");
    let section = readme
        .split("## Deploy on Kubernetes")
        .nth(1)
        .expect("README has a Deploy on Kubernetes section");
    let line = section
        .lines()
        .find(|l| l.starts_with("sed \"") && l.contains(needle))
        .unwrap_or_else(|| panic!("README: no sed line containing {needle:?}"));
    let expr = line
        .strip_prefix("sed \"")
        .and_then(|r| r.split_once('"'))
        .map(|(e, _)| e)
        .expect("sed \"EXPR\" ...");
    expr.replace("$localdns", LOCALDNS)
        .replace("$domain", DOMAIN)
        .replace("$kubedns", KUBEDNS)
}

/// daemonset.yaml after the README's recipe, run through the real `sed`.
fn rendered_manifest(needle: &str) -> String {
    let out = Command::new("sed")
        .arg(readme_sed(needle))
        .arg(repo("daemonset.yaml"))
        .output()
        .expect("run sed");
    assert!(out.status.success(), "sed: {out:?}");
    String::from_utf8(out.stdout).expect("utf-8")
}

fn doc<'a>(docs: &'a [Yaml], kind: &str, name: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("daemonset.yaml has no {kind} {name}"))
}

fn strings(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .map(|v| {
            v.iter()
                .map(|s| s.as_str().expect("a string").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// What the test needs from the manifest.
struct Manifest {
    args: Vec<String>,
    env: Vec<(String, String)>,
    mount_paths: Vec<String>,
    /// `mountPath`s of node directories (`hostPath` volumes of type `DirectoryOrCreate`).
    host_dirs: Vec<String>,
    corefile: String,
    ready: (String, u16, String),
    live: (String, u16, String),
}

fn probe(p: &Yaml) -> (String, u16, String) {
    let g = &p["httpGet"];
    (
        g["host"].as_str().expect("probe host").to_string(),
        g["port"].as_i64().expect("numeric probe port") as u16,
        g["path"].as_str().expect("probe path").to_string(),
    )
}

fn manifest(text: &str) -> Manifest {
    let docs = YamlLoader::load_from_str(text).expect("daemonset.yaml parses");
    let ds = doc(&docs, "DaemonSet", "node-local-dns");
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true));
    assert_eq!(pod["dnsPolicy"].as_str(), Some("Default"));
    let env = c["env"]
        .as_vec()
        .map(|v| {
            v.iter()
                .map(|e| {
                    (
                        e["name"].as_str().expect("env name").to_string(),
                        e["value"].as_str().expect("env value").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let mount_paths = c["volumeMounts"]
        .as_vec()
        .expect("volumeMounts")
        .iter()
        .map(|m| m["mountPath"].as_str().expect("mountPath").to_string())
        .collect();
    let host_dir_volumes: Vec<&str> = pod["volumes"]
        .as_vec()
        .expect("volumes")
        .iter()
        .filter(|v| v["hostPath"]["type"].as_str() == Some("DirectoryOrCreate"))
        .map(|v| v["name"].as_str().expect("volume name"))
        .collect();
    let host_dirs = c["volumeMounts"]
        .as_vec()
        .expect("volumeMounts")
        .iter()
        .filter(|m| {
            m["name"]
                .as_str()
                .is_some_and(|n| host_dir_volumes.contains(&n))
        })
        .map(|m| m["mountPath"].as_str().expect("mountPath").to_string())
        .collect();
    let cm = doc(&docs, "ConfigMap", "node-local-dns");
    Manifest {
        args: strings(&c["args"]),
        env,
        mount_paths,
        host_dirs,
        corefile: cm["data"]["Corefile"]
            .as_str()
            .expect("ConfigMap data.Corefile")
            .to_string(),
        ready: probe(&c["readinessProbe"]),
        live: probe(&c["livenessProbe"]),
    }
}

/// The variables the kubelet sets for the Services of the pod's namespace (kube-system), with
/// kube-dns-upstream at `UPSTREAM_SVC_IP`.
fn kubelet_env() -> Vec<(String, String)> {
    let mut v = Vec::new();
    for (svc, ip) in [
        ("KUBE_DNS_UPSTREAM", UPSTREAM_SVC_IP),
        ("KUBE_DNS", KUBEDNS),
    ] {
        v.push((format!("{svc}_SERVICE_HOST"), ip.to_string()));
        v.push((format!("{svc}_SERVICE_PORT"), "53".into()));
        v.push((format!("{svc}_SERVICE_PORT_DNS"), "53".into()));
        v.push((format!("{svc}_PORT"), format!("udp://{ip}:53")));
        v.push((format!("{svc}_PORT_53_TCP_ADDR"), ip.to_string()));
    }
    v.push(("KUBERNETES_SERVICE_HOST".into(), "10.96.0.1".into()));
    v.push(("KUBERNETES_SERVICE_PORT".into(), "443".into()));
    v
}

/// A GET from inside the namespace; (status, body).
fn http_get_in(ns: &Netns, addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    ns.run(|| {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: nodedns\r\nConnection: close\r\n\r\n"
        )?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        Ok((status, body.to_string()))
    })
}

fn wait_http_200(ns: &Netns, addr: SocketAddr, path: &str) -> Result<(), String> {
    let mut last = String::new();
    if poll(Duration::from_secs(15), || {
        match http_get_in(ns, addr, path) {
            Ok((200, _)) => true,
            Ok((code, body)) => {
                last = format!("{code} {body}");
                false
            }
            Err(e) => {
                last = e.to_string();
                false
            }
        }
    }) {
        Ok(())
    } else {
        Err(format!("GET {addr}{path}: {last}"))
    }
}

/// A namespace with the node resolver and the cluster DNS (at `cluster_ip`) as fakes.
fn cluster_namespace(tag: &str, cluster_ip: &str) -> (Netns, NsUpstream, NsUpstream) {
    let mut ns = Netns::new(tag);
    for ip in [cluster_ip, NODE_RESOLVER] {
        ns.ok(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "lo"]);
    }
    // dnsPolicy Default: the node's resolv.conf (`ip netns exec` mounts this one over it).
    ns.set_resolv_conf(&format!("nameserver {NODE_RESOLVER}\n"));
    let cluster = NsUpstream::start(&ns, &format!("{cluster_ip}:53"));
    cluster.set_a(CLUSTER_NAME, CLUSTER_IP.parse().expect("literal"), 30);
    let node = NsUpstream::start(&ns, &format!("{NODE_RESOLVER}:53"));
    node.set_a(EXTERNAL_NAME, EXTERNAL_IP.parse().expect("literal"), 30);
    (ns, cluster, node)
}

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().expect("literal IP"), port)
}

#[test]
fn the_manifest_as_shipped_serves_in_a_namespace() {
    require_netns!("the_manifest_as_shipped_serves_in_a_namespace");
    if !have_tool("the_manifest_as_shipped_serves_in_a_namespace", "iptables") {
        return;
    }
    let text = rendered_manifest("s/__PILLAR__DNS__SERVER__/$kubedns/g");
    assert!(
        !text.contains("__PILLAR__DNS__DOMAIN__") && !text.contains("__PILLAR__LOCAL__DNS__"),
        "the sed recipe leaves install-time placeholders"
    );
    let m = manifest(&text);
    let (ns, cluster, node) = cluster_namespace("deploy", UPSTREAM_SVC_IP);
    let (mut nd, volume) = start_from_manifest(&ns, &m);

    // A cluster name from the cluster DNS (over TCP: the template's force_tcp), on the link-local
    // IP and on the taken-over kube-dns ClusterIP; an external name from the node's resolver.
    let r = ns.query(local_dns(), CLUSTER_NAME, RecordType::A);
    assert_eq!(r.response_code, ResponseCode::NoError, "{r:?}");
    assert_eq!(a_strings(&r), vec![CLUSTER_IP.to_string()]);
    assert!(
        cluster.tcp_queries_for(CLUSTER_NAME) >= 1,
        "the cluster zone goes over TCP"
    );
    let r = ns.query(sa(KUBEDNS, 53), CLUSTER_NAME, RecordType::A);
    assert_eq!(a_strings(&r), vec![CLUSTER_IP.to_string()]);
    let r = ns.query(local_dns(), EXTERNAL_NAME, RecordType::A);
    assert_eq!(a_strings(&r), vec![EXTERNAL_IP.to_string()], "{r:?}");
    assert_eq!(node.queries(EXTERNAL_NAME), 1);
    assert_eq!(cluster.queries(EXTERNAL_NAME), 0);

    // The probes, where the manifest points them.
    let (host, port, path) = &m.ready;
    assert_eq!(host, LOCAL);
    wait_http_200(&ns, sa(host, *port), path)
        .unwrap_or_else(|e| panic!("readiness probe: {e}\nstderr:\n{}", nd.stderr_text()));
    let (host, port, path) = &m.live;
    wait_http_200(&ns, sa(host, *port), path)
        .unwrap_or_else(|e| panic!("liveness probe: {e}\nstderr:\n{}", nd.stderr_text()));
    // Both IPs got the addon's 12 rules each; the Prometheus port and node-cache's own one answer.
    assert_eq!(ns.nodedns_rule_count(), 24, "{}", ns.iptables_save());
    let (code, body) = http_get_in(&ns, sa("127.0.0.1", 9253), "/metrics").expect("9253");
    assert_eq!(code, 200);
    assert!(body.contains("nodedns_build_info{"), "{body}");
    let (code, body) = http_get_in(&ns, sa("127.0.0.1", 9353), "/metrics").expect("9353");
    assert_eq!(code, 200);
    assert!(
        body.contains(r#"coredns_nodecache_setup_errors_total{errortype="iptables"} 0"#),
        "{body}"
    );
    nd.stop();
    assert_eq!(ns.nodedns_rule_count(), 0, "teardown");
    // The cache file the Corefile names, written at stop into the node directory (the hostPath).
    assert_eq!(m.host_dirs, vec!["/var/lib/nodedns".to_string()]);
    let cache_file = volume.join("host-0").join("cache.bin");
    assert!(
        m.corefile.contains("file /var/lib/nodedns/cache.bin"),
        "the ConfigMap's Corefile names the cache file"
    );
    assert!(
        cache_file.is_file(),
        "{} written at stop\nstderr:\n{}",
        cache_file.display(),
        nd.stderr_text()
    );
    let _ = std::fs::remove_dir_all(&volume);
}

/// Starts nodedns in `ns` as the kubelet would run the manifest's container: its args (the
/// ConfigMap volume's mountPath rewritten to a directory holding the Corefile as Corefile.base, as
/// the volume's `items` name it), its env plus the Service variables, and `--link-kind bridge`.
/// Each node directory's mountPath (see the module doc) becomes `VOLUME/host-N`, in the args and
/// in the Corefile. Returns the process and the volume directory (remove it at the end).
fn start_from_manifest(ns: &Netns, m: &Manifest) -> (NsNodedns, PathBuf) {
    let volume = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("deploy-{}", ns.name));
    let _ = std::fs::remove_dir_all(&volume);
    std::fs::create_dir_all(&volume).expect("mkdir");
    let volume_str = volume.to_string_lossy().into_owned();
    let mut corefile = m.corefile.clone();
    let mut host_dirs = Vec::new();
    for (i, dir) in m.host_dirs.iter().enumerate() {
        // What the kubelet's DirectoryOrCreate does on the node.
        let d = volume.join(format!("host-{i}"));
        std::fs::create_dir_all(&d).expect("mkdir");
        let d = d.to_string_lossy().into_owned();
        corefile = corefile.replace(dir.as_str(), &d);
        host_dirs.push((dir.clone(), d));
    }
    std::fs::write(volume.join("Corefile.base"), &corefile).expect("write Corefile.base");
    let mut args: Vec<String> = m
        .args
        .iter()
        .map(|a| {
            let mut a = a.replace("/etc/coredns", &volume_str);
            for (dir, d) in &host_dirs {
                a = a.replace(dir.as_str(), d);
            }
            a
        })
        .collect();
    assert!(
        m.mount_paths.iter().any(|p| p == "/etc/coredns"),
        "{:?}",
        m.mount_paths
    );
    assert!(
        args.iter().any(|a| a.contains(&volume_str)),
        "the args must name the mounted template: {args:?}"
    );
    args.extend(["--link-kind".into(), "bridge".into()]);
    let mut env = m.env.clone();
    env.extend(kubelet_env());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let envv: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    (NsNodedns::start(ns, &argv, &envv), volume)
}

/// The README's IPVS recipe: nodedns on the link-local IP only, the cluster zones straight to the
/// kube-dns IP (which IPVS holds, here an address on lo with the fake cluster DNS behind it).
#[test]
fn the_ipvs_recipe_serves_on_the_link_local_ip_only() {
    require_netns!("the_ipvs_recipe_serves_on_the_link_local_ip_only");
    if !have_tool(
        "the_ipvs_recipe_serves_on_the_link_local_ip_only",
        "iptables",
    ) {
        return;
    }
    let text = rendered_manifest("s/,__PILLAR__DNS__SERVER__//g");
    let m = manifest(&text);
    assert!(
        m.args.iter().any(|a| a == &format!("-localip={LOCALDNS}")),
        "{:?}",
        m.args
    );
    let (ns, cluster, node) = cluster_namespace("ipvs", KUBEDNS);
    let (mut nd, volume) = start_from_manifest(&ns, &m);
    let r = ns.query(local_dns(), CLUSTER_NAME, RecordType::A);
    assert_eq!(a_strings(&r), vec![CLUSTER_IP.to_string()], "{r:?}");
    assert!(cluster.tcp_queries_for(CLUSTER_NAME) >= 1);
    let r = ns.query(local_dns(), EXTERNAL_NAME, RecordType::A);
    assert_eq!(a_strings(&r), vec![EXTERNAL_IP.to_string()], "{r:?}");
    assert_eq!(node.queries(EXTERNAL_NAME), 1);
    let (host, port, path) = &m.ready;
    wait_http_200(&ns, sa(host, *port), path)
        .unwrap_or_else(|e| panic!("readiness probe: {e}\nstderr:\n{}", nd.stderr_text()));
    // One IP, 12 rules; the kube-dns IP is not nodedns's.
    assert_eq!(ns.nodedns_rule_count(), 12, "{}", ns.iptables_save());
    assert!(!ns.addrs_of(crate::netns_e2e::LINK).contains(KUBEDNS));
    nd.stop();
    let _ = std::fs::remove_dir_all(&volume);
}

/// The addon's own DaemonSet args start nodedns on the addon's template (mounted here at the
/// test's path, as the ConfigMap volume would be at /etc/coredns/Corefile.base).
#[test]
fn the_addons_daemonset_args_start_nodedns() {
    require_netns!("the_addons_daemonset_args_start_nodedns");
    if !have_tool("the_addons_daemonset_args_start_nodedns", "iptables") {
        return;
    }
    let (ns, cluster, node) = cluster_namespace("addonargs", UPSTREAM_SVC_IP);
    let pidfile = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{}.pid", ns.name));
    let _ = std::fs::remove_file(&pidfile);
    let template = repo("src/config/testdata/addon-template.Corefile");
    let localip = format!("{LOCALDNS},{KUBEDNS}");
    let args = [
        "-localip",
        &localip,
        "-conf",
        "/etc/Corefile",
        "-upstreamsvc",
        "kube-dns-upstream",
        "-pidfile",
        pidfile.to_str().expect("utf-8 path"),
        // What the ConfigMap volume provides, and this kernel's link kind.
        "--basecorefile",
        template.to_str().expect("utf-8 path"),
        "--link-kind",
        "bridge",
    ];
    let env = kubelet_env();
    let envv: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut nd = NsNodedns::start(&ns, &args, &envv);
    let pid = std::fs::read_to_string(&pidfile).expect("the pidfile is written once bound");
    assert_eq!(pid.trim(), nd.pid().to_string());
    let r = ns.query(local_dns(), CLUSTER_NAME, RecordType::A);
    assert_eq!(a_strings(&r), vec![CLUSTER_IP.to_string()]);
    assert!(cluster.tcp_queries_for(CLUSTER_NAME) >= 1);
    let r = ns.query(sa(KUBEDNS, 53), EXTERNAL_NAME, RecordType::A);
    assert_eq!(a_strings(&r), vec![EXTERNAL_IP.to_string()]);
    assert_eq!(node.queries(EXTERNAL_NAME), 1);
    // The template's own `health 169.254.20.10:8080`.
    wait_http_200(&ns, sa(LOCAL, 8080), "/ready")
        .unwrap_or_else(|e| panic!("{e}\nstderr:\n{}", nd.stderr_text()));
    assert_eq!(ns.nodedns_rule_count(), 24, "{}", ns.iptables_save());
    nd.stop();
    assert!(!pidfile.exists(), "the pidfile is removed at exit");
}

/// The addon's args with a wrong flag or value: exit 2 with one line, before any node setup.
#[test]
fn the_addons_args_with_a_wrong_flag_exit_2() {
    let base = [
        "-localip",
        "169.254.20.10,10.0.0.10",
        "-conf",
        "/nonexistent/Corefile",
        "-upstreamsvc",
        "kube-dns-upstream",
    ];
    for extra in [
        &["-bogus"][..],
        &["-health-port"][..],
        &["-health-port", "http"][..],
        &["-localip", "169.254.20.10,"][..],
        &["-setupiptables=sometimes"][..],
        &["-syncinterval", "soon"][..],
        &["-h-e-a-l-t-h"][..],
    ] {
        let out = Command::new(crate::harness::bin())
            .args(base)
            .args(extra)
            .env_remove("KUBE_DNS_UPSTREAM_SERVICE_HOST")
            .output()
            .expect("run nodedns");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{extra:?}: one line: {stderr}");
        assert!(out.stdout.is_empty(), "{extra:?}: no help on stdout");
    }
}

/// Flags build the zones and the Service variable is missing or malformed: nodedns serves (the
/// default zone) but `/ready` is 503 naming the variable; with it set, 200.
#[test]
fn ready_names_a_missing_or_malformed_service_variable() {
    require_netns!("ready_names_a_missing_or_malformed_service_variable");
    let (ns, _cluster, node) = cluster_namespace("svcvar", UPSTREAM_SVC_IP);
    let health = format!("{LOCAL}:9053");
    let args = [
        "--listen",
        "169.254.20.10:53",
        "--link-kind",
        "bridge",
        "--firewall",
        "none",
        "--health-listen",
        &health,
        "--metrics-listen",
        "off",
        "--metrics-listen-address",
        "off",
    ];
    type Env<'a> = &'a [(&'a str, &'a str)];
    let cases: [(Env, Option<&str>); 3] = [
        (&[], Some("KUBE_DNS_UPSTREAM_SERVICE_HOST is not set")),
        (
            &[
                ("KUBE_DNS_UPSTREAM_SERVICE_HOST", UPSTREAM_SVC_IP),
                ("KUBE_DNS_UPSTREAM_SERVICE_PORT", "0"),
            ],
            Some("KUBE_DNS_UPSTREAM_SERVICE_PORT"),
        ),
        (
            &[
                ("KUBE_DNS_UPSTREAM_SERVICE_HOST", UPSTREAM_SVC_IP),
                ("KUBE_DNS_UPSTREAM_SERVICE_PORT", "53"),
            ],
            None,
        ),
    ];
    for (env, want) in cases {
        let mut nd = NsNodedns::start(&ns, &args, env);
        // It serves from the default zone all the same.
        let r = ns.query(local_dns(), EXTERNAL_NAME, RecordType::A);
        assert_eq!(a_strings(&r), vec![EXTERNAL_IP.to_string()]);
        let addr = sa(LOCAL, 9053);
        match want {
            Some(var) => {
                assert!(nd.wait_log(var, Duration::from_secs(5)), "warned at start");
                // Once the upstream answered, the variable is all that is missing.
                let mut last = (0, String::new());
                let named = poll(Duration::from_secs(10), || {
                    last = http_get_in(&ns, addr, "/ready").unwrap_or((0, String::new()));
                    last.0 == 503 && last.1.contains(var) && !last.1.contains("upstream_reachable")
                });
                assert!(named, "{env:?}: /ready {last:?}");
            }
            None => wait_http_200(&ns, addr, "/ready")
                .unwrap_or_else(|e| panic!("{e}\nstderr:\n{}", nd.stderr_text())),
        }
        nd.stop();
    }
    assert!(node.queries(EXTERNAL_NAME) >= 1);
}

/// Metric-name-like words of a PromQL expression (`nodedns_*`, `coredns_*`, `process_*`), with
/// quoted strings (label values) left out.
fn metric_names(expr: &str) -> Vec<String> {
    let mut unquoted = String::new();
    let mut in_quote = false;
    for c in expr.chars() {
        if c == '"' {
            in_quote = !in_quote;
        } else if !in_quote {
            unquoted.push(c);
        }
    }
    unquoted
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| {
            ["nodedns_", "coredns_", "process_"]
                .iter()
                .any(|p| w.starts_with(p))
        })
        .map(String::from)
        .collect()
}

/// Every `expr` and templating `query` string in the dashboard JSON.
fn dashboard_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                        out.push(s.clone())
                    }
                    _ => dashboard_queries(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| dashboard_queries(x, out)),
        _ => {}
    }
}

/// The series names in a Prometheus text exposition: sample names, and for each `# TYPE` the
/// names its samples can have (`_total`, `_bucket`/`_sum`/`_count`), so a series that has no
/// sample yet still counts as exported.
fn exported_names(body: &str, names: &mut std::collections::BTreeSet<String>) {
    for line in body.lines() {
        if let Some(t) = line.strip_prefix("# TYPE ") {
            let mut w = t.split_whitespace();
            let (Some(name), Some(kind)) = (w.next(), w.next()) else {
                continue;
            };
            names.insert(name.to_string());
            match kind {
                "counter" => {
                    names.insert(format!("{}_total", name.trim_end_matches("_total")));
                }
                "histogram" => {
                    for s in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{s}"));
                    }
                }
                _ => {}
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
}

fn http_get_local(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: nodedns\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read");
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

/// The Grafana dashboard parses, and every metric its panels, the alert rules and the variables
/// query is one the real binary exports on its two metrics ports.
#[tokio::test]
async fn dashboard_and_alerts_query_only_exported_metrics() {
    use crate::fake_upstream::FakeUpstream;
    use crate::harness::{Nodedns, free_port, query_udp};

    let up = FakeUpstream::start().await;
    up.set_a("a.example", "192.0.2.1".parse().expect("literal"), 30);
    let m = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let s = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (ms, ss) = (m.to_string(), s.to_string());
    let node = Nodedns::with_upstream(
        &up,
        &["--metrics-listen", &ms, "--metrics-listen-address", &ss],
    )
    .await;
    query_udp(node.addr, "a.example", RecordType::A, None, false).await;
    let mut names = std::collections::BTreeSet::new();
    for addr in [m, s] {
        let (code, body) = tokio::task::spawn_blocking(move || http_get_local(addr, "/metrics"))
            .await
            .expect("join");
        assert_eq!(code, 200, "{addr}");
        exported_names(&body, &mut names);
    }
    assert!(
        names.contains("coredns_nodecache_setup_errors_total"),
        "{names:?}"
    );

    let text = std::fs::read_to_string(repo("deploy/grafana-dashboard.json")).expect("read");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "{} panels", panels.len());
    let mut queries = Vec::new();
    for p in panels {
        let targets = p["targets"].as_array().expect("every panel has targets");
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        let before = queries.len();
        dashboard_queries(p, &mut queries);
        assert!(queries.len() > before, "panel {} has no expr", p["title"]);
    }
    // Query variables (a datasource variable's `query` is the plugin type, not PromQL).
    for v in dash["templating"]["list"]
        .as_array()
        .expect("templating.list")
    {
        if v["type"] == "query" {
            dashboard_queries(v, &mut queries);
        }
    }

    let rules = std::fs::read_to_string(repo("deploy/alerts.yaml")).expect("read alerts");
    let docs = YamlLoader::load_from_str(&rules).expect("alerts.yaml parses");
    for g in docs[0]["groups"].as_vec().expect("groups") {
        for r in g["rules"].as_vec().expect("rules") {
            queries.push(r["expr"].as_str().expect("expr").to_string());
        }
    }

    let mut unknown = Vec::new();
    for q in &queries {
        let used = metric_names(q);
        assert!(!used.is_empty(), "a query names no nodedns metric: {q}");
        for n in used {
            if !names.contains(&n) {
                unknown.push(format!("{n} (in {q})"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "not exported:\n{}\nexported: {names:?}",
        unknown.join("\n")
    );
    drop(node);
}

#[test]
fn metric_names_skip_label_values() {
    assert_eq!(
        metric_names(
            r#"sum(rate(coredns_cache_hits_total{job="nodedns_x"}[5m])) / process_open_fds"#
        ),
        vec!["coredns_cache_hits_total", "process_open_fds"]
    );
}
