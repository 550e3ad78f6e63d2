//! Logging setup and a lock-free per-key rate limiter for repetitive error logs.
//!
//! NodeLocal DNSCache users mostly complain about log floods (thousands of identical
//! "i/o timeout" lines per second when an upstream is down), so error-path logging goes through
//! [`RateLimitedLog`]: at most `burst` lines per key per interval, and the next line after a
//! suppressed period reports how many were dropped.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use tracing_subscriber::EnvFilter;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable single-line text.
    #[default]
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// Errors from [`init_logging`].
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("invalid log filter {filter:?}: {source}")]
    Filter {
        filter: String,
        source: tracing_subscriber::filter::ParseError,
    },
    #[error("a global tracing subscriber is already installed")]
    AlreadyInitialized,
}

/// Installs the global tracing subscriber, writing to stderr.
///
/// `level` is an `EnvFilter` directive (`info`, `debug`, `nodedns=debug,warn`, ...). When
/// `RUST_LOG` is set and non-empty it overrides `level`, so an operator can raise verbosity
/// on one pod without editing the DaemonSet's arguments.
pub fn init_logging(level: &str, format: LogFormat) -> Result<(), LoggingError> {
    let filter = build_filter(level, std::env::var("RUST_LOG").ok().as_deref())?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let res = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    res.map_err(|_| LoggingError::AlreadyInitialized)
}

/// Picks `rust_log` over `level` when it is non-empty. Separate from `init_logging` so the
/// precedence is testable without touching the process environment.
fn build_filter(level: &str, rust_log: Option<&str>) -> Result<EnvFilter, LoggingError> {
    let directive = match rust_log {
        Some(s) if !s.trim().is_empty() => s,
        _ => level,
    };
    EnvFilter::try_new(directive).map_err(|source| LoggingError::Filter {
        filter: directive.to_owned(),
        source,
    })
}

/// Number of distinct keys tracked exactly; further keys share one overflow slot.
const SLOTS: usize = 64;
const COUNT_BITS: u32 = 24;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
/// Largest representable interval start: 2^40 ms, about 34 years of uptime.
const MAX_MS: u64 = (1 << (64 - COUNT_BITS)) - 1;

/// Outcome of [`RateLimitedLog::check_at`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log it. `suppressed` lines with this key were dropped since the last allowed one
    /// in an earlier interval.
    Allow { suppressed: u64 },
    /// Drop it (counted, reported with the next allowed line).
    Suppress,
}

#[repr(align(64))]
#[derive(Default)]
struct Slot {
    /// Hash of the key owning this slot; 0 = free.
    tag: AtomicU64,
    /// Start of the current interval (ms since `RateLimitedLog::base`, +1 so 0 = never) in the
    /// high bits and the lines allowed in it in the low `COUNT_BITS`, so that one CAS moves
    /// both and the burst is exact under contention.
    state: AtomicU64,
    suppressed: AtomicU64,
}

/// Per-key log rate limiter: at most `burst` lines per key per `interval`.
///
/// Lock-free: a fixed table of slots claimed by CAS on the key's hash (keys are expected to be
/// a small static set such as `"upstream-timeout"`); if more than 64 distinct keys appear,
/// the rest share an overflow slot. The burst is exact under contention (one CAS per call).
///
/// A suppressed count is only reported when the key logs again after its interval ended; if
/// the errors stop completely, the count is not reported (the metrics still have it).
///
/// ```
/// # use nodedns::logging::RateLimitedLog;
/// # use std::time::Duration;
/// let limiter = RateLimitedLog::new(5, Duration::from_secs(10));
/// if limiter.allow("upstream-timeout") {
///     tracing::warn!("upstream timed out");
/// }
/// ```
pub struct RateLimitedLog {
    burst: u32,
    interval_ms: u64,
    base: Instant,
    slots: Box<[Slot]>,
    overflow: Slot,
}

impl std::fmt::Debug for RateLimitedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitedLog")
            .field("burst", &self.burst)
            .field("interval_ms", &self.interval_ms)
            .finish_non_exhaustive()
    }
}

