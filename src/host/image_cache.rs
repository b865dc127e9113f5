//! Base images kept on this machine for the `direct` backend: a snapshot's allocated
//! blocks, fetched once with the EBS direct APIs into a sparse file of the volume's size,
//! with the SHA-256 digest of every block it holds, so a later bake on the same base
//! downloads nothing and can tell which blocks it changed.
//!
//! An entry is a directory named by the snapshot id, holding `image` and `digests`. It is
//! built under a temporary name in the same directory and renamed when complete: a killed
//! run leaves at most a `.partial-*` directory, which no later run trusts and the next
//! fetch removes once its process is gone. A bake works on a copy of an entry in the same
//! directory (`.work-*`, so the filesystem can share the copy's extents), gone after the
//! bake, and removed by a later one if its process was killed.
//!
//! Whoever uses a part of the cache holds a lock on it (flock, which the kernel drops when
//! the process dies, however it dies): a bake a shared one on the entry it reads, a fetch
//! or a bake an exclusive one on its `.partial-*` directory or `.work-*` copy. A pid alone
//! cannot tell: runs in other containers sharing the cache have pids this one cannot see.
//! `prune` keeps an entry a bake is using; the sweep removes only what nobody holds.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustix::fs::{flock, FlockOperation};

use tokio_util::sync::CancellationToken;

use crate::aws::ebs::{self, Ran};
use crate::aws::{AwsError, Clients};
use crate::host::block_digests::BlockDigests;
use crate::host::disk_image::{copy_sparse, CopiedBy};

const IMAGE: &str = "image";
const DIGESTS: &str = "digests";
const PARTIAL: &str = ".partial-";
const WORK: &str = ".work-";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("the image cache {dir}: {action}: {source}")]
    Io {
        dir: PathBuf,
        action: String,
        source: std::io::Error,
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
    /// The entry's shared lock, for as long as any copy of this lives: `prune` keeps it.
    _in_use: Option<Arc<Hold>>,
}

