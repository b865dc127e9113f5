//! `amibake cache ls|prune`: the direct backend's base images kept on this machine.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::host::image_cache::{ImageCache, ListedEntry};

#[derive(Debug, thiserror::Error)]
pub enum CacheCommandError {
    #[error("no cache directory: pass --cache-dir, or set XDG_CACHE_HOME or HOME")]
    NoDirectory,
    #[error(transparent)]
    Cache(#[from] crate::host::image_cache::CacheError),
}

/// The cache at `dir`, else at its default place.
pub fn open(dir: Option<PathBuf>) -> Result<ImageCache, CacheCommandError> {
    dir.or_else(ImageCache::default_dir)
        .map(ImageCache::new)
        .ok_or(CacheCommandError::NoDirectory)
}

#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Listing {
    pub cache_dir: PathBuf,
    pub entries: Vec<ListedEntry>,
    pub bytes: u64,
}

pub fn ls(cache: &ImageCache) -> Listing {
    let entries = cache.list();
    Listing {
        cache_dir: cache.dir().to_path_buf(),
        bytes: entries.iter().map(|e| e.bytes).sum(),
        entries,
    }
}

#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Pruned {
    pub cache_dir: PathBuf,
    /// (snapshot id, bytes freed)
    pub removed: Vec<(String, u64)>,
    /// Entries old enough to go that a bake is using: kept.
    pub in_use: Vec<String>,
    pub freed_bytes: u64,
    pub kept: usize,
}

/// Removes the entries unused for `older_than` (every entry with `None`).
pub fn prune(
    cache: &ImageCache,
    older_than: Option<Duration>,
) -> Result<Pruned, CacheCommandError> {
    let cutoff = older_than.map(|age| SystemTime::now() - age);
    let pruned = cache.prune(cutoff)?;
    Ok(Pruned {
        cache_dir: cache.dir().to_path_buf(),
        freed_bytes: pruned.removed.iter().map(|(_, b)| b).sum(),
        kept: cache.list().len(),
        removed: pruned.removed,
        in_use: pruned.in_use,
    })
}

/// Bytes as a person reads them.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

impl Listing {
    pub fn lines(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .entries
            .iter()
            .map(|e| {
                format!(
                    "{}  {:>10} on disk  {} volume  {} blocks  last used {}",
                    e.snapshot_id,
                    human_bytes(e.bytes),
                    human_bytes(e.volume_bytes),
                    e.blocks,
                    humantime::format_rfc3339_seconds(e.last_used)
                )
            })
            .collect();
        lines.push(format!(
            "{} base images, {} in {}",
            self.entries.len(),
            human_bytes(self.bytes),
            self.cache_dir.display()
        ));
        lines
    }
}

impl Pruned {
    pub fn lines(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .removed
            .iter()
            .map(|(id, bytes)| format!("removed {id} ({})", human_bytes(*bytes)))
            .chain(
                self.in_use
                    .iter()
                    .map(|id| format!("kept {id}: a bake is using it")),
            )
            .collect();
        lines.push(format!(
            "freed {} in {}; {} base images kept",
            human_bytes(self.freed_bytes),
            self.cache_dir.display(),
            self.kept
        ));
        lines
    }
}
