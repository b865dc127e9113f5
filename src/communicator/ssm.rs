//! A temporary instance reached through SSM Run Command, with no key pair and no port open
//! to it: each command is a script sent to the instance's agent (SendCommand), followed
//! until it ends (GetCommandInvocation) and cancelled on interrupt or timeout.
//!
//! SSM keeps what it is sent (ListCommands) and what it answers: the template check keeps
//! sensitive values out of every command sent here (see `template::check`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::{assignments, quote, CommError, Communicator};
use crate::aws::run_command::{self, Ended, Invocation, STDERR_KEPT, STDOUT_KEPT};
use crate::aws::wait::{wait_for, Poll, WaitError, WaitPolicy};
use crate::aws::Clients;
use crate::template::Network;

/// A command is polled for soon after it is sent, then every few seconds at most; its own
/// end (a provisioner's timeout, an interrupt) cancels it, so the wait's bound is the
/// agent's longest.
const COMMAND: WaitPolicy = WaitPolicy {
    first_poll: Duration::from_millis(200),
    max_interval: Duration::from_secs(2),
    total: run_command::LONGEST_EXECUTION,
};

/// How long a cancelled command may take to say it is over.
const CANCELLED: WaitPolicy = WaitPolicy {
    first_poll: Duration::from_millis(200),
    max_interval: Duration::from_secs(1),
    total: Duration::from_secs(60),
};

/// A command of amibake's own (a piece of a file, the clearing of traces) ends in seconds;
/// one that does not within this bound has lost its agent.
const HOUSEKEEPING: WaitPolicy = WaitPolicy {
    first_poll: Duration::from_millis(200),
    max_interval: Duration::from_secs(2),
    total: Duration::from_secs(10 * 60),
};

