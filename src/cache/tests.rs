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
        prefetch: Some((1, 10)),
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
    assert!(c.try_begin_refresh(42, 1));
    assert!(!c.try_begin_refresh(42, 1), "claimed already");
    assert!(c.refresh_busy(42));
    c.end_refresh(42);
    assert!(!c.refresh_busy(42));
    // AMOUNT 3: the third hit in the window claims it.
    assert!(!c.try_begin_refresh(7, 3));
    assert!(!c.try_begin_refresh(7, 3));
    assert!(c.try_begin_refresh(7, 3));
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
