//! DNS wire format, the parts nodedns needs and nothing more.
//!
//! The hit path never decodes a whole message: [`scan_query`] reads the header, the question and the
//! OPT record in place (tens of nanoseconds), and [`render`] answers from a cached [`Response`] by
//! copying its bytes and patching the ID, the client's question spelling and the aged TTLs at offsets
//! recorded when the response was stored. Full parsing with hickory-proto happens only on the miss
//! path, in [`Response::from_upstream`], where it validates what upstream sent before it is cached.
//!
//! Nothing here touches a socket or reads a clock: time comes in as an argument.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use thiserror::Error;

/// Size of the fixed DNS header.
pub const HEADER_LEN: usize = 12;
/// Smallest UDP payload every client can take (RFC 1035).
pub const MIN_UDP_PAYLOAD: u16 = 512;
/// The EDNS payload size nodedns advertises and uses upstream (DNS flag day 2020).
pub const EDNS_PAYLOAD: u16 = 1232;
/// Largest UDP reply nodedns sends, whatever larger size a client advertises.
pub const MAX_UDP_PAYLOAD: u16 = 4096;
/// Longest wire-format name (RFC 1035 §2.3.4).
pub const MAX_NAME_LEN: usize = 255;

/// Query types the handler treats specially.
pub const TYPE_OPT: u16 = 41;
pub const TYPE_SOA: u16 = 6;
pub const TYPE_AXFR: u16 = 252;
pub const TYPE_IXFR: u16 = 251;
pub const TYPE_ANY: u16 = 255;
/// Class IN and CHAOS.
pub const CLASS_IN: u16 = 1;
pub const CLASS_CH: u16 = 3;

/// Response codes used by nodedns (RFC 1035 §4.1.1, RFC 6891 for BADVERS).
pub mod rcode {
    pub const NOERROR: u8 = 0;
    pub const FORMERR: u8 = 1;
    pub const SERVFAIL: u8 = 2;
    pub const NXDOMAIN: u8 = 3;
    pub const NOTIMP: u8 = 4;
    pub const REFUSED: u8 = 5;
    /// Extended rcode 16: the upper 8 bits (1) go in the OPT TTL, the lower 4 (0) in the header.
    pub const BADVERS: u16 = 16;
}

// Header flag bits (the 16-bit word at offset 2).
const FLAG_QR: u16 = 0x8000;
const FLAG_AA: u16 = 0x0400;
const FLAG_TC: u16 = 0x0200;
const FLAG_RD: u16 = 0x0100;
const FLAG_RA: u16 = 0x0080;
const FLAG_AD: u16 = 0x0020;
const FLAG_CD: u16 = 0x0010;
const OPCODE_MASK: u16 = 0x7800;
const DO_BIT: u32 = 0x0000_8000;

/// Why a packet could not be scanned. The handler turns these into rcodes or drops.
#[derive(Debug, Error, PartialEq, Eq, Clone, Copy)]
pub enum WireError {
    #[error("packet shorter than a DNS header")]
    TooShort,
    #[error("packet is a response (QR=1)")]
    NotAQuery,
    #[error("QDCOUNT is {0}, expected 1")]
    QuestionCount(u16),
    #[error("malformed question")]
    BadQuestion,
    #[error("malformed record after the question")]
    BadRecord,
    #[error("more than one OPT record")]
    DuplicateOpt,
}

/// The client's EDNS(0) parameters, from its OPT record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edns {
    /// Advertised UDP payload size, raised to at least 512.
    pub udp_payload: u16,
    /// EDNS version; only 0 is supported (others get BADVERS).
    pub version: u8,
    /// DNSSEC OK.
    pub dnssec_ok: bool,
}

/// The cache key of a question: name lowercased in wire format, type, class, and the DO and CD bits,
/// which change what a validating upstream returns.
#[derive(Clone, Copy)]
pub struct KeyBuf {
    name: [u8; MAX_NAME_LEN],
    len: u8,
    pub qtype: u16,
    pub qclass: u16,
    /// bit 0: DO, bit 1: CD.
    pub bits: u8,
}

impl KeyBuf {
    /// The lowercased wire-format name.
    pub fn name(&self) -> &[u8] {
        &self.name[..self.len as usize]
    }
}

impl std::fmt::Debug for KeyBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {} do={} cd={}",
            name_to_string(self.name()),
            self.qtype,
            self.qclass,
            self.bits & 1,
            (self.bits >> 1) & 1
        )
    }
}

/// A query scanned in place: everything the hit path needs, without allocation.
#[derive(Debug, Clone, Copy)]
pub struct QueryView<'a> {
    pub id: u16,
    /// The header's flag word as the client sent it.
    pub flags: u16,
    /// The question exactly as the client wrote it: name, type, class.
    pub question: &'a [u8],
    pub key: KeyBuf,
    pub edns: Option<Edns>,
}

