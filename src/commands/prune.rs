//! `amibake prune`: remove the old images amibake made, never one that something still
//! uses. Every image is judged before anything is touched, and each decision carries its
//! reasons; nothing is changed without `--apply`.
//!
//! An image is kept when it is one of the newest `keep` of its name prefix, newer than
//! `--older-than`, named by one of the newest `keep` versions or by any label of a channel
//! (those given, the template's, and those the candidates' `amibake:channel` tags name),
//! referenced by an instance, a launch template or an SSM parameter (EC2's own
//! DescribeImageReferences), named by any version of any launch template, shared with
//! another account or the public (whose launches this account cannot see; unless
//! `--include-shared`), or the base of an image that stays.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use aws_sdk_ec2::types::Image;
use serde::Serialize;

use super::channel::{self, ChannelError};
use crate::artifact::{TAG_BASE_AMI, TAG_BUILD_ID, TAG_CHANNEL, TAG_COMMIT, TAG_SOURCE_AMI};
use crate::aws::ssm::{self, SsmError};
use crate::aws::{filter, AwsError, AwsOptions, Clients};
use crate::template::{self, Commit, LoadOptions, TemplateError};

/// Which images a prune looks at.
#[derive(Debug, Clone)]
pub enum Selection {
    /// The images a template's sections name, and the channels they publish to.
    Template {
        path: PathBuf,
        vars: template::VariableInputs,
    },
    /// Images whose name starts with this, and the channels given with it.
    NamePrefix {
        prefix: String,
        channels: Vec<String>,
    },
}

/// What happens to an image that is not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Removal {
    /// Deregistered, with the snapshots no other image uses.
    Deregister,
    /// Deprecated now: hidden from others' listings, still launchable.
    Deprecate,
    /// Disabled: no instance can launch from it; it can be enabled again.
    Disable,
}

#[derive(Debug, Clone)]
pub struct PruneOptions {
    pub aws: AwsOptions,
    pub selection: Selection,
    pub keep: usize,
    pub older_than: Option<Duration>,
    pub removal: Removal,
    pub apply: bool,
    /// Judge images shared with other accounts or the public like any other.
    pub include_shared: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error("{0}")]
    Usage(String),
}

impl From<AwsError> for PruneError {
    fn from(e: AwsError) -> PruneError {
        PruneError::Channel(e.into())
    }
}

impl From<SsmError> for PruneError {
    fn from(e: SsmError) -> PruneError {
        PruneError::Channel(e.into())
    }
}

impl PruneError {
    pub fn exit_code(&self) -> i32 {
        match self {
            PruneError::Template(_) | PruneError::Usage(_) => crate::exit::USAGE,
            PruneError::Channel(e) => e.exit_code(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Keep,
    Remove,
}

/// One image and what the prune made of it.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Judged {
    pub ami_id: String,
    pub name: String,
    pub created: String,
    pub decision: Decision,
    /// Why it is kept (every reason), or why it goes.
    pub reasons: Vec<String>,
    pub snapshots: Vec<String>,
    /// With `--apply`: what was done, or why it could not be.
    pub outcome: Option<String>,
}

#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Pruned {
    pub region: String,
    pub apply: bool,
    pub removal: Removal,
    pub prefixes: Vec<String>,
    pub channels: Vec<String>,
    /// Newest first.
    pub images: Vec<Judged>,
    /// What `--apply` could not do, by id.
    pub failed: Vec<String>,
}

impl Pruned {
    pub fn lines(&self) -> Vec<String> {
        let verb = |j: &Judged| match (j.decision, self.apply) {
            (Decision::Keep, _) => "keep".to_string(),
            (Decision::Remove, false) => format!("would {}", self.removal.verb()),
            (Decision::Remove, true) => self.removal.done().to_string(),
        };
        let mut lines: Vec<String> = self
            .images
            .iter()
            .map(|j| {
                let mut line = format!(
                    "{:<14} {}  {}  {}: {}",
                    verb(j),
                    j.ami_id,
                    j.created,
                    j.name,
                    j.reasons.join("; ")
                );
                if let Some(outcome) = &j.outcome {
                    line.push_str(&format!(" ({outcome})"));
                }
                line
            })
            .collect();
        let removed = self
            .images
            .iter()
            .filter(|j| j.decision == Decision::Remove)
            .count();
        lines.push(if self.apply {
            format!(
                "{removed} of {} images {}, {} failed",
                self.images.len(),
                self.removal.done(),
                self.failed.len()
            )
        } else {
            format!(
                "dry run: {removed} of {} images would be {}; run again with --apply",
                self.images.len(),
                self.removal.done()
            )
        });
        lines
    }
}

impl Removal {
    fn verb(self) -> &'static str {
        match self {
            Removal::Deregister => "deregister",
            Removal::Deprecate => "deprecate",
            Removal::Disable => "disable",
        }
    }

