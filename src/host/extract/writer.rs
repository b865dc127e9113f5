//! Placing admitted entries below `dest`, one at a time, each through a directory opened
//! below `dest` (`image_root`), never by a path the image or the tarball could redirect.

use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;
use tar::EntryType;

use super::entry::{Admitted, EntryError, LinkTarget, SparseMap};
use super::{Owner, IMPLIED_DIR_MODE, SET_ID_BITS};
use crate::host::image_root;

/// What placing one entry did.
pub struct Placed {
    pub setuid_dropped: bool,
}

/// Puts entries below `dest`, one at a time.
pub struct Writer {
    pub dest: OwnedFd,
    pub owner: Option<Owner>,
    pub keep_setuid: bool,
    /// The directory of the previous entry: most entries share their neighbour's.
    pub parent: Option<(String, OwnedFd)>,
    /// Directories' modification times, set at the end: their entries would change them.
    pub dir_times: Vec<(String, u64)>,
}

impl Writer {
    /// Places one entry below `dest`: one arm per kind of entry, each in the order its
    /// checks must run (owner before mode, as a change of owner clears setuid bits).
    pub fn place(
        &mut self,
        entry: &mut tar::Entry<impl Read>,
        admitted: Admitted,
    ) -> Result<Placed, EntryError> {
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
        let owner = self.owner;
        match kind {
            EntryType::Directory => {
                place_directory(parent, leaf, owner, mode)?;
                let rel = if parent_path.is_empty() {
                    leaf.to_string()
                } else {
                    format!("{parent_path}/{leaf}")
                };
                self.dir_times.push((rel, mtime));
            }
            EntryType::Symlink => {
                let target = symlink_target.expect("admit gives every symlink its target");
                place_symlink(parent, leaf, &target, owner, mtime)?;
            }
            EntryType::Link => {
                let target = link_target.expect("admit gives every hard link its target");
                place_hard_link(self.dest.as_fd(), parent, leaf, target)?;
            }
            _ => {
                let file = File {
                    mode,
                    mtime,
                    sparse,
                };
                place_file(parent, leaf, entry, file, owner)?;
            }
        }
        Ok(Placed { setuid_dropped })
    }

    /// Opens the directory `relative` below `dest` as `self.parent`, made as needed (owned
    /// like the entries).
    fn open_parent(&mut self, relative: &str) -> Result<(), EntryError> {
        let cached = matches!(&self.parent, Some((path, _)) if path == relative);
        if !cached {
            let (dir, made) =
                image_root::create_dirs_below(self.dest.as_fd(), relative, IMPLIED_DIR_MODE)
                    .map_err(EntryError::below("its path"))?;
            if let Some(owner) = self.owner {
                for path in &made {
                    let made_dir = image_root::open_below(
                        self.dest.as_fd(),
                        path,
                        OFlags::PATH | OFlags::DIRECTORY,
                    )
                    .map_err(EntryError::below(path))?;
                    set_owner(made_dir.as_fd(), "", owner)
                        .map_err(EntryError::io(format!("cannot change the owner of {path}")))?;
                }
            }
            self.parent = Some((relative.to_string(), dir));
        }
        Ok(())
    }

