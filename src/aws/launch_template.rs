//! Launch templates, read: the image each version of each template names.

use super::{AwsError, Clients};

/// One version of a launch template and the image it names (an id, or `resolve:ssm:…`).
pub struct VersionImage {
    pub template: String,
    pub version: i64,
    pub default: bool,
    pub image: String,
}

/// The image every version of every launch template names: an Auto Scaling group or a
/// fleet may launch any version.
pub async fn version_images(clients: &Clients) -> Result<Vec<VersionImage>, AwsError> {
    let mut templates = Vec::new();
    let mut pages = clients
        .ec2
        .describe_launch_templates()
        .max_results(200)
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| AwsError::new("list the launch templates", e))?;
        templates.extend(page.launch_templates().iter().filter_map(|t| {
            Some((
                t.launch_template_id()?.to_string(),
                t.launch_template_name().unwrap_or_default().to_string(),
            ))
        }));
    }
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
                    if super::resources::code(&e)
                        .is_some_and(|c| c.starts_with("InvalidLaunchTemplate")) =>
                {
                    break
                }
                Err(e) => {
                    let what = format!("read the versions of launch template {name}");
                    return Err(AwsError::new(what, e));
                }
            };
            for v in page.launch_template_versions() {
                let Some(image) = v.launch_template_data().and_then(|d| d.image_id()) else {
                    continue;
                };
                found.push(VersionImage {
                    template: name.clone(),
                    version: v.version_number().unwrap_or_default(),
                    default: v.default_version() == Some(true),
                    image: image.to_string(),
                });
            }
        }
    }
    Ok(found)
}
