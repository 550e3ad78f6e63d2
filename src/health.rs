//! Per-server health and round-trip times, shared by every forwarding generation.
//!
//! The [`Registry`] is append-only and keyed by address, so a reload that keeps a server keeps its
//! state (a server that is down stays down, and keeps its one probe), while a server no
//! configuration uses any more is merely forgotten by its probe (see [`ServerHealth::in_use`]).
//! The model is CoreDNS's `forward`: consecutive failures (timeouts, network errors, refused
//! connections) are counted; any reply, even SERVFAIL, resets the count; at `max_fails` the server
//! is down and skipped, and one probe (`. IN NS`, every `health_check`) runs until it answers.
//! Nothing here does I/O or reads a clock; the probe loop lives in `upstream`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How fast a measured round-trip time is forgotten: after this long without a new sample it has
/// fallen to 1/e, so a server that was slow once is tried again (hickory decays the same way)
/// instead of being starved for good by `fastest`.
const SRTT_DECAY: Duration = Duration::from_secs(30);

/// All servers ever configured, by address.
#[derive(Debug)]
pub struct Registry {
    servers: Mutex<HashMap<SocketAddr, Arc<ServerHealth>>>,
    /// Instants are stored in atomics as nanoseconds since this one.
    epoch: Instant,
}

impl Registry {
    pub fn new(epoch: Instant) -> Arc<Registry> {
        Arc::new(Registry {
            servers: Mutex::new(HashMap::new()),
            epoch,
        })
    }

    /// The state of `addr`, created (up, never measured) on first use.
    pub fn server(&self, addr: SocketAddr) -> Arc<ServerHealth> {
        let mut m = match self.servers.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        m.entry(addr)
            .or_insert_with(|| Arc::new(ServerHealth::new(addr, self.epoch)))
            .clone()
    }
}

/// One server's health. Counters are relaxed atomics: a lost update under a race costs one sample,
/// never correctness (a reply still resets the count, a failure still counts).
#[derive(Debug)]
pub struct ServerHealth {
    pub addr: SocketAddr,
    epoch: Instant,
    fails: AtomicU32,
    /// The threshold in force (the smallest non-zero `max_fails` of the zones that use it; 0: never
    /// down). Set by each generation.
    max_fails: AtomicU32,
    /// Probe interval, milliseconds (the smallest `health_check` of those zones).
    probe_every_ms: AtomicU64,
    /// Probe over TCP (a zone reaches this server only over TCP: UDP may be what is blocked).
    probe_tcp: AtomicBool,
    /// Smoothed round-trip time in microseconds; 0: never measured.
    srtt_us: AtomicU32,
    /// When `srtt_us` was last updated (nanoseconds since `epoch`).
    srtt_at: AtomicU64,
    /// A probe task is running (at most one per server).
    pub(crate) probing: AtomicBool,
    /// Live generations that route to this server.
    users: AtomicUsize,
}

impl ServerHealth {
    fn new(addr: SocketAddr, epoch: Instant) -> ServerHealth {
        ServerHealth {
            addr,
            epoch,
            fails: AtomicU32::new(0),
            max_fails: AtomicU32::new(2),
            probe_every_ms: AtomicU64::new(500),
            probe_tcp: AtomicBool::new(false),
            srtt_us: AtomicU32::new(0),
            srtt_at: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            users: AtomicUsize::new(0),
        }
    }

    /// A generation starts using this server with these settings (the last generation's win).
    pub fn adopt(&self, max_fails: u32, probe_every: Duration, probe_tcp: bool) {
        self.users.fetch_add(1, Relaxed);
        self.max_fails.store(max_fails, Relaxed);
        self.probe_every_ms.store(
            probe_every.as_millis().clamp(1, u64::MAX as u128) as u64,
            Relaxed,
        );
        self.probe_tcp.store(probe_tcp, Relaxed);
    }

    /// A generation that used this server is gone.
    pub fn release(&self) {
        self.users.fetch_sub(1, Relaxed);
    }

    /// Whether any live generation routes to this server (a probe of a forgotten one stops).
    pub fn in_use(&self) -> bool {
        self.users.load(Relaxed) > 0
    }

    pub fn probe_every(&self) -> Duration {
        Duration::from_millis(self.probe_every_ms.load(Relaxed))
    }

    pub fn probe_tcp(&self) -> bool {
        self.probe_tcp.load(Relaxed)
    }

    /// Marked down: `max_fails` consecutive failures and no reply since.
    pub fn is_down(&self) -> bool {
        let max = self.max_fails.load(Relaxed);
        max > 0 && self.fails.load(Relaxed) >= max
    }

