//! The steps of a base build. Each registers how to undo what it made the moment it exists.

use async_trait::async_trait;
use aws_sdk_ec2::types::{ResourceType, TagSpecification};

use super::BaseState;
use crate::artifact::{
    STATE_BUILDING, TAG_BUILD_ID, TAG_CHANNEL, TAG_FINGERPRINT, TAG_SOURCE_AMI, TAG_STATE,
    TAG_VARIANT,
};
use crate::aws::resources::{self, wait_image, wait_instance};
use crate::aws::wait::WaitPolicy;
use crate::aws::AwsError;
use crate::engine::{Keep, Step, StepContext, StepError};
use crate::modes::distribute;
use crate::modes::image_test::{self, ImageTest};
use crate::modes::support::{
    created_or_found, earlier, failed, mark_finished, provision, publish, tags, undo_with, waited,
};
use crate::provision::Entries;

impl BaseState {
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
        if let Some(publish) = &self.plan.publish {
            pairs.push((TAG_CHANNEL, &publish.parameter));
        }
        pairs.extend(self.plan.tags.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        tags(&pairs)
    }
}

pub struct CreateKeyPair;

#[async_trait]
impl Step<BaseState> for CreateKeyPair {
    fn name(&self) -> &'static str {
        "create key pair"
    }
    async fn run(&self, s: &mut BaseState, ctx: &mut StepContext) -> Result<(), StepError> {
        s.instance.create_key_pair(ctx).await
    }
}

pub struct CreateSecurityGroup;

#[async_trait]
impl Step<BaseState> for CreateSecurityGroup {
    fn name(&self) -> &'static str {
        "create security group"
    }
    async fn run(&self, s: &mut BaseState, ctx: &mut StepContext) -> Result<(), StepError> {
        s.instance.create_security_group(ctx).await
    }
}

pub struct LaunchInstance;

#[async_trait]
impl Step<BaseState> for LaunchInstance {
    fn name(&self) -> &'static str {
        "launch instance"
    }
    async fn run(&self, s: &mut BaseState, ctx: &mut StepContext) -> Result<(), StepError> {
        s.instance.launch(ctx).await
    }
}

pub struct WaitForSsh;

#[async_trait]
impl Step<BaseState> for WaitForSsh {
    fn name(&self) -> &'static str {
        "wait for ssh"
    }
    async fn run(&self, s: &mut BaseState, ctx: &mut StepContext) -> Result<(), StepError> {
        s.instance.wait_for_ssh(ctx).await
    }
}

pub struct RunProvisioners;

#[async_trait]
impl Step<BaseState> for RunProvisioners {
    fn name(&self) -> &'static str {
        "run provisioners"
    }
    async fn run(&self, s: &mut BaseState, ctx: &mut StepContext) -> Result<(), StepError> {
        let ssh = s.instance.ssh()?;
        provision(
            ssh.as_ref(),
            Entries::Provisioners,
            &s.plan.provisioners,
            ctx,
        )
        .await
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
        s.instance.stopping();
        let instance_id = s.instance.id()?;
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
        let instance_id = s.instance.id()?;
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
        // CreateImage: its snapshot is made while it waits.
        s.snapshot_ids = wait_image(
            &s.clients,
            &image_id,
            WaitPolicy::LONG,
            &ctx.cancel,
            &ctx.progress,
        )
        .await
        .map_err(waited)?;
        Ok(())
    }
}

/// The new image booted and tested, before it is delivered or published.
pub struct TestImage;

#[async_trait]
impl Step<BaseState> for TestImage {
    fn name(&self) -> &'static str {
        "test image"
    }
    async fn run(&self, s: &mut BaseState, ctx: &mut StepContext) -> Result<(), StepError> {
        // The build instance's session is over; its own tests boot a fresh instance.
        let image_id = earlier(&s.image_id, "image")?;
        let test = ImageTest {
            clients: &s.clients,
            build_id: &s.build_id,
            image_id: &image_id,
            root_device_name: &s.source.root_device_name,
            instance: Some(&s.plan.instance),
            tests: &s.plan.tests,
            skip: s.skip_tests,
            facts: vec![
                ("AMIBAKE_BUILD_ID", s.build_id.clone()),
                ("AMIBAKE_REGION", s.clients.region.clone()),
                ("AMIBAKE_VARIANT", s.plan.variant.name().to_string()),
                ("AMIBAKE_SOURCE_AMI", s.source.id.clone()),
            ],
        };
        image_test::run(test, ctx).await
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