    fn done(self) -> &'static str {
        match self {
            Removal::Deregister => "deregistered",
            Removal::Deprecate => "deprecated",
            Removal::Disable => "disabled",
        }
    }
}

/// Images a prune compares with one another: a name prefix, and for a template's section
/// the tag only that kind of image has, so a base named `shop-base-…` is never counted
/// among the deployment images named `shop-…`.
struct Group {
    prefix: String,
    /// `TAG_SOURCE_AMI` for `[base]`, `TAG_COMMIT` for `[bake]`; none for `--name-prefix`.
    tag: Option<&'static str>,
}

impl Group {
    fn holds(&self, image: &Image) -> bool {
        image.name().unwrap_or_default().starts_with(&self.prefix)
            && self
                .tag
                .is_none_or(|tag| image.tags().iter().any(|t| t.key() == Some(tag)))
    }
}

/// The groups and channels a selection stands for.
fn scope(selection: &Selection) -> Result<(Vec<Group>, Vec<String>), PruneError> {
    match selection {
        Selection::NamePrefix { prefix, channels } => {
            if prefix.len() < 3 {
                return Err(PruneError::Usage(format!(
                    "--name-prefix `{prefix}` is too short to be safe: give at least 3 characters"
                )));
            }
            let group = Group {
                prefix: prefix.clone(),
                tag: None,
            };
            Ok((vec![group], channels.clone()))
        }
        Selection::Template { path, vars } => {
            // Rendered with a marker for what each run fills in; the name up to the first
            // marker is what every run's image name starts with.
            const MARK: &str = "amibakeprunemark";
            let loaded = template::load(
                path,
                &LoadOptions {
                    variables: vars.clone(),
                    commit: Commit::Known(MARK.into()),
                    timestamp: MARK.into(),
                    build_id: MARK.into(),
                    secret_free: false,
                },
            )?;
            let mut groups = Vec::new();
            let mut channels = Vec::new();
            let sections = [
                loaded
                    .base
                    .as_ref()
                    .map(|b| (&b.name, &b.publish, TAG_SOURCE_AMI)),
                loaded
                    .bake
                    .as_ref()
                    .map(|b| (&b.name, &b.publish, TAG_COMMIT)),
            ];
            for (name, publish, tag) in sections.into_iter().flatten() {
                groups.push(Group {
                    prefix: name.split(MARK).next().unwrap_or_default().to_string(),
                    tag: Some(tag),
                });
                channels.extend(publish.iter().map(|p| p.parameter.clone()));
            }
            if let Some(short) = groups.iter().map(|g| &g.prefix).find(|p| p.len() < 3) {
                return Err(PruneError::Usage(format!(
                    "{}: a name that starts `{short}` before its first ${{commit}} or ${{timestamp}} is too short to tell this template's images apart; use --name-prefix",
                    path.display()
                )));
            }
            Ok((groups, channels))
        }
    }
}

