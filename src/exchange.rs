//! The decisions of one forwarded query, without I/O: which server next, over which transport,
//! until when, and which reply wins. `upstream::Upstreams::resolve` is the driver: it asks
//! [`Exchange::poll_attempt`] for an attempt, performs it on a socket, and reports the outcome with
//! [`Exchange::handle_reply`] or [`Exchange::handle_failure`], until no attempt is left; then
//! [`Exchange::finish`] says what the client gets. Like quinn's protocol core, the machine never
//! reads a clock (`now` is always passed in) and owns no buffer it does not need: the reply payload
//! `R` is the driver's, kept here only while it may still be the answer. So retries, failover,
//! fallback, TC→TCP and the deadline are unit-tested on a virtual clock (see `exchange/tests.rs`).
//!
//! Semantics (unchanged from the loop this replaced):
//! - servers are visited in `order`, cyclically; each at most twice and at least three tries in
//!   all (enough to ride out a lost datagram, and a bound when servers fail fast);
//! - each attempt ends at `min(now + attempt_timeout, deadline)`; none starts past the deadline;
//! - a SERVFAIL/REFUSED reply is kept as fallback while the zone's other servers are tried once,
//!   and returned if none does better; the last server's SERVFAIL is the answer;
//! - a truncated UDP reply of a `prefer_udp` zone is asked again of the same server over TCP,
//!   within the same attempt's time.
//!
//! The order itself is [`order`]: the zone's policy over the servers that are not down.

use std::time::{Duration, Instant};

use crate::config::model::{self, Policy};
use crate::upstream::{AttemptError, Transport, UpstreamError};
use crate::wire::rcode;

/// Timing and transport of one exchange (the zone's and the process's settings).
#[derive(Debug, Clone, Copy)]
pub struct ExchangeOptions {
    pub attempt_timeout: Duration,
    /// Whole exchange, from `now` given to [`Exchange::new`].
    pub deadline: Duration,
    pub transport: model::Transport,
}

/// One attempt the driver should make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    /// A server index, as given in the order.
    pub server: usize,
    pub transport: Transport,
    /// The attempt is abandoned (a timeout) at this instant.
    pub until: Instant,
    /// When it was handed out (its round-trip time is measured from here).
    pub started: Instant,
    /// Which try this is (0-based); a TC→TCP retry keeps the number of the try it repeats.
    seq: usize,
}

/// What the driver saw of a reply (the header is all the machine needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyMeta {
    pub rcode: u8,
    pub truncated: bool,
}

/// What an attempt says about its server, for health and round-trip bookkeeping: any reply, even
/// SERVFAIL, means the server is alive (as CoreDNS counts it); a timeout, a network error or a
/// refused connection is a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Feedback {
    pub server: usize,
    pub healthy: bool,
    /// From the attempt's start to `now`.
    pub rtt: Duration,
}

/// The reply the client gets, and from which server.
#[derive(Debug)]
pub struct Chosen<R> {
    pub reply: R,
    pub server: usize,
}

/// The state of one forwarded query. `R` is the driver's reply payload (bytes and the ID sent).
#[derive(Debug)]
pub struct Exchange<R> {
    order: Vec<usize>,
    max_attempts: usize,
    /// Tries started so far (TC→TCP retries not counted).
    started: usize,
    deadline: Instant,
    opts: ExchangeOptions,
    /// The same server over TCP, owed after a truncated UDP reply.
    tcp_retry: Option<Attempt>,
    chosen: Option<Chosen<R>>,
    fallback: Option<Chosen<R>>,
    last_err: AttemptError,
}

impl<R> Exchange<R> {
    /// An exchange over `order` (server indexes, first tried first; not empty: a zone without
    /// servers is not forwarded at all) starting at `now`.
    pub fn new(order: Vec<usize>, now: Instant, opts: ExchangeOptions) -> Exchange<R> {
        let n = order.len();
        Exchange {
            max_attempts: if n == 0 { 0 } else { (2 * n).max(3) },
            order,
            started: 0,
            deadline: now + opts.deadline,
            opts,
            tcp_retry: None,
            chosen: None,
            fallback: None,
            last_err: AttemptError::Timeout,
        }
    }

