//! `amibake iam-policy` held against what runs really call. For base, bake with the attach
//! backend and bake with the direct backend (booting a test, delivering a copy, sharing,
//! deprecating), a run that fails at its last call and undoes everything, then one that
//! succeeds, on the local cloud. Every call in the cloud's log must be allowed by the printed policy: the
//! action, the resource types it names, an `aws:RequestTag` condition met by the tags in
//! the call, an `aws:ResourceTag` condition met by the tags the resource carried before
//! it, an SSM parameter among the policy's. And every action the policy allows must have
//! been called.

use std::collections::BTreeSet;
use std::path::Path;

use crate::util::localcloud::LocalCloud;
use crate::util::tarballs::write_revision_tarball;

const TAG: &str = "amibake:build-id";
const DEBIAN: &str = "/aws/service/debian/release/12/latest/amd64";

/// The policy `amibake iam-policy ARGS` prints for the template in `dir`.
fn policy(cloud: &LocalCloud, dir: &Path, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["iam-policy", "t.toml"];
    all.extend_from_slice(args);
    let run = cloud.run_amibake(dir, &all);
    run.expect_code(0);
    serde_json::from_str(&run.stdout()).unwrap_or_else(|e| panic!("{e}\n{}", run.dump()))
}

/// The resource type IAM names an id by: `volume` for vol-…, a key pair by its name.
fn resource_type(id: &str) -> &'static str {
    match id.split('-').next().unwrap_or_default() {
        "vol" => "volume",
        "i" => "instance",
        "ami" => "image",
        "snap" => "snapshot",
        "sg" => "security-group",
        _ => "key-pair",
    }
}

fn matches_type(resource: &str, kind: &str) -> bool {
    resource == "*" || resource.contains(&format!(":{kind}/"))
}

fn strings(value: &serde_json::Value) -> Vec<String> {
    match value {
        serde_json::Value::String(s) => vec![s.clone()],
        serde_json::Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().unwrap().to_string())
            .collect(),
        _ => Vec::new(),
    }
}

/// Checks every call against the policy; returns the actions called.
fn assert_allowed(policy: &serde_json::Value, calls: &[serde_json::Value]) -> BTreeSet<String> {
    let statements = policy["Statement"].as_array().unwrap();
    let mut called = BTreeSet::new();
    for call in calls {
        let action = format!(
            "{}:{}",
            call["service"].as_str().unwrap(),
            call["action"].as_str().unwrap()
        );
        called.insert(action.clone());
        let with: Vec<&serde_json::Value> = statements
            .iter()
            .filter(|s| strings(&s["Action"]).contains(&action))
            .collect();
        assert!(!with.is_empty(), "{action} is not allowed: {call}");
        let condition = |s: &serde_json::Value, kind: &str| {
            s["Condition"]["Null"][format!("aws:{kind}/{TAG}")] == "false"
        };
        // Made by the call: the call carries the tag.
        if with.iter().any(|s| condition(s, "RequestTag")) {
            let carried = strings(&call["request_tags"]);
            assert!(
                carried.iter().any(|t| t == TAG),
                "{action} without {TAG}: {call}"
            );
        }
        // Named by the call: some statement allows its type, and a tag condition holds.
        for (id, tags) in call["resource_tags"].as_object().unwrap() {
            let kind = resource_type(id);
            let for_kind: Vec<&&serde_json::Value> = with
                .iter()
                .filter(|s| {
                    strings(&s["Resource"])
                        .iter()
                        .any(|r| matches_type(r, kind))
                })
                .collect();
            assert!(
                !for_kind.is_empty(),
                "{action} on a {kind} is not allowed: {call}"
            );
            let free = for_kind
                .iter()
                .any(|s| s["Condition"].is_null() || condition(s, "RequestTag"));
            if !free {
                assert!(
                    strings(tags).iter().any(|t| t == TAG),
                    "{action} on {id}, which does not carry {TAG}: {call}"
                );
            }
        }
        // SSM's parameters: only the template's.
        if call["service"] == "ssm" && call["action"].as_str().unwrap().contains("Parameter") {
            // `NAME:3` and `NAME:label` are the parameter NAME to IAM.
            let name = call["ids"]["Name"].as_str().unwrap_or_default();
            let name = name.split(':').next().unwrap_or_default();
            let arn_tail = format!(":parameter/{}", name.trim_start_matches('/'));
            let named = with
                .iter()
                .flat_map(|s| strings(&s["Resource"]))
                .any(|r| r.ends_with(&arn_tail));
            assert!(named, "{action} on {name} is not allowed: {call}");
        }
        // S3's objects: only under the prefixes the policy names.
        if call["service"] == "s3" {
            let arn = format!(
                "arn:aws:s3:::{}/{}",
                call["ids"]["Bucket"].as_str().unwrap_or_default(),
                call["ids"]["Key"].as_str().unwrap_or_default()
            );
            let named = with.iter().flat_map(|s| strings(&s["Resource"])).any(|r| {
                match r.strip_suffix('*') {
                    Some(prefix) => arn.starts_with(prefix),
                    None => arn == r,
                }
            });
            assert!(named, "{action} on {arn} is not allowed: {call}");
        }
    }
    called
}

