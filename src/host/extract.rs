//! Putting the code tarball into the image, resolving every path as the booted image would
//! and never reaching the build host.
//!
//! The unpacking runs in a child process (this binary, `internal-extract`) that first leaves
//! the host's namespaces and chroots into the image with only the capabilities to create and
//! own files (`sandbox`), before any host filesystem is mounted into the image. Inside, every
//! path goes through `image_root`: `dest` is resolved as the image resolves it (its
//! `/var/www -> /srv/www` leads to its own `/srv/www`), and each entry is placed below
//! `dest` with `RESOLVE_BENEATH`, so neither `..`, an absolute path, a symlink from the
//! tarball or one already in the image, nor a `/proc/<pid>/root` magic link can take a write
//! anywhere else. Device nodes and FIFOs are refused; setuid and setgid bits are dropped
//! unless the template keeps them.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};
use tar::EntryType;

use super::image_root::{self, ImageRoot};
use crate::engine::events::printable;
use crate::sandbox;

/// A user and group of the image, by number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// What an extraction put into the image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extracted {
    pub files: u64,
    pub bytes: u64,
    /// Files whose setuid or setgid bit was dropped.
    #[serde(default)]
    pub setuid_dropped: u64,
}

/// How the tarball goes into the image: the template's `dest`, `owner`, `keep_setuid`.
#[derive(Debug, Clone, Default)]
pub struct ExtractSpec {
    /// The destination directory, as the image names it.
    pub dest: String,
    /// `user` or `user:group` of the image, for every entry, `dest` and the directories
    /// made on the way to it.
    pub owner: Option<String>,
    pub keep_setuid: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("tarball entry {index} ({path}): {reason}")]
    Entry {
        index: u64,
        path: String,
        reason: String,
    },
    #[error("tarball is damaged or not a tar archive: {0}")]
    Corrupt(String),
    /// No bake means to deliver nothing: an empty artifact is a build that went wrong.
    #[error("the tarball holds no entries: an empty file, or only an archive's end")]
    Empty,
    #[error("owner `{spec}`: {reason}")]
    Owner { spec: String, reason: String },
    #[error(transparent)]
    Sandbox(#[from] sandbox::SandboxError),
    #[error("cannot create {dest} in the image: {reason}")]
    Dest { dest: String, reason: String },
    /// The child could not start, ended on a signal, or failed other than on the tarball.
    #[error("{0}")]
    Child(String),
    /// What a child said of a tarball it refused (an entry, a damaged archive, no entries).
    #[error("{0}")]
    Refused(String),
    #[error("cannot read the tarball {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

// Magic numbers at the start of a compressed stream.
const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// Mode of the directories made on the way to an entry the tarball does not list itself.
const IMPLIED_DIR_MODE: u32 = 0o755;
/// The setuid and setgid bits.
const SET_ID_BITS: u32 = 0o6000;

/// Wraps `input` in the decompressor its first bytes call for: gzip, zstd, or none.
fn decompressed<'a>(input: impl Read + 'a) -> Result<Box<dyn Read + 'a>, ExtractError> {
    let mut input = BufReader::new(input);
    let head = input
        .fill_buf()
        .map_err(|e| ExtractError::Corrupt(e.to_string()))?
        .to_vec();
    Ok(if head.starts_with(GZIP_MAGIC) {
        Box::new(flate2::read::MultiGzDecoder::new(input))
    } else if head.starts_with(ZSTD_MAGIC) {
        Box::new(
            zstd::stream::read::Decoder::with_buffer(input)
                .map_err(|e| ExtractError::Corrupt(e.to_string()))?,
        )
    } else {
        Box::new(input)
    })
}

