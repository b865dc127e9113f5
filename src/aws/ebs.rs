//! Thin calls over the EBS direct APIs: a snapshot's blocks listed and read, each read
//! checked against the checksum EBS sends with it (the block data is not signed).

use sha2::{Digest, Sha256};

use super::{AwsError, Clients};

/// EBS snapshots are read and written in blocks of 512 KiB.
pub const BLOCK_SIZE: usize = 512 * 1024;

/// What ListSnapshotBlocks said of a snapshot: its size and its blocks with their tokens.
#[derive(Debug, Clone)]
pub struct BlockListing {
    pub volume_size_gib: u64,
    /// (block index, block token), in index order.
    pub blocks: Vec<(u64, String)>,
}

/// Every block of `snapshot_id` that holds data, all pages of it.
pub async fn list_blocks(clients: &Clients, snapshot_id: &str) -> Result<BlockListing, AwsError> {
    let mut listing = BlockListing {
        volume_size_gib: 0,
        blocks: Vec::new(),
    };
    let mut token: Option<String> = None;
    loop {
        let page = clients
            .ebs
            .list_snapshot_blocks()
            .snapshot_id(snapshot_id)
            .set_next_token(token.take())
            .send()
            .await
            .map_err(|e| AwsError::new(format!("ListSnapshotBlocks {snapshot_id}"), &e))?;
        if let Some(gib) = page.volume_size() {
            listing.volume_size_gib = gib as u64;
        }
        if page
            .block_size()
            .is_some_and(|size| size as usize != BLOCK_SIZE)
        {
            return Err(AwsError {
                action: format!("ListSnapshotBlocks {snapshot_id}"),
                detail: format!("blocks of {:?} bytes, not {BLOCK_SIZE}", page.block_size()),
            });
        }
        listing.blocks.extend(
            page.blocks()
                .iter()
                .filter_map(|b| Some((b.block_index()? as u64, b.block_token()?.to_string()))),
        );
        match page.next_token() {
            Some(next) if !next.is_empty() => token = Some(next.to_string()),
            _ => return Ok(listing),
        }
    }
}

/// The data of one block, checked against the SHA-256 checksum EBS answered with.
pub async fn get_block(
    clients: &Clients,
    snapshot_id: &str,
    index: u64,
    token: &str,
) -> Result<Vec<u8>, AwsError> {
    let action = || format!("GetSnapshotBlock {snapshot_id} block {index}");
    let answer = clients
        .ebs
        .get_snapshot_block()
        .snapshot_id(snapshot_id)
        .block_index(index as i32)
        .block_token(token)
        .send()
        .await
        .map_err(|e| AwsError::new(action(), &e))?;
    let expected = answer.checksum().map(str::to_string);
    let data = answer
        .block_data
        .collect()
        .await
        .map_err(|e| AwsError {
            action: action(),
            detail: format!("reading the block: {e}"),
        })?
        .into_bytes()
        .to_vec();
    let actual = aws_smithy_types::base64::encode(Sha256::digest(&data));
    if expected.as_deref() != Some(actual.as_str()) || data.len() != BLOCK_SIZE {
        return Err(AwsError {
            action: action(),
            detail: format!(
                "the {} bytes received do not match the checksum EBS sent ({})",
                data.len(),
                expected.as_deref().unwrap_or("none")
            ),
        });
    }
    Ok(data)
}