pub async fn prune(options: &PruneOptions) -> Result<Pruned, PruneError> {
    let (groups, mut channels) = scope(&options.selection)?;
    let clients = channel::clients(&options.aws).await?;
    let all = amibake_images(&clients).await?;
    let mut candidates: Vec<&Image> = all
        .iter()
        .filter(|i| groups.iter().any(|g| g.holds(i)))
        .collect();
    // Newest first; a name breaks a tie in the second-resolution creation dates.
    candidates.sort_by(|a, b| (b.creation_date(), b.name()).cmp(&(a.creation_date(), a.name())));
    let ids: Vec<String> = candidates
        .iter()
        .filter_map(|i| i.image_id().map(str::to_string))
        .collect();
    // Every channel an image says it was published to, told or not.
    channels.extend(candidates.iter().flat_map(|i| {
        i.tags()
            .iter()
            .filter(|t| t.key() == Some(TAG_CHANNEL))
            .filter_map(|t| t.value())
            .flat_map(|v| v.split_whitespace().map(str::to_string))
    }));
    channels.sort();
    channels.dedup();

    let mut keep: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut because = |id: &str, why: String| keep.entry(id.to_string()).or_default().push(why);
    for group in &groups {
        let newest = candidates
            .iter()
            .filter(|i| group.holds(i))
            .take(options.keep);
        for image in newest {
            because(
                image.image_id().unwrap_or_default(),
                format!("one of the newest {} named {}*", options.keep, group.prefix),
            );
        }
    }
    if let Some(age) = options.older_than {
        let cutoff = SystemTime::now() - age;
        for image in &candidates {
            let created = image
                .creation_date()
                .and_then(|d| humantime::parse_rfc3339_weak(d.trim_end_matches('Z')).ok());
            if created.is_none_or(|c| c > cutoff) {
                because(
                    image.image_id().unwrap_or_default(),
                    format!("newer than {}", humantime::format_duration(age)),
                );
            }
        }
    }
    for parameter in &channels {
        let history = match ssm::history(&clients, parameter).await {
            Ok(history) => history,
            Err(SsmError::NoParameter { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        for v in history.iter().rev().take(options.keep) {
            because(
                &v.value,
                format!(
                    "version {} of {parameter} (one of its newest {})",
                    v.version, options.keep
                ),
            );
        }
        for v in &history {
            for label in &v.labels {
                because(
                    &v.value,
                    format!("label `{label}` of {parameter} (version {})", v.version),
                );
            }
        }
    }
    for (image, why) in references(&clients, &ids).await? {
        because(&image, why);
    }
    for (image, why) in launch_template_images(&clients).await? {
        because(&image, why);
    }
    if !options.include_shared {
        let unkept: Vec<&Image> = candidates
            .iter()
            .filter(|i| !keep.contains_key(i.image_id().unwrap_or_default()))
            .copied()
            .collect();
        for (image, why) in shared(&clients, &unkept).await? {
            keep.entry(image).or_default().push(why);
        }
    }
    // The base of an image that stays stays, and so on down the line.
    loop {
        let staying_bases: Vec<(String, String)> = all
            .iter()
            .filter(|i| {
                let id = i.image_id().unwrap_or_default();
                !ids.iter().any(|c| c == id) || keep.contains_key(id)
            })
            .filter_map(|i| {
                let base = i
                    .tags()
                    .iter()
                    .find(|t| t.key() == Some(TAG_BASE_AMI))?
                    .value()?;
                Some((base.to_string(), i.image_id()?.to_string()))
            })
            .filter(|(base, _)| ids.contains(base) && !keep.contains_key(base))
            .collect();
        if staying_bases.is_empty() {
            break;
        }
        for (base, child) in staying_bases {
            keep.entry(base)
                .or_default()
                .push(format!("the base of {child}, which stays"));
        }
    }

    let mut images: Vec<Judged> = candidates
        .iter()
        .map(|i| {
            let id = i.image_id().unwrap_or_default().to_string();
            let (decision, reasons) = match keep.get(&id) {
                Some(reasons) => (Decision::Keep, reasons.clone()),
                None => (Decision::Remove, vec![removal_reason(options)]),
            };
            Judged {
                ami_id: id,
                name: i.name().unwrap_or_default().to_string(),
                created: i.creation_date().unwrap_or("-").to_string(),
                decision,
                reasons,
                snapshots: snapshots_of(i),
                outcome: None,
            }
        })
        .collect();
    let mut failed = Vec::new();
    if options.apply {
        let mut gone = BTreeSet::new();
        for judged in images.iter_mut().filter(|j| j.decision == Decision::Remove) {
            let done = remove(&clients, judged, options.removal, &all, &gone).await;
            judged.outcome = Some(match done {
                Ok(outcome) => {
                    gone.insert(judged.ami_id.clone());
                    outcome
                }
                Err(e) => {
                    failed.push(format!("{}: {e}", judged.ami_id));
                    format!("failed: {e}")
                }
            });
        }
    }
    Ok(Pruned {
        region: clients.region.clone(),
        apply: options.apply,
        removal: options.removal,
        prefixes: groups.into_iter().map(|g| g.prefix).collect(),
        channels,
        images,
        failed,
    })
}

fn removal_reason(options: &PruneOptions) -> String {
    let mut why = format!("not among the newest {}", options.keep);
    if let Some(age) = options.older_than {
        why.push_str(&format!(", older than {}", humantime::format_duration(age)));
    }
    why.push_str(", and nothing uses it");
    why
}

/// Every image of this account that amibake made, disabled and deprecated ones included.
async fn amibake_images(clients: &Clients) -> Result<Vec<Image>, AwsError> {
    let mut images = Vec::new();
    let mut pages = clients
        .ec2
        .describe_images()
        .owners("self")
        .filters(filter("tag-key", TAG_BUILD_ID))
        .include_deprecated(true)
        .include_disabled(true)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| AwsError::new("list the images amibake made", &e))?;
        images.extend(page.images().iter().cloned());
    }
    Ok(images)
}

fn snapshots_of(image: &Image) -> Vec<String> {
    image
        .block_device_mappings()
        .iter()
        .filter_map(|m| m.ebs()?.snapshot_id().map(str::to_string))
        .collect()
}

/// What EC2 itself says uses each image: instances (any state but terminated), the newest
/// versions of launch templates, SSM parameters' current values.
async fn references(clients: &Clients, ids: &[String]) -> Result<Vec<(String, String)>, AwsError> {
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
            let page = page.map_err(|e| AwsError::new("ask EC2 what uses the images", &e))?;
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

/// The images every version of every launch template names, a `resolve:ssm:` image
/// resolved to what it names now: an Auto Scaling group or a fleet may launch any version,
/// and EC2's references look only at the newest 20.
async fn launch_template_images(clients: &Clients) -> Result<Vec<(String, String)>, ChannelError> {
    let mut templates = Vec::new();
    let mut pages = clients
        .ec2
        .describe_launch_templates()
        .max_results(200)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| AwsError::new("list the launch templates", &e))?;
        templates.extend(page.launch_templates().iter().filter_map(|t| {
            Some((
                t.launch_template_id()?.to_string(),
                t.launch_template_name().unwrap_or_default().to_string(),
            ))
        }));
    }
    let mut resolved: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut found = Vec::new();
    for (id, name) in templates {
        let mut pages = clients
            .ec2
            .describe_launch_template_versions()
            .launch_template_id(&id)
            .max_results(200)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = match page {
                Ok(page) => page,
                // Deleted since it was listed: nothing of it launches any more.
                Err(e)
                    if e.as_service_error()
                        .and_then(|s| aws_sdk_ec2::error::ProvideErrorMetadata::code(s))
                        .is_some_and(|c| c.starts_with("InvalidLaunchTemplate")) =>
                {
                    break
                }
                Err(e) => {
                    let what = format!("read the versions of launch template {name}");
                    return Err(AwsError::new(what, &e).into());
                }
            };
            for v in page.launch_template_versions() {
                let Some(image) = v.launch_template_data().and_then(|d| d.image_id()) else {
                    continue;
                };
                let image = match image.strip_prefix("resolve:ssm:") {
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
                    None => image.to_string(),
                };
                let default = if v.default_version() == Some(true) {
                    ", its default"
                } else {
                    ""
                };
                found.push((
                    image,
                    format!(
                        "version {} of launch template {name}{default}",
                        v.version_number().unwrap_or_default()
                    ),
                ));
            }
        }
    }
    Ok(found)
}