/// Unpacks a tar stream into `spec.dest` of `image`. `on_progress` hears the running totals
/// after each entry.
pub fn unpack(
    input: impl Read,
    image: &ImageRoot,
    spec: &ExtractSpec,
    owner: Option<Owner>,
    mut on_progress: impl FnMut(Extracted),
) -> Result<Extracted, ExtractError> {
    let dest_error = |reason: String| ExtractError::Dest {
        dest: spec.dest.clone(),
        reason,
    };
    let (dest, made) = image
        .create_dirs(&spec.dest, IMPLIED_DIR_MODE)
        .map_err(|e| dest_error(e.to_string()))?;
    if let Some(owner) = owner {
        // `dest` itself and every directory made on the way to it belong to the owner too.
        for path in made.iter().map(String::as_str).chain([spec.dest.as_str()]) {
            let dir = image
                .open_at(path, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())
                .map_err(|e| dest_error(format!("{path}: {e}")))?;
            set_owner(dir.as_fd(), "", owner).map_err(|e| dest_error(format!("{path}: {e}")))?;
        }
    }
    let mut writer = Writer {
        dest,
        owner,
        keep_setuid: spec.keep_setuid,
        parent: None,
        dir_times: Vec::new(),
    };
    let mut done = Extracted::default();
    each_entry(input, |entry, path| {
        let size = entry.header().size().unwrap_or(0);
        let admitted = admit(entry, path)?;
        let placed = writer.place(entry, admitted)?;
        done.setuid_dropped += u64::from(placed.setuid_dropped);
        done.files += 1;
        done.bytes += size;
        on_progress(done);
        Ok(())
    })?;
    writer.finish().map_err(|e| dest_error(e.to_string()))?;
    Ok(done)
}

/// Reads a whole tarball as `unpack` would and writes nothing: every check that needs no
/// image (`admit`), and every entry's data read to its end, so a damaged or cut-short
/// tarball is refused too, as is one with no entries. Answers what it holds.
pub fn check_entries(
    input: impl Read,
    on_progress: &mut dyn FnMut(Extracted),
) -> Result<Extracted, ExtractError> {
    let mut held = Extracted::default();
    each_entry(input, |entry, path| {
        admit(entry, path)?;
        let size = entry.header().size().unwrap_or(0);
        std::io::copy(entry, &mut std::io::sink())
            .map_err(|e| format!("its data cannot be read to its end: {e}"))?;
        held.files += 1;
        held.bytes += size;
        on_progress(held);
        Ok(())
    })?;
    if held.files == 0 {
        return Err(ExtractError::Empty);
    }
    Ok(held)
}

/// Reads the tar stream in `input` (compressed or not) entry by entry. `on_entry` gets each
/// entry and its path; what it refuses is named by the entry's number (from 1) and path.
fn each_entry<'a>(
    input: impl Read + 'a,
    mut on_entry: impl FnMut(&mut tar::Entry<'_, Box<dyn Read + 'a>>, &str) -> Result<(), String>,
) -> Result<(), ExtractError> {
    let mut archive = tar::Archive::new(decompressed(input)?);
    let entries = archive
        .entries()
        .map_err(|e| ExtractError::Corrupt(printable(&e.to_string())))?;
    for (index, entry) in entries.enumerate() {
        let index = index as u64 + 1;
        let mut entry = entry.map_err(|e| {
            ExtractError::Corrupt(format!("at entry {index}: {}", printable(&e.to_string())))
        })?;
        if entry.header().entry_type() == EntryType::XGlobalHeader {
            // `git archive` puts the commit here; it names no file.
            continue;
        }
        let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        on_entry(&mut entry, &path).map_err(|reason| ExtractError::Entry {
            index,
            path: printable(&path),
            reason: printable(&reason),
        })?;
    }
    Ok(())
}

/// An entry that passed the checks that need no image.
struct Admitted {
    kind: EntryType,
    /// Its permission bits, as the tarball gives them.
    mode: u32,
    /// Where below `dest` it goes, part by part (a sparse file's real name).
    parts: Vec<String>,
    sparse: Option<SparseMap>,
    /// A symlink's target, as the tarball gives it.
    symlink_target: Option<Vec<u8>>,
    /// A hard link's target.
    link_target: Option<LinkTarget>,
}

/// Where a hard link points below `dest`: its directory and name there, and the target as
/// the tarball names it, for errors.
struct LinkTarget {
    dir: String,
    leaf: String,
    named: String,
}

