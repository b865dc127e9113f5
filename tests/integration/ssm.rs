//! `communicator = "ssm"`: a base built, and a new base image tested, with no inbound SSH,
//! through the real binary on the local cloud. The instance is reached only through SSM Run
//! Command: no key pair, a security group with no ingress rule, its agent registered
//! through its instance profile. What fails, hangs or is refused leaves nothing.

use crate::util::localcloud::{MountedSnapshot, PARTITION_1_OFFSET};
use crate::util::Run;

/// A profile whose role SSM lets manage the instance, one whose role it does not, and one
/// with no role at all.
const PROFILE: &str = "amibake-ssm";
const PROFILE_WITHOUT_SSM: &str = "amibake-no-ssm";
const PROFILE_WITHOUT_ROLE: &str = "amibake-no-role";
/// A profile whose role may also write CloudWatch Logs: the agent streams output there.
const PROFILE_WITH_LOGS: &str = "amibake-ssm-logs";
/// A profile whose role may also use S3: the agent fetches files from the bucket, and puts
/// a command's whole output there.
const PROFILE_WITH_S3: &str = "amibake-ssm-s3";
/// The account's bucket for files too large for commands.
const BUCKET: &str = "amibake-staging";

/// A file that goes to the instance in several pieces.
fn pool_conf() -> String {
    (0..2000)
        .map(|i| format!("; pool line {i:05} of a long php-fpm configuration\n"))
        .collect()
}

/// This module's story.
struct Ssm;
type World = crate::util::World<Ssm>;

impl World {
    fn with_profiles() -> World {
        let world = World::new("quick");
        world.cloud.cli(&["instance-profile", PROFILE]);
        world
            .cloud
            .cli(&["instance-profile", PROFILE_WITHOUT_SSM, "--without-ssm"]);
        world
            .cloud
            .cli(&["instance-profile", PROFILE_WITHOUT_ROLE, "--without-role"]);
        world
            .cloud
            .cli(&["instance-profile", PROFILE_WITH_LOGS, "--with-logs"]);
        world
            .cloud
            .cli(&["instance-profile", PROFILE_WITH_S3, "--with-s3"]);
        world.cloud.cli(&["bucket", BUCKET]);
        std::fs::write(world.dir().join("pool.conf"), pool_conf()).unwrap();
        std::fs::write(
            // A name with a space and a quote: the path it is run at is one word.
            world.dir().join("set up's.sh"),
            "#!/bin/sh\nset -e\necho \"script as $(id -u) for $APP\" > /etc/amibake-script\n",
        )
        .unwrap();
        world
    }

    /// A base over SSM with `provisioners` (TOML tables) and `extra` lines in `[base]`.
    fn template(&self, profile: &str, extra: &str, provisioners: &str) {
        let text = format!(
            "[variables]\ntoken = {{ default = \"s3cr3t-t0ken\", sensitive = true }}\n\n\
             [base]\nname = \"ssm-base-${{timestamp}}\"\n\
             source_ami = \"resolve:ssm:/aws/service/debian/release/12/latest/amd64\"\n\
             instance_type = \"t3.small\"\ncommunicator = \"ssm\"\n\
             iam_instance_profile = \"{profile}\"\n{extra}\n{provisioners}"
        );
        std::fs::write(self.dir().join("t.toml"), text).unwrap();
    }

    /// The root filesystem of the image `run` (a base that succeeded) made, mounted at
    /// `dir` until dropped.
    fn mount_image(&self, run: &Run, dir: &std::path::Path) -> MountedSnapshot {
        let manifest: serde_json::Value = run.json();
        let snapshot = manifest["snapshot_ids"][0].as_str().unwrap();
        self.cloud.mount_snapshot(snapshot, dir, PARTITION_1_OFFSET)
    }

    fn base(&self) -> Run {
        self.cloud.run_amibake(self.dir(), &["base", "t.toml"])
    }

    /// `amibake ARGS` exits 2 before any AWS call, its errors holding each of `wanted`.
    fn refused(&self, args: &[&str], wanted: &[&str]) -> Run {
        let from = self.cloud.calls().len();
        let run = self.cloud.run_amibake(self.dir(), args);
        run.expect_code(2);
        let said = format!("{}{}", run.stdout(), run.stderr());
        for part in wanted {
            assert!(said.contains(part), "wanted {part:?}\n{}", run.dump());
        }
        assert_eq!(
            self.cloud.calls_since(from),
            Vec::<serde_json::Value>::new()
        );
        run
    }
}

const PROVISIONERS: &str = "[[base.provisioner]]\n\
     inline = [\"echo \\\"inline as $(id -u) for $APP\\\" > /etc/amibake-inline\", \"echo provisioned-line\"]\n\
     env = { APP = \"shop\" }\n\n\
     [[base.provisioner]]\nscript = \"set up's.sh\"\nenv = { APP = \"shop\" }\n\n\
     [[base.provisioner]]\nfile = \"pool.conf\"\ndestination = \"/etc/amibake/pool.d/pool.conf\"\n\n\
     [[base.test]]\nname = \"provisioned\"\ninline = [\"test -f /etc/amibake/pool.d/pool.conf\", \"echo tested-over-ssm\"]\n";

