//! The `direct` backend: no build host, no volume. The base's root snapshot is read once
//! through the EBS direct APIs into the image cache; a copy of it is loop-attached and
//! filled by the shared steps; then only the 512 KiB blocks that differ from the base are
//! put into a new snapshot whose parent is the base's.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;

use super::steps::{
    loop_root, ExtractTarball, MountImage, PrepareChroot, RegisterImage, RunProvisioners,
    UnmountImage,
};
use super::{Backend, BakeState};
use crate::artifact::TAG_BUILD_ID;
use crate::aws::ami::BaseImage;
use crate::aws::ebs::{self, NewSnapshot, Ran, BLOCK_SIZE};
use crate::aws::{AwsError, Clients};
use crate::engine::{Keep, Step, StepContext, StepError, UndoId, UndoStack, Unit};
use crate::host::block_digests::BlockDigests;
use crate::host::disk_image::{self, CopiedBy};
use crate::host::ext4_journal;
use crate::host::image_cache::{CacheError, CachedImage, ImageCache};
use crate::host::loop_device::Writes;
use crate::host::partitions;
use crate::modes::image;
use crate::modes::support::{earlier, failed, tags, undo_now, undo_with, waited};

/// The steps, in order: a bake with no build host reads as this list.
pub fn steps() -> Vec<Box<dyn Step<BakeState<Direct>>>> {
    let mut steps: Vec<Box<dyn Step<BakeState<_>>>> = vec![
        Box::new(FetchBaseImage),
        Box::new(CopyBaseImage),
        Box::new(AttachLoopDevice),
        Box::new(MountImage),
        // Before anything of the host is mounted into the image, and before provisioners
        // have had root in it.
        Box::new(ExtractTarball),
        Box::new(PrepareChroot),
        Box::new(RunProvisioners),
        Box::new(UnmountImage),
        Box::new(DetachLoopDevice),
        Box::new(UploadSnapshot),
        Box::new(RegisterImage),
    ];
    steps.extend(image::tail(true));
    steps
}

/// How the new snapshot will be written, decided before anything is made.
#[derive(Debug, Clone)]
pub struct UploadPlan {
    /// The base's snapshot, when the new one can start from it.
    pub parent: Option<String>,
    /// With no parent: the key to encrypt with.
    pub kms_key_arn: Option<String>,
    /// Whether the EBS direct APIs serve the base's snapshot to this account; if not, it
    /// is read through a copy.
    pub base_readable: bool,
    /// Why there is no parent, for the run's notes.
    pub why_no_parent: Option<String>,
}

/// Whether the base's snapshot can be the parent: the EBS direct APIs serve only this
/// account's snapshots, and a child is encrypted exactly as its parent is.
pub async fn plan_upload(
    clients: &Clients,
    base: &BaseImage,
    template_key_arn: Option<&str>,
) -> Result<UploadPlan, AwsError> {
    let snapshot_id = &base.root_snapshot_id;
    let account = clients.account_id().await?;
    let snapshot = crate::aws::snapshot::describe(clients, snapshot_id).await?;
    let full = |readable: bool, why: String| UploadPlan {
        parent: None,
        kms_key_arn: template_key_arn.map(str::to_string),
        base_readable: readable,
        why_no_parent: Some(why),
    };
    let owner = snapshot.owner_id().unwrap_or("another account");
    if owner != account {
        return Ok(full(false, format!(
            "the base's snapshot {snapshot_id} belongs to {owner}, and the EBS direct APIs serve only this account's ({account}): it is read through a copy, and every block is uploaded with no parent"
        )));
    }
    let parent_key = snapshot.kms_key_id();
    if let Some(key) = template_key_arn {
        if parent_key != Some(key) {
            return Ok(full(true, format!(
                "bake.kms_key_id is not the key of the base's snapshot {snapshot_id} ({}), and a child snapshot is encrypted as its parent: every block is uploaded with no parent, encrypted with {key}",
                parent_key.unwrap_or("unencrypted")
            )));
        }
    } else if snapshot.encrypted() != Some(true)
        && crate::aws::snapshot::encrypted_by_default(clients).await?
    {
        return Ok(full(true, format!(
            "EBS encryption by default is on and the base's snapshot {snapshot_id} is not encrypted, which EBS refuses as a parent: every block is uploaded with no parent, encrypted with the account's default key"
        )));
    }
    Ok(UploadPlan {
        parent: Some(snapshot_id.clone()),
        kms_key_arn: None,
        base_readable: true,
        why_no_parent: None,
    })
}

