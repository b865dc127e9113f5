//! What filesystem a partition holds, read from its superblock as blkid reads it: the kind,
//! UUID and label. The root of an image is found from the image's own layout with it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    /// ext2, ext3 or ext4: one superblock, one magic.
    Ext,
    Xfs,
    Vfat,
}

impl std::fmt::Display for FsKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FsKind::Ext => "ext4",
            FsKind::Xfs => "xfs",
            FsKind::Vfat => "vfat",
        })
    }
}

impl FsKind {
    /// Whether a Linux root can live on it.
    pub fn can_hold_a_root(self) -> bool {
        matches!(self, FsKind::Ext | FsKind::Xfs)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filesystem {
    pub kind: FsKind,
    /// As fstab's `UUID=` writes it: 8-4-4-4-12 hex, or XXXX-XXXX for FAT.
    pub uuid: String,
    pub label: String,
}

/// The filesystem starting `offset` bytes into `disk`, or `None` when no superblock this
/// knows is there (a BIOS boot partition, swap, nothing).
pub fn probe(disk: &File, offset: u64) -> io::Result<Option<Filesystem>> {
    let mut head = [0u8; 2048];
    let read = disk.read_at(&mut head, offset)?;
    if read < head.len() {
        return Ok(None);
    }
    Ok(ext(&head).or_else(|| xfs(&head)).or_else(|| vfat(&head)))
}

fn ext(head: &[u8; 2048]) -> Option<Filesystem> {
    let sb = &head[1024..];
    (sb[0x38..0x3A] == [0x53, 0xEF]).then(|| Filesystem {
        kind: FsKind::Ext,
        uuid: uuid_text(&sb[0x68..0x78]),
        label: text(&sb[0x78..0x88]),
    })
}

fn xfs(head: &[u8; 2048]) -> Option<Filesystem> {
    (&head[..4] == b"XFSB").then(|| Filesystem {
        kind: FsKind::Xfs,
        uuid: uuid_text(&head[32..48]),
        label: text(&head[108..120]),
    })
}

fn vfat(head: &[u8; 2048]) -> Option<Filesystem> {
    if head[510..512] != [0x55, 0xAA] {
        return None;
    }
    // FAT32 keeps its volume id and label further in than FAT12/16.
    let (id, label) = if &head[0x52..0x57] == b"FAT32" {
        (0x43, 0x47)
    } else if &head[0x36..0x39] == b"FAT" {
        (0x27, 0x2B)
    } else {
        return None;
    };
    let id = u32::from_le_bytes(head[id..id + 4].try_into().expect("4 bytes"));
    let label = text(&head[label..label + 11]);
    Some(Filesystem {
        kind: FsKind::Vfat,
        uuid: format!("{:04X}-{:04X}", id >> 16, id & 0xFFFF),
        label: if label == "NO NAME" {
            String::new()
        } else {
            label
        },
    })
}

fn uuid_text(b: &[u8]) -> String {
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// A label as the image wrote it, its control characters escaped: it is printed in errors,
/// and an image must not drive the operator's terminal.
fn text(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end])
        .trim_end()
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::Command;

    /// A filesystem made by its own mkfs in a file, at `offset` bytes into it.
    fn made(dir: &Path, mkfs: &[&str], offset: u64) -> File {
        let fs = dir.join("fs.img");
        let f = File::create(&fs).unwrap();
        f.set_len(320 << 20).unwrap();
        let out = Command::new(mkfs[0])
            .args(&mkfs[1..])
            .arg(&fs)
            .output()
            .unwrap();
        assert!(out.status.success(), "{mkfs:?}: {out:?}");
        let disk = dir.join("disk.img");
        let bytes = std::fs::read(&fs).unwrap();
        let d = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&disk)
            .unwrap();
        d.write_all_at(&bytes, offset).unwrap();
        d
    }

    #[test]
    fn a_label_cannot_drive_a_terminal() {
        let dir = tempfile::tempdir().unwrap();
        let disk = made(
            dir.path(),
            &["mkfs.ext4", "-q", "-F", "-L", "\x1b[2Kroot"],
            0,
        );
        let found = probe(&disk, 0).unwrap().expect("a filesystem");
        assert_eq!(found.label, "\\u{1b}[2Kroot");
    }

    #[test]
    fn each_kind_is_read_as_blkid_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let uuid = "3aa4f5a4-9b57-4cb5-a2fa-12e4a7b5cb0f";
        let cases: [(&[&str], FsKind, &str, &str); 3] = [
            (
                &["mkfs.ext4", "-q", "-F", "-L", "cloudimg-rootfs", "-U", uuid],
                FsKind::Ext,
                uuid,
                "cloudimg-rootfs",
            ),
            (
                &[
                    "mkfs.xfs",
                    "-q",
                    "-f",
                    "-L",
                    "/",
                    "-m",
                    &format!("uuid={uuid}"),
                ],
                FsKind::Xfs,
                uuid,
                "/",
            ),
            (
                &["mkfs.vfat", "-n", "UEFI", "-i", "036CA294"],
                FsKind::Vfat,
                "036C-A294",
                "UEFI",
            ),
        ];
        for (mkfs, kind, uuid, label) in cases {
            let disk = made(dir.path(), mkfs, 1 << 20);
            let found = probe(&disk, 1 << 20).unwrap().expect("a filesystem");
            assert_eq!(
                found,
                Filesystem {
                    kind,
                    uuid: uuid.into(),
                    label: label.into()
                },
                "{mkfs:?}"
            );
            assert_eq!(probe(&disk, 0).unwrap(), None, "nothing before it");
        }
    }
}
