//! Forwarding misses: zones to servers, UDP and TCP transports, retries and deadlines.
//!
//! nodedns forwards the client's question under a fresh random ID from a fresh random source port
//! (a connected UDP socket, so the kernel drops datagrams from any other address) and accepts only a
//! reply whose ID and question match (anti-spoofing). A truncated UDP reply is retried over TCP.
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
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot};

use crate::config::model::{self, CachePolicy, Policy, Zone};
use crate::wire::{self, Kind, QueryView, Response, TtlPolicy};

/// How long an unused upstream TCP connection is kept.
const TCP_IDLE: Duration = Duration::from_secs(10);
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
}

/// Why a whole exchange failed; the client gets SERVFAIL.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum UpstreamError {
    #[error("no upstream configured for this name")]
    NoServers,
    #[error("no usable reply before the deadline (last: {0})")]
    Exhausted(AttemptError),
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
}

impl Default for Options {
    fn default() -> Self {
        Options {
            attempt_timeout: Duration::from_secs(2),
            deadline: Duration::from_secs(5),
        }
    }
}

/// A successful exchange.
#[derive(Debug)]
pub struct Reply {
    pub bytes: Vec<u8>,
    /// The ID the query was sent with.
    pub sent_id: u16,
    /// Index of the server in [`Upstreams::servers`].
    pub server: usize,
    /// How the zone that routed the query caches its answers.
    pub policy: TtlPolicy,
}

/// One zone's servers and policy.
struct Route {
    servers: Vec<usize>,
    next: AtomicUsize,
    transport: model::Transport,
    order: Policy,
    store: TtlPolicy,
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
        prefetch: c.prefetch.map(|p| (p.amount, p.percent)),
    }
}

