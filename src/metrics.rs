//! Prometheus metrics for nodedns.
//!
//! # Design
//!
//! The DNS hot path records into plain atomics and never touches `prometheus-client`: every
//! recording call is one relaxed `fetch_add` on a slot that was laid out at startup, with no
//! locks, no allocation, no hashing and no label lookup. `prometheus-client` is only used at
//! scrape time, through a custom [`Collector`] that reads the atomics and feeds the
//! values to the encoder.
//!
//! * **Per-worker shards.** Counters that are bumped on every query (requests, cache hits and
//!   misses, stale answers, prefetches, in-flight) live in a [`WorkerCounters`] shard per worker
//!   thread. Each shard is its own allocation aligned to 128 bytes (two cache lines, which also
//!   covers the adjacent-line prefetcher on x86), so two workers never write the same cache line.
//!   The scrape sums the shards. A worker index outside `0..workers` folds back into range with a
//!   modulo instead of panicking; the sums stay correct, only the padding benefit is lost.
//! * **Shared, padded blocks** for things that happen once per cache miss or more rarely
//!   (upstream queries, failures and latency; cache evictions, which the cache's eviction hook
//!   reports without knowing the worker; setup errors). Each upstream has its own 128-byte
//!   aligned block, so different upstreams never share a line. Two workers querying the *same*
//!   upstream do contend on its block, but that path already pays for a socket round trip.
//! * **Raw values in, mapping inside.** [`Metrics::request`] takes the wire qtype and rcode and
//!   maps them to a small fixed index with a `match`, so callers need no label knowledge and
//!   label cardinality is bounded (13 types × 7 rcodes × 2 protocols).
//!
//! Relaxed ordering is enough everywhere: each value is independent and a scrape that sees a
//! slightly torn view across counters (for example a histogram whose `_count` is one ahead of
//! its `_sum`) is normal for Prometheus clients.
//!
//! # Exposition format
//!
//! [`Metrics::encode`] produces OpenMetrics 1.0 text (ends with `# EOF`), served with
//! [`OPENMETRICS_CONTENT_TYPE`]. [`Metrics::encode_prometheus_text`] produces the classic
//! Prometheus text format 0.0.4 ([`PROMETHEUS_TEXT_CONTENT_TYPE`]). The admin server picks one
//! by the `Accept` header, like the Go client does: Prometheus asks for OpenMetrics first, while
//! `curl` and older scrapers get the classic format. Both parse with the Python
//! `prometheus_client` parsers (see `tests/prom_parse.py`).
//!
//! `nodedns_requests_total` only emits label combinations that have been seen at least once
//! (like CoreDNS), because emitting all 182 zero series on every node of a large cluster costs
//! real Prometheus memory; all other series are emitted from the start with value 0.

use std::fmt;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::registry::Registry;

pub mod compat;

/// `Content-Type` of [`Metrics::encode`] output (OpenMetrics 1.0 text).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of [`Metrics::encode_prometheus_text`] output (classic text format 0.0.4).
pub const PROMETHEUS_TEXT_CONTENT_TYPE: &str =
    prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Transport a query arrived on (the `proto` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Udp = 0,
    Tcp = 1,
}

impl Proto {
    const ALL: [Proto; 2] = [Proto::Udp, Proto::Tcp];
    fn label(self) -> &'static str {
        match self {
            Proto::Udp => "udp",
            Proto::Tcp => "tcp",
        }
    }
}

/// Cache entry kind: positive answers or negative (NXDOMAIN/NODATA) answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKind {
    Positive = 0,
    Negative = 1,
}

impl CacheKind {
    const ALL: [CacheKind; 2] = [CacheKind::Positive, CacheKind::Negative];
    fn label(self) -> &'static str {
        match self {
            CacheKind::Positive => "positive",
            CacheKind::Negative => "negative",
        }
    }
}

/// Why an upstream exchange failed (the `cause` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// No answer before the deadline.
    Timeout = 0,
    /// Upstream answered REFUSED, or the connection was refused (ICMP port unreachable / RST).
    Refused = 1,
    /// Upstream answered SERVFAIL.
    Servfail = 2,
    /// Any other socket-level error.
    Network = 3,
    /// A reply from the queried server, with the query's ID, that is not a well-formed answer to
    /// the question (see `upstream::AttemptError::Malformed`).
    Malformed = 4,
}

impl UpstreamFailure {
    const ALL: [UpstreamFailure; 5] = [
        UpstreamFailure::Timeout,
        UpstreamFailure::Refused,
        UpstreamFailure::Servfail,
        UpstreamFailure::Network,
        UpstreamFailure::Malformed,
    ];
    fn label(self) -> &'static str {
        match self {
            UpstreamFailure::Timeout => "timeout",
            UpstreamFailure::Refused => "refused",
            UpstreamFailure::Servfail => "servfail",
            UpstreamFailure::Network => "network",
            UpstreamFailure::Malformed => "malformed",
        }
    }
}

/// How a reload ended (`nodedns_reloads_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadResult {
    /// The new configuration serves.
    Applied,
    /// It did not parse or validate; the old one keeps serving.
    Failed,
    /// It changes what needs a restart (listen addresses, interface, firewall); the old one keeps
    /// serving.
    RestartRequired,
}

impl ReloadResult {
    pub const ALL: [ReloadResult; 3] = [
        ReloadResult::Applied,
        ReloadResult::Failed,
        ReloadResult::RestartRequired,
    ];
    pub fn label(self) -> &'static str {
        match self {
            ReloadResult::Applied => "applied",
            ReloadResult::Failed => "failed",
            ReloadResult::RestartRequired => "restart_required",
        }
    }
}

/// Node setup step that failed (`nodedns_setup_errors_total{kind}`), mirroring node-cache's
/// `coredns_nodecache_setup_errors_total{errortype}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupErrorKind {
    InterfaceAdd = 0,
    InterfaceCheck = 1,
    Iptables = 2,
    IptablesLock = 3,
    Nftables = 4,
    Reconcile = 5,
}

