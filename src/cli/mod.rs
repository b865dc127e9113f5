//! The command line: global flags and one file per command. Each command file holds its
//! arguments and its `run`, which turns them into the library's plain options, calls it and
//! prints the outcome once (`report` holds what they print alike). The argument structs stay
//! in the binary; the library gets plain options.

pub mod bake;
pub mod base;
pub mod cache;
pub mod docs;
pub mod gc;
pub mod history;
pub mod iam_policy;
pub mod internal;
pub mod promote;
pub mod prune;
mod report;
pub mod rollback;
pub mod schema;
pub mod validate;

use clap::{Args, Parser, Subcommand, ValueEnum};

use amibake::aws::AwsOptions;
use amibake::modes::CommonOptions;
use amibake::template::VariableInputs;

/// `amibake --version`: the release and the commit it was built from.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("AMIBAKE_COMMIT"), ")");

/// Every exit code any command returns, said once.
const EXIT_CODES: &str = "Exit codes:\n  0    done\n  1    the build or command failed, left something it could not remove, or kept it (--on-error=abort)\n  2    a usage, template or tarball error, found before any AWS call\n  130  interrupted by SIGINT (Ctrl-C), after cleaning up\n  143  terminated by SIGTERM, after cleaning up";

#[derive(Debug, Parser)]
#[command(
    name = "amibake",
    version = VERSION,
    about = "Bake Amazon Machine Images: base AMIs over SSH, per-commit deployment AMIs chroot-style",
    long_about = None,
    after_help = EXIT_CODES
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// The flags every command takes: how it speaks.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// How to report progress and results: for people, or JSON lines for programs.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human, global = true)]
    pub output: OutputFormat,
    /// Show more detail (every AWS wait, every chroot command).
    #[arg(short, long, global = true)]
    pub verbose: bool,
}

/// Where a command that calls AWS calls it.
#[derive(Debug, Args)]
pub struct AwsArgs {
    /// AWS region; default: AWS_REGION, the profile, or the instance's own region.
    #[arg(long)]
    pub region: Option<String>,
    /// Named profile from the AWS config files.
    #[arg(long)]
    pub profile: Option<String>,
}

impl AwsArgs {
    pub fn options(&self) -> AwsOptions {
        AwsOptions {
            region: self.region.clone(),
            profile: self.profile.clone(),
        }
    }
}

/// The values of a template's `[variables]`, for the commands that read a template.
/// Weakest first: the declaration's default, AMIBAKE_VAR_<name>, each --var-file, each --var.
#[derive(Debug, Args)]
pub struct VarArgs {
    /// Set a variable declared under [variables] (repeatable; wins over --var-file and
    /// AMIBAKE_VAR_<name>). A secret here shows in the process list: prefer a file or
    /// the environment.
    #[arg(long = "var", value_name = "NAME=VALUE", value_parser = parse_var)]
    pub vars: Vec<(String, String)>,
    /// Set variables from a TOML file of `name = "value"` lines (repeatable; a later file
    /// wins).
    #[arg(long = "var-file", value_name = "FILE")]
    pub var_files: Vec<std::path::PathBuf>,
}

impl VarArgs {
    /// The flags' values and this process's AMIBAKE_VAR_<name> ones.
    pub fn inputs(&self) -> VariableInputs {
        VariableInputs::with_environment(
            self.vars.iter().cloned().collect(),
            self.var_files.clone(),
        )
    }
}

/// The flags `base` and `bake` share.
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    #[command(flatten)]
    pub vars: VarArgs,
    #[command(flatten)]
    pub aws: AwsArgs,
    /// Build even if an AMI with the same fingerprint exists.
    #[arg(long)]
    pub force: bool,
    /// Also write the result manifest (JSON) to this file.
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<std::path::PathBuf>,
    /// The destructive variant: the template's `when = "destructive"` provisioners and
    /// stage commands instead of its `when = "normal"` ones.
    #[arg(long)]
    pub destructive: bool,
    /// Do not boot the new image to run the template's `[[base.test]]` or `[[bake.test]]`
    /// entries.
    #[arg(long)]
    pub no_test: bool,
    /// Let SSH into a temporary instance (a base build's, a test's) from this IPv4 CIDR
    /// (repeatable), in place of the template's `ssh_cidrs` or this runner's own address:
    /// behind NAT, the network's public address.
    #[arg(long = "ssh-cidr", value_name = "CIDR", value_parser = parse_cidr)]
    pub ssh_cidrs: Vec<String>,
    /// What a failed build does with what it made: remove it all, or keep it (the
    /// instance, the mount) to look at, then `amibake gc --build-id ID --apply`. An
    /// interrupted build always cleans up.
    #[arg(long, value_enum, value_name = "WHAT", default_value_t = OnError::Cleanup)]
    pub on_error: OnError,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnError {
    Cleanup,
    Abort,
}

