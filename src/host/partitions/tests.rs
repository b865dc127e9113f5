//! The partition tables of disks made here, and the root each layout gives.

use super::*;

fn blank_disk(dir: &Path, len: u64) -> std::path::PathBuf {
    let path = dir.join("disk.img");
    File::create(&path).unwrap().set_len(len).unwrap();
    path
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
    let whole = blank_disk(dir.path(), 2 << 20);
    assert_eq!(root_extent(&whole, None).unwrap(), None);
    assert!(matches!(
        root_extent(&whole, Some(1)),
        Err(PartitionError::NotPartitioned { wanted: 1, .. })
    ));
    write_mbr(&whole, &[(0x83, 2048, 4096), (0x82, 8192, 100)]);
    ext_magic_at(&whole, 2048 * 512);
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

fn ext_magic_at(disk: &Path, offset: u64) {
    let file = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    file.write_all_at(&[0x53, 0xEF], offset + 1024 + 0x38)
        .unwrap();
}

/// A GPT disk of 64 MiB with these (number, first MiB, MiB, type) partitions, made by sfdisk.
fn gpt_disk(path: &Path, parts: &[(u32, u64, u64, &str)]) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let mut script = String::from("label: gpt\n");
    for (number, first, size, kind) in parts {
        script += &format!(
            "{}{number} : start={}, size={}, type={kind}\n",
            path.display(),
            first * 2048,
            size * 2048
        );
    }
    let mut sfdisk = std::process::Command::new("sfdisk")
        .args(["-q", &path.display().to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = sfdisk.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, script.as_bytes()).unwrap();
    drop(stdin);
    assert!(sfdisk.wait().unwrap().success());
}

const LINUX: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

#[test]
fn the_root_is_found_from_the_images_own_layout() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    // RHEL's order: BIOS boot, EFI, /boot, root; /boot holds a filesystem as the root does.
    let rhel = [
        (1, 1, 1, BIOS_BOOT),
        (2, 2, 8, EFI_SYSTEM),
        (3, 10, 20, XBOOTLDR),
        (4, 30, 30, LINUX),
    ];
    gpt_disk(&disk, &rhel);
    let err = root_partition(&disk, None).unwrap_err().to_string();
    assert!(
        err.contains("no filesystem a root can live on")
            && err.contains("1 (no filesystem amibake reads, 1 MiB)"),
        "{err}"
    );
    ext_magic_at(&disk, 10 << 20);
    ext_magic_at(&disk, 30 << 20);
    assert_eq!(root_partition(&disk, None).unwrap(), Some(4));
    assert_eq!(root_extent(&disk, None).unwrap().unwrap().offset, 30 << 20);
    assert_eq!(
        root_partition(&disk, Some(3)).unwrap(),
        Some(3),
        "the template's word wins"
    );
    // A /boot typed as any Linux filesystem leaves two candidates: the template must say...
    gpt_disk(
        &disk,
        &[(1, 1, 1, BIOS_BOOT), (3, 10, 20, LINUX), (4, 30, 30, LINUX)],
    );
    ext_magic_at(&disk, 10 << 20);
    ext_magic_at(&disk, 30 << 20);
    let err = root_partition(&disk, None).unwrap_err().to_string();
    assert!(
        err.contains("3 (ext4, 20 MiB), 4 (ext4, 30 MiB)") && err.contains("bake.root_partition"),
        "{err}"
    );
    // ...unless one is typed as a root.
    gpt_disk(&disk, &[(3, 10, 20, LINUX), (4, 30, 30, ROOT_TYPES[0])]);
    ext_magic_at(&disk, 10 << 20);
    ext_magic_at(&disk, 30 << 20);
    assert_eq!(root_partition(&disk, None).unwrap(), Some(4));
    // AL2023's order: the root is 1 although it sits after 127 and 128.
    gpt_disk(
        &disk,
        &[
            (127, 1, 2, BIOS_BOOT),
            (128, 3, 7, EFI_SYSTEM),
            (1, 10, 50, LINUX),
        ],
    );
    ext_magic_at(&disk, 10 << 20);
    assert_eq!(root_partition(&disk, None).unwrap(), Some(1));
}