/// What the tarball alone decides about an entry: its kind is one an application tarball
/// may hold, its header can be read, a link has a target, and neither its path nor a hard
/// link's target climbs out with `..`.
fn admit(entry: &mut tar::Entry<impl Read>, path: &str) -> Result<Admitted, String> {
    let kind = entry.header().entry_type();
    match kind {
        EntryType::Char | EntryType::Block => {
            return Err("device nodes are not allowed in an application tarball".into())
        }
        EntryType::Fifo => return Err("FIFOs are not allowed in an application tarball".into()),
        EntryType::Regular
        | EntryType::Continuous
        | EntryType::GNUSparse
        | EntryType::Directory
        | EntryType::Symlink
        | EntryType::Link => {}
        other => return Err(format!("unsupported entry type {other:?}")),
    }
    let mode = entry.header().mode().map_err(|e| e.to_string())? & 0o7777;
    let sparse = pax_sparse_map(entry)?;
    let name = sparse.as_ref().map_or(path, |s| s.name.as_str());
    let parts = owned_parts(name).map_err(|_| "its path leaves the destination (`..`)")?;
    let symlink_target = if kind == EntryType::Symlink {
        let target = entry
            .link_name_bytes()
            .ok_or("a symlink without a target")?;
        Some(target.into_owned())
    } else {
        None
    };
    let link_target = if kind == EntryType::Link {
        let target = entry
            .link_name_bytes()
            .ok_or("a hard link without a target")?;
        let target = String::from_utf8_lossy(&target).into_owned();
        let target_parts = owned_parts(&target)
            .map_err(|_| format!("its link target {target} leaves the destination"))?;
        let (leaf, dir) = target_parts
            .split_last()
            .ok_or("a hard link to the destination itself")?;
        Some(LinkTarget {
            dir: dir.join("/"),
            leaf: leaf.clone(),
            named: target,
        })
    } else {
        None
    };
    Ok(Admitted {
        kind,
        mode,
        parts,
        sparse,
        symlink_target,
        link_target,
    })
}

fn owned_parts(path: &str) -> std::io::Result<Vec<String>> {
    Ok(image_root::normal_parts(path)?
        .into_iter()
        .map(str::to_string)
        .collect())
}

/// What placing one entry did.
struct Placed {
    setuid_dropped: bool,
}

/// Puts entries below `dest`, one at a time.
struct Writer {
    dest: OwnedFd,
    owner: Option<Owner>,
    keep_setuid: bool,
    /// The directory of the previous entry: most entries share their neighbour's.
    parent: Option<(String, OwnedFd)>,
    /// Directories' modification times, set at the end: their entries would change them.
    dir_times: Vec<(String, u64)>,
}

