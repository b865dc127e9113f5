//! EC2 resources the modes make: waiting for their states, each a thin poll over the one wait
//! helper, and removing them again.
//!
//! EC2 is eventually consistent: right after a create, a Describe or a Delete naming the new
//! id may answer NotFound. Both are read as "not visible yet" and retried, within
//! `VISIBILITY_BOUND`, never as "already gone": a Ctrl-C just after a create must not report
//! a clean exit while the resource lives on. What says a resource is truly gone (an image
//! already deregistered, a volume not attached) counts as done, so an undo can run twice.

use aws_sdk_ec2::error::ProvideErrorMetadata;
use tokio_util::sync::CancellationToken;

use super::wait::{wait_for, Poll, WaitError, WaitPolicy};
use super::{filter, AwsError, Clients};
use crate::engine::{Progress, Unit};
use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::SdkError;

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
                let described = ec2.describe_volumes().volume_ids(&id).send().await;
                let Some(out) = visible(described, "InvalidVolume.NotFound", &id)? else {
                    return Ok(Poll::NotYetVisible);
                };
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
            let described = ec2.describe_snapshots().snapshot_ids(&id).send().await;
            let Some(out) = visible(described, "InvalidSnapshot.NotFound", &id)? else {
                return Ok(Poll::NotYetVisible);
            };
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