/// What only this backend has: the image cache, the working copy and its loop device.
pub struct Direct {
    cache: ImageCache,
    upload: UploadPlan,
    base_image: Option<CachedImage>,
    working_copy: Option<PathBuf>,
    remove_copy: Option<UndoId>,
    release_loop: Option<UndoId>,
}

impl Direct {
    pub fn new(cache: ImageCache, upload: UploadPlan) -> Direct {
        Direct {
            cache,
            upload,
            base_image: None,
            working_copy: None,
            remove_copy: None,
            release_loop: None,
        }
    }
}

impl Backend for Direct {
    fn device_release(&self) -> Option<UndoId> {
        self.release_loop
    }
    /// The copy goes once the kernel has let go of it (and is removed even if not).
    fn disk_waits_for(&self, undo: &mut UndoStack, user: UndoId) {
        if let Some(remove) = self.remove_copy {
            undo.order(remove, user);
        }
    }
    /// The working copy is read back through this host's page cache by the upload, then
    /// removed: it never needs to reach the disk.
    fn image_writes(&self) -> Writes {
        Writes::Cached
    }
}

fn size_bytes(s: &BakeState<Direct>) -> u64 {
    let gib = s
        .build
        .root_volume_size_gb
        .unwrap_or(0)
        .max(s.base.root_volume_size_gb);
    (gib.max(1) as u64) << 30
}

fn mib(blocks: usize) -> f64 {
    (blocks * BLOCK_SIZE) as f64 / f64::from(1u32 << 20)
}

pub struct FetchBaseImage;

#[async_trait]
impl Step<BakeState<Direct>> for FetchBaseImage {
    fn name(&self) -> &'static str {
        "fetch base image"
    }
    async fn run(&self, s: &mut BakeState<Direct>, ctx: &mut StepContext) -> Result<(), StepError> {
        let snapshot_id = s.base.root_snapshot_id.clone();
        if let Some(why) = &s.backend.upload.why_no_parent {
            ctx.progress.note(why.clone());
        }
        if let Some(entry) = s.backend.cache.entry(&snapshot_id).map_err(failed)? {
            ctx.progress.note(format!(
                "{snapshot_id} from the cache in {} ({} blocks; none downloaded)",
                s.backend.cache.dir().display(),
                entry.digests.0.len()
            ));
            s.backend.base_image = Some(entry);
            return Ok(());
        }
        let copy = if s.backend.upload.base_readable {
            None
        } else {
            Some(copy_for_reading(s, &snapshot_id, ctx).await?)
        };
        let read_from = copy
            .as_ref()
            .map_or(snapshot_id.as_str(), |(id, _)| id.as_str());
        let progress = ctx.progress.clone();
        let on_block = move |done: usize, total: usize| {
            progress.advance(
                (done * BLOCK_SIZE) as u64,
                Some((total * BLOCK_SIZE) as u64),
                Unit::Bytes,
                None,
            )
        };
        let throttled_before = ebs::throttled_attempts();
        let fetched = s
            .backend
            .cache
            .fetch(
                &s.image.clients,
                &snapshot_id,
                read_from,
                &on_block,
                &ctx.cancel,
            )
            .await;
        let entry = match fetched {
            Ok(entry) => entry,
            Err(CacheError::Interrupted { .. }) => return Err(StepError::Interrupted),
            Err(e) => return Err(failed(e)),
        };
        ctx.progress.note(format!(
            "downloaded {} blocks ({:.0} MiB) of {snapshot_id} into the cache in {}{}",
            entry.downloaded,
            mib(entry.downloaded),
            s.backend.cache.dir().display(),
            throttled_since(throttled_before, "reads"),
        ));
        s.backend.base_image = Some(entry);
        if let Some((_, delete_copy)) = copy {
            undo_now(ctx, delete_copy).await?;
        }
        Ok(())
    }
}

