//! vLLM-format batches in both encodings, built here with `rmpv`.

use rmpv::Value;

use super::*;
use crate::{block_hashes, IndexSettings, KvIndex};
use dynamo_protocols::kv::WorkerId;

const BS: usize = 4;

fn s(x: &str) -> Value {
    Value::from(x)
}

fn ints(v: &[u64]) -> Value {
    Value::Array(v.iter().map(|&x| Value::from(x)).collect())
}

fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, v).unwrap();
    out
}

/// An event in the positional encoding (older vLLM).
fn stored_array(hashes: Value, parent: Value, tokens: &[u64], medium: Option<&str>) -> Value {
    Value::Array(vec![
        s("BlockStored"),
        hashes,
        parent,
        ints(tokens),
        Value::from(BS as u64),
        Value::Nil,
        medium.map_or(Value::Nil, s),
    ])
}

/// The same event keyed by field name (vLLM since mid-2026), with a field this reader does
/// not know.
fn stored_map(hashes: Value, parent: Value, tokens: &[u64], medium: Option<&str>) -> Value {
    Value::Map(vec![
        (s("type"), s("BlockStored")),
        (s("block_hashes"), hashes),
        (s("parent_block_hash"), parent),
        (s("token_ids"), ints(tokens)),
        (s("block_size"), Value::from(BS as u64)),
        (s("lora_id"), Value::Nil),
        (s("medium"), medium.map_or(Value::Nil, s)),
        (s("kv_cache_spec_kind"), s("full_attention")),
    ])
}

fn removed_array(hashes: Value, medium: &str) -> Value {
    Value::Array(vec![s("BlockRemoved"), hashes, s(medium)])
}

fn batch_array(events: Vec<Value>) -> Vec<u8> {
    encode(&Value::Array(vec![
        Value::from(1.5),
        Value::Array(events),
        Value::from(0),
    ]))
}

fn batch_map(events: Vec<Value>) -> Vec<u8> {
    encode(&Value::Map(vec![
        (s("ts"), Value::from(1.5)),
        (s("events"), Value::Array(events)),
        (s("data_parallel_rank"), Value::from(1)),
    ]))
}

fn stored_hashes(events: &[KvEvent]) -> Vec<SequenceHash> {
    events
        .iter()
        .flat_map(|e| match &e.data {
            KvEventData::Stored { blocks, .. } => blocks.iter().map(|b| b.block_hash).collect(),
            _ => Vec::new(),
        })
        .collect()
}

/// A prompt of three blocks stored in two events (the second chained from the first's last
/// block), in either encoding and with either kind of engine hash, becomes our hashes of the
/// whole prompt: the same on every engine instance, whatever its own hashes.
#[test]
fn both_encodings_and_both_hash_kinds_give_our_hashes_of_the_prompt() {
    let tokens: Vec<u64> = (100..112).collect();
    let want: Vec<SequenceHash> =
        block_hashes(&tokens.iter().map(|&t| t as u32).collect::<Vec<_>>(), BS)
            .into_iter()
            .map(|h| h.1)
            .collect();
    let bytes = |i: u8| Value::Binary(vec![i; 32]);
    let runs = [
        batch_array(vec![
            stored_array(ints(&[11, 12]), Value::Nil, &tokens[..8], None),
            stored_array(ints(&[13]), Value::from(12), &tokens[8..], Some("GPU")),
        ]),
        batch_map(vec![
            stored_map(
                Value::Array(vec![bytes(1), bytes(2)]),
                Value::Nil,
                &tokens[..8],
                None,
            ),
            stored_map(
                Value::Array(vec![bytes(3)]),
                bytes(2),
                &tokens[8..],
                Some("GPU"),
            ),
        ]),
    ];
    for (i, payload) in runs.iter().enumerate() {
        let mut t = Translator::new(BS);
        let out = t.translate(payload).unwrap();
        assert_eq!(out.dropped, Dropped::default(), "run {i}");
        assert_eq!(stored_hashes(&out.events), want, "run {i}");
        assert_eq!(
            out.events.iter().map(|e| e.event_id).collect::<Vec<_>>(),
            [0, 1]
        );
        assert_eq!(out.data_parallel_rank, Some(i as i64));
        // The second event chains from the first one's last block.
        match &out.events[1].data {
            KvEventData::Stored { parent_hash, .. } => assert_eq!(*parent_hash, Some(want[1])),
            other => panic!("{other:?}"),
        }
    }
}

/// Removals and tiers: a block stored on GPU and CPU and removed from GPU stays known on the
/// host tier; a removal of a block never stored is counted; the router's index follows.
#[test]
fn removals_follow_tiers_and_the_index_sees_the_engine_s_cache() {
    let tokens: Vec<u64> = (0..8).collect();
    let mut t = Translator::new(BS);
    let index = KvIndex::new(IndexSettings::default());
    let w = WorkerId(7);
    let out = t
        .translate(&batch_array(vec![
            stored_array(ints(&[1, 2]), Value::Nil, &tokens, None),
            stored_array(ints(&[1, 2]), Value::Nil, &tokens, Some("CPU")),
        ]))
        .unwrap();
    assert_eq!(out.events[1].tier, StorageTier::Host);
    index.apply(w, &out.events);
    let prompt: Vec<SequenceHash> = block_hashes(&(0..8).collect::<Vec<u32>>(), BS)
        .into_iter()
        .map(|h| h.1)
        .collect();
    assert_eq!(index.find_matches(&prompt)[&w].device, 2);

    let out = t
        .translate(&batch_array(vec![removed_array(ints(&[2, 99]), "GPU")]))
        .unwrap();
    assert_eq!(out.dropped.unknown_removals, 1, "99 was never stored");
    assert_eq!(out.events[0].event_id, 2, "ids continue across batches");
    index.apply(w, &out.events);
    let o = index.find_matches(&prompt)[&w];
    assert_eq!(
        (o.device, o.host),
        (1, 1),
        "block 2 is still on the host tier"
    );
    assert_eq!(t.known_blocks(), 2);
    // A child of block 2 still chains (the host copy is its parent).
    let out = t
        .translate(&batch_array(vec![stored_array(
            ints(&[3]),
            Value::from(2),
            &[8, 9, 10, 11],
            None,
        )]))
        .unwrap();
    let whole: Vec<SequenceHash> = block_hashes(&(0..12).collect::<Vec<u32>>(), BS)
        .into_iter()
        .map(|h| h.1)
        .collect();
    assert_eq!(stored_hashes(&out.events), [whole[2]]);

    let out = t
        .translate(&batch_array(vec![Value::Array(vec![s(
            "AllBlocksCleared",
        )])]))
        .unwrap();
    index.apply(w, &out.events);
    assert!(index.find_matches(&prompt).is_empty());
    assert_eq!(t.known_blocks(), 0);
}

