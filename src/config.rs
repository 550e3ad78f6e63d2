//! Command-line flags, environment discovery and resolv.conf, turned into one validated [`Config`].
//!
//! Flags follow the NodeLocal DNSCache addon where it has an equivalent (defaults included), with
//! durations that accept a unit (`30`, `500ms`, `5s`, `1m`) and booleans that accept `--flag`,
//! `--flag=true` and `--flag=false` (the addon's `-setupinterface=false` style).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser};

pub use crate::logging::LogFormat;

pub mod addon;
mod common;
pub mod corefile;
pub mod model;
pub mod toml_file;
use thiserror::Error;

use crate::cache::Limits;
use crate::firewall::Backend;
use crate::netif::LinkKind;
use crate::upstream;
use model::{CachePolicy, Model, Policy, Sources, Transport, Zone};

/// A node-local DNS cache for Kubernetes: answers pods from a TTL-aware cache and forwards misses,
/// the cluster zones to the cluster DNS and the rest to the node's resolvers.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "nodedns",
    version,
    about,
    max_term_width = 100,
    args_override_self = true
)]
pub struct Cli {
    /// Configuration file: a CoreDNS Corefile (the addon's), or nodedns's TOML when it ends in
    /// `.toml`. It sets zones, caches, forwarders and listen addresses; flags keep the node setup.
    /// With an addon template (--basecorefile) present, the rendered Corefile (the addon's -conf).
    #[arg(long, value_name = "FILE")]
    pub conf: Option<PathBuf>,

