//! Tarballs as an attacker or a broken build makes them, and a canary on the host that no
//! extraction may touch.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tar::{Builder, EntryType, Header};

/// A directory on the host that no extraction may touch.
pub struct Canary {
    dir: tempfile::TempDir,
}

impl Canary {
    pub fn new() -> Canary {
        let dir = tempfile::Builder::new()
            .prefix("amibake-canary-")
            .tempdir()
            .unwrap();
        std::fs::write(dir.path().join("canary"), "untouched\n").unwrap();
        Canary { dir }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn file(&self) -> PathBuf {
        self.dir.path().join("canary")
    }
    pub fn assert_untouched(&self, case: &str) {
        let names: Vec<_> = std::fs::read_dir(self.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            ["canary"],
            "{case}: nothing new in the canary directory"
        );
        assert_eq!(
            std::fs::read_to_string(self.file()).unwrap(),
            "untouched\n",
            "{case}"
        );
        assert_eq!(
            std::fs::metadata(self.file()).unwrap().nlink(),
            1,
            "{case}: no hard link to the canary"
        );
    }
}

pub fn header(kind: EntryType, size: u64, mode: u32) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(1_700_000_000);
    h
}

/// Appends an entry whose name is written raw, bypassing the builder's own path checks, as
/// a hostile tarball would be made.
pub fn append_raw(
    b: &mut Builder<Vec<u8>>,
    kind: EntryType,
    name: &str,
    link: Option<&str>,
    data: &[u8],
) {
    let mut h = header(kind, data.len() as u64, 0o644);
    let raw = h.as_old_mut();
    raw.name = [0; 100];
    raw.name[..name.len()].copy_from_slice(name.as_bytes());
    if let Some(link) = link {
        raw.linkname = [0; 100];
        raw.linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    h.set_cksum();
    b.append(&h, data).unwrap();
}

pub fn tarball(build: impl FnOnce(&mut Builder<Vec<u8>>)) -> Vec<u8> {
    let mut b = Builder::new(Vec::new());
    build(&mut b);
    b.into_inner().unwrap()
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// What a composer build looks like: thousands of files in nested directories, links of
/// every kind, empty directories, executables, UTF-8 and long names. Returns the tarball and
/// the expected regular files (relative path → content).
pub fn composer_like() -> (Vec<u8>, BTreeMap<String, Vec<u8>>) {
    let mut files = BTreeMap::new();
    let mut b = Builder::new(Vec::new());
    for pkg in 0..40 {
        for file in 0..60 {
            let path = format!("vendor/pkg{pkg}/src/Sub{}/Class{file}.php", file % 4);
            let body = format!(
                "<?php // package {pkg} file {file}\n{}",
                "x".repeat((pkg * 37 + file * 11) % 900)
            )
            .into_bytes();
            files.insert(path, body);
        }
    }
    // A setuid root helper, as a careless build can ship: the image must not keep the bit.
    files.insert("bin/setuid-helper".into(), b"#!/bin/sh\nid -u\n".to_vec());
    files.insert(
        "bin/console".into(),
        b"#!/usr/bin/env php\n<?php echo 'hi';\n".to_vec(),
    );
    files.insert(
        "résumé/naïve-ünïcode.txt".into(),
        "héllo wörld\n".as_bytes().to_vec(),
    );
    let long = format!("deep/{}/{}.txt", "d".repeat(90), "long-name-".repeat(12));
    files.insert(
        long.clone(),
        b"long names need PAX or GNU headers\n".to_vec(),
    );
    for (path, body) in &files {
        let mode = match path.as_str() {
            "bin/console" => 0o755,
            "bin/setuid-helper" => 0o4755,
            _ => 0o644,
        };
        let mut h = header(EntryType::Regular, body.len() as u64, mode);
        b.append_data(&mut h, path, body.as_slice()).unwrap();
    }
    let mut dir = header(EntryType::Directory, 0, 0o755);
    b.append_data(&mut dir, "storage/cache/empty", std::io::empty())
        .unwrap();
    for (name, target) in [
        ("vendor/bin/console", "../../bin/console"),
        ("public/hostname-link", "/etc/hostname"),
    ] {
        let mut h = header(EntryType::Symlink, 0, 0o777);
        b.append_link(&mut h, name, target).unwrap();
    }
    let mut hard = header(EntryType::Link, 0, 0o644);
    b.append_link(&mut hard, "bin/console-hardlink", "bin/console")
        .unwrap();
    (b.into_inner().unwrap(), files)
}

/// Tarballs that are wrong on their own, whatever image they go into, each with the start of
/// what the check before any AWS call must say of it (the entry, as the extraction names
/// it): (name, bytes, refusal).
pub fn refused_on_their_own() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let gzipped = gzip(&composer_like().0);
    let mut bad_header = tarball(|b| append_raw(b, EntryType::Regular, "ok.txt", None, b"fine"));
    bad_header[150] ^= 0xff; // inside the header's checksummed bytes
    let bad_mode = tarball(|b| {
        let mut h = header(EntryType::Regular, 1, 0o644);
        h.set_path("bad-mode.txt").unwrap();
        h.as_mut_bytes()[100..108].copy_from_slice(b"9999999\0");
        h.set_cksum();
        b.append(&h, &b"x"[..]).unwrap();
    });
    vec![
        (
            "symlink-without-target",
            tarball(|b| append_raw(b, EntryType::Symlink, "s", None, b"")),
            "tarball entry 1 (s): a symlink without a target",
        ),
        (
            "bad-mode",
            bad_mode,
            "tarball entry 1 (bad-mode.txt): numeric field was not a number: 9999999 when getting mode",
        ),
        (
            "dot-dot",
            tarball(|b| append_raw(b, EntryType::Regular, "a/../../escape.txt", None, b"out")),
            "tarball entry 1 (a/../../escape.txt): its path leaves the destination (`..`)",
        ),
        (
            "dot-dot-second",
            tarball(|b| {
                append_raw(b, EntryType::Regular, "fine.txt", None, b"fine");
                append_raw(b, EntryType::Regular, "../escape.txt", None, b"out");
            }),
            "tarball entry 2 (../escape.txt): its path leaves the destination (`..`)",
        ),
        (
            "hard-link-dot-dot",
            tarball(|b| append_raw(b, EntryType::Link, "hl", Some("../../etc/shadow"), b"")),
            "tarball entry 1 (hl): its link target ../../etc/shadow leaves the destination",
        ),
        (
            "device",
            tarball(|b| append_raw(b, EntryType::Block, "sda", None, b"")),
            "tarball entry 1 (sda): device nodes are not allowed in an application tarball",
        ),
        (
            "fifo",
            tarball(|b| append_raw(b, EntryType::Fifo, "pipe", None, b"")),
            "tarball entry 1 (pipe): FIFOs are not allowed in an application tarball",
        ),
        (
            "bad-header",
            bad_header,
            "tarball is damaged or not a tar archive: at entry 1: ",
        ),
        (
            "not-a-tarball",
            b"<html><body>404 Not Found</body></html>\n".repeat(40),
            "tarball is damaged or not a tar archive: at entry 1: ",
        ),
        (
            "empty-file",
            Vec::new(),
            "the tarball holds no entries: an empty file, or only an archive's end",
        ),
        (
            "only-the-end",
            tarball(|_| {}),
            "the tarball holds no entries: an empty file, or only an archive's end",
        ),
        (
            "cut-short",
            gzipped[..gzipped.len() / 2].to_vec(),
            // The decompressor says where the stream ends too soon: in this entry's data.
            // Which entry follows from the compressor's output (`gzip`, flate2 at the
            // locked zlib-rs): another compressor may cut elsewhere.
            "tarball entry 1211 (vendor/pkg27/src/Sub0/Class32.php): its data cannot be read to its end: incomplete deflate stream",
        ),
        (
            "control-characters",
            tarball(|b| append_raw(b, EntryType::Regular, "evil\n\x1b[2J/../../x", None, b"x")),
            "tarball entry 1 (evil\\n\\u{1b}[2J/../../x): its path leaves the destination (`..`)",
        ),
    ]
}

/// Asserts that `composer_like()`'s tree is at `at` as it was made: every file byte for
/// byte, modes, mtimes, links, the empty directory, owned by `owner_uid`.
pub fn assert_composer_like_at(at: &Path, files: &BTreeMap<String, Vec<u8>>, owner_uid: u32) {
    for (path, body) in files {
        assert_eq!(&std::fs::read(at.join(path)).unwrap(), body, "{path}");
    }
    let console = std::fs::metadata(at.join("bin/console")).unwrap();
    assert_eq!(console.permissions().mode() & 0o777, 0o755, "exec bit kept");
    assert_eq!(console.mtime(), 1_700_000_000, "mtime kept");
    assert_eq!(
        std::fs::metadata(at.join("bin/setuid-helper"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o755,
        "the setuid bit is dropped"
    );
    assert_eq!(
        std::fs::metadata(at.join("bin/console-hardlink"))
            .unwrap()
            .ino(),
        console.ino(),
        "hard link kept"
    );
    assert_eq!(
        std::fs::read_link(at.join("vendor/bin/console")).unwrap(),
        Path::new("../../bin/console")
    );
    assert_eq!(
        std::fs::read_link(at.join("public/hostname-link")).unwrap(),
        Path::new("/etc/hostname")
    );
    assert!(
        at.join("storage/cache/empty").is_dir(),
        "empty directory kept"
    );
    assert_eq!(
        std::fs::symlink_metadata(at.join("vendor/bin/console"))
            .unwrap()
            .uid(),
        owner_uid,
        "owner from the image's passwd"
    );
    assert_eq!(
        std::fs::metadata(at.join("résumé/naïve-ünïcode.txt"))
            .unwrap()
            .gid(),
        owner_uid
    );
}

/// A gzipped tarball at `path` holding one file, `REVISION`, with `revision` in it: the
/// smallest code a bake can put into an image.
pub fn write_revision_tarball(path: &std::path::Path, revision: &str) {
    let tar = tarball(|b| {
        let mut header = tar::Header::new_gnu();
        header.set_size(revision.len() as u64);
        header.set_mode(0o644);
        b.append_data(&mut header, "REVISION", revision.as_bytes())
            .unwrap();
    });
    std::fs::write(path, gzip(&tar)).unwrap();
}
