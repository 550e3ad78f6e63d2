//! An in-process fake authoritative DNS server used as nodedns' upstream in tests.
//!
//! It listens on UDP and TCP on the same 127.0.0.1 port, answers from a zone that the test can
//! change at run time, and counts what it sees. Replies are built with hickory-proto.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;

/// Per-name behaviour of the fake server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(dead_code)]
pub enum Behavior {
    /// Answer from the zone data.
    Normal,
    /// Wait this many milliseconds, then answer normally.
    Delay(u64),
    /// Never answer.
    Drop,
    /// Answer SERVFAIL.
    ServFail,
    /// Answer REFUSED.
    Refused,
    /// Over UDP answer with TC=1 and no records; over TCP answer normally.
    TruncateUdp,
    /// Answer NXDOMAIN without an SOA in the authority section.
    NxDomainNoSoa,
    /// Answer normally but with a different message ID (a spoofed or stale reply).
    WrongId,
    /// Answer normally but with a different question name in the reply.
    WrongName,
    /// Over UDP: first a flood of forged replies to the querier's port (wrong ID, wrong name, the
    /// other qtype, and the right ID and question from another source port), each claiming
    /// 6.6.6.6, then, 100 ms later, the real answer. RFC 5452: none of the forgeries may win.
    Forge,
    /// Answer with the query's ID followed by bytes that are no DNS response (QR clear, no
    /// question): a broken server, not a forger.
    Garbage,
    /// A well-formed header and question announcing five answers that are not there.
    BadRecords,
    /// Over TCP: the length of the real reply, half of it, then the connection is closed. Over
    /// UDP: answer normally.
    CutTcp,
    /// Over TCP: the connection is reset (SO_LINGER 0) instead of answered. Over UDP: normal.
    ResetTcp,
}

/// The address every forged reply of [`Behavior::Forge`] claims.
pub const FORGED_IP: Ipv4Addr = Ipv4Addr::new(6, 6, 6, 6);

/// Forged copies of `real` (see [`Behavior::Forge`]) to send from the upstream's own socket, and one
/// to send from another port.
fn forgeries(real: &[u8]) -> (Vec<Vec<u8>>, Vec<u8>) {
    let Ok(m) = Message::from_vec(real) else {
        return (Vec::new(), Vec::new());
    };
    let Some(q) = m.queries.first().cloned() else {
        return (Vec::new(), Vec::new());
    };
    let evil = |edit: &dyn Fn(&mut Message)| {
        let mut f = m.clone();
        f.answers.clear();
        let name = f
            .queries
            .first()
            .map(|q| q.name().clone())
            .unwrap_or_else(|| fqdn("x."));
        f.add_answer(Record::from_rdata(name, 86400, RData::A(A(FORGED_IP))));
        edit(&mut f);
        f.to_vec().unwrap_or_default()
    };
    let mut own = Vec::new();
    for delta in 1..=32u16 {
        own.push(evil(&|f: &mut Message| {
            f.metadata.id = f.metadata.id.wrapping_add(delta)
        }));
    }
    own.push(evil(&|f: &mut Message| {
        f.queries.clear();
        f.add_query(hickory_proto::op::Query::query(
            fqdn("evil.example."),
            q.query_type(),
        ));
    }));
    own.push(evil(&|f: &mut Message| {
        f.queries.clear();
        f.add_query(hickory_proto::op::Query::query(
            q.name().clone(),
            RecordType::AAAA,
        ));
    }));
    let other_port = evil(&|_: &mut Message| {});
    (own, other_port)
}

/// Which transport a query arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

#[derive(Clone, Debug)]
struct RecordSet {
    ttl: u32,
    data: Vec<RData>,
}

#[derive(Clone, Copy, Debug)]
struct SoaConfig {
    ttl: u32,
    minimum: u32,
}