fn actions(calls: &[serde_json::Value]) -> Vec<&str> {
    calls.iter().filter_map(|c| c["action"].as_str()).collect()
}

#[test]
fn a_base_over_ssm_makes_no_key_pair_opens_no_port_and_provisions_as_over_ssh() {
    let _module = crate::util::module_turn(module_path!());
    let world = World::with_profiles();
    world.template(PROFILE, "", PROVISIONERS);
    let from = world.cloud.calls().len();
    let run = world.base();
    run.expect_code(0);
    let calls = world.cloud.calls_since(from);
    let called = actions(&calls);
    for never in [
        "CreateKeyPair",
        "AuthorizeSecurityGroupIngress",
        "ImportKeyPair",
    ] {
        assert!(!called.contains(&never), "{never} was called: {called:?}");
    }
    for needed in [
        "GetInstanceProfile",
        "CreateSecurityGroup",
        "DescribeInstanceInformation",
        "SendCommand",
        "GetCommandInvocation",
    ] {
        assert!(called.contains(&needed), "no {needed}: {called:?}");
    }
    // Its role has AWS's policy for the agent: the profile's check says nothing.
    assert!(
        !run.stderr().contains("base.iam_instance_profile:"),
        "{}",
        run.dump()
    );
    let launch = calls
        .iter()
        .find(|c| c["action"] == "RunInstances")
        .expect("a launch");
    assert!(
        launch["ids"].get("KeyName").is_none(),
        "launched with a key pair: {launch}"
    );
    assert!(
        run.stderr().contains("provisioned-line"),
        "the provisioner's output is shown\n{}",
        run.dump()
    );
    // The booted test ran on an instance of the new image, reached the same way.
    assert_eq!(
        called.iter().filter(|a| **a == "RunInstances").count(),
        2,
        "a build instance and a test instance: {called:?}"
    );
    assert!(run.stderr().contains("tested-over-ssm"), "{}", run.dump());

    // What the provisioners wrote, as root, is in the image.
    let root = tempfile::tempdir().unwrap();
    let mounted = world.mount_image(&run, root.path());
    let read = |path: &str| std::fs::read_to_string(mounted.root.join(path)).unwrap();
    assert_eq!(read("etc/amibake-inline"), "inline as 0 for shop\n");
    // Made under the agent's umask, as over SSH: services that are not root read them.
    use std::os::unix::fs::PermissionsExt;
    for (path, wanted) in [
        ("etc/amibake-inline", 0o644),
        ("etc/amibake", 0o755),
        ("etc/amibake/pool.d", 0o755),
    ] {
        let mode = std::fs::metadata(mounted.root.join(path))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, wanted, "{path}: {:o}", mode & 0o777);
    }
    assert_eq!(read("etc/amibake-script"), "script as 0 for shop\n");
    // In pieces, into a directory made for it, nothing staged left beside it.
    assert_eq!(read("etc/amibake/pool.d/pool.conf"), pool_conf());
    let beside: Vec<_> = std::fs::read_dir(mounted.root.join("etc/amibake/pool.d"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(beside, ["pool.conf"]);
    // The agent's record of the commands (their scripts, with the file's pieces) is not
    // baked into the image: only the command that cleared it is left.
    let mut kept = Vec::new();
    let mut dirs = vec![mounted.root.join("var/lib/amazon/ssm")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                kept.push(std::fs::read_to_string(&path).unwrap_or_default());
            }
        }
    }
    assert!(
        !kept.is_empty(),
        "the local cloud's agent keeps its scripts there"
    );
    for text in &kept {
        assert!(
            !text.contains("amibake-inline") && !text.contains("base64"),
            "a command's record is in the image: {text}"
        );
    }
    drop(mounted);
    world.cloud.assert_nothing_temporary();
}

