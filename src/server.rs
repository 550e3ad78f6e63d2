//! Listeners: UDP workers and TCP connections, and the miss path that joins them to upstream.
//!
//! UDP: one `SO_REUSEPORT` socket per worker per listen address, each served by a dedicated thread
//! that owns a single-threaded tokio runtime. The thread reads in batches (`recvmmsg`/`sendmmsg`, up
//! to 32 datagrams a call) and answers cache hits inside that loop, with no task and no allocation.
//! While it has no miss in flight it sleeps in a blocking `recvmmsg`, so a wake-up costs two system
//! calls and no runtime; misses become tasks on the same thread's runtime, which forward them and
//! send the reply from the same socket, and while any is in flight the loop reads through the
//! runtime's reactor instead (see `udp_worker`). Keeping a miss on the thread that received it
//! matters: handing it to another thread's runtime cost a cross-thread wake-up and context switches
//! per miss, which on one CPU made a miss ~40% dearer than in unbound (see `bench/README.md`). The
//! kernel dominates, so the loop batches and does nothing else.
//!
//! TCP: tokio, a semaphore bounding open connections, 2-byte framing, many pipelined queries per
//! connection answered as they complete (out of order is allowed, RFC 7766), idle connections closed.

use std::cell::Cell;
use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use thiserror::Error;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, mpsc, watch};

use crate::batch::{self, BATCH, Batch, peer_of};
use crate::cache::Key;
use crate::handler::{Answered, Handler, Outcome, Proto};
use crate::loopdetect::{Probes, Sighting};
use crate::upstream::Upstreams;
use crate::wire::{self, Response, rcode};

/// A UDP worker with a steady stream of hits yields to its misses at least every this many batches
/// (256 datagrams, well under a millisecond), so a miss's upstream reply is not held up for long.
const YIELD_EVERY: u32 = 8;

/// Listener options.
#[derive(Debug, Clone)]
pub struct Options {
    pub listen: Vec<SocketAddr>,
    /// UDP worker threads per listen address.
    pub workers: usize,
    pub max_tcp_connections: usize,
    pub tcp_idle_timeout: Duration,
    /// Queries forwarded at once; past it clients get REFUSED (CoreDNS's `max_concurrent`).
    pub max_concurrent: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            listen: vec![],
            workers: 1,
            max_tcp_connections: 1024,
            tcp_idle_timeout: Duration::from_secs(10),
            max_concurrent: 2000,
        }
    }
}

#[derive(Debug, Error)]
pub enum ServerError {
    #[error("cannot bind {proto} {addr}: {source}")]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("cannot start a UDP worker: {0}")]
    Worker(io::Error),
}

/// Told about every reply sent (metrics and the query log implement it).
pub trait Recorder: Send + Sync {
    /// A reply was sent for `query` (the client's packet, for the query log).
    fn answered(&self, worker: usize, proto: Proto, answered: &Answered, query: &[u8]);
    /// A query missed the cache and is forwarded.
    fn miss(&self, worker: usize);
    /// A forwarded query started (+1) or finished (-1).
    fn in_flight(&self, worker: usize, delta: i64);
    /// A forward was refused at the `max_concurrent` limit.
    fn rejected(&self, _worker: usize) {}
    /// `count` replies were sent, each `took` after its query was received.
    fn took(&self, _worker: usize, _took: Duration, _count: u64) {}
}

/// Records nothing.
pub struct NoRecorder;
impl Recorder for NoRecorder {
    fn answered(&self, _: usize, _: Proto, _: &Answered, _: &[u8]) {}
    fn miss(&self, _: usize) {}
    fn in_flight(&self, _: usize, _: i64) {}
}

type Flight = Option<Result<Arc<Response>, ()>>;

/// Everything a listener needs, shared by all of them.
pub struct Ctx {
    pub handler: Handler,
    /// The current forwarding generation (zones, servers, policies). A miss takes its own `Arc` for
    /// its whole life, so a reload swaps this without failing a query in flight; hits never read it.
    upstreams: RwLock<Arc<Upstreams>>,
    pub recorder: Arc<dyn Recorder>,
    /// One upstream query per key at a time; later askers wait for its result.
    flights: Mutex<HashMap<Key, watch::Receiver<Flight>>>,
    in_flight: AtomicUsize,
    /// Changed by a reload.
    max_concurrent: AtomicUsize,
    /// Background refreshes (prefetch, serve-stale), run by [`Ctx::start_refresher`] on the control
    /// runtime: never on a UDP worker, whose runtime stands still in its blocking phase.
    refresh_tx: mpsc::Sender<RefreshJob>,
    refresh_rx: Mutex<Option<mpsc::Receiver<RefreshJob>>>,
    /// Loop detection's probe names, looked up on the miss path only (see [`crate::loopdetect`]).
    pub probes: Probes,
}

/// A background refresh of one cache entry.
struct RefreshJob {
    /// The query of the client whose hit claimed it (its key is the entry's).
    packet: Vec<u8>,
    /// The slot hash the refresh claim is on ([`crate::cache::Cache::try_begin_refresh`]).
    slot: u64,
    /// Upstream just failed for this name (serve-stale `verify`): only hold the claim for the
    /// failure recheck period, so upstream is not asked again before it.
    hold_only: bool,
}

