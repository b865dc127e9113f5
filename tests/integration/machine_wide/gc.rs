//! `amibake gc` through the real binary on the local cloud: bakes and base builds killed
//! with SIGKILL at each step (no cleanup of their own can run), then gc finds and removes
//! everything each left, in the cloud and on this machine, and never touches a run that is
//! still going.

use std::path::PathBuf;
use std::process::Command;

use crate::util::tarballs::{composer_like, gzip};
use crate::util::Run;

/// A port nothing listens on: this machine has no instance metadata, so bakes go direct.
const NO_IMDS: &str = "http://127.0.0.1:9";

/// (step, the call held while the kill lands, the output line it lands on (none: the step's
/// start), the kinds of leftover gc must find at least)
type Row<'a> = (&'a str, &'a str, &'a str, &'a [&'a str]);

/// This module's story.
struct Gc;
type World = crate::util::World<Gc>;

impl World {
    fn cache(&self) -> PathBuf {
        self.dir().join("amibake")
    }

    /// `amibake` with this test's directory as its temporary and cache directories, so
    /// whatever a killed run leaves on this machine is where gc looks and this test checks.
    fn amibake(&self) -> Command {
        let mut command = self.cloud.amibake(self.dir());
        command
            .env("TMPDIR", self.dir())
            .env("XDG_CACHE_HOME", self.dir())
            .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", NO_IMDS);
        command
    }

    fn gc(&self, extra: &[&str]) -> (Run, serde_json::Value) {
        let output = self
            .amibake()
            .args(["gc", "--older-than", "0s"])
            .args(extra)
            .output()
            .unwrap();
        let run = Run {
            command: format!("amibake gc --older-than 0s {extra:?}"),
            output,
        };
        let found = run.json();
        crate::util::schema::assert_valid("gc", &found);
        crate::util::schema::assert_events_valid(&run.stderr());
        (run, found)
    }

    /// For each row: runs `command(sleeps)` (`sleeps`: the row waits for a provisioner's
    /// output, so the run must sleep in it), SIGKILLs it in the row's step, then runs
    /// `gc --apply` and checks what it found and that nothing is left.
    fn kill_each_step(&self, what: &str, rows: &[Row], command: impl Fn(bool) -> Command) {
        for (step, held_call, signal_at, kinds) in rows {
            if !held_call.is_empty() {
                self.cloud.cli(&["fault", held_call, "--delay", "2"]);
            }
            let this_step = format!("\"step\":\"{step}\"");
            let killed = kill_when(
                command(!signal_at.is_empty()),
                &format!("{what}, killed in {step}"),
                |line| match *signal_at {
                    "" => line.contains("\"event\":\"step_started\"") && line.contains(&this_step),
                    output => line.contains(output),
                },
                !held_call.is_empty(),
            );
            let (run, found) = self.gc(&["--apply"]);
            run.expect_code(0);
            assert_found(&found, kinds, step, &killed);
            self.assert_nothing_left(&format!("gc after {what} killed in {step}"));
        }
    }

    /// Nothing of any run here is left: no instance alive, no volume but the build host's,
    /// no key pair, no group, no image or snapshot of the account; no mount, loop device,
    /// work or key directory, or cache copy on this machine.
    fn assert_nothing_left(&self, after: &str) {
        self.cloud.left().assert_nothing(after);
        let dir = self.dir().to_string_lossy().into_owned();
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        assert!(
            !mounts.lines().any(|l| l.contains(&dir)),
            "{after}: a mount is left:\n{mounts}"
        );
        let loops = Command::new("losetup")
            .args(["--list", "--noheadings", "--output", "BACK-FILE"])
            .output()
            .unwrap();
        let loops = String::from_utf8_lossy(&loops.stdout);
        assert!(
            !loops.lines().any(|l| l.contains(&dir)),
            "{after}: a loop device is left:\n{loops}"
        );
        for entry in std::fs::read_dir(self.dir()).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            assert!(!name.starts_with("amibake-ab-"), "{after}: {name} is left");
        }
        for entry in std::fs::read_dir(self.cache())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            assert!(!name.starts_with('.'), "{after}: the cache holds {name}");
        }
        assert!(
            !Command::new("pgrep")
                .args(["-f", "pasta --runas 0"])
                .status()
                .unwrap()
                .success(),
            "{after}: a pasta outlived its sandbox"
        );
    }
}

