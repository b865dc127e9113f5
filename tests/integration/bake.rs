//! `amibake bake` end to end through the real binary against the local cloud: a deployment AMI
//! from the Debian vendor AMI and a code tarball, its reuse, and failures that leave nothing.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use crate::util::localcloud::{LocalCloud, PARTITION_1_OFFSET};
use crate::util::tarballs::{assert_composer_like_at, composer_like, gzip, write_revision_tarball};
use crate::util::{Run, Story};

/// `amibake --output json bake TEMPLATE --tarball app.tar.gz --commit c0ffee1`
fn bake_command(cloud: &LocalCloud, dir: &Path, template: &str) -> Command {
    let mut command = cloud.amibake(dir);
    command.args(crate::util::bake_args(template, "c0ffee1", &[]));
    command
}

fn bake(cloud: &LocalCloud, dir: &Path, template: &str, extra: &[&str]) -> Run {
    let output = bake_command(cloud, dir, template)
        .args(extra)
        .output()
        .unwrap();
    Run {
        command: format!("amibake bake {template} {extra:?}"),
        output,
    }
}

/// The run's manifest, held (with its progress events) against the published schemas.
fn manifest(run: &Run) -> serde_json::Value {
    let manifest = run.json();
    crate::util::schema::assert_valid("bake-manifest", &manifest);
    crate::util::schema::assert_events_valid(&run.stderr());
    manifest
}

fn template(dir: &Path, name: &str, base_ami: &str, provisioner: &str) {
    let text = format!(
        "[variables]\napp = \"shop\"\n\n[bake]\nname = \"${{var.app}}-${{commit}}-${{timestamp}}-{name}\"\nbase_ami = {base_ami}\n\
         dest = \"/var/www/${{var.app}}\"\nowner = \"www-data\"\ntags = {{ team = \"web\" }}\n\n[[bake.provisioner]]\ninline = [{provisioner}]\n"
    );
    std::fs::write(dir.join(format!("{name}.toml")), text).unwrap();
}

/// The app, as a composer build makes it (see `composer_like`), gzip'd as CI does.
fn app_tarball(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let (tar, files) = composer_like();
    std::fs::write(dir.join("app.tar.gz"), gzip(&tar)).unwrap();
    files
}

/// The image has its base's layout and flags, its root on the new snapshot, and the tags
/// that say what it is; the snapshot carries the same tags.
fn assert_layout_and_tags(story: &Story, m: &serde_json::Value) {
    let (runtime, clients) = (&story.runtime, &story.clients);
    let describe = |id: &str| {
        runtime
            .block_on(clients.ec2.describe_images().image_ids(id).send())
            .unwrap()
            .images()[0]
            .clone()
    };
    let (image, base) = (
        describe(m["ami_id"].as_str().unwrap()),
        describe(m["base_ami"].as_str().unwrap()),
    );
    assert_eq!(image.root_device_name(), base.root_device_name());
    assert_eq!(image.architecture(), base.architecture());
    assert_eq!(
        Some(m["architecture"].as_str().unwrap()),
        base.architecture().map(|a| a.as_str())
    );
    assert_eq!(image.boot_mode(), base.boot_mode());
    assert_eq!(image.ena_support(), base.ena_support());
    assert_eq!(image.sriov_net_support(), base.sriov_net_support());
    let devices = |i: &aws_sdk_ec2::types::Image| -> Vec<String> {
        i.block_device_mappings()
            .iter()
            .filter_map(|d| d.device_name().map(String::from))
            .collect()
    };
    assert_eq!(
        devices(&image),
        devices(&base),
        "the base's mappings, all of them"
    );
    let root = image
        .block_device_mappings()
        .iter()
        .find(|d| d.device_name() == image.root_device_name())
        .and_then(|d| d.ebs())
        .unwrap();
    assert_eq!(root.snapshot_id(), m["snapshot_id"].as_str());
    let wanted = [
        ("Name", m["name"].as_str().unwrap()),
        ("amibake:commit", m["commit"].as_str().unwrap()),
        (
            "amibake:tarball-sha256",
            m["tarball_sha256"].as_str().unwrap(),
        ),
        ("amibake:base-ami", m["base_ami"].as_str().unwrap()),
        ("amibake:architecture", "x86_64"),
        ("amibake:build-id", m["build_id"].as_str().unwrap()),
        ("amibake:fingerprint", m["fingerprint"].as_str().unwrap()),
        ("team", "web"),
    ];
    let snapshot = runtime
        .block_on(
            clients
                .ec2
                .describe_snapshots()
                .snapshot_ids(m["snapshot_id"].as_str().unwrap())
                .send(),
        )
        .unwrap()
        .snapshots()[0]
        .clone();
    for (what, tags) in [("image", image.tags()), ("snapshot", snapshot.tags())] {
        for (key, value) in wanted {
            assert_eq!(
                crate::util::tag(tags, key),
                Some(value),
                "{what} tag {key}: {tags:?}"
            );
        }
    }
}

