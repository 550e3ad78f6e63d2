//! Hot reload: SIGHUP, SIGUSR1 (the addon's `-reloadwithsignal`) and a poll of the configuration's
//! input files rebuild the configuration and swap it in while serving.
//!
//! The poll hashes file *contents* (a ConfigMap volume changes through a `..data` symlink swap, which a
//! watch on the file itself misses) every `--reload-interval`, and reloads only when the hash moved,
//! so a kubelet rewriting the same content costs nothing. A reload builds the whole new
//! [`Config`] first; only a configuration that validates is applied, else one log line names the
//! error and the old one keeps serving. What is applied without a restart: zones, servers,
//! transports, TTL policies, cache limits, `max_concurrent`, the query log. What needs a restart
//! (listen addresses, interface, firewall, HTTP endpoints, worker counts) is refused whole, with
//! one line saying so: never half applied.
//!
//! The data path never waits for a reload: a miss takes the forwarding generation it starts with
//! (`Ctx::upstreams`), so queries in flight finish on the old one, and hits read no configuration.
//! The cache is kept; only entries the new policy forbids are dropped (a zone that no longer
//! caches a kind, a lowered TTL cap, a name no zone routes any more).

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

use crate::config::Config;
use crate::metrics::{Metrics, ReloadResult};
use crate::server::Ctx;
use crate::upstream::{Observer, Upstreams};

/// SIGHUP and SIGUSR1 streams.
pub type Signals = (tokio::signal::unix::Signal, tokio::signal::unix::Signal);

/// Installs the SIGHUP and SIGUSR1 handlers. Done first thing at start: until then these signals
/// would kill the process with their default action.
pub fn reload_signals() -> std::io::Result<Signals> {
    use tokio::signal::unix::{SignalKind, signal};
    Ok((
        signal(SignalKind::hangup())?,
        signal(SignalKind::user_defined1())?,
    ))
}

/// Builds a fresh configuration from the same flags, re-reading every input.
pub type Rebuild = Box<dyn Fn() -> Result<Config, String> + Send + Sync>;

/// A hash of the contents of `paths`. A directory counts as its entries not starting with `.`
/// (the kubelet's `..data` and timestamped directories), sorted, each with its name and the content
/// it resolves to; a missing or unreadable path hashes as such, so its appearance is a change too.
pub fn fingerprint(paths: &[PathBuf]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in paths {
        p.hash(&mut h);
        hash_path(p, &mut h);
    }
    h.finish()
}

fn hash_path(p: &Path, h: &mut impl Hasher) {
    match std::fs::read(p) {
        Ok(bytes) => {
            1u8.hash(h);
            bytes.hash(h);
        }
        Err(_) => match std::fs::read_dir(p) {
            Ok(dir) => {
                2u8.hash(h);
                let mut names: Vec<PathBuf> = dir
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| !n.starts_with('.'))
                    })
                    .collect();
                names.sort();
                for n in names {
                    n.hash(h);
                    match std::fs::read(&n) {
                        Ok(b) => b.hash(h),
                        Err(_) => 0u8.hash(h),
                    }
                }
            }
            Err(_) => 0u8.hash(h),
        },
    }
}

/// What in `new` needs a restart compared with `old`, if anything (one phrase, for the log line).
pub fn restart_needed(old: &Config, new: &Config) -> Option<&'static str> {
    if old.listen != new.listen {
        return Some("the listen addresses changed");
    }
    if old.node != new.node {
        return Some("the interface or firewall settings changed");
    }
    if old.cache_file != new.cache_file {
        return Some("the cache file changed");
    }
    if old.metrics_listen != new.metrics_listen || old.health_listen != new.health_listen {
        return Some("the HTTP endpoint addresses changed");
    }
    if old.shutdown_grace != new.shutdown_grace {
        // Read once, at SIGTERM, from the configuration the process started with.
        return Some("the shutdown grace (health lameduck) changed");
    }
    let (o, n) = (&old.server, &new.server);
    if o.workers != n.workers
        || o.max_tcp_connections != n.max_tcp_connections
        || o.tcp_idle_timeout != n.tcp_idle_timeout
    {
        return Some("the listener settings (workers, TCP limits) changed");
    }
    None
}

