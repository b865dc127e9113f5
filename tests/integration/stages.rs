//! A bake as a pipeline runs it, through the real binary on the local cloud: `pre` commands
//! on this machine before anything is made, the install stage (provisioners) in the image,
//! `post` commands once the image is registered and published; normal and destructive
//! variants of one commit.

use std::os::unix::fs::PermissionsExt;

use crate::util::localcloud::PARTITION_1_OFFSET;

/// This module's story.
struct Stages;
type World = crate::util::World<Stages>;

impl World {
    /// An executable script beside the template.
    fn script(&self, name: &str, body: &str) {
        let path = self.dir().join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// A [bake] table with `extra` (stage and provisioner tables) after it.
    fn template(&self, extra: &str) {
        let vendor = self.vendor_ami();
        let text = format!(
            "[bake]\nname = \"shop-${{commit}}-${{timestamp}}\"\nbase_ami = \"{vendor}\"\n\
             dest = \"/srv/shop\"\n\n{extra}"
        );
        std::fs::write(self.dir().join("shop.toml"), text).unwrap();
    }

    fn images(&self) -> Vec<serde_json::Value> {
        self.cloud.ls()["images"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["name"].as_str().unwrap_or_default().starts_with("shop-"))
            .cloned()
            .collect()
    }
}

#[test]
fn pre_and_post_commands_run_around_the_bake_with_its_facts() {
    let _module = crate::util::module_turn(module_path!());
    let world = World::new("quick");
    world.script(
        "check.sh",
        "echo \"checking $AMIBAKE_COMMIT on $AMIBAKE_BASE_AMI\"\n\
         echo \"$AMIBAKE_STAGE $AMIBAKE_COMMIT $AMIBAKE_BASE_AMI $AMIBAKE_TARBALL_SHA256 $AMIBAKE_VARIANT\" > pre.out\n\
         exit \"${PRE_EXIT:-0}\"",
    );
    world.script(
        "announce.sh",
        "echo \"$AMIBAKE_STAGE $AMIBAKE_AMI_ID $AMIBAKE_REGION\" > post.out\n\
         cp \"$AMIBAKE_MANIFEST\" post-manifest.json\nexit \"$1\"",
    );
    let stages = |pre_exit: u32, post_exit: u32| {
        format!(
            "[[bake.pre]]\nname = \"check\"\ncommand = [\"./check.sh\"]\n\
             env = {{ PRE_EXIT = \"{pre_exit}\" }}\n\n\
             [[bake.post]]\ncommand = [\"./announce.sh\", \"{post_exit}\"]\n"
        )
    };

    // A failing pre command stops the run before anything is made.
    world.template(&stages(3, 0));
    let before = world.cloud.calls().len();
    let run = world.bake_shop(&[]);
    run.expect_failure("pre command `check` exited with status 3", None);
    assert!(
        run.stderr().contains("checking c0ffee1 on ami-"),
        "its output is the run's\n{}",
        run.dump()
    );
    assert_eq!(
        world.cloud.mutating_calls_since(before),
        Vec::<String>::new()
    );
    assert!(world.images().is_empty());
    assert!(!world.dir().join("post.out").exists());
    let pre = std::fs::read_to_string(world.dir().join("pre.out")).unwrap();
    let facts: Vec<&str> = pre.split_whitespace().collect();
    assert_eq!(facts[0], "pre");
    assert_eq!(facts[1], "c0ffee1");
    assert!(facts[2].starts_with("ami-"), "{pre}");
    let tarball = std::fs::read(world.dir().join("app.tar.gz")).unwrap();
    assert_eq!(
        facts[3],
        format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(&tarball)),
        "the tarball's digest: {pre}"
    );
    assert_eq!(facts[4], "normal");

