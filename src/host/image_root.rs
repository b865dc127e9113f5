//! Paths inside an image, resolved as the booted image would resolve them and never on the
//! host.
//!
//! Every host-side touch of an image's files (the extraction, the chroot's temporary files,
//! mount targets) goes through an [`ImageRoot`]: a directory fd of the image's root and
//! `openat2` with `RESOLVE_IN_ROOT`, so `/`, `..` and absolute symlinks all stop at the
//! image's root, and `RESOLVE_NO_MAGICLINKS`, so a `/proc/<pid>/root` link can never lead to
//! the host's tree. The leaf of a path is then handled with `*at` calls that do not follow it.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// How every path of an image is resolved: inside its root, never through a magic link.
const IN_IMAGE: ResolveFlags = ResolveFlags::IN_ROOT.union(ResolveFlags::NO_MAGICLINKS);

/// How a path below a directory is resolved when it must stay below it (a tarball's entries
/// below `dest`): `..` or an absolute symlink that would leave it is refused (EXDEV).
const BELOW: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_MAGICLINKS);

/// The most amibake reads of one file of an image (/etc/passwd, resolv.conf): such files
/// are small, and a huge one is an image's trap, not data to hold in memory.
pub const READ_LIMIT: u64 = 1 << 20;

/// Reads the file `fd` is open on, if it is a regular file of at most `limit` bytes. A FIFO
/// (which would never end), a device (/dev/zero would fill memory), a directory or a larger
/// file is an error saying which.
pub fn read_regular(fd: OwnedFd, limit: u64) -> std::io::Result<Vec<u8>> {
    let stat = rustix::fs::fstat(&fd)?;
    let kind = FileType::from_raw_mode(stat.st_mode);
    if kind != FileType::RegularFile {
        return Err(std::io::Error::other(format!(
            "is a {}, not a regular file",
            file_kind(kind)
        )));
    }
    let too_big = || {
        std::io::Error::other(format!(
            "is larger than the {limit} bytes amibake reads of such a file"
        ))
    };
    if stat.st_size as u64 > limit {
        return Err(too_big());
    }
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(std::fs::File::from(fd), limit + 1),
        &mut bytes,
    )?;
    if bytes.len() as u64 > limit {
        return Err(too_big());
    }
    Ok(bytes)
}

/// A file type as an error names it.
pub fn file_kind(kind: FileType) -> &'static str {
    match kind {
        FileType::RegularFile => "regular file",
        FileType::Directory => "directory",
        FileType::Symlink => "symlink",
        FileType::Fifo => "FIFO",
        FileType::Socket => "socket",
        FileType::CharacterDevice => "character device",
        FileType::BlockDevice => "block device",
        FileType::Unknown => "file of unknown type",
    }
}

/// The root directory of a mounted image.
#[derive(Debug)]
pub struct ImageRoot {
    fd: OwnedFd,
}

/// A path split into the directory that holds it and its last component.
pub struct Leaf {
    pub dir: OwnedFd,
    pub name: String,
}

