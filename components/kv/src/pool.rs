//! The paged block pool: a fixed number of blocks of `block_size` tokens.
//!
//! Every block is in exactly one of three states, which [`BlockPool::check`] verifies:
//! - **active**: referenced by at least one sequence (`refs > 0`), cached or not;
//! - **cached, idle**: unreferenced but holding a known prefix; kept in an LRU and reused by a
//!   later sequence with the same prefix, or evicted (oldest first) only when space is needed;
//! - **free**: unreferenced and holding nothing.
//!
//! A sequence reuses the longest run of cached blocks matching its leading sequence hashes
//! ([`BlockPool::acquire_prefix`]); new blocks come from the free list, then from evicting
//! idle cached blocks ([`BlockPool::allocate`]). A block becomes cached when it fills
//! ([`BlockPool::register`]). Released blocks go to the LRU tail-first, so a sequence's last
//! blocks are evicted before its first (which other prompts are likelier to share).
//!
//! Every change of cached content appends a [`KvEvent`] (stored, removed, cleared) with the next
//! event id; consecutive stores of one chain and consecutive removals merge into one event.
//! [`BlockPool::take_events`] hands them out; [`BlockPool::dump`] describes the cached set as of
//! the last event id. Replaying the events yields exactly the cached set (property-tested).
//!
//! Eviction hook: with [`BlockPool::track_evictions`] on, every cached block that an
//! allocation evicts is recorded ([`Evicted`]: its block, hashes and position) before the
//! block is handed out; [`BlockPool::take_evicted`] hands the records out while the blocks
//! still hold the evicted contents (nothing writes a block between its allocation and the
//! next compute step), so an offloader can copy them first.
//!
//! Costs: allocate and release are O(1) per block (the LRU is a list threaded through the
//! blocks' metadata); prefix matching is O(matched) hash lookups.

use std::collections::HashMap;

/// No block (the ends of the LRU list).
const NIL: u32 = u32::MAX;

use dynamo_protocols::kv::{
    KvDump, KvEvent, KvEventData, LocalBlockHash, SequenceHash, StorageTier, StoredBlock,
};

/// A block's index in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(u32);

impl BlockId {
    /// Block `index` of a cache managed outside a pool (scoring a prompt on a private cache).
    pub fn new(index: u32) -> Self {
        Self(index)
    }

    pub fn index(self) -> usize {
        self.0 as usize
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// Not enough free or evictable blocks now; retry after others finish (or preempt).
    #[error("{wanted} blocks wanted, {available} available")]
    OutOfBlocks { wanted: usize, available: usize },
    /// The operation needs no block to be in use.
    #[error("{active} blocks are in use")]
    Busy { active: usize },
}

#[derive(Debug, Clone, Copy)]
struct Cached {
    hash: SequenceHash,
    parent: Option<SequenceHash>,
    local: LocalBlockHash,
    /// The block's index in its sequence (orders dumps parents-first).
    position: u32,
}

#[derive(Debug, Clone, Default)]
struct Meta {
    refs: u32,
    cached: Option<Cached>,
    /// When it became idle (increasing along the LRU list; for [`BlockPool::check`]).
    stamp: u64,
    /// Its neighbours in the LRU list while idle (older, newer).
    prev: u32,
    next: u32,
}

/// A cached block an allocation evicted (see the module header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evicted {
    /// The block, now handed to a new owner, still holding the evicted contents.
    pub block: BlockId,
    pub hash: SequenceHash,
    pub parent: Option<SequenceHash>,
    pub local: LocalBlockHash,
    /// The block's index in its sequence.
    pub position: u32,
}

