use std::collections::HashMap;

use dynamo_protocols::kv::{KvEvent, KvEventData, LocalBlockHash, StoredBlock};
use proptest::prelude::*;

use super::*;

fn stored(tier: StorageTier, hashes: &[u64]) -> KvEvent {
    KvEvent {
        event_id: 0,
        tier,
        data: KvEventData::Stored {
            parent_hash: None,
            blocks: hashes
                .iter()
                .map(|&h| StoredBlock {
                    block_hash: SequenceHash(h),
                    tokens_hash: LocalBlockHash(h),
                })
                .collect(),
        },
    }
}

fn removed(tier: StorageTier, hashes: &[u64]) -> KvEvent {
    KvEvent {
        event_id: 0,
        tier,
        data: KvEventData::Removed {
            block_hashes: hashes.iter().map(|&h| SequenceHash(h)).collect(),
        },
    }
}

/// The naive reference: per worker, the blocks held and their tiers.
type Reference = HashMap<WorkerId, HashMap<SequenceHash, u8>>;

fn reference_matches(r: &Reference, q: &[SequenceHash]) -> HashMap<WorkerId, Overlap> {
    let mut out = HashMap::new();
    for (w, held) in r {
        let mut o = Overlap::default();
        for h in q {
            match held.get(h) {
                Some(&t) if t != 0 => o.add(t),
                _ => break,
            }
        }
        if o.blocks() > 0 {
            out.insert(*w, o);
        }
    }
    out
}

#[derive(Debug, Clone)]
enum Op {
    Store(u64, u8, Vec<u64>),
    Remove(u64, u8, Vec<u64>),
    Clear(u64, u8),
    Gone(u64),
    Query(Vec<u64>),
}

fn tier(t: u8) -> StorageTier {
    [StorageTier::Device, StorageTier::Host, StorageTier::Disk][t as usize % 3]
}

fn op() -> impl Strategy<Value = Op> {
    let hashes = || proptest::collection::vec(0u64..12, 1..6);
    prop_oneof![
        5 => (0u64..14, 0u8..3, hashes()).prop_map(|(w, t, h)| Op::Store(w, t, h)),
        2 => (0u64..14, 0u8..3, hashes()).prop_map(|(w, t, h)| Op::Remove(w, t, h)),
        1 => (0u64..14, 0u8..3).prop_map(|(w, t)| Op::Clear(w, t)),
        1 => (0u64..14).prop_map(Op::Gone),
        4 => hashes().prop_map(Op::Query),
    ]
}

