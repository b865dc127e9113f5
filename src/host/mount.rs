//! Mounting the image's root filesystem on the build host, and the files amibake puts into
//! the image while it works there; undoing both.
//!
//! Only the root filesystem is ever mounted in the host's namespace: the kernel filesystems
//! a package script expects are mounted by the sandbox, in its own namespace (`sandbox`).
//! While amibake works in the image it holds the host's resolv.conf, so commands can resolve
//! names, and on Debian-family images a policy-rc.d that keeps package installs from
//! starting services. Both are put and taken back through `image_root`, as the image
//! resolves their paths and never through a link to the host, restoring the image's own
//! files exactly. Unmounting retries while busy and names who holds a mount that will not
//! let go; it is done once the filesystem is written out, which a copy of the mount in
//! another mount namespace can hold off (`wait_released`).
//!
//! These functions block (they run mount(8) and wait between retries): async callers run them
//! with `tokio::task::spawn_blocking`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rustix::fs::{FileType, Mode, OFlags};

use super::image_root::{file_kind, read_regular, ImageRoot, Leaf, READ_LIMIT};

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

/// Mounts the image's root filesystem from `device` at `target`, with `noatime`: what the
/// bake only reads of the base (/etc/passwd for the owner, the shell a provisioner runs)
/// would otherwise have its access time written, and each such inode is a changed block
/// of the new snapshot holding nothing the bake meant to change.
pub fn mount_root(device: &Path, target: &Path) -> Result<(), MountError> {
    std::fs::create_dir_all(target).map_err(|e| MountError::File {
        path: target.into(),
        reason: e.to_string(),
    })?;
    let device_text = device.display().to_string();
    // Every Amazon Linux 2023 image's XFS root has one UUID, the build host's own among them,
    // and XFS refuses a second mount of a UUID in use unless told `nouuid`.
    let xfs = std::fs::File::open(device)
        .and_then(|d| super::filesystem::probe(&d, 0))
        .is_ok_and(|fs| fs.is_some_and(|fs| fs.kind == super::filesystem::FsKind::Xfs));
    let options = if xfs { "noatime,nouuid" } else { "noatime" };
    run_mount(&["-o", options, &device_text], &device_text, target)
}

