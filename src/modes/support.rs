//! Small pieces every step of both modes uses: error shapes, values from earlier steps,
//! tags, and registering an AWS removal as an undo.

use std::future::Future;

use aws_sdk_ec2::types::Tag;

use crate::aws::resources::ResourceError;
use crate::aws::wait::WaitError;
use crate::aws::Clients;
use crate::communicator::Communicator;
use crate::engine::{BoxError, Keep, StepContext, StepError, UndoId};
use crate::provision::{self, ProvisionError};
use crate::template::Provisioner;

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

/// Runs the provisioners through `comm` as a step does: an interrupt is the run's interrupt.
pub async fn provision(
    comm: &dyn Communicator,
    provisioners: &[Provisioner],
    ctx: &mut StepContext,
) -> Result<(), StepError> {
    match provision::run_all(comm, provisioners, &ctx.progress, &ctx.cancel).await {
        Ok(()) => Ok(()),
        Err(ProvisionError::Interrupted { .. }) => Err(StepError::Interrupted),
        Err(e) => Err(failed(e)),
    }
}
