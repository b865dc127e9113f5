//! SSM Parameter Store as a deployment channel: the one place both modes and the commands
//! that operate channels (`history`, `promote`, `rollback`) read and write parameters.
//!
//! A channel is a parameter of data type `aws:ec2:image` whose newest version (or a label)
//! names the AMI to deploy. Parameter Store validates such a value after PutParameter has
//! answered, and drops the version when the AMI is not available, so a put counts as
//! published only once the version reads back.

use std::time::{Duration, SystemTime};

use aws_sdk_ssm::types::ParameterType;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::wait::{wait_for, Poll, WaitError, WaitPolicy};
use super::{AwsError, Clients};

/// Parameter Store keeps this many versions of a parameter, dropping the oldest on a put,
/// and refuses the put when the oldest carries a label.
pub const VERSION_LIMIT: usize = 100;

/// GetParameterHistory's largest page.
const HISTORY_PAGE: i32 = 50;

/// The data type that makes Parameter Store check the value is an available AMI.
const IMAGE_DATA_TYPE: &str = "aws:ec2:image";

/// How long a put version may stay unreadable while Parameter Store validates its AMI.
const VALIDATION: WaitPolicy = WaitPolicy {
    first_poll: Duration::from_millis(200),
    max_interval: Duration::from_secs(2),
    total: Duration::from_secs(30),
};

#[derive(Debug, thiserror::Error)]
pub enum SsmError {
    #[error(transparent)]
    Aws(#[from] AwsError),
    #[error("there is no SSM parameter {name} in this region")]
    NoParameter { name: String },
    #[error("{name} has no version {version} (its versions run from {oldest} to {newest})")]
    NoVersion {
        name: String,
        version: i64,
        oldest: i64,
        newest: i64,
    },
    #[error("{name} has no version labelled `{label}`")]
    NoLabel { name: String, label: String },
    #[error(
        "{name} holds the {VERSION_LIMIT} versions Parameter Store keeps, and its oldest, version \
         {oldest}, carries the label{} {}, so Parameter Store would refuse the new version \
         (ParameterMaxVersionLimitExceeded); move the label to a newer version (`amibake promote \
         {name} AMI --label LABEL`) or remove it (`aws ssm unlabel-parameter-version --name {name} \
         --parameter-version {oldest} --labels LABEL`)",
        if labels.len() == 1 { "" } else { "s" },
        labels.join(", ")
    )]
    VersionLimit {
        name: String,
        oldest: i64,
        labels: Vec<String>,
    },
    #[error(
        "Parameter Store did not keep version {version} of {name} = {image}: it validates an \
         {IMAGE_DATA_TYPE} value after the put and drops it when the AMI is not available in \
         this region and account"
    )]
    NotAccepted {
        name: String,
        version: i64,
        image: String,
    },
    #[error("interrupted while Parameter Store validated version {version} of {name}")]
    Interrupted { name: String, version: i64 },
    /// The version reads back naming another AMI: someone else wrote it meanwhile.
    #[error("{0}")]
    Wait(String),
}

/// One version of a parameter, as `history` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Version {
    pub version: i64,
    pub value: String,
    pub labels: Vec<String>,
    /// Seconds since the epoch.
    pub modified: Option<i64>,
    pub description: Option<String>,
}

/// A parameter's value: `name`, `name:VERSION` or `name:LABEL`; `None` when there is no
/// such parameter, version or label.
pub async fn value(clients: &Clients, name: &str) -> Result<Option<String>, AwsError> {
    match clients.ssm.get_parameter().name(name).send().await {
        Ok(out) => Ok(out.parameter().and_then(|p| p.value()).map(str::to_string)),
        Err(e)
            if e.as_service_error().is_some_and(|s| {
                s.is_parameter_not_found() || s.is_parameter_version_not_found()
            }) =>
        {
            Ok(None)
        }
        Err(e) => Err(AwsError::new(format!("read SSM parameter {name}"), e)),
    }
}

/// Every version Parameter Store keeps of `name`, oldest first, every page read.
pub async fn history(clients: &Clients, name: &str) -> Result<Vec<Version>, SsmError> {
    let mut versions = Vec::new();
    let mut pages = clients
        .ssm
        .get_parameter_history()
        .name(name)
        .max_results(HISTORY_PAGE)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = match page {
            Ok(page) => page,
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_parameter_not_found()) =>
            {
                return Err(SsmError::NoParameter { name: name.into() })
            }
            Err(e) => return Err(AwsError::new(format!("read the history of {name}"), e).into()),
        };
        versions.extend(page.parameters().iter().map(|p| Version {
            version: p.version(),
            value: p.value().unwrap_or_default().to_string(),
            labels: p.labels().to_vec(),
            modified: p.last_modified_date().map(|d| d.secs()),
            description: p.description().map(str::to_string),
        }));
    }
    versions.sort_by_key(|v| v.version);
    Ok(versions)
}