/// Refreshes queued at most; past it a refresh is dropped (best effort, the entry is still served).
const REFRESH_QUEUE: usize = 1024;
/// Refreshes in flight at once.
const REFRESH_CONCURRENCY: usize = 64;
/// After a failed refresh, upstream is not asked again for that name for this long (RFC 8767 §4's
/// failure recheck, 30 s).
const STALE_RECHECK: Duration = Duration::from_secs(30);

/// Whether an upstream reply counts as a failed refresh (it must not replace a servable answer).
fn is_failure(rcode: u8) -> bool {
    rcode == rcode::SERVFAIL || rcode == rcode::REFUSED
}

impl Ctx {
    pub fn new(
        handler: Handler,
        upstreams: Upstreams,
        recorder: Arc<dyn Recorder>,
        max_concurrent: usize,
    ) -> Ctx {
        let (refresh_tx, refresh_rx) = mpsc::channel(REFRESH_QUEUE);
        Ctx {
            handler,
            upstreams: RwLock::new(Arc::new(upstreams)),
            recorder,
            flights: Mutex::new(HashMap::new()),
            in_flight: AtomicUsize::new(0),
            refresh_tx,
            refresh_rx: Mutex::new(Some(refresh_rx)),
            max_concurrent: AtomicUsize::new(max_concurrent.max(1)),
            probes: Probes::default(),
        }
    }

