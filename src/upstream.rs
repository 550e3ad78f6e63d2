//! Forwarding misses: zones to servers, UDP and TCP transports, retries and deadlines.
//!
//! nodedns forwards the client's question under a random ID, unique among the queries in flight on
//! its socket, from a connected UDP socket (the kernel drops datagrams from any other address) that
//! is reused for `expire` and then replaced by one on a new random port (see `udp`), and accepts
//! only a reply whose ID and question match (anti-spoofing). A truncated UDP reply is retried over TCP.
//! With `force_tcp`, every query goes over a reused, pipelined TCP connection per server (RFC 7766).
//! Each attempt has its own timeout and the whole exchange a deadline; past it the caller answers
//! SERVFAIL.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::config::model::{self, CachePolicy, Policy, Zone};
use crate::exchange::{self, Candidate, Exchange, ExchangeOptions, Feedback, ReplyMeta};
use crate::health::{Registry, ServerHealth};
use crate::wire::{self, Kind, QueryView, Response, TtlPolicy};

/// Queries waiting to be written on one upstream connection.
const TCP_QUEUE: usize = 1024;

/// Why one attempt failed.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum AttemptError {
    #[error("timed out")]
    Timeout,
    #[error("network error")]
    Network,
    #[error("connection refused")]
    Refused,
    /// The queried server's reply carried the query's ID but was no well-formed answer to it
    /// (garbage, not a response, records that do not parse). Counted as a failed attempt, so the
    /// next server is tried at once instead of the client waiting out the deadline.
    #[error("malformed reply")]
    Malformed,
}

/// Why a whole exchange failed; the client gets SERVFAIL.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum UpstreamError {
    #[error("no upstream configured for this name")]
    NoServers,
    #[error("no usable reply before the deadline (last: {0})")]
    Exhausted(AttemptError),
    #[error("not forwarded: the zone's upstreams send its queries back to nodedns (a loop)")]
    Loop,
}

/// Transport of one attempt, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// How an attempt ended, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptResult {
    /// A reply with this rcode.
    Reply(u8),
    Failed(AttemptError),
}

/// Receives one call per attempt (metrics implement it; tests may count).
pub trait Observer: Send + Sync {
    fn attempt(
        &self,
        server: SocketAddr,
        transport: Transport,
        result: AttemptResult,
        took: Duration,
    );

    /// `server` was marked down (`healthy == false`) or is up again.
    fn health(&self, _server: SocketAddr, _healthy: bool) {}

    /// A health probe of a server marked down got no reply.
    fn healthcheck_failure(&self, _server: SocketAddr) {}
}

/// An observer that ignores everything.
pub struct NoObserver;
impl Observer for NoObserver {
    fn attempt(&self, _: SocketAddr, _: Transport, _: AttemptResult, _: Duration) {}
}

/// Timing options (the same for every zone).
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub attempt_timeout: Duration,
    pub deadline: Duration,
    /// Pipelined TCP connections per server (`--tcp-pool-size`).
    pub tcp_pool_size: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            attempt_timeout: Duration::from_secs(2),
            deadline: Duration::from_secs(5),
            tcp_pool_size: 2,
        }
    }
}

/// A successful exchange: the reply as the caller's `accept` made it.
#[derive(Debug)]
pub struct Reply<T> {
    pub value: T,
    /// Index of the server in [`Upstreams::servers`].
    pub server: usize,
}

/// One zone's servers and policy.
struct Route {
    servers: Vec<usize>,
    next: AtomicUsize,
    transport: model::Transport,
    order: Policy,
    store: TtlPolicy,
    /// The zone's `max_concurrent` and its queries in flight (see [`Upstreams::admit`]).
    max_concurrent: Option<usize>,
    in_flight: Arc<AtomicUsize>,
    /// Loop detection found the zone's servers sending its queries back to nodedns: not forwarded
    /// any more (see [`Upstreams::block_loop`]). Read on the miss path only.
    looped: AtomicBool,
}

/// A slot among a zone's forwarded queries in flight; released on drop.
pub struct ZonePermit(Option<Arc<AtomicUsize>>);