impl Writer {
    fn place(
        &mut self,
        entry: &mut tar::Entry<impl Read>,
        admitted: Admitted,
    ) -> Result<Placed, String> {
        let Admitted {
            kind,
            mut mode,
            parts,
            sparse,
            symlink_target,
            link_target,
        } = admitted;
        let Some((leaf, parents)) = parts.split_last() else {
            // `./`: the destination itself, already made.
            return Ok(Placed {
                setuid_dropped: false,
            });
        };
        let leaf = leaf.as_str();
        let parent_path = parents.join("/");
        self.open_parent(&parent_path)?;
        let parent = match &self.parent {
            Some((_, fd)) => fd.as_fd(),
            None => unreachable!("open_parent sets it"),
        };
        let header = entry.header();
        let mtime = header.mtime().unwrap_or(0);
        let mut setuid_dropped = false;
        if kind != EntryType::Directory && !self.keep_setuid && mode & SET_ID_BITS != 0 {
            mode &= !SET_ID_BITS;
            setuid_dropped = true;
        }
        match kind {
            EntryType::Directory => {
                make_dir(parent, leaf)?;
                let dir = open_entry(parent, leaf, OFlags::RDONLY | OFlags::DIRECTORY)?;
                if let Some(owner) = self.owner {
                    set_owner(dir.as_fd(), "", owner)
                        .map_err(|e| format!("cannot change its owner: {e}"))?;
                }
                rustix::fs::fchmod(&dir, Mode::from_raw_mode(mode)).map_err(|e| e.to_string())?;
                let rel = if parent_path.is_empty() {
                    leaf.to_string()
                } else {
                    format!("{parent_path}/{leaf}")
                };
                self.dir_times.push((rel, mtime));
            }
            EntryType::Symlink => {
                let target = symlink_target.expect("admit gives every symlink its target");
                clear_for(parent, leaf)?;
                rustix::fs::symlinkat(target.as_slice(), parent, leaf)
                    .map_err(|e| format!("cannot make the symlink: {e}"))?;
                if let Some(owner) = self.owner {
                    set_owner(parent, leaf, owner)
                        .map_err(|e| format!("cannot change its owner: {e}"))?;
                }
                rustix::fs::utimensat(parent, leaf, &times(mtime), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| e.to_string())?;
            }
            EntryType::Link => {
                let LinkTarget {
                    dir,
                    leaf: target_leaf,
                    named: target,
                } = link_target.expect("admit gives every hard link its target");
                let target_dir = image_root::open_below(
                    self.dest.as_fd(),
                    &dir,
                    OFlags::PATH | OFlags::DIRECTORY,
                )
                .map_err(|e| below_error(&e, &format!("its link target {target}")))?;
                clear_for(parent, leaf)?;
                rustix::fs::linkat(
                    &target_dir,
                    target_leaf.as_str(),
                    parent,
                    leaf,
                    AtFlags::empty(),
                )
                .map_err(|e| match e {
                    Errno::NOENT => {
                        format!("its link target {target} is not in the destination")
                    }
                    e => format!("cannot make the hard link to {target}: {e}"),
                })?;
            }
            _ => {
                clear_for(parent, leaf)?;
                let fd = rustix::fs::openat(
                    parent,
                    leaf,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| format!("cannot create it: {e}"))?;
                let mut file = std::fs::File::from(fd);
                let size = header.size().unwrap_or(0);
                let written = match sparse {
                    Some(map) => write_sparse(entry, &mut file, &map),
                    None => std::io::copy(entry, &mut file).map(|_| ()),
                };
                written.map_err(|e| write_error(&e, &file, size))?;
                if let Some(owner) = self.owner {
                    // Before the mode: a change of owner clears setuid bits.
                    set_owner(file.as_fd(), "", owner)
                        .map_err(|e| format!("cannot change its owner: {e}"))?;
                }
                rustix::fs::fchmod(&file, Mode::from_raw_mode(mode)).map_err(|e| e.to_string())?;
                rustix::fs::futimens(&file, &times(mtime)).map_err(|e| e.to_string())?;
            }
        }
        Ok(Placed { setuid_dropped })
    }

    /// Opens the directory `relative` below `dest` as `self.parent`, made as needed (owned
    /// like the entries).
    fn open_parent(&mut self, relative: &str) -> Result<(), String> {
        let cached = matches!(&self.parent, Some((path, _)) if path == relative);
        if !cached {
            let (dir, made) =
                image_root::create_dirs_below(self.dest.as_fd(), relative, IMPLIED_DIR_MODE)
                    .map_err(|e| below_error(&e, "its path"))?;
            if let Some(owner) = self.owner {
                for path in &made {
                    let made_dir = image_root::open_below(
                        self.dest.as_fd(),
                        path,
                        OFlags::PATH | OFlags::DIRECTORY,
                    )
                    .map_err(|e| e.to_string())?;
                    set_owner(made_dir.as_fd(), "", owner)
                        .map_err(|e| format!("cannot change the owner of {path}: {e}"))?;
                }
            }
            self.parent = Some((relative.to_string(), dir));
        }
        Ok(())
    }

    /// Dates the directories, deepest last-listed first, once nothing more goes into them.
    fn finish(self) -> std::io::Result<()> {
        for (path, mtime) in self.dir_times.iter().rev() {
            let dir = image_root::open_below(
                self.dest.as_fd(),
                path,
                OFlags::RDONLY | OFlags::DIRECTORY,
            )?;
            rustix::fs::futimens(&dir, &times(*mtime))?;
        }
        Ok(())
    }
}

