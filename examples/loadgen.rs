//! A closed-loop DNS load generator for `bench/e2e.sh`: one UDP socket, `sendmmsg`/`recvmmsg` in
//! batches, at most `--window` queries outstanding, for `--duration` seconds, loopback only.
//!
//! dnsperf saturates its own core near 150-160k qps on the bench machine, below what a good server
//! answers on one core; batching the system calls lets this one outrun the servers it measures.
//!
//! Names: the hot set is `h0.<zone>` .. `h<N-1>.<zone>` (uniformly at random); with `--random-pct P`,
//! P% of queries are for never-repeated names `rnd-<run>-<counter>.<zone>` (misses every time).
//! Queries are type A, class IN, RD set, no EDNS (what a pod's stub resolver sends).
//!
//! Output: a human summary on stderr and one `RESULT key=value ...` line on stdout for scripts.
//! `--first-answer` instead sends one query per millisecond until one is answered and prints the
//! wall-clock time of that answer (`FIRST_ANSWER_NS=<ns since the epoch>`), for start-up timing.
//!
//! ```sh
//! cargo build --release --example loadgen
//! target/release/examples/loadgen --server 127.0.0.1:5300 --duration 10 --hot 1000 --window 256
//! ```

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;

const BATCH: usize = 64;
const BUF: usize = 1500;

#[derive(Parser, Debug)]
#[command(about = "closed-loop DNS load generator (loopback only)")]
struct Args {
    /// The server to load: must be a 127.0.0.0/8 address.
    #[arg(long)]
    server: SocketAddrV4,
    /// How long to send, in seconds (fractions allowed).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Queries outstanding at once.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Size of the hot set (names h0..h<N-1>).
    #[arg(long, default_value_t = 1000)]
    hot: usize,
    /// Percentage of queries for never-repeated names.
    #[arg(long, default_value_t = 0.0)]
    random_pct: f64,
    /// The zone the names are in.
    #[arg(long, default_value = "cluster.local")]
    zone: String,
    /// A query unanswered after this many milliseconds is counted lost.
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
    /// Send one query per millisecond until the first answer, print its time and exit.
    #[arg(long)]
    first_answer: bool,
    /// Walk the hot set in order, once (h0, h1, ...), and stop: fills a cache with exactly --hot
    /// names. --duration still bounds the run.
    #[arg(long)]
    sequential: bool,
}

