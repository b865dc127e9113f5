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
use std::path::Path;

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags, StatxFlags};
use rustix::io::Errno;
use rustix::mount::MountFlags;

use super::filesystem::{self, Filesystem, FsKind};
use super::image_root::ImageRoot;
use super::mount;
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
    #[error(
        "the image's /etc/fstab line {line} mounts {mount_point} from {spec}, which \
         partitions {numbers} of {disk} all answer to: name one by PARTUUID"
    )]
    Ambiguous {
        line: usize,
        mount_point: String,
        spec: String,
        disk: String,
        numbers: String,
    },
    #[error("the image's /etc/fstab mounts {mount_point} twice (lines {first} and {second})")]
    Twice {
        mount_point: String,
        first: usize,
        second: usize,
    },
    #[error(
        "the image's /etc/fstab line {line} mounts {mount_point} from partition {partition} \
         of {disk}, which overlaps partition {other}: a filesystem mounted twice is corrupted"
    )]
    Overlaps {
        line: usize,
        mount_point: String,
        partition: u32,
        other: u32,
        disk: String,
    },
    #[error("{mount_point} of the image: {source}")]
    MountPoint {
        mount_point: String,
        source: std::io::Error,
    },
    #[error("unmount {mount_point} of the image: {source}")]
    Unmount {
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
    // What the image wrote reaches errors and the terminal: printable only.
    let unescape = |field: &str| {
        crate::engine::events::printable(&field.replace("\\040", " ").replace("\\011", "\t"))
    };
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

/// The partitions an fstab `spec` names: `UUID=`, `LABEL=`, `PARTUUID=`, their
/// `/dev/disk/by-*/` links, or a kernel name of the boot disk ending in the partition number
/// (`/dev/xvda3`, `/dev/nvme0n1p3`, `/dev/sda16`). More than one is the image's ambiguity.
pub fn resolve<'a>(spec: &str, probed: &'a [Probed]) -> Vec<&'a Probed> {
    let (key, value) = match spec.split_once('=') {
        Some((key, value)) => (key, value.trim_matches('"')),
        None => match spec.strip_prefix("/dev/disk/by-") {
            Some(link) => match link.split_once('/') {
                Some(("uuid", v)) => ("UUID", v),
                Some(("label", v)) => ("LABEL", v),
                Some(("partuuid", v)) => ("PARTUUID", v),
                _ => return Vec::new(),
            },
            None => return by_kernel_name(spec, probed).into_iter().collect(),
        },
    };
    probed
        .iter()
        .filter(|p| match key {
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
        .collect()
}

/// The names an instance gives its boot disk, each followed by a partition number; a name
/// of another disk (`/dev/sdb1`) is not this image's.
const BOOT_DISK_NAMES: [&str; 5] = ["xvda", "sda", "vda", "nvme0n1p", "hda"];

fn by_kernel_name<'a>(spec: &str, probed: &'a [Probed]) -> Option<&'a Probed> {
    let name = spec.strip_prefix("/dev/")?;
    let number = BOOT_DISK_NAMES
        .iter()
        .find_map(|disk| name.strip_prefix(disk))
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))?;
    let number: u32 = number.parse().ok()?;
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
/// partition of `disk`. An entry on the root's own partition is skipped; one that overlaps
/// the root or another entry is refused, since a filesystem mounted twice read-write is
/// corrupted; a root on the whole disk has no boot partitions beside it.
pub fn plan(
    root: &Path,
    disk: &Path,
    root_partition: Option<u32>,
) -> Result<Vec<(FstabEntry, Probed)>, BootMountError> {
    let Some(root_partition) = root_partition else {
        return Ok(Vec::new());
    };
    let entries = image_boot_entries(root)?;
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let probed = probe_disk(disk)?;
    let disk_name = disk.display().to_string();
    let mut taken: Vec<&Partition> = probed
        .iter()
        .filter(|p| p.partition.number == root_partition)
        .map(|p| &p.partition)
        .collect();
    let mut planned = Vec::new();
    for entry in entries {
        let found = match resolve(&entry.spec, &probed)[..] {
            [found] => found,
            [] => {
                return Err(BootMountError::NotFound {
                    line: entry.line,
                    mount_point: entry.mount_point,
                    spec: entry.spec,
                    disk: disk_name,
                    listed: listed(&probed),
                })
            }
            ref several => {
                return Err(BootMountError::Ambiguous {
                    line: entry.line,
                    mount_point: entry.mount_point,
                    spec: entry.spec,
                    disk: disk_name,
                    numbers: several
                        .iter()
                        .map(|p| p.partition.number.to_string())
                        .collect::<Vec<_>>()
                        .join(" and "),
                })
            }
        };
        if found.partition.number == root_partition {
            continue;
        }
        if let Some(other) = taken.iter().find(|t| overlap(t, &found.partition)) {
            return Err(BootMountError::Overlaps {
                line: entry.line,
                mount_point: entry.mount_point,
                partition: found.partition.number,
                other: other.number,
                disk: disk_name,
            });
        }
        taken.push(&found.partition);
        planned.push((entry, found.clone()));
    }
    Ok(planned)
}

