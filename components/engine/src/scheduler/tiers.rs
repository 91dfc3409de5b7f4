//! The lower tiers on the scheduler: evicted blocks go down (offload), a prompt's prefix that
//! continues there comes back up (onboard).
//!
//! - **Offload to host.** When the pool evicts a cached block, its contents are read before
//!   the block is reused (`offer_evicted`, at most `offload_per_step` a step: the offload
//!   queue's bound; the rest are dropped and counted) and the block goes into the host tier,
//!   whose LRU may push older blocks out.
//! - **Host to disk.** A block the host tier pushes out goes to the disk tier only when at
//!   least `disk_min_uses` requests used it ([`DISK_MIN_USES`] by default the frequency filter: computed once and
//!   reused twice), so one-off prompts do not churn the disk. Uses are counted per prompt block at
//!   admission in a bounded table ([`dynamo_kv::Frequency`]) that outlives the block's stay
//!   in the tiers: a conversation whose history left host RAM before its next turn (and was
//!   recomputed) still earns its place on disk by the third turn. It is handed to the offloader thread
//!   ([`super::offloader`]) through a bounded queue; a full queue drops it, counted. The
//!   thread writes the file; its changes come back as events the scheduler publishes.
//! - **Onboard.** At admission, after the device prefix, the blocks that continue it in the
//!   host tier, then on disk, are copied into newly allocated device blocks and registered as
//!   cached, when the executor's cost model ([`super::Executor::onboard`]) says that beats
//!   computing them; they count as cached tokens, per tier in [`TierReport`]. Contents are
//!   taken from the tiers before the allocation, whose own evictions are offloaded (read)
//!   before anything overwrites them. A disk block that fails its check ends the onboarded
//!   run there: it and what follows are computed.
//! - Every tier change is a KV event with its tier, in the pool's one event-id sequence, so a
//!   router credits lower-tier hits; dumps list the tiers' blocks too. The disk blocks found
//!   at start (a warm restart) are announced as the first events.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use dynamo_kv::{BlockId, TierBlock};
use dynamo_protocols::kv::{
    KvEventData, LocalBlockHash, SequenceHash, StorageTier, StoredBlock, TierReport,
};

use super::offloader::{DiskEvent, NotQueued, Offloader};
use super::{Executor, Scheduler};

/// Requests that must have used a block for it to be written to disk, by default (computed
/// once, reused twice); `--disk-min-uses` sets it.
pub const DISK_MIN_USES: u32 = 3;

/// The disk tier as the scheduler sees it: the offloader, and the blocks announced so far.
pub(super) struct Disk {
    pub offloader: Offloader,
    /// Blocks whose `stored` event is out and whose `removed` is not (what dumps list).
    pub known: HashMap<SequenceHash, (Option<SequenceHash>, LocalBlockHash, u32)>,
}

impl Disk {
    /// Publishes that `hashes` left the disk tier.
    fn forget(&mut self, pool: &mut dynamo_kv::BlockPool, hashes: Vec<SequenceHash>) {
        for h in &hashes {
            self.known.remove(h);
        }
        pool.emit_tier(
            StorageTier::Disk,
            KvEventData::Removed {
                block_hashes: hashes,
            },
        );
    }
}

/// Emits `blocks` (parents before children) as stored events of `tier`, a chain per event.
fn announce(
    pool: &mut dynamo_kv::BlockPool,
    tier: StorageTier,
    blocks: &[(Option<SequenceHash>, SequenceHash, LocalBlockHash)],
) {
    let mut run: Vec<StoredBlock> = Vec::new();
    let mut parent = None;
    let flush = |pool: &mut dynamo_kv::BlockPool, parent, run: &mut Vec<StoredBlock>| {
        if !run.is_empty() {
            pool.emit_tier(
                tier,
                KvEventData::Stored {
                    parent_hash: parent,
                    blocks: std::mem::take(run),
                },
            );
        }
    };
    for &(p, hash, local) in blocks {
        if run.last().map(|b| b.block_hash) != p || p.is_none() {
            flush(pool, parent, &mut run);
            parent = p;
        }
        run.push(StoredBlock {
            block_hash: hash,
            tokens_hash: local,
        });
    }
    flush(pool, parent, &mut run);
}

