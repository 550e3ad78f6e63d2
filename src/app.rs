//! Wiring: config → upstreams and cache → node setup → listeners → admin → wait → shutdown.
//!
//! Also the adapters that connect the sans-IO core's hooks (`server::Recorder`,
//! `upstream::Observer`) to metrics, readiness and logs.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::watch;

use crate::admin::{self, AdminState};
use crate::cache::Cache;
use crate::config::Config;
use crate::config::model::LoopDetect;
use crate::handler::{Answered, Handler, Proto, Source};
use crate::logging::RateLimitedLog;
use crate::loopdetect;
use crate::metrics::{self, CacheKind, CacheSnapshot, Metrics, UpstreamFailure};
use crate::node::Node;
use crate::reload::{Rebuild, Reloader, reload_signals};
use crate::server::{Ctx, Listeners, Recorder};
use crate::upstream::{AttemptError, AttemptResult, Observer, Transport, Upstreams};
use crate::wire::{self, rcode};

/// How long `/ready` waits for the start's loop check (which itself may take up to
/// [`loopdetect::CHECK_WINDOW`] when a server does not answer).
const LOOP_READY_WAIT: Duration = Duration::from_secs(1);

fn metrics_proto(p: Proto) -> metrics::Proto {
    match p {
        Proto::Udp => metrics::Proto::Udp,
        Proto::Tcp => metrics::Proto::Tcp,
    }
}

/// Counts requests, hits and misses; writes the query log when asked to.
struct RequestRecorder {
    metrics: Arc<Metrics>,
    /// Read-mostly (a reload may flip it): a relaxed load per answered query.
    log_queries: Arc<AtomicBool>,
}

impl Recorder for RequestRecorder {
    fn answered(&self, worker: usize, proto: Proto, a: &Answered, query: &[u8]) {
        let w = self.metrics.worker(worker);
        w.request(metrics_proto(proto), a.qtype, a.rcode);
        if let Source::Cache { negative, stale } = a.source {
            w.cache_hit(if negative {
                CacheKind::Negative
            } else {
                CacheKind::Positive
            });
            if stale {
                w.stale_answer();
            } else if a.refresh.is_some() {
                w.prefetch();
            }
        }
        if self.log_queries.load(Ordering::Relaxed) {
            let name = wire::scan_query(query)
                .map(|v| wire::name_to_string(v.key.name()))
                .unwrap_or_else(|_| "-".into());
            tracing::info!(target: "nodedns::query", name, qtype = a.qtype, rcode = a.rcode, source = ?a.source, ?proto, "query");
        }
    }

    fn miss(&self, worker: usize) {
        self.metrics.worker(worker).cache_miss();
    }

    fn rejected(&self, worker: usize) {
        self.metrics.worker(worker).concurrency_reject();
    }

    fn took(&self, worker: usize, took: Duration, count: u64) {
        self.metrics.worker(worker).request_duration(took, count);
    }

    fn in_flight(&self, worker: usize, delta: i64) {
        let w = self.metrics.worker(worker);
        if delta > 0 {
            w.in_flight_inc();
        } else {
            w.in_flight_dec();
        }
    }
}

/// Counts upstream attempts and failures, marks upstreams reachable, logs failures (rate-limited so
/// an outage cannot flood the node's disk).
struct UpstreamRecorder {
    metrics: Arc<Metrics>,
    admin: Arc<AdminState>,
    limiter: RateLimitedLog,
}

impl Observer for UpstreamRecorder {
    fn attempt(
        &self,
        addr: SocketAddr,
        transport: Transport,
        result: AttemptResult,
        took: Duration,
    ) {
        let server = self.metrics.upstream_slot(addr);
        let proto = match transport {
            Transport::Udp => metrics::Proto::Udp,
            Transport::Tcp => metrics::Proto::Tcp,
        };
        self.metrics.upstream_query(server, proto);
        let failure = match result {
            AttemptResult::Reply(rc) => {
                self.metrics.upstream_duration(server, took);
                self.admin.set_upstream_reachable(true);
                match rc {
                    rcode::SERVFAIL => Some(UpstreamFailure::Servfail),
                    rcode::REFUSED => Some(UpstreamFailure::Refused),
                    _ => None,
                }
            }
            AttemptResult::Failed(AttemptError::Timeout) => Some(UpstreamFailure::Timeout),
            AttemptResult::Failed(AttemptError::Refused) => Some(UpstreamFailure::Refused),
            AttemptResult::Failed(AttemptError::Network) => Some(UpstreamFailure::Network),
            AttemptResult::Failed(AttemptError::Malformed) => Some(UpstreamFailure::Malformed),
        };
        if let Some(f) = failure {
            self.metrics.upstream_failure(server, f);
            let key = match f {
                UpstreamFailure::Timeout => "upstream-timeout",
                UpstreamFailure::Refused => "upstream-refused",
                UpstreamFailure::Servfail => "upstream-servfail",
                UpstreamFailure::Network => "upstream-network",
                UpstreamFailure::Malformed => "upstream-malformed",
            };
            if self.limiter.allow(key) {
                tracing::warn!(upstream = %addr, cause = ?f, ?transport, "upstream attempt failed");
            }
        }
    }

