//! The CoreDNS / node-cache metric names that existing dashboards and the coredns-mixin alerts
//! query, served on `/metrics` beside nodedns's own `nodedns_*` series. Every value is read at
//! scrape time from the same per-worker shards as nodedns's own series (nothing is counted twice
//! on the query path), and `process_*` from `/proc/self`.
//!
//! Labels are the ones nodedns can fill truthfully: no `server`/`zone`/`view` (one cache and one
//! listener set serve every zone), no `family`; `coredns_proxy_request_duration_seconds` has no
//! `rcode` (the upstream histogram is not split by response code).
//! `coredns_dns_request_duration_seconds` (hits included) measures receipt to reply sent, with
//! one clock read per UDP batch rather than two per query (see the README).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::exemplar::Exemplar;

use super::{
    CacheKind, Core, N_QTYPES, N_RCODES, N_REQUEST_BUCKETS, Proto, QTYPE_LABELS, RCODE_LABELS,
    REQUEST_BUCKETS_SECONDS, histogram, sum_workers, upstream_histogram,
};

/// Every metric name this module exports (the dashboard test checks its queries against them).
pub const NAMES: &[&str] = &[
    "coredns_build_info",
    "coredns_dns_requests_total",
    "coredns_dns_responses_total",
    "coredns_dns_request_duration_seconds",
    "coredns_cache_hits_total",
    "coredns_cache_misses_total",
    "coredns_cache_entries",
    "coredns_forward_requests_total",
    "coredns_proxy_request_duration_seconds",
    "coredns_forward_max_concurrent_rejects_total",
    "coredns_nodecache_setup_errors_total",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
];

#[derive(Debug)]
pub(super) struct CompatCollector(pub(super) Arc<Core>);

/// CoreDNS's cache `type` label for nodedns's entry kinds.
fn cache_type(kind: CacheKind) -> &'static str {
    match kind {
        CacheKind::Positive => "success",
        CacheKind::Negative => "denial",
    }
}

impl Collector for CompatCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), fmt::Error> {
        let core = &*self.0;
        let slot = |p: usize, q: usize, r: usize| (p * N_QTYPES + q) * N_RCODES + r;
        let req = |s: usize| sum_workers(core, |w| w.requests[s].load(Relaxed));

        enc.encode_descriptor(
            "coredns_build",
            "A metric with a constant '1' value labeled by version and revision (nodedns's)",
            None,
            MetricType::Info,
        )?
        .encode_info(&[
            ("version", env!("CARGO_PKG_VERSION")),
            ("revision", crate::config::GIT_COMMIT),
        ])?;

        // coredns_dns_requests_total{proto,type}
        {
            let mut m = enc.encode_descriptor(
                "coredns_dns_requests",
                "Counter of DNS requests made per protocol and query type",
                None,
                MetricType::Counter,
            )?;
            for proto in Proto::ALL {
                for (qi, q) in QTYPE_LABELS.iter().enumerate() {
                    let v: u64 = (0..N_RCODES)
                        .map(|r| req(slot(proto as usize, qi, r)))
                        .sum();
                    if v == 0 {
                        continue;
                    }
                    m.encode_family(&[("proto", proto.label()), ("type", *q)])?
                        .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
                }
            }
        }

        // coredns_dns_responses_total{rcode}
        {
            let mut m = enc.encode_descriptor(
                "coredns_dns_responses",
                "Counter of response status codes",
                None,
                MetricType::Counter,
            )?;
            for (ri, r) in RCODE_LABELS.iter().enumerate() {
                let v: u64 = Proto::ALL
                    .iter()
                    .flat_map(|p| (0..N_QTYPES).map(move |q| slot(*p as usize, q, ri)))
                    .map(req)
                    .sum();
                // NOERROR, SERVFAIL and NXDOMAIN always (ratios in alerts need both sides).
                if v == 0 && !matches!(*r, "NOERROR" | "SERVFAIL" | "NXDOMAIN") {
                    continue;
                }
                m.encode_family(&[("rcode", *r)])?
                    .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
            }
        }

