//! Bakes onto the disk layouts our users start from (the local cloud's catalogue): the root
//! is found from each image's own layout, whatever its partition number, its filesystem or
//! the partitions beside it, and the image's own /boot and /boot/efi are where provisioners
//! write, with both backends.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::localcloud::{assert_filesystem_clean, LocalCloud, MountedSnapshot};
use crate::util::tarballs::{assert_composer_like_at, composer_like, gzip};
use crate::util::{Run, Story};

/// The byte offset and size of partition `number` in the disk image `raw`, as sfdisk reads
/// them.
fn partition_extent(raw: &Path, number: u32) -> (u64, u64) {
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
    (
        partition["start"].as_u64().unwrap() * 512,
        partition["size"].as_u64().unwrap() * 512,
    )
}

/// The byte offset of partition `number` in the disk image `raw`.
fn partition_offset(raw: &Path, number: u32) -> u64 {
    partition_extent(raw, number).0
}

/// `amibake bake TEMPLATE` of `app.tar.gz` in `dir` with `backend`, for `commit`; `--force`,
/// so a bake of the same tarball makes a new image rather than reusing one. `what` names it.
fn bake(
    cloud: &LocalCloud,
    dir: &Path,
    template: &str,
    backend: &str,
    commit: &str,
    what: &str,
) -> Run {
    Run {
        command: format!("amibake bake {template} --backend {backend} ({what})"),
        output: cloud
            .amibake(dir)
            .args(["bake", template, "--tarball", "app.tar.gz", "--force"])
            .args(["--commit", commit, "--backend", backend])
            .output()
            .unwrap(),
    }
}

/// A bake that succeeded: its manifest, its new snapshot and that snapshot exported as the
/// raw disk `raw` in the work directory.
struct Baked {
    run: Run,
    manifest: serde_json::Value,
    snapshot: String,
    raw: PathBuf,
}

impl Baked {
    fn exported(cloud: &LocalCloud, dir: &Path, run: Run) -> Baked {
        run.expect_code(0);
        let manifest: serde_json::Value = run.json();
        let snapshot = manifest["snapshot_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no new snapshot: {manifest}"))
            .to_string();
        let raw = dir.join(format!("{snapshot}.img"));
        cloud.cli(&["export-snapshot", &snapshot, raw.to_str().unwrap()]);
        Baked {
            run,
            manifest,
            snapshot,
            raw,
        }
    }
}

/// A story on a local cloud with `family`'s vendor image, and that image's id.
fn story_with_vendor(family: &str) -> (Story, String) {
    let story = Story::on(LocalCloud::start_with("quick", &[family]));
    let vendor = story.cloud.ls()["vendor_amis"][family]
        .as_str()
        .unwrap()
        .to_string();
    (story, vendor)
}

/// Where a vendor lays out its image.
struct Layout {
    family: &'static str,
    root: u32,
    /// `/boot`'s own partition, when it has one.
    boot: Option<u32>,
    efi: u32,
}

/// Whether this host's kernel mounts FAT, which an EFI system partition is.
fn kernel_has_vfat() -> bool {
    std::fs::read_to_string("/proc/filesystems")
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().last() == Some("vfat"))
}

