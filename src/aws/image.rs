//! Images the runs make: waited for until available, and deregistered with or without
//! the snapshots they were made with.

use aws_sdk_ec2::types::{
    AttributeValue, BlockDeviceMapping, Image, ImageAttributeName, LaunchPermission,
    LaunchPermissionModifications, ResourceType, Tag,
};
use tokio_util::sync::CancellationToken;

use super::ami::BaseImage;
use super::resources::{created_or_found, tagged, Unique};
use super::AwsError;

use super::resources::{remove_once_visible, visible, ResourceError};
use super::wait::{wait_for, Poll, WaitPolicy};
use super::Clients;
use crate::engine::Progress;

/// Waits until an image is available, polling as `policy` says: `REGISTERED` for an image
/// over completed snapshots, `LONG` for one whose snapshots are still being made or copied.
/// Answers the snapshots it is over, as the available image names them.
pub async fn wait(
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
pub fn snapshot_ids(image: &aws_sdk_ec2::types::Image) -> Vec<String> {
    image
        .block_device_mappings()
        .iter()
        .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()).map(str::to_string))
        .collect()
}

pub async fn deregister(clients: Clients, id: String) -> Result<(), ResourceError> {
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

/// Deregisters an image made by CreateImage and deletes the snapshots it made with it.
pub async fn deregister_with_snapshots(clients: Clients, id: String) -> Result<(), ResourceError> {
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
    deregister(clients.clone(), id).await?;
    for snapshot in snapshots {
        super::snapshot::delete(clients.clone(), snapshot).await?;
    }
    Ok(())
}

/// An image of a stopped instance, with a snapshot of each of its volumes; the image and
/// its snapshots tagged in the call. A retry after a lost answer finds the first attempt's
/// image by its name and this build's tag.
pub async fn create_from_instance(
    clients: &Clients,
    instance_id: &str,
    (name, description): (&str, Option<&str>),
    tags: &[Tag],
    build_id: &str,
    progress: &Progress,
) -> Result<String, ResourceError> {
    let out = clients
        .ec2
        .create_image()
        .instance_id(instance_id)
        .name(name)
        .set_description(description.map(str::to_string))
        .tag_specifications(tagged(ResourceType::Image, tags))
        .tag_specifications(tagged(ResourceType::Snapshot, tags))
        .send()
        .await;
    created_or_found(
        out,
        |o| o.image_id(),
        &format!("create image {name} from {instance_id}"),
        ("InvalidAMIName.Duplicate", Unique::Image, name),
        (clients, build_id),
        progress,
    )
    .await
}

/// An image over snapshots that exist: `base`'s attributes, the given mappings.
pub struct Registration<'a> {
    pub name: &'a str,
    pub description: Option<&'a str>,
    pub base: &'a BaseImage,
    pub mappings: Vec<BlockDeviceMapping>,
    pub tags: &'a [Tag],
}

/// Registers `r`, tagged in the call; a retry after a lost answer finds the first
/// attempt's image by its name and this build's tag.
pub async fn register(
    clients: &Clients,
    r: Registration<'_>,
    build_id: &str,
    progress: &Progress,
) -> Result<String, ResourceError> {
    let base = r.base;
    let out = clients
        .ec2
        .register_image()
        .name(r.name)
        .set_description(r.description.map(str::to_string))
        .architecture(base.architecture.clone())
        .root_device_name(&base.root_device_name)
        .set_virtualization_type(
            base.virtualization_type
                .as_ref()
                .map(|v| v.as_str().to_string()),
        )
        .set_boot_mode(base.boot_mode.clone())
        .set_ena_support(base.ena_support)
        .set_sriov_net_support(base.sriov_net_support.clone())
        .set_block_device_mappings(Some(r.mappings))
        .tag_specifications(tagged(ResourceType::Image, r.tags))
        .send()
        .await;
    created_or_found(
        out,
        |o| o.image_id(),
        &format!("register image {}", r.name),
        ("InvalidAMIName.Duplicate", Unique::Image, r.name),
        (clients, build_id),
        progress,
    )
    .await
}

