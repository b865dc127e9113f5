//! What the tarball alone says about an entry, before anything is written: its kind, its
//! path and link target below `dest`, a sparse file's map; and why an entry is refused.

use std::collections::HashMap;
use std::io::Read;

use tar::EntryType;

use crate::host::image_root;

/// Why one entry of the tarball is refused, or could not be placed.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("device nodes are not allowed in an application tarball")]
    DeviceNode,
    #[error("FIFOs are not allowed in an application tarball")]
    Fifo,
    #[error("unsupported entry type {0:?}")]
    Unsupported(EntryType),
    /// tar's own words: "numeric field was not a number: … when getting mode".
    #[error(transparent)]
    Header(std::io::Error),
    #[error("its path leaves the destination (`..`)")]
    PathClimbs,
    #[error("a symlink without a target")]
    SymlinkWithoutTarget,
    #[error("a hard link without a target")]
    LinkWithoutTarget,
    #[error("its link target {0} leaves the destination")]
    LinkClimbs(String),
    #[error("a hard link to the destination itself")]
    LinkToDest,
    #[error("its link target {0} is not in the destination")]
    LinkTargetMissing(String),
    #[error("a sparse file in GNU's old sparse formats 0.0/0.1; make the tarball with GNU tar 1.28 or later, or without --sparse")]
    OldSparseFormat,
    #[error("a sparse file without {0}")]
    SparseKeyMissing(&'static str),
    /// `what` (its path, its link target) resolves through a symlink out of `dest`.
    #[error("{0} leaves the destination through a symlink")]
    Escapes(String),
    #[error("a directory of that name is already there")]
    DirectoryInTheWay,
    #[error("no space left in the image: the entry needs {needed} bytes and {free} bytes are free on its filesystem; raise `root_volume_size_gb`")]
    NoSpace { needed: u64, free: u64 },
    #[error("its data cannot be read to its end: {0}")]
    Unreadable(std::io::Error),
    /// A system call on the way failed: `what` it was doing.
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl EntryError {
    /// `source` as what the entry was doing when it failed.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> EntryError {
        let what = what.into();
        move |source| EntryError::Io { what, source }
    }

    /// A failure to open or make what is below `dest`, `what` naming it: an escape through
    /// a symlink is named as one.
    pub fn below(what: &str) -> impl FnOnce(std::io::Error) -> EntryError + '_ {
        move |e| {
            if image_root::is_escape(&e) {
                EntryError::Escapes(what.to_string())
            } else {
                EntryError::Io {
                    what: what.to_string(),
                    source: e,
                }
            }
        }
    }
}

/// An entry that passed the checks that need no image.
pub struct Admitted {
    pub kind: EntryType,
    /// Its permission bits, as the tarball gives them.
    pub mode: u32,
    /// Where below `dest` it goes, part by part (a sparse file's real name).
    pub parts: Vec<String>,
    pub sparse: Option<SparseMap>,
    /// A symlink's target, as the tarball gives it.
    pub symlink_target: Option<Vec<u8>>,
    /// A hard link's target.
    pub link_target: Option<LinkTarget>,
}

/// Where a hard link points below `dest`: its directory and name there, and the target as
/// the tarball names it, for errors.
pub struct LinkTarget {
    pub dir: String,
    pub leaf: String,
    pub named: String,
}

/// What the tarball alone decides about an entry: its kind is one an application tarball
/// may hold, its header can be read, a link has a target, and neither its path nor a hard
/// link's target climbs out with `..`.
pub fn admit(entry: &mut tar::Entry<impl Read>, path: &str) -> Result<Admitted, EntryError> {
    let kind = entry.header().entry_type();
    match kind {
        EntryType::Char | EntryType::Block => return Err(EntryError::DeviceNode),
        EntryType::Fifo => return Err(EntryError::Fifo),
        EntryType::Regular
        | EntryType::Continuous
        | EntryType::GNUSparse
        | EntryType::Directory
        | EntryType::Symlink
        | EntryType::Link => {}
        other => return Err(EntryError::Unsupported(other)),
    }
    let mode = entry.header().mode().map_err(EntryError::Header)? & 0o7777;
    let sparse = pax_sparse_map(entry)?;
    let name = sparse.as_ref().map_or(path, |s| s.name.as_str());
    let parts = owned_parts(name).map_err(|_| EntryError::PathClimbs)?;
    let symlink_target = if kind == EntryType::Symlink {
        let target = entry
            .link_name_bytes()
            .ok_or(EntryError::SymlinkWithoutTarget)?;
        Some(target.into_owned())
    } else {
        None
    };
    let link_target = if kind == EntryType::Link {
        let target = entry
            .link_name_bytes()
            .ok_or(EntryError::LinkWithoutTarget)?;
        let target = String::from_utf8_lossy(&target).into_owned();
        let target_parts =
            owned_parts(&target).map_err(|_| EntryError::LinkClimbs(target.clone()))?;
        let (leaf, dir) = target_parts.split_last().ok_or(EntryError::LinkToDest)?;
        Some(LinkTarget {
            dir: dir.join("/"),
            leaf: leaf.clone(),
            named: target,
        })
    } else {
        None
    };
    Ok(Admitted {
        kind,
        mode,
        parts,
        sparse,
        symlink_target,
        link_target,
    })
}

fn owned_parts(path: &str) -> std::io::Result<Vec<String>> {
    Ok(image_root::normal_parts(path)?
        .into_iter()
        .map(str::to_string)
        .collect())
}

/// A sparse file as GNU tar writes it in the POSIX format (`--sparse --format=posix`,
/// sparse format 1.0): the real name and size in PAX keys, a map of data regions at the
/// start of the entry's data.
pub struct SparseMap {
    pub name: String,
    pub real_size: u64,
}

fn pax_sparse_map(entry: &mut tar::Entry<impl Read>) -> Result<Option<SparseMap>, EntryError> {
    let Some(extensions) = entry.pax_extensions().map_err(EntryError::Header)? else {
        return Ok(None);
    };
    let mut keys = HashMap::new();
    for ext in extensions.flatten() {
        if let (Ok(k), Ok(v)) = (ext.key(), ext.value()) {
            if k.starts_with("GNU.sparse.") {
                keys.insert(k.to_string(), v.to_string());
            }
        }
    }
    if keys.is_empty() {
        return Ok(None);
    }
    if keys.get("GNU.sparse.major").map(String::as_str) != Some("1") {
        return Err(EntryError::OldSparseFormat);
    }
    let name = keys
        .get("GNU.sparse.name")
        .cloned()
        .ok_or(EntryError::SparseKeyMissing("GNU.sparse.name"))?;
    let real_size = keys
        .get("GNU.sparse.realsize")
        .and_then(|s| s.parse().ok())
        .ok_or(EntryError::SparseKeyMissing("GNU.sparse.realsize"))?;
    Ok(Some(SparseMap { name, real_size }))
}
