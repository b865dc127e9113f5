//! A run's mark on this machine: a file named by its build id, locked (flock) for as long as
//! the run's process lives. The kernel drops the lock when the process dies, however it
//! dies, so `gc` tells a live run from one that was killed whatever their ages.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};

/// Where every lock of amibake on this machine lives: device-name locks, and runs/.
pub fn lock_root() -> PathBuf {
    let run_lock = Path::new("/run/lock");
    if run_lock.is_dir() {
        run_lock.join("amibake")
    } else {
        std::env::temp_dir().join("amibake-locks")
    }
}

fn path_of(build_id: &str) -> PathBuf {
    lock_root().join("runs").join(build_id)
}

/// Held while it lives; the file goes with it.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
    _file: File,
}

impl RunLock {
    pub fn acquire(build_id: &str) -> io::Result<RunLock> {
        let path = path_of(build_id);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = File::create(&path)?;
        flock(&file, FlockOperation::NonBlockingLockExclusive)?;
        Ok(RunLock { path, _file: file })
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether a live process on this machine holds `build_id`'s lock. A lock file nobody
/// holds (its run was killed) is removed.
pub fn is_held(build_id: &str) -> bool {
    let path = path_of(build_id);
    let Ok(file) = File::open(&path) else {
        return false;
    };
    match flock(&file, FlockOperation::NonBlockingLockShared) {
        Ok(()) => {
            let _ = std::fs::remove_file(&path);
            false
        }
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_is_held_while_it_lives_only() {
        let id = format!("ab-test-{}", std::process::id());
        assert!(!is_held(&id));
        let lock = RunLock::acquire(&id).unwrap();
        // Another open file description conflicts with it, as another process's would.
        assert!(is_held(&id));
        drop(lock);
        assert!(!is_held(&id));
        assert!(!path_of(&id).exists());
    }
}
