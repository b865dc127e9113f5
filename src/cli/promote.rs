//! `amibake promote PARAM AMI`: point a channel at an image amibake made.

use clap::Args;

use amibake::commands::promote;
use amibake::exit;

use super::{report, AwsArgs, GlobalArgs};

#[derive(Debug, Args)]
pub struct PromoteArgs {
    /// The channel: an SSM parameter.
    pub parameter: String,
    /// The image to deploy from now on; it must be available in the region.
    pub ami_id: String,
    /// Move this label onto the image (onto a version already naming it, if any) instead
    /// of writing it as the newest version.
    #[arg(long, value_name = "LABEL")]
    pub label: Option<String>,
    #[command(flatten)]
    pub aws: AwsArgs,
}

pub async fn run(args: PromoteArgs, global: &GlobalArgs) -> i32 {
    let promoted = promote::promote(
        &args.aws.options(),
        &args.parameter,
        &args.ami_id,
        args.label.as_deref(),
    )
    .await;
    match promoted {
        Ok(moved) => {
            let json = serde_json::to_value(&moved).expect("plain data serializes");
            report::listing(global.output, &json, &moved.lines());
            exit::OK
        }
        Err(e) => report::failure(&e, e.exit_code()),
    }
}
