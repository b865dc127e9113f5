//! The `amibake` binary: parse arguments, pick the progress renderer, call one library
//! function per subcommand, print the outcome once, map it to an exit code.

mod cli;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

use amibake::aws::AwsOptions;
use amibake::modes::{bake, base, CommonOptions, ModeError};
use amibake::{exit, validate};
use cli::{Cli, Command, OutputFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    let result = match cli.command {
        Command::Validate(args) => return validate_all(&args.templates, &vars, cli.global.output),
        Command::InternalExtract(args) => {
            return match amibake::host::extract::child_main(
                &args.root,
                &args.dest,
                args.owner.as_deref(),
            ) {
                Ok(_) => exit::OK,
                Err(e) => {
                    eprintln!("error: {e}");
                    exit::BUILD_FAILED
                }
            }
        }
        Command::Base(args) => {
            base::run(&base::BaseOptions {
                template: args.template,
                common: common(args.force, args.manifest),
            })
            .await
        }
        Command::Bake(args) => {
            bake::run(&bake::BakeOptions {
                template: args.template,
                tarball: args.tarball,
                commit: args.commit,
                common: common(args.force, args.manifest),
            })
            .await
        }
    };
    match result {
        Ok(()) => exit::OK,
        Err(e) => report_error(e),
    }
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