impl RateLimitedLog {
    /// At most `burst` lines per key per `interval` (an interval under 1 ms counts as 1 ms;
    /// `burst` is capped at 2^24 - 1).
    pub fn new(burst: u32, interval: Duration) -> Self {
        RateLimitedLog {
            burst: burst.min(COUNT_MASK as u32),
            interval_ms: u64::try_from(interval.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
            base: Instant::now(),
            slots: (0..SLOTS).map(|_| Slot::default()).collect(),
            overflow: Slot::default(),
        }
    }

    /// Returns whether to log a line for `key` now. When lines were suppressed in an earlier
    /// interval, logs "suppressed K similar messages" (at warn level) before returning `true`.
    pub fn allow(&self, key: &str) -> bool {
        match self.check_at(key, Instant::now()) {
            Verdict::Allow { suppressed: 0 } => true,
            Verdict::Allow { suppressed } => {
                tracing::warn!(key, suppressed, "suppressed {suppressed} similar messages");
                true
            }
            Verdict::Suppress => false,
        }
    }

    /// Like [`allow`](Self::allow) but with an explicit clock and no logging; for tests and
    /// callers that want to report the suppressed count themselves.
    pub fn check_at(&self, key: &str, now: Instant) -> Verdict {
        let slot = self.slot(key);
        if self.burst == 0 {
            slot.suppressed.fetch_add(1, Relaxed);
            return Verdict::Suppress;
        }
        // +1 keeps 0 meaning "no window yet".
        let now_ms = u64::try_from(now.saturating_duration_since(self.base).as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1)
            .min(MAX_MS);
        loop {
            let state = slot.state.load(Relaxed);
            let (start, count) = (state >> COUNT_BITS, state & COUNT_MASK);
            if start == 0 || now_ms.saturating_sub(start) >= self.interval_ms {
                // Open a new interval with this line as its first.
                let new = (now_ms << COUNT_BITS) | 1;
                if slot
                    .state
                    .compare_exchange_weak(state, new, Relaxed, Relaxed)
                    .is_ok()
                {
                    let suppressed = slot.suppressed.swap(0, Relaxed);
                    return Verdict::Allow { suppressed };
                }
            } else if count >= u64::from(self.burst) {
                slot.suppressed.fetch_add(1, Relaxed);
                return Verdict::Suppress;
            } else if slot
                .state
                .compare_exchange_weak(state, state + 1, Relaxed, Relaxed)
                .is_ok()
            {
                return Verdict::Allow { suppressed: 0 };
            }
        }
    }

    fn slot(&self, key: &str) -> &Slot {
        let tag = fnv1a(key.as_bytes()).max(1);
        let start = (tag as usize) % SLOTS;
        for i in 0..SLOTS {
            let slot = &self.slots[(start + i) % SLOTS];
            match slot.tag.load(Relaxed) {
                t if t == tag => return slot,
                0 => match slot.tag.compare_exchange(0, tag, Relaxed, Relaxed) {
                    Ok(_) => return slot,
                    Err(t) if t == tag => return slot,
                    Err(_) => continue,
                },
                _ => continue,
            }
        }
        &self.overflow
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_suppress_then_report() {
        let l = RateLimitedLog::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(l.check_at("a", t0), Verdict::Allow { suppressed: 0 });
        assert_eq!(l.check_at("a", t0), Verdict::Allow { suppressed: 0 });
        assert_eq!(l.check_at("a", t0), Verdict::Suppress);
        assert_eq!(
            l.check_at("a", t0 + Duration::from_secs(9)),
            Verdict::Suppress
        );
        // Another key has its own budget.
        assert_eq!(l.check_at("b", t0), Verdict::Allow { suppressed: 0 });
        // Next interval: allowed again, and reports the two dropped lines once.
        let t1 = t0 + Duration::from_secs(11);
        assert_eq!(l.check_at("a", t1), Verdict::Allow { suppressed: 2 });
        assert_eq!(l.check_at("a", t1), Verdict::Allow { suppressed: 0 });
        assert_eq!(l.check_at("a", t1), Verdict::Suppress);
        assert_eq!(
            l.check_at("a", t1 + Duration::from_secs(10)),
            Verdict::Allow { suppressed: 1 }
        );
    }

    #[test]
    fn zero_burst_suppresses_everything() {
        let l = RateLimitedLog::new(0, Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(l.check_at("k", t0), Verdict::Suppress);
        assert_eq!(l.check_at("k", t0), Verdict::Suppress);
        assert_eq!(
            l.check_at("k", t0 + Duration::from_secs(2)),
            Verdict::Suppress
        );
    }

    #[test]
    fn many_keys_overflow_without_panicking() {
        let l = RateLimitedLog::new(1, Duration::from_secs(60));
        let t0 = Instant::now();
        let allowed = (0..200)
            .filter(|i| l.check_at(&format!("key-{i}"), t0) != Verdict::Suppress)
            .count();
        // 64 keys get their own slot; the other 136 share one slot with a burst of 1.
        assert_eq!(allowed, SLOTS + 1);
    }

    #[test]
    fn concurrent_burst_is_respected() {
        let l = std::sync::Arc::new(RateLimitedLog::new(10, Duration::from_secs(3600)));
        let t0 = Instant::now();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    (0..1000)
                        .filter(|_| l.check_at("x", t0) != Verdict::Suppress)
                        .count()
                })
            })
            .collect();
        let total: usize = handles
            .into_iter()
            .map(|h| h.join().expect("thread panicked"))
            .sum();
        assert_eq!(total, 10);
    }

    #[test]
    fn rust_log_overrides_level() {
        let f = build_filter("info", Some("debug")).expect("valid");
        assert_eq!(f.to_string(), "debug");
        let f = build_filter("warn", Some("  ")).expect("valid");
        assert_eq!(f.to_string(), "warn");
        let f = build_filter("warn", None).expect("valid");
        assert_eq!(f.to_string(), "warn");
        assert!(matches!(
            build_filter("nodedns=[", None),
            Err(LoggingError::Filter { .. })
        ));
    }
}
