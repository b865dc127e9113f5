//! A bake delivered beyond its region through the real binary on the local cloud: copies in
//! two more regions (one under its own KMS key), launch permission for another account, a
//! deprecation time and IMDSv2-only on every image, each region's channel naming its own
//! copy; a copy that fails takes every copy and publication with it.

use crate::util::localcloud::LocalCloud;
use crate::util::tarballs::write_revision_tarball;

const CHANNEL: &str = "/amibake/shop/deploy";
const SHARED_WITH: &str = "210987654321";
const COPY_REGIONS: [&str; 2] = ["eu-west-1", "us-west-2"];

/// This module's story.
struct Distribution;
type World = crate::util::World<Distribution>;

impl World {
    /// A template delivering to `regions`, with `extra` lines in its [bake] table.
    fn template(&self, regions: &[&str], extra: &str) {
        let vendor = self.vendor_ami();
        let regions: Vec<String> = regions.iter().map(|r| format!("\"{r}\"")).collect();
        let text = format!(
            "[bake]\nname = \"shop-${{commit}}-${{timestamp}}\"\nbase_ami = \"{vendor}\"\n\
             dest = \"/srv/shop\"\npublish_ssm = \"{CHANNEL}\"\npublish_label = \"prod\"\n\
             copy_to_regions = [{}]\nshare_with_accounts = [\"{SHARED_WITH}\"]\n\
             deprecate_after = \"90d\"\nimds_support = \"v2.0\"\n{extra}",
            regions.join(", ")
        );
        std::fs::write(self.dir().join("shop.toml"), text).unwrap();
    }

    fn image(&self, clients: &amibake::aws::Clients, id: &str) -> aws_sdk_ec2::types::Image {
        self.runtime
            .block_on(clients.ec2.describe_images().image_ids(id).send())
            .unwrap()
            .images()[0]
            .clone()
    }

    /// `name` in `clients`' region: (value, version), or None when there is no parameter.
    fn parameter(&self, clients: &amibake::aws::Clients, name: &str) -> Option<(String, i64)> {
        let out = self
            .runtime
            .block_on(clients.ssm.get_parameter().name(name).send())
            .ok()?;
        let p = out.parameter()?;
        Some((p.value()?.to_string(), p.version()))
    }

    /// Images and snapshots this test's bakes made, in every region.
    fn made(&self) -> Vec<String> {
        let ls = self.cloud.ls();
        let mut made: Vec<String> = ls["images"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["name"].as_str().unwrap_or_default().starts_with("shop-"))
            .map(|i| i["id"].as_str().unwrap().to_string())
            .collect();
        made.extend(
            ls["snapshots"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|s| s["tags"].get("amibake:build-id").is_some())
                .map(|s| s["id"].as_str().unwrap().to_string()),
        );
        for (region, held) in ls["other_regions"].as_object().unwrap() {
            for kind in ["images", "snapshots"] {
                for item in held[kind].as_array().unwrap() {
                    made.push(format!("{region}/{}", item["id"].as_str().unwrap()));
                }
            }
        }
        made
    }

    /// Whether two snapshots hold the same bytes, read from the local cloud's data plane.
    fn same_bytes(&self, a: &str, b: &str) -> bool {
        let (fa, fb) = (self.dir().join("a.img"), self.dir().join("b.img"));
        for (snapshot, file) in [(a, &fa), (b, &fb)] {
            let out = self
                .cloud
                .cli(&["export-snapshot", snapshot, file.to_str().unwrap()]);
            assert!(out.status.success(), "{out:?}");
        }
        let same = std::process::Command::new("cmp")
            .args(["--silent"])
            .arg(&fa)
            .arg(&fb)
            .status()
            .unwrap()
            .success();
        std::fs::remove_file(fa).unwrap();
        std::fs::remove_file(fb).unwrap();
        same
    }
}

