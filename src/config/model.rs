//! The configuration model every source is translated into: flags, the addon's Corefile, the native
//! TOML file and the kube-dns ConfigMap all end up as one [`Model`], which is pure data (compared,
//! hashed and printed by `check-config`). Nothing here does I/O; what a source needs from outside
//! (environment variables, resolv.conf, ConfigMap files) comes through [`Sources`], so tests and
//! reloads feed the same code.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where a setting came from, for error messages: `file:line`, or a flag name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Origin {
    pub file: String,
    /// 1-based; 0 when the source has no lines (flags, environment).
    pub line: usize,
}

impl Origin {
    pub fn at(file: impl Into<String>, line: usize) -> Origin {
        Origin {
            file: file.into(),
            line,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.file)
        } else {
            write!(f, "{}:{}", self.file, self.line)
        }
    }
}

/// A configuration error with its place: one line, `file:line: reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelError {
    pub at: Origin,
    pub reason: String,
}

impl ModelError {
    pub fn new(at: Origin, reason: impl Into<String>) -> ModelError {
        ModelError {
            at,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.at.file.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.at, self.reason)
        }
    }
}

impl std::error::Error for ModelError {}

/// What a configuration source may read from outside. The real one reads the process environment
/// and the file system; tests use a map.
pub trait Sources {
    /// An environment variable (`None` when unset).
    fn env(&self, name: &str) -> Option<String>;
    /// A whole file (resolv.conf, a ConfigMap key, a Corefile template).
    fn read(&self, path: &Path) -> std::io::Result<String>;
    /// Whether `ip` is an address of this machine (for the self-forward check with a wildcard
    /// listen address).
    fn is_local_ip(&self, ip: std::net::IpAddr) -> bool;
}

/// The process's environment and file system.
pub struct RealSources;

impl Sources for RealSources {
    fn env(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
    fn read(&self, path: &Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }
    fn is_local_ip(&self, ip: std::net::IpAddr) -> bool {
        crate::config::machine_has_ip(ip)
    }
}

/// How a zone's misses travel to its servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Transport {
    /// UDP only; a truncated reply is passed to the client (who retries over TCP).
    Udp,
    /// UDP, and the same server over TCP when the reply is truncated (CoreDNS's `prefer_udp`;
    /// also what a Corefile `forward` without options means here, see the README).
    #[default]
    PreferUdp,
    /// Pipelined TCP connections (CoreDNS's `force_tcp`).
    Tcp,
}

/// The order a zone's servers are tried in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Policy {
    /// A random server first, then the rest (CoreDNS's default).
    Random,
    /// Rotate the first server per query (nodedns's behaviour before zones).
    #[default]
    RoundRobin,
    /// Always in the configured order.
    Sequential,
    /// Lowest smoothed round-trip time first (hickory's resolver ordering); servers never tried
    /// count as fastest, and a server's figure decays with time so a slow one is tried again.
    Fastest,
}

/// CoreDNS's `prefetch AMOUNT [DURATION [PCT%]]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Prefetch {
    pub amount: u32,
    pub duration: Duration,
    /// Refresh when less than this percentage of the lifetime remains (10-90).
    pub percent: u8,
}

/// CoreDNS's `serve_stale [DURATION] [immediate|verify]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServeStale {
    pub duration: Duration,
    pub verify: bool,
}

/// How a zone's answers are cached. Applied when an answer is stored, so the shared cache needs no
/// zone lookup on a hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CachePolicy {
    /// Cache positive answers at all (`cache` present and not `disable success`).
    pub success: bool,
    /// Cache NXDOMAIN/NODATA at all.
    pub denial: bool,
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    pub min_negative_ttl: Duration,
    pub max_negative_ttl: Duration,
    /// How long SERVFAIL is cached; zero turns it off.
    pub servfail_ttl: Duration,
    /// Entries this zone asks for (the addon's `success 9984`); the shared cache holds the sum.
    pub success_capacity: usize,
    pub denial_capacity: usize,
    pub prefetch: Option<Prefetch>,
    pub serve_stale: Option<ServeStale>,
}

