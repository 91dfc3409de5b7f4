//! The global prefix index: which workers hold which cached blocks, across thousands of
//! workers, fed by their KV events and read by every routing decision.
//!
//! **Design.** A sequence hash names a whole prefix, so the index is a flat map from
//! [`SequenceHash`] to the workers holding that block (with a tier bitmask each), split into
//! `shards` maps behind their own `RwLock`s, chosen by hash. Each worker gets a dense slot
//! number (recycled when it leaves). A block one worker holds (most blocks: generated and
//! unshared ones) is 16 bytes, its holder inline; a block with more holders boxes them apart,
//! as a list (a map past 8), plus a bitset of their slots once there are `dense_holders`.
//! Writes lock one shard for one block at a time; lookups take shard read locks one block at
//! a time, so ingest never blocks a lookup for longer than one block's update. A shard is
//! maps of a bounded size under a directory (`Table`): a full one splits in two rather than
//! one map rehashing millions of blocks under the write lock, which stalled lookups for 10-23
//! ms at 10k workers. Each map is open addressing with the key beside its value
//! (`bucket::Bucket`): a block costs one cache miss, and the slots of the next blocks of an
//! event or query are prefetched while one is worked on, so their misses overlap.
//!
//! **Why it beats a radix tree** (NVIDIA Dynamo's `ConcurrentRadixTreeCompressed`, measured
//! side by side by `scripts/bench-indexer`): a lookup is one probe per block with no pointer
//! chasing down the tree, and a popular block's holders are ANDed 64 at a time; a stored or
//! removed block is one probe too, without the per-worker map of blocks a tree keeps to find
//! an event's parent; and (worker, block) pairs cost a third of the tree's memory. The price:
//! a worker that leaves (or clears its cache) costs a walk over the whole index, a bucket at
//! a time under its shard's lock, which is rare next to the millions of block events a second.
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
//! blocks are pruned by a CLOCK hand walking the shards a bucket at a time: a block a lookup
//! or a repeated store touched since the hand last passed gets a second chance, one only
//! stored once goes first. So the index never grows without bound when events are lost or
//! workers misbehave, and costs nothing per block until then but a bit a lookup sets.
//!
//! Events of one worker must be applied in order (the router applies each worker's batches
//! in event-id order); each worker's updates take its own lock, so calls for one worker run
//! one at a time and different workers' events may be applied concurrently with each other
//! and with lookups. Lock order: a worker's lock, then one shard, then the slot table (the
//! workers' map is let go before a worker's lock is taken); the pruning hand and the purge
//! are only tried, never waited for, and taken with no worker's lock held.
//!
//! **Bad input** never corrupts the index: removing a block never stored, or storing one twice,
//! is counted in [`ApplyStats`] and otherwise ignored.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bucket::Bucket;
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
    /// insert holds the shard's write lock: see `Table`). The default, 3,584, lets a map
    /// past 3,072 blocks double to 8,192 slots (at most 44% loaded then): measured at 10k
    /// workers against 3,072 (maps of at most 4,096 slots, up to 75% loaded), it ingests
    /// about 14% faster (probes are shorter) for 26% more memory per pair.
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

/// The holders of a block with more than one ([`Crowd`]): slot -> tier bits, a short list
/// (two inline), a map once there are more than [`FEW_HOLDERS`].
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

/// A block's holders when it has more than one: the list (or map), the bitset of their slots
/// while there are many, and how many hold it in no device tier.
#[derive(Default)]
struct Crowd {
    holders: Holders,
    /// Bitset of the holders' slots, kept while there are many holders.
    bits: Option<Vec<u64>>,
    /// Holders with no device (or predicted) copy: their hits count as host or disk.
    lower: u32,
}

fn set_bit(bits: &mut Vec<u64>, slot: u32) {
    let (w, b) = (slot as usize / 64, slot % 64);
    if bits.len() <= w {
        bits.resize(w + 1, 0);
    }
    bits[w] |= 1 << b;
}

