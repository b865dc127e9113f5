//! The steps of a base build. Each registers how to undo what it made the moment it exists.

use std::net::{IpAddr, Ipv4Addr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, HttpTokensState, IamInstanceProfileSpecification,
    InstanceMetadataEndpointState, InstanceMetadataOptionsRequest,
    InstanceNetworkInterfaceSpecification, InstanceType, IpPermission, IpRange, KeyType,
    ResourceType, TagSpecification, VolumeType,
};
use tokio::time::Instant;

use super::BaseState;
use crate::artifact::{
    STATE_BUILDING, TAG_BUILD_ID, TAG_FINGERPRINT, TAG_SOURCE_AMI, TAG_STATE, TAG_VARIANT,
};
use crate::aws::resources::{self, wait_image, wait_instance};
use crate::aws::{console, AwsError};
use crate::communicator::ssh::{HostKey, Ssh, SshTarget};
use crate::engine::{Keep, Step, StepContext, StepError};
use crate::modes::distribute;
use crate::modes::support::{
    created_or_found, earlier, failed, mark_finished, provision, publish, tags, undo_with, waited,
};
use crate::template::SshInterface;

const SSH_PORT: u16 = 22;
/// One connection attempt while the instance boots; the step's total is the template's.
const SSH_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
const SSH_RETRY_PAUSE: Duration = Duration::from_secs(1);
/// A note about the wait at most this often: retries are otherwise quiet.
const SSH_NOTE_EVERY: Duration = Duration::from_secs(15);
const PRIVATE_KEY_FILE: &str = "id_ed25519";

impl BaseState {
    /// Name and build id, on everything temporary this run makes.
    fn build_tags(&self, what: &str) -> Vec<aws_sdk_ec2::types::Tag> {
        tags(&[
            ("Name", &format!("amibake {what} {}", self.build_id)),
            (TAG_BUILD_ID, &self.build_id),
        ])
    }

    /// Tags on the image and its snapshots: what it is, what it came from, which build.
    fn artifact_tags(&self) -> Vec<aws_sdk_ec2::types::Tag> {
        let mut pairs: Vec<(&str, &str)> = vec![
            ("Name", &self.plan.name),
            (TAG_SOURCE_AMI, &self.source.id),
            (TAG_BUILD_ID, &self.build_id),
            (TAG_FINGERPRINT, &self.fingerprint),
            (TAG_STATE, STATE_BUILDING),
            (TAG_VARIANT, self.plan.variant.name()),
        ];
        pairs.extend(self.plan.tags.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        tags(&pairs)
    }

    fn temporary_name(&self) -> String {
        format!("amibake-{}", self.build_id)
    }
}

pub struct CreateKeyPair;

#[async_trait]
impl Step<BaseState> for CreateKeyPair {
    fn name(&self) -> &'static str {
        "create key pair"
    }
    async fn run(&self, s: &mut BaseState, ctx: &mut StepContext) -> Result<(), StepError> {
        if let Some(existing) = &s.plan.instance.ssh_keypair {
            ctx.progress
                .note(format!("using the template's key pair {}", existing.name));
            s.key_name = Some(existing.name.clone());
            s.private_key = Some(existing.private_key_file.clone());
            return Ok(());
        }
        let name = s.temporary_name();
        let out = s
            .clients
            .ec2
            .create_key_pair()
            .key_name(&name)
            .key_type(KeyType::Ed25519)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::KeyPair)
                    .set_tags(Some(s.build_tags("key pair")))
                    .build(),
            )
            .send()
            .await;
        // It exists when the call answered, and also when the SDK's retry was refused as
        // a duplicate: the name is this build's own, so an attempt whose answer was lost
        // made it (and its private key went with that answer). Either way it goes.
        let made = match &out {
            Ok(_) => true,
            Err(e) => resources::code(e) == Some("InvalidKeyPair.Duplicate"),
        };
        if made {
            s.delete_key_pair = Some(undo_with(
                ctx,
                &s.clients,
                name.clone(),
                &name,
                "delete key pair",
                Keep::Never,
                resources::delete_key_pair,
            ));
        }
        let out = out.map_err(|e| failed(AwsError::new(format!("create key pair {name}"), &e)))?;
        s.key_name = Some(name.clone());
        let material = out
            .key_material()
            .ok_or_else(|| failed("CreateKeyPair returned no private key"))?;
        let path = s.key_dir.join(PRIVATE_KEY_FILE);
        write_private(&path, material.as_bytes())
            .map_err(|e| failed(format!("cannot keep the private key: {e}")))?;
        s.private_key = Some(path);
        Ok(())
    }
}

