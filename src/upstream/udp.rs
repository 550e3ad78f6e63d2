//! UDP to the upstream servers.
//!
//! Queries go out on a reused connected socket per server and per runtime thread, several queries
//! in flight on it at once and told apart by ID and question, as CoreDNS's `forward` reuses its
//! UDP connections. Each socket serves new queries for the server's `expire` (CoreDNS's option,
//! 10 s by default), then retires: a new one from a new random port takes over, and the old one
//! closes once its last query is answered or given up.
//!
//! Why not a fresh socket per query (what nodedns did before, and unbound does): on this machine's
//! mixed benchmark (10 % misses) that socket's life (`socket`, `bind`, `connect`, two `epoll_ctl`,
//! `close`) was about 14 % of the server's CPU (`perf record -g` on `bench/e2e.sh`'s mixed load).
//! What that costs in spoofing resistance: within one socket's life, a forger who knows its port
//! needs the ID (16 bits, random, unique among the socket's queries) and the question; the port is
//! random per socket and changes every `expire`. The same trade as the addon's CoreDNS, on a path
//! that runs between the node and the cluster DNS Service or the node's own resolvers.
//!
//! Per thread: the UDP workers run a current-thread runtime each, so the socket, its reader task
//! and the waiting queries stay on one thread, with no wake-up across threads.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::oneshot;

use super::{AttemptError, PendingGuard, free_id, io_to_attempt, matches, unspecified_for};
use crate::wire;

/// The largest UDP reply read whole. nodedns advertises 1232 bytes (RFC 9715's default), so 4 KiB
/// holds any reply an upstream should send; one byte more tells a longer datagram (cut by the
/// kernel) from one that fits. That one is treated as truncated (retried over TCP where the zone
/// allows), not parsed. A 64 KiB buffer per attempt was ~125 MiB of reservations at
/// `--max-concurrent 2000`.
pub(super) const UDP_REPLY_MAX: usize = 4096;

/// How often a retired socket's reader looks whether its last query is done.
const RETIRED_CHECK: Duration = Duration::from_millis(50);

/// What a waiting query is handed: its reply, or why there is none.
type Delivery = Result<Vec<u8>, AttemptError>;

struct Waiter {
    tx: oneshot::Sender<Delivery>,
    /// The question sent, to match the reply against (RFC 5452).
    question: Box<[u8]>,
    /// The ID the caller built the query with, restored in the reply when the socket needed
    /// another one.
    caller_id: u16,
}

/// One reused socket to one server.
struct Conn {
    sock: UdpSocket,
    pending: Mutex<HashMap<u16, Waiter>>,
    /// No new query after this.
    end: Instant,
    /// The reader is gone (its runtime ended): the socket can no longer receive.
    dead: AtomicBool,
}

thread_local! {
    /// This thread's sockets, by the runtime they are registered with and their server. Weak: a
    /// socket is owned by its reader and its waiting queries, so it closes when the reader ends
    /// (spent and done, or its runtime gone: a runtime's ID is unique only among running runtimes).
    static CONNS: RefCell<HashMap<(tokio::runtime::Id, SocketAddr), Weak<Conn>>> =
        RefCell::new(HashMap::new());
}

