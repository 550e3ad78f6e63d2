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
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use std::hash::BuildHasher;

use quick_cache::{DefaultHashBuilder, Lifecycle, Weighter};

use crate::wire::{Freshness, KeyBuf, Kind, Response};

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
/// hold through one weight. The floor is stamped into the entry when it is stored
/// ([`Response::weight_floor`]), so an entry's weight never changes while it is cached (quick_cache
/// weighs it again on removal; a weight read from a shared, reloadable floor made that subtraction
/// underflow).
#[derive(Clone, Copy)]
struct EntryWeight;

impl Weighter<u64, Response> for EntryWeight {
    fn weight(&self, _: &u64, val: &Response) -> u64 {
        let bytes = (val.weight() + std::mem::size_of::<u64>()) as u64;
        bytes.max(u64::from(val.weight_floor))
    }
}

/// `floor` as the entry keeps it (floors past 4 GiB, a budget of 4 GiB per entry, saturate).
fn floor_units(floor: u64) -> u32 {
    u32::try_from(floor).unwrap_or(u32::MAX)
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

/// The smallest weight an entry can have: a `Response` and its slot key, with nothing on the heap.
const MIN_ENTRY_WEIGHT: u64 = (std::mem::size_of::<Response>() + std::mem::size_of::<u64>()) as u64;

/// quick_cache keeps the hashes of recently evicted entries ("ghosts", for its CLOCK-Pro admission)
/// in the same slab as live ones, one full slot each, up to `ghost_allocation` × its estimated item
/// count. nodedns used to pass the entry cap as that estimate: with `--cache-size 1000000` and a
/// 4 MiB budget, 400k distinct names grew RSS to 99 MB (and rising) while the cache held 4 MiB of
/// entries. The estimate is now what the byte budget can hold at most (`bytes / MIN_ENTRY_WEIGHT`,
/// or the entry cap if smaller), and ghosts get a quarter of it, so their slots cost at most a
/// quarter of the byte budget whatever the entry caps say.
fn estimated_items(entries: usize, bytes: u64) -> usize {
    let by_bytes = usize::try_from(bytes / MIN_ENTRY_WEIGHT).unwrap_or(usize::MAX);
    entries.min(by_bytes).max(1)
}

/// See [`estimated_items`].
const GHOST_ALLOCATION: f64 = 0.25;

impl Part {
    fn new(entries: usize, bytes: u64) -> Part {
        let entries = entries.max(1);
        let bytes = bytes.max(1);
        let evictions = Evictions::default();
        let floor = Arc::new(AtomicU64::new(floor_of(entries, bytes)));
        let mut options = quick_cache::OptionsBuilder::new();
        options
            .estimated_items_capacity(estimated_items(entries, bytes))
            .weight_capacity(bytes)
            .ghost_allocation(GHOST_ALLOCATION);
        let cache = match options.build() {
            Ok(o) => Shard::with_options(
                o,
                EntryWeight,
                DefaultHashBuilder::default(),
                evictions.clone(),
            ),
            // Not reachable with these values (quick_cache rejects only a ghost or hot allocation
            // outside [0, 1]); the defaults are a safe fallback.
            Err(_) => Shard::with(
                estimated_items(entries, bytes),
                bytes,
                EntryWeight,
                DefaultHashBuilder::default(),
                evictions.clone(),
            ),
        };
        Part {
            cache,
            evictions,
            floor,
        }
    }

    /// New bounds in place, both exact at once. A changed weight floor re-weighs every entry
    /// (re-inserting it: quick_cache weighs only on insert), so the entry bound holds for old entries
    /// too; then the byte budget is applied, and whatever quick_cache's per-shard eviction leaves
    /// over either bound (it stops at an empty cold list) is removed. O(entries), on a reload only,
    /// off the hit path's threads.
    fn resize(&self, entries: usize, bytes: u64) {
        let (entries, bytes) = (entries.max(1), bytes.max(1));
        let floor = floor_of(entries, bytes);
        if self.floor.swap(floor, Ordering::Relaxed) != floor {
            let units = floor_units(floor);
            for (k, mut r) in self.cache.iter() {
                r.weight_floor = units;
                self.cache.replace(k, r, true).ok();
            }
        }
        self.cache.set_capacity(bytes);
        if self.cache.weight() > bytes || self.cache.len() > entries {
            for (k, _) in self.cache.iter() {
                if self.cache.weight() <= bytes && self.cache.len() <= entries {
                    break;
                }
                self.cache.remove(&k);
            }
        }
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

/// Background refreshes in progress (or recently failed), one bit per slot hash: a hot name in its
/// prefetch or stale window triggers one refresh, not one per hit. Like CoreDNS's per-item
/// `refreshing` flag, but quick_cache hands out copies, so the flag lives here, indexed by the hash
/// the lookup already computed; two keys sharing a bit delay each other's refresh by at most one
/// refresh. 1,024 words (8 KiB), touched only by hits inside a refresh window.
struct RefreshGate {
    bits: Box<[AtomicU64]>,
    /// Prefetch hit counts, per slot hash, for AMOUNT > 1: bits 8-31 the second of the last hit
    /// (since `base`, wrapping), bits 0-7 hits in a row up to then (capped at AMOUNT, so a name
    /// that has its count writes here at most once a second). Two keys sharing a counter add up:
    /// at worst a name is refreshed that had fewer hits of its own. 64 KiB, touched only by hits
    /// on entries of zones with AMOUNT > 1.
    hits: Box<[AtomicU32]>,
    base: Instant,
}

const GATE_WORDS: usize = 1024;
const HIT_COUNTERS: usize = 16 * 1024;

impl RefreshGate {
    fn new() -> RefreshGate {
        RefreshGate {
            bits: (0..GATE_WORDS).map(|_| AtomicU64::new(0)).collect(),
            hits: (0..HIT_COUNTERS).map(|_| AtomicU32::new(0)).collect(),
            base: Instant::now(),
        }
    }

    fn word_bit(slot: u64) -> (usize, u64) {
        let bit = slot as usize % (GATE_WORDS * 64);
        (bit / 64, 1u64 << (bit % 64))
    }

    fn try_begin(&self, slot: u64) -> bool {
        let (w, b) = Self::word_bit(slot);
        self.bits[w].fetch_or(b, Ordering::AcqRel) & b == 0
    }

    fn is_busy(&self, slot: u64) -> bool {
        let (w, b) = Self::word_bit(slot);
        self.bits[w].load(Ordering::Acquire) & b != 0
    }

    fn end(&self, slot: u64) {
        let (w, b) = Self::word_bit(slot);
        // The hit count stays: CoreDNS copies an item's frequency into its refreshed copy.
        self.bits[w].fetch_and(!b, Ordering::AcqRel);
    }

    /// Counts a hit at `now`; says whether `amount` hits in a row, none more than `gap_s` after
    /// the one before, have been seen. A plain load and store, not a read-modify-write: two
    /// workers' hits at once may count as one, which only delays a refresh by a hit.
    fn count(&self, slot: u64, amount: u8, gap_s: u16, now: Instant) -> bool {
        const SECS: u32 = 0xff_ffff;
        let c = &self.hits[slot as usize % HIT_COUNTERS];
        let t = (now.saturating_duration_since(self.base).as_secs() as u32) & SECS;
        let v = c.load(Ordering::Relaxed);
        let (last, n) = (v >> 8, v & 0xff);
        let n = if t.wrapping_sub(last) & SECS > u32::from(gap_s) {
            1
        } else {
            (n + 1).min(u32::from(amount))
        };
        let next = (t << 8) | n;
        if next != v {
            c.store(next, Ordering::Relaxed);
        }
        n >= u32::from(amount)
    }
}

/// The response cache.
pub struct Cache {
    positive: Part,
    negative: Part,
    /// Hashes keys to the `u64` the parts are indexed by (randomly seeded per process).
    hasher: DefaultHashBuilder,
    refresh: RefreshGate,
}

impl Cache {
    pub fn new(limits: Limits) -> Cache {
        Cache {
            positive: Part::new(limits.positive_entries, limits.positive_bytes),
            negative: Part::new(limits.negative_entries, limits.negative_bytes),
            hasher: DefaultHashBuilder::default(),
            refresh: RefreshGate::new(),
        }
    }

    /// The slot hash of `key` (what the refresh calls take).
    pub fn slot_of(&self, key: &KeyBuf) -> u64 {
        self.slot(key)
    }

    /// Counts a hit on slot `slot` toward prefetch AMOUNT `amount` (hits further apart than `gap_s`
    /// seconds restart the count); says whether it is reached. Only entries of zones with
    /// AMOUNT > 1 come here, from every hit (see [`Freshness::Counted`]).
    pub fn count_hit(&self, slot: u64, amount: u8, gap_s: u16, now: Instant) -> bool {
        self.refresh.count(slot, amount, gap_s, now)
    }

    /// Claims the background refresh of slot `slot`: `true` for the first caller, until
    /// [`Cache::end_refresh`].
    pub fn try_begin_refresh(&self, slot: u64) -> bool {
        self.refresh.try_begin(slot)
    }

    /// Whether a refresh of `slot` is running or failed within the recheck period.
    pub fn refresh_busy(&self, slot: u64) -> bool {
        self.refresh.is_busy(slot)
    }

    /// Releases a refresh claim.
    pub fn end_refresh(&self, slot: u64) {
        self.refresh.end(slot);
    }

    #[inline]
    fn slot(&self, key: &KeyBuf) -> u64 {
        self.hasher.hash_one(KeyRef(key))
    }

    /// Looks up a servable entry (an expired one past any serve-stale window is a miss, left for
    /// the refill to replace) and hands it to `f` by reference, with whether it is negative, how
    /// fresh it is and its slot hash (for a refresh): the hit path renders straight from the copy
    /// the cache hands out, with no further move of it.
    ///
    /// A fresh positive entry wins; then a fresh negative one (a real NXDOMAIN beats a stale
    /// positive), except a SERVFAIL, which never hides a servable positive; then a stale one.
    #[inline]
    pub fn with_hit<R>(
        &self,
        key: &KeyBuf,
        now: Instant,
        f: impl FnOnce(&Response, bool, Freshness, u64) -> R,
    ) -> Option<R> {
        let h = self.slot(key);
        // The fresh positive hit first, bound straight from `get` (no `Option<Response>` carried
        // through adapters: each move of the 192-byte entry was a copy, measured +14 ns a hit).
        let mut pos_state = None;
        let pos = match self.positive.cache.get(&h) {
            Some(r) if r.answers(key) => {
                let s = r.freshness(now);
                if let Some(s @ (Freshness::Fresh | Freshness::Counted | Freshness::RefreshDue)) = s
                {
                    return Some(f(&r, false, s, h));
                }
                pos_state = s;
                Some(r)
            }
            _ => None,
        };
        let neg = self.negative.cache.get(&h).filter(|r| r.answers(key));
        if let Some(r) = &neg
            && let Some(s) = r.freshness(now)
            && (s != Freshness::Stale || pos_state.is_none())
            && !(r.kind == Kind::ServFail && pos_state.is_some())
        {
            return Some(f(r, true, s, h));
        }
        match (pos, pos_state) {
            (Some(r), Some(s)) => Some(f(&r, false, s, h)),
            _ => None,
        }
    }

    /// Stores a response if its kind and lifetime allow it. A positive answer replaces any negative
    /// entry for the key (the name exists now), and a negative one never replaces a fresh positive
    /// one (a transient NXDOMAIN or SERVFAIL must not shadow good data).
    pub fn insert(&self, key: &KeyBuf, mut response: Response, now: Instant) -> bool {
        if response.lifetime().is_zero() {
            return false;
        }
        let part = match response.kind {
            Kind::Positive => &self.positive,
            _ => &self.negative,
        };
        response.weight_floor = floor_units(part.floor.load(Ordering::Relaxed));
        let h = self.slot(key);
        match response.kind {
            Kind::Positive => {
                self.negative.cache.remove_if(&h, |r| r.answers(key));
                self.positive.cache.insert(h, response);
                true
            }
            Kind::Negative | Kind::ServFail => {
                // A negative answer never replaces a fresh positive one, and a SERVFAIL not even a
                // stale one still inside its serve-stale window (RFC 8767 §5: a failure must not
                // replace a servable answer; coredns#7956).
                if let Some(p) = self.positive.cache.peek(&h)
                    && p.answers(key)
                    && (p.is_fresh(now) || response.kind == Kind::ServFail && p.is_servable(now))
                {
                    return false;
                }
                self.negative.cache.insert(h, response);
                true
            }
            Kind::Uncacheable => false,
        }
    }

    /// A copy of every entry (for the cache file). Takes each shard's read lock in turn: run it
    /// off the hit path's threads.
    pub fn snapshot(&self) -> Vec<Response> {
        self.positive
            .cache
            .iter()
            .chain(self.negative.cache.iter())
            .map(|(_, r)| r)
            .collect()
    }

    /// Stores `response` only if the key has no entry yet (merging a cache file into a warm cache).
    pub fn insert_if_absent(&self, key: &KeyBuf, response: Response, now: Instant) -> bool {
        let h = self.slot(key);
        let present = |p: &Part| p.cache.peek(&h).is_some_and(|r| r.answers(key));
        if present(&self.positive) || present(&self.negative) {
            return false;
        }
        self.insert(key, response, now)
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
