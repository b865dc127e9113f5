//! Temporary security groups: deleted once nothing uses them.

use aws_sdk_ec2::types::{IpPermission, IpRange, ResourceType, Tag};

use super::resources::{code, created_or_found, tagged, ResourceError, Unique};
use super::{AwsError, Clients};
use crate::engine::Progress;

/// Deletes a security group. An instance that used it can hold it for a few seconds after it
/// terminated (DependencyViolation), and a group made a moment ago may not be visible yet
/// (NotFound): both are retried for a while.
pub async fn delete(clients: Clients, id: String) -> Result<(), AwsError> {
    const ATTEMPTS: u32 = 30;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = clients
            .ec2
            .delete_security_group()
            .group_id(&id)
            .send()
            .await;
        match result {
            Err(e)
                if matches!(
                    code(&e),
                    Some("DependencyViolation" | "InvalidGroup.NotFound")
                ) && attempt < ATTEMPTS =>
            {
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
            Ok(_) => return Ok(()),
            Err(e) => return Err(AwsError::new(format!("delete security group {id}"), e)),
        }
    }
}

/// The VPC a subnet is in.
pub async fn vpc_of_subnet(clients: &Clients, subnet: &str) -> Result<Option<String>, AwsError> {
    let out = clients
        .ec2
        .describe_subnets()
        .subnet_ids(subnet)
        .send()
        .await
        .map_err(|e| AwsError::new(format!("describe subnet {subnet}"), e))?;
    Ok(out
        .subnets()
        .first()
        .and_then(|n| n.vpc_id().map(str::to_string)))
}

/// A new group named `name` with no rule that lets anything in, in `vpc` (the default VPC
/// without one), tagged in the call; a retry after a lost answer finds the first attempt's
/// group by its name and this build's tag.
pub async fn create(
    clients: &Clients,
    (name, description): (&str, String),
    vpc: Option<String>,
    tags: &[Tag],
    build_id: &str,
    progress: &Progress,
) -> Result<String, ResourceError> {
    let out = clients
        .ec2
        .create_security_group()
        .group_name(name)
        .description(description)
        .set_vpc_id(vpc)
        .tag_specifications(tagged(ResourceType::SecurityGroup, tags))
        .send()
        .await;
    created_or_found(
        out,
        |o| o.group_id(),
        &format!("create security group {name}"),
        ("InvalidGroup.Duplicate", Unique::SecurityGroup, name),
        (clients, build_id),
        progress,
    )
    .await
}

/// Lets TCP `port` into `group` from `cidrs`, each range described as `why`.
pub async fn allow_tcp(
    clients: &Clients,
    group: &str,
    port: u16,
    cidrs: &[String],
    why: &str,
) -> Result<(), AwsError> {
    let ranges = cidrs
        .iter()
        .map(|c| IpRange::builder().cidr_ip(c).description(why).build())
        .collect();
    clients
        .ec2
        .authorize_security_group_ingress()
        .group_id(group)
        .ip_permissions(
            IpPermission::builder()
                .ip_protocol("tcp")
                .from_port(i32::from(port))
                .to_port(i32::from(port))
                .set_ip_ranges(Some(ranges))
                .build(),
        )
        .send()
        .await
        .map_err(|e| {
            AwsError::new(
                format!("allow port {port} into {group} from {}", cidrs.join(", ")),
                e,
            )
        })?;
    Ok(())
}

/// Security groups of amibake runs, as (build id, group id).
pub async fn of_runs(clients: &Clients) -> Result<Vec<(String, String)>, AwsError> {
    let mut found = Vec::new();
    let mut pages = clients
        .ec2
        .describe_security_groups()
        .filters(super::resources::of_runs())
        .into_paginator()
        .send();
    while let Some(page) = pages.next().await {
        let page =
            page.map_err(|e| AwsError::new("list the security groups of amibake runs", e))?;
        found.extend(super::resources::by_build_id(
            page.security_groups(),
            |r| r.tags(),
            |r| r.group_id(),
        ));
    }
    Ok(found)
}
