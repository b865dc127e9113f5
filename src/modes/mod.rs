//! The two modes, each an ordered list of engine steps: `base` and `bake`.

pub mod bake;
pub mod base;
mod distribute;
mod image_test;
mod instance;
mod stages;
mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::artifact;
use crate::aws::ami::AmiError;
use crate::aws::host::HostError;
use crate::aws::kms::KeyError;
use crate::aws::{AwsError, AwsOptions, NoRegion};
use crate::engine::{self, RunReport};
use crate::template::{
    self, Commit, LoadOptions, Network, Provisioner, ProvisionerAction, Secrets, StageCommand,
    Template, TemplateError, Variant,
};

/// How a run of either mode ended: its manifest when it built or reused an image, and the
/// engine's report when the engine ran.
pub struct BuildResult<M> {
    pub manifest: Option<M>,
    pub report: Option<RunReport>,
    /// A post command's failure, masked: the run fails, and the image it made stays.
    pub post_failed: Option<String>,
}

/// What both modes are told by whoever runs them.
#[derive(Debug, Clone, Default)]
pub struct CommonOptions {
    pub aws: AwsOptions,
    pub vars: crate::template::VariableInputs,
    /// Build even if an AMI with the same fingerprint exists.
    pub force: bool,
    pub manifest: Option<PathBuf>,
    /// `--destructive`: the template's destructive provisioners and stage commands instead
    /// of its normal ones.
    pub variant: Variant,
    /// `--no-test`: the new image is not booted, and its `[[base.test]]` or `[[bake.test]]` entries do not run.
    pub skip_tests: bool,
    /// `--ssh-cidr`: who may reach SSH on a temporary instance, in place of the template's
    /// `ssh_cidrs` (empty: as the template says).
    pub ssh_cidrs: Vec<String>,
    /// `--on-error`: whether a failed run removes what it made or keeps it to be looked at.
    pub on_failure: engine::OnFailure,
}