    /// The addon's Corefile template (its ConfigMap): rendered with the __PILLAR__ placeholders
    /// filled in when --conf is given and this file exists.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/etc/coredns/Corefile.base"
    )]
    pub basecorefile: PathBuf,

    /// Directory of the mounted kube-dns ConfigMap (stubDomains, upstreamNameservers), used with
    /// the template; default /etc/kube-dns when it exists.
    #[arg(long, value_name = "DIR")]
    pub kubednscm: Option<PathBuf>,

    /// Accepted for the addon's DaemonSet args: nodedns reloads by itself when its inputs change
    /// (and on SIGHUP/SIGUSR1).
    #[arg(long, value_name = "BOOL", default_value = "false", num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set, value_parser = parse_bool)]
    pub reloadwithsignal: bool,

    /// Flags given on the command line (not defaults), for the rules on flags and a file together.
    #[arg(skip)]
    pub explicit: Vec<String>,

    /// Address to serve DNS on, over UDP and TCP (repeatable; IPv4 or IPv6, e.g. [::1]:53).
    #[arg(long, value_name = "ADDR:PORT", default_value = "169.254.20.10:53", value_parser = parse_listen)]
    pub listen: Vec<SocketAddr>,

    /// Server for the default zone `.` (repeatable). Without it, the nameservers of --resolv-conf.
    #[arg(long, value_name = "ADDR[:PORT]", value_parser = parse_server)]
    pub upstream: Vec<SocketAddr>,

    /// Send a zone to its own servers: ZONE=ADDR[:PORT][,ADDR...] (repeatable). The longest
    /// matching zone wins; `.` is the default zone.
    #[arg(long, value_name = "ZONE=ADDRS", value_parser = parse_forward)]
    pub forward: Vec<ForwardFlag>,

    /// resolv.conf whose nameservers serve the default zone when --upstream is not given.
    #[arg(long, value_name = "PATH", default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,

    /// Cluster domain: with the cluster DNS found in the environment, it and the reverse zones
    /// (in-addr.arpa, ip6.arpa) go there.
    #[arg(long, value_name = "DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,

    /// Service whose <NAME>_SERVICE_HOST/_PORT environment variables (set by the kubelet) give the
    /// cluster DNS address, as the addon's -upstreamsvc.
    #[arg(long, value_name = "NAME", default_value = "kube-dns-upstream")]
    pub upstream_svc: String,

    /// Lower bound on how long a positive answer is cached.
    #[arg(long, value_name = "DUR", default_value = "0", value_parser = parse_duration)]
    pub min_ttl: Duration,

    /// Upper bound on how long a positive answer is cached (the addon's `cache 30`).
    #[arg(long, value_name = "DUR", default_value = "30s", value_parser = parse_duration)]
    pub max_ttl: Duration,

    /// Upper bound on how long NXDOMAIN/NODATA is cached (the addon's denial TTL).
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = parse_duration)]
    pub max_negative_ttl: Duration,

    /// How long a SERVFAIL is cached; 0 turns it off.
    #[arg(long, value_name = "DUR", default_value = "0", value_parser = parse_duration)]
    pub servfail_ttl: Duration,

    /// Positive cache entries (the addon's `success 9984`).
    #[arg(long, value_name = "N", default_value_t = 9984)]
    pub cache_size: usize,

    /// Negative cache entries (the addon's `denial 9984`).
    #[arg(long, value_name = "N", default_value_t = 9984)]
    pub negative_cache_size: usize,

    /// Memory budget of the positive cache, in bytes (suffixes K, M, G accepted).
    #[arg(long, value_name = "BYTES", default_value = "32M", value_parser = parse_bytes)]
    pub cache_bytes: u64,

    /// Memory budget of the negative cache, in bytes.
    #[arg(long, value_name = "BYTES", default_value = "8M", value_parser = parse_bytes)]
    pub negative_cache_bytes: u64,

    /// Send every upstream query over TCP, on reused pipelined connections (the addon does this
    /// toward the cluster DNS).
    #[arg(long, value_name = "BOOL", default_value = "false", num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set, value_parser = parse_bool)]
    pub force_tcp: bool,

    /// Timeout of one upstream attempt; the next server (or the same, if alone) is tried after it.
    #[arg(long, value_name = "DUR", default_value = "2s", value_parser = parse_duration)]
    pub attempt_timeout: Duration,

    /// Overall deadline of a forwarded query; past it the client gets SERVFAIL.
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = parse_duration)]
    pub query_deadline: Duration,

    /// Forwarded queries in flight at once; past it clients get REFUSED (bounds memory).
    #[arg(long, value_name = "N", default_value_t = 2000)]
    pub max_concurrent: usize,

    /// Order the servers of a flag-built zone are tried in: random, round_robin, sequential, or
    /// fastest (lowest smoothed round-trip time first; servers marked down are skipped).
    #[arg(long, value_name = "POLICY", default_value = "fastest", value_parser = parse_policy)]
    pub upstream_policy: Policy,

    /// Consecutive failed attempts (timeouts, network errors) before an upstream is marked down
    /// and skipped until its health probe answers; 0 turns health checking off.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub max_fails: u32,

    /// Pipelined TCP connections per upstream server (each closed after its zone's `expire`, 10s
    /// for flag-built zones, so kube-proxy spreads them over the cluster DNS pods).
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub tcp_pool_size: usize,

    /// How often an upstream marked down is probed (`. IN NS`).
    #[arg(long, value_name = "DUR", default_value = "500ms", value_parser = parse_duration)]
    pub health_check: Duration,

    /// UDP worker threads per listen address (0: one per CPU).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub workers: usize,

    /// Open client TCP connections at most; more are closed at once.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub max_tcp_connections: usize,

    /// Idle client TCP connections are closed after this long.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = parse_duration)]
    pub tcp_idle_timeout: Duration,

    /// Create the link --interface and put the listen IPs on it (needs CAP_NET_ADMIN), as the
    /// addon's -setupinterface.
    #[arg(long, value_name = "BOOL", default_value = "true", num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set, value_parser = parse_bool)]
    pub setup_interface: bool,

    /// Name of the link that holds the local IPs.
    #[arg(long, value_name = "NAME", default_value = "nodelocaldns")]
    pub interface: String,

    /// Kind of that link: dummy, or bridge where the kernel has no dummy link type.
    #[arg(long, value_name = "KIND", default_value = "dummy")]
    pub link_kind: String,

    /// Packet filter for the NOTRACK/ACCEPT rules: iptables, nftables, none, or auto (iptables
    /// when nodedns put addresses on its link, none otherwise).
    #[arg(long, value_name = "BACKEND", default_value = "auto")]
    pub firewall: String,

    /// How often the link, addresses and rules are checked and repaired.
    #[arg(long, value_name = "DUR", default_value = "60s", value_parser = parse_duration)]
    pub sync_interval: Duration,

    /// Leave the link, addresses and rules in place at exit (for two instances side by side).
    #[arg(long, value_name = "BOOL", default_value = "false", num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set, value_parser = parse_bool)]
    pub skip_teardown: bool,

    /// Log level (error, warn, info, debug, trace, off; or TARGET=LEVEL,...); RUST_LOG overrides it.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log format: text or json.
    #[arg(long, value_name = "FORMAT", default_value = "text")]
    pub log_format: LogFormat,

    /// Log every answered query (name, type, rcode, source) at info level.
    #[arg(long, value_name = "BOOL", default_value = "false", num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set, value_parser = parse_bool)]
    pub log_queries: bool,

    /// Address of the Prometheus /metrics endpoint (also serves /health and /ready); `off` disables.
    #[arg(long, value_name = "ADDR:PORT|off", default_value = "0.0.0.0:9253", value_parser = parse_optional_listen)]
    pub metrics_listen: OptionalAddr,

    /// How often the configuration's input files (resolv.conf, --conf, the kube-dns ConfigMap) are
    /// checked for a change, which reloads; SIGHUP and SIGUSR1 reload at once.
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = parse_duration)]
    pub reload_interval: Duration,

    /// Address of the /health and /ready endpoints (also serves /metrics); default: the first
    /// --listen IP, port 8080 (as the addon's health plugin); `off` disables.
    #[arg(long, value_name = "ADDR:PORT|off", value_parser = parse_optional_listen)]
    pub health_listen: Option<OptionalAddr>,
}