impl ImageRoot {
    /// Opens the image whose root is mounted (or lies) at `host_path` on this machine.
    pub fn open(host_path: &Path) -> std::io::Result<ImageRoot> {
        let fd = rustix::fs::open(
            host_path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(ImageRoot { fd })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Opens `path` (as the image names it) with `flags`, resolved inside the image.
    pub fn open_at(&self, path: &str, flags: OFlags, mode: Mode) -> std::io::Result<OwnedFd> {
        Ok(rustix::fs::openat2(
            &self.fd,
            relative(path),
            flags | OFlags::CLOEXEC,
            mode,
            IN_IMAGE,
        )?)
    }

    /// Opens the directory `path`, creating what is missing of it (like `mkdir -p`) with
    /// `mode`, each component resolved inside the image. Returns it and the image paths of
    /// the directories it created, outermost first.
    pub fn create_dirs(&self, path: &str, mode: u32) -> std::io::Result<(OwnedFd, Vec<String>)> {
        let mut created = Vec::new();
        let mut so_far = String::from("/");
        let mut dir = self.open_at("/", OFlags::PATH | OFlags::DIRECTORY, Mode::empty())?;
        for part in normal_parts(path)? {
            so_far = join(&so_far, part);
            match rustix::fs::mkdirat(&dir, part, Mode::from_raw_mode(mode)) {
                Ok(()) => created.push(so_far.clone()),
                Err(Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
            // Resolved from the root again, so a symlink met on the way is followed as the
            // image would follow it, and still only inside the image.
            dir = self.open_at(&so_far, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())?;
        }
        Ok((dir, created))
    }

    /// The directory holding `path` (resolved inside the image; it must exist) and the name
    /// of `path` in it, which is not followed.
    pub fn leaf(&self, path: &str) -> std::io::Result<Leaf> {
        let parts = normal_parts(path)?;
        let (name, parents) = parts.split_last().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "the image's root itself")
        })?;
        let dir = self.open_at(
            &parents.join("/"),
            OFlags::PATH | OFlags::DIRECTORY,
            Mode::empty(),
        )?;
        Ok(Leaf {
            dir,
            name: (*name).to_string(),
        })
    }

    /// Reads the regular file at `path` as the image sees it, of at most `READ_LIMIT`
    /// bytes (`read_regular`).
    pub fn read(&self, path: &str) -> std::io::Result<Vec<u8>> {
        // NONBLOCK: opening a FIFO must not wait for a writer that never comes.
        let fd = self.open_at(path, OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty())?;
        read_regular(fd, READ_LIMIT)
    }

    /// Opens the directory `path` for a mount onto it: it must be a real directory of the
    /// image, with no symlink anywhere on the way, since a mount follows nothing safely.
    /// Missing components are created.
    pub fn mount_target(&self, path: &str) -> std::io::Result<OwnedFd> {
        let mut dir = self.open_at("/", OFlags::PATH | OFlags::DIRECTORY, Mode::empty())?;
        for part in normal_parts(path)? {
            match rustix::fs::mkdirat(&dir, part, Mode::from_raw_mode(0o755)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
            dir = rustix::fs::openat2(
                &dir,
                part,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
                BELOW | ResolveFlags::NO_SYMLINKS,
            )
            .map_err(|e| match e {
                Errno::LOOP | Errno::NOTDIR => std::io::Error::other(format!(
                    "{path} in the image is a symlink or not a directory"
                )),
                e => e.into(),
            })?;
        }
        Ok(dir)
    }
}

/// What `name` in `dir` is, without following it; None if nothing is there.
pub fn file_type_at(dir: BorrowedFd<'_>, name: &str) -> std::io::Result<Option<FileType>> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => Ok(Some(FileType::from_raw_mode(stat.st_mode))),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Removes `name` in `dir` unless it is a directory (a symlink goes, never followed);
/// Ok(false) when a directory is there.
pub fn remove_unless_dir_at(dir: BorrowedFd<'_>, name: &str) -> std::io::Result<bool> {
    match file_type_at(dir, name)? {
        None => Ok(true),
        Some(FileType::Directory) => Ok(false),
        Some(_) => {
            rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
            Ok(true)
        }
    }
}

impl Leaf {
    /// What is there now, without following it; None if nothing is.
    pub fn file_type(&self) -> std::io::Result<Option<FileType>> {
        file_type_at(self.dir.as_fd(), &self.name)
    }

    /// Removes what is there unless it is a directory; Ok(false) when a directory is.
    pub fn remove_unless_dir(&self) -> std::io::Result<bool> {
        remove_unless_dir_at(self.dir.as_fd(), &self.name)
    }

    /// Creates a new regular file here (nothing may be there) for writing.
    pub fn create_file(&self, mode: u32) -> std::io::Result<std::fs::File> {
        let fd = rustix::fs::openat(
            &self.dir,
            self.name.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )?;
        Ok(std::fs::File::from(fd))
    }

    /// The target of the symlink here.
    pub fn read_link(&self) -> std::io::Result<PathBuf> {
        let target = rustix::fs::readlinkat(&self.dir, self.name.as_str(), Vec::new())?;
        Ok(PathBuf::from(
            <std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(target.into_bytes()),
        ))
    }

    pub fn symlink(&self, target: &Path) -> std::io::Result<()> {
        Ok(rustix::fs::symlinkat(
            target,
            &self.dir,
            self.name.as_str(),
        )?)
    }
}

/// The directory `relative_path` below `dir`, created as needed, never leaving `dir`: the
/// way a tarball's entries are placed below the destination. Returns the directories made.
pub fn create_dirs_below(
    dir: BorrowedFd<'_>,
    relative_path: &str,
    mode: u32,
) -> std::io::Result<(OwnedFd, Vec<String>)> {
    let mut created = Vec::new();
    let mut so_far = String::new();
    let mut current = open_below(dir, ".", OFlags::PATH | OFlags::DIRECTORY)?;
    for part in normal_parts(relative_path)? {
        so_far = if so_far.is_empty() {
            part.to_string()
        } else {
            format!("{so_far}/{part}")
        };
        match rustix::fs::mkdirat(&current, part, Mode::from_raw_mode(mode)) {
            Ok(()) => created.push(so_far.clone()),
            Err(Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        current = open_below(dir, &so_far, OFlags::PATH | OFlags::DIRECTORY)?;
    }
    Ok((current, created))
}

/// Opens `relative_path` below `dir` without ever leaving it.
pub fn open_below(
    dir: BorrowedFd<'_>,
    relative_path: &str,
    flags: OFlags,
) -> std::io::Result<OwnedFd> {
    let path = if relative_path.is_empty() {
        "."
    } else {
        relative_path
    };
    Ok(rustix::fs::openat2(
        dir,
        path,
        flags | OFlags::CLOEXEC,
        Mode::empty(),
        BELOW,
    )?)
}

/// Whether an error is the kernel refusing a path that would leave its root.
pub fn is_escape(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(Errno::XDEV.raw_os_error())
}

/// The plain components of `path`: `/` and `.` dropped, `..` refused (it has no business in
/// a path amibake is given, and this way no reader has to reason about it).
pub fn normal_parts(path: &str) -> std::io::Result<Vec<&str>> {
    let mut parts = Vec::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(p) => parts.push(p.to_str().ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "path is not UTF-8")
            })?),
            Component::ParentDir => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("`..` in {path}"),
                ))
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    Ok(parts)
}

