//! `amibake validate TEMPLATE...`: check templates without calling AWS.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;

use clap::Args;

use amibake::{exit, validate};

use super::OutputFormat;

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Template files to check.
    #[arg(required = true)]
    pub templates: Vec<PathBuf>,
}

pub fn run(args: ValidateArgs, vars: &BTreeMap<String, String>, output: OutputFormat) -> i32 {
    let mut all_valid = true;
    for path in &args.templates {
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