/// Flags that a configuration file replaces: given together with `--conf`, an error.
const FILE_OWNED_FLAGS: [&str; 13] = [
    "upstream",
    "forward",
    "min_ttl",
    "max_ttl",
    "max_negative_ttl",
    "servfail_ttl",
    "cache_size",
    "negative_cache_size",
    "force_tcp",
    "cluster_domain",
    // A file sets these per zone (`policy`, `max_fails`, `health_check`).
    "upstream_policy",
    "max_fails",
    "health_check",
];

/// Go's `flag` syntax: `-conf` means `--conf` (node-cache's DaemonSet args). Any single-dash
/// word longer than one letter is taken as a long flag, so an unknown one is an error, never
/// clap's `-h` read out of `-health-port`.
fn go_style(arg: String) -> String {
    let b = arg.as_bytes();
    if b.len() > 2 && b[0] == b'-' && b[1] != b'-' && b[1].is_ascii_alphabetic() {
        format!("-{arg}")
    } else {
        arg
    }
}

/// A listen address that may be turned off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionalAddr(pub Option<SocketAddr>);

/// Parses an upstream policy name (the Corefile's and TOML's spelling).
pub fn parse_policy(s: &str) -> Result<Policy, String> {
    match s.trim() {
        "random" => Ok(Policy::Random),
        "round_robin" => Ok(Policy::RoundRobin),
        "sequential" => Ok(Policy::Sequential),
        "fastest" => Ok(Policy::Fastest),
        p => Err(format!(
            "unknown policy {p:?}: use random, round_robin, sequential or fastest"
        )),
    }
}

/// Parses `IP:PORT` or `off`.
pub fn parse_optional_listen(s: &str) -> Result<OptionalAddr, String> {
    match s.trim() {
        "off" | "none" | "" => Ok(OptionalAddr(None)),
        a => parse_listen(a).map(|a| OptionalAddr(Some(a))),
    }
}

/// A bad configuration, reported in one line before anything starts.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot read nameservers from {path}: {reason}")]
    ResolvConf { path: String, reason: String },
    #[error("environment variable {var}={value:?} is not a valid {what}")]
    Env {
        var: String,
        value: String,
        what: &'static str,
    },
}

impl Config {
    /// The DNS part of this configuration as a [`Model`] (what `check-config` prints).
    pub fn effective_model(&self) -> Model {
        Model {
            listen: self.listen.clone(),
            port: None,
            zones: self.zones.clone(),
            health: self.health_listen.map(|addr| model::Health {
                addr,
                lameduck: Duration::ZERO,
            }),
            ready: None,
            metrics: self.metrics_listen,
            reload: Some(self.reload_interval),
            log_queries: self.log_queries,
            loop_detect: false,
            inputs: self.inputs.clone(),
        }
    }
}