fn relative(path: &str) -> &str {
    let trimmed = path.trim_start_matches('/');
    if trimmed.is_empty() {
        "."
    } else {
        trimmed
    }
}

fn join(dir: &str, part: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{part}")
    } else {
        format!("{dir}/{part}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_inside_the_image_even_through_absolute_links_and_dot_dot_links() {
        let host = tempfile::tempdir().unwrap();
        let image = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(image.path().join("srv/www")).unwrap();
        std::os::unix::fs::symlink("/srv/www", image.path().join("www")).unwrap();
        std::os::unix::fs::symlink(host.path(), image.path().join("host")).unwrap();
        std::os::unix::fs::symlink("../../../../..", image.path().join("up")).unwrap();
        let root = ImageRoot::open(image.path()).unwrap();

        let (_, created) = root.create_dirs("/www/app/cache", 0o755).unwrap();
        assert_eq!(created, ["/www/app", "/www/app/cache"]);
        assert!(image.path().join("srv/www/app/cache").is_dir());

        // A link to the host directory's path means that path inside the image, where it
        // does not exist: nothing is made, least of all on the host.
        let err = root.create_dirs("/host/x", 0o755).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
        assert!(!host.path().join("x").exists());
        std::fs::create_dir_all(image.path().join(host.path().strip_prefix("/").unwrap())).unwrap();
        root.create_dirs("/host/x", 0o755).unwrap();
        assert!(!host.path().join("x").exists());
        assert!(image
            .path()
            .join(host.path().strip_prefix("/").unwrap())
            .join("x")
            .is_dir());
        root.create_dirs("/up/escaped", 0o755).unwrap();
        assert!(
            image.path().join("escaped").is_dir(),
            "`..` stops at the root"
        );
        assert!(normal_parts("/a/../b").is_err());
    }

    #[test]
    fn mount_targets_refuse_symlinks() {
        let image = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(image.path().join("real")).unwrap();
        std::os::unix::fs::symlink("/real", image.path().join("proc")).unwrap();
        let root = ImageRoot::open(image.path()).unwrap();
        let err = root.mount_target("/proc").unwrap_err().to_string();
        assert!(err.contains("/proc in the image is a symlink"), "{err}");
        root.mount_target("/dev/pts").unwrap();
        assert!(image.path().join("dev/pts").is_dir());
    }

    #[test]
    fn below_refuses_what_leaves_the_directory() {
        let image = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(image.path().join("dest")).unwrap();
        std::os::unix::fs::symlink("/etc", image.path().join("dest/abs")).unwrap();
        std::os::unix::fs::symlink("..", image.path().join("dest/up")).unwrap();
        let dest = std::fs::File::open(image.path().join("dest")).unwrap();
        for path in ["abs/x", "up/x"] {
            let err = create_dirs_below(dest.as_fd(), path, 0o755).unwrap_err();
            assert!(is_escape(&err), "{path}: {err}");
        }
        create_dirs_below(dest.as_fd(), "a/b", 0o755).unwrap();
        assert!(image.path().join("dest/a/b").is_dir());
    }
}