/// A file of the FAT filesystem at `offset` of the disk image `raw`, read with mtools (a
/// kernel without vfat cannot mount it).
fn fat_file(raw: &Path, offset: u64, path: &str) -> Option<String> {
    let out = Command::new("mtype")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@{offset}", raw.display()))
        .arg(format!("::{path}"))
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A bake of a composer-like tarball onto the vendor image with each backend, with a
/// provisioner that writes `/boot/marker` and `/boot/efi/marker`: the code lands on the
/// image's root partition, each marker in the filesystem the image mounts there (its own
/// /boot partition, absent from the root's /boot), every filesystem checks clean, and
/// nothing is left. With `host_holds_its_uuid`, this host has the vendor's root filesystem
/// mounted as its own the whole time, as an AL2023 build host has.
fn bakes_onto(layout: Layout, host_holds_its_uuid: bool) {
    let Layout {
        family,
        root,
        boot,
        efi,
    } = layout;
    let (story, vendor) = story_with_vendor(family);
    let (cloud, dir) = (&story.cloud, story.dir());
    let _hosts_own = host_holds_its_uuid.then(|| {
        let snapshot = story
            .runtime
            .block_on(LocalCloud::root_snapshot(&story.clients, &vendor));
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
             dest = \"/srv/app\"\nowner = \"www-data\"\n\
             [[bake.provisioner]]\ninline = [\"echo boot > /boot/marker\", \
             \"mkdir -p /boot/efi\", \"echo efi > /boot/efi/marker\"]\n"
        ),
    )
    .unwrap();
    for (backend, commit) in [("attach", "a77ac4"), ("direct", "d14ec7")] {
        let Baked {
            run, snapshot, raw, ..
        } = Baked::exported(
            cloud,
            dir,
            bake(cloud, dir, "app.toml", backend, commit, family),
        );
        let snapshot = snapshot.as_str();
        let image = cloud.mount_snapshot(snapshot, dir, partition_offset(&raw, root));
        assert_composer_like_at(&image.root.join("srv/app"), &files, 33);
        let root_boot_marker = std::fs::read_to_string(image.root.join("boot/marker")).ok();
        let root_efi_marker = std::fs::read_to_string(image.root.join("boot/efi/marker")).ok();
        drop(image);
        // /boot: on its own partition where the image has one, and then not in the root's.
        let boot_efi_marker = match boot {
            Some(number) => {
                let offset = partition_offset(&raw, number);
                let mounted = MountedSnapshot::mount_read_only(
                    &raw,
                    offset,
                    &dir.join(format!("{snapshot}.boot")),
                );
                let marker = std::fs::read_to_string(mounted.root.join("marker")).ok();
                let efi_marker = std::fs::read_to_string(mounted.root.join("efi/marker")).ok();
                drop(mounted);
                assert_eq!(
                    marker.as_deref(),
                    Some("boot\n"),
                    "{family} {backend}: /boot/marker on partition {number}\n{}",
                    run.dump()
                );
                assert_eq!(
                    root_boot_marker, None,
                    "{family} {backend}: not in the root's own /boot"
                );
                assert_filesystem_clean(&raw, offset, &format!("{family} {backend} /boot"));
                efi_marker
            }
            None => {
                assert_eq!(
                    root_boot_marker.as_deref(),
                    Some("boot\n"),
                    "{family} {backend}\n{}",
                    run.dump()
                );
                root_efi_marker
            }
        };
        // /boot/efi: on the EFI system partition where this kernel can mount FAT; elsewhere
        // the bake says it is not mounted, and the marker stays in the directory under it.
        let efi_offset = partition_offset(&raw, efi);
        let on_esp = fat_file(&raw, efi_offset, "/marker");
        if kernel_has_vfat() {
            assert_eq!(
                on_esp.as_deref(),
                Some("efi\n"),
                "{family} {backend}: /boot/efi/marker on partition {efi}\n{}",
                run.dump()
            );
            assert_eq!(
                boot_efi_marker, None,
                "{family} {backend}: not under the ESP's mount point"
            );
        } else {
            assert_eq!(on_esp, None, "{family} {backend}: the ESP untouched");
            assert!(
                run.stderr().contains(&format!(
                    "/boot/efi of the image (partition {efi}, vfat) is not mounted: this host's kernel cannot mount vfat"
                )),
                "{family} {backend}: the bake says /boot/efi is not mounted\n{}",
                run.dump()
            );
            assert_eq!(
                boot_efi_marker.as_deref(),
                Some("efi\n"),
                "{family} {backend}"
            );
        }
        assert_filesystem_clean(
            &raw,
            partition_offset(&raw, root),
            &format!("{family} {backend} root"),
        );
        cloud.assert_nothing_temporary();
    }
}

/// XFS root on partition 1, after BIOS boot (127) and EFI (128) partitions, on a build host
/// whose own root has the same XFS UUID, as every AL2023 root has.
#[test]
fn a_bake_onto_amazon_linux_2023_finds_its_xfs_root_beside_the_hosts_own() {
    let _module = crate::util::module_turn(module_path!());
    bakes_onto(
        Layout {
            family: "al2023",
            root: 1,
            boot: None,
            efi: 128,
        },
        true,
    );
}

/// ext4 root on partition 1, beside an ext4 /boot on 16 that could pass for a root, and
/// mounted under it for the provisioners.
#[test]
fn a_bake_onto_ubuntu_24_04_finds_its_root_beside_its_boot() {
    let _module = crate::util::module_turn(module_path!());
    bakes_onto(
        Layout {
            family: "ubuntu-24.04",
            root: 1,
            boot: Some(16),
            efi: 15,
        },
        false,
    );
}

/// XFS root on partition 4, after BIOS boot, EFI and an XFS /boot (mounted under it).
#[test]
fn a_bake_onto_rhel_9_finds_its_root_on_partition_4() {
    let _module = crate::util::module_turn(module_path!());
    bakes_onto(
        Layout {
            family: "rhel-9",
            root: 4,
            boot: Some(3),
            efi: 2,
        },
        false,
    );
}

/// A filesystem of the host's own, mounted for the length of a story.
struct HostMount(tempfile::TempDir);

impl HostMount {
    fn new() -> HostMount {
        let dir = tempfile::tempdir().unwrap();
        assert!(Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "hosts-own"])
            .arg(dir.path())
            .status()
            .unwrap()
            .success());
        std::fs::write(dir.path().join("data"), "the host's\n").unwrap();
        HostMount(dir)
    }

    fn assert_untouched(&self) {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let path = self.0.path().display().to_string();
        assert!(
            mounts
                .lines()
                .any(|l| l.split(' ').nth(1) == Some(path.as_str())),
            "the host's {path} is still mounted"
        );
        assert_eq!(
            std::fs::read_to_string(self.0.path().join("data")).unwrap(),
            "the host's\n"
        );
    }
}

