//! `amibake gc`: remove what killed runs left, in the cloud and on this machine; a dry run
//! unless `--apply`.

use clap::Args;

use amibake::commands::gc::{self, GcOptions};
use amibake::exit;

use super::cache::CacheDirArg;
use super::{parse_age, report, AwsArgs, GlobalArgs};

/// A run that started longer ago than this is surely over, wherever it ran.
const DEFAULT_OLDER_THAN: &str = "3h";

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Only runs that started longer ago than this (a run still holding its lock on this
    /// machine is never touched).
    #[arg(long, value_name = "AGE", value_parser = parse_age, default_value = DEFAULT_OLDER_THAN)]
    pub older_than: std::time::Duration,
    /// Do it; without this, only say what would be removed.
    #[arg(long)]
    pub apply: bool,
    /// Look in every region the account has enabled, not only this one (a killed bake's
    /// copies are in the regions it copied to).
    #[arg(long)]
    pub all_regions: bool,
    #[command(flatten)]
    pub cache: CacheDirArg,
    #[command(flatten)]
    pub aws: AwsArgs,
}

pub async fn run(args: GcArgs, global: &GlobalArgs) -> i32 {
    let options = GcOptions {
        aws: args.aws.options(),
        older_than: args.older_than,
        apply: args.apply,
        all_regions: args.all_regions,
        cache_dir: args
            .cache
            .cache_dir
            .or_else(amibake::host::image_cache::ImageCache::default_dir),
    };
    let Some(watch) = report::watch_run(global) else {
        return exit::BUILD_FAILED;
    };
    match gc::gc(&options, watch.sink.clone()).await {
        Ok(collected) => {
            let json = serde_json::to_value(&collected).expect("plain data serializes");
            report::listing(global.output, &json, &collected.lines());
            for failure in &collected.failed {
                eprintln!("error: could not remove {failure}");
            }
            if collected.failed.is_empty() {
                exit::OK
            } else {
                exit::BUILD_FAILED
            }
        }
        Err(e) => report::failure(&e, e.exit_code()),
    }
}