/// Bad input: a payload that is not a batch is an error; inside a batch, unknown events,
/// wrong types, hashes of an odd kind, token counts that are not the blocks' worth, another
/// block size, parents never seen and blocks our hash cannot reproduce are counted and
/// skipped, and the good events around them still translate.
#[test]
fn bad_events_are_counted_and_the_rest_still_translates() {
    let mut t = Translator::new(BS);
    for junk in [&b"\xc1"[..], &encode(&Value::from(3))[..], &[][..]] {
        assert!(t.translate(junk).is_err());
    }
    let good = stored_array(ints(&[1]), Value::Nil, &[1, 2, 3, 4], None);
    let lora = Value::Array(vec![
        s("BlockStored"),
        ints(&[5]),
        Value::Nil,
        ints(&[1, 2, 3, 4]),
        Value::from(BS as u64),
        Value::from(3),
    ]);
    let out = t
        .translate(&batch_array(vec![
            Value::Array(vec![s("SomethingNew"), ints(&[1])]),
            Value::from(42),
            stored_array(
                Value::Array(vec![Value::from(1.5)]),
                Value::Nil,
                &[1, 2, 3, 4],
                None,
            ),
            stored_array(ints(&[2]), Value::Nil, &[1, 2, 3], None),
            stored_array(ints(&[3]), Value::Nil, &[1, 2, 3, 4], Some("TAPE")),
            stored_array(ints(&[4]), Value::from(777), &[1, 2, 3, 4], None),
            lora,
            Value::Map(vec![
                (s("type"), s("BlockStored")),
                (s("block_hashes"), ints(&[6, 7])),
                (s("parent_block_hash"), Value::Nil),
                (s("token_ids"), ints(&(0..8).collect::<Vec<_>>())),
                (s("block_size"), Value::from(8)),
            ]),
            good,
        ]))
        .unwrap();
    assert_eq!(
        out.dropped,
        Dropped {
            unknown_events: 1,
            malformed_events: 5,
            unknown_parent: 1,
            unsupported: 1,
            unknown_removals: 0,
        }
    );
    assert_eq!(out.events.len(), 1, "the good event");
    assert_eq!(out.events[0].event_id, 0);
}

/// The translator answers a router's resync itself (the engine has no dump): what it lists is
/// what the engine holds per tier, parents before children, as of the last event translated.
#[test]
fn a_dump_lists_what_the_engine_holds_per_tier_as_of_the_last_event() {
    let mut t = Translator::new(BS);
    assert_eq!(t.dump().last_event_id, None);
    let tokens: Vec<u64> = (0..12).collect();
    let ours: Vec<SequenceHash> = block_hashes(&(0..12).collect::<Vec<u32>>(), BS)
        .into_iter()
        .map(|h| h.1)
        .collect();
    t.translate(&batch_map(vec![
        // The child first in its own event, after its parent's: positions must still order.
        stored_map(ints(&[10, 11]), Value::Nil, &tokens[..8], None),
        stored_map(ints(&[12]), Value::from(11), &tokens[8..], None),
        stored_map(ints(&[10]), Value::Nil, &tokens[..4], Some("CPU")),
    ]))
    .unwrap();
    let out = t
        .translate(&batch_array(vec![removed_array(ints(&[11, 12]), "GPU")]))
        .unwrap();
    let dump = t.dump();
    assert_eq!(dump.last_event_id, out.events.last().map(|e| e.event_id));
    assert_eq!(dump.block_size, BS as u32);
    let device: Vec<_> = dump
        .blocks
        .iter()
        .map(|(p, b)| (*p, b.block_hash))
        .collect();
    assert_eq!(device, [(None, ours[0])], "11 and 12 left the GPU");
    let host: Vec<_> = dump
        .lower
        .iter()
        .map(|(tier, p, b)| (*tier, *p, b.block_hash))
        .collect();
    assert_eq!(host, [(StorageTier::Host, None, ours[0])]);
    // Deeper chains come out parents first.
    let mut t = Translator::new(BS);
    t.translate(&batch_array(vec![
        stored_array(ints(&[1]), Value::Nil, &tokens[..4], None),
        stored_array(ints(&[2, 3]), Value::from(1), &tokens[4..], None),
    ]))
    .unwrap();
    let chain: Vec<_> = t
        .dump()
        .blocks
        .iter()
        .map(|(p, b)| (*p, b.block_hash))
        .collect();
    assert_eq!(
        chain,
        [
            (None, ours[0]),
            (Some(ours[0]), ours[1]),
            (Some(ours[1]), ours[2])
        ]
    );
    t.clear_all();
    assert!(t.dump().blocks.is_empty());
}