fn below_error(e: &std::io::Error, what: &str) -> String {
    if image_root::is_escape(e) {
        format!("{what} leaves the destination through a symlink")
    } else {
        format!("{what}: {e}")
    }
}

/// Running out of space names what was needed and what was left.
fn write_error(e: &std::io::Error, file: &std::fs::File, size: u64) -> String {
    if e.raw_os_error() == Some(Errno::NOSPC.raw_os_error()) {
        let free = rustix::fs::fstatvfs(file)
            .map(|s| s.f_bavail * s.f_frsize)
            .unwrap_or(0);
        format!(
            "no space left in the image: the entry needs {size} bytes and {free} bytes are free \
             on its filesystem; raise `root_volume_size_gb`"
        )
    } else {
        format!("cannot write it: {e}")
    }
}

fn times(mtime: u64) -> Timestamps {
    let t = Timespec {
        tv_sec: mtime as i64,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

fn set_owner(dir: BorrowedFd<'_>, name: &str, owner: Owner) -> std::io::Result<()> {
    let flags = if name.is_empty() {
        AtFlags::EMPTY_PATH
    } else {
        AtFlags::SYMLINK_NOFOLLOW
    };
    Ok(rustix::fs::chownat(
        dir,
        name,
        Some(rustix::fs::Uid::from_raw(owner.uid)),
        Some(rustix::fs::Gid::from_raw(owner.gid)),
        flags,
    )?)
}

fn open_entry(parent: BorrowedFd<'_>, name: &str, flags: OFlags) -> Result<OwnedFd, String> {
    rustix::fs::openat(
        parent,
        name,
        flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| e.to_string())
}

/// A directory entry over whatever is there: kept if it is a directory, else replaced (as
/// tar does: a symlink there is removed, never followed).
fn make_dir(parent: BorrowedFd<'_>, name: &str) -> Result<(), String> {
    match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700)) {
        Ok(()) => Ok(()),
        Err(Errno::EXIST) => {
            let there = image_root::file_type_at(parent, name).map_err(|e| e.to_string())?;
            if there == Some(FileType::Directory) {
                return Ok(());
            }
            rustix::fs::unlinkat(parent, name, AtFlags::empty()).map_err(|e| e.to_string())?;
            rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700)).map_err(|e| e.to_string())
        }
        Err(e) => Err(format!("cannot make the directory: {e}")),
    }
}

/// Makes room for a file, link or symlink: whatever non-directory is there goes.
fn clear_for(parent: BorrowedFd<'_>, name: &str) -> Result<(), String> {
    match image_root::remove_unless_dir_at(parent, name) {
        Ok(true) => Ok(()),
        Ok(false) => Err("a directory of that name is already there".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// A sparse file as GNU tar writes it in the POSIX format (`--sparse --format=posix`,
/// sparse format 1.0): the real name and size in PAX keys, a map of data regions at the
/// start of the entry's data.
struct SparseMap {
    name: String,
    real_size: u64,
}

fn pax_sparse_map(entry: &mut tar::Entry<impl Read>) -> Result<Option<SparseMap>, String> {
    let Some(extensions) = entry.pax_extensions().map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let mut keys = HashMap::new();
    for ext in extensions.flatten() {
        if let (Ok(k), Ok(v)) = (ext.key(), ext.value()) {
            if k.starts_with("GNU.sparse.") {
                keys.insert(k.to_string(), v.to_string());
            }
        }
    }
    if keys.is_empty() {
        return Ok(None);
    }
    if keys.get("GNU.sparse.major").map(String::as_str) != Some("1") {
        return Err("a sparse file in GNU's old sparse formats 0.0/0.1; make the tarball with GNU tar 1.28 or later, or without --sparse".into());
    }
    let name = keys
        .get("GNU.sparse.name")
        .cloned()
        .ok_or("a sparse file without GNU.sparse.name")?;
    let real_size = keys
        .get("GNU.sparse.realsize")
        .and_then(|s| s.parse().ok())
        .ok_or("a sparse file without GNU.sparse.realsize")?;
    Ok(Some(SparseMap { name, real_size }))
}

/// Writes a sparse 1.0 entry's data regions at their offsets; the holes stay holes.
fn write_sparse(
    data: &mut impl Read,
    file: &mut std::fs::File,
    map: &SparseMap,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let bad = |what: &str| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("sparse map: {what}"),
        )
    };
    // The map: decimal numbers, one a line (count, then offset and size pairs), padded to
    // a 512-byte block.
    let mut consumed = 0u64;
    let mut line = Vec::new();
    let mut number = |data: &mut dyn Read, consumed: &mut u64| -> std::io::Result<u64> {
        line.clear();
        let mut byte = [0u8];
        loop {
            data.read_exact(&mut byte)?;
            *consumed += 1;
            if byte[0] == b'\n' {
                break;
            }
            line.push(byte[0]);
        }
        std::str::from_utf8(&line)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("not a number"))
    };
    let count = number(data, &mut consumed)?;
    let mut regions = Vec::new();
    for _ in 0..count {
        let offset = number(data, &mut consumed)?;
        let size = number(data, &mut consumed)?;
        regions.push((offset, size));
    }
    let padding = (512 - consumed % 512) % 512;
    std::io::copy(&mut data.take(padding), &mut std::io::sink())?;
    let mut buf = vec![0u8; 64 * 1024];
    for (offset, size) in regions {
        let mut at = offset;
        let mut left = size;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            data.read_exact(&mut buf[..n])?;
            file.write_all_at(&buf[..n], at)?;
            at += n as u64;
            left -= n as u64;
        }
    }
    file.set_len(map.real_size)
}