#[derive(Default)]
struct State {
    /// (lowercased name without trailing dot, type) -> records.
    zone: HashMap<(String, RecordType), RecordSet>,
    behaviors: HashMap<String, Behavior>,
    /// For names without a behavior of their own (`None`: Normal).
    default_behavior: Option<Behavior>,
    queries: HashMap<String, usize>,
    tcp_queries_by_name: HashMap<String, usize>,
    last_query: HashMap<String, Message>,
    udp_names: Vec<String>,
    udp_queries: usize,
    tcp_queries: usize,
    tcp_connections: usize,
    soa: Option<SoaConfig>,
}

/// Normalises a name for the zone and counters: lowercase, no trailing dot.
pub fn norm(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn fqdn(name: &str) -> Name {
    let mut n = Name::from_ascii(name).unwrap_or_else(|e| panic!("bad name {name:?}: {e}"));
    n.set_fqdn(true);
    n
}

/// Handle to a running fake upstream. Dropping it shuts the server down.
pub struct FakeUpstream {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    shutdown: watch::Sender<bool>,
}

#[allow(dead_code)]
impl FakeUpstream {
    /// Starts a fake upstream on 127.0.0.1 (UDP and TCP on the same, free, port).
    pub async fn start() -> FakeUpstream {
        let mut last_err = None;
        for _ in 0..50 {
            let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind tcp");
            let addr = tcp.local_addr().expect("tcp local addr");
            match UdpSocket::bind(addr).await {
                Ok(udp) => return Self::run(tcp, udp, addr),
                Err(e) => last_err = Some(e),
            }
        }
        panic!("could not bind UDP and TCP on one port: {last_err:?}");
    }

    /// Starts a fake upstream on `addr` (UDP and TCP). With port 0, a port free for both is
    /// chosen. The sockets belong to the calling thread's network namespace, so a thread that has
    /// `setns`-ed into a test namespace serves there.
    pub async fn start_on(addr: SocketAddr) -> FakeUpstream {
        let mut last_err = None;
        for _ in 0..50 {
            let tcp = TcpListener::bind(addr)
                .await
                .unwrap_or_else(|e| panic!("bind tcp {addr}: {e}"));
            let bound = tcp.local_addr().expect("tcp local addr");
            match UdpSocket::bind(bound).await {
                Ok(udp) => return Self::run(tcp, udp, bound),
                Err(e) if addr.port() == 0 => last_err = Some(e),
                Err(e) => panic!("bind udp {addr}: {e}"),
            }
        }
        panic!("could not bind UDP and TCP on one port of {addr}: {last_err:?}");
    }

    fn run(tcp: TcpListener, udp: UdpSocket, addr: SocketAddr) -> FakeUpstream {
        let state = Arc::new(Mutex::new(State {
            soa: Some(SoaConfig {
                ttl: 60,
                minimum: 60,
            }),
            ..State::default()
        }));
        let (shutdown, rx) = watch::channel(false);
        tokio::spawn(udp_loop(Arc::new(udp), state.clone(), rx.clone()));
        tokio::spawn(tcp_loop(tcp, state.clone(), rx));
        FakeUpstream {
            addr,
            state,
            shutdown,
        }
    }

    /// `127.0.0.1:PORT` as a string, for command lines.
    pub fn addr_str(&self) -> String {
        self.addr.to_string()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the records of (name, type).
    pub fn set_records(&self, name: &str, rtype: RecordType, ttl: u32, data: Vec<RData>) {
        self.lock()
            .zone
            .insert((norm(name), rtype), RecordSet { ttl, data });
    }

    pub fn set_a(&self, name: &str, ip: Ipv4Addr, ttl: u32) {
        self.set_records(name, RecordType::A, ttl, vec![RData::A(A(ip))]);
    }

    /// Sets `count` A records 10.1.x.y for `name` (a large answer).
    pub fn set_many_a(&self, name: &str, count: usize, ttl: u32) {
        let data = (0..count)
            .map(|i| RData::A(A(Ipv4Addr::new(10, 1, (i / 256) as u8, (i % 256) as u8))))
            .collect();
        self.set_records(name, RecordType::A, ttl, data);
    }

    pub fn set_aaaa(&self, name: &str, ip: Ipv6Addr, ttl: u32) {
        self.set_records(name, RecordType::AAAA, ttl, vec![RData::AAAA(AAAA(ip))]);
    }

    pub fn set_txt(&self, name: &str, strings: Vec<String>, ttl: u32) {
        self.set_records(
            name,
            RecordType::TXT,
            ttl,
            vec![RData::TXT(TXT::new(strings))],
        );
    }

    /// Sets one TXT record of about `bytes` bytes (split in 250-byte strings).
    pub fn set_big_txt(&self, name: &str, bytes: usize, ttl: u32) {
        let mut strings = Vec::new();
        let mut left = bytes;
        let mut i = 0u8;
        while left > 0 {
            let n = left.min(250);
            strings.push(std::iter::repeat_n((b'a' + i % 26) as char, n).collect());
            left -= n;
            i = i.wrapping_add(1);
        }
        self.set_txt(name, strings, ttl);
    }

    pub fn set_srv(&self, name: &str, port: u16, target: &str, ttl: u32) {
        self.set_records(
            name,
            RecordType::SRV,
            ttl,
            vec![RData::SRV(SRV::new(0, 100, port, fqdn(target)))],
        );
    }

    pub fn set_ptr(&self, name: &str, target: &str, ttl: u32) {
        self.set_records(
            name,
            RecordType::PTR,
            ttl,
            vec![RData::PTR(PTR(fqdn(target)))],
        );
    }

    /// Removes all records of `name` (it becomes NXDOMAIN).
    pub fn remove_name(&self, name: &str) {
        let n = norm(name);
        self.lock().zone.retain(|(k, _), _| *k != n);
    }

    /// Sets the TTL and MINIMUM of the SOA served with negative answers.
    pub fn set_soa(&self, ttl: u32, minimum: u32) {
        self.lock().soa = Some(SoaConfig { ttl, minimum });
    }

    /// Negative answers carry no SOA from now on.
    pub fn clear_soa(&self) {
        self.lock().soa = None;
    }

    /// How names without a behavior of their own are answered.
    pub fn set_default_behavior(&self, behavior: Behavior) {
        self.lock().default_behavior = Some(behavior);
    }

    pub fn set_behavior(&self, name: &str, behavior: Behavior) {
        self.lock().behaviors.insert(norm(name), behavior);
    }

    /// Queries seen for `name` (case-insensitive), over any transport.
    pub fn queries(&self, name: &str) -> usize {
        self.lock().queries.get(&norm(name)).copied().unwrap_or(0)
    }

    /// Queries seen for `name` over TCP.
    pub fn tcp_queries_for(&self, name: &str) -> usize {
        self.lock()
            .tcp_queries_by_name
            .get(&norm(name))
            .copied()
            .unwrap_or(0)
    }

    /// The last query message seen for `name`.
    pub fn last_query(&self, name: &str) -> Option<Message> {
        self.lock().last_query.get(&norm(name)).cloned()
    }

    pub fn udp_queries(&self) -> usize {
        self.lock().udp_queries
    }

    /// The names of the queries seen over UDP, in order (for diagnostics).
    pub fn udp_query_names(&self) -> Vec<String> {
        self.lock().udp_names.clone()
    }

    pub fn tcp_queries(&self) -> usize {
        self.lock().tcp_queries
    }

    pub fn total_queries(&self) -> usize {
        let s = self.lock();
        s.udp_queries + s.tcp_queries
    }

    pub fn tcp_connections(&self) -> usize {
        self.lock().tcp_connections
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

async fn udp_loop(
    sock: Arc<UdpSocket>,
    state: Arc<Mutex<State>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 65535];
    loop {
        let (len, peer) = tokio::select! {
            r = sock.recv_from(&mut buf) => match r {
                Ok(v) => v,
                Err(_) => continue,
            },
            _ = shutdown.changed() => return,
        };
        let packet = buf[..len].to_vec();
        let sock = sock.clone();
        let state = state.clone();
        let mut rx = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                reply = handle(&packet, Transport::Udp, &state) => {
                    if let Some(reply) = reply {
                        let forge = Message::from_vec(&packet)
                            .ok()
                            .and_then(|q| q.queries.first().map(|q| norm(&q.name().to_ascii())))
                            .is_some_and(|name| {
                                let s = state.lock().unwrap_or_else(|e| e.into_inner());
                                matches!(s.behaviors.get(&name), Some(Behavior::Forge))
                            });
                        if forge {
                            let (own, other) = forgeries(&reply);
                            for f in &own {
                                let _ = sock.send_to(f, peer).await;
                            }
                            if let Ok(s) = UdpSocket::bind("127.0.0.1:0").await {
                                for _ in 0..8 {
                                    let _ = s.send_to(&other, peer).await;
                                }
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        let _ = sock.send_to(&reply, peer).await;
                    }
                }
                _ = rx.changed() => {}
            }
        });
    }
}

async fn tcp_loop(
    listener: TcpListener,
    state: Arc<Mutex<State>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
            _ = shutdown.changed() => return,
        };
        state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .tcp_connections += 1;
        let state = state.clone();
        let mut rx = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tcp_conn(stream, state, rx.clone()) => {}
                _ = rx.changed() => {}
            }
        });
    }
}

