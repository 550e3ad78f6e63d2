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
#[cfg(test)]
pub(crate) use common::FakeSources;
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
    version = VERSION_TEXT,
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
    /// A comma-separated list of IPs (IP[:PORT],...) is used as the cluster DNS itself.
    #[arg(
        long,
        alias = "upstreamsvc",
        value_name = "NAME|IPS",
        default_value = "kube-dns-upstream"
    )]
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

    /// Keep the cache in this file across restarts: written every --cache-file-interval and at
    /// stop, read (every entry re-validated) at start.
    #[arg(long, value_name = "PATH")]
    pub cache_file: Option<PathBuf>,

    /// How often the cache file is written.
    #[arg(long, value_name = "DUR", default_value = "60s", value_parser = parse_duration)]
    pub cache_file_interval: Duration,

    /// Serve expired answers for this long past their TTL when upstream fails (RFC 8767; CoreDNS's
    /// `serve_stale`); 0 turns it off.
    #[arg(long, value_name = "DUR", default_value = "0", value_parser = parse_duration)]
    pub serve_stale: Duration,

    /// immediate: a stale answer at once, refreshed in the background; verify: ask upstream first
    /// (up to 1.8 s), the stale answer if it fails.
    #[arg(long, value_name = "MODE", default_value = "immediate", value_parser = ["immediate", "verify"])]
    pub serve_stale_mode: String,

    /// Refresh an entry in the background when hit AMOUNT times in the last PCT% of its life
    /// (CoreDNS's `prefetch AMOUNT [DURATION [PCT]]`, e.g. `1` or `2,1m,20`); 0 turns it off.
    #[arg(long, value_name = "AMOUNT[,DUR[,PCT]]", default_value = "0", value_parser = parse_prefetch)]
    pub prefetch: PrefetchFlag,

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
    #[arg(long, alias = "setupinterface", value_name = "BOOL", default_value = "true", num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set, value_parser = parse_bool)]
    pub setup_interface: bool,

    /// Name of the link that holds the local IPs.
    #[arg(
        long,
        alias = "interfacename",
        value_name = "NAME",
        default_value = "nodelocaldns"
    )]
    pub interface: String,

    /// Kind of that link: dummy, or bridge where the kernel has no dummy link type.
    #[arg(long, value_name = "KIND", default_value = "dummy")]
    pub link_kind: String,

    /// Packet filter for the NOTRACK/ACCEPT rules: iptables, nftables, none, or auto (iptables
    /// when nodedns put addresses on its link, none otherwise).
    #[arg(long, value_name = "BACKEND", default_value = "auto")]
    pub firewall: String,

    /// How often the link, addresses and rules are checked and repaired.
    #[arg(long, alias = "syncinterval", value_name = "DUR", default_value = "60s", value_parser = parse_duration)]
    pub sync_interval: Duration,

    /// After SIGTERM keep serving this long with /ready at 503 ("draining"), then drain the
    /// sockets and stop (CoreDNS's `health { lameduck }`, which a file's `health` block sets).
    #[arg(long, value_name = "DUR", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Leave the link, addresses and rules in place at exit (for two instances side by side).
    #[arg(long, alias = "skipteardown", value_name = "BOOL", default_value = "false", num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set, value_parser = parse_bool)]
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
    /// --listen IP, port --health-port; `off` disables.
    #[arg(long, value_name = "ADDR:PORT|off", value_parser = parse_optional_listen)]
    pub health_listen: Option<OptionalAddr>,

    // ---- The addon's (node-cache's and CoreDNS's) own flags, mapped onto the ones above. ----
    /// The addon's -localip: comma-separated listen IPs (IPv4 and IPv6 may be mixed), each on
    /// port --dns.port; replaces --listen.
    #[arg(long, value_name = "IP,IP...", value_parser = parse_ip_list)]
    pub localip: Option<IpList>,

    /// CoreDNS's -dns.port: the DNS port of the -localip addresses (and of the default --listen).
    #[arg(long = "dns.port", short = 'p', value_name = "PORT", value_parser = parse_port)]
    pub dns_port: Option<u16>,

    /// The addon's -corefile (its rendered output): the same as --conf when --conf is absent.
    #[arg(long, value_name = "FILE")]
    pub corefile: Option<PathBuf>,

    /// The addon's -setupinterface's sibling: false means --firewall none; true keeps --firewall.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set, value_parser = parse_bool)]
    pub setupiptables: Option<bool>,

    /// Port of the health listener (/health, /ready) on the first listen IP, and of the health
    /// NOTRACK rules; default 9053 (not the addon's 8080, which many hostNetwork agents use).
    #[arg(long, value_name = "PORT", value_parser = parse_port)]
    pub health_port: Option<u16>,

    /// node-cache's own listener: /metrics with coredns_nodecache_setup_errors_total; `off`
    /// disables. `:PORT` means all addresses.
    #[arg(long, value_name = "ADDR:PORT|off", default_value = "0.0.0.0:9353", value_parser = parse_go_listen)]
    pub metrics_listen_address: OptionalAddr,

    /// The addon's -prometheus-listen-address (`:9253`): the same as --metrics-listen.
    #[arg(long, value_name = "ADDR:PORT", value_parser = parse_go_listen)]
    pub prometheus_listen_address: Option<OptionalAddr>,

    /// Written with nodedns's PID once the DNS listeners are bound (removed at exit).
    #[arg(long, value_name = "FILE")]
    pub pidfile: Option<PathBuf>,

    /// Loop detection at start: one probe query per forwarded zone; a zone whose probe comes back
    /// (an upstream forwards to nodedns) is not forwarded any more and /ready says 503 (`on`), or
    /// nodedns exits (`fatal`, CoreDNS's `loop`). Default on; an explicit flag wins over a file's
    /// `loop`.
    #[arg(long, value_name = "off|on|fatal", default_value = "on", value_parser = parse_loop_detect)]
    pub loop_detect: model::LoopDetect,

    /// CoreDNS's -quiet: log warnings and errors only (unless --log-level is given).
    #[arg(long, value_name = "BOOL", default_value = "false", num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set, value_parser = parse_bool)]
    pub quiet: bool,
}

