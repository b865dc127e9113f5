//! Delivering a built image beyond the region it was made in, the same for both modes:
//! copies to the template's other regions (in parallel, tagged in the call, each undone if
//! the run fails), then on the image and every copy the deprecation time, IMDSv2-only and
//! launch permission for other accounts, each read back before the run goes on. The copies
//! are then marked finished and published to their own region's channel like the image.

use std::time::Duration;

use aws_sdk_ec2::types::Tag;
use tokio::task::JoinSet;

use super::support::{failed, mark_finished, publish, undo_with, waited};
use super::ModeError;
use crate::artifact::{RegionCopy, TAG_BUILD_ID, TAG_FINGERPRINT};
use crate::aws::image::{self, Grantee, Setting, IMDS_V2};
use crate::aws::wait::WaitPolicy;
use crate::aws::{ami, kms, AwsError, Clients};
use crate::engine::{Keep, StepContext, StepError};
use crate::template::{Distribution, SsmPublish};

/// The image in one more region.
pub struct RegionImage {
    pub clients: Clients,
    pub image_id: String,
    pub snapshot_ids: Vec<String>,
    pub reused: bool,
    pub ssm_version: Option<i64>,
}

impl RegionImage {
    pub fn manifest(&self) -> RegionCopy {
        RegionCopy {
            region: self.clients.region.clone(),
            ami_id: self.image_id.clone(),
            snapshot_ids: self.snapshot_ids.clone(),
            reused: self.reused,
            ssm_version: self.ssm_version,
        }
    }
}

/// The image a run made (or reused) in its own region, as its copies are made from it.
pub struct Source<'a> {
    pub clients: &'a Clients,
    pub image_id: &'a str,
    pub name: &'a str,
    pub description: Option<&'a str>,
    /// The image's own tags: each copy and its snapshots carry them from the create call.
    pub tags: Vec<Tag>,
    pub build_id: &'a str,
    pub fingerprint: &'a str,
    /// An earlier run's image: its copies may exist already, and are looked for first.
    pub reused: bool,
}

/// Before anything is made: no copy into the run's own region, and every copy region's
/// key usable there. `section` names the template's table in errors.
pub async fn check(clients: &Clients, plan: &Distribution, section: &str) -> Result<(), ModeError> {
    if plan.copy_to_regions.contains(&clients.region) {
        return Err(ModeError::Usage(format!(
            "{section}.copy_to_regions lists {}, the region this run builds in: the image is there already",
            clients.region
        )));
    }
    for (region, key) in &plan.kms_key_ids {
        kms::usable_for_ebs(
            &clients.in_region(region),
            &format!("{section}.kms_key_ids.{region}"),
            key,
        )
        .await?;
    }
    Ok(())
}

/// The run's image delivered as `plan` asks: copied, then deprecation, IMDSv2-only and
/// launch permissions set and read back on it and every copy. The copies, for the later
/// steps to mark finished and publish.
pub async fn deliver(
    source: Source<'_>,
    plan: &Distribution,
    ctx: &mut StepContext,
) -> Result<Vec<RegionImage>, StepError> {
    if plan.is_empty() {
        ctx.progress
            .note("nothing to copy or share in the template");
        return Ok(Vec::new());
    }
    let (clients, image_id) = (source.clients, source.image_id);
    let copies = copy(source, plan, ctx).await?;
    let mut images = vec![(clients, image_id)];
    images.extend(copies.iter().map(|c| (&c.clients, c.image_id.as_str())));
    settle(&images, plan).await?;
    Ok(copies)
}

