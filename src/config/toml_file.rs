//! nodedns's own configuration file, TOML: the same [`Model`] as a Corefile, with names that say
//! what they do and no plugin order to get wrong. Unknown keys are errors (a typo must not be a
//! silently ignored setting), and every error has its line.
//!
//! The addon's default setup (`testdata/addon-default.toml`, the same model as the addon's
//! ConfigMap rendered on 169.254.20.10):
//!
//! ```toml
//! listen = ["169.254.20.10:53"]        # optional; default: the flags' --listen
//! # port = 53                          # optional; with the flags' listen IPs, when no `listen`
//! reload = "30s"                        # optional: poll interval of the files
//! log_queries = false
//! loop_detect = "on"                   # off (default) | on | fatal; true = on, false = off
//! metrics = "0.0.0.0:9253"              # optional
//! # ready = "0.0.0.0:8181"              # optional
//! # cache_file = "/var/lib/nodedns/cache.bin"  # optional: warm restart (--cache-file)
//! # cache_file_interval = "60s"         # optional, at least 1s (--cache-file-interval)
//!
//! [health]                              # optional
//! addr = "169.254.20.10:8080"
//! lameduck = "0s"
//!
//! [[zone]]
//! name = "cluster.local"                # or names = ["in-addr.arpa", "ip6.arpa"]
//! servers = ["service:kube-dns-upstream"]
//! transport = "tcp"                     # udp | prefer_udp | tcp (default prefer_udp)
//! policy = "random"                     # random | round_robin | sequential | fastest (default random)
//! # max_fails = 2, health_check = "500ms", expire = "10s", max_concurrent = 1000
//! # except = ["private.cluster.local"]  # extra zones with no servers: SERVFAIL
//! [zone.cache]                          # absent: no caching; present: CoreDNS's defaults
//! max_ttl = "30s"
//! max_negative_ttl = "5s"
//! # min_ttl = "5s", min_negative_ttl = "5s", servfail_ttl = "5s"
//! # success = 9984, denial = 9984, disable = ["denial"]
//! # prefetch = { amount = 1, duration = "1m", percent = 10 }
//! # serve_stale = { duration = "1h", mode = "immediate" }
//!
//! [[zone]]
//! names = ["in-addr.arpa", "ip6.arpa"]
//! servers = ["service:kube-dns-upstream"]
//! transport = "tcp"
//! [zone.cache]
//! max_ttl = "30s"
//! max_negative_ttl = "30s"
//!
//! [[zone]]
//! name = "."
//! servers = ["/etc/resolv.conf"]
//! [zone.cache]
//! max_ttl = "30s"
//! max_negative_ttl = "30s"
//! ```
//!
//! Servers are `IP`, `IP:PORT`, `[v6]:PORT`, `service:NAME` (the kubelet's
//! `NAME_SERVICE_HOST`/`_SERVICE_PORT` variables, as node-cache's `-upstreamsvc`) or a
//! resolv.conf path (starting with `/` or `.`). `servers = []` means the zone is not forwarded
//! (what `except` creates, and how [`to_toml`] prints such zones). Durations are `30`, `500ms`,
//! `5s`, `1m`, `1h` or Go's `1m30s`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::common::{self, MAX_UPSTREAMS};
use super::model::{
    CacheFile, CachePolicy, ForwardOptions, Health, LoopDetect, Model, ModelError, Origin, Policy,
    Prefetch, ServeStale, Sources, Transport, Zone, normalize_zone,
};
use crate::config::service_env_prefix;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileT {
    listen: Option<Vec<Spanned<String>>>,
    port: Option<u16>,
    reload: Option<Spanned<String>>,
    #[serde(default)]
    log_queries: bool,
    loop_detect: Option<Spanned<LoopT>>,
    health: Option<HealthT>,
    metrics: Option<Spanned<String>>,
    ready: Option<Spanned<String>>,
    cache_file: Option<Spanned<String>>,
    cache_file_interval: Option<Spanned<String>>,
    #[serde(default)]
    zone: Vec<ZoneT>,
}

