//! External KV-event ingest benchmark (`scripts/bench-external-events`): vLLM-format batches
//! (16-token blocks, stores of 1-8 blocks chained to the previous store's last block, and
//! removals of older blocks), in both encodings, through [`Translator`] (MessagePack decode
//! and re-hashing with our block hash), and then into the router's index, on one thread.
//! Reference in the same run: our own events (already hashed) applied to the index alone.
//!
//! Target (issue 19): >= 1M block events per second per core, translation included.

use std::time::Instant;

use dynamo_kv::external::Translator;
use dynamo_kv::{IndexSettings, KvIndex};
use dynamo_protocols::kv::WorkerId;
use rmpv::Value;

const BS: usize = 16;
const BLOCKS: usize = 400_000;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn s(x: &str) -> Value {
    Value::from(x)
}

/// Batches of about 32 block events each; `maps`: the field-name encoding.
fn batches(maps: bool) -> (Vec<Vec<u8>>, usize) {
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let (mut out, mut events, mut block_events) = (Vec::new(), Vec::new(), 0);
    let mut next_hash = 1u64;
    let mut last: Option<u64> = None;
    let mut live: std::collections::VecDeque<u64> = Default::default();
    let mut in_batch = 0;
    while block_events < BLOCKS {
        let n = 1 + (rng.next() % 8) as usize;
        let hashes: Vec<u64> = (0..n).map(|i| next_hash + i as u64).collect();
        next_hash += n as u64;
        let tokens: Vec<Value> = (0..n * BS)
            .map(|_| Value::from(rng.next() % 32_000))
            .collect();
        let parent = last.map_or(Value::Nil, Value::from);
        let hv = Value::Array(hashes.iter().map(|&h| Value::from(h)).collect());
        events.push(if maps {
            Value::Map(vec![
                (s("type"), s("BlockStored")),
                (s("block_hashes"), hv),
                (s("parent_block_hash"), parent),
                (s("token_ids"), Value::Array(tokens)),
                (s("block_size"), Value::from(BS as u64)),
                (s("lora_id"), Value::Nil),
                (s("medium"), s("GPU")),
            ])
        } else {
            Value::Array(vec![
                s("BlockStored"),
                hv,
                parent,
                Value::Array(tokens),
                Value::from(BS as u64),
                Value::Nil,
                s("GPU"),
            ])
        });
        // A new chain now and then; old blocks go.
        last = if rng.next().is_multiple_of(4) {
            None
        } else {
            hashes.last().copied()
        };
        live.extend(&hashes);
        block_events += n;
        in_batch += n;
        if live.len() > 4096 {
            let gone: Vec<Value> = (0..8)
                .filter_map(|_| live.pop_front())
                .filter(|h| Some(*h) != last)
                .map(Value::from)
                .collect();
            block_events += gone.len();
            in_batch += gone.len();
            events.push(Value::Array(vec![
                s("BlockRemoved"),
                Value::Array(gone),
                s("GPU"),
            ]));
        }
        if in_batch >= 32 {
            let batch = Value::Array(vec![
                Value::from(0.0),
                Value::Array(std::mem::take(&mut events)),
                Value::from(0),
            ]);
            let mut bytes = Vec::new();
            rmpv::encode::write_value(&mut bytes, &batch).unwrap();
            out.push(bytes);
            in_batch = 0;
        }
    }
    (out, block_events)
}

fn main() {
    println!("| path | block events | seconds | block events/s (target 1M) |");
    println!("|---|---:|---:|---:|");
    let mut reference = None;
    for maps in [false, true] {
        let encoding = if maps { "maps" } else { "arrays" };
        let (payloads, n) = batches(maps);
        let mut t = Translator::new(BS);
        let started = Instant::now();
        let mut translated = Vec::with_capacity(payloads.len());
        for p in &payloads {
            let out = t.translate(p).expect("well-formed");
            assert_eq!(out.dropped, Default::default(), "nothing dropped");
            translated.push(out.events);
        }
        let translate = started.elapsed().as_secs_f64();
        let index = KvIndex::new(IndexSettings::default());
        let started = Instant::now();
        for events in &translated {
            index.apply(WorkerId(1), events);
        }
        let apply = started.elapsed().as_secs_f64();
        println!(
            "| vLLM {encoding}: translate (decode, re-hash) | {n} | {translate:.3} | {:.2}M |",
            n as f64 / translate / 1e6
        );
        println!(
            "| vLLM {encoding}: translate, then index | {n} | {:.3} | {:.2}M |",
            translate + apply,
            n as f64 / (translate + apply) / 1e6
        );
        reference.get_or_insert((n, apply));
    }
    let (n, apply) = reference.expect("measured");
    println!(
        "| reference: our own events into the index | {n} | {apply:.3} | {:.2}M |",
        n as f64 / apply / 1e6
    );
}
