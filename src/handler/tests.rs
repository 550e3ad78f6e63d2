use super::*;
use crate::cache::Limits;
use crate::wire::tests::{a_reply, query};
use crate::wire::{build_upstream_query, scan_query};
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use std::time::Duration;

fn handler() -> Handler {
    Handler::new(Cache::new(Limits::default()))
}

#[test]
fn miss_then_store_then_hit() {
    let h = handler();
    let t = Instant::now();
    let q = query(10, "svc.ns.svc.cluster.local.", RecordType::A, None);
    let mut out = Vec::new();
    assert_eq!(
        h.answer(&q, Proto::Udp, t, &mut out),
        Outcome::Forward {
            stale_fallback: false
        }
    );
    let v = scan_query(&q).unwrap();
    let mut up = Vec::new();
    build_upstream_query(&v, 77, &mut up);
    let resp = h
        .store(&v, &a_reply(&up, &[20]), 77, &TtlPolicy::default(), t)
        .unwrap();
    let a = h.complete(&v, &resp, Proto::Udp, t, &mut out);
    assert_eq!(a.source, Source::Upstream);
    let q2 = query(11, "SVC.ns.svc.cluster.local.", RecordType::A, None);
    match h.answer(&q2, Proto::Udp, t + Duration::from_secs(5), &mut out) {
        Outcome::Reply(a) => assert_eq!(
            a.source,
            Source::Cache {
                negative: false,
                stale: false
            }
        ),
        o => panic!("expected a hit, got {o:?}"),
    }
    let m = Message::from_vec(&out).unwrap();
    assert_eq!(m.metadata.id, 11);
    assert_eq!(m.answers[0].ttl, 15);
}

fn rcode_of(h: &Handler, q: &[u8]) -> Option<ResponseCode> {
    let mut out = Vec::new();
    match h.answer(q, Proto::Udp, Instant::now(), &mut out) {
        Outcome::Reply(_) => Some(Message::from_vec(&out).unwrap().metadata.response_code),
        _ => None,
    }
}

#[test]
fn rejects_with_the_right_rcode() {
    let h = handler();
    let q = query(1, "a.example.", RecordType::A, None);
    let mut status = q.clone();
    status[2] |= 2 << 3; // opcode STATUS
    assert_eq!(rcode_of(&h, &status), Some(ResponseCode::NotImp));
    let mut two = q.clone();
    two[5] = 2;
    assert_eq!(rcode_of(&h, &two), Some(ResponseCode::FormErr));
    assert_eq!(
        rcode_of(&h, &query(1, "zone.example.", RecordType::AXFR, None)),
        Some(ResponseCode::Refused)
    );
    assert_eq!(
        rcode_of(&h, &query(1, "zone.example.", RecordType::IXFR, None)),
        Some(ResponseCode::Refused)
    );
    let mut resp = q.clone();
    resp[2] |= 0x80;
    assert_eq!(rcode_of(&h, &resp), None, "a response is never answered");
    assert_eq!(
        rcode_of(&h, &q[..11]),
        None,
        "shorter than a header: dropped"
    );
    // EDNS version 1: BADVERS (16), lower bits 0 in the header.
    let mut v1 = query(1, "a.example.", RecordType::A, Some((1232, false)));
    let n = v1.len();
    v1[n - 5] = 1; // OPT TTL: ext-rcode, VERSION, flags
    let mut out = Vec::new();
    let outcome = h.answer(&v1, Proto::Udp, Instant::now(), &mut out);
    // What metrics and the query log see: the whole rcode, not its low four bits (NOERROR).
    assert!(
        matches!(outcome, Outcome::Reply(a) if a.rcode == 16),
        "{outcome:?}"
    );
    let m = Message::from_vec(&out).unwrap();
    assert_eq!(u16::from(m.metadata.response_code), 16);
}

#[test]
fn health_probe_is_answered_locally() {
    let h = handler();
    let mut q = query(5, "health.nodedns.", RecordType::TXT, None);
    let n = q.len();
    q[n - 1] = 3; // class CH
    assert_eq!(rcode_of(&h, &q), Some(ResponseCode::NoError));
    let mut vb = query(5, "version.bind.", RecordType::TXT, None);
    let n = vb.len();
    vb[n - 1] = 3;
    assert_eq!(rcode_of(&h, &vb), Some(ResponseCode::Refused));
}

/// Prefetch AMOUNT counts the hits before the refresh window too (CoreDNS's semantics): two fresh
/// hits and one in the window make three; with a gap longer than DURATION before the window hit,
/// the count restarts and there is no refresh.
#[test]
fn prefetch_amount_counts_every_hit_in_a_row() {
    for (gap, refreshed) in [
        (Duration::from_secs(60), true),
        (Duration::from_secs(10), false),
    ] {
        let h = handler();
        let t = Instant::now();
        let policy = TtlPolicy {
            prefetch: Some((3, 10, gap)),
            ..TtlPolicy::default()
        };
        let q = query(1, "hot.example.", RecordType::A, None);
        let v = scan_query(&q).unwrap();
        let mut up = Vec::new();
        build_upstream_query(&v, 5, &mut up);
        h.store(&v, &a_reply(&up, &[30]), 5, &policy, t).unwrap();
        let mut out = Vec::new();
        let mut refresh_at =
            |s: u64| match h.answer(&q, Proto::Udp, t + Duration::from_secs(s), &mut out) {
                Outcome::Reply(a) => a.refresh.is_some(),
                o => panic!("expected a hit, got {o:?}"),
            };
        assert!(!refresh_at(1), "fresh: no refresh");
        assert!(!refresh_at(2), "fresh: no refresh");
        assert_eq!(refresh_at(28), refreshed, "in the window, DURATION {gap:?}");
    }
}