impl Drop for ZonePermit {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            c.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Why a zone table cannot be built.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum UpstreamConfigError {
    #[error("bad zone {zone:?}: {reason}")]
    BadZone { zone: String, reason: String },
}

/// All zones and servers: one generation of the forwarding configuration (a reload builds a new one;
/// misses in flight finish on the one they started with).
pub struct Upstreams {
    /// Lowercased wire-format zone name → route. Longest suffix wins.
    routes: HashMap<Vec<u8>, Route>,
    servers: Vec<SocketAddr>,
    pools: Vec<TcpPool>,
    opts: Options,
    observer: Arc<dyn Observer>,
    /// Shared with the generations before and after this one (see [`crate::health`]).
    registry: Arc<Registry>,
    /// `health[i]` is `servers[i]`'s.
    health: Vec<Arc<ServerHealth>>,
    /// Where probes run: the runtime that built this (the main one), for the reason `TcpPool`'s
    /// connections do.
    rt: Option<tokio::runtime::Handle>,
}

impl Drop for Upstreams {
    fn drop(&mut self) {
        for h in &self.health {
            h.release();
        }
    }
}

/// The store-time TTL policy of a zone's cache settings.
pub fn ttl_policy(c: &CachePolicy) -> TtlPolicy {
    TtlPolicy {
        min_ttl: c.min_ttl,
        max_ttl: c.max_ttl,
        min_negative_ttl: c.min_negative_ttl,
        max_negative_ttl: c.max_negative_ttl,
        servfail_ttl: c.servfail_ttl,
        positive: c.success,
        negative: c.denial,
        stale: c.serve_stale.map_or(Duration::ZERO, |s| s.duration),
        stale_verify: c.serve_stale.is_some_and(|s| s.verify),
        prefetch: c.prefetch.map(|p| (p.amount, p.percent, p.duration)),
    }
}

impl Upstreams {
    /// Builds the routes of `zones`. A zone named twice: the later one wins (flags override the
    /// environment), and only the servers of the zones that remain are dialled, probed and counted.
    pub fn new(zones: &[Zone], opts: Options) -> Result<Upstreams, UpstreamConfigError> {
        Upstreams::with_health(zones, opts, Registry::new(Instant::now()))
    }

    /// [`Self::new`] with the health of servers kept in `registry` (a reload passes the running
    /// generation's, so a kept server keeps its health).
    pub fn with_health(
        zones: &[Zone],
        opts: Options,
        registry: Arc<Registry>,
    ) -> Result<Upstreams, UpstreamConfigError> {
        let mut servers: Vec<SocketAddr> = Vec::new();
        let mut routes = HashMap::new();
        for z in last_wins_zones(zones) {
            let mut idx = Vec::new();
            for s in &z.servers {
                let i = match servers.iter().position(|x| x == s) {
                    Some(i) => i,
                    None => {
                        servers.push(*s);
                        servers.len() - 1
                    }
                };
                idx.push(i);
            }
            let name =
                wire::name_from_str(&z.name).map_err(|reason| UpstreamConfigError::BadZone {
                    zone: z.name.clone(),
                    reason,
                })?;
            routes.insert(
                name,
                Route {
                    servers: idx,
                    next: AtomicUsize::new(0),
                    transport: z.transport,
                    order: z.policy,
                    store: ttl_policy(&z.cache),
                    max_concurrent: z.forward.max_concurrent,
                    in_flight: Arc::default(),
                    looped: AtomicBool::new(false),
                },
            );
        }
        // The TCP connections live on the runtime that builds this (the main one), not on whichever
        // UDP worker dials first: a worker's runtime stands still while the worker blocks in
        // `recvmmsg`, and a connection shared by all workers must keep reading meanwhile.
        let rt = tokio::runtime::Handle::try_current().ok();
        // A server's connections live as long as the shortest `expire` of the zones using it.
        let pools = servers
            .iter()
            .map(|&s| {
                let expire = last_wins_zones(zones)
                    .filter(|z| z.servers.contains(&s))
                    .map(|z| z.forward.expire)
                    .min()
                    .unwrap_or(model::ForwardOptions::default().expire)
                    .max(Duration::from_millis(10));
                TcpPool::new(s, rt.clone(), opts.tcp_pool_size, expire)
            })
            .collect();
        // A server in several zones takes the strictest settings: the smallest non-zero max_fails
        // (0 only when every zone turns health checking off) and the shortest probe interval.
        let health = servers
            .iter()
            .map(|&s| {
                let zones_of = || last_wins_zones(zones).filter(move |z| z.servers.contains(&s));
                let max_fails = zones_of()
                    .map(|z| z.forward.max_fails)
                    .filter(|&m| m > 0)
                    .min()
                    .unwrap_or(0);
                let every = zones_of()
                    .map(|z| z.forward.health_check)
                    .min()
                    .unwrap_or(model::ForwardOptions::default().health_check)
                    .max(Duration::from_millis(10));
                let tcp = zones_of().any(|z| z.transport == model::Transport::Tcp);
                let h = registry.server(s);
                h.adopt(max_fails, every, tcp);
                h
            })
            .collect();
        let u = Upstreams {
            routes,
            servers,
            pools,
            opts,
            observer: Arc::new(NoObserver),
            registry,
            health,
            rt,
        };
        Ok(u)
    }

