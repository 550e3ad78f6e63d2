//! Cache tests on a virtual clock: `now` is an argument, so expiry is tested without sleeping.

use super::*;
use crate::wire::tests::{a_reply, negative_reply, query};
use crate::wire::{QueryView, TtlPolicy, build_upstream_query, scan_query};
use hickory_proto::rr::RecordType;
use std::time::Duration;

/// A fresh entry for `k` at `now`: `Some(negative)`, or `None` on a miss.
fn get(c: &Cache, k: &KeyBuf, now: Instant) -> Option<bool> {
    c.with_hit(k, now, |_, negative| negative)
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
