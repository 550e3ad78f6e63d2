//! The response cache: whole upstream responses in wire format, keyed by (name, type, class, DO, CD).
//!
//! Two bounded caches, one for positive answers and one for negative ones (NXDOMAIN, NODATA and, when
//! enabled, SERVFAIL), so a flood of misses for random names cannot push out the answers that matter.
//! Each is a `quick_cache::sync::Cache`: sharded, read-locked on `get`, with a weighter for the byte
//! budget (see the README for why this and not `lru`). Entries do not expire by themselves: each
//! carries its store time and lifetime, and a lookup past that deadline is a miss.
//!
//! Both bounds hold through one weight: an entry weighs `max(its bytes, byte_budget / max_entries)`,
//! so at most `max_entries` fit and their bytes never exceed the budget.
//!
//! Entries are indexed by a 64-bit hash of the key (a per-process random seed, so it cannot be
//! steered from outside), and every [`Response`] carries its own key, checked on each lookup. This is
//! for speed: the cache's slots hold a `u64` and a `Response` (with a small answer's bytes inside
//! it), so a lookup compares integers in the slot and reads at most one more block, instead of first
//! chasing a separately allocated key name (one more cache and TLB miss per lookup once the cache
//! outgrows the CPU caches; with the one-block `Response`, a hit with 100k entries went from 307 ns
//! to 233 ns, and with small answers inside the slot by a further ~18%, see bench/README.md).
//! Two different keys with the same hash (odds about 2^-64 per pair) share a slot: a lookup of one
//! finds the other's entry, sees the key differ and misses, and storing one replaces the other. That
//! costs an upstream query, never a wrong answer.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use std::hash::BuildHasher;

use quick_cache::{DefaultHashBuilder, Lifecycle, Weighter};

use crate::wire::{KeyBuf, Kind, Response};

/// An owned cache key (the miss path's flight table uses it). The cache itself indexes by a hash of a
/// borrowed [`KeyBuf`], so the hit path does not allocate.
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    name: Box<[u8]>,
    qtype: u16,
    qclass: u16,
    bits: u8,
}

impl Key {
    pub fn from_buf(k: &KeyBuf) -> Key {
        Key {
            name: k.name().into(),
            qtype: k.qtype,
            qclass: k.qclass,
            bits: k.bits,
        }
    }
}

/// Hashes the same fields in the same order for owned and borrowed keys.
fn hash_key<H: Hasher>(name: &[u8], qtype: u16, qclass: u16, bits: u8, h: &mut H) {
    h.write(name);
    h.write_u16(qtype);
    h.write_u16(qclass);
    h.write_u8(bits);
}

impl Hash for Key {
    fn hash<H: Hasher>(&self, h: &mut H) {
        hash_key(&self.name, self.qtype, self.qclass, self.bits, h)
    }
}

/// Borrowed lookup key.
struct KeyRef<'a>(&'a KeyBuf);

impl Hash for KeyRef<'_> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        hash_key(self.0.name(), self.0.qtype, self.0.qclass, self.0.bits, h)
    }
}

/// Cache sizes. Defaults follow the NodeLocal DNSCache addon (9,984 entries each).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub positive_entries: usize,
    pub positive_bytes: u64,
    pub negative_entries: usize,
    pub negative_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            positive_entries: 9984,
            positive_bytes: 32 << 20,
            negative_entries: 9984,
            negative_bytes: 8 << 20,
        }
    }
}

/// An entry's weight: its bytes, but at least `budget / max entries` (the floor), so both bounds
/// hold through one weight. The floor is shared and can change on reload: it is read when an entry
/// is stored, never on a hit.
#[derive(Clone)]
struct EntryWeight {
    floor: Arc<AtomicU64>,
}

impl Weighter<u64, Response> for EntryWeight {
    fn weight(&self, _: &u64, val: &Response) -> u64 {
        let bytes = (val.weight() + std::mem::size_of::<u64>()) as u64;
        bytes.max(self.floor.load(Ordering::Relaxed))
    }
}

/// Counts evictions (not replacements) for the metrics.
#[derive(Clone, Default)]
struct Evictions(Arc<AtomicU64>);

