//! The steps of a base build. Each registers how to undo what it made the moment it exists.

use async_trait::async_trait;

use super::BaseState;
use crate::aws::wait::WaitPolicy;
use crate::engine::{Keep, Step, StepContext, StepError};
use crate::modes::support::{failed, provision, undo_with, waited};
use crate::provision::Entries;

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

/// Until the instance can be reached: its SSH server answers ("wait for ssh"), or its SSM
/// agent registers it ("wait for agent"). The step is named for what it waits on.
pub struct WaitToReach(pub &'static str);

#[async_trait]
impl Step<BaseState> for WaitToReach {
    fn name(&self) -> &'static str {
        self.0
    }
    async fn run(&self, s: &mut BaseState, ctx: &mut StepContext) -> Result<(), StepError> {
        s.instance.connect(ctx).await
    }
}

pub struct RunProvisioners;

#[async_trait]
impl Step<BaseState> for RunProvisioners {
    fn name(&self) -> &'static str {
        "run provisioners"
    }
    async fn run(&self, s: &mut BaseState, ctx: &mut StepContext) -> Result<(), StepError> {
        let session = s.instance.session()?;
        provision(
            session.as_ref(),
            Entries::Provisioners,
            &s.image.plan.provisioners,
            ctx,
        )
        .await?;
        // The instance's disk becomes the image next.
        session.clear_traces().await.map_err(failed)
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
        crate::aws::instance::stop(&s.image.clients, &instance_id)
            .await
            .map_err(failed)?;
        crate::aws::instance::wait(
            &s.image.clients,
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
        let image = &s.image;
        let image_id = crate::aws::image::create_from_instance(
            &image.clients,
            &instance_id,
            (&image.plan.name, image.plan.description.as_deref()),
            &image.artifact_tags(),
            &image.build_id,
            &ctx.progress,
        )
        .await
        .map_err(waited)?;
        s.image.image_id = Some(image_id.clone());
        // Its snapshots go with it: they are found from the image when it is removed.
        undo_with(
            ctx,
            &s.image.clients,
            image_id.clone(),
            &image_id,
            "deregister image and delete its snapshots",
            Keep::OnSuccess,
            crate::aws::image::deregister_with_snapshots,
        );
        // CreateImage: its snapshot is made while it waits.
        s.image.snapshot_ids = crate::aws::image::wait(
            &s.image.clients,
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
