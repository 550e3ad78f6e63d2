//! Warm restart: the cache written to a file and read back by the next process.
//!
//! Pure: [`encode`] and [`decode`] take the clocks as arguments and do no I/O (`app` writes the file
//! atomically: temp file, fsync, rename). Nothing in a file is trusted: it may be truncated, corrupt,
//! from another version or another configuration, or written by anyone who can write the path. So
//! only the message and its store time are kept, never the TTL offsets or the cache key: on load
//! every message goes through the same validation as an upstream reply ([`Response::from_upstream`]:
//! hickory-proto parses it, its question must be the one the entry is filed under, its kind and
//! lifetime are worked out again under the *current* zone policy), and its remaining life comes
//! from wall-clock time.
//!
//! Format (big-endian): magic `NDNSCACH`, version `u16`, written-at Unix ms `u64`, configuration
//! fingerprint `u64`, entry count `u32`; per entry: key flags `u8` (DO, CD), stored-at Unix ms
//! `u64`, message length `u16`, message; then a 64-bit FNV-1a checksum of everything before it.

use std::time::{Duration, Instant, SystemTime};

use crate::wire::{self, Response, TtlPolicy};

const MAGIC: &[u8; 8] = b"NDNSCACH";
const VERSION: u16 = 1;
const HEADER: usize = 8 + 2 + 8 + 8 + 4;
/// Entries read from one file at most (a corrupt count must not make us allocate without bound).
pub const MAX_ENTRIES: u32 = 4_000_000;

/// Why a cache file was not used (one warning, then a cold start).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PersistError {
    #[error("not a nodedns cache file")]
    BadMagic,
    #[error("cache file version {0} (this nodedns reads version {VERSION})")]
    Version(u16),
    #[error("the cache file was written under another configuration (zones or servers differ)")]
    OtherConfig,
    #[error("the cache file is truncated or corrupt ({0})")]
    Corrupt(&'static str),
}

/// One entry as found in a file, validated only for framing. The message borrows the file's
/// bytes: a load holds the file once, not a second copy of every message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored<'a> {
    /// Key flags: bit 0 DO, bit 1 CD.
    pub bits: u8,
    pub stored_unix_ms: u64,
    pub message: &'a [u8],
}

/// The longest cache file a cache with these limits writes: every message fits in its entry's
/// byte budget, plus the framing. A longer file was written under a larger cache (or by someone
/// else) and is not read, so a load holds at most this much besides the cache itself.
pub fn max_file_len(limits: &crate::cache::Limits) -> u64 {
    let entries = limits
        .positive_entries
        .saturating_add(limits.negative_entries)
        .min(MAX_ENTRIES as usize) as u64;
    limits
        .positive_bytes
        .saturating_add(limits.negative_bytes)
        .saturating_add(entries.saturating_mul(11))
        .saturating_add((HEADER + 8) as u64)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// FNV-1a, 64 bits: a stable checksum (std's hashers are seeded per process).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Writes `entries` (from [`crate::cache::Cache::snapshot`]) as a cache file. `wall_now` and
/// `mono_now` are the same moment on both clocks, to turn each entry's `Instant` into wall time.
pub fn encode<'a>(
    entries: impl IntoIterator<Item = &'a Response>,
    fingerprint: u64,
    wall_now: SystemTime,
    mono_now: Instant,
) -> Vec<u8> {
    let now_ms = unix_ms(wall_now);
    let mut out = Vec::with_capacity(64 * 1024);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(&now_ms.to_be_bytes());
    out.extend_from_slice(&fingerprint.to_be_bytes());
    let count_at = out.len();
    out.extend_from_slice(&0u32.to_be_bytes());
    let mut count: u32 = 0;
    for r in entries {
        let msg = r.bytes();
        let Ok(len) = u16::try_from(msg.len()) else {
            continue;
        };
        if count >= MAX_ENTRIES {
            break;
        }
        let age_ms = u64::try_from(mono_now.saturating_duration_since(r.stored).as_millis())
            .unwrap_or(u64::MAX);
        out.push(r.key_bits());
        out.extend_from_slice(&now_ms.saturating_sub(age_ms).to_be_bytes());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(msg);
        count += 1;
    }
    out[count_at..count_at + 4].copy_from_slice(&count.to_be_bytes());
    let sum = fnv1a(&out);
    out.extend_from_slice(&sum.to_be_bytes());
    out
}

