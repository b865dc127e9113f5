//! Provisioners: the template's `[[provisioner]]` entries, run in order through a
//! communicator. The same code serves `base` (over SSH), `bake` (in a chroot) and the
//! `[[base.test]]` or `[[bake.test]]` entries run on an instance of a new image.

use std::collections::VecDeque;

use crate::communicator::{CommError, Communicator};
use crate::engine::Progress;
use crate::template::{Network, Provisioner, ProvisionerAction};

/// Lines of a failing command's output kept for its error message.
const TAIL_LINES: usize = 20;
/// Where scripts are put in the target while they run.
const SCRIPT_DIR: &str = "/tmp";

/// What the entries are, for messages: `provisioner` or `test`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entries {
    Provisioners,
    Tests,
}

impl std::fmt::Display for Entries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Entries::Provisioners => "provisioner",
            Entries::Tests => "test",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("{kind} `{provisioner}`: `{command}` exited with {exit_code}; last output:\n{tail}")]
    CommandFailed {
        kind: Entries,
        provisioner: String,
        command: String,
        exit_code: i32,
        tail: String,
    },
    #[error("{kind} `{provisioner}`: `{command}` was still running after {seconds}s (`timeout_seconds`) and was stopped; last output:\n{tail}")]
    TimedOut {
        kind: Entries,
        provisioner: String,
        command: String,
        seconds: u64,
        tail: String,
    },
    #[error("{kind} `{provisioner}`: {source}")]
    Communicator {
        kind: Entries,
        provisioner: String,
        source: CommError,
    },
    #[error("{kind} `{provisioner}`: interrupted")]
    Interrupted { kind: Entries, provisioner: String },
}

/// Runs every provisioner in order; the first failure stops the rest.
pub async fn run_all(
    comm: &dyn Communicator,
    kind: Entries,
    provisioners: &[Provisioner],
    progress: &Progress,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<(), ProvisionError> {
    for (index, p) in provisioners.iter().enumerate() {
        if cancel.is_cancelled() {
            return Err(ProvisionError::Interrupted {
                kind,
                provisioner: p.name.clone(),
            });
        }
        progress.note(format!(
            "{kind} {} of {}: {}",
            index + 1,
            provisioners.len(),
            p.name
        ));
        let comm_error = |source| ProvisionError::Communicator {
            kind,
            provisioner: p.name.clone(),
            source,
        };
        match &p.action {
            ProvisionerAction::Inline(commands) => {
                for command in commands {
                    run_one(comm, kind, p, command, progress, cancel).await?;
                }
            }
            ProvisionerAction::Script(path) => {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "script".into());
                let remote = format!("{SCRIPT_DIR}/amibake-{}-{name}", index + 1);
                comm.upload(path, &remote, 0o755)
                    .await
                    .map_err(comm_error)?;
                let quoted = crate::communicator::quote(&remote);
                let result = run_one(comm, kind, p, &quoted, progress, cancel).await;
                // The script is not part of the image; removed even after an interrupt.
                let never = tokio_util::sync::CancellationToken::new();
                comm.run(
                    &format!("rm -f -- {quoted}"),
                    &Default::default(),
                    &Network::None,
                    &mut |_| {},
                    &never,
                )
                .await
                .map_err(comm_error)?;
                result?;
            }
            ProvisionerAction::Upload {
                source,
                destination,
            } => {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(source)
                    .map(|m| m.permissions().mode() & 0o7777)
                    .unwrap_or(0o644);
                comm.upload(source, destination, mode)
                    .await
                    .map_err(comm_error)?;
            }
        }
    }
    Ok(())
}

async fn run_one(
    comm: &dyn Communicator,
    kind: Entries,
    p: &Provisioner,
    command: &str,
    progress: &Progress,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<(), ProvisionError> {
    let mut tail = VecDeque::with_capacity(TAIL_LINES);
    let mut on_line = |line: &str| {
        progress.output(&p.name, line);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        // As the line was shown: escaped, for the error that may quote it on a terminal.
        tail.push_back(crate::engine::events::printable(line));
    };
    // The command ends at the run's interrupt or at its own timeout, whichever comes
    // first; the communicator stops it the same way for both.
    let stop = cancel.child_token();
    let timer = p.timeout.map(|timeout| {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            stop.cancel();
        })
    });
    let result = comm
        .run(command, &p.env, &p.network, &mut on_line, &stop)
        .await;
    if let Some(timer) = timer {
        timer.abort();
    }
    let tail = || tail.iter().cloned().collect::<Vec<_>>().join("\n");
    let exit_code = match result {
        Ok(code) => code,
        Err(CommError::Interrupted { .. }) if !cancel.is_cancelled() => {
            return Err(ProvisionError::TimedOut {
                kind,
                provisioner: p.name.clone(),
                command: command.to_string(),
                seconds: p.timeout.unwrap_or_default().as_secs(),
                tail: tail(),
            });
        }
        Err(CommError::Interrupted { .. }) => {
            return Err(ProvisionError::Interrupted {
                kind,
                provisioner: p.name.clone(),
            });
        }
        Err(source) => {
            return Err(ProvisionError::Communicator {
                kind,
                provisioner: p.name.clone(),
                source,
            });
        }
    };
    if exit_code == 0 {
        return Ok(());
    }
    Err(ProvisionError::CommandFailed {
        kind,
        provisioner: p.name.clone(),
        command: command.to_string(),
        exit_code,
        tail: tail(),
    })
}
