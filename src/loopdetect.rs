//! Loop detection, as CoreDNS's `loop` plugin does it.
//!
//! At start (and after a reload, for the zones it changed) every forwarded zone gets one probe:
//! `<random>.<random>.<zone> HINFO`, sent to the zone's servers through the normal forwarding
//! path. An upstream that forwards the zone back to nodedns delivers the probe to nodedns's own
//! listener, which forwards it again, and so on. The miss path ([`crate::server::Ctx::resolve_miss`])
//! looks every miss up in the few probe names being watched ([`Probes`]; nothing on the hit path: a
//! probe name is never cached); the third copy that comes in (CoreDNS: "seen more than twice") is
//! a loop. The zone is then blocked ([`crate::upstream::Upstreams::block_loop`]: SERVFAIL without
//! any upstream query), the copies in flight are answered SERVFAIL at once, and the loop unwinds.
//!
//! Copies of a probe name bypass the miss coalescing (each is forwarded): coalesced, the second
//! copy would wait for the first, which waits for it, and the loop would stall rather than show.
//! That is bounded: the third copy is never forwarded.
//!
//! The check of a zone ends at the first reply to its probe (any rcode: the authority answered),
//! when the loop is found, or after [`CHECK_WINDOW`]; a probe that got no reply is sent again every
//! [`RETRY_EVERY`] within the window. Then the name is no longer watched.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::admin::AdminState;
use crate::config::model::Zone;
use crate::metrics::Metrics;
use crate::server::Ctx;

/// Copies of a probe that may come in before it is a loop (CoreDNS: `seen() > 2`).
pub const SEEN_LIMIT: u32 = 2;
/// How long one zone's check may take in all.
pub const CHECK_WINDOW: Duration = Duration::from_secs(10);
/// Pause before a probe that got no reply is sent again (CoreDNS: 1 s).
pub const RETRY_EVERY: Duration = Duration::from_secs(1);
/// HINFO, the probe's type (CoreDNS's).
pub const TYPE_HINFO: u16 = 13;

/// What the miss path makes of a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sighting {
    /// Not a probe name being watched: the normal miss path.
    NotProbe,
    /// A copy of a probe, below the limit: forward it (not coalesced, not cached).
    Forward,
    /// A loop: block this zone (lowercased wire format) and answer SERVFAIL.
    Loop(Vec<u8>),
}

struct Probe {
    /// Lowercased wire format.
    name: Vec<u8>,
    zone: Vec<u8>,
    seen: u32,
}

/// The probe names being watched; at most one per zone, and only while its check runs.
pub struct Probes {
    /// How many names are watched: a miss with none watched takes no lock.
    watching: AtomicUsize,
    names: Mutex<Vec<Probe>>,
    /// Bumped on every loop found, so a check waiting for its probe's reply learns at once.
    found: watch::Sender<u64>,
}

impl Default for Probes {
    fn default() -> Self {
        Probes {
            watching: AtomicUsize::new(0),
            names: Mutex::new(Vec::new()),
            found: watch::channel(0).0,
        }
    }
}

/// `<random>.<random>.<zone>` in lowercased wire format, or `None` when the zone's name leaves no
/// room for it (255 bytes).
pub fn probe_name(zone: &[u8]) -> Option<Vec<u8>> {
    let mut name = Vec::with_capacity(zone.len() + 42);
    for _ in 0..2 {
        let label = rand::random::<u64>().to_string();
        name.push(label.len() as u8);
        name.extend_from_slice(label.as_bytes());
    }
    name.extend_from_slice(zone);
    (name.len() <= 255).then_some(name)
}

/// A query for `name` (wire format) of type HINFO, class IN, RD=1, without EDNS.
pub fn probe_query(name: &[u8]) -> Vec<u8> {
    let id: u16 = rand::random();
    let mut q = Vec::with_capacity(name.len() + 16);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    q.extend_from_slice(name);
    q.extend_from_slice(&TYPE_HINFO.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes());
    q
}

impl Probes {
    /// Watches `name` (a probe for `zone`; both lowercased wire format).
    pub fn watch(&self, name: Vec<u8>, zone: Vec<u8>) {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        names.push(Probe {
            name,
            zone,
            seen: 0,
        });
        self.watching.store(names.len(), Ordering::Release);
    }

    /// Stops watching `name`.
    pub fn unwatch(&self, name: &[u8]) {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        names.retain(|p| p.name != name);
        self.watching.store(names.len(), Ordering::Release);
    }

    /// Whether any name is watched (one relaxed load; the miss path asks this first).
    #[inline]
    pub fn any(&self) -> bool {
        self.watching.load(Ordering::Acquire) != 0
    }

    /// Counts a miss for `qname` (lowercased wire format) of type `qtype` if it is a probe name.
    pub fn sighting(&self, qname: &[u8], qtype: u16) -> Sighting {
        if qtype != TYPE_HINFO || !self.any() {
            return Sighting::NotProbe;
        }
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        let Some(p) = names.iter_mut().find(|p| p.name == qname) else {
            return Sighting::NotProbe;
        };
        p.seen = p.seen.saturating_add(1);
        if p.seen <= SEEN_LIMIT {
            return Sighting::Forward;
        }
        let zone = p.zone.clone();
        drop(names);
        self.found.send_modify(|n| *n = n.wrapping_add(1));
        Sighting::Loop(zone)
    }

