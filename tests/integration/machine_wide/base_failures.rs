//! `amibake base` when things go wrong, through the real binary against the local cloud: a
//! failure injected at each AWS call, cleanups that fail, a provisioner that exits 3, an SSH
//! that never answers, and a SIGINT during each step. After each, nothing temporary is left,
//! no image of the build remains, the published parameter is as it was, and the error says
//! what failed where.

use std::path::Path;
use std::process::Command;

use crate::util::localcloud::LocalCloud;
use crate::util::Run;

const PARAMETER: &str = "/amibake/failures/base";
const TEMPLATE: &str = r#"[variables]
command = "true"
check = 'test "$(whoami)" = root'
source = "resolve:ssm:/aws/service/debian/release/12/latest/amd64"

[base]
name = "failures-base-${timestamp}"
source_ami = "${var.source}"
instance_type = "t3.small"
ssh_username = "admin"
ssh_interface = "private_ip"
ssh_timeout_seconds = 120
publish_ssm = "/amibake/failures/base"
publish_label = "latest"
deprecate_after = "30d"

[[base.provisioner]]
inline = ["echo provisioning", "${var.command}"]

[[base.test]]
name = "check"
inline = ["${var.check}"]
"#;

/// `amibake --output json base TEMPLATE --force --var VAR=VALUE…`
fn base_command(cloud: &LocalCloud, dir: &Path, template: &str, vars: &[&str]) -> Command {
    let mut command = cloud.amibake(dir);
    command.args(["base", template, "--force"]);
    for var in vars {
        command.args(["--var", var]);
    }
    command
}

fn base(cloud: &LocalCloud, dir: &Path, vars: &[&str]) -> Run {
    base_with(cloud, dir, "failures.toml", vars)
}

fn base_with(cloud: &LocalCloud, dir: &Path, template: &str, vars: &[&str]) -> Run {
    Run {
        command: format!("amibake base {template} --force {vars:?}"),
        output: base_command(cloud, dir, template, vars).output().unwrap(),
    }
}

/// This module's story: a base published to `PARAMETER` (labelled `latest`) that every
/// failed build must leave as it was.
struct BaseFailures;
type World = crate::util::World<BaseFailures>;

impl World {
    /// A story whose failures.toml (and impatient.toml, whose SSH gives up after 3 s) build a
    /// base published to `PARAMETER`, which holds the vendor image as an earlier base, as on
    /// any day but the first.
    fn publishing_a_base() -> World {
        let world = World::new("quick");
        std::fs::write(world.dir().join("failures.toml"), TEMPLATE).unwrap();
        std::fs::write(
            world.dir().join("impatient.toml"),
            TEMPLATE.replace("ssh_timeout_seconds = 120", "ssh_timeout_seconds = 3"),
        )
        .unwrap();
        let published = world.published();
        world.runtime.block_on(async {
            let put = world
                .clients
                .ssm
                .put_parameter()
                .name(PARAMETER)
                .value(&published)
                .r#type(aws_sdk_ssm::types::ParameterType::String)
                .data_type("aws:ec2:image")
                .send()
                .await
                .unwrap();
            world
                .clients
                .ssm
                .label_parameter_version()
                .name(PARAMETER)
                .parameter_version(put.version())
                .labels("latest")
                .send()
                .await
                .unwrap();
        });
        world
    }

    /// What the parameter held before any of these builds: it must hold it after each.
    fn published(&self) -> String {
        self.vendor_ami()
    }

