//! Runs the real `amibake` binary and, when an assertion fails, shows everything about the run.

#![allow(dead_code)]

pub mod localcloud;
pub mod tarballs;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One finished run of the binary.
pub struct Run {
    pub command: String,
    pub output: Output,
}

impl Run {
    pub fn code(&self) -> i32 {
        self.output.status.code().unwrap_or(-1)
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
    /// Everything about the run, for assertion messages.
    pub fn dump(&self) -> String {
        format!(
            "command: {}\nexit code: {}\n--- stdout\n{}\n--- stderr\n{}",
            self.command,
            self.code(),
            self.stdout(),
            self.stderr()
        )
    }
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(self.code(), code, "unexpected exit code\n{}", self.dump());
        self
    }
}

/// Where AWS is, for a run with no local cloud: a closed loopback port, so nothing a test runs
/// can reach a real account or the link-local metadata address.
pub const NOWHERE: &str = "http://127.0.0.1:9";

/// Runs `amibake ARGS` in `dir` with every AWS endpoint pointed at `NOWHERE`.
pub fn amibake_in(dir: &Path, args: &[&str]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_amibake"));
    cmd.args(args).current_dir(dir);
    for (key, _) in std::env::vars() {
        if key.starts_with("AWS_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("AWS_ENDPOINT_URL", NOWHERE)
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", NOWHERE)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test");
    let output = cmd.output().expect("amibake binary runs");
    Run {
        command: format!("amibake {}", args.join(" ")),
        output,
    }
}

pub fn amibake(args: &[&str]) -> Run {
    amibake_in(&repo_root(), args)
}
