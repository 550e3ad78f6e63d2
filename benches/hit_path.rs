//! The in-process cost of answering, without sockets: what `cargo bench` measures.
//!
//! - `hit/<entries>`: a whole cache hit, query bytes in to reply bytes out ([`Handler::answer`]:
//!   scan → key → cache lookup → render), with 1k, 100k and 1M entries cached.
//! - `hit_hot1000/<entries>`: the same caches, queried only for 1,000 of their names (a hot set).
//! - `hit_2threads/<entries>`: the same from two threads on one cache at once (time per answer per
//!   thread), which is what two UDP workers do.
//! - `miss/store`: the miss path's own work once upstream has replied: [`Response::from_upstream`]
//!   (hickory-proto validation, OPT strip, TTL offsets) and the cache insert, evictions included.
//! - `miss/exchange`: the decisions a forwarded query adds per query on top of the sockets: the
//!   server order of a three-server `fastest` zone and one [`Exchange`] through to its answer.
//! - `scan_query`: key building alone.
//! - `histogram/record`: what the client-side latency histogram
//!   (`coredns_dns_request_duration_seconds`) adds per UDP batch: one clock read, a bucket search and
//!   two relaxed atomic adds on the worker's own counters.
//! - `batch32/{untimed,timed}`: a batch of 32 hits (1,000 entries) as a UDP worker serves one, without
//!   and with that record; the difference over 32 is its cost per answer under load.
//!
//! Messages are built by hand here (a query, and the reply an authoritative server would give with one
//! A record and an OPT) so that filling a million entries takes seconds, not minutes; every reply
//! still goes through hickory-proto in `from_upstream` when it is stored.

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

use nodedns::cache::{Cache, Limits};
use nodedns::config::model::{Policy, Transport};
use nodedns::exchange::{Candidate, Exchange, ExchangeOptions, ReplyMeta, order};
use nodedns::handler::{Handler, Outcome, Proto};
use nodedns::metrics::Metrics;
use nodedns::wire::{TtlPolicy, build_upstream_query, scan_query};

/// A kubernetes-style service name, distinct for every `i`.
fn name(i: usize) -> String {
    format!("svc-{i}.ns-{}.svc.cluster.local.", i % 64)
}

/// A query as a pod's stub resolver sends it: RD, one question, type A, class IN, no EDNS.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&[0, 1, 0, 1]);
    q
}

/// The reply an authoritative server gives to the upstream query `up` (header, question, OPT):
/// QR/AA/RA set, one A record (name compressed to the question) with `ttl`, and an OPT last.
fn reply(up: &[u8], ttl: u32, addr: [u8; 4]) -> Vec<u8> {
    let qend = up.len() - 11; // nodedns's upstream query ends with an 11-byte OPT
    let mut r = Vec::with_capacity(up.len() + 16);
    r.extend_from_slice(&up[..qend]);
    r[2] |= 0x84; // QR, AA
    r[3] |= 0x80; // RA
    r[6..8].copy_from_slice(&1u16.to_be_bytes()); // ANCOUNT
    r.extend_from_slice(&[0xC0, 0x0C, 0, 1, 0, 1]);
    r.extend_from_slice(&ttl.to_be_bytes());
    r.extend_from_slice(&[0, 4]);
    r.extend_from_slice(&addr);
    r.extend_from_slice(&up[qend..]);
    r
}

/// Limits large enough that nothing is evicted while filling `entries`.
fn limits(entries: usize) -> Limits {
    Limits {
        positive_entries: entries * 2,
        positive_bytes: (entries as u64 * 2) << 10,
        negative_entries: 1024,
        negative_bytes: 1 << 20,
    }
}

/// A handler with `entries` positive answers cached at `now`.
fn filled(entries: usize, now: Instant) -> Handler {
    let h = Handler::new(Cache::new(limits(entries)));
    let mut up = Vec::new();
    for i in 0..entries {
        let q = query(1, &name(i));
        let v = scan_query(&q).expect("bench query scans");
        build_upstream_query(&v, 7, &mut up);
        let r = reply(&up, 3600, (i as u32).to_be_bytes());
        h.store(&v, &r, 7, &TtlPolicy::default(), now)
            .expect("bench reply is valid");
    }
    assert_eq!(h.cache.stats().positive_entries, entries as u64);
    h
}

/// Queries for `n` cached names spread over the whole cache (a cheap LCG, so runs are repeatable).
fn sample_queries(entries: usize, n: usize) -> Vec<Vec<u8>> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|j| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let i = (x >> 33) as usize % entries;
            query(j as u16, &name(i))
        })
        .collect()
}

fn hit(h: &Handler, q: &[u8], now: Instant, out: &mut Vec<u8>) {
    match h.answer(q, Proto::Udp, now, out) {
        Outcome::Reply(_) => {}
        o => panic!("expected a cache hit, got {o:?}"),
    }
}

