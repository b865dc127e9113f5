//! The steps every bake backend shares: the image, once it is a block device on this
//! machine, is mounted, filled, provisioned and unmounted the same way, and registered
//! from its snapshot the same way. Each step registers how to undo what it made the moment
//! it exists.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use aws_sdk_ec2::types::{BlockDeviceMapping, EbsBlockDevice, VolumeType};

use crate::modes::support::{earlier, failed, provision, undo_now, undo_with, waited};

use super::{Backend, BakeState};
use crate::aws::wait::WaitPolicy;
use crate::communicator::chroot::Chroot;
use crate::engine::{Keep, Step, StepContext, StepError, UndoId, Unit};
use crate::host::loop_device::{self, Writes};
use crate::host::partitions::{self, Extent};
use crate::host::{boot_mounts, extract, mount};
use crate::provision::Entries;

/// The root filesystem of `disk` (a working copy, or an attached volume's whole device) on
/// a loop device of its own: partition `wanted` of it, or the whole of it, its writes
/// getting as far as `writes` asks. With `grow`, the root partition first grows to the end
/// of the disk, which is then larger than the base's. The loop device is ours, so it needs
/// no partition re-read by the kernel (which a loop device here, or a disk in use, may not
/// do). Registers its release.
pub struct LoopRoot {
    pub device: PathBuf,
    pub release: UndoId,
}

pub async fn loop_root(
    disk: &Path,
    wanted: Option<u32>,
    grow: bool,
    writes: Writes,
    ctx: &mut StepContext,
) -> Result<LoopRoot, StepError> {
    let d = disk.to_path_buf();
    let extent = tokio::task::spawn_blocking(move || {
        if grow {
            partitions::grow_root_partition(&d, wanted)
        } else {
            partitions::root_extent(&d, wanted)
        }
    })
    .await
    .map_err(failed)?
    .map_err(failed)?;
    let (device, release) = attach_loop_device(disk, extent, writes, ctx).await?;
    ctx.progress.note(match extent {
        Some(e) => format!(
            "root filesystem on {} (the partition at {} MiB of {})",
            device.display(),
            e.offset >> 20,
            disk.display()
        ),
        None => format!(
            "root filesystem on {} ({})",
            device.display(),
            disk.display()
        ),
    });
    Ok(LoopRoot { device, release })
}

/// A loop device over `extent` of `disk` (all of it with none), whose writes get as far
/// as `writes` asks; registers its release.
async fn attach_loop_device(
    disk: &Path,
    extent: Option<Extent>,
    writes: Writes,
    ctx: &mut StepContext,
) -> Result<(PathBuf, UndoId), StepError> {
    let d = disk.to_path_buf();
    let attached = tokio::task::spawn_blocking(move || loop_device::attach(&d, extent, writes))
        .await
        .map_err(failed)?
        .map_err(failed)?;
    let release = undo_loop_device(ctx, &attached.device);
    if let Some(e) = attached.durable_because {
        ctx.progress.note(format!(
            "{e}: the image's changes are written to this host's disk before they are read back"
        ));
    }
    Ok((attached.device, release))
}

/// Registers the release of the loop device `device`.
fn undo_loop_device(ctx: &mut StepContext, device: &Path) -> UndoId {
    let l = device.to_path_buf();
    ctx.undo.push(
        device.display().to_string(),
        "detach loop device",
        Keep::Never,
        move || {
            let l = l.clone();
            async move {
                tokio::task::spawn_blocking(move || loop_device::detach(&l)).await??;
                Ok(())
            }
        },
    )
}

/// Registers the unmount of `target`, a mount of the image on this host from `device`
/// (resolved now: udev rewrites a link to it on every change event).
fn undo_mount(ctx: &mut StepContext, target: &Path, device: &Path) -> UndoId {
    let t = target.to_path_buf();
    let d = device
        .canonicalize()
        .unwrap_or_else(|_| device.to_path_buf());
    let waits = mount::ReleaseWaits::default();
    ctx.undo.push(
        target.display().to_string(),
        "unmount",
        Keep::Never,
        move || {
            let (t, d, waits) = (t.clone(), d.clone(), waits.clone());
            async move {
                let wait = waits.next();
                let unmounted =
                    tokio::task::spawn_blocking(move || mount::unmount(&t, Some(&d), wait)).await?;
                waits.record(&unmounted);
                Ok(unmounted?)
            }
        },
    )
}

