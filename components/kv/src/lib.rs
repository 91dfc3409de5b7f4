//! The KV cache's bookkeeping, without the bus:
//!
//! - [`hash`]: block and sequence hashes (XXH3-64, seed 1337, as `ARCHITECTURE.md` fixes them);
//! - [`pool`]: the paged block pool with reference counts, prefix caching, LRU eviction of
//!   unreferenced cached blocks, and the KV events every change of cached content emits;
//! - [`index`]: the global prefix index a router keeps from every worker's events;
//! - [`tier`]: a lower tier (host RAM) below the device pool, LRU within a byte capacity;
//! - [`disk`]: the tier below it, one checksummed file per block, surviving restarts;
//! - [`external`]: KV events of external engines (vLLM, SGLang) re-hashed into ours.
// Denied rather than forbidden: the index's buckets prefetch slots (one `unsafe` intrinsic).
#![deny(unsafe_code)]

pub mod disk;
pub mod external;
pub mod hash;
pub mod index;
pub mod pool;
pub mod tier;

pub use disk::{DiskChange, DiskCounts, DiskError, DiskSettings, DiskTier};
pub use hash::{block_hashes, hash_block, sequence_hash, SEED};
pub use index::{ApplyStats, IndexSettings, KvIndex, Overlap, OverlapMap};
pub use pool::{BlockId, BlockPool, Evicted, PoolError};
pub use tier::{Frequency, HostTier, TierBlock, TierChange};