fn allowed_actions(policy: &serde_json::Value) -> BTreeSet<String> {
    policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| strings(&s["Action"]))
        .collect()
}

/// A failing run (its last call refused, everything undone, the channel deleted again),
/// then a successful one; the policy must allow exactly what they called.
/// `lost` names create calls whose answer is lost in the successful run (so the run finds
/// what they made); `more` runs after it, given its manifest. `admin` are `localcloud` calls
/// that make what the account holds first (an instance profile, a bucket): an
/// administrator's calls, not the run's. Beside the template lie a revision's tarball and
/// `big.bin`, larger than SSM's commands carry.
fn prove(
    template: &str,
    run: &[&str],
    policy_args: &[&str],
    lost: &[&str],
    admin: &[&[&str]],
    more: impl Fn(&LocalCloud, &Path, &serde_json::Value),
) {
    let cloud = LocalCloud::start("quick");
    for call in admin {
        cloud.cli(call);
    }
    let before = cloud.calls().len();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    write_revision_tarball(&dir.join("app.tar.gz"), "one\n");
    std::fs::write(dir.join("big.bin"), vec![7u8; 200 << 10]).unwrap();
    std::fs::write(dir.join("t.toml"), template).unwrap();
    let printed = policy(&cloud, dir, policy_args);

    cloud.fail_once("ssm", "LabelParameterVersion", 0);
    cloud.run_amibake(dir, run).expect_code(1);
    for action in lost {
        cloud.cli(&["fault", action, "--lose-answer"]);
    }
    let succeeded = cloud.run_amibake(dir, run);
    succeeded.expect_code(0);
    let manifest: serde_json::Value = succeeded.json();
    more(&cloud, dir, &manifest);
    let calls = cloud.calls_since(before);
    let mut called = assert_allowed(&printed, &calls);
    // Not a call of its own: IAM checks it within a launch that names a profile.
    let profiled = admin.iter().any(|call| call[0] == "instance-profile");
    if profiled && called.contains("ec2:RunInstances") {
        called.insert("iam:PassRole".to_string());
    }
    let unused: Vec<String> = allowed_actions(&printed)
        .difference(&called)
        .cloned()
        .collect();
    assert!(
        unused.is_empty(),
        "allowed but never called: {unused:?}\n{}",
        serde_json::to_string_pretty(&printed).unwrap()
    );
    let deleted = calls.iter().any(|c| c["action"] == "DeleteParameter");
    assert!(deleted, "the failed run put the channel back");
}

#[test]
fn the_base_policy_allows_exactly_what_a_base_build_calls() {
    let _module = crate::util::module_turn(module_path!());
    prove(
        &format!(
            "[base]\nname = \"base-${{timestamp}}\"\nsource_ami = \"resolve:ssm:{DEBIAN}\"\n\
             instance_type = \"t3.small\"\nssh_username = \"admin\"\nssh_interface = \"private_ip\"\n\
             publish_ssm = \"/amibake/shop/base\"\npublish_label = \"latest\"\n\n\
             [[base.provisioner]]\ninline = [\"true\"]\n"
        ),
        &["base", "t.toml"],
        &["--mode", "base"],
        &["CreateSecurityGroup"],
        &[],
        |_, _, _| {},
    );
}

