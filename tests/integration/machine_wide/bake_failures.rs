//! `amibake bake` when things go wrong, through the real binary against the local cloud: a
//! failure injected at each AWS call, cleanups that fail, Ctrl-C in the middle of the
//! extraction, and hostile tarballs through whole bakes. After each, the cloud holds no
//! volume, attachment, image or snapshot of the build, the host no mount or loop device,
//! and the error names the step and the resource.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use crate::util::localcloud::LocalCloud;
use crate::util::tarballs::{append_raw, gzip, refused_on_their_own, tarball, Canary};
use crate::util::Run;
use tar::EntryType;

const TEMPLATE: &str = r#"[variables]
command = "true"
dest = "/srv/app"

[bake]
name = "failures-${commit}-${timestamp}"
base_ami = "resolve:ssm:/aws/service/debian/release/12/latest/amd64"
dest = "${var.dest}"

[[bake.provisioner]]
inline = ["${var.command}"]
"#;

fn bake_command(cloud: &LocalCloud, dir: &Path, tarball: &str, vars: &[&str]) -> Command {
    let mut command = cloud.amibake(dir);
    command.args([
        "bake",
        "failures.toml",
        "--tarball",
        tarball,
        "--commit",
        "fa11ed1",
        "--force",
    ]);
    for var in vars {
        command.args(["--var", var]);
    }
    command
}

fn bake(cloud: &LocalCloud, dir: &Path, tarball: &str, vars: &[&str]) -> Run {
    Run {
        command: format!("amibake bake failures.toml --tarball {tarball} {vars:?}"),
        output: bake_command(cloud, dir, tarball, vars).output().unwrap(),
    }
}

/// After a bake that succeeded: exactly its image and snapshot are left of it; removes them,
/// so nothing is left after.
fn take_back(cloud: &LocalCloud, run: &Run) {
    run.expect_code(0);
    let manifest: serde_json::Value = run.json();
    let ls = cloud.ls();
    let ours = |kind: &str| -> Vec<String> {
        ls[kind]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["owner"] == "123456789012")
            .map(|x| x["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        ours("images"),
        [manifest["ami_id"].as_str().unwrap()],
        "{}",
        run.dump()
    );
    assert_eq!(
        ours("snapshots"),
        [manifest["snapshot_id"].as_str().unwrap()],
        "no second snapshot\n{}",
        run.dump()
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let clients = runtime.block_on(cloud.clients());
    runtime.block_on(async {
        amibake::aws::image::deregister_with_snapshots(
            clients,
            manifest["ami_id"].as_str().unwrap().into(),
        )
        .await
        .unwrap();
    });
    cloud.left().assert_nothing(&run.dump());
}

fn error_line(run: &Run) -> String {
    run.stderr()
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line\n{}", run.dump()))
        .to_string()
}

/// A story's directory: the failures template and a one-file tarball, app.tar.gz.
fn story_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("failures.toml"), TEMPLATE).unwrap();
    std::fs::write(
        dir.path().join("app.tar.gz"),
        gzip(&tarball(|b| {
            append_raw(b, EntryType::Regular, "index.php", None, b"<?php\n")
        })),
    )
    .unwrap();
    dir
}

#[test]
fn a_failure_at_each_aws_call_of_a_bake_cleans_up_and_names_its_step() {
    let _module = crate::util::module_turn(module_path!());
    let _turn = crate::util::beside_others();
    let cloud = LocalCloud::start("quick");
    let dir = story_dir();
    let dir = dir.path();

    // A failure at each AWS call the bake makes: (service, call, calls of it let through
    // first, the step the error names, or none when it fails before anything is made).
    let cases: &[(&str, &str, u32, Option<&str>)] = &[
        ("ssm", "GetParameter", 0, None),
        ("ec2", "DescribeImages", 0, None),
        ("ec2", "CreateVolume", 0, Some("create volume")),
        ("ec2", "DescribeVolumes", 0, Some("create volume")),
        ("ec2", "DescribeInstances", 0, Some("attach volume")),
        ("ec2", "AttachVolume", 0, Some("attach volume")),
        ("ec2", "DetachVolume", 0, Some("detach volume")),
        ("ec2", "CreateSnapshot", 0, Some("snapshot")),
        ("ec2", "DescribeSnapshots", 0, Some("snapshot")),
        ("ec2", "RegisterImage", 0, Some("register image")),
        ("ec2", "DescribeImages", 1, Some("register image")),
        ("ec2", "CreateTags", 0, Some("mark finished")),
    ];
    for (service, action, after, step) in cases {
        let injected = cloud.fail_once(service, action, *after);
        let run = bake(&cloud, dir, "app.tar.gz", &[]);
        run.expect_failure(&injected, *step);
        cloud.left().assert_nothing(&run.dump());
    }
}

