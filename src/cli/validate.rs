//! `amibake validate TEMPLATE...`: check templates without calling AWS.

use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Args;

use amibake::{exit, validate};

use super::{OutputFormat, VarArgs};

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Template files to check.
    #[arg(required = true)]
    pub templates: Vec<PathBuf>,
    /// Check without the pipeline's secrets: an unset ${env.NAME}, or a variable with no
    /// value, is listed as needed at run time instead of failing (for pull requests).
    #[arg(long)]
    pub syntax_only: bool,
    #[command(flatten)]
    pub vars: VarArgs,
}

pub fn run(args: ValidateArgs, output: OutputFormat) -> i32 {
    let mut all_valid = true;
    let inputs = args.vars.inputs();
    for path in &args.templates {
        let checked = validate::check(path, &inputs, args.syntax_only);
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
                );
                if !checked.needed_at_run_time.is_empty() {
                    println!(
                        "{}: a run needs {}",
                        path.display(),
                        needed_in_words(&checked.needed_at_run_time)
                    );
                }
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

/// `env.TOKEN`, `var.app` as a person reads them.
fn needed_in_words(needed: &[String]) -> String {
    needed
        .iter()
        .map(|n| match n.split_once('.') {
            Some(("env", name)) => format!("the environment variable {name}"),
            Some(("var", name)) => format!("a value for the variable `{name}`"),
            _ => n.clone(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}