    /// A reply arrived after `rtt`. Returns whether the server was down (and is up now).
    pub fn record_reply(&self, rtt: Duration, now: Instant) -> bool {
        let was_down = self.is_down();
        self.fails.store(0, Relaxed);
        self.sample(rtt, now);
        was_down
    }

    /// A probe answered: up again. Its time is not a query's, so the round-trip time stays.
    pub fn record_probe_ok(&self) -> bool {
        let was_down = self.is_down();
        self.fails.store(0, Relaxed);
        was_down
    }

    /// An attempt failed; `penalty` (the attempt timeout) counts as its round-trip time, so
    /// `fastest` moves a failing server back. Returns whether this failure marked it down.
    pub fn record_failure(&self, penalty: Duration, now: Instant) -> bool {
        let max = self.max_fails.load(Relaxed);
        let fails = self.fails.fetch_add(1, Relaxed).saturating_add(1);
        self.sample(penalty, now);
        max > 0 && fails == max
    }

    fn sample(&self, rtt: Duration, now: Instant) {
        let us = rtt.as_micros().clamp(1, u32::MAX as u128) as u32;
        let old = self.srtt(now).as_micros() as u32;
        // A quarter of each new sample (TCP's SRTT gain is 1/8; DNS sees fewer samples).
        let new = if old == 0 {
            us
        } else {
            ((3 * u64::from(old) + u64::from(us)) / 4) as u32
        };
        self.srtt_us.store(new.max(1), Relaxed);
        self.srtt_at.store(self.nanos(now), Relaxed);
    }

    /// The smoothed round-trip time at `now`, decayed since the last sample.
    pub fn srtt(&self, now: Instant) -> Duration {
        let us = self.srtt_us.load(Relaxed);
        if us == 0 {
            return Duration::ZERO;
        }
        let age = self.nanos(now).saturating_sub(self.srtt_at.load(Relaxed));
        let decay = (-(age as f64) / SRTT_DECAY.as_nanos() as f64).exp();
        Duration::from_micros((f64::from(us) * decay) as u64)
    }

    fn nanos(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch)
            .as_nanos()
            .min(u64::MAX as u128) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> (Arc<Registry>, Arc<ServerHealth>, Instant) {
        let t0 = Instant::now();
        let r = Registry::new(t0);
        let s = r.server("127.0.0.1:53".parse().unwrap());
        (r, s, t0)
    }

    #[test]
    fn down_after_max_fails_and_up_after_any_reply() {
        let (_r, s, t0) = server();
        s.adopt(2, Duration::from_millis(500), false);
        assert!(!s.record_failure(Duration::from_secs(2), t0));
        assert!(!s.is_down());
        assert!(
            s.record_failure(Duration::from_secs(2), t0),
            "the second marks it down"
        );
        assert!(s.is_down());
        assert!(
            !s.record_failure(Duration::from_secs(2), t0),
            "down only once"
        );
        assert!(
            s.record_reply(Duration::from_millis(1), t0),
            "a reply brings it up"
        );
        assert!(!s.is_down());
    }

    #[test]
    fn max_fails_zero_never_marks_down() {
        let (_r, s, t0) = server();
        s.adopt(0, Duration::from_millis(500), false);
        for _ in 0..10 {
            assert!(!s.record_failure(Duration::from_secs(2), t0));
        }
        assert!(!s.is_down());
    }

    #[test]
    fn the_registry_keeps_state_across_generations() {
        let (r, s, t0) = server();
        s.adopt(1, Duration::from_millis(500), false);
        s.record_failure(Duration::from_secs(2), t0);
        s.release();
        let again = r.server("127.0.0.1:53".parse().unwrap());
        again.adopt(1, Duration::from_millis(500), false);
        assert!(
            again.is_down(),
            "a reload that keeps a server keeps its health"
        );
        assert!(again.in_use());
    }

    #[test]
    fn srtt_smooths_and_decays() {
        let (_r, s, t0) = server();
        assert_eq!(s.srtt(t0), Duration::ZERO, "never measured");
        s.record_reply(Duration::from_millis(8), t0);
        assert_eq!(s.srtt(t0), Duration::from_millis(8));
        s.record_reply(Duration::from_millis(4), t0);
        assert_eq!(s.srtt(t0), Duration::from_millis(7));
        let later = s.srtt(t0 + SRTT_DECAY);
        assert!(later < Duration::from_millis(3) && later > Duration::from_millis(2));
    }
}