/// What the agent keeps of each command it ran (the document with its commands, the script,
/// its output), under its own directory: removed before the instance is imaged, but for the
/// directory of the command that removes them, which holds that command alone.
const CLEAR_TRACES: &str = r#"for kept in /var/lib/amazon/ssm/*/document/orchestration/* /var/lib/amazon/ssm/*/document/state/completed/*; do
  case "$0" in "$kept"/*) ;; *) rm -rf -- "$kept" ;; esac
done"#;

/// A file goes to the instance in pieces this large, each a command of its own: a command's
/// text is bounded.
const UPLOAD_PIECE: usize = 24 << 10;
/// The largest file sent through commands.
pub const LARGEST_UPLOAD: u64 = 1 << 20;

pub struct Ssm {
    clients: Clients,
    instance_id: String,
    /// In SSM's list of commands, which run sent each.
    comment: String,
}

impl Ssm {
    pub fn new(clients: &Clients, instance_id: &str, build_id: &str) -> Ssm {
        Ssm {
            clients: clients.clone(),
            instance_id: instance_id.to_string(),
            comment: format!("amibake build {build_id}"),
        }
    }

    /// Sends `script` and follows it to its end: its status, exit code and output. On
    /// `cancel`, or when it cannot be followed within `policy`, the command is cancelled and
    /// followed until SSM says it is over.
    async fn run_script(
        &self,
        script: &str,
        action: &str,
        policy: WaitPolicy,
        cancel: &CancellationToken,
    ) -> Result<Ended, CommError> {
        let clients = &self.clients;
        let id = &self.instance_id;
        let command_id = run_command::send(clients, id, script, &self.comment)
            .await
            .map_err(|e| self.failed(action, e))?;
        let followed = follow(clients, &command_id, id, policy, cancel).await;
        if followed.is_ok() {
            return followed.map_err(|e| self.failed(action, e));
        }
        // Whatever stopped the following (an interrupt, a timeout, a call that failed), the
        // command is cancelled and followed to its end, so nothing of it runs on once the
        // step is over; the instance goes next either way.
        let _ = run_command::cancel(clients, &command_id, id).await;
        let never = CancellationToken::new();
        let _ = follow(clients, &command_id, id, CANCELLED, &never).await;
        match followed {
            Err(WaitError::Interrupted { .. }) => Err(CommError::Interrupted {
                target: self.target(),
            }),
            other => other.map_err(|e| self.failed(action, e)),
        }
    }

    /// Runs one of amibake's own commands (a piece of a file, the clearing of traces), which
    /// must succeed within `HOUSEKEEPING`.
    async fn housekeeping(&self, script: &str, action: &str) -> Result<(), CommError> {
        let ended = self
            .run_script(script, action, HOUSEKEEPING, &CancellationToken::new())
            .await?;
        match (ended.status.as_str(), ended.code) {
            ("Success", 0) => Ok(()),
            (status, code) => Err(self.failed(
                action,
                format!(
                    "{status}, exit code {code}: {}{}",
                    ended.stdout.trim(),
                    ended.stderr.trim()
                ),
            )),
        }
    }
}

/// Polls command `command_id` on `instance_id` until it has ended.
async fn follow(
    clients: &Clients,
    command_id: &str,
    instance_id: &str,
    policy: WaitPolicy,
    cancel: &CancellationToken,
) -> Result<Ended, WaitError<crate::aws::AwsError>> {
    wait_for(
        "command",
        command_id,
        policy,
        cancel,
        |_, _| {},
        || async {
            Ok(
                match run_command::invocation(clients, command_id, instance_id).await? {
                    Invocation::NotTaken => Poll::Pending {
                        state: "not yet taken by the agent".into(),
                        percent: None,
                    },
                    Invocation::Running(status) => Poll::Pending {
                        state: status,
                        percent: None,
                    },
                    Invocation::Ended(ended) => Poll::Ready(ended),
                },
            )
        },
    )
    .await
}

/// `command` after the assignments of `env`, exported to it.
fn script(command: &str, env: &BTreeMap<String, String>) -> String {
    if env.is_empty() {
        return command.to_string();
    }
    format!("set -a\n{}set +a\n{command}", assignments(env))
}

#[async_trait]
impl Communicator for Ssm {
    fn target(&self) -> String {
        format!("ssm {}", self.instance_id)
    }

    async fn run(
        &self,
        command: &str,
        env: &BTreeMap<String, String>,
        _network: &Network,
        on_line: &mut (dyn for<'l> FnMut(&'l str) + Send),
        cancel: &CancellationToken,
    ) -> Result<i32, CommError> {
        let Ended {
            status,
            code,
            stdout,
            stderr,
        } = self
            .run_script(&script(command, env), "run a command", COMMAND, cancel)
            .await?;
        // SSM hands the output over once the command has ended.
        for line in stdout.lines().chain(stderr.lines()) {
            on_line(line);
        }
        for (kept, limit, stream) in [
            (stdout.len(), STDOUT_KEPT, "output"),
            (stderr.len(), STDERR_KEPT, "error output"),
        ] {
            if kept >= limit {
                on_line(&format!(
                    "(SSM keeps the first {limit} characters of a command's {stream}: the rest is not shown)"
                ));
            }
        }
        match status.as_str() {
            "Success" | "Failed" => Ok(code),
            other => Err(self.failed(
                "run a command",
                format!("SSM says the command is {other} (exit code {code})"),
            )),
        }
    }

    async fn upload(&self, source: &Path, destination: &str, mode: u32) -> Result<(), CommError> {
        let action = format!("copy {} to {destination}", source.display());
        let contents = tokio::fs::read(source)
            .await
            .map_err(|e| self.failed(&action, e))?;
        if contents.len() as u64 > LARGEST_UPLOAD {
            return Err(self.failed(
                &action,
                format!(
                    "it is {} bytes, and over SSM a file of at most {LARGEST_UPLOAD} goes through commands (an output bucket for larger ones is not supported yet)",
                    contents.len()
                ),
            ));
        }
        // Each piece is appended to a fresh private file (whatever stood at its path is
        // removed first), installed where it belongs once whole.
        let staged = quote(&format!("{destination}.amibake-upload"));
        let pieces: Vec<&[u8]> = match contents.is_empty() {
            true => vec![&[]],
            false => contents.chunks(UPLOAD_PIECE).collect(),
        };
        for (i, piece) in pieces.iter().enumerate() {
            // As over SSH, the destination's directory is made as needed.
            let fresh = match i {
                0 => format!(
                    "umask 077; mkdir -p -- \"$(dirname -- {})\"; rm -f -- {staged}; ",
                    quote(destination)
                ),
                _ => String::new(),
            };
            let encoded = aws_smithy_types::base64::encode(piece);
            let mut script = format!(
                "set -e; {fresh}printf %s {} | base64 -d >> {staged}",
                quote(&encoded)
            );
            if i + 1 == pieces.len() {
                script.push_str(&format!(
                    "; chmod {mode:o} {staged}; mv -f -- {staged} {}",
                    quote(destination)
                ));
            }
            self.housekeeping(&script, &action).await?;
        }
        Ok(())
    }

    async fn clear_traces(&self) -> Result<(), CommError> {
        let action = "clear the SSM agent's record of the commands it ran";
        self.housekeeping(CLEAR_TRACES, action).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_is_exported_before_the_command_and_quoted() {
        let env = BTreeMap::from([("APP".to_string(), "it's $(x)".to_string())]);
        let text = script("echo \"$APP\"", &env);
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(&text)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "it's $(x)\n");
        assert_eq!(script("true", &BTreeMap::new()), "true");
    }
}
