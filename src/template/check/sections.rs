//! The sections: `[base]` and `[bake]`, the instance each launches, their channel and
//! their distribution.

use super::rules::{is_account_name, is_region_name};
use super::*;
use crate::template::CommunicatorKind;

/// How long a run waits for SSH, or for the SSM agent to register, when the template does
/// not say: vendor images on small instance types can take minutes to boot.
const DEFAULT_REACH_TIMEOUT: Duration = Duration::from_secs(300);

/// How a temporary instance is reached, as its keys say.
struct Reach {
    communicator: CommunicatorKind,
    ssh_username: String,
    reach_timeout: Duration,
    ssm_log_group: Option<String>,
    ssm_bucket: Option<String>,
}

impl Checker<'_> {
    pub(super) fn base(&mut self, s: BaseSection) -> BasePlan {
        let image = self.image("base", s.image_keys());
        let source_ami = self.ami_ref("base.source_ami", &s.source_ami);
        let instance = self.instance("base", s.instance_keys());
        Plan {
            image,
            build: BaseBuild {
                source_ami,
                instance,
            },
        }
    }

    /// The keys both sections share, checked once; `section` prefixes every key.
    fn image(&mut self, section: &str, keys: ImageKeys) -> ImagePlan {
        ImagePlan {
            name: self.ami_name(&format!("{section}.name"), keys.name),
            description: self.opt_public_text(&format!("{section}.description"), keys.description),
            publish: self.publish(section, keys.publish_ssm, keys.publish_label),
            distribution: self.distribution(section, &keys),
            tags: self.tags(section, keys.tags),
            provisioners: self.provisioners(section, keys.provisioners),
            pre: self.stage(&format!("{section}.pre"), keys.pre),
            post: self.stage(&format!("{section}.post"), keys.post),
            tests: self.tests(section, keys.tests),
            variant: Variant::default(),
        }
    }

    /// How a temporary instance is launched and reached; `section` prefixes every key.
    /// Long because an instance has many keys, each checked in turn.
    fn instance(&mut self, section: &str, s: InstanceKeys) -> InstancePlan {
        let key = |name: &str| format!("{section}.{name}");
        let instance_type = self.text(&key("instance_type"), s.instance_type);
        if !instance_type.contains('.')
            || instance_type.starts_with('.')
            || instance_type.ends_with('.')
        {
            self.error(
                Some(s.instance_type.span()),
                &key("instance_type"),
                format!("`{instance_type}` is not an instance type like `t3.small`"),
            );
        }
        let Reach {
            communicator,
            ssh_username,
            reach_timeout,
            ssm_log_group,
            ssm_bucket,
        } = self.reach(section, &s);
        let ssh_keypair = match (s.ssh_keypair_name, s.ssh_private_key_file) {
            (Some(name), Some(file)) => {
                let name = self.text(&key("ssh_keypair_name"), name);
                self.local_file(&key("ssh_private_key_file"), file)
                    .map(|private_key_file| ExistingKeyPair {
                        name,
                        private_key_file,
                    })
            }
            (Some(name), None) => {
                self.error(
                    Some(name.span()),
                    &key("ssh_keypair_name"),
                    "an existing key pair needs `ssh_private_key_file`, the private key to log in with".into(),
                );
                None
            }
            (None, Some(file)) => {
                self.error(
                    Some(file.span()),
                    &key("ssh_private_key_file"),
                    "a private key file goes with `ssh_keypair_name`, the key pair EC2 installs it from".into(),
                );
                None
            }
            (None, None) => None,
        };
        if let (Some(cidrs), Some(_)) = (s.ssh_cidrs, s.security_group_ids) {
            self.error(
                Some(cidrs.span()),
                &key("ssh_cidrs"),
                "`ssh_cidrs` shapes the temporary security group, which `security_group_ids` replaces: set one of them".into(),
            );
        }
        let ssh_cidrs = s.ssh_cidrs.as_ref().map(|list| {
            list.get_ref()
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let key = key(&format!("ssh_cidrs[{i}]"));
                    let v = self.text(&key, c);
                    if !is_ipv4_cidr(&v) {
                        self.error(
                            Some(c.span()),
                            &key,
                            format!("`{v}` is not an IPv4 CIDR like 203.0.113.7/32"),
                        );
                    }
                    v
                })
                .collect()
        });
        let security_group_ids = s.security_group_ids.as_ref().map(|list| {
            list.get_ref()
                .iter()
                .enumerate()
                .map(|(i, g)| self.prefixed_id(&key(&format!("security_group_ids[{i}]")), g, "sg-"))
                .collect()
        });
        let subnet_id = s
            .subnet_id
            .as_ref()
            .map(|v| self.prefixed_id(&key("subnet_id"), v, "subnet-"));
        let (root_volume_size_gb, root_volume_type) = self.volume(
            &key("root_volume_"),
            s.root_volume_size_gb,
            s.root_volume_type,
        );
        InstancePlan {
            table: section.to_string(),
            instance_type,
            communicator,
            ssh_username,
            ssh_interface: s.ssh_interface.as_ref().map(|i| *i.get_ref()),
            reach_timeout,
            ssm_log_group,
            ssm_bucket,
            ssh_keypair,
            ssh_cidrs,
            subnet_id,
            security_group_ids,
            associate_public_ip: s.associate_public_ip,
            iam_instance_profile: self
                .opt_text(&key("iam_instance_profile"), s.iam_instance_profile),
            // Anyone who may describe the instance reads its user data.
            user_data: self.opt_public_text(&key("user_data"), s.user_data),
            root_volume_size_gb,
            root_volume_type,
        }
    }

    /// The communicator and what goes with it: SSH needs its user, and SSM an instance
    /// profile and none of SSH's keys (it opens no port and logs in as nobody).
    fn reach(&mut self, section: &str, s: &InstanceKeys) -> Reach {
        let communicator = s
            .communicator
            .as_ref()
            .map(|c| *c.get_ref())
            .unwrap_or_default();
        match communicator {
            CommunicatorKind::Ssh => self.reach_over_ssh(section, s),
            CommunicatorKind::Ssm => self.reach_over_ssm(section, s),
        }
    }

    fn reach_over_ssh(&mut self, section: &str, s: &InstanceKeys) -> Reach {
        let key = |name: &str| format!("{section}.{name}");
        if let Some(t) = s.agent_timeout_seconds {
            self.error(
                Some(t.span()),
                &key("agent_timeout_seconds"),
                "the SSM agent's wait goes with `communicator = \"ssm\"`; over SSH it is `ssh_timeout_seconds`".into(),
            );
        }
        if let Some(group) = s.ssm_log_group {
            self.error(
                Some(group.span()),
                &key("ssm_log_group"),
                "goes with `communicator = \"ssm\"`: over SSH a command's output comes as it is written".into(),
            );
        }
        if let Some(bucket) = s.ssm_bucket {
            self.error(
                Some(bucket.span()),
                &key("ssm_bucket"),
                "goes with `communicator = \"ssm\"`: over SSH a file of any size goes straight to the instance".into(),
            );
        }
        let ssh_username = match s.ssh_username {
            Some(user) => self.text(&key("ssh_username"), user),
            None => String::new(),
        };
        match s.ssh_username {
            Some(user) if ssh_username.is_empty() => self.error(
                Some(user.span()),
                &key("ssh_username"),
                "the SSH user cannot be empty".into(),
            ),
            Some(_) => {}
            // Said where the instance is described: the key has no place of its own.
            None => self.error(
                Some(s.instance_type.span()),
                &key("ssh_username"),
                "missing: the user to log in as over SSH (`admin`, `ec2-user`, `ubuntu`), or `communicator = \"ssm\"` to reach the instance without SSH".into(),
            ),
        }
        Reach {
            communicator: CommunicatorKind::Ssh,
            ssh_username,
            reach_timeout: self.reach_timeout(&key("ssh_timeout_seconds"), s.ssh_timeout_seconds),
            ssm_log_group: None,
            ssm_bucket: None,
        }
    }

    fn reach_over_ssm(&mut self, section: &str, s: &InstanceKeys) -> Reach {
        let key = |name: &str| format!("{section}.{name}");
        let ssh_only: [(&str, Option<Range<usize>>); 6] = [
            ("ssh_username", s.ssh_username.as_ref().map(|v| v.span())),
            ("ssh_interface", s.ssh_interface.as_ref().map(|v| v.span())),
            (
                "ssh_timeout_seconds",
                s.ssh_timeout_seconds.as_ref().map(|v| v.span()),
            ),
            (
                "ssh_keypair_name",
                s.ssh_keypair_name.as_ref().map(|v| v.span()),
            ),
            (
                "ssh_private_key_file",
                s.ssh_private_key_file.as_ref().map(|v| v.span()),
            ),
            ("ssh_cidrs", s.ssh_cidrs.as_ref().map(|v| v.span())),
        ];
        for (name, span) in ssh_only {
            if span.is_some() {
                self.error(
                    span,
                    &key(name),
                    "has no use with `communicator = \"ssm\"`, which opens no port, makes no key pair and runs commands as root".into(),
                );
            }
        }
        if s.iam_instance_profile.is_none() {
            self.error(
                s.communicator.as_ref().map(|c| c.span()),
                &key("communicator"),
                "SSM reaches an instance through its instance profile: name one whose role has AWS's AmazonSSMManagedInstanceCore policy in `iam_instance_profile`".into(),
            );
        }
        let ssm_log_group = s
            .ssm_log_group
            .as_ref()
            .map(|group| self.log_group(&key("ssm_log_group"), group));
        let ssm_bucket = s
            .ssm_bucket
            .as_ref()
            .map(|bucket| self.bucket(&key("ssm_bucket"), bucket));
        Reach {
            communicator: CommunicatorKind::Ssm,
            ssh_username: String::new(),
            reach_timeout: self
                .reach_timeout(&key("agent_timeout_seconds"), s.agent_timeout_seconds),
            ssm_log_group,
            ssm_bucket,
        }
    }

    /// An S3 bucket's name, as S3 names a new one: 3 to 63 lowercase letters, digits, `.`
    /// and `-`, starting and ending with a letter or digit, with no `..` and not shaped like
    /// an IP address. Public: it is part of the IAM policy and of commands SSM keeps.
    fn bucket(&mut self, key: &str, value: &Spanned<String>) -> String {
        let name = self.public_text(key, value);
        let bad = name
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || ".-".contains(*c)));
        let ends_well = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
        let problem = match bad {
            _ if !(3..=63).contains(&name.len()) => {
                Some(format!("`{name}` is not 3 to 63 characters long"))
            }
            Some(c) => Some(format!(
                "`{name}` holds `{c}`: a bucket's name is lowercase letters, digits, `.` and `-`"
            )),
            None if !ends_well(name.chars().next()) || !ends_well(name.chars().last()) => Some(
                format!("`{name}` must start and end with a letter or a digit"),
            ),
            None if name.contains("..") => Some(format!("`{name}` holds `..`")),
            None if name.parse::<std::net::Ipv4Addr>().is_ok() => {
                Some(format!("`{name}` is an IP address, not a bucket's name"))
            }
            None => None,
        };
        if let Some(problem) = problem {
            self.error(Some(value.span()), key, problem);
        }
        name
    }

    /// A CloudWatch Logs group's name, as CloudWatch Logs takes it: 1 to 512 of letters,
    /// digits and `_-./#`, not in AWS's own `aws/`. Public: it is part of every command SSM
    /// keeps, and of the IAM policy.
    fn log_group(&mut self, key: &str, value: &Spanned<String>) -> String {
        let name = self.public_text(key, value);
        let bad = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "_-./#".contains(*c)));
        let problem = match bad {
            _ if name.is_empty() || name.len() > 512 => {
                Some(format!("`{name}` is not 1 to 512 characters long"))
            }
            _ if name.starts_with("aws/") => Some(format!(
                "`{name}`: names that start with `aws/` are AWS's own, and CloudWatch Logs makes no such group"
            )),
            Some(c) => Some(format!(
                "`{name}` holds `{c}`: a log group's name is letters, digits and `_-./#`"
            )),
            None => None,
        };
        if let Some(problem) = problem {
            self.error(Some(value.span()), key, problem);
        }
        name
    }

    /// How long to wait for the instance to answer: `key`'s seconds, or the default.
    fn reach_timeout(&mut self, key: &str, value: &Option<Spanned<u64>>) -> Duration {
        match value {
            Some(t) if *t.get_ref() == 0 => {
                self.error(Some(t.span()), key, "must be more than 0".into());
                DEFAULT_REACH_TIMEOUT
            }
            Some(t) => Duration::from_secs(*t.get_ref()),
            None => DEFAULT_REACH_TIMEOUT,
        }
    }

    fn prefixed_id(&mut self, key: &str, value: &Spanned<String>, prefix: &str) -> String {
        let v = self.text(key, value);
        if !v.starts_with(prefix) {
            self.error(
                Some(value.span()),
                key,
                format!("`{v}` is not an id starting with `{prefix}`"),
            );
        }
        v
    }

    fn publish(
        &mut self,
        section: &str,
        parameter: &Option<Spanned<String>>,
        label: &Option<Spanned<String>>,
    ) -> Option<SsmPublish> {
        if let (None, Some(l)) = (parameter, label) {
            self.error(
                Some(l.span()),
                &format!("{section}.publish_label"),
                "`publish_label` labels a version of `publish_ssm`, which is not set".into(),
            );
        }
        let p = parameter.as_ref()?;
        let name = self.text(&format!("{section}.publish_ssm"), p);
        if !name.starts_with('/')
            || name.len() < 2
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "/_.-".contains(c))
        {
            self.error(Some(p.span()), &format!("{section}.publish_ssm"), format!("`{name}` is not an SSM parameter name: start with `/`, use letters, digits and / _ . -"));
        } else if name.starts_with("/aws/") || name.starts_with("/ssm/") {
            self.error(
                Some(p.span()),
                &format!("{section}.publish_ssm"),
                format!(
                    "`{name}` is under a prefix AWS reserves; use your own, like /amibake/APP/{section}"
                ),
            );
        }
        let label = label.as_ref().map(|l| {
            let v = self.text(&format!("{section}.publish_label"), l);
            let lower = v.to_ascii_lowercase();
            if v.is_empty() || v.starts_with(|c: char| c.is_ascii_digit()) || lower.starts_with("aws") || lower.starts_with("ssm") {
                self.error(Some(l.span()), &format!("{section}.publish_label"), format!("`{v}` is not a valid SSM label: it cannot be empty, start with a digit, or with aws/ssm"));
            }
            v
        });
        Some(SsmPublish {
            parameter: name,
            label,
        })
    }

    /// A list of distinct values, each `valid` (else "is not `what`"): an entry that is not,
    /// or that is listed twice, is an error at its own line and column.
    fn distinct_list(
        &mut self,
        key: &str,
        list: Option<&Spanned<Vec<Spanned<String>>>>,
        valid: impl Fn(&str) -> bool,
        what: &str,
    ) -> Vec<String> {
        let mut values: Vec<String> = Vec::new();
        for (i, entry) in list.iter().flat_map(|l| l.get_ref().iter().enumerate()) {
            let key = format!("{key}[{i}]");
            let value = self.text(&key, entry);
            if !valid(&value) {
                self.error(Some(entry.span()), &key, format!("`{value}` is not {what}"));
            } else if values.contains(&value) {
                self.error(
                    Some(entry.span()),
                    &key,
                    format!("`{value}` is listed twice"),
                );
            } else {
                values.push(value);
            }
        }
        values
    }

    /// Where the image goes beyond its own region and who may launch it; the keys are the
    /// same in both sections.
    fn distribution(&mut self, section: &str, keys: &ImageKeys) -> Distribution {
        let copy_to_regions = self.distinct_list(
            &format!("{section}.copy_to_regions"),
            keys.copy_to_regions.as_ref(),
            is_region_name,
            "a region name like eu-west-1",
        );
        let share_with_accounts = self.distinct_list(
            &format!("{section}.share_with_accounts"),
            keys.share_with_accounts.as_ref(),
            |account| account.len() == 12 && account.chars().all(|c| c.is_ascii_digit()),
            "an AWS account id (12 digits)",
        );
        let mut kms_key_ids = BTreeMap::new();
        for (region, k) in keys.kms_key_ids {
            let key = format!("{section}.kms_key_ids.{region}");
            let value = self.text(&key, k);
            if !copy_to_regions.contains(region) {
                self.error(Some(k.span()), &key, format!("`{region}` is not in `{section}.copy_to_regions`: a key here encrypts that region's copy"));
            } else if value.is_empty() {
                self.error(Some(k.span()), &key, "a KMS key id, ARN or alias".into());
            }
            kms_key_ids.insert(region.clone(), value);
        }
        let deprecate_after = keys.deprecate_after.as_ref().and_then(|d| {
            let key = format!("{section}.deprecate_after");
            let text = self.text(&key, d);
            // EC2 takes a deprecation time at most 10 years ahead.
            const TEN_YEARS: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
            match humantime::parse_duration(&text) {
                Ok(after) if after >= Duration::from_secs(60) && after <= TEN_YEARS => Some(after),
                Ok(_) => {
                    self.error(
                        Some(d.span()),
                        &key,
                        format!("`{text}`: between a minute and 10 years, as EC2 takes it"),
                    );
                    None
                }
                Err(e) => {
                    self.error(
                        Some(d.span()),
                        &key,
                        format!("`{text}` is not a duration like 90d or 12w: {e}"),
                    );
                    None
                }
            }
        });
        let imds_v2_only = keys.imds_support.as_ref().is_some_and(|v| {
            let key = format!("{section}.imds_support");
            let text = self.text(&key, v);
            if text != "v2.0" {
                self.error(
                    Some(v.span()),
                    &key,
                    format!("`{text}`: the one value EC2 takes is \"v2.0\""),
                );
            }
            text == "v2.0"
        });
        Distribution {
            copy_to_regions,
            share_with_accounts,
            kms_key_ids,
            deprecate_after,
            imds_v2_only,
        }
    }

    fn sandbox_mode(&mut self, value: &Option<Spanned<String>>) -> SandboxMode {
        let Some(value) = value else {
            return SandboxMode::default();
        };
        let text = self.text("bake.sandbox", value);
        match text.as_str() {
            "private" => SandboxMode::Private,
            "compat" => SandboxMode::Compat,
            _ => {
                self.error(
                    Some(value.span()),
                    "bake.sandbox",
                    format!("`{text}`: expected \"private\" (the default) or \"compat\""),
                );
                SandboxMode::default()
            }
        }
    }

    /// `[bake]`.
    pub(super) fn bake(&mut self, s: BakeSection) -> BakePlan {
        let image = self.image("bake", s.image_keys());
        let base_ami = self.ami_ref("bake.base_ami", &s.base_ami);
        let dest = self.text("bake.dest", &s.dest);
        if !dest.starts_with('/') || dest.split('/').any(|part| part == ".." || part == ".") {
            self.error(
                Some(s.dest.span()),
                "bake.dest",
                format!("`{dest}` must be an absolute path in the image without `.` or `..`"),
            );
        }
        let owner = s.owner.as_ref().map(|o| {
            let v = self.text("bake.owner", o);
            let valid =
                !v.is_empty() && v.split(':').count() <= 2 && v.split(':').all(is_account_name);
            if !valid {
                self.error(
                    Some(o.span()),
                    "bake.owner",
                    format!("`{v}` is not `user` or `user:group`"),
                );
            }
            v
        });
        // GPT allows 128 partitions; anything above is a typo.
        const MAX_PARTITION: u32 = 128;
        if let Some(p) = &s.root_partition {
            if *p.get_ref() > MAX_PARTITION {
                self.error(Some(p.span()), "bake.root_partition", format!("partition {} is beyond the {MAX_PARTITION} a disk can have (0 means the whole device)", p.get_ref()));
            }
        }
        let (root_volume_size_gb, root_volume_type) = self.volume(
            "bake.root_volume_",
            &s.root_volume_size_gb,
            &s.root_volume_type,
        );
        let test_instance = s
            .test_instance
            .as_ref()
            .map(|t| self.instance("bake.test_instance", t.instance_keys()));
        Plan {
            image,
            build: BakeBuild {
                base_ami,
                // `/` stays itself: a tarball may lay files over the whole image.
                dest: match dest.trim_end_matches('/') {
                    "" => "/".to_string(),
                    trimmed => trimmed.to_string(),
                },
                owner,
                keep_setuid: s.keep_setuid.map(|k| *k.get_ref()).unwrap_or(false),
                sandbox: self.sandbox_mode(&s.sandbox),
                root_partition: s.root_partition.map(|p| *p.get_ref()),
                root_volume_type,
                root_volume_size_gb,
                kms_key_id: self.opt_text("bake.kms_key_id", &s.kms_key_id),
                test_instance,
            },
        }
    }
}
