//! Base images kept on this machine for the `direct` backend: a snapshot's allocated
//! blocks, fetched once with the EBS direct APIs into a sparse file of the volume's size,
//! with the SHA-256 digest of every block it holds, so a later bake on the same base
//! downloads nothing and can tell which blocks it changed.
//!
//! An entry is a directory named by the snapshot id, holding `image` and `digests`. It is
//! built under a temporary name in the same directory and renamed when complete: a killed
//! run leaves at most a `.partial-*` directory, which no later run trusts and the next
//! fetch removes once its process is gone.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::aws::ebs::{self, BLOCK_SIZE};
use crate::aws::{AwsError, Clients};

const IMAGE: &str = "image";
const DIGESTS: &str = "digests";
const PARTIAL: &str = ".partial-";
/// GetSnapshotBlock calls in flight at once: EBS serves 1,000 a second per snapshot.
pub const FETCH_CONCURRENCY: usize = 32;

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

/// The SHA-256 digest of each block an image holds, by block index.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BlockDigests(pub BTreeMap<u64, [u8; 32]>);

impl BlockDigests {
    /// Stored as 40 bytes a block: the index (little-endian u64), then the digest.
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.0.len() * 40);
        for (index, digest) in &self.0 {
            out.extend_from_slice(&index.to_le_bytes());
            out.extend_from_slice(digest);
        }
        out
    }

    fn from_bytes(bytes: &[u8]) -> Option<BlockDigests> {
        if !bytes.len().is_multiple_of(40) {
            return None;
        }
        let blocks = bytes.chunks(40).map(|chunk| {
            let index = u64::from_le_bytes(chunk[..8].try_into().expect("8 bytes"));
            let digest: [u8; 32] = chunk[8..].try_into().expect("32 bytes");
            (index, digest)
        });
        Some(BlockDigests(blocks.collect()))
    }
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

    /// The complete entry for `snapshot_id`, if there is one.
    pub fn entry(&self, snapshot_id: &str) -> Option<CachedImage> {
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

    /// The entry for `snapshot_id`, fetched first if it is not here: every allocated block,
    /// `FETCH_CONCURRENCY` at a time, each checked against its checksum. `on_block` hears
    /// of each block written, for progress.
    pub async fn fetch(
        &self,
        clients: &Clients,
        snapshot_id: &str,
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
            .fetch_into(clients, snapshot_id, &partial, on_block, cancel)
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
        let digests = Arc::new(Mutex::new(BlockDigests::default()));
        let total = listing.blocks.len();
        let permits = Arc::new(tokio::sync::Semaphore::new(FETCH_CONCURRENCY));
        let mut tasks = tokio::task::JoinSet::new();
        for (index, token) in listing.blocks {
            let (clients, snapshot_id) = (clients.clone(), snapshot_id.to_string());
            let (image, digests, permits) = (image.clone(), digests.clone(), permits.clone());
            tasks.spawn(async move {
                let _permit = permits.acquire_owned().await.expect("never closed");
                let data = ebs::get_block(&clients, &snapshot_id, index, &token).await?;
                let digest: [u8; 32] = Sha256::digest(&data).into();
                let written = tokio::task::spawn_blocking(move || {
                    image.write_all_at(&data, index * BLOCK_SIZE as u64)
                })
                .await
                .expect("the write does not panic");
                digests
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .0
                    .insert(index, digest);
                Ok::<_, CacheError>(written.map_err(|e| (index, e)))
            });
        }
        let mut done = 0;
        loop {
            let next = tokio::select! {
                next = tasks.join_next() => next,
                _ = cancel.cancelled() => {
                    tasks.abort_all();
                    return Err(CacheError::Interrupted { snapshot_id: snapshot_id.to_string() });
                }
            };
            let Some(joined) = next else { break };
            match joined.expect("a fetch task does not panic") {
                Ok(Ok(())) => {
                    done += 1;
                    on_block(done, total);
                }
                Ok(Err((index, e))) => {
                    return Err(self.io(format!("write block {index}"))(e));
                }
                Err(e) => return Err(e),
            }
        }
        image.sync_all().map_err(self.io("sync the image"))?;
        let digests = digests.lock().unwrap_or_else(|p| p.into_inner()).clone();
        std::fs::write(partial.join(DIGESTS), digests.to_bytes())
            .map_err(self.io("write the digests"))?;
        Ok(total)
    }

    /// `.partial-*` directories whose process is gone: what a killed fetch left.
    fn remove_abandoned_partials(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(PARTIAL) else {
                continue;
            };
            let alive = rest
                .rsplit_once('-')
                .and_then(|(_, pid)| pid.parse::<u32>().ok())
                .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
            if !alive {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    /// Complete entries, and what each takes on disk.
    pub fn list(&self) -> Vec<(String, u64)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut listed: Vec<(String, u64)> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                self.entry(&name).map(|entry| {
                    use std::os::unix::fs::MetadataExt;
                    let bytes = std::fs::metadata(&entry.image)
                        .map(|m| m.blocks() * 512)
                        .unwrap_or(0);
                    (name, bytes)
                })
            })
            .collect();
        listed.sort();
        listed
    }
}