    /// The health registry, to hand to the next generation.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// Whether `servers()[i]` is marked down.
    pub fn is_down(&self, i: usize) -> bool {
        self.health.get(i).is_some_and(|h| h.is_down())
    }

    /// Starts the probe of every server that is down and has none (a reload that keeps a down
    /// server whose probe has just stopped with the old generation), and tells the observer every
    /// server's state (a reload may change `max_fails`, which can mark a server up or down without
    /// any attempt). Call after `with_observer`.
    pub fn resume_probes(&self) {
        for (i, h) in self.health.iter().enumerate() {
            self.observer.health(h.addr, !h.is_down());
            if h.is_down() {
                self.start_probe(i);
            }
        }
    }

    /// Sets who is told about every attempt (metrics). Servers are indexed as in [`Self::servers`].
    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Upstreams {
        self.observer = observer;
        self
    }

    /// Asks every server for `. NS` over UDP and says whether any answered within `timeout`
    /// (the readiness check; what it answers does not matter; health is not touched).
    pub async fn probe(&self, timeout: Duration) -> bool {
        // Header: RD, one question; question: root, NS, IN.
        let question: &[u8] = &[0, 0, 2, 0, 1];
        let until = Instant::now() + timeout;
        let probes = (0..self.servers.len()).map(|server| async move {
            let transport = self.probe_transport(server);
            let id: u16 = rand::random();
            let mut q = Vec::with_capacity(17);
            q.extend_from_slice(&id.to_be_bytes());
            q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
            q.extend_from_slice(question);
            // Through the same exchange as real queries, so the probe uses their transport (with
            // --force-tcp, UDP may be exactly what is blocked).
            self.exchange(server, transport, &q, question, until)
                .await
                .is_ok()
        });
        futures_util::future::join_all(probes)
            .await
            .into_iter()
            .any(|ok| ok)
    }

    /// The transport a probe of `server` uses: TCP when a zone reaches it only over TCP (UDP may be
    /// exactly what is blocked), else UDP.
    fn probe_transport(&self, server: usize) -> Transport {
        let tcp = self
            .routes
            .values()
            .any(|r| r.transport == model::Transport::Tcp && r.servers.contains(&server));
        if tcp { Transport::Tcp } else { Transport::Udp }
    }

    /// Every distinct server, in the order metrics label them.
    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// The zone (wire format) that routes `qname`: the longest configured suffix on a label
    /// boundary, or `None` when not even `.` is configured.
    #[cfg(test)]
    fn zone_for(&self, qname: &[u8]) -> Option<&[u8]> {
        self.route(qname).map(|(z, _)| z)
    }

    fn route(&self, qname: &[u8]) -> Option<(&[u8], &Route)> {
        let mut pos = 0;
        loop {
            let suffix = qname.get(pos..)?;
            if let Some((z, r)) = self.routes.get_key_value(suffix) {
                return Some((z.as_slice(), r));
            }
            let l = *suffix.first()? as usize;
            if l == 0 {
                return None;
            }
            pos += 1 + l;
        }
    }

    /// The store-time policy of the zone that routes `qname` (lowercased wire format).
    pub fn policy_for(&self, qname: &[u8]) -> Option<TtlPolicy> {
        self.route(qname).map(|(_, r)| r.store)
    }

    /// A hash of the zones and their servers: a cache file written under other zones or servers is
    /// not loaded (its answers came from elsewhere).
    pub fn fingerprint(&self) -> u64 {
        let mut zones: Vec<(&Vec<u8>, Vec<SocketAddr>)> = self
            .routes
            .iter()
            .map(|(z, r)| (z, r.servers.iter().map(|&i| self.servers[i]).collect()))
            .collect();
        zones.sort();
        // Stable across processes and builds (std's hashers are seeded or may change).
        crate::persist::fnv1a(format!("{zones:?}").as_bytes())
    }

    /// Whether a cached response may stay under this generation's policy for its name: its zone
    /// still caches its kind, and its lifetime is within the zone's caps (a lowered cap drops longer
    /// entries; a raised one keeps everything). Names no zone routes any more are dropped.
    pub fn keeps(&self, r: &Response) -> bool {
        let Some((_, route)) = self.route(r.key_name()) else {
            return false;
        };
        let p = &route.store;
        let secs = r.lifetime().as_secs();
        match r.kind {
            Kind::Positive => p.positive && secs <= p.max_ttl.as_secs().max(p.min_ttl.as_secs()),
            Kind::Negative => {
                p.negative
                    && secs
                        <= p.max_negative_ttl
                            .as_secs()
                            .max(p.min_negative_ttl.as_secs())
            }
            Kind::ServFail => secs <= p.servfail_ttl.as_secs(),
            Kind::Uncacheable => false,
        }
    }