impl QueryView<'_> {
    pub fn opcode(&self) -> u8 {
        ((self.flags & OPCODE_MASK) >> 11) as u8
    }
    pub fn recursion_desired(&self) -> bool {
        self.flags & FLAG_RD != 0
    }
    pub fn checking_disabled(&self) -> bool {
        self.flags & FLAG_CD != 0
    }
    pub fn dnssec_ok(&self) -> bool {
        self.edns.is_some_and(|e| e.dnssec_ok)
    }
    /// The largest UDP reply this client takes: 512 without EDNS, its advertised size (capped at
    /// [`MAX_UDP_PAYLOAD`]) with it.
    pub fn udp_limit(&self) -> usize {
        match self.edns {
            Some(e) => e.udp_payload.clamp(MIN_UDP_PAYLOAD, MAX_UDP_PAYLOAD) as usize,
            None => MIN_UDP_PAYLOAD as usize,
        }
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads the header's ID, if the packet has at least two bytes (used to answer FORMERR to packets that
/// cannot be scanned).
pub fn peek_id(packet: &[u8]) -> Option<u16> {
    (packet.len() >= 2).then(|| be16(packet, 0))
}

/// Scans a query in place: header, the one question (lowercasing the name into the key), and the
/// OPT record if present. Rejects what a resolver must not answer as a normal query.
pub fn scan_query(packet: &[u8]) -> Result<QueryView<'_>, WireError> {
    if packet.len() < HEADER_LEN {
        return Err(WireError::TooShort);
    }
    let id = be16(packet, 0);
    let flags = be16(packet, 2);
    if flags & FLAG_QR != 0 {
        return Err(WireError::NotAQuery);
    }
    let qdcount = be16(packet, 4);
    if qdcount != 1 {
        return Err(WireError::QuestionCount(qdcount));
    }
    let mut name = [0u8; MAX_NAME_LEN];
    let mut pos = HEADER_LEN;
    let mut len = 0usize;
    // Uncompressed name: labels of at most 63 bytes, at most 255 bytes in all. Pointers have no
    // business in the first question, so they are malformed here.
    loop {
        let l = *packet.get(pos).ok_or(WireError::BadQuestion)? as usize;
        if l > 63 || len + l + 1 > MAX_NAME_LEN {
            return Err(WireError::BadQuestion);
        }
        let label = packet.get(pos..pos + 1 + l).ok_or(WireError::BadQuestion)?;
        for (dst, src) in name[len..len + 1 + l].iter_mut().zip(label) {
            *dst = src.to_ascii_lowercase();
        }
        len += l + 1;
        pos += l + 1;
        if l == 0 {
            break;
        }
    }
    let fixed = packet.get(pos..pos + 4).ok_or(WireError::BadQuestion)?;
    let qtype = be16(fixed, 0);
    let qclass = be16(fixed, 2);
    let question_end = pos + 4;
    let question = &packet[HEADER_LEN..question_end];

    // Skip any answer/authority records (unusual in a query) and look for OPT in additional.
    let ancount = be16(packet, 6) as usize;
    let nscount = be16(packet, 8) as usize;
    let arcount = be16(packet, 10) as usize;
    let mut pos = question_end;
    let mut edns = None;
    for i in 0..ancount + nscount + arcount {
        let rr = read_rr(packet, pos).ok_or(WireError::BadRecord)?;
        if i >= ancount + nscount && rr.rtype == TYPE_OPT {
            if edns.is_some() {
                return Err(WireError::DuplicateOpt);
            }
            let ttl = be32(packet, rr.ttl_at);
            edns = Some(Edns {
                udp_payload: be16(packet, rr.ttl_at - 2).max(MIN_UDP_PAYLOAD),
                version: (ttl >> 16) as u8,
                dnssec_ok: ttl & DO_BIT != 0,
            });
        }
        pos = rr.end;
    }
    let bits = u8::from(edns.is_some_and(|e| e.dnssec_ok)) | (u8::from(flags & FLAG_CD != 0) << 1);
    Ok(QueryView {
        id,
        flags,
        question,
        key: KeyBuf {
            name,
            len: len as u8,
            qtype,
            qclass,
            bits,
        },
        edns,
    })
}

/// Where one resource record sits in a message.
struct RrPos {
    rtype: u16,
    /// Offset of the TTL field (class is at `ttl_at - 2`).
    ttl_at: usize,
    /// Offset just past the record.
    end: usize,
}

