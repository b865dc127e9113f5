//! The image's own `/boot` and `/boot/efi`, mounted under its root for the provisioners, as
//! its `/etc/fstab` names them: Ubuntu keeps `/boot` on partition 16, RHEL on 3, and every
//! EFI image its ESP apart. A provisioner that installs a kernel or rebuilds an initramfs
//! must write there, not into the root's own empty `/boot`, or the image boots the old
//! kernel.
//!
//! Each partition gets a loop device over its extent of the disk (an attached volume or the
//! working copy), as the root does (`loop_device`), so nothing depends on the kernel's
//! partition scanning. The mount point is opened inside the image with no symlink on the
//! way (`ImageRoot::mount_target`) and mounted through its descriptor: a base image whose
//! `/boot` leads anywhere on the host is refused. These functions block.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use rustix::mount::MountFlags;

use super::filesystem::{self, Filesystem, FsKind};
use super::image_root::ImageRoot;
use super::partitions::{self, Partition};

/// The mount points mounted, parents first.
const BOOT_MOUNT_POINTS: [&str; 2] = ["/boot", "/boot/efi"];

#[derive(Debug, thiserror::Error)]
pub enum BootMountError {
    #[error("the image's /etc/fstab: {0}")]
    Fstab(std::io::Error),
    #[error("{disk}: {source}")]
    Layout {
        disk: String,
        source: partitions::PartitionError,
    },
    #[error(
        "the image's /etc/fstab line {line} mounts {mount_point} from {spec}, which no \
         partition of {disk} holds (its partitions: {listed})"
    )]
    NotFound {
        line: usize,
        mount_point: String,
        spec: String,
        disk: String,
        listed: String,
    },
    #[error("{mount_point} of the image: {source}")]
    MountPoint {
        mount_point: String,
        source: std::io::Error,
    },
    #[error(
        "mount {device} (partition {partition}, {kind}) on {mount_point} of the image: {source}"
    )]
    Mount {
        device: String,
        partition: u32,
        kind: FsKind,
        mount_point: String,
        source: std::io::Error,
    },
}

/// One line of `/etc/fstab` that mounts a boot filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FstabEntry {
    /// 1-based, for errors.
    pub line: usize,
    pub spec: String,
    pub mount_point: String,
}

/// The entries of `fstab` that mount `/boot` or `/boot/efi`, parents first. fstab escapes
/// a space in a field as `\040`.
pub fn boot_entries(fstab: &str) -> Vec<FstabEntry> {
    let unescape = |field: &str| field.replace("\\040", " ").replace("\\011", "\t");
    let mut entries: Vec<FstabEntry> = fstab
        .lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let line = line.trim();
            if line.starts_with('#') {
                return None;
            }
            let mut fields = line.split_whitespace();
            let spec = unescape(fields.next()?);
            let mount_point = unescape(fields.next()?);
            let mount_point = mount_point.trim_end_matches('/').to_string();
            BOOT_MOUNT_POINTS
                .contains(&mount_point.as_str())
                .then_some(FstabEntry {
                    line: i + 1,
                    spec,
                    mount_point,
                })
        })
        .collect();
    entries.sort_by_key(|e| e.mount_point.len());
    entries
}

/// A partition with what its filesystem says of itself.
#[derive(Debug, Clone)]
pub struct Probed {
    pub partition: Partition,
    pub filesystem: Option<Filesystem>,
}

/// The partition an fstab `spec` names: `UUID=`, `LABEL=`, `PARTUUID=`, their
/// `/dev/disk/by-*/` links, or a kernel name ending in the partition number (`/dev/xvda3`,
/// `/dev/nvme0n1p3`, `/dev/sda16`).
pub fn resolve<'a>(spec: &str, probed: &'a [Probed]) -> Option<&'a Probed> {
    let (key, value) = match spec.split_once('=') {
        Some((key, value)) => (key, value.trim_matches('"')),
        None => match spec.strip_prefix("/dev/disk/by-") {
            Some(link) => match link.split_once('/') {
                Some(("uuid", v)) => ("UUID", v),
                Some(("label", v)) => ("LABEL", v),
                Some(("partuuid", v)) => ("PARTUUID", v),
                _ => return None,
            },
            None => return by_kernel_name(spec, probed),
        },
    };
    probed.iter().find(|p| match key {
        "UUID" => p
            .filesystem
            .as_ref()
            .is_some_and(|f| f.uuid.eq_ignore_ascii_case(value)),
        "LABEL" => p.filesystem.as_ref().is_some_and(|f| f.label == value),
        "PARTUUID" => p
            .partition
            .unique_guid
            .as_deref()
            .is_some_and(|g| g.eq_ignore_ascii_case(value)),
        _ => false,
    })
}

