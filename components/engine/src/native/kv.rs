//! The paged KV cache: per layer, K and V for `num_blocks` blocks of `block_size` tokens,
//! laid out `[block][kv_head][token][head_dim]` in f32, so attention for one kv head reads a
//! block's positions as one contiguous run. A sequence's block table (from the
//! scheduler's block pool) maps its positions to blocks, so sequences share cached prefix
//! blocks without copying them.
//!
//! Blocks export and import as bytes with their [`KvLayout`]: per block, for each layer, K then
//! V (`kv_heads x block_size x head_dim` little-endian f32 each). That is the unit the transfer
//! library and the offloader move.

use dynamo_kv::BlockId;
use dynamo_protocols::kv::{LocalBlockHash, SequenceHash};
use serde::{Deserialize, Serialize};

/// How a block's bytes are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvLayout {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// Element type: `"f32"`.
    pub dtype: &'static str,
}

impl KvLayout {
    /// Elements of K (or V) in one block of one layer.
    pub fn block_elems(&self) -> usize {
        self.block_size * self.kv_heads * self.head_dim
    }

    /// Bytes of one block, all layers, K and V.
    pub fn block_bytes(&self) -> usize {
        self.layers * 2 * self.block_elems() * 4
    }
}

/// One exported block: the prefix it holds and its bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct KvBlock {
    pub local: LocalBlockHash,
    pub hash: SequenceHash,
    pub data: Vec<u8>,
}

/// Blocks copied out of a pool, leading blocks of one prefix in order.
#[derive(Debug, Clone, PartialEq)]
pub struct KvBlocks {
    pub layout: KvLayout,
    pub blocks: Vec<KvBlock>,
}

pub struct KvCache {
    layout: KvLayout,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl KvCache {
    pub fn new(layout: KvLayout, num_blocks: usize) -> Self {
        let n = num_blocks * layout.block_elems();
        Self {
            layout,
            k: (0..layout.layers).map(|_| vec![0f32; n]).collect(),
            v: (0..layout.layers).map(|_| vec![0f32; n]).collect(),
        }
    }

    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    /// Offset of (block, kv head 0, token in block); kv head `g` is `g * block_size *
    /// head_dim` further.
    #[inline]
    pub fn offset(&self, block: BlockId, slot: usize) -> usize {
        (block.index() * self.layout.kv_heads * self.layout.block_size + slot)
            * self.layout.head_dim
    }

    pub fn layer(&self, l: usize) -> (&[f32], &[f32]) {
        (&self.k[l], &self.v[l])
    }

    pub fn layer_mut(&mut self, l: usize) -> (&mut [f32], &mut [f32]) {
        (&mut self.k[l], &mut self.v[l])
    }

    /// Copies block `b` out as bytes.
    pub fn read_block(&self, b: BlockId) -> Vec<u8> {
        let n = self.layout.block_elems();
        let start = b.index() * n;
        let mut out = Vec::with_capacity(self.layout.block_bytes());
        for l in 0..self.layout.layers {
            for src in [&self.k[l], &self.v[l]] {
                for x in &src[start..start + n] {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
        out
    }

    /// Writes bytes of [`KvCache::read_block`]'s layout into block `b`.
    pub fn write_block(&mut self, b: BlockId, data: &[u8]) {
        let n = self.layout.block_elems();
        let start = b.index() * n;
        let mut words = data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        for l in 0..self.layout.layers {
            for dst in [&mut self.k[l], &mut self.v[l]] {
                for (d, s) in dst[start..start + n].iter_mut().zip(words.by_ref()) {
                    *d = s;
                }
            }
        }
    }
}
