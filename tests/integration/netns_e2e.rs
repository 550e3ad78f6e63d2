//! The real binary doing node setup inside network namespaces (issue 3): link and address,
//! NOTRACK rules (iptables and nftables), reconcile, teardown, idempotent restarts.
//!
//! Every test creates its own namespace(s) with unique names; the [`Netns`] guard deletes them
//! (and any `/etc/netns/<name>` directory) on drop, also when the test panics, and [`NsNodedns`]
//! kills its process on drop. Locals drop in reverse order, so declare the namespace first.
//! Tests need root and `ip`; otherwise they print why they are skipped and pass.
//!
//! nodedns runs via `ip netns exec NS nodedns ...` (which execs, so the child's PID is nodedns's
//! own and SIGTERM reaches it). DNS queries, the readiness probe and the fake upstreams run on
//! threads that have `setns`-ed into the namespace; nothing here sends a packet outside the
//! namespaces the test created, and nodedns never reads the host's resolv.conf (every start
//! passes `--upstream`).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::fake_upstream::FakeUpstream;
use crate::harness::{self, bin, build_query, health_query};

// ---------------------------------------------------------------------------------------------
// Helpers (also used by `cluster.rs`)
// ---------------------------------------------------------------------------------------------

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Why this environment cannot run namespace tests, if it cannot.
pub fn skip_reason() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not running as root".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("the `ip` command (iproute2) is missing".into());
    }
    None
}

/// Returns from the test with a printed reason when namespaces are not available.
macro_rules! require_netns {
    ($name:expr) => {
        if let Some(reason) = crate::netns_e2e::skip_reason() {
            eprintln!("SKIP {}: {reason}", $name);
            return;
        }
    };
}
pub(crate) use require_netns;

/// Whether `tool` can be run (prints a skip line when not).
pub fn have_tool(test: &str, tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !ok {
        eprintln!("SKIP {test}: `{tool}` is not installed");
    }
    ok
}

/// A named network namespace, deleted on drop together with its `/etc/netns/<name>` directory.
pub struct Netns {
    pub name: String,
    etc_dir: Option<PathBuf>,
}

#[allow(dead_code)]
impl Netns {
    /// Creates `nde-<tag>-<pid>-<n>` with `lo` up.
    pub fn new(tag: &str) -> Netns {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("nde-{tag}-{}-{n}", std::process::id());
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip netns add");
        assert!(out.status.success(), "ip netns add {name}: {out:?}");
        let ns = Netns {
            name,
            etc_dir: None,
        };
        ns.ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs a command inside the namespace via `ip netns exec`.
    pub fn exec(&self, argv: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .stdin(Stdio::null())
            .output()
            .expect("run ip netns exec")
    }

    /// Like [`exec`](Self::exec) but asserts success and returns stdout.
    pub fn ok(&self, argv: &[&str]) -> String {
        let out = self.exec(argv);
        assert!(
            out.status.success(),
            "in {}: {argv:?} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Gives `ip netns exec` processes in this namespace their own `/etc/resolv.conf`.
    pub fn set_resolv_conf(&mut self, content: &str) {
        let dir = PathBuf::from("/etc/netns").join(&self.name);
        std::fs::create_dir_all(&dir).expect("create /etc/netns/<ns>");
        self.etc_dir = Some(dir.clone());
        std::fs::write(dir.join("resolv.conf"), content).expect("write resolv.conf");
    }

    /// Runs `f` on a thread that lives in the namespace (re-raising a panic).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        std::thread::scope(|s| {
            let h = s.spawn(|| {
                enter(&path);
                f()
            });
            match h.join() {
                Ok(v) => v,
                Err(p) => std::panic::resume_unwind(p),
            }
        })
    }

    /// One UDP exchange from inside the namespace on a connected socket: the reply, or the error
    /// (`ConnectionRefused` is an ICMP port unreachable, `WouldBlock`/`TimedOut` no answer).
    pub fn udp_exchange(
        &self,
        to: SocketAddr,
        packet: &[u8],
        timeout: Duration,
    ) -> std::io::Result<Vec<u8>> {
        self.run(|| {
            let sock = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
            sock.set_read_timeout(Some(timeout))?;
            sock.connect(to)?;
            sock.send(packet)?;
            let mut buf = vec![0u8; 65535];
            let n = sock.recv(&mut buf)?;
            buf.truncate(n);
            Ok(buf)
        })
    }