/// `nodedns --version`: the crate version and the git commit it was built from (build.rs).
pub const VERSION_TEXT: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("NODEDNS_GIT_COMMIT"),
    ")"
);

/// The git commit nodedns was built from, or `unknown`.
pub const GIT_COMMIT: &str = env!("NODEDNS_GIT_COMMIT");

/// The health listener's default port (see the README: 8080 clashes on hostNetwork nodes).
pub const DEFAULT_HEALTH_PORT: u16 = 9053;

/// A `-localip` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpList(pub Vec<IpAddr>);

/// Parses `IP,IP,...` (IPv4 and IPv6 may be mixed; duplicates dropped).
pub fn parse_ip_list(s: &str) -> Result<IpList, String> {
    let mut out = Vec::new();
    for w in s.split(',').map(str::trim) {
        let ip: IpAddr = w
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| format!("invalid IP {w:?} in {s:?} (use IP,IP,...)"))?;
        if ip.is_unspecified() {
            return Err(format!("invalid IP {w:?}: unspecified address"));
        }
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(IpList(out))
}

/// Parses a port 1-65535.
pub fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("invalid port {s:?} (use 1-65535)")),
    }
}

/// Parses Go's listen syntax: `:PORT` (all IPv4 addresses), `IP:PORT`, `[IPv6]:PORT` or `off`.
pub fn parse_go_listen(s: &str) -> Result<OptionalAddr, String> {
    match s.trim().strip_prefix(':') {
        Some(port) => parse_port(port)
            .map(|p| OptionalAddr(Some(SocketAddr::new(IpAddr::from([0, 0, 0, 0]), p)))),
        None => parse_optional_listen(s),
    }
}

/// A comma-separated server list given in place of a Service name (`-upstreamsvc 10.0.0.10`,
/// kubernetes/dns#596); `None` when `svc` is a name.
pub fn upstream_ip_list(svc: &str) -> Option<Result<Vec<SocketAddr>, String>> {
    let first = svc.trim().chars().next()?;
    if !(first.is_ascii_digit() || first == '[' || svc.contains(':')) {
        return None;
    }
    Some(svc.split(',').map(parse_server).collect())
}