/// What SSM and CloudWatch Logs keep of every command, read as anyone allowed to read them
/// would read it.
fn ssm_kept(world: &World) -> String {
    let out = world.cloud.cli(&["ssm-kept"]);
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_secret_reaches_the_instance_over_ssm_and_nothing_ssm_keeps_can_show_it() {
    let _module = crate::util::module_turn(module_path!());
    let world = World::with_profiles();
    // A sensitive variable in an inline command and in an environment, and a file holding a
    // secret of its own, to a booted test as well; the log group keeps what they print.
    let file_secret = "db_password = hunter2-from-a-file";
    std::fs::write(world.dir().join("secret.conf"), format!("{file_secret}\n")).unwrap();
    world.template(
        PROFILE_WITH_LOGS,
        "ssm_log_group = \"/amibake/builds\"",
        "[[base.provisioner]]\n\
         inline = [\"test \\\"$TOKEN\\\" = '${var.token}'\", \"printf %s \\\"$TOKEN\\\" > /etc/amibake-token\", \"echo token-delivered\"]\n\
         env = { TOKEN = \"${var.token}\" }\n\n\
         [[base.provisioner]]\nfile = \"secret.conf\"\ndestination = \"/etc/amibake/secret.conf\"\n\n\
         [[base.test]]\nname = \"token\"\ninline = [\"test \\\"$(cat /etc/amibake-token)\\\" = \\\"$TOKEN\\\"\", \"echo token-tested\"]\n\
         env = { TOKEN = \"${var.token}\" }\n",
    );
    let run = world.base();
    run.expect_code(0);
    assert_shown_once(&run, &["token-delivered", "token-tested"]);
    assert!(!run.dump().contains("s3cr3t-t0ken"), "{}", run.dump());

    // The commands went through SSM, and what it keeps of them holds neither secret.
    let kept = ssm_kept(&world);
    assert!(
        kept.contains("openssl cms -decrypt") && kept.contains("token-delivered"),
        "SSM keeps the sealed commands and their output: {kept}"
    );
    // The file would have gone in base64.
    let file_in_base64 = aws_smithy_types::base64::encode(format!("{file_secret}\n"));
    for secret in ["s3cr3t-t0ken", "hunter2", &file_in_base64] {
        assert!(!kept.contains(secret), "SSM keeps {secret:?}: {kept}");
    }

    // The instance got both, and its key is not in the image.
    let root = tempfile::tempdir().unwrap();
    let mounted = world.mount_image(&run, root.path());
    let read = |path: &str| std::fs::read_to_string(mounted.root.join(path)).unwrap();
    assert_eq!(read("etc/amibake-token"), "s3cr3t-t0ken");
    assert_eq!(read("etc/amibake/secret.conf"), format!("{file_secret}\n"));
    let run_dir: Vec<_> = std::fs::read_dir(mounted.root.join("run"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        !run_dir
            .iter()
            .any(|name| name.to_string_lossy().contains("amibake")),
        "the instance's key is in the image: /run holds {run_dir:?}"
    );
    drop(mounted);
    world.cloud.assert_nothing_temporary();
}

/// 3 MiB, a secret's line among bytes of every value: far more than commands carry.
fn large_file() -> Vec<u8> {
    let mut bytes = Vec::with_capacity(3 << 20);
    let mut i = 0u32;
    while bytes.len() < 3 << 20 {
        bytes.extend_from_slice(b"password = hunter2-in-a-large-file\n");
        bytes.extend((0..220u32).map(|j| ((i * 31 + j * 7) % 256) as u8));
        i += 1;
    }
    bytes.truncate(3 << 20);
    bytes
}

fn calls_of<'c>(calls: &'c [serde_json::Value], action: &str) -> Vec<&'c serde_json::Value> {
    calls.iter().filter(|c| c["action"] == action).collect()
}