    /// One framed TCP exchange from inside the namespace.
    pub fn tcp_exchange(
        &self,
        to: SocketAddr,
        packet: &[u8],
        timeout: Duration,
    ) -> std::io::Result<Vec<u8>> {
        self.run(|| {
            let mut s = TcpStream::connect_timeout(&to, timeout)?;
            s.set_read_timeout(Some(timeout))?;
            let mut framed = (packet.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(packet);
            s.write_all(&framed)?;
            let mut len = [0u8; 2];
            s.read_exact(&mut len)?;
            let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
            s.read_exact(&mut buf)?;
            Ok(buf)
        })
    }

    /// Queries `name`/`rtype` over UDP from inside the namespace; panics without a reply.
    pub fn query(&self, to: SocketAddr, name: &str, rtype: RecordType) -> Message {
        let q = build_query(name, rtype, Some(1232), false);
        let bytes = self
            .udp_exchange(to, &q.to_vec().expect("encode"), Duration::from_secs(3))
            .unwrap_or_else(|e| {
                panic!(
                    "no UDP reply from {to} to {name} {rtype} in {}: {e}",
                    self.name
                )
            });
        let reply = Message::from_vec(&bytes).expect("reply parses");
        assert_eq!(reply.id, q.id, "reply ID must echo the query ID");
        reply
    }

    /// Like [`query`](Self::query) over TCP.
    pub fn query_tcp(&self, to: SocketAddr, name: &str, rtype: RecordType) -> Message {
        let q = build_query(name, rtype, Some(1232), false);
        let bytes = self
            .tcp_exchange(to, &q.to_vec().expect("encode"), Duration::from_secs(3))
            .unwrap_or_else(|e| {
                panic!(
                    "no TCP reply from {to} to {name} {rtype} in {}: {e}",
                    self.name
                )
            });
        let reply = Message::from_vec(&bytes).expect("reply parses");
        assert_eq!(reply.id, q.id, "reply ID must echo the query ID");
        reply
    }

    pub fn link_exists(&self, name: &str) -> bool {
        self.exec(&["ip", "link", "show", "dev", name])
            .status
            .success()
    }

    /// `ip -o addr show dev <name>` (empty if the link does not exist).
    pub fn addrs_of(&self, name: &str) -> String {
        String::from_utf8_lossy(&self.exec(&["ip", "-o", "addr", "show", "dev", name]).stdout)
            .into_owned()
    }

    /// How many times `ip` is on link `name`.
    pub fn addr_count(&self, name: &str, ip: &str) -> usize {
        let needle = format!("inet {ip}/");
        self.addrs_of(name)
            .lines()
            .filter(|l| l.contains(&needle))
            .count()
    }

    /// `iptables-save` of the namespace.
    pub fn iptables_save(&self) -> String {
        self.ok(&["iptables-save"])
    }

    /// Lines of `iptables-save` that carry a nodedns comment.
    pub fn nodedns_rule_count(&self) -> usize {
        self.iptables_save()
            .lines()
            .filter(|l| l.contains("\"nodedns: "))
            .count()
    }

    /// The `-A` lines of `iptables-save`, sorted (counters and dates excluded).
    pub fn rule_lines(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .iptables_save()
            .lines()
            .filter(|l| l.starts_with("-A "))
            .map(str::to_string)
            .collect();
        v.sort();
        v
    }

    /// Names of the links of the namespace, sorted.
    pub fn link_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .ok(&["ip", "-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|s| s.trim().split('@').next().unwrap_or("").to_string())
            .collect();
        v.sort();
        v
    }

    /// `nft list table inet nodedns`, if the table exists.
    pub fn nft_table(&self) -> Option<String> {
        let out = self.exec(&["nft", "list", "table", "inet", "nodedns"]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Rules (lines ending in `notrack` or `accept`) in our nft table; 0 if absent.
    pub fn nft_rule_count(&self) -> usize {
        self.nft_table().map_or(0, |t| {
            t.lines()
                .map(str::trim)
                .filter(|l| l.ends_with(" notrack") || l.ends_with(" accept"))
                .count()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(dir) = self.etc_dir.take() {
            let _ = std::fs::remove_dir_all(&dir);
            // The parent goes too once no test uses it (fails harmlessly otherwise).
            let _ = std::fs::remove_dir("/etc/netns");
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Moves the calling thread into the namespace at `path` and checks that it worked.
fn enter(path: &str) {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    let ino = file.metadata().expect("stat netns file").ino();
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
    let own = std::fs::metadata("/proc/thread-self/ns/net")
        .expect("stat own netns")
        .ino();
    assert_eq!(own, ino, "thread is not in namespace {path}");
}

/// A [`FakeUpstream`] serving inside a namespace, on its own thread and current-thread runtime.
/// Derefs to the fake (records, counters). Stopped on drop.
pub struct NsUpstream {
    up: Option<FakeUpstream>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NsUpstream {
    /// Starts the fake on `addr` (port 0: a free port) inside `ns`.
    pub fn start(ns: &Netns, addr: &str) -> NsUpstream {
        let addr: SocketAddr = addr.parse().expect("upstream address");
        let path = ns.path();
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            enter(&path);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                let up = FakeUpstream::start_on(addr).await;
                let _ = tx.send(up);
                let _ = stop_rx.await;
            });
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(up) => NsUpstream {
                up: Some(up),
                stop: Some(stop),
                thread: Some(thread),
            },
            Err(e) => {
                let why = thread.join().err().map(|p| {
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default()
                });
                panic!(
                    "fake upstream on {addr} in {} did not start: {e} {why:?}",
                    ns.name
                )
            }
        }
    }
}

impl std::ops::Deref for NsUpstream {
    type Target = FakeUpstream;
    fn deref(&self) -> &FakeUpstream {
        self.up.as_ref().expect("fake upstream running")
    }
}

impl Drop for NsUpstream {
    fn drop(&mut self) {
        drop(self.up.take());
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The node-local address and port tests listen on.
pub const LOCAL: &str = "169.254.20.10";
/// `LOCAL:53`.
pub fn local_dns() -> SocketAddr {
    SocketAddr::new(LOCAL.parse().expect("literal"), 53)
}
/// nodedns's default link name.
pub const LINK: &str = "nodelocaldns";

/// nodedns running inside a namespace; killed (SIGKILL) on drop, with its stderr printed if the
/// test is panicking.
pub struct NsNodedns {
    pub ns: String,
    ns_path: String,
    child: Child,
    stderr: Arc<Mutex<Vec<u8>>>,
    status: Option<ExitStatus>,
}

#[allow(dead_code)]
impl NsNodedns {
    /// Starts `nodedns args...` in `ns` with `env` added to its environment; does not wait.
    pub fn spawn(ns: &Netns, args: &[&str], env: &[(&str, &str)]) -> NsNodedns {
        Self::spawn_wrapped(ns, &[], args, env)
    }

    /// Like [`spawn`](Self::spawn), with `wrapper` (e.g. `setpriv ...`) run in front of nodedns.
    pub fn spawn_wrapped(
        ns: &Netns,
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
    ) -> NsNodedns {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name])
            .args(wrapper)
            .arg(bin());
        if let Ok(level) = std::env::var("NODEDNS_TEST_LOG_LEVEL") {
            cmd.args(["--log-level", &level]);
        }
        // No lameduck wait at stop unless the test asks for one (a later flag overrides this).
        cmd.arg("--shutdown-grace=0");
        cmd.args(args);
        // Whatever the test runner's environment says, only `env` chooses a cluster DNS.
        cmd.env_remove("KUBE_DNS_UPSTREAM_SERVICE_HOST")
            .env_remove("KUBE_DNS_UPSTREAM_SERVICE_PORT")
            .env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let (child, stderr) = crate::harness::spawn_capturing_stderr(&mut cmd);
        NsNodedns {
            ns: ns.name.clone(),
            ns_path: ns.path(),
            child,
            stderr,
            status: None,
        }
    }

    /// Starts nodedns and waits until it answers the health query at `LOCAL:53` from inside the
    /// namespace.
    pub fn start(ns: &Netns, args: &[&str], env: &[(&str, &str)]) -> NsNodedns {
        let mut n = NsNodedns::spawn(ns, args, env);
        if let Err(e) = n.wait_ready(local_dns(), Duration::from_secs(15)) {
            panic!(
                "nodedns in {} did not become ready: {e}\nargs: {args:?}\nstderr:\n{}",
                ns.name,
                n.stderr_text()
            );
        }
        // `ip netns exec` execs (no fork): the PID is nodedns's, so SIGTERM reaches it.
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", n.pid())).unwrap_or_default();
        assert_eq!(comm.trim(), "nodedns", "the child is not nodedns itself");
        n
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Polls the health query (health.nodedns. TXT CH) over UDP from inside the namespace until
    /// it is answered, the process exits, or `timeout` passes.
    pub fn wait_ready(&mut self, addr: SocketAddr, timeout: Duration) -> Result<(), String> {
        let start = Instant::now();
        let path = self.ns_path.clone();
        let mut i = 0u16;
        while start.elapsed() < timeout {
            if let Some(st) = self.try_wait() {
                return Err(format!("nodedns exited early: {st}"));
            }
            i = i.wrapping_add(1);
            let q = health_query(0x5000 ^ i);
            let got = std::thread::scope(|s| {
                s.spawn(|| {
                    enter(&path);
                    let sock = UdpSocket::bind("0.0.0.0:0").ok()?;
                    sock.set_read_timeout(Some(Duration::from_millis(200)))
                        .ok()?;
                    sock.connect(addr).ok()?;
                    sock.send(&q).ok()?;
                    let mut buf = [0u8; 512];
                    let n = sock.recv(&mut buf).ok()?;
                    Some(buf[..n].to_vec())
                })
                .join()
                .ok()
                .flatten()
            });
            match got {
                Some(b) if b.len() >= 4 && b[..2] == q[..2] && b[3] & 0x0f == 0 => return Ok(()),
                Some(_) => {}
                // A refused port (not bound yet) returns at once: do not spin.
                None => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        Err(format!(
            "no answer to the health query at {addr} within {timeout:?}"
        ))
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if start.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (bounded) for an exit the test expects, e.g. a startup failure.
    pub fn expect_exit(&mut self) -> ExitStatus {
        match self.wait_exit(Duration::from_secs(15)) {
            Some(st) => st,
            None => panic!(
                "nodedns in {} still running after 15 s; stderr:\n{}",
                self.ns,
                self.stderr_text()
            ),
        }
    }

    /// Waits for a startup failure the test expects and returns its one error line (the binary's
    /// `nodedns: …` line or an ERROR log line), asserting the exit is non-zero and that there is
    /// exactly one such line.
    pub fn expect_one_error_line(&mut self) -> String {
        let st = self.expect_exit();
        let stderr = self.stderr_text();
        assert!(!st.success(), "must fail: {stderr}");
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("nodedns: ") || l.contains("ERROR"))
            .collect();
        assert_eq!(errors.len(), 1, "one error line expected:\n{stderr}");
        errors[0].to_string()
    }

    /// SIGTERM, then waits (bounded) for the exit; panics if it does not come.
    pub fn terminate(&mut self) -> ExitStatus {
        let _ = kill(Pid::from_raw(self.pid() as i32), Signal::SIGTERM);
        match self.wait_exit(Duration::from_secs(15)) {
            Some(st) => st,
            None => panic!(
                "nodedns in {} did not exit within 15 s of SIGTERM; stderr:\n{}",
                self.ns,
                self.stderr_text()
            ),
        }
    }

    /// SIGTERM and asserts a clean exit (status 0).
    pub fn stop(&mut self) {
        let st = self.terminate();
        assert!(
            st.success(),
            "nodedns exited with {st} after SIGTERM; stderr:\n{}",
            self.stderr_text()
        );
    }

    /// SIGKILL (a crash: no teardown) and reaps.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        self.status = self.child.wait().ok();
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// Waits (bounded) for the process's stderr to contain `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        poll(timeout, || self.stderr_text().contains(needle))
    }
}

impl Drop for NsNodedns {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            std::thread::sleep(Duration::from_millis(50));
            eprintln!(
                "---- nodedns stderr (namespace {}) ----\n{}\n---- end nodedns stderr ----",
                self.ns,
                self.stderr_text()
            );
        }
    }
}

/// Polls `f` every 50 ms until it holds or `timeout` passes; the last check decides.
pub fn poll(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// The A addresses of a reply, as strings.
pub fn a_strings(m: &Message) -> Vec<String> {
    harness::a_addrs(m).iter().map(|a| a.to_string()).collect()
}

fn rcode(m: &Message) -> ResponseCode {
    m.metadata.response_code
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

const SVC: &str = "svc-1.default.svc.cluster.local";
const SVC_IP: &str = "10.96.0.11";

/// A namespace with a fake upstream on 127.0.0.1:<free port> that knows `SVC`.
fn ns_with_upstream(tag: &str) -> (Netns, NsUpstream) {
    let ns = Netns::new(tag);
    let up = NsUpstream::start(&ns, "127.0.0.1:0");
    up.set_a(SVC, SVC_IP.parse().expect("literal"), 30);
    (ns, up)
}

/// The usual flags: the local IP, a bridge link, the fake as the only upstream, plus `extra`.
fn args<'a>(up: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["--listen", "169.254.20.10:53", "--upstream", up];
    v.extend_from_slice(extra);
    v
}

/// Asserts that the node-local IP answers SVC from the fake (UDP and TCP).
fn assert_serves(ns: &Netns) {
    let m = ns.query(local_dns(), SVC, RecordType::A);
    assert_eq!(rcode(&m), ResponseCode::NoError, "{m:?}");
    assert_eq!(a_strings(&m), vec![SVC_IP.to_string()], "{m:?}");
    let m = ns.query_tcp(local_dns(), SVC, RecordType::A);
    assert_eq!(a_strings(&m), vec![SVC_IP.to_string()], "{m:?}");
}

/// Asserts that the link exists, is up, carries alias nodedns and `LOCAL/32` exactly once.
fn assert_link_set_up(ns: &Netns) {
    let link = ns.ok(&["ip", "-d", "link", "show", "dev", LINK]);
    assert!(link.contains(",UP"), "link must be up: {link}");
    assert!(
        link.contains("alias nodedns"),
        "alias nodedns expected: {link}"
    );
    let addrs = ns.addrs_of(LINK);
    assert!(addrs.contains(&format!("inet {LOCAL}/32 ")), "{addrs}");
    assert_eq!(
        ns.addr_count(LINK, LOCAL),
        1,
        "exactly one {LOCAL}: {addrs}"
    );
}

#[test]
fn setup_creates_bridge_link_and_serves_on_the_local_ip() {
    require_netns!("setup_creates_bridge_link_and_serves_on_the_local_ip");
    let (ns, up) = ns_with_upstream("setup");
    let upstream = up.addr_str();
    let mut node = NsNodedns::start(&ns, &args(&upstream, &["--link-kind", "bridge"]), &[]);
    assert_link_set_up(&ns);
    let kind = ns.ok(&["ip", "-d", "-o", "link", "show", "dev", LINK]);
    assert!(kind.contains("bridge "), "bridge kind expected: {kind}");
    // firewall auto with the IP on our link: the iptables rules, 12 (health port included).
    assert_eq!(ns.nodedns_rule_count(), 12, "{}", ns.iptables_save());
    assert_serves(&ns);
    assert_eq!(up.queries(SVC), 1, "the TCP query must be a cache hit");
    node.stop();
}

#[test]
fn dummy_link_kind_works_or_names_link_kind_bridge() {
    require_netns!("dummy_link_kind_works_or_names_link_kind_bridge");
    let (ns, up) = ns_with_upstream("dummy");
    let upstream = up.addr_str();
    let has_dummy = ns
        .exec(&["ip", "link", "add", "probe0", "type", "dummy"])
        .status
        .success();
    if has_dummy {
        ns.ok(&["ip", "link", "del", "probe0"]);
        eprintln!(
            "dummy_link_kind_works_or_names_link_kind_bridge: this kernel has the dummy link \
             type; checking the positive case (the error path is not exercised here)"
        );
        let mut node = NsNodedns::start(&ns, &args(&upstream, &[]), &[]);
        let link = ns.ok(&["ip", "-d", "-o", "link", "show", "dev", LINK]);
        assert!(link.contains("dummy"), "{link}");
        assert_link_set_up(&ns);
        assert_serves(&ns);
        node.stop();
        assert!(!ns.link_exists(LINK));
        return;
    }
    // No dummy here: the default (dummy) fails with one line pointing at --link-kind bridge,
    // and nothing is left behind.
    let mut node = NsNodedns::spawn(&ns, &args(&upstream, &[]), &[]);
    let line = node.expect_one_error_line();
    assert!(
        line.starts_with("nodedns: ") && line.contains("--link-kind bridge"),
        "{line}"
    );
    assert!(!ns.link_exists(LINK), "no link may be left behind");
    assert_eq!(ns.nodedns_rule_count(), 0);
}

/// The dummy error line says its message once (`{:#}` of an error whose Display already
/// includes its source repeats it).
#[test]
fn dummy_error_line_is_not_repeated() {
    require_netns!("dummy_error_line_is_not_repeated");
    let (ns, up) = ns_with_upstream("dummy2");
    let upstream = up.addr_str();
    if ns
        .exec(&["ip", "link", "add", "probe0", "type", "dummy"])
        .status
        .success()
    {
        eprintln!("SKIP dummy_error_line_is_not_repeated: this kernel has the dummy link type");
        return;
    }
    let mut node = NsNodedns::spawn(&ns, &args(&upstream, &[]), &[]);
    assert!(!node.expect_exit().success());
    let stderr = node.stderr_text();
    let line = stderr
        .lines()
        .find(|l| l.contains("--link-kind bridge"))
        .unwrap_or_else(|| panic!("no error line:\n{stderr}"));
    assert_eq!(
        line.matches("--link-kind bridge").count(),
        1,
        "the error is repeated in its one line: {line}"
    );
}

#[test]
fn second_start_after_skip_teardown_or_kill_is_idempotent() {
    require_netns!("second_start_after_skip_teardown_or_kill_is_idempotent");
    let (ns, up) = ns_with_upstream("again");
    let upstream = up.addr_str();
    let base = args(&upstream, &["--link-kind", "bridge"]);

    // 1. Stopped with --skip-teardown: everything stays.
    let mut with_skip = base.clone();
    with_skip.push("--skip-teardown");
    let mut first = NsNodedns::start(&ns, &with_skip, &[]);
    first.stop();
    assert_link_set_up(&ns);
    assert_eq!(ns.nodedns_rule_count(), 12);

    // The next start adopts it: one address, no duplicate rules, serving.
    let mut second = NsNodedns::start(&ns, &base, &[]);
    assert_link_set_up(&ns);
    assert_eq!(ns.nodedns_rule_count(), 12, "{}", ns.iptables_save());
    assert_serves(&ns);

    // 2. A crash (SIGKILL): nothing is torn down...
    second.kill9();
    assert_link_set_up(&ns);
    assert_eq!(ns.nodedns_rule_count(), 12);

    // ...and the next start is idempotent again.
    let mut third = NsNodedns::start(&ns, &base, &[]);
    assert_link_set_up(&ns);
    assert_eq!(ns.nodedns_rule_count(), 12, "{}", ns.iptables_save());
    assert_serves(&ns);
    assert!(
        !third.stderr_text().contains("created link"),
        "the existing link must be adopted, not created:\n{}",
        third.stderr_text()
    );

    // The adopted link (alias nodedns) and the rules are removed at a normal exit.
    third.stop();
    assert!(!ns.link_exists(LINK), "adopted link must go at teardown");
    assert_eq!(ns.nodedns_rule_count(), 0, "{}", ns.iptables_save());
}

#[test]
fn reconcile_restores_address_rule_and_link_within_one_interval() {
    require_netns!("reconcile_restores_address_rule_and_link_within_one_interval");
    let (ns, up) = ns_with_upstream("recon");
    let upstream = up.addr_str();
    let mut node = NsNodedns::start(
        &ns,
        &args(
            &upstream,
            &["--link-kind", "bridge", "--sync-interval", "500ms"],
        ),
        &[],
    );
    assert_link_set_up(&ns);
    let wait = Duration::from_secs(5);

    // The address.
    ns.ok(&["ip", "addr", "del", &format!("{LOCAL}/32"), "dev", LINK]);
    assert!(
        poll(wait, || ns.addr_count(LINK, LOCAL) == 1),
        "address not restored within {wait:?}: {}",
        ns.addrs_of(LINK)
    );
    assert!(node.wait_log("address 169.254.20.10 restored", wait));
    assert_serves(&ns);

    // One rule.
    ns.ok(&[
        "iptables",
        "-t",
        "raw",
        "-D",
        "PREROUTING",
        "-d",
        "169.254.20.10/32",
        "-p",
        "udp",
        "-m",
        "udp",
        "--dport",
        "53",
        "-m",
        "socket",
        "-m",
        "comment",
        "--comment",
        "nodedns: skip conntrack",
        "-j",
        "NOTRACK",
    ]);
    let wanted = "-A PREROUTING -d 169.254.20.10/32 -p udp -m udp --dport 53 -m socket -m comment \
                  --comment \"nodedns: skip conntrack\" -j NOTRACK";
    assert!(
        poll(wait, || ns.rule_lines().iter().any(|l| l == wanted)),
        "rule not restored within {wait:?}:\n{}",
        ns.iptables_save()
    );
    assert!(node.wait_log("added back a packet filter rule", wait));
    assert_eq!(ns.nodedns_rule_count(), 12, "{}", ns.iptables_save());

    // The whole link.
    ns.ok(&["ip", "link", "del", LINK]);
    assert!(
        poll(wait, || ns.addr_count(LINK, LOCAL) == 1),
        "link not recreated within {wait:?}"
    );
    assert_link_set_up(&ns);
    // The listeners were bound to the address of the deleted link; traffic must still reach them.
    assert_serves(&ns);

    node.stop();
    assert!(!ns.link_exists(LINK));
    assert_eq!(ns.nodedns_rule_count(), 0);
}

#[test]
fn teardown_removes_exactly_what_was_created() {
    require_netns!("teardown_removes_exactly_what_was_created");
    let (ns, up) = ns_with_upstream("down");
    let upstream = up.addr_str();
    // Foreign state in the same chains and a foreign link, which must survive.
    ns.ok(&[
        "iptables",
        "-t",
        "raw",
        "-I",
        "PREROUTING",
        "-d",
        "10.1.2.3",
        "-j",
        "NOTRACK",
    ]);
    ns.ok(&[
        "iptables", "-t", "filter", "-I", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT",
    ]);
    ns.ok(&["ip", "link", "add", "foreign0", "type", "bridge"]);
    ns.ok(&["ip", "addr", "add", "10.9.9.9/32", "dev", "foreign0"]);
    let rules_before = ns.rule_lines();
    let links_before = ns.link_names();
    let addrs_before = ns.ok(&["ip", "-o", "-4", "addr", "show"]);

    let mut node = NsNodedns::start(&ns, &args(&upstream, &["--link-kind", "bridge"]), &[]);
    assert_link_set_up(&ns);
    assert_eq!(ns.nodedns_rule_count(), 12);
    // Prepended: our rules come first in PREROUTING.
    let first = ns
        .rule_lines_in_order("raw")
        .into_iter()
        .find(|l| l.starts_with("-A PREROUTING"));
    assert!(first.is_some_and(|l| l.contains("nodedns:")));

    node.stop();
    assert!(
        node.stderr_text().contains("removed packet filter rules"),
        "{}",
        node.stderr_text()
    );
    assert!(!ns.link_exists(LINK), "our link must be gone");
    assert_eq!(ns.nodedns_rule_count(), 0, "{}", ns.iptables_save());
    assert_eq!(ns.rule_lines(), rules_before, "foreign rules changed");
    assert_eq!(ns.link_names(), links_before, "foreign links changed");
    assert_eq!(
        ns.ok(&["ip", "-o", "-4", "addr", "show"]),
        addrs_before,
        "foreign addresses changed"
    );
    assert!(ns.addrs_of("foreign0").contains("10.9.9.9/32"));
}

#[test]
fn skip_teardown_leaves_link_address_and_rules() {
    require_netns!("skip_teardown_leaves_link_address_and_rules");
    let (ns, up) = ns_with_upstream("skip");
    let upstream = up.addr_str();
    let mut node = NsNodedns::start(
        &ns,
        &args(
            &upstream,
            &["--link-kind", "bridge", "--skip-teardown=true"],
        ),
        &[],
    );
    // The rules follow the listeners: DNS answers before the last of the 12 is in.
    assert!(
        poll(Duration::from_secs(10), || ns.nodedns_rule_count() == 12),
        "rules: {:?}",
        ns.rule_lines()
    );
    let rules = ns.rule_lines();
    node.stop();
    assert!(node.stderr_text().contains("--skip-teardown"));
    assert_link_set_up(&ns);
    assert_eq!(
        ns.rule_lines(),
        rules,
        "rules changed at a --skip-teardown exit"
    );
    assert_eq!(ns.nodedns_rule_count(), 12);
}

impl Netns {
    /// The `-A` lines of one table in `iptables-save` order.
    pub fn rule_lines_in_order(&self, table: &str) -> Vec<String> {
        self.ok(&["iptables-save", "-t", table])
            .lines()
            .filter(|l| l.starts_with("-A "))
            .map(str::to_string)
            .collect()
    }
}

/// Rules present after setup, restored after deletion, gone after teardown, foreign state kept:
/// the same checks for both backends.
fn firewall_backend_lifecycle(test: &str, backend: &str) {
    let (ns, up) = ns_with_upstream(&backend[..3]);
    let upstream = up.addr_str();
    // Foreign state for both tools.
    ns.ok(&[
        "iptables",
        "-t",
        "raw",
        "-I",
        "PREROUTING",
        "-d",
        "10.1.2.3",
        "-j",
        "NOTRACK",
    ]);
    ns.ok(&["nft", "add", "table", "inet", "foreign"]);
    ns.ok(&[
        "nft",
        "add chain inet foreign c { type filter hook input priority 0; }",
    ]);
    ns.ok(&["nft", "add rule inet foreign c tcp dport 22 accept"]);
    let foreign_nft = ns.ok(&["nft", "list", "table", "inet", "foreign"]);
    let rules_before = ns.rule_lines();

    let mut node = NsNodedns::start(
        &ns,
        &args(
            &upstream,
            &[
                "--link-kind",
                "bridge",
                "--firewall",
                backend,
                "--sync-interval",
                "500ms",
            ],
        ),
        &[],
    );
    assert_serves(&ns);
    let wait = Duration::from_secs(5);
    let count = || match backend {
        "iptables" => ns.nodedns_rule_count(),
        _ => ns.nft_rule_count(),
    };
    assert_eq!(count(), 12, "{test}: rules after setup");
    // Only the chosen backend has rules.
    match backend {
        "iptables" => assert!(ns.nft_table().is_none(), "{test}: nft table with iptables"),
        _ => assert_eq!(
            ns.nodedns_rule_count(),
            0,
            "{test}: iptables rules with nftables"
        ),
    }

    // Delete one rule out of band.
    match backend {
        "iptables" => {
            ns.ok(&[
                "iptables",
                "-t",
                "filter",
                "-D",
                "INPUT",
                "-d",
                "169.254.20.10/32",
                "-p",
                "tcp",
                "-m",
                "tcp",
                "--dport",
                "53",
                "-m",
                "comment",
                "--comment",
                "nodedns: allow DNS",
                "-j",
                "ACCEPT",
            ]);
        }
        _ => {
            let listing = ns.ok(&[
                "nft",
                "-a",
                "list",
                "chain",
                "inet",
                "nodedns",
                "raw-prerouting",
            ]);
            let handle = listing
                .lines()
                .find_map(|l| {
                    let (text, h) = l.trim().split_once(" # handle ")?;
                    (text == "ip daddr 169.254.20.10 udp dport 53 socket transparent 0 notrack")
                        .then(|| h.trim().to_string())
                })
                .unwrap_or_else(|| panic!("{test}: rule not in\n{listing}"));
            ns.ok(&[
                "nft",
                "delete",
                "rule",
                "inet",
                "nodedns",
                "raw-prerouting",
                "handle",
                &handle,
            ]);
        }
    }
    assert!(
        node.wait_log("added back a packet filter rule", wait),
        "{test}: no repair logged within {wait:?}"
    );
    assert!(poll(wait, || count() == 12), "{test}: rule not restored");

    // For nftables, also the whole table.
    if backend == "nftables" {
        ns.ok(&["nft", "delete", "table", "inet", "nodedns"]);
        assert!(poll(wait, || count() == 12), "{test}: table not restored");
    }

    node.stop();
    assert_eq!(ns.nodedns_rule_count(), 0, "{test}: iptables rules left");
    assert!(ns.nft_table().is_none(), "{test}: nft table left");
    assert_eq!(
        ns.rule_lines(),
        rules_before,
        "{test}: foreign iptables rules"
    );
    assert_eq!(
        ns.ok(&["nft", "list", "table", "inet", "foreign"]),
        foreign_nft,
        "{test}: foreign nft table"
    );
    assert!(!ns.link_exists(LINK));
}

#[test]
fn firewall_iptables_lifecycle() {
    let test = "firewall_iptables_lifecycle";
    require_netns!(test);
    if !have_tool(test, "iptables") || !have_tool(test, "nft") {
        return;
    }
    firewall_backend_lifecycle(test, "iptables");
}

#[test]
fn firewall_nftables_lifecycle() {
    let test = "firewall_nftables_lifecycle";
    require_netns!(test);
    if !have_tool(test, "iptables") || !have_tool(test, "nft") {
        return;
    }
    firewall_backend_lifecycle(test, "nftables");
}

#[test]
fn without_setup_interface_the_address_must_exist() {
    require_netns!("without_setup_interface_the_address_must_exist");
    let (ns, up) = ns_with_upstream("nosetup");
    let upstream = up.addr_str();
    let a = args(&upstream, &["--setup-interface=false"]);

    // Absent: one clear line, non-zero, nothing created.
    let mut node = NsNodedns::spawn(&ns, &a, &[]);
    let line = node.expect_one_error_line();
    assert!(
        line.contains(LOCAL) && line.contains("--setup-interface"),
        "{line}"
    );
    assert!(!ns.link_exists(LINK));
    assert_eq!(ns.nodedns_rule_count(), 0);

    // Pre-added by the operator (here on a link of the test's own): served, link untouched.
    ns.ok(&["ip", "link", "add", "pre0", "type", "bridge"]);
    ns.ok(&["ip", "link", "set", "pre0", "up"]);
    ns.ok(&["ip", "addr", "add", &format!("{LOCAL}/32"), "dev", "pre0"]);
    let mut node = NsNodedns::start(&ns, &a, &[]);
    assert_serves(&ns);
    assert!(
        !ns.link_exists(LINK),
        "no link with --setup-interface=false"
    );
    // firewall auto: nothing on a link of ours, so no rules.
    assert_eq!(ns.nodedns_rule_count(), 0);
    node.stop();
    assert_eq!(
        ns.addr_count("pre0", LOCAL),
        1,
        "the operator's address must stay"
    );
}

#[test]
fn without_cap_net_admin_setup_fails_in_one_line_naming_it() {
    require_netns!("without_cap_net_admin_setup_fails_in_one_line_naming_it");
    if !Path::new("/usr/bin/setpriv").exists() {
        println!(
            "SKIP without_cap_net_admin_setup_fails_in_one_line_naming_it: no setpriv (util-linux)"
        );
        return;
    }
    let (ns, up) = ns_with_upstream("nocap");
    let upstream = up.addr_str();
    // Root without CAP_NET_ADMIN: dropped from the bounding and inheritable sets before exec.
    let drop = [
        "setpriv",
        "--bounding-set=-net_admin",
        "--inh-caps=-net_admin",
    ];
    let mut node = NsNodedns::spawn_wrapped(
        &ns,
        &drop,
        &args(&upstream, &["--link-kind", "bridge"]),
        &[],
    );
    let line = node.expect_one_error_line();
    assert!(line.contains("CAP_NET_ADMIN"), "{line}");
    assert!(!ns.link_exists(LINK));
    assert_eq!(ns.nodedns_rule_count(), 0);

    // The same drop with nothing to set up (--setup-interface=false, address pre-added) serves.
    ns.ok(&["ip", "link", "add", "pre0", "type", "bridge"]);
    ns.ok(&["ip", "link", "set", "pre0", "up"]);
    ns.ok(&["ip", "addr", "add", &format!("{LOCAL}/32"), "dev", "pre0"]);
    let mut node = NsNodedns::spawn_wrapped(
        &ns,
        &drop,
        &args(&upstream, &["--setup-interface=false"]),
        &[],
    );
    node.wait_ready(
        format!("{LOCAL}:53").parse().expect("literal"),
        Duration::from_secs(15),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", node.stderr_text()));
    assert_serves(&ns);
    node.stop();
}

#[test]
fn listeners_bind_only_the_given_ips() {
    require_netns!("listeners_bind_only_the_given_ips");
    let (ns, up) = ns_with_upstream("bind");
    let upstream = up.addr_str();
    ns.ok(&["ip", "addr", "add", "127.0.0.2/32", "dev", "lo"]);
    ns.ok(&["ip", "addr", "add", "10.7.7.7/32", "dev", "lo"]);
    let mut node = NsNodedns::start(&ns, &args(&upstream, &["--link-kind", "bridge"]), &[]);
    assert_serves(&ns);

    let q = build_query(SVC, RecordType::A, None, false)
        .to_vec()
        .expect("encode");
    for other in ["127.0.0.2:53", "127.0.0.1:53", "10.7.7.7:53"] {
        let to: SocketAddr = other.parse().expect("literal");
        match ns.udp_exchange(to, &q, Duration::from_millis(500)) {
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused
                        | std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                ),
                "{other}: unexpected error {e}"
            ),
            Ok(reply) => panic!(
                "{other} answered ({} bytes): nodedns binds too widely",
                reply.len()
            ),
        }
        let tcp = ns.tcp_exchange(to, &q, Duration::from_millis(500));
        assert!(tcp.is_err(), "{other}: TCP answered");
    }
    // The sockets themselves: every DNS socket of the namespace is on the local IP.
    let ss = ns.ok(&["ss", "-H", "-lnut"]);
    let dns: Vec<&str> = ss.lines().filter(|l| l.contains(":53 ")).collect();
    assert!(!dns.is_empty(), "{ss}");
    for l in &dns {
        assert!(
            l.contains("169.254.20.10:53"),
            "a DNS socket on another address: {l}\n{ss}"
        );
    }
    node.stop();
}

/// A listener that cannot bind makes nodedns exit non-zero and leave the node as it found it
/// (setup runs before the listeners bind, so it must be undone).
#[test]
fn bind_failure_leaves_nothing_behind() {
    require_netns!("bind_failure_leaves_nothing_behind");
    let (ns, up) = ns_with_upstream("bindfail");
    let upstream = up.addr_str();
    let path = ns.path();
    // Hold 169.254.20.10:53/udp (without SO_REUSEPORT) before the address even exists.
    let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        enter(&path);
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
            .expect("socket");
        s.set_freebind_v4(true).expect("IP_FREEBIND");
        s.bind(&local_dns().into()).expect("bind the local IP");
        let _ = ready_tx.send(());
        let _ = hold_rx.recv_timeout(Duration::from_secs(60));
        drop(s);
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("holder ready");
    let mut node = NsNodedns::spawn(&ns, &args(&upstream, &["--link-kind", "bridge"]), &[]);
    let st = node.expect_exit();
    let stderr = node.stderr_text();
    let _ = hold_tx.send(());
    let _ = holder.join();
    assert!(!st.success(), "{stderr}");
    assert!(stderr.contains("169.254.20.10:53"), "{stderr}");
    assert!(!ns.link_exists(LINK), "link left behind:\n{stderr}");
    assert_eq!(ns.nodedns_rule_count(), 0, "rules left behind");
}

/// An HTTP endpoint that cannot bind makes nodedns exit non-zero; the link, address and rules it
/// already set up must not stay behind (they would capture the node's DNS with no one serving).
#[test]
fn admin_bind_failure_leaves_nothing_behind() {
    require_netns!("admin_bind_failure_leaves_nothing_behind");
    let (ns, up) = ns_with_upstream("admfail");
    let upstream = up.addr_str();
    let path = ns.path();
    let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        enter(&path);
        // A plain listener (no SO_REUSEPORT) on the metrics port.
        let l = std::net::TcpListener::bind("127.0.0.1:9253").expect("bind 127.0.0.1:9253");
        let _ = ready_tx.send(());
        let _ = hold_rx.recv_timeout(Duration::from_secs(60));
        drop(l);
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("holder ready");
    let mut node = NsNodedns::spawn(
        &ns,
        &args(
            &upstream,
            &[
                "--link-kind",
                "bridge",
                "--metrics-listen",
                "127.0.0.1:9253",
            ],
        ),
        &[],
    );
    let st = node.expect_exit();
    let stderr = node.stderr_text();
    let _ = hold_tx.send(());
    let _ = holder.join();
    assert!(!st.success(), "{stderr}");
    assert!(stderr.contains("127.0.0.1:9253"), "{stderr}");
    assert!(!ns.link_exists(LINK), "link left behind:\n{stderr}");
    assert_eq!(
        ns.nodedns_rule_count(),
        0,
        "rules left behind:\n{}\n{stderr}",
        ns.iptables_save()
    );
}

/// SIGTERM while a reconcile pass is running (a very short `--sync-interval` keeps one running
/// most of the time) must still leave no rules and no link: a check that is still running must
/// not put back what teardown just removed.
fn sigterm_during_reconcile(test: &str, backend: &str, cycles: usize) {
    let (ns, up) = ns_with_upstream(&format!("race{}", &backend[..1]));
    let upstream = up.addr_str();
    for cycle in 0..cycles {
        let mut node = NsNodedns::start(
            &ns,
            &args(
                &upstream,
                &[
                    "--link-kind",
                    "bridge",
                    "--firewall",
                    backend,
                    "--sync-interval",
                    "10ms",
                ],
            ),
            &[],
        );
        // Let a few passes run, at a varying phase.
        std::thread::sleep(Duration::from_millis(30 + 7 * cycle as u64));
        node.stop();
        let left = ns.nodedns_rule_count() + ns.nft_rule_count();
        assert_eq!(
            left,
            0,
            "{test}: cycle {cycle}: rules left after teardown:\n{}\n{:?}\nstderr:\n{}",
            ns.iptables_save(),
            ns.nft_table(),
            node.stderr_text()
        );
        assert!(!ns.link_exists(LINK), "{test}: cycle {cycle}: link left");
    }
}

/// SIGTERM while the node is being set up (the link is there, the rules are being written): a
/// clean exit that removes what was set up. The stop handlers used to be installed only when the
/// run loop first waited on them, after setup, so such a SIGTERM killed the process and left the
/// link and rules on the node.
#[test]
fn sigterm_during_setup_tears_down() {
    let test = "sigterm_during_setup_tears_down";
    require_netns!(test);
    if !have_tool(test, "iptables") || !have_tool(test, "nft") {
        return;
    }
    let (ns, up) = ns_with_upstream("setup");
    let upstream = up.addr_str();
    for cycle in 0..4 {
        let mut node = NsNodedns::spawn(
            &ns,
            &args(
                &upstream,
                &["--link-kind", "bridge", "--firewall", "iptables"],
            ),
            &[],
        );
        // The link appears first; the iptables rules take tens of milliseconds of tool runs after.
        let start = std::time::Instant::now();
        while !ns.link_exists(LINK) && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(ns.link_exists(LINK), "{test}: cycle {cycle}: no link");
        node.stop();
        assert_eq!(
            ns.nodedns_rule_count() + ns.nft_rule_count(),
            0,
            "{test}: cycle {cycle}"
        );
        assert!(!ns.link_exists(LINK), "{test}: cycle {cycle}: link left");
    }
}

#[test]
fn sigterm_during_reconcile_iptables() {
    let test = "sigterm_during_reconcile_iptables";
    require_netns!(test);
    if !have_tool(test, "iptables") || !have_tool(test, "nft") {
        return;
    }
    sigterm_during_reconcile(test, "iptables", 8);
}

#[test]
fn sigterm_during_reconcile_nftables() {
    let test = "sigterm_during_reconcile_nftables";
    require_netns!(test);
    if !have_tool(test, "iptables") || !have_tool(test, "nft") {
        return;
    }
    sigterm_during_reconcile(test, "nftables", 8);
}
