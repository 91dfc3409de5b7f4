//! The host tier on the scheduler: evicted blocks go down (offload), a prompt's prefix that
//! continues there comes back up (onboard).
//!
//! - Offload: when the pool evicts a cached block, its contents are read before the block is
//!   reused (`offer_evicted`, at most `offload_per_step` a step: the offload queue's bound;
//!   the rest are dropped and counted) and the block goes into the host tier, whose LRU may
//!   push older blocks out.
//! - Onboard: at admission, after the device prefix, the following blocks found in the host
//!   tier are copied into newly allocated device blocks and registered as cached, when the
//!   executor's cost model says that beats computing them; they count as cached tokens.
//!   Their contents are taken from the tier before the allocation, whose own evictions are
//!   offloaded (read) before anything overwrites them.
//! - Every tier change is a KV event with its tier, in the pool's one event-id sequence, so a
//!   router credits host hits; dumps list the tier's blocks too.

use dynamo_kv::{BlockId, Evicted, TierBlock};
use dynamo_protocols::kv::{KvEventData, SequenceHash, StorageTier, StoredBlock};

use super::{Executor, Scheduler};

impl<E: Executor> Scheduler<E> {
    /// Puts an evicted block (with its contents) into the host tier.
    pub(super) fn offload(&mut self, e: Evicted, data: Vec<u8>) {
        let Some(host) = self.host.as_mut() else {
            return;
        };
        let bytes = data.len() as u64;
        let change = host.insert(TierBlock {
            hash: e.hash,
            parent: e.parent,
            local: e.local,
            position: e.position,
            data,
            uses: 1,
        });
        if !change.evicted.is_empty() {
            self.tiers.host_evicted += change.evicted.len() as u64;
            self.pool.emit_tier(
                StorageTier::Host,
                KvEventData::Removed {
                    block_hashes: change.evicted.iter().map(|b| b.hash).collect(),
                },
            );
        }
        if change.stored {
            self.tiers.offloaded_blocks += 1;
            self.tiers.offloaded_bytes += bytes;
            self.pool.emit_tier(
                StorageTier::Host,
                KvEventData::Stored {
                    parent_hash: e.parent,
                    blocks: vec![StoredBlock {
                        block_hash: e.hash,
                        tokens_hash: e.local,
                    }],
                },
            );
        }
    }

    /// Extends `acquired` (the device prefix of `hashes`) with the blocks that continue it in
    /// the host tier, when onboarding them is worth it and the pool has room.
    pub(super) fn onboard(&mut self, hashes: &[SequenceHash], acquired: &mut Vec<BlockId>) {
        let Some(host) = self.host.as_mut() else {
            return;
        };
        let from = acquired.len();
        let more = host.match_prefix(&hashes[from..]);
        if more == 0 {
            return;
        }
        let bs = self.settings.block_size;
        if !self.executor.onboard(more, more * bs) {
            self.tiers.onboard_declined += 1;
            return;
        }
        // Contents first: the allocation below may offload other blocks into the tier and
        // push these out of it.
        let up: Vec<(
            Option<SequenceHash>,
            dynamo_protocols::kv::LocalBlockHash,
            Vec<u8>,
        )> = hashes[from..from + more]
            .iter()
            .filter_map(|h| host.get(h).map(|b| (b.parent, b.local, b.data.clone())))
            .collect();
        let Ok(blocks) = self.pool.allocate(up.len()) else {
            return;
        };
        // Blocks this allocation evicted still hold their contents: offload them now.
        self.offer_evicted();
        for (i, (&block, (parent, local, data))) in blocks.iter().zip(&up).enumerate() {
            if !data.is_empty() {
                self.executor.write_block(block, data);
            }
            let at = from + i;
            self.pool
                .register(block, *parent, *local, hashes[at], at as u32);
        }
        self.tiers.onboarded_blocks += blocks.len() as u64;
        acquired.extend(blocks);
    }
}