/// Skips a possibly compressed name; returns the offset after it.
fn skip_name(msg: &[u8], mut pos: usize) -> Option<usize> {
    loop {
        let l = *msg.get(pos)?;
        match l & 0xC0 {
            0x00 if l == 0 => return Some(pos + 1),
            0x00 => pos += 1 + l as usize,
            0xC0 => {
                msg.get(pos + 1)?;
                return Some(pos + 2);
            }
            _ => return None,
        }
    }
}

fn read_rr(msg: &[u8], pos: usize) -> Option<RrPos> {
    let p = skip_name(msg, pos)?;
    let fixed = msg.get(p..p + 10)?;
    let rtype = be16(fixed, 0);
    let rdlen = be16(fixed, 8) as usize;
    let end = p + 10 + rdlen;
    if end > msg.len() {
        return None;
    }
    Some(RrPos {
        rtype,
        ttl_at: p + 4,
        end,
    })
}

/// Renders a wire-format name for logs.
pub fn name_to_string(wire: &[u8]) -> String {
    let mut out = String::new();
    let mut pos = 0;
    while let Some(&l) = wire.get(pos) {
        if l == 0 {
            break;
        }
        let label = wire.get(pos + 1..pos + 1 + l as usize).unwrap_or_default();
        for &c in label {
            if c.is_ascii_graphic() && c != b'.' && c != b'\\' {
                out.push(c as char);
            } else {
                out.push_str(&format!("\\{c:03}"));
            }
        }
        out.push('.');
        pos += 1 + l as usize;
    }
    if out.is_empty() {
        out.push('.');
    }
    out
}

/// Builds the query nodedns sends upstream: the client's header flags (RD, CD) and question bytes
/// under a fresh ID, and an OPT record advertising [`EDNS_PAYLOAD`] with the client's DO bit. The
/// client's own OPT options (cookies, padding) are not forwarded: they belong to its hop.
pub fn build_upstream_query(view: &QueryView<'_>, id: u16, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&id.to_be_bytes());
    let flags = view.flags & (FLAG_RD | FLAG_CD | FLAG_AD | OPCODE_MASK);
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 1]);
    out.extend_from_slice(view.question);
    push_opt(out, EDNS_PAYLOAD, 0, view.dnssec_ok());
}

/// Appends the OPT a query nodedns builds carries ([`EDNS_PAYLOAD`], the DO bit).
pub fn push_query_opt(out: &mut Vec<u8>, dnssec_ok: bool) {
    push_opt(out, EDNS_PAYLOAD, 0, dnssec_ok);
}

/// The offset just past a message's one question (QDCOUNT must be 1, the name uncompressed, as in
/// every message nodedns stores), or `None`.
pub fn question_end(msg: &[u8]) -> Option<usize> {
    if msg.len() < HEADER_LEN || msg[4..6] != [0, 1] {
        return None;
    }
    let mut pos = HEADER_LEN;
    loop {
        let l = usize::from(*msg.get(pos)?);
        if l == 0 {
            pos += 1;
            break;
        }
        if l > 63 || pos - HEADER_LEN + l + 1 > MAX_NAME_LEN {
            return None;
        }
        pos += 1 + l;
    }
    let end = pos + 4;
    (end <= msg.len()).then_some(end)
}

/// Appends an OPT pseudo-record (root name, no options).
fn push_opt(out: &mut Vec<u8>, payload: u16, ext_rcode: u8, dnssec_ok: bool) {
    out.push(0);
    out.extend_from_slice(&TYPE_OPT.to_be_bytes());
    out.extend_from_slice(&payload.to_be_bytes());
    let ttl = (u32::from(ext_rcode) << 24) | if dnssec_ok { DO_BIT } else { 0 };
    out.extend_from_slice(&ttl.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
}

/// Writes a reply made of the header and the client's question only: used for errors (FORMERR,
/// SERVFAIL, REFUSED, NOTIMP) and locally answered queries.
pub fn render_error(view: &QueryView<'_>, rc: u16, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&view.id.to_be_bytes());
    let flags = FLAG_QR | (view.flags & (OPCODE_MASK | FLAG_RD | FLAG_CD)) | FLAG_RA | (rc & 0xF);
    out.extend_from_slice(&flags.to_be_bytes());
    let ar = u16::from(view.edns.is_some());
    out.extend_from_slice(&[0, 1, 0, 0, 0, 0]);
    out.extend_from_slice(&ar.to_be_bytes());
    out.extend_from_slice(view.question);
    if view.edns.is_some() {
        push_opt(out, EDNS_PAYLOAD, (rc >> 4) as u8, view.dnssec_ok());
    }
}

/// A FORMERR for a packet whose question could not be read: header only, the client's ID.
pub fn render_formerr_header(id: u16, flags: u16, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&id.to_be_bytes());
    let flags = FLAG_QR | (flags & (OPCODE_MASK | FLAG_RD)) | FLAG_RA | u16::from(rcode::FORMERR);
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0; 8]);
}

