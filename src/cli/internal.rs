//! The commands `bake` runs itself as, inside a sandbox. They fork, so `main` runs them
//! before the async runtime starts. They are a command line of their own, apart from the
//! one people use: no help, completion or man page offers them.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser};

/// `amibake internal-…`: what `bake` runs itself as.
#[derive(Debug, Parser)]
#[command(name = "amibake")]
pub enum Internal {
    /// Unpack standard input into the image, from inside a sandbox.
    #[command(name = "internal-extract")]
    Extract(InternalExtractArgs),
    /// Read the tarball on standard input through every check that needs no image, from
    /// inside a sandbox, before any AWS call.
    #[command(name = "internal-check-tarball")]
    CheckTarball(InternalCheckTarballArgs),
    /// Run a provisioner's command in the image, inside a sandbox.
    #[command(name = "internal-sandbox")]
    Sandbox(InternalSandboxArgs),
}

/// Whether this process is one `bake` started as an internal command.
pub fn requested(mut args: impl Iterator<Item = OsString>) -> bool {
    args.nth(1)
        .is_some_and(|a| a.to_str().is_some_and(|a| a.starts_with("internal-")))
}

/// Runs an internal command to its exit code (the sandbox's never returns).
pub fn run(internal: Internal) -> i32 {
    match internal {
        Internal::Extract(args) => extract(&args),
        Internal::CheckTarball(args) => check_tarball(&args),
        Internal::Sandbox(args) => sandbox(&args),
    }
}

use amibake::exit;
use amibake::host::extract;
use amibake::sandbox::{self, credential_guard, emulator::Emulator, Isolation};

/// `ids:BASE` (root in the sandbox is host id BASE) or `compat` (root).
fn isolation(arg: &str) -> Result<Isolation, sandbox::IsolationArgError> {
    Isolation::from_arg(arg)
}

#[derive(Debug, Args)]
pub struct InternalSandboxArgs {
    /// The mounted image to make the root.
    #[arg(long)]
    pub root: PathBuf,
    #[arg(long, value_parser = isolation)]
    pub isolation: Isolation,
    /// Reach the outside (through pasta) instead of having no network.
    #[arg(long)]
    pub network: bool,
    /// With `--network`: pasta's absolute path.
    #[arg(long, requires = "network")]
    pub pasta: Option<PathBuf>,
    /// With `--network`: a port of the build host's loopback to reach (repeatable).
    #[arg(long = "host-port", requires = "network")]
    pub host_ports: Vec<u16>,
    /// A cgroup to join first: the one that keeps the command from the host's credentials.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// The image's architecture, when this host's is another: its programs run through
    /// `--emulator`.
    #[arg(long, requires = "emulator")]
    pub emulated_architecture: Option<String>,
    /// With `--emulated-architecture`: qemu's user-mode emulator of it, an absolute path.
    #[arg(long, requires = "emulated_architecture")]
    pub emulator: Option<PathBuf>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct InternalExtractArgs {
    /// The mounted image to extract into.
    #[arg(long)]
    pub root: PathBuf,
    #[arg(long, value_parser = isolation)]
    pub isolation: Isolation,
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
pub struct InternalCheckTarballArgs {
    /// An empty directory to make the root.
    #[arg(long)]
    pub root: PathBuf,
    #[arg(long, value_parser = isolation)]
    pub isolation: Isolation,
    /// The most bytes of the tar stream kept on standard output.
    #[arg(long)]
    pub keep_at_most: u64,
}

/// Reads the tarball on standard input through every check that needs no image, keeping
/// the tar stream on standard output; exits with `exit::USAGE` where the tarball is at fault.
pub fn check_tarball(args: &InternalCheckTarballArgs) -> i32 {
    match extract::check_child_main(&args.root, args.isolation, args.keep_at_most) {
        Ok(_) => exit::OK,
        Err(e) => {
            eprintln!("error: {e}");
            match e {
                extract::ExtractError::Entry { .. }
                | extract::ExtractError::Corrupt(_)
                | extract::ExtractError::Empty => exit::USAGE,
                _ => exit::BUILD_FAILED,
            }
        }
    }
}

/// Unpacks standard input into the image; the exit code is the process's.
pub fn extract(args: &InternalExtractArgs) -> i32 {
    let spec = extract::ExtractSpec {
        dest: args.dest.clone(),
        owner: args.owner.clone(),
        keep_setuid: args.keep_setuid,
    };
    match extract::child_main(&args.root, &spec, args.isolation) {
        Ok(_) => exit::OK,
        Err(e) => {
            eprintln!("error: {e}");
            exit::BUILD_FAILED
        }
    }
}

/// Becomes the provisioner's command, confined to the image.
pub fn sandbox(args: &InternalSandboxArgs) -> ! {
    // Joined before anything else runs, so nothing the command starts is outside it.
    if let Some(cgroup) = &args.cgroup {
        if let Err(e) = credential_guard::join(cgroup) {
            eprintln!("error: {e}");
            std::process::exit(exit::BUILD_FAILED);
        }
    }
    let emulator = match (&args.emulated_architecture, &args.emulator) {
        (Some(architecture), Some(interpreter)) => {
            match Emulator::from_args(architecture, interpreter.clone()) {
                Some(emulator) => Some(emulator),
                None => {
                    eprintln!(
                        "error: --emulated-architecture {architecture}: not one amibake emulates"
                    );
                    std::process::exit(exit::USAGE);
                }
            }
        }
        _ => None,
    };
    let purpose = sandbox::Purpose::Provision {
        outside: args.network.then(|| sandbox::network::Outside {
            pasta: args.pasta.clone().unwrap_or_else(|| "pasta".into()),
            host_ports: args.host_ports.clone(),
        }),
        emulator,
    };
    if let Err(e) = sandbox::enter(&args.root, &purpose, args.isolation) {
        eprintln!("error: {e}");
        std::process::exit(exit::BUILD_FAILED);
    }
    sandbox::run_and_exit(&args.command)
}