/// A copy of an image into `clients`' region, and its snapshots, tagged in the call.
pub struct Copy<'a> {
    pub source_region: &'a str,
    pub source_image_id: &'a str,
    pub name: &'a str,
    pub description: Option<&'a str>,
    /// Encrypted with this key; without one, as the source is (an encrypted source gives
    /// an encrypted copy with the region's default key).
    pub kms_key_id: Option<&'a str>,
    pub tags: &'a [Tag],
}

/// Starts `c`; one copy per run and region however often the SDK retries the call (its
/// client token), and a lost answer's copy found by its name and this build's tag.
pub async fn copy(
    clients: &Clients,
    c: Copy<'_>,
    build_id: &str,
    progress: &Progress,
) -> Result<String, ResourceError> {
    let out = clients
        .ec2
        .copy_image()
        .source_region(c.source_region)
        .source_image_id(c.source_image_id)
        .name(c.name)
        .set_description(c.description.map(str::to_string))
        .set_encrypted(c.kms_key_id.map(|_| true))
        .set_kms_key_id(c.kms_key_id.map(str::to_string))
        .client_token(format!("{build_id}-{}", clients.region))
        .tag_specifications(tagged(ResourceType::Image, c.tags))
        .tag_specifications(tagged(ResourceType::Snapshot, c.tags))
        .send()
        .await;
    created_or_found(
        out,
        |o| o.image_id(),
        &format!("copy {} to {}", c.source_image_id, clients.region),
        ("InvalidAMIName.Duplicate", Unique::Image, c.name),
        (clients, build_id),
        progress,
    )
    .await
}

/// Sets one tag on images and snapshots (`amibake:state`, `amibake:tested`).
pub async fn tag(
    clients: &Clients,
    resources: Vec<String>,
    (key, value): (&str, &str),
) -> Result<(), AwsError> {
    clients
        .ec2
        .create_tags()
        .set_resources(Some(resources.clone()))
        .tags(Tag::builder().key(key).value(value).build())
        .send()
        .await
        .map_err(|e| AwsError::new(format!("tag {} {key}={value}", resources.join(", ")), e))?;
    Ok(())
}

/// The image as EC2 describes it now, or None when it does not know it.
pub async fn describe(clients: &Clients, id: &str) -> Result<Option<Image>, AwsError> {
    let out = clients
        .ec2
        .describe_images()
        .image_ids(id)
        .send()
        .await
        .map_err(|e| AwsError::new(format!("describe {id}"), e))?;
    Ok(out.images().first().cloned())
}

/// Who besides this account may launch an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grantee {
    Account(String),
    Organization(String),
    OrganizationalUnit(String),
    /// Public.
    Everyone,
}

impl std::fmt::Display for Grantee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Grantee::Account(a) => write!(f, "account {a}"),
            Grantee::Organization(o) => write!(f, "organization {o}"),
            Grantee::OrganizationalUnit(u) => write!(f, "organizational unit {u}"),
            Grantee::Everyone => f.write_str("everyone"),
        }
    }
}

/// Who may launch the image, besides this account.
pub async fn launch_permissions(clients: &Clients, id: &str) -> Result<Vec<Grantee>, AwsError> {
    let out = clients
        .ec2
        .describe_image_attribute()
        .image_id(id)
        .attribute(ImageAttributeName::LaunchPermission)
        .send()
        .await
        .map_err(|e| AwsError::new(format!("read who may launch {id}"), e))?;
    Ok(out
        .launch_permissions()
        .iter()
        .filter_map(|p| {
            if let Some(account) = p.user_id() {
                Some(Grantee::Account(account.to_string()))
            } else if let Some(org) = p.organization_arn() {
                Some(Grantee::Organization(org.to_string()))
            } else if let Some(unit) = p.organizational_unit_arn() {
                Some(Grantee::OrganizationalUnit(unit.to_string()))
            } else {
                p.group().map(|_| Grantee::Everyone)
            }
        })
        .collect())
}