/// Writes a file only its owner can read, refusing to follow or reuse an existing path.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

pub struct CreateSecurityGroup;

#[async_trait]
impl Step<BaseState> for CreateSecurityGroup {
    fn name(&self) -> &'static str {
        "create security group"
    }
    async fn run(&self, s: &mut BaseState, ctx: &mut StepContext) -> Result<(), StepError> {
        if let Some(groups) = &s.plan.instance.security_group_ids {
            ctx.progress
                .note(format!("using the template's groups {}", groups.join(", ")));
            s.security_group_ids = groups.clone();
            return Ok(());
        }
        // In the subnet's VPC; without a subnet, EC2 uses the default VPC for both.
        let vpc_id = match &s.plan.instance.subnet_id {
            Some(subnet) => s
                .clients
                .ec2
                .describe_subnets()
                .subnet_ids(subnet)
                .send()
                .await
                .map_err(|e| failed(AwsError::new(format!("describe subnet {subnet}"), &e)))?
                .subnets()
                .first()
                .and_then(|n| n.vpc_id().map(str::to_string)),
            None => None,
        };
        let name = s.temporary_name();
        let out = s
            .clients
            .ec2
            .create_security_group()
            .group_name(&name)
            .description(format!("amibake build {}: SSH from the runner", s.build_id))
            .set_vpc_id(vpc_id)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::SecurityGroup)
                    .set_tags(Some(s.build_tags("security group")))
                    .build(),
            )
            .send()
            .await;
        let group_id = created_or_found(
            out,
            |o| o.group_id(),
            &format!("create security group {name}"),
            (
                "InvalidGroup.Duplicate",
                resources::Unique::SecurityGroup,
                &name,
            ),
            (&s.clients, &s.build_id),
            &ctx.progress,
        )
        .await?;
        s.delete_security_group = Some(undo_with(
            ctx,
            &s.clients,
            group_id.clone(),
            &group_id,
            "delete security group",
            Keep::Never,
            resources::delete_security_group,
        ));
        s.security_group_ids = vec![group_id.clone()];
        s.temporary_group = Some(group_id.clone());
        // Without CIDRs from the template, the runner's own address is known only once the
        // instance has its address (see LaunchInstance).
        if let Some(cidrs) = s.plan.instance.ssh_cidrs.clone() {
            allow_ssh(s, &group_id, &cidrs).await?;
        }
        Ok(())
    }
}

async fn allow_ssh(s: &BaseState, group_id: &str, cidrs: &[String]) -> Result<(), StepError> {
    let ranges = cidrs
        .iter()
        .map(|c| {
            IpRange::builder()
                .cidr_ip(c)
                .description(format!("amibake build {}", s.build_id))
                .build()
        })
        .collect();
    s.clients
        .ec2
        .authorize_security_group_ingress()
        .group_id(group_id)
        .ip_permissions(
            IpPermission::builder()
                .ip_protocol("tcp")
                .from_port(i32::from(SSH_PORT))
                .to_port(i32::from(SSH_PORT))
                .set_ip_ranges(Some(ranges))
                .build(),
        )
        .send()
        .await
        .map_err(|e| {
            failed(AwsError::new(
                format!("allow SSH into {group_id} from {}", cidrs.join(", ")),
                &e,
            ))
        })?;
    Ok(())
}

pub struct LaunchInstance;