impl BuildArgs {
    /// What both build modes are told.
    pub fn common(&self) -> CommonOptions {
        CommonOptions {
            aws: self.aws.options(),
            vars: self.vars.inputs(),
            force: self.force,
            manifest: self.manifest.clone(),
            variant: if self.destructive {
                amibake::template::Variant::Destructive
            } else {
                amibake::template::Variant::Normal
            },
            skip_tests: self.no_test,
            ssh_cidrs: self.ssh_cidrs.clone(),
            on_failure: match self.on_error {
                OnError::Cleanup => amibake::engine::OnFailure::Cleanup,
                OnError::Abort => amibake::engine::OnFailure::Keep,
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build a base AMI: launch the vendor AMI, provision it over SSH, snapshot it.
    #[command(after_help = "Example:\n  amibake base templates/shop.toml --var app=shop")]
    Base(base::BaseArgs),
    /// Bake a deployment AMI: put a code tarball into an image of the base AMI, chroot-style.
    #[command(
        after_help = "Example:\n  amibake bake templates/shop.toml --tarball build/shop.tar.gz --commit \"$GITHUB_SHA\""
    )]
    Bake(bake::BakeArgs),
    /// Check templates without calling AWS.
    #[command(after_help = "Example:\n  amibake validate templates/*.toml")]
    Validate(validate::ValidateArgs),
    /// See and trim the base images the direct backend keeps on this machine.
    #[command(subcommand)]
    Cache(cache::CacheCommand),
    /// Show a channel's versions, newest first: AMI, state, commit, base, labels.
    #[command(after_help = "Example:\n  amibake history /amibake/shop/deploy --limit 10")]
    History(history::HistoryArgs),
    /// Point a channel at an image amibake made (a new version, or a label moved).
    #[command(
        after_help = "Example:\n  amibake promote /amibake/shop/deploy ami-0123456789abcdef0 --label prod"
    )]
    Promote(promote::PromoteArgs),
    /// Put an earlier version's image back in a channel.
    #[command(after_help = "Example:\n  amibake rollback /amibake/shop/deploy --label prod")]
    Rollback(rollback::RollbackArgs),
    /// Remove old images amibake made that nothing uses (a dry run unless --apply).
    #[command(
        after_help = "Example:\n  amibake prune templates/shop.toml --keep 10 --older-than 30d --apply"
    )]
    Prune(prune::PruneArgs),
    /// Remove what killed runs left, in the cloud and on this machine (a dry run unless
    /// --apply).
    #[command(after_help = "Example:\n  amibake gc --older-than 6h --apply")]
    Gc(gc::GcArgs),
    /// Print the least-privilege IAM policy (JSON) for running a template.
    #[command(
        after_help = "Example:\n  amibake iam-policy templates/shop.toml --mode bake --backend direct"
    )]
    IamPolicy(iam_policy::IamPolicyArgs),
    /// Print the JSON Schema of a manifest, the progress events or a command's JSON output.
    #[command(after_help = "Example:\n  amibake schema bake-manifest > bake-manifest.schema.json")]
    Schema(schema::SchemaArgs),
    /// Print shell completions for bash, zsh, fish, elvish or powershell.
    #[command(
        after_help = "Example:\n  amibake completions bash > /etc/bash_completion.d/amibake"
    )]
    Completions(docs::CompletionsArgs),
    /// Print the man page (roff), or write one per command into a directory.
    #[command(after_help = "Example:\n  amibake man --dir /usr/local/share/man/man1")]
    Man(docs::ManArgs),
}

/// Runs one command to its exit code.
pub async fn dispatch(cli: Cli) -> i32 {
    let global = &cli.global;
    match cli.command {
        Command::Base(args) => base::run(args, global).await,
        Command::Bake(args) => bake::run(args, global).await,
        Command::Validate(args) => validate::run(args, global.output),
        Command::Cache(command) => cache::run(command, global.output),
        Command::History(args) => history::run(args, global).await,
        Command::Promote(args) => promote::run(args, global).await,
        Command::Rollback(args) => rollback::run(args, global).await,
        Command::Prune(args) => prune::run(args, global).await,
        Command::Gc(args) => gc::run(args, global).await,
        Command::IamPolicy(args) => iam_policy::run(args),
        Command::Schema(args) => schema::run(args),
        Command::Completions(args) => docs::completions(args),
        Command::Man(args) => docs::man(args),
    }
}

pub fn parse_age(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("`{text}`: {e} (for example 30m, 12h, 14d)"))
}

pub fn parse_cidr(text: &str) -> Result<String, String> {
    if amibake::template::is_ipv4_cidr(text) {
        Ok(text.to_string())
    } else {
        Err(format!("`{text}` is not an IPv4 CIDR like 203.0.113.7/32"))
    }
}

fn parse_var(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{text}` is not KEY=VALUE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn var_needs_a_key() {
        assert_eq!(parse_var("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(parse_var("=x").is_err());
        assert!(parse_var("novalue").is_err());
    }

    #[test]
    fn ssh_cidr_must_be_an_ipv4_cidr() {
        assert_eq!(parse_cidr("203.0.113.7/32").unwrap(), "203.0.113.7/32");
        assert!(parse_cidr("203.0.113.7").is_err());
        assert!(parse_cidr("2001:db8::/64").is_err());
    }
}
