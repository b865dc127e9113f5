//! The tarball before any AWS call: copied once into the run's work directory, checked
//! there in the sandbox, and digested. Every later reading reads that one copy.

use std::path::{Path, PathBuf};

use tokio_util::sync::CancellationToken;

use crate::artifact;
use crate::host::extract;
use crate::modes::ModeError;
use crate::sandbox::Isolation;

/// The run's work directory: the tarball's one copy, the tarball check's empty root,
/// and the image's mount point.
/// Removed entry by entry on drop, never recursively: were an unmount to have failed, a
/// recursive delete would walk into the mounted image, and through its bind of /dev into
/// the host's.
pub struct WorkDir(PathBuf);

/// The tarball, copied from what was given: the one copy the run reads.
const SPOOLED_TARBALL: &str = "tarball";
pub const MOUNT_POINT: &str = "root";
/// The empty directory the tarball's check has as its root.
const CHECK_ROOT: &str = "empty";

impl WorkDir {
    pub fn new(build_id: &str) -> Result<WorkDir, ModeError> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("amibake-{build_id}-"))
            .tempdir()
            .map_err(ModeError::local("cannot make a work directory"))?;
        Ok(WorkDir(dir.keep()))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0.join(SPOOLED_TARBALL));
        // Fails, as it should, while anything is still mounted there.
        let _ = std::fs::remove_dir(self.0.join(MOUNT_POINT));
        let _ = std::fs::remove_dir(self.0.join(CHECK_ROOT));
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Refuses, before any AWS call, what the tarball alone shows is wrong with it: an entry no
/// bake would place (`..`, a device node), a damaged, cut-short or empty archive. What
/// depends on the image (a symlink in it, its users, its free space) only the extraction can
/// tell. Errors name the tarball as it was `given` (`-` for standard input).
pub async fn check(
    amibake_exe: &Path,
    work: &WorkDir,
    tarball: &Path,
    given: &Path,
    isolation: Isolation,
    cancel: &CancellationToken,
) -> Result<(), ModeError> {
    let failed = |source| ModeError::Tarball {
        path: given.display().to_string(),
        source,
    };
    let empty_root = work.path().join(CHECK_ROOT);
    std::fs::create_dir(&empty_root).map_err(ModeError::local(
        "cannot make a root for the tarball's check",
    ))?;
    extract::check_tarball(amibake_exe, &empty_root, tarball, isolation, cancel)
        .await
        .map(|_| ())
        .map_err(failed)
}

/// The tarball's SHA-256, read off the async runtime's threads.
pub async fn digest(tarball: &Path) -> Result<String, ModeError> {
    let path = tarball.to_path_buf();
    tokio::task::spawn_blocking(move || artifact::sha256_file(&path))
        .await
        .expect("a digest does not panic")
        .map_err(ModeError::local(format!(
            "cannot read the tarball {}",
            tarball.display()
        )))
}

/// The tarball as given (a path, or `-` for standard input), opened once and copied into
/// the work directory, which only this run can write. The check, the digest and the
/// extraction all read that copy: what is extracted is what was checked, and the digest in
/// the tags and the fingerprint is of those bytes, whatever becomes of the given file
/// meanwhile (a `[[bake.pre]]` command rewriting it).
pub fn spool(tarball: &Path, work: &Path) -> Result<PathBuf, ModeError> {
    let path = work.join(SPOOLED_TARBALL);
    let mut file =
        std::fs::File::create(&path).map_err(ModeError::local("cannot copy the tarball"))?;
    let read = if tarball.as_os_str() == "-" {
        std::io::copy(&mut std::io::stdin().lock(), &mut file)
    } else {
        // A file copy the kernel does (copy_file_range), a clone where the filesystem can.
        std::fs::File::open(tarball).and_then(|mut given| std::io::copy(&mut given, &mut file))
    };
    read.map_err(ModeError::local(format!(
        "cannot read the tarball {}",
        tarball.display()
    )))?;
    Ok(path)
}