    /// Reserves a slot for `view` among its zone's forwarded queries, or `None` when the zone's
    /// `max_concurrent` is reached: the client gets REFUSED, as from CoreDNS's `forward`. Nothing
    /// went upstream, so it is no health failure. A zone without the setting costs no atomic.
    pub fn admit(&self, view: &QueryView<'_>) -> Option<ZonePermit> {
        let Some((_, route)) = self.route(view.key.name()) else {
            return Some(ZonePermit(None));
        };
        let Some(max) = route.max_concurrent else {
            return Some(ZonePermit(None));
        };
        if route.in_flight.fetch_add(1, Ordering::AcqRel) >= max {
            route.in_flight.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ZonePermit(Some(route.in_flight.clone())))
    }

    /// Forwards `view`'s question and returns the first usable reply, trying the zone's servers in
    /// the order of its policy until one answers or the deadline passes. The decisions are
    /// [`Exchange`]'s; this loop only performs its attempts and feeds back health.
    ///
    /// `accept` turns a reply (bytes, the ID it was sent with, the zone's cache policy) into what
    /// the caller keeps (parsed once, here): a reply it rejects is the server's failure
    /// ([`AttemptError::Malformed`]) and the next server is tried, as for a timeout, but at once.
    pub async fn resolve<T, E: std::fmt::Display>(
        &self,
        view: &QueryView<'_>,
        mut accept: impl FnMut(&[u8], u16, &TtlPolicy) -> Result<T, E>,
    ) -> Result<Reply<T>, UpstreamError> {
        let (_, route) = self
            .route(view.key.name())
            .ok_or(UpstreamError::NoServers)?;
        if route.servers.is_empty() {
            // An `except` name: not forwarded.
            return Err(UpstreamError::NoServers);
        }
        if route.looped.load(Ordering::Relaxed) {
            return Err(UpstreamError::Loop);
        }
        let start = Instant::now();
        let order = self.order(route, start);
        let mut ex = Exchange::new(
            order,
            start,
            ExchangeOptions {
                attempt_timeout: self.opts.attempt_timeout,
                deadline: self.opts.deadline,
                transport: route.transport,
            },
        );
        let mut query = Vec::with_capacity(view.question.len() + 32);
        while let Some(a) = ex.poll_attempt(Instant::now()) {
            // A loop found meanwhile (this may be one of the looping copies): no further attempt.
            if route.looped.load(Ordering::Relaxed) {
                return Err(UpstreamError::Loop);
            }
            let id: u16 = rand::random();
            wire::build_upstream_query(view, id, &mut query);
            let result = self
                .exchange(a.server, a.transport, &query, view.question, a.until)
                .await
                .and_then(|bytes| {
                    let meta = ReplyMeta {
                        rcode: wire::header_rcode(&bytes),
                        truncated: wire::is_truncated(&bytes),
                    };
                    // A truncated reply the machine retries over TCP is nobody's answer.
                    let tcp_retry = meta.truncated
                        && a.transport == Transport::Udp
                        && route.transport == model::Transport::PreferUdp;
                    if tcp_retry {
                        return Ok((meta, None));
                    }
                    match accept(&bytes, id, &route.store) {
                        Ok(v) => Ok((meta, Some(v))),
                        Err(e) => {
                            tracing::debug!(server = %self.servers[a.server], error = %e, "malformed upstream reply");
                            Err(AttemptError::Malformed)
                        }
                    }
                });
            self.observe(
                a.server,
                a.transport,
                result.as_ref().map(|(m, _)| m.rcode),
                a.started,
            );
            let now = Instant::now();
            let feedback = match result {
                Ok((meta, value)) => ex.handle_reply(&a, meta, value, now),
                Err(e) => ex.handle_failure(&a, e, now),
            };
            self.feedback(feedback, now);
        }
        let chosen = ex.finish()?;
        Ok(Reply {
            value: chosen
                .reply
                .ok_or(UpstreamError::Exhausted(AttemptError::Malformed))?,
            server: chosen.server,
        })
    }

    /// Stops forwarding zone `zone` (lowercased wire format, exactly a configured zone): its queries
    /// get [`UpstreamError::Loop`] from now on. Returns the zone's servers, `None` when no such
    /// zone is configured.
    pub fn block_loop(&self, zone: &[u8]) -> Option<Vec<SocketAddr>> {
        let route = self.routes.get(zone)?;
        route.looped.store(true, Ordering::Relaxed);
        Some(route.servers.iter().map(|&i| self.servers[i]).collect())
    }

