//! The global prefix index: which workers hold which cached blocks, across thousands of
//! workers, fed by their KV events and read by every routing decision.
//!
//! **Design.** A sequence hash names a whole prefix, so the index is a flat map from
//! [`SequenceHash`] to the workers holding that block (with a tier bitmask each), split into
//! `shards` maps behind their own `RwLock`s, chosen by hash. Each worker gets a dense slot
//! number (recycled when it leaves); a block's holders are a map slot -> tiers, and a block
//! held by many workers (`dense_holders` or more) also keeps a bitset of its holders' slots.
//! A reverse map (worker -> its slot and blocks, in a `DashMap`) makes "worker gone" and
//! `cleared` cost the worker's own blocks, not the index. Writes lock one shard for one block
//! at a time; lookups take shard read locks one block at a time, so ingest never blocks a
//! lookup for longer than one block's update. A shard is maps of a bounded size under a
//! directory (`Table`): a full one splits in two rather than one map rehashing millions of
//! blocks under the write lock, which stalled lookups for 10-23 ms at 10k workers.
//!
//! **Lookup** (`find_matches`): walk the query's hashes in order, keeping the set of workers
//! that held every block so far; a worker's score is its leading run, counted per tier. While
//! the blocks walked are popular (bitsets), the live set is a bitset too and each block costs
//! `slots / 64` word ANDs, whatever the number of holders; once a block has few holders the
//! live set becomes a short list and each block costs one hash probe per live worker. So a
//! query costs O(L x min(C, S/64)) for L query blocks, C candidates and S slots, plus O(1) per
//! worker in the answer, stopping at the first block no candidate holds. Blocks held in host
//! or disk tiers only are rare; only blocks that have such holders are walked holder by holder.
//!
//! **Bounded memory**: at most `max_blocks` indexed (worker, block) pairs. Past that, whole
//! blocks are pruned least-recently-used first: a CLOCK-style queue (second chance for blocks
//! a lookup touched since they were queued), so the index never grows without bound when
//! events are lost or workers misbehave. Costs per stored block: O(1) amortized.
//!
//! Events of one worker must be applied in order by one caller at a time (the router applies
//! each worker's batches in event-id order); different workers' events may be applied
//! concurrently with each other and with lookups. Lock order: a worker's reverse-map entry,
//! then one index shard; the prune queue is never taken while either is held by a writer.
//!
//! **Bad input** never corrupts the index: removing a block never stored, or storing one twice,
//! is counted in [`ApplyStats`] and otherwise ignored.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};

use dashmap::DashMap;
use dynamo_protocols::kv::{KvEvent, KvEventData, SequenceHash, StorageTier, WorkerId};

/// Hasher for keys that are already random 64-bit values (sequence hashes are XXH3 outputs,
/// worker ids random instance ids) or small dense numbers: one multiply spreads them over the
/// table, where SipHash would cost most of a lookup.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0 ^ x).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn write_u32(&mut self, x: u32) {
        self.write_u64(x as u64);
    }
}

pub type IdBuild = BuildHasherDefault<IdHasher>;
type IdMap<K, V> = HashMap<K, V, IdBuild>;

/// Per worker holding at least a query's first block, its leading run of the query's blocks
/// ([`KvIndex::find_matches`]), in no particular order.
#[derive(Debug, Clone, Default)]
pub struct OverlapMap(Vec<(WorkerId, Overlap)>);

impl OverlapMap {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &(WorkerId, Overlap)> {
        self.0.iter()
    }

    /// One worker's overlap. A linear scan: to look up many, collect into a map first.
    pub fn get(&self, w: &WorkerId) -> Option<&Overlap> {
        self.0.iter().find(|(x, _)| x == w).map(|(_, o)| o)
    }

    pub fn contains_key(&self, w: &WorkerId) -> bool {
        self.get(w).is_some()
    }
}

