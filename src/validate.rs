//! `amibake validate`: check templates without calling AWS.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::template::{self, LoadOptions, TemplateError};

#[derive(Debug, Serialize)]
pub struct Checked {
    pub template: PathBuf,
    pub sections: Vec<&'static str>,
    pub errors: Vec<String>,
}

impl Checked {
    pub fn is_valid(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Checks one template with stand-in values for what only a run knows (commit, time).
pub fn check(path: &Path, vars: &BTreeMap<String, String>) -> Checked {
    let options = LoadOptions::for_validation(vars.clone());
    match template::load(path, &options) {
        Ok(t) => Checked {
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
        },
        Err(e @ TemplateError::Read { .. }) => Checked {
            template: path.to_path_buf(),
            sections: Vec::new(),
            errors: vec![e.to_string()],
        },
    }
}