impl Drop for HostMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

/// A base whose `/boot` is a symlink to a mount of this host, with its fstab naming a /boot
/// partition: the bake refuses to mount anything there, names it, never unmounts the
/// host's filesystem through the link, and leaves nothing. (Made in two bakes: the first
/// takes the /boot lines out of the fstab, so the second's provisioner can replace the
/// root's own /boot, no longer a mount point, and put them back.)
#[test]
fn a_base_whose_boot_leads_to_the_host_is_refused() {
    let _module = crate::util::module_turn(module_path!());
    let cloud = LocalCloud::start_with("quick", &["ubuntu-24.04"]);
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let hosts_own = HostMount::new();
    std::fs::write(dir.join("app.tar.gz"), gzip(&composer_like().0)).unwrap();
    let bake = |base: &str, command: &str, commit: &str| {
        std::fs::write(
            dir.join("app.toml"),
            format!(
                "[bake]\nname = \"app-${{commit}}-${{timestamp}}\"\nbase_ami = \"{base}\"\n\
                 dest = \"/srv/app\"\n[[bake.provisioner]]\ninline = [{command:?}]\n"
            ),
        )
        .unwrap();
        Run {
            command: format!("amibake bake app.toml from {base}: {command}"),
            output: cloud
                .amibake(dir)
                .args(["bake", "app.toml", "--tarball", "app.tar.gz"])
                .args(["--commit", commit, "--backend", "direct"])
                .output()
                .unwrap(),
        }
    };
    let ami = |run: &Run| -> String {
        run.expect_code(0);
        let manifest: serde_json::Value = run.json();
        manifest["ami_id"].as_str().unwrap().to_string()
    };
    let vendor = cloud.ls()["vendor_amis"]["ubuntu-24.04"]
        .as_str()
        .unwrap()
        .to_string();
    let unlisted = ami(&bake(
        &vendor,
        "cp /etc/fstab /etc/fstab.orig && grep -v '[[:space:]]/boot' /etc/fstab.orig > /etc/fstab",
        "b0071",
    ));
    let hostile = ami(&bake(
        &unlisted,
        &format!(
            "rm -rf /boot && ln -s {} /boot && cp /etc/fstab.orig /etc/fstab",
            hosts_own.0.path().display()
        ),
        "b0072",
    ));
    let run = bake(&hostile, "echo must not run", "b0073");
    run.expect_failure(
        "/boot of the image: /boot in the image is a symlink or not a directory",
        Some("mount image"),
    );
    assert!(!run.stderr().contains("must not run"), "{}", run.dump());
    hosts_own.assert_untouched();
    cloud.assert_nothing_temporary();
}