impl<E: Executor> Scheduler<E> {
    /// Opens the disk tier configured in the settings; an unusable one is said once and
    /// counted, and the engine runs without it. Announces the blocks it holds.
    pub(super) fn open_disk(&mut self) {
        let Some(settings) = self.settings.disk.clone() else {
            return;
        };
        match Offloader::start(settings, self.settings.disk_queue) {
            Ok(offloader) => {
                let (tier, _) = offloader.lock();
                let held = tier.identities();
                let counts = tier.counts();
                drop(tier);
                self.tiers.disk_recovered = counts.recovered;
                self.tiers.disk_corrupt = counts.corrupt;
                self.tiers.disk_foreign = counts.foreign;
                if counts.corrupt + counts.foreign > 0 {
                    tracing::warn!(
                        corrupt = counts.corrupt,
                        foreign = counts.foreign,
                        "the disk KV tier dropped files it cannot serve (truncated, corrupt, or of another model or layout)"
                    );
                }
                announce(&mut self.pool, StorageTier::Disk, &held);
                let known = held
                    .iter()
                    .enumerate()
                    .map(|(i, &(p, h, l))| (h, (p, l, i as u32)))
                    .collect();
                self.disk = Some(Disk { offloader, known });
                self.poll_disk();
            }
            Err(e) => {
                tracing::warn!(error = %e, "the worker serves without its disk KV tier");
                self.tiers.disk_unusable = 1;
            }
        }
    }

    /// Publishes the changes the offloader reported (and refreshes the disk figures).
    pub(super) fn poll_disk(&mut self) {
        let Some(disk) = self.disk.as_mut() else {
            return;
        };
        let (tier, events) = disk.offloader.lock();
        let counts = tier.counts();
        self.tiers.disk_blocks = tier.len() as u64;
        self.tiers.disk_bytes = tier.used() as u64;
        drop(tier);
        self.tiers.disk_corrupt = counts.corrupt;
        self.tiers.disk_write_errors = counts.write_errors;
        for e in events {
            match e {
                DiskEvent::Stored {
                    parent,
                    hash,
                    local,
                    position,
                    bytes,
                } => {
                    self.tiers.disk_offloaded_blocks += 1;
                    self.tiers.disk_offloaded_bytes += bytes;
                    disk.known.insert(hash, (parent, local, position));
                    self.pool.emit_tier(
                        StorageTier::Disk,
                        KvEventData::Stored {
                            parent_hash: parent,
                            blocks: vec![StoredBlock {
                                block_hash: hash,
                                tokens_hash: local,
                            }],
                        },
                    );
                }
                DiskEvent::Removed(hashes) => {
                    self.tiers.disk_evicted += hashes.len() as u64;
                    disk.forget(&mut self.pool, hashes);
                }
            }
        }
    }

    /// The disk tier's blocks as announced (for dumps), parents first.
    pub(super) fn disk_identities(
        &self,
    ) -> Vec<(Option<SequenceHash>, SequenceHash, LocalBlockHash)> {
        let Some(disk) = &self.disk else {
            return Vec::new();
        };
        let mut v: Vec<_> = disk.known.iter().collect();
        v.sort_by_key(|(_, (_, _, pos))| *pos);
        v.into_iter().map(|(h, (p, l, _))| (*p, *h, *l)).collect()
    }