    /// The next attempt to make, or `None` when the exchange is over (call [`Self::finish`]).
    /// Attempts are sequential: report each one's outcome before polling again.
    pub fn poll_attempt(&mut self, now: Instant) -> Option<Attempt> {
        if self.chosen.is_some() {
            return None;
        }
        if now >= self.deadline {
            if self.tcp_retry.take().is_some() {
                // The owed TCP attempt would have timed out at once.
                self.last_err = AttemptError::Timeout;
            }
            return None;
        }
        if let Some(a) = self.tcp_retry.take() {
            return Some(Attempt { started: now, ..a });
        }
        let n = self.order.len();
        // With a fallback in hand, a second round is not worth the wait.
        if self.started >= self.max_attempts || (self.started >= n && self.fallback.is_some()) {
            return None;
        }
        let seq = self.started;
        self.started += 1;
        Some(Attempt {
            server: self.order[seq % n],
            transport: match self.opts.transport {
                model::Transport::Tcp => Transport::Tcp,
                model::Transport::Udp | model::Transport::PreferUdp => Transport::Udp,
            },
            until: (now + self.opts.attempt_timeout).min(self.deadline),
            started: now,
            seq,
        })
    }

    /// `a` got a reply (ID and question matched) with header `meta`.
    pub fn handle_reply(
        &mut self,
        a: &Attempt,
        meta: ReplyMeta,
        reply: R,
        now: Instant,
    ) -> Feedback {
        let feedback = Feedback {
            server: a.server,
            healthy: true,
            rtt: now.saturating_duration_since(a.started),
        };
        if meta.truncated
            && a.transport == Transport::Udp
            && self.opts.transport == model::Transport::PreferUdp
        {
            // The same server over TCP; the truncated reply is of no use to anyone.
            self.tcp_retry = Some(Attempt {
                transport: Transport::Tcp,
                ..*a
            });
            return feedback;
        }
        let chosen = Chosen {
            reply,
            server: a.server,
        };
        if (meta.rcode == rcode::SERVFAIL || meta.rcode == rcode::REFUSED)
            && a.seq + 1 < self.order.len()
        {
            // Another server may do better; keep the first such reply in case none does.
            self.fallback.get_or_insert(chosen);
            return feedback;
        }
        self.chosen = Some(chosen);
        feedback
    }

    /// `a` failed with `err` (timeout, network error, refused connection).
    pub fn handle_failure(&mut self, a: &Attempt, err: AttemptError, now: Instant) -> Feedback {
        self.last_err = err;
        Feedback {
            server: a.server,
            healthy: false,
            rtt: now.saturating_duration_since(a.started),
        }
    }

    /// What the client gets: the chosen reply, else the fallback, else the last error.
    pub fn finish(self) -> Result<Chosen<R>, UpstreamError> {
        self.chosen
            .or(self.fallback)
            .ok_or(UpstreamError::Exhausted(self.last_err))
    }
}

/// What [`order`] knows of one of a zone's servers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub server: usize,
    /// Marked down by health checking: skipped while any other server is up.
    pub down: bool,
    /// Smoothed round-trip time (decayed), for [`Policy::Fastest`]; zero when never measured.
    pub srtt: Duration,
}

/// The order a query tries `servers` (the zone's, in configured order) in. `pick` chooses the first
/// server of `Random` (a random number) and `RoundRobin` (a per-zone counter); the others ignore it.
/// Servers marked down are left out; when every server is down one is tried anyway (a dead zone
/// answers SERVFAIL after trying, and a revived server is noticed by real traffic too): the first
/// (`Sequential`), the least slow (`Fastest`) or the picked one.
pub fn order(policy: Policy, servers: &[Candidate], pick: usize) -> Vec<usize> {
    let up: Vec<&Candidate> = servers.iter().filter(|c| !c.down).collect();
    if up.is_empty() {
        let Some(first) = servers.first() else {
            return Vec::new();
        };
        let one = match policy {
            Policy::Sequential => first,
            Policy::Fastest => servers.iter().min_by_key(|c| c.srtt).unwrap_or(first),
            Policy::Random | Policy::RoundRobin => &servers[pick % servers.len()],
        };
        return vec![one.server];
    }
    match policy {
        Policy::Sequential => up.iter().map(|c| c.server).collect(),
        Policy::Random | Policy::RoundRobin => {
            let first = pick % up.len();
            (0..up.len())
                .map(|i| up[(first + i) % up.len()].server)
                .collect()
        }
        Policy::Fastest => {
            let mut v = up;
            // Stable: equal times keep the configured order.
            v.sort_by_key(|c| c.srtt);
            v.iter().map(|c| c.server).collect()
        }
    }
}

#[cfg(test)]
mod tests;
