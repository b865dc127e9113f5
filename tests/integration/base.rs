//! `amibake base` end to end through the real binary against the local cloud: a base AMI
//! from the Debian vendor AMI provisioned over SSH, published to SSM, baked upon, reused when
//! nothing changed and rebuilt when a script did.

use std::path::Path;
use std::process::Command;

use crate::util::localcloud::{LocalCloud, PARTITION_1_OFFSET};
use crate::util::{Run, Story};

const PARAMETER: &str = "/amibake/shop/base";

fn amibake(cloud: &LocalCloud, dir: &Path, args: &[&str]) -> Run {
    let output = cloud.amibake(dir).args(args).output().unwrap();
    Run {
        command: format!("amibake {args:?}"),
        output,
    }
}

/// The run's manifest (a base's, or a bake's on it), held with its progress events against
/// the published schemas.
fn manifest(run: &Run) -> serde_json::Value {
    let manifest: serde_json::Value = run.json();
    let mode = if manifest.get("commit").is_some() {
        "bake"
    } else {
        "base"
    };
    crate::util::schema::assert_valid(&format!("{mode}-manifest"), &manifest);
    crate::util::schema::assert_events_valid(&run.stderr());
    manifest
}

/// The shop's template, with the repository's provisioner script and pool file copied beside
/// it so a test can change them.
fn shop_template(dir: &Path) {
    let repo = crate::util::repo_root();
    std::fs::create_dir_all(dir.join("files")).unwrap();
    std::fs::copy(
        repo.join("provisioners/app-user.sh"),
        dir.join("app-user.sh"),
    )
    .unwrap();
    std::fs::copy(
        repo.join("provisioners/files/php-fpm-pool.conf"),
        dir.join("files/php-fpm-pool.conf"),
    )
    .unwrap();
    let text = format!(
        r#"[variables]
app = "shop"

[base]
name = "${{var.app}}-base-${{timestamp}}"
source_ami = "resolve:ssm:/aws/service/debian/release/12/latest/amd64"
instance_type = "t3.small"
ssh_username = "admin"
associate_public_ip = true
publish_ssm = "{PARAMETER}"
publish_label = "latest"
tags = {{ team = "web" }}

[[base.pre]]
command = ["sh", "-c", "echo \"$AMIBAKE_STAGE $AMIBAKE_SOURCE_AMI\" > pre.out"]

[[base.post]]
command = ["sh", "-c", "echo \"$AMIBAKE_STAGE $AMIBAKE_AMI_ID\" > post.out"]

[[base.provisioner]]
script = "app-user.sh"
env = {{ APP = "${{var.app}}" }}

[[base.provisioner]]
file = "files/php-fpm-pool.conf"
destination = "/etc/amibake/php-fpm-pool.conf"

[[base.provisioner]]
name = "as root"
inline = ["id -un > /etc/amibake/provisioned-by", "echo \"it's $(hostname)\""]

[[base.test]]
name = "app user"
inline = ["id -u shop", "test \"$(cat /etc/amibake/provisioned-by)\" = root", "echo \"booted $AMIBAKE_AMI_ID from $AMIBAKE_SOURCE_AMI\""]

[bake]
name = "${{var.app}}-${{commit}}-${{timestamp}}"
base_ami = "resolve:ssm:{PARAMETER}:latest"
dest = "/srv/${{var.app}}/current"
owner = "${{var.app}}"
"#
    );
    std::fs::write(dir.join("shop.toml"), text).unwrap();
}