impl CachePolicy {
    /// No caching (a Corefile server block without `cache`).
    pub const OFF: CachePolicy = CachePolicy {
        success: false,
        denial: false,
        min_ttl: Duration::ZERO,
        max_ttl: Duration::ZERO,
        min_negative_ttl: Duration::ZERO,
        max_negative_ttl: Duration::ZERO,
        servfail_ttl: Duration::ZERO,
        success_capacity: 0,
        denial_capacity: 0,
        prefetch: None,
        serve_stale: None,
    };

    /// A bare Corefile `cache`: CoreDNS's defaults (caps 3600 s and 1800 s, minimum TTL 5 s,
    /// SERVFAIL for 5 s, 9984 entries each).
    pub const COREDNS: CachePolicy = CachePolicy {
        success: true,
        denial: true,
        min_ttl: Duration::from_secs(5),
        max_ttl: Duration::from_secs(3600),
        min_negative_ttl: Duration::from_secs(5),
        max_negative_ttl: Duration::from_secs(1800),
        servfail_ttl: Duration::from_secs(5),
        success_capacity: 9984,
        denial_capacity: 9984,
        prefetch: None,
        serve_stale: None,
    };

    /// nodedns's flag defaults (`--min-ttl 0 --max-ttl 30s --max-negative-ttl 5s
    /// --servfail-ttl 0`, 9984 entries each): the addon's cluster.local block.
    pub const FLAGS: CachePolicy = CachePolicy {
        success: true,
        denial: true,
        min_ttl: Duration::ZERO,
        max_ttl: Duration::from_secs(30),
        min_negative_ttl: Duration::ZERO,
        max_negative_ttl: Duration::from_secs(5),
        servfail_ttl: Duration::ZERO,
        success_capacity: 9984,
        denial_capacity: 9984,
        prefetch: None,
        serve_stale: None,
    };
}

/// Upstream health and connection settings of a zone's `forward` (CoreDNS's names and defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ForwardOptions {
    /// Consecutive failures before a server is marked down; 0 disables health checking.
    pub max_fails: u32,
    /// Probe interval of a server marked down.
    pub health_check: Duration,
    /// Pooled TCP connections are closed after this long.
    pub expire: Duration,
    /// Forwarded queries of this zone in flight at once; past it REFUSED. `None`: only the global
    /// `--max-concurrent` applies.
    pub max_concurrent: Option<usize>,
}

impl Default for ForwardOptions {
    fn default() -> Self {
        ForwardOptions {
            max_fails: 2,
            health_check: Duration::from_millis(500),
            expire: Duration::from_secs(10),
            max_concurrent: None,
        }
    }
}

/// Loop detection (CoreDNS's `loop`): at start a probe name per forwarded zone is sent to the
/// zone's servers; seeing it come back more than twice is a loop (see `crate::loopdetect`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LoopDetect {
    /// No probe (a Corefile without `loop`).
    #[default]
    Off,
    /// A looping zone stops being forwarded (SERVFAIL), `/ready` says 503, the process keeps
    /// serving the other zones.
    On,
    /// A loop ends the process (exit 1), as CoreDNS's `loop` does.
    Fatal,
}

impl LoopDetect {
    /// The flag's and TOML's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            LoopDetect::Off => "off",
            LoopDetect::On => "on",
            LoopDetect::Fatal => "fatal",
        }
    }
}

impl std::str::FromStr for LoopDetect {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "off" | "false" => Ok(LoopDetect::Off),
            "on" | "true" => Ok(LoopDetect::On),
            "fatal" => Ok(LoopDetect::Fatal),
            o => Err(format!(
                "invalid loop detection {o:?} (use off, on or fatal)"
            )),
        }
    }
}