/// A copy of a snapshot this account does not own, which the EBS direct APIs will serve;
/// it goes once its blocks are in the cache.
async fn copy_for_reading(
    s: &BakeState<Direct>,
    snapshot_id: &str,
    ctx: &mut StepContext,
) -> Result<(String, UndoId), StepError> {
    let copy = crate::aws::snapshot::copy(
        &s.image.clients,
        snapshot_id,
        format!(
            "amibake build {}: {snapshot_id}, copied to be read",
            s.image.build_id
        ),
        &tags(&[
            ("Name", &format!("amibake copy of {snapshot_id}")),
            (TAG_BUILD_ID, &s.image.build_id),
        ]),
    )
    .await
    .map_err(failed)?;
    let delete = undo_with(
        ctx,
        &s.image.clients,
        copy.clone(),
        &copy,
        "delete snapshot",
        Keep::Never,
        crate::aws::snapshot::delete,
    );
    ctx.progress.note(format!(
        "{copy}: a copy of {snapshot_id} this account can read"
    ));
    crate::aws::snapshot::wait(&s.image.clients, &copy, &ctx.cancel, &ctx.progress)
        .await
        .map_err(waited)?;
    Ok((copy, delete))
}

pub struct CopyBaseImage;

#[async_trait]
impl Step<BakeState<Direct>> for CopyBaseImage {
    fn name(&self) -> &'static str {
        "copy base image"
    }
    async fn run(&self, s: &mut BakeState<Direct>, ctx: &mut StepContext) -> Result<(), StepError> {
        let entry = earlier(&s.backend.base_image, "base image")?;
        let copy = Arc::new(
            s.backend
                .cache
                .working_copy(&entry, &s.image.build_id, size_bytes(s))
                .map_err(failed)?,
        );
        let (path, copied) = (copy.path.clone(), copy.copied);
        // The undo owns the copy and its lock: the lock goes with the file, not before.
        s.backend.remove_copy = Some(ctx.undo.push(
            path.display().to_string(),
            "remove the working copy",
            Keep::Never,
            move || {
                let copy = copy.clone();
                async move { copy.remove().map_err(Into::into) }
            },
        ));
        ctx.progress.note(format!(
            "working copy {} ({})",
            path.display(),
            match copied {
                CopiedBy::Reflink => "its extents shared with the cache's",
                CopiedBy::Extents => "its data copied, holes kept",
            }
        ));
        s.backend.working_copy = Some(path);
        Ok(())
    }
}

pub struct AttachLoopDevice;

#[async_trait]
impl Step<BakeState<Direct>> for AttachLoopDevice {
    fn name(&self) -> &'static str {
        "attach loop device"
    }
    async fn run(&self, s: &mut BakeState<Direct>, ctx: &mut StepContext) -> Result<(), StepError> {
        let copy = earlier(&s.backend.working_copy, "working copy")?;
        // The copy is already the volume's size; a root partition grows into it here, and
        // its filesystem once mounted.
        let root = loop_root(
            &copy,
            s.build.root_partition,
            s.root_grows(),
            s.backend.image_writes(),
            ctx,
        )
        .await?;
        s.backend.release_loop = Some(root.release);
        s.backend.disk_waits_for(&mut ctx.undo, root.release);
        s.disk = Some(copy);
        s.root_device = Some(root.device);
        Ok(())
    }
}

/// Detaches the loop device before the upload reads the copy, through the undo entry the
/// cleanup would run.
pub struct DetachLoopDevice;

#[async_trait]
impl Step<BakeState<Direct>> for DetachLoopDevice {
    fn name(&self) -> &'static str {
        "detach loop device"
    }
    async fn run(&self, s: &mut BakeState<Direct>, ctx: &mut StepContext) -> Result<(), StepError> {
        if let Some(id) = s.backend.release_loop.take() {
            undo_now(ctx, id).await?;
        }
        Ok(())
    }
}

pub struct UploadSnapshot;