    // Both pass: post sees the image and the manifest.
    world.template(&stages(0, 0));
    let run = world.bake_shop(&[]);
    run.expect_code(0);
    let m = run.json();
    let ami = m["ami_id"].as_str().unwrap();
    let post = std::fs::read_to_string(world.dir().join("post.out")).unwrap();
    assert_eq!(post.trim(), format!("post {ami} us-east-1"));
    let seen: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(world.dir().join("post-manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(seen["ami_id"], ami);
    assert_eq!(seen["commit"], "c0ffee1");

    // A failing post command fails the run, and says the image is kept, as it is.
    world.template(&stages(0, 4));
    let run = world.bake_shop(&["--force"]);
    run.expect_failure("post command `./announce.sh 4` exited with status 4", None);
    let kept = run.json();
    let kept_ami = kept["ami_id"].as_str().unwrap();
    assert!(
        run.stderr()
            .contains(&format!("{kept_ami} exists and is kept")),
        "{}",
        run.dump()
    );
    assert!(
        world
            .images()
            .iter()
            .any(|i| i["id"] == kept_ami && i["state"] == "available"),
        "{:?}",
        world.images()
    );

    // A post command that hangs is cut at its timeout, with what it started.
    world.template(
        "[[bake.post]]\ncommand = [\"sh\", \"-c\", \"sleep 300 & echo $! > sleeper.pid; wait\"]\n\
         timeout_seconds = 1\n",
    );
    let run = world.bake_shop(&[]);
    run.expect_failure("ran past its 1 s timeout", None);
    let pid = std::fs::read_to_string(world.dir().join("sleeper.pid")).unwrap();
    // Killed, it may stay a zombie for a moment until init reaps it.
    let running = || {
        std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).is_ok_and(|stat| {
            !stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
    };
    assert!(!running(), "the command's children are gone too");

    // A program that does not exist is named: by the template's check when a path names
    // it, by the run when the run's PATH has none of that name.
    world.template("[[bake.pre]]\ncommand = [\"./no-such-check\"]\n");
    let run = world.bake_shop(&[]);
    run.expect_refused("`./no-such-check` does not exist");
    world.template("[[bake.pre]]\ncommand = [\"amibake-no-such-check\"]\n");
    let run = world.bake_shop(&[]);
    run.expect_failure("could not run", None);
    assert!(
        run.stderr().contains("amibake-no-such-check"),
        "{}",
        run.dump()
    );
}

#[test]
fn normal_and_destructive_bakes_of_one_commit_are_two_images() {
    let _module = crate::util::module_turn(module_path!());
    let world = World::new("quick");
    world.template(
        "[[bake.provisioner]]\ninline = [\"echo kept > /etc/variant-normal\"]\nwhen = \"normal\"\n\n\
         [[bake.provisioner]]\ninline = [\"echo reset > /etc/variant-destructive\"]\nwhen = \"destructive\"\n\n\
         [[bake.provisioner]]\ninline = [\"echo both > /etc/variant-any\"]\n",
    );
    let normal = world.bake_shop(&[]);
    normal.expect_code(0);
    let destructive = world.bake_shop(&["--destructive"]);
    destructive.expect_code(0);
    let (n, d) = (normal.json(), destructive.json());
    assert_ne!(n["ami_id"], d["ami_id"], "{}", destructive.dump());
    assert_ne!(n["fingerprint"], d["fingerprint"]);
    assert_eq!(n["variant"], "normal");
    assert_eq!(d["variant"], "destructive");
    for (m, variant, absent) in [(&n, "normal", "destructive"), (&d, "destructive", "normal")] {
        let snapshot = m["snapshot_id"].as_str().unwrap();
        let image = world
            .cloud
            .mount_snapshot(snapshot, world.dir(), PARTITION_1_OFFSET);
        let etc = image.root.join("etc");
        assert!(etc.join(format!("variant-{variant}")).exists(), "{variant}");
        assert!(!etc.join(format!("variant-{absent}")).exists(), "{variant}");
        assert_eq!(
            std::fs::read_to_string(etc.join("variant-any")).unwrap(),
            "both\n"
        );
        let image = world
            .runtime
            .block_on(
                world
                    .clients
                    .ec2
                    .describe_images()
                    .image_ids(m["ami_id"].as_str().unwrap())
                    .send(),
            )
            .unwrap()
            .images()[0]
            .clone();
        assert_eq!(
            crate::util::tag(image.tags(), "amibake:variant"),
            Some(variant),
            "{variant}: {:?}",
            image.tags()
        );
    }
    // Each variant finds its own image again.
    let again = world.bake_shop(&["--destructive"]);
    again.expect_code(0);
    assert_eq!(again.json()["ami_id"], d["ami_id"]);
    assert_eq!(again.json()["reused"], true);
}

/// Ctrl-C, or a CI system's SIGTERM, while a pre command runs: the command is stopped,
/// nothing was made, and the run exits as a signalled one does.
#[test]
fn a_signal_during_a_pre_command_stops_it_and_exits_as_signalled() {
    let _module = crate::util::module_turn(module_path!());
    let world = World::new("quick");
    world.script("wait.sh", "echo waiting\nexec sleep 300");
    // Its own timeout only bounds this test, should the signal never come.
    world.template(
        "[[bake.pre]]\nname = \"wait\"\ncommand = [\"./wait.sh\"]\ntimeout_seconds = 120\n",
    );
    for (signal, code) in [("-INT", 130), ("-TERM", 143)] {
        let before = world.cloud.calls().len();
        let mut command = world.cloud.amibake(world.dir());
        command.args(crate::util::shop_bake_args(&[]));
        let (run, _) = crate::util::signal_when(
            command,
            signal,
            &format!("amibake bake, {signal} during a pre command"),
            |line| line.contains("\"source\":\"wait\"") && line.contains("\"line\":\"waiting\""),
        );
        run.expect_code(code);
        assert!(
            run.stderr()
                .contains("error: pre command `wait` was interrupted"),
            "{}",
            run.dump()
        );
        assert_eq!(
            world.cloud.mutating_calls_since(before),
            Vec::<String>::new()
        );
        assert!(world.images().is_empty());
    }
}
