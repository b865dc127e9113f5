//! Snapshots: waited for until completed, and deleted.

use tokio_util::sync::CancellationToken;

use aws_sdk_ec2::types::{ResourceType, Tag};

use super::resources::{remove_once_visible, tagged, visible, ResourceError};
use super::wait::{wait_for, Poll, WaitPolicy};
use super::{filter, AwsError, Clients};
use crate::engine::{Progress, Unit};

/// Waits until a snapshot is completed, reporting its percentage.
pub async fn wait(
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

pub async fn delete(clients: Clients, id: String) -> Result<(), ResourceError> {
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

/// A snapshot of a volume, tagged in the call (the wait is `wait`). CreateSnapshot takes no
/// client token: see `of_volume_by_build` for what a lost answer leaves.
pub async fn create_of_volume(
    clients: &Clients,
    volume_id: &str,
    description: String,
    tags: &[Tag],
) -> Result<String, AwsError> {
    let out = clients
        .ec2
        .create_snapshot()
        .volume_id(volume_id)
        .description(description)
        .tag_specifications(tagged(ResourceType::Snapshot, tags))
        .send()
        .await
        .map_err(|e| AwsError::new(format!("snapshot {volume_id}"), e))?;
    out.snapshot_id().map(str::to_string).ok_or_else(|| {
        AwsError::answer(
            format!("snapshot {volume_id}"),
            "CreateSnapshot returned no snapshot id",
        )
    })
}

/// This build's snapshots of `volume_id`.
pub async fn of_volume_by_build(
    clients: &Clients,
    volume_id: &str,
    build_id: &str,
) -> Result<Vec<String>, AwsError> {
    let found = clients
        .ec2
        .describe_snapshots()
        .owner_ids("self")
        .filters(filter(
            format!("tag:{}", crate::artifact::TAG_BUILD_ID),
            build_id,
        ))
        .filters(filter("volume-id", volume_id))
        .send()
        .await
        .map_err(|e| AwsError::new(format!("look for other snapshots of {volume_id}"), e))?;
    Ok(found
        .snapshots()
        .iter()
        .filter_map(|snap| snap.snapshot_id().map(str::to_string))
        .collect())
}

/// A snapshot as EC2 describes it.
pub async fn describe(
    clients: &Clients,
    id: &str,
) -> Result<aws_sdk_ec2::types::Snapshot, AwsError> {
    let action = || format!("describe the snapshot {id}");
    let out = clients
        .ec2
        .describe_snapshots()
        .snapshot_ids(id)
        .send()
        .await
        .map_err(|e| AwsError::new(action(), e))?;
    out.snapshots()
        .first()
        .cloned()
        .ok_or_else(|| AwsError::answer(action(), "EC2 answered no snapshot"))
}

/// A copy of a snapshot in the same region, tagged in the call (the wait is `wait`).
pub async fn copy(
    clients: &Clients,
    source_id: &str,
    description: String,
    tags: &[Tag],
) -> Result<String, AwsError> {
    let action = || format!("copy {source_id}");
    let out = clients
        .ec2
        .copy_snapshot()
        .source_snapshot_id(source_id)
        .source_region(&clients.region)
        .description(description)
        .tag_specifications(tagged(ResourceType::Snapshot, tags))
        .send()
        .await
        .map_err(|e| AwsError::new(action(), e))?;
    out.snapshot_id()
        .map(str::to_string)
        .ok_or_else(|| AwsError::answer(action(), "CopySnapshot returned no snapshot id"))
}

/// Whether EBS encrypts new volumes and snapshots by default in this region.
pub async fn encrypted_by_default(clients: &Clients) -> Result<bool, AwsError> {
    let out = clients
        .ec2
        .get_ebs_encryption_by_default()
        .send()
        .await
        .map_err(|e| AwsError::new("GetEbsEncryptionByDefault", e))?;
    Ok(out.ebs_encryption_by_default() == Some(true))
}

/// Snapshots of amibake runs, as (build id, snapshot id).
pub async fn of_runs(clients: &Clients) -> Result<Vec<(String, String)>, AwsError> {
    let mut found = Vec::new();
    let mut pages = clients
        .ec2
        .describe_snapshots()
        .filters(super::resources::of_runs())
        .owner_ids("self")
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| AwsError::new("list the snapshots of amibake runs", e))?;
        found.extend(super::resources::by_build_id(
            page.snapshots(),
            |r| r.tags(),
            |r| r.snapshot_id(),
        ));
    }
    Ok(found)
}