impl SetupErrorKind {
    const ALL: [SetupErrorKind; 6] = [
        SetupErrorKind::InterfaceAdd,
        SetupErrorKind::InterfaceCheck,
        SetupErrorKind::Iptables,
        SetupErrorKind::IptablesLock,
        SetupErrorKind::Nftables,
        SetupErrorKind::Reconcile,
    ];
    fn label(self) -> &'static str {
        match self {
            SetupErrorKind::InterfaceAdd => "interface_add",
            SetupErrorKind::InterfaceCheck => "interface_check",
            SetupErrorKind::Iptables => "iptables",
            SetupErrorKind::IptablesLock => "iptables_lock",
            SetupErrorKind::Nftables => "nftables",
            SetupErrorKind::Reconcile => "reconcile",
        }
    }
}

/// Query type labels; the index is what [`qtype_index`] returns.
const QTYPE_LABELS: [&str; 13] = [
    "A", "AAAA", "PTR", "SRV", "CNAME", "MX", "TXT", "NS", "SOA", "HTTPS", "SVCB", "ANY", "other",
];
const N_QTYPES: usize = QTYPE_LABELS.len();

/// Response code labels; the index is what [`rcode_index`] returns.
const RCODE_LABELS: [&str; 8] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "BADVERS", "other",
];
const N_RCODES: usize = RCODE_LABELS.len();
const N_REQUEST_SLOTS: usize = 2 * N_QTYPES * N_RCODES;

/// Maps a wire qtype to its label index (`other` for anything not listed).
#[inline]
fn qtype_index(qtype: u16) -> usize {
    match qtype {
        1 => 0,    // A
        28 => 1,   // AAAA
        12 => 2,   // PTR
        33 => 3,   // SRV
        5 => 4,    // CNAME
        15 => 5,   // MX
        16 => 6,   // TXT
        2 => 7,    // NS
        6 => 8,    // SOA
        65 => 9,   // HTTPS
        64 => 10,  // SVCB
        255 => 11, // ANY
        _ => 12,
    }
}

/// Maps a wire rcode to its label index (`other` for anything not listed).
#[inline]
fn rcode_index(rcode: u16) -> usize {
    match rcode {
        0..=5 => rcode as usize,
        16 => 6,
        _ => 7,
    }
}

#[inline]
fn request_slot(proto: Proto, qtype: u16, rcode: u16) -> usize {
    (proto as usize * N_QTYPES + qtype_index(qtype)) * N_RCODES + rcode_index(rcode)
}

/// Upper bounds (seconds) of the upstream latency histogram, 100 µs to 5 s. Beyond the last
/// bound is the implicit `+Inf` bucket. Kept roughly 1-2.5-5 per decade so that a local
/// CoreDNS (sub-millisecond) and a slow external resolver both land in distinct buckets.
pub const UPSTREAM_BUCKETS_SECONDS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
const N_BUCKETS: usize = UPSTREAM_BUCKETS_SECONDS.len() + 1;

/// Same bounds in nanoseconds, so `observe` compares integers only.
const UPSTREAM_BUCKETS_NANOS: [u64; 15] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
];

/// Bounds of the client-side request latency histogram (`coredns_dns_request_duration_seconds`):
/// CoreDNS's own (`plugin.TimeBuckets`, 0.25 ms doubling to 8.192 s), so dashboards' `le` values
/// match.
pub const REQUEST_BUCKETS_SECONDS: [f64; 16] = [
    0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024,
    2.048, 4.096, 8.192,
];
const N_REQUEST_BUCKETS: usize = REQUEST_BUCKETS_SECONDS.len() + 1;
/// Same bounds in nanoseconds (250 µs × 2^i).
const REQUEST_BUCKETS_NANOS: [u64; 16] = {
    let mut b = [0u64; 16];
    let mut i = 0;
    while i < 16 {
        b[i] = 250_000 << i;
        i += 1;
    }
    b
};

/// Counters owned by one worker thread. Aligned to 128 bytes so neighbouring shards never share
/// a cache line (see the module docs). Obtain with [`Metrics::worker`] once per worker and keep
/// the reference, or use the `Metrics` convenience methods that take a worker index.
#[repr(align(128))]
pub struct WorkerCounters {
    requests: [AtomicU64; N_REQUEST_SLOTS],
    cache_hits: [AtomicU64; 2],
    cache_misses: AtomicU64,
    stale_answers: AtomicU64,
    prefetches: AtomicU64,
    /// Forwards refused at `--max-concurrent` (not on the hit path).
    concurrency_rejects: AtomicU64,
    /// Signed: a query may start on one worker and finish on another; only the sum matters.
    in_flight: AtomicI64,
    /// Request latency from receipt to reply sent, by [`REQUEST_BUCKETS_SECONDS`] (+Inf last).
    request_duration: [AtomicU64; N_REQUEST_BUCKETS],
    request_duration_sum_nanos: AtomicU64,
}

impl WorkerCounters {
    fn new() -> Self {
        WorkerCounters {
            requests: std::array::from_fn(|_| AtomicU64::new(0)),
            cache_hits: Default::default(),
            cache_misses: AtomicU64::new(0),
            stale_answers: AtomicU64::new(0),
            prefetches: AtomicU64::new(0),
            concurrency_rejects: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
            request_duration: std::array::from_fn(|_| AtomicU64::new(0)),
            request_duration_sum_nanos: AtomicU64::new(0),
        }
    }