/// A lock on a part of the cache, held while this lives.
#[derive(Debug)]
pub struct Hold(#[allow(dead_code)] File);

impl Hold {
    /// `path`'s lock (a file or a directory), taken without waiting; none while another
    /// holds one that conflicts, or when `path` is gone.
    fn try_take(path: &Path, how: FlockOperation) -> Option<Hold> {
        let file = File::open(path).ok()?;
        flock(&file, how).ok()?;
        Some(Hold(file))
    }
}

/// How long a `.partial-*` or `.work-*` nobody holds is left alone after it last changed:
/// its maker takes the lock a moment after making it.
const SWEEP_GRACE: Duration = Duration::from_secs(60);

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

/// What `prune` did.
#[derive(Debug, Default)]
pub struct Pruned {
    /// (snapshot id, bytes freed)
    pub removed: Vec<(String, u64)>,
    /// Entries it would have removed but a bake on this machine is using.
    pub in_use: Vec<String>,
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

    fn io(&self, action: impl Into<String>) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
        let action = action.into();
        move |source| CacheError::Io {
            dir: self.dir.clone(),
            action,
            source,
        }
    }

    /// The complete entry for `snapshot_id`, if there is one, held in use while the answer
    /// (or a clone of it) lives. Reading it marks it used. An entry `prune` is removing is
    /// not there.
    pub fn entry(&self, snapshot_id: &str) -> Option<CachedImage> {
        let in_use = Hold::try_take(
            &self.dir.join(snapshot_id),
            FlockOperation::NonBlockingLockShared,
        )?;
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
        if let Some(entry) = self.entry(snapshot_id) {
            return Ok(entry);
        }
        std::fs::create_dir_all(&self.dir).map_err(self.io("create it"))?;
        self.remove_abandoned_partials();
        let partial = self
            .dir
            .join(format!("{PARTIAL}{snapshot_id}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir(&partial).map_err(self.io(format!("create {}", partial.display())))?;
        let making = Hold::try_take(&partial, FlockOperation::NonBlockingLockExclusive);
        let fetched = self
            .fetch_into(clients, read_from, &partial, on_block, cancel)
            .await;
        let downloaded = match fetched {
            Ok(count) => count,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&partial);
                return Err(e);
            }
        };
        // Let go before it becomes the entry, whose users take shared locks; the sweep
        // leaves what was just written alone.
        drop(making);
        match std::fs::rename(&partial, self.dir.join(snapshot_id)) {
            Ok(()) => {}
            // Another bake on this machine completed the same entry first: use that one.
            Err(_) if self.entry(snapshot_id).is_some() => {
                let _ = std::fs::remove_dir_all(&partial);
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&partial);
                return Err(self.io(format!("complete the entry of {snapshot_id}"))(e));
            }
        }
        let mut entry = self.entry(snapshot_id).ok_or_else(|| {
            self.io(format!("read back the entry of {snapshot_id}"))(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "it is not complete",
            ))
        })?;
        entry.downloaded = downloaded;
        Ok(entry)
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

    /// `.partial-*` directories and `.work-*` copies nobody holds, whose process is not
    /// seen, and untouched for `SWEEP_GRACE`: what a killed fetch or bake left.
    fn remove_abandoned_partials(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name
                .strip_prefix(PARTIAL)
                .or_else(|| name.strip_prefix(WORK))
            else {
                continue;
            };
            let process_seen = rest
                .rsplit_once('-')
                .and_then(|(_, pid)| pid.parse::<u32>().ok())
                .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
            let path = entry.path();
            let recent = std::fs::symlink_metadata(&path)
                .and_then(|m| m.modified())
                .is_ok_and(|at| {
                    SystemTime::now().duration_since(at).unwrap_or_default() < SWEEP_GRACE
                });
            if process_seen || recent {
                continue;
            }
            // Removed under the lock, so no run takes it meanwhile.
            if let Some(_abandoned) =
                Hold::try_take(&path, FlockOperation::NonBlockingLockExclusive)
            {
                let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
            }
        }
    }

    /// A copy of `entry`'s image for one bake to write, `len` bytes long (grown when the
    /// bake's volume is larger than the base's), held while the answered `Hold` lives. Its
    /// extents are shared with the entry where the filesystem can (reflink), else only its
    /// data is copied.
    pub fn working_copy(
        &self,
        entry: &CachedImage,
        build_id: &str,
        len: u64,
    ) -> Result<(PathBuf, CopiedBy, Hold), CacheError> {
        self.remove_abandoned_partials();
        let path = self
            .dir
            .join(format!("{WORK}{build_id}-{}", std::process::id()));
        let failed = |e| {
            let _ = std::fs::remove_file(&path);
            self.io(format!(
                "copy {} to {}",
                entry.image.display(),
                path.display()
            ))(e)
        };
        let copied = copy_sparse(&entry.image, &path, len).map_err(failed)?;
        let hold = Hold::try_take(&path, FlockOperation::NonBlockingLockExclusive)
            .ok_or_else(|| failed(std::io::Error::other("another process holds it")))?;
        Ok((path, copied, hold))
    }

    /// Removes the entries not used since `cutoff` (all of them with `None`) but those a
    /// bake is using.
    pub fn prune(&self, cutoff: Option<SystemTime>) -> Result<Pruned, CacheError> {
        self.remove_abandoned_partials();
        let mut pruned = Pruned::default();
        for listed in self.list() {
            if cutoff.is_some_and(|cutoff| listed.last_used >= cutoff) {
                continue;
            }
            let dir = self.dir.join(&listed.snapshot_id);
            // Removed under the lock: no bake takes the entry meanwhile.
            let Some(_removing) = Hold::try_take(&dir, FlockOperation::NonBlockingLockExclusive)
            else {
                pruned.in_use.push(listed.snapshot_id);
                continue;
            };
            std::fs::remove_dir_all(&dir)
                .map_err(self.io(format!("remove the entry of {}", listed.snapshot_id)))?;
            pruned.removed.push((listed.snapshot_id, listed.bytes));
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

    /// No process here has this pid: as a run in another container sharing the cache.
    const UNSEEN_PID: &str = "4294967294";

    fn left_long_ago(path: &Path) {
        File::open(path)
            .unwrap()
            .set_modified(SystemTime::now() - 2 * SWEEP_GRACE)
            .unwrap();
    }

    #[test]
    fn the_sweep_removes_only_what_nobody_holds_whatever_the_pid() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(dir.path());
        let copy = dir.path().join(format!("{WORK}build-{UNSEEN_PID}"));
        let partial = dir.path().join(format!("{PARTIAL}snap-1-{UNSEEN_PID}"));
        std::fs::write(&copy, b"image").unwrap();
        std::fs::create_dir(&partial).unwrap();
        std::fs::write(partial.join(IMAGE), b"half").unwrap();
        // Held by their runs, whose pids this process cannot see.
        let held: Vec<Hold> = [&copy, &partial]
            .iter()
            .map(|p| Hold::try_take(p, FlockOperation::NonBlockingLockExclusive).unwrap())
            .collect();
        left_long_ago(&copy);
        left_long_ago(&partial);
        cache.remove_abandoned_partials();
        assert!(copy.exists() && partial.exists(), "held: kept");
        drop(held);
        cache.remove_abandoned_partials();
        assert!(!copy.exists() && !partial.exists(), "let go: removed");
    }

    #[test]
    fn the_sweep_leaves_what_was_just_made_before_its_maker_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(dir.path());
        let copy = dir.path().join(format!("{WORK}build-{UNSEEN_PID}"));
        std::fs::write(&copy, b"image").unwrap();
        cache.remove_abandoned_partials();
        assert!(copy.exists(), "just made");
        left_long_ago(&copy);
        cache.remove_abandoned_partials();
        assert!(!copy.exists(), "left long ago, held by nobody");
    }

    #[test]
    fn a_working_copy_is_held_while_its_bake_lives() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ImageCache::new(dir.path());
        let entry_dir = dir.path().join("snap-1");
        std::fs::create_dir(&entry_dir).unwrap();
        std::fs::write(entry_dir.join(IMAGE), b"base").unwrap();
        std::fs::write(entry_dir.join(DIGESTS), BlockDigests::default().to_bytes()).unwrap();
        let entry = cache.entry("snap-1").unwrap();
        let (path, _, held) = cache.working_copy(&entry, "build", 4096).unwrap();
        left_long_ago(&path);
        cache.remove_abandoned_partials();
        assert!(path.exists(), "a live bake's copy stays");
        assert!(
            Hold::try_take(&path, FlockOperation::NonBlockingLockShared).is_none(),
            "held"
        );
        drop(held);
        assert!(Hold::try_take(&path, FlockOperation::NonBlockingLockShared).is_some());
    }
}