#[test]
fn the_ssm_base_policy_allows_exactly_what_a_base_over_ssm_calls() {
    let _module = crate::util::module_turn(module_path!());
    prove(
        &format!(
            "[base]\nname = \"base-${{timestamp}}\"\nsource_ami = \"resolve:ssm:{DEBIAN}\"\n\
             instance_type = \"t3.small\"\ncommunicator = \"ssm\"\niam_instance_profile = \"amibake-build\"\n\
             ssm_log_group = \"/amibake/builds\"\nssm_bucket = \"amibake-staging\"\n\
             publish_ssm = \"/amibake/shop/base\"\npublish_label = \"latest\"\n\n\
             [[base.provisioner]]\nfile = \"big.bin\"\ndestination = \"/opt/big.bin\"\n\n\
             [[base.provisioner]]\ninline = [\"seq 1 9000\"]\n\n\
             [[base.provisioner]]\ninline = [\"true\"]\n"
        ),
        &["base", "t.toml"],
        &["--mode", "base"],
        &["CreateSecurityGroup"],
        &[
            &["instance-profile", "amibake-build", "--with-s3"],
            &["bucket", "amibake-staging"],
        ],
        // A provisioner cut at its timeout: its command is cancelled.
        |cloud, dir, _| {
            let template = std::fs::read_to_string(dir.join("t.toml")).unwrap();
            let hung = template.replace("inline = [\"true\"]", "inline = [\"sleep 30\"]\ntimeout_seconds = 1");
            std::fs::write(dir.join("t.toml"), hung).unwrap();
            cloud.run_amibake(dir, &["base", "t.toml"]).expect_code(1);
        },
    );
}

#[test]
fn the_attach_policy_allows_exactly_what_an_attach_bake_calls() {
    let _module = crate::util::module_turn(module_path!());
    prove(
        &format!(
            "[bake]\nname = \"shop-${{commit}}-${{timestamp}}\"\nbase_ami = \"resolve:ssm:{DEBIAN}\"\n\
             dest = \"/srv/shop\"\npublish_ssm = \"/amibake/shop/deploy\"\npublish_label = \"prod\"\n"
        ),
        &[
            "bake", "t.toml", "--tarball", "app.tar.gz", "--commit", "c0ffee1", "--backend",
            "attach",
        ],
        &["--mode", "bake", "--backend", "attach"],
        &[],
        &[],
        |_, _, _| {},
    );
}

#[test]
fn the_direct_policy_allows_exactly_what_a_tested_delivering_direct_bake_calls() {
    let _module = crate::util::module_turn(module_path!());
    prove(
        &format!(
            "[variables]\nbase = \"resolve:ssm:{DEBIAN}\"\n\n\
             [bake]\nname = \"shop-${{commit}}-${{timestamp}}\"\nbase_ami = \"${{var.base}}\"\n\
             dest = \"/srv/shop\"\npublish_ssm = \"/amibake/shop/deploy\"\npublish_label = \"prod\"\n\
             copy_to_regions = [\"eu-west-1\"]\nshare_with_accounts = [\"210987654321\"]\n\
             deprecate_after = \"90d\"\nimds_support = \"v2.0\"\n\n\
             [bake.test_instance]\ninstance_type = \"t3.micro\"\nssh_username = \"admin\"\n\n\
             [[bake.test]]\ninline = [\"test -s /srv/shop/REVISION\"]\n"
        ),
        &[
            "bake", "t.toml", "--tarball", "app.tar.gz", "--commit", "c0ffee1", "--backend",
            "direct",
            // Empty: the first run fetches the base, as a fresh CI machine does.
            "--cache-dir", "cache",
        ],
        &["--mode", "bake", "--backend", "direct"],
        // The test instance's group, found by its tag when the create's answer is lost.
        &["CreateSecurityGroup"],
        &[],
        // A base of the account's own (unencrypted) takes the other path: its snapshot is
        // the parent, once EBS encryption by default is known to be off.
        |cloud, dir, manifest| {
            let own = format!("base={}", manifest["ami_id"].as_str().unwrap());
            cloud
                .run_amibake(
                    dir,
                    &[
                        "bake", "t.toml", "--var", &own, "--tarball", "app.tar.gz", "--commit",
                        "c0ffee2", "--backend", "direct", "--cache-dir", "cache", "--force",
                    ],
                )
                .expect_code(0);
        },
    );
}
