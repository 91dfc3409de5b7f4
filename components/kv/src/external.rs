//! KV events from external engines (vLLM, SGLang) turned into ours, so the router's index works
//! over their fleets.
//!
//! **The wire format.** Each ZeroMQ message is `[topic, sequence (8 bytes, big-endian),
//! payload]`; the payload is a MessagePack event batch `(ts, events, data_parallel_rank)`.
//! Both encodings in the wild are read: positional arrays (older vLLM:
//! `[ts, [event, ...], rank]`, each event `["BlockStored", block_hashes, parent_block_hash,
//! token_ids, block_size, lora_id, medium, ...]`) and maps keyed by field name (vLLM since
//! mid-2026: `{"ts": .., "events": [{"type": "BlockStored", "block_hashes": .., ...}]}`).
//! Block hashes are unsigned 64-bit integers or raw bytes (32 with SHA-256); the storage
//! medium `GPU`/`CPU`/`STORAGE` (absent: GPU) maps to our device, host and disk tiers. Fields
//! this reader does not know are ignored.
//!
//! **Re-hashing.** An engine's own hashes are not comparable across its instances (each picks
//! a random seed), so a [`Translator`] (one per engine instance) re-hashes every stored block
//! from its token ids with our block hash, chained from its parent, and keeps a map from the
//! engine's hash to ours for the removals and the children that follow. A parent it never
//! saw (events were lost) cannot be chained: the block is dropped and counted, and so are
//! blocks it cannot reproduce at all (LoRA adapters, multimodal or salted extra keys, other
//! KV-cache groups than the first).

use std::collections::HashMap;

use dynamo_protocols::kv::{
    KvDump, KvEvent, KvEventData, LocalBlockHash, SequenceHash, StorageTier, StoredBlock,
};
use dynamo_protocols::llm::TokenId;
use rmpv::Value;

use crate::hash::{hash_block, sequence_hash};

/// Why a payload could not be read at all (nothing of it was applied).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExternalError {
    #[error("malformed KV event batch: {0}")]
    Malformed(String),
}

/// An engine's block hash: an integer or raw bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum EngineHash {
    Int(u64),
    Bytes(Box<[u8]>),
}

/// What one batch gave, and what of it was dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Translated {
    /// Our events, with consecutive ids (continuing the translator's count).
    pub events: Vec<KvEvent>,
    pub data_parallel_rank: Option<i64>,
    pub dropped: Dropped,
}

/// Events and blocks a batch held that were not translated, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Events of a kind this reader does not know.
    pub unknown_events: usize,
    /// Events that do not parse (a wrong type, a hash of another size, token ids that are not
    /// the blocks' worth...).
    pub malformed_events: usize,
    /// Stored blocks whose parent was never seen (events were lost before).
    pub unknown_parent: usize,
    /// Stored blocks our hash cannot reproduce (LoRA, extra keys, another KV-cache group).
    pub unsupported: usize,
    /// Removals of blocks never seen stored.
    pub unknown_removals: usize,
}

/// Turns one engine instance's event batches into our events (see the module header).
#[derive(Debug)]
pub struct Translator {
    block_size: usize,
    /// The engine's hash -> what we know of that block.
    blocks: HashMap<EngineHash, Known>,
    next_event: u64,
}

/// A block the engine holds, as we hashed it.
#[derive(Debug, Clone, Copy)]
struct Known {
    ours: SequenceHash,
    parent: Option<SequenceHash>,
    local: LocalBlockHash,
    /// Its index in its sequence (a dump lists parents before children).
    position: u32,
    /// The tiers holding it (a bit per tier).
    tiers: u8,
}

fn tier_bit(t: StorageTier) -> u8 {
    match t {
        StorageTier::Device => 1,
        StorageTier::Host => 2,
        StorageTier::Disk => 4,
    }
}

/// A map's field or an array's position.
fn field<'a>(v: &'a Value, name: &str, position: usize) -> Option<&'a Value> {
    match v {
        Value::Map(m) => m
            .iter()
            .find(|(k, _)| k.as_str() == Some(name))
            .map(|(_, v)| v),
        Value::Array(a) => a.get(position),
        _ => None,
    }
}