    /// The zones [`Self::block_loop`] stopped, with their servers (name in presentation form).
    pub fn looped_zones(&self) -> Vec<(String, Vec<SocketAddr>)> {
        let mut out: Vec<(String, Vec<SocketAddr>)> = self
            .routes
            .iter()
            .filter(|(_, r)| r.looped.load(Ordering::Relaxed))
            .map(|(z, r)| {
                (
                    zone_display(z),
                    r.servers.iter().map(|&i| self.servers[i]).collect(),
                )
            })
            .collect();
        out.sort();
        out
    }

    /// The servers of zone `zone` (lowercased wire format), if configured.
    pub fn zone_servers(&self, zone: &[u8]) -> Option<Vec<SocketAddr>> {
        let route = self.routes.get(zone)?;
        Some(route.servers.iter().map(|&i| self.servers[i]).collect())
    }

    /// Keeps the loop blocks of `old` (the generation a reload replaces) for every zone that still
    /// has the same servers: a reload that changes nothing there does not lift the block. Returns
    /// the zones whose block was lifted (their servers changed or they are gone).
    pub fn inherit_loops(&self, old: &Upstreams) -> Vec<String> {
        let mut lifted = Vec::new();
        for (z, r) in &old.routes {
            if !r.looped.load(Ordering::Relaxed) {
                continue;
            }
            let servers: Vec<SocketAddr> = r.servers.iter().map(|&i| old.servers[i]).collect();
            match self.routes.get(z) {
                Some(n) if n.servers.iter().map(|&i| self.servers[i]).eq(servers) => {
                    n.looped.store(true, Ordering::Relaxed);
                }
                _ => lifted.push(zone_display(z)),
            }
        }
        lifted
    }

    /// The order this query tries the route's servers in.
    fn order(&self, route: &Route, now: Instant) -> Vec<usize> {
        let pick = match route.order {
            Policy::RoundRobin => route.next.fetch_add(1, Ordering::Relaxed),
            Policy::Random => rand::random::<u32>() as usize,
            Policy::Sequential | Policy::Fastest => 0,
        };
        let cands: Vec<Candidate> = route
            .servers
            .iter()
            .map(|&i| Candidate {
                server: i,
                down: self.health[i].is_down(),
                srtt: if route.order == Policy::Fastest {
                    self.health[i].srtt(now)
                } else {
                    Duration::ZERO
                },
            })
            .collect();
        exchange::order(route.order, &cands, pick)
    }

    /// Applies what an attempt said about its server: health, round-trip time, and a probe when
    /// this failure marked it down.
    fn feedback(&self, f: Feedback, now: Instant) {
        let (Some(h), Some(&addr)) = (self.health.get(f.server), self.servers.get(f.server)) else {
            return;
        };
        if f.healthy {
            if h.record_reply(f.rtt, now) {
                tracing::info!(upstream = %addr, "upstream answers again; marked up");
                self.observer.health(addr, true);
            }
        } else {
            if h.record_failure(self.opts.attempt_timeout, now) {
                tracing::warn!(upstream = %addr, "upstream marked down; probing it");
                self.observer.health(addr, false);
            }
            if h.is_down() {
                self.start_probe(f.server);
            }
        }
    }

    /// Starts the one probe of `servers()[i]` unless it has one: `. IN NS` every `health_check`
    /// until it answers, on the main runtime (a UDP worker's runtime stands still while the worker
    /// blocks in `recvmmsg`). The probe needs only the address and the health state, not this
    /// generation, so it survives a reload; it stops when no generation uses the server.
    fn start_probe(&self, i: usize) {
        let Some(h) = self.health.get(i) else {
            return;
        };
        if h.probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let rt = match self
            .rt
            .clone()
            .or_else(|| tokio::runtime::Handle::try_current().ok())
        {
            Some(rt) => rt,
            None => {
                h.probing.store(false, Ordering::Release);
                return;
            }
        };
        rt.spawn(probe_loop(
            h.clone(),
            self.observer.clone(),
            self.opts.attempt_timeout,
        ));
    }

    fn observe(&self, server: usize, t: Transport, r: Result<u8, &AttemptError>, since: Instant) {
        let res = match r {
            Ok(rcode) => AttemptResult::Reply(rcode),
            Err(e) => AttemptResult::Failed(*e),
        };
        self.observer
            .attempt(self.servers[server], t, res, since.elapsed());
    }