#[test]
fn a_partition_whose_filesystem_is_unread_could_be_the_root() {
    // An LVM or btrfs root beside an ext4 /boot typed as plain Linux: asking beats writing
    // the code into /boot while the real root goes untouched.
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    gpt_disk(&disk, &[(1, 1, 20, LINUX), (2, 30, 30, LINUX)]);
    ext_magic_at(&disk, 1 << 20);
    let err = root_partition(&disk, None).unwrap_err().to_string();
    assert!(
        err.contains("1 (ext4, 20 MiB), 2 (no filesystem amibake reads, 30 MiB)"),
        "{err}"
    );
    // Swap is never the root.
    gpt_disk(&disk, &[(1, 1, 20, LINUX), (2, 30, 30, LINUX_SWAP)]);
    ext_magic_at(&disk, 1 << 20);
    assert_eq!(root_partition(&disk, None).unwrap(), Some(1));
}

#[test]
fn a_crafted_table_is_an_error_never_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    gpt_disk(&disk, &[(1, 1, 20, LINUX)]);
    let file = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    // Entry 1 from LBA 0 to the last u64: its size overflows.
    file.write_all_at(&0u64.to_le_bytes(), 2 * 512 + 32)
        .unwrap();
    file.write_all_at(&u64::MAX.to_le_bytes(), 2 * 512 + 40)
        .unwrap();
    let err = root_partition(&disk, None).unwrap_err().to_string();
    assert!(err.contains("past any disk"), "{err}");
    // The entries' table at an LBA no disk has.
    file.write_all_at(&(1u64 << 60).to_le_bytes(), 512 + 72)
        .unwrap();
    let err = root_partition(&disk, Some(1)).unwrap_err().to_string();
    assert!(err.contains("past any disk"), "{err}");
    assert_eq!(
        root_partition(&disk, Some(0)).unwrap(),
        None,
        "0 reads nothing"
    );
}

#[test]
fn a_boot_sector_is_no_partition_table() {
    // A whole-disk filesystem's boot code ends in 55 AA too; its "entries" carry boot
    // flags the kernel refuses, and the disk is unpartitioned.
    let dir = tempfile::tempdir().unwrap();
    let disk = blank_disk(dir.path(), 4 << 20);
    write_mbr(&disk, &[(0x83, 2048, 4096)]);
    let file = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    file.write_all_at(&[0x12], 446).unwrap();
    assert_eq!(root_partition(&disk, None).unwrap(), None);
    // An extended partition holds logical ones, never a filesystem.
    file.write_all_at(&[0x00], 446).unwrap();
    write_mbr(&disk, &[(0x83, 2048, 2048), (0x05, 4096, 2048)]);
    ext_magic_at(&disk, 2048 * 512);
    let err = root_extent(&disk, Some(2)).unwrap_err().to_string();
    assert!(err.contains("lists 1"), "{err}");
}

#[test]
fn gpt_partitions_are_read_from_the_table() {
    let dir = tempfile::tempdir().unwrap();
    let disk = blank_disk(dir.path(), 4 << 20);
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
    // Untold, a partition of a type this does not know and a filesystem it does not read
    // could be the root as well as the ext4 one.
    ext_magic_at(&disk, 2048 * 512);
    let err = root_partition(&disk, None).unwrap_err().to_string();
    assert!(
        err.contains("2 (ext4, 2 MiB), 14 (no filesystem amibake reads, 0 MiB)"),
        "{err}"
    );
    let err = root_extent(&disk, Some(1)).unwrap_err().to_string();
    assert!(
        err.contains("no partition 1") && err.contains("lists 2, 14"),
        "{err}"
    );
}
