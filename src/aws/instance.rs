//! Temporary instances: waited for until running, stopped or gone, and terminated.

use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, HttpTokensState, IamInstanceProfileSpecification,
    InstanceMetadataEndpointState, InstanceMetadataOptionsRequest,
    InstanceNetworkInterfaceSpecification, InstanceType, ResourceType, Tag, VolumeType,
};
use tokio_util::sync::CancellationToken;

use super::resources::tagged;

use super::resources::{remove_once_visible, visible, ResourceError};
use super::wait::{wait_for, Poll, WaitPolicy};
use super::{AwsError, Clients};
use crate::engine::Progress;

/// Waits until an instance is `wanted` (`running`, `stopped`, `terminated`); returns it as
/// last described, for its addresses.
pub async fn wait(
    clients: &Clients,
    id: &str,
    wanted: &str,
    cancel: &CancellationToken,
    progress: &Progress,
) -> Result<aws_sdk_ec2::types::Instance, ResourceError> {
    let ec2 = clients.ec2.clone();
    wait_for(
        "instance",
        id,
        WaitPolicy::SHORT,
        cancel,
        |state, _| progress.note(format!("{id}: {state}")),
        || {
            let (ec2, id) = (ec2.clone(), id.to_string());
            async move {
                let described = ec2.describe_instances().instance_ids(&id).send().await;
                let Some(out) = visible(described, "InvalidInstanceID.NotFound", &id)? else {
                    return Ok(Poll::NotYetVisible);
                };
                let instance = out
                    .reservations()
                    .iter()
                    .flat_map(|r| r.instances())
                    .next()
                    .cloned();
                let state = instance
                    .as_ref()
                    .and_then(|i| i.state())
                    .and_then(|s| s.name())
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_else(|| "not yet visible".into());
                Ok(match (state.as_str(), instance) {
                    (s, Some(instance)) if s == wanted => Poll::Ready(instance),
                    // Gone while we wait for it to run or stop: it will not come back.
                    ("shutting-down" | "terminated", _) if wanted != "terminated" => {
                        Poll::Failed { state }
                    }
                    _ => Poll::Pending {
                        state,
                        percent: None,
                    },
                })
            }
        },
    )
    .await
}

/// Terminates an instance and waits until it is gone, so the security group it used can be
/// deleted after it. Waits with its own token, as a cleanup must.
pub async fn terminate(
    clients: Clients,
    id: String,
    progress: Progress,
) -> Result<(), ResourceError> {
    remove_once_visible(
        "instance",
        &id,
        format!("terminate {id}"),
        "InvalidInstanceID.NotFound",
        &[],
        || clients.ec2.terminate_instances().instance_ids(&id).send(),
    )
    .await?;
    // EC2 took the termination, so it knew the instance: NotFound from here on is an
    // instance terminated long enough to drop out of DescribeInstances.
    let ec2 = clients.ec2.clone();
    wait_for(
        "instance",
        &id,
        WaitPolicy::SHORT,
        &CancellationToken::new(),
        |state, _| progress.note(format!("{id}: {state}")),
        || {
            let (ec2, id) = (ec2.clone(), id.clone());
            async move {
                let described = ec2.describe_instances().instance_ids(&id).send().await;
                let Some(out) = visible(described, "InvalidInstanceID.NotFound", &id)? else {
                    return Ok(Poll::Ready(()));
                };
                let state = out
                    .reservations()
                    .iter()
                    .flat_map(|r| r.instances())
                    .find_map(|i| i.state().and_then(|s| s.name()))
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_else(|| "terminated".into());
                Ok(match state.as_str() {
                    "terminated" => Poll::Ready(()),
                    _ => Poll::Pending {
                        state,
                        percent: None,
                    },
                })
            }
        },
    )
    .await
}

/// One instance to launch, always with IMDSv2 required.
pub struct InstanceSpec<'a> {
    /// A retry of the launch (after a lost answer) with the same token gets the same
    /// instance.
    pub client_token: String,
    pub image_id: &'a str,
    pub instance_type: &'a str,
    /// None: no key pair (the instance is reached through SSM).
    pub key_name: Option<&'a str>,
    pub tags: &'a [Tag],
    pub volume_tags: &'a [Tag],
    pub subnet_id: Option<&'a str>,
    pub security_group_ids: &'a [String],
    /// Set: the public address asked for or refused, which takes a network interface.
    pub associate_public_ip: Option<bool>,
    /// The root volume's device, size and type, when either is set.
    pub root: Option<(&'a str, Option<i32>, Option<&'a str>)>,
    /// A profile's name or ARN.
    pub iam_instance_profile: Option<&'a str>,
    pub user_data: Option<&'a str>,
}