impl Lifecycle<u64, Response> for Evictions {
    type RequestState = ();
    fn on_evict(&self, _: &mut (), _: u64, _: Response) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

type Shard = quick_cache::sync::Cache<u64, Response, EntryWeight, DefaultHashBuilder, Evictions>;

struct Part {
    cache: Shard,
    evictions: Evictions,
    floor: Arc<AtomicU64>,
}

fn floor_of(entries: usize, bytes: u64) -> u64 {
    (bytes.max(1) / entries.max(1) as u64).max(1)
}

impl Part {
    fn new(entries: usize, bytes: u64) -> Part {
        let entries = entries.max(1);
        let bytes = bytes.max(1);
        let evictions = Evictions::default();
        let floor = Arc::new(AtomicU64::new(floor_of(entries, bytes)));
        Part {
            cache: Shard::with(
                entries,
                bytes,
                EntryWeight {
                    floor: floor.clone(),
                },
                DefaultHashBuilder::default(),
                evictions.clone(),
            ),
            evictions,
            floor,
        }
    }

    /// New bounds in place: the byte budget at once (quick_cache evicts down to it), the entry
    /// bound through the weight floor, which entries stored from now on carry (older entries keep
    /// the weight they were stored with until they turn over, so the entry bound converges).
    fn resize(&self, entries: usize, bytes: u64) {
        self.floor
            .store(floor_of(entries, bytes), Ordering::Relaxed);
        self.cache.set_capacity(bytes.max(1));
    }
}

/// What the metrics read from the cache at scrape time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub positive_entries: u64,
    pub positive_bytes: u64,
    pub positive_evictions: u64,
    pub negative_entries: u64,
    pub negative_bytes: u64,
    pub negative_evictions: u64,
}

/// The response cache.
pub struct Cache {
    positive: Part,
    negative: Part,
    /// Hashes keys to the `u64` the parts are indexed by (randomly seeded per process).
    hasher: DefaultHashBuilder,
}

impl Cache {
    pub fn new(limits: Limits) -> Cache {
        Cache {
            positive: Part::new(limits.positive_entries, limits.positive_bytes),
            negative: Part::new(limits.negative_entries, limits.negative_bytes),
            hasher: DefaultHashBuilder::default(),
        }
    }

    #[inline]
    fn slot(&self, key: &KeyBuf) -> u64 {
        self.hasher.hash_one(KeyRef(key))
    }

    /// Looks up a fresh entry (an expired one is a miss, left for the refill to replace) and hands it
    /// to `f` by reference, with whether it is negative: the hit path renders straight from the copy
    /// the cache hands out, with no further move of it.
    #[inline]
    pub fn with_hit<R>(
        &self,
        key: &KeyBuf,
        now: Instant,
        f: impl FnOnce(&Response, bool) -> R,
    ) -> Option<R> {
        let h = self.slot(key);
        if let Some(r) = self.positive.cache.get(&h)
            && r.answers(key)
            && r.is_fresh(now)
        {
            return Some(f(&r, false));
        }
        match self.negative.cache.get(&h) {
            Some(r) if r.answers(key) && r.is_fresh(now) => Some(f(&r, true)),
            _ => None,
        }
    }

    /// Stores a response if its kind and lifetime allow it. A positive answer replaces any negative
    /// entry for the key (the name exists now), and a negative one never replaces a fresh positive
    /// one (a transient NXDOMAIN or SERVFAIL must not shadow good data).
    pub fn insert(&self, key: &KeyBuf, response: Response, now: Instant) -> bool {
        if response.lifetime.is_zero() {
            return false;
        }
        let h = self.slot(key);
        match response.kind {
            Kind::Positive => {
                self.negative.cache.remove_if(&h, |r| r.answers(key));
                self.positive.cache.insert(h, response);
                true
            }
            Kind::Negative | Kind::ServFail => {
                if let Some(p) = self.positive.cache.peek(&h)
                    && p.answers(key)
                    && p.is_fresh(now)
                {
                    return false;
                }
                self.negative.cache.insert(h, response);
                true
            }
            Kind::Uncacheable => false,
        }
    }

    /// Applies new limits without dropping the cache (a reload).
    pub fn resize(&self, limits: Limits) {
        self.positive
            .resize(limits.positive_entries, limits.positive_bytes);
        self.negative
            .resize(limits.negative_entries, limits.negative_bytes);
    }

    /// Keeps only the entries `keep` accepts (a reload drops what the new policy forbids). Takes
    /// each shard's write lock in turn: run it off the hit path's threads.
    pub fn retain(&self, keep: impl Fn(&Response) -> bool) {
        self.positive.cache.retain(|_, r| keep(r));
        self.negative.cache.retain(|_, r| keep(r));
    }

    pub fn stats(&self) -> Stats {
        Stats {
            positive_entries: self.positive.cache.len() as u64,
            positive_bytes: self.positive.cache.weight(),
            positive_evictions: self.positive.evictions.0.load(Ordering::Relaxed),
            negative_entries: self.negative.cache.len() as u64,
            negative_bytes: self.negative.cache.weight(),
            negative_evictions: self.negative.evictions.0.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests;
