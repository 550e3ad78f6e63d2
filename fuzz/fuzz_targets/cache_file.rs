//! Any bytes as a cache file (one written by an earlier process, or by anyone who can write the
//! path): decoding and reviving must not panic, and whatever is revived must render.
#![no_main]

use std::time::{Duration, Instant, SystemTime};

use libfuzzer_sys::fuzz_target;
use nodedns::persist::{self, Stored};
use nodedns::wire::{TtlPolicy, render, scan_query};

fuzz_target!(|data: &[u8]| {
    let (wall, mono) = (
        SystemTime::now(),
        Instant::now() + Duration::from_secs(86_400),
    );
    // As a whole file as found (framing: magic, version, checksum), as a well-sealed file whose
    // count and entries are the input (so the fuzzer gets past the checksum to the entries), and as
    // one entry's message (validation).
    let _ = persist::decode(data, 0);
    let mut file = b"NDNSCACH\x00\x01".to_vec();
    file.extend_from_slice(&[0; 8]); // written at
    file.extend_from_slice(&[0; 8]); // fingerprint 0
    file.extend_from_slice(data);
    let sum = persist::fnv1a(&file);
    file.extend_from_slice(&sum.to_be_bytes());
    let entries = persist::decode(&file, 0).unwrap_or_default();
    let one = Stored {
        bits: data.first().copied().unwrap_or(0) & 3,
        stored_unix_ms: 0,
        message: data,
    };
    for s in entries.iter().chain(std::iter::once(&one)) {
        let policy = |_: &[u8]| {
            Some(TtlPolicy {
                stale: Duration::from_secs(u64::from(u32::MAX)),
                ..TtlPolicy::default()
            })
        };
        if let Some((q, r)) = persist::revive(s, policy, wall, mono) {
            let view = scan_query(&q).expect("revive builds a query that scans");
            let mut out = Vec::new();
            render(&r, &view, mono, 512, &mut out);
            assert!(out.len() >= 12);
        }
    }
});
