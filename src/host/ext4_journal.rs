//! An ext4 root's internal journal, for the `direct` backend's upload. Once a filesystem is
//! cleanly unmounted its journal holds nothing to replay, and the journal's other bytes
//! are never read again: the bake's transactions left there are only blocks to upload.
//! Putting back the base's journal, itself clean, gives a filesystem just as valid (the
//! base's own state of the journal) and leaves those blocks unchanged from the parent's.
//!
//! Only what the superblocks say is trusted, and anything unexpected (not ext4, no
//! journal or an external one, recovery pending, a journal that moved or is laid out
//! deeper than its inode) means the journal is left as the bake wrote it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::host::disk_image::{holds_data, read_or_zeros};

const SUPERBLOCK_AT: u64 = 1024;
const EXT4_MAGIC: u16 = 0xEF53;
const COMPAT_HAS_JOURNAL: u32 = 0x4;
/// The journal has transactions to replay.
const INCOMPAT_RECOVER: u32 = 0x4;
/// The filesystem's journal is on another device.
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
/// `s_jnl_blocks` holds a copy of the journal inode's block map.
const JOURNAL_BACKUP_BLOCKS: u8 = 1;
const EXTENT_MAGIC: u16 = 0xF30A;
/// An extent longer than this is an unwritten one, of `len - UNWRITTEN` blocks.
const UNWRITTEN: u16 = 32768;
const JBD2_MAGIC: u32 = 0xC03B_3998;
const JBD2_SUPERBLOCK_V1: u32 = 3;
const JBD2_SUPERBLOCK_V2: u32 = 4;

/// A clean internal journal: its byte ranges (start, length) in the disk image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CleanJournal {
    pub ranges: Vec<(u64, u64)>,
}

impl CleanJournal {
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|(_, len)| len).sum()
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The journal of the ext4 filesystem that starts `fs_offset` bytes into `image`, if it is
/// an internal journal with nothing to replay; `None` for anything else.
pub fn clean_journal(image: &File, fs_offset: u64) -> io::Result<Option<CleanJournal>> {
    let mut sb = [0u8; 1024];
    image.read_exact_at(&mut sb, fs_offset + SUPERBLOCK_AT)?;
    let (compat, incompat) = (le32(&sb, 0x5C), le32(&sb, 0x60));
    if le16(&sb, 0x38) != EXT4_MAGIC
        || compat & COMPAT_HAS_JOURNAL == 0
        || incompat & (INCOMPAT_RECOVER | INCOMPAT_JOURNAL_DEV) != 0
        || le32(&sb, 0xE0) == 0
        || sb[0xFD] != JOURNAL_BACKUP_BLOCKS
    {
        return Ok(None);
    }
    let log_block_size = le32(&sb, 0x18);
    if log_block_size > 6 {
        return Ok(None);
    }
    let block_size = 1024u64 << log_block_size;
    // The journal inode's block map, as the superblock keeps a copy of it: an extent tree
    // whose root (in the inode itself) must hold the extents, not index blocks.
    let map = &sb[0x10C..0x10C + 60];
    let (entries, depth) = (le16(map, 2), le16(map, 6));
    if le16(map, 0) != EXTENT_MAGIC || depth != 0 || entries == 0 || entries > 4 {
        return Ok(None);
    }
    let mut ranges = Vec::new();
    let mut journal_blocks = 0u64;
    for i in 0..usize::from(entries) {
        let e = &map[12 + 12 * i..24 + 12 * i];
        let len = match le16(e, 4) {
            len if len > UNWRITTEN => len - UNWRITTEN,
            len => len,
        };
        let start = (u64::from(le16(e, 6)) << 32) | u64::from(le32(e, 8));
        ranges.push((fs_offset + start * block_size, u64::from(len) * block_size));
        journal_blocks += u64::from(len);
    }
    // The journal's own superblock, in its first block, must agree and be clean.
    let mut jsb = [0u8; 64];
    image.read_exact_at(&mut jsb, ranges[0].0)?;
    let clean = be32(&jsb, 0) == JBD2_MAGIC
        && matches!(be32(&jsb, 4), JBD2_SUPERBLOCK_V1 | JBD2_SUPERBLOCK_V2)
        && u64::from(be32(&jsb, 0x0C)) == block_size
        && u64::from(be32(&jsb, 0x10)) == journal_blocks
        && be32(&jsb, 0x1C) == 0;
    Ok(clean.then_some(CleanJournal { ranges }))
}

