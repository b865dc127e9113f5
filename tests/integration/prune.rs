//! `amibake prune` through the real binary on the local cloud: ten bakes, of which only
//! what nothing uses goes, and a dry run that changes nothing.

use std::collections::BTreeSet;

use crate::util::tarballs::write_revision_tarball;

const CHANNEL: &str = "/amibake/shop/deploy";
/// A channel images reach only by `promote`.
const PROMOTED: &str = "/amibake/shop/live";

/// This module's story: bakes of one template, published to `CHANNEL`, to prune.
struct Prune;
type World = crate::util::World<Prune>;

impl World {
    /// A bake of shop.toml at `commit`, its tarball's REVISION the commit: its image and
    /// snapshot.
    fn bake(&self, commit: &str) -> (String, String) {
        write_revision_tarball(&self.dir().join("app.tar.gz"), &format!("{commit}\n"));
        let run = self.bake_shop_at(commit);
        run.expect_code(0);
        let manifest: serde_json::Value = run.json();
        (
            manifest["ami_id"].as_str().unwrap().to_string(),
            manifest["snapshot_id"].as_str().unwrap().to_string(),
        )
    }

    /// A story whose shop.toml bakes the vendor image, published to `CHANNEL`, baked
    /// `count` times: the vendor image, and each bake's image and snapshot, oldest first.
    fn with_shop_bakes(count: usize) -> (World, String, Vec<(String, String)>) {
        let world = World::new("quick");
        let vendor = world.vendor_ami();
        std::fs::write(
            world.dir().join("shop.toml"),
            format!(
                "[bake]\nname = \"shop-${{commit}}-${{timestamp}}\"\nbase_ami = \"{vendor}\"\n\
                 dest = \"/srv/shop\"\npublish_ssm = \"{CHANNEL}\"\n"
            ),
        )
        .unwrap();
        let baked = (1..=count)
            .map(|n| world.bake(&format!("c0mm1t{n:02}")))
            .collect();
        (world, vendor, baked)
    }