    /// Records `count` requests that each took `took` from receipt to reply: a batch of UDP
    /// replies sent together shares one measurement (one clock read per batch, not per query).
    #[inline]
    pub fn request_duration(&self, took: Duration, count: u64) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let bucket = REQUEST_BUCKETS_NANOS.partition_point(|&b| b < nanos);
        self.request_duration[bucket].fetch_add(count, Relaxed);
        self.request_duration_sum_nanos
            .fetch_add(nanos.saturating_mul(count), Relaxed);
    }

    /// The request latency histogram: per-bucket counts (not cumulative) and the sum in seconds.
    pub(crate) fn request_duration_snapshot(&self) -> ([u64; N_REQUEST_BUCKETS], f64) {
        let mut b = [0u64; N_REQUEST_BUCKETS];
        for (o, c) in b.iter_mut().zip(&self.request_duration) {
            *o = c.load(Relaxed);
        }
        (
            b,
            self.request_duration_sum_nanos.load(Relaxed) as f64 / 1e9,
        )
    }

    /// Counts one answered request. `qtype` and `rcode` are raw wire values.
    #[inline]
    pub fn request(&self, proto: Proto, qtype: u16, rcode: u16) {
        self.requests[request_slot(proto, qtype, rcode)].fetch_add(1, Relaxed);
    }

    /// Counts one cache hit of the given kind.
    #[inline]
    pub fn cache_hit(&self, kind: CacheKind) {
        self.cache_hits[kind as usize].fetch_add(1, Relaxed);
    }

    /// Counts one cache miss (the query goes upstream).
    #[inline]
    pub fn cache_miss(&self) {
        self.cache_misses.fetch_add(1, Relaxed);
    }

    /// Counts one answer served from an expired entry (serve-stale).
    #[inline]
    pub fn stale_answer(&self) {
        self.stale_answers.fetch_add(1, Relaxed);
    }

    /// Counts one background prefetch started.
    #[inline]
    pub fn prefetch(&self) {
        self.prefetches.fetch_add(1, Relaxed);
    }

    /// Counts one forward refused at `--max-concurrent`.
    #[inline]
    pub fn concurrency_reject(&self) {
        self.concurrency_rejects.fetch_add(1, Relaxed);
    }

    /// A request started; pair with [`WorkerCounters::in_flight_dec`] (on any worker).
    #[inline]
    pub fn in_flight_inc(&self) {
        self.in_flight.fetch_add(1, Relaxed);
    }

    /// A request finished.
    #[inline]
    pub fn in_flight_dec(&self) {
        self.in_flight.fetch_sub(1, Relaxed);
    }

    /// Increments in-flight now and decrements it when the guard drops, so early returns and
    /// `?` cannot leak the gauge.
    #[inline]
    pub fn in_flight_guard(&self) -> InFlightGuard<'_> {
        self.in_flight_inc();
        InFlightGuard(self)
    }
}

/// See [`WorkerCounters::in_flight_guard`].
#[must_use = "the in-flight gauge is decremented when the guard drops"]
pub struct InFlightGuard<'a>(&'a WorkerCounters);

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        self.0.in_flight_dec();
    }
}

/// Distinct upstream addresses with their own series over the process's life.
pub const MAX_UPSTREAMS: usize = 64;

/// Counters for one upstream, padded so different upstreams never share a cache line.
#[repr(align(128))]
struct UpstreamCounters {
    queries: [AtomicU64; 2],
    failures: [AtomicU64; 5],
    /// Non-cumulative bucket counts; the last one is `+Inf`. Made cumulative at scrape time.
    buckets: [AtomicU64; N_BUCKETS],
    sum_nanos: AtomicU64,
}

