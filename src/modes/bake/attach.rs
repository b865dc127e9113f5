//! The `attach` backend: the base's root snapshot becomes a volume attached to this EC2
//! build host, is filled by the shared steps, detached, and snapshotted by EBS.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_ec2::types::{ResourceType, TagSpecification, VolumeType};

use super::steps::{
    loop_root, Distribute, ExtractTarball, MarkFinished, MountImage, PrepareChroot, PublishSsm,
    RegisterImage, RunProvisioners, TestImage, UnmountImage,
};
use super::{Backend, BakeState};
use crate::artifact::TAG_BUILD_ID;
use crate::aws::host::HostIdentity;
use crate::aws::resources::{self, wait_snapshot, wait_volume};
use crate::aws::{filter, AwsError};
use crate::engine::{Keep, Step, StepContext, StepError, UndoId};
use crate::host::device::{self, DeviceName};
use crate::modes::support::{earlier, failed, tags, undo_now, undo_with, waited};

/// The steps, in order: a bake on a build host reads as this list.
pub fn steps() -> Vec<Box<dyn Step<BakeState<Attach>>>> {
    vec![
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
        // Before it goes anywhere: an image that fails its tests is removed.
        Box::new(TestImage),
        Box::new(Distribute),
        // Finished before it is published: a run killed while publishing leaves a
        // complete image, which the next run with its fingerprint reuses and publishes.
        Box::new(MarkFinished),
        Box::new(PublishSsm),
    ]
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
            .plan
            .root_volume_size_gb
            .unwrap_or(0)
            .max(base.root_volume_size_gb);
        let mut request = s
            .clients
            .ec2
            .create_volume()
            .snapshot_id(&base.root_snapshot_id)
            .availability_zone(&s.backend.host.availability_zone)
            // A retry of this create (after a lost answer) gets the same volume, not a second.
            .client_token(format!("{}-volume", s.build_id))
            .size(size)
            .volume_type(VolumeType::from(
                s.plan.root_volume_type.as_deref().unwrap_or("gp3"),
            ))
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Volume)
                    .set_tags(Some(tags(&[
                        ("Name", &format!("amibake work volume {}", s.build_id)),
                        (TAG_BUILD_ID, &s.build_id),
                    ])))
                    .build(),
            );
        if let Some(key) = &s.plan.kms_key_id {
            request = request.encrypted(true).kms_key_id(key);
        }
        let out = request
            .send()
            .await
            .map_err(|e| failed(AwsError::new("create volume", &e)))?;
        let volume_id = out
            .volume_id()
            .ok_or_else(|| failed("CreateVolume returned no volume id"))?
            .to_string();
        s.backend.volume_id = Some(volume_id.clone());
        s.backend.delete_volume = Some(undo_with(
            ctx,
            &s.clients,
            volume_id.clone(),
            &volume_id,
            "delete volume",
            Keep::Never,
            resources::delete_volume,
        ));
        wait_volume(
            &s.clients,
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

/// Whether `volume_id` is attached (or attaching) to `host` as `device_name`.
async fn attached_as(
    clients: &crate::aws::Clients,
    volume_id: &str,
    host: &str,
    device_name: &str,
) -> Result<bool, StepError> {
    let described = clients
        .ec2
        .describe_volumes()
        .volume_ids(volume_id)
        .send()
        .await
        .map_err(|e| failed(AwsError::new(format!("describe {volume_id}"), &e)))?;
    Ok(described
        .volumes()
        .iter()
        .flat_map(|v| v.attachments())
        .any(|a| a.instance_id() == Some(host) && a.device() == Some(device_name)))
}

#[async_trait]
impl Step<BakeState<Attach>> for AttachVolume {
    fn name(&self) -> &'static str {
        "attach volume"
    }
    async fn run(&self, s: &mut BakeState<Attach>, ctx: &mut StepContext) -> Result<(), StepError> {
        let volume_id = earlier(&s.backend.volume_id, "volume")?;
        let host = s.backend.host.instance_id.clone();
        let described = s
            .clients
            .ec2
            .describe_instances()
            .instance_ids(&host)
            .send()
            .await
            .map_err(|e| failed(AwsError::new(format!("describe the build host {host}"), &e)))?;
        let in_use = described
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .flat_map(|i| i.block_device_mappings())
            .filter_map(|m| m.device_name().map(str::to_string))
            .collect();
        let name = device::claim_free_name(&s.backend.lock_dir, &in_use).map_err(failed)?;
        let device_name = name.name.clone();
        s.backend.device_name = Some(Arc::new(name));
        // Undone from before the call: an attach carried out whose answer is lost is still
        // detached (a detach of a volume not attached is nothing to do).
        let (instance, progress) = (host.clone(), ctx.progress.clone());
        let detach = move |clients, id| {
            resources::detach_volume(clients, id, instance.clone(), progress.clone())
        };
        let detach = undo_with(
            ctx,
            &s.clients,
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
        let sent = s
            .clients
            .ec2
            .attach_volume()
            .volume_id(&volume_id)
            .instance_id(&host)
            .device(&device_name)
            .send()
            .await;
        if let Err(e) = sent {
            // The SDK's retry of an attach EC2 carried out, whose answer was lost.
            let lost_answer = resources::code(&e) == Some("VolumeInUse")
                && attached_as(&s.clients, &volume_id, &host, &device_name).await?;
            if !lost_answer {
                return Err(failed(AwsError::new(
                    format!("attach {volume_id} to {host} as {device_name}"),
                    &e,
                )));
            }
        }
        wait_volume(
            &s.clients,
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
        let root =
            device::root_filesystem(&volume_id, &found, s.plan.root_partition).map_err(failed)?;
        // A root partition of a volume larger than the base's grows to the end of it, as
        // the direct backend's does. The kernel keeps the partition's old size until it
        // re-reads the table, which it may refuse for a disk in use, so the grown root is a
        // loop device over the whole volume instead.
        if root != found && s.root_grows() {
            ctx.progress
                .note(format!("{volume_id} is {}", found.display()));
            let grown = loop_root(&found, s.plan.root_partition, true, ctx).await?;
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
        let out = s
            .clients
            .ec2
            .create_snapshot()
            .volume_id(&volume_id)
            .description(format!(
                "{} root, baked by amibake build {}",
                s.plan.name, s.build_id
            ))
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Snapshot)
                    .set_tags(Some(s.artifact_tags()))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| failed(AwsError::new(format!("snapshot {volume_id}"), &e)))?;
        let snapshot_id = out
            .snapshot_id()
            .ok_or_else(|| failed("CreateSnapshot returned no snapshot id"))?
            .to_string();
        s.snapshot_id = Some(snapshot_id.clone());
        s.delete_snapshot = Some(undo_with(
            ctx,
            &s.clients,
            snapshot_id.clone(),
            &snapshot_id,
            "delete snapshot",
            Keep::OnSuccess,
            resources::delete_snapshot,
        ));
        wait_snapshot(&s.clients, &snapshot_id, &ctx.cancel, &ctx.progress)
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
    let found = s
        .clients
        .ec2
        .describe_snapshots()
        .owner_ids("self")
        .filters(filter(format!("tag:{TAG_BUILD_ID}"), &s.build_id))
        .filters(filter("volume-id", volume_id))
        .send()
        .await
        .map_err(|e| {
            failed(AwsError::new(
                format!("look for other snapshots of {volume_id}"),
                &e,
            ))
        })?;
    for orphan in found
        .snapshots()
        .iter()
        .filter_map(|snap| snap.snapshot_id())
        .filter(|id| *id != kept)
    {
        ctx.progress.note(format!(
            "{orphan}: a second snapshot of {volume_id} from a create whose answer was lost; deleting it"
        ));
        undo_with(
            ctx,
            &s.clients,
            orphan.to_string(),
            orphan,
            "delete snapshot",
            Keep::Never,
            resources::delete_snapshot,
        );
    }
    Ok(())
}