    /// Dates the directories, deepest last-listed first, once nothing more goes into them.
    pub fn finish(self) -> std::io::Result<()> {
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

fn place_directory(
    parent: BorrowedFd<'_>,
    leaf: &str,
    owner: Option<Owner>,
    mode: u32,
) -> Result<(), EntryError> {
    make_dir(parent, leaf)?;
    let dir = open_entry(parent, leaf, OFlags::RDONLY | OFlags::DIRECTORY)?;
    if let Some(owner) = owner {
        set_owner(dir.as_fd(), "", owner).map_err(EntryError::io(CHOWN))?;
    }
    rustix::fs::fchmod(&dir, Mode::from_raw_mode(mode)).map_err(sys(CHMOD))
}

fn place_symlink(
    parent: BorrowedFd<'_>,
    leaf: &str,
    target: &[u8],
    owner: Option<Owner>,
    mtime: u64,
) -> Result<(), EntryError> {
    clear_for(parent, leaf)?;
    rustix::fs::symlinkat(target, parent, leaf).map_err(sys("cannot make the symlink"))?;
    if let Some(owner) = owner {
        set_owner(parent, leaf, owner).map_err(EntryError::io(CHOWN))?;
    }
    rustix::fs::utimensat(parent, leaf, &times(mtime), AtFlags::SYMLINK_NOFOLLOW).map_err(sys(DATE))
}

/// A hard link to an entry already placed below `dest`, opened from `dest` as every
/// entry is, so a link cannot name a file outside it.
fn place_hard_link(
    dest: BorrowedFd<'_>,
    parent: BorrowedFd<'_>,
    leaf: &str,
    target: LinkTarget,
) -> Result<(), EntryError> {
    let LinkTarget {
        dir,
        leaf: target_leaf,
        named,
    } = target;
    let target_dir = image_root::open_below(dest, &dir, OFlags::PATH | OFlags::DIRECTORY)
        .map_err(EntryError::below(&format!("its link target {named}")))?;
    clear_for(parent, leaf)?;
    rustix::fs::linkat(
        &target_dir,
        target_leaf.as_str(),
        parent,
        leaf,
        AtFlags::empty(),
    )
    .map_err(|e| match e {
        Errno::NOENT => EntryError::LinkTargetMissing(named.clone()),
        e => sys(&format!("cannot make the hard link to {named}"))(e),
    })
}

/// What a regular file's header says of it.
struct File {
    mode: u32,
    mtime: u64,
    sparse: Option<SparseMap>,
}

fn place_file(
    parent: BorrowedFd<'_>,
    leaf: &str,
    entry: &mut tar::Entry<impl Read>,
    file: File,
    owner: Option<Owner>,
) -> Result<(), EntryError> {
    clear_for(parent, leaf)?;
    let fd = rustix::fs::openat(
        parent,
        leaf,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(sys("cannot create it"))?;
    let mut out = std::fs::File::from(fd);
    let size = entry.header().size().unwrap_or(0);
    let written = match file.sparse {
        Some(map) => write_sparse(entry, &mut out, &map),
        None => std::io::copy(entry, &mut out).map(|_| ()),
    };
    written.map_err(|e| write_error(e, &out, size))?;
    if let Some(owner) = owner {
        // Before the mode: a change of owner clears setuid bits.
        set_owner(out.as_fd(), "", owner).map_err(EntryError::io(CHOWN))?;
    }
    rustix::fs::fchmod(&out, Mode::from_raw_mode(file.mode)).map_err(sys(CHMOD))?;
    rustix::fs::futimens(&out, &times(file.mtime)).map_err(sys(DATE))
}

/// Running out of space names what was needed and what was left.
fn write_error(e: std::io::Error, file: &std::fs::File, size: u64) -> EntryError {
    if e.raw_os_error() == Some(Errno::NOSPC.raw_os_error()) {
        let free = rustix::fs::fstatvfs(file)
            .map(|s| s.f_bavail * s.f_frsize)
            .unwrap_or(0);
        EntryError::NoSpace { needed: size, free }
    } else {
        EntryError::io("cannot write it")(e)
    }
}

const CHOWN: &str = "cannot change its owner";
const CHMOD: &str = "cannot set its mode";
const DATE: &str = "cannot set its time";

/// A system call's failure as what the entry was doing.
fn sys(what: &str) -> impl FnOnce(Errno) -> EntryError + '_ {
    move |e| EntryError::io(what)(e.into())
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

pub fn set_owner(dir: BorrowedFd<'_>, name: &str, owner: Owner) -> std::io::Result<()> {
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

fn open_entry(parent: BorrowedFd<'_>, name: &str, flags: OFlags) -> Result<OwnedFd, EntryError> {
    rustix::fs::openat(
        parent,
        name,
        flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(sys("cannot open it"))
}

/// A directory entry over whatever is there: kept if it is a directory, else replaced (as
/// tar does: a symlink there is removed, never followed).
fn make_dir(parent: BorrowedFd<'_>, name: &str) -> Result<(), EntryError> {
    const MAKE: &str = "cannot make the directory";
    match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700)) {
        Ok(()) => Ok(()),
        Err(Errno::EXIST) => {
            let there = image_root::file_type_at(parent, name)
                .map_err(EntryError::io("cannot see what is there"))?;
            if there == Some(FileType::Directory) {
                return Ok(());
            }
            rustix::fs::unlinkat(parent, name, AtFlags::empty())
                .map_err(sys("cannot remove what is there"))?;
            rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700)).map_err(sys(MAKE))
        }
        Err(e) => Err(sys(MAKE)(e)),
    }
}

/// Makes room for a file, link or symlink: whatever non-directory is there goes.
fn clear_for(parent: BorrowedFd<'_>, name: &str) -> Result<(), EntryError> {
    match image_root::remove_unless_dir_at(parent, name) {
        Ok(true) => Ok(()),
        Ok(false) => Err(EntryError::DirectoryInTheWay),
        Err(e) => Err(EntryError::io("cannot remove what is there")(e)),
    }
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
