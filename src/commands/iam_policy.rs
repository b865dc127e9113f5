//! `amibake iam-policy TEMPLATE`: the least-privilege IAM policy for running a template.
//!
//! Only the actions a run of the template calls, its cleanup included; what it makes is
//! allowed only with amibake's build-id tag in the create call (`aws:RequestTag`), what it
//! changes or removes only when it carries that tag (`aws:ResourceTag`), and what it reads
//! or starts from (a vendor's image, the build host, a subnet) without a condition. SSM is
//! limited to the template's parameters. `tests/iam_policy.rs` holds the policy against
//! the local cloud's call log of real runs: every call allowed, every action used.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::json;

use crate::artifact::TAG_BUILD_ID;
use crate::template::{
    AmiRef, BakePlan, BasePlan, CommunicatorKind, Distribution, InstancePlan, SsmPublish, Template,
};

/// Which runs the policy is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Base,
    Bake,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Attach,
    Direct,
}

/// An IAM policy document.
#[derive(Debug, Serialize)]
pub struct Policy {
    #[serde(rename = "Version")]
    version: &'static str,
    #[serde(rename = "Statement")]
    statements: Vec<Statement>,
}

#[derive(Debug, Serialize)]
pub struct Statement {
    #[serde(rename = "Sid")]
    pub sid: String,
    #[serde(rename = "Effect")]
    effect: &'static str,
    #[serde(rename = "Action")]
    pub actions: Vec<String>,
    #[serde(rename = "Resource")]
    pub resources: Vec<String>,
    #[serde(rename = "Condition", skip_serializing_if = "Option::is_none")]
    pub condition: Option<serde_json::Value>,
}

/// How a statement's resources are scoped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Scope {
    /// Anything: reads, and what a run starts from but does not own.
    Any,
    /// Made by the call, which must carry the build-id tag.
    Created,
    /// The run's own: it must carry the build-id tag.
    Owned,
    /// CreateTags only as part of one of the run's create calls.
    TagOnCreate,
}

/// The statements, gathered by (scope, resources) and merged into one per scope and set of
/// resources; and the create calls that may tag what they make.
#[derive(Default)]
struct Grants {
    statements: BTreeMap<(Scope, Vec<String>), Vec<String>>,
    create_actions: Vec<String>,
}

impl Grants {
    fn allow(&mut self, scope: Scope, resources: &[&str], actions: &[&str]) {
        let key = (scope, resources.iter().map(|r| r.to_string()).collect());
        let list = self.statements.entry(key).or_default();
        for action in actions {
            if !list.iter().any(|a| a == action) {
                list.push(action.to_string());
            }
        }
    }

    /// A create call: allowed on what it makes only with the tag, on what it uses as is.
    fn create(&mut self, action: &str, makes: &[&str], uses_owned: &[&str], uses: &[&str]) {
        self.allow(Scope::Created, makes, &[action]);
        if !uses_owned.is_empty() {
            self.allow(Scope::Owned, uses_owned, &[action]);
        }
        if !uses.is_empty() {
            self.allow(Scope::Any, uses, &[action]);
        }
        self.allow(Scope::TagOnCreate, ALL_TAGGABLE, &["ec2:CreateTags"]);
        let bare = action.trim_start_matches("ec2:").to_string();
        if !self.create_actions.contains(&bare) {
            self.create_actions.push(bare);
        }
    }

    fn into_policy(self) -> Policy {
        let create_actions = self.create_actions;
        let tag = |kind: &str| json!({ "Null": { format!("aws:{kind}/{TAG_BUILD_ID}"): "false" } });
        let mut statements = Vec::new();
        for ((scope, resources), mut actions) in self.statements {
            actions.sort();
            let (sid, condition) = match scope {
                Scope::Any => ("Use", None),
                Scope::Created => ("CreateTagged", Some(tag("RequestTag"))),
                Scope::Owned => ("ChangeOwn", Some(tag("ResourceTag"))),
                Scope::TagOnCreate => (
                    "TagOnCreate",
                    Some(json!({ "StringEquals": { "ec2:CreateAction": create_actions.clone() } })),
                ),
            };
            statements.push(Statement {
                sid: format!("{sid}{}", statements.len() + 1),
                effect: "Allow",
                actions,
                resources,
                condition,
            });
        }
        Policy {
            version: "2012-10-17",
            statements,
        }
    }
}

