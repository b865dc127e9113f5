//! Thin calls over the EBS direct APIs: a snapshot's blocks listed and read, each read
//! checked against the checksum EBS sends with it (the block data is not signed); a
//! snapshot started, written block by block and completed.
//!
//! Retries are the SDK's alone (see `client_config`): throttling and server errors as for
//! every AWS call, plus the "snapshot not found" a put can meet right after StartSnapshot
//! while the new snapshot is not yet visible everywhere.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_ebs::config::interceptors::{FinalizerInterceptorContextRef, InterceptorContext};
use aws_sdk_ebs::config::retry::{
    ClassifyRetry, RetryAction, RetryConfig, RetryPartition, TokenBucket,
};
use aws_sdk_ebs::config::timeout::TimeoutConfig;
use aws_sdk_ebs::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_ebs::error::BoxError;
use aws_sdk_ebs::operation::complete_snapshot::CompleteSnapshotError;
use aws_sdk_ebs::operation::get_snapshot_block::GetSnapshotBlockError;
use aws_sdk_ebs::operation::put_snapshot_block::PutSnapshotBlockError;
use aws_sdk_ebs::primitives::ByteStream;
use aws_sdk_ebs::types::{
    ChecksumAggregationMethod, ChecksumAlgorithm, ResourceNotFoundExceptionReason, Status, Tag,
};
use aws_smithy_types::byte_stream::Length;
use sha2::{Digest, Sha256};

use super::{AwsError, Clients, RETRY_QUOTA};

mod in_flight;
pub use in_flight::{each_block, Quota, Ran};

/// One attempt of one block call: 512 KiB from outside EC2 on a slow link, with room.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);
/// One call with all its retries: an upload from outside EC2 never hangs.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// Attempts of one block call. A bake makes thousands, and one that fails fails the bake:
/// under a sustained 50 % throttle 12 attempts lose one call in 4,096 (one cold fetch of a
/// small base in ten); 24 lose one in 16 million.
const BLOCK_CALL_ATTEMPTS: u32 = 24;

/// The EBS client's configuration: the run's, with the timeouts, attempts, retry quota and
/// classifier that block traffic needs.
pub fn client_config(config: &aws_config::SdkConfig) -> aws_sdk_ebs::Config {
    aws_sdk_ebs::config::Builder::from(config)
        .timeout_config(
            TimeoutConfig::builder()
                .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                .operation_timeout(OPERATION_TIMEOUT)
                .build(),
        )
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(BLOCK_CALL_ATTEMPTS)
                .with_initial_backoff(super::INITIAL_BACKOFF)
                .with_max_backoff(super::MAX_BACKOFF),
        )
        // A partition of its own: a throttled upload's thousands of block retries must not
        // spend the control-plane calls' quota.
        .retry_partition(
            RetryPartition::custom("amibake-ebs-blocks")
                .token_bucket(TokenBucket::builder().capacity(RETRY_QUOTA).build())
                .build(),
        )
        .retry_classifier(StartedSnapshotNotYetVisible)
        .interceptor(CountThrottles)
        .build()
}

/// Block call attempts EBS throttled, in this process: what paces the calls in flight.
static THROTTLED_ATTEMPTS: AtomicU64 = AtomicU64::new(0);

/// Block call attempts EBS throttled so far in this process: a step says how many of its
/// own were.
pub fn throttled_attempts() -> u64 {
    THROTTLED_ATTEMPTS.load(Ordering::Relaxed)
}

/// Counts each block call attempt (a get or a put) EBS answered with a throttle, retried or
/// not.
#[derive(Debug)]
struct CountThrottles;