/// What a cached response is: how the cache files it and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// NOERROR with answers.
    Positive,
    /// NXDOMAIN, or NOERROR without answers (NODATA): RFC 2308 negative answers.
    Negative,
    /// SERVFAIL, cached only when `--servfail-ttl` asks for it.
    ServFail,
    /// Anything else (REFUSED, truncated, ...): passed to the client, never cached.
    Uncacheable,
}

/// TTL policy applied when a response is stored (see the README's cache section).
#[derive(Debug, Clone, Copy)]
pub struct TtlPolicy {
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    pub min_negative_ttl: Duration,
    pub max_negative_ttl: Duration,
    pub servfail_ttl: Duration,
    /// Cache positive answers at all (a zone's `cache` may disable either part).
    pub positive: bool,
    /// Cache NXDOMAIN/NODATA at all.
    pub negative: bool,
    /// Serve-stale window past the lifetime (zero: off).
    pub stale: Duration,
    /// Serve-stale `verify` mode (else `immediate`).
    pub stale_verify: bool,
    /// Prefetch: (AMOUNT hits in a row, refresh when less than PCT % of the lifetime is left,
    /// DURATION: hits further apart restart the count).
    pub prefetch: Option<(u32, u8, Duration)>,
}

impl Default for TtlPolicy {
    fn default() -> Self {
        TtlPolicy {
            min_ttl: Duration::ZERO,
            max_ttl: Duration::from_secs(30),
            min_negative_ttl: Duration::ZERO,
            max_negative_ttl: Duration::from_secs(5),
            servfail_ttl: Duration::ZERO,
            positive: true,
            negative: true,
            stale: Duration::ZERO,
            stale_verify: false,
            prefetch: None,
        }
    }
}

/// Why an upstream reply was not accepted.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ResponseError {
    #[error("reply does not parse: {0}")]
    Malformed(String),
    #[error("reply ID does not match")]
    IdMismatch,
    #[error("reply is not a response")]
    NotAResponse,
    #[error("reply question does not match the query")]
    QuestionMismatch,
    #[error("reply too large to store")]
    TooLarge,
}

/// A response from upstream, validated and ready to be cached and served many times.
///
/// The message is stored without any OPT record, and the TTLs in it have already been lowered to the
/// entry's lifetime, so serving only has to subtract the age at the recorded TTL offsets.
///
/// Layout, for speed (see `bench/README.md`): the message bytes, the TTL offsets (2 bytes each,
/// native order) and the cache key's lowercased name share **one** block, `buf`: inside the
/// `Response` itself when they fit (most answers, see [`Storage`]), else one reference-counted heap
/// block. The small fields below sit inline, so the cache stores a `Response` by value in its slot.
/// A cache hit then touches the cache slot and at most one contiguous block, instead of chasing an
/// `Arc<Response>` and then three separate allocations
/// (message, offsets, key name): each chase is a cache and TLB miss once the cache outgrows the CPU
/// caches, which made hits with 100k entries three times slower than with 1k. An entry is one
/// allocation instead of four. The key is kept so the cache can check that an entry answers the
/// question it was found for (the cache indexes entries by a 64-bit hash of the key).
#[derive(Debug, Clone)]
pub struct Response {
    buf: Storage,
    /// A DNS message is at most 65,535 bytes (the TCP length prefix), and its TTL offsets are `u16`.
    msg_len: u16,
    /// Prefetch DURATION in seconds (saturating, ~18 h): hits further apart than this restart the
    /// count toward AMOUNT. Here because `msg_len` fits a `u16`: the entry stays 192 bytes.
    prefetch_gap_s: u16,
    n_ttls: u16,
    /// Offset just past the question.
    pub question_end: u16,
    pub kind: Kind,
    pub rcode: u8,
    key_bits: u8,
    key_qtype: u16,
    key_qclass: u16,
    /// Whole seconds this response may be served from cache (zero: do not cache). Seconds in a
    /// `u32`, not a `Duration`, so the serve-stale and prefetch fields fit in the same 192 bytes.
    lifetime_s: u32,
    /// Past its lifetime, seconds it may still be served stale (RFC 8767; zero: never).
    stale_s: u32,
    /// Age in seconds from which a hit refreshes it in the background (prefetch); `u32::MAX`:
    /// never.
    refresh_s: u32,
    /// Bits 0-6: hits in a row it takes to refresh (CoreDNS's prefetch AMOUNT, 1-127); bit 7: serve-stale `verify` (a stale hit first asks upstream, up to
    /// [`STALE_VERIFY_TIMEOUT`]). One byte, so the weight floor below fits the 192 bytes.
    refresh_flags: u8,
    /// The cache's weight floor (bytes) when this entry was stored (see `cache`): kept in the entry
    /// because quick_cache weighs an entry again when it removes it, so its weight must never change
    /// while it is cached.
    pub weight_floor: u32,
    /// When it was stored.
    pub stored: Instant,
}