    /// Whether the probe `name` has been seen more than [`SEEN_LIMIT`] times.
    pub fn looped(&self, name: &[u8]) -> bool {
        let names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        names.iter().any(|p| p.name == name && p.seen > SEEN_LIMIT)
    }

    /// Told whenever a loop is found (any zone).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.found.subscribe()
    }
}

/// A zone found looping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Presentation form (`cluster.local`, `.`).
    pub zone: String,
    pub servers: Vec<SocketAddr>,
}

impl Found {
    /// The `/ready` text: `loop detected: zone Z via S[, S...]`.
    pub fn problem(&self) -> String {
        let via: Vec<String> = self.servers.iter().map(|s| s.to_string()).collect();
        format!("loop detected: zone {} via {}", self.zone, via.join(", "))
    }
}

/// How one zone's check ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// The probe was answered without coming back: no loop.
    Fine,
    /// The probe came back more than [`SEEN_LIMIT`] times; the zone is blocked.
    Loop(Found),
    /// No reply within [`CHECK_WINDOW`] (the servers are down): nothing known.
    NoReply,
    /// Not checked: not forwarded (`except`), or no room for a probe name.
    Skipped,
}

/// Checks zone `zone` (presentation form) of the current forwarding generation: sends its probe
/// until it is answered, found looping, or the window ends (see the module docs). Bounded: at most
/// [`CHECK_WINDOW`] plus one query deadline.
pub async fn check_zone(ctx: &Ctx, zone: &str) -> Checked {
    let Ok(zone_wire) = crate::wire::name_from_str(zone) else {
        return Checked::Skipped;
    };
    if ctx
        .upstreams()
        .zone_servers(&zone_wire)
        .is_none_or(|s| s.is_empty())
    {
        return Checked::Skipped;
    }
    let Some(name) = probe_name(&zone_wire) else {
        return Checked::Skipped;
    };
    let mut found = ctx.probes.subscribe();
    ctx.probes.watch(name.clone(), zone_wire.clone());
    let until = tokio::time::Instant::now() + CHECK_WINDOW;
    let result = loop {
        let upstreams = ctx.upstreams();
        let query = probe_query(&name);
        let Ok(view) = crate::wire::scan_query(&query) else {
            break Checked::Skipped;
        };
        let answered = tokio::select! {
            // Any reply ends the check (as CoreDNS's loop plugin counts it).
            r = upstreams.resolve(&view, |_, _, _| Ok::<(), std::convert::Infallible>(())) => r.is_ok(),
            _ = wait_for_loop(&mut found, &ctx.probes, &name) => false,
            _ = tokio::time::sleep_until(until) => false,
        };
        if ctx.probes.looped(&name) {
            // Blocked here too, not only by the miss path that saw the copy: that path marks the
            // sighting before it blocks the zone, and the report read the block in between
            // (`/ready` then stayed 200 with the loop found).
            let servers = upstreams.block_loop(&zone_wire).unwrap_or_default();
            break Checked::Loop(Found {
                zone: zone.to_string(),
                servers,
            });
        }
        if answered {
            break Checked::Fine;
        }
        if tokio::time::Instant::now() + RETRY_EVERY >= until {
            break Checked::NoReply;
        }
        tokio::time::sleep(RETRY_EVERY).await;
    };
    ctx.probes.unwatch(&name);
    result
}