#[test]
fn eventual_consistency_and_lost_answers_leave_one_image_and_one_snapshot() {
    let _module = crate::util::module_turn(module_path!());
    let _turn = crate::util::beside_others();
    let cloud = LocalCloud::start("quick");
    let dir = story_dir();
    let dir = dir.path();

    // EC2's eventual consistency: every new resource NotFound for 2 s. The bake waits it
    // out and succeeds, leaving only its image and snapshot.
    cloud.cli(&["consistency", "2"]);
    take_back(&cloud, &bake(&cloud, dir, "app.tar.gz", &[]));
    // SIGTERM right after CreateVolume, while the volume is still NotFound: its removal
    // waits until EC2 knows it, never taking NotFound for "already gone".
    cloud.cli(&["fault", "CreateVolume", "--delay", "1"]);
    let (run, _) = crate::util::signal_when(
        bake_command(&cloud, dir, "app.tar.gz", &[]),
        "-TERM",
        "amibake bake, terminated just after CreateVolume",
        |line| line.contains("\"step_started\"") && line.contains("\"step\":\"create volume\""),
    );
    run.expect_code(143);
    cloud.left().assert_nothing(&run.dump());
    cloud.cli(&["consistency", "0"]);

    // A create whose answer is lost (carried out, then HTTP 500: the SDK retries): a client
    // token makes the retry the same call, an AMI name leads back to the lost attempt's
    // image, and a second snapshot is found by the build's tag and removed.
    for action in [
        "CreateVolume",
        "AttachVolume",
        "CreateSnapshot",
        "RegisterImage",
    ] {
        cloud.cli(&["fault", action, "--lose-answer"]);
        take_back(&cloud, &bake(&cloud, dir, "app.tar.gz", &[]));
    }
}

#[test]
fn cleanups_that_fail_name_what_they_could_not_remove() {
    let _module = crate::util::module_turn(module_path!());
    let _turn = crate::util::beside_others();
    let cloud = LocalCloud::start("quick");
    let dir = story_dir();
    let dir = dir.path();

    // Cleanups that fail: the run names what it could not remove, by id.
    for (action, after_failing, left_kind) in [
        ("DeleteVolume", "command=exit 3", "vol-"),
        ("DetachVolume", "command=exit 3", "vol-"),
    ] {
        cloud.cli(&["fault", action, "--error", "UnauthorizedOperation"]);
        let run = bake(&cloud, dir, "app.tar.gz", &[after_failing]);
        run.expect_leftover(&[left_kind, "UnauthorizedOperation"]);
        clean_volumes_by_hand(&cloud);
        cloud.left().assert_nothing(&run.dump());
    }
}

