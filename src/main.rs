//! The `amibake` binary: parse arguments, pick the progress renderer, call one library
//! function per subcommand, print the outcome once, map it to an exit code.

mod cli;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

use std::sync::Arc;

use amibake::artifact::Manifest;
use amibake::aws::AwsOptions;
use amibake::engine::render::{JsonLines, PlainLines, TerminalBars};
use amibake::engine::{self, EventSink, Outcome};
use amibake::modes::{bake, base, BuildResult, CommonOptions, ModeError};
use amibake::{exit, validate};
use cli::{Cli, Command, OutputFormat};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The sandboxed children fork, so they run before any runtime thread exists.
    match &cli.command {
        Command::InternalExtract(args) => return ExitCode::from(internal_extract(args) as u8),
        Command::InternalSandbox(args) => internal_sandbox(args),
        _ => {}
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::BUILD_FAILED as u8);
        }
    };
    let code = runtime.block_on(run(cli));
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

async fn run(cli: Cli) -> i32 {
    let vars: BTreeMap<String, String> = cli.global.vars.iter().cloned().collect();
    let common = |force, manifest| CommonOptions {
        aws: AwsOptions {
            region: cli.global.region.clone(),
            profile: cli.global.profile.clone(),
        },
        vars: vars.clone(),
        force,
        manifest,
    };
    let (output, verbose) = (cli.global.output, cli.global.verbose);
    match cli.command {
        Command::Validate(args) => validate_all(&args.templates, &vars, output),
        Command::Cache(command) => cache(command, output),
        Command::InternalExtract(_) | Command::InternalSandbox(_) => {
            unreachable!("run before the runtime starts")
        }
        Command::Base(args) => {
            let manifest_file = args.manifest.clone();
            let options = base::BaseOptions {
                template: args.template,
                common: common(args.force, args.manifest),
                ssh_cidrs: args.ssh_cidrs,
            };
            let Some((sink, cancel, signalled)) = watch_run(output, verbose) else {
                return exit::BUILD_FAILED;
            };
            match base::run(&options, sink, cancel).await {
                Ok(result) => report_build(result, output, manifest_file.as_deref(), &signalled),
                Err(e) => report_error(e),
            }
        }
        Command::Bake(args) => {
            let amibake_exe = match std::env::current_exe() {
                Ok(exe) => exe,
                Err(e) => {
                    eprintln!(
                        "error: cannot find the amibake binary to run the extraction with: {e}"
                    );
                    return exit::BUILD_FAILED;
                }
            };
            let manifest_file = args.manifest.clone();
            let options = bake::BakeOptions {
                template: args.template,
                tarball: args.tarball,
                commit: args.commit,
                common: common(args.force, args.manifest),
                amibake_exe,
                backend: match args.backend {
                    cli::Backend::Auto => bake::BackendChoice::Auto,
                    cli::Backend::Attach => bake::BackendChoice::Attach,
                    cli::Backend::Direct => bake::BackendChoice::Direct,
                },
                cache_dir: args.cache.cache_dir,
            };
            let Some((sink, cancel, signalled)) = watch_run(output, verbose) else {
                return exit::BUILD_FAILED;
            };
            match bake::run(&options, sink, cancel).await {
                Ok(result) => report_build(result, output, manifest_file.as_deref(), &signalled),
                Err(e) => report_error(e),
            }
        }
    }
}

fn internal_extract(args: &cli::InternalExtractArgs) -> i32 {
    let spec = amibake::host::extract::ExtractSpec {
        dest: args.dest.clone(),
        owner: args.owner.clone(),
        keep_setuid: args.keep_setuid,
    };
    match amibake::host::extract::child_main(&args.root, &spec) {
        Ok(_) => exit::OK,
        Err(e) => {
            eprintln!("error: {e}");
            exit::BUILD_FAILED
        }
    }
}

fn internal_sandbox(args: &cli::InternalSandboxArgs) -> ! {
    use amibake::host::{credential_guard, sandbox};
    // Joined before anything else runs, so nothing the command starts is outside it.
    if let Some(cgroup) = &args.cgroup {
        if let Err(e) = credential_guard::join(cgroup) {
            eprintln!("error: {e}");
            std::process::exit(exit::BUILD_FAILED);
        }
    }
    let purpose = sandbox::Purpose::Provision {
        network: args.network,
    };
    if let Err(e) = sandbox::enter(&args.root, purpose) {
        eprintln!("error: {e}");
        std::process::exit(exit::BUILD_FAILED);
    }
    sandbox::run_and_exit(&args.command)
}

