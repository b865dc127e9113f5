//! Putting the code tarball into the image, resolving every path as the booted image would.
//!
//! The unpacking runs in a child process (this binary, `internal-extract`) that first chroots
//! into the mounted image. From there on `/`, absolute symlinks and `..` all mean the image's
//! own: the image's `/var/www -> /srv/www` leads to the image's `/srv/www`, and nothing in the
//! tarball or already in the image can name a host path. Inside, tar's `unpack_in` also
//! refuses `..` entries and writes whose canonical parent leaves the destination; device
//! nodes and FIFOs are refused outright.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;

use serde::{Deserialize, Serialize};
use tar::EntryType;

/// A user and group of the image, by number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// What an extraction put into the image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extracted {
    pub files: u64,
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("tarball entry {index} ({path}): {reason}")]
    Entry {
        index: u64,
        path: String,
        reason: String,
    },
    #[error("tarball is damaged or not a tar archive: {0}")]
    Corrupt(String),
    #[error("owner `{spec}`: {reason}")]
    Owner { spec: String, reason: String },
    #[error("cannot enter the image at {root}: {reason}")]
    Chroot { root: PathBuf, reason: String },
    #[error("cannot create {dest} in the image: {reason}")]
    Dest { dest: String, reason: String },
    #[error("extraction failed: {0}")]
    Child(String),
    #[error("cannot read the tarball {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

// Magic numbers at the start of a compressed stream.
const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// Wraps `input` in the decompressor its first bytes call for: gzip, zstd, or none.
fn decompressed<'a>(input: impl Read + 'a) -> Result<Box<dyn Read + 'a>, ExtractError> {
    let mut input = BufReader::new(input);
    let head = input
        .fill_buf()
        .map_err(|e| ExtractError::Corrupt(e.to_string()))?
        .to_vec();
    Ok(if head.starts_with(GZIP_MAGIC) {
        Box::new(flate2::read::MultiGzDecoder::new(input))
    } else if head.starts_with(ZSTD_MAGIC) {
        Box::new(
            zstd::stream::read::Decoder::with_buffer(input)
                .map_err(|e| ExtractError::Corrupt(e.to_string()))?,
        )
    } else {
        Box::new(input)
    })
}

/// Unpacks a tar stream into `dest` of the current root. Run inside the image's chroot.
/// `on_progress` hears the running totals after each entry.
pub fn unpack(
    input: impl Read,
    dest: &Path,
    owner: Option<Owner>,
    mut on_progress: impl FnMut(Extracted),
) -> Result<Extracted, ExtractError> {
    let mut archive = tar::Archive::new(decompressed(input)?);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    let mut done = Extracted::default();
    let entries = archive
        .entries()
        .map_err(|e| ExtractError::Corrupt(e.to_string()))?;
    for (index, entry) in entries.enumerate() {
        let index = index as u64 + 1;
        let mut entry =
            entry.map_err(|e| ExtractError::Corrupt(format!("at entry {index}: {e}")))?;
        let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let refuse = |reason: String| ExtractError::Entry {
            index,
            path: path.clone(),
            reason,
        };
        match entry.header().entry_type() {
            EntryType::Regular
            | EntryType::Continuous
            | EntryType::Directory
            | EntryType::Symlink
            | EntryType::Link => {}
            EntryType::Char | EntryType::Block => {
                return Err(refuse(
                    "device nodes are not allowed in an application tarball".into(),
                ))
            }
            EntryType::Fifo => {
                return Err(refuse(
                    "FIFOs are not allowed in an application tarball".into(),
                ))
            }
            other => return Err(refuse(format!("unsupported entry type {other:?}"))),
        }
        let size = entry.header().size().unwrap_or(0);
        let unpacked = entry
            .unpack_in(dest)
            .map_err(|e| refuse(crate::engine::error_chain(&e)))?;
        if !unpacked {
            return Err(refuse("its path leaves the destination (`..`)".into()));
        }
        if let Some(owner) = owner {
            let target = dest.join(normal_components(&path));
            std::os::unix::fs::lchown(&target, Some(owner.uid), Some(owner.gid))
                .map_err(|e| refuse(format!("cannot change its owner: {e}")))?;
        }
        done.files += 1;
        done.bytes += size;
        on_progress(done);
    }
    Ok(done)
}