/// Why a run stopped before its engine ran, typed to where it is printed.
#[derive(Debug, thiserror::Error)]
pub enum ModeError {
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// Bad arguments, found before any AWS call.
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    NoRegion(#[from] NoRegion),
    /// `--backend attach` where no instance metadata answers.
    #[error(transparent)]
    BuildHost(#[from] Box<HostError>),
    /// The base or source AMI could not be resolved or described.
    #[error(transparent)]
    Ami(#[from] AmiError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Aws(#[from] AwsError),
    /// A pre command failed: nothing was made.
    #[error(transparent)]
    Stage(#[from] stages::StageError),
    /// The tarball's check before any AWS call: it refused the tarball
    /// (`ExtractError::Refused`), or could not run.
    #[error("--tarball {path}")]
    Tarball {
        path: String,
        #[source]
        source: crate::host::extract::ExtractError,
    },
    /// The sandbox cannot be had as the run asks (the kernel, the host's ids).
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::ids::IdsError),
    /// A provisioner asks for the outside, and this host cannot give it.
    #[error("provisioner `{provisioner}`: {source}")]
    Network {
        provisioner: String,
        source: crate::sandbox::network::NetworkError,
    },
    /// Local work before the first step: the tarball, a script, a work directory.
    #[error("{what}")]
    Local {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl ModeError {
    pub fn local(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ModeError {
        let what = what.into();
        move |source| ModeError::Local { what, source }
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            ModeError::Template(_)
            | ModeError::Usage(_)
            | ModeError::Tarball {
                source: crate::host::extract::ExtractError::Refused(_),
                ..
            } => crate::exit::USAGE,
            _ => crate::exit::BUILD_FAILED,
        }
    }

    /// The error as it may be printed: every secret value of the template masked, as every
    /// other line a run prints is (a lookup's error may quote a name built from `${env.…}`).
    fn masked(self, secrets: &Secrets) -> RunError {
        RunError {
            error: self,
            secrets: secrets.clone(),
        }
    }
}

/// A mode's error with the template's secrets, which its text is masked with. Its text is
/// the whole cause chain, masked; `error()` is the typed error for whoever must tell kinds
/// apart.
pub struct RunError {
    error: ModeError,
    secrets: Secrets,
}

impl RunError {
    pub fn error(&self) -> &ModeError {
        &self.error
    }

    pub fn exit_code(&self) -> i32 {
        self.error.exit_code()
    }
}

impl From<ModeError> for RunError {
    /// An error from before the template (and its secrets) was read.
    fn from(error: ModeError) -> RunError {
        error.masked(&Secrets::default())
    }
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = crate::engine::error_chain(&self.error);
        f.write_str(&self.secrets.mask(&text))
    }
}

impl std::error::Error for RunError {}

impl std::fmt::Debug for RunError {
    /// Never the secrets themselves.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RunError({self})")
    }
}

/// The template's post commands, once a run has its image: its id, region and manifest (a
/// file) in their environment. Their failure fails the run, but the image stays: it is
/// kept in the result for the caller to print with the failure.
/// Takes the run's own outcome, and masks the template's secrets in any error.
async fn run_post<M: artifact::Manifest>(
    built: Result<BuildResult<M>, ModeError>,
    post: &[StageCommand],
    variant: Variant,
    sink: Arc<dyn engine::EventSink>,
    cancel: &CancellationToken,
    secrets: &Secrets,
) -> Result<BuildResult<M>, RunError> {
    let result = built.map_err(|e| e.masked(secrets))?;
    post_commands(result, post, variant, sink, cancel, secrets)
        .await
        .map_err(|e| e.masked(secrets))
}

async fn post_commands<M: artifact::Manifest>(
    mut result: BuildResult<M>,
    post: &[StageCommand],
    variant: Variant,
    sink: Arc<dyn engine::EventSink>,
    cancel: &CancellationToken,
    secrets: &Secrets,
) -> Result<BuildResult<M>, ModeError> {
    let failed_run = result
        .report
        .as_ref()
        .is_some_and(|r| !matches!(r.outcome, engine::Outcome::Succeeded));
    let Some(manifest) = result.manifest.as_ref().filter(|_| !failed_run) else {
        return Ok(result);
    };
    if post.is_empty() {
        return Ok(result);
    }
    let file = tempfile::Builder::new()
        .prefix("amibake-manifest-")
        .suffix(".json")
        .tempfile()
        .map_err(ModeError::local(
            "cannot write the manifest for the post commands",
        ))?;
    let json = serde_json::to_string(manifest).unwrap_or_default();
    std::fs::write(file.path(), format!("{json}\n")).map_err(ModeError::local(
        "cannot write the manifest for the post commands",
    ))?;
    let vars = [
        ("AMIBAKE_STAGE", "post".to_string()),
        ("AMIBAKE_AMI_ID", manifest.ami_id().to_string()),
        ("AMIBAKE_REGION", manifest.region().to_string()),
        ("AMIBAKE_MANIFEST", file.path().display().to_string()),
        ("AMIBAKE_VARIANT", variant.name().to_string()),
    ];
    let sink = engine::Masked::wrap(sink, secrets);
    if let Err(e) = stages::run("post", post, &vars, &sink, cancel).await {
        let text = secrets.mask(&engine::error_chain(&e));
        result.post_failed = Some(format!("{text}; {} exists and is kept", manifest.ami_id()));
    }
    Ok(result)
}

/// The run's lock on this machine, held for as long as the value lives.
fn hold_run_lock(build_id: &str) -> Result<crate::host::run_lock::RunLock, ModeError> {
    use crate::host::run_lock::{lock_root, RunLock};
    RunLock::acquire(build_id).map_err(ModeError::local(format!(
        "cannot take this run's lock in {}",
        lock_root().display()
    )))
}

/// A template loaded for one run, with what its end needs once the template itself is
/// handed to the run: the post commands and the secrets to mask in every error.
struct LoadedRun {
    template: Template,
    build_id: String,
    post: Vec<StageCommand>,
    secrets: Secrets,
}

/// Loads the template for a run and insists it has the section the mode needs.
fn load_for_run(
    path: &Path,
    common: &CommonOptions,
    commit: Commit,
    section: &str,
) -> Result<LoadedRun, ModeError> {
    let timestamp = crate::run_id::timestamp_now();
    let build_id = crate::run_id::new_build_id(&timestamp);
    let options = LoadOptions {
        variables: common.vars.clone(),
        commit,
        timestamp,
        build_id: build_id.clone(),
        secret_free: false,
    };
    let mut template = template::load(path, &options)?;
    template.base = template.base.map(|p| p.for_variant(common.variant));
    template.bake = template.bake.map(|p| p.for_variant(common.variant));
    // The temporary instances this mode launches: the base's own (which its tests use
    // too), or the instance a bake's tests boot.
    let instance = match section {
        "base" => template.base.as_mut().map(|p| Some(&mut p.instance)),
        _ => template.bake.as_mut().map(|p| p.test_instance.as_mut()),
    };
    let Some(instance) = instance else {
        return Err(ModeError::Usage(format!(
            "{}: no [{section}] table, so there is nothing for `amibake {section}` to build",
            path.display()
        )));
    };
    if let (Some(instance), false) = (instance, common.ssh_cidrs.is_empty()) {
        if instance.security_group_ids.is_some() {
            return Err(ModeError::Usage(format!(
                "--ssh-cidr shapes the temporary security group, which `security_group_ids` in {} replaces: use one of them",
                path.display()
            )));
        }
        instance.ssh_cidrs = Some(common.ssh_cidrs.clone());
    }
    let post = match section {
        "base" => template.base.as_ref().map(|p| p.post.clone()),
        _ => template.bake.as_ref().map(|p| p.post.clone()),
    };
    Ok(LoadedRun {
        post: post.unwrap_or_default(),
        secrets: template.secrets.clone(),
        template,
        build_id,
    })
}

/// An identical image an earlier run made (the same fingerprint), and what this run still
/// owes it.
struct Reuse {
    earlier: crate::aws::ami::EarlierBuild,
    /// No instance of it passed a test yet, and this run tests: it is booted and tested
    /// before it is published again.
    test_first: bool,
    /// Nothing is left to do: no test owed, nothing to distribute, and its channel names it.
    finished: bool,
}

/// Unless `--force`, the earlier build with `fingerprint`. A channel moved back or away
/// since is published again; one that names the image already is left alone. Copies are
/// looked for, and made where missing.
async fn reusable(
    clients: &crate::aws::Clients,
    fingerprint: &str,
    common: &CommonOptions,
    tests: &[Provisioner],
    publish: Option<&crate::template::SsmPublish>,
    distribution: &crate::template::Distribution,
) -> Result<Option<Reuse>, ModeError> {
    if common.force {
        return Ok(None);
    }
    let Some(earlier) = crate::aws::ami::find_by_fingerprint(clients, fingerprint).await? else {
        return Ok(None);
    };
    let test_first = !earlier.tested && !tests.is_empty() && !common.skip_tests;
    let finished = !test_first
        && distribution.is_empty()
        && channel_names(clients, publish, &earlier.id).await;
    Ok(Some(Reuse {
        earlier,
        test_first,
        finished,
    }))
}

/// Whether the template's channel already names `image`: its newest version, and its
/// label where it has one. True when there is no channel; a lookup that fails counts as
/// not named, so the publish step runs and reports it.
async fn channel_names(
    clients: &crate::aws::Clients,
    publish: Option<&crate::template::SsmPublish>,
    image: &str,
) -> bool {
    let Some(publish) = publish else {
        return true;
    };
    let mut names = vec![publish.parameter.clone()];
    if let Some(label) = &publish.label {
        names.push(format!("{}:{label}", publish.parameter));
    }
    for name in names {
        // A label that names no version yet is a channel to publish to, not an error.
        let value = crate::aws::ssm::value(clients, &name).await;
        if !matches!(value, Ok(Some(v)) if v == image) {
            return false;
        }
    }
    true
}

/// The part of a fingerprint the provisioners make: commands as written, the bytes of every
/// script and uploaded file, where files go, and the environment.
fn provisioner_fingerprint_parts(
    provisioners: &[Provisioner],
) -> Result<Vec<(String, String)>, ModeError> {
    let digest = |path: &Path| {
        artifact::sha256_file(path)
            .map_err(ModeError::local(format!("cannot read {}", path.display())))
    };
    let mut parts = Vec::new();
    for (i, p) in provisioners.iter().enumerate() {
        let what = match &p.action {
            ProvisionerAction::Inline(commands) => commands.join("\n"),
            ProvisionerAction::Script(path) => digest(path)?,
            ProvisionerAction::Upload {
                source,
                destination,
            } => format!("{} {destination}", digest(source)?),
        };
        let network = match &p.network {
            Network::None => String::new(),
            Network::Outside {
                metadata,
                host_ports,
            } => {
                let mut text = "\nnetwork".to_string();
                if *metadata {
                    text.push_str(" with metadata");
                }
                if !host_ports.is_empty() {
                    text.push_str(&format!(" host ports {host_ports:?}"));
                }
                text
            }
        };
        parts.push((
            format!("provisioner {i}"),
            format!("{what}\n{:?}{network}", p.env),
        ));
    }
    Ok(parts)
}
