//! Templates: the TOML file a team writes once per application, turned into a checked plan
//! for `base` and `bake` before any AWS call is made.
//!
//! Loading is one pass: parse (serde refuses unknown keys and wrong types), then check and
//! resolve every value (`${...}` references, AMI references, file paths, AWS naming rules),
//! collecting every problem with the file, line, column and key it belongs to.

mod ami_ref;
mod check;
mod diagnostic;
mod interpolate;
mod read;
mod schema;
mod variables;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

pub use ami_ref::{AmiFilter, AmiRef, SsmSelector};
pub use check::is_ipv4_cidr;
pub use diagnostic::{Diagnostic, TemplateErrors};
pub use interpolate::{Commit, Context, Secrets};
pub use schema::{CommunicatorKind, SshInterface};
pub use variables::VariableInputs;

/// A template that passed every check, with every reference resolved.
#[derive(Debug, Clone, Serialize)]
pub struct Template {
    pub path: PathBuf,
    pub base: Option<BasePlan>,
    pub bake: Option<BakePlan>,
    /// What came from `${env.…}` and sensitive variables: masked in everything amibake
    /// prints.
    #[serde(skip)]
    pub secrets: interpolate::Secrets,
    /// `validate --syntax-only`: what a run must have that this check did without, as
    /// `${env.NAME}` or `var.NAME`.
    #[serde(skip)]
    pub needed_at_run_time: Vec<String>,
}

/// A section checked into a plan: the image it makes, which both modes describe, deliver
/// and publish the same way, and how its mode builds it.
#[derive(Debug, Clone, Serialize)]
pub struct Plan<B> {
    #[serde(flatten)]
    pub image: ImagePlan,
    #[serde(flatten)]
    pub build: B,
}

/// `[base]`, checked.
pub type BasePlan = Plan<BaseBuild>;
/// `[bake]`, checked.
pub type BakePlan = Plan<BakeBuild>;

/// What the two sections share: the image's name and tags, where it goes, who publishes
/// it, and the commands run in it, around it and on it once booted.
#[derive(Debug, Clone, Serialize)]
pub struct ImagePlan {
    pub name: String,
    pub description: Option<String>,
    pub publish: Option<SsmPublish>,
    pub distribution: Distribution,
    pub tags: BTreeMap<String, String>,
    pub provisioners: Vec<Provisioner>,
    pub pre: Vec<StageCommand>,
    pub post: Vec<StageCommand>,
    /// Run over SSH on an instance of the new image before it is published.
    pub tests: Vec<Provisioner>,
    /// Set by `for_variant`: normal until a run asks for `--destructive`.
    pub variant: Variant,
}

/// How `base` builds: an instance of the source AMI, provisioned over SSH.
#[derive(Debug, Clone, Serialize)]
pub struct BaseBuild {
    pub source_ami: AmiRef,
    /// The instance the base is provisioned on, and its tests' instance.
    pub instance: InstancePlan,
}

/// How a temporary instance is launched and reached over SSH.
#[derive(Debug, Clone, Serialize)]
pub struct InstancePlan {
    /// The template's table that sets it (`base`, `bake.test_instance`), for what is said of
    /// its settings.
    pub table: String,
    pub instance_type: String,
    /// How the run reaches the instance.
    pub communicator: CommunicatorKind,
    /// Empty with `communicator = "ssm"`, which logs in as nobody.
    pub ssh_username: String,
    /// None: the public address when the instance has one, else the private one.
    pub ssh_interface: Option<SshInterface>,
    /// How long the instance may take to answer over SSH, or its agent to register with
    /// SSM.
    pub reach_timeout: Duration,
    /// Over SSM: the CloudWatch Logs group each command's output streams into.
    pub ssm_log_group: Option<String>,
    /// Over SSM: the S3 bucket that files too large for commands go through.
    pub ssm_bucket: Option<String>,
    /// Set when the template names its key pair; otherwise a temporary one is made.
    pub ssh_keypair: Option<ExistingKeyPair>,
    pub ssh_cidrs: Option<Vec<String>>,
    pub subnet_id: Option<String>,
    pub security_group_ids: Option<Vec<String>>,
    pub associate_public_ip: Option<bool>,
    pub iam_instance_profile: Option<String>,
    pub user_data: Option<String>,
    pub root_volume_size_gb: Option<i32>,
    pub root_volume_type: Option<String>,
}

/// `bake.sandbox`: whether root in the image is nobody on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxMode {
    /// Its own user namespace and an idmapped image (Linux 5.12 or later); refused where
    /// the kernel cannot.
    #[default]
    Private,
    /// Root in the sandbox is root on the host, held by the other walls: an opt-in, said
    /// in the output and recorded in the manifest and tags.
    Compat,
}

impl SandboxMode {
    pub fn name(self) -> &'static str {
        match self {
            SandboxMode::Private => "private",
            SandboxMode::Compat => "compat",
        }
    }
}

/// How `bake` builds: the tarball and provisioners put into an image of the base AMI.
#[derive(Debug, Clone, Serialize)]
pub struct BakeBuild {
    pub base_ami: AmiRef,
    pub dest: String,
    pub owner: Option<String>,
    pub keep_setuid: bool,
    pub sandbox: SandboxMode,
    pub root_partition: Option<u32>,
    pub root_volume_type: Option<String>,
    pub root_volume_size_gb: Option<i32>,
    pub kms_key_id: Option<String>,
    /// What the image is booted on for its tests: `[bake.test_instance]`, else the
    /// `[base]` table's instance. Set whenever there are tests.
    pub test_instance: Option<InstancePlan>,
}

