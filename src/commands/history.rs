//! `amibake history PARAM`: a channel's versions, newest first, with what each image is.

use super::channel::{self, ChannelError, Entry};
use crate::aws::{ssm, AwsOptions};

#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct History {
    pub parameter: String,
    pub region: String,
    pub versions: Vec<Entry>,
}

/// The newest `limit` versions of `parameter` (all of them with `None`).
pub async fn history(
    aws: &AwsOptions,
    parameter: &str,
    limit: Option<usize>,
) -> Result<History, ChannelError> {
    let clients = channel::clients(aws).await?;
    let mut versions = channel::entries(&clients, parameter).await?;
    if let Some(limit) = limit {
        versions.truncate(limit);
    }
    Ok(History {
        parameter: parameter.into(),
        region: clients.region.clone(),
        versions,
    })
}

impl History {
    /// One line a version, newest first, under a header.
    pub fn lines(&self) -> Vec<String> {
        let short = |s: &Option<String>, n: usize| {
            s.as_deref()
                .map_or("-".to_string(), |s| s.chars().take(n).collect())
        };
        let mut lines = vec![format!(
            "{:>7}  {:<21}  {:<12}  {:<12}  {:<12}  {:<21}  {:<20}  LABELS",
            "VERSION", "AMI", "STATE", "COMMIT", "TARBALL", "BASE", "WHEN"
        )];
        lines.extend(self.versions.iter().map(|v| {
            format!(
                "{:>7}  {:<21}  {:<12}  {:<12}  {:<12}  {:<21}  {:<20}  {}",
                v.version,
                v.ami_id,
                v.state,
                short(&v.commit, 12),
                short(&v.tarball_sha256, 12),
                short(&v.base_ami, 21),
                ssm::when(v.modified),
                v.labels.join(",")
            )
        }));
        lines
    }
}
