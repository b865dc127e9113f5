//! `amibake iam-policy TEMPLATE`: the least-privilege IAM policy for running a template.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use amibake::commands::iam_policy::{self, Backend, Mode};
use amibake::exit;
use amibake::template::{self, LoadOptions};

use super::{report, VarArgs};

#[derive(Debug, Args)]
pub struct IamPolicyArgs {
    /// The template file (TOML).
    pub template: PathBuf,
    /// The runs to allow: `base` or `bake`. Default: every table the template has.
    #[arg(long, value_enum)]
    pub mode: Option<ModeArg>,
    /// The bake backend to allow. Default: both.
    #[arg(long, value_enum)]
    pub backend: Option<BackendArg>,
    #[command(flatten)]
    pub vars: VarArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    Base,
    Bake,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendArg {
    Attach,
    Direct,
}

pub fn run(args: IamPolicyArgs) -> i32 {
    let options = LoadOptions::for_validation(args.vars.inputs());
    let template = match template::load(&args.template, &options) {
        Ok(t) => t,
        Err(e) => return report::failure(&e, exit::USAGE),
    };
    let modes = match args.mode {
        Some(ModeArg::Base) => vec![Mode::Base],
        Some(ModeArg::Bake) => vec![Mode::Bake],
        None => vec![Mode::Base, Mode::Bake],
    };
    let wanted_table = |mode: &Mode| match mode {
        Mode::Base => template.base.is_some(),
        Mode::Bake => template.bake.is_some(),
    };
    if let Some(missing) = modes
        .iter()
        .find(|m| args.mode.is_some() && !wanted_table(m))
    {
        eprintln!(
            "error: {}: no [{}] table to write a policy for",
            args.template.display(),
            if *missing == Mode::Base {
                "base"
            } else {
                "bake"
            }
        );
        return exit::USAGE;
    }
    let backends = match args.backend {
        Some(BackendArg::Attach) => vec![Backend::Attach],
        Some(BackendArg::Direct) => vec![Backend::Direct],
        None => vec![Backend::Attach, Backend::Direct],
    };
    let policy = iam_policy::policy(&template, &modes, &backends);
    println!(
        "{}",
        serde_json::to_string_pretty(&policy).expect("plain data serializes")
    );
    exit::OK
}