/// Copies the image to every region of `plan` at once, then waits for all of them. Each
/// copy's undo (deregister it, delete its snapshots) is registered as soon as its id is
/// known, before any wait, so a copy that fails or an interrupt leaves none behind.
/// Kept whole: the start of every copy, the registration of its undo and the one wait for
/// all, with their order, are what makes a failure leave nothing.
async fn copy(
    source: Source<'_>,
    plan: &Distribution,
    ctx: &mut StepContext,
) -> Result<Vec<RegionImage>, StepError> {
    let mut started = JoinSet::new();
    for region in &plan.copy_to_regions {
        let clients = source.clients.in_region(region);
        let request = CopyRequest {
            source_region: source.clients.region.clone(),
            image_id: source.image_id.to_string(),
            name: source.name.to_string(),
            description: source.description.map(str::to_string),
            tags: source.tags.clone(),
            build_id: source.build_id.to_string(),
            fingerprint: source.fingerprint.to_string(),
            kms_key_id: plan.kms_key_ids.get(region).cloned(),
            look_first: source.reused,
        };
        let progress = ctx.progress.clone();
        started.spawn(async move {
            let copy = request.start(&clients, &progress).await;
            (clients, copy)
        });
    }
    let mut copies = Vec::new();
    let mut problems = Vec::new();
    // Every answer is taken in before any error returns: a copy made is undone with the rest.
    while let Some(joined) = started.join_next().await {
        let (clients, copy) = match joined {
            Ok(answer) => answer,
            Err(e) => {
                problems.push(format!("a copy's task ended: {e}"));
                continue;
            }
        };
        match copy {
            Ok((image_id, reused)) => {
                if !reused {
                    undo_with(
                        ctx,
                        &clients,
                        format!("{image_id} in {}", clients.region),
                        &image_id,
                        "deregister copy and delete its snapshots",
                        Keep::OnSuccess,
                        crate::aws::image::deregister_with_snapshots,
                    );
                }
                copies.push(RegionImage {
                    clients,
                    image_id,
                    snapshot_ids: Vec::new(),
                    reused,
                    ssm_version: None,
                });
            }
            Err(e) => problems.push(format!("to {}: {e}", clients.region)),
        }
    }
    if !problems.is_empty() {
        return Err(failed(format!(
            "copy {} failed {}",
            source.image_id,
            problems.join("; ")
        )));
    }
    // In the template's order, so the manifest reads as the template does.
    copies.sort_by_key(|c| {
        plan.copy_to_regions
            .iter()
            .position(|r| *r == c.clients.region)
    });

    let mut waits = JoinSet::new();
    for (i, copy) in copies.iter().enumerate() {
        let (clients, id) = (copy.clients.clone(), copy.image_id.clone());
        let (cancel, progress) = (ctx.cancel.clone(), ctx.progress.clone());
        waits.spawn(async move {
            let waited =
                crate::aws::image::wait(&clients, &id, WaitPolicy::LONG, &cancel, &progress).await;
            (i, waited)
        });
    }
    let mut first_error = None;
    while let Some(joined) = waits.join_next().await {
        let (i, result) = joined.map_err(|e| failed(format!("a copy's wait ended: {e}")))?;
        match result {
            Ok(snapshot_ids) => copies[i].snapshot_ids = snapshot_ids,
            Err(e) => {
                let region = &copies[i].clients.region;
                first_error.get_or_insert_with(|| match waited(e) {
                    StepError::Interrupted => StepError::Interrupted,
                    other => failed(format!("the copy in {region}: {other}")),
                });
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    for copy in &copies {
        ctx.progress.note(format!(
            "{} in {}{}",
            copy.image_id,
            copy.clients.region,
            if copy.reused {
                " (made by an earlier run)"
            } else {
                ""
            }
        ));
    }
    Ok(copies)
}

/// One region's copy, as a task owns it.
struct CopyRequest {
    source_region: String,
    image_id: String,
    name: String,
    description: Option<String>,
    tags: Vec<Tag>,
    build_id: String,
    fingerprint: String,
    kms_key_id: Option<String>,
    look_first: bool,
}

impl CopyRequest {
    /// The copy's id, and whether an earlier run had made it.
    async fn start(
        &self,
        clients: &Clients,
        progress: &crate::engine::Progress,
    ) -> Result<(String, bool), StepError> {
        if self.look_first {
            let found = ami::find_by_fingerprint(clients, &self.fingerprint)
                .await
                .map_err(failed)?;
            if let Some(earlier) = found {
                return Ok((earlier.id, true));
            }
        }
        let copy = image::Copy {
            source_region: &self.source_region,
            source_image_id: &self.image_id,
            name: &self.name,
            description: self.description.as_deref(),
            kms_key_id: self.kms_key_id.as_deref(),
            tags: &self.tags,
        };
        let id = image::copy(clients, copy, &self.build_id, progress)
            .await
            .map_err(waited)?;
        progress.note(format!("copying to {}: {id}", clients.region));
        Ok((id, false))
    }
}

/// Deprecation, IMDSv2-only and launch permissions on each image (the run's own and its
/// copies), then each read back: a setting EC2 did not keep fails the run.
async fn settle(images: &[(&Clients, &str)], plan: &Distribution) -> Result<(), StepError> {
    let deprecate_at = plan.deprecate_after.map(deprecation_time);
    for (clients, image_id) in images {
        apply(clients, image_id, plan, deprecate_at).await?;
    }
    for (clients, image_id) in images {
        verify(clients, image_id, plan, deprecate_at)
            .await
            .map_err(|problem| {
                failed(format!(
                    "{image_id} in {}: {problem}, though it was just set",
                    clients.region
                ))
            })?;
    }
    Ok(())
}

/// `after` from now, to the minute (EC2 rounds seconds to the nearest minute).
fn deprecation_time(after: Duration) -> aws_smithy_types::DateTime {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let at = (now + after.as_secs()) / 60 * 60;
    aws_smithy_types::DateTime::from_secs(at as i64)
}

async fn apply(
    clients: &Clients,
    image_id: &str,
    plan: &Distribution,
    deprecate_at: Option<aws_smithy_types::DateTime>,
) -> Result<(), StepError> {
    if let Some(at) = deprecate_at {
        image::set(clients, image_id, Setting::DeprecateAt(at))
            .await
            .map_err(failed)?;
    }
    if plan.imds_v2_only {
        image::set(clients, image_id, Setting::RequireImdsV2)
            .await
            .map_err(failed)?;
    }
    if !plan.share_with_accounts.is_empty() {
        let accounts = Setting::ShareWith(&plan.share_with_accounts);
        image::set(clients, image_id, accounts)
            .await
            .map_err(failed)?;
    }
    Ok(())
}

/// A distribution setting EC2 did not keep, found reading the image back.
#[derive(Debug, thiserror::Error)]
enum Unsettled {
    #[error(transparent)]
    Aws(AwsError),
    #[error("EC2 no longer knows it")]
    Gone,
    #[error("it is {0}")]
    State(String),
    #[error("it lacks amibake's tags")]
    Untagged,
    #[error("it does not require IMDSv2")]
    NotImdsV2,
    #[error("its deprecation time is {0}")]
    Deprecation(String),
    #[error("{0} may not launch it")]
    NotShared(String),
}

/// What EC2 holds for the image against what the run asked for; the first difference.
async fn verify(
    clients: &Clients,
    image_id: &str,
    plan: &Distribution,
    deprecate_at: Option<aws_smithy_types::DateTime>,
) -> Result<(), Unsettled> {
    let image = image::describe(clients, image_id)
        .await
        .map_err(Unsettled::Aws)?
        .ok_or(Unsettled::Gone)?;
    let state = image.state().map_or("unknown", |s| s.as_str());
    if state != "available" {
        return Err(Unsettled::State(state.to_string()));
    }
    let has_tag = |key: &str| image.tags().iter().any(|t| t.key() == Some(key));
    if !has_tag(TAG_BUILD_ID) || !has_tag(TAG_FINGERPRINT) {
        return Err(Unsettled::Untagged);
    }
    if plan.imds_v2_only && image.imds_support().map(|s| s.as_str()) != Some(IMDS_V2) {
        return Err(Unsettled::NotImdsV2);
    }
    if let Some(at) = deprecate_at {
        let held = image.deprecation_time().and_then(|t| {
            aws_smithy_types::DateTime::from_str(t, aws_smithy_types::date_time::Format::DateTime)
                .ok()
        });
        if held
            .map(|h| (h.secs() - at.secs()).abs() > 60)
            .unwrap_or(true)
        {
            return Err(Unsettled::Deprecation(
                image.deprecation_time().unwrap_or("not set").to_string(),
            ));
        }
    }
    if !plan.share_with_accounts.is_empty() {
        let granted = image::launch_permissions(clients, image_id)
            .await
            .map_err(Unsettled::Aws)?;
        let missing: Vec<&str> = plan
            .share_with_accounts
            .iter()
            .map(String::as_str)
            .filter(|a| !granted.contains(&Grantee::Account(a.to_string())))
            .collect();
        if !missing.is_empty() {
            return Err(Unsettled::NotShared(missing.join(", ")));
        }
    }
    Ok(())
}

/// The copies tagged finished, each in its region (a tag is a regional call).
pub async fn mark_copies_finished(copies: &[RegionImage]) -> Result<(), StepError> {
    for copy in copies.iter().filter(|c| !c.reused) {
        let mut resources = vec![copy.image_id.clone()];
        resources.extend(copy.snapshot_ids.iter().cloned());
        mark_finished(&copy.clients, resources).await?;
    }
    Ok(())
}

/// Each copy as the newest version of its own region's channel (the same parameter name).
pub async fn publish_copies(
    copies: &mut [RegionImage],
    channel: Option<&SsmPublish>,
    description: &str,
    ctx: &mut StepContext,
) -> Result<(), StepError> {
    if channel.is_none() {
        return Ok(());
    }
    for copy in copies {
        copy.ssm_version =
            publish(&copy.clients, channel, &copy.image_id, description, ctx).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deprecation_time_is_whole_minutes_from_now() {
        let at = deprecation_time(Duration::from_secs(90 * 24 * 3600));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert_eq!(at.secs() % 60, 0);
        assert!((at.secs() - (now + 90 * 24 * 3600)).abs() <= 60);
    }
}
