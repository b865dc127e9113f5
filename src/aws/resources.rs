//! EC2 resources the modes make: waiting for their states, each a thin poll over the one wait
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
            progress.advance(u64::from(p), Some(100), Unit::Percent, None);
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

/// Waits until an instance is `wanted` (`running`, `stopped`, `terminated`); returns it as
/// last described, for its addresses.
pub async fn wait_instance(
    clients: &Clients,
    id: &str,
    wanted: &str,
    cancel: &CancellationToken,
    progress: &Progress,
) -> Result<aws_sdk_ec2::types::Instance, ResourceError> {
    let ec2 = clients.ec2.clone();
    wait_for(
        "instance",
        id,
        WaitPolicy::SHORT,
        cancel,
        |state, _| progress.note(format!("{id}: {state}")),
        || {
            let (ec2, id) = (ec2.clone(), id.to_string());
            async move {
                let out = ec2
                    .describe_instances()
                    .instance_ids(&id)
                    .send()
                    .await
                    .map_err(|e| AwsError::new(format!("describe {id}"), &e))?;
                let instance = out
                    .reservations()
                    .iter()
                    .flat_map(|r| r.instances())
                    .next()
                    .cloned();
                let state = instance
                    .as_ref()
                    .and_then(|i| i.state())
                    .and_then(|s| s.name())
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_else(|| "not yet visible".into());
                Ok(match (state.as_str(), instance) {
                    (s, Some(instance)) if s == wanted => Poll::Ready(instance),
                    // Gone while we wait for it to run or stop: it will not come back.
                    ("shutting-down" | "terminated", _) if wanted != "terminated" => {
                        Poll::Failed { state }
                    }
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

/// Terminates an instance and waits until it is gone, so the security group it used can be
/// deleted after it. Waits with its own token, as a cleanup must.
pub async fn terminate_instance(
    clients: Clients,
    id: String,
    progress: Progress,
) -> Result<(), ResourceError> {
    let result = clients
        .ec2
        .terminate_instances()
        .instance_ids(&id)
        .send()
        .await;
    gone_is_done(
        result,
        format!("terminate {id}"),
        &["InvalidInstanceID.NotFound"],
    )
    .map_err(WaitError::Poll)?;
    match wait_instance(
        &clients,
        &id,
        "terminated",
        &CancellationToken::new(),
        &progress,
    )
    .await
    {
        Ok(_) => Ok(()),
        // Terminated instances drop out of DescribeInstances after a while.
        Err(WaitError::Poll(e)) if e.detail.contains("InvalidInstanceID.NotFound") => Ok(()),
        Err(e) => Err(e),
    }
}

pub async fn delete_key_pair(clients: Clients, name: String) -> Result<(), AwsError> {
    let result = clients.ec2.delete_key_pair().key_name(&name).send().await;
    gone_is_done(
        result,
        format!("delete key pair {name}"),
        &["InvalidKeyPair.NotFound"],
    )
}

/// Deletes a security group. An instance that used it can hold it for a few seconds after it
/// terminated (DependencyViolation), so that is retried for a while.
pub async fn delete_security_group(clients: Clients, id: String) -> Result<(), AwsError> {
    const ATTEMPTS: u32 = 30;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = clients
            .ec2
            .delete_security_group()
            .group_id(&id)
            .send()
            .await;
        match result {
            Err(e) if code(&e) == Some("DependencyViolation") && attempt < ATTEMPTS => {
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
            other => {
                return gone_is_done(
                    other,
                    format!("delete security group {id}"),
                    &["InvalidGroup.NotFound"],
                )
            }
        }
    }
}

/// Deregisters an image made by CreateImage and deletes the snapshots it made with it.
pub async fn deregister_image_and_snapshots(clients: Clients, id: String) -> Result<(), AwsError> {
    let described = clients.ec2.describe_images().image_ids(&id).send().await;
    let snapshots: Vec<String> = match &described {
        Ok(out) => out
            .images()
            .iter()
            .flat_map(|i| i.block_device_mappings())
            .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()).map(str::to_string))
            .collect(),
        Err(e) if code(e) == Some("InvalidAMIID.NotFound") => Vec::new(),
        Err(e) => return Err(AwsError::new(format!("describe {id}"), e)),
    };
    deregister_image(clients.clone(), id).await?;
    for snapshot in snapshots {
        delete_snapshot(clients.clone(), snapshot).await?;
    }
    Ok(())
}

/// An SSM parameter's value before a run published to it: `None` when it did not exist.
pub async fn parameter_value(clients: &Clients, name: &str) -> Result<Option<String>, AwsError> {
    match clients.ssm.get_parameter().name(name).send().await {
        Ok(out) => Ok(out.parameter().and_then(|p| p.value()).map(str::to_string)),
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_parameter_not_found()) =>
        {
            Ok(None)
        }
        Err(e) => Err(AwsError::new(format!("read SSM parameter {name}"), &e)),
    }
}

/// Puts a published parameter back as it was: its previous value as a new version (with the
/// label moved back to it), or no parameter when there was none. So a failed build never
/// leaves the parameter naming an image it then removed.
pub async fn restore_parameter(
    clients: Clients,
    name: String,
    previous: Option<String>,
    label: Option<String>,
) -> Result<(), AwsError> {
    let Some(value) = previous else {
        return match clients.ssm.delete_parameter().name(&name).send().await {
            Err(e)
                if !e
                    .as_service_error()
                    .is_some_and(|s| s.is_parameter_not_found()) =>
            {
                Err(AwsError::new(format!("delete SSM parameter {name}"), &e))
            }
            _ => Ok(()),
        };
    };
    let out = clients
        .ssm
        .put_parameter()
        .name(&name)
        .value(&value)
        .r#type(aws_sdk_ssm::types::ParameterType::String)
        .data_type("aws:ec2:image")
        .overwrite(true)
        .send()
        .await
        .map_err(|e| AwsError::new(format!("put {name} back to {value}"), &e))?;
    if let Some(label) = label {
        clients
            .ssm
            .label_parameter_version()
            .name(&name)
            .parameter_version(out.version())
            .labels(&label)
            .send()
            .await
            .map_err(|e| AwsError::new(format!("move label `{label}` of {name} back"), &e))?;
    }
    Ok(())
}
