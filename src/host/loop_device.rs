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

/// A new loop device over `image` (or the `extent` of it); answers its path.
pub fn attach(image: &Path, extent: Option<Extent>) -> Result<PathBuf, LoopError> {
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
        return Ok(());
    };
    for _ in 0..DETACH_ATTEMPTS {
        // Failures are told by the device staying set up over our file, checked below.
        let _ = losetup(&["--detach", &name]);
        if backing_file(device).is_none_or(|file| file != ours) {
            return Ok(());
        }
        std::thread::sleep(DETACH_PAUSE);
    }
    Err(LoopError::Busy {
        device: name.into_owned(),
        backing: ours,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_device_covers_the_extent_and_is_gone_after_detach() {
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
        ) {
            Ok(device) => device,
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
        let detached = detach(&device);
        detached.unwrap();
        assert_eq!(
            size.trim(),
            ((2 << 20) / 512).to_string(),
            "sectors of the extent"
        );
        assert!(backing_file(&device).is_none());
        detach(&device).expect("detaching what is gone is nothing");
    }
}
