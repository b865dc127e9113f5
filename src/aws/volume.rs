//! Volumes: the attach backend's copy of the base, waited for, detached and deleted.

use tokio_util::sync::CancellationToken;

use aws_sdk_ec2::types::{ResourceType, Tag, VolumeType};

use super::resources::{code, remove_once_visible, tagged, visible, ResourceError};
use super::wait::{wait_for, Poll, WaitPolicy};
use super::{AwsError, Clients};
use crate::engine::Progress;

/// Waits until a volume is `wanted` (`available`, or `attached` for its attachment).
pub async fn wait(
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

pub async fn delete(clients: Clients, id: String) -> Result<(), ResourceError> {
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

/// Detaches a volume from `instance` (always naming it: EC2 needs it to know which
/// attachment is meant) and waits until the volume is available again. Waits with its own
/// token: a cleanup after Ctrl-C must still see the detach through.
pub async fn detach(
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
    wait(
        &clients,
        &id,
        "available",
        &CancellationToken::new(),
        &progress,
    )
    .await
}

/// A volume of a snapshot for this build.
pub struct NewVolume<'a> {
    pub snapshot_id: &'a str,
    pub availability_zone: &'a str,
    pub size_gb: i32,
    pub volume_type: &'a str,
    pub kms_key_id: Option<&'a str>,
    /// A retry of the create (after a lost answer) with the same token gets the same
    /// volume, not a second.
    pub client_token: String,
    pub tags: &'a [Tag],
}

/// Creates `v`; answers the volume's id (the wait is `wait(…, "available", …)`).
pub async fn create(clients: &Clients, v: NewVolume<'_>) -> Result<String, AwsError> {
    let mut request = clients
        .ec2
        .create_volume()
        .snapshot_id(v.snapshot_id)
        .availability_zone(v.availability_zone)
        .client_token(v.client_token)
        .size(v.size_gb)
        .volume_type(VolumeType::from(v.volume_type))
        .tag_specifications(tagged(ResourceType::Volume, v.tags));
    if let Some(key) = v.kms_key_id {
        request = request.encrypted(true).kms_key_id(key);
    }
    let out = request
        .send()
        .await
        .map_err(|e| AwsError::new("create volume", e))?;
    out.volume_id()
        .map(str::to_string)
        .ok_or_else(|| AwsError::answer("create volume", "CreateVolume returned no volume id"))
}

/// The instances a volume is attached to; None when EC2 does not know it.
pub async fn attached_to(clients: &Clients, id: &str) -> Result<Option<Vec<String>>, AwsError> {
    let described = clients.ec2.describe_volumes().volume_ids(id).send().await;
    let Some(out) = visible(described, "InvalidVolume.NotFound", id)? else {
        return Ok(None);
    };
    Ok(Some(
        out.volumes()
            .iter()
            .flat_map(|v| v.attachments())
            .filter_map(|a| a.instance_id().map(str::to_string))
            .collect(),
    ))
}

/// Whether `id` is attached (or attaching) to `host` as `device`.
async fn attached_as(
    clients: &Clients,
    id: &str,
    host: &str,
    device: &str,
) -> Result<bool, AwsError> {
    let described = clients
        .ec2
        .describe_volumes()
        .volume_ids(id)
        .send()
        .await
        .map_err(|e| AwsError::new(format!("describe {id}"), e))?;
    Ok(described
        .volumes()
        .iter()
        .flat_map(|v| v.attachments())
        .any(|a| a.instance_id() == Some(host) && a.device() == Some(device)))
}

/// Attaches `id` to `host` as `device` (the wait is `wait(…, "attached", …)`). The SDK's
/// retry of an attach EC2 carried out, whose answer was lost, is refused as VolumeInUse:
/// attached as asked, that is done.
pub async fn attach(clients: &Clients, id: &str, host: &str, device: &str) -> Result<(), AwsError> {
    let sent = clients
        .ec2
        .attach_volume()
        .volume_id(id)
        .instance_id(host)
        .device(device)
        .send()
        .await;
    match sent {
        Ok(_) => Ok(()),
        Err(e) => {
            let lost_answer =
                code(&e) == Some("VolumeInUse") && attached_as(clients, id, host, device).await?;
            if lost_answer {
                Ok(())
            } else {
                Err(AwsError::new(
                    format!("attach {id} to {host} as {device}"),
                    e,
                ))
            }
        }
    }
}

/// Volumes of amibake runs, as (build id, volume id).
pub async fn of_runs(clients: &Clients) -> Result<Vec<(String, String)>, AwsError> {
    let mut found = Vec::new();
    let mut pages = clients
        .ec2
        .describe_volumes()
        .filters(super::resources::of_runs())
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| AwsError::new("list the volumes of amibake runs", e))?;
        found.extend(super::resources::by_build_id(
            page.volumes(),
            |r| r.tags(),
            |r| r.volume_id(),
        ));
    }
    Ok(found)
}
