//! `amibake rollback PARAM`: put an earlier version's image back.

use clap::Args;

use amibake::commands::rollback::{self, Target};
use amibake::exit;

use super::{report, AwsArgs, GlobalArgs};

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The channel: an SSM parameter.
    pub parameter: String,
    /// Go back to this version.
    #[arg(long, value_name = "N", conflicts_with = "steps")]
    pub to_version: Option<i64>,
    /// Go back K images (default 1): versions naming the current image again are skipped.
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(1..))]
    pub steps: Option<u32>,
    /// Move this label back instead of writing a new version.
    #[arg(long, value_name = "LABEL")]
    pub label: Option<String>,
    #[command(flatten)]
    pub aws: AwsArgs,
}

pub async fn run(args: RollbackArgs, global: &GlobalArgs) -> i32 {
    let target = match (args.to_version, args.steps) {
        (Some(version), _) => Target::Version(version),
        (None, steps) => Target::Steps(steps.unwrap_or(1) as usize),
    };
    let rolled = rollback::rollback(
        &args.aws.options(),
        &args.parameter,
        target,
        args.label.as_deref(),
    )
    .await;
    match rolled {
        Ok(moved) => {
            let json = serde_json::to_value(&moved).expect("plain data serializes");
            report::listing(global.output, &json, &moved.lines());
            exit::OK
        }
        Err(e) => report::failure(&e, e.exit_code()),
    }
}