/// Runs `command`, SIGKILLs it when a progress line satisfies `when`, and, where the step
/// was held in a call, waits until the cloud has carried that call out.
fn kill_when(command: Command, what: &str, mut when: impl FnMut(&str) -> bool, held: bool) -> Run {
    // A held call is 2 s long: the kill lands a second into the step, inside it.
    let (run, _) = crate::util::signal_when(command, "-KILL", what, |line| {
        let now = when(line);
        if now && held {
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
        now
    });
    assert_eq!(run.output.status.code(), None, "killed: {}", run.dump());
    if held {
        std::thread::sleep(std::time::Duration::from_millis(2500));
    }
    run
}

/// gc found at least these kinds of leftover, all of one run, and removed every one.
fn assert_found(found: &serde_json::Value, kinds: &[&str], step: &str, killed: &Run) {
    let leftovers = found["leftovers"].as_array().unwrap();
    let context = || format!("killed in {step}: {found}\n{}", killed.dump());
    for kind in kinds {
        assert!(
            leftovers.iter().any(|l| l["kind"] == *kind),
            "no {kind} found, {}",
            context()
        );
    }
    assert!(
        leftovers.iter().all(|l| l["outcome"] == "removed"),
        "{}",
        context()
    );
    let runs: std::collections::BTreeSet<&str> = leftovers
        .iter()
        .filter_map(|l| l["build_id"].as_str())
        .filter(|id| id.starts_with("ab-"))
        .collect();
    assert_eq!(runs.len(), 1, "{}", context());
}

#[test]
fn gc_removes_what_killed_runs_left_and_spares_a_live_one() {
    let _module = crate::util::module_turn(module_path!());
    let world = World::new("quick");
    let dir = world.dir();
    let vendor = world.vendor_ami();
    let (tar, _) = composer_like();
    std::fs::write(dir.join("app.tar.gz"), gzip(&tar)).unwrap();
    let bake_template = |name: &str, command: &str, network: &str| {
        format!(
            "[bake]\nname = \"gc-{name}-${{timestamp}}-${{build_id}}\"\nbase_ami = \"{vendor}\"\n\
             dest = \"/srv/app\"\ndeprecate_after = \"30d\"\n\n\
             [bake.test_instance]\ninstance_type = \"t3.micro\"\nssh_username = \"admin\"\n\n\
             [[bake.test]]\ninline = [\"test -d /srv/app\"]\n\n\
             [[bake.provisioner]]\ninline = [\"{command}\"]\n{network}"
        )
    };
    std::fs::write(dir.join("bake.toml"), bake_template("bake", "true", "")).unwrap();
    std::fs::write(
        dir.join("sleepy.toml"),
        // With the outside: a guard's cgroup, with its BPF programs, and pasta.
        bake_template("sleepy", "echo sleeping; sleep 600", "network = true\n"),
    )
    .unwrap();
    std::fs::write(
        dir.join("base.toml"),
        "[variables]\ncommand = \"true\"\n\n[base]\nname = \"gc-base-${timestamp}-${build_id}\"\n\
         source_ami = \"resolve:ssm:/aws/service/debian/release/12/latest/amd64\"\n\
         instance_type = \"t3.small\"\nssh_username = \"admin\"\nssh_interface = \"private_ip\"\n\
         deprecate_after = \"30d\"\n\n\
         [[base.provisioner]]\ninline = [\"echo provisioning\", \"${var.command}\"]\n",
    )
    .unwrap();

    // Nothing of this cloud yet. What runs killed on this machine before the test left
    // (its key directories, work directories) is found, and goes with the first sweep.
    let started = format!("ab-{}", amibake::run_id::timestamp_now());
    let (run, found) = world.gc(&[]);
    run.expect_code(0);
    let earlier = found["leftovers"].as_array().unwrap();
    for leftover in earlier {
        let build = leftover["build_id"].as_str().unwrap_or_default();
        assert!(
            leftover["kind"] == "file" && build.starts_with("ab-") && *build < *started.as_str(),
            "only an earlier run's files on this machine: {found}"
        );
    }
    if !earlier.is_empty() {
        let (run, swept) = world.gc(&["--apply"]);
        run.expect_code(0);
        assert!(
            swept["leftovers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|l| l["outcome"] == "removed"),
            "{swept}"
        );
    }

    // A bake (direct backend, no build host) killed at each step. Where the step waits on
    // the cloud, the kill lands while its call is held, so the call is carried out for a
    // process that is gone. The cache is emptied before the first, so a fetch is killed.
    // (A run killed in "mark finished" or "publish to ssm" has a finished image: an
    // artifact, which prune judges, not gc.)
    let bake_steps: [Row; 13] = [
        (
            "fetch base image",
            "GetSnapshotBlock",
            "",
            &["snapshot", "file"],
        ),
        ("copy base image", "", "", &["file"]),
        ("attach loop device", "", "", &["file"]),
        ("mount image", "", "", &["loop device", "file"]),
        ("extract tarball", "", "", &["mount", "loop device", "file"]),
        ("prepare chroot", "", "", &["mount", "loop device"]),
        (
            "run provisioners",
            "",
            "\"line\":\"sleeping\"",
            &["cgroup", "mount", "loop device"],
        ),
        // The umount it started may finish after the kill.
        ("unmount image", "", "", &["loop device"]),
        ("detach loop device", "", "", &["file"]),
        ("upload snapshot", "StartSnapshot", "", &["snapshot"]),
        ("register image", "RegisterImage", "", &["image"]),
        // Its instance launched while the run was gone; its key pair not yet deleted.
        (
            "test image",
            "RunInstances",
            "",
            &["image", "instance", "key pair", "security group"],
        ),
        ("distribute", "EnableImageDeprecation", "", &["image"]),
    ];
    let bake = |sleeps: bool| {
        let mut command = world.amibake();
        let template = if sleeps { "sleepy.toml" } else { "bake.toml" };
        command.args([
            "bake",
            template,
            "--tarball",
            "app.tar.gz",
            "--commit",
            "k1ll3d",
        ]);
        command
    };
    world.kill_each_step("a direct bake", &bake_steps, bake);

    // A bake with the attach backend (this machine as its EC2 build host) killed at each
    // step: a volume attached here, mounted, then a snapshot and an image of it.
    let attach_steps: [Row; 11] = [
        ("create volume", "CreateVolume", "", &["volume"]),
        ("attach volume", "AttachVolume", "", &["volume"]),
        ("mount image", "", "", &["volume", "file"]),
        ("extract tarball", "", "", &["mount", "volume"]),
        ("prepare chroot", "", "", &["mount", "volume"]),
        (
            "run provisioners",
            "",
            "\"line\":\"sleeping\"",
            &["cgroup", "mount", "volume"],
        ),
        ("unmount image", "", "", &["volume"]),
        ("detach volume", "DetachVolume", "", &["volume"]),
        ("snapshot", "CreateSnapshot", "", &["snapshot"]),
        ("register image", "RegisterImage", "", &["image"]),
        ("distribute", "EnableImageDeprecation", "", &["image"]),
    ];
    // The local cloud's instance metadata: this machine is the build host.
    let imds = world
        .cloud
        .env
        .iter()
        .find(|(k, _)| k == "AWS_EC2_METADATA_SERVICE_ENDPOINT")
        .map(|(_, v)| v.clone())
        .unwrap();
    world.kill_each_step("an attach bake", &attach_steps, |sleeps| {
        let mut command = bake(sleeps);
        command
            .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds)
            .args(["--backend", "attach"]);
        command
    });

    // A base build killed at each step: its instance, key pair and group are left, and
    // from `create image` on an image that never got finished.
    let base_steps: [Row; 8] = [
        (
            "create key pair",
            "CreateKeyPair",
            "",
            &["key pair", "file"],
        ),
        (
            "create security group",
            "CreateSecurityGroup",
            "",
            &["security group"],
        ),
        (
            "launch instance",
            "RunInstances",
            "",
            &["instance", "security group"],
        ),
        ("wait for ssh", "", "", &["instance"]),
        (
            "run provisioners",
            "",
            "\"line\":\"sleeping\"",
            &["instance"],
        ),
        ("stop instance", "StopInstances", "", &["instance"]),
        ("create image", "CreateImage", "", &["image", "instance"]),
        (
            "distribute",
            "EnableImageDeprecation",
            "",
            &["image", "instance"],
        ),
    ];
    world.kill_each_step("a base build", &base_steps, |sleeps| {
        let mut command = world.amibake();
        command.args(["base", "base.toml", "--force"]);
        if sleeps {
            command.args(["--var", "command=echo sleeping; sleep 600"]);
        }
        command
    });

    // A bake copying to another region, killed while its copy is made: the copy, still
    // `building`, is in eu-west-1, beyond a gc of this region; `--all-regions` finds it.
    std::fs::write(
        dir.join("copy.toml"),
        format!(
            "[bake]\nname = \"gc-copy-${{timestamp}}-${{build_id}}\"\nbase_ami = \"{vendor}\"\n\
             dest = \"/srv/app\"\ncopy_to_regions = [\"eu-west-1\"]\n"
        ),
    )
    .unwrap();
    world.cloud.cli(&["fault", "CopyImage", "--delay", "2"]);
    let mut copying = world.amibake();
    copying.args([
        "bake",
        "copy.toml",
        "--tarball",
        "app.tar.gz",
        "--commit",
        "c0py",
    ]);
    let killed = kill_when(
        copying,
        "a bake copying to eu-west-1, killed in distribute",
        |line| line.contains("\"step_started\"") && line.contains("\"step\":\"distribute\""),
        true,
    );
    let copies = || -> Vec<serde_json::Value> {
        let ls = world.cloud.ls();
        ["images", "snapshots"]
            .iter()
            .flat_map(|kind| {
                ls["other_regions"]["eu-west-1"][kind]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter(|x| x["tags"].get("amibake:build-id").is_some())
            .collect()
    };
    let (run, _) = world.gc(&["--apply"]);
    run.expect_code(0);
    assert_eq!(
        copies().len(),
        2,
        "the copy and its snapshot stay\n{}",
        killed.dump()
    );
    let (run, found) = world.gc(&["--apply", "--all-regions"]);
    run.expect_code(0);
    assert!(
        found["leftovers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["kind"] == "image"
                && l["region"] == "eu-west-1"
                && l["outcome"] == "removed"),
        "{found}"
    );
    assert_eq!(copies(), Vec::<serde_json::Value>::new(), "{found}");
    world.assert_nothing_left("gc --all-regions after a bake killed while copying");

    // A bake still running (its provisioner sleeps) is spared, whatever its age, and
    // finishes as if nothing happened.
    std::fs::write(
        dir.join("slow.toml"),
        bake_template("slow", "echo sleeping; sleep 4", ""),
    )
    .unwrap();
    let mut live = world.amibake();
    live.args([
        "bake",
        "slow.toml",
        "--tarball",
        "app.tar.gz",
        "--commit",
        "l1v3",
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let mut child = live.spawn().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().unwrap()));
    for line in lines.by_ref() {
        if line.unwrap().contains("\"line\":\"sleeping\"") {
            break;
        }
    }
    let (run, found) = world.gc(&["--apply"]);
    run.expect_code(0);
    assert_eq!(found["leftovers"], serde_json::json!([]), "{found}");
    let spared = found["spared"].as_array().unwrap();
    assert_eq!(spared.len(), 1, "{found}");
    assert_eq!(spared[0]["why"], "running on this machine");
    lines.for_each(drop);
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the live bake finishes: {output:?}"
    );
    let manifest: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&output.stdout).trim()).unwrap();
    // Its image is an artifact: finished, kept by gc, even past any age.
    let (run, found) = world.gc(&["--apply"]);
    run.expect_code(0);
    assert_eq!(found["leftovers"], serde_json::json!([]), "{found}");
    let images = world.cloud.ls()["images"].clone();
    assert!(
        images
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["id"] == manifest["ami_id"]),
        "{images}"
    );
}
