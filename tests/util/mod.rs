//! Runs the real `amibake` binary and, when an assertion fails, shows everything about the run.

#![allow(dead_code)]

pub mod localcloud;
pub mod schema;
pub mod tarballs;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A run kept with `--on-error=abort` leaves, until its gc, what the other stories of its
/// test binary assert is gone: such a story runs alone, the others beside each other.
static KEPT_RUNS: std::sync::RwLock<()> = std::sync::RwLock::new(());

pub fn beside_others() -> std::sync::RwLockReadGuard<'static, ()> {
    KEPT_RUNS.read().unwrap_or_else(|e| e.into_inner())
}

pub fn alone() -> std::sync::RwLockWriteGuard<'static, ()> {
    KEPT_RUNS.write().unwrap_or_else(|e| e.into_inner())
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One finished run of the binary.
pub struct Run {
    pub command: String,
    pub output: Output,
}

impl Run {
    /// Asserts the run failed with one `error:` line that repeats `cause` and, when given,
    /// starts with the step it failed in.
    pub fn expect_failure(&self, cause: &str, step: Option<&str>) -> &Self {
        self.expect_code(1);
        let stderr = self.stderr();
        let error = stderr
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("no error line\n{}", self.dump()));
        assert!(
            error.contains(cause),
            "wanted {cause:?} in {error}\n{}",
            self.dump()
        );
        if let Some(step) = step {
            assert!(
                error.starts_with(&format!("error: {step}: ")),
                "the error names its step `{step}`: {error}"
            );
        }
        self
    }

    /// The build id the run announced (`--output json`), if its engine started.
    pub fn build_id(&self) -> Option<String> {
        self.stderr().lines().find_map(|line| {
            let event: serde_json::Value = serde_json::from_str(line).ok()?;
            (event["event"] == "run_started")
                .then(|| event["build_id"].as_str().map(str::to_string))?
        })
    }

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
    /// Asserts the run exited 1 naming, on an `error: could not clean up` line, a resource
    /// with every one of `parts` in the line.
    pub fn expect_leftover(&self, parts: &[&str]) -> &Self {
        self.expect_code(1);
        let stderr = self.stderr();
        let named = stderr
            .lines()
            .filter(|l| l.starts_with("error: could not clean up "))
            .any(|l| parts.iter().all(|p| l.contains(p)));
        assert!(named, "no leftover named with {parts:?}\n{}", self.dump());
        self
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

/// Runs `command` (its progress as JSON lines on stderr) and sends it SIGINT when a line of
/// its stderr satisfies `when`. The run's stderr holds every line, those before the signal
/// included. Panics if the run ends before any line does.
pub fn interrupt_when(command: Command, what: &str, when: impl FnMut(&str) -> bool) -> Run {
    signal_when(command, "-INT", what, when).0
}

/// Like `interrupt_when`, with `signal` for kill(1) (`-TERM`, `-INT`); also returns how long
/// the run went on after the signal.
pub fn signal_when(
    mut command: Command,
    signal: &str,
    what: &str,
    mut when: impl FnMut(&str) -> bool,
) -> (Run, std::time::Duration) {
    use std::io::BufRead;
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("amibake binary runs");
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let mut signalled = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        let now = when(&line);
        seen.push(line);
        if now {
            let sent = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status()
                .unwrap();
            assert!(sent.success(), "kill {signal} {}", child.id());
            signalled = Some(std::time::Instant::now());
            break;
        }
    }
    seen.extend(lines.map(|l| l.unwrap()));
    let output = child.wait_with_output().unwrap();
    let after_signal = signalled.map(|at| at.elapsed()).unwrap_or_default();
    let run = Run {
        command: what.to_string(),
        output: Output {
            stderr: seen.join("\n").into_bytes(),
            ..output
        },
    };
    assert!(
        signalled.is_some(),
        "the awaited line never came\n{}",
        run.dump()
    );
    (run, after_signal)
}

/// The sandbox's own host ids for tests that run the sandbox's children directly, as a bake
/// does: one range, picked and held for the whole test binary.
pub fn isolation() -> amibake::sandbox::Isolation {
    static RANGE: std::sync::OnceLock<amibake::sandbox::ids::IdRange> = std::sync::OnceLock::new();
    let range = RANGE.get_or_init(|| amibake::sandbox::ids::IdRange::pick().expect("host ids"));
    amibake::sandbox::Isolation::OwnIds { base: range.base() }
}