const IMAGE: &str = "arn:aws:ec2:*::image/*";
const SNAPSHOT: &str = "arn:aws:ec2:*::snapshot/*";
const VOLUME: &str = "arn:aws:ec2:*:*:volume/*";
const INSTANCE: &str = "arn:aws:ec2:*:*:instance/*";
const KEY_PAIR: &str = "arn:aws:ec2:*:*:key-pair/*";
const SECURITY_GROUP: &str = "arn:aws:ec2:*:*:security-group/*";
const NETWORK_INTERFACE: &str = "arn:aws:ec2:*:*:network-interface/*";
const SUBNET: &str = "arn:aws:ec2:*:*:subnet/*";
const VPC: &str = "arn:aws:ec2:*:*:vpc/*";
const ALL_TAGGABLE: &[&str] = &[IMAGE, SNAPSHOT, VOLUME, INSTANCE, KEY_PAIR, SECURITY_GROUP];

/// The policy for running `template` in `modes`, with `backends` for a bake.
pub fn policy(template: &Template, modes: &[Mode], backends: &[Backend]) -> Policy {
    let mut grants = Grants::default();
    // Every run looks its images up, and marks what it made finished.
    grants.allow(Scope::Any, &["*"], &["ec2:DescribeImages"]);
    grants.allow(Scope::Owned, &[IMAGE, SNAPSHOT], &["ec2:CreateTags"]);
    grants.allow(Scope::Owned, &[IMAGE], &["ec2:DeregisterImage"]);
    grants.allow(Scope::Owned, &[SNAPSHOT], &["ec2:DeleteSnapshot"]);
    if let (true, Some(plan)) = (modes.contains(&Mode::Base), &template.base) {
        base(&mut grants, plan);
    }
    if let (true, Some(plan)) = (modes.contains(&Mode::Bake), &template.bake) {
        bake(&mut grants, plan, backends);
    }
    grants.into_policy()
}

fn base(grants: &mut Grants, plan: &BasePlan) {
    ami_ref(grants, &plan.build.source_ami);
    temporary_instance(grants, &plan.build.instance);
    grants.allow(Scope::Owned, &[INSTANCE], &["ec2:StopInstances"]);
    grants.create("ec2:CreateImage", &[IMAGE, SNAPSHOT], &[INSTANCE], &[]);
    publish(grants, plan.image.publish.as_ref());
    distribution(grants, &plan.image.distribution);
}

