//! Command-line arguments. These structs stay in the binary; the library gets plain options.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "amibake",
    version,
    about = "Bake Amazon Machine Images: base AMIs over SSH, per-commit deployment AMIs chroot-style",
    long_about = None,
    after_help = "Exit codes: 0 ok, 1 build failed, 2 usage or template error, 130 interrupted."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// AWS region; default: AWS_REGION, the profile, or the instance's own region.
    #[arg(long, global = true)]
    pub region: Option<String>,
    /// Named profile from the AWS config files.
    #[arg(long, global = true)]
    pub profile: Option<String>,
    /// Set a template variable declared under [variables] (repeatable).
    #[arg(long = "var", value_name = "KEY=VALUE", global = true, value_parser = parse_var)]
    pub vars: Vec<(String, String)>,
    /// How to report progress and results: for people, or JSON lines for programs.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human, global = true)]
    pub output: OutputFormat,
    /// Show more detail (every AWS wait, every chroot command).
    #[arg(short, long, global = true)]
    pub verbose: bool,
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
    Base(BaseArgs),
    /// Bake a deployment AMI: put a code tarball into a volume of the base AMI, chroot-style.
    #[command(
        after_help = "Example:\n  amibake bake templates/shop.toml --tarball build/shop.tar.gz --commit \"$GITHUB_SHA\""
    )]
    Bake(BakeArgs),
    /// Check templates without calling AWS.
    #[command(after_help = "Example:\n  amibake validate templates/*.toml")]
    Validate(ValidateArgs),
    /// See and trim the base images the direct backend keeps on this machine.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Used by `bake` itself: unpack standard input into the image, from inside a sandbox.
    #[command(hide = true)]
    InternalExtract(InternalExtractArgs),
    /// Used by `bake` itself: run a provisioner's command in the image, inside a sandbox.
    #[command(hide = true)]
    InternalSandbox(InternalSandboxArgs),
}

#[derive(Debug, Args)]
pub struct InternalSandboxArgs {
    /// The mounted image to make the root.
    #[arg(long)]
    pub root: PathBuf,
    /// Share the build host's network instead of having none.
    #[arg(long)]
    pub network: bool,
    /// A cgroup to join first: the one that keeps the command from the host's credentials.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct InternalExtractArgs {
    /// The mounted image to extract into.
    #[arg(long)]
    pub root: PathBuf,
    /// The destination directory, as the image sees it.
    #[arg(long)]
    pub dest: String,
    /// `user` or `user:group` of the image.
    #[arg(long)]
    pub owner: Option<String>,
    /// Keep setuid and setgid bits from the tarball.
    #[arg(long)]
    pub keep_setuid: bool,
}

#[derive(Debug, Args)]
pub struct BaseArgs {
    /// The template file (TOML) with a [base] table.
    pub template: PathBuf,
    /// Build even if an AMI with the same fingerprint exists.
    #[arg(long)]
    pub force: bool,
    /// Also write the result manifest (JSON) to this file.
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Let SSH in from this IPv4 CIDR (repeatable), in place of the template's `ssh_cidrs`
    /// or this runner's own address: behind NAT, the network's public address.
    #[arg(long = "ssh-cidr", value_name = "CIDR", value_parser = parse_cidr)]
    pub ssh_cidrs: Vec<String>,
}

#[derive(Debug, Args)]
pub struct BakeArgs {
    /// The template file (TOML) with a [bake] table.
    pub template: PathBuf,
    /// The code to bake in: a .tar, .tar.gz or .tar.zst file, or - for standard input.
    #[arg(long, value_name = "PATH")]
    pub tarball: PathBuf,
    /// The commit being baked; default: the CI's commit variable, or `git rev-parse HEAD`.
    #[arg(long, value_name = "SHA")]
    pub commit: Option<String>,
    /// Bake even if an AMI with the same fingerprint exists.
    #[arg(long)]
    pub force: bool,
    /// Also write the result manifest (JSON) to this file.
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// How the image becomes a block device here: a volume attached to this EC2 build
    /// host, or the EBS direct APIs and a loop device, anywhere. Default: attach on EC2.
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub backend: Backend,
    #[command(flatten)]
    pub cache: CacheDirArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// attach when the instance metadata service answers, else direct.
    Auto,
    Attach,
    Direct,
}

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

fn parse_age(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("`{text}`: {e} (for example 30m, 12h, 14d)"))
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Template files to check.
    #[arg(required = true)]
    pub templates: Vec<PathBuf>,
}

fn parse_cidr(text: &str) -> Result<String, String> {
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