fn by_kernel_name<'a>(spec: &str, probed: &'a [Probed]) -> Option<&'a Probed> {
    let name = spec.strip_prefix("/dev/")?;
    let digits = name.len() - name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let stem = &name[..name.len() - digits];
    // `nvme0n1` alone is a disk, not partition 1: its partitions are `nvme0n1pN`.
    if digits == 0 || (stem.starts_with("nvme") && !stem.ends_with('p')) {
        return None;
    }
    let number: u32 = name[name.len() - digits..].parse().ok()?;
    probed.iter().find(|p| p.partition.number == number)
}

/// The disk's partitions with their filesystems.
pub fn probe_disk(disk: &Path) -> Result<Vec<Probed>, BootMountError> {
    let layout = |source| BootMountError::Layout {
        disk: disk.display().to_string(),
        source,
    };
    let table = partitions::table(disk).map_err(layout)?.unwrap_or_default();
    let file = std::fs::File::open(disk).map_err(|e| {
        layout(partitions::PartitionError::Read {
            image: disk.display().to_string(),
            source: e,
        })
    })?;
    Ok(table
        .into_iter()
        .map(|partition| Probed {
            filesystem: filesystem::probe(&file, partition.extent.offset)
                .ok()
                .flatten(),
            partition,
        })
        .collect())
}

/// What is to be mounted where: each boot entry of the image mounted at `root` with its
/// partition of `disk`, skipping the one that is the root itself.
pub fn plan(
    root: &Path,
    disk: &Path,
    root_partition: u32,
) -> Result<Vec<(FstabEntry, Probed)>, BootMountError> {
    let image = ImageRoot::open(root).map_err(BootMountError::Fstab)?;
    let fstab = match image.read("/etc/fstab") {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(BootMountError::Fstab(e)),
    };
    let entries = boot_entries(&fstab);
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let probed = probe_disk(disk)?;
    let mut planned = Vec::new();
    for entry in entries {
        let Some(found) = resolve(&entry.spec, &probed) else {
            return Err(BootMountError::NotFound {
                line: entry.line,
                mount_point: entry.mount_point,
                spec: entry.spec,
                disk: disk.display().to_string(),
                listed: listed(&probed),
            });
        };
        if found.partition.number != root_partition {
            planned.push((entry, found.clone()));
        }
    }
    Ok(planned)
}