impl UpstreamCounters {
    fn new() -> Self {
        UpstreamCounters {
            queries: Default::default(),
            failures: Default::default(),
            buckets: Default::default(),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

/// Counters without a worker index: reported from the cache's eviction hook or from setup code.
#[repr(align(128))]
#[derive(Default)]
struct SharedCounters {
    evictions: [AtomicU64; 2],
    setup_errors: [AtomicU64; 6],
    /// The configuration generation serving now (1 at start, +1 per applied reload).
    config_generation: AtomicU64,
    reloads: [AtomicU64; 3],
}

/// Cache occupancy read at scrape time from the provider set with
/// [`Metrics::set_cache_snapshot_provider`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheSnapshot {
    pub positive_entries: u64,
    pub negative_entries: u64,
    pub positive_bytes: u64,
    pub negative_bytes: u64,
    /// Evictions the cache counted itself (added to those reported with `cache_eviction`).
    pub positive_evictions: u64,
    pub negative_evictions: u64,
}

type SnapshotProvider = Box<dyn Fn() -> CacheSnapshot + Send + Sync>;

/// All nodedns metrics. Share as `Arc<Metrics>`; see the module docs for the layout.
pub struct Metrics {
    core: std::sync::Arc<Core>,
    registry: Registry,
}

/// The atomics, shared between [`Metrics`] (writers) and the registered collector (reader).
struct Core {
    workers: Box<[WorkerCounters]>,
    /// One block per upstream address ever used, claimed in order and never released, so a reload
    /// that adds servers gets new series and the old ones keep their counts.
    upstreams: Box<[UpstreamCounters]>,
    /// `upstream` label values: slot `i` is claimed once its label is set.
    upstream_labels: Box<[OnceLock<(SocketAddr, String)>]>,
    /// Serialises claiming a new slot (lookups of claimed slots take no lock).
    claim: std::sync::Mutex<()>,
    shared: SharedCounters,
    cache_snapshot: OnceLock<SnapshotProvider>,
    /// Upstream health, slot for slot with `upstreams` (see the upstream health block below).
    upstream_health: Box<[UpstreamHealth]>,
    /// Zones loop detection checked, and whether each loops (see the loop block below).
    loops: std::sync::Mutex<Vec<(String, bool)>>,
}

impl Core {
    fn claimed_labels(&self) -> impl Iterator<Item = &(SocketAddr, String)> {
        self.upstream_labels.iter().map_while(|l| l.get())
    }
}

impl fmt::Debug for Core {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricsCore")
            .field("workers", &self.workers.len())
            .field("upstreams", &self.upstream_labels.len())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.core.fmt(f)
    }
}

impl Metrics {
    /// Creates the metric set with `upstreams` registered first (in that order, so their slots are
    /// 0, 1, ...) and `workers` worker shards (at least one shard is always created).
    pub fn new(upstreams: &[SocketAddr], workers: usize) -> Self {
        let core = std::sync::Arc::new(Core {
            workers: (0..workers.max(1)).map(|_| WorkerCounters::new()).collect(),
            upstreams: (0..MAX_UPSTREAMS)
                .map(|_| UpstreamCounters::new())
                .collect(),
            upstream_labels: (0..MAX_UPSTREAMS).map(|_| OnceLock::new()).collect(),
            claim: std::sync::Mutex::new(()),
            shared: SharedCounters::default(),
            cache_snapshot: OnceLock::new(),
            upstream_health: (0..MAX_UPSTREAMS)
                .map(|_| UpstreamHealth::default())
                .collect(),
            loops: std::sync::Mutex::new(Vec::new()),
        });
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ScrapeCollector(core.clone())));
        registry.register_collector(Box::new(compat::CompatCollector(core.clone())));
        let m = Metrics { core, registry };
        for &u in upstreams {
            m.upstream_slot(u);
        }
        m
    }

    /// The slot of upstream `addr`, claimed on first use. Past [`MAX_UPSTREAMS`] distinct
    /// addresses (many reloads with ever new servers) the last slot is shared, labelled `other`.
    /// Called on the miss path only: a scan of the claimed slots, lock-free once claimed.
    pub fn upstream_slot(&self, addr: SocketAddr) -> usize {
        let labels = &self.core.upstream_labels;
        let find = || {
            labels
                .iter()
                .take_while(|l| l.get().is_some())
                .position(|l| l.get().is_some_and(|(a, _)| *a == addr))
        };
        if let Some(i) = find() {
            return i;
        }
        let _g = self.core.claim.lock();
        if let Some(i) = find() {
            return i;
        }
        let free = labels.iter().position(|l| l.get().is_none());
        match free {
            Some(i) if i + 1 < MAX_UPSTREAMS => {
                let _ = labels[i].set((addr, addr.to_string()));
                i
            }
            _ => {
                let last = MAX_UPSTREAMS - 1;
                let _ = labels[last].set((SocketAddr::from(([0, 0, 0, 0], 0)), "other".into()));
                last
            }
        }
    }

    /// Number of worker shards.
    pub fn workers(&self) -> usize {
        self.core.workers.len()
    }

    /// The shard for worker `i`. Out-of-range indexes fold into range (never panics).
    #[inline]
    pub fn worker(&self, i: usize) -> &WorkerCounters {
        let shards = &self.core.workers;
        // `shards` is never empty (see `new`); the modulo only runs for bad indexes.
        if i < shards.len() {
            &shards[i]
        } else {
            &shards[i % shards.len()]
        }
    }

    /// Counts one answered request; `qtype`/`rcode` are raw wire values.
    #[inline]
    pub fn request(&self, worker: usize, proto: Proto, qtype: u16, rcode: u16) {
        self.worker(worker).request(proto, qtype, rcode);
    }

    /// Counts one cache hit.
    #[inline]
    pub fn cache_hit(&self, worker: usize, kind: CacheKind) {
        self.worker(worker).cache_hit(kind);
    }

    /// Counts one cache miss.
    #[inline]
    pub fn cache_miss(&self, worker: usize) {
        self.worker(worker).cache_miss();
    }

    /// Counts one stale answer.
    #[inline]
    pub fn stale_answer(&self, worker: usize) {
        self.worker(worker).stale_answer();
    }

    /// Counts one prefetch.
    #[inline]
    pub fn prefetch(&self, worker: usize) {
        self.worker(worker).prefetch();
    }

    /// Increments the in-flight gauge.
    #[inline]
    pub fn in_flight_inc(&self, worker: usize) {
        self.worker(worker).in_flight_inc();
    }

    /// Decrements the in-flight gauge (may be called on a different worker than the increment).
    #[inline]
    pub fn in_flight_dec(&self, worker: usize) {
        self.worker(worker).in_flight_dec();
    }

    /// Counts one cache eviction (callable from the cache's eviction hook on any thread).
    #[inline]
    pub fn cache_eviction(&self, kind: CacheKind) {
        self.core.shared.evictions[kind as usize].fetch_add(1, Relaxed);
    }

    /// Counts one setup error.
    /// Counts a reload attempt.
    pub fn reload(&self, result: ReloadResult) {
        self.core.shared.reloads[result as usize].fetch_add(1, Relaxed);
    }

    /// Sets the configuration generation now serving.
    pub fn set_config_generation(&self, generation: u64) {
        self.core
            .shared
            .config_generation
            .store(generation, Relaxed);
    }

    #[inline]
    pub fn setup_error(&self, kind: SetupErrorKind) {
        self.core.shared.setup_errors[kind as usize].fetch_add(1, Relaxed);
    }

    #[inline]
    fn upstream(&self, upstream: usize) -> Option<&UpstreamCounters> {
        let u = self.core.upstreams.get(upstream);
        debug_assert!(u.is_some(), "upstream index {upstream} out of range");
        u
    }

    /// Counts one query sent to upstream `upstream` (index into the `new` list). Unknown
    /// indexes are ignored in release builds and assert in debug builds.
    #[inline]
    pub fn upstream_query(&self, upstream: usize, proto: Proto) {
        if let Some(u) = self.upstream(upstream) {
            u.queries[proto as usize].fetch_add(1, Relaxed);
        }
    }

    /// Counts one failed exchange with upstream `upstream`.
    #[inline]
    pub fn upstream_failure(&self, upstream: usize, cause: UpstreamFailure) {
        if let Some(u) = self.upstream(upstream) {
            u.failures[cause as usize].fetch_add(1, Relaxed);
        }
    }

    /// Records the latency of one completed exchange with upstream `upstream`.
    #[inline]
    pub fn upstream_duration(&self, upstream: usize, elapsed: Duration) {
        if let Some(u) = self.upstream(upstream) {
            let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
            let bucket = UPSTREAM_BUCKETS_NANOS.partition_point(|&b| b < nanos);
            u.buckets[bucket].fetch_add(1, Relaxed);
            u.sum_nanos.fetch_add(nanos, Relaxed);
        }
    }

    /// Registers the function the scrape calls for `nodedns_cache_entries`/`_bytes`. Only the
    /// first call takes effect (returns `false` afterwards); until then the gauges read 0.
    /// The function runs on the admin thread during a scrape, so it may take the cache's
    /// internal locks briefly but must not block on I/O.
    pub fn set_cache_snapshot_provider(
        &self,
        provider: impl Fn() -> CacheSnapshot + Send + Sync + 'static,
    ) -> bool {
        self.core.cache_snapshot.set(Box::new(provider)).is_ok()
    }

    /// Encodes all metrics in OpenMetrics 1.0 text format (ends with `# EOF`); serve with
    /// [`OPENMETRICS_CONTENT_TYPE`].
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail; an error here would be a bug in our collector.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        out
    }

    /// node-cache's own listener (`-metrics-listen-address`, :9353): only
    /// `coredns_nodecache_setup_errors_total{errortype}`, node-cache's five label values first
    /// (`configmap` never counts: a bad ConfigMap is a refused reload,
    /// `nodedns_reloads_total{result}`), then nodedns's own (`nftables`, `reconcile`). Prometheus
    /// text format 0.0.4.
    pub fn encode_nodecache_setup_errors(&self) -> String {
        use std::fmt::Write;
        let name = "coredns_nodecache_setup_errors_total";
        let mut out = format!(
            "# HELP {name} The number of errors during periodic network setup for node-cache\n# TYPE {name} counter\n"
        );
        let errs = &self.core.shared.setup_errors;
        let v = |k: SetupErrorKind| errs[k as usize].load(Relaxed);
        let rows = [
            ("iptables", v(SetupErrorKind::Iptables)),
            ("iptables_lock", v(SetupErrorKind::IptablesLock)),
            ("interface_add", v(SetupErrorKind::InterfaceAdd)),
            ("interface_check", v(SetupErrorKind::InterfaceCheck)),
            ("configmap", 0),
            ("nftables", v(SetupErrorKind::Nftables)),
            ("reconcile", v(SetupErrorKind::Reconcile)),
        ];
        for (label, n) in rows {
            let _ = writeln!(out, "{name}{{errortype=\"{label}\"}} {n}");
        }
        out
    }

    /// Encodes all metrics in the classic Prometheus text format 0.0.4; serve with
    /// [`PROMETHEUS_TEXT_CONTENT_TYPE`].
    pub fn encode_prometheus_text(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        out
    }
}

