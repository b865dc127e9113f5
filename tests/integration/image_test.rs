//! The booted test of a new image, through the real binary on the local cloud: each bake
//! boots an instance of its image (its own key pair and security group, as a base build's)
//! and runs the template's `[[bake.test]]` entries over SSH before anything is published.
//! A test that fails or hangs leaves no image, snapshot, instance, key pair or group, and
//! the channel as it was; one that passes publishes the image.

use crate::util::Run;

const CHANNEL: &str = "/amibake/shop/deploy";

/// This module's story.
struct ImageTest;
type World = crate::util::World<ImageTest>;

impl World {
    /// A bake of the vendor image that installs a health check exiting with `health_exit`,
    /// tested by running it; `extra` adds tables after it.
    fn template(&self, health_exit: u32, extra: &str) {
        let vendor = self.vendor_ami();
        let text = format!(
            r#"[bake]
name = "shop-${{commit}}-${{timestamp}}"
base_ami = "{vendor}"
dest = "/srv/shop"
publish_ssm = "{CHANNEL}"

[bake.test_instance]
instance_type = "t3.micro"
ssh_username = "admin"

[[bake.provisioner]]
name = "health check"
inline = [
  "printf '#!/bin/sh\necho shop-health: exit {health_exit}\nexit {health_exit}\n' > /usr/local/bin/shop-health",
  "chmod 755 /usr/local/bin/shop-health",
]

[[bake.test]]
name = "code in place"
inline = ["test \"$(cat /srv/shop/REVISION)\" = one", "echo \"testing $AMIBAKE_AMI_ID of $AMIBAKE_COMMIT on $AMIBAKE_INSTANCE_ID\""]

[[bake.test]]
name = "health"
inline = ["/usr/local/bin/shop-health"]

{extra}"#
        );
        std::fs::write(self.dir().join("shop.toml"), text).unwrap();
    }

    fn bake(&self, extra: &[&str]) -> Run {
        self.bake_shop(&[&["--backend", "direct"], extra].concat())
    }

    fn images(&self) -> Vec<String> {
        self.cloud.ls()["images"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["name"].as_str().unwrap_or_default().starts_with("shop-"))
            .map(|i| i["id"].as_str().unwrap().to_string())
            .collect()
    }

    fn snapshots(&self) -> usize {
        self.cloud.ls()["snapshots"].as_array().unwrap().len()
    }

    /// The images the runs since call number `from` launched instances of.
    fn launched_since(&self, from: usize) -> Vec<String> {
        self.cloud.calls()[from..]
            .iter()
            .filter(|c| c["action"] == "RunInstances" && c["code"] == "OK")
            .map(|c| c["ids"]["ImageId"].as_str().unwrap().to_string())
            .collect()
    }

    fn channel(&self) -> Option<String> {
        let out = self
            .runtime
            .block_on(self.clients.ssm.get_parameter().name(CHANNEL).send())
            .ok()?;
        out.parameter()?.value().map(str::to_string)
    }
}