/// `user` or `user:group`, by name or number, looked up in the image's own /etc/passwd and
/// /etc/group, which `read_etc` reads by name.
pub fn resolve_owner(
    spec: &str,
    read_etc: impl Fn(&str) -> std::io::Result<Vec<u8>>,
) -> Result<Owner, ExtractError> {
    let fail = |reason: String| ExtractError::Owner {
        spec: spec.into(),
        reason,
    };
    let table = |file: &str| -> Result<HashMap<String, (u32, u32)>, ExtractError> {
        let bytes = read_etc(file)
            .map_err(|e| fail(format!("cannot read the image's /etc/{file}: {e}")))?;
        Ok(String::from_utf8_lossy(&bytes)
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split(':').collect();
                let id = fields.get(2)?.parse().ok()?;
                let group = fields.get(3).and_then(|g| g.parse().ok()).unwrap_or(id);
                Some((fields[0].to_string(), (id, group)))
            })
            .collect())
    };
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let (uid, primary_gid) = match user.parse::<u32>() {
        Ok(uid) => (uid, uid),
        Err(_) => *table("passwd")?
            .get(user)
            .ok_or_else(|| fail(format!("no user `{user}` in the image's /etc/passwd")))?,
    };
    let gid = match group {
        None => primary_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                table("group")?
                    .get(g)
                    .ok_or_else(|| fail(format!("no group `{g}` in the image's /etc/group")))?
                    .0
            }
        },
    };
    Ok(Owner { uid, gid })
}

/// One line of the child's progress report on stdout.
#[derive(Debug, Serialize, Deserialize)]
struct Report {
    #[serde(flatten)]
    done: Extracted,
    /// Of the tarball as given (compressed): how far the extraction has read.
    read: u64,
}

/// Counts what passes through, so progress can be told against the tarball's size.
struct Counting<R> {
    inner: R,
    read: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<R: std::io::Read> std::io::Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.set(self.read.get() + n as u64);
        Ok(n)
    }
}

/// The child's side (`amibake internal-extract`): leave the host for a sandbox in the image,
/// then unpack standard input into `spec.dest`, reporting progress as JSON lines on stdout.
/// Runs before any async runtime: the sandbox forks.
pub fn child_main(
    root: &Path,
    spec: &ExtractSpec,
    isolation: sandbox::Isolation,
) -> Result<Extracted, ExtractError> {
    sandbox::enter(root, &sandbox::Purpose::Extract, isolation)?;
    let image = ImageRoot::open(Path::new("/")).map_err(|e| ExtractError::Dest {
        dest: spec.dest.clone(),
        reason: e.to_string(),
    })?;
    let owner = spec
        .owner
        .as_deref()
        .map(|owner| resolve_owner(owner, |file| image.read(&format!("/etc/{file}"))))
        .transpose()?;
    report_progress(|input, on_progress| unpack(input, &image, spec, owner, on_progress))
}