/// A boot filesystem of the image mounted under its root: how to take it down.
pub struct BootMount {
    unmount: UndoId,
    release_loop: UndoId,
}

/// The image's own /boot and /boot/efi, as its fstab names them, each on a loop device over
/// its partition of the disk, mounted under the root (`boot_mounts`); unmounted before it.
/// A filesystem this host's kernel cannot mount at all (vfat where the kernel lacks it) is
/// left out with a note, since no bake on this host could do otherwise.
async fn mount_boot_partitions<B: Backend>(
    s: &mut BakeState<B>,
    ctx: &mut StepContext,
) -> Result<(), StepError> {
    let Some(disk) = s.disk.clone() else {
        return Ok(());
    };
    let (root, wanted, d) = (s.mount_point.clone(), s.build.root_partition, disk.clone());
    let planned = tokio::task::spawn_blocking(move || {
        let root_partition = partitions::root_partition(&d, wanted).map_err(failed)?;
        boot_mounts::plan(&root, &d, root_partition).map_err(failed)
    })
    .await
    .map_err(failed)??;
    for (entry, found) in planned {
        if ctx.cancel.is_cancelled() {
            return Err(StepError::Interrupted);
        }
        let number = found.partition.number;
        let Some(filesystem) = found.filesystem else {
            return Err(failed(format!(
                "the image's /etc/fstab line {} mounts {} from partition {number} of {}, \
                 which holds no filesystem amibake can mount (ext4, XFS or vfat)",
                entry.line,
                entry.mount_point,
                disk.display()
            )));
        };
        let (device, release_loop) = attach_loop_device(
            &disk,
            Some(found.partition.extent),
            s.backend.image_writes(),
            ctx,
        )
        .await?;
        s.backend.disk_waits_for(&mut ctx.undo, release_loop);
        let (root, point, dev) = (
            s.mount_point.clone(),
            entry.mount_point.clone(),
            device.clone(),
        );
        let mounted = tokio::task::spawn_blocking(move || {
            boot_mounts::mount(&root, &point, &dev, number, filesystem.kind)
        })
        .await
        .map_err(failed)?;
        match mounted {
            Ok(mount_id) => {
                let unmount = undo_boot_mount(ctx, s, &entry.mount_point, mount_id, &device);
                ctx.undo.require(release_loop, unmount);
                s.boot_mounts.push(BootMount {
                    unmount,
                    release_loop,
                });
                ctx.progress.note(format!(
                    "{} of the image: partition {number} ({}) on {}",
                    entry.mount_point,
                    filesystem.kind,
                    device.display()
                ));
            }
            Err(e) if boot_mounts::kernel_lacks_filesystem(&e) => {
                undo_now(ctx, release_loop).await?;
                ctx.progress.note(format!(
                    "{} of the image (partition {number}, {}) is not mounted: this host's \
                     kernel cannot mount {}; what provisioners write there stays in the \
                     image's directory under it",
                    entry.mount_point, filesystem.kind, filesystem.kind
                ));
            }
            Err(e) => return Err(failed(e)),
        }
    }
    Ok(())
}

/// Registers the unmount of the boot mount `mount_id`, by the mount itself, never by the
/// image's path (`boot_mounts::unmount`); the parent's unmount (the root's, or /boot's for
/// /boot/efi) waits for it.
fn undo_boot_mount<B: Backend>(
    ctx: &mut StepContext,
    s: &BakeState<B>,
    mount_point: &str,
    mount_id: u64,
    device: &Path,
) -> UndoId {
    let (root, point) = (s.mount_point.clone(), mount_point.to_string());
    let (device, waits) = (device.to_path_buf(), mount::ReleaseWaits::default());
    let unmount = ctx.undo.push(
        s.mount_point
            .join(point.trim_start_matches('/'))
            .display()
            .to_string(),
        "unmount",
        Keep::Never,
        move || {
            let (root, point, device) = (root.clone(), point.clone(), device.clone());
            let waits = waits.clone();
            async move {
                let wait = waits.next();
                let unmounted = tokio::task::spawn_blocking(move || {
                    boot_mounts::unmount(&root, &point, mount_id, &device, wait)
                })
                .await?;
                waits.record(&unmounted);
                Ok(unmounted?)
            }
        },
    );
    if let Some(parent) = s.boot_mounts.last().map(|b| b.unmount).or(s.unmount_root) {
        ctx.undo.require(parent, unmount);
    }
    unmount
}

