//! `amibake bake` with the `direct` backend, end to end through the real binary against the
//! local cloud's EBS direct APIs: no instance metadata, no volume, only changed blocks put,
//! the cache, a base this account does not own, and failures that leave nothing.

use std::collections::BTreeSet;
use std::path::PathBuf;

use crate::util::localcloud::{LocalCloud, PARTITION_1_OFFSET};
use crate::util::small_filesystem::SmallFilesystem;
use crate::util::tarballs::{append_raw, assert_composer_like_at, composer_like, gzip, tarball};
use crate::util::Run;
use tar::EntryType;

/// A port nothing listens on: this machine has no instance metadata.
const NO_IMDS: &str = "http://127.0.0.1:9";

/// This module's story: bakes with no build host, of a composer-like app.tar.gz.
struct BakeDirect;
type World = crate::util::World<BakeDirect>;

impl World {
    /// A story on `cloud` with a base of its own account, and `owned.toml` baking on it.
    fn with_owned_base(cloud: LocalCloud) -> (World, String) {
        let story = World::on(cloud);
        std::fs::write(story.dir().join("app.tar.gz"), gzip(&composer_like().0)).unwrap();
        let base = story.owned_base("partitioned");
        story.template("owned", &base);
        (story, base)
    }

    /// The cache every bake here uses: `$XDG_CACHE_HOME/amibake`, with XDG_CACHE_HOME the
    /// test's directory.
    fn cache(&self) -> PathBuf {
        self.dir().join("amibake")
    }

    fn template(&self, name: &str, base_ami: &str) {
        self.template_with(name, base_ami, "");
    }

    /// `template`, with `bake_lines` added to its [bake] table.
    fn template_with(&self, name: &str, base_ami: &str, bake_lines: &str) {
        let text = format!(
            "[bake]\n{bake_lines}name = \"shop-${{commit}}-${{timestamp}}-{name}\"\nbase_ami = \"{base_ami}\"\n\
             dest = \"/var/www/shop\"\nowner = \"www-data\"\ntags = {{ team = \"web\" }}\n\n\
             [[bake.provisioner]]\ninline = [\"echo ${{commit}} > /var/www/shop/REVISION\"]\n"
        );
        std::fs::write(self.dir().join(format!("{name}.toml")), text).unwrap();
    }

    /// `amibake` against this cloud, caching in `cache()`, its work directories (and so its
    /// mounts) in this test's directory.
    fn amibake(&self) -> std::process::Command {
        let mut command = self.cloud.amibake(self.dir());
        command
            .env("XDG_CACHE_HOME", self.dir())
            .env("TMPDIR", self.dir());
        command
    }

    /// `amibake bake` on a machine with no instance metadata.
    fn bake_command(&self, template: &str, extra: &[&str]) -> std::process::Command {
        let mut command = self.amibake();
        command
            .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", NO_IMDS)
            .args(["bake", template, "--tarball", "app.tar.gz"])
            .args(extra);
        command
    }

    fn bake(&self, template: &str, extra: &[&str]) -> Run {
        Run {
            command: format!("amibake bake {template} {extra:?}"),
            output: self.bake_command(template, extra).output().unwrap(),
        }
    }

    fn root_snapshot(&self, ami: &str) -> String {
        self.runtime
            .block_on(LocalCloud::root_snapshot(&self.clients, ami))
    }

    /// A base AMI of this account (as `amibake base` makes them) from a vendor AMI: the
    /// vendor's root through a volume into a snapshot of our own, with the vendor's layout.
    fn owned_base(&self, kind: &str) -> String {
        self.owned_base_encrypted(kind, None)
    }

    /// `owned_base`, its snapshot encrypted with `key` when there is one.
    fn owned_base_encrypted(&self, kind: &str, key: Option<&str>) -> String {
        let vendor = self.cloud.ls()["vendor_amis"][kind]
            .as_str()
            .unwrap()
            .to_string();
        let vendor_snapshot = self.root_snapshot(&vendor);
        let name = format!(
            "shop-base-{kind}{}",
            if key.is_some() { "-encrypted" } else { "" }
        );
        self.runtime.block_on(async {
            let volume = self
                .clients
                .ec2
                .create_volume()
                .snapshot_id(&vendor_snapshot)
                .availability_zone("us-east-1a")
                .set_encrypted(key.map(|_| true))
                .set_kms_key_id(key.map(str::to_string))
                .send()
                .await
                .unwrap();
            LocalCloud::image_of_volume(&self.clients, volume.volume_id().unwrap(), &name).await
        })
    }

    /// Removes the image a successful `run` made, with its snapshots.
    fn take_back(&self, run: &Run) {
        let ami = run.json()["ami_id"].as_str().unwrap().to_string();
        self.runtime
            .block_on(amibake::aws::image::deregister_with_snapshots(
                self.clients.clone(),
                ami,
            ))
            .unwrap();
    }

