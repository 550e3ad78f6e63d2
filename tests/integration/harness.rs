//! Runs the real `nodedns` binary and talks DNS to it.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{DNSClass, Name, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::fake_upstream::FakeUpstream;

pub const BIN: &str = env!("CARGO_BIN_EXE_nodedns");

/// The binary the end-to-end tests run: `NODEDNS_TEST_BIN` if set (e.g. a release build), else
/// the one Cargo built for this test.
pub fn bin() -> String {
    std::env::var("NODEDNS_TEST_BIN").unwrap_or_else(|_| BIN.to_string())
}

/// How long a helper waits for one reply before giving up.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(8);

/// A small deterministic PRNG (xorshift64*), so tests need no extra crate and can print a seed.
pub struct Rng(u64);

#[allow(dead_code)]
impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    /// Seeded from the clock; the seed is printed so that a failure can be replayed.
    pub fn from_time(label: &str) -> Rng {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9_7f4a_7c15);
        eprintln!("{label}: rng seed {seed}");
        Rng::new(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn u16(&mut self) -> u16 {
        self.next_u64() as u16
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

/// Whether the binary documents `flag` in its `--help` (computed once).
pub fn help_mentions(flag: &str) -> bool {
    static HELP: OnceLock<String> = OnceLock::new();
    let help = HELP.get_or_init(|| {
        Command::new(bin())
            .arg("--help")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr)
            })
            .unwrap_or_default()
    });
    help.contains(flag)
}

/// `--setup-interface=false --firewall none --metrics-listen off --health-listen off`, each only
/// if the binary documents it: the tests must never touch the host's interfaces or firewall, nor
/// listen beyond loopback.
pub fn safety_args() -> Vec<&'static str> {
    let mut v = Vec::new();
    if help_mentions("--setup-interface") {
        v.push("--setup-interface=false");
    }
    if help_mentions("--firewall") {
        v.extend(["--firewall", "none"]);
    }
    // The admin endpoints default to fixed ports (and 0.0.0.0): off, so that tests run in
    // parallel and stay on loopback.
    if help_mentions("--metrics-listen") {
        v.extend(["--metrics-listen", "off"]);
    }
    if help_mentions("--health-listen") {
        v.extend(["--health-listen", "off"]);
    }
    // No lameduck wait at stop unless a test asks for one (a later flag overrides this one).
    if help_mentions("--shutdown-grace") {
        v.push("--shutdown-grace=0");
    }
    // Loop detection (on by default) sends one probe per zone at start: the tests that count
    // upstream queries or health transitions exactly would see it. loop_e2e.rs turns it on again
    // (a later flag wins).
    if help_mentions("--loop-detect") {
        v.extend(["--loop-detect", "off"]);
    }
    if help_mentions("--metrics-listen-address") {
        v.extend(["--metrics-listen-address", "off"]);
    }
    // Without --upstream nodedns reads resolv.conf: make that a loopback-only one, so no test can
    // ever send a query off this machine.
    if help_mentions("--resolv-conf") {
        v.extend(["--resolv-conf", loopback_resolv_conf()]);
    }
    v
}

/// A resolv.conf naming only 127.0.0.1, written once per test run.
fn loopback_resolv_conf() -> &'static str {
    static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let p = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("loopback-resolv.conf");
        std::fs::write(&p, "nameserver 127.0.0.1\n").expect("write loopback resolv.conf");
        p.to_string_lossy().into_owned()
    })
}

/// Spawns `cmd` with stdin and stdout closed and stderr collected by a thread into the returned
/// buffer (shown when a test fails).
pub fn spawn_capturing_stderr(cmd: &mut Command) -> (Child, Arc<Mutex<Vec<u8>>>) {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let mut pipe = child.stderr.take().expect("stderr pipe");
    let sink = stderr.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(&buf[..n]);
        }
    });
    (child, stderr)
}