/// The child's side of the tarball's check (`amibake internal-check-tarball`): leave the host
/// for a sandbox rooted in the empty directory `root`, with no capabilities, then read
/// standard input through `check_entries`, reporting as `child_main` does.
pub fn check_child_main(
    root: &Path,
    isolation: sandbox::Isolation,
) -> Result<Extracted, ExtractError> {
    sandbox::enter(root, &sandbox::Purpose::Check, isolation)?;
    report_progress(|input, on_progress| check_entries(input, on_progress))
}

/// Runs `work` over standard input, reporting its running totals and how much of the input
/// it has read as JSON lines on stdout, every `PROGRESS_EVERY` and once at the end.
fn report_progress(
    work: impl FnOnce(&mut dyn Read, &mut dyn FnMut(Extracted)) -> Result<Extracted, ExtractError>,
) -> Result<Extracted, ExtractError> {
    let mut out = std::io::stdout().lock();
    let mut last_report = std::time::Instant::now();
    let read = std::rc::Rc::new(std::cell::Cell::new(0));
    let report = |done: Extracted, out: &mut std::io::StdoutLock| {
        let _ = serde_json::to_writer(
            &mut *out,
            &Report {
                done,
                read: read.get(),
            },
        );
        let _ = writeln!(out);
    };
    let mut input = Counting {
        inner: std::io::stdin().lock(),
        read: read.clone(),
    };
    let done = work(&mut input, &mut |done| {
        if last_report.elapsed() >= PROGRESS_EVERY {
            report(done, &mut out);
            last_report = std::time::Instant::now();
        }
    })?;
    report(done, &mut out);
    Ok(done)
}

/// How often the child reports progress: often enough for a live bar, rarely enough that a
/// tarball of many small files does not become a flood of events.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Where the tarball comes from.
#[derive(Debug, Clone)]
pub enum Tarball {
    File(PathBuf),
    Stdin,
}

