//! `amibake prune`: remove old images amibake made that nothing uses; a dry run unless
//! `--apply`.

use std::path::PathBuf;

use clap::{ArgGroup, Args};

use amibake::commands::prune::{self, PruneOptions, Removal, Selection};
use amibake::exit;

use super::{parse_age, report, AwsArgs, GlobalArgs, VarArgs};

#[derive(Debug, Args)]
#[command(
    override_usage = "amibake prune TEMPLATE --keep N [OPTIONS]\n       amibake prune --name-prefix PREFIX [--channel PARAM]... --keep N [OPTIONS]"
)]
#[command(group(ArgGroup::new("images").required(true).args(["template", "name_prefix"])))]
#[command(group(ArgGroup::new("how").args(["deprecate", "disable"])))]
pub struct PruneArgs {
    /// A template: its sections' image names and the channels they publish to.
    pub template: Option<PathBuf>,
    /// Images whose name starts with this, instead of a template's.
    #[arg(long, value_name = "PREFIX")]
    pub name_prefix: Option<String>,
    /// A channel (SSM parameter) whose newest versions and labels are kept, with
    /// --name-prefix (repeatable).
    #[arg(long = "channel", value_name = "PARAM", requires = "name_prefix")]
    pub channels: Vec<String>,
    /// Keep the newest N images of each name, and what the newest N versions of each
    /// channel name.
    #[arg(long, value_name = "N")]
    pub keep: usize,
    /// Remove only images older than this (30m, 12h, 14d, 90d).
    #[arg(long, value_name = "AGE", value_parser = parse_age)]
    pub older_than: Option<std::time::Duration>,
    /// Do it; without this, only say what would be done.
    #[arg(long)]
    pub apply: bool,
    /// Deprecate instead of deregistering.
    #[arg(long)]
    pub deprecate: bool,
    /// Disable instead of deregistering (an image can be enabled again).
    #[arg(long)]
    pub disable: bool,
    /// Judge images shared with other accounts or the public like the others; by default
    /// they are kept, since what those accounts launch cannot be seen from this one.
    #[arg(long)]
    pub include_shared: bool,
    #[command(flatten)]
    pub aws: AwsArgs,
    #[command(flatten)]
    pub vars: VarArgs,
}

pub async fn run(args: PruneArgs, global: &GlobalArgs) -> i32 {
    let selection = match (args.template, args.name_prefix) {
        (Some(path), _) => Selection::Template {
            path,
            vars: args.vars.inputs(),
        },
        (None, Some(prefix)) => Selection::NamePrefix {
            prefix,
            channels: args.channels,
        },
        (None, None) => unreachable!("clap requires one of them"),
    };
    let options = PruneOptions {
        aws: args.aws.options(),
        selection,
        keep: args.keep,
        older_than: args.older_than,
        removal: match (args.deprecate, args.disable) {
            (true, _) => Removal::Deprecate,
            (_, true) => Removal::Disable,
            _ => Removal::Deregister,
        },
        apply: args.apply,
        include_shared: args.include_shared,
    };
    match prune::prune(&options).await {
        Ok(pruned) => {
            let json = serde_json::to_value(&pruned).expect("plain data serializes");
            report::listing(global.output, &json, &pruned.lines());
            if pruned.failed.is_empty() {
                exit::OK
            } else {
                for failure in &pruned.failed {
                    eprintln!("error: could not remove {failure}");
                }
                exit::BUILD_FAILED
            }
        }
        Err(e) => report::failure(&e, e.exit_code()),
    }
}
