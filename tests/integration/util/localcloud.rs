//! Starts a local cloud (tests/localcloud) for one test and always stops it, so no loop
//! device, mount, /dev link or process outlives the test.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Where the vendor image's root partition (partition 1) starts on its disk.
pub const PARTITION_1_OFFSET: u64 = 2048 * 512;

/// The account the local cloud's credentials are of: its images and snapshots are a run's.
pub const ACCOUNT: &str = "123456789012";

pub struct LocalCloud {
    /// Not a TempDir: it is removed only once nothing is mounted beneath it (an instance's
    /// root holds a bind of /dev, and a recursive delete would walk into the host's).
    pub(super) state: PathBuf,
    /// The `export` lines of `localcloud up`: what every AWS SDK reads; and where amibake
    /// keeps its image cache, within the cloud's state.
    pub env: Vec<(String, String)>,
    info: serde_json::Value,
    /// This machine's private-key directories when the cloud started: what a run killed
    /// outside this test left is not this test's to judge.
    key_dirs_before: std::collections::BTreeSet<String>,
    /// Likewise the credential guard's cgroups.
    cgroups_before: std::collections::BTreeSet<PathBuf>,
    /// Held for the cloud's life: no story that keeps a run to look at (`util::alone`)
    /// runs meanwhile, as what it keeps is what this story asserts is gone.
    _turn: Option<super::Turn>,
}

/// A base build keeps its private key on tmpfs, in a directory named for its build; a run
/// still holding its lock (a story beside this one) is not done with it.
fn private_key_dirs() -> std::collections::BTreeSet<String> {
    use amibake::commands::gc::build_id_in;
    use amibake::host::run_lock::is_held;
    std::fs::read_dir("/dev/shm")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("amibake-ab-"))
        .filter(|n| build_id_in(n).is_none_or(|run| !is_held(&run)))
        .collect()
}

/// Mounts of runs that are over: a run still holding its lock (a story beside this one) is
/// not done with its mounts.
pub fn bake_mounts_left() -> Vec<String> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    mounts
        .lines()
        .filter(|l| {
            let point = Path::new(l.split(' ').nth(1).unwrap_or_default());
            point
                .iter()
                .find_map(|n| amibake::commands::gc::build_id_in(&n.to_string_lossy()))
                .is_some_and(|run| !amibake::host::run_lock::is_held(&run))
        })
        .map(str::to_string)
        .collect()
}

/// The credential guard's cgroups (`amibake-provisioner-*`) anywhere in the cgroup2 tree.
fn guard_cgroups() -> std::collections::BTreeSet<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mut left = std::collections::BTreeSet::new();
    for line in mountinfo.lines().filter(|l| l.contains(" - cgroup2 ")) {
        let mut stack = vec![PathBuf::from(line.split(' ').nth(4).unwrap())];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    // `amibake-<build id>-guard-<pid>-<n>`; a run still holding its lock (a
                    // test beside this one) is not done with it.
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let run = name
                        .strip_prefix("amibake-")
                        .and_then(|rest| rest.split_once("-guard-"))
                        .map(|(run, _)| run.to_string());
                    if run.is_some_and(|run| !amibake::host::run_lock::is_held(&run)) {
                        left.insert(entry.path());
                    }
                    stack.push(entry.path());
                }
            }
        }
    }
    left
}

fn localcloud_bin() -> PathBuf {
    super::repo_root().join("tests/localcloud/localcloud")
}

impl LocalCloud {
    /// `latency`: none, quick or realistic.
    pub fn start(latency: &str) -> LocalCloud {
        LocalCloud::start_with(latency, &[])
    }

    /// A cloud whose catalogue also holds these vendors' images (`localcloud up --vendor`),
    /// in `ls()["vendor_amis"][family]`.
    pub fn start_with(latency: &str, vendors: &[&str]) -> LocalCloud {
        let vendors: Vec<String> = vendors.iter().map(|v| format!("--vendor={v}")).collect();
        LocalCloud::up(latency, &vendors)
    }