    async fn exchange(
        &self,
        server: usize,
        transport: Transport,
        query: &[u8],
        question: &[u8],
        until: Instant,
    ) -> Result<Vec<u8>, AttemptError> {
        let addr = self.servers[server];
        let fut = async {
            match transport {
                Transport::Udp => {
                    udp::exchange(addr, self.pools[server].expire, query, question).await
                }
                Transport::Tcp => self.pools[server].exchange(query, question).await,
            }
        };
        match tokio::time::timeout_at(until.into(), fut).await {
            Ok(r) => r,
            Err(_) => Err(AttemptError::Timeout),
        }
    }
}

/// A wire-format zone name as the configuration spells it (`cluster.local`, `.`).
fn zone_display(z: &[u8]) -> String {
    let s = wire::name_to_string(z);
    let s = s.trim_end_matches('.');
    if s.is_empty() { ".".into() } else { s.into() }
}

/// The zones that count: of a name given twice, the later (flags override the environment).
fn last_wins_zones(zones: &[Zone]) -> impl Iterator<Item = &Zone> {
    zones
        .iter()
        .enumerate()
        .filter(move |(i, z)| !zones[i + 1..].iter().any(|later| later.name == z.name))
        .map(|(_, z)| z)
}

/// The health probe of one server marked down: `. IN NS` every `health_check`, at most one in
/// flight (this loop is the server's only prober, see `ServerHealth::probing`), until it answers.
async fn probe_loop(h: Arc<ServerHealth>, observer: Arc<dyn Observer>, timeout: Duration) {
    loop {
        tokio::time::sleep(h.probe_every()).await;
        // Up again through real traffic (every server down: one is tried anyway), or forgotten by
        // every configuration: nothing to probe.
        if h.in_use() && h.is_down() {
            if probe_once(h.addr, h.probe_tcp(), timeout).await {
                if h.record_probe_ok() {
                    tracing::info!(upstream = %h.addr, "upstream answers its health probe; marked up");
                    observer.health(h.addr, true);
                }
            } else {
                observer.healthcheck_failure(h.addr);
                continue;
            }
        }
        h.probing.store(false, Ordering::Release);
        // A failure that came in while this probe was deciding to stop found `probing` set and
        // started none: take the job back rather than leave a down server unprobed.
        if !(h.in_use() && h.is_down())
            || h.probing
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return;
        }
    }
}

/// One `. IN NS` query to `addr` (the same question as CoreDNS's health check); any matching
/// reply, whatever its rcode, means the server is alive.
async fn probe_once(addr: SocketAddr, tcp: bool, timeout: Duration) -> bool {
    // Header: RD, one question; question: root, NS, IN.
    let question: &[u8] = &[0, 0, 2, 0, 1];
    let id: u16 = rand::random();
    let mut q = Vec::with_capacity(17);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    q.extend_from_slice(question);
    let fut = async {
        if tcp {
            tcp_oneshot(addr, &q, id, question).await
        } else {
            // The reused socket of this thread (the probes run on the main runtime), with the
            // default `expire`: the probe needs only the address, not a generation's zones.
            udp::exchange(addr, model::ForwardOptions::default().expire, &q, question).await
        }
    };
    matches!(tokio::time::timeout(timeout, fut).await, Ok(Ok(_)))
}

/// One query on its own TCP connection (a probe: the pool's connections are for real traffic and
/// belong to a generation).
async fn tcp_oneshot(
    addr: SocketAddr,
    query: &[u8],
    id: u16,
    question: &[u8],
) -> Result<Vec<u8>, AttemptError> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| io_to_attempt(&e))?;
    let mut frame = Vec::with_capacity(query.len() + 2);
    frame.extend_from_slice(&(query.len() as u16).to_be_bytes());
    frame.extend_from_slice(query);
    s.write_all(&frame).await.map_err(|e| io_to_attempt(&e))?;
    let mut len = [0u8; 2];
    s.read_exact(&mut len)
        .await
        .map_err(|e| io_to_attempt(&e))?;
    let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut msg)
        .await
        .map_err(|e| io_to_attempt(&e))?;
    if matches(&msg, id, question) {
        Ok(msg)
    } else {
        Err(AttemptError::Network)
    }
}

/// Whether `reply` answers the query with ID `id` and question `question` (case-insensitively, as
/// upstreams may normalise case).
fn matches(reply: &[u8], id: u16, question: &[u8]) -> bool {
    let qend = wire::HEADER_LEN + question.len();
    reply.len() >= qend
        && u16::from_be_bytes([reply[0], reply[1]]) == id
        && reply[2] & 0x80 != 0
        && reply[4..6] == [0, 1]
        && reply[wire::HEADER_LEN..qend].eq_ignore_ascii_case(question)
}

