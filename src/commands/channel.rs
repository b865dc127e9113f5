//! What `history`, `promote` and `rollback` share: how a channel's versions and the images
//! they name are read and judged, and how they fail.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::artifact::{TAG_BASE_AMI, TAG_BUILD_ID, TAG_COMMIT, TAG_SOURCE_AMI, TAG_TARBALL_SHA256};
use crate::aws::ami::{self, ImageFacts};
use crate::aws::ssm::{self, SsmError, Version};
use crate::aws::{sdk_config, AwsError, AwsOptions, Clients, NoRegion};

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error(transparent)]
    NoRegion(#[from] NoRegion),
    #[error(transparent)]
    Ssm(#[from] SsmError),
    #[error(transparent)]
    Aws(#[from] AwsError),
    #[error("{image} is not known to EC2 in {region}: it was deregistered, or never existed here")]
    ImageGone { image: String, region: String },
    #[error("{image} is {state}, not available: {why}")]
    ImageNotAvailable {
        image: String,
        state: String,
        why: &'static str,
    },
    #[error("{image} carries no `{TAG_BUILD_ID}` tag, so amibake did not make it; promote only images amibake made")]
    NotMadeByAmibake { image: String },
    #[error("{0}")]
    Usage(String),
}

impl ChannelError {
    pub fn exit_code(&self) -> i32 {
        match self {
            ChannelError::Usage(_) => crate::exit::USAGE,
            _ => crate::exit::BUILD_FAILED,
        }
    }
}

/// The clients for a channel command, in the region the flags or the default chain name.
pub async fn clients(aws: &AwsOptions) -> Result<Clients, ChannelError> {
    Ok(Clients::new(&sdk_config(aws).await)?)
}

/// One version of a channel with what its image says of itself.
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct Entry {
    pub version: i64,
    pub ami_id: String,
    /// The image's state, or `deregistered` when EC2 no longer knows it.
    pub state: String,
    pub commit: Option<String>,
    pub tarball_sha256: Option<String>,
    /// A deployment image's base, or a base image's source.
    pub base_ami: Option<String>,
    /// Seconds since the epoch.
    pub modified: Option<i64>,
    pub labels: Vec<String>,
}

/// A version of the channel, as `promote` and `rollback` report before and after.
#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
pub struct Point {
    pub version: i64,
    pub ami_id: String,
}

impl Point {
    pub fn of(version: &Version) -> Point {
        Point {
            version: version.version,
            ami_id: version.value.clone(),
        }
    }
}

impl std::fmt::Display for Point {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "version {} ({})", self.version, self.ami_id)
    }
}

pub const DEREGISTERED: &str = "deregistered";

/// The channel's versions, newest first, each with its image's state and tags.
pub async fn entries(clients: &Clients, parameter: &str) -> Result<Vec<Entry>, ChannelError> {
    let versions = ssm::history(clients, parameter).await?;
    let ids: Vec<String> = versions.iter().map(|v| v.value.clone()).collect();
    let images = ami::facts(clients, &ids).await?;
    Ok(versions
        .iter()
        .rev()
        .map(|v| entry(v, images.get(&v.value)))
        .collect())
}

fn entry(version: &Version, image: Option<&ImageFacts>) -> Entry {
    let tag = |key: &str| image.and_then(|i| i.tag(key)).map(str::to_string);
    Entry {
        version: version.version,
        ami_id: version.value.clone(),
        state: image.map_or(DEREGISTERED.to_string(), |i| i.state.clone()),
        commit: tag(TAG_COMMIT),
        tarball_sha256: tag(TAG_TARBALL_SHA256),
        base_ami: tag(TAG_BASE_AMI).or_else(|| tag(TAG_SOURCE_AMI)),
        modified: version.modified,
        labels: version.labels.clone(),
    }
}

/// The image a channel may be pointed at: known to EC2 here, available, and (for
/// `promote`) made by amibake.
pub async fn deployable(
    clients: &Clients,
    image: &str,
    made_by_amibake: bool,
) -> Result<ImageFacts, ChannelError> {
    let mut found: BTreeMap<String, ImageFacts> = ami::facts(clients, &[image.to_string()]).await?;
    let Some(facts) = found.remove(image) else {
        return Err(ChannelError::ImageGone {
            image: image.into(),
            region: clients.region.clone(),
        });
    };
    if facts.state != "available" {
        let why = match facts.state.as_str() {
            "disabled" => {
                "a disabled image cannot launch instances; enable it first (aws ec2 enable-image)"
            }
            "pending" => "wait until it is available",
            _ => "instances cannot be launched from it",
        };
        return Err(ChannelError::ImageNotAvailable {
            image: image.into(),
            state: facts.state,
            why,
        });
    }
    if made_by_amibake && facts.tag(TAG_BUILD_ID).is_none() {
        return Err(ChannelError::NotMadeByAmibake {
            image: image.into(),
        });
    }
    Ok(facts)
}