/// Puts `base`'s journal back into `copy` (the same disk after a bake), where both hold the
/// same clean journal of the filesystem at `fs_offset`. Answers the bytes put back: only
/// where the two differ, so holes the bake left alone stay holes (and are not read). Not
/// synced: `copy` is read back through this host's page cache.
pub fn restore_base_journal(copy: &File, base: &File, fs_offset: u64) -> io::Result<u64> {
    let (Some(ours), Some(theirs)) = (
        clean_journal(copy, fs_offset)?,
        clean_journal(base, fs_offset)?,
    ) else {
        return Ok(0);
    };
    if ours != theirs {
        return Ok(0);
    }
    const CHUNK: usize = 1 << 20;
    let (mut was, mut now) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut restored = 0;
    for &(start, len) in &ours.ranges {
        let mut at = 0;
        while at < len {
            let n = CHUNK.min((len - at) as usize);
            let (from, to) = (start + at, start + at + n as u64);
            if !holds_data(base, from, to)? && !holds_data(copy, from, to)? {
                at += n as u64;
                continue;
            }
            read_or_zeros(base, &mut was[..n], start + at)?;
            read_or_zeros(copy, &mut now[..n], start + at)?;
            if was[..n] != now[..n] {
                copy.write_all_at(&was[..n], start + at)?;
                restored += n as u64;
            }
            at += n as u64;
        }
    }
    Ok(restored)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const PAD: u64 = 1 << 20;

    /// A 64 MiB disk image whose ext4 filesystem (with a 4 MiB journal) starts 1 MiB in,
    /// as a partition's would.
    fn disk(dir: &Path, name: &str) -> File {
        let path = dir.join(name);
        let made = std::process::Command::new("mkfs.ext4")
            .args(["-F", "-q", "-J", "size=4", "-E"])
            .arg(format!("offset={PAD}"))
            .arg(&path)
            .arg("63M")
            .stdout(std::process::Stdio::null())
            .status()
            .expect("mkfs.ext4 runs");
        assert!(made.success());
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    fn copy_of(dir: &Path, from: &str, to: &str) -> File {
        std::fs::copy(dir.join(from), dir.join(to)).unwrap();
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join(to))
            .unwrap()
    }

    fn bytes(file: &File) -> Vec<u8> {
        let mut all = vec![0u8; file.metadata().unwrap().len() as usize];
        file.read_exact_at(&mut all, 0).unwrap();
        all
    }

    #[test]
    fn a_fresh_filesystems_journal_is_found_and_clean() {
        let dir = tempfile::tempdir().unwrap();
        let image = disk(dir.path(), "disk.img");
        let journal = clean_journal(&image, PAD)
            .unwrap()
            .expect("a clean journal");
        assert_eq!(journal.bytes(), 4 << 20);
        assert!(journal.ranges.iter().all(|(start, _)| *start > PAD));
        // Read at the wrong offset, there is no filesystem, so no journal.
        assert_eq!(clean_journal(&image, 0).unwrap(), None);
    }

    #[test]
    fn what_a_bake_left_in_the_journal_is_put_back_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let base = disk(dir.path(), "base.img");
        let copy = copy_of(dir.path(), "base.img", "copy.img");
        let journal = clean_journal(&base, PAD).unwrap().unwrap();
        let (start, len) = journal.ranges[0];
        // Transactions after the journal's superblock, and a change outside the journal.
        copy.write_all_at(&[0xAB; 8192], start + 4096).unwrap();
        copy.write_all_at(&[0xCD; 512], start + len + 4096).unwrap();
        let restored = restore_base_journal(&copy, &base, PAD).unwrap();
        assert!(restored >= 8192, "{restored} bytes put back");
        let (was, now) = (bytes(&base), bytes(&copy));
        let outside = (start + len + 4096) as usize;
        assert_eq!(now[outside..outside + 512], [0xCD; 512], "kept outside");
        assert_eq!(now[..outside], was[..outside], "the journal is the base's");
        assert_eq!(now[outside + 512..], was[outside + 512..]);
    }

    #[test]
    fn what_a_bake_wrote_where_the_base_journal_is_a_hole_is_put_back_as_zeros() {
        const MIB: u64 = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let base = disk(dir.path(), "base.img");
        let (start, len) = clean_journal(&base, PAD).unwrap().unwrap().ranges[0];
        assert_eq!(len, 4 * MIB);
        // All but the journal's first MiB a hole in both, as an unwritten journal is; its
        // third MiB holds no data at all (the edges of the hole are zeroed, not freed, where
        // they cut this host's blocks), and the bake writes into the fourth.
        let punch = rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE;
        rustix::fs::fallocate(&base, punch, start + MIB, len - MIB).unwrap();
        let copy = copy_of(dir.path(), "base.img", "copy.img");
        rustix::fs::fallocate(&copy, punch, start + MIB, len - MIB).unwrap();
        copy.write_all_at(&[0xAB; 4096], start + 3 * MIB + 8192)
            .unwrap();
        let restored = restore_base_journal(&copy, &base, PAD).unwrap();
        assert_eq!(restored, MIB, "the one MiB written, and no other");
        assert_eq!(bytes(&copy), bytes(&base), "the journal is the base's");
        // Less the end, whose host block the write of the fourth MiB shares.
        let third = (start + 2 * MIB, start + 3 * MIB - 4096);
        assert!(
            !holds_data(&copy, third.0, third.1).unwrap(),
            "a hole the bake left alone stays a hole"
        );
    }

    #[test]
    fn a_journal_with_transactions_to_replay_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let base = disk(dir.path(), "base.img");
        let copy = copy_of(dir.path(), "base.img", "copy.img");
        let (start, _) = clean_journal(&base, PAD).unwrap().unwrap().ranges[0];
        copy.write_all_at(&[0xAB; 4096], start + 4096).unwrap();
        // s_start: where replay would begin.
        copy.write_all_at(&1u32.to_be_bytes(), start + 0x1C)
            .unwrap();
        assert_eq!(clean_journal(&copy, PAD).unwrap(), None);
        let before = bytes(&copy);
        assert_eq!(restore_base_journal(&copy, &base, PAD).unwrap(), 0);
        assert_eq!(bytes(&copy), before, "not a byte changed");
        // Nor when the base is the one with something to replay.
        assert_eq!(restore_base_journal(&base, &copy, PAD).unwrap(), 0);
    }
}
