//! A lower KV tier (host RAM): cached blocks the device pool evicted, kept by sequence hash
//! within a byte capacity, least recently used out first.
//!
//! The tier holds each block's identity (hash, parent, local hash, position), its contents (an
//! engine's bytes, or none for a simulation, which then counts `nominal` bytes per block
//! against the capacity) and how many requests used it ([`Frequency`]).
//!
//! Every change returns what it did ([`TierChange`]) so the caller (the scheduler) emits the
//! tier's KV events in the worker's one event-id sequence.
//!
//! Costs: insert, get and eviction are O(log n) (the LRU is a B-tree on a use stamp).

use std::collections::{BTreeMap, HashMap};

use dynamo_protocols::kv::{LocalBlockHash, SequenceHash};

/// One block held in a tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierBlock {
    pub hash: SequenceHash,
    pub parent: Option<SequenceHash>,
    pub local: LocalBlockHash,
    pub position: u32,
    pub data: Vec<u8>,
    /// Requests that used it (from [`Frequency`] when it was offloaded).
    pub uses: u32,
}

/// What an insert did to the tier.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TierChange {
    /// Newly held (`false`: it was held already and only refreshed).
    pub stored: bool,
    /// Blocks pushed out to make room, least recently used first.
    pub evicted: Vec<TierBlock>,
}

/// Entries by sequence hash, each counting some bytes against a capacity, least recently used
/// first out: the bookkeeping both lower tiers share (the host tier's blocks, the disk tier's
/// file index). Insert, touch, remove and eviction are O(log n) (the order is a B-tree on a use
/// stamp).
#[derive(Debug)]
pub(crate) struct ByteLru<V> {
    capacity: usize,
    used: usize,
    entries: HashMap<SequenceHash, (V, usize, u64)>,
    lru: BTreeMap<u64, SequenceHash>,
    clock: u64,
}

impl<V> ByteLru<V> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            used: 0,
            entries: HashMap::new(),
            lru: BTreeMap::new(),
            clock: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn used(&self) -> usize {
        self.used
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn contains(&self, hash: &SequenceHash) -> bool {
        self.entries.contains_key(hash)
    }

    pub(crate) fn get(&self, hash: &SequenceHash) -> Option<&V> {
        self.entries.get(hash).map(|(v, _, _)| v)
    }

    /// How many of the leading `hashes` are held.
    pub(crate) fn match_prefix(&self, hashes: &[SequenceHash]) -> usize {
        hashes.iter().take_while(|h| self.contains(h)).count()
    }

    /// Makes `hash` the most recently used.
    pub(crate) fn touch(&mut self, hash: SequenceHash) {
        if let Some((_, _, stamp)) = self.entries.get_mut(&hash) {
            self.lru.remove(stamp);
            self.clock += 1;
            *stamp = self.clock;
            self.lru.insert(self.clock, hash);
        }
    }

    /// Removes least recently used entries until `size` more bytes fit; returns them, oldest
    /// first.
    pub(crate) fn make_room(&mut self, size: usize) -> Vec<(SequenceHash, V)> {
        let mut out = Vec::new();
        while self.used + size > self.capacity {
            let Some((_, victim)) = self.lru.pop_first() else {
                break;
            };
            if let Some((v, n, _)) = self.entries.remove(&victim) {
                self.used -= n;
                out.push((victim, v));
            }
        }
        out
    }

    /// Holds `v` under `hash` (not held yet) as the most recent, counting `size` bytes.
    pub(crate) fn insert(&mut self, hash: SequenceHash, v: V, size: usize) {
        self.clock += 1;
        self.lru.insert(self.clock, hash);
        self.used += size;
        self.entries.insert(hash, (v, size, self.clock));
    }

    pub(crate) fn remove(&mut self, hash: &SequenceHash) -> Option<V> {
        let (v, n, stamp) = self.entries.remove(hash)?;
        self.lru.remove(&stamp);
        self.used -= n;
        Some(v)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&SequenceHash, &V)> {
        self.entries.iter().map(|(h, (v, _, _))| (h, v))
    }
}

#[derive(Debug)]
pub struct HostTier {
    /// Bytes a block counts when it carries none (a simulated engine).
    nominal: usize,
    blocks: ByteLru<TierBlock>,
}

impl HostTier {
    /// A tier of `capacity` bytes; blocks without contents count `nominal` bytes.
    pub fn new(capacity: usize, nominal: usize) -> Self {
        Self {
            nominal,
            blocks: ByteLru::new(capacity),
        }
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.len() == 0
    }

    /// Bytes held.
    pub fn used(&self) -> usize {
        self.blocks.used()
    }

    pub fn capacity(&self) -> usize {
        self.blocks.capacity()
    }

    pub fn contains(&self, hash: &SequenceHash) -> bool {
        self.blocks.contains(hash)
    }

    /// How many of the leading `hashes` are held.
    pub fn match_prefix(&self, hashes: &[SequenceHash]) -> usize {
        self.blocks.match_prefix(hashes)
    }

