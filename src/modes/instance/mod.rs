//! A temporary instance a run launches and reaches, over SSH or through SSM Run Command: the
//! one a base is provisioned on, and the one a new image is booted on to be tested. Its key
//! pair (SSH only), security group and the instance itself are the run's own, tagged with
//! its build id, and each one's removal is registered the moment it exists. Through SSM,
//! there is no key pair and the group lets nothing in.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::time::Instant;

mod address;
mod key_dir;
pub mod profile;
mod ssh;

use address::{no_address, runner_cidr, ssh_address};
use key_dir::{write_private, KeyDir};

use super::support::{earlier, failed, tags, undo_with, waited};
use super::ModeError;
use crate::artifact::TAG_BUILD_ID;
use crate::aws::key_pair::KeyPairError;
use crate::aws::Clients;
use crate::communicator::ssh::SshTarget;
use crate::communicator::ssm::Ssm;
use crate::communicator::Communicator;
use crate::engine::{Keep, StepContext, StepError, UndoId};
use crate::template::{CommunicatorKind, InstancePlan, SshInterface};

const SSH_PORT: u16 = 22;
const PRIVATE_KEY_FILE: &str = "id_ed25519";

/// The instance's SSM agent never registered it within the template's bound.
#[derive(Debug, thiserror::Error)]
#[error("{instance_id} never registered with SSM within {seconds}s (`agent_timeout_seconds`): SSM manages an instance once its agent runs (Amazon Linux, Ubuntu and Windows images hold it, not every image), its instance profile ({profile}) has a role with AWS's AmazonSSMManagedInstanceCore policy, and it reaches SSM's endpoints (a NAT gateway, or VPC endpoints for ssm, ssmmessages and ec2messages)")]
pub struct NoAgent {
    instance_id: String,
    seconds: u64,
    profile: String,
}

/// What an instance is for: it names and tags what is made for it, so a base build's
/// instance and its test instance never take each other's names or launch tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The instance a base is provisioned on.
    Build,
    /// An instance of the new image, booted to run the template's tests.
    Test,
}

/// What to launch and how to reach it.
#[derive(Debug, Clone)]
pub struct Launch {
    pub image_id: String,
    /// Where the image's root volume goes, for a root size or type from the template.
    pub root_device_name: String,
    pub plan: InstancePlan,
    pub role: Role,
}

pub struct TemporaryInstance {
    clients: Clients,
    build_id: String,
    launch: Launch,
    /// Private, and removed with this value whatever happens: holds the private key.
    key_dir: KeyDir,
    key_name: Option<String>,
    /// The temporary key pair's undo, released once the instance has the key.
    delete_key_pair: Option<UndoId>,
    private_key: Option<PathBuf>,
    security_group_ids: Vec<String>,
    /// The temporary group's undo, which waits for the instance's: a group is in use until
    /// the instance using it is terminated.
    delete_security_group: Option<UndoId>,
    /// The group this run made, which it opens to the runner once the address is known.
    temporary_group: Option<String>,
    instance_id: Option<String>,
    terminate: Option<UndoId>,
    /// Stopped for its image: what `keep_for_a_look` says.
    stopped: bool,
    ssh_target: Option<SshTarget>,
    /// Once the instance answers: its SSH session, or its SSM agent.
    session: Option<Arc<dyn Communicator>>,
}

impl TemporaryInstance {
    pub fn new(
        clients: &Clients,
        build_id: &str,
        launch: Launch,
    ) -> Result<TemporaryInstance, ModeError> {
        Ok(TemporaryInstance {
            clients: clients.clone(),
            build_id: build_id.to_string(),
            launch,
            key_dir: KeyDir::new(build_id)?,
            key_name: None,
            delete_key_pair: None,
            private_key: None,
            security_group_ids: Vec::new(),
            delete_security_group: None,
            temporary_group: None,
            instance_id: None,
            terminate: None,
            stopped: false,
            ssh_target: None,
            session: None,
        })
    }

    /// The instance, once launched.
    pub fn id(&self) -> Result<String, StepError> {
        earlier(&self.instance_id, "instance")
    }

    /// How the provisioners reach the instance, once it answered.
    pub fn session(&self) -> Result<Arc<dyn Communicator>, StepError> {
        earlier(&self.session, "session with the instance")
    }

    /// Ends the session: before the machine stops or goes.
    pub fn disconnect(&mut self) {
        self.session = None;
    }

    fn over_ssm(&self) -> bool {
        self.launch.plan.communicator == CommunicatorKind::Ssm
    }