/// The image as the template asked for it: IMDSv2 only, deprecated in about 90 days,
/// launchable by the other account, tagged by this build and finished.
fn assert_delivered(world: &World, clients: &amibake::aws::Clients, id: &str, build_id: &str) {
    let image = world.image(clients, id);
    let region = &clients.region;
    assert_eq!(image.state().unwrap().as_str(), "available", "{region}");
    assert_eq!(
        image.imds_support().map(|s| s.as_str()),
        Some("v2.0"),
        "{region}"
    );
    let deprecation = aws_smithy_types::DateTime::from_str(
        image.deprecation_time().expect("a deprecation time"),
        aws_smithy_types::date_time::Format::DateTime,
    )
    .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let in_days = (deprecation.secs() - now) as f64 / 86400.0;
    assert!((89.9..=90.1).contains(&in_days), "{region}: {in_days} days");
    let tag = |key: &str| crate::util::tag(image.tags(), key).map(str::to_string);
    assert_eq!(
        tag("amibake:build-id").as_deref(),
        Some(build_id),
        "{region}"
    );
    assert_eq!(
        tag("amibake:commit").as_deref(),
        Some("c0ffee1"),
        "{region}"
    );
    assert_eq!(
        tag("amibake:state").as_deref(),
        Some("finished"),
        "{region}"
    );
    assert!(tag("amibake:fingerprint").is_some(), "{region}");
    let permissions = world
        .runtime
        .block_on(
            clients
                .ec2
                .describe_image_attribute()
                .image_id(id)
                .attribute(aws_sdk_ec2::types::ImageAttributeName::LaunchPermission)
                .send(),
        )
        .unwrap();
    assert!(
        permissions
            .launch_permissions()
            .iter()
            .any(|p| p.user_id() == Some(SHARED_WITH)),
        "{region}: {permissions:?}"
    );
}

#[test]
fn a_bake_is_copied_shared_deprecated_and_published_in_every_region() {
    let _module = crate::util::module_turn(module_path!());
    let world = World::new("quick");
    let west = world
        .runtime
        .block_on(world.cloud.clients_in(Some(COPY_REGIONS[0])));
    let oregon = world
        .runtime
        .block_on(world.cloud.clients_in(Some(COPY_REGIONS[1])));
    let west_key = world.runtime.block_on(LocalCloud::new_kms_key(&west));
    world.template(
        &COPY_REGIONS,
        &format!("kms_key_ids = {{ \"eu-west-1\" = \"{west_key}\" }}\n"),
    );

    let run = world.bake_shop_at("c0ffee1");
    run.expect_code(0);
    let m: serde_json::Value = run.json();
    let build_id = m["build_id"].as_str().unwrap();
    let source = m["ami_id"].as_str().unwrap();
    let source_snapshot = m["snapshot_id"].as_str().unwrap();
    assert_delivered(&world, &world.clients, source, build_id);
    assert_eq!(
        world.parameter(&world.clients, CHANNEL).unwrap().0,
        source,
        "{}",
        run.dump()
    );

    let copies = m["copies"].as_array().unwrap();
    assert_eq!(copies.len(), 2, "{m}");
    for (copy, (region, clients)) in copies
        .iter()
        .zip([(COPY_REGIONS[0], &west), (COPY_REGIONS[1], &oregon)])
    {
        assert_eq!(copy["region"], region);
        assert_eq!(copy["reused"], false);
        let id = copy["ami_id"].as_str().unwrap();
        assert_delivered(&world, clients, id, build_id);
        // Each region's channel, and its label, name that region's copy.
        let (value, _) = world.parameter(clients, CHANNEL).expect("a channel there");
        assert_eq!(value, id, "{region}");
        let (labelled, _) = world
            .parameter(clients, &format!("{CHANNEL}:prod"))
            .unwrap();
        assert_eq!(labelled, id, "{region}");
        assert_eq!(copy["ssm_version"], 1, "{region}");
        // The same bytes as the image baked here, under the region's own key where named.
        let snapshot = copy["snapshot_ids"][0].as_str().unwrap();
        assert!(world.same_bytes(source_snapshot, snapshot), "{region}");
        let described = world
            .runtime
            .block_on(
                clients
                    .ec2
                    .describe_snapshots()
                    .snapshot_ids(snapshot)
                    .send(),
            )
            .unwrap()
            .snapshots()[0]
            .clone();
        assert_eq!(
            crate::util::tag(described.tags(), "amibake:state"),
            Some("finished"),
            "{region}: {described:?}"
        );
        if region == "eu-west-1" {
            assert_eq!(described.kms_key_id(), Some(west_key.as_str()));
            assert_eq!(described.encrypted(), Some(true));
        }
    }

    // The same commit again: the image and its copies are found, nothing new is made and
    // no channel gets another version.
    let again = world.bake_shop_at("c0ffee1");
    again.expect_code(0);
    let r: serde_json::Value = again.json();
    assert_eq!(r["reused"], true, "{}", again.dump());
    assert_eq!(r["ami_id"], m["ami_id"]);
    for (copy, before) in r["copies"].as_array().unwrap().iter().zip(copies) {
        assert_eq!(copy["ami_id"], before["ami_id"], "{r}");
        assert_eq!(copy["reused"], true);
    }
    for clients in [&world.clients, &west, &oregon] {
        assert_eq!(
            world.parameter(clients, CHANNEL).unwrap().1,
            1,
            "{}",
            clients.region
        );
    }
    assert_eq!(world.made().len(), 6, "three images and three snapshots");
}

