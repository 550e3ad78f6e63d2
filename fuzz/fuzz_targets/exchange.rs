//! The miss path's state machine (`nodedns::exchange`) driven by arbitrary event sequences on a
//! virtual clock: replies with any rcode and TC bit, failures of every kind, time jumps. Whatever
//! happens: it ends (a bounded number of attempts), no attempt starts at or past the deadline or
//! ends after it, every attempt names a server of the order, the TC→TCP retry only follows a
//! truncated UDP reply in a `prefer_udp` zone, and `finish` returns a reply only if one was given.
//! `order` is checked too: a permutation of the up servers, or one server when all are down.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use nodedns::config::model::{Policy, Transport as ZoneTransport};
use nodedns::exchange::{Candidate, Exchange, ExchangeOptions, ReplyMeta, order};
use nodedns::upstream::{AttemptError, Transport};

fuzz_target!(|data: &[u8]| {
    let mut it = data.iter().copied();
    let mut next = move || it.next();
    let Some(head) = next() else { return };
    let n = usize::from(head % 6);
    let policy = [
        Policy::Random,
        Policy::RoundRobin,
        Policy::Sequential,
        Policy::Fastest,
    ][usize::from(head >> 6)];
    let cands: Vec<Candidate> = (0..n)
        .map(|i| {
            let b = next().unwrap_or(0);
            Candidate {
                server: i,
                down: b & 1 == 1,
                srtt: Duration::from_millis(u64::from(b >> 1)),
            }
        })
        .collect();
    let pick = usize::from(next().unwrap_or(0));
    let ord = order(policy, &cands, pick);
    let up: Vec<usize> = cands.iter().filter(|c| !c.down).map(|c| c.server).collect();
    if n == 0 {
        assert!(ord.is_empty());
        return;
    }
    if up.is_empty() {
        assert_eq!(ord.len(), 1);
    } else {
        let mut sorted = ord.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, up, "order must be a permutation of the up servers");
    }

    let t = next().unwrap_or(0);
    let transport = [
        ZoneTransport::Udp,
        ZoneTransport::PreferUdp,
        ZoneTransport::Tcp,
    ][usize::from(t % 3)];
    let opts = ExchangeOptions {
        attempt_timeout: Duration::from_millis(1 + u64::from(next().unwrap_or(0)) * 10),
        deadline: Duration::from_millis(1 + u64::from(next().unwrap_or(0)) * 40),
        transport,
    };
    let t0 = Instant::now();
    let deadline = t0 + opts.deadline;
    let mut now = t0;
    let mut ex: Exchange<u32> = Exchange::new(ord.clone(), t0, opts);
    let mut replies_given = 0u32;
    let mut last_truncated_udp = false;
    let mut steps = 0;
    while let Some(a) = ex.poll_attempt(now) {
        steps += 1;
        assert!(
            steps <= 4 * ord.len().max(3) + 2,
            "the exchange does not end"
        );
        assert!(now < deadline, "an attempt started at or past the deadline");
        assert!(a.until <= deadline);
        assert!(ord.contains(&a.server));
        if a.transport == Transport::Tcp && transport != ZoneTransport::Tcp {
            assert!(
                last_truncated_udp,
                "a TCP attempt without a truncated UDP reply before it"
            );
        }
        let ev = next().unwrap_or(0xff);
        // Time passes: within the attempt, or to its end (a timeout).
        let dt = Duration::from_millis(u64::from(next().unwrap_or(0)) * 5);
        now = (now + dt).min(a.until);
        last_truncated_udp = false;
        match ev % 4 {
            0 | 1 => {
                let meta = ReplyMeta {
                    rcode: (ev >> 2) % 6,
                    truncated: ev & 0x80 != 0,
                };
                last_truncated_udp = meta.truncated
                    && a.transport == Transport::Udp
                    && transport == ZoneTransport::PreferUdp;
                replies_given += 1;
                let _ = ex.handle_reply(&a, meta, replies_given, now);
            }
            2 => {
                let err = [
                    AttemptError::Timeout,
                    AttemptError::Network,
                    AttemptError::Refused,
                    AttemptError::Malformed,
                ][usize::from(ev >> 6)];
                let _ = ex.handle_failure(&a, err, now);
            }
            _ => {
                now = a.until;
                let _ = ex.handle_failure(&a, AttemptError::Timeout, now);
            }
        }
    }
    if let Ok(chosen) = ex.finish() {
        assert!(chosen.reply >= 1 && chosen.reply <= replies_given);
        assert!(ord.contains(&chosen.server));
    }
});
