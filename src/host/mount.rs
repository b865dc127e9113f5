//! Mounting the image and preparing it as a chroot, and undoing both.
//!
//! While amibake works in the image: the kernel filesystems a package script expects (proc,
//! sys, dev, devpts, a tmpfs /run), the host's resolv.conf so commands can resolve names, and
//! on Debian-family images a policy-rc.d that keeps package installs from starting services
//! inside the chroot. Undoing restores the image's own files exactly and unmounts in reverse,
//! retrying while busy and naming the processes that hold a mount that will not let go.
//!
//! These functions block (they run mount(8) and wait between retries): async callers run them
//! with `tokio::task::spawn_blocking`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// How often, and how far apart, an unmount is retried while the mount is busy.
const UNMOUNT_ATTEMPTS: u32 = 20;
const UNMOUNT_PAUSE: Duration = Duration::from_millis(250);

/// What Debian's invoke-rc.d reads: exit 101 means "action forbidden", so no service starts.
const POLICY_RC_D: &str =
    "#!/bin/sh\n# written by amibake while it works in this image\nexit 101\n";

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mount {source_desc} on {target} failed: {reason}")]
    Mount {
        source_desc: String,
        target: PathBuf,
        reason: String,
    },
    #[error("cannot unmount {target}: {reason}{holders}")]
    Unmount {
        target: PathBuf,
        reason: String,
        holders: String,
    },
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
}

