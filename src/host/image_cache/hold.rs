//! Who uses a part of the image cache holds a lock on it: flock, which the kernel drops when
//! its process dies, however it dies. A pid could not tell who is alive: a run in another
//! container sharing the cache has pids this one cannot see, and may have this one's own.
//!
//! Only the maker of a part makes its lock file; others open it as it is. A lock is taken
//! on a file opened for writing where it can be (over NFS, Linux emulates flock with POSIX
//! locks, and an exclusive one needs a file open for writing), then checked to be still
//! the file at its path. Whoever removes a part of the cache does it holding its lock, so a
//! lock taken on a file removed meanwhile is let go and the caller looks again.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::fs::{flock, FlockOperation};
use rustix::io::Errno;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Reading an entry: many at once.
    Shared,
    /// Making, removing, or writing a copy: one alone.
    Exclusive,
}

/// How long to wait while another holds a lock that conflicts. Exclusive locks on an
/// entry are held for a moment only (a fetch handing its entry over, a prune renaming it
/// aside); a wait that ends says so rather than hanging the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    No,
    UpTo(Duration),
}

/// A lock held while this lives. Without a file, or with `locked` false, nothing is held:
/// the filesystem takes no locks (an NFS mount without its lock service), or the lock file
/// could not be made (a read-only cache made before locks). The cache then works as it did
/// without them.
#[derive(Debug)]
pub struct Hold {
    file: Option<File>,
    locked: bool,
}

#[derive(Debug)]
pub enum Taken {
    Held(Hold),
    /// Another process holds a lock that conflicts.
    Busy,
    /// The file is not there, or another is at its path: what it named was removed.
    Gone,
}

/// The lock at `path`: made there if `create` and missing.
pub fn take(path: &Path, kind: Kind, wait: Wait, create: bool) -> io::Result<Taken> {
    let opened = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path);
    let file = match opened {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Taken::Gone),
        // A cache another user made, or mounted read-only: a shared lock needs no write
        // access, even over NFS.
        Err(e)
            if kind == Kind::Shared
                && matches!(
                    e.kind(),
                    io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem
                ) =>
        {
            match File::open(path) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    return Ok(Taken::Held(Hold::none()))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Taken::Gone),
                Err(e) => return Err(e),
            }
        }
        Err(e) => return Err(e),
    };
    take_on(file, path, kind, wait)
}

/// The lock of `file`, which was opened at `path`.
pub fn take_on(file: File, path: &Path, kind: Kind, wait: Wait) -> io::Result<Taken> {
    let operation = match kind {
        Kind::Shared => FlockOperation::NonBlockingLockShared,
        Kind::Exclusive => FlockOperation::NonBlockingLockExclusive,
    };
    let since = Instant::now();
    let locked = loop {
        match flock(&file, operation) {
            Ok(()) => break true,
            Err(Errno::WOULDBLOCK) => match wait {
                Wait::UpTo(limit) if since.elapsed() < limit => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => return Ok(Taken::Busy),
            },
            Err(Errno::INTR) => continue,
            // No locks on this filesystem: only EWOULDBLOCK says another holds it.
            Err(_) => break false,
        }
    };
    Ok(if still_at(&file, path) {
        Taken::Held(Hold {
            file: Some(file),
            locked,
        })
    } else {
        Taken::Gone
    })
}

fn still_at(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(held), Ok(there)) => held.dev() == there.dev() && held.ino() == there.ino(),
        _ => false,
    }
}

impl Hold {
    fn none() -> Hold {
        Hold {
            file: None,
            locked: false,
        }
    }

    /// Whether this is a lock, not only an open file.
    pub fn is_lock(&self) -> bool {
        self.locked
    }

    /// Exclusive to shared, its file now at `path`. flock's conversion is not atomic: if
    /// a prune took it in between, this waits for the prune and answers `Gone`.
    pub fn share(self, path: &Path, wait: Wait) -> io::Result<Taken> {
        match self.file {
            Some(file) if self.locked => take_on(file, path, Kind::Shared, wait),
            _ => Ok(Taken::Held(self)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Wait = Wait::No;

    fn held(taken: io::Result<Taken>) -> Hold {
        match taken.unwrap() {
            Taken::Held(hold) => hold,
            other => panic!("not held: {other:?}"),
        }
    }

    // Two open file descriptions in one process conflict as two processes would.
    #[test]
    fn shared_holds_keep_out_an_exclusive_one_and_not_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        assert!(matches!(
            take(&path, Kind::Shared, NOW, false).unwrap(),
            Taken::Gone
        ));
        let one = held(take(&path, Kind::Shared, NOW, true));
        let two = held(take(&path, Kind::Shared, Wait::UpTo(Duration::ZERO), false));
        assert!(one.is_lock() && two.is_lock());
        let waited = Instant::now();
        assert!(matches!(
            take(
                &path,
                Kind::Exclusive,
                Wait::UpTo(Duration::from_millis(100)),
                false
            )
            .unwrap(),
            Taken::Busy
        ));
        assert!(waited.elapsed() >= Duration::from_millis(100), "it waited");
        drop((one, two));
        let alone = held(take(&path, Kind::Exclusive, NOW, false));
        assert!(matches!(
            take(&path, Kind::Shared, NOW, false).unwrap(),
            Taken::Busy
        ));
        let shared = held(alone.share(&path, NOW));
        held(take(&path, Kind::Shared, NOW, false));
        drop(shared);
    }

    #[test]
    fn a_lock_on_a_file_removed_or_moved_meanwhile_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        // Another run removed it, then another made a new one at its path.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"").unwrap();
        assert!(matches!(
            take_on(file, &path, Kind::Exclusive, NOW).unwrap(),
            Taken::Gone
        ));
        // Held exclusive, then moved away (an entry a prune set aside) before it is
        // shared: sharing it at its old path finds it gone.
        let making = held(take(&path, Kind::Exclusive, NOW, false));
        std::fs::rename(&path, dir.path().join("aside")).unwrap();
        assert!(matches!(making.share(&path, NOW).unwrap(), Taken::Gone));
    }
}
