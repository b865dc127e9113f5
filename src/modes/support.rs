//! Small pieces every step of both modes uses: error shapes, values from earlier steps,
//! tags, and registering an AWS removal as an undo.

use std::future::Future;

use aws_sdk_ec2::types::Tag;

use crate::aws::resources::ResourceError;
use crate::aws::wait::WaitError;
use crate::aws::{ssm, Clients};
use crate::communicator::Communicator;
use crate::engine::{BoxError, Keep, StepContext, StepError, UndoId};
use crate::provision::{self, Entries, ProvisionError};
use crate::template::{Provisioner, SsmPublish};

pub fn failed(e: impl Into<BoxError>) -> StepError {
    StepError::failed(e)
}

/// A wait's error as a step's: an interrupted wait is the run's interrupt.
pub fn waited(e: ResourceError) -> StepError {
    if matches!(e, WaitError::Interrupted { .. }) {
        StepError::Interrupted
    } else {
        failed(e)
    }
}

/// A value an earlier step should have set: its absence is a bug, reported as one.
pub fn earlier<T: Clone>(value: &Option<T>, what: &str) -> Result<T, StepError> {
    value
        .clone()
        .ok_or_else(|| failed(format!("internal error: no {what} from an earlier step")))
}

pub fn tags(pairs: &[(&str, &str)]) -> Vec<Tag> {
    pairs
        .iter()
        .map(|(k, v)| Tag::builder().key(*k).value(*v).build())
        .collect()
}

/// Registers an undo that removes `id` with `remove` (one of `aws::resources`' removers).
pub fn undo_with<F, Fut, E>(
    ctx: &mut StepContext,
    clients: &Clients,
    resource: String,
    id: &str,
    action: &str,
    keep: Keep,
    remove: F,
) -> UndoId
where
    F: Fn(Clients, String) -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError>,
{
    let (clients, id) = (clients.clone(), id.to_string());
    ctx.undo.push(resource, action, keep, move || {
        let removal = remove(clients.clone(), id.clone());
        async move { removal.await.map_err(Into::into) }
    })
}

/// Runs an undo entry now, as part of a step (a detach before the snapshot, an unmount),
/// so the cleanup does not run it again; a failure is the step's.
pub async fn undo_now(ctx: &mut StepContext, id: UndoId) -> Result<(), StepError> {
    ctx.undo
        .release(id)
        .await
        .map_err(|left| failed(left.to_string()))
}

/// Runs provisioners or tests through `comm` as a step does: an interrupt is the run's
/// interrupt.
pub async fn provision(
    comm: &dyn Communicator,
    kind: Entries,
    provisioners: &[Provisioner],
    ctx: &mut StepContext,
) -> Result<(), StepError> {
    match provision::run_all(comm, kind, provisioners, &ctx.progress, &ctx.cancel).await {
        Ok(()) => Ok(()),
        Err(ProvisionError::Interrupted { .. }) => Err(StepError::Interrupted),
        Err(e) => Err(failed(e)),
    }
}

/// A build's publication to its channel, the same for both modes: the image as a new
/// version (read back once Parameter Store has validated it), then the label onto it. Undone
/// on failure by putting the parameter back as it was. `None` when the template has no
/// channel.
pub async fn publish(
    clients: &Clients,
    channel: Option<&SsmPublish>,
    image_id: &str,
    description: &str,
    ctx: &mut StepContext,
) -> Result<Option<i64>, StepError> {
    let Some(channel) = channel else {
        ctx.progress
            .note("no `publish_ssm` in the template: nothing to publish");
        return Ok(None);
    };
    let parameter = &channel.parameter;
    let previous = ssm::value(clients, parameter).await.map_err(failed)?;
    // A rerun that found its image (and copies) leaves a channel naming it as it is.
    if previous.as_deref() == Some(image_id)
        && channel_names(clients, Some(channel), image_id).await
    {
        ctx.progress
            .note(format!("{parameter} names {image_id} already"));
        return Ok(None);
    }
    let put = ssm::put_image(clients, parameter, image_id, description, &ctx.cancel).await;
    // A put refused up front or dropped by validation changed nothing; anything else may
    // have written a version (an AWS error can hide a put carried out, an interrupt can come
    // while it is validated), so that is put back too.
    let wrote_nothing = matches!(
        put,
        Err(ssm::SsmError::VersionLimit { .. } | ssm::SsmError::NotAccepted { .. })
    );
    if !wrote_nothing {
        let (clients, name, label) = (clients.clone(), parameter.clone(), channel.label.clone());
        let what = match &put {
            Ok(version) => format!("{parameter} version {version}"),
            Err(_) => parameter.clone(),
        };
        ctx.undo
            .push(what, "put the parameter back", Keep::OnSuccess, move || {
                let restore = ssm::restore(
                    clients.clone(),
                    name.clone(),
                    previous.clone(),
                    label.clone(),
                );
                async move { restore.await.map_err(Into::into) }
            });
    }
    let version = put.map_err(|e| match e {
        ssm::SsmError::Interrupted { .. } => StepError::Interrupted,
        other => failed(other),
    })?;
    if let Some(label) = &channel.label {
        ssm::label(clients, parameter, version, label)
            .await
            .map_err(failed)?;
    }
    ctx.progress
        .note(format!("{parameter} version {version} is {image_id}"));
    Ok(Some(version))
}

/// Marks the run's image and snapshots finished (`TAG_STATE`): the last step of a build,
/// after which nothing of the run can fail.
pub async fn mark_finished(clients: &Clients, resources: Vec<String>) -> Result<(), StepError> {
    let finished = (crate::artifact::TAG_STATE, crate::artifact::STATE_FINISHED);
    crate::aws::image::tag(clients, resources, finished)
        .await
        .map_err(failed)
}

/// Whether the template's channel already names `image`: its newest version, and its
/// label where it has one. True when there is no channel; a lookup that fails counts as
/// not named, so the publish step runs and reports it.
pub async fn channel_names(clients: &Clients, publish: Option<&SsmPublish>, image: &str) -> bool {
    let Some(publish) = publish else {
        return true;
    };
    let mut names = vec![publish.parameter.clone()];
    if let Some(label) = &publish.label {
        names.push(format!("{}:{label}", publish.parameter));
    }
    for name in names {
        // A label that names no version yet is a channel to publish to, not an error.
        let value = crate::aws::ssm::value(clients, &name).await;
        if !matches!(value, Ok(Some(v)) if v == image) {
            return false;
        }
    }
    true
}
