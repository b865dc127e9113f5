//! Finding an AMI from a template's reference, and reading what a new image must copy from it.

use aws_sdk_ec2::types::{
    ArchitectureValues, BlockDeviceMapping, BootModeValues, Image, ImageState, Tag,
    VirtualizationType,
};

use super::{AwsError, Clients};
use crate::artifact::{
    STATE_BUILDING, TAG_CHANNEL, TAG_FINGERPRINT, TAG_STATE, TAG_TESTED, TESTED_PASSED,
};
use crate::template::{AmiFilter, AmiRef, SsmSelector};

/// A base AMI as `bake` needs it: where its root is, and everything RegisterImage must copy.
#[derive(Debug, Clone)]
pub struct BaseImage {
    pub id: String,
    pub name: String,
    pub root_device_name: String,
    pub root_snapshot_id: String,
    pub root_volume_size_gb: i32,
    pub architecture: ArchitectureValues,
    pub virtualization_type: Option<VirtualizationType>,
    pub boot_mode: Option<BootModeValues>,
    pub ena_support: Option<bool>,
    pub sriov_net_support: Option<String>,
    /// Every mapping, the root included, as the image has them.
    pub mappings: Vec<BlockDeviceMapping>,
}

#[derive(Debug, thiserror::Error)]
pub enum AmiError {
    #[error(transparent)]
    Aws(#[from] AwsError),
    #[error("{reference} names {value}, which is not an AMI id")]
    NotAnImageId { reference: String, value: String },
    #[error("no available AMI matches {reference}")]
    NoMatch { reference: String },
    #[error("{count} AMIs match {reference} ({ids}); set most_recent = true or narrow the name")]
    Ambiguous {
        reference: String,
        count: usize,
        ids: String,
    },
    #[error("{image} not found")]
    NotFound { image: String },
    #[error("{image} is {state}, not available")]
    NotAvailable { image: String, state: String },
    #[error("{image} has no EBS snapshot at its root device {device}; only EBS-backed AMIs can be baked")]
    NotEbsBacked { image: String, device: String },
    #[error("{image}: DescribeImages did not say its {field}")]
    MissingField { image: String, field: &'static str },
}

/// The AMI id a reference names now.
pub async fn resolve(clients: &Clients, reference: &AmiRef) -> Result<String, AmiError> {
    match reference {
        AmiRef::Id(id) => Ok(id.clone()),
        AmiRef::Ssm {
            parameter,
            selector,
        } => {
            // GetParameter takes the launch-template form itself: name, name:version, name:label.
            let name = match selector {
                None => parameter.clone(),
                Some(SsmSelector::Version(v)) => format!("{parameter}:{v}"),
                Some(SsmSelector::Label(l)) => format!("{parameter}:{l}"),
            };
            let out = clients
                .ssm
                .get_parameter()
                .name(&name)
                .send()
                .await
                .map_err(|e| AwsError::new(format!("read SSM parameter {name}"), e))?;
            let value = out
                .parameter()
                .and_then(|p| p.value())
                .unwrap_or_default()
                .to_string();
            if !value.starts_with("ami-") {
                return Err(AmiError::NotAnImageId {
                    reference: reference.to_string(),
                    value,
                });
            }
            Ok(value)
        }
        AmiRef::Filter(filter) => newest_matching(clients, reference, filter).await,
    }
}

async fn newest_matching(
    clients: &Clients,
    reference: &AmiRef,
    filter: &AmiFilter,
) -> Result<String, AmiError> {
    let mut request = clients
        .ec2
        .describe_images()
        .set_owners(Some(filter.owners.clone()))
        .filters(super::filter("name", &filter.name))
        .filters(super::filter("state", "available"));
    if let Some(arch) = &filter.architecture {
        request = request.filters(super::filter("architecture", arch));
    }
    let out = request
        .send()
        .await
        .map_err(|e| AwsError::new(format!("find {reference}"), e))?;
    let mut images: Vec<&Image> = out
        .images()
        .iter()
        .filter(|i| i.image_id().is_some())
        .collect();
    // ISO 8601 creation dates sort as text.
    images.sort_by(|a, b| b.creation_date().cmp(&a.creation_date()));
    match images.as_slice() {
        [] => Err(AmiError::NoMatch {
            reference: reference.to_string(),
        }),
        [only] => Ok(only.image_id().unwrap_or_default().to_string()),
        [newest, ..] if filter.most_recent => Ok(newest.image_id().unwrap_or_default().to_string()),
        many => Err(AmiError::Ambiguous {
            reference: reference.to_string(),
            count: many.len(),
            ids: many
                .iter()
                .filter_map(|i| i.image_id())
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// Reads an available, EBS-backed AMI's root and the attributes a derived image must keep.
pub async fn describe(clients: &Clients, image_id: &str) -> Result<BaseImage, AmiError> {
    let out = clients
        .ec2
        .describe_images()
        .image_ids(image_id)
        .send()
        .await
        .map_err(|e| AwsError::new(format!("describe {image_id}"), e))?;
    let image = out.images().first().ok_or_else(|| AmiError::NotFound {
        image: image_id.into(),
    })?;
    let missing = |field| AmiError::MissingField {
        image: image_id.into(),
        field,
    };
    let state = image.state().ok_or_else(|| missing("state"))?;
    if *state != ImageState::Available {
        return Err(AmiError::NotAvailable {
            image: image_id.into(),
            state: state.as_str().into(),
        });
    }
    let root_device_name = image
        .root_device_name()
        .ok_or_else(|| missing("root device name"))?
        .to_string();
    let root = image
        .block_device_mappings()
        .iter()
        .find(|m| m.device_name() == Some(root_device_name.as_str()))
        .and_then(|m| m.ebs())
        .filter(|ebs| ebs.snapshot_id().is_some())
        .ok_or_else(|| AmiError::NotEbsBacked {
            image: image_id.into(),
            device: root_device_name.clone(),
        })?;
    Ok(BaseImage {
        id: image_id.to_string(),
        name: image.name().unwrap_or_default().to_string(),
        root_snapshot_id: root.snapshot_id().unwrap_or_default().to_string(),
        root_volume_size_gb: root
            .volume_size()
            .ok_or_else(|| missing("root volume size"))?,
        root_device_name,
        architecture: image
            .architecture()
            .cloned()
            .ok_or_else(|| missing("architecture"))?,
        virtualization_type: image.virtualization_type().cloned(),
        boot_mode: image.boot_mode().cloned(),
        ena_support: image.ena_support(),
        sriov_net_support: image.sriov_net_support().map(str::to_string),
        mappings: image.block_device_mappings().to_vec(),
    })
}

/// An identical earlier build, found by its fingerprint.
#[derive(Debug, Clone)]
pub struct EarlierBuild {
    pub id: String,
    pub name: String,
    /// Whether an instance of it passed the template's tests.
    pub tested: bool,
}

/// An available image of this account carrying `fingerprint`. How both modes find an
/// identical earlier build to reuse.
/// Adds `channel` to the channels `image_id`'s `amibake:channel` tag names (space-separated),
/// so `prune` reads that channel's versions and labels too. A value past EC2's 256
/// characters is left as it is: the channel's current version still holds the image
/// through DescribeImageReferences.
pub async fn add_channel_tag(
    clients: &Clients,
    image_id: &str,
    channel: &str,
) -> Result<(), AwsError> {
    let described = clients
        .ec2
        .describe_images()
        .image_ids(image_id)
        .send()
        .await
        .map_err(|e| AwsError::new(format!("describe {image_id}"), e))?;
    let now = described
        .images()
        .iter()
        .flat_map(|i| i.tags())
        .find(|t| t.key() == Some(TAG_CHANNEL))
        .and_then(|t| t.value())
        .unwrap_or_default();
    let mut channels: Vec<&str> = now.split_whitespace().collect();
    if channels.contains(&channel) {
        return Ok(());
    }
    channels.push(channel);
    channels.sort();
    let value = channels.join(" ");
    if value.len() > 256 {
        return Ok(());
    }
    clients
        .ec2
        .create_tags()
        .resources(image_id)
        .tags(Tag::builder().key(TAG_CHANNEL).value(value).build())
        .send()
        .await
        .map_err(|e| AwsError::new(format!("tag {image_id} with channel {channel}"), e))?;
    Ok(())
}

pub async fn find_by_fingerprint(
    clients: &Clients,
    fingerprint: &str,
) -> Result<Option<EarlierBuild>, AwsError> {
    let out = clients
        .ec2
        .describe_images()
        .owners("self")
        .filters(super::filter(format!("tag:{TAG_FINGERPRINT}"), fingerprint))
        .filters(super::filter("state", "available"))
        .send()
        .await
        .map_err(|e| AwsError::new("look for an identical earlier build", e))?;
    // Only a finished run's image: a killed run's may lack what came after it.
    let building = |i: &Image| {
        i.tags()
            .iter()
            .any(|t| t.key() == Some(TAG_STATE) && t.value() == Some(STATE_BUILDING))
    };
    let tested = |i: &Image| {
        i.tags()
            .iter()
            .any(|t| t.key() == Some(TAG_TESTED) && t.value() == Some(TESTED_PASSED))
    };
    Ok(out.images().iter().filter(|i| !building(i)).find_map(|i| {
        Some(EarlierBuild {
            id: i.image_id()?.to_string(),
            name: i.name().unwrap_or_default().to_string(),
            tested: tested(i),
        })
    }))
}

/// An image as the commands that operate images judge it: its state and its tags.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageFacts {
    pub id: String,
    pub name: String,
    /// `available`, `pending`, `failed`, `disabled`...
    pub state: String,
    pub tags: std::collections::BTreeMap<String, String>,
}

impl ImageFacts {
    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags.get(key).map(String::as_str)
    }
}

/// The images among `ids` that EC2 still knows, disabled ones included. A deregistered id
/// is simply absent: an `image-id` filter, unlike `ImageIds`, does not fail the whole call
/// for one id EC2 no longer has.
pub async fn facts(
    clients: &Clients,
    ids: &[String],
) -> Result<std::collections::BTreeMap<String, ImageFacts>, AwsError> {
    // DescribeImages takes at most 200 values in one filter.
    const FILTER_VALUES: usize = 200;
    let mut found = std::collections::BTreeMap::new();
    let mut unique: Vec<&String> = ids.iter().collect();
    unique.sort();
    unique.dedup();
    for chunk in unique.chunks(FILTER_VALUES) {
        let filter = aws_sdk_ec2::types::Filter::builder()
            .name("image-id")
            .set_values(Some(chunk.iter().map(|id| id.to_string()).collect()))
            .build();
        let mut pages = clients
            .ec2
            .describe_images()
            .filters(filter)
            .include_deprecated(true)
            .include_disabled(true)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| AwsError::new("describe the channel's images", e))?;
            for image in page.images() {
                let Some(id) = image.image_id() else { continue };
                found.insert(
                    id.to_string(),
                    ImageFacts {
                        id: id.to_string(),
                        name: image.name().unwrap_or_default().to_string(),
                        state: image.state().map_or("unknown", |s| s.as_str()).to_string(),
                        tags: image
                            .tags()
                            .iter()
                            .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
                            .collect(),
                    },
                );
            }
        }
    }
    Ok(found)
}