/// What in `m` is accepted but not acted on yet (see [`Config::inert`]).
fn inert_settings(m: &Model) -> Vec<String> {
    let mut out = Vec::new();
    for z in &m.zones {
        let mut what = Vec::new();
        if z.cache.prefetch.is_some() {
            what.push("prefetch");
        }
        if z.cache.serve_stale.is_some() {
            what.push("serve_stale");
        }
        if !what.is_empty() {
            out.push(format!(
                "zone {} ({}): {}",
                z.name,
                z.origin,
                what.join(", ")
            ));
        }
    }
    if m.loop_detect {
        out.push(
            "loop: only the static check (no zone forwards to nodedns's own address) is done"
                .into(),
        );
    }
    if m.health.is_some_and(|h| !h.lameduck.is_zero()) {
        out.push("health lameduck: SIGTERM stops at once".into());
    }
    out
}

/// A `--forward ZONE=ADDRS` flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardFlag {
    /// Normalised (see [`model::normalize_zone`]).
    pub zone: String,
    pub servers: Vec<SocketAddr>,
}

/// The validated configuration the rest of nodedns runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    /// Zones with their servers and policies; names are unique.
    pub zones: Vec<Zone>,
    pub limits: Limits,
    pub upstream: upstream::Options,
    pub server: crate::server::Options,
    pub metrics_listen: Option<SocketAddr>,
    pub health_listen: Option<SocketAddr>,
    pub log_queries: bool,
    pub node: NodeOptions,
    /// Files (or ConfigMap directories) the configuration was read from: a change of their
    /// content triggers a reload.
    pub inputs: Vec<PathBuf>,
    /// How often `inputs` are checked for a change.
    pub reload_interval: Duration,
    /// Settings the file gives that are read and validated but do not change behaviour yet, one
    /// phrase each (logged as warnings at start, so none is silently ignored).
    pub inert: Vec<String>,
}

/// Node setup: the link, its addresses and the packet-filter rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeOptions {
    pub setup_interface: bool,
    pub interface: String,
    pub link_kind: LinkKind,
    /// `None`: auto (iptables when nodedns put the listen IPs on its link, none otherwise).
    pub firewall: Option<Backend>,
    pub sync_interval: Duration,
    pub skip_teardown: bool,
}

/// Parses `30`, `500ms`, `5s`, `1m`, `1h` into a duration.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (use e.g. 30, 500ms, 5s, 1m)"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "invalid duration unit in {s:?} (use ms, s, m or h)"
            ));
        }
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("duration {s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `true`/`false` (and 1/0, yes/no) for boolean flags.
pub fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("invalid boolean {s:?} (use true or false)")),
    }
}

/// Parses a byte count with an optional K/M/G suffix (powers of 1024).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim().trim_end_matches(['B', 'b', 'i']);
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("invalid byte count {s:?} (use e.g. 33554432, 32M, 1G)"))
}

/// Parses a listen address: `IP:PORT` or `[IPv6]:PORT`.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!("invalid listen address {s:?} (use IP:PORT, e.g. 169.254.20.10:53 or [::1]:53)")
    })
}

/// Parses a server: `IP`, `IP:PORT`, `[IPv6]:PORT` or a bare IPv6 address; the port defaults to 53.
/// Port 0 is refused: every query sent there would fail.
pub fn parse_server(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    let addr = match s.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            let ip = s.trim_start_matches('[').trim_end_matches(']');
            ip.parse::<IpAddr>()
                .map(|ip| SocketAddr::new(ip, 53))
                .map_err(|_| format!("invalid server address {s:?} (use IP or IP:PORT)"))?
        }
    };
    if addr.port() == 0 {
        return Err(format!("invalid server address {s:?}: port 0"));
    }
    if addr.ip().is_unspecified() {
        return Err(format!("invalid server address {s:?}: unspecified IP"));
    }
    Ok(addr)
}

/// Parses `ZONE=ADDR[:PORT][,ADDR...]`.
pub fn parse_forward(s: &str) -> Result<ForwardFlag, String> {
    let (zone, servers) = s
        .split_once('=')
        .ok_or_else(|| format!("invalid --forward {s:?} (use ZONE=ADDR[:PORT][,ADDR...])"))?;
    let zone = model::normalize_zone(zone)?;
    let servers = servers
        .split(',')
        .map(parse_server)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ForwardFlag { zone, servers })
}

