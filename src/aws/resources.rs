//! Waiting for EC2 resources to reach a state, each a thin poll over the one wait helper.

use tokio_util::sync::CancellationToken;

use super::wait::{wait_for, Poll, WaitError, WaitPolicy};
use super::{AwsError, Clients};
use crate::engine::{Progress, Unit};

#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error(transparent)]
    Wait(#[from] WaitError<AwsError>),
    #[error("{what} {id} failed: it is {state}")]
    Failed {
        what: &'static str,
        id: String,
        state: String,
    },
}

impl ResourceError {
    pub fn is_interrupt(&self) -> bool {
        matches!(self, ResourceError::Wait(WaitError::Interrupted { .. }))
    }
}

/// Waits until a volume is `wanted` (`available`, or `in-use` with its attachment `attached`).
pub async fn wait_volume(
    clients: &Clients,
    id: &str,
    wanted: &str,
    cancel: &CancellationToken,
    progress: &Progress,
) -> Result<(), ResourceError> {
    let ec2 = clients.ec2.clone();
    wait_for(
        "volume",
        id,
        WaitPolicy::SHORT,
        cancel,
        |state, _| progress.note(format!("{id}: {state}")),
        || {
            let (ec2, id) = (ec2.clone(), id.to_string());
            async move {
                let out = ec2
                    .describe_volumes()
                    .volume_ids(&id)
                    .send()
                    .await
                    .map_err(|e| AwsError::new(format!("describe {id}"), &e))?;
                let volume = out.volumes().first();
                // While a volume has an attachment, its state (attaching, attached, detaching) is
                // the one that matters; without one, the volume's own (creating, available).
                let attachment = volume
                    .and_then(|v| v.attachments().first())
                    .and_then(|a| a.state())
                    .map(|s| s.as_str().to_string());
                let state = attachment
                    .or_else(|| {
                        volume
                            .and_then(|v| v.state())
                            .map(|s| s.as_str().to_string())
                    })
                    .unwrap_or_else(|| "not yet visible".to_string());
                Ok(if state == wanted {
                    Poll::Ready(())
                } else {
                    Poll::Pending {
                        state,
                        percent: None,
                    }
                })
            }
        },
    )
    .await?;
    Ok(())
}

/// Waits until a snapshot is completed, reporting its percentage.
pub async fn wait_snapshot(
    clients: &Clients,
    id: &str,
    cancel: &CancellationToken,
    progress: &Progress,
) -> Result<(), ResourceError> {
    let ec2 = clients.ec2.clone();
    let failed = std::sync::Mutex::new(None);
    let result = wait_for(
        "snapshot",
        id,
        WaitPolicy::LONG,
        cancel,
        |_, percent| {
            if let Some(p) = percent {
                progress.advance(u64::from(p), Some(100), Unit::Percent);
            }
        },
        || {
            let (ec2, id, failed) = (ec2.clone(), id.to_string(), &failed);
            async move {
                let out = ec2
                    .describe_snapshots()
                    .snapshot_ids(&id)
                    .send()
                    .await
                    .map_err(|e| AwsError::new(format!("describe {id}"), &e))?;
                let snapshot = out.snapshots().first();
                let state = snapshot
                    .and_then(|s| s.state())
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_else(|| "not yet visible".into());
                let percent = snapshot
                    .and_then(|s| s.progress())
                    .and_then(|p| p.trim_end_matches('%').parse().ok());
                Ok(match state.as_str() {
                    "completed" => Poll::Ready(()),
                    "error" => {
                        *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(state);
                        Poll::Ready(())
                    }
                    _ => Poll::Pending { state, percent },
                })
            }
        },
    )
    .await;
    result?;
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(state) => Err(ResourceError::Failed {
            what: "snapshot",
            id: id.into(),
            state,
        }),
        None => Ok(()),
    }
}

/// Waits until an image is available.
pub async fn wait_image(
    clients: &Clients,
    id: &str,
    cancel: &CancellationToken,
    progress: &Progress,
) -> Result<(), ResourceError> {
    let ec2 = clients.ec2.clone();
    let failed = std::sync::Mutex::new(None);
    wait_for(
        "image",
        id,
        WaitPolicy::LONG,
        cancel,
        |state, _| progress.note(format!("{id}: {state}")),
        || {
            let (ec2, id, failed) = (ec2.clone(), id.to_string(), &failed);
            async move {
                let out = ec2
                    .describe_images()
                    .image_ids(&id)
                    .send()
                    .await
                    .map_err(|e| AwsError::new(format!("describe {id}"), &e))?;
                let state = out
                    .images()
                    .first()
                    .and_then(|i| i.state())
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_else(|| "not yet visible".into());
                Ok(match state.as_str() {
                    "available" => Poll::Ready(()),
                    "failed" | "error" | "invalid" => {
                        *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(state);
                        Poll::Ready(())
                    }
                    _ => Poll::Pending {
                        state,
                        percent: None,
                    },
                })
            }
        },
    )
    .await?;
    match failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(state) => Err(ResourceError::Failed {
            what: "image",
            id: id.into(),
            state,
        }),
        None => Ok(()),
    }
}
