//! The `attach` backend: the base's root snapshot becomes a volume attached to this EC2
//! build host, is filled by the shared steps, detached, and snapshotted by EBS.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;

use super::steps::{
    loop_root, ExtractTarball, MountImage, PrepareChroot, RegisterImage, RunProvisioners,
    UnmountImage,
};
use super::{Backend, BakeState};
use crate::artifact::TAG_BUILD_ID;
use crate::aws::host::HostIdentity;
use crate::engine::{Keep, Step, StepContext, StepError, UndoId, UndoStack};
use crate::host::device::{self, DeviceName};
use crate::host::loop_device::Writes;
use crate::modes::image;
use crate::modes::support::{earlier, failed, tags, undo_now, undo_with, waited};

/// The steps, in order: a bake on a build host reads as this list.
pub fn steps() -> Vec<Box<dyn Step<BakeState<Attach>>>> {
    let mut steps: Vec<Box<dyn Step<BakeState<_>>>> = vec![
        Box::new(CreateVolume),
        Box::new(AttachVolume),
        Box::new(MountImage),
        // Before anything of the host is mounted into the image, and before provisioners
        // have had root in it.
        Box::new(ExtractTarball),
        Box::new(PrepareChroot),
        Box::new(RunProvisioners),
        Box::new(UnmountImage),
        Box::new(DetachVolume),
        Box::new(SnapshotVolume),
        Box::new(RegisterImage),
    ];
    steps.extend(image::tail(true));
    steps
}

/// What only this backend has: the build host, and the volume attached to it.
pub struct Attach {
    host: HostIdentity,
    lock_dir: PathBuf,
    volume_id: Option<String>,
    delete_volume: Option<UndoId>,
    device_name: Option<Arc<DeviceName>>,
    detach: Option<UndoId>,
    /// A loop device over the volume, when its root partition grew.
    release_loop: Option<UndoId>,
}

impl Attach {
    pub fn new(host: HostIdentity, lock_dir: PathBuf) -> Attach {
        Attach {
            host,
            lock_dir,
            volume_id: None,
            delete_volume: None,
            device_name: None,
            detach: None,
            release_loop: None,
        }
    }
}

impl Backend for Attach {
    fn device_release(&self) -> Option<UndoId> {
        self.release_loop.or(self.detach)
    }
    /// The volume is never detached under a loop device still over it.
    fn disk_waits_for(&self, undo: &mut UndoStack, user: UndoId) {
        if let Some(detach) = self.detach {
            undo.require(detach, user);
        }
    }
    /// The volume is snapshotted by EC2 from what reached it.
    fn image_writes(&self) -> Writes {
        Writes::Durable
    }
}

pub struct CreateVolume;

#[async_trait]
impl Step<BakeState<Attach>> for CreateVolume {
    fn name(&self) -> &'static str {
        "create volume"
    }
    async fn run(&self, s: &mut BakeState<Attach>, ctx: &mut StepContext) -> Result<(), StepError> {
        let base = &s.base;
        let size = s
            .build
            .root_volume_size_gb
            .unwrap_or(0)
            .max(base.root_volume_size_gb);
        let new = crate::aws::volume::NewVolume {
            snapshot_id: &base.root_snapshot_id,
            availability_zone: &s.backend.host.availability_zone,
            size_gb: size,
            volume_type: s.build.root_volume_type.as_deref().unwrap_or("gp3"),
            kms_key_id: s.build.kms_key_id.as_deref(),
            client_token: format!("{}-volume", s.image.build_id),
            tags: &tags(&[
                ("Name", &format!("amibake work volume {}", s.image.build_id)),
                (TAG_BUILD_ID, &s.image.build_id),
            ]),
        };
        let volume_id = crate::aws::volume::create(&s.image.clients, new)
            .await
            .map_err(failed)?;
        s.backend.volume_id = Some(volume_id.clone());
        s.backend.delete_volume = Some(undo_with(
            ctx,
            &s.image.clients,
            volume_id.clone(),
            &volume_id,
            "delete volume",
            Keep::Never,
            crate::aws::volume::delete,
        ));
        crate::aws::volume::wait(
            &s.image.clients,
            &volume_id,
            "available",
            &ctx.cancel,
            &ctx.progress,
        )
        .await
        .map_err(waited)
    }
}

pub struct AttachVolume;

