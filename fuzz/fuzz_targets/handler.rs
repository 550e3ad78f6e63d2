//! Any bytes a client can send: the hit path must answer, refuse or drop, never panic, and any
//! reply it writes must be at least a header with the client's ID.
#![no_main]

use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use nodedns::cache::{Cache, Limits};
use nodedns::handler::{Handler, Outcome, Proto};

fuzz_target!(|data: &[u8]| {
    let h = Handler::new(Cache::new(Limits::default()));
    let mut out = Vec::new();
    for proto in [Proto::Udp, Proto::Tcp] {
        if let Outcome::Reply(_) = h.answer(data, proto, Instant::now(), &mut out) {
            assert!(out.len() >= 12);
            assert_eq!(out[..2], data[..2]);
        }
    }
});
