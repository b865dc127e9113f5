//! Deployment channels through the real binary on the local cloud: bakes publish to an SSM
//! parameter with a label; `history`, `promote` and `rollback` read and move it, and refuse
//! images that can no longer be launched or that amibake did not make.

use crate::util::tarballs::write_revision_tarball;
use crate::util::Run;

const CHANNEL: &str = "/amibake/shop/deploy";

/// This module's story: a channel a template publishes its bakes to.
struct Channels;
type Channel = crate::util::World<Channels>;

impl Channel {
    /// A story whose shop.toml publishes to `CHANNEL`, labelled `prod`.
    fn publishing() -> Channel {
        let ch = Channel::new("quick");
        let vendor = ch.vendor_ami();
        let template = format!(
            "[bake]\nname = \"shop-${{commit}}-${{timestamp}}\"\nbase_ami = \"{vendor}\"\n\
             dest = \"/srv/shop\"\npublish_ssm = \"{CHANNEL}\"\npublish_label = \"prod\"\n"
        );
        std::fs::write(ch.dir().join("shop.toml"), template).unwrap();
        ch
    }

    /// `amibake ARGS`, printing for people.
    fn amibake_human(&self, args: &[&str]) -> Run {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_amibake"))
            .current_dir(self.dir())
            .envs(self.cloud.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .args(args)
            .output()
            .unwrap();
        Run {
            command: format!("amibake {args:?}"),
            output,
        }
    }

    /// Bakes a tarball holding `commit`'s REVISION; returns the manifest.
    fn bake(&self, commit: &str) -> serde_json::Value {
        let name = format!("{commit}.tar.gz");
        write_revision_tarball(&self.dir().join(&name), &format!("{commit}\n"));
        let run = self.run_amibake(&["bake", "shop.toml", "--tarball", &name, "--commit", commit]);
        run.expect_code(0);
        run.json()
    }

    fn history(&self) -> Vec<serde_json::Value> {
        let run = self.run_amibake(&["history", CHANNEL]);
        run.expect_code(0);
        let found: serde_json::Value = run.json();
        crate::util::schema::assert_valid("history", &found);
        assert_eq!(found["parameter"], CHANNEL);
        found["versions"].as_array().unwrap().clone()
    }

    /// The parameter's value as a launch template would resolve it: `CHANNEL`, or
    /// `CHANNEL:prod`.
    fn resolve(&self, name: &str) -> String {
        self.runtime
            .block_on(self.clients.ssm.get_parameter().name(name).send())
            .unwrap()
            .parameter()
            .unwrap()
            .value()
            .unwrap()
            .to_string()
    }

    /// (version, AMI, labels) of every version, newest first.
    fn versions(&self) -> Vec<(i64, String, Vec<String>)> {
        self.history()
            .iter()
            .map(|v| {
                (
                    v["version"].as_i64().unwrap(),
                    v["ami_id"].as_str().unwrap().to_string(),
                    serde_json::from_value(v["labels"].clone()).unwrap(),
                )
            })
            .collect()
    }
}

fn labels(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[test]
fn bakes_publish_and_history_promote_rollback_move_the_channel() {
    let _module = crate::util::module_turn(module_path!());
    let ch = Channel::publishing();
    let a = ch.bake("aaaa1111");
    let b = ch.bake("bbbb2222");
    let c = ch.bake("cccc3333");
    let ami = |m: &serde_json::Value| m["ami_id"].as_str().unwrap().to_string();
    let (a_ami, b_ami, c_ami) = (ami(&a), ami(&b), ami(&c));
    for (version, manifest) in [(1, &a), (2, &b), (3, &c)] {
        assert_eq!(manifest["ssm_parameter"], CHANNEL, "{manifest}");
        assert_eq!(manifest["ssm_version"], version, "{manifest}");
    }
    assert_eq!(ch.resolve(&format!("{CHANNEL}:prod")), c_ami);

    // History, newest first, says what each image is.
    let history = ch.history();
    assert_eq!(history.len(), 3);
    for (entry, (manifest, commit)) in
        history
            .iter()
            .zip([(&c, "cccc3333"), (&b, "bbbb2222"), (&a, "aaaa1111")])
    {
        assert_eq!(entry["ami_id"], manifest["ami_id"]);
        assert_eq!(entry["state"], "available");
        assert_eq!(entry["commit"], commit);
        assert_eq!(entry["tarball_sha256"], manifest["tarball_sha256"]);
        assert_eq!(entry["base_ami"], manifest["base_ami"]);
        assert!(
            entry["modified"].as_i64().unwrap() > 1_700_000_000,
            "{entry}"
        );
    }
    assert_eq!(
        ch.versions(),
        vec![
            (3, c_ami.clone(), labels(&["prod"])),
            (2, b_ami.clone(), labels(&[])),
            (1, a_ami.clone(), labels(&[])),
        ]
    );
    let limited = ch.run_amibake(&["history", CHANNEL, "--limit", "2"]);
    let limited: serde_json::Value = limited.json();
    assert_eq!(limited["versions"].as_array().unwrap().len(), 2);
    // For people: a header and a line a version, newest first.
    let human = ch.amibake_human(&["history", CHANNEL]);
    human.expect_code(0);
    let lines: Vec<String> = human.stdout().lines().map(str::to_string).collect();
    assert_eq!(lines.len(), 4, "{}", human.dump());
    assert!(lines[0].contains("VERSION") && lines[0].contains("LABELS"));
    assert!(
        lines[1].contains(&c_ami) && lines[1].contains("cccc3333") && lines[1].ends_with("prod")
    );
    assert!(lines[3].contains(&a_ami) && lines[3].contains("aaaa1111"));

    // Rollback of the label: it moves back onto version 2, no version is written.
    let run = ch.run_amibake(&["rollback", CHANNEL, "--label", "prod"]);
    run.expect_code(0);
    let moved: serde_json::Value = run.json();
    crate::util::schema::assert_valid("rollback", &moved);
    assert_eq!(moved["before"]["version"], 3);
    assert_eq!(moved["after"]["version"], 2);
    assert_eq!(moved["after"]["ami_id"], b_ami.as_str());
    assert_eq!(ch.resolve(&format!("{CHANNEL}:prod")), b_ami);
    assert_eq!(ch.versions().len(), 3);
    let said = ch.amibake_human(&["rollback", CHANNEL, "--label", "prod"]);
    said.expect_code(0);
    assert_eq!(
        said.stdout().trim(),
        format!("{CHANNEL} label `prod`: was version 2 ({b_ami}), now version 1 ({a_ami})")
    );

    // Rollback of the newest version: the image before it comes back as version 4.
    let run = ch.run_amibake(&["rollback", CHANNEL]);
    run.expect_code(0);
    assert_eq!(ch.resolve(CHANNEL), b_ami);
    assert_eq!(ch.versions()[0], (4, b_ami.clone(), labels(&[])));
    // Two steps back from b passes c's version and lands on a.
    ch.run_amibake(&["rollback", CHANNEL, "--steps", "2"])
        .expect_code(0);
    assert_eq!(ch.versions()[0], (5, a_ami.clone(), labels(&[])));

    // Promote with a label moves it onto the newest version already naming the image.
    let run = ch.run_amibake(&["promote", CHANNEL, &c_ami, "--label", "prod"]);
    run.expect_code(0);
    assert_eq!(ch.resolve(&format!("{CHANNEL}:prod")), c_ami);
    assert_eq!(ch.versions()[2], (3, c_ami.clone(), labels(&["prod"])));
    assert_eq!(ch.versions().len(), 5);
    // Without one, it becomes the newest version; again changes nothing.
    ch.run_amibake(&["promote", CHANNEL, &c_ami]).expect_code(0);
    assert_eq!(ch.versions()[0], (6, c_ami.clone(), labels(&[])));
    let again = ch.run_amibake(&["promote", CHANNEL, &c_ami]);
    again.expect_code(0);
    let again: serde_json::Value = again.json();
    crate::util::schema::assert_valid("promote", &again);
    assert_eq!(again["changed"], false, "{again}");
    assert_eq!(ch.versions().len(), 6);

    // A deregistered image is refused by name, and the channel is left as it was.
    ch.runtime
        .block_on(ch.clients.ec2.deregister_image().image_id(&a_ami).send())
        .unwrap();
    let before = ch.versions();
    let refused = ch.run_amibake(&["rollback", CHANNEL, "--to-version", "1"]);
    refused.expect_failure(&a_ami, None);
    assert!(
        refused.stderr().contains("deregistered"),
        "{}",
        refused.dump()
    );
    let refused = ch.run_amibake(&["rollback", CHANNEL, "--label", "prod", "--to-version", "1"]);
    refused.expect_failure(&a_ami, None);
    // And rollback only goes back: a label is moved forward by promote, which it names.
    let refused = ch.run_amibake(&["rollback", CHANNEL, "--label", "prod", "--to-version", "5"]);
    refused.expect_refused(&format!(
            "and version 5 is newer: rollback only goes back; to move forward, `amibake promote {CHANNEL} "
        ));
    let refused = ch.run_amibake(&["promote", CHANNEL, &a_ami]);
    refused.expect_failure(&a_ami, None);
    assert_eq!(ch.versions(), before);
    assert_eq!(ch.history()[5]["state"], "deregistered");

    // Only images amibake made are promoted.
    let vendor = ch.vendor_ami();
    let refused = ch.run_amibake(&["promote", CHANNEL, &vendor]);
    refused.expect_failure("amibake did not make it", None);
    assert_eq!(ch.versions(), before);

    // Bad targets name what is wrong.
    ch.run_amibake(&["rollback", CHANNEL, "--to-version", "99"])
        .expect_failure("has no version 99 (its versions run from 1 to 6)", None);
    ch.run_amibake(&["rollback", CHANNEL, "--label", "canary"])
        .expect_failure("no version labelled `canary`", None);
    ch.run_amibake(&["history", "/amibake/nothing/here"])
        .expect_failure("no SSM parameter /amibake/nothing/here", None);
    ch.run_amibake(&["rollback", CHANNEL, "--steps", "0"])
        .expect_code(2);
    ch.run_amibake(&["rollback", CHANNEL, "--steps", "1", "--to-version", "2"])
        .expect_code(2);

    // A rebake of a commit the channel no longer names reuses the image and publishes it
    // again (label included); one the channel names publishes nothing.
    ch.run_amibake(&["rollback", CHANNEL, "--label", "prod", "--to-version", "2"])
        .expect_code(0);
    let rebaked = ch.bake("cccc3333");
    assert_eq!(rebaked["reused"], true);
    assert_eq!(rebaked["ami_id"], c_ami.as_str());
    assert_eq!(rebaked["ssm_version"], 7);
    assert_eq!(ch.resolve(&format!("{CHANNEL}:prod")), c_ami);
    let unchanged = ch.bake("cccc3333");
    assert_eq!(unchanged["ssm_version"], serde_json::Value::Null);
    assert_eq!(ch.versions().len(), 7);

    // A publication that fails takes the bake's image with it and leaves the channel
    // naming what it named: refused at the put, or at the label after the put.
    for (action, after) in [("PutParameter", 0), ("LabelParameterVersion", 0)] {
        let images_before = ch.cloud.ls()["images"].as_array().unwrap().len();
        let newest = ch.resolve(CHANNEL);
        let injected = ch.cloud.fail_once("ssm", action, after);
        write_revision_tarball(&ch.dir().join("nope.tar.gz"), "nope!\n");
        let run = ch.run_amibake(&[
            "bake",
            "shop.toml",
            "--tarball",
            "nope.tar.gz",
            "--commit",
            "f00dfa11",
        ]);
        run.expect_failure(&injected, Some("publish to ssm"));
        assert_eq!(
            ch.cloud.ls()["images"].as_array().unwrap().len(),
            images_before
        );
        assert_eq!(ch.resolve(CHANNEL), newest, "after {action} failed");
        assert_eq!(
            ch.resolve(&format!("{CHANNEL}:prod")),
            c_ami,
            "after {action} failed"
        );
    }
}

#[test]
fn a_full_history_whose_oldest_version_is_labelled_is_refused_before_any_write() {
    let _module = crate::util::module_turn(module_path!());
    let ch = Channel::publishing();
    let baked = ch.bake("dddd4444");
    let image = baked["ami_id"].as_str().unwrap().to_string();
    // 99 more versions, the first (labelled `prod` by the bake) now the oldest of 100.
    ch.runtime.block_on(async {
        for _ in 0..99 {
            ch.clients
                .ssm
                .put_parameter()
                .name(CHANNEL)
                .value(&image)
                .r#type(aws_sdk_ssm::types::ParameterType::String)
                .data_type("aws:ec2:image")
                .overwrite(true)
                .send()
                .await
                .unwrap();
        }
    });
    assert_eq!(ch.versions().len(), 100);
    let calls_before = ch.cloud.calls().len();
    let refused = ch.run_amibake(&["rollback", CHANNEL, "--to-version", "50"]);
    refused.expect_failure(
        "its oldest, version 1, carries the label prod, so Parameter Store would refuse",
        None,
    );
    assert!(
        refused.stderr().contains("unlabel-parameter-version"),
        "{}",
        refused.dump()
    );
    let puts = ch.cloud.calls()[calls_before..]
        .iter()
        .filter(|c| c["action"] == "PutParameter")
        .count();
    assert_eq!(puts, 0, "nothing is written");
    // Once the label is on a newer version (every version names the same image, so only
    // Parameter Store itself moves it), the put goes through and drops version 1.
    ch.runtime
        .block_on(
            ch.clients
                .ssm
                .label_parameter_version()
                .name(CHANNEL)
                .parameter_version(60)
                .labels("prod")
                .send(),
        )
        .unwrap();
    ch.run_amibake(&["rollback", CHANNEL, "--to-version", "60"])
        .expect_code(0);
    let versions = ch.versions();
    assert_eq!(versions.len(), 100);
    assert_eq!(versions[0].0, 101);
    assert_eq!(versions.last().unwrap().0, 2);
}