/// The path tar unpacks an entry to, relative to the destination.
fn normal_components(path: &str) -> PathBuf {
    Path::new(path)
        .components()
        .filter_map(|c| match c {
            Component::Normal(part) => Some(part),
            _ => None,
        })
        .collect()
}

/// `user` or `user:group`, by name or number, looked up in the image's own /etc/passwd and
/// /etc/group (`etc` is that directory as seen from where this runs).
pub fn resolve_owner(spec: &str, etc: &Path) -> Result<Owner, ExtractError> {
    let fail = |reason: String| ExtractError::Owner {
        spec: spec.into(),
        reason,
    };
    let table = |file: &str| -> Result<HashMap<String, (u32, u32)>, ExtractError> {
        let text = std::fs::read_to_string(etc.join(file))
            .map_err(|e| fail(format!("cannot read the image's /etc/{file}: {e}")))?;
        Ok(text
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split(':').collect();
                let id = fields.get(2)?.parse().ok()?;
                let group = fields.get(3).and_then(|g| g.parse().ok()).unwrap_or(id);
                Some((fields[0].to_string(), (id, group)))
            })
            .collect())
    };
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let (uid, primary_gid) = match user.parse::<u32>() {
        Ok(uid) => (uid, uid),
        Err(_) => *table("passwd")?
            .get(user)
            .ok_or_else(|| fail(format!("no user `{user}` in the image's /etc/passwd")))?,
    };
    let gid = match group {
        None => primary_gid,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                table("group")?
                    .get(g)
                    .ok_or_else(|| fail(format!("no group `{g}` in the image's /etc/group")))?
                    .0
            }
        },
    };
    Ok(Owner { uid, gid })
}

/// One line of the child's progress report on stdout.
#[derive(Debug, Serialize, Deserialize)]
struct Report {
    files: u64,
    bytes: u64,
    /// Of the tarball as given (compressed): how far the extraction has read.
    read: u64,
}

/// Counts what passes through, so progress can be told against the tarball's size.
struct Counting<R> {
    inner: R,
    read: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<R: std::io::Read> std::io::Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.set(self.read.get() + n as u64);
        Ok(n)
    }
}

/// The child's side (`amibake internal-extract`): enter the image, then unpack standard input
/// into `dest`, reporting progress as JSON lines on stdout.
pub fn child_main(root: &Path, dest: &str, owner: Option<&str>) -> Result<Extracted, ExtractError> {
    std::os::unix::fs::chroot(root).map_err(|e| ExtractError::Chroot {
        root: root.into(),
        reason: e.to_string(),
    })?;
    std::env::set_current_dir("/").map_err(|e| ExtractError::Chroot {
        root: root.into(),
        reason: e.to_string(),
    })?;
    let owner = owner
        .map(|spec| resolve_owner(spec, Path::new("/etc")))
        .transpose()?;
    // Created inside the chroot, so symlinks on the way resolve as the image resolves them.
    std::fs::create_dir_all(dest).map_err(|e| ExtractError::Dest {
        dest: dest.into(),
        reason: e.to_string(),
    })?;
    let mut out = std::io::stdout().lock();
    let mut last_report = std::time::Instant::now();
    let read = std::rc::Rc::new(std::cell::Cell::new(0));
    let report = |done: Extracted, out: &mut std::io::StdoutLock| {
        let _ = serde_json::to_writer(
            &mut *out,
            &Report {
                files: done.files,
                bytes: done.bytes,
                read: read.get(),
            },
        );
        let _ = writeln!(out);
    };
    let input = Counting {
        inner: std::io::stdin().lock(),
        read: read.clone(),
    };
    let done = unpack(input, Path::new(dest), owner, |done| {
        if last_report.elapsed() >= PROGRESS_EVERY {
            report(done, &mut out);
            last_report = std::time::Instant::now();
        }
    })?;
    report(done, &mut out);
    Ok(done)
}