/// `amibake base` from each vendor's image logs in as that vendor's default user and
/// provisions as root, on an instance whose /boot is its own partition where the vendor's
/// is (as its boot mounts it); the base it publishes keeps the vendor's layout, and a bake on
/// it finds its root there and lands the code beside what the base installed.
#[test]
fn a_base_from_each_vendor_layout_with_its_user_is_what_a_bake_builds_on() {
    let _module = crate::util::module_turn(module_path!());
    // Each family's default user, root partition and /boot partition where it has its own.
    let families = [
        ("al2023", "ec2-user", 1, None),
        ("ubuntu-24.04", "ubuntu", 1, Some(16)),
        ("rhel-9", "ec2-user", 4, Some(3)),
    ];
    let cloud = LocalCloud::start_with("quick", &families.map(|(f, _, _, _)| f));
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    let (tar, files) = composer_like();
    std::fs::write(dir.join("app.tar.gz"), gzip(&tar)).unwrap();
    for (family, user, root, boot) in families {
        let vendor = cloud.ls()["vendor_amis"][family]
            .as_str()
            .unwrap()
            .to_string();
        let channel = format!("/amibake/layouts/{family}");
        std::fs::write(
            dir.join("base.toml"),
            format!(
                "[base]\nname = \"{family}-base-${{timestamp}}\"\nsource_ami = \"{vendor}\"\n\
                 instance_type = \"t3.small\"\nssh_username = \"{user}\"\n\
                 publish_ssm = \"{channel}\"\n\
                 [[base.provisioner]]\ninline = [\"test \\\"$(whoami)\\\" = root\", \
                 \"echo {family} > /etc/layout-base\", \"echo {family} > /boot/base-marker\"]\n"
            ),
        )
        .unwrap();
        let base = Run {
            command: format!("amibake base base.toml ({family}, as {user})"),
            output: cloud
                .amibake(dir)
                .args(["base", "base.toml"])
                .output()
                .unwrap(),
        };
        base.expect_code(0);
        cloud.assert_nothing_temporary();
        assert!(
            base.stderr().contains(&format!("{user}@127.")),
            "logged in as {user}\n{}",
            base.dump()
        );
        std::fs::write(
            dir.join("app.toml"),
            format!(
                "[bake]\nname = \"{family}-app-${{commit}}-${{timestamp}}\"\n\
                 base_ami = \"resolve:ssm:{channel}\"\ndest = \"/srv/app\"\n"
            ),
        )
        .unwrap();
        let what = format!("on the {family} base");
        let Baked {
            run: bake,
            snapshot,
            raw,
            ..
        } = Baked::exported(
            &cloud,
            dir,
            bake(&cloud, dir, "app.toml", "direct", "ba5e1", &what),
        );
        let image = cloud.mount_snapshot(&snapshot, dir, partition_offset(&raw, root));
        assert_eq!(
            std::fs::read_to_string(image.root.join("etc/layout-base")).unwrap(),
            format!("{family}\n"),
            "the base's work is on the root the bake found\n{}",
            bake.dump()
        );
        assert_composer_like_at(&image.root.join("srv/app"), &files, 0);
        let in_roots_boot = std::fs::read_to_string(image.root.join("boot/base-marker")).ok();
        drop(image);
        let on_boot_partition = boot.map(|number| {
            let boot = MountedSnapshot::mount_read_only(
                &raw,
                partition_offset(&raw, number),
                &dir.join(format!("{snapshot}.boot")),
            );
            std::fs::read_to_string(boot.root.join("base-marker")).ok()
        });
        let marker = Some(format!("{family}\n"));
        match on_boot_partition {
            Some(on_boot) => assert_eq!(
                (on_boot, in_roots_boot),
                (marker, None),
                "{family}: the base wrote /boot on its own partition, not in the root's"
            ),
            None => assert_eq!(in_roots_boot, marker, "{family}: /boot is on the root"),
        }
        std::fs::remove_file(&raw).unwrap();
        cloud.assert_nothing_temporary();
    }
}

