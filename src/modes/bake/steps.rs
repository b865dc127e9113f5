//! The steps of a bake. Each registers how to undo what it made the moment it exists.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, ResourceType, Tag, TagSpecification, VolumeType,
};

use crate::modes::support::{
    created_or_found, earlier, failed, provision, tags, undo_with, waited,
};

use super::BakeState;
use crate::artifact::{
    TAG_BASE_AMI, TAG_BUILD_ID, TAG_COMMIT, TAG_FINGERPRINT, TAG_TARBALL_SHA256,
};
use crate::aws::resources::{self, wait_image, wait_snapshot, wait_volume};
use crate::aws::{filter, AwsError};
use crate::communicator::chroot::Chroot;
use crate::engine::{Keep, Step, StepContext, StepError, Unit};
use crate::host::{device, extract, mount};

pub struct CreateVolume;

#[async_trait]
impl Step<BakeState> for CreateVolume {
    fn name(&self) -> &'static str {
        "create volume"
    }
    async fn run(&self, s: &mut BakeState, ctx: &mut StepContext) -> Result<(), StepError> {
        let base = &s.base;
        let size = s
            .plan
            .volume_size_gb
            .unwrap_or(0)
            .max(base.root_volume_size_gb);
        let mut request = s
            .clients
            .ec2
            .create_volume()
            .snapshot_id(&base.root_snapshot_id)
            .availability_zone(&s.host.availability_zone)
            // A retry of this create (after a lost answer) gets the same volume, not a second.
            .client_token(format!("{}-volume", s.build_id))
            .size(size)
            .volume_type(VolumeType::from(
                s.plan.volume_type.as_deref().unwrap_or("gp3"),
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
        s.volume_id = Some(volume_id.clone());
        s.delete_volume = Some(undo_with(
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

#[async_trait]
impl Step<BakeState> for AttachVolume {
    fn name(&self) -> &'static str {
        "attach volume"
    }
    async fn run(&self, s: &mut BakeState, ctx: &mut StepContext) -> Result<(), StepError> {
        let volume_id = earlier(&s.volume_id, "volume")?;
        let host = s.host.instance_id.clone();
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
        let name = device::claim_free_name(&s.lock_dir, &in_use).map_err(failed)?;
        let device_name = name.name.clone();
        s.clients
            .ec2
            .attach_volume()
            .volume_id(&volume_id)
            .instance_id(&host)
            .device(&device_name)
            .send()
            .await
            .map_err(|e| {
                failed(AwsError::new(
                    format!("attach {volume_id} to {host} as {device_name}"),
                    &e,
                ))
            })?;
        s.device_name = Some(Arc::new(name));
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
        if let Some(delete) = s.delete_volume {
            ctx.undo.require(delete, detach);
        }
        s.detach = Some(detach);
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
        ctx.progress.note(format!(
            "{volume_id} is {}; root filesystem on {}",
            found.display(),
            root.display()
        ));
        s.root_device = Some(root);
        Ok(())
    }
}

pub struct MountImage;

#[async_trait]
impl Step<BakeState> for MountImage {
    fn name(&self) -> &'static str {
        "mount image"
    }
    async fn run(&self, s: &mut BakeState, ctx: &mut StepContext) -> Result<(), StepError> {
        let device = earlier(&s.root_device, "root device")?;
        let target = s.mount_point.clone();
        // A larger volume than the base's is room for the tarball only once the filesystem
        // fills it.
        let grow = s
            .plan
            .volume_size_gb
            .is_some_and(|gb| gb > s.base.root_volume_size_gb);
        let t = target.clone();
        let grown = tokio::task::spawn_blocking(move || {
            if grow {
                mount::mount_grown(&device, &t).map(Some)
            } else {
                mount::mount_root(&device, &t).map(|()| None)
            }
        })
        .await
        .map_err(failed)?;
        let t = target.clone();
        let unmount_root = ctx.undo.push(
            target.display().to_string(),
            "unmount",
            Keep::Never,
            move || {
                let t = t.clone();
                async move {
                    tokio::task::spawn_blocking(move || {
                        mount::unmount(&t)?;
                        let _ = std::fs::remove_dir(&t);
                        Ok::<_, mount::MountError>(())
                    })
                    .await??;
                    Ok(())
                }
            },
        );
        // Never detach a volume under a live filesystem: if the unmount fails, the volume
        // stays attached and is named.
        if let Some(detach) = s.detach {
            ctx.undo.require(detach, unmount_root);
        }
        s.unmount_root = Some(unmount_root);
        // Registered above even when the mount failed: growing an XFS root may fail after
        // its mount, and an unmount of what is not mounted is nothing.
        if let Some(size) = grown.map_err(failed)? {
            ctx.progress.note(format!(
                "root filesystem grown to {:.1} GiB",
                size as f64 / f64::from(1u32 << 30)
            ));
        }
        Ok(())
    }
}

/// Puts the host's resolv.conf and a policy-rc.d into the image for the provisioners, after
/// the extraction, as the image resolves their paths.
pub struct PrepareChroot;

#[async_trait]
impl Step<BakeState> for PrepareChroot {
    fn name(&self) -> &'static str {
        "prepare chroot"
    }
    async fn run(&self, s: &mut BakeState, ctx: &mut StepContext) -> Result<(), StepError> {
        let files = Arc::new(Mutex::new(mount::TemporaryFiles::new(&s.mount_point)));
        let put = mount::put_chroot_files(&mut files.lock().unwrap_or_else(|p| p.into_inner()));
        let f = files.clone();
        s.restore_files = Some(ctx.undo.push(
            format!("{}/etc/resolv.conf", s.mount_point.display()),
            "restore the image's files",
            Keep::Never,
            move || {
                let errors = f.lock().unwrap_or_else(|p| p.into_inner()).restore();
                async move {
                    match errors.into_iter().next() {
                        None => Ok(()),
                        Some(e) => Err(e.into()),
                    }
                }
            },
        ));
        // The files go back into the image before it is unmounted (and the unmount is
        // still tried if they cannot).
        if let (Some(unmount), Some(restore)) = (s.unmount_root, s.restore_files) {
            ctx.undo.order(unmount, restore);
        }
        put.map_err(failed)
    }
}

pub struct ExtractTarball;

#[async_trait]
impl Step<BakeState> for ExtractTarball {
    fn name(&self) -> &'static str {
        "extract tarball"
    }
    async fn run(&self, s: &mut BakeState, ctx: &mut StepContext) -> Result<(), StepError> {
        let progress = ctx.progress.clone();
        // Progress is told in bytes of the tarball read, against its size: a true fraction.
        let tarball_size = std::fs::metadata(&s.tarball).ok().map(|m| m.len());
        let spec = extract::ExtractSpec {
            dest: s.plan.dest.clone(),
            owner: s.plan.owner.clone(),
            keep_setuid: s.plan.keep_setuid,
        };
        let done = extract::extract_into_image(
            &s.amibake_exe,
            &s.mount_point,
            &spec,
            &extract::Tarball::File(s.tarball.clone()),
            |p, read| progress.advance(read, tarball_size, Unit::Bytes, Some(p.files)),
            &ctx.cancel,
        )
        .await;
        match done {
            Ok(done) => {
                ctx.progress.note(format!(
                    "{} entries, {} bytes into {}",
                    done.files, done.bytes, s.plan.dest
                ));
                if done.setuid_dropped > 0 {
                    ctx.progress.note(format!(
                        "dropped the setuid/setgid bits of {} files (keep_setuid = true keeps them)",
                        done.setuid_dropped
                    ));
                }
                s.extracted = done;
                Ok(())
            }
            Err(_) if ctx.cancel.is_cancelled() => Err(StepError::Interrupted),
            Err(e) => Err(failed(e)),
        }
    }
}

pub struct RunProvisioners;

#[async_trait]
impl Step<BakeState> for RunProvisioners {
    fn name(&self) -> &'static str {
        "run provisioners"
    }
    async fn run(&self, s: &mut BakeState, ctx: &mut StepContext) -> Result<(), StepError> {
        let chroot = Chroot::new(&s.amibake_exe, &s.mount_point);
        provision(&chroot, &s.plan.provisioners, ctx).await
    }
}