/// Flags that a configuration file replaces: given together with `--conf`, an error.
const FILE_OWNED_FLAGS: [&str; 16] = [
    "serve_stale",
    "serve_stale_mode",
    "prefetch",
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
            loop_detect: self.loop_detect,
            cache_file: self
                .cache_file
                .clone()
                .map(|(path, every)| model::CacheFile {
                    path,
                    interval: Some(every),
                }),
            inputs: self.inputs.clone(),
        }
    }
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
    /// How long nodedns keeps serving after SIGTERM before it drains and stops.
    pub shutdown_grace: Duration,
    /// `--cache-file` and how often it is written.
    pub cache_file: Option<(PathBuf, Duration)>,
    /// Loop detection at start (see [`crate::loopdetect`]).
    pub loop_detect: model::LoopDetect,
    /// Things nodedns changed in the configuration to make it work (a server that is nodedns
    /// itself, dropped from its zone), one sentence each, logged as warnings at start.
    pub warnings: Vec<String>,
    /// Why nodedns is not fully ready although it serves (a missing or malformed
    /// `<SVC>_SERVICE_HOST`/`_PORT`): warned about at start and named by `/ready` (503).
    pub not_ready: Vec<String>,
    /// node-cache's own listener (`-metrics-listen-address`): the setup-errors counter.
    pub setup_metrics_listen: Option<SocketAddr>,
    /// Written with the PID once the DNS listeners are bound (`-pidfile`).
    pub pidfile: Option<PathBuf>,
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