#[async_trait]
impl Step<BaseState> for LaunchInstance {
    fn name(&self) -> &'static str {
        "launch instance"
    }
    async fn run(&self, s: &mut BaseState, ctx: &mut StepContext) -> Result<(), StepError> {
        let key_name = earlier(&s.key_name, "key pair")?;
        let plan = &s.plan;
        let mut request = s
            .clients
            .ec2
            .run_instances()
            // A retry of this launch (after a lost answer) gets the same instance.
            .client_token(&s.build_id)
            .image_id(&s.source.id)
            .instance_type(InstanceType::from(plan.instance.instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .key_name(&key_name)
            .metadata_options(
                InstanceMetadataOptionsRequest::builder()
                    .http_tokens(HttpTokensState::Required)
                    .http_endpoint(InstanceMetadataEndpointState::Enabled)
                    .build(),
            )
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .set_tags(Some(s.build_tags("instance")))
                    .build(),
            )
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Volume)
                    .set_tags(Some(s.build_tags("instance volume")))
                    .build(),
            );
        request = match plan.instance.associate_public_ip {
            // Choosing the public address takes a network interface specification.
            Some(public) => request.network_interfaces(
                InstanceNetworkInterfaceSpecification::builder()
                    .device_index(0)
                    .set_subnet_id(plan.instance.subnet_id.clone())
                    .set_groups(Some(s.security_group_ids.clone()))
                    .associate_public_ip_address(public)
                    .delete_on_termination(true)
                    .build(),
            ),
            None => request
                .set_subnet_id(plan.instance.subnet_id.clone())
                .set_security_group_ids(Some(s.security_group_ids.clone())),
        };
        if plan.instance.root_volume_size_gb.is_some() || plan.instance.root_volume_type.is_some() {
            request = request.block_device_mappings(
                BlockDeviceMapping::builder()
                    .device_name(&s.source.root_device_name)
                    .ebs(
                        EbsBlockDevice::builder()
                            .set_volume_size(plan.instance.root_volume_size_gb)
                            .set_volume_type(
                                plan.instance
                                    .root_volume_type
                                    .as_deref()
                                    .map(VolumeType::from),
                            )
                            .delete_on_termination(true)
                            .build(),
                    )
                    .build(),
            );
        }
        if let Some(profile) = &plan.instance.iam_instance_profile {
            let spec = IamInstanceProfileSpecification::builder();
            let spec = if profile.starts_with("arn:") {
                spec.arn(profile)
            } else {
                spec.name(profile)
            };
            request = request.iam_instance_profile(spec.build());
        }
        if let Some(user_data) = &plan.instance.user_data {
            request = request.user_data(aws_smithy_types::base64::encode(user_data));
        }
        let out = request.send().await.map_err(|e| {
            failed(AwsError::new(
                format!(
                    "launch a {} from {}",
                    plan.instance.instance_type, s.source.id
                ),
                &e,
            ))
        })?;
        let instance_id = out
            .instances()
            .first()
            .and_then(|i| i.instance_id())
            .ok_or_else(|| failed("RunInstances returned no instance"))?
            .to_string();
        s.instance_id = Some(instance_id.clone());
        let progress = ctx.progress.clone();
        let terminate = undo_with(
            ctx,
            &s.clients,
            instance_id.clone(),
            &instance_id,
            "terminate instance",
            Keep::Never,
            move |clients, id| resources::terminate_instance(clients, id, progress.clone()),
        );
        if let Some(delete_group) = s.delete_security_group {
            ctx.undo.require(delete_group, terminate);
        }
        // The instance has the public key from its launch: the temporary key pair is of no
        // more use, and one less thing a killed run can leave. A failure here is tried
        // again at the end.
        if let Some(delete) = s.delete_key_pair.take() {
            match ctx.undo.release(delete).await {
                Ok(()) => ctx.progress.note(format!(
                    "deleted key pair {key_name}: {instance_id} has its public key"
                )),
                Err(left) => ctx.progress.note(format!("{left}; tried again at the end")),
            }
        }
        let instance = wait_instance(
            &s.clients,
            &instance_id,
            "running",
            &ctx.cancel,
            &ctx.progress,
        )
        .await
        .map_err(waited)?;
        let (host, interface) = match s.plan.instance.ssh_interface {
            Some(interface) => ssh_address(&instance, interface)
                .map(|host| (host, interface))
                .ok_or_else(|| failed(no_address(&instance_id, interface)))?,
            // As Packer: the public address when the instance has one, else the private.
            None => [SshInterface::PublicIp, SshInterface::PrivateIp]
                .into_iter()
                .find_map(|i| ssh_address(&instance, i).map(|host| (host, i)))
                .ok_or_else(|| failed(format!("{instance_id} has no address to connect to")))?,
        };
        if let Some(group) = s
            .temporary_group
            .clone()
            .filter(|_| s.plan.instance.ssh_cidrs.is_none())
        {
            let runner = runner_cidr(&host).map_err(|e| {
                failed(format!(
                    "cannot tell this runner's address towards {host}: {e}; set `ssh_cidrs` in [base] or pass --ssh-cidr"
                ))
            })?;
            allow_ssh(s, &group, &[runner]).await?;
        }
        let which = match interface {
            SshInterface::PublicIp => "public address",
            SshInterface::PrivateIp => "private address",
            SshInterface::PublicDns => "public DNS name",
            SshInterface::PrivateDns => "private DNS name",
        };
        let chosen = if s.plan.instance.ssh_interface.is_none() {
            " (chosen: set `ssh_interface` to pick another)"
        } else {
            ""
        };
        ctx.progress.note(format!(
            "{instance_id} is running at {host}, its {which}{chosen}"
        ));
        s.ssh_target = Some(SshTarget {
            host,
            port: SSH_PORT,
            user: s.plan.instance.ssh_username.clone(),
            private_key: earlier(&s.private_key, "private key")?,
        });
        Ok(())
    }
}

