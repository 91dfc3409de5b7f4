//! Block hashing: `local = XXH3-64(seed 1337, tokens as little-endian u32)`,
//! `seq[0] = local[0]`, `seq[i] = XXH3-64(seed 1337, LE(seq[i-1]) ‖ LE(local[i]))`.
//! Only full blocks are hashed; a trailing partial block has no hash until it fills.

use dynamo_protocols::kv::{LocalBlockHash, SequenceHash};
use dynamo_protocols::llm::TokenId;
use xxhash_rust::xxh3::xxh3_64_with_seed;

pub const SEED: u64 = 1337;

pub fn hash_block(tokens: &[TokenId]) -> LocalBlockHash {
    let mut bytes = Vec::with_capacity(tokens.len() * 4);
    for t in tokens {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    LocalBlockHash(xxh3_64_with_seed(&bytes, SEED))
}

/// The sequence hash of a block whose prefix ends in `parent`.
pub fn sequence_hash(parent: Option<SequenceHash>, local: LocalBlockHash) -> SequenceHash {
    match parent {
        None => SequenceHash(local.0),
        Some(p) => {
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&p.0.to_le_bytes());
            bytes[8..].copy_from_slice(&local.0.to_le_bytes());
            SequenceHash(xxh3_64_with_seed(&bytes, SEED))
        }
    }
}

/// Hashes of every full block of `tokens`.
pub fn block_hashes(tokens: &[TokenId], block_size: usize) -> Vec<(LocalBlockHash, SequenceHash)> {
    let mut out = Vec::with_capacity(tokens.len() / block_size.max(1));
    let mut parent = None;
    for block in tokens.chunks_exact(block_size.max(1)) {
        let local = hash_block(block);
        let seq = sequence_hash(parent, local);
        out.push((local, seq));
        parent = Some(seq);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_blocks_are_not_hashed_and_prefixes_share_hashes() {
        let a: Vec<u32> = (0..10).collect();
        let b: Vec<u32> = (0..8).chain([99, 100]).collect();
        let (ha, hb) = (block_hashes(&a, 4), block_hashes(&b, 4));
        assert_eq!(ha.len(), 2);
        assert_eq!(ha, hb, "the differing tokens sit in the partial block");
        let c: Vec<u32> = (0..4).chain([7, 7, 7, 7]).collect();
        let hc = block_hashes(&c, 4);
        assert_eq!(hc[0], ha[0]);
        assert_ne!(hc[1], ha[1]);
        // The same block after a different prefix has the same local but not sequence hash.
        let d: Vec<u32> = [9, 9, 9, 9].into_iter().chain(4..8).collect();
        assert_eq!(block_hashes(&d, 4)[1].0, ha[1].0);
        assert_ne!(block_hashes(&d, 4)[1].1, ha[1].1);
    }
}