    /// `amibake-BUILD` for a build instance's key pair and group, `amibake-BUILD-test` for
    /// a test instance's: unique per run and role, as EC2 wants names to be.
    fn temporary_name(&self) -> String {
        match self.launch.role {
            Role::Build => format!("amibake-{}", self.build_id),
            Role::Test => format!("amibake-{}-test", self.build_id),
        }
    }

    /// Name and build id, on everything this instance needs.
    fn build_tags(&self, what: &str) -> Vec<aws_sdk_ec2::types::Tag> {
        let role = match self.launch.role {
            Role::Build => "",
            Role::Test => "test ",
        };
        tags(&[
            ("Name", &format!("amibake {role}{what} {}", self.build_id)),
            (TAG_BUILD_ID, &self.build_id),
        ])
    }

    /// The template's key pair, or a temporary one whose private key stays on tmpfs; none
    /// through SSM.
    pub async fn create_key_pair(&mut self, ctx: &mut StepContext) -> Result<(), StepError> {
        if self.over_ssm() {
            return Ok(());
        }
        if let Some(existing) = &self.launch.plan.ssh_keypair {
            ctx.progress
                .note(format!("using the template's key pair {}", existing.name));
            self.key_name = Some(existing.name.clone());
            self.private_key = Some(existing.private_key_file.clone());
            return Ok(());
        }
        let name = self.temporary_name();
        let made =
            crate::aws::key_pair::create(&self.clients, &name, &self.build_tags("key pair")).await;
        // It exists when the call answered, and also when the SDK's retry was refused as
        // a duplicate (see `KeyPairError::Exists`). Either way it goes.
        if !matches!(made, Err(KeyPairError::Aws(_))) {
            self.delete_key_pair = Some(undo_with(
                ctx,
                &self.clients,
                name.clone(),
                &name,
                "delete key pair",
                Keep::Never,
                crate::aws::key_pair::delete,
            ));
        }
        let material = made.map_err(failed)?;
        self.key_name = Some(name.clone());
        let path = self.key_dir.path().join(PRIVATE_KEY_FILE);
        write_private(&path, material.as_bytes())
            .map_err(|e| failed(format!("cannot keep the private key: {e}")))?;
        self.private_key = Some(path);
        Ok(())
    }

    /// The template's groups, or a temporary one that lets SSH in from the runner only.
    pub async fn create_security_group(&mut self, ctx: &mut StepContext) -> Result<(), StepError> {
        let plan = &self.launch.plan;
        if let Some(groups) = &plan.security_group_ids {
            ctx.progress
                .note(format!("using the template's groups {}", groups.join(", ")));
            self.security_group_ids = groups.clone();
            return Ok(());
        }
        // In the subnet's VPC; without a subnet, EC2 uses the default VPC for both.
        let vpc_id = match &plan.subnet_id {
            Some(subnet) => crate::aws::security_group::vpc_of_subnet(&self.clients, subnet)
                .await
                .map_err(failed)?,
            None => None,
        };
        let name = self.temporary_name();
        let purpose = match self.over_ssm() {
            true => "no ingress, reached through SSM",
            false => "SSH from the runner",
        };
        let group_id = crate::aws::security_group::create(
            &self.clients,
            (&name, format!("amibake build {}: {purpose}", self.build_id)),
            vpc_id,
            &self.build_tags("security group"),
            &self.build_id,
            &ctx.progress,
        )
        .await
        .map_err(waited)?;
        self.delete_security_group = Some(undo_with(
            ctx,
            &self.clients,
            group_id.clone(),
            &group_id,
            "delete security group",
            Keep::Never,
            crate::aws::security_group::delete,
        ));
        self.security_group_ids = vec![group_id.clone()];
        self.temporary_group = Some(group_id.clone());
        // Without CIDRs from the template, the runner's own address is known only once the
        // instance has its address (see `launch`). Through SSM there are none: the template
        // check and --ssh-cidr refuse them.
        if let Some(cidrs) = self.launch.plan.ssh_cidrs.clone() {
            self.allow_ssh(&group_id, &cidrs).await?;
        }
        Ok(())
    }

    async fn allow_ssh(&self, group_id: &str, cidrs: &[String]) -> Result<(), StepError> {
        let why = format!("amibake build {}", self.build_id);
        crate::aws::security_group::allow_tcp(&self.clients, group_id, SSH_PORT, cidrs, &why)
            .await
            .map_err(failed)
    }