#[test]
fn a_copy_that_fails_takes_every_copy_and_publication_with_it() {
    let _module = crate::util::module_turn(module_path!());
    let world = World::new("quick");
    world.template(&COPY_REGIONS, "");

    // The second copy call fails: the first copy, the image and its snapshot all go.
    let cause = world.cloud.fail_once("ec2", "CopyImage", 1);
    let run = world.bake_shop_at("c0ffee1");
    run.expect_failure(&cause, Some("distribute"));
    assert!(
        run.stderr()
            .contains("deregister copy and delete its snapshots"),
        "the copy made before the failure is undone\n{}",
        run.dump()
    );
    assert_eq!(world.made(), Vec::<String>::new(), "{}", run.dump());
    for region in ["us-east-1", COPY_REGIONS[0], COPY_REGIONS[1]] {
        let clients = world.runtime.block_on(world.cloud.clients_in(Some(region)));
        assert_eq!(world.parameter(&clients, CHANNEL), None, "{region}");
    }

    // A copy whose answer was lost is carried out once: the retry names the same copy.
    world.cloud.cli(&["fault", "CopyImage", "--lose-answer"]);
    let run = world.bake_shop_at("c0ffee1");
    run.expect_code(0);
    let ls = world.cloud.ls();
    for region in COPY_REGIONS {
        let images = ls["other_regions"][region]["images"].as_array().unwrap();
        assert_eq!(images.len(), 1, "{region}: {images:?}\n{}", run.dump());
    }

    // The calls that deliver, each carried out with its answer lost: the run goes on, and
    // nothing is made twice (one image per region, one new channel version per region).
    let regions: Vec<amibake::aws::Clients> = ["us-east-1", COPY_REGIONS[0], COPY_REGIONS[1]]
        .into_iter()
        .map(|r| world.runtime.block_on(world.cloud.clients_in(Some(r))))
        .collect();
    for (n, action) in [
        "ModifyImageAttribute",
        "CreateTags",
        "PutParameter",
        "LabelParameterVersion",
    ]
    .into_iter()
    .enumerate()
    {
        let made_before = world.made().len();
        let versions: Vec<i64> = regions
            .iter()
            .map(|c| world.parameter(c, CHANNEL).map_or(0, |p| p.1))
            .collect();
        write_revision_tarball(&world.dir().join("app.tar.gz"), &format!("lost {n}\n"));
        world.cloud.cli(&["fault", action, "--lose-answer"]);
        let run = world.bake_shop_at(&format!("10s7a{n}"));
        run.expect_code(0);
        assert_eq!(
            world.made().len(),
            made_before + 6,
            "{action}: three images and three snapshots\n{}",
            run.dump()
        );
        for (clients, before) in regions.iter().zip(versions) {
            let (_, after) = world.parameter(clients, CHANNEL).unwrap();
            assert_eq!(
                after,
                before + 1,
                "{action}: {}\n{}",
                clients.region,
                run.dump()
            );
        }
    }

    // Refused before anything is made: a copy into the region the bake runs in, and a
    // copy region's key that region does not have.
    let east_key = world
        .runtime
        .block_on(LocalCloud::new_kms_key(&world.clients));
    for (regions, extra, wanted) in [
        (
            vec!["us-east-1"],
            String::new(),
            "bake.copy_to_regions lists us-east-1, the region this run builds in",
        ),
        (
            vec![COPY_REGIONS[0]],
            format!("kms_key_ids = {{ \"eu-west-1\" = \"{east_key}\" }}\n"),
            "bake.kms_key_ids.eu-west-1",
        ),
    ] {
        world.template(&regions, &extra);
        let before = world.cloud.calls().len();
        let run = world.bake_shop_at("c0ffee2");
        assert_ne!(run.code(), 0, "{}", run.dump());
        assert!(run.stderr().contains(wanted), "{}", run.dump());
        assert_eq!(
            world.cloud.mutating_calls_since(before),
            Vec::<String>::new()
        );
    }
}