#[test]
fn a_file_too_large_for_commands_goes_through_the_bucket_sealed_and_leaves_nothing() {
    let _module = crate::util::module_turn(module_path!());
    let world = World::with_profiles();
    std::fs::write(world.dir().join("big.bin"), large_file()).unwrap();
    let provisioners =
        "[[base.provisioner]]\nfile = \"big.bin\"\ndestination = \"/opt/amibake/big.bin\"\n";
    let with_bucket = format!("ssm_bucket = \"{BUCKET}\"");

    // Without a bucket: refused for its size, naming the key that would take it.
    world.template(PROFILE, "", provisioners);
    let run = world.base();
    run.expect_failure("it is 3145728 bytes", Some("run provisioners"));
    assert!(run.stderr().contains("`ssm_bucket`"), "{}", run.dump());
    world.cloud.left().assert_nothing(&run.dump());

    // With one: a single object of the run's, fetched by the agent and deleted; no piece
    // goes through a command; the image holds the file whole.
    world.template(PROFILE_WITH_S3, &with_bucket, provisioners);
    let from = world.cloud.calls().len();
    let run = world.base();
    run.expect_code(0);
    let calls = world.cloud.calls_since(from);
    let (puts, deletes) = (
        calls_of(&calls, "PutObject"),
        calls_of(&calls, "DeleteObject"),
    );
    assert_eq!((puts.len(), deletes.len()), (1, 1), "{:?}", actions(&calls));
    assert_eq!(puts[0]["ids"], deletes[0]["ids"]);
    assert_eq!(puts[0]["ids"]["Bucket"], BUCKET);
    assert!(puts[0]["ids"]["Key"]
        .as_str()
        .unwrap()
        .starts_with("amibake/"));
    // The key, the fetch, the install, the clearing of traces.
    assert_eq!(
        calls_of(&calls, "SendCommand").len(),
        4,
        "{:?}",
        actions(&calls)
    );
    let root = tempfile::tempdir().unwrap();
    let mounted = world.mount_image(&run, root.path());
    let copied = std::fs::read(mounted.root.join("opt/amibake/big.bin")).unwrap();
    assert!(copied == large_file(), "the file is not whole in the image");
    drop(mounted);
    world.cloud.assert_nothing_temporary();

    // A role that may not read the bucket: said before the launch; the agent's refusal
    // fails the build, naming it, and the object is deleted all the same.
    world.template(PROFILE, &with_bucket, provisioners);
    let run = world.base();
    run.expect_failure("AccessDenied", Some("run provisioners"));
    assert!(
        run.stderr()
            .contains("has no AmazonS3ReadOnlyAccess attached"),
        "{}",
        run.dump()
    );
    world.cloud.left().assert_nothing_temporary(&run.dump());

    // Output past what SSM keeps comes whole from the agent's copy in the bucket, each line
    // once; the copies are deleted.
    world.template(
        PROFILE_WITH_S3,
        &with_bucket,
        "[[base.provisioner]]\ninline = [\"seq -f 'whole line %g' 1 3000\"]\n",
    );
    let run = world.base();
    run.expect_code(0);
    assert_shown_once(
        &run,
        &["whole line 1", "whole line 1500", "whole line 3000"],
    );
    assert!(
        !run.stderr().contains("SSM keeps the first"),
        "{}",
        run.dump()
    );
    world.cloud.assert_nothing_temporary();

    // A fault at the put, or at the read of the whole output: the put fails the build and
    // leaves nothing; a read that fails is said, SSM's cut copy is shown, and the copies are
    // deleted all the same.
    world.template(PROFILE_WITH_S3, &with_bucket, provisioners);
    let injected = world.cloud.fail_once("s3", "PutObject", 0);
    let run = world
        .cloud
        .run_amibake(world.dir(), &["base", "t.toml", "--force"]);
    run.expect_failure(&injected, Some("run provisioners"));
    world.cloud.left().assert_nothing_temporary(&run.dump());
    world.template(
        PROFILE_WITH_S3,
        &with_bucket,
        "[[base.provisioner]]\ninline = [\"seq -f 'whole line %g' 1 3000\"]\n",
    );
    let injected = world.cloud.fail_once("s3", "GetObject", 0);
    let run = world
        .cloud
        .run_amibake(world.dir(), &["base", "t.toml", "--force"]);
    run.expect_code(0);
    assert!(
        run.stderr().contains("(the whole output was not read:")
            && run.stderr().contains(&injected)
            && run
                .stderr()
                .contains("SSM keeps the first 24000 characters"),
        "{}",
        run.dump()
    );
    assert_eq!(shown(&run, "whole line 1"), 1, "{}", run.dump());
    world.cloud.assert_nothing_temporary();

    // Ctrl-C while the agent's fetch is held past the interrupt's grace: the step is cut
    // short mid-upload, and the run's cleanup deletes the object it staged.
    world.template(PROFILE_WITH_S3, &with_bucket, provisioners);
    // The first command makes the instance's key; the second is the fetch.
    world
        .cloud
        .cli(&["fault", "SendCommand", "--after", "1", "--delay", "60"]);
    let mut command = world.cloud.amibake(world.dir());
    command.args(["base", "t.toml", "--force"]);
    let run = crate::util::interrupt_when(
        command,
        "amibake base over SSM, interrupted in a bucket upload",
        |line| line.contains("upload /opt/amibake/big.bin"),
    );
    run.expect_code(130);
    world.cloud.left().assert_nothing_temporary(&run.dump());

    // The object cannot be deleted at once: the run fails, and its cleanup deletes it.
    // (`--force`: the image built above would be reused.)
    world.template(PROFILE_WITH_S3, &with_bucket, provisioners);
    let injected = world.cloud.fail_once("s3", "DeleteObject", 0);
    let run = world
        .cloud
        .run_amibake(world.dir(), &["base", "t.toml", "--force"]);
    run.expect_failure("the run's cleanup tries again", Some("run provisioners"));
    assert!(run.stderr().contains(&injected), "{}", run.dump());
    world.cloud.left().assert_nothing_temporary(&run.dump());

    // Nor by the cleanup: the run names the object it left, and that object is sealed.
    world.cloud.cli(&[
        "fault",
        "DeleteObject",
        "--times",
        "2",
        "--error",
        "AccessDenied",
    ]);
    let run = world
        .cloud
        .run_amibake(world.dir(), &["base", "t.toml", "--force"]);
    run.expect_failure("the run's cleanup tries again", Some("run provisioners"));
    assert!(
        run.stderr()
            .contains("could not clean up the objects of the run in s3://"),
        "{}",
        run.dump()
    );
    let kept: serde_json::Value = serde_json::from_str(&ssm_kept(&world)).unwrap();
    let objects = kept["objects"].as_object().unwrap();
    assert_eq!(objects.len(), 1, "{objects:?}");
    let (name, body) = objects.iter().next().unwrap();
    assert!(run.stderr().contains(name.as_str()), "{}", run.dump());
    assert!(
        !body.as_str().unwrap().contains("hunter2"),
        "the staged object is not sealed"
    );
}