/// Reads the atomics at encode time. Counter names omit `_total`: the encoder appends it.
#[derive(Debug)]
struct ScrapeCollector(std::sync::Arc<Core>);

/// Prometheus histogram buckets from per-bucket counts (not cumulative; +Inf last) and their
/// upper bounds: `(bound, count)` pairs for `encode_histogram`, and the total count.
fn histogram<const N: usize>(counts: [u64; N], bounds: &[f64]) -> ([(f64, u64); N], u64) {
    let mut out = [(0.0f64, 0u64); N];
    let mut total = 0u64;
    for (i, (o, c)) in out.iter_mut().zip(counts).enumerate() {
        total = total.wrapping_add(c);
        *o = (bounds.get(i).copied().unwrap_or(f64::INFINITY), c);
    }
    (out, total)
}

/// An upstream's latency histogram: buckets, count and sum in seconds.
fn upstream_histogram(u: &UpstreamCounters) -> ([(f64, u64); N_BUCKETS], u64, f64) {
    let counts = std::array::from_fn(|i| u.buckets[i].load(Relaxed));
    let (buckets, count) = histogram(counts, &UPSTREAM_BUCKETS_SECONDS);
    (buckets, count, u.sum_nanos.load(Relaxed) as f64 / 1e9)
}

fn sum_workers(core: &Core, f: impl Fn(&WorkerCounters) -> u64) -> u64 {
    core.workers.iter().map(f).fold(0u64, u64::wrapping_add)
}

impl Collector for ScrapeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), fmt::Error> {
        let core = &*self.0;

        // nodedns_requests_total{proto,type,rcode}
        {
            let mut m = enc.encode_descriptor(
                "nodedns_requests",
                "DNS requests answered, by transport, query type and response code",
                None,
                MetricType::Counter,
            )?;
            for proto in Proto::ALL {
                for (qi, qlabel) in QTYPE_LABELS.iter().enumerate() {
                    for (ri, rlabel) in RCODE_LABELS.iter().enumerate() {
                        let slot = (proto as usize * N_QTYPES + qi) * N_RCODES + ri;
                        let v = sum_workers(core, |w| w.requests[slot].load(Relaxed));
                        if v == 0 {
                            continue;
                        }
                        let labels = [
                            ("proto", proto.label()),
                            ("type", *qlabel),
                            ("rcode", *rlabel),
                        ];
                        m.encode_family(&labels)?
                            .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
                    }
                }
            }
        }

        // nodedns_cache_hits_total{kind}
        {
            let mut m = enc.encode_descriptor(
                "nodedns_cache_hits",
                "Queries answered from the cache, by entry kind",
                None,
                MetricType::Counter,
            )?;
            for kind in CacheKind::ALL {
                let v = sum_workers(core, |w| w.cache_hits[kind as usize].load(Relaxed));
                m.encode_family(&[("kind", kind.label())])?
                    .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
            }
        }

        counter(
            &mut enc,
            "nodedns_cache_misses",
            "Queries not answered from the cache",
            sum_workers(core, |w| w.cache_misses.load(Relaxed)),
        )?;

        // nodedns_cache_evictions_total{kind}: counted here and/or by the cache itself (snapshot).
        let snap = core.cache_snapshot.get().map(|f| f()).unwrap_or_default();
        {
            let mut m = enc.encode_descriptor(
                "nodedns_cache_evictions",
                "Cache entries evicted to make room, by entry kind",
                None,
                MetricType::Counter,
            )?;
            for kind in CacheKind::ALL {
                let from_cache = match kind {
                    CacheKind::Positive => snap.positive_evictions,
                    CacheKind::Negative => snap.negative_evictions,
                };
                let v = core.shared.evictions[kind as usize].load(Relaxed) + from_cache;
                m.encode_family(&[("kind", kind.label())])?
                    .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
            }
        }

        // nodedns_cache_entries{kind}, nodedns_cache_bytes{kind}
        {
            let mut m = enc.encode_descriptor(
                "nodedns_cache_entries",
                "Entries currently in the cache, by entry kind",
                None,
                MetricType::Gauge,
            )?;
            for (kind, v) in [
                (CacheKind::Positive, snap.positive_entries),
                (CacheKind::Negative, snap.negative_entries),
            ] {
                m.encode_family(&[("kind", kind.label())])?
                    .encode_gauge(&v)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "nodedns_cache_bytes",
                "Approximate bytes held by cache entries, by entry kind",
                None,
                MetricType::Gauge,
            )?;
            for (kind, v) in [
                (CacheKind::Positive, snap.positive_bytes),
                (CacheKind::Negative, snap.negative_bytes),
            ] {
                m.encode_family(&[("kind", kind.label())])?
                    .encode_gauge(&v)?;
            }
        }

        // nodedns_upstream_queries_total{upstream,proto}
        {
            let mut m = enc.encode_descriptor(
                "nodedns_upstream_queries",
                "Queries sent to each upstream, by transport",
                None,
                MetricType::Counter,
            )?;
            for (u, (_, label)) in core.upstreams.iter().zip(core.claimed_labels()) {
                for proto in Proto::ALL {
                    let v = u.queries[proto as usize].load(Relaxed);
                    m.encode_family(&[("upstream", label.as_str()), ("proto", proto.label())])?
                        .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
                }
            }
        }

