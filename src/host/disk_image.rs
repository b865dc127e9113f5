//! Disk images as files on this machine, for the `direct` backend: where the data of a
//! sparse file lies, a copy that shares or skips what it can, the root partition's extent
//! from the partition table, and the 512 KiB blocks that differ from a base's digests.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rustix::fs::SeekFrom;

use crate::aws::ebs::{block_digest, BLOCK_SIZE};
use crate::host::block_digests::BlockDigests;

const SECTOR: u64 = 512;

/// The byte ranges (start, end) of a file that hold data; the rest are holes.
pub fn data_ranges(file: &File) -> io::Result<Vec<(u64, u64)>> {
    let len = file.metadata()?.len();
    let mut ranges = Vec::new();
    let mut at = 0;
    while at < len {
        let start = match rustix::fs::seek(file, SeekFrom::Data(at)) {
            Ok(start) => start,
            // ENXIO: no data at or after `at`.
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = rustix::fs::seek(file, SeekFrom::Hole(start))?;
        ranges.push((start, end));
        at = end;
    }
    Ok(ranges)
}

/// The indices of the 512 KiB blocks that hold any data.
pub fn data_blocks(file: &File) -> io::Result<BTreeSet<u64>> {
    let block = BLOCK_SIZE as u64;
    let mut blocks = BTreeSet::new();
    for (start, end) in data_ranges(file)? {
        blocks.extend(start / block..end.div_ceil(block));
    }
    Ok(blocks)
}

/// How `copy_sparse` made its copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopiedBy {
    /// The filesystem shares the source's extents until either side writes (FICLONE).
    Reflink,
    /// Only the source's data ranges were copied (copy_file_range); holes stay holes.
    Extents,
}

/// Copies `src` to a new file `dst` of `len` bytes (at least the source's length): a
/// reflink where the filesystem can, else its data ranges only.
pub fn copy_sparse(src: &Path, dst: &Path, len: u64) -> io::Result<CopiedBy> {
    let source = File::open(src)?;
    let target = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)?;
    let copied = if rustix::fs::ioctl_ficlone(&target, &source).is_ok() {
        CopiedBy::Reflink
    } else {
        for (start, end) in data_ranges(&source)? {
            let (mut from, mut to) = (start, start);
            while from < end {
                let left = (end - from) as usize;
                let n = rustix::fs::copy_file_range(
                    &source,
                    Some(&mut from),
                    &target,
                    Some(&mut to),
                    left,
                )?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("{} ended at {from} while copying it", src.display()),
                    ));
                }
            }
        }
        CopiedBy::Extents
    };
    let len = len.max(source.metadata()?.len());
    target.set_len(len)?;
    target.sync_all()?;
    Ok(copied)
}

/// Where in a disk image a filesystem lies.
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
    if root_extent(image, wanted)?.is_none() {
        return Ok(None);
    }
    // root_extent took no number to mean partition 1 of a partitioned disk.
    let partition = wanted.unwrap_or(1);
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
    root_extent(image, wanted)
}

