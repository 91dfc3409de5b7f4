//! The paged KV cache: per layer, K and V for `num_blocks` blocks of `block_size` tokens,
//! laid out `[block][kv_head][token][head_dim]` in f32, f16 or bf16 (`--kv-cache-dtype`), so
//! attention for one kv head reads a block's positions as one contiguous run. A sequence's
//! block table (from the scheduler's block pool) maps its positions to blocks, so sequences
//! share cached prefix blocks without copying them.
//!
//! Blocks export and import as bytes with their [`KvLayout`]: per block, for each layer, K then
//! V (`kv_heads x block_size x head_dim` little-endian elements of the cache's dtype each).
//! That is the unit the transfer library and the offloader move.

use dynamo_kv::BlockId;
use dynamo_protocols::kv::{LocalBlockHash, SequenceHash};
use half::{bf16, f16};
use serde::{Deserialize, Serialize};

/// How a block's bytes are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvLayout {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// Element type: a [`KvDtype`] name (`"f32"`, `"f16"`, `"bf16"`).
    pub dtype: &'static str,
}

impl KvLayout {
    /// Elements of K (or V) in one block of one layer.
    pub fn block_elems(&self) -> usize {
        self.block_size * self.kv_heads * self.head_dim
    }

    /// Bytes of one element.
    pub fn elem_bytes(&self) -> usize {
        KvDtype::parse(self.dtype).map_or(4, KvDtype::size)
    }

    /// Bytes of one block, all layers, K and V.
    pub fn block_bytes(&self) -> usize {
        self.layers * 2 * self.block_elems() * self.elem_bytes()
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

/// The element type of the cache: f32, or f16 / bf16 for half the memory and half the bytes
/// attention reads per position (widened to f32 in registers as attention reads them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    #[default]
    F32,
    F16,
    Bf16,
}

impl KvDtype {
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "f32" => Some(Self::F32),
            "f16" => Some(Self::F16),
            "bf16" => Some(Self::Bf16),
            _ => None,
        }
    }

    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::Bf16 => 2,
        }
    }
}

/// Per layer, one plane of K or V elements.
enum Planes {
    F32(Vec<Vec<f32>>),
    F16(Vec<Vec<f16>>),
    Bf16(Vec<Vec<bf16>>),
}

impl Planes {
    fn new(dtype: KvDtype, layers: usize, n: usize) -> Self {
        match dtype {
            KvDtype::F32 => Self::F32((0..layers).map(|_| vec![0.0; n]).collect()),
            KvDtype::F16 => Self::F16((0..layers).map(|_| vec![f16::ZERO; n]).collect()),
            KvDtype::Bf16 => Self::Bf16((0..layers).map(|_| vec![bf16::ZERO; n]).collect()),
        }
    }

    /// Appends elements `range` of layer `l` as little-endian bytes.
    fn read(&self, l: usize, range: std::ops::Range<usize>, out: &mut Vec<u8>) {
        match self {
            Self::F32(p) => p[l][range]
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Self::F16(p) => p[l][range]
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Self::Bf16(p) => p[l][range]
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        }
    }

    /// Overwrites elements from `start` of layer `l` with little-endian bytes.
    fn write(&mut self, l: usize, start: usize, data: &[u8]) {
        match self {
            Self::F32(p) => {
                for (d, c) in p[l][start..].iter_mut().zip(data.chunks_exact(4)) {
                    *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            Self::F16(p) => {
                for (d, c) in p[l][start..].iter_mut().zip(data.chunks_exact(2)) {
                    *d = f16::from_le_bytes([c[0], c[1]]);
                }
            }
            Self::Bf16(p) => {
                for (d, c) in p[l][start..].iter_mut().zip(data.chunks_exact(2)) {
                    *d = bf16::from_le_bytes([c[0], c[1]]);
                }
            }
        }
    }
}

/// One layer's K and V planes, typed.
pub enum LayerMut<'a> {
    F32(&'a mut [f32], &'a mut [f32]),
    F16(&'a mut [f16], &'a mut [f16]),
    Bf16(&'a mut [bf16], &'a mut [bf16]),
}

pub struct KvCache {
    layout: KvLayout,
    k: Planes,
    v: Planes,
}

impl KvCache {
    /// A cache of `num_blocks` blocks of `layout` (whose dtype is one of [`KvDtype`]'s names).
    pub fn new(layout: KvLayout, num_blocks: usize) -> Self {
        let n = num_blocks * layout.block_elems();
        let dtype = KvDtype::parse(layout.dtype).expect("a KV layout's dtype is a KvDtype name");
        Self {
            layout,
            k: Planes::new(dtype, layout.layers, n),
            v: Planes::new(dtype, layout.layers, n),
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

    /// Layer `l`'s K and V.
    pub fn layer_mut(&mut self, l: usize) -> LayerMut<'_> {
        match (&mut self.k, &mut self.v) {
            (Planes::F32(k), Planes::F32(v)) => LayerMut::F32(&mut k[l], &mut v[l]),
            (Planes::F16(k), Planes::F16(v)) => LayerMut::F16(&mut k[l], &mut v[l]),
            (Planes::Bf16(k), Planes::Bf16(v)) => LayerMut::Bf16(&mut k[l], &mut v[l]),
            _ => unreachable!("K and V planes are made with one dtype"),
        }
    }

    /// Copies block `b` out as bytes.
    pub fn read_block(&self, b: BlockId) -> Vec<u8> {
        let n = self.layout.block_elems();
        let start = b.index() * n;
        let mut out = Vec::with_capacity(self.layout.block_bytes());
        for l in 0..self.layout.layers {
            self.k.read(l, start..start + n, &mut out);
            self.v.read(l, start..start + n, &mut out);
        }
        out
    }

    /// Writes bytes of [`KvCache::read_block`]'s layout into block `b`.
    pub fn write_block(&mut self, b: BlockId, data: &[u8]) {
        let n = self.layout.block_elems();
        let start = b.index() * n;
        let plane = n * self.layout.elem_bytes();
        for (l, layer) in data.chunks(2 * plane).take(self.layout.layers).enumerate() {
            let (k, v) = layer.split_at(plane.min(layer.len()));
            self.k.write(l, start, k);
            self.v.write(l, start, v);
        }
    }
}