/// Grows the root filesystem on `device` to fill it, so a `volume_size_gb` larger than
/// the base's is room the tarball can use: ext2/3/4 offline before the mount (checked with
/// e2fsck first, as resize2fs asks; online growing needs CAP_SYS_RESOURCE, which a CI
/// container may lack), XFS once mounted at `target` (it only grows online). Returns the
/// filesystem's size in bytes, `target` mounted. A root on a partition grows only as far as
/// its partition, which this does not change (a bake grows the partition first: `loop_root`).
pub fn mount_grown(device: &Path, target: &Path) -> Result<u64, MountError> {
    let fail = |reason: String| MountError::File {
        path: device.into(),
        reason,
    };
    let run = |program: &str, args: &[&std::ffi::OsStr], ok_codes: &[i32]| {
        let out = Command::new(program)
            .args(args)
            .output()
            .map_err(|e| fail(format!("cannot run {program}: {e}")))?;
        if out.status.code().is_some_and(|c| ok_codes.contains(&c)) {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(fail(format!(
                "{program} failed: {} {}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    };
    let dev = device.as_os_str();
    let fstype = run(
        "blkid",
        &[
            "-o".as_ref(),
            "value".as_ref(),
            "-s".as_ref(),
            "TYPE".as_ref(),
            dev,
        ],
        &[0],
    )?;
    match fstype.as_str() {
        "ext2" | "ext3" | "ext4" => {
            // e2fsck -p: 0 clean, 1 errors it corrected.
            run("e2fsck", &["-f".as_ref(), "-p".as_ref(), dev], &[0, 1])?;
            run("resize2fs", &[dev], &[0])?;
            mount_root(device, target)?;
        }
        "xfs" => {
            mount_root(device, target)?;
            run("xfs_growfs", &[target.as_os_str()], &[0])?;
        }
        other => return Err(fail(format!("cannot grow a `{other}` filesystem"))),
    }
    let stat = rustix::fs::statvfs(target).map_err(|e| fail(e.to_string()))?;
    Ok(stat.f_blocks * stat.f_frsize)
}

/// Writes out what the filesystem mounted at `target` still holds in memory (syncfs), so
/// the unmount after it is quick; meanwhile tells `written(done, total)` how much of what
/// was waiting to be written, by the kernel's count for the whole machine (Dirty and
/// Writeback in /proc/meminfo), is out. Blocks.
pub fn flush(target: &Path, mut written: impl FnMut(u64, u64)) -> std::io::Result<()> {
    const LOOK_EVERY: Duration = Duration::from_millis(250);
    let dir = std::fs::File::open(target)?;
    let waiting = || std::fs::read_to_string("/proc/meminfo").map_or(0, |m| waiting_bytes(&m));
    let total = waiting();
    let syncing = std::thread::spawn(move || rustix::fs::syncfs(&dir));
    while !syncing.is_finished() && total > 0 {
        written(total.saturating_sub(waiting()), total);
        std::thread::sleep(LOOK_EVERY);
    }
    if total > 0 {
        written(total, total);
    }
    syncing
        .join()
        .map_err(|_| std::io::Error::other("syncfs panicked"))?
        .map_err(std::io::Error::from)
}

/// Writes out, every `WritingOut::EVERY` until stopped, what the filesystem mounted at a
/// target holds in memory: the writing an unmount would do at the end is done meanwhile,
/// on the core the extraction leaves (the kernel itself starts only once a tenth of the
/// machine's memory waits to be written, or after 30 s). Its open directory would make
/// the unmount busy: whoever unmounts stops it first (a bake, through its undo stack).
pub struct WritingOut {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl WritingOut {
    pub const EVERY: Duration = Duration::from_millis(500);

    /// Starts on the filesystem mounted at `target` (its root directory, never a link).
    pub fn start(target: &Path) -> std::io::Result<WritingOut> {
        let root = std::sync::Arc::new(rustix::fs::open(
            target,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?);
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Self::EVERY) => {}
                    _ = stopped.cancelled() => return,
                }
                let root = root.clone();
                // What fails to be written here, the unmount meets again and says.
                let _ = tokio::task::spawn_blocking(move || rustix::fs::syncfs(&*root)).await;
            }
        });
        Ok(WritingOut {
            stop,
            task: tokio::sync::Mutex::new(Some(task)),
        })
    }

    /// Stops once a write-out under way has ended: nothing of it holds the filesystem
    /// after. Again, or at once from elsewhere, it waits for the same end.
    pub async fn stop(&self) {
        self.stop.cancel();
        if let Some(task) = self.task.lock().await.take() {
            let _ = task.await;
        }
    }
}

/// Bytes the kernel has yet to write out: Dirty plus Writeback, from /proc/meminfo's text.
fn waiting_bytes(meminfo: &str) -> u64 {
    meminfo
        .lines()
        .filter(|l| l.starts_with("Dirty:") || l.starts_with("Writeback:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum::<u64>()
        * 1024
}

/// Unmounts `target`, retrying while it is busy; the last error names who holds it. Done
/// once its filesystem is written out and let go of everywhere, waiting up to `wait`
/// (`wait_released`): that of `device` where the caller knows it, waited for even when
/// `target` is unmounted already (a cleanup after a wait that ran out); else that of what
/// is mounted there, unless this namespace mounts it elsewhere too (a bind mount).
pub fn unmount(target: &Path, device: Option<&Path>, wait: Duration) -> Result<(), MountError> {
    let mut reason = String::new();
    let known = device.and_then(MountedDevice::of_node);
    let strict = known.is_some();
    let device = known.or_else(|| device_mounted_at(&target.canonicalize().ok()?));
    let released = |device: Option<MountedDevice>| match device {
        Some(device) if strict || !mounted_here(&device.number) => wait_released(&device, wait)
            .map_err(|holders| MountError::Unmount {
                target: target.into(),
                reason: LIVES_ON.into(),
                holders: format!(" (held by {holders})"),
            }),
        _ => Ok(()),
    };
    for attempt in 0..UNMOUNT_ATTEMPTS {
        if !is_mount_point(target) {
            return released(device);
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
            return released(device);
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

/// Every mount point of this machine's mount namespace, from the kernel's own table.
pub fn mount_points() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|table| {
            table
                .lines()
                .filter_map(|line| line.split(' ').nth(1).map(unescape_mount_path))
                .collect()
        })
        .unwrap_or_default()
}

/// /proc/mounts writes space, tab, newline and backslash as octal escapes.
/// Where the mount `mount_id` is now, as /proc/self/mountinfo says (a path with no symlink in
/// it), or None when it is gone.
pub fn mount_point_of(mount_id: u64) -> std::io::Result<Option<PathBuf>> {
    let table = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(table.lines().find_map(|line| {
        let mut fields = line.split(' ');
        let id: u64 = fields.next()?.parse().ok()?;
        if id != mount_id {
            return None;
        }
        // After the id: the parent's id, the device, the root within it, the mount point.
        fields.nth(3).map(unescape_mount_path)
    }))
}

/// How long an unmounted filesystem may live on in another mount namespace before its
/// unmount is called failed (inside the 10 s a CI gives a run between SIGTERM and
/// SIGKILL), and how often that is looked at. A cleanup after a wait that ran out looks
/// once more, briefly.
pub const RELEASE_WAIT: Duration = Duration::from_secs(10);
pub const RELEASE_RECHECK: Duration = Duration::from_secs(1);
const RELEASE_POLL: Duration = Duration::from_millis(20);

/// How long an unmount's undo waits for its filesystem to be let go of: in full the first
/// time, briefly once a wait has run out (the cleanup after it then only looks again).
#[derive(Debug, Default, Clone)]
pub struct ReleaseWaits(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl ReleaseWaits {
    pub fn next(&self) -> Duration {
        if self.0.load(std::sync::atomic::Ordering::Relaxed) {
            RELEASE_RECHECK
        } else {
            RELEASE_WAIT
        }
    }

    pub fn record<T, E>(&self, result: &Result<T, E>) {
        if result.is_err() {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Why an unmount that succeeded here failed.
pub const LIVES_ON: &str = "unmounted here, but its filesystem lives on in another mount \
     namespace (one made while it was mounted), and is not written out until that lets go";

/// A block device a filesystem is mounted from: its number as mountinfo writes it
/// (`7:3`), and its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountedDevice {
    number: String,
    node: PathBuf,
}

impl MountedDevice {
    /// The block device at `node` (a link to one is resolved now: udev rewrites links),
    /// none for anything else.
    pub fn of_node(node: &Path) -> Option<MountedDevice> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let node = node.canonicalize().ok()?;
        let meta = std::fs::metadata(&node).ok()?;
        meta.file_type().is_block_device().then(|| MountedDevice {
            number: format!(
                "{}:{}",
                rustix::fs::major(meta.rdev()),
                rustix::fs::minor(meta.rdev())
            ),
            node,
        })
    }
}

/// The block device mounted at `target` (canonical), as /proc/self/mountinfo says; none
/// for what is not on a block device.
fn device_mounted_at(target: &Path) -> Option<MountedDevice> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let (number, source) = table.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        let fields: Vec<&str> = mount.split(' ').collect();
        (unescape_mount_path(fields.get(4)?) == target).then(|| {
            let source = unescape_mount_path(fs.split(' ').nth(1).unwrap_or_default());
            (fields.get(2).map(|n| n.to_string()), source)
        })
    })?;
    let number = number?;
    let is_it = |node: &Path| MountedDevice::of_node(node).filter(|d| d.number == number);
    // The mount's source, else the name the kernel gives the device.
    is_it(&source).or_else(|| {
        let uevent = std::fs::read_to_string(format!("/sys/dev/block/{number}/uevent")).ok()?;
        let name = uevent.lines().find_map(|l| l.strip_prefix("DEVNAME="))?;
        is_it(&Path::new("/dev").join(name))
    })
}

/// After an unmount here: waits until no mount namespace holds `device`'s filesystem any
/// more, up to `limit`. A namespace made while it was mounted (another bake's sandbox as it
/// starts, a service's private namespace) holds a copy of the mount that an unmount here
/// does not reach, and the filesystem is written out only once that goes: until then its
/// journal needs recovery, and a snapshot, a detach or a journal put back would take it
/// half written. The kernel says so by refusing the device to an exclusive open; where it
/// cannot be opened to tell, every namespace's mount table says. Answers who still holds it
/// when the wait ends.
pub fn wait_released(device: &MountedDevice, limit: Duration) -> Result<(), String> {
    let since = std::time::Instant::now();
    loop {
        let open = rustix::fs::open(
            &device.node,
            OFlags::RDONLY | OFlags::EXCL | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
        );
        let held = match open {
            Ok(_) => false,
            Err(rustix::io::Errno::BUSY) => true,
            Err(_) => !namespaces_mounting(&device.number).is_empty(),
        };
        if !held {
            return Ok(());
        }
        if since.elapsed() >= limit {
            return Err(holders_of_device(device));
        }
        std::thread::sleep(RELEASE_POLL);
    }
}

/// Who keeps `device` from an exclusive open: a process of each mount namespace mounting
/// it, else the kernel's own holders of it (device-mapper, md).
fn holders_of_device(device: &MountedDevice) -> String {
    let mut holders = namespaces_mounting(&device.number);
    if holders.is_empty() {
        let listed = std::fs::read_dir(format!("/sys/dev/block/{}/holders", device.number));
        holders = listed
            .into_iter()
            .flatten()
            .flatten()
            .map(|h| format!("/dev/{}", h.file_name().to_string_lossy()))
            .collect();
    }
    if holders.is_empty() {
        format!(
            "an exclusive opener of {} this host does not name",
            device.node.display()
        )
    } else {
        holders.join(", ")
    }
}

/// Whether a mount table lists the device numbered `number`.
fn lists_device(table: &str, number: &str) -> bool {
    table
        .lines()
        .any(|line| line.split(' ').nth(2) == Some(number))
}

/// Whether this process's mount namespace mounts the device numbered `number`.
fn mounted_here(number: &str) -> bool {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    lists_device(&table, number)
}

/// A process of each mount namespace that mounts the device numbered `number`, "pid 42
/// (sleep)".
fn namespaces_mounting(number: &str) -> Vec<String> {
    let mut seen = std::collections::BTreeSet::new();
    let mut found = Vec::new();
    for (pid, p) in processes() {
        let Ok(namespace) = std::fs::read_link(p.join("ns/mnt")) else {
            continue;
        };
        if seen.contains(&namespace) {
            continue;
        }
        let table = std::fs::read_to_string(p.join("mountinfo")).unwrap_or_default();
        if lists_device(&table, number) {
            seen.insert(namespace);
            found.push(process_named(&pid, &p));
        }
    }
    found
}

/// Every process this host shows: its pid and its directory in /proc.
fn processes() -> Vec<(String, PathBuf)> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| {
            let pid = p.file_name().to_string_lossy().into_owned();
            pid.chars()
                .all(|c| c.is_ascii_digit())
                .then(|| (pid, p.path()))
        })
        .collect()
}

/// "pid 42 (php-fpm)".
fn process_named(pid: &str, dir: &Path) -> String {
    let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
    format!("pid {pid} ({})", name.trim())
}

fn unescape_mount_path(field: &str) -> PathBuf {
    PathBuf::from(
        field
            .replace("\\040", " ")
            .replace("\\011", "\t")
            .replace("\\012", "\n")
            .replace("\\134", "\\"),
    )
}

/// Processes whose root, working directory or open files lie under `target`: "pid 42 (php-fpm)".
fn holders_of(target: &Path) -> Vec<String> {
    let Ok(target) = target.canonicalize() else {
        return Vec::new();
    };
    let under = |link: PathBuf| std::fs::read_link(link).is_ok_and(|t| t.starts_with(&target));
    processes()
        .into_iter()
        .filter(|(_, p)| {
            let open_files = std::fs::read_dir(p.join("fd"))
                .map(|fds| fds.flatten().any(|fd| under(fd.path())))
                .unwrap_or(false);
            under(p.join("root")) || under(p.join("cwd")) || open_files
        })
        .map(|(pid, p)| process_named(&pid, &p))
        .collect()
}

/// Files amibake puts into the image while it works, and what they replaced. Holds no fd
/// of the image between calls, which would keep it from unmounting.
#[derive(Debug)]
pub struct TemporaryFiles {
    root: PathBuf,
    /// (path as the image names it, the image's own content, or None if it had none)
    replaced: Vec<(String, Option<Saved>)>,
}

#[derive(Debug)]
enum Saved {
    File(Vec<u8>, u32),
    Symlink(PathBuf),
}

impl TemporaryFiles {
    /// For the image mounted at `root`.
    pub fn new(root: &Path) -> TemporaryFiles {
        TemporaryFiles {
            root: root.to_path_buf(),
            replaced: Vec::new(),
        }
    }

    fn error(&self, path: &str, e: impl ToString) -> MountError {
        MountError::File {
            path: self.root.join(path.trim_start_matches('/')),
            reason: e.to_string(),
        }
    }

    /// Puts `content` at `path` (as the image names it) until `restore`, remembering what
    /// was there. A symlink there (resolv.conf often is one) is replaced, never written
    /// through.
    pub fn put(&mut self, path: &str, content: &[u8], mode: u32) -> Result<(), MountError> {
        let err = |e| self.error(path, e);
        let image = ImageRoot::open(&self.root).map_err(err)?;
        let parent = Path::new(path)
            .parent()
            .and_then(Path::to_str)
            .unwrap_or("/");
        image.create_dirs(parent, 0o755).map_err(err)?;
        let leaf = image.leaf(path).map_err(err)?;
        let saved = match leaf.file_type().map_err(err)? {
            None => None,
            Some(FileType::Symlink) => Some(Saved::Symlink(leaf.read_link().map_err(err)?)),
            Some(FileType::RegularFile) => {
                let file = rustix::fs::openat(
                    &leaf.dir,
                    leaf.name.as_str(),
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| err(e.into()))?;
                let stat = rustix::fs::fstat(&file).map_err(|e| err(e.into()))?;
                let bytes = read_regular(file, READ_LIMIT).map_err(err)?;
                Some(Saved::File(bytes, stat.st_mode & 0o7777))
            }
            Some(other) => {
                return Err(err(std::io::Error::other(format!(
                    "is a {}, not a file amibake can set aside",
                    file_kind(other)
                ))))
            }
        };
        if !leaf.remove_unless_dir().map_err(err)? {
            return Err(err(std::io::Error::other("is a directory")));
        }
        self.replaced.push((path.to_string(), saved));
        write_new(&leaf, content, mode).map_err(|e| self.error(path, e))
    }

    /// Puts back what the image had, newest first; returns what could not be restored.
    pub fn restore(&mut self) -> Vec<MountError> {
        let mut errors = Vec::new();
        while let Some((path, saved)) = self.replaced.pop() {
            let result = (|| {
                let leaf = ImageRoot::open(&self.root)?.leaf(&path)?;
                if !leaf.remove_unless_dir()? {
                    return Err(std::io::Error::other("a directory is there now"));
                }
                match saved {
                    None => Ok(()),
                    Some(Saved::Symlink(target)) => leaf.symlink(&target),
                    Some(Saved::File(bytes, mode)) => write_new(&leaf, &bytes, mode),
                }
            })();
            if let Err(e) = result {
                errors.push(self.error(&path, e));
            }
        }
        errors
    }
}

/// Creates the file at `leaf` (nothing is there) with `content` and exactly `mode`.
fn write_new(leaf: &Leaf, content: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = leaf.create_file(0o600)?;
    file.write_all(content)?;
    rustix::fs::fchmod(&file, Mode::from_raw_mode(mode))?;
    Ok(())
}

/// The chroot's temporary files: the host's resolv.conf (a resolver on the host's loopback
/// replaced by the sandbox's way to it), and a policy-rc.d on images that
/// use invoke-rc.d (Debian and its family).
pub fn put_chroot_files(files: &mut TemporaryFiles) -> Result<(), MountError> {
    let resolv = std::fs::read("/etc/resolv.conf").unwrap_or_default();
    let resolv = crate::sandbox::network::resolv_conf_for_sandbox(&resolv);
    files.put("/etc/resolv.conf", &resolv, 0o644)?;
    let image = ImageRoot::open(&files.root).map_err(|e| files.error("/", e))?;
    let debian_family = image
        .open_at("/usr/sbin/invoke-rc.d", OFlags::PATH, Mode::empty())
        .is_ok();
    drop(image);
    if debian_family {
        files.put("/usr/sbin/policy-rc.d", POLICY_RC_D.as_bytes(), 0o755)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_waiting_to_be_written_is_dirty_plus_writeback() {
        let meminfo = "MemTotal:       16384 kB\nDirty:            2048 kB\nWriteback:         512 kB\nWritebackTmp:       9 kB\n";
        assert_eq!(waiting_bytes(meminfo), (2048 + 512) * 1024);
        assert_eq!(waiting_bytes(""), 0);
    }
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn temporary_files_put_back_files_links_and_absences_and_never_write_through() {
        let host = tempfile::tempdir().unwrap();
        std::fs::write(host.path().join("hosts"), "host's own\n").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("etc/resolv.conf");
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, "nameserver 10.0.0.2\n").unwrap();
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o640))
            .unwrap();
        let link = dir.path().join("etc/hosts");
        let host_hosts = host.path().join("hosts");
        std::os::unix::fs::symlink(&host_hosts, &link).unwrap();
        // An image whose /usr is a link to a host directory: resolved inside the image.
        std::os::unix::fs::symlink(host.path(), dir.path().join("usr")).unwrap();
        let inside_usr = dir.path().join(host.path().strip_prefix("/").unwrap());
        std::fs::create_dir_all(&inside_usr).unwrap();

        let mut files = TemporaryFiles::new(dir.path());
        files
            .put("/etc/resolv.conf", b"host resolver\n", 0o644)
            .unwrap();
        files.put("/etc/hosts", b"temporary\n", 0o644).unwrap();
        files
            .put("/usr/sbin/policy-rc.d", POLICY_RC_D.as_bytes(), 0o755)
            .unwrap();
        assert_eq!(std::fs::read_to_string(&link).unwrap(), "temporary\n");
        assert_eq!(
            std::fs::read_to_string(&host_hosts).unwrap(),
            "host's own\n",
            "the link's target was never written"
        );
        let inside = inside_usr.join("sbin/policy-rc.d");
        assert!(inside.exists(), "the image's /usr is the image's own");
        assert!(!host.path().join("sbin").exists());

        assert!(files.restore().is_empty());
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            "nameserver 10.0.0.2\n"
        );
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert_eq!(std::fs::read_link(&link).unwrap(), host_hosts);
        assert!(!inside.exists());
    }

    #[test]
    fn mount_table_paths_are_unescaped() {
        assert_eq!(
            unescape_mount_path("/mnt/with\\040space"),
            PathBuf::from("/mnt/with space")
        );
    }

    /// An ext4 on a loop device of its own, mounted, with a pin (a process in a mount
    /// namespace of its own, made while it is mounted); all of it undone on drop, the pin
    /// killed first.
    struct Pinned {
        _turn: std::sync::MutexGuard<'static, ()>,
        dir: tempfile::TempDir,
        device: PathBuf,
        pin: Option<std::process::Child>,
    }

    impl Pinned {
        fn root(&self) -> PathBuf {
            self.dir.path().join("root")
        }

        fn unpin(&mut self) {
            if let Some(mut pin) = self.pin.take() {
                let _ = pin.kill();
                let _ = pin.wait();
            }
        }
    }

    impl Drop for Pinned {
        /// Also after a failed test, whose writing out may still hold the filesystem: then
        /// detached lazily, and the loop device goes once the test's process has ended.
        fn drop(&mut self) {
            self.unpin();
            let unmounted = Command::new("umount").arg(self.root()).status();
            if !unmounted.is_ok_and(|status| status.success()) && is_mount_point(&self.root()) {
                let _ = Command::new("umount")
                    .arg("--lazy")
                    .arg(self.root())
                    .status();
            }
            let _ = crate::host::loop_device::detach(&self.device);
        }
    }

    fn pinned() -> Option<Pinned> {
        let mut pinned = mounted()?;
        let pin = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sleep", "60"])
            .spawn()
            .unwrap();
        let pin_id = pin.id();
        pinned.pin = Some(pin);
        // In place once unshare has made the namespace private and become sleep.
        let since = std::time::Instant::now();
        while std::fs::read_to_string(format!("/proc/{pin_id}/comm")).unwrap_or_default()
            != "sleep\n"
        {
            assert!(since.elapsed() < Duration::from_secs(10), "no pin");
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(pinned)
    }

    /// An ext4 on a loop device of its own, mounted, with a file written; no pin yet.
    fn mounted() -> Option<Pinned> {
        use crate::host::loop_device::{self, tests::a_turn_and_an_image, Writes};
        let (turn, dir, image) = a_turn_and_an_image()?;
        let made = Command::new("mkfs.ext4").arg("-q").arg(&image).status();
        assert!(made.unwrap().success());
        let device = loop_device::attach(&image, None, Writes::Durable)
            .unwrap()
            .device;
        let mounted = Pinned {
            _turn: turn,
            dir,
            device,
            pin: None,
        };
        std::fs::create_dir(mounted.root()).unwrap();
        let mount = Command::new("mount")
            .arg(&mounted.device)
            .arg(mounted.root())
            .status();
        assert!(mount.unwrap().success());
        std::fs::write(mounted.root().join("file"), b"written").unwrap();
        Some(mounted)
    }

    /// What a bake writes reaches the image while it is still writing, not only at the
    /// unmount (the kernel alone would hold it 30 s); once stopped, nothing of the
    /// writing out holds the filesystem.
    #[tokio::test]
    async fn writing_out_puts_the_writes_on_the_device_meanwhile_and_lets_go_when_stopped() {
        let Some(mounted) = mounted() else {
            return;
        };
        let root = mounted.root();
        let image = mounted.dir.path().join("disk.img");
        let extracted: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
        let on_the_device = || {
            let bytes = std::fs::read(&image).unwrap();
            bytes.windows(4096).any(|w| w == &extracted[..4096])
        };
        let writing_out = WritingOut::start(&root).unwrap();
        std::fs::write(root.join("extracted"), &extracted).unwrap();
        // The kernel alone would leave it in memory for 30 s, short of memory pressure.
        let since = std::time::Instant::now();
        while !on_the_device() {
            assert!(
                since.elapsed() < WritingOut::EVERY * 8,
                "not on the device {:?} after it was written",
                since.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Stopped twice at once (the step, and a cleanup's undo): both wait for the end.
        tokio::join!(writing_out.stop(), writing_out.stop());
        let unmounted = Command::new("umount").arg(&root).status().unwrap();
        assert!(unmounted.success(), "the unmount is not held");
    }

    #[test]
    fn an_unmount_is_done_once_no_other_mount_namespace_holds_the_filesystem() {
        let Some(mut pinned) = pinned() else {
            return;
        };
        let (root, device) = (pinned.root(), pinned.device.clone());
        let pin_id = pinned.pin.as_ref().unwrap().id();
        let known = MountedDevice::of_node(&device).unwrap();
        let canonical = root.canonicalize().unwrap();
        assert_eq!(device_mounted_at(&canonical), Some(known.clone()));

        // Unmounted here, held there: the unmount fails naming the holder, and again
        // once the mount here is gone (a cleanup's retry).
        for _ in 0..2 {
            let held = unmount(&root, Some(&device), Duration::from_millis(200))
                .unwrap_err()
                .to_string();
            assert!(
                held.contains(LIVES_ON) && held.contains(&format!("pid {pin_id} (sleep)")),
                "{held}"
            );
            assert!(!is_mount_point(&root));
        }
        // Where the device cannot be opened to tell, every namespace's table tells.
        let unopenable = MountedDevice {
            number: known.number.clone(),
            node: pinned.dir.path().join("no such node"),
        };
        assert!(wait_released(&unopenable, Duration::ZERO).is_err());

        pinned.unpin();
        unmount(&root, Some(&device), Duration::from_secs(10)).unwrap();
        assert_eq!(wait_released(&known, Duration::ZERO), Ok(()));
        assert_eq!(wait_released(&unopenable, Duration::ZERO), Ok(()));
    }
}
