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

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use aws_sdk_ec2::types::Image;
use serde::Serialize;

use super::channel::{self, ChannelError};
use crate::artifact::{TAG_CHANNEL, TAG_COMMIT, TAG_SOURCE_AMI};
use crate::aws::image as aws_image;
use crate::aws::resources::ResourceError;
use crate::aws::ssm::SsmError;
use crate::aws::wait::WaitError;
use crate::aws::{AwsError, AwsOptions, Clients};
use crate::template::{self, Commit, LoadOptions, TemplateError};

mod reasons;
use reasons::{launch_template_images, shared, Reasons};

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
                    .map(|b| (&b.image.name, &b.image.publish, TAG_SOURCE_AMI)),
                loaded
                    .bake
                    .as_ref()
                    .map(|b| (&b.image.name, &b.image.publish, TAG_COMMIT)),
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

/// Judges every image amibake made in the selection, then (with `apply`) removes those no
/// reason keeps, one by one.
pub async fn prune(options: &PruneOptions) -> Result<Pruned, PruneError> {
    let (groups, mut channels) = scope(&options.selection)?;
    let clients = channel::clients(&options.aws).await?;
    let all = aws_image::made_by_amibake(&clients).await?;
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

    let mut keep = Reasons::default();
    keep.newest(&groups, &candidates, options.keep);
    if let Some(age) = options.older_than {
        keep.younger_than(&candidates, age);
    }
    keep.in_channels(&clients, &channels, options.keep).await?;
    for (image, why) in aws_image::references(&clients, &ids).await? {
        keep.add(&image, why);
    }
    for (image, why) in launch_template_images(&clients).await? {
        keep.add(&image, why);
    }
    if !options.include_shared {
        let unkept: Vec<&Image> = candidates
            .iter()
            .filter(|i| !keep.holds(i.image_id().unwrap_or_default()))
            .copied()
            .collect();
        for (image, why) in shared(&clients, &unkept).await? {
            keep.add(&image, why);
        }
    }
    keep.bases_of_staying(&all, &ids);

    let mut images: Vec<Judged> = candidates
        .iter()
        .map(|i| judged(i, &keep, options))
        .collect();
    let failed = match options.apply {
        true => remove_all(&clients, &mut images, options.removal, &all).await,
        false => Vec::new(),
    };
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

/// The verdict on one image: kept for the reasons found, or removed for the one the options
/// give.
fn judged(image: &Image, keep: &Reasons, options: &PruneOptions) -> Judged {
    let id = image.image_id().unwrap_or_default().to_string();
    let (decision, reasons) = match keep.0.get(&id) {
        Some(reasons) => (Decision::Keep, reasons.clone()),
        None => (Decision::Remove, vec![removal_reason(options)]),
    };
    Judged {
        ami_id: id,
        name: image.name().unwrap_or_default().to_string(),
        created: image.creation_date().unwrap_or("-").to_string(),
        decision,
        reasons,
        snapshots: aws_image::snapshot_ids(image),
        outcome: None,
    }
}

/// Removes every image judged `Remove`, noting each outcome; answers what failed.
async fn remove_all(
    clients: &Clients,
    images: &mut [Judged],
    removal: Removal,
    all: &[Image],
) -> Vec<String> {
    let mut failed = Vec::new();
    let mut gone = BTreeSet::new();
    for judged in images.iter_mut().filter(|j| j.decision == Decision::Remove) {
        let done = remove(clients, judged, removal, all, &gone).await;
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
    failed
}

fn removal_reason(options: &PruneOptions) -> String {
    let mut why = format!("not among the newest {}", options.keep);
    if let Some(age) = options.older_than {
        why.push_str(&format!(", older than {}", humantime::format_duration(age)));
    }
    why.push_str(", and nothing uses it");
    why
}

/// Removes one image as `removal` says; a deregistered image's snapshots go with it unless
/// another image still registered (`gone` are those this prune already removed) uses them.
async fn remove(
    clients: &Clients,
    judged: &Judged,
    removal: Removal,
    all: &[Image],
    gone: &BTreeSet<String>,
) -> Result<String, ResourceError> {
    let id = &judged.ami_id;
    match removal {
        Removal::Disable => {
            aws_image::disable(clients, id)
                .await
                .map_err(WaitError::Poll)?;
            Ok("disabled".into())
        }
        Removal::Deprecate => {
            // EC2 refuses a time in the past; a minute from now is the soonest it takes.
            let at = aws_smithy_types::DateTime::from(SystemTime::now() + Duration::from_secs(60));
            let deprecate = aws_image::Setting::DeprecateAt(at);
            aws_image::set(clients, id, deprecate)
                .await
                .map_err(WaitError::Poll)?;
            Ok("deprecated".into())
        }
        Removal::Deregister => {
            aws_image::deregister(clients.clone(), id.clone()).await?;
            let mut deleted = Vec::new();
            for snapshot in &judged.snapshots {
                let shared = all.iter().any(|other| {
                    let other_id = other.image_id().unwrap_or_default();
                    other_id != id
                        && !gone.contains(other_id)
                        && aws_image::snapshot_ids(other).contains(snapshot)
                });
                if shared {
                    continue;
                }
                crate::aws::snapshot::delete(clients.clone(), snapshot.clone()).await?;
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