/// The progress renderer and the token SIGINT/SIGTERM cancel, for a build, with which
/// signal came.
fn watch_run(
    output: OutputFormat,
    verbose: bool,
) -> Option<(Arc<dyn EventSink>, CancellationToken, engine::Signalled)> {
    let sink = progress_renderer(output, verbose);
    let cancel = CancellationToken::new();
    match engine::cancel_on_signals(cancel.clone(), sink.clone()) {
        Ok(signalled) => Some((sink, cancel, signalled)),
        Err(e) => {
            eprintln!("error: cannot watch for interrupts: {e}");
            None
        }
    }
}

/// Bars on a terminal, timestamped lines in logs, JSON lines for programs; all on stderr.
fn progress_renderer(output: OutputFormat, verbose: bool) -> Arc<dyn EventSink> {
    match output {
        OutputFormat::Json => Arc::new(JsonLines::new(Box::new(std::io::stderr()))),
        OutputFormat::Human
            if std::io::stdout().is_terminal() && std::io::stderr().is_terminal() =>
        {
            Arc::new(TerminalBars::new())
        }
        OutputFormat::Human => Arc::new(PlainLines::new(Box::new(std::io::stderr()), verbose)),
    }
}

/// A build's outcome, said once: the result on stdout, what went wrong on stderr.
fn report_build<M: Manifest>(
    result: BuildResult<M>,
    output: OutputFormat,
    manifest_file: Option<&std::path::Path>,
    signalled: &engine::Signalled,
) -> i32 {
    if let Some(report) = &result.report {
        match &report.outcome {
            Outcome::Succeeded => {}
            Outcome::Failed { step, error } => eprintln!("error: {step}: {error}"),
            Outcome::Interrupted { step } => {
                eprintln!("error: interrupted during {step}; cleaned up what it had made")
            }
        }
        for left in &report.leftovers {
            eprintln!("error: could not clean up {left}");
        }
    }
    let code = result
        .report
        .as_ref()
        .map(|r| r.exit_code(signalled))
        .unwrap_or(exit::OK);
    let Some(manifest) = result.manifest else {
        return code;
    };
    let json = serde_json::to_string(&manifest).unwrap_or_default();
    if let Some(path) = manifest_file {
        if let Err(e) = std::fs::write(path, format!("{json}\n")) {
            eprintln!(
                "error: cannot write the manifest to {}: {e}",
                path.display()
            );
            return exit::BUILD_FAILED;
        }
    }
    match output {
        OutputFormat::Json => println!("{json}"),
        OutputFormat::Human => {
            eprintln!("{}", manifest.summary());
            println!("{}", manifest.ami_id());
        }
    }
    code
}

/// Prints an error once, from here, with its whole cause chain on one line; a template with
/// several problems gets one `error:` line for each.
fn report_error(err: ModeError) -> i32 {
    let code = err.exit_code();
    for line in format!("{:#}", anyhow::Error::new(err)).lines() {
        eprintln!("error: {line}");
    }
    code
}

fn cache(command: cli::CacheCommand, output: OutputFormat) -> i32 {
    use amibake::commands::cache;
    let (dir, older_than) = match &command {
        cli::CacheCommand::Ls(dir) => (dir.cache_dir.clone(), None),
        cli::CacheCommand::Prune(args) => (args.cache.cache_dir.clone(), args.older_than),
    };
    let opened = cache::open(dir);
    let printed = opened.and_then(|c| match command {
        cli::CacheCommand::Ls(_) => {
            let listing = cache::ls(&c);
            Ok((serde_json::to_string(&listing), listing.lines()))
        }
        cli::CacheCommand::Prune(_) => {
            let pruned = cache::prune(&c, older_than)?;
            Ok((serde_json::to_string(&pruned), pruned.lines()))
        }
    });
    match printed {
        Ok((json, lines)) => {
            match output {
                OutputFormat::Json => println!("{}", json.expect("plain data serializes")),
                OutputFormat::Human => lines.iter().for_each(|l| println!("{l}")),
            }
            exit::OK
        }
        Err(e) => {
            eprintln!("error: {e}");
            exit::BUILD_FAILED
        }
    }
}

fn validate_all(
    paths: &[std::path::PathBuf],
    vars: &BTreeMap<String, String>,
    output: OutputFormat,
) -> i32 {
    let mut all_valid = true;
    for path in paths {
        let checked = validate::check(path, vars);
        all_valid &= checked.is_valid();
        match output {
            OutputFormat::Json => {
                println!("{}", serde_json::to_string(&checked).unwrap_or_default())
            }
            OutputFormat::Human if checked.is_valid() => {
                println!(
                    "{}: valid ([{}])",
                    path.display(),
                    checked.sections.join("] and [")
                )
            }
            OutputFormat::Human => {
                for e in &checked.errors {
                    eprintln!("error: {e}");
                }
            }
        }
    }
    if !all_valid && output == OutputFormat::Human && std::io::stderr().is_terminal() {
        eprintln!("(no AWS call was made)");
    }
    if all_valid {
        exit::OK
    } else {
        exit::USAGE
    }
}
