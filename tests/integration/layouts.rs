//! Bakes onto the disk layouts our users start from (the local cloud's catalogue): the root
//! is found from each image's own layout, whatever its partition number, its filesystem or
//! the partitions beside it, with both backends.

use std::path::Path;
use std::process::Command;

use crate::util::localcloud::{LocalCloud, MountedSnapshot};
use crate::util::tarballs::{assert_composer_like_at, composer_like, gzip};
use crate::util::Run;

/// The byte offset of partition `number` in the disk image `raw`, as sfdisk reads it.
fn partition_offset(raw: &Path, number: u32) -> u64 {
    let out = Command::new("sfdisk")
        .arg("--json")
        .arg(raw)
        .output()
        .unwrap();
    let table: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let node = format!("{}{number}", raw.display());
    let partition = table["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"] == node.as_str())
        .unwrap_or_else(|| panic!("no partition {number} in {table}"));
    partition["start"].as_u64().unwrap() * 512
}

/// A bake of a composer-like tarball onto `family`'s vendor image with each backend: the
/// code lands on partition `root`, the image's root, and nothing is left. With
/// `host_holds_its_uuid`, this host has the vendor's root filesystem mounted as its own
/// the whole time, as an AL2023 build host has.
fn bakes_onto(family: &str, root: u32, host_holds_its_uuid: bool) {
    let cloud = LocalCloud::start_with("quick", &[family]);
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let vendor = cloud.ls()["vendor_amis"][family]
        .as_str()
        .unwrap()
        .to_string();
    let _hosts_own = host_holds_its_uuid.then(|| {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let snapshot = runtime
            .block_on(async { LocalCloud::root_snapshot(&cloud.clients().await, &vendor).await });
        let raw = dir.join("vendor.img");
        cloud.cli(&["export-snapshot", &snapshot, raw.to_str().unwrap()]);
        MountedSnapshot::mount_as_hosts_own(&raw, partition_offset(&raw, root), &dir.join("host"))
    });
    let (tar, files) = composer_like();
    std::fs::write(dir.join("app.tar.gz"), gzip(&tar)).unwrap();
    std::fs::write(
        dir.join("app.toml"),
        format!(
            "[bake]\nname = \"app-${{commit}}-${{timestamp}}\"\nbase_ami = \"{vendor}\"\n\
             dest = \"/srv/app\"\nowner = \"www-data\"\n"
        ),
    )
    .unwrap();
    for (backend, commit) in [("attach", "a77ac4"), ("direct", "d14ec7")] {
        let run = Run {
            command: format!("amibake bake app.toml --backend {backend} ({family})"),
            output: cloud
                .amibake(dir)
                .args(["bake", "app.toml", "--tarball", "app.tar.gz"])
                // --force: the second would reuse the first's image, of the same tarball.
                .args(["--commit", commit, "--backend", backend, "--force"])
                .output()
                .unwrap(),
        };
        run.expect_code(0);
        let manifest: serde_json::Value =
            serde_json::from_str(run.stdout().lines().last().unwrap()).unwrap();
        let snapshot = manifest["snapshot_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no new snapshot: {manifest}"));
        let raw = dir.join(format!("{snapshot}.img"));
        cloud.cli(&["export-snapshot", snapshot, raw.to_str().unwrap()]);
        let image = cloud.mount_snapshot(snapshot, dir, partition_offset(&raw, root));
        assert_composer_like_at(&image.root.join("srv/app"), &files, 33);
        drop(image);
        cloud.assert_no_bake_left();
    }
}

/// XFS root on partition 1, after BIOS boot (127) and EFI (128) partitions, on a build host
/// whose own root has the same XFS UUID, as every AL2023 root has.
#[test]
fn a_bake_onto_amazon_linux_2023_finds_its_xfs_root_beside_the_hosts_own() {
    let _module = crate::util::module_turn(module_path!());
    bakes_onto("al2023", 1, true);
}

/// ext4 root on partition 1, beside an ext4 /boot on 16 that could pass for a root.
#[test]
fn a_bake_onto_ubuntu_24_04_finds_its_root_beside_its_boot() {
    let _module = crate::util::module_turn(module_path!());
    bakes_onto("ubuntu-24.04", 1, false);
}

/// XFS root on partition 4, after BIOS boot, EFI and an XFS /boot.
#[test]
fn a_bake_onto_rhel_9_finds_its_root_on_partition_4() {
    let _module = crate::util::module_turn(module_path!());
    bakes_onto("rhel-9", 4, false);
}
