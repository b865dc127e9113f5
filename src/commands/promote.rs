//! `amibake promote PARAM AMI [--label L]`: point a channel at an image amibake made.

use tokio_util::sync::CancellationToken;

use super::channel::{self, ChannelError, Point};
use crate::aws::{ami, ssm, AwsOptions};

/// What a channel named before a change and names after it.
#[derive(Debug, serde::Serialize, schemars::JsonSchema)]
pub struct Moved {
    pub parameter: String,
    pub region: String,
    pub label: Option<String>,
    /// The newest version (or the labelled one) before; none for a new channel or label.
    pub before: Option<Point>,
    pub after: Point,
    /// False when the channel already named the image there, and nothing was written.
    pub changed: bool,
}

impl Moved {
    pub fn lines(&self) -> Vec<String> {
        let what = match &self.label {
            Some(label) => format!("{} label `{label}`", self.parameter),
            None => self.parameter.clone(),
        };
        let before = self
            .before
            .as_ref()
            .map_or("nothing".to_string(), |p| p.to_string());
        if self.changed {
            vec![format!("{what}: was {before}, now {}", self.after)]
        } else {
            vec![format!("{what}: already {}; nothing changed", self.after)]
        }
    }
}

/// Checks `image` is available in the region and made by amibake, then makes it what the
/// channel names: with a label, the label moves onto the newest version already holding
/// the image (or onto a new version of it); without, the image becomes the newest version.
pub async fn promote(
    aws: &AwsOptions,
    parameter: &str,
    image: &str,
    label: Option<&str>,
) -> Result<Moved, ChannelError> {
    let clients = channel::clients(aws).await?;
    channel::deployable(&clients, image, true).await?;
    let history = match ssm::history(&clients, parameter).await {
        Ok(history) => history,
        Err(ssm::SsmError::NoParameter { .. }) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let current = match label {
        Some(label) => history.iter().find(|v| v.labels.iter().any(|l| l == label)),
        None => history.last(),
    };
    let before = current.map(Point::of);
    let moved = |after: Point, changed| Moved {
        parameter: parameter.into(),
        region: clients.region.clone(),
        label: label.map(str::to_string),
        before: before.clone(),
        after,
        changed,
    };
    if let Some(current) = current.filter(|c| c.value == image) {
        return Ok(moved(Point::of(current), false));
    }
    // Before the channel moves: an image a channel names always says so, for `prune`.
    ami::add_channel_tag(&clients, image, parameter).await?;
    let holding = history.iter().rev().find(|v| v.value == image);
    let version = match (label, holding) {
        (Some(_), Some(existing)) => existing.version,
        _ => {
            let description = format!("promoted by amibake from {}", before_text(&before));
            ssm::put_image(
                &clients,
                parameter,
                image,
                &description,
                &CancellationToken::new(),
            )
            .await?
        }
    };
    if let Some(label) = label {
        ssm::label(&clients, parameter, version, label).await?;
    }
    Ok(moved(
        Point {
            version,
            ami_id: image.into(),
        },
        true,
    ))
}

fn before_text(before: &Option<Point>) -> String {
    before
        .as_ref()
        .map_or("a new channel".to_string(), |p| p.to_string())
}