#[test]
fn a_failing_or_hung_provisioner_over_ssm_fails_the_build_naming_it_and_leaves_nothing() {
    let _module = crate::util::module_turn(module_path!());
    let world = World::with_profiles();

    world.template(
        PROFILE,
        "",
        "[[base.provisioner]]\nname = \"migrate\"\ninline = [\"echo before-the-end; exit 3\"]\n",
    );
    let run = world.base();
    run.expect_code(1);
    let stderr = run.stderr();
    assert!(stderr.contains("migrate"), "{}", run.dump());
    assert!(stderr.contains("before-the-end"), "{}", run.dump());
    world.cloud.left().assert_nothing(&run.dump());

    // A booted test that fails over SSM fails the build as over SSH: no image is left.
    world.template(
        PROFILE,
        "",
        "[[base.provisioner]]\ninline = [\"true\"]\n\n\
         [[base.test]]\nname = \"health\"\ninline = [\"echo unhealthy; exit 4\"]\n",
    );
    let run = world.base();
    run.expect_code(1);
    assert!(
        run.stderr().contains("health") && run.stderr().contains("unhealthy"),
        "{}",
        run.dump()
    );
    world.cloud.left().assert_nothing(&run.dump());

    world.template(
        PROFILE,
        "",
        "[[base.provisioner]]\nname = \"hangs\"\ninline = [\"echo started; sleep 600\"]\ntimeout_seconds = 3\n",
    );
    let from = world.cloud.calls().len();
    let run = world.base();
    run.expect_code(1);
    assert!(
        run.stderr().contains("was still running after 3s"),
        "{}",
        run.dump()
    );
    let called = world.cloud.calls_since(from);
    assert!(
        actions(&called).contains(&"CancelCommand"),
        "the hung command is cancelled: {:?}",
        actions(&called)
    );
    world.cloud.left().assert_nothing(&run.dump());
}

#[test]
fn an_instance_ssm_cannot_manage_is_refused_or_given_up_on_and_leaves_nothing() {
    let _module = crate::util::module_turn(module_path!());
    let world = World::with_profiles();

    // No profile at all: the template check refuses it, before any call.
    let text = "[base]\nname = \"ssm-base\"\n\
                source_ami = \"resolve:ssm:/aws/service/debian/release/12/latest/amd64\"\n\
                instance_type = \"t3.small\"\ncommunicator = \"ssm\"\n";
    std::fs::write(world.dir().join("t.toml"), text).unwrap();
    world.refused(
        &["base", "t.toml"],
        &["t.toml:5:16: base.communicator:", "iam_instance_profile"],
    );

    // A log group CloudWatch Logs would refuse, and one over SSH: refused, before any call.
    world.template(
        PROFILE,
        "ssm_log_group = \"/amibake/build logs\"",
        "[[base.provisioner]]\ninline = [\"true\"]\n",
    );
    world.refused(
        &["base", "t.toml"],
        &["t.toml:10:17: base.ssm_log_group:", "holds ` `"],
    );
    world.template(
        PROFILE,
        "ssm_log_group = \"aws/ssm/builds\"",
        "[[base.provisioner]]\ninline = [\"true\"]\n",
    );
    world.refused(
        &["base", "t.toml"],
        &["base.ssm_log_group:", "start with `aws/` are AWS's own"],
    );
    let text = "[base]\nname = \"ssh-base\"\n\
                source_ami = \"resolve:ssm:/aws/service/debian/release/12/latest/amd64\"\n\
                instance_type = \"t3.small\"\nssh_username = \"admin\"\n\
                ssm_log_group = \"/amibake/builds\"\n";
    std::fs::write(world.dir().join("t.toml"), text).unwrap();
    world.refused(
        &["base", "t.toml"],
        &[
            "t.toml:6:17: base.ssm_log_group:",
            "goes with `communicator = \"ssm\"`",
        ],
    );

    // A bucket S3 would refuse to name, and one over SSH: refused, before any call.
    world.template(
        PROFILE,
        "ssm_bucket = \"Amibake_Staging\"",
        "[[base.provisioner]]\ninline = [\"true\"]\n",
    );
    world.refused(
        &["base", "t.toml"],
        &["t.toml:10:14: base.ssm_bucket:", "holds `A`"],
    );
    let text = "[base]\nname = \"ssh-base\"\n\
                source_ami = \"resolve:ssm:/aws/service/debian/release/12/latest/amd64\"\n\
                instance_type = \"t3.small\"\nssh_username = \"admin\"\n\
                ssm_bucket = \"amibake-staging\"\n";
    std::fs::write(world.dir().join("t.toml"), text).unwrap();
    world.refused(
        &["base", "t.toml"],
        &[
            "t.toml:6:14: base.ssm_bucket:",
            "goes with `communicator = \"ssm\"`",
        ],
    );

    // A profile IAM does not have, or one with no role: refused once IAM has said so,
    // before anything is made.
    for (profile, wanted) in [
        (
            "amibake-nowhere",
            "IAM has no instance profile of that name",
        ),
        (PROFILE_WITHOUT_ROLE, "the instance profile has no role"),
    ] {
        world.template(profile, "", "[[base.provisioner]]\ninline = [\"true\"]\n");
        let from = world.cloud.calls().len();
        let run = world.base();
        run.expect_code(1);
        assert!(
            run.stderr().contains(&format!(
                "base.iam_instance_profile = \"{profile}\": {wanted}"
            )),
            "{}",
            run.dump()
        );
        let calls = world.cloud.calls_since(from);
        assert!(actions(&calls).contains(&"GetInstanceProfile"), "{calls:?}");
        assert_eq!(world.cloud.mutating_calls_since(from), Vec::<String>::new());
    }

    // A profile whose role SSM may not use: said before anything is made; the agent never
    // registers, and the wait gives up at its bound, saying what the instance needs.
    world.template(
        PROFILE_WITHOUT_SSM,
        "agent_timeout_seconds = 4",
        "[[base.provisioner]]\ninline = [\"true\"]\n",
    );
    // Nor does --ssh-cidr open what SSM keeps shut.
    world.refused(
        &["base", "t.toml", "--ssh-cidr", "203.0.113.7/32"],
        &["--ssh-cidr opens SSH to the instance"],
    );
    // Credentials that may not read the profile: said, and the launch goes on.
    world
        .cloud
        .cli(&["fault", "GetInstanceProfile", "--error", "AccessDenied"]);
    let run = world.base();
    run.expect_code(1);
    assert!(
        run.stderr().contains(
            "base.iam_instance_profile: not checked before the launch, as IAM did not answer for it (AccessDenied"
        ) && run.stderr().contains("never registered with SSM within 4s"),
        "{}",
        run.dump()
    );
    world.cloud.left().assert_nothing(&run.dump());

    let run = world.base();
    run.expect_code(1);
    let stderr = run.stderr();
    assert!(
        stderr.contains("never registered with SSM within 4s")
            && stderr.contains("AmazonSSMManagedInstanceCore"),
        "{}",
        run.dump()
    );
    assert!(
        stderr.contains(&format!(
            "base.iam_instance_profile: its role {PROFILE_WITHOUT_SSM} has no AmazonSSMManagedInstanceCore policy attached"
        )),
        "{}",
        run.dump()
    );
    world.cloud.left().assert_nothing(&run.dump());
}

