//! Base images kept on this machine for the `direct` backend: a snapshot's allocated
//! blocks, fetched once with the EBS direct APIs into a sparse file of the volume's size,
//! with the SHA-256 digest of every block it holds, so a later bake on the same base
//! downloads nothing and can tell which blocks it changed.
//!
//! An entry is a directory named by the snapshot id, holding `image`, `digests` and `lock`.
//! It is built under a unique temporary name (`.fetching-*`) in the same directory and
//! renamed when complete; removing one renames it to another (`.removing-*`) first. A bake
//! works on a copy of an entry in the same directory (`.copy-*`, so the filesystem can
//! share the copy's extents), gone after the bake. No run trusts what a dot begins.
//!
//! Whoever uses a part of the cache holds its lock (`hold`): a bake a shared one on the
//! entry it reads, a fetch an exclusive one on its `.fetching-*` (handed to the entry it
//! becomes), a bake an exclusive one on its copy. `prune` keeps an entry in use, and the
//! sweep (`leftovers`) removes only what nobody holds: what killed runs left, whichever
//! container they ran in. Earlier amibakes named their partial entries and copies
//! `.partial-<snapshot>-<pid>` and `.work-<build>-<pid>`, and judged them by the pid; the
//! new names are not theirs, so neither judges the other's.

mod hold;
mod leftovers;

use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::aws::ebs::{self, Ran};
use crate::aws::{AwsError, Clients};
use crate::host::block_digests::BlockDigests;
use crate::host::disk_image::{copy_sparse, CopiedBy};
use hold::{Hold, Kind, Taken, Wait};
pub use leftovers::{is_leftover, remove_leftover};

const IMAGE: &str = "image";
const DIGESTS: &str = "digests";
const LOCK: &str = "lock";
const FETCHING: &str = ".fetching-";
const REMOVING: &str = ".removing-";
const COPY: &str = ".copy-";
/// Tries at a name or an entry that another run removed the moment it was made.
const TRIES: usize = 3;
/// An entry is held alone for a moment only: a fetch handing it over, a prune renaming it
/// aside. Longer, and that process was stopped midway: said, rather than waited on.
const HANDOVER_SECONDS: u64 = 30;
const HANDOVER: Wait = Wait::UpTo(Duration::from_secs(HANDOVER_SECONDS));

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("the image cache {dir}: {action}: {source}")]
    Io {
        dir: PathBuf,
        action: String,
        source: io::Error,
    },
    #[error(transparent)]
    Aws(#[from] AwsError),
    #[error("interrupted while fetching {snapshot_id}")]
    Interrupted { snapshot_id: String },
}

/// A complete entry: the base image and its digests.
#[derive(Debug, Clone)]
pub struct CachedImage {
    pub snapshot_id: String,
    pub image: PathBuf,
    pub digests: BlockDigests,
    /// Blocks this call downloaded: 0 when the entry was already here.
    pub downloaded: usize,
    /// The entry's shared lock, while any clone of this lives: `prune` keeps the entry.
    _in_use: Option<Arc<Hold>>,
}

/// What `prune` did.
#[derive(Debug, Default)]
pub struct Pruned {
    /// (snapshot id, bytes freed)
    pub removed: Vec<(String, u64)>,
    /// Entries old enough to go that a bake is using: kept.
    pub in_use: Vec<String>,
}

/// A bake's copy of an entry, locked from the moment its name exists until it is removed:
/// no other run's sweep takes it.
#[derive(Debug)]
pub struct WorkingCopy {
    pub path: PathBuf,
    pub copied: CopiedBy,
    hold: Mutex<Option<Hold>>,
}

impl WorkingCopy {
    /// Removes the copy, then lets go of it (the lock's open file would keep its disk until
    /// then). Once removed, there is nothing more to do.
    pub fn remove(&self) -> io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        self.hold.lock().unwrap_or_else(|e| e.into_inner()).take();
        Ok(())
    }
}