impl Intercept for CountThrottles {
    fn name(&self) -> &'static str {
        "count throttled block calls"
    }

    fn read_after_attempt(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        _config: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let Some(Err(error)) = context.output_or_error() else {
            return Ok(());
        };
        let Some(error) = error.as_operation_error() else {
            return Ok(());
        };
        let throttled = matches!(
            error.downcast_ref::<PutSnapshotBlockError>(),
            Some(PutSnapshotBlockError::RequestThrottledException(_))
        ) || matches!(
            error.downcast_ref::<GetSnapshotBlockError>(),
            Some(GetSnapshotBlockError::RequestThrottledException(_))
        );
        if throttled {
            THROTTLED_ATTEMPTS.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Classifies a put or completion that finds no snapshot as transient: EBS may not yet
/// know, where the call lands, the snapshot StartSnapshot has just answered with.
#[derive(Debug)]
struct StartedSnapshotNotYetVisible;

impl ClassifyRetry for StartedSnapshotNotYetVisible {
    fn classify_retry(&self, ctx: &InterceptorContext) -> RetryAction {
        let Some(Err(error)) = ctx.output_or_error() else {
            return RetryAction::NoActionIndicated;
        };
        let Some(error) = error.as_operation_error() else {
            return RetryAction::NoActionIndicated;
        };
        let not_found = match (
            error.downcast_ref::<PutSnapshotBlockError>(),
            error.downcast_ref::<CompleteSnapshotError>(),
        ) {
            (Some(PutSnapshotBlockError::ResourceNotFoundException(e)), _)
            | (_, Some(CompleteSnapshotError::ResourceNotFoundException(e))) => e.reason(),
            _ => None,
        };
        if not_found == Some(&ResourceNotFoundExceptionReason::SnapshotNotFound) {
            RetryAction::transient_error()
        } else {
            RetryAction::NoActionIndicated
        }
    }

    fn name(&self) -> &'static str {
        "a snapshot just started, not yet visible"
    }
}

/// EBS snapshots are read and written in blocks of 512 KiB.
pub const BLOCK_SIZE: usize = 512 * 1024;

/// Keeps block buffers out of malloc's arenas, for the whole process: call before any
/// thread starts. Blocks are 512 KiB, allocated on one thread and freed on another by the
/// thousand. glibc maps an allocation that large apart, until the first such is freed; it
/// then raises its threshold past them and serves them from per-thread arenas, which keep
/// what was freed in them. Held at 256 KiB, every block is mapped and unmapped: a cold
/// fetch's peak resident set fell from 172 MiB to 99 MiB (100 MiB bake, debug build, up
/// to 128 gets in flight), and a warm bake's stayed the same.
pub fn map_blocks_apart() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt sets one of malloc's tunables and touches no memory of ours.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

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
            .map_err(|e| AwsError::new(format!("ListSnapshotBlocks {snapshot_id}"), e))?;
        if let Some(gib) = page.volume_size() {
            listing.volume_size_gib = gib as u64;
        }
        if page
            .block_size()
            .is_some_and(|size| size as usize != BLOCK_SIZE)
        {
            return Err(AwsError::answer(
                format!("ListSnapshotBlocks {snapshot_id}"),
                format!("blocks of {:?} bytes, not {BLOCK_SIZE}", page.block_size()),
            ));
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

/// Times a block is fetched while what arrives does not match its checksum: a transfer
/// damaged on its way is fetched again; the same damage every time fails the run.
const DAMAGED_BLOCK_ATTEMPTS: u32 = 3;

/// Why a block could not be fetched into its place: EBS's answer, or the image's write.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Aws(#[from] AwsError),
    #[error("write block {index}: {source}")]
    Write { index: u64, source: std::io::Error },
}

/// Block `index` of a snapshot, written into its place in `image` as it arrives, checked
/// against the SHA-256 checksum EBS answered with, and fetched again (written over) when it
/// arrives damaged. Answers its digest, computed once on the way: for whoever keeps it.
pub async fn get_block(
    clients: &Clients,
    snapshot_id: &str,
    index: u64,
    token: &str,
    image: &Arc<std::fs::File>,
) -> Result<[u8; 32], FetchError> {
    let action = || format!("GetSnapshotBlock {snapshot_id} block {index}");
    let mut attempt = 1;
    loop {
        let answer = clients
            .ebs
            .get_snapshot_block()
            .snapshot_id(snapshot_id)
            .block_index(index as i32)
            .block_token(token)
            .send()
            .await
            .map_err(|e| AwsError::new(action(), e))?;
        let expected = answer.checksum().map(str::to_string);
        let damage = match receive_into(answer.block_data, image, index).await {
            Ok((length, digest)) => {
                let actual = aws_smithy_types::base64::encode(digest);
                if expected.as_deref() == Some(actual.as_str()) && length == BLOCK_SIZE {
                    return Ok(digest);
                }
                format!(
                    "the {length} bytes received do not match the checksum EBS sent ({})",
                    expected.as_deref().unwrap_or("none")
                )
            }
            Err(Received::Body(e)) => format!("reading the block: {e}"),
            Err(Received::Write(source)) => return Err(FetchError::Write { index, source }),
        };
        if attempt == DAMAGED_BLOCK_ATTEMPTS {
            return Err(
                AwsError::answer(action(), format!("{damage}; fetched {attempt} times")).into(),
            );
        }
        attempt += 1;
    }
}

/// How much of a block arriving in small pieces is gathered before it is written: a call in
/// flight holds this, and the piece the HTTP client is handing over, not its 512 KiB block.
const WRITE_RUN: usize = 64 * 1024;

/// What broke the receiving of a block: its body (damage, fetched again) or the write.
enum Received {
    Body(String),
    Write(std::io::Error),
}

/// A block's data as it arrives, hashed on the way and written into its place in `image`,
/// off the async runtime's threads (a write may wait for the disk): small pieces gathered
/// into runs of at most `WRITE_RUN` bytes, a larger piece as the HTTP client handed it over.
/// Answers the bytes received and their digest. Nothing past the block's own 512 KiB is
/// written: more than a block ends the reading, and the length check fails the answer.
async fn receive_into(
    mut body: ByteStream,
    image: &Arc<std::fs::File>,
    index: u64,
) -> Result<(usize, [u8; 32]), Received> {
    let mut hasher = Sha256::new();
    let (mut received, start) = (0, index * BLOCK_SIZE as u64);
    let mut run = Vec::with_capacity(WRITE_RUN);
    while let Some(piece) = body.next().await {
        let piece = piece.map_err(|e| Received::Body(e.to_string()))?;
        let at = start + received as u64;
        received += piece.len();
        if received > BLOCK_SIZE {
            return Ok((received, [0; 32]));
        }
        hasher.update(&piece);
        if run.len() + piece.len() > WRITE_RUN && !run.is_empty() {
            let full = std::mem::replace(&mut run, Vec::with_capacity(WRITE_RUN));
            write_at(image, at - full.len() as u64, full).await?;
        }
        if piece.len() >= WRITE_RUN {
            write_at(image, at, piece).await?;
        } else {
            run.extend_from_slice(&piece);
        }
    }
    if !run.is_empty() {
        let at = start + (received - run.len()) as u64;
        write_at(image, at, run).await?;
    }
    Ok((received, hasher.finalize().into()))
}

/// `data` written into `image` at `at`, on a thread of the blocking pool.
async fn write_at(
    image: &Arc<std::fs::File>,
    at: u64,
    data: impl AsRef<[u8]> + Send + 'static,
) -> Result<(), Received> {
    let image = image.clone();
    tokio::task::spawn_blocking(move || image.write_all_at(data.as_ref(), at))
        .await
        .expect("a write does not panic")
        .map_err(Received::Write)
}

/// How a new snapshot is started: from a parent (whose blocks it begins with, and whose
/// encryption it takes), or from nothing with the given encryption.
#[derive(Debug, Clone)]
pub struct NewSnapshot {
    pub volume_size_gib: u64,
    pub parent: Option<String>,
    /// With no parent: the KMS key ARN to encrypt with (`None`: as the account's default).
    pub kms_key_arn: Option<String>,
    pub description: String,
    /// The same token makes a retried start answer with the same snapshot.
    pub client_token: String,
    pub tags: Vec<(String, String)>,
}

/// StartSnapshot: the new snapshot's id.
pub async fn start_snapshot(clients: &Clients, new: &NewSnapshot) -> Result<String, AwsError> {
    let action = match &new.parent {
        Some(parent) => format!("StartSnapshot from {parent}"),
        None => "StartSnapshot".to_string(),
    };
    let mut request = clients
        .ebs
        .start_snapshot()
        .volume_size(new.volume_size_gib as i64)
        .set_parent_snapshot_id(new.parent.clone())
        .description(&new.description)
        .client_token(&new.client_token)
        .set_tags(Some(
            new.tags
                .iter()
                .map(|(k, v)| Tag::builder().key(k).value(v).build())
                .collect(),
        ));
    // EBS refuses Encrypted with a parent: a child is encrypted as its parent is.
    if new.parent.is_none() {
        if let Some(key) = &new.kms_key_arn {
            request = request.encrypted(true).kms_key_arn(key);
        }
    }
    let out = request
        .send()
        .await
        .map_err(|e| AwsError::new(&action, e))?;
    match (out.snapshot_id(), out.status()) {
        (Some(id), Some(Status::Pending) | None) => Ok(id.to_string()),
        (Some(id), Some(status)) => Err(AwsError::answer(
            action,
            format!("{id} is {}, not pending", status.as_str()),
        )),
        (None, _) => Err(AwsError::answer(action, "the answer holds no snapshot id")),
    }
}

/// The SHA-256 of a block, as EBS's checksums are.
pub fn block_digest(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// PutSnapshotBlock of block `index` of the disk image at `image`, with its checksum. The
/// block's bytes are read from the image as the call sends them, 64 KiB at a time (the
/// SDK's buffer), and read again for a retry: a call in flight holds that buffer rather
/// than its 512 KiB block. Should the image no longer hold what `digest` was taken of, EBS
/// refuses the block.
pub async fn put_block(
    clients: &Clients,
    snapshot_id: &str,
    index: u64,
    image: &std::path::Path,
    digest: &[u8; 32],
) -> Result<(), AwsError> {
    let action = || format!("PutSnapshotBlock {snapshot_id} block {index}");
    let data = ByteStream::read_from()
        .path(image)
        .offset(index * BLOCK_SIZE as u64)
        .length(Length::Exact(BLOCK_SIZE as u64))
        .build()
        .await
        .map_err(|e| {
            AwsError::answer(action(), format!("read it from {}: {e}", image.display()))
        })?;
    clients
        .ebs
        .put_snapshot_block()
        .snapshot_id(snapshot_id)
        .block_index(index as i32)
        .data_length(BLOCK_SIZE as i32)
        .checksum(aws_smithy_types::base64::encode(digest))
        .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
        .block_data(data)
        .send()
        .await
        .map(|_| ())
        .map_err(|e| AwsError::new(action(), e))
}

/// The checksum of a whole write, aggregated as EBS's LINEAR method does: the SHA-256 of
/// the blocks' digests, concatenated in index order.
pub fn linear_checksum<'a>(digests_in_index_order: impl Iterator<Item = &'a [u8; 32]>) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for digest in digests_in_index_order {
        hasher.update(digest);
    }
    hasher.finalize().into()
}