/// How a cached response may be served at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Within its lifetime.
    Fresh,
    /// Within its lifetime, before the prefetch window, and its hits count toward prefetch AMOUNT
    /// (AMOUNT > 1): served as fresh, on the hit path's cold side, so the plain fresh hit stays
    /// small enough to inline (the count inside it made it a call: +15 ns a hit, `hit/1000`).
    Counted,
    /// Within its lifetime, in the prefetch window: serve it and refresh it in the background.
    RefreshDue,
    /// Past its lifetime, within its serve-stale window.
    Stale,
}

/// The TTL stale answers carry (RFC 8767 §4 recommends 30 s).
pub const STALE_TTL: u32 = 30;
/// How long a `verify` stale hit waits for upstream before the stale answer is used (RFC 8767's
/// client response timer, 1.8 s).
pub const STALE_VERIFY_TIMEOUT: Duration = Duration::from_millis(1800);

impl Response {
    /// Validates an upstream reply to `view`'s query sent with ID `sent_id`, strips its OPT, works
    /// out its kind and lifetime under `policy`, and lowers every TTL to that lifetime.
    ///
    /// hickory-proto parses the message first: if it does not parse, it is not served or cached.
    pub fn from_upstream(
        reply: &[u8],
        sent_id: u16,
        view: &QueryView<'_>,
        policy: &TtlPolicy,
        now: Instant,
    ) -> Result<Response, ResponseError> {
        if reply.len() < HEADER_LEN {
            return Err(ResponseError::Malformed("short".into()));
        }
        if be16(reply, 0) != sent_id {
            return Err(ResponseError::IdMismatch);
        }
        let flags = be16(reply, 2);
        if flags & FLAG_QR == 0 {
            return Err(ResponseError::NotAResponse);
        }
        if reply.len() > u16::MAX as usize {
            return Err(ResponseError::TooLarge);
        }
        let msg = Message::from_vec(reply).map_err(|e| ResponseError::Malformed(e.to_string()))?;
        // The question must be ours, compared case-insensitively (upstream may normalise case).
        let qend = HEADER_LEN + view.question.len();
        if be16(reply, 4) != 1
            || reply.len() < qend
            || !reply[HEADER_LEN..qend].eq_ignore_ascii_case(view.question)
        {
            return Err(ResponseError::QuestionMismatch);
        }

        // Walk the records once: TTL offsets, the OPT to strip, min answer TTL, the SOA for RFC 2308.
        let counts = [be16(reply, 6), be16(reply, 8), be16(reply, 10)];
        let mut pos = qend;
        let mut ttls = Vec::with_capacity(counts.iter().map(|&c| c as usize).sum());
        let mut opt: Option<(usize, usize)> = None;
        let mut min_answer_ttl: Option<u32> = None;
        let mut soa_negative_ttl: Option<u32> = None;
        for (section, &count) in counts.iter().enumerate() {
            for _ in 0..count {
                let rr = read_rr(reply, pos)
                    .ok_or_else(|| ResponseError::Malformed("record overruns message".into()))?;
                let ttl = be32(reply, rr.ttl_at);
                if rr.rtype == TYPE_OPT {
                    opt = Some((pos, rr.end));
                } else {
                    ttls.push(rr.ttl_at);
                    if section == 0 {
                        min_answer_ttl = Some(min_answer_ttl.map_or(ttl, |m| m.min(ttl)));
                    } else if section == 1 && rr.rtype == TYPE_SOA && soa_negative_ttl.is_none() {
                        // SOA MINIMUM is the last 4 bytes of its RDATA.
                        let minimum = be32(reply, rr.end - 4);
                        soa_negative_ttl = Some(ttl.min(minimum));
                    }
                }
                pos = rr.end;
            }
        }

        // RFC 6891: the extended rcode's upper bits live in the OPT; hickory combined them.
        let rc = u16::from(msg.metadata.response_code);
        let truncated = flags & FLAG_TC != 0;
        let has_answers = counts[0] > 0;
        let kind = if truncated || rc > 15 {
            Kind::Uncacheable
        } else {
            match msg.metadata.response_code {
                ResponseCode::NoError if has_answers => Kind::Positive,
                ResponseCode::NoError | ResponseCode::NXDomain => Kind::Negative,
                ResponseCode::ServFail => Kind::ServFail,
                _ => Kind::Uncacheable,
            }
        };
        // A part the zone does not cache: passed through like an uncacheable answer, its TTLs as
        // upstream gave them (not lowered to a zero lifetime).
        let kind = match kind {
            Kind::Positive if !policy.positive => Kind::Uncacheable,
            Kind::Negative if !policy.negative => Kind::Uncacheable,
            k => k,
        };
        let secs = |d: Duration| d.as_secs().min(u32::MAX as u64) as u32;
        let lifetime_secs: u32 = match kind {
            Kind::Positive => min_answer_ttl.unwrap_or(0).clamp(
                secs(policy.min_ttl),
                secs(policy.max_ttl).max(secs(policy.min_ttl)),
            ),
            // No SOA: RFC 2308 §5 says do not cache.
            Kind::Negative => soa_negative_ttl.map_or(0, |t| {
                t.clamp(
                    secs(policy.min_negative_ttl),
                    secs(policy.max_negative_ttl).max(secs(policy.min_negative_ttl)),
                )
            }),
            Kind::ServFail => secs(policy.servfail_ttl),
            Kind::Uncacheable => 0,
        };
        if let Some((_, end)) = opt
            && end < reply.len()
        {
            // OPT is not the last record: later names may point past it, so cutting it out could
            // break them. Rare; let hickory re-encode the message without the OPT and start over.
            let mut msg = msg;
            msg.edns = None;
            let re = msg
                .to_vec()
                .map_err(|e| ResponseError::Malformed(e.to_string()))?;
            return Response::from_upstream(&re, sent_id, view, policy, now);
        }

        // Copy without the OPT, which is the last record here: nothing points into it, so cutting it
        // off leaves every name and TTL offset where it was.
        // Room for the TTL offsets and the key name too: one allocation (see `Response`).
        let mut bytes = Vec::with_capacity(reply.len() + ttls.len() * 2 + view.key.name().len());
        match opt {
            Some((start, end)) => {
                bytes.extend_from_slice(&reply[..start]);
                bytes.extend_from_slice(&reply[end..]);
                // The OPT was found among the additional records (hickory-proto rejects one in any
                // other section), so ARCOUNT is at least 1; checked anyway, so that a looser parser
                // can never turn a reply into a panic.
                let ar = counts[2].checked_sub(1).ok_or_else(|| {
                    ResponseError::Malformed("OPT outside the additional section".into())
                })?;
                bytes[10..12].copy_from_slice(&ar.to_be_bytes());
            }
            None => bytes.extend_from_slice(reply),
        }
        // Lower every TTL to the lifetime so no served TTL outlives the entry.
        let cap = lifetime_secs;
        for &t in &ttls {
            let v = be32(&bytes, t);
            let lowered = if kind == Kind::Uncacheable {
                v
            } else {
                v.min(cap)
            };
            bytes[t..t + 4].copy_from_slice(&lowered.to_be_bytes());
        }
        let msg_len = bytes.len();
        for &t in &ttls {
            bytes.extend_from_slice(&(t as u16).to_ne_bytes());
        }
        bytes.extend_from_slice(view.key.name());
        Ok(Response {
            buf: Storage::new(bytes),
            msg_len: u16::try_from(msg_len).map_err(|_| ResponseError::TooLarge)?,
            prefetch_gap_s: policy.prefetch.map_or(0, |(_, _, gap)| {
                u16::try_from(gap.as_secs()).unwrap_or(u16::MAX)
            }),
            n_ttls: ttls.len() as u16,
            question_end: qend as u16,
            kind,
            rcode: (rc & 0xF) as u8,
            key_bits: view.key.bits,
            key_qtype: view.key.qtype,
            key_qclass: view.key.qclass,
            lifetime_s: lifetime_secs,
            stale_s: if lifetime_secs > 0 && kind != Kind::ServFail {
                secs(policy.stale)
            } else {
                0
            },
            refresh_s: match policy.prefetch {
                // At most 1 s before expiry (CoreDNS), and never at age 0 on a 1 s entry.
                Some((_, pct, _)) if lifetime_secs >= 2 => {
                    let left =
                        (u64::from(lifetime_secs) * u64::from(pct.clamp(1, 99)) / 100).max(1);
                    lifetime_secs.saturating_sub(left as u32).max(1)
                }
                _ => u32::MAX,
            },
            refresh_flags: policy
                .prefetch
                .map_or(1, |(amount, _, _)| amount.clamp(1, 127) as u8)
                | if policy.stale_verify { 0x80 } else { 0 },
            weight_floor: 0,
            stored: now,
        })
    }