fn unspecified_for(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

fn io_to_attempt(e: &std::io::Error) -> AttemptError {
    match e.kind() {
        std::io::ErrorKind::ConnectionRefused => AttemptError::Refused,
        _ => AttemptError::Network,
    }
}

/// Picks a query ID not in use on a connection: `preferred` if free, else a random free one; `None`
/// when (nearly) every ID is taken, so the attempt fails instead of searching forever under the lock.
fn free_id<V>(pending: &HashMap<u16, V>, preferred: u16) -> Option<u16> {
    if !pending.contains_key(&preferred) {
        return Some(preferred);
    }
    if pending.len() >= MAX_PENDING_PER_CONN {
        return None;
    }
    // At most MAX_PENDING of 65,536 IDs are taken, so a random pick is free with odds ≥ 1/4;
    // bounded anyway, then a scan.
    for _ in 0..64 {
        let id: u16 = rand::random();
        if !pending.contains_key(&id) {
            return Some(id);
        }
    }
    (0..=u16::MAX).find(|id| !pending.contains_key(id))
}

/// Queries in flight on one upstream TCP connection at most (of 65,536 IDs).
const MAX_PENDING_PER_CONN: usize = 49_152;

type Pending = Arc<Mutex<HashMap<u16, oneshot::Sender<Vec<u8>>>>>;

/// A pipelined TCP connection to one server: a writer task takes framed queries from a queue, a
/// reader task hands replies to whoever waits for their ID.
struct TcpConn {
    tx: mpsc::Sender<Vec<u8>>,
    pending: Pending,
    closed: Arc<AtomicBool>,
    /// No new query after this (see [`TcpPool`]).
    end: Instant,
}

impl TcpConn {
    fn usable(&self, now: Instant) -> bool {
        // `tx` closed: the connection's tasks are gone (their runtime has ended).
        !self.closed.load(Ordering::Acquire) && !self.tx.is_closed() && now < self.end
    }
}

/// How one query on a pooled connection failed.
enum ConnError {
    /// The connection died before the reply (reset, closed, expired under the query): the query
    /// may be retried on another connection.
    Lost,
    Failed(AttemptError),
}

/// The TCP connections to one server: up to `size` pipelined connections, used in turn and each
/// closed once `expire` has passed since it was dialled (at once if idle, else when its last reply
/// is in), so behind a Service kube-proxy spreads them over the cluster DNS pods instead of pinning
/// a node to one pod forever. A connection that dies is re-dialled in its slot, and a query it lost
/// is retried once on a live one.
struct TcpPool {
    addr: SocketAddr,
    /// Where the connections' tasks (and their sockets' reactor) live; the caller's runtime if none.
    rt: Option<tokio::runtime::Handle>,
    expire: Duration,
    slots: Vec<tokio::sync::Mutex<Option<Arc<TcpConn>>>>,
    next: AtomicUsize,
}

impl TcpPool {
    fn new(
        addr: SocketAddr,
        rt: Option<tokio::runtime::Handle>,
        size: usize,
        expire: Duration,
    ) -> TcpPool {
        TcpPool {
            addr,
            rt,
            expire,
            slots: (0..size.max(1))
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next: AtomicUsize::new(0),
        }
    }

    /// A usable connection: the next slot's, dialled when it has none or its one is spent.
    async fn get(&self) -> Result<Arc<TcpConn>, AttemptError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut slot = self.slots[i].lock().await;
        if let Some(c) = slot.as_ref()
            && c.usable(Instant::now())
        {
            return Ok(c.clone());
        }
        let c = match &self.rt {
            Some(rt) => rt
                .spawn(TcpConn::dial(self.addr, self.expire))
                .await
                .map_err(|_| AttemptError::Network)??,
            None => TcpConn::dial(self.addr, self.expire).await?,
        };
        let c = Arc::new(c);
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Sends `query` and waits for the reply. The query's ID is rewritten if another query on the
    /// same connection already uses it. A connection lost under the query costs one retry on
    /// another, within the caller's timeout.
    async fn exchange(&self, query: &[u8], question: &[u8]) -> Result<Vec<u8>, AttemptError> {
        for _ in 0..2 {
            let conn = self.get().await?;
            match Self::exchange_on(&conn, query, question).await {
                Ok(r) => return Ok(r),
                Err(ConnError::Failed(e)) => return Err(e),
                Err(ConnError::Lost) => {}
            }
        }
        Err(AttemptError::Network)
    }

    async fn exchange_on(
        conn: &TcpConn,
        query: &[u8],
        question: &[u8],
    ) -> Result<Vec<u8>, ConnError> {
        let (tx, rx) = oneshot::channel();
        let mut frame = Vec::with_capacity(query.len() + 2);
        frame.extend_from_slice(&(query.len() as u16).to_be_bytes());
        frame.extend_from_slice(query);
        let id = {
            let mut pending = conn
                .pending
                .lock()
                .map_err(|_| ConnError::Failed(AttemptError::Network))?;
            let id = free_id(&pending, u16::from_be_bytes([query[0], query[1]]))
                .ok_or(ConnError::Failed(AttemptError::Network))?;
            pending.insert(id, tx);
            id
        };
        frame[2..4].copy_from_slice(&id.to_be_bytes());
        let guard = PendingGuard {
            pending: &conn.pending,
            id,
        };
        if conn.tx.send(frame).await.is_err() {
            return Err(ConnError::Lost);
        }
        // The sender is dropped when the reader ends: the connection died (or expired) first.
        let reply = rx.await.map_err(|_| ConnError::Lost)?;
        drop(guard);
        if !matches(&reply, id, question) {
            // On a connection only the server can answer: the wrong question is its failure.
            return Err(ConnError::Failed(AttemptError::Malformed));
        }
        // Give the caller back its own ID so it validates as usual.
        let mut reply = reply;
        reply[0..2].copy_from_slice(&query[0..2]);
        Ok(reply)
    }
}

/// Removes a waiter whose caller gave up (timeout), so late replies are dropped: the pending map
/// of a TCP connection or of a reused UDP socket (`udp`).
struct PendingGuard<'a, V> {
    pending: &'a Mutex<HashMap<u16, V>>,
    id: u16,
}

