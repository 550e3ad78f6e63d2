//! Admin HTTP server: `/metrics`, `/health` (liveness) and `/ready` (readiness).
//!
//! Plain hyper 1 + hyper-util (no framework) to keep the dependency tree small. Every listener
//! passed to [`serve`] answers all three paths, so `--metrics-listen` and `--health-listen` may
//! be the same address (bind once, see [`bind_all`]) or different ones.
//!
//! * `/health` checks that the process still *answers DNS*, not merely that the HTTP thread is
//!   alive: it sends `health.nodedns. CH TXT` over UDP to the DNS listener and returns 200 only
//!   if a reply with the same ID arrives within the probe timeout (1 s by default). A wedged
//!   listener therefore fails liveness and gets restarted by the kubelet.
//! * `/ready` is 200 once the wiring (`app`) has set all of `listeners_bound`, `setup_done` and
//!   `upstream_reachable`; otherwise 503 with the missing flags named in the body.
//! * `/metrics` negotiates the format from `Accept`: OpenMetrics 1.0 when the scraper asks for
//!   it (Prometheus does), else the classic text format 0.0.4 (curl, older agents).

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{ACCEPT, ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::logging::RateLimitedLog;
use crate::metrics::{Metrics, OPENMETRICS_CONTENT_TYPE, PROMETHEUS_TEXT_CONTENT_TYPE};

/// Default liveness probe timeout. Kubelet's default probe timeout is 1 s as well; a DNS
/// listener that cannot answer a local query within that is not serving pods either.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Concurrent admin connections; beyond this new connections are closed immediately so a
/// misbehaving client cannot exhaust file descriptors the DNS path needs.
const MAX_CONNECTIONS: usize = 64;
/// A client must send its request headers within this time (slowloris protection; also
/// closes idle keep-alive connections).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`serve`] waits for in-progress requests after shutdown before dropping them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);
const TEXT_PLAIN: &str = "text/plain; charset=utf-8";

/// Shared state read by the admin handlers and written by the rest of the agent.
#[derive(Debug)]
pub struct AdminState {
    metrics: Arc<Metrics>,
    health_probe: Option<SocketAddr>,
    probe_timeout: Duration,
    listeners_bound: AtomicBool,
    setup_done: AtomicBool,
    upstream_reachable: AtomicBool,
    /// Set at SIGTERM: `/ready` says 503 "draining" from then on while DNS is still served.
    draining: AtomicBool,
    /// Configuration problems that keep `/ready` at 503 although nodedns serves (a missing
    /// `<SVC>_SERVICE_HOST`), each naming its cause.
    config_problems: std::sync::Mutex<Vec<String>>,
    /// node-cache's own listener: `/metrics` is only the setup-errors counter.
    setup_only: bool,
    /// Cleared while the start's loop check runs (at most about a second of it, see `app`).
    loop_checked: AtomicBool,
    /// Zones loop detection found looping, as `/ready` names them ("loop detected: zone Z via S").
    loop_problems: std::sync::Mutex<Vec<String>>,
}

impl AdminState {
    /// `health_probe` is the DNS address `/health` queries (the first DNS listen address; an
    /// unspecified address such as `0.0.0.0:53` is probed on loopback). With `None`, `/health`
    /// only reports that the admin server runs.
    pub fn new(metrics: Arc<Metrics>, health_probe: Option<SocketAddr>) -> Self {
        AdminState {
            metrics,
            health_probe,
            probe_timeout: DEFAULT_PROBE_TIMEOUT,
            listeners_bound: AtomicBool::new(false),
            setup_done: AtomicBool::new(false),
            upstream_reachable: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            config_problems: std::sync::Mutex::new(Vec::new()),
            setup_only: false,
            loop_checked: AtomicBool::new(true),
            loop_problems: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// This state for node-cache's own listener (`-metrics-listen-address`): `/metrics` serves
    /// `coredns_nodecache_setup_errors_total` only, and nothing else is served.
    pub fn setup_errors_only(metrics: Arc<Metrics>) -> Self {
        AdminState {
            setup_only: true,
            ..AdminState::new(metrics, None)
        }
    }

    /// Sets the configuration problems `/ready` names (503 while any is set).
    pub fn set_config_problems(&self, problems: Vec<String>) {
        *self
            .config_problems
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = problems;
    }

    /// The configuration problems set by [`AdminState::set_config_problems`].
    pub fn config_problems(&self) -> Vec<String> {
        self.config_problems
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Cleared while the start's loop check runs, set when it is done.
    pub fn set_loop_checked(&self, v: bool) {
        self.loop_checked.store(v, Ordering::Relaxed);
    }

    /// Sets the loops `/ready` names (503 while any is set).
    pub fn set_loop_problems(&self, problems: Vec<String>) {
        *self.loop_problems.lock().unwrap_or_else(|e| e.into_inner()) = problems;
    }

    /// The loops set by [`AdminState::set_loop_problems`].
    pub fn loop_problems(&self) -> Vec<String> {
        self.loop_problems
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Overrides the liveness probe timeout (default [`DEFAULT_PROBE_TIMEOUT`]).
    pub fn with_probe_timeout(mut self, timeout: Duration) -> Self {
        self.probe_timeout = timeout;
        self
    }

    /// The metrics served on `/metrics`.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Set when every DNS listener socket is bound.
    pub fn set_listeners_bound(&self, v: bool) {
        self.listeners_bound.store(v, Ordering::Relaxed);
    }

    /// Set when the node setup (interface, firewall rules) is complete.
    pub fn set_setup_done(&self, v: bool) {
        self.setup_done.store(v, Ordering::Relaxed);
    }

    /// Set once an upstream has answered (the readiness probe or real traffic). Never cleared:
    /// readiness steers no traffic to a node-local cache, so a flapping `/ready` would only restart
    /// rollouts; per-upstream health is a metric instead.
    pub fn set_upstream_reachable(&self, v: bool) {
        self.upstream_reachable.store(v, Ordering::Relaxed);
    }

    /// Set at SIGTERM (the lameduck/grace period starts): never cleared.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Names of the readiness conditions not yet met; empty means ready. While draining the
    /// first is "draining".
    pub fn missing_readiness(&self) -> Vec<&'static str> {
        let draining = self.draining.load(Ordering::Relaxed).then_some("draining");
        draining
            .into_iter()
            .chain(
                [
                    ("listeners_bound", &self.listeners_bound),
                    ("setup_done", &self.setup_done),
                    ("upstream_reachable", &self.upstream_reachable),
                    ("loop_check", &self.loop_checked),
                ]
                .into_iter()
                .filter(|(_, flag)| !flag.load(Ordering::Relaxed))
                .map(|(name, _)| name),
            )
            .collect()
    }
}

/// Binds a TCP listener with `SO_REUSEADDR` and `SO_REUSEPORT`, so that during a rolling
/// update with `maxSurge` the new pod can bind the same host-network port while the old one
/// still serves. Must be called inside a tokio runtime.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(128)?;
    TcpListener::from_std(sock.into())
}

/// Binds the metrics and health addresses; one listener if they are equal, else two.
pub fn bind_all(metrics: SocketAddr, health: SocketAddr) -> io::Result<Vec<TcpListener>> {
    if metrics == health {
        Ok(vec![bind(metrics)?])
    } else {
        Ok(vec![bind(metrics)?, bind(health)?])
    }
}

/// Serves admin HTTP/1 on `listener` until `shutdown` becomes `true` (or its sender is
/// dropped). Then stops accepting, lets open connections finish their current request
/// (up to a few seconds) and returns.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let log_limit = RateLimitedLog::new(1, Duration::from_secs(10));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = wait_for_shutdown(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let Ok(permit) = limit.clone().try_acquire_owned() else {
                        if log_limit.allow("admin-conn-limit") {
                            tracing::warn!(max = MAX_CONNECTIONS, "admin connection limit reached");
                        }
                        continue; // dropping `stream` closes it
                    };
                    let state = state.clone();
                    let shutdown = shutdown.clone();
                    conns.spawn(async move {
                        serve_conn(stream, state, shutdown).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    // EMFILE/ENFILE and friends: back off instead of spinning on accept.
                    if log_limit.allow("admin-accept") {
                        tracing::warn!(error = %e, "admin accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::debug!(
            remaining = conns.len(),
            "admin connections still open after drain timeout"
        );
    }
    // Dropping the JoinSet aborts whatever is left.
}

/// Resolves once the watch value is `true` or the sender is gone.
async fn wait_for_shutdown(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

async fn serve_conn(
    stream: TcpStream,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let svc = hyper::service::service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, Infallible>(route(&state, &req).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    let mut conn = std::pin::pin!(conn);
    let res = tokio::select! {
        res = conn.as_mut() => res,
        () = wait_for_shutdown(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            conn.as_mut().await
        }
    };
    if let Err(e) = res {
        tracing::debug!(error = %e, "admin connection error");
    }
}

async fn route<B>(state: &AdminState, req: &Request<B>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    if state.setup_only {
        return match req.uri().path() {
            "/metrics" => response(
                StatusCode::OK,
                PROMETHEUS_TEXT_CONTENT_TYPE,
                state.metrics.encode_nodecache_setup_errors(),
            ),
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        };
    }
    match req.uri().path() {
        "/metrics" => {
            let accept = req
                .headers()
                .get(ACCEPT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let (body, content_type) = if wants_openmetrics(accept) {
                (state.metrics.encode(), OPENMETRICS_CONTENT_TYPE)
            } else {
                (
                    state.metrics.encode_prometheus_text(),
                    PROMETHEUS_TEXT_CONTENT_TYPE,
                )
            };
            response(StatusCode::OK, content_type, body)
        }
        "/health" => match state.health_probe {
            None => text(StatusCode::OK, "ok (no DNS probe configured)\n"),
            Some(target) => match probe_dns(target, state.probe_timeout).await {
                Ok(()) => text(StatusCode::OK, "ok\n"),
                Err(e) => {
                    tracing::warn!(%target, error = %e, "liveness probe: DNS listener did not answer");
                    response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        TEXT_PLAIN,
                        format!("DNS listener {target} did not answer: {e}\n"),
                    )
                }
            },
        },
        "/ready" => {
            let mut missing: Vec<String> = state
                .missing_readiness()
                .into_iter()
                .map(String::from)
                .collect();
            missing.extend(state.config_problems());
            missing.extend(state.loop_problems());
            if missing.is_empty() {
                text(StatusCode::OK, "ok\n")
            } else {
                response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT_PLAIN,
                    format!("not ready: {}\n", missing.join(", ")),
                )
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// True if `Accept` lists `application/openmetrics-text` with a non-zero q value.
fn wants_openmetrics(accept: &str) -> bool {
    accept.split(',').any(|range| {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("");
        media.eq_ignore_ascii_case("application/openmetrics-text")
            && !parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            })
    })
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    response(status, TEXT_PLAIN, body)
}

fn response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Probe and scrape results must never come from an intermediate cache.
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Why the DNS liveness probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
}

/// Sends `health.nodedns. CH TXT` with a random ID to `target` over UDP and waits up to
/// `timeout` for a response (QR set) carrying the same ID. Any rcode counts: an answer of
/// any kind proves the listener loop is alive. Replies with other IDs are ignored, so a
/// late reply to an earlier probe cannot make a wedged listener look healthy.
pub async fn probe_dns(target: SocketAddr, timeout: Duration) -> Result<(), ProbeError> {
    probe(target, timeout, is_probe_reply).await
}

/// Whether a nodedns answers the health query at `target` within `timeout`: a reply with
/// NOERROR, which only nodedns gives (a cluster DNS reached through kube-proxy's DNAT refuses a
/// CHAOS name it does not serve). Used at start and at exit to find a peer instance.
pub async fn probe_nodedns(target: SocketAddr, timeout: Duration) -> bool {
    probe(target, timeout, is_peer_reply).await.is_ok()
}

async fn probe(
    target: SocketAddr,
    timeout: Duration,
    accept: fn(&[u8], u16) -> bool,
) -> Result<(), ProbeError> {
    let target = loopback_if_unspecified(target);
    let local: SocketAddr = match target.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(local).await?;
    // connect() makes the kernel drop datagrams from other sources and report ICMP
    // port-unreachable as ECONNREFUSED on recv (nothing bound: fail fast, not after 1 s).
    sock.connect(target).await?;
    let id: u16 = rand::random();
    sock.send(&probe_query(id)).await?;
    let mut buf = [0u8; 512];
    tokio::time::timeout(timeout, async {
        loop {
            let n = sock.recv(&mut buf).await?;
            if accept(buf.get(..n).unwrap_or(&[]), id) {
                return Ok(());
            }
        }
    })
    .await
    .map_err(|_| ProbeError::Timeout(timeout))?
}

/// Probes for a wildcard listen address go to loopback of the same family.
fn loopback_if_unspecified(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

/// Question name of the liveness probe, in wire format.
pub const PROBE_QNAME_WIRE: &[u8] = b"\x06health\x07nodedns\x00";
/// Probe query type (TXT).
pub const PROBE_QTYPE: u16 = 16;
/// Probe query class (CH, chaos), so the handler can recognise it and never forward it.
pub const PROBE_QCLASS: u16 = 3;

/// Builds the probe query: header (ID, no flags, QDCOUNT=1) and one question.
fn probe_query(id: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(12 + PROBE_QNAME_WIRE.len() + 4);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    q.extend_from_slice(PROBE_QNAME_WIRE);
    q.extend_from_slice(&PROBE_QTYPE.to_be_bytes());
    q.extend_from_slice(&PROBE_QCLASS.to_be_bytes());
    q
}

/// A probe reply with rcode NOERROR (see [`probe_nodedns`]).
fn is_peer_reply(msg: &[u8], id: u16) -> bool {
    is_probe_reply(msg, id) && msg.get(3).is_some_and(|f| f & 0x0f == 0)
}

fn is_probe_reply(msg: &[u8], id: u16) -> bool {
    matches!(msg, [a, b, flags, ..] if msg.len() >= 12
        && u16::from_be_bytes([*a, *b]) == id
        && flags & 0x80 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_query_is_a_valid_ch_txt_question() {
        let q = probe_query(0xbeef);
        let msg = hickory_proto::op::Message::from_vec(&q).expect("parses");
        assert_eq!(msg.metadata.id, 0xbeef);
        assert_eq!(msg.queries.len(), 1);
        let query = &msg.queries[0];
        assert_eq!(query.name().to_ascii(), "health.nodedns.");
        assert_eq!(u16::from(query.query_type()), PROBE_QTYPE);
        assert_eq!(u16::from(query.query_class()), PROBE_QCLASS);
    }

    #[test]
    fn reply_matching_needs_id_qr_and_header() {
        let mut r = probe_query(7);
        assert!(!is_probe_reply(&r, 7), "a query (QR=0) is not a reply");
        r[2] |= 0x80;
        assert!(is_probe_reply(&r, 7));
        assert!(!is_probe_reply(&r, 8));
        assert!(!is_probe_reply(&r[..11], 7));
        assert!(!is_probe_reply(&[], 7));
    }

    #[test]
    fn accept_negotiation() {
        let prom = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                    version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(wants_openmetrics(prom));
        assert!(wants_openmetrics(
            "Application/OpenMetrics-Text; version=1.0.0"
        ));
        assert!(!wants_openmetrics(""));
        assert!(!wants_openmetrics("*/*"));
        assert!(!wants_openmetrics("text/plain;version=0.0.4"));
        assert!(!wants_openmetrics("application/openmetrics-text;q=0"));
    }

    #[test]
    fn wildcard_probe_goes_to_loopback() {
        let a: SocketAddr = "0.0.0.0:53".parse().expect("addr");
        assert_eq!(
            loopback_if_unspecified(a),
            "127.0.0.1:53".parse().expect("addr")
        );
        let a: SocketAddr = "[::]:5353".parse().expect("addr");
        assert_eq!(
            loopback_if_unspecified(a),
            "[::1]:5353".parse().expect("addr")
        );
        let a: SocketAddr = "169.254.20.10:53".parse().expect("addr");
        assert_eq!(loopback_if_unspecified(a), a);
    }

    #[test]
    fn draining_is_not_ready_whatever_else_holds() {
        let s = AdminState::new(Arc::new(Metrics::new(&[], 1)), None);
        s.set_listeners_bound(true);
        s.set_setup_done(true);
        s.set_upstream_reachable(true);
        assert!(s.missing_readiness().is_empty());
        s.set_draining();
        assert_eq!(s.missing_readiness(), ["draining"]);
    }

    #[test]
    fn peer_replies_need_noerror() {
        let mut r = probe_query(9);
        r[2] |= 0x80;
        let noerror = r.clone();
        r[3] |= 5; // REFUSED, as a cluster DNS reached through the DNAT answers
        assert!(is_peer_reply(&noerror, 9));
        assert!(!is_peer_reply(&noerror, 8));
        assert!(is_probe_reply(&r, 9) && !is_peer_reply(&r, 9));
    }

    #[test]
    fn readiness_lists_missing_flags() {
        let s = AdminState::new(Arc::new(Metrics::new(&[], 1)), None);
        assert_eq!(
            s.missing_readiness(),
            ["listeners_bound", "setup_done", "upstream_reachable"]
        );
        s.set_setup_done(true);
        assert_eq!(
            s.missing_readiness(),
            ["listeners_bound", "upstream_reachable"]
        );
        s.set_listeners_bound(true);
        s.set_upstream_reachable(true);
        assert!(s.missing_readiness().is_empty());
    }
}