/// Its mount outlives its run, until the story takes it down: the stories beside it would
/// count it as theirs, so it runs alone.
#[test]
fn an_unmount_that_fails_keeps_the_volume_attached_and_names_both() {
    let _module = crate::util::module_turn(module_path!());
    let _turn = crate::util::alone();
    let cloud = LocalCloud::start("quick");
    let dir = story_dir();
    let dir = dir.path();

    // An unmount that fails (a process on the host works in the mounted image): the volume
    // is never detached under the live filesystem; it stays attached, and both it and the
    // mount are named.
    let mut holder = None;
    // SIGCONT: a signal that changes nothing, sent once the holder is in place.
    let run = crate::util::signal_when(
        bake_command(
            &cloud,
            dir,
            "app.tar.gz",
            &["command=echo holding; sleep 3"],
        ),
        "-CONT",
        "amibake bake, its image held by a host process",
        |line| {
            if !line.contains("\"line\":\"holding\"") {
                return false;
            }
            let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
            let root = mounts
                .lines()
                .filter_map(|l| l.split(' ').nth(1))
                .find(|m| m.contains("amibake-ab-") && m.ends_with("/root"))
                .expect("the bake's mount")
                .to_string();
            holder = Some((
                Command::new("sleep")
                    .arg("120")
                    .current_dir(&root)
                    .spawn()
                    .unwrap(),
                root,
            ));
            true
        },
    )
    .0;
    let (mut holder, root) = holder.expect("the holder started");
    let attached = cloud.ls()["attachments"].as_array().unwrap().len();
    run.expect_leftover(&[
        &root,
        "unmount failed",
        &format!("held by pid {} (sleep)", holder.id()),
    ]);
    run.expect_leftover(&[
        "detach volume failed: not tried, as",
        "(unmount) did not succeed first",
    ]);
    run.expect_leftover(&["vol-", "delete volume failed: not tried"]);
    assert_eq!(attached, 1, "the volume is still attached\n{}", run.dump());
    assert!(
        std::fs::read_to_string("/proc/mounts")
            .unwrap()
            .contains(&root),
        "and still mounted"
    );
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert!(Command::new("umount")
        .arg(&root)
        .status()
        .unwrap()
        .success());
    std::fs::remove_dir(&root).unwrap();
    // And the run's work directory, which could not go while its mount was there.
    std::fs::remove_dir(Path::new(&root).parent().unwrap()).unwrap();
    clean_volumes_by_hand(&cloud);
    cloud.left().assert_nothing(&run.dump());
}

/// A process that made a mount namespace of its own while the bake's image was mounted
/// (another bake's sandbox as it starts, a service with a private namespace): it holds a
/// copy of the image's mount for as long as it lives. The unmount in the host's namespace
/// succeeds, and the filesystem is written out only once the copy goes. Killed on drop.
struct Pin(std::process::Child);