/// A provisioner's one command that prints, then waits at a gate in the instance until the
/// test opens it, then prints again.
const GATED: &str = "[[base.provisioner]]\nname = \"gated\"\n\
     inline = [\"echo early-line; echo; echo early-error >&2; \
     while [ ! -e /root/gate ]; do sleep 0.2; done; rm /root/gate; echo late-line\"]\n\
     timeout_seconds = 60\n";

/// How many times the run showed `line` as a provisioner's output.
fn shown(run: &Run, line: &str) -> usize {
    let wanted = format!("\"line\":\"{line}\"");
    run.stderr().lines().filter(|l| l.contains(&wanted)).count()
}

/// Each of `lines` was shown once as a provisioner's output.
fn assert_shown_once(run: &Run, lines: &[&str]) {
    for line in lines {
        assert_eq!(shown(run, line), 1, "{line}\n{}", run.dump());
    }
}

/// The instance whose agent the run said registered, from the lines it printed.
fn registered_instance(lines: &[String]) -> String {
    let note = lines
        .iter()
        .find(|l| l.contains("'s SSM agent registered"))
        .expect("the run says when the agent registered");
    let at = note.find("i-").unwrap();
    note[at..].split('\'').next().unwrap().to_string()
}

/// `amibake base` until both early lines are shown, then `act`, then to its end.
fn base_gated(world: &World, act: impl FnOnce(&str)) -> Run {
    let mut command = world.cloud.amibake(world.dir());
    // `--force`: the same provisioners would reuse the image an earlier run made.
    command
        .args(["base", "t.toml", "--force"])
        .env("TMPDIR", world.dir());
    let (mut out, mut err) = (false, false);
    let (run, _) = crate::util::act_when(
        command,
        "amibake base over SSM, its output gated",
        |line| {
            out |= line.contains("\"line\":\"early-line\"");
            err |= line.contains("\"line\":\"early-error\"");
            out && err
        },
        |_, lines| act(&registered_instance(lines)),
    );
    run
}

