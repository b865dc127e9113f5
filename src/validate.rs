//! `amibake validate`: check templates without calling AWS.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::template::{self, LoadOptions, TemplateError, VariableInputs};

#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Checked {
    pub template: PathBuf,
    pub sections: Vec<&'static str>,
    pub errors: Vec<String>,
    /// `--syntax-only`: what a run must have that the check did without, as `env.NAME`
    /// (an environment variable) or `var.NAME` (a variable without a value).
    pub needed_at_run_time: Vec<String>,
}

impl Checked {
    pub fn is_valid(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Checks one template with stand-in values for what only a run knows (commit, time).
/// `secret_free`: without the environment's secrets (see `LoadOptions::secret_free`).
pub fn check(path: &Path, variables: &VariableInputs, secret_free: bool) -> Checked {
    let options = LoadOptions {
        secret_free,
        ..LoadOptions::for_validation(variables.clone())
    };
    match template::load(path, &options) {
        Ok(t) => Checked {
            needed_at_run_time: t.needed_at_run_time.clone(),
            template: path.to_path_buf(),
            sections: [
                t.base.as_ref().map(|_| "base"),
                t.bake.as_ref().map(|_| "bake"),
            ]
            .into_iter()
            .flatten()
            .collect(),
            errors: Vec::new(),
        },
        Err(TemplateError::Invalid(errors)) => Checked {
            template: path.to_path_buf(),
            sections: Vec::new(),
            errors: errors.0.iter().map(ToString::to_string).collect(),
            needed_at_run_time: Vec::new(),
        },
        Err(e @ TemplateError::Read { .. }) => Checked {
            template: path.to_path_buf(),
            sections: Vec::new(),
            errors: vec![e.to_string()],
            needed_at_run_time: Vec::new(),
        },
    }
}
