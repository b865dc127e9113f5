//! A tmpfs of a few MiB mounted for a test: a disk that fills.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// How long an unmount is asked again while the tmpfs is busy (a process of the test still
/// leaving it), before it is detached lazily rather than left.
const UNMOUNT_WITHIN: Duration = Duration::from_secs(5);

/// A tmpfs of `size` (`mount`'s `size=`: "1m", "16m") mounted until dropped.
pub struct SmallFilesystem {
    path: PathBuf,
    /// The directory it is mounted on, where the test gave none: removed after the unmount.
    _own_dir: Option<tempfile::TempDir>,
}

impl SmallFilesystem {
    /// Mounted on a directory of its own.
    pub fn new(size: &str) -> SmallFilesystem {
        let dir = tempfile::tempdir().unwrap();
        let mut small = SmallFilesystem::mount_at(dir.path(), size);
        small._own_dir = Some(dir);
        small
    }

    /// Mounted on `at`, made first if need be.
    pub fn mount_at(at: &Path, size: &str) -> SmallFilesystem {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "amibake-test-small",
            ])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount a tmpfs of {size} on {}", at.display());
        SmallFilesystem {
            path: at.to_path_buf(),
            _own_dir: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SmallFilesystem {
    fn drop(&mut self) {
        crate::util::unmount_or_detach(&self.path, UNMOUNT_WITHIN);
    }
}
