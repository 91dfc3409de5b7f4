//! KV-cache events and load, as workers publish them and routers consume them.
//!
//! Hashes follow `ARCHITECTURE.md`: a block's [`LocalBlockHash`] is XXH3-64 (seed 1337) of its
//! token ids as little-endian u32; a [`SequenceHash`] chains them, so equal sequence hashes mean
//! equal prefixes. Only full blocks are hashed.

use serde::{Deserialize, Serialize};

/// Event topic of a worker's [`KvEventBatch`]es (`dyn.ev.{ns}.{component}.kv_events.{instance}`).
pub const KV_EVENTS_TOPIC: &str = "kv_events";
/// Event topic of a worker's [`LoadReport`]s.
pub const LOAD_TOPIC: &str = "load";
/// A worker publishes its load on change at most this often...
pub const LOAD_MIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);
/// ...and at least this often.
pub const LOAD_MAX_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// Endpoint (on the worker's component) answering a [`KvDumpRequest`] with a stream of
/// [`KvDump`] pieces (each with the same `last_event_id`).
pub const KV_DUMP_ENDPOINT: &str = "kv_dump";

/// Hash of one block's tokens alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LocalBlockHash(pub u64);

/// Hash of a block and everything before it: identifies a prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SequenceHash(pub u64);

/// Where a cached block lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageTier {
    Device,
    Host,
    Disk,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBlock {
    pub block_hash: SequenceHash,
    pub tokens_hash: LocalBlockHash,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum KvEventData {
    /// Blocks now cached, each extending the previous (the first extends `parent_hash`).
    Stored {
        parent_hash: Option<SequenceHash>,
        blocks: Vec<StoredBlock>,
    },
    /// Blocks no longer cached.
    Removed { block_hashes: Vec<SequenceHash> },
    /// Everything in this tier is gone.
    Cleared,
}

/// One change of a worker's cached content. `event_id` increases by one per event per worker;
/// a gap means events were lost and the receiver should resync from a [`KvDump`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEvent {
    pub event_id: u64,
    pub tier: StorageTier,
    pub data: KvEventData,
}

/// What a worker publishes on its KV-event subject. `worker` is the publisher's instance id:
/// a receiver accepts the batch only when it is the subject's and registered in the subject's
/// component (no worker speaks for another).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEventBatch {
    pub worker: WorkerId,
    pub events: Vec<KvEvent>,
}

/// A worker's whole cached set, with the id of the last event it reflects.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvDump {
    pub last_event_id: Option<u64>,
    pub block_size: u32,
    /// Cached blocks with their parents (`None` for a first block), parents before children.
    pub blocks: Vec<(Option<SequenceHash>, StoredBlock)>,
    /// Blocks of the lower tiers (host, disk), with their tier and parent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lower: Vec<(StorageTier, Option<SequenceHash>, StoredBlock)>,
}

/// Ask a worker for its [`KvDump`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvDumpRequest {}

/// A worker's load, published at an interval and on change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReport {
    /// The publisher's instance id, set when it goes on the bus (checked against the subject,
    /// as for [`KvEventBatch`]); `None` inside a process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<WorkerId>,
    pub active_blocks: u64,
    pub total_blocks: u64,
    pub waiting_requests: u64,
    pub queued_prefill_tokens: u64,
    pub running_requests: u64,
    /// The worker's lower KV tiers, when it has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tiers: Option<TierReport>,
    /// The engine's steps so far (engines with a scheduler).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<StepCounters>,
}

/// What an engine's steps did since it started: counters (a restarted engine starts again
/// from zero); the difference of two reports is an interval's figures (steps per second, mean
/// batch, mean step time, prefill and decode tokens per second).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StepCounters {
    pub steps: u64,
    /// Sum of the steps' durations (simulated time for a simulated engine).
    pub busy_micros: u64,
    /// Sum over steps of the sequences in the batch.
    pub batched: u64,
    /// Prompt tokens computed (recomputations included) and tokens generated.
    pub prefill_tokens: u64,
    pub decode_tokens: u64,
}

/// What a worker's lower KV tiers hold and have moved (counts since the engine started).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TierReport {
    pub host_blocks: u64,
    pub host_bytes: u64,
    /// Evicted device blocks copied into the host tier, and their bytes.
    pub offloaded_blocks: u64,
    pub offloaded_bytes: u64,
    /// Evicted device blocks not offloaded: the step's offload queue was full.
    pub offload_dropped: u64,
    /// Blocks the host tier pushed out (least recently used) to make room.
    pub host_evicted: u64,
    /// Host blocks brought back into the device pool instead of being recomputed.
    pub onboarded_blocks: u64,
    /// Prefixes found in a lower tier but computed, the cost model preferring it.
    pub onboard_declined: u64,
    /// The disk tier: blocks and bytes held.
    pub disk_blocks: u64,
    pub disk_bytes: u64,
    /// Blocks leaving the host tier written to disk, and their bytes.
    pub disk_offloaded_blocks: u64,
    pub disk_offloaded_bytes: u64,
    /// Blocks leaving the host tier not written: used by too few requests (the filter).
    pub disk_filtered: u64,
    /// Blocks leaving the host tier not written: the offloader's queue was full.
    pub disk_dropped: u64,
    /// Blocks not written: the write failed (a full disk, a vanished directory).
    pub disk_write_errors: u64,
    /// Files the disk tier deleted (least recently used) to make room.
    pub disk_evicted: u64,
    /// Disk blocks brought back into the device pool instead of being recomputed.
    pub disk_onboarded_blocks: u64,
    /// Disk files refused: truncated, unreadable or failing the checksum (never served).
    pub disk_corrupt: u64,
    /// Disk files refused: written for another model or KV layout.
    pub disk_foreign: u64,
    /// Disk files found valid when the engine started (a warm restart).
    pub disk_recovered: u64,
    /// 1 when a disk tier was configured but its directory could not be used.
    pub disk_unusable: u64,
    /// Prompt tokens admitted, and how many of them came from each tier instead of being
    /// computed (the hit ratio per tier is their quotient).
    pub prompt_tokens: u64,
    pub device_hit_tokens: u64,
    pub host_hit_tokens: u64,
    pub disk_hit_tokens: u64,
    /// Onboarding operations and their total time (µs; a simulation's copy time).
    pub onboards: u64,
    pub onboard_micros: u64,
}

/// A worker as the router knows it (the raw value of its instance id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkerId(pub u64);