        // nodedns_upstream_failures_total{upstream,cause}
        {
            let mut m = enc.encode_descriptor(
                "nodedns_upstream_failures",
                "Failed exchanges with each upstream, by cause",
                None,
                MetricType::Counter,
            )?;
            for (u, (_, label)) in core.upstreams.iter().zip(core.claimed_labels()) {
                for cause in UpstreamFailure::ALL {
                    let v = u.failures[cause as usize].load(Relaxed);
                    m.encode_family(&[("upstream", label.as_str()), ("cause", cause.label())])?
                        .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
                }
            }
        }

        // nodedns_upstream_duration_seconds{upstream}
        {
            let mut m = enc.encode_descriptor(
                "nodedns_upstream_duration_seconds",
                "Latency of completed exchanges with each upstream",
                None,
                MetricType::Histogram,
            )?;
            for (u, (_, label)) in core.upstreams.iter().zip(core.claimed_labels()) {
                let (buckets, count, sum) = upstream_histogram(u);
                m.encode_family(&[("upstream", label.as_str())])?
                    .encode_histogram::<NoLabelSet>(
                        sum,
                        count,
                        &buckets,
                        None::<&std::collections::HashMap<usize, Exemplar<NoLabelSet, f64>>>,
                    )?;
            }
        }

        counter(
            &mut enc,
            "nodedns_stale_answers",
            "Answers served from expired cache entries (serve-stale)",
            sum_workers(core, |w| w.stale_answers.load(Relaxed)),
        )?;
        counter(
            &mut enc,
            "nodedns_prefetches",
            "Background refreshes of popular cache entries",
            sum_workers(core, |w| w.prefetches.load(Relaxed)),
        )?;

        // nodedns_requests_in_flight
        {
            let v: i64 = core
                .workers
                .iter()
                .map(|w| w.in_flight.load(Relaxed))
                .fold(0i64, i64::wrapping_add)
                // An inc on one shard and its dec on another can be read out of order by a
                // scrape that runs between them; never report a negative count.
                .max(0);
            enc.encode_descriptor(
                "nodedns_requests_in_flight",
                "Requests received and not yet answered",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&v)?;
        }

        // nodedns_setup_errors_total{kind}
        {
            let mut m = enc.encode_descriptor(
                "nodedns_setup_errors",
                "Errors while setting up or reconciling the node (interface, firewall rules)",
                None,
                MetricType::Counter,
            )?;
            for kind in SetupErrorKind::ALL {
                let v = core.shared.setup_errors[kind as usize].load(Relaxed);
                m.encode_family(&[("kind", kind.label())])?
                    .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
            }
        }

        // nodedns_config_generation, nodedns_reloads_total{result}
        {
            let v = core.shared.config_generation.load(Relaxed) as i64;
            enc.encode_descriptor(
                "nodedns_config_generation",
                "Generation of the configuration serving now (1 at start, +1 per applied reload)",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&v)?;
            let mut m = enc.encode_descriptor(
                "nodedns_reloads",
                "Configuration reloads (SIGHUP, SIGUSR1, or a changed input file), by result",
                None,
                MetricType::Counter,
            )?;
            for r in ReloadResult::ALL {
                let v = core.shared.reloads[r as usize].load(Relaxed);
                m.encode_family(&[("result", r.label())])?
                    .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
            }
        }

        encode_upstream_health(core, &mut enc)?;
        encode_loops(core, &mut enc)?;

        // nodedns_build_info{version,commit} 1
        enc.encode_descriptor("nodedns_build", "Build information", None, MetricType::Info)?
            .encode_info(&[
                ("version", env!("CARGO_PKG_VERSION")),
                ("commit", crate::config::GIT_COMMIT),
            ])?;

        Ok(())
    }
}

// ---- Upstream health (issue 12) ----------------------------------------------------------------
// Kept in a block of its own, next to nothing else, so it merges cleanly with renames elsewhere.
// `nodedns_upstream_healthy{upstream}` is 1 until health checking marks the server down (CoreDNS
// has no such gauge; its nearest is `coredns_proxy_healthcheck_failures_total`), and
// `nodedns_upstream_healthcheck_failures_total{upstream}` counts probes of a down server that got
// no reply. Written on health transitions and probes only, never per query.

/// Health of one upstream slot.
#[derive(Debug, Default)]
#[repr(align(64))]
struct UpstreamHealth {
    /// Marked down (the gauge reads 0).
    down: std::sync::atomic::AtomicBool,
    healthcheck_failures: AtomicU64,
}

impl Metrics {
    /// Upstream `upstream` (a slot, see [`Metrics::upstream_slot`]) was marked down or up.
    pub fn upstream_health(&self, upstream: usize, healthy: bool) {
        if let Some(h) = self.core.upstream_health.get(upstream) {
            h.down.store(!healthy, Relaxed);
        }
    }

    /// A health probe of upstream `upstream` got no reply.
    pub fn upstream_healthcheck_failure(&self, upstream: usize) {
        if let Some(h) = self.core.upstream_health.get(upstream) {
            h.healthcheck_failures.fetch_add(1, Relaxed);
        }
    }
}

fn encode_upstream_health(core: &Core, enc: &mut DescriptorEncoder) -> Result<(), fmt::Error> {
    {
        let mut m = enc.encode_descriptor(
            "nodedns_upstream_healthy",
            "1 while the upstream is up, 0 while health checking has marked it down",
            None,
            MetricType::Gauge,
        )?;
        for (h, (_, label)) in core.upstream_health.iter().zip(core.claimed_labels()) {
            let v: i64 = if h.down.load(Relaxed) { 0 } else { 1 };
            m.encode_family(&[("upstream", label.as_str())])?
                .encode_gauge(&v)?;
        }
    }
    let mut m = enc.encode_descriptor(
        "nodedns_upstream_healthcheck_failures",
        "Health probes of a down upstream that got no reply",
        None,
        MetricType::Counter,
    )?;
    for (h, (_, label)) in core.upstream_health.iter().zip(core.claimed_labels()) {
        let v = h.healthcheck_failures.load(Relaxed);
        m.encode_family(&[("upstream", label.as_str())])?
            .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
    }
    Ok(())
}
// ---- end of upstream health ---------------------------------------------------------------------

// ---- Loop detection ----------------------------------------------------------------------------
// `nodedns_loop_detected{zone}`: 1 for a zone whose upstreams send its queries back to nodedns
// (it is no longer forwarded), 0 for a zone checked and fine; no series for zones not checked.
// Written by the loop check only.