/// Reads a cache file's entries; any framing problem rejects the whole file.
pub fn decode(bytes: &[u8], fingerprint: u64) -> Result<Vec<Stored<'_>>, PersistError> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(PersistError::BadMagic);
    }
    if bytes.len() < HEADER + 8 {
        return Err(PersistError::Corrupt("shorter than its header"));
    }
    let (body, sum) = bytes.split_at(bytes.len() - 8);
    let version = u16::from_be_bytes([body[8], body[9]]);
    if version != VERSION {
        return Err(PersistError::Version(version));
    }
    let mut sum8 = [0u8; 8];
    sum8.copy_from_slice(sum);
    if fnv1a(body) != u64::from_be_bytes(sum8) {
        return Err(PersistError::Corrupt("checksum mismatch"));
    }
    let be64 = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&body[at..at + 8]);
        u64::from_be_bytes(b)
    };
    if be64(18) != fingerprint {
        return Err(PersistError::OtherConfig);
    }
    let count = u32::from_be_bytes([body[26], body[27], body[28], body[29]]);
    if count > MAX_ENTRIES {
        return Err(PersistError::Corrupt("entry count out of range"));
    }
    let mut out = Vec::with_capacity(count.min(65_536) as usize);
    let mut pos = HEADER;
    for _ in 0..count {
        let head = body
            .get(pos..pos + 11)
            .ok_or(PersistError::Corrupt("entry header past the end"))?;
        let bits = head[0];
        let mut t = [0u8; 8];
        t.copy_from_slice(&head[1..9]);
        let len = usize::from(u16::from_be_bytes([head[9], head[10]]));
        pos += 11;
        let message = body
            .get(pos..pos + len)
            .ok_or(PersistError::Corrupt("message past the end"))?;
        pos += len;
        out.push(Stored {
            bits: bits & 0b11,
            stored_unix_ms: u64::from_be_bytes(t),
            message,
        });
    }
    if pos != body.len() {
        return Err(PersistError::Corrupt("trailing bytes"));
    }
    Ok(out)
}

/// Rebuilds a cache entry from a stored message, validated like an upstream reply, under `policy`
/// (the current zone's), with its store time moved to the monotonic clock. `None` when the message
/// does not validate, is not cacheable, or is past its lifetime and serve-stale window.
pub fn revive(
    s: &Stored<'_>,
    policy_for: impl Fn(&[u8]) -> Option<TtlPolicy>,
    wall_now: SystemTime,
    mono_now: Instant,
) -> Option<(Vec<u8>, Response)> {
    let msg = s.message;
    let question_end = wire::question_end(msg)?;
    // The query this entry answers: its question, its RD/CD bits, an OPT carrying its DO bit.
    let mut q = Vec::with_capacity(question_end + 11);
    q.extend_from_slice(&msg[0..2]);
    let cd: u16 = if s.bits & 2 != 0 { 0x0010 } else { 0 };
    q.extend_from_slice(&(0x0100 | cd).to_be_bytes());
    q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 1]);
    q.extend_from_slice(&msg[wire::HEADER_LEN..question_end]);
    wire::push_query_opt(&mut q, s.bits & 1 != 0);
    let view = wire::scan_query(&q).ok()?;
    let policy = policy_for(view.key.name())?;
    let age = Duration::from_millis(unix_ms(wall_now).saturating_sub(s.stored_unix_ms));
    let stored = mono_now.checked_sub(age)?;
    let id = u16::from_be_bytes([msg[0], msg[1]]);
    let r = Response::from_upstream(msg, id, &view, &policy, stored).ok()?;
    if r.lifetime().is_zero() || !r.is_servable(mono_now) {
        return None;
    }
    Some((q, r))
}

#[cfg(test)]
mod tests;