#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    tier: StorageTier,
    /// Every block handed out so far (grown on demand up to `capacity`, so a large pool
    /// that is never filled costs no memory).
    blocks: Vec<Meta>,
    /// Blocks released uncached; blocks never handed out are not listed.
    free: Vec<BlockId>,
    capacity: usize,
    /// Keyed by sequence hashes, already random: one multiply spreads them (SipHash was a
    /// tenth of a block's registration).
    by_hash: HashMap<SequenceHash, BlockId, crate::index::IdBuild>,
    /// Idle cached blocks, least recently released first: the ends of a list through
    /// `Meta::prev` and `Meta::next`, and its length.
    lru_head: u32,
    lru_tail: u32,
    lru_len: usize,
    clock: u64,
    next_event: u64,
    pending: Vec<KvEvent>,
    /// `Some` while evictions are tracked.
    evicted: Option<Vec<Evicted>>,
}

impl BlockPool {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            block_size: block_size.max(1),
            tier: StorageTier::Device,
            blocks: Vec::new(),
            free: Vec::new(),
            capacity: num_blocks,
            by_hash: HashMap::default(),
            lru_head: NIL,
            lru_tail: NIL,
            lru_len: 0,
            clock: 0,
            next_event: 0,
            pending: Vec::new(),
            evicted: None,
        }
    }

    /// Records evicted cached blocks from now on (`true`), or stops (and forgets the records).
    pub fn track_evictions(&mut self, on: bool) {
        self.evicted = on.then(Vec::new);
    }

    /// The cached blocks evicted since the last call (in eviction order).
    pub fn take_evicted(&mut self) -> Vec<Evicted> {
        self.evicted
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.capacity
    }

    /// Blocks referenced by some sequence.
    pub fn active_blocks(&self) -> usize {
        self.blocks.len() - self.free.len() - self.lru_len
    }

    /// Blocks never used or released uncached: allocating up to this many evicts nothing.
    pub fn unused(&self) -> usize {
        self.free.len() + (self.capacity - self.blocks.len())
    }

    /// Blocks an allocation can get now (free plus evictable).
    pub fn available(&self) -> usize {
        self.unused() + self.lru_len
    }

    pub fn cached_blocks(&self) -> usize {
        self.by_hash.len()
    }

    /// How many leading `hashes` are cached (without taking them).
    pub fn match_prefix(&self, hashes: &[SequenceHash]) -> usize {
        hashes
            .iter()
            .take_while(|h| self.by_hash.contains_key(h))
            .count()
    }

    /// The local (token) hash of the prefix block `block` holds, if it is cached.
    pub fn cached_local(&self, block: BlockId) -> Option<LocalBlockHash> {
        self.blocks[block.index()].cached.as_ref().map(|c| c.local)
    }

    /// Takes a reference on each leading cached block of `hashes`; returns them in order.
    pub fn acquire_prefix(&mut self, hashes: &[SequenceHash]) -> Vec<BlockId> {
        let mut out = Vec::new();
        for h in hashes {
            let Some(&id) = self.by_hash.get(h) else {
                break;
            };
            let meta = &mut self.blocks[id.index()];
            let idle = meta.refs == 0;
            meta.refs += 1;
            if idle {
                self.lru_unlink(id);
            }
            out.push(id);
        }
        out
    }

    /// `n` new, empty blocks (referenced once), evicting idle cached blocks if needed.
    pub fn allocate(&mut self, n: usize) -> Result<Vec<BlockId>, PoolError> {
        if n > self.available() {
            return Err(PoolError::OutOfBlocks {
                wanted: n,
                available: self.available(),
            });
        }
        let mut out = Vec::with_capacity(n);
        // Blocks this takes from the idle cached ones (each evicted: a removal to publish).
        let unused = self.capacity.saturating_sub(self.blocks.len());
        let mut evicting = n.saturating_sub(self.free.len() + unused);
        while out.len() < n {
            let id = match self.free.pop() {
                Some(id) => id,
                // A block never used: the lowest index not handed out yet.
                None if self.blocks.len() < self.capacity => {
                    self.blocks.push(Meta::default());
                    BlockId(self.blocks.len() as u32 - 1)
                }
                None => {
                    let id = self.lru_pop().expect("available() counted it");
                    if let (Some(out), Some(c)) =
                        (self.evicted.as_mut(), self.blocks[id.index()].cached)
                    {
                        out.push(Evicted {
                            block: id,
                            hash: c.hash,
                            parent: c.parent,
                            local: c.local,
                            position: c.position,
                        });
                    }
                    self.uncache(id, evicting);
                    evicting = evicting.saturating_sub(1);
                    id
                }
            };
            self.blocks[id.index()].refs = 1;
            out.push(id);
        }
        Ok(out)
    }

    /// Forgets `id`'s contents, publishing their removal (`more`: removals this one starts,
    /// to size a new event for).
    fn uncache(&mut self, id: BlockId, more: usize) {
        if let Some(c) = self.blocks[id.index()].cached.take() {
            self.by_hash.remove(&c.hash);
            let own_tier = self.tier;
            if let Some(KvEvent {
                data: KvEventData::Removed { block_hashes },
                ..
            }) = self.pending.last_mut().filter(|e| e.tier == own_tier)
            {
                block_hashes.push(c.hash);
            } else {
                let mut block_hashes = Vec::with_capacity(more.max(1));
                block_hashes.push(c.hash);
                self.emit(KvEventData::Removed { block_hashes });
            }
        }
    }

    fn emit(&mut self, data: KvEventData) {
        self.emit_tier(self.tier, data);
    }

    /// Appends an event of another tier (a lower tier's change) in this pool's event-id
    /// sequence: one sequence per worker, whatever the tier.
    pub fn emit_tier(&mut self, tier: StorageTier, data: KvEventData) {
        self.pending.push(KvEvent {
            event_id: self.next_event,
            tier,
            data,
        });
        self.next_event += 1;
    }

    /// Records that `block` is full and holds the prefix `hash`. A prefix already cached in
    /// another block is not cached twice (this block stays private to its sequence).
    pub fn register(
        &mut self,
        block: BlockId,
        parent: Option<SequenceHash>,
        local: LocalBlockHash,
        hash: SequenceHash,
        position: u32,
    ) {
        if self.blocks[block.index()].cached.is_some() || self.by_hash.contains_key(&hash) {
            return;
        }
        self.blocks[block.index()].cached = Some(Cached {
            hash,
            parent,
            local,
            position,
        });
        self.by_hash.insert(hash, block);
        let stored = StoredBlock {
            block_hash: hash,
            tokens_hash: local,
        };
        // Extend the last event if it stored this block's parent.
        if let Some(KvEvent {
            data: KvEventData::Stored { blocks, .. },
            tier,
            ..
        }) = self.pending.last_mut()
        {
            if *tier == self.tier
                && parent.is_some()
                && blocks.last().map(|b| b.block_hash) == parent
            {
                blocks.push(stored);
                return;
            }
        }
        // Room for the blocks a prompt's prefill registers after this one (they extend it).
        let mut blocks = Vec::with_capacity(8);
        blocks.push(stored);
        self.emit(KvEventData::Stored {
            parent_hash: parent,
            blocks,
        });
    }

    /// Appends `id` to the LRU list (the most recently released).
    fn lru_push(&mut self, id: BlockId) {
        let i = id.0;
        let tail = self.lru_tail;
        let m = &mut self.blocks[i as usize];
        (m.prev, m.next) = (tail, NIL);
        match tail {
            NIL => self.lru_head = i,
            t => self.blocks[t as usize].next = i,
        }
        self.lru_tail = i;
        self.lru_len += 1;
    }

    /// Takes `id` (idle) out of the LRU list.
    fn lru_unlink(&mut self, id: BlockId) {
        let m = &self.blocks[id.index()];
        let (prev, next) = (m.prev, m.next);
        match prev {
            NIL => self.lru_head = next,
            p => self.blocks[p as usize].next = next,
        }
        match next {
            NIL => self.lru_tail = prev,
            n => self.blocks[n as usize].prev = prev,
        }
        self.lru_len -= 1;
    }

    /// Takes the least recently released idle block out of the LRU list.
    fn lru_pop(&mut self) -> Option<BlockId> {
        let head = self.lru_head;
        (head != NIL).then(|| {
            self.lru_unlink(BlockId(head));
            BlockId(head)
        })
    }

    /// Drops one reference on each block; unreferenced cached blocks become idle (evictable,
    /// the last given first), the others free.
    pub fn release(&mut self, blocks: &[BlockId]) {
        for &id in blocks.iter().rev() {
            let meta = &mut self.blocks[id.index()];
            debug_assert!(meta.refs > 0, "release of an unreferenced block");
            meta.refs = meta.refs.saturating_sub(1);
            if meta.refs > 0 {
                continue;
            }
            if meta.cached.is_some() {
                self.clock += 1;
                meta.stamp = self.clock;
                self.lru_push(id);
            } else {
                self.free.push(id);
            }
        }
    }

    /// Forgets every cached block (none may be in use) and emits `cleared`.
    pub fn reset(&mut self) -> Result<(), PoolError> {
        let active = self.active_blocks();
        if active > 0 {
            return Err(PoolError::Busy { active });
        }
        while let Some(id) = self.lru_pop() {
            self.blocks[id.index()].cached = None;
            self.free.push(id);
        }
        self.by_hash.clear();
        self.emit(KvEventData::Cleared);
        Ok(())
    }

    /// Events since the last call, in order.
    pub fn take_events(&mut self) -> Vec<KvEvent> {
        std::mem::take(&mut self.pending)
    }

    /// The cached set as of the last emitted event.
    pub fn dump(&self) -> KvDump {
        let mut blocks: Vec<&Cached> = self
            .blocks
            .iter()
            .filter_map(|m| m.cached.as_ref())
            .collect();
        blocks.sort_by_key(|c| c.position);
        KvDump {
            lower: Vec::new(),
            last_event_id: self.next_event.checked_sub(1),
            block_size: self.block_size as u32,
            blocks: blocks
                .into_iter()
                .map(|c| {
                    (
                        c.parent,
                        StoredBlock {
                            block_hash: c.hash,
                            tokens_hash: c.local,
                        },
                    )
                })
                .collect(),
        }
    }

    /// The cached prefixes.
    pub fn cached_hashes(&self) -> impl Iterator<Item = SequenceHash> + '_ {
        self.by_hash.keys().copied()
    }

    /// Verifies the pool's invariants; returns what is wrong.
    pub fn check(&self) -> Result<(), String> {
        let mut free = vec![false; self.blocks.len()];
        for id in &self.free {
            if std::mem::replace(&mut free[id.index()], true) {
                return Err(format!("{id:?} is on the free list twice"));
            }
            let m = &self.blocks[id.index()];
            if m.refs > 0 || m.cached.is_some() {
                return Err(format!("free {id:?} is referenced or cached"));
            }
        }
        let mut idle = vec![false; self.blocks.len()];
        let (mut at, mut prev, mut last_stamp, mut len) = (self.lru_head, NIL, 0, 0);
        while at != NIL {
            let m = &self.blocks[at as usize];
            if std::mem::replace(&mut idle[at as usize], true) {
                return Err(format!("the LRU list loops at block {at}"));
            }
            if m.refs > 0 || m.cached.is_none() || free[at as usize] {
                return Err(format!("idle block {at} is referenced, uncached or free"));
            }
            if m.prev != prev || m.stamp <= last_stamp {
                return Err(format!("idle block {at} is misfiled"));
            }
            (prev, last_stamp, len, at) = (at, m.stamp, len + 1, m.next);
        }
        if prev != self.lru_tail || len != self.lru_len {
            return Err("the LRU list's tail or length is wrong".into());
        }
        for (i, m) in self.blocks.iter().enumerate() {
            if m.refs == 0 && !free[i] && !idle[i] {
                return Err(format!(
                    "block {i} is unreferenced but neither free nor idle"
                ));
            }
            if let Some(c) = &m.cached {
                if self.by_hash.get(&c.hash).map(|b| b.index()) != Some(i) {
                    return Err(format!("block {i} is cached but not indexed by its hash"));
                }
            }
        }
        if self.by_hash.len() != self.blocks.iter().filter(|m| m.cached.is_some()).count() {
            return Err("the hash index and the blocks disagree".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
