//! Block devices on the build host: choosing a device name no other bake on this host is
//! using, and finding the block device an attached volume became.
//!
//! Nitro hosts expose every EBS volume as `/dev/nvmeXn1` whatever name was asked for; udev adds
//! `/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol<id without dash>`, and the NVMe serial
//! is the same string. Xen hosts use the requested name, as `/dev/xvdX` or `/dev/sdX`. So: by
//! volume id first, by name last.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

/// Names AWS recommends for attaching EBS volumes to Linux instances.
const CANDIDATE_SUFFIXES: &str = "fghijklmnop";
/// How long a device may take to appear after EC2 says the volume is attached.
pub const DEVICE_APPEAR_TIMEOUT: Duration = Duration::from_secs(60);
const DEVICE_POLL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot use the lock directory {dir}: {source}")]
    LockDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no free device name: /dev/sd[f-p] are all attached or locked by other bakes on this host"
    )]
    NoFreeName,
    #[error("{volume_id} is attached, but no block device for it appeared within {}s (looked for {looked_for})", timeout.as_secs())]
    NotFound {
        volume_id: String,
        looked_for: String,
        timeout: Duration,
    },
    #[error("partition {partition} of {volume_id} does not exist (looked for {looked_for})")]
    NoPartition {
        volume_id: String,
        partition: u32,
        looked_for: String,
    },
    #[error("{volume_id}: {source}")]
    Layout {
        volume_id: String,
        source: super::partitions::PartitionError,
    },
}

/// A device name this process holds until dropped; other bakes on the host skip it.
#[derive(Debug)]
pub struct DeviceName {
    /// As passed to AttachVolume: `/dev/sdf`.
    pub name: String,
    _lock: File,
}

/// Takes the first of /dev/sd[f-p] that no other bake holds, EC2 does not list as attached
/// (`attached`) and the host has no device under.
pub fn claim_free_name(
    lock_dir: &Path,
    attached: &HashSet<String>,
) -> Result<DeviceName, DeviceError> {
    std::fs::create_dir_all(lock_dir).map_err(|source| DeviceError::LockDir {
        dir: lock_dir.into(),
        source,
    })?;
    for suffix in CANDIDATE_SUFFIXES.chars() {
        let (sd, xvd) = (format!("/dev/sd{suffix}"), format!("/dev/xvd{suffix}"));
        if attached.contains(&sd) || attached.contains(&xvd) {
            continue;
        }
        let path = lock_dir.join(format!("sd{suffix}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| DeviceError::LockDir {
                dir: lock_dir.into(),
                source,
            })?;
        if file.try_lock().is_err() {
            continue;
        }
        // Checked under the lock: a name another bake has just released may still be in use
        // by a volume that is detaching.
        if Path::new(&sd).exists() || Path::new(&xvd).exists() {
            continue;
        }
        return Ok(DeviceName {
            name: sd,
            _lock: file,
        });
    }
    Err(DeviceError::NoFreeName)
}

/// Where to look for an attached volume, most reliable first.
fn candidates(volume_id: &str, requested: &str) -> Vec<PathBuf> {
    let serial = volume_id.replace('-', "");
    let mut paths = vec![PathBuf::from(format!(
        "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_{serial}"
    ))];
    paths.extend(nvme_by_serial(&serial));
    let suffix = requested
        .trim_start_matches("/dev/sd")
        .trim_start_matches("/dev/xvd");
    paths.push(PathBuf::from(format!("/dev/xvd{suffix}")));
    paths.push(PathBuf::from(format!("/dev/sd{suffix}")));
    paths
}

/// `/dev/nvmeXn1` whose controller reports `serial` (udev-less hosts have no by-id links).
fn nvme_by_serial(serial: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir("/sys/block").ok()?;
    entries.flatten().find_map(|entry| {
        let name = entry.file_name().to_string_lossy().into_owned();
        let reported = std::fs::read_to_string(entry.path().join("device/serial")).ok()?;
        (name.starts_with("nvme") && reported.trim() == serial)
            .then(|| PathBuf::from("/dev").join(name))
    })
}

