//! Cache tests on a virtual clock: `now` is an argument, so expiry is tested without sleeping.

use super::*;
use crate::wire::tests::{a_reply, negative_reply, query};
use crate::wire::{QueryView, TtlPolicy, build_upstream_query, scan_query};
use hickory_proto::rr::RecordType;
use std::time::Duration;

/// A fresh entry for `k` at `now`: `Some(negative)`, or `None` on a miss.
fn get(c: &Cache, k: &KeyBuf, now: Instant) -> Option<bool> {
    c.with_hit(k, now, |_, negative, _, _| negative)
}

fn stored(q: &[u8], reply: impl Fn(&[u8]) -> Vec<u8>, now: Instant) -> (KeyBuf, Response) {
    let v: QueryView<'_> = scan_query(q).unwrap();
    let mut up = Vec::new();
    build_upstream_query(&v, 1, &mut up);
    let r = Response::from_upstream(&reply(&up), 1, &v, &TtlPolicy::default(), now).unwrap();
    (v.key, r)
}

#[test]
fn hit_until_deadline_then_miss() {
    let c = Cache::new(Limits::default());
    let t = Instant::now();
    let (k, r) = stored(
        &query(1, "a.example.", RecordType::A, None),
        |u| a_reply(u, &[10]),
        t,
    );
    assert!(c.insert(&k, r, t));
    assert!(get(&c, &k, t).is_some());
    assert!(get(&c, &k, t + Duration::from_millis(9999)).is_some());
    assert!(get(&c, &k, t + Duration::from_secs(10)).is_none());
}

#[test]
fn key_is_case_insensitive_and_separates_do() {
    let c = Cache::new(Limits::default());
    let t = Instant::now();
    let (k, r) = stored(
        &query(1, "A.Example.", RecordType::A, None),
        |u| a_reply(u, &[10]),
        t,
    );
    c.insert(&k, r, t);
    let lower = scan_query(&query(2, "a.example.", RecordType::A, None))
        .unwrap()
        .key;
    assert!(get(&c, &lower, t).is_some());
    let with_do = scan_query(&query(2, "a.example.", RecordType::A, Some((1232, true))))
        .unwrap()
        .key;
    assert!(get(&c, &with_do, t).is_none());
    let aaaa = scan_query(&query(2, "a.example.", RecordType::AAAA, None))
        .unwrap()
        .key;
    assert!(get(&c, &aaaa, t).is_none());
}

#[test]
fn negative_entries_live_apart_and_never_shadow_positive() {
    let c = Cache::new(Limits::default());
    let t = Instant::now();
    let q = query(1, "a.cluster.local.", RecordType::A, None);
    let (k, pos) = stored(&q, |u| a_reply(u, &[10]), t);
    let (_, neg) = stored(&q, |u| negative_reply(u, true, Some((60, 60))), t);
    assert!(c.insert(&k, pos.clone(), t));
    assert!(
        !c.insert(&k, neg.clone(), t),
        "NXDOMAIN must not shadow a fresh positive"
    );
    assert!(!get(&c, &k, t).unwrap());
    // Once the positive one expired, the negative one is stored and served.
    let later = t + Duration::from_secs(11);
    let (_, neg2) = stored(&q, |u| negative_reply(u, true, Some((60, 60))), later);
    assert!(c.insert(&k, neg2, later));
    assert!(get(&c, &k, later).unwrap());
    // A positive answer replaces the negative entry.
    let (_, pos2) = stored(&q, |u| a_reply(u, &[10]), later);
    c.insert(&k, pos2, later);
    assert!(!get(&c, &k, later).unwrap());
    assert_eq!(c.stats().negative_entries, 0);
}

#[test]
fn zero_lifetime_is_not_stored() {
    let c = Cache::new(Limits::default());
    let t = Instant::now();
    let (k, r) = stored(
        &query(1, "a.example.", RecordType::A, None),
        |u| negative_reply(u, true, None),
        t,
    );
    assert!(!c.insert(&k, r, t));
    assert!(get(&c, &k, t).is_none());
}

#[test]
fn bounded_by_entries_and_bytes() {
    let limits = Limits {
        positive_entries: 64,
        positive_bytes: 1 << 30,
        negative_entries: 8,
        negative_bytes: 1 << 30,
    };
    let c = Cache::new(limits);
    let t = Instant::now();
    for i in 0..1000 {
        let (k, r) = stored(
            &query(1, &format!("n{i}.example."), RecordType::A, None),
            |u| a_reply(u, &[60]),
            t,
        );
        c.insert(&k, r, t);
    }
    let s = c.stats();
    assert!(s.positive_entries <= 64, "{s:?}");
    assert!(s.positive_evictions > 0);
    // A tight byte budget holds fewer entries than the entry limit allows.
    let c = Cache::new(Limits {
        positive_entries: 10_000,
        positive_bytes: 16 * 1024,
        ..limits
    });
    for i in 0..1000 {
        let (k, r) = stored(
            &query(1, &format!("n{i}.example."), RecordType::A, None),
            |u| a_reply(u, &[60; 8]),
            t,
        );
        c.insert(&k, r, t);
    }
    let s = c.stats();
    assert!(s.positive_bytes <= 16 * 1024, "{s:?}");
    assert!(s.positive_entries < 200, "{s:?}");
}

