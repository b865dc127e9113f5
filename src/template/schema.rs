//! The TOML file as written: serde structs that refuse unknown keys and keep the source span
//! of every value a later check may need to point at.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::ami_ref::AmiRef;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateFile {
    #[serde(default)]
    pub variables: BTreeMap<String, Spanned<Variable>>,
    pub base: Option<BaseSection>,
    pub bake: Option<BakeSection>,
}

/// Keys still read under an older name (serde aliases): a typo of either name is pointed
/// at the new one.
pub const OLD_NAMES: [(&str, &str); 2] = [
    ("volume_type", "root_volume_type"),
    ("volume_size_gb", "root_volume_size_gb"),
];

/// A `[variables]` entry: `name = "default"`, or a table that says more:
/// `name = { default = "…", sensitive = true, description = "…" }`. A table without
/// `default` is a variable each run must set.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VariableDecl {
    pub default: Option<String>,
    /// Masked in everything amibake prints, as `${env.…}` values are.
    #[serde(default)]
    pub sensitive: bool,
    pub description: Option<String>,
}

/// A `[variables]` value in either form. serde's derive cannot take "a string or a table"
/// without losing its error messages (an untagged enum says only that nothing matched).
#[derive(Debug)]
pub struct Variable(pub VariableDecl);

impl<'de> Deserialize<'de> for Variable {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Variable, D::Error> {
        struct Form;
        impl<'de> serde::de::Visitor<'de> for Form {
            type Value = Variable;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "a string (its default) or a table with `default`, `sensitive`, `description`",
                )
            }
            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<Variable, E> {
                Ok(Variable(VariableDecl {
                    default: Some(value.to_string()),
                    ..VariableDecl::default()
                }))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Variable, A::Error> {
                VariableDecl::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(Variable)
            }
        }
        deserializer.deserialize_any(Form)
    }
}

/// A mode's table: its own keys, then the image keys both tables share (declared here,
/// once), with `image_keys()` to hand those to the one check of them. serde cannot
/// flatten a struct into one that refuses unknown keys, so they are spelled into each.
macro_rules! section_with_image_keys {
    ($(#[$meta:meta])* pub struct $name:ident { $($own:tt)* }) => {
        $(#[$meta])*
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            pub name: Spanned<String>,
            pub description: Option<Spanned<String>>,
            $($own)*
            /// The channel: each build writes its AMI as a new version of this parameter.
            pub publish_ssm: Option<Spanned<String>>,
            pub publish_label: Option<Spanned<String>>,
            /// Other regions the image is copied to; each has its own channel version.
            pub copy_to_regions: Option<Spanned<Vec<Spanned<String>>>>,
            /// Accounts given launch permission on the image and on every copy.
            pub share_with_accounts: Option<Spanned<Vec<Spanned<String>>>>,
            /// A KMS key per copy region, to encrypt that region's copy with.
            #[serde(default)]
            pub kms_key_ids: BTreeMap<String, Spanned<String>>,
            /// How long the image (and every copy) is current: `90d`, `12w`.
            pub deprecate_after: Option<Spanned<String>>,
            /// `v2.0`: instances of the image answer only IMDSv2.
            pub imds_support: Option<Spanned<String>>,
            #[serde(default)]
            pub tags: BTreeMap<String, Spanned<String>>,
            #[serde(default, rename = "provisioner")]
            pub provisioners: Vec<Spanned<ProvisionerEntry>>,
            /// Commands on this machine before anything is made.
            #[serde(default)]
            pub pre: Vec<Spanned<StageEntry>>,
            /// Commands on this machine once the image is registered and published.
            #[serde(default)]
            pub post: Vec<Spanned<StageEntry>>,
            /// Run over SSH on an instance of the new image before it is published; a
            /// failure removes the image.
            #[serde(default, rename = "test")]
            pub tests: Vec<Spanned<ProvisionerEntry>>,
        }

        impl $name {
            pub fn image_keys(&self) -> ImageKeys<'_> {
                ImageKeys {
                    name: &self.name,
                    description: &self.description,
                    publish_ssm: &self.publish_ssm,
                    publish_label: &self.publish_label,
                    copy_to_regions: &self.copy_to_regions,
                    share_with_accounts: &self.share_with_accounts,
                    kms_key_ids: &self.kms_key_ids,
                    deprecate_after: &self.deprecate_after,
                    imds_support: &self.imds_support,
                    tags: &self.tags,
                    provisioners: &self.provisioners,
                    pre: &self.pre,
                    post: &self.post,
                    tests: &self.tests,
                }
            }
        }
    };
}

