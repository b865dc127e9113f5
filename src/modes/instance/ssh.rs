//! Reaching a temporary instance over SSH: the handshake retried until the instance answers,
//! and its host key held against what it printed to its console.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::TemporaryInstance;
use crate::aws::console;
use crate::communicator::ssh::{HostKey, Ssh};
use crate::engine::{StepContext, StepError};
use crate::modes::support::{earlier, failed};

/// One connection attempt while the instance boots; the wait's total is the template's.
const SSH_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
const SSH_RETRY_PAUSE: Duration = Duration::from_secs(1);
/// A note about the wait at most this often: retries are otherwise quiet.
const SSH_NOTE_EVERY: Duration = Duration::from_secs(15);
/// The instance's SSH server never let the run in within the template's timeout.
#[derive(Debug, thiserror::Error)]
#[error("no SSH answer from {target} within {seconds}s (`ssh_timeout_seconds`); last attempt")]
pub struct NoSshAnswer {
    target: String,
    seconds: u64,
    #[source]
    last: crate::communicator::ssh::ConnectError,
}

impl TemporaryInstance {
    /// Connects over SSH once the instance answers, within the template's `ssh_timeout_seconds`.
    pub(super) async fn wait_for_ssh(&mut self, ctx: &mut StepContext) -> Result<(), StepError> {
        let target = earlier(&self.ssh_target, "SSH address")?;
        let timeout = self.launch.plan.reach_timeout;
        let started = Instant::now();
        let deadline = started + timeout;
        let mut last_note = started;
        loop {
            let attempt = target.clone();
            let handshake =
                tokio::task::spawn_blocking(move || Ssh::handshake(&attempt, SSH_ATTEMPT_TIMEOUT))
                    .await
                    .map_err(failed)?;
            let error = match handshake {
                Ok(handshake) => {
                    self.trust_host_key(handshake.host_key(), &target.host, ctx)
                        .await?;
                    match tokio::task::spawn_blocking(move || handshake.authenticate())
                        .await
                        .map_err(failed)?
                    {
                        Ok(ssh) => {
                            ctx.progress.note(format!(
                                "{}@{} answered after {}s",
                                target.user,
                                target.host,
                                started.elapsed().as_secs()
                            ));
                            self.session = Some(Arc::new(ssh));
                            return Ok(());
                        }
                        Err(e) => e,
                    }
                }
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(failed(NoSshAnswer {
                    target: format!("{}@{}:{}", target.user, target.host, target.port),
                    seconds: timeout.as_secs(),
                    last: error,
                }));
            }
            if last_note.elapsed() >= SSH_NOTE_EVERY {
                ctx.progress
                    .note(format!("still waiting for SSH on {}: {error}", target.host));
                last_note = Instant::now();
            }
            tokio::select! {
                _ = tokio::time::sleep(SSH_RETRY_PAUSE) => {}
                _ = ctx.cancel.cancelled() => return Err(StepError::Interrupted),
            }
        }
    }

    /// Accepts the host key an instance's SSH server offered only if the instance printed
    /// it to its console, as cloud-init does at first boot; a key it did not print means
    /// another machine answers at that address, and nothing is sent to it. An instance that
    /// printed none (yet) gets its key accepted as offered, and the key is shown.
    async fn trust_host_key(
        &self,
        offered: &HostKey,
        host: &str,
        ctx: &mut StepContext,
    ) -> Result<(), StepError> {
        let instance_id = self.id()?;
        let key = format!("{} ({})", offered.fingerprint, offered.kind);
        match console::printed_host_keys(&self.clients, &instance_id).await {
            Ok(printed) if printed.is_empty() => ctx.progress.note(format!(
                "{instance_id} has printed no SSH host keys to its console yet: accepting {key} from {host} as offered"
            )),
            Ok(printed) if printed.names(&offered.blob_base64, &offered.fingerprint) => ctx
                .progress
                .note(format!("{host} offered host key {key}, which {instance_id} printed to its console")),
            Ok(printed) => {
                return Err(failed(format!(
                    "{host} offered the SSH host key {key}, which is none of those {instance_id} printed to its console ({}): another machine is answering at that address. Nothing was sent to it; check `ssh_interface` and the network between this runner and the instance",
                    printed
                        .fingerprints
                        .iter()
                        .chain(printed.keys.iter())
                        .take(4)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
            Err(e) => ctx.progress.note(format!(
                "cannot read {instance_id}'s console to check its SSH host key ({e}): accepting {key} from {host} as offered"
            )),
        }
        Ok(())
    }
}