/// Waits until an image is available, polling as `policy` says: `REGISTERED` for an image
/// over completed snapshots, `LONG` for one whose snapshots are still being made or copied.
/// Answers the snapshots it is over, as the available image names them.
pub async fn wait_image(
    clients: &Clients,
    id: &str,
    policy: WaitPolicy,
    cancel: &CancellationToken,
    progress: &Progress,
) -> Result<Vec<String>, ResourceError> {
    let ec2 = clients.ec2.clone();
    wait_for(
        "image",
        id,
        policy,
        cancel,
        |state, _| progress.note(format!("{id}: {state}")),
        || {
            let (ec2, id) = (ec2.clone(), id.to_string());
            async move {
                let described = ec2.describe_images().image_ids(&id).send().await;
                let Some(out) = visible(described, "InvalidAMIID.NotFound", &id)? else {
                    return Ok(Poll::NotYetVisible);
                };
                let image = out.images().first();
                let state = image
                    .and_then(|i| i.state())
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_else(|| "not yet visible".into());
                Ok(match state.as_str() {
                    "available" => Poll::Ready(image.map(snapshot_ids).unwrap_or_default()),
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

/// The EBS snapshots an image's block device mappings name.
fn snapshot_ids(image: &aws_sdk_ec2::types::Image) -> Vec<String> {
    image
        .block_device_mappings()
        .iter()
        .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()).map(str::to_string))
        .collect()
}

/// The AWS error code of a failed call, if the service answered with one.
pub fn code<E: ProvideErrorMetadata>(
    err: &aws_sdk_ec2::error::SdkError<E, aws_sdk_ec2::config::http::HttpResponse>,
) -> Option<&str> {
    err.as_service_error().and_then(|e| e.code())
}

/// A describe's answer, or None when EC2 does not know `id` (yet).
fn visible<T, E>(
    result: Result<T, SdkError<E, HttpResponse>>,
    not_found: &str,
    id: &str,
) -> Result<Option<T>, AwsError>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match result {
        Ok(out) => Ok(Some(out)),
        Err(e) if code(&e) == Some(not_found) => Ok(None),
        Err(e) => Err(AwsError::new(format!("describe {id}"), &e)),
    }
}

/// Runs a removal `call` until EC2 knows the resource: its `not_found` code is read as "not
/// visible yet" and retried through the one wait helper, within `VISIBILITY_BOUND`; the
/// codes in `done` say there is nothing left to do.
async fn remove_once_visible<T, E, F, Fut>(
    what: &str,
    id: &str,
    action: String,
    not_found: &str,
    done: &[&str],
    mut call: F,
) -> Result<(), ResourceError>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, SdkError<E, HttpResponse>>>,
{
    let mut attempt = || {
        let call = call();
        let action = action.clone();
        async move {
            match call.await {
                Ok(_) => Ok(Poll::Ready(())),
                Err(e) if code(&e) == Some(not_found) => Ok(Poll::NotYetVisible),
                Err(e) if code(&e).is_some_and(|c| done.contains(&c)) => Ok(Poll::Ready(())),
                Err(e) => Err(AwsError::new(action, &e)),
            }
        }
    };
    // The first attempt at once; only a resource not yet visible waits.
    match attempt().await.map_err(WaitError::Poll)? {
        Poll::NotYetVisible => {}
        _ => return Ok(()),
    }
    // A cleanup runs on after Ctrl-C: its own token, never cancelled.
    wait_for(
        what,
        id,
        WaitPolicy::SHORT,
        &CancellationToken::new(),
        |_, _| {},
        attempt,
    )
    .await
}

pub async fn delete_volume(clients: Clients, id: String) -> Result<(), ResourceError> {
    remove_once_visible(
        "volume",
        &id,
        format!("delete volume {id}"),
        "InvalidVolume.NotFound",
        &[],
        || clients.ec2.delete_volume().volume_id(&id).send(),
    )
    .await
}

pub async fn delete_snapshot(clients: Clients, id: String) -> Result<(), ResourceError> {
    remove_once_visible(
        "snapshot",
        &id,
        format!("delete snapshot {id}"),
        "InvalidSnapshot.NotFound",
        &[],
        || clients.ec2.delete_snapshot().snapshot_id(&id).send(),
    )
    .await
}

pub async fn deregister_image(clients: Clients, id: String) -> Result<(), ResourceError> {
    remove_once_visible(
        "image",
        &id,
        format!("deregister {id}"),
        "InvalidAMIID.NotFound",
        // Deregistered already.
        &["InvalidAMIID.Unavailable"],
        || clients.ec2.deregister_image().image_id(&id).send(),
    )
    .await
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
    remove_once_visible(
        "volume",
        &id,
        format!("detach {id} from {instance}"),
        "InvalidVolume.NotFound",
        // Not attached (any more): nothing to detach.
        &["IncorrectState", "InvalidAttachment.NotFound"],
        || {
            clients
                .ec2
                .detach_volume()
                .volume_id(&id)
                .instance_id(&instance)
                .send()
        },
    )
    .await?;
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
                let described = ec2.describe_instances().instance_ids(&id).send().await;
                let Some(out) = visible(described, "InvalidInstanceID.NotFound", &id)? else {
                    return Ok(Poll::NotYetVisible);
                };
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
    remove_once_visible(
        "instance",
        &id,
        format!("terminate {id}"),
        "InvalidInstanceID.NotFound",
        &[],
        || clients.ec2.terminate_instances().instance_ids(&id).send(),
    )
    .await?;
    // EC2 took the termination, so it knew the instance: NotFound from here on is an
    // instance terminated long enough to drop out of DescribeInstances.
    let ec2 = clients.ec2.clone();
    wait_for(
        "instance",
        &id,
        WaitPolicy::SHORT,
        &CancellationToken::new(),
        |state, _| progress.note(format!("{id}: {state}")),
        || {
            let (ec2, id) = (ec2.clone(), id.clone());
            async move {
                let described = ec2.describe_instances().instance_ids(&id).send().await;
                let Some(out) = visible(described, "InvalidInstanceID.NotFound", &id)? else {
                    return Ok(Poll::Ready(()));
                };
                let state = out
                    .reservations()
                    .iter()
                    .flat_map(|r| r.instances())
                    .find_map(|i| i.state().and_then(|s| s.name()))
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_else(|| "terminated".into());
                Ok(match state.as_str() {
                    "terminated" => Poll::Ready(()),
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

/// Deletes a key pair by name. DeleteKeyPair answers success for a name it does not know,
/// so a key pair that is not visible yet is looked for first.
pub async fn delete_key_pair(clients: Clients, name: String) -> Result<(), ResourceError> {
    let ec2 = clients.ec2.clone();
    let known = wait_for(
        "key pair",
        &name,
        WaitPolicy::SHORT,
        &CancellationToken::new(),
        |_, _| {},
        || {
            let (ec2, name) = (ec2.clone(), name.clone());
            async move {
                let described = ec2.describe_key_pairs().key_names(&name).send().await;
                Ok(
                    match visible(described, "InvalidKeyPair.NotFound", &name)? {
                        Some(_) => Poll::Ready(true),
                        None => Poll::NotYetVisible,
                    },
                )
            }
        },
    )
    .await;
    match known {
        Ok(_) | Err(WaitError::NeverVisible { .. }) => {}
        Err(e) => return Err(e),
    }
    clients
        .ec2
        .delete_key_pair()
        .key_name(&name)
        .send()
        .await
        .map(|_| ())
        .or_else(|e| match code(&e) {
            Some("InvalidKeyPair.NotFound") => Ok(()),
            _ => Err(WaitError::Poll(AwsError::new(
                format!("delete key pair {name}"),
                &e,
            ))),
        })
}

/// Deletes a security group. An instance that used it can hold it for a few seconds after it
/// terminated (DependencyViolation), and a group made a moment ago may not be visible yet
/// (NotFound): both are retried for a while.
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
            Err(e)
                if matches!(
                    code(&e),
                    Some("DependencyViolation" | "InvalidGroup.NotFound")
                ) && attempt < ATTEMPTS =>
            {
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
            Ok(_) => return Ok(()),
            Err(e) => return Err(AwsError::new(format!("delete security group {id}"), &e)),
        }
    }
}

/// Deregisters an image made by CreateImage and deletes the snapshots it made with it.
pub async fn deregister_image_and_snapshots(
    clients: Clients,
    id: String,
) -> Result<(), ResourceError> {
    // Its snapshots are known only while it is registered: an image made a moment ago is
    // waited for until it is visible, so that none is left behind.
    let ec2 = clients.ec2.clone();
    let snapshots: Vec<String> = wait_for(
        "image",
        &id,
        WaitPolicy::SHORT,
        &CancellationToken::new(),
        |_, _| {},
        || {
            let (ec2, id) = (ec2.clone(), id.clone());
            async move {
                let described = ec2.describe_images().image_ids(&id).send().await;
                let Some(out) = visible(described, "InvalidAMIID.NotFound", &id)? else {
                    return Ok(Poll::NotYetVisible);
                };
                Ok(Poll::Ready(
                    out.images().first().map(snapshot_ids).unwrap_or_default(),
                ))
            }
        },
    )
    .await?;
    deregister_image(clients.clone(), id).await?;
    for snapshot in snapshots {
        delete_snapshot(clients.clone(), snapshot).await?;
    }
    Ok(())
}

/// What this build made under a name EC2 keeps unique (an AMI, a security group), found
/// after a create whose answer was lost: the SDK's retry of it was refused as a duplicate.
/// Filters may lag behind a create too, so it is looked for within `VISIBILITY_BOUND`.
pub async fn made_by_this_build(
    clients: &Clients,
    kind: Unique,
    name: &str,
    build_id: &str,
) -> Result<String, ResourceError> {
    let ec2 = clients.ec2.clone();
    let by_build = filter(format!("tag:{}", crate::artifact::TAG_BUILD_ID), build_id);
    wait_for(
        kind.what(),
        name,
        WaitPolicy::SHORT,
        &CancellationToken::new(),
        |_, _| {},
        || {
            let (ec2, by_build) = (ec2.clone(), by_build.clone());
            async move {
                let found: Option<String> = match kind {
                    Unique::Image => ec2
                        .describe_images()
                        .owners("self")
                        .filters(filter("name", name))
                        .filters(by_build)
                        .send()
                        .await
                        .map_err(|e| AwsError::new(format!("look for image {name}"), &e))?
                        .images()
                        .first()
                        .and_then(|i| i.image_id().map(str::to_string)),
                    Unique::SecurityGroup => ec2
                        .describe_security_groups()
                        .filters(filter("group-name", name))
                        .filters(by_build)
                        .send()
                        .await
                        .map_err(|e| AwsError::new(format!("look for security group {name}"), &e))?
                        .security_groups()
                        .first()
                        .and_then(|g| g.group_id().map(str::to_string)),
                };
                Ok(found.map_or(Poll::NotYetVisible, Poll::Ready))
            }
        },
    )
    .await
}

/// Resources whose names EC2 keeps unique.
#[derive(Debug, Clone, Copy)]
pub enum Unique {
    Image,
    SecurityGroup,
}

impl Unique {
    fn what(self) -> &'static str {
        match self {
            Unique::Image => "image",
            Unique::SecurityGroup => "security group",
        }
    }
}