    /// Holds `block` (or refreshes it when held already), evicting least recently used blocks
    /// while over capacity. A block larger than the whole tier is not held.
    pub fn insert(&mut self, block: TierBlock) -> TierChange {
        let mut change = TierChange::default();
        if self.blocks.contains(&block.hash) {
            self.blocks.touch(block.hash);
            return change;
        }
        let size = block_size(&block, self.nominal);
        if size > self.blocks.capacity() {
            return change;
        }
        change.evicted = self
            .blocks
            .make_room(size)
            .into_iter()
            .map(|(_, b)| b)
            .collect();
        self.blocks.insert(block.hash, block, size);
        change.stored = true;
        change
    }

    /// The block of `hash`, made most recent.
    pub fn get(&mut self, hash: &SequenceHash) -> Option<&TierBlock> {
        self.blocks.touch(*hash);
        self.blocks.get(hash)
    }

    /// The held blocks' identities, parents before children (for dumps).
    pub fn identities(&self) -> Vec<(Option<SequenceHash>, SequenceHash, LocalBlockHash)> {
        let mut v: Vec<&TierBlock> = self.blocks.iter().map(|(_, b)| b).collect();
        v.sort_by_key(|b| b.position);
        v.into_iter().map(|b| (b.parent, b.hash, b.local)).collect()
    }
}

/// Bytes `b` counts in a tier: its contents, or `nominal` without any (a simulation).
pub(crate) fn block_size(b: &TierBlock, nominal: usize) -> usize {
    if b.data.is_empty() {
        nominal
    } else {
        b.data.len()
    }
}

/// How many requests used each recent block (by sequence hash), kept past the block's stay in
/// any tier: the disk's frequency filter reads it, so a block recomputed after it left every
/// tier still counts its earlier uses. Bounded: past `capacity` entries every count is halved
/// and the zeros are forgotten (the TinyLFU reset: old popularity fades, recent stays).
#[derive(Debug)]
pub struct Frequency {
    counts: HashMap<SequenceHash, u32>,
    capacity: usize,
}

impl Frequency {
    pub fn new(capacity: usize) -> Self {
        Self {
            counts: HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// One more request used each of `hashes`.
    pub fn add(&mut self, hashes: impl IntoIterator<Item = SequenceHash>) {
        for h in hashes {
            let c = self.counts.entry(h).or_insert(0);
            *c = c.saturating_add(1);
        }
        if self.counts.len() > self.capacity {
            self.counts.retain(|_, c| {
                *c /= 2;
                *c > 0
            });
        }
    }

    pub fn get(&self, hash: &SequenceHash) -> u32 {
        self.counts.get(hash).copied().unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.counts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(h: u64, bytes: usize) -> TierBlock {
        TierBlock {
            hash: SequenceHash(h),
            parent: h.checked_sub(1).map(SequenceHash),
            local: LocalBlockHash(h),
            position: h as u32,
            data: vec![h as u8; bytes],
            uses: 1,
        }
    }

    #[test]
    fn the_least_recently_used_block_leaves_first_within_the_capacity() {
        let mut t = HostTier::new(300, 0);
        for h in 0..3 {
            assert!(t.insert(block(h, 100)).stored);
        }
        assert_eq!(t.used(), 300);
        // Using block 0 makes block 1 the oldest.
        assert!(t.get(&SequenceHash(0)).is_some());
        let change = t.insert(block(3, 100));
        assert_eq!(
            change.evicted.iter().map(|b| b.hash.0).collect::<Vec<_>>(),
            [1]
        );
        assert_eq!(t.match_prefix(&[SequenceHash(0), SequenceHash(1)]), 1);
        // Held already: refreshed, nothing stored or evicted.
        assert_eq!(t.insert(block(2, 100)), TierChange::default());
        // Too big for the tier: not held, nothing evicted.
        assert_eq!(t.insert(block(9, 400)), TierChange::default());
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn frequencies_outlive_the_blocks_and_fade_when_the_table_is_full() {
        let mut f = Frequency::new(3);
        for _ in 0..3 {
            f.add([SequenceHash(1)]);
        }
        f.add([SequenceHash(2), SequenceHash(3)]);
        assert_eq!((f.get(&SequenceHash(1)), f.get(&SequenceHash(2))), (3, 1));
        // A fourth entry: every count halves, the ones seen once are forgotten.
        f.add([SequenceHash(4)]);
        assert_eq!(f.len(), 1);
        assert_eq!(f.get(&SequenceHash(1)), 1);
    }

    #[test]
    fn blocks_without_contents_count_their_nominal_size() {
        let mut t = HostTier::new(1000, 400);
        t.insert(block(0, 0));
        t.insert(block(1, 0));
        assert_eq!(t.used(), 800);
        assert_eq!(t.insert(block(2, 0)).evicted.len(), 1);
        assert_eq!(t.identities().len(), 2);
    }
}
