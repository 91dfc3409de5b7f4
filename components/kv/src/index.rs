//! The global prefix index: which workers hold which cached blocks, across thousands of
//! workers, fed by their KV events and read by every routing decision.
//!
//! **Design.** A sequence hash names a whole prefix, so the index is a flat map from
//! [`SequenceHash`] to the workers holding that block (with a tier bitmask each), split into
//! `shards` maps behind their own `RwLock`s, chosen by hash. A reverse map (worker -> its
//! blocks, in a `DashMap`) makes "worker gone" and `cleared` cost the worker's own blocks, not
//! the index. Writes lock one shard for one block at a time; lookups take shard read locks one
//! block at a time, so ingest never blocks a lookup for longer than one block's update.
//!
//! **Lookup** (`find_matches`): walk the query's hashes in order, keeping the candidate
//! workers that held every block so far; a worker's score is its leading run, counted per
//! tier. O(L x C) for L query blocks and C candidates (each membership test is a hash lookup),
//! stopping at the first block no candidate holds.
//!
//! **Bounded memory**: at most `max_blocks` indexed (worker, block) pairs. Past that, whole
//! blocks are pruned least-recently-used first: a CLOCK-style queue (second chance for blocks
//! a lookup touched since they were queued), so the index never grows without bound when
//! events are lost or workers misbehave. Costs per stored block: O(1) amortized.
//!
//! Events of one worker must be applied in order by one caller at a time (the router applies
//! each worker's batches in event-id order); different workers' events may be applied
//! concurrently with each other and with lookups.
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
/// worker ids random instance ids): one multiply spreads them over the table, where SipHash
/// would cost most of a lookup.
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
}

type IdBuild = BuildHasherDefault<IdHasher>;
type IdMap<K, V> = HashMap<K, V, IdBuild>;

/// Per worker, its leading run of a query's blocks ([`KvIndex::find_matches`]).
pub type OverlapMap = IdMap<WorkerId, Overlap>;

#[derive(Debug, Clone)]
pub struct IndexSettings {
    /// Most (worker, block) pairs indexed before least-recently-used blocks are pruned.
    pub max_blocks: usize,
    pub shards: usize,
}

impl Default for IndexSettings {
    fn default() -> Self {
        Self {
            max_blocks: 20_000_000,
            shards: 64,
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
        if tiers & (1 | PREDICTED) != 0 {
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

struct Entry {
    holders: IdMap<WorkerId, u8>,
    /// Last touch (store or lookup), on the index clock.
    stamp: AtomicU64,
}

pub struct KvIndex {
    settings: IndexSettings,
    shards: Vec<RwLock<IdMap<SequenceHash, Entry>>>,
    workers: DashMap<WorkerId, HashSet<SequenceHash, IdBuild>, IdBuild>,
    pairs: AtomicUsize,
    clock: AtomicU64,
    queue: Mutex<VecDeque<(SequenceHash, u64)>>,
    pruned: AtomicU64,
}

impl KvIndex {
    pub fn new(settings: IndexSettings) -> Self {
        let shards = (0..settings.shards.max(1))
            .map(|_| RwLock::new(IdMap::default()))
            .collect();
        Self {
            settings,
            shards,
            workers: DashMap::with_hasher(IdBuild::default()),
            pairs: AtomicUsize::new(0),
            clock: AtomicU64::new(0),
            queue: Mutex::new(VecDeque::new()),
            pruned: AtomicU64::new(0),
        }
    }

    fn shard(&self, h: SequenceHash) -> &RwLock<IdMap<SequenceHash, Entry>> {
        // Sequence hashes are already uniformly distributed.
        &self.shards[(h.0 % self.shards.len() as u64) as usize]
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
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

    fn store(&self, worker: WorkerId, h: SequenceHash, tier: u8, stats: &mut ApplyStats) {
        let stamp = self.tick();
        let mut new_entry = false;
        {
            let mut shard = self.shard(h).write().unwrap_or_else(|p| p.into_inner());
            let entry = shard.entry(h).or_insert_with(|| {
                new_entry = true;
                Entry {
                    holders: IdMap::default(),
                    stamp: AtomicU64::new(stamp),
                }
            });
            entry.stamp.store(stamp, Ordering::Relaxed);
            let tiers = entry.holders.entry(worker).or_insert(0);
            if *tiers & tier != 0 {
                stats.duplicate_stores += 1;
                return;
            }
            if *tiers == 0 {
                self.pairs.fetch_add(1, Ordering::Relaxed);
            }
            *tiers |= tier;
        }
        self.workers.entry(worker).or_default().insert(h);
        stats.stored += 1;
        if new_entry {
            if let Ok(mut q) = self.queue.lock() {
                q.push_back((h, stamp));
            }
        }
    }

    /// Drops `tier` of `worker`'s hold on `h`; true if it held it there.
    fn unhold(&self, worker: WorkerId, h: SequenceHash, tier: u8) -> bool {
        let mut shard = self.shard(h).write().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = shard.get_mut(&h) else {
            return false;
        };
        let Some(tiers) = entry.holders.get_mut(&worker) else {
            return false;
        };
        if *tiers & tier == 0 {
            return false;
        }
        *tiers &= !tier;
        if *tiers == 0 {
            entry.holders.remove(&worker);
            self.pairs.fetch_sub(1, Ordering::Relaxed);
            drop(shard);
            if let Some(mut blocks) = self.workers.get_mut(&worker) {
                blocks.remove(&h);
            }
            self.drop_if_empty(h);
        }
        true
    }

    fn drop_if_empty(&self, h: SequenceHash) {
        let mut shard = self.shard(h).write().unwrap_or_else(|p| p.into_inner());
        if shard.get(&h).is_some_and(|e| e.holders.is_empty()) {
            shard.remove(&h);
        }
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
                        .map(|b| b.iter().copied().collect())
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
        let Some((_, held)) = self.workers.remove(&worker) else {
            return;
        };
        for h in held {
            let mut shard = self.shard(h).write().unwrap_or_else(|p| p.into_inner());
            if let Some(entry) = shard.get_mut(&h) {
                if entry.holders.remove(&worker).is_some() {
                    self.pairs.fetch_sub(1, Ordering::Relaxed);
                }
                if entry.holders.is_empty() {
                    shard.remove(&h);
                }
            }
        }
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
            for w in entry.holders.keys() {
                if let Some(mut b) = self.workers.get_mut(w) {
                    b.remove(&h);
                }
            }
            self.pruned.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// For each worker holding at least the first block: its leading run of `hashes`.
    pub fn find_matches(&self, hashes: &[SequenceHash]) -> OverlapMap {
        let mut done = OverlapMap::default();
        let mut live: Vec<(WorkerId, Overlap)> = Vec::new();
        let stamp = self.tick();
        for (i, h) in hashes.iter().enumerate() {
            let shard = self.shard(*h).read().unwrap_or_else(|p| p.into_inner());
            let Some(entry) = shard.get(h) else {
                break;
            };
            entry.stamp.store(stamp, Ordering::Relaxed);
            if i == 0 {
                live = entry
                    .holders
                    .iter()
                    .map(|(&w, &t)| {
                        let mut o = Overlap::default();
                        o.add(t);
                        (w, o)
                    })
                    .collect();
            } else {
                live.retain_mut(|(w, o)| match entry.holders.get(w) {
                    Some(&t) => {
                        o.add(t);
                        true
                    }
                    None => {
                        done.insert(*w, *o);
                        false
                    }
                });
            }
            if live.is_empty() {
                break;
            }
        }
        done.extend(live);
        done
    }
}

#[cfg(test)]
mod tests;
