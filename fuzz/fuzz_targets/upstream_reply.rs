//! Any bytes an upstream (or a spoofer) can send back: validating and storing them must not panic,
//! and whatever is accepted must render for a client of any size.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use nodedns::wire::{Response, TtlPolicy, render, scan_query};

/// A fixed query: `a.example. A IN` with EDNS.
const QUERY: &[u8] = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x01\x01a\x07example\x00\x00\x01\x00\x01\x00\x00\x29\x04\xd0\x00\x00\x80\x00\x00\x00";

fuzz_target!(|data: &[u8]| {
    let Ok(view) = scan_query(QUERY) else { return };
    let t = Instant::now();
    // Fuzz the reply with the question the query asked, so validation gets past the header often.
    let mut reply = data.to_vec();
    if reply.len() >= 12 {
        reply[0] = 0xAB;
        reply[1] = 0xCD;
    }
    if let Ok(resp) = Response::from_upstream(&reply, 0xABCD, &view, &TtlPolicy::default(), t) {
        let mut out = Vec::new();
        for limit in [512, 1232, 65535] {
            render(&resp, &view, t + Duration::from_secs(3), limit, &mut out);
            assert!(out.len() >= 12);
        }
    }
});
