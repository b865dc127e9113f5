//! What every kind of resource shares (`volume`, `snapshot`, `image`, `instance`,
//! `key_pair`, `security_group`): waiting for its state is a thin poll over the one wait
//! helper, and removing it again is a call retried until EC2 knows the resource.
//!
//! EC2 is eventually consistent: right after a create, a Describe or a Delete naming the new
//! id may answer NotFound. Both are read as "not visible yet" and retried, within
//! `VISIBILITY_BOUND`, never as "already gone": a Ctrl-C just after a create must not report
//! a clean exit while the resource lives on. What says a resource is truly gone (an image
//! already deregistered, a volume not attached) counts as done, so an undo can run twice.

use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
use tokio_util::sync::CancellationToken;

use super::wait::{wait_for, Poll, WaitError, WaitPolicy};
use super::{filter, AwsError, Clients};
use crate::engine::Progress;

pub type ResourceError = WaitError<AwsError>;

/// The AWS error code of a failed call, if the service answered with one.
pub fn code<E: ProvideErrorMetadata>(
    err: &aws_sdk_ec2::error::SdkError<E, aws_sdk_ec2::config::http::HttpResponse>,
) -> Option<&str> {
    err.as_service_error().and_then(|e| e.code())
}

/// A describe's answer, or None when EC2 does not know `id` (yet).
pub(super) fn visible<T, E>(
    result: Result<T, SdkError<E, HttpResponse>>,
    not_found: &str,
    id: &str,
) -> Result<Option<T>, AwsError>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match result {
        Ok(out) => Ok(Some(out)),
        Err(e) if code(&e) == Some(not_found) => Ok(None),
        Err(e) => Err(AwsError::new(format!("describe {id}"), e)),
    }
}

/// Runs a removal `call` until EC2 knows the resource: its `not_found` code is read as "not
/// visible yet" and retried through the one wait helper, within `VISIBILITY_BOUND`; the
/// codes in `done` say there is nothing left to do.
pub(super) async fn remove_once_visible<T, E, F, Fut>(
    what: &str,
    id: &str,
    action: String,
    not_found: &str,
    done: &[&str],
    mut call: F,
) -> Result<(), ResourceError>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, SdkError<E, HttpResponse>>>,
{
    let mut attempt = || {
        let call = call();
        let action = action.clone();
        async move {
            match call.await {
                Ok(_) => Ok(Poll::Ready(())),
                Err(e) if code(&e) == Some(not_found) => Ok(Poll::NotYetVisible),
                Err(e) if code(&e).is_some_and(|c| done.contains(&c)) => Ok(Poll::Ready(())),
                Err(e) => Err(AwsError::new(action, e)),
            }
        }
    };
    // The first attempt at once; only a resource not yet visible waits.
    match attempt().await.map_err(WaitError::Poll)? {
        Poll::NotYetVisible => {}
        _ => return Ok(()),
    }
    // A cleanup runs on after Ctrl-C: its own token, never cancelled.
    wait_for(
        what,
        id,
        WaitPolicy::SHORT,
        &CancellationToken::new(),
        |_, _| {},
        attempt,
    )
    .await
}

/// The build id a resource is tagged with.
pub fn build_id_of(tags: &[Tag]) -> Option<String> {
    tags.iter()
        .find(|t| t.key() == Some(crate::artifact::TAG_BUILD_ID))
        .and_then(|t| t.value())
        .map(str::to_string)
}

/// The filter for resources that carry a build id: only amibake runs make them.
pub fn of_runs() -> aws_sdk_ec2::types::Filter {
    filter("tag-key", crate::artifact::TAG_BUILD_ID)
}

/// (build id, id) of each listed resource that carries a build id: what gc goes through.
pub fn by_build_id<'a, T: 'a>(
    listed: impl IntoIterator<Item = &'a T>,
    tags: impl Fn(&'a T) -> &'a [Tag],
    id: impl Fn(&'a T) -> Option<&'a str>,
) -> Vec<(String, String)> {
    listed
        .into_iter()
        .filter_map(|r| Some((build_id_of(tags(r))?, id(r)?.to_string())))
        .collect()
}

/// Tags for what a create call makes, given in the call itself, so that even a run killed
/// right after can be found.
pub fn tagged(kind: ResourceType, tags: &[Tag]) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(kind)
        .set_tags(Some(tags.to_vec()))
        .build()
}

/// The id a create call answered with; or, when the SDK's retry of a create whose answer
/// was lost met the first attempt's resource under its unique name (`duplicate` is EC2's
/// code for that), that resource, found by this build's tag. `action` names the call in
/// errors.
pub async fn created_or_found<O, E>(
    answer: Result<O, SdkError<E, HttpResponse>>,
    id_of: impl FnOnce(&O) -> Option<&str>,
    action: &str,
    (duplicate, kind, name): (&str, Unique, &str),
    (clients, build_id): (&Clients, &str),
    progress: &Progress,
) -> Result<String, ResourceError>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match answer {
        Ok(out) => id_of(&out).map(str::to_string).ok_or_else(|| {
            WaitError::Poll(AwsError::answer(
                action.to_string(),
                "the answer holds no id",
            ))
        }),
        Err(e) if code(&e) == Some(duplicate) => {
            let found = made_by_this_build(clients, kind, name, build_id)
                .await
                .map_err(|_| WaitError::Poll(AwsError::new(action, e)))?;
            progress.note(format!("{found}: made by an attempt whose answer was lost"));
            Ok(found)
        }
        Err(e) => Err(WaitError::Poll(AwsError::new(action, e))),
    }
}

/// What this build made under a name EC2 keeps unique (an AMI, a security group), found
/// after a create whose answer was lost: the SDK's retry of it was refused as a duplicate.
/// Filters may lag behind a create too, so it is looked for within `VISIBILITY_BOUND`.
pub async fn made_by_this_build(
    clients: &Clients,
    kind: Unique,
    name: &str,
    build_id: &str,
) -> Result<String, ResourceError> {
    let ec2 = clients.ec2.clone();
    let by_build = filter(format!("tag:{}", crate::artifact::TAG_BUILD_ID), build_id);
    wait_for(
        kind.what(),
        name,
        WaitPolicy::SHORT,
        &CancellationToken::new(),
        |_, _| {},
        || {
            let (ec2, by_build) = (ec2.clone(), by_build.clone());
            async move {
                let found: Option<String> = match kind {
                    Unique::Image => ec2
                        .describe_images()
                        .owners("self")
                        .filters(filter("name", name))
                        .filters(by_build)
                        .send()
                        .await
                        .map_err(|e| AwsError::new(format!("look for image {name}"), e))?
                        .images()
                        .first()
                        .and_then(|i| i.image_id().map(str::to_string)),
                    Unique::SecurityGroup => ec2
                        .describe_security_groups()
                        .filters(filter("group-name", name))
                        .filters(by_build)
                        .send()
                        .await
                        .map_err(|e| AwsError::new(format!("look for security group {name}"), e))?
                        .security_groups()
                        .first()
                        .and_then(|g| g.group_id().map(str::to_string)),
                };
                Ok(found.map_or(Poll::NotYetVisible, Poll::Ready))
            }
        },
    )
    .await
}

/// Resources whose names EC2 keeps unique.
#[derive(Debug, Clone, Copy)]
pub enum Unique {
    Image,
    SecurityGroup,
}

impl Unique {
    fn what(self) -> &'static str {
        match self {
            Unique::Image => "image",
            Unique::SecurityGroup => "security group",
        }
    }
}
