//! A disk's partitions, from its GPT or MBR table, and which of them holds the root: the one
//! the template names, or the one the image's own layout shows. For disk images (the
//! `direct` backend) and whole block devices (`attach`) alike.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::host::filesystem::{self, Filesystem};

const SECTOR: u64 = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    #[error("cannot read the partition table of {image}: {source}")]
    Read { image: String, source: io::Error },
    #[error("{image} has no partition table, so no partition {wanted} (root_partition = 0 names the whole disk)")]
    NotPartitioned { image: String, wanted: u32 },
    #[error("{image} has no partition {wanted} (its table lists {listed})")]
    NoPartition {
        image: String,
        wanted: u32,
        listed: String,
    },
    #[error("{image} holds no filesystem a root can live on (ext4 or XFS outside /boot and EFI partitions); its partitions: {listed}")]
    NoRoot { image: String, listed: String },
    #[error("{image} has several filesystems that could hold the root: {candidates}; set bake.root_partition to the root's number")]
    SeveralRoots { image: String, candidates: String },
    #[error("cannot grow partition {partition} of {image}: sfdisk {args}: {reason}")]
    Grow {
        image: String,
        partition: u32,
        args: String,
        reason: String,
    },
}

/// `root_extent`, after growing the root's partition to the end of the disk: for a copy
/// made larger than the base (`volume_size_gb`), so that its filesystem can fill it, as
/// cloud-init's growpart would at first boot. GPT's backup header moves to the new end
/// first. A partition that has another after it cannot grow, and keeps its size.
pub fn grow_root_partition(
    image: &Path,
    wanted: Option<u32>,
) -> Result<Option<Extent>, PartitionError> {
    let Some(partition) = root_partition(image, wanted)? else {
        return Ok(None);
    };
    let sfdisk = |args: &[&str], input: &str| {
        let fail = |reason: String| PartitionError::Grow {
            image: image.display().to_string(),
            partition,
            args: args.join(" "),
            reason,
        };
        let mut child = std::process::Command::new("sfdisk")
            .args(["--no-reread", "--no-tell-kernel", "--quiet"])
            .args(args)
            .arg(image)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| fail(format!("cannot run it: {e}")))?;
        if let Some(mut stdin) = child.stdin.take() {
            std::io::Write::write_all(&mut stdin, input.as_bytes())
                .map_err(|e| fail(e.to_string()))?;
        }
        let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(fail(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ))
        }
    };
    sfdisk(&["--relocate", "gpt-bak-std"], "")?;
    // `, +`: the same start, as large as the free space after it allows.
    sfdisk(&["-N", &partition.to_string()], ", +\n")?;
    root_extent(image, Some(partition))
}

/// The extent of the root filesystem in `image` (`root_partition`'s). `None` is the whole disk.
pub fn root_extent(image: &Path, wanted: Option<u32>) -> Result<Option<Extent>, PartitionError> {
    let Some(number) = root_partition(image, wanted)? else {
        return Ok(None);
    };
    let partitions = table(image)?.unwrap_or_default();
    match partitions.iter().find(|p| p.number == number) {
        Some(p) => Ok(Some(p.extent)),
        None => Err(PartitionError::NoPartition {
            image: image.display().to_string(),
            wanted: number,
            listed: numbers(&partitions),
        }),
    }
}

/// The partition of `image` (a disk image or a whole block device) that holds the root
/// filesystem: `wanted` (0: the whole disk, `None` returned), or when the template does not
/// say, the one the image's own layout shows (`root_of_layout`); the whole disk if it has no
/// partition table.
pub fn root_partition(image: &Path, wanted: Option<u32>) -> Result<Option<u32>, PartitionError> {
    if wanted == Some(0) {
        return Ok(None);
    }
    let name = image.display().to_string();
    let partitions = table(image)?;
    match (wanted, partitions) {
        (None, None) => Ok(None),
        (Some(n), None) => Err(PartitionError::NotPartitioned {
            image: name,
            wanted: n,
        }),
        (Some(n), Some(partitions)) => {
            if partitions.iter().any(|p| p.number == n) {
                Ok(Some(n))
            } else {
                Err(PartitionError::NoPartition {
                    image: name,
                    wanted: n,
                    listed: if partitions.is_empty() {
                        "none".into()
                    } else {
                        numbers(&partitions)
                    },
                })
            }
        }
        (None, Some(partitions)) => {
            let disk = File::open(image).map_err(|source| PartitionError::Read {
                image: name.clone(),
                source,
            })?;
            root_of_layout(&disk, &name, &partitions).map(Some)
        }
    }
}