impl IntoIterator for OverlapMap {
    type Item = (WorkerId, Overlap);
    type IntoIter = std::vec::IntoIter<(WorkerId, Overlap)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl std::ops::Index<&WorkerId> for OverlapMap {
    type Output = Overlap;

    fn index(&self, w: &WorkerId) -> &Overlap {
        self.get(w).expect("worker not in the overlap map")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct IndexSettings {
    /// Most (worker, block) pairs indexed before least-recently-used blocks are pruned.
    pub max_blocks: usize,
    pub shards: usize,
    /// A block with this many holders also keeps a bitset of them (dropped again below half).
    pub dense_holders: usize,
    /// Most blocks one map of a shard holds before it splits in two (bounds how long an
    /// insert holds the shard's write lock: see `Table`).
    pub bucket_cap: usize,
}

impl Default for IndexSettings {
    fn default() -> Self {
        Self {
            max_blocks: 20_000_000,
            shards: 64,
            dense_holders: 32,
            bucket_cap: 3_584,
        }
    }
}

fn bit(tier: StorageTier) -> u8 {
    match tier {
        StorageTier::Device => 1,
        StorageTier::Host => 2,
        StorageTier::Disk => 4,
    }
}

/// Tier bit of blocks a router predicted from its own decisions (counted as device).
const PREDICTED: u8 = 8;

fn on_device(tiers: u8) -> bool {
    tiers & (1 | PREDICTED) != 0
}

/// A worker's leading run of cached blocks for a query, by the tier each block is in (the
/// fastest tier that holds it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Overlap {
    pub device: u32,
    pub host: u32,
    pub disk: u32,
}

impl Overlap {
    pub fn blocks(&self) -> u32 {
        self.device + self.host + self.disk
    }

    fn add(&mut self, tiers: u8) {
        if on_device(tiers) {
            self.device += 1;
        } else if tiers & 2 != 0 {
            self.host += 1;
        } else {
            self.disk += 1;
        }
    }
}

/// What applying events changed, and what was wrong with them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub stored: usize,
    pub removed: usize,
    /// Removals of blocks this worker was not known to hold.
    pub unknown_removals: usize,
    /// Stores of blocks already held in that tier.
    pub duplicate_stores: usize,
}

/// A block's holders: slot -> tier bits. Most blocks have one or two holders (a generated
/// block always one), so a short list inline; a map once there are more than
/// [`FEW_HOLDERS`].
enum Holders {
    Few(smallvec::SmallVec<[(u32, u8); 2]>),
    Many(IdMap<u32, u8>),
}

/// The most holders kept as a list.
const FEW_HOLDERS: usize = 8;

impl Default for Holders {
    fn default() -> Self {
        Holders::Few(smallvec::SmallVec::new())
    }
}

impl Holders {
    fn get(&self, slot: &u32) -> Option<&u8> {
        match self {
            Holders::Few(v) => v.iter().find(|(s, _)| s == slot).map(|(_, t)| t),
            Holders::Many(m) => m.get(slot),
        }
    }

    fn contains_key(&self, slot: &u32) -> bool {
        self.get(slot).is_some()
    }

    fn insert(&mut self, slot: u32, tiers: u8) -> Option<u8> {
        match self {
            Holders::Few(v) => {
                if let Some((_, t)) = v.iter_mut().find(|(s, _)| *s == slot) {
                    return Some(std::mem::replace(t, tiers));
                }
                if v.len() < FEW_HOLDERS {
                    v.push((slot, tiers));
                } else {
                    let mut m: IdMap<u32, u8> = v.iter().copied().collect();
                    m.insert(slot, tiers);
                    *self = Holders::Many(m);
                }
                None
            }
            Holders::Many(m) => m.insert(slot, tiers),
        }
    }

