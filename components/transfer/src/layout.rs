//! What a block's bytes mean: the KV layout two peers must agree on before bytes move.
//!
//! A block is `layers x 2 (K, V) x kv_heads x block_size x head_dim` elements of `dtype`; the
//! order of those inside the block is the engine's business, the size and the meaning are not.
//! A write between regions whose layouts differ is refused ([`crate::TransferError::LayoutMismatch`]):
//! the bytes would fit and still be garbage.

use serde::{Deserialize, Serialize};

/// Element type of a KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    F16,
    Bf16,
    F8,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::F8 => 1,
        }
    }
}

/// The shape of one KV block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Layout {
    pub layers: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub block_size: u32,
    pub dtype: Dtype,
}

impl Layout {
    /// Bytes of one block: all layers, K and V.
    pub fn block_bytes(&self) -> usize {
        self.layers as usize
            * 2
            * self.kv_heads as usize
            * self.block_size as usize
            * self.head_dim as usize
            * self.dtype.size()
    }

    /// A fingerprint sent with each TCP write so the receiver checks the layout too.
    pub(crate) fn fingerprint(&self) -> u64 {
        let d = match self.dtype {
            Dtype::F32 => 1u64,
            Dtype::F16 => 2,
            Dtype::Bf16 => 3,
            Dtype::F8 => 4,
        };
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for x in [
            self.layers as u64,
            self.kv_heads as u64,
            self.head_dim as u64,
            self.block_size as u64,
            d,
        ] {
            h = (h ^ x).wrapping_mul(0x0000_0100_0000_01b3);
        }
        h
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} layers x {} kv heads x {} head dim x {} tokens of {:?}",
            self.layers, self.kv_heads, self.head_dim, self.block_size, self.dtype
        )
    }
}