    fn health(&self, addr: SocketAddr, healthy: bool) {
        let server = self.metrics.upstream_slot(addr);
        self.metrics.upstream_health(server, healthy);
    }

    fn healthcheck_failure(&self, addr: SocketAddr) {
        let server = self.metrics.upstream_slot(addr);
        self.metrics.upstream_healthcheck_failure(server);
    }
}

/// Runs nodedns until `shutdown` completes. With `rebuild`, SIGHUP, SIGUSR1 and a change of the
/// configuration's input files reload it (see [`crate::reload`]).
pub async fn run(
    config: Config,
    rebuild: Option<Rebuild>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let signals = match reload_signals() {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot install SIGHUP/SIGUSR1 handlers; reload by signal is off");
            None
        }
    };
    let upstreams = Upstreams::new(&config.zones, config.upstream).map_err(anyhow::Error::msg)?;
    let zones_servers = upstreams.servers().to_vec();
    // One shard per UDP worker, and one for TCP.
    let metrics = Arc::new(Metrics::new(&zones_servers, config.server.workers + 1));
    let first = config.server.listen[0];
    let admin_state = Arc::new(AdminState::new(metrics.clone(), Some(first)));
    let observer = Arc::new(UpstreamRecorder {
        metrics: metrics.clone(),
        admin: admin_state.clone(),
        limiter: RateLimitedLog::new(5, Duration::from_secs(10)),
    });
    let upstreams = upstreams.with_observer(observer.clone());
    metrics.set_config_generation(1);
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    for problem in &config.not_ready {
        tracing::warn!("not ready: {problem}");
    }
    admin_state.set_config_problems(config.not_ready.clone());
    for z in &config.zones {
        tracing::info!(zone = %z.name, servers = ?z.servers, transport = ?z.transport, "forwarding");
    }
    let handler = Handler::new(Cache::new(config.limits));
    let log_queries = Arc::new(AtomicBool::new(config.log_queries));
    let recorder = Arc::new(RequestRecorder {
        metrics: metrics.clone(),
        log_queries: log_queries.clone(),
    });
    let ctx = Arc::new(Ctx::new(
        handler,
        upstreams,
        recorder,
        config.server.max_concurrent,
    ));
    ctx.start_refresher();
    let weak: Weak<Ctx> = Arc::downgrade(&ctx);
    metrics.set_cache_snapshot_provider(move || {
        weak.upgrade()
            .map(|c| {
                let s = c.handler.cache.stats();
                CacheSnapshot {
                    positive_entries: s.positive_entries,
                    negative_entries: s.negative_entries,
                    positive_bytes: s.positive_bytes,
                    negative_bytes: s.negative_bytes,
                    positive_evictions: s.positive_evictions,
                    negative_evictions: s.negative_evictions,
                }
            })
            .unwrap_or_default()
    });

    // Another nodedns already serving here (a surge pod during a rolling update): we bind beside
    // it (SO_REUSEPORT) and adopt its link and rules, and whichever exits last tears them down.
    let peers = crate::node::serving_peers(&config.listen).await;
    if !peers.is_empty() {
        tracing::info!(addrs = ?peers, "handover: another nodedns serves these addresses; sharing them");
    }

    // The link and its addresses first: the listeners bind to them.
    let mut node = Node::setup_interface(
        &config.node,
        &config.listen,
        config.health_listen,
        metrics.clone(),
    )
    .await?;
    let listeners = match Listeners::start(ctx.clone(), &config.server) {
        Ok(l) => l,
        Err(e) => {
            // Leave the node as we found it (or to the peer that was already serving).
            node.teardown_unless_peer(&config.listen).await;
            return Err(e.into());
        }
    };
    tracing::info!(listen = ?listeners.bound, "serving DNS");
    admin_state.set_listeners_bound(true);
    // The addon's -pidfile: written once the listeners are bound.
    let pidfile = config.pidfile.as_ref().and_then(|p| {
        match std::fs::write(p, format!("{}\n", std::process::id())) {
            Ok(()) => Some(p.clone()),
            Err(e) => {
                tracing::warn!(path = %p.display(), error = %e, "cannot write the pidfile");
                None
            }
        }
    });

    // The HTTP endpoints before any rule: a bad --metrics-listen must fail the start before rules
    // are installed, not install and at once remove them.
    let (stop_tx, stop_rx) = watch::channel(false);
    let admin_addrs: Vec<SocketAddr> = match (config.metrics_listen, config.health_listen) {
        (Some(m), Some(h)) if m == h => vec![m],
        (m, h) => m.into_iter().chain(h).collect(),
    };
    let mut admin_listeners = Vec::new();
    for addr in admin_addrs {
        match admin::bind(addr) {
            Ok(l) => admin_listeners.push((addr, l)),
            Err(e) => {
                // Leave the node as we found it: no addresses without a running nodedns.
                // Our sockets first: the peer check must not find them.
                listeners.shutdown(Duration::ZERO).await;
                node.teardown_unless_peer(&config.listen).await;
                return Err(anyhow::anyhow!("cannot bind the HTTP endpoint {addr}: {e}"));
            }
        }
    }
    let mut admin_tasks = Vec::new();
    // node-cache's own listener (-metrics-listen-address): the setup-errors counter only. Not
    // binding it is a warning, never a failed start (an old node-cache may still hold the port
    // during a surge upgrade, and it carries no DNS).
    if let Some(addr) = config.setup_metrics_listen {
        match admin::bind(addr) {
            Ok(l) => {
                tracing::info!(%addr, "serving coredns_nodecache_setup_errors_total on /metrics");
                admin_tasks.push(tokio::spawn(admin::serve(
                    l,
                    Arc::new(AdminState::setup_errors_only(metrics.clone())),
                    stop_rx.clone(),
                )));
            }
            Err(e) => {
                tracing::warn!(%addr, error = %e, "cannot bind the setup-errors endpoint (-metrics-listen-address)");
            }
        }
    }
    for (addr, l) in admin_listeners {
        tracing::info!(%addr, "serving /metrics, /health and /ready");
        admin_tasks.push(tokio::spawn(admin::serve(
            l,
            admin_state.clone(),
            stop_rx.clone(),
        )));
    }

    // Rules only now that every listener is bound.
    if node.setup_firewall().await {
        admin_state.set_setup_done(true);
    }
    let node = Arc::new(tokio::sync::Mutex::new(node));

    // Loop detection (CoreDNS's `loop`): one probe per forwarded zone, now that the listeners
    // answer (a probe that loops must reach them). `/ready` waits for it, at most
    // LOOP_READY_WAIT: on a loop the copies come back within round trips, and a dead server
    // must not hold readiness for the whole check window.
    let (fatal_tx, mut fatal_rx) = tokio::sync::mpsc::channel::<String>(1);
    let loop_report = Arc::new(loopdetect::Report {
        metrics: metrics.clone(),
        admin: admin_state.clone(),
        fatal: fatal_tx,
        exit_on_loop: AtomicBool::new(config.loop_detect == LoopDetect::Fatal),
    });
    let mut loop_tasks = Vec::new();
    if config.loop_detect != LoopDetect::Off {
        admin_state.set_loop_checked(false);
        let zones = loopdetect::forwarded_zones(&config.zones);
        let report = loop_report.clone();
        let check_ctx = ctx.clone();
        let gate = admin_state.clone();
        loop_tasks.push(tokio::spawn(async move {
            let check = loopdetect::check_all(check_ctx, zones, report);
            tokio::pin!(check);
            tokio::select! {
                () = &mut check => {}
                () = tokio::time::sleep(LOOP_READY_WAIT) => {
                    gate.set_loop_checked(true);
                    check.await;
                }
            }
            gate.set_loop_checked(true);
        }));
    }

    // Readiness wants one reachable upstream: probe until one answers (real traffic also counts).
    let probe_ctx = ctx.clone();
    let probe_state = admin_state.clone();
    let mut probe_stop = stop_rx.clone();
    let prober = tokio::spawn(async move {
        loop {
            if probe_state.missing_readiness().is_empty() {
                // Client traffic got an answer first (as for a surge pod beside a live peer).
                tracing::info!("an upstream answered; ready (client traffic)");
                return;
            }
            if probe_ctx.upstreams().probe(Duration::from_secs(1)).await {
                probe_state.set_upstream_reachable(true);
                tracing::info!("an upstream answered; ready");
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = probe_stop.changed() => return,
            }
        }
    });

    // Reconcile: put back whatever someone removed.
    let sync_node = node.clone();
    let sync_state = admin_state.clone();
    let interval = config.node.sync_interval;
    let mut sync_stop = stop_rx.clone();
    let reconciler = tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = sync_stop.changed() => return,
            }
            if sync_node.lock().await.reconcile().await {
                sync_state.set_setup_done(true);
            }
        }
    });

    // The cache file, once the listeners answer (a cold cache never delays the first answer).
    let warm = config.cache_file.clone().map(|(path, every)| {
        let max_len = crate::persist::max_file_len(&config.limits);
        tokio::spawn(crate::warm::run(
            ctx.clone(),
            path,
            every,
            max_len,
            stop_rx.clone(),
        ))
    });

    let reloader = rebuild.zip(signals).map(|(rebuild, signals)| {
        let r = Reloader {
            loops: Some(loop_report.clone()),
            ctx: ctx.clone(),
            metrics: metrics.clone(),
            rebuild,
            current: config.clone(),
            observer: observer.clone(),
            log_queries,
            generation: 1,
        };
        tokio::spawn(r.run(signals, stop_rx.clone()))
    });

    // `loop fatal`: a loop ends the process (exit 1, the reason in one line), as in CoreDNS.
    let fatal = async {
        match fatal_rx.recv().await {
            Some(why) => why,
            None => std::future::pending::<String>().await,
        }
    };
    let fatal = tokio::select! {
        () = shutdown => None,
        why = fatal => Some(why),
    };
    if let Some(why) = fatal {
        tracing::error!("{why}: exiting (loop fatal)");
        if let Some(r) = reloader {
            r.abort();
        }
        let _ = stop_tx.send(true);
        for t in loop_tasks {
            t.abort();
        }
        prober.abort();
        let _ = reconciler.await;
        listeners.shutdown(Duration::ZERO).await;
        node.lock().await.teardown_unless_peer(&config.listen).await;
        if let Some(w) = warm {
            let _ = w.await;
        }
        for t in admin_tasks {
            let _ = t.await;
        }
        if let Some(p) = pidfile {
            let _ = std::fs::remove_file(p);
        }
        return Err(anyhow::anyhow!(
            "{why} (loop fatal: an upstream forwards this zone back to nodedns)"
        ));
    }
    for t in loop_tasks {
        t.abort();
    }
    // Lameduck: `/ready` says 503 at once, so a rollout or a load balancer sees it, while DNS is
    // served as before (a surge peer may still be starting).
    admin_state.set_draining();
    let grace = config.shutdown_grace;
    tracing::info!(
        ?grace,
        "stop requested: draining (/ready reports 503), serving meanwhile"
    );
    tokio::time::sleep(grace).await;
    tracing::info!("shutting down");
    if let Some(r) = reloader {
        r.abort();
    }
    let _ = stop_tx.send(true);
    if let Some(w) = warm {
        // Its final write (bounded by the cache's size).
        let _ = w.await;
    }
    prober.abort();
    // Let a reconcile pass in progress finish (it may be adding rules in a blocking task that an
    // abort would not stop), so teardown is the last word.
    let _ = reconciler.await;
    // The sockets first: each answers what it has already received and closes. Then a peer still
    // answering proves it serves the addresses, and the node state is left to it; without one,
    // rules, then addresses and link, go. (With the socket-match rules, traffic to a ClusterIP
    // falls through to kube-proxy's DNAT the moment the last socket closes.)
    listeners.shutdown(config.upstream.deadline).await;
    node.lock().await.teardown_unless_peer(&config.listen).await;
    for t in admin_tasks {
        let _ = t.await;
    }
    if let Some(p) = pidfile {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}