    /// The current forwarding generation.
    pub fn upstreams(&self) -> Arc<Upstreams> {
        match self.upstreams.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Makes `new` the forwarding generation for every miss that starts from now on. Zones loop
    /// detection blocked stay blocked where their servers are unchanged; the zones whose block
    /// this lifted are returned.
    pub fn set_upstreams(&self, new: Upstreams) -> Vec<String> {
        let lifted = new.inherit_loops(&self.upstreams());
        let new = Arc::new(new);
        match self.upstreams.write() {
            Ok(mut g) => *g = new,
            Err(p) => *p.into_inner() = new,
        }
        lifted
    }

    /// Queues the background refresh a hit claimed (see [`Answered::refresh`]); a full queue drops it
    /// and releases the claim.
    pub fn queue_refresh(&self, packet: &[u8], slot: u64) {
        self.send_refresh(RefreshJob {
            packet: packet.to_vec(),
            slot,
            hold_only: false,
        });
    }

    fn send_refresh(&self, job: RefreshJob) {
        let slot = job.slot;
        if self.refresh_tx.try_send(job).is_err() {
            self.handler.cache.end_refresh(slot);
        }
    }

    /// Runs queued refreshes on the current runtime (the control runtime) until the process ends.
    pub fn start_refresher(self: &Arc<Self>) {
        let Some(mut rx) = self.refresh_rx.lock().ok().and_then(|mut r| r.take()) else {
            return;
        };
        // Weak: the task must not keep the context (and so its own channel) alive.
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let limit = Arc::new(Semaphore::new(REFRESH_CONCURRENCY));
            while let Some(job) = rx.recv().await {
                let Some(ctx) = weak.upgrade() else { return };
                let Ok(permit) = limit.clone().acquire_owned().await else {
                    return;
                };
                tokio::spawn(async move {
                    ctx.refresh(job).await;
                    drop(permit);
                });
            }
        });
    }

    /// One background refresh: the same flight as a client miss (a client asking meanwhile joins
    /// it), stored as usual. A failure keeps the claim for [`STALE_RECHECK`], so the stale entry is
    /// served without asking upstream again until then.
    async fn refresh(&self, job: RefreshJob) {
        let ok = !job.hold_only && {
            let admitted = self.in_flight.fetch_add(1, Ordering::AcqRel)
                < self.max_concurrent.load(Ordering::Relaxed);
            let ok = admitted
                && match wire::scan_query(&job.packet) {
                    Ok(view) => matches!(self.fetch(&view).await, Ok(r) if !is_failure(r.rcode)),
                    Err(_) => false,
                };
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            ok
        };
        if !ok {
            tokio::time::sleep(STALE_RECHECK).await;
        }
        self.handler.cache.end_refresh(job.slot);
    }

    /// A reload's new `--max-concurrent`.
    pub fn set_max_concurrent(&self, n: usize) {
        self.max_concurrent.store(n.max(1), Ordering::Relaxed);
    }

    /// Reserves a slot for a forwarded query, or says the limit is reached. The slot is given
    /// back when the returned guard drops (also when a drain cancels the task).
    fn begin_forward(self: &Arc<Self>, worker: usize) -> Option<ForwardSlot> {
        self.recorder.miss(worker);
        if self.in_flight.fetch_add(1, Ordering::AcqRel)
            >= self.max_concurrent.load(Ordering::Relaxed)
        {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.recorder.rejected(worker);
            return None;
        }
        self.recorder.in_flight(worker, 1);
        Some(ForwardSlot {
            ctx: self.clone(),
            worker,
        })
    }

    /// Answers a miss: one upstream exchange per key however many clients ask at once, then the reply
    /// rendered for this client. The caller has reserved a slot with `begin_forward`.
    ///
    /// With `stale_fallback` (serve-stale `verify`), upstream gets [`wire::STALE_VERIFY_TIMEOUT`];
    /// if it fails, times out or says SERVFAIL/REFUSED, the stale entry is the answer, and upstream
    /// is not asked again for it during the failure recheck period.
    pub async fn resolve_miss(
        &self,
        packet: &[u8],
        proto: Proto,
        stale_fallback: bool,
        out: &mut Vec<u8>,
    ) -> Option<Answered> {
        let view = wire::scan_query(packet).ok()?;
        // Loop detection: a copy of a probe coming back (never cached, so never a hit).
        if self.probes.any() {
            match self.probes.sighting(view.key.name(), view.key.qtype) {
                Sighting::NotProbe => {}
                Sighting::Forward => return Some(self.forward_probe(&view, proto, out).await),
                Sighting::Loop(zone) => {
                    self.upstreams().block_loop(&zone);
                    return Some(self.handler.fail(&view, rcode::SERVFAIL, out));
                }
            }
        }
        // The zone's own `max_concurrent` (issue 12): past it REFUSED, before any upstream sees it.
        // Past it with a stale entry to fall back on (verify mode), the stale entry is the answer.
        let zone_slot = self.upstreams().admit(&view);
        let result = if zone_slot.is_none() {
            if !stale_fallback {
                return Some(self.handler.fail(&view, rcode::REFUSED, out));
            }
            Err(())
        } else if stale_fallback {
            tokio::time::timeout(wire::STALE_VERIFY_TIMEOUT, self.fetch(&view))
                .await
                .unwrap_or(Err(()))
        } else {
            self.fetch(&view).await
        };
        let now = Instant::now();
        let answered = Some(match result {
            Ok(resp) if !(stale_fallback && is_failure(resp.rcode)) => {
                self.handler.complete(&view, &resp, proto, now, out)
            }
            _ if stale_fallback => match self.handler.answer_stale(&view, proto, now, out) {
                Some(mut a) => {
                    if let Some(slot) = a.refresh.take() {
                        self.send_refresh(RefreshJob {
                            packet: Vec::new(),
                            slot,
                            hold_only: true,
                        });
                    }
                    a
                }
                None => self.handler.fail(&view, rcode::SERVFAIL, out),
            },
            _ => self.handler.fail(&view, rcode::SERVFAIL, out),
        });
        drop(zone_slot);
        answered
    }

    /// Forwards a copy of a loop probe as it came, neither coalesced with the other copies (which
    /// would stall the loop instead of showing it) nor cached.
    async fn forward_probe(
        &self,
        view: &wire::QueryView<'_>,
        proto: Proto,
        out: &mut Vec<u8>,
    ) -> Answered {
        let reply = self
            .upstreams()
            .resolve(view, |bytes, sent_id, policy| {
                Response::from_upstream(bytes, sent_id, view, policy, Instant::now())
            })
            .await;
        match reply {
            Ok(r) => self
                .handler
                .complete(view, &r.value, proto, Instant::now(), out),
            Err(_) => self.handler.fail(view, rcode::SERVFAIL, out),
        }
    }

    async fn fetch(&self, view: &wire::QueryView<'_>) -> Result<Arc<Response>, ()> {
        let key = Key::from_buf(&view.key);
        let leader = {
            let mut flights = self.flights.lock().map_err(|_| ())?;
            match flights.get(&key) {
                Some(rx) => Err(rx.clone()),
                None => {
                    let (tx, rx) = watch::channel(None);
                    flights.insert(key.clone(), rx);
                    Ok(tx)
                }
            }
        };
        match leader {
            Err(mut rx) => {
                let r = rx.wait_for(|f| f.is_some()).await.map_err(|_| ())?;
                r.clone().unwrap_or(Err(()))
            }
            Ok(tx) => {
                let _done = FlightGuard { ctx: self, key };
                let result = self.forward(view).await;
                tx.send_replace(Some(result.clone()));
                result
            }
        }
    }

    async fn forward(&self, view: &wire::QueryView<'_>) -> Result<Arc<Response>, ()> {
        let upstreams = self.upstreams();
        // Parsed as it arrives, so a malformed reply fails its attempt and the next server is
        // asked (see `upstream::AttemptError::Malformed`); cached once chosen.
        let reply = upstreams
            .resolve(view, |bytes, sent_id, policy| {
                Response::from_upstream(bytes, sent_id, view, policy, Instant::now())
            })
            .await;
        match reply {
            Ok(r) => Ok(self.handler.insert(view, r.value, Instant::now())),
            Err(e) => {
                tracing::debug!(name = ?view.key, error = %e, "upstream failed");
                Err(())
            }
        }
    }
}

/// Ends a flight even if its task is cancelled, so later askers start a new one.
struct FlightGuard<'a> {
    ctx: &'a Ctx,
    key: Key,
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut f) = self.ctx.flights.lock() {
            f.remove(&self.key);
        }
    }
}

/// Running listeners. Dropping it does not stop them: call [`Listeners::shutdown`].
pub struct Listeners {
    /// The UDP and TCP addresses actually bound (a port 0 resolved).
    pub bound: Vec<SocketAddr>,
    udp_threads: Vec<JoinHandle<()>>,
    /// The workers' sockets, whose read side `shutdown` closes to wake a blocked receive.
    udp_socks: Vec<Arc<StdUdpSocket>>,
    tcp_stop: watch::Sender<bool>,
    tcp_tasks: Vec<tokio::task::JoinHandle<()>>,
    /// One permit per open client TCP connection: `shutdown` takes them all back to know every
    /// connection has finished.
    tcp_limit: Arc<Semaphore>,
    tcp_permits: u32,
    /// When the UDP workers stop reading their queues (set by `shutdown` before it says stop).
    drain_until: Arc<OnceLock<Instant>>,
}

