//! The two modes, `base` and `bake`: each says what is its own (its table, how it makes
//! its image) to the one `lifecycle`, and ends in the one `image` tail.

pub mod bake;
pub mod base;
mod distribute;
mod image;
mod instance;
mod lifecycle;
mod stages;
mod support;

use std::path::PathBuf;

use crate::aws::ami::AmiError;
use crate::aws::host::HostError;
use crate::aws::kms::KeyError;
use crate::aws::{AwsError, AwsOptions, NoRegion};
use crate::engine::{self, RunReport};
use crate::template::{Secrets, TemplateError, Variant};

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
    /// The instance profile an instance reached through SSM needs.
    #[error(transparent)]
    Profile(#[from] crate::aws::iam::ProfileError),
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
    /// The base image's programs cannot run on this host (found before anything is made).
    #[error(transparent)]
    Emulator(#[from] crate::sandbox::emulator::EmulatorError),
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
            | ModeError::Emulator(_)
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