fn engine_hash(v: &Value) -> Option<EngineHash> {
    match v {
        Value::Integer(i) => i
            .as_u64()
            .or_else(|| i.as_i64().map(|x| x as u64))
            .map(EngineHash::Int),
        Value::Binary(b) if !b.is_empty() && b.len() <= 64 => {
            Some(EngineHash::Bytes(b.clone().into_boxed_slice()))
        }
        _ => None,
    }
}

fn medium(v: Option<&Value>) -> Option<StorageTier> {
    match v {
        None | Some(Value::Nil) => Some(StorageTier::Device),
        Some(v) => match v.as_str()? {
            "GPU" | "gpu" => Some(StorageTier::Device),
            "CPU" | "cpu" | "CPU_TIER1" => Some(StorageTier::Host),
            "STORAGE" | "DISK" | "disk" | "CPU_TIER2" => Some(StorageTier::Disk),
            _ => None,
        },
    }
}

fn is_nil(v: Option<&Value>) -> bool {
    matches!(v, None | Some(Value::Nil))
}

impl Translator {
    /// A translator for an engine whose KV blocks hold `block_size` tokens (the model card's).
    pub fn new(block_size: usize) -> Self {
        Self {
            block_size: block_size.max(1),
            blocks: HashMap::new(),
            next_event: 0,
        }
    }

    /// Blocks it knows (any tier).
    pub fn known_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// What the engine holds, as a worker's `kv_dump` answers: for a router that resyncs, so
    /// it never has to ask the engine (which has no dump). Consistent with the events
    /// translated so far (`last_event_id`).
    pub fn dump(&self) -> KvDump {
        let mut known: Vec<&Known> = self.blocks.values().collect();
        known.sort_by_key(|k| (k.position, k.ours));
        let mut dump = KvDump {
            last_event_id: self.next_event.checked_sub(1),
            block_size: self.block_size as u32,
            blocks: Vec::new(),
            lower: Vec::new(),
        };
        for k in known {
            let block = StoredBlock {
                block_hash: k.ours,
                tokens_hash: k.local,
            };
            for tier in [StorageTier::Device, StorageTier::Host, StorageTier::Disk] {
                if k.tiers & tier_bit(tier) == 0 {
                    continue;
                }
                match tier {
                    StorageTier::Device => dump.blocks.push((k.parent, block)),
                    _ => dump.lower.push((tier, k.parent, block)),
                }
            }
        }
        dump
    }

    /// Forgets everything (the engine restarted, or events were lost and the index was
    /// cleared): later blocks chain only from parents stored after this.
    pub fn reset(&mut self) {
        self.blocks.clear();
    }

    /// Forgets everything and returns `Cleared` events of every tier (continuing the ids): for
    /// a gap in the engine's stream or its restart, so that the router drops what it indexed
    /// for this engine and rebuilds from the events that follow.
    pub fn clear_all(&mut self) -> Vec<KvEvent> {
        self.reset();
        let mut out = Translated::default();
        for tier in [StorageTier::Device, StorageTier::Host, StorageTier::Disk] {
            self.push(&mut out, tier, KvEventData::Cleared);
        }
        out.events
    }

    /// Translates one batch payload (MessagePack).
    pub fn translate(&mut self, payload: &[u8]) -> Result<Translated, ExternalError> {
        let batch = rmpv::decode::read_value(&mut &payload[..])
            .map_err(|e| ExternalError::Malformed(e.to_string()))?;
        let events = match field(&batch, "events", 1) {
            Some(Value::Array(events)) => events,
            _ => {
                return Err(ExternalError::Malformed(
                    "expected a batch (ts, events, data_parallel_rank) with an events list".into(),
                ))
            }
        };
        let mut out = Translated {
            data_parallel_rank: field(&batch, "data_parallel_rank", 2).and_then(Value::as_i64),
            ..Default::default()
        };
        for e in events {
            self.event(e, &mut out);
        }
        Ok(out)
    }

    fn push(&mut self, out: &mut Translated, tier: StorageTier, data: KvEventData) {
        out.events.push(KvEvent {
            event_id: self.next_event,
            tier,
            data,
        });
        self.next_event += 1;
    }

    fn event(&mut self, e: &Value, out: &mut Translated) {
        let tag = match e {
            Value::Map(_) => field(e, "type", usize::MAX).and_then(Value::as_str),
            Value::Array(a) => a.first().and_then(Value::as_str),
            _ => None,
        };
        // Positions of an array event count the tag first.
        match tag {
            Some("BlockStored") => self.stored(e, out),
            Some("BlockRemoved") => self.removed(e, out),
            Some("AllBlocksCleared") => {
                let cleared = self.clear_all();
                out.events.extend(cleared);
            }
            Some(_) => out.dropped.unknown_events += 1,
            None => out.dropped.malformed_events += 1,
        }
    }