/// Launches `spec`; answers the instance's id.
pub async fn launch(clients: &Clients, spec: InstanceSpec<'_>) -> Result<String, AwsError> {
    let mut request = clients
        .ec2
        .run_instances()
        .client_token(spec.client_token)
        .image_id(spec.image_id)
        .instance_type(InstanceType::from(spec.instance_type))
        .min_count(1)
        .max_count(1)
        .set_key_name(spec.key_name.map(str::to_string))
        .metadata_options(
            InstanceMetadataOptionsRequest::builder()
                .http_tokens(HttpTokensState::Required)
                .http_endpoint(InstanceMetadataEndpointState::Enabled)
                .build(),
        )
        .tag_specifications(tagged(ResourceType::Instance, spec.tags))
        .tag_specifications(tagged(ResourceType::Volume, spec.volume_tags));
    let subnet = spec.subnet_id.map(str::to_string);
    let groups = Some(spec.security_group_ids.to_vec());
    request = match spec.associate_public_ip {
        Some(public) => request.network_interfaces(
            InstanceNetworkInterfaceSpecification::builder()
                .device_index(0)
                .set_subnet_id(subnet)
                .set_groups(groups)
                .associate_public_ip_address(public)
                .delete_on_termination(true)
                .build(),
        ),
        None => request.set_subnet_id(subnet).set_security_group_ids(groups),
    };
    if let Some((device, size, kind)) = spec.root {
        request = request.block_device_mappings(
            BlockDeviceMapping::builder()
                .device_name(device)
                .ebs(
                    EbsBlockDevice::builder()
                        .set_volume_size(size)
                        .set_volume_type(kind.map(VolumeType::from))
                        .delete_on_termination(true)
                        .build(),
                )
                .build(),
        );
    }
    if let Some(profile) = spec.iam_instance_profile {
        let profile_spec = IamInstanceProfileSpecification::builder();
        let profile_spec = if profile.starts_with("arn:") {
            profile_spec.arn(profile)
        } else {
            profile_spec.name(profile)
        };
        request = request.iam_instance_profile(profile_spec.build());
    }
    if let Some(user_data) = spec.user_data {
        request = request.user_data(aws_smithy_types::base64::encode(user_data));
    }
    let action = || format!("launch a {} from {}", spec.instance_type, spec.image_id);
    let out = request
        .send()
        .await
        .map_err(|e| AwsError::new(action(), e))?;
    out.instances()
        .first()
        .and_then(|i| i.instance_id())
        .map(str::to_string)
        .ok_or_else(|| AwsError::answer(action(), "RunInstances returned no instance"))
}

/// Stops an instance (the wait is `wait(…, "stopped", …)`).
pub async fn stop(clients: &Clients, id: &str) -> Result<(), AwsError> {
    clients
        .ec2
        .stop_instances()
        .instance_ids(id)
        .send()
        .await
        .map_err(|e| AwsError::new(format!("stop {id}"), e))?;
    Ok(())
}

/// The device names an instance's block device mappings use.
pub async fn device_names(
    clients: &Clients,
    id: &str,
) -> Result<std::collections::HashSet<String>, AwsError> {
    let out = clients
        .ec2
        .describe_instances()
        .instance_ids(id)
        .send()
        .await
        .map_err(|e| AwsError::new(format!("describe the build host {id}"), e))?;
    Ok(out
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .flat_map(|i| i.block_device_mappings())
        .filter_map(|m| m.device_name().map(str::to_string))
        .collect())
}

/// Every state but terminated.
const NOT_GONE: [&str; 5] = ["pending", "running", "stopping", "stopped", "shutting-down"];

/// Instances of amibake runs that are not terminated, as (build id, instance id).
pub async fn of_runs(clients: &Clients) -> Result<Vec<(String, String)>, AwsError> {
    let mut found = Vec::new();
    let mut pages = clients
        .ec2
        .describe_instances()
        .filters(super::resources::of_runs())
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("instance-state-name")
                .set_values(Some(NOT_GONE.map(String::from).to_vec()))
                .build(),
        )
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| AwsError::new("list the instances of amibake runs", e))?;
        found.extend(super::resources::by_build_id(
            page.reservations().iter().flat_map(|r| r.instances()),
            |r| r.tags(),
            |r| r.instance_id(),
        ));
    }
    Ok(found)
}
