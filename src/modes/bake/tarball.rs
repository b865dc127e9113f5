//! The tarball before any AWS call: read once, digested, and checked in the sandbox, which
//! inflates it and keeps the tar stream it read in the run's work directory. The extraction
//! reads that one copy.

use std::path::{Path, PathBuf};

use tokio_util::sync::CancellationToken;

use crate::host::extract::{self, Tarball};
use crate::modes::ModeError;
use crate::sandbox::Isolation;

/// The run's work directory: the checked tar stream, the tarball check's empty root, and
/// the image's mount point.
/// Removed entry by entry on drop, never recursively: were an unmount to have failed, a
/// recursive delete would walk into the mounted image, and through its bind of /dev into
/// the host's.
pub struct WorkDir(PathBuf);

/// The tar stream the check read: the one copy the extraction reads.
const TAR_STREAM: &str = "tar";
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
        let _ = std::fs::remove_file(self.0.join(TAR_STREAM));
        // Fails, as it should, while anything is still mounted there.
        let _ = std::fs::remove_dir(self.0.join(MOUNT_POINT));
        let _ = std::fs::remove_dir(self.0.join(CHECK_ROOT));
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The tarball as checked: its tar stream, and the digest of its bytes as given.
pub struct Checked {
    pub tar_stream: PathBuf,
    pub sha256: String,
}

/// Refuses, before any AWS call, what the tarball alone shows is wrong with it: an entry no
/// bake would place (`..`, a device node), a damaged, cut-short or empty archive. What
/// depends on the image (a symlink in it, its users, its free space) only the extraction can
/// tell. The tarball as `given` (a path, or `-` for standard input) is read once: what the
/// extraction places is what was checked, and the digest in the tags and the fingerprint is
/// of those bytes, whatever becomes of the given file meanwhile (a `[[bake.pre]]` command
/// rewriting it). Errors name the tarball as it was given.
pub async fn check(
    amibake_exe: &Path,
    work: &WorkDir,
    given: &Path,
    isolation: Isolation,
    cancel: &CancellationToken,
) -> Result<Checked, ModeError> {
    let failed = |source| ModeError::Tarball {
        path: given.display().to_string(),
        source,
    };
    let empty_root = work.path().join(CHECK_ROOT);
    std::fs::create_dir(&empty_root).map_err(ModeError::local(
        "cannot make a root for the tarball's check",
    ))?;
    let tarball = if given.as_os_str() == "-" {
        Tarball::Stdin
    } else {
        Tarball::File(given.to_path_buf())
    };
    let tar_stream = work.path().join(TAR_STREAM);
    let sha256 = extract::check_tarball(
        amibake_exe,
        &empty_root,
        &tarball,
        &tar_stream,
        room_for_tar_stream(work.path())?,
        isolation,
        cancel,
    )
    .await
    .map_err(failed)?;
    Ok(Checked { tar_stream, sha256 })
}

/// How much of the work directory's filesystem the tar stream may take: half of what is
/// free there, so that a tarball that inflates without end (a gzip bomb) stops there, and
/// the rest of the host keeps room.
fn room_for_tar_stream(work: &Path) -> Result<u64, ModeError> {
    let free = rustix::fs::statvfs(work).map_err(|e| ModeError::Local {
        what: format!("cannot tell the free space of {}", work.display()),
        source: e.into(),
    })?;
    Ok(free.f_bavail.saturating_mul(free.f_frsize) / 2)
}