/// Refuses, before anything is written, a put that Parameter Store would refuse: the
/// history is full and the version it would drop carries a label.
pub fn check_room(name: &str, history: &[Version]) -> Result<(), SsmError> {
    match history.first() {
        Some(oldest) if history.len() >= VERSION_LIMIT && !oldest.labels.is_empty() => {
            Err(SsmError::VersionLimit {
                name: name.into(),
                oldest: oldest.version,
                labels: oldest.labels.clone(),
            })
        }
        _ => Ok(()),
    }
}

/// The version of `name` that `label` is on.
pub fn labelled<'a>(
    name: &str,
    history: &'a [Version],
    label: &str,
) -> Result<&'a Version, SsmError> {
    history
        .iter()
        .find(|v| v.labels.iter().any(|l| l == label))
        .ok_or_else(|| SsmError::NoLabel {
            name: name.into(),
            label: label.into(),
        })
}

/// Version `version` of `name`.
pub fn version<'a>(
    name: &str,
    history: &'a [Version],
    version: i64,
) -> Result<&'a Version, SsmError> {
    history
        .iter()
        .find(|v| v.version == version)
        .ok_or_else(|| SsmError::NoVersion {
            name: name.into(),
            version,
            oldest: history.first().map_or(0, |v| v.version),
            newest: history.last().map_or(0, |v| v.version),
        })
}

/// Writes `image` as the newest version of `name` and returns the version once Parameter
/// Store has validated it (it reads back). Refuses first where the history is full and
/// its oldest version labelled.
pub async fn put_image(
    clients: &Clients,
    name: &str,
    image: &str,
    description: &str,
    cancel: &CancellationToken,
) -> Result<i64, SsmError> {
    let newest_before = match history(clients, name).await {
        Ok(versions) => {
            check_room(name, &versions)?;
            versions.last().map_or(0, |v| v.version)
        }
        Err(SsmError::NoParameter { .. }) => 0,
        Err(e) => return Err(e),
    };
    // Retried here rather than by the SDK: a put carried out whose answer was lost must
    // not be put again, which would make a second version of the same image.
    let mut attempt = 0;
    let version = loop {
        attempt += 1;
        let sent = clients
            .ssm
            .put_parameter()
            .name(name)
            .value(image)
            .r#type(ParameterType::String)
            .data_type(IMAGE_DATA_TYPE)
            .overwrite(true)
            .description(description)
            .customize()
            .config_override(
                aws_sdk_ssm::config::Config::builder()
                    .retry_config(aws_config::retry::RetryConfig::disabled()),
            )
            .send()
            .await;
        match sent {
            Ok(out) => break out.version(),
            Err(e) if attempt < super::MAX_ATTEMPTS && transient(&e) => {
                // A new channel the lost attempt did not make yet has no history at all.
                let versions = match history(clients, name).await {
                    Err(SsmError::NoParameter { .. }) => Vec::new(),
                    other => other?,
                };
                let put = versions.into_iter().rev().find(|v| {
                    v.version > newest_before
                        && v.value == image
                        && v.description.as_deref() == Some(description)
                });
                if let Some(put) = put {
                    break put.version;
                }
                tokio::time::sleep(PUT_BACKOFF * 2u32.pow(attempt.min(5))).await;
            }
            Err(e) => return Err(AwsError::new(format!("publish {image} to {name}"), e).into()),
        }
    };
    read_back(clients, name, version, image, cancel).await?;
    Ok(version)
}

/// The first pause before a put is tried again, doubled each time.
const PUT_BACKOFF: Duration = Duration::from_millis(100);

/// Whether a call's failure may pass if it is tried again: no answer, a throttle, or a
/// fault on AWS's side.
fn transient<E: aws_sdk_ssm::error::ProvideErrorMetadata, R>(
    e: &aws_sdk_ssm::error::SdkError<E, R>,
) -> bool {
    use aws_sdk_ssm::error::SdkError;
    match e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or_default();
            code.contains("Throttl")
                || code == "TooManyUpdates"
                || code == "InternalServerError"
                || code == "InternalError"
                || code == "ServiceUnavailable"
        }
        _ => false,
    }
}