impl Listeners {
    /// Binds every listen address (TCP first, so a port 0 picks one port for both) and starts
    /// serving. Must be called inside a tokio runtime. Nothing is served if any bind fails.
    pub fn start(ctx: Arc<Ctx>, opts: &Options) -> Result<Listeners, ServerError> {
        let rt = tokio::runtime::Handle::current();
        let mut tcp = Vec::new();
        let mut udp = Vec::new();
        let mut bound = Vec::new();
        for &addr in &opts.listen {
            let listener = bind_tcp(addr).map_err(|source| ServerError::Bind {
                proto: "tcp",
                addr,
                source,
            })?;
            let local = listener.local_addr().map_err(|source| ServerError::Bind {
                proto: "tcp",
                addr,
                source,
            })?;
            for _ in 0..opts.workers.max(1) {
                let s = bind_udp(local).map_err(|source| ServerError::Bind {
                    proto: "udp",
                    addr: local,
                    source,
                })?;
                udp.push(Arc::new(s));
            }
            tcp.push(listener);
            bound.push(local);
        }
        let (tcp_stop, stop_rx) = watch::channel(false);
        let drain_until: Arc<OnceLock<Instant>> = Arc::default();
        // Every runtime first, so a failure leaves no thread behind.
        let runtimes = udp
            .iter()
            .map(|_| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(ServerError::Worker)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let udp_socks = udp.clone();
        let mut udp_threads = Vec::new();
        for (i, (sock, wrt)) in udp.into_iter().zip(runtimes).enumerate() {
            let (ctx, stop, until) = (ctx.clone(), stop_rx.clone(), drain_until.clone());
            let worker = i % opts.workers.max(1);
            let t = std::thread::Builder::new()
                .name(format!("udp-{i}"))
                .spawn(move || udp_worker(sock, ctx, stop, until, worker, wrt))
                .map_err(ServerError::Worker)?;
            udp_threads.push(t);
        }
        let tcp_permits = u32::try_from(opts.max_tcp_connections.max(1)).unwrap_or(u32::MAX >> 4);
        let limit = Arc::new(Semaphore::new(tcp_permits as usize));
        let slots = Arc::new(TcpSlots::new(limit.clone()));
        // Registered with the runtime here, so a failure is a start error, not a log line in a task
        // while `/ready` says the listeners are bound.
        let tcp = {
            let _in_rt = rt.enter();
            tcp.into_iter()
                .zip(&bound)
                .map(|(l, &addr)| {
                    TcpListener::from_std(l).map_err(|source| ServerError::Bind {
                        proto: "tcp",
                        addr,
                        source,
                    })
                })
                .collect::<Result<Vec<_>, _>>()?
        };
        // TCP counts into its own metrics shard, after the UDP workers' (no line shared with a
        // worker's hit path).
        let tcp_shard = opts.workers.max(1);
        let tcp_tasks = tcp
            .into_iter()
            .map(|l| {
                let (ctx, slots, stop_rx) = (ctx.clone(), slots.clone(), stop_rx.clone());
                let idle = opts.tcp_idle_timeout;
                rt.spawn(accept_loop(l, ctx, slots, stop_rx, idle, tcp_shard))
            })
            .collect();
        Ok(Listeners {
            bound,
            udp_threads,
            udp_socks,
            tcp_stop,
            tcp_tasks,
            tcp_limit: limit,
            tcp_permits,
            drain_until,
        })
    }

    /// Stops serving without losing what was already received, then closes every socket:
    ///
    /// - TCP: the listeners close (connections still in their accept queues are reset, or with
    ///   `net.ipv4.tcp_migrate_req=1` move to a peer's listener); each connection answers the
    ///   frames already in its buffer, reads nothing more, finishes its queries in flight and closes.
    /// - UDP: each worker answers what is queued on its socket (reading with `MSG_DONTWAIT` until
    ///   `EAGAIN`), lets its misses finish, looks again, and closes once a look finds the queue
    ///   empty with no miss in flight, or when `drain` has passed (then it reads no more and only
    ///   lets the misses finish).
    ///
    /// Returns after every socket is closed: each miss is bounded by the upstream deadline, so
    /// within `drain` plus that deadline.
    pub async fn shutdown(self, drain: Duration) {
        let _ = self.drain_until.set(Instant::now() + drain);
        let _ = self.tcp_stop.send(true);
        for s in &self.udp_socks {
            // Out of the reuseport group first: a connected UDP socket is skipped when the kernel
            // picks a group member for a datagram, and matches only its peer (itself, which
            // never sends here). From now on a peer's sockets get every new query (or, with no
            // peer, a closed port answers at once, and the socket match no longer sees a
            // listener, so a ClusterIP falls through to kube-proxy's DNAT); what is already
            // queued stays readable and is drained. Without this, whatever the kernel hashed
            // here between the drain's last look and the close was lost. Not for a wildcard
            // address: connecting would fix the source address of its replies.
            if let Ok(local) = s.local_addr()
                && !local.ip().is_unspecified()
                && let Err(e) = s.connect(local)
            {
                tracing::debug!(%local, error = %e, "udp drain: cannot leave the reuseport group");
            }
            // Wakes a worker blocked in `recvmmsg` (it returns at once from now on), which then sees
            // the stop. Datagrams already queued stay readable, which the drain relies on. On an
            // unconnected UDP socket Linux reports ENOTCONN but does shut the read side, so the
            // result is ignored.
            let _ = SockRef::from(&**s).shutdown(std::net::Shutdown::Read);
        }
        // The workers close their sockets themselves, the moment their drain ends: no reference
        // may stay here (a socket held open keeps receiving its share of a peer's traffic, lost
        // at close).
        drop(self.udp_socks);
        for t in self.tcp_tasks {
            let _ = t.await;
        }
        // Every connection holds a permit until it has closed; bounded, so a client that never
        // reads its answers cannot hold the exit.
        let _ = tokio::time::timeout(
            drain + Duration::from_secs(1),
            self.tcp_limit.acquire_many(self.tcp_permits),
        )
        .await;
        let threads = self.udp_threads;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

fn new_socket(addr: SocketAddr, ty: Type, proto: Protocol) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    // SO_REUSEPORT: one socket per worker, and a second nodedns (a surge pod during an upgrade)
    // can bind beside this one.
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    Ok(s)
}

fn bind_tcp(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = new_socket(addr, Type::STREAM, Protocol::TCP)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

fn bind_udp(addr: SocketAddr) -> io::Result<StdUdpSocket> {
    let s = new_socket(addr, Type::DGRAM, Protocol::UDP)?;
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    // Blocking, for the worker's blocking phase; its async phase and every send pass
    // `MSG_DONTWAIT` instead (a send that would block drops the reply, as a full socket buffer
    // would drop it anyway). The timeout is only a backstop for noticing a stop: shutdown wakes a
    // blocked receive at once (see `Listeners::shutdown`).
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Whether `stop` says stop: its value, not whether it changed (a `changed()` await marks the change
/// seen, and a loop that then asked `has_changed` would never stop: SIGTERM with misses in flight left
/// a worker spinning on its shut socket). A dropped sender counts as a stop.
fn stopping(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

/// What a UDP worker's miss tasks share with its loop (one thread, so no atomics).
#[derive(Default)]
struct Local {
    /// Miss tasks started by this worker and not yet finished.
    misses: Cell<usize>,
    /// Told when `misses` drops to 0, so the async phase can hand back to the blocking one.
    idle: Notify,
}

/// A UDP worker thread. It alternates between two phases:
///
/// - Blocking (no miss of its own in flight, the usual state of a warm cache): the thread sleeps in
///   `recvmmsg(MSG_WAITFORONE)` on a blocking socket, answers the batch and sends it with one
///   `sendmmsg`. Two system calls per wake-up and no runtime in between; at a fixed moderate rate,
///   where each wake-up brings one or two queries, the epoll wait a reactor needs first was a third
///   of the calls. The runtime is not driven meanwhile, which is why nothing else lives on it (the
///   upstream TCP connections run on the main runtime, see `upstream::TcpPool`).
/// - Async (misses in flight): the same loop as a future on the thread's own runtime, reading
///   through the reactor (`AsyncFd`) with `MSG_DONTWAIT`, so the misses' upstream sockets and timers
///   progress; it hands back as soon as the last miss has finished.
///
/// `stop` ends it: `Listeners::shutdown` also shuts the socket's read side, which wakes a blocked
/// `recvmmsg`. It then drains (see [`Worker::drain`]) until `drain_until`, lets the misses still in
/// flight finish (each is bounded by the upstream deadline) and closes the socket.
fn udp_worker(
    sock: Arc<StdUdpSocket>,
    ctx: Arc<Ctx>,
    mut stop: watch::Receiver<bool>,
    drain_until: Arc<OnceLock<Instant>>,
    worker: usize,
    rt: tokio::runtime::Runtime,
) {
    let afd = {
        let _in_rt = rt.enter();
        match batch::register_readable(sock) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "udp worker: cannot register the socket");
                return;
            }
        }
    };
    let w = Worker {
        afd,
        ctx,
        worker,
        tasks: tokio::task::LocalSet::new(),
        local: Rc::default(),
    };
    let mut b = Batch::new();
    while !stopping(&stop) {
        if w.local.misses.get() > 0 {
            w.tasks.block_on(&rt, w.serve_async(&mut b, &mut stop));
            continue;
        }
        let n = match b.recv(w.fd(), libc::MSG_WAITFORONE) {
            Ok(n) => n,
            // EAGAIN: the receive timeout, a backstop for noticing `stop`.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(e) => {
                // Unexpected (ENOMEM, say): back off briefly rather than spin and flood the log.
                tracing::warn!(error = %e, "udp receive");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        w.serve_batch(&mut b, n);
    }
    // `shutdown` sets the deadline before it says stop; a dropped sender has none: no drain.
    // Reading ends halfway to it, so that a miss read last still has half the budget to finish.
    let until = drain_until.get().copied().unwrap_or_else(Instant::now);
    let read_until = Instant::now() + until.saturating_duration_since(Instant::now()) / 2;
    w.drain(&rt, &mut b, read_until);
    // Let the misses in flight finish: those read before the stop are within their own deadline
    // by `until`; one read in the drain that is not done by then (its upstream took more than
    // half the budget) is cancelled, so the exit stays within the budget. Then the last
    // reference to the socket goes and it closes.
    let Worker { afd, tasks, .. } = w;
    let grace_end = until.max(Instant::now() + Duration::from_millis(100));
    rt.block_on(async move {
        let _ = tokio::time::timeout_at(grace_end.into(), tasks).await;
    });
    drop(afd);
}

/// One UDP worker's parts, shared by its two phases.
struct Worker {
    /// The worker's socket, registered with its runtime's reactor (for the async phase).
    afd: AsyncFd<Arc<StdUdpSocket>>,
    ctx: Arc<Ctx>,
    /// Index for per-worker metrics.
    worker: usize,
    /// The miss tasks, run only while the thread drives its runtime.
    tasks: tokio::task::LocalSet,
    local: Rc<Local>,
}

impl Worker {
    fn fd(&self) -> i32 {
        self.afd.get_ref().as_raw_fd()
    }

    /// The stop of [`udp_worker`]: answers everything queued on the socket, lets the misses that
    /// started finish (they send their replies from this socket), and looks again, until a look
    /// finds the queue empty with no miss in flight, or `until` passes. Between the last empty
    /// look and the close that follows only a few system calls pass, so what a peer's reuseport
    /// group still hashes here meanwhile is all that can be lost.
    fn drain(&self, rt: &tokio::runtime::Runtime, b: &mut Batch, until: Instant) {
        loop {
            // Bounded: by `until`, and each batch reads at most BATCH datagrams.
            while Instant::now() < until {
                match b.recv(self.fd(), libc::MSG_DONTWAIT) {
                    Ok(n) => {
                        self.serve_batch(b, n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // EAGAIN: the queue is empty (a shut read side still says EAGAIN here).
                    Err(_) => break,
                }
            }
            if self.local.misses.get() == 0 || Instant::now() >= until {
                return;
            }
            let local = self.local.clone();
            self.tasks.block_on(rt, async {
                let _ = tokio::time::timeout_at(until.into(), async {
                    while local.misses.get() > 0 {
                        local.idle.notified().await;
                    }
                })
                .await;
            });
        }
    }

    /// The async phase of [`udp_worker`]: receive a batch through the reactor, answer hits in
    /// place, start a local task per miss, send the batch. Returns when this worker has no miss in
    /// flight, or on `stop`.
    async fn serve_async(&self, b: &mut Batch, stop: &mut watch::Receiver<bool>) {
        // Let the misses just started send their upstream queries first.
        tokio::task::yield_now().await;
        let mut since_yield = 0;
        loop {
            if self.local.misses.get() == 0 || stopping(stop) {
                return;
            }
            // Ready already (the usual case under load): no need to also watch `stop`, whose
            // waiter would be registered and removed again on every batch.
            let ready = match self.afd.readable().now_or_never() {
                Some(r) => r,
                None => tokio::select! {
                    biased;
                    _ = stop.changed() => return,
                    _ = self.local.idle.notified() => continue,
                    g = self.afd.readable() => g,
                },
            };
            let mut guard = match ready {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!(error = %e, "udp worker: reactor");
                    return;
                }
            };
            // `try_io` clears the readiness only when this very call finds the socket empty, so a
            // datagram that arrived meanwhile is never left unnoticed.
            let n = match guard.try_io(|_| b.recv(self.fd(), libc::MSG_DONTWAIT)) {
                Err(_would_block) => continue,
                Ok(Ok(n)) => n,
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "udp receive");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            if n < BATCH {
                // Fewer than asked: the queue ran dry during this call (an error would be pending
                // and raise a new event), so skip the `recvmmsg` that would only say `EAGAIN`.
                // Safe on this thread's own runtime: the reactor has not run since `readable()`,
                // so every datagram that arrived after this call raises an epoll event not yet
                // collected, and `clear_ready` only clears the readiness it was given.
                guard.clear_ready();
            } else {
                drop(guard);
            }
            let spawned = self.serve_batch(b, n);
            since_yield += 1;
            if spawned || since_yield >= YIELD_EVERY {
                // Let the new misses send their upstream queries, and the reactor deliver upstream
                // replies, before the next batch: under a steady stream the socket never runs dry.
                since_yield = 0;
                tokio::task::yield_now().await;
            }
        }
    }

    /// Answers the `n` datagrams in `b`: hits (and local errors) are rendered into the batch's
    /// replies and sent with one `sendmmsg`; each miss becomes a task on `tasks`, which sends its
    /// own reply. Says whether any miss was started.
    fn serve_batch(&self, b: &mut Batch, n: usize) -> bool {
        let (ctx, worker) = (&self.ctx, self.worker);
        let now = Instant::now();
        let mut replies = 0;
        let mut spawned = false;
        for i in 0..n {
            let packet = &b.bufs[i][..b.lens[i]];
            let out = &mut b.replies[replies];
            match ctx.handler.answer(packet, Proto::Udp, now, out) {
                Outcome::Reply(a) => {
                    ctx.recorder.answered(worker, Proto::Udp, &a, packet);
                    if let Some(slot) = a.refresh {
                        ctx.queue_refresh(packet, slot);
                    }
                    b.reply_to[replies] = i;
                    replies += 1;
                }
                Outcome::Drop => {}
                Outcome::Forward { stale_fallback } => {
                    let Some(peer) = peer_of(&b.addrs[i]) else {
                        continue;
                    };
                    let Some(slot) = ctx.begin_forward(worker) else {
                        if let Ok(v) = wire::scan_query(packet) {
                            let a = ctx.handler.fail(&v, rcode::REFUSED, out);
                            ctx.recorder.answered(worker, Proto::Udp, &a, packet);
                            b.reply_to[replies] = i;
                            replies += 1;
                        }
                        continue;
                    };
                    let packet = packet.to_vec();
                    let (ctx, sock, local) =
                        (ctx.clone(), self.afd.get_ref().clone(), self.local.clone());
                    spawned = true;
                    local.misses.set(local.misses.get() + 1);
                    self.tasks.spawn_local(async move {
                        let _done = MissGuard(&local);
                        let mut out = Vec::with_capacity(512);
                        if let Some(a) = ctx
                            .resolve_miss(&packet, Proto::Udp, stale_fallback, &mut out)
                            .await
                        {
                            ctx.recorder.answered(worker, Proto::Udp, &a, &packet);
                            // Counted out before the client can see the reply, so a scrape
                            // that follows an answer never sees it still in flight.
                            drop(slot);
                            ctx.recorder.took(worker, now.elapsed(), 1);
                            // The socket blocks (for the blocking phase): never wait on a full
                            // buffer.
                            let to = socket2::SockAddr::from(peer);
                            if let Err(e) = SockRef::from(&*sock).send_to_with_flags(
                                &out,
                                &to,
                                libc::MSG_DONTWAIT,
                            ) {
                                tracing::debug!(%peer, error = %e, "udp send");
                            }
                        }
                    });
                }
            }
        }
        if replies > 0 {
            // One clock read per batch (its start is the `now` the cache used): under load a
            // batch holds many replies, so the latency histogram costs a fraction of a read each.
            // Recorded before the send, so a client that has its reply is already counted.
            ctx.recorder.took(worker, now.elapsed(), replies as u64);
            b.send(self.fd(), replies);
        }
        spawned
    }
}

/// Counts a miss task finished however it ends (cancelled too), and wakes the async phase when it
/// was the last.
/// A forwarded query's slot under `--max-concurrent` (see [`Ctx::begin_forward`]).
struct ForwardSlot {
    ctx: Arc<Ctx>,
    worker: usize,
}

impl Drop for ForwardSlot {
    fn drop(&mut self) {
        self.ctx.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.ctx.recorder.in_flight(self.worker, -1);
    }
}

struct MissGuard<'a>(&'a Local);

impl Drop for MissGuard<'_> {
    fn drop(&mut self) {
        let left = self.0.misses.get().saturating_sub(1);
        self.0.misses.set(left);
        if left == 0 {
            self.0.idle.notify_one();
        }
    }
}

/// The client TCP connection slots (`--max-tcp-connections`), and which connections are idle.
///
/// When every slot is taken, the connection idle the longest (waiting for a query, or partway
/// through one: a slow-loris client is idle from the moment it started its frame) is closed to make
/// room, as unbound does when its table fills, so idle or trickling connections can never lock
/// TCP clients (and TC fallbacks) out until their idle timeout. Connections with a query in flight
/// are never evicted. A new connection waits at most [`SLOT_WAIT`] for the freed slot.
struct TcpSlots {
    limit: Arc<Semaphore>,
    /// Connection id → (idle since, its close signal), for connections waiting for a query.
    idle: Mutex<HashMap<u64, (Instant, Arc<Notify>)>>,
    next_id: AtomicUsize,
    /// New connections waiting for an evicted slot, at most this many at once.
    waiting: Arc<Semaphore>,
}

/// How long a new connection waits for the slot an eviction frees.
const SLOT_WAIT: Duration = Duration::from_secs(1);

impl TcpSlots {
    fn new(limit: Arc<Semaphore>) -> TcpSlots {
        TcpSlots {
            limit,
            idle: Mutex::new(HashMap::new()),
            next_id: AtomicUsize::new(0),
            waiting: Arc::new(Semaphore::new(64)),
        }
    }

    fn register(&self) -> (u64, Arc<Notify>) {
        (
            self.next_id.fetch_add(1, Ordering::Relaxed) as u64,
            Arc::new(Notify::new()),
        )
    }

    fn set_idle(&self, id: u64, close: &Arc<Notify>, idle: bool) {
        if let Ok(mut m) = self.idle.lock() {
            if idle {
                m.entry(id)
                    .or_insert_with(|| (Instant::now(), close.clone()));
            } else {
                m.remove(&id);
            }
        }
    }

    /// Asks the longest-idle connection to close; says whether there was one.
    fn evict_oldest_idle(&self) -> bool {
        let Ok(mut m) = self.idle.lock() else {
            return false;
        };
        let oldest = m
            .iter()
            .min_by_key(|(_, (since, _))| *since)
            .map(|(&id, _)| id);
        match oldest.and_then(|id| m.remove(&id)) {
            Some((_, close)) => {
                close.notify_one();
                true
            }
            None => false,
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<Ctx>,
    slots: Arc<TcpSlots>,
    mut stop: watch::Receiver<bool>,
    idle: Duration,
    shard: usize,
) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let permit = slots.limit.clone().try_acquire_owned().ok();
                    let (ctx, stop, slots) = (ctx.clone(), stop.clone(), slots.clone());
                    match permit {
                        Some(permit) => {
                            tokio::spawn(async move {
                                tcp_conn(stream, ctx, idle, stop, shard, &slots).await;
                                drop(permit);
                            });
                        }
                        None => {
                            // Full: make room by closing the longest-idle connection; with none
                            // idle (all busy) or too many already waiting, close this one at once.
                            let Ok(wait) = slots.waiting.clone().try_acquire_owned() else {
                                continue;
                            };
                            if !slots.evict_oldest_idle() {
                                tracing::debug!(%peer, "too many busy TCP connections; closing");
                                continue;
                            }
                            tokio::spawn(async move {
                                let got = tokio::time::timeout(
                                    SLOT_WAIT,
                                    slots.limit.clone().acquire_owned(),
                                )
                                .await;
                                drop(wait);
                                if let Ok(Ok(permit)) = got {
                                    tcp_conn(stream, ctx, idle, stop, shard, &slots).await;
                                    drop(permit);
                                }
                            });
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "tcp accept");
                    // e.g. EMFILE: back off briefly instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => return,
        }
    }
}

/// Queries in progress on one TCP connection; reading pauses past it.
const TCP_PIPELINE: usize = 64;

async fn tcp_conn(
    stream: TcpStream,
    ctx: Arc<Ctx>,
    idle: Duration,
    mut stop: watch::Receiver<bool>,
    shard: usize,
    slots: &TcpSlots,
) {
    let (id, close) = slots.register();
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(TCP_PIPELINE);
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if wr.write_all(&frame).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let pipeline = Arc::new(Semaphore::new(TCP_PIPELINE));
    let mut len = [0u8; 2];
    // After a stop only frames already in the socket's buffer are read (never waiting for more):
    // they are queries the client sent before the stop, and are answered before the close.
    let mut draining = stopping(&stop);
    loop {
        let msg = if draining {
            match read_frame_now(&mut rd, &mut len) {
                Some(m) => m,
                None => break,
            }
        } else {
            // Idle (evictable) from here until a whole frame is read, unless queries are in flight.
            let busy = pipeline.available_permits() < TCP_PIPELINE;
            slots.set_idle(id, &close, !busy);
            let read = tokio::select! {
                r = tokio::time::timeout(idle, rd.read_exact(&mut len)) => r,
                _ = stop.changed() => {
                    draining = true;
                    continue;
                }
                _ = close.notified() => break,
            };
            match read {
                Ok(Ok(_)) => {}
                _ => break, // idle, EOF or error
            }
            let n = u16::from_be_bytes(len) as usize;
            let mut msg = vec![0u8; n];
            let read = tokio::select! {
                r = tokio::time::timeout(idle, rd.read_exact(&mut msg)) => r,
                _ = close.notified() => break,
            };
            match read {
                Ok(Ok(_)) => {}
                _ => break,
            }
            slots.set_idle(id, &close, false);
            msg
        };
        let mut body = Vec::with_capacity(512);
        let received = Instant::now();
        match ctx.handler.answer(&msg, Proto::Tcp, received, &mut body) {
            Outcome::Reply(a) => {
                ctx.recorder.answered(shard, Proto::Tcp, &a, &msg);
                if let Some(slot) = a.refresh {
                    ctx.queue_refresh(&msg, slot);
                }
                ctx.recorder.took(shard, received.elapsed(), 1);
                if tx.send(frame(body)).await.is_err() {
                    break;
                }
            }
            Outcome::Drop => {}
            Outcome::Forward { stale_fallback } => {
                let Some(slot) = ctx.begin_forward(shard) else {
                    if let Ok(v) = wire::scan_query(&msg) {
                        let a = ctx.handler.fail(&v, rcode::REFUSED, &mut body);
                        ctx.recorder.answered(shard, Proto::Tcp, &a, &msg);
                        ctx.recorder.took(shard, received.elapsed(), 1);
                        if tx.send(frame(body)).await.is_err() {
                            break;
                        }
                    }
                    continue;
                };
                let Ok(permit) = pipeline.clone().acquire_owned().await else {
                    break;
                };
                let (ctx, tx) = (ctx.clone(), tx.clone());
                tokio::spawn(async move {
                    if let Some(a) = ctx
                        .resolve_miss(&msg, Proto::Tcp, stale_fallback, &mut body)
                        .await
                    {
                        ctx.recorder.answered(shard, Proto::Tcp, &a, &msg);
                        drop(slot);
                        ctx.recorder.took(shard, received.elapsed(), 1);
                        let _ = tx.send(frame(body)).await;
                    }
                    drop(permit);
                });
            }
        }
    }
    slots.set_idle(id, &close, false);
    drop(tx);
    let _ = writer.await;
}

/// One whole frame if the socket's buffer already holds it, without waiting; `None` when it does
/// not (a frame cut short is abandoned: the connection closes next).
fn read_frame_now(rd: &mut tokio::net::tcp::OwnedReadHalf, len: &mut [u8; 2]) -> Option<Vec<u8>> {
    rd.read_exact(len).now_or_never()?.ok()?;
    let mut msg = vec![0u8; u16::from_be_bytes(*len) as usize];
    rd.read_exact(&mut msg).now_or_never()?.ok()?;
    Some(msg)
}

fn frame(body: Vec<u8>) -> Vec<u8> {
    let mut f = Vec::with_capacity(body.len() + 2);
    f.extend_from_slice(&(body.len() as u16).to_be_bytes());
    f.extend_from_slice(&body);
    f
}