/// One cloud for the whole story, told in order: the SDK of the binary reads its endpoint
/// from the environment each run is given.
#[test]
fn bake_builds_reuses_and_cleans_up_after_failures() {
    let _module = crate::util::module_turn(module_path!());
    let story = Story::new("quick");
    let (cloud, runtime, clients, dir) =
        (&story.cloud, &story.runtime, &story.clients, story.dir());
    let files = app_tarball(dir);
    let build_host = cloud.build_host().to_string();
    let debian = "\"resolve:ssm:/aws/service/debian/release/12/latest/amd64\"";
    template(
        dir,
        "good",
        debian,
        "\"echo ${commit} > /var/www/${var.app}/REVISION\"",
    );

    // 1. A bake onto the partitioned Debian vendor AMI.
    let run = bake(cloud, dir, "good.toml", &["--manifest", "manifest.json"]);
    run.expect_code(0);
    let m = manifest(&run);
    assert_eq!(
        m,
        serde_json::from_str::<serde_json::Value>(
            &std::fs::read_to_string(dir.join("manifest.json")).unwrap()
        )
        .unwrap()
    );
    assert_eq!(
        (m["commit"].as_str(), m["reused"].as_bool()),
        (Some("c0ffee1"), Some(false))
    );
    let ami = m["ami_id"].as_str().unwrap().to_string();
    let snapshot = m["snapshot_id"].as_str().unwrap().to_string();
    for step in [
        "create volume",
        "attach volume",
        "extract tarball",
        "snapshot",
        "register image",
    ] {
        assert!(
            m["step_seconds"][step].as_f64().is_some(),
            "per-step time for {step}: {m}"
        );
    }
    let calls = cloud.calls();
    assert!(calls.iter().any(|c| c["action"] == "DetachVolume" && c["ids"]["InstanceId"] == build_host.as_str()), "detach names the instance");
    assert_layout_and_tags(&story, &m);
    cloud.assert_nothing_temporary();

    let image = cloud.mount_snapshot(&snapshot, dir, PARTITION_1_OFFSET);
    let mnt = &image.root;
    let app = mnt.join("var/www/shop");
    // Byte for byte, with modes, mtimes, links, the empty directory, owned by www-data.
    assert_composer_like_at(&app, &files, 33);
    assert_eq!(
        std::fs::read_to_string(app.join("REVISION")).unwrap(),
        "c0ffee1\n",
        "the provisioner ran in the image"
    );
    assert!(std::fs::read_to_string(mnt.join("etc/resolv.conf"))
        .unwrap()
        .starts_with("# the image's own resolv.conf"));
    assert!(!mnt.join("usr/sbin/policy-rc.d").exists());
    assert!(
        std::fs::read_to_string(mnt.join("etc/debian_version"))
            .unwrap()
            .starts_with("12."),
        "the base is untouched"
    );
    drop(image);

    // 2. The same inputs again: the image is reused and nothing is created.
    let before = cloud.calls().len();
    let again = bake(cloud, dir, "good.toml", &[]);
    again.expect_code(0);
    assert_eq!(
        (
            manifest(&again)["ami_id"].as_str(),
            manifest(&again)["reused"].as_bool()
        ),
        (Some(ami.as_str()), Some(true))
    );
    let created: Vec<_> = cloud.calls()[before..]
        .iter()
        .filter(|c| c["action"].as_str().unwrap().starts_with("Create"))
        .cloned()
        .collect();
    assert!(
        created.is_empty(),
        "a reused bake creates nothing: {created:?}"
    );

    // 2b. One byte of the tarball changed: a new bake, whose image holds the new byte.
    let (mut tar, _) = composer_like();
    let at = tar
        .windows(16)
        .position(|w| w == b"package 0 file 0")
        .expect("the first class in the tarball");
    tar[at + 15] = b'X';
    std::fs::write(dir.join("app.tar.gz"), gzip(&tar)).unwrap();
    let changed = bake(cloud, dir, "good.toml", &[]);
    changed.expect_code(0);
    let cm = manifest(&changed);
    assert_eq!(cm["reused"], false);
    assert_ne!(cm["ami_id"], ami.as_str());
    assert_ne!(cm["tarball_sha256"], m["tarball_sha256"]);
    assert_ne!(cm["fingerprint"], m["fingerprint"]);
    {
        let image =
            cloud.mount_snapshot(cm["snapshot_id"].as_str().unwrap(), dir, PARTITION_1_OFFSET);
        let class = std::fs::read_to_string(
            image
                .root
                .join("var/www/shop/vendor/pkg0/src/Sub0/Class0.php"),
        )
        .unwrap();
        assert!(class.starts_with("<?php // package 0 file X"), "{class}");
    }
    app_tarball(dir);
    // Removed again: the story below counts the images it makes.
    runtime
        .block_on(amibake::aws::image::deregister_with_snapshots(
            clients.clone(),
            cm["ami_id"].as_str().unwrap().into(),
        ))
        .unwrap();
    cloud.assert_nothing_temporary();

    // 3. A provisioner that fails stops the bake, says where, and leaves nothing.
    template(dir, "failing", debian, "\"echo migrating\", \"exit 3\"");
    let run = bake(cloud, dir, "failing.toml", &[]);
    run.expect_code(1);
    assert!(
        run.stderr()
            .contains("error: run provisioners: provisioner `inline`: `exit 3` exited with 3"),
        "{}",
        run.dump()
    );
    cloud.assert_nothing_temporary();

    // 4. A failed AWS call after the snapshot exists: the snapshot is removed too.
    cloud.cli(&["fault", "RegisterImage", "--error", "InvalidParameterValue"]);
    template(dir, "unlucky", debian, "\"true\"");
    let run = bake(cloud, dir, "unlucky.toml", &[]);
    run.expect_code(1);
    assert!(
        run.stderr()
            .contains("error: register image: register image shop-c0ffee1-"),
        "{}",
        run.dump()
    );
    assert!(
        run.stderr()
            .contains("InvalidParameterValue: injected by the local cloud into RegisterImage"),
        "{}",
        run.dump()
    );
    let snapshots: Vec<serde_json::Value> =
        serde_json::from_slice::<serde_json::Value>(&cloud.cli(&["ls"]).stdout).unwrap()
            ["snapshots"]
            .as_array()
            .unwrap()
            .clone();
    assert_eq!(
        snapshots
            .iter()
            .filter(|s| s["owner"] == "123456789012")
            .count(),
        1,
        "only the first bake's snapshot remains: {snapshots:?}"
    );
    cloud.assert_nothing_temporary();

    // 5. Two bakes at once on one host: both succeed, on different devices.
    template(dir, "twin-a", debian, "\"echo a > /etc/twin\"");
    template(dir, "twin-b", debian, "\"echo b > /etc/twin\"");
    let before = cloud.calls().len();
    let spawn = |name: &str| {
        bake_command(cloud, dir, &format!("{name}.toml"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn("twin-a"), spawn("twin-b"));
    let runs: Vec<Run> = [a, b]
        .into_iter()
        .map(|c| Run {
            command: "amibake bake twin".into(),
            output: c.wait_with_output().unwrap(),
        })
        .collect();
    for run in &runs {
        run.expect_code(0);
    }
    assert_ne!(manifest(&runs[0])["ami_id"], manifest(&runs[1])["ami_id"]);
    // Each twin's image holds its own provisioner's work, not the other's.
    for (run, wanted) in runs.iter().zip(["a\n", "b\n"]) {
        let snapshot = manifest(run)["snapshot_id"].as_str().unwrap().to_string();
        let image = cloud.mount_snapshot(&snapshot, dir, PARTITION_1_OFFSET);
        assert_eq!(
            std::fs::read_to_string(image.root.join("etc/twin")).unwrap(),
            wanted
        );
    }
    let devices: Vec<String> = cloud.calls()[before..]
        .iter()
        .filter(|c| c["action"] == "AttachVolume" && c["code"] == "OK")
        .map(|c| c["ids"]["Device"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(devices.len(), 2, "{devices:?}");
    assert_ne!(
        devices[0], devices[1],
        "two bakes on one host use different device names"
    );
    cloud.assert_nothing_temporary();

    // 6. An unpartitioned base: the root is the whole device.
    let flat = "{ owners = [\"136693071363\"], name = \"debian-12-amd64-unpartitioned-*\" }";
    // With a larger volume than the base's, the filesystem grows to fill it (the vendor
    // image's is 2 GiB).
    template(dir, "flat", flat, "\"true\"");
    let text = std::fs::read_to_string(dir.join("flat.toml"))
        .unwrap()
        .replace("[bake]\n", "[bake]\nvolume_size_gb = 10\n");
    std::fs::write(dir.join("flat.toml"), text).unwrap();
    let run = bake(cloud, dir, "flat.toml", &[]);
    run.expect_code(0);
    let image = cloud.mount_snapshot(manifest(&run)["snapshot_id"].as_str().unwrap(), dir, 0);
    assert_composer_like_at(&image.root.join("var/www/shop"), &files, 33);
    let stat = rustix::fs::statvfs(&image.root).unwrap();
    let size = stat.f_blocks * stat.f_frsize;
    assert!(
        size > 9 << 30,
        "the root filesystem fills the 10 GiB volume: {size} bytes"
    );
    drop(image);
    cloud.assert_nothing_temporary();

    // 6b. A larger volume on the partitioned base: the root partition grows to the end of
    //     the volume and its filesystem fills it, as on the direct backend.
    template(dir, "bigger", debian, "\"true\"");
    let text = std::fs::read_to_string(dir.join("bigger.toml"))
        .unwrap()
        .replace("[bake]\n", "[bake]\nvolume_size_gb = 10\n");
    std::fs::write(dir.join("bigger.toml"), text).unwrap();
    // Failing after the growth first: the loop device goes before the volume's detach.
    let failing = std::fs::read_to_string(dir.join("bigger.toml"))
        .unwrap()
        .replace("inline = [\"true\"]", "inline = [\"false\"]");
    std::fs::write(dir.join("bigger-failing.toml"), failing).unwrap();
    bake(cloud, dir, "bigger-failing.toml", &[]).expect_code(1);
    cloud.assert_nothing_temporary();
    let run = bake(cloud, dir, "bigger.toml", &[]);
    run.expect_code(0);
    assert!(
        run.stderr().contains("root filesystem grown to"),
        "{}",
        run.dump()
    );
    let snapshot = manifest(&run)["snapshot_id"].as_str().unwrap().to_string();
    let image = cloud.mount_grown_root(&snapshot, dir, 10 << 30);
    assert_composer_like_at(&image.root.join("var/www/shop"), &files, 33);
    drop(image);
    let _ = std::fs::remove_file(dir.join(format!("{snapshot}.img")));
    cloud.assert_nothing_temporary();

    // 8. The tarball on standard input, as `build | amibake bake --tarball -` gives it.
    template(
        dir,
        "piped",
        debian,
        "\"test -x /var/www/shop/bin/console\"",
    );
    let piped = Command::new("sh")
        .current_dir(dir)
        .args([
            "-c",
            "\"$0\" --output json bake piped.toml --tarball - --commit c0ffee1 < app.tar.gz",
            env!("CARGO_BIN_EXE_amibake"),
        ])
        .envs(cloud.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    let piped = Run {
        command: "amibake bake piped.toml --tarball - < app.tar.gz".into(),
        output: piped,
    };
    piped.expect_code(0);
    assert_eq!(
        manifest(&piped)["tarball_sha256"],
        m["tarball_sha256"],
        "the same bytes, the same digest"
    );
    assert!(manifest(&piped)["files"].as_u64().unwrap() > files.len() as u64);
    cloud.assert_nothing_temporary();

    // 9. A provisioner that leaves a daemon running (setsid escapes its process group): the
    // daemon is ended before the unmount, and the bake succeeds.
    template(
        dir,
        "daemon",
        debian,
        "\"setsid sh -c 'exec sleep 777' </dev/null >/dev/null 2>&1 &\"",
    );
    let run = bake(cloud, dir, "daemon.toml", &[]);
    run.expect_code(0);
    assert!(
        run.stderr()
            .contains("ended what was left running in the image: pid "),
        "{}",
        run.dump()
    );
    let sleeping = Command::new("pgrep")
        .args(["-f", "sleep 777"])
        .output()
        .unwrap();
    assert!(!sleeping.status.success(), "the daemon is gone");
    cloud.assert_nothing_temporary();

    // 10. A KMS key of the account: the work volume, and so the snapshot and the image, are
    // encrypted with it.
    let new_key = || runtime.block_on(LocalCloud::new_kms_key(clients));
    let with_key = |name: &str, key: &str| {
        let text = std::fs::read_to_string(dir.join("good.toml"))
            .unwrap()
            .replace("[bake]\n", &format!("[bake]\nkms_key_id = \"{key}\"\n"));
        std::fs::write(dir.join(format!("{name}.toml")), text).unwrap();
    };
    let key = new_key();
    let key = key.as_str();
    with_key("encrypted", key);
    let before = cloud.calls().len();
    let run = bake(cloud, dir, "encrypted.toml", &[]);
    run.expect_code(0);
    let created: Vec<serde_json::Value> = cloud.calls()[before..]
        .iter()
        .filter(|c| c["action"] == "CreateVolume")
        .cloned()
        .collect();
    assert_eq!(
        (
            created[0]["ids"]["KmsKeyId"].as_str(),
            created[0]["ids"]["Encrypted"].as_str()
        ),
        (Some(key), Some("true")),
        "{created:?}"
    );
    let snapshot = manifest(&run)["snapshot_id"].as_str().unwrap().to_string();
    let listed = cloud.ls()["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == snapshot.as_str())
        .cloned()
        .unwrap();
    assert_eq!(listed["encrypted"], true, "{listed}");
    let described = runtime
        .block_on(
            clients
                .ec2
                .describe_snapshots()
                .snapshot_ids(&snapshot)
                .send(),
        )
        .unwrap();
    assert_eq!(described.snapshots()[0].kms_key_id(), Some(key));
    cloud.assert_nothing_temporary();

    // A key the account does not have, or one that is disabled, is refused before anything
    // is made, naming the setting: EBS itself would take it, answer `creating`, and drop the
    // volume a moment later.
    let disabled = new_key();
    // By its id: the local cloud's KMS takes no ARN in DisableKey.
    let disabled_id = disabled.rsplit('/').next().unwrap();
    runtime
        .block_on(clients.kms.disable_key().key_id(disabled_id).send())
        .unwrap();
    let made_up = "arn:aws:kms:us-east-1:123456789012:key/0b9e4c59-2d3b-4e1a-9f5d-6c1f8e2a7b40";
    for (key, problem) in [
        (made_up, "no such KMS key in us-east-1"),
        (disabled.as_str(), "the key is Disabled"),
    ] {
        with_key("bad-key", key);
        let before = cloud.calls().len();
        let run = bake(cloud, dir, "bad-key.toml", &[]);
        run.expect_code(1);
        assert!(
            run.stderr()
                .contains(&format!("bake.kms_key_id = \"{key}\": {problem}")),
            "{}",
            run.dump()
        );
        let made: Vec<_> = cloud.calls()[before..]
            .iter()
            .filter(|c| {
                let action = c["action"].as_str().unwrap_or_default();
                !action.starts_with("Describe") && !action.starts_with("Get")
            })
            .cloned()
            .collect();
        assert!(made.is_empty(), "nothing is made: {made:?}");
        cloud.assert_nothing_temporary();
    }

    // 7. Ctrl-C while a provisioner runs: the command and what it started end at once, the
    // run cleans up and exits 130.
    // A length no other story sleeps: the process check below looks at the whole machine.
    template(dir, "slow", debian, "\"echo started-sleeping; sleep 607\"");
    let slow = bake_command(cloud, dir, "slow.toml");
    let run = crate::util::interrupt_when(slow, "amibake bake slow.toml, interrupted", |line| {
        line.contains("\"line\":\"started-sleeping\"")
    });
    run.expect_code(130);
    let finished: Vec<serde_json::Value> = run
        .stderr()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["event"] == "step_finished" && e["step"] == "run provisioners")
        .collect();
    // Well inside the engine's 30 s grace: the command was killed, not waited out.
    assert!(
        finished[0]["seconds"].as_f64().unwrap() < 20.0,
        "{finished:?}"
    );
    assert!(
        run.stderr().contains("\"event\":\"interrupted\""),
        "{}",
        run.dump()
    );
    let sleeping = Command::new("pgrep")
        .args(["-f", "sleep 607"])
        .output()
        .unwrap();
    assert!(
        !sleeping.status.success(),
        "the provisioner's command is gone"
    );
    cloud.assert_nothing_temporary();

    // 11. Provisioners cannot reach the build host: not its instance metadata (and so not
    // its credentials), not its processes, its disks or its environment. Each check fails
    // the bake if it can cross. With `network = true` a command reaches the host loopback's
    // ports it names (the local cloud's EC2 endpoint) but still not the metadata, though its
    // port is named too, not even through an IPv6 socket's mapped address; with
    // `allow_imds = true` as well, it reaches the metadata, so the metadata checks are
    // shown to be able to fail.
    let address_of = |variable: &str| {
        let url = &cloud.env.iter().find(|(k, _)| k == variable).unwrap().1;
        let (host, port) = url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .split_once(':')
            .unwrap();
        (host.to_string(), port.to_string())
    };
    let (imds_host, imds_port) = address_of("AWS_EC2_METADATA_SERVICE_ENDPOINT");
    let (ec2_host, ec2_port) = address_of("AWS_ENDPOINT_URL");
    let connect = |host: &str, port: &str| format!("bash -c 'exec 3<>/dev/tcp/{host}/{port}'");
    let imds = connect(&imds_host, &imds_port);
    let imds_mapped = connect(&format!("::ffff:{imds_host}"), &imds_port);
    let my_pid = std::process::id();
    let checks = [
        format!("if {imds} 2>/dev/null; then echo reached the build host IMDS; exit 11; fi"),
        format!("if test -e /proc/{my_pid}; then echo sees host pid {my_pid}; exit 12; fi"),
        "if test -e /dev/vda -o -e /dev/loop0 -o -e /dev/sda; then ls /dev; exit 13; fi".into(),
        "if env | grep -q '^AWS_'; then echo sees AWS variables; exit 14; fi".into(),
        "test \"$(cat /proc/1/comm)\" = amibake || { echo host init visible; exit 15; }".into(),
        "if echo x > /proc/sys/kernel/core_pattern 2>/dev/null; then exit 16; fi".into(),
    ];
    let with_network = [
        format!(
            "{} || {{ echo no network; exit 21; }}",
            connect(&ec2_host, &ec2_port)
        ),
        format!("if {imds} 2>/dev/null; then echo reached IMDS with network; exit 22; fi"),
        format!("if {imds_mapped} 2>/dev/null; then echo reached IMDS over IPv6; exit 23; fi"),
    ];
    let with_metadata = [imds.clone(), imds_mapped.clone()];
    let quoted = |commands: &[String]| {
        commands
            .iter()
            .map(|c| serde_json::to_string(c).unwrap())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let text = format!(
        "[bake]\nname = \"contained-${{commit}}-${{timestamp}}\"\nbase_ami = {debian}\ndest = \"/srv/app\"\n\n\
         [[bake.provisioner]]\ninline = [{}]\n\n\
         [[bake.provisioner]]\nname = \"with network\"\nnetwork = true\n\
         host_ports = [{ec2_port}, {imds_port}]\ninline = [{}]\n\n\
         [[bake.provisioner]]\nname = \"with metadata\"\nnetwork = true\nallow_imds = true\n\
         host_ports = [{imds_port}]\ninline = [{}]\n",
        quoted(&checks),
        quoted(&with_network),
        quoted(&with_metadata),
    );
    std::fs::write(dir.join("contained.toml"), text).unwrap();
    let run = bake(cloud, dir, "contained.toml", &[]);
    run.expect_code(0);
    cloud.assert_nothing_temporary();
}

/// Eight bakes at once on one machine, four per backend, while half of all EC2, SSM and EBS
/// direct calls are throttled: every one succeeds, and each image holds its own tarball.
#[test]
fn eight_bakes_at_once_under_throttling_each_hold_their_own_tarball() {
    let _module = crate::util::module_turn(module_path!());
    let story = Story::new("quick");
    let (cloud, dir, vendor) = (&story.cloud, story.dir(), story.vendor_ami());
    std::fs::write(
        dir.join("load.toml"),
        format!(
            "[bake]\nname = \"load-${{commit}}-${{timestamp}}\"\nbase_ami = \"{vendor}\"\n\
             dest = \"/srv/app\"\n"
        ),
    )
    .unwrap();
    let mut digests = BTreeMap::new();
    for n in 0..8 {
        let tarball = dir.join(format!("app{n}.tar.gz"));
        write_revision_tarball(&tarball, &format!("bake {n}\n"));
        let bytes = std::fs::read(&tarball).unwrap();
        let digest =
            sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(&bytes));
        digests.insert(n, format!("{digest:x}"));
    }
    cloud.cli(&["fault", "--throttle", "50"]);
    let children: Vec<(usize, std::process::Child)> = (0..8)
        .map(|n| {
            let backend = if n % 2 == 0 { "attach" } else { "direct" };
            let child = cloud
                .amibake(dir)
                .env("TMPDIR", dir)
                .args(["bake", "load.toml", "--tarball"])
                .arg(format!("app{n}.tar.gz"))
                .args(["--commit", &format!("10ad{n:04}"), "--backend", backend])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            (n, child)
        })
        .collect();
    let runs: Vec<(usize, Run)> = children
        .into_iter()
        .map(|(n, child)| {
            let output = child.wait_with_output().unwrap();
            let command = format!("amibake bake load.toml --tarball app{n}.tar.gz");
            (n, Run { command, output })
        })
        .collect();
    cloud.cli(&["fault", "--throttle", "0"]);
    let throttled = cloud
        .calls()
        .iter()
        .filter(|c| {
            let code = c["code"].as_str().unwrap_or_default();
            code == "RequestLimitExceeded" || code.contains("Throttl")
        })
        .count();
    assert!(
        throttled > 100,
        "the load met throttling: {throttled} calls"
    );
    for (n, run) in &runs {
        run.expect_code(0);
        let m = manifest(run);
        assert_eq!(m["tarball_sha256"], digests[n].as_str(), "bake {n}");
        let image =
            cloud.mount_snapshot(m["snapshot_id"].as_str().unwrap(), dir, PARTITION_1_OFFSET);
        assert_eq!(
            std::fs::read_to_string(image.root.join("srv/app/REVISION")).unwrap(),
            format!("bake {n}\n"),
            "bake {n} holds its own tarball"
        );
    }
    cloud.assert_nothing_temporary();
}