/// Which of `images` other accounts may launch: shared with an account, an organization or
/// an organizational unit, or public. What those accounts run, this one cannot see.
async fn shared(clients: &Clients, images: &[&Image]) -> Result<Vec<(String, String)>, AwsError> {
    let mut found = Vec::new();
    for image in images {
        let id = image.image_id().unwrap_or_default();
        if image.public() == Some(true) {
            found.push((id.to_string(), "public: any account may launch it".into()));
            continue;
        }
        let attribute = clients
            .ec2
            .describe_image_attribute()
            .image_id(id)
            .attribute(aws_sdk_ec2::types::ImageAttributeName::LaunchPermission)
            .send()
            .await
            .map_err(|e| AwsError::new(format!("read who may launch {id}"), &e))?;
        let with: Vec<String> = attribute
            .launch_permissions()
            .iter()
            .filter_map(|p| {
                if let Some(account) = p.user_id() {
                    Some(format!("account {account}"))
                } else if let Some(org) = p.organization_arn() {
                    Some(format!("organization {org}"))
                } else if let Some(unit) = p.organizational_unit_arn() {
                    Some(format!("organizational unit {unit}"))
                } else {
                    p.group().map(|_| "everyone".to_string())
                }
            })
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

/// Removes one image as `removal` says; a deregistered image's snapshots go with it unless
/// another image still registered (`gone` are those this prune already removed) uses them.
async fn remove(
    clients: &Clients,
    judged: &Judged,
    removal: Removal,
    all: &[Image],
    gone: &BTreeSet<String>,
) -> Result<String, AwsError> {
    let id = &judged.ami_id;
    match removal {
        Removal::Disable => {
            clients
                .ec2
                .disable_image()
                .image_id(id)
                .send()
                .await
                .map_err(|e| AwsError::new(format!("disable {id}"), &e))?;
            Ok("disabled".into())
        }
        Removal::Deprecate => {
            // EC2 refuses a time in the past; a minute from now is the soonest it takes.
            let at = aws_smithy_types::DateTime::from(SystemTime::now() + Duration::from_secs(60));
            clients
                .ec2
                .enable_image_deprecation()
                .image_id(id)
                .deprecate_at(at)
                .send()
                .await
                .map_err(|e| AwsError::new(format!("deprecate {id}"), &e))?;
            Ok("deprecated".into())
        }
        Removal::Deregister => {
            clients
                .ec2
                .deregister_image()
                .image_id(id)
                .send()
                .await
                .map_err(|e| AwsError::new(format!("deregister {id}"), &e))?;
            let mut deleted = Vec::new();
            for snapshot in &judged.snapshots {
                let shared = all.iter().any(|other| {
                    let other_id = other.image_id().unwrap_or_default();
                    other_id != id
                        && !gone.contains(other_id)
                        && snapshots_of(other).contains(snapshot)
                });
                if shared {
                    continue;
                }
                clients
                    .ec2
                    .delete_snapshot()
                    .snapshot_id(snapshot)
                    .send()
                    .await
                    .map_err(|e| {
                        AwsError::new(format!("delete snapshot {snapshot} of {id}"), &e)
                    })?;
                deleted.push(snapshot.clone());
            }
            Ok(if deleted.is_empty() {
                "deregistered".into()
            } else {
                format!("deregistered, deleted {}", deleted.join(", "))
            })
        }
    }
}