#[test]
fn an_image_is_published_only_once_an_instance_of_it_passes_its_tests() {
    let _module = crate::util::module_turn(module_path!());
    let world = World::new("quick");

    // Passing: the image is booted, tested with the run's facts, then published.
    world.template(0, "");
    let from = world.cloud.calls().len();
    let run = world.bake(&[]);
    run.expect_code(0);
    let m = run.json();
    let ami = m["ami_id"].as_str().unwrap().to_string();
    assert_eq!(
        world.launched_since(from),
        vec![ami.clone()],
        "{}",
        run.dump()
    );
    assert!(
        run.stderr()
            .contains(&format!("testing {ami} of c0ffee1 on i-")),
        "the test ran with the run's facts\n{}",
        run.dump()
    );
    assert!(
        run.stderr()
            .contains(&format!("{ami} passed 2 test(s) on i-")),
        "{}",
        run.dump()
    );
    assert!(m["step_seconds"]["test image"].as_f64().is_some(), "{m}");
    assert_eq!(world.channel(), Some(ami.clone()));
    world.cloud.left().assert_nothing_temporary(&run.dump());
    let published = world.images();
    let snapshots = world.snapshots();

    // Failing: the service the bake installs does not come up on the booted image.
    world.template(3, "");
    let from = world.cloud.calls().len();
    let run = world.bake(&[]);
    run.expect_failure("failed its test on i-", Some("test image"));
    for expected in [
        "test `health`: `/usr/local/bin/shop-health` exited with 3",
        "shop-health: exit 3",
    ] {
        assert!(
            run.stderr().contains(expected),
            "{expected}\n{}",
            run.dump()
        );
    }
    let launched = world.launched_since(from);
    assert_eq!(launched.len(), 1, "{}", run.dump());
    assert!(
        !world.images().contains(&launched[0]),
        "the image that failed is deregistered\n{}",
        run.dump()
    );
    assert_eq!(world.images(), published, "only the first image remains");
    assert_eq!(world.snapshots(), snapshots, "its snapshot is deleted too");
    assert_eq!(world.channel(), Some(ami.clone()), "nothing was published");
    world.cloud.left().assert_nothing_temporary(&run.dump());

    // --no-test: the same failing image is not booted, and is published.
    let from = world.cloud.calls().len();
    let run = world.bake(&["--no-test"]);
    run.expect_code(0);
    assert!(world.launched_since(from).is_empty(), "{}", run.dump());
    assert!(
        run.stderr().contains("--no-test: 2 test(s) skipped"),
        "{}",
        run.dump()
    );
    let untested = run.json()["ami_id"].as_str().unwrap().to_string();
    assert_eq!(world.channel(), Some(untested.clone()));
    world.cloud.left().assert_nothing_temporary(&run.dump());

    // The first image again (same fingerprint): it passed its tests, so it is reused and
    // published without a boot.
    world.template(0, "");
    let from = world.cloud.calls().len();
    let run = world.bake(&[]);
    run.expect_code(0);
    let reused = run.json();
    assert_eq!(reused["ami_id"], ami.as_str());
    assert_eq!(reused["reused"], true);
    assert!(world.launched_since(from).is_empty(), "{}", run.dump());
    assert_eq!(world.channel(), Some(ami.clone()));

    // The image made with --no-test, found again without it: it is booted and tested
    // before it could be published, fails, and the channel stays.
    world.template(3, "");
    let from = world.cloud.calls().len();
    let run = world.bake(&[]);
    run.expect_failure("failed its test on i-", Some("test image"));
    assert_eq!(
        world.launched_since(from),
        vec![untested.clone()],
        "{}",
        run.dump()
    );
    assert!(
        world.images().contains(&untested),
        "an earlier run's image is not this run's to remove"
    );
    assert_eq!(world.channel(), Some(ami.clone()));
    world.cloud.left().assert_nothing_temporary(&run.dump());
}

#[test]
fn a_test_that_hangs_is_cut_by_its_timeout_and_leaves_nothing() {
    let _module = crate::util::module_turn(module_path!());
    let world = World::new("quick");
    world.template(
        0,
        "[[bake.test]]\nname = \"warm-up\"\ntimeout_seconds = 2\ninline = [\"echo waiting for the cache; sleep 600\"]\n",
    );
    let images = world.images();
    let snapshots = world.snapshots();
    let run = world.bake(&[]);
    run.expect_failure(
        "test `warm-up`: `echo waiting for the cache; sleep 600` was still running after 2s (`timeout_seconds`) and was stopped",
        Some("test image"),
    );
    assert!(
        run.stderr().contains("waiting for the cache"),
        "{}",
        run.dump()
    );
    assert_eq!(world.images(), images);
    assert_eq!(world.snapshots(), snapshots);
    assert_eq!(world.channel(), None, "nothing was published");
    world.cloud.left().assert_nothing_temporary(&run.dump());
}