    /// Prefetch AMOUNT: hits in a row (none further apart than [`Self::prefetch_gap_s`]) it takes
    /// for a hit in the refresh window to refresh the entry; 1 when any hit there does (or prefetch
    /// is off).
    #[inline]
    pub fn prefetch_amount(&self) -> u8 {
        self.refresh_flags & 0x7f
    }

    /// Prefetch DURATION, in seconds.
    #[inline]
    pub fn prefetch_gap_s(&self) -> u16 {
        self.prefetch_gap_s
    }

    /// Serve-stale `verify` mode.
    #[inline]
    pub fn stale_verify(&self) -> bool {
        self.refresh_flags & 0x80 != 0
    }

    /// How long this response may be served from cache (zero: do not cache).
    #[inline]
    pub fn lifetime(&self) -> Duration {
        Duration::from_secs(u64::from(self.lifetime_s))
    }

    /// Whether and how this response may be served at `now`; `None` once past its lifetime and
    /// any serve-stale window. The hit path's one clock comparison.
    #[inline]
    pub fn freshness(&self, now: Instant) -> Option<Freshness> {
        let age = now.saturating_duration_since(self.stored).as_secs();
        if age < u64::from(self.lifetime_s) {
            Some(if age >= u64::from(self.refresh_s) {
                Freshness::RefreshDue
            } else if self.refresh_flags & 0x7f > 1 {
                Freshness::Counted
            } else {
                Freshness::Fresh
            })
        } else if age < u64::from(self.lifetime_s) + u64::from(self.stale_s) {
            Some(Freshness::Stale)
        } else {
            None
        }
    }