async fn tcp_conn(stream: TcpStream, state: Arc<Mutex<State>>, shutdown: watch::Receiver<bool>) {
    let (mut rd, wr) = stream.into_split();
    let wr = Arc::new(tokio::sync::Mutex::new(wr));
    loop {
        let mut len = [0u8; 2];
        if rd.read_exact(&mut len).await.is_err() {
            return;
        }
        let mut packet = vec![0u8; u16::from_be_bytes(len) as usize];
        if rd.read_exact(&mut packet).await.is_err() {
            return;
        }
        match behavior_of(&packet, &state) {
            Behavior::CutTcp => {
                if let Some(reply) = handle(&packet, Transport::Tcp, &state).await {
                    let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&reply[..reply.len() / 2]);
                    let mut w = wr.lock().await;
                    let _ = w.write_all(&framed).await;
                    let _ = w.shutdown().await;
                }
                return;
            }
            Behavior::ResetTcp => {
                state.lock().unwrap_or_else(|e| e.into_inner()).tcp_queries += 1;
                // Closed with linger 0: the kernel sends a reset.
                let _ = socket2::SockRef::from(rd.as_ref()).set_linger(Some(Duration::ZERO));
                return;
            }
            _ => {}
        }
        // Answer each query in its own task, so that replies may come back out of order.
        let wr = wr.clone();
        let state = state.clone();
        let mut rx = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                reply = handle(&packet, Transport::Tcp, &state) => {
                    if let Some(reply) = reply {
                        let mut framed = Vec::with_capacity(reply.len() + 2);
                        framed.extend_from_slice(&(reply.len() as u16).to_be_bytes());
                        framed.extend_from_slice(&reply);
                        let _ = wr.lock().await.write_all(&framed).await;
                    }
                }
                _ = rx.changed() => {}
            }
        });
    }
}