    /// Launches the instance, waits until it runs and picks the address to reach it at.
    pub async fn launch(&mut self, ctx: &mut StepContext) -> Result<(), StepError> {
        let key_name = match self.over_ssm() {
            true => None,
            false => Some(earlier(&self.key_name, "key pair")?),
        };
        let Launch {
            image_id,
            root_device_name,
            plan,
            role,
        } = &self.launch;
        // A retry of this launch (after a lost answer) gets the same instance.
        let client_token = match role {
            Role::Build => self.build_id.clone(),
            Role::Test => format!("{}-test", self.build_id),
        };
        let root = (plan.root_volume_size_gb.is_some() || plan.root_volume_type.is_some())
            .then_some((
                root_device_name.as_str(),
                plan.root_volume_size_gb,
                plan.root_volume_type.as_deref(),
            ));
        let spec = crate::aws::instance::InstanceSpec {
            client_token,
            image_id,
            instance_type: &plan.instance_type,
            key_name: key_name.as_deref(),
            tags: &self.build_tags("instance"),
            volume_tags: &self.build_tags("instance volume"),
            subnet_id: plan.subnet_id.as_deref(),
            security_group_ids: &self.security_group_ids,
            associate_public_ip: plan.associate_public_ip,
            root,
            iam_instance_profile: plan.iam_instance_profile.as_deref(),
            user_data: plan.user_data.as_deref(),
        };
        let instance_id = crate::aws::instance::launch(&self.clients, spec)
            .await
            .map_err(failed)?;
        self.instance_id = Some(instance_id.clone());
        self.undo_launch(ctx, &instance_id);
        if let Some(key_name) = &key_name {
            self.delete_key_pair(ctx, key_name, &instance_id).await;
        }
        let instance = crate::aws::instance::wait(
            &self.clients,
            &instance_id,
            "running",
            &ctx.cancel,
            &ctx.progress,
        )
        .await
        .map_err(waited)?;
        if self.over_ssm() {
            ctx.progress.note(format!(
                "{instance_id} is running; it is reached through SSM, once its agent registers"
            ));
            return Ok(());
        }
        let host = self.reach(&instance, &instance_id, ctx).await?;
        let plan = &self.launch.plan;
        self.ssh_target = Some(SshTarget {
            host,
            port: SSH_PORT,
            user: plan.ssh_username.clone(),
            private_key: earlier(&self.private_key, "private key")?,
        });
        Ok(())
    }

    /// The launched instance is terminated on undo, before its security group is deleted.
    fn undo_launch(&mut self, ctx: &mut StepContext, instance_id: &str) {
        let progress = ctx.progress.clone();
        let terminate = undo_with(
            ctx,
            &self.clients,
            instance_id.to_string(),
            instance_id,
            "terminate instance",
            Keep::Never,
            move |clients, id| crate::aws::instance::terminate(clients, id, progress.clone()),
        );
        self.terminate = Some(terminate);
        if let Some(delete_group) = self.delete_security_group {
            ctx.undo.require(delete_group, terminate);
        }
    }

    /// The instance has the public key from its launch: the temporary key pair is of no more
    /// use, and one less thing a killed run can leave. A failure here is tried again at the
    /// end.
    async fn delete_key_pair(&mut self, ctx: &mut StepContext, key_name: &str, instance_id: &str) {
        if let Some(delete) = self.delete_key_pair.take() {
            match ctx.undo.release(delete).await {
                Ok(()) => ctx.progress.note(format!(
                    "deleted key pair {key_name}: {instance_id} has its public key"
                )),
                Err(left) => ctx.progress.note(format!("{left}; tried again at the end")),
            }
        }
    }

    /// The address the running instance is reached at, opened to this runner when the run
    /// made the group and the template names no CIDRs.
    async fn reach(
        &self,
        instance: &aws_sdk_ec2::types::Instance,
        instance_id: &str,
        ctx: &mut StepContext,
    ) -> Result<String, StepError> {
        let plan = &self.launch.plan;
        let (host, interface) = match plan.ssh_interface {
            Some(interface) => ssh_address(instance, interface)
                .map(|host| (host, interface))
                .ok_or_else(|| failed(no_address(instance_id, interface)))?,
            // As Packer: the public address when the instance has one, else the private.
            None => [SshInterface::PublicIp, SshInterface::PrivateIp]
                .into_iter()
                .find_map(|i| ssh_address(instance, i).map(|host| (host, i)))
                .ok_or_else(|| failed(format!("{instance_id} has no address to connect to")))?,
        };
        if let Some(group) = self
            .temporary_group
            .clone()
            .filter(|_| plan.ssh_cidrs.is_none())
        {
            let runner = runner_cidr(&host).map_err(|e| {
                failed(format!(
                    "cannot tell this runner's address towards {host}: {e}; set `ssh_cidrs` in the template or pass --ssh-cidr"
                ))
            })?;
            self.allow_ssh(&group, &[runner]).await?;
        }
        let which = match interface {
            SshInterface::PublicIp => "public address",
            SshInterface::PrivateIp => "private address",
            SshInterface::PublicDns => "public DNS name",
            SshInterface::PrivateDns => "private DNS name",
        };
        let chosen = if plan.ssh_interface.is_none() {
            " (chosen: set `ssh_interface` to pick another)"
        } else {
            ""
        };
        ctx.progress.note(format!(
            "{instance_id} is running at {host}, its {which}{chosen}"
        ));
        Ok(host)
    }