/// A `root_volume_size_gb` larger than the vendor's grows the root partition wherever it sits
/// (AL2023's 1 after 127 and 128, Ubuntu's 1 after 14 to 16, RHEL's 4) to the end of the
/// volume, and its filesystem, ext4 or XFS, to fill it, with both backends; the /boot beside
/// it is where it was, and every filesystem checks clean.
#[test]
fn a_larger_volume_grows_each_vendors_root_where_it_sits() {
    let _module = crate::util::module_turn(module_path!());
    const GIB: u64 = 1 << 30;
    let families = [
        ("al2023", 1, None),
        ("ubuntu-24.04", 1, Some(16)),
        ("rhel-9", 4, Some(3)),
    ];
    let cloud = LocalCloud::start_with("quick", &families.map(|(f, _, _)| f));
    let work = tempfile::tempdir().unwrap();
    let dir = work.path();
    std::fs::write(dir.join("app.tar.gz"), gzip(&composer_like().0)).unwrap();
    for (family, root, boot) in families {
        let vendor = cloud.ls()["vendor_amis"][family]
            .as_str()
            .unwrap()
            .to_string();
        std::fs::write(
            dir.join("app.toml"),
            format!(
                "[bake]\nname = \"{family}-grown-${{commit}}-${{timestamp}}\"\n\
                 base_ami = \"{vendor}\"\ndest = \"/srv/app\"\nroot_volume_size_gb = 16\n"
            ),
        )
        .unwrap();
        for backend in ["attach", "direct"] {
            let what = format!("{family}, 16 GiB");
            let Baked {
                run, snapshot, raw, ..
            } = Baked::exported(
                &cloud,
                dir,
                bake(&cloud, dir, "app.toml", backend, "9r0w", &what),
            );
            let snapshot = snapshot.as_str();
            let disk = std::fs::metadata(&raw).unwrap().len();
            assert_eq!(disk, 16 * GIB, "{family} {backend}: the volume's size");
            let (start, size) = partition_extent(&raw, root);
            assert!(
                start + size > disk - (2 << 20),
                "{family} {backend}: partition {root} ({start} + {size} bytes) reaches the end of the disk"
            );
            let image =
                MountedSnapshot::mount_read_only(&raw, start, &dir.join(format!("{snapshot}.mnt")));
            let fs = rustix::fs::statvfs(&image.root).unwrap();
            assert!(
                fs.f_blocks * fs.f_frsize > size / 100 * 95,
                "{family} {backend}: the filesystem fills its {size}-byte partition\n{}",
                run.dump()
            );
            drop(image);
            assert_filesystem_clean(&raw, start, &format!("{family} {backend} grown root"));
            if let Some(boot) = boot {
                assert_filesystem_clean(
                    &raw,
                    partition_offset(&raw, boot),
                    &format!("{family} {backend} /boot"),
                );
            }
            let _ = std::fs::remove_file(&raw);
            cloud.assert_nothing_temporary();
        }
    }
}

/// This host's binfmt_misc, as the host sees it: whether it is mounted, what is registered,
/// and whether the program `foreign` (of another architecture) runs here.
fn host_binfmt(foreign: &Path) -> (bool, Vec<String>, Option<i32>) {
    // Only the host's own mount point: a chroot builder beside this story (Packer mounts
    // binfmt_misc inside its chroot) is not the host's.
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| {
            l.contains(" - binfmt_misc ") && l.split(' ').nth(4) == Some("/proc/sys/fs/binfmt_misc")
        });
    let mut entries: Vec<String> = std::fs::read_dir("/proc/sys/fs/binfmt_misc")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    let runs = Command::new(foreign).status().map_err(|e| e.raw_os_error());
    (mounted, entries, runs.err().flatten())
}