        // coredns_cache_hits_total{type}, coredns_cache_misses_total, coredns_cache_entries{type}
        {
            let mut m = enc.encode_descriptor(
                "coredns_cache_hits",
                "The count of cache hits",
                None,
                MetricType::Counter,
            )?;
            for kind in CacheKind::ALL {
                let v = sum_workers(core, |w| w.cache_hits[kind as usize].load(Relaxed));
                m.encode_family(&[("type", cache_type(kind))])?
                    .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
            }
        }
        {
            let v = sum_workers(core, |w| w.cache_misses.load(Relaxed));
            enc.encode_descriptor(
                "coredns_cache_misses",
                "The count of cache misses",
                None,
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
        }
        {
            let snap = core.cache_snapshot.get().map(|f| f()).unwrap_or_default();
            let mut m = enc.encode_descriptor(
                "coredns_cache_entries",
                "The number of elements in the cache",
                None,
                MetricType::Gauge,
            )?;
            for (kind, v) in [
                (CacheKind::Positive, snap.positive_entries),
                (CacheKind::Negative, snap.negative_entries),
            ] {
                m.encode_family(&[("type", cache_type(kind))])?
                    .encode_gauge(&v)?;
            }
        }

        // coredns_forward_requests_total{to}
        {
            let mut m = enc.encode_descriptor(
                "coredns_forward_requests",
                "Counter of requests made per upstream",
                None,
                MetricType::Counter,
            )?;
            for (u, (_, to)) in core.upstreams.iter().zip(core.claimed_labels()) {
                let v: u64 = u.queries.iter().map(|q| q.load(Relaxed)).sum();
                m.encode_family(&[("to", to.as_str())])?
                    .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
            }
        }

        // coredns_dns_request_duration_seconds: every answered request, hits included, from
        // receipt to reply sent (a UDP batch's replies share one measurement).
        {
            let mut counts = [0u64; N_REQUEST_BUCKETS];
            let mut sum = 0.0f64;
            for w in core.workers.iter() {
                let (b, s) = w.request_duration_snapshot();
                for (o, c) in counts.iter_mut().zip(b) {
                    *o = o.wrapping_add(c);
                }
                sum += s;
            }
            let (buckets, count) = histogram(counts, &REQUEST_BUCKETS_SECONDS);
            enc.encode_descriptor(
                "coredns_dns_request_duration_seconds",
                "Histogram of the time (in seconds) each request took (receipt to reply sent)",
                None,
                MetricType::Histogram,
            )?
            .encode_histogram::<NoLabelSet>(
                sum,
                count,
                &buckets,
                None::<&std::collections::HashMap<usize, Exemplar<NoLabelSet, f64>>>,
            )?;
        }

        // coredns_proxy_request_duration_seconds{proxy_name="forward",to}
        {
            let mut m = enc.encode_descriptor(
                "coredns_proxy_request_duration_seconds",
                "Histogram of the time each request took",
                None,
                MetricType::Histogram,
            )?;
            for (u, (_, to)) in core.upstreams.iter().zip(core.claimed_labels()) {
                let (buckets, count, sum) = upstream_histogram(u);
                m.encode_family(&[("proxy_name", "forward"), ("to", to.as_str())])?
                    .encode_histogram::<NoLabelSet>(
                        sum,
                        count,
                        &buckets,
                        None::<&std::collections::HashMap<usize, Exemplar<NoLabelSet, f64>>>,
                    )?;
            }
        }

        {
            let v = sum_workers(core, |w| w.concurrency_rejects.load(Relaxed));
            enc.encode_descriptor(
                "coredns_forward_max_concurrent_rejects",
                "Queries refused because the concurrent queries were at the maximum",
                None,
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
        }

        process(&mut enc)
    }
}

/// `process_*` as the Prometheus client libraries export them, read from /proc at scrape time.
/// A file that cannot be read leaves its series out.
fn process(enc: &mut DescriptorEncoder) -> Result<(), fmt::Error> {
    let stat = ProcStat::read();
    let ticks = crate::batch::clock_ticks() as f64;
    let page = crate::batch::page_size();
    if let Some(s) = &stat {
        let cpu = (s.utime + s.stime) as f64 / ticks;
        enc.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            MetricType::Counter,
        )?
        .encode_counter::<NoLabelSet, _, f64>(&cpu, None)?;
        let rss = s.rss_pages.saturating_mul(page) as f64;
        enc.encode_descriptor(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&rss)?;
        let vsz = s.vsize as f64;
        enc.encode_descriptor(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&vsz)?;
        if let Some(btime) = boot_time() {
            let start = btime as f64 + s.starttime as f64 / ticks;
            enc.encode_descriptor(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&start)?;
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        // The directory handle itself is one of the entries; report the others.
        let n = dir.count().saturating_sub(1) as i64;
        enc.encode_descriptor(
            "process_open_fds",
            "Number of open file descriptors",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&n)?;
    }
    if let Some(max) = max_fds() {
        enc.encode_descriptor(
            "process_max_fds",
            "Maximum number of open file descriptors",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&max)?;
    }
    Ok(())
}

/// The fields of /proc/self/stat that `process_*` needs.
struct ProcStat {
    utime: u64,
    stime: u64,
    starttime: u64,
    vsize: u64,
    rss_pages: u64,
}

impl ProcStat {
    fn read() -> Option<ProcStat> {
        parse_stat(&std::fs::read_to_string("/proc/self/stat").ok()?)
    }
}

/// Parses /proc/PID/stat: the command name is in parentheses and may hold spaces, so fields are
/// counted from the last `)` (field 3, `state`, comes first after it).
fn parse_stat(text: &str) -> Option<ProcStat> {
    let after = text.get(text.rfind(')')? + 1..)?;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Field n (1-based, proc(5)) is f[n - 3].
    let get = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some(ProcStat {
        utime: get(14)?,
        stime: get(15)?,
        starttime: get(22)?,
        vsize: get(23)?,
        rss_pages: get(24)?,
    })
}

fn boot_time() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

fn max_fds() -> Option<i64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parens_in_the_name() {
        let text = "1234 (a b) c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 777 123456789 42 18446744073709551615";
        let s = parse_stat(text).unwrap();
        assert_eq!((s.utime, s.stime), (250, 50));
        assert_eq!(s.starttime, 777);
        assert_eq!(s.vsize, 123456789);
        assert_eq!(s.rss_pages, 42);
        assert!(parse_stat("garbage").is_none());
        assert!(parse_stat("1 (x) S 1 2").is_none());
    }

    #[test]
    fn own_process_reads() {
        let s = ProcStat::read().expect("/proc/self/stat");
        assert!(s.rss_pages > 0 && s.vsize > 0);
        assert!(boot_time().is_some_and(|b| b > 1_000_000_000));
        assert!(max_fds().is_some_and(|m| m > 0));
    }
}