    /// After a build that succeeded: exactly its image (and that image's snapshots) is left
    /// of it; removes them and puts the parameter back, so `assert_clean` can follow.
    fn take_back(&self, run: &Run) {
        run.expect_code(0);
        let manifest: serde_json::Value = run.json();
        let image = manifest["ami_id"].as_str().unwrap().to_string();
        let images: Vec<_> = self.cloud.ls()["images"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["owner"] == "123456789012")
            .map(|x| x["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            images,
            std::slice::from_ref(&image),
            "only the build's image\n{}",
            run.dump()
        );
        self.runtime.block_on(async {
            amibake::aws::image::deregister_with_snapshots(self.clients.clone(), image)
                .await
                .unwrap();
            amibake::aws::ssm::restore(
                self.clients.clone(),
                PARAMETER.into(),
                Some(self.published()),
                Some("latest".into()),
            )
            .await
            .unwrap();
        });
        self.assert_clean(run);
    }

    fn parameter(&self, name: &str) -> Option<String> {
        self.runtime
            .block_on(self.clients.ssm.get_parameter().name(name).send())
            .ok()
            .and_then(|o| o.parameter().and_then(|p| p.value()).map(String::from))
    }

    /// Nothing of a failed build: no live instance but the build host, no key pair, no
    /// security group, no image or snapshot of ours, the parameter and its label unchanged.
    fn assert_clean(&self, run: &Run) {
        self.cloud.left().assert_nothing(&run.dump());
        assert_eq!(
            self.parameter(PARAMETER).as_ref(),
            Some(&self.published()),
            "{}",
            run.dump()
        );
        assert_eq!(
            self.parameter(&format!("{PARAMETER}:latest")).as_ref(),
            Some(&self.published()),
            "the label is back on the old value\n{}",
            run.dump()
        );
    }
}

#[test]
fn a_failure_at_each_aws_call_of_a_base_build_cleans_up_and_names_its_step() {
    let _module = crate::util::module_turn(module_path!());
    let _turn = crate::util::beside_others();
    let world = World::publishing_a_base();
    let dir = world.dir();

    // A failure at each AWS call the build makes: (call, calls of it let through first,
    // the step the error names, or none when it fails before the engine starts).
    let cases: &[(&str, &str, u32, Option<&str>)] = &[
        ("ec2", "DescribeImages", 0, None),
        ("ssm", "GetParameter", 0, None),
        ("ec2", "CreateKeyPair", 0, Some("create key pair")),
        (
            "ec2",
            "CreateSecurityGroup",
            0,
            Some("create security group"),
        ),
        ("ec2", "RunInstances", 0, Some("launch instance")),
        ("ec2", "DescribeInstances", 0, Some("launch instance")),
        (
            "ec2",
            "AuthorizeSecurityGroupIngress",
            0,
            Some("launch instance"),
        ),
        ("ec2", "StopInstances", 0, Some("stop instance")),
        ("ec2", "CreateImage", 0, Some("create image")),
        ("ec2", "DescribeImages", 1, Some("create image")),
        ("ec2", "EnableImageDeprecation", 0, Some("distribute")),
        // The passed test is tagged on the image first, then the build is marked finished.
        ("ec2", "CreateTags", 0, Some("test image")),
        ("ec2", "CreateTags", 1, Some("mark finished")),
        ("ssm", "GetParameter", 1, Some("publish to ssm")),
        ("ssm", "PutParameter", 0, Some("publish to ssm")),
        ("ssm", "LabelParameterVersion", 0, Some("publish to ssm")),
    ];
    for (service, action, after, step) in cases {
        let injected = world.cloud.fail_once(service, action, *after);
        let run = base(&world.cloud, dir, &[]);
        run.expect_failure(&injected, *step);
        world.assert_clean(&run);
    }
}

#[test]
fn eventual_consistency_and_lost_answers_leave_one_base_image() {
    let _module = crate::util::module_turn(module_path!());
    let _turn = crate::util::beside_others();
    let world = World::publishing_a_base();
    let dir = world.dir();

    // EC2's eventual consistency: every new resource NotFound for 2 s. The build waits it
    // out and succeeds, leaving only its image.
    world.cloud.cli(&["consistency", "2"]);
    world.take_back(&base(&world.cloud, dir, &[]));
    // SIGTERM right after the launch, while the instance is still NotFound: its removal
    // waits until EC2 knows it, never taking NotFound for "already gone".
    world.cloud.cli(&["fault", "RunInstances", "--delay", "1"]);
    let (run, _) = crate::util::signal_when(
        base_command(&world.cloud, dir, "failures.toml", &[]),
        "-TERM",
        "amibake base, terminated just after its launch",
        |line| line.contains("\"step_started\"") && line.contains("\"step\":\"launch instance\""),
    );
    run.expect_code(143);
    world.assert_clean(&run);
    world.cloud.cli(&["consistency", "0"]);

    // A create whose answer is lost (carried out, then HTTP 500: the SDK retries). A client
    // token makes the retry the same call; a name EC2 keeps unique leads back to what the
    // lost attempt made. A key pair's private key is lost with the answer: that build
    // fails, and the key pair goes.
    for (action, succeeds) in [
        ("CreateKeyPair", false),
        ("CreateSecurityGroup", true),
        ("RunInstances", true),
        ("CreateImage", true),
        ("PutParameter", true),
    ] {
        world.cloud.cli(&["fault", action, "--lose-answer"]);
        let run = base(&world.cloud, dir, &[]);
        if succeeds {
            world.take_back(&run);
        } else {
            run.expect_failure("InvalidKeyPair.Duplicate", Some("create key pair"));
            world.assert_clean(&run);
        }
    }
}

#[test]
fn a_failing_provisioner_test_cleanup_or_instance_is_named() {
    let _module = crate::util::module_turn(module_path!());
    let _turn = crate::util::beside_others();
    let world = World::publishing_a_base();
    let dir = world.dir();

    // A provisioner that exits 3: its command, exit code and output are in the error.
    let run = base(&world.cloud, dir, &["command=echo about to fail; exit 3"]);
    run.expect_code(1);
    assert!(
        run.stderr().contains(
            "error: run provisioners: provisioner `inline`: `echo about to fail; exit 3` exited with 3; last output:\nabout to fail"
        ),
        "{}",
        run.dump()
    );
    world.assert_clean(&run);

    // A test that fails on the booted image: the image goes with its snapshots, the test's
    // instance, key pair and group with the build's, and the channel stays as it was.
    let run = base(
        &world.cloud,
        dir,
        &["check=echo php-fpm: bad config; exit 4"],
    );
    run.expect_failure("failed its test on i-", Some("test image"));
    assert!(
        run.stderr().contains(
            "test `check`: `echo php-fpm: bad config; exit 4` exited with 4; last output:\nphp-fpm: bad config"
        ),
        "{}",
        run.dump()
    );
    world.assert_clean(&run);

    // Cleanups that fail: the run says which ids it could not remove, and exits 1. (The key
    // pair is deleted once the instance has it and, that failing, again at the end: both
    // fail here.)
    for (action, what, times) in [
        ("TerminateInstances", "terminate instance", "1"),
        ("DeleteSecurityGroup", "delete security group", "1"),
        ("DeleteKeyPair", "delete key pair", "2"),
    ] {
        world.cloud.cli(&[
            "fault",
            action,
            "--times",
            times,
            "--error",
            "UnauthorizedOperation",
        ]);
        let run = base(&world.cloud, dir, &["command=exit 3"]);
        run.expect_leftover(&[what, "UnauthorizedOperation"]);
        clean_by_hand(&world);
        world.assert_clean(&run);
    }

    // An instance that never answers SSH: a bounded wait, then everything goes.
    let broken = broken_image(&world);
    let run = base_with(
        &world.cloud,
        dir,
        "impatient.toml",
        &[&format!("source={broken}")],
    );
    run.expect_code(1);
    assert!(
        run.stderr()
            .contains("error: wait for ssh: no SSH answer from admin@127."),
        "{}",
        run.dump()
    );
    assert!(run.stderr().contains("within 3s"), "{}", run.dump());
    world
        .runtime
        .block_on(amibake::aws::image::deregister_with_snapshots(
            world.clients.clone(),
            broken,
        ))
        .unwrap();
    world.assert_clean(&run);

    // Another machine answering at the instance's address: its host key is none of those
    // the instance printed to its console. The build refuses it before authenticating
    // (the instance's sshd never saw a login) and cleans up.
    world.cloud.cli(&["impostor"]);
    let run = base(&world.cloud, dir, &[]);
    run.expect_code(1);
    let refusal = run
        .stderr()
        .lines()
        .find(|l| l.starts_with("error: wait for ssh: 127."))
        .unwrap_or_else(|| panic!("the refusal\n{}", run.dump()))
        .to_string();
    assert!(
        refusal.contains("offered the SSH host key SHA256:")
            && refusal.contains("another machine is answering at that address"),
        "{}",
        run.dump()
    );
    let instance_id = refusal
        .split_whitespace()
        .find(|w| w.starts_with("i-"))
        .expect("the instance named");
    let console = world
        .runtime
        .block_on(
            world
                .clients
                .ec2
                .get_console_output()
                .instance_id(instance_id)
                .send(),
        )
        .unwrap();
    let console =
        String::from_utf8(aws_smithy_types::base64::decode(console.output().unwrap()).unwrap())
            .unwrap();
    assert!(
        console.contains("BEGIN SSH HOST KEY FINGERPRINTS")
            && !console.contains("Accepted publickey"),
        "{console}"
    );
    world.assert_clean(&run);
}

#[test]
fn a_signal_in_each_step_of_a_base_build_cleans_up_inside_the_kill_window() {
    let _module = crate::util::module_turn(module_path!());
    let _turn = crate::util::beside_others();
    let world = World::publishing_a_base();
    let dir = world.dir();

    // SIGTERM, as a CI system stops a job, during each step: exit 143 well inside the 10 s
    // such a system waits before it kills, and everything made so far is removed. Each
    // step is held in its first call (or its running command) while the signal lands, so
    // the step named is exactly the one signalled.
    // (step, the call it is held in, how many calls of that action pass first)
    const STEPS: [(&str, &str, u32); 11] = [
        ("create key pair", "CreateKeyPair", 0),
        ("create security group", "CreateSecurityGroup", 0),
        ("launch instance", "RunInstances", 0),
        ("wait for ssh", "", 0),
        ("run provisioners", "", 0),
        ("stop instance", "StopInstances", 0),
        ("create image", "CreateImage", 0),
        // The test instance's launch: the build instance's goes first.
        ("test image", "RunInstances", 1),
        ("distribute", "EnableImageDeprecation", 0),
        // The test's own tag goes first.
        ("mark finished", "CreateTags", 1),
        ("publish to ssm", "PutParameter", 0),
    ];
    for (index, (step, first_call, after)) in STEPS.iter().enumerate() {
        let started = format!("\"event\":\"step_started\",\"index\":{}", index + 1);
        // During the provisioners, the signal lands while a command runs on the instance.
        let (vars, signal_at): (&[&str], &str) = if *step == "run provisioners" {
            (
                &["command=echo sleeping; sleep 600"],
                "\"line\":\"sleeping\"",
            )
        } else {
            (&[], started.as_str())
        };
        if !first_call.is_empty() {
            let after = after.to_string();
            world
                .cloud
                .cli(&["fault", first_call, "--delay", "2", "--after", &after]);
        }
        let (run, after_signal) = crate::util::signal_when(
            base_command(&world.cloud, dir, "failures.toml", vars),
            "-TERM",
            &format!("amibake base failures.toml, terminated during {step}"),
            |line| line.contains(signal_at),
        );
        run.expect_terminated_in(step, after_signal);
        world.assert_clean(&run);
    }

    // Ctrl-C is the same interrupt, with its own exit code.
    let run = crate::util::interrupt_when(
        base_command(
            &world.cloud,
            dir,
            "failures.toml",
            &["command=echo sleeping; sleep 600"],
        ),
        "amibake base failures.toml, Ctrl-C during run provisioners",
        |line| line.contains("\"line\":\"sleeping\""),
    );
    run.expect_code(130);
    world.assert_clean(&run);
}

/// A registered image whose root volume holds no filesystem: it launches, never boots.
/// `--on-error=abort`: a failed base keeps its instance running, says how to reach it (the
/// printed ssh command works), and `gc --build-id` then removes all of it however young.
#[test]
fn on_error_abort_keeps_the_instance_to_look_at_and_gc_build_id_removes_it() {
    let _module = crate::util::module_turn(module_path!());
    let _turn = crate::util::alone();
    let world = World::publishing_a_base();
    let dir = world.dir();
    let mut command = base_command(&world.cloud, dir, "failures.toml", &["command=exit 3"]);
    command.args(["--on-error", "abort"]);
    let run = Run {
        command: "amibake base failures.toml --on-error abort".into(),
        output: command.output().unwrap(),
    };
    run.expect_code(1);
    let stderr = run.stderr();
    let build_id = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|e| e["build_id"].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("no build id\n{}", run.dump()));
    let ssh = stderr
        .lines()
        .find_map(|l| l.split_once(" runs: ssh ").map(|(_, c)| format!("ssh {c}")))
        .unwrap_or_else(|| panic!("no way to reach the instance\n{}", run.dump()));
    assert!(
        stderr.contains(&format!(
            "remove what this run kept with: amibake gc --build-id {build_id} --region "
        )),
        "{}",
        run.dump()
    );
    let alive: Vec<_> = world.cloud.ls()["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["id"] != world.cloud.build_host() && i["state"] == "running")
        .cloned()
        .collect();
    assert_eq!(alive.len(), 1, "the instance runs\n{}", run.dump());
    assert!(
        stderr.contains(&format!(
            "kept (--on-error=abort): {} (not done: terminate instance)",
            alive[0]["id"].as_str().unwrap()
        )),
        "{}",
        run.dump()
    );

    // The printed command reaches it: `ssh -i KEY -p PORT USER@HOST`.
    let words: Vec<&str> = ssh.split_whitespace().collect();
    assert_eq!((words[0], words[1], words[3]), ("ssh", "-i", "-p"), "{ssh}");
    let key = Path::new(words[2]);
    assert!(key.is_file(), "the key is kept: {ssh}");
    let reached = Command::new("ssh")
        .args(["-i", words[2], "-p", words[4]])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
            words[5],
            "echo reached",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&reached.stdout).contains("reached"),
        "{ssh}: {}",
        String::from_utf8_lossy(&reached.stderr)
    );

    let gc = Run {
        command: format!("amibake gc --build-id {build_id} --apply"),
        output: world
            .cloud
            .amibake(dir)
            .args(["gc", "--build-id", &build_id, "--apply"])
            .output()
            .unwrap(),
    };
    gc.expect_code(0);
    world.assert_clean(&gc);
    assert!(!key.exists(), "gc removed the kept key\n{}", gc.dump());
}