impl Pin {
    /// `sleep SECONDS` in a namespace of its own, once in place (unshare has made it and
    /// become sleep).
    fn hold_for(seconds: u32) -> Pin {
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sleep"])
            .arg(seconds.to_string())
            .spawn()
            .unwrap();
        let comm = format!("/proc/{}/comm", child.id());
        let pin = Pin(child);
        let since = std::time::Instant::now();
        while std::fs::read_to_string(&comm).unwrap_or_default() != "sleep\n" {
            assert!(since.elapsed().as_secs() < 10, "the pin never took hold");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        pin
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_image_held_in_another_mount_namespace_is_snapshotted_only_once_written_out() {
    let _module = crate::util::module_turn(module_path!());
    // Its copies of the mount table would hold any other test's images too.
    let _turn = crate::util::alone();
    let cloud = LocalCloud::start("quick");
    let dir = story_dir();
    let dir = dir.path();
    // The pin takes hold while a provisioner sleeps, before the unmount.
    let pinning = |seconds: u32| {
        let pin = std::cell::RefCell::new(None);
        let (run, _) = crate::util::act_when(
            bake_command(
                &cloud,
                dir,
                "app.tar.gz",
                &["command=echo pinning; sleep 2"],
            ),
            &format!("amibake bake, its image held in another namespace for {seconds} s"),
            |line| line.contains("\"line\":\"pinning\""),
            |_, _| *pin.borrow_mut() = Some(Pin::hold_for(seconds)),
        );
        (run, pin.into_inner().expect("the pin took hold"))
    };

    // Held a few seconds past the unmount: the bake waits for the filesystem to be
    // written out before it gives the volume back, and its snapshot is clean (a journal
    // that needs recovery cannot be mounted read-only) and holds the app.
    let (run, mut pin) = pinning(6);
    run.expect_code(0);
    assert!(
        pin.0.try_wait().unwrap().is_some(),
        "the bake ended before the pin let go\n{}",
        run.dump()
    );
    let snapshot = run.json()["snapshot_id"].as_str().unwrap().to_string();
    let image = cloud.mount_snapshot(&snapshot, dir, crate::util::localcloud::PARTITION_1_OFFSET);
    assert!(
        image.root.join("srv/app/index.php").is_file(),
        "{}",
        run.dump()
    );
    drop(image);
    take_back(&cloud, &run);

    // Held past the wait: the unmount fails naming who holds the filesystem, and the
    // volume stays attached under it, named.
    let (run, pin) = pinning(120);
    let held_by = format!("held by pid {} (sleep)", pin.0.id());
    run.expect_leftover(&["unmount failed", "lives on in another mount", &held_by]);
    run.expect_leftover(&[
        "detach volume failed: not tried, as",
        "(unmount) did not succeed first",
    ]);
    drop(pin);
    clean_volumes_by_hand(&cloud);
    cloud.left().assert_nothing(&run.dump());
}

#[test]
fn a_signal_in_each_step_of_a_bake_cleans_up_inside_the_kill_window() {
    let _module = crate::util::module_turn(module_path!());
    let _turn = crate::util::beside_others();
    let cloud = LocalCloud::start("quick");
    let dir = story_dir();
    let dir = dir.path();

    // Ctrl-C while the tarball is being extracted: the child stops, the volume goes, 130.
    let big = dir.join("big.tar.zst");
    big_tarball(&big);
    let run = crate::util::interrupt_when(
        bake_command(&cloud, dir, "big.tar.zst", &[]),
        "amibake bake big.tar.zst, interrupted while extracting",
        |line| {
            line.contains("\"event\":\"progress\"") && line.contains("\"step\":\"extract tarball\"")
        },
    );
    run.expect_code(130);
    assert!(
        run.stderr()
            .contains("error: interrupted during extract tarball; cleaned up"),
        "{}",
        run.dump()
    );
    cloud.left().assert_nothing(&run.dump());

    // SIGTERM, as a CI system stops a job, in each step that waits on something: exit 143
    // well inside the 10 s such a system gives before it kills, the step named exactly (its
    // first call is held while the signal lands), and nothing left. (Mounting and preparing
    // the chroot take milliseconds on this host: a signal then is reported at the next step.)
    let steps: &[(&str, &str, &[&str], &str)] = &[
        ("create volume", "CreateVolume", &[], ""),
        ("attach volume", "DescribeInstances", &[], ""),
        (
            "run provisioners",
            "",
            &["command=echo sleeping; sleep 600"],
            "\"line\":\"sleeping\"",
        ),
        ("detach volume", "DetachVolume", &[], ""),
        ("snapshot", "CreateSnapshot", &[], ""),
        ("register image", "RegisterImage", &[], ""),
    ];
    for (step, first_call, vars, signal_at) in steps {
        if !first_call.is_empty() {
            cloud.cli(&["fault", first_call, "--delay", "2"]);
        }
        let this_step = format!("\"step\":\"{step}\"");
        let (run, after_signal) = crate::util::signal_when(
            bake_command(&cloud, dir, "app.tar.gz", vars),
            "-TERM",
            &format!("amibake bake, terminated during {step}"),
            |line| match *signal_at {
                "" => line.contains("\"event\":\"step_started\"") && line.contains(&this_step),
                output => line.contains(output),
            },
        );
        run.expect_terminated_in(step, after_signal);
        cloud.left().assert_nothing(&run.dump());
    }
}

#[test]
fn hostile_tarballs_are_refused_before_aws_or_contained_in_the_image() {
    let _module = crate::util::module_turn(module_path!());
    let _turn = crate::util::beside_others();
    let cloud = LocalCloud::start("quick");
    let dir = story_dir();
    let dir = dir.path();

    // What the tarball alone shows is wrong is refused before any AWS call, the entry
    // named (or where the archive breaks off), with the exit code of bad input.
    let canary = Canary::new();
    for (name, bytes, refused_with) in refused_on_their_own() {
        let file = format!("{name}.tar");
        std::fs::write(dir.join(&file), bytes).unwrap();
        let calls_before = cloud.calls().len();
        let run = bake(&cloud, dir, &file, &["dest=/srv/app"]);
        run.expect_code(2);
        assert!(
            error_line(&run).starts_with(&format!("error: --tarball {file}: {refused_with}"))
                && run.stderr().lines().count() == 1,
            "{name}: wanted {refused_with:?} and nothing else\n{}",
            run.dump()
        );
        assert_eq!(
            cloud.calls().len(),
            calls_before,
            "{name}: no AWS call at all\n{}",
            run.dump()
        );
        canary.assert_untouched(name);
        cloud.left().assert_nothing(&run.dump());
    }

    // From standard input, it is named as given.
    let (_, bytes, refused_with) = refused_on_their_own().swap_remove(0);
    let mut child = bake_command(&cloud, dir, "-", &["dest=/srv/app"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&bytes).unwrap();
    let run = Run {
        command: "amibake bake failures.toml --tarball - (a hostile tarball)".into(),
        output: child.wait_with_output().unwrap(),
    };
    run.expect_code(2);
    assert!(
        error_line(&run).starts_with(&format!("error: --tarball -: {refused_with}")),
        "{}",
        run.dump()
    );
    cloud.left().assert_nothing(&run.dump());

    // Hostile tarballs that only the image can tell from good ones, through whole bakes:
    // refused in the extraction with the entry named, or contained in the image; the
    // host's canary never touched.
    let canary_dir = canary.path().display().to_string();
    let canary_file = canary.file().display().to_string();
    let through_proc_root = format!("/proc/{}/root{canary_dir}", std::process::id());
    let magic_link = |target: &str| {
        let target = target.to_string();
        tarball(move |b| {
            append_raw(b, EntryType::Symlink, "x", Some(&target), b"");
            append_raw(b, EntryType::Regular, "x/pwned", None, b"pwned");
        })
    };
    let hostile: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "magic-link-proc-pid-root",
            magic_link(&through_proc_root),
            "tarball entry 2 (x/pwned): its path leaves the destination through a symlink",
            "/srv/app",
        ),
        (
            "magic-link-proc-pid-root-dest-root",
            magic_link(&through_proc_root),
            "tarball entry 2 (x/pwned): its path leaves the destination through a symlink",
            "/",
        ),
        (
            "magic-link-proc-self-cwd",
            magic_link("/proc/self/cwd"),
            "tarball entry 2 (x/pwned): its path leaves the destination through a symlink",
            "/srv/app",
        ),
        (
            "symlink-out",
            tarball(|b| {
                append_raw(b, EntryType::Symlink, "out", Some(&canary_dir), b"");
                append_raw(b, EntryType::Regular, "out/pwned", None, b"pwned");
            }),
            "tarball entry 2 (out/pwned)",
            "/srv/app",
        ),
        (
            "hard-link",
            tarball(|b| append_raw(b, EntryType::Link, "hl", Some(&canary_file), b"")),
            "tarball entry 1 (hl)",
            "/srv/app",
        ),
    ];
    for (name, bytes, refused_with, dest) in hostile {
        let file = format!("{name}.tar");
        std::fs::write(dir.join(&file), bytes).unwrap();
        let run = bake(&cloud, dir, &file, &[&format!("dest={dest}")]);
        run.expect_code(1);
        let error = error_line(&run);
        assert!(
            error.starts_with("error: extract tarball: ") && error.contains(refused_with),
            "{name}: wanted {refused_with:?} in {error}"
        );
        canary.assert_untouched(name);
        cloud.left().assert_nothing(&run.dump());
    }

    // A provisioner that turns the image's own paths into links to the host before amibake
    // puts its files back: the restore happens inside the image, never through the links.
    // (It fails after, so the restore runs as cleanup, and cleanly.)
    let resolv_to_host = format!("command=ln -sf {canary_file} /etc/resolv.conf; exit 3");
    let run = bake(&cloud, dir, "app.tar.gz", &[&resolv_to_host]);
    run.expect_code(1);
    assert!(
        error_line(&run).starts_with("error: run provisioners: ")
            && !run.stderr().contains("could not clean up"),
        "{}",
        run.dump()
    );
    canary.assert_untouched("resolv.conf made a link to the host");
    cloud.left().assert_nothing(&run.dump());
    let etc_to_host = format!("command=mv /etc /etc.image && ln -s {canary_dir} /etc");
    let run = bake(&cloud, dir, "app.tar.gz", &[&etc_to_host]);
    run.expect_code(1);
    assert!(
        error_line(&run).starts_with("error: unmount image: ")
            && error_line(&run).contains("etc/resolv.conf (restore the image's files failed"),
        "the restore that cannot happen inside the image is named\n{}",
        run.dump()
    );
    canary.assert_untouched("/etc made a link to the host");
    cloud.left().assert_nothing(&run.dump());
}

/// 800 MiB in 1 MiB files, zstd-compressed to almost nothing: quick to make, long enough to
/// extract that an interrupt lands while it runs.
fn big_tarball(path: &Path) {
    let file = std::fs::File::create(path).unwrap();
    let encoder = zstd::Encoder::new(file, 1).unwrap();
    let mut builder = tar::Builder::new(encoder);
    let chunk = vec![0u8; 1 << 20];
    for i in 0..800 {
        let mut header = tar::Header::new_gnu();
        header.set_size(chunk.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, format!("blob/{i:04}"), chunk.as_slice())
            .unwrap();
    }
    builder
        .into_inner()
        .unwrap()
        .finish()
        .unwrap()
        .flush()
        .unwrap();
}

/// Detaches and deletes every work volume, as an operator would with the ids a run named.
fn clean_volumes_by_hand(cloud: &LocalCloud) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let clients = runtime.block_on(cloud.clients());
    let ls = cloud.ls();
    runtime.block_on(async {
        for volume in ls["volumes"].as_array().unwrap() {
            if volume["attached_to"] == ls["build_host"] && volume["device"] == "/dev/xvda" {
                continue;
            }
            let id = volume["id"].as_str().unwrap().to_string();
            if volume["attached_to"].is_string() {
                amibake::aws::volume::detach(
                    clients.clone(),
                    id.clone(),
                    volume["attached_to"].as_str().unwrap().to_string(),
                    LocalCloud::quiet_progress(),
                )
                .await
                .unwrap();
            }
            amibake::aws::volume::delete(clients.clone(), id)
                .await
                .unwrap();
        }
    });
}

/// Variables from the environment, a variables file and the command line, in that order of
/// strength; a sensitive one reaches the provisioner and appears in nothing the failing
/// bake prints: not its progress, not the command's own output, not the error, not the
/// manifest file.
#[test]
fn variables_come_from_env_files_and_flags_and_a_sensitive_one_is_never_printed() {
    let _module = crate::util::module_turn(module_path!());
    let _turn = crate::util::beside_others();
    const SECRET: &str = "tok-5ens1tive-9f3c";
    let cloud = LocalCloud::start("quick");
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    std::fs::write(
        dir.join("vars.toml"),
        r#"[variables]
token = { sensitive = true, description = "the deploy token" }
where = "from-default"
stop = "false"

[bake]
name = "vars-${commit}-${timestamp}"
base_ami = "resolve:ssm:/aws/service/debian/release/12/latest/amd64"
dest = "/srv/app"

[[bake.pre]]
command = ["echo", "where=${var.where}"]

[[bake.pre]]
command = ["echo", "pre sees ${var.token}"]

[[bake.pre]]
command = ["${var.stop}"]

[[bake.provisioner]]
env = { TOKEN = "${var.token}" }
inline = ["echo \"the token is $TOKEN\"", "echo token ${var.token} >&2; exit 3"]
"#,
    )
    .unwrap();
    std::fs::write(dir.join("ci.vars.toml"), "where = \"from-file\"\n").unwrap();
    std::fs::write(
        dir.join("app.tar.gz"),
        gzip(&tarball(|b| {
            append_raw(b, EntryType::Regular, "index.php", None, b"<?php\n")
        })),
    )
    .unwrap();
    let bake_with = |flags: &[&str]| {
        let mut command = cloud.amibake(dir);
        command
            .args([
                "bake",
                "vars.toml",
                "--tarball",
                "app.tar.gz",
                "--commit",
                "fa11ed2",
            ])
            .args(["--force", "--manifest", "manifest.json"])
            .args(flags)
            .env("AMIBAKE_VAR_token", SECRET)
            .env("AMIBAKE_VAR_where", "from-env");
        Run {
            command: format!("amibake bake vars.toml {flags:?}"),
            output: command.output().unwrap(),
        }
    };

    // The second pre command is `false` unless told otherwise: these end before AWS.
    for (flags, expected) in [
        (&[][..], "where=from-env"),
        (&["--var-file", "ci.vars.toml"][..], "where=from-file"),
        (
            &["--var-file", "ci.vars.toml", "--var", "where=from-flag"][..],
            "where=from-flag",
        ),
    ] {
        let stopped = bake_with(flags);
        stopped.expect_code(1);
        assert!(
            stopped.stderr().contains(expected),
            "{expected}\n{}",
            stopped.dump()
        );
    }

    let failed = bake_with(&["--var", "stop=true"]);
    failed.expect_code(1);
    let everything = format!("{}{}", failed.stdout(), failed.stderr());
    assert!(!everything.contains(SECRET), "{}", failed.dump());
    assert!(
        everything.contains("\"line\":\"pre sees ***\"")
            && everything.contains("\"source\":\"echo pre sees ***\""),
        "an unnamed command's output and its name, masked\n{}",
        failed.dump()
    );
    assert!(
        everything.contains("the token is ***"),
        "the command ran with the token, its line masked\n{}",
        failed.dump()
    );
    assert!(
        error_line(&failed).contains("***"),
        "the error quotes the command, masked\n{}",
        failed.dump()
    );
    if let Ok(manifest) = std::fs::read_to_string(dir.join("manifest.json")) {
        assert!(!manifest.contains(SECRET), "{manifest}");
    }
    cloud.left().assert_nothing(&failed.dump());
}

/// `--on-error=abort` on a bake: the image stays mounted where the run says, with the
/// tarball in it, to look at; `gc --build-id` then removes the mount, the volume and all.
#[test]
fn on_error_abort_keeps_the_mounted_image_and_gc_build_id_removes_it() {
    let _module = crate::util::module_turn(module_path!());
    let _turn = crate::util::alone();
    let cloud = LocalCloud::start("quick");
    let dir = story_dir();
    let dir = dir.path();
    let mut command = bake_command(&cloud, dir, "app.tar.gz", &["command=exit 3"]);
    command.args(["--on-error", "abort"]);
    let run = Run {
        command: "amibake bake failures.toml --on-error abort".into(),
        output: command.output().unwrap(),
    };
    run.expect_code(1);
    let events: Vec<serde_json::Value> = run
        .stderr()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let build_id = events
        .iter()
        .find_map(|e| e["build_id"].as_str())
        .unwrap_or_else(|| panic!("no build id\n{}", run.dump()))
        .to_string();
    let mounted = run
        .stderr()
        .lines()
        .find_map(|l| l.strip_prefix("the image is mounted at "))
        .and_then(|rest| rest.split(": ").next())
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no mount named\n{}", run.dump()));
    let index = Path::new(&mounted).join("srv/app/index.php");
    assert_eq!(
        std::fs::read_to_string(&index).ok().as_deref(),
        Some("<?php\n"),
        "the tarball is in the kept image\n{}",
        run.dump()
    );

    let gc = Run {
        command: format!("amibake gc --build-id {build_id} --apply"),
        output: cloud
            .amibake(dir)
            .args(["gc", "--build-id", &build_id, "--apply"])
            .output()
            .unwrap(),
    };
    gc.expect_code(0);
    cloud.left().assert_nothing(&gc.dump());
    assert!(!Path::new(&mounted).exists(), "{}", gc.dump());
}