    fn stored(&mut self, e: &Value, out: &mut Translated) {
        let hashes = field(e, "block_hashes", 1).and_then(Value::as_array);
        let parent = field(e, "parent_block_hash", 2);
        let tokens = field(e, "token_ids", 3).and_then(Value::as_array);
        let block_size = field(e, "block_size", 4).and_then(Value::as_u64);
        let (Some(hashes), Some(tokens), Some(block_size)) = (hashes, tokens, block_size) else {
            out.dropped.malformed_events += 1;
            return;
        };
        let hashes: Option<Vec<EngineHash>> = hashes.iter().map(engine_hash).collect();
        let tokens: Option<Vec<TokenId>> = tokens
            .iter()
            .map(|t| t.as_u64().and_then(|t| TokenId::try_from(t).ok()))
            .collect();
        let tier = medium(field(e, "medium", 6));
        let (Some(hashes), Some(tokens), Some(tier)) = (hashes, tokens, tier) else {
            out.dropped.malformed_events += 1;
            return;
        };
        if block_size as usize != self.block_size || tokens.len() != hashes.len() * self.block_size
        {
            out.dropped.malformed_events += 1;
            return;
        }
        // Blocks our hash cannot reproduce: an adapter's, salted or multimodal ones (extra
        // keys), or another KV-cache group's.
        let lora = !is_nil(field(e, "lora_id", 5)) || !is_nil(field(e, "lora_name", 7));
        let extra = match field(e, "extra_keys", 8) {
            Some(Value::Array(keys)) => keys.iter().any(|k| !k.is_nil()),
            _ => false,
        };
        let group = field(e, "group_idx", 9)
            .and_then(Value::as_u64)
            .unwrap_or(0)
            != 0;
        if lora || extra || group {
            out.dropped.unsupported += hashes.len();
            return;
        }
        let (mut ours, mut position) = match parent {
            None | Some(Value::Nil) => (None, 0),
            Some(p) => match engine_hash(p).and_then(|p| self.blocks.get(&p)) {
                Some(k) => (Some(k.ours), k.position + 1),
                None => {
                    out.dropped.unknown_parent += hashes.len();
                    return;
                }
            },
        };
        let parent_hash = ours;
        let mut blocks = Vec::with_capacity(hashes.len());
        for (h, chunk) in hashes.into_iter().zip(tokens.chunks_exact(self.block_size)) {
            let local = hash_block(chunk);
            let seq = sequence_hash(ours, local);
            let entry = self.blocks.entry(h).or_insert(Known {
                ours: seq,
                parent: ours,
                local,
                position,
                tiers: 0,
            });
            entry.ours = seq;
            entry.parent = ours;
            entry.local = local;
            entry.position = position;
            entry.tiers |= tier_bit(tier);
            blocks.push(StoredBlock {
                block_hash: seq,
                tokens_hash: local,
            });
            ours = Some(seq);
            position += 1;
        }
        self.push(
            out,
            tier,
            KvEventData::Stored {
                parent_hash,
                blocks,
            },
        );
    }

    fn removed(&mut self, e: &Value, out: &mut Translated) {
        let hashes = field(e, "block_hashes", 1).and_then(Value::as_array);
        let tier = medium(field(e, "medium", 2));
        let (Some(hashes), Some(tier)) = (hashes, tier) else {
            out.dropped.malformed_events += 1;
            return;
        };
        let mut gone = Vec::with_capacity(hashes.len());
        for h in hashes {
            let Some(h) = engine_hash(h) else {
                out.dropped.malformed_events += 1;
                continue;
            };
            match self.blocks.get_mut(&h) {
                Some(k) if k.tiers & tier_bit(tier) != 0 => {
                    gone.push(k.ours);
                    k.tiers &= !tier_bit(tier);
                    if k.tiers == 0 {
                        self.blocks.remove(&h);
                    }
                }
                _ => out.dropped.unknown_removals += 1,
            }
        }
        if !gone.is_empty() {
            self.push(out, tier, KvEventData::Removed { block_hashes: gone });
        }
    }
}

#[cfg(test)]
mod tests;