/// Resolves once probe `name` is found looping.
async fn wait_for_loop(rx: &mut watch::Receiver<u64>, probes: &Probes, name: &[u8]) {
    loop {
        if probes.looped(name) {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Where loop checks report: the gauge, `/ready`, the log, and for `fatal` the reason to exit.
pub struct Report {
    pub metrics: Arc<Metrics>,
    pub admin: Arc<AdminState>,
    /// With `exit_on_loop` (`loop fatal`), the first loop found is sent here and the process
    /// exits with it.
    pub fatal: mpsc::Sender<String>,
    /// `loop fatal` (a reload may change it).
    pub exit_on_loop: AtomicBool,
}

impl Report {
    /// Records how `zone`'s check ended (once per zone and check).
    pub fn record(&self, ctx: &Ctx, zone: &str, checked: &Checked) {
        match checked {
            Checked::Fine => {
                self.metrics.set_loop_detected(zone, false);
                tracing::debug!(zone, "loop check: no loop");
            }
            Checked::NoReply => {
                self.metrics.set_loop_detected(zone, false);
                tracing::info!(
                    zone,
                    "loop check: no reply from the zone's servers within {CHECK_WINDOW:?}; no loop seen"
                );
            }
            Checked::Skipped => {}
            Checked::Loop(f) => {
                self.metrics.set_loop_detected(zone, true);
                tracing::warn!(
                    zone,
                    servers = ?f.servers,
                    "{}: the zone's upstreams send nodedns's probe back to it (CoreDNS's `loop`); \
                     the zone is no longer forwarded (SERVFAIL) and /ready reports 503",
                    f.problem()
                );
                if self.exit_on_loop.load(Ordering::Relaxed) {
                    let _ = self.fatal.try_send(f.problem());
                }
            }
        }
        self.refresh(ctx);
    }

    /// Sets `/ready`'s loop problems from the zones the current generation blocks.
    pub fn refresh(&self, ctx: &Ctx) {
        let problems = ctx
            .upstreams()
            .looped_zones()
            .into_iter()
            .map(|(zone, servers)| Found { zone, servers }.problem())
            .collect();
        self.admin.set_loop_problems(problems);
    }
}

/// Checks `zones` (presentation form) at once, each reported as it ends; returns when all have.
pub async fn check_all(ctx: Arc<Ctx>, zones: Vec<String>, report: Arc<Report>) {
    let checks = zones.iter().map(|z| {
        let (ctx, report) = (&ctx, &report);
        async move {
            let c = check_zone(ctx, z).await;
            report.record(ctx, z, &c);
        }
    });
    futures_util::future::join_all(checks).await;
}

/// The zones of `zones` that forward (the later of a name given twice), in order.
pub fn forwarded_zones(zones: &[Zone]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (i, z) in zones.iter().enumerate() {
        let later = zones[i + 1..].iter().any(|l| l.name == z.name);
        if !later && !z.servers.is_empty() && !out.contains(&z.name) {
            out.push(z.name.clone());
        }
    }
    out
}

/// The forwarded zones of `new` that `old` does not have with the same servers (a reload checks
/// these again).
pub fn changed_zones(old: &[Zone], new: &[Zone]) -> Vec<String> {
    let servers_of = |zones: &[Zone], name: &str| {
        zones
            .iter()
            .rev()
            .find(|z| z.name == name)
            .map(|z| z.servers.clone())
    };
    forwarded_zones(new)
        .into_iter()
        .filter(|n| servers_of(old, n) != servers_of(new, n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire;

    #[test]
    fn a_probe_name_is_two_random_labels_under_its_zone() {
        let zone = wire::name_from_str("cluster.local").unwrap();
        let a = probe_name(&zone).unwrap();
        let b = probe_name(&zone).unwrap();
        assert_ne!(a, b);
        assert!(a.ends_with(&zone));
        let s = wire::name_to_string(&a);
        assert_eq!(s.matches('.').count(), 4, "{s}");
        assert!(probe_name(&wire::name_from_str(".").unwrap()).is_some());
        // No room under a 250-byte zone.
        let long = [vec![62u8], vec![b'a'; 62]].concat().repeat(4);
        let long = [long, vec![0]].concat();
        assert!(probe_name(&long).is_none());
        // The query scans as a HINFO question for the name.
        let q = probe_query(&a);
        let v = wire::scan_query(&q).unwrap();
        assert_eq!(v.key.name(), a.as_slice());
        assert_eq!(v.key.qtype, TYPE_HINFO);
    }

    #[test]
    fn the_third_copy_of_a_probe_is_a_loop_and_other_names_are_not_probes() {
        let p = Probes::default();
        let zone = wire::name_from_str("example.org").unwrap();
        let name = probe_name(&zone).unwrap();
        assert!(!p.any());
        assert_eq!(p.sighting(&name, TYPE_HINFO), Sighting::NotProbe);
        p.watch(name.clone(), zone.clone());
        assert!(p.any());
        let rx = p.subscribe();
        // Another name, or the probe name with another type, is no probe.
        let other = probe_name(&zone).unwrap();
        assert_eq!(p.sighting(&other, TYPE_HINFO), Sighting::NotProbe);
        assert_eq!(p.sighting(&name, 1), Sighting::NotProbe);
        assert_eq!(p.sighting(&name, TYPE_HINFO), Sighting::Forward);
        assert_eq!(p.sighting(&name, TYPE_HINFO), Sighting::Forward);
        assert!(!p.looped(&name));
        assert!(!rx.has_changed().unwrap());
        assert_eq!(p.sighting(&name, TYPE_HINFO), Sighting::Loop(zone.clone()));
        assert!(p.looped(&name));
        assert!(rx.has_changed().unwrap());
        // Every later copy too (the zone is blocked, so each is answered at once).
        assert_eq!(p.sighting(&name, TYPE_HINFO), Sighting::Loop(zone));
        p.unwatch(&name);
        assert!(!p.any());
        assert_eq!(p.sighting(&name, TYPE_HINFO), Sighting::NotProbe);
    }

    #[test]
    fn the_ready_text_names_zone_and_servers() {
        let f = Found {
            zone: "cluster.local".into(),
            servers: vec![
                "10.0.0.10:53".parse().unwrap(),
                "[fd00::1]:53".parse().unwrap(),
            ],
        };
        assert_eq!(
            f.problem(),
            "loop detected: zone cluster.local via 10.0.0.10:53, [fd00::1]:53"
        );
    }
}