/// A temporary instance: a base build's, or the one a new image is tested on.
fn temporary_instance(grants: &mut Grants, plan: &InstancePlan) {
    let over_ssh = plan.communicator == CommunicatorKind::Ssh;
    grants.allow(Scope::Any, &["*"], &["ec2:DescribeInstances"]);
    if over_ssh {
        // The key pair, and the host key the instance printed to its console.
        grants.allow(
            Scope::Any,
            &["*"],
            &["ec2:DescribeKeyPairs", "ec2:GetConsoleOutput"],
        );
    }
    if over_ssh && plan.ssh_keypair.is_none() {
        grants.create("ec2:CreateKeyPair", &[KEY_PAIR], &[], &[]);
        grants.allow(Scope::Owned, &[KEY_PAIR], &["ec2:DeleteKeyPair"]);
    }
    if plan.subnet_id.is_some() {
        // The subnet's VPC, for the temporary group.
        grants.allow(Scope::Any, &["*"], &["ec2:DescribeSubnets"]);
    }
    if plan.security_group_ids.is_none() {
        // Read when a create's answer was lost, to find the group it made.
        grants.allow(Scope::Any, &["*"], &["ec2:DescribeSecurityGroups"]);
        grants.create("ec2:CreateSecurityGroup", &[SECURITY_GROUP], &[], &[VPC]);
        grants.allow(
            Scope::Owned,
            &[SECURITY_GROUP],
            &["ec2:DeleteSecurityGroup"],
        );
        if over_ssh {
            grants.allow(
                Scope::Owned,
                &[SECURITY_GROUP],
                &["ec2:AuthorizeSecurityGroupIngress"],
            );
        }
    }
    let uses: &[&str] = match over_ssh {
        true => &[IMAGE, SUBNET, SECURITY_GROUP, KEY_PAIR],
        false => &[IMAGE, SUBNET, SECURITY_GROUP],
    };
    grants.create(
        "ec2:RunInstances",
        &[INSTANCE, VOLUME, NETWORK_INTERFACE],
        &[],
        uses,
    );
    grants.allow(Scope::Owned, &[INSTANCE], &["ec2:TerminateInstances"]);
    if let Some(profile) = &plan.iam_instance_profile {
        // Launching with a profile passes its role to EC2. IAM names the role, not the
        // profile: this is the role of the profile's own name, as the console makes them.
        let name = crate::aws::iam::profile_name(profile);
        let role = format!("arn:aws:iam::*:role/{name}");
        grants.allow(Scope::Any, &[&role], &["iam:PassRole"]);
        if plan.communicator == CommunicatorKind::Ssm {
            // Read before anything is made: the profile, and the policies of its role.
            grants.allow(
                Scope::Any,
                &[&format!("arn:aws:iam::*:instance-profile/{name}")],
                &["iam:GetInstanceProfile"],
            );
            grants.allow(Scope::Any, &[&role], &["iam:ListAttachedRolePolicies"]);
        }
    }
    if plan.communicator == CommunicatorKind::Ssm {
        grants.allow(
            Scope::Any,
            &["*"],
            &[
                "ssm:DescribeInstanceInformation",
                "ssm:GetCommandInvocation",
            ],
        );
        // The shell document (and, with a bucket, the download), on the run's own instance
        // only.
        let mut documents = vec![crate::aws::run_command::SHELL_DOCUMENT];
        if plan.ssm_bucket.is_some() {
            documents.push(crate::aws::run_command::DOWNLOAD_DOCUMENT);
        }
        let documents: Vec<String> = documents
            .iter()
            .map(|d| format!("arn:aws:ssm:*::document/{d}"))
            .collect();
        let documents: Vec<&str> = documents.iter().map(String::as_str).collect();
        grants.allow(Scope::Any, &documents, &["ssm:SendCommand"]);
        grants.allow(Scope::Owned, &[INSTANCE], &["ssm:SendCommand"]);
        grants.allow(Scope::Any, &["*"], &["ssm:CancelCommand"]);
    }
    if let Some(bucket) = &plan.ssm_bucket {
        // The sealed files staged there for the agent, and the whole output it puts there,
        // under the run's own prefix.
        grants.allow(
            Scope::Any,
            &[&format!(
                "arn:aws:s3:::{bucket}/{}*",
                crate::aws::s3::PREFIX
            )],
            &["s3:PutObject", "s3:GetObject", "s3:DeleteObject"],
        );
    }
    if let Some(group) = &plan.ssm_log_group {
        // The output the agent streams there, read as it comes: on the group's streams
        // (`log-group:NAME:*` covers them, whichever of the two IAM checks the call against).
        grants.allow(
            Scope::Any,
            &[&format!("arn:aws:logs:*:*:log-group:{group}:*")],
            &["logs:GetLogEvents"],
        );
    }
}

