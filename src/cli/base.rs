//! `amibake base TEMPLATE`: a base AMI from a vendor AMI, provisioned over SSH.

use std::path::PathBuf;

use clap::Args;

use amibake::modes::base;

use super::{parse_cidr, report, BuildArgs, GlobalArgs};

#[derive(Debug, Args)]
pub struct BaseArgs {
    /// The template file (TOML) with a [base] table.
    pub template: PathBuf,
    #[command(flatten)]
    pub build: BuildArgs,
    /// Let SSH in from this IPv4 CIDR (repeatable), in place of the template's `ssh_cidrs`
    /// or this runner's own address: behind NAT, the network's public address.
    #[arg(long = "ssh-cidr", value_name = "CIDR", value_parser = parse_cidr)]
    pub ssh_cidrs: Vec<String>,
}

pub async fn run(args: BaseArgs, global: &GlobalArgs) -> i32 {
    let options = base::BaseOptions {
        template: args.template,
        common: global.common(&args.build),
        ssh_cidrs: args.ssh_cidrs,
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
