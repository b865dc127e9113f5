//! The temporary private key's home: a directory only its owner reads, on tmpfs where
//! there is one.

use std::path::{Path, PathBuf};

use crate::modes::ModeError;

/// Writes a file only its owner can read, refusing to follow or reuse an existing path.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

/// A private (0700) directory for the temporary private key, on tmpfs where there is one so
/// the key never reaches a disk; removed with the key when the value is dropped, unless
/// kept for a look at a failed run (its name carries the build id, so gc finds it).
pub struct KeyDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl KeyDir {
    pub fn new(build_id: &str) -> Result<KeyDir, ModeError> {
        let shm = Path::new("/dev/shm");
        let parent = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        // tempfile leaves a directory's mode to the umask: say 0700 outright.
        use std::os::unix::fs::PermissionsExt;
        tempfile::Builder::new()
            .prefix(&format!("amibake-{build_id}-key-"))
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(parent)
            .map(|dir| KeyDir {
                path: dir.path().to_path_buf(),
                dir: Some(dir),
            })
            .map_err(ModeError::local("cannot make a private key directory"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Leaves the directory when this value goes.
    pub fn keep(&mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = dir.keep();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_private_key_directory_is_the_owners_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = KeyDir::new("ab-20261203000000-0badcafe").unwrap();
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{mode:o}");
        let path = dir.path().to_path_buf();
        drop(dir);
        assert!(!path.exists(), "removed with the run");
    }
}