/// One zone: a domain and everything that decides how its names are answered.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Zone {
    /// Lowercase presentation form without the trailing dot (`cluster.local`), or `.` for the root.
    pub name: String,
    /// Servers queries are forwarded to, in the configured order. Empty: not forwarded (an
    /// `except` name); the client gets SERVFAIL.
    pub servers: Vec<SocketAddr>,
    pub transport: Transport,
    pub policy: Policy,
    pub forward: ForwardOptions,
    pub cache: CachePolicy,
    /// Where the zone was defined (not part of its meaning: ignored by equality checks in tests
    /// through [`Model::without_origins`]).
    pub origin: Origin,
}

/// The `health` endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Health {
    pub addr: SocketAddr,
    /// CoreDNS's `lameduck`: keep serving this long after SIGTERM, with `/ready` at 503.
    pub lameduck: Duration,
}

/// The warm-restart cache file (`--cache-file`; a Corefile's nodedns-only `cache { file PATH
/// [INTERVAL] }`, TOML's `cache_file`/`cache_file_interval`). One cache serves every zone, so a
/// file has at most one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheFile {
    pub path: PathBuf,
    /// How often it is written; `None`: not said (the flag's value, 60 s by default).
    pub interval: Option<Duration>,
}

/// Everything a configuration file (or the flags) says about DNS service. Node setup (interface,
/// firewall, sync interval) stays with the flags.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Model {
    /// Addresses to serve on (bind × port). Empty: the file did not say (the flags decide).
    pub listen: Vec<SocketAddr>,
    /// The port the file's server blocks use (`.:53`), when it has no `bind`: the flags' listen
    /// IPs are then served on it. `None`: not said (53).
    pub port: Option<u16>,
    /// Zones, in the order they were defined; names are unique.
    pub zones: Vec<Zone>,
    pub health: Option<Health>,
    /// `ready` plugin address; nodedns serves `/ready` on every admin listener, this adds one.
    pub ready: Option<SocketAddr>,
    /// `prometheus` address.
    pub metrics: Option<SocketAddr>,
    /// `reload` poll interval; `None`: the default (see the README).
    pub reload: Option<Duration>,
    /// `log` present: log every query.
    pub log_queries: bool,
    /// Loop detection at start (`loop`, `loop fatal`; see [`LoopDetect`]).
    pub loop_detect: LoopDetect,
    /// The cache file, if the file names one.
    pub cache_file: Option<CacheFile>,
    /// Files this model was read from (Corefile, template, resolv.conf, ConfigMap keys): the reload
    /// poller hashes them.
    pub inputs: Vec<PathBuf>,
}

impl Model {
    /// The same model with every origin cleared, for comparing models read from different files.
    pub fn without_origins(mut self) -> Model {
        for z in &mut self.zones {
            z.origin = Origin::default();
        }
        self.inputs.clear();
        self
    }

    /// The zone named `name` (lowercase, no trailing dot, `.` for the root).
    pub fn zone(&self, name: &str) -> Option<&Zone> {
        self.zones.iter().find(|z| z.name == name)
    }
}

/// Normalises a zone name as written in a file or flag: lowercase, no trailing dot, `.` for the
/// root. Rejects empty labels, labels over 63 bytes and names over 255 bytes in wire form.
pub fn normalize_zone(s: &str) -> Result<String, String> {
    let t = s.trim();
    if t == "." || t.is_empty() && !s.is_empty() {
        return Ok(".".into());
    }
    let z = t.strip_suffix('.').unwrap_or(t);
    if z.is_empty() {
        return Err(format!("bad zone name {s:?}"));
    }
    let mut wire_len = 1;
    for label in z.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("bad zone name {s:?} (empty or over-long label)"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'*')
        {
            return Err(format!("bad zone name {s:?}"));
        }
        wire_len += 1 + label.len();
    }
    if wire_len > 255 {
        return Err(format!("zone name {s:?} is too long"));
    }
    Ok(z.to_ascii_lowercase())
}