proptest! {
    #[test]
    // `dense_holders` 2-5 so that blocks switch between holder lists and bitsets all the time.
    // Up to 14 workers: blocks move between a holder list and a map (more than 8).
    fn index_matches_the_naive_reference(
        ops in proptest::collection::vec(op(), 1..80),
        dense_holders in 2usize..6,
    ) {
        // Maps of 2 blocks: shards split all the time (hashes spread over their top bits).
        let index = KvIndex::new(IndexSettings { max_blocks: usize::MAX, shards: 4, dense_holders, bucket_cap: 2 });
        let mut r: Reference = HashMap::new();
        let spread = |hs: Vec<u64>| -> Vec<u64> { hs.into_iter().map(|h| (h + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect() };
        for op in ops {
            let op = match op {
                Op::Store(w, t, hs) => Op::Store(w, t, spread(hs)),
                Op::Remove(w, t, hs) => Op::Remove(w, t, spread(hs)),
                Op::Query(hs) => Op::Query(spread(hs)),
                other => other,
            };
            match op {
                Op::Store(w, t, hs) => {
                    index.apply(WorkerId(w), &[stored(tier(t), &hs)]);
                    let held = r.entry(WorkerId(w)).or_default();
                    for h in hs { *held.entry(SequenceHash(h)).or_default() |= bit(tier(t)); }
                }
                Op::Remove(w, t, hs) => {
                    index.apply(WorkerId(w), &[removed(tier(t), &hs)]);
                    if let Some(held) = r.get_mut(&WorkerId(w)) {
                        for h in hs {
                            if let Some(x) = held.get_mut(&SequenceHash(h)) { *x &= !bit(tier(t)); }
                        }
                    }
                }
                Op::Clear(w, t) => {
                    index.apply(WorkerId(w), &[KvEvent { event_id: 0, tier: tier(t), data: KvEventData::Cleared }]);
                    if let Some(held) = r.get_mut(&WorkerId(w)) {
                        for x in held.values_mut() { *x &= !bit(tier(t)); }
                    }
                }
                Op::Gone(w) => {
                    index.remove_worker(WorkerId(w));
                    r.remove(&WorkerId(w));
                }
                Op::Query(hs) => {
                    let q: Vec<SequenceHash> = hs.into_iter().map(SequenceHash).collect();
                    let got: HashMap<WorkerId, Overlap> = index.find_matches(&q).into_iter().collect();
                    prop_assert_eq!(got, reference_matches(&r, &q));
                }
            }
            let pairs: usize = r.values().map(|h| h.values().filter(|&&t| t != 0).count()).sum();
            prop_assert_eq!(index.pairs(), pairs);
        }
    }
}

#[test]
fn memory_is_capped_by_pruning_least_recently_used_blocks() {
    let index = KvIndex::new(IndexSettings {
        max_blocks: 100,
        shards: 8,
        ..Default::default()
    });
    let hot: Vec<SequenceHash> = (0..10).map(SequenceHash).collect();
    index.apply(
        WorkerId(1),
        &[stored(StorageTier::Device, &(0..10).collect::<Vec<_>>())],
    );
    for batch in 0..50u64 {
        // Keep the first ten blocks in use.
        assert_eq!(index.find_matches(&hot)[&WorkerId(1)].device, 10);
        let hs: Vec<u64> = (1000 + batch * 10..1000 + batch * 10 + 10).collect();
        index.apply(WorkerId(2), &[stored(StorageTier::Device, &hs)]);
        assert!(index.pairs() <= 100, "{} pairs", index.pairs());
    }
    assert!(index.pruned() >= 400);
    assert_eq!(
        index.find_matches(&hot)[&WorkerId(1)].device,
        10,
        "recently used blocks survive"
    );
}

#[test]
fn bad_events_are_counted_and_harmless() {
    let index = KvIndex::new(IndexSettings::default());
    let s = index.apply(WorkerId(7), &[removed(StorageTier::Device, &[1, 2])]);
    assert_eq!(s.unknown_removals, 2);
    let s = index.apply(
        WorkerId(7),
        &[
            stored(StorageTier::Device, &[1]),
            stored(StorageTier::Device, &[1]),
        ],
    );
    assert_eq!((s.stored, s.duplicate_stores), (1, 1));
    assert_eq!(index.pairs(), 1);
    index.remove_worker(WorkerId(99));
    assert_eq!(
        index.find_matches(&[SequenceHash(1)])[&WorkerId(7)].device,
        1
    );
}

/// Hundreds of workers (bitsets spanning many words, slots recycled as workers leave and
/// join) against the naive reference, with mixed tiers.
#[test]
fn many_workers_agree_with_the_reference() {
    let index = KvIndex::new(IndexSettings {
        max_blocks: usize::MAX,
        shards: 8,
        dense_holders: 8,
        ..Default::default()
    });
    let mut r: Reference = HashMap::new();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    // Chains: prefix p's block i is hash p * 100 + i, so chains share leading blocks.
    for step in 0..6000 {
        let w = WorkerId(rnd(300));
        let t = tier(if rnd(10) == 0 { 1 + rnd(2) as u8 } else { 0 });
        let p = rnd(6);
        let len = 1 + rnd(12);
        let hs: Vec<u64> = (0..len).map(|i| p * 100 + i).collect();
        match rnd(20) {
            0 => {
                index.remove_worker(w);
                r.remove(&w);
            }
            1..=4 => {
                let tail: Vec<u64> = hs[hs.len() / 2..].to_vec();
                index.apply(w, &[removed(t, &tail)]);
                if let Some(held) = r.get_mut(&w) {
                    for h in tail {
                        if let Some(b) = held.get_mut(&SequenceHash(h)) {
                            *b &= !bit(t);
                        }
                    }
                }
            }
            _ => {
                index.apply(w, &[stored(t, &hs)]);
                let held = r.entry(w).or_default();
                for h in hs {
                    *held.entry(SequenceHash(h)).or_default() |= bit(t);
                }
            }
        }
        if step % 50 == 0 {
            let p = rnd(6);
            let q: Vec<SequenceHash> = (0..14).map(|i| SequenceHash(p * 100 + i)).collect();
            let got: HashMap<WorkerId, Overlap> = index.find_matches(&q).into_iter().collect();
            assert_eq!(got, reference_matches(&r, &q), "step {step}");
        }
    }
    let pairs: usize = r
        .values()
        .map(|h| h.values().filter(|&&t| t != 0).count())
        .sum();
    assert_eq!(index.pairs(), pairs);
}

/// A shard's maps split when full: every block stays found, removals and lengths agree with a
/// plain map, and no map grows past its cap (hashes spread over their top bits).
#[test]
fn shard_maps_split_instead_of_growing() {
    let mut t = Table::new(16);
    let mut reference: HashMap<u64, u64> = HashMap::new();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..5000u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let h = SequenceHash(x);
        t.get_or_insert(h).set(i as u32, 1, 8);
        reference.insert(x, i);
        if i % 3 == 0 {
            // Remove an earlier one.
            let old = *reference.keys().next().unwrap();
            assert!(t.remove(&SequenceHash(old)).is_some());
            reference.remove(&old);
        }
    }
    assert_eq!(t.len(), reference.len());
    for (&h, &stamp) in &reference {
        let e = t
            .get(&SequenceHash(h))
            .expect("every block is found after the splits");
        assert_eq!(e.get(stamp as u32), Some(1));
    }
    assert!(t.buckets.len() > 100, "{} maps", t.buckets.len());
    assert!(t.buckets.iter().all(|(_, m)| m.len() <= 16));
    assert_eq!(t.dir.len(), 1 << t.depth);
    // Inserting an existing block never splits.
    let before = t.buckets.len();
    let (&h, _) = reference.iter().next().unwrap();
    t.get_or_insert(SequenceHash(h));
    assert_eq!(t.buckets.len(), before);
}

/// A departed worker disappears from answers and from `pairs` at once; its blocks leave the
/// maps at the next purge (a quarter of the live pairs departed), and its recycled slot never
/// lends its old blocks to the worker that gets it.
#[test]
fn departed_workers_are_purged_and_their_slots_reused() {
    let index = KvIndex::new(IndexSettings::default());
    let blocks = |w: u64| -> Vec<u64> { (w * 1000..w * 1000 + 100).collect() };
    for w in 1..=10 {
        index.apply(WorkerId(w), &[stored(StorageTier::Device, &blocks(w))]);
    }
    assert_eq!((index.pairs(), index.blocks()), (1000, 1000));
    let query = |w: u64| -> Vec<SequenceHash> { blocks(w).into_iter().map(SequenceHash).collect() };
    index.remove_worker(WorkerId(1));
    assert_eq!(index.pairs(), 900);
    assert!(index.find_matches(&query(1)).is_empty());
    assert_eq!(index.blocks(), 1000, "not purged yet: 100 of 900 departed");
    index.remove_worker(WorkerId(2));
    assert_eq!(
        index.blocks(),
        800,
        "purged: 200 departed, a quarter of 800"
    );
    index.remove_worker(WorkerId(3));
    assert_eq!((index.pairs(), index.blocks()), (700, 800));
    // New workers take the freed slots; worker 1's old blocks are not theirs.
    for w in 11..=13 {
        index.apply(WorkerId(w), &[stored(StorageTier::Device, &blocks(w)[..1])]);
        assert!(index.find_matches(&query(1)).is_empty());
    }
    assert_eq!(index.workers(), 10);
    index.apply(
        WorkerId(11),
        &[stored(StorageTier::Device, &blocks(1)[..3])],
    );
    let got = index.find_matches(&query(1));
    assert_eq!((got.len(), got[&WorkerId(11)].device), (1, 3));
    assert_eq!(index.pairs(), 706);
}

/// The docs' figure: a block one worker holds is 16 bytes beside its key, its holder inline.
#[test]
fn an_entry_with_one_holder_is_16_bytes() {
    assert_eq!(std::mem::size_of::<Entry>(), 16);
    let mut e = Entry::new();
    e.set(7, 1, 2);
    assert!(e.crowd.is_none() && e.get(7) == Some(1));
}