/// The block device `volume_id` became, once it appears. Returns the path found (a link is
/// kept as a link, so partition names can be derived from it).
pub async fn wait_for_device(
    volume_id: &str,
    requested: &str,
    timeout: Duration,
) -> Result<PathBuf, DeviceError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(found) = candidates(volume_id, requested)
            .into_iter()
            .find(|p| is_block_device(p))
        {
            return Ok(found);
        }
        if Instant::now() >= deadline {
            let looked_for = candidates(volume_id, requested)
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(DeviceError::NotFound {
                volume_id: volume_id.into(),
                looked_for,
                timeout,
            });
        }
        tokio::time::sleep(DEVICE_POLL).await;
    }
}

fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// Partition `n` of a whole device, under the naming scheme the device was found by.
fn partition_path(device: &Path, n: u32) -> PathBuf {
    let text = device.to_string_lossy();
    if text.contains("/by-id/") {
        PathBuf::from(format!("{text}-part{n}"))
    } else if text.starts_with("/dev/nvme") {
        PathBuf::from(format!("{text}p{n}"))
    } else {
        PathBuf::from(format!("{text}{n}"))
    }
}

/// The device holding the root filesystem: partition `wanted` (0: the whole device) as the
/// kernel names it, or when the template does not say, the partition the volume's own layout
/// shows (`partitions::root_partition`), the whole device if it has no partition table.
pub fn root_filesystem(
    volume_id: &str,
    device: &Path,
    wanted: Option<u32>,
) -> Result<PathBuf, DeviceError> {
    let n = match wanted {
        Some(0) => return Ok(device.to_path_buf()),
        Some(n) => n,
        None => {
            let found = super::partitions::root_partition(device, None).map_err(|source| {
                DeviceError::Layout {
                    volume_id: volume_id.into(),
                    source,
                }
            })?;
            let Some(n) = found else {
                return Ok(device.to_path_buf());
            };
            n
        }
    };
    let path = partition_path(device, n);
    if is_block_device(&path) {
        Ok(path)
    } else {
        Err(DeviceError::NoPartition {
            volume_id: volume_id.into(),
            partition: n,
            looked_for: path.display().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_follow_the_device_naming_scheme() {
        let by_id = Path::new("/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0abc");
        assert_eq!(
            partition_path(by_id, 1),
            PathBuf::from("/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0abc-part1")
        );
        assert_eq!(
            partition_path(Path::new("/dev/nvme1n1"), 2),
            PathBuf::from("/dev/nvme1n1p2")
        );
        assert_eq!(
            partition_path(Path::new("/dev/xvdf"), 1),
            PathBuf::from("/dev/xvdf1")
        );
    }

    #[test]
    fn candidates_try_the_volume_id_before_the_name() {
        let c = candidates("vol-0abc", "/dev/sdg");
        assert_eq!(
            c.first().unwrap(),
            Path::new("/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0abc")
        );
        assert_eq!(
            &c[c.len() - 2..],
            [PathBuf::from("/dev/xvdg"), PathBuf::from("/dev/sdg")]
        );
    }

    #[test]
    fn two_claims_get_different_names_and_a_released_name_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let none = HashSet::new();
        let a = claim_free_name(dir.path(), &none).unwrap();
        let b = claim_free_name(dir.path(), &none).unwrap();
        assert_ne!(a.name, b.name);
        let first = a.name.clone();
        drop(a);
        assert_eq!(claim_free_name(dir.path(), &none).unwrap().name, first);
    }

    #[test]
    fn names_ec2_lists_as_attached_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let attached: HashSet<String> = ["/dev/sdf".to_string(), "/dev/xvdg".to_string()].into();
        let claimed = claim_free_name(dir.path(), &attached).unwrap();
        assert!(
            claimed.name != "/dev/sdf" && claimed.name != "/dev/sdg",
            "{}",
            claimed.name
        );
    }
}