#[async_trait]
impl Step<BakeState<Direct>> for UploadSnapshot {
    fn name(&self) -> &'static str {
        "upload snapshot"
    }
    async fn run(&self, s: &mut BakeState<Direct>, ctx: &mut StepContext) -> Result<(), StepError> {
        let copy = earlier(&s.backend.working_copy, "working copy")?;
        let base = earlier(&s.backend.base_image, "base image")?;
        let upload = s.backend.upload.clone();
        let parent_digests = upload.parent.as_ref().map(|_| base.digests.clone());
        if parent_digests.is_some() {
            let restored = restore_base_journal(&copy, &base.image, s.build.root_partition).await?;
            if restored > 0 {
                ctx.progress.note(format!(
                    "{} KiB of the journal put back to the base's: it was clean after the \
                     unmount, and is then the parent's",
                    restored >> 10
                ));
            }
        }
        let new = NewSnapshot {
            volume_size_gib: size_bytes(s) >> 30,
            parent: upload.parent.clone(),
            kms_key_arn: upload.kms_key_arn.clone(),
            description: format!(
                "{} root, baked by amibake build {}",
                s.image.plan.name, s.image.build_id
            ),
            client_token: format!("{}-snapshot", s.image.build_id),
            tags: s
                .image
                .artifact_tags()
                .iter()
                .map(|t| {
                    (
                        t.key().unwrap_or_default().to_string(),
                        t.value().unwrap_or_default().to_string(),
                    )
                })
                .collect(),
        };
        // The reading has a head start of StartSnapshot's round trip: every block it reads
        // is final, the image being detached and its journal put back.
        let reading = ChangedBlocks::start(&copy, parent_digests);
        let snapshot_id = match ebs::start_snapshot(&s.image.clients, &new).await {
            Ok(id) => id,
            Err(e) => {
                reading.stop().await;
                return Err(failed(e));
            }
        };
        s.snapshot_id = Some(snapshot_id.clone());
        s.delete_snapshot = Some(undo_with(
            ctx,
            &s.image.clients,
            snapshot_id.clone(),
            &snapshot_id,
            "delete snapshot",
            Keep::OnSuccess,
            crate::aws::snapshot::delete,
        ));
        let throttled_before = ebs::throttled_attempts();
        let changed = put_changed_blocks(s, &snapshot_id, &copy, reading, ctx).await?;
        let checksum = ebs::linear_checksum(changed.iter().map(|c| &c.digest));
        ebs::complete_snapshot(&s.image.clients, &snapshot_id, changed.len(), &checksum)
            .await
            .map_err(failed)?;
        let throttled = throttled_since(throttled_before, "puts");
        ctx.progress.note(match &upload.parent {
            Some(parent) => format!(
                "{} blocks ({:.0} MiB) put into {snapshot_id}, the rest of it {parent}'s{throttled}",
                changed.len(),
                mib(changed.len())
            ),
            None => format!(
                "{} blocks ({:.0} MiB) put into {snapshot_id}, every block holding data{throttled}",
                changed.len(),
                mib(changed.len())
            ),
        });
        // Every block is read: the copy goes while EC2 completes the snapshot, rather than
        // after the bake, where its removal (the page cache of a whole image to drop) would
        // keep the user waiting. One that cannot be removed fails nothing here: it stays
        // for the final cleanup, which names it.
        if let Some(remove) = s.backend.remove_copy.take() {
            if let Err(left) = ctx.undo.release(remove).await {
                ctx.progress
                    .note(format!("{left}; tried again after the bake"));
            }
        }
        crate::aws::snapshot::wait(&s.image.clients, &snapshot_id, &ctx.cancel, &ctx.progress)
            .await
            .map_err(waited)
    }
}

/// What the bake's transactions left in an ext4 root's journal is not uploaded: see
/// `ext4_journal`. Answers the bytes put back.
async fn restore_base_journal(
    copy: &std::path::Path,
    base: &std::path::Path,
    wanted: Option<u32>,
) -> Result<u64, StepError> {
    let (c, b) = (copy.to_path_buf(), base.to_path_buf());
    tokio::task::spawn_blocking(move || {
        let offset = partitions::root_extent(&c, wanted)
            .map_err(failed)?
            .map_or(0, |e| e.offset);
        let io = |what: &std::path::Path| {
            let what = what.display().to_string();
            move |e: std::io::Error| failed(format!("put the base's journal back into {what}: {e}"))
        };
        let target = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&c)
            .map_err(io(&c))?;
        let source = std::fs::File::open(&b).map_err(io(&b))?;
        ext4_journal::restore_base_journal(&target, &source, offset).map_err(io(&c))
    })
    .await
    .map_err(failed)?
}

/// The changed blocks the reading has found, and whether it has read the whole image.
#[derive(Default)]
struct ToPut {
    blocks: AtomicU64,
    read_all: AtomicBool,
}

impl ToPut {
    /// The upload's bytes, once they are all known.
    fn total(&self) -> Option<u64> {
        self.read_all
            .load(Ordering::Relaxed)
            .then(|| self.blocks.load(Ordering::Relaxed) * BLOCK_SIZE as u64)
    }
}