pub struct MountImage;

#[async_trait]
impl<B: Backend> Step<BakeState<B>> for MountImage {
    fn name(&self) -> &'static str {
        "mount image"
    }
    async fn run(&self, s: &mut BakeState<B>, ctx: &mut StepContext) -> Result<(), StepError> {
        let device = earlier(&s.root_device, "root device")?;
        let root_device = device.clone();
        let target = s.mount_point.clone();
        // A larger volume than the base's is room for the tarball only once the filesystem
        // fills it.
        let grow = s.root_grows();
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
        // Its directory goes with the run's work directory.
        let unmount_root = undo_mount(ctx, &target, &root_device);
        // Never give the device back under a live filesystem (detach a volume, release a
        // loop device): if the unmount fails, the device stays and is named.
        if let Some(release) = s.backend.device_release() {
            ctx.undo.require(release, unmount_root);
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
        mount_boot_partitions(s, ctx).await
    }
}

/// Puts the host's resolv.conf and a policy-rc.d into the image for the provisioners, after
/// the extraction, as the image resolves their paths.
pub struct PrepareChroot;

#[async_trait]
impl<B: Backend> Step<BakeState<B>> for PrepareChroot {
    fn name(&self) -> &'static str {
        "prepare chroot"
    }
    async fn run(&self, s: &mut BakeState<B>, ctx: &mut StepContext) -> Result<(), StepError> {
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
impl<B: Backend> Step<BakeState<B>> for ExtractTarball {
    fn name(&self) -> &'static str {
        "extract tarball"
    }
    async fn run(&self, s: &mut BakeState<B>, ctx: &mut StepContext) -> Result<(), StepError> {
        let progress = ctx.progress.clone();
        // Progress is told in bytes of the tar stream read, against its size: a true fraction.
        let stream_size = std::fs::metadata(&s.tar_stream).ok().map(|m| m.len());
        let spec = extract::ExtractSpec {
            dest: s.build.dest.clone(),
            owner: s.build.owner.clone(),
            keep_setuid: s.build.keep_setuid,
        };
        let writing_out = Arc::new(
            mount::WritingOut::start(&s.mount_point)
                .map_err(|e| failed(format!("cannot open {}: {e}", s.mount_point.display())))?,
        );
        // Stopped before the unmount, which a cleanup runs after it, should the step end
        // early: its open directory would make the unmount busy.
        let stop_writing_out = ctx.undo.push(
            s.mount_point.display().to_string(),
            "stop writing the image out",
            Keep::Never,
            move || {
                let writing_out = writing_out.clone();
                async move {
                    writing_out.stop().await;
                    Ok(())
                }
            },
        );
        let done = extract::extract_into_image(
            &s.amibake_exe,
            &s.mount_point,
            &spec,
            &s.tar_stream,
            s.isolation,
            |p, read| progress.advance(read, stream_size, Unit::Bytes, Some(p.files)),
            &ctx.cancel,
        )
        .await;
        undo_now(ctx, stop_writing_out).await?;
        match done {
            Ok(done) => {
                ctx.progress.note(format!(
                    "{} entries, {} bytes into {}",
                    done.files, done.bytes, s.build.dest
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
impl<B: Backend> Step<BakeState<B>> for RunProvisioners {
    fn name(&self) -> &'static str {
        "run provisioners"
    }
    async fn run(&self, s: &mut BakeState<B>, ctx: &mut StepContext) -> Result<(), StepError> {
        let chroot = Chroot::new(
            &s.amibake_exe,
            &s.mount_point,
            s.isolation,
            s.emulator.clone(),
            &s.image.build_id,
        );
        provision(
            &chroot,
            Entries::Provisioners,
            &s.image.plan.provisioners,
            ctx,
        )
        .await
    }
}

/// Puts the image's files back and unmounts it before the snapshot, through the same undo
/// entries the cleanup would run, so they are not run twice.
pub struct UnmountImage;

#[async_trait]
impl<B: Backend> Step<BakeState<B>> for UnmountImage {
    fn name(&self) -> &'static str {
        "unmount image"
    }
    async fn run(&self, s: &mut BakeState<B>, ctx: &mut StepContext) -> Result<(), StepError> {
        if let Some(restore) = s.restore_files.take() {
            undo_now(ctx, restore).await?;
        }
        // The unmount waits for every change to reach the disk: written first, with how
        // much is left to write shown, the unmount itself is quick. Changes that need only
        // reach this host's page cache are there once the unmount has written them.
        if s.unmount_root.is_some() && s.backend.image_writes() == Writes::Durable {
            let (target, progress) = (s.mount_point.clone(), ctx.progress.clone());
            let flushed = tokio::task::spawn_blocking(move || {
                mount::flush(&target, |done, total| {
                    progress.advance(done, Some(total), Unit::Bytes, None)
                })
            })
            .await
            .map_err(failed)?;
            if let Err(e) = flushed {
                ctx.progress.note(format!(
                    "cannot write the image's changes out ahead of the unmount: {e}"
                ));
            }
        }
        // The boot filesystems first, children before parents; each loop device goes once
        // its filesystem is off it.
        while let Some(boot) = s.boot_mounts.pop() {
            undo_now(ctx, boot.unmount).await?;
            undo_now(ctx, boot.release_loop).await?;
        }
        if let Some(unmount) = s.unmount_root.take() {
            undo_now(ctx, unmount).await?;
        }
        Ok(())
    }
}

pub struct RegisterImage;

#[async_trait]
impl<B: Backend> Step<BakeState<B>> for RegisterImage {
    fn name(&self) -> &'static str {
        "register image"
    }
    async fn run(&self, s: &mut BakeState<B>, ctx: &mut StepContext) -> Result<(), StepError> {
        let snapshot_id = earlier(&s.snapshot_id, "snapshot")?;
        // Finished with the image, and named in the manifest.
        s.image.snapshot_ids = vec![snapshot_id.clone()];
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
                    s.build
                        .root_volume_size_gb
                        .unwrap_or(0)
                        .max(base.root_volume_size_gb),
                )
                .set_volume_type(
                    s.build
                        .root_volume_type
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
        let image = &s.image;
        let registration = crate::aws::image::Registration {
            name: &image.plan.name,
            description: image.plan.description.as_deref(),
            base,
            mappings: mappings.collect(),
            tags: &image.artifact_tags(),
        };
        let image_id = crate::aws::image::register(
            &image.clients,
            registration,
            &image.build_id,
            &ctx.progress,
        )
        .await
        .map_err(waited)?;
        s.image.image_id = Some(image_id.clone());
        let deregister = undo_with(
            ctx,
            &s.image.clients,
            image_id.clone(),
            &image_id,
            "deregister image",
            Keep::OnSuccess,
            crate::aws::image::deregister,
        );
        if let Some(delete_snapshot) = s.delete_snapshot {
            ctx.undo.require(delete_snapshot, deregister);
        }
        // RegisterImage over the snapshot this bake saw completed.
        crate::aws::image::wait(
            &s.image.clients,
            &image_id,
            WaitPolicy::REGISTERED,
            &ctx.cancel,
            &ctx.progress,
        )
        .await
        .map_err(waited)?;
        Ok(())
    }
}

impl<B> BakeState<B> {
    /// Whether the template asks for a larger volume than the base's: room for the tarball
    /// once the root (its partition, then its filesystem) is grown to fill it.
    pub fn root_grows(&self) -> bool {
        self.build
            .root_volume_size_gb
            .is_some_and(|gb| gb > self.base.root_volume_size_gb)
    }
}