fn run_mount(args: &[&str], source_desc: &str, target: &Path) -> Result<(), MountError> {
    let out = Command::new("mount")
        .args(args)
        .arg(target)
        .output()
        .map_err(|e| MountError::Mount {
            source_desc: source_desc.into(),
            target: target.into(),
            reason: e.to_string(),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(MountError::Mount {
            source_desc: source_desc.into(),
            target: target.into(),
            reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Mounts the image's root filesystem from `device` at `target`.
pub fn mount_root(device: &Path, target: &Path) -> Result<(), MountError> {
    std::fs::create_dir_all(target).map_err(|e| MountError::File {
        path: target.into(),
        reason: e.to_string(),
    })?;
    let device_text = device.display().to_string();
    run_mount(&[&device_text], &device_text, target)
}

/// Unmounts `target`, retrying while it is busy; the last error names who holds it.
pub fn unmount(target: &Path) -> Result<(), MountError> {
    let mut reason = String::new();
    for attempt in 0..UNMOUNT_ATTEMPTS {
        if !is_mount_point(target) {
            return Ok(());
        }
        let out = Command::new("umount")
            .arg(target)
            .output()
            .map_err(|e| MountError::Unmount {
                target: target.into(),
                reason: e.to_string(),
                holders: String::new(),
            })?;
        if out.status.success() {
            return Ok(());
        }
        reason = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if attempt + 1 < UNMOUNT_ATTEMPTS {
            std::thread::sleep(UNMOUNT_PAUSE);
        }
    }
    let holders = holders_of(target);
    let holders = if holders.is_empty() {
        String::new()
    } else {
        format!(" (held by {})", holders.join(", "))
    };
    Err(MountError::Unmount {
        target: target.into(),
        reason,
        holders,
    })
}

/// Whether `path` is exactly a mount point, from the kernel's own table.
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(canonical) = path.canonicalize() else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mounts")
        .map(|table| {
            table.lines().any(|line| {
                line.split(' ').nth(1).map(unescape_mount_path).as_deref()
                    == Some(canonical.as_path())
            })
        })
        .unwrap_or(false)
}

/// /proc/mounts writes space, tab, newline and backslash as octal escapes.
fn unescape_mount_path(field: &str) -> PathBuf {
    PathBuf::from(
        field
            .replace("\\040", " ")
            .replace("\\011", "\t")
            .replace("\\012", "\n")
            .replace("\\134", "\\"),
    )
}

/// How long processes left running in an image get to exit on SIGTERM before SIGKILL.
const PROCESS_EXIT_GRACE: Duration = Duration::from_secs(2);

/// Ends every process chrooted into the image at `root`: what a provisioner started and left
/// running in the background (a daemon that called setsid escapes its process group). They
/// would hold the mounts, and nothing they do belongs in the image. Returns them, named.
pub fn end_processes_rooted_in(root: &Path) -> Vec<String> {
    let Ok(root) = root.canonicalize() else {
        return Vec::new();
    };
    let rooted = || -> Vec<(String, String)> {
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        procs
            .flatten()
            .filter_map(|p| {
                let pid = p.file_name().to_string_lossy().into_owned();
                let inside = pid.chars().all(|c| c.is_ascii_digit())
                    && std::fs::read_link(p.path().join("root"))
                        .is_ok_and(|r| r.starts_with(&root));
                inside.then(|| {
                    let name = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
                    (pid, name.trim().to_string())
                })
            })
            .collect()
    };
    let found = rooted();
    if found.is_empty() {
        return Vec::new();
    }
    let signal = |name: &str, pids: &[(String, String)]| {
        let _ = Command::new("kill")
            .arg(format!("-{name}"))
            .args(pids.iter().map(|(pid, _)| pid))
            .output();
    };
    signal("TERM", &found);
    let deadline = std::time::Instant::now() + PROCESS_EXIT_GRACE;
    while std::time::Instant::now() < deadline && !rooted().is_empty() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let stubborn = rooted();
    if !stubborn.is_empty() {
        signal("KILL", &stubborn);
    }
    found
        .into_iter()
        .map(|(pid, name)| format!("pid {pid} ({name})"))
        .collect()
}

/// Processes whose root, working directory or open files lie under `target`: "pid 42 (php-fpm)".
fn holders_of(target: &Path) -> Vec<String> {
    let Ok(target) = target.canonicalize() else {
        return Vec::new();
    };
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for proc_dir in procs.flatten() {
        let pid = proc_dir.file_name().to_string_lossy().into_owned();
        if !pid.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let p = proc_dir.path();
        let under = |link: PathBuf| std::fs::read_link(link).is_ok_and(|t| t.starts_with(&target));
        let open_files = std::fs::read_dir(p.join("fd"))
            .map(|fds| fds.flatten().any(|fd| under(fd.path())))
            .unwrap_or(false);
        if under(p.join("root")) || under(p.join("cwd")) || open_files {
            let name = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
            found.push(format!("pid {pid} ({})", name.trim()));
        }
    }
    found
}

/// The kernel filesystems a chroot needs, in mount order: (what, where under the root, mount args).
fn chroot_filesystems() -> [(&'static str, &'static str, &'static [&'static str]); 5] {
    [
        ("proc", "proc", &["-t", "proc", "proc"]),
        ("sysfs", "sys", &["-t", "sysfs", "sysfs"]),
        ("/dev", "dev", &["--bind", "/dev"]),
        (
            "devpts",
            "dev/pts",
            &["-t", "devpts", "-o", "newinstance,ptmxmode=0666", "devpts"],
        ),
        ("tmpfs", "run", &["-t", "tmpfs", "-o", "mode=0755", "tmpfs"]),
    ]
}

/// Mounts the chroot filesystems under `root`. Each mount that succeeded is in the returned
/// list before the next is tried, so a failure part way leaves a list to undo.
pub fn mount_chroot_filesystems(root: &Path, mounted: &mut Vec<PathBuf>) -> Result<(), MountError> {
    for (what, under, args) in chroot_filesystems() {
        let target = root.join(under);
        std::fs::create_dir_all(&target).map_err(|e| MountError::File {
            path: target.clone(),
            reason: e.to_string(),
        })?;
        run_mount(args, what, &target)?;
        mounted.push(target.clone());
        if under == "dev" {
            // A bind of the host's /dev must not pass later mounts (devpts) back to the host.
            run_mount(&["--make-private"], "/dev (private)", &target)?;
        }
    }
    Ok(())
}

/// Unmounts `mounted` in reverse, going on past failures; returns every failure.
pub fn unmount_all(mounted: &mut Vec<PathBuf>) -> Vec<MountError> {
    let mut errors = Vec::new();
    while let Some(target) = mounted.pop() {
        if let Err(e) = unmount(&target) {
            errors.push(e);
        }
    }
    errors
}

/// Files amibake puts into the image while it works, and what they replaced.
#[derive(Debug, Default)]
pub struct TemporaryFiles {
    /// (path in the image, the image's own content, or None if it had none)
    replaced: Vec<(PathBuf, Option<Saved>)>,
}

#[derive(Debug)]
enum Saved {
    File(Vec<u8>, std::fs::Permissions),
    Symlink(PathBuf),
}

impl TemporaryFiles {
    /// Puts `content` at `path` (inside the image) until `restore`, remembering what was there.
    pub fn put(&mut self, path: &Path, content: &[u8], mode: u32) -> Result<(), MountError> {
        use std::os::unix::fs::PermissionsExt;
        let err = |e: std::io::Error| MountError::File {
            path: path.into(),
            reason: e.to_string(),
        };
        let saved = match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                Some(Saved::Symlink(std::fs::read_link(path).map_err(err)?))
            }
            Ok(meta) => Some(Saved::File(
                std::fs::read(path).map_err(err)?,
                meta.permissions(),
            )),
            Err(_) => None,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(err)?;
        }
        // A symlink (resolv.conf often is one) is replaced, never written through.
        if matches!(saved, Some(Saved::Symlink(_))) {
            std::fs::remove_file(path).map_err(err)?;
        }
        self.replaced.push((path.into(), saved));
        std::fs::write(path, content).map_err(err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)
    }

    /// Puts back what the image had, newest first; returns what could not be restored.
    pub fn restore(&mut self) -> Vec<MountError> {
        let mut errors = Vec::new();
        while let Some((path, saved)) = self.replaced.pop() {
            let result = (|| {
                std::fs::remove_file(&path).or_else(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })?;
                match saved {
                    None => Ok(()),
                    Some(Saved::Symlink(target)) => std::os::unix::fs::symlink(target, &path),
                    Some(Saved::File(bytes, perms)) => std::fs::write(&path, bytes)
                        .and_then(|_| std::fs::set_permissions(&path, perms)),
                }
            })();
            if let Err(e) = result {
                errors.push(MountError::File {
                    path,
                    reason: e.to_string(),
                });
            }
        }
        errors
    }
}

