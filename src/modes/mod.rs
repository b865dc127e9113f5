//! The two modes, each an ordered list of engine steps: `base` and `bake`.

pub mod bake;
pub mod base;
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::artifact;
use crate::aws::AwsOptions;
use crate::engine::RunReport;
use crate::template::{
    self, Commit, LoadOptions, Network, Provisioner, ProvisionerAction, Secrets, Template,
    TemplateError,
};

/// How a run of either mode ended: its manifest when it built or reused an image, and the
/// engine's report when the engine ran.
pub struct BuildResult<M> {
    pub manifest: Option<M>,
    pub report: Option<RunReport>,
}

/// What both modes are told by whoever runs them.
#[derive(Debug, Clone, Default)]
pub struct CommonOptions {
    pub aws: AwsOptions,
    pub vars: BTreeMap<String, String>,
    /// Build even if an AMI with the same fingerprint exists.
    pub force: bool,
    pub manifest: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ModeError {
    #[error(transparent)]
    Template(#[from] TemplateError),
    /// Bad arguments, found before any AWS call.
    #[error("{0}")]
    Usage(String),
    /// Failed before anything was created (metadata, AMI lookup, reading inputs).
    #[error("{0}")]
    Failed(String),
}

impl ModeError {
    /// The error with every secret value of the template masked, as every other line a run
    /// prints is: a lookup's error may quote a name built from `${env.…}`.
    fn masked(self, secrets: &Secrets) -> ModeError {
        match self {
            ModeError::Usage(text) => ModeError::Usage(secrets.mask(&text)),
            ModeError::Failed(text) => ModeError::Failed(secrets.mask(&text)),
            template @ ModeError::Template(_) => template,
        }
    }

    pub fn exit_code(&self) -> i32 {
        match self {
            ModeError::Template(_) | ModeError::Usage(_) => crate::exit::USAGE,
            ModeError::Failed(_) => crate::exit::BUILD_FAILED,
        }
    }
}

/// Loads the template for a run and insists it has the section the mode needs.
fn load_for_run(
    path: &Path,
    common: &CommonOptions,
    commit: Commit,
    section: &str,
) -> Result<(Template, String), ModeError> {
    let timestamp = crate::run_id::timestamp_now();
    let build_id = crate::run_id::new_build_id(&timestamp);
    let options = LoadOptions {
        var_overrides: common.vars.clone(),
        commit,
        timestamp,
        build_id: build_id.clone(),
    };
    let template = template::load(path, &options)?;
    let has_section = match section {
        "base" => template.base.is_some(),
        _ => template.bake.is_some(),
    };
    if !has_section {
        return Err(ModeError::Usage(format!(
            "{}: no [{section}] table, so there is nothing for `amibake {section}` to build",
            path.display()
        )));
    }
    Ok((template, build_id))
}

/// The part of a fingerprint the provisioners make: commands as written, the bytes of every
/// script and uploaded file, where files go, and the environment.
fn provisioner_fingerprint_parts(
    provisioners: &[Provisioner],
) -> Result<Vec<(String, String)>, ModeError> {
    let digest = |path: &Path| {
        artifact::sha256_file(path)
            .map_err(|e| ModeError::Failed(format!("cannot read {}: {e}", path.display())))
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
        let network = match p.network {
            Network::None => "",
            Network::Host => "\nnetwork",
            Network::HostWithMetadata => "\nnetwork with metadata",
        };
        parts.push((
            format!("provisioner {i}"),
            format!("{what}\n{:?}{network}", p.env),
        ));
    }
    Ok(parts)
}