/// The boot entries of the fstab of the image mounted at `root` (none without an fstab);
/// a mount point named twice is refused, as its second mount would hide the first.
fn image_boot_entries(root: &Path) -> Result<Vec<FstabEntry>, BootMountError> {
    let image = ImageRoot::open(root).map_err(BootMountError::Fstab)?;
    let fstab = match image.read("/etc/fstab") {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(BootMountError::Fstab(e)),
    };
    let entries = boot_entries(&fstab);
    for pair in entries.windows(2) {
        if pair[0].mount_point == pair[1].mount_point {
            let (a, b) = (
                pair[0].line.min(pair[1].line),
                pair[0].line.max(pair[1].line),
            );
            return Err(BootMountError::Twice {
                mount_point: pair[0].mount_point.clone(),
                first: a,
                second: b,
            });
        }
    }
    Ok(entries)
}

fn overlap(a: &Partition, b: &Partition) -> bool {
    let end = |p: &Partition| p.extent.offset.saturating_add(p.extent.size);
    a.extent.offset < end(b) && b.extent.offset < end(a)
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
pub fn mount(
    root: &Path,
    mount_point: &str,
    device: &Path,
    partition: u32,
    kind: FsKind,
) -> Result<u64, BootMountError> {
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
    // What is now at the mount point, reached as above, is the new mount's root.
    mount_id_at(&image, mount_point).map_err(|source| BootMountError::MountPoint {
        mount_point: mount_point.into(),
        source,
    })
}

/// The kernel's id of the mount whose root is at `mount_point` of the image, reached with no
/// symlink on the way.
fn mount_id_at(image: &ImageRoot, mount_point: &str) -> std::io::Result<u64> {
    let dir = rustix::fs::openat2(
        image.fd(),
        mount_point.trim_start_matches('/'),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )?;
    let found = rustix::fs::statx(&dir, "", AtFlags::EMPTY_PATH, StatxFlags::MNT_ID)?;
    Ok(found.stx_mnt_id)
}

/// How often, and how far apart, an unmount is retried while the mount is busy.
const UNMOUNT_ATTEMPTS: u32 = 20;
const UNMOUNT_PAUSE: std::time::Duration = std::time::Duration::from_millis(250);

/// Unmounts the mount `mount_id` made on `mount_point` of the image at `root`, found where the
/// kernel says it is now (/proc/self/mountinfo), never by the image's path: a provisioner may
/// since have put a link to the host where a directory was, and umount given that path
/// would follow it to a mount of the host's. Found anywhere but under `root` is an error,
/// left as it is. Retries while busy. Done once `device`'s filesystem is let go of
/// everywhere, waiting up to `wait` (`mount::wait_released`), gone already or not.
pub fn unmount(
    root: &Path,
    mount_point: &str,
    mount_id: u64,
    device: &Path,
    wait: std::time::Duration,
) -> Result<(), BootMountError> {
    let fail = |source: std::io::Error| BootMountError::Unmount {
        mount_point: mount_point.into(),
        source,
    };
    let released = || match mount::MountedDevice::of_node(device) {
        Some(device) => mount::wait_released(&device, wait).map_err(|holders| {
            fail(std::io::Error::other(format!(
                "{} (held by {holders})",
                mount::LIVES_ON
            )))
        }),
        None => Ok(()),
    };
    let mut reason = None;
    for _ in 0..UNMOUNT_ATTEMPTS {
        let Some(now) = mount::mount_point_of(mount_id).map_err(fail)? else {
            return released();
        };
        if !now.starts_with(root) {
            return Err(fail(std::io::Error::other(format!(
                "the mount is now at {}, outside the image",
                now.display()
            ))));
        }
        match rustix::mount::unmount(&now, rustix::mount::UnmountFlags::NOFOLLOW) {
            Ok(()) => return released(),
            Err(e @ Errno::BUSY) => reason = Some(e),
            Err(e) => return Err(fail(e.into())),
        }
        std::thread::sleep(UNMOUNT_PAUSE);
    }
    Err(fail(reason.unwrap_or(Errno::BUSY).into()))
}

/// Whether a mount failed because this kernel has no driver for the filesystem at all.
pub fn kernel_lacks_filesystem(e: &BootMountError) -> bool {
    matches!(e, BootMountError::Mount { source, .. } if source.raw_os_error() == Some(libc::ENODEV))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::partitions::Extent;
    use std::path::PathBuf;

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
                     /dev/sdb1 /mnt/data\\040dir ext4 defaults 0 2\n\
                     LABEL=\x1b[2J /boot/efi vfat defaults 0 0\n";
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
                FstabEntry {
                    line: 7,
                    spec: "LABEL=\\u{1b}[2J".into(),
                    mount_point: "/boot/efi".into()
                },
            ]
        );
    }

    /// An image root holding `fstab`, and a disk of two MBR partitions over the same sectors.
    fn image_with(fstab: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/fstab"), fstab).unwrap();
        let disk = dir.path().join("disk.img");
        let file = std::fs::File::create(&disk).unwrap();
        file.set_len(16 << 20).unwrap();
        let mut mbr = [0u8; 512];
        for i in 0..2 {
            let e = &mut mbr[446 + i * 16..446 + (i + 1) * 16];
            e[4] = 0x83;
            e[8..12].copy_from_slice(&2048u32.to_le_bytes());
            e[12..16].copy_from_slice(&8192u32.to_le_bytes());
        }
        mbr[510..].copy_from_slice(&[0x55, 0xAA]);
        file.write_all_at(&mbr, 0).unwrap();
        (dir, root, disk)
    }

    #[test]
    fn a_boot_partition_over_the_root_or_a_mount_point_named_twice_is_refused() {
        let (_dir, root, disk) = image_with("/dev/xvda2 /boot ext4 defaults 0 2\n");
        let overlap = plan(&root, &disk, Some(1)).unwrap_err().to_string();
        assert!(
            overlap.contains("line 1 mounts /boot from partition 2")
                && overlap.contains("overlaps partition 1"),
            "{overlap}"
        );
        // A root on the whole disk has no partitions beside it.
        assert!(plan(&root, &disk, None).unwrap().is_empty());

        let (_dir, root, disk) =
            image_with("/dev/xvda2 /boot ext4 defaults 0 2\n/dev/xvda3 /boot/ ext4 defaults 0 2\n");
        let twice = plan(&root, &disk, Some(1)).unwrap_err().to_string();
        assert_eq!(
            twice,
            "the image's /etc/fstab mounts /boot twice (lines 1 and 2)"
        );
        let (_dir, root, disk) = image_with("LABEL=BOOT /boot ext4 defaults 0 2\n");
        let missing = plan(&root, &disk, Some(1)).unwrap_err().to_string();
        assert!(
            missing.contains("mounts /boot from LABEL=BOOT, which no partition of")
                && missing.contains("1 (no filesystem read), 2 (no filesystem read)"),
            "{missing}"
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
        let number = |spec: &str| match resolve(spec, &disk)[..] {
            [one] => Some(one.partition.number),
            [] => None,
            _ => panic!("{spec} names several"),
        };
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
        assert_eq!(number("/dev/sdb1"), None, "another disk's partition");
        assert_eq!(number("/dev/xvda15"), Some(15));
        assert_eq!(number("UUID=00000000-0000-0000-0000-000000000000"), None);
        assert_eq!(number("tmpfs"), None);
    }
}