    /// The stored message (no OPT, TTLs lowered to the lifetime).
    #[inline]
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.msg_len as usize]
    }

    /// Offsets of every RR's TTL field in [`Response::bytes`].
    #[inline]
    pub fn ttl_offsets(&self) -> impl Iterator<Item = usize> + '_ {
        let start = self.msg_len as usize;
        self.buf[start..start + 2 * self.n_ttls as usize]
            .chunks_exact(2)
            .map(|c| u16::from_ne_bytes([c[0], c[1]]) as usize)
    }

    /// Whether this is the response to the question with cache key `key`.
    #[inline]
    pub fn answers(&self, key: &KeyBuf) -> bool {
        let name_at = self.msg_len as usize + 2 * self.n_ttls as usize;
        self.key_qtype == key.qtype
            && self.key_qclass == key.qclass
            && self.key_bits == key.bits
            && &self.buf[name_at..] == key.name()
    }

    /// The cache key's flags (bit 0 DO, bit 1 CD) this response was stored under.
    pub fn key_bits(&self) -> u8 {
        self.key_bits
    }

    /// The cache key's name (lowercased wire format) this response was stored under.
    pub fn key_name(&self) -> &[u8] {
        let name_at = self.msg_len as usize + 2 * self.n_ttls as usize;
        &self.buf[name_at..]
    }

    /// Whether this response may still be served at `now` within its lifetime.
    pub fn is_fresh(&self, now: Instant) -> bool {
        now < self.stored + self.lifetime()
    }

    /// Whether it may be served at `now` at all, stale included.
    pub fn is_servable(&self, now: Instant) -> bool {
        self.freshness(now).is_some()
    }

    /// Memory this response holds, for the cache's byte budget.
    pub fn weight(&self) -> usize {
        std::mem::size_of::<Self>() + self.buf.heap_bytes()
    }
}

/// Bytes of message, TTL offsets and key name kept inside the [`Response`] itself; a larger block
/// goes to the heap. Sized so a `Response` is three cache lines (192 bytes): an A or AAAA answer for a
/// cluster name of up to ~40 bytes (header, question, one or two records, TTL offsets, the key) is
/// 110-140 bytes. Four lines would inline longer names too, but every cached entry pays the size:
/// with 100k entries that was 3 MB more than the heap blocks it saved (bench/README.md).
const INLINE: usize = 142;
// The inline length is a `u8`.
const _: () = assert!(INLINE <= u8::MAX as usize);

/// A response's bytes: inline when small (most answers), else one shared heap block.
///
/// Inline is for speed (see `bench/README.md`): the cache keeps a `Response` by value in its slot,
/// so a hit on an inline response reads the slot and nothing else, one dependent memory access
/// fewer than following a pointer (each is a cache and TLB miss once the cache outgrows the CPU
/// caches), and cloning it is a copy of three cache lines with no atomic reference count shared by
/// every thread serving the same hot name.
#[derive(Clone)]
enum Storage {
    Inline { len: u8, data: [u8; INLINE] },
    Shared(Arc<[u8]>),
}

impl Storage {
    fn new(bytes: Vec<u8>) -> Storage {
        if bytes.len() <= INLINE {
            let mut data = [0u8; INLINE];
            data[..bytes.len()].copy_from_slice(&bytes);
            Storage::Inline {
                len: bytes.len() as u8,
                data,
            }
        } else {
            Storage::Shared(Arc::from(bytes))
        }
    }

    /// Memory held outside the `Response` (the shared block and its two counters).
    fn heap_bytes(&self) -> usize {
        match self {
            Storage::Inline { .. } => 0,
            Storage::Shared(b) => b.len() + 2 * std::mem::size_of::<usize>(),
        }
    }
}