/// Finds a loopback port that is free for both UDP and TCP (bound, then released).
pub fn free_port() -> u16 {
    for _ in 0..100 {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let port = udp.local_addr().expect("local addr").port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port found");
}

/// A free UDP+TCP address on a loopback IP of its own (127.X.Y.Z, chosen from the clock and the
/// process id): a test that watches a port close (drain, handover) cannot then be answered by
/// another test's nodedns that was handed the same port on 127.0.0.1.
pub fn private_addr() -> SocketAddr {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        ^ std::process::id().rotate_left(16);
    for i in 0..100u32 {
        let n = seed.wrapping_add(i.wrapping_mul(2_654_435_761));
        let ip = std::net::Ipv4Addr::new(
            127,
            100 + (n % 100) as u8,
            (n >> 8) as u8,
            1 + (n >> 16) as u8 % 250,
        );
        let Ok(udp) = UdpSocket::bind((ip, 0)) else {
            continue;
        };
        let Ok(local) = udp.local_addr() else {
            continue;
        };
        if TcpListener::bind(local).is_ok() {
            return local;
        }
    }
    panic!("no free private loopback address found");
}

/// A running nodedns child process, killed on drop. Its stderr is captured and shown if the test
/// panics.
pub struct Nodedns {
    pub addr: SocketAddr,
    child: Child,
    stderr: Arc<Mutex<Vec<u8>>>,
}

#[allow(dead_code)]
impl Nodedns {
    /// Starts nodedns with one upstream (the fake) plus `extra` args.
    pub async fn with_upstream(up: &FakeUpstream, extra: &[&str]) -> Nodedns {
        let mut args = vec!["--upstream".to_string(), up.addr_str()];
        args.extend(extra.iter().map(|s| s.to_string()));
        Nodedns::start(&args).await
    }

    /// Starts nodedns with `args` plus `--listen 127.0.0.1:PORT` on a free port and waits until it
    /// answers the health query.
    pub async fn start(args: &[String]) -> Nodedns {
        Nodedns::start_env(None, args, &[]).await
    }

    /// [`Nodedns::start`] with extra environment variables (the kubelet's Service variables), and
    /// with `at`, on that address (a config file's port) instead of a free port.
    pub async fn start_env(
        at: Option<SocketAddr>,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Nodedns {
        let mut last = String::new();
        for _attempt in 0..3 {
            let addr: SocketAddr =
                at.unwrap_or_else(|| format!("127.0.0.1:{}", free_port()).parse().unwrap());
            let mut cmd = Command::new(bin());
            cmd.arg("--listen").arg(addr.to_string());
            cmd.args(safety_args());
            if let Ok(level) = std::env::var("NODEDNS_TEST_LOG_LEVEL") {
                cmd.args(["--log-level", &level]);
            }
            cmd.args(args);
            // Only the test's flags choose upstreams, whatever the runner's environment says.
            cmd.env_remove("KUBE_DNS_UPSTREAM_SERVICE_HOST")
                .env_remove("KUBE_DNS_UPSTREAM_SERVICE_PORT")
                .envs(env.iter().copied());
            let (child, stderr) = spawn_capturing_stderr(&mut cmd);
            let mut node = Nodedns {
                addr,
                child,
                stderr,
            };
            match node.wait_ready().await {
                Ok(()) => return node,
                Err(e) => {
                    last = format!("{e}\nargs: {args:?}\nstderr:\n{}", node.stderr_text());
                    // A lost race for the port shows up as an early exit; try another port.
                }
            }
        }
        panic!("nodedns did not become ready: {last}");
    }

    /// Polls with the health query (health.nodedns. TXT CH) until answered, up to 200 × 25 ms.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; 4096];
        for i in 0..200u16 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("nodedns exited early: {status}"));
            }
            let q = health_query(0x4000 + i);
            let _ = sock.send_to(&q, self.addr).await;
            if let Ok(Ok((n, _))) =
                tokio::time::timeout(Duration::from_millis(25), sock.recv_from(&mut buf)).await
                && n >= 2
            {
                return Ok(());
            }
        }
        Err("no answer to the health query after 200 tries".into())
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal);
    }

    /// Waits up to `limit` for the process to exit; its status, or `None` if it is still running.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => return Some(st),
                Ok(None) if start.elapsed() < limit => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => return None,
            }
        }
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// Whether the process is still running.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn addr_str(&self) -> String {
        self.addr.to_string()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for Nodedns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            // Give the reader thread a moment to drain the pipe (bounded).
            std::thread::sleep(Duration::from_millis(50));
            eprintln!(
                "---- nodedns stderr ({}) ----\n{}\n---- end nodedns stderr ----",
                self.addr,
                self.stderr_text()
            );
        }
    }
}

/// The health query: `health.nodedns.` TXT CH.
pub fn health_query(id: u16) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    let mut q = Query::query(
        Name::from_ascii("health.nodedns.").unwrap(),
        RecordType::TXT,
    );
    q.set_query_class(DNSClass::CH);
    m.add_query(q);
    m.to_vec().unwrap()
}

/// Builds a standard query (RD=1) with a random ID.
pub fn build_query(name: &str, rtype: RecordType, edns: Option<u16>, do_bit: bool) -> Message {
    build_query_id(random_id(), name, rtype, edns, do_bit)
}

pub fn build_query_id(
    id: u16,
    name: &str,
    rtype: RecordType,
    edns: Option<u16>,
    do_bit: bool,
) -> Message {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    let mut n = Name::from_ascii(name).unwrap_or_else(|e| panic!("bad name {name:?}: {e}"));
    n.set_fqdn(true);
    m.add_query(Query::query(n, rtype));
    if let Some(payload) = edns {
        let mut e = Edns::new();
        e.set_max_payload(payload);
        e.set_dnssec_ok(do_bit);
        m.set_edns(e);
    } else {
        assert!(!do_bit, "the DO bit needs EDNS");
    }
    m
}