/// Checks a `--log-level` value: a level word, or comma-separated `TARGET=LEVEL` directives. An
/// unknown word would otherwise be taken as a target name and silently turn every line off.
pub fn check_log_level(s: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
    for d in s.split(',') {
        let d = d.trim();
        let level = d.rsplit_once('=').map_or(d, |(_, l)| l);
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "invalid --log-level {s:?}: {level:?} is not a level (use error, warn, info, debug, trace or off, or TARGET=LEVEL)"
            ));
        }
    }
    Ok(())
}

/// The nameservers of resolv.conf text (port 53, in order, deduplicated). Lines other than
/// `nameserver` are ignored, as glibc does; a `nameserver` line with something other than an IP
/// address is an error naming the line.
pub fn parse_resolv_conf(text: &str) -> Result<Vec<SocketAddr>, String> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(w) = words.next() else {
            return Err(format!("line {}: nameserver without an address", i + 1));
        };
        // A link-local IPv6 address may carry a zone (`fe80::1%eth0`), which a SocketAddr cannot
        // hold without a scope id lookup: such servers are skipped.
        if w.contains('%') {
            continue;
        }
        let ip: IpAddr = w
            .parse()
            .map_err(|_| format!("line {}: {w:?} is not an IP address", i + 1))?;
        let a = SocketAddr::new(ip, 53);
        if !out.contains(&a) {
            out.push(a);
        }
    }
    if out.is_empty() {
        return Err("no nameserver lines".into());
    }
    Ok(out)
}

/// Environment through a closure, files from the file system (the flags' sources).
struct EnvSources<F>(F);

impl<F: Fn(&str) -> Option<String>> Sources for EnvSources<F> {
    fn env(&self, name: &str) -> Option<String> {
        (self.0)(name)
    }
    fn read(&self, path: &std::path::Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }
}

/// The cluster DNS address from a Service's environment variables (`<SVC>_SERVICE_HOST` and
/// `_PORT`, set by the kubelet), `Ok(None)` when the host variable is unset.
pub fn service_addr(src: &dyn Sources, svc: &str) -> Result<Option<SocketAddr>, ConfigError> {
    let prefix = service_env_prefix(svc);
    let host_var = format!("{prefix}_SERVICE_HOST");
    let Some(host) = src.env(&host_var).filter(|h| !h.is_empty()) else {
        return Ok(None);
    };
    let ip: IpAddr = host.trim().parse().map_err(|_| ConfigError::Env {
        var: host_var.clone(),
        value: host.clone(),
        what: "IP address",
    })?;
    let port_var = format!("{prefix}_SERVICE_PORT");
    let port = match src.env(&port_var).filter(|p| !p.is_empty()) {
        Some(p) => match p.trim().parse::<u16>() {
            Ok(n) if n != 0 => n,
            _ => {
                return Err(ConfigError::Env {
                    var: port_var,
                    value: p.clone(),
                    what: "port (1-65535)",
                });
            }
        },
        None => 53,
    };
    Ok(Some(SocketAddr::new(ip, port)))
}

/// The env var prefix the kubelet uses for a service: upper case, `-` → `_`.
pub fn service_env_prefix(svc: &str) -> String {
    svc.to_ascii_uppercase().replace('-', "_")
}

impl Cli {
    /// Validates flags and fills in what comes from the environment and resolv.conf. `env` reads an
    /// environment variable (injectable for tests).
    pub fn into_config(self, env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        self.into_config_from(&EnvSources(env))
    }