#[test]
fn a_commands_output_over_ssm_streams_from_a_log_group_as_it_is_written() {
    let _module = crate::util::module_turn(module_path!());
    let world = World::with_profiles();
    let open_gate = |instance: &str| {
        std::fs::write(world.cloud.instance_root(instance).join("root/gate"), "").unwrap()
    };

    // The early lines are shown while the command waits at its gate: read from the log
    // group, as SSM itself answers no output before a command ends. Each line once.
    world.template(
        PROFILE_WITH_LOGS,
        "ssm_log_group = \"/amibake/builds\"",
        GATED,
    );
    let from = world.cloud.calls().len();
    let run = base_gated(&world, open_gate);
    run.expect_code(0);
    assert_shown_once(&run, &["early-line", "early-error", "late-line"]);
    let calls = world.cloud.calls_since(from);
    assert!(
        calls
            .iter()
            .any(|c| c["action"] == "GetLogEvents" && c["code"] == "OK"),
        "the streams were read: {calls:?}"
    );
    assert!(
        !run.stderr().contains("CloudWatchAgentServerPolicy"),
        "{}",
        run.dump()
    );
    world.cloud.assert_nothing_temporary();

    // Output past what SSM keeps (24,000 characters) comes whole from the group, though the
    // agent sends its last lines after the command's status is final.
    world.template(
        PROFILE_WITH_LOGS,
        "ssm_log_group = \"/amibake/builds\"",
        "[[base.provisioner]]\ninline = [\"seq -f 'counted-%05g' 1 3000; echo final-line\"]\n",
    );
    let run = world.base();
    run.expect_code(0);
    assert_shown_once(&run, &["counted-00001", "counted-03000", "final-line"]);
    assert!(
        !run.stderr().contains("SSM keeps the first"),
        "{}",
        run.dump()
    );

    // Ctrl-C while the run waits for those last lines ends the wait: no stream is read
    // after the signal but the read it was in.
    let mut command = world.cloud.amibake(world.dir());
    command
        .args(["base", "t.toml", "--force"])
        .env("TMPDIR", world.dir());
    let (run, after_signal) = crate::util::signal_when(
        command,
        "-INT",
        "amibake base over SSM, interrupted while its last lines are awaited",
        |line| line.contains("\"line\":\"counted-00001\""),
    );
    let signalled = (std::time::SystemTime::now() - after_signal)
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    run.expect_code(130);
    let reads_after: Vec<f64> = world
        .cloud
        .calls()
        .iter()
        .filter(|c| c["action"] == "GetLogEvents")
        .filter_map(|c| c["time"].as_f64())
        .filter(|t| *t > signalled + 1.0)
        .collect();
    assert!(
        reads_after.is_empty(),
        "read after the signal: {reads_after:?}\n{}",
        run.dump()
    );
    // The images of the bakes above stay; nothing of this one.
    world.cloud.assert_nothing_temporary();

    // A role that may not write logs: said before the launch; the output is shown once,
    // from SSM's answer when the command ends.
    world.template(
        PROFILE,
        "ssm_log_group = \"/amibake/builds\"",
        "[[base.provisioner]]\ninline = [\"echo first-line\", \"echo\", \"echo last-line\"]\n",
    );
    let run = world.base();
    run.expect_code(0);
    assert!(
        run.stderr().contains(&format!(
            "base.iam_instance_profile: its role {PROFILE} has no CloudWatchAgentServerPolicy attached"
        )),
        "{}",
        run.dump()
    );
    assert_shown_once(&run, &["first-line", "last-line"]);

    // The log group turns unreadable mid-command: the lines streamed so far are not shown
    // again, and the rest comes from SSM's answer.
    world.template(
        PROFILE_WITH_LOGS,
        "ssm_log_group = \"/amibake/builds\"",
        GATED,
    );
    let run = base_gated(&world, |instance| {
        world.cloud.cli(&[
            "fault",
            "GetLogEvents",
            "--error",
            "AccessDeniedException",
            "--times",
            "1000",
        ]);
        open_gate(instance);
    });
    run.expect_code(0);
    assert!(
        run.stderr()
            .contains("(the output is shown when the command ends:")
            && run.stderr().contains("AccessDeniedException"),
        "{}",
        run.dump()
    );
    assert_shown_once(&run, &["early-line", "early-error", "late-line"]);
    world.cloud.assert_nothing_temporary();

    // The log group answers nothing (each read held for a minute): neither the command's
    // end nor the run's waits for it. Each read is given up after a few seconds, and the
    // lines come from SSM's answer, once. The local cloud logs a call once answered: the
    // run ended before any read was.
    world.template(
        PROFILE_WITH_LOGS,
        "ssm_log_group = \"/amibake/builds\"",
        "[[base.provisioner]]\ninline = [\"echo held-first; sleep 1; echo held-last\"]\n",
    );
    world
        .cloud
        .cli(&["fault", "GetLogEvents", "--delay", "60", "--times", "1000"]);
    let from = world.cloud.calls().len();
    let run = world.base();
    run.expect_code(0);
    assert_shown_once(&run, &["held-first", "held-last"]);
    let calls = world.cloud.calls_since(from);
    assert!(
        !actions(&calls).contains(&"GetLogEvents"),
        "the run waited for a held read: {:?}\n{}",
        actions(&calls),
        run.dump()
    );
    world.cloud.assert_nothing_temporary();
}