fn ssh_address(instance: &aws_sdk_ec2::types::Instance, interface: SshInterface) -> Option<String> {
    let address = match interface {
        SshInterface::PublicIp => instance.public_ip_address(),
        SshInterface::PrivateIp => instance.private_ip_address(),
        SshInterface::PublicDns => instance.public_dns_name(),
        SshInterface::PrivateDns => instance.private_dns_name(),
    };
    address.filter(|a| !a.is_empty()).map(str::to_string)
}

fn no_address(instance_id: &str, interface: SshInterface) -> String {
    match interface {
        SshInterface::PublicIp | SshInterface::PublicDns => format!(
            "{instance_id} has no public address: set `associate_public_ip = true`, or `ssh_interface = \"private_ip\"` when this runner is in the same network"
        ),
        SshInterface::PrivateIp | SshInterface::PrivateDns => {
            format!("{instance_id} has no private address")
        }
    }
}

/// The address this machine's packets to `host` leave from, as a /32: what the security
/// group must let in. A connected UDP socket asks the kernel's routing without sending
/// anything. Behind NAT the instance sees another address, which this machine cannot know:
/// that is refused, and the caller names `ssh_cidrs` and `--ssh-cidr`.
fn runner_cidr(host: &str) -> Result<String, String> {
    let route = || -> std::io::Result<(IpAddr, IpAddr)> {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.connect((host, SSH_PORT))?;
        Ok((socket.local_addr()?.ip(), socket.peer_addr()?.ip()))
    };
    match route().map_err(|e| e.to_string())? {
        (IpAddr::V4(source), IpAddr::V4(target)) if crosses_nat(source, target) => Err(format!(
            "this runner's address {source} is private and {target} is public, so the instance sees a NAT's address, not {source} (find it with `curl -fsS https://checkip.amazonaws.com`)"
        )),
        (IpAddr::V4(source), _) => Ok(format!("{source}/32")),
        (IpAddr::V6(source), _) => Err(format!("{source} is IPv6, and the group opens IPv4 only")),
    }
}

/// Whether packets from `source` to `target` are translated on the way: a private address
/// (RFC 1918, or the shared range carriers and CI clouds NAT from) reaching a public one.
fn crosses_nat(source: Ipv4Addr, target: Ipv4Addr) -> bool {
    let shared = |a: Ipv4Addr| a.octets()[0] == 100 && (a.octets()[1] & 0xc0) == 64;
    let private = |a: Ipv4Addr| a.is_private() || shared(a);
    let public = !(private(target)
        || target.is_loopback()
        || target.is_link_local()
        || target.is_unspecified()
        || target.is_broadcast());
    private(source) && public
}

pub struct WaitForSsh;

#[async_trait]
impl Step<BaseState> for WaitForSsh {
    fn name(&self) -> &'static str {
        "wait for ssh"
    }
    async fn run(&self, s: &mut BaseState, ctx: &mut StepContext) -> Result<(), StepError> {
        let target = earlier(&s.ssh_target, "SSH address")?;
        let started = Instant::now();
        let deadline = started + s.plan.instance.ssh_timeout;
        let mut last_note = started;
        loop {
            let attempt = target.clone();
            let handshake =
                tokio::task::spawn_blocking(move || Ssh::handshake(&attempt, SSH_ATTEMPT_TIMEOUT))
                    .await
                    .map_err(failed)?;
            let error = match handshake {
                Ok(handshake) => {
                    trust_host_key(s, handshake.host_key(), &target.host, ctx).await?;
                    match tokio::task::spawn_blocking(move || handshake.authenticate())
                        .await
                        .map_err(failed)?
                    {
                        Ok(ssh) => {
                            ctx.progress.note(format!(
                                "{}@{} answered after {}s",
                                target.user,
                                target.host,
                                started.elapsed().as_secs()
                            ));
                            s.ssh = Some(Arc::new(ssh));
                            return Ok(());
                        }
                        Err(e) => e,
                    }
                }
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(failed(format!(
                    "no SSH answer from {}@{}:{} within {}s (`ssh_timeout_seconds`); last attempt: {error}",
                    target.user,
                    target.host,
                    target.port,
                    s.plan.instance.ssh_timeout.as_secs()
                )));
            }
            if last_note.elapsed() >= SSH_NOTE_EVERY {
                ctx.progress
                    .note(format!("still waiting for SSH on {}: {error}", target.host));
                last_note = Instant::now();
            }
            tokio::select! {
                _ = tokio::time::sleep(SSH_RETRY_PAUSE) => {}
                _ = ctx.cancel.cancelled() => return Err(StepError::Interrupted),
            }
        }
    }
}