    fn remove(&mut self, slot: &u32) -> Option<u8> {
        match self {
            Holders::Few(v) => {
                let i = v.iter().position(|(s, _)| s == slot)?;
                Some(v.swap_remove(i).1)
            }
            Holders::Many(m) => {
                let t = m.remove(slot);
                if m.len() <= FEW_HOLDERS / 2 {
                    *self = Holders::Few(m.iter().map(|(&s, &t)| (s, t)).collect());
                }
                t
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            Holders::Few(v) => v.len(),
            Holders::Many(m) => m.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn iter(&self) -> impl Iterator<Item = (&u32, &u8)> {
        let (few, many) = match self {
            Holders::Few(v) => (Some(v.iter().map(|(s, t)| (s, t))), None),
            Holders::Many(m) => (None, Some(m.iter())),
        };
        few.into_iter().flatten().chain(many.into_iter().flatten())
    }

    fn keys(&self) -> impl Iterator<Item = &u32> {
        self.iter().map(|(s, _)| s)
    }
}

struct Entry {
    /// Slot -> tier bits.
    holders: Holders,
    /// Bitset of the holders' slots, kept while there are many holders.
    bits: Option<Vec<u64>>,
    /// Holders with no device (or predicted) copy: their hits count as host or disk.
    lower: u32,
    /// Last touch (store or lookup), on the index clock.
    stamp: AtomicU64,
}

fn set_bit(bits: &mut Vec<u64>, slot: u32) {
    let (w, b) = (slot as usize / 64, slot % 64);
    if bits.len() <= w {
        bits.resize(w + 1, 0);
    }
    bits[w] |= 1 << b;
}

fn test_and_clear(bits: &mut [u64], slot: u32) -> bool {
    let (w, b) = (slot as usize / 64, slot % 64);
    match bits.get_mut(w) {
        Some(word) if *word & (1 << b) != 0 => {
            *word &= !(1 << b);
            true
        }
        _ => false,
    }
}

impl Entry {
    fn new(stamp: u64) -> Self {
        Self {
            holders: Holders::default(),
            bits: None,
            lower: 0,
            stamp: AtomicU64::new(stamp),
        }
    }

    /// Sets `slot`'s tier bits to `new` (0: not a holder), keeping `lower` and the bitset.
    fn set(&mut self, slot: u32, new: u8, dense_at: usize) {
        let old = if new == 0 {
            self.holders.remove(&slot)
        } else {
            self.holders.insert(slot, new)
        }
        .unwrap_or(0);
        let was_lower = old != 0 && !on_device(old);
        let is_lower = new != 0 && !on_device(new);
        if was_lower && !is_lower {
            self.lower -= 1;
        } else if is_lower && !was_lower {
            self.lower += 1;
        }
        let n = self.holders.len();
        match &mut self.bits {
            Some(_) if n < dense_at / 2 => self.bits = None,
            Some(bits) => {
                if new == 0 {
                    test_and_clear(bits, slot);
                } else {
                    set_bit(bits, slot);
                }
            }
            None if n >= dense_at => {
                let mut bits = Vec::new();
                for &s in self.holders.keys() {
                    set_bit(&mut bits, s);
                }
                self.bits = Some(bits);
            }
            None => {}
        }
    }
}

/// A shard's blocks: maps of at most `cap` entries each, found through a directory
/// indexed by the hash's top bits (extendible hashing). One growing map would rehash all its
/// entries at once under the shard's write lock: at 10k workers (millions of blocks) that
/// stalled lookups for 10-23 ms. A full map here splits instead, moving half its entries to a
/// new one, and a map's own growth moves at most `cap` entries: well under a millisecond
/// either way (`IndexSettings::bucket_cap`, 3,584 by default: a full map is 4,096 slots at
/// hashbrown's 7/8 load, so it never doubles to 8,192 for a few entries more).
struct Table {
    cap: usize,
    /// Bucket index by the top `depth` bits of the hash.
    dir: Vec<u32>,
    depth: u32,
    /// (local depth: the top bits all of its blocks share, the map).
    buckets: Vec<(u32, IdMap<SequenceHash, Entry>)>,
}

impl Table {
    fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            dir: vec![0],
            depth: 0,
            buckets: vec![(0, IdMap::default())],
        }
    }

    fn slot(&self, h: &SequenceHash) -> usize {
        match self.depth {
            0 => 0,
            d => (h.0 >> (64 - d)) as usize,
        }
    }

    fn bucket(&self, h: &SequenceHash) -> usize {
        self.dir[self.slot(h)] as usize
    }

    fn get(&self, h: &SequenceHash) -> Option<&Entry> {
        self.buckets[self.bucket(h)].1.get(h)
    }

    fn get_mut(&mut self, h: &SequenceHash) -> Option<&mut Entry> {
        let b = self.bucket(h);
        self.buckets[b].1.get_mut(h)
    }

    fn remove(&mut self, h: &SequenceHash) -> Option<Entry> {
        let b = self.bucket(h);
        self.buckets[b].1.remove(h)
    }

    fn len(&self) -> usize {
        self.buckets.iter().map(|(_, m)| m.len()).sum()
    }

    /// `h`'s entry, made by `new` if absent (splitting a full map first).
    fn get_or_insert_with(&mut self, h: SequenceHash, new: impl FnOnce() -> Entry) -> &mut Entry {
        let mut b = self.bucket(&h);
        if self.buckets[b].1.len() >= self.cap && !self.buckets[b].1.contains_key(&h) {
            self.split(b);
            b = self.bucket(&h);
        }
        self.buckets[b].1.entry(h).or_insert_with(new)
    }

    /// Splits bucket `b` by one more top bit of the hash (doubling the directory if the
    /// bucket already uses all of its bits).
    fn split(&mut self, b: usize) {
        let local = self.buckets[b].0;
        if local >= 63 {
            return;
        }
        if local == self.depth {
            self.dir = self.dir.iter().flat_map(|&x| [x, x]).collect();
            self.depth += 1;
        }
        let bit = 63 - local;
        // About half of them move: sized for that, so the new map does not rehash as it fills.
        let half = self.buckets[b].1.len() / 2 + 1;
        let mut moved: IdMap<SequenceHash, Entry> =
            IdMap::with_capacity_and_hasher(half, IdBuild::default());
        moved.extend(self.buckets[b].1.extract_if(|k, _| (k.0 >> bit) & 1 == 1));
        let nb = self.buckets.len() as u32;
        self.buckets[b].0 = local + 1;
        self.buckets.push((local + 1, moved));
        // Directory slots of `b` whose next bit is set now name the new bucket.
        let shift = self.depth - local - 1;
        for (i, d) in self.dir.iter_mut().enumerate() {
            if *d as usize == b && (i >> shift) & 1 == 1 {
                *d = nb;
            }
        }
    }
}

/// A worker's slot and the blocks it holds.
struct Held {
    slot: u32,
    blocks: HashSet<SequenceHash, IdBuild>,
}

#[derive(Default)]
struct Slots {
    workers: Vec<Option<WorkerId>>,
    free: Vec<u32>,
}

pub struct KvIndex {
    settings: IndexSettings,
    shards: Vec<RwLock<Table>>,
    workers: DashMap<WorkerId, Held, IdBuild>,
    slots: RwLock<Slots>,
    pairs: AtomicUsize,
    clock: AtomicU64,
    queue: Mutex<VecDeque<(SequenceHash, u64)>>,
    pruned: AtomicU64,
}

impl KvIndex {
    pub fn new(settings: IndexSettings) -> Self {
        let shards = (0..settings.shards.max(1))
            .map(|_| RwLock::new(Table::new(settings.bucket_cap)))
            .collect();
        Self {
            settings,
            shards,
            workers: DashMap::with_hasher(IdBuild::default()),
            slots: RwLock::new(Slots::default()),
            pairs: AtomicUsize::new(0),
            clock: AtomicU64::new(0),
            queue: Mutex::new(VecDeque::new()),
            pruned: AtomicU64::new(0),
        }
    }