/// The extent of the root filesystem in `image`: partition `wanted` (0: the whole disk), or
/// when the template does not say, partition 1 if the disk is partitioned and the whole
/// disk if not, as the attach backend chooses. `None` is the whole disk.
pub fn root_extent(image: &Path, wanted: Option<u32>) -> Result<Option<Extent>, PartitionError> {
    let name = image.display().to_string();
    let read = |source| PartitionError::Read {
        image: name.clone(),
        source,
    };
    let partitions = partitions(&File::open(image).map_err(read)?).map_err(read)?;
    let wanted = match (wanted, &partitions) {
        (Some(0), _) | (None, None) => return Ok(None),
        (Some(n), None) => {
            return Err(PartitionError::NotPartitioned {
                image: name,
                wanted: n,
            })
        }
        (Some(n), Some(_)) => n,
        (None, Some(_)) => 1,
    };
    let partitions = partitions.unwrap_or_default();
    partitions
        .iter()
        .find(|(number, _)| *number == wanted)
        .map(|(_, extent)| Some(*extent))
        .ok_or_else(|| PartitionError::NoPartition {
            image: name,
            wanted,
            listed: if partitions.is_empty() {
                "none".into()
            } else {
                partitions
                    .iter()
                    .map(|(n, _)| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        })
}

/// The numbered partitions of a GPT or MBR disk (primary MBR partitions only), or `None`
/// when the disk has no partition table.
fn partitions(disk: &File) -> io::Result<Option<Vec<(u32, Extent)>>> {
    let mut mbr = [0u8; 512];
    if disk.read_at(&mut mbr, 0)? < 512 || mbr[510..512] != [0x55, 0xAA] {
        return Ok(None);
    }
    let entries: Vec<&[u8]> = mbr[446..510].chunks(16).collect();
    if entries.iter().any(|e| e[4] == 0xEE) {
        return gpt_partitions(disk).map(Some);
    }
    let mut found = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let start = u32::from_le_bytes(entry[8..12].try_into().expect("4 bytes")) as u64;
        let sectors = u32::from_le_bytes(entry[12..16].try_into().expect("4 bytes")) as u64;
        if entry[4] != 0 && sectors > 0 {
            found.push((
                i as u32 + 1,
                Extent {
                    offset: start * SECTOR,
                    size: sectors * SECTOR,
                },
            ));
        }
    }
    Ok(Some(found))
}

fn gpt_partitions(disk: &File) -> io::Result<Vec<(u32, Extent)>> {
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
    disk.read_exact_at(&mut table, table_lba * SECTOR)?;
    let mut found = Vec::new();
    for (i, entry) in table.chunks(size as usize).enumerate() {
        if entry[..16].iter().all(|b| *b == 0) {
            continue;
        }
        let (first, last) = (u64_at(entry, 32), u64_at(entry, 40));
        if last < first {
            return Err(bad(&format!("partition {} ends before it starts", i + 1)));
        }
        found.push((
            i as u32 + 1,
            Extent {
                offset: first * SECTOR,
                size: (last - first + 1) * SECTOR,
            },
        ));
    }
    Ok(found)
}

/// A block that now differs from what the new snapshot would otherwise hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangedBlock {
    pub index: u64,
    pub digest: [u8; 32],
}

/// Reads `image` and hands `each` every block to put into a new snapshot, in index order,
/// with its bytes. Against a parent whose blocks have `parent` digests: every block whose
/// content differs, a block the bake freed (now a hole, reading as zeros) included. With no
/// parent (`None`): every block that is not all zeros. Stops early, with what it has
/// handed on, once `keep_going` says no: it is asked before each block is read.
pub fn changed_blocks(
    image: &Path,
    parent: Option<&BlockDigests>,
    keep_going: impl Fn() -> bool,
    mut each: impl FnMut(ChangedBlock, &[u8]),
) -> io::Result<()> {
    let file = File::open(image)?;
    let zeros = vec![0u8; BLOCK_SIZE];
    let zero = block_digest(&zeros);
    let data = data_blocks(&file)?;
    let mut candidates = data.clone();
    if let Some(parent) = parent {
        candidates.extend(parent.0.keys().copied());
    }
    let mut buf = vec![0u8; BLOCK_SIZE];
    for index in candidates {
        if !keep_going() {
            break;
        }
        let bytes = if data.contains(&index) {
            read_block(&file, index, &mut buf)?;
            &buf
        } else {
            &zeros
        };
        let digest = block_digest(bytes);
        let before = parent.map_or(zero, |p| p.0.get(&index).copied().unwrap_or(zero));
        if digest != before {
            each(ChangedBlock { index, digest }, bytes);
        }
    }
    Ok(())
}

/// Block `index` of `file` into `buf`; past the end of the file reads as zeros.
pub fn read_block(file: &File, index: u64, buf: &mut [u8]) -> io::Result<()> {
    read_or_zeros(file, buf, index * BLOCK_SIZE as u64)
}