#[async_trait]
impl Step<BakeState<Attach>> for AttachVolume {
    fn name(&self) -> &'static str {
        "attach volume"
    }
    async fn run(&self, s: &mut BakeState<Attach>, ctx: &mut StepContext) -> Result<(), StepError> {
        let volume_id = earlier(&s.backend.volume_id, "volume")?;
        let host = s.backend.host.instance_id.clone();
        let in_use = crate::aws::instance::device_names(&s.image.clients, &host)
            .await
            .map_err(failed)?;
        let name = device::claim_free_name(&s.backend.lock_dir, &in_use).map_err(failed)?;
        let device_name = name.name.clone();
        s.backend.device_name = Some(Arc::new(name));
        // Undone from before the call: an attach carried out whose answer is lost is still
        // detached (a detach of a volume not attached is nothing to do).
        let (instance, progress) = (host.clone(), ctx.progress.clone());
        let detach = move |clients, id| {
            crate::aws::volume::detach(clients, id, instance.clone(), progress.clone())
        };
        let detach = undo_with(
            ctx,
            &s.image.clients,
            format!("{volume_id} on {host}"),
            &volume_id,
            "detach volume",
            Keep::Never,
            detach,
        );
        if let Some(delete) = s.backend.delete_volume {
            ctx.undo.require(delete, detach);
        }
        s.backend.detach = Some(detach);
        crate::aws::volume::attach(&s.image.clients, &volume_id, &host, &device_name)
            .await
            .map_err(failed)?;
        crate::aws::volume::wait(
            &s.image.clients,
            &volume_id,
            "attached",
            &ctx.cancel,
            &ctx.progress,
        )
        .await
        .map_err(waited)?;
        let found =
            device::wait_for_device(&volume_id, &device_name, device::DEVICE_APPEAR_TIMEOUT)
                .await
                .map_err(failed)?;
        // The device itself, not the link to it: udev rebuilds a by-id link on every change
        // event of its device, and the boot partitions are read from the disk later.
        s.disk = Some(std::fs::canonicalize(&found).unwrap_or_else(|_| found.clone()));
        // Reads the volume's table and superblocks: blocking reads, of a volume EBS may
        // still be loading.
        let (id, dev, wanted) = (volume_id.clone(), found.clone(), s.build.root_partition);
        let root = tokio::task::spawn_blocking(move || device::root_filesystem(&id, &dev, wanted))
            .await
            .map_err(failed)?
            .map_err(failed)?;
        // A root partition of a volume larger than the base's grows to the end of it, as
        // the direct backend's does. The kernel keeps the partition's old size until it
        // re-reads the table, which it may refuse for a disk in use, so the grown root is a
        // loop device over the whole volume instead.
        if root != found && s.root_grows() {
            ctx.progress
                .note(format!("{volume_id} is {}", found.display()));
            let grown = loop_root(
                &found,
                s.build.root_partition,
                true,
                s.backend.image_writes(),
                ctx,
            )
            .await?;
            if let Some(detach) = s.backend.detach {
                ctx.undo.require(detach, grown.release);
            }
            s.backend.release_loop = Some(grown.release);
            s.root_device = Some(grown.device);
            return Ok(());
        }
        ctx.progress.note(format!(
            "{volume_id} is {}; root filesystem on {}",
            found.display(),
            root.display()
        ));
        s.root_device = Some(root);
        Ok(())
    }
}

/// Detaches the volume (and first the loop device over it, if any) before the snapshot,
/// through the undo entries the cleanup would run.
pub struct DetachVolume;

#[async_trait]
impl Step<BakeState<Attach>> for DetachVolume {
    fn name(&self) -> &'static str {
        "detach volume"
    }
    async fn run(&self, s: &mut BakeState<Attach>, ctx: &mut StepContext) -> Result<(), StepError> {
        for id in [s.backend.release_loop.take(), s.backend.detach.take()]
            .into_iter()
            .flatten()
        {
            undo_now(ctx, id).await?;
        }
        s.backend.device_name = None;
        Ok(())
    }
}

pub struct SnapshotVolume;

#[async_trait]
impl Step<BakeState<Attach>> for SnapshotVolume {
    fn name(&self) -> &'static str {
        "snapshot"
    }
    async fn run(&self, s: &mut BakeState<Attach>, ctx: &mut StepContext) -> Result<(), StepError> {
        let volume_id = earlier(&s.backend.volume_id, "volume")?;
        let snapshot_id = crate::aws::snapshot::create_of_volume(
            &s.image.clients,
            &volume_id,
            format!(
                "{} root, baked by amibake build {}",
                s.image.plan.name, s.image.build_id
            ),
            &s.image.artifact_tags(),
        )
        .await
        .map_err(failed)?;
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
        crate::aws::snapshot::wait(&s.image.clients, &snapshot_id, &ctx.cancel, &ctx.progress)
            .await
            .map_err(waited)?;
        remove_lost_snapshots(s, &volume_id, &snapshot_id, ctx).await
    }
}

/// CreateSnapshot takes no client token: when its answer is lost, the SDK's retry makes a
/// second snapshot and the first belongs to nobody. Both carry this build's tag from their
/// create call, so any other snapshot of this build's volume is such an orphan, and goes.
async fn remove_lost_snapshots(
    s: &BakeState<Attach>,
    volume_id: &str,
    kept: &str,
    ctx: &mut StepContext,
) -> Result<(), StepError> {
    let found =
        crate::aws::snapshot::of_volume_by_build(&s.image.clients, volume_id, &s.image.build_id)
            .await
            .map_err(failed)?;
    for orphan in found.iter().filter(|id| *id != kept) {
        ctx.progress.note(format!(
            "{orphan}: a second snapshot of {volume_id} from a create whose answer was lost; deleting it"
        ));
        undo_with(
            ctx,
            &s.image.clients,
            orphan.clone(),
            orphan,
            "delete snapshot",
            Keep::Never,
            crate::aws::snapshot::delete,
        );
    }
    Ok(())
}