    fn shard(&self, h: SequenceHash) -> &RwLock<Table> {
        // Sequence hashes are already uniformly distributed.
        &self.shards[(h.0 % self.shards.len() as u64) as usize]
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    fn dense_at(&self) -> usize {
        self.settings.dense_holders.max(2)
    }

    /// (worker, block) pairs indexed.
    pub fn pairs(&self) -> usize {
        self.pairs.load(Ordering::Relaxed)
    }

    /// Distinct blocks indexed.
    pub fn blocks(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().map(|m| m.len()).unwrap_or(0))
            .sum()
    }

    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Blocks pruned for the memory cap so far.
    pub fn pruned(&self) -> u64 {
        self.pruned.load(Ordering::Relaxed)
    }

    fn new_slot(&self, worker: WorkerId) -> u32 {
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        match slots.free.pop() {
            Some(s) => {
                slots.workers[s as usize] = Some(worker);
                s
            }
            None => {
                slots.workers.push(Some(worker));
                (slots.workers.len() - 1) as u32
            }
        }
    }

    fn free_slot(&self, slot: u32) {
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        slots.workers[slot as usize] = None;
        slots.free.push(slot);
    }

    /// Adds `tier` to `worker`'s hold on `h`; true if the block is new to the index.
    fn store(&self, worker: WorkerId, h: SequenceHash, tier: u8, stats: &mut ApplyStats) {
        let stamp = self.tick();
        let mut new_entry = false;
        {
            let mut held = self.workers.entry(worker).or_insert_with(|| Held {
                slot: self.new_slot(worker),
                blocks: HashSet::default(),
            });
            let slot = held.slot;
            {
                let mut shard = self.shard(h).write().unwrap_or_else(|p| p.into_inner());
                let entry = shard.get_or_insert_with(h, || {
                    new_entry = true;
                    Entry::new(stamp)
                });
                entry.stamp.store(stamp, Ordering::Relaxed);
                let tiers = entry.holders.get(&slot).copied().unwrap_or(0);
                if tiers & tier != 0 {
                    stats.duplicate_stores += 1;
                    return;
                }
                if tiers == 0 {
                    self.pairs.fetch_add(1, Ordering::Relaxed);
                }
                entry.set(slot, tiers | tier, self.dense_at());
            }
            held.blocks.insert(h);
        }
        stats.stored += 1;
        if new_entry {
            if let Ok(mut q) = self.queue.lock() {
                q.push_back((h, stamp));
            }
        }
    }