    /// Puts an evicted block (with its contents) into the host tier; what the host tier
    /// pushes out goes on to the disk through the filter.
    pub(super) fn offload(&mut self, block: TierBlock) {
        let Some(host) = self.host.as_mut() else {
            return;
        };
        let (bytes, parent, hash, local) = (
            block.data.len() as u64,
            block.parent,
            block.hash,
            block.local,
        );
        let change = host.insert(block);
        if !change.evicted.is_empty() {
            self.tiers.host_evicted += change.evicted.len() as u64;
            self.pool.emit_tier(
                StorageTier::Host,
                KvEventData::Removed {
                    block_hashes: change.evicted.iter().map(|b| b.hash).collect(),
                },
            );
            for b in change.evicted {
                self.spill_to_disk(b);
            }
        }
        if change.stored {
            self.tiers.offloaded_blocks += 1;
            self.tiers.offloaded_bytes += bytes;
            self.pool.emit_tier(
                StorageTier::Host,
                KvEventData::Stored {
                    parent_hash: parent,
                    blocks: vec![StoredBlock {
                        block_hash: hash,
                        tokens_hash: local,
                    }],
                },
            );
        }
    }

    /// Offers a block leaving the host tier to the disk (see the module header).
    pub(super) fn spill_to_disk(&mut self, b: TierBlock) {
        let Some(disk) = self.disk.as_mut() else {
            return;
        };
        if disk.known.contains_key(&b.hash) {
            return;
        }
        if b.uses.max(self.freq.get(&b.hash)) < self.settings.disk_min_uses {
            self.tiers.disk_filtered += 1;
            return;
        }
        match disk.offloader.offer(b) {
            Ok(()) => {}
            Err(NotQueued::Full | NotQueued::Closed) => self.tiers.disk_dropped += 1,
        }
    }