    /// `--on-error=abort`: keeps the private key past the run and says how to reach the
    /// instance; None when there is no instance to reach.
    pub fn keep_for_a_look(&mut self) -> Option<String> {
        let id = self.instance_id.as_ref()?;
        self.key_dir.keep();
        let ssh = self.ssh_target.as_ref().map(|t| {
            format!(
                "ssh -i {} -p {} {}@{}",
                t.private_key.display(),
                t.port,
                t.user,
                t.host
            )
        });
        if self.over_ssm() {
            let start = format!("aws ssm start-session --target {id}");
            return Some(match self.stopped {
                false => format!("instance {id} runs: {start}"),
                true => format!("instance {id} was stopped after provisioning: `aws ec2 start-instances --instance-ids {id}`, then {start}"),
            });
        }
        Some(match (ssh, self.stopped) {
            (Some(ssh), false) => format!("instance {id} runs: {ssh}"),
            (Some(ssh), true) => format!(
                "instance {id} was stopped after provisioning: `aws ec2 start-instances --instance-ids {id}`, then {ssh} (at its new address)"
            ),
            (None, _) => format!("instance {id} has no SSH address yet"),
        })
    }

    /// Says the instance is being stopped (its image is next): a look at it must start it.
    pub fn stopping(&mut self) {
        self.disconnect();
        self.stopped = true;
    }

    /// Waits until the instance can be reached: its SSH server answers, or its SSM agent
    /// registers it, within the template's bound.
    pub async fn connect(&mut self, ctx: &mut StepContext) -> Result<(), StepError> {
        match self.launch.plan.communicator {
            CommunicatorKind::Ssh => self.wait_for_ssh(ctx).await,
            CommunicatorKind::Ssm => self.wait_for_agent(ctx).await,
        }
    }

    /// Waits until the instance's SSM agent has registered it as a managed node.
    async fn wait_for_agent(&mut self, ctx: &mut StepContext) -> Result<(), StepError> {
        let instance_id = self.id()?;
        let plan = &self.launch.plan;
        let started = Instant::now();
        let waited_for = crate::aws::run_command::wait_for_agent(
            &self.clients,
            &instance_id,
            plan.reach_timeout,
            &ctx.cancel,
            &ctx.progress,
        )
        .await;
        match waited_for {
            Ok(()) => {}
            Err(crate::aws::wait::WaitError::TimedOut { .. }) => {
                return Err(failed(NoAgent {
                    instance_id,
                    seconds: plan.reach_timeout.as_secs(),
                    profile: plan.iam_instance_profile.clone().unwrap_or_default(),
                }))
            }
            Err(e) => return Err(waited(e)),
        }
        ctx.progress.note(format!(
            "{instance_id}'s SSM agent registered after {}s",
            started.elapsed().as_secs()
        ));
        let session = Ssm::new(
            &self.clients,
            &instance_id,
            &self.build_id,
            plan.ssm_log_group.as_deref(),
            plan.ssm_bucket.as_deref(),
        );
        // A step cut short (an interrupt past its grace) may leave objects in the bucket:
        // the cleanup deletes what the session has not.
        if let Some(staged) = session.staged_objects() {
            let clients = self.clients.clone();
            ctx.undo.push(
                staged.describe(&self.build_id),
                "delete",
                Keep::Never,
                move || {
                    let (staged, clients) = (staged.clone(), clients.clone());
                    async move { staged.delete_all(&clients).await.map_err(Into::into) }
                },
            );
        }
        self.session = Some(Arc::new(session));
        Ok(())
    }

    /// Terminates the instance and removes its group and key pair now, as a step's own
    /// work rather than the cleanup's; what cannot go is left to the cleanup, and named.
    pub async fn remove(&mut self, ctx: &mut StepContext) -> Result<(), StepError> {
        self.disconnect();
        for undo in [
            self.terminate.take(),
            self.delete_security_group.take(),
            self.delete_key_pair.take(),
        ]
        .into_iter()
        .flatten()
        {
            ctx.undo
                .release(undo)
                .await
                .map_err(|left| failed(left.to_string()))?;
        }
        Ok(())
    }
}
