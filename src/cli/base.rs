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
        common: global.common(&args.build),
    };
    let Some(watch) = report::watch_run(global) else {
        return amibake::exit::BUILD_FAILED;
    };
    match base::run(&options, watch.sink.clone(), watch.cancel.clone()).await {
        Ok(result) => report::build(
            result,
            global.output,
            args.build.manifest.as_deref(),
            &watch,
        ),
        Err(e) => report::error(e),
    }
}
