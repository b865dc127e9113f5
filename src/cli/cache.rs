//! `amibake cache ls|prune`: the base images the direct backend keeps on this machine.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use amibake::commands::cache;
use amibake::exit;

use super::{parse_age, report, OutputFormat};

#[derive(Debug, Args)]
pub struct CacheDirArg {
    /// Where the direct backend keeps base images; default: $XDG_CACHE_HOME/amibake, else
    /// ~/.cache/amibake.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// List the cached base images: snapshot, size on disk, last use.
    #[command(after_help = "Example:\n  amibake cache ls")]
    Ls(CacheDirArg),
    /// Remove cached base images, all of them or those unused for a while.
    #[command(after_help = "Example:\n  amibake cache prune --older-than 14d")]
    Prune(CachePruneArgs),
}

#[derive(Debug, Args)]
pub struct CachePruneArgs {
    #[command(flatten)]
    pub cache: CacheDirArg,
    /// Remove only the images not used for this long (30m, 12h, 14d); default: every image.
    #[arg(long, value_name = "AGE", value_parser = parse_age)]
    pub older_than: Option<std::time::Duration>,
}

pub fn run(command: CacheCommand, output: OutputFormat) -> i32 {
    let printed = match command {
        CacheCommand::Ls(dir) => cache::open(dir.cache_dir).map(|c| {
            let listing = cache::ls(&c);
            (serde_json::to_value(&listing), listing.lines())
        }),
        CacheCommand::Prune(args) => cache::open(args.cache.cache_dir)
            .and_then(|c| cache::prune(&c, args.older_than))
            .map(|pruned| (serde_json::to_value(&pruned), pruned.lines())),
    };
    match printed {
        Ok((json, lines)) => {
            report::listing(output, &json.expect("plain data serializes"), &lines);
            exit::OK
        }
        Err(e) => report::failure(&e, exit::BUILD_FAILED),
    }
}