/// Unmounts and detaches before the snapshot, through the same undo entries the cleanup
/// would run, so they are not run twice.
pub struct ReleaseVolume;

#[async_trait]
impl Step<BakeState> for ReleaseVolume {
    fn name(&self) -> &'static str {
        "unmount and detach"
    }
    async fn run(&self, s: &mut BakeState, ctx: &mut StepContext) -> Result<(), StepError> {
        for id in [
            s.restore_files.take(),
            s.unmount_root.take(),
            s.detach.take(),
        ]
        .into_iter()
        .flatten()
        {
            ctx.undo
                .release(id)
                .await
                .map_err(|left| failed(left.to_string()))?;
        }
        s.device_name = None;
        Ok(())
    }
}

pub struct SnapshotVolume;

#[async_trait]
impl Step<BakeState> for SnapshotVolume {
    fn name(&self) -> &'static str {
        "snapshot"
    }
    async fn run(&self, s: &mut BakeState, ctx: &mut StepContext) -> Result<(), StepError> {
        let volume_id = earlier(&s.volume_id, "volume")?;
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
    s: &BakeState,
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

pub struct RegisterImage;

#[async_trait]
impl Step<BakeState> for RegisterImage {
    fn name(&self) -> &'static str {
        "register image"
    }
    async fn run(&self, s: &mut BakeState, ctx: &mut StepContext) -> Result<(), StepError> {
        let snapshot_id = earlier(&s.snapshot_id, "snapshot")?;
        let base = &s.base;
        // The base's layout, with only the root's snapshot (and size) changed.
        let mappings = base.mappings.iter().map(|m| {
            if m.device_name() != Some(base.root_device_name.as_str()) {
                return m.clone();
            }
            let old = m.ebs();
            let ebs = EbsBlockDevice::builder()
                .snapshot_id(&snapshot_id)
                .volume_size(
                    s.plan
                        .volume_size_gb
                        .unwrap_or(0)
                        .max(base.root_volume_size_gb),
                )
                .set_volume_type(
                    s.plan
                        .volume_type
                        .as_deref()
                        .map(VolumeType::from)
                        .or_else(|| old.and_then(|e| e.volume_type().cloned())),
                )
                .delete_on_termination(old.and_then(|e| e.delete_on_termination()).unwrap_or(true))
                .build();
            BlockDeviceMapping::builder()
                .device_name(&base.root_device_name)
                .ebs(ebs)
                .build()
        });
        let out = s
            .clients
            .ec2
            .register_image()
            .name(&s.plan.name)
            .set_description(s.plan.description.clone())
            .architecture(base.architecture.clone())
            .root_device_name(&base.root_device_name)
            .set_virtualization_type(
                base.virtualization_type
                    .as_ref()
                    .map(|v| v.as_str().to_string()),
            )
            .set_boot_mode(base.boot_mode.clone())
            .set_ena_support(base.ena_support)
            .set_sriov_net_support(base.sriov_net_support.clone())
            .set_block_device_mappings(Some(mappings.collect()))
            // Tagged in the call itself, so even a run killed right after can be found.
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Image)
                    .set_tags(Some(s.artifact_tags()))
                    .build(),
            )
            .send()
            .await;
        let image_id = created_or_found(
            out,
            |o| o.image_id(),
            &format!("register image {}", s.plan.name),
            (
                "InvalidAMIName.Duplicate",
                resources::Unique::Image,
                &s.plan.name,
            ),
            (&s.clients, &s.build_id),
            &ctx.progress,
        )
        .await?;
        s.image_id = Some(image_id.clone());
        let deregister = undo_with(
            ctx,
            &s.clients,
            image_id.clone(),
            &image_id,
            "deregister image",
            Keep::OnSuccess,
            resources::deregister_image,
        );
        if let Some(delete_snapshot) = s.delete_snapshot {
            ctx.undo.require(delete_snapshot, deregister);
        }
        wait_image(&s.clients, &image_id, &ctx.cancel, &ctx.progress)
            .await
            .map_err(waited)
    }
}

impl BakeState {
    /// Tags on the image and its snapshot: what it is, what it came from, which build made it.
    pub fn artifact_tags(&self) -> Vec<Tag> {
        let mut pairs: Vec<(&str, &str)> = vec![
            ("Name", &self.plan.name),
            (TAG_COMMIT, &self.commit),
            (TAG_TARBALL_SHA256, &self.tarball_sha256),
            (TAG_BASE_AMI, &self.base.id),
            (TAG_BUILD_ID, &self.build_id),
            (TAG_FINGERPRINT, &self.fingerprint),
        ];
        pairs.extend(self.plan.tags.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        tags(&pairs)
    }
}