fn has_bit(bits: &[u64], slot: u32) -> bool {
    bits.get(slot as usize / 64)
        .is_some_and(|w| w & (1 << (slot % 64)) != 0)
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

impl Crowd {
    /// Sets `slot`'s tier bits to `new` (0: not a holder), keeping `lower` and the bitset;
    /// returns the old bits.
    fn set(&mut self, slot: u32, new: u8, dense_at: usize) -> u8 {
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
        old
    }
}

/// Blocks ahead of the one being updated or looked up whose slots are prefetched.
const PREFETCH: usize = 4;

/// No single holder (the entry is empty, or its holders are in `crowd`).
const NO_SLOT: u32 = u32::MAX;

/// A block in the index: 16 bytes while one worker holds it (most blocks: a worker's own
/// generated or unshared blocks), its holders boxed apart once there are more.
struct Entry {
    /// The one holder's slot and tier bits while `crowd` is `None` (`NO_SLOT`: no holder).
    slot: u32,
    tiers: u8,
    /// The CLOCK reference bit of pruning: a lookup or a repeated store touched the block
    /// since the pruning hand last passed it.
    used: AtomicBool,
    crowd: Option<Box<Crowd>>,
}

impl Default for Entry {
    fn default() -> Self {
        Self::new()
    }
}

impl Entry {
    fn new() -> Self {
        Self {
            slot: NO_SLOT,
            tiers: 0,
            used: AtomicBool::new(false),
            crowd: None,
        }
    }

    fn touch(&self) {
        if !self.used.load(Ordering::Relaxed) {
            self.used.store(true, Ordering::Relaxed);
        }
    }

    fn get(&self, slot: u32) -> Option<u8> {
        match &self.crowd {
            Some(c) => c.holders.get(&slot).copied(),
            None => (self.slot == slot && slot != NO_SLOT).then_some(self.tiers),
        }
    }

    fn len(&self) -> usize {
        match &self.crowd {
            Some(c) => c.holders.len(),
            None => (self.slot != NO_SLOT) as usize,
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn bits(&self) -> Option<&Vec<u64>> {
        self.crowd.as_ref().and_then(|c| c.bits.as_ref())
    }

    /// Holders with no device copy.
    fn lower(&self) -> u32 {
        match &self.crowd {
            Some(c) => c.lower,
            None => (self.slot != NO_SLOT && !on_device(self.tiers)) as u32,
        }
    }

    fn iter(&self) -> impl Iterator<Item = (u32, u8)> + '_ {
        let one = (self.crowd.is_none() && self.slot != NO_SLOT).then_some((self.slot, self.tiers));
        let many = self
            .crowd
            .as_ref()
            .map(|c| c.holders.iter().map(|(&s, &t)| (s, t)));
        one.into_iter().chain(many.into_iter().flatten())
    }

    /// Sets `slot`'s tier bits to `new` (0: not a holder); returns the old bits.
    fn set(&mut self, slot: u32, new: u8, dense_at: usize) -> u8 {
        let Some(crowd) = self.crowd.as_mut() else {
            if self.slot == NO_SLOT || self.slot == slot {
                let old = if self.slot == slot { self.tiers } else { 0 };
                (self.slot, self.tiers) = if new == 0 { (NO_SLOT, 0) } else { (slot, new) };
                return old;
            }
            if new != 0 {
                let mut crowd = Crowd::default();
                crowd.set(self.slot, self.tiers, dense_at);
                crowd.set(slot, new, dense_at);
                self.crowd = Some(Box::new(crowd));
                (self.slot, self.tiers) = (NO_SLOT, 0);
            }
            return 0;
        };
        let old = crowd.set(slot, new, dense_at);
        if crowd.holders.len() == 1 {
            let (s, t) = crowd
                .holders
                .iter()
                .map(|(&s, &t)| (s, t))
                .next()
                .expect("one");
            (self.slot, self.tiers) = (s, t);
            self.crowd = None;
        }
        old
    }
}

/// A shard's blocks: maps of at most `cap` entries each, found through a directory
/// indexed by the hash's top bits (extendible hashing). One growing map would rehash all its
/// entries at once under the shard's write lock: at 10k workers (millions of blocks) that
/// stalled lookups for 10-23 ms. A full map here splits instead, moving half its entries to a
/// new one, and a map's own growth moves at most `cap` entries: well under a millisecond
/// either way (`IndexSettings::bucket_cap`).
struct Table {
    cap: usize,
    /// Bucket index by the top `depth` bits of the hash.
    dir: Vec<u32>,
    depth: u32,
    /// (local depth: the top bits all of its blocks share, the map).
    buckets: Vec<(u32, Bucket<Entry>)>,
}

impl Table {
    fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            dir: vec![0],
            depth: 0,
            buckets: vec![(0, Bucket::new())],
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
        self.buckets[self.bucket(h)].1.get(h.0)
    }

    fn get_mut(&mut self, h: &SequenceHash) -> Option<&mut Entry> {
        let b = self.bucket(h);
        self.buckets[b].1.get_mut(h.0)
    }

    fn remove(&mut self, h: &SequenceHash) -> Option<Entry> {
        let b = self.bucket(h);
        self.buckets[b].1.remove(h.0)
    }

    fn len(&self) -> usize {
        self.buckets.iter().map(|(_, m)| m.len()).sum()
    }

    /// Starts loading the slot where `h` would be.
    fn prefetch(&self, h: &SequenceHash) {
        self.buckets[self.bucket(h)].1.prefetch(h.0);
    }

    /// `h`'s entry, a new empty one if absent (splitting a full map first).
    fn get_or_insert(&mut self, h: SequenceHash) -> &mut Entry {
        let mut b = self.bucket(&h);
        if self.buckets[b].1.len() >= self.cap && !self.buckets[b].1.contains_key(h.0) {
            self.split(b);
            b = self.bucket(&h);
        }
        self.buckets[b].1.get_or_insert(h.0)
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
        // About half of them move: sized for that, so the new map does not grow as it fills.
        let mut moved: Bucket<Entry> = Bucket::with_capacity(self.buckets[b].1.len() / 2 + 1);
        self.buckets[b].1.retain(|k, e| {
            if (k >> bit) & 1 == 1 {
                *moved.get_or_insert(k) = std::mem::take(e);
                false
            } else {
                true
            }
        });
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

    fn bucket_count(&self) -> usize {
        self.buckets.len()
    }

    /// Keeps the entries of bucket `b` for which `keep` is true (nothing if there is no `b`).
    fn retain_bucket(&mut self, b: usize, mut keep: impl FnMut(&mut Entry) -> bool) {
        if let Some((_, map)) = self.buckets.get_mut(b) {
            map.retain(|_, e| keep(e));
        }
    }
}

/// A worker's slot while it is indexed; `None` once [`KvIndex::remove_worker`] took it (a
/// caller that was waiting for it starts the worker afresh).
type WorkerCell = Arc<Mutex<Option<u32>>>;

#[derive(Default)]
struct Slots {
    /// The worker of each slot (`None`: free, or departed and not purged yet).
    workers: Vec<Option<WorkerId>>,
    /// Pairs each slot holds.
    held: Vec<AtomicUsize>,
    free: Vec<u32>,
    /// Slots of departed workers whose pairs are still in the maps.
    departed: Vec<u32>,
}

/// What one caller's updates changed, added to the index's counters once at the end.
#[derive(Default)]
struct Delta {
    added: usize,
    dropped: usize,
}

pub struct KvIndex {
    settings: IndexSettings,
    shards: Vec<RwLock<Table>>,
    /// Each worker's slot, behind its own lock: one worker's updates run one at a time.
    workers: RwLock<IdMap<WorkerId, WorkerCell>>,
    slots: RwLock<Slots>,
    /// Pairs of the workers indexed.
    pairs: AtomicUsize,
    /// Pairs of departed workers still in the maps (not purged yet).
    departed_pairs: AtomicUsize,
    /// Held while departed workers' pairs are purged.
    purging: Mutex<()>,
    /// The pruning hand: (shard, bucket).
    hand: Mutex<(usize, usize)>,
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
            workers: RwLock::new(IdMap::default()),
            slots: RwLock::new(Slots::default()),
            pairs: AtomicUsize::new(0),
            departed_pairs: AtomicUsize::new(0),
            purging: Mutex::new(()),
            hand: Mutex::new((0, 0)),
            pruned: AtomicU64::new(0),
        }
    }

    fn shard(&self, h: SequenceHash) -> &RwLock<Table> {
        // Sequence hashes are already uniformly distributed.
        &self.shards[(h.0 % self.shards.len() as u64) as usize]
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
        self.workers.read().map(|w| w.len()).unwrap_or(0)
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
                slots.held.push(AtomicUsize::new(0));
                (slots.workers.len() - 1) as u32
            }
        }
    }

    /// Runs `f` with `worker`'s slot (a new one for a worker not indexed), holding the
    /// worker's lock, then adds what it changed to the index's counters.
    fn with_worker<T>(&self, worker: WorkerId, f: impl FnOnce(u32, &mut Delta) -> T) -> T {
        loop {
            let known = self
                .workers
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&worker)
                .cloned();
            let cell = match known {
                Some(cell) => cell,
                None => {
                    let mut workers = self.workers.write().unwrap_or_else(|p| p.into_inner());
                    workers
                        .entry(worker)
                        .or_insert_with(|| Arc::new(Mutex::new(Some(self.new_slot(worker)))))
                        .clone()
                }
            };
            let guard = cell.lock().unwrap_or_else(|p| p.into_inner());
            // Removed while this caller waited: start it afresh.
            let Some(slot) = *guard else { continue };
            let mut delta = Delta::default();
            let out = f(slot, &mut delta);
            if delta.added != delta.dropped {
                let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
                let held = &slots.held[slot as usize];
                held.fetch_add(delta.added, Ordering::Relaxed);
                held.fetch_sub(delta.dropped, Ordering::Relaxed);
                self.pairs.fetch_add(delta.added, Ordering::Relaxed);
                self.pairs.fetch_sub(delta.dropped, Ordering::Relaxed);
            }
            drop(guard);
            return out;
        }
    }

    /// Starts loading the slot of block `i + PREFETCH` of `n` (at `i == 0`, of the first
    /// ones too; `hash` gives a block's hash): a block's update or lookup then finds its slot
    /// in the cache, its miss overlapped with the work on the blocks before it.
    fn prefetch(&self, i: usize, n: usize, hash: impl Fn(usize) -> SequenceHash) {
        let from = if i == 0 { 0 } else { i + PREFETCH };
        for k in from..n.min(i + PREFETCH + 1) {
            let h = hash(k);
            if let Ok(table) = self.shard(h).try_read() {
                table.prefetch(&h);
            }
        }
    }

    /// Adds `tier` to `slot`'s hold on `h`.
    fn store(&self, slot: u32, h: SequenceHash, tier: u8, d: &mut Delta, stats: &mut ApplyStats) {
        let mut shard = self.shard(h).write().unwrap_or_else(|p| p.into_inner());
        let entry = shard.get_or_insert(h);
        let tiers = entry.get(slot).unwrap_or(0);
        if tiers & tier != 0 {
            entry.touch();
            stats.duplicate_stores += 1;
            return;
        }
        if !entry.is_empty() {
            // Stored again (by another worker, or in another tier): in use.
            entry.touch();
        }
        entry.set(slot, tiers | tier, self.dense_at());
        d.added += (tiers == 0) as usize;
        stats.stored += 1;
    }

    /// Drops `tier` of `slot`'s hold on `h`; true if it held it there.
    fn unhold(&self, slot: u32, h: SequenceHash, tier: u8, d: &mut Delta) -> bool {
        let mut shard = self.shard(h).write().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = shard.get_mut(&h) else {
            return false;
        };
        let tiers = entry.get(slot).unwrap_or(0);
        if tiers & tier == 0 {
            return false;
        }
        entry.set(slot, tiers & !tier, self.dense_at());
        if tiers & !tier == 0 {
            d.dropped += 1;
            if entry.is_empty() {
                shard.remove(&h);
            }
        }
        true
    }

    /// Visits every block, one bucket of one shard at a time under that shard's write lock
    /// (so lookups wait for one bucket at most): `f` updates an entry and says whether it
    /// stays. Buckets split during the walk are visited again; `f` must be idempotent.
    fn sweep(&self, mut f: impl FnMut(&mut Entry) -> bool) {
        for shard in &self.shards {
            let mut b = 0;
            loop {
                let mut table = shard.write().unwrap_or_else(|p| p.into_inner());
                if b >= table.bucket_count() {
                    break;
                }
                table.retain_bucket(b, &mut f);
                b += 1;
            }
        }
    }

    /// Applies one worker's events, in order.
    pub fn apply(&self, worker: WorkerId, events: &[KvEvent]) -> ApplyStats {
        let mut stats = ApplyStats::default();
        self.with_worker(worker, |slot, d| {
            for e in events {
                let tier = bit(e.tier);
                match &e.data {
                    KvEventData::Stored { blocks, .. } => {
                        for (i, b) in blocks.iter().enumerate() {
                            self.prefetch(i, blocks.len(), |k| blocks[k].block_hash);
                            self.store(slot, b.block_hash, tier, d, &mut stats);
                        }
                    }
                    KvEventData::Removed { block_hashes } => {
                        for (i, &h) in block_hashes.iter().enumerate() {
                            self.prefetch(i, block_hashes.len(), |k| block_hashes[k]);
                            if self.unhold(slot, h, tier, d) {
                                stats.removed += 1;
                            } else {
                                stats.unknown_removals += 1;
                            }
                        }
                    }
                    KvEventData::Cleared => {
                        let dense_at = self.dense_at();
                        self.sweep(|e| {
                            let tiers = e.get(slot).unwrap_or(0);
                            if tiers & tier != 0 {
                                e.set(slot, tiers & !tier, dense_at);
                                stats.removed += 1;
                                d.dropped += (tiers & !tier == 0) as usize;
                            }
                            !e.is_empty()
                        });
                    }
                }
            }
        });
        self.prune();
        stats
    }

    /// Records that `worker` is about to hold `hashes` (a router just sent it their prompt), so
    /// that requests with the same prefix find it before its events arrive. Predictions count
    /// as device blocks until [`KvIndex::unpredict`] drops them; blocks the worker's events
    /// confirm stay.
    pub fn predict(&self, worker: WorkerId, hashes: &[SequenceHash]) {
        let mut stats = ApplyStats::default();
        self.with_worker(worker, |slot, d| {
            for (i, &h) in hashes.iter().enumerate() {
                self.prefetch(i, hashes.len(), |k| hashes[k]);
                self.store(slot, h, PREDICTED, d, &mut stats);
            }
        });
        self.prune();
    }

    /// Drops the predictions of [`KvIndex::predict`] (their time to be confirmed is up).
    pub fn unpredict(&self, worker: WorkerId, hashes: &[SequenceHash]) {
        self.with_worker(worker, |slot, d| {
            for &h in hashes {
                self.unhold(slot, h, PREDICTED, d);
            }
        });
    }

    /// Forgets everything `worker` holds (it left, or is about to be resynced), at once: its
    /// slot is retired (lookups skip it) and its pairs stay in the maps until a purge, a walk
    /// over the whole index a bucket at a time, takes them out with those of every worker that
    /// left since. A purge runs when departed pairs reach a quarter of the live ones, so it
    /// costs a few map visits per departed pair, and a fleet resyncing after a bus outage costs
    /// a few walks rather than one per worker. Not keeping each worker's list of blocks makes
    /// every store and removal cheaper and every pair smaller.
    pub fn remove_worker(&self, worker: WorkerId) {
        let Some(cell) = self
            .workers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&worker)
        else {
            return;
        };
        let mut guard = cell.lock().unwrap_or_else(|p| p.into_inner());
        let Some(slot) = guard.take() else { return };
        {
            let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
            slots.workers[slot as usize] = None;
            slots.departed.push(slot);
            let n = slots.held[slot as usize].load(Ordering::Relaxed);
            self.pairs.fetch_sub(n, Ordering::Relaxed);
            self.departed_pairs.fetch_add(n, Ordering::Relaxed);
        }
        drop(guard);
        if self.departed_pairs.load(Ordering::Relaxed) * 4 >= self.pairs() {
            self.purge();
        }
    }

    /// Takes departed workers' pairs out of the maps and frees their slots.
    fn purge(&self) {
        let Ok(_purging) = self.purging.try_lock() else {
            return;
        };
        let (gone, bits) = {
            let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
            let mut bits = Vec::new();
            for &s in &slots.departed {
                set_bit(&mut bits, s);
            }
            (slots.departed.clone(), bits)
        };
        if gone.is_empty() {
            return;
        }
        let dense_at = self.dense_at();
        let mut dropped = 0;
        let mut out = Vec::new();
        self.sweep(|e| {
            out.clear();
            out.extend(e.iter().map(|(s, _)| s).filter(|&s| has_bit(&bits, s)));
            for &s in &out {
                e.set(s, 0, dense_at);
            }
            dropped += out.len();
            !e.is_empty()
        });
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        slots.departed.retain(|s| !gone.contains(s));
        for &s in &gone {
            slots.held[s as usize].store(0, Ordering::Relaxed);
            slots.free.push(s);
        }
        self.departed_pairs.fetch_sub(dropped, Ordering::Relaxed);
    }

    /// While over the cap, prunes whole blocks that no lookup or repeated store touched since
    /// the hand last passed them (CLOCK), a bucket at a time.
    fn prune(&self) {
        let max = self.settings.max_blocks;
        // Departed workers' pairs not purged yet take memory too.
        let total = || self.pairs() + self.departed_pairs.load(Ordering::Relaxed);
        if total() <= max {
            return;
        }
        // Someone else is pruning.
        let Ok(mut hand) = self.hand.try_lock() else {
            return;
        };
        // Two turns of the hand at most: the second finds every reference bit cleared.
        let buckets: usize = self
            .shards
            .iter()
            .map(|s| s.read().map(|t| t.bucket_count()).unwrap_or(0))
            .sum();
        for _ in 0..2 * buckets + 2 {
            let excess = total().saturating_sub(max);
            if excess == 0 {
                break;
            }
            let (s, b) = *hand;
            let (mut left, mut live, mut departed, mut blocks) = (excess, 0, 0, 0);
            let mut table = self.shards[s].write().unwrap_or_else(|p| p.into_inner());
            let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
            table.retain_bucket(b, |e| {
                if e.used.swap(false, Ordering::Relaxed) || left == 0 {
                    return true;
                }
                for (slot, _) in e.iter() {
                    slots.held[slot as usize].fetch_sub(1, Ordering::Relaxed);
                    match slots.workers[slot as usize] {
                        Some(_) => live += 1,
                        None => departed += 1,
                    }
                }
                left = left.saturating_sub(e.len());
                blocks += 1;
                false
            });
            drop(slots);
            *hand = if b + 1 < table.bucket_count() {
                (s, b + 1)
            } else {
                ((s + 1) % self.shards.len(), 0)
            };
            drop(table);
            self.pairs.fetch_sub(live, Ordering::Relaxed);
            self.departed_pairs.fetch_sub(departed, Ordering::Relaxed);
            self.pruned.fetch_add(blocks, Ordering::Relaxed);
        }
    }

    /// For each worker holding at least the first block: its leading run of `hashes`.
    pub fn find_matches(&self, hashes: &[SequenceHash]) -> OverlapMap {
        // (slot, overlap) of workers whose run ended.
        let mut out: Vec<(u32, Overlap)> = Vec::new();
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
            self.prefetch(i, hashes.len(), |k| hashes[k]);
            let shard = self.shard(*h).read().unwrap_or_else(|p| p.into_inner());
            let Some(entry) = shard.get(h) else {
                break;
            };
            entry.touch();
            if i == 0 {
                // Every holder of the first block ends in `out`: sized once.
                out.reserve_exact(entry.len());
            }
            let count_lower = |bits: &[u64], lower_hits: &mut IdMap<u32, Overlap>| {
                if entry.lower() > 0 {
                    for (s, t) in entry.iter() {
                        if !on_device(t) && has_bit(bits, s) {
                            lower_hits.entry(s).or_default().add(t);
                        }
                    }
                }
            };
            if i == 0 {
                match entry.bits() {
                    Some(bits) => {
                        count_lower(bits, &mut lower_hits);
                        dense = Some(bits.clone());
                    }
                    None => {
                        live = entry
                            .iter()
                            .map(|(s, t)| {
                                let mut o = Overlap::default();
                                o.add(t);
                                (s, o)
                            })
                            .collect();
                    }
                }
            } else if let Some(set) = dense.as_mut() {
                match entry.bits() {
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
                        for (s, t) in entry.iter() {
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
                live.retain_mut(|(s, o)| match entry.get(*s) {
                    Some(t) => {
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
        // Sized once (a popular prefix has hundreds of holders).
        let mut found = Vec::with_capacity(out.len());
        found.extend(
            out.into_iter()
                .filter_map(|(s, o)| Some((slots.workers.get(s as usize).copied().flatten()?, o))),
        );
        OverlapMap(found)
    }
}

mod bucket;
#[cfg(test)]
mod tests;