/// The numbered partitions of `image`, or `None` when it has no partition table.
pub fn table(image: &Path) -> Result<Option<Vec<Partition>>, PartitionError> {
    let read = |source| PartitionError::Read {
        image: image.display().to_string(),
        source,
    };
    partitions(&File::open(image).map_err(read)?).map_err(read)
}

fn numbers(partitions: &[Partition]) -> String {
    partitions
        .iter()
        .map(|p| p.number.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

// GPT partition types a root never lives in.
const BIOS_BOOT: &str = "21686148-6449-6E6F-744E-656564454649";
const EFI_SYSTEM: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const XBOOTLDR: &str = "BC13C2FF-59E6-4262-A352-B275FD6F7172";
const LINUX_SWAP: &str = "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F";
const NOT_ROOT_GPT: [&str; 4] = [BIOS_BOOT, EFI_SYSTEM, XBOOTLDR, LINUX_SWAP];
// MBR types a root never lives in: swap, EFI.
const NOT_ROOT_MBR: [u8; 2] = [0x82, 0xEF];
// MBR extended partitions: containers of logical partitions, never a filesystem.
const EXTENDED_MBR: [u8; 3] = [0x05, 0x0F, 0x85];
// The Discoverable Partitions Specification's root types, x86-64 and arm64.
const ROOT_TYPES: [&str; 2] = [
    "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
    "B921B045-1DF0-41C3-AF44-4C6F280D3FAE",
];

/// The root's partition from the disk's own layout, as vendors lay their images out: root
/// after BIOS boot and EFI partitions (Amazon Linux 2023: 127, 128, root on 1), beside a
/// separate `/boot` (Ubuntu: root 1, /boot 16; RHEL: /boot 3, root 4). Partitions typed BIOS
/// boot, EFI, extended boot (/boot) or swap are never the root; of the rest, those holding
/// ext4 or XFS could be, and so could those holding a filesystem this does not read (btrfs,
/// LVM): the one GPT types as a root wins, or else the only one. Several: the template must
/// say, rather than the bake writing into a /boot while the real root goes untouched.
fn root_of_layout(
    disk: &File,
    image: &str,
    partitions: &[Partition],
) -> Result<u32, PartitionError> {
    let read = |source| PartitionError::Read {
        image: image.into(),
        source,
    };
    let mut held = Vec::new();
    for p in partitions {
        held.push((p, filesystem::probe(disk, p.extent.offset).map_err(read)?));
    }
    let never_root = |p: &Partition| match (&p.type_guid, p.mbr_type) {
        (Some(t), _) => NOT_ROOT_GPT.contains(&t.as_str()),
        (None, t) => NOT_ROOT_MBR.contains(&t),
    };
    let could_be_root = |(p, fs): &&(&Partition, Option<Filesystem>)| {
        !never_root(p) && fs.as_ref().is_none_or(|fs| fs.kind.can_hold_a_root())
    };
    let candidates: Vec<_> = held.iter().filter(could_be_root).collect();
    let readable = |(_, fs): &&&(&Partition, Option<Filesystem>)| fs.is_some();
    let typed_root: Vec<u32> = candidates
        .iter()
        .filter(readable)
        .filter(|(p, _)| {
            p.type_guid
                .as_deref()
                .is_some_and(|t| ROOT_TYPES.contains(&t))
        })
        .map(|(p, _)| p.number)
        .collect();
    let readable_count = candidates.iter().filter(readable).count();
    match (candidates.as_slice(), typed_root.as_slice()) {
        (_, [number]) => Ok(*number),
        ([(p, Some(_))], _) => Ok(p.number),
        _ if readable_count == 0 => Err(PartitionError::NoRoot {
            image: image.into(),
            listed: describe(&held),
        }),
        (several, _) => Err(PartitionError::SeveralRoots {
            image: image.into(),
            candidates: describe(
                &several
                    .iter()
                    .map(|(p, fs)| (*p, fs.clone()))
                    .collect::<Vec<_>>(),
            ),
        }),
    }
}

/// "1 (ext4 `cloudimg-rootfs`, 2048 MiB), 14 (no filesystem amibake reads, 4 MiB)"
fn describe(held: &[(&Partition, Option<Filesystem>)]) -> String {
    held.iter()
        .map(|(p, fs)| {
            let what = match fs {
                Some(fs) if fs.label.is_empty() => fs.kind.to_string(),
                Some(fs) => format!("{} `{}`", fs.kind, fs.label),
                None => "no filesystem amibake reads".into(),
            };
            format!("{} ({what}, {} MiB)", p.number, p.extent.size >> 20)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A numbered partition, with its GPT type (`None` on an MBR disk) or its MBR type byte
/// (0 on a GPT disk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub number: u32,
    pub extent: Extent,
    pub type_guid: Option<String>,
    /// The GPT partition's own GUID, as fstab's `PARTUUID=` names it.
    pub unique_guid: Option<String>,
    pub mbr_type: u8,
}

/// The numbered partitions of a GPT or MBR disk (primary MBR partitions only), or `None`
/// when the disk has no partition table.
fn partitions(disk: &File) -> io::Result<Option<Vec<Partition>>> {
    let mut mbr = [0u8; 512];
    if disk.read_at(&mut mbr, 0)? < 512 || mbr[510..512] != [0x55, 0xAA] {
        return Ok(None);
    }
    let entries: Vec<&[u8]> = mbr[446..510].chunks(16).collect();
    // As the kernel reads it: a boot flag other than 0 or 0x80 means these 64 bytes are not
    // a partition table (a filesystem's own boot sector on an unpartitioned disk).
    if entries.iter().any(|e| e[0] != 0 && e[0] != 0x80) {
        return Ok(None);
    }
    if entries.iter().any(|e| e[4] == 0xEE) {
        return gpt_partitions(disk).map(Some);
    }
    let mut found = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let start = u32::from_le_bytes(entry[8..12].try_into().expect("4 bytes")) as u64;
        let sectors = u32::from_le_bytes(entry[12..16].try_into().expect("4 bytes")) as u64;
        if entry[4] != 0 && !EXTENDED_MBR.contains(&entry[4]) && sectors > 0 {
            found.push(Partition {
                number: i as u32 + 1,
                extent: Extent {
                    offset: start * SECTOR,
                    size: sectors * SECTOR,
                },
                type_guid: None,
                unique_guid: None,
                mbr_type: entry[4],
            });
        }
    }
    Ok(Some(found))
}

fn gpt_partitions(disk: &File) -> io::Result<Vec<Partition>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("GPT: {what}"));
    let mut header = [0u8; 92];
    disk.read_exact_at(&mut header, SECTOR)?;
    if &header[..8] != b"EFI PART" {
        return Err(bad("no header signature at LBA 1"));
    }
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8"));
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4"));
    let (table_lba, count, size) = (
        u64_at(&header, 72),
        u32_at(&header, 80),
        u32_at(&header, 84),
    );
    if !(128..=4096).contains(&size) || count > 1024 {
        return Err(bad("implausible partition entry count or size"));
    }
    let mut table = vec![0u8; count as usize * size as usize];
    let bytes = |lba: u64| {
        lba.checked_mul(SECTOR)
            .ok_or_else(|| bad("an LBA past any disk"))
    };
    disk.read_exact_at(&mut table, bytes(table_lba)?)?;
    let mut found = Vec::new();
    for (i, entry) in table.chunks(size as usize).enumerate() {
        if entry[..16].iter().all(|b| *b == 0) {
            continue;
        }
        let (first, last) = (u64_at(entry, 32), u64_at(entry, 40));
        if last < first {
            return Err(bad(&format!("partition {} ends before it starts", i + 1)));
        }
        found.push(Partition {
            number: i as u32 + 1,
            extent: Extent {
                offset: bytes(first)?,
                size: bytes(last - first)?
                    .checked_add(SECTOR)
                    .ok_or_else(|| bad("a partition past any disk"))?,
            },
            type_guid: Some(guid_text(&entry[..16])),
            unique_guid: Some(guid_text(&entry[16..32])),
            mbr_type: 0,
        });
    }
    Ok(found)
}

/// A GPT GUID as written: its first three fields are stored little-endian.
fn guid_text(b: &[u8]) -> String {
    let hex = |bytes: &[u8]| bytes.iter().map(|x| format!("{x:02X}")).collect::<String>();
    let rev = |bytes: &[u8]| hex(&bytes.iter().rev().copied().collect::<Vec<_>>());
    format!(
        "{}-{}-{}-{}-{}",
        rev(&b[..4]),
        rev(&b[4..6]),
        rev(&b[6..8]),
        hex(&b[8..10]),
        hex(&b[10..16])
    )
}

#[cfg(test)]
mod tests;