    /// Drops `tier` of `worker`'s hold on `h`; true if it held it there.
    fn unhold(&self, worker: WorkerId, h: SequenceHash, tier: u8) -> bool {
        let Some(mut held) = self.workers.get_mut(&worker) else {
            return false;
        };
        let mut shard = self.shard(h).write().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = shard.get_mut(&h) else {
            return false;
        };
        let Some(&tiers) = entry.holders.get(&held.slot) else {
            return false;
        };
        if tiers & tier == 0 {
            return false;
        }
        entry.set(held.slot, tiers & !tier, self.dense_at());
        if tiers & !tier == 0 {
            self.pairs.fetch_sub(1, Ordering::Relaxed);
            if entry.holders.is_empty() {
                shard.remove(&h);
            }
            held.blocks.remove(&h);
        }
        true
    }

    /// Applies one worker's events, in order.
    pub fn apply(&self, worker: WorkerId, events: &[KvEvent]) -> ApplyStats {
        let mut stats = ApplyStats::default();
        for e in events {
            let tier = bit(e.tier);
            match &e.data {
                KvEventData::Stored { blocks, .. } => {
                    for b in blocks {
                        self.store(worker, b.block_hash, tier, &mut stats);
                    }
                }
                KvEventData::Removed { block_hashes } => {
                    for &h in block_hashes {
                        if self.unhold(worker, h, tier) {
                            stats.removed += 1;
                        } else {
                            stats.unknown_removals += 1;
                        }
                    }
                }
                KvEventData::Cleared => {
                    let held: Vec<SequenceHash> = self
                        .workers
                        .get(&worker)
                        .map(|b| b.blocks.iter().copied().collect())
                        .unwrap_or_default();
                    for h in held {
                        if self.unhold(worker, h, tier) {
                            stats.removed += 1;
                        }
                    }
                }
            }
        }
        self.prune();
        stats
    }

