//! `amibake base TEMPLATE`: a base AMI from a vendor AMI, provisioned over SSH.

use std::path::PathBuf;

use clap::Args;

use amibake::modes::base;

use super::{report, BuildArgs, GlobalArgs};

#[derive(Debug, Args)]
pub struct BaseArgs {
    /// The template file (TOML) with a [base] table.
    pub template: PathBuf,
    #[command(flatten)]
    pub build: BuildArgs,
}

pub async fn run(args: BaseArgs, global: &GlobalArgs) -> i32 {
    let options = base::BaseOptions {
        template: args.template,
        common: args.build.common(),
    };
    report::run_build(global, args.build.manifest.as_deref(), |sink, cancel| {
        base::run(&options, sink, cancel)
    })
    .await
}
