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
    /// Only this run's leftovers, however recent (a run kept by --on-error=abort); a run
    /// still going on this machine is still spared.
    #[arg(long, value_name = "ID", value_parser = parse_build_id, conflicts_with = "older_than")]
    pub build_id: Option<String>,
    #[command(flatten)]
    pub cache: CacheDirArg,
    #[command(flatten)]
    pub aws: AwsArgs,
}

fn parse_build_id(text: &str) -> Result<String, String> {
    if gc::is_build_id(text) {
        Ok(text.to_string())
    } else {
        Err(format!(
            "`{text}` is not a build id like ab-20261205010103-87a442d0 (the run prints its own)"
        ))
    }
}

pub async fn run(args: GcArgs, global: &GlobalArgs) -> i32 {
    let options = GcOptions {
        aws: args.aws.options(),
        older_than: args.older_than,
        apply: args.apply,
        all_regions: args.all_regions,
        build_id: args.build_id,
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
