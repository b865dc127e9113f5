//! Tarballs as an attacker or a broken build makes them, and a canary on the host that no
//! extraction may touch.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
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
