//! Loop devices over disk image files, for the `direct` backend. The root partition gets
//! a loop device of its own (`--offset`, `--sizelimit`) read from the partition table, so
//! nothing depends on the kernel's partition scanning of loop devices or on udev.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::partitions::Extent;

/// A busy loop device (a filesystem just unmounted, udev probing it) is asked again.
const DETACH_ATTEMPTS: u32 = 50;
const DETACH_PAUSE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    #[error("cannot run losetup: {0}")]
    Spawn(std::io::Error),
    #[error("losetup {args}: {stderr}")]
    Failed { args: String, stderr: String },
    #[error("cannot write `{to}` to {setting}: {source}")]
    WriteCache {
        setting: String,
        to: &'static str,
        source: std::io::Error,
    },
    #[error(
        "{device} is still in use after {DETACH_ATTEMPTS} detach attempts (backing file {backing})"
    )]
    Busy { device: String, backing: String },
}

fn losetup(args: &[&str]) -> Result<String, LoopError> {
    let out = Command::new("losetup")
        .args(args)
        .output()
        .map_err(LoopError::Spawn)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(LoopError::Failed {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Where the writes of a filesystem on a loop device must get to before it is done with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writes {
    /// The backing device or file's storage: an attached volume, which the cloud
    /// snapshots from what reached it.
    Durable,
    /// This host's page cache: a scratch copy that this host reads back itself. The
    /// filesystem's cache flushes are dropped (the device says its cache writes through),
    /// so its syncs and unmount do not wait for the disk to write what is only read back
    /// from memory, and then removed.
    Cached,
}

/// A loop device set up.
#[derive(Debug)]
pub struct Attached {
    pub device: PathBuf,
    /// Why its writes reach the disk after all, where `Writes::Cached` was asked and the
    /// kernel would not have it: only slower, so the bake goes on and says so.
    pub durable_because: Option<LoopError>,
}

/// A new loop device over `image` (or the `extent` of it), whose writes get as far as
/// `writes` asks. A durable one is refused (and detached) unless its flushes are kept:
/// the kernel keeps a device's setting from whoever had it before, who may have been
/// detached without putting it back.
pub fn attach(image: &Path, extent: Option<Extent>, writes: Writes) -> Result<Attached, LoopError> {
    let device = set_up(image, extent)?;
    let durable_because = match writes {
        Writes::Cached => write_through(&device).err(),
        Writes::Durable => {
            if let Err(e) = restore_write_back(&device) {
                let _ = detach(&device);
                return Err(e);
            }
            None
        }
    };
    Ok(Attached {
        device,
        durable_because,
    })
}

fn set_up(image: &Path, extent: Option<Extent>) -> Result<PathBuf, LoopError> {
    let image = image.to_string_lossy();
    let (offset, size) = extent.map_or((String::new(), String::new()), |e| {
        (e.offset.to_string(), e.size.to_string())
    });
    let mut args = vec!["--find", "--show"];
    if extent.is_some() {
        args.extend(["--offset", &offset, "--sizelimit", &size]);
    }
    args.push(&image);
    losetup(&args).map(PathBuf::from)
}

/// Tells the block layer that `device` has no volatile cache, so it drops the flushes
/// a filesystem sends it instead of having the loop driver fsync the backing file.
fn write_through(device: &Path) -> Result<(), LoopError> {
    set_write_cache(device, WRITE_THROUGH)
}

const WRITE_THROUGH: &str = "write through";
/// A loop device's own setting: its flushes fsync the backing file.
const WRITE_BACK: &str = "write back";

fn set_write_cache(device: &Path, to: &'static str) -> Result<(), LoopError> {
    let setting = write_cache_setting(device);
    std::fs::write(&setting, to).map_err(|e| LoopError::WriteCache {
        setting,
        to,
        source: e,
    })
}

fn write_cache_setting(device: &Path) -> String {
    let name = device.file_name().unwrap_or_default().to_string_lossy();
    format!("/sys/block/{name}/queue/write_cache")
}

/// The kernel keeps a loop device's write cache setting after it is detached: whoever
/// sets it up next would have its flushes dropped too. Put back before the detach, and
/// checked again as a durable device is set up.
fn restore_write_back(device: &Path) -> Result<(), LoopError> {
    match std::fs::read_to_string(write_cache_setting(device)) {
        Ok(now) if now.trim() == WRITE_THROUGH => set_write_cache(device, WRITE_BACK),
        _ => Ok(()),
    }
}

/// Every loop device set up on this machine, with its backing file.
pub fn all() -> Vec<(PathBuf, String)> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .filter_map(|e| {
            let device = Path::new("/dev").join(e.file_name());
            let backing = backing_file(&device)?;
            Some((device, backing))
        })
        .collect()
}

/// The file a loop device is backed by, while it is set up.
fn backing_file(device: &Path) -> Option<String> {
    let name = device.file_name()?.to_string_lossy().into_owned();
    std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Detaches `device`, asking again while it is busy; done once the kernel has let go of it.
/// Done too once the device is backed by another file: the moment it is free, another bake
/// may set it up over its own file, and asking again would take that one away from it.
pub fn detach(device: &Path) -> Result<(), LoopError> {
    let name = device.to_string_lossy();
    let Some(ours) = backing_file(device) else {
        // Detached by someone else (by hand, after a failed unmount): the setting is still
        // worth putting back for the next user, and failing at it is theirs to see.
        let _ = restore_write_back(device);
        return Ok(());
    };
    // Said once the device is detached, which matters more.
    let restored = restore_write_back(device);
    for _ in 0..DETACH_ATTEMPTS {
        // Failures are told by the device staying set up over our file, checked below.
        let _ = losetup(&["--detach", &name]);
        if backing_file(device).is_none_or(|file| file != ours) {
            return restored;
        }
        std::thread::sleep(DETACH_PAUSE);
    }
    Err(LoopError::Busy {
        device: name.into_owned(),
        backing: ours,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_loop_device_covers_the_extent_and_is_gone_after_detach() {
        let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        let file = std::fs::File::create(&image).unwrap();
        file.set_len(8 << 20).unwrap();
        let device = match attach(
            &image,
            Some(Extent {
                offset: 1 << 20,
                size: 2 << 20,
            }),
            Writes::Durable,
        ) {
            Ok(attached) => attached.device,
            // Loop devices need root; the suite runs as root, a developer's `cargo test`
            // may not.
            Err(e) if !rustix::process::geteuid().is_root() => {
                eprintln!("skipped: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let size = std::fs::read_to_string(format!(
            "/sys/block/{}/size",
            device.file_name().unwrap().to_string_lossy()
        ))
        .unwrap();
        let cache = write_cache(&device);
        let detached = detach(&device);
        detached.unwrap();
        assert_eq!(
            size.trim(),
            ((2 << 20) / 512).to_string(),
            "sectors of the extent"
        );
        assert_eq!(
            cache, "write back",
            "a durable device's flushes reach its file"
        );
        assert!(backing_file(&device).is_none());
        detach(&device).expect("detaching what is gone is nothing");
    }

    /// Loop devices are the machine's: these tests take turns, so none sees another's.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// This test's turn with loop devices, and a 4 MiB image in a directory of its own;
    /// none where loop devices cannot be had (a developer's `cargo test` not as root).
    pub(crate) fn a_turn_and_an_image() -> Option<(
        std::sync::MutexGuard<'static, ()>,
        tempfile::TempDir,
        PathBuf,
    )> {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: loop devices need root");
            return None;
        }
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
        Some((turn, dir, image))
    }

    #[test]
    fn a_device_detached_by_hand_or_set_up_durable_again_has_its_flushes_kept() {
        let Some((_turn, _dir, image)) = a_turn_and_an_image() else {
            return;
        };
        let name = |d: &Path| d.to_string_lossy().into_owned();
        // Detached by hand, as after a failed unmount: the kernel keeps "write through".
        let device = attach(&image, None, Writes::Cached).unwrap().device;
        losetup(&["--detach", &name(&device)]).unwrap();
        let kept_by_kernel = write_cache(&device);
        detach(&device).expect("detaching what is gone is nothing");
        assert_eq!(kept_by_kernel, "write through");
        assert_eq!(
            write_cache(&device),
            "write back",
            "put back though it was gone"
        );
        // Handed on with "write through" all the same: a durable set-up puts it back.
        let device = attach(&image, None, Writes::Cached).unwrap().device;
        losetup(&["--detach", &name(&device)]).unwrap();
        let durable = attach(&image, None, Writes::Durable).unwrap().device;
        let cache = write_cache(&durable);
        detach(&durable).unwrap();
        let _ = detach(&device);
        assert_eq!(cache, "write back", "a durable device's flushes are kept");
    }

    fn write_cache(device: &Path) -> String {
        std::fs::read_to_string(write_cache_setting(device))
            .unwrap()
            .trim()
            .to_string()
    }

    #[test]
    fn a_cached_loop_device_drops_flushes_and_still_writes_its_file() {
        let Some((_turn, _dir, image)) = a_turn_and_an_image() else {
            return;
        };
        let attached = attach(&image, None, Writes::Cached).unwrap();
        assert!(attached.durable_because.is_none(), "{attached:?}");
        let device = attached.device;
        let cache = write_cache(&device);
        let written = std::fs::OpenOptions::new()
            .write(true)
            .open(&device)
            .and_then(|d| {
                d.write_all_at(b"through the page cache", 3 << 20)?;
                // A flush the block layer now drops: it must still succeed.
                d.sync_all()
            });
        detach(&device).unwrap();
        written.unwrap();
        assert_eq!(
            cache, "write through",
            "the block layer drops the flushes of a device that writes through"
        );
        assert_eq!(
            write_cache(&device),
            "write back",
            "whoever sets the device up next has its flushes kept"
        );
        let mut back = [0u8; 22];
        std::fs::File::open(&image)
            .unwrap()
            .read_exact_at(&mut back, 3 << 20)
            .unwrap();
        assert_eq!(
            &back, b"through the page cache",
            "the file holds what was written"
        );
    }
}