#[test]
fn a_fault_at_each_ssm_call_or_an_interrupt_leaves_nothing() {
    let _module = crate::util::module_turn(module_path!());
    let world = World::with_profiles();
    world.template(PROFILE, "", PROVISIONERS);
    for (action, step) in [
        ("DescribeInstanceInformation", "wait for agent"),
        ("SendCommand", "run provisioners"),
        ("GetCommandInvocation", "run provisioners"),
    ] {
        let injected = world.cloud.fail_once("ssm", action, 0);
        let run = world.base();
        run.expect_failure(&injected, Some(step));
        world.cloud.left().assert_nothing(&run.dump());
    }

    world.template(
        PROFILE,
        "",
        "[[base.provisioner]]\ninline = [\"echo started; sleep 600\"]\n",
    );
    for step in ["launch instance", "wait for agent", "run provisioners"] {
        let started = format!("\"step\":\"{step}\"");
        let mut command = world.cloud.amibake(world.dir());
        command.args(["base", "t.toml"]);
        let run = crate::util::interrupt_when(
            command,
            &format!("amibake base over SSM, interrupted in {step}"),
            |line| line.contains("\"step_started\"") && line.contains(&started),
        );
        run.expect_code(130);
        world.cloud.left().assert_nothing(&run.dump());
    }
    // The command running at the interrupt was cancelled, not left to the instance's end.
    let last_send = world
        .cloud
        .calls()
        .iter()
        .rposition(|c| c["action"] == "SendCommand")
        .expect("a command was sent");
    let after: Vec<String> = world.cloud.calls()[last_send..]
        .iter()
        .filter_map(|c| c["action"].as_str().map(str::to_string))
        .collect();
    let cancelled = after.iter().position(|a| a == "CancelCommand");
    let terminated = after.iter().position(|a| a == "TerminateInstances");
    assert!(
        cancelled.is_some() && cancelled < terminated,
        "cancelled before the instance went: {after:?}"
    );

    // A piece of a file whose command's answer is lost runs twice (the SDK sends it again):
    // each piece is written at its own offset, and the file is whole all the same.
    world.template(
        PROFILE,
        "",
        "[[base.provisioner]]\nfile = \"pool.conf\"\ndestination = \"/etc/amibake/pool.conf\"\n",
    );
    // The first command makes the instance's key, the next two are pieces.
    world
        .cloud
        .cli(&["fault", "SendCommand", "--after", "2", "--lose-answer"]);
    let run = world.base();
    run.expect_code(0);
    let root = tempfile::tempdir().unwrap();
    let mounted = world.mount_image(&run, root.path());
    let copied = std::fs::read_to_string(mounted.root.join("etc/amibake/pool.conf")).unwrap();
    assert!(
        copied == pool_conf(),
        "the file is not whole: {} bytes",
        copied.len()
    );
    drop(mounted);
    world.cloud.assert_nothing_temporary();
}

/// A bake's booted test over SSM: its test instance has no key pair and no open port, and
/// a failing test removes the image as over SSH.
#[test]
fn a_bakes_booted_test_over_ssm_passes_and_fails_as_over_ssh() {
    let _module = crate::util::module_turn(module_path!());
    let world = World::with_profiles();
    // `--force`: the test is no part of the image's fingerprint, and an image that passed
    // would be reused.
    let bake_with_test = |exit: u32, profile: &str, more: &[&str]| {
        let vendor = world.vendor_ami();
        let text = format!(
            "[bake]\nname = \"shop-${{commit}}-${{timestamp}}\"\nbase_ami = \"{vendor}\"\n\
             dest = \"/srv/shop\"\n\n\
             [bake.test_instance]\ninstance_type = \"t3.micro\"\ncommunicator = \"ssm\"\n\
             iam_instance_profile = \"{profile}\"\n\n\
             [[bake.test]]\nname = \"code in place\"\n\
             inline = [\"test \\\"$(cat /srv/shop/REVISION)\\\" = one\", \"echo test-exit-{exit}\", \"exit {exit}\"]\n"
        );
        std::fs::write(world.dir().join("shop.toml"), text).unwrap();
        let from = world.cloud.calls().len();
        let run = world.bake_shop(&[&["--backend", "direct", "--force"], more].concat());
        (run, world.cloud.calls_since(from))
    };

    // A test instance's profile IAM does not have: refused before anything is made, but
    // only where the run would launch it (not with --no-test).
    let (run, calls) = bake_with_test(0, "amibake-nowhere", &[]);
    run.expect_code(1);
    assert!(
        run.stderr().contains(
            "bake.test_instance.iam_instance_profile = \"amibake-nowhere\": IAM has no instance profile"
        ),
        "{}",
        run.dump()
    );
    assert!(
        !actions(&calls).iter().any(|a| a.starts_with("Create")),
        "{calls:?}"
    );
    let (run, calls) = bake_with_test(0, "amibake-nowhere", &["--no-test"]);
    run.expect_code(0);
    assert!(
        !actions(&calls).contains(&"GetInstanceProfile"),
        "{calls:?}"
    );

    let (run, calls) = bake_with_test(0, PROFILE, &[]);
    run.expect_code(0);
    let called = actions(&calls);
    assert!(run.stderr().contains("test-exit-0"), "{}", run.dump());
    for never in ["CreateKeyPair", "AuthorizeSecurityGroupIngress"] {
        assert!(!called.contains(&never), "{never} was called: {called:?}");
    }
    assert!(called.contains(&"SendCommand"), "{called:?}");
    world.cloud.assert_nothing_temporary();

    let (run, _) = bake_with_test(5, PROFILE, &[]);
    run.expect_code(1);
    assert!(
        run.stderr().contains("code in place") && run.stderr().contains("test-exit-5"),
        "{}",
        run.dump()
    );
    // Only the passing bakes' images are left (--no-test's, and the first tested one):
    // the failed one went with its snapshot.
    assert_eq!(world.cloud.left().images.len(), 2, "{}", run.dump());
    world.cloud.assert_nothing_temporary();
}