/// `buf.len()` bytes of `file` at `offset` into `buf`; past the end of the file reads as
/// zeros.
pub fn read_or_zeros(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    buf.fill(0);
    let mut at = 0;
    while at < buf.len() {
        match file.read_at(&mut buf[at..], offset + at as u64)? {
            0 => break,
            n => at += n,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sparse(dir: &Path, len: u64, writes: &[(u64, &[u8])]) -> std::path::PathBuf {
        let path = dir.join(format!("img-{}", writes.len()));
        let file = File::create(&path).unwrap();
        file.set_len(len).unwrap();
        for (at, data) in writes {
            file.write_all_at(data, *at).unwrap();
        }
        path
    }

    const B: u64 = BLOCK_SIZE as u64;

    #[test]
    fn data_blocks_are_the_blocks_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = sparse(
            dir.path(),
            64 * B,
            &[(3 * B + 10, b"x"), (40 * B, &[7u8; 4096])],
        );
        let blocks = data_blocks(&File::open(&path).unwrap()).unwrap();
        // Filesystems allocate in their own blocks, never more than one 512 KiB block here.
        assert_eq!(blocks, [3, 40].into());
    }

    #[test]
    fn a_sparse_copy_holds_the_same_bytes_and_no_more_data() {
        let dir = tempfile::tempdir().unwrap();
        let src = sparse(dir.path(), 16 * B, &[(B, b"hello"), (9 * B, b"world")]);
        let dst = dir.path().join("copy");
        copy_sparse(&src, &dst, 32 * B).unwrap();
        let copy = File::open(&dst).unwrap();
        assert_eq!(
            copy.metadata().unwrap().len(),
            32 * B,
            "grown to the size asked"
        );
        assert_eq!(data_blocks(&copy).unwrap(), [1, 9].into());
        let mut buf = vec![0u8; BLOCK_SIZE];
        read_block(&copy, 9, &mut buf).unwrap();
        assert_eq!(&buf[..5], b"world");
        assert!(
            copy_sparse(&src, &dst, 0).is_err(),
            "never over an existing file"
        );
    }

    #[test]
    fn changed_blocks_against_a_parent_include_freed_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let base = sparse(
            dir.path(),
            8 * B,
            &[(0, b"boot"), (2 * B, b"keep"), (5 * B, b"gone")],
        );
        let file = File::open(&base).unwrap();
        let mut parent = BlockDigests::default();
        let mut buf = vec![0u8; BLOCK_SIZE];
        for index in data_blocks(&file).unwrap() {
            read_block(&file, index, &mut buf).unwrap();
            parent.0.insert(index, block_digest(&buf));
        }
        // The bake: block 0 rewritten, block 5 freed (punched), block 7 new; 2 untouched.
        let work = dir.path().join("work");
        copy_sparse(&base, &work, 0).unwrap();
        let w = std::fs::OpenOptions::new().write(true).open(&work).unwrap();
        w.write_all_at(b"BOOT", 0).unwrap();
        w.write_all_at(b"new", 7 * B).unwrap();
        rustix::fs::fallocate(
            &w,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            5 * B,
            B,
        )
        .unwrap();
        let changed = all_changed(&work, Some(&parent));
        assert_eq!(
            changed.iter().map(|(c, _)| c.index).collect::<Vec<_>>(),
            [0, 5, 7]
        );
        for (block, data) in &changed {
            assert_eq!(
                block.digest,
                block_digest(data),
                "each block with its own bytes"
            );
        }
        assert!(
            changed[1].1.iter().all(|b| *b == 0),
            "a freed block is put as zeros"
        );
        assert!(changed[2].1.starts_with(b"new"));
        let zero = block_digest(&[0u8; BLOCK_SIZE]);
        let full = all_changed(&work, None);
        assert_eq!(
            full.iter().map(|(c, _)| c.index).collect::<Vec<_>>(),
            [0, 2, 7],
            "with no parent, every block holding data"
        );
        assert!(full.iter().all(|(c, _)| c.digest != zero));
    }

    fn all_changed(image: &Path, parent: Option<&BlockDigests>) -> Vec<(ChangedBlock, Vec<u8>)> {
        let mut found = Vec::new();
        changed_blocks(
            image,
            parent,
            || true,
            |c, data| found.push((c, data.to_vec())),
        )
        .unwrap();
        found
    }

    #[test]
    fn changed_blocks_stop_when_told() {
        let dir = tempfile::tempdir().unwrap();
        let image = sparse(
            dir.path(),
            8 * B,
            &[(0, b"a"), (3 * B, b"b"), (6 * B, b"c")],
        );
        let mut seen = Vec::new();
        let asked = std::cell::Cell::new(0);
        changed_blocks(
            &image,
            None,
            || {
                asked.set(asked.get() + 1);
                asked.get() <= 2
            },
            |c, _| seen.push(c.index),
        )
        .unwrap();
        assert_eq!(seen, [0, 3], "no block read once told to stop");
    }

    fn write_mbr(path: &Path, entries: &[(u8, u32, u32)]) {
        let mut mbr = [0u8; 512];
        for (i, (kind, start, sectors)) in entries.iter().enumerate() {
            let e = &mut mbr[446 + i * 16..446 + (i + 1) * 16];
            e[4] = *kind;
            e[8..12].copy_from_slice(&start.to_le_bytes());
            e[12..16].copy_from_slice(&sectors.to_le_bytes());
        }
        mbr[510] = 0x55;
        mbr[511] = 0xAA;
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .write_all_at(&mbr, 0)
            .unwrap();
    }

    #[test]
    fn root_extent_follows_the_table_and_the_setting() {
        let dir = tempfile::tempdir().unwrap();
        let whole = sparse(dir.path(), 4 * B, &[(1024, b"superblock")]);
        assert_eq!(root_extent(&whole, None).unwrap(), None);
        assert!(matches!(
            root_extent(&whole, Some(1)),
            Err(PartitionError::NotPartitioned { wanted: 1, .. })
        ));
        write_mbr(&whole, &[(0x83, 2048, 4096), (0x82, 8192, 100)]);
        assert_eq!(
            root_extent(&whole, None).unwrap(),
            Some(Extent {
                offset: 2048 * 512,
                size: 4096 * 512
            })
        );
        assert_eq!(
            root_extent(&whole, Some(2)).unwrap().unwrap().offset,
            8192 * 512
        );
        assert_eq!(root_extent(&whole, Some(0)).unwrap(), None);
        let err = root_extent(&whole, Some(3)).unwrap_err().to_string();
        assert!(
            err.contains("no partition 3") && err.contains("lists 1, 2"),
            "{err}"
        );
    }

    #[test]
    fn gpt_partitions_are_read_from_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let disk = sparse(dir.path(), 8 * B, &[]);
        write_mbr(&disk, &[(0xEE, 1, 8191)]);
        let mut header = [0u8; 92];
        header[..8].copy_from_slice(b"EFI PART");
        header[72..80].copy_from_slice(&2u64.to_le_bytes());
        header[80..84].copy_from_slice(&128u32.to_le_bytes());
        header[84..88].copy_from_slice(&128u32.to_le_bytes());
        let file = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        file.write_all_at(&header, 512).unwrap();
        // Entry 1 unused; entry 2 at LBA 2048..=6143; entry 14 at 34..=2047.
        for (slot, first, last) in [(1usize, 2048u64, 6143u64), (13, 34, 2047)] {
            let mut entry = [0u8; 128];
            entry[0] = 0xAF;
            entry[32..40].copy_from_slice(&first.to_le_bytes());
            entry[40..48].copy_from_slice(&last.to_le_bytes());
            file.write_all_at(&entry, 2 * 512 + slot as u64 * 128)
                .unwrap();
        }
        assert_eq!(
            root_extent(&disk, Some(2)).unwrap(),
            Some(Extent {
                offset: 2048 * 512,
                size: 4096 * 512
            })
        );
        assert_eq!(
            root_extent(&disk, Some(14)).unwrap().unwrap().offset,
            34 * 512
        );
        let err = root_extent(&disk, None).unwrap_err().to_string();
        assert!(
            err.contains("no partition 1") && err.contains("lists 2, 14"),
            "{err}"
        );
    }
}