    /// Records that `worker` is about to hold `hashes` (a router just sent it their prompt), so
    /// that requests with the same prefix find it before its events arrive. Predictions count
    /// as device blocks until [`KvIndex::unpredict`] drops them; blocks the worker's events
    /// confirm stay.
    pub fn predict(&self, worker: WorkerId, hashes: &[SequenceHash]) {
        let mut stats = ApplyStats::default();
        for &h in hashes {
            self.store(worker, h, PREDICTED, &mut stats);
        }
        self.prune();
    }

    /// Drops the predictions of [`KvIndex::predict`] (their time to be confirmed is up).
    pub fn unpredict(&self, worker: WorkerId, hashes: &[SequenceHash]) {
        for &h in hashes {
            self.unhold(worker, h, PREDICTED);
        }
    }

    /// Forgets everything `worker` holds (it left, or is about to be resynced).
    pub fn remove_worker(&self, worker: WorkerId) {
        // Taking the entry out first means a concurrent store for this worker either finished
        // (its block is in `held`) or starts afresh with a new slot.
        let Some((_, held)) = self.workers.remove(&worker) else {
            return;
        };
        for h in held.blocks {
            let mut shard = self.shard(h).write().unwrap_or_else(|p| p.into_inner());
            if let Some(entry) = shard.get_mut(&h) {
                if entry.holders.contains_key(&held.slot) {
                    entry.set(held.slot, 0, self.dense_at());
                    self.pairs.fetch_sub(1, Ordering::Relaxed);
                }
                if entry.holders.is_empty() {
                    shard.remove(&h);
                }
            }
        }
        self.free_slot(held.slot);
    }