/// An arm64 image of `family` (found by `owner` and `name`, with its architecture) baked on
/// this x86_64 host, with both backends: its provisioners' programs are the image's own arm64
/// ones, run through qemu registered in the sandbox's own binfmt_misc, which they cannot
/// change, and never this host's; the image, the manifest and the tags say arm64. Returns
/// the story, whose directory holds `filter.toml` and `by-id.toml`.
fn bakes_arm64(family: &str, owner: &str, name: &str) -> Story {
    assert_eq!(
        std::env::consts::ARCH,
        "x86_64",
        "the story is of a host of another architecture"
    );
    let (story, vendor) = story_with_vendor(family);
    let (cloud, runtime, clients, dir) =
        (&story.cloud, &story.runtime, &story.clients, story.dir());
    // One of the image's own programs, to try on this host.
    let foreign = dir.join("arm64-true");
    {
        let snapshot = runtime.block_on(LocalCloud::root_snapshot(clients, &vendor));
        let raw = dir.join("vendor.img");
        cloud.cli(&["export-snapshot", &snapshot, raw.to_str().unwrap()]);
        let root =
            MountedSnapshot::mount_read_only(&raw, partition_offset(&raw, 1), &dir.join("vendor"));
        std::fs::copy(root.root.join("usr/bin/true"), &foreign).unwrap();
        drop(root);
        std::fs::remove_file(&raw).unwrap();
    }
    let host_before = host_binfmt(&foreign);
    assert_eq!(
        host_before.2,
        Some(8),
        "this host runs no arm64 program (ENOEXEC)"
    );
    let (tar, files) = composer_like();
    std::fs::write(dir.join("app.tar.gz"), gzip(&tar)).unwrap();
    let provisioner = "[[bake.provisioner]]\ninline = [\
        \"sleep 1\", \"uname -m > /etc/baked-on\", \
        \"dpkg --print-architecture >> /etc/baked-on\", \
        \"head -n 1 /proc/sys/fs/binfmt_misc/amibake-aarch64 >> /etc/baked-on\", \
        \"if echo -1 > /proc/sys/fs/binfmt_misc/amibake-aarch64; then echo removed; else echo kept; fi >> /etc/baked-on\"]\n";
    let template = |base_ami: &str| {
        format!(
            "[bake]\nname = \"app-${{commit}}-${{timestamp}}\"\nbase_ami = {base_ami}\n\
             dest = \"/srv/app\"\nowner = \"www-data\"\n{provisioner}"
        )
    };
    let by_filter =
        format!("{{ owners = [\"{owner}\"], name = \"{name}\", architecture = \"arm64\" }}");
    std::fs::write(dir.join("filter.toml"), template(&by_filter)).unwrap();
    std::fs::write(dir.join("by-id.toml"), template(&format!("\"{vendor}\""))).unwrap();

    for (backend, commit) in [("attach", "a77ac4"), ("direct", "d14ec7")] {
        // While the provisioners run (`sleep` holds them a while), this host tries the image's
        // program again and again: a registration in the host's own binfmt_misc, even one that
        // ends with the sandbox, would run it.
        let baking = std::sync::atomic::AtomicBool::new(true);
        let (run, host_ran_it) = std::thread::scope(|scope| {
            let watcher = scope.spawn(|| {
                let mut ran = false;
                while baking.load(std::sync::atomic::Ordering::Relaxed) {
                    ran |= Command::new(&foreign).status().is_ok();
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                ran
            });
            let run = bake(cloud, dir, "filter.toml", backend, commit, family);
            baking.store(false, std::sync::atomic::Ordering::Relaxed);
            (run, watcher.join().unwrap())
        });
        let Baked {
            run,
            manifest,
            snapshot,
            raw,
        } = Baked::exported(cloud, dir, run);
        assert!(
            !host_ran_it,
            "{backend}: this host ran an arm64 program while the bake ran"
        );
        assert_eq!(manifest["architecture"], "arm64", "{}", run.dump());
        let image = runtime
            .block_on(
                clients
                    .ec2
                    .describe_images()
                    .image_ids(manifest["ami_id"].as_str().unwrap())
                    .send(),
            )
            .unwrap()
            .images()[0]
            .clone();
        assert_eq!(image.architecture().map(|a| a.as_str()), Some("arm64"));
        assert_eq!(
            crate::util::tag(image.tags(), "amibake:architecture"),
            Some("arm64"),
            "{image:?}"
        );

        let root = cloud.mount_snapshot(&snapshot, dir, partition_offset(&raw, 1));
        assert_composer_like_at(&root.root.join("srv/app"), &files, 33);
        assert_eq!(
            std::fs::read_to_string(root.root.join("etc/baked-on")).unwrap(),
            "aarch64\narm64\nenabled\nkept\n",
            "{backend}: the image's own arm64 programs ran, and could not remove their \
             emulator\n{}",
            run.dump()
        );
        drop(root);
        assert_filesystem_clean(&raw, partition_offset(&raw, 1), &format!("arm64 {backend}"));
        std::fs::remove_file(&raw).unwrap();
        assert_eq!(
            host_binfmt(&foreign),
            host_before,
            "{backend}: this host's binfmt_misc is as it was, and runs no arm64 program"
        );
        cloud.assert_nothing_temporary();
    }

    story
}

#[test]
fn an_arm64_al2023_is_baked_on_this_x86_64_host_through_qemu() {
    let story = bakes_arm64("al2023-arm64", "137112412989", "al2023-ami-2023.*-arm64");
    story.cloud.assert_nothing_temporary();
}

/// Debian's arm64 image bakes as AL2023's does; without the emulator, or with the sandbox's
/// compat, the run stops with exit 2 naming the fix: before any AWS call where the template
/// names the architecture, before anything is made where only the image says it.
#[test]
fn an_arm64_debian_is_baked_on_this_x86_64_host_through_qemu_and_never_without_it() {
    let story = bakes_arm64("debian-12-arm64", "136693071363", "debian-12-arm64-*");
    let (cloud, dir) = (&story.cloud, story.dir());

    // No emulator on PATH.
    let no_emulator = tempfile::tempdir().unwrap();
    let without_emulator = |template: &str| Run {
        command: format!("amibake bake {template} (no qemu on PATH)"),
        output: cloud
            .amibake(dir)
            .env("PATH", no_emulator.path())
            .args([
                "bake",
                template,
                "--tarball",
                "app.tar.gz",
                "--commit",
                "0e0e0e",
            ])
            .output()
            .unwrap(),
    };
    let before = cloud.calls().len();
    let run = without_emulator("filter.toml");
    run.expect_code(2);
    for named in [
        "the base image is arm64",
        "qemu-aarch64-static",
        "qemu-user-static",
    ] {
        assert!(run.stderr().contains(named), "{named}:\n{}", run.dump());
    }
    assert_eq!(cloud.calls().len(), before, "no AWS call:\n{}", run.dump());

    // compat has no user namespace of its own to register the emulator in.
    let compat = cloud.run_amibake(
        dir,
        &[
            "bake",
            "filter.toml",
            "--tarball",
            "app.tar.gz",
            "--commit",
            "0e0e0e",
            "--sandbox",
            "compat",
        ],
    );
    compat.expect_refused("sandbox = \"compat\"");
    assert_eq!(
        cloud.calls().len(),
        before,
        "no AWS call:\n{}",
        compat.dump()
    );

    let run = without_emulator("by-id.toml");
    run.expect_refused("qemu-aarch64-static");
    let made: Vec<String> = cloud.calls()[before..]
        .iter()
        .map(|c| c["action"].as_str().unwrap().to_string())
        .filter(|a| !a.starts_with("Describe") && !a.starts_with("Get"))
        .collect();
    assert!(made.is_empty(), "nothing is made: {made:?}\n{}", run.dump());
    cloud.assert_nothing_temporary();
}