fn stored_with(
    q: &[u8],
    reply: impl Fn(&[u8]) -> Vec<u8>,
    policy: &TtlPolicy,
    now: Instant,
) -> (KeyBuf, Response) {
    let v: QueryView<'_> = scan_query(q).unwrap();
    let mut up = Vec::new();
    build_upstream_query(&v, 1, &mut up);
    let r = Response::from_upstream(&reply(&up), 1, &v, policy, now).unwrap();
    (v.key, r)
}

fn state(c: &Cache, k: &KeyBuf, now: Instant) -> Option<(bool, Freshness)> {
    c.with_hit(k, now, |_, negative, f, _| (negative, f))
}

#[test]
fn fresh_then_refresh_due_then_stale_then_gone() {
    let c = Cache::new(Limits::default());
    let t = Instant::now();
    let policy = TtlPolicy {
        stale: Duration::from_secs(60),
        prefetch: Some((1, 10, Duration::from_secs(60))),
        ..TtlPolicy::default()
    };
    let (k, r) = stored_with(
        &query(1, "a.example.", RecordType::A, None),
        |u| a_reply(u, &[10]),
        &policy,
        t,
    );
    assert!(c.insert(&k, r, t));
    let at = |s: u64| state(&c, &k, t + Duration::from_secs(s)).map(|(_, f)| f);
    assert_eq!(at(0), Some(Freshness::Fresh));
    assert_eq!(at(8), Some(Freshness::Fresh));
    assert_eq!(at(9), Some(Freshness::RefreshDue), "last 10% of 10 s");
    assert_eq!(at(10), Some(Freshness::Stale));
    assert_eq!(at(69), Some(Freshness::Stale));
    assert_eq!(at(70), None, "past the serve-stale window");
}

#[test]
fn servfail_never_hides_a_servable_answer_but_nxdomain_does() {
    let c = Cache::new(Limits::default());
    let t = Instant::now();
    let policy = TtlPolicy {
        stale: Duration::from_secs(60),
        servfail_ttl: Duration::from_secs(5),
        ..TtlPolicy::default()
    };
    let q = query(1, "a.example.", RecordType::A, None);
    let (k, pos) = stored_with(&q, |u| a_reply(u, &[10]), &policy, t);
    c.insert(&k, pos, t);
    let later = t + Duration::from_secs(15); // stale now
    let servfail = |u: &[u8]| {
        let mut m = hickory_proto::op::Message::from_vec(&negative_reply(u, false, None)).unwrap();
        m.metadata.response_code = hickory_proto::op::ResponseCode::ServFail;
        m.to_vec().unwrap()
    };
    let (_, sf) = stored_with(&q, servfail, &policy, later);
    assert_eq!(sf.kind, Kind::ServFail);
    assert!(
        !c.insert(&k, sf, later),
        "a SERVFAIL does not replace a stale-but-servable answer"
    );
    assert_eq!(state(&c, &k, later), Some((false, Freshness::Stale)));
    let (_, nx) = stored_with(
        &q,
        |u| negative_reply(u, true, Some((30, 30))),
        &policy,
        later,
    );
    assert!(c.insert(&k, nx, later));
    assert_eq!(
        state(&c, &k, later).map(|(neg, _)| neg),
        Some(true),
        "a real NXDOMAIN wins over a stale positive"
    );
}

#[test]
fn one_refresh_claim_per_entry() {
    let c = Cache::new(Limits::default());
    assert!(c.try_begin_refresh(42));
    assert!(!c.try_begin_refresh(42), "claimed already");
    assert!(c.refresh_busy(42));
    c.end_refresh(42);
    assert!(!c.refresh_busy(42));
}

/// CoreDNS's `prefetch AMOUNT DURATION`: AMOUNT hits in a row, none further apart than DURATION,
/// counted over the entry's whole life (not only its refresh window), and kept across a refresh.
#[test]
fn prefetch_counts_hits_in_a_row() {
    let c = Cache::new(Limits::default());
    let t = Instant::now();
    let at = |s: u64| t + Duration::from_secs(s);
    assert!(!c.count_hit(5, 3, 10, at(0)));
    assert!(!c.count_hit(5, 3, 10, at(5)));
    assert!(
        c.count_hit(5, 3, 10, at(15)),
        "the third, 10 s after the second"
    );
    assert!(c.count_hit(5, 3, 10, at(16)), "still counted");
    c.end_refresh(5);
    assert!(c.count_hit(5, 3, 10, at(17)), "kept across a refresh");
    assert!(
        !c.count_hit(5, 3, 10, at(28)),
        "11 s later: the count restarts"
    );
    assert!(!c.count_hit(5, 3, 10, at(29)));
    assert!(c.count_hit(5, 3, 10, at(30)));
    // Another slot has its own count.
    assert!(!c.count_hit(6, 3, 10, at(30)));
}