/// Waits until version `version` of `name` reads `image`: Parameter Store's validation of
/// an `aws:ec2:image` value is done after the put answers.
async fn read_back(
    clients: &Clients,
    name: &str,
    version: i64,
    image: &str,
    cancel: &CancellationToken,
) -> Result<(), SsmError> {
    let versioned = format!("{name}:{version}");
    let waited = wait_for(
        "the validation of",
        &versioned,
        VALIDATION,
        cancel,
        |_, _| {},
        || {
            let versioned = versioned.clone();
            async move {
                Ok::<_, AwsError>(match value(clients, &versioned).await? {
                    Some(v) if v == image => Poll::Ready(()),
                    Some(other) => Poll::Failed {
                        state: format!("naming {other}"),
                    },
                    None => Poll::Pending {
                        state: "not readable yet".into(),
                        percent: None,
                    },
                })
            }
        },
    )
    .await;
    match waited {
        Ok(()) => Ok(()),
        Err(WaitError::Poll(e)) => Err(e.into()),
        Err(WaitError::TimedOut { .. }) => Err(SsmError::NotAccepted {
            name: name.into(),
            version,
            image: image.into(),
        }),
        Err(WaitError::Interrupted { .. }) => Err(SsmError::Interrupted {
            name: name.into(),
            version,
        }),
        Err(other) => Err(SsmError::Wait(other.to_string())),
    }
}

/// Puts `label` on version `version` of `name` (moving it off whichever version had it).
pub async fn label(
    clients: &Clients,
    name: &str,
    version: i64,
    label: &str,
) -> Result<(), AwsError> {
    clients
        .ssm
        .label_parameter_version()
        .name(name)
        .parameter_version(version)
        .labels(label)
        .send()
        .await
        .map_err(|e| AwsError::new(format!("label {name} version {version} `{label}`"), e))?;
    Ok(())
}

/// Puts a published parameter back as it was: its previous value as a new version (with the
/// label moved back to it), or no parameter when there was none. So a failed build never
/// leaves the parameter naming an image it then removed.
pub async fn restore(
    clients: Clients,
    name: String,
    previous: Option<String>,
    label: Option<String>,
) -> Result<(), AwsError> {
    let Some(value) = previous else {
        return match clients.ssm.delete_parameter().name(&name).send().await {
            Err(e)
                if !e
                    .as_service_error()
                    .is_some_and(|s| s.is_parameter_not_found()) =>
            {
                Err(AwsError::new(format!("delete SSM parameter {name}"), e))
            }
            _ => Ok(()),
        };
    };
    let out = clients
        .ssm
        .put_parameter()
        .name(&name)
        .value(&value)
        .r#type(ParameterType::String)
        .data_type(IMAGE_DATA_TYPE)
        .overwrite(true)
        .send()
        .await
        .map_err(|e| AwsError::new(format!("put {name} back to {value}"), e))?;
    if let Some(label) = label {
        self::label(&clients, &name, out.version(), &label).await?;
    }
    Ok(())
}

/// When a version was written, for people: seconds since the epoch as UTC.
pub fn when(modified: Option<i64>) -> String {
    modified
        .and_then(|s| u64::try_from(s).ok())
        .map(|s| {
            humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(s))
                .to_string()
        })
        .unwrap_or_else(|| "-".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn versions(n: i64, labelled_oldest: bool) -> Vec<Version> {
        (1..=n)
            .map(|v| Version {
                version: v,
                value: format!("ami-{v:08x}"),
                labels: if v == 1 && labelled_oldest {
                    vec!["prod".into()]
                } else {
                    vec![]
                },
                modified: None,
                description: None,
            })
            .collect()
    }

    #[test]
    fn a_full_history_refuses_only_when_its_oldest_is_labelled() {
        assert!(check_room("/c", &versions(99, true)).is_ok());
        assert!(check_room("/c", &versions(100, false)).is_ok());
        let err = check_room("/c", &versions(100, true))
            .unwrap_err()
            .to_string();
        assert!(err.contains("version 1, carries the label prod"), "{err}");
        assert!(err.contains("ParameterMaxVersionLimitExceeded"), "{err}");
        assert!(
            err.contains("unlabel-parameter-version --name /c --parameter-version 1"),
            "{err}"
        );
    }

    #[test]
    fn versions_and_labels_are_found_or_named() {
        let h = versions(3, true);
        assert_eq!(version("/c", &h, 2).unwrap().value, "ami-00000002");
        let err = version("/c", &h, 7).unwrap_err().to_string();
        assert!(
            err.contains("no version 7 (its versions run from 1 to 3)"),
            "{err}"
        );
        assert_eq!(labelled("/c", &h, "prod").unwrap().version, 1);
        assert!(labelled("/c", &h, "canary").is_err());
    }
}