    /// The zones the flags describe: the cluster zones to the cluster DNS from the Service
    /// environment, `.` to `--upstream` or resolv.conf, then `--forward` (a later zone of the same
    /// name replaces an earlier one), all with the flags' cache and transport policy.
    pub fn flag_zones(&self, src: &dyn Sources) -> Result<Vec<Zone>, ConfigError> {
        let cluster_domain = model::normalize_zone(&self.cluster_domain)
            .map_err(|e| ConfigError::Invalid(format!("--cluster-domain: {e}")))?;
        let cache = CachePolicy {
            min_ttl: self.min_ttl,
            max_ttl: self.max_ttl,
            max_negative_ttl: self.max_negative_ttl,
            servfail_ttl: self.servfail_ttl,
            success_capacity: self.cache_size,
            denial_capacity: self.negative_cache_size,
            ..CachePolicy::FLAGS
        };
        let zone = |name: String, servers: Vec<SocketAddr>, origin: &str| Zone {
            name,
            servers,
            transport: if self.force_tcp {
                Transport::Tcp
            } else {
                Transport::PreferUdp
            },
            policy: self.upstream_policy,
            forward: model::ForwardOptions {
                max_fails: self.max_fails,
                health_check: self.health_check,
                ..Default::default()
            },
            cache,
            origin: model::Origin::at(origin, 0),
        };
        let mut zones: Vec<Zone> = Vec::new();
        // 1. The cluster DNS from the Service environment, for the cluster zones.
        match service_addr(src, &self.upstream_svc)? {
            Some(addr) => {
                for z in [cluster_domain.as_str(), "in-addr.arpa", "ip6.arpa"] {
                    zones.push(zone(z.into(), vec![addr], "--upstream-svc"));
                }
            }
            None => {
                let var = format!("{}_SERVICE_HOST", service_env_prefix(&self.upstream_svc));
                tracing::debug!(%var, "not set; cluster zones follow --forward or the default zone");
            }
        }
        // 2. The default zone: --upstream, else resolv.conf (unless --forward gives `.`).
        let has_root = self.forward.iter().any(|z| z.zone == ".");
        if !self.upstream.is_empty() {
            zones.push(zone(".".into(), self.upstream.clone(), "--upstream"));
        } else if !has_root {
            let path = self.resolv_conf.display().to_string();
            let text = src
                .read(&self.resolv_conf)
                .map_err(|e| ConfigError::ResolvConf {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            let servers = parse_resolv_conf(&text).map_err(|reason| ConfigError::ResolvConf {
                path: path.clone(),
                reason,
            })?;
            // Never forward to ourselves (a node whose resolv.conf points at nodedns).
            let servers: Vec<_> = servers
                .into_iter()
                .filter(|s| {
                    !self
                        .listen
                        .iter()
                        .any(|l| l.ip() == s.ip() && l.port() == s.port())
                })
                .collect();
            if servers.is_empty() {
                return Err(ConfigError::ResolvConf {
                    path,
                    reason: "its only nameservers are nodedns's own listen addresses".into(),
                });
            }
            zones.push(zone(".".into(), servers, "--resolv-conf"));
        }
        // 3. Explicit --forward flags override both.
        for f in &self.forward {
            zones.push(zone(f.zone.clone(), f.servers.clone(), "--forward"));
        }
        // Later wins, in the place of the first.
        let mut out: Vec<Zone> = Vec::new();
        for z in zones {
            match out.iter_mut().find(|o| o.name == z.name) {
                Some(o) => *o = z,
                None => out.push(z),
            }
        }
        Ok(out)
    }

    /// Parses `args` (argv without the program name is fine too) with Go-style single-dash long
    /// flags accepted (`-conf FILE`, as the addon's DaemonSet passes them) and records which flags
    /// were given explicitly.
    pub fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Cli, clap::Error> {
        use clap::{CommandFactory, FromArgMatches};
        let args: Vec<String> = args.into_iter().map(go_style).collect();
        let matches = Cli::command().try_get_matches_from(args)?;
        let mut cli = Cli::from_arg_matches(&matches)?;
        cli.explicit = matches
            .ids()
            .filter(|id| {
                matches.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine)
            })
            .map(|id| id.as_str().to_string())
            .collect();
        Ok(cli)
    }

    fn given(&self, id: &str) -> bool {
        self.explicit.iter().any(|e| e == id)
    }

    /// The configuration file's model, if `--conf` is given: the addon's template rendered (when
    /// the template exists), else the file itself. Returns the model and the files it came from.
    pub fn file_model(&self, src: &dyn Sources) -> Result<Option<Model>, ConfigError> {
        let Some(conf) = &self.conf else {
            if self.given("basecorefile") {
                return Err(ConfigError::Invalid(
                    "--basecorefile needs --conf (the addon passes -conf /etc/Corefile)".into(),
                ));
            }
            return Ok(None);
        };
        let at = |e: model::ModelError| ConfigError::Invalid(e.to_string());
        let template_text = src.read(&self.basecorefile);
        let mut inputs = Vec::new();
        let mut model = match template_text {
            Ok(template) => {
                let dir = match &self.kubednscm {
                    Some(d) => Some(d.clone()),
                    None => {
                        let d = PathBuf::from("/etc/kube-dns");
                        d.is_dir().then_some(d)
                    }
                };
                let kube_dns = match &dir {
                    Some(d) => {
                        inputs.push(d.clone());
                        addon::read_kube_dns(d, src).map_err(at)?
                    }
                    None => Default::default(),
                };
                let mut local_ips: Vec<IpAddr> = Vec::new();
                for l in &self.listen {
                    if !local_ips.contains(&l.ip()) {
                        local_ips.push(l.ip());
                    }
                }
                let inputs_addon = addon::AddonInputs {
                    upstream_svc: self.upstream_svc.clone(),
                    local_ips,
                    kube_dns,
                    prometheus: Some(match self.metrics_listen.0 {
                        Some(a) => a.to_string(),
                        None => ":9253".into(),
                    }),
                };
                let file = self.basecorefile.display().to_string();
                inputs.push(self.basecorefile.clone());
                let rendered = addon::render(&template, &file, &inputs_addon, src).map_err(at)?;
                corefile::parse(&rendered, &file, src).map_err(at)?
            }
            Err(e) if self.given("basecorefile") => {
                return Err(ConfigError::Invalid(format!(
                    "--basecorefile {}: {e}",
                    self.basecorefile.display()
                )));
            }
            Err(_) => {
                let file = conf.display().to_string();
                let text = src
                    .read(conf)
                    .map_err(|e| ConfigError::Invalid(format!("--conf {file}: {e}")))?;
                inputs.push(conf.clone());
                if conf.extension().is_some_and(|x| x == "toml") {
                    toml_file::parse(&text, &file, src).map_err(at)?
                } else {
                    corefile::parse(&text, &file, src).map_err(at)?
                }
            }
        };
        inputs.append(&mut model.inputs);
        model.inputs = inputs;
        Ok(Some(model))
    }

    /// [`Cli::into_config`] with every outside input read through `src`.
    pub fn into_config_from(self, src: &dyn Sources) -> Result<Config, ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        check_log_level(&self.log_level).map_err(ConfigError::Invalid)?;
        let file = self.file_model(src)?;
        if self.listen.is_empty() {
            return bad("at least one --listen address is needed".into());
        }
        if self.attempt_timeout.is_zero() || self.query_deadline.is_zero() {
            return bad("--attempt-timeout and --query-deadline must be above zero".into());
        }
        if self.max_ttl < self.min_ttl {
            return bad("--max-ttl must not be below --min-ttl".into());
        }
        if self.max_tcp_connections > 1_000_000 || self.max_concurrent > 10_000_000 {
            return bad("--max-tcp-connections (at most 1000000) or --max-concurrent (at most 10000000) is too large".into());
        }
        if self.workers > 256 {
            return bad(format!(
                "--workers {} is too many (at most 256; 0 means one per CPU)",
                self.workers
            ));
        }
        if self.cache_size == 0 || self.negative_cache_size == 0 {
            return bad("cache sizes must be at least 1".into());
        }

        let mut listen = self.listen.clone();
        let mut limits = Limits {
            positive_entries: self.cache_size,
            positive_bytes: self.cache_bytes,
            negative_entries: self.negative_cache_size,
            negative_bytes: self.negative_cache_bytes,
        };
        let mut metrics_listen = self.metrics_listen.0;
        let mut health_listen = match self.health_listen {
            Some(OptionalAddr(a)) => a,
            None => Some(SocketAddr::new(self.listen[0].ip(), 8080)),
        };
        let mut log_queries = self.log_queries;
        let mut reload_interval = self.reload_interval;
        let mut inputs = Vec::new();
        let mut inert = Vec::new();
        let zones = match file {
            None => {
                if self.upstream.is_empty() && !self.forward.iter().any(|z| z.zone == ".") {
                    inputs.push(self.resolv_conf.clone());
                }
                self.flag_zones(src)?
            }
            Some(m) => {
                // The file owns DNS behaviour; a flag that says the same again is a contradiction.
                for flag in FILE_OWNED_FLAGS {
                    if self.given(flag) {
                        return bad(format!(
                            "--{} conflicts with --conf: the file sets zones, caches and forwarders",
                            flag.replace('_', "-")
                        ));
                    }
                }
                if !m.listen.is_empty() {
                    if self.given("listen") {
                        let mut a: Vec<IpAddr> = self.listen.iter().map(|l| l.ip()).collect();
                        let mut b: Vec<IpAddr> = m.listen.iter().map(|l| l.ip()).collect();
                        a.sort();
                        a.dedup();
                        b.sort();
                        b.dedup();
                        if a != b {
                            return bad(format!(
                                "--listen {:?} and the file's bind {:?} name different addresses",
                                self.listen, m.listen
                            ));
                        }
                    }
                    listen = m.listen.clone();
                } else if let Some(port) = m.port {
                    for l in &mut listen {
                        l.set_port(port);
                    }
                }
                // One shared cache holds what every zone asks for (see the README).
                let (pos, neg) = m.zones.iter().fold((0usize, 0usize), |(p, n), z| {
                    (
                        p.saturating_add(if z.cache.success {
                            z.cache.success_capacity
                        } else {
                            0
                        }),
                        n.saturating_add(if z.cache.denial {
                            z.cache.denial_capacity
                        } else {
                            0
                        }),
                    )
                });
                limits.positive_entries = pos.max(1);
                limits.negative_entries = neg.max(1);
                // The HTTP endpoints are the node's: an explicit flag wins over the file's
                // `health`/`prometheus` (a port clash on a hostNetwork node is fixed in the args).
                if let Some(h) = m.health
                    && !self.given("health_listen")
                {
                    health_listen = Some(h.addr);
                }
                if let Some(a) = m.metrics
                    && !self.given("metrics_listen")
                {
                    metrics_listen = Some(a);
                }
                log_queries |= m.log_queries;
                // `reload` sets the poll interval (CoreDNS's 30 s default) unless the flag says.
                if let Some(r) = m.reload
                    && !self.given("reload_interval")
                {
                    reload_interval = r.max(Duration::from_millis(100));
                }
                inputs.extend(m.inputs.iter().cloned());
                inert = inert_settings(&m);
                m.zones
            }
        };
        if zones.is_empty() {
            return bad("no zones: nothing to forward".into());
        }
        // Never forward to ourselves (a resolv.conf or a stub domain naming nodedns's address).
        let mut zones = zones;
        for z in &mut zones {
            let had = z.servers.len();
            z.servers.retain(|s| {
                !listen
                    .iter()
                    .any(|l| l.ip() == s.ip() && l.port() == s.port())
            });
            if had > 0 && z.servers.is_empty() {
                return bad(format!(
                    "{}: zone {} forwards only to nodedns's own listen address (a loop)",
                    z.origin, z.name
                ));
            }
        }

        let workers = if self.workers == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            self.workers
        };
        let link_kind: LinkKind =
            self.link_kind
                .parse()
                .map_err(|e: crate::netif::NetifError| {
                    ConfigError::Invalid(format!("--link-kind: {e}"))
                })?;
        let firewall = match self.firewall.as_str() {
            "auto" => None,
            b => Some(
                b.parse::<Backend>()
                    .map_err(|e| ConfigError::Invalid(format!("--firewall: {e}")))?,
            ),
        };
        if self.interface.is_empty() || self.interface.len() > 15 {
            return bad(format!(
                "--interface {:?} must be 1 to 15 characters (the kernel's limit)",
                self.interface
            ));
        }
        if !(1..=64).contains(&self.tcp_pool_size) {
            return bad("--tcp-pool-size must be 1 to 64".into());
        }
        if self.health_check < Duration::from_millis(10) {
            return bad("--health-check must be at least 10ms".into());
        }
        if self.sync_interval.is_zero() {
            return bad("--sync-interval must be above zero".into());
        }
        if self.reload_interval < Duration::from_millis(100) {
            return bad("--reload-interval must be at least 100ms".into());
        }
        Ok(Config {
            metrics_listen,
            health_listen,
            log_queries,
            inputs,
            reload_interval,
            inert,
            node: NodeOptions {
                setup_interface: self.setup_interface,
                interface: self.interface.clone(),
                link_kind,
                firewall,
                sync_interval: self.sync_interval,
                skip_teardown: self.skip_teardown,
            },
            listen: listen.clone(),
            zones,
            limits,
            upstream: upstream::Options {
                attempt_timeout: self.attempt_timeout,
                deadline: self.query_deadline,
                tcp_pool_size: self.tcp_pool_size,
            },
            server: crate::server::Options {
                listen,
                workers,
                max_tcp_connections: self.max_tcp_connections,
                tcp_idle_timeout: self.tcp_idle_timeout,
                max_concurrent: self.max_concurrent,
            },
        })
    }
}

#[cfg(test)]
mod tests;
