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
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use thiserror::Error;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, mpsc, watch};

use crate::cache::Key;
use crate::handler::{Answered, Handler, Outcome, Proto};
use crate::upstream::Upstreams;
use crate::wire::{self, Response, rcode};

/// Datagrams per `recvmmsg`/`sendmmsg` call.
const BATCH: usize = 32;
/// Receive buffer per datagram; a longer query is not a query nodedns will answer.
const RECV_BUF: usize = 4096;
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
}

impl Ctx {
    pub fn new(
        handler: Handler,
        upstreams: Upstreams,
        recorder: Arc<dyn Recorder>,
        max_concurrent: usize,
    ) -> Ctx {
        Ctx {
            handler,
            upstreams: RwLock::new(Arc::new(upstreams)),
            recorder,
            flights: Mutex::new(HashMap::new()),
            in_flight: AtomicUsize::new(0),
            max_concurrent: AtomicUsize::new(max_concurrent.max(1)),
        }
    }

    /// The current forwarding generation.
    pub fn upstreams(&self) -> Arc<Upstreams> {
        match self.upstreams.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Makes `new` the forwarding generation for every miss that starts from now on.
    pub fn set_upstreams(&self, new: Upstreams) {
        let new = Arc::new(new);
        match self.upstreams.write() {
            Ok(mut g) => *g = new,
            Err(p) => *p.into_inner() = new,
        }
    }

    /// A reload's new `--max-concurrent`.
    pub fn set_max_concurrent(&self, n: usize) {
        self.max_concurrent.store(n.max(1), Ordering::Relaxed);
    }

    /// Reserves a slot for a forwarded query, or says the limit is reached.
    fn begin_forward(&self, worker: usize) -> bool {
        self.recorder.miss(worker);
        if self.in_flight.fetch_add(1, Ordering::AcqRel)
            >= self.max_concurrent.load(Ordering::Relaxed)
        {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        self.recorder.in_flight(worker, 1);
        true
    }

    fn end_forward(&self, worker: usize) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.recorder.in_flight(worker, -1);
    }

    /// Answers a miss: one upstream exchange per key however many clients ask at once, then the reply
    /// rendered for this client. The caller has reserved a slot with `begin_forward`.
    pub async fn resolve_miss(
        &self,
        packet: &[u8],
        proto: Proto,
        out: &mut Vec<u8>,
    ) -> Option<Answered> {
        let view = wire::scan_query(packet).ok()?;
        // The zone's own `max_concurrent` (issue 12): past it REFUSED, before any upstream sees it.
        let Some(_zone_slot) = self.upstreams().admit(&view) else {
            return Some(self.handler.fail(&view, rcode::REFUSED, out));
        };
        let result = self.fetch(&view).await;
        let now = Instant::now();
        Some(match result {
            Ok(resp) => self.handler.complete(&view, &resp, proto, now, out),
            Err(()) => self.handler.fail(&view, rcode::SERVFAIL, out),
        })
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
        let reply = match upstreams.resolve(view).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(name = ?view.key, error = %e, "upstream failed");
                return Err(());
            }
        };
        match self.handler.store(
            view,
            &reply.bytes,
            reply.sent_id,
            &reply.policy,
            Instant::now(),
        ) {
            Ok(r) => Ok(r),
            Err(e) => {
                tracing::debug!(name = ?view.key, error = %e, "bad upstream reply");
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
            let (ctx, stop) = (ctx.clone(), stop_rx.clone());
            let worker = i % opts.workers.max(1);
            let t = std::thread::Builder::new()
                .name(format!("udp-{i}"))
                .spawn(move || udp_worker(sock, ctx, stop, worker, wrt))
                .map_err(ServerError::Worker)?;
            udp_threads.push(t);
        }
        let limit = Arc::new(Semaphore::new(opts.max_tcp_connections.max(1)));
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
                let (ctx, limit, stop_rx) = (ctx.clone(), limit.clone(), stop_rx.clone());
                let idle = opts.tcp_idle_timeout;
                rt.spawn(accept_loop(l, ctx, limit, stop_rx, idle, tcp_shard))
            })
            .collect();
        Ok(Listeners {
            bound,
            udp_threads,
            udp_socks,
            tcp_stop,
            tcp_tasks,
        })
    }

    /// Stops accepting and reading; in-flight upstream exchanges finish (UDP ones on their worker's
    /// thread, which ends after them).
    pub async fn shutdown(self) {
        let _ = self.tcp_stop.send(true);
        for s in &self.udp_socks {
            // Wakes a worker blocked in `recvmmsg` (it returns at once from now on), which then sees
            // the stop. On an unconnected UDP socket Linux reports ENOTCONN but does shut the read
            // side, so the result is ignored.
            let _ = SockRef::from(&**s).shutdown(std::net::Shutdown::Read);
        }
        for t in self.tcp_tasks {
            let _ = t.await;
        }
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

/// Reusable buffers for one batch of datagrams.
struct Batch {
    bufs: Vec<[u8; RECV_BUF]>,
    lens: [usize; BATCH],
    addrs: [libc::sockaddr_storage; BATCH],
    addr_lens: [libc::socklen_t; BATCH],
    replies: Vec<Vec<u8>>,
    /// Which received datagram each reply answers.
    reply_to: [usize; BATCH],
}

impl Batch {
    fn new() -> Batch {
        Batch {
            bufs: vec![[0u8; RECV_BUF]; BATCH],
            lens: [0; BATCH],
            // SAFETY: sockaddr_storage is plain data; all-zero is a valid (empty) value.
            addrs: unsafe { std::mem::zeroed() },
            addr_lens: [0; BATCH],
            replies: (0..BATCH).map(|_| Vec::with_capacity(RECV_BUF)).collect(),
            reply_to: [0; BATCH],
        }
    }

    /// Receives up to BATCH datagrams: with `MSG_DONTWAIT`, without blocking (`WouldBlock` when
    /// there are none); with `MSG_WAITFORONE`, waiting for the first and taking what else is queued.
    fn recv(&mut self, fd: i32, flags: i32) -> io::Result<usize> {
        // SAFETY: the iovecs and headers point into self's buffers, which outlive the call, and
        // their lengths are the buffers' lengths.
        unsafe {
            let mut iovs: [libc::iovec; BATCH] = std::mem::zeroed();
            let mut hdrs: [libc::mmsghdr; BATCH] = std::mem::zeroed();
            for i in 0..BATCH {
                iovs[i].iov_base = self.bufs[i].as_mut_ptr().cast();
                iovs[i].iov_len = RECV_BUF;
                hdrs[i].msg_hdr.msg_name =
                    (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
                hdrs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
                hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
                hdrs[i].msg_hdr.msg_iovlen = 1;
            }
            let n = libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                BATCH as u32,
                flags,
                std::ptr::null_mut(),
            );
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = n as usize;
            for (i, h) in hdrs.iter().enumerate().take(n) {
                // A datagram larger than the buffer is cut (MSG_TRUNC): mark it empty to drop it.
                self.lens[i] = if h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                    0
                } else {
                    h.msg_len as usize
                };
                self.addr_lens[i] = h.msg_hdr.msg_namelen;
            }
            Ok(n)
        }
    }

    /// Sends the first `count` replies to their clients.
    fn send(&mut self, fd: i32, count: usize) {
        let mut sent = 0;
        while sent < count {
            // SAFETY: as in `recv`, every pointer refers to live buffers of the stated length.
            let r = unsafe {
                let mut iovs: [libc::iovec; BATCH] = std::mem::zeroed();
                let mut hdrs: [libc::mmsghdr; BATCH] = std::mem::zeroed();
                for j in sent..count {
                    let k = j - sent;
                    let to = self.reply_to[j];
                    iovs[k].iov_base = self.replies[j].as_mut_ptr().cast();
                    iovs[k].iov_len = self.replies[j].len();
                    hdrs[k].msg_hdr.msg_name =
                        (&mut self.addrs[to] as *mut libc::sockaddr_storage).cast();
                    hdrs[k].msg_hdr.msg_namelen = self.addr_lens[to];
                    hdrs[k].msg_hdr.msg_iov = &mut iovs[k];
                    hdrs[k].msg_hdr.msg_iovlen = 1;
                }
                libc::sendmmsg(
                    fd,
                    hdrs.as_mut_ptr(),
                    (count - sent) as u32,
                    libc::MSG_DONTWAIT,
                )
            };
            if r <= 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    // The send buffer is full: the rest of the batch would fail the same way, one
                    // system call each. Drop it (clients retry), as a full buffer drops datagrams.
                    tracing::debug!(dropped = count - sent, "udp send buffer full");
                    return;
                }
                // The first message failed for itself (e.g. an unreachable client): skip it and go on.
                sent += 1;
            } else {
                sent += r as usize;
            }
        }
    }
}