/// Sends `query` (a query for `question`, under the caller's ID) to `server` and waits for the
/// reply, which carries the caller's ID back. The caller bounds the wait (its attempt timeout);
/// giving up drops the query's place on the socket.
pub(super) async fn exchange(
    server: SocketAddr,
    expire: Duration,
    query: &[u8],
    question: &[u8],
) -> Result<Vec<u8>, AttemptError> {
    let conn = conn_for(server, expire)?;
    let (tx, rx) = oneshot::channel();
    let caller_id = u16::from_be_bytes([query[0], query[1]]);
    let id = {
        let mut pending = conn.pending.lock().map_err(|_| AttemptError::Network)?;
        // A reader that ended (another thread's runtime: it saw no query after `end`) marked the
        // socket dead before it took this lock to clear the waiters: a waiter added now would
        // never be answered.
        if conn.dead.load(Ordering::Acquire) {
            return Err(AttemptError::Network);
        }
        let id = free_id(&pending, caller_id).ok_or(AttemptError::Network)?;
        pending.insert(
            id,
            Waiter {
                tx,
                question: question.into(),
                caller_id,
            },
        );
        id
    };
    let _guard = PendingGuard {
        pending: &conn.pending,
        id,
    };
    let sent = if id == caller_id {
        conn.sock.send(query).await
    } else {
        let mut q = query.to_vec();
        q[0..2].copy_from_slice(&id.to_be_bytes());
        conn.sock.send(&q).await
    };
    sent.map_err(|e| io_to_attempt(&e))?;
    // The sender goes only with the reader (its runtime ended): the socket is lost.
    rx.await.map_err(|_| AttemptError::Network)?
}

/// This thread's socket to `server` on the current runtime: the one in use, or a new one when it
/// is spent or its runtime is gone.
fn conn_for(server: SocketAddr, expire: Duration) -> Result<Arc<Conn>, AttemptError> {
    let rt = tokio::runtime::Handle::try_current().map_err(|_| AttemptError::Network)?;
    let key = (rt.id(), server);
    let now = Instant::now();
    CONNS.with(|conns| {
        let mut conns = conns.borrow_mut();
        let usable = |c: &Conn| now < c.end && !c.dead.load(Ordering::Acquire);
        if let Some(c) = conns.get(&key).and_then(Weak::upgrade)
            && usable(&c)
        {
            return Ok(c);
        }
        // Forget the spent ones (their queries and readers keep what they still need).
        conns.retain(|_, w| w.upgrade().is_some_and(|c| usable(&c)));
        let c = Arc::new(dial(server, now + expire)?);
        // Registered with this runtime's reactor, so its reader runs here too.
        rt.spawn(read(c.clone()));
        conns.insert(key, Arc::downgrade(&c));
        Ok(c)
    })
}

fn dial(server: SocketAddr, end: Instant) -> Result<Conn, AttemptError> {
    let s = std::net::UdpSocket::bind(unspecified_for(server)).map_err(|e| io_to_attempt(&e))?;
    s.connect(server).map_err(|e| io_to_attempt(&e))?;
    s.set_nonblocking(true).map_err(|e| io_to_attempt(&e))?;
    let sock = UdpSocket::from_std(s).map_err(|e| io_to_attempt(&e))?;
    Ok(Conn {
        sock,
        pending: Mutex::new(HashMap::new()),
        end,
        dead: AtomicBool::new(false),
    })
}

/// Marks a socket dead when its reader ends, however it ends (its runtime dropping it included).
struct ReaderGuard(Arc<Conn>);

impl Drop for ReaderGuard {
    fn drop(&mut self) {
        self.0.dead.store(true, Ordering::Release);
        // Dropping the senders tells every waiter the socket is lost.
        if let Ok(mut p) = self.0.pending.lock() {
            p.clear();
        }
    }
}

/// The socket's one reader: hands each reply to the query waiting for its ID, until the socket is
/// spent and its last query is done.
async fn read(conn: Arc<Conn>) {
    let guard = ReaderGuard(conn);
    let conn = &guard.0;
    let mut buf = vec![0u8; UDP_REPLY_MAX + 1];
    loop {
        let now = Instant::now();
        let wait_until = if now < conn.end {
            conn.end
        } else if conn.pending.lock().map(|p| p.is_empty()).unwrap_or(true) {
            return;
        } else {
            now + RETIRED_CHECK
        };
        let interest = Interest::READABLE | Interest::ERROR;
        let ready =
            match tokio::time::timeout_at(wait_until.into(), conn.sock.ready(interest)).await {
                Err(_elapsed) => continue,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "upstream udp socket");
                    return;
                }
                Ok(Ok(r)) => r,
            };
        if ready.is_error() {
            // Readable readiness does not include it: a pending socket error alone wakes only
            // this interest. Taken until there is none, which clears the readiness.
            let taken = conn
                .sock
                .try_io(Interest::ERROR, || match conn.sock.take_error() {
                    Ok(Some(e)) => Ok(e),
                    Ok(None) => Err(std::io::ErrorKind::WouldBlock.into()),
                    Err(e) => Ok(e),
                });
            if let Ok(e) = taken {
                conn.fail_all(&e);
            }
        }
        if !ready.is_readable() {
            continue;
        }
        loop {
            match conn.sock.try_recv(&mut buf) {
                Ok(n) => conn.deliver(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => conn.fail_all(&e),
            }
        }
    }
}

