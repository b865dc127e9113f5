//! Provisioners: the template's `[[provisioner]]` entries, run in order through a
//! communicator. The same code serves `base` (over SSH) and `bake` (in a chroot).

use std::collections::VecDeque;

use crate::communicator::{CommError, Communicator};
use crate::engine::Progress;
use crate::template::{Network, Provisioner, ProvisionerAction};

/// Lines of a failing command's output kept for its error message.
const TAIL_LINES: usize = 20;
/// Where scripts are put in the target while they run.
const SCRIPT_DIR: &str = "/tmp";

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(
        "provisioner `{provisioner}`: `{command}` exited with {exit_code}; last output:\n{tail}"
    )]
    CommandFailed {
        provisioner: String,
        command: String,
        exit_code: i32,
        tail: String,
    },
    #[error("provisioner `{provisioner}`: {source}")]
    Communicator {
        provisioner: String,
        source: CommError,
    },
    #[error("provisioner `{provisioner}`: interrupted")]
    Interrupted { provisioner: String },
}

/// Runs every provisioner in order; the first failure stops the rest.
pub async fn run_all(
    comm: &dyn Communicator,
    provisioners: &[Provisioner],
    progress: &Progress,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<(), ProvisionError> {
    for (index, p) in provisioners.iter().enumerate() {
        if cancel.is_cancelled() {
            return Err(ProvisionError::Interrupted {
                provisioner: p.name.clone(),
            });
        }
        progress.note(format!(
            "provisioner {} of {}: {}",
            index + 1,
            provisioners.len(),
            p.name
        ));
        let comm_error = |source| ProvisionError::Communicator {
            provisioner: p.name.clone(),
            source,
        };
        match &p.action {
            ProvisionerAction::Inline(commands) => {
                for command in commands {
                    run_one(comm, p, command, progress, cancel).await?;
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
                let result = run_one(comm, p, &remote, progress, cancel).await;
                // The script is not part of the image; removed even after an interrupt.
                let never = tokio_util::sync::CancellationToken::new();
                comm.run(
                    &format!("rm -f '{remote}'"),
                    &Default::default(),
                    Network::None,
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
        tail.push_back(line.to_string());
    };
    let exit_code = match comm
        .run(command, &p.env, p.network, &mut on_line, cancel)
        .await
    {
        Ok(code) => code,
        Err(CommError::Interrupted { .. }) => {
            return Err(ProvisionError::Interrupted {
                provisioner: p.name.clone(),
            });
        }
        Err(source) => {
            return Err(ProvisionError::Communicator {
                provisioner: p.name.clone(),
                source,
            });
        }
    };
    if exit_code == 0 {
        return Ok(());
    }
    Err(ProvisionError::CommandFailed {
        provisioner: p.name.clone(),
        command: command.to_string(),
        exit_code,
        tail: tail.into_iter().collect::<Vec<_>>().join("\n"),
    })
}