impl Metrics {
    /// Loop detection checked `zone`: `looped` says whether it loops.
    pub fn set_loop_detected(&self, zone: &str, looped: bool) {
        let mut l = self.core.loops.lock().unwrap_or_else(|e| e.into_inner());
        match l.iter_mut().find(|(z, _)| z == zone) {
            Some(e) => e.1 = looped,
            None => l.push((zone.to_string(), looped)),
        }
    }

    /// Drops `zone`'s series (a reload removed the zone or lifted its block without a new check).
    pub fn clear_loop_detected(&self, zone: &str) {
        let mut l = self.core.loops.lock().unwrap_or_else(|e| e.into_inner());
        l.retain(|(z, _)| z != zone);
    }
}

fn encode_loops(core: &Core, enc: &mut DescriptorEncoder) -> Result<(), fmt::Error> {
    let loops = core.loops.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut m = enc.encode_descriptor(
        "nodedns_loop_detected",
        "1 when the zone's upstreams send its queries back to nodedns (the zone is not forwarded), 0 when checked and fine",
        None,
        MetricType::Gauge,
    )?;
    for (zone, looped) in &loops {
        let v: i64 = i64::from(*looped);
        m.encode_family(&[("zone", zone.as_str())])?
            .encode_gauge(&v)?;
    }
    Ok(())
}
// ---- end of loop detection ----------------------------------------------------------------------

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> Result<(), fmt::Error> {
    enc.encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&v, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs() -> Vec<SocketAddr> {
        vec![
            "10.96.0.10:53".parse().expect("addr"),
            "[fd00::10]:53".parse().expect("addr"),
        ]
    }

    /// Returns the value of the exact sample line `series` (name plus label set).
    fn sample(text: &str, series: &str) -> Option<String> {
        text.lines().find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .map(str::to_owned)
        })
    }

    #[test]
    fn request_mapping_covers_every_slot_once() {
        let mut seen = std::collections::HashSet::new();
        for proto in Proto::ALL {
            for qt in [1u16, 28, 12, 33, 5, 15, 16, 2, 6, 65, 64, 255, 99] {
                for rc in [0u16, 1, 2, 3, 4, 5, 16, 6] {
                    assert!(seen.insert(request_slot(proto, qt, rc)));
                }
            }
        }
        assert_eq!(seen.len(), N_REQUEST_SLOTS);
        assert!(seen.iter().all(|&s| s < N_REQUEST_SLOTS));
        // Unknown values fold into `other`.
        assert_eq!(
            request_slot(Proto::Tcp, 4242, 200),
            request_slot(Proto::Tcp, 99, 6)
        );
        // BADVERS (16) has its own label: its low four bits read as NOERROR.
        assert_ne!(
            request_slot(Proto::Udp, 1, 16),
            request_slot(Proto::Udp, 1, 0)
        );
    }

    #[test]
    fn shards_are_padded() {
        assert_eq!(std::mem::align_of::<WorkerCounters>(), 128);
        assert_eq!(std::mem::size_of::<WorkerCounters>() % 128, 0);
        assert_eq!(std::mem::align_of::<UpstreamCounters>(), 128);
    }

    #[test]
    fn known_sequence_encodes_exact_values() {
        let m = Metrics::new(&addrs(), 2);
        // Requests split across both workers, plus an out-of-range worker index (folds to 1).
        m.request(0, Proto::Udp, 1, 0);
        m.request(1, Proto::Udp, 1, 0);
        m.request(3, Proto::Udp, 1, 0);
        m.request(0, Proto::Tcp, 28, 3);
        m.request(1, Proto::Udp, 4242, 9); // other/other
        m.cache_hit(0, CacheKind::Positive);
        m.cache_hit(1, CacheKind::Positive);
        m.cache_hit(1, CacheKind::Negative);
        m.cache_miss(0);
        m.cache_eviction(CacheKind::Negative);
        m.stale_answer(1);
        m.in_flight_inc(0);
        m.in_flight_inc(0);
        m.in_flight_dec(1);
        {
            let _g = m.worker(1).in_flight_guard();
        }
        m.upstream_query(0, Proto::Udp);
        m.upstream_query(0, Proto::Udp);
        m.upstream_query(1, Proto::Tcp);
        m.upstream_failure(1, UpstreamFailure::Timeout);
        m.upstream_duration(0, Duration::from_micros(50)); // <= 100µs
        m.upstream_duration(0, Duration::from_micros(100)); // exactly on the bound: le=0.0001
        m.upstream_duration(0, Duration::from_millis(3)); // <= 5ms
        m.upstream_duration(0, Duration::from_secs(9)); // +Inf
        m.setup_error(SetupErrorKind::IptablesLock);
        assert!(m.set_cache_snapshot_provider(|| CacheSnapshot {
            positive_entries: 7,
            negative_entries: 2,
            positive_bytes: 700,
            negative_bytes: 90,
            ..Default::default()
        }));
        assert!(!m.set_cache_snapshot_provider(CacheSnapshot::default));

        let t = m.encode();
        let s =
            |series: &str| sample(&t, series).unwrap_or_else(|| panic!("{series} missing in\n{t}"));
        assert_eq!(
            s(r#"nodedns_requests_total{proto="udp",type="A",rcode="NOERROR"}"#),
            "3"
        );
        assert_eq!(
            s(r#"nodedns_requests_total{proto="tcp",type="AAAA",rcode="NXDOMAIN"}"#),
            "1"
        );
        assert_eq!(
            s(r#"nodedns_requests_total{proto="udp",type="other",rcode="other"}"#),
            "1"
        );
        assert_eq!(
            t.lines()
                .filter(|l| l.starts_with("nodedns_requests_total{"))
                .count(),
            3,
            "zero request series are not emitted"
        );
        assert_eq!(s(r#"nodedns_cache_hits_total{kind="positive"}"#), "2");
        assert_eq!(s(r#"nodedns_cache_hits_total{kind="negative"}"#), "1");
        assert_eq!(s("nodedns_cache_misses_total"), "1");
        assert_eq!(s(r#"nodedns_cache_evictions_total{kind="positive"}"#), "0");
        assert_eq!(s(r#"nodedns_cache_evictions_total{kind="negative"}"#), "1");
        assert_eq!(s(r#"nodedns_cache_entries{kind="positive"}"#), "7");
        assert_eq!(s(r#"nodedns_cache_entries{kind="negative"}"#), "2");
        assert_eq!(s(r#"nodedns_cache_bytes{kind="positive"}"#), "700");
        assert_eq!(s(r#"nodedns_cache_bytes{kind="negative"}"#), "90");
        assert_eq!(s("nodedns_stale_answers_total"), "1");
        assert_eq!(s("nodedns_prefetches_total"), "0");
        assert_eq!(s("nodedns_requests_in_flight"), "1");
        assert_eq!(
            s(r#"nodedns_upstream_queries_total{upstream="10.96.0.10:53",proto="udp"}"#),
            "2"
        );
        assert_eq!(
            s(r#"nodedns_upstream_queries_total{upstream="[fd00::10]:53",proto="tcp"}"#),
            "1"
        );
        assert_eq!(
            s(r#"nodedns_upstream_failures_total{upstream="[fd00::10]:53",cause="timeout"}"#),
            "1"
        );
        assert_eq!(
            s(r#"nodedns_upstream_failures_total{upstream="10.96.0.10:53",cause="network"}"#),
            "0"
        );
        // The encoder puts `le` before the family labels.
        let h = |le: &str| {
            format!(
                r#"nodedns_upstream_duration_seconds_bucket{{le="{le}",upstream="10.96.0.10:53"}}"#
            )
        };
        assert_eq!(s(&h("0.0001")), "2");
        assert_eq!(s(&h("0.0025")), "2");
        assert_eq!(s(&h("0.005")), "3");
        assert_eq!(s(&h("5.0")), "3");
        assert_eq!(s(&h("+Inf")), "4");
        assert_eq!(
            s(r#"nodedns_upstream_duration_seconds_count{upstream="10.96.0.10:53"}"#),
            "4"
        );
        assert_eq!(
            s(r#"nodedns_upstream_duration_seconds_sum{upstream="10.96.0.10:53"}"#),
            "9.00315"
        );
        assert_eq!(
            s(r#"nodedns_upstream_duration_seconds_count{upstream="[fd00::10]:53"}"#),
            "0"
        );
        assert_eq!(
            s(r#"nodedns_setup_errors_total{kind="iptables_lock"}"#),
            "1"
        );
        for kind in [
            "interface_add",
            "interface_check",
            "iptables",
            "nftables",
            "reconcile",
        ] {
            assert_eq!(
                s(&format!(r#"nodedns_setup_errors_total{{kind="{kind}"}}"#)),
                "0"
            );
        }
        assert_eq!(
            s(&format!(
                r#"nodedns_build_info{{version="{}",commit="{}"}}"#,
                env!("CARGO_PKG_VERSION"),
                crate::config::GIT_COMMIT
            )),
            "1"
        );
        assert!(t.contains("# TYPE nodedns_requests counter\n"));
        assert!(t.contains("# TYPE nodedns_upstream_duration_seconds histogram\n"));
        assert!(t.ends_with("# EOF\n"));
    }

    #[test]
    fn classic_text_format_has_same_values_and_no_eof() {
        let m = Metrics::new(&addrs(), 1);
        m.request(0, Proto::Udp, 33, 2);
        m.cache_miss(0);
        let t = m.encode_prometheus_text();
        assert_eq!(
            sample(
                &t,
                r#"nodedns_requests_total{proto="udp",type="SRV",rcode="SERVFAIL"}"#
            )
            .as_deref(),
            Some("1")
        );
        assert_eq!(
            sample(&t, "nodedns_cache_misses_total").as_deref(),
            Some("1")
        );
        assert!(t.contains("# TYPE nodedns_requests_total counter\n"));
        assert!(!t.contains("# EOF"));
    }

    #[test]
    fn fresh_metrics_expose_zeroes_and_no_provider() {
        let m = Metrics::new(&[], 0);
        assert_eq!(m.workers(), 1);
        let t = m.encode();
        assert_eq!(
            sample(&t, "nodedns_cache_misses_total").as_deref(),
            Some("0")
        );
        assert_eq!(
            sample(&t, r#"nodedns_cache_entries{kind="positive"}"#).as_deref(),
            Some("0")
        );
        assert_eq!(
            sample(&t, "nodedns_requests_in_flight").as_deref(),
            Some("0")
        );
        assert!(!t.contains("nodedns_requests_total{"));
    }

    #[test]
    fn concurrent_recording_sums_across_shards() {
        let m = std::sync::Arc::new(Metrics::new(&addrs(), 4));
        let threads: Vec<_> = (0..4)
            .map(|w| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        m.request(w, Proto::Udp, 1, 0);
                        m.upstream_query(0, Proto::Udp);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("worker thread panicked");
        }
        let t = m.encode();
        assert_eq!(
            sample(
                &t,
                r#"nodedns_requests_total{proto="udp",type="A",rcode="NOERROR"}"#
            )
            .as_deref(),
            Some("40000")
        );
        assert_eq!(
            sample(
                &t,
                r#"nodedns_upstream_queries_total{upstream="10.96.0.10:53",proto="udp"}"#
            )
            .as_deref(),
            Some("40000")
        );
    }

    #[test]
    fn upstream_health_gauge_and_probe_failures() {
        let m = Metrics::new(&addrs(), 1);
        let t = m.encode();
        assert_eq!(
            sample(&t, r#"nodedns_upstream_healthy{upstream="10.96.0.10:53"}"#).as_deref(),
            Some("1"),
            "healthy until marked down"
        );
        m.upstream_health(0, false);
        m.upstream_healthcheck_failure(0);
        m.upstream_healthcheck_failure(0);
        let t = m.encode();
        assert_eq!(
            sample(&t, r#"nodedns_upstream_healthy{upstream="10.96.0.10:53"}"#).as_deref(),
            Some("0")
        );
        assert_eq!(
            sample(&t, r#"nodedns_upstream_healthy{upstream="[fd00::10]:53"}"#).as_deref(),
            Some("1")
        );
        assert_eq!(
            sample(
                &t,
                r#"nodedns_upstream_healthcheck_failures_total{upstream="10.96.0.10:53"}"#
            )
            .as_deref(),
            Some("2")
        );
        m.upstream_health(0, true);
        assert_eq!(
            sample(
                &m.encode(),
                r#"nodedns_upstream_healthy{upstream="10.96.0.10:53"}"#
            )
            .as_deref(),
            Some("1")
        );
    }
}