/// What EBS throttled of a step's block calls since `before`, said after what the step did.
fn throttled_since(before: u64, calls: &str) -> String {
    match ebs::throttled_attempts().saturating_sub(before) {
        0 => String::new(),
        n => format!("; EBS throttled {n} of the {calls}, retried with fewer at once"),
    }
}

/// Changed blocks found ahead of the calls that put them: a read takes far less than a
/// put. Few, as each put reads its block again: what the reading just read is still in the
/// page cache then, even on a small machine.
const FOUND_AHEAD: usize = 32;

/// The reading of the image for the blocks that differ from the parent's digests (every
/// block holding data with no parent), on threads of its own (`disk_image::readers`), at
/// most `FOUND_AHEAD` blocks ahead of whoever takes them.
struct ChangedBlocks {
    found: tokio::sync::mpsc::Receiver<disk_image::ChangedBlock>,
    to_put: Arc<ToPut>,
    /// Answers every changed block, in index order, once the reading has ended.
    reading: tokio::task::JoinHandle<Result<Vec<disk_image::ChangedBlock>, StepError>>,
}

impl ChangedBlocks {
    fn start(image: &std::path::Path, parent_digests: Option<BlockDigests>) -> ChangedBlocks {
        let (found_tx, found) = tokio::sync::mpsc::channel(FOUND_AHEAD);
        let path = image.to_path_buf();
        // The upload's total is known once the reading has found every changed block;
        // until then the progress shows what is put and how fast.
        let to_put = Arc::new(ToPut::default());
        let counted = to_put.clone();
        let reading = tokio::task::spawn_blocking(move || {
            disk_image::changed_blocks(
                &path,
                parent_digests.as_ref(),
                disk_image::readers(),
                // Whoever took the blocks stopped (a failure or an interrupt): so does the
                // reading.
                || !found_tx.is_closed(),
                |block| {
                    if found_tx.blocking_send(block).is_ok() {
                        counted.blocks.fetch_add(1, Ordering::Relaxed);
                    }
                },
            )
            .inspect(|_| counted.read_all.store(true, Ordering::Relaxed))
            .map_err(|e| failed(format!("read {}: {e}", path.display())))
        });
        ChangedBlocks {
            found,
            to_put,
            reading,
        }
    }

    /// Stops the reading at its next block and waits for it: nothing reads the image
    /// once this answers.
    async fn stop(self) {
        drop(self.found);
        let _ = self.reading.await;
    }
}

/// Puts the blocks the `reading` finds as it finds them, as many at a time as EBS takes
/// (`ebs::each_block`): the reading and the uploads overlap. Each put reads its block from
/// the image again as it sends it (`ebs::put_block`), so memory stays flat in the calls in
/// flight as in the image. Answers the blocks put, in index order.
async fn put_changed_blocks(
    s: &BakeState<Direct>,
    snapshot_id: &str,
    image: &std::path::Path,
    reading: ChangedBlocks,
    ctx: &mut StepContext,
) -> Result<Vec<disk_image::ChangedBlock>, StepError> {
    let ChangedBlocks {
        mut found,
        to_put,
        reading,
    } = reading;
    let put = |block: disk_image::ChangedBlock| {
        let (clients, snapshot_id) = (s.image.clients.clone(), snapshot_id.to_string());
        let image = image.to_path_buf();
        async move {
            ebs::put_block(&clients, &snapshot_id, block.index, &image, &block.digest)
                .await
                .map_err(failed)
        }
    };
    let progress = ctx.progress.clone();
    let mut done = 0u64;
    let ran = ebs::each_block(
        ebs::Quota::Snapshot,
        futures_util::stream::poll_fn(move |cx| found.poll_recv(cx)),
        &ctx.cancel,
        put,
        |()| {
            done += BLOCK_SIZE as u64;
            progress.advance(done, to_put.total(), Unit::Bytes, None);
            Ok(())
        },
    )
    .await;
    // The stream, and with it the receiving end, is gone: the reading ends at its next block.
    let changed = reading.await.expect("a read does not panic");
    match ran? {
        Ran::All => {
            // The last put may come before the reading has seen the image's end: the total,
            // known now, is said once more with everything put.
            let changed = changed?;
            let total = (changed.len() * BLOCK_SIZE) as u64;
            ctx.progress.advance(total, Some(total), Unit::Bytes, None);
            Ok(changed)
        }
        Ran::Interrupted => Err(StepError::Interrupted),
    }
}