    /// The account's images and every snapshot of the cloud, by id.
    fn what_is_left(&self) -> (BTreeSet<String>, BTreeSet<String>) {
        let images = self
            .runtime
            .block_on(self.clients.ec2.describe_images().owners("self").send())
            .unwrap()
            .images()
            .iter()
            .map(|i| i.image_id().unwrap().to_string())
            .collect();
        let snapshots = self.cloud.ls()["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect();
        (images, snapshots)
    }
}

/// An instance of `image`, which uses it as long as it is not terminated.
async fn launch(clients: &amibake::aws::Clients, image: &str) {
    clients
        .ec2
        .run_instances()
        .image_id(image)
        .instance_type(aws_sdk_ec2::types::InstanceType::T3Small)
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .unwrap();
}

#[test]
fn prune_keeps_what_is_used_and_the_newest_and_removes_the_rest_with_their_snapshots() {
    let _module = crate::util::module_turn(module_path!());
    // Ten bakes, oldest first.
    let (world, vendor, baked) = World::with_shop_bakes(10);
    let (cloud, runtime, clients, dir) =
        (&world.cloud, &world.runtime, &world.clients, world.dir());
    let ami = |n: usize| baked[n - 1].0.clone();
    // What prune of shop.toml must not count: another template's bake, and a base image
    // whose name starts as the bakes' do.
    std::fs::write(
        dir.join("other.toml"),
        format!(
            "[bake]\nname = \"other-${{commit}}\"\nbase_ami = \"{vendor}\"\ndest = \"/srv/other\"\n"
        ),
    )
    .unwrap();
    let other = world.run_amibake(&[
        "bake",
        "other.toml",
        "--tarball",
        "app.tar.gz",
        "--commit",
        "0th3r1",
    ]);
    other.expect_code(0);
    let other: serde_json::Value = other.json();
    let other = other["ami_id"].as_str().unwrap().to_string();
    // What still uses some of them: a launch template the oldest, a label the fourth, an
    // instance the fifth.
    runtime.block_on(async {
        clients
            .ec2
            .create_launch_template()
            .launch_template_name("shop-web")
            .launch_template_data(
                aws_sdk_ec2::types::RequestLaunchTemplateData::builder()
                    .image_id(ami(1))
                    .instance_type(aws_sdk_ec2::types::InstanceType::T3Small)
                    .build(),
            )
            .send()
            .await
            .unwrap();
        launch(clients, &ami(5)).await;
    });
    world
        .run_amibake(&["promote", CHANNEL, &ami(4), "--label", "prod"])
        .expect_code(0);
    let base_like = runtime.block_on(async {
        let tag = |k: &str, v: &str| aws_sdk_ec2::types::Tag::builder().key(k).value(v).build();
        clients
            .ec2
            .register_image()
            .name("shop-base-20261203000000")
            .root_device_name("/dev/xvda")
            .block_device_mappings(
                aws_sdk_ec2::types::BlockDeviceMapping::builder()
                    .device_name("/dev/xvda")
                    .ebs(
                        aws_sdk_ec2::types::EbsBlockDevice::builder()
                            .snapshot_id(&baked[0].1)
                            .build(),
                    )
                    .build(),
            )
            .tag_specifications(
                aws_sdk_ec2::types::TagSpecification::builder()
                    .resource_type(aws_sdk_ec2::types::ResourceType::Image)
                    .tags(tag("amibake:build-id", "ab-20261203000000-00000000"))
                    .tags(tag("amibake:source-ami", &vendor))
                    .build(),
            )
            .send()
            .await
            .unwrap()
            .image_id()
            .unwrap()
            .to_string()
    });

    // The dry run says what it would do and does nothing.
    let calls_before = cloud.calls().len();
    let dry = world.run_amibake(&["prune", "shop.toml", "--keep", "2"]);
    dry.expect_code(0);
    assert_eq!(
        cloud.mutating_calls_since(calls_before),
        Vec::<String>::new()
    );
    let judged: serde_json::Value = dry.json();
    crate::util::schema::assert_valid("prune", &judged);
    assert_eq!(judged["apply"], false);
    let images = judged["images"].as_array().unwrap();
    assert_eq!(images.len(), 10, "only this template's images: {judged}");
    for stranger in [&other, &base_like] {
        assert!(
            !images.iter().any(|i| i["ami_id"] == stranger.as_str()),
            "{judged}"
        );
    }
    let decided = |decision: &str| -> BTreeSet<String> {
        images
            .iter()
            .filter(|i| i["decision"] == decision)
            .map(|i| i["ami_id"].as_str().unwrap().to_string())
            .collect()
    };
    let kept: BTreeSet<String> = [1, 4, 5, 9, 10].into_iter().map(ami).collect();
    let removed: BTreeSet<String> = [2, 3, 6, 7, 8].into_iter().map(ami).collect();
    assert_eq!(decided("keep"), kept);
    assert_eq!(decided("remove"), removed);
    let reasons = |n: usize| -> String {
        let image = images
            .iter()
            .find(|i| i["ami_id"] == ami(n).as_str())
            .unwrap();
        image["reasons"].to_string()
    };
    assert!(
        reasons(1).contains("launch template shop-web")
            || reasons(1).contains("ec2:LaunchTemplate"),
        "{}",
        reasons(1)
    );
    assert!(reasons(4).contains("label `prod`"), "{}", reasons(4));
    assert!(reasons(5).contains("ec2:Instance"), "{}", reasons(5));
    assert!(reasons(10).contains("newest 2"), "{}", reasons(10));
    assert!(reasons(3).contains("nothing uses it"), "{}", reasons(3));
    let human = std::process::Command::new(env!("CARGO_BIN_EXE_amibake"))
        .current_dir(dir)
        .envs(cloud.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .args(["prune", "shop.toml", "--keep", "2"])
        .output()
        .unwrap();
    let human = String::from_utf8_lossy(&human.stdout).to_string();
    assert!(
        human.contains(&format!("would deregister {}", ami(3))),
        "{human}"
    );
    assert!(
        human.ends_with("dry run: 5 of 10 images would be deregistered; run again with --apply\n"),
        "{human}"
    );

    // Applied: exactly those go, with their snapshots; the rest stay whole.
    let applied = world.run_amibake(&["prune", "shop.toml", "--keep", "2", "--apply"]);
    applied.expect_code(0);
    crate::util::schema::assert_valid("prune", &applied.json());
    let (images, snapshots) = world.what_is_left();
    assert!(images.contains(&other) && images.contains(&base_like));
    for (n, (image, snapshot)) in baked.iter().enumerate() {
        let stays = kept.contains(image);
        assert_eq!(images.contains(image), stays, "image {} ({image})", n + 1);
        assert_eq!(
            snapshots.contains(snapshot),
            stays,
            "snapshot of {} ({snapshot})",
            n + 1
        );
    }

    // Disable and deprecate instead: with --keep 1 the ninth is no longer kept.
    let run = world.run_amibake(&["prune", "shop.toml", "--keep", "1", "--disable", "--apply"]);
    run.expect_code(0);
    let state = |id: &str| {
        runtime
            .block_on(
                clients
                    .ec2
                    .describe_images()
                    .image_ids(id)
                    .include_disabled(true)
                    .send(),
            )
            .unwrap()
            .images()[0]
            .clone()
    };
    assert_eq!(state(&ami(9)).state().unwrap().as_str(), "disabled");
    assert_eq!(state(&ami(10)).state().unwrap().as_str(), "available");
    world
        .run_amibake(&[
            "prune",
            "shop.toml",
            "--keep",
            "1",
            "--deprecate",
            "--apply",
        ])
        .expect_code(0);
    assert!(state(&ami(9)).deprecation_time().is_some());
    assert!(state(&ami(10)).deprecation_time().is_none());

    // Bad selections are refused before any call.
    world.run_amibake(&["prune", "--keep", "2"]).expect_code(2);
    world
        .run_amibake(&[
            "prune",
            "shop.toml",
            "--keep",
            "2",
            "--disable",
            "--deprecate",
        ])
        .expect_code(2);
    let short = world.run_amibake(&["prune", "--name-prefix", "s", "--keep", "2"]);
    short.expect_refused("`s` is too short");
}

/// `prune --name-prefix` alone, told no template and no channel: what keeps an image is found
/// all the same. Six bakes to a channel; the 1st named only by an old version of a launch
/// template (below the 20 newest that EC2's references look at), version 2 labelled `prod`,
/// an instance of the 3rd, the 5th shared with another account, the 6th the newest.
#[test]
fn prune_by_name_prefix_alone_removes_only_what_nothing_anywhere_uses() {
    let _module = crate::util::module_turn(module_path!());
    let (world, _, baked) = World::with_shop_bakes(6);
    let (cloud, runtime, clients) = (&world.cloud, &world.runtime, &world.clients);
    let ami = |n: usize| baked[n - 1].0.clone();
    runtime.block_on(async {
        let data = |image: String| {
            aws_sdk_ec2::types::RequestLaunchTemplateData::builder()
                .image_id(image)
                .instance_type(aws_sdk_ec2::types::InstanceType::T3Small)
                .build()
        };
        let template = clients
            .ec2
            .create_launch_template()
            .launch_template_name("shop-asg")
            .launch_template_data(data(ami(1)))
            .send()
            .await
            .unwrap();
        let template_id = template
            .launch_template()
            .unwrap()
            .launch_template_id()
            .unwrap()
            .to_string();
        for _ in 0..21 {
            clients
                .ec2
                .create_launch_template_version()
                .launch_template_id(&template_id)
                .launch_template_data(data(ami(6)))
                .send()
                .await
                .unwrap();
        }
        clients
            .ec2
            .modify_launch_template()
            .launch_template_id(&template_id)
            .default_version("22")
            .send()
            .await
            .unwrap();
        launch(clients, &ami(3)).await;
        clients
            .ec2
            .modify_image_attribute()
            .image_id(ami(5))
            .launch_permission(
                aws_sdk_ec2::types::LaunchPermissionModifications::builder()
                    .add(
                        aws_sdk_ec2::types::LaunchPermission::builder()
                            .user_id("111122223333")
                            .build(),
                    )
                    .build(),
            )
            .send()
            .await
            .unwrap();
    });
    world
        .run_amibake(&["promote", CHANNEL, &ami(2), "--label", "prod"])
        .expect_code(0);
    // Promoted into a channel of its own, which no template names: the image says so.
    world
        .run_amibake(&["promote", PROMOTED, &ami(1), "--label", "live"])
        .expect_code(0);

    let prune = ["prune", "--name-prefix", "shop-", "--keep", "1"];
    let calls_before = cloud.calls().len();
    let dry = world.run_amibake(&prune);
    dry.expect_code(0);
    assert_eq!(
        cloud.mutating_calls_since(calls_before),
        Vec::<String>::new()
    );
    let judged: serde_json::Value = dry.json();
    assert_eq!(
        judged["channels"],
        serde_json::json!([CHANNEL, PROMOTED]),
        "{judged}"
    );
    let images = judged["images"].as_array().unwrap();
    let reasons = |n: usize| -> String {
        let image = images
            .iter()
            .find(|i| i["ami_id"] == ami(n).as_str())
            .unwrap_or_else(|| panic!("image {n} judged: {judged}"));
        format!("{} {}", image["decision"], image["reasons"])
    };
    for (n, why) in [
        (1, "version 1 of launch template shop-asg"),
        (1, "label `live` of /amibake/shop/live (version 1)"),
        (2, "label `prod` of /amibake/shop/deploy (version 2)"),
        (3, "used by ec2:Instance"),
        (5, "shared with account 111122223333"),
        (6, "one of the newest 1 named shop-*"),
    ] {
        assert!(
            reasons(n).starts_with("\"keep\"") && reasons(n).contains(why),
            "image {n}: not kept for `{why}`: {}",
            reasons(n)
        );
    }
    assert!(reasons(4).starts_with("\"remove\""), "{}", reasons(4));

    // Shared images are judged like the others when asked.
    let including = world.run_amibake(&[&prune[..], &["--include-shared"]].concat());
    including.expect_code(0);
    let including: serde_json::Value = including.json();
    let fifth = including["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["ami_id"] == ami(5).as_str())
        .unwrap();
    assert_eq!(fifth["decision"], "remove", "{including}");

    let applied = world.run_amibake(&[&prune[..], &["--apply"]].concat());
    applied.expect_code(0);
    let (left, snapshots) = world.what_is_left();
    for (n, (image, snapshot)) in baked.iter().enumerate() {
        let stays = n + 1 != 4;
        assert_eq!(left.contains(image), stays, "image {} ({image})", n + 1);
        assert_eq!(snapshots.contains(snapshot), stays, "snapshot of {}", n + 1);
    }
}