#[test]
fn the_slab_estimate_follows_the_byte_budget_not_the_entry_cap() {
    // 4 MiB can hold at most 4 MiB / MIN_ENTRY_WEIGHT entries, whatever --cache-size says.
    assert_eq!(
        estimated_items(1_000_000, 4 << 20),
        (4 << 20) / MIN_ENTRY_WEIGHT as usize
    );
    assert_eq!(
        estimated_items(100, 4 << 20),
        100,
        "a smaller entry cap wins"
    );
    assert_eq!(estimated_items(0, 0), 1);
}

mod props {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// Store name `n` with this record TTL (positive) or as NXDOMAIN (`None`).
        Insert(u8, Option<u32>),
        Advance(u32),
        Lookup(u8),
        /// A reload that changes the limits (entries, bytes).
        Resize(usize, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..40, proptest::option::of(0u32..120)).prop_map(|(n, t)| Op::Insert(n, t)),
            (0u32..50).prop_map(Op::Advance),
            (0u8..40).prop_map(Op::Lookup),
            (1usize..64, 2_000u64..40_000).prop_map(|(e, b)| Op::Resize(e, b)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever the sequence: a served TTL is never above what was stored and never wraps below
        /// zero; nothing is served past its lifetime plus the serve-stale window; the byte budget
        /// holds (the entry bound holds until a resize, after which it converges as entries turn
        /// over: see `Part::resize`).
        #[test]
        fn ttls_expiry_and_bounds_hold(ops in proptest::collection::vec(op(), 1..120), stale in 0u64..30) {
            let mut limits = Limits { positive_entries: 16, positive_bytes: 20_000, negative_entries: 16, negative_bytes: 20_000 };
            let c = Cache::new(limits);
            let policy = TtlPolicy { stale: Duration::from_secs(stale), max_ttl: Duration::from_secs(60), ..TtlPolicy::default() };
            let t0 = Instant::now();
            let mut now = t0;
            let mut resized = false;
            // name -> (stored at, record TTL as stored) for what the model knows.
            let mut stored: std::collections::HashMap<u8, (Instant, u32)> = Default::default();
            for op in ops {
                match op {
                    Op::Insert(n, ttl) => {
                        let q = query(1, &format!("n{n}.example."), RecordType::A, None);
                        let reply = |u: &[u8]| match ttl {
                            Some(t) => a_reply(u, &[t]),
                            None => negative_reply(u, true, Some((30, 30))),
                        };
                        let (k, r) = stored_with(&q, reply, &policy, now);
                        let life = r.lifetime().as_secs() as u32;
                        if c.insert(&k, r, now) && ttl.is_some() {
                            stored.insert(n, (now, life));
                        }
                    }
                    Op::Advance(s) => now += Duration::from_secs(u64::from(s)),
                    Op::Lookup(n) => {
                        let q = query(7, &format!("n{n}.example."), RecordType::A, None);
                        let v = scan_query(&q).unwrap();
                        let mut out = Vec::new();
                        let hit = c.with_hit(&v.key, now, |r, neg, f, _| {
                            if f == Freshness::Stale {
                                crate::wire::render_stale(r, &v, 4096, &mut out);
                            } else {
                                crate::wire::render(r, &v, now, 4096, &mut out);
                            }
                            (neg, f, r.stored, r.lifetime())
                        });
                        if let Some((neg, f, at, life)) = hit {
                            let age = now.saturating_duration_since(at);
                            prop_assert!(age < life + Duration::from_secs(stale), "served past lifetime + stale window");
                            prop_assert_eq!(f == Freshness::Stale, age >= life);
                            let m = hickory_proto::op::Message::from_vec(&out).unwrap();
                            for rr in m.answers.iter().chain(m.authorities.iter()) {
                                prop_assert!(rr.ttl <= life.as_secs() as u32, "TTL above the stored lifetime");
                                prop_assert!(rr.ttl <= 86_400);
                            }
                            if !neg && let Some(&(_, l)) = stored.get(&n) {
                                prop_assert!(m.answers.iter().all(|rr| rr.ttl <= l));
                            }
                        }
                    }
                    Op::Resize(e, b) => {
                        limits = Limits { positive_entries: e, positive_bytes: b, negative_entries: e, negative_bytes: b };
                        c.resize(limits);
                        resized = true;
                    }
                }
                let s = c.stats();
                prop_assert!(s.positive_bytes <= limits.positive_bytes, "positive bytes {} > {}", s.positive_bytes, limits.positive_bytes);
                prop_assert!(s.negative_bytes <= limits.negative_bytes);
                if !resized {
                    prop_assert!(s.positive_entries <= limits.positive_entries as u64);
                    prop_assert!(s.negative_entries <= limits.negative_entries as u64);
                }
            }
        }
    }
}
