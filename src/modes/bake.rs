//! `amibake bake`: a deployment AMI from a base AMI and a code tarball, chroot-style.

use std::path::PathBuf;

use super::{load_for_run, CommonOptions, ModeError};
use crate::template::Commit;

#[derive(Debug, Clone)]
pub struct BakeOptions {
    pub template: PathBuf,
    /// `-` reads standard input.
    pub tarball: PathBuf,
    pub commit: Option<String>,
    pub common: CommonOptions,
}

/// CI systems' variables for the commit being built, most specific first.
const COMMIT_VARIABLES: [&str; 5] = [
    "GITHUB_SHA",
    "CODEBUILD_RESOLVED_SOURCE_VERSION",
    "CI_COMMIT_SHA",
    "GIT_COMMIT",
    "BUILD_VCS_NUMBER",
];

pub async fn run(options: &BakeOptions) -> Result<(), ModeError> {
    let commit = match &options.commit {
        Some(sha) => Commit::Known(check_commit(sha)?),
        None => detect_commit()
            .map(Commit::Known)
            .unwrap_or(Commit::Placeholder),
    };
    if options.tarball.as_os_str() != "-" && !options.tarball.is_file() {
        return Err(ModeError::Usage(format!(
            "--tarball {}: no such file",
            options.tarball.display()
        )));
    }
    load_for_run(&options.template, &options.common, commit, "bake")?;
    Err(ModeError::NotBuiltYet("bake"))
}

fn check_commit(sha: &str) -> Result<String, ModeError> {
    let ok = (4..=64).contains(&sha.len())
        && sha
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(sha.to_string())
    } else {
        Err(ModeError::Usage(format!(
            "--commit `{sha}`: expected a commit id (4 to 64 letters, digits, - _ .)"
        )))
    }
}

/// The commit from the CI's own variables, or from git in the working directory.
fn detect_commit() -> Option<String> {
    COMMIT_VARIABLES
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .or_else(|| {
            let out = std::process::Command::new("git")
                .args(["rev-parse", "HEAD"])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
}