fn broken_image(world: &World) -> String {
    world.runtime.block_on(async {
        let volume = world
            .clients
            .ec2
            .create_volume()
            .availability_zone("us-east-1a")
            .size(1)
            .send()
            .await
            .unwrap();
        LocalCloud::image_of_volume(&world.clients, volume.volume_id().unwrap(), "no-filesystem")
            .await
    })
}

/// Removes what a run with a failed cleanup left, as an operator would with the ids it named.
fn clean_by_hand(world: &World) {
    let ls = world.cloud.ls();
    let ec2 = &world.clients.ec2;
    world.runtime.block_on(async {
        for instance in ls["instances"].as_array().unwrap() {
            if instance["id"] != world.cloud.build_host() && instance["state"] != "terminated" {
                ec2.terminate_instances()
                    .instance_ids(instance["id"].as_str().unwrap())
                    .send()
                    .await
                    .unwrap();
            }
        }
        for group in ls["security_groups"].as_array().unwrap() {
            ec2.delete_security_group()
                .group_id(group["id"].as_str().unwrap())
                .send()
                .await
                .unwrap();
        }
        for key in ls["key_pairs"].as_array().unwrap() {
            ec2.delete_key_pair()
                .key_name(key.as_str().unwrap())
                .send()
                .await
                .unwrap();
        }
    });
}