    fn snapshot(&self, id: &str) -> serde_json::Value {
        self.cloud.ls()["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("no snapshot {id}"))
    }

    fn snapshot_ids(&self) -> BTreeSet<String> {
        ids(&self.cloud.ls()["snapshots"])
    }

    fn image_ids(&self) -> BTreeSet<String> {
        ids(&self.cloud.ls()["images"])
    }

    /// The baked image holds the tarball byte for byte, and the provisioner's output.
    fn assert_holds_the_app(&self, snapshot: &str, offset: u64, commit: &str) {
        let image = self.cloud.mount_snapshot(snapshot, self.dir(), offset);
        let app = image.root.join("var/www/shop");
        assert_composer_like_at(&app, &composer_like().1, 33);
        assert_eq!(
            std::fs::read_to_string(app.join("REVISION")).unwrap(),
            format!("{commit}\n")
        );
        assert!(
            std::fs::read_to_string(image.root.join("etc/debian_version"))
                .unwrap()
                .starts_with("12."),
            "the base's files are there too"
        );
        drop(image);
        // Consistent as e2fsck sees it, the journal the base's again (see below) included.
        let raw = self.dir().join(format!("{snapshot}.img"));
        crate::util::localcloud::assert_filesystem_clean(&raw, offset, snapshot);
        let _ = std::fs::remove_file(raw);
    }

    /// No loop device over anything of this test, no mount of its bakes, nothing half-made
    /// in the cache.
    fn assert_nothing_left_here(&self) {
        let loops = std::process::Command::new("losetup")
            .args(["--list", "--noheadings", "--output", "BACK-FILE"])
            .output()
            .unwrap();
        let loops = String::from_utf8_lossy(&loops.stdout);
        let dir = self.dir().to_string_lossy().into_owned();
        assert!(
            !loops.lines().any(|l| l.contains(&dir)),
            "a loop device is left over this test's files:\n{loops}"
        );
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        assert!(
            !mounts.lines().any(|l| l.contains(&dir)),
            "a mount is left in this test's directory:\n{mounts}"
        );
        for entry in std::fs::read_dir(self.cache())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            assert!(
                !name.starts_with('.'),
                "the cache holds {name}: a partial entry or a working copy"
            );
        }
        assert_eq!(
            self.cloud.ls()["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|v| v["attached_to"] != self.cloud.build_host())
                .count(),
            0,
            "no volume is made"
        );
    }
}

fn ids(list: &serde_json::Value) -> BTreeSet<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect()
}

fn count(calls: &[serde_json::Value], action: &str) -> usize {
    calls.iter().filter(|c| c["action"] == action).count()
}

fn ok_count(calls: &[serde_json::Value], action: &str) -> usize {
    calls
        .iter()
        .filter(|c| c["action"] == action && c["status"].as_u64().is_some_and(|s| s < 300))
        .count()
}

/// A directory made immutable (`chattr +i`: no entry added or removed) while this lives.
struct Immutable(PathBuf);