impl Conn {
    /// A socket error (an ICMP port unreachable: ECONNREFUSED) answers one of the queries in
    /// flight, which one is not said: the server's port is closed for all of them.
    fn fail_all(&self, e: &std::io::Error) {
        let err = io_to_attempt(e);
        if let Ok(mut p) = self.pending.lock() {
            for (_, w) in p.drain() {
                let _ = w.tx.send(Err(err));
            }
        }
    }

    /// Hands datagram `d` to the query waiting for its ID, if it answers that query.
    fn deliver(&self, d: &[u8]) {
        if d.len() < 2 {
            return;
        }
        let id = u16::from_be_bytes([d[0], d[1]]);
        let Ok(mut pending) = self.pending.lock() else {
            return;
        };
        let Some(w) = pending.get(&id) else {
            tracing::debug!("ignoring a UDP reply no query waits for");
            return;
        };
        let result = match classify(d, id, &w.question) {
            Datagram::Answer if d.len() > UDP_REPLY_MAX => Ok(truncated_reply(d, w.question.len())),
            Datagram::Answer => Ok(d.to_vec()),
            Datagram::Malformed => Err(AttemptError::Malformed),
            Datagram::Foreign => {
                tracing::debug!("ignoring a UDP reply that does not match the query");
                return;
            }
        };
        let Some(w) = pending.remove(&id) else {
            return;
        };
        drop(pending);
        let result = result.map(|mut r| {
            r[0..2].copy_from_slice(&w.caller_id.to_be_bytes());
            r
        });
        let _ = w.tx.send(result);
    }
}

/// What a datagram on a connected socket is (the kernel delivers only the server's address and
/// port to it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Datagram {
    /// The reply: ID and question match.
    Answer,
    /// Another ID, or a well-formed response to another question: ignored, as RFC 5452 asks (it
    /// may be forged, and the real reply may still come).
    Foreign,
    /// The query's ID on something that is not a well-formed DNS response (too short, QR clear,
    /// not exactly one question, a question that does not parse). No forger gains by sending
    /// this: one who can guess port and ID can send the right question instead. So it is the
    /// server failing, and the attempt ends (unbound answers such a server's garbage with
    /// SERVFAIL in 3 ms; waiting would cost the client the whole deadline).
    Malformed,
}

pub(super) fn classify(d: &[u8], id: u16, question: &[u8]) -> Datagram {
    if d.len() < 2 || u16::from_be_bytes([d[0], d[1]]) != id {
        return Datagram::Foreign;
    }
    if matches(d, id, question) {
        return Datagram::Answer;
    }
    if d.len() < 3 || d[2] & 0x80 == 0 || wire::question_end(d).is_none() {
        return Datagram::Malformed;
    }
    Datagram::Foreign
}

/// Header and question of `reply` with TC=1 and no records: what an over-long datagram becomes.
pub(super) fn truncated_reply(reply: &[u8], question_len: usize) -> Vec<u8> {
    let end = (wire::HEADER_LEN + question_len).min(reply.len());
    let mut out = reply[..end].to_vec();
    if out.len() >= wire::HEADER_LEN {
        out[2] |= 0x02; // TC
        out[6..12].fill(0);
    }
    out
}

#[cfg(test)]
mod tests;