    /// Prunes least-recently-used blocks while over the cap.
    fn prune(&self) {
        if self.pairs() <= self.settings.max_blocks {
            return;
        }
        let Ok(mut q) = self.queue.lock() else {
            return;
        };
        let mut budget = q.len() * 2 + 1;
        while self.pairs() > self.settings.max_blocks && budget > 0 {
            budget -= 1;
            let Some((h, queued)) = q.pop_front() else {
                break;
            };
            let mut shard = self.shard(h).write().unwrap_or_else(|p| p.into_inner());
            let Some(entry) = shard.get(&h) else {
                continue;
            };
            let now = entry.stamp.load(Ordering::Relaxed);
            if now > queued {
                // Touched since it was queued: second chance.
                q.push_back((h, now));
                continue;
            }
            let entry = shard.remove(&h).expect("checked above");
            drop(shard);
            self.pairs.fetch_sub(entry.holders.len(), Ordering::Relaxed);
            let owners: Vec<WorkerId> = {
                let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
                entry
                    .holders
                    .keys()
                    .filter_map(|&s| slots.workers.get(s as usize).copied().flatten())
                    .collect()
            };
            for w in owners {
                if let Some(mut held) = self.workers.get_mut(&w) {
                    held.blocks.remove(&h);
                }
            }
            self.pruned.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// For each worker holding at least the first block: its leading run of `hashes`.
    pub fn find_matches(&self, hashes: &[SequenceHash]) -> OverlapMap {
        // (slot, overlap) of workers whose run ended.
        let mut out: Vec<(u32, Overlap)> = Vec::new();
        let stamp = self.tick();
        // Live workers as a bitset while blocks are popular; their overlap is the depth,
        // less the host and disk hits recorded in `lower_hits`.
        let mut dense: Option<Vec<u64>> = None;
        let mut lower_hits: IdMap<u32, Overlap> = IdMap::default();
        let dense_overlap = |depth: usize, slot: u32, lower: &IdMap<u32, Overlap>| {
            let l = lower.get(&slot).copied().unwrap_or_default();
            Overlap {
                device: depth as u32 - l.host - l.disk,
                ..l
            }
        };
        // Live workers as a list once blocks have few holders.
        let mut live: Vec<(u32, Overlap)> = Vec::new();
        let mut depth = 0;
        for (i, h) in hashes.iter().enumerate() {
            let shard = self.shard(*h).read().unwrap_or_else(|p| p.into_inner());
            let Some(entry) = shard.get(h) else {
                break;
            };
            entry.stamp.store(stamp, Ordering::Relaxed);
            let count_lower = |bits: &[u64], lower_hits: &mut IdMap<u32, Overlap>| {
                if entry.lower > 0 {
                    for (&s, &t) in entry.holders.iter() {
                        let (w, b) = (s as usize / 64, s % 64);
                        if !on_device(t) && bits.get(w).is_some_and(|x| x & (1 << b) != 0) {
                            lower_hits.entry(s).or_default().add(t);
                        }
                    }
                }
            };
            if i == 0 {
                match &entry.bits {
                    Some(bits) => {
                        count_lower(bits, &mut lower_hits);
                        dense = Some(bits.clone());
                    }
                    None => {
                        live = entry
                            .holders
                            .iter()
                            .map(|(&s, &t)| {
                                let mut o = Overlap::default();
                                o.add(t);
                                (s, o)
                            })
                            .collect();
                    }
                }
            } else if let Some(set) = dense.as_mut() {
                match &entry.bits {
                    Some(bits) => {
                        let mut any = false;
                        for (k, word) in set.iter_mut().enumerate() {
                            let keep = *word & bits.get(k).copied().unwrap_or(0);
                            let mut gone = *word & !keep;
                            while gone != 0 {
                                let s = (k * 64) as u32 + gone.trailing_zeros();
                                gone &= gone - 1;
                                out.push((s, dense_overlap(i, s, &lower_hits)));
                            }
                            *word = keep;
                            any |= keep != 0;
                        }
                        count_lower(set, &mut lower_hits);
                        if !any {
                            dense = None;
                        }
                    }
                    None => {
                        // Few holders: the live set becomes a list.
                        for (&s, &t) in entry.holders.iter() {
                            if test_and_clear(set, s) {
                                let mut o = dense_overlap(i, s, &lower_hits);
                                o.add(t);
                                live.push((s, o));
                            }
                        }
                        for (k, &word) in set.iter().enumerate() {
                            let mut gone = word;
                            while gone != 0 {
                                let s = (k * 64) as u32 + gone.trailing_zeros();
                                gone &= gone - 1;
                                out.push((s, dense_overlap(i, s, &lower_hits)));
                            }
                        }
                        dense = None;
                    }
                }
            } else {
                live.retain_mut(|(s, o)| match entry.holders.get(s) {
                    Some(&t) => {
                        o.add(t);
                        true
                    }
                    None => {
                        out.push((*s, *o));
                        false
                    }
                });
            }
            depth = i + 1;
            if dense.is_none() && live.is_empty() {
                break;
            }
        }
        if let Some(set) = dense {
            for (k, &word) in set.iter().enumerate() {
                let mut left = word;
                while left != 0 {
                    let s = (k * 64) as u32 + left.trailing_zeros();
                    left &= left - 1;
                    out.push((s, dense_overlap(depth, s, &lower_hits)));
                }
            }
        }
        out.extend(live);
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        OverlapMap(
            out.into_iter()
                .filter_map(|(s, o)| Some((slots.workers.get(s as usize).copied().flatten()?, o)))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests;
