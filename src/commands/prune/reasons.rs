//! The reasons an image stays: what names it (the newest of its name, a channel's
//! versions and labels, EC2's references, launch templates), whom it is shared with, and
//! the images it is the base of.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use aws_sdk_ec2::types::Image;

use super::{Group, PruneError};
use crate::artifact::TAG_BASE_AMI;
use crate::aws::image as aws_image;
use crate::aws::ssm::{self, SsmError};
use crate::aws::{launch_template, AwsError, Clients};
use crate::commands::channel::ChannelError;

/// Why each image stays, by image id; an image with no reason goes.
#[derive(Default)]
pub struct Reasons(pub BTreeMap<String, Vec<String>>);

impl Reasons {
    pub fn add(&mut self, id: &str, why: String) {
        self.0.entry(id.to_string()).or_default().push(why);
    }

    pub fn holds(&self, id: &str) -> bool {
        self.0.contains_key(id)
    }

    /// The newest `keep` of each name prefix (`candidates` are newest first).
    pub fn newest(&mut self, groups: &[Group], candidates: &[&Image], keep: usize) {
        for group in groups {
            let newest = candidates.iter().filter(|i| group.holds(i)).take(keep);
            for image in newest {
                self.add(
                    image.image_id().unwrap_or_default(),
                    format!("one of the newest {keep} named {}*", group.prefix),
                );
            }
        }
    }

    /// Those made less than `age` ago (or whose age EC2 does not say).
    pub fn younger_than(&mut self, candidates: &[&Image], age: Duration) {
        let cutoff = SystemTime::now() - age;
        for image in candidates {
            let created = image
                .creation_date()
                .and_then(|d| humantime::parse_rfc3339_weak(d.trim_end_matches('Z')).ok());
            if created.is_none_or(|c| c > cutoff) {
                self.add(
                    image.image_id().unwrap_or_default(),
                    format!("newer than {}", humantime::format_duration(age)),
                );
            }
        }
    }

    /// What the newest `keep` versions of each channel name, and every labelled version.
    pub async fn in_channels(
        &mut self,
        clients: &Clients,
        channels: &[String],
        keep: usize,
    ) -> Result<(), PruneError> {
        for parameter in channels {
            let history = match ssm::history(clients, parameter).await {
                Ok(history) => history,
                Err(SsmError::NoParameter { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            for v in history.iter().rev().take(keep) {
                let why = format!(
                    "version {} of {parameter} (one of its newest {keep})",
                    v.version
                );
                self.add(&v.value, why);
            }
            for v in &history {
                for label in &v.labels {
                    let why = format!("label `{label}` of {parameter} (version {})", v.version);
                    self.add(&v.value, why);
                }
            }
        }
        Ok(())
    }

    /// The base of an image that stays stays, and so on down the line.
    pub fn bases_of_staying(&mut self, all: &[Image], candidates: &[String]) {
        loop {
            let staying_bases: Vec<(String, String)> = all
                .iter()
                .filter(|i| {
                    let id = i.image_id().unwrap_or_default();
                    !candidates.iter().any(|c| c == id) || self.holds(id)
                })
                .filter_map(|i| {
                    let base = i
                        .tags()
                        .iter()
                        .find(|t| t.key() == Some(TAG_BASE_AMI))?
                        .value()?;
                    Some((base.to_string(), i.image_id()?.to_string()))
                })
                .filter(|(base, _)| candidates.contains(base) && !self.holds(base))
                .collect();
            if staying_bases.is_empty() {
                return;
            }
            for (base, child) in staying_bases {
                self.add(&base, format!("the base of {child}, which stays"));
            }
        }
    }
}

/// The images every version of every launch template names, a `resolve:ssm:` image
/// resolved to what it names now (EC2's references look only at the newest 20 versions).
pub async fn launch_template_images(
    clients: &Clients,
) -> Result<Vec<(String, String)>, ChannelError> {
    let mut resolved: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut found = Vec::new();
    for v in launch_template::version_images(clients).await? {
        let image = match v.image.strip_prefix("resolve:ssm:") {
            Some(parameter) => {
                if !resolved.contains_key(parameter) {
                    let value = ssm::value(clients, parameter).await?;
                    resolved.insert(parameter.to_string(), value);
                }
                match &resolved[parameter] {
                    Some(value) => value.clone(),
                    None => continue,
                }
            }
            None => v.image.clone(),
        };
        let default = if v.default { ", its default" } else { "" };
        found.push((
            image,
            format!(
                "version {} of launch template {}{default}",
                v.version, v.template
            ),
        ));
    }
    Ok(found)
}

/// Which of `images` other accounts may launch: shared with an account, an organization or
/// an organizational unit, or public. What those accounts run, this one cannot see.
pub async fn shared(
    clients: &Clients,
    images: &[&Image],
) -> Result<Vec<(String, String)>, AwsError> {
    let mut found = Vec::new();
    for image in images {
        let id = image.image_id().unwrap_or_default();
        if image.public() == Some(true) {
            found.push((id.to_string(), "public: any account may launch it".into()));
            continue;
        }
        let with: Vec<String> = aws_image::launch_permissions(clients, id)
            .await?
            .iter()
            .map(ToString::to_string)
            .collect();
        if !with.is_empty() {
            found.push((
                id.to_string(),
                format!(
                    "shared with {} (--include-shared to judge it anyway)",
                    with.join(", ")
                ),
            ));
        }
    }
    Ok(found)
}
