//! The floor for `bench/e2e.sh`: a UDP responder with no logic at all, to measure what any server
//! pays on this machine for the kernel's part (receive, send, sleep and wake-up) at a given rate.
//!
//! It answers every query with its own question and one made-up A record (10.0.0.1, TTL 30), from a
//! blocking `recv_from`/`send_to` loop on one socket. It takes nodedns's command line and uses only
//! `--listen ADDR`, so it runs in nodedns's place:
//!
//! ```sh
//! cargo build --release --example floor
//! NODEDNS_BIN=$PWD/target/release/examples/floor WORKLOADS=fixed bench/e2e.sh
//! ```
//!
//! Loopback only: it refuses any other listen address.

use std::net::{SocketAddr, UdpSocket};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let listen = args
        .windows(2)
        .find(|w| w[0] == "--listen")
        .map(|w| w[1].clone())
        .or_else(|| {
            args.iter()
                .find_map(|a| a.strip_prefix("--listen=").map(str::to_string))
        });
    let Some(listen) = listen else {
        eprintln!("floor: --listen ADDR:PORT is required");
        std::process::exit(2);
    };
    let addr: SocketAddr = match listen.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("floor: bad --listen {listen:?}: {e}");
            std::process::exit(2);
        }
    };
    if !addr.ip().is_loopback() {
        eprintln!("floor: refusing non-loopback address {addr}");
        std::process::exit(2);
    }
    let sock = match UdpSocket::bind(addr) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("floor: cannot bind {addr}: {e}");
            std::process::exit(2);
        }
    };
    let mut buf = [0u8; 4096];
    let mut out = Vec::with_capacity(4096);
    loop {
        let (n, peer) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(_) => continue,
        };
        if answer(&buf[..n], &mut out) {
            let _ = sock.send_to(&out, peer);
        }
    }
}

/// The reply to `q`: header with QR, RA and ANCOUNT 1, the question (up to its end), one A record
/// pointing at the question name. Anything that is not a one-question query gets no reply.
fn answer(q: &[u8], out: &mut Vec<u8>) -> bool {
    if q.len() < 12 || q[2] & 0x80 != 0 || q[4..6] != [0, 1] {
        return false;
    }
    // End of the question: the name's labels, then type and class.
    let mut i = 12;
    while i < q.len() && q[i] != 0 {
        if q[i] & 0xC0 != 0 {
            return false;
        }
        i += 1 + usize::from(q[i]);
    }
    let qend = i + 5;
    if qend > q.len() {
        return false;
    }
    out.clear();
    out.extend_from_slice(&q[..qend]);
    out[2] = 0x80 | (q[2] & 0x01); // QR, RD copied
    out[3] = 0x80; // RA
    out[6..12].copy_from_slice(&[0, 1, 0, 0, 0, 0]);
    out.extend_from_slice(&[0xC0, 0x0C, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 10, 0, 0, 1]);
    true
}