fn bench_hits(c: &mut Criterion) {
    // 4,096 distinct queries per size: more than the hot set of a node, and for the large caches
    // spread wide enough that lookups leave the CPU's caches.
    const SAMPLE: usize = 4096;
    for entries in [1_000usize, 100_000, 1_000_000] {
        let now = Instant::now();
        let h = filled(entries, now);
        let qs = sample_queries(entries, SAMPLE);
        let now = now + Duration::from_secs(3);
        let mut g = c.benchmark_group("hit");
        g.bench_with_input(BenchmarkId::from_parameter(entries), &entries, |b, _| {
            let mut out = Vec::with_capacity(4096);
            let mut i = 0usize;
            b.iter(|| {
                hit(&h, black_box(&qs[i % SAMPLE]), now, &mut out);
                i += 1;
                black_box(out.len())
            })
        });
        g.finish();

        // The same cache, but queries only for a hot set of 1,000 of its names (as bench/e2e.sh's
        // hot set), picked across the whole cache: what a node with a big cache and skewed traffic
        // sees.
        let hot: Vec<Vec<u8>> = (0..SAMPLE).map(|j| qs[j % 1000].clone()).collect();
        let mut g = c.benchmark_group("hit_hot1000");
        g.bench_with_input(BenchmarkId::from_parameter(entries), &entries, |b, _| {
            let mut out = Vec::with_capacity(4096);
            let mut i = 0usize;
            b.iter(|| {
                hit(&h, black_box(&hot[i % SAMPLE]), now, &mut out);
                i += 1;
                black_box(out.len())
            })
        });
        g.finish();

        let mut g = c.benchmark_group("hit_2threads");
        g.bench_with_input(BenchmarkId::from_parameter(entries), &entries, |b, _| {
            b.iter_custom(|iters| {
                let start = Barrier::new(2);
                std::thread::scope(|s| {
                    let run = |offset: usize| {
                        let (h, qs, start) = (&h, &qs, &start);
                        s.spawn(move || {
                            let mut out = Vec::with_capacity(4096);
                            start.wait();
                            let t = Instant::now();
                            for k in 0..iters as usize {
                                hit(h, black_box(&qs[(k + offset) % SAMPLE]), now, &mut out);
                                black_box(out.len());
                            }
                            t.elapsed()
                        })
                    };
                    let (a, b) = (run(0), run(SAMPLE / 2));
                    let a = a.join().expect("bench thread");
                    let b = b.join().expect("bench thread");
                    a.max(b)
                })
            })
        });
        g.finish();
    }
}

fn bench_miss(c: &mut Criterion) {
    // 200k distinct replies stored round-robin into a cache that holds 100k: every store is a fresh
    // key, and in steady state every insert also evicts.
    const N: usize = 200_000;
    let now = Instant::now();
    let queries: Vec<Vec<u8>> = (0..N).map(|i| query(1, &name(i))).collect();
    let views: Vec<_> = queries
        .iter()
        .map(|q| scan_query(q).expect("bench query scans"))
        .collect();
    let mut up = Vec::new();
    let replies: Vec<Vec<u8>> = views
        .iter()
        .enumerate()
        .map(|(i, v)| {
            build_upstream_query(v, 7, &mut up);
            reply(&up, 3600, (i as u32).to_be_bytes())
        })
        .collect();
    let h = Handler::new(Cache::new(limits(N / 4)));
    let mut i = 0usize;
    c.bench_function("miss/store", |b| {
        b.iter(|| {
            let k = i % N;
            i += 1;
            black_box(
                h.store(&views[k], &replies[k], 7, &TtlPolicy::default(), now)
                    .expect("valid reply"),
            )
        })
    });
}

fn bench_exchange(c: &mut Criterion) {
    let cands = [
        Candidate {
            server: 0,
            down: false,
            srtt: Duration::from_micros(900),
        },
        Candidate {
            server: 1,
            down: true,
            srtt: Duration::ZERO,
        },
        Candidate {
            server: 2,
            down: false,
            srtt: Duration::from_micros(300),
        },
    ];
    let opts = ExchangeOptions {
        attempt_timeout: Duration::from_secs(2),
        deadline: Duration::from_secs(5),
        transport: Transport::PreferUdp,
    };
    let meta = ReplyMeta {
        rcode: 0,
        truncated: false,
    };
    let now = Instant::now();
    c.bench_function("miss/exchange", |b| {
        b.iter(|| {
            let mut ex: Exchange<u16> =
                Exchange::new(order(Policy::Fastest, black_box(&cands), 0), now, opts);
            while let Some(a) = ex.poll_attempt(now) {
                black_box(ex.handle_reply(&a, meta, 7, now));
            }
            black_box(ex.finish().expect("answered").server)
        })
    });
}

fn bench_scan(c: &mut Criterion) {
    let q = query(0x1234, "kubernetes.default.svc.cluster.local.");
    c.bench_function("scan_query", |b| {
        b.iter(|| black_box(scan_query(black_box(&q)).expect("scans").key.qtype))
    });
}

fn bench_histogram(c: &mut Criterion) {
    let metrics = Metrics::new(&[], 1);
    let counters = metrics.worker(0);
    // The batch's start is read anyway (the cache's `now`): the histogram adds the read at its end.
    let start = Instant::now();
    c.bench_function("histogram/record", |b| {
        b.iter(|| counters.request_duration(black_box(start).elapsed(), 1))
    });
    let now = Instant::now();
    let h = filled(1_000, now);
    let qs = sample_queries(1_000, 4096);
    let now = now + Duration::from_secs(3);
    let mut g = c.benchmark_group("batch32");
    for timed in [false, true] {
        let name = if timed { "timed" } else { "untimed" };
        g.bench_function(name, |b| {
            let mut out = Vec::with_capacity(4096);
            let mut i = 0usize;
            b.iter(|| {
                // As `serve_batch`: one clock read for the batch (the cache's `now`), and with the
                // histogram a second one at its end.
                let t = Instant::now();
                for _ in 0..32 {
                    hit(&h, black_box(&qs[i % 4096]), now, &mut out);
                    i += 1;
                }
                if timed {
                    counters.request_duration(t.elapsed(), 32);
                }
                black_box(out.len())
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench_scan, bench_hits, bench_miss, bench_exchange, bench_histogram
}
criterion_main!(benches);