/// Accepts the host key an instance's SSH server offered only if the instance printed it
/// to its console, as cloud-init does at first boot; a key it did not print means another
/// machine answers at that address, and nothing is sent to it. An instance that printed
/// none (yet) gets its key accepted as offered, and the key is shown.
async fn trust_host_key(
    s: &BaseState,
    offered: &HostKey,
    host: &str,
    ctx: &mut StepContext,
) -> Result<(), StepError> {
    let instance_id = earlier(&s.instance_id, "instance")?;
    let key = format!("{} ({})", offered.fingerprint, offered.kind);
    match console::printed_host_keys(&s.clients, &instance_id).await {
        Ok(printed) if printed.is_empty() => ctx.progress.note(format!(
            "{instance_id} has printed no SSH host keys to its console yet: accepting {key} from {host} as offered"
        )),
        Ok(printed) if printed.names(&offered.blob_base64, &offered.fingerprint) => ctx
            .progress
            .note(format!("{host} offered host key {key}, which {instance_id} printed to its console")),
        Ok(printed) => {
            return Err(failed(format!(
                "{host} offered the SSH host key {key}, which is none of those {instance_id} printed to its console ({}): another machine is answering at that address. Nothing was sent to it; check `ssh_interface` and the network between this runner and the instance",
                printed
                    .fingerprints
                    .iter()
                    .chain(printed.keys.iter())
                    .take(4)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
        Err(e) => ctx.progress.note(format!(
            "cannot read {instance_id}'s console to check its SSH host key ({e}): accepting {key} from {host} as offered"
        )),
    }
    Ok(())
}

pub struct RunProvisioners;

#[async_trait]
impl Step<BaseState> for RunProvisioners {
    fn name(&self) -> &'static str {
        "run provisioners"
    }
    async fn run(&self, s: &mut BaseState, ctx: &mut StepContext) -> Result<(), StepError> {
        let ssh = earlier(&s.ssh, "SSH session")?;
        provision(ssh.as_ref(), &s.plan.provisioners, ctx).await
    }
}

pub struct StopInstance;

#[async_trait]
impl Step<BaseState> for StopInstance {
    fn name(&self) -> &'static str {
        "stop instance"
    }
    async fn run(&self, s: &mut BaseState, ctx: &mut StepContext) -> Result<(), StepError> {
        // The session ends before the machine does.
        s.ssh = None;
        let instance_id = earlier(&s.instance_id, "instance")?;
        s.clients
            .ec2
            .stop_instances()
            .instance_ids(&instance_id)
            .send()
            .await
            .map_err(|e| failed(AwsError::new(format!("stop {instance_id}"), &e)))?;
        wait_instance(
            &s.clients,
            &instance_id,
            "stopped",
            &ctx.cancel,
            &ctx.progress,
        )
        .await
        .map_err(waited)?;
        Ok(())
    }
}

pub struct CreateImage;

#[async_trait]
impl Step<BaseState> for CreateImage {
    fn name(&self) -> &'static str {
        "create image"
    }
    async fn run(&self, s: &mut BaseState, ctx: &mut StepContext) -> Result<(), StepError> {
        let instance_id = earlier(&s.instance_id, "instance")?;
        let out = s
            .clients
            .ec2
            .create_image()
            .instance_id(&instance_id)
            .name(&s.plan.name)
            .set_description(s.plan.description.clone())
            // The image and its snapshots tagged in the call itself, so even a run killed
            // right after can be found.
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Image)
                    .set_tags(Some(s.artifact_tags()))
                    .build(),
            )
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Snapshot)
                    .set_tags(Some(s.artifact_tags()))
                    .build(),
            )
            .send()
            .await;
        let image_id = created_or_found(
            out,
            |o| o.image_id(),
            &format!("create image {} from {instance_id}", s.plan.name),
            (
                "InvalidAMIName.Duplicate",
                resources::Unique::Image,
                &s.plan.name,
            ),
            (&s.clients, &s.build_id),
            &ctx.progress,
        )
        .await?;
        s.image_id = Some(image_id.clone());
        // Its snapshots go with it: they are found from the image when it is removed.
        undo_with(
            ctx,
            &s.clients,
            image_id.clone(),
            &image_id,
            "deregister image and delete its snapshots",
            Keep::OnSuccess,
            resources::deregister_image_and_snapshots,
        );
        wait_image(&s.clients, &image_id, &ctx.cancel, &ctx.progress)
            .await
            .map_err(waited)?;
        let described = s
            .clients
            .ec2
            .describe_images()
            .image_ids(&image_id)
            .send()
            .await
            .map_err(|e| failed(AwsError::new(format!("describe {image_id}"), &e)))?;
        s.snapshot_ids = described
            .images()
            .iter()
            .flat_map(|i| i.block_device_mappings())
            .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()).map(str::to_string))
            .collect();
        Ok(())
    }
}

