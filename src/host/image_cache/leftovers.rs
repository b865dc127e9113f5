//! What killed runs left in the cache: partial entries, entries set aside to be removed,
//! working copies. Each is judged by its lock (nobody holds it), or, under the names of an
//! amibake before locks, as that amibake judged it (its pid is not alive here). The sweep
//! before each fetch, copy and prune removes them; `amibake gc` lists them and removes
//! each after judging it again.

use std::io;
use std::path::{Path, PathBuf};

use super::hold::{self, Hold, Kind, Taken, Wait};
use super::{ImageCache, COPY, FETCHING, LOCK, REMOVING};

/// The names an amibake before locks gave: `.partial-<snapshot>-<pid>`,
/// `.work-<build>-<pid>`.
const LEGACY: [&str; 2] = [".partial-", ".work-"];

enum Abandoned {
    /// Its lock, taken now: nobody else holds it.
    Held(Hold),
    /// A directory with no lock: its maker was killed between making it and its lock, so
    /// it is empty. Removed alone, never recursively: a maker that made its lock since
    /// keeps it.
    NoLock,
    /// Named by an amibake before locks, whose process is not alive here.
    Legacy,
}

/// Whether `name` is what the cache names its leftovers.
pub fn is_leftover(name: &str) -> bool {
    [FETCHING, REMOVING, COPY]
        .iter()
        .chain(&LEGACY)
        .any(|prefix| name.starts_with(prefix))
}

fn judge(path: &Path) -> Option<Abandoned> {
    let name = path.file_name()?.to_str()?;
    if name.starts_with(FETCHING) || name.starts_with(REMOVING) {
        return match hold::take(&path.join(LOCK), Kind::Exclusive, Wait::No, false) {
            Ok(Taken::Held(held)) if held.is_lock() => Some(Abandoned::Held(held)),
            Ok(Taken::Gone) if path.is_dir() => Some(Abandoned::NoLock),
            // Held, or a filesystem without locks, where nobody can tell: it stays.
            _ => None,
        };
    }
    if name.starts_with(COPY) {
        return match hold::take(path, Kind::Exclusive, Wait::No, false) {
            Ok(Taken::Held(held)) if held.is_lock() => Some(Abandoned::Held(held)),
            _ => None,
        };
    }
    let rest = LEGACY.iter().find_map(|prefix| name.strip_prefix(prefix))?;
    let pid: u32 = rest.rsplit_once('-')?.1.parse().ok()?;
    (!Path::new(&format!("/proc/{pid}")).exists()).then_some(Abandoned::Legacy)
}

fn remove(path: &Path, abandoned: Abandoned) -> io::Result<()> {
    match abandoned {
        Abandoned::Held(held) => remove_while_held(path, held),
        Abandoned::NoLock => ignore_not_found(std::fs::remove_dir(path)),
        Abandoned::Legacy => remove_all(path),
    }
}

/// Removes `path` (a directory with all it holds, or a file); gone already is done.
pub(super) fn remove_all(path: &Path) -> io::Result<()> {
    let removed = match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    ignore_not_found(removed)
}

/// Removes what `held` is the lock of, then lets go. Over NFS, a lock file removed while
/// open lives on as a `.nfs*` file until let go, and keeps its directory: so once more
/// after.
pub(super) fn remove_while_held(path: &Path, held: Hold) -> io::Result<()> {
    let first = remove_all(path);
    drop(held);
    first.or_else(|_| remove_all(path))
}

fn ignore_not_found(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

impl ImageCache {
    fn leftovers(&self) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| is_leftover(&e.file_name().to_string_lossy()))
            .map(|e| e.path())
            .collect()
    }

    /// What the sweep would remove now.
    pub fn abandoned(&self) -> Vec<PathBuf> {
        self.leftovers()
            .into_iter()
            .filter(|path| judge(path).is_some())
            .collect()
    }

    /// Removes what killed runs left, each under its lock, so no run takes it meanwhile.
    pub(super) fn sweep(&self) {
        for path in self.leftovers() {
            if let Some(abandoned) = judge(&path) {
                let _ = remove(&path, abandoned);
            }
        }
    }
}

/// Removes a leftover `abandoned` listed, judged again now: what a run holds since is
/// kept, and said.
pub fn remove_leftover(path: &Path) -> io::Result<()> {
    match judge(path) {
        Some(abandoned) => remove(path, abandoned),
        None if std::fs::symlink_metadata(path).is_err() => Ok(()),
        None => Err(io::Error::other("a run holds it now")),
    }
}