/// Builds the reply to one query packet; `None` means no reply.
async fn handle(packet: &[u8], transport: Transport, state: &Mutex<State>) -> Option<Vec<u8>> {
    let query = Message::from_vec(packet).ok()?;
    if query.message_type != MessageType::Query {
        return None;
    }
    let q = query.queries.first()?.clone();
    let key = norm(&q.name().to_ascii());
    let behavior = {
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        *s.queries.entry(key.clone()).or_default() += 1;
        match transport {
            Transport::Udp => {
                s.udp_queries += 1;
                s.udp_names.push(key.clone());
            }
            Transport::Tcp => {
                s.tcp_queries += 1;
                *s.tcp_queries_by_name.entry(key.clone()).or_default() += 1;
            }
        }
        s.last_query.insert(key.clone(), query.clone());
        s.behaviors
            .get(&key)
            .copied()
            .or(s.default_behavior)
            .unwrap_or(Behavior::Normal)
    };

    let mut reply = Message::response(query.id, query.op_code);
    reply.metadata.recursion_desired = query.recursion_desired;
    reply.metadata.checking_disabled = query.checking_disabled;
    reply.metadata.recursion_available = true;
    reply.metadata.authoritative = true;
    reply.add_query(q.clone());
    if let Some(qe) = &query.edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        e.set_dnssec_ok(qe.flags().dnssec_ok);
        reply.set_edns(e);
    }
    if query.op_code != OpCode::Query {
        reply.metadata.response_code = ResponseCode::NotImp;
        return reply.to_vec().ok();
    }

    match behavior {
        Behavior::Drop => return None,
        Behavior::Delay(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
        Behavior::ServFail => {
            reply.metadata.response_code = ResponseCode::ServFail;
            return reply.to_vec().ok();
        }
        Behavior::Refused => {
            reply.metadata.response_code = ResponseCode::Refused;
            return reply.to_vec().ok();
        }
        Behavior::TruncateUdp if transport == Transport::Udp => {
            reply.metadata.truncation = true;
            return reply.to_vec().ok();
        }
        Behavior::NxDomainNoSoa => {
            reply.metadata.response_code = ResponseCode::NXDomain;
            return reply.to_vec().ok();
        }
        Behavior::WrongId => reply.metadata.id = query.id ^ 0x5a5a,
        Behavior::WrongName => {
            reply.queries.clear();
            reply.add_query(hickory_proto::op::Query::query(
                fqdn("spoofed.invalid."),
                q.query_type(),
            ));
        }
        Behavior::Garbage => {
            let mut g = query.id.to_be_bytes().to_vec();
            g.extend((0u8..40).map(|i| i.wrapping_mul(37) & 0x7f));
            return Some(g);
        }
        Behavior::Normal
        | Behavior::TruncateUdp
        | Behavior::Forge
        | Behavior::BadRecords
        | Behavior::CutTcp
        | Behavior::ResetTcp => {}
    }

    // Zone lookup (read after any delay, so that a changed answer is seen).
    let (name_exists, rrset, soa) = {
        let s = state.lock().unwrap_or_else(|e| e.into_inner());
        let exists = s.zone.keys().any(|(n, _)| *n == key);
        (
            exists,
            s.zone.get(&(key.clone(), q.query_type())).cloned(),
            s.soa,
        )
    };
    match rrset {
        Some(set) => {
            for d in set.data {
                reply.add_answer(Record::from_rdata(q.name().clone(), set.ttl, d));
            }
        }
        None => {
            if !name_exists {
                reply.metadata.response_code = ResponseCode::NXDomain;
            }
            if let Some(soa) = soa {
                let rdata = SOA::new(
                    fqdn("ns.fake."),
                    fqdn("hostmaster.fake."),
                    1,
                    3600,
                    600,
                    86400,
                    soa.minimum,
                );
                reply.add_authority(Record::from_rdata(Name::root(), soa.ttl, RData::SOA(rdata)));
            }
        }
    }

    let bytes = reply.to_vec().ok()?;
    if transport == Transport::Udp {
        let limit = query
            .edns
            .as_ref()
            .map(|e| e.max_payload().max(512))
            .unwrap_or(512) as usize;
        if bytes.len() > limit {
            reply.answers.clear();
            reply.authorities.clear();
            reply.additionals.clear();
            reply.metadata.truncation = true;
            return reply.to_vec().ok();
        }
    }
    if behavior == Behavior::BadRecords {
        let mut bad = bytes;
        if bad.len() >= 8 {
            bad[6..8].copy_from_slice(&5u16.to_be_bytes());
        }
        return Some(bad);
    }
    Some(bytes)
}

/// The behaviour set for the name `packet` asks about (for the transports' own faults).
fn behavior_of(packet: &[u8], state: &Mutex<State>) -> Behavior {
    let Some(name) = Message::from_vec(packet)
        .ok()
        .and_then(|q| q.queries.first().map(|q| norm(&q.name().to_ascii())))
    else {
        return Behavior::Normal;
    };
    let s = state.lock().unwrap_or_else(|e| e.into_inner());
    s.behaviors
        .get(&name)
        .copied()
        .or(s.default_behavior)
        .unwrap_or(Behavior::Normal)
}
