//! `amibake rollback PARAM [--to-version N | --steps K] [--label L]`: put an earlier
//! version's image back.

use tokio_util::sync::CancellationToken;

use super::channel::{self, ChannelError, Point};
use super::promote::Moved;
use crate::aws::ssm::{self, Version};
use crate::aws::AwsOptions;

/// Which earlier version to go back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// This version number.
    Version(i64),
    /// The K-th image before the current one, counting only versions that name an image
    /// other than the current (so a rollback after a rollback goes on back, past a version
    /// that the first one rewrote).
    Steps(usize),
}

/// Puts the target version's image back as the newest version (with a label: moves the
/// label back onto the target version), after checking that image can still be launched.
pub async fn rollback(
    aws: &AwsOptions,
    parameter: &str,
    target: Target,
    label: Option<&str>,
) -> Result<Moved, ChannelError> {
    let clients = channel::clients(aws).await?;
    let history = ssm::history(&clients, parameter).await?;
    let current = match label {
        Some(label) => ssm::labelled(parameter, &history, label)?,
        None => history.last().ok_or_else(|| ssm::SsmError::NoParameter {
            name: parameter.into(),
        })?,
    };
    let chosen = choose(parameter, label, &history, current, target)?;
    channel::deployable(&clients, &chosen.value, false).await?;
    let before = Point::of(current);
    let version = match label {
        Some(label) => {
            ssm::label(&clients, parameter, chosen.version, label).await?;
            chosen.version
        }
        None => {
            let description = format!(
                "rolled back by amibake from {before} to version {}",
                chosen.version
            );
            ssm::put_image(
                &clients,
                parameter,
                &chosen.value,
                &description,
                &CancellationToken::new(),
            )
            .await?
        }
    };
    Ok(Moved {
        parameter: parameter.into(),
        region: clients.region.clone(),
        label: label.map(str::to_string),
        before: Some(before),
        after: Point {
            version,
            ami_id: chosen.value.clone(),
        },
        changed: true,
    })
}

/// The version `target` names, older than `current` (of the channel, or of its `label`):
/// rollback only goes back, and `promote` moves forward.
fn choose<'a>(
    parameter: &str,
    label: Option<&str>,
    history: &'a [Version],
    current: &Version,
    target: Target,
) -> Result<&'a Version, ChannelError> {
    match target {
        Target::Version(n) => {
            let chosen = ssm::version(parameter, history, n)?;
            let what = match label {
                Some(label) => format!("label `{label}` of {parameter}"),
                None => parameter.to_string(),
            };
            if chosen.version == current.version {
                return Err(ChannelError::Usage(format!(
                    "{what} is at version {n} already; name an earlier version"
                )));
            }
            if chosen.version > current.version {
                let promote = match label {
                    Some(label) => format!(
                        "amibake promote {parameter} {} --label {label}",
                        chosen.value
                    ),
                    None => format!("amibake promote {parameter} {}", chosen.value),
                };
                return Err(ChannelError::Usage(format!(
                    "{what} is at version {}, and version {n} is newer: rollback only goes back; to move forward, `{promote}`",
                    current.version
                )));
            }
            Ok(chosen)
        }
        Target::Steps(k) => {
            // Each image once, at its newest version older than the current one.
            let mut earlier: Vec<&Version> = Vec::new();
            for v in history.iter().rev().filter(|v| v.version < current.version) {
                if v.value != current.value && !earlier.iter().any(|e| e.value == v.value) {
                    earlier.push(v);
                }
            }
            let count = earlier.len();
            earlier.get(k.wrapping_sub(1)).copied().ok_or_else(|| {
                ChannelError::Usage(format!(
                    "{parameter} has {count} earlier image(s) before version {}, not {k}",
                    current.version
                ))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(values: &[&str]) -> Vec<Version> {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| Version {
                version: i as i64 + 1,
                value: v.to_string(),
                labels: vec![],
                modified: None,
                description: None,
            })
            .collect()
    }

    #[test]
    fn steps_count_images_other_than_the_current_one() {
        // 1:a 2:b 3:c 4:b (a rollback from c to b)
        let h = history(&["ami-a", "ami-b", "ami-c", "ami-b"]);
        let current = h.last().unwrap();
        assert_eq!(
            choose("/c", None, &h, current, Target::Steps(1))
                .unwrap()
                .value,
            "ami-c"
        );
        assert_eq!(
            choose("/c", None, &h, current, Target::Steps(2))
                .unwrap()
                .value,
            "ami-a"
        );
        let err = choose("/c", None, &h, current, Target::Steps(3))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("has 2 earlier image(s) before version 4, not 3"),
            "{err}"
        );
    }

    #[test]
    fn a_version_must_be_another_one() {
        let h = history(&["ami-a", "ami-b"]);
        let current = h.last().unwrap();
        assert_eq!(
            choose("/c", None, &h, current, Target::Version(1))
                .unwrap()
                .value,
            "ami-a"
        );
        assert!(choose("/c", None, &h, current, Target::Version(2)).is_err());
        assert!(choose("/c", None, &h, current, Target::Version(9)).is_err());
    }

    #[test]
    fn a_label_is_never_rolled_forward() {
        // `prod` on version 2 of 1:a 2:b 3:c 4:d
        let h = history(&["ami-a", "ami-b", "ami-c", "ami-d"]);
        let prod = &h[1];
        let err = choose("/c", Some("prod"), &h, prod, Target::Version(4))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "label `prod` of /c is at version 2, and version 4 is newer: rollback only goes back; to move forward, `amibake promote /c ami-d --label prod`"
        );
        assert_eq!(
            choose("/c", Some("prod"), &h, prod, Target::Version(1))
                .unwrap()
                .value,
            "ami-a"
        );
    }
}