/// Parses `30` (bare seconds, as node-cache's `-syncinterval`), `500ms`, `5s`, `1m`, `1h`, and
/// Go's compound durations (`1m30s`, `1h2m3.5s`, `250us`) into a duration.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let bad = || format!("invalid duration {s:?} (use e.g. 30, 500ms, 5s, 1m, 1m30s)");
    if s.is_empty() {
        return Err(bad());
    }
    let mut rest = s;
    let mut secs = 0.0f64;
    let mut parts = 0;
    while !rest.is_empty() {
        parts += 1;
        if parts > 8 {
            return Err(bad());
        }
        let split = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(split);
        let n: f64 = num.parse().map_err(|_| bad())?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let mult = match unit {
            // A bare number is seconds, alone only (`1m30` is no duration).
            "" if parts == 1 && next.is_empty() => 1.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err(bad()),
            _ => {
                return Err(format!(
                    "invalid duration unit in {s:?} (use ns, us, ms, s, m or h)"
                ));
            }
        };
        secs += n * mult;
        rest = next;
    }
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("duration {s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `--loop-detect off|on|fatal`.
pub fn parse_loop_detect(s: &str) -> Result<model::LoopDetect, String> {
    s.parse()
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

/// `--prefetch`: off, or CoreDNS's prefetch settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefetchFlag(pub Option<model::Prefetch>);

/// Parses `--prefetch AMOUNT[,DURATION[,PCT]]`; `0` is off.
pub fn parse_prefetch(s: &str) -> Result<PrefetchFlag, String> {
    let mut parts = s.split(',').map(str::trim);
    let bad =
        || format!("invalid --prefetch {s:?} (use AMOUNT[,DURATION[,PCT]], e.g. 1 or 2,1m,10)");
    let amount: u32 = parts.next().unwrap_or("").parse().map_err(|_| bad())?;
    if amount == 0 {
        return Ok(PrefetchFlag(None));
    }
    let duration = match parts.next() {
        Some(d) => parse_duration(d)?,
        None => Duration::from_secs(60),
    };
    let percent: u8 = match parts.next() {
        Some(p) => p.trim_end_matches('%').parse().map_err(|_| bad())?,
        None => 10,
    };
    if !(10..=90).contains(&percent) || parts.next().is_some() || amount > 127 {
        return Err(bad());
    }
    Ok(PrefetchFlag(Some(model::Prefetch {
        amount,
        duration,
        percent,
    })))
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

/// Whether `server` is nodedns itself: one of the `listen` addresses, or on the port of a wildcard
/// listen address (`0.0.0.0:53`, `[::]:53`) an address of this machine (any loopback address, or
/// one `is_local` says a socket can bind). An IPv6 wildcard covers IPv6 only (the listeners are
/// IPV6_V6ONLY).
pub fn is_self(
    server: SocketAddr,
    listen: &[SocketAddr],
    is_local: &dyn Fn(IpAddr) -> bool,
) -> bool {
    let ip = server.ip().to_canonical();
    listen.iter().any(|l| {
        if l.port() != server.port() {
            return false;
        }
        let lip = l.ip().to_canonical();
        if lip == ip {
            return true;
        }
        lip.is_unspecified() && lip.is_ipv4() == ip.is_ipv4() && (ip.is_loopback() || is_local(ip))
    })
}

/// Whether this machine has `ip` (loopback, or a socket can bind it): the real [`Sources`]'s
/// answer to [`Sources::is_local_ip`].
pub fn machine_has_ip(ip: IpAddr) -> bool {
    ip.is_loopback() || crate::netif::is_local(ip).unwrap_or(false)
}

fn join_addrs(a: &[SocketAddr]) -> String {
    a.iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(", ")
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
    fn is_local_ip(&self, ip: IpAddr) -> bool {
        machine_has_ip(ip)
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
            serve_stale: (!self.serve_stale.is_zero()).then(|| model::ServeStale {
                duration: self.serve_stale,
                verify: self.serve_stale_mode == "verify",
            }),
            prefetch: self.prefetch.0,
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
        // A missing or malformed variable is not fatal (see [`Cli::service_problem`]).
        let cluster = match upstream_ip_list(&self.upstream_svc) {
            Some(list) => list.ok(),
            None => service_addr(src, &self.upstream_svc)
                .ok()
                .flatten()
                .map(|a| vec![a]),
        };
        if let Some(servers) = cluster {
            for z in [cluster_domain.as_str(), "in-addr.arpa", "ip6.arpa"] {
                zones.push(zone(z.into(), servers.clone(), "--upstream-svc"));
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
            // nodedns's own addresses among them are dropped (or refused, when they are all) with
            // every other zone's in `into_config_from`.
            zones.push(zone(".".into(), servers, &format!("--resolv-conf {path}")));
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
        cli.apply_addon_flags()
            .map_err(|m| Cli::command().error(clap::error::ErrorKind::ArgumentConflict, m))?;
        Ok(cli)
    }

    /// Maps the addon's flags onto nodedns's own (`-localip` → `--listen`, `-corefile` →
    /// `--conf`, ...); a flag given in both forms with different meanings is an error.
    fn apply_addon_flags(&mut self) -> Result<(), String> {
        let both = |a: &str, b: &str| format!("--{a} and --{b} both given: use one");
        let port = self.dns_port.unwrap_or(53);
        if let Some(IpList(ips)) = &self.localip {
            if self.given("listen") {
                return Err(both("localip", "listen"));
            }
            self.listen = ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect();
            self.explicit.push("listen".into());
        } else if self.dns_port.is_some() && !self.given("listen") {
            for l in &mut self.listen {
                l.set_port(port);
            }
        }
        if self.conf.is_none() {
            self.conf = self.corefile.clone();
        }
        if self.setupiptables == Some(false) {
            if self.given("firewall") && self.firewall != "none" {
                return Err(both("setupiptables=false", "firewall"));
            }
            self.firewall = "none".into();
            self.explicit.push("firewall".into());
        }
        if let Some(p) = self.prometheus_listen_address {
            if self.given("metrics_listen") {
                return Err(both("prometheus-listen-address", "metrics-listen"));
            }
            self.metrics_listen = p;
            self.explicit.push("metrics_listen".into());
        }
        if self.health_port.is_some() && self.given("health_listen") {
            return Err(both("health-port", "health-listen"));
        }
        if self.quiet && !self.given("log_level") {
            self.log_level = "warn".into();
        }
        Ok(())
    }

    /// What is wrong with the cluster DNS the flags take from `--upstream-svc`: a missing or
    /// malformed `<SVC>_SERVICE_HOST`/`_PORT` (then the cluster zones follow the default zone), as
    /// a sentence naming the variable; a bad IP list in `--upstream-svc` is an error.
    pub fn service_problem(&self, src: &dyn Sources) -> Result<Option<String>, ConfigError> {
        if let Some(list) = upstream_ip_list(&self.upstream_svc) {
            return match list {
                Ok(_) => Ok(None),
                Err(e) => Err(ConfigError::Invalid(format!("--upstream-svc: {e}"))),
            };
        }
        let covered = model::normalize_zone(&self.cluster_domain)
            .is_ok_and(|d| self.forward.iter().any(|f| f.zone == d));
        if covered {
            return Ok(None);
        }
        let host_var = format!("{}_SERVICE_HOST", service_env_prefix(&self.upstream_svc));
        Ok(match service_addr(src, &self.upstream_svc) {
            Ok(Some(_)) => None,
            Ok(None) => Some(format!(
                "environment variable {host_var} is not set (is the {} Service in this namespace?); the cluster zones go to the default zone's servers",
                self.upstream_svc
            )),
            Err(e) => Some(format!(
                "{e}; the cluster zones go to the default zone's servers"
            )),
        })
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
            None => Some(SocketAddr::new(
                self.listen[0].ip(),
                self.health_port.unwrap_or(DEFAULT_HEALTH_PORT),
            )),
        };
        let mut log_queries = self.log_queries;
        let mut reload_interval = self.reload_interval;
        let mut shutdown_grace = self.shutdown_grace;
        let mut inputs = Vec::new();
        let mut not_ready = Vec::new();
        // An explicit flag wins over the file's `loop` (the node's operator decides, as for the
        // HTTP endpoints); a file without `loop` does no check, as in CoreDNS.
        let loop_detect = match &file {
            Some(m) if !self.given("loop_detect") => m.loop_detect,
            _ => self.loop_detect,
        };
        // The cache file is the node's too: an explicit --cache-file (path) and
        // --cache-file-interval each win over the file's `cache { file PATH [INTERVAL] }`.
        let file_cache = file.as_ref().and_then(|m| m.cache_file.clone());
        let cache_file_path = match (&file_cache, self.given("cache_file")) {
            (Some(f), false) => Some(f.path.clone()),
            _ => self.cache_file.clone(),
        };
        let cache_file_interval = match file_cache.and_then(|f| f.interval) {
            Some(i) if !self.given("cache_file_interval") => i,
            _ => self.cache_file_interval,
        };
        let zones = match file {
            None => {
                if self.upstream.is_empty() && !self.forward.iter().any(|z| z.zone == ".") {
                    inputs.push(self.resolv_conf.clone());
                }
                if let Some(problem) = self.service_problem(src)? {
                    not_ready.push(problem);
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
                    // --health-port moves the file's health endpoint to that port.
                    let mut addr = h.addr;
                    if let Some(p) = self.health_port {
                        addr.set_port(p);
                    }
                    health_listen = Some(addr);
                }
                // `health { lameduck D }` is the file's grace; an explicit flag wins, as above. A
                // `health` without lameduck keeps the flag's default: the addon's Corefile has no
                // lameduck, and a rollout should still drain.
                if let Some(h) = m.health
                    && !h.lameduck.is_zero()
                    && !self.given("shutdown_grace")
                {
                    shutdown_grace = h.lameduck;
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
                m.zones
            }
        };
        if zones.is_empty() {
            return bad("no zones: nothing to forward".into());
        }
        // Never forward to ourselves (a resolv.conf, an upstream or a stub domain naming one of
        // nodedns's addresses): such servers are dropped with a warning, and a zone left with
        // none is an error.
        let mut zones = zones;
        let mut warnings = Vec::new();
        for z in &mut zones {
            let (own, other): (Vec<SocketAddr>, Vec<SocketAddr>) = z
                .servers
                .iter()
                .partition(|s| is_self(**s, &listen, &|ip| src.is_local_ip(ip)));
            if own.is_empty() {
                continue;
            }
            let own_list = join_addrs(&own);
            if other.is_empty() {
                return bad(format!(
                    "{}: zone {} forwards only to nodedns's own listen address ({own_list}; nodedns listens on {}): a loop",
                    z.origin,
                    z.name,
                    join_addrs(&listen)
                ));
            }
            warnings.push(format!(
                "{}: zone {}: server {own_list} dropped: nodedns itself listens there (a loop); forwarding to {}",
                z.origin,
                z.name,
                join_addrs(&other)
            ));
            z.servers = other;
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
        if cache_file_interval < Duration::from_secs(1) {
            return bad("--cache-file-interval must be at least 1s".into());
        }
        if self.reload_interval < Duration::from_millis(100) {
            return bad("--reload-interval must be at least 100ms".into());
        }
        Ok(Config {
            loop_detect,
            warnings,
            not_ready,
            setup_metrics_listen: self.metrics_listen_address.0,
            pidfile: self.pidfile.clone(),
            metrics_listen,
            health_listen,
            log_queries,
            inputs,
            reload_interval,
            shutdown_grace,
            cache_file: cache_file_path.map(|p| (p, cache_file_interval)),
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