/// The image tagged finished, so later runs may reuse it and `gc` leaves it.
pub struct MarkFinished;

#[async_trait]
impl Step<BaseState> for MarkFinished {
    fn name(&self) -> &'static str {
        "mark finished"
    }
    async fn run(&self, s: &mut BaseState, _ctx: &mut StepContext) -> Result<(), StepError> {
        let mut resources = vec![earlier(&s.image_id, "image")?];
        resources.extend(s.snapshot_ids.iter().cloned());
        mark_finished(&s.clients, resources).await?;
        distribute::mark_copies_finished(&s.copies).await
    }
}

/// The image beyond its region and account: copies, deprecation, IMDSv2-only, sharing.
pub struct Distribute;

#[async_trait]
impl Step<BaseState> for Distribute {
    fn name(&self) -> &'static str {
        "distribute"
    }
    async fn run(&self, s: &mut BaseState, ctx: &mut StepContext) -> Result<(), StepError> {
        let image_id = earlier(&s.image_id, "image")?;
        let source = distribute::Source {
            clients: &s.clients,
            image_id: &image_id,
            name: &s.plan.name,
            description: s.plan.description.as_deref(),
            tags: s.artifact_tags(),
            build_id: &s.build_id,
            fingerprint: &s.fingerprint,
            // Only a run that made the image has snapshots of its own.
            reused: s.snapshot_ids.is_empty(),
        };
        s.copies = distribute::deliver(source, &s.plan.distribution, ctx).await?;
        Ok(())
    }
}

pub struct PublishSsm;

#[async_trait]
impl Step<BaseState> for PublishSsm {
    fn name(&self) -> &'static str {
        "publish to ssm"
    }
    async fn run(&self, s: &mut BaseState, ctx: &mut StepContext) -> Result<(), StepError> {
        let image_id = earlier(&s.image_id, "image")?;
        let description = format!("{} (amibake build {})", s.plan.name, s.build_id);
        s.ssm_version = publish(
            &s.clients,
            s.plan.publish.as_ref(),
            &image_id,
            &description,
            ctx,
        )
        .await?;
        distribute::publish_copies(&mut s.copies, s.plan.publish.as_ref(), &description, ctx).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_private_runner_reaching_a_public_address_crosses_a_nat() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        // A hosted runner (private, or the carriers' shared range) to a public instance.
        assert!(crosses_nat(ip("10.1.0.4"), ip("54.12.3.4")));
        assert!(crosses_nat(ip("172.17.0.2"), ip("3.8.1.1")));
        assert!(crosses_nat(ip("100.64.3.9"), ip("18.2.2.2")));
        // A runner in the instance's network, one with a public address, the local cloud.
        assert!(!crosses_nat(ip("10.1.0.4"), ip("10.1.2.7")));
        assert!(!crosses_nat(ip("198.51.100.20"), ip("54.12.3.4")));
        assert!(!crosses_nat(ip("127.0.0.1"), ip("127.0.2.5")));
        assert!(
            !crosses_nat(ip("100.128.0.1"), ip("54.12.3.4")),
            "outside 100.64/10"
        );
    }
}
