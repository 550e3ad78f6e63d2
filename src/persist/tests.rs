use super::*;
use crate::cache::{Cache, Limits};
use crate::wire::tests::{a_reply, negative_reply, query};
use crate::wire::{build_upstream_query, scan_query};
use hickory_proto::rr::RecordType;

fn entry(name: &str, ttl: u32, do_bit: bool, now: Instant) -> Response {
    let q = query(1, name, RecordType::A, Some((1232, do_bit)));
    let v = scan_query(&q).unwrap();
    let mut up = Vec::new();
    build_upstream_query(&v, 9, &mut up);
    Response::from_upstream(&a_reply(&up, &[ttl]), 9, &v, &TtlPolicy::default(), now).unwrap()
}

fn any_zone(_: &[u8]) -> Option<TtlPolicy> {
    Some(TtlPolicy::default())
}

#[test]
fn round_trip_revives_entries_with_their_remaining_life() {
    let (wall, mono) = (SystemTime::now(), Instant::now());
    let a = entry("a.example.", 30, false, mono);
    let b = entry("B.Example.", 20, true, mono);
    let file = encode([&a, &b], 77, wall, mono);
    let got = decode(&file, 77).unwrap();
    assert_eq!(got.len(), 2);
    // Read back 10 s later by another process: 20 s and 10 s left.
    let (wall2, mono2) = (
        wall + Duration::from_secs(10),
        Instant::now() + Duration::from_secs(3600),
    );
    let cache = Cache::new(Limits::default());
    for s in &got {
        let (q, r) = revive(s, any_zone, wall2, mono2).unwrap();
        let v = scan_query(&q).unwrap();
        assert!(cache.insert(&v.key, r, mono2));
    }
    let ttl_left = |name: &str, do_bit: bool| {
        let q = query(5, name, RecordType::A, Some((1232, do_bit)));
        let v = scan_query(&q).unwrap();
        let mut out = Vec::new();
        cache.with_hit(&v.key, mono2, |r, _, _, _| {
            crate::wire::render(r, &v, mono2, 4096, &mut out)
        })?;
        let m = hickory_proto::op::Message::from_vec(&out).unwrap();
        Some(m.answers[0].ttl)
    };
    assert_eq!(ttl_left("a.example.", false), Some(20));
    assert_eq!(
        ttl_left("b.example.", true),
        Some(10),
        "the DO key comes back as DO"
    );
    assert_eq!(ttl_left("b.example.", false), None, "and not as non-DO");
}

#[test]
fn expired_entries_and_other_zones_are_dropped() {
    let (wall, mono) = (SystemTime::now(), Instant::now());
    let a = entry("a.example.", 5, false, mono);
    let file = encode([&a], 1, wall, mono);
    let got = decode(&file, 1).unwrap();
    let later = wall + Duration::from_secs(6);
    assert!(revive(&got[0], any_zone, later, mono + Duration::from_secs(3600)).is_none());
    let stale = |_: &[u8]| {
        Some(TtlPolicy {
            stale: Duration::from_secs(60),
            ..TtlPolicy::default()
        })
    };
    assert!(
        revive(&got[0], stale, later, mono + Duration::from_secs(3600)).is_some(),
        "serve-stale keeps it"
    );
    assert!(revive(&got[0], |_| None, wall, mono + Duration::from_secs(3600)).is_none());
    // A lowered cap applies to what is read back.
    let capped = |_: &[u8]| {
        Some(TtlPolicy {
            max_ttl: Duration::from_secs(2),
            ..TtlPolicy::default()
        })
    };
    let (_, r) = revive(&got[0], capped, wall, mono + Duration::from_secs(3600)).unwrap();
    assert_eq!(r.lifetime(), Duration::from_secs(2));
}

#[test]
fn bad_files_are_rejected_whole() {
    let (wall, mono) = (SystemTime::now(), Instant::now());
    let a = entry("a.example.", 30, false, mono);
    let n = {
        let q = query(1, "gone.example.", RecordType::A, None);
        let v = scan_query(&q).unwrap();
        let mut up = Vec::new();
        build_upstream_query(&v, 3, &mut up);
        Response::from_upstream(
            &negative_reply(&up, true, Some((60, 60))),
            3,
            &v,
            &TtlPolicy::default(),
            mono,
        )
        .unwrap()
    };
    let file = encode([&a, &n], 5, wall, mono);
    assert_eq!(decode(&file, 5).unwrap().len(), 2);
    assert_eq!(decode(&file, 6), Err(PersistError::OtherConfig));
    for cut in [0, 7, 20, HEADER + 3, file.len() - 1] {
        assert!(decode(&file[..cut], 5).is_err(), "truncated at {cut}");
    }
    let mut flipped = file.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    assert_eq!(
        decode(&flipped, 5),
        Err(PersistError::Corrupt("checksum mismatch"))
    );
    let mut v2 = file.clone();
    v2[9] = 2;
    assert_eq!(decode(&v2, 5), Err(PersistError::Version(2)));
    assert_eq!(
        decode(b"random bytes, not a cache", 5),
        Err(PersistError::BadMagic)
    );
}

proptest::proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
        let mut file = MAGIC.to_vec();
        file.extend_from_slice(&bytes);
        let _ = decode(&file, 0);
        let s = Stored { bits: 3, stored_unix_ms: 0, message: &bytes };
        let _ = revive(&s, any_zone, SystemTime::now(), Instant::now());
    }
}

/// A cache filled past its byte budget writes a file within [`max_file_len`] of its limits (what
/// a load reads at most).
#[test]
fn a_full_cache_writes_a_file_within_the_load_bound() {
    let limits = Limits {
        positive_entries: 10_000,
        positive_bytes: 16 << 10,
        negative_entries: 10_000,
        negative_bytes: 4 << 10,
    };
    let cache = Cache::new(limits);
    let now = Instant::now();
    for i in 0..2000 {
        let name = format!("host-{i}.example.");
        let q = query(1, &name, RecordType::A, Some((1232, false)));
        let v = scan_query(&q).unwrap();
        cache.insert(&v.key, entry(&name, 300, false, now), now);
    }
    let snap = cache.snapshot();
    assert!(snap.len() > 10, "the cache holds entries");
    let file = encode(snap.iter(), 1, SystemTime::now(), now);
    let bound = max_file_len(&limits);
    assert!(
        file.len() as u64 <= bound,
        "{} bytes written, bound {bound}",
        file.len()
    );
}