/// CompleteSnapshot: `changed` blocks were put, whose LINEAR checksum is `checksum`.
pub async fn complete_snapshot(
    clients: &Clients,
    snapshot_id: &str,
    changed: usize,
    checksum: &[u8; 32],
) -> Result<(), AwsError> {
    let mut request = clients
        .ebs
        .complete_snapshot()
        .snapshot_id(snapshot_id)
        .changed_blocks_count(changed as i32);
    if changed > 0 {
        request = request
            .checksum(aws_smithy_types::base64::encode(checksum))
            .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
            .checksum_aggregation_method(ChecksumAggregationMethod::ChecksumAggregationLinear);
    }
    let out = match request.send().await {
        Ok(out) => out,
        // The SDK's retry of a completion EBS carried out but whose answer was lost: the
        // snapshot is no longer pending. EC2 then tells whether it is completing or failed.
        Err(e) if no_longer_pending(&e) => {
            return completed_already(clients, snapshot_id)
                .await?
                .then_some(())
                .ok_or_else(|| AwsError::new(format!("CompleteSnapshot {snapshot_id}"), e));
        }
        Err(e) => return Err(AwsError::new(format!("CompleteSnapshot {snapshot_id}"), e)),
    };
    match out.status() {
        Some(Status::Error) => Err(AwsError::answer(
            format!("CompleteSnapshot {snapshot_id}"),
            "EBS answered that the snapshot is in error",
        )),
        _ => Ok(()),
    }
}

/// Whether CompleteSnapshot was refused because the snapshot is no longer pending.
fn no_longer_pending<R>(e: &aws_sdk_ebs::error::SdkError<CompleteSnapshotError, R>) -> bool {
    matches!(
        e.as_service_error(),
        Some(CompleteSnapshotError::ValidationException(v))
            if v.reason() == Some(&aws_sdk_ebs::types::ValidationExceptionReason::InvalidSnapshotId)
    )
}

/// Whether EC2 sees `snapshot_id` completed or on its way there (not in error): the
/// completion an earlier attempt asked for took.
async fn completed_already(clients: &Clients, snapshot_id: &str) -> Result<bool, AwsError> {
    let described = clients
        .ec2
        .describe_snapshots()
        .snapshot_ids(snapshot_id)
        .send()
        .await
        .map_err(|e| AwsError::new(format!("describe snapshot {snapshot_id}"), e))?;
    Ok(described.snapshots().iter().any(|s| {
        matches!(
            s.state(),
            Some(aws_sdk_ec2::types::SnapshotState::Completed)
                | Some(aws_sdk_ec2::types::SnapshotState::Pending)
        )
    }))
}