fn bake(grants: &mut Grants, plan: &BakePlan, backends: &[Backend]) {
    ami_ref(grants, &plan.build.base_ami);
    if let Some(key) = &plan.build.kms_key_id {
        kms(grants, key);
    }
    grants.allow(Scope::Any, &["*"], &["ec2:DescribeSnapshots"]);
    for backend in backends {
        match backend {
            Backend::Attach => {
                grants.allow(
                    Scope::Any,
                    &["*"],
                    &["ec2:DescribeVolumes", "ec2:DescribeInstances"],
                );
                grants.create("ec2:CreateVolume", &[VOLUME], &[], &[SNAPSHOT]);
                // The build host is this machine, not the run's: not tag-scoped.
                grants.allow(
                    Scope::Any,
                    &[INSTANCE],
                    &["ec2:AttachVolume", "ec2:DetachVolume"],
                );
                grants.allow(
                    Scope::Owned,
                    &[VOLUME],
                    &["ec2:AttachVolume", "ec2:DetachVolume", "ec2:DeleteVolume"],
                );
                grants.create("ec2:CreateSnapshot", &[SNAPSHOT], &[VOLUME], &[]);
            }
            Backend::Direct => {
                grants.allow(
                    Scope::Any,
                    &["*"],
                    &["sts:GetCallerIdentity", "ec2:GetEbsEncryptionByDefault"],
                );
                // A vendor's snapshot is copied into the account to be read (and the copy
                // deleted once its blocks are cached): the source cannot carry our tag.
                grants.create("ec2:CopySnapshot", &[SNAPSHOT], &[], &[SNAPSHOT]);
                // The base's snapshot, read block by block: a vendor's cannot carry our tag.
                grants.allow(
                    Scope::Any,
                    &[SNAPSHOT],
                    &["ebs:ListSnapshotBlocks", "ebs:GetSnapshotBlock"],
                );
                grants.allow(Scope::Created, &[SNAPSHOT], &["ebs:StartSnapshot"]);
                grants.allow(
                    Scope::Owned,
                    &[SNAPSHOT],
                    &["ebs:PutSnapshotBlock", "ebs:CompleteSnapshot"],
                );
            }
        }
    }
    grants.create("ec2:RegisterImage", &[IMAGE], &[], &[SNAPSHOT]);
    if let (false, Some(instance)) = (plan.image.tests.is_empty(), &plan.build.test_instance) {
        temporary_instance(grants, instance);
    }
    publish(grants, plan.image.publish.as_ref());
    distribution(grants, &plan.image.distribution);
}

/// What resolving a base or source reference reads.
fn ami_ref(grants: &mut Grants, reference: &AmiRef) {
    if let AmiRef::Ssm { parameter, .. } = reference {
        grants.allow(
            Scope::Any,
            &[&parameter_arn(parameter)],
            &["ssm:GetParameter"],
        );
    }
}

fn publish(grants: &mut Grants, channel: Option<&SsmPublish>) {
    let Some(channel) = channel else { return };
    let arn = parameter_arn(&channel.parameter);
    grants.allow(
        Scope::Any,
        &[&arn],
        &[
            "ssm:GetParameter",
            "ssm:GetParameterHistory",
            "ssm:PutParameter",
            "ssm:LabelParameterVersion",
            // A failed first publication puts the channel back to no parameter at all.
            "ssm:DeleteParameter",
        ],
    );
}

fn distribution(grants: &mut Grants, plan: &Distribution) {
    if plan.is_empty() {
        return;
    }
    if !plan.copy_to_regions.is_empty() {
        grants.create("ec2:CopyImage", &[IMAGE, SNAPSHOT], &[IMAGE], &[]);
    }
    for key in plan.kms_key_ids.values() {
        kms(grants, key);
    }
    if plan.deprecate_after.is_some() {
        grants.allow(Scope::Owned, &[IMAGE], &["ec2:EnableImageDeprecation"]);
    }
    if plan.imds_v2_only || !plan.share_with_accounts.is_empty() {
        grants.allow(Scope::Owned, &[IMAGE], &["ec2:ModifyImageAttribute"]);
    }
    if !plan.share_with_accounts.is_empty() {
        grants.allow(Scope::Any, &["*"], &["ec2:DescribeImageAttribute"]);
    }
}

/// DescribeKey, which amibake calls; EBS itself uses the key for the run's volumes.
fn kms(grants: &mut Grants, key: &str) {
    let resource = if key.starts_with("arn:") {
        key.to_string()
    } else {
        "arn:aws:kms:*:*:key/*".to_string()
    };
    grants.allow(Scope::Any, &[&resource], &["kms:DescribeKey"]);
}

/// `/amibake/shop/deploy` as IAM names it, in any region and account.
fn parameter_arn(name: &str) -> String {
    format!("arn:aws:ssm:*:*:parameter/{}", name.trim_start_matches('/'))
}
