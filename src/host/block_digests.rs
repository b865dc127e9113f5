//! What the image cache keeps of a base image beside its bytes, and what the changed-block
//! reading compares against: the digest of every block.

use std::collections::BTreeMap;

/// The SHA-256 digest of each block an image holds, by block index.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BlockDigests(pub BTreeMap<u64, [u8; 32]>);

impl BlockDigests {
    /// Stored as 40 bytes a block: the index (little-endian u64), then the digest.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.0.len() * 40);
        for (index, digest) in &self.0 {
            out.extend_from_slice(&index.to_le_bytes());
            out.extend_from_slice(digest);
        }
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<BlockDigests> {
        if !bytes.len().is_multiple_of(40) {
            return None;
        }
        let blocks = bytes.chunks(40).map(|chunk| {
            let index = u64::from_le_bytes(chunk[..8].try_into().expect("8 bytes"));
            let digest: [u8; 32] = chunk[8..].try_into().expect("32 bytes");
            (index, digest)
        });
        Some(BlockDigests(blocks.collect()))
    }
}