/// The client address the kernel wrote into a receive slot.
fn peer_of(sa: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(sa.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in, which it is large enough for.
            let a = unsafe { &*(sa as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::new(ip.into(), u16::from_be(a.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(sa as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                ip,
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
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
/// `recvmmsg`. Misses still in flight then finish (each is bounded by the upstream deadline).
fn udp_worker(
    sock: Arc<StdUdpSocket>,
    ctx: Arc<Ctx>,
    mut stop: watch::Receiver<bool>,
    worker: usize,
    rt: tokio::runtime::Runtime,
) {
    let afd = {
        let _in_rt = rt.enter();
        // SAFETY: the `Arc` inside the `AsyncFd` keeps the socket, and so its descriptor, open for
        // the `AsyncFd`'s whole life, and `as_raw_fd` on it always returns that descriptor.
        match unsafe { AsyncFd::register_with_interest(sock, Interest::READABLE) } {
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
    // Let the misses in flight finish.
    rt.block_on(w.tasks);
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
                    b.reply_to[replies] = i;
                    replies += 1;
                }
                Outcome::Drop => {}
                Outcome::Forward { .. } => {
                    let Some(peer) = peer_of(&b.addrs[i]) else {
                        continue;
                    };
                    if !ctx.begin_forward(worker) {
                        if let Ok(v) = wire::scan_query(packet) {
                            let a = ctx.handler.fail(&v, rcode::REFUSED, out);
                            ctx.recorder.answered(worker, Proto::Udp, &a, packet);
                            b.reply_to[replies] = i;
                            replies += 1;
                        }
                        continue;
                    }
                    let packet = packet.to_vec();
                    let (ctx, sock, local) =
                        (ctx.clone(), self.afd.get_ref().clone(), self.local.clone());
                    spawned = true;
                    local.misses.set(local.misses.get() + 1);
                    self.tasks.spawn_local(async move {
                        let _done = MissGuard(&local);
                        let mut out = Vec::with_capacity(512);
                        if let Some(a) = ctx.resolve_miss(&packet, Proto::Udp, &mut out).await {
                            ctx.recorder.answered(worker, Proto::Udp, &a, &packet);
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
                        ctx.end_forward(worker);
                    });
                }
            }
        }
        if replies > 0 {
            b.send(self.fd(), replies);
        }
        spawned
    }
}

/// Counts a miss task finished however it ends (cancelled too), and wakes the async phase when it
/// was the last.
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

async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<Ctx>,
    limit: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
    idle: Duration,
    shard: usize,
) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    // Past the limit a new connection is closed at once rather than queued.
                    let Ok(permit) = limit.clone().try_acquire_owned() else {
                        tracing::debug!(%peer, "too many TCP connections; closing");
                        continue;
                    };
                    let ctx = ctx.clone();
                    let stop = stop.clone();
                    tokio::spawn(async move {
                        tcp_conn(stream, ctx, idle, stop, shard).await;
                        drop(permit);
                    });
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
) {
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
    loop {
        let read = tokio::select! {
            r = tokio::time::timeout(idle, rd.read_exact(&mut len)) => r,
            _ = stop.changed() => break,
        };
        match read {
            Ok(Ok(_)) => {}
            _ => break, // idle, EOF or error
        }
        let n = u16::from_be_bytes(len) as usize;
        let mut msg = vec![0u8; n];
        match tokio::time::timeout(idle, rd.read_exact(&mut msg)).await {
            Ok(Ok(_)) => {}
            _ => break,
        }
        let mut body = Vec::with_capacity(512);
        match ctx
            .handler
            .answer(&msg, Proto::Tcp, Instant::now(), &mut body)
        {
            Outcome::Reply(a) => {
                ctx.recorder.answered(shard, Proto::Tcp, &a, &msg);
                if tx.send(frame(body)).await.is_err() {
                    break;
                }
            }
            Outcome::Drop => {}
            Outcome::Forward { .. } => {
                if !ctx.begin_forward(shard) {
                    if let Ok(v) = wire::scan_query(&msg) {
                        let a = ctx.handler.fail(&v, rcode::REFUSED, &mut body);
                        ctx.recorder.answered(shard, Proto::Tcp, &a, &msg);
                        if tx.send(frame(body)).await.is_err() {
                            break;
                        }
                    }
                    continue;
                }
                let Ok(permit) = pipeline.clone().acquire_owned().await else {
                    ctx.end_forward(shard);
                    break;
                };
                let (ctx, tx) = (ctx.clone(), tx.clone());
                tokio::spawn(async move {
                    if let Some(a) = ctx.resolve_miss(&msg, Proto::Tcp, &mut body).await {
                        ctx.recorder.answered(shard, Proto::Tcp, &a, &msg);
                        let _ = tx.send(frame(body)).await;
                    }
                    ctx.end_forward(shard);
                    drop(permit);
                });
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

fn frame(body: Vec<u8>) -> Vec<u8> {
    let mut f = Vec::with_capacity(body.len() + 2);
    f.extend_from_slice(&(body.len() as u16).to_be_bytes());
    f.extend_from_slice(&body);
    f
}
