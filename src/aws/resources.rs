//! EC2 resources `bake` makes: waiting for their states, each a thin poll over the one wait
//! helper, and removing them again. Removal treats "already gone" as done, so an undo can
//! run twice.

use aws_sdk_ec2::error::ProvideErrorMetadata;
use tokio_util::sync::CancellationToken;

use super::wait::{wait_for, Poll, WaitError, WaitPolicy};
use super::{AwsError, Clients};
use crate::engine::{Progress, Unit};

pub type ResourceError = WaitError<AwsError>;

/// Waits until a volume is `wanted` (`available`, or `attached` for its attachment).
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
                Ok(match state.as_str() {
                    s if s == wanted => Poll::Ready(()),
                    "error" => Poll::Failed { state },
                    _ => Poll::Pending {
                        state,
                        percent: None,
                    },
                })
            }
        },
    )
    .await
}

/// Waits until a snapshot is completed, reporting its percentage.
pub async fn wait_snapshot(
    clients: &Clients,
    id: &str,
    cancel: &CancellationToken,
    progress: &Progress,
) -> Result<(), ResourceError> {
    let ec2 = clients.ec2.clone();
    let report = |_: &str, percent: Option<u8>| {
        if let Some(p) = percent {
            progress.advance(u64::from(p), Some(100), Unit::Percent);
        }
    };
    wait_for("snapshot", id, WaitPolicy::LONG, cancel, report, || {
        let (ec2, id) = (ec2.clone(), id.to_string());
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
                "error" => Poll::Failed { state },
                _ => Poll::Pending { state, percent },
            })
        }
    })
    .await
}

/// Waits until an image is available.
pub async fn wait_image(
    clients: &Clients,
    id: &str,
    cancel: &CancellationToken,
    progress: &Progress,
) -> Result<(), ResourceError> {
    let ec2 = clients.ec2.clone();
    wait_for(
        "image",
        id,
        WaitPolicy::LONG,
        cancel,
        |state, _| progress.note(format!("{id}: {state}")),
        || {
            let (ec2, id) = (ec2.clone(), id.to_string());
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
                    "failed" | "error" | "invalid" | "deregistered" => Poll::Failed { state },
                    _ => Poll::Pending {
                        state,
                        percent: None,
                    },
                })
            }
        },
    )
    .await
}

/// The AWS error code of a failed call, if the service answered with one.
fn code<E: ProvideErrorMetadata>(
    err: &aws_sdk_ec2::error::SdkError<E, aws_sdk_ec2::config::http::HttpResponse>,
) -> Option<&str> {
    err.as_service_error().and_then(|e| e.code())
}

/// Treats the codes that mean "nothing left to do" as success.
fn gone_is_done<T, E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static>(
    result: Result<T, aws_sdk_ec2::error::SdkError<E, aws_sdk_ec2::config::http::HttpResponse>>,
    action: String,
    done_codes: &[&str],
) -> Result<(), AwsError> {
    match result {
        Ok(_) => Ok(()),
        Err(e) if code(&e).is_some_and(|c| done_codes.contains(&c)) => Ok(()),
        Err(e) => Err(AwsError::new(action, &e)),
    }
}

pub async fn delete_volume(clients: Clients, id: String) -> Result<(), AwsError> {
    let result = clients.ec2.delete_volume().volume_id(&id).send().await;
    gone_is_done(
        result,
        format!("delete volume {id}"),
        &["InvalidVolume.NotFound"],
    )
}

pub async fn delete_snapshot(clients: Clients, id: String) -> Result<(), AwsError> {
    let result = clients.ec2.delete_snapshot().snapshot_id(&id).send().await;
    gone_is_done(
        result,
        format!("delete snapshot {id}"),
        &["InvalidSnapshot.NotFound"],
    )
}

pub async fn deregister_image(clients: Clients, id: String) -> Result<(), AwsError> {
    let result = clients.ec2.deregister_image().image_id(&id).send().await;
    gone_is_done(
        result,
        format!("deregister {id}"),
        &["InvalidAMIID.NotFound", "InvalidAMIID.Unavailable"],
    )
}

/// Detaches a volume from `instance` (always naming it: EC2 needs it to know which
/// attachment is meant) and waits until the volume is available again. Waits with its own
/// token: a cleanup after Ctrl-C must still see the detach through.
pub async fn detach_volume(
    clients: Clients,
    id: String,
    instance: String,
    progress: Progress,
) -> Result<(), ResourceError> {
    let result = clients
        .ec2
        .detach_volume()
        .volume_id(&id)
        .instance_id(&instance)
        .send()
        .await;
    gone_is_done(
        result,
        format!("detach {id} from {instance}"),
        &[
            "IncorrectState",
            "InvalidAttachment.NotFound",
            "InvalidVolume.NotFound",
        ],
    )
    .map_err(WaitError::Poll)?;
    wait_volume(
        &clients,
        &id,
        "available",
        &CancellationToken::new(),
        &progress,
    )
    .await
}
