//! Disk images as files on this machine, for the `direct` backend: where the data of a
//! sparse file lies, a copy that shares or skips what it can, and the 512 KiB blocks that
//! differ from a base's digests. Its partitions: `host::partitions`.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use rustix::fs::SeekFrom;

use crate::aws::ebs::{block_digest, BLOCK_SIZE};
use crate::host::block_digests::BlockDigests;

/// The byte ranges (start, end) of a file that hold data; the rest are holes.
pub fn data_ranges(file: &File) -> io::Result<Vec<(u64, u64)>> {
    let len = file.metadata()?.len();
    let mut ranges = Vec::new();
    let mut at = 0;
    while at < len {
        let Some(start) = next_data(file, at)? else {
            break;
        };
        let end = rustix::fs::seek(file, SeekFrom::Hole(start))?;
        ranges.push((start, end));
        at = end;
    }
    Ok(ranges)
}

/// Whether `file` holds any data between `start` and `end`, or only a hole.
pub fn holds_data(file: &File, start: u64, end: u64) -> io::Result<bool> {
    Ok(next_data(file, start)?.is_some_and(|at| at < end))
}

/// Where `file`'s first data at or after `from` starts; none where only a hole follows.
fn next_data(file: &File, from: u64) -> io::Result<Option<u64>> {
    match rustix::fs::seek(file, SeekFrom::Data(from)) {
        Ok(at) => Ok(Some(at)),
        // ENXIO: no data at or after `from`.
        Err(rustix::io::Errno::NXIO) => Ok(None),
        Err(e) => Err(e.into()),
    }
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

/// Copies `src` into `target`, a file just made and still empty, making it `len` bytes
/// long (at least the source's length): a reflink where the filesystem can, else its data
/// ranges only.
pub fn copy_sparse(src: &Path, target: &File, len: u64) -> io::Result<CopiedBy> {
    let source = File::open(src)?;
    if target.metadata()?.len() != 0 {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the copy's file is not empty",
        ));
    }
    let copied = if rustix::fs::ioctl_ficlone(target, &source).is_ok() {
        CopiedBy::Reflink
    } else {
        for (start, end) in data_ranges(&source)? {
            let (mut from, mut to) = (start, start);
            while from < end {
                let left = (end - from) as usize;
                let n = rustix::fs::copy_file_range(
                    &source,
                    Some(&mut from),
                    target,
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
    // Written out here, where the copy's time is shown: the kernel would write it out
    // anyway as a loop device is set up over it.
    target.sync_all()?;
    Ok(copied)
}

/// A block that now differs from what the new snapshot would otherwise hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangedBlock {
    pub index: u64,
    pub digest: [u8; 32],
}

/// Threads that read and digest an image's blocks at once: one a core, up to 4. A block's
/// digest is most of its reading, and a core digests some 1.5 GB a second, so one alone
/// would hold back puts going at EBS's 1,000 a second.
pub fn readers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// Reads `image` on up to `readers` threads and hands `each` every block to put into a new
/// snapshot with its digest, as found (nearly in index order); answers them all, in index
/// order. Against a parent whose blocks have `parent` digests: every block whose content
/// differs, a block the bake freed (now a hole, reading as zeros) included. With no parent
/// (`None`): every block that is not all zeros. Stops early, with what it has handed on,
/// once `keep_going` says no: it is asked before each block is read.
pub fn changed_blocks(
    image: &Path,
    parent: Option<&BlockDigests>,
    readers: usize,
    keep_going: impl Fn() -> bool + Sync,
    each: impl Fn(ChangedBlock) + Sync,
) -> io::Result<Vec<ChangedBlock>> {
    let file = File::open(image)?;
    let zero = block_digest(&[0u8; BLOCK_SIZE]);
    let data = data_blocks(&file)?;
    let mut candidates = data.clone();
    if let Some(parent) = parent {
        candidates.extend(parent.0.keys().copied());
    }
    let candidates: Vec<u64> = candidates.into_iter().collect();
    // Each reader takes the next candidate: the readers go through the image together.
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let read = || -> io::Result<Vec<ChangedBlock>> {
        let mut found = Vec::new();
        let mut buf = vec![0u8; BLOCK_SIZE];
        while !failed.load(Ordering::Relaxed) && keep_going() {
            let Some(&index) = candidates.get(next.fetch_add(1, Ordering::Relaxed)) else {
                break;
            };
            // A block holding no data reads as zeros.
            let digest = if data.contains(&index) {
                read_block(&file, index, &mut buf).inspect_err(|_| {
                    failed.store(true, Ordering::Relaxed);
                })?;
                block_digest(&buf)
            } else {
                zero
            };
            let before = parent.map_or(zero, |p| p.0.get(&index).copied().unwrap_or(zero));
            if digest != before {
                let block = ChangedBlock { index, digest };
                each(block);
                found.push(block);
            }
        }
        Ok(found)
    };
    let readers = readers.clamp(1, candidates.len().max(1));
    let mut changed = std::thread::scope(|scope| {
        let others: Vec<_> = (1..readers).map(|_| scope.spawn(read)).collect();
        let mut changed = read()?;
        for other in others {
            changed.extend(other.join().expect("a reader does not panic")?);
        }
        io::Result::Ok(changed)
    })?;
    changed.sort_unstable_by_key(|block| block.index);
    Ok(changed)
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
        copy_sparse(&src, &File::create(&dst).unwrap(), 32 * B).unwrap();
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
            copy_sparse(&src, &File::options().write(true).open(&dst).unwrap(), 0).is_err(),
            "never over a file holding data"
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
        let parent = digests_of(&base);
        // The bake: block 0 rewritten, block 5 freed (punched), block 7 new; 2 untouched.
        let work = dir.path().join("work");
        copy_sparse(&base, &File::create(&work).unwrap(), 0).unwrap();
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
            changed.iter().map(|c| c.index).collect::<Vec<_>>(),
            [0, 5, 7]
        );
        // A put reads its block from the image itself: each digest is of the image's bytes
        // at its index.
        let bytes = |index: u64| {
            let mut buf = vec![0u8; BLOCK_SIZE];
            read_block(&File::open(&work).unwrap(), index, &mut buf).unwrap();
            buf
        };
        for block in &changed {
            assert_eq!(
                block.digest,
                block_digest(&bytes(block.index)),
                "block {} with its own bytes",
                block.index
            );
        }
        assert!(
            bytes(5).iter().all(|b| *b == 0),
            "a freed block is put as zeros"
        );
        assert!(bytes(7).starts_with(b"new"));
        let zero = block_digest(&[0u8; BLOCK_SIZE]);
        let full = all_changed(&work, None);
        assert_eq!(
            full.iter().map(|c| c.index).collect::<Vec<_>>(),
            [0, 2, 7],
            "with no parent, every block holding data"
        );
        assert!(full.iter().all(|c| c.digest != zero));
    }

    /// The digest of every block of `image` holding data, read here, as a cache entry's.
    fn digests_of(image: &Path) -> BlockDigests {
        let file = File::open(image).unwrap();
        let mut digests = BlockDigests::default();
        let mut buf = vec![0u8; BLOCK_SIZE];
        for index in data_blocks(&file).unwrap() {
            read_block(&file, index, &mut buf).unwrap();
            digests.0.insert(index, block_digest(&buf));
        }
        digests
    }

    fn all_changed(image: &Path, parent: Option<&BlockDigests>) -> Vec<ChangedBlock> {
        changed_blocks(image, parent, 1, || true, |_| ()).unwrap()
    }

    #[test]
    fn changed_blocks_stop_when_told() {
        let dir = tempfile::tempdir().unwrap();
        let image = sparse(
            dir.path(),
            8 * B,
            &[(0, b"a"), (3 * B, b"b"), (6 * B, b"c")],
        );
        let seen = std::sync::Mutex::new(Vec::new());
        let asked = AtomicUsize::new(0);
        let answered = changed_blocks(
            &image,
            None,
            1,
            || asked.fetch_add(1, Ordering::Relaxed) < 2,
            |c| seen.lock().unwrap().push(c.index),
        )
        .unwrap();
        let seen = seen.into_inner().unwrap();
        assert_eq!(
            answered.iter().map(|c| c.index).collect::<Vec<_>>(),
            seen,
            "what was handed on is what is answered"
        );
        assert_eq!(seen, [0, 3], "no block read once told to stop");
    }

    #[test]
    fn readers_together_find_each_changed_block_once() {
        let dir = tempfile::tempdir().unwrap();
        let writes: Vec<(u64, Vec<u8>)> = (0..40u64)
            .map(|i| (i * 3 * B + i, format!("block {i}").into_bytes()))
            .collect();
        let writes: Vec<(u64, &[u8])> = writes.iter().map(|(at, d)| (*at, d.as_slice())).collect();
        let base = sparse(dir.path(), 128 * B, &writes);
        let parent = digests_of(&base);
        // Every fourth block rewritten, and two new ones.
        let work = dir.path().join("work");
        copy_sparse(&base, &File::create(&work).unwrap(), 0).unwrap();
        let w = std::fs::OpenOptions::new().write(true).open(&work).unwrap();
        for i in (0..40u64).step_by(4) {
            w.write_all_at(b"changed", i * 3 * B).unwrap();
        }
        w.write_all_at(b"new", 121 * B).unwrap();
        w.write_all_at(b"new", 127 * B).unwrap();
        let alone = all_changed(&work, Some(&parent));
        assert_eq!(alone.len(), 12);
        let heard = std::sync::Mutex::new(Vec::new());
        let together = changed_blocks(
            &work,
            Some(&parent),
            4,
            || true,
            |c| heard.lock().unwrap().push(c),
        )
        .unwrap();
        assert_eq!(together, alone, "in index order, with the same digests");
        let mut heard = heard.into_inner().unwrap();
        heard.sort_unstable_by_key(|c| c.index);
        assert_eq!(heard, alone, "each handed on once");
    }
}