#[test]
fn base_builds_publishes_chains_into_bake_and_skips_when_unchanged() {
    let _module = crate::util::module_turn(module_path!());
    let story = Story::new("quick");
    let (cloud, runtime, clients, dir) =
        (&story.cloud, &story.runtime, &story.clients, story.dir());
    shop_template(dir);

    // 1. From the Debian vendor AMI found through its public SSM parameter.
    let run = amibake(cloud, dir, &["base", "shop.toml", "--manifest", "m.json"]);
    run.expect_code(0);
    let m = manifest(&run);
    let ami = m["ami_id"].as_str().unwrap().to_string();
    assert_eq!(m["reused"], false);
    assert_eq!(m["ssm_parameter"], PARAMETER);
    // The stages ran around the build, with its facts.
    let stage = |file: &str| std::fs::read_to_string(dir.join(file)).unwrap();
    assert_eq!(
        stage("pre.out").trim(),
        format!("pre {}", m["source_ami"].as_str().unwrap())
    );
    assert_eq!(stage("post.out").trim(), format!("post {ami}"));
    for step in [
        "launch instance",
        "wait for ssh",
        "run provisioners",
        "create image",
    ] {
        assert!(m["step_seconds"][step].as_f64().is_some(), "{step}: {m}");
    }
    // The temporary key pair goes as soon as the instance has it, before the provisioners.
    let order: Vec<String> = cloud
        .calls()
        .iter()
        .filter(|c| c["code"] == "OK")
        .map(|c| c["action"].as_str().unwrap().to_string())
        .collect();
    let at = |action: &str| order.iter().position(|a| a == action);
    assert!(
        at("DeleteKeyPair").is_some() && at("DeleteKeyPair") < at("StopInstances"),
        "{order:?}"
    );
    assert!(at("RunInstances") < at("DeleteKeyPair"), "{order:?}");
    // The new image was booted and tested before it was published, on an instance of
    // its own, gone by the time it was.
    let launched: Vec<String> = cloud
        .calls()
        .iter()
        .filter(|c| c["action"] == "RunInstances" && c["code"] == "OK")
        .map(|c| c["ids"]["ImageId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        launched,
        vec![m["source_ami"].as_str().unwrap().to_string(), ami.clone()]
    );
    assert!(
        run.stderr().contains(&format!(
            "booted {ami} from {}",
            m["source_ami"].as_str().unwrap()
        )),
        "{}",
        run.dump()
    );
    // The build instance stays until the run ends: the one terminated first is the test's.
    assert!(at("TerminateInstances") < at("PutParameter"), "{order:?}");
    assert!(m["step_seconds"]["test image"].as_f64().is_some(), "{m}");
    let published = runtime
        .block_on(clients.ssm.get_parameter().name(PARAMETER).send())
        .unwrap();
    let parameter = published.parameter().unwrap();
    assert_eq!(
        parameter.value(),
        Some(ami.as_str()),
        "the newest version is the new AMI"
    );
    assert_eq!(parameter.data_type(), Some("aws:ec2:image"));
    assert_eq!(Some(parameter.version()), m["ssm_version"].as_i64());
    let labelled = runtime
        .block_on(
            clients
                .ssm
                .get_parameter()
                .name(format!("{PARAMETER}:latest"))
                .send(),
        )
        .unwrap();
    assert_eq!(labelled.parameter().unwrap().value(), Some(ami.as_str()));

    let image = runtime
        .block_on(clients.ec2.describe_images().image_ids(&ami).send())
        .unwrap();
    let image = &image.images()[0];
    let tag = |key: &str| crate::util::tag(image.tags(), key).map(str::to_string);
    assert_eq!(
        tag("amibake:source-ami"),
        m["source_ami"].as_str().map(String::from)
    );
    assert_eq!(
        tag("amibake:fingerprint"),
        m["fingerprint"].as_str().map(String::from)
    );
    assert_eq!(tag("team").as_deref(), Some("web"));
    assert_eq!(tag("amibake:architecture").as_deref(), Some("x86_64"));
    assert_eq!(m["architecture"], "x86_64");
    let snapshots: Vec<String> = m["snapshot_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    assert_eq!(snapshots.len(), 1, "{m}");
    let snapshot_tags = runtime
        .block_on(
            clients
                .ec2
                .describe_snapshots()
                .snapshot_ids(&snapshots[0])
                .send(),
        )
        .unwrap();
    assert_eq!(
        crate::util::tag(snapshot_tags.snapshots()[0].tags(), "amibake:build-id"),
        Some(m["build_id"].as_str().unwrap()),
        "the snapshot carries the build id"
    );

    {
        let fs = cloud.mount_snapshot(&snapshots[0], dir, PARTITION_1_OFFSET);
        let root = &fs.root;
        assert_eq!(
            std::fs::read_to_string(root.join("etc/amibake/app-user")).unwrap(),
            "shop\n",
            "the script ran with its env"
        );
        assert!(std::fs::read_to_string(root.join("etc/passwd"))
            .unwrap()
            .contains("\nshop:"));
        assert_eq!(
            std::fs::read(root.join("etc/amibake/php-fpm-pool.conf")).unwrap(),
            std::fs::read(dir.join("files/php-fpm-pool.conf")).unwrap(),
            "the file was uploaded"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("etc/amibake/provisioned-by")).unwrap(),
            "root\n",
            "commands run as root through sudo"
        );
        assert!(
            !std::fs::read_dir(root.join("tmp")).unwrap().any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("amibake-")),
            "uploaded scripts are removed"
        );
    }
    assert!(
        run.stderr().contains("\"line\":\"user shop ready\""),
        "output streams with the provisioner's name:\n{}",
        run.stderr()
    );
    // The host key was checked against what the instance printed to its console.
    assert!(
        run.stderr().lines().any(|l| l.contains("offered host key SHA256:")
            && l.contains("printed to its console")),
        "the host key is vouched for by the console:\n{}",
        run.stderr()
    );
    let calls = cloud.calls();
    let opened: Vec<&str> = calls
        .iter()
        .filter(|c| c["action"] == "AuthorizeSecurityGroupIngress")
        .flat_map(|c| c["ids"].as_object().unwrap().iter())
        .filter(|(k, _)| k.ends_with("CidrIp"))
        .map(|(_, v)| v.as_str().unwrap())
        .collect();
    assert!(
        !opened.is_empty()
            && opened
                .iter()
                .all(|c| c.ends_with("/32") && *c != "0.0.0.0/0"),
        "SSH is opened to this runner only: {opened:?}"
    );
    let run_instances = calls
        .iter()
        .find(|c| c["action"] == "RunInstances")
        .unwrap();
    assert_eq!(run_instances["ids"]["ImageId"], m["source_ami"]);
    let launched = runtime
        .block_on(
            clients
                .ec2
                .describe_instances()
                .filters(
                    aws_sdk_ec2::types::Filter::builder()
                        .name("tag:amibake:build-id")
                        .values(m["build_id"].as_str().unwrap())
                        .build(),
                )
                .send(),
        )
        .unwrap();
    let instance = &launched.reservations()[0].instances()[0];
    assert_eq!(
        instance.metadata_options().and_then(|o| o.http_tokens()),
        Some(&aws_sdk_ec2::types::HttpTokensState::Required),
        "IMDSv2 required on the build instance"
    );
    cloud.assert_nothing_temporary();

    // 2. A bake on top of it, found through the published parameter's label.
    std::fs::create_dir_all(dir.join("app")).unwrap();
    std::fs::write(dir.join("app/index.php"), "<?php echo 'shop';\n").unwrap();
    assert!(Command::new("tar")
        .args(["-czf", "app.tar.gz", "-C", "app", "."])
        .current_dir(dir)
        .status()
        .unwrap()
        .success());
    let baked = amibake(
        cloud,
        dir,
        &[
            "bake",
            "shop.toml",
            "--tarball",
            "app.tar.gz",
            "--commit",
            "abc1234",
        ],
    );
    baked.expect_code(0);
    let bm = manifest(&baked);
    assert_eq!(
        bm["base_ami"],
        ami.as_str(),
        "the bake resolved the new base"
    );
    {
        let fs = cloud.mount_snapshot(bm["snapshot_id"].as_str().unwrap(), dir, PARTITION_1_OFFSET);
        assert_eq!(
            std::fs::read_to_string(fs.root.join("srv/shop/current/index.php")).unwrap(),
            "<?php echo 'shop';\n"
        );
        assert_eq!(
            std::fs::read_to_string(fs.root.join("etc/amibake/app-user")).unwrap(),
            "shop\n",
            "the base's work is under the bake's"
        );
    }

    // 3. Nothing changed: a few lookups, nothing launched, nothing re-published.
    let before = cloud.calls().len();
    let again = amibake(cloud, dir, &["base", "shop.toml"]);
    again.expect_code(0);
    assert_eq!(
        (
            manifest(&again)["ami_id"].as_str(),
            manifest(&again)["reused"].as_bool()
        ),
        (Some(ami.as_str()), Some(true))
    );
    let actions: Vec<String> = cloud.calls()[before..]
        .iter()
        .map(|c| c["action"].as_str().unwrap().to_string())
        .collect();
    assert!(
        actions
            .iter()
            .all(|a| a.starts_with("Describe") || a == "GetParameter"),
        "an unchanged base only looks: {actions:?}"
    );

    // 3b. The channel moved back (someone put another AMI there, its label with it): the
    // unchanged base is published again, as a new version carrying the label, and nothing
    // is launched.
    let other = m["source_ami"].as_str().unwrap();
    let put = runtime
        .block_on(
            clients
                .ssm
                .put_parameter()
                .name(PARAMETER)
                .value(other)
                .r#type(aws_sdk_ssm::types::ParameterType::String)
                .data_type("aws:ec2:image")
                .overwrite(true)
                .send(),
        )
        .unwrap();
    runtime
        .block_on(
            clients
                .ssm
                .label_parameter_version()
                .name(PARAMETER)
                .parameter_version(put.version())
                .labels("latest")
                .send(),
        )
        .unwrap();
    let before = cloud.calls().len();
    let republished = amibake(cloud, dir, &["base", "shop.toml"]);
    republished.expect_code(0);
    let rp = manifest(&republished);
    assert_eq!(
        (rp["ami_id"].as_str(), rp["reused"].as_bool()),
        (Some(ami.as_str()), Some(true)),
        "{}",
        republished.dump()
    );
    assert_eq!(rp["ssm_version"].as_i64(), Some(put.version() + 1));
    for name in [PARAMETER.to_string(), format!("{PARAMETER}:latest")] {
        let value = runtime
            .block_on(clients.ssm.get_parameter().name(&name).send())
            .unwrap();
        assert_eq!(
            value.parameter().unwrap().value(),
            Some(ami.as_str()),
            "{name}"
        );
    }
    let launched = cloud.calls()[before..]
        .iter()
        .any(|c| c["action"] == "RunInstances");
    assert!(!launched, "publishing needs no instance");
    // Parameter versions from here on are counted from this one.
    let parameter_version = rp["ssm_version"].as_i64().unwrap();

    // 4. One byte of a script changed: built anew.
    let script = dir.join("app-user.sh");
    let mut text = std::fs::read(&script).unwrap();
    text.push(b'\n');
    std::fs::write(&script, text).unwrap();
    let rebuilt = amibake(cloud, dir, &["base", "shop.toml"]);
    rebuilt.expect_code(0);
    let rm = manifest(&rebuilt);
    assert_eq!(rm["reused"], false);
    assert_ne!(rm["ami_id"], ami.as_str());
    assert_ne!(rm["fingerprint"], m["fingerprint"]);
    assert_eq!(rm["ssm_version"].as_i64(), Some(parameter_version + 1));
    cloud.assert_nothing_temporary();

    // 5. The template brings its own key pair and who may reach SSH: both are used as given,
    // and the key pair is not the run's to delete.
    let material = runtime
        .block_on(
            clients
                .ec2
                .create_key_pair()
                .key_name("ops")
                .key_type(aws_sdk_ec2::types::KeyType::Ed25519)
                .send(),
        )
        .unwrap()
        .key_material()
        .unwrap()
        .to_string();
    std::fs::write(dir.join("ops.pem"), &material).unwrap();
    std::fs::set_permissions(
        dir.join("ops.pem"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let text = std::fs::read_to_string(dir.join("shop.toml")).unwrap().replace(
        "associate_public_ip = true\n",
        "associate_public_ip = true\nssh_keypair_name = \"ops\"\nssh_private_key_file = \"ops.pem\"\nssh_cidrs = [\"127.0.0.0/8\"]\nroot_volume_size_gb = 10\n",
    );
    std::fs::write(dir.join("own-key.toml"), text).unwrap();
    let before = cloud.calls().len();
    let own = amibake(cloud, dir, &["base", "own-key.toml", "--force"]);
    own.expect_code(0);
    let calls = cloud.calls()[before..].to_vec();
    assert!(!calls
        .iter()
        .any(|c| c["action"] == "CreateKeyPair" || c["action"] == "DeleteKeyPair"));
    let launched = calls
        .iter()
        .find(|c| c["action"] == "RunInstances")
        .unwrap();
    assert_eq!(launched["ids"]["KeyName"], "ops");
    let opened: Vec<&serde_json::Value> = calls
        .iter()
        .filter(|c| c["action"] == "AuthorizeSecurityGroupIngress")
        .flat_map(|c| c["ids"].as_object().unwrap().values())
        .filter(|v| v.as_str().is_some_and(|v| v.contains('/')))
        .collect();
    assert_eq!(
        opened,
        vec!["127.0.0.0/8"; 2],
        "the template's CIDRs, and only them, on the build's group and on the test's"
    );
    assert_eq!(cloud.ls()["key_pairs"], serde_json::json!(["ops"]));
    let own_image = runtime
        .block_on(
            clients
                .ec2
                .describe_images()
                .image_ids(manifest(&own)["ami_id"].as_str().unwrap())
                .send(),
        )
        .unwrap();
    assert_eq!(
        own_image.images()[0].block_device_mappings()[0]
            .ebs()
            .and_then(|e| e.volume_size()),
        Some(10),
        "the root grown as the template asks"
    );
    assert!(
        dir.join("ops.pem").exists(),
        "the user's key file is theirs"
    );
    // 6. On a terminal: a line per step with a tick and its time, the AMI id at the end.
    //    `--ssh-cidr` (as a runner behind NAT passes its public address) takes the place of
    //    the template's CIDRs.
    let before = cloud.calls().len();
    let shown = Command::new("script")
        .args(["--quiet", "--return", "--command"])
        .arg(format!(
            "{} base own-key.toml --force --ssh-cidr 127.0.0.0/9",
            env!("CARGO_BIN_EXE_amibake")
        ))
        .arg("/dev/null")
        .current_dir(dir)
        .envs(cloud.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()
        .unwrap();
    let terminal = Run {
        command: "amibake base own-key.toml --force, on a terminal".into(),
        output: shown,
    };
    terminal.expect_code(0);
    let screen = terminal.stdout();
    for step in [
        "create key pair",
        "launch instance",
        "run provisioners",
        "create image",
    ] {
        assert!(
            screen.contains(&format!("✓ {step} (")),
            "{step} on the terminal:\n{screen}"
        );
    }
    assert!(screen.contains("amibake base · build ab-"), "{screen}");
    let opened: Vec<serde_json::Value> = cloud.calls()[before..]
        .iter()
        .filter(|c| c["action"] == "AuthorizeSecurityGroupIngress")
        .flat_map(|c| c["ids"].as_object().unwrap().values().cloned())
        .filter(|v| v.as_str().is_some_and(|v| v.contains('/')))
        .collect();
    assert_eq!(
        opened, ["127.0.0.0/9"; 2],
        "--ssh-cidr, in place of the template's, on the build's group and on the test's"
    );
    assert!(
        !screen.contains("{\"event\""),
        "no JSON on a terminal:\n{screen}"
    );
    assert!(
        screen
            .trim_end()
            .lines()
            .last()
            .is_some_and(|l| l.trim().starts_with("ami-")),
        "the AMI id last:\n{screen}"
    );

    // A provisioner's secret from the CI's environment reaches the command, and nothing
    // else: not the image (sudo there logs every command line it runs, to a file, so a
    // secret on a command line would be in it) and not amibake's output, where it is
    // masked.
    let secret = "s3cr3t-Value-42-do-not-log";
    let digest = {
        use sha2::Digest;
        let hash = sha2::Sha256::digest(secret.as_bytes());
        hash.iter().map(|b| format!("{b:02x}")).collect::<String>()
    };
    std::fs::write(
        dir.join("secret.toml"),
        format!(
            r#"[base]
name = "secret-base-${{timestamp}}"
source_ami = "resolve:ssm:/aws/service/debian/release/12/latest/amd64"
instance_type = "t3.small"
ssh_username = "admin"

[[base.provisioner]]
inline = ["echo 'Defaults logfile=/var/log/sudo.log' > /etc/sudoers.d/log", "chmod 440 /etc/sudoers.d/log"]

[[base.provisioner]]
env = {{ TOKEN = "${{env.AMIBAKE_TEST_SECRET}}" }}
inline = ["test \"$(printf %s \"$TOKEN\" | sha256sum | cut -d' ' -f1)\" = {digest}", "echo \"the token is $TOKEN\""]
"#
        ),
    )
    .unwrap();
    let output = cloud
        .amibake(dir)
        .args(["base", "secret.toml"])
        .env("AMIBAKE_TEST_SECRET", secret)
        .output()
        .unwrap();
    let secret_run = Run {
        command: "amibake base secret.toml".into(),
        output,
    };
    secret_run.expect_code(0);
    // No subnet, no `ssh_interface`: the default subnet gave the instance a public address,
    // and that is the one used, said so.
    assert!(
        secret_run
            .stderr()
            .lines()
            .any(|l| l.contains("is running at 127.") && l.contains("its public address (chosen")),
        "{}",
        secret_run.dump()
    );
    let everything = format!("{}{}", secret_run.stdout(), secret_run.stderr());
    assert!(!everything.contains(secret), "{}", secret_run.dump());
    assert!(
        everything.contains("the token is ***"),
        "the line is there, masked\n{}",
        secret_run.dump()
    );
    let snapshot = manifest(&secret_run)["snapshot_ids"][0]
        .as_str()
        .unwrap()
        .to_string();
    let exported = tempfile::tempdir().unwrap();
    {
        let image = cloud.mount_snapshot(&snapshot, exported.path(), PARTITION_1_OFFSET);
        let sudo_log = std::fs::read_to_string(image.root.join("var/log/sudo.log")).unwrap();
        assert!(sudo_log.contains("COMMAND="), "sudo logged: {sudo_log}");
        let grep = Command::new("grep")
            .args(["-r", "-a", "-l", "--no-messages", secret])
            .arg(&image.root)
            .output()
            .unwrap();
        assert!(
            grep.stdout.is_empty(),
            "the secret is in the image: {}",
            String::from_utf8_lossy(&grep.stdout)
        );
    }

    for run in [&run, &again, &rebuilt, &own, &terminal] {
        assert!(
            !run.stderr().contains("PRIVATE KEY") && !run.stdout().contains("PRIVATE KEY"),
            "a private key reached the output:\n{}",
            run.dump()
        );
    }
}