/// Writes a type-A, class-IN query with RD for `labels` under `zone` into `out`.
fn build_query(out: &mut Vec<u8>, id: u16, first: &[u8], zone: &str) {
    out.clear();
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    out.push(first.len() as u8);
    out.extend_from_slice(first);
    for label in zone
        .trim_end_matches('.')
        .split('.')
        .filter(|l| !l.is_empty())
    {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out.extend_from_slice(&[0, 1, 0, 1]);
}

/// xorshift64*: cheap and good enough to pick hot names.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[derive(Clone, Copy, Default)]
struct Slot {
    busy: bool,
    /// Nanoseconds since the start when the query was sent.
    sent: u64,
}

#[derive(Default)]
struct Totals {
    sent: u64,
    answers: u64,
    lost: u64,
    /// Replies whose ID matched nothing outstanding (late, after their timeout).
    stray: u64,
    rcodes: [u64; 16],
    latency_ns: u128,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !args.server.ip().is_loopback() {
        eprintln!("loadgen: --server must be a loopback address (127.0.0.0/8)");
        return ExitCode::from(2);
    }
    if args.window == 0 || args.window > 60_000 {
        eprintln!("loadgen: --window must be between 1 and 60000");
        return ExitCode::from(2);
    }
    if !(0.0..=100.0).contains(&args.random_pct) || (args.hot == 0 && args.random_pct < 100.0) {
        eprintln!("loadgen: --random-pct must be within 0..=100, and --hot > 0 unless it is 100");
        return ExitCode::from(2);
    }
    if !(args.duration > 0.0 && args.duration <= 3600.0) {
        eprintln!("loadgen: --duration must be within (0, 3600] seconds");
        return ExitCode::from(2);
    }
    let result = if args.first_answer {
        first_answer(&args)
    } else {
        run(&args)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

fn socket(server: SocketAddrV4, read_timeout: Duration) -> io::Result<UdpSocket> {
    let s = UdpSocket::bind("127.0.0.1:0")?;
    s.connect(SocketAddr::V4(server))?;
    s.set_read_timeout(Some(read_timeout))?;
    let fd = s.as_raw_fd();
    let size: libc::c_int = 8 << 20;
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: fd is a valid socket and `size` outlives the call. Failure leaves the default.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    Ok(s)
}

fn first_answer(args: &Args) -> io::Result<()> {
    let s = socket(args.server, Duration::from_millis(1))?;
    let deadline = Instant::now() + Duration::from_secs_f64(args.duration);
    let mut q = Vec::new();
    let mut buf = [0u8; BUF];
    let mut id: u16 = 1;
    while Instant::now() < deadline {
        build_query(&mut q, id, b"h0", &args.zone);
        // Nothing listens yet: ECONNREFUSED comes back on a later call; keep trying.
        let _ = s.send(&q);
        match s.recv(&mut buf) {
            Ok(n) if n >= 12 && buf[2] & 0x80 != 0 => {
                let ns = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_err(io::Error::other)?
                    .as_nanos();
                println!("FIRST_ANSWER_NS={ns}");
                return Ok(());
            }
            _ => {}
        }
        id = id.wrapping_add(1);
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        "no answer before --duration ran out",
    ))
}

fn run(args: &Args) -> io::Result<()> {
    let s = socket(args.server, Duration::from_millis(2))?;
    let fd = s.as_raw_fd();
    let hot: Vec<Vec<u8>> = (0..args.hot)
        .map(|i| format!("h{i}").into_bytes())
        .collect();
    let run_tag = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ u64::from(std::process::id());
    let mut rng = Rng(run_tag | 1);
    let random_cut = (args.random_pct / 100.0 * u64::MAX as f64) as u64;
    let mut random_counter: u64 = 0;
    let timeout = args.timeout_ms * 1_000_000;

    let mut slots = vec![Slot::default(); 65536];
    // IDs in the order sent, to expire the oldest without scanning every slot.
    let mut order: VecDeque<(u16, u64)> = VecDeque::with_capacity(args.window * 4);
    let mut next_id: u16 = 0;
    let mut outstanding = 0usize;
    let mut t = Totals::default();

    let mut send_bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| Vec::with_capacity(128)).collect();
    let mut recv_bufs = vec![[0u8; BUF]; BATCH];
    let mut name = Vec::with_capacity(64);

    let start = Instant::now();
    let ns = |at: Instant| at.duration_since(start).as_nanos() as u64;
    let run_for = (args.duration * 1e9) as u64;
    let mut sending = true;
    let mut seq_next = 0usize;
    let mut last_expire = 0u64;
    loop {
        let now = ns(Instant::now());
        if sending && (now >= run_for || (args.sequential && seq_next >= hot.len())) {
            sending = false;
        }
        if !sending && (outstanding == 0 || now >= run_for + timeout) {
            break;
        }
        // Fill the window.
        let mut k = 0;
        while sending
            && outstanding + k < args.window
            && k < BATCH
            && !(args.sequential && seq_next >= hot.len())
        {
            while slots[next_id as usize].busy {
                next_id = next_id.wrapping_add(1);
            }
            let id = next_id;
            next_id = next_id.wrapping_add(1);
            let r = rng.next();
            let first: &[u8] = if args.sequential {
                seq_next += 1;
                &hot[seq_next - 1]
            } else if r < random_cut {
                random_counter += 1;
                name.clear();
                name.extend_from_slice(format!("rnd-{run_tag:x}-{random_counter}").as_bytes());
                &name
            } else {
                &hot[(r % hot.len() as u64) as usize]
            };
            build_query(&mut send_bufs[k], id, first, &args.zone);
            slots[id as usize] = Slot {
                busy: true,
                sent: now,
            };
            order.push_back((id, now));
            k += 1;
        }
        if k > 0 {
            let sent = send_batch(fd, &send_bufs[..k]);
            // Whatever the kernel refused is not outstanding.
            for b in &send_bufs[sent..k] {
                let id = u16::from_be_bytes([b[0], b[1]]);
                slots[id as usize].busy = false;
            }
            outstanding += sent;
            t.sent += sent as u64;
        }
        // Receive what has arrived (waiting at most the socket's read timeout for the first).
        let n = recv_batch(fd, &mut recv_bufs)?;
        let now = ns(Instant::now());
        for (buf, len) in n {
            if len < 12 {
                continue;
            }
            let id = u16::from_be_bytes([buf[0], buf[1]]);
            let slot = &mut slots[id as usize];
            if !slot.busy {
                t.stray += 1;
                continue;
            }
            slot.busy = false;
            outstanding -= 1;
            t.answers += 1;
            t.rcodes[(buf[3] & 0xF) as usize] += 1;
            t.latency_ns += u128::from(now.saturating_sub(slot.sent));
        }
        // Expire the oldest queries past the timeout, a few times a second at most.
        if now - last_expire > 10_000_000 {
            last_expire = now;
            while let Some(&(id, sent)) = order.front() {
                let slot = &mut slots[id as usize];
                if slot.busy && slot.sent == sent {
                    if now.saturating_sub(sent) < timeout {
                        break;
                    }
                    slot.busy = false;
                    outstanding -= 1;
                    t.lost += 1;
                }
                order.pop_front();
            }
        }
    }
    t.lost += outstanding as u64;
    let secs = start.elapsed().as_secs_f64().min(args.duration).max(1e-9);
    let qps = t.answers as f64 / secs;
    let avg_us = if t.answers > 0 {
        t.latency_ns as f64 / t.answers as f64 / 1000.0
    } else {
        0.0
    };
    eprintln!(
        "loadgen: {:.1}s sent {} answers {} lost {} stray {} qps {:.0} avg latency {:.1} us \
         (NOERROR {}, NXDOMAIN {}, SERVFAIL {}, REFUSED {}; window {}, random {}%)",
        secs,
        t.sent,
        t.answers,
        t.lost,
        t.stray,
        qps,
        avg_us,
        t.rcodes[0],
        t.rcodes[3],
        t.rcodes[2],
        t.rcodes[5],
        args.window,
        args.random_pct
    );
    println!(
        "RESULT qps={qps:.0} sent={} answers={} lost={} stray={} avg_us={avg_us:.1} noerror={} nxdomain={} servfail={} refused={}",
        t.sent, t.answers, t.lost, t.stray, t.rcodes[0], t.rcodes[3], t.rcodes[2], t.rcodes[5]
    );
    Ok(())
}

/// Sends the batch on the connected socket; returns how many were sent (stops at the first error).
fn send_batch(fd: i32, bufs: &[Vec<u8>]) -> usize {
    let mut sent = 0;
    while sent < bufs.len() {
        // SAFETY: each iovec points into a live buffer of the stated length; the socket is
        // connected, so no address is needed.
        let r = unsafe {
            let mut iovs: [libc::iovec; BATCH] = std::mem::zeroed();
            let mut hdrs: [libc::mmsghdr; BATCH] = std::mem::zeroed();
            let rest = &bufs[sent..];
            for (j, b) in rest.iter().enumerate() {
                iovs[j].iov_base = b.as_ptr() as *mut libc::c_void;
                iovs[j].iov_len = b.len();
                hdrs[j].msg_hdr.msg_iov = &mut iovs[j];
                hdrs[j].msg_hdr.msg_iovlen = 1;
            }
            libc::sendmmsg(fd, hdrs.as_mut_ptr(), rest.len() as u32, 0)
        };
        if r <= 0 {
            break;
        }
        sent += r as usize;
    }
    sent
}

/// Receives up to a batch; an empty result when the read timeout passed with nothing.
fn recv_batch(
    fd: i32,
    bufs: &mut [[u8; BUF]],
) -> io::Result<impl Iterator<Item = (&[u8; BUF], usize)>> {
    let mut lens = [0usize; BATCH];
    // SAFETY: the iovecs point into `bufs`, which outlive the call, with their real lengths.
    let n = unsafe {
        let mut iovs: [libc::iovec; BATCH] = std::mem::zeroed();
        let mut hdrs: [libc::mmsghdr; BATCH] = std::mem::zeroed();
        for (i, b) in bufs.iter_mut().enumerate().take(BATCH) {
            iovs[i].iov_base = b.as_mut_ptr().cast();
            iovs[i].iov_len = BUF;
            hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
        }
        let n = libc::recvmmsg(
            fd,
            hdrs.as_mut_ptr(),
            bufs.len().min(BATCH) as u32,
            libc::MSG_WAITFORONE,
            std::ptr::null_mut(),
        );
        for (i, h) in hdrs.iter().enumerate().take(n.max(0) as usize) {
            lens[i] = h.msg_len as usize;
        }
        n
    };
    let n = if n < 0 {
        let e = io::Error::last_os_error();
        match e.kind() {
            // Timeout, a signal, or an ICMP error from an earlier send (server not up): nothing.
            io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
            | io::ErrorKind::Interrupted
            | io::ErrorKind::ConnectionRefused => 0,
            _ => return Err(e),
        }
    } else {
        n as usize
    };
    Ok(bufs.iter().zip(lens).take(n))
}