impl std::ops::Deref for Storage {
    type Target = [u8];
    #[inline]
    fn deref(&self) -> &[u8] {
        match self {
            Storage::Inline { len, data } => &data[..usize::from(*len)],
            Storage::Shared(b) => b,
        }
    }
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            Storage::Inline { .. } => "inline",
            Storage::Shared(_) => "shared",
        };
        write!(f, "{kind} {} bytes", self.len())
    }
}

/// Writes the reply to `view` from a cached response into `out`: the client's ID, RD and question
/// spelling, every TTL lowered by the whole seconds since the response was stored, an OPT only if the
/// client sent one, and TC=1 with the question alone if it would not fit in `limit` bytes.
///
/// This is the hit path: one copy and a few stores, no parsing, no allocation once `out` has grown.
pub fn render(
    resp: &Response,
    view: &QueryView<'_>,
    now: Instant,
    limit: usize,
    out: &mut Vec<u8>,
) {
    let age = now.saturating_duration_since(resp.stored).as_secs();
    let age = age.min(u32::MAX as u64) as u32;
    render_ttls(resp, view, limit, out, |ttl| ttl.saturating_sub(age));
}

/// [`render`] for a stale answer (RFC 8767 §4): every TTL is [`STALE_TTL`], at most the record's
/// own stored TTL.
pub fn render_stale(resp: &Response, view: &QueryView<'_>, limit: usize, out: &mut Vec<u8>) {
    render_ttls(resp, view, limit, out, |ttl| ttl.min(STALE_TTL));
}

#[inline(always)]
fn render_ttls(
    resp: &Response,
    view: &QueryView<'_>,
    limit: usize,
    out: &mut Vec<u8>,
    ttl: impl Fn(u32) -> u32,
) {
    let qend = resp.question_end as usize;
    let opt_len = if view.edns.is_some() { 11 } else { 0 };
    let bytes = resp.bytes();
    let flags = be16(bytes, 2);
    // AD only for a client that asked for it (AD or DO set, RFC 6840 §5.8): the entry may have been
    // fetched for a client that did, and AD=1/AD=0 queries share a key.
    let keep_ad = if view.flags & FLAG_AD != 0 || view.dnssec_ok() {
        FLAG_AD
    } else {
        0
    };
    let flags = (flags & !(FLAG_RD | FLAG_CD | FLAG_AA | FLAG_TC | (FLAG_AD & !keep_ad)))
        | (view.flags & (FLAG_RD | FLAG_CD))
        | FLAG_RA;
    out.clear();
    if bytes.len() + opt_len > limit {
        // Too big for this client over UDP: header and question with TC=1 (RFC 2181 §9).
        out.extend_from_slice(&bytes[..qend]);
        out[4..12].copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
        out[2..4].copy_from_slice(&(flags | FLAG_TC).to_be_bytes());
    } else {
        out.extend_from_slice(bytes);
        out[2..4].copy_from_slice(&flags.to_be_bytes());
        for t in resp.ttl_offsets() {
            let v = ttl(be32(out, t));
            out[t..t + 4].copy_from_slice(&v.to_be_bytes());
        }
    }
    out[0..2].copy_from_slice(&view.id.to_be_bytes());
    out[HEADER_LEN..qend].copy_from_slice(view.question);
    if view.edns.is_some() {
        let ar = be16(out, 10) + 1;
        out[10..12].copy_from_slice(&ar.to_be_bytes());
        push_opt(out, EDNS_PAYLOAD, 0, view.dnssec_ok());
    }
}

/// Turns `cluster.local`, `cluster.local.` or `.` into lowercased wire format.
pub fn name_from_str(zone: &str) -> Result<Vec<u8>, String> {
    let z = zone.trim_end_matches('.');
    let mut out = Vec::new();
    if !z.is_empty() {
        for label in z.split('.') {
            if label.is_empty() || label.len() > 63 {
                return Err(format!("bad zone name {zone:?}"));
            }
            out.push(label.len() as u8);
            out.extend(label.bytes().map(|b| b.to_ascii_lowercase()));
        }
    }
    out.push(0);
    if out.len() > MAX_NAME_LEN {
        return Err(format!("zone name {zone:?} is too long"));
    }
    Ok(out)
}

/// Whether a message has TC=1.
pub fn is_truncated(msg: &[u8]) -> bool {
    msg.len() >= 4 && be16(msg, 2) & FLAG_TC != 0
}

/// The rcode of a message (lower 4 bits).
pub fn header_rcode(msg: &[u8]) -> u8 {
    if msg.len() >= 4 { msg[3] & 0xF } else { 0 }
}

#[cfg(test)]
pub(crate) mod tests;