/// The image keys of either table, as written.
pub struct ImageKeys<'a> {
    pub name: &'a Spanned<String>,
    pub description: &'a Option<Spanned<String>>,
    pub publish_ssm: &'a Option<Spanned<String>>,
    pub publish_label: &'a Option<Spanned<String>>,
    pub copy_to_regions: &'a Option<Spanned<Vec<Spanned<String>>>>,
    pub share_with_accounts: &'a Option<Spanned<Vec<Spanned<String>>>>,
    pub kms_key_ids: &'a BTreeMap<String, Spanned<String>>,
    pub deprecate_after: &'a Option<Spanned<String>>,
    pub imds_support: &'a Option<Spanned<String>>,
    pub tags: &'a BTreeMap<String, Spanned<String>>,
    pub provisioners: &'a [Spanned<ProvisionerEntry>],
    pub pre: &'a [Spanned<StageEntry>],
    pub post: &'a [Spanned<StageEntry>],
    pub tests: &'a [Spanned<ProvisionerEntry>],
}

/// The keys of a temporary instance, spelled into a table made by `$section!`, with
/// `instance_keys()` to hand them to their one check: `[base]` launches its build instance
/// with them, `[bake.test_instance]` the instance its tests boot.
macro_rules! with_instance_keys {
    ($section:ident! { $(#[$meta:meta])* pub struct $name:ident { $($own:tt)* } }) => {
        $section! {
            $(#[$meta])*
            pub struct $name {
                $($own)*
                pub instance_type: Spanned<String>,
                /// `ssh` (the default) or `ssm`: how the run reaches the instance.
                pub communicator: Option<Spanned<CommunicatorKind>>,
                /// With `ssm`: how long the instance's agent may take to register it.
                pub agent_timeout_seconds: Option<Spanned<u64>>,
                /// With `ssm`: a CloudWatch Logs group the agent streams each command's
                /// output into, for the run to show it as it comes.
                pub ssm_log_group: Option<Spanned<String>>,
                /// With `ssm`: an S3 bucket that files too large for commands go through.
                pub ssm_bucket: Option<Spanned<String>>,
                /// With `ssh`, the user to log in as.
                pub ssh_username: Option<Spanned<String>>,
                pub ssh_interface: Option<Spanned<SshInterface>>,
                pub ssh_timeout_seconds: Option<Spanned<u64>>,
                /// An existing key pair, with its private key file, instead of a temporary
                /// one.
                pub ssh_keypair_name: Option<Spanned<String>>,
                pub ssh_private_key_file: Option<Spanned<String>>,
                /// Who may reach port 22 on the temporary security group. Default: this
                /// runner's address.
                pub ssh_cidrs: Option<Spanned<Vec<Spanned<String>>>>,
                pub subnet_id: Option<Spanned<String>>,
                pub security_group_ids: Option<Spanned<Vec<Spanned<String>>>>,
                pub associate_public_ip: Option<bool>,
                pub iam_instance_profile: Option<Spanned<String>>,
                pub user_data: Option<Spanned<String>>,
                pub root_volume_size_gb: Option<Spanned<i32>>,
                pub root_volume_type: Option<Spanned<String>>,
            }
        }

        impl $name {
            pub fn instance_keys(&self) -> InstanceKeys<'_> {
                InstanceKeys {
                    instance_type: &self.instance_type,
                    communicator: &self.communicator,
                    agent_timeout_seconds: &self.agent_timeout_seconds,
                    ssm_log_group: &self.ssm_log_group,
                    ssm_bucket: &self.ssm_bucket,
                    ssh_username: &self.ssh_username,
                    ssh_interface: &self.ssh_interface,
                    ssh_timeout_seconds: &self.ssh_timeout_seconds,
                    ssh_keypair_name: &self.ssh_keypair_name,
                    ssh_private_key_file: &self.ssh_private_key_file,
                    ssh_cidrs: &self.ssh_cidrs,
                    subnet_id: &self.subnet_id,
                    security_group_ids: &self.security_group_ids,
                    associate_public_ip: self.associate_public_ip,
                    iam_instance_profile: &self.iam_instance_profile,
                    user_data: &self.user_data,
                    root_volume_size_gb: &self.root_volume_size_gb,
                    root_volume_type: &self.root_volume_type,
                }
            }
        }
    };
}

/// A table with its own keys only.
macro_rules! plain_section {
    ($(#[$meta:meta])* pub struct $name:ident { $($own:tt)* }) => {
        $(#[$meta])*
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $($own)*
        }
    };
}

/// The instance keys of either table, as written.
pub struct InstanceKeys<'a> {
    pub instance_type: &'a Spanned<String>,
    pub communicator: &'a Option<Spanned<CommunicatorKind>>,
    pub agent_timeout_seconds: &'a Option<Spanned<u64>>,
    pub ssm_log_group: &'a Option<Spanned<String>>,
    pub ssm_bucket: &'a Option<Spanned<String>>,
    pub ssh_username: &'a Option<Spanned<String>>,
    pub ssh_interface: &'a Option<Spanned<SshInterface>>,
    pub ssh_timeout_seconds: &'a Option<Spanned<u64>>,
    pub ssh_keypair_name: &'a Option<Spanned<String>>,
    pub ssh_private_key_file: &'a Option<Spanned<String>>,
    pub ssh_cidrs: &'a Option<Spanned<Vec<Spanned<String>>>>,
    pub subnet_id: &'a Option<Spanned<String>>,
    pub security_group_ids: &'a Option<Spanned<Vec<Spanned<String>>>>,
    pub associate_public_ip: Option<bool>,
    pub iam_instance_profile: &'a Option<Spanned<String>>,
    pub user_data: &'a Option<Spanned<String>>,
    pub root_volume_size_gb: &'a Option<Spanned<i32>>,
    pub root_volume_type: &'a Option<Spanned<String>>,
}

with_instance_keys! {
    section_with_image_keys! {
        /// `[base]` as written.
        pub struct BaseSection {
            pub source_ami: Spanned<AmiRef>,
        }
    }
}

section_with_image_keys! {
    /// `[bake]` as written.
    pub struct BakeSection {
        pub base_ami: Spanned<AmiRef>,
        pub dest: Spanned<String>,
        /// `user` or `user:group` of the image that will own the extracted files.
        pub owner: Option<Spanned<String>>,
        /// Keep setuid and setgid bits of the tarball's files (dropped by default).
        pub keep_setuid: Option<Spanned<bool>>,
        /// `"compat"`: run the sandbox without its own user namespace, on kernels before
        /// 5.12.
        pub sandbox: Option<Spanned<String>>,
        /// Partition that holds the root filesystem; 0 is the whole device. Default: found
        /// by looking at the volume.
        pub root_partition: Option<Spanned<u32>>,
        /// The new image's root volume, as `[base]` names it; `volume_type` and
        /// `volume_size_gb`, the names before, still read.
        #[serde(alias = "volume_type")]
        pub root_volume_type: Option<Spanned<String>>,
        #[serde(alias = "volume_size_gb")]
        pub root_volume_size_gb: Option<Spanned<i32>>,
        pub kms_key_id: Option<Spanned<String>>,
        /// The instance `[[bake.test]]` boots the image on; unset: the `[base]` table's.
        pub test_instance: Option<TestInstanceSection>,
    }
}

with_instance_keys! {
    plain_section! {
        /// `[bake.test_instance]`: how the image is booted for its tests, with the keys
        /// `[base]` launches its instance with.
        pub struct TestInstanceSection {}
    }
}

/// One `[[…provisioner]]` or `[[…test]]` table as written; exactly one of `script`, `inline`, `file` is set,
/// which validation checks so the error can name the entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisionerEntry {
    pub name: Option<Spanned<String>>,
    pub script: Option<Spanned<String>>,
    pub inline: Option<Spanned<Vec<Spanned<String>>>>,
    pub file: Option<Spanned<String>>,
    pub destination: Option<Spanned<String>>,
    #[serde(default)]
    pub env: BTreeMap<String, Spanned<String>>,
    /// Bake only: give the command a network of its own that reaches the outside (it has
    /// none by default).
    pub network: Option<Spanned<bool>>,
    /// Bake only, with `network = true`: ports of the build host's loopback the command
    /// reaches (a package cache, say); it reaches none by default.
    pub host_ports: Option<Spanned<Vec<Spanned<i64>>>>,
    /// Bake only, with `network = true`: let the command reach the build host's instance
    /// metadata, and with it the host's credentials.
    pub allow_imds: Option<Spanned<bool>>,
    /// `normal` or `destructive`: the one variant this provisioner runs in.
    pub when: Option<Spanned<String>>,
    /// How long each command may run before it is cut and fails the build.
    pub timeout_seconds: Option<Spanned<u64>>,
}

/// One `[[…pre]]` or `[[…post]]` table: a command and its arguments, run without a shell.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageEntry {
    pub name: Option<Spanned<String>>,
    pub command: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    pub env: BTreeMap<String, Spanned<String>>,
    pub when: Option<Spanned<String>>,
    pub timeout_seconds: Option<Spanned<u64>>,
}

/// How a run reaches its temporary instance: over SSH from this runner, or through SSM Run
/// Command, with no key pair and no port open to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CommunicatorKind {
    #[default]
    Ssh,
    Ssm,
}

/// Which of the instance's addresses `base` connects to. Unset: the public address when
/// the instance has one, else the private one (as Packer does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SshInterface {
    PublicIp,
    PrivateIp,
    PublicDns,
    PrivateDns,
}
