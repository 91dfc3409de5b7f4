use std::collections::HashSet;

use proptest::prelude::*;

use super::*;
use crate::hash::block_hashes;

const BS: usize = 4;

/// Applies events to a set of cached prefixes, as a router would.
fn replay(set: &mut HashSet<SequenceHash>, events: &[KvEvent], next_id: &mut u64) {
    for e in events {
        assert_eq!(e.event_id, *next_id, "event ids are consecutive");
        *next_id += 1;
        match &e.data {
            KvEventData::Stored { blocks, .. } => {
                for b in blocks {
                    assert!(set.insert(b.block_hash), "stored twice without removal");
                }
            }
            KvEventData::Removed { block_hashes } => {
                for h in block_hashes {
                    assert!(set.remove(h), "removed a block that was not stored");
                }
            }
            KvEventData::Cleared => set.clear(),
        }
    }
}

/// Starts a sequence the way the scheduler does: reuse the cached prefix, allocate the rest,
/// cache the full blocks. `None` if the pool cannot hold it now.
fn start(pool: &mut BlockPool, tokens: &[u32]) -> Option<Vec<BlockId>> {
    let hashes = block_hashes(tokens, BS);
    let seq: Vec<SequenceHash> = hashes.iter().map(|h| h.1).collect();
    let mut blocks = pool.acquire_prefix(&seq);
    let need = tokens.len().div_ceil(BS) - blocks.len();
    match pool.allocate(need) {
        Ok(new) => blocks.extend(new),
        Err(PoolError::OutOfBlocks { wanted, available }) => {
            assert!(wanted > available);
            pool.release(&blocks);
            return None;
        }
        Err(e) => panic!("{e}"),
    }
    for i in pool_matched(&blocks, &hashes, pool)..hashes.len() {
        let parent = i.checked_sub(1).map(|p| hashes[p].1);
        pool.register(blocks[i], parent, hashes[i].0, hashes[i].1, i as u32);
    }
    Some(blocks)
}

fn pool_matched(
    blocks: &[BlockId],
    hashes: &[(LocalBlockHash, SequenceHash)],
    pool: &BlockPool,
) -> usize {
    blocks
        .iter()
        .zip(hashes)
        .take_while(|(b, h)| pool.blocks[b.index()].cached.map(|c| c.hash) == Some(h.1))
        .count()
}

#[derive(Debug, Clone)]
enum Op {
    Start(Vec<u32>),
    Finish(usize),
    Reset,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => proptest::collection::vec(0u32..3, 1..24).prop_map(Op::Start),
        4 => (0usize..64).prop_map(Op::Finish),
        1 => Just(Op::Reset),
    ]
}

proptest! {
    #[test]
    fn pool_matches_a_naive_model(ops in proptest::collection::vec(op(), 1..80)) {
        let mut pool = BlockPool::new(16, BS);
        pool.track_evictions(true);
        let mut running: Vec<Vec<BlockId>> = Vec::new();
        let mut replayed = HashSet::new();
        let mut next_id = 0;
        for op in ops {
            match op {
                Op::Start(tokens) => {
                    if let Some(b) = start(&mut pool, &tokens) {
                        running.push(b);
                    }
                }
                Op::Finish(i) if !running.is_empty() => {
                    let b = running.remove(i % running.len());
                    pool.release(&b);
                }
                Op::Finish(_) => {}
                Op::Reset => {
                    let r = pool.reset();
                    prop_assert_eq!(r.is_ok(), running.is_empty());
                }
            }
            prop_assert_eq!(pool.check(), Ok(()));
            // Referenced blocks are exactly those the running sequences hold.
            let held: HashSet<BlockId> = running.iter().flatten().copied().collect();
            prop_assert_eq!(pool.active_blocks(), held.len());
            prop_assert!(held.len() <= pool.num_blocks());
            for b in &held {
                prop_assert!(pool.blocks[b.index()].refs > 0);
            }
            // The eviction hook sees exactly the blocks whose removal the events announce,
            // each handed to its new owner.
            let events = pool.take_events();
            let removed: Vec<SequenceHash> = events
                .iter()
                .flat_map(|e| match &e.data {
                    KvEventData::Removed { block_hashes } => block_hashes.clone(),
                    _ => Vec::new(),
                })
                .collect();
            let evicted = pool.take_evicted();
            prop_assert_eq!(evicted.iter().map(|e| e.hash).collect::<Vec<_>>(), removed);
            for e in &evicted {
                prop_assert!(held.contains(&e.block), "an evicted block goes to a new owner");
            }
            replay(&mut replayed, &events, &mut next_id);
            let cached: HashSet<SequenceHash> = pool.cached_hashes().collect();
            prop_assert_eq!(&replayed, &cached);
            // A dump describes the same set, parents first.
            let dump = pool.dump();
            prop_assert_eq!(dump.last_event_id, next_id.checked_sub(1));
            let dumped: HashSet<SequenceHash> = dump.blocks.iter().map(|(_, b)| b.block_hash).collect();
            prop_assert_eq!(&dumped, &cached);
        }
    }
}

#[test]
fn a_repeated_prompt_reuses_its_blocks_and_eviction_is_lru() {
    let mut pool = BlockPool::new(4, BS);
    let a: Vec<u32> = (0..8).collect();
    let first = start(&mut pool, &a).unwrap();
    pool.release(&first);
    assert_eq!(pool.cached_blocks(), 2);
    let again = start(&mut pool, &a).unwrap();
    assert_eq!(again, first, "the cached blocks are reused");
    pool.release(&again);
    // A different 4-block prompt needs every block: both idle cached blocks are evicted,
    // the tail one first.
    let b: Vec<u32> = (100..116).collect();
    let hb = start(&mut pool, &b).unwrap();
    let events = pool.take_events();
    let removed: Vec<SequenceHash> = events
        .iter()
        .filter_map(|e| match &e.data {
            KvEventData::Removed { block_hashes } => Some(block_hashes.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    let ha = block_hashes(&a, BS);
    assert_eq!(removed, vec![ha[1].1, ha[0].1]);
    assert!(start(&mut pool, &[1, 2, 3]).is_none(), "the pool is full");
    pool.release(&hb);
}