    /// A cloud whose block calls take `seconds` each, as EBS's do (`--block-latency`).
    pub fn start_with_block_latency(latency: &str, seconds: f64) -> LocalCloud {
        LocalCloud::up(latency, &[format!("--block-latency={seconds}")])
    }

    /// `localcloud up --latency LATENCY` with `more` of its flags.
    fn up(latency: &str, more: &[String]) -> LocalCloud {
        let turn = super::turn_unless_held();
        let state = tempfile::Builder::new()
            .prefix("amibake-localcloud-")
            .tempdir()
            .expect("temp dir")
            .keep();
        let mut args = vec!["up".to_string(), "--latency".into(), latency.into()];
        args.extend(more.iter().cloned());
        let out = run(&state, &args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(
            out.status.success(),
            "localcloud up failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut env: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        // The direct backend's base images, kept by default in ~/.cache/amibake: there a
        // test run's bakes of new snapshot ids piled up by the hundred (63 GB here, until a
        // CI run found its disk full). Here they go with the cloud.
        env.push((
            "XDG_CACHE_HOME".into(),
            state.join("cache").to_string_lossy().into_owned(),
        ));
        let info =
            serde_json::from_str(&std::fs::read_to_string(state.join("ready.json")).unwrap())
                .unwrap();
        LocalCloud {
            state,
            env,
            info,
            key_dirs_before: private_key_dirs(),
            cgroups_before: guard_cgroups(),
            _turn: turn,
        }
    }

    /// The private-key directories (`/dev/shm/amibake-*`) made since this cloud started
    /// and still there.
    pub fn private_key_dirs_left(&self) -> Vec<String> {
        private_key_dirs()
            .difference(&self.key_dirs_before)
            .cloned()
            .collect()
    }

    /// The credential guard's cgroups made since this cloud started and still there.
    pub fn guard_cgroups_left(&self) -> Vec<PathBuf> {
        guard_cgroups()
            .difference(&self.cgroups_before)
            .cloned()
            .collect()
    }

    /// amibake's clients for this cloud, configured as a user's would be: from the process
    /// environment. That environment is the whole test binary's: the lock keeps two tests'
    /// clouds from mixing while it is set and read, the clients' construction included (a
    /// client may read its endpoint then).
    pub async fn clients(&self) -> amibake::aws::Clients {
        self.clients_in(None).await
    }

    /// The same in `region` (None: the cloud's own). Built under the same lock: a client
    /// reads endpoint variables when it is made, and another test may be setting them.
    pub async fn clients_in(&self, region: Option<&str>) -> amibake::aws::Clients {
        static ENVIRONMENT: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _held = ENVIRONMENT.lock().unwrap_or_else(|e| e.into_inner());
        // The AWS variables only: the rest of `env` is for amibake's own runs.
        for (key, value) in self.env.iter().filter(|(k, _)| k.starts_with("AWS_")) {
            std::env::set_var(key, value);
        }
        // Built on a thread of its own, so the lock is not held across an await here.
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let config = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap()
                        .block_on(amibake::aws::sdk_config(&amibake::aws::AwsOptions {
                            region: region.map(str::to_string),
                            ..Default::default()
                        }));
                    amibake::aws::Clients::new(&config).expect("the local cloud names a region")
                })
                .join()
                .unwrap()
        })
    }

    /// A new symmetric KMS key of this cloud's account: its ARN.
    pub async fn new_kms_key(clients: &amibake::aws::Clients) -> String {
        clients
            .kms
            .create_key()
            .description("amibake test")
            .send()
            .await
            .unwrap()
            .key_metadata()
            .unwrap()
            .arn()
            .unwrap()
            .to_string()
    }

    /// Progress for the project's own waits called from a test: drawn nowhere.
    pub fn quiet_progress() -> amibake::engine::Progress {
        amibake::engine::Progress::new(
            std::sync::Arc::new(amibake::engine::render::PlainLines::new(
                Box::new(std::io::sink()),
                false,
            )),
            "",
        )
    }

    /// A completed snapshot of the new volume `volume_id`, as a base of the account is
    /// made: the volume is waited for, snapshotted and deleted.
    pub async fn snapshot_of_volume(clients: &amibake::aws::Clients, volume_id: &str) -> String {
        let (progress, never) = (
            Self::quiet_progress(),
            tokio_util::sync::CancellationToken::new(),
        );
        amibake::aws::volume::wait(clients, volume_id, "available", &never, &progress)
            .await
            .unwrap();
        let snapshot = clients
            .ec2
            .create_snapshot()
            .volume_id(volume_id)
            .send()
            .await
            .unwrap();
        let snapshot_id = snapshot.snapshot_id().unwrap().to_string();
        amibake::aws::snapshot::wait(clients, &snapshot_id, &never, &progress)
            .await
            .unwrap();
        clients
            .ec2
            .delete_volume()
            .volume_id(volume_id)
            .send()
            .await
            .unwrap();
        snapshot_id
    }

    /// A registered image named `name` whose root (/dev/xvda) is `snapshot_of_volume`, of
    /// the snapshot's size. Its id, once it is available.
    pub async fn image_of_volume(
        clients: &amibake::aws::Clients,
        volume_id: &str,
        name: &str,
    ) -> String {
        let snapshot_id = Self::snapshot_of_volume(clients, volume_id).await;
        // Read once the wait has seen it: a resource just made may not be visible yet.
        let size = clients
            .ec2
            .describe_snapshots()
            .snapshot_ids(&snapshot_id)
            .send()
            .await
            .unwrap()
            .snapshots()[0]
            .volume_size();
        let root = aws_sdk_ec2::types::EbsBlockDevice::builder()
            .snapshot_id(snapshot_id)
            .set_volume_size(size)
            .delete_on_termination(true)
            .build();
        let image = clients
            .ec2
            .register_image()
            .name(name)
            .architecture(aws_sdk_ec2::types::ArchitectureValues::X8664)
            .root_device_name("/dev/xvda")
            .virtualization_type("hvm")
            .ena_support(true)
            .block_device_mappings(
                aws_sdk_ec2::types::BlockDeviceMapping::builder()
                    .device_name("/dev/xvda")
                    .ebs(root)
                    .build(),
            )
            .send()
            .await
            .unwrap();
        let image_id = image.image_id().unwrap().to_string();
        amibake::aws::image::wait(
            clients,
            &image_id,
            amibake::aws::wait::WaitPolicy::REGISTERED,
            &tokio_util::sync::CancellationToken::new(),
            &Self::quiet_progress(),
        )
        .await
        .unwrap();
        image_id
    }

    /// The snapshot of the image's root volume.
    pub async fn root_snapshot(clients: &amibake::aws::Clients, image_id: &str) -> String {
        let image = clients
            .ec2
            .describe_images()
            .image_ids(image_id)
            .send()
            .await
            .unwrap()
            .images()[0]
            .clone();
        image.block_device_mappings()[0]
            .ebs()
            .and_then(|e| e.snapshot_id())
            .unwrap()
            .to_string()
    }

    /// A new volume, in the cloud's zone, of the Debian vendor image's root snapshot: its id.
    pub async fn vendor_root_volume(&self, clients: &amibake::aws::Clients) -> String {
        let vendor = self.ls()["vendor_amis"]["partitioned"]
            .as_str()
            .unwrap()
            .to_string();
        let snapshot = Self::root_snapshot(clients, &vendor).await;
        Self::volume_of(clients, &snapshot).await
    }

    /// A new volume, in the cloud's zone, of `snapshot`: its id.
    pub async fn volume_of(clients: &amibake::aws::Clients, snapshot: &str) -> String {
        clients
            .ec2
            .create_volume()
            .snapshot_id(snapshot)
            .availability_zone("us-east-1a")
            .send()
            .await
            .unwrap()
            .volume_id()
            .unwrap()
            .to_string()
    }

    /// A base image of this account made from the Debian vendor image with `edit` applied
    /// to its root filesystem (mounted read-write at the path it is given): what a base an
    /// attacker or a broken refresh job made would hold. Its id, once it is available.
    pub async fn edited_base(
        &self,
        clients: &amibake::aws::Clients,
        name: &str,
        edit: impl FnOnce(&Path),
    ) -> String {
        let volume_id = self.vendor_root_volume(clients).await;
        let file = self.state.join("volumes").join(format!("{volume_id}.img"));
        {
            let root = tempfile::tempdir().unwrap();
            let mounted = MountedSnapshot::mount(&file, PARTITION_1_OFFSET, root.path(), "rw");
            edit(&mounted.root);
        }
        Self::image_of_volume(clients, &volume_id, name).await
    }

    pub fn build_host(&self) -> &str {
        self.info["build_host"].as_str().unwrap()
    }

    /// Runs `localcloud ARGS` against this cloud.
    pub fn cli(&self, args: &[&str]) -> Output {
        let out = run(&self.state, args);
        assert!(
            out.status.success(),
            "localcloud {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// The root filesystem of instance `instance_id` while it runs, as its programs see it.
    pub fn instance_root(&self, instance_id: &str) -> PathBuf {
        self.state.join("instances").join(instance_id).join("root")
    }

    /// `amibake --output json` run in `dir` against this cloud, found as every SDK finds it:
    /// through the environment. Add the subcommand and its arguments.
    pub fn amibake(&self, dir: &Path) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_amibake"));
        command
            .current_dir(dir)
            .args(["--output", "json"])
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        command
    }

    /// `amibake --output json ARGS` run to its end in `dir`, its work directories there too.
    pub fn run_amibake(&self, dir: &Path, args: &[&str]) -> super::Run {
        let output = self
            .amibake(dir)
            .env("TMPDIR", dir)
            .args(args)
            .output()
            .unwrap();
        super::Run {
            command: format!("amibake {args:?}"),
            output,
        }
    }

    /// Makes the next call of `action` (after `after` calls of it pass) fail with an error
    /// the SDK does not retry. Returns the text a run's error must repeat.
    pub fn fail_once(&self, service: &str, action: &str, after: u32) -> String {
        let code = match service {
            "ssm" => "AccessDeniedException",
            "s3" => "AccessDenied",
            _ => "UnauthorizedOperation",
        };
        self.cli(&[
            "fault",
            action,
            "--after",
            &after.to_string(),
            "--error",
            code,
        ]);
        format!("{code}: injected by the local cloud into {action}")
    }

    /// Damages the block data of `times` calls of `action` (a block call) once `after` calls
    /// of it pass: a byte flipped on its way, the checksum sent as it was.
    pub fn damage_blocks(&self, action: &str, after: u32, times: u32) {
        self.damage_blocks_by(action, "flip", after, times);
    }

    /// As `damage_blocks`, the data damaged as `kind` says: `flip` (a byte), `short` (its
    /// last 64 KiB cut off), `long` (64 KiB more after its end).
    pub fn damage_blocks_by(&self, action: &str, kind: &str, after: u32, times: u32) {
        self.cli(&[
            "fault",
            action,
            "--corrupt",
            kind,
            "--after",
            &after.to_string(),
            "--times",
            &times.to_string(),
        ]);
    }

    /// As `damage_blocks_by`, counting only the calls that name block `block`: the next
    /// one is damaged.
    pub fn damage_block(&self, action: &str, kind: &str, block: u64) {
        self.cli(&[
            "fault",
            action,
            "--corrupt",
            kind,
            "--block",
            &block.to_string(),
        ]);
    }

    /// `localcloud ls` as JSON.
    pub fn ls(&self) -> serde_json::Value {
        serde_json::from_slice(&self.cli(&["ls"]).stdout).unwrap()
    }

    /// The snapshot's bytes, exported to `dir` and mounted read-only from `offset` (the
    /// root partition's start) until the returned guard drops.
    pub fn mount_snapshot(&self, snapshot: &str, dir: &Path, offset: u64) -> MountedSnapshot {
        let raw = dir.join(format!("{snapshot}.img"));
        self.cli(&["export-snapshot", snapshot, raw.to_str().unwrap()]);
        MountedSnapshot::mount(&raw, offset, &dir.join(format!("{snapshot}.mnt")), "ro")
    }

    /// Mounts the root of `snapshot`, a partitioned disk of `disk_bytes` whose root a bake
    /// grew: its partition 1 reaches the end of the disk, and its filesystem fills it.
    pub fn mount_grown_root(&self, snapshot: &str, dir: &Path, disk_bytes: u64) -> MountedSnapshot {
        let mounted = self.mount_snapshot(snapshot, dir, PARTITION_1_OFFSET);
        let table = Command::new("sfdisk")
            .arg("--json")
            .arg(dir.join(format!("{snapshot}.img")))
            .output()
            .unwrap();
        let table: serde_json::Value = serde_json::from_slice(&table.stdout).unwrap();
        let partition = &table["partitiontable"]["partitions"][0];
        let start = partition["start"].as_u64().unwrap() * 512;
        let end = start + partition["size"].as_u64().unwrap() * 512;
        assert_eq!(start, PARTITION_1_OFFSET, "partition 1 keeps its start");
        assert!(
            end > disk_bytes - (1 << 20),
            "partition 1 reaches the end of the {disk_bytes}-byte disk: {partition}"
        );
        let fs = rustix::fs::statvfs(&mounted.root).unwrap();
        let fs_bytes = fs.f_blocks * fs.f_frsize;
        assert!(
            fs_bytes > (end - start) * 9 / 10,
            "the root filesystem fills its {}-byte partition: {fs_bytes} bytes",
            end - start
        );
        mounted
    }

    pub fn calls(&self) -> Vec<serde_json::Value> {
        String::from_utf8_lossy(&self.cli(&["calls"]).stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The actions the cloud was asked to carry out since the call log held `from` calls
    /// that change something: anything but reads.
    pub fn mutating_calls_since(&self, from: usize) -> Vec<String> {
        self.calls_since(from)
            .iter()
            .filter_map(|c| c["action"].as_str())
            .filter(|a| !["Describe", "Get", "List"].iter().any(|p| a.starts_with(p)))
            .map(str::to_string)
            .collect()
    }

    /// The calls made since the call log held `from` of them.
    pub fn calls_since(&self, from: usize) -> Vec<serde_json::Value> {
        self.calls().split_off(from)
    }
}

/// An exported snapshot's filesystem, mounted read-only at `root`.
pub struct MountedSnapshot {
    pub root: PathBuf,
    loop_dev: String,
}

/// How long a detached loop device may take to go: the kernel may finish a detach after
/// `losetup -d` returns (the last close clears it, in the background).
const LOOP_GONE_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

impl MountedSnapshot {
    /// The filesystem at `offset` of the disk image `file`, mounted read-only at `root` as a
    /// host mounts its own root: an XFS without `nouuid`, so its UUID is taken on this host
    /// until dropped (as an Amazon Linux 2023 build host's root takes every AL2023 root's).
    pub fn mount_as_hosts_own(file: &Path, offset: u64, root: &Path) -> MountedSnapshot {
        MountedSnapshot::mount_with(file, offset, root, "ro", false)
    }

    /// The filesystem at `offset` of the disk image `file`, mounted read-only at `root`.
    pub fn mount_read_only(file: &Path, offset: u64, root: &Path) -> MountedSnapshot {
        MountedSnapshot::mount(file, offset, root, "ro")
    }

    /// The filesystem at `offset` of the disk image `file`, mounted at `root` with `mode`
    /// (`ro` or `rw`) through a loop device of its own.
    fn mount(file: &Path, offset: u64, root: &Path, mode: &str) -> MountedSnapshot {
        MountedSnapshot::mount_with(file, offset, root, mode, true)
    }

    fn mount_with(
        file: &Path,
        offset: u64,
        root: &Path,
        mode: &str,
        nouuid_for_xfs: bool,
    ) -> MountedSnapshot {
        let mut losetup = Command::new("losetup");
        losetup
            .args(["--find", "--show", "--offset"])
            .arg(offset.to_string());
        if mode == "ro" {
            losetup.arg("--read-only");
        }
        let out = losetup.arg(file).output().unwrap();
        assert!(out.status.success(), "losetup {}", file.display());
        let loop_dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
        std::fs::create_dir_all(root).unwrap();
        let mounted = MountedSnapshot {
            root: root.to_path_buf(),
            loop_dev,
        };
        // An XFS of a UUID in use (an Amazon Linux 2023 root) mounts only with nouuid.
        let xfs = nouuid_for_xfs
            && std::fs::File::open(&mounted.loop_dev)
                .and_then(|d| amibake::host::filesystem::probe(&d, 0))
                .unwrap()
                .is_some_and(|fs| fs.kind == amibake::host::filesystem::FsKind::Xfs);
        let options = if xfs {
            format!("{mode},nouuid")
        } else {
            mode.to_string()
        };
        assert!(Command::new("mount")
            .args(["-o", &options, &mounted.loop_dev])
            .arg(&mounted.root)
            .status()
            .unwrap()
            .success());
        mounted
    }
}

/// Asserts the filesystem at `offset` of the disk image `file` is consistent as its own
/// checker sees it, without changing it: `e2fsck -fn` for ext4, `xfs_repair -n` for XFS.
pub fn assert_filesystem_clean(file: &Path, offset: u64, what: &str) {
    let out = Command::new("losetup")
        .args(["--find", "--show", "--read-only", "--offset"])
        .arg(offset.to_string())
        .arg(file)
        .output()
        .unwrap();
    assert!(out.status.success(), "losetup {}", file.display());
    let device = LoopDevice(String::from_utf8(out.stdout).unwrap().trim().to_string());
    let kind = std::fs::File::open(&device.0)
        .and_then(|d| amibake::host::filesystem::probe(&d, 0))
        .unwrap()
        .unwrap_or_else(|| panic!("{what}: no filesystem at {offset} of {}", file.display()))
        .kind;
    let (checker, args): (&str, &[&str]) = match kind {
        amibake::host::filesystem::FsKind::Ext => ("e2fsck", &["-f", "-n"]),
        amibake::host::filesystem::FsKind::Xfs => ("xfs_repair", &["-n"]),
        amibake::host::filesystem::FsKind::Vfat => return,
    };
    let check = Command::new(checker)
        .args(args)
        .arg(&device.0)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{checker} of {what}: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
}

/// A loop device of a test's own, detached when dropped.
struct LoopDevice(String);

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let name = self.0.trim_start_matches("/dev/");
        let backing = format!("/sys/block/{name}/loop/backing_file");
        let deadline = std::time::Instant::now() + LOOP_GONE_WITHIN;
        // Until it is gone, so a test's "nothing left" check that follows sees it gone; but
        // never once another story has set the freed device up over its own file.
        let ours = std::fs::read_to_string(&backing).ok();
        while ours.is_some()
            && std::fs::read_to_string(&backing).ok() == ours
            && std::time::Instant::now() < deadline
        {
            // Quiet: a retry finds the device already going (ENXIO), which is what it waits for.
            let _ = Command::new("losetup")
                .args(["-d", &self.0])
                .stderr(std::process::Stdio::null())
                .status();
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for MountedSnapshot {
    fn drop(&mut self) {
        // Found busy for a moment beside other stories once (a machine-wide pass, then
        // unmounted by hand at once), and left mounted with its loop device: so asked again
        // while busy, as amibake's own unmount is, and detached lazily at the end rather than
        // left.
        crate::util::unmount_or_detach(&self.root, LOOP_GONE_WITHIN);
        drop(LoopDevice(std::mem::take(&mut self.loop_dev)));
    }
}

fn run(state: &Path, args: &[&str]) -> Output {
    Command::new(localcloud_bin())
        .arg("--state")
        .arg(state)
        .args(args)
        .output()
        .expect("localcloud runs")
}

impl Drop for LocalCloud {
    fn drop(&mut self) {
        let out = run(&self.state, &["down"]);
        let prefix = format!("{}/", self.state.display());
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let still_mounted: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|m| m.starts_with(&prefix))
            .collect();
        if still_mounted.is_empty() {
            let _ = std::fs::remove_dir_all(&self.state);
        }
        if std::thread::panicking() {
            return;
        }
        assert!(
            out.status.success(),
            "localcloud down failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            still_mounted.is_empty(),
            "not removing {}: still mounted there: {still_mounted:?}",
            self.state.display()
        );
    }
}
