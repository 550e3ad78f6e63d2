//! The exchange on a virtual clock: no sockets, `now` advanced by hand.

use super::*;

const SEC: Duration = Duration::from_secs(1);

fn opts(transport: model::Transport) -> ExchangeOptions {
    ExchangeOptions {
        attempt_timeout: 2 * SEC,
        deadline: 5 * SEC,
        transport,
    }
}

const OK: ReplyMeta = ReplyMeta {
    rcode: rcode::NOERROR,
    truncated: false,
};
const SERVFAIL: ReplyMeta = ReplyMeta {
    rcode: rcode::SERVFAIL,
    truncated: false,
};
const REFUSED: ReplyMeta = ReplyMeta {
    rcode: rcode::REFUSED,
    truncated: false,
};
const TC: ReplyMeta = ReplyMeta {
    rcode: rcode::NOERROR,
    truncated: true,
};

/// The attempts made (server, transport) and the result (server, reply).
type Driven = (
    Vec<(usize, Transport)>,
    Result<(usize, &'static str), UpstreamError>,
);

/// Drives `ex` with `outcome(server, transport)` deciding each attempt's fate, advancing the clock
/// by `step` per attempt; returns the attempts made (server, transport) and the result.
fn drive(
    mut ex: Exchange<&'static str>,
    t0: Instant,
    step: Duration,
    mut outcome: impl FnMut(usize, Transport) -> Result<(ReplyMeta, &'static str), AttemptError>,
) -> Driven {
    let mut now = t0;
    let mut seen = Vec::new();
    for _ in 0..100 {
        let Some(a) = ex.poll_attempt(now) else {
            let r = ex.finish().map(|c| (c.server, c.reply));
            return (seen, r);
        };
        assert!(a.until <= t0 + 5 * SEC, "no attempt runs past the deadline");
        seen.push((a.server, a.transport));
        now += step;
        match outcome(a.server, a.transport) {
            Ok((meta, r)) => {
                let fb = ex.handle_reply(&a, meta, r, now);
                assert!(fb.healthy);
                assert_eq!(fb.rtt, step);
            }
            Err(e) => {
                let fb = ex.handle_failure(&a, e, now);
                assert!(!fb.healthy);
            }
        }
    }
    panic!("the exchange never ended");
}

fn udp(s: &[usize]) -> Vec<(usize, Transport)> {
    s.iter().map(|&s| (s, Transport::Udp)).collect()
}

#[test]
fn first_reply_wins() {
    let t0 = Instant::now();
    let ex = Exchange::new(vec![3, 4], t0, opts(model::Transport::PreferUdp));
    let (seen, r) = drive(ex, t0, Duration::from_millis(1), |_, _| Ok((OK, "a")));
    assert_eq!(seen, udp(&[3]));
    assert_eq!(r.unwrap(), (3, "a"));
}

#[test]
fn each_server_twice_in_order_on_fast_failures() {
    let t0 = Instant::now();
    let ex = Exchange::new(vec![0, 1], t0, opts(model::Transport::PreferUdp));
    // Refused connections fail at once, so the deadline never cuts in.
    let (seen, r) = drive(ex, t0, Duration::ZERO, |_, _| Err(AttemptError::Refused));
    assert_eq!(seen, udp(&[0, 1, 0, 1]));
    assert_eq!(
        r.unwrap_err(),
        UpstreamError::Exhausted(AttemptError::Refused)
    );
}

#[test]
fn a_lone_server_gets_three_tries() {
    let t0 = Instant::now();
    let ex = Exchange::new(vec![7], t0, opts(model::Transport::PreferUdp));
    let (seen, _) = drive(ex, t0, Duration::ZERO, |_, _| Err(AttemptError::Network));
    assert_eq!(seen, udp(&[7, 7, 7]));
}

#[test]
fn failover_to_the_next_server() {
    let t0 = Instant::now();
    let ex = Exchange::new(vec![0, 1, 2], t0, opts(model::Transport::PreferUdp));
    let (seen, r) = drive(ex, t0, Duration::from_millis(300), |s, _| match s {
        0 => Err(AttemptError::Timeout),
        _ => Ok((OK, "from 1")),
    });
    assert_eq!(seen, udp(&[0, 1]));
    assert_eq!(r.unwrap(), (1, "from 1"));
}

#[test]
fn the_deadline_stops_retries_and_bounds_each_attempt() {
    let t0 = Instant::now();
    let mut ex: Exchange<()> = Exchange::new(vec![0, 1], t0, opts(model::Transport::PreferUdp));
    let a = ex.poll_attempt(t0).unwrap();
    assert_eq!(a.until, t0 + 2 * SEC);
    ex.handle_failure(&a, AttemptError::Timeout, a.until);
    let b = ex.poll_attempt(t0 + 2 * SEC).unwrap();
    assert_eq!((b.server, b.until), (1, t0 + 4 * SEC));
    ex.handle_failure(&b, AttemptError::Timeout, b.until);
    let c = ex.poll_attempt(t0 + 4 * SEC).unwrap();
    assert_eq!(
        (c.server, c.until),
        (0, t0 + 5 * SEC),
        "the last attempt ends with the deadline"
    );
    ex.handle_failure(&c, AttemptError::Timeout, c.until);
    assert_eq!(
        ex.poll_attempt(t0 + 5 * SEC),
        None,
        "no attempt past the deadline"
    );
    assert_eq!(
        ex.finish().unwrap_err(),
        UpstreamError::Exhausted(AttemptError::Timeout)
    );
}

#[test]
fn servfail_is_kept_while_other_servers_are_tried() {
    let t0 = Instant::now();
    let ex = Exchange::new(vec![0, 1, 2], t0, opts(model::Transport::PreferUdp));
    let (seen, r) = drive(ex, t0, Duration::from_millis(1), |s, _| match s {
        0 => Ok((SERVFAIL, "servfail")),
        1 => Ok((REFUSED, "refused")),
        _ => Ok((OK, "good")),
    });
    assert_eq!(seen, udp(&[0, 1, 2]));
    assert_eq!(r.unwrap(), (2, "good"), "a better answer wins");
}

#[test]
fn the_first_servfail_is_the_answer_when_none_does_better() {
    let t0 = Instant::now();
    let ex = Exchange::new(vec![0, 1], t0, opts(model::Transport::PreferUdp));
    let (seen, r) = drive(ex, t0, Duration::from_millis(1), |s, _| match s {
        0 => Ok((SERVFAIL, "first")),
        _ => Err(AttemptError::Timeout),
    });
    // With a fallback in hand there is no second round.
    assert_eq!(seen, udp(&[0, 1]));
    assert_eq!(r.unwrap(), (0, "first"));
}

#[test]
fn the_last_servers_servfail_is_final() {
    let t0 = Instant::now();
    let ex = Exchange::new(vec![5], t0, opts(model::Transport::PreferUdp));
    let (seen, r) = drive(ex, t0, Duration::from_millis(1), |_, _| {
        Ok((SERVFAIL, "sf"))
    });
    assert_eq!(
        seen,
        udp(&[5]),
        "one server: its SERVFAIL is passed through at once"
    );
    assert_eq!(r.unwrap(), (5, "sf"));
}

#[test]
fn truncated_over_udp_asks_the_same_server_over_tcp() {
    let t0 = Instant::now();
    let ex = Exchange::new(vec![0, 1], t0, opts(model::Transport::PreferUdp));
    let (seen, r) = drive(ex, t0, Duration::from_millis(1), |_, t| match t {
        Transport::Udp => Ok((TC, "truncated")),
        Transport::Tcp => Ok((OK, "whole")),
    });
    assert_eq!(seen, vec![(0, Transport::Udp), (0, Transport::Tcp)]);
    assert_eq!(r.unwrap(), (0, "whole"));
}

#[test]
fn the_tcp_retry_keeps_the_attempts_deadline() {
    let t0 = Instant::now();
    let mut ex = Exchange::new(vec![0], t0, opts(model::Transport::PreferUdp));
    let a = ex.poll_attempt(t0).unwrap();
    ex.handle_reply(&a, TC, "tc", t0 + SEC);
    let b = ex.poll_attempt(t0 + SEC).unwrap();
    assert_eq!(
        (b.server, b.transport, b.until),
        (0, Transport::Tcp, a.until)
    );
    assert_eq!(b.started, t0 + SEC);
}

#[test]
fn udp_only_zones_pass_truncation_through() {
    let t0 = Instant::now();
    let ex = Exchange::new(vec![0], t0, opts(model::Transport::Udp));
    let (seen, r) = drive(ex, t0, Duration::from_millis(1), |_, _| Ok((TC, "tc")));
    assert_eq!(seen, udp(&[0]));
    assert_eq!(r.unwrap(), (0, "tc"));
}

#[test]
fn tcp_zones_start_on_tcp() {
    let t0 = Instant::now();
    let ex = Exchange::new(vec![0, 1], t0, opts(model::Transport::Tcp));
    let (seen, _) = drive(ex, t0, Duration::ZERO, |_, _| Err(AttemptError::Network));
    assert!(seen.iter().all(|(_, t)| *t == Transport::Tcp));
    assert_eq!(seen.len(), 4);
}

#[test]
fn a_failed_tcp_retry_moves_on() {
    let t0 = Instant::now();
    let ex = Exchange::new(vec![0, 1], t0, opts(model::Transport::PreferUdp));
    let (seen, r) = drive(ex, t0, Duration::from_millis(1), |s, t| match (s, t) {
        (0, Transport::Udp) => Ok((TC, "tc")),
        (0, Transport::Tcp) => Err(AttemptError::Refused),
        _ => Ok((OK, "one")),
    });
    assert_eq!(
        seen,
        vec![
            (0, Transport::Udp),
            (0, Transport::Tcp),
            (1, Transport::Udp)
        ]
    );
    assert_eq!(r.unwrap(), (1, "one"));
}

// ---- order ----

fn cands(down: &[bool], srtt_ms: &[u64]) -> Vec<Candidate> {
    down.iter()
        .zip(srtt_ms)
        .enumerate()
        .map(|(i, (&down, &ms))| Candidate {
            server: 10 + i,
            down,
            srtt: Duration::from_millis(ms),
        })
        .collect()
}

#[test]
fn sequential_is_the_configured_order() {
    let c = cands(&[false; 3], &[9, 1, 5]);
    for pick in 0..5 {
        assert_eq!(order(Policy::Sequential, &c, pick), vec![10, 11, 12]);
    }
}

#[test]
fn round_robin_and_random_rotate_from_the_pick() {
    let c = cands(&[false; 3], &[0; 3]);
    for p in [Policy::RoundRobin, Policy::Random] {
        assert_eq!(order(p, &c, 0), vec![10, 11, 12]);
        assert_eq!(order(p, &c, 1), vec![11, 12, 10]);
        assert_eq!(order(p, &c, 5), vec![12, 10, 11]);
    }
}

#[test]
fn fastest_sorts_by_srtt_and_tries_unmeasured_first() {
    let c = cands(&[false; 4], &[30, 2, 0, 2]);
    // 12 was never measured (0), then 11 and 13 tie (configured order), then the slow one.
    assert_eq!(order(Policy::Fastest, &c, 7), vec![12, 11, 13, 10]);
}

#[test]
fn down_servers_are_skipped_by_every_policy() {
    let c = cands(&[true, false, false], &[0, 5, 1]);
    assert_eq!(order(Policy::Sequential, &c, 0), vec![11, 12]);
    assert_eq!(order(Policy::RoundRobin, &c, 0), vec![11, 12]);
    assert_eq!(order(Policy::RoundRobin, &c, 1), vec![12, 11]);
    assert_eq!(order(Policy::Random, &c, 3), vec![12, 11]);
    assert_eq!(
        order(Policy::Fastest, &c, 0),
        vec![12, 11],
        "down wins over an unmeasured time"
    );
}

#[test]
fn when_all_are_down_one_is_tried_anyway() {
    let c = cands(&[true; 3], &[9, 1, 5]);
    assert_eq!(order(Policy::Sequential, &c, 2), vec![10]);
    assert_eq!(order(Policy::Fastest, &c, 2), vec![11]);
    assert_eq!(order(Policy::RoundRobin, &c, 2), vec![12]);
    assert_eq!(order(Policy::Random, &c, 4), vec![11]);
    assert_eq!(order(Policy::Random, &[], 4), Vec::<usize>::new());
}

#[test]
fn a_down_server_gets_no_attempt_even_after_failures() {
    // Health interplay: with the dead server left out of the order, a failure of the live one is
    // retried on itself, never on the dead one.
    let t0 = Instant::now();
    let c = cands(&[true, false], &[0, 0]);
    let ex = Exchange::new(
        order(Policy::Sequential, &c, 0),
        t0,
        opts(model::Transport::PreferUdp),
    );
    let (seen, _) = drive(ex, t0, Duration::ZERO, |_, _| Err(AttemptError::Network));
    assert_eq!(seen, udp(&[11, 11, 11]));
}

#[test]
fn failures_fed_back_to_health_take_a_server_out_of_the_order_and_a_reply_brings_it_back() {
    use crate::health::Registry;
    let t0 = Instant::now();
    let reg = Registry::new(t0);
    let hs: Vec<_> = (0..2)
        .map(|i| {
            let h = reg.server(std::net::SocketAddr::from(([127, 0, 0, 1], 5300 + i)));
            h.adopt(2, Duration::from_millis(500), false);
            h
        })
        .collect();
    let cands = |now: Instant| -> Vec<Candidate> {
        hs.iter()
            .enumerate()
            .map(|(i, h)| Candidate {
                server: i,
                down: h.is_down(),
                srtt: h.srtt(now),
            })
            .collect()
    };
    let mut now = t0;
    // Server 0 times out, server 1 answers: two queries, each trying 0 first (sequential).
    for q in 0..2 {
        let mut ex = Exchange::new(
            order(Policy::Sequential, &cands(now), 0),
            now,
            opts(model::Transport::PreferUdp),
        );
        let mut tried = Vec::new();
        while let Some(a) = ex.poll_attempt(now) {
            tried.push(a.server);
            let fb = if a.server == 0 {
                now = a.until;
                ex.handle_failure(&a, AttemptError::Timeout, now)
            } else {
                now += Duration::from_millis(1);
                ex.handle_reply(&a, OK, (), now)
            };
            if fb.healthy {
                hs[fb.server].record_reply(fb.rtt, now);
            } else {
                hs[fb.server].record_failure(2 * SEC, now);
            }
        }
        assert_eq!(tried, vec![0, 1], "query {q}");
        assert_eq!(ex.finish().unwrap().server, 1);
    }
    assert!(hs[0].is_down(), "two consecutive failures: down");
    assert_eq!(order(Policy::Sequential, &cands(now), 0), vec![1]);
    assert_eq!(order(Policy::Fastest, &cands(now), 0), vec![1]);
    // Its probe answers: back in first place.
    assert!(hs[0].record_probe_ok());
    assert_eq!(order(Policy::Sequential, &cands(now), 0), vec![0, 1]);
    // `fastest` remembers it timed out: the live one stays first.
    assert_eq!(order(Policy::Fastest, &cands(now), 0), vec![1, 0]);
}