impl<V> Drop for PendingGuard<'_, V> {
    fn drop(&mut self) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(&self.id);
        }
    }
}

impl TcpConn {
    async fn dial(addr: SocketAddr, expire: Duration) -> Result<TcpConn, AttemptError> {
        let end = Instant::now() + expire;
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| io_to_attempt(&e))?;
        let _ = stream.set_nodelay(true);
        let (mut rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(TCP_QUEUE);
        let pending: Pending = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        // The reader's end closes the write side too, so the server sees the connection go (a
        // write half left open would keep it half-alive on both ends until the pool drops it).
        let reader_done = Arc::new(tokio::sync::Notify::new());

        let closed_w = closed.clone();
        let done_w = reader_done.clone();
        tokio::spawn(async move {
            loop {
                let frame = tokio::select! {
                    f = rx.recv() => f,
                    _ = done_w.notified() => None,
                };
                let Some(frame) = frame else { break };
                if wr.write_all(&frame).await.is_err() {
                    break;
                }
            }
            closed_w.store(true, Ordering::Release);
            let _ = wr.shutdown().await;
        });

        let closed_r = closed.clone();
        let pending_r = pending.clone();
        tokio::spawn(async move {
            let mut len = [0u8; 2];
            loop {
                let idle = pending_r.lock().map(|p| p.is_empty()).unwrap_or(true);
                let read = rd.read_exact(&mut len);
                let r = if idle {
                    // Idle and spent (`expire` since the dial): close; idle, wait for a reply at
                    // most until then. A waiter that registered just now loses its query and
                    // retries it on another connection; a half-read length is never resumed.
                    let now = Instant::now();
                    if now >= end {
                        break;
                    }
                    match tokio::time::timeout_at(end.into(), read).await {
                        Ok(r) => r,
                        Err(_) => break,
                    }
                } else {
                    read.await
                };
                if r.is_err() {
                    break;
                }
                let n = u16::from_be_bytes(len) as usize;
                let mut msg = vec![0u8; n];
                if rd.read_exact(&mut msg).await.is_err() || n < 2 {
                    break;
                }
                let id = u16::from_be_bytes([msg[0], msg[1]]);
                let waiter = pending_r.lock().ok().and_then(|mut p| p.remove(&id));
                if let Some(w) = waiter {
                    let _ = w.send(msg);
                }
            }
            closed_r.store(true, Ordering::Release);
            reader_done.notify_one();
            // Dropping the senders wakes every waiter with an error; they retry elsewhere.
            if let Ok(mut p) = pending_r.lock() {
                p.clear();
            }
        });
        Ok(TcpConn {
            tx,
            pending,
            closed,
            end,
        })
    }
}

#[cfg(test)]
mod tests;
mod udp;
#[cfg(test)]
use udp::{Datagram, UDP_REPLY_MAX, classify, truncated_reply};
