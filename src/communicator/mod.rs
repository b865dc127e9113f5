//! How provisioners reach the machine they provision: a chroot on the build host (`bake`),
//! or SSH or SSM Run Command to a temporary instance (`base`, booted tests). The provisioner
//! code runs the same over each.

pub mod chroot;
mod sealed;
pub mod ssh;
pub mod ssm;

use std::collections::BTreeMap;
use std::path::Path;

use async_trait::async_trait;

use crate::template::Network;

#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("{target}: cannot {action}: {reason}")]
    Failed {
        target: String,
        action: String,
        reason: String,
    },
    #[error("{target}: interrupted")]
    Interrupted { target: String },
}

/// Runs commands and places files on the machine being provisioned, as root.
#[async_trait]
pub trait Communicator: Send + Sync {
    /// What it talks to, for messages: "chroot /mnt/ab-1", "ssh admin@127.0.1.5".
    fn target(&self) -> String;

    /// Runs `command` with `/bin/sh -c` and `env`, passing each line of its output (stdout and
    /// stderr together) to `on_line`. Returns the exit code. `cancel` ends the command and
    /// what it started. `network`: whether a sandboxed target gives the command the
    /// network; a machine of its own (SSH) always has its own.
    async fn run(
        &self,
        command: &str,
        env: &BTreeMap<String, String>,
        network: &Network,
        on_line: &mut (dyn for<'l> FnMut(&'l str) + Send),
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<i32, CommError>;

    /// Copies the local file `source` to `destination` on the target, with `mode`.
    async fn upload(&self, source: &Path, destination: &str, mode: u32) -> Result<(), CommError>;

    /// Removes what reaching the machine left on it, before its disk becomes an image:
    /// nothing over SSH or in a chroot; SSM's agent keeps every command it ran.
    async fn clear_traces(&self) -> Result<(), CommError> {
        Ok(())
    }

    /// The error for `action` failing on this target.
    fn failed(&self, action: impl Into<String>, reason: impl ToString) -> CommError
    where
        Self: Sized,
    {
        CommError::Failed {
            target: self.target(),
            action: action.into(),
            reason: reason.to_string(),
        }
    }
}

/// `env` as shell assignments, a line each, every value quoted.
pub(crate) fn assignments(env: &BTreeMap<String, String>) -> String {
    env.iter()
        .map(|(k, v)| format!("{k}={}\n", quote(v)))
        .collect()
}

/// `value` as one single-quoted shell word.
pub(crate) fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}
