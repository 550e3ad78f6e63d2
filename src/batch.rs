//! The crate's only `unsafe` code: batched UDP I/O (`recvmmsg`/`sendmmsg` into reusable buffers),
//! reading the kernel's socket addresses, registering a shared socket with tokio's reactor, and two
//! `sysconf` reads for the `process_*` metrics. Kept
//! in one small module, as quinn keeps its platform socket code in `quinn-udp`, so every `unsafe`
//! block (each with its SAFETY comment) is reviewed in one place; `lib.rs` denies `unsafe_code`
//! everywhere else.

use std::io;
use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::Arc;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Datagrams per `recvmmsg`/`sendmmsg` call.
pub(crate) const BATCH: usize = 32;
/// Receive buffer per datagram; a longer query is not a query nodedns will answer.
pub(crate) const RECV_BUF: usize = 4096;

/// Clock ticks per second (`/proc` CPU times are in these), at least 1.
pub(crate) fn clock_ticks() -> i64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1)
}

/// The page size in bytes (`/proc/self/statm` counts pages), at least 1.
pub(crate) fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64
}

/// Registers a worker's socket with the current runtime's reactor for readiness.
pub(crate) fn register_readable(sock: Arc<StdUdpSocket>) -> io::Result<AsyncFd<Arc<StdUdpSocket>>> {
    // SAFETY: the `Arc` inside the `AsyncFd` keeps the socket, and so its descriptor, open for the
    // `AsyncFd`'s whole life, and `as_raw_fd` on it always returns that descriptor.
    unsafe { AsyncFd::register_with_interest(sock, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// Reusable buffers for one batch of datagrams.
pub(crate) struct Batch {
    pub(crate) bufs: Vec<[u8; RECV_BUF]>,
    pub(crate) lens: [usize; BATCH],
    pub(crate) addrs: [libc::sockaddr_storage; BATCH],
    pub(crate) addr_lens: [libc::socklen_t; BATCH],
    pub(crate) replies: Vec<Vec<u8>>,
    /// Which received datagram each reply answers.
    pub(crate) reply_to: [usize; BATCH],
}

impl Batch {
    pub(crate) fn new() -> Batch {
        Batch {
            bufs: vec![[0u8; RECV_BUF]; BATCH],
            lens: [0; BATCH],
            // SAFETY: sockaddr_storage is plain data; all-zero is a valid (empty) value.
            addrs: unsafe { std::mem::zeroed() },
            addr_lens: [0; BATCH],
            replies: (0..BATCH).map(|_| Vec::with_capacity(RECV_BUF)).collect(),
            reply_to: [0; BATCH],
        }
    }

    /// Receives up to BATCH datagrams: with `MSG_DONTWAIT`, without blocking (`WouldBlock` when
    /// there are none); with `MSG_WAITFORONE`, waiting for the first and taking what else is queued.
    pub(crate) fn recv(&mut self, fd: i32, flags: i32) -> io::Result<usize> {
        // SAFETY: the iovecs and headers point into self's buffers, which outlive the call, and
        // their lengths are the buffers' lengths.
        unsafe {
            let mut iovs: [libc::iovec; BATCH] = std::mem::zeroed();
            let mut hdrs: [libc::mmsghdr; BATCH] = std::mem::zeroed();
            for i in 0..BATCH {
                iovs[i].iov_base = self.bufs[i].as_mut_ptr().cast();
                iovs[i].iov_len = RECV_BUF;
                hdrs[i].msg_hdr.msg_name =
                    (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
                hdrs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
                hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
                hdrs[i].msg_hdr.msg_iovlen = 1;
            }
            let n = libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                BATCH as u32,
                flags,
                std::ptr::null_mut(),
            );
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let n = n as usize;
            for (i, h) in hdrs.iter().enumerate().take(n) {
                // A datagram larger than the buffer is cut (MSG_TRUNC): mark it empty to drop it.
                self.lens[i] = if h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                    0
                } else {
                    h.msg_len as usize
                };
                self.addr_lens[i] = h.msg_hdr.msg_namelen;
            }
            Ok(n)
        }
    }

    /// Sends the first `count` replies to their clients.
    pub(crate) fn send(&mut self, fd: i32, count: usize) {
        let mut sent = 0;
        while sent < count {
            // SAFETY: as in `recv`, every pointer refers to live buffers of the stated length.
            let r = unsafe {
                let mut iovs: [libc::iovec; BATCH] = std::mem::zeroed();
                let mut hdrs: [libc::mmsghdr; BATCH] = std::mem::zeroed();
                for j in sent..count {
                    let k = j - sent;
                    let to = self.reply_to[j];
                    iovs[k].iov_base = self.replies[j].as_mut_ptr().cast();
                    iovs[k].iov_len = self.replies[j].len();
                    hdrs[k].msg_hdr.msg_name =
                        (&mut self.addrs[to] as *mut libc::sockaddr_storage).cast();
                    hdrs[k].msg_hdr.msg_namelen = self.addr_lens[to];
                    hdrs[k].msg_hdr.msg_iov = &mut iovs[k];
                    hdrs[k].msg_hdr.msg_iovlen = 1;
                }
                libc::sendmmsg(
                    fd,
                    hdrs.as_mut_ptr(),
                    (count - sent) as u32,
                    libc::MSG_DONTWAIT,
                )
            };
            if r <= 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::WouldBlock {
                    // The send buffer is full: the rest of the batch would fail the same way, one
                    // system call each. Drop it (clients retry), as a full buffer drops datagrams.
                    tracing::debug!(dropped = count - sent, "udp send buffer full");
                    return;
                }
                // The first message failed for itself (e.g. an unreachable client): skip it and go on.
                sent += 1;
            } else {
                sent += r as usize;
            }
        }
    }
}

/// The client address the kernel wrote into a receive slot.
pub(crate) fn peer_of(sa: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(sa.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in, which it is large enough for.
            let a = unsafe { &*(sa as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::new(ip.into(), u16::from_be(a.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(sa as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                ip,
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}