fn listed(probed: &[Probed]) -> String {
    if probed.is_empty() {
        return "none".into();
    }
    probed
        .iter()
        .map(|p| match &p.filesystem {
            Some(f) => format!(
                "{} ({} UUID={} LABEL={:?})",
                p.partition.number, f.kind, f.uuid, f.label
            ),
            None => format!("{} (no filesystem read)", p.partition.number),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Mounts `device` (partition `partition`, holding `kind`) on `mount_point` of the image at
/// `root`: nodev and nosuid, noatime as the root is, `nouuid` for XFS as the root is.
/// Returns the mount's path on the host.
pub fn mount(
    root: &Path,
    mount_point: &str,
    device: &Path,
    partition: u32,
    kind: FsKind,
) -> Result<PathBuf, BootMountError> {
    let image = ImageRoot::open(root).map_err(|source| BootMountError::MountPoint {
        mount_point: mount_point.into(),
        source,
    })?;
    let target = image
        .mount_target(mount_point)
        .map_err(|source| BootMountError::MountPoint {
            mount_point: mount_point.into(),
            source,
        })?;
    let (fstype, data) = match kind {
        FsKind::Ext => ("ext4", None),
        FsKind::Xfs => ("xfs", Some(c"nouuid")),
        FsKind::Vfat => ("vfat", None),
    };
    rustix::mount::mount(
        device,
        format!("/proc/self/fd/{}", target.as_raw_fd()),
        fstype,
        MountFlags::NOATIME | MountFlags::NODEV | MountFlags::NOSUID,
        data,
    )
    .map_err(|e| BootMountError::Mount {
        device: device.display().to_string(),
        partition,
        kind,
        mount_point: mount_point.into(),
        source: e.into(),
    })?;
    Ok(root.join(mount_point.trim_start_matches('/')))
}

/// Whether a mount failed because this kernel has no driver for the filesystem at all.
pub fn kernel_lacks_filesystem(e: &BootMountError) -> bool {
    matches!(e, BootMountError::Mount { source, .. } if source.raw_os_error() == Some(libc::ENODEV))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::partitions::Extent;

    fn probed(number: u32, kind: FsKind, uuid: &str, label: &str) -> Probed {
        Probed {
            partition: Partition {
                number,
                extent: Extent {
                    offset: u64::from(number) << 20,
                    size: 1 << 20,
                },
                type_guid: None,
                unique_guid: Some(format!("0000000{number}-AAAA-BBBB-CCCC-DDDDEEEEFFFF")),
                mbr_type: 0,
            },
            filesystem: Some(Filesystem {
                kind,
                uuid: uuid.into(),
                label: label.into(),
            }),
        }
    }

    #[test]
    fn only_boot_entries_are_taken_parents_first() {
        let fstab = "# a comment\n\
                     LABEL=cloudimg-rootfs / ext4 discard,errors=remount-ro 0 1\n\
                     LABEL=UEFI /boot/efi vfat umask=0077 0 1\n\
                     \n\
                     LABEL=BOOT /boot/ ext4 defaults 0 2\n\
                     /dev/sdb1 /mnt/data\\040dir ext4 defaults 0 2\n";
        let entries = boot_entries(fstab);
        assert_eq!(
            entries,
            [
                FstabEntry {
                    line: 5,
                    spec: "LABEL=BOOT".into(),
                    mount_point: "/boot".into()
                },
                FstabEntry {
                    line: 3,
                    spec: "LABEL=UEFI".into(),
                    mount_point: "/boot/efi".into()
                },
            ]
        );
    }

    #[test]
    fn specs_resolve_by_uuid_label_partuuid_and_kernel_name() {
        let disk = [
            probed(
                1,
                FsKind::Ext,
                "11111111-2222-3333-4444-555555555555",
                "cloudimg-rootfs",
            ),
            probed(15, FsKind::Vfat, "ABCD-1234", "UEFI"),
            probed(
                16,
                FsKind::Ext,
                "66666666-7777-8888-9999-000000000000",
                "BOOT",
            ),
        ];
        let number = |spec: &str| resolve(spec, &disk).map(|p| p.partition.number);
        assert_eq!(number("UUID=abcd-1234"), Some(15));
        assert_eq!(
            number("UUID=\"66666666-7777-8888-9999-000000000000\""),
            Some(16)
        );
        assert_eq!(number("LABEL=BOOT"), Some(16));
        assert_eq!(number("LABEL=boot"), None, "labels are case-sensitive");
        assert_eq!(
            number("PARTUUID=00000001-aaaa-bbbb-cccc-ddddeeeeffff"),
            Some(1)
        );
        assert_eq!(number("/dev/disk/by-label/UEFI"), Some(15));
        assert_eq!(
            number("/dev/disk/by-uuid/66666666-7777-8888-9999-000000000000"),
            Some(16)
        );
        assert_eq!(number("/dev/sda16"), Some(16));
        assert_eq!(number("/dev/nvme0n1p15"), Some(15));
        assert_eq!(number("/dev/nvme0n1"), None, "a whole NVMe disk");
        assert_eq!(number("/dev/xvda"), None);
        assert_eq!(number("UUID=00000000-0000-0000-0000-000000000000"), None);
        assert_eq!(number("tmpfs"), None);
    }
}