    /// Extends `acquired` (the device prefix of `hashes`) with the blocks that continue it in
    /// the host tier and then on disk, when onboarding them is worth it and the pool has room.
    /// Returns the tokens onboarded from host and from disk.
    pub(super) fn onboard(
        &mut self,
        hashes: &[SequenceHash],
        acquired: &mut Vec<BlockId>,
    ) -> (usize, usize) {
        if self.host.is_none() && self.disk.is_none() {
            return (0, 0);
        }
        self.poll_disk();
        let from = acquired.len();
        let on_host = self
            .host
            .as_ref()
            .map_or(0, |h| h.match_prefix(&hashes[from..]));
        let on_disk = self.disk.as_ref().map_or(0, |d| {
            hashes[from + on_host..]
                .iter()
                .take_while(|h| d.known.contains_key(h))
                .count()
        });
        if on_host + on_disk == 0 {
            return (0, 0);
        }
        let bs = self.settings.block_size;
        // The whole run if it beats computing it; else the host part alone (a slow disk must
        // not cost the host hits).
        let mut on_disk = on_disk;
        let simulated = match self
            .executor
            .onboard(on_host, on_disk, (on_host + on_disk) * bs)
        {
            Some(t) => t,
            None => {
                self.tiers.onboard_declined += 1;
                on_disk = 0;
                match (on_host > 0)
                    .then(|| self.executor.onboard(on_host, 0, on_host * bs))
                    .flatten()
                {
                    Some(t) => t,
                    None => return (0, 0),
                }
            }
        };
        let started = Instant::now();
        // Contents first: the allocation below may offload other blocks into the host tier
        // and push these out of it.
        let mut up: Vec<TierBlock> = Vec::with_capacity(on_host + on_disk);
        if let Some(host) = self.host.as_mut() {
            for h in &hashes[from..from + on_host] {
                match host.get(h) {
                    Some(b) => up.push(b.clone()),
                    None => break,
                }
            }
        }
        let mut from_disk = 0;
        if up.len() == on_host && on_disk > 0 {
            let disk = self.disk.as_mut().expect("on_disk > 0 needs a disk");
            let (mut tier, _) = disk.offloader.lock();
            let mut refused = Vec::new();
            for h in &hashes[from + on_host..from + on_host + on_disk] {
                match tier.get(h) {
                    Ok(Some(b)) => {
                        up.push(b);
                        from_disk += 1;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "a disk KV block was refused; its tokens are computed");
                        refused.push(*h);
                        break;
                    }
                }
            }
            drop(tier);
            if !refused.is_empty() {
                disk.forget(&mut self.pool, refused);
                self.poll_disk();
            }
        }
        let from_host = up.len() - from_disk;
        if up.is_empty() {
            return (0, 0);
        }
        let Ok(blocks) = self.pool.allocate(up.len()) else {
            return (0, 0);
        };
        // Blocks this allocation evicted still hold their contents: offload them now.
        self.offer_evicted();
        for (i, (&block, b)) in blocks.iter().zip(&up).enumerate() {
            if !b.data.is_empty() {
                self.executor.write_block(block, &b.data);
            }
            let at = from + i;
            self.pool
                .register(block, b.parent, b.local, hashes[at], at as u32);
        }
        self.tiers.onboarded_blocks += from_host as u64;
        self.tiers.disk_onboarded_blocks += from_disk as u64;
        self.tiers.onboards += 1;
        let took = started.elapsed().max(simulated);
        self.tiers.onboard_micros += took.as_micros() as u64;
        acquired.extend(blocks);
        (from_host * bs, from_disk * bs)
    }

    /// A peer's fetch: the blocks of the chain `hashes` held here from index `from` on, a
    /// leading run, each from the device pool or else the host tier (the disk's are read
    /// synchronously: not served to peers). Serving refreshes them in both.
    pub(super) fn share(
        &mut self,
        hashes: &[SequenceHash],
        from: usize,
    ) -> Vec<crate::KvBlockData> {
        let mut out = Vec::new();
        let mut pinned = Vec::new();
        for (i, &hash) in hashes.iter().enumerate().skip(from) {
            let parent = i.checked_sub(1).map(|p| hashes[p]);
            let block = if let Some(&b) = self.pool.acquire_prefix(&[hash]).first() {
                pinned.push(b);
                let local = self
                    .pool
                    .cached_local(b)
                    .expect("acquired blocks are cached");
                (local, self.executor.read_block(b))
            } else if let Some(b) = self.host.as_mut().and_then(|h| h.get(&hash)) {
                (b.local, b.data.clone())
            } else {
                break;
            };
            out.push(crate::KvBlockData {
                hash,
                parent,
                local: block.0,
                position: i as u32,
                data: block.1,
            });
        }
        self.pool.release(&pinned);
        out
    }

    /// The tiers' figures for a load report.
    pub(super) fn tier_report(&self) -> Option<TierReport> {
        if self.host.is_none() && self.settings.disk.is_none() {
            return None;
        }
        let (host_blocks, host_bytes) = self
            .host
            .as_ref()
            .map_or((0, 0), |h| (h.len() as u64, h.used() as u64));
        Some(TierReport {
            host_blocks,
            host_bytes,
            ..self.tiers
        })
    }
}

/// A simulated copy's time: `bytes` over `bandwidth` bytes per second.
pub fn copy_time(bytes: usize, bandwidth: f64) -> Duration {
    Duration::from_secs_f64(bytes as f64 / bandwidth.max(1.0))
}

/// A layout fingerprint for the disk tier's files: XXH3-64 of the parts, each length-prefixed.
pub fn fingerprint(parts: &[&[u8]]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for p in parts {
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.digest()
}

/// A disk tier needs both a capacity and a directory.
pub fn check_disk(capacity: usize, dir: Option<&std::path::Path>) -> Result<(), String> {
    match (capacity, dir) {
        (0, Some(d)) => Err(format!(
            "a disk KV directory ({}) without a capacity: set --disk-kv-cache SIZE too",
            d.display()
        )),
        (c, None) if c > 0 => {
            Err("a disk KV capacity without a directory: set --disk-kv-dir DIR too".into())
        }
        _ => Ok(()),
    }
}