/// Applies reloads to the running process.
pub struct Reloader {
    /// Loop detection's reporting: a reload checks the zones it changed (when `loop` is on).
    pub loops: Option<Arc<crate::loopdetect::Report>>,
    pub ctx: Arc<Ctx>,
    pub metrics: Arc<Metrics>,
    pub rebuild: Rebuild,
    pub current: Config,
    pub observer: Arc<dyn Observer>,
    /// The query log switch the request recorder reads.
    pub log_queries: Arc<AtomicBool>,
    pub generation: u64,
}

impl Reloader {
    /// Rebuilds and applies the configuration; says how it ended (and logs one line either way).
    pub async fn reload(&mut self, why: &str) -> ReloadResult {
        let result = self.try_reload(why).await;
        self.metrics.reload(result);
        result
    }

    async fn try_reload(&mut self, why: &str) -> ReloadResult {
        let new = match (self.rebuild)() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(trigger = why, error = %e, "reload failed; the running configuration keeps serving");
                return ReloadResult::Failed;
            }
        };
        if let Some(what) = restart_needed(&self.current, &new) {
            tracing::error!(
                trigger = why,
                "reload refused: {what}, which needs a restart; the running configuration keeps serving"
            );
            return ReloadResult::RestartRequired;
        }
        // The running generation's health registry: a server the reload keeps keeps its health.
        let registry = self.ctx.upstreams().registry();
        let upstreams = match Upstreams::with_health(&new.zones, new.upstream, registry) {
            Ok(u) => u.with_observer(self.observer.clone()),
            Err(e) => {
                tracing::error!(trigger = why, error = %e, "reload failed; the running configuration keeps serving");
                return ReloadResult::Failed;
            }
        };
        for s in upstreams.servers() {
            self.metrics.upstream_slot(*s);
        }
        upstreams.resume_probes();
        let lifted = self.ctx.set_upstreams(upstreams);
        if let Some(report) = &self.loops {
            self.recheck_loops(report.clone(), &new, &lifted);
        }
        self.ctx.set_max_concurrent(new.server.max_concurrent);
        self.log_queries.store(new.log_queries, Ordering::Relaxed);
        self.ctx.handler.cache.resize(new.limits);
        // Drop what the new policy forbids, off the control runtime's threads (it takes each cache
        // shard's write lock in turn).
        let ctx = self.ctx.clone();
        let gen_upstreams = ctx.upstreams();
        let _ = tokio::task::spawn_blocking(move || {
            ctx.handler.cache.retain(|r| gen_upstreams.keeps(r));
        })
        .await;
        self.generation += 1;
        self.metrics.set_config_generation(self.generation);
        for z in &new.zones {
            tracing::debug!(zone = %z.name, servers = ?z.servers, transport = ?z.transport, "forwarding");
        }
        tracing::info!(
            trigger = why,
            generation = self.generation,
            zones = new.zones.len(),
            "configuration reloaded"
        );
        self.current = new;
        ReloadResult::Applied
    }

    /// After a reload: zones whose loop block was lifted (their servers changed) lose their gauge
    /// and `/ready` line, and with `loop` on, the zones the reload added or changed are checked
    /// (CoreDNS checks again on every reload; unchanged zones keep their result).
    fn recheck_loops(
        &self,
        report: Arc<crate::loopdetect::Report>,
        new: &Config,
        lifted: &[String],
    ) {
        use crate::config::model::LoopDetect;
        use crate::loopdetect;
        for z in lifted {
            self.metrics.clear_loop_detected(z);
        }
        report
            .exit_on_loop
            .store(new.loop_detect == LoopDetect::Fatal, Ordering::Relaxed);
        report.refresh(&self.ctx);
        if new.loop_detect == LoopDetect::Off {
            return;
        }
        let mut zones = loopdetect::changed_zones(&self.current.zones, &new.zones);
        if self.current.loop_detect == LoopDetect::Off {
            // Turned on by this reload: every zone.
            zones = loopdetect::forwarded_zones(&new.zones);
        }
        if !zones.is_empty() {
            tokio::spawn(loopdetect::check_all(self.ctx.clone(), zones, report));
        }
    }

    /// Reloads on `signals` (SIGHUP and SIGUSR1, see [`reload_signals`]), and when the inputs'
    /// content changes, until `stop`.
    pub async fn run(mut self, signals: Signals, mut stop: watch::Receiver<bool>) {
        let (mut hup, mut usr1) = signals;
        let mut seen = fingerprint(&self.current.inputs);
        loop {
            let interval = self.current.reload_interval;
            let why = tokio::select! {
                _ = hup.recv() => "SIGHUP",
                _ = usr1.recv() => "SIGUSR1",
                _ = tokio::time::sleep(interval) => {
                    let inputs = self.current.inputs.clone();
                    let now = tokio::task::spawn_blocking(move || fingerprint(&inputs)).await.unwrap_or(seen);
                    if now == seen {
                        continue;
                    }
                    seen = now;
                    "changed input"
                }
                _ = stop.changed() => return,
            };
            // What the reload reads is at least as new as this fingerprint, taken before it. Taken
            // after, it also covered a change written while the reload ran (the kubelet's next
            // ConfigMap swap), which was then never reloaded (a flake of config_e2e showed it).
            let before = self.current.inputs.clone();
            if why != "changed input" {
                let inputs = before.clone();
                seen = tokio::task::spawn_blocking(move || fingerprint(&inputs))
                    .await
                    .unwrap_or(seen);
            }
            self.reload(why).await;
            if self.current.inputs != before {
                // Other files now (a reload can add or drop one): compare those from here on.
                let inputs = self.current.inputs.clone();
                seen = tokio::task::spawn_blocking(move || fingerprint(&inputs))
                    .await
                    .unwrap_or(seen);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_follows_content_not_mtime_and_sees_symlink_swaps() {
        let dir = std::env::temp_dir().join(format!("nodedns-fp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("..v1")).unwrap();
        std::fs::create_dir_all(dir.join("..v2")).unwrap();
        std::fs::write(dir.join("..v1/stubDomains"), "{}").unwrap();
        std::fs::write(
            dir.join("..v2/stubDomains"),
            r#"{"acme.local":["1.2.3.4"]}"#,
        )
        .unwrap();
        // The kubelet's layout: key -> ..data/key, ..data -> ..vN.
        std::os::unix::fs::symlink("..v1", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/stubDomains", dir.join("stubDomains")).unwrap();
        let paths = vec![dir.clone()];
        let a = fingerprint(&paths);
        std::fs::write(dir.join("..v1/stubDomains"), "{}").unwrap();
        assert_eq!(a, fingerprint(&paths), "same content, same hash");
        std::os::unix::fs::symlink("..v2", dir.join("..data.tmp")).unwrap();
        std::fs::rename(dir.join("..data.tmp"), dir.join("..data")).unwrap();
        assert_ne!(a, fingerprint(&paths), "the ..data swap is a change");
        let missing = vec![dir.join("nope")];
        let m = fingerprint(&missing);
        std::fs::write(dir.join("nope"), "x").unwrap();
        assert_ne!(m, fingerprint(&missing), "a file appearing is a change");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The cache file's path and interval are read once, at start (the writer task owns them):
    /// a reload that changes either, from the Corefile's `cache { file }` or a flag, is refused.
    #[test]
    fn a_changed_cache_file_needs_a_restart() {
        let src = |file: &str| {
            crate::config::FakeSources::default().with_file(
                "/c/Corefile",
                &format!(".:53 {{\n cache 30 {{\n  {file}\n }}\n forward . 10.0.0.1\n}}\n"),
            )
        };
        let config = |file: &str| {
            crate::config::Cli::parse_args(
                [
                    "nodedns",
                    "--listen",
                    "127.0.0.1:5300",
                    "--conf",
                    "/c/Corefile",
                ]
                .into_iter()
                .map(String::from),
            )
            .unwrap()
            .into_config_from(&src(file))
            .unwrap()
        };
        let old = config("file /a.bin 1m");
        assert_eq!(restart_needed(&old, &config("file /a.bin 1m")), None);
        assert_eq!(
            restart_needed(&old, &config("file /a.bin")),
            None,
            "1m is the default"
        );
        for changed in ["file /b.bin 1m", "file /a.bin 2m", "success 100"] {
            assert_eq!(
                restart_needed(&old, &config(changed)),
                Some("the cache file changed"),
                "{changed}"
            );
        }
    }
}