/// Where a finished image goes beyond the region it was made in, and who may launch it.
/// Applied to the image and to every copy, and checked on each once it is available.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Distribution {
    /// Each gets a copy, in parallel, with the image's tags and its own channel version.
    pub copy_to_regions: Vec<String>,
    pub share_with_accounts: Vec<String>,
    /// Per copy region: the key its copy is encrypted with. Without one, a copy is
    /// encrypted as its source is (with that region's default key).
    pub kms_key_ids: BTreeMap<String, String>,
    /// Deprecated this long after the build.
    pub deprecate_after: Option<Duration>,
    /// `imds_support = "v2.0"`.
    pub imds_v2_only: bool,
}

impl Distribution {
    /// Whether anything beyond the image itself is asked for.
    pub fn is_empty(&self) -> bool {
        self.copy_to_regions.is_empty()
            && self.share_with_accounts.is_empty()
            && self.deprecate_after.is_none()
            && !self.imds_v2_only
    }
}

/// A key pair the template brings: its name in EC2 and the private key on this machine.
#[derive(Debug, Clone, Serialize)]
pub struct ExistingKeyPair {
    pub name: String,
    pub private_key_file: PathBuf,
}

/// A channel: the parameter each build writes its AMI id to, so bakes, launch templates and
/// deployments `resolve:ssm:` it; and the label that marks the version in use, if any.
#[derive(Debug, Clone, Serialize)]
pub struct SsmPublish {
    pub parameter: String,
    pub label: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Provisioner {
    /// Shown beside its output: the entry's `name`, or what it runs.
    pub name: String,
    pub action: ProvisionerAction,
    pub env: BTreeMap<String, String>,
    /// Bake only: which network the command has.
    pub network: Network,
    pub when: When,
    /// Each command is cut after this long, failing the build. Tests always have one.
    pub timeout: Option<Duration>,
}

/// A command a pipeline stage runs on this machine, as an argument vector (never a shell
/// string), in the template's directory.
#[derive(Debug, Clone, Serialize)]
pub struct StageCommand {
    /// Shown beside its output: the entry's `name`, or the command.
    pub name: String,
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub when: When,
    pub timeout: Duration,
    pub dir: PathBuf,
}

/// Which variant of a build runs a provisioner or stage command: `--destructive` runs the
/// destructive ones instead of the normal ones; both run those that say nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum When {
    #[default]
    Always,
    Normal,
    Destructive,
}

impl When {
    pub fn runs_in(self, variant: Variant) -> bool {
        match self {
            When::Always => true,
            When::Normal => variant == Variant::Normal,
            When::Destructive => variant == Variant::Destructive,
        }
    }
}

/// A build's variant: `normal`, or `destructive` (resets data, for first or non-production
/// environments). Part of the fingerprint and tagged on the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    #[default]
    Normal,
    Destructive,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Normal => "normal",
            Variant::Destructive => "destructive",
        }
    }
}

impl<B> Plan<B> {
    /// The plan as `variant` runs it: only its provisioners, tests and stage commands.
    pub fn for_variant(mut self, variant: Variant) -> Plan<B> {
        let image = &mut self.image;
        for list in [&mut image.provisioners, &mut image.tests] {
            list.retain(|p| p.when.runs_in(variant));
        }
        for list in [&mut image.pre, &mut image.post] {
            list.retain(|c| c.when.runs_in(variant));
        }
        image.variant = variant;
        self
    }
}

/// The network a bake provisioner's command has (a base instance always has its own).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    /// None at all: the default.
    #[default]
    None,
    /// `network = true`: a namespace of its own that reaches the outside, never the build
    /// host's loopback but `host_ports`, nor (unless `metadata`, `allow_imds = true`) the
    /// endpoints that hand out the host's credentials.
    Outside {
        metadata: bool,
        host_ports: Vec<u16>,
    },
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProvisionerAction {
    /// A local script, uploaded and run.
    Script(PathBuf),
    /// Commands run one after another; the first to fail stops the build.
    Inline(Vec<String>),
    /// A local file copied to `destination` in the image.
    Upload {
        source: PathBuf,
        destination: String,
    },
}

/// What a run knows before it reads the template.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Values for the variables declared under `[variables]`.
    pub variables: VariableInputs,
    pub commit: Commit,
    pub timestamp: String,
    pub build_id: String,
    /// `validate --syntax-only`: an unset `${env.NAME}` or a variable without a value is
    /// noted as needed at run time rather than refused.
    pub secret_free: bool,
}

impl LoadOptions {
    /// `validate`: stand-in values for what only a run knows.
    /// Shaped like the real values, so AMI-name rules are checked against realistic lengths.
    pub fn for_validation(variables: VariableInputs) -> LoadOptions {
        LoadOptions {
            variables,
            commit: Commit::Placeholder,
            timestamp: "20260101000000".into(),
            build_id: "ab-20260101000000-0000aaaa".into(),
            secret_free: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("cannot read template {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(TemplateErrors),
}

impl TemplateError {
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            TemplateError::Invalid(errors) => &errors.0,
            TemplateError::Read { .. } => &[],
        }
    }
}

/// Reads, checks and resolves one template file.
pub fn load(path: &Path, options: &LoadOptions) -> Result<Template, TemplateError> {
    let text = std::fs::read_to_string(path).map_err(|source| TemplateError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text, options).map_err(TemplateError::Invalid)
}

/// Checks and resolves template text; `path` names it in errors and anchors relative paths.
pub fn parse(path: &Path, text: &str, options: &LoadOptions) -> Result<Template, TemplateErrors> {
    let map = diagnostic::SourceMap::new(path, text);
    let parsed = read::deserialize(&map, text)?;
    check::resolve(path, &map, parsed, options)
}