impl Immutable {
    fn new(dir: &std::path::Path) -> Immutable {
        let made = std::process::Command::new("chattr")
            .arg("+i")
            .arg(dir)
            .status()
            .unwrap();
        assert!(made.success(), "chattr +i {}", dir.display());
        Immutable(dir.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

/// `command` in a mount namespace of its own whose /sys is read-only: the kernel refuses
/// a loop device's settings there as it would where sysfs is not writable.
fn read_only_sys(command: std::process::Command) -> std::process::Command {
    let mut wrapped = std::process::Command::new("unshare");
    wrapped
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(r#"mount -o remount,bind,ro /sys && exec "$0" "$@""#)
        .arg(command.get_program())
        .args(command.get_args());
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    if let Some(dir) = command.get_current_dir() {
        wrapped.current_dir(dir);
    }
    wrapped
}

#[test]
fn direct_bakes_without_imds_or_volumes_and_puts_only_changed_blocks() {
    let _module = crate::util::module_turn(module_path!());
    let (story, base) = World::with_owned_base(LocalCloud::start("quick"));
    let base_snapshot = story.root_snapshot(&base);

    // 1. No instance metadata: `direct` is chosen, and a cold cache is filled.
    let before = story.cloud.calls().len();
    let run = story.bake("owned.toml", &["--commit", "c0ffee1"]);
    run.expect_code(0);
    assert!(
        run.stderr()
            .contains("backend direct: no instance metadata"),
        "the choice is said\n{}",
        run.dump()
    );
    let m = run.json();
    assert_eq!(m["backend"], "direct");
    let calls = story.cloud.calls_since(before);
    for action in [
        "CreateVolume",
        "AttachVolume",
        "DetachVolume",
        "CreateSnapshot",
    ] {
        assert_eq!(count(&calls, action), 0, "no {action}: {calls:?}");
    }
    assert!(ok_count(&calls, "GetSnapshotBlock") > 0, "the base is read");
    let snapshot = m["snapshot_id"].as_str().unwrap();
    let described = story.snapshot(snapshot);
    assert_eq!(described["parent"], base_snapshot.as_str(), "{described}");
    assert_eq!(described["tags"]["amibake:build-id"], m["build_id"]);
    assert_eq!(described["tags"]["team"], "web");
    let changed: usize = String::from_utf8(
        story
            .cloud
            .cli(&["changed-blocks", &base_snapshot, snapshot])
            .stdout,
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap();
    let puts = ok_count(&calls, "PutSnapshotBlock");
    assert!(
        puts > 0 && puts <= changed,
        "{puts} blocks put, {changed} blocks differ"
    );
    // The upload's progress says its total once the reading has found every block: the
    // last says all of it is put.
    let upload: Vec<serde_json::Value> = run
        .stderr()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == "progress" && e["step"] == "upload snapshot")
        .filter(|e| e["unit"] == "bytes")
        .collect();
    let last = upload.last().unwrap_or_else(|| panic!("{}", run.dump()));
    assert_eq!(last["done"], (puts as u64 * 512 * 1024), "{last}");
    assert_eq!(last["total"], last["done"], "{last}");
    // The bake's transactions in the ext4 journal are not among them: the journal was
    // clean after the unmount and is put back to the base's.
    assert!(
        run.stderr()
            .contains("of the journal put back to the base's"),
        "{}",
        run.dump()
    );
    story.assert_holds_the_app(snapshot, PARTITION_1_OFFSET, "c0ffee1");
    story.assert_nothing_left_here();

    // 2. The next bake on that base downloads nothing.
    let before = story.cloud.calls().len();
    let again = story.bake("owned.toml", &["--commit", "c0ffee2"]);
    again.expect_code(0);
    let calls = story.cloud.calls_since(before);
    assert_eq!(count(&calls, "GetSnapshotBlock"), 0, "{calls:?}");
    assert_eq!(count(&calls, "ListSnapshotBlocks"), 0);
    let m2 = again.json();
    assert_eq!(
        story.snapshot(m2["snapshot_id"].as_str().unwrap())["parent"],
        base_snapshot.as_str()
    );
    story.assert_holds_the_app(
        m2["snapshot_id"].as_str().unwrap(),
        PARTITION_1_OFFSET,
        "c0ffee2",
    );

    // 3. Where the kernel will not drop the image's flushes (here /sys is read-only, in a
    //    mount namespace of the bake's own), the bake goes on, its writes reaching this
    //    host's disk, and says why.
    let command = read_only_sys(story.bake_command("owned.toml", &["--commit", "c0ffee3"]));
    let flushed = Run {
        command: "amibake bake owned.toml (with /sys read-only)".into(),
        output: { command }.output().unwrap(),
    };
    flushed.expect_code(0);
    assert!(
        flushed.stderr().contains("write_cache")
            && flushed
                .stderr()
                .contains("written to this host's disk before they are read back"),
        "the slower way is said\n{}",
        flushed.dump()
    );
    story.assert_holds_the_app(
        flushed.json()["snapshot_id"].as_str().unwrap(),
        PARTITION_1_OFFSET,
        "c0ffee3",
    );
    story.assert_nothing_left_here();

    // 4. A working copy that cannot be removed (its directory made immutable once the copy
    //    is there) fails nothing early: the bake registers its image, tries again after it,
    //    and names the copy it could not clean.
    let cache_dir = story.cache();
    let immutable = std::cell::RefCell::new(None);
    let (kept, _) = crate::util::act_when(
        story.bake_command("owned.toml", &["--commit", "c0ffee4"]),
        "amibake bake owned.toml (its working copy's directory immutable)",
        |line| line.contains(r#""event":"step_started""#) && line.contains("extract tarball"),
        |_, _| *immutable.borrow_mut() = Some(Immutable::new(&cache_dir)),
    );
    drop(immutable.take());
    kept.expect_code(1);
    let copy = std::fs::read_dir(&cache_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".copy-")
        })
        .unwrap_or_else(|| panic!("the copy is still there\n{}", kept.dump()));
    let named = copy.display().to_string();
    let stderr = kept.stderr();
    assert!(
        stderr.contains("tried again after the bake")
            && stderr
                .lines()
                .any(|l| l.starts_with("error: could not clean up") && l.contains(&named)),
        "{}",
        kept.dump()
    );
    story.assert_holds_the_app(
        kept.json()["snapshot_id"].as_str().unwrap(),
        PARTITION_1_OFFSET,
        "c0ffee4",
    );
    std::fs::remove_file(&copy).unwrap();
    story.assert_nothing_left_here();

    // `cache ls` shows the one entry; `cache prune` with an age keeps it, without removes it.
    let ls = |args: &[&str]| {
        let out = story.amibake().args(["cache"]).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let answer = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap();
        crate::util::schema::assert_valid(&format!("cache-{}", args[0]), &answer);
        answer
    };
    let listed = ls(&["ls"]);
    assert_eq!(listed["entries"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed["entries"][0]["snapshot_id"], base_snapshot.as_str());
    assert!(listed["entries"][0]["bytes"].as_u64().unwrap() > 1 << 20);
    assert_eq!(ls(&["prune", "--older-than", "1h"])["kept"], 1);
    let pruned = ls(&["prune"]);
    assert_eq!(pruned["removed"][0][0], base_snapshot.as_str(), "{pruned}");
    assert_eq!(ls(&["ls"])["entries"].as_array().unwrap().len(), 0);

    // 3. An unpartitioned base: the whole disk is the root filesystem.
    let flat = story.owned_base("flat");
    story.template("flat", &flat);
    let run = story.bake("flat.toml", &["--commit", "c0ffee3", "--backend", "direct"]);
    run.expect_code(0);
    let m3 = run.json();
    assert_eq!(
        story.snapshot(m3["snapshot_id"].as_str().unwrap())["parent"],
        story.root_snapshot(&flat).as_str()
    );
    story.assert_holds_the_app(m3["snapshot_id"].as_str().unwrap(), 0, "c0ffee3");
    story.assert_nothing_left_here();

    // 3b. A larger volume than the base's on a partitioned base: the root partition grows
    //     to the end of the disk and its filesystem fills it, so the room is the tarball's.
    story.template_with("bigger", &base, "root_volume_size_gb = 10\n");
    let run = story.bake("bigger.toml", &["--commit", "c0ffee6"]);
    run.expect_code(0);
    let snapshot = run.json()["snapshot_id"].as_str().unwrap().to_string();
    let mounted = story
        .cloud
        .mount_grown_root(&snapshot, story.dir(), 10 << 30);
    assert!(mounted.root.join("var/www/shop/REVISION").is_file());
    drop(mounted);
    let _ = std::fs::remove_file(story.dir().join(format!("{snapshot}.img")));
    story.assert_nothing_left_here();

    // 3c. What a bake only reads of its base keeps its access time: a base whose files were
    //     last read long ago (as any base a few days old), baked on, reads /etc/passwd for
    //     the owner and runs /bin/sh for the provisioner; under the default `relatime`
    //     each would have its inode rewritten, a changed block with nothing of the bake's.
    const LONG_AGO: i64 = 978_307_200; // 2001-01-01
    let read_by_a_bake = ["etc/passwd", "etc/group", "usr/bin/dash"];
    std::fs::write(
        story.dir().join("aged.toml"),
        format!(
            "[bake]\nname = \"aged-${{commit}}-${{timestamp}}\"\nbase_ami = \"{base}\"\n\
             dest = \"/srv/aged\"\n\n[[bake.provisioner]]\ninline = [\"touch -a -d @{LONG_AGO} {}\"]\n",
            read_by_a_bake.map(|f| format!("/{f}")).join(" ")
        ),
    )
    .unwrap();
    let run = story.bake("aged.toml", &["--commit", "c0ffee7"]);
    run.expect_code(0);
    let aged = run.json()["ami_id"].as_str().unwrap().to_string();
    story.template("on-aged", &aged);
    let run = story.bake("on-aged.toml", &["--commit", "c0ffee8"]);
    run.expect_code(0);
    let snapshot = run.json()["snapshot_id"].as_str().unwrap().to_string();
    let image = story
        .cloud
        .mount_snapshot(&snapshot, story.dir(), PARTITION_1_OFFSET);
    assert!(image.root.join("var/www/shop/REVISION").is_file());
    for file in read_by_a_bake {
        let atime = std::os::unix::fs::MetadataExt::atime(
            &std::fs::metadata(image.root.join(file)).unwrap(),
        );
        assert_eq!(
            atime, LONG_AGO,
            "/{file} was read by the bake, and its atime written"
        );
    }
    drop(image);
    let _ = std::fs::remove_file(story.dir().join(format!("{snapshot}.img")));
    story.assert_nothing_left_here();

    // 4. The vendor's public base, which EBS direct does not serve: read through a copy,
    //    which goes, and uploaded whole with no parent.
    let vendor = story.vendor_ami();
    story.template("vendor", &vendor);
    let snapshots_before = story.snapshot_ids();
    let before = story.cloud.calls().len();
    let run = story.bake("vendor.toml", &["--commit", "c0ffee4"]);
    run.expect_code(0);
    assert!(
        run.stderr()
            .contains("every block is uploaded with no parent"),
        "{}",
        run.dump()
    );
    let m4 = run.json();
    let calls = story.cloud.calls_since(before);
    assert_eq!(ok_count(&calls, "CopySnapshot"), 1);
    let snapshot = m4["snapshot_id"].as_str().unwrap();
    assert_eq!(story.snapshot(snapshot)["parent"], serde_json::Value::Null);
    let new: Vec<String> = story
        .snapshot_ids()
        .difference(&snapshots_before)
        .cloned()
        .collect();
    assert_eq!(new, [snapshot.to_string()], "the copy is gone");
    story.assert_holds_the_app(snapshot, PARTITION_1_OFFSET, "c0ffee4");
    story.assert_nothing_left_here();

    // 5. An encrypted base of the account: with its own key the bake is its child and so
    //    encrypted with that key; with another key it is uploaded whole, encrypted with the
    //    template's key, and the run says why.
    let new_key = || {
        story
            .runtime
            .block_on(LocalCloud::new_kms_key(&story.clients))
    };
    let (base_key, other_key) = (new_key(), new_key());
    let encrypted = story.owned_base_encrypted("partitioned", Some(&base_key));
    let encrypted_snapshot = story.root_snapshot(&encrypted);
    for (name, key, parent, note) in [
        ("same-key", &base_key, Some(&encrypted_snapshot), None),
        (
            "other-key",
            &other_key,
            None,
            Some("bake.kms_key_id is not the key of the base's snapshot"),
        ),
    ] {
        story.template_with(name, &encrypted, &format!("kms_key_id = \"{key}\"\n"));
        let run = story.bake(&format!("{name}.toml"), &["--commit", "c0ffee5"]);
        run.expect_code(0);
        let snapshot = run.json()["snapshot_id"].as_str().unwrap().to_string();
        let described = story.snapshot(&snapshot);
        assert_eq!(described["encrypted"], true, "{name}: {described}");
        assert_eq!(described["kms_key_id"], key.as_str(), "{name}: {described}");
        assert_eq!(
            described["parent"].as_str(),
            parent.map(String::as_str),
            "{name}: {described}"
        );
        if let Some(note) = note {
            assert!(run.stderr().contains(note), "{name}\n{}", run.dump());
        }
        story.assert_holds_the_app(&snapshot, PARTITION_1_OFFSET, "c0ffee5");
    }
    story.assert_nothing_left_here();

    // 6. Four bakes at once on this machine, two through the build host's volumes and two
    //    direct (on a cold cache, which both fill): each image holds its own tarball.
    let _ = std::fs::remove_dir_all(story.cache());
    let bakes: Vec<(String, &str)> = (0..4)
        .map(|i| (format!("twin{i}"), ["attach", "direct"][i % 2]))
        .collect();
    let children: Vec<_> = bakes
        .iter()
        .map(|(name, backend)| {
            let tar = tarball(|b| {
                append_raw(b, EntryType::Regular, "which", None, name.as_bytes());
                // Its own 3 MiB, so each upload puts blocks of its own.
                let own: Vec<u8> = (0..3u32 << 20)
                    .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ name.as_bytes()[4])
                    .collect();
                append_raw(b, EntryType::Regular, "own.bin", None, &own);
            });
            std::fs::write(story.dir().join(format!("{name}.tar")), tar).unwrap();
            story
                .amibake()
                .args(["bake", "owned.toml", "--tarball", &format!("{name}.tar")])
                .args(["--commit", name, "--backend", backend])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for ((name, backend), child) in bakes.iter().zip(children) {
        let run = Run {
            command: format!("amibake bake owned.toml --commit {name} --backend {backend}"),
            output: child.wait_with_output().unwrap(),
        };
        run.expect_code(0);
        let m = run.json();
        assert_eq!(m["backend"], *backend, "{}", run.dump());
        let snapshot = m["snapshot_id"].as_str().unwrap();
        let image = story
            .cloud
            .mount_snapshot(snapshot, story.dir(), PARTITION_1_OFFSET);
        let app = image.root.join("var/www/shop");
        assert_eq!(
            std::fs::read_to_string(app.join("which")).unwrap(),
            *name,
            "{backend} bake {name} holds its own tarball"
        );
        assert_eq!(
            std::fs::read_to_string(app.join("REVISION")).unwrap(),
            format!("{name}\n")
        );
        drop(image);
        let _ = std::fs::remove_file(story.dir().join(format!("{snapshot}.img")));
    }
    story.assert_nothing_left_here();
}

#[test]
fn a_fault_at_each_direct_call_or_a_damaged_block_leaves_nothing_and_names_its_step() {
    let _module = crate::util::module_turn(module_path!());
    let (story, base) = World::with_owned_base(LocalCloud::start("quick"));
    let vendor = story.vendor_ami();
    story.template("vendor", &vendor);
    // The base found through its channel in SSM, and a template with a KMS key of its own.
    story
        .runtime
        .block_on(
            story
                .clients
                .ssm
                .put_parameter()
                .name("/amibake/shop/base")
                .data_type("aws:ec2:image")
                .r#type(aws_sdk_ssm::types::ParameterType::String)
                .value(&base)
                .send(),
        )
        .unwrap();
    story.template("channel", "resolve:ssm:/amibake/shop/base");
    let key = story
        .runtime
        .block_on(LocalCloud::new_kms_key(&story.clients));
    story.template_with("keyed", &base, &format!("kms_key_id = \"{key}\"\n"));
    // A fault at each EC2, SSM, KMS, STS and EBS direct call of the direct path, in the order
    // a bake makes them: (template, service, action, calls let through first, step named,
    // whether the cache must be cold so that the call is made).
    type Fault = (
        &'static str,
        &'static str,
        &'static str,
        u32,
        Option<&'static str>,
        bool,
    );
    let faults: [Fault; 16] = [
        ("channel", "ssm", "GetParameter", 0, None, false),
        ("owned", "ec2", "DescribeImages", 0, None, false),
        ("keyed", "kms", "DescribeKey", 0, None, false),
        ("owned", "sts", "GetCallerIdentity", 0, None, true),
        ("owned", "ec2", "DescribeSnapshots", 0, None, true),
        ("owned", "ec2", "GetEbsEncryptionByDefault", 0, None, false),
        (
            "vendor",
            "ec2",
            "CopySnapshot",
            0,
            Some("fetch base image"),
            true,
        ),
        // The wait for the copy, after the plan's look at the base's snapshot.
        (
            "vendor",
            "ec2",
            "DescribeSnapshots",
            1,
            Some("fetch base image"),
            true,
        ),
        (
            "owned",
            "ebs",
            "ListSnapshotBlocks",
            0,
            Some("fetch base image"),
            true,
        ),
        (
            "owned",
            "ebs",
            "GetSnapshotBlock",
            5,
            Some("fetch base image"),
            true,
        ),
        (
            "owned",
            "ebs",
            "StartSnapshot",
            0,
            Some("upload snapshot"),
            false,
        ),
        (
            "owned",
            "ebs",
            "PutSnapshotBlock",
            3,
            Some("upload snapshot"),
            false,
        ),
        (
            "owned",
            "ebs",
            "CompleteSnapshot",
            0,
            Some("upload snapshot"),
            false,
        ),
        // The wait for the new snapshot, after the plan's look at the base's.
        (
            "owned",
            "ec2",
            "DescribeSnapshots",
            1,
            Some("upload snapshot"),
            false,
        ),
        (
            "owned",
            "ec2",
            "RegisterImage",
            0,
            Some("register image"),
            false,
        ),
        // The wait for the image, after the base's description and the fingerprint lookup.
        (
            "owned",
            "ec2",
            "DescribeImages",
            2,
            Some("register image"),
            false,
        ),
    ];
    let mut commit = 0;
    for (template, service, action, after, step, cold) in faults {
        if cold {
            let _ = std::fs::remove_dir_all(story.cache());
        }
        let (snapshots, images) = (story.snapshot_ids(), story.image_ids());
        commit += 1;
        let template = format!("{template}.toml");
        let commit = format!("bad{commit:04}");
        let cause = story.cloud.fail_once(service, action, after);
        let run = story.bake(&template, &["--commit", &commit]);
        run.expect_failure(&cause, step);
        assert_eq!(story.snapshot_ids(), snapshots, "after a fault in {action}");
        assert_eq!(story.image_ids(), images, "after a fault in {action}");
        story.assert_nothing_left_here();
        if step == Some("fetch base image") {
            let entries = std::fs::read_dir(story.cache())
                .map(|d| d.count())
                .unwrap_or(0);
            assert_eq!(entries, 0, "a failed fetch leaves no entry");
        }
    }

    // A block damaged on its way down: fetched again, the bake goes on. Damaged every time:
    // the run fails naming the block and the snapshot, and nothing of it is cached.
    let _ = std::fs::remove_dir_all(story.cache());
    story.cloud.damage_blocks("GetSnapshotBlock", 3, 1);
    let run = story.bake("owned.toml", &["--commit", "damaged1"]);
    run.expect_code(0);
    story.take_back(&run);
    let _ = std::fs::remove_dir_all(story.cache());
    let (snapshots, images) = (story.snapshot_ids(), story.image_ids());
    story.cloud.damage_blocks("GetSnapshotBlock", 3, 1000);
    let run = story.bake("owned.toml", &["--commit", "damaged2"]);
    assert_eq!(run.code(), 1, "{}", run.dump());
    let error = run
        .stderr()
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_default()
        .to_string();
    assert!(
        error.contains("fetch base image")
            && error.contains("GetSnapshotBlock snap-")
            && error.contains(" block ")
            && error.contains("do not match the checksum EBS sent")
            && error.contains("3 times"),
        "{}",
        run.dump()
    );
    story
        .cloud
        .cli(&["fault", "GetSnapshotBlock", "--times", "0"]);
    assert_eq!(story.snapshot_ids(), snapshots);
    assert_eq!(story.image_ids(), images);
    story.assert_nothing_left_here();
    let entries = std::fs::read_dir(story.cache())
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(entries, 0, "a damaged fetch leaves no entry");

    // A cache whose disk fills as the base comes down (a tmpfs of 16 MiB, the base's
    // blocks are some 200 MiB): the run fails naming the block it could not write, and
    // leaves nothing, in the cloud or in the cache.
    let _ = std::fs::remove_dir_all(story.cache());
    let full = SmallFilesystem::mount_at(&story.cache(), "16m");
    let run = story.bake("owned.toml", &["--commit", "full0001"]);
    run.expect_failure("No space left on device", Some("fetch base image"))
        .expect_failure("write block ", None);
    let entries: Vec<_> = std::fs::read_dir(story.cache())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        entries.is_empty(),
        "a fetch that could not be written leaves {entries:?}"
    );
    drop(full);
    assert_eq!(story.snapshot_ids(), snapshots);
    assert_eq!(story.image_ids(), images);
    story.assert_nothing_left_here();

    // A cleanup that fails: the started snapshot cannot be deleted, and the run names it.
    story.cloud.cli(&[
        "fault",
        "PutSnapshotBlock",
        "--error",
        "UnauthorizedOperation",
    ]);
    story.cloud.cli(&[
        "fault",
        "DeleteSnapshot",
        "--error",
        "UnauthorizedOperation",
    ]);
    let snapshots = story.snapshot_ids();
    let run = story.bake("owned.toml", &["--commit", "undone1"]);
    let left: Vec<String> = story
        .snapshot_ids()
        .difference(&snapshots)
        .cloned()
        .collect();
    assert_eq!(
        left.len(),
        1,
        "the started snapshot is left\n{}",
        run.dump()
    );
    run.expect_leftover(&[&left[0], "delete snapshot", "UnauthorizedOperation"]);
    story
        .runtime
        .block_on(
            story
                .clients
                .ec2
                .delete_snapshot()
                .snapshot_id(&left[0])
                .send(),
        )
        .unwrap();
    story.assert_nothing_left_here();
}

#[test]
fn lost_answers_cost_no_build_and_ctrl_c_or_throttling_leave_nothing() {
    let _module = crate::util::module_turn(module_path!());
    let (story, _) = World::with_owned_base(LocalCloud::start("quick"));
    // A call carried out whose answer is lost (HTTP 500, the SDK retries) costs a retry,
    // never the build: StartSnapshot's retry, with the same client token, answers the
    // snapshot the first attempt started; a block put again is the same block; a completion
    // refused as "no longer pending" is found completing. One snapshot each time.
    for (n, action) in [
        "StartSnapshot",
        "PutSnapshotBlock",
        "CompleteSnapshot",
        "RegisterImage",
    ]
    .into_iter()
    .enumerate()
    {
        let snapshots = story.snapshot_ids();
        story.cloud.cli(&["fault", action, "--lose-answer"]);
        let run = story.bake("owned.toml", &["--commit", &format!("lost000{n}")]);
        run.expect_code(0);
        let made: Vec<String> = story
            .snapshot_ids()
            .difference(&snapshots)
            .cloned()
            .collect();
        assert_eq!(
            made,
            [run.json()["snapshot_id"].as_str().unwrap()],
            "{action}: {}",
            run.dump()
        );
        story.take_back(&run);
        assert_eq!(story.snapshot_ids(), snapshots, "{action}");
    }

    // Ctrl-C at the start of each step. Where a step waits on the cloud (its first call
    // held), the interrupt is reported in exactly that step; the others take milliseconds
    // here, so it may land in a later one. Either way: exit 130, nothing left, no partial
    // cache entry.
    let sleepy = std::fs::read_to_string(story.dir().join("owned.toml"))
        .unwrap()
        .replace(
            "echo ${commit} > /var/www/shop/REVISION",
            "echo sleeping; sleep 600",
        );
    std::fs::write(story.dir().join("sleepy.toml"), sleepy).unwrap();
    let steps: [(&str, &str, &str); 11] = [
        ("fetch base image", "GetSnapshotBlock", ""),
        ("copy base image", "", ""),
        ("attach loop device", "", ""),
        ("mount image", "", ""),
        ("extract tarball", "", ""),
        ("prepare chroot", "", ""),
        ("run provisioners", "", "\"line\":\"sleeping\""),
        ("unmount image", "", ""),
        ("detach loop device", "", ""),
        ("upload snapshot", "PutSnapshotBlock", ""),
        ("register image", "RegisterImage", ""),
    ];
    let order: Vec<&str> = steps.iter().map(|(step, _, _)| *step).collect();
    for (step, held_call, signal_at) in steps {
        if step == "fetch base image" {
            let _ = std::fs::remove_dir_all(story.cache());
        }
        if !held_call.is_empty() {
            story.cloud.cli(&["fault", held_call, "--delay", "2"]);
        }
        // Only the provisioners' step sleeps: a later step would wait behind it.
        let template = if signal_at.is_empty() {
            "owned.toml"
        } else {
            "sleepy.toml"
        };
        let (snapshots, images) = (story.snapshot_ids(), story.image_ids());
        let command = story.bake_command(template, &["--force", "--commit", "c7r1c"]);
        let this_step = format!("\"step\":\"{step}\"");
        let run = crate::util::interrupt_when(
            command,
            &format!("amibake bake, Ctrl-C in {step}"),
            |line| match signal_at {
                "" => line.contains("\"event\":\"step_started\"") && line.contains(&this_step),
                output => line.contains(output),
            },
        );
        run.expect_code(130);
        let reported = order
            .iter()
            .position(|s| {
                run.stderr()
                    .contains(&format!("error: interrupted during {s}; cleaned up"))
            })
            .unwrap_or_else(|| panic!("no interrupted step named\n{}", run.dump()));
        let signalled = order.iter().position(|s| *s == step).unwrap();
        if held_call.is_empty() && signal_at.is_empty() {
            assert!(reported >= signalled, "{step}\n{}", run.dump());
        } else {
            assert_eq!(order[reported], step, "{}", run.dump());
        }
        assert_eq!(story.snapshot_ids(), snapshots, "after Ctrl-C in {step}");
        assert_eq!(story.image_ids(), images, "after Ctrl-C in {step}");
        story.assert_nothing_left_here();
        if step == "fetch base image" {
            assert!(
                !story.cache().exists() || std::fs::read_dir(story.cache()).unwrap().count() == 0,
                "an interrupted fetch leaves no entry"
            );
        }
    }

    // A third of every call throttled: the SDK's retries ride it out, cold cache and all.
    let _ = std::fs::remove_dir_all(story.cache());
    story.cloud.cli(&["fault", "--throttle", "30"]);
    let before = story.cloud.calls().len();
    let run = story.bake("owned.toml", &["--commit", "throttled"]);
    story.cloud.cli(&["fault", "--throttle", "0"]);
    run.expect_code(0);
    let throttled = story
        .cloud
        .calls_since(before)
        .iter()
        .filter(|c| c["code"] == "RequestThrottledException")
        .count();
    assert!(
        throttled > 10,
        "throttling was on: {throttled} calls throttled"
    );
    let m = run.json();
    story.assert_holds_the_app(
        m["snapshot_id"].as_str().unwrap(),
        PARTITION_1_OFFSET,
        "throttled",
    );
    story.assert_nothing_left_here();
}

/// At EBS's own 100 ms a block call, with half of all block calls throttled: the calls in
/// flight back off, the SDK's retries ride the throttles out, cold cache and all, and the
/// image holds the tarball byte for byte.
#[test]
fn half_the_block_calls_throttled_at_ebs_latency_still_bake_the_tree_byte_for_byte() {
    let _module = crate::util::module_turn(module_path!());
    let (story, _) = World::with_owned_base(LocalCloud::start_with_block_latency("quick", 0.1));
    let _ = std::fs::remove_dir_all(story.cache());
    story.cloud.cli(&[
        "fault",
        "--throttle",
        "50",
        "--throttle-only",
        "GetSnapshotBlock",
        "--throttle-only",
        "PutSnapshotBlock",
    ]);
    let before = story.cloud.calls().len();
    let run = story.bake("owned.toml", &["--commit", "halved"]);
    story.cloud.cli(&["fault", "--throttle", "0"]);
    run.expect_code(0);
    let calls = story.cloud.calls_since(before);
    let throttled: BTreeSet<&str> = calls
        .iter()
        .filter(|c| c["code"] == "RequestThrottledException")
        .filter_map(|c| c["action"].as_str())
        .collect();
    assert_eq!(
        throttled,
        BTreeSet::from(["GetSnapshotBlock", "PutSnapshotBlock"]),
        "both the fetch and the upload were throttled"
    );
    // amibake saw them (the pace halves on what it counts) and says so.
    for calls in ["reads", "puts"] {
        assert!(
            run.stderr()
                .lines()
                .any(|l| l.contains("EBS throttled ")
                    && l.contains(&format!("of the {calls}, retried"))),
            "the {calls} throttled are counted\n{}",
            run.dump()
        );
    }
    let m = run.json();
    story.assert_holds_the_app(
        m["snapshot_id"].as_str().unwrap(),
        PARTITION_1_OFFSET,
        "halved",
    );
    story.assert_nothing_left_here();
}