pub fn random_id() -> u16 {
    static RNG: OnceLock<Mutex<Rng>> = OnceLock::new();
    RNG.get_or_init(|| Mutex::new(Rng::from_time("query ids")))
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .u16()
}

/// Sends raw bytes over UDP and waits up to `timeout` for one datagram back.
pub async fn udp_exchange_raw(
    addr: SocketAddr,
    packet: &[u8],
    timeout: Duration,
) -> Option<Vec<u8>> {
    let local = if addr.is_ipv6() {
        "[::1]:0"
    } else {
        "127.0.0.1:0"
    };
    let sock = tokio::net::UdpSocket::bind(local).await.ok()?;
    sock.send_to(packet, addr).await.ok()?;
    let mut buf = vec![0u8; 65535];
    match tokio::time::timeout(timeout, sock.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

/// Sends one length-framed message over a new TCP connection and reads one framed reply.
pub async fn tcp_exchange_raw(
    addr: SocketAddr,
    packet: &[u8],
    timeout: Duration,
) -> Option<Vec<u8>> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        let mut framed = (packet.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(packet);
        s.write_all(&framed).await.ok()?;
        read_frame(&mut s).await
    };
    tokio::time::timeout(timeout, fut).await.ok().flatten()
}

/// Reads one 2-byte-length-framed message.
pub async fn read_frame(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await.ok()?;
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).await.ok()?;
    Some(buf)
}

fn parse_reply(bytes: &[u8], query: &Message) -> Message {
    let reply = Message::from_vec(bytes)
        .unwrap_or_else(|e| panic!("reply does not parse: {e}; bytes {bytes:02x?}"));
    assert_eq!(reply.id, query.id, "reply ID must echo the query ID");
    assert_eq!(
        reply.message_type,
        MessageType::Response,
        "QR must be 1 in a reply"
    );
    reply
}

/// Sends `query` over UDP and parses the reply (panics if none within REPLY_TIMEOUT).
pub async fn exchange_udp(addr: SocketAddr, query: &Message) -> Message {
    let bytes = query.to_vec().unwrap();
    let reply = udp_exchange_raw(addr, &bytes, REPLY_TIMEOUT)
        .await
        .unwrap_or_else(|| panic!("no UDP reply from {addr} to {:?}", query.queries));
    parse_reply(&reply, query)
}

/// Sends `query` over TCP and parses the reply (panics if none within REPLY_TIMEOUT).
pub async fn exchange_tcp(addr: SocketAddr, query: &Message) -> Message {
    let bytes = query.to_vec().unwrap();
    let reply = tcp_exchange_raw(addr, &bytes, REPLY_TIMEOUT)
        .await
        .unwrap_or_else(|| panic!("no TCP reply from {addr} to {:?}", query.queries));
    parse_reply(&reply, query)
}

pub async fn query_udp(
    addr: SocketAddr,
    name: &str,
    rtype: RecordType,
    edns: Option<u16>,
    do_bit: bool,
) -> Message {
    exchange_udp(addr, &build_query(name, rtype, edns, do_bit)).await
}

pub async fn query_tcp(
    addr: SocketAddr,
    name: &str,
    rtype: RecordType,
    edns: Option<u16>,
    do_bit: bool,
) -> Message {
    exchange_tcp(addr, &build_query(name, rtype, edns, do_bit)).await
}

/// Like `query_udp` but with up to 3 tries (for use right after a flood, where a datagram may be
/// dropped under load).
pub async fn query_udp_retry(addr: SocketAddr, name: &str, rtype: RecordType) -> Message {
    for _ in 0..3 {
        let q = build_query(name, rtype, Some(1232), false);
        if let Some(bytes) =
            udp_exchange_raw(addr, &q.to_vec().unwrap(), Duration::from_secs(3)).await
        {
            return parse_reply(&bytes, &q);
        }
    }
    panic!("no UDP reply to {name} after 3 tries");
}

/// Waits for a child-less deadline bounded condition: polls `f` every 20 ms up to `timeout`.
#[allow(dead_code)]
pub async fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

/// The A addresses in a reply's answer section.
pub fn a_addrs(m: &Message) -> Vec<std::net::Ipv4Addr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            hickory_proto::rr::RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

/// Minimum TTL over the answer section (panics if empty).
pub fn min_answer_ttl(m: &Message) -> u32 {
    m.answers
        .iter()
        .map(|r| r.ttl)
        .min()
        .expect("reply has no answers")
}

/// The SOA record TTL in the authority section, if any.
pub fn soa_ttl(m: &Message) -> Option<u32> {
    m.authorities
        .iter()
        .find(|r| r.record_type() == RecordType::SOA)
        .map(|r| r.ttl)
}