/// `loop_detect`: a boolean or `"off"`, `"on"`, `"fatal"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum LoopT {
    Bool(bool),
    Word(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthT {
    addr: Spanned<String>,
    lameduck: Option<Spanned<String>>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum TransportT {
    Udp,
    PreferUdp,
    Tcp,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum PolicyT {
    Random,
    RoundRobin,
    Sequential,
    Fastest,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ZoneT {
    name: Option<Spanned<String>>,
    names: Option<Vec<Spanned<String>>>,
    servers: Spanned<Vec<Spanned<String>>>,
    transport: Option<TransportT>,
    policy: Option<PolicyT>,
    max_fails: Option<u32>,
    health_check: Option<Spanned<String>>,
    expire: Option<Spanned<String>>,
    max_concurrent: Option<Spanned<usize>>,
    except: Option<Vec<Spanned<String>>>,
    cache: Option<CacheT>,
}

#[derive(Deserialize, Clone, Copy, PartialEq)]
#[serde(rename_all = "snake_case")]
enum DisableT {
    Success,
    Denial,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheT {
    max_ttl: Option<Spanned<String>>,
    min_ttl: Option<Spanned<String>>,
    max_negative_ttl: Option<Spanned<String>>,
    min_negative_ttl: Option<Spanned<String>>,
    servfail_ttl: Option<Spanned<String>>,
    success: Option<Spanned<usize>>,
    denial: Option<Spanned<usize>>,
    #[serde(default)]
    disable: Vec<DisableT>,
    prefetch: Option<Spanned<PrefetchT>>,
    serve_stale: Option<ServeStaleT>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PrefetchT {
    amount: u32,
    duration: Option<Spanned<String>>,
    percent: Option<u8>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum ModeT {
    Immediate,
    Verify,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServeStaleT {
    duration: Option<Spanned<String>>,
    mode: Option<ModeT>,
}

/// Reads the TOML file. `file` names it in errors; resolv.conf files among the servers are read
/// through `src` and listed in [`Model::inputs`] (the file itself is the caller's to add).
pub fn parse(text: &str, file: &str, src: &dyn Sources) -> Result<Model, ModelError> {
    let f: FileT = toml::from_str(text).map_err(|e| {
        let line = e.span().map_or(0, |s| common::line_of(text, s.start));
        ModelError::new(Origin::at(file, line), e.message().trim().to_string())
    })?;
    let r = Reader {
        text,
        file,
        src,
        inputs: Vec::new(),
    };
    r.model(f)
}

struct Reader<'a> {
    text: &'a str,
    file: &'a str,
    src: &'a dyn Sources,
    inputs: Vec<PathBuf>,
}

impl Reader<'_> {
    fn at(&self, span: Range<usize>) -> Origin {
        Origin::at(self.file, common::line_of(self.text, span.start))
    }

    fn err(&self, span: Range<usize>, reason: impl Into<String>) -> ModelError {
        ModelError::new(self.at(span), reason)
    }

    fn duration(&self, s: &Spanned<String>, what: &str) -> Result<Duration, ModelError> {
        common::duration(s.get_ref()).map_err(|e| self.err(s.span(), format!("{what}: {e}")))
    }

    fn addr(&self, s: &Spanned<String>, what: &str) -> Result<SocketAddr, ModelError> {
        common::listen_addr(s.get_ref()).map_err(|e| self.err(s.span(), format!("{what}: {e}")))
    }

    fn model(mut self, f: FileT) -> Result<Model, ModelError> {
        let mut listen = Vec::new();
        for s in f.listen.iter().flatten() {
            let a = self.addr(s, "listen")?;
            if a.port() == 0 {
                return Err(self.err(s.span(), "listen: port 0"));
            }
            if !listen.contains(&a) {
                listen.push(a);
            }
        }
        let reload = match &f.reload {
            Some(r) => {
                let d = self.duration(r, "reload")?;
                if d < Duration::from_secs(2) {
                    return Err(self.err(r.span(), "reload must be at least 2s"));
                }
                Some(d)
            }
            None => None,
        };
        let health = match &f.health {
            Some(h) => Some(Health {
                addr: self.addr(&h.addr, "health addr")?,
                lameduck: match &h.lameduck {
                    Some(l) => self.duration(l, "health lameduck")?,
                    None => Duration::ZERO,
                },
            }),
            None => None,
        };
        let metrics = f
            .metrics
            .as_ref()
            .map(|m| self.addr(m, "metrics"))
            .transpose()?;
        let ready = f
            .ready
            .as_ref()
            .map(|m| self.addr(m, "ready"))
            .transpose()?;
        let loop_detect = match &f.loop_detect {
            None => LoopDetect::Off,
            Some(l) => match l.get_ref() {
                LoopT::Bool(true) => LoopDetect::On,
                LoopT::Bool(false) => LoopDetect::Off,
                LoopT::Word(w) => w
                    .parse()
                    .map_err(|e| self.err(l.span(), format!("loop_detect: {e}")))?,
            },
        };
        let cache_file = self.cache_file(&f)?;
        let mut zones: Vec<Zone> = Vec::new();
        let mut seen: HashMap<String, usize> = HashMap::new();
        for z in &f.zone {
            for zone in self.zone(z)? {
                let line = zone.origin.line;
                if let Some(prev) = seen.get(&zone.name) {
                    return Err(ModelError::new(
                        zone.origin.clone(),
                        format!(
                            "zone {} is defined twice (lines {prev} and {line})",
                            zone.name
                        ),
                    ));
                }
                seen.insert(zone.name.clone(), line);
                zones.push(zone);
            }
        }
        if zones.is_empty() {
            return Err(ModelError::new(
                Origin::at(self.file, 1),
                "no [[zone]] tables",
            ));
        }
        Ok(Model {
            listen,
            port: f.port.filter(|p| *p != 0),
            zones,
            health,
            ready,
            metrics,
            reload,
            log_queries: f.log_queries,
            loop_detect,
            cache_file,
            inputs: self.inputs,
        })
    }

    /// `cache_file` and `cache_file_interval` (the flags' names).
    fn cache_file(&self, f: &FileT) -> Result<Option<CacheFile>, ModelError> {
        let interval = match &f.cache_file_interval {
            Some(i) => {
                let d = self.duration(i, "cache_file_interval")?;
                if d < Duration::from_secs(1) {
                    return Err(self.err(i.span(), "cache_file_interval must be at least 1s"));
                }
                Some(d)
            }
            None => None,
        };
        match &f.cache_file {
            Some(p) if p.get_ref().trim().is_empty() => {
                Err(self.err(p.span(), "cache_file: the path is empty"))
            }
            Some(p) if p.get_ref().chars().any(char::is_control) => {
                Err(self.err(p.span(), "cache_file: control character in the path"))
            }
            Some(p) => Ok(Some(CacheFile {
                path: PathBuf::from(p.get_ref()),
                interval,
            })),
            None => match &f.cache_file_interval {
                Some(i) => Err(self.err(i.span(), "cache_file_interval without cache_file")),
                None => Ok(None),
            },
        }
    }

    fn server(&mut self, s: &Spanned<String>, out: &mut Vec<SocketAddr>) -> Result<(), ModelError> {
        let raw = s.get_ref().trim();
        let found = if let Some(svc) = raw.strip_prefix("service:") {
            vec![self.service(svc).map_err(|e| self.err(s.span(), e))?]
        } else if raw.starts_with('/') || raw.starts_with('.') {
            let at = self.at(s.span());
            common::read_resolv_conf(raw, &at, self.src, &mut self.inputs)?
        } else {
            vec![common::server(raw).map_err(|e| self.err(s.span(), e))?]
        };
        for a in found {
            if !out.contains(&a) {
                out.push(a);
            }
        }
        Ok(())
    }

    /// `service:NAME`: the kubelet's variables for the service, port 53 unless
    /// `NAME_SERVICE_PORT` says otherwise.
    fn service(&self, svc: &str) -> Result<SocketAddr, String> {
        let prefix = service_env_prefix(svc.trim());
        let host_var = format!("{prefix}_SERVICE_HOST");
        let host = self
            .src
            .env(&host_var)
            .filter(|h| !h.trim().is_empty())
            .ok_or_else(|| format!("service:{svc}: environment variable {host_var} is not set"))?;
        let ip: IpAddr = host
            .trim()
            .parse()
            .map_err(|_| format!("service:{svc}: {host_var}={host:?} is not an IP address"))?;
        let port_var = format!("{prefix}_SERVICE_PORT");
        let port = match self.src.env(&port_var).filter(|p| !p.trim().is_empty()) {
            Some(p) => p
                .trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("service:{svc}: {port_var}={p:?} is not a port"))?,
            None => 53,
        };
        Ok(SocketAddr::new(ip, port))
    }

    fn zone(&mut self, z: &ZoneT) -> Result<Vec<Zone>, ModelError> {
        let names: Vec<&Spanned<String>> = match (&z.name, &z.names) {
            (Some(n), None) => vec![n],
            (None, Some(ns)) if !ns.is_empty() => ns.iter().collect(),
            (None, Some(_)) => {
                return Err(self.err(z.servers.span(), "zone: names is empty"));
            }
            (Some(n), Some(_)) => {
                return Err(self.err(n.span(), "zone: give name or names, not both"));
            }
            (None, None) => {
                return Err(self.err(z.servers.span(), "zone: name or names is missing"));
            }
        };
        let mut servers = Vec::new();
        for s in z.servers.get_ref() {
            self.server(s, &mut servers)?;
        }
        if servers.len() > MAX_UPSTREAMS {
            return Err(self.err(
                z.servers.span(),
                format!("{} servers, at most {MAX_UPSTREAMS}", servers.len()),
            ));
        }
        let mut forward = ForwardOptions::default();
        if let Some(n) = z.max_fails {
            forward.max_fails = n;
        }
        if let Some(h) = &z.health_check {
            forward.health_check = self.positive(h, "health_check")?;
        }
        if let Some(e) = &z.expire {
            forward.expire = self.positive(e, "expire")?;
        }
        if let Some(m) = &z.max_concurrent {
            if *m.get_ref() == 0 {
                return Err(self.err(m.span(), "max_concurrent must be above zero"));
            }
            forward.max_concurrent = Some(*m.get_ref());
        }
        let cache = match &z.cache {
            Some(c) => self.cache(c)?,
            None => CachePolicy::OFF,
        };
        let transport = match z.transport.unwrap_or(TransportT::PreferUdp) {
            TransportT::Udp => Transport::Udp,
            TransportT::PreferUdp => Transport::PreferUdp,
            TransportT::Tcp => Transport::Tcp,
        };
        let policy = match z.policy.unwrap_or(PolicyT::Random) {
            PolicyT::Random => Policy::Random,
            PolicyT::RoundRobin => Policy::RoundRobin,
            PolicyT::Sequential => Policy::Sequential,
            PolicyT::Fastest => Policy::Fastest,
        };
        let make = |name: String, servers: Vec<SocketAddr>, origin: Origin| Zone {
            name,
            servers,
            transport,
            policy,
            forward,
            cache,
            origin,
        };
        let mut out = Vec::new();
        for n in &names {
            let name = normalize_zone(n.get_ref()).map_err(|e| self.err(n.span(), e))?;
            out.push(make(name, servers.clone(), self.at(n.span())));
        }
        let block: Vec<String> = out.iter().map(|z| z.name.clone()).collect();
        for e in z.except.iter().flatten() {
            let name = normalize_zone(e.get_ref()).map_err(|er| self.err(e.span(), er))?;
            if block.contains(&name) || !block.iter().any(|b| common::is_within(&name, b)) {
                return Err(self.err(
                    e.span(),
                    format!("except {name}: not a name below the zone"),
                ));
            }
            out.push(make(name, Vec::new(), self.at(e.span())));
        }
        Ok(out)
    }

    fn positive(&self, s: &Spanned<String>, what: &str) -> Result<Duration, ModelError> {
        let d = self.duration(s, what)?;
        if d.is_zero() {
            return Err(self.err(s.span(), format!("{what} must be above zero")));
        }
        Ok(d)
    }

    fn capacity(&self, s: &Spanned<usize>, what: &str) -> Result<usize, ModelError> {
        let n = *s.get_ref();
        if n == 0 || n > 100_000_000 {
            return Err(self.err(
                s.span(),
                format!("cache {what} {n} is out of range (1 to 100000000)"),
            ));
        }
        Ok(n)
    }

    fn cache(&self, c: &CacheT) -> Result<CachePolicy, ModelError> {
        let mut p = CachePolicy::COREDNS;
        if let Some(v) = &c.max_ttl {
            p.max_ttl = self.positive(v, "cache max_ttl")?;
        }
        if let Some(v) = &c.max_negative_ttl {
            p.max_negative_ttl = self.positive(v, "cache max_negative_ttl")?;
        }
        // A default floor above an explicit cap is the cap (as in a Corefile); an explicit one
        // is a contradiction.
        p.min_ttl = p.min_ttl.min(p.max_ttl);
        p.min_negative_ttl = p.min_negative_ttl.min(p.max_negative_ttl);
        if let Some(v) = &c.min_ttl {
            p.min_ttl = self.duration(v, "cache min_ttl")?;
            if p.min_ttl > p.max_ttl {
                return Err(self.err(v.span(), "cache min_ttl is above max_ttl"));
            }
        }
        if let Some(v) = &c.min_negative_ttl {
            p.min_negative_ttl = self.duration(v, "cache min_negative_ttl")?;
            if p.min_negative_ttl > p.max_negative_ttl {
                return Err(self.err(v.span(), "cache min_negative_ttl is above max_negative_ttl"));
            }
        }
        if let Some(v) = &c.servfail_ttl {
            p.servfail_ttl = self.duration(v, "cache servfail_ttl")?;
            if p.servfail_ttl > Duration::from_secs(300) {
                return Err(self.err(v.span(), "cache servfail_ttl is at most 5m"));
            }
        }
        if let Some(v) = &c.success {
            p.success_capacity = self.capacity(v, "success")?;
        }
        if let Some(v) = &c.denial {
            p.denial_capacity = self.capacity(v, "denial")?;
        }
        p.success = !c.disable.contains(&DisableT::Success);
        p.denial = !c.disable.contains(&DisableT::Denial);
        if let Some(pf) = &c.prefetch {
            let span = pf.span();
            let pf = pf.get_ref();
            if pf.amount == 0 {
                return Err(self.err(span, "cache prefetch amount must be above zero"));
            }
            let percent = pf.percent.unwrap_or(10);
            if !(10..=90).contains(&percent) {
                return Err(self.err(span, "cache prefetch percent must be 10 to 90"));
            }
            p.prefetch = Some(Prefetch {
                amount: pf.amount,
                duration: match &pf.duration {
                    Some(d) => self.positive(d, "cache prefetch duration")?,
                    None => Duration::from_secs(60),
                },
                percent,
            });
        }
        if let Some(s) = &c.serve_stale {
            p.serve_stale = Some(ServeStale {
                duration: match &s.duration {
                    Some(d) => self.duration(d, "cache serve_stale duration")?,
                    None => Duration::from_secs(3600),
                },
                verify: matches!(s.mode, Some(ModeT::Verify)),
            });
        }
        Ok(p)
    }
}

/// Prints a model as this format, every setting spelled out (for `check-config`): what nodedns
/// will do, whatever file it came from. [`parse`] reads it back to the same model (origins and
/// inputs aside; servers are printed as the addresses they resolved to).
pub fn to_toml(m: &Model) -> String {
    let mut o = String::new();
    let q = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    let d = |d: Duration| q(&common::format_duration(d));
    let list = |v: Vec<String>| format!("[{}]", v.join(", "));
    if !m.listen.is_empty() {
        o += &format!(
            "listen = {}\n",
            list(m.listen.iter().map(|a| q(&a.to_string())).collect())
        );
    }
    if let Some(p) = m.port {
        o += &format!("port = {p}\n");
    }
    if let Some(r) = m.reload {
        o += &format!("reload = {}\n", d(r));
    }
    o += &format!("log_queries = {}\n", m.log_queries);
    o += &format!("loop_detect = {}\n", q(m.loop_detect.as_str()));
    if let Some(a) = m.metrics {
        o += &format!("metrics = {}\n", q(&a.to_string()));
    }
    if let Some(a) = m.ready {
        o += &format!("ready = {}\n", q(&a.to_string()));
    }
    if let Some(c) = &m.cache_file {
        o += &format!("cache_file = {}\n", q(&c.path.display().to_string()));
        if let Some(i) = c.interval {
            o += &format!("cache_file_interval = {}\n", d(i));
        }
    }
    if let Some(h) = m.health {
        o += &format!(
            "\n[health]\naddr = {}\nlameduck = {}\n",
            q(&h.addr.to_string()),
            d(h.lameduck)
        );
    }
    for z in &m.zones {
        o += &format!("\n[[zone]]\nname = {}\n", q(&z.name));
        o += &format!(
            "servers = {}\n",
            list(z.servers.iter().map(|a| q(&a.to_string())).collect())
        );
        let transport = match z.transport {
            Transport::Udp => "udp",
            Transport::PreferUdp => "prefer_udp",
            Transport::Tcp => "tcp",
        };
        let policy = match z.policy {
            Policy::Random => "random",
            Policy::RoundRobin => "round_robin",
            Policy::Sequential => "sequential",
            Policy::Fastest => "fastest",
        };
        o += &format!("transport = {}\npolicy = {}\n", q(transport), q(policy));
        let f = &z.forward;
        o += &format!(
            "max_fails = {}\nhealth_check = {}\nexpire = {}\n",
            f.max_fails,
            d(f.health_check),
            d(f.expire)
        );
        if let Some(n) = f.max_concurrent {
            o += &format!("max_concurrent = {n}\n");
        }
        let c = &z.cache;
        if *c == CachePolicy::OFF {
            continue;
        }
        o += &format!(
            "[zone.cache]\nmax_ttl = {}\nmin_ttl = {}\nmax_negative_ttl = {}\nmin_negative_ttl = {}\nservfail_ttl = {}\nsuccess = {}\ndenial = {}\n",
            d(c.max_ttl),
            d(c.min_ttl),
            d(c.max_negative_ttl),
            d(c.min_negative_ttl),
            d(c.servfail_ttl),
            c.success_capacity,
            c.denial_capacity
        );
        let mut disable = Vec::new();
        if !c.success {
            disable.push(q("success"));
        }
        if !c.denial {
            disable.push(q("denial"));
        }
        if !disable.is_empty() {
            o += &format!("disable = {}\n", list(disable));
        }
        if let Some(p) = c.prefetch {
            o += &format!(
                "prefetch = {{ amount = {}, duration = {}, percent = {} }}\n",
                p.amount,
                d(p.duration),
                p.percent
            );
        }
        if let Some(s) = c.serve_stale {
            let mode = if s.verify { "verify" } else { "immediate" };
            o += &format!(
                "serve_stale = {{ duration = {}, mode = {} }}\n",
                d(s.duration),
                q(mode)
            );
        }
    }
    o
}

#[cfg(test)]
mod tests;