/// The parent's side of the extraction: unpacks `tarball` as `spec` says inside the image
/// mounted at `root`, through a sandboxed child run from `amibake_exe` (this binary:
/// `std::env::current_exe()`). `on_progress` hears the running totals and how many bytes of
/// the tarball (as given, compressed) have been read; `cancel` kills the child.
pub async fn extract_into_image(
    amibake_exe: &Path,
    root: &Path,
    spec: &ExtractSpec,
    tarball: &Tarball,
    isolation: sandbox::Isolation,
    on_progress: impl FnMut(Extracted, u64),
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<Extracted, ExtractError> {
    let mut command = tokio::process::Command::new(amibake_exe);
    command
        .arg("internal-extract")
        .arg("--root")
        .arg(root)
        .arg("--isolation")
        .arg(isolation.to_arg())
        .arg("--dest")
        .arg(&spec.dest);
    if let Some(owner) = &spec.owner {
        command.arg("--owner").arg(owner);
    }
    if spec.keep_setuid {
        command.arg("--keep-setuid");
    }
    run_child("the extraction", command, tarball, on_progress, cancel).await
}

/// The parent's side of the tarball's check, before any AWS call: reads `tarball` through
/// `check_entries` in a sandboxed child (run from `amibake_exe`) whose root is the empty
/// directory `empty_root` and which holds no capabilities, so the decompressor and the tar
/// parser meet a hostile tarball with nothing to reach. Answers what the tarball holds;
/// `ExtractError::Refused` when the tarball itself is at fault.
pub async fn check_tarball(
    amibake_exe: &Path,
    empty_root: &Path,
    tarball: &Path,
    isolation: sandbox::Isolation,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<Extracted, ExtractError> {
    let mut command = tokio::process::Command::new(amibake_exe);
    command
        .arg("internal-check-tarball")
        .arg("--root")
        .arg(empty_root)
        .arg("--isolation")
        .arg(isolation.to_arg());
    let tarball = Tarball::File(tarball.to_path_buf());
    run_child("the tarball's check", command, &tarball, |_, _| {}, cancel).await
}

/// Runs `what`, a child of this binary that reads `tarball` on its standard input and
/// reports as `report_progress` does; `cancel` kills it. A child that exits with
/// `exit::USAGE` refused the tarball (`ExtractError::Refused`).
async fn run_child(
    what: &str,
    mut command: tokio::process::Command,
    tarball: &Tarball,
    mut on_progress: impl FnMut(Extracted, u64),
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<Extracted, ExtractError> {
    use tokio::io::AsyncBufReadExt;

    crate::sandbox::detach_and_die_with_parent(&mut command);
    // The tarball file, or our own standard input, is the child's standard input.
    let input = match tarball {
        Tarball::File(path) => {
            Stdio::from(
                std::fs::File::open(path).map_err(|source| ExtractError::Read {
                    path: path.clone(),
                    source,
                })?,
            )
        }
        Tarball::Stdin => Stdio::inherit(),
    };
    let mut child = command
        .stdin(input)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| ExtractError::Child(format!("cannot start {what}: {e}")))?;
    let mut stderr = child.stderr.take().expect("piped");
    let errors = tokio::spawn(async move {
        let mut text = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text).await;
        text
    });
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut last = Extracted::default();
    loop {
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(line)) => {
                    if let Ok(report) = serde_json::from_str::<Report>(&line) {
                        last = report.done;
                        on_progress(last, report.read);
                    }
                }
                _ => break,
            },
            _ = cancel.cancelled() => {
                let _ = child.kill().await;
                return Err(ExtractError::Child(format!("{what} was interrupted")));
            }
        }
    }
    let status = child
        .wait()
        .await
        .map_err(|e| ExtractError::Child(format!("{what}: {e}")))?;
    let message = errors.await.unwrap_or_default();
    if !status.success() {
        let message = message.trim().trim_start_matches("error: ");
        if message.is_empty() {
            return Err(ExtractError::Child(format!("{what} exited with {status}")));
        }
        return Err(if status.code() == Some(crate::exit::USAGE) {
            ExtractError::Refused(message.to_string())
        } else {
            ExtractError::Child(message.to_string())
        });
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn etc_with(
        passwd: &'static str,
        group: &'static str,
    ) -> impl Fn(&str) -> std::io::Result<Vec<u8>> + Copy {
        move |file: &str| match file {
            "passwd" => Ok(passwd.as_bytes().to_vec()),
            "group" => Ok(group.as_bytes().to_vec()),
            _ => Err(std::io::ErrorKind::NotFound.into()),
        }
    }

    #[test]
    fn owners_come_from_the_image_files() {
        let etc = etc_with("root:x:0:0::/root:/bin/sh\nwww-data:x:33:33::/var/www:/bin/sh\napp:x:4242:100::/srv:/bin/sh\n", "users:x:100:\nweb:x:5000:\n");
        assert_eq!(
            resolve_owner("www-data", etc).unwrap(),
            Owner { uid: 33, gid: 33 }
        );
        assert_eq!(
            resolve_owner("app", etc).unwrap(),
            Owner {
                uid: 4242,
                gid: 100
            }
        );
        assert_eq!(
            resolve_owner("app:web", etc).unwrap(),
            Owner {
                uid: 4242,
                gid: 5000
            }
        );
        assert_eq!(
            resolve_owner("1001:1002", etc).unwrap(),
            Owner {
                uid: 1001,
                gid: 1002
            }
        );
        let err = resolve_owner("nobody-here", etc).unwrap_err().to_string();
        assert_eq!(
            err,
            "owner `nobody-here`: no user `nobody-here` in the image's /etc/passwd"
        );
        assert!(resolve_owner("app:nogroup", etc)
            .unwrap_err()
            .to_string()
            .contains("no group `nogroup`"));
    }
}