/// Every image of this account that amibake made (it carries a build id), disabled and
/// deprecated ones included.
pub async fn made_by_amibake(clients: &Clients) -> Result<Vec<Image>, AwsError> {
    let mut images = Vec::new();
    let mut pages = clients
        .ec2
        .describe_images()
        .owners("self")
        .filters(super::filter("tag-key", crate::artifact::TAG_BUILD_ID))
        .include_deprecated(true)
        .include_disabled(true)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| AwsError::new("list the images amibake made", e))?;
        images.extend(page.images().iter().cloned());
    }
    Ok(images)
}

/// What EC2 itself says uses each of `ids`, as (image, "used by KIND ARN"): instances
/// (any state but terminated), the newest versions of launch templates, SSM parameters'
/// current values.
pub async fn references(
    clients: &Clients,
    ids: &[String],
) -> Result<Vec<(String, String)>, AwsError> {
    // DescribeImageReferences takes at most 1,000 image ids.
    const IDS_PER_CALL: usize = 1000;
    let mut found = Vec::new();
    for chunk in ids.chunks(IDS_PER_CALL) {
        let mut pages = clients
            .ec2
            .describe_image_references()
            .set_image_ids(Some(chunk.to_vec()))
            .include_all_resource_types(true)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| AwsError::new("ask EC2 what uses the images", e))?;
            for r in page.image_references() {
                let (Some(image), Some(arn)) = (r.image_id(), r.arn()) else {
                    continue;
                };
                let kind = r.resource_type().map_or("resource", |t| t.as_str());
                found.push((image.to_string(), format!("used by {kind} {arn}")));
            }
        }
    }
    Ok(found)
}

/// Disables an image: it stays, and no one may launch it until it is enabled again.
pub async fn disable(clients: &Clients, id: &str) -> Result<(), AwsError> {
    clients
        .ec2
        .disable_image()
        .image_id(id)
        .send()
        .await
        .map_err(|e| AwsError::new(format!("disable {id}"), e))?;
    Ok(())
}

/// What is said of the image on the way out of its region and account.
pub enum Setting<'a> {
    DeprecateAt(aws_smithy_types::DateTime),
    RequireImdsV2,
    ShareWith(&'a [String]),
}

/// The value `imds_support` holds once an image requires IMDSv2.
pub const IMDS_V2: &str = "v2.0";

pub async fn set(clients: &Clients, id: &str, setting: Setting<'_>) -> Result<(), AwsError> {
    let on = |what: &str| format!("{what} on {id} in {}", clients.region);
    match setting {
        Setting::DeprecateAt(at) => clients
            .ec2
            .enable_image_deprecation()
            .image_id(id)
            .deprecate_at(at)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| AwsError::new(on("set the deprecation time"), e)),
        Setting::RequireImdsV2 => clients
            .ec2
            .modify_image_attribute()
            .image_id(id)
            .imds_support(AttributeValue::builder().value(IMDS_V2).build())
            .send()
            .await
            .map(|_| ())
            .map_err(|e| AwsError::new(on("require IMDSv2"), e)),
        Setting::ShareWith(accounts) => {
            let add = accounts
                .iter()
                .map(|a| LaunchPermission::builder().user_id(a).build())
                .collect();
            clients
                .ec2
                .modify_image_attribute()
                .image_id(id)
                .launch_permission(
                    LaunchPermissionModifications::builder()
                        .set_add(Some(add))
                        .build(),
                )
                .send()
                .await
                .map(|_| ())
                .map_err(|e| AwsError::new(on("share"), e))
        }
    }
}

/// Every image this account owns, disabled and deprecated ones included.
pub async fn of_account(clients: &Clients) -> Result<Vec<Image>, AwsError> {
    let out = clients
        .ec2
        .describe_images()
        .owners("self")
        .include_disabled(true)
        .include_deprecated(true)
        .send()
        .await
        .map_err(|e| AwsError::new("list this account's images", e))?;
    Ok(out.images().to_vec())
}