/// One complete entry, as `list` shows it.
#[derive(Debug, Clone, serde::Serialize, schemars::JsonSchema)]
pub struct ListedEntry {
    pub snapshot_id: String,
    /// Bytes the image takes on disk (its data, not its holes).
    pub bytes: u64,
    /// The volume's size.
    pub volume_bytes: u64,
    /// Blocks holding data.
    pub blocks: usize,
    /// RFC 3339, UTC, to the second.
    #[serde(serialize_with = "serialize_time")]
    #[schemars(with = "String")]
    pub last_used: std::time::SystemTime,
}

fn serialize_time<S: serde::Serializer>(
    t: &std::time::SystemTime,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_rfc3339_seconds(*t).to_string())
}

pub struct ImageCache {
    dir: PathBuf,
}

impl ImageCache {
    pub fn new(dir: impl Into<PathBuf>) -> ImageCache {
        ImageCache { dir: dir.into() }
    }

    /// `$XDG_CACHE_HOME/amibake`, else `~/.cache/amibake`.
    pub fn default_dir() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
        Some(base.join("amibake"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn io(&self, action: impl Into<String>) -> impl FnOnce(io::Error) -> CacheError + '_ {
        let action = action.into();
        move |source| CacheError::Io {
            dir: self.dir.clone(),
            action,
            source,
        }
    }

    /// The complete entry for `snapshot_id`, if there is one, held in use while the answer
    /// (or a clone of it) lives. Reading it marks it used.
    pub fn entry(&self, snapshot_id: &str) -> Result<Option<CachedImage>, CacheError> {
        // Made here for an entry an amibake made before locks.
        let lock = self.dir.join(snapshot_id).join(LOCK);
        match hold::take(&lock, Kind::Shared, HANDOVER, true)
            .map_err(self.io(format!("lock the entry of {snapshot_id}")))?
        {
            Taken::Held(in_use) => Ok(self.held_entry(snapshot_id, in_use)),
            Taken::Gone => Ok(None),
            Taken::Busy => Err(self.held_alone(snapshot_id)),
        }
    }

    fn held_alone(&self, snapshot_id: &str) -> CacheError {
        self.io(format!("use the entry of {snapshot_id}"))(io::Error::other(format!(
            "another process has held it alone for {HANDOVER_SECONDS} s (a prune removing it, \
             or a fetch completing it, stopped midway)"
        )))
    }

    fn held_entry(&self, snapshot_id: &str, in_use: Hold) -> Option<CachedImage> {
        let mut found = self.peek(snapshot_id)?;
        found._in_use = Some(Arc::new(in_use));
        if let Ok(file) = std::fs::File::options()
            .append(true)
            .open(self.used_marker(snapshot_id))
        {
            let _ = file.set_modified(std::time::SystemTime::now());
        }
        Some(found)
    }

    /// Its digests file's modification time says when an entry was last used.
    fn used_marker(&self, snapshot_id: &str) -> PathBuf {
        self.dir.join(snapshot_id).join(DIGESTS)
    }

    fn peek(&self, snapshot_id: &str) -> Option<CachedImage> {
        let dir = self.dir.join(snapshot_id);
        let digests = BlockDigests::from_bytes(&std::fs::read(dir.join(DIGESTS)).ok()?)?;
        let image = dir.join(IMAGE);
        image.is_file().then(|| CachedImage {
            snapshot_id: snapshot_id.to_string(),
            image,
            digests,
            downloaded: 0,
            _in_use: None,
        })
    }

    /// The entry for `snapshot_id`, fetched first if it is not here: every allocated block
    /// of `read_from` (the snapshot itself, or a copy of it this account can read), as many
    /// at a time as EBS takes (`ebs::each_block`), each checked against its checksum.
    /// `on_block` hears of each block written, for progress.
    pub async fn fetch(
        &self,
        clients: &Clients,
        snapshot_id: &str,
        read_from: &str,
        on_block: &(dyn Fn(usize, usize) + Send + Sync),
        cancel: &CancellationToken,
    ) -> Result<CachedImage, CacheError> {
        // Again only where another run removed the entry the moment it was complete.
        for _ in 0..TRIES {
            if let Some(entry) = self.entry(snapshot_id)? {
                return Ok(entry);
            }
            std::fs::create_dir_all(&self.dir).map_err(self.io("create it"))?;
            self.sweep();
            let (partial, making) = self.new_partial(snapshot_id)?;
            let fetched = self
                .fetch_into(clients, read_from, &partial, on_block, cancel)
                .await;
            let downloaded = match fetched {
                Ok(count) => count,
                Err(e) => {
                    let _ = leftovers::remove_while_held(&partial, making);
                    return Err(e);
                }
            };
            if let Some(mut entry) = self.complete(snapshot_id, &partial, making)? {
                entry.downloaded = downloaded;
                return Ok(entry);
            }
        }
        Err(self.io(format!("keep the entry of {snapshot_id}"))(
            io::Error::other(format!(
                "another process removed it as soon as it was complete, {TRIES} times"
            )),
        ))
    }

    /// A `.fetching-*` directory of a unique name, already locked.
    fn new_partial(&self, snapshot_id: &str) -> Result<(PathBuf, Hold), CacheError> {
        for _ in 0..TRIES {
            let partial = tempfile::Builder::new()
                .prefix(&format!("{FETCHING}{snapshot_id}-"))
                .tempdir_in(&self.dir)
                .map_err(self.io("make a partial entry"))?
                .keep();
            let lock = partial.join(LOCK);
            // Only its maker makes the lock: a sweep finds the directory without one only
            // while it is empty, and then removes it alone (not found here: make another).
            let made = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&lock);
            let taken = match made {
                Ok(file) => hold::take_on(file, &lock, Kind::Exclusive, Wait::No),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => Err(e),
            };
            match taken {
                Ok(Taken::Held(making)) => return Ok((partial, making)),
                // A sweep took it first, and removes it.
                Ok(Taken::Busy | Taken::Gone) => continue,
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&partial);
                    return Err(self.io(format!("lock {}", lock.display()))(e));
                }
            }
        }
        Err(self.io("make a partial entry")(io::Error::other(
            "another process's sweep removed each one as it was made",
        )))
    }

    /// Renames a fetched `partial` into the entry, and hands its lock over as the entry's
    /// shared one: renamed while held alone, no sweep or prune takes it between. `None`:
    /// another run removed it at once, or completed its own first and is not done: the
    /// caller looks again.
    fn complete(
        &self,
        snapshot_id: &str,
        partial: &Path,
        making: Hold,
    ) -> Result<Option<CachedImage>, CacheError> {
        let entry_dir = self.dir.join(snapshot_id);
        let mut renamed = std::fs::rename(partial, &entry_dir);
        if renamed.is_err() && self.peek(snapshot_id).is_none() {
            // An entry left incomplete (a removal by an amibake before locks, killed
            // midway): set aside, and this one in its place.
            let incomplete = hold::take(&entry_dir.join(LOCK), Kind::Exclusive, Wait::No, true);
            if let Ok(Taken::Held(incomplete)) = incomplete {
                if self.peek(snapshot_id).is_none() {
                    let _ = self.discard(&entry_dir, snapshot_id, incomplete);
                }
            }
            renamed = std::fs::rename(partial, &entry_dir);
        }
        if renamed.is_err() {
            // Another run completed the same entry first: this one goes, that one is used.
            let _ = leftovers::remove_while_held(partial, making);
            return self.entry(snapshot_id);
        }
        match making
            .share(&entry_dir.join(LOCK), HANDOVER)
            .map_err(self.io(format!("lock the entry of {snapshot_id}")))?
        {
            Taken::Held(in_use) => Ok(self.held_entry(snapshot_id, in_use)),
            Taken::Gone => Ok(None),
            Taken::Busy => Err(self.held_alone(snapshot_id)),
        }
    }

    /// Removes the entry `dir`, which the caller holds alone: renamed to a `.removing-*`
    /// name first, so a removal killed midway leaves what the sweep removes, never an entry
    /// half there. Let go once renamed: who waits for the entry finds it gone at once.
    fn discard(&self, dir: &Path, snapshot_id: &str, removing: Hold) -> io::Result<()> {
        let aside = tempfile::Builder::new()
            .prefix(&format!("{REMOVING}{snapshot_id}-"))
            .tempdir_in(&self.dir)?
            .keep();
        // Over the empty directory just made, which keeps the name unique.
        if let Err(e) = std::fs::rename(dir, &aside) {
            let _ = std::fs::remove_dir(&aside);
            return Err(e);
        }
        drop(removing);
        leftovers::remove_all(&aside)
    }

    async fn fetch_into(
        &self,
        clients: &Clients,
        snapshot_id: &str,
        partial: &Path,
        on_block: &(dyn Fn(usize, usize) + Send + Sync),
        cancel: &CancellationToken,
    ) -> Result<usize, CacheError> {
        let listing = ebs::list_blocks(clients, snapshot_id).await?;
        let image_path = partial.join(IMAGE);
        let image = std::fs::File::create(&image_path).map_err(self.io("create the image"))?;
        image
            .set_len(listing.volume_size_gib << 30)
            .map_err(self.io("size the image"))?;
        let image = Arc::new(image);
        let mut digests = BlockDigests::default();
        let total = listing.blocks.len();
        let dir = self.dir.clone();
        let fetch = |(index, token): (u64, String)| {
            let (clients, snapshot_id) = (clients.clone(), snapshot_id.to_string());
            let (image, dir) = (image.clone(), dir.clone());
            async move {
                let digest = ebs::get_block(&clients, &snapshot_id, index, &token, &image)
                    .await
                    .map_err(|e| match e {
                        ebs::FetchError::Aws(e) => CacheError::from(e),
                        ebs::FetchError::Write { index, source } => CacheError::Io {
                            dir,
                            action: format!("write block {index}"),
                            source,
                        },
                    })?;
                Ok::<_, CacheError>((index, digest))
            }
        };
        let ran = ebs::each_block(
            ebs::Quota::Account,
            futures_util::stream::iter(listing.blocks),
            cancel,
            fetch,
            |(index, digest)| {
                digests.0.insert(index, digest);
                on_block(digests.0.len(), total);
                Ok(())
            },
        )
        .await?;
        if ran == Ran::Interrupted {
            return Err(CacheError::Interrupted {
                snapshot_id: snapshot_id.to_string(),
            });
        }
        image.sync_all().map_err(self.io("sync the image"))?;
        std::fs::write(partial.join(DIGESTS), digests.to_bytes())
            .map_err(self.io("write the digests"))?;
        Ok(total)
    }

    /// A copy of `entry`'s image for one bake to write, `len` bytes long (grown when the
    /// bake's volume is larger than the base's). Its extents are shared with the entry
    /// where the filesystem can (reflink), else only its data is copied.
    pub fn working_copy(
        &self,
        entry: &CachedImage,
        build_id: &str,
        len: u64,
    ) -> Result<WorkingCopy, CacheError> {
        self.sweep();
        let (path, file, held) = self.new_copy(build_id)?;
        let copied = copy_sparse(&entry.image, &file, len).map_err(|e| {
            let _ = std::fs::remove_file(&path);
            self.io(format!(
                "copy {} to {}",
                entry.image.display(),
                path.display()
            ))(e)
        })?;
        Ok(WorkingCopy {
            path,
            copied,
            hold: Mutex::new(Some(held)),
        })
    }

    /// An empty `.copy-*` file of a unique name, already locked: before the copy, which
    /// can take longer than any grace a sweep could give.
    fn new_copy(&self, build_id: &str) -> Result<(PathBuf, std::fs::File, Hold), CacheError> {
        let made = |e| self.io("make a working copy")(e);
        for _ in 0..TRIES {
            let (file, path) = tempfile::Builder::new()
                .prefix(&format!("{COPY}{build_id}-"))
                .tempfile_in(&self.dir)
                .map_err(made)?
                .keep()
                .map_err(|e| made(e.error))?;
            let lock = file.try_clone().map_err(made)?;
            match hold::take_on(lock, &path, Kind::Exclusive, Wait::No) {
                Ok(Taken::Held(held)) => return Ok((path, file, held)),
                // A sweep took it first, and removes it.
                Ok(Taken::Busy | Taken::Gone) => continue,
                Err(e) => {
                    let _ = std::fs::remove_file(&path);
                    return Err(self.io(format!("lock {}", path.display()))(e));
                }
            }
        }
        Err(made(io::Error::other(
            "another process's sweep removed each one as it was made",
        )))
    }

    /// Removes the entries not used since `cutoff` (all of them with `None`) but those a
    /// bake is using. On a filesystem without locks, as before there were any: all of them.
    pub fn prune(&self, cutoff: Option<std::time::SystemTime>) -> Result<Pruned, CacheError> {
        self.sweep();
        let mut pruned = Pruned::default();
        for listed in self.list() {
            if cutoff.is_some_and(|cutoff| listed.last_used >= cutoff) {
                continue;
            }
            let id = listed.snapshot_id;
            let dir = self.dir.join(&id);
            match hold::take(&dir.join(LOCK), Kind::Exclusive, Wait::No, true)
                .map_err(self.io(format!("lock the entry of {id}")))?
            {
                Taken::Held(removing) => {
                    self.discard(&dir, &id, removing)
                        .map_err(self.io(format!("remove the entry of {id}")))?;
                    pruned.removed.push((id, listed.bytes));
                }
                Taken::Busy => pruned.in_use.push(id),
                // Another prune removed it.
                Taken::Gone => {}
            }
        }
        Ok(pruned)
    }

    /// Complete entries: what each takes on disk and when it was last used, newest use
    /// first. Listing does not count as a use.
    pub fn list(&self) -> Vec<ListedEntry> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut listed: Vec<ListedEntry> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                // Partial entries, set-aside ones and copies are never entries.
                if name.starts_with('.') {
                    return None;
                }
                self.peek(&name).map(|entry| {
                    use std::os::unix::fs::MetadataExt;
                    let image = std::fs::metadata(&entry.image).ok();
                    ListedEntry {
                        bytes: image.as_ref().map_or(0, |m| m.blocks() * 512),
                        volume_bytes: image.as_ref().map_or(0, |m| m.len()),
                        blocks: entry.digests.0.len(),
                        last_used: std::fs::metadata(self.used_marker(&name))
                            .and_then(|m| m.modified())
                            .unwrap_or(std::time::UNIX_EPOCH),
                        snapshot_id: name,
                    }
                })
            })
            .collect();
        listed.sort_by(|a, b| {
            b.last_used
                .cmp(&a.last_used)
                .then(a.snapshot_id.cmp(&b.snapshot_id))
        });
        listed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry as a fetch completes it.
    fn complete_entry(cache: &ImageCache, snapshot_id: &str) {
        let dir = cache.dir().join(snapshot_id);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(IMAGE), b"base").unwrap();
        std::fs::write(dir.join(DIGESTS), BlockDigests::default().to_bytes()).unwrap();
    }

    fn entry(cache: &ImageCache, snapshot_id: &str) -> CachedImage {
        cache.entry(snapshot_id).unwrap().unwrap()
    }

    fn names(cache: &ImageCache) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(cache.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    // Locks taken in this one process stand for other runs': another open file
    // description conflicts as another process's would.
    #[test]
    fn the_sweep_removes_what_nobody_holds_whatever_pid_its_run_had() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(dir.path());
        // Two live runs, in containers whose pids this one cannot see.
        let (partial, making) = cache.new_partial("snap-3").unwrap();
        complete_entry(&cache, "snap-4");
        let in_use = entry(&cache, "snap-4");
        let copy = cache.working_copy(&in_use, "ab-build", 1 << 20).unwrap();
        // What killed runs left: a partial entry and a copy no lock holds, and a partial
        // entry killed before its lock.
        let (killed_partial, killed) = cache.new_partial("snap-5").unwrap();
        std::fs::write(killed_partial.join(IMAGE), b"half").unwrap();
        drop(killed);
        let (killed_copy, _, killed) = cache.new_copy("ab-killed").unwrap();
        drop(killed);
        let no_lock = dir.path().join(format!("{FETCHING}snap-6-aB3xYz"));
        std::fs::create_dir(&no_lock).unwrap();
        // Named by amibakes before locks: judged by their pids, as those judge them.
        let me = std::process::id();
        let legacy_gone = dir.path().join(".partial-snap-7-4294967294");
        let legacy_alive = dir.path().join(format!(".work-ab-build-{me}"));
        std::fs::create_dir(&legacy_gone).unwrap();
        std::fs::write(legacy_gone.join(IMAGE), b"half").unwrap();
        std::fs::write(&legacy_alive, b"copy").unwrap();

        let mut abandoned = cache.abandoned();
        abandoned.sort();
        let mut expected = vec![killed_partial, killed_copy, no_lock, legacy_gone];
        expected.sort();
        assert_eq!(abandoned, expected, "gc lists what the sweep removes");
        cache.sweep();
        let mut kept = vec![
            partial.file_name().unwrap().to_string_lossy().into_owned(),
            copy.path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned(),
            legacy_alive
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned(),
            "snap-4".to_string(),
        ];
        kept.sort();
        assert_eq!(names(&cache), kept);
        assert!(partial.join(LOCK).exists());

        drop(making);
        copy.remove().unwrap();
        cache.sweep();
        assert!(!partial.exists(), "the partial entry went once let go");
        assert!(!copy.path.exists());
    }

    #[test]
    fn a_working_copy_is_held_from_its_making_until_its_removal() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(dir.path());
        complete_entry(&cache, "snap-1");
        let base = entry(&cache, "snap-1");
        let copy = cache.working_copy(&base, "ab-build", 1 << 20).unwrap();
        assert_eq!(std::fs::read(&copy.path).unwrap().len(), 1 << 20);
        assert!(matches!(
            hold::take(&copy.path, Kind::Shared, Wait::No, false).unwrap(),
            Taken::Busy
        ));
        copy.remove().unwrap();
        assert!(!copy.path.exists());
        copy.remove().unwrap();
        // Its lock went with it: the file's open description was let go.
        let still_open = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|fd| std::fs::read_link(fd.unwrap().path()).ok())
            // A removed file's link reads "<path> (deleted)".
            .any(|target| {
                let target = target.to_string_lossy().into_owned();
                target.starts_with(&*copy.path.to_string_lossy())
            });
        assert!(!still_open, "the removed copy is still open");
    }

    #[test]
    fn prune_keeps_an_entry_in_use_and_leaves_no_entry_half_removed() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(dir.path());
        complete_entry(&cache, "snap-1");
        complete_entry(&cache, "snap-2");
        let in_use = entry(&cache, "snap-1");
        let pruned = cache.prune(None).unwrap();
        assert_eq!(pruned.in_use, ["snap-1"]);
        assert_eq!(pruned.removed.len(), 1);
        assert_eq!(pruned.removed[0].0, "snap-2");
        assert_eq!(names(&cache), ["snap-1"]);
        drop(in_use);
        let pruned = cache.prune(None).unwrap();
        assert_eq!((pruned.removed.len(), pruned.in_use.len()), (1, 0));
        assert!(names(&cache).is_empty(), "{:?}", names(&cache));

        // A removal killed once its entry is set aside: no entry, and what is left is
        // the sweep's to remove.
        complete_entry(&cache, "snap-3");
        let removing = match hold::take(
            &dir.path().join("snap-3").join(LOCK),
            Kind::Exclusive,
            Wait::No,
            true,
        )
        .unwrap()
        {
            Taken::Held(held) => held,
            other => panic!("{other:?}"),
        };
        let aside = tempfile::Builder::new()
            .prefix(&format!("{REMOVING}snap-3-"))
            .tempdir_in(dir.path())
            .unwrap()
            .keep();
        std::fs::rename(dir.path().join("snap-3"), &aside).unwrap();
        drop(removing);
        assert!(cache.entry("snap-3").unwrap().is_none());
        assert!(cache.list().is_empty(), "set aside, it is no entry");
        cache.sweep();
        assert!(names(&cache).is_empty(), "{:?}", names(&cache));
    }

    #[test]
    fn a_fetch_completes_its_entry_over_one_left_half_removed_or_uses_one_completed_first() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(dir.path());
        let fetched = |content: &[u8]| {
            let (partial, making) = cache.new_partial("snap-1").unwrap();
            std::fs::write(partial.join(IMAGE), content).unwrap();
            std::fs::write(partial.join(DIGESTS), BlockDigests::default().to_bytes()).unwrap();
            (partial, making)
        };
        // An earlier amibake's removal of the entry, killed after its digests went: no
        // entry, and a directory in the entry's place.
        std::fs::create_dir(dir.path().join("snap-1")).unwrap();
        std::fs::write(dir.path().join("snap-1").join(IMAGE), b"old").unwrap();
        let (partial, making) = fetched(b"new");
        let first = cache.complete("snap-1", &partial, making).unwrap().unwrap();
        assert_eq!(std::fs::read(&first.image).unwrap(), b"new");
        // Handed over as a shared lock: prune keeps it while the fetch's answer lives.
        assert_eq!(cache.prune(None).unwrap().in_use, ["snap-1"]);
        cache.sweep();
        assert_eq!(names(&cache), ["snap-1"]);

        // Another run completed the same entry first: its entry is used, this one goes.
        let (partial, making) = fetched(b"second");
        let second = cache.complete("snap-1", &partial, making).unwrap().unwrap();
        assert_eq!(std::fs::read(&second.image).unwrap(), b"new");
        assert_eq!(names(&cache), ["snap-1"]);
        drop((first, second));
        assert_eq!(cache.prune(None).unwrap().removed.len(), 1);
    }

    /// `dir` bind-mounted read-only over itself while this lives.
    struct ReadOnly(PathBuf);

    impl ReadOnly {
        fn over(dir: &Path) -> ReadOnly {
            use rustix::mount::{mount_bind, mount_remount, MountFlags};
            mount_bind(dir, dir).unwrap();
            let read_only = ReadOnly(dir.to_path_buf());
            mount_remount(dir, MountFlags::BIND | MountFlags::RDONLY, "").unwrap();
            read_only
        }
    }

    impl Drop for ReadOnly {
        fn drop(&mut self) {
            let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::empty());
        }
    }

    #[test]
    fn an_entry_in_a_read_only_cache_is_still_read() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: a read-only bind mount needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(dir.path());
        complete_entry(&cache, "snap-1");
        complete_entry(&cache, "snap-2");
        // snap-2 was read before, so its lock file is there; snap-1's never was made.
        drop(entry(&cache, "snap-2"));
        let _read_only = ReadOnly::over(dir.path());
        assert_eq!(entry(&cache, "snap-1").digests, BlockDigests::default());
        let held = entry(&cache, "snap-2");
        assert!(
            held._in_use.as_ref().is_some_and(|h| h.is_lock()),
            "a shared lock needs no write access"
        );
    }

    #[test]
    fn partial_entries_of_one_snapshot_never_share_a_name() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(dir.path());
        let (one, _making_one) = cache.new_partial("snap-1").unwrap();
        std::fs::write(one.join(IMAGE), b"one's").unwrap();
        let (two, _making_two) = cache.new_partial("snap-1").unwrap();
        assert_ne!(one, two);
        assert_eq!(std::fs::read(one.join(IMAGE)).unwrap(), b"one's");
    }

    #[test]
    fn gc_removes_a_leftover_only_if_nobody_holds_it_since() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(dir.path());
        let (partial, making) = cache.new_partial("snap-1").unwrap();
        drop(making);
        assert_eq!(cache.abandoned(), std::slice::from_ref(&partial));
        // Its lock taken since (as a run with a lock file of its own would): kept.
        let now = match hold::take(&partial.join(LOCK), Kind::Exclusive, Wait::No, false) {
            Ok(Taken::Held(held)) => held,
            other => panic!("{other:?}"),
        };
        assert!(remove_leftover(&partial).is_err());
        assert!(partial.exists());
        drop(now);
        remove_leftover(&partial).unwrap();
        assert!(!partial.exists());
        remove_leftover(&partial).unwrap();
    }
}
