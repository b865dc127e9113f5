//! `amibake history PARAM`: what a channel named, version by version.

use clap::Args;

use amibake::commands::history;
use amibake::exit;

use super::{report, AwsArgs, GlobalArgs};

#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// The channel: an SSM parameter a template publishes to (`publish_ssm`).
    pub parameter: String,
    /// Show only the newest N versions.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    #[command(flatten)]
    pub aws: AwsArgs,
}

pub async fn run(args: HistoryArgs, global: &GlobalArgs) -> i32 {
    match history::history(&args.aws.options(), &args.parameter, args.limit).await {
        Ok(found) => {
            let json = serde_json::to_value(&found).expect("plain data serializes");
            report::listing(global.output, &json, &found.lines());
            exit::OK
        }
        Err(e) => report::failure(&e, e.exit_code()),
    }
}
