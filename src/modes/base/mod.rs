//! `amibake base`: a base AMI from a vendor AMI, provisioned over SSH.

use std::path::PathBuf;

use super::{load_for_run, CommonOptions, ModeError};
use crate::template::Commit;

#[derive(Debug, Clone)]
pub struct BaseOptions {
    pub template: PathBuf,
    pub common: CommonOptions,
}

pub async fn run(options: &BaseOptions) -> Result<(), ModeError> {
    // [base] never has a commit; a [bake] table beside it is still checked, with a stand-in.
    load_for_run(
        &options.template,
        &options.common,
        Commit::Placeholder,
        "base",
    )?;
    Err(ModeError::NotBuiltYet("base"))
}