impl Upstreams {
    /// Builds the routes of `zones`. A zone named twice: the later one wins (flags override the
    /// environment), and only the servers of the zones that remain are dialled, probed and counted.
    pub fn new(zones: &[Zone], opts: Options) -> Result<Upstreams, UpstreamConfigError> {
        let mut servers: Vec<SocketAddr> = Vec::new();
        let mut routes = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        let last_wins: Vec<&Zone> = zones
            .iter()
            .rev()
            .filter(|z| seen.insert(z.name.as_str()))
            .collect();
        for z in last_wins.into_iter().rev() {
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
                },
            );
        }
        // The TCP connections live on the runtime that builds this (the main one), not on whichever
        // UDP worker dials first: a worker's runtime stands still while the worker blocks in
        // `recvmmsg`, and a connection shared by all workers must keep reading meanwhile.
        let rt = tokio::runtime::Handle::try_current().ok();
        let pools = servers
            .iter()
            .map(|&s| TcpPool::new(s, rt.clone()))
            .collect();
        Ok(Upstreams {
            routes,
            servers,
            pools,
            opts,
            observer: Arc::new(NoObserver),
        })
    }

    /// Sets who is told about every attempt (metrics). Servers are indexed as in [`Self::servers`].
    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Upstreams {
        self.observer = observer;
        self
    }

    /// Asks every server for `. NS` over UDP and says whether any answered within `timeout`
    /// (the readiness check; what it answers does not matter).
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
            self.exchange(server, transport, &q, id, question, until)
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

    /// Forwards `view`'s question and returns the first usable reply, trying the zone's servers in
    /// turn until one answers or the deadline passes.
    pub async fn resolve(&self, view: &QueryView<'_>) -> Result<Reply, UpstreamError> {
        let (_, route) = self
            .route(view.key.name())
            .ok_or(UpstreamError::NoServers)?;
        let n = route.servers.len();
        if n == 0 {
            // An `except` name: not forwarded.
            return Err(UpstreamError::NoServers);
        }
        let start = Instant::now();
        let deadline = start + self.opts.deadline;
        let first = match route.order {
            Policy::RoundRobin => route.next.fetch_add(1, Ordering::Relaxed),
            Policy::Random => rand::random::<u32>() as usize,
            Policy::Sequential => 0,
        };
        let start_transport = match route.transport {
            model::Transport::Tcp => Transport::Tcp,
            model::Transport::Udp | model::Transport::PreferUdp => Transport::Udp,
        };
        let mut last_err = AttemptError::Timeout;
        // A SERVFAIL/REFUSED reply is kept while other servers are tried, and returned if none does
        // better.
        let mut fallback: Option<Reply> = None;
        let mut query = Vec::with_capacity(view.question.len() + 32);
        // Each server twice (at least three tries in all), within the deadline: enough to ride out a
        // lost datagram, and a bound when servers fail fast (connection refused).
        let max_attempts = (2 * n).max(3);
        for attempt in 0..max_attempts {
            let now = Instant::now();
            if now >= deadline || (attempt >= n && fallback.is_some()) {
                break;
            }
            let server = route.servers[(first + attempt) % n];
            let until = (now + self.opts.attempt_timeout).min(deadline);
            let id: u16 = rand::random();
            wire::build_upstream_query(view, id, &mut query);
            let mut transport = start_transport;
            let mut result = self
                .exchange(server, transport, &query, id, view.question, until)
                .await;
            if let Ok(bytes) = &result
                && transport == Transport::Udp
                && route.transport == model::Transport::PreferUdp
                && wire::is_truncated(bytes)
            {
                self.observe(server, transport, &result, now);
                // Truncated over UDP: ask the same server over TCP.
                transport = Transport::Tcp;
                result = self
                    .exchange(server, transport, &query, id, view.question, until)
                    .await;
            }
            self.observe(server, transport, &result, now);
            match result {
                Ok(bytes) => {
                    let rc = wire::header_rcode(&bytes);
                    let reply = Reply {
                        bytes,
                        sent_id: id,
                        server,
                        policy: route.store,
                    };
                    if (rc == wire::rcode::SERVFAIL || rc == wire::rcode::REFUSED)
                        && attempt + 1 < n
                    {
                        fallback.get_or_insert(reply);
                        continue;
                    }
                    return Ok(reply);
                }
                Err(e) => last_err = e,
            }
        }
        fallback.ok_or(UpstreamError::Exhausted(last_err))
    }

    fn observe(
        &self,
        server: usize,
        t: Transport,
        r: &Result<Vec<u8>, AttemptError>,
        since: Instant,
    ) {
        let res = match r {
            Ok(b) => AttemptResult::Reply(wire::header_rcode(b)),
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
        id: u16,
        question: &[u8],
        until: Instant,
    ) -> Result<Vec<u8>, AttemptError> {
        let addr = self.servers[server];
        let fut = async {
            match transport {
                Transport::Udp => udp_exchange(addr, query, id, question).await,
                Transport::Tcp => self.pools[server].exchange(query, question).await,
            }
        };
        match tokio::time::timeout_at(until.into(), fut).await {
            Ok(r) => r,
            Err(_) => Err(AttemptError::Timeout),
        }
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

/// One UDP exchange from a fresh socket on a random port, connected so only the server's datagrams
/// arrive; anything that does not match ID and question is ignored.
async fn udp_exchange(
    server: SocketAddr,
    query: &[u8],
    id: u16,
    question: &[u8],
) -> Result<Vec<u8>, AttemptError> {
    let sock = UdpSocket::bind(unspecified_for(server))
        .await
        .map_err(|e| io_to_attempt(&e))?;
    sock.connect(server).await.map_err(|e| io_to_attempt(&e))?;
    sock.send(query).await.map_err(|e| io_to_attempt(&e))?;
    // nodedns advertises 1232 bytes (RFC 9715's default), so 4 KiB holds any reply an upstream
    // should send; one byte more tells a longer datagram (cut by the kernel) from one that fits.
    // That one is treated as truncated (retried over TCP where the zone allows), not parsed. A
    // 64 KiB buffer per attempt was ~125 MiB of reservations at `--max-concurrent 2000`.
    let mut buf = Vec::with_capacity(UDP_REPLY_MAX + 1);
    loop {
        buf.clear();
        sock.recv_buf(&mut buf)
            .await
            .map_err(|e| io_to_attempt(&e))?;
        if matches(&buf, id, question) {
            if buf.len() > UDP_REPLY_MAX {
                return Ok(truncated_reply(&buf, question.len()));
            }
            return Ok(buf);
        }
        tracing::debug!(%server, "ignoring a UDP reply that does not match the query");
    }
}

/// The largest UDP reply read whole; see `udp_exchange`.
const UDP_REPLY_MAX: usize = 4096;

/// Header and question of `reply` with TC=1 and no records: what an over-long datagram becomes.
fn truncated_reply(reply: &[u8], question_len: usize) -> Vec<u8> {
    let end = (wire::HEADER_LEN + question_len).min(reply.len());
    let mut out = reply[..end].to_vec();
    if out.len() >= wire::HEADER_LEN {
        out[2] |= 0x02; // TC
        out[6..12].fill(0);
    }
    out
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
}

/// The (at most one live) TCP connection to a server, re-dialled when it dies.
struct TcpPool {
    addr: SocketAddr,
    /// Where the connection's tasks (and its socket's reactor) live; the caller's runtime if none.
    rt: Option<tokio::runtime::Handle>,
    conn: tokio::sync::Mutex<Option<Arc<TcpConn>>>,
}

impl TcpPool {
    fn new(addr: SocketAddr, rt: Option<tokio::runtime::Handle>) -> TcpPool {
        TcpPool {
            addr,
            rt,
            conn: tokio::sync::Mutex::new(None),
        }
    }

    async fn get(&self) -> Result<Arc<TcpConn>, AttemptError> {
        let mut slot = self.conn.lock().await;
        // `tx` closed: the connection's tasks are gone (their runtime has ended).
        if let Some(c) = slot.as_ref()
            && !c.closed.load(Ordering::Acquire)
            && !c.tx.is_closed()
        {
            return Ok(c.clone());
        }
        let c = match &self.rt {
            Some(rt) => rt
                .spawn(TcpConn::dial(self.addr))
                .await
                .map_err(|_| AttemptError::Network)??,
            None => TcpConn::dial(self.addr).await?,
        };
        let c = Arc::new(c);
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Sends `query` and waits for the reply. The query's ID is rewritten if another query on the
    /// same connection already uses it.
    async fn exchange(&self, query: &[u8], question: &[u8]) -> Result<Vec<u8>, AttemptError> {
        let conn = self.get().await?;
        let (tx, rx) = oneshot::channel();
        let mut frame = Vec::with_capacity(query.len() + 2);
        frame.extend_from_slice(&(query.len() as u16).to_be_bytes());
        frame.extend_from_slice(query);
        let id = {
            let mut pending = conn.pending.lock().map_err(|_| AttemptError::Network)?;
            let id = free_id(&pending, u16::from_be_bytes([query[0], query[1]]))
                .ok_or(AttemptError::Network)?;
            pending.insert(id, tx);
            id
        };
        frame[2..4].copy_from_slice(&id.to_be_bytes());
        let guard = PendingGuard {
            pending: &conn.pending,
            id,
        };
        if conn.tx.send(frame).await.is_err() {
            return Err(AttemptError::Network);
        }
        let reply = rx.await.map_err(|_| AttemptError::Network)?;
        drop(guard);
        if !matches(&reply, id, question) {
            return Err(AttemptError::Network);
        }
        // Give the caller back its own ID so it validates as usual.
        let mut reply = reply;
        reply[0..2].copy_from_slice(&query[0..2]);
        Ok(reply)
    }
}

/// Removes a waiter whose caller gave up (timeout), so late replies are dropped.
struct PendingGuard<'a> {
    pending: &'a Pending,
    id: u16,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(&self.id);
        }
    }
}

impl TcpConn {
    async fn dial(addr: SocketAddr) -> Result<TcpConn, AttemptError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| io_to_attempt(&e))?;
        let _ = stream.set_nodelay(true);
        let (mut rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(TCP_QUEUE);
        let pending: Pending = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));

        let closed_w = closed.clone();
        tokio::spawn(async move {
            while let Some(frame) = rx.recv().await {
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
                    // Idle for long enough: close. A waiter that registered just now gets an error
                    // and retries on a fresh connection; a half-read length is never resumed.
                    match tokio::time::timeout(TCP_IDLE, read).await {
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
            // Dropping the senders wakes every waiter with an error; they retry elsewhere.
            if let Ok(mut p) = pending_r.lock() {
                p.clear();
            }
        });
        Ok(TcpConn {
            tx,
            pending,
            closed,
        })
    }
}

#[cfg(test)]
mod tests;