/// How often the child reports progress: often enough for a live bar, rarely enough that a
/// tarball of many small files does not become a flood of events.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Where the tarball comes from.
#[derive(Debug, Clone)]
pub enum Tarball {
    File(PathBuf),
    Stdin,
}

/// The parent's side: unpacks `tarball` into `dest` inside the image mounted at `root`,
/// through a chrooted child run from `amibake_exe` (this binary: `std::env::current_exe()`).
/// `on_progress` hears the running totals and how many bytes of the tarball (as given,
/// compressed) have been read; `cancel` kills the child.
pub async fn extract_into_image(
    amibake_exe: &Path,
    root: &Path,
    dest: &str,
    owner: Option<&str>,
    tarball: &Tarball,
    mut on_progress: impl FnMut(Extracted, u64),
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<Extracted, ExtractError> {
    use tokio::io::AsyncBufReadExt;

    let mut command = tokio::process::Command::new(amibake_exe);
    command
        .arg("internal-extract")
        .arg("--root")
        .arg(root)
        .arg("--dest")
        .arg(dest);
    if let Some(owner) = owner {
        command.arg("--owner").arg(owner);
    }
    // The tarball file, or our own standard input, is the child's standard input.
    let input = match tarball {
        Tarball::File(path) => {
            Stdio::from(
                std::fs::File::open(path).map_err(|source| ExtractError::Read {
                    path: path.clone(),
                    source,
                })?,
            )
        }
        Tarball::Stdin => Stdio::inherit(),
    };
    let mut child = command
        .stdin(input)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| ExtractError::Child(format!("cannot start the extraction: {e}")))?;
    let mut stderr = child.stderr.take().expect("piped");
    let errors = tokio::spawn(async move {
        let mut text = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text).await;
        text
    });
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut last = Extracted::default();
    loop {
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(line)) => {
                    if let Ok(report) = serde_json::from_str::<Report>(&line) {
                        last = Extracted { files: report.files, bytes: report.bytes };
                        on_progress(last, report.read);
                    }
                }
                _ => break,
            },
            _ = cancel.cancelled() => {
                let _ = child.kill().await;
                return Err(ExtractError::Child("interrupted".into()));
            }
        }
    }
    let status = child
        .wait()
        .await
        .map_err(|e| ExtractError::Child(e.to_string()))?;
    let message = errors.await.unwrap_or_default();
    if !status.success() {
        let message = message.trim().trim_start_matches("error: ");
        return Err(ExtractError::Child(if message.is_empty() {
            format!("the extraction exited with {status}")
        } else {
            message.to_string()
        }));
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn etc_with(passwd: &str, group: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("passwd"), passwd).unwrap();
        std::fs::write(dir.path().join("group"), group).unwrap();
        dir
    }

    #[test]
    fn owners_come_from_the_image_files() {
        let etc = etc_with("root:x:0:0::/root:/bin/sh\nwww-data:x:33:33::/var/www:/bin/sh\napp:x:4242:100::/srv:/bin/sh\n", "users:x:100:\nweb:x:5000:\n");
        assert_eq!(
            resolve_owner("www-data", etc.path()).unwrap(),
            Owner { uid: 33, gid: 33 }
        );
        assert_eq!(
            resolve_owner("app", etc.path()).unwrap(),
            Owner {
                uid: 4242,
                gid: 100
            }
        );
        assert_eq!(
            resolve_owner("app:web", etc.path()).unwrap(),
            Owner {
                uid: 4242,
                gid: 5000
            }
        );
        assert_eq!(
            resolve_owner("1001:1002", etc.path()).unwrap(),
            Owner {
                uid: 1001,
                gid: 1002
            }
        );
        let err = resolve_owner("nobody-here", etc.path())
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "owner `nobody-here`: no user `nobody-here` in the image's /etc/passwd"
        );
        assert!(resolve_owner("app:nogroup", etc.path())
            .unwrap_err()
            .to_string()
            .contains("no group `nogroup`"));
    }

    #[test]
    fn normal_components_drop_roots_and_dots() {
        assert_eq!(normal_components("/a/./b//c"), PathBuf::from("a/b/c"));
    }
}
