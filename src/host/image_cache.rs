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

use std::path::{Path, PathBuf};
use std::sync::Arc;

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

    fn io(&self, action: impl Into<String>) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
        let action = action.into();
        move |source| CacheError::Io {
            dir: self.dir.clone(),
            action,
            source,
        }
    }

    /// The complete entry for `snapshot_id`, if there is one. Reading it marks it used.
    pub fn entry(&self, snapshot_id: &str) -> Option<CachedImage> {
        let found = self.peek(snapshot_id)?;
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

    /// `.partial-*` directories and `.work-*` copies whose process is gone: what a killed
    /// fetch or bake left.
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
            let alive = rest
                .rsplit_once('-')
                .and_then(|(_, pid)| pid.parse::<u32>().ok())
                .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
            if !alive {
                let path = entry.path();
                let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
            }
        }
    }

    /// A copy of `entry`'s image for one bake to write, `len` bytes long (grown when the
    /// bake's volume is larger than the base's). Its extents are shared with the entry
    /// where the filesystem can (reflink), else only its data is copied.
    pub fn working_copy(
        &self,
        entry: &CachedImage,
        build_id: &str,
        len: u64,
    ) -> Result<(PathBuf, CopiedBy), CacheError> {
        self.remove_abandoned_partials();
        let path = self
            .dir
            .join(format!("{WORK}{build_id}-{}", std::process::id()));
        let copied = copy_sparse(&entry.image, &path, len).map_err(|e| {
            let _ = std::fs::remove_file(&path);
            self.io(format!(
                "copy {} to {}",
                entry.image.display(),
                path.display()
            ))(e)
        })?;
        Ok((path, copied))
    }

    /// Removes the entries not used since `cutoff` (all of them with `None`); answers
    /// what was removed and the bytes freed.
    pub fn prune(
        &self,
        cutoff: Option<std::time::SystemTime>,
    ) -> Result<Vec<(String, u64)>, CacheError> {
        self.remove_abandoned_partials();
        let mut removed = Vec::new();
        for listed in self.list() {
            if cutoff.is_some_and(|cutoff| listed.last_used >= cutoff) {
                continue;
            }
            std::fs::remove_dir_all(self.dir.join(&listed.snapshot_id))
                .map_err(self.io(format!("remove the entry of {}", listed.snapshot_id)))?;
            removed.push((listed.snapshot_id, listed.bytes));
        }
        Ok(removed)
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
