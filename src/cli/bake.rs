//! `amibake bake TEMPLATE --tarball X`: a deployment AMI from the base AMI and a code tarball.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use amibake::exit;
use amibake::modes::bake;
use amibake::template::SandboxMode;

use super::cache::CacheDirArg;
use super::{report, BuildArgs, GlobalArgs};

#[derive(Debug, Args)]
pub struct BakeArgs {
    /// The template file (TOML) with a [bake] table.
    pub template: PathBuf,
    /// The code to bake in: a .tar, .tar.gz or .tar.zst file, or - for standard input.
    #[arg(long, value_name = "PATH")]
    pub tarball: PathBuf,
    /// The commit being baked; default: the CI's commit variable, or `git rev-parse HEAD`.
    #[arg(long, value_name = "SHA")]
    pub commit: Option<String>,
    #[command(flatten)]
    pub build: BuildArgs,
    /// How the image becomes a block device here: `attach`, a volume attached to this EC2
    /// build host; `direct`, the EBS direct APIs and a loop device, anywhere; `auto`,
    /// attach when this machine's instance metadata answers, else direct.
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub backend: Backend,
    #[command(flatten)]
    pub cache: CacheDirArg,
    /// How the sandbox confines the tarball and the provisioners, over the template's
    /// `bake.sandbox`: private (root in the image is nobody here; Linux 5.12 or later) or
    /// compat (root, held by the other walls: for older kernels only).
    #[arg(long, value_enum)]
    pub sandbox: Option<Sandbox>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Sandbox {
    Private,
    Compat,
}

impl From<Sandbox> for SandboxMode {
    fn from(sandbox: Sandbox) -> SandboxMode {
        match sandbox {
            Sandbox::Private => SandboxMode::Private,
            Sandbox::Compat => SandboxMode::Compat,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// attach when the instance metadata service answers, else direct.
    Auto,
    Attach,
    Direct,
}

impl From<Backend> for bake::BackendChoice {
    fn from(backend: Backend) -> bake::BackendChoice {
        match backend {
            Backend::Auto => bake::BackendChoice::Auto,
            Backend::Attach => bake::BackendChoice::Attach,
            Backend::Direct => bake::BackendChoice::Direct,
        }
    }
}

pub async fn run(args: BakeArgs, global: &GlobalArgs) -> i32 {
    let amibake_exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("error: cannot find the amibake binary to run the extraction with: {e}");
            return exit::BUILD_FAILED;
        }
    };
    let options = bake::BakeOptions {
        template: args.template,
        tarball: args.tarball,
        commit: args.commit,
        common: args.build.common(),
        amibake_exe,
        backend: args.backend.into(),
        cache_dir: args.cache.cache_dir,
        sandbox: args.sandbox.map(SandboxMode::from),
    };
    report::run_build(global, args.build.manifest.as_deref(), |sink, cancel| {
        bake::run(&options, sink, cancel)
    })
    .await
}