/// The chroot's temporary files: the host's resolv.conf, and a policy-rc.d on images that
/// use invoke-rc.d (Debian and its family).
pub fn put_chroot_files(root: &Path, files: &mut TemporaryFiles) -> Result<(), MountError> {
    let resolv = std::fs::read("/etc/resolv.conf").unwrap_or_default();
    files.put(&root.join("etc/resolv.conf"), &resolv, 0o644)?;
    if root.join("usr/sbin/invoke-rc.d").exists() {
        files.put(
            &root.join("usr/sbin/policy-rc.d"),
            POLICY_RC_D.as_bytes(),
            0o755,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_files_put_back_files_links_and_absences() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("etc/resolv.conf");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, "nameserver 10.0.0.2\n").unwrap();
        let link = dir.path().join("etc/hosts");
        std::os::unix::fs::symlink("/run/hosts", &link).unwrap();
        let absent = dir.path().join("usr/sbin/policy-rc.d");

        let mut files = TemporaryFiles::default();
        files.put(&file, b"host resolver\n", 0o644).unwrap();
        files.put(&link, b"host hosts\n", 0o644).unwrap();
        files.put(&absent, POLICY_RC_D.as_bytes(), 0o755).unwrap();
        assert_eq!(std::fs::read_to_string(&link).unwrap(), "host hosts\n");
        assert!(
            std::fs::read_link(Path::new("/run/hosts")).is_err(),
            "the link's target was never written"
        );

        assert!(files.restore().is_empty());
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            "nameserver 10.0.0.2\n"
        );
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new("/run/hosts"));
        assert!(!absent.exists());
    }

    #[test]
    fn mount_table_paths_are_unescaped() {
        assert_eq!(
            unescape_mount_path("/mnt/with\\040space"),
            PathBuf::from("/mnt/with space")
        );
    }
}
